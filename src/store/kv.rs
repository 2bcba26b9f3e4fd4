//! The key-value namespace behind the Redis endpoint: keys with values and an expiry, apart from
//! the relay's ids, on the same sled database, flushes, Bloom scheme and compactor.
//!
//! Writes go through a [`Txn`] of [`Kv::batch`]: under the store's commit lock (which makes
//! `NX`/`XX` an atomic check-and-set and a script atomic), each write changes the index at once
//! and adds an entry to the batch's segment; the batch ends with one sled append and a ticket,
//! and [`Kv::wait_durable`] on the ticket shares a group flush with every other writer. The
//! one-call forms (`set`, `delete`, `expire`) are a batch of one. All calls block on sled: from
//! async code, use `spawn_blocking` or a thread of your own.

use std::sync::{Arc, MutexGuard};
use std::time::Duration;

use super::index::{short, KvSlot, SHARDS};
use super::segment;
use super::{Error, Shared};

/// A live key's value and times.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The value.
    pub value: Vec<u8>,
    /// When it was last set (ms since the Unix epoch).
    pub set_ms: u64,
    /// When it expires (ms since the Unix epoch).
    pub expires_ms: u64,
}

/// When a `set` applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Condition {
    /// Always (plain `SET`).
    Always,
    /// Only if the key is not live (`NX`).
    IfAbsent,
    /// Only if the key is live (`XX`).
    IfPresent,
}

/// The expiry a write gives a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// This long from now (`EX`, `PX`, `EXPIRE`, `PEXPIRE`).
    In(Duration),
    /// At this time, ms since the Unix epoch (`EXAT`, `PXAT`).
    At(u64),
    /// The key's current expiry (`KEEPTTL`); the window for a new key.
    Keep,
    /// None given: dedupd is a window store, so the store's TTL.
    Window,
}

/// What a `set` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetOutcome {
    /// Whether the value was written (false when `NX`/`XX` said no).
    pub written: bool,
    /// The live entry before the call, if any (for `SET ... GET`).
    pub previous: Option<Entry>,
}

/// One page of [`Kv::scan`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanPage {
    /// The live keys of the part of the index looked at (sorted within the page).
    pub keys: Vec<Vec<u8>>,
    /// Where to resume (opaque; pass it back as `after`); `None` once the end is reached.
    pub next: Option<Vec<u8>>,
}

/// Proof of a write applied but not yet known durable; [`Kv::wait_durable`] waits for it. A
/// later ticket covers every earlier one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[must_use = "a deferred write is not durable until its ticket is waited for"]
pub struct Ticket(u64);

/// Handle on the namespace; cheap to clone. Get one with [`super::Store::kv`].
#[derive(Debug, Clone)]
pub struct Kv {
    shared: Arc<Shared>,
}

/// A write of `SET`'s kind: which key, its value, when it applies and the expiry it gives.
#[derive(Debug, Clone, Copy)]
pub struct Write<'a> {
    /// The key written.
    pub key: &'a [u8],
    /// Its new value.
    pub value: &'a [u8],
    /// When the write applies (`NX`, `XX`).
    pub cond: Condition,
    /// The expiry it gives the key.
    pub expiry: Expiry,
}

impl<'a> Write<'a> {
    /// The write of `value` under `key`, if `cond` allows, with `expiry`.
    pub fn new(key: &'a [u8], value: &'a [u8], cond: Condition, expiry: Expiry) -> Self {
        Write {
            key,
            value,
            cond,
            expiry,
        }
    }
}

impl Kv {
    pub(crate) fn new(shared: Arc<Shared>) -> Kv {
        Kv { shared }
    }

    /// The live entry of `key`, if any. The Bloom prefilter answers most misses.
    ///
    /// # Errors
    ///
    /// A refused key (empty, over the id limit).
    pub fn get(&self, key: &[u8], now_ms: u64) -> Result<Option<Entry>, Error> {
        self.shared.validate(key)?;
        Ok(live_with(&self.shared, key, now_ms, entry))
    }

