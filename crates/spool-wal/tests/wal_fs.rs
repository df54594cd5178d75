//! The log on the real file system: round trips, rotation, segment removal,
//! the directory lock, corruption reported with file and offset, and a
//! by-hand recovery speed check.

// Helpers outside #[test] functions unwrap too: a panic is how a test fails.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Instant;

use common::{record_offsets, TempDir};
use spool_wal::{Wal, WalError, WalOptions, RECORD_MAX_BYTES};

fn open(
    dir: &std::path::Path,
    options: WalOptions,
) -> (Wal, Vec<Vec<u8>>, spool_wal::RecoveryReport) {
    Wal::open(dir, options).unwrap().collect_records().unwrap()
}

fn payload(i: usize) -> Vec<u8> {
    format!("record {i} {}", "x".repeat(i % 37)).into_bytes()
}

#[test]
fn fresh_directory_creates_a_log_and_round_trips() {
    let tmp = TempDir::new("fresh");
    let dir = tmp.path().join("nested/data");
    let (mut wal, records, report) = open(&dir, WalOptions::default());
    assert!(records.is_empty());
    assert!(report.created);
    assert_eq!(report.torn_tail, None);
    assert_eq!(wal.segments().len(), 1);
    assert_eq!(wal.segments()[0].seq, 1);
    assert!(dir.join("0000000000000001.wal").exists());
    assert!(dir.join("LOCK").exists());

    for i in 0..100 {
        wal.append(&payload(i)).unwrap();
    }
    wal.append(b"").unwrap(); // an empty record is a record
    let commit = wal.commit().unwrap();
    assert_eq!(commit.records, 101);
    let stats = wal.stats();
    assert_eq!(stats.records_written, 101);
    assert_eq!(stats.write_calls, 1);
    assert_eq!(stats.fsyncs, 1);
    assert_eq!(stats.bytes_written, commit.bytes);
    // The records went into a zero-filled region written ahead of them.
    assert_eq!(stats.zero_fills, 1);
    let logical = wal.segments()[0].len;
    assert_eq!(logical, 32 + commit.bytes);
    let on_disk = std::fs::metadata(dir.join("0000000000000001.wal"))
        .unwrap()
        .len();
    assert_eq!(on_disk, logical + spool_wal::ZERO_FILL_AHEAD_BYTES);
    assert_eq!(wal.file_len(), on_disk);
    wal.close().unwrap();

    let (_wal, records, report) = open(&dir, WalOptions::default());
    let mut expected: Vec<Vec<u8>> = (0..100).map(payload).collect();
    expected.push(Vec::new());
    assert_eq!(records, expected);
    assert!(!report.created);
    assert_eq!(report.records, 101);
    assert_eq!(report.segments, 1);
    assert_eq!(report.torn_tail, None);
}

#[test]
fn write_without_sync_is_visible_and_sync_without_write_is_free() {
    let tmp = TempDir::new("write");
    let (mut wal, _, _) = open(tmp.path(), WalOptions::default());
    assert_eq!(wal.sync().unwrap(), std::time::Duration::ZERO);
    assert_eq!(wal.stats().fsyncs, 0);
    wal.append(b"a").unwrap();
    assert_eq!(wal.stats().pending_records, 1);
    wal.write().unwrap();
    assert_eq!(wal.stats().pending_records, 0);
    assert_eq!(wal.stats().fsyncs, 0);
    drop(wal); // written, not synced: still in the OS's cache
    let (_wal, records, _) = open(tmp.path(), WalOptions::default());
    assert_eq!(records, vec![b"a".to_vec()]);
}

#[test]
fn appended_but_unwritten_records_are_lost_on_drop() {
    let tmp = TempDir::new("drop");
    let (mut wal, _, _) = open(tmp.path(), WalOptions::default());
    wal.append(b"kept").unwrap();
    wal.commit().unwrap();
    wal.append(b"lost").unwrap();
    drop(wal);
    let (_wal, records, _) = open(tmp.path(), WalOptions::default());
    assert_eq!(records, vec![b"kept".to_vec()]);
}

