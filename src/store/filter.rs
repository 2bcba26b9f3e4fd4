//! The in-memory prefilter: Bloom generations over the ids' keyed digests.
//!
//! Normally one generation answers every lookup (one filter probe, the fast path). The store
//! rebuilds a fresh generation from the index's live ids about once per window and swaps it in, so
//! expired ids stop costing false positives without querying many time slices. A burst above the
//! expected rate rolls a new generation early instead of overfilling the current one; the next
//! rebuild folds them back into one filter sized for what is really live.
//!
//! Each generation is a *blocked* Bloom filter: an id's k bits all lie in one 512-bit block, one
//! cache line, so a lookup costs one memory access instead of k, and its bits come straight from
//! the digest the store already computed (keyed by the data dir's secret, so uniformly random):
//! no further hashing. Blocks fill unevenly, so for the same bits per id a blocked filter answers
//! "maybe" a little more often than a classic one; [`Blocks::for_rate`] sizes it for the target
//! rate with that taken into account.
//!
//! Invariant kept by the store, not by this type: every id live in the index was `insert`ed
//! here (or was seen by the rebuild that produced the current generation), once the filter is
//! ready.

use serde::{Deserialize, Serialize};

/// A digest for the unit tests below (the store's own are keyed per data dir).
#[cfg(test)]
fn digest(id: &[u8]) -> u128 {
    xxhash_rust::xxh3::xxh3_128(id)
}

/// Bits in a block: one 64-byte cache line.
const BLOCK_BITS: u32 = 512;

/// One cache line of filter bits.
#[derive(Clone, Copy, Default)]
#[repr(C, align(64))]
struct Block([u64; 8]);

/// A blocked Bloom filter over 96-bit digests: bits 64..96 pick the block, the low 64 bits give
/// the `k` bit positions inside it, 9 bits each.
pub(crate) struct Blocks {
    blocks: Box<[Block]>,
    k: u32,
}

/// The false-positive rate of a blocked filter with `bits_per_id` and `k` bits per id: the ids
/// per block follow a Poisson law, and a block holding `j` of them answers "maybe" with the
/// classic rate for `j` ids in 512 bits.
fn blocked_fp_rate(bits_per_id: f64, k: u32) -> f64 {
    let mean = f64::from(BLOCK_BITS) / bits_per_id;
    let mut p_j = (-mean).exp(); // Poisson(mean) at j = 0
    let mut rate = 0.0;
    let last = (mean + 12.0 * mean.sqrt() + 24.0) as u32;
    for j in 0..=last {
        if j > 0 {
            p_j *= mean / f64::from(j);
        }
        let unset = (1.0 - 1.0 / f64::from(BLOCK_BITS)).powf(f64::from(k * j));
        rate += p_j * (1.0 - unset).powi(k as i32);
    }
    rate
}

impl Blocks {
    /// A filter for `items` ids at about `fp_rate`: the fewest bits per id (in steps of 1/8) for
    /// which some `k` meets the rate.
    pub(crate) fn for_rate(items: u64, fp_rate: f64) -> Blocks {
        let (bits_per_id, k) = Blocks::shape(fp_rate);
        let bits = (items.max(1) as f64 * bits_per_id).ceil();
        let blocks = ((bits / f64::from(BLOCK_BITS)).ceil() as usize).max(1);
        Blocks {
            blocks: vec![Block::default(); blocks].into_boxed_slice(),
            k,
        }
    }

    /// Bits per id and bits set per id that meet `fp_rate`.
    fn shape(fp_rate: f64) -> (f64, u32) {
        // The classic filter's optimum is the lower bound; blocking costs a little more.
        let mut bits_per_id = (-fp_rate.ln() / std::f64::consts::LN_2.powi(2)).max(1.0);
        loop {
            let k_classic = (bits_per_id * std::f64::consts::LN_2).round().max(1.0) as u32;
            let best = (k_classic.saturating_sub(2).max(1)..=k_classic + 1)
                .map(|k| (blocked_fp_rate(bits_per_id, k), k))
                .min_by(|a, b| a.0.total_cmp(&b.0))
                .expect("non-empty range");
            // Past 64 bits an id the target is unreachably small; take what 64 bits give.
            if best.0 <= fp_rate || bits_per_id >= 64.0 {
                return (bits_per_id, best.1.min(16));
            }
            bits_per_id += 0.125;
        }
    }

