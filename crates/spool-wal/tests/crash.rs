//! Crash consistency: random sequences of appends, writes, syncs, commits,
//! rotations and segment removals, a power cut at a random storage operation
//! (or none), then the image a crash would leave (synced bytes plus a random
//! prefix of the unsynced ones, possibly garbled or zeroed at the end, and
//! either state of each unsynced directory entry). Reopening must recover a
//! contiguous run of the appended records, in order, ending at or after the
//! last committed one, and starting no later than the first record that
//! segment removal was asked to keep. Every image must open without a
//! missing-data error: the manifest never claims what a crash can lose.
//!
//! Zero-fill ahead is on in most cases (small regions, so that segments fill
//! and rotate, or the default), so the images include records written over
//! synced zeros and zero-filled regions that did not (all) reach the disk.

// Helpers outside #[test] functions unwrap too: a panic is how a test fails.
#![allow(clippy::unwrap_used)]

mod common;

use common::{open_sim, parse_segment, sim_dir};
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use spool_wal::sim::{Fault, SimStorage};
use spool_wal::{Wal, WalOptions, ZERO_FILL_AHEAD_BYTES};

#[derive(Debug, Clone)]
enum Op {
    Append(usize),
    Write,
    Sync,
    Commit,
    Rotate,
    /// `remove_segments_before(current segment)`: what compaction does once
    /// its snapshot is in the current segment.
    RemoveBeforeCurrent,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0usize..120).prop_map(Op::Append),
        1 => Just(Op::Append(0)),
        1 => (400usize..900).prop_map(Op::Append),
        2 => Just(Op::Write),
        2 => Just(Op::Sync),
        3 => Just(Op::Commit),
        1 => Just(Op::Rotate),
        1 => Just(Op::RemoveBeforeCurrent),
    ]
}

/// Record `i`: its index, then filler that depends on it.
fn payload(i: u64, len: usize) -> Vec<u8> {
    let mut p = i.to_le_bytes().to_vec();
    p.extend((0..len).map(|k| (i as usize * 31 + k * 7) as u8));
    p
}

fn index_of(record: &[u8]) -> u64 {
    u64::from_le_bytes(record[..8].try_into().unwrap())
}

/// Index of the first record in segments `seq` and later, as the files are
/// now (before the crash), or `next` if they hold none yet.
fn first_record_from(sim: &SimStorage, seq: u64, next: u64) -> u64 {
    let mut names = sim.file_names(&sim_dir());
    names.sort();
    names
        .iter()
        .filter(|n| n.ends_with(".wal") && u64::from_str_radix(&n[..16], 16).unwrap() >= seq)
        .flat_map(|n| parse_segment(&sim.read_file(&sim_dir().join(n)).unwrap()))
        .map(|r| index_of(&r))
        .next()
        .unwrap_or(next)
}

