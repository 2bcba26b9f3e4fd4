//! Lua scripts, as Redis 7 runs them: `EVAL`, `EVALSHA`, their `_RO` forms and `SCRIPT
//! LOAD|EXISTS|FLUSH|KILL`, on Lua 5.1 (mlua's vendored copy, the version Redis embeds).
//!
//! - **Sandbox:** the base, `string`, `table`, `math` and `coroutine` libraries only (no `os`,
//!   `io`, `package`/`require`, `debug`, `load*`, `dofile`, `print`, `setfenv`); globals are
//!   read-only and reading an unknown one is an error, with Redis' texts; the library tables
//!   are read-only proxies. Nothing a script does outlives its run.
//! - **Limits:** a run past the time limit is killed (and `SCRIPT KILL` kills one early), and
//!   its memory is bounded: the VM may grow by [`SCRIPT_MEMORY`] per run.
//! - **All or nothing:** the caller runs a script inside one store transaction and rolls it
//!   back when the script fails or is killed; see [`Outcome`].
//!
//! One VM serves every connection, one script at a time (as in Redis); compiled scripts are
//! cached by their SHA-1 for `EVALSHA`.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mlua::{
    ChunkMode, Function, HookTriggers, Lua, LuaOptions, MultiValue, StdLib, Table, Value, Variadic,
};
use sha1::{Digest, Sha1};

use super::command::{self, Keys};
use super::resp::{parse_i64, Reply};
use super::{Client, Server};

/// How much the Lua VM may grow while one script runs: past it, allocations fail and the
/// script ends with an error.
pub(crate) const SCRIPT_MEMORY: usize = 64 * 1024 * 1024;
/// The time limit is checked every this many Lua instructions.
const HOOK_EVERY: u32 = 10_000;
/// Deepest Lua table converted into a reply (a table holding itself must not recurse forever).
const MAX_DEPTH: usize = 200;
/// Most scripts cached; past it the oldest is dropped (a client's `EVALSHA` then gets
/// `NOSCRIPT` and sends `EVAL`, as redis-py's `register_script` does). Redis 7.0 never drops
/// one, so a client sending endless distinct scripts would grow it forever.
const MAX_SCRIPTS: usize = 10_000;
/// Name of the scripts' chunk: error messages read `user_script:<line>: ...`, as in Redis.
const CHUNK: &str = "@user_script";

/// Sets up the sandbox, once per VM. Arguments: the table unknown globals are looked up in,
/// the `redis` table (whose `call` and `pcall` each run sets), and the engine's private table
/// (`ctx.killed`: whether the current run was killed).
const PRELUDE: &str = r#"
local backing, redis, ctx = ...
local G = _G
local error, pairs, ipairs, setmetatable, tostring = error, pairs, ipairs, setmetatable, tostring
local raw_pcall, raw_xpcall, raw_rawset, raw_resume = pcall, xpcall, rawset, coroutine.resume
local readonly = setmetatable({}, { __mode = "k" })
local function refuse() error("Attempt to modify a readonly table", 2) end
local function protect(t)
  local p = setmetatable({}, { __index = t, __newindex = refuse, __metatable = false })
  readonly[p] = true
  return p
end
-- Once a run is killed, no pcall may swallow the error: it goes up to the caller.
local function unless_killed(ok, ...)
  if not ok and ctx.killed() then error((...), 0) end
  return ok, ...
end
for _, name in ipairs({ "assert", "collectgarbage", "error", "gcinfo", "getfenv",
    "getmetatable", "ipairs", "next", "pairs", "rawequal", "rawget", "select",
    "setmetatable", "tonumber", "tostring", "type", "unpack", "newproxy", "_VERSION" }) do
  backing[name] = G[name]
end
backing.pcall = function(f, ...) return unless_killed(raw_pcall(f, ...)) end
backing.xpcall = function(f, h) return unless_killed(raw_xpcall(f, h)) end
backing.rawset = function(t, k, v)
  if readonly[t] then error("Attempt to modify a readonly table", 0) end
  return raw_rawset(t, k, v)
end
local co = {}
for k, v in pairs(G.coroutine) do co[k] = v end
co.resume = function(c, ...) return unless_killed(raw_resume(c, ...)) end
-- co.create is the engine's (it hooks the new coroutine); wrap is built on it.
co.wrap = function(f)
  local c = co.create(f)
  local function pass(ok, ...)
    if not ok then error((...), 0) end
    return ...
  end
  return function(...) return pass(raw_resume(c, ...)) end
