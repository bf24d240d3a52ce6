//! A short request read in place: an array of one to three bulk strings, complete at the front
//! of the read buffer, whose arguments are borrowed from it rather than copied out.
//!
//! The connection tries this before the full parser (see `connection::hot`): a counter's
//! GET or INCR can then be answered while its bytes are still in the buffer, with no
//! argument vector and no reference count per argument. Anything else (a longer array, an
//! inline command, a request not complete yet, a malformed or oversized one) is `None`,
//! and the full parser takes the request as if this had not looked: it is the parser's
//! errors and limits that a client sees.

use super::parse::{header, Limits};

/// Most arguments a short request has (`INCRBY key n`).
pub const MAX_ARGS: usize = 3;

/// A complete request at the front of a buffer, with its arguments in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Short<'a> {
    args: [&'a [u8]; MAX_ARGS],
    n: usize,
    /// Bytes the request takes at the front of the buffer.
    pub len: usize,
}

impl<'a> Short<'a> {
    pub fn args(&self) -> &[&'a [u8]] {
        &self.args[..self.n]
    }
}

/// The request at the front of `buf`, if it is a complete array of 1 to [`MAX_ARGS`] bulk
/// strings within `lim`.
pub fn peek<'a>(buf: &'a [u8], lim: &Limits) -> Option<Short<'a>> {
    if buf.first() != Some(&b'*') {
        return None;
    }
    let (n, mut at) = header(buf, 1).ok()??;
    if !(1..=MAX_ARGS as i64).contains(&n) || n as u64 > lim.max_array_len as u64 {
        return None;
    }
    let mut args: [&[u8]; MAX_ARGS] = [&[]; MAX_ARGS];
    let mut claimed = 0usize;
    for arg in args.iter_mut().take(n as usize) {
        if buf.get(at) != Some(&b'$') {
            return None;
        }
        let (len, start) = header(buf, at + 1).ok()??;
        if len < 0 || len as u64 > lim.max_bulk_len as u64 {
            return None;
        }
        let end = start.checked_add(len as usize)?;
        claimed += len as usize;
        if claimed > lim.max_request_bytes || buf.get(end..end + 2) != Some(b"\r\n") {
            return None;
        }
        *arg = &buf[start..end];
        at = end + 2;
    }
    Some(Short {
        args,
        n: n as usize,
        len: at,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resp::parse_request;
    use bytes::BytesMut;

    fn lim() -> Limits {
        Limits {
            max_bulk_len: 512 * 1024 * 1024,
            max_array_len: 1024 * 1024,
            max_inline_len: 64 * 1024,
            max_request_bytes: 512 * 1024 * 1024,
        }
    }

    #[test]
    fn a_short_request_is_read_in_place() {
        let buf = b"*2\r\n$3\r\nGET\r\n$5\r\nhello\r\n*1\r\n$4\r\nPING\r\n";
        let s = peek(buf, &lim()).unwrap();
        assert_eq!(s.args(), [&b"GET"[..], b"hello"]);
        assert_eq!(s.len, 24);
        let s = peek(&buf[24..], &lim()).unwrap();
        assert_eq!(s.args(), [&b"PING"[..]]);
        let buf = b"*3\r\n$6\r\nINCRBY\r\n$0\r\n\r\n$2\r\n-7\r\n";
        assert_eq!(
            peek(buf, &lim()).unwrap().args(),
            [&b"INCRBY"[..], b"", b"-7"]
        );
    }

    #[test]
    fn what_it_does_not_take_is_left_to_the_parser() {
        for buf in [
            &b""[..],
            b"GET hello\r\n",                                      // inline
            b"*0\r\n",                                             // empty
            b"*4\r\n$1\r\na\r\n$1\r\nb\r\n$1\r\nc\r\n$1\r\nd\r\n", // long
            b"*2\r\n$3\r\nGET\r\n$5\r\nhel",                       // incomplete
            b"*2\r\n$3\r\nGET\r\n$5\r\nhello\r",                   // incomplete CRLF
            b"*2\r\n$3\r\nGET\r\n$5\r\nhelloXY",                   // bad terminator
            b"*2\r\n$3\r\nGET\r\n:5\r\nhello\r\n",                 // not a bulk
            b"*2\r\n$3\r\nGET\r\n$-1\r\n",                         // null bulk
            b"*1\r\n*1\r\n$1\r\na\r\n",                            // nested
            b"*x\r\n",                                             // bad header
        ] {
            assert_eq!(
                peek(buf, &lim()),
                None,
                "{:?}",
                String::from_utf8_lossy(buf)
            );
        }
        let tight = Limits {
            max_bulk_len: 4,
            ..lim()
        };
        assert_eq!(peek(b"*2\r\n$3\r\nGET\r\n$5\r\nhello\r\n", &tight), None);
        let tight = Limits {
            max_array_len: 1,
            ..lim()
        };
        assert_eq!(peek(b"*2\r\n$3\r\nGET\r\n$5\r\nhello\r\n", &tight), None);
        let tight = Limits {
            max_request_bytes: 7,
            ..lim()
        };
        assert_eq!(peek(b"*2\r\n$3\r\nGET\r\n$5\r\nhello\r\n", &tight), None);
    }

    /// Every prefix and every byte flip of a few requests: whatever `peek` takes, the full
    /// parser takes the same way (same arguments, same length).
    #[test]
    fn it_agrees_with_the_parser_on_every_request_it_takes() {
        let samples: [&[u8]; 4] = [
            b"*2\r\n$4\r\nINCR\r\n$12\r\ncounter:0001\r\n",
            b"*3\r\n$6\r\nINCRBY\r\n$1\r\nk\r\n$3\r\n-12\r\n",
            b"*1\r\n$4\r\nPING\r\n",
            b"*2\r\n$3\r\nGET\r\n$0\r\n\r\n",
        ];
        let mut checked = 0;
        for sample in samples {
            let mut variants: Vec<Vec<u8>> =
                (0..=sample.len()).map(|i| sample[..i].to_vec()).collect();
            for i in 0..sample.len() {
                for b in [b'0', b'9', b'\r', b'\n', b'$', b'*', b'-', b'x'] {
                    let mut v = sample.to_vec();
                    v[i] = b;
                    variants.push(v);
                }
            }
            for v in variants {
                let Some(s) = peek(&v, &lim()) else { continue };
                let mut buf = BytesMut::from(&v[..]);
                let args = parse_request(&mut buf, &lim()).unwrap().unwrap();
                assert_eq!(args.iter().map(|a| &a[..]).collect::<Vec<_>>(), s.args());
                assert_eq!(
                    v.len() - buf.len(),
                    s.len,
                    "{:?}",
                    String::from_utf8_lossy(&v)
                );
                checked += 1;
            }
        }
        assert!(checked > 8, "only {checked} variants taken");
    }
}
