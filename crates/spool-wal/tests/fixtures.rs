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
    expect_bad_header("future_version_3", 1, "version 3");
}

/// Opening fails with `Missing` naming `file` (a segment number, or the
/// manifest), and the detail says `says`; with `accept_data_loss` the log
/// opens with `records`, reports the loss, and the next open is clean.
fn expect_missing(name: &str, file: Option<u64>, says: &str, records: &[&[u8]]) {
    let (tmp, result) = open_copy(name);
    let expected_path = match file {
        Some(n) => tmp.path().join(seg(n)),
        None => tmp.path().join("MANIFEST"),
    };
    match result {
        Err(WalError::Missing { path, detail }) => {
            assert_eq!(path, expected_path, "{name}: {detail}");
            assert!(detail.contains(says), "{name}: {detail}");
        }
        Err(other) => panic!("{name}: expected Missing, got {other}"),
        Ok(_) => panic!("{name}: expected Missing, opened"),
    }
    let accept = WalOptions::default().accept_data_loss(true);
    let (_wal, got, report) = Wal::open(tmp.path(), accept)
        .unwrap()
        .collect_records()
        .unwrap_or_else(|e| panic!("{name}, accepting the loss: {e}"));
    assert_eq!(got, records, "{name}");
    assert_eq!(report.lost.len(), 1, "{name}: {:?}", report.lost);
    assert_eq!(report.lost[0].path, expected_path, "{name}");
    drop(_wal);
    let (_wal, again, report) = Wal::open(tmp.path(), WalOptions::default())
        .unwrap()
        .collect_records()
        .unwrap_or_else(|e| panic!("{name}, after accepting the loss: {e}"));
    assert_eq!(again, records, "{name}");
    assert!(report.lost.is_empty(), "{name}");
}

#[test]
fn missing_data_is_named_and_can_be_accepted() {
    expect_missing(
        "manifest_missing_newest",
        Some(3),
        "missing: the manifest says the log runs to 0000000000000003.wal",
        &[ALPHA, BETA, GAMMA, DELTA],
    );
    expect_missing(
        "manifest_missing_oldest",
        Some(1),
        "missing: the manifest says the log starts at 0000000000000001.wal",
        &[GAMMA, DELTA],
    );
    expect_missing(
        "manifest_missing_all",
        Some(1),
        "missing, and so is every segment up to 0000000000000002.wal (2 files)",
        &[],
    );
    expect_missing(
        "manifest_cut_at_record_boundary",
        Some(1),
        "records end at byte 45, but it held at least 57 bytes",
        &[ALPHA],
    );
    expect_missing(
        "manifest_file_missing",
        None,
        "the manifest is missing",
        &[ALPHA, BETA, GAMMA, DELTA],
    );
    // The segment of format version 2 holds a record, so its MANIFEST
    // cannot be one a crash kept from being written.
    expect_missing("future_version", None, "the manifest is missing", &[ALPHA]);
}

#[test]
fn manifest_fixtures_that_open() {
    let (_tmp, result) = open_copy("manifest_valid");
    let (got, report) = result.unwrap();
    assert_eq!(got, [ALPHA, BETA, GAMMA, DELTA]);
    assert_eq!(report.previous_close_clean, Some(true));
    assert!(!report.upgraded);

    // The newer slot is torn: the older one is used, and still true.
    let (_tmp, result) = open_copy("manifest_torn_slot");
    let (got, report) = result.unwrap();
    assert_eq!(got, [ALPHA, BETA, GAMMA, DELTA]);
    assert_eq!(report.previous_close_clean, Some(false));

    // Compaction recorded segment 2 as the start, then a crash kept
    // segment 1: it is not replayed, and it is deleted.
    let (tmp, result) = open_copy("manifest_compaction_leftover");
    let (got, report) = result.unwrap();
    assert_eq!(got, [GAMMA, DELTA]);
    assert_eq!(report.compaction_leftovers_removed, 1);
    assert!(!tmp.path().join(seg(1)).exists());
}

#[test]
fn manifest_of_a_newer_format_is_refused() {
    expect_bad_header_of(
        "manifest_future_version",
        "MANIFEST",
        "manifest format version 2",
    );
}

fn expect_bad_header_of(name: &str, file: &str, reason: &str) {
    let (tmp, result) = open_copy(name);
    match result {
        Err(WalError::BadHeader { path, reason: why }) => {
            assert_eq!(path, tmp.path().join(file), "{name}");
            assert!(why.contains(reason), "{name}: {why}");
        }
        Err(other) => panic!("{name}: expected BadHeader, got {other}"),
        Ok(_) => panic!("{name}: expected BadHeader, opened"),
    }
}

/// A data directory of today's format (version 1, no manifest: spool
/// 0.1.0) opens in place with every record, and from then on is checked.
#[test]
fn format_1_log_is_upgraded_in_place() {
    let (tmp, result) = open_copy("valid_two_segments");
    let (got, report) = result.unwrap();
    assert_eq!(got, [ALPHA, BETA, GAMMA, DELTA]);
    assert!(report.upgraded);
    assert_eq!(report.previous_close_clean, None);
    // New records go to a new segment of the current version.
    assert_eq!(report.last_segment, Some(3));
    let header = std::fs::read(tmp.path().join(seg(3))).unwrap();
    assert_eq!(
        header[8..12],
        spool_wal::format::FORMAT_VERSION.to_le_bytes()
    );
    // The old segments are untouched (segment 2 lost its zero tail, if any).
    assert_eq!(
        std::fs::read(tmp.path().join(seg(1))).unwrap(),
        std::fs::read(fixture_dir("valid_two_segments").join(seg(1))).unwrap()
    );
    let (mut wal, _, report) = Wal::open(tmp.path(), WalOptions::default())
        .unwrap()
        .collect_records()
        .unwrap();
    assert!(!report.upgraded);
    wal.append(b"epsilon").unwrap();
    wal.close().unwrap();
    let (_wal, got, report) = Wal::open(tmp.path(), WalOptions::default())
        .unwrap()
        .collect_records()
        .unwrap();
    assert_eq!(got, [ALPHA, BETA, GAMMA, DELTA, b"epsilon"]);
    assert_eq!(report.previous_close_clean, Some(true));
    drop(_wal);
    // Segments of format 1 are covered by the manifest too.
    std::fs::remove_file(tmp.path().join(seg(1))).unwrap();
    let err = Wal::open(tmp.path(), WalOptions::default())
        .and_then(spool_wal::Recovery::collect_records)
        .unwrap_err();
    assert!(
        matches!(&err, WalError::Missing { path, .. } if *path == tmp.path().join(seg(1))),
        "{err}"
    );
}
