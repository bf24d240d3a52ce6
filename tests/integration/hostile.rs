//! Hostile input (issue: security and hostile input): every class of malformed frame
//! against a real proxy over a real shard, the memory a huge length claim may cost, many
//! garbage-sending connections next to a well-behaved client, and the replay of what the
//! fuzzer (`fuzz/`, `tallyproxy::fuzzing`) found.

use crate::support::{self, Proxy, Raw, Redis, TempDir};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A proxy over one real shard, with the default limits (16 MB bulk, 64 KB inline).
async fn setup() -> (Redis, TempDir, Proxy) {
    let redis = Redis::start();
    let wal = TempDir::new("wal");
    let proxy = Proxy::start(support::config(&[&redis], &wal)).await;
    (redis, wal, proxy)
}

/// Resident memory of this test process (the proxy runs in it), in bytes.
fn vm_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status");
    kb * 1024
}

/// Deterministic garbage bytes (xorshift), none of them in `avoid`.
fn garbage(n: usize, seed: u64, avoid: &[u8]) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(n);
    while v.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = (x >> 24) as u8;
        if !avoid.contains(&b) {
            v.push(b);
        }
    }
    v
}

/// Sends `bytes` as one client may: the proxy may close before it has read them all, so a
/// failed write is not an error here.
async fn send_all(c: &mut Raw, bytes: &[u8]) {
    let _ = c.stream.write_all(bytes).await;
}

/// Reads until the proxy closes the connection; None if it is still open after `limit`.
async fn read_until_closed(c: &mut Raw, limit: Duration) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + limit;
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, c.stream.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(out),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
}

/// Sends one malformed frame on a fresh connection: the reply must be exactly one
/// `-ERR Protocol error: ...` line (`want`, when given, is its text after the prefix), and
/// the proxy must then close the connection.
async fn refused(proxy: &Proxy, class: &str, bytes: &[u8], want: Option<&str>) {
    let mut c = proxy.conn().await;
    send_all(&mut c, bytes).await;
    let out = read_until_closed(&mut c, Duration::from_secs(5))
        .await
        .unwrap_or_else(|| panic!("{class}: the proxy did not close the connection"));
    let text = String::from_utf8_lossy(&out);
    assert!(
        text.starts_with("-ERR Protocol error: ") && text.ends_with("\r\n"),
        "{class}: {text:?}"
    );
    assert_eq!(
        text.matches("\r\n").count(),
        1,
        "{class}: one reply: {text:?}"
    );
    if let Some(want) = want {
        assert_eq!(text, format!("-ERR Protocol error: {want}\r\n"), "{class}");
    }
}

