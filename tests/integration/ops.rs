//! What an operator reads: /metrics as Prometheus text, INFO in Redis's format, JSON logs.

use crate::support::{self, free_port, Proxy, Redis, TempDir};
use std::collections::HashMap;
use std::time::Duration;

/// Parses Prometheus text exposition: every sample line `name{labels} value`, every
/// sample's family declared with `# TYPE`. Returns samples keyed by `name{labels}`.
fn parse_prometheus(text: &str) -> HashMap<String, f64> {
    let mut types = HashMap::new();
    let mut samples = HashMap::new();
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split_whitespace();
            let (name, kind) = (it.next().unwrap(), it.next().unwrap());
            assert!(
                ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                "{line}"
            );
            assert!(
                types.insert(name.to_string(), kind.to_string()).is_none(),
                "{name} declared twice"
            );
            continue;
        }
        if line.starts_with('#') {
            assert!(line.starts_with("# HELP "), "comment: {line}");
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("sample line: {line}"));
        let v: f64 = value.parse().unwrap_or_else(|_| panic!("value of {line}"));
        let name = series.split('{').next().unwrap();
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "name {name}"
        );
        if let Some(labels) = series.strip_prefix(name) {
            if !labels.is_empty() {
                assert!(
                    labels.starts_with('{') && labels.ends_with('}'),
                    "labels {labels}"
                );
            }
        }
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .filter(|f| types.contains_key(*f))
            .unwrap_or(name);
        assert!(types.contains_key(family), "{name} has no # TYPE");
        assert!(name.starts_with("tallyproxy_"), "{name} is namespaced");
        samples.insert(series.to_string(), v);
    }
    samples
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_prometheus_text_and_move_with_traffic() {
    let (a, b) = (Redis::start(), Redis::start());
    let wal = TempDir::new("metrics");
    let proxy = Proxy::start(support::config(&[&a, &b], &wal)).await;
    let (status, before) = proxy.http("GET", "/metrics").await;
    assert_eq!(status, 200);
    let before = parse_prometheus(&before);
    let mut c = proxy.conn().await;
    for i in 0..100 {
        assert!(c
            .cmd(&["INCR", &format!("m:{}", i % 10)])
            .await
            .starts_with(':'));
    }
    assert!(c.cmd(&["SET", "plain", "x"]).await.starts_with('+'));
    assert!(c.cmd(&["NOSUCH"]).await.starts_with('-'));
    let (_, after) = proxy.http("GET", "/metrics").await;
    let after = parse_prometheus(&after);
    let delta =
        |k: &str| after.get(k).copied().unwrap_or(0.0) - before.get(k).copied().unwrap_or(0.0);
    // Other tests share the process-wide recorder: at least our traffic shows.
    assert!(delta(r#"tallyproxy_commands_total{command="incr",outcome="ok"}"#) >= 100.0);
    assert!(delta(r#"tallyproxy_commands_total{command="set",outcome="ok"}"#) >= 1.0);
    assert!(delta(r#"tallyproxy_commands_total{command="unknown",outcome="error"}"#) >= 1.0);
    assert!(
        after
            .keys()
            .any(|k| k.starts_with("tallyproxy_command_duration_seconds_bucket")),
        "latency histogram"
    );
    assert!(after
        .keys()
        .any(|k| k.starts_with("tallyproxy_shard_request_duration_seconds_bucket")));
    assert!(after["tallyproxy_connections"] >= 1.0);
    assert!(after["tallyproxy_counter_increments_total"] >= 100.0);
    assert!(after["tallyproxy_counter_pending_keys"] >= 10.0);
    let up: Vec<_> = after
        .iter()
        .filter(|(k, _)| k.starts_with("tallyproxy_shard_up{"))
        .collect();
    assert_eq!(up.len(), 2);
    assert!(up.iter().all(|(_, v)| **v == 1.0));
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn info_parses_into_sections_with_the_proxys_figures() {
    let a = Redis::start();
    let wal = TempDir::new("info");
    let proxy = Proxy::start(support::config(&[&a], &wal)).await;
    let mut c = proxy.client().await;
    for _ in 0..5 {
        let _: i64 = redis::cmd("INCR")
            .arg("info:k")
            .query_async(&mut c)
            .await
            .unwrap();
    }
    let info: String = redis::cmd("INFO").query_async(&mut c).await.unwrap();
    let mut sections: HashMap<String, HashMap<String, String>> = HashMap::new();
    let mut current = None;
    for line in info.split("\r\n") {
        if line.is_empty() {
            continue;
        }
        if let Some(name) = line.strip_prefix("# ") {
            current = Some(name.to_lowercase());
            sections.entry(name.to_lowercase()).or_default();
            continue;
        }
        let (k, v) = line
            .split_once(':')
            .unwrap_or_else(|| panic!("key:value line: {line:?}"));
        sections
            .get_mut(current.as_ref().expect("a line inside a section"))
            .unwrap()
            .insert(k.into(), v.into());
    }
    for s in [
        "server",
        "clients",
        "stats",
        "shards",
        "counters",
        "persistence",
        "keyspace",
    ] {
        assert!(sections.contains_key(s), "section {s}: {sections:?}");
    }
    assert_eq!(sections["server"]["redis_version"], "7.0.0");
    assert!(
        sections["clients"]["connected_clients"]
            .parse::<u64>()
            .unwrap()
            >= 1
    );
    assert!(
        sections["counters"]["increments_received"]
            .parse::<u64>()
            .unwrap()
            >= 5
    );
    assert_eq!(sections["counters"]["pending_keys"], "1");
    assert_eq!(sections["counters"]["pending_increments"], "5");
    assert_eq!(sections["counters"]["window_queries"], "0");
    assert_eq!(sections["persistence"]["wal_enabled"], "1");
    assert!(sections["shards"]["shard0"].contains("status=up"));
    // One section on request, as Redis does.
    let only: String = redis::cmd("INFO")
        .arg("counters")
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(only.starts_with("# Counters\r\n") && !only.contains("# Server"));
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_valid_json_object_per_line() {
    let a = Redis::start();
    let dir = TempDir::new("jsonlog");
    let (port, http) = (free_port(), free_port());
    let cfg = dir.path().join("proxy.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1:{port}\"\nhttp_listen = \"127.0.0.1:{http}\"\n[[shards]]\naddr = \"{}\"\n\
             [backend]\nhealth_interval = \"100ms\"\n[durability]\nwal_dir = \"{}\"\n",
            a.addr(),
            dir.path().join("wal").display()
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.path().join("stderr.log")).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tallyproxy"))
        .arg("--config")
        .arg(&cfg)
        .arg("--log-json")
        .stderr(log)
        .spawn()
        .unwrap();
    assert!(support::wait_until(Duration::from_secs(10), || {
        support::ping(port)
    }));
    let mut c = redis::Client::open(format!("redis://127.0.0.1:{port}/"))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: i64 = redis::cmd("INCR")
        .arg("j")
        .query_async(&mut c)
        .await
        .unwrap();
    std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(support::wait_until(Duration::from_secs(15), || matches!(
        child.try_wait(),
        Ok(Some(_))
    )));
    assert!(child.wait().unwrap().success());
    let text = std::fs::read_to_string(dir.path().join("stderr.log")).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines.len() >= 3, "{text}");
    for line in &lines {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(
            v["level"].is_string() && v["fields"]["message"].is_string(),
            "{line}"
        );
    }
    assert!(
        lines
            .iter()
            .any(|l| l.contains("shutdown: every increment landed")),
        "{text}"
    );
}
