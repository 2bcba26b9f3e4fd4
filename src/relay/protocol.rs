//! The per-message protocol of DESIGN.md as a synchronous state machine: events in, actions
//! out, no I/O, no clock of its own.
//!
//! [`Protocol::step`] takes what happened (a delivery, the verdicts of a claim batch, a publisher
//! confirm or return, a commit done, a tick, shutdown) and queues what the driver must do about
//! it ([`Action`]: claim these ids, publish this message, commit these claims, ack, reject, wait
//! for another claim). [`Protocol::end_turn`] then adds what is best sent once per turn of the
//! driver's loop: one claim batch for every delivery taken, and acks that a `multiple` can
//! cover. The driver ([`super::session`]) does the I/O in the order the actions come.
//!
//! It is generic over the message (`M`, what gets published: the driver's AMQP properties and
//! body, moved, never copied), the store's claim (`C`, whose drop releases the id) and the
//! store's in-flight waiter (`W`), so the unit tests below drive it with plain values and a
//! clock they move themselves.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::acks::Unsettled;
use super::confirms::{Confirms, Fingerprint, Outcome};
use super::id::IdDecision;
use crate::metrics::DeadLetterReason;
use crate::store::{Error as StoreError, Settled};

/// A delivery tag on the consume channel.
pub(crate) type Tag = u64;

/// The store's answer to a claim, as the protocol needs it.
#[derive(Debug)]
pub(crate) enum Verdict<C, W> {
    /// First seen: the claim holds the id until it is committed or dropped.
    New(C),
    /// Seen inside the window.
    Duplicate,
    /// Another delivery of the id is being forwarded: wait for its outcome.
    InFlight(W),
}

/// One id of a claim batch: the tag it is for, the id, and its window.
pub(crate) type ClaimItem = (Tag, Vec<u8>, Duration);

/// One verdict of a claim batch: the tag and id it was asked for, and the store's answer.
pub(crate) type Claimed<C, W> = (Tag, Vec<u8>, Result<Verdict<C, W>, StoreError>);

/// What happened, fed to [`Protocol::step`].
#[derive(Debug)]
pub(crate) enum Event<M, C, W> {
    /// A delivery from the source queue, its id decided, and the fingerprint its forward would
    /// come back with if returned. `window`: how long its id stays a duplicate once recorded.
    /// `last_chance`: a quorum source will not deliver it again, it dead-letters it if this
    /// session ends before settling it.
    Delivered {
        tag: Tag,
        id: IdDecision,
        window: Duration,
        fingerprint: Fingerprint,
        last_chance: bool,
        message: M,
    },
    /// A delivery refused before its id is looked at (its window header cannot be read, say).
    Refused {
        tag: Tag,
        reason: DeadLetterReason,
        last_chance: bool,
    },
    /// The verdicts of a claim batch, each with the tag and id it was asked for.
    Claimed(Vec<Claimed<C, W>>),
    /// The claim a waiting delivery waited for settled.
    Settled { tag: Tag, settled: Settled },
    /// Publisher confirm (`multiple`: every publish up to `seq`).
    Acked { seq: u64, multiple: bool },
    /// Publisher nack.
    Nacked { seq: u64, multiple: bool },
    /// An unroutable publish came back (before the ack of its number).
    Returned(Fingerprint),
    /// A commit asked for by [`Action::Commit`] ended.
    Committed {
        tags: Vec<Tag>,
        result: Result<(), Arc<StoreError>>,
    },
    /// Time passed: fail the publishes past their confirm timeout.
    Tick,
    /// Stop taking new work; settle what is in flight; ack without waiting.
    Shutdown,
}

/// Where a publish goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Target {
    /// The destination exchange, `mandatory`.
    Destination,
    /// The duplicates (audit) exchange, not mandatory.
    Duplicates,
}

/// What the driver must do, in this order.
#[derive(Debug)]
pub(crate) enum Action<M, C, W> {
    /// Claim these ids, each for its window, in the store; answer with [`Event::Claimed`].
    Claim(Vec<ClaimItem>),
    /// Wait for the claim in flight, then answer with [`Event::Settled`] for `tag`.
    Await { tag: Tag, waiter: W },
    /// Publish `message` on the confirm channel; the protocol numbered it already, so publishes
    /// must leave in the order they are asked for.
    Publish { message: M, target: Target },
    /// Record these claims durably; answer with [`Event::Committed`] carrying `tags`.
    Commit { tags: Vec<Tag>, claims: Vec<C> },
    /// `basic.ack` on the consume channel.
    Ack { tag: Tag, multiple: bool },
    /// `basic.reject` without requeue: the source's dead-letter exchange keeps it.
    Reject { tag: Tag, reason: DeadLetterReason },
}

