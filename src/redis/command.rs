//! The commands: arity and argument checks with Redis' own error texts, then the work, on the
//! store's key-value namespace.
//!
//! [`execute`] is synchronous and may block on the store (a write returns once it is durable):
//! the connection runs it on a blocking thread whenever a batch holds a store command.

use std::fmt::Write as _;

use super::glob;
use super::resp::{parse_i64, Reply};
use super::script::Outcome;
use super::{Client, Server};
use crate::store::kv::{Condition, Entry, Expiry, Kv, Savepoint, SetOutcome, Txn, Write};
use crate::store::Error as StoreError;

/// Where a command reads and writes its keys: the store itself (each call atomic on its own,
/// durable once the batch's last ticket is waited for) or a script's transaction.
pub(crate) trait Keys {
    /// As [`Kv::get`].
    fn get(&mut self, key: &[u8], now_ms: u64) -> Result<Option<Entry>, StoreError>;
    /// As [`Kv::set`], without waiting for durability.
    fn set(&mut self, write: Write<'_>, now_ms: u64) -> Result<SetOutcome, StoreError>;
    /// As [`Kv::delete`], without waiting for durability.
    fn delete(&mut self, key: &[u8], now_ms: u64) -> Result<bool, StoreError>;
    /// As [`Kv::expire`], without waiting for durability.
    fn expire(&mut self, key: &[u8], expiry: Expiry, now_ms: u64) -> Result<bool, StoreError>;
    /// Runs `f` on a transaction: the store's write lock held throughout, its writes undoable
    /// with [`Txn::rollback_to`]. Already in one: `f` runs on it.
    ///
    /// # Errors
    ///
    /// The store is closed (`f` did not run).
    fn atomically(&mut self, f: &mut dyn FnMut(&mut Txn<'_>)) -> Result<(), StoreError>;
}

/// A pipelined batch's or script's transaction.
impl Keys for Txn<'_> {
    fn get(&mut self, key: &[u8], now_ms: u64) -> Result<Option<Entry>, StoreError> {
        Txn::get(self, key, now_ms)
    }

    fn set(&mut self, w: Write<'_>, now_ms: u64) -> Result<SetOutcome, StoreError> {
        Txn::set(self, w, now_ms)
    }

    fn delete(&mut self, key: &[u8], now_ms: u64) -> Result<bool, StoreError> {
        Txn::delete(self, key, now_ms)
    }

    fn expire(&mut self, key: &[u8], expiry: Expiry, now_ms: u64) -> Result<bool, StoreError> {
        Txn::expire(self, key, expiry, now_ms)
    }

    fn atomically(&mut self, f: &mut dyn FnMut(&mut Txn<'_>)) -> Result<(), StoreError> {
        f(self);
        Ok(())
    }
}

/// The store itself: the caller waits for [`Kv::last_ticket`] before replying.
impl Keys for &Kv {
    fn get(&mut self, key: &[u8], now_ms: u64) -> Result<Option<Entry>, StoreError> {
        Kv::get(self, key, now_ms)
    }

    // Each write is a batch of its own; its ticket is covered by the last ticket the caller
    // waits for.
    fn set(&mut self, w: Write<'_>, now_ms: u64) -> Result<SetOutcome, StoreError> {
        self.batch(|tx| Keys::set(tx, w, now_ms))?.0
    }

    fn delete(&mut self, key: &[u8], now_ms: u64) -> Result<bool, StoreError> {
        self.batch(|tx| tx.delete(key, now_ms))?.0
    }

    fn expire(&mut self, key: &[u8], expiry: Expiry, now_ms: u64) -> Result<bool, StoreError> {
        self.batch(|tx| tx.expire(key, expiry, now_ms))?.0
    }

    fn atomically(&mut self, f: &mut dyn FnMut(&mut Txn<'_>)) -> Result<(), StoreError> {
        // The batch's ticket is covered by the last ticket the caller waits for.
        let ((), _ticket) = self.batch(|tx| f(tx))?;
        Ok(())
    }
}

/// What the connection does after a command.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Flow {
    /// Go on reading.
    Continue,
    /// Send the replies so far and close (`QUIT`).
    Close,
}

/// One command the endpoint knows.
#[derive(Debug)]
pub(crate) struct Spec {
    /// Lowercase name, as in Redis' command table.
    pub(crate) name: &'static str,
    /// Redis' arity: `n` exactly n arguments (name included), `-n` at least n.
    pub(crate) arity: i64,
    /// Runs on the store (blocking), so the batch goes to a blocking thread.
    pub(crate) store: bool,
    /// Command flags as `COMMAND INFO` lists them.
    pub(crate) flags: &'static [&'static str],
    /// First key argument, last (-1: the last argument), step; 0 0 0 for none.
    pub(crate) keys: (i64, i64, i64),
    /// `COMMAND DOCS` group.
    pub(crate) group: &'static str,
    /// `COMMAND DOCS` summary.
    pub(crate) summary: &'static str,
}

const RO: &[&str] = &["readonly", "fast"];
const RW: &[&str] = &["write", "denyoom"];
const WF: &[&str] = &["write", "fast"];
const CONN: &[&str] = &["noscript", "loading", "stale", "fast"];
const SCRIPT: &[&str] = &["noscript", "skip_monitor", "no_mandatory_keys", "stale"];

/// Every command served, in `COMMAND` order.
pub(crate) const COMMANDS: &[Spec] = &[
    spec("ping", -1, false, &["fast"], (0, 0, 0), "connection", "Returns the server's liveliness response."),
    spec("echo", 2, false, &["fast"], (0, 0, 0), "connection", "Returns the given string."),
    spec("quit", -1, false, CONN, (0, 0, 0), "connection", "Closes the connection."),
    spec("hello", -1, false, CONN, (0, 0, 0), "connection", "Handshakes with the Redis server."),
    spec("auth", -2, false, CONN, (0, 0, 0), "connection", "Authenticates the connection."),
    spec("select", 2, false, &["loading", "stale", "fast"], (0, 0, 0), "connection", "Changes the selected database (dedupd has database 0 only)."),
    spec("client", -2, false, CONN, (0, 0, 0), "connection", "CLIENT SETNAME, GETNAME, SETINFO and ID."),
    spec("command", -1, false, &["loading", "stale"], (0, 0, 0), "server", "Returns detailed information about all commands."),
    spec("info", -1, true, &["loading", "stale"], (0, 0, 0), "server", "Returns information and statistics about the server."),
    spec("dbsize", 1, false, RO, (0, 0, 0), "server", "Returns the number of keys in the database."),
    spec("set", -3, true, RW, (1, 1, 1), "string", "Sets the string value of a key; durable on reply. Without EX/PX the key expires after the dedup window."),
    spec("setnx", 3, true, &["write", "denyoom", "fast"], (1, 1, 1), "string", "Set the string value of a key only when the key doesn't exist (expires after the dedup window)."),
    spec("setex", 4, true, RW, (1, 1, 1), "string", "Sets the string value and expiration time of a key."),
    spec("psetex", 4, true, RW, (1, 1, 1), "string", "Sets both string value and expiration time in milliseconds of a key."),
    spec("get", 2, true, RO, (1, 1, 1), "string", "Returns the string value of a key."),
    spec("mget", -2, true, RO, (1, -1, 1), "string", "Atomically returns the string values of one or more keys."),
    spec("getdel", 2, true, WF, (1, 1, 1), "string", "Returns the string value of a key after deleting the key."),
    spec("getex", -2, true, WF, (1, 1, 1), "string", "Returns the string value of a key after setting its expiration time (PERSIST: the dedup window)."),
    spec("getset", 3, true, RW, (1, 1, 1), "string", "Returns the previous string value of a key after setting it to a new value (expires after the dedup window)."),
    spec("del", -2, true, &["write"], (1, -1, 1), "generic", "Deletes one or more keys."),
    spec("unlink", -2, true, WF, (1, -1, 1), "generic", "Deletes one or more keys."),
    spec("exists", -2, true, RO, (1, -1, 1), "generic", "Determines whether one or more keys exist."),
    spec("type", 2, true, RO, (1, 1, 1), "generic", "Determines the type of value stored at a key."),
    spec("ttl", 2, true, RO, (1, 1, 1), "generic", "Returns the expiration time in seconds of a key."),
    spec("pttl", 2, true, RO, (1, 1, 1), "generic", "Returns the expiration time in milliseconds of a key."),
    spec("expire", -3, true, WF, (1, 1, 1), "generic", "Sets the expiration time of a key in seconds."),
    spec("pexpire", -3, true, WF, (1, 1, 1), "generic", "Sets the expiration time of a key in milliseconds."),
    spec("expireat", -3, true, WF, (1, 1, 1), "generic", "Sets the expiration time of a key to a Unix timestamp."),
    spec("pexpireat", -3, true, WF, (1, 1, 1), "generic", "Sets the expiration time of a key to a Unix milliseconds timestamp."),
    spec("scan", -2, true, &["readonly"], (0, 0, 0), "generic", "Iterates over the key names in the database."),
    spec("eval", -3, true, SCRIPT, (0, 0, 0), "scripting", "Executes a server-side Lua script, atomically and all or nothing."),
    spec("evalsha", -3, true, SCRIPT, (0, 0, 0), "scripting", "Executes a server-side Lua script by SHA1 digest."),
    spec("eval_ro", -3, true, &["noscript", "skip_monitor", "no_mandatory_keys", "stale", "readonly"], (0, 0, 0), "scripting", "Executes a read-only server-side Lua script."),
    spec("evalsha_ro", -3, true, &["noscript", "skip_monitor", "no_mandatory_keys", "stale", "readonly"], (0, 0, 0), "scripting", "Executes a read-only server-side Lua script by SHA1 digest."),
    spec("script", -2, true, &["noscript"], (0, 0, 0), "scripting", "SCRIPT LOAD, EXISTS, FLUSH and KILL."),
];

#[allow(clippy::too_many_arguments)]
const fn spec(
    name: &'static str,
    arity: i64,
    store: bool,
    flags: &'static [&'static str],
    keys: (i64, i64, i64),
    group: &'static str,
    summary: &'static str,
) -> Spec {
    Spec {
        name,
        arity,
        store,
        flags,
        keys,
        group,
        summary,
    }
}

/// The spec of a command name (any case).
pub(crate) fn lookup(name: &[u8]) -> Option<&'static Spec> {
    COMMANDS
        .iter()
        .find(|s| name.eq_ignore_ascii_case(s.name.as_bytes()))
}

