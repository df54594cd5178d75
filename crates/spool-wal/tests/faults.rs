//! Injected I/O failures: which ones poison the log, which ones it survives,
//! and what a reopen recovers afterwards.

// Helpers outside #[test] functions unwrap too: a panic is how a test fails.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::ErrorKind;
use std::sync::Arc;

use common::{open_sim, sim_dir};
use spool_wal::sim::{Fault, SimStorage};
use spool_wal::{Wal, WalError, WalOptions};

fn assert_poisoned(wal: &mut Wal) {
    assert!(wal.is_poisoned());
    let results = [
        wal.append(b"x").map(drop),
        wal.write(),
        wal.sync().map(drop),
        wal.commit().map(drop),
        wal.rotate().map(drop),
        wal.remove_segments_before(u64::MAX).map(drop),
    ];
    for r in results {
        assert!(matches!(r, Err(WalError::Poisoned { .. })), "{r:?}");
    }
}

#[test]
fn failed_fsync_poisons_every_later_call() {
    let sim = SimStorage::new();
    let (mut wal, _, _) = open_sim(&sim, WalOptions::default()).unwrap();
    wal.append(b"durable").unwrap();
    wal.commit().unwrap();
    sim.inject(Fault::Sync { nth: 0 });
    wal.append(b"not durable").unwrap();
    let err = wal.commit().unwrap_err();
    assert!(matches!(err, WalError::Io { op: "fsync", .. }), "{err}");
    assert_poisoned(&mut wal);
    let msg = wal.append(b"y").unwrap_err().to_string();
    assert!(msg.contains("fsync"), "the poison names its cause: {msg}");
    drop(wal);

    // A crash now keeps at least the committed record.
    let (_wal, records, _) = open_sim(&sim.crash_image(1), WalOptions::default()).unwrap();
    assert_eq!(records[0], b"durable");
}

#[test]
fn failed_write_other_than_disk_full_poisons() {
    let sim = SimStorage::new();
    let (mut wal, _, _) = open_sim(&sim, WalOptions::default()).unwrap();
    sim.inject(Fault::Write {
        nth: 0,
        kind: ErrorKind::Other,
        written: 3,
    });
    wal.append(b"a").unwrap();
    let err = wal.write().unwrap_err();
    assert!(matches!(err, WalError::Io { op: "write", .. }), "{err}");
    assert_poisoned(&mut wal);
}

#[test]
fn disk_full_drops_the_batch_and_the_log_goes_on() {
    let sim = SimStorage::new();
    let (mut wal, _, _) = open_sim(&sim, WalOptions::default()).unwrap();
    wal.append(b"before").unwrap();
    wal.commit().unwrap();
    let len_before = wal.segments()[0].len;

    // A short write (5 bytes land) and then ENOSPC.
    sim.inject(Fault::Write {
        nth: 0,
        kind: ErrorKind::StorageFull,
        written: 5,
    });
    wal.append(b"dropped 1").unwrap();
    wal.append(b"dropped 2").unwrap();
    let err = wal.commit().unwrap_err();
    assert!(matches!(err, WalError::OutOfSpace { .. }), "{err}");
    assert!(!wal.is_poisoned());
    assert_eq!(wal.stats().batches_rejected, 1);
    assert_eq!(wal.stats().pending_records, 0);
    let path = wal.segments()[0].path.clone();
    assert_eq!(
        sim.read_file(&path).unwrap().len() as u64,
        len_before,
        "partial write undone"
    );

    // Space is back.
    wal.append(b"after").unwrap();
    wal.commit().unwrap();
    drop(wal);
    let (_wal, records, report) = open_sim(&sim, WalOptions::default()).unwrap();
    assert_eq!(records, vec![b"before".to_vec(), b"after".to_vec()]);
    assert_eq!(report.torn_tail, None);
}

#[test]
fn quota_exceeded_is_treated_like_disk_full() {
    let sim = SimStorage::new();
    let (mut wal, _, _) = open_sim(&sim, WalOptions::default()).unwrap();
    sim.inject(Fault::Write {
        nth: 0,
        kind: ErrorKind::QuotaExceeded,
        written: 0,
    });
    wal.append(b"dropped").unwrap();
    assert!(matches!(wal.commit(), Err(WalError::OutOfSpace { .. })));
    assert!(!wal.is_poisoned());
}

