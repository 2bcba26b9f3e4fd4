//! The wire format: requests in (RESP multibulk or inline, as Redis parses them) and replies out
//! (RESP2 or RESP3, chosen per connection by `HELLO`).
//!
//! The parser is incremental: it keeps its place across reads, so a large argument arriving in
//! many packets is parsed once, and an argument over the value limit is skipped as it streams in
//! instead of being buffered (the command then gets an error reply and the connection lives on).

use std::fmt::Write as _;

/// Longest inline request or multibulk header line before the client is cut off, as in Redis.
const MAX_INLINE: usize = 64 * 1024;
/// Most arguments in one multibulk request (Redis' own limit).
const MAX_MULTIBULK: i64 = 1024 * 1024;
/// Longest bulk argument a client may announce (Redis' `proto-max-bulk-len` default, 512 MiB).
/// Announcing more is a protocol error; up to this, arguments over the value limit are skipped.
const MAX_BULK: i64 = 512 * 1024 * 1024;

/// A request as parsed: its arguments, or the length of one that was over the limit.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Request {
    /// The arguments, command name first.
    Args(Vec<Vec<u8>>),
    /// Some argument (this long) was over the value limit: answered with an error, not run.
    Oversize(usize),
}

/// A malformed request: answered with `-ERR Protocol error: <reason>`, then the connection closes.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct ProtocolError(pub(crate) String);

/// Where the parser is inside a multibulk request.
#[derive(Debug, Default, Clone)]
struct Multibulk {
    /// Arguments still to come.
    remaining: usize,
    /// Arguments read so far.
    args: Vec<Vec<u8>>,
    /// Length of the current bulk argument, once its `$` line was read.
    bulk: Option<usize>,
    /// Bytes of an oversize argument still to discard (its `\r\n` included).
    skip: usize,
    /// Set once an argument was over the limit: the request is answered with an error.
    oversize: Option<usize>,
}

/// Incremental request parser. Feed it the connection's buffer; it consumes what it parsed.
#[derive(Debug, Clone)]
pub(crate) struct Parser {
    /// Longest argument kept; longer ones are skipped and the request refused.
    max_arg: usize,
    /// A multibulk request in progress, if any.
    multibulk: Option<Multibulk>,
}

impl Parser {
    /// A parser that refuses (without buffering) arguments longer than `max_arg` bytes.
    pub(crate) fn new(max_arg: usize) -> Parser {
        Parser {
            max_arg,
            multibulk: None,
        }
    }

    /// The next complete request in `buf[*pos..]`, advancing `*pos` past what it consumed.
    /// `Ok(None)`: more bytes are needed (everything usable was consumed).
    ///
    /// # Errors
    ///
    /// A malformed request; the connection must be answered and closed.
    pub(crate) fn next(
        &mut self,
        buf: &[u8],
        pos: &mut usize,
    ) -> Result<Option<Request>, ProtocolError> {
        loop {
            if self.multibulk.is_none() {
                let Some(&first) = buf.get(*pos) else {
                    return Ok(None);
                };
                if first != b'*' {
                    match self.inline(buf, pos)? {
                        Some(args) if args.is_empty() => continue, // blank line: nothing to do
                        Some(args) => return Ok(Some(Request::Args(args))),
                        None => return Ok(None),
                    }
                }
                let Some(line) = line(buf, *pos)? else {
                    return Ok(None);
                };
                let count = parse_i64(&buf[*pos + 1..line])
                    .filter(|n| *n <= MAX_MULTIBULK)
                    .ok_or_else(|| ProtocolError("invalid multibulk length".into()))?;
                *pos = line + 2;
                if count <= 0 {
                    continue; // `*0` and `*-1` are empty requests, skipped like Redis does
                }
                self.multibulk = Some(Multibulk {
                    remaining: count as usize,
                    args: Vec::with_capacity((count as usize).min(1024)),
                    ..Multibulk::default()
                });
            }
            let mb = self.multibulk.as_mut().expect("set above");
            while mb.remaining > 0 {
                if mb.skip > 0 {
                    let take = mb.skip.min(buf.len() - *pos);
                    *pos += take;
                    mb.skip -= take;
                    if mb.skip > 0 {
                        return Ok(None);
                    }
                    mb.remaining -= 1;
                    continue;
                }
                let len = match mb.bulk {
                    Some(len) => len,
                    None => {
                        let Some(&first) = buf.get(*pos) else {
                            return Ok(None);
                        };
                        if first != b'$' {
                            let got = char::from(first);
                            return Err(ProtocolError(format!("expected '$', got '{got}'")));
                        }
                        let Some(line) = line(buf, *pos)? else {
                            return Ok(None);
                        };
                        let len = parse_i64(&buf[*pos + 1..line])
                            .filter(|n| (0..=MAX_BULK).contains(n))
                            .ok_or_else(|| ProtocolError("invalid bulk length".into()))?
                            as usize;
                        *pos = line + 2;
                        if len > self.max_arg {
                            mb.oversize = Some(mb.oversize.unwrap_or(0).max(len));
                            mb.skip = len + 2;
                            continue;
                        }
                        mb.bulk = Some(len);
                        len
                    }
                };
                if buf.len() - *pos < len + 2 {
                    return Ok(None);
                }
                mb.args.push(buf[*pos..*pos + len].to_vec());
                *pos += len + 2; // the trailing CRLF is not checked, as in Redis
                mb.bulk = None;
                mb.remaining -= 1;
            }
            let mb = self.multibulk.take().expect("set above");
            return Ok(Some(match mb.oversize {
                Some(len) => Request::Oversize(len),
                None => Request::Args(mb.args),
            }));
        }
    }