/// Runs one request for `client`, returning its reply and what to do next.
pub(crate) fn execute(
    server: &Server,
    client: &mut Client,
    args: &[Vec<u8>],
    keys: &mut dyn Keys,
) -> (Reply, Flow) {
    let Some(spec) = lookup(&args[0]) else {
        return (unknown_command(args), Flow::Continue);
    };
    let n = args.len() as i64;
    if (spec.arity > 0 && n != spec.arity) || n < -spec.arity {
        return (wrong_args(spec.name), Flow::Continue);
    }
    if !client.authenticated && !matches!(spec.name, "auth" | "hello" | "quit") {
        return (
            Reply::Error("NOAUTH Authentication required.".into()),
            Flow::Continue,
        );
    }
    run(server, client, spec, args, keys)
}

/// Runs `args` for a script's `redis.call`: Redis' checks for scripts (unknown command, arity,
/// commands a script may not call, writes from a read-only script), then the command on `keys`.
pub(crate) fn execute_in_script(
    server: &Server,
    client: &mut Client,
    args: &[Vec<u8>],
    keys: &mut dyn Keys,
    read_only: bool,
) -> Reply {
    let Some(spec) = lookup(&args[0]) else {
        return Reply::err("Unknown Redis command called from script");
    };
    let n = args.len() as i64;
    if (spec.arity > 0 && n != spec.arity) || n < -spec.arity {
        return Reply::err("Wrong number of args calling Redis command from script");
    }
    if spec.flags.contains(&"noscript") {
        return Reply::err("This Redis command is not allowed from script");
    }
    if read_only && spec.flags.contains(&"write") {
        return Reply::err("Write commands are not allowed from read-only scripts.");
    }
    run(server, client, spec, args, keys).0
}