fn run(
    ops: &[Op],
    power_cut: Option<u64>,
    seed: u64,
    segment_max: u64,
    zero_fill: u64,
) -> Result<(), TestCaseError> {
    let options = WalOptions::default()
        .segment_max_bytes(segment_max)
        .zero_fill_ahead_bytes(zero_fill);
    let sim = SimStorage::new();
    let (mut wal, _, _) = open_sim(&sim, options.clone()).unwrap();
    if let Some(nth) = power_cut {
        sim.inject(Fault::PowerCut { nth });
    }
    let mut appended: Vec<Vec<u8>> = Vec::new();
    let mut written = 0usize; // records handed to the OS
    let mut durable = 0usize; // records acknowledged as durable
    let mut keep_from = 0u64; // removal may drop records before this index
    for op in ops {
        let result = match op {
            Op::Append(len) => {
                let p = payload(appended.len() as u64, *len);
                let r = wal.append(&p);
                if r.is_ok() {
                    appended.push(p);
                }
                r
            }
            Op::Write => wal.write().map(|()| written = appended.len()),
            Op::Sync => wal.sync().map(|_| durable = written),
            Op::Commit => wal.commit().map(|_| {
                written = appended.len();
                durable = written;
            }),
            Op::Rotate => wal.rotate().map(|_| {
                written = appended.len();
                durable = written;
            }),
            Op::RemoveBeforeCurrent => {
                let current = wal.segments().last().unwrap().seq;
                let older = |sim: &SimStorage| {
                    sim.file_names(&sim_dir())
                        .iter()
                        .filter(|n| {
                            n.ends_with(".wal")
                                && u64::from_str_radix(&n[..16], 16).unwrap() < current
                        })
                        .count()
                };
                let before = older(&sim);
                let r = wal.remove_segments_before(current).map(|_| {
                    written = appended.len();
                    durable = written;
                });
                // Once the removal was asked for, the manifest may record the
                // new start (recovery then skips and deletes the segments
                // before it), and a crash may have removed any prefix of them.
                if before > 0 {
                    keep_from = first_record_from(&sim, current, appended.len() as u64);
                }
                r
            }
        };
        if let Err(e) = result {
            prop_assert!(sim.powered_off(), "only the power cut fails: {e}");
            prop_assert!(wal.is_poisoned());
            break;
        }
    }
    drop(wal);

    let image = sim.crash_image(seed);
    let (mut wal, records, report) = match open_sim(&image, options.clone()) {
        Ok(opened) => opened,
        Err(e) => return Err(TestCaseError::fail(format!("recovery failed: {e}"))),
    };
    let indexes: Vec<u64> = records.iter().map(|r| index_of(r)).collect();
    let first = indexes.first().copied().unwrap_or(0);
    for (k, r) in records.iter().enumerate() {
        let i = first + k as u64;
        prop_assert_eq!(index_of(r), i, "records are a contiguous run");
        prop_assert!((i as usize) < appended.len());
        prop_assert_eq!(r, &appended[i as usize]);
    }
    let end = first + records.len() as u64;
    // Every durable record that no removal could have dropped is there.
    if keep_from < durable as u64 {
        prop_assert!(
            first <= keep_from && end >= durable as u64,
            "recovered {:?}; durable up to {}, removal kept from {}",
            indexes,
            durable,
            keep_from
        );
    }
    prop_assert_eq!(report.records, records.len() as u64);

    // The repaired log takes new records, and replays cleanly.
    wal.append(b"after crash").unwrap();
    wal.commit().unwrap();
    drop(wal);
    let (_wal, again, report) = open_sim(&image, options).unwrap();
    prop_assert_eq!(report.torn_tail, None);
    prop_assert_eq!(&again[..records.len()], &records[..]);
    prop_assert_eq!(again.last().map(Vec::as_slice), Some(&b"after crash"[..]));
    Ok(())
}

proptest! {
    // 512 cases: about 2 s in a debug build. Failures are saved next to this
    // file and replayed first.
    #![proptest_config(ProptestConfig {
        cases: 512,
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
            "proptest-regressions",
        ))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn crash_recovers_a_prefix_including_every_durable_record(
        ops in proptest::collection::vec(op(), 1..80),
        power_cut in proptest::option::of(0u64..150),
        seed in any::<u64>(),
        segment_max in prop_oneof![Just(64u64 << 20), 48u64..1200],
        zero_fill in prop_oneof![
            1 => Just(0u64),
            3 => 1u64..3000,
            1 => Just(ZERO_FILL_AHEAD_BYTES),
        ],
    ) {
        run(&ops, power_cut, seed, segment_max, zero_fill)?;
    }
}

#[test]
fn crash_with_nothing_synced_is_an_empty_log() {
    let sim = SimStorage::new();
    let (mut wal, _, _) = open_sim(&sim, WalOptions::default()).unwrap();
    wal.append(b"a").unwrap();
    wal.write().unwrap();
    drop(wal);
    for seed in 0..32 {
        let (_wal, records, _) = open_sim(&sim.crash_image(seed), WalOptions::default()).unwrap();
        assert!(
            records.is_empty() || records == vec![b"a".to_vec()],
            "{records:?}"
        );
    }
}

#[test]
fn crash_while_the_first_segment_is_created() {
    for nth in 0..6 {
        let sim = SimStorage::new();
        sim.inject(Fault::PowerCut { nth });
        let opened = Wal::open_with_storage(
            std::sync::Arc::new(sim.clone()),
            sim_dir(),
            WalOptions::default(),
        )
        .and_then(spool_wal::Recovery::collect_records);
        if opened.is_ok() {
            continue;
        }
        for seed in 0..8 {
            let (_wal, records, _) =
                open_sim(&sim.crash_image(seed), WalOptions::default()).unwrap();
            assert!(records.is_empty());
        }
    }
}
