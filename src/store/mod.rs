//! The embedded dedup store: "was this id seen inside the window?", answered from an exact
//! index in memory behind a Bloom prefilter, with sled on disk as the durable truth and a
//! background compactor dropping what has expired.
//!
//! No AMQP in here. Time is always passed in (`now_ms`, milliseconds since the Unix epoch) so
//! tests move a clock instead of sleeping; the compactor thread reads the configured [`Clock`].
//!
//! # Protocol
//!
//! [`Store::claim`] answers [`Verdict::New`] with a [`Claim`] that holds the id exclusively until
//! it is committed ([`Store::commit`], durable on return, one flush for the whole batch) or
//! released (dropping the claim). A second claimer of an id in flight gets a [`Waiter`] that
//! resolves to the first claimer's outcome.
//!
//! # Layout on disk: the commit batch is the unit
//!
//! - tree `relay_segments`: one value per commit batch (a segment, see `segment.rs`): the
//!   batch's 128-bit digests, keyed by a random secret of this data dir, and expiries; keyed by
//!   (median expiry, sequence) so the compactor drops whole segments with a range scan.
//! - tree `kv_segments`: the same for the Redis endpoint's writes (key, value, times; deletes
//!   as tombstones), one segment per batch of commands.
//! - tree `meta`: the digest secret, the layout version, the snapshot marker, the replication
//!   offset.
//! - `index.snapshot`: the index and Bloom filters, written on a clean [`Store::close`] and
//!   trusted only with its marker; otherwise the index is rebuilt by replaying the segments.
//!
//! Updates and deletes append; on replay the newest entry wins. A segment comes due when the
//! median of its expiries passes: the entries still live (the newest of their key, unexpired)
//! are rewritten into a new segment and the old one goes, so each rewrite at least halves a
//! segment and what is on disk stays within the live entries plus those superseded inside one
//! window.

mod backup;
mod compactor;
mod filter;
mod flush;
mod index;
pub mod kv;
mod kv_slot;
mod log;
mod migrate;
mod record;
mod segment;
mod snapshot;

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::fs;
use std::hash::{BuildHasherDefault, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use smallvec::SmallVec;
use tokio::sync::watch;

pub use backup::BackupStats;
use filter::Filters;
use flush::FlushGroup;
use index::{held_expiry, short, Ids, Keyed, Keys};
pub use record::Seen;
use segment::RelayEntry;

/// Largest id limit a store accepts: index entries store id lengths as u16.
pub const MAX_ID_LIMIT: usize = u16::MAX as usize;

/// Key in the `meta` tree whose value must equal the snapshot's token for it to be trusted.
const SNAPSHOT_TOKEN_KEY: &[u8] = b"index_snapshot_token";
/// Key in the `meta` tree holding the last replication-log offset applied (u64 big-endian).
const APPLIED_OFFSET_KEY: &[u8] = b"applied_log_offset";
/// Key in the `meta` tree holding the secret the digests are keyed with.
const SECRET_KEY: &[u8] = b"digest_secret";
/// Key in the `meta` tree holding the layout version (one byte); absent before segments.
const LAYOUT_KEY: &[u8] = b"layout";
/// The layout this build writes: segments.
const LAYOUT_SEGMENTS: u8 = 2;

/// Errors of the store. Each says what failed, then why.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An empty id was offered.
    #[error("id is empty (ids must be 1..={max} bytes)")]
    EmptyId {
        /// The configured limit.
        max: usize,
    },
    /// An id longer than the configured limit was offered; it is refused, never truncated.
    #[error("id is {len} bytes, over the limit of {max} bytes")]
    IdTooLong {
        /// Length of the offered id.
        len: usize,
        /// The configured limit.
        max: usize,
    },
    /// Another process (or another `Store` in this one) holds the data dir.
    #[error("data dir {} is already in use by another dedupd store", path.display())]
    Locked {
        /// The data dir.
        path: PathBuf,
    },
    /// sled failed.
    #[error("store {context} failed in {}: {source}", path.display())]
    Sled {
        /// What the store was doing.
        context: &'static str,
        /// The data dir.
        path: PathBuf,
        /// sled's error.
        source: sled::Error,
    },
    /// A record carries a format version this build does not know.
    #[error("record of id {id:?} has unknown format version {version}")]
    UnknownFormat {
        /// The id (lossy UTF-8).
        id: String,
        /// The format byte found.
        version: u8,
    },
    /// A record does not decode.
    #[error("record of id {id:?} is corrupt: {reason}")]
    Corrupt {
        /// The id (lossy UTF-8).
        id: String,
        /// Why it did not decode.
        reason: String,
    },
    /// Writing the index snapshot, or creating the data dir, failed.
    #[error("{} failed: {source}", path.display())]
    Snapshot {
        /// The snapshot file or data dir.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Writing a backup or reading one failed.
    #[error("backup {context} failed: {source}")]
    Backup {
        /// What was being done.
        context: &'static str,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A backup is not in a format this build reads.
    #[error("not a dedupd backup this build can read: {0}")]
    BadBackup(String),
    /// A restore was asked into a data dir that already holds a store.
    #[error("data dir {} is not empty; restore only into an empty or new dir", path.display())]
    NotEmpty {
        /// The data dir.
        path: PathBuf,
    },
    /// A configuration value is out of range.
    #[error("invalid store configuration: {0}")]
    Config(String),
    /// The store was closed; no more commits are taken.
    #[error("store is closed")]
    Closed,
}

/// Source of the current time for the compactor. Operations take `now_ms` explicitly.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> u64;

    /// Moves the clock forward by `by` and returns the new time, if this clock may be moved:
    /// a test's clock. The wall clock is not ours to move (`None`).
    fn advance(&self, by: Duration) -> Option<u64> {
        let _ = by;
        None
    }
}

/// The wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        system_now_ms()
    }
}

/// Milliseconds since the Unix epoch by the wall clock.
pub fn system_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A clock that only moves when told to: for tests.
#[derive(Debug, Default)]
pub struct ManualClock(AtomicU64);

impl ManualClock {
    /// A clock reading `now_ms`.
    pub fn new(now_ms: u64) -> ManualClock {
        ManualClock(AtomicU64::new(now_ms))
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) -> u64 {
        self.0.fetch_add(by.as_millis() as u64, Ordering::SeqCst) + by.as_millis() as u64
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }

    fn advance(&self, by: Duration) -> Option<u64> {
        Some(ManualClock::advance(self, by))
    }
}

/// The wall clock, plus however far it was moved forward: for tests of a process that must run
/// on real time (broker timeouts, confirms) yet let a dedup window pass without waiting it out.
#[derive(Debug, Default)]
pub struct SteppedClock {
    /// Milliseconds added to the wall clock so far.
    ahead_ms: AtomicU64,
}

impl Clock for SteppedClock {
    fn now_ms(&self) -> u64 {
        system_now_ms().saturating_add(self.ahead_ms.load(Ordering::SeqCst))
    }

