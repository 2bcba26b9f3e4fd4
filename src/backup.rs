//! Online backup and restore: `dedupd backup <file|->` and `dedupd restore <file|-> --data-dir
//! <dir>`.
//!
//! A backup is [`Store::backup`]'s stream (a consistent point in time, taken while the relay
//! keeps recording ids; its format is the store's, versioned and documented in the README). With
//! the service running, the command asks its HTTP endpoint (`GET /backup`, behind the admin
//! token), which streams the bytes as they are produced; with no service answering, it opens the
//! data dir itself. Either way the file appears only once the whole backup is in it: bytes go to
//! `<file>.partial`, which is synced and renamed over `<file>` at the end, and removed on failure,
//! so a file named like a backup is a complete one.
//!
//! A restore writes a backup into an empty data dir ([`Store::restore`]), offline: start the
//! service on that dir afterwards.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::config::Config;
use crate::store::{BackupStats, Error as StoreError, Store};

/// Size of the pieces a backup is streamed in.
const CHUNK: usize = 256 * 1024;
/// Chunks buffered between the store's thread and the connection: a slow client slows the
/// backup down rather than filling memory.
const CHUNKS_IN_FLIGHT: usize = 4;
/// How long the command waits to connect, and for each read of the stream.
const HTTP_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a backup or a restore failed. Each says what failed, then why.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The service answered something else than a backup.
    #[error("backup through the dedupd endpoint at {addr} failed: {why}")]
    Http {
        /// `DEDUPD_METRICS_ADDR`.
        addr: SocketAddr,
        /// What went wrong.
        why: String,
    },
    /// Nothing answers on the endpoint and the data dir cannot be opened either.
    #[error("no dedupd answers on {addr} and the data dir cannot be opened directly: {source}")]
    Open {
        /// What was tried over HTTP (`off` if disabled).
        addr: String,
        /// Why opening the data dir failed.
        source: Box<StoreError>,
    },
    /// Nothing answers on the endpoint and there is no data dir to back up.
    #[error("no dedupd answers on {addr} and there is no data dir {} to back up", dir.display())]
    NoDataDir {
        /// What was tried over HTTP.
        addr: String,
        /// `DEDUPD_DATA_DIR`.
        dir: PathBuf,
    },
    /// The store failed while writing the backup.
    #[error("backup of {} failed: {source}", dir.display())]
    Backup {
        /// The data dir.
        dir: PathBuf,
        /// Why.
        source: Box<StoreError>,
    },
    /// The backup file could not be written.
    #[error("cannot write the backup to {}: {source}", path.display())]
    Output {
        /// The file (`-`: standard output).
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The backup file could not be read.
    #[error("cannot read the backup {}: {source}", path.display())]
    Input {
        /// The file (`-`: standard input).
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The restore's target already holds something.
    #[error("cannot restore into {}: the directory is not empty (restore only into an empty or new directory)", dir.display())]
    NotEmpty {
        /// `--data-dir`.
        dir: PathBuf,
    },
    /// The store refused or failed the restore.
    #[error("restore of {} into {} failed: {source}", from.display(), dir.display())]
    Restore {
        /// The backup file.
        from: PathBuf,
        /// `--data-dir`.
        dir: PathBuf,
        /// Why.
        source: Box<StoreError>,
    },
}

/// What a backup or restore did, for the command's one JSON line.
#[derive(Debug, Clone)]
pub struct Summary {
    /// Bytes of backup written or read.
    pub bytes: u64,
    /// How long it took.
    pub elapsed: Duration,
    /// The store's own account, when the store ran here (not over HTTP).
    pub stats: Option<BackupStats>,
}

impl Summary {
    /// The summary as JSON, with `what` (the file, the data dir) under `key`.
    pub fn to_json(&self, key: &str, what: &Path) -> Value {
        let secs = self.elapsed.as_secs_f64();
        let mut out = json!({
            key: what.display().to_string(),
            "bytes": self.bytes,
            "seconds": secs,
            "mib_per_second": self.bytes as f64 / (1 << 20) as f64 / secs.max(1e-9),
        });
        if let Some(stats) = &self.stats {
            out["store"] = stats_json(stats);
        }
        out
    }
}

/// `BackupStats` as JSON.
fn stats_json(stats: &BackupStats) -> Value {
    serde_json::to_value(stats).unwrap_or_else(|_| json!(format!("{stats:?}")))
}

// ---------------------------------------------------------------------------------------------
// Serving a backup: the store's blocking writer, streamed in chunks to an async connection.

/// A backup being taken on a blocking thread, its bytes arriving in chunks.
pub(crate) struct Streaming {
    chunks: mpsc::Receiver<Vec<u8>>,
    done: tokio::task::JoinHandle<Result<BackupStats, String>>,
}

impl Streaming {
    /// Starts a backup of `store` on the blocking pool.
    pub(crate) fn start(store: Store) -> Streaming {
        let (tx, chunks) = mpsc::channel(CHUNKS_IN_FLIGHT);
        let done = tokio::task::spawn_blocking(move || {
            let mut out = ChunkWriter {
                tx,
                buf: Vec::with_capacity(CHUNK),
            };
            let stats = store.backup(&mut out).map_err(|e| e.to_string())?;
            out.flush()
                .map_err(|e| format!("streaming the backup failed: {e}"))?;
            Ok(stats)
        });
        Streaming { chunks, done }
    }

    /// The next chunk, or `None` once the backup has written everything (or failed: see
    /// [`Streaming::finish`]).
    pub(crate) async fn next(&mut self) -> Option<Vec<u8>> {
        self.chunks.recv().await
    }

    /// The backup's outcome, once [`Streaming::next`] returned `None`. Dropping a `Streaming`
    /// instead stops the backup (its next write fails).
    pub(crate) async fn finish(self) -> Result<BackupStats, String> {
        drop(self.chunks);
        match self.done.await {
            Ok(result) => result,
            Err(e) => Err(format!("the backup thread failed: {e}")),
        }
    }
}

/// An [`io::Write`] handing its bytes, [`CHUNK`] at a time, to the async side. A closed
/// receiver (the client went away) is a broken pipe, which stops the store's backup.
struct ChunkWriter {
    tx: mpsc::Sender<Vec<u8>>,
    buf: Vec<u8>,
}

impl ChunkWriter {
    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        self.tx
            .blocking_send(chunk)
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "backup client went away"))
    }
}

