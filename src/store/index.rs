//! The exact index in memory: for relay ids, digest → expiry; for Redis keys, key → value and
//! times. sled holds the same facts as segments; this is what answers.
//!
//! Both are split into shards of hash tables, each behind its own lock: a table grows one
//! shard at a time (no pause to rehash millions of entries at once), the rebuild and the
//! snapshot work shard by shard, and readers of one shard do not wait for a writer of another.
//! Redis keys use [`SHARDS`] tables; relay ids as many as make `DEDUPD_EXPECTED_IDS` fill each
//! (power-of-two) table to just under its load limit (see [`Ids::ids`]).
//!
//! A relay entry is 16 bytes: the low 84 bits of the id's keyed digest and the expiry in 44
//! bits of milliseconds (up to the year 2527; a later one is held as "never"). 84 bits keep two
//! live ids from meeting with probability n²/2⁸⁵ (about 3·10⁻¹² for 10 M live ids, and the
//! digest is keyed, so ids cannot be crafted to meet); the segments on disk keep all 128.

use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use hashbrown::HashTable;

pub(crate) use super::kv_slot::KvSlot;

/// Tables of the Redis keys' index; the least the relay ids' index has.
pub(crate) const SHARDS: usize = 64;

/// Digests of ids and keys, keyed by a per-data-dir secret so that ids crafted to collide in
/// one store's digest do not collide in another's.
#[derive(Clone)]
pub(crate) struct Keyed {
    secret: Box<[u8]>,
}

/// Bytes of the secret (xxh3 wants at least 136).
pub(crate) const SECRET_LEN: usize = 192;

impl Keyed {
    pub(crate) fn new(secret: &[u8]) -> Keyed {
        assert!(secret.len() >= SECRET_LEN, "digest secret too short");
        Keyed {
            secret: secret.into(),
        }
    }

    /// The 128-bit digest written to disk.
    pub(crate) fn digest(&self, bytes: &[u8]) -> u128 {
        xxhash_rust::xxh3::xxh3_128_with_secret(bytes, &self.secret)
    }
}

/// Bits of a digest the memory index and the Bloom filter keep.
pub(crate) const SHORT_BITS: u32 = 84;

/// The part of a digest the memory index and the Bloom filter use.
pub(crate) fn short(digest: u128) -> u128 {
    digest & ((1u128 << SHORT_BITS) - 1)
}

/// Bits of the expiry in a slot.
const EXPIRY_BITS: u32 = 128 - SHORT_BITS;
/// The largest expiry a slot holds as such (ms, in the year 2527); from there on, "never".
const LAST_EXPIRY: u64 = (1 << EXPIRY_BITS) - 2;

/// An expiry as the index holds it: itself, or `u64::MAX` ("never") past [`LAST_EXPIRY`].
/// Whoever compares an expiry from disk with the index's compares this.
pub(crate) fn held_expiry(expires_ms: u64) -> u64 {
    if expires_ms > LAST_EXPIRY {
        u64::MAX
    } else {
        expires_ms
    }
}

/// The shard of `hash` among `shards`. hashbrown takes the bucket from the low bits and the
/// control byte from the top 7: the shard comes from bits 25..57, so within a shard both keep
/// all their entropy (a shard picked by the top bits left the control bytes one bit to tell
/// entries apart, and each lookup compared half a group's entries). Multiply-shift maps those
/// 32 bits onto any number of shards.
fn shard_of(hash: u64, shards: usize) -> usize {
    ((u64::from((hash >> 25) as u32) * shards as u64) >> 32) as usize
}

/// One relay entry: the short digest in the low 84 bits, the expiry in the top 44.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Slot(u128);

impl Slot {
    /// Bytes of a slot in the snapshot.
    pub(crate) const BYTES: usize = 16;

    pub(crate) fn new(short: u128, expires_ms: u64) -> Slot {
        let expiry = u128::from(expires_ms.min(LAST_EXPIRY + 1));
        Slot(short | expiry << SHORT_BITS)
    }

    pub(crate) fn short(&self) -> u128 {
        short(self.0)
    }

