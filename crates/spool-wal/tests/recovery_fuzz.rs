//! The WAL recovery fuzz target's check (`fuzz/fuzz_targets/wal_recovery.rs`)
//! on stable Rust, over proptest inputs, so every `cargo test` runs it.
//!
//! Uniformly random bytes are almost never a valid record, so the segment
//! bytes are built from fragments: valid frames, frames with a damaged
//! length, checksum or payload, bare length fields, zeros and raw bytes. The
//! input layout is described in `common/recovery_check.rs`.

// Helpers outside #[test] functions unwrap too: a panic is how a test fails.
#![allow(clippy::unwrap_used)]

#[path = "common/recovery_check.rs"]
mod recovery_check;

use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use spool_wal::format::encode_record;

fn fragment() -> impl Strategy<Value = Vec<u8>> {
    let payload = || proptest::collection::vec(any::<u8>(), 0..40);
    prop_oneof![
        6 => payload().prop_map(|p| {
            let mut out = Vec::new();
            encode_record(&mut out, &p);
            out
        }),
        1 => (payload(), any::<usize>(), 1u8..=255).prop_map(|(p, at, mask)| {
            let mut out = Vec::new();
            encode_record(&mut out, &p);
            let i = at % out.len();
            out[i] ^= mask;
            out
        }),
        1 => (payload(), 1usize..8).prop_map(|(p, cut)| {
            let mut out = Vec::new();
            encode_record(&mut out, &p);
            out.truncate(out.len().saturating_sub(cut));
            out
        }),
        1 => any::<u32>().prop_map(|n| n.to_le_bytes().to_vec()),
        1 => (0usize..64).prop_map(|n| vec![0; n]),
        1 => proptest::collection::vec(any::<u8>(), 0..24),
    ]
}

fn input() -> impl Strategy<Value = Vec<u8>> {
    // Mostly with a valid header (mode bit 0): raw bytes rarely make one.
    let mode = prop_oneof![4 => any::<u8>().prop_map(|m| m | 1), 1 => any::<u8>()];
    (mode, proptest::collection::vec(fragment(), 0..12)).prop_map(|(mode, fragments)| {
        let mut data = vec![mode];
        data.extend(fragments.concat());
        data
    })
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 500,
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
            "proptest-regressions",
        ))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn recovery_never_panics_and_repairs_cleanly(data in input()) {
        recovery_check::check_recovery(&data);
    }

    #[test]
    fn recovery_of_raw_bytes_never_panics(data in proptest::collection::vec(any::<u8>(), 0..300)) {
        recovery_check::check_recovery(&data);
    }
}