#[test]
fn second_open_of_the_same_directory_is_locked() {
    let tmp = TempDir::new("lock");
    let recovery = Wal::open(tmp.path(), WalOptions::default()).unwrap();
    // Locked from the moment of opening, through recovery ...
    match Wal::open(tmp.path(), WalOptions::default()) {
        Err(WalError::Locked(path)) => assert_eq!(path, tmp.path().join("LOCK")),
        other => panic!("expected Locked, got {other:?}"),
    }
    let (wal, _) = recovery.finish().unwrap();
    // ... and for the life of the writer.
    let err = Wal::open(tmp.path(), WalOptions::default()).unwrap_err();
    assert!(matches!(err, WalError::Locked(_)), "{err}");
    assert!(err.to_string().contains("LOCK"), "{err}");
    drop(wal);
    // Released on drop.
    let (_wal, _, _) = open(tmp.path(), WalOptions::default());
}

#[test]
fn automatic_rotation_keeps_segments_small_and_survives_reopen() {
    let tmp = TempDir::new("rotate");
    let options = WalOptions::default().segment_max_bytes(256);
    let (mut wal, _, _) = open(tmp.path(), options.clone());
    let mut expected = Vec::new();
    for i in 0..60 {
        let p = payload(i);
        wal.append(&p).unwrap();
        expected.push(p);
        if i % 7 == 0 {
            wal.commit().unwrap();
        }
    }
    // One record bigger than a segment gets a segment of its own.
    let big = vec![7u8; 1000];
    wal.append(&big).unwrap();
    expected.push(big);
    wal.append(b"after big").unwrap();
    expected.push(b"after big".to_vec());
    wal.commit().unwrap();

    let segments = wal.segments().to_vec();
    assert!(segments.len() > 5, "{segments:?}");
    for pair in segments.windows(2) {
        assert_eq!(pair[1].seq, pair[0].seq + 1);
    }
    for (i, s) in segments.iter().enumerate() {
        let on_disk = std::fs::metadata(&s.path).unwrap().len();
        if i + 1 < segments.len() {
            // Rotation cut the zero-filled region off.
            assert_eq!(on_disk, s.len, "{s:?}");
        } else {
            // The last one is zero-filled, but never past the segment size.
            assert!(on_disk >= s.len && on_disk <= 256, "{s:?}: {on_disk}");
        }
        assert!(s.len <= 256 || s.len == 32 + 8 + 1000, "{s:?}");
    }
    assert_eq!(wal.stats().segments, segments.len());
    drop(wal);

    let (wal, records, report) = open(tmp.path(), options);
    assert_eq!(records, expected);
    assert_eq!(report.segments, segments.len());
    assert_eq!(wal.segments(), &segments[..]);
}

#[test]
fn rotate_then_remove_older_segments_survives_reopen() {
    let tmp = TempDir::new("compact");
    let (mut wal, _, _) = open(tmp.path(), WalOptions::default());
    for i in 0..10 {
        wal.append(&payload(i)).unwrap();
    }
    wal.commit().unwrap();
    let old = wal.segments().to_vec();

    // Compaction as the engine would do it: a snapshot in a fresh segment.
    let snapshot_seq = wal.rotate().unwrap();
    assert_eq!(snapshot_seq, old.last().unwrap().seq + 1);
    wal.append(b"snapshot: live state").unwrap();
    wal.append(b"after snapshot").unwrap(); // not yet committed: remove commits it
    assert_eq!(wal.remove_segments_before(snapshot_seq).unwrap(), old.len());
    for s in &old {
        assert!(!s.path.exists(), "{s:?}");
    }
    assert_eq!(wal.segments().len(), 1);
    assert_eq!(wal.segments()[0].seq, snapshot_seq);
    // Never removes the current segment, and removing again is a no-op.
    assert_eq!(wal.remove_segments_before(u64::MAX).unwrap(), 0);
    drop(wal);

    let (wal, records, report) = open(tmp.path(), WalOptions::default());
    assert_eq!(
        records,
        vec![b"snapshot: live state".to_vec(), b"after snapshot".to_vec()]
    );
    assert_eq!(report.first_segment, Some(snapshot_seq));
    assert_eq!(wal.segments()[0].seq, snapshot_seq);
}

