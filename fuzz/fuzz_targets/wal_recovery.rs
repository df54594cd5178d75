//! WAL recovery on arbitrary bytes written as the last segment file (with or
//! without a valid header, after a valid complete segment or alone): opening
//! must return `Ok` or a `WalError`, never panic, and a recovered log must be
//! cut exactly at its last whole record and reopen cleanly. The checks live in
//! one file shared with the stable-Rust proptest
//! `crates/spool-wal/tests/recovery_fuzz.rs`.

#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../crates/spool-wal/tests/common/recovery_check.rs"]
mod recovery_check;

fuzz_target!(|data: &[u8]| {
    recovery_check::check_recovery(data);
});