    /// An inline request (`SET k v\r\n`, as typed into telnet), split like Redis' `sdssplitargs`.
    fn inline(
        &mut self,
        buf: &[u8],
        pos: &mut usize,
    ) -> Result<Option<Vec<Vec<u8>>>, ProtocolError> {
        let rest = &buf[*pos..];
        let Some(nl) = memchr(b'\n', rest) else {
            if rest.len() > MAX_INLINE {
                return Err(ProtocolError("too big inline request".into()));
            }
            return Ok(None);
        };
        let mut line = &rest[..nl];
        if line.last() == Some(&b'\r') {
            line = &line[..line.len() - 1];
        }
        let args =
            split_args(line).ok_or_else(|| ProtocolError("unbalanced quotes in request".into()))?;
        *pos += nl + 1;
        Ok(Some(args))
    }
}

/// Index of the `\r` ending the line that starts at `start`, if the whole line is there.
fn line(buf: &[u8], start: usize) -> Result<Option<usize>, ProtocolError> {
    let rest = &buf[start..];
    match memchr(b'\r', rest) {
        Some(i) if rest.len() > i + 1 => Ok(Some(start + i)),
        Some(_) => Ok(None),
        None if rest.len() > MAX_INLINE => Err(ProtocolError("too big mbulk count string".into())),
        None => Ok(None),
    }
}

fn memchr(needle: u8, haystack: &[u8]) -> Option<usize> {
    haystack.iter().position(|b| *b == needle)
}

/// A decimal integer with an optional sign, no spaces, no leading `+` (Redis' `string2ll`).
pub(crate) fn parse_i64(digits: &[u8]) -> Option<i64> {
    let s = std::str::from_utf8(digits).ok()?;
    if s.is_empty() || s.starts_with('+') || (s.len() > 1 && s.starts_with('0')) {
        return None;
    }
    if s.starts_with("-0") {
        return None;
    }
    s.parse().ok()
}

/// Splits an inline request into arguments: spaces separate, `"..."` takes C escapes
/// (`\n`, `\xHH`...), `'...'` takes `\'`; a closing quote must end the argument.
/// `None` for unbalanced quotes.
fn split_args(line: &[u8]) -> Option<Vec<Vec<u8>>> {
    let mut args = Vec::new();
    let mut i = 0;
    loop {
        while i < line.len() && line[i].is_ascii_whitespace() {
            i += 1;
        }
        if i == line.len() {
            return Some(args);
        }
        let mut arg = Vec::new();
        let mut quote: Option<u8> = None;
        loop {
            match quote {
                Some(q) => {
                    let c = *line.get(i)?; // end inside quotes: unbalanced
                    if q == b'"' && c == b'\\' && i + 3 < line.len() && line[i + 1] == b'x' {
                        let hex = std::str::from_utf8(&line[i + 2..i + 4]).ok();
                        if let Some(byte) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                            arg.push(byte);
                            i += 4;
                            continue;
                        }
                    }
                    if c == b'\\' && i + 1 < line.len() && q == b'"' {
                        arg.push(match line[i + 1] {
                            b'n' => b'\n',
                            b'r' => b'\r',
                            b't' => b'\t',
                            b'b' => 8,
                            b'a' => 7,
                            other => other,
                        });
                        i += 2;
                    } else if c == b'\\' && q == b'\'' && line.get(i + 1) == Some(&b'\'') {
                        arg.push(b'\'');
                        i += 2;
                    } else if c == q {
                        // The closing quote must be followed by a space or the end.
                        i += 1;
                        if i < line.len() && !line[i].is_ascii_whitespace() {
                            return None;
                        }
                        break;
                    } else {
                        arg.push(c);
                        i += 1;
                    }
                }
                None => match line.get(i) {
                    None => break,
                    Some(c) if c.is_ascii_whitespace() => break,
                    Some(&c @ (b'"' | b'\'')) => {
                        quote = Some(c);
                        i += 1;
                    }
                    Some(&c) => {
                        arg.push(c);
                        i += 1;
                    }
                },
            }
        }
        args.push(arg);
    }
}