/// Runs a command whose arity and permission were checked.
fn run(
    server: &Server,
    client: &mut Client,
    spec: &Spec,
    args: &[Vec<u8>],
    keys: &mut dyn Keys,
) -> (Reply, Flow) {
    server.counters.commands(1);
    let now_ms = server.clock.now_ms();
    let reply = match spec.name {
        "quit" => return (Reply::Simple("OK"), Flow::Close),
        "ping" => match args.len() {
            1 => Reply::Simple("PONG"),
            2 => Reply::Bulk(args[1].clone()),
            _ => wrong_args("ping"),
        },
        "echo" => Reply::Bulk(args[1].clone()),
        "hello" => hello(server, client, args),
        "auth" => auth(server, client, args),
        "select" => match parse_i64(&args[1]) {
            Some(0) => Reply::Simple("OK"),
            Some(_) => Reply::err("DB index is out of range"),
            None => not_an_integer(),
        },
        "client" => client_command(client, args),
        "command" => command_command(args),
        "info" => Reply::Verbatim(super::info::render(server, args)),
        "dbsize" => Reply::Int(server.kv.len() as i64),
        "eval" | "evalsha" | "eval_ro" | "evalsha_ro" => eval(server, spec.name, args, keys),
        "script" => server.scripts.script_command(args),
        _ => match store_command(server, keys, spec.name, args, now_ms) {
            Ok(reply) => reply,
            Err(e) => store_error(&e),
        },
    };
    (reply, Flow::Continue)
}

