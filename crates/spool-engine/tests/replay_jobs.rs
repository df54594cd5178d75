//! Every field of the job model survives a restart: random job-API
//! operations (enqueue with options and keys, batches, reserves, heartbeats,
//! completions with results, failures with backoff, releases, burials,
//! kicks, cancellations, updates, deletes, policies, pauses) while time
//! passes; then the log, through its byte form, must rebuild every job as a
//! restarted server shows it — also from a compaction taken at a random
//! point — and so must the whole log.

use std::collections::BTreeMap;

use bytes::Bytes;
use proptest::prelude::*;
use spool_broker::{
    Backoff, JobChange, JobState, JobView, Lease, NewJob, Op, Outcome, QueueName, QueuePolicy,
    RunAt,
};
use spool_engine::{Engine, EngineConfig, LogRecord};

const MS: u64 = 1_000_000;
const EPOCH_NS: u64 = 1_577_836_800_000_000_000;

#[derive(Debug, Clone)]
enum Step {
    Enqueue {
        queue: u8,
        delay_ms: u64,
        max_attempts: u32,
        key: Option<u8>,
        headers: bool,
    },
    Batch {
        count: u8,
    },
    Reserve {
        queue: u8,
        batch: u32,
    },
    Heartbeat(usize),
    Complete(usize, bool),
    Fail(usize, bool),
    Release(usize, u64),
    Bury(usize),
    Kick(usize),
    Cancel(usize),
    Update(usize, u32),
    Delete(usize),
    Policy {
        queue: u8,
        retention_max_jobs: u64,
    },
    Pause(u8, bool),
    Advance(u64),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (0..3u8, prop_oneof![Just(0u64), 1..3_000u64], 0..4u32, proptest::option::of(0..4u8), any::<bool>())
            .prop_map(|(queue, delay_ms, max_attempts, key, headers)| Step::Enqueue { queue, delay_ms, max_attempts, key, headers }),
        1 => (1..4u8).prop_map(|count| Step::Batch { count }),
        3 => (0..3u8, 1..4u32).prop_map(|(queue, batch)| Step::Reserve { queue, batch }),
        1 => any::<usize>().prop_map(Step::Heartbeat),
        2 => (any::<usize>(), any::<bool>()).prop_map(|(i, r)| Step::Complete(i, r)),
        2 => (any::<usize>(), any::<bool>()).prop_map(|(i, p)| Step::Fail(i, p)),
        1 => (any::<usize>(), 0..2_000u64).prop_map(|(i, d)| Step::Release(i, d)),
        1 => any::<usize>().prop_map(Step::Bury),
        1 => any::<usize>().prop_map(Step::Kick),
        1 => any::<usize>().prop_map(Step::Cancel),
        1 => (any::<usize>(), 0..10u32).prop_map(|(i, p)| Step::Update(i, p)),
        1 => any::<usize>().prop_map(Step::Delete),
        1 => (0..3u8, 1..4u64).prop_map(|(queue, retention_max_jobs)| Step::Policy { queue, retention_max_jobs }),
        1 => (0..3u8, any::<bool>()).prop_map(|(q, p)| Step::Pause(q, p)),
        3 => (1..4_000u64).prop_map(Step::Advance),
    ]
}

fn queue(n: u8) -> QueueName {
    QueueName::new(format!("q{n}").as_bytes()).expect("valid name")
}

fn new_job(i: usize, delay_ms: u64, max_attempts: u32, key: Option<u8>, headers: bool) -> NewJob {
    let mut h = BTreeMap::new();
    if headers {
        h.insert("trace".to_string(), format!("t{i}"));
    }
    NewJob {
        payload: Bytes::from(format!("{{\"n\":{i}}}")),
        priority: Some((i % 5) as u32),
        run_at: if delay_ms > 0 {
            RunAt::DelayMs(delay_ms)
        } else {
            RunAt::Now
        },
        ttr_ms: Some(1_000),
        max_attempts: Some(max_attempts),
        backoff: Some(Backoff {
            initial_ms: 100,
            max_ms: 5_000,
            multiplier: 2.0,
            jitter: 0.5,
        }),
        headers: h,
        idempotency_key: key.map(|k| format!("key-{k}")),
        idempotency_ttl_ms: Some(5_000),
        parents: BTreeMap::new(),
    }
}

/// What a restarted server shows: leases are gone (a reserved job is ready
/// again, at the version it had).
fn restarted_view(mut view: JobView) -> JobView {
    if view.state == JobState::Reserved {
        view.state = JobState::Ready;
        view.deadline_at_ms = None;
    }
    view
}

fn views(engine: &Engine, ids: u64) -> BTreeMap<u64, JobView> {
    (1..ids)
        .filter_map(|id| engine.view(id).map(|v| (id, restarted_view(v))))
        .collect()
}

