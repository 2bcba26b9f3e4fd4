//! The key-value namespace behind the Redis endpoint: keys with values and an expiry, apart from
//! the relay's ids, on the same sled database, flushes, Bloom scheme and compactor.
//!
//! Every write is durable when it returns: writers apply their change under the store's commit
//! lock (which also makes `NX`/`XX` an atomic check-and-set) and then share a group flush. A
//! caller with many writes in a row (a pipeline) uses the `_deferred` forms and waits once, with
//! [`Kv::wait_durable`] on the last [`Ticket`], so one flush covers them all. All calls block on
//! sled: from async code, use `spawn_blocking` or a thread of your own.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::filter::digest;
use super::record;
use super::{Error, Seen, Shared};

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
    /// The live keys among the records looked at, in key order.
    pub keys: Vec<Vec<u8>>,
    /// The key to resume after; `None` once the end is reached.
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

impl Kv {
    pub(crate) fn new(shared: Arc<Shared>) -> Kv {
        Kv { shared }
    }

    /// The live entry of `key`, if any. The Bloom prefilter answers most misses.
    ///
    /// # Errors
    ///
    /// A refused key (empty, over the id limit) or a sled or record error.
    pub fn get(&self, key: &[u8], now_ms: u64) -> Result<Option<Entry>, Error> {
        let shared = &self.shared;
        shared.validate(key)?;
        match shared.lookup(&shared.kv, key, digest(key), now_ms)? {
            Some((_, bytes)) => entry(key, &bytes).map(Some),
            None => Ok(None),
        }
    }

    /// Writes `value` under `key` if `cond` allows; durable when it returns.
    ///
    /// # Errors
    ///
    /// A refused key, a sled or record error, or [`Error::Closed`].
    pub fn set(
        &self,
        key: &[u8],
        value: &[u8],
        cond: Condition,
        expiry: Expiry,
        now_ms: u64,
    ) -> Result<SetOutcome, Error> {
        let (outcome, ticket) = self.set_deferred(key, value, cond, expiry, now_ms)?;
        self.wait_durable(ticket)?;
        Ok(outcome)
    }

    /// As [`Kv::set`], but returns once the write is applied and visible, with the ticket to
    /// wait on before telling anyone it is stored.
    ///
    /// # Errors
    ///
    /// As [`Kv::set`].
    pub fn set_deferred(
        &self,
        key: &[u8],
        value: &[u8],
        cond: Condition,
        expiry: Expiry,
        now_ms: u64,
    ) -> Result<(SetOutcome, Ticket), Error> {
        let (outcome, ticket) = self.batch(|tx| tx.set(key, value, cond, expiry, now_ms))?;
        Ok((outcome?, ticket))
    }

    /// Deletes `key`; durable when it returns. Returns whether a live key was removed.
    ///
    /// # Errors
    ///
    /// A refused key or a sled error.
    pub fn delete(&self, key: &[u8], now_ms: u64) -> Result<bool, Error> {
        let (removed, ticket) = self.delete_deferred(key, now_ms)?;
        self.wait_durable(ticket)?;
        Ok(removed)
    }

    /// As [`Kv::delete`], without waiting for durability.
    ///
    /// # Errors
    ///
    /// As [`Kv::delete`].
    pub fn delete_deferred(&self, key: &[u8], now_ms: u64) -> Result<(bool, Ticket), Error> {
        let (removed, ticket) = self.batch(|tx| tx.delete(key, now_ms))?;
        Ok((removed?, ticket))
    }

    /// Gives a live `key` a new expiry (one in the past deletes it); durable when it returns.
    /// Returns `false` when there is no live key.
    ///
    /// # Errors
    ///
    /// A refused key or a sled or record error.
    pub fn expire(&self, key: &[u8], expiry: Expiry, now_ms: u64) -> Result<bool, Error> {
        let (found, ticket) = self.expire_deferred(key, expiry, now_ms)?;
        self.wait_durable(ticket)?;
        Ok(found)
    }