#[test]
fn disk_full_after_a_rotation_in_the_same_batch_poisons() {
    // The first part of the batch went into the old segment, which the
    // rotation fsynced: it will be replayed, so the batch cannot be reported
    // as dropped.
    // Writes: 0 = first chunk, 1 = new segment's header, 2 = second chunk.
    for nth in [1, 2] {
        let sim = SimStorage::new();
        let options = WalOptions::default().segment_max_bytes(100);
        let (mut wal, _, _) = open_sim(&sim, options.clone()).unwrap();
        wal.append(&[1; 40]).unwrap(); // 32 + 48 = 80 bytes
        wal.append(&[2; 40]).unwrap(); // would make 128: next segment
        sim.inject(Fault::Write {
            nth,
            kind: ErrorKind::StorageFull,
            written: 0,
        });
        let err = wal.write().unwrap_err();
        assert!(matches!(err, WalError::Io { .. }), "{err}");
        assert_poisoned(&mut wal);
        drop(wal);
        let (_wal, records, _) = open_sim(&sim, options).unwrap();
        assert_eq!(records, vec![vec![1; 40]]);
    }
}

#[test]
fn failure_while_creating_a_segment_poisons_and_recovers() {
    for nth in 0..4 {
        // Rotation: fsync old segment (covered by other tests), create, write
        // header, fsync, fsync dir. Cut the power at each step.
        let sim = SimStorage::new();
        let (mut wal, _, _) = open_sim(&sim, WalOptions::default()).unwrap();
        wal.append(b"one").unwrap();
        wal.commit().unwrap();
        sim.inject(Fault::PowerCut { nth });
        assert!(wal.rotate().is_err());
        assert_poisoned(&mut wal);
        drop(wal);
        for seed in 0..8 {
            let image = sim.crash_image(seed);
            let (mut wal, records, _) = open_sim(&image, WalOptions::default()).unwrap();
            assert_eq!(
                records,
                vec![b"one".to_vec()],
                "power cut at {nth}, seed {seed}"
            );
            wal.append(b"two").unwrap();
            wal.commit().unwrap();
            drop(wal);
            let (_wal, records, _) = open_sim(&image, WalOptions::default()).unwrap();
            assert_eq!(records, vec![b"one".to_vec(), b"two".to_vec()]);
        }
    }
}

#[test]
fn failed_directory_fsync_while_removing_poisons() {
    let sim = SimStorage::new();
    let (mut wal, _, _) = open_sim(&sim, WalOptions::default()).unwrap();
    wal.append(b"old").unwrap();
    let seq = wal.rotate().unwrap();
    wal.append(b"new").unwrap();
    wal.commit().unwrap();
    // Sync 0 is the manifest's (the new start, recorded first); 1 is the
    // directory's after the unlink.
    sim.inject(Fault::Sync { nth: 1 });
    let err = wal.remove_segments_before(seq).unwrap_err();
    assert!(
        matches!(
            err,
            WalError::Io {
                op: "fsync directory",
                ..
            }
        ),
        "{err}"
    );
    assert_poisoned(&mut wal);
    drop(wal);
    for seed in 0..8 {
        // The unlink may or may not have reached the disk.
        let (_wal, records, _) = open_sim(&sim.crash_image(seed), WalOptions::default()).unwrap();
        assert!(
            records == vec![b"old".to_vec(), b"new".to_vec()] || records == vec![b"new".to_vec()],
            "{records:?}"
        );
    }
}

#[test]
fn failed_recovery_leaves_the_directory_unlocked() {
    let sim = SimStorage::new();
    sim.put_file(
        &sim_dir().join("0000000000000001.wal"),
        b"definitely not a header, and long enough",
    );
    let err = open_sim(&sim, WalOptions::default()).unwrap_err();
    assert!(matches!(err, WalError::BadHeader { .. }), "{err}");
    // The error dropped the Recovery and its lock.
    let err = open_sim(&sim, WalOptions::default()).unwrap_err();
    assert!(matches!(err, WalError::BadHeader { .. }), "{err}");
}

#[test]
fn recovery_reports_after_an_error_keep_failing() {
    let sim = SimStorage::new();
    let (mut wal, _, _) = open_sim(&sim, WalOptions::default()).unwrap();
    wal.append(b"a").unwrap();
    wal.rotate().unwrap();
    wal.append(b"b").unwrap();
    wal.commit().unwrap();
    drop(wal);
    let first = sim_dir().join("0000000000000001.wal");
    let mut bytes = sim.read_file(&first).unwrap();
    *bytes.last_mut().unwrap() ^= 1;
    sim.put_file(&first, &bytes);
    let mut recovery =
        Wal::open_with_storage(Arc::new(sim.clone()), sim_dir(), WalOptions::default()).unwrap();
    assert!(matches!(
        recovery.next_record(),
        Err(WalError::Corrupt { .. })
    ));
    assert!(matches!(
        recovery.next_record(),
        Err(WalError::Poisoned { .. })
    ));
    assert!(matches!(recovery.finish(), Err(WalError::Poisoned { .. })));
}

