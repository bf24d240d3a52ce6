//! RESP3 replies from shards (on the connections that serve RESP3 clients): where each reply
//! ends, so that its raw bytes go to the client as they are, and the RESP2 frame Redis would
//! have sent a RESP2 client, for the code that looks inside replies (merges, the read cache).
//!
//! Our own walk rather than redis-protocol's resp3 decoder: that one builds a hash map or
//! set for every map and set reply only to be thrown away here, and it refuses a set whose
//! members are aggregates (Redis 7.0 sends sets of maps: COMMAND INFO's key specs), which
//! would cost the connection and every request in flight on it. Two passes: the first finds
//! the end without allocating (and says "incomplete" at the first missing byte); the
//! second, over the now whole reply, builds the view from slices of it.
//!
//! Owns RESP3 framing of replies. Does not own what a reply means.

use bytes::{Bytes, BytesMut};
use redis_protocol::bytes_utils::Str;
use redis_protocol::resp2::types::BytesFrame;

/// Deeper than any reply Redis sends; a shard that nests more is refused.
const MAX_DEPTH: usize = 64;

/// Takes one whole reply off the front of `buf`: `(its RESP2 view, its raw bytes)`, or None
/// while it is incomplete.
pub fn decode(buf: &mut BytesMut) -> Result<Option<(BytesFrame, Bytes)>, String> {
    let Some(end) = end_of(buf, 0, 0)? else {
        return Ok(None);
    };
    let raw = buf.split_to(end).freeze();
    let (view, _) = view(&raw, 0);
    Ok(Some((view, raw)))
}

/// The raw bytes of each element of the whole aggregate reply `raw` (`*`, `~`, `>`; RESP2 or
/// RESP3), for a reply whose elements come from different places (EXEC's array with the
/// proxy's own answers spliced in). None when `raw` is not one whole aggregate.
pub fn elements(raw: &Bytes) -> Option<Vec<Bytes>> {
    if !matches!(raw.first(), Some(b'*' | b'~' | b'>')) {
        return None;
    }
    let cr = line_end(raw, 1)?;
    let n: usize = number(&raw[1..cr]).ok()?.try_into().ok()?;
    let mut pos = cr + 2;
    let mut out = Vec::with_capacity(n.min(1024));
    for _ in 0..n {
        let end = end_of(raw, pos, 1).ok()??;
        out.push(raw.slice(pos..end));
        pos = end;
    }
    (pos == raw.len()).then_some(out)
}

/// The index of the CR ending the line that starts at `at`, if the whole line is there.
fn line_end(b: &[u8], at: usize) -> Option<usize> {
    let cr = at + b.get(at..)?.windows(2).position(|w| w == b"\r\n")?;
    Some(cr)
}

fn number(line: &[u8]) -> Result<i64, String> {
    std::str::from_utf8(line)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad length {:?}", String::from_utf8_lossy(line)))
}

/// Where the reply starting at `at` ends (None: not all of it is in `b` yet).
fn end_of(b: &[u8], at: usize, depth: usize) -> Result<Option<usize>, String> {
    if depth > MAX_DEPTH {
        return Err("reply nested too deep".into());
    }
    let Some(&kind) = b.get(at) else {
        return Ok(None);
    };
    let Some(cr) = line_end(b, at + 1) else {
        return Ok(None);
    };
    let line = &b[at + 1..cr];
    let after = cr + 2;
    match kind {
        b'+' | b'-' | b':' | b'_' | b',' | b'#' | b'(' => Ok(Some(after)),
        b'$' | b'!' | b'=' => match number(line)? {
            -1 if kind == b'$' => Ok(Some(after)),
            n if n < 0 => Err(format!("bad length {n}")),
            n => {
                let end = after + n as usize;
                if b.len() < end + 2 {
                    return Ok(None);
                }
                if &b[end..end + 2] != b"\r\n" {
                    return Err("string not terminated by CRLF".into());
                }
                Ok(Some(end + 2))
            }
        },
        b'*' | b'~' | b'>' | b'%' | b'|' => {
            let n = match number(line)? {
                -1 if kind == b'*' => return Ok(Some(after)),
                n if n < 0 => return Err(format!("bad length {n}")),
                n if kind == b'%' || kind == b'|' => n as usize * 2,
                n => n as usize,
            };
            let mut pos = after;
            for _ in 0..n {
                match end_of(b, pos, depth + 1)? {
                    Some(p) => pos = p,
                    None => return Ok(None),
                }
            }
            if kind == b'|' {
                // An attribute describes the reply that follows it; they go together.
                return end_of(b, pos, depth + 1);
            }
            Ok(Some(pos))
        }
        other => Err(format!("unexpected reply type {:?}", other as char)),
    }
}

