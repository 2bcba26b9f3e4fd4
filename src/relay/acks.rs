//! Settling source deliveries: which acks to send so that `multiple` covers as much as it safely
//! can.
//!
//! `basic.ack(tag, multiple=true)` acks every unsettled delivery up to `tag` on the channel, so it
//! may only be used when all of those are meant to be acked: the tags still waiting for a confirm
//! or a commit must not be swept up with them.

use std::collections::BTreeMap;
use std::time::Instant;

use crate::metrics::Metrics;

/// The source deliveries of one channel that are neither acked nor rejected yet.
#[derive(Debug, Default)]
pub(crate) struct Unsettled {
    /// Unsettled tags, each with when it was received (for the relay latency histogram).
    tags: BTreeMap<u64, Instant>,
}

impl Unsettled {
    /// Records a delivery received.
    pub(crate) fn received(&mut self, tag: u64) {
        self.tags.insert(tag, Instant::now());
    }

    /// Number of deliveries not settled yet.
    pub(crate) fn len(&self) -> usize {
        self.tags.len()
    }

    /// Settles `tag` by a reject; returns whether it was unsettled.
    pub(crate) fn rejected(&mut self, tag: u64) -> bool {
        self.tags.remove(&tag).is_some()
    }

    /// Settles `tags` by acks and returns the acks to send, as `(tag, multiple)`: one `multiple`
    /// ack for the longest run of the oldest unsettled tags, single acks for the rest. Tags that
    /// are not unsettled are ignored.
    pub(crate) fn ack(&mut self, tags: &mut Vec<u64>) -> Vec<(u64, bool)> {
        tags.sort_unstable();
        tags.dedup();
        let mut out = Vec::new();
        // Walk the oldest unsettled tags while each is one we are acking.
        let mut covered = 0;
        for (unsettled, wanted) in self.tags.keys().zip(tags.iter()) {
            if unsettled != wanted {
                break;
            }
            covered += 1;
        }
        if covered > 0 {
            out.push((tags[covered - 1], covered > 1));
        }
        for tag in &tags[covered..] {
            if self.tags.contains_key(tag) {
                out.push((*tag, false));
            }
        }
        for tag in tags.iter() {
            if let Some(received) = self.tags.remove(tag) {
                Metrics::acked_after(received.elapsed());
            }
        }
        tags.clear();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unsettled(tags: impl IntoIterator<Item = u64>) -> Unsettled {
        let mut u = Unsettled::default();
        for t in tags {
            u.received(t);
        }
        u
    }

    #[test]
    fn oldest_run_is_one_multiple_ack() {
        let mut u = unsettled(1..=5);
        // 1..=3 complete out of order: one ack covers them; 4 and 5 stay unsettled.
        assert_eq!(u.ack(&mut vec![3, 1, 2]), vec![(3, true)]);
        assert_eq!(u.len(), 2);
    }

    #[test]
    fn a_gap_splits_into_single_acks() {
        let mut u = unsettled(1..=5);
        // 2 is still in flight: 1 alone first, then 3 and 5 singly (multiple would ack 2).
        assert_eq!(
            u.ack(&mut vec![1, 3, 5]),
            vec![(1, false), (3, false), (5, false)]
        );
        assert_eq!(u.ack(&mut vec![2, 4]), vec![(4, true)]);
        assert_eq!(u.len(), 0);
    }

    #[test]
    fn rejected_tags_do_not_block_a_run() {
        let mut u = unsettled(1..=4);
        // 2 went to the dead-letter queue; 1, 3, 4 then form the oldest run.
        assert!(u.rejected(2));
        assert_eq!(u.ack(&mut vec![4, 3, 1]), vec![(4, true)]);
    }

    #[test]
    fn unknown_tags_are_ignored() {
        let mut u = unsettled([5]);
        assert_eq!(u.ack(&mut vec![9]), vec![]);
        assert_eq!(u.ack(&mut vec![5, 5]), vec![(5, false)]);
    }
}