#[test]
fn segments_too_small_for_a_record_are_refused() {
    let err = open_sim(
        &SimStorage::new(),
        WalOptions::default().segment_max_bytes(39),
    )
    .unwrap_err();
    assert!(matches!(err, WalError::InvalidOptions(_)), "{err}");
    open_sim(
        &SimStorage::new(),
        WalOptions::default().segment_max_bytes(40),
    )
    .unwrap();
}

#[test]
fn disk_full_while_zero_filling_falls_back_to_appending() {
    // The zeros are an optimization: no room for them is not a dropped batch.
    let sim = SimStorage::new();
    let (mut wal, _, _) = open_sim(&sim, WalOptions::default()).unwrap();
    sim.inject(Fault::ZeroFill {
        nth: 0,
        kind: ErrorKind::StorageFull,
    });
    wal.append(b"appended").unwrap();
    wal.commit().unwrap();
    assert!(!wal.is_poisoned());
    assert_eq!(wal.stats().zero_fills, 0);
    let path = wal.segments()[0].path.clone();
    let len = wal.segments()[0].len;
    assert_eq!(
        sim.read_file(&path).unwrap().len() as u64,
        len,
        "half-written zeros cut"
    );
    // Space is back: the next write fills ahead again.
    wal.append(b"zero-filled").unwrap();
    wal.commit().unwrap();
    assert_eq!(wal.stats().zero_fills, 1);
    drop(wal);
    let (_wal, records, report) = open_sim(&sim, WalOptions::default()).unwrap();
    assert_eq!(records, vec![b"appended".to_vec(), b"zero-filled".to_vec()]);
    assert_eq!(report.torn_tail, None);
}

#[test]
fn failed_zero_fill_other_than_disk_full_poisons() {
    let sim = SimStorage::new();
    let (mut wal, _, _) = open_sim(&sim, WalOptions::default()).unwrap();
    sim.inject(Fault::ZeroFill {
        nth: 0,
        kind: ErrorKind::Other,
    });
    wal.append(b"a").unwrap();
    let err = wal.write().unwrap_err();
    assert!(
        matches!(
            err,
            WalError::Io {
                op: "zero-fill",
                ..
            }
        ),
        "{err}"
    );
    assert_poisoned(&mut wal);
}

#[test]
fn rotation_cuts_the_zero_filled_region_durably() {
    let sim = SimStorage::new();
    let (mut wal, _, _) = open_sim(&sim, WalOptions::default()).unwrap();
    wal.append(b"first segment").unwrap();
    wal.commit().unwrap();
    let old = wal.segments()[0].clone();
    assert!(sim.read_file(&old.path).unwrap().len() as u64 > old.len);
    wal.rotate().unwrap();
    assert_eq!(sim.read_file(&old.path).unwrap().len() as u64, old.len);
    assert_eq!(wal.segments()[0], old, "logical length unchanged");
    // What any crash from here on leaves of the old segment: no zeros.
    for seed in 0..16 {
        let image = sim.crash_image(seed);
        assert_eq!(image.read_file(&old.path).unwrap().len() as u64, old.len);
        let (_wal, records, report) = open_sim(&image, WalOptions::default()).unwrap();
        assert_eq!(records, vec![b"first segment".to_vec()]);
        assert_eq!(report.torn_tail, None);
    }
}

#[test]
fn disk_full_while_rotating_keeps_the_log_usable() {
    // The new segment's header does not fit, whole or in part: the new file
    // goes again and the log goes on in the old segment.
    for written in [0, 10] {
        let sim = SimStorage::new();
        let (mut wal, _, _) = open_sim(&sim, WalOptions::default()).unwrap();
        wal.append(b"one").unwrap();
        wal.commit().unwrap();
        // The rotation's first write is the new segment's header.
        sim.inject(Fault::Write {
            nth: 0,
            kind: ErrorKind::StorageFull,
            written,
        });
        let err = wal.rotate().unwrap_err();
        assert!(matches!(err, WalError::OutOfSpace { .. }), "{err}");
        assert!(!wal.is_poisoned());
        assert_eq!(wal.segments().len(), 1);
        assert_eq!(
            sim.file_names(&sim_dir()),
            vec!["0000000000000001.wal", "MANIFEST"],
            "the unfinished segment was removed"
        );
        wal.append(b"two").unwrap();
        wal.commit().unwrap();
        // Space is back: the rotation works and reuses the number.
        assert_eq!(wal.rotate().unwrap(), 2);
        wal.append(b"three").unwrap();
        wal.commit().unwrap();
        drop(wal);
        for image in [
            sim.clone(),
            sim.crash_image(u64::try_from(written).unwrap()),
        ] {
            let (_wal, records, report) = open_sim(&image, WalOptions::default()).unwrap();
            assert_eq!(
                records,
                vec![b"one".to_vec(), b"two".to_vec(), b"three".to_vec()]
            );
            assert_eq!(report.torn_tail, None);
        }
    }
}