fn store_command(
    server: &Server,
    kv: &mut dyn Keys,
    name: &str,
    args: &[Vec<u8>],
    now_ms: u64,
) -> Result<Reply, StoreError> {
    Ok(match name {
        "get" => kv
            .get(&args[1], now_ms)?
            .map_or(Reply::Null, |e| Reply::Bulk(e.value)),
        "mget" => Reply::Array(
            args[1..]
                .iter()
                .map(|k| {
                    Ok(kv
                        .get(k, now_ms)?
                        .map_or(Reply::Null, |e| Reply::Bulk(e.value)))
                })
                .collect::<Result<_, StoreError>>()?,
        ),
        "set" => return set(kv, args, now_ms),
        "getdel" => {
            // Redis 7 order: read, then delete the key it read.
            let Some(e) = kv.get(&args[1], now_ms)? else {
                return Ok(Reply::Null);
            };
            kv.delete(&args[1], now_ms)?;
            Reply::Bulk(e.value)
        }
        "getex" => return getex(kv, args, now_ms),
        "getset" => {
            let out = kv.set(
                Write::new(&args[1], &args[2], Condition::Always, Expiry::Window),
                now_ms,
            )?;
            out.previous.map_or(Reply::Null, |e| Reply::Bulk(e.value))
        }
        "setnx" => {
            let out = kv.set(
                Write::new(&args[1], &args[2], Condition::IfAbsent, Expiry::Window),
                now_ms,
            )?;
            Reply::Int(i64::from(out.written))
        }
        "setex" | "psetex" => {
            let Some(n) = parse_i64(&args[2]) else {
                return Ok(not_an_integer());
            };
            let unit = if name == "setex" { 1000 } else { 1 };
            let Some(at) = expire_at(n, unit, now_ms).filter(|_| n > 0) else {
                return Ok(invalid_expire(name));
            };
            kv.set(
                Write::new(&args[1], &args[3], Condition::Always, Expiry::At(at)),
                now_ms,
            )?;
            Reply::Simple("OK")
        }
        "del" | "unlink" => {
            let mut removed = 0;
            for key in &args[1..] {
                removed += i64::from(kv.delete(key, now_ms)?);
            }
            Reply::Int(removed)
        }
        "exists" => {
            let mut live = 0;
            for key in &args[1..] {
                live += i64::from(kv.get(key, now_ms)?.is_some());
            }
            Reply::Int(live)
        }
        "type" => match kv.get(&args[1], now_ms)? {
            Some(_) => Reply::Simple("string"),
            None => Reply::Simple("none"),
        },
        "ttl" | "pttl" => match kv.get(&args[1], now_ms)? {
            None => Reply::Int(-2),
            Some(e) => {
                let ms = e.expires_ms.saturating_sub(now_ms) as i64;
                Reply::Int(if name == "pttl" {
                    ms
                } else {
                    (ms + 500) / 1000
                })
            }
        },
        "expire" | "pexpire" | "expireat" | "pexpireat" => return expire(kv, name, args, now_ms),
        "scan" => return scan(server, args, now_ms),
        other => unreachable!("{other} is not a store command"),
    })
}

/// `SET key value [NX|XX] [GET] [EX s|PX ms|EXAT s|PXAT ms|KEEPTTL]`, parsed as Redis 7 does.
fn set(kv: &mut dyn Keys, args: &[Vec<u8>], now_ms: u64) -> Result<Reply, StoreError> {
    let ([nx, xx, get, keep], expire) = match options(args, 3, [b"NX", b"XX", b"GET", b"KEEPTTL"]) {
        Ok(options) => options,
        Err(reply) => return Ok(reply),
    };
    if (nx && xx) || (keep && expire.is_some()) {
        return Ok(syntax_error());
    }
    let cond = match (nx, xx) {
        (true, _) => Condition::IfAbsent,
        (_, true) => Condition::IfPresent,
        _ => Condition::Always,
    };
    let expiry = match expire {
        None if keep => Expiry::Keep,
        None => Expiry::Window,
        Some(option) => match option.expiry("set", now_ms) {
            Ok(expiry) => expiry,
            Err(reply) => return Ok(reply),
        },
    };
    let out = kv.set(Write::new(&args[1], &args[2], cond, expiry), now_ms)?;
    Ok(if get {
        out.previous.map_or(Reply::Null, |e| Reply::Bulk(e.value))
    } else if out.written {
        Reply::Simple("OK")
    } else {
        Reply::Null
    })
}

/// An expiry option of `SET` or `GETEX` as given (`EX s`, `PX ms`, `EXAT s`, `PXAT ms`), read
/// with the other options and checked after them, as Redis does.
#[derive(Debug, Clone, Copy)]
struct ExpireOption<'a> {
    /// Its unit in ms: 1000 for `EX`/`EXAT`, 1 for `PX`/`PXAT`.
    unit: i64,
    /// `EXAT`/`PXAT`: a time, not a duration.
    absolute: bool,
    /// The number as given.
    n: &'a [u8],
}

