//! The Redis-protocol endpoint: the store's key-value namespace behind Redis' wire protocol, so
//! a consumer's `SET msg:<id> 1 NX EX <ttl>` keeps working with dedupd in place of Redis.
//!
//! - [`resp`]: requests in (multibulk and inline) and replies out (RESP2 or RESP3);
//! - [`command`]: the commands, with Redis' own arities and error texts;
//! - [`info`]: the `INFO` text;
//! - [`glob`]: `SCAN ... MATCH` patterns;
//!
//! Each connection reads what the client sent, parses every complete request in it (a pipeline
//! arrives as one read), runs them in order, and writes all their replies in one write. A batch
//! that touches the store goes to the endpoint's [`writer`] thread, which runs every batch queued
//! by then, from all connections, as one store transaction, and its replies come back once the
//! group flush covering them is done: a write's `+OK` leaves only after its fsync, while other
//! connections go on. A lone client's next requests the writer may read itself, with the
//! connection's read state (its [`Inbox`]) handed over with the batch and back.

mod command;
mod glob;
mod info;
pub(crate) mod resp;
mod script;
mod writer;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use crate::config::{Config, Secret};
use crate::shutdown::Shutdown;
use crate::store::kv::Kv;
use crate::store::{Clock, Store};
use command::Flow;
use resp::{Parser, Reply, Request};

/// The Redis version `HELLO` and `INFO` claim: the command set and replies follow Redis 7.0.
pub(crate) const REDIS_VERSION: &str = "7.0.0";
/// Most requests run as one batch; the rest of a longer pipeline waits for the next round.
const MAX_BATCH: usize = 1024;
/// Read buffer grown by this much when it runs out.
const READ_CHUNK: usize = 16 * 1024;
/// How long open connections get to finish their current batch at shutdown.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// SCAN cursors remembered; the oldest is forgotten beyond this.
const MAX_CURSORS: usize = 10_000;

/// How the endpoint is set up (from `DEDUPD_REDIS_*`).
#[derive(Clone)]
pub struct Settings {
    /// Password clients must give (`AUTH` or `HELLO 3 AUTH default <pw>`); `None`: no auth.
    pub password: Option<Secret>,
    /// Most connections at once; more are answered `ERR max number of clients reached`.
    pub max_clients: usize,
    /// Longest argument (key or value) accepted; longer ones get an error reply.
    pub max_value_bytes: usize,
    /// Longest a Lua script may run before it is killed (and its writes undone).
    pub script_timeout: Duration,
    /// What "now" is for expiries: the service's clock.
    pub clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the password itself.
        f.debug_struct("Settings")
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("max_clients", &self.max_clients)
            .field("max_value_bytes", &self.max_value_bytes)
            .field("script_timeout", &self.script_timeout)
            .field("clock", &self.clock)
            .finish()
    }
}

/// State shared by the endpoint's connections.
pub(crate) struct Server {
    /// The store's key-value namespace.
    kv: Kv,
    /// The store, for `INFO`'s figures.
    store: Store,
    /// The password clients must give; `None`: no auth.
    password: Option<Secret>,
    /// See [`Settings::max_clients`].
    max_clients: usize,
    /// See [`Settings::max_value_bytes`].
    max_value_bytes: usize,
    /// Port listened on, for `INFO`.
    port: u16,
    /// When the endpoint started, for `INFO`.
    started: Instant,
    /// Connections open now.
    clients: AtomicUsize,
    /// Next `CLIENT ID`.
    next_id: AtomicU64,
    /// Totals for `INFO stats`.
    counters: Counters,
    /// SCAN cursors handed out.
    cursors: Cursors,
    /// The Lua VM and its script cache.
    scripts: script::Scripts,
    /// Batches that touch the store go here (see [`writer`]).
    writer: std::sync::mpsc::Sender<writer::Job>,
    /// What "now" is for expiries.
    clock: Arc<dyn Clock>,
}

impl Server {
    /// Whether `user` (default `default`) and `pass` are accepted. Without a configured
    /// password the `default` user takes any password, as Redis' `nopass` default user does.
    fn check_password(&self, user: Option<&Vec<u8>>, pass: &[u8]) -> bool {
        if user.is_some_and(|u| u.as_slice() != b"default") {
            return false;
        }
        let Some(want) = &self.password else {
            return true;
        };
        want.matches(pass)
    }
}

/// Totals for `INFO stats`.
#[derive(Default)]
struct Counters {
    connections: AtomicU64,
    commands: AtomicU64,
    rejected: AtomicU64,
}

impl Counters {
    fn commands(&self, n: u64) {
        self.commands.fetch_add(n, Ordering::Relaxed);
    }
}

/// Cursor → key to resume after, and the cursors in the order given (oldest first).
type CursorTable = (HashMap<u64, Vec<u8>>, VecDeque<u64>);