    #[inline]
    fn block_of(&self, digest: u128) -> usize {
        // Multiply-shift maps 32 random bits onto any number of blocks without a division.
        ((u64::from((digest >> 64) as u32) * self.blocks.len() as u64) >> 32) as usize
    }

    /// The `k` (word, bit mask) pairs of a digest in its block.
    #[inline]
    fn bits(&self, digest: u128) -> impl Iterator<Item = (usize, u64)> {
        let mut h = digest as u64;
        (0..self.k).map(move |i| {
            if i > 0 && i % 7 == 0 {
                // Seven 9-bit fields use 63 of the 64 bits; stir for more.
                h = h.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(31);
            }
            let pos = (h & 511) as usize;
            h >>= 9;
            (pos >> 6, 1u64 << (pos & 63))
        })
    }

    pub(crate) fn set(&mut self, digest: u128) {
        let b = self.block_of(digest);
        let mut block = self.blocks[b];
        for (word, mask) in self.bits(digest) {
            block.0[word] |= mask;
        }
        self.blocks[b] = block;
    }

    #[inline]
    pub(crate) fn check(&self, digest: u128) -> bool {
        let block = &self.blocks[self.block_of(digest)];
        // No early exit: the bits are in one cache line, and branches on random bits mispredict.
        self.bits(digest)
            .fold(true, |all, (word, mask)| all & (block.0[word] & mask != 0))
    }

    /// Bytes of bits.
    pub(crate) fn bytes(&self) -> u64 {
        (self.blocks.len() * 64) as u64
    }

    /// The bits as little-endian words, for the snapshot.
    fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.blocks.len() * 64);
        for b in self.blocks.iter() {
            for w in b.0 {
                out.extend_from_slice(&w.to_le_bytes());
            }
        }
        out
    }

    fn from_bytes(bytes: &[u8], k: u32) -> Option<Blocks> {
        let whole_blocks = bytes.chunks_exact(64).remainder().is_empty();
        if bytes.is_empty() || !whole_blocks || !(1..=16).contains(&k) {
            return None;
        }
        let blocks = bytes
            .chunks_exact(64)
            .map(|c| {
                let mut b = Block::default();
                for (w, bytes) in b.0.iter_mut().zip(c.chunks_exact(8)) {
                    *w = u64::from_le_bytes(bytes.try_into().expect("8-byte chunk"));
                }
                b
            })
            .collect();
        Some(Blocks { blocks, k })
    }
}

/// One Bloom filter and what is known about the ids in it.
pub(crate) struct Generation {
    bloom: Blocks,
    /// Number of ids the filter was sized for at the target false-positive rate.
    capacity: u64,
    /// Ids inserted so far (duplicates counted; an upper bound on its load).
    inserted: u64,
    /// Latest expiry among its ids: once `now` passes it, the whole generation is dead weight.
    newest_expiry_ms: u64,
}

impl Generation {
    fn new(capacity: u64, fp_rate: f64) -> Generation {
        Generation {
            bloom: Blocks::for_rate(capacity, fp_rate),
            capacity: capacity.max(1),
            inserted: 0,
            newest_expiry_ms: 0,
        }
    }

    fn set(&mut self, digest: u128, expires_ms: u64) {
        self.bloom.set(digest);
        self.inserted += 1;
        self.newest_expiry_ms = self.newest_expiry_ms.max(expires_ms);
    }
}

/// The generations plus, while a rebuild scan runs, the digests inserted since it started.
pub(crate) struct Filters {
    /// Oldest first; inserts go to the last one. Never empty.
    gens: Vec<Generation>,
    /// `Some` while a rebuild is copying the index: inserts are also recorded here so the rebuilt
    /// generation can be topped up with everything the scan may have missed.
    pending: Option<Vec<(u128, u64)>>,
    /// Capacity given to a generation rolled early during a burst.
    roll_capacity: u64,
    /// Target false-positive rate of each generation.
    fp_rate: f64,
    /// When the current base generation was built (ms); a rebuild is due one window later.
    built_ms: u64,
    /// `false` while the filter is still being filled from the index after an open without a
    /// snapshot: it answers "maybe" to everything until then (the index is exact on its own).
    ready: bool,
}

impl Filters {
    /// An empty filter set whose generation holds `capacity` ids at `fp_rate`.
    pub(crate) fn new(capacity: u64, fp_rate: f64, now_ms: u64) -> Filters {
        Filters {
            gens: vec![Generation::new(capacity, fp_rate)],
            pending: None,
            roll_capacity: capacity,
            fp_rate,
            built_ms: now_ms,
            ready: true,
        }
    }