    /// Writes `value` under `key` if `cond` allows; durable when it returns. (To write without
    /// waiting, or several writes as one segment, use [`Kv::batch`].)
    ///
    /// # Errors
    ///
    /// A refused key, a sled error, or [`Error::Closed`].
    pub fn set(
        &self,
        key: &[u8],
        value: &[u8],
        cond: Condition,
        expiry: Expiry,
        now_ms: u64,
    ) -> Result<SetOutcome, Error> {
        self.durably(|tx| tx.set(Write::new(key, value, cond, expiry), now_ms))
    }

    /// Deletes `key`; durable when it returns. Returns whether a live key was removed.
    ///
    /// # Errors
    ///
    /// A refused key or a sled error.
    pub fn delete(&self, key: &[u8], now_ms: u64) -> Result<bool, Error> {
        self.durably(|tx| tx.delete(key, now_ms))
    }

    /// Gives a live `key` a new expiry (one in the past deletes it); durable when it returns.
    /// Returns `false` when there is no live key.
    ///
    /// # Errors
    ///
    /// A refused key or a sled error.
    pub fn expire(&self, key: &[u8], expiry: Expiry, now_ms: u64) -> Result<bool, Error> {
        self.durably(|tx| tx.expire(key, expiry, now_ms))
    }

    /// One write as a batch of its own, returned once durable.
    fn durably<R>(&self, write: impl FnOnce(&mut Txn<'_>) -> Result<R, Error>) -> Result<R, Error> {
        let (out, ticket) = self.batch(write)?;
        self.wait_durable(ticket)?;
        out
    }

    /// Runs `f` under the store's write lock: its reads and writes through the [`Txn`] are
    /// atomic against every other write of the store (relay commits included). The batch's
    /// writes go to disk as one segment. Returns what `f` returned and a ticket covering its
    /// writes: wait on it with [`Kv::wait_durable`] before telling anyone they are stored.
    /// Writes made through `tx` are visible to readers as they are made; [`Txn::rollback_to`]
    /// takes them back before they reach disk.
    ///
    /// # Errors
    ///
    /// [`Error::Closed`] once the store is closed (`f` is not run then), or a sled error while
    /// appending the segment (the batch's writes are then taken back).
    pub fn batch<R>(&self, f: impl FnOnce(&mut Txn<'_>) -> R) -> Result<(R, Ticket), Error> {
        let shared = &self.shared;
        let guard = shared.write_lock()?;
        let mut tx = Txn {
            shared,
            guard,
            undo: Vec::new(),
            body: Vec::new(),
            starts: Vec::new(),
            expiries: Vec::new(),
            base_ms: 0,
        };
        let out = f(&mut tx);
        if tx.expiries.is_empty() {
            // Nothing written; what the batch read may be another batch's write not yet
            // durable. Each such write got its ticket before that batch let go of the lock this
            // one took, so the latest ticket covers them all, and is durable already unless a
            // flush is due anyway: a read alone never costs a flush.
            drop(tx);
            return Ok((out, self.last_ticket()));
        }
        let segments = tx.segments();
        match shared.append_all(&tx.guard, &shared.kv, segments) {
            Ok(ticket) => Ok((out, Ticket(ticket))),
            Err(e) => {
                tx.rollback_to(Savepoint::default())?;
                Err(e)
            }
        }
    }

    /// Returns once every write up to `ticket` is durable (one flush covers many tickets).
    ///
    /// # Errors
    ///
    /// The flush failed: the writes may be lost on a crash, so do not acknowledge them.
    pub fn wait_durable(&self, ticket: Ticket) -> Result<(), Error> {
        let shared = &self.shared;
        shared
            .flush
            .wait(&shared.db, ticket.0)
            .map_err(shared.sled_err("flush"))
    }

    /// A ticket covering every write applied so far (by anyone). Waiting on it costs nothing
    /// when those are already durable.
    pub fn last_ticket(&self) -> Ticket {
        Ticket(self.shared.flush.issued())
    }

    /// Live keys of the next part of the index: the shards from `after` (opaque, from the
    /// previous page) until at least `count` keys are found. Every key live for the whole scan
    /// is returned once; as with Redis' `SCAN`, `count` is a hint.
    ///
    /// # Errors
    ///
    /// None today; kept for callers that handle one.
    pub fn scan(&self, after: Option<&[u8]>, count: usize, now_ms: u64) -> Result<ScanPage, Error> {
        let mut shard = after
            .and_then(|a| <[u8; 4]>::try_from(a).ok())
            .map_or(0, |b| u32::from_be_bytes(b) as usize);
        let mut keys = Vec::new();
        let tables = self.shared.keys.tables();
        while shard < SHARDS && keys.len() < count.max(1) {
            let mut page: Vec<Vec<u8>> = tables.with_shard(shard, |t| {
                t.iter()
                    .filter(|s| now_ms < s.expires_ms())
                    .map(|s| s.key().to_vec())
                    .collect()
            });
            page.sort_unstable();
            keys.extend(page);
            shard += 1;
        }
        Ok(ScanPage {
            keys,
            next: (shard < SHARDS).then(|| (shard as u32).to_be_bytes().to_vec()),
        })
    }

    /// Keys in the index (expired ones the compactor has not reached yet included).
    pub fn len(&self) -> u64 {
        self.shared.keys.len() as u64
    }

    /// Whether the index holds no key.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The live entry of `key`: the filter first, the index on a "maybe".
fn live(shared: &Shared, key: &[u8], now_ms: u64) -> Option<KvSlot> {
    live_with(shared, key, now_ms, KvSlot::clone)
}

/// What `f` makes of the live entry of `key`, without copying it.
fn live_with<R>(
    shared: &Shared,
    key: &[u8],
    now_ms: u64,
    f: impl FnOnce(&KvSlot) -> R,
) -> Option<R> {
    if !shared.may_hold(&shared.kv, short(shared.keyed.digest(key))) {
        return None;
    }
    let found = shared
        .keys
        .peek(key, |s| (now_ms < s.expires_ms()).then(|| f(s)))
        .flatten();
    if found.is_none() {
        shared.false_positive();
    }
    found
}

fn entry(slot: &KvSlot) -> Entry {
    Entry {
        value: slot.value().to_vec(),
        set_ms: slot.set_ms(),
        expires_ms: slot.expires_ms(),
    }
}

/// Bytes of entries a segment holds, about. sled keeps every value written in memory until its
/// LRU pages the value's leaf out, and that LRU is 256 shards (by page id), each of which counts
/// its pages only once 64 accesses to them have queued up. A leaf takes up to 16 values before
/// it splits and each write to it is about three accesses, so with a segment per round (100+
/// keys, several KiB) no shard had counted anything yet at 1 M keys: sled held a copy of every
/// segment written, 36 B a key, whatever its cache size. Segments of about 1 KiB turn leaves
/// over fast enough for the cache size to bound that (1 M keys loaded as the `redis_endpoint`
/// bench does, 8-16 MiB cache, one run each: 103-105 B/key resident in all against 135 with
/// 64 MiB; 512 and 2048 bytes gave 105 and 108, and 56 and 53 B/key on disk against 53).
const SEGMENT_BYTES: usize = 1024;

/// Reads and writes of one [`Kv::batch`], under the store's write lock.
pub struct Txn<'a> {
    shared: &'a Shared,
    guard: MutexGuard<'a, ()>,
    /// For each write, the key and its index entry before it: what [`Txn::rollback_to`] puts
    /// back.
    undo: Vec<(Vec<u8>, Option<KvSlot>)>,
    /// The entries of the batch's segments, encoded.
    body: Vec<u8>,
    /// Where each of them starts in `body`.
    starts: Vec<usize>,
    /// For each of them, how long it must stay on disk (files its segment).
    expiries: Vec<u64>,
    /// The segments' commit time, which their entries' times are written against: the time of
    /// the batch's first write.
    base_ms: u64,
}

/// A point in a [`Txn`] to roll back to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Savepoint {
    undo: usize,
    body: usize,
    entries: usize,
}

impl std::fmt::Debug for Txn<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Txn")
            .field("writes", &self.expiries.len())
            .finish()
    }
}