/// SCAN cursors: Redis clients expect a number, the store resumes after a key, so each cursor
/// given out maps to the key it resumes after. Shared by all connections, so a cursor stays good
/// on another connection; bounded, oldest forgotten first.
#[derive(Default)]
struct Cursors {
    /// Cursor → key to resume after, and the cursors in the order given (oldest first).
    inner: Mutex<CursorTable>,
}

impl Cursors {
    /// A new cursor resuming after `key`.
    fn issue(&self, key: Vec<u8>) -> u64 {
        let mut guard = self.inner.lock().expect("cursor lock");
        let (map, order) = &mut *guard;
        let mut id = rand::random::<u64>() >> 1; // positive when printed as a signed number
        while id == 0 || map.contains_key(&id) {
            id = rand::random::<u64>() >> 1;
        }
        map.insert(id, key);
        order.push_back(id);
        while order.len() > MAX_CURSORS {
            if let Some(old) = order.pop_front() {
                map.remove(&old);
            }
        }
        id
    }

    /// The key cursor `id` resumes after.
    fn resume(&self, id: u64) -> Option<Vec<u8>> {
        self.inner.lock().expect("cursor lock").0.get(&id).cloned()
    }
}

/// One connection's state.
#[derive(Debug, Default)]
pub(crate) struct Client {
    /// `CLIENT ID`.
    id: u64,
    /// Protocol version of the replies: 2 until `HELLO 3`.
    proto: u8,
    /// Whether commands other than AUTH/HELLO/QUIT may run.
    authenticated: bool,
    /// `CLIENT SETNAME`.
    name: Option<Vec<u8>>,
    /// `CLIENT SETINFO LIB-NAME`.
    lib_name: Option<Vec<u8>>,
    /// `CLIENT SETINFO LIB-VER`.
    lib_ver: Option<Vec<u8>>,
}

/// Binds `addr` and returns the endpoint serving on it, with the settings of `config`, until
/// `shutdown` fires; it ends once open connections have finished.
///
/// # Errors
///
/// The address cannot be bound.
pub(crate) async fn bind(
    addr: SocketAddr,
    config: &Config,
    store: &Store,
    clock: Arc<dyn Clock>,
    shutdown: Shutdown,
) -> std::io::Result<impl std::future::Future<Output = ()>> {
    let listener = TcpListener::bind(addr).await?;
    let settings = Settings {
        password: config.redis.password.clone(),
        max_clients: config.redis.max_clients.get(),
        max_value_bytes: usize::try_from(config.redis.max_value).unwrap_or(usize::MAX),
        script_timeout: config.redis.script_timeout,
        clock,
    };
    tracing::info!(
        %addr,
        auth = settings.password.is_some(),
        window = ?config.store.ttl,
        "serving Redis clients"
    );
    Ok(serve(listener, store.clone(), settings, shutdown))
}

/// Serves the endpoint on `listener` until `shutdown` fires, then lets open connections finish
/// their current batch (up to a few seconds) and returns.
pub(crate) async fn serve(
    listener: TcpListener,
    store: Store,
    settings: Settings,
    mut shutdown: Shutdown,
) {
    let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
    let server = Arc::new(Server {
        kv: store.kv(),
        store,
        password: settings.password.clone(),
        max_clients: settings.max_clients,
        max_value_bytes: settings.max_value_bytes,
        port,
        started: Instant::now(),
        clients: AtomicUsize::new(0),
        next_id: AtomicU64::new(1),
        counters: Counters::default(),
        cursors: Cursors::default(),
        scripts: script::Scripts::new(settings.script_timeout),
        writer: writer::start(),
        clock: settings.clock.clone(),
    });
    // Each connection holds a sender; once all are dropped, `recv` returns `None`.
    let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.fired() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: say so, back off, keep serving.
                    tracing::warn!(cause = %e, "redis endpoint accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        server.counters.connections.fetch_add(1, Ordering::Relaxed);
        let server = server.clone();
        let stop = shutdown.clone();
        let done = done_tx.clone();
        tokio::spawn(async move {
            connection(stream, peer, server, stop).await;
            drop(done);
        });
    }
    drop(done_tx);
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, done_rx.recv()).await;
}

