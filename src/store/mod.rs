//! The embedded dedup store: "was this id seen inside the window?", answered from a Bloom
//! prefilter in memory and confirmed in sled on disk, with ids expired by a background compactor.
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
//! # Layout on disk
//!
//! - tree `ids`: id → record (format byte + bincode: first seen, TTL).
//! - tree `expiry`: (expiry, sequence) → the ids committed together with that expiry. One entry
//!   per commit batch rather than per id: the sweep is still a range scan of what is due, and
//!   commits pay one index write per batch instead of one per id.
//! - tree `meta`: the marker that ties `bloom.snapshot` to this state.
//! - `bloom.snapshot`: the Bloom generations, written on a clean [`Store::close`].

mod compactor;
mod filter;
pub mod kv;
mod log;
mod record;
mod space;

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

use filter::{digest, Filters, FiltersSnapshot};
pub use record::Seen;
use space::{FlushGroup, Space};

/// Largest id limit a store accepts: index entries store id lengths as u16.
pub const MAX_ID_LIMIT: usize = u16::MAX as usize;

/// File next to the sled files holding the Bloom generations of a clean shutdown.
const SNAPSHOT_FILE: &str = "bloom.snapshot";
/// Key in the `meta` tree whose value must equal the snapshot's token for it to be trusted.
const SNAPSHOT_TOKEN_KEY: &[u8] = b"bloom_snapshot_token";
/// Layout version of `bloom.snapshot`.
const SNAPSHOT_VERSION: u32 = 2;
/// Key in the `meta` tree holding the last replication-log offset applied (u64 big-endian).
const APPLIED_OFFSET_KEY: &[u8] = b"applied_log_offset";

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
    /// Writing or reading the Bloom snapshot failed.
    #[error("bloom snapshot {} failed: {source}", path.display())]
    Snapshot {
        /// The snapshot file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
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
    /// sled page cache in bytes (sled's own default is 1 GiB). Default 64 MiB.
    pub cache_bytes: u64,
    /// Longest id accepted, in bytes, at most [`MAX_ID_LIMIT`]. Default 256.
    pub max_id_bytes: usize,
    /// Clock read by the background compactor. Default [`SystemClock`].
    pub clock: Arc<dyn Clock>,
}

impl StoreConfig {
    /// Defaults for everything but the directory.
    pub fn new(dir: impl Into<PathBuf>) -> StoreConfig {
        StoreConfig {
            dir: dir.into(),
            ttl: Duration::from_secs(24 * 3600),
            expected_ids: 1_000_000,
            fp_rate: 0.01,
            cache_bytes: 64 << 20,
            max_id_bytes: 256,
            clock: Arc::new(SystemClock),
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
    Duplicate(Seen),
    /// Another caller holds a claim on this id right now; wait for its outcome.
    InFlight(Waiter),
}

/// How an in-flight claim ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// The id is recorded: a second copy is a duplicate.
    Committed,
    /// The claim was released: the id is new again, claim it anew.
    Released,
}

/// Exclusive hold on a new id. Commit it with [`Store::commit`]; dropping it releases the id.
#[derive(Debug)]
pub struct Claim {
    shared: Arc<Shared>,
    id: Box<[u8]>,
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
            self.shared.settle(&self.id, Settled::Released);
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
    /// Records in sled (live, plus expired ones the compactor has not reached yet).
    pub live_ids: u64,
    /// Keys of the Redis endpoint's namespace on disk.
    pub redis_keys: u64,
    /// Claims held right now.
    pub in_flight: usize,
    /// Bloom generations a lookup queries.
    pub bloom_generations: usize,
    /// Bytes of Bloom bit arrays in memory.
    pub bloom_bytes: u64,
    /// Bytes sled occupies on disk.
    pub disk_bytes: u64,
    /// Lookups of ids that were not live (the denominator of the FP rate).
    pub absent_lookups: u64,
    /// Bloom "maybe"s that sled answered absent or expired.
    pub false_positives: u64,
    /// `false_positives / absent_lookups`, measured (0 before any absent lookup).
    pub false_positive_rate: f64,
    /// Expired ids deleted by the compactor since open.
    pub swept_ids: u64,
    /// Rebuilds of the Bloom filter from sled since open (at open included).
    pub bloom_rebuilds: u64,
    /// Expiry of the oldest record still on disk (ms), if any.
    pub oldest_expiry_ms: Option<u64>,
    /// How the filter was obtained at open.
    pub bloom_loaded_from: BloomOrigin,
}

/// How the Bloom filter came to be at open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BloomOrigin {
    /// Loaded from a snapshot whose marker matched.
    Snapshot,
    /// Rebuilt from sled (no snapshot, marker mismatch, or unreadable snapshot).
    Rebuilt,
}

