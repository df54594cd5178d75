//! Damage at every byte of a small two-segment log, and truncation at every
//! length: each must give exactly the outcome the recovery rules promise
//! (torn tail cut, or an error naming the right file and offset), never a
//! panic and never a silently shortened log.

// Helpers outside #[test] functions unwrap too: a panic is how a test fails.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::PathBuf;

use common::{open_sim, record_offsets, sim_dir};
use spool_wal::sim::SimStorage;
use spool_wal::{WalError, WalOptions};

struct Log {
    files: Vec<(PathBuf, Vec<u8>)>,
    /// Records per segment.
    records: Vec<Vec<Vec<u8>>>,
    /// The manifest as the writer left it (segments 1 and 2 exist, the
    /// second at least a header long), copied with every variant.
    manifest: Vec<u8>,
}

/// The log, written without zero-fill ahead so that its files hold exactly
/// the header and records that the damage below is applied to.
fn build() -> Log {
    let sim = SimStorage::new();
    let options = WalOptions::default().zero_fill_ahead_bytes(0);
    let (mut wal, _, _) = open_sim(&sim, options).unwrap();
    let mut records = vec![Vec::new(), Vec::new()];
    for (seg, texts) in [
        ["alpha", "", "gamma gamma"],
        ["delta", "epsilon", "zeta zeta zeta"],
    ]
    .iter()
    .enumerate()
    {
        for t in texts {
            wal.append(t.as_bytes()).unwrap();
            records[seg].push(t.as_bytes().to_vec());
        }
        if seg == 0 {
            wal.rotate().unwrap();
        }
    }
    wal.commit().unwrap();
    let files = wal
        .segments()
        .iter()
        .map(|s| (s.path.clone(), sim.read_file(&s.path).unwrap()))
        .collect();
    let manifest = sim.read_file(&manifest_path()).unwrap();
    Log {
        files,
        records,
        manifest,
    }
}

fn manifest_path() -> PathBuf {
    sim_dir().join(spool_wal::format::MANIFEST_FILE_NAME)
}

fn with_file_replaced(log: &Log, which: usize, bytes: &[u8]) -> SimStorage {
    let sim = SimStorage::new();
    for (i, (path, contents)) in log.files.iter().enumerate() {
        sim.put_file(path, if i == which { bytes } else { contents });
    }
    sim.put_file(&manifest_path(), &log.manifest);
    sim
}

/// Index of the record whose frame contains `pos`, if any.
fn record_at(offsets: &[u64], pos: u64) -> Option<usize> {
    offsets.iter().rposition(|&o| o <= pos)
}

#[test]
fn every_flipped_byte_is_caught_where_it_is() {
    let log = build();
    let all: Vec<Vec<u8>> = log.records.concat();
    for (which, (path, original)) in log.files.iter().enumerate() {
        let is_last = which == log.files.len() - 1;
        let offsets = record_offsets(original);
        for pos in 0..original.len() {
            for mask in [0x01u8, 0x80, 0xff] {
                let mut bytes = original.clone();
                bytes[pos] ^= mask;
                let sim = with_file_replaced(&log, which, &bytes);
                let outcome = open_sim(&sim, WalOptions::default());
                let ctx = format!("segment {which}, byte {pos}, mask {mask:#x}");
                match (pos < 32, record_at(&offsets, pos as u64)) {
                    (true, _) => {
                        let err = outcome.err().unwrap_or_else(|| panic!("{ctx}: accepted"));
                        match err {
                            WalError::BadHeader { path: p, .. } => assert_eq!(&p, path, "{ctx}"),
                            other => panic!("{ctx}: {other}"),
                        }
                    }
                    (false, Some(r)) if is_last && r == offsets.len() - 1 => {
                        // The last record of the last segment: a torn tail.
                        let (_wal, records, report) =
                            outcome.unwrap_or_else(|e| panic!("{ctx}: {e}"));
                        assert_eq!(records, all[..all.len() - 1], "{ctx}");
                        let torn = report.torn_tail.unwrap();
                        assert_eq!(torn.offset, offsets[r], "{ctx}");
                        assert_eq!(&torn.path, path, "{ctx}");
                        // The file was cut back to the last whole record.
                        assert_eq!(
                            sim.read_file(path).unwrap(),
                            original[..offsets[r] as usize],
                            "{ctx}"
                        );
                    }
                    (false, Some(r)) => match outcome {
                        Err(WalError::Corrupt {
                            path: p, offset, ..
                        }) => {
                            assert_eq!(&p, path, "{ctx}");
                            assert_eq!(offset, offsets[r], "{ctx}");
                        }
                        Err(other) => panic!("{ctx}: {other}"),
                        Ok((_, records, _)) => panic!("{ctx}: accepted, {} records", records.len()),
                    },
                    (false, None) => unreachable!(),
                }
            }
        }
    }
}

