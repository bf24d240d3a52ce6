//! Client request framing: RESP arrays of bulk strings, and inline (telnet-style) commands.
//!
//! This is the size guard in front of everything a client sends. It walks the headers of a
//! request without recursion and without allocating what a length claims: a `*1000000000`
//! or `$536870912` beyond the configured limits is refused as soon as its header is read,
//! and a nested array (`*1\r\n*1\r\n...`, which would overflow a recursive decoder's stack) is
//! refused at its first element, as Redis does (`expected '$', got '*'`). Since the walk
//! already finds every argument, it also yields them, as zero-copy slices of the read buffer.
//! When an array arrives in pieces, a connection's [`RequestParser`] resumes the walk where
//! the last read left it, so that a slow sender costs work in proportion to its bytes.
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

/// Takes one complete request off the front of `buf`, with no memory of earlier calls: an
/// incomplete array is walked again from its first header on every call. For one-shot use;
/// a connection, which calls again after each read, keeps a [`RequestParser`].
///
/// `Ok(None)`: more bytes are needed. `Ok(Some(args))` with empty `args`: an empty request
/// (`*0`, a blank inline line) that Redis ignores.
pub fn parse_request(
    buf: &mut BytesMut,
    lim: &Limits,
) -> Result<Option<Vec<Bytes>>, ProtocolError> {
    RequestParser::default().parse(buf, lim)
}

/// [`parse_request`] for one connection's read buffer, resuming an incomplete array where
/// the last call stopped, so that the work per read is proportional to the new bytes (plus
/// at most one header line, re-read while it is incomplete) instead of re-walking every
/// header already checked: quadratic work for a large array sent slowly.
///
/// Between calls the buffer may only grow at its end (bytes appended by reads); only
/// `parse` takes bytes off its front. The saved position is dropped when a request is
/// returned or refused.
#[derive(Debug, Default)]
pub struct RequestParser {
    walk: Option<Walk>,
}

/// How far the walk of an incomplete array request got.
#[derive(Debug, Clone, Copy)]
struct Walk {
    /// Elements the `*<n>` header claims.
    n: usize,
    /// Elements whose header, body and CRLF have been checked.
    done: usize,
    /// Index in the buffer just after the last checked element.
    pos: usize,
    /// Sum of the bulk lengths read so far (including `body_end`'s element).
    claimed: usize,
    /// The header of element `done` has been read and checked; its body ends here.
    body_end: Option<usize>,
    /// The buffer's length when the walk stopped (it can only have grown since).
    seen: usize,
}

impl RequestParser {
    /// Whether an incomplete request is half walked: the bytes at the front of the buffer
    /// belong to it, and only [`parse`](Self::parse) may take them.
    pub fn resuming(&self) -> bool {
        self.walk.is_some()
    }

    /// The same contract as [`parse_request`].
    pub fn parse(
        &mut self,
        buf: &mut BytesMut,
        lim: &Limits,
    ) -> Result<Option<Vec<Bytes>>, ProtocolError> {
        // Whatever happens, a saved walk is used at most once: it is put back only when
        // the same request still needs more bytes.
        let walk = self.walk.take();
        match buf.first() {
            None => Ok(None),
            Some(b'*') => parse_multibulk(buf, lim, walk, &mut self.walk),
            Some(_) => parse_inline(buf, lim),
        }
    }
}