impl Write for ChunkWriter {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(bytes);
        if self.buf.len() >= CHUNK {
            self.send()?;
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send()
    }
}

// ---------------------------------------------------------------------------------------------
// The commands.

/// Where a backup goes: a file (written as `<file>.partial`, renamed when complete) or stdout.
enum Output {
    File {
        file: File,
        partial: PathBuf,
        path: PathBuf,
    },
    Stdout(io::Stdout),
}

impl Output {
    fn create(target: &Path) -> Result<Output, Error> {
        if target == Path::new("-") {
            return Ok(Output::Stdout(io::stdout()));
        }
        let mut partial = target.as_os_str().to_owned();
        partial.push(".partial");
        let partial = PathBuf::from(partial);
        let file = File::create(&partial).map_err(|source| Error::Output {
            path: partial.clone(),
            source,
        })?;
        Ok(Output::File {
            file,
            partial,
            path: target.to_path_buf(),
        })
    }

    fn writer(&mut self) -> &mut dyn Write {
        match self {
            Output::File { file, .. } => file,
            Output::Stdout(out) => out,
        }
    }

    /// Makes the backup durable and visible under its name.
    fn commit(self) -> io::Result<()> {
        match self {
            Output::File {
                file,
                partial,
                path,
            } => {
                file.sync_all()?;
                drop(file);
                std::fs::rename(&partial, &path)?;
                // The rename itself must survive a crash.
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    File::open(dir)?.sync_all()?;
                }
                Ok(())
            }
            Output::Stdout(mut out) => out.flush(),
        }
    }

    /// Leaves no partial file behind.
    fn abandon(self) {
        if let Output::File { file, partial, .. } = self {
            drop(file);
            let _ = std::fs::remove_file(partial);
        }
    }
}

/// Counts what goes through a writer.
struct Counting<'a> {
    inner: &'a mut dyn Write,
    bytes: u64,
}

impl Write for Counting<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// `dedupd backup <target>`: from the running service, or from the data dir when no service
/// answers. `target` is a file path or `-` (standard output).
///
/// # Errors
///
/// See [`Error`]; the target file does not exist then.
pub fn backup(config: &Config, target: &Path) -> Result<Summary, Error> {
    let started = Instant::now();
    let mut out = Output::create(target)?;
    let result = take_backup(config, target, out.writer());
    let result = result.map(|(bytes, stats)| Summary {
        bytes,
        elapsed: started.elapsed(),
        stats,
    });
    match result {
        Ok(summary) => {
            out.commit().map_err(|source| Error::Output {
                path: target.to_path_buf(),
                source,
            })?;
            Ok(summary)
        }
        Err(e) => {
            out.abandon();
            Err(e)
        }
    }
}

