//! Client request framing: RESP arrays of bulk strings, and inline (telnet-style) commands.
//!
//! This is the size guard in front of everything a client sends. It walks the headers of a
//! request without recursion and without allocating what a length claims: a `*1000000000`
//! or `$536870912` beyond the configured limits is refused as soon as its header is read,
//! and a nested array (`*1\r\n*1\r\n...`, which would overflow a recursive decoder's stack) is
//! refused at its first element, as Redis does (`expected '$', got '*'`). Since the walk
//! already finds every argument, it also yields them, as zero-copy slices of the read buffer.
//! Replies from shards, which may nest, are decoded with redis-protocol (see `backend`).

use bytes::{Bytes, BytesMut};

/// Limits a request must respect; from `[limits]` in the config.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_bulk_len: usize,
    pub max_array_len: usize,
    pub max_inline_len: usize,
    pub max_request_bytes: usize,
}

impl From<&crate::config::LimitsConfig> for Limits {
    fn from(c: &crate::config::LimitsConfig) -> Self {
        Limits {
            max_bulk_len: c.max_bulk_len,
            max_array_len: c.max_array_len,
            max_inline_len: c.max_inline_len,
            max_request_bytes: c.max_request_bytes,
        }
    }
}

/// A malformed or oversized request. The connection cannot resynchronise after one: the
/// handler answers `-ERR Protocol error: <msg>` and closes, as Redis does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolError(pub String);

fn perr<T>(msg: impl Into<String>) -> Result<T, ProtocolError> {
    Err(ProtocolError(msg.into()))
}

/// Longest header line (`*<n>` or `$<n>`) accepted; an i64 needs 20 characters.
const MAX_HEADER: usize = 32;

/// Takes one complete request off the front of `buf`.
///
/// `Ok(None)`: more bytes are needed. `Ok(Some(args))` with empty `args`: an empty request
/// (`*0`, a blank inline line) that Redis ignores.
pub fn parse_request(
    buf: &mut BytesMut,
    lim: &Limits,
) -> Result<Option<Vec<Bytes>>, ProtocolError> {
    match buf.first() {
        None => Ok(None),
        Some(b'*') => parse_multibulk(buf, lim),
        Some(_) => parse_inline(buf, lim),
    }
}

/// Reads a decimal header at `buf[at..]` ending in CRLF. Returns (value, index after CRLF).
fn header(buf: &[u8], at: usize) -> Result<Option<(i64, usize)>, ()> {
    let end = (at + MAX_HEADER).min(buf.len());
    let Some(cr) = buf[at..end].iter().position(|&b| b == b'\r') else {
        return if buf.len() >= at + MAX_HEADER {
            Err(())
        } else {
            Ok(None)
        };
    };
    let cr = at + cr;
    if cr + 1 >= buf.len() {
        return Ok(None);
    }
    if buf[cr + 1] != b'\n' {
        return Err(());
    }
    let digits = &buf[at..cr];
    let (neg, digits) = match digits.first() {
        Some(b'-') => (true, &digits[1..]),
        _ => (false, digits),
    };
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return Err(());
    }
    let mut v: i64 = 0;
    for &d in digits {
        v = v
            .checked_mul(10)
            .and_then(|v| v.checked_add((d - b'0') as i64))
            .ok_or(())?;
    }
    Ok(Some((if neg { -v } else { v }, cr + 2)))
}