    /// As [`Kv::expire`], without waiting for durability.
    ///
    /// # Errors
    ///
    /// As [`Kv::expire`].
    pub fn expire_deferred(
        &self,
        key: &[u8],
        expiry: Expiry,
        now_ms: u64,
    ) -> Result<(bool, Ticket), Error> {
        let (found, ticket) = self.batch(|tx| tx.expire(key, expiry, now_ms))?;
        Ok((found?, ticket))
    }

    /// Runs `f` under the store's write lock: its reads and writes through the [`Txn`] are
    /// atomic against every other write of the store (relay commits included). Returns what
    /// `f` returned and a ticket covering its writes: wait on it with [`Kv::wait_durable`]
    /// before telling anyone they are stored. Writes made through `tx` are visible to readers
    /// as they are made; [`Txn::rollback_to`] takes them back.
    ///
    /// # Errors
    ///
    /// [`Error::Closed`] once the store is closed (`f` is not run then).
    pub fn batch<R>(&self, f: impl FnOnce(&mut Txn<'_>) -> R) -> Result<(R, Ticket), Error> {
        let guard = self.shared.write_lock()?;
        let mut tx = Txn {
            kv: self,
            _guard: guard,
            undo: Vec::new(),
        };
        let out = f(&mut tx);
        drop(tx);
        // A batch that wrote nothing still gets a ticket: what it read may be a write of
        // another batch not yet durable.
        Ok((out, self.ticket()))
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

    fn ticket(&self) -> Ticket {
        Ticket(self.shared.flush.ticket())
    }

    /// Up to `count` records after `after` in key order, of which the live keys are returned,
    /// with the key to resume after (`None` once the end is reached).
    ///
    /// # Errors
    ///
    /// A sled or record error.
    pub fn scan(&self, after: Option<&[u8]>, count: usize, now_ms: u64) -> Result<ScanPage, Error> {
        let shared = &self.shared;
        let from = after.map_or(Bound::Unbounded, Bound::Excluded);
        let mut keys = Vec::new();
        let mut last = None;
        let mut iter = shared.kv.tree.range::<&[u8], _>((from, Bound::Unbounded));
        for item in iter.by_ref().take(count.max(1)) {
            let (k, v) = item.map_err(shared.sled_err("scan"))?;
            if record::decode(&k, &v)?.is_live(now_ms) {
                keys.push(k.to_vec());
            }
            last = Some(k.to_vec());
        }
        let more = iter.next().is_some();
        Ok(ScanPage {
            keys,
            next: if more { last } else { None },
        })
    }

    /// Keys on disk (expired ones the compactor has not reached yet included).
    pub fn len(&self) -> u64 {
        self.shared.kv.live.load(Ordering::Relaxed)
    }

    /// Whether no key is on disk.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn expiry_of(&self, expiry: Expiry, current: Option<&Entry>, now_ms: u64) -> u64 {
        let window = now_ms.saturating_add(self.shared.ttl_ms);
        match expiry {
            Expiry::In(d) => now_ms.saturating_add(d.as_millis() as u64),
            Expiry::At(ms) => ms,
            Expiry::Keep => current.map_or(window, |e| e.expires_ms),
            Expiry::Window => window,
        }
    }

    /// Writes a record and its index entry (under the commit lock). An expiry already past
    /// removes the key instead, as Redis does. Wakes the compactor if its deadline moved.
    fn write(
        &self,
        key: &[u8],
        value: &[u8],
        set_ms: u64,
        expires_ms: u64,
        now_ms: u64,
    ) -> Result<(), Error> {
        let shared = &self.shared;
        if expires_ms <= now_ms {
            return self.remove(key);
        }
        // Filter first, then sled: never a live key the filter does not know.
        let rolled = shared.kv.remember(key, expires_ms);
        let seen = Seen {
            first_seen_ms: set_ms,
            expires_ms,
        };
        let previous = shared
            .kv
            .tree
            .insert(key, record::encode_kv(seen, value))
            .map_err(shared.sled_err("set"))?;
        if previous.is_none() {
            shared.kv.live.fetch_add(1, Ordering::Relaxed);
        }
        let mut index = Vec::with_capacity(key.len() + 2);
        record::push_index_id(&mut index, key);
        let earlier = shared
            .kv
            .write_index(&shared.db, BTreeMap::from([(expires_ms, index)]))
            .map_err(shared.sled_err("set"))?;
        if earlier || rolled {
            shared.wake_compactor();
        }
        Ok(())
    }

    fn remove(&self, key: &[u8]) -> Result<(), Error> {
        let shared = &self.shared;
        if shared
            .kv
            .tree
            .remove(key)
            .map_err(shared.sled_err("delete"))?
            .is_some()
        {
            shared.kv.live.fetch_sub(1, Ordering::Relaxed);
        }
        Ok(())
    }
}

/// Reads and writes of one [`Kv::batch`], under the store's write lock.
pub struct Txn<'a> {
    kv: &'a Kv,
    _guard: std::sync::MutexGuard<'a, ()>,
    /// For each write, the key and its live entry before it: what [`Txn::rollback_to`] restores.
    undo: Vec<(Vec<u8>, Option<Entry>)>,
}