/// Why the protocol cannot go on; reconnecting would not help.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Stop {
    /// Claiming an id failed in the store.
    #[error("store claim failed: {0}")]
    Claim(#[source] StoreError),
    /// Recording confirmed ids failed: their messages are forwarded and must stay unacked.
    #[error("store commit failed, forwarded messages left unacked: {0}")]
    Commit(#[source] Arc<StoreError>),
}

/// The settings the protocol decides by.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Settings {
    /// How long a publish may wait for its confirm.
    pub(crate) confirm_timeout: Duration,
    /// Whether duplicates are copied to an audit exchange before they are acked.
    pub(crate) copy_duplicates: bool,
}

/// Totals since the driver last took them ([`Protocol::take_tally`]), for its metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Tally {
    /// Messages forwarded and about to be acked.
    pub(crate) forwarded: u64,
    /// Of those, forwarded without an id (no dedup).
    pub(crate) forwarded_without_id: u64,
    /// Duplicates about to be acked.
    pub(crate) duplicates: u64,
    /// Duplicates whose audit copy was confirmed.
    pub(crate) copies: u64,
}

/// A delivery whose message waits in the protocol (claim out, or another claim awaited).
#[derive(Debug)]
struct Parked<M> {
    message: M,
    fingerprint: Fingerprint,
    /// Kept while it waits for another delivery's claim, to claim anew if that one fails.
    id: Vec<u8>,
    window: Duration,
}

/// A publish waiting for its confirm, and what settles with it.
#[derive(Debug)]
enum Publish<C> {
    /// A first-seen message (or one without id: `claim: None`) sent to the destination.
    Forward { tag: Tag, claim: Option<C> },
    /// The audit copy of a duplicate.
    Copy { tag: Tag },
}

/// One session's protocol state. See the module doc.
#[derive(Debug)]
pub(crate) struct Protocol<M, C, W> {
    settings: Settings,
    /// Deliveries whose claim is out or waiting, by tag: the message stays here, not in the
    /// claim job.
    parked: HashMap<Tag, Parked<M>>,
    /// Source deliveries neither acked nor rejected.
    unsettled: Unsettled,
    /// Publishes waiting for their confirm.
    confirms: Confirms<Publish<C>>,
    /// Tags done this turn, to ack at its end (together, so `multiple` can cover them).
    to_ack: Vec<Tag>,
    /// Ids to claim at the end of this turn.
    to_claim: Vec<ClaimItem>,
    /// Claim batches asked for and not answered.
    claims_out: usize,
    /// Commits asked for and not answered.
    commits_out: usize,
    /// Deliveries waiting for another delivery's claim to settle.
    waiting: usize,
    /// Shutting down: acks leave at once, none is held for a `multiple` one.
    draining: bool,
    actions: Vec<Action<M, C, W>>,
    tally: Tally,
    /// Receipt-to-ack latencies of the deliveries acked since the driver last took them.
    latencies: Vec<Duration>,
    /// Deliveries at their last allowed delivery (see [`Event::Delivered`]).
    last_chances: Vec<Tag>,
}

impl<M, C, W> Protocol<M, C, W> {
    /// A fresh session's protocol.
    pub(crate) fn new(settings: Settings) -> Self {
        Protocol {
            settings,
            parked: HashMap::new(),
            unsettled: Unsettled::default(),
            confirms: Confirms::default(),
            to_ack: Vec::new(),
            to_claim: Vec::new(),
            claims_out: 0,
            commits_out: 0,
            waiting: 0,
            draining: false,
            actions: Vec::new(),
            tally: Tally::default(),
            latencies: Vec::new(),
            last_chances: Vec::new(),
        }
    }