    /// A filter that answers "maybe" until a rebuild fills it.
    pub(crate) fn unready(capacity: u64, fp_rate: f64, now_ms: u64) -> Filters {
        Filters {
            ready: false,
            ..Filters::new(capacity, fp_rate, now_ms)
        }
    }

    /// "Maybe" (`true`) or "certainly not" (`false`). Newest first: a recent duplicate is the
    /// common positive.
    pub(crate) fn contains(&self, digest: u128) -> bool {
        !self.ready || self.gens.iter().rev().any(|g| g.bloom.check(digest))
    }

    /// Records a digest. Returns `true` when this insert rolled a new generation, so the caller
    /// can wake the compactor to consolidate.
    pub(crate) fn insert(&mut self, digest: u128, expires_ms: u64) -> bool {
        let mut rolled = false;
        let last = self.gens.last().expect("never empty");
        if last.inserted >= last.capacity {
            self.gens
                .push(Generation::new(self.roll_capacity, self.fp_rate));
            rolled = true;
        }
        self.gens
            .last_mut()
            .expect("never empty")
            .set(digest, expires_ms);
        if let Some(pending) = &mut self.pending {
            pending.push((digest, expires_ms));
        }
        rolled
    }

    /// Drops generations (never the newest) whose ids are all past their TTL.
    pub(crate) fn drop_expired(&mut self, now_ms: u64) -> usize {
        let before = self.gens.len();
        let newest = self.gens.len() - 1;
        let mut i = 0;
        self.gens.retain(|g| {
            let keep = i == newest || g.newest_expiry_ms > now_ms;
            i += 1;
            keep
        });
        before - self.gens.len()
    }

    /// Whether a rebuild would pay off: several generations to fold back into one, or a window
    /// has passed since the base was built, so part of it is expired.
    pub(crate) fn rebuild_due(&self, now_ms: u64, ttl_ms: u64) -> bool {
        if !self.ready {
            return true;
        }
        let inserted = self.gens.iter().map(|g| g.inserted).sum::<u64>();
        self.gens.len() > 1 || (inserted > 0 && now_ms >= self.built_ms.saturating_add(ttl_ms))
    }

    /// When the next rebuild falls due if nothing rolls over (ms); never for an empty filter.
    pub(crate) fn rebuild_at(&self, ttl_ms: u64) -> u64 {
        if !self.ready {
            return 0;
        }
        if self.gens.iter().all(|g| g.inserted == 0) {
            return u64::MAX;
        }
        self.built_ms.saturating_add(ttl_ms)
    }

    /// Starts recording inserts for a rebuild. The caller must make sure every insert made before
    /// this call is already in the index, so the copy sees it.
    pub(crate) fn begin_rebuild(&mut self) {
        self.pending = Some(Vec::new());
    }

    /// Swaps in a rebuilt generation, topped up with the inserts made during the scan.
    pub(crate) fn finish_rebuild(&mut self, mut fresh: Filters) {
        for (d, expires_ms) in self.pending.take().unwrap_or_default() {
            fresh.insert(d, expires_ms);
        }
        // A generation rolled during the scan only holds ids that are also in `pending`.
        fresh.roll_capacity = self.roll_capacity;
        *self = fresh;
    }

    /// Builds a one-generation set for a rebuild scan over about `live` ids.
    pub(crate) fn for_rebuild(&self, live: u64, now_ms: u64) -> Filters {
        // Room for what is live plus one more window at the expected rate, so the next rebuild
        // comes before the filter runs over its target rate.
        let capacity = live.saturating_add(self.roll_capacity);
        Filters::new(capacity, self.fp_rate, now_ms)
    }

    /// Number of generations queried by a lookup.
    pub(crate) fn generations(&self) -> usize {
        self.gens.len()
    }

    /// Memory held by the bit arrays.
    pub(crate) fn bytes(&self) -> u64 {
        self.gens.iter().map(|g| g.bloom.bytes()).sum()
    }

    /// Serialisable form for the shutdown snapshot.
    pub(crate) fn to_snapshot(&self) -> FiltersSnapshot {
        FiltersSnapshot {
            gens: self
                .gens
                .iter()
                .map(|g| GenerationSnapshot {
                    bloom: g.bloom.to_bytes(),
                    k: g.bloom.k,
                    capacity: g.capacity,
                    inserted: g.inserted,
                    newest_expiry_ms: g.newest_expiry_ms,
                })
                .collect(),
            roll_capacity: self.roll_capacity,
            fp_rate: self.fp_rate,
            built_ms: self.built_ms,
            ready: self.ready,
        }
    }

