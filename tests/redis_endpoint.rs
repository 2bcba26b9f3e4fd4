//! The Redis endpoint, black-box: the real `dedupd` binary with `DEDUPD_RELAY=off`, driven by the
//! real `redis` client crate, with the real local Redis (127.0.0.1:6379) as the oracle: the same
//! command sequences go to both, under a random key prefix that is deleted afterwards, and the
//! replies must be the same, over RESP2 and RESP3.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use redis::{Connection, Value};

use support::{dedupd, eventually, free_port, read_log, WAIT};

/// The shared local Redis the replies are compared with.
const ORACLE: &str = "redis://127.0.0.1:6379/";

/// A `dedupd` serving only its Redis endpoint (and `/healthz`).
struct Endpoint {
    child: Child,
    port: u16,
    http: u16,
    log: std::path::PathBuf,
}

impl Endpoint {
    /// Starts `dedupd` on `data` with `env` added, and waits until the endpoint accepts.
    fn start(data: &Path, env: &[(&str, &str)]) -> Endpoint {
        let (port, http) = (free_port(), free_port());
        let log = data.join(format!("dedupd-{:08x}.log", rand::random::<u32>()));
        let mut cmd = dedupd();
        cmd.env("DEDUPD_RELAY", "off")
            .env("DEDUPD_REDIS_ADDR", format!("127.0.0.1:{port}"))
            .env("DEDUPD_METRICS_ADDR", format!("127.0.0.1:{http}"))
            .env("DEDUPD_DATA_DIR", data)
            .env("DEDUPD_EXPECTED_IDS", "10000")
            .env("DEDUPD_CACHE_SIZE", "4M")
            .env("DEDUPD_LOG", "info,dedupd=debug");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        let mut endpoint = Endpoint {
            child: cmd.spawn().expect("start dedupd"),
            port,
            http,
            log,
        };
        let log = endpoint.log.clone();
        eventually(
            WAIT,
            || format!("endpoint never listened:\n{}", read_log(&log)),
            || {
                if let Ok(Some(status)) = endpoint.child.try_wait() {
                    panic!("dedupd exited with {status}:\n{}", endpoint.log());
                }
                TcpStream::connect(("127.0.0.1", port)).is_ok()
            },
        );
        endpoint
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn url(&self, query: &str) -> String {
        format!("redis://127.0.0.1:{}/{query}", self.port)
    }

    fn connect(&self, query: &str) -> Connection {
        redis::Client::open(self.url(query))
            .unwrap()
            .get_connection()
            .unwrap_or_else(|e| panic!("connect to dedupd: {e}\n{}", self.log()))
    }

    /// `kill -9`: no clean close, no snapshot.
    fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    fn healthz(&self) -> Option<u16> {
        support::http(self.http, "GET", "/healthz", None).map(|(status, _)| status)
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A random key prefix, and the oracle's keys under it deleted when dropped.
struct Prefix(String);

impl Prefix {
    fn new() -> Prefix {
        Prefix(format!("dedupd-test-{:016x}:", rand::random::<u64>()))
    }
}

impl Drop for Prefix {
    fn drop(&mut self) {
        if let Ok(mut con) = redis::Client::open(ORACLE).and_then(|c| c.get_connection()) {
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(format!("{}*", self.0))
                .query(&mut con)
                .unwrap_or_default();
            if !keys.is_empty() {
                let _: redis::RedisResult<i64> = redis::cmd("DEL").arg(keys).query(&mut con);
            }
        }
    }
}

fn oracle(query: &str) -> Connection {
    redis::Client::open(format!("{ORACLE}{query}"))
        .unwrap()
        .get_connection()
        .expect("the differential tests need the local Redis on 127.0.0.1:6379")
}

/// Runs `cmd` and returns its reply as a comparable string; errors are replies too.
fn reply(con: &mut Connection, cmd: &redis::Cmd) -> String {
    let mut pipe = redis::pipe();
    pipe.add_command(cmd.clone()).ignore_errors();
    match pipe.query::<Vec<Value>>(con) {
        Ok(mut values) => normalize(values.remove(0)),
        Err(e) => format!("client error: {e}"),
    }
}

/// A reply as text; TTLs in milliseconds are rounded to the second, as two servers asked a few
/// microseconds apart differ in the last digits.
fn normalize(v: Value) -> String {
    format!("{v:?}")
}

/// The command sequence of the differential test; `{p}` is the prefix. Each step is sent to both
/// servers, in order, and must get the same reply.
fn script(p: &str) -> Vec<redis::Cmd> {
    let far = 4_102_444_800u64; // 2100-01-01, for EXAT
    let c = |args: &[&str]| {
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(a.replace("{p}", p));
        }
        cmd
    };
    let far_s = far.to_string();
    let far_ms = (far * 1000).to_string();
    vec![
        c(&["PING"]),
        c(&["PING", "hello"]),
        c(&["ECHO", "x y"]),
        c(&["SELECT", "0"]),
        // The seed's pattern: first SET NX EX wins, the next is refused.
        c(&["SET", "{p}msg:1", "1", "NX", "EX", "100"]),
        c(&["SET", "{p}msg:1", "1", "NX", "EX", "100"]),
        c(&["GET", "{p}msg:1"]),
        c(&["TTL", "{p}msg:1"]),
        c(&["SET", "{p}msg:1", "2", "XX", "GET", "EX", "100"]),
        c(&["GET", "{p}msg:1"]),
        c(&["SET", "{p}msg:2", "v", "PX", "100000", "NX", "GET"]),
        c(&["SET", "{p}msg:2", "w", "NX", "GET", "EX", "5"]),
        c(&["SET", "{p}msg:3", "v", "XX"]),
        c(&["SET", "{p}msg:3", "v", "XX", "GET"]),
        c(&["SET", "{p}msg:1", "3", "KEEPTTL"]),
        c(&["TTL", "{p}msg:1"]),
        c(&["SET", "{p}msg:4", "v", "EXAT", &far_s]),
        c(&["TTL", "{p}msg:4"]),
        c(&["SET", "{p}msg:4", "v", "PXAT", &far_ms]),
        c(&["SET", "{p}gone", "v", "PXAT", "1"]),
        c(&["GET", "{p}gone"]),
        c(&["MGET", "{p}msg:1", "{p}nope", "{p}msg:2"]),
        c(&["EXISTS", "{p}msg:1", "{p}msg:2", "{p}nope", "{p}msg:1"]),
        c(&["SETNX", "{p}nx", "a"]),
        c(&["SETNX", "{p}nx", "b"]),
        c(&["GET", "{p}nx"]),
        c(&["SETEX", "{p}ex", "100", "v"]),
        c(&["PSETEX", "{p}pex", "100000", "v"]),
        c(&["TTL", "{p}ex"]),
        c(&["TTL", "{p}pex"]),
        c(&["TTL", "{p}nope"]),
        c(&["PTTL", "{p}nope"]),
        c(&["EXPIRE", "{p}ex", "200"]),
        c(&["TTL", "{p}ex"]),
        c(&["EXPIRE", "{p}ex", "100", "GT"]),
        c(&["EXPIRE", "{p}ex", "100", "LT"]),
        c(&["EXPIRE", "{p}ex", "300", "NX"]),
        c(&["EXPIRE", "{p}ex", "300", "XX"]),
        c(&["TTL", "{p}ex"]),
        c(&["EXPIRE", "{p}nope", "10"]),
        c(&["EXPIREAT", "{p}ex", &far_s]),
        c(&["TTL", "{p}ex"]),
        c(&["PEXPIREAT", "{p}ex", &far_ms]),
        c(&["PEXPIRE", "{p}pex", "0"]),
        c(&["EXISTS", "{p}pex"]),
        c(&["EXPIRE", "{p}msg:2", "-1"]),
        c(&["GET", "{p}msg:2"]),
        c(&["TYPE", "{p}msg:1"]),
        c(&["TYPE", "{p}nope"]),
        c(&["DEL", "{p}msg:1", "{p}nope", "{p}msg:1", "{p}nx"]),
        c(&["UNLINK", "{p}ex", "{p}msg:4"]),
        c(&["EXISTS", "{p}msg:1", "{p}ex"]),
        // GETDEL, GETEX, GETSET.
        c(&["SET", "{p}gd", "v"]),
        c(&["GETDEL", "{p}gd"]),
        c(&["GETDEL", "{p}gd"]),
        c(&["EXISTS", "{p}gd"]),
        c(&["SET", "{p}gx", "v", "EX", "100"]),
        c(&["GETEX", "{p}gx"]),
        c(&["TTL", "{p}gx"]),
        c(&["GETEX", "{p}gx", "EX", "200"]),
        c(&["TTL", "{p}gx"]),
        c(&["GETEX", "{p}gx", "px", "300000", "PX", "400000"]),
        c(&["TTL", "{p}gx"]),
        c(&["GETEX", "{p}gx", "EXAT", &far_s]),
        c(&["TTL", "{p}gx"]),
        c(&["GETEX", "{p}gx", "PXAT", &far_ms]),
        c(&["GETEX", "{p}nope", "EX", "0"]),
        c(&["GETEX", "{p}gx", "EX", "0"]),
        c(&["GETEX", "{p}gx", "EX", "x"]),
        c(&["GETEX", "{p}gx", "PERSIST", "EX", "1"]),
        c(&["GETEX", "{p}gx", "EX", "1", "PERSIST"]),
        c(&["GETEX", "{p}gx", "EX", "1", "PX", "1"]),
        c(&["GETEX", "{p}gx", "EX"]),
        c(&["GETEX", "{p}gx", "FOO"]),
        c(&["GETEX", "{p}gx", "PXAT", "1"]),
        c(&["EXISTS", "{p}gx"]),
        c(&["GETSET", "{p}gs", "a"]),
        c(&["GETSET", "{p}gs", "b"]),
        c(&["GET", "{p}gs"]),
        c(&["GETDEL"]),
        c(&["GETEX"]),
        c(&["GETSET", "{p}gs"]),
        // Scripts: the seed's pattern and the lock recipes, KEYS/ARGV, reply conversions.
        c(&["EVAL", "return redis.call('set', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2])", "1", "{p}lock", "tok-1", "100"]),
        c(&["EVAL", "return redis.call('set', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2])", "1", "{p}lock", "tok-2", "100"]),
        c(&["EVAL", "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end", "1", "{p}lock", "tok-2"]),
        c(&["EVAL", "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end", "1", "{p}lock", "tok-1", "200000"]),
        c(&["TTL", "{p}lock"]),
        c(&["EVAL", "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end", "1", "{p}lock", "tok-1"]),
        c(&["EXISTS", "{p}lock"]),
        c(&["SCRIPT", "LOAD", "return {KEYS[1], ARGV[1], #KEYS, #ARGV}"]),
        c(&["EVALSHA", "c409b22118a2ba735eedfdba813c9a5a0dfebc85", "0"]),
        c(&["SCRIPT", "EXISTS", "C409B22118A2BA735EEDFDBA813C9A5A0DFEBC85", "ffffffffffffffffffffffffffffffffffffffff"]),
        c(&["EVAL", "return {KEYS[1], ARGV[1], #KEYS, #ARGV}", "2", "{p}a", "{p}b", "x"]),
        c(&["EVAL", "return {1, 2, {3, 'x'}, nil, 4}", "0"]),
        c(&["EVAL", "return {1, {err='x y'}, 3}", "0"]),
        c(&["EVAL", "return 3.99", "0"]),
        c(&["EVAL", "return -3.7", "0"]),
        c(&["EVAL", "return true", "0"]),
        c(&["EVAL", "return false", "0"]),
        c(&["EVAL", "return nil", "0"]),
        c(&["EVAL", "return {false, redis.call('get', KEYS[1])}", "1", "{p}nope"]),
        c(&["EVAL", "return {double=1.5}", "0"]),
        c(&["EVAL", "return {map={a=1}}", "0"]),
        c(&["EVAL", "return {set={a=true}}", "0"]),
        c(&["EVAL", "redis.setresp(3) return {true, false}", "0"]),
        c(&["EVAL", "return redis.status_reply('FINE')", "0"]),
        c(&["EVAL", "return {ok='fine'}", "0"]),
        c(&["EVAL", "return {err='MY error'}", "0"]),
        c(&["EVAL", "return redis.error_reply('MY thing')", "0"]),
        c(&["EVAL", "return redis.error_reply('boom')", "0"]),
        c(&["EVAL", "return redis.error_reply(5)", "0"]),
        c(&["EVAL", "return redis.sha1hex('')", "0"]),
        c(&["EVAL", "return redis.call('ping')", "0"]),
        c(&["EVAL", "return redis.pcall('set', KEYS[1], 'v', 'EX', '0')", "1", "{p}e"]),
        c(&["EVAL", "return redis.pcall('nosuch')", "0"]),
        c(&["EVAL", "local r = redis.pcall('nosuch') return r['err']", "0"]),
        c(&["EVAL", "return redis.call('set', KEYS[1], 0.1)", "1", "{p}num"]),
        c(&["EVAL", "return redis.call('get', KEYS[1])", "1", "{p}num"]),
        c(&["EVAL", "redis.setresp(3) return redis.call('get', KEYS[1])", "1", "{p}nope"]),
        c(&["EVAL", "return tostring(redis.call('get', KEYS[1]))", "1", "{p}nope"]),
        c(&["EVAL_RO", "return redis.call('get', KEYS[1])", "1", "{p}num"]),
        c(&["GETDEL", "{p}num"]),
        // Script errors, with Redis' texts (the script's SHA and line included).
        c(&["EVAL", "return 1", "-1"]),
        c(&["EVAL", "return 1", "2", "a"]),
        c(&["EVAL", "return 1", "x"]),
        c(&["EVAL"]),
        c(&["EVALSHA", "abc", "0"]),
        c(&["EVALSHA", "abc", "-1"]),
        c(&["EVALSHA", "0123456789012345678901234567890123456789", "0"]),
        c(&["EVAL", "return x(", "0"]),
        c(&["EVAL", "return redis.call('nosuch')", "0"]),
        c(&["EVAL", "return redis.call('get')", "0"]),
        c(&["EVAL", "return redis.call()", "0"]),
        c(&["EVAL", "return redis.call('get', {})", "0"]),
        c(&["EVAL", "return redis.call('eval', 'return 1', 0)", "0"]),
        c(&["EVAL", "return redis.call('set', KEYS[1], 'v', 'EX', '0')", "1", "{p}e"]),
        c(&["EVAL", "\nerror('boom')", "0"]),
        c(&["EVAL", "error({err='MINE x'})", "0"]),
        c(&["EVAL", "os.exit()", "0"]),
        c(&["EVAL", "return io", "0"]),
        c(&["EVAL", "return require('x')", "0"]),
        c(&["EVAL", "return loadfile", "0"]),
        c(&["EVAL", "x = 5", "0"]),
        c(&["EVAL", "string.x = 1", "0"]),
        c(&["EVAL", "rawset(_G, 'x', 1)", "0"]),
        c(&["EVAL", "return redis.setresp(4)", "0"]),
        c(&["EVAL", "return redis.sha1hex()", "0"]),
        c(&["EVAL_RO", "return redis.call('set', KEYS[1], 'v')", "1", "{p}e"]),
        c(&["SCRIPT", "LOAD", "return x("]),
        c(&["SCRIPT", "LOAD"]),
        c(&["SCRIPT", "EXISTS"]),
        c(&["SCRIPT", "FLUSH", "X"]),
        c(&["SCRIPT", "KILL"]),
        c(&["SCRIPT", "FOO"]),
        c(&["SCRIPT"]),
        // Errors, with Redis' exact texts.
        c(&["SET", "{p}e"]),
        c(&["SET", "{p}e", "v", "NX", "XX"]),
        c(&["SET", "{p}e", "v", "EX", "abc"]),
        c(&["SET", "{p}e", "v", "EX", "0"]),
        c(&["SET", "{p}e", "v", "PX", "-5"]),
        c(&["SET", "{p}e", "v", "EX", "1", "PX", "1"]),
        c(&["SET", "{p}e", "v", "KEEPTTL", "EX", "1"]),
        c(&["SET", "{p}e", "v", "EX"]),
        c(&["SET", "{p}e", "v", "BOGUS"]),
        c(&["SETEX", "{p}e", "0", "v"]),
        c(&["SETEX", "{p}e", "x", "v"]),
        c(&["PSETEX", "{p}e", "-1", "v"]),
        c(&["SETNX", "{p}e"]),
        c(&["GET"]),
        c(&["GET", "{p}e", "x"]),
        c(&["MGET"]),
        c(&["EXPIRE", "{p}e"]),
        c(&["EXPIRE", "{p}e", "10", "NX", "XX"]),
        c(&["EXPIRE", "{p}e", "10", "GT", "LT"]),
        c(&["EXPIRE", "{p}e", "10", "FOO"]),
        c(&["EXPIRE", "{p}e", "ten"]),
        c(&["TTL"]),
        c(&["SELECT", "x"]),
        c(&["PING", "a", "b"]),
        c(&["FOOBAR", "{p}e", "x"]),
        c(&["FOOBAR"]),
        c(&["SCAN", "x"]),
        c(&["SCAN", "0", "COUNT", "0"]),
        c(&["SCAN", "0", "COUNT", "x"]),
        c(&["SCAN", "0", "MATCH"]),
        c(&["CLIENT", "SETNAME", "a b"]),
        c(&["CLIENT", "NOSUCH"]),
        c(&["CLIENT", "SETNAME", "dedupd-test"]),
        c(&["CLIENT", "GETNAME"]),
        c(&["CLIENT", "SETNAME"]),
        c(&["EXISTS", "{p}e"]),
    ]
}

/// Runs [`script`] against the oracle and dedupd over `query`'s protocol; returns the mismatches.
fn differential(query: &str) {
    let data = tempfile::tempdir().unwrap();
    let endpoint = Endpoint::start(data.path(), &[]);
    let prefix = Prefix::new();
    let mut redis = oracle(query);
    let mut ours = endpoint.connect(query);
    let mut mismatches = Vec::new();
    let steps = script(&prefix.0);
    for cmd in &steps {
        let want = reply(&mut redis, cmd);
        let got = reply(&mut ours, cmd);
        if want != got {
            let shown = String::from_utf8_lossy(&cmd.get_packed_command()).replace("\r\n", " ");
            mismatches.push(format!("{shown}\n   redis: {want}\n  dedupd: {got}"));
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} of {} replies differ from Redis':\n{}",
        mismatches.len(),
        steps.len(),
        mismatches.join("\n")
    );
}

#[test]
fn replies_are_redis_replies_over_resp2() {
    differential("");
}

#[test]
fn replies_are_redis_replies_over_resp3() {
    differential("?protocol=resp3");
}

/// Sends raw bytes on a fresh connection and reads until `expect` replies' worth is in or EOF.
fn raw(port: u16, bytes: &[u8], until: impl Fn(&[u8]) -> bool) -> (Vec<u8>, bool) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(bytes).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (out, true),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(_) => return (out, false),
        }
        if until(&out) {
            return (out, false);
        }
    }
}