#[cfg(test)]
thread_local! {
    /// Header bytes the parser has looked at on this thread (the linear-work test).
    static EXAMINED: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Counts `n` header bytes looked at (tests only; nothing in a normal build).
#[inline(always)]
fn examined(_n: usize) {
    #[cfg(test)]
    EXAMINED.with(|c| c.set(c.get() + _n as u64));
}

/// Reads a decimal header at `buf[at..]` ending in CRLF. Returns (value, index after CRLF).
///
/// One pass: digits are accumulated while looking for the CR, and a bad character only
/// decides the outcome once the CR is found (so an error is reported at the same byte as
/// a parse of the whole line would: a line still arriving is "more bytes needed").
pub(super) fn header(buf: &[u8], at: usize) -> Result<Option<(i64, usize)>, ()> {
    let end = (at + MAX_HEADER).min(buf.len());
    let line = &buf[at..end];
    let neg = line.first() == Some(&b'-');
    let mut v: i64 = 0;
    let mut ok = true;
    let mut cr = None;
    for (i, &b) in line.iter().enumerate().skip(neg as usize) {
        let d = b.wrapping_sub(b'0');
        if d <= 9 {
            // Past 19 digits the line is refused anyway; saturate instead of overflowing.
            v = v.saturating_mul(10).saturating_add(d as i64);
        } else if b == b'\r' {
            cr = Some(i);
            break;
        } else {
            ok = false;
        }
    }
    examined(cr.map_or(end - at, |cr| cr + 2));
    let Some(cr) = cr else {
        return if buf.len() >= at + MAX_HEADER {
            Err(())
        } else {
            Ok(None)
        };
    };
    let digits = cr - neg as usize;
    let cr = at + cr;
    if cr + 1 >= buf.len() {
        return Ok(None);
    }
    // i64::MAX has 19 digits; a saturated value means it overflowed.
    let overflowed = v == i64::MAX && digits == 19 && &buf[cr - 19..cr] != b"9223372036854775807";
    if buf[cr + 1] != b'\n' || !ok || digits == 0 || digits > 19 || overflowed {
        return Err(());
    }
    Ok(Some((if neg { -v } else { v }, cr + 2)))
}

fn parse_multibulk(
    buf: &mut BytesMut,
    lim: &Limits,
    resume: Option<Walk>,
    save: &mut Option<Walk>,
) -> Result<Option<Vec<Bytes>>, ProtocolError> {
    let mut w = match resume {
        // A walk is only valid over the bytes it saw; a shorter buffer is another one.
        Some(w) if w.seen <= buf.len() => w,
        _ => {
            let (n, pos) = match header(buf, 1) {
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
            Walk {
                n: n as usize,
                done: 0,
                pos,
                claimed: 0,
                body_end: None,
                seen: 0,
            }
        }
    };
    let mut suspend = |mut w: Walk, buf: &BytesMut| {
        w.seen = buf.len();
        *save = Some(w);
        Ok(None)
    };
    // First pass: check every header and find where the frame ends, storing nothing.
    while w.done < w.n {
        let end = match w.body_end {
            Some(end) => end,
            None => {
                let pos = w.pos;
                examined(1);
                match buf.get(pos) {
                    None => return suspend(w, buf),
                    Some(b'$') => {}
                    Some(&other) => {
                        return perr(format!("expected '$', got '{}'", printable(other)));
                    }
                }
                let (len, start) = match header(buf, pos + 1) {
                    Ok(Some(h)) => h,
                    Ok(None) => return suspend(w, buf),
                    Err(()) => return perr("invalid bulk length"),
                };
                if len < 0 || len as u64 > lim.max_bulk_len as u64 {
                    return perr("invalid bulk length");
                }
                let len = len as usize;
                w.claimed += len;
                if w.claimed > lim.max_request_bytes {
                    return perr("request too large");
                }
                w.body_end = Some(start + len);
                start + len
            }
        };
        if buf.len() < end + 2 {
            return suspend(w, buf);
        }
        if &buf[end..end + 2] != b"\r\n" {
            return perr("bulk string not terminated by CRLF");
        }
        w.pos = end + 2;
        w.done += 1;
        w.body_end = None;
    }
    let (n, pos) = (w.n, w.pos);
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
    let Some(args) = split_args(&text) else {
        return perr("unbalanced quotes in request");
    };
    if args.len() > lim.max_array_len {
        return perr("invalid multibulk length");
    }
    Ok(Some(args))
}

/// C's `isspace`: what separates inline arguments in Redis.
fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\x0b' | b'\x0c' | b'\r')
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// Splits an inline command line as Redis's `sdssplitargs` does: arguments separated by
/// spaces; `"..."` with the escapes `\n \r \t \b \a \xHH` and `\<any>` for that byte;
/// `'...'` with `\'` only; a quote may start in the middle of an argument (`a"b c"` is
/// `ab c`), but a closing quote must be followed by a space or the end of the line. None
/// for unbalanced quotes. A NUL byte ends the line (Redis, which looks for the newline
/// with `strchr`, would wait for more bytes instead).
fn split_args(line: &[u8]) -> Option<Vec<Bytes>> {
    let line = match line.iter().position(|&b| b == 0) {
        Some(n) => &line[..n],
        None => line,
    };
    let at = |i: usize| line.get(i).copied();
    let mut args = Vec::new();
    let mut i = 0;
    loop {
        while at(i).is_some_and(is_space) {
            i += 1;
        }
        if i >= line.len() {
            return Some(args);
        }
        let mut cur = Vec::new();
        let (mut dq, mut sq) = (false, false);
        loop {
            let c = at(i);
            if dq {
                match c {
                    None => return None,
                    Some(b'\\') if at(i + 1) == Some(b'x') => {
                        match (at(i + 2).and_then(hex), at(i + 3).and_then(hex)) {
                            (Some(h), Some(l)) => {
                                cur.push(h * 16 + l);
                                i += 3;
                            }
                            _ => {
                                cur.push(b'x');
                                i += 1;
                            }
                        }
                    }
                    Some(b'\\') if at(i + 1).is_some() => {
                        i += 1;
                        cur.push(match line[i] {
                            b'n' => b'\n',
                            b'r' => b'\r',
                            b't' => b'\t',
                            b'b' => 0x08,
                            b'a' => 0x07,
                            other => other,
                        });
                    }
                    Some(b'"') => {
                        if at(i + 1).is_some_and(|b| !is_space(b)) {
                            return None;
                        }
                        i += 1;
                        break;
                    }
                    Some(b) => cur.push(b),
                }
            } else if sq {
                match c {
                    None => return None,
                    Some(b'\\') if at(i + 1) == Some(b'\'') => {
                        i += 1;
                        cur.push(b'\'');
                    }
                    Some(b'\'') => {
                        if at(i + 1).is_some_and(|b| !is_space(b)) {
                            return None;
                        }
                        i += 1;
                        break;
                    }
                    Some(b) => cur.push(b),
                }
            } else {
                match c {
                    None => break,
                    Some(b' ' | b'\n' | b'\r' | b'\t') => {
                        i += 1;
                        break;
                    }
                    Some(b'"') => dq = true,
                    Some(b'\'') => sq = true,
                    Some(b) => cur.push(b),
                }
            }
            i += 1;
        }
        args.push(Bytes::from(cur));
    }
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
    /// The header reader as it was before the one-pass rewrite: the oracle.
    fn header_reference(buf: &[u8], at: usize) -> Result<Option<(i64, usize)>, ()> {
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

    #[test]
    fn the_one_pass_header_reader_agrees_with_the_reference() {
        let mut fixed: Vec<Vec<u8>> = [
            "0\r\n",
            "-0\r\n",
            "-\r\n",
            "\r\n",
            "12\r\n",
            "12\r",
            "12",
            "1a\r\n",
            "1a",
            "9223372036854775807\r\n",
            "9223372036854775808\r\n",
            "-9223372036854775807\r\n",
            "-9223372036854775808\r\n",
            "99999999999999999999\r\n",
            "0000000000000000001\r\n",
            "1\r\r\n",
            "--1\r\n",
            "1-\r\n",
            "12\n\r\n",
        ]
        .iter()
        .map(|s| s.as_bytes().to_vec())
        .collect();
        fixed.push(vec![b'1'; 40]);
        fixed.push([&[b'7'; 31][..], b"\r\n"].concat());
        // A deterministic stream of random lines over the interesting bytes.
        let alphabet = b"0123456789-\r\nx9";
        let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
        for _ in 0..20_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let len = (seed % 40) as usize;
            let line: Vec<u8> = (0..len)
                .map(|i| alphabet[((seed >> (i % 8 * 8)) as usize + i * 7) % alphabet.len()])
                .collect();
            fixed.push(line);
        }
        for line in &fixed {
            for at in 0..line.len().min(3) {
                assert_eq!(
                    header(line, at),
                    header_reference(line, at),
                    "{:?} at {at}",
                    String::from_utf8_lossy(line)
                );
            }
        }
    }

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
    fn inline_quotes_follow_sdssplitargs() {
        let split = |s: &[u8]| {
            super::split_args(s).map(|v| v.iter().map(|a| a.to_vec()).collect::<Vec<_>>())
        };
        let ok = |s: &[u8], want: &[&[u8]]| {
            assert_eq!(
                split(s),
                Some(want.iter().map(|a| a.to_vec()).collect()),
                "{:?}",
                String::from_utf8_lossy(s)
            )
        };
        ok(br#"set "a\x41\n" 'it\'s'"#, &[b"set", b"aA\n", b"it's"]);
        ok(br#""\t\r\b\a\\\"\q""#, &[b"\t\r\x08\x07\\\"q"]);
        ok(br#""\x4" "\xZZ""#, &[b"x4", b"xZZ"]);
        ok(br#"a"b c"  d"#, &[b"ab c", b"d"]);
        // Only space, \\n, \\r and \\t end an unquoted argument; any isspace byte separates.
        ok(b"  x\x0by\x0b z\x0c", &[b"x\x0by\x0b", b"z\x0c"]);
        ok(b"\x0c x", &[b"x"]);
        ok(br#"'a\"b' """#, &[br#"a\"b"#, b""]);
        ok(b"get k\0ignored", &[b"get", b"k"]);
        for bad in [
            &br#"set """test-key""" v"#[..],
            br#""open"#,
            b"'open",
            br#""a"b"#,
            b"'a'b",
            br#""\""#,
        ] {
            assert_eq!(split(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
        assert_eq!(
            parse(b"set \"\"\"test-key\"\"\" v\r\n").unwrap_err().0,
            "unbalanced quotes in request"
        );
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

    fn examined_reset() -> u64 {
        EXAMINED.with(|c| c.replace(0))
    }

    /// An array of `n` bulk strings, the numbers `0` to `n - 1` (so lengths and headers vary).
    fn big_array(n: usize) -> Vec<u8> {
        let mut v = format!("*{n}\r\n").into_bytes();
        for i in 0..n {
            let arg = i.to_string();
            v.extend_from_slice(format!("${}\r\n{arg}\r\n", arg.len()).as_bytes());
        }
        v
    }

    const BIG: Limits = Limits {
        max_bulk_len: 1024,
        max_array_len: 4096,
        max_inline_len: 64,
        max_request_bytes: 1 << 20,
    };

    type Results = Vec<(usize, Result<Vec<Bytes>, ProtocolError>)>;

    /// Feeds `data` in pieces of `chunk` bytes (0: at once) through one parser, as a
    /// connection does; returns every result that is not "need more", each with the count
    /// of bytes fed when it came, up to the first error.
    fn fed(data: &[u8], chunk: usize, lim: &Limits) -> Results {
        fed_with(data, chunk, lim, false)
    }

    /// `fed`, or with `one_shot` a fresh parse of the whole buffer on every call (as this
    /// parser once worked).
    fn fed_with(data: &[u8], chunk: usize, lim: &Limits, one_shot: bool) -> Results {
        let mut parser = RequestParser::default();
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let mut total = 0;
        let pieces: Vec<&[u8]> = if chunk == 0 {
            vec![data]
        } else {
            data.chunks(chunk).collect()
        };
        for piece in pieces {
            buf.extend_from_slice(piece);
            total += piece.len();
            loop {
                let next = if one_shot {
                    parse_request(&mut buf, lim)
                } else {
                    parser.parse(&mut buf, lim)
                };
                match next {
                    Ok(None) => break,
                    Ok(Some(args)) => out.push((total, Ok(args))),
                    Err(e) => {
                        out.push((total, Err(e)));
                        return out;
                    }
                }
            }
        }
        out
    }

    fn bytewise(data: &[u8], lim: &Limits) -> Results {
        fed(data, 1, lim)
    }

    /// The args of each request, and each error, without the byte counts.
    fn outcomes(r: &Results) -> Vec<Result<Vec<Vec<u8>>, String>> {
        r.iter()
            .map(|(_, r)| match r {
                Ok(args) => Ok(args.iter().map(|a| a.to_vec()).collect()),
                Err(e) => Err(e.0.clone()),
            })
            .collect()
    }

    #[test]
    fn a_large_array_byte_by_byte_parses_as_at_once() {
        let mut data = big_array(1000);
        // Followed by pipelined requests, so the saved walk must be dropped after the array.
        data.extend_from_slice(b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\nPING\r\n*0\r\n");
        data.extend_from_slice(&big_array(3));
        let at_once = fed(&data, 0, &BIG);
        assert_eq!(at_once.len(), 5);
        let first = at_once[0].1.as_ref().unwrap();
        assert_eq!(first.len(), 1000);
        assert_eq!(first[999], "999");
        assert_eq!(outcomes(&bytewise(&data, &BIG)), outcomes(&at_once));
        for chunk in [2, 3, 7, 64, 1000] {
            assert_eq!(
                outcomes(&fed(&data, chunk, &BIG)),
                outcomes(&at_once),
                "{chunk}"
            );
        }
    }

    #[test]
    fn a_large_array_byte_by_byte_is_linear_work() {
        let data = big_array(2000);
        examined_reset();
        let got = bytewise(&data, &BIG);
        let work = examined_reset();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].1.as_ref().unwrap().len(), 2000);
        eprintln!("{} bytes, {work} header bytes examined", data.len());
        // Each header line is re-scanned while it is incomplete (bounded by its length,
        // at most MAX_HEADER), never the elements already checked; then once more to slice
        // the arguments out. Re-walking from the start on every read, as this parser once
        // did, examined 78,128,942 bytes here.
        assert!(
            work <= 2 * data.len() as u64,
            "{work} header bytes examined for a {}-byte request",
            data.len()
        );
    }

    /// Where a one-shot parse of a growing prefix first refuses `data`, and with what (the
    /// behaviour before the parser kept state, which re-walked every header each call).
    fn stateless_error_point(data: &[u8], lim: &Limits) -> (usize, String) {
        for cut in 1..=data.len() {
            if let Err(e) = parse_request(&mut BytesMut::from(&data[..cut]), lim) {
                return (cut, e.0);
            }
        }
        panic!("no error in {:?}", String::from_utf8_lossy(data));
    }

    #[test]
    fn errors_mid_stream_come_at_the_same_byte() {
        let lim = Limits {
            // The 300 elements below claim 790 bytes.
            max_request_bytes: 1500,
            ..BIG
        };
        let head = big_array(300);
        // Claim one more element than `head` has, then append a broken one.
        let mut prefix = b"*301\r\n".to_vec();
        prefix.extend_from_slice(&head[head.iter().position(|&b| b == b'\n').unwrap() + 1..]);
        let p = prefix.len();
        let cases: &[(&[u8], usize, &str)] = &[
            // (tail, the byte of the tail on which the error must come, message)
            (b"*1\r\n", 1, "expected '$', got '*'"),
            (b":1\r\n", 1, "expected '$', got ':'"),
            (b"$-1\r\n", 5, "invalid bulk length"),
            (b"$1025\r\n", 7, "invalid bulk length"),
            (b"$1x\r\n", 5, "invalid bulk length"),
            (b"$1\nab\r\n", 7, "invalid bulk length"),
            (b"$2\r\nabc\r\n", 8, "bulk string not terminated by CRLF"),
            (b"$1000\r\n", 7, "request too large"),
        ];
        for &(tail, at, want) in cases {
            let mut data = prefix.clone();
            data.extend_from_slice(tail);
            let name = String::from_utf8_lossy(tail);
            assert_eq!(
                stateless_error_point(&data, &lim),
                (p + at, want.into()),
                "{name}"
            );
            let got = bytewise(&data, &lim);
            assert_eq!(got.len(), 1, "{name}");
            assert_eq!(got[0].0, p + at, "{name}");
            assert_eq!(got[0].1.as_ref().unwrap_err().0, want, "{name}");
            assert_eq!(outcomes(&fed(&data, 0, &lim)), outcomes(&got), "{name}");
        }
        // A header line with no CR is refused once it reaches MAX_HEADER, not later.
        let mut data = prefix.clone();
        data.push(b'$');
        data.extend_from_slice(&[b'1'; 40]);
        let (at, msg) = stateless_error_point(&data, &lim);
        assert_eq!(
            (at, msg.as_str()),
            (p + 1 + MAX_HEADER, "invalid bulk length")
        );
        let got = bytewise(&data, &lim);
        assert_eq!(
            (got[0].0, got[0].1.as_ref().unwrap_err().0.as_str()),
            (at, "invalid bulk length")
        );
    }

    #[test]
    fn arbitrary_bytes_parse_the_same_in_any_pieces() {
        // The resumable parser against a fresh parse on every read, and against itself in
        // other pieces: the same requests, the same error.
        let mut x: u64 = 0x2545f4914f6cdd1d;
        let alphabet = b"*$\r\n\r\n\r\n0123456789-:+ abc\"";
        let lim = Limits {
            max_bulk_len: 8,
            max_array_len: 6,
            max_inline_len: 16,
            max_request_bytes: 24,
        };
        for _ in 0..5_000 {
            let mut v = Vec::new();
            let n = (x % 60) as usize;
            for _ in 0..n {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                v.push(alphabet[(x % alphabet.len() as u64) as usize]);
            }
            let name = String::from_utf8_lossy(&v);
            // Byte by byte: the same results on the same bytes as without saved state.
            let bytewise = bytewise(&v, &lim);
            let one_shot = fed_with(&v, 1, &lim, true);
            assert_eq!(
                bytewise.iter().map(|r| r.0).collect::<Vec<_>>(),
                one_shot.iter().map(|r| r.0).collect::<Vec<_>>(),
                "{name:?}"
            );
            assert_eq!(outcomes(&bytewise), outcomes(&one_shot), "{name:?}");
            let at_once = outcomes(&fed(&v, 0, &lim));
            for chunk in [1, 2, 5] {
                assert_eq!(
                    outcomes(&fed(&v, chunk, &lim)),
                    at_once,
                    "{name:?} in pieces of {chunk}"
                );
            }
            x = x.wrapping_add(1);
        }
    }
}