impl<'a> ExpireOption<'a> {
    /// Option `opt` (upper-cased) with its number `n`, given after `before`: `None` if that was
    /// another kind of expiry (a conflict); the same kind again wins.
    fn after(before: Option<Self>, opt: &[u8], n: &'a [u8]) -> Option<Self> {
        let unit = if opt[0] == b'E' { 1000 } else { 1 };
        let absolute = opt.len() == 4;
        if before.is_some_and(|b| (b.unit, b.absolute) != (unit, absolute)) {
            return None;
        }
        Some(ExpireOption { unit, absolute, n })
    }

    /// The expiry it gives at `now_ms`, or the error reply of command `name`.
    fn expiry(self, name: &str, now_ms: u64) -> Result<Expiry, Reply> {
        let n = parse_i64(self.n).ok_or_else(not_an_integer)?;
        let base = if self.absolute { 0 } else { now_ms };
        expire_at(n, self.unit, base)
            .filter(|_| n > 0)
            .map(Expiry::At)
            .ok_or_else(|| invalid_expire(name))
    }
}

/// The options of `SET` or `GETEX`, from `args[from]` on: which of `flags` were given, and the
/// expiry option. Anything else, or an expiry option without its number, is a syntax error; the
/// caller refuses the flags that do not go together.
fn options<'a, const N: usize>(
    args: &'a [Vec<u8>],
    from: usize,
    flags: [&[u8]; N],
) -> Result<([bool; N], Option<ExpireOption<'a>>), Reply> {
    let mut given = [false; N];
    let mut expire = None;
    let mut rest = args[from.min(args.len())..].iter();
    while let Some(arg) = rest.next() {
        let opt = arg.to_ascii_uppercase();
        if let Some(i) = flags.iter().position(|f| *f == opt.as_slice()) {
            given[i] = true;
        } else if matches!(opt.as_slice(), b"EX" | b"PX" | b"EXAT" | b"PXAT") {
            let n = rest.next().ok_or_else(syntax_error)?;
            expire = Some(ExpireOption::after(expire, &opt, n).ok_or_else(syntax_error)?);
        } else {
            return Err(syntax_error());
        }
    }
    Ok((given, expire))
}

/// `GETEX key [EX s|PX ms|EXAT s|PXAT ms|PERSIST]`, parsed as Redis 7 does: options first,
/// then a missing key is nil whatever its expiry says, then the expiry is checked. `PERSIST`
/// gives the key the dedup window (dedupd has no key without an expiry).
fn getex(kv: &mut dyn Keys, args: &[Vec<u8>], now_ms: u64) -> Result<Reply, StoreError> {
    let ([persist], expire) = match options(args, 2, [b"PERSIST"]) {
        Ok(options) => options,
        Err(reply) => return Ok(reply),
    };
    if persist && expire.is_some() {
        return Ok(syntax_error());
    }
    let Some(current) = kv.get(&args[1], now_ms)? else {
        return Ok(Reply::Null);
    };
    let expiry = match expire {
        None if persist => Expiry::Window,
        None => return Ok(Reply::Bulk(current.value)),
        Some(option) => match option.expiry("getex", now_ms) {
            Ok(expiry) => expiry,
            Err(reply) => return Ok(reply),
        },
    };
    // An expiry already past deletes the key, as in Redis.
    kv.expire(&args[1], expiry, now_ms)?;
    Ok(Reply::Bulk(current.value))
}

/// `EVAL` and its kin: the script runs in one transaction (atomic against every other write)
/// from a savepoint, and a script that fails or is killed is rolled back to it, all of it.
fn eval(server: &Server, name: &str, args: &[Vec<u8>], keys: &mut dyn Keys) -> Reply {
    let mut reply = None;
    let ran = keys.atomically(&mut |tx| {
        let savepoint: Savepoint = tx.savepoint();
        reply = Some(match server.scripts.eval(server, name, args, tx) {
            Outcome::Done(reply) => reply,
            Outcome::Failed(reply) => match tx.rollback_to(savepoint) {
                Ok(()) => reply,
                Err(e) => {
                    tracing::error!(cause = %e, "redis endpoint: a failed script could not be undone");
                    Reply::err(format!(
                        "the script failed and its writes could not be undone: {e}"
                    ))
                }
            },
        });
    });
    match ran {
        Ok(()) => reply.expect("the script ran"),
        Err(e) => store_error(&e),
    }
}

