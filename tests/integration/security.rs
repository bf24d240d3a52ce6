//! Who gets in: client passwords and users, backend credentials, the admin token; and the
//! per-client limits (idle timeout, output bound).

use crate::support::certs::certificates;
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
    let shard = Redis::start_with(&["--requirepass", "shardpw"]);
    let port = shard.port;
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
async fn the_admin_token_can_come_from_a_file_like_any_secret() {
    let a = Redis::start();
    let wal = TempDir::new("token-file");
    let file = wal.path().join("admin-token");
    std::fs::write(&file, "from-a-file-0123456789\n").unwrap();
    let toml = format!("admin_token = {{ file = \"{}\" }}\n", file.display());
    let proxy = proxy_with(&toml, &[&a], &wal).await;
    let mut s = tokio::net::TcpStream::connect(proxy.http).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(b"GET /admin/shards HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer from-a-file-0123456789\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert_eq!(proxy.http("GET", "/admin/shards").await.0, 401);
    proxy.stop().await;
    // Too short, or unreadable: refused before anything binds, naming the key only.
    std::fs::write(&file, "short").unwrap();
    let e = tallyproxy::Config::from_toml_str(&toml)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("admin_token must be at least 16 characters"),
        "{e}"
    );
    let missing = "admin_token = { file = \"/nonexistent/tally-token\" }\n";
    let e = tallyproxy::Config::from_toml_str(missing)
        .unwrap_err()
        .to_string();
    assert!(e.contains("admin_token: cannot read"), "{e}");
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

fn cli(args: &[&str]) -> String {
    let out = std::process::Command::new("redis-cli")
        .args(args)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
        + String::from_utf8_lossy(&out.stderr).trim()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_speak_tls_to_the_listener() {
    let a = Redis::start();
    let (certs, wal) = (TempDir::new("tls"), TempDir::new("wal"));
    let (ca, cert, key) = certificates(&certs);
    let extra = format!(
        "[tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        cert.display(),
        key.display()
    );
    let mut toml = format!("listen = \"127.0.0.1:0\"\nhttp_listen = \"127.0.0.1:0\"\n{extra}");
    toml.push_str(&format!(
        "[[shards]]\naddr = \"{}\"\n[durability]\nwal_dir = \"{}\"\n",
        a.addr(),
        wal.path().display()
    ));
    let config = tallyproxy::Config::from_toml_str(&toml).unwrap();
    // Proxy::start checks readiness with a plain PING; bind and run by hand instead.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port().to_string();
    let (trigger, _) = tallyproxy::shutdown::channel();
    let task = tokio::spawn(tallyproxy::run(config, listener, http, trigger.clone()));
    let ca = ca.display().to_string();
    let mut ok = false;
    for _ in 0..50 {
        if cli(&["--tls", "--cacert", &ca, "-p", &port, "PING"]) == "PONG" {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ok, "PING over TLS");
    assert_eq!(
        cli(&["--tls", "--cacert", &ca, "-p", &port, "INCRBY", "tls:k", "5"]),
        "5"
    );
    assert_eq!(
        cli(&["--tls", "--cacert", &ca, "-p", &port, "GET", "tls:k"]),
        "5"
    );
    // Plain RESP on the TLS port gets nothing back: the handshake fails and the socket closes.
    // (rustls answers with an alert record, then closes).
    let mut plain = tokio::net::TcpStream::connect(format!("127.0.0.1:{port}"))
        .await
        .unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    plain.write_all(&encode(&["PING"])).await.unwrap();
    let mut got = Vec::new();
    let eof = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut got)).await;
    assert!(eof.is_ok(), "closed");
    assert!(!String::from_utf8_lossy(&got).contains("PONG"), "{got:?}");
    stop(trigger, task).await;
    assert_eq!(a.get("tls:k").as_deref(), Some("5"));
}

/// A TLS client of the proxy at 127.0.0.1:`port` (certificates from `certificates`): the
/// stream once the handshake is done.
async fn tls_connect(
    ca: &std::path::Path,
    port: u16,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let connector = tallyproxy::tls::connector(ca).unwrap();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let name = tokio_rustls::rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    connector.connect(name, tcp).await
}

/// PING over `s`; true on PONG.
async fn tls_ping<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(s: &mut S) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    if s.write_all(&encode(&["PING"])).await.is_err() || s.flush().await.is_err() {
        return false;
    }
    let mut got = [0u8; 7];
    matches!(
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut got)).await,
        Ok(Ok(_))
    ) && &got == b"+PONG\r\n"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maxclients_on_a_tls_listener_closes_without_writing() {
    use tokio::io::AsyncReadExt;
    let certs = TempDir::new("tls-maxclients");
    let (ca, cert, key) = certificates(&certs);
    let toml = format!(
        "listen = \"127.0.0.1:0\"\nhttp_listen = \"127.0.0.1:0\"\nmaxclients = 1\n\
         [tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n[durability]\nenabled = false\n",
        cert.display(),
        key.display()
    );
    let config = tallyproxy::Config::from_toml_str(&toml).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (trigger, _) = tallyproxy::shutdown::channel();
    let task = tokio::spawn(tallyproxy::run(config, listener, http, trigger.clone()));
    // The one client, connected and served (so it holds the only slot).
    let mut first = None;
    for _ in 0..50 {
        if let Ok(mut s) = tls_connect(&ca, port).await {
            if tls_ping(&mut s).await {
                first = Some(s);
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut first = first.expect("PING over TLS");

    // The next connection gets nothing at all (no plain-text error in place of a TLS
    // record), and a clean end of stream.
    let mut raw = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), raw.read_to_end(&mut got)).await;
    assert_eq!(
        read.expect("closed at once").map_err(|e| e.kind()),
        Ok(0),
        "{:?}",
        String::from_utf8_lossy(&got)
    );
    // A TLS client sees its handshake cut short by the close: an I/O error (end of stream;
    // a reset if its ClientHello came in just after the close), not a TLS protocol error
    // (which is what a plain-text `-ERR` in place of the ServerHello gives).
    let refused = tokio::time::timeout(Duration::from_secs(5), tls_connect(&ca, port))
        .await
        .expect("refused at once");
    let kind = refused.expect_err("refused").kind();
    assert!(
        matches!(
            kind,
            std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
        ),
        "{kind:?}"
    );
    // The refusals took no slot: the first client is still served, and once it leaves
    // another one is.
    assert!(tls_ping(&mut first).await);
    drop(first);
    let mut served = false;
    for _ in 0..50 {
        if let Ok(mut s) = tls_connect(&ca, port).await {
            if tls_ping(&mut s).await {
                served = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(served, "a slot freed is taken again");
    stop(trigger, task).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_can_be_reached_over_tls() {
    let certs = TempDir::new("tls-shard");
    let (ca, cert, key) = certificates(&certs);
    let port = support::free_port();
    let mut child = std::process::Command::new("redis-server")
        .args([
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--tls-auth-clients",
            "no",
        ])
        .arg("--tls-cert-file")
        .arg(&cert)
        .arg("--tls-key-file")
        .arg(&key)
        .arg("--tls-ca-cert-file")
        .arg(&ca)
        .arg("--dir")
        .arg(certs.path())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let ca_s = ca.display().to_string();
    let p = port.to_string();
    let up = support::wait_until(Duration::from_secs(5), || {
        cli(&["--tls", "--cacert", &ca_s, "-p", &p, "PING"]) == "PONG"
    });
    assert!(up, "redis-server with TLS started");
    let wal = TempDir::new("wal");
    let toml = format!(
        "listen = \"127.0.0.1:0\"\nhttp_listen = \"127.0.0.1:0\"\n[[shards]]\naddr = \"127.0.0.1:{port}\"\ntls = true\n\
         [backend]\ntls_ca_file = \"{}\"\nhealth_interval = \"100ms\"\n[durability]\nwal_dir = \"{}\"\n",
        ca.display(),
        wal.path().display()
    );
    let proxy = Proxy::start(tallyproxy::Config::from_toml_str(&toml).unwrap()).await;
    let mut c = proxy.conn().await;
    assert_eq!(c.cmd(&["SET", "s", "over-tls"]).await, "+OK\r\n");
    assert_eq!(c.cmd(&["GET", "s"]).await, "$8\r\nover-tls\r\n");
    assert_eq!(c.cmd(&["INCR", "n"]).await, ":1\r\n");
    // A RESP3 client's connections to the shard use TLS too.
    assert!(c.cmd(&["HELLO", "3"]).await.starts_with("%7\r\n"));
    assert_eq!(c.cmd(&["HSET", "h", "f", "v"]).await, ":1\r\n");
    assert_eq!(
        c.cmd(&["HGETALL", "h"]).await,
        "%1\r\n$1\r\nf\r\n$1\r\nv\r\n"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        proxy.http("GET", "/readyz").await.0,
        200,
        "health checks speak TLS too"
    );
    proxy.stop().await;
    assert_eq!(
        cli(&["--tls", "--cacert", &ca_s, "-p", &p, "GET", "n"]),
        "1",
        "the flush went over TLS"
    );
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxys_own_keys_are_reserved() {
    let a = Redis::start();
    let wal = TempDir::new("reserved");
    let proxy = proxy_with("", &[&a], &wal).await;
    let mut c = proxy.conn().await;
    let reserved = "-ERR keys starting with 'tally:' are reserved by tallyproxy\r\n";
    assert_eq!(
        c.cmd(&["HSET", "tally:applied", "p1", "99999999999999"])
            .await,
        reserved
    );
    assert_eq!(c.cmd(&["DEL", "x", "tally:applied"]).await, reserved);
    assert_eq!(c.cmd(&["INCR", "tally:mv:1:k"]).await, reserved);
    assert_eq!(c.cmd(&["INCR", "fine"]).await, ":1\r\n");
    proxy.stop().await;
}

#[test]
fn tls_and_credentials_that_cannot_be_honoured_stop_start_up() {
    let errors = [
        (
            "[[shards]]\naddr = \"127.0.0.1:1\"\ntls = true\n",
            "tls_ca_file is required",
        ),
        ("[backend]\ntls = true\n", "tls_ca_file is required"),
        (
            "[[shards]]\naddr = \"127.0.0.1:1\"\npassword = { env = \"TALLY_NO_SUCH_VAR\" }\n",
            "TALLY_NO_SUCH_VAR",
        ),
        (
            "[[shards]]\naddr = \"127.0.0.1:1\"\nusername = \"u\"\n",
            "needs a password",
        ),
        ("requirepass = \"\"\n", "must not be empty"),
        (
            "[tls]\ncert_file = \"/nonexistent/c.pem\"\nkey_file = \"/nonexistent/k.pem\"\n",
            "tls.cert_file",
        ),
    ];
    for (toml, want) in errors {
        let e = tallyproxy::Config::from_toml_str(toml).unwrap_err().0;
        assert!(e.contains(want), "{toml}: {e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebalance_between_password_protected_shards_authenticates_its_moves() {
    let shards: Vec<Redis> = (0..3)
        .map(|_| Redis::start_with(&["--requirepass", "pw"]))
        .collect();
    let ports: Vec<u16> = shards.iter().map(|r| r.port).collect();
    let wal = TempDir::new("wal");
    let toml = format!(
        "listen = \"127.0.0.1:0\"\nhttp_listen = \"127.0.0.1:0\"\n[[shards]]\naddr = \"127.0.0.1:{}\"\n[[shards]]\naddr = \"127.0.0.1:{}\"\n\
         [backend]\npassword = \"pw\"\n[durability]\nwal_dir = \"{}\"\n",
        ports[0],
        ports[1],
        wal.path().display()
    );
    let proxy = Proxy::start(tallyproxy::Config::from_toml_str(&toml).unwrap()).await;
    let mut c = proxy.conn().await;
    for i in 0..60 {
        assert_eq!(c.cmd(&["SET", &format!("plain:{i}"), "v"]).await, "+OK\r\n");
        assert!(c
            .cmd(&["INCRBY", &format!("count:{i}"), "3"])
            .await
            .starts_with(':'));
    }
    proxy.stop().await;
    let proxy = Proxy::start(tallyproxy::Config::from_toml_str(&toml).unwrap()).await;
    let body = format!("{{\"addr\": \"127.0.0.1:{}\"}}", ports[2]);
    let (status, out) = support::http_with_body(proxy.http, "POST", "/admin/shards", &body).await;
    assert_eq!(status, 202, "{out}");
    let done = async {
        for _ in 0..300 {
            let (_, p) = proxy.http("GET", "/admin/rebalance").await;
            if p.contains("\"state\":\"done\"") {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    };
    assert!(done.await, "the rebalance finished (MIGRATE authenticated)");
    let mut c = proxy.conn().await;
    for i in 0..60 {
        assert_eq!(c.cmd(&["GET", &format!("plain:{i}")]).await, "$1\r\nv\r\n");
        assert_eq!(c.cmd(&["GET", &format!("count:{i}")]).await, "$1\r\n3\r\n");
    }
    let moved_to_third = String::from_utf8_lossy(
        &std::process::Command::new("redis-cli")
            .args([
                "-p",
                &ports[2].to_string(),
                "-a",
                "pw",
                "--no-auth-warning",
                "DBSIZE",
            ])
            .output()
            .unwrap()
            .stdout,
    )
    .trim()
    .parse::<u64>()
    .unwrap();
    assert!(moved_to_third > 0);
    proxy.stop().await;
    drop(shards);
}

/// Orderly shutdown of a proxy started with `tallyproxy::run`; waits for it to return.
async fn stop(
    trigger: tallyproxy::shutdown::ShutdownTrigger,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
) {
    trigger.trigger();
    tokio::time::timeout(Duration::from_secs(15), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

/// A TCP listener that answers anything with an HTTP error: it accepts, but is no Redis.
async fn stranger() -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0
                        || s.write_all(b"HTTP/1.0 400 Bad Request\r\n\r\n")
                            .await
                            .is_err()
                    {
                        break;
                    }
                }
            });
        }
    });
    addr
}

/// The proxy on bound listeners, as `tallyproxy::run` (the listener may be on a chosen port).
fn run_on(
    cfg: tallyproxy::Config,
    listener: tokio::net::TcpListener,
) -> (
    tallyproxy::shutdown::ShutdownTrigger,
    tokio::task::JoinHandle<std::io::Result<()>>,
) {
    let http = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    http.set_nonblocking(true).unwrap();
    let http = tokio::net::TcpListener::from_std(http).unwrap();
    let (trigger, _) = tallyproxy::shutdown::channel();
    let task = tokio::spawn(tallyproxy::run(cfg, listener, http, trigger.clone()));
    (trigger, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_added_at_run_time_must_be_a_redis_server() {
    let a = Redis::start();
    let (wal, wal2) = (TempDir::new("identity"), TempDir::new("identity-2"));
    let proxy = Proxy::start(support::config(&[&a], &wal)).await;
    let other = Proxy::start(support::config(&[&a], &wal2)).await;
    let stranger = stranger().await;
    // A Redis the proxy has no password for cannot be told from a tallyproxy.
    let locked = Redis::start_with(&["--requirepass", "secret"]);
    let locked_addr: std::net::SocketAddr = locked.addr().parse().unwrap();
    let cases = [
        (locked_addr, format!("{locked_addr} refused INFO server")),
        (
            proxy.addr,
            format!(
                "{} is a tallyproxy (this very proxy), not a Redis server",
                proxy.addr
            ),
        ),
        (
            other.addr,
            format!("{} is a tallyproxy, not a Redis server", other.addr),
        ),
        (stranger, format!("{stranger} is not a Redis server")),
    ];
    for (addr, want) in cases {
        let (status, body) = support::http_json(
            proxy.http,
            "POST",
            "/admin/shards",
            &format!("{{\"addr\": \"{addr}\"}}"),
        )
        .await;
        assert_eq!(status, 409, "{addr}: {body}");
        let error = body["error"].as_str().unwrap();
        assert!(error.contains(&want), "{error} should say {want}");
    }
    // Nothing moved: the ring is the one it was, no rebalance ran, counts land on a.
    let (_, shards) = support::http_json(proxy.http, "GET", "/admin/shards", "").await;
    assert_eq!(shards["ring_version"], 1, "{shards}");
    assert_eq!(shards["shards"].as_array().unwrap().len(), 1, "{shards}");
    let (_, p) = support::http_json(proxy.http, "GET", "/admin/rebalance", "").await;
    assert_eq!(p["state"], "idle", "{p}");
    let mut conn = proxy.conn().await;
    assert_eq!(conn.cmd(&["INCR", "identity:k"]).await, ":1\r\n");
    let (status, _) = support::http_json(proxy.http, "POST", "/admin/flush", "").await;
    assert_eq!(status, 200);
    assert_eq!(a.get("identity:k").as_deref(), Some("1"));
    other.stop().await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tallyproxy_or_a_stranger_in_the_shard_list_stops_start_up() {
    let a = Redis::start();
    let wal = TempDir::new("identity-start");
    let other = Proxy::start(support::config(&[&a], &wal)).await;
    let stranger = stranger().await;
    for (addr, want) in [
        (other.addr, "is a tallyproxy, not a Redis server"),
        (stranger, "is not a Redis server"),
    ] {
        let wal = TempDir::new("identity-start-2");
        let cfg = support::config_for(&[a.addr(), addr.to_string()], &wal);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (trigger, task) = run_on(cfg, listener);
        let ended = tokio::time::timeout(Duration::from_secs(15), task).await;
        trigger.trigger();
        let err = ended
            .expect("start-up refused, not a proxy running")
            .unwrap()
            .expect_err("start-up refused");
        assert!(err.to_string().contains(want), "{err} should say {want}");
    }
    // The proxy's own ports are refused before anything is bound.
    let own = "listen = \"127.0.0.1:6391\"\n[[shards]]\naddr = \"127.0.0.1:6391\"\n";
    let err = tallyproxy::Config::from_toml_str(own).unwrap_err();
    assert!(err.0.contains("own listen address"), "{}", err.0);
    other.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sighup_that_names_a_tallyproxy_as_a_shard_changes_nothing() {
    let a = Redis::start();
    let (wal, wal2) = (TempDir::new("identity-hup"), TempDir::new("identity-hup-2"));
    let other = Proxy::start(support::config(&[&a], &wal2)).await;
    let log = wal.path().join("stderr.jsonl");
    let mut proxy = support::ProxyProcess::start_logged(&[a.addr()], &wal, "", &log);
    let http: std::net::SocketAddr = format!("127.0.0.1:{}", proxy.http).parse().unwrap();
    let file = wal.path().join("proxy.toml");
    let mut toml = std::fs::read_to_string(&file).unwrap();
    toml.push_str(&format!("[[shards]]\naddr = \"{}\"\n", other.addr));
    std::fs::write(&file, toml).unwrap();
    proxy.signal("HUP");
    let want = format!("{} is a tallyproxy, not a Redis server", other.addr);
    support::assert_reload_refused(&log, &want).await;
    let (_, shards) = support::http_json(http, "GET", "/admin/shards", "").await;
    assert_eq!(shards["ring_version"], 1, "{shards}");
    let (_, p) = support::http_json(http, "GET", "/admin/rebalance", "").await;
    assert_eq!(p["state"], "idle", "{p}");
    proxy.terminate();
    other.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_down_at_start_up_is_used_only_once_it_answers_as_redis() {
    let a = Redis::start();
    let x_port = support::free_port();
    let x_addr = format!("127.0.0.1:{x_port}");
    let wal = TempDir::new("identity-down");
    // x is down at start-up: a supported state, so the proxy starts.
    let proxy = Proxy::start(support::config_for(&[a.addr(), x_addr.clone()], &wal)).await;
    let nodes = [a.port, x_port]
        .iter()
        .map(|p| tallyproxy::router::ring::Node {
            name: format!("redis_{p}"),
            weight: 1,
        })
        .collect();
    let ring = tallyproxy::router::ring::Ring::new(nodes, 160);
    let key = (0..)
        .map(|i| format!("down:{i}"))
        .find(|k| ring.locate(k.as_bytes()) == 1)
        .unwrap();
    // Another tallyproxy comes up on x's address: it answers PING, and must not be used.
    let wal2 = TempDir::new("identity-down-2");
    let listener = tokio::net::TcpListener::bind(&x_addr).await.unwrap();
    let (trigger, task) = run_on(support::config(&[&a], &wal2), listener);
    assert!(support::eventually(Duration::from_secs(10), || support::ping(x_port)).await);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let (status, body) = support::http_json(proxy.http, "GET", "/readyz", "").await;
    assert_eq!(status, 503, "x stays down: {body}");
    let mut conn = proxy.conn().await;
    let reply = conn.cmd(&["SET", &key, "v"]).await;
    assert!(
        reply.starts_with("-TRYAGAIN"),
        "not sent to a tallyproxy: {reply}"
    );
    stop(trigger, task).await;

    // A real Redis on x's address: asked, and used.
    let x = Redis::start_on(x_port);
    assert_eq!(x.port, x_port);
    let start = Instant::now();
    loop {
        let (status, body) = support::http_json(proxy.http, "GET", "/readyz", "").await;
        if status == 200 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "x is up: {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(conn.cmd(&["SET", &key, "v"]).await, "+OK\r\n");
    assert_eq!(x.get(&key).as_deref(), Some("v"));
    proxy.stop().await;
}

/// Sends `head` (errors ignored: the server may close first) and reads what comes back
/// until the connection closes, within `limit`: (time taken, closed in time, text).
async fn exchange(
    addr: std::net::SocketAddr,
    head: Vec<u8>,
    limit: Duration,
) -> (Duration, bool, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let started = Instant::now();
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(&head).await;
    let mut out = Vec::new();
    let read = async {
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    };
    let closed = tokio::time::timeout(limit, read).await.is_ok();
    (
        started.elapsed(),
        closed,
        String::from_utf8_lossy(&out).to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sidecar_refuses_a_request_head_over_64_kib() {
    let wal = TempDir::new("http-head");
    let proxy = proxy_with("", &[], &wal).await;
    let mut head = b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Big: ".to_vec();
    head.extend(std::iter::repeat_n(b'a', 100_000));
    head.extend_from_slice(b"\r\nConnection: close\r\n\r\n");
    let (_, closed, text) = exchange(proxy.http, head, Duration::from_secs(10)).await;
    assert!(closed, "closed: {text}");
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 431"),
        "refused, not served: {text}"
    );
    // Just under the limit is served.
    let mut head = b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Big: ".to_vec();
    head.extend(std::iter::repeat_n(b'a', 60_000));
    head.extend_from_slice(b"\r\nConnection: close\r\n\r\n");
    let (_, closed, text) = exchange(proxy.http, head, Duration::from_secs(10)).await;
    assert!(closed && text.starts_with("HTTP/1.1 200"), "{text}");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sidecar_does_not_wait_for_a_body_that_does_not_come() {
    let wal = TempDir::new("http-body");
    let proxy = proxy_with("", &[], &wal).await;
    // A body announced and never sent holds its connection for 10 s at most.
    let slow = tokio::spawn(exchange(
        proxy.http,
        b"POST /admin/flush HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n{".to_vec(),
        Duration::from_secs(30),
    ));
    // A body announced past the limit is refused before any of it is read.
    let (took, closed, text) = exchange(
        proxy.http,
        b"POST /admin/shards HTTP/1.1\r\nHost: t\r\nContent-Length: 99999999999\r\n\r\n{\"addr\""
            .to_vec(),
        Duration::from_secs(5),
    )
    .await;
    assert!(closed && took < Duration::from_secs(5), "{took:?} {text}");
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    let (took, closed, text) = slow.await.unwrap();
    assert!(closed && took < Duration::from_secs(15), "{took:?} {text}");
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 408"),
        "{text}"
    );
    // The sidecar still serves.
    let (status, _) = proxy.http("GET", "/healthz").await;
    assert_eq!(status, 200);
    proxy.stop().await;
}
