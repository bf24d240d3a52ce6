//! A full log disk loses nothing and doubles nothing. The write-ahead log lives on a small
//! tmpfs that concurrent pipelined clients fill; then (a) kill -9 and a restart with room,
//! (b) an orderly stop while full and a restart with room, (c) `POST /admin/flush` while
//! full, then room again and recovery in the running process. Each key is checked against
//! what its client saw: every acknowledged increment landed (0 lost), nothing landed that
//! was not sent (0 doubled), also after one more restart (a replay re-sends nothing that
//! landed).
//!
//! Mounting a tmpfs needs root (CI runs as root); elsewhere each test says why it is skipped.

use crate::support::load::{self, Load};
use crate::support::{self, ProxyProcess, Redis, TempDir};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A tmpfs mounted for one test, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(path: &Path, size: &str) -> Result<Tmpfs, String> {
        let uid = Command::new("id")
            .arg("-u")
            .output()
            .map_err(|e| e.to_string())?;
        if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
            return Err("mounting a tmpfs needs root".into());
        }
        std::fs::create_dir_all(path).map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .output()
            .map_err(|e| format!("mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Tmpfs(path.to_path_buf()))
    }

    /// Gives the filesystem room (or takes it away) without touching its files.
    fn resize(&self, size: &str) {
        let ok = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .unwrap()
            .success();
        assert!(ok, "remount to {size}");
    }
}

impl Tmpfs {
    /// Takes every free page, so that nothing the proxy does (a checkpoint that would
    /// compact the log) finds room until [`Tmpfs::resize`]. Bounded by the mount's size.
    fn fill_up(&self) {
        fill_up(&self.0)
    }

    /// [`Tmpfs::fill_up`] from another thread once `after` has passed, while a load runs.
    fn fill_up_after(&self, after: Duration) -> std::thread::JoinHandle<()> {
        let path = self.0.clone();
        std::thread::spawn(move || {
            std::thread::sleep(after);
            fill_up(&path)
        })
    }
}

/// Appends pages to `dir/filler` until the filesystem refuses one.
fn fill_up(dir: &Path) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("filler"))
        .unwrap();
    let page = [0u8; 4096];
    for _ in 0..1_000_000 {
        if f.write_all(&page).and_then(|_| f.flush()).is_err() {
            return;
        }
    }
    panic!("the filler never met a full disk");
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Pipelines of `depth` INCRs from `clients` connections until each is refused three
/// pipelines in a row (the log is full) or closed; bounded to 30 s.
async fn pipelined_load(
    addr: SocketAddr,
    clients: usize,
    depth: usize,
    tag: &'static str,
    stop: Arc<AtomicBool>,
) -> Load {
    let spec = load::Spec {
        clients,
        depth,
        prefix: format!("full:{tag}"),
        pause: Duration::ZERO,
        refused_rounds: Some(3),
        limit: Duration::from_secs(30),
    };
    load::pipelined(addr, spec, stop).await
}

fn landed(shards: &[&Redis], key: &str) -> i64 {
    shards
        .iter()
        .filter_map(|s| s.get(key))
        .map(|v| v.parse::<i64>().unwrap())
        .sum()
}

fn check(shards: &[&Redis], load: &Load, when: &str) {
    let acked = load.acked();
    let (lost, doubled) = load.lost_and_doubled(|k| landed(shards, k));
    eprintln!(
        "full disk, {when}: {acked} acknowledged, {} refused, {} connections closed; lost {lost}, doubled {doubled}",
        load.refusals, load.closed
    );
    assert_eq!((lost, doubled), (0, 0), "{when}: (lost, doubled)");
}

struct Setup {
    a: Redis,
    b: Redis,
    wal: TempDir,
    disk: Tmpfs,
    shards: Vec<String>,
}

fn setup(tag: &str) -> Option<Setup> {
    let wal = TempDir::new(tag);
    let disk = match Tmpfs::mount(&wal.path().join("log"), "1m") {
        Ok(d) => d,
        Err(why) => {
            eprintln!("skipped: the full-disk test needs a tmpfs of its own: {why}");
            return None;
        }
    };
    let (a, b) = (Redis::start(), Redis::start());
    let shards = vec![a.addr(), b.addr()];
    Some(Setup {
        a,
        b,
        wal,
        disk,
        shards,
    })
}

