//! A raw AMQP 0-9-1 client over a blocking socket: publishes bytes amqprs will not send,
//! reads what amqprs cannot decode, and deletes a test's objects from a `Drop` (no runtime
//! needed, so it works while a failed test's runtime is going away).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

// ---------------------------------------------------------------------------------------------
// A raw AMQP 0-9-1 publisher: amqprs only sends UTF-8 strings, producers in other languages do not.

/// A property of a raw message, as it goes on the wire.
pub enum RawProp<'a> {
    /// `message_id` with these bytes (UTF-8 or not).
    MessageId(&'a [u8]),
    /// A header table with one long-string entry of these bytes.
    LongStrHeader(&'a str, &'a [u8]),
}

fn short(out: &mut Vec<u8>, s: &[u8]) {
    out.push(u8::try_from(s.len()).expect("short string"));
    out.extend_from_slice(s);
}

fn frame(kind: u8, channel: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![kind];
    f.extend_from_slice(&channel.to_be_bytes());
    f.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    f.extend_from_slice(payload);
    f.push(0xce);
    f
}

fn method(class: u16, method: u16, args: &[u8]) -> Vec<u8> {
    let mut m = class.to_be_bytes().to_vec();
    m.extend_from_slice(&method.to_be_bytes());
    m.extend_from_slice(args);
    m
}

fn read_frame(s: &mut TcpStream) -> (u8, Vec<u8>) {
    let mut head = [0u8; 7];
    s.read_exact(&mut head).expect("frame header");
    let size = u32::from_be_bytes(head[3..7].try_into().unwrap()) as usize;
    let mut payload = vec![0u8; size + 1];
    s.read_exact(&mut payload).expect("frame payload");
    payload.pop();
    (head[0], payload)
}

/// A raw AMQP connection with channel 1 open.
struct RawConn {
    s: TcpStream,
    frame_max: u32,
}

impl RawConn {
    fn open() -> RawConn {
        let mut s = TcpStream::connect("127.0.0.1:5672").expect("broker on 5672");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"AMQP\x00\x00\x09\x01").unwrap();
        read_frame(&mut s); // connection.start
        let mut args = 0u32.to_be_bytes().to_vec(); // empty client properties
        short(&mut args, b"PLAIN");
        let auth = b"\0guest\0guest";
        args.extend_from_slice(&(auth.len() as u32).to_be_bytes());
        args.extend_from_slice(auth);
        short(&mut args, b"en_US");
        s.write_all(&frame(1, 0, &method(10, 11, &args))).unwrap();
        let (_, tune) = read_frame(&mut s);
        let channel_max = u16::from_be_bytes(tune[4..6].try_into().unwrap());
        let frame_max = u32::from_be_bytes(tune[6..10].try_into().unwrap());
        let mut args = channel_max.to_be_bytes().to_vec();
        args.extend_from_slice(&frame_max.to_be_bytes());
        args.extend_from_slice(&0u16.to_be_bytes());
        s.write_all(&frame(1, 0, &method(10, 31, &args))).unwrap();
        let mut args = Vec::new();
        short(&mut args, b"/");
        short(&mut args, b"");
        args.push(0);
        s.write_all(&frame(1, 0, &method(10, 40, &args))).unwrap();
        read_frame(&mut s); // open-ok
        s.write_all(&frame(1, 1, &method(20, 10, &[0]))).unwrap();
        read_frame(&mut s); // channel.open-ok
        RawConn { s, frame_max }
    }

    fn close(mut self) {
        let mut args = 200u16.to_be_bytes().to_vec();
        short(&mut args, b"done");
        args.extend_from_slice(&[0, 0, 0, 0]);
        self.s
            .write_all(&frame(1, 1, &method(20, 40, &args)))
            .unwrap();
        let (_, ok) = read_frame(&mut self.s);
        assert_eq!(&ok[..4], &method(20, 41, &[])[..], "channel.close-ok");
        self.s
            .write_all(&frame(1, 0, &method(10, 50, &args)))
            .unwrap();
        let _ = read_frame(&mut self.s);
    }
}

