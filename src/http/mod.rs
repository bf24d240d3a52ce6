//! The HTTP sidecar (hyper 1.x): the visit-counter API, health, metrics and admin.
//!
//! Routes, all in one `match` in [`route`]:
//!
//! | method | path                | what                                                     |
//! |--------|---------------------|----------------------------------------------------------|
//! | POST   | /visits/{page_id}   | count one visit of `visits:{page_id}`; the new total      |
//! | GET    | /visits/{page_id}   | the total and where it was read (`served_via`)            |
//! | GET    | /healthz            | the process is alive                                      |
//! | GET    | /readyz             | every shard reachable and the log writable (503 otherwise) |
//! | GET    | /metrics            | Prometheus text                                           |
//! | *      | /admin/...          | shards, rebalance, shutdown: see `admin` (token or loopback) |
//! | GET    | /, /dashboard, /stats/* | the dashboard page and its JSON: see `dashboard` (public) |
//!
//! Owns HTTP framing and JSON. Does not own counting: it calls the engine exactly as the
//! RESP path does, so `POST /visits/home` and `INCR visits:home` count the same thing.

pub mod admin;
pub mod dashboard;
pub mod metrics;

use crate::connection::{incr_with_base, IncrError};
use crate::counter::lane::{KeyValue, LaneError};
use crate::counter::{Cached, Incr};
use crate::server::Context;
use crate::shutdown::Shutdown;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::json;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// Largest request body accepted (only `POST /admin/shards` reads one).
const MAX_BODY: usize = 64 * 1024;
/// Longest page id, in bytes after percent-decoding.
pub const MAX_PAGE_ID: usize = 256;

pub(crate) type Resp = Response<Full<Bytes>>;

pub async fn serve(listener: TcpListener, ctx: Arc<Context>, mut shutdown: Shutdown) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "http accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.wait() => break,
        };
        let ctx = ctx.clone();
        let svc = service_fn(move |req| {
            let ctx = ctx.clone();
            async move { Ok::<_, std::convert::Infallible>(route(req, &ctx, peer).await) }
        });
        let conn = http1::Builder::new()
            .max_buf_size(64 * 1024)
            .header_read_timeout(Duration::from_secs(10))
            .timer(hyper_util::rt::TokioTimer::new())
            .serve_connection(TokioIo::new(stream), svc);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
    drop(listener);
    let _ = tokio::time::timeout(Duration::from_secs(5), graceful.shutdown()).await;
}

pub(crate) fn json_response(status: StatusCode, body: serde_json::Value) -> Resp {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string() + "\n")))
        .expect("a valid response")
}

pub(crate) fn error(status: StatusCode, msg: impl Into<String>) -> Resp {
    json_response(status, json!({ "error": msg.into() }))
}

pub async fn route(req: Request<Incoming>, ctx: &Arc<Context>, peer: SocketAddr) -> Resp {
    crate::metrics::global()
        .http_requests
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().map(str::to_string);
    let headers = req.headers().clone();
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return error(StatusCode::PAYLOAD_TOO_LARGE, "request body too large"),
    };
    let segments: Vec<&str> = path.trim_start_matches('/').splitn(2, '/').collect();
    match (method.clone(), segments.as_slice()) {
        (Method::POST, ["visits", raw]) => match page_key(raw) {
            Ok(key) => post_visit(ctx, key).await,
            Err(e) => error(StatusCode::BAD_REQUEST, e),
        },
        (Method::GET, ["visits", raw]) => {
            let (raw, series) = match raw.strip_suffix("/series") {
                Some(page) => (page, true),
                None => (*raw, false),
            };
            match (page_key(raw), query) {
                (Err(e), _) => error(StatusCode::BAD_REQUEST, e),
                (Ok(key), None) if !series => get_visits(ctx, key).await,
                (Ok(key), q) => get_window(ctx, key, q.as_deref().unwrap_or(""), series).await,
            }
        }
        (_, ["visits", _]) => error(StatusCode::METHOD_NOT_ALLOWED, "use GET or POST"),
        (Method::GET, ["healthz"]) => json_response(StatusCode::OK, json!({"status": "ok"})),
        (Method::GET, ["readyz"]) => readyz(ctx),
        (Method::GET, ["metrics"]) => Response::builder()
            .header("content-type", "text/plain; version=0.0.4")
            .body(Full::new(Bytes::from(metrics::render(ctx))))
            .expect("a valid response"),
        (_, ["admin", rest]) => match admin::refused(ctx, peer, &headers) {
            None => admin::route(ctx, &method, rest, body).await,
            Some(resp) => resp,
        },
        (Method::GET, [""] | ["dashboard"] | ["stats", _]) => {
            dashboard::route(ctx, &path, query.as_deref())
        }
        (_, ["healthz" | "readyz" | "metrics" | "" | "dashboard"] | ["stats", _]) => {
            error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
        }
        _ => error(StatusCode::NOT_FOUND, "not found"),
    }
}

