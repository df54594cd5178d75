//! `RequestDecoder` on arbitrary bytes, fed in one piece and in chunks the
//! input chooses. The checks live in one file shared with the stable-Rust
//! smoke test `crates/spool-proto/tests/decoder_fuzz_smoke.rs`.

#![no_main]

use libfuzzer_sys::fuzz_target;

// Each target uses only half of the shared checks.
#[allow(dead_code)]
#[path = "../../crates/spool-proto/tests/common/decoder_check.rs"]
mod decoder_check;

fuzz_target!(|data: &[u8]| {
    decoder_check::check_request_decoder(data);
});
