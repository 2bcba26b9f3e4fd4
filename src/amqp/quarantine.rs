//! Messages the AMQP client library cannot decode, taken out of the source queue.
//!
//! amqprs decodes every short string (`message_id`, `content_type`, the routing key...) and every
//! long string in a header table as UTF-8, and drops the whole connection when one is not. AMQP
//! does not require UTF-8 there and RabbitMQ passes such bytes through, so one message published
//! by a client in another language could stop dedupd for good: the broker redelivers it on every
//! new connection, and every connection dies on it.
//!
//! So after a connection died on an I/O error, [`sweep`] looks at the head of the source queue
//! over a minimal AMQP connection of its own that reads frames as bytes: it takes up to a
//! prefetch's worth of messages with `basic.get`, rejects without requeue (to the dead-letter
//! queue, nothing is dropped) each one amqprs could not decode, and closes its channel, which
//! puts every other message back where it was. The message that killed the connection is among
//! them: it was unacked, so the broker requeued it ahead of everything not yet delivered.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::config::Config;

/// Longest a whole sweep may take.
const SWEEP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long to wait for the dead connection's consumer to go (its messages are requeued then).
const CONSUMER_GONE_WAIT: Duration = Duration::from_secs(5);

/// AMQP frame types.
const METHOD: u8 = 1;
const HEADER: u8 = 2;
const BODY: u8 = 3;
const HEARTBEAT: u8 = 8;
const FRAME_END: u8 = 0xce;

/// What a sweep did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Swept {
    /// Messages looked at.
    pub(crate) inspected: usize,
    /// Messages dead-lettered because amqprs cannot decode them.
    pub(crate) rejected: usize,
}

/// Dead-letters the messages at the head of the source queue that amqprs cannot decode, looking
/// at no more than `DEDUPD_PREFETCH` of them.
///
/// # Errors
///
/// The broker cannot be reached or answers something unexpected; the next connection failure
/// tries again.
pub(crate) async fn sweep(config: &Config) -> Result<Swept, String> {
    if crate::amqp::current_url(&config.amqp).tls {
        return Err("not supported over amqps:// yet".into());
    }
    match tokio::time::timeout(SWEEP_TIMEOUT, run(config)).await {
        Ok(result) => result,
        Err(_) => Err(format!("no result within {SWEEP_TIMEOUT:?}")),
    }
}

