//! What the engine's operations answer the front doors, typed: a refusal, an unavailable
//! owner, a value from memory or from the shard, a value known only as of the last read.
//! Both front doors (RESP, HTTP) call the same operations and only format these: a RESP
//! line in the client's protocol, an HTTP status and JSON body. Redis's wording of each
//! refusal lives here, once.
//!
//! Owns the vocabulary. Does not own formatting (the front doors) or the decisions (the
//! engine's other files).

use super::lane::{KeyValue, LaneError};
use super::{Engine, Incr};
use bytes::Bytes;

pub const NOT_INTEGER: &str = "ERR value is not an integer or out of range";
pub const OVERFLOW: &str = "ERR increment or decrement would overflow";
pub const LOG_FAILED: &str =
    "ERR the write-ahead log failed; increments are refused until it can be written again";
pub const BUFFER_FULL: &str = "TRYAGAIN the pending buffer is full while a shard is down";
pub const WRONGTYPE: &str = "WRONGTYPE Operation against a key holding the wrong kind of value";

/// Why an increment was refused; nothing was buffered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The key holds a string that is not an integer.
    NotInteger,
    /// The key holds another type.
    WrongType,
    /// The result would not fit in 64 bits.
    Overflow,
    /// Blind increments (owner down) past `max_pending_keys`.
    BufferFull,
    /// The write-ahead log cannot be written.
    LogFailed,
}

impl Refusal {
    /// The client's error line, in Redis's words where Redis has them.
    pub fn message(self) -> &'static str {
        match self {
            Refusal::NotInteger => NOT_INTEGER,
            Refusal::WrongType => WRONGTYPE,
            Refusal::Overflow => OVERFLOW,
            Refusal::BufferFull => BUFFER_FULL,
            Refusal::LogFailed => LOG_FAILED,
        }
    }

    /// The proxy's condition, not the key's: the same request may succeed later or
    /// elsewhere (HTTP answers 503 for these, 409 for the others).
    pub fn is_transient(self) -> bool {
        matches!(self, Refusal::BufferFull | Refusal::LogFailed)
    }
}

/// Why an increment that needed its base has no value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IncrError {
    /// The owner cannot be read and no base is known: nothing was buffered. The client's
    /// error line (`TRYAGAIN ...`).
    Unavailable(String),
    Refused(Refusal),
}

impl IncrError {
    pub fn message(&self) -> &str {
        match self {
            IncrError::Unavailable(m) => m,
            IncrError::Refused(r) => r.message(),
        }
    }
}

/// An increment counted: its value, and whether the shard was read for it (else it was
/// answered from memory); or accepted blind (owner down, no base known: logged, the total
/// unknown until the shard returns).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counted {
    Value { value: i64, from_shard: bool },
    Accepted,
}

/// A counter read that could not be answered from a fresh cache entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CounterRead {
    /// What the shard holds plus what is pending (None: no such key); the shard was read.
    Read(Option<i64>),
    /// The owner could not be read: the last known value, and whether it is older than the
    /// cache TTL.
    LastKnown(Option<i64>, bool),
    /// The key holds a string that is not an integer: the shard's reply, as it came.
    NotInteger(Bytes),
    /// The shard's error for this key (e.g. WRONGTYPE), in its words.
    Error(String),
}

impl Engine {
    /// INCRBY for a key whose base must be read first: one shared round trip through the
    /// key's lane. When the owner is down (or does not answer), a known base is used however
    /// old; with none, nothing is buffered. Returns the value and whether the shard was read.
    pub async fn incr_with_base(&self, key: &Bytes, delta: i64) -> Result<(i64, bool), IncrError> {
        for _ in 0..3 {
            let read = if self.owner_up(key) {
                self.refresh(key, false).await.err()
            } else {
                Some(LaneError::Unavailable)
            };
            if let Some(e) = read {
                return match self.try_incr_stale(key, delta) {
                    Incr::Value(v) => Ok((v, false)),
                    Incr::Refused(r) => Err(IncrError::Refused(r)),
                    Incr::NeedBase | Incr::Pending => Err(IncrError::Unavailable(
                        e.client_message(&self.owner_name(key)),
                    )),
                };
            }
            match self.try_incr(key, delta) {
                Incr::Value(v) => return Ok((v, true)),
                Incr::Refused(r) => return Err(IncrError::Refused(r)),
                Incr::NeedBase | Incr::Pending => continue,
            }
        }
        Err(IncrError::Unavailable(
            "TRYAGAIN counter base is changing, try again".into(),
        ))
    }

    /// An increment that must not be lost to an outage (a visit): from memory, else after
    /// reading the base, else, with the owner down and no base known, accepted blind.
    pub async fn incr_or_accept(&self, key: &Bytes, delta: i64) -> Result<Counted, IncrError> {
        let counted = match self.try_incr(key, delta) {
            Incr::Value(value) => Ok((value, false)),
            Incr::Refused(r) => Err(IncrError::Refused(r)),
            Incr::NeedBase | Incr::Pending => self.incr_with_base(key, delta).await,
        };
        match counted {
            Ok((value, from_shard)) => Ok(Counted::Value { value, from_shard }),
            Err(IncrError::Unavailable(m)) => match self.incr_blind(key, delta) {
                Incr::Value(value) => Ok(Counted::Value {
                    value,
                    from_shard: false,
                }),
                Incr::Pending => Ok(Counted::Accepted),
                Incr::Refused(r) => Err(IncrError::Refused(r)),
                Incr::NeedBase => Err(IncrError::Unavailable(m)),
            },
            Err(e) => Err(e),
        }
    }

    /// A counter read through the key's lane (landing its pending delta on the way when the
    /// log can record it); with the owner down or silent, the last known value however old.
    pub async fn read_counter(&self, key: &Bytes) -> Result<CounterRead, LaneError> {
        let read = if self.owner_up(key) {
            self.refresh(key, self.read_lands(key)).await
        } else {
            Err(LaneError::Unavailable)
        };
        match read {
            Err(e) => match self.last_known(key) {
                Some((v, stale)) => Ok(CounterRead::LastKnown(v, stale)),
                None => Err(e),
            },
            Ok(KeyValue::Other(raw)) => Ok(CounterRead::NotInteger(raw)),
            Ok(KeyValue::Error(m)) => Ok(CounterRead::Error(m)),
            Ok(KeyValue::Int(_) | KeyValue::Nil) => match self.value_of(key) {
                Some(v) => Ok(CounterRead::Read(v)),
                None => Ok(CounterRead::Read(None)),
            },
        }
    }
}