    pub(crate) fn expires_ms(&self) -> u64 {
        held_expiry((self.0 >> SHORT_BITS) as u64)
    }

    fn hash(&self) -> u64 {
        hash_short(self.short())
    }

    /// Little-endian bytes, for the snapshot.
    pub(crate) fn to_bytes(self) -> [u8; Slot::BYTES] {
        self.0.to_le_bytes()
    }

    pub(crate) fn from_bytes(b: &[u8; Slot::BYTES]) -> Slot {
        Slot(u128::from_le_bytes(*b))
    }
}

fn hash_short(short: u128) -> u64 {
    // The digest is already uniformly random: its low 64 bits are the hash.
    short as u64
}

/// Shards of hash tables of `T`.
pub(crate) struct Sharded<T> {
    shards: Box<[RwLock<HashTable<T>>]>,
}

impl<T> Sharded<T> {
    fn with_capacity(shards: usize, per_shard: usize) -> Sharded<T> {
        Sharded {
            shards: (0..shards)
                .map(|_| RwLock::new(HashTable::with_capacity(per_shard)))
                .collect(),
        }
    }

    fn shard(&self, hash: u64) -> usize {
        shard_of(hash, self.shards.len())
    }

    fn read(&self, hash: u64) -> RwLockReadGuard<'_, HashTable<T>> {
        self.shards[self.shard(hash)].read().expect("index lock")
    }

    fn write(&self, hash: u64) -> RwLockWriteGuard<'_, HashTable<T>> {
        self.shards[self.shard(hash)].write().expect("index lock")
    }

    /// Number of shards.
    pub(crate) fn shards(&self) -> usize {
        self.shards.len()
    }

    /// Entries in all shards.
    pub(crate) fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.read().expect("index lock").len())
            .sum()
    }

    /// Bytes the tables hold (buckets and control bytes, not what entries point to).
    pub(crate) fn table_bytes(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.read().expect("index lock").allocation_size())
            .sum()
    }

    /// Calls `f` with one shard's table, under its read lock.
    pub(crate) fn with_shard<R>(&self, shard: usize, f: impl FnOnce(&HashTable<T>) -> R) -> R {
        f(&self.shards[shard].read().expect("index lock"))
    }

    /// Keeps the entries for which `keep` says so, shard by shard; returns how many went.
    pub(crate) fn retain(&self, mut keep: impl FnMut(&T) -> bool) -> usize {
        let mut removed = 0;
        for s in self.shards.iter() {
            let mut t = s.write().expect("index lock");
            let before = t.len();
            t.retain(|e| keep(e));
            removed += before - t.len();
        }
        removed
    }
}

/// Relay ids: digest → expiry.
pub(crate) type Ids = Sharded<Slot>;

impl Sharded<Slot> {
    /// An index with room for `expected` ids before any shard grows, in as little memory as
    /// hashbrown allows: its tables have a power-of-two number of buckets (16 bytes and a
    /// control byte each) and take at most 7/8 of them before doubling, so a table sized for
    /// `n` entries would sit anywhere between 7/16 and 7/8 full (28 bytes an entry at 10 M).
    /// Instead the bucket count is chosen first and the number of shards follows, so that at
    /// `expected` every table is just under its limit (about 20 bytes an entry), with a margin
    /// of four standard deviations for the uneven spread of ids over shards. Past `expected`,
    /// shards double one at a time.
    pub(crate) fn ids(expected: usize) -> Ids {
        let (shards, per_shard) = Ids::layout(expected);
        Sharded::with_capacity(shards, per_shard)
    }

    /// (shards, entries per shard) for `expected` ids: the largest power-of-two table that
    /// still leaves at least [`SHARDS`] shards.
    fn layout(expected: usize) -> (usize, usize) {
        // hashbrown's limit for a table of `buckets` (≥ 8): 7/8 of them.
        let limit = |buckets: usize| buckets / 8 * 7;
        // What a shard is planned to hold: the limit, less four standard deviations.
        let planned = |buckets: usize| {
            let cap = limit(buckets) as f64;
            ((cap - 4.0 * cap.sqrt()).floor() as usize).max(1)
        };
        let mut buckets = 16usize;
        while expected.div_ceil(planned(buckets * 2)) >= SHARDS {
            buckets *= 2;
        }
        let shards = expected.div_ceil(planned(buckets)).max(SHARDS);
        (shards, limit(buckets))
    }