fn lines(n: usize) -> impl Fn(&[u8]) -> bool {
    move |out: &[u8]| out.windows(2).filter(|w| w == b"\r\n").count() >= n
}

#[test]
fn inline_commands_and_pipelines_match_redis_byte_for_byte() {
    let data = tempfile::tempdir().unwrap();
    let endpoint = Endpoint::start(data.path(), &[]);
    let prefix = Prefix::new();
    let p = &prefix.0;
    // Inline requests (telnet style, with quotes), then a multibulk pipeline, in one write.
    let mut bytes = format!(
        "PING\r\n\r\nSET {p}a \"x y\" NX EX 100\r\nGET {p}a\r\nECHO 'it\\'s'\r\nEXISTS {p}a {p}b\n"
    )
    .into_bytes();
    for i in 0..50 {
        let key = format!("{p}k{i}");
        bytes.extend_from_slice(
            format!("*6\r\n$3\r\nSET\r\n${}\r\n{key}\r\n$1\r\n1\r\n$2\r\nNX\r\n$2\r\nEX\r\n$3\r\n100\r\n", key.len())
                .as_bytes(),
        );
    }
    bytes.extend_from_slice(b"*-1\r\n*0\r\n*2\r\n$4\r\nPING\r\n$2\r\nhi\r\nQUIT\r\n");
    let (want, want_closed) = raw(6379, &bytes, |_| false);
    let (got, got_closed) = raw(endpoint.port, &bytes, |_| false);
    assert_eq!(
        String::from_utf8_lossy(&got),
        String::from_utf8_lossy(&want)
    );
    assert!(want_closed && got_closed, "QUIT closes");
}

