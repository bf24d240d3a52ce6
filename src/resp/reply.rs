//! Reply encoding: RESP2 frames written straight into a connection's output buffer.
//!
//! Small writers for the frames the proxy composes itself. Replies that come from a shard
//! are passed through as the shard's own bytes and never re-encoded.

use bytes::{BufMut, BytesMut};

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

pub fn null(out: &mut BytesMut) {
    out.put_slice(b"$-1\r\n");
}

pub fn array(out: &mut BytesMut, len: usize) {
    let mut b = itoa::Buffer::new();
    out.put_u8(b'*');
    out.put_slice(b.format(len).as_bytes());
    out.put_slice(b"\r\n");
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
        null(&mut o);
        array(&mut o, 2);
        assert_eq!(
            &o[..],
            b"+PONG\r\n-ERR bad  thing\r\n:-42\r\n$2\r\nhi\r\n$1\r\n7\r\n$-1\r\n*2\r\n"
        );
    }
}
