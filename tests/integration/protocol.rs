//! Protocol details as Redis has them: inline commands split like `sdssplitargs`, bulk
//! strings up to Redis's 512 MB, memory protected by the budget on buffered client input.

use crate::support::{self, Proxy, Raw, Redis, TempDir};
use tokio::io::AsyncWriteExt;

/// Sends `bytes` on a fresh connection and reads until the peer closes or 2 s pass.
async fn all_replies(addr: std::net::SocketAddr, bytes: &[u8]) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(std::time::Duration::from_secs(2), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return out,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inline_commands_split_quotes_as_redis_does() {
    let (a, direct) = (Redis::start(), Redis::start());
    let wal = TempDir::new("inline");
    let proxy = Proxy::start(support::config(&[&a], &wal)).await;
    // Each script runs on a fresh connection to the proxy and to a plain redis-server;
    // the bytes that come back, up to the close, must be the same.
    let scripts: &[&[u8]] = &[
        b"set \"a\\x41\\n\" 'it\\'s'\r\nget \"aA\\n\"\r\n",
        b"echo \"\\t\\r\\b\\a\\\\\\\"\\q\"\r\necho \"\\x4\" '\\n'\r\n",
        b"echo a\"b c\"\r\necho \"\"\r\nexists  \x0b k \r\n",
        b"set \"\"\"test-key\"\"\" v\r\nping\r\n",
        b"ping\r\necho \"open\r\nping\r\n",
        b"echo 'a'b\r\nping\r\n",
        b"echo \"\\\"\r\n",
    ];
    for script in scripts {
        // QUIT ends the scripts that do not end in a protocol error.
        let script = [*script, b"quit\r\n"].concat();
        let got = all_replies(proxy.addr, &script).await;
        let want = all_replies(direct.addr().parse().unwrap(), &script).await;
        assert_eq!(
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(&want),
            "{:?}",
            String::from_utf8_lossy(&script)
        );
    }
    let got = all_replies(proxy.addr, b"set \"\"\"test-key\"\"\" v\r\n").await;
    assert_eq!(
        got,
        b"-ERR Protocol error: unbalanced quotes in request\r\n"
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_of_16_mib_and_1_kib_is_accepted_as_redis_accepts_it() {
    let a = Redis::start();
    let wal = TempDir::new("big-value");
    let proxy = Proxy::start(support::config(&[&a], &wal)).await;
    let mut c = proxy.client().await;
    let value = vec![b'v'; 16 * 1024 * 1024 + 1024];
    let r: String = redis::cmd("SET")
        .arg("big")
        .arg(&value)
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(r, "OK");
    let back: Vec<u8> = redis::cmd("GET")
        .arg("big")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(back.len(), value.len());
    assert!(back == value);
    let n: i64 = redis::cmd("STRLEN")
        .arg("big")
        .query(&mut a.client())
        .unwrap();
    assert_eq!(n as usize, value.len());
    proxy.stop().await;
}

fn info_field(info: &str, key: &str) -> usize {
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .unwrap_or_else(|| panic!("{key} in INFO"))
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffered_input_past_the_budget_is_refused_clearly() {
    let a = Redis::start();
    let wal = TempDir::new("budget");
    let mut cfg = support::config(&[&a], &wal);
    cfg.limits.max_bulk_len = 2 * 1024 * 1024;
    cfg.limits.max_request_bytes = 3 * 1024 * 1024;
    cfg.limits.max_input_bytes = 2 * 1024 * 1024;
    cfg.validate().unwrap();
    let proxy = Proxy::start(cfg).await;
    let mut admin = proxy.conn().await;
    // One client holds 1.5 MiB of a 2 MiB value in the proxy's buffer.
    let mut first = proxy.conn().await;
    let head = b"*3\r\n$3\r\nSET\r\n$2\r\nk1\r\n$2097152\r\n";
    first.send(head).await;
    first.send(&vec![b'a'; 1536 * 1024]).await;
    let counted = 1536 * 1024 - 64 * 1024;
    let mut used = 0;
    for _ in 0..500 {
        used = info_field(
            &admin.cmd(&["INFO", "clients"]).await,
            "client_input_budget_used",
        );
        if used >= counted {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(
        used >= counted,
        "the first client's bytes are counted: {used}"
    );
    // A second one that would take the total past 2 MiB gets a clear error and is closed.
    let mut second = proxy.conn().await;
    second.send(head).await;
    second.send(&vec![b'b'; 1024 * 1024]).await;
    assert_eq!(
        second.reply().await,
        "-ERR Protocol error: client input over the proxy's budget (limits.max_input_bytes); try again later\r\n"
    );
    assert!(second.closed().await);
    // The first one finishes and is served; its share is given back.
    first.send(&vec![b'a'; 512 * 1024]).await;
    first.send(b"\r\n").await;
    assert_eq!(first.reply().await, "+OK\r\n");
    let mut c = Raw::connect(proxy.addr).await;
    assert_eq!(c.cmd(&["STRLEN", "k1"]).await, ":2097152\r\n");
    let mut used = usize::MAX;
    for _ in 0..500 {
        used = info_field(
            &admin.cmd(&["INFO", "clients"]).await,
            "client_input_budget_used",
        );
        if used == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(used, 0);
    assert_eq!(
        info_field(
            &admin.cmd(&["INFO", "clients"]).await,
            "client_input_budget"
        ),
        2 * 1024 * 1024
    );
    proxy.stop().await;
}
