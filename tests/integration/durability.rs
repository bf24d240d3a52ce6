//! Nothing lost, nothing doubled: the proxy killed with -9, a shard stopped under load, a
//! connection dropped after a flush batch was written, a corrupt log tail, a shard that
//! comes back empty. Real processes throughout; the proxy as the built binary where it
//! must die.

use crate::support::{self, ring_owner, Proxy, ProxyProcess, Redis, TempDir};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn total_on(shards: &[&Redis], key: &str) -> i64 {
    shards
        .iter()
        .filter_map(|s| s.get(key))
        .map(|v| v.parse::<i64>().unwrap())
        .sum()
}

/// `clients` tasks each INCR their own key until `stop`; returns per key (acknowledged,
/// attempted). Each client has at most one increment in flight, so the true count of a
/// key is its acknowledged count or one more.
async fn hammer(
    addr: SocketAddr,
    clients: usize,
    stop: Arc<AtomicBool>,
) -> HashMap<String, (i64, i64)> {
    let mut tasks = Vec::new();
    for i in 0..clients {
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let key = format!("chaos:{i}");
            let (mut acked, mut tried) = (0i64, 0i64);
            let Ok(mut c) = redis::Client::open(format!("redis://{addr}/"))
                .unwrap()
                .get_multiplexed_async_connection()
                .await
            else {
                return (key, (0, 0));
            };
            for _ in 0..1_000_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                tried += 1;
                let r: redis::RedisResult<i64> =
                    redis::cmd("INCR").arg(&key).query_async(&mut c).await;
                match r {
                    Ok(_) => acked += 1,
                    Err(e) if e.is_io_error() || e.is_connection_dropped() || e.is_timeout() => {
                        break
                    }
                    Err(_) => tried -= 1, // refused (TRYAGAIN): nothing was buffered
                }
            }
            (key, (acked, tried))
        }));
    }
    let mut out = HashMap::new();
    for t in tasks {
        let (k, v) = t.await.unwrap();
        out.insert(k, v);
    }
    out
}