#[test]
fn malformed_frame_closes_that_connection_only() {
    let data = tempfile::tempdir().unwrap();
    let endpoint = Endpoint::start(data.path(), &[]);
    let mut bystander = endpoint.connect("");
    for bad in [
        &b"*1\r\n$x\r\n"[..],
        b"*a\r\n",
        b"*1\r\n:5\r\n",
        b"PING \"open\r\n",
    ] {
        let (want, want_closed) = raw(6379, bad, lines(1));
        let want_closed = want_closed || raw_closed_after(6379, bad);
        let (got, _) = raw(endpoint.port, bad, lines(1));
        assert_eq!(
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(&want)
        );
        assert!(want_closed, "Redis closes after {bad:?}");
        assert!(
            raw_closed_after(endpoint.port, bad),
            "dedupd closes after {bad:?}"
        );
    }
    let pong: String = redis::cmd("PING").query(&mut bystander).unwrap();
    assert_eq!(pong, "PONG", "other connections live on");
}

/// A client that sends each request as soon as the last reply is in, as a lone `-c1` client
/// does: dedupd's writer then reads that client's next requests itself, and must hand it back
/// to its connection for anything else (a command off the store, a request split over two
/// reads, a malformed one) without losing or holding up a byte. Same transcript as Redis.
#[test]
fn a_client_sending_each_request_as_its_reply_arrives_gets_redis_replies() {
    let data = tempfile::tempdir().unwrap();
    let endpoint = Endpoint::start(data.path(), &[]);
    let prefix = Prefix::new();
    let p = &prefix.0;
    let set = |i: usize| format!("SET {p}k{i} {i} NX EX 100\r\n").into_bytes();
    // (request, in the pieces it is written in, and the reply's lines)
    let mut steps: Vec<(Vec<Vec<u8>>, usize)> = Vec::new();
    // Writes each followed by a read: first more in a row than the writer keeps a client for,
    // then with a command that does not touch the store now and then.
    for i in 0..150 {
        steps.push((vec![set(i)], 1));
        steps.push((vec![format!("GET {p}k{i}\r\n").into_bytes()], 2));
        if i >= 70 && i % 10 == 0 {
            steps.push((vec![b"PING\r\n".to_vec()], 1));
        }
    }
    // A command off the store that arrives in two reads.
    steps.push((vec![b"*1\r\n$4\r\nPI".to_vec(), b"NG\r\n".to_vec()], 1));
    // A request that arrives in two reads.
    let key = format!("{p}k7");
    steps.push((
        vec![
            b"*2\r\n$3\r\nGET\r\n".to_vec(),
            format!("${}\r\n{key}\r\n", key.len()).into_bytes(),
        ],
        2,
    ));
    steps.push((
        vec![format!("EXISTS {p}k1 {p}k2 {p}nope\r\n").into_bytes()],
        1,
    ));
    steps.push((vec![set(1000)], 1));
    // A malformed request right after a write's reply: an error, then the connection closes.
    steps.push((vec![b"*1\r\n$x\r\n".to_vec()], 1));

    let transcript = |port: u16| {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut all = Vec::new();
        for (pieces, want_lines) in &steps {
            for (n, piece) in pieces.iter().enumerate() {
                if n > 0 {
                    // Long enough that the first piece is read on its own.
                    std::thread::sleep(Duration::from_millis(5));
                }
                s.write_all(piece).unwrap();
            }
            let mut reply = Vec::new();
            let mut buf = [0u8; 4096];
            while !lines(*want_lines)(&reply) {
                match s.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => reply.extend_from_slice(&buf[..n]),
                    Err(e) => panic!("no reply to {pieces:?} within 5 s: {e}"),
                }
            }
            all.extend_from_slice(&reply);
        }
        let closed = matches!(s.read(&mut [0u8; 1]), Ok(0));
        (String::from_utf8_lossy(&all).into_owned(), closed)
    };
    // Both start without the prefix's keys; `prefix` clears Redis' when dropped.
    let (got, got_closed) = transcript(endpoint.port);
    let (want, want_closed) = transcript(6379);
    assert_eq!(got, want);
    assert!(want_closed && got_closed, "a malformed request closes");
}