/// Writes the backup to `out`: bytes written, and the store's stats when taken here.
fn take_backup(
    config: &Config,
    target: &Path,
    out: &mut dyn Write,
) -> Result<(u64, Option<BackupStats>), Error> {
    if let Some(addr) = config.http.addr {
        match over_http(addr, config.http.admin_token.as_deref(), out) {
            Ok(bytes) => return Ok((bytes, None)),
            Err(HttpFailure::NoService) => {}
            Err(HttpFailure::Output(source)) => {
                return Err(Error::Output {
                    path: target.to_path_buf(),
                    source,
                })
            }
            Err(HttpFailure::Bad(why)) => return Err(Error::Http { addr, why }),
        }
    }
    let tried = config
        .http
        .addr
        .map_or_else(|| "DEDUPD_METRICS_ADDR=off".into(), |a| a.to_string());
    if !config.store.data_dir.is_dir() {
        return Err(Error::NoDataDir {
            addr: tried,
            dir: config.store.data_dir.clone(),
        });
    }
    let store = Store::open(config.store_config()).map_err(|source| Error::Open {
        addr: tried,
        source: Box::new(source),
    })?;
    let mut counting = Counting {
        inner: out,
        bytes: 0,
    };
    let result = store.backup(&mut counting);
    let bytes = counting.bytes;
    if let Err(e) = store.close() {
        tracing::warn!(cause = %e, "closing the store after the backup failed");
    }
    let stats = result.map_err(|source| Error::Backup {
        dir: config.store.data_dir.clone(),
        source: Box::new(source),
    })?;
    Ok((bytes, Some(stats)))
}

/// `dedupd restore <source> --data-dir <dir>`: the backup in `source` (a file, or `-` for
/// standard input) into the empty or new directory `dir`, with the store settings of `config`.
///
/// # Errors
///
/// See [`Error`]; `dir` is not made usable by a failed restore (remove it and try again).
pub fn restore(config: &Config, source: &Path, dir: &Path) -> Result<Summary, Error> {
    let started = Instant::now();
    let not_empty = std::fs::read_dir(dir).is_ok_and(|mut entries| entries.next().is_some());
    if not_empty {
        return Err(Error::NotEmpty {
            dir: dir.to_path_buf(),
        });
    }
    let mut input: Box<dyn Read> = if source == Path::new("-") {
        Box::new(io::stdin().lock())
    } else {
        Box::new(File::open(source).map_err(|e| Error::Input {
            path: source.to_path_buf(),
            source: e,
        })?)
    };
    let mut counting = CountingRead {
        inner: &mut *input,
        bytes: 0,
    };
    let mut store_config = config.store_config();
    store_config.dir = dir.to_path_buf();
    let stats = Store::restore(&mut counting, store_config).map_err(|e| Error::Restore {
        from: source.to_path_buf(),
        dir: dir.to_path_buf(),
        source: Box::new(e),
    })?;
    Ok(Summary {
        bytes: counting.bytes,
        elapsed: started.elapsed(),
        stats: Some(stats),
    })
}

/// Counts what is read through a reader.
struct CountingRead<'a> {
    inner: &'a mut dyn Read,
    bytes: u64,
}

impl Read for CountingRead<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }
}

/// Why [`over_http`] got no backup.
enum HttpFailure {
    /// Nothing listens on the address.
    NoService,
    /// Writing the bytes received failed.
    Output(io::Error),
    /// Something answered, but not a complete backup.
    Bad(String),
}