end
backing.coroutine = protect(co)
backing.string = protect(G.string)
backing.table = protect(G.table)
backing.math = protect(G.math)
backing.redis = protect(redis)
backing._G = G
-- Strings' metatable would hand out the real string table.
getmetatable("").__metatable = false
for k in pairs(G) do G[k] = nil end
setmetatable(backing, { __index = function(_, k)
  error("Script attempted to access nonexistent global variable '" .. tostring(k) .. "'", 2)
end, __metatable = false })
setmetatable(G, { __index = backing, __newindex = refuse, __metatable = false })
readonly[G] = true
"#;

/// Runs a compiled script with the error handler: `ok, first result`.
const RUNNER: &str = "local f, h = ... return xpcall(f, h)";

/// The scripts of one endpoint: the VM, the cache and the limits.
pub(crate) struct Scripts {
    /// The VM and its cache; one script runs at a time.
    engine: Mutex<Engine>,
    /// Longest a script may run before it is killed.
    timeout: Duration,
    /// Set while a script runs (for `SCRIPT KILL`).
    running: AtomicBool,
    /// Set to kill the running script (by its deadline or `SCRIPT KILL`); read by the hook.
    kill: Arc<AtomicBool>,
}

/// The VM and what lives in it.
struct Engine {
    lua: Lua,
    /// SHA-1 (lowercase hex) → the compiled script.
    cache: HashMap<String, Function>,
    /// The cached SHA-1s, oldest first.
    order: VecDeque<String>,
    /// Where `KEYS` and `ARGV` go for a run (the globals' backing table).
    backing: Table,
    /// The real `redis` table (scripts see a read-only proxy): `call` and `pcall` are set per
    /// run, as they borrow the run's transaction.
    redis: Table,
    /// [`RUNNER`].
    runner: Function,
    /// The error handler: the error as Redis' `{err=..., source=..., line=...}` table.
    handler: Function,
    /// The current run's deadline, read by the instruction hook.
    deadline: Arc<Mutex<Option<Instant>>>,
    /// The current run's `redis.setresp` (2 or 3).
    resp: Arc<AtomicU8>,
}

/// Why a script did not complete; the caller undoes its writes and sends the reply.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// The script completed: its reply (an error reply a script returned counts as completed).
    Done(Reply),
    /// The script raised an error, was killed, or could not start: none of its writes stand.
    Failed(Reply),
}

impl Scripts {
    /// A VM with the sandbox set up, killing scripts that run past `timeout`.
    ///
    /// # Panics
    ///
    /// The sandbox cannot be set up (a bug: the prelude is fixed).
    pub(crate) fn new(timeout: Duration) -> Scripts {
        let kill = Arc::new(AtomicBool::new(false));
        let engine = Engine::new(kill.clone()).expect("the Lua sandbox sets up");
        Scripts {
            engine: Mutex::new(engine),
            timeout,
            running: AtomicBool::new(false),
            kill,
        }
    }

    /// `SCRIPT LOAD|EXISTS|FLUSH|KILL|HELP`.
    pub(crate) fn script_command(&self, args: &[Vec<u8>]) -> Reply {
        let sub = String::from_utf8_lossy(&args[1]).to_lowercase();
        let arity_ok = match sub.as_str() {
            "load" => args.len() == 3,
            "exists" => args.len() >= 3,
            "flush" => args.len() <= 3,
            "kill" | "help" => args.len() == 2,
            _ => {
                let sub = String::from_utf8_lossy(&args[1]).to_uppercase();
                return Reply::err(format!("unknown subcommand '{sub}'. Try SCRIPT HELP."));
            }
        };
        if !arity_ok {
            return command::wrong_args(&format!("script|{sub}"));
        }
        match sub.as_str() {
            "load" => {
                let mut engine = self.engine.lock().expect("script engine lock");
                match engine.compile(&args[2]) {
                    Ok((sha, _)) => Reply::Bulk(sha.into_bytes()),
                    Err(reply) => reply,
                }
            }
            "exists" => {
                let engine = self.engine.lock().expect("script engine lock");
                Reply::Array(
                    args[2..]
                        .iter()
                        .map(|sha| {
                            let sha = String::from_utf8_lossy(sha).to_lowercase();
                            Reply::Int(i64::from(engine.cache.contains_key(&sha)))
                        })
                        .collect(),
                )
            }
            "flush" => {
                if let Some(mode) = args.get(2) {
                    if !mode.eq_ignore_ascii_case(b"sync") && !mode.eq_ignore_ascii_case(b"async")
                    {
                        return Reply::err("SCRIPT FLUSH only support SYNC|ASYNC option");
                    }
                }
                let mut engine = self.engine.lock().expect("script engine lock");
                engine.cache.clear();
                engine.order.clear();
                Reply::Simple("OK")
            }
            "kill" => {
                if self.running.load(Ordering::SeqCst) {
                    self.kill.store(true, Ordering::SeqCst);
                    Reply::Simple("OK")
                } else {
                    Reply::Error("NOTBUSY No scripts in execution right now.".into())
                }
            }
            _ => Reply::Array(
                [
                    "SCRIPT <subcommand> [<arg> [value] [opt] ...]. Subcommands are:",
                    "EXISTS <sha1> [<sha1> ...]",
                    "    Return information about the existence of the scripts in the script cache.",
                    "FLUSH [ASYNC|SYNC]",
                    "    Flush the Lua scripts cache.",
                    "KILL",
                    "    Kill the currently executing Lua script.",
                    "LOAD <script>",
                    "    Load a script into the scripts cache without executing it.",
                    "HELP",
                    "    Print this help.",
                ]
                .iter()
                .map(|l| Reply::Status((*l).into()))
                .collect(),
            ),
        }
    }