    fn advance(&self, by: Duration) -> Option<u64> {
        self.ahead_ms
            .fetch_add(by.as_millis() as u64, Ordering::SeqCst);
        Some(self.now_ms())
    }
}

/// How to open a store.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Data directory (created if missing). Default `./data`.
    pub dir: PathBuf,
    /// Dedup window: how long a committed id stays a duplicate. Default 24 h.
    pub ttl: Duration,
    /// Ids expected per window; sizes the Bloom filter. Default 1 000 000.
    pub expected_ids: u64,
    /// Target Bloom false-positive rate, in (0, 1). Default 0.01.
    pub fp_rate: f64,
    /// sled page cache in bytes (sled's own default is 1 GiB). Default 8 MiB: segments are
    /// written once and read back only by the compactor and a rebuild, so what sled keeps of
    /// them is memory that answers nothing (at 1 M Redis keys each MiB is a byte a key: 8 MiB
    /// gave 105-106 B/key resident, 16 MiB 113-115, 64 MiB 135).
    pub cache_bytes: u64,
    /// Longest id accepted, in bytes, at most [`MAX_ID_LIMIT`]. Default 256.
    pub max_id_bytes: usize,
    /// Clock read by the background compactor. Default [`SystemClock`].
    pub clock: Arc<dyn Clock>,
    /// What a commit that returned survives. Default [`Durability::Process`].
    pub durability: Durability,
}

/// What a commit (or a Redis write's reply) survives once it has returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// sled's own flush (on Linux a `sync_file_range` of its log): the write has reached the
    /// disk, so a killed or crashed process loses nothing; a kernel crash or power cut can lose
    /// the last writes (the file's size and the disk's write cache are not flushed, and sled
    /// writes a large log entry to a file of its own without syncing it).
    #[default]
    Process,
    /// Also `syncfs` of the data dir's file system after every group flush, as Redis'
    /// `appendfsync always` `fdatasync`s: survives a kernel crash or a power cut too. Each
    /// flush then also waits for the file system's other dirty data and the disk's cache. Once
    /// a `syncfs` fails, every later commit fails (the kernel reports a lost write once only).
    /// Linux 5.8 or later: before it, `syncfs` did not report write errors at all.
    Power,
}

impl StoreConfig {
    /// Defaults for everything but the directory.
    pub fn new(dir: impl Into<PathBuf>) -> StoreConfig {
        StoreConfig {
            dir: dir.into(),
            ttl: Duration::from_secs(24 * 3600),
            expected_ids: 1_000_000,
            fp_rate: 0.01,
            cache_bytes: 8 << 20,
            max_id_bytes: 256,
            clock: Arc::new(SystemClock),
            durability: Durability::Process,
        }
    }

    fn validate(&self) -> Result<(), Error> {
        if !(self.fp_rate > 0.0 && self.fp_rate < 1.0) {
            return Err(Error::Config(format!(
                "fp_rate {} is not in (0, 1)",
                self.fp_rate
            )));
        }
        if self.max_id_bytes == 0 || self.max_id_bytes > MAX_ID_LIMIT {
            return Err(Error::Config(format!(
                "max_id_bytes {} is not in 1..={MAX_ID_LIMIT}",
                self.max_id_bytes
            )));
        }
        if self.ttl.is_zero() {
            return Err(Error::Config("ttl is zero".into()));
        }
        if self.expected_ids == 0 {
            return Err(Error::Config("expected_ids is zero".into()));
        }
        Ok(())
    }

    /// Capacity of a Bloom generation: room for two windows of ids, so the filter stays under its
    /// target rate until the rebuild that follows each window drops the expired half.
    fn generation_capacity(&self) -> u64 {
        self.expected_ids.saturating_mul(2)
    }
}

/// Answer of [`Store::claim`].
#[derive(Debug)]
pub enum Verdict {
    /// First seen (or seen only outside the window): the caller holds the id until it commits or
    /// drops the claim.
    New(Claim),
    /// Seen and still inside the window.
    Duplicate(Live),
    /// Another caller holds a claim on this id right now; wait for its outcome.
    InFlight(Waiter),
}

/// A live id's window, as a claim finds it (what [`Store::check`] adds, the first-seen time,
/// takes a look at disk).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Live {
    /// When the id leaves the window (ms since the Unix epoch).
    pub expires_ms: u64,
}

/// How an in-flight claim ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// The id is recorded: a second copy is a duplicate.
    Committed,
    /// The claim was released: the id is new again, claim it anew.
    Released,
}

/// The log segment of a commit batch of `claims` made at `now_ms`: what
/// [`Store::commit_logged`] returns and [`Store::commit_replicated`] hands on.
fn log_segment(claims: &[Claim], now_ms: u64) -> Vec<u8> {
    log::encode(
        now_ms,
        claims.iter().map(|c| log::LogEntry {
            id: &c.id,
            ttl_ms: c.ttl_ms,
        }),
    )
}

/// Where a segment whose entries expire at `expiries` goes in its tree: the expiry it is filed
/// under and its key (that expiry, then a sequence number fresh from `db`).
fn file_segment(db: &sled::Db, expiries: Vec<u64>) -> sled::Result<(u64, [u8; 16])> {
    let filed = segment::filing_expiry(expiries);
    Ok((filed, segment::key(filed, db.generate_id()?)))
}

/// Bytes of an id a [`Claim`] holds without a heap block: a UUID's 36 and a SHA-256's 32 fit.
const INLINE_ID: usize = 40;

/// Exclusive hold on a new id. Commit it with [`Store::commit`]; dropping it releases the id.
#[derive(Debug)]
pub struct Claim {
    shared: Arc<Shared>,
    /// The id, in the claim itself when it is short (UUIDs, raw SHA-256): claims are made and
    /// freed by the thousand per commit, and a heap block each cost the system allocator a
    /// tenth of a claim and commit's instructions (callgrind, the store bench's workload).
    id: SmallVec<[u8; INLINE_ID]>,
    digest: u128,
    ttl_ms: u64,
    settled: bool,
    /// When the claim was made: commit latency is measured from here.
    claimed_at: Instant,
}

impl Claim {
    /// The claimed id.
    pub fn id(&self) -> &[u8] {
        &self.id
    }

    /// When the claim was made (monotonic clock), for latency metrics.
    pub fn claimed_at(&self) -> Instant {
        self.claimed_at
    }

    /// Releases the claim: the id becomes new again and waiters are told so. Same as dropping.
    pub fn release(self) {}
}

impl Drop for Claim {
    fn drop(&mut self) {
        if !self.settled {
            self.shared.settle(short(self.digest), Settled::Released);
        }
    }
}

/// Resolves to the outcome of the claim that was in flight.
#[derive(Debug)]
pub struct Waiter {
    rx: watch::Receiver<Option<Settled>>,
}

