//! Missing data is detected, not replayed as a shorter log: a deleted newest
//! or oldest segment file, every segment gone, the newest segment cut exactly
//! at a record boundary, the manifest itself gone. Each is an error naming
//! what is missing, unless `accept_data_loss` is set; segments deleted by
//! compaction are never mistaken for lost ones, even after a crash part-way.

// Helpers outside #[test] functions unwrap too: a panic is how a test fails.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::{open_sim, parse_segment, record_offsets, sim_dir, TempDir};
use spool_wal::sim::{Fault, SimStorage};
use spool_wal::{Recovery, RecoveryReport, Wal, WalError, WalOptions};

type Opened = (Wal, Vec<Vec<u8>>, RecoveryReport);

fn open(dir: &Path, options: WalOptions) -> Result<Opened, WalError> {
    Wal::open(dir, options).and_then(Recovery::collect_records)
}

fn seg(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("{n:016x}.wal"))
}

fn rec(i: usize) -> Vec<u8> {
    format!("job {i}").into_bytes()
}

/// A closed log of three segments holding records 0-1, 2-3 and 4-5.
fn three_segments(dir: &Path) -> Vec<Vec<u8>> {
    let (mut wal, _, _) = open(dir, WalOptions::default()).unwrap();
    for i in 0..6 {
        wal.append(&rec(i)).unwrap();
        if i % 2 == 1 && i < 5 {
            wal.rotate().unwrap();
        }
    }
    wal.close().unwrap();
    (0..6).map(rec).collect()
}

#[track_caller]
fn expect_missing(result: Result<Opened, WalError>, path: &Path, says: &str) {
    match result {
        Err(WalError::Missing { path: p, detail }) => {
            assert_eq!(p, path, "{detail}");
            assert!(detail.contains(says), "{detail}");
        }
        Err(other) => panic!("expected Missing {}, got {other}", path.display()),
        Ok((_, records, _)) => panic!(
            "expected Missing {}, opened with {} records",
            path.display(),
            records.len()
        ),
    }
}

#[test]
fn a_deleted_newest_segment_is_an_error_naming_it() {
    let tmp = TempDir::new("newest");
    let all = three_segments(tmp.path());
    std::fs::remove_file(seg(tmp.path(), 3)).unwrap();
    expect_missing(
        open(tmp.path(), WalOptions::default()),
        &seg(tmp.path(), 3),
        "missing: the manifest says the log runs to 0000000000000003.wal",
    );
    // Refusing changed nothing: the same error again.
    expect_missing(
        open(tmp.path(), WalOptions::default()),
        &seg(tmp.path(), 3),
        "newest records are lost",
    );

    // Accepted: what is left opens, the loss is reported, and from then on
    // the log is checked against what is there now.
    let (mut wal, records, report) =
        open(tmp.path(), WalOptions::default().accept_data_loss(true)).unwrap();
    assert_eq!(records, all[..4]);
    assert_eq!(report.lost.len(), 1);
    assert_eq!(report.lost[0].path, seg(tmp.path(), 3));
    wal.append(b"after").unwrap();
    wal.rotate().unwrap();
    wal.close().unwrap();
    let (_wal, records, report) = open(tmp.path(), WalOptions::default()).unwrap();
    assert_eq!(records.len(), 5);
    assert!(report.lost.is_empty());
}

#[test]
fn a_deleted_oldest_segment_is_an_error_naming_it() {
    let tmp = TempDir::new("oldest");
    let all = three_segments(tmp.path());
    std::fs::remove_file(seg(tmp.path(), 1)).unwrap();
    expect_missing(
        open(tmp.path(), WalOptions::default()),
        &seg(tmp.path(), 1),
        "missing: the manifest says the log starts at 0000000000000001.wal",
    );
    let (_wal, records, report) =
        open(tmp.path(), WalOptions::default().accept_data_loss(true)).unwrap();
    assert_eq!(records, all[2..]);
    assert_eq!(report.lost[0].path, seg(tmp.path(), 1));
}

#[test]
fn every_segment_deleted_is_an_error_not_a_new_log() {
    let tmp = TempDir::new("all");
    three_segments(tmp.path());
    for n in 1..=3 {
        std::fs::remove_file(seg(tmp.path(), n)).unwrap();
    }
    expect_missing(
        open(tmp.path(), WalOptions::default()),
        &seg(tmp.path(), 1),
        "missing, and so is every segment up to 0000000000000003.wal (3 files)",
    );
    let (_wal, records, report) =
        open(tmp.path(), WalOptions::default().accept_data_loss(true)).unwrap();
    assert!(records.is_empty());
    assert!(report.created);
    assert_eq!(report.lost.len(), 1);
}

