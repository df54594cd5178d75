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
//!   rotates.
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

use spool_wal::format::{encode_record, encode_segment_header, segment_file_name};
use spool_wal::sim::SimStorage;
use spool_wal::{Wal, WalOptions};

const FIRST_SEGMENT_RECORDS: [&[u8]; 3] = [b"one", b"", b"three"];

pub fn check_recovery(data: &[u8]) {
    let Some((&mode, bytes)) = data.split_first() else {
        return;
    };
    let dir = Path::new("/fuzz/data");
    let sim = SimStorage::new();

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
        header == &file[..32.min(file.len())] || header == encode_segment_header(seq, prev_len),
        "header neither kept nor rewritten"
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
    assert_eq!(wal.segments().last().map(|s| s.len), Some(end as u64));

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
