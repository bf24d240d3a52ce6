//! The wire: client request framing (with its size guard), the budget on buffered client
//! input, and reply encoding.
//!
//! Owns bytes in and bytes out. Does not own what a command means (`command`) or where it
//! goes (`router`).

pub mod budget;
pub mod parse;
pub mod reply;
pub mod short;

pub use parse::{parse_request, Limits, ProtocolError, RequestParser};