impl Waiter {
    /// Waits until the claim in flight is committed or released.
    pub async fn settled(mut self) -> Settled {
        match self.rx.wait_for(Option::is_some).await {
            Ok(v) => v.expect("waited for Some"),
            // The claim vanished without a word (cannot happen: Claim::drop settles). Treat it
            // as released so the caller claims again instead of trusting a record that may not be.
            Err(_) => Settled::Released,
        }
    }
}

/// Figures of a store, for metrics and `dedupd stats`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Stats {
    /// Relay ids in the index (live, plus expired ones the compactor has not reached yet).
    pub live_ids: u64,
    /// Keys of the Redis endpoint's namespace in the index.
    pub redis_keys: u64,
    /// Claims held right now.
    pub in_flight: usize,
    /// Bloom generations a lookup queries.
    pub bloom_generations: usize,
    /// Bytes of Bloom bit arrays in memory.
    pub bloom_bytes: u64,
    /// Bytes of the in-memory index's tables (both namespaces).
    pub index_bytes: u64,
    /// Segments on disk (both namespaces).
    pub segments: u64,
    /// Bytes sled occupies on disk.
    pub disk_bytes: u64,
    /// Lookups of ids that were not live (the denominator of the FP rate).
    pub absent_lookups: u64,
    /// Bloom "maybe"s that the index answered absent or expired.
    pub false_positives: u64,
    /// `false_positives / absent_lookups`, measured (0 before any absent lookup).
    pub false_positive_rate: f64,
    /// Expired ids and keys dropped by the compactor since open.
    pub swept_ids: u64,
    /// Rebuilds of the Bloom filter from the index since open.
    pub bloom_rebuilds: u64,
    /// Filing expiry of the oldest relay segment still on disk (ms), if any.
    pub oldest_expiry_ms: Option<u64>,
    /// How the index and filter were obtained at open.
    pub bloom_loaded_from: BloomOrigin,
}

/// How the index and Bloom filter came to be at open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BloomOrigin {
    /// Loaded from a snapshot whose marker matched.
    Snapshot,
    /// Rebuilt from the segments (no snapshot, marker mismatch, or unreadable snapshot).
    Rebuilt,
}

/// Hashes an index key (already random bits) by taking its low 64 bits.
#[derive(Default)]
struct ShortHasher(u64);

impl Hasher for ShortHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }

    fn write_u128(&mut self, v: u128) {
        self.0 = v as u64;
    }
}

/// Claims held right now, by index key, each with the channel its waiters listen on. The
/// channel is made by the first waiter: most claims never have one.
type InFlightMap =
    HashMap<u128, Option<watch::Sender<Option<Settled>>>, BuildHasherDefault<ShortHasher>>;

/// One namespace's place on disk and its prefilter.
pub(crate) struct Namespace {
    /// Its segments.
    pub(crate) segments: sled::Tree,
    /// The prefilter over its index.
    pub(crate) filters: RwLock<Filters>,
    /// Earliest filing expiry on disk, as a hint for when the compactor should wake.
    pub(crate) next_due_ms: AtomicU64,
}

impl Namespace {
    /// Moves the compactor's hint earlier; returns whether it moved.
    fn due_at(&self, expires_ms: u64) -> bool {
        expires_ms < self.next_due_ms.fetch_min(expires_ms, Ordering::SeqCst)
    }

    /// Inserts index keys into the filter; returns whether a generation rolled over.
    fn remember(&self, keys: impl Iterator<Item = (u128, u64)>) -> bool {
        let mut filters = self.filters.write().expect("filter lock");
        keys.fold(false, |rolled, (key, expires_ms)| {
            filters.insert(key, expires_ms) | rolled
        })
    }
}

/// State shared by store handles, claims, the key-value namespace and the compactor.
pub(crate) struct Shared {
    dir: PathBuf,
    db: sled::Db,
    meta: sled::Tree,
    /// Digests keyed by this data dir's secret.
    keyed: Keyed,
    /// The relay's ids: index, segments, filter.
    ids: Ids,
    relay: Namespace,
    /// The Redis endpoint's keys.
    keys: Keys,
    kv: Namespace,
    /// Group commit shared by every writer of both namespaces.
    flush: FlushGroup,
    in_flight: Mutex<InFlightMap>,
    /// Serialises writers: segment sequence order is the order writes were decided in, which
    /// replay relies on ("the newest entry wins"); also makes NX/XX atomic and refuses writes
    /// after close.
    commit_lock: Mutex<()>,
    closed: AtomicBool,
    /// Tells the compactor thread to exit.
    stopping: AtomicBool,
    /// Backups running: while any is, the compactor deletes no segment.
    backups: AtomicUsize,
    ttl_ms: u64,
    max_id_bytes: usize,
    clock: Arc<dyn Clock>,
    wake: (Mutex<bool>, Condvar),
    absent_lookups: AtomicU64,
    false_positives: AtomicU64,
    swept_ids: AtomicU64,
    bloom_rebuilds: AtomicU64,
    origin: BloomOrigin,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").field("dir", &self.dir).finish()
    }
}

impl std::fmt::Debug for Filters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Filters({} generations)", self.generations())
    }
}

impl Shared {
    fn sled_err(&self, context: &'static str) -> impl FnOnce(sled::Error) -> Error + '_ {
        move |source| Error::Sled {
            context,
            path: self.dir.clone(),
            source,
        }
    }

    fn validate(&self, id: &[u8]) -> Result<(), Error> {
        if id.is_empty() {
            return Err(Error::EmptyId {
                max: self.max_id_bytes,
            });
        }
        if id.len() > self.max_id_bytes {
            return Err(Error::IdTooLong {
                len: id.len(),
                max: self.max_id_bytes,
            });
        }
        Ok(())
    }

    /// Whether the filter of `ns` may hold `key`; counts a "no" as an absent lookup.
    fn may_hold(&self, ns: &Namespace, key: u128) -> bool {
        let maybe = ns.filters.read().expect("filter lock").contains(key);
        if !maybe {
            self.absent_lookups.fetch_add(1, Ordering::Relaxed);
        }
        maybe
    }

    /// Counts a "maybe" of the filter that the index answered "no".
    fn false_positive(&self) {
        self.absent_lookups.fetch_add(1, Ordering::Relaxed);
        self.false_positives.fetch_add(1, Ordering::Relaxed);
    }

    /// The expiry of a live relay id: the filter first, the index on a "maybe".
    fn live_id(&self, key: u128, now_ms: u64) -> Option<u64> {
        if !self.may_hold(&self.relay, key) {
            return None;
        }
        self.live_in_index(key, now_ms)
    }

    /// The index's answer for a relay id the filter said "maybe" to; a "no" counts as a false
    /// positive.
    fn live_in_index(&self, key: u128, now_ms: u64) -> Option<u64> {
        match self.ids.get(key) {
            Some(expires_ms) if now_ms < expires_ms => Some(expires_ms),
            _ => {
                self.false_positive();
                None
            }
        }
    }

    /// Ends the in-flight state of an id and tells its waiters how.
    fn settle(&self, key: u128, how: Settled) {
        let slot = self.in_flight.lock().expect("in-flight lock").remove(&key);
        if let Some(Some(tx)) = slot {
            tx.send_replace(Some(how));
        }
    }

    /// As [`Shared::settle`] for a batch, under one take of the in-flight lock (a commit's
    /// claims settle together).
    fn settle_all(&self, keys: impl Iterator<Item = u128>, how: Settled) {
        let waited: Vec<_> = {
            let mut map = self.in_flight.lock().expect("in-flight lock");
            keys.filter_map(|key| map.remove(&key).flatten()).collect()
        };
        for tx in waited {
            tx.send_replace(Some(how));
        }
    }

    /// The commit lock, for a write of either namespace; refused once the store is closed (its
    /// snapshot is written then, and a later write would make it stale).
    fn write_lock(&self) -> Result<MutexGuard<'_, ()>, Error> {
        let guard = self.commit_lock.lock().expect("commit lock");
        if self.closed.load(Ordering::SeqCst) {
            return Err(Error::Closed);
        }
        Ok(guard)
    }

