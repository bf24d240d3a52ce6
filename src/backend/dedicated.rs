//! Dedicated backend connections: one socket to one shard for one client, for the commands
//! that change a connection's state on the shard and so cannot share the pipelined pool
//! (a transaction with its WATCH, a subscription, a command that blocks).
//!
//! A [`Dedicated`] is opened when it is needed (the same address, credentials, TLS and, for a
//! RESP3 client, `HELLO 3` as the pool's connections), owned by the one client that uses it,
//! and closed by dropping it: Redis then forgets the connection's WATCH, subscriptions or
//! blocked command. It never reconnects, since a new socket would silently have lost that
//! state. How many exist at once is capped by [`Limit`] (`[backend] max_dedicated`), taken
//! before the socket is opened so that an exhausted cap is refused at once, never waited on.
//!
//! Owns these sockets and the cap. Does not own what is sent on them (`connection`).

use super::conn::{connect, decode, Io};
use super::{encode_command, BackendError, Reply, Shard};
use bytes::BytesMut;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The cap on dedicated connections, shared by every client of the proxy.
pub struct Limit {
    permits: Arc<Semaphore>,
    cap: usize,
}

/// One place in the cap, taken before a dedicated connection is opened.
pub struct Permit(#[allow(dead_code)] OwnedSemaphorePermit);

impl Limit {
    pub fn new(cap: usize) -> Limit {
        Limit {
            permits: Arc::new(Semaphore::new(cap)),
            cap,
        }
    }

    /// A place, or None when `cap` dedicated connections are open already.
    pub fn try_take(&self) -> Option<Permit> {
        self.permits.clone().try_acquire_owned().ok().map(Permit)
    }

    /// Dedicated connections open (or being opened) now: the gauge in INFO and /metrics.
    pub fn in_use(&self) -> usize {
        self.cap - self.permits.available_permits()
    }

    pub fn cap(&self) -> usize {
        self.cap
    }

    /// The client's error when the cap is reached.
    pub fn exhausted_message(&self) -> String {
        format!(
            "ERR tallyproxy has {} dedicated backend connections open (backend.max_dedicated); transactions with WATCH, subscriptions and blocking commands need one, try again later",
            self.cap
        )
    }
}

/// One client's own connection to one shard.
pub struct Dedicated {
    stream: Box<dyn Io>,
    buf: BytesMut,
    resp3: bool,
    _permit: Permit,
}

impl Dedicated {
    /// Connects to `shard` for a client speaking RESP3 when `resp3`. The permit is held as
    /// long as the connection.
    pub async fn open(
        shard: &Shard,
        resp3: bool,
        permit: Permit,
    ) -> Result<Dedicated, BackendError> {
        if !shard.is_verified() || !shard.is_up() {
            return Err(BackendError::Unavailable);
        }
        let mut opts = shard.conn_opts.clone();
        if resp3 {
            opts.on_connect.push(encode_command(&["HELLO", "3"]));
            opts.resp3 = true;
        }
        let stream = connect(&opts)
            .await
            .map_err(|_| BackendError::Unavailable)?;
        Ok(Dedicated {
            stream,
            buf: BytesMut::with_capacity(4096),
            resp3,
            _permit: permit,
        })
    }

    /// Writes encoded commands, within `shard.timeout`.
    pub async fn send(&mut self, frames: &[u8], shard: &Shard) -> Result<(), BackendError> {
        match tokio::time::timeout(shard.timeout, self.stream.write_all(frames)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(BackendError::Lost),
            Err(_) => Err(BackendError::Timeout),
        }
    }

    /// The next reply or push, however long it takes (the callers bound the wait: a blocking
    /// command by its own timeout, a subscription by the client's presence).
    pub async fn read(&mut self) -> Result<Reply, BackendError> {
        loop {
            match decode(&mut self.buf, self.resp3) {
                Ok(Some(r)) => return Ok(r),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "dropping dedicated backend connection");
                    return Err(BackendError::Lost);
                }
            }
            if self.buf.capacity() - self.buf.len() < 4096 {
                self.buf.reserve(16 * 1024);
            }
            match self.stream.read_buf(&mut self.buf).await {
                Ok(0) | Err(_) => return Err(BackendError::Lost),
                Ok(_) => {}
            }
        }
    }

    /// One round trip: writes `frames` (whole commands), reads and drops the replies of the
    /// first `skip` of them, and returns the next. Each read within `limit`; `None` waits
    /// however long (a command that blocks for ever: the caller bounds it by the client's
    /// presence).
    pub async fn call(
        &mut self,
        frames: &[u8],
        shard: &Shard,
        skip: usize,
        limit: Option<Duration>,
    ) -> Result<Reply, BackendError> {
        self.send(frames, shard).await?;
        for _ in 0..skip {
            self.read_within(limit).await?;
        }
        self.read_within(limit).await
    }

    /// [`Dedicated::read`] within `limit`, if any.
    async fn read_within(&mut self, limit: Option<Duration>) -> Result<Reply, BackendError> {
        match limit {
            Some(limit) => crate::deadline::within_for(limit, self.read())
                .await
                .unwrap_or(Err(BackendError::Timeout)),
            None => self.read().await,
        }
    }
}
