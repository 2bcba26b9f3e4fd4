//! Publisher confirms: which publish each `basic.ack` / `basic.nack` settles, and which of them
//! came back unroutable.
//!
//! The broker numbers publishes on a confirm channel 1, 2, 3... and confirms them by that number,
//! possibly several at once (`multiple`) and out of order. An unroutable `mandatory` publish comes
//! back as a `basic.return` *before* the ack of its number, and the return carries no number. So
//! a return is remembered by a fingerprint of what was published (exchange, routing key,
//! message id, body), and the next ack that covers a publish with that fingerprint marks that
//! publish returned instead of confirmed. Publishes that share a fingerprint are interchangeable
//! for this: same bytes, same destination.

use std::collections::{BTreeMap, VecDeque};
use std::time::Instant;

use xxhash_rust::xxh3::Xxh3;

/// What identifies a publish when the broker returns it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Fingerprint(u64);

impl Fingerprint {
    /// For a publish that cannot come back (not `mandatory`): no return is matched to it.
    /// (A real fingerprint equal to it is as likely as any other 64-bit collision.)
    pub(crate) const NONE: Fingerprint = Fingerprint(0);

    /// The fingerprint of a message published (or returned) with these values.
    pub(crate) fn of(
        exchange: &str,
        routing_key: &str,
        message_id: Option<&str>,
        body: &[u8],
    ) -> Fingerprint {
        let mut h = Xxh3::new();
        // Lengths first, so field boundaries cannot shift between fields.
        for part in [exchange.as_bytes(), routing_key.as_bytes()] {
            h.update(&(part.len() as u64).to_le_bytes());
            h.update(part);
        }
        match message_id {
            Some(id) => {
                h.update(&[1]);
                h.update(&(id.len() as u64).to_le_bytes());
                h.update(id.as_bytes());
            }
            None => h.update(&[0]),
        }
        h.update(body);
        Fingerprint(h.digest())
    }
}

/// How a publish ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Acked and not returned: the destination has it.
    Confirmed,
    /// Returned as unroutable (then acked): nobody has it.
    Returned,
    /// Nacked by the broker.
    Nacked,
}

#[derive(Debug)]
struct Pending<T> {
    fingerprint: Fingerprint,
    deadline: Instant,
    item: T,
}

/// The publishes of one confirm channel that are waiting for their confirm, each with the item
/// the caller needs back when it settles.
#[derive(Debug)]
pub(crate) struct Confirms<T> {
    /// Number the broker gives the next publish.
    next_seq: u64,
    pending: BTreeMap<u64, Pending<T>>,
    /// Returns not yet matched to the ack that follows them, oldest first.
    returns: VecDeque<Fingerprint>,
}

impl<T> Default for Confirms<T> {
    fn default() -> Self {
        Confirms {
            next_seq: 1,
            pending: BTreeMap::new(),
            returns: VecDeque::new(),
        }
    }
}