/// Whether the server closes the connection after replying to `bytes`.
fn raw_closed_after(port: u16, bytes: &[u8]) -> bool {
    raw(port, bytes, |_| false).1
}

#[test]
fn oversize_values_and_long_keys_are_error_replies_and_the_connection_stays() {
    let data = tempfile::tempdir().unwrap();
    let endpoint = Endpoint::start(
        data.path(),
        &[
            ("DEDUPD_REDIS_MAX_VALUE", "1K"),
            ("DEDUPD_MAX_ID_BYTES", "16"),
        ],
    );
    let mut con = endpoint.connect("");
    let big = vec![b'x'; 4096];
    let err = redis::cmd("SET")
        .arg("k")
        .arg(&big)
        .query::<String>(&mut con)
        .unwrap_err();
    assert!(
        err.to_string().contains("over the limit of 1024 bytes"),
        "{err}"
    );
    let err = redis::cmd("SET")
        .arg("k".repeat(17))
        .arg("v")
        .query::<String>(&mut con)
        .unwrap_err();
    assert!(
        err.to_string().contains("17 bytes, over the limit of 16"),
        "{err}"
    );
    let ok: String = redis::cmd("SET")
        .arg("k")
        .arg(vec![b'y'; 1024])
        .query(&mut con)
        .unwrap();
    assert_eq!(ok, "OK");
    let len: Vec<u8> = redis::cmd("GET").arg("k").query(&mut con).unwrap();
    assert_eq!(len.len(), 1024);
}