fn replayed(records: &[LogRecord], now: u64) -> Engine {
    let mut engine = Engine::new(EngineConfig { max_job_size: 1000 });
    engine.set_epoch_ns(EPOCH_NS);
    engine.set_replay_now(now);
    for record in records {
        let mut bytes = Vec::new();
        record.encode(EPOCH_NS, &mut bytes);
        let decoded = LogRecord::decode(&bytes, EPOCH_NS).expect("a logged record decodes");
        engine.replay(decoded).expect("a logged record applies");
    }
    engine.tick(now);
    engine.check_invariants();
    engine
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn every_field_survives_a_restart(
        steps in prop::collection::vec(step(), 1..120),
        cut_at in any::<prop::sample::Index>(),
    ) {
        let mut engine = Engine::new(EngineConfig { max_job_size: 1000 });
        engine.set_epoch_ns(EPOCH_NS);
        engine.enable_logging();
        let mut now = 1_000 * MS;
        let mut log: Vec<LogRecord> = Vec::new();
        let mut leases: Vec<Lease> = Vec::new();
        let mut ids: Vec<u64> = Vec::new();
        // A compaction at a random step: its cut, then its snapshots.
        let cut = cut_at.index(steps.len());
        let mut compacted: Option<(usize, Vec<LogRecord>)> = None;
        for (i, step) in steps.into_iter().enumerate() {
            if i == cut {
                engine.drain_log_into(&mut log);
                let mut after_cut = engine.compaction_start_records();
                for id in engine.compaction_ids() {
                    after_cut.extend(engine.snapshot_record(id));
                }
                compacted = Some((log.len(), after_cut));
            }
            let pick_lease = |n: usize| (!leases.is_empty()).then(|| leases[n % leases.len()]);
            let pick_id = |n: usize| if ids.is_empty() { 999 } else { ids[n % ids.len()] };
            let op = match step {
                Step::Enqueue { queue: q, delay_ms, max_attempts, key, headers } => Some(Op::Enqueue {
                    queue: queue(q),
                    job: new_job(i, delay_ms, max_attempts, key, headers),
                }),
                Step::Batch { count } => Some(Op::EnqueueBatch {
                    jobs: (0..count).map(|n| (queue(n % 3), new_job(i * 10 + n as usize, 0, 2, None, true))).collect(),
                }),
                Step::Reserve { queue: q, batch } => Some(Op::Reserve { queues: vec![queue(q), queue((q + 1) % 3)], batch, timeout_ms: 0 }),
                Step::Heartbeat(n) => pick_lease(n).map(|lease| Op::Heartbeat { lease }),
                Step::Complete(n, with_result) => pick_lease(n).map(|lease| Op::Complete {
                    lease,
                    result: with_result.then(|| Bytes::from_static(b"\x00\xffresult")),
                }),
                Step::Fail(n, permanent) => pick_lease(n).map(|lease| Op::Fail {
                    lease, error: format!("error {i}"), retry_in_ms: None, permanent,
                }),
                Step::Release(n, delay_ms) => pick_lease(n).map(|lease| Op::Release { lease, delay_ms, priority: Some(9) }),
                Step::Bury(n) => Some(Op::Bury { id: pick_id(n), lease: None, reason: Some("by hand".into()) }),
                Step::Kick(n) => Some(Op::Kick { id: pick_id(n) }),
                Step::Cancel(n) => Some(Op::Cancel { id: pick_id(n), expected_version: None }),
                Step::Update(n, pri) => Some(Op::Update {
                    id: pick_id(n),
                    expected_version: None,
                    change: JobChange { priority: Some(pri), payload: Some(Bytes::from_static(b"changed")), ..JobChange::default() },
                }),
                Step::Delete(n) => Some(Op::Delete { id: pick_id(n), expected_version: None }),
                Step::Policy { queue: q, retention_max_jobs } => Some(Op::SetPolicy {
                    queue: queue(q),
                    policy: QueuePolicy { retention_max_jobs: Some(retention_max_jobs), max_attempts: Some(3), ..QueuePolicy::default() },
                }),
                Step::Pause(q, pause) => Some(if pause {
                    Op::Pause { queue: queue(q), duration_ms: Some(1_500) }
                } else {
                    Op::Resume { queue: queue(q) }
                }),
                Step::Advance(ms) => {
                    now += ms * MS;
                    engine.tick(now);
                    None
                }
            };
            if let Some(op) = op {
                match engine.apply(op, now) {
                    Ok(Outcome::Enqueued { job, .. }) => ids.push(job.id),
                    Ok(Outcome::Batch(jobs)) => ids.extend(jobs.iter().map(|j| j.id)),
                    Ok(Outcome::Leased(leased)) => leases.extend(leased.iter().map(|l| l.lease)),
                    _ => {}
                }
            }
            engine.tick(now);
            engine.check_invariants();
        }
        engine.drain_log_into(&mut log);
        let next_id = ids.iter().max().map_or(1, |m| m + 1);
        let expected = views(&engine, next_id);
        let whole = replayed(&log, now);
        prop_assert_eq!(&views(&whole, next_id), &expected, "whole log");
        if let Some((cut_len, mut after_cut)) = compacted {
            // The log from the cut on: the snapshot, then what came after it.
            after_cut.extend(log[cut_len..].iter().cloned());
            let from_cut = replayed(&after_cut, now);
            prop_assert_eq!(&views(&from_cut, next_id), &expected, "compacted log");
        }
    }
}