/// A reply, encoded per the connection's protocol by [`Reply::encode`].
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Reply {
    /// `+OK`.
    Simple(&'static str),
    /// `+text`: a status a script made (`redis.status_reply`, `{ok = ...}`).
    Status(String),
    /// `-ERR ...`: the text includes its code (`ERR`, `NOAUTH`...).
    Error(String),
    /// `:n`.
    Int(i64),
    /// `$n` bytes.
    Bulk(Vec<u8>),
    /// The null reply: `$-1` in RESP2, `_` in RESP3.
    Null,
    /// `*n` replies.
    Array(Vec<Reply>),
    /// A RESP3 map (`%n`), a flat array of keys and values in RESP2.
    Map(Vec<(Reply, Reply)>),
    /// A RESP3 set (`~n`), an array in RESP2.
    Set(Vec<Reply>),
    /// A RESP3 boolean (`#t`), `:1` / `:0` in RESP2.
    Bool(bool),
    /// A RESP3 double (`,1.5`) as printed, a bulk string in RESP2.
    Double(String),
    /// A RESP3 verbatim text string (`=n txt:...`), a bulk string in RESP2.
    Verbatim(String),
}

impl Reply {
    /// `ERR <text>`.
    pub(crate) fn err(text: impl std::fmt::Display) -> Reply {
        Reply::Error(format!("ERR {text}"))
    }

    /// A bulk string from text.
    pub(crate) fn text(s: impl Into<String>) -> Reply {
        Reply::Bulk(s.into().into_bytes())
    }

    /// Appends the reply to `out` in protocol `proto` (2 or 3).
    pub(crate) fn encode(&self, proto: u8, out: &mut Vec<u8>) {
        let resp3 = proto >= 3;
        match self {
            Reply::Simple(s) => {
                out.push(b'+');
                out.extend_from_slice(s.as_bytes());
                out.extend_from_slice(b"\r\n");
            }
            // A status or an error is one line: a newline inside would end the reply early.
            Reply::Status(s) => one_line(out, b'+', s),
            Reply::Error(e) => one_line(out, b'-', e),
            Reply::Int(n) => header(out, b':', *n),
            Reply::Bulk(b) => bulk(out, b),
            Reply::Null if resp3 => out.extend_from_slice(b"_\r\n"),
            Reply::Null => out.extend_from_slice(b"$-1\r\n"),
            Reply::Array(items) => {
                header(out, b'*', items.len() as i64);
                items.iter().for_each(|r| r.encode(proto, out));
            }
            Reply::Set(items) => {
                header(out, if resp3 { b'~' } else { b'*' }, items.len() as i64);
                items.iter().for_each(|r| r.encode(proto, out));
            }
            Reply::Map(pairs) => {
                if resp3 {
                    header(out, b'%', pairs.len() as i64);
                } else {
                    header(out, b'*', 2 * pairs.len() as i64);
                }
                for (k, v) in pairs {
                    k.encode(proto, out);
                    v.encode(proto, out);
                }
            }
            Reply::Verbatim(text) if resp3 => {
                header(out, b'=', text.len() as i64 + 4);
                out.extend_from_slice(b"txt:");
                out.extend_from_slice(text.as_bytes());
                out.extend_from_slice(b"\r\n");
            }
            Reply::Verbatim(text) => bulk(out, text.as_bytes()),
            Reply::Bool(b) if resp3 => {
                out.extend_from_slice(if *b { b"#t\r\n" } else { b"#f\r\n" })
            }
            Reply::Bool(b) => header(out, b':', i64::from(*b)),
            Reply::Double(text) if resp3 => {
                out.push(b',');
                out.extend_from_slice(text.as_bytes());
                out.extend_from_slice(b"\r\n");
            }
            Reply::Double(text) => bulk(out, text.as_bytes()),
        }
    }
}

/// `kind` and `text` as one line: a CR or LF inside becomes a space.
fn one_line(out: &mut Vec<u8>, kind: u8, text: &str) {
    out.push(kind);
    out.extend(
        text.bytes()
            .map(|b| if b == b'\r' || b == b'\n' { b' ' } else { b }),
    );
    out.extend_from_slice(b"\r\n");
}

fn header(out: &mut Vec<u8>, kind: u8, n: i64) {
    out.push(kind);
    let mut s = String::new();
    let _ = write!(s, "{n}");
    out.extend_from_slice(s.as_bytes());
    out.extend_from_slice(b"\r\n");
}

fn bulk(out: &mut Vec<u8>, b: &[u8]) {
    header(out, b'$', b.len() as i64);
    out.extend_from_slice(b);
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every request in `input`, fed in pieces of `step` bytes.
    fn parse_in_steps(
        input: &[u8],
        step: usize,
        max_arg: usize,
    ) -> Result<Vec<Request>, ProtocolError> {
        let mut parser = Parser::new(max_arg);
        let mut buf = Vec::new();
        let mut out = Vec::new();
        for chunk in input.chunks(step) {
            buf.extend_from_slice(chunk);
            let mut pos = 0;
            while let Some(req) = parser.next(&buf, &mut pos)? {
                out.push(req);
            }
            buf.drain(..pos);
        }
        Ok(out)
    }

    fn args(list: &[&str]) -> Request {
        Request::Args(list.iter().map(|s| s.as_bytes().to_vec()).collect())
    }

    #[test]
    fn multibulk_and_inline_parse_whatever_the_packet_boundaries() {
        let input = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\nhello\r\nPING\r\n\r\n*0\r\nGET  k\r\n";
        for step in [1, 2, 3, 7, input.len()] {
            let got = parse_in_steps(input, step, 100).unwrap();
            assert_eq!(
                got,
                vec![
                    args(&["SET", "k", "hello"]),
                    args(&["PING"]),
                    args(&["GET", "k"])
                ]
            );
        }
    }

    #[test]
    fn oversize_argument_is_skipped_and_the_next_request_parses() {
        let input = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$10\r\n0123456789\r\n*1\r\n$4\r\nPING\r\n";
        for step in [1, 5, input.len()] {
            let got = parse_in_steps(input, step, 4).unwrap();
            assert_eq!(got, vec![Request::Oversize(10), args(&["PING"])]);
        }
    }

    #[test]
    fn malformed_frames_are_protocol_errors() {
        let err = |input: &[u8]| parse_in_steps(input, input.len(), 100).unwrap_err().0;
        assert_eq!(err(b"*a\r\n"), "invalid multibulk length");
        assert_eq!(err(b"*1\r\n$x\r\n"), "invalid bulk length");
        assert_eq!(err(b"*1\r\n$-1\r\n"), "invalid bulk length");
        assert_eq!(err(b"*1\r\n:1\r\n"), "expected '$', got ':'");
        assert_eq!(err(b"PING \"a\r\n"), "unbalanced quotes in request");
        assert_eq!(err(&[b'x'; MAX_INLINE + 1]), "too big inline request");
    }

    #[test]
    fn inline_quotes_follow_redis() {
        let split = |s: &str| split_args(s.as_bytes());
        let v = |l: &[&str]| Some(l.iter().map(|s| s.as_bytes().to_vec()).collect::<Vec<_>>());
        assert_eq!(split(r#"SET "a b" 'c d'"#), v(&["SET", "a b", "c d"]));
        assert_eq!(split(r#"ECHO "x\n\x41""#), v(&["ECHO", "x\nA"]));
        assert_eq!(split(r"ECHO 'it\'s'"), v(&["ECHO", "it's"]));
        assert_eq!(split(r#"ECHO "a"b"#), None);
        assert_eq!(split("   "), v(&[]));
    }

    #[test]
    fn integers_parse_like_string2ll() {
        assert_eq!(parse_i64(b"12"), Some(12));
        assert_eq!(parse_i64(b"-3"), Some(-3));
        assert_eq!(parse_i64(b"0"), Some(0));
        for bad in [
            &b""[..],
            b"+1",
            b"01",
            b" 1",
            b"1x",
            b"-0",
            b"99999999999999999999",
        ] {
            assert_eq!(parse_i64(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn replies_encode_in_both_protocols() {
        let enc = |r: Reply, proto| {
            let mut out = Vec::new();
            r.encode(proto, &mut out);
            String::from_utf8(out).unwrap()
        };
        assert_eq!(enc(Reply::Null, 2), "$-1\r\n");
        assert_eq!(enc(Reply::Null, 3), "_\r\n");
        let map = Reply::Map(vec![(Reply::text("proto"), Reply::Int(3))]);
        assert_eq!(enc(map.clone(), 2), "*2\r\n$5\r\nproto\r\n:3\r\n");
        assert_eq!(enc(map, 3), "%1\r\n$5\r\nproto\r\n:3\r\n");
        assert_eq!(enc(Reply::Verbatim("a".into()), 3), "=5\r\ntxt:a\r\n");
        assert_eq!(enc(Reply::Verbatim("a".into()), 2), "$1\r\na\r\n");
        assert_eq!(enc(Reply::err("x\r\ny"), 2), "-ERR x  y\r\n");
        assert_eq!(enc(Reply::Bool(true), 3), "#t\r\n");
        assert_eq!(enc(Reply::Bool(false), 2), ":0\r\n");
        assert_eq!(enc(Reply::Double("1.5".into()), 3), ",1.5\r\n");
        assert_eq!(enc(Reply::Double("1.5".into()), 2), "$3\r\n1.5\r\n");
    }
}