/// `EXPIRE key n [NX|XX|GT|LT]` and its millisecond and absolute forms. Every dedupd key has
/// an expiry (the window when none was given), so `NX` never applies and `XX` always does.
fn expire(
    kv: &mut dyn Keys,
    name: &str,
    args: &[Vec<u8>],
    now_ms: u64,
) -> Result<Reply, StoreError> {
    let (mut nx, mut xx, mut gt, mut lt) = (false, false, false, false);
    for opt in &args[3..] {
        match opt.to_ascii_uppercase().as_slice() {
            b"NX" => nx = true,
            b"XX" => xx = true,
            b"GT" => gt = true,
            b"LT" => lt = true,
            _ => {
                let opt = String::from_utf8_lossy(opt);
                return Ok(Reply::err(format!("Unsupported option {opt}")));
            }
        }
    }
    if nx && (xx || gt || lt) {
        return Ok(Reply::err(
            "NX and XX, GT or LT options at the same time are not compatible",
        ));
    }
    if gt && lt {
        return Ok(Reply::err(
            "GT and LT options at the same time are not compatible",
        ));
    }
    let Some(n) = parse_i64(&args[2]) else {
        return Ok(not_an_integer());
    };
    let unit = if name.starts_with('p') { 1 } else { 1000 };
    let base = if name.ends_with("at") { 0 } else { now_ms };
    let Some(at) = expire_at(n, unit, base) else {
        return Ok(invalid_expire(name));
    };
    let Some(current) = kv.get(&args[1], now_ms)? else {
        return Ok(Reply::Int(0));
    };
    if nx || (gt && at <= current.expires_ms) || (lt && at >= current.expires_ms) {
        return Ok(Reply::Int(0));
    }
    let found = kv.expire(&args[1], Expiry::At(at), now_ms)?;
    Ok(Reply::Int(i64::from(found)))
}

/// `n` units of `unit` ms after `base_ms`, as a Unix ms time (0 for times before the epoch);
/// `None` on overflow, which Redis answers with "invalid expire time".
fn expire_at(n: i64, unit: i64, base_ms: u64) -> Option<u64> {
    let ms = n.checked_mul(unit)?;
    let at = (base_ms as i64).checked_add(ms)?;
    Some(at.max(0) as u64)
}

/// `SCAN cursor [MATCH pattern] [COUNT n] [TYPE type]`.
fn scan(server: &Server, args: &[Vec<u8>], now_ms: u64) -> Result<Reply, StoreError> {
    let cursor = match std::str::from_utf8(&args[1])
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
    {
        Some(c) => c,
        None => return Ok(Reply::err("invalid cursor")),
    };
    let mut count = 10usize;
    let mut pattern: Option<&[u8]> = None;
    let mut only_strings = true;
    let mut i = 2;
    while i < args.len() {
        let Some(value) = args.get(i + 1) else {
            return Ok(syntax_error());
        };
        match args[i].to_ascii_uppercase().as_slice() {
            b"COUNT" => match parse_i64(value) {
                None => return Ok(not_an_integer()),
                Some(n) if n < 1 => return Ok(syntax_error()),
                Some(n) => count = n.min(100_000) as usize,
            },
            b"MATCH" => pattern = Some(value),
            b"TYPE" => only_strings = value.eq_ignore_ascii_case(b"string"),
            _ => return Ok(syntax_error()),
        }
        i += 2;
    }
    let after = match cursor {
        0 => None,
        c => match server.cursors.resume(c) {
            Some(key) => Some(key),
            // A cursor this process never gave (or one evicted long ago): start over would loop
            // a client forever, so say so.
            None => return Ok(Reply::err("invalid cursor")),
        },
    };
    let page = server.kv.scan(after.as_deref(), count, now_ms)?;
    let (keys, resume) = (page.keys, page.next);
    let next = match resume {
        Some(key) => server.cursors.issue(key),
        None => 0,
    };
    let keys = keys
        .into_iter()
        .filter(|k| only_strings && pattern.is_none_or(|p| glob::matches(p, k)))
        .map(Reply::Bulk)
        .collect();
    Ok(Reply::Array(vec![
        Reply::text(next.to_string()),
        Reply::Array(keys),
    ]))
}

