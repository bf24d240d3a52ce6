//! Waiting for a reply with a deadline that the proxy's own stalls do not eat.
//!
//! A request's deadline starts when it is queued for its connection. If the worker is then
//! held before the connection's task writes it (a log checkpoint's cut holds the worker
//! ~1.5 s at ten million keys under load; any long step that does not yield), the request
//! goes out only after the hold, and a plain timeout reports the shard late although it
//! answered at once: a client got `TRYAGAIN ... timed out` under load at ten million keys.
//!
//! So the proxy keeps a ledger of the time its worker was held ([`record_held`], fed by the
//! engine's clock task when a tick comes [`HELD_FROM`] or more late: one step that did not
//! yield, not the ordinary queueing of a busy worker), and [`within`] gives a wait whose
//! deadline passed the time the worker was held meanwhile, once more. Before looking, it
//! waits [`GRACE`] so that the tasks woken in the same turn (the clock, the connection
//! reading a reply) have run. The time given back is at most the wait's own length (from
//! its first poll to its deadline): a shard that does not answer is reported within twice
//! its timeout (plus the grace) whatever the proxy does meanwhile.
//!
//! A wait that begins after a hold (the second of several replies awaited one after the
//! other against one deadline) is given nothing back: its ledger reading starts after the
//! hold. As before this module, such a reply is reported late.
//!
//! A leaf: names no other module.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::time::{error::Elapsed, Instant};

/// How long past its deadline a future is still awaited before the ledger is read.
pub const GRACE: Duration = Duration::from_millis(20);

/// The shortest hold the ledger counts.
pub const HELD_FROM: Duration = Duration::from_millis(100);

/// Microseconds the worker was held, in total since the process started.
static HELD_MICROS: AtomicU64 = AtomicU64::new(0);

/// The worker was held for `d` (no task ran meanwhile); counted from [`HELD_FROM`].
pub fn record_held(d: Duration) {
    if d >= HELD_FROM {
        HELD_MICROS.fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }
}

fn held() -> Duration {
    Duration::from_micros(HELD_MICROS.load(Ordering::Relaxed))
}

/// `fut`'s output if it is ready by `deadline`, pushed back by the time the worker was held
/// during the wait (see the module doc), and by [`GRACE`].
pub async fn within<F: Future>(deadline: Instant, fut: F) -> Result<F::Output, Elapsed> {
    let before = held();
    // The most given back: the wait's own length.
    let mut left = deadline.saturating_duration_since(Instant::now());
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
        let extra = now.saturating_sub(counted).min(left);
        if extra.is_zero() {
            break;
        }
        left -= extra;
        match tokio::time::timeout(extra, &mut fut).await {
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
    /// checkpoint's cut runs before the connection writes the request): the reply, 50 ms
    /// after the hold, is taken. A plain timeout, or one with only the grace, reports it.
    #[tokio::test(flavor = "current_thread")]
    async fn a_hold_past_the_deadline_is_not_the_shards_time() {
        let (tx, rx) = tokio::sync::oneshot::channel::<u32>();
        let shard = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(5)).await;
            // Holds the only worker past the waiter's deadline, as a checkpoint's cut does;
            // the clock task records such a hold when it next runs.
            std::thread::sleep(Duration::from_millis(200));
            record_held(Duration::from_millis(200));
            tokio::time::sleep(Duration::from_millis(50)).await;
            let _ = tx.send(7);
        });
        // Given back: the grace, then up to 100 ms more (the wait's length), ample for 50.
        let got = within_for(Duration::from_millis(100), rx).await;
        assert_eq!(got.ok().and_then(Result::ok), Some(7));
        shard.await.unwrap();
    }

    /// A hold longer than the wait itself gives back at most the wait's length.
    #[tokio::test(flavor = "current_thread")]
    async fn what_is_given_back_is_at_most_the_waits_length() {
        let (_tx, rx) = tokio::sync::oneshot::channel::<u32>();
        let started = Instant::now();
        let holder = tokio::spawn(async {
            tokio::time::sleep(Duration::from_millis(5)).await;
            std::thread::sleep(Duration::from_millis(150));
            record_held(Duration::from_secs(10));
        });
        assert!(within_for(Duration::from_millis(30), rx).await.is_err());
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        holder.await.unwrap();
    }

    #[tokio::test(flavor = "current_thread")]
    async fn no_reply_is_a_timeout_after_the_grace() {
        let (_tx, rx) = tokio::sync::oneshot::channel::<u32>();
        let started = Instant::now();
        assert!(within_for(Duration::from_millis(30), rx).await.is_err());
        assert!(started.elapsed() >= Duration::from_millis(30) + GRACE);
    }
}