/// Runs one client connection to its end (QUIT, EOF, protocol error, I/O error or shutdown).
async fn connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    server: Arc<Server>,
    mut shutdown: Shutdown,
) {
    let _ = stream.set_nodelay(true);
    if server.clients.fetch_add(1, Ordering::SeqCst) >= server.max_clients {
        server.clients.fetch_sub(1, Ordering::SeqCst);
        server.counters.rejected.fetch_add(1, Ordering::Relaxed);
        let _ = stream
            .write_all(b"-ERR max number of clients reached\r\n")
            .await;
        return;
    }
    let mut client = Client {
        id: server.next_id.fetch_add(1, Ordering::Relaxed),
        proto: 2,
        authenticated: server.password.is_none(),
        name: None,
        lib_name: None,
        lib_ver: None,
    };
    // Shared with the writer's threads, which send a batch's replies themselves once durable.
    let stream = Arc::new(stream);
    match serve_client(&stream, &server, &mut client, &mut shutdown).await {
        Ok(()) => {}
        Err(e) => tracing::debug!(%peer, cause = %e, "redis client connection ended"),
    }
    server.clients.fetch_sub(1, Ordering::SeqCst);
}

/// What a connection has read and not yet run: the parser's state and the bytes after it. It
/// goes with a batch to the [`writer`], which may read the client's next requests into it
/// itself, and comes back with the replies.
pub(crate) struct Inbox {
    parser: Parser,
    buf: Vec<u8>,
    /// The client's batches the writer lets go by before it waits on the socket again.
    skip_waits: u32,
    /// What `skip_waits` is set to after the next wait that finds nothing (doubling).
    backoff: u32,
}

/// What [`Inbox::take_for_writer`] found.
pub(crate) enum Taken {
    /// A batch for the writer, taken out of the inbox.
    Batch(Vec<Request>),
    /// No complete request yet.
    Partial,
    /// Requests the connection's task must run itself, or a malformed one: left in the inbox.
    Other,
}

impl Inbox {
    fn new(max_arg: usize) -> Inbox {
        Inbox {
            parser: Parser::new(max_arg),
            // Sized by `reserve` before the first read.
            buf: Vec::new(),
            skip_waits: 0,
            backoff: 0,
        }
    }

    /// Every complete request already read, up to a batch, and the protocol error met after
    /// them if any.
    fn take_batch(&mut self) -> (Vec<Request>, Option<resp::ProtocolError>) {
        let (batch, broken, pos) = self.parse();
        self.buf.drain(..pos);
        (batch, broken)
    }

    /// As [`Inbox::take_batch`], but takes the batch only if it is the writer's to run; anything
    /// else stays as it was, for the connection's task.
    pub(crate) fn take_for_writer(&mut self) -> Taken {
        let before = self.parser.clone();
        let (batch, broken, pos) = self.parse();
        if broken.is_some() || (!batch.is_empty() && route(&batch) != Route::Writer) {
            self.parser = before;
            return Taken::Other;
        }
        self.buf.drain(..pos);
        if batch.is_empty() {
            Taken::Partial
        } else {
            Taken::Batch(batch)
        }
    }

    /// Parses up to a batch of requests from the buffer; returns them, the error that stopped
    /// the parse if any, and how many bytes were consumed.
    fn parse(&mut self) -> (Vec<Request>, Option<resp::ProtocolError>, usize) {
        let mut batch = Vec::new();
        let mut pos = 0;
        while batch.len() < MAX_BATCH {
            match self.parser.next(&self.buf, &mut pos) {
                Ok(Some(request)) => batch.push(request),
                Ok(None) => break,
                Err(e) => return (batch, Some(e), pos),
            }
        }
        (batch, None, pos)
    }

    /// Makes room for the next read.
    fn reserve(&mut self) {
        if self.buf.capacity() - self.buf.len() < READ_CHUNK / 4 {
            self.buf.reserve(READ_CHUNK);
        }
    }
}

async fn serve_client(
    stream: &Arc<TcpStream>,
    server: &Arc<Server>,
    client: &mut Client,
    shutdown: &mut Shutdown,
) -> std::io::Result<()> {
    let mut inbox = Inbox::new(server.max_value_bytes);
    let mut out: Vec<u8> = Vec::with_capacity(READ_CHUNK);
    loop {
        let (batch, broken) = inbox.take_batch();
        let ran = !batch.is_empty();
        if ran {
            let flow;
            (flow, out) = run_batch(server, client, stream, &mut inbox, batch, out).await;
            write_all(stream, &out).await?;
            out.clear();
            if flow == Flow::Close {
                return Ok(());
            }
        }
        if let Some(e) = broken {
            let reply = Reply::err(format!("Protocol error: {}", e.0));
            reply.encode(client.proto, &mut out);
            write_all(stream, &out).await?;
            tracing::debug!(
                reason = e.0,
                "redis client sent a malformed request, closing"
            );
            return Ok(());
        }
        if ran {
            // More complete requests may be waiting in the inbox: past a full batch, or read
            // by the writer while it kept the client.
            continue;
        }
        inbox.reserve();
        let n = tokio::select! {
            _ = shutdown.fired() => return Ok(()),
            n = read_buf(stream, &mut inbox.buf) => n?,
        };
        if n == 0 {
            return Ok(());
        }
    }
}