/// Claims held right now, each with the channel its waiters listen on. The channel is made by
/// the first waiter: most claims never have one, and notifying an empty channel is not free.
type InFlightMap = HashMap<Box<[u8]>, Option<watch::Sender<Option<Settled>>>>;

/// State shared by store handles, claims and the compactor.
#[derive(Debug)]
pub(crate) struct Shared {
    dir: PathBuf,
    db: sled::Db,
    meta: sled::Tree,
    /// The relay's ids.
    relay: Space,
    /// The Redis endpoint's keys.
    kv: Space,
    /// Group commit shared by every writer of both namespaces.
    flush: FlushGroup,
    in_flight: Mutex<InFlightMap>,
    /// Serialises commits with the start of a rebuild scan and with close: a commit inserts into
    /// the filter and writes sled under it, so "inserted before the scan began" implies "visible
    /// to the scan".
    commit_lock: Mutex<()>,
    closed: AtomicBool,
    /// Tells the compactor thread to exit.
    stopping: AtomicBool,
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

    /// The record of a live key of `space`, consulting sled only when the filter says "maybe".
    fn lookup(
        &self,
        space: &Space,
        id: &[u8],
        digest: u128,
        now_ms: u64,
    ) -> Result<Option<(Seen, sled::IVec)>, Error> {
        let maybe = space.filters.read().expect("filter lock").contains(digest);
        if !maybe {
            self.absent_lookups.fetch_add(1, Ordering::Relaxed);
            return Ok(None);
        }
        let found = match space.tree.get(id).map_err(self.sled_err("lookup"))? {
            Some(bytes) => Some((record::decode(id, &bytes)?, bytes)),
            None => None,
        };
        match found {
            Some((seen, bytes)) if seen.is_live(now_ms) => Ok(Some((seen, bytes))),
            _ => {
                self.absent_lookups.fetch_add(1, Ordering::Relaxed);
                self.false_positives.fetch_add(1, Ordering::Relaxed);
                Ok(None)
            }
        }
    }

    /// Ends the in-flight state of `id` and tells its waiters how.
    fn settle(&self, id: &[u8], how: Settled) {
        let slot = self.in_flight.lock().expect("in-flight lock").remove(id);
        if let Some(Some(tx)) = slot {
            tx.send_replace(Some(how));
        }
    }