    /// `EVAL script numkeys [key ...] [arg ...]` and `EVALSHA`, `EVAL_RO`, `EVALSHA_RO`
    /// (`name` says which), run on `keys`.
    pub(crate) fn eval(
        &self,
        server: &Server,
        name: &str,
        args: &[Vec<u8>],
        keys: &mut dyn Keys,
    ) -> Outcome {
        let by_sha = name.starts_with("evalsha");
        let read_only = name.ends_with("_ro");
        if by_sha && args[1].len() != 40 {
            return Outcome::Failed(noscript());
        }
        let numkeys = match parse_i64(&args[2]) {
            None => return Outcome::Failed(Reply::err("value is not an integer or out of range")),
            Some(n) if n < 0 => {
                return Outcome::Failed(Reply::err("Number of keys can't be negative"))
            }
            Some(n) if n as u64 > (args.len() - 3) as u64 => {
                return Outcome::Failed(Reply::err(
                    "Number of keys can't be greater than number of args",
                ))
            }
            Some(n) => n as usize,
        };
        let mut engine = self.engine.lock().expect("script engine lock");
        let (sha, function) = if by_sha {
            let sha = String::from_utf8_lossy(&args[1]).to_lowercase();
            match engine.cache.get(&sha) {
                Some(f) => (sha, f.clone()),
                None => return Outcome::Failed(noscript()),
            }
        } else {
            match engine.compile(&args[1]) {
                Ok(found) => found,
                Err(reply) => return Outcome::Failed(reply),
            }
        };
        let (script_keys, argv) = args[3..].split_at(numkeys);
        self.kill.store(false, Ordering::SeqCst);
        self.running.store(true, Ordering::SeqCst);
        *engine.deadline.lock().expect("deadline lock") = Some(Instant::now() + self.timeout);
        let ran = engine.run(server, &function, script_keys, argv, read_only, keys);
        *engine.deadline.lock().expect("deadline lock") = None;
        self.running.store(false, Ordering::SeqCst);
        let killed = self.kill.swap(false, Ordering::SeqCst);
        // The next run's limit is its own; a `collectgarbage('stop')` does not outlive its run.
        let _ = engine.lua.set_memory_limit(0);
        engine.lua.gc_restart();
        if killed {
            tracing::warn!(script = %sha, timeout = ?self.timeout, "redis endpoint: script killed");
            return Outcome::Failed(Reply::err(format!(
                "Script killed: it ran past the time limit of {} ms (DEDUPD_REDIS_SCRIPT_TIMEOUT) \
                 or by SCRIPT KILL; none of its writes were applied. script: {sha}",
                self.timeout.as_millis()
            )));
        }
        match ran {
            Ok((true, value)) => Outcome::Done(to_reply(&value, engine.resp_version(), 0)),
            Ok((false, Value::Table(err))) => Outcome::Failed(error_reply(&err, &sha)),
            Ok((false, other)) => {
                // Not through the handler: out of memory, or an error in the handler itself.
                let msg = match other {
                    Value::String(s) => s.to_string_lossy(),
                    other => format!("{other:?}"),
                };
                let msg = if msg.contains("not enough memory") {
                    format!(
                        "not enough memory: the script went past its limit of {} MiB",
                        SCRIPT_MEMORY / (1024 * 1024)
                    )
                } else {
                    msg
                };
                Outcome::Failed(Reply::err(format!(
                    "Error running script {sha}, {}",
                    msg.chars().take(100).collect::<String>()
                )))
            }
            Err(e) => Outcome::Failed(Reply::err(format!("Error running script {sha}, {e}"))),
        }
    }
}