#[test]
fn oversized_record_is_refused_without_poisoning() {
    let tmp = TempDir::new("big");
    let (mut wal, _, _) = open(tmp.path(), WalOptions::default());
    // Zeroed allocation: the pages are never touched, since the length is
    // checked first.
    let too_big = vec![0u8; RECORD_MAX_BYTES + 1];
    let err = wal.append(&too_big).unwrap_err();
    assert!(
        matches!(err, WalError::RecordTooLarge { len, max } if len == RECORD_MAX_BYTES + 1 && max == RECORD_MAX_BYTES)
    );
    drop(too_big);
    wal.append(b"fine").unwrap();
    wal.commit().unwrap();
    assert!(!wal.is_poisoned());
}

#[test]
fn record_limit_has_room_for_the_largest_job() {
    let largest_body = spool_proto::limits::MAX_JOB_SIZE_LIMIT_BYTES as usize;
    assert!(RECORD_MAX_BYTES >= largest_body + (64 << 10));
}

#[test]
fn corruption_in_the_middle_names_file_and_offset() {
    let tmp = TempDir::new("corrupt");
    let (mut wal, _, _) = open(tmp.path(), WalOptions::default());
    for i in 0..5 {
        wal.append(&payload(i)).unwrap();
    }
    wal.commit().unwrap();
    let path = wal.segments()[0].path.clone();
    drop(wal);

    let mut bytes = std::fs::read(&path).unwrap();
    let offsets = record_offsets(&bytes);
    let third = offsets[2] as usize;
    bytes[third + 10] ^= 0x40; // a payload byte of the third record
    std::fs::write(&path, &bytes).unwrap();

    let err = Wal::open(tmp.path(), WalOptions::default())
        .unwrap()
        .collect_records()
        .unwrap_err();
    match &err {
        WalError::Corrupt {
            path: p, offset, ..
        } => {
            assert_eq!(p, &path);
            assert_eq!(*offset, offsets[2]);
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains("0000000000000001.wal") && msg.contains(&offsets[2].to_string()),
        "{msg}"
    );
}

#[test]
fn torn_tail_on_disk_is_cut_and_reported() {
    let tmp = TempDir::new("torn");
    let (mut wal, _, _) = open(tmp.path(), WalOptions::default());
    for i in 0..3 {
        wal.append(&payload(i)).unwrap();
    }
    wal.commit().unwrap();
    let path = wal.segments()[0].path.clone();
    let good_len = wal.segments()[0].len;
    drop(wal);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.truncate(good_len as usize); // without the zero-filled region
    bytes.extend_from_slice(&[9, 0, 0, 0, 1, 2]); // half a record header ...
    bytes.extend_from_slice(&[0; 4096]); // ... and preallocated zeros
    std::fs::write(&path, &bytes).unwrap();

    let (mut wal, records, report) = open(tmp.path(), WalOptions::default());
    assert_eq!(records.len(), 3);
    let torn = report.torn_tail.expect("torn tail reported");
    assert_eq!(torn.offset, good_len);
    assert_eq!(torn.discarded_bytes, 6 + 4096);
    assert!(torn.search_complete);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), good_len);
    wal.append(b"next").unwrap();
    wal.commit().unwrap();
    drop(wal);
    let (_wal, records, report) = open(tmp.path(), WalOptions::default());
    assert_eq!(records.len(), 4);
    assert_eq!(report.torn_tail, None);
}