    /// Writes one segment into `ns` (under the commit lock, which `_guard` proves) and returns
    /// the flush ticket that makes it durable. `expiries` files it.
    fn append(
        &self,
        _guard: &MutexGuard<'_, ()>,
        ns: &Namespace,
        expiries: Vec<u64>,
        bytes: Vec<u8>,
    ) -> Result<u64, Error> {
        let (filed, key) = file_segment(&self.db, expiries).map_err(self.sled_err("append"))?;
        ns.segments
            .insert(key, bytes)
            .map_err(self.sled_err("append"))?;
        if ns.due_at(filed) {
            self.wake_compactor();
        }
        Ok(self.flush.ticket())
    }

    /// Writes segments into `ns` as [`Shared::append`] does, atomically (a crash leaves all of
    /// them or none: a script's writes may span several), and returns the ticket that makes
    /// them durable. Each pair is a segment's entries' expiries and its bytes.
    fn append_all(
        &self,
        guard: &MutexGuard<'_, ()>,
        ns: &Namespace,
        mut segments: Vec<(Vec<u64>, Vec<u8>)>,
    ) -> Result<u64, Error> {
        if segments.len() == 1 {
            // One insert is atomic by itself, and sled's batch costs a lone client a third of
            // its rate (a global write lock and a batch manifest per request).
            let (expiries, bytes) = segments.pop().expect("one segment");
            return self.append(guard, ns, expiries, bytes);
        }
        let mut batch = sled::Batch::default();
        let mut first_due = u64::MAX;
        for (expiries, bytes) in segments {
            let (filed, key) = file_segment(&self.db, expiries).map_err(self.sled_err("append"))?;
            batch.insert(&key, bytes);
            first_due = first_due.min(filed);
        }
        ns.segments
            .apply_batch(batch)
            .map_err(self.sled_err("append"))?;
        if ns.due_at(first_due) {
            self.wake_compactor();
        }
        Ok(self.flush.ticket())
    }

    /// Appends a relay segment and puts its ids in the index and the filter, under the commit
    /// lock (so a `forget` is ordered after it both on disk and in memory), then waits until
    /// the segment is durable. Nobody reads those index entries before that: a claim of one of
    /// the ids is in flight until the caller settles it. Should the flush fail, they are taken
    /// out again (a redelivery must then be new, not a duplicate).
    fn record_relay(
        &self,
        commit_ms: u64,
        entries: &[RelayEntry],
        offset: Option<u64>,
    ) -> Result<(), Error> {
        let ticket = self.write_relay(commit_ms, entries, offset)?;
        self.wait_relay(entries, ticket)
    }

    /// The first half of [`Shared::record_relay`]: appends the segment, starts its flush and
    /// puts the ids in the index and the filter while the flush runs. Returns the flush ticket
    /// to give [`Shared::wait_relay`].
    fn write_relay(
        &self,
        commit_ms: u64,
        entries: &[RelayEntry],
        offset: Option<u64>,
    ) -> Result<u64, Error> {
        let bytes = segment::encode_relay(commit_ms, entries);
        let (ticket, rolled) = {
            let guard = self.write_lock()?;
            if let Some(offset) = offset {
                self.meta
                    .insert(APPLIED_OFFSET_KEY, &offset.to_be_bytes())
                    .map_err(self.sled_err("apply"))?;
            }
            if entries.is_empty() {
                (self.flush.ticket(), false)
            } else {
                let expiries = entries.iter().map(|e| e.expires_ms).collect();
                let ticket = self.append(&guard, &self.relay, expiries, bytes)?;
                // The disk's part runs while the index and the filter take the ids.
                self.flush.start(ticket);
                self.ids.put_all(
                    entries
                        .iter()
                        .map(|e| index::Slot::new(short(e.digest), e.expires_ms)),
                );
                let keys = entries.iter().map(|e| (short(e.digest), e.expires_ms));
                (ticket, self.relay.remember(keys))
            }
        };
        if rolled {
            self.wake_compactor();
        }
        Ok(ticket)
    }

    /// The second half of [`Shared::record_relay`]: waits until `ticket` is durable, or takes
    /// `entries` out of the index again when the flush failed.
    fn wait_relay(&self, entries: &[RelayEntry], ticket: u64) -> Result<(), Error> {
        // Writers that queue behind this flush share the next one.
        if let Err(e) = self.flush.wait(&self.db, ticket) {
            for e in entries {
                self.ids
                    .remove_if(short(e.digest), |exp| exp == held_expiry(e.expires_ms));
            }
            return Err(self.sled_err("commit flush")(e));
        }
        Ok(())
    }

    fn wake_compactor(&self) {
        let (flag, cv) = &self.wake;
        *flag.lock().expect("wake lock") = true;
        cv.notify_one();
    }
}

/// A handle on an open store. Cheap to clone; the compactor stops when the last handle goes.
#[derive(Debug, Clone)]
pub struct Store {
    shared: Arc<Shared>,
    compactor: Arc<compactor::Guard>,
}