#[test]
fn acknowledged_sets_survive_kill_9() {
    let data = tempfile::tempdir().unwrap();
    let endpoint = Endpoint::start(data.path(), &[]);
    let keys: Vec<String> = (0..2000)
        .map(|i| format!("msg:{i}-{:08x}", rand::random::<u32>()))
        .collect();
    let mut con = endpoint.connect("");
    // One pipeline of SET NX EX, every reply read: each OK means durable.
    let mut pipe = redis::pipe();
    for k in &keys {
        pipe.cmd("SET").arg(k).arg(1).arg("NX").arg("EX").arg(3600);
    }
    let replies: Vec<Option<String>> = pipe.query(&mut con).unwrap();
    assert!(replies.iter().all(|r| r.as_deref() == Some("OK")));
    endpoint.kill9();

    let endpoint = Endpoint::start(data.path(), &[]);
    let mut con = endpoint.connect("");
    let mut exists = redis::cmd("EXISTS");
    exists.arg(&keys);
    let n: usize = exists.query(&mut con).unwrap();
    assert_eq!(
        n,
        keys.len(),
        "every acknowledged key is there after kill -9"
    );
    // And the seed's pattern still says "seen" for them.
    let again: Option<String> = redis::cmd("SET")
        .arg(&keys[0])
        .arg(1)
        .arg("NX")
        .arg("EX")
        .arg(3600)
        .query(&mut con)
        .unwrap();
    assert_eq!(again, None);
}

