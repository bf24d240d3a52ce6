//! Who gets in: client passwords and users, backend credentials, the admin token; and the
//! per-client limits (idle timeout, output bound).

use crate::support::{self, encode, Proxy, Redis, TempDir};
use std::time::{Duration, Instant};

async fn proxy_with(extra: &str, shards: &[&Redis], wal: &TempDir) -> Proxy {
    let mut toml = String::from("listen = \"127.0.0.1:0\"\nhttp_listen = \"127.0.0.1:0\"\n");
    toml.push_str(extra);
    for s in shards {
        toml.push_str(&format!("[[shards]]\naddr = \"{}\"\n", s.addr()));
    }
    toml.push_str(&format!(
        "[durability]\nwal_dir = \"{}\"\n",
        wal.path().display()
    ));
    Proxy::start(tallyproxy::Config::from_toml_str(&toml).unwrap()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_must_authenticate_when_a_password_is_set() {
    let a = Redis::start();
    let wal = TempDir::new("auth");
    std::env::set_var("TALLY_TEST_ALICE", "alice-pw");
    let extra = "requirepass = \"sesame\"\n[[users]]\nname = \"alice\"\npassword = { env = \"TALLY_TEST_ALICE\" }\n";
    let proxy = proxy_with(extra, &[&a], &wal).await;
    let mut c = proxy.conn().await;
    for cmd in [
        &["GET", "k"][..],
        &["INCR", "k"],
        &["PING"],
        &["INFO"],
        &["MGET", "a", "b"],
    ] {
        assert_eq!(
            c.cmd(cmd).await,
            "-NOAUTH Authentication required.\r\n",
            "{cmd:?}"
        );
    }
    assert!(c
        .cmd(&["HELLO", "2"])
        .await
        .starts_with("-NOAUTH HELLO must be called"));
    let (_, before) = proxy.http("GET", "/metrics").await;
    assert_eq!(
        c.cmd(&["AUTH", "wrong"]).await,
        "-WRONGPASS invalid username-password pair or user is disabled.\r\n"
    );
    assert_eq!(
        c.cmd(&["AUTH", "alice", "sesame"]).await,
        "-WRONGPASS invalid username-password pair or user is disabled.\r\n"
    );
    let (_, after) = proxy.http("GET", "/metrics").await;
    let failures = |t: &str| {
        t.lines()
            .find_map(|l| l.strip_prefix("tallyproxy_auth_failures_total "))
            .unwrap()
            .parse::<f64>()
            .unwrap()
    };
    assert_eq!(failures(&after) - failures(&before), 2.0);
    assert_eq!(
        c.cmd(&["INCR", "k"]).await,
        "-NOAUTH Authentication required.\r\n"
    );
    assert_eq!(c.cmd(&["AUTH", "sesame"]).await, "+OK\r\n");
    assert_eq!(c.cmd(&["INCR", "k"]).await, ":1\r\n");

    let mut alice = proxy.conn().await;
    assert_eq!(alice.cmd(&["AUTH", "alice", "alice-pw"]).await, "+OK\r\n");
    assert_eq!(alice.cmd(&["INCR", "k"]).await, ":2\r\n");
    let mut hello = proxy.conn().await;
    assert!(hello
        .cmd(&["HELLO", "2", "AUTH", "default", "sesame", "SETNAME", "h"])
        .await
        .starts_with("*14\r\n"));
    assert_eq!(hello.cmd(&["GET", "k"]).await, "$1\r\n2\r\n");
    // QUIT is always allowed.
    let mut q = proxy.conn().await;
    assert_eq!(q.cmd(&["QUIT"]).await, "+OK\r\n");
    // redis-cli's -a works.
    let port = proxy.addr.port().to_string();
    let out = std::process::Command::new("redis-cli")
        .args(["-p", &port, "-a", "sesame", "--no-auth-warning", "GET", "k"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "2");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_with_a_password_are_authenticated_on_every_connect() {
    let dir = TempDir::new("redis-auth");
    let port = support::free_port();
    let mut child = std::process::Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--requirepass",
            "shardpw",
        ])
        .arg("--dir")
        .arg(dir.path())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Up once it answers (NOAUTH counts).
    let up = support::wait_until(Duration::from_secs(5), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    assert!(up);
    let wal = TempDir::new("wal");
    let toml = format!(
        "listen = \"127.0.0.1:0\"\nhttp_listen = \"127.0.0.1:0\"\n[[shards]]\naddr = \"127.0.0.1:{port}\"\npassword = \"shardpw\"\n\
         [backend]\nhealth_interval = \"100ms\"\n[durability]\nwal_dir = \"{}\"\n",
        wal.path().display()
    );
    let proxy = Proxy::start(tallyproxy::Config::from_toml_str(&toml).unwrap()).await;
    let mut c = proxy.conn().await;
    assert_eq!(c.cmd(&["SET", "s", "v"]).await, "+OK\r\n");
    assert_eq!(c.cmd(&["GET", "s"]).await, "$1\r\nv\r\n");
    assert_eq!(c.cmd(&["INCR", "n"]).await, ":1\r\n");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, _) = proxy.http("GET", "/readyz").await;
    assert_eq!(status, 200, "health checks authenticate too");
    proxy.stop().await;
    let out = std::process::Command::new("redis-cli")
        .args([
            "-p",
            &port.to_string(),
            "-a",
            "shardpw",
            "--no-auth-warning",
            "GET",
            "n",
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "1",
        "the flush authenticated"
    );
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_routes_need_the_token_when_one_is_set() {
    let a = Redis::start();
    let wal = TempDir::new("token");
    let proxy = proxy_with("admin_token = \"0123456789abcdef-token\"\n", &[&a], &wal).await;
    let (status, body) = proxy.http("GET", "/admin/shards").await;
    assert_eq!(status, 401, "{body}");
    let mut s = tokio::net::TcpStream::connect(proxy.http).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(b"GET /admin/shards HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer 0123456789abcdef-token\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    // The visit API does not need it.
    assert_eq!(proxy.http("POST", "/visits/home").await.0, 200);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_clients_are_closed_and_output_stays_bounded() {
    let a = Redis::start();
    let wal = TempDir::new("limits");
    let proxy = proxy_with(
        "[limits]\nidle_timeout = \"300ms\"\nmax_output_bytes = 4096\n",
        &[&a],
        &wal,
    )
    .await;
    let mut idle = proxy.conn().await;
    assert_eq!(idle.cmd(&["PING"]).await, "+PONG\r\n");
    let started = Instant::now();
    assert!(idle.closed().await, "closed when idle");
    assert!(started.elapsed() >= Duration::from_millis(250));
    // 200 replies of 1 KiB in one pipeline, with a 4 KiB output bound: all arrive, in order.
    let mut c = proxy.conn().await;
    let value = "x".repeat(1024);
    assert_eq!(c.cmd(&["SET", "big", &value]).await, "+OK\r\n");
    let mut burst = Vec::new();
    for i in 0..200 {
        burst.extend(encode(&["GET", "big"]));
        burst.extend(encode(&["ECHO", &i.to_string()]));
    }
    c.send(&burst).await;
    for i in 0..200 {
        assert_eq!(c.reply().await, format!("$1024\r\n{value}\r\n"));
        let n = i.to_string();
        assert_eq!(c.reply().await, format!("${}\r\n{n}\r\n", n.len()));
    }
    proxy.stop().await;
}