impl Store {
    /// Opens (or creates) the store in `config.dir`: migrates a data dir of the first layout,
    /// loads the index from a trusted snapshot or rebuilds it from the segments, and starts
    /// the compactor (which fills the Bloom filter in the background after a rebuild).
    ///
    /// # Errors
    ///
    /// [`Error::Locked`] naming the dir when another store holds it; [`Error::Sled`] when sled
    /// cannot open it; [`Error::Config`] for out-of-range settings; a segment that does not
    /// decode.
    pub fn open(config: StoreConfig) -> Result<Store, Error> {
        config.validate()?;
        fs::create_dir_all(&config.dir).map_err(|source| Error::Snapshot {
            path: config.dir.clone(),
            source,
        })?;
        let db = open_sled(&config)?;
        let err = |context| {
            let dir = config.dir.clone();
            move |source| Error::Sled {
                context,
                path: dir,
                source,
            }
        };
        let meta = db.open_tree("meta").map_err(err("open"))?;
        let keyed = Keyed::new(&secret(&db, &meta).map_err(err("open"))?);
        let relay_segments = db.open_tree("relay_segments").map_err(err("open"))?;
        let kv_segments = db.open_tree("kv_segments").map_err(err("open"))?;
        let now_ms = config.clock.now_ms();
        migrate::run(
            &config.dir,
            &db,
            &meta,
            &keyed,
            &relay_segments,
            &kv_segments,
        )?;

        // Take the marker out (durably) before anything else: from here on, a crash leaves no
        // marker, so the next open cannot trust a snapshot that misses what we write later.
        let token = meta.remove(SNAPSHOT_TOKEN_KEY).map_err(err("open"))?;
        if token.is_some() {
            db.flush().map_err(err("open"))?;
        }
        let started = Instant::now();
        let snapshot_path = config.dir.join(snapshot::FILE);
        let capacity = config.generation_capacity();
        let expected = usize::try_from(config.expected_ids).unwrap_or(usize::MAX);
        let loaded =
            token.and_then(|t| snapshot::load(&snapshot_path, &t, keyed.clone(), expected));
        let _ = fs::remove_file(&snapshot_path);
        let (origin, ids, keys, relay_filters, kv_filters) = match loaded {
            Some(l) => (BloomOrigin::Snapshot, l.ids, l.keys, l.relay, l.kv),
            None => {
                let ids = Ids::ids(expected);
                let keys = Keys::new(keyed.clone());
                compactor::replay(
                    &config.dir,
                    &relay_segments,
                    &kv_segments,
                    &ids,
                    &keys,
                    now_ms,
                )?;
                // The index answers alone until the compactor has filled the filter from it;
                // an empty namespace has nothing to fill.
                let filters = |empty: bool| match empty {
                    true => Filters::new(capacity, config.fp_rate, now_ms),
                    false => Filters::unready(capacity, config.fp_rate, now_ms),
                };
                let (relay, kv) = (filters(ids.len() == 0), filters(keys.len() == 0));
                (BloomOrigin::Rebuilt, ids, keys, relay, kv)
            }
        };
        let first_due = |tree: &sled::Tree| {
            tree.first()
                .map(|f| f.map_or(u64::MAX, |(k, _)| segment::parse_key(&k).0))
        };
        let relay = Namespace {
            next_due_ms: AtomicU64::new(first_due(&relay_segments).map_err(err("open"))?),
            segments: relay_segments,
            filters: RwLock::new(relay_filters),
        };
        let kv = Namespace {
            next_due_ms: AtomicU64::new(first_due(&kv_segments).map_err(err("open"))?),
            segments: kv_segments,
            filters: RwLock::new(kv_filters),
        };
        tracing::info!(
            dir = %config.dir.display(),
            live_ids = ids.len(),
            redis_keys = keys.len(),
            index = ?origin,
            ms = started.elapsed().as_millis() as u64,
            "store opened"
        );
        let power = match config.durability {
            Durability::Process => None,
            Durability::Power => {
                Some(
                    fs::File::open(&config.dir).map_err(|source| Error::Snapshot {
                        path: config.dir.clone(),
                        source,
                    })?,
                )
            }
        };
        let flush = FlushGroup::new(db.clone(), power);
        let shared = Arc::new(Shared {
            dir: config.dir.clone(),
            db,
            meta,
            keyed,
            ids,
            relay,
            keys,
            kv,
            flush,
            in_flight: Mutex::new(InFlightMap::default()),
            commit_lock: Mutex::new(()),
            closed: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            backups: AtomicUsize::new(0),
            ttl_ms: config.ttl.as_millis() as u64,
            max_id_bytes: config.max_id_bytes,
            clock: config.clock.clone(),
            wake: (Mutex::new(false), Condvar::new()),
            absent_lookups: AtomicU64::new(0),
            false_positives: AtomicU64::new(0),
            swept_ids: AtomicU64::new(0),
            bloom_rebuilds: AtomicU64::new(0),
            origin,
        });
        let compactor = Arc::new(compactor::Guard::start(shared.clone()));
        Ok(Store { shared, compactor })
    }

    /// The data dir.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// The dedup window.
    pub fn ttl(&self) -> Duration {
        Duration::from_millis(self.shared.ttl_ms)
    }

    /// The record of `id` if it is live at `now_ms`, with the time it was first seen (read
    /// from its segment on disk). Claims in flight are not consulted.
    ///
    /// # Errors
    ///
    /// A refused id ([`Error::EmptyId`], [`Error::IdTooLong`]), or a sled or segment error.
    pub fn check(&self, id: &[u8], now_ms: u64) -> Result<Option<Seen>, Error> {
        let shared = &self.shared;
        shared.validate(id)?;
        let digest = shared.keyed.digest(id);
        let Some(expires_ms) = shared.live_id(short(digest), now_ms) else {
            return Ok(None);
        };
        let first_seen_ms = compactor::commit_time_of(shared, digest, expires_ms)?
            .unwrap_or_else(|| expires_ms.saturating_sub(shared.ttl_ms));
        Ok(Some(Seen {
            first_seen_ms,
            expires_ms,
        }))
    }

    /// Whether `id` is live at `now_ms`, and until when: the filter, then the index; nothing
    /// on disk is read. Claims in flight are not consulted.
    ///
    /// # Errors
    ///
    /// A refused id.
    pub fn lookup(&self, id: &[u8], now_ms: u64) -> Result<Option<Live>, Error> {
        let shared = &self.shared;
        shared.validate(id)?;
        let key = short(shared.keyed.digest(id));
        Ok(shared
            .live_id(key, now_ms)
            .map(|expires_ms| Live { expires_ms }))
    }

    /// The prefilter's answer alone: `false` means certainly not live. For tests and diagnostics.
    ///
    /// # Errors
    ///
    /// A refused id.
    pub fn may_contain(&self, id: &[u8]) -> Result<bool, Error> {
        let shared = &self.shared;
        shared.validate(id)?;
        let key = short(shared.keyed.digest(id));
        Ok(shared
            .relay
            .filters
            .read()
            .expect("filter lock")
            .contains(key))
    }

    /// Claims `id` with the store's window.
    ///
    /// # Errors
    ///
    /// A refused id (the id is then not held).
    pub fn claim(&self, id: &[u8], now_ms: u64) -> Result<Verdict, Error> {
        self.claim_with_ttl(id, Duration::from_millis(self.shared.ttl_ms), now_ms)
    }

    /// Claims `id`; when committed it stays a duplicate for `ttl`.
    ///
    /// # Errors
    ///
    /// As [`Store::claim`].
    pub fn claim_with_ttl(&self, id: &[u8], ttl: Duration, now_ms: u64) -> Result<Verdict, Error> {
        self.claim_all([(id, ttl)], now_ms)
            .pop()
            .expect("one verdict per id")
    }

