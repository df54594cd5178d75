//! Committed damaged logs (`tests/fixtures/*/`, written once by
//! `tests/fixtures/generate.py` from docs/wal-format.md): each is copied to a
//! temporary directory and opened, and must give its documented outcome.

// Helpers outside #[test] functions unwrap too: a panic is how a test fails.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};

use common::TempDir;
use spool_wal::{RecoveryReport, Wal, WalError, WalOptions};

const ALPHA: &[u8] = b"alpha";
const BETA: &[u8] = b"beta";
const GAMMA: &[u8] = b"gamma";
const DELTA: &[u8] = b"delta";
/// Header (32) + alpha frame (8 + 5) + beta frame (8 + 4).
const AFTER_BETA: u64 = 57;
/// Header (32) + alpha frame (8 + 5).
const AFTER_ALPHA: u64 = 45;

fn fixture_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

type Opened = Result<(Vec<Vec<u8>>, RecoveryReport), WalError>;

/// Copies the fixture (recovery repairs files, and takes a lock) and opens it.
fn open_copy(name: &str) -> (TempDir, Opened) {
    let tmp = TempDir::new(name);
    let mut copied = 0;
    for entry in std::fs::read_dir(fixture_dir(name)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), tmp.path().join(entry.file_name())).unwrap();
        copied += 1;
    }
    assert!(copied > 0, "fixture {name} is missing");
    let result = Wal::open(tmp.path(), WalOptions::default())
        .and_then(spool_wal::Recovery::collect_records)
        .map(|(_wal, records, report)| (records, report));
    (tmp, result)
}

fn seg(n: u64) -> String {
    format!("{n:016x}.wal")
}

fn expect_torn(name: &str, records: &[&[u8]], segment: u64, offset: u64, discarded: u64) {
    let (tmp, result) = open_copy(name);
    let (got, report) = result.unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(got, records, "{name}");
    let torn = report
        .torn_tail
        .unwrap_or_else(|| panic!("{name}: no torn tail reported"));
    assert_eq!(
        (torn.segment, torn.offset, torn.discarded_bytes),
        (segment, offset, discarded),
        "{name}"
    );
    assert!(torn.search_complete);
    let path = tmp.path().join(seg(segment));
    assert_eq!(torn.path, path);
    let expected_len = if offset == 0 { 32 } else { offset };
    assert_eq!(
        std::fs::metadata(&path).unwrap().len(),
        expected_len,
        "{name}: file repaired"
    );
    // Repaired for good: a second open reports nothing.
    let (_, records_again, report) = Wal::open(tmp.path(), WalOptions::default())
        .unwrap()
        .collect_records()
        .unwrap();
    assert_eq!(records_again, records, "{name}");
    assert_eq!(report.torn_tail, None, "{name}");
}

fn expect_corrupt(name: &str, segment: u64, offset: u64) {
    let (tmp, result) = open_copy(name);
    match result {
        Err(WalError::Corrupt {
            path, offset: at, ..
        }) => {
            assert_eq!(path, tmp.path().join(seg(segment)), "{name}");
            assert_eq!(at, offset, "{name}");
        }
        Err(other) => panic!("{name}: expected Corrupt, got {other}"),
        Ok(_) => panic!("{name}: expected Corrupt, opened"),
    }
}

fn expect_bad_header(name: &str, segment: u64, reason: &str) {
    let (tmp, result) = open_copy(name);
    match result {
        Err(WalError::BadHeader { path, reason: why }) => {
            assert_eq!(path, tmp.path().join(seg(segment)), "{name}");
            assert!(why.contains(reason), "{name}: {why}");
        }
        Err(other) => panic!("{name}: expected BadHeader, got {other}"),
        Ok(_) => panic!("{name}: expected BadHeader, opened"),
    }
}

#[test]
fn torn_tails_are_cut_and_reported() {
    expect_torn("torn_partial_length", &[ALPHA, BETA], 1, AFTER_BETA, 3);
    expect_torn("torn_partial_record", &[ALPHA, BETA], 1, AFTER_BETA, 11);
    expect_torn("torn_bad_checksum", &[ALPHA, BETA], 1, AFTER_BETA, 13);
    expect_torn("torn_segment_header", &[ALPHA, BETA], 2, 0, 12);
}

#[test]
fn intact_logs_open() {
    for (name, records) in [
        ("header_only_last", &[ALPHA, BETA][..]),
        ("valid_two_segments", &[ALPHA, BETA, GAMMA, DELTA][..]),
        ("zero_filled_tail", &[ALPHA, BETA][..]),
    ] {
        let (_tmp, result) = open_copy(name);
        let (got, report) = result.unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(got, records, "{name}");
        assert_eq!(report.torn_tail, None, "{name}");
    }
}

#[test]
fn damage_that_cannot_be_a_torn_write_is_an_error() {
    expect_corrupt("corrupt_checksum_middle", 1, AFTER_ALPHA);
    expect_corrupt("corrupt_length_middle", 1, AFTER_ALPHA);
    expect_corrupt("corrupt_non_last_segment", 1, AFTER_ALPHA);
    expect_corrupt("truncated_non_last_segment", 1, AFTER_ALPHA);
    expect_corrupt("missing_segment", 3, 0);
    expect_bad_header("bad_magic_first_segment", 1, "magic");
    expect_bad_header("future_version", 1, "version 2");
}