#[test]
fn the_newest_segment_cut_at_a_record_boundary_is_an_error() {
    let tmp = TempDir::new("cut");
    let all = three_segments(tmp.path());
    let newest = seg(tmp.path(), 3);
    let bytes = std::fs::read(&newest).unwrap();
    // Its records, then the writer's zero-filled region.
    let end = 32
        + parse_segment(&bytes)
            .iter()
            .map(|r| 8 + r.len())
            .sum::<usize>();
    assert!(bytes[end..].iter().all(|&b| b == 0));
    // The log was closed cleanly: its exact end is recorded. Cut after the
    // first record of the newest segment, and right after its header.
    for keep in [1, 0] {
        let cut = record_offsets(&bytes[..end])[keep];
        std::fs::write(&newest, &bytes[..cut as usize]).unwrap();
        expect_missing(
            open(tmp.path(), WalOptions::default()),
            &newest,
            &format!(
                "the segment's records end at byte {cut}, but it held at least {end} bytes of durable \
                 records when the log was last closed (cleanly)"
            ),
        );
        std::fs::write(&newest, &bytes).unwrap();
    }
    let (_wal, records, _) = open(tmp.path(), WalOptions::default()).unwrap();
    assert_eq!(records, all);
}

#[test]
fn after_a_crash_a_cut_below_the_recorded_end_is_detected_and_one_after_it_is_not() {
    // A log opened (which records the newest segment's length), written
    // to, then crashed: no clean close.
    let sim = SimStorage::new();
    let (mut wal, _, _) = open_sim(&sim, WalOptions::default().zero_fill_ahead_bytes(0)).unwrap();
    for i in 0..3 {
        wal.append(&rec(i)).unwrap();
    }
    wal.commit().unwrap();
    drop(wal); // closes cleanly: the end is exact
    let (mut wal, _, _) = open_sim(&sim, WalOptions::default().zero_fill_ahead_bytes(0)).unwrap();
    wal.append(&rec(3)).unwrap();
    wal.commit().unwrap();
    let image = sim.crash_image(1); // everything committed survives
    drop(wal);
    let path = sim_dir().join("0000000000000001.wal");
    let bytes = image.read_file(&path).unwrap();
    let offsets = record_offsets(&bytes);
    assert_eq!(offsets.len(), 4);
    // Cut inside what the last open recorded: detected.
    let cut_below = image.crash_image(0);
    cut_below.put_file(&path, &bytes[..offsets[2] as usize]);
    match open_sim(&cut_below, WalOptions::default()) {
        Err(WalError::Missing { path: p, detail }) => {
            assert_eq!(p, path);
            assert!(
                detail.contains("(at the last start or rotation)"),
                "{detail}"
            );
        }
        other => panic!("expected Missing, got {:?}", other.map(|o| o.1)),
    }
    // Cut after it (the record written since the last open): a crash can
    // leave exactly that, so it cannot be told from one; documented.
    let cut_above = image.crash_image(0);
    cut_above.put_file(&path, &bytes[..offsets[3] as usize]);
    let (_wal, records, report) = open_sim(&cut_above, WalOptions::default()).unwrap();
    assert_eq!(records.len(), 3);
    assert_eq!(report.previous_close_clean, Some(false));
}

#[test]
fn a_deleted_manifest_is_an_error() {
    let tmp = TempDir::new("manifest");
    let all = three_segments(tmp.path());
    let manifest = tmp.path().join("MANIFEST");
    std::fs::remove_file(&manifest).unwrap();
    expect_missing(
        open(tmp.path(), WalOptions::default()),
        &manifest,
        "the manifest is missing",
    );
    // And with it the newest segment: still an error (the manifest's).
    std::fs::remove_file(seg(tmp.path(), 3)).unwrap();
    expect_missing(
        open(tmp.path(), WalOptions::default()),
        &manifest,
        "a missing oldest or newest segment could not be detected",
    );
    let (_wal, records, report) =
        open(tmp.path(), WalOptions::default().accept_data_loss(true)).unwrap();
    assert_eq!(records, all[..4]);
    assert_eq!(report.lost[0].path, manifest);
    assert!(manifest.exists());
}

/// What compaction does: rotate, write the live state, commit, then remove
/// the segments before the cut.
fn compact(wal: &mut Wal, live: &[Vec<u8>]) -> u64 {
    let cut = wal.rotate().unwrap();
    for r in live {
        wal.append(r).unwrap();
    }
    wal.commit().unwrap();
    wal.remove_segments_before(cut).unwrap();
    cut
}

#[test]
fn segments_deleted_by_compaction_are_no_false_alarm() {
    let tmp = TempDir::new("compaction");
    three_segments(tmp.path());
    let (mut wal, records, _) = open(tmp.path(), WalOptions::default()).unwrap();
    let cut = compact(&mut wal, &records[4..]);
    assert_eq!(wal.segments()[0].seq, cut);
    wal.append(b"after").unwrap();
    wal.close().unwrap();
    for n in 1..cut {
        assert!(!seg(tmp.path(), n).exists());
    }
    let (_wal, records, report) = open(tmp.path(), WalOptions::default()).unwrap();
    assert_eq!(records, [rec(4), rec(5), b"after".to_vec()]);
    assert!(report.lost.is_empty());
    assert_eq!(report.first_segment, Some(cut));
}