    /// Handles `event` at `now`, queueing actions.
    ///
    /// # Errors
    ///
    /// A store failure the session cannot go on from ([`Stop`]).
    pub(crate) fn step(&mut self, event: Event<M, C, W>, now: Instant) -> Result<(), Stop> {
        match event {
            Event::Delivered {
                tag,
                id,
                window,
                fingerprint,
                last_chance,
                message,
            } => {
                self.received(tag, last_chance, now);
                match id {
                    IdDecision::Claim(id) => {
                        self.parked.insert(
                            tag,
                            Parked {
                                message,
                                fingerprint,
                                id: Vec::new(),
                                window,
                            },
                        );
                        self.to_claim.push((tag, id, window));
                    }
                    IdDecision::ForwardUnchecked => {
                        self.forward(tag, message, fingerprint, None, now)
                    }
                    IdDecision::DeadLetter => self.reject(tag, DeadLetterReason::NoId),
                }
            }
            Event::Refused {
                tag,
                reason,
                last_chance,
            } => {
                self.received(tag, last_chance, now);
                self.reject(tag, reason);
            }
            Event::Claimed(verdicts) => {
                self.claims_out -= 1;
                for (tag, id, verdict) in verdicts {
                    self.on_verdict(tag, id, verdict, now)?;
                }
            }
            Event::Settled { tag, settled } => {
                self.waiting -= 1;
                match settled {
                    Settled::Committed => {
                        if let Some(parked) = self.parked.remove(&tag) {
                            self.duplicate(tag, parked.message, now);
                        }
                    }
                    // The first copy failed: this one is new again.
                    Settled::Released => {
                        if let Some(parked) = self.parked.get_mut(&tag) {
                            let id = std::mem::take(&mut parked.id);
                            self.to_claim.push((tag, id, parked.window));
                        }
                    }
                }
            }
            Event::Acked { seq, multiple } => {
                let settled = self.confirms.acked(seq, multiple);
                self.on_confirms(settled);
            }
            Event::Nacked { seq, multiple } => {
                let settled = self.confirms.nacked(seq, multiple);
                self.on_confirms(settled);
            }
            Event::Returned(fingerprint) => self.confirms.returned(fingerprint),
            Event::Committed { tags, result } => {
                self.commits_out -= 1;
                // The ids are not recorded, so the messages must not be acked; they were
                // forwarded already. Stop: the broker redelivers them to the next session, which
                // is the crash window the README describes.
                result.map_err(Stop::Commit)?;
                self.tally.forwarded += tags.len() as u64;
                self.to_ack.extend(tags);
            }
            Event::Tick => {
                for publish in self.confirms.expired(now) {
                    match publish {
                        Publish::Forward { tag, claim } => {
                            // Release first, so a copy waiting on this id is processed anew.
                            drop(claim);
                            self.reject(tag, DeadLetterReason::Timeout);
                        }
                        Publish::Copy { tag } => {
                            tracing::warn!(tag, "copy of a duplicate not confirmed in time");
                            self.tally.duplicates += 1;
                            self.to_ack.push(tag);
                        }
                    }
                }
            }
            Event::Shutdown => self.draining = true,
        }
        Ok(())
    }

    /// Ends a turn of the driver's loop: queues one claim batch for the ids taken this turn, and
    /// the acks that are due (one `multiple` ack where it can cover several).
    pub(crate) fn end_turn(&mut self, now: Instant) {
        if !self.to_claim.is_empty() {
            self.claims_out += 1;
            let batch = std::mem::take(&mut self.to_claim);
            self.actions.push(Action::Claim(batch));
        }
        if !self.to_ack.is_empty() || self.unsettled.has_deferred() {
            let latencies = &mut self.latencies;
            let acks = self
                .unsettled
                .ack(&mut self.to_ack, now, self.draining, |d| latencies.push(d));
            self.actions.extend(
                acks.into_iter()
                    .map(|(tag, multiple)| Action::Ack { tag, multiple }),
            );
        }
    }