impl Engine {
    fn new(kill: Arc<AtomicBool>) -> mlua::Result<Engine> {
        let lua = Lua::new_with(
            // Lua 5.1's base library includes `coroutine`.
            StdLib::TABLE | StdLib::STRING | StdLib::MATH,
            LuaOptions::new(),
        )?;
        let backing = lua.create_table()?;
        let redis = lua.create_table()?;
        let ctx = lua.create_table()?;
        let resp = Arc::new(AtomicU8::new(2));
        let deadline: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));

        let flag = kill.clone();
        ctx.set(
            "killed",
            lua.create_function(move |_, ()| Ok(flag.load(Ordering::SeqCst)))?,
        )?;
        redis.set(
            "sha1hex",
            lua.create_function(|_, args: Variadic<Value>| {
                let [Value::String(s)] = args.as_slice() else {
                    return Err(mlua::Error::runtime("wrong number of arguments"));
                };
                Ok(sha1_hex(&s.as_bytes()))
            })?,
        )?;
        redis.set(
            "error_reply",
            lua.create_function(|lua, args: Variadic<Value>| {
                let [Value::String(s)] = args.as_slice() else {
                    return error_table(lua, b"wrong number or type of arguments");
                };
                let s = s.as_bytes();
                let mut text = Vec::with_capacity(s.len() + 1);
                if s.first() != Some(&b'-') {
                    text.push(b'-');
                }
                text.extend_from_slice(&s);
                error_table(lua, &text)
            })?,
        )?;
        redis.set(
            "status_reply",
            lua.create_function(|lua, args: Variadic<Value>| {
                let [Value::String(s)] = args.as_slice() else {
                    return error_table(lua, b"wrong number or type of arguments");
                };
                let t = lua.create_table()?;
                t.set("ok", s.clone())?;
                Ok(t)
            })?,
        )?;
        let version = resp.clone();
        redis.set(
            "setresp",
            lua.create_function(move |_, args: Variadic<Value>| {
                match args.as_slice() {
                    [Value::Integer(n @ (2 | 3))] => version.store(*n as u8, Ordering::SeqCst),
                    [Value::Number(n)] if *n == 2.0 || *n == 3.0 => {
                        version.store(*n as u8, Ordering::SeqCst)
                    }
                    [_] => return Err(mlua::Error::runtime("RESP version must be 2 or 3.")),
                    _ => {
                        return Err(mlua::Error::runtime(
                            "redis.setresp() requires one argument.",
                        ))
                    }
                }
                Ok(())
            })?,
        )?;
        redis.set(
            "log",
            lua.create_function(|_, args: MultiValue| {
                let text: Vec<String> = args
                    .iter()
                    .skip(1)
                    .map(|v| match v {
                        Value::String(s) => s.to_string_lossy(),
                        other => format!("{other:?}"),
                    })
                    .collect();
                tracing::info!(message = %text.join(" "), "redis script log");
                Ok(())
            })?,
        )?;
        redis.set(
            "replicate_commands",
            lua.create_function(|_, _: MultiValue| Ok(true))?,
        )?;
        redis.set("set_repl", lua.create_function(|_, _: MultiValue| Ok(()))?)?;
        redis.set(
            "breakpoint",
            lua.create_function(|_, _: MultiValue| Ok(false))?,
        )?;
        redis.set("debug", lua.create_function(|_, _: MultiValue| Ok(()))?)?;
        for (name, value) in [
            ("LOG_DEBUG", 0),
            ("LOG_VERBOSE", 1),
            ("LOG_NOTICE", 2),
            ("LOG_WARNING", 3),
            ("REPL_NONE", 0),
            ("REPL_AOF", 1),
            ("REPL_SLAVE", 2),
            ("REPL_REPLICA", 2),
            ("REPL_ALL", 3),
            ("REDIS_VERSION_NUM", 0x07_00_00),
        ] {
            redis.set(name, value)?;
        }
        redis.set("REDIS_VERSION", super::REDIS_VERSION)?;

        let deadline_hook = deadline.clone();
        let kill_hook = kill;
        let hook = move |_: &Lua, _: &mlua::Debug| {
            let late = deadline_hook
                .lock()
                .expect("deadline lock")
                .is_some_and(|d| Instant::now() >= d);
            if late {
                kill_hook.store(true, Ordering::SeqCst);
            }
            if kill_hook.load(Ordering::SeqCst) {
                return Err(mlua::Error::runtime("Script killed"));
            }
            Ok(mlua::VmState::Continue)
        };
        let every = || HookTriggers::new().every_nth_instruction(HOOK_EVERY);
        lua.set_hook(every(), hook.clone())?;
        // A coroutine does not inherit the VM's hook here: each gets its own, or a loop inside
        // one would outlive the time limit.
        let create = lua.create_function(move |lua, f: Function| {
            let thread = lua.create_thread(f)?;
            thread.set_hook(every(), hook.clone())?;
            Ok(thread)
        })?;
        lua.globals()
            .get::<Table>("coroutine")?
            .set("create", create)?;
        lua.load(PRELUDE)
            .set_name("=dedupd")
            .call::<()>((backing.clone(), redis.clone(), ctx))?;
        let runner = lua.load(RUNNER).set_name("=dedupd").into_function()?;
        let handler = lua.create_function(|lua, err: Value| {
            let table = match err {
                Value::Table(t) => t,
                other => {
                    let msg = match &other {
                        Value::String(s) => s.to_string_lossy(),
                        Value::Error(e) => match call_error(e) {
                            // A failed `redis.call`: its error table's text as it is.
                            Some(text) => {
                                let t = lua.create_table()?;
                                t.set("err", lua.create_string(text)?)?;
                                return with_where(lua, t);
                            }
                            None => innermost(e),
                        },
                        other => other.to_string().unwrap_or_else(|_| "nil".into()),
                    };
                    let t = lua.create_table()?;
                    t.set("err", format!("ERR {msg}"))?;
                    t
                }
            };
            with_where(lua, table)
        })?;

        Ok(Engine {
            lua,
            cache: HashMap::new(),
            order: VecDeque::new(),
            backing,
            redis,
            runner,
            handler,
            deadline,
            resp,
        })
    }

    fn resp_version(&self) -> u8 {
        self.resp.load(Ordering::SeqCst)
    }

    /// The cached function of `body`, compiled and cached first if new.
    fn compile(&mut self, body: &[u8]) -> Result<(String, Function), Reply> {
        let sha = sha1_hex(body);
        if let Some(f) = self.cache.get(&sha) {
            return Ok((sha, f.clone()));
        }
        let compiled = self
            .lua
            .load(body)
            .set_name(CHUNK)
            .set_mode(ChunkMode::Text)
            .into_function();
        match compiled {
            Ok(f) => {
                self.cache.insert(sha.clone(), f.clone());
                self.order.push_back(sha.clone());
                while self.order.len() > MAX_SCRIPTS {
                    if let Some(old) = self.order.pop_front() {
                        self.cache.remove(&old);
                    }
                }
                Ok((sha, f))
            }
            Err(e) => {
                let msg = match &e {
                    mlua::Error::SyntaxError { message, .. } => message.clone(),
                    other => innermost(other),
                };
                Err(Reply::err(format!(
                    "Error compiling script (new function): {msg}"
                )))
            }
        }
    }

    /// Runs `function` with `KEYS` and `ARGV`, its `redis.call` running commands on `keys`.
    /// Returns `(ok, first result or error table)`.
    fn run(
        &mut self,
        server: &Server,
        function: &Function,
        script_keys: &[Vec<u8>],
        argv: &[Vec<u8>],
        read_only: bool,
        keys: &mut dyn Keys,
    ) -> mlua::Result<(bool, Value)> {
        let lua = &self.lua;
        self.resp.store(2, Ordering::SeqCst);
        let keys_table = lua.create_sequence_from(
            script_keys
                .iter()
                .map(|k| lua.create_string(k))
                .collect::<mlua::Result<Vec<_>>>()?,
        )?;
        let argv_table = lua.create_sequence_from(
            argv.iter()
                .map(|a| lua.create_string(a))
                .collect::<mlua::Result<Vec<_>>>()?,
        )?;
        self.backing.raw_set("KEYS", keys_table)?;
        self.backing.raw_set("ARGV", argv_table)?;
        lua.set_memory_limit(lua.used_memory() + SCRIPT_MEMORY)?;
        let resp = self.resp.clone();
        let mut client = Client {
            proto: 2,
            authenticated: true,
            ..Client::default()
        };
        // Both `redis.call` and `redis.pcall` run commands on the run's transaction.
        let shared = std::cell::RefCell::new((&mut client, keys));
        let command = |lua: &Lua, args: MultiValue| -> mlua::Result<Result<Value, Table>> {
            let reply = match command_args(&args) {
                Ok(argv) => {
                    let mut guard = shared.borrow_mut();
                    let (client, keys) = &mut *guard;
                    command::execute_in_script(server, client, &argv, *keys, read_only)
                }
                Err(msg) => Reply::err(msg),
            };
            match reply {
                Reply::Error(e) => {
                    let mut text = b"-".to_vec();
                    text.extend_from_slice(e.as_bytes());
                    Ok(Err(error_table(lua, &text)?))
                }
                other => Ok(Ok(to_lua(lua, other, resp.load(Ordering::SeqCst))?)),
            }
        };
        lua.scope(|scope| {
            // Rust functions, not Lua wrappers: a `return redis.call(...)` tail call keeps the
            // script's frame, so an error can say on which line it happened.
            let call =
                scope.create_function(|lua, args: MultiValue| match command(lua, args)? {
                    Ok(v) => Ok(v),
                    Err(t) => Err(mlua::Error::external(CallError(t.get::<String>("err")?))),
                })?;
            let pcall =
                scope.create_function(|lua, args: MultiValue| match command(lua, args)? {
                    Ok(v) => Ok(v),
                    Err(t) => Ok(Value::Table(t)),
                })?;
            self.redis.raw_set("call", call)?;
            self.redis.raw_set("pcall", pcall)?;
            let ran = self
                .runner
                .call::<(bool, Value)>((function.clone(), self.handler.clone()));
            self.redis.raw_set("call", Value::Nil)?;
            self.redis.raw_set("pcall", Value::Nil)?;
            ran
        })
    }
}