    /// Claims a batch of ids, each for its window, and answers for each, in order, what
    /// [`Store::claim_with_ttl`] would one after the other. The shared state is taken once for
    /// the batch instead of once an id (the in-flight map to hold the ids, the filter to look
    /// them up, the in-flight map again to let go of the live ones): on a machine where a
    /// locked instruction costs tens of nanoseconds, those were half of a claim's time, and
    /// without them between its lookups the filter's cache misses of one id overlap the next's.
    ///
    /// An id that comes twice in a batch is answered the second time as a second claim would
    /// be: `InFlight` behind the first when that one is new, the same `Duplicate` when it is
    /// live.
    ///
    /// Each verdict is `Err` for a refused id ([`Error::EmptyId`], [`Error::IdTooLong`]), which
    /// is then not held; the others are unaffected.
    pub fn claim_all<I: AsRef<[u8]>>(
        &self,
        ids: impl IntoIterator<Item = (I, Duration)>,
        now_ms: u64,
    ) -> Vec<Result<Verdict, Error>> {
        let shared = &self.shared;
        let claimed_at = Instant::now();
        // Claims made settled, so one that turns out to be held elsewhere drops inertly.
        let mut steps: Vec<Result<Verdict, Error>> = ids
            .into_iter()
            .map(|(id, ttl)| {
                let id = id.as_ref();
                shared.validate(id)?;
                Ok(Verdict::New(Claim {
                    shared: shared.clone(),
                    id: SmallVec::from_slice(id),
                    digest: shared.keyed.digest(id),
                    ttl_ms: ttl.as_millis().max(1) as u64,
                    settled: true,
                    claimed_at,
                }))
            })
            .collect();
        // Ids held already: by another claimer, or by this batch when they come twice.
        let mut waiting: Vec<(usize, u128)> = Vec::new();
        {
            // Hold the ids before looking them up, so a concurrent claimer waits for our
            // verdict instead of racing us to the same answer.
            let mut map = shared.in_flight.lock().expect("in-flight lock");
            for (i, step) in steps.iter_mut().enumerate() {
                let Ok(Verdict::New(claim)) = step else {
                    continue;
                };
                let key = short(claim.digest);
                match map.entry(key) {
                    Entry::Occupied(mut held) => {
                        let tx = held.get_mut().get_or_insert_with(|| watch::channel(None).0);
                        *step = Ok(Verdict::InFlight(Waiter { rx: tx.subscribe() }));
                        waiting.push((i, key));
                    }
                    Entry::Vacant(free) => {
                        free.insert(None);
                        claim.settled = false;
                    }
                }
            }
        }
        // The filter, under one read lock; the index only for its "maybe"s.
        let maybe: Vec<usize> = {
            let filters = shared.relay.filters.read().expect("filter lock");
            steps
                .iter()
                .enumerate()
                .filter(|(_, step)| {
                    matches!(step, Ok(Verdict::New(c)) if filters.contains(short(c.digest)))
                })
                .map(|(i, _)| i)
                .collect()
        };
        let held = steps
            .iter()
            .filter(|s| matches!(s, Ok(Verdict::New(_))))
            .count();
        shared
            .absent_lookups
            .fetch_add((held - maybe.len()) as u64, Ordering::Relaxed);
        let mut live = Vec::new();
        for i in maybe {
            let Ok(Verdict::New(claim)) = &mut steps[i] else {
                unreachable!("only held claims were looked up");
            };
            let key = short(claim.digest);
            if let Some(expires_ms) = shared.live_in_index(key, now_ms) {
                claim.settled = true;
                live.push((key, Live { expires_ms }));
                steps[i] = Ok(Verdict::Duplicate(Live { expires_ms }));
            }
        }
        if !live.is_empty() {
            shared.settle_all(live.iter().map(|(key, _)| *key), Settled::Committed);
            if !waiting.is_empty() {
                // Where a live id came again in this batch, its second coming found this
                // batch's own hold (the map was not let go of in between), not another
                // claimer's: it gets the duplicate a second claim would.
                let live: HashMap<u128, Live> = live.into_iter().collect();
                for (i, key) in waiting {
                    if let Some(l) = live.get(&key) {
                        steps[i] = Ok(Verdict::Duplicate(*l));
                    }
                }
            }
        }
        steps
    }

    /// Records the claimed ids as seen at `now_ms`, durably: one segment and one flush cover
    /// the batch. When this returns `Ok`, every id survives a crash; waiters learn
    /// [`Settled::Committed`].
    ///
    /// Blocking (sled write and fsync): call it from a dedicated thread or `spawn_blocking`.
    ///
    /// # Errors
    ///
    /// A sled error, or [`Error::Closed`]. The claims are released then: none of them counts as
    /// recorded, so the caller must not ack their messages.
    pub fn commit(&self, claims: Vec<Claim>, now_ms: u64) -> Result<(), Error> {
        self.commit_then(claims, now_ms, |_| {})
    }

    /// [`Store::commit`], calling `written` once the batch is written to sled, while the flush
    /// that makes it durable runs (not at all for an empty batch, nor when the write fails).
    fn commit_then(
        &self,
        mut claims: Vec<Claim>,
        now_ms: u64,
        written: impl FnOnce(&[Claim]),
    ) -> Result<(), Error> {
        if claims.is_empty() {
            return Ok(());
        }
        let entries: Vec<RelayEntry> = claims
            .iter()
            .map(|c| RelayEntry {
                digest: c.digest,
                expires_ms: now_ms.saturating_add(c.ttl_ms),
                tombstone: false,
            })
            .collect();
        let shared = &self.shared;
        // On error the claims drop here and release their ids.
        let ticket = shared.write_relay(now_ms, &entries, None)?;
        written(&claims);
        // While the flush runs: the claims go (their ids stay in flight until settled below,
        // so they are settled by digest, for both outcomes).
        for c in &mut claims {
            c.settled = true;
        }
        drop(claims);
        let keys = entries.iter().map(|e| short(e.digest));
        match shared.wait_relay(&entries, ticket) {
            Ok(()) => {
                shared.settle_all(keys, Settled::Committed);
                Ok(())
            }
            Err(e) => {
                shared.settle_all(keys, Settled::Released);
                Err(e)
            }
        }
    }

    /// As [`Store::commit`], and returns the batch as a log segment: self-contained and
    /// versioned (the ids and their windows), for the active instance to append to the
    /// replication stream and for standbys to [`Store::apply_logged`].
    ///
    /// # Errors
    ///
    /// As [`Store::commit`].
    pub fn commit_logged(&self, claims: Vec<Claim>, now_ms: u64) -> Result<Vec<u8>, Error> {
        let segment = log_segment(&claims, now_ms);
        self.commit(claims, now_ms)?;
        Ok(segment)
    }