#[test]
fn expiry_follows_px_pexpire_and_pxat_in_the_past() {
    let data = tempfile::tempdir().unwrap();
    let endpoint = Endpoint::start(data.path(), &[("DEDUPD_TTL", "1h")]);
    let mut con = endpoint.connect("");
    let set = |con: &mut Connection, args: &[&str]| -> Option<String> {
        redis::cmd("SET").arg(args).query(con).unwrap()
    };
    // No expiry given: the window (1 h).
    set(&mut con, &["plain", "v"]);
    let ttl: i64 = redis::cmd("TTL").arg("plain").query(&mut con).unwrap();
    assert_eq!(ttl, 3600);
    // PX 30: there now, gone 30 ms later, and new again for SET NX.
    assert_eq!(
        set(&mut con, &["short", "v", "NX", "PX", "30"]).as_deref(),
        Some("OK")
    );
    assert_eq!(set(&mut con, &["short", "v", "NX", "PX", "30"]), None);
    let pttl = |con: &mut Connection, key: &str| -> i64 {
        redis::cmd("PTTL").arg(key).query(con).unwrap()
    };
    eventually(
        WAIT,
        || "PX 30 never expired".into(),
        || pttl(&mut con, "short") == -2,
    );
    assert_eq!(
        set(&mut con, &["short", "v", "NX", "PX", "30"]).as_deref(),
        Some("OK")
    );
    // PEXPIRE 1 on a long-lived key.
    let one: i64 = redis::cmd("PEXPIRE")
        .arg("plain")
        .arg(1)
        .query(&mut con)
        .unwrap();
    assert_eq!(one, 1);
    let get = |con: &mut Connection| -> Option<String> {
        redis::cmd("GET").arg("plain").query(con).unwrap()
    };
    eventually(
        WAIT,
        || "PEXPIRE 1 never expired".into(),
        || get(&mut con).is_none(),
    );
    // PXAT in the past: OK, and no key.
    assert_eq!(
        set(&mut con, &["past", "v", "PXAT", "1000"]).as_deref(),
        Some("OK")
    );
    let n: i64 = redis::cmd("EXISTS").arg("past").query(&mut con).unwrap();
    assert_eq!(n, 0);
}

#[test]
fn scan_walks_every_key_once_with_match_and_count() {
    let data = tempfile::tempdir().unwrap();
    let endpoint = Endpoint::start(data.path(), &[]);
    let mut con = endpoint.connect("");
    let mut pipe = redis::pipe();
    for i in 0..250 {
        pipe.cmd("SET").arg(format!("msg:{i}")).arg(1).ignore();
        pipe.cmd("SET").arg(format!("req:{i}")).arg(1).ignore();
    }
    pipe.query::<()>(&mut con).unwrap();
    let mut seen: Vec<String> = redis::cmd("SCAN")
        .cursor_arg(0)
        .arg("MATCH")
        .arg("msg:*")
        .arg("COUNT")
        .arg(37)
        .clone()
        .iter(&mut con)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    seen.sort();
    let mut want: Vec<String> = (0..250).map(|i| format!("msg:{i}")).collect();
    want.sort();
    assert_eq!(seen, want);
    let size: i64 = redis::cmd("DBSIZE").query(&mut con).unwrap();
    assert_eq!(size, 500);
    let info: String = redis::cmd("INFO").query(&mut con).unwrap();
    assert!(info.contains("db0:keys=500,expires=500"), "{info}");
    assert!(info.contains("dedup_window_seconds:86400"), "{info}");
}