/// Fills the log: load until every client has been refused or closed.
async fn fill(proxy: &ProxyProcess, tag: &'static str) -> Load {
    let stop = Arc::new(AtomicBool::new(false));
    let load = pipelined_load(proxy.addr(), 8, 32, tag, stop).await;
    assert!(
        load.refusals + load.closed > 0,
        "the log filled up: {} refusals, {} closed",
        load.refusals,
        load.closed
    );
    assert!(
        load.keys.values().map(|s| s.acked).sum::<i64>() > 1000,
        "the load ran before the disk filled"
    );
    load
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_log_disk_then_kill_nine_loses_and_doubles_nothing() {
    let Some(s) = setup("full-kill9") else { return };
    let mut proxy = ProxyProcess::start(&s.shards, &s.wal, "always", "100ms");
    let load = fill(&proxy, "kill9").await;
    proxy.kill9();
    s.disk.resize("64m");
    let mut again = ProxyProcess::start(&s.shards, &s.wal, "always", "100ms");
    again.terminate();
    check(&[&s.a, &s.b], &load, "kill -9, restart with room");
    let mut third = ProxyProcess::start(&s.shards, &s.wal, "always", "100ms");
    third.terminate();
    check(&[&s.a, &s.b], &load, "kill -9, two restarts");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_log_disk_then_orderly_stop_loses_and_doubles_nothing() {
    let Some(s) = setup("full-stop") else { return };
    // Small segments: checkpoints (a whole snapshot each) run while the disk fills, so the
    // write that fails may be a checkpoint's.
    let mut proxy = ProxyProcess::start_durable(
        &s.shards,
        &s.wal,
        "everysec",
        "100ms",
        "segment_bytes = 65536",
        "",
    );
    // With small segments the log compacts itself, and a checkpoint file that does not fit
    // is given up and its room freed: the load alone may not fill the disk in time. The
    // disk is filled under it after a second.
    let filler = s.disk.fill_up_after(Duration::from_secs(1));
    let load = fill(&proxy, "stop").await;
    filler.join().unwrap();
    proxy.terminate();
    s.disk.resize("64m");
    let mut again = ProxyProcess::start(&s.shards, &s.wal, "everysec", "100ms");
    again.terminate();
    check(
        &[&s.a, &s.b],
        &load,
        "orderly stop while full, restart with room",
    );
    let mut third = ProxyProcess::start(&s.shards, &s.wal, "everysec", "100ms");
    third.terminate();
    check(
        &[&s.a, &s.b],
        &load,
        "orderly stop while full, two restarts",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_log_disk_then_admin_flush_and_recovery_in_place() {
    let Some(s) = setup("full-flush") else { return };
    // No periodic flush: every acknowledged increment is still pending when the log fails,
    // so the flush while full has something it must not send.
    let mut proxy = ProxyProcess::start(&s.shards, &s.wal, "always", "1h");
    let http: SocketAddr = format!("127.0.0.1:{}", proxy.http).parse().unwrap();
    let mut load = fill(&proxy, "flush").await;
    // A failed log recovers by itself when a checkpoint fits (it compacts the log): keep
    // the disk full so that the failed state can be looked at, failing it again if it
    // recovered meanwhile.
    s.disk.fill_up();
    let mut c = support::Raw::connect(proxy.addr()).await;
    for _ in 0..5 {
        if c.cmd(&["INFO", "persistence"])
            .await
            .contains("wal_status:failed")
        {
            break;
        }
        let again = pipelined_load(proxy.addr(), 2, 32, "flush", Arc::default()).await;
        load.merge(again);
        s.disk.fill_up();
    }

    // While full: a flush sends nothing (it could not be logged) and says why; the proxy
    // says it is not ready and why; INFO says the log failed; increments are refused
    // with the log's reason and the connection stays open; reads are served.
    let (status, body) = support::http_request(http, "POST", "/admin/flush").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("wal_error"), "{body}");
    let landed_total: i64 = load.keys.keys().map(|k| landed(&[&s.a, &s.b], k)).sum();
    assert_eq!(
        landed_total, 0,
        "nothing was sent while the log could not record it"
    );
    let (status, body) = support::http_request(http, "GET", "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("wal_error"), "{body}");
    let info = c.cmd(&["INFO", "persistence"]).await;
    assert!(info.contains("wal_status:failed"), "{info}");
    assert!(info.contains("wal_failed:1"), "{info}");
    // A key with acknowledged increments not landed yet (they are pending in memory).
    let key = load
        .keys
        .iter()
        .find(|(k, seen)| landed(&[&s.a, &s.b], k) < seen.acked)
        .map(|(k, _)| k.clone())
        .expect("some acknowledged increments wait in memory");
    let refused = c.cmd(&["INCR", &key]).await;
    assert!(
        refused.starts_with("-ERR the write-ahead log failed"),
        "{refused}"
    );
    let read = c.cmd(&["GET", &key]).await;
    assert!(read.starts_with('$'), "a counter read is served: {read}");
    let value: i64 = read.lines().nth(1).unwrap().parse().unwrap();
    assert!(
        value >= load.keys[&key].acked,
        "the read counts what is pending: {read}"
    );
    // A write ordered after the pending increments cannot run before they land.
    let before = landed(&[&s.a, &s.b], &key);
    let set = c.cmd(&["SET", &key, "0"]).await;
    assert!(
        set.starts_with("-TRYAGAIN the write-ahead log failed"),
        "{set}"
    );
    assert_eq!(landed(&[&s.a, &s.b], &key), before, "the SET did not run");

    // Room again: the log recovers in place, within a few seconds, and increments count.
    s.disk.resize("64m");
    let t = Instant::now();
    let mut ready = false;
    while t.elapsed() < Duration::from_secs(20) {
        if support::http_request(http, "GET", "/readyz").await.0 == 200 {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ready, "recovered within 20 s of room coming back");
    let info = c.cmd(&["INFO", "persistence"]).await;
    assert!(info.contains("wal_status:ok"), "{info}");
    assert!(info.contains("wal_recoveries_total:1"), "{info}");
    let stop = Arc::new(AtomicBool::new(false));
    let more = {
        let stop = stop.clone();
        tokio::spawn(pipelined_load(proxy.addr(), 4, 16, "flush", stop))
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let more = more.await.unwrap();
    assert_eq!(more.refusals + more.closed, 0, "increments taken again");
    assert!(more.keys.values().map(|s| s.acked).sum::<i64>() > 100);
    load.merge(more);
    let (status, body) = support::http_request(http, "POST", "/admin/flush").await;
    assert_eq!(status, 200, "{body}");
    assert!(landed(&[&s.a, &s.b], &key) >= before);
    check(
        &[&s.a, &s.b],
        &load,
        "admin flush while full, recovered in place",
    );
    proxy.terminate();
    let mut again = ProxyProcess::start(&s.shards, &s.wal, "always", "100ms");
    again.terminate();
    check(&[&s.a, &s.b], &load, "recovered in place, then a restart");
}