/// Reads what the client sent into `buf`; `Ok(0)` at its end. (On a shared stream: the
/// writer's threads write replies to it, see [`writer`].)
async fn read_buf(stream: &TcpStream, buf: &mut Vec<u8>) -> std::io::Result<usize> {
    loop {
        stream.readable().await?;
        match stream.try_read_buf(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            read => return read,
        }
    }
}

/// Writes all of `bytes` to the client.
async fn write_all(stream: &TcpStream, mut bytes: &[u8]) -> std::io::Result<()> {
    while !bytes.is_empty() {
        stream.writable().await?;
        match stream.try_write(bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Where a batch runs.
#[derive(PartialEq)]
enum Route {
    /// None of its requests touches the store: on the connection's task.
    Inline,
    /// `SCRIPT ...` alone (`KILL` above all), which must not wait for the store's lock: the
    /// script it stops may hold it. On a blocking thread, outside any transaction.
    ScriptAdmin,
    /// In the writer's next round.
    Writer,
}

fn route(batch: &[Request]) -> Route {
    let on_store = batch.iter().any(|r| match r {
        Request::Args(args) => command::lookup(&args[0]).is_some_and(|s| s.store),
        Request::Oversize(_) => false,
    });
    if !on_store {
        Route::Inline
    } else if batch.iter().all(is_script_admin) {
        Route::ScriptAdmin
    } else {
        Route::Writer
    }
}

/// Runs a batch of requests in order, appending their replies to `out`: on the writer thread
/// when any of them touches the store, on a blocking thread for `SCRIPT` alone, inline
/// otherwise. Replies the writer already sent to `stream` are not in the `out` returned. The
/// `inbox` goes with a batch to the writer and comes back with what it read meanwhile.
async fn run_batch(
    server: &Arc<Server>,
    client: &mut Client,
    stream: &Arc<TcpStream>,
    inbox: &mut Inbox,
    batch: Vec<Request>,
    out: Vec<u8>,
) -> (Flow, Vec<u8>) {
    let route = route(&batch);
    if route == Route::Inline {
        let mut out = out;
        let flow = run_all(server, client, &batch, &mut out, &mut &server.kv);
        return (flow, out);
    }
    if route == Route::ScriptAdmin {
        let server = server.clone();
        let mut moved = std::mem::take(client);
        let (moved, flow, out) = tokio::task::spawn_blocking(move || {
            let mut out = out;
            let mut flow = run_all(&server, &mut moved, &batch, &mut out, &mut &server.kv);
            if let Err(e) = server.kv.wait_durable(server.kv.last_ticket()) {
                out.clear();
                Reply::err(format!("the store could not make the writes durable: {e}"))
                    .encode(moved.proto, &mut out);
                flow = Flow::Close;
            }
            (moved, flow, out)
        })
        .await
        .expect("a redis command does not panic");
        *client = moved;
        return (flow, out);
    }
    // The writer runs the batch inside one store transaction with the other connections'
    // batches of its round: their writes go to disk as one segment, and one group flush
    // (shared with every other writer of the store) makes them durable before any of the
    // replies comes back. That also holds back a read of another connection's write until that
    // write is durable.
    let (done, replies) = tokio::sync::oneshot::channel();
    let job = writer::Job {
        server: server.clone(),
        client: std::mem::take(client),
        stream: stream.clone(),
        inbox: std::mem::replace(inbox, Inbox::new(0)),
        kept: 0,
        batch,
        out,
        done,
    };
    if server.writer.send(job).is_err() {
        return (Flow::Close, Vec::new());
    }
    match replies.await {
        Ok((moved, flow, out, read)) => {
            *client = moved;
            *inbox = read;
            (flow, out)
        }
        // The writer is gone (a panic in a command): nothing to answer with.
        Err(_) => (Flow::Close, Vec::new()),
    }
}

/// Whether a request is `SCRIPT ...`, which touches the script cache, not the keys.
fn is_script_admin(request: &Request) -> bool {
    matches!(request, Request::Args(args) if args[0].eq_ignore_ascii_case(b"script"))
}

fn run_all(
    server: &Server,
    client: &mut Client,
    batch: &[Request],
    out: &mut Vec<u8>,
    keys: &mut dyn command::Keys,
) -> Flow {
    for request in batch {
        let (reply, flow) = match request {
            Request::Args(args) => command::execute(server, client, args, keys),
            Request::Oversize(len) => (
                Reply::err(format!(
                    "argument of {len} bytes is over the limit of {} bytes (DEDUPD_REDIS_MAX_VALUE)",
                    server.max_value_bytes
                )),
                Flow::Continue,
            ),
        };
        reply.encode(client.proto, out);
        if flow == Flow::Close {
            return Flow::Close;
        }
    }
    Flow::Continue
}