    /// Expiry of a digest, live or not.
    pub(crate) fn get(&self, short: u128) -> Option<u64> {
        let hash = hash_short(short);
        self.read(hash)
            .find(hash, |s| s.short() == short)
            .map(Slot::expires_ms)
    }

    /// Sets a digest's expiry; returns whether it was absent.
    pub(crate) fn insert(&self, short: u128, expires_ms: u64) -> bool {
        self.put(Slot::new(short, expires_ms))
    }

    /// Inserts or replaces a slot; returns whether its digest was absent.
    pub(crate) fn put(&self, slot: Slot) -> bool {
        put_in(&mut self.write(slot.hash()), slot)
    }

    /// Inserts or replaces a batch of slots (a commit's), taking each shard's lock once: grouped
    /// by shard, the inserts into one table run back to back with no lock operation between
    /// them (each is a fence), so their cache misses overlap. The grouping is a counting sort
    /// (two passes; a comparison sort of a 1024-id batch cost a third of the commit's own
    /// instructions), and stable: of two slots of one digest, the later still lands last.
    pub(crate) fn put_all(&self, slots: impl Iterator<Item = Slot>) {
        let slots: Vec<(usize, Slot)> = slots.map(|s| (self.shard(s.hash()), s)).collect();
        // starts[i]..starts[i + 1]: where shard i's slots go.
        let mut starts = vec![0usize; self.shards.len() + 1];
        for &(shard, _) in &slots {
            starts[shard + 1] += 1;
        }
        for i in 1..starts.len() {
            starts[i] += starts[i - 1];
        }
        let mut grouped = vec![Slot(0); slots.len()];
        let mut next = starts.clone();
        for &(shard, slot) in &slots {
            grouped[next[shard]] = slot;
            next[shard] += 1;
        }
        for (shard, run) in starts.windows(2).enumerate() {
            if run[0] == run[1] {
                continue;
            }
            let mut t = self.shards[shard].write().expect("index lock");
            for &slot in &grouped[run[0]..run[1]] {
                put_in(&mut t, slot);
            }
        }
    }

    /// Removes a digest if `when` holds for its expiry; returns whether it did.
    pub(crate) fn remove_if(&self, short: u128, when: impl FnOnce(u64) -> bool) -> bool {
        let hash = hash_short(short);
        let mut t = self.write(hash);
        match t.find_entry(hash, |s| s.short() == short) {
            Ok(e) if when(e.get().expires_ms()) => {
                e.remove();
                true
            }
            _ => false,
        }
    }

    /// Loads the slots of one shard as the snapshot wrote them (in the order the shard held
    /// them, so the inserts walk the new table nearly in order).
    /// The caller guarantees that the slots are distinct and belong to `shard`; others are
    /// put where they belong.
    pub(crate) fn load_shard(&self, shard: usize, slots: impl ExactSizeIterator<Item = Slot>) {
        let mut t = self.shards[shard].write().expect("index lock");
        t.reserve(slots.len(), Slot::hash);
        for s in slots {
            let hash = s.hash();
            if self.shard(hash) == shard {
                t.insert_unique(hash, s, Slot::hash);
            } else {
                drop(t);
                self.put(s);
                t = self.shards[shard].write().expect("index lock");
            }
        }
    }
}

/// Inserts or replaces a slot in one table; returns whether its digest was absent.
fn put_in(t: &mut HashTable<Slot>, slot: Slot) -> bool {
    let hash = slot.hash();
    match t.find_mut(hash, |s| s.short() == slot.short()) {
        Some(s) => {
            *s = slot;
            false
        }
        None => {
            t.insert_unique(hash, slot, Slot::hash);
            true
        }
    }
}

/// Redis keys: key → value and times. Hashes come from the keyed digest, so crafted keys
/// cannot pile into one bucket chain.
pub(crate) struct Keys {
    tables: Sharded<KvSlot>,
    keyed: Keyed,
}