#[test]
fn every_truncation_is_a_torn_tail_in_the_last_segment_only() {
    let log = build();
    let all: Vec<Vec<u8>> = log.records.concat();
    let first_count = log.records[0].len();
    for (which, (path, original)) in log.files.iter().enumerate() {
        let is_last = which == log.files.len() - 1;
        let offsets = record_offsets(original);
        for len in 0..original.len() {
            let sim = with_file_replaced(&log, which, &original[..len]);
            let outcome = open_sim(&sim, WalOptions::default());
            let ctx = format!("segment {which} cut to {len} bytes");
            if !is_last {
                // Even at a record boundary: the next segment's header
                // records how long this one was.
                match outcome {
                    Err(WalError::BadHeader { .. }) if len < 32 => {}
                    Err(WalError::Corrupt {
                        path: p, offset, ..
                    }) => {
                        assert_eq!(&p, path, "{ctx}");
                        assert!(len >= 32 && offset <= len as u64, "{ctx}");
                    }
                    Err(other) => panic!("{ctx}: {other}"),
                    Ok(_) => panic!("{ctx}: accepted"),
                }
                continue;
            }
            let (_wal, records, report) = outcome.unwrap_or_else(|e| panic!("{ctx}: {e}"));
            let whole = offsets
                .iter()
                .enumerate()
                .filter(|(i, _)| offsets.get(i + 1).map_or(original.len(), |&o| o as usize) <= len)
                .count();
            assert_eq!(records, all[..first_count + whole], "{ctx}");
            let at_boundary = len == 32 || offsets.contains(&(len as u64));
            assert_eq!(report.torn_tail.is_none(), at_boundary, "{ctx}");
        }
    }
}

#[test]
fn zeros_after_the_last_record_are_a_clean_end() {
    // The writer's zero-filled region: not reported, not cut, and the next
    // records go right after the last one, into the zeros.
    let log = build();
    let (path, original) = log.files.last().unwrap();
    for zeros in [1, 7, 8, 9, 4096] {
        let mut bytes = original.clone();
        bytes.resize(bytes.len() + zeros, 0);
        let sim = with_file_replaced(&log, 1, &bytes);
        let (mut wal, records, report) = open_sim(&sim, WalOptions::default()).unwrap();
        assert_eq!(records, log.records.concat());
        assert_eq!(report.torn_tail, None);
        assert_eq!(
            report.file_bytes,
            (log.files[0].1.len() + original.len()) as u64
        );
        assert_eq!(
            wal.segments()[1].len,
            original.len() as u64,
            "logical length"
        );
        assert_eq!(sim.read_file(path).unwrap(), bytes, "zeros kept");
        wal.append(b"eta").unwrap();
        wal.commit().unwrap();
        drop(wal);
        let on_disk = sim.read_file(path).unwrap();
        assert_eq!(&on_disk[..original.len()], &original[..]);
        let (_wal, again, report) = open_sim(&sim, WalOptions::default()).unwrap();
        assert_eq!(report.torn_tail, None);
        assert_eq!(again.len(), records.len() + 1);
        assert_eq!(again.last().unwrap(), b"eta");
    }
}

#[test]
fn damage_followed_by_zeros_is_still_a_torn_tail() {
    let log = build();
    let (path, original) = log.files.last().unwrap();
    // Half a record header, then zeros; and zeros, then garbage.
    for (junk, zeros_first) in [(&[9u8, 0, 0, 0, 1, 2][..], false), (&[0x5a; 3][..], true)] {
        let mut bytes = original.clone();
        if zeros_first {
            bytes.resize(bytes.len() + 100, 0);
            bytes.extend_from_slice(junk);
        } else {
            bytes.extend_from_slice(junk);
            bytes.resize(bytes.len() + 100, 0);
        }
        let sim = with_file_replaced(&log, 1, &bytes);
        let (_wal, records, report) = open_sim(&sim, WalOptions::default()).unwrap();
        assert_eq!(records, log.records.concat());
        let torn = report.torn_tail.unwrap();
        assert_eq!(torn.offset, original.len() as u64);
        assert_eq!(torn.discarded_bytes, (bytes.len() - original.len()) as u64);
        assert_eq!(sim.read_file(path).unwrap(), *original);
    }
}

#[test]
fn zeros_at_the_end_of_a_segment_that_is_not_the_last_are_corruption() {
    let log = build();
    let mut bytes = log.files[0].1.clone();
    bytes.resize(bytes.len() + 64, 0);
    let sim = with_file_replaced(&log, 0, &bytes);
    let err = open_sim(&sim, WalOptions::default()).unwrap_err();
    assert!(matches!(err, WalError::Corrupt { .. }), "{err}");
}