    /// Restores a snapshot; `None` when it does not decode into valid filters.
    pub(crate) fn from_snapshot(snap: FiltersSnapshot) -> Option<Filters> {
        if snap.gens.is_empty() {
            return None;
        }
        let mut gens = Vec::with_capacity(snap.gens.len());
        for g in snap.gens {
            gens.push(Generation {
                bloom: Blocks::from_bytes(&g.bloom, g.k)?,
                capacity: g.capacity,
                inserted: g.inserted,
                newest_expiry_ms: g.newest_expiry_ms,
            });
        }
        Some(Filters {
            gens,
            pending: None,
            roll_capacity: snap.roll_capacity,
            fp_rate: snap.fp_rate,
            built_ms: snap.built_ms,
            ready: snap.ready,
        })
    }
}

/// Serialised generations, written in the index snapshot on a clean close.
#[derive(Serialize, Deserialize)]
pub(crate) struct FiltersSnapshot {
    gens: Vec<GenerationSnapshot>,
    roll_capacity: u64,
    fp_rate: f64,
    built_ms: u64,
    /// A filter still being filled when the store closed is filled again after the open.
    ready: bool,
}

#[derive(Serialize, Deserialize)]
struct GenerationSnapshot {
    /// The blocks' bits, little-endian words.
    bloom: Vec<u8>,
    /// Bits set per id.
    k: u32,
    capacity: u64,
    inserted: u64,
    newest_expiry_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_rolls_a_generation_and_keeps_every_id() {
        let mut f = Filters::new(100, 0.01, 0);
        let mut rolled = false;
        for i in 0u32..250 {
            rolled |= f.insert(digest(&i.to_le_bytes()), 1_000);
        }
        assert!(rolled);
        assert_eq!(f.generations(), 3);
        assert!((0u32..250).all(|i| f.contains(digest(&i.to_le_bytes()))));
        assert!(f.rebuild_due(0, 10_000));
    }

    #[test]
    fn expired_generations_are_dropped_but_never_the_newest() {
        let mut f = Filters::new(10, 0.01, 0);
        for i in 0u32..11 {
            f.insert(digest(&i.to_le_bytes()), 50);
        }
        assert_eq!(f.generations(), 2);
        assert_eq!(f.drop_expired(49), 0);
        assert_eq!(f.drop_expired(50), 1);
        assert_eq!(f.generations(), 1);
        assert_eq!(f.drop_expired(1_000), 0);
    }

    #[test]
    fn rebuild_keeps_inserts_made_during_the_scan() {
        let mut f = Filters::new(10, 0.01, 0);
        assert_eq!(f.rebuild_at(10), u64::MAX);
        f.begin_rebuild();
        let mut fresh = f.for_rebuild(0, 5);
        fresh.insert(digest(b"scanned"), 100);
        f.insert(digest(b"during"), 100);
        f.finish_rebuild(fresh);
        assert!(f.contains(digest(b"scanned")));
        assert!(f.contains(digest(b"during")));
        assert_eq!(f.rebuild_at(10), 15);
    }

    #[test]
    fn blocked_filter_meets_its_rate_when_full() {
        for target in [0.01, 0.001] {
            let n = 100_000u32;
            let mut b = Blocks::for_rate(u64::from(n), target);
            for i in 0..n {
                b.set(digest(&i.to_le_bytes()));
            }
            assert!((0..n).all(|i| b.check(digest(&i.to_le_bytes()))));
            let fps = (n..3 * n)
                .filter(|i| b.check(digest(&i.to_le_bytes())))
                .count();
            let measured = fps as f64 / f64::from(2 * n);
            // The estimate is the mean; allow for the sample's spread.
            assert!(measured < target * 1.3, "{target}: measured {measured}");
            // Within a few percent of the classic filter's bits for the same rate.
            let classic = -target.ln() / std::f64::consts::LN_2.powi(2) / 8.0;
            assert!(b.bytes() as f64 / f64::from(n) < classic * 1.3);
        }
    }

    #[test]
    fn snapshot_round_trips() {
        let mut f = Filters::new(1000, 0.01, 7);
        f.insert(digest(b"a"), 9);
        let g = Filters::from_snapshot(f.to_snapshot()).unwrap();
        assert!(g.contains(digest(b"a")));
        assert_eq!(g.bytes(), f.bytes());
    }
}