#[test]
fn a_crash_during_compaction_is_no_false_alarm() {
    // A power cut at every storage operation of the removal: whatever
    // survives opens, with the snapshot, and without the old history once
    // the new start was recorded.
    let mut outcomes = std::collections::BTreeSet::new();
    for nth in 0..12 {
        let sim = SimStorage::new();
        let (mut wal, _, _) = open_sim(&sim, WalOptions::default()).unwrap();
        for i in 0..4 {
            wal.append(&rec(i)).unwrap();
            wal.rotate().unwrap();
        }
        let cut = wal.rotate().unwrap();
        wal.append(b"snapshot").unwrap();
        wal.commit().unwrap();
        sim.inject(Fault::PowerCut { nth });
        let removed = wal.remove_segments_before(cut);
        drop(wal);
        for seed in 0..8 {
            let image = sim.crash_image(seed);
            let (_wal, records, report) = open_sim(&image, WalOptions::default())
                .unwrap_or_else(|e| panic!("power cut at {nth}, seed {seed}: {e}"));
            assert!(report.lost.is_empty());
            assert_eq!(records.last().unwrap(), b"snapshot");
            assert!(
                records.len() == 1 || records.len() == 5,
                "power cut at {nth}: {records:?}"
            );
            outcomes.insert((records.len(), report.compaction_leftovers_removed > 0));
            if removed.is_ok() {
                assert_eq!(records.len(), 1);
            }
        }
    }
    // Both sides of the recorded cut were exercised, and leftovers removed.
    assert!(outcomes.contains(&(5, false)), "{outcomes:?}");
    assert!(outcomes.contains(&(1, true)), "{outcomes:?}");
}

#[test]
fn a_crash_while_a_segment_is_created_or_recorded_is_no_false_alarm() {
    for nth in 0..10 {
        let sim = SimStorage::new();
        let (mut wal, _, _) = open_sim(&sim, WalOptions::default()).unwrap();
        wal.append(b"one").unwrap();
        wal.commit().unwrap();
        sim.inject(Fault::PowerCut { nth });
        let _ = wal.rotate();
        drop(wal);
        for seed in 0..8 {
            let image = sim.crash_image(seed);
            let (_wal, records, _) = open_sim(&image, WalOptions::default())
                .unwrap_or_else(|e| panic!("power cut at {nth}, seed {seed}: {e}"));
            assert_eq!(records, [b"one".to_vec()]);
        }
    }
}

#[test]
fn a_crash_while_a_new_log_is_created_is_no_false_alarm() {
    for nth in 0..12 {
        let sim = SimStorage::new();
        sim.inject(Fault::PowerCut { nth });
        let _ = Wal::open_with_storage(Arc::new(sim.clone()), sim_dir(), WalOptions::default())
            .and_then(Recovery::collect_records);
        for seed in 0..8 {
            let image = sim.crash_image(seed);
            open_sim(&image, WalOptions::default())
                .unwrap_or_else(|e| panic!("power cut at {nth}, seed {seed}: {e}"));
        }
    }
}

#[test]
fn a_torn_tail_report_makes_no_false_promise() {
    // A log as a release before the manifest wrote it, whose last record
    // was cut short: it may have been acknowledged (fsync=never or interval
    // acknowledge before the fsync), and the report must not say otherwise.
    let sim = SimStorage::new();
    let mut bytes = spool_wal::format::encode_segment_header_with_version(1, 1, 0).to_vec();
    spool_wal::format::encode_record(&mut bytes, b"acknowledged under fsync=never");
    let path = sim_dir().join("0000000000000001.wal");
    sim.put_file(&path, &bytes[..bytes.len() - 3]);
    let (_wal, records, report) = open_sim(&sim, WalOptions::default()).unwrap();
    assert!(records.is_empty());
    assert!(report.lost.is_empty());
    let message = report.torn_tail.unwrap().to_string();
    assert!(
        !message.contains("no acknowledged write can be"),
        "{message}"
    );
    assert!(
        message.contains("under fsync=interval or never acknowledged writes may be among them"),
        "{message}"
    );
    assert!(message.contains("at byte offset 32"), "{message}");
}

#[test]
fn a_manifest_older_than_the_segments_is_an_error() {
    // A MANIFEST restored from an older copy of the directory: it cannot
    // vouch for the segments, so a start would check nothing.
    let tmp = TempDir::new("stale");
    three_segments(tmp.path());
    let manifest = tmp.path().join("MANIFEST");
    let old = std::fs::read(&manifest).unwrap();
    let (mut wal, _, _) = open(tmp.path(), WalOptions::default()).unwrap();
    wal.rotate().unwrap();
    wal.rotate().unwrap();
    wal.close().unwrap();
    std::fs::write(&manifest, old).unwrap();
    expect_missing(
        open(tmp.path(), WalOptions::default()),
        &manifest,
        "the manifest says 0000000000000003.wal is the newest segment, but segments up to \
         0000000000000005.wal exist",
    );
    let (_wal, records, _) =
        open(tmp.path(), WalOptions::default().accept_data_loss(true)).unwrap();
    assert_eq!(records.len(), 6);
}