/// `HELLO [protover [AUTH user pass] [SETNAME name]]`.
fn hello(server: &Server, client: &mut Client, args: &[Vec<u8>]) -> Reply {
    let mut proto = client.proto;
    if let Some(v) = args.get(1) {
        match parse_i64(v) {
            None => return Reply::err("Protocol version is not an integer or out of range"),
            Some(v @ 2..=3) => proto = v as u8,
            Some(_) => return Reply::Error("NOPROTO unsupported protocol version".into()),
        }
    }
    let mut credentials = None;
    let mut name = None;
    let mut i = 2;
    while i < args.len() {
        let opt = args[i].to_ascii_uppercase();
        match opt.as_slice() {
            b"AUTH" if i + 2 < args.len() => {
                credentials = Some((&args[i + 1], &args[i + 2]));
                i += 3;
            }
            b"SETNAME" if i + 1 < args.len() => {
                name = Some(&args[i + 1]);
                i += 2;
            }
            _ => {
                let opt = String::from_utf8_lossy(&args[i]);
                return Reply::err(format!("Syntax error in HELLO option '{opt}'"));
            }
        }
    }
    if let Some((user, pass)) = credentials {
        if !server.check_password(Some(user), pass) {
            return wrongpass();
        }
        client.authenticated = true;
    }
    if !client.authenticated {
        return Reply::Error(
            "NOAUTH HELLO must be called with the client already authenticated, otherwise the \
             HELLO AUTH <user> <pass> option can be used to authenticate the client and select \
             the RESP protocol version at the same time"
                .into(),
        );
    }
    if let Some(name) = name {
        if let Err(reply) = set_name(client, name) {
            return reply;
        }
    }
    client.proto = proto;
    Reply::Map(vec![
        (Reply::text("server"), Reply::text("redis")),
        (Reply::text("version"), Reply::text(super::REDIS_VERSION)),
        (Reply::text("proto"), Reply::Int(i64::from(proto))),
        (Reply::text("id"), Reply::Int(client.id as i64)),
        (Reply::text("mode"), Reply::text("standalone")),
        (Reply::text("role"), Reply::text("master")),
        (Reply::text("modules"), Reply::Array(Vec::new())),
    ])
}

/// `AUTH [user] password`: the only user is `default`.
fn auth(server: &Server, client: &mut Client, args: &[Vec<u8>]) -> Reply {
    let (user, pass) = match args {
        [_, pass] => (None, pass),
        [_, user, pass] => (Some(user), pass),
        _ => return syntax_error(),
    };
    if user.is_none() && server.password.is_none() {
        return Reply::err(
            "AUTH <password> called without any password configured for the default user. \
             Are you sure your configuration is correct?",
        );
    }
    if server.check_password(user, pass) {
        client.authenticated = true;
        Reply::Simple("OK")
    } else {
        wrongpass()
    }
}

fn client_command(client: &mut Client, args: &[Vec<u8>]) -> Reply {
    let sub = args[1].to_ascii_lowercase();
    let arity_ok = match sub.as_slice() {
        b"setname" => args.len() == 3,
        b"getname" | b"id" => args.len() == 2,
        b"setinfo" => args.len() == 4,
        _ => {
            let sub = String::from_utf8_lossy(&args[1]).to_uppercase();
            return Reply::err(format!("unknown subcommand '{sub}'. Try CLIENT HELP."));
        }
    };
    let sub = String::from_utf8_lossy(&sub).into_owned();
    if !arity_ok {
        return wrong_args(&format!("client|{sub}"));
    }
    match sub.as_str() {
        "setname" => set_name(client, &args[2]).map_or_else(|r| r, |()| Reply::Simple("OK")),
        "getname" => client.name.clone().map_or(Reply::Null, Reply::Bulk),
        "id" => Reply::Int(client.id as i64),
        _ => {
            let attr = args[2].to_ascii_lowercase();
            let value = &args[3];
            if value.iter().any(|b| !(b'!'..=b'~').contains(b)) {
                return Reply::err(
                    "lib-name and lib-ver cannot contain spaces, newlines or special characters.",
                );
            }
            match attr.as_slice() {
                b"lib-name" => client.lib_name = Some(value.clone()),
                b"lib-ver" => client.lib_ver = Some(value.clone()),
                _ => {
                    let attr = String::from_utf8_lossy(&args[2]);
                    return Reply::err(format!("Unrecognized option '{attr}'"));
                }
            }
            Reply::Simple("OK")
        }
    }
}

fn set_name(client: &mut Client, name: &[u8]) -> Result<(), Reply> {
    if name.iter().any(|b| !(b'!'..=b'~').contains(b)) {
        return Err(Reply::err(
            "Client names cannot contain spaces, newlines or special characters.",
        ));
    }
    client.name = (!name.is_empty()).then(|| name.to_vec());
    Ok(())
}