#[test]
fn password_is_required_and_checked() {
    let data = tempfile::tempdir().unwrap();
    let secret = format!("pw-{:016x}", rand::random::<u64>());
    let endpoint = Endpoint::start(data.path(), &[("DEDUPD_REDIS_PASSWORD", &secret)]);
    // No password: NOAUTH for everything but AUTH/HELLO/QUIT.
    let (got, _) = raw(endpoint.port, b"PING\r\nGET k\r\nHELLO 3\r\n", lines(3));
    let got = String::from_utf8_lossy(&got);
    assert!(got.starts_with("-NOAUTH Authentication required.\r\n-NOAUTH Authentication required.\r\n-NOAUTH HELLO must be called"), "{got}");
    // Wrong password: WRONGPASS, over RESP2 (AUTH) and RESP3 (HELLO 3 AUTH).
    for query in ["", "?protocol=resp3"] {
        let url = format!("redis://:wrong@127.0.0.1:{}/{query}", endpoint.port);
        let err = redis::Client::open(url)
            .unwrap()
            .get_connection()
            .err()
            .expect("refused");
        // RESP2 (AUTH) surfaces as AuthenticationFailed, RESP3 (HELLO 3 AUTH) as the server's
        // WRONGPASS error.
        let refused =
            err.kind() == redis::ErrorKind::AuthenticationFailed || err.code() == Some("WRONGPASS");
        assert!(refused, "{err:?}");
        let url = format!("redis://:{secret}@127.0.0.1:{}/{query}", endpoint.port);
        let mut con = redis::Client::open(url).unwrap().get_connection().unwrap();
        let pong: String = redis::cmd("PING").query(&mut con).unwrap();
        assert_eq!(pong, "PONG");
    }
    let (got, _) = raw(
        endpoint.port,
        format!("AUTH default {secret}\r\nPING\r\nAUTH nobody {secret}\r\n").as_bytes(),
        lines(3),
    );
    assert_eq!(
        String::from_utf8_lossy(&got),
        "+OK\r\n+PONG\r\n-WRONGPASS invalid username-password pair or user is disabled.\r\n"
    );
    assert_eq!(
        endpoint.healthz(),
        Some(200),
        "healthy while the endpoint listens"
    );
    assert!(
        !endpoint.log().contains(&secret),
        "the password is never logged"
    );
}

#[test]
fn non_loopback_address_without_password_is_refused() {
    let data = tempfile::tempdir().unwrap();
    let out = dedupd()
        .env("DEDUPD_RELAY", "off")
        .env("DEDUPD_REDIS_ADDR", format!("0.0.0.0:{}", free_port()))
        .env("DEDUPD_DATA_DIR", data.path())
        .env("DEDUPD_METRICS_ADDR", "off")
        .stdout(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("DEDUPD_REDIS_PASSWORD"), "{err}");
}

#[test]
fn relay_off_needs_no_broker() {
    // A broker address where nothing listens: with DEDUPD_RELAY=off it is never dialled.
    let data = tempfile::tempdir().unwrap();
    let dead = format!("amqp://guest:guest@127.0.0.1:{}/%2f", free_port());
    let endpoint = Endpoint::start(data.path(), &[("DEDUPD_AMQP_URL", &dead)]);
    let mut con = endpoint.connect("?protocol=resp3");
    let ok: String = redis::cmd("SET").arg("k").arg("v").query(&mut con).unwrap();
    assert_eq!(ok, "OK");
    assert_eq!(endpoint.healthz(), Some(200));
    let pid = endpoint.child.id().to_string();
    let _ = Command::new("kill").args(["-TERM", &pid]).status();
    let mut endpoint = endpoint;
    let status = endpoint.child.wait().unwrap();
    assert!(
        status.success(),
        "clean exit on SIGTERM:\n{}",
        endpoint.log()
    );
    assert!(
        !endpoint.log().contains("cannot connect to the broker"),
        "{}",
        endpoint.log()
    );
}

/// redis-py (`tests/clients/redis_py_scripts.py`): its `Lock` (acquire, extend, release, a
/// release or extend by the wrong owner refused) and `register_script` (EVALSHA, EVAL on
/// NOSCRIPT, pipelined), over RESP2 and RESP3, unchanged. CI installs redis-py (`.ci/run`).
#[test]
fn redis_py_lock_and_register_script_work_unchanged() {
    let data = tempfile::tempdir().unwrap();
    let endpoint = Endpoint::start(data.path(), &[]);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/redis_py_scripts.py");
    for resp in ["2", "3"] {
        let out = Command::new("python3")
            .arg(&script)
            .env("DEDUPD_PORT", endpoint.port.to_string())
            .env("RESP", resp)
            .output()
            .expect("python3 runs (CI installs it with redis-py: pip install redis)");
        assert!(
            out.status.success(),
            "redis-py over RESP{resp} failed:\n{}\n{}\ndedupd log:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            endpoint.log()
        );
    }
}