async fn kill_nine_keeps_every_acknowledged_increment(fsync: &str) {
    let (a, b) = (Redis::start(), Redis::start());
    let wal = TempDir::new("kill9");
    let shards = vec![a.addr(), b.addr()];
    let mut proxy = ProxyProcess::start(&shards, &wal, fsync, "200ms");
    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn(hammer(proxy.addr(), 16, stop.clone()));
    tokio::time::sleep(Duration::from_millis(1200)).await;
    proxy.kill9();
    stop.store(true, Ordering::Relaxed);
    let counts = load.await.unwrap();
    assert!(
        counts.values().map(|c| c.0).sum::<i64>() > 100,
        "the load ran: {counts:?}"
    );

    // The restarted proxy replays its log and lands the rest; an orderly stop flushes.
    let mut again = ProxyProcess::start(&shards, &wal, fsync, "200ms");
    again.terminate();
    for (key, (acked, tried)) in &counts {
        let got = total_on(&[&a, &b], key);
        assert!(
            got >= *acked && got <= *tried,
            "{key}: {got} in Redis, {acked} acknowledged, {tried} tried ({fsync})"
        );
        assert_eq!(
            support::holder(&[&a, &b], key).len(),
            1,
            "{key} on one shard only"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_nine_loses_nothing_acknowledged_with_fsync_always() {
    kill_nine_keeps_every_acknowledged_increment("always").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_nine_loses_nothing_acknowledged_with_fsync_everysec() {
    kill_nine_keeps_every_acknowledged_increment("everysec").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_stopped_under_load_ends_with_exact_counts() {
    let (a, mut b) = (Redis::start(), Redis::start());
    let wal = TempDir::new("outage");
    let mut cfg = support::config(&[&a, &b], &wal);
    cfg.counters.flush_interval = tallyproxy::config::HumanDuration(Duration::from_millis(150));
    let proxy = Proxy::start(cfg).await;
    let shards = [&a, &b];
    // Keys on each shard; give each a known base first, so that increments keep being
    // accepted (from the cached base) while its shard is down.
    let keys: Vec<String> = (0..40).map(|i| format!("load:{i}")).collect();
    let mut c = proxy.client().await;
    for k in &keys {
        let _: i64 = redis::cmd("INCR").arg(k).query_async(&mut c).await.unwrap();
    }
    let acked = Arc::new(AtomicU64::new(keys.len() as u64));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for t in 0..8 {
        let (keys, acked, stop, url) = (keys.clone(), acked.clone(), stop.clone(), proxy.url());
        tasks.push(tokio::spawn(async move {
            let mut c = redis::Client::open(url)
                .unwrap()
                .get_multiplexed_async_connection()
                .await
                .unwrap();
            let mut per_key = HashMap::<String, i64>::new();
            for i in 0..100_000usize {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let k = &keys[(i * 7 + t) % keys.len()];
                let r: redis::RedisResult<i64> =
                    redis::cmd("INCR").arg(k).query_async(&mut c).await;
                if r.is_ok() {
                    acked.fetch_add(1, Ordering::Relaxed);
                    *per_key.entry(k.clone()).or_default() += 1;
                }
            }
            per_key
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Keep the data of b: stop it with SHUTDOWN NOSAVE? No: tests run without persistence,
    // so b is paused instead (SIGSTOP), which is what an outage looks like on the wire.
    let pid: i64 = match b.cmd(&["INFO", "server"]) {
        redis::Value::BulkString(v) => String::from_utf8(v)
            .unwrap()
            .lines()
            .find_map(|l| {
                l.strip_prefix("process_id:")
                    .map(|p| p.trim().parse().unwrap())
            })
            .unwrap(),
        v => panic!("{v:?}"),
    };
    Command::new("kill")
        .args(["-STOP", &pid.to_string()])
        .status()
        .unwrap();
    let before = acked.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let during = acked.load(Ordering::Relaxed) - before;
    Command::new("kill")
        .args(["-CONT", &pid.to_string()])
        .status()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut want = HashMap::<String, i64>::new();
    for k in &keys {
        want.insert(k.clone(), 1);
    }
    for t in tasks {
        for (k, n) in t.await.unwrap() {
            *want.get_mut(&k).unwrap() += n;
        }
    }
    assert!(
        during > 100,
        "increments kept being served while a shard was down ({during})"
    );
    proxy.stop().await;
    for k in &keys {
        assert_eq!(total_on(&shards, k), want[k], "{k}");
        assert_eq!(
            support::holder(&shards, k),
            vec![ring_owner(&shards, k)],
            "{k}"
        );
    }
    b.restart();
}

/// A TCP relay in front of a shard that, once, forwards a flush batch (an EVAL that
/// carries a delta) and then drops both connections before the reply can come back.
pub(crate) async fn lossy_relay(target: u16) -> (u16, Arc<AtomicBool>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let dropped = Arc::new(AtomicBool::new(false));
    let flag = dropped.clone();
    tokio::spawn(async move {
        for _ in 0..1000 {
            let Ok((client, _)) = listener.accept().await else {
                return;
            };
            let Ok(server) = TcpStream::connect(("127.0.0.1", target)).await else {
                continue;
            };
            let flag = flag.clone();
            tokio::spawn(async move {
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                // Set once a flush batch has been forwarded: its reply is then swallowed and
                // both connections dropped, so the proxy cannot know whether it ran.
                let cut = Arc::new(AtomicBool::new(false));
                let up = async {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match cr.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        let data = &buf[..n];
                        // A lane batch is an EVAL; a read-only one carries empty deltas
                        // ("$0\r\n\r\n"), a flush batch carries none.
                        let is_flush = data.windows(6).any(|w| w == b"\r\nEVAL")
                            && !data.windows(6).any(|w| w == b"$0\r\n\r\n");
                        if is_flush && !flag.load(Ordering::SeqCst) {
                            cut.store(true, Ordering::SeqCst);
                        }
                        if sw.write_all(data).await.is_err() {
                            return;
                        }
                        if cut.load(Ordering::SeqCst) {
                            // Stay until the reply has been swallowed below.
                            std::future::pending::<()>().await;
                        }
                    }
                };
                let down = async {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match sr.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        if cut.load(Ordering::SeqCst) {
                            flag.store(true, Ordering::SeqCst);
                            return; // the flush's reply, lost
                        }
                        if cw.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                };
                tokio::select! { _ = up => {}, _ = down => {} }
            });
        }
    });
    (port, dropped)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_lost_after_a_flush_batch_does_not_double_count() {
    let a = Redis::start();
    let (relay, dropped) = lossy_relay(a.port).await;
    let wal = TempDir::new("relay");
    let toml = format!(
        "listen = \"127.0.0.1:0\"\nhttp_listen = \"127.0.0.1:0\"\n[[shards]]\nname = \"only\"\naddr = \"127.0.0.1:{relay}\"\n\
         [backend]\ntimeout = \"300ms\"\n[counters]\nflush_interval = \"1h\"\n[durability]\nwal_dir = \"{}\"\n",
        wal.path().display()
    );
    let proxy = Proxy::start(tallyproxy::Config::from_toml_str(&toml).unwrap()).await;
    let mut c = proxy.client().await;
    for _ in 0..250 {
        let _: i64 = redis::cmd("INCR")
            .arg("relay:k")
            .query_async(&mut c)
            .await
            .unwrap();
    }
    proxy.stop().await;
    assert!(
        dropped.load(Ordering::SeqCst),
        "the relay dropped a flush reply"
    );
    assert_eq!(a.get("relay:k").as_deref(), Some("250"));
    // The retry was read back, not applied again: one batch id recorded.
    let applied: HashMap<String, String> = redis::cmd("HGETALL")
        .arg("tally:applied")
        .query(&mut a.client())
        .unwrap();
    assert_eq!(applied.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_log_tail_is_truncated_and_every_whole_record_recovered() {
    let wal = TempDir::new("torn");
    // Memory mode: the log is the only copy, so recovery is exact or visibly wrong.
    let cfg = support::config(&[], &wal);
    let proxy = Proxy::start(cfg.clone()).await;
    let mut c = proxy.client().await;
    for _ in 0..100 {
        let _: i64 = redis::cmd("INCR")
            .arg("torn:k")
            .query_async(&mut c)
            .await
            .unwrap();
    }
    // Kill without an orderly stop: abort the task, as close to kill -9 as in-process gets.
    let mut proxy = proxy;
    proxy.task.take().unwrap().abort();
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(proxy);
    let seg = std::fs::read_dir(wal.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "log"))
        .unwrap();
    let mut bytes = std::fs::read(&seg).unwrap();
    let whole = bytes.len();
    // A torn record (half an Incr) and then garbage.
    bytes.extend_from_slice(&[20, 0, 0, 0, 1, 2, 3, 4, 1, 5]);
    std::fs::write(&seg, &bytes).unwrap();
    let proxy = Proxy::start(cfg.clone()).await;
    let mut c = proxy.client().await;
    let v: i64 = redis::cmd("GET")
        .arg("torn:k")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(v, 100);
    proxy.stop().await;
    // Now flip a byte inside the last whole record: that record is lost, the rest kept.
    let seg = std::fs::read_dir(wal.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "log"))
        .unwrap();
    let mut bytes = std::fs::read(&seg).unwrap();
    assert!(bytes.len() >= 9 && whole > 0);
    let n = bytes.len();
    bytes[n - 3] ^= 0x55;
    std::fs::write(&seg, &bytes).unwrap();
    let proxy = Proxy::start(cfg).await;
    let mut c = proxy.client().await;
    let v: Option<i64> = redis::cmd("GET")
        .arg("torn:k")
        .query_async(&mut c)
        .await
        .unwrap();
    // The last record after the restart was the checkpoint holding 100: with it corrupt,
    // nothing of it can be trusted, and start-up still succeeds.
    assert!(v.is_none() || v == Some(100), "{v:?}");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_that_comes_back_empty_is_documented_not_fatal() {
    let (a, mut b) = (Redis::start(), Redis::start());
    let wal = TempDir::new("empty");
    let mut cfg = support::config(&[&a, &b], &wal);
    cfg.counters.cache_ttl = tallyproxy::config::HumanDuration(Duration::from_millis(200));
    let proxy = Proxy::start(cfg).await;
    let shards = [&a, &b];
    let key = (0..)
        .map(|i| format!("e:{i}"))
        .find(|k| ring_owner(&shards, k) == b.port)
        .unwrap();
    let mut c = proxy.client().await;
    for _ in 0..5 {
        let _: i64 = redis::cmd("INCR")
            .arg(&key)
            .query_async(&mut c)
            .await
            .unwrap();
    }
    let _: Option<i64> = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut c)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let v: i64 = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(v, 5);
    assert_eq!(b.get(&key).as_deref(), Some("5"));
    b.restart(); // its data is gone
                 // The proxy keeps serving; once the cache expires it reports what the shard holds now,
                 // and new increments count from there (docs/guarantees.md: a shard that loses its data).
    let back = support::eventually(Duration::from_secs(5), || support::ping(b.port)).await;
    assert!(back);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let mut after = None;
    for _ in 0..50 {
        if let Ok(v) = redis::cmd("INCR")
            .arg(&key)
            .query_async::<i64>(&mut c)
            .await
        {
            after = Some(v);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(after, Some(1));
    // What the proxy can do is say so: the first flush to land after the loss finds the
    // shard's exactly-once record behind what it had settled there (docs/guarantees.md).
    let by_port = |lost_a: u64, lost_b: u64| {
        let mut v = vec![(a.port, lost_a), (b.port, lost_b)];
        v.sort();
        v
    };
    assert_eq!(lost_data(&proxy).await, by_port(0, 0));
    let (status, _) = proxy.http("POST", "/admin/flush").await;
    assert_eq!(status, 200);
    assert_eq!(b.get(&key).as_deref(), Some("1"));
    assert_eq!(lost_data(&proxy).await, by_port(0, 1));
    // Once per loss: the flushes after it find the record where they left it.
    let v: i64 = redis::cmd("INCR")
        .arg(&key)
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(v, 2);
    let (status, _) = proxy.http("POST", "/admin/flush").await;
    assert_eq!(status, 200);
    assert_eq!(b.get(&key).as_deref(), Some("2"));
    assert_eq!(lost_data(&proxy).await, by_port(0, 1));
    proxy.stop().await;
}

/// `tallyproxy_shard_lost_data_total` per shard, as (the shard's port, value), by port.
async fn lost_data(proxy: &Proxy) -> Vec<(u16, u64)> {
    let (status, text) = proxy.http("GET", "/metrics").await;
    assert_eq!(status, 200);
    let mut out: Vec<(u16, u64)> = text
        .lines()
        .filter_map(|l| l.strip_prefix("tallyproxy_shard_lost_data_total{shard=\""))
        .map(|l| {
            let (name, value) = l.split_once("\"} ").unwrap();
            let port = name.rsplit(['_', ':']).next().unwrap().parse().unwrap();
            (port, value.trim().parse().unwrap())
        })
        .collect();
    out.sort();
    out
}

/// The log's checkpoints so far (INFO's `wal_checkpoints_total`).
async fn checkpoints(c: &mut support::Raw) -> u64 {
    let info = c.cmd(&["INFO", "persistence"]).await;
    info.lines()
        .find_map(|l| l.strip_prefix("wal_checkpoints_total:"))
        .unwrap_or_else(|| panic!("no wal_checkpoints_total in {info}"))
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_larger_than_a_segment_is_not_checkpointed_again_every_second() {
    let r = Redis::start();
    let wal = TempDir::new("durability-big-state");
    let mut cfg = support::config(&[&r], &wal);
    cfg.durability.segment_bytes = 4096;
    let proxy = Proxy::start(cfg).await;
    let mut c = proxy.conn().await;
    // 400 pending keys: a checkpoint of them is several times 4096 bytes.
    let mut burst = Vec::new();
    for i in 0..400 {
        burst.extend_from_slice(&support::encode(&["INCR", &format!("big-state:{i:05}")]));
    }
    c.send(&burst).await;
    for _ in 0..400 {
        assert_eq!(c.reply().await, ":1\r\n");
    }
    // The log task looks once a second: one checkpoint retires the records (their size
    // passed 4096), and none follows while nothing more is appended.
    let mut seen = Vec::new();
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        seen.push(checkpoints(&mut c).await);
    }
    assert!(seen[7] - seen[0] <= 1, "checkpoints over 3.5 s: {seen:?}");
    proxy.stop().await;
}

/// The log names a key once per segment and then logs it by that name (`wal::LogName`); a
/// checkpoint starts a segment that names every key afresh. After several checkpoints (a
/// small `segment_bytes`), a last round in the fresh segment gives and uses names again, and
/// every increment replays to its exact count: a name used after the cut that the new
/// segment never gave would end the replay at that record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn increments_logged_by_name_across_checkpoints_replay_exactly() {
    let wal = TempDir::new("named-log");
    // Memory mode: the log is the only copy, so replay is exact or visibly wrong.
    let mut cfg = support::config(&[], &wal);
    cfg.durability.segment_bytes = 4096;
    let proxy = Proxy::start(cfg.clone()).await;
    let mut c = proxy.conn().await;
    let keys: Vec<String> = (0..100).map(|i| format!("named:{i:03}")).collect();
    // `per_key` increments of each key in one burst, each answered with its exact count.
    async fn round(c: &mut support::Raw, keys: &[String], total: &mut i64, per_key: i64) {
        let mut burst = Vec::new();
        for k in keys {
            for _ in 0..per_key {
                burst.extend_from_slice(&support::encode(&["INCR", k]));
            }
        }
        c.send(&burst).await;
        for _ in keys {
            for i in 1..=per_key {
                assert_eq!(c.reply().await, format!(":{}\r\n", *total + i));
            }
        }
        *total += per_key;
    }
    let mut total = 0;
    // Twenty increments of each key per round (about 7 kB of log), each round followed by
    // the checkpoint it makes due (the log task looks once a second).
    for _ in 0..3 {
        let before = checkpoints(&mut c).await;
        round(&mut c, &keys, &mut total, 20).await;
        let mut now = before;
        for _ in 0..50 {
            now = checkpoints(&mut c).await;
            if now > before {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(now > before, "no checkpoint after a round");
    }
    // Two per key in the segment just cut (under `segment_bytes`: no checkpoint follows):
    // the first gives each key its name again, the second uses it.
    let before = checkpoints(&mut c).await;
    round(&mut c, &keys, &mut total, 2).await;
    assert_eq!(checkpoints(&mut c).await, before);
    // Kill without an orderly stop (no final checkpoint): the replay reads the names.
    let mut proxy = proxy;
    proxy.task.take().unwrap().abort();
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(proxy);
    let proxy = Proxy::start(cfg).await;
    let mut c = proxy.conn().await;
    assert_eq!(total, 62);
    for k in &keys {
        assert_eq!(
            c.cmd(&["GET", k]).await,
            "$2\r\n62\r\n",
            "{k} after the replay"
        );
    }
    proxy.stop().await;
}