async fn run(config: &Config) -> Result<Swept, String> {
    // The node the relay was connected to, or another if it had moved on.
    let url = crate::amqp::current_url(&config.amqp);
    let stream = TcpStream::connect((url.host.as_str(), url.port))
        .await
        .map_err(|e| format!("cannot connect: {e}"))?;
    let mut conn = Raw {
        stream: BufReader::new(stream),
    };
    conn.handshake(&url.user, url.password(), &url.vhost)
        .await?;
    conn.send(METHOD, 1, &method(20, 10, &[0])).await?; // channel.open
    conn.expect(1, (20, 11)).await?;

    // The dead connection's unacked messages return to the queue when the broker notices it is
    // gone, which its consumer leaving shows.
    let queue = config.relay.source_queue.as_bytes();
    let deadline = Instant::now() + CONSUMER_GONE_WAIT;
    loop {
        let mut args = 0u16.to_be_bytes().to_vec();
        short(&mut args, queue)?;
        args.push(0b0000_0001); // passive
        args.extend_from_slice(&0u32.to_be_bytes()); // no arguments
        conn.send(METHOD, 1, &method(50, 10, &args)).await?;
        let ok = conn.expect(1, (50, 11)).await?;
        let mut r = Reader(&ok);
        r.short()?;
        r.take(4)?;
        let consumers = u32::from_be_bytes(r.take(4)?.try_into().expect("4 bytes"));
        if consumers == 0 || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let mut swept = Swept::default();
    while swept.inspected < usize::from(config.relay.prefetch.get()) {
        let mut args = 0u16.to_be_bytes().to_vec();
        short(&mut args, queue)?;
        args.push(0); // manual ack: what we keep goes back on close
        conn.send(METHOD, 1, &method(60, 70, &args)).await?;
        let (kind, payload) = conn.recv().await?;
        match (kind, class_method(&payload)?) {
            (METHOD, (60, 72)) => break, // get-empty
            (METHOD, (60, 71)) => {}
            (METHOD, (20, 40)) => return Err(close_reason("the channel", &payload)),
            other => return Err(format!("unexpected frame {other:?} after basic.get")),
        }
        swept.inspected += 1;
        let mut r = Reader(&payload[4..]);
        let tag = u64::from_be_bytes(r.take(8)?.try_into().expect("8 bytes"));
        r.take(1)?; // redelivered
        let exchange = r.short()?.to_vec();
        let routing_key = r.short()?.to_vec();

        let (kind, header) = conn.recv().await?;
        if kind != HEADER || header.len() < 12 {
            return Err(format!("expected a content header, got frame type {kind}"));
        }
        let size = u64::from_be_bytes(header[4..12].try_into().expect("8 bytes"));
        let mut read = 0u64;
        while read < size {
            let (kind, body) = conn.recv().await?;
            if kind != BODY {
                return Err(format!("expected a content body, got frame type {kind}"));
            }
            read += body.len() as u64;
        }

        if let Some(why) = undecodable(&exchange, &routing_key, &header[12..]) {
            tracing::warn!(
                tag,
                cause = %why,
                size,
                "message that the AMQP client cannot decode: dead-lettering it"
            );
            let mut args = tag.to_be_bytes().to_vec();
            args.push(0); // no requeue: the dead-letter exchange keeps it
            conn.send(METHOD, 1, &method(60, 90, &args)).await?;
            swept.rejected += 1;
        }
    }
    // Closing the channel returns every message we did not reject, in its place.
    let mut args = 200u16.to_be_bytes().to_vec();
    short(&mut args, b"sweep done")?;
    args.extend_from_slice(&[0, 0, 0, 0]);
    conn.send(METHOD, 1, &method(20, 40, &args)).await?;
    conn.expect(1, (20, 41)).await?;
    conn.send(METHOD, 0, &method(10, 50, &args)).await?;
    let _ = conn.expect(0, (10, 51)).await;
    Ok(swept)
}

/// Why amqprs would fail on a delivery with these fields, if it would.
fn undecodable(exchange: &[u8], routing_key: &[u8], properties: &[u8]) -> Option<String> {
    if std::str::from_utf8(exchange).is_err() {
        return Some("exchange name is not UTF-8".into());
    }
    if std::str::from_utf8(routing_key).is_err() {
        return Some("routing key is not UTF-8".into());
    }
    // The same decoder amqprs runs on the content header, so the verdict cannot drift from it.
    amqp_serde::from_bytes::<amqprs::BasicProperties>(properties)
        .err()
        .map(|e| format!("properties do not decode: {e}"))
}

/// A minimal AMQP 0-9-1 connection that reads frames as bytes.
struct Raw {
    stream: BufReader<TcpStream>,
}

impl Raw {
    /// Protocol header, PLAIN login, tune (the broker's limits), open.
    async fn handshake(&mut self, user: &str, password: &str, vhost: &str) -> Result<(), String> {
        self.stream
            .write_all(b"AMQP\x00\x00\x09\x01")
            .await
            .map_err(io)?;
        self.expect(0, (10, 10)).await?; // connection.start
        let mut args = 0u32.to_be_bytes().to_vec(); // no client properties
        short(&mut args, b"PLAIN")?;
        let auth = format!("\0{user}\0{password}");
        args.extend_from_slice(&(auth.len() as u32).to_be_bytes());
        args.extend_from_slice(auth.as_bytes());
        short(&mut args, b"en_US")?;
        self.send(METHOD, 0, &method(10, 11, &args)).await?;
        let tune = self.expect(0, (10, 30)).await?;
        let mut r = Reader(&tune);
        let channel_max = r.take(2)?.to_vec();
        let frame_max = u32::from_be_bytes(r.take(4)?.try_into().expect("4 bytes"));
        let mut args = channel_max;
        args.extend_from_slice(&frame_max.to_be_bytes());
        args.extend_from_slice(&0u16.to_be_bytes()); // no heartbeats: a sweep is short
        self.send(METHOD, 0, &method(10, 31, &args)).await?;
        let mut args = Vec::new();
        short(&mut args, vhost.as_bytes())?;
        short(&mut args, b"")?;
        args.push(0);
        self.send(METHOD, 0, &method(10, 40, &args)).await?;
        self.expect(0, (10, 41)).await?;
        Ok(())
    }

    async fn send(&mut self, kind: u8, channel: u16, payload: &[u8]) -> Result<(), String> {
        let mut f = Vec::with_capacity(payload.len() + 8);
        f.push(kind);
        f.extend_from_slice(&channel.to_be_bytes());
        f.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        f.extend_from_slice(payload);
        f.push(FRAME_END);
        self.stream.write_all(&f).await.map_err(io)
    }

    /// The next frame that is not a heartbeat: its type and payload.
    async fn recv(&mut self) -> Result<(u8, Vec<u8>), String> {
        loop {
            let mut head = [0u8; 7];
            self.stream.read_exact(&mut head).await.map_err(io)?;
            let size = u32::from_be_bytes(head[3..7].try_into().expect("4 bytes")) as usize;
            let mut payload = vec![0u8; size + 1];
            self.stream.read_exact(&mut payload).await.map_err(io)?;
            if payload.pop() != Some(FRAME_END) {
                return Err("frame without its end marker".into());
            }
            if head[0] != HEARTBEAT {
                return Ok((head[0], payload));
            }
        }
    }

    /// The next frame, which must be method `want` on `channel`; returns its arguments.
    async fn expect(&mut self, channel: u16, want: (u16, u16)) -> Result<Vec<u8>, String> {
        let (kind, payload) = self.recv().await?;
        let got = class_method(&payload)?;
        if kind == METHOD && got == want {
            return Ok(payload[4..].to_vec());
        }
        if kind == METHOD && (got == (10, 50) || got == (20, 40)) {
            let what = if channel == 0 {
                "the connection"
            } else {
                "the channel"
            };
            return Err(close_reason(what, &payload));
        }
        Err(format!(
            "expected method {want:?}, got frame type {kind} {got:?}"
        ))
    }
}

/// "the broker closed ...: code text" from a close method's payload.
fn close_reason(what: &str, payload: &[u8]) -> String {
    let mut r = Reader(payload.get(4..).unwrap_or_default());
    let code = r
        .take(2)
        .map(|b| u16::from_be_bytes([b[0], b[1]]))
        .unwrap_or(0);
    let text = r
        .short()
        .map(|t| String::from_utf8_lossy(t).into_owned())
        .unwrap_or_default();
    format!("the broker closed {what}: {code} {text}")
}

fn io(e: std::io::Error) -> String {
    format!("broker connection: {e}")
}

fn class_method(payload: &[u8]) -> Result<(u16, u16), String> {
    match payload {
        [a, b, c, d, ..] => Ok((u16::from_be_bytes([*a, *b]), u16::from_be_bytes([*c, *d]))),
        _ => Ok((0, 0)),
    }
}

fn method(class: u16, method: u16, args: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(args.len() + 4);
    m.extend_from_slice(&class.to_be_bytes());
    m.extend_from_slice(&method.to_be_bytes());
    m.extend_from_slice(args);
    m
}

fn short(out: &mut Vec<u8>, s: &[u8]) -> Result<(), String> {
    let len = u8::try_from(s.len()).map_err(|_| "name over 255 bytes".to_string())?;
    out.push(len);
    out.extend_from_slice(s);
    Ok(())
}

/// Reads the fields of a method's arguments in order.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err("method frame shorter than its fields".into());
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn short(&mut self) -> Result<&'a [u8], String> {
        let len = self.take(1)?[0] as usize;
        self.take(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Property bytes as they go on the wire: flags, then a `message_id` of these bytes.
    fn message_id_props(id: &[u8]) -> Vec<u8> {
        let mut p = (1u16 << 7).to_be_bytes().to_vec();
        p.push(id.len() as u8);
        p.extend_from_slice(id);
        p
    }

    #[test]
    fn utf8_properties_decode() {
        assert_eq!(undecodable(b"", b"key", &message_id_props(b"m-1")), None);
        assert_eq!(undecodable(b"", b"", &0u16.to_be_bytes()), None);
    }

    #[test]
    fn non_utf8_message_id_is_undecodable() {
        let why = undecodable(b"", b"key", &message_id_props(&[0xff, b'x'])).unwrap();
        assert!(why.contains("properties"), "{why}");
    }

    #[test]
    fn non_utf8_routing_key_is_undecodable() {
        let why = undecodable(b"", &[0xc3], &message_id_props(b"m-1")).unwrap();
        assert!(why.contains("routing key"), "{why}");
    }
}