    /// The actions queued so far, in order; the queue is left empty.
    pub(crate) fn actions(&mut self) -> std::vec::Drain<'_, Action<M, C, W>> {
        self.actions.drain(..)
    }

    /// Totals since the last call.
    pub(crate) fn take_tally(&mut self) -> Tally {
        std::mem::take(&mut self.tally)
    }

    /// Receipt-to-ack latencies of the deliveries acked since the last call.
    pub(crate) fn latencies(&mut self) -> std::vec::Drain<'_, Duration> {
        self.latencies.drain(..)
    }

    /// Nothing in flight: every delivery received is settled or its ack is queued.
    pub(crate) fn idle(&self) -> bool {
        self.to_claim.is_empty()
            && self.claims_out == 0
            && self.waiting == 0
            && self.confirms.is_empty()
            && self.commits_out == 0
            && !self.unsettled.has_deferred()
    }

    /// Source deliveries not settled at the broker yet.
    pub(crate) fn unsettled(&self) -> usize {
        self.unsettled.len()
    }

    /// The deliveries at their last allowed delivery that are not settled: when the session
    /// ends now, the broker dead-letters them.
    pub(crate) fn unsettled_last_chances(&self) -> impl Iterator<Item = Tag> + '_ {
        self.last_chances
            .iter()
            .copied()
            .filter(|&tag| self.unsettled.holds(tag))
    }

    /// Publishes waiting for their confirm.
    pub(crate) fn publishes_in_flight(&self) -> usize {
        self.confirms.len()
    }

    fn on_verdict(
        &mut self,
        tag: Tag,
        id: Vec<u8>,
        verdict: Result<Verdict<C, W>, StoreError>,
        now: Instant,
    ) -> Result<(), Stop> {
        match verdict {
            Ok(Verdict::New(claim)) => {
                if let Some(p) = self.parked.remove(&tag) {
                    self.forward(tag, p.message, p.fingerprint, Some(claim), now);
                }
            }
            Ok(Verdict::Duplicate) => {
                if let Some(p) = self.parked.remove(&tag) {
                    self.duplicate(tag, p.message, now);
                }
            }
            Ok(Verdict::InFlight(waiter)) => {
                // Another delivery of this id is being forwarded: wait for its outcome without
                // holding up the others.
                if let Some(p) = self.parked.get_mut(&tag) {
                    p.id = id;
                    self.waiting += 1;
                    self.actions.push(Action::Await { tag, waiter });
                }
            }
            Err(e @ (StoreError::IdTooLong { .. } | StoreError::EmptyId { .. })) => {
                tracing::warn!(tag, cause = %e, "id refused, dead-lettering");
                self.parked.remove(&tag);
                self.reject(tag, DeadLetterReason::BadId);
            }
            Err(e) => return Err(Stop::Claim(e)),
        }
        Ok(())
    }

    /// Publishes a message to the destination; its source delivery settles with the confirm.
    fn forward(
        &mut self,
        tag: Tag,
        message: M,
        fingerprint: Fingerprint,
        claim: Option<C>,
        now: Instant,
    ) {
        let deadline = now + self.settings.confirm_timeout;
        self.confirms
            .published(fingerprint, deadline, Publish::Forward { tag, claim });
        self.actions.push(Action::Publish {
            message,
            target: Target::Destination,
        });
    }

    /// A duplicate: acked, after its audit copy is confirmed if there is a duplicates exchange.
    fn duplicate(&mut self, tag: Tag, message: M, now: Instant) {
        if !self.settings.copy_duplicates {
            self.tally.duplicates += 1;
            self.to_ack.push(tag);
            return;
        }
        // Not mandatory, so never returned: no fingerprint can match it.
        let deadline = now + self.settings.confirm_timeout;
        self.confirms
            .published(Fingerprint::NONE, deadline, Publish::Copy { tag });
        self.actions.push(Action::Publish {
            message,
            target: Target::Duplicates,
        });
    }

    fn on_confirms(&mut self, settled: Vec<(Publish<C>, Outcome)>) {
        let mut tags = Vec::new();
        let mut claims = Vec::new();
        for (publish, outcome) in settled {
            match (publish, outcome) {
                (Publish::Forward { tag, claim }, Outcome::Confirmed) => match claim {
                    Some(claim) => {
                        tags.push(tag);
                        claims.push(claim);
                    }
                    None => {
                        self.tally.forwarded += 1;
                        self.tally.forwarded_without_id += 1;
                        self.to_ack.push(tag);
                    }
                },
                (Publish::Forward { tag, claim }, failed) => {
                    // Release first, so a copy waiting on this id is processed anew.
                    drop(claim);
                    let reason = if failed == Outcome::Returned {
                        DeadLetterReason::Returned
                    } else {
                        DeadLetterReason::Nacked
                    };
                    self.reject(tag, reason);
                }
                (Publish::Copy { tag }, outcome) => {
                    if outcome == Outcome::Confirmed {
                        self.tally.copies += 1;
                    } else {
                        tracing::warn!(tag, ?outcome, "copy of a duplicate not accepted");
                    }
                    self.tally.duplicates += 1;
                    self.to_ack.push(tag);
                }
            }
        }
        if !claims.is_empty() {
            self.commits_out += 1;
            self.actions.push(Action::Commit { tags, claims });
        }
    }

    /// Records a delivery received.
    fn received(&mut self, tag: Tag, last_chance: bool, now: Instant) {
        self.unsettled.received(tag, now);
        if last_chance {
            self.last_chances.push(tag);
        }
    }

    /// Rejects a delivery without requeue, once.
    fn reject(&mut self, tag: Tag, reason: DeadLetterReason) {
        if self.unsettled.rejected(tag) {
            self.actions.push(Action::Reject { tag, reason });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::acks::STRAGGLER_WAIT;

    /// A claim that says when it is dropped (released) unless committed.
    #[derive(Debug, PartialEq, Eq)]
    struct TestClaim(&'static str);

    /// The in-flight waiter: a name to check the right one is awaited.
    #[derive(Debug, PartialEq, Eq)]
    struct TestWaiter(&'static str);

    type P = Protocol<&'static str, TestClaim, TestWaiter>;
    type A = Action<&'static str, TestClaim, TestWaiter>;

    const TIMEOUT: Duration = Duration::from_secs(5);
    const WINDOW: Duration = Duration::from_secs(60);

    fn protocol(copy_duplicates: bool) -> (P, Instant) {
        let settings = Settings {
            confirm_timeout: TIMEOUT,
            copy_duplicates,
        };
        (Protocol::new(settings), Instant::now())
    }

    fn fp(body: &str) -> Fingerprint {
        Fingerprint::of("out", "", Some(body), body.as_bytes())
    }

    /// Delivers `body` as tag `tag` with the id `body`.
    fn deliver(p: &mut P, tag: Tag, body: &'static str, now: Instant) {
        let event = Event::Delivered {
            tag,
            id: IdDecision::Claim(body.as_bytes().to_vec()),
            window: WINDOW,
            fingerprint: fp(body),
            last_chance: false,
            message: body,
        };
        p.step(event, now).unwrap();
    }

    fn step(p: &mut P, event: Event<&'static str, TestClaim, TestWaiter>, now: Instant) {
        p.step(event, now).unwrap();
    }

    fn turn(p: &mut P, now: Instant) -> Vec<A> {
        p.end_turn(now);
        p.actions().collect()
    }

    fn new(tag: Tag, id: &'static str) -> Claimed<TestClaim, TestWaiter> {
        (tag, id.as_bytes().to_vec(), Ok(Verdict::New(TestClaim(id))))
    }

    fn dup(tag: Tag, id: &'static str) -> Claimed<TestClaim, TestWaiter> {
        (tag, id.as_bytes().to_vec(), Ok(Verdict::Duplicate))
    }

    /// Short names for matching actions.
    fn claims(a: &A) -> Option<Vec<(Tag, &[u8])>> {
        match a {
            Action::Claim(batch) => Some(
                batch
                    .iter()
                    .map(|(t, id, window)| {
                        assert_eq!(*window, WINDOW);
                        (*t, id.as_slice())
                    })
                    .collect(),
            ),
            _ => None,
        }
    }

    fn published(a: &A) -> Option<(&'static str, Target)> {
        match a {
            Action::Publish { message, target } => Some((*message, *target)),
            _ => None,
        }
    }

    fn commit(a: &A) -> Option<(Vec<Tag>, Vec<&'static str>)> {
        match a {
            Action::Commit { tags, claims } => {
                Some((tags.clone(), claims.iter().map(|c| c.0).collect()))
            }
            _ => None,
        }
    }

    fn ack(a: &A) -> Option<(Tag, bool)> {
        match a {
            Action::Ack { tag, multiple } => Some((*tag, *multiple)),
            _ => None,
        }
    }

    /// The rejects among `actions`, in order.
    fn rejects(actions: &[A]) -> Vec<(Tag, DeadLetterReason)> {
        actions.iter().filter_map(reject).collect()
    }

    /// The broker nacks publish `seq` (and every earlier one with `multiple`).
    fn nacked(seq: u64, multiple: bool) -> Event<&'static str, TestClaim, TestWaiter> {
        Event::Nacked { seq, multiple }
    }

    /// The acks among `actions`, in order.
    fn acks(actions: &[A]) -> Vec<(Tag, bool)> {
        actions.iter().filter_map(ack).collect()
    }

    /// The broker confirms publish `seq` alone.
    fn confirmed(seq: u64) -> Event<&'static str, TestClaim, TestWaiter> {
        Event::Acked {
            seq,
            multiple: false,
        }
    }

    /// The commit of `tags` is durable.
    fn committed(tags: Vec<Tag>) -> Event<&'static str, TestClaim, TestWaiter> {
        Event::Committed {
            tags,
            result: Ok(()),
        }
    }

    fn reject(a: &A) -> Option<(Tag, DeadLetterReason)> {
        match a {
            Action::Reject { tag, reason } => Some((*tag, *reason)),
            _ => None,
        }
    }

    /// Delivers `bodies` as tags 1.., claims them new, and returns the protocol with every
    /// forward published (publish numbers 1.. in the same order).
    fn forwarded(bodies: &[&'static str]) -> (P, Instant) {
        let (mut p, t) = protocol(false);
        for (i, b) in bodies.iter().enumerate() {
            deliver(&mut p, i as Tag + 1, b, t);
        }
        let actions = turn(&mut p, t);
        assert_eq!(actions.len(), 1, "one claim batch: {actions:?}");
        let verdicts = bodies
            .iter()
            .enumerate()
            .map(|(i, b)| new(i as Tag + 1, b))
            .collect();
        step(&mut p, Event::Claimed(verdicts), t);
        let actions = turn(&mut p, t);
        let sent: Vec<_> = actions.iter().filter_map(published).collect();
        assert_eq!(sent.len(), bodies.len(), "{actions:?}");
        (p, t)
    }

    #[test]
    fn first_seen_is_claimed_published_committed_then_acked() {
        let (mut p, t) = protocol(false);
        deliver(&mut p, 1, "a", t);
        // One claim batch per turn.
        let actions = turn(&mut p, t);
        assert_eq!(claims(&actions[0]), Some(vec![(1, &b"a"[..])]));
        // New: published to the destination, nothing acked yet.
        step(&mut p, Event::Claimed(vec![new(1, "a")]), t);
        let actions = turn(&mut p, t);
        assert_eq!(actions.len(), 1);
        assert_eq!(published(&actions[0]), Some(("a", Target::Destination)));
        // Confirmed: the claim goes to commit; still no ack.
        step(&mut p, confirmed(1), t);
        let actions = turn(&mut p, t);
        assert_eq!(commit(&actions[0]), Some((vec![1], vec!["a"])));
        assert_eq!(actions.len(), 1);
        // Durable: acked, counted as forwarded, idle.
        let done = committed(vec![1]);
        step(&mut p, done, t);
        let actions = turn(&mut p, t + Duration::from_millis(3));
        assert_eq!(acks(&actions), vec![(1, false)]);
        assert_eq!(p.take_tally().forwarded, 1);
        assert_eq!(
            p.latencies().collect::<Vec<_>>(),
            vec![Duration::from_millis(3)]
        );
        assert!(p.idle());
    }

    /// Delivers `a` as tag 1 and has the store find it a duplicate: the protocol, the time and
    /// the actions that follow.
    fn duplicate_of_a(copy_duplicates: bool) -> (P, Instant, Vec<A>) {
        let (mut p, t) = protocol(copy_duplicates);
        deliver(&mut p, 1, "a", t);
        turn(&mut p, t);
        step(&mut p, Event::Claimed(vec![dup(1, "a")]), t);
        let actions = turn(&mut p, t);
        (p, t, actions)
    }

    #[test]
    fn duplicate_is_acked_without_publishing() {
        let (mut p, _, actions) = duplicate_of_a(false);
        assert_eq!(acks(&actions), vec![(1, false)]);
        assert!(actions.iter().all(|a| published(a).is_none()));
        assert_eq!(p.take_tally().duplicates, 1);
        assert!(p.idle());
    }

    #[test]
    fn duplicate_with_an_audit_exchange_is_acked_after_its_copy_is_confirmed() {
        let (mut p, t, actions) = duplicate_of_a(true);
        assert_eq!(published(&actions[0]), Some(("a", Target::Duplicates)));
        assert!(actions.iter().all(|a| ack(a).is_none()));
        step(&mut p, confirmed(1), t);
        let actions = turn(&mut p, t);
        assert_eq!(acks(&actions), vec![(1, false)]);
        let tally = p.take_tally();
        assert_eq!((tally.duplicates, tally.copies), (1, 1));
    }

    /// One helper for the in-flight cases: `a` (tag 1) is forwarded, a second copy `a` (tag 2)
    /// finds the claim in flight and waits; then the first copy's publish ends as `first`.
    fn in_flight_copy(first: Event<&'static str, TestClaim, TestWaiter>) -> (P, Instant, Vec<A>) {
        let (mut p, t) = forwarded(&["a"]);
        deliver(&mut p, 2, "a", t);
        turn(&mut p, t);
        let waiting = (2, b"a".to_vec(), Ok(Verdict::InFlight(TestWaiter("a"))));
        step(&mut p, Event::Claimed(vec![waiting]), t);
        let actions = turn(&mut p, t);
        assert!(
            matches!(
                &actions[..],
                [Action::Await {
                    tag: 2,
                    waiter: TestWaiter("a")
                }]
            ),
            "{actions:?}"
        );
        assert!(!p.idle(), "a delivery waits");
        step(&mut p, first, t);
        let actions = turn(&mut p, t);
        (p, t, actions)
    }

    #[test]
    fn in_flight_copy_is_a_duplicate_once_the_first_commits() {
        let (mut p, t, actions) = in_flight_copy(Event::Acked {
            seq: 1,
            multiple: false,
        });
        assert_eq!(commit(&actions[0]), Some((vec![1], vec!["a"])));
        step(&mut p, committed(vec![1]), t);
        // The store tells the waiter: committed, so the copy is a duplicate.
        step(
            &mut p,
            Event::Settled {
                tag: 2,
                settled: Settled::Committed,
            },
            t,
        );
        let actions = turn(&mut p, t);
        assert_eq!(acks(&actions), vec![(2, true)]);
        let tally = p.take_tally();
        assert_eq!((tally.forwarded, tally.duplicates), (1, 1));
        assert!(p.idle());
    }

    #[test]
    fn in_flight_copy_is_claimed_anew_when_the_first_is_nacked() {
        let (mut p, t, actions) = in_flight_copy(nacked(1, false));
        // The first copy is dead-lettered; its claim dropped (released) before the reject.
        assert_eq!(rejects(&actions), vec![(1, DeadLetterReason::Nacked)]);
        // Released: the copy is new again and goes back to the store with its id.
        step(
            &mut p,
            Event::Settled {
                tag: 2,
                settled: Settled::Released,
            },
            t,
        );
        let actions = turn(&mut p, t);
        assert_eq!(claims(&actions[0]), Some(vec![(2, &b"a"[..])]));
        step(&mut p, Event::Claimed(vec![new(2, "a")]), t);
        let actions = turn(&mut p, t);
        assert_eq!(published(&actions[0]), Some(("a", Target::Destination)));
    }

    #[test]
    fn nack_after_claim_rejects_and_releases() {
        let (mut p, t) = forwarded(&["a", "b"]);
        // Both nacked at once: both dead-lettered, nothing committed, nothing acked.
        step(&mut p, nacked(2, true), t);
        let actions = turn(&mut p, t);
        assert_eq!(
            rejects(&actions),
            vec![(1, DeadLetterReason::Nacked), (2, DeadLetterReason::Nacked)]
        );
        assert!(actions
            .iter()
            .all(|a| commit(a).is_none() && ack(a).is_none()));
        assert!(p.idle());
        assert_eq!(p.unsettled(), 0);
    }

    #[test]
    fn confirm_timeout_rejects_and_a_late_ack_settles_nothing() {
        let (mut p, t) = forwarded(&["a"]);
        // Before the deadline a tick does nothing.
        step(&mut p, Event::Tick, t + TIMEOUT - Duration::from_millis(1));
        assert!(turn(&mut p, t).is_empty());
        step(&mut p, Event::Tick, t + TIMEOUT);
        let actions = turn(&mut p, t + TIMEOUT);
        assert_eq!(rejects(&actions), vec![(1, DeadLetterReason::Timeout)]);
        // The ack that finally comes finds nothing to settle: no commit of a rejected message.
        step(&mut p, confirmed(1), t + TIMEOUT);
        assert!(turn(&mut p, t + TIMEOUT).is_empty());
        assert!(p.idle());
    }

    #[test]
    fn return_is_matched_to_the_ack_of_its_publish() {
        let (mut p, t) = forwarded(&["a", "b", "c"]);
        // b was unroutable: its return comes first, then one ack covering a and b.
        step(&mut p, Event::Returned(fp("b")), t);
        step(
            &mut p,
            Event::Acked {
                seq: 2,
                multiple: true,
            },
            t,
        );
        let actions = turn(&mut p, t);
        assert_eq!(rejects(&actions), vec![(2, DeadLetterReason::Returned)]);
        assert_eq!(actions.iter().find_map(commit), Some((vec![1], vec!["a"])));
        // c is confirmed normally: the return was used up.
        step(&mut p, confirmed(3), t);
        let actions = turn(&mut p, t);
        assert_eq!(actions.iter().find_map(commit), Some((vec![3], vec!["c"])));
    }

    #[test]
    fn commits_are_acked_with_multiple_over_the_oldest_run() {
        let (mut p, t) = forwarded(&["a", "b", "c", "d"]);
        // Two confirms, two commits: 1..=3, then 4.
        let confirm = |seq, multiple| Event::Acked { seq, multiple };
        step(&mut p, confirm(3, true), t);
        step(&mut p, confirm(4, false), t);
        let actions = turn(&mut p, t);
        assert_eq!(actions.iter().filter_map(commit).count(), 2);
        // 1..=3 durable, 4 not yet: one multiple ack covers 1..=3.
        step(&mut p, committed(vec![1, 2, 3]), t);
        let actions = turn(&mut p, t);
        assert_eq!(acks(&actions), vec![(3, true)]);
        step(&mut p, committed(vec![4]), t);
        let actions = turn(&mut p, t);
        assert_eq!(acks(&actions), vec![(4, false)]);
        assert!(p.idle());
    }

    #[test]
    fn a_younger_duplicate_waits_for_the_older_forward_to_ack_with_it() {
        let (mut p, t) = forwarded(&["a"]);
        deliver(&mut p, 2, "x", t);
        turn(&mut p, t);
        step(&mut p, Event::Claimed(vec![dup(2, "x")]), t);
        // 1 is still in flight: 2 is not acked alone (multiple would ack 1 too), it waits.
        assert!(turn(&mut p, t).iter().all(|a| ack(a).is_none()));
        step(&mut p, confirmed(1), t);
        turn(&mut p, t);
        step(&mut p, committed(vec![1]), t);
        let actions = turn(&mut p, t);
        assert_eq!(acks(&actions), vec![(2, true)]);
    }

    #[test]
    fn a_done_delivery_behind_a_stuck_one_is_acked_alone_after_the_straggler_wait() {
        let (mut p, t) = forwarded(&["a"]);
        deliver(&mut p, 2, "x", t);
        turn(&mut p, t);
        step(&mut p, Event::Claimed(vec![dup(2, "x")]), t);
        assert!(turn(&mut p, t).iter().all(|a| ack(a).is_none()));
        assert!(!p.idle());
        let actions = turn(&mut p, t + STRAGGLER_WAIT);
        assert_eq!(acks(&actions), vec![(2, false)]);
    }

    #[test]
    fn commit_failure_stops_without_acking() {
        let (mut p, t) = forwarded(&["a"]);
        step(&mut p, confirmed(1), t);
        turn(&mut p, t);
        let failed = Event::Committed {
            tags: vec![1],
            result: Err(Arc::new(StoreError::Closed)),
        };
        assert!(matches!(p.step(failed, t), Err(Stop::Commit(_))));
        assert!(turn(&mut p, t).iter().all(|a| ack(a).is_none()));
    }

    #[test]
    fn claim_failure_stops_and_a_refused_id_is_dead_lettered() {
        let (mut p, t) = protocol(false);
        deliver(&mut p, 1, "a", t);
        turn(&mut p, t);
        let refused = (1, b"a".to_vec(), Err(StoreError::EmptyId { max: 256 }));
        step(&mut p, Event::Claimed(vec![refused]), t);
        let actions = turn(&mut p, t);
        assert_eq!(rejects(&actions), vec![(1, DeadLetterReason::BadId)]);
        deliver(&mut p, 2, "b", t);
        turn(&mut p, t);
        let failed = (2, b"b".to_vec(), Err(StoreError::Closed));
        assert!(matches!(
            p.step(Event::Claimed(vec![failed]), t),
            Err(Stop::Claim(_))
        ));
    }

    #[test]
    fn refused_delivery_is_dead_lettered_at_once() {
        let (mut p, t) = protocol(false);
        let refused = Event::Refused {
            tag: 1,
            reason: DeadLetterReason::BadTtl,
            last_chance: true,
        };
        step(&mut p, refused, t);
        let actions = turn(&mut p, t);
        assert_eq!(reject(&actions[0]), Some((1, DeadLetterReason::BadTtl)));
        assert_eq!(p.unsettled_last_chances().count(), 0, "settled");
        assert!(p.idle());
    }

    #[test]
    fn without_id_forward_unchecked_or_dead_letter() {
        let (mut p, t) = protocol(false);
        let event = |tag, id| Event::Delivered {
            tag,
            id,
            window: WINDOW,
            fingerprint: fp("n"),
            last_chance: false,
            message: "n",
        };
        step(&mut p, event(1, IdDecision::ForwardUnchecked), t);
        step(&mut p, event(2, IdDecision::DeadLetter), t);
        let actions = turn(&mut p, t);
        assert_eq!(published(&actions[0]), Some(("n", Target::Destination)));
        assert_eq!(reject(&actions[1]), Some((2, DeadLetterReason::NoId)));
        // Confirmed without a claim: acked at once, nothing to commit.
        step(&mut p, confirmed(1), t);
        let actions = turn(&mut p, t);
        assert_eq!(acks(&actions), vec![(1, false)]);
        let tally = p.take_tally();
        assert_eq!((tally.forwarded, tally.forwarded_without_id), (1, 1));
    }

    #[test]
    fn last_chances_left_unsettled_are_counted_when_the_session_ends() {
        let (mut p, t) = protocol(false);
        for (tag, last_chance) in [(1, true), (2, true), (3, false)] {
            let event = Event::Delivered {
                tag,
                id: IdDecision::Claim(vec![b'0' + tag as u8]),
                window: WINDOW,
                fingerprint: fp("m"),
                last_chance,
                message: "m",
            };
            step(&mut p, event, t);
        }
        turn(&mut p, t);
        step(
            &mut p,
            Event::Claimed(vec![dup(1, "1"), new(2, "2"), new(3, "3")]),
            t,
        );
        turn(&mut p, t);
        // 1 is acked (a duplicate); 2 is still waiting for its confirm when the session ends.
        assert_eq!(p.unsettled_last_chances().collect::<Vec<_>>(), vec![2]);
    }

    #[test]
    fn shutdown_drains_what_is_in_flight_and_acks_without_waiting() {
        let (mut p, t) = forwarded(&["a"]);
        deliver(&mut p, 2, "x", t);
        turn(&mut p, t);
        step(&mut p, Event::Claimed(vec![dup(2, "x")]), t);
        turn(&mut p, t);
        // Shutdown with 1 still in flight and 2 held for a multiple ack.
        step(&mut p, Event::Shutdown, t);
        assert!(!p.idle());
        let actions = turn(&mut p, t);
        assert_eq!(
            acks(&actions),
            vec![(2, false)],
            "draining: nothing is held back"
        );
        step(&mut p, confirmed(1), t);
        turn(&mut p, t);
        assert!(!p.idle(), "the commit is still out");
        step(&mut p, committed(vec![1]), t);
        let actions = turn(&mut p, t);
        assert_eq!(acks(&actions), vec![(1, false)]);
        assert!(p.idle());
        assert_eq!(p.unsettled(), 0);
    }
}