impl<T> Confirms<T> {
    /// Records a publish just sent; returns its number.
    pub(crate) fn published(
        &mut self,
        fingerprint: Fingerprint,
        deadline: Instant,
        item: T,
    ) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.pending.insert(
            seq,
            Pending {
                fingerprint,
                deadline,
                item,
            },
        );
        seq
    }

    /// Publishes waiting for a confirm.
    pub(crate) fn len(&self) -> usize {
        self.pending.len()
    }

    /// Whether nothing waits for a confirm.
    pub(crate) fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Records a `basic.return`; the ack that follows it settles the publish.
    pub(crate) fn returned(&mut self, fingerprint: Fingerprint) {
        self.returns.push_back(fingerprint);
    }

    /// Settles the publishes a `basic.ack` covers.
    pub(crate) fn acked(&mut self, tag: u64, multiple: bool) -> Vec<(T, Outcome)> {
        self.settle(tag, multiple, Outcome::Confirmed)
    }

    /// Settles the publishes a `basic.nack` covers.
    pub(crate) fn nacked(&mut self, tag: u64, multiple: bool) -> Vec<(T, Outcome)> {
        self.settle(tag, multiple, Outcome::Nacked)
    }

    /// Removes and returns the publishes whose deadline is past.
    pub(crate) fn expired(&mut self, now: Instant) -> Vec<T> {
        // Deadlines grow with the publish number (one timeout for all), so the expired ones are
        // a prefix.
        let mut out = Vec::new();
        while let Some(entry) = self.pending.first_entry() {
            if entry.get().deadline > now {
                break;
            }
            out.push(entry.remove().item);
        }
        out
    }

    fn settle(&mut self, tag: u64, multiple: bool, how: Outcome) -> Vec<(T, Outcome)> {
        let covered: Vec<(u64, Pending<T>)> = if multiple {
            let rest = self.pending.split_off(&(tag + 1));
            std::mem::replace(&mut self.pending, rest)
                .into_iter()
                .collect()
        } else {
            self.pending
                .remove(&tag)
                .map(|p| (tag, p))
                .into_iter()
                .collect()
        };
        let mut outcomes: Vec<Outcome> = vec![how; covered.len()];
        // Match each remembered return to the oldest covered publish with its fingerprint.
        let mut unmatched = VecDeque::new();
        while let Some(fp) = self.returns.pop_front() {
            let hit = covered
                .iter()
                .zip(outcomes.iter())
                .position(|((_, p), o)| p.fingerprint == fp && *o != Outcome::Returned);
            match hit {
                Some(i) => outcomes[i] = Outcome::Returned,
                // Its ack is still to come only if a publish like it is still pending; otherwise
                // it belonged to a publish that timed out already, and is dropped.
                None if self.pending.values().any(|p| p.fingerprint == fp) => {
                    unmatched.push_back(fp)
                }
                None => {}
            }
        }
        self.returns = unmatched;
        covered
            .into_iter()
            .zip(outcomes)
            .map(|((_, p), o)| (p.item, o))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn fp(body: &str) -> Fingerprint {
        Fingerprint::of("out", "", Some(body), body.as_bytes())
    }

    fn confirms(bodies: &[&str]) -> (Confirms<&'static str>, Instant) {
        let now = Instant::now();
        let mut c = Confirms::default();
        for (i, b) in bodies.iter().enumerate() {
            let item: &'static str = Box::leak(b.to_string().into_boxed_str());
            let seq = c.published(fp(b), now + Duration::from_secs(i as u64 + 1), item);
            assert_eq!(seq, i as u64 + 1);
        }
        (c, now)
    }

    #[test]
    fn single_ack_confirms_one() {
        let (mut c, _) = confirms(&["a", "b"]);
        assert_eq!(c.acked(2, false), vec![("b", Outcome::Confirmed)]);
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn multiple_ack_confirms_all_up_to_its_tag() {
        let (mut c, _) = confirms(&["a", "b", "c"]);
        let got = c.acked(2, true);
        assert_eq!(
            got,
            vec![("a", Outcome::Confirmed), ("b", Outcome::Confirmed)]
        );
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn return_marks_the_matching_publish_of_the_next_ack() {
        let (mut c, _) = confirms(&["a", "b", "c"]);
        // b is unroutable: its return, then one ack covering a and b.
        c.returned(fp("b"));
        let got = c.acked(2, true);
        assert_eq!(
            got,
            vec![("a", Outcome::Confirmed), ("b", Outcome::Returned)]
        );
        // c is confirmed normally afterwards: the return was used up.
        assert_eq!(c.acked(3, false), vec![("c", Outcome::Confirmed)]);
    }

    #[test]
    fn return_waits_for_the_ack_that_covers_its_publish() {
        let (mut c, _) = confirms(&["a", "b"]);
        // a's ack was already on the wire when b's return arrived.
        c.returned(fp("b"));
        assert_eq!(c.acked(1, false), vec![("a", Outcome::Confirmed)]);
        assert_eq!(c.acked(2, false), vec![("b", Outcome::Returned)]);
    }

    #[test]
    fn identical_publishes_each_take_one_return() {
        let (mut c, _) = confirms(&["a", "a", "a"]);
        c.returned(fp("a"));
        let got = c.acked(3, true);
        let returned = got.iter().filter(|(_, o)| *o == Outcome::Returned).count();
        assert_eq!(returned, 1);
    }

    #[test]
    fn nack_fails_what_it_covers() {
        let (mut c, _) = confirms(&["a", "b"]);
        assert_eq!(
            c.nacked(2, true),
            vec![("a", Outcome::Nacked), ("b", Outcome::Nacked)]
        );
        assert!(c.is_empty());
    }

    #[test]
    fn expiry_takes_the_oldest_past_their_deadline() {
        let (mut c, now) = confirms(&["a", "b", "c"]);
        assert_eq!(c.expired(now + Duration::from_millis(2500)), vec!["a", "b"]);
        // A late ack for an expired publish settles nothing.
        assert_eq!(c.acked(1, false), vec![]);
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn return_of_an_expired_publish_is_dropped() {
        let (mut c, now) = confirms(&["a", "b"]);
        assert_eq!(c.expired(now + Duration::from_millis(1500)), vec!["a"]);
        c.returned(fp("a"));
        assert_eq!(c.acked(2, false), vec![("b", Outcome::Confirmed)]);
        assert!(c.returns.is_empty());
    }
}