/// The arguments of a `redis.call`: strings, and numbers as Redis prints them (`%.17g`).
fn command_args(args: &MultiValue) -> Result<Vec<Vec<u8>>, &'static str> {
    if args.is_empty() {
        return Err("Please specify at least one argument for this redis lib call");
    }
    args.iter()
        .map(|v| match v {
            Value::String(s) => Ok(s.as_bytes().to_vec()),
            Value::Integer(n) => Ok(n.to_string().into_bytes()),
            Value::Number(n) => Ok(format_g17(*n).into_bytes()),
            _ => Err("Lua redis lib command arguments must be strings or integers"),
        })
        .collect()
}

/// `n` as C's `printf("%.17g")` prints it.
fn format_g17(n: f64) -> String {
    if n.is_nan() {
        return if n.is_sign_negative() { "-nan" } else { "nan" }.into();
    }
    if n.is_infinite() {
        return if n < 0.0 { "-inf" } else { "inf" }.into();
    }
    if n == 0.0 {
        return if n.is_sign_negative() { "-0" } else { "0" }.into();
    }
    // 17 significant digits in scientific form, then %g's choice and trimming.
    let sci = format!("{n:.16e}");
    let (mantissa, exp) = sci.split_once('e').expect("scientific form");
    let exp: i32 = exp.parse().expect("exponent");
    let trim = |s: &str| -> String {
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s.to_string()
        }
    };
    if (-4..17).contains(&exp) {
        let decimals = (16 - exp).max(0) as usize;
        trim(&format!("{n:.decimals$}"))
    } else {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{}e{sign}{:02}", trim(mantissa), exp.abs())
    }
}