fn text(b: &Bytes) -> Str {
    Str::from_inner(b.clone()).unwrap_or_else(|_| String::from_utf8_lossy(b).into_owned().into())
}

/// The RESP2 view of the whole reply at `at` in `raw` (checked by `end_of`), and its end.
fn view(raw: &Bytes, at: usize) -> (BytesFrame, usize) {
    let b = &raw[..];
    let kind = b[at];
    let cr = line_end(b, at + 1).expect("checked");
    let line = &b[at + 1..cr];
    let after = cr + 2;
    let len = || number(line).expect("checked");
    match kind {
        b'+' => (BytesFrame::SimpleString(raw.slice(at + 1..cr)), after),
        b'-' => (BytesFrame::Error(text(&raw.slice(at + 1..cr))), after),
        b':' => (BytesFrame::Integer(number(line).unwrap_or(0)), after),
        b'_' => (BytesFrame::Null, after),
        // Doubles and big numbers: RESP2 sends their text as a bulk string.
        b',' | b'(' => (BytesFrame::BulkString(raw.slice(at + 1..cr)), after),
        b'#' => (BytesFrame::Integer((line == b"t") as i64), after),
        b'$' | b'!' | b'=' => {
            let n = len();
            if n < 0 {
                return (BytesFrame::Null, after);
            }
            let end = after + n as usize;
            let body = match kind {
                // Verbatim text: RESP2 sends it without its `txt:` format.
                b'=' => raw.slice((after + 4).min(end)..end),
                _ => raw.slice(after..end),
            };
            let frame = match kind {
                b'!' => BytesFrame::Error(text(&body)),
                _ => BytesFrame::BulkString(body),
            };
            (frame, end + 2)
        }
        _ => {
            let n = len();
            if n < 0 {
                return (BytesFrame::Null, after);
            }
            let count = if kind == b'%' || kind == b'|' {
                n as usize * 2
            } else {
                n as usize
            };
            let mut items = Vec::with_capacity(count.min(1024));
            let mut pos = after;
            for _ in 0..count {
                let (item, next) = view(raw, pos);
                items.push(item);
                pos = next;
            }
            if kind == b'|' {
                return view(raw, pos);
            }
            (BytesFrame::Array(items), pos)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(input: &[u8]) -> (BytesFrame, Bytes) {
        let mut buf = BytesMut::from(input);
        let r = decode(&mut buf).unwrap().unwrap();
        assert!(buf.is_empty(), "{input:?}");
        r
    }

    fn bulk(s: &str) -> BytesFrame {
        BytesFrame::BulkString(Bytes::copy_from_slice(s.as_bytes()))
    }

    #[test]
    fn elements_are_the_raw_members() {
        let raw = Bytes::from_static(b"*3\r\n+OK\r\n*2\r\n:1\r\n$1\r\na\r\n%1\r\n+k\r\n_\r\n");
        let e = elements(&raw).unwrap();
        assert_eq!(e.len(), 3);
        assert_eq!(&e[1][..], b"*2\r\n:1\r\n$1\r\na\r\n");
        assert_eq!(&e[2][..], b"%1\r\n+k\r\n_\r\n");
        assert!(elements(&Bytes::from_static(b"*-1\r\n")).is_none());
        assert!(elements(&Bytes::from_static(b"*2\r\n+OK\r\n")).is_none());
        assert_eq!(elements(&Bytes::from_static(b"*0\r\n")).unwrap().len(), 0);
    }

    #[test]
    fn every_type_has_its_resp2_view() {
        let cases: Vec<(&[u8], BytesFrame)> = vec![
            (b"+OK\r\n", BytesFrame::SimpleString("OK".into())),
            (b"-ERR no\r\n", BytesFrame::Error("ERR no".into())),
            (b":-3\r\n", BytesFrame::Integer(-3)),
            (b"_\r\n", BytesFrame::Null),
            (b",1.5\r\n", bulk("1.5")),
            (b",inf\r\n", bulk("inf")),
            (
                b"(123456789012345678901234567890\r\n",
                bulk("123456789012345678901234567890"),
            ),
            (b"#t\r\n", BytesFrame::Integer(1)),
            (b"#f\r\n", BytesFrame::Integer(0)),
            (b"$2\r\nhi\r\n", bulk("hi")),
            (b"$-1\r\n", BytesFrame::Null),
            (b"=9\r\ntxt:a\r\nbc\r\n", bulk("a\r\nbc")),
            (b"!5\r\nERR x\r\n", BytesFrame::Error("ERR x".into())),
            (b"*-1\r\n", BytesFrame::Null),
            (
                b"%2\r\n$1\r\na\r\n,1\r\n$1\r\nb\r\n_\r\n",
                BytesFrame::Array(vec![bulk("a"), bulk("1"), bulk("b"), BytesFrame::Null]),
            ),
            // A set of maps, as COMMAND INFO sends in 7.0.
            (
                b"~2\r\n%1\r\n+k\r\n:1\r\n%0\r\n",
                BytesFrame::Array(vec![
                    BytesFrame::Array(vec![
                        BytesFrame::SimpleString("k".into()),
                        BytesFrame::Integer(1),
                    ]),
                    BytesFrame::Array(vec![]),
                ]),
            ),
            (b"|1\r\n+ttl\r\n:3\r\n$1\r\nv\r\n", bulk("v")),
            (b">2\r\n+a\r\n+b\r\n", {
                BytesFrame::Array(vec![
                    BytesFrame::SimpleString("a".into()),
                    BytesFrame::SimpleString("b".into()),
                ])
            }),
        ];
        for (input, want) in cases {
            let (view, raw) = one(input);
            assert_eq!(view, want, "{:?}", String::from_utf8_lossy(input));
            assert_eq!(&raw[..], input);
        }
    }

    #[test]
    fn replies_come_off_whole_and_every_prefix_is_incomplete() {
        let stream: &[u8] =
            b"%1\r\n$1\r\nk\r\n*2\r\n,2.5\r\n_\r\n=7\r\ntxt:abc\r\n|1\r\n+a\r\n:1\r\n#t\r\n";
        let ends = [24, 37, 53];
        for cut in 0..stream.len() {
            let mut buf = BytesMut::from(&stream[..cut]);
            let mut got = 0;
            while let Some((_, raw)) = decode(&mut buf).unwrap() {
                got += raw.len();
            }
            let whole = ends.iter().rev().find(|&&e| e <= cut).copied().unwrap_or(0);
            assert_eq!(got, whole, "cut at {cut}");
            assert_eq!(buf.len(), cut - whole);
        }
    }

    #[test]
    fn malformed_replies_are_errors() {
        for bad in [
            &b"?x\r\n"[..],
            b"$-2\r\n",
            b"$1\r\nab\r\n",
            b"%x\r\n",
            b"~-1\r\n",
        ] {
            assert!(decode(&mut BytesMut::from(bad)).is_err(), "{bad:?}");
        }
        let deep = "*1\r\n".repeat(MAX_DEPTH + 2);
        assert!(decode(&mut BytesMut::from(deep.as_bytes())).is_err());
    }
}
