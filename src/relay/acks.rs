//! Settling source deliveries: which acks to send so that `multiple` covers as much as it safely
//! can.
//!
//! `basic.ack(tag, multiple=true)` acks every unsettled delivery up to `tag` on the channel, so it
//! may only be used when all of those are meant to be acked: the tags still waiting for a confirm
//! or a commit must not be swept up with them.
//!
//! A delivery that is done while an older one is still in flight (a duplicate, say, acked at
//! once while the messages before it wait for their commit) is not acked alone right away: it
//! waits, briefly, for the older ones, so that one `multiple` ack covers them all. Single acks
//! cost the broker as much as the publishes they settle; with 20 % duplicates they were a tenth
//! of its work. The wait is bounded ([`STRAGGLER_WAIT`]), so that a delivery stuck in front (a
//! publish waiting out its confirm timeout) does not hold the others' prefetch slots.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Longest a finished delivery waits for older ones before it is acked on its own.
pub(crate) const STRAGGLER_WAIT: Duration = Duration::from_millis(50);

/// The source deliveries of one channel that are not acked nor rejected at the broker yet.
#[derive(Debug, Default)]
pub(crate) struct Unsettled {
    /// Deliveries still in flight, each with when it was received (for the latency histogram).
    tags: BTreeMap<u64, Instant>,
    /// Deliveries done, whose ack waits for the older ones in flight; with when they were
    /// received and when they were done.
    deferred: BTreeMap<u64, (Instant, Instant)>,
}

impl Unsettled {
    /// Records a delivery received at `now`.
    pub(crate) fn received(&mut self, tag: u64, now: Instant) {
        self.tags.insert(tag, now);
    }

    /// Number of deliveries not settled at the broker yet.
    pub(crate) fn len(&self) -> usize {
        self.tags.len() + self.deferred.len()
    }

    /// Whether `tag` is not settled at the broker yet (in flight, or its ack not sent).
    pub(crate) fn holds(&self, tag: u64) -> bool {
        self.tags.contains_key(&tag) || self.deferred.contains_key(&tag)
    }

    /// Whether acks are waiting to be sent.
    pub(crate) fn has_deferred(&self) -> bool {
        !self.deferred.is_empty()
    }

    /// Settles `tag` by a reject; returns whether it was in flight.
    pub(crate) fn rejected(&mut self, tag: u64) -> bool {
        self.tags.remove(&tag).is_some()
    }

    /// Marks `tags` done (tags not in flight are ignored) and returns the acks to send now, as
    /// `(tag, multiple)`: one `multiple` ack for every done delivery older than the oldest one
    /// still in flight; the others wait, unless `all` or the oldest of them waited
    /// [`STRAGGLER_WAIT`], in which case they are acked singly. `latency` is told, for every
    /// delivery acked, how long it took from receipt to `now`.
    pub(crate) fn ack(
        &mut self,
        tags: &mut Vec<u64>,
        now: Instant,
        all: bool,
        mut latency: impl FnMut(Duration),
    ) -> Vec<(u64, bool)> {
        for tag in tags.drain(..) {
            if let Some(received) = self.tags.remove(&tag) {
                self.deferred.insert(tag, (received, now));
            }
        }
        let mut out = Vec::new();
        let oldest_in_flight = self.tags.keys().next().copied().unwrap_or(u64::MAX);
        let rest = self.deferred.split_off(&oldest_in_flight);
        let run = std::mem::replace(&mut self.deferred, rest);
        if let Some(&last) = run.keys().next_back() {
            out.push((last, run.len() > 1));
        }
        let mut sent = run;
        let waited_enough = self
            .deferred
            .values()
            .map(|(_, done)| done)
            .min()
            .is_some_and(|at| now.saturating_duration_since(*at) >= STRAGGLER_WAIT);
        if all || waited_enough {
            let singles = std::mem::take(&mut self.deferred);
            out.extend(singles.keys().map(|&t| (t, false)));
            sent.extend(singles);
        }
        // Delivery to ack: measured now that the acks are about to leave.
        for (received, _) in sent.values() {
            latency(now.saturating_duration_since(*received));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unsettled(tags: impl IntoIterator<Item = u64>) -> Unsettled {
        let mut u = Unsettled::default();
        for t in tags {
            u.received(t, Instant::now());
        }
        u
    }

    fn ack(u: &mut Unsettled, tags: &[u64], at: Instant) -> Vec<(u64, bool)> {
        u.ack(&mut tags.to_vec(), at, false, |_| {})
    }

    #[test]
    fn oldest_run_is_one_multiple_ack() {
        let mut u = unsettled(1..=5);
        // 1..=3 complete out of order: one ack covers them; 4 and 5 stay unsettled.
        assert_eq!(ack(&mut u, &[3, 1, 2], Instant::now()), vec![(3, true)]);
        assert_eq!(u.len(), 2);
    }

    #[test]
    fn a_gap_defers_the_younger_ones_until_it_closes() {
        let mut u = unsettled(1..=5);
        let t = Instant::now();
        // 2 is still in flight: 1 alone now; 3 and 5 wait (multiple would ack 2).
        assert_eq!(ack(&mut u, &[1, 3, 5], t), vec![(1, false)]);
        assert_eq!(u.len(), 4);
        assert!(u.has_deferred());
        // 2 and 4 done: one ack covers 2..=5.
        assert_eq!(ack(&mut u, &[2, 4], t), vec![(5, true)]);
        assert_eq!(u.len(), 0);
    }

    #[test]
    fn deferred_acks_go_singly_after_the_straggler_wait() {
        let mut u = unsettled(1..=3);
        let t = Instant::now();
        assert_eq!(ack(&mut u, &[2, 3], t), vec![]);
        // Nothing new, but 1 is still stuck: after the wait, 2 and 3 go on their own.
        assert_eq!(ack(&mut u, &[], t + STRAGGLER_WAIT / 2), vec![]);
        assert_eq!(
            ack(&mut u, &[], t + STRAGGLER_WAIT),
            vec![(2, false), (3, false)]
        );
        assert_eq!(u.len(), 1);
    }

    #[test]
    fn all_sends_every_deferred_ack_now() {
        let mut u = unsettled(1..=3);
        let t = Instant::now();
        assert_eq!(
            u.ack(&mut vec![3], t, true, |_| {}),
            vec![(3, false)],
            "shutting down: nothing waits"
        );
    }

    #[test]
    fn rejected_tags_do_not_block_a_run() {
        let mut u = unsettled(1..=4);
        let t = Instant::now();
        // 3 and 4 done while 1 and 2 are in flight; then 2 is dead-lettered and 1 done: one ack.
        assert_eq!(ack(&mut u, &[4, 3], t), vec![]);
        assert!(u.rejected(2));
        assert_eq!(ack(&mut u, &[1], t), vec![(4, true)]);
    }

    #[test]
    fn a_reject_at_the_head_releases_the_deferred() {
        let mut u = unsettled(1..=3);
        let t = Instant::now();
        assert_eq!(ack(&mut u, &[2, 3], t), vec![]);
        assert!(u.rejected(1));
        assert_eq!(ack(&mut u, &[], t), vec![(3, true)]);
    }

    #[test]
    fn unknown_tags_are_ignored() {
        let mut u = unsettled([5]);
        let t = Instant::now();
        assert_eq!(ack(&mut u, &[9], t), vec![]);
        assert_eq!(ack(&mut u, &[5, 5], t), vec![(5, false)]);
    }
}