/// `visits:{page_id}` from the raw path segment: percent-decoded, 1-256 bytes, no `/`.
pub fn page_key(raw: &str) -> Result<Bytes, String> {
    let decoded = percent_decode(raw.as_bytes()).ok_or("page_id has a malformed percent escape")?;
    if decoded.is_empty() {
        return Err("page_id is empty".into());
    }
    if decoded.len() > MAX_PAGE_ID {
        return Err(format!("page_id is longer than {MAX_PAGE_ID} bytes"));
    }
    if decoded.contains(&b'/') {
        return Err("page_id must not contain '/'".into());
    }
    let mut key = b"visits:".to_vec();
    key.extend_from_slice(&decoded);
    Ok(Bytes::from(key))
}

fn percent_decode(s: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            let v = u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?;
            out.push(v);
            i += 3;
        } else {
            out.push(s[i]);
            i += 1;
        }
    }
    Some(out)
}

async fn post_visit(ctx: &Context, key: Bytes) -> Resp {
    let engine = &ctx.engine;
    if !engine.is_batched(&key) {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "visits:* keys must be batched counter keys in [counters] match",
        );
    }
    let result = match engine.try_incr(&key, 1) {
        Incr::Value(v) => Ok((v, false)),
        Incr::Refused(m) => Err(IncrError::Refused(m.to_string())),
        Incr::NeedBase | Incr::Pending => incr_with_base(engine, &key, 1).await,
    };
    // A visit must not be lost to an outage: with no base to answer from, it is accepted,
    // logged, and lands when the shard returns.
    let result = match result {
        Err(IncrError::Unavailable(_)) => match engine.incr_blind(&key, 1) {
            Incr::Value(v) => Ok((v, false)),
            Incr::Pending => {
                if commit(ctx).await.is_err() {
                    return log_failed();
                }
                return json_response(
                    StatusCode::ACCEPTED,
                    json!({"visits": null, "pending": true}),
                );
            }
            Incr::Refused(m) if m.starts_with("TRYAGAIN") => {
                Err(IncrError::Unavailable(m.to_string()))
            }
            Incr::Refused(m) => Err(IncrError::Refused(m.to_string())),
            Incr::NeedBase => Err(IncrError::Unavailable(format!(
                "TRYAGAIN shard {} is unavailable",
                engine.owner_name(&key)
            ))),
        },
        other => other,
    };
    if commit(ctx).await.is_err() {
        return log_failed();
    }
    match result {
        Ok((v, from_shard)) => {
            let via = if from_shard {
                engine.owner_name(&key)
            } else {
                "in_memory".into()
            };
            json_response(StatusCode::OK, json!({"visits": v, "served_via": via}))
        }
        Err(IncrError::Unavailable(m)) => error(StatusCode::SERVICE_UNAVAILABLE, m),
        // A failed log is the proxy's trouble, not the request's: retry elsewhere or later.
        Err(IncrError::Refused(m)) if m == crate::counter::LOG_FAILED => {
            error(StatusCode::SERVICE_UNAVAILABLE, m)
        }
        Err(IncrError::Refused(m)) => error(StatusCode::CONFLICT, m),
    }
}

/// Makes the log durable before the reply, as the RESP path does.
async fn commit(ctx: &Context) -> Result<(), crate::counter::wal::WalFailed> {
    match &ctx.engine.wal {
        Some(w) => w.commit().await,
        None => Ok(()),
    }
}

fn log_failed() -> Resp {
    error(StatusCode::SERVICE_UNAVAILABLE, crate::counter::LOG_FAILED)
}

async fn get_visits(ctx: &Context, key: Bytes) -> Resp {
    let engine = &ctx.engine;
    if let Cached::Hit(v) = engine.cached(&key) {
        engine.activity.served("in_memory");
        return json_response(
            StatusCode::OK,
            json!({"visits": v.unwrap_or(0), "served_via": "in_memory"}),
        );
    }
    let via = engine.owner_name(&key);
    let read = if engine.owner_up(&key) {
        engine.refresh(&key, engine.read_lands(&key)).await
    } else {
        Err(LaneError::Unavailable)
    };
    match read {
        Ok(KeyValue::Int(_) | KeyValue::Nil) => {
            let v = engine.value_of(&key).flatten().unwrap_or(0);
            engine.activity.served(&via);
            json_response(StatusCode::OK, json!({"visits": v, "served_via": via}))
        }
        Ok(KeyValue::Other(_)) => error(
            StatusCode::CONFLICT,
            format!("{} does not hold an integer", String::from_utf8_lossy(&key)),
        ),
        Ok(KeyValue::Error(m)) => error(StatusCode::CONFLICT, m),
        // The owner is down: answer from the last known base, and say when it is old.
        Err(e) => match engine.last_known(&key) {
            Some((v, stale)) => {
                engine.activity.served("in_memory");
                let mut body = json!({"visits": v.unwrap_or(0), "served_via": "in_memory"});
                if stale {
                    body["stale"] = json!(true);
                }
                json_response(StatusCode::OK, body)
            }
            None => error(StatusCode::SERVICE_UNAVAILABLE, e.client_message(&via)),
        },
    }
}