/// The bystander: a connection opened before the hostile ones must keep working.
async fn still_served(other: &mut Raw, proxy: &Proxy, class: &str) {
    assert_eq!(other.cmd(&["PING"]).await, "+PONG\r\n", "after {class}");
    // And new clients are still accepted.
    let mut fresh = proxy.conn().await;
    assert_eq!(fresh.cmd(&["PING"]).await, "+PONG\r\n", "after {class}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_malformed_frame_class_is_refused_and_closed_without_harm() {
    let (_redis, _wal, proxy) = setup().await;
    let mut other = proxy.conn().await;
    assert_eq!(other.cmd(&["PING"]).await, "+PONG\r\n");

    // Classes answered with a protocol error and a close.
    let nested = b"*1\r\n".repeat(100_000);
    let mut binary_multibulk = b"*".to_vec();
    binary_multibulk.extend(garbage(4096, 7, b"0123456789-\r\n"));
    let long_binary_line = garbage(100 * 1024, 11, b"\n*");
    let cases: Vec<(&str, Vec<u8>, Option<&str>)> = vec![
        (
            "bad type byte in an array",
            b"*1\r\n:1\r\n".to_vec(),
            Some("expected '$', got ':'"),
        ),
        (
            "bad type byte (simple string) in an array",
            b"*2\r\n+GET\r\n$1\r\nk\r\n".to_vec(),
            Some("expected '$', got '+'"),
        ),
        (
            "binary type byte in an array",
            b"*1\r\n\x00\x01\r\n".to_vec(),
            Some("expected '$', got '?'"),
        ),
        (
            "negative bulk length",
            b"*1\r\n$-5\r\n".to_vec(),
            Some("invalid bulk length"),
        ),
        (
            "bulk length -1 in a request",
            b"*2\r\n$3\r\nGET\r\n$-1\r\n".to_vec(),
            Some("invalid bulk length"),
        ),
        (
            "array length overflowing i64",
            b"*99999999999999999999\r\n".to_vec(),
            Some("invalid multibulk length"),
        ),
        (
            "bulk length overflowing i64",
            b"*1\r\n$99999999999999999999\r\n".to_vec(),
            Some("invalid bulk length"),
        ),
        (
            "array length i64::MAX",
            b"*9223372036854775807\r\n".to_vec(),
            Some("invalid multibulk length"),
        ),
        (
            "bulk length i64::MAX",
            b"*1\r\n$9223372036854775807\r\n".to_vec(),
            Some("invalid bulk length"),
        ),
        (
            "a header longer than any number",
            format!("*{}\r\n", "1".repeat(40)).into_bytes(),
            Some("invalid multibulk length"),
        ),
        (
            "missing CRLF after a bulk",
            b"*1\r\n$4\r\nPINGxx".to_vec(),
            Some("bulk string not terminated by CRLF"),
        ),
        (
            "bare LF after an array header",
            b"*1\n$4\r\nPING\r\n".to_vec(),
            Some("invalid multibulk length"),
        ),
        (
            "CR without LF after a bulk header",
            b"*1\r\n$4\rxPING\r\n".to_vec(),
            Some("invalid bulk length"),
        ),
        (
            "deeply nested arrays (100,000 levels)",
            nested,
            Some("expected '$', got '*'"),
        ),
        (
            "binary garbage after an array marker",
            binary_multibulk,
            Some("invalid multibulk length"),
        ),
        (
            "100 KB of binary garbage with no newline",
            long_binary_line,
            Some("too big inline request"),
        ),
        (
            "unbalanced quotes inline",
            b"SET k \"open\r\n".to_vec(),
            Some("unbalanced quotes in request"),
        ),
    ];
    for (class, bytes, want) in &cases {
        refused(&proxy, class, bytes, *want).await;
        still_served(&mut other, &proxy, class).await;
    }

    // A claim past 512 MB (Redis's proto-max-bulk-len): refused at its header, and the proxy does not reserve what it
    // claims (the proxy runs in this process, so its memory is this process's).
    let before = vm_rss();
    for body in [&b""[..], &[b'x'; 1024 * 1024][..]] {
        let mut claim = b"*2\r\n$3\r\nGET\r\n$536870913\r\n".to_vec();
        claim.extend_from_slice(body);
        let started = Instant::now();
        refused(
            &proxy,
            "a claim past 512 MB",
            &claim,
            Some("invalid bulk length"),
        )
        .await;
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "refused at the header"
        );
        refused(
            &proxy,
            "a claim past 512 MB, alone",
            b"*1\r\n$536870913\r\n",
            Some("invalid bulk length"),
        )
        .await;
    }
    let grown = vm_rss().saturating_sub(before);
    assert!(
        grown < 64 * 1024 * 1024,
        "memory grew by {} MB after 512 MB claims",
        grown / (1024 * 1024)
    );
    still_served(&mut other, &proxy, "a claim past 512 MB").await;

    // Half a frame, then the client closes: no reply, the connection just ends.
    for half in [
        &b"*3\r\n$3\r\nSET\r\n$1\r\nk"[..],
        b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1000\r\nabc",
        b"*2\r\n$3",
        b"INCR half-line-with-no-newline",
    ] {
        let mut c = proxy.conn().await;
        send_all(&mut c, half).await;
        c.stream.shutdown().await.unwrap();
        let out = read_until_closed(&mut c, Duration::from_secs(5))
            .await
            .expect("the proxy closes once the client has");
        assert!(
            out.is_empty(),
            "no reply to half a frame {:?}: {:?}",
            String::from_utf8_lossy(half),
            String::from_utf8_lossy(&out)
        );
        still_served(&mut other, &proxy, "half a frame then close").await;
    }
    // Half a frame and the connection dropped with no shutdown at all.
    {
        let mut c = proxy.conn().await;
        send_all(&mut c, b"*2\r\n$4\r\nINCR\r\n$5\r\nhal").await;
        drop(c);
    }
    still_served(&mut other, &proxy, "half a frame then drop").await;

    // Not errors, as in Redis: a non-positive array length is an empty request, skipped.
    let mut c = proxy.conn().await;
    c.send(b"*-5\r\n*0\r\n*-1\r\n\r\n*1\r\n$4\r\nPING\r\n")
        .await;
    assert_eq!(c.reply().await, "+PONG\r\n");

    // Nothing hostile reached the shard, and the proxy still shuts down in order.
    assert_eq!(other.cmd(&["INCR", "hostile:after"]).await, ":1\r\n");
    proxy.stop().await;
}