impl Keys {
    pub(crate) fn new(keyed: Keyed) -> Keys {
        Keys {
            tables: Sharded::with_capacity(SHARDS, 0),
            keyed,
        }
    }

    fn hash(&self, key: &[u8]) -> u64 {
        xxhash_rust::xxh3::xxh3_64_with_secret(key, &self.keyed.secret)
    }

    pub(crate) fn tables(&self) -> &Sharded<KvSlot> {
        &self.tables
    }

    /// What `f` makes of `key`'s entry (live or not), without copying it.
    pub(crate) fn peek<R>(&self, key: &[u8], f: impl FnOnce(&KvSlot) -> R) -> Option<R> {
        let hash = self.hash(key);
        self.tables.read(hash).find(hash, |s| s.key() == key).map(f)
    }

    /// The version of `key`'s entry, if any (the compactor's "still the newest?").
    pub(crate) fn version(&self, key: &[u8]) -> Option<u64> {
        let hash = self.hash(key);
        self.tables
            .read(hash)
            .find(hash, |s| s.key() == key)
            .map(KvSlot::version)
    }

    /// Inserts or replaces; returns the previous entry.
    pub(crate) fn put(&self, slot: KvSlot) -> Option<KvSlot> {
        let hash = self.hash(slot.key());
        let mut t = self.tables.write(hash);
        match t.find_mut(hash, |s| s.key() == slot.key()) {
            Some(s) => Some(std::mem::replace(s, slot)),
            None => {
                let secret = &self.keyed.secret;
                t.insert_unique(hash, slot, |s| {
                    xxhash_rust::xxh3::xxh3_64_with_secret(s.key(), secret)
                });
                None
            }
        }
    }

    /// Puts the slot `make` builds for `key` unless the index holds a version of `key` at
    /// least as new as `version` (the rebuild's "newest wins", with one look-up).
    pub(crate) fn put_newer(&self, key: &[u8], version: u64, make: impl FnOnce() -> KvSlot) {
        let hash = self.hash(key);
        let mut t = self.tables.write(hash);
        match t.find_mut(hash, |s| s.key() == key) {
            Some(s) if s.version() < version => *s = make(),
            Some(_) => {}
            None => {
                let secret = &self.keyed.secret;
                t.insert_unique(hash, make(), |s| {
                    xxhash_rust::xxh3::xxh3_64_with_secret(s.key(), secret)
                });
            }
        }
    }

    /// Makes room for `more` keys beyond those held, spread over the shards as keys are.
    pub(crate) fn reserve(&self, more: usize) {
        let per_shard = more.div_ceil(self.tables.shards());
        let secret = &self.keyed.secret;
        for shard in self.tables.shards.iter() {
            shard.write().expect("index lock").reserve(per_shard, |s| {
                xxhash_rust::xxh3::xxh3_64_with_secret(s.key(), secret)
            });
        }
    }