/// A Redis error table `{err = "<CODE> <msg>"}` from `-CODE msg`, `-msg` or `msg`, as Redis
/// builds it (a missing code is `ERR`, a trailing newline is trimmed).
fn error_table(lua: &Lua, text: &[u8]) -> mlua::Result<Table> {
    let (code, msg): (&[u8], &[u8]) = match text.strip_prefix(b"-") {
        Some(rest) => match rest.iter().position(|b| *b == b' ') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (b"ERR", rest),
        },
        None => (b"ERR", text),
    };
    let msg = trim_newlines(msg);
    let mut err = code.to_vec();
    err.push(b' ');
    err.extend_from_slice(msg);
    let t = lua.create_table()?;
    t.set("err", lua.create_string(&err)?)?;
    Ok(t)
}

fn trim_newlines(mut s: &[u8]) -> &[u8] {
    while let [b'\r' | b'\n', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b'\r' | b'\n'] = s {
        s = rest;
    }
    s
}

/// A failed `redis.call`: raised as a Rust error carrying its error table's text.
#[derive(Debug)]
struct CallError(String);

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CallError {}

/// The text of a [`CallError`] inside `e`, if that is what it is.
fn call_error(e: &mlua::Error) -> Option<&str> {
    match e {
        mlua::Error::CallbackError { cause, .. } => call_error(cause),
        other => other.downcast_ref::<CallError>().map(|c| c.0.as_str()),
    }
}