/// Publishes persistent messages with raw properties to `queue` through the default exchange,
/// then closes the channel (the broker has them once the close is answered).
pub fn raw_publish(queue: &str, messages: &[(RawProp<'_>, &[u8])]) {
    let mut c = RawConn::open();
    for (prop, body) in messages {
        let mut args = 0u16.to_be_bytes().to_vec();
        short(&mut args, b"");
        short(&mut args, queue.as_bytes());
        args.push(0);
        c.s.write_all(&frame(1, 1, &method(60, 40, &args))).unwrap();
        // Property flags, high bit first: headers 13, delivery-mode 12, message-id 7.
        let mut header = 60u16.to_be_bytes().to_vec();
        header.extend_from_slice(&0u16.to_be_bytes());
        header.extend_from_slice(&(body.len() as u64).to_be_bytes());
        match prop {
            RawProp::MessageId(id) => {
                header.extend_from_slice(&((1u16 << 12) | (1 << 7)).to_be_bytes());
                header.push(2);
                short(&mut header, id);
            }
            RawProp::LongStrHeader(name, value) => {
                header.extend_from_slice(&((1u16 << 13) | (1 << 12)).to_be_bytes());
                let mut table = Vec::new();
                short(&mut table, name.as_bytes());
                table.push(b'S');
                table.extend_from_slice(&(value.len() as u32).to_be_bytes());
                table.extend_from_slice(value);
                header.extend_from_slice(&(table.len() as u32).to_be_bytes());
                header.extend_from_slice(&table);
                header.push(2);
            }
        }
        c.s.write_all(&frame(2, 1, &header)).unwrap();
        for chunk in body.chunks(c.frame_max as usize - 8) {
            c.s.write_all(&frame(3, 1, chunk)).unwrap();
        }
    }
    c.close();
}

/// Deletes queues and exchanges over a raw connection.
pub fn raw_delete(queues: &[String], exchanges: &[String]) {
    let mut c = RawConn::open();
    for q in queues {
        let mut args = 0u16.to_be_bytes().to_vec();
        short(&mut args, q.as_bytes());
        args.push(0); // not if-unused, not if-empty, wait for the answer
        c.s.write_all(&frame(1, 1, &method(50, 40, &args))).unwrap();
        read_frame(&mut c.s); // delete-ok
    }
    for x in exchanges {
        let mut args = 0u16.to_be_bytes().to_vec();
        short(&mut args, x.as_bytes());
        args.push(0);
        c.s.write_all(&frame(1, 1, &method(40, 20, &args))).unwrap();
        read_frame(&mut c.s); // delete-ok
    }
    c.close();
}

/// Takes every message in `queue` with `basic.get`, reading frames as bytes (the dead-letter
/// queue may hold what amqprs cannot decode); returns their bodies.
pub fn raw_take_all(queue: &str) -> Vec<Vec<u8>> {
    let mut c = RawConn::open();
    let mut bodies = Vec::new();
    loop {
        let mut args = 0u16.to_be_bytes().to_vec();
        short(&mut args, queue.as_bytes());
        args.push(1); // no-ack
        c.s.write_all(&frame(1, 1, &method(60, 70, &args))).unwrap();
        let (_, reply) = read_frame(&mut c.s);
        if reply[..4] == method(60, 72, &[])[..] {
            break; // get-empty
        }
        assert_eq!(&reply[..4], &method(60, 71, &[])[..], "get-ok");
        let (_, header) = read_frame(&mut c.s);
        let size = u64::from_be_bytes(header[4..12].try_into().unwrap()) as usize;
        let mut body = Vec::with_capacity(size);
        while body.len() < size {
            body.extend(read_frame(&mut c.s).1);
        }
        bodies.push(body);
    }
    c.close();
    bodies
}