#[test]
fn empty_and_header_only_last_segments_are_fine() {
    let log = build();
    let next = sim_dir().join("0000000000000003.wal");
    let header = spool_wal::format::encode_segment_header(3, log.files[1].1.len() as u64);
    // Header only: nothing to report.
    let sim = with_file_replaced(&log, usize::MAX, &[]);
    sim.put_file(&next, &header);
    let (wal, records, report) = open_sim(&sim, WalOptions::default()).unwrap();
    assert_eq!(records, log.records.concat());
    assert_eq!(report.torn_tail, None);
    assert_eq!(wal.segments().last().unwrap().seq, 3);
    drop(wal);
    // Empty or partial header (a crash while creating it): rewritten, reported.
    for len in [0, 1, 31] {
        let sim = with_file_replaced(&log, usize::MAX, &[]);
        sim.put_file(&next, &header[..len]);
        let (mut wal, records, report) = open_sim(&sim, WalOptions::default()).unwrap();
        assert_eq!(records, log.records.concat());
        assert_eq!(report.torn_tail.unwrap().offset, 0);
        assert_eq!(sim.read_file(&next).unwrap(), header);
        wal.append(b"eta").unwrap();
        wal.commit().unwrap();
        drop(wal);
        let (_wal, records, _) = open_sim(&sim, WalOptions::default()).unwrap();
        assert_eq!(records.last().unwrap(), b"eta");
    }
}

#[test]
fn missing_and_misnamed_segments_are_errors() {
    let log = build();
    let sim = SimStorage::new();
    sim.put_file(&log.files[0].0, &log.files[0].1);
    sim.put_file(
        &sim_dir().join("0000000000000003.wal"),
        &spool_wal::format::encode_segment_header(3, 0),
    );
    let err = open_sim(&sim, WalOptions::default()).unwrap_err();
    assert!(
        matches!(&err, WalError::Corrupt { reason, .. } if reason.contains("0000000000000002.wal is missing")),
        "{err}"
    );

    let sim = with_file_replaced(&log, usize::MAX, &[]);
    sim.put_file(&sim_dir().join("0000000000000003.WAL.wal"), b"");
    assert!(matches!(
        open_sim(&sim, WalOptions::default()),
        Err(WalError::Corrupt { .. })
    ));

    // A segment file whose header names another segment.
    let sim = with_file_replaced(&log, usize::MAX, &[]);
    sim.put_file(
        &sim_dir().join("0000000000000003.wal"),
        &spool_wal::format::encode_segment_header(4, log.files[1].1.len() as u64),
    );
    let err = open_sim(&sim, WalOptions::default()).unwrap_err();
    assert!(matches!(err, WalError::BadHeader { .. }), "{err}");

    // Other files are none of the log's business.
    let sim = with_file_replaced(&log, usize::MAX, &[]);
    sim.put_file(&sim_dir().join("notes.txt"), b"hello");
    assert_eq!(
        open_sim(&sim, WalOptions::default()).unwrap().1,
        log.records.concat()
    );
}

#[test]
fn damaged_length_in_the_middle_of_the_last_segment_is_corruption() {
    // The length field of a record followed by valid records is overwritten
    // with junk: the record's own length no longer leads to the next record,
    // so only the search of the tail finds it.
    let sim = SimStorage::new();
    let (mut wal, _, _) = open_sim(&sim, WalOptions::default()).unwrap();
    for i in 0..50u32 {
        wal.append(&i.to_le_bytes().repeat(20)).unwrap();
    }
    wal.commit().unwrap();
    let path = wal.segments()[0].path.clone();
    drop(wal);
    let original = sim.read_file(&path).unwrap();
    let offsets = record_offsets(&original);
    for (r, junk) in [
        (10usize, [0x13, 0x37, 0x00, 0x00]),
        (25, [0xff, 0xff, 0xff, 0x7f]),
        (48, [0, 0, 0, 0]),
    ] {
        let mut bytes = original.clone();
        let at = offsets[r] as usize;
        bytes[at..at + 4].copy_from_slice(&junk);
        let sim = SimStorage::new();
        sim.put_file(&path, &bytes);
        match open_sim(&sim, WalOptions::default()) {
            Err(WalError::Corrupt { offset, .. }) => assert_eq!(offset, offsets[r]),
            Err(other) => panic!("record {r}: {other}"),
            Ok(_) => panic!("record {r}: accepted"),
        }
    }
}

#[test]
fn unrecorded_previous_length_is_not_checked() {
    // 0 in the previous-length field means "not recorded".
    let log = build();
    let sim = with_file_replaced(&log, usize::MAX, &[]);
    sim.put_file(
        &sim_dir().join("0000000000000003.wal"),
        &spool_wal::format::encode_segment_header(3, 0),
    );
    assert_eq!(
        open_sim(&sim, WalOptions::default()).unwrap().1,
        log.records.concat()
    );
}