/// `table` with where in the script the error happened (`source`, `line`): the innermost
/// frame of the script's own chunk, as Redis' error handler finds it.
fn with_where(lua: &Lua, table: Table) -> mlua::Result<Table> {
    for level in 1.. {
        let found = lua.inspect_stack(level, |d| {
            let source = d.source().source.map(|s| s.into_owned());
            (source, d.current_line())
        });
        match found {
            None => break,
            Some((Some(source), line)) if source == CHUNK => {
                table.set("source", source)?;
                if let Some(line) = line {
                    table.set("line", line as i64)?;
                }
                break;
            }
            Some(_) => {}
        }
    }
    Ok(table)
}

/// The text of an error from Rust code (the hook, a callback), without mlua's wrapping.
fn innermost(e: &mlua::Error) -> String {
    match e {
        mlua::Error::CallbackError { cause, .. } => innermost(cause),
        mlua::Error::RuntimeError(msg) => msg.clone(),
        other => other.to_string(),
    }
}

/// The reply to a script that raised `err` (Redis' `{err, source, line}` table).
fn error_reply(err: &Table, sha: &str) -> Reply {
    let msg = match err.raw_get::<Value>("err") {
        Ok(Value::String(s)) => s.to_string_lossy(),
        _ => "ERR unknown error".into(),
    };
    let source: Option<String> = err.raw_get("source").ok();
    let line: Option<i64> = err.raw_get("line").ok();
    match (source, line) {
        (Some(source), Some(line)) => {
            Reply::Error(format!("{msg} script: {sha}, on {source}:{line}."))
        }
        _ => Reply::Error(msg),
    }
}

/// A command's reply as a Lua value, as Redis converts it (RESP2: nil is `false`).
fn to_lua(lua: &Lua, reply: Reply, resp: u8) -> mlua::Result<Value> {
    Ok(match reply {
        Reply::Simple(s) => Value::Table(status_table(lua, s.as_bytes())?),
        Reply::Status(s) => Value::Table(status_table(lua, s.as_bytes())?),
        Reply::Error(e) => {
            let mut text = b"-".to_vec();
            text.extend_from_slice(e.as_bytes());
            Value::Table(error_table(lua, &text)?)
        }
        Reply::Int(n) => Value::Integer(n),
        Reply::Bulk(b) => Value::String(lua.create_string(&b)?),
        Reply::Verbatim(s) => Value::String(lua.create_string(&s)?),
        Reply::Bool(b) if resp >= 3 => Value::Boolean(b),
        Reply::Bool(b) => Value::Integer(i64::from(b)),
        Reply::Double(text) => Value::String(lua.create_string(&text)?),
        Reply::Null if resp >= 3 => Value::Nil,
        Reply::Null => Value::Boolean(false),
        Reply::Array(items) | Reply::Set(items) => {
            let t = lua.create_table()?;
            for (i, item) in items.into_iter().enumerate() {
                t.raw_set(i + 1, to_lua(lua, item, resp)?)?;
            }
            Value::Table(t)
        }
        Reply::Map(pairs) if resp >= 3 => {
            let map = lua.create_table()?;
            for (k, v) in pairs {
                map.raw_set(to_lua(lua, k, resp)?, to_lua(lua, v, resp)?)?;
            }
            let t = lua.create_table()?;
            t.raw_set("map", map)?;
            Value::Table(t)
        }
        Reply::Map(pairs) => {
            let t = lua.create_table()?;
            for (i, (k, v)) in pairs.into_iter().enumerate() {
                t.raw_set(2 * i + 1, to_lua(lua, k, resp)?)?;
                t.raw_set(2 * i + 2, to_lua(lua, v, resp)?)?;
            }
            Value::Table(t)
        }
    })
}

fn status_table(lua: &Lua, s: &[u8]) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    t.raw_set("ok", lua.create_string(s)?)?;
    Ok(t)
}