/// `COMMAND`, `COMMAND COUNT|LIST|INFO|DOCS`.
fn command_command(args: &[Vec<u8>]) -> Reply {
    let Some(sub) = args.get(1) else {
        return Reply::Array(COMMANDS.iter().map(command_info).collect());
    };
    let sub = sub.to_ascii_lowercase();
    let wanted = || -> Vec<Option<&'static Spec>> {
        if args.len() == 2 {
            COMMANDS.iter().map(Some).collect()
        } else {
            args[2..].iter().map(|n| lookup(n)).collect()
        }
    };
    match sub.as_slice() {
        b"count" if args.len() == 2 => Reply::Int(COMMANDS.len() as i64),
        b"list" => Reply::Array(COMMANDS.iter().map(|s| Reply::text(s.name)).collect()),
        b"info" => Reply::Array(
            wanted()
                .into_iter()
                .map(|s| s.map_or(Reply::Null, command_info))
                .collect(),
        ),
        b"docs" => Reply::Map(
            wanted()
                .into_iter()
                .flatten()
                .map(|s| {
                    let doc = Reply::Map(vec![
                        (Reply::text("summary"), Reply::text(s.summary)),
                        (Reply::text("since"), Reply::text("1.0.0")),
                        (Reply::text("group"), Reply::text(s.group)),
                        (Reply::text("complexity"), Reply::text("O(1)")),
                    ]);
                    (Reply::text(s.name), doc)
                })
                .collect(),
        ),
        b"count" => wrong_args("command|count"),
        _ => {
            let sub = String::from_utf8_lossy(&args[1]).to_uppercase();
            Reply::err(format!("unknown subcommand '{sub}'. Try COMMAND HELP."))
        }
    }
}

/// One `COMMAND INFO` entry, in Redis 7's ten-field shape.
fn command_info(s: &Spec) -> Reply {
    let category = if s.flags.contains(&"write") {
        "@write"
    } else {
        "@read"
    };
    Reply::Array(vec![
        Reply::text(s.name),
        Reply::Int(s.arity),
        Reply::Set(s.flags.iter().map(|f| Reply::Simple(f)).collect()),
        Reply::Int(s.keys.0),
        Reply::Int(s.keys.1),
        Reply::Int(s.keys.2),
        Reply::Set(vec![Reply::Simple(category)]),
        Reply::Array(Vec::new()),
        Reply::Array(Vec::new()),
        Reply::Array(Vec::new()),
    ])
}

/// `ERR unknown command 'x', with args beginning with: 'a' 'b' `, truncated like Redis.
fn unknown_command(args: &[Vec<u8>]) -> Reply {
    let name = String::from_utf8_lossy(&args[0]);
    let name: String = name.chars().take(128).collect();
    let mut list = String::new();
    for arg in &args[1..] {
        if list.len() >= 128 {
            break;
        }
        let arg = String::from_utf8_lossy(arg);
        let room = 128 - list.len();
        let arg: String = arg.chars().take(room).collect();
        let _ = write!(list, "'{arg}' ");
    }
    Reply::err(format!(
        "unknown command '{name}', with args beginning with: {list}"
    ))
}

/// The error reply for a store failure: a refused key, or the store itself.
fn store_error(e: &StoreError) -> Reply {
    match e {
        StoreError::IdTooLong { len, max } => Reply::err(format!(
            "key is {len} bytes, over the limit of {max} bytes (DEDUPD_MAX_ID_BYTES)"
        )),
        StoreError::EmptyId { .. } => Reply::err("empty keys are not supported by dedupd"),
        other => {
            tracing::warn!(cause = %other, "redis endpoint: store operation failed");
            Reply::err(format!("store failure: {other}"))
        }
    }
}

pub(crate) fn wrong_args(name: &str) -> Reply {
    Reply::err(format!("wrong number of arguments for '{name}' command"))
}

fn not_an_integer() -> Reply {
    Reply::err("value is not an integer or out of range")
}

fn syntax_error() -> Reply {
    Reply::err("syntax error")
}

fn invalid_expire(name: &str) -> Reply {
    Reply::err(format!("invalid expire time in '{name}' command"))
}

fn wrongpass() -> Reply {
    Reply::Error("WRONGPASS invalid username-password pair or user is disabled.".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_command_text_is_redis_text() {
        let args: Vec<Vec<u8>> = vec![b"FOO".to_vec(), b"a".to_vec(), b"b".to_vec()];
        assert_eq!(
            unknown_command(&args),
            Reply::err("unknown command 'FOO', with args beginning with: 'a' 'b' ")
        );
        assert_eq!(
            unknown_command(&[b"FOO".to_vec()]),
            Reply::err("unknown command 'FOO', with args beginning with: ")
        );
    }

    #[test]
    fn expiry_overflow_is_refused() {
        assert_eq!(expire_at(10, 1000, 5), Some(10_005));
        assert_eq!(expire_at(-10, 1000, 5), Some(0));
        assert_eq!(expire_at(i64::MAX / 10, 1000, 0), None);
        assert_eq!(expire_at(i64::MAX - 1, 1, 5), None);
    }

    #[test]
    fn every_command_has_a_redis_arity() {
        for s in COMMANDS {
            assert!(s.arity != 0, "{}", s.name);
            assert_eq!(
                lookup(s.name.to_uppercase().as_bytes()).map(|x| x.name),
                Some(s.name)
            );
        }
    }
}