#[test]
fn disk_full_in_the_segment_a_batch_starts_drops_the_batch() {
    // The batch starts a new segment (the current one is full): none of it
    // can be durable when the disk fills, whether at the new segment's
    // header (write 0), at the manifest's record of it (write 1) or at the
    // records after it (write 2).
    for nth in [0, 1, 2] {
        let sim = SimStorage::new();
        let options = WalOptions::default().segment_max_bytes(100);
        let (mut wal, _, _) = open_sim(&sim, options.clone()).unwrap();
        wal.append(&[1; 40]).unwrap(); // 32 + 48 = 80 bytes
        wal.commit().unwrap();
        wal.append(&[2; 40]).unwrap(); // would make 128: next segment
        sim.inject(Fault::Write {
            nth,
            kind: ErrorKind::StorageFull,
            written: 0,
        });
        let err = wal.commit().unwrap_err();
        assert!(matches!(err, WalError::OutOfSpace { .. }), "{err}");
        assert!(!wal.is_poisoned(), "write {nth}");
        assert_eq!(wal.stats().batches_rejected, 1);
        // Space is back.
        wal.append(&[3; 40]).unwrap();
        wal.commit().unwrap();
        drop(wal);
        let (_wal, records, report) = open_sim(&sim, options.clone()).unwrap();
        assert_eq!(records, vec![vec![1; 40], vec![3; 40]], "write {nth}");
        assert_eq!(report.torn_tail, None);
    }
}

#[test]
fn a_segment_torn_while_created_is_removed_when_the_disk_has_no_room_for_its_header() {
    let sim = SimStorage::new();
    let (mut wal, _, _) = open_sim(&sim, WalOptions::default()).unwrap();
    wal.append(b"one").unwrap();
    wal.rotate().unwrap();
    drop(wal);
    // What a crash right after creating segment 2 leaves: no header.
    let torn = sim_dir().join("0000000000000002.wal");
    sim.put_file(&torn, b"");
    // Recovery's first write is the rewritten header.
    sim.inject(Fault::Write {
        nth: 0,
        kind: ErrorKind::StorageFull,
        written: 0,
    });
    let (mut wal, records, report) = open_sim(&sim, WalOptions::default()).unwrap();
    assert_eq!(records, vec![b"one".to_vec()]);
    let tail = report.torn_tail.expect("reported as torn");
    assert_eq!(tail.segment, 2);
    assert!(tail.reason.contains("removed"), "{}", tail.reason);
    assert_eq!(report.segments, 1);
    assert_eq!(report.last_segment, Some(1));
    assert_eq!(sim.read_file(&torn), None, "the torn segment is gone");
    assert_eq!(wal.segments().len(), 1);
    // The log goes on in segment 1, and rotates again once space is back.
    wal.append(b"two").unwrap();
    wal.commit().unwrap();
    assert_eq!(wal.rotate().unwrap(), 2);
    wal.append(b"three").unwrap();
    wal.commit().unwrap();
    drop(wal);
    let (_wal, records, report) = open_sim(&sim, WalOptions::default()).unwrap();
    assert_eq!(
        records,
        vec![b"one".to_vec(), b"two".to_vec(), b"three".to_vec()]
    );
    assert_eq!(report.torn_tail, None);

    // With no segment before it, there is nothing to go on in: the error
    // names the problem.
    let sim = SimStorage::new();
    sim.put_file(&sim_dir().join("0000000000000001.wal"), b"");
    sim.inject(Fault::Write {
        nth: 0,
        kind: ErrorKind::StorageFull,
        written: 0,
    });
    // (Without a manifest yet, creating one is the first write.)
    let err = open_sim(&sim, WalOptions::default()).unwrap_err();
    assert!(
        matches!(
            err,
            WalError::Io {
                op: "write header" | "write manifest",
                ..
            }
        ),
        "{err}"
    );
}
