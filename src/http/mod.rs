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

use crate::context::Context;
use crate::counter::{Cached, Counted, CounterRead, IncrError};
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
/// Largest request head (request line and headers) accepted. hyper's `max_buf_size` bounds
/// what it buffers between parses, but one read can carry a head past it whole, so the
/// limit is also checked on the parsed head.
pub const MAX_HEAD: usize = 64 * 1024;
/// How long a request body may take to arrive; a client that announces a body and does
/// not send it holds nothing for longer.
const BODY_TIMEOUT: Duration = Duration::from_secs(10);
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
            .max_buf_size(MAX_HEAD)
            .header_read_timeout(Duration::from_secs(10))
            .timer(hyper_util::rt::TokioTimer::new())
            .serve_connection(TokioIo::new(stream), svc);
        let conn = graceful.watch(conn);
        crate::task::spawn(tracing::info_span!("http_client", %peer), async move {
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
    if head_len(&req) > MAX_HEAD {
        return closing(error(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "request head larger than 64 KiB",
        ));
    }
    // A body announced larger than the limit is refused before any of it is read.
    if hyper::body::Body::size_hint(req.body()).lower() > MAX_BODY as u64 {
        return closing(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "request body too large",
        ));
    }
    let collect = Limited::new(req.into_body(), MAX_BODY).collect();
    let body = match tokio::time::timeout(BODY_TIMEOUT, collect).await {
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(_)) => {
            return closing(error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request body too large",
            ))
        }
        Err(_) => {
            return closing(error(
                StatusCode::REQUEST_TIMEOUT,
                "request body not received within 10 s",
            ))
        }
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

/// The size of a request's head as sent: request line and header lines.
fn head_len<B>(req: &Request<B>) -> usize {
    let line = req.method().as_str().len() + req.uri().to_string().len() + 12;
    req.headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum::<usize>()
        + line
}

/// `resp` with the connection closed after it: the rest of the request (an unread body)
/// is not worth reading.
fn closing(mut resp: Resp) -> Resp {
    resp.headers_mut().insert(
        hyper::header::CONNECTION,
        hyper::header::HeaderValue::from_static("close"),
    );
    resp
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
    let counted = engine.incr_or_accept(&key, 1).await;
    // The reply acknowledges the visit only once its record is durable (as the RESP path).
    if ctx.engine.commit_log().await.is_err() {
        return log_failed();
    }
    match counted {
        Ok(Counted::Value { value, from_shard }) => {
            let via = if from_shard {
                engine.owner_name(&key)
            } else {
                "in_memory".into()
            };
            json_response(StatusCode::OK, json!({"visits": value, "served_via": via}))
        }
        // A visit must not be lost to an outage: accepted, logged, lands when the shard returns.
        Ok(Counted::Accepted) => json_response(
            StatusCode::ACCEPTED,
            json!({"visits": null, "pending": true}),
        ),
        Err(IncrError::Unavailable(m)) => error(StatusCode::SERVICE_UNAVAILABLE, m),
        // The proxy's trouble, not the request's: retry elsewhere or later.
        Err(IncrError::Refused(r)) if r.is_transient() => {
            error(StatusCode::SERVICE_UNAVAILABLE, r.message())
        }
        Err(IncrError::Refused(r)) => error(StatusCode::CONFLICT, r.message()),
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
    match engine.read_counter(&key).await {
        Ok(CounterRead::Read(v)) => {
            engine.activity.served(&via);
            json_response(
                StatusCode::OK,
                json!({"visits": v.unwrap_or(0), "served_via": via}),
            )
        }
        // The owner is down: answer from the last known base, and say when it is old.
        Ok(CounterRead::LastKnown(v, stale)) => {
            engine.activity.served("in_memory");
            let mut body = json!({"visits": v.unwrap_or(0), "served_via": "in_memory"});
            if stale {
                body["stale"] = json!(true);
            }
            json_response(StatusCode::OK, body)
        }
        Ok(CounterRead::NotInteger(_)) => error(
            StatusCode::CONFLICT,
            format!("{} does not hold an integer", String::from_utf8_lossy(&key)),
        ),
        Ok(CounterRead::Error(m)) => error(StatusCode::CONFLICT, m),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.client_message(&via)),
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
    let log_error = ctx.engine.log_failure();
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
