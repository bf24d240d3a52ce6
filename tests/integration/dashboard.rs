//! The dashboard: its page, and the public JSON it reads (`/stats/summary`, `/stats/top`).
//! What a browser shows is checked by `scripts/browser-test.sh`.

use crate::support::{self, http_json, Proxy, Redis, TempDir};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A raw GET: the whole response, headers included.
async fn raw_get(proxy: &Proxy, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(proxy.http).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out))
        .await
        .unwrap()
        .unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_is_served_whole_from_the_binary() {
    let wal = TempDir::new("dash-page");
    let proxy = Proxy::start(support::config(&[], &wal)).await;
    for path in ["/", "/dashboard"] {
        let out = raw_get(&proxy, path).await;
        assert!(out.starts_with("HTTP/1.1 200"), "{path}: {out:.200}");
        let lower = out.to_ascii_lowercase();
        assert!(lower.contains("content-type: text/html; charset=utf-8"));
        assert!(lower.contains("content-security-policy: default-src 'none'"));
        assert!(out.contains("<canvas id=\"chart\""));
        assert!(out.contains("/stats/summary") && out.contains("/stats/top"));
        // Self-contained: nothing is fetched from anywhere else.
        assert!(!out.contains("src=\"http") && !out.contains("href=\"http"));
        assert!(!out.contains("https://") && !out.contains("//cdn"));
    }
    assert_eq!(proxy.http("POST", "/").await.0, 405);
    assert_eq!(proxy.http("DELETE", "/stats/summary").await.0, 405);
    assert_eq!(proxy.http("GET", "/stats/nothing").await.0, 404);
    assert_eq!(proxy.http("GET", "/dashboard/x").await.0, 404);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_lists_the_busiest_pages_without_the_admin_token() {
    let (a, b) = (Redis::start(), Redis::start());
    let wal = TempDir::new("dash-top");
    let mut config = support::config(&[&a, &b], &wal);
    config.admin_token = Some("0123456789abcdef-token".into());
    let proxy = Proxy::start(config).await;
    let (status, body) = http_json(proxy.http, "GET", "/stats/top", "").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["pages"], serde_json::json!([]));
    let mut c = proxy.client().await;
    for (page, n) in [("busy", 1600), ("second", 800), ("third", 160)] {
        let mut p = redis::pipe();
        for _ in 0..n {
            p.cmd("INCR").arg(format!("visits:{page}"));
        }
        // Keys outside visits:* are not pages.
        for _ in 0..n {
            p.cmd("INCR").arg(format!("other:{page}"));
        }
        let _: Vec<i64> = p.query_async(&mut c).await.unwrap();
    }
    let (status, body) = http_json(proxy.http, "GET", "/stats/top?n=2", "").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["sample"], 16);
    assert_eq!(body["half_life_seconds"], 600);
    let pages = body["pages"].as_array().unwrap();
    assert_eq!(pages.len(), 2, "{body}");
    for (p, (page, n)) in pages.iter().zip([("busy", 1600i64), ("second", 800)]) {
        assert_eq!(p["page"], page, "{body}");
        assert_eq!(p["visits"], n, "{body}");
        assert_eq!(p["stale"], false, "{body}");
        // Sampled one in 16 per map shard: within two samples of the truth.
        let recent = p["recent"].as_i64().unwrap();
        assert!((recent - n).abs() <= 32, "{page}: {recent} for {n}");
    }
    let (_, all) = http_json(proxy.http, "GET", "/stats/top?n=64", "").await;
    let names: Vec<_> = all["pages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["page"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["busy", "second", "third"]);
    for bad in ["n=0", "n=65", "n=x", "n=1&n=2", "top=3"] {
        let (status, body) = http_json(proxy.http, "GET", &format!("/stats/top?{bad}"), "").await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(body["error"].is_string());
    }
    // The page and the summary are public too; /admin stays behind the token.
    assert_eq!(proxy.http("GET", "/").await.0, 200);
    assert_eq!(proxy.http("GET", "/stats/summary").await.0, 200);
    assert_eq!(proxy.http("GET", "/admin/shards").await.0, 401);
    assert_eq!(proxy.http("GET", "/admin/rebalance").await.0, 401);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn summary_shows_counts_pending_shards_and_a_down_shard() {
    let (a, mut b) = (Redis::start(), Redis::start());
    let wal = TempDir::new("dash-summary");
    let proxy = Proxy::start(support::config(&[&a, &b], &wal)).await;
    for _ in 0..30 {
        assert_eq!(proxy.http("POST", "/visits/home").await.0, 200);
    }
    for _ in 0..10 {
        assert_eq!(proxy.http("POST", "/visits/about").await.0, 200);
    }
    assert_eq!(proxy.http("GET", "/visits/home").await.0, 200);
    let (status, s) = http_json(proxy.http, "GET", "/stats/summary", "").await;
    assert_eq!(status, 200, "{s}");
    assert_eq!(s["increments_total"], 40, "{s}");
    assert_eq!(s["backend_writes_total"], 0, "{s}");
    assert_eq!(s["merge_ratio"], serde_json::Value::Null);
    // Each page is a key, with its window delta (see docs/windows.md).
    assert!(s["pending"]["keys"].as_u64().unwrap() >= 2, "{s}");
    assert_eq!(s["pending"]["increments"], 40, "{s}");
    assert!(s["pending"]["oldest_seconds"].as_f64().unwrap() >= 0.0);
    assert_eq!(s["ready"], true);
    assert_eq!(s["memory_mode"], false);
    assert_eq!(
        s["log"],
        serde_json::json!({"enabled": true, "failed": false})
    );
    assert_eq!(s["ring_version"], 1);
    assert_eq!(s["served_via"]["in_memory"], 1, "{s}");
    assert_eq!(s["rebalance"]["state"], "idle");
    assert_eq!(s["rebalance"]["running"], false);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(s["now"].as_u64().unwrap().abs_diff(now) <= 2);
    let shards = s["shards"].as_array().unwrap();
    let names: Vec<_> = shards.iter().map(|x| x["name"].clone()).collect();
    assert_eq!(
        names,
        [
            format!("redis_{}", a.port).as_str(),
            format!("redis_{}", b.port).as_str()
        ]
    );
    let share: f64 = shards.iter().map(|x| x["share"].as_f64().unwrap()).sum();
    assert!((share - 1.0).abs() < 1e-6, "{s}");
    assert!(shards
        .iter()
        .all(|x| x["health"] == "up" && x["weight"] == 1));
    // Public: names, not addresses (those are for /admin; see docs/security.md).
    assert!(!s.to_string().contains("127.0.0.1"), "{s}");
    assert!(shards.iter().all(|x| x.get("addr").is_none()));

    // After a flush: one write per key, the merge ratio.
    assert_eq!(proxy.http("POST", "/admin/flush").await.0, 200);
    let (_, s) = http_json(proxy.http, "GET", "/stats/summary", "").await;
    assert_eq!(s["backend_writes_total"], 2, "{s}");
    assert_eq!(s["merge_ratio"], 20.0, "{s}");
    assert_eq!(s["pending"]["keys"], 0, "{s}");
    assert_eq!(s["flushes"]["failures"], 0, "{s}");
    // A read that misses the cache is served by the key's shard and counted for it.
    tokio::time::sleep(Duration::from_millis(5200)).await;
    let (_, v) = http_json(proxy.http, "GET", "/visits/about", "").await;
    let via = v["served_via"].as_str().unwrap().to_string();
    assert!(via.starts_with("redis_"), "{v}");
    let (_, s) = http_json(proxy.http, "GET", "/stats/summary", "").await;
    let owner = s["shards"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["name"] == via.as_str())
        .unwrap()
        .clone();
    assert_eq!(owner["served_via"], 1, "{s}");
    assert_eq!(s["served_via"][&via], 1, "{s}");

    // One shard down: the summary says so, and is still answered.
    b.stop();
    let down = format!("redis_{}", b.port);
    let mut last = serde_json::Value::Null;
    let mut seen = false;
    for _ in 0..100 {
        let (status, s) = http_json(proxy.http, "GET", "/stats/summary", "").await;
        assert_eq!(status, 200);
        let is_down = s["shards"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["name"] == down.as_str() && x["health"] == "down");
        last = s;
        if is_down {
            seen = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(seen, "{last}");
    assert_eq!(last["ready"], false, "{last}");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn summary_shows_a_rebalance() {
    let (a, b, c) = (Redis::start(), Redis::start(), Redis::start());
    let wal = TempDir::new("dash-rebalance");
    let proxy = Proxy::start(support::config(&[&a, &b], &wal)).await;
    let mut conn = proxy.client().await;
    let mut p = redis::pipe();
    for i in 0..200 {
        p.cmd("INCR").arg(format!("visits:p{i}"));
    }
    let _: Vec<i64> = p.query_async(&mut conn).await.unwrap();
    assert_eq!(proxy.http("POST", "/admin/flush").await.0, 200);
    let body = format!("{{\"addr\": \"{}\"}}", c.addr());
    let (status, r) = http_json(proxy.http, "POST", "/admin/shards", &body).await;
    assert_eq!(status, 202, "{r}");
    let mut last = serde_json::Value::Null;
    let mut done = false;
    for _ in 0..400 {
        last = http_json(proxy.http, "GET", "/stats/summary", "").await.1;
        if last["rebalance"]["state"] == "done" {
            done = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(done, "{last}");
    let rb = &last["rebalance"];
    assert_eq!(rb["running"], false);
    assert_eq!(rb["from_version"], 1);
    assert_eq!(rb["to_version"], 2);
    assert!(rb["keys_scanned"].as_u64().unwrap() >= 200, "{last}");
    assert!(rb["keys_moved"].as_u64().unwrap() > 0, "{last}");
    assert_eq!(last["ring_version"], 2);
    assert_eq!(last["shards"].as_array().unwrap().len(), 3);
    proxy.stop().await;
}