/// `GET /backup` from the service at `addr`, its chunked body decoded into `out`: the bytes
/// written. A stream that ends before its last (empty) chunk is an error, never a short backup.
fn over_http(
    addr: SocketAddr,
    token: Option<&str>,
    out: &mut dyn Write,
) -> Result<u64, HttpFailure> {
    let stream =
        TcpStream::connect_timeout(&addr, HTTP_TIMEOUT).map_err(|_| HttpFailure::NoService)?;
    let bad = |e: io::Error| HttpFailure::Bad(e.to_string());
    stream.set_read_timeout(Some(HTTP_TIMEOUT)).map_err(bad)?;
    stream.set_write_timeout(Some(HTTP_TIMEOUT)).map_err(bad)?;
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    (&stream)
        .write_all(
            format!("GET /backup HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n")
                .as_bytes(),
        )
        .map_err(bad)?;
    let mut reader = BufReader::with_capacity(CHUNK, stream);
    let status_line = read_line(&mut reader).map_err(bad)?;
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| HttpFailure::Bad(format!("bad status line {status_line:?}")))?;
    let mut chunked = false;
    loop {
        let line = read_line(&mut reader).map_err(bad)?;
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = value.trim().eq_ignore_ascii_case("chunked");
            }
        }
    }
    if status != 200 {
        let mut body = String::new();
        let _ = reader.read_to_string(&mut body);
        let why = serde_json::from_str::<Value>(&body)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_string))
            .unwrap_or(body);
        return Err(HttpFailure::Bad(format!("status {status}: {}", why.trim())));
    }
    if !chunked {
        return Err(HttpFailure::Bad(
            "the answer is not a chunked stream".into(),
        ));
    }
    let mut bytes = 0u64;
    let mut buf = vec![0u8; CHUNK];
    loop {
        let size_line = read_line(&mut reader).map_err(|e| incomplete(bytes, e))?;
        let size_text = size_line.split(';').next().unwrap_or("").trim();
        let mut left = usize::from_str_radix(size_text, 16)
            .map_err(|_| HttpFailure::Bad(format!("bad chunk size {size_line:?}")))?;
        if left == 0 {
            // The last chunk: the backup is whole.
            return Ok(bytes);
        }
        while left > 0 {
            let want = left.min(buf.len());
            reader
                .read_exact(&mut buf[..want])
                .map_err(|e| incomplete(bytes, e))?;
            out.write_all(&buf[..want]).map_err(HttpFailure::Output)?;
            left -= want;
            bytes += want as u64;
        }
        let end = read_line(&mut reader).map_err(|e| incomplete(bytes, e))?;
        if !end.is_empty() {
            return Err(HttpFailure::Bad("malformed chunk".into()));
        }
    }
}

/// The error for a stream cut before its end.
fn incomplete(bytes: u64, e: io::Error) -> HttpFailure {
    HttpFailure::Bad(format!(
        "the stream ended after {bytes} bytes, before the backup was complete ({e}); \
         the service's log says why"
    ))
}

/// One line without its CRLF; an error at the end of the stream.
fn read_line(reader: &mut impl BufRead) -> io::Result<String> {
    let mut line = Vec::new();
    reader.read_until(b'\n', &mut line)?;
    if !line.ends_with(b"\n") {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed",
        ));
    }
    line.pop();
    if line.ends_with(b"\r") {
        line.pop();
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::TcpListener;

    use super::*;

    /// Serves one connection with `answer`, after reading the request head.
    fn serve_once(answer: &'static [u8]) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).unwrap() == 1 {
                head.push(byte[0]);
            }
            stream.write_all(answer).unwrap();
        });
        addr
    }

    fn backup_from(answer: &'static [u8]) -> (Result<Summary, Error>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let addr = serve_once(answer).to_string();
        let data = dir.path().join("data");
        let config = Config::from_vars([
            ("DEDUPD_METRICS_ADDR", addr.as_str()),
            ("DEDUPD_DATA_DIR", data.to_str().unwrap()),
        ])
        .unwrap();
        (backup(&config, &dir.path().join("b")), dir)
    }

    const HEAD: &str = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";

    #[test]
    fn a_whole_stream_becomes_the_file() {
        let answer = format!("{HEAD}5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n").leak();
        let (result, dir) = backup_from(answer.as_bytes());
        assert_eq!(result.unwrap().bytes, 11);
        assert_eq!(std::fs::read(dir.path().join("b")).unwrap(), b"hello world");
        assert!(!dir.path().join("b.partial").exists());
    }

    #[test]
    fn a_cut_stream_leaves_no_file() {
        // No last chunk: the service failed half-way, or the connection broke.
        let answer = format!("{HEAD}5\r\nhello\r\n").leak();
        let (result, dir) = backup_from(answer.as_bytes());
        let line = result.unwrap_err().to_string();
        assert!(line.contains("after 5 bytes"), "{line}");
        assert!(!dir.path().join("b").exists());
        assert!(!dir.path().join("b.partial").exists());
        // Cut inside a chunk, too.
        let answer = format!("{HEAD}a\r\nhello").leak();
        let (result, dir) = backup_from(answer.as_bytes());
        assert!(result.is_err());
        assert!(!dir.path().join("b").exists());
    }

    #[test]
    fn a_refusal_is_one_line_naming_the_status() {
        let answer = b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 58\r\n\r\n\
            {\"error\":\"a valid Authorization: Bearer token is required\"}";
        let (result, dir) = backup_from(answer);
        let line = result.unwrap_err().to_string();
        assert!(line.contains("401") && line.contains("Bearer"), "{line}");
        assert!(!line.contains('\n'));
        assert!(!dir.path().join("b").exists());
    }
}