fn parse_multibulk(buf: &mut BytesMut, lim: &Limits) -> Result<Option<Vec<Bytes>>, ProtocolError> {
    let (n, mut pos) = match header(buf, 1) {
        Ok(Some(h)) => h,
        Ok(None) => return Ok(None),
        Err(()) => return perr("invalid multibulk length"),
    };
    if n <= 0 {
        let _ = buf.split_to(pos);
        return Ok(Some(Vec::new()));
    }
    if n as u64 > lim.max_array_len as u64 {
        return perr("invalid multibulk length");
    }
    let n = n as usize;
    // First pass: check every header and find where the frame ends, storing nothing.
    let mut claimed: usize = 0;
    for _ in 0..n {
        match buf.get(pos) {
            None => return Ok(None),
            Some(b'$') => {}
            Some(&other) => {
                return perr(format!("expected '$', got '{}'", printable(other)));
            }
        }
        let (len, start) = match header(buf, pos + 1) {
            Ok(Some(h)) => h,
            Ok(None) => return Ok(None),
            Err(()) => return perr("invalid bulk length"),
        };
        if len < 0 || len as u64 > lim.max_bulk_len as u64 {
            return perr("invalid bulk length");
        }
        let len = len as usize;
        claimed += len;
        if claimed > lim.max_request_bytes {
            return perr("request too large");
        }
        let end = start + len;
        if buf.len() < end + 2 {
            return Ok(None);
        }
        if &buf[end..end + 2] != b"\r\n" {
            return perr("bulk string not terminated by CRLF");
        }
        pos = end + 2;
    }
    // Second pass over the now whole frame: slice the arguments out (headers are valid).
    let frame = buf.split_to(pos).freeze();
    let mut args = Vec::with_capacity(n);
    let mut at = frame
        .iter()
        .position(|&b| b == b'\n')
        .expect("header checked")
        + 1;
    for _ in 0..n {
        let (len, start) = header(&frame, at + 1)
            .ok()
            .flatten()
            .expect("header checked");
        let end = start + len as usize;
        args.push(frame.slice(start..end));
        at = end + 2;
    }
    Ok(Some(args))
}

fn parse_inline(buf: &mut BytesMut, lim: &Limits) -> Result<Option<Vec<Bytes>>, ProtocolError> {
    // The limit is on the line without its CRLF, judged the same whether or not the
    // newline has arrived yet (a pending `\r` does not count), so that segmentation never
    // changes the outcome.
    let scan = buf.len().min(lim.max_inline_len + 2);
    let Some(nl) = buf[..scan].iter().position(|&b| b == b'\n') else {
        let line_len = buf.len() - usize::from(buf.last() == Some(&b'\r'));
        return if line_len > lim.max_inline_len {
            perr("too big inline request")
        } else {
            Ok(None)
        };
    };
    let line_len = nl - usize::from(nl > 0 && buf[nl - 1] == b'\r');
    if line_len > lim.max_inline_len {
        return perr("too big inline request");
    }
    let line = buf.split_to(nl + 1).freeze();
    let text = line.slice(..nl);
    let text = match text.last() {
        Some(b'\r') => text.slice(..text.len() - 1),
        _ => text,
    };
    let mut args = Vec::new();
    let mut i = 0;
    while i < text.len() {
        while i < text.len() && text[i].is_ascii_whitespace() {
            i += 1;
        }
        if i == text.len() {
            break;
        }
        if text[i] == b'"' || text[i] == b'\'' {
            let quote = text[i];
            let Some(close) = text[i + 1..].iter().position(|&b| b == quote) else {
                return perr("unbalanced quotes in request");
            };
            args.push(text.slice(i + 1..i + 1 + close));
            i += close + 2;
            continue;
        }
        let start = i;
        while i < text.len() && !text[i].is_ascii_whitespace() {
            i += 1;
        }
        args.push(text.slice(start..i));
    }
    if args.len() > lim.max_array_len {
        return perr("invalid multibulk length");
    }
    Ok(Some(args))
}