#[test]
fn script_writes_survive_kill_9_right_after_the_reply() {
    let data = tempfile::tempdir().unwrap();
    let endpoint = Endpoint::start(data.path(), &[]);
    let mut con = endpoint.connect("");
    // One script writes 500 keys; its reply means all of them are durable.
    let written: i64 = redis::cmd("EVAL")
        .arg(
            "for i = 1, tonumber(ARGV[1]) do \
               redis.call('set', KEYS[1] .. i, i, 'NX', 'EX', 3600) \
             end \
             return tonumber(ARGV[1])",
        )
        .arg(1)
        .arg("msg:")
        .arg(500)
        .query(&mut con)
        .unwrap();
    assert_eq!(written, 500);
    endpoint.kill9();

    let endpoint = Endpoint::start(data.path(), &[]);
    let mut con = endpoint.connect("");
    let mut exists = redis::cmd("EXISTS");
    for i in 1..=500 {
        exists.arg(format!("msg:{i}"));
    }
    let n: i64 = exists.query(&mut con).unwrap();
    assert_eq!(
        n, 500,
        "every write of the acknowledged script is there after kill -9"
    );
}

#[test]
fn script_kill_and_flush() {
    let data = tempfile::tempdir().unwrap();
    let endpoint = Endpoint::start(data.path(), &[("DEDUPD_REDIS_SCRIPT_TIMEOUT", "60s")]);
    let mut con = endpoint.connect("");
    let sha: String = redis::cmd("SCRIPT")
        .arg("LOAD")
        .arg("return 1")
        .query(&mut con)
        .unwrap();
    let flushed: String = redis::cmd("SCRIPT").arg("FLUSH").query(&mut con).unwrap();
    assert_eq!(flushed, "OK");
    let exists: Vec<i64> = redis::cmd("SCRIPT")
        .arg("EXISTS")
        .arg(&sha)
        .query(&mut con)
        .unwrap();
    assert_eq!(exists, vec![0]);
    // A script that never ends, killed from another connection.
    let mut busy = endpoint.connect("");
    let runner = std::thread::spawn(move || {
        redis::cmd("EVAL")
            .arg("while true do end")
            .arg(0)
            .query::<redis::Value>(&mut busy)
            .unwrap_err()
            .to_string()
    });
    let killed = eventually(
        WAIT,
        || "the script never ran".into(),
        || match redis::cmd("SCRIPT").arg("KILL").query::<String>(&mut con) {
            Ok(ok) => Some(ok),
            Err(e) => {
                assert_eq!(e.code(), Some("NOTBUSY"), "{e}");
                None
            }
        },
    );
    assert_eq!(killed, "OK");
    let err = runner.join().unwrap();
    assert!(err.contains("Script killed"), "{err}");
}

/// All or nothing: a script that errors after writing, or that runs past the time limit,
/// leaves the store as it was (stricter than Redis, which keeps the writes made before).
#[test]
fn failed_or_killed_script_leaves_the_store_unchanged() {
    let data = tempfile::tempdir().unwrap();
    let endpoint = Endpoint::start(data.path(), &[("DEDUPD_REDIS_SCRIPT_TIMEOUT", "300ms")]);
    let mut con = endpoint.connect("");
    let _: () = redis::cmd("SET")
        .arg("kept")
        .arg("before")
        .query(&mut con)
        .unwrap();
    let writes = "redis.call('set', 'kept', 'changed') \
                  redis.call('del', 'kept') \
                  redis.call('set', 'new', 'x') \
                  redis.call('set', 'kept', 'again') ";
    for (tail, wanted) in [
        ("error('halfway')", "user_script:1: halfway"),
        ("while true do end", "Script killed"),
        (
            "while true do pcall(function() while true do end end) end",
            "Script killed",
        ),
        // A coroutine gets the time limit too.
        (
            "coroutine.wrap(function() while true do end end)()",
            "Script killed",
        ),
    ] {
        let err = redis::cmd("EVAL")
            .arg(format!("{writes}{tail}"))
            .arg(0)
            .query::<redis::Value>(&mut con)
            .unwrap_err()
            .to_string();
        assert!(err.contains(wanted), "{err}");
        let kept: Option<String> = redis::cmd("GET").arg("kept").query(&mut con).unwrap();
        assert_eq!(kept.as_deref(), Some("before"), "after {tail}");
        let new: i64 = redis::cmd("EXISTS").arg("new").query(&mut con).unwrap();
        assert_eq!(new, 0, "after {tail}");
    }
    // And after a restart: nothing of them reached the disk either.
    endpoint.kill9();
    let endpoint = Endpoint::start(data.path(), &[]);
    let mut con = endpoint.connect("");
    let kept: Option<String> = redis::cmd("GET").arg("kept").query(&mut con).unwrap();
    assert_eq!(kept.as_deref(), Some("before"));
    let new: i64 = redis::cmd("EXISTS").arg("new").query(&mut con).unwrap();
    assert_eq!(new, 0);
}