/// A script's result as a reply, as Redis converts it: a string is a bulk string, a number an
/// integer (truncated), `true` 1 and `false` nil (booleans after `redis.setresp(3)`),
/// `{err=...}` an error, `{ok=...}` a status, `{double=n}`, `{map=t}`, `{set=t}` the RESP3
/// types (their RESP2 forms for a RESP2 client), another table an array up to its first nil.
fn to_reply(value: &Value, resp: u8, depth: usize) -> Reply {
    if depth > MAX_DEPTH {
        return Reply::err("reached lua stack limit");
    }
    match value {
        Value::String(s) => Reply::Bulk(s.as_bytes().to_vec()),
        // After `redis.setresp(3)` booleans are booleans; before, Redis' RESP2 mapping.
        Value::Boolean(b) if resp >= 3 => Reply::Bool(*b),
        Value::Boolean(true) => Reply::Int(1),
        Value::Boolean(false) => Reply::Null,
        Value::Integer(n) => Reply::Int(*n),
        Value::Number(n) => Reply::Int(truncate(*n)),
        Value::Table(t) => {
            if let Ok(Value::String(e)) = t.raw_get::<Value>("err") {
                return Reply::Error(e.to_string_lossy());
            }
            if let Ok(Value::String(s)) = t.raw_get::<Value>("ok") {
                return Reply::Status(s.to_string_lossy());
            }
            match t.raw_get::<Value>("double") {
                Ok(Value::Number(n)) => return Reply::Double(format_g17(n)),
                Ok(Value::Integer(n)) => return Reply::Double(n.to_string()),
                _ => {}
            }
            if let Ok(Value::Table(map)) = t.raw_get::<Value>("map") {
                return Reply::Map(
                    map.pairs::<Value, Value>()
                        .filter_map(Result::ok)
                        .map(|(k, v)| {
                            (to_reply(&k, resp, depth + 1), to_reply(&v, resp, depth + 1))
                        })
                        .collect(),
                );
            }
            if let Ok(Value::Table(set)) = t.raw_get::<Value>("set") {
                return Reply::Set(
                    set.pairs::<Value, Value>()
                        .filter_map(Result::ok)
                        .map(|(k, _)| to_reply(&k, resp, depth + 1))
                        .collect(),
                );
            }
            let mut items = Vec::new();
            for i in 1.. {
                match t.raw_get::<Value>(i) {
                    Ok(Value::Nil) | Err(_) => break,
                    Ok(v) => items.push(to_reply(&v, resp, depth + 1)),
                }
            }
            Reply::Array(items)
        }
        _ => Reply::Null,
    }
}

/// A Lua number as C's `(long long)` cast on x86-64 gives it: truncated, and the "integer
/// indefinite" value for what does not fit.
fn truncate(n: f64) -> i64 {
    const LIMIT: f64 = 9_223_372_036_854_775_808.0; // 2^63
    if n.is_nan() || !(-LIMIT..LIMIT).contains(&n) {
        i64::MIN
    } else {
        n as i64
    }
}

fn noscript() -> Reply {
    Reply::Error("NOSCRIPT No matching script. Please use EVAL.".into())
}

/// SHA-1 as 40 lowercase hex digits.
pub(crate) fn sha1_hex(data: &[u8]) -> String {
    use std::fmt::Write as _;
    let digest = Sha1::digest(data);
    let mut out = String::with_capacity(40);
    for b in digest {
        let _ = write!(out, "{b:02x}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_print_like_percent_17g() {
        assert_eq!(format_g17(0.1), "0.10000000000000001");
        assert_eq!(format_g17(1e20), "1e+20");
        assert_eq!(format_g17(12_345_678_901_234_567.0), "12345678901234568");
        assert_eq!(format_g17(86400.0), "86400");
        assert_eq!(format_g17(1.5), "1.5");
        assert_eq!(format_g17(-2.5e-7), "-2.4999999999999999e-07");
    }

    #[test]
    fn error_tables_take_redis_codes() {
        let lua = Lua::new();
        let err = |s: &[u8]| -> String { error_table(&lua, s).unwrap().get("err").unwrap() };
        assert_eq!(err(b"-MY thing"), "MY thing");
        assert_eq!(err(b"-boom"), "ERR boom");
        assert_eq!(err(b"plain text"), "ERR plain text");
        assert_eq!(err(b"-"), "ERR ");
    }

    #[test]
    fn sha1_is_redis_sha1hex() {
        assert_eq!(sha1_hex(b""), "da39a3ee5e6b4b0d3255bfef95601890afd80709");
        assert_eq!(
            sha1_hex(b"return 1"),
            "e0e1f9fabfc9d4800c877a703b823ac0578ff8db"
        );
    }

    #[test]
    fn truncation_matches_c() {
        assert_eq!(truncate(-3.7), -3);
        assert_eq!(truncate(2f64.powi(63)), i64::MIN);
    }
}