    /// The commit lock, for a write of either namespace; refused once the store is closed (its
    /// snapshot is written then, and a later write would make it stale).
    fn write_lock(&self) -> Result<std::sync::MutexGuard<'_, ()>, Error> {
        let guard = self.commit_lock.lock().expect("commit lock");
        if self.closed.load(Ordering::SeqCst) {
            return Err(Error::Closed);
        }
        Ok(guard)
    }

    /// Makes every write applied so far durable (shared with concurrent writers).
    fn make_durable(&self, context: &'static str) -> Result<(), Error> {
        let ticket = self.flush.ticket();
        self.flush
            .wait(&self.db, ticket)
            .map_err(self.sled_err(context))
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
    /// Opens (or creates) the store in `config.dir`, loads or rebuilds the Bloom filter, and
    /// starts the compactor.
    ///
    /// # Errors
    ///
    /// [`Error::Locked`] naming the dir when another store holds it; [`Error::Sled`] when sled
    /// cannot open it; [`Error::Config`] for out-of-range settings.
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

        let now_ms = config.clock.now_ms();
        // Take the marker out (durably) before anything else: from here on, a crash leaves no
        // marker, so the next open cannot trust a snapshot that misses what we write later.
        let token = meta.remove(SNAPSHOT_TOKEN_KEY).map_err(err("open"))?;
        if token.is_some() {
            db.flush().map_err(err("open"))?;
        }
        let snapshot_path = config.dir.join(SNAPSHOT_FILE);
        let started = Instant::now();
        let loaded = token.and_then(|t| load_snapshot(&snapshot_path, &t));
        let _ = fs::remove_file(&snapshot_path);
        let origin = if loaded.is_some() {
            BloomOrigin::Snapshot
        } else {
            BloomOrigin::Rebuilt
        };
        let (relay_loaded, kv_loaded) = match loaded {
            Some([relay, kv]) => (Some(relay), Some(kv)),
            None => (None, None),
        };
        let fresh = || Filters::new(config.generation_capacity(), config.fp_rate, now_ms);
        let scan_err = |e| match e {
            ScanError::Sled(source) => Error::Sled {
                context: "rebuild",
                path: config.dir.clone(),
                source,
            },
            ScanError::Record(e) => e,
        };
        let relay =
            Space::open(&db, "ids", "expiry", fresh(), relay_loaded, now_ms).map_err(scan_err)?;
        let kv =
            Space::open(&db, "kv", "kv_expiry", fresh(), kv_loaded, now_ms).map_err(scan_err)?;
        tracing::info!(
            dir = %config.dir.display(),
            live_ids = relay.live.load(Ordering::Relaxed),
            redis_keys = kv.live.load(Ordering::Relaxed),
            bloom = ?origin,
            ms = started.elapsed().as_millis() as u64,
            "store opened"
        );
        let shared = Arc::new(Shared {
            dir: config.dir.clone(),
            db,
            meta,
            relay,
            kv,
            flush: FlushGroup::default(),
            in_flight: Mutex::new(HashMap::new()),
            commit_lock: Mutex::new(()),
            closed: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            ttl_ms: config.ttl.as_millis() as u64,
            max_id_bytes: config.max_id_bytes,
            clock: config.clock.clone(),
            wake: (Mutex::new(false), Condvar::new()),
            absent_lookups: AtomicU64::new(0),
            false_positives: AtomicU64::new(0),
            swept_ids: AtomicU64::new(0),
            bloom_rebuilds: AtomicU64::new(u64::from(origin == BloomOrigin::Rebuilt)),
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

    /// The record of `id` if it is live at `now_ms`. Claims in flight are not consulted.
    ///
    /// # Errors
    ///
    /// A refused id ([`Error::EmptyId`], [`Error::IdTooLong`]), or a sled or record error.
    pub fn check(&self, id: &[u8], now_ms: u64) -> Result<Option<Seen>, Error> {
        self.shared.validate(id)?;
        let shared = &self.shared;
        Ok(shared
            .lookup(&shared.relay, id, digest(id), now_ms)?
            .map(|(seen, _)| seen))
    }

    /// The prefilter's answer alone: `false` means certainly not live. For tests and diagnostics.
    ///
    /// # Errors
    ///
    /// A refused id.
    pub fn may_contain(&self, id: &[u8]) -> Result<bool, Error> {
        self.shared.validate(id)?;
        Ok(self
            .shared
            .relay
            .filters
            .read()
            .expect("filter lock")
            .contains(digest(id)))
    }

    /// Claims `id` with the store's window.
    ///
    /// # Errors
    ///
    /// A refused id, or a sled or record error (the id is then not held).
    pub fn claim(&self, id: &[u8], now_ms: u64) -> Result<Verdict, Error> {
        self.claim_with_ttl(id, Duration::from_millis(self.shared.ttl_ms), now_ms)
    }

    /// Claims `id`; when committed it stays a duplicate for `ttl`.
    ///
    /// # Errors
    ///
    /// As [`Store::claim`].
    pub fn claim_with_ttl(&self, id: &[u8], ttl: Duration, now_ms: u64) -> Result<Verdict, Error> {
        let shared = &self.shared;
        shared.validate(id)?;
        {
            let mut map = shared.in_flight.lock().expect("in-flight lock");
            if let Some(slot) = map.get_mut(id) {
                let tx = slot.get_or_insert_with(|| watch::channel(None).0);
                return Ok(Verdict::InFlight(Waiter { rx: tx.subscribe() }));
            }
            // Hold the id before looking it up, so a concurrent claimer waits for our verdict
            // instead of racing us to the same answer.
            map.insert(id.into(), None);
        }
        let claim = Claim {
            shared: shared.clone(),
            id: id.into(),
            digest: digest(id),
            ttl_ms: ttl.as_millis().max(1) as u64,
            settled: false,
            claimed_at: Instant::now(),
        };
        // On error `claim` drops here and releases the id.
        match shared.lookup(&shared.relay, id, claim.digest, now_ms)? {
            Some((seen, _)) => {
                let mut claim = claim;
                claim.settled = true;
                shared.settle(id, Settled::Committed);
                Ok(Verdict::Duplicate(seen))
            }
            None => Ok(Verdict::New(claim)),
        }
    }

    /// Records the claimed ids as seen at `now_ms`, durably: one sled flush covers the batch.
    /// When this returns `Ok`, every id survives a crash; waiters learn [`Settled::Committed`].
    ///
    /// Blocking (sled write and fsync): call it from a dedicated thread or `spawn_blocking`.
    ///
    /// # Errors
    ///
    /// A sled error, or [`Error::Closed`]. The claims are released then: none of them counts as
    /// recorded, so the caller must not ack their messages.
    pub fn commit(&self, claims: Vec<Claim>, now_ms: u64) -> Result<(), Error> {
        if claims.is_empty() {
            return Ok(());
        }
        let shared = &self.shared;
        let guard = shared.write_lock()?;
        // Filter first, sled second: an id may be in the filter and not yet on disk (a harmless
        // false positive), never the other way round.
        let mut rolled = false;
        {
            let mut filters = shared.relay.filters.write().expect("filter lock");
            for c in &claims {
                rolled |= filters.insert(c.digest, now_ms.saturating_add(c.ttl_ms));
            }
        }
        // Index entries grouped by expiry: with one window for all, one entry for the batch.
        let mut index: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
        let mut added = 0u64;
        for c in &claims {
            let seen = Seen {
                first_seen_ms: now_ms,
                expires_ms: now_ms.saturating_add(c.ttl_ms),
            };
            let previous = shared
                .relay
                .tree
                .insert(&*c.id, record::encode(seen))
                .map_err(shared.sled_err("commit"))?;
            added += u64::from(previous.is_none());
            record::push_index_id(index.entry(seen.expires_ms).or_default(), &c.id);
        }
        let earlier = shared
            .relay
            .write_index(&shared.db, index)
            .map_err(shared.sled_err("commit"))?;
        // The flush runs outside the lock, so writers that queue behind it share one.
        drop(guard);
        shared.make_durable("commit flush")?;

        shared.relay.live.fetch_add(added, Ordering::Relaxed);
        for mut c in claims {
            c.settled = true;
            shared.settle(&c.id, Settled::Committed);
        }
        if earlier || rolled {
            shared.wake_compactor();
        }
        Ok(())
    }

    /// As [`Store::commit`], and returns the batch as a log segment: self-contained and
    /// versioned (the ids and their windows), for the active instance to append to the
    /// replication stream and for standbys to [`Store::apply_logged`].
    ///
    /// # Errors
    ///
    /// As [`Store::commit`].
    pub fn commit_logged(&self, claims: Vec<Claim>, now_ms: u64) -> Result<Vec<u8>, Error> {
        let segment = log::encode(
            now_ms,
            claims.iter().map(|c| log::LogEntry {
                id: &c.id,
                ttl_ms: c.ttl_ms,
            }),
        );
        self.commit(claims, now_ms)?;
        Ok(segment)
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
        let (commit_ms, entries) = log::decode(segment)?;
        for e in &entries {
            self.shared.validate(e.id)?;
        }
        let shared = &self.shared;
        let guard = shared.write_lock()?;
        let mut index: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
        let mut applied = 0;
        let mut added = 0;
        let mut rolled = false;
        for e in &entries {
            let seen = Seen {
                first_seen_ms: commit_ms,
                expires_ms: commit_ms.saturating_add(e.ttl_ms),
            };
            if !seen.is_live(now_ms) {
                continue;
            }
            rolled |= shared
                .relay
                .filters
                .write()
                .expect("filter lock")
                .insert(digest(e.id), seen.expires_ms);
            let previous = shared
                .relay
                .tree
                .insert(e.id, record::encode(seen))
                .map_err(shared.sled_err("apply"))?;
            added += u64::from(previous.is_none());
            record::push_index_id(index.entry(seen.expires_ms).or_default(), e.id);
            applied += 1;
        }
        let earlier = shared
            .relay
            .write_index(&shared.db, index)
            .map_err(shared.sled_err("apply"))?;
        shared
            .meta
            .insert(APPLIED_OFFSET_KEY, &offset.to_be_bytes())
            .map_err(shared.sled_err("apply"))?;
        drop(guard);
        shared.make_durable("apply flush")?;
        shared.relay.live.fetch_add(added, Ordering::Relaxed);
        if earlier || rolled {
            shared.wake_compactor();
        }
        Ok(applied)
    }

    /// The stream offset of the last log segment applied by [`Store::apply_logged`], if any.
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

    /// Forgets every relay id (all become new), durable on return. Returns how many records
    /// there were. Claims in flight are not touched: their commits still record them.
    ///
    /// # Errors
    ///
    /// A sled error or [`Error::Closed`].
    pub fn forget_all(&self) -> Result<u64, Error> {
        let shared = &self.shared;
        let guard = shared.write_lock()?;
        let records = shared.relay.tree.len() as u64;
        shared
            .relay
            .tree
            .clear()
            .map_err(shared.sled_err("forget all"))?;
        shared
            .relay
            .expiry
            .clear()
            .map_err(shared.sled_err("forget all"))?;
        shared.relay.live.store(0, Ordering::Relaxed);
        drop(guard);
        shared.make_durable("forget all flush")?;
        tracing::info!(dir = %shared.dir.display(), forgotten = records, "forgot every relay id");
        Ok(records)
    }

    /// Forgets `id` (it becomes new). Returns whether a record was there. Durable on return.
    ///
    /// # Errors
    ///
    /// A refused id or a sled error.
    pub fn forget(&self, id: &[u8]) -> Result<bool, Error> {
        let shared = &self.shared;
        shared.validate(id)?;
        let removed = shared
            .relay
            .tree
            .remove(id)
            .map_err(shared.sled_err("forget"))?;
        shared.make_durable("forget flush")?;
        if removed.is_some() {
            shared.relay.live.fetch_sub(1, Ordering::Relaxed);
        }
        Ok(removed.is_some())
    }

    /// Deletes ids expired at `now_ms`, at most about `max_ids` of them (whole index entries), and
    /// drops Bloom generations that are all expired. Returns the number of ids deleted. The
    /// compactor calls this on its own; tests call it to sweep at a chosen time.
    ///
    /// # Errors
    ///
    /// A sled or record error.
    pub fn sweep(&self, now_ms: u64, max_ids: usize) -> Result<u64, Error> {
        let shared = &self.shared;
        Ok(compactor::sweep(shared, &shared.relay, now_ms, max_ids)?
            + compactor::sweep(shared, &shared.kv, now_ms, max_ids)?)
    }

    /// Rebuilds the Bloom filter from sled's live ids now (the compactor does it once a window).
    ///
    /// # Errors
    ///
    /// A sled or record error; the current filter then stays in place.
    pub fn rebuild_filter(&self, now_ms: u64) -> Result<(), Error> {
        let shared = &self.shared;
        compactor::rebuild(shared, &shared.relay, now_ms)?;
        compactor::rebuild(shared, &shared.kv, now_ms)
    }

    /// The key-value namespace the Redis endpoint serves (apart from the relay's ids).
    pub fn kv(&self) -> kv::Kv {
        kv::Kv::new(self.shared.clone())
    }

    /// Asks the compactor to look at the clock now rather than at its next deadline.
    pub fn wake_compactor(&self) {
        self.shared.wake_compactor();
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
            live_ids: shared.relay.live.load(Ordering::Relaxed),
            redis_keys: shared.kv.live.load(Ordering::Relaxed),
            in_flight: shared.in_flight.lock().expect("in-flight lock").len(),
            bloom_generations: generations,
            bloom_bytes,
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
            oldest_expiry_ms: first_due(&shared.relay.expiry).ok().flatten(),
            bloom_loaded_from: shared.origin,
        }
    }

    /// Closes the store cleanly: stops the compactor, refuses further commits, flushes, and
    /// persists the Bloom generations with a marker so the next open skips the rebuild. Other
    /// handles still alive get [`Error::Closed`] on commit.
    ///
    /// # Errors
    ///
    /// A sled or snapshot I/O error; the next open then rebuilds the filter, nothing is lost.
    pub fn close(self) -> Result<(), Error> {
        self.compactor.stop();
        let shared = &self.shared;
        let _guard = shared.commit_lock.lock().expect("commit lock");
        shared.closed.store(true, Ordering::SeqCst);
        shared.db.flush().map_err(shared.sled_err("close flush"))?;
        let token: [u8; 16] = rand::random();
        let space = |sp: &Space| SpaceSnapshot {
            live: sp.live.load(Ordering::Relaxed),
            filters: sp.filters.read().expect("filter lock").to_snapshot(),
        };
        let snapshot = Snapshot {
            version: SNAPSHOT_VERSION,
            token,
            spaces: vec![space(&shared.relay), space(&shared.kv)],
        };
        let path = shared.dir.join(SNAPSHOT_FILE);
        write_snapshot(&path, &snapshot).map_err(|source| Error::Snapshot {
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
        tracing::info!(dir = %shared.dir.display(), "store closed, bloom snapshot written");
        Ok(())
    }
}

/// How long `open` retries a held lock. sled finishes background I/O on its own threads, which
/// keep the lock file open for a moment after the previous holder in this process dropped it.
const LOCK_WAIT: Duration = Duration::from_secs(1);

/// Opens sled in the data dir, retrying a held lock for [`LOCK_WAIT`].
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

/// Expiry of the first index entry, if any.
pub(crate) fn first_due(expiry: &sled::Tree) -> sled::Result<Option<u64>> {
    Ok(expiry.first()?.map(|(k, _)| record::index_key_expiry(&k)))
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Snapshot {
    version: u32,
    token: [u8; 16],
    /// The relay's namespace, then the Redis endpoint's.
    spaces: Vec<SpaceSnapshot>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct SpaceSnapshot {
    live: u64,
    filters: FiltersSnapshot,
}

fn write_snapshot(path: &Path, snapshot: &Snapshot) -> std::io::Result<()> {
    let bytes = bincode::serde::encode_to_vec(snapshot, bincode::config::standard())
        .map_err(std::io::Error::other)?;
    let tmp = path.with_extension("tmp");
    let mut file = fs::File::create(&tmp)?;
    file.write_all(&bytes)?;
    file.sync_all()?;
    fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// The snapshot's filters and record counts (relay, then Redis keys), if the file exists,
/// decodes, and carries `token`.
fn load_snapshot(path: &Path, token: &[u8]) -> Option<[(Filters, u64); 2]> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(path = %path.display(), cause = %e, "bloom snapshot unreadable, rebuilding");
            return None;
        }
    };
    let decoded: Result<(Snapshot, usize), _> =
        bincode::serde::decode_from_slice(&bytes, bincode::config::standard());
    match decoded {
        Ok((snap, _)) if snap.version == SNAPSHOT_VERSION && snap.token[..] == *token => {
            let mut spaces = snap
                .spaces
                .into_iter()
                .map(|sp| Filters::from_snapshot(sp.filters).map(|f| (f, sp.live)));
            let relay = spaces.next()??;
            let kv = spaces.next()??;
            Some([relay, kv])
        }
        Ok(_) => {
            tracing::warn!(path = %path.display(), "bloom snapshot does not match the store, rebuilding");
            None
        }
        Err(e) => {
            tracing::warn!(path = %path.display(), cause = %e, "bloom snapshot corrupt, rebuilding");
            None
        }
    }
}

pub(crate) enum ScanError {
    Sled(sled::Error),
    Record(Error),
}

/// Scans every record into `fresh`, keeping the live ones; returns it with the record count.
/// Digests go straight into the filter (no list of ids in memory); should the live ids outgrow
/// `fresh`'s sizing, it rolls a generation and the next rebuild sizes from the count returned.
pub(crate) fn scan_live(
    ids: &sled::Tree,
    mut fresh: Filters,
    now_ms: u64,
) -> Result<(Filters, u64), ScanError> {
    let mut records = 0u64;
    for item in ids.iter() {
        let (k, v) = item.map_err(ScanError::Sled)?;
        records += 1;
        let seen = record::decode(&k, &v).map_err(ScanError::Record)?;
        if seen.is_live(now_ms) {
            fresh.insert(digest(&k), seen.expires_ms);
        }
    }
    Ok((fresh, records))
}

#[cfg(test)]
mod tests;
