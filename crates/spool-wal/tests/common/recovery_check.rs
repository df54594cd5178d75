//! The WAL recovery fuzz check, shared by the cargo-fuzz target
//! (`fuzz/fuzz_targets/wal_recovery.rs`, which includes this file with
//! `#[path]`) and the stable proptest version (`tests/recovery_fuzz.rs`).
//!
//! Input layout: `[mode][segment bytes…]`. Mode bits:
//! - bit 0: put a valid header for the segment in front of the bytes (else the
//!   bytes are the whole file, header included or not);
//! - bit 1: first put a valid, complete segment 1 holding three records, so
//!   the bytes become segment 2, the last one;
//! - bit 2: open with 64-byte segments, so that appending after recovery
//!   rotates;
//! - bit 3: write segment headers of format version 1 and no manifest, as
//!   releases before the manifest did (recovery upgrades the log in place);
//!   else the current version, with a manifest that records the segments
//!   (and no more than a header of the last).
//!
//! Checks: opening returns `Ok` or a `WalError`, never panics; when it
//! recovers, the complete segment's records come first, the last segment is
//! left holding exactly its header and the recovered records (the torn tail
//! cut at a record boundary), followed by nothing or, when no torn tail was
//! reported, only zeros (the writer's zero-filled region, a clean end), and
//! the repaired log takes a new record and reopens cleanly with the same
//! records plus the new one.

use std::path::Path;
use std::sync::Arc;

use spool_wal::format::{
    encode_manifest_slot, encode_record, encode_segment_header_with_version, segment_file_name,
    ManifestSlot, FORMAT_VERSION, MANIFEST_FILE_NAME,
};
use spool_wal::sim::SimStorage;
use spool_wal::{Wal, WalOptions};

const FIRST_SEGMENT_RECORDS: [&[u8]; 3] = [b"one", b"", b"three"];

pub fn check_recovery(data: &[u8]) {
    let Some((&mode, bytes)) = data.split_first() else {
        return;
    };
    let dir = Path::new("/fuzz/data");
    let sim = SimStorage::new();
    let version = if mode & 8 != 0 { 1 } else { FORMAT_VERSION };
    let encode_segment_header =
        |seq: u64, prev_len: u64| encode_segment_header_with_version(version, seq, prev_len);

    let mut prefix: Vec<Vec<u8>> = Vec::new();
    let mut prev_len = 0;
    let seq = if mode & 2 != 0 {
        let mut first = encode_segment_header(1, 0).to_vec();
        for r in FIRST_SEGMENT_RECORDS {
            encode_record(&mut first, r);
            prefix.push(r.to_vec());
        }
        prev_len = first.len() as u64;
        sim.put_file(&dir.join(segment_file_name(1)), &first);
        2
    } else {
        1
    };
    let path = dir.join(segment_file_name(seq));
    let mut file = Vec::new();
    if mode & 1 != 0 {
        file.extend_from_slice(&encode_segment_header(seq, prev_len));
    }
    file.extend_from_slice(bytes);
    sim.put_file(&path, &file);
    if version != 1 {
        let slot = ManifestSlot {
            generation: 1,
            first_segment: 1,
            last_segment: seq,
            last_segment_len: 32,
            clean: false,
        };
        sim.put_file(&dir.join(MANIFEST_FILE_NAME), &encode_manifest_slot(&slot));
    }

    let options = if mode & 4 != 0 {
        WalOptions::default().segment_max_bytes(64)
    } else {
        WalOptions::default()
    };
    let open = |sim: &SimStorage| {
        Wal::open_with_storage(Arc::new(sim.clone()), dir, options.clone())?.collect_records()
    };

    let Ok((mut wal, records, report)) = open(&sim) else {
        // Any WalError is an acceptable answer to arbitrary bytes.
        return;
    };
    assert!(
        records.len() >= prefix.len(),
        "records of the complete segment lost"
    );
    assert_eq!(records[..prefix.len()], prefix[..]);
    assert_eq!(report.records, records.len() as u64);
    assert!(report.torn_tail.as_ref().is_none_or(|t| t.segment == seq));

    // The last segment now holds its header and exactly the recovered records,
    // then at most zeros that were not reported as damage.
    let repaired = sim.read_file(&path).expect("last segment still there");
    assert!(repaired.len() >= 32);
    let header = &repaired[..32];
    assert!(
        header == &file[..32.min(file.len())]
            || header == encode_segment_header_with_version(FORMAT_VERSION, seq, prev_len),
        "header neither kept nor rewritten (in the current version)"
    );
    let mut expected = Vec::new();
    for r in &records[prefix.len()..] {
        encode_record(&mut expected, r);
    }
    let end = 32 + expected.len();
    assert!(
        repaired.len() >= end && repaired[32..end] == expected[..],
        "last segment not cut at the last whole record"
    );
    let rest = &repaired[end..];
    assert!(
        rest.is_empty() || (report.torn_tail.is_none() && rest.iter().all(|&b| b == 0)),
        "last segment holds more than its records and a clean zero tail"
    );
    // A log of format 1 was upgraded: new records go to a new segment.
    let segment = wal.segments().iter().find(|s| s.seq == seq);
    assert_eq!(segment.map(|s| s.len), Some(end as u64));
    // (Or its torn header was rewritten in the current version.)
    if report.upgraded {
        assert_eq!(version, 1);
        let newest = wal.segments().last().expect("a segment");
        let header = sim.read_file(&newest.path).expect("newest segment");
        assert_eq!(header[8..12], FORMAT_VERSION.to_le_bytes());
    }

    // The repaired log takes new records and reopens cleanly.
    wal.append(b"after recovery").expect("append");
    wal.commit().expect("commit");
    drop(wal);
    let (_wal, again, report) = open(&sim).expect("reopen after repair");
    assert_eq!(report.torn_tail, None);
    assert_eq!(again.len(), records.len() + 1);
    assert_eq!(again[..records.len()], records[..]);
    assert_eq!(again[records.len()], b"after recovery");
}
