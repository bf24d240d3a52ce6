//! Waiting for a reply with a deadline that the proxy's own stalls do not eat.
//!
//! A request's deadline starts when it is queued for its connection. If the worker is then
//! held before the connection's task writes it (a log checkpoint's cut holds the worker
//! ~1.5 s at ten million keys under load; any long step that does not yield), the request
//! goes out only after the hold, and a plain timeout reports the shard late although it
//! answered at once: a client got `TRYAGAIN ... timed out` under load at ten million keys.
//!
//! So the proxy keeps a ledger of the time its worker was held ([`record_held`], fed by the
//! engine's clock task, which notices a late tick), and [`within`] gives a wait whose
//! deadline passed the time the worker was held meanwhile, once more: only time the shard
//! had counts against it. Before looking, it waits [`GRACE`] so that the tasks woken in the
//! same turn (the clock, the connection reading a reply) have run.
//!
//! A leaf: names no other module.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::time::{error::Elapsed, Instant};

/// How long past its deadline a future is still awaited before the ledger is read.
pub const GRACE: Duration = Duration::from_millis(20);

/// Microseconds the worker was held, in total since the process started.
static HELD_MICROS: AtomicU64 = AtomicU64::new(0);

/// The worker was held for `d` (no task ran meanwhile).
pub fn record_held(d: Duration) {
    HELD_MICROS.fetch_add(d.as_micros() as u64, Ordering::Relaxed);
}

fn held() -> Duration {
    Duration::from_micros(HELD_MICROS.load(Ordering::Relaxed))
}

/// `fut`'s output if it is ready by `deadline`, pushed back by the time the worker was held
/// during the wait (see the module doc), and by [`GRACE`].
pub async fn within<F: Future>(deadline: Instant, fut: F) -> Result<F::Output, Elapsed> {
    let before = held();
    tokio::pin!(fut);
    let mut late = match tokio::time::timeout_at(deadline, &mut fut).await {
        Ok(v) => return Ok(v),
        Err(e) => e,
    };
    let mut counted = before;
    // Bounded: each round needs more held time recorded than the one before.
    for _ in 0..8 {
        match tokio::time::timeout(GRACE, &mut fut).await {
            Ok(v) => return Ok(v),
            Err(e) => late = e,
        }
        let now = held();
        if now <= counted {
            break;
        }
        match tokio::time::timeout(now - counted, &mut fut).await {
            Ok(v) => return Ok(v),
            Err(e) => late = e,
        }
        counted = now;
    }
    Err(late)
}

/// [`within`] `limit` from now.
pub async fn within_for<F: Future>(limit: Duration, fut: F) -> Result<F::Output, Elapsed> {
    within(Instant::now() + limit, fut).await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The worker is held past a request's deadline before the reply can come (as when a
    /// checkpoint's cut runs before the connection writes the request): the reply, 40 ms
    /// after the hold, is taken. A plain timeout, or one with only the grace, reports it.
    #[tokio::test(flavor = "current_thread")]
    async fn a_hold_past_the_deadline_is_not_the_shards_time() {
        let (tx, rx) = tokio::sync::oneshot::channel::<u32>();
        let shard = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(5)).await;
            // Holds the only worker past the waiter's deadline, as a checkpoint's cut does;
            // the clock task records such a hold when it next runs.
            std::thread::sleep(Duration::from_millis(100));
            record_held(Duration::from_millis(100));
            tokio::time::sleep(Duration::from_millis(40)).await;
            let _ = tx.send(7);
        });
        let got = within_for(Duration::from_millis(30), rx).await;
        assert_eq!(got.ok().and_then(Result::ok), Some(7));
        shard.await.unwrap();
    }

    #[tokio::test(flavor = "current_thread")]
    async fn no_reply_is_a_timeout_after_the_grace() {
        let (_tx, rx) = tokio::sync::oneshot::channel::<u32>();
        let started = Instant::now();
        assert!(within_for(Duration::from_millis(30), rx).await.is_err());
        assert!(started.elapsed() >= Duration::from_millis(30) + GRACE);
    }
}
