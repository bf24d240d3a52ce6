//! Reply encoding: frames written straight into a connection's output buffer.
//!
//! Small writers for the frames the proxy composes itself. Replies that come from a shard
//! are passed through as the shard's own bytes and never re-encoded.
//!
//! The writers whose frame differs between RESP2 and RESP3 (null, map, set, verbatim text)
//! take the client's [`Proto`]; this is the one place that knows the difference. The others
//! (simple strings, errors, integers, bulk strings, arrays) are the same bytes in both.

use bytes::{BufMut, BytesMut};

/// The protocol a client speaks: RESP2 until it sends `HELLO 3`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Proto {
    #[default]
    Resp2,
    Resp3,
}

impl Proto {
    /// The version number HELLO reports.
    pub fn version(self) -> i64 {
        match self {
            Proto::Resp2 => 2,
            Proto::Resp3 => 3,
        }
    }
}

pub fn simple(out: &mut BytesMut, s: &str) {
    out.reserve(s.len() + 3);
    out.put_u8(b'+');
    out.put_slice(s.as_bytes());
    out.put_slice(b"\r\n");
}

pub fn ok(out: &mut BytesMut) {
    out.put_slice(b"+OK\r\n");
}

/// An error reply. `msg` starts with its code (`ERR`, `TRYAGAIN`, ...); line breaks in it
/// are replaced so that the frame stays one line.
pub fn error(out: &mut BytesMut, msg: &str) {
    out.reserve(msg.len() + 3);
    out.put_u8(b'-');
    for b in msg.bytes() {
        out.put_u8(if b == b'\r' || b == b'\n' { b' ' } else { b });
    }
    out.put_slice(b"\r\n");
}

pub fn int(out: &mut BytesMut, v: i64) {
    let mut b = itoa::Buffer::new();
    let s = b.format(v);
    out.reserve(s.len() + 3);
    out.put_u8(b':');
    out.put_slice(s.as_bytes());
    out.put_slice(b"\r\n");
}

pub fn bulk(out: &mut BytesMut, v: &[u8]) {
    let mut b = itoa::Buffer::new();
    let len = b.format(v.len());
    out.reserve(v.len() + len.len() + 5);
    out.put_u8(b'$');
    out.put_slice(len.as_bytes());
    out.put_slice(b"\r\n");
    out.put_slice(v);
    out.put_slice(b"\r\n");
}

/// An integer as a bulk string, as GET answers a counter.
pub fn bulk_int(out: &mut BytesMut, v: i64) {
    let mut b = itoa::Buffer::new();
    bulk(out, b.format(v).as_bytes());
}

/// A missing value: RESP2's null bulk string, RESP3's null.
pub fn null(out: &mut BytesMut, proto: Proto) {
    out.put_slice(match proto {
        Proto::Resp2 => b"$-1\r\n",
        Proto::Resp3 => b"_\r\n",
    });
}

/// A map header of `pairs` key-value pairs: RESP3's `%`, a flat array in RESP2.
pub fn map(out: &mut BytesMut, pairs: usize, proto: Proto) {
    match proto {
        Proto::Resp2 => aggregate(out, b'*', pairs * 2),
        Proto::Resp3 => aggregate(out, b'%', pairs),
    }
}

/// A set header: RESP3's `~`, an array in RESP2.
pub fn set(out: &mut BytesMut, len: usize, proto: Proto) {
    match proto {
        Proto::Resp2 => aggregate(out, b'*', len),
        Proto::Resp3 => aggregate(out, b'~', len),
    }
}

/// Text for people (INFO, CLIENT INFO): RESP3's verbatim string of format `txt`, a bulk
/// string in RESP2.
pub fn verbatim(out: &mut BytesMut, text: &[u8], proto: Proto) {
    match proto {
        Proto::Resp2 => bulk(out, text),
        Proto::Resp3 => {
            let mut b = itoa::Buffer::new();
            let len = b.format(text.len() + 4);
            out.reserve(text.len() + len.len() + 9);
            out.put_u8(b'=');
            out.put_slice(len.as_bytes());
            out.put_slice(b"\r\ntxt:");
            out.put_slice(text);
            out.put_slice(b"\r\n");
        }
    }
}

fn aggregate(out: &mut BytesMut, kind: u8, len: usize) {
    let mut b = itoa::Buffer::new();
    out.put_u8(kind);
    out.put_slice(b.format(len).as_bytes());
    out.put_slice(b"\r\n");
}

pub fn array(out: &mut BytesMut, len: usize) {
    aggregate(out, b'*', len);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_encode_as_redis_does() {
        let mut o = BytesMut::new();
        simple(&mut o, "PONG");
        error(&mut o, "ERR bad\r\nthing");
        int(&mut o, -42);
        bulk(&mut o, b"hi");
        bulk_int(&mut o, 7);
        null(&mut o, Proto::Resp2);
        array(&mut o, 2);
        assert_eq!(
            &o[..],
            b"+PONG\r\n-ERR bad  thing\r\n:-42\r\n$2\r\nhi\r\n$1\r\n7\r\n$-1\r\n*2\r\n"
        );
    }

    #[test]
    fn the_frames_that_differ_follow_the_protocol() {
        let mut o = BytesMut::new();
        null(&mut o, Proto::Resp2);
        map(&mut o, 2, Proto::Resp2);
        set(&mut o, 1, Proto::Resp2);
        verbatim(&mut o, b"a\r\nb", Proto::Resp2);
        assert_eq!(&o[..], b"$-1\r\n*4\r\n*1\r\n$4\r\na\r\nb\r\n");
        let mut o = BytesMut::new();
        null(&mut o, Proto::Resp3);
        map(&mut o, 2, Proto::Resp3);
        set(&mut o, 1, Proto::Resp3);
        verbatim(&mut o, b"a\r\nb", Proto::Resp3);
        assert_eq!(&o[..], b"_\r\n%2\r\n~1\r\n=8\r\ntxt:a\r\nb\r\n");
    }
}