    /// As [`Store::commit_logged`], but hands the log segment to `replicate` as soon as the
    /// batch is written to sled, while the flush that makes it durable runs, and returns once it
    /// is durable: so the caller can ship the segment while the disk works. The batch is in sled
    /// (not yet durable) when `replicate` runs, so an offset noted later with
    /// [`Store::note_applied_offset`] is never durable without it. `replicate` is not called for
    /// an empty batch, nor when the write fails.
    ///
    /// # Errors
    ///
    /// As [`Store::commit`]; `replicate` may have run by then (a failed flush).
    pub fn commit_replicated(
        &self,
        claims: Vec<Claim>,
        now_ms: u64,
        replicate: impl FnOnce(Vec<u8>),
    ) -> Result<(), Error> {
        self.commit_then(claims, now_ms, |claims| {
            replicate(log_segment(claims, now_ms))
        })
    }

    /// Applies a log segment written by another instance's [`Store::commit_logged`], and
    /// records `offset` (its position in the stream) with it; both are durable on return.
    /// Applying a segment twice is harmless. Ids whose window has passed at `now_ms` are
    /// skipped. Returns the number of ids applied.
    ///
    /// # Errors
    ///
    /// [`Error::Corrupt`] / [`Error::UnknownFormat`] for a segment that does not decode (nothing
    /// is applied then), a refused id, a sled error, or [`Error::Closed`].
    pub fn apply_logged(&self, segment: &[u8], offset: u64, now_ms: u64) -> Result<usize, Error> {
        self.apply_logged_many([(segment, offset)], now_ms)
    }

    /// As [`Store::apply_logged`] for several segments in stream order, made durable by one
    /// write and one flush for them all (a standby catching up applies thousands in a row, and
    /// a flush per segment would bound it to the disk's flush rate). Records the last one's
    /// offset. Returns the number of ids applied.
    ///
    /// # Errors
    ///
    /// As [`Store::apply_logged`]; nothing is applied when one segment does not decode.
    pub fn apply_logged_many<'a>(
        &self,
        segments: impl IntoIterator<Item = (&'a [u8], u64)>,
        now_ms: u64,
    ) -> Result<usize, Error> {
        let shared = &self.shared;
        let mut entries = Vec::new();
        // The oldest commit time: each entry keeps its own expiry, stored relative to it.
        let mut commit_ms = u64::MAX;
        let mut last = None;
        for (segment, offset) in segments {
            let (ms, logged) = log::decode(segment)?;
            commit_ms = commit_ms.min(ms);
            for e in &logged {
                shared.validate(e.id)?;
                let expires_ms = ms.saturating_add(e.ttl_ms);
                if now_ms < expires_ms {
                    entries.push(RelayEntry {
                        digest: shared.keyed.digest(e.id),
                        expires_ms,
                        tombstone: false,
                    });
                }
            }
            last = Some(offset);
        }
        let Some(offset) = last else {
            return Ok(0);
        };
        shared.record_relay(commit_ms, &entries, Some(offset))?;
        Ok(entries.len())
    }

    /// Records that the stream is applied up to `offset`, where the segments since the last one
    /// applied are this store's own ([`Store::commit_replicated`] wrote them to sled before
    /// they reached the stream): nothing to apply, and no flush of its own, as the next flush
    /// makes it durable (never without those segments, written before it).
    ///
    /// # Errors
    ///
    /// A sled error, or [`Error::Closed`].
    pub fn note_applied_offset(&self, offset: u64) -> Result<(), Error> {
        let shared = &self.shared;
        let _guard = shared.write_lock()?;
        shared
            .meta
            .insert(APPLIED_OFFSET_KEY, &offset.to_be_bytes())
            .map_err(shared.sled_err("note offset"))?;
        Ok(())
    }

    /// The stream offset recorded last ([`Store::apply_logged`], [`Store::note_applied_offset`]),
    /// if any.
    ///
    /// # Errors
    ///
    /// A sled error.
    pub fn applied_offset(&self) -> Result<Option<u64>, Error> {
        let shared = &self.shared;
        let value = shared
            .meta
            .get(APPLIED_OFFSET_KEY)
            .map_err(shared.sled_err("read offset"))?;
        Ok(value.and_then(|v| <[u8; 8]>::try_from(&v[..]).ok().map(u64::from_be_bytes)))
    }

    /// Forgets `id` (it becomes new). Returns whether the index held it. Durable on return.
    /// A copy of the id in flight right now is recorded again when it commits (it was
    /// forwarded after all).
    ///
    /// # Errors
    ///
    /// A refused id, a sled error, or [`Error::Closed`].
    pub fn forget(&self, id: &[u8]) -> Result<bool, Error> {
        let shared = &self.shared;
        shared.validate(id)?;
        let digest = shared.keyed.digest(id);
        let key = short(digest);
        let ticket = {
            let guard = shared.write_lock()?;
            let Some(expires_ms) = shared.ids.get(key) else {
                return Ok(false);
            };
            // A tombstone as long-lived as the entry it kills: replay must not revive it.
            let tombstone = RelayEntry {
                digest,
                expires_ms,
                tombstone: true,
            };
            let bytes = segment::encode_relay(shared.clock.now_ms(), &[tombstone]);
            let ticket = shared.append(&guard, &shared.relay, vec![expires_ms], bytes)?;
            shared.ids.remove_if(key, |_| true);
            ticket
        };
        shared
            .flush
            .wait(&shared.db, ticket)
            .map_err(shared.sled_err("forget flush"))?;
        Ok(true)
    }

    /// Forgets every relay id (all become new), durable on return. Returns how many the index
    /// held. Every relay segment goes in one atomic sled batch. Meant for a quiet relay: a
    /// commit that races it may keep its ids in memory while their segment went (a restart
    /// then forgets them too).
    ///
    /// # Errors
    ///
    /// A sled error or [`Error::Closed`].
    pub fn forget_all(&self) -> Result<u64, Error> {
        let shared = &self.shared;
        let ticket = {
            let _guard = shared.write_lock()?;
            let mut batch = sled::Batch::default();
            for key in shared.relay.segments.iter().keys() {
                batch.remove(key.map_err(shared.sled_err("forget all"))?);
            }
            shared
                .relay
                .segments
                .apply_batch(batch)
                .map_err(shared.sled_err("forget all"))?;
            shared.flush.ticket()
        };
        shared
            .flush
            .wait(&shared.db, ticket)
            .map_err(shared.sled_err("forget all flush"))?;
        let forgotten = shared.ids.retain(|_| false) as u64;
        compactor::rebuild(shared, compactor::Which::Relay, shared.clock.now_ms());
        tracing::info!(dir = %shared.dir.display(), forgotten, "forgot every relay id");
        Ok(forgotten)
    }