impl Txn<'_> {
    /// As [`Kv::get`], seeing this batch's own writes.
    ///
    /// # Errors
    ///
    /// As [`Kv::get`].
    pub fn get(&self, key: &[u8], now_ms: u64) -> Result<Option<Entry>, Error> {
        self.shared.validate(key)?;
        Ok(live_with(self.shared, key, now_ms, entry))
    }

    /// As [`Kv::set`] (durable once the batch's ticket is).
    ///
    /// # Errors
    ///
    /// As [`Kv::set`].
    pub fn set(&mut self, write: Write<'_>, now_ms: u64) -> Result<SetOutcome, Error> {
        let Write {
            key,
            value,
            cond,
            expiry,
        } = write;
        self.shared.validate(key)?;
        // The previous entry's value is copied only when there is one (`SET ... GET` wants it).
        let previous = live_with(self.shared, key, now_ms, entry);
        let allowed = match cond {
            Condition::Always => true,
            Condition::IfAbsent => previous.is_none(),
            Condition::IfPresent => previous.is_some(),
        };
        if allowed {
            let current = previous.as_ref().map(|e| e.expires_ms);
            let expires_ms = self.expiry_of(expiry, current, now_ms);
            self.put(key, value, now_ms, expires_ms, now_ms)?;
        }
        Ok(SetOutcome {
            written: allowed,
            previous,
        })
    }

    /// As [`Kv::delete`].
    ///
    /// # Errors
    ///
    /// As [`Kv::delete`].
    pub fn delete(&mut self, key: &[u8], now_ms: u64) -> Result<bool, Error> {
        self.shared.validate(key)?;
        let Some(removed) = self.shared.keys.remove_if(key, |_| true) else {
            return Ok(false);
        };
        if now_ms < removed.retain_ms() {
            // A tombstone as long-lived as what it shadows: replay must not revive any of it.
            let version = self.version()?;
            let base = self.base(now_ms);
            self.starts.push(self.body.len());
            segment::put_kv_delete(&mut self.body, key, removed.retain_ms(), version, base);
            self.expiries.push(removed.retain_ms());
        }
        let was_live = now_ms < removed.expires_ms();
        self.undo.push((key.to_vec(), Some(removed)));
        Ok(was_live)
    }

    /// As [`Kv::expire`].
    ///
    /// # Errors
    ///
    /// As [`Kv::expire`].
    pub fn expire(&mut self, key: &[u8], expiry: Expiry, now_ms: u64) -> Result<bool, Error> {
        self.shared.validate(key)?;
        let Some(current) = live(self.shared, key, now_ms) else {
            return Ok(false);
        };
        let expires_ms = self.expiry_of(expiry, Some(current.expires_ms()), now_ms);
        // The set time stays: only the expiry moves (a past one removes the key).
        self.put(key, current.value(), current.set_ms(), expires_ms, now_ms)?;
        Ok(true)
    }

    /// The point to come back to with [`Txn::rollback_to`].
    pub fn savepoint(&self) -> Savepoint {
        Savepoint {
            undo: self.undo.len(),
            body: self.body.len(),
            entries: self.expiries.len(),
        }
    }

    /// Undoes every write made through this batch since `savepoint`, newest first: each key
    /// gets back the entry it had then (or none), and none of those writes reaches disk.
    ///
    /// # Errors
    ///
    /// None today; kept so that callers handle a future one.
    pub fn rollback_to(&mut self, savepoint: Savepoint) -> Result<(), Error> {
        while self.undo.len() > savepoint.undo {
            let (key, before) = self.undo.pop().expect("len checked");
            match before {
                Some(slot) => {
                    self.shared.keys.put(slot);
                }
                None => {
                    self.shared.keys.remove_if(&key, |_| true);
                }
            }
        }
        self.body.truncate(savepoint.body);
        self.starts.truncate(savepoint.entries);
        self.expiries.truncate(savepoint.entries);
        Ok(())
    }

    /// The time entries are written against (see `base_ms`), fixed by the first.
    fn base(&mut self, now_ms: u64) -> u64 {
        if self.starts.is_empty() {
            self.base_ms = now_ms;
        }
        self.base_ms
    }

    /// The batch's entries as segments of about [`SEGMENT_BYTES`] each (at least one entry),
    /// in order, each with its entries' expiries.
    fn segments(&self) -> Vec<(Vec<u64>, Vec<u8>)> {
        let mut segments = Vec::with_capacity(self.body.len() / SEGMENT_BYTES + 1);
        let mut first = 0;
        while first < self.starts.len() {
            let from = self.starts[first];
            let mut end = first + 1;
            while end < self.starts.len() && self.starts[end] - from < SEGMENT_BYTES {
                end += 1;
            }
            let to = self.starts.get(end).copied().unwrap_or(self.body.len());
            let bytes = segment::kv_segment(self.base_ms, end - first, &self.body[from..to]);
            segments.push((self.expiries[first..end].to_vec(), bytes));
            first = end;
        }
        segments
    }

    /// The expiry `expiry` gives a key whose live entry expires at `current` (`None`: no live
    /// entry).
    fn expiry_of(&self, expiry: Expiry, current: Option<u64>, now_ms: u64) -> u64 {
        let window = now_ms.saturating_add(self.shared.ttl_ms);
        match expiry {
            Expiry::In(d) => now_ms.saturating_add(d.as_millis() as u64),
            Expiry::At(ms) => ms,
            Expiry::Keep => current.unwrap_or(window),
            Expiry::Window => window,
        }
    }

    /// A version for a new write: later than every write before it, across restarts.
    fn version(&self) -> Result<u64, Error> {
        self.shared
            .db
            .generate_id()
            .map_err(self.shared.sled_err("version"))
    }

    /// Puts `key` = `value`, set at `set_ms`, expiring at `expires_ms`, in the index and the
    /// batch's segment; an expiry already past deletes the key instead, as Redis does.
    fn put(
        &mut self,
        key: &[u8],
        value: &[u8],
        set_ms: u64,
        expires_ms: u64,
        now_ms: u64,
    ) -> Result<(), Error> {
        if expires_ms <= now_ms {
            self.delete(key, now_ms)?;
            return Ok(());
        }
        // It shadows whatever the key held, for as long as that had to stay.
        let shadowed = self.shared.keys.peek(key, KvSlot::retain_ms);
        let retain_ms = expires_ms.max(shadowed.unwrap_or(0));
        let version = self.version()?;
        let times = [set_ms, expires_ms, retain_ms, version];
        let slot = KvSlot::with_times(key, value, times);
        let base = self.base(now_ms);
        self.starts.push(self.body.len());
        segment::put_kv_put(&mut self.body, key, value, times, base);
        self.expiries.push(retain_ms);
        // Index first, then the filter: a reader in between finds the filter saying "no" for
        // a write nobody has been told of yet, never a live key the filter misses after.
        let before = self.shared.keys.put(slot);
        let digest = short(self.shared.keyed.digest(key));
        if self
            .shared
            .kv
            .remember(std::iter::once((digest, expires_ms)))
        {
            self.shared.wake_compactor();
        }
        self.undo.push((key.to_vec(), before));
        Ok(())
    }
}
