//! One hostile client: the bytes go through the request parser, the command table and the
//! dispatcher of an in-memory proxy (see `tallyproxy::fuzzing`).
//!
//! Run from the repository root: `RUSTC_BOOTSTRAP=1 cargo fuzz run resp` (see fuzz/README.md).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tallyproxy::fuzzing::run_one(data);
});