    /// Removes `key` if `when` holds for its entry; returns the entry removed.
    pub(crate) fn remove_if(
        &self,
        key: &[u8],
        when: impl FnOnce(&KvSlot) -> bool,
    ) -> Option<KvSlot> {
        let hash = self.hash(key);
        let mut t = self.tables.write(hash);
        match t.find_entry(hash, |s| s.key() == key) {
            Ok(e) if when(e.get()) => Some(e.remove().0),
            _ => None,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.tables.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_sixteen_bytes_and_round_trip() {
        assert_eq!(std::mem::size_of::<Slot>(), 16);
        let s = Slot::new(short(u128::MAX - 5), 1_764_000_000_123);
        assert_eq!(s.short(), short(u128::MAX - 5));
        assert_eq!(s.expires_ms(), 1_764_000_000_123);
        assert_eq!(Slot::from_bytes(&s.to_bytes()), s);
        // Expiries past what 44 bits hold are "never", and compare as such.
        for far in [LAST_EXPIRY + 1, u64::MAX] {
            assert_eq!(Slot::new(short(7), far).expires_ms(), u64::MAX);
            assert_eq!(held_expiry(far), u64::MAX);
        }
        assert_eq!(Slot::new(short(7), LAST_EXPIRY).expires_ms(), LAST_EXPIRY);
        assert_eq!(Slot::new(short(7), 0).expires_ms(), 0);
    }

    #[test]
    fn ids_insert_replace_remove() {
        let ids = Ids::ids(100);
        let keyed = Keyed::new(&[7u8; SECRET_LEN]);
        let a = short(keyed.digest(b"a"));
        assert!(ids.insert(a, 10));
        assert!(!ids.insert(a, 20));
        assert_eq!(ids.get(a), Some(20));
        assert!(!ids.remove_if(a, |exp| exp <= 15));
        assert!(ids.remove_if(a, |exp| exp <= 20));
        assert_eq!(ids.get(a), None);
        for i in 0u32..10_000 {
            ids.insert(short(keyed.digest(&i.to_le_bytes())), 1);
        }
        assert_eq!(ids.len(), 10_000);
        // A batch lands as single puts would, the newest of a digest winning.
        let batch = (0u32..3_000).map(|i| Slot::new(short(keyed.digest(&i.to_le_bytes())), 2));
        ids.put_all(batch.chain(std::iter::once(Slot::new(a, 5))));
        assert_eq!(ids.len(), 10_001);
        assert_eq!(ids.get(short(keyed.digest(&7u32.to_le_bytes()))), Some(2));
        assert_eq!(ids.get(a), Some(5));
    }

    #[test]
    fn ids_are_sized_to_just_under_the_tables_limit() {
        for expected in [1_000, 1_000_000, 10_000_000, 100_000_000] {
            let (shards, per_shard) = Ids::layout(expected);
            assert!(shards >= SHARDS, "{expected}: {shards}");
            assert!(
                expected < 100_000 || shards < 2 * SHARDS + 2,
                "{expected}: {shards}"
            );
            let room = shards * per_shard;
            assert!(room >= expected, "{expected}: {room}");
            // Buckets are per_shard * 8/7 of 17 bytes: about 20 bytes an id at `expected`.
            let bytes = (room * 8 / 7 * 17) as f64 / expected as f64;
            assert!(expected < 100_000 || bytes < 20.7, "{expected}: {bytes}");
        }
        // Every shard gets its share of ids.
        let ids = Ids::ids(100_000);
        let keyed = Keyed::new(&[9u8; SECRET_LEN]);
        for i in 0u32..100_000 {
            ids.insert(short(keyed.digest(&i.to_le_bytes())), 1);
        }
        let per: Vec<usize> = (0..ids.shards())
            .map(|s| ids.with_shard(s, |t| t.len()))
            .collect();
        let mean = 100_000 / ids.shards();
        assert!(per.iter().all(|&n| n > mean / 2 && n < mean * 2), "{per:?}");
    }

    #[test]
    fn digests_depend_on_the_secret() {
        // Random secrets, as stores make them (a uniform one is degenerate for xxh3's short
        // inputs, which fold parts of the secret together).
        let random = || {
            let mut s = vec![0u8; SECRET_LEN];
            rand::fill(&mut s[..]);
            s
        };
        let (one, two) = (Keyed::new(&random()), Keyed::new(&random()));
        assert_ne!(one.digest(b"id"), two.digest(b"id"));
        assert_eq!(one.digest(b"id"), one.digest(b"id"));
    }

    #[test]
    fn keys_hold_values_and_times() {
        let keys = Keys::new(Keyed::new(&[3u8; SECRET_LEN]));
        assert_eq!(keys.put(KvSlot::new(b"k", b"v1", 1, 9)), None);
        let old = keys.put(KvSlot::new(b"k", b"v2", 2, 9)).unwrap();
        assert_eq!(old.value(), b"v1");
        let now = keys.peek(b"k", KvSlot::clone).unwrap();
        assert_eq!(
            (now.key(), now.value(), now.set_ms()),
            (&b"k"[..], &b"v2"[..], 2)
        );
        assert_eq!(keys.version(b"k"), Some(0));
        assert!(keys.remove_if(b"k", |s| s.expires_ms() <= 8).is_none());
        assert!(keys.remove_if(b"k", |_| true).is_some());
        assert_eq!(keys.len(), 0);
    }
}