    /// Drops segments due at `now_ms` (rewriting their still-live entries forward) and removes
    /// expired entries from the index, about `max_ids` entries per namespace; drops Bloom
    /// generations that are all expired. Returns the number of ids and keys dropped. The
    /// compactor calls this on its own; tests call it to sweep at a chosen time.
    ///
    /// # Errors
    ///
    /// A sled or segment error.
    pub fn sweep(&self, now_ms: u64, max_ids: usize) -> Result<u64, Error> {
        let shared = &self.shared;
        Ok(
            compactor::sweep(shared, compactor::Which::Relay, now_ms, max_ids)?
                + compactor::sweep(shared, compactor::Which::Kv, now_ms, max_ids)?,
        )
    }

    /// Rebuilds the Bloom filters from the index now (the compactor does it once a window).
    ///
    /// # Errors
    ///
    /// None today; kept for callers that handle one.
    pub fn rebuild_filter(&self, now_ms: u64) -> Result<(), Error> {
        let shared = &self.shared;
        compactor::rebuild(shared, compactor::Which::Relay, now_ms);
        compactor::rebuild(shared, compactor::Which::Kv, now_ms);
        Ok(())
    }

    /// The key-value namespace the Redis endpoint serves (apart from the relay's ids).
    pub fn kv(&self) -> kv::Kv {
        kv::Kv::new(self.shared.clone())
    }

    /// Asks the compactor to look at the clock now rather than at its next deadline.
    pub fn wake_compactor(&self) {
        self.shared.wake_compactor();
    }

    /// Writes a consistent copy of the store to `out` while writers go on (see
    /// `backup.rs` for the format).
    ///
    /// # Errors
    ///
    /// [`Error::Backup`] when `out` fails, a sled error, or [`Error::Closed`].
    pub fn backup(&self, out: &mut dyn std::io::Write) -> Result<BackupStats, Error> {
        backup::write(&self.shared, out)
    }

    /// Creates a store in `config.dir` (which must be empty or missing) from a backup, and
    /// returns what it held. Open the store afterwards with [`Store::open`].
    ///
    /// # Errors
    ///
    /// [`Error::NotEmpty`], [`Error::BadBackup`], [`Error::Backup`] when `input` fails, or a
    /// sled error.
    pub fn restore(
        input: &mut dyn std::io::Read,
        config: StoreConfig,
    ) -> Result<BackupStats, Error> {
        backup::restore(input, &config)
    }

    /// Current figures.
    pub fn stats(&self) -> Stats {
        let shared = &self.shared;
        let (generations, bloom_bytes) = {
            let f = shared.relay.filters.read().expect("filter lock");
            (f.generations(), f.bytes())
        };
        let absent = shared.absent_lookups.load(Ordering::Relaxed);
        let fps = shared.false_positives.load(Ordering::Relaxed);
        Stats {
            live_ids: shared.ids.len() as u64,
            redis_keys: shared.keys.len() as u64,
            in_flight: shared.in_flight.lock().expect("in-flight lock").len(),
            bloom_generations: generations,
            bloom_bytes,
            index_bytes: (shared.ids.table_bytes() + shared.keys.tables().table_bytes()) as u64,
            segments: (shared.relay.segments.len() + shared.kv.segments.len()) as u64,
            disk_bytes: shared.db.size_on_disk().unwrap_or(0),
            absent_lookups: absent,
            false_positives: fps,
            false_positive_rate: if absent == 0 {
                0.0
            } else {
                fps as f64 / absent as f64
            },
            swept_ids: shared.swept_ids.load(Ordering::Relaxed),
            bloom_rebuilds: shared.bloom_rebuilds.load(Ordering::Relaxed),
            oldest_expiry_ms: shared
                .relay
                .segments
                .first()
                .ok()
                .flatten()
                .map(|(k, _)| segment::parse_key(&k).0),
            bloom_loaded_from: shared.origin,
        }
    }

    /// Closes the store cleanly: stops the compactor, refuses further writes, flushes, and
    /// writes the index and filters to a snapshot with a marker so the next open skips the
    /// replay. Other handles still alive get [`Error::Closed`] on writes.
    ///
    /// # Errors
    ///
    /// A sled or snapshot I/O error; the next open then replays the segments, nothing is lost.
    pub fn close(self) -> Result<(), Error> {
        self.compactor.stop();
        let shared = &self.shared;
        let _guard = shared.commit_lock.lock().expect("commit lock");
        shared.closed.store(true, Ordering::SeqCst);
        shared.db.flush().map_err(shared.sled_err("close flush"))?;
        let token: [u8; 16] = rand::random();
        let path = shared.dir.join(snapshot::FILE);
        snapshot::write(&path, &token, shared).map_err(|source| Error::Snapshot {
            path: path.clone(),
            source,
        })?;
        // The marker goes in after the file is durable: a crash in between leaves a file with no
        // marker, which the next open ignores.
        shared
            .meta
            .insert(SNAPSHOT_TOKEN_KEY, &token)
            .map_err(shared.sled_err("close"))?;
        shared.db.flush().map_err(shared.sled_err("close flush"))?;
        tracing::info!(dir = %shared.dir.display(), "store closed, index snapshot written");
        Ok(())
    }
}

/// The data dir's digest secret, made (and flushed) on first open.
fn secret(db: &sled::Db, meta: &sled::Tree) -> sled::Result<Vec<u8>> {
    if let Some(s) = meta.get(SECRET_KEY)? {
        if s.len() >= index::SECRET_LEN {
            return Ok(s.to_vec());
        }
    }
    let mut secret = vec![0u8; index::SECRET_LEN];
    rand::fill(&mut secret[..]);
    meta.insert(SECRET_KEY, &secret[..])?;
    db.flush()?;
    Ok(secret)
}

/// How long `open` retries a held lock. sled finishes background I/O on its own threads, which
/// keep the lock file open for a moment after the previous holder in this process dropped it.
const LOCK_WAIT: Duration = Duration::from_secs(1);

/// Opens sled in a dir, retrying a held lock for [`LOCK_WAIT`].
fn open_sled(config: &StoreConfig) -> Result<sled::Db, Error> {
    let deadline = Instant::now() + LOCK_WAIT;
    loop {
        let opened = sled::Config::new()
            .path(&config.dir)
            .cache_capacity(config.cache_bytes)
            // We flush when a commit asks for durability; a timer flush would only add
            // background I/O that competes with them.
            .flush_every_ms(None)
            .open()
            .map_err(|source| open_error(&config.dir, source));
        match opened {
            Err(Error::Locked { .. }) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

/// Maps sled's open failure, recognising the lock held by another opener.
fn open_error(dir: &Path, source: sled::Error) -> Error {
    match &source {
        sled::Error::Io(e) if e.to_string().contains("could not acquire lock") => Error::Locked {
            path: dir.to_path_buf(),
        },
        _ => Error::Sled {
            context: "open",
            path: dir.to_path_buf(),
            source,
        },
    }
}

#[cfg(test)]
mod tests;