/// `GET /visits/{page_id}?from=&to=`, `?last=`, and `/visits/{page_id}/series?from=&to=&step=`.
async fn get_window(ctx: &Context, key: Bytes, query: &str, series: bool) -> Resp {
    use crate::counter::windows::{self, QueryError};
    let bad = |m: String| error(StatusCode::BAD_REQUEST, m);
    let mut params = std::collections::HashMap::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let Some(value) = percent_decode(value.as_bytes()).and_then(|v| String::from_utf8(v).ok())
        else {
            return bad(format!(
                "query parameter {name:?} is not valid percent-encoded UTF-8"
            ));
        };
        let known = if series {
            ["from", "to", "step"].contains(&name)
        } else {
            ["from", "to", "last"].contains(&name)
        };
        if !known {
            return bad(format!("unknown query parameter {name:?}"));
        }
        if params.insert(name.to_string(), value).is_some() {
            return bad(format!("query parameter {name:?} given twice"));
        }
    }
    let now = ctx.engine.wall_clock().now_secs();
    let time = |name: &str| {
        params
            .get(name)
            .map(|v| crate::clock::parse_time(v))
            .transpose()
    };
    let (from, to) = match (time("from"), time("to"), params.get("last")) {
        (Err(e), _, _) | (_, Err(e), _) => return bad(e),
        (Ok(None), _, None) => {
            return bad(if series {
                "a series needs from (and optionally to, step)".into()
            } else {
                "give from (and optionally to), or last".into()
            })
        }
        (Ok(Some(_)), _, Some(_)) | (_, Ok(Some(_)), Some(_)) => {
            return bad("give either from/to or last, not both".into())
        }
        (Ok(None), Ok(None), Some(last)) => match crate::clock::parse_span(last) {
            Ok(span) => windows::last(now, span),
            Err(e) => return bad(e),
        },
        (Ok(Some(from)), to, None) => (from, to.ok().flatten().unwrap_or(now + 1)),
    };
    let ranges = if series {
        let step = match params.get("step").map(|s| crate::clock::parse_span(s)) {
            None => 60,
            Some(Ok(s)) => s,
            Some(Err(e)) => return bad(e),
        };
        windows::series_ranges(from, to, step)
    } else {
        // `query` refuses a range that does not end after it starts.
        Ok(vec![(from, to)])
    };
    let answer = match ranges {
        Ok(r) => windows::query(&ctx.engine, &key, &r).await.map(|a| (r, a)),
        Err(e) => Err(e),
    };
    let (ranges, a) = match answer {
        Ok(ok) => ok,
        Err(e) => {
            let status = match e {
                QueryError::Invalid(_) | QueryError::NotWindowed => StatusCode::BAD_REQUEST,
                QueryError::Shard(_) => StatusCode::SERVICE_UNAVAILABLE,
            };
            return error(status, e.message());
        }
    };
    let uncovered: Vec<_> = a
        .uncovered
        .iter()
        .flatten()
        .map(|(f, t)| json!({"from": crate::clock::format_time(*f), "to": crate::clock::format_time(*t)}))
        .collect();
    let mut body = if series {
        let points: Vec<_> = ranges
            .iter()
            .zip(&a.counts)
            .map(|((t, _), n)| json!({"t": crate::clock::format_time(*t), "visits": n}))
            .collect();
        json!({
            "from": crate::clock::format_time(from),
            "to": crate::clock::format_time(to),
            "step": ranges[0].1 - ranges[0].0,
            "points": points,
        })
    } else {
        json!({
            "visits": a.counts[0],
            "from": crate::clock::format_time(from),
            "to": crate::clock::format_time(to),
        })
    };
    body["served_via"] = json!(a.served_via);
    body["complete"] = json!(uncovered.is_empty());
    if !uncovered.is_empty() {
        body["uncovered"] = json!(uncovered);
    }
    json_response(StatusCode::OK, body)
}

fn readyz(ctx: &Context) -> Resp {
    let topo = ctx.router.topology();
    let down: Vec<&str> = topo
        .shards
        .iter()
        .filter(|s| !s.is_up())
        .map(|s| s.name.as_str())
        .collect();
    // A failed log refuses every increment: a load balancer should send them elsewhere.
    let log_error = ctx.engine.wal.as_ref().and_then(|w| w.failure());
    if down.is_empty() && log_error.is_none() {
        json_response(StatusCode::OK, json!({"status": "ready"}))
    } else {
        let mut body = json!({"status": "not ready", "down": down});
        if let Some(e) = log_error {
            body["wal_error"] = json!(e);
        }
        json_response(StatusCode::SERVICE_UNAVAILABLE, body)
    }
}

#[cfg(test)]
mod tests {
    use super::page_key;

    #[test]
    fn page_ids_are_validated() {
        assert_eq!(page_key("home").unwrap(), "visits:home");
        assert_eq!(page_key("a%20b").unwrap(), "visits:a b");
        assert!(page_key("").is_err());
        assert!(page_key("a%2Fb").is_err());
        assert!(page_key("bad%zz").is_err());
        assert!(page_key("trunc%2").is_err());
        assert!(page_key(&"x".repeat(256)).is_ok());
        assert!(page_key(&"x".repeat(257)).is_err());
    }
}