/// One garbage-sending client: `rounds` connections, each sending one class of garbage.
async fn vandal(addr: std::net::SocketAddr, id: u64, rounds: u64) -> u64 {
    let mut refused = 0;
    for round in 0..rounds {
        let seed = id * 1_000 + round;
        let bytes: Vec<u8> = match seed % 7 {
            0 => b"*1\r\n".repeat(20_000),
            1 => b"*2\r\n$3\r\nGET\r\n$536870913\r\n".to_vec(),
            2 => {
                let mut v = b"*".to_vec();
                v.extend(garbage(2048, seed, b"0123456789-\r\n"));
                v
            }
            3 => garbage(80 * 1024, seed, b"\n"),
            4 => b"*1\r\n$-5\r\n".to_vec(),
            // Inline junk: unknown commands, then a protocol error.
            5 => {
                let mut v = Vec::new();
                for _ in 0..50 {
                    v.extend(garbage(30, seed, b"\r\n\"'"));
                    v.extend_from_slice(b"\r\n");
                }
                v.extend_from_slice(b"GET \"open\r\n");
                v
            }
            // Half a frame, then away.
            _ => b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$100\r\nabc".to_vec(),
        };
        let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
            continue;
        };
        let _ = s.write_all(&bytes).await;
        if seed % 7 == 6 {
            continue;
        }
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
        if String::from_utf8_lossy(&out).contains("-ERR Protocol error: ") {
            refused += 1;
        }
    }
    refused
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_garbage_connections_do_not_disturb_a_counting_client() {
    let (redis, _wal, proxy) = setup().await;
    let addr = proxy.addr;
    let vandals: Vec<_> = (0..32)
        .map(|id| tokio::spawn(vandal(addr, id + 1, 20)))
        .collect();

    let mut good = proxy.conn().await;
    let mut slowest = Duration::ZERO;
    let n = 2_000;
    for i in 1..=n {
        let started = Instant::now();
        assert_eq!(
            good.cmd(&["INCR", "hostile:visits"]).await,
            format!(":{i}\r\n")
        );
        if i % 100 == 0 {
            let v = i.to_string();
            assert_eq!(
                good.cmd(&["GET", "hostile:visits"]).await,
                format!("${}\r\n{v}\r\n", v.len())
            );
            // A pipelined burst too.
            let mut burst = Vec::new();
            burst.extend(support::encode(&["INCRBY", "hostile:burst", "2"]));
            burst.extend(support::encode(&["GET", "hostile:burst"]));
            good.send(&burst).await;
            let after = (i / 100) * 2;
            assert_eq!(good.reply().await, format!(":{after}\r\n"));
            let a = after.to_string();
            assert_eq!(good.reply().await, format!("${}\r\n{a}\r\n", a.len()));
        }
        slowest = slowest.max(started.elapsed());
    }
    let mut refused = 0;
    for v in vandals {
        refused += v.await.unwrap();
    }
    // Every vandal connection that should have been refused was (6 of 7 classes).
    assert!(refused >= 32 * 20 * 5 / 7, "only {refused} refusals");
    assert!(
        slowest < Duration::from_secs(2),
        "the good client waited {slowest:?} for a reply"
    );
    assert_eq!(
        good.cmd(&["GET", "hostile:visits"]).await,
        format!("${}\r\n{n}\r\n", n.to_string().len())
    );
    // Orderly shutdown flushes the merged increments to the shard: all of them, once.
    drop(good);
    proxy.stop().await;
    assert_eq!(redis.get("hostile:visits").as_deref(), Some("2000"));
    assert_eq!(redis.get("hostile:burst").as_deref(), Some("40"));
}

/// Fuzzer finding 1, at the wire: whether an inline line at the limit is accepted must
/// not depend on how TCP splits it (a line of `max_inline_len` bytes arriving as the line
/// and its `\r`, then the `\n`, was refused; the same bytes at once were accepted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inline_line_at_the_limit_is_judged_the_same_however_it_arrives() {
    let (_redis, _wal, proxy) = setup().await;
    let max = 64 * 1024;
    let at_limit = format!("ECHO {}", "x".repeat(max - 5));
    let over = format!("ECHO {}", "x".repeat(max - 4));
    let echoed = format!("${}\r\n{}\r\n", max - 5, "x".repeat(max - 5));
    for split in [None, Some(max), Some(max + 1)] {
        let mut line = at_limit.clone().into_bytes();
        line.extend_from_slice(b"\r\n");
        let mut c = proxy.conn().await;
        match split {
            None => c.send(&line).await,
            Some(at) => {
                c.send(&line[..at]).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
                c.send(&line[at..]).await;
            }
        }
        assert_eq!(c.reply().await, echoed, "at the limit, split at {split:?}");

        let mut line = over.clone().into_bytes();
        line.extend_from_slice(b"\r\n");
        let mut c = proxy.conn().await;
        match split {
            None => send_all(&mut c, &line).await,
            Some(at) => {
                send_all(&mut c, &line[..at]).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
                send_all(&mut c, &line[at..]).await;
            }
        }
        let out = read_until_closed(&mut c, Duration::from_secs(5)).await;
        assert_eq!(
            out.as_deref().map(String::from_utf8_lossy),
            Some("-ERR Protocol error: too big inline request\r\n".into()),
            "one over the limit, split at {split:?}"
        );
    }
}

/// Every input the fuzzer found a crash with (`fuzz/regressions/resp/`), and the seed
/// corpus, replayed through the fuzzing harness (parser, dispatcher, output checks).
#[test]
fn fuzz_regressions_and_seed_corpus_replay_cleanly() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut replayed = 0;
    for dir in ["regressions/resp", "corpus/resp"] {
        let mut files: Vec<_> = std::fs::read_dir(root.join(dir))
            .unwrap_or_else(|e| panic!("fuzz/{dir}: {e}"))
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        for f in files {
            let data = std::fs::read(&f).unwrap();
            let r = std::panic::catch_unwind(|| tallyproxy::fuzzing::run_one(&data));
            assert!(r.is_ok(), "{} fails the fuzzing checks", f.display());
            replayed += 1;
        }
    }
    assert!(replayed >= 12, "only {replayed} inputs replayed");
}