/// Run by hand: `cargo test --release -p spool-wal -- --ignored recovery_speed --nocapture`.
#[test]
#[ignore = "measures recovery speed; run by hand in release mode"]
fn recovery_speed() {
    const RECORDS: usize = 1_000_000;
    let tmp = TempDir::new("speed");
    let (mut wal, _, _) = open(tmp.path(), WalOptions::default());
    let mut record = [0u8; 150];
    let started = Instant::now();
    for i in 0..RECORDS {
        record[..8].copy_from_slice(&(i as u64).to_le_bytes());
        wal.append(&record).unwrap();
        if i % 10_000 == 9_999 {
            wal.write().unwrap();
        }
    }
    wal.commit().unwrap();
    let wrote = started.elapsed();
    let segments = wal.segments().len();
    drop(wal);

    let started = Instant::now();
    let mut recovery = Wal::open(tmp.path(), WalOptions::default()).unwrap();
    let mut n = 0u64;
    let mut checksum = 0u64;
    while let Some(r) = recovery.next_record().unwrap() {
        n += 1;
        checksum = checksum.wrapping_add(u64::from(r[0]));
    }
    let (_wal, report) = recovery.finish().unwrap();
    let took = started.elapsed();
    assert_eq!(n, RECORDS as u64);
    assert_eq!(report.records, RECORDS as u64);
    println!(
        "wrote {RECORDS} x 150-byte records in {wrote:?}; recovered them from {segments} segments ({} MB) in {took:?}: {:.2} M records/s, {:.0} MB/s (checksum {checksum})",
        report.file_bytes / 1_000_000,
        RECORDS as f64 / took.as_secs_f64() / 1e6,
        report.file_bytes as f64 / took.as_secs_f64() / 1e6,
    );
}

#[test]
fn zero_filled_tail_is_a_clean_end_and_writing_goes_on_after_it() {
    let tmp = TempDir::new("zerofill");
    let (mut wal, _, _) = open(tmp.path(), WalOptions::default());
    let mut expected: Vec<Vec<u8>> = (0..10).map(payload).collect();
    for p in &expected {
        wal.append(p).unwrap();
    }
    wal.commit().unwrap();
    let path = wal.segments()[0].path.clone();
    let logical = wal.segments()[0].len;
    let on_disk = std::fs::metadata(&path).unwrap().len();
    assert!(on_disk > logical);
    drop(wal);

    // Reopen: nothing reported or cut; the zeros are kept for the writer.
    let (mut wal, records, report) = open(tmp.path(), WalOptions::default());
    assert_eq!(records, expected);
    assert_eq!(report.torn_tail, None);
    assert_eq!(report.file_bytes, logical);
    assert_eq!(wal.segments()[0].len, logical);
    assert_eq!(wal.file_len(), on_disk);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), on_disk);
    for i in 10..20 {
        wal.append(&payload(i)).unwrap();
        expected.push(payload(i));
    }
    wal.commit().unwrap();
    assert_eq!(wal.stats().zero_fills, 0, "the kept region had room");
    drop(wal);

    let (_wal, records, report) = open(tmp.path(), WalOptions::default());
    assert_eq!(records, expected);
    assert_eq!(report.torn_tail, None);
}

/// Run by hand: `cargo test --release -p spool-wal -- --ignored commit_latency --nocapture`.
/// Mean fdatasync time per one-record commit, appending versus writing into
/// the zero-filled region, on the file system of the temp dir.
#[test]
#[ignore = "measures fsync latency; run by hand in release mode"]
fn commit_latency() {
    const COMMITS: u32 = 3000;
    for zero_fill in [0, spool_wal::ZERO_FILL_AHEAD_BYTES] {
        let tmp = TempDir::new("latency");
        let options = WalOptions::default().zero_fill_ahead_bytes(zero_fill);
        let (mut wal, _, _) = open(tmp.path(), options);
        let record = [0x42; 150];
        let started = Instant::now();
        for _ in 0..COMMITS {
            wal.append(&record).unwrap();
            wal.commit().unwrap();
        }
        let elapsed = started.elapsed();
        let stats = wal.stats();
        println!(
            "zero_fill_ahead_bytes={zero_fill}: {COMMITS} commits in {elapsed:?}, mean fsync {:?}, last {:?}, zero fills {}",
            stats.fsync_total / COMMITS,
            stats.last_fsync,
            stats.zero_fills
        );
    }
}