fn printable(b: u8) -> char {
    if b.is_ascii_graphic() {
        b as char
    } else {
        '?'
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIM: Limits = Limits {
        max_bulk_len: 1024,
        max_array_len: 16,
        max_inline_len: 64,
        max_request_bytes: 4096,
    };

    fn parse(input: &[u8]) -> Result<Option<Vec<Bytes>>, ProtocolError> {
        parse_request(&mut BytesMut::from(input), &LIM)
    }

    fn args(input: &[u8]) -> Vec<Vec<u8>> {
        parse(input)
            .unwrap()
            .unwrap()
            .iter()
            .map(|b| b.to_vec())
            .collect()
    }

    #[test]
    fn multibulk_commands_parse() {
        assert_eq!(
            args(b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"),
            vec![b"GET".to_vec(), b"k".to_vec()]
        );
        assert_eq!(args(b"*1\r\n$0\r\n\r\n"), vec![Vec::<u8>::new()]);
        assert!(args(b"*0\r\n").is_empty());
    }

    #[test]
    fn pipelined_requests_come_off_one_at_a_time() {
        let mut buf = BytesMut::from(&b"*1\r\n$4\r\nPING\r\n*1\r\n$4\r\nPI"[..]);
        assert_eq!(parse_request(&mut buf, &LIM).unwrap().unwrap()[0], "PING");
        assert_eq!(parse_request(&mut buf, &LIM).unwrap(), None);
        buf.extend_from_slice(b"NG\r\n");
        assert_eq!(parse_request(&mut buf, &LIM).unwrap().unwrap()[0], "PING");
        assert!(buf.is_empty());
    }

    #[test]
    fn every_prefix_of_a_request_is_incomplete_not_an_error() {
        let full = b"*3\r\n$3\r\nSET\r\n$5\r\nmykey\r\n$2\r\n42\r\n";
        for cut in 0..full.len() {
            assert_eq!(parse(&full[..cut]).unwrap(), None, "cut at {cut}");
        }
        assert_eq!(args(full).len(), 3);
    }

    #[test]
    fn inline_commands_parse() {
        assert_eq!(args(b"PING\r\n"), vec![b"PING".to_vec()]);
        assert_eq!(
            args(b"set k \"a b\"\n"),
            vec![b"set".to_vec(), b"k".to_vec(), b"a b".to_vec()]
        );
        assert!(args(b"\r\n").is_empty());
        assert_eq!(parse(b"PIN").unwrap(), None);
    }

    #[test]
    fn malformed_and_oversized_requests_are_refused_without_waiting() {
        let cases: &[(&[u8], &str)] = &[
            (b"*x\r\n", "invalid multibulk length"),
            (b"*99999999999999999999999\r\n", "invalid multibulk length"),
            (b"*17\r\n", "invalid multibulk length"),
            (b"*1\r\n$-5\r\n", "invalid bulk length"),
            (b"*1\r\n$536870912\r\n", "invalid bulk length"),
            (b"*1\r\n*1\r\n*1\r\n", "expected '$', got '*'"),
            (b"*1\r\n:1\r\n", "expected '$', got ':'"),
            (b"*1\r\n$1\r\nab\r\n", "bulk string not terminated by CRLF"),
            (b"*1\r\n$1\nxx\r\n", "invalid bulk length"),
            (
                b"*1234567890123456789012345678901234567890",
                "invalid multibulk length",
            ),
            (b"GET \"unbalanced\r\n", "unbalanced quotes in request"),
        ];
        for (input, want) in cases {
            let got = parse(input).unwrap_err().0;
            assert_eq!(&got, want, "input {:?}", String::from_utf8_lossy(input));
        }
        let long_line = vec![b'a'; 100];
        assert_eq!(parse(&long_line).unwrap_err().0, "too big inline request");
        // At the limit (64 here), whole or in pieces, the same answer.
        let mut at = vec![b'a'; 64];
        at.extend_from_slice(b"\r\n");
        assert!(parse(&at).unwrap().is_some());
        assert_eq!(parse(&at[..65]).unwrap(), None);
        let mut over = vec![b'a'; 65];
        assert_eq!(parse(&over).unwrap_err().0, "too big inline request");
        over.push(b'\n');
        assert_eq!(parse(&over).unwrap_err().0, "too big inline request");
        let mut many = b"*16\r\n".to_vec();
        for _ in 0..5 {
            many.extend_from_slice(b"$1000\r\n");
            many.extend_from_slice(&[b'x'; 1000]);
            many.extend_from_slice(b"\r\n");
        }
        assert_eq!(parse(&many).unwrap_err().0, "request too large");
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A small deterministic fuzz: every byte string from a fixed generator either parses,
        // needs more, or is refused.
        let mut x: u64 = 0x9e3779b97f4a7c15;
        let alphabet = b"*$\r\n0123456789-:+ abc\"";
        for _ in 0..20_000 {
            let mut v = Vec::new();
            let n = (x % 40) as usize;
            for _ in 0..n {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                v.push(alphabet[(x % alphabet.len() as u64) as usize]);
            }
            let mut buf = BytesMut::from(&v[..]);
            for _ in 0..50 {
                match parse_request(&mut buf, &LIM) {
                    Ok(Some(_)) if !buf.is_empty() => continue,
                    _ => break,
                }
            }
            x = x.wrapping_add(1);
        }
    }
}