/// A point in a [`Txn`] to roll back to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Savepoint(usize);

impl std::fmt::Debug for Txn<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Txn")
            .field("writes", &self.undo.len())
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
        self.kv.get(key, now_ms)
    }

    /// As [`Kv::set`] (durable once the batch's ticket is).
    ///
    /// # Errors
    ///
    /// As [`Kv::set`].
    pub fn set(
        &mut self,
        key: &[u8],
        value: &[u8],
        cond: Condition,
        expiry: Expiry,
        now_ms: u64,
    ) -> Result<SetOutcome, Error> {
        self.kv.shared.validate(key)?;
        let previous = self.get(key, now_ms)?;
        let allowed = match cond {
            Condition::Always => true,
            Condition::IfAbsent => previous.is_none(),
            Condition::IfPresent => previous.is_some(),
        };
        if allowed {
            let expires_ms = self.kv.expiry_of(expiry, previous.as_ref(), now_ms);
            self.undo.push((key.to_vec(), previous.clone()));
            self.kv.write(key, value, now_ms, expires_ms, now_ms)?;
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
        self.kv.shared.validate(key)?;
        let previous = self.get(key, now_ms)?;
        let live = previous.is_some();
        if live {
            self.undo.push((key.to_vec(), previous));
        }
        self.kv.remove(key)?;
        Ok(live)
    }

    /// As [`Kv::expire`].
    ///
    /// # Errors
    ///
    /// As [`Kv::expire`].
    pub fn expire(&mut self, key: &[u8], expiry: Expiry, now_ms: u64) -> Result<bool, Error> {
        self.kv.shared.validate(key)?;
        let Some(current) = self.get(key, now_ms)? else {
            return Ok(false);
        };
        let expires_ms = self.kv.expiry_of(expiry, Some(&current), now_ms);
        self.undo.push((key.to_vec(), Some(current.clone())));
        // The set time stays: only the expiry moves (a past one removes the key).
        self.kv
            .write(key, &current.value, current.set_ms, expires_ms, now_ms)?;
        Ok(true)
    }

    /// The point to come back to with [`Txn::rollback_to`].
    pub fn savepoint(&self) -> Savepoint {
        Savepoint(self.undo.len())
    }

    /// Undoes every write made through this batch since `savepoint`, newest first: each key
    /// gets back the entry it had then (or none).
    ///
    /// # Errors
    ///
    /// A sled error while restoring.
    pub fn rollback_to(&mut self, savepoint: Savepoint) -> Result<(), Error> {
        while self.undo.len() > savepoint.0 {
            let (key, before) = self.undo.pop().expect("len checked");
            match before {
                // The entry was live when the write replaced it: restore it as it was.
                Some(e) => self.kv.write(&key, &e.value, e.set_ms, e.expires_ms, 0)?,
                None => self.kv.remove(&key)?,
            }
        }
        Ok(())
    }
}

fn entry(key: &[u8], bytes: &[u8]) -> Result<Entry, Error> {
    let (seen, value) = record::decode_kv(key, bytes)?;
    Ok(Entry {
        value: value.to_vec(),
        set_ms: seen.first_seen_ms,
        expires_ms: seen.expires_ms,
    })
}
