//! The log is enough: replaying the records an engine logged (through their
//! byte form) rebuilds every job where a restarted server should find it —
//! same id, tube, priority and body; reserved jobs ready again; delayed jobs
//! due at the same time; buried jobs buried; attempts and versions as they
//! were — and nothing else.
//!
//! Also after a compaction: at a random cut, snapshots of the jobs live then
//! are written a few at a time while changes go on; the log from the cut on
//! (the old segments deleted) must rebuild the same jobs, and so must the
//! whole log (a crash before the old segments were deleted).

use std::collections::BTreeMap;

use bytes::Bytes;
use proptest::prelude::*;
use spool_engine::{Engine, EngineConfig, JobState, LogRecord};
use spool_proto::{Put, PutBody, Request, TubeName};

const SEC: u64 = 1_000_000_000;

#[derive(Debug, Clone)]
enum Op {
    Put {
        conn: u64,
        pri: u32,
        delay_secs: u32,
    },
    Use {
        conn: u64,
        tube: u8,
    },
    Reserve {
        conn: u64,
    },
    Release {
        conn: u64,
        pick: usize,
        delay_secs: u32,
    },
    Bury {
        conn: u64,
        pick: usize,
    },
    Delete {
        conn: u64,
        pick: usize,
    },
    Kick {
        conn: u64,
        bound: u32,
    },
    KickJob {
        pick: usize,
    },
    Disconnect {
        conn: u64,
    },
    Advance {
        ms: u64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let conn = 1..=3u64;
    prop_oneof![
        3 => (conn.clone(), 0..2000u32, prop_oneof![Just(0u32), 1..3u32])
            .prop_map(|(conn, pri, delay_secs)| Op::Put { conn, pri, delay_secs }),
        1 => (conn.clone(), 0..3u8).prop_map(|(conn, tube)| Op::Use { conn, tube }),
        3 => conn.clone().prop_map(|conn| Op::Reserve { conn }),
        1 => (conn.clone(), any::<usize>(), 0..3u32)
            .prop_map(|(conn, pick, delay_secs)| Op::Release { conn, pick, delay_secs }),
        1 => (conn.clone(), any::<usize>()).prop_map(|(conn, pick)| Op::Bury { conn, pick }),
        2 => (conn.clone(), any::<usize>()).prop_map(|(conn, pick)| Op::Delete { conn, pick }),
        1 => (conn.clone(), 0..4u32).prop_map(|(conn, bound)| Op::Kick { conn, bound }),
        1 => any::<usize>().prop_map(|pick| Op::KickJob { pick }),
        1 => conn.prop_map(|conn| Op::Disconnect { conn }),
        1 => (0..2500u64).prop_map(|ms| Op::Advance { ms }),
    ]
}

/// What a restarted server must find for one job.
#[derive(Debug, PartialEq, Eq)]
struct Expected {
    tube: String,
    pri: u32,
    state: JobState,
    due_ns: Option<u64>,
    body: Bytes,
    /// Failed attempts and the version survive a restart exactly.
    attempts: u32,
    version: u64,
}

fn resting(engine: &Engine) -> BTreeMap<u64, Expected> {
    engine
        .jobs()
        .map(|j| {
            // Reservations are not durable: a reserved job comes back ready.
            let state = match j.state {
                JobState::Reserved => JobState::Ready,
                s => s,
            };
            let expected = Expected {
                tube: engine.job_tube(j.id).expect("job has a tube").to_string(),
                pri: j.pri,
                state,
                due_ns: (state == JobState::Delayed).then_some(j.deadline_at_ns),
                body: j.body.clone(),
                attempts: j.attempts,
                version: j.version,
            };
            (j.id, expected)
        })
        .collect()
}

fn pick(ids: &[u64], pick: usize) -> u64 {
    if ids.is_empty() {
        999
    } else {
        ids[pick % ids.len()]
    }
}

proptest! {
    #[test]
    fn replaying_the_log_restores_every_job(
        ops in prop::collection::vec(op(), 1..150),
        cut_at in any::<prop::sample::Index>(),
        snapshots_per_op in 1..4usize,
    ) {
        let config = EngineConfig { max_job_size: 1000 };
        let mut engine = Engine::new(config.clone());
        engine.enable_logging();
        let mut now = 0;
        for conn in 1..=3 {
            engine.connect(conn);
        }
        let mut log = Vec::new();
        let mut body_seq = 0u32;
        let cut_at = cut_at.index(ops.len());
        let mut cut: Option<usize> = None;
        let mut to_snapshot: Vec<u64> = Vec::new();
        for (step, op) in ops.into_iter().enumerate() {
            if step == cut_at {
                engine.drain_log_into(&mut log);
                cut = Some(log.len());
                log.push(engine.next_id_record());
                to_snapshot = engine.jobs().map(|j| j.id).collect();
            }
            for _ in 0..snapshots_per_op {
                if let Some(id) = to_snapshot.pop() {
                    engine.drain_log_into(&mut log);
                    if let Some(record) = engine.snapshot_record(id) {
                        log.push(record);
                    }
                }
            }
            let ids: Vec<u64> = engine.jobs().map(|j| j.id).collect();
            let (conn, request) = match op {
                Op::Put { conn, pri, delay_secs } => {
                    body_seq += 1;
                    (conn, Request::Put(Put {
                        pri,
                        delay_secs,
                        ttr_secs: 1,
                        body: PutBody::Complete(Bytes::from(format!("job {body_seq}"))),
                    }))
                }
                Op::Use { conn, tube } => {
                    let name = ["default", "a", "b"][tube as usize];
                    (conn, Request::Use(TubeName::try_from(name).expect("valid")))
                }
                Op::Reserve { conn } => (conn, Request::ReserveWithTimeout { timeout_secs: Some(0) }),
                Op::Release { conn, pick: p, delay_secs } => {
                    (conn, Request::Release { id: pick(&ids, p), pri: 7, delay_secs })
                }
                Op::Bury { conn, pick: p } => (conn, Request::Bury { id: pick(&ids, p), pri: 9 }),
                Op::Delete { conn, pick: p } => (conn, Request::Delete(pick(&ids, p))),
                Op::Kick { conn, bound } => (conn, Request::Kick { bound }),
                Op::KickJob { pick: p } => (1, Request::KickJob(pick(&ids, p))),
                Op::Disconnect { conn } => {
                    engine.disconnect(conn, now);
                    engine.connect(conn);
                    continue;
                }
                Op::Advance { ms } => {
                    now += ms * 1_000_000;
                    engine.tick(now);
                    continue;
                }
            };
            if engine.is_waiting(conn) {
                continue;
            }
            engine.execute(conn, request, now);
            engine.tick(now);
            engine.take_replies();
        }
        engine.drain_log_into(&mut log);
        for id in to_snapshot {
            if let Some(record) = engine.snapshot_record(id) {
                log.push(record);
            }
        }
        let compacted = log[cut.unwrap_or(0)..].to_vec();
        let expected = resting(&engine);
        // Ids are never reused: the restarted engine hands out no id it
        // handed out before, even ids of jobs compacted away. (Ids spent on
        // puts that were never logged, such as a put with a bad body, are
        // not promised.)
        let logged_max = log
            .iter()
            .filter_map(|r| match r {
                LogRecord::Put(job) => Some(job.id),
                _ => None,
            })
            .max()
            .unwrap_or(0);
        for (name, log) in [("whole log", log), ("log from the cut", compacted)] {
            let (jobs, next_id) = replay(log, now)?;
            prop_assert_eq!(&jobs, &expected, "{}", name);
            prop_assert!(next_id > logged_max, "{}: next id {} after {}", name, next_id, logged_max);
        }
    }
}

fn replay(log: Vec<LogRecord>, now: u64) -> Result<(BTreeMap<u64, Expected>, u64), TestCaseError> {
    {
        let config = EngineConfig { max_job_size: 1000 };
        // Through bytes, as the write-ahead log stores them, and read back by
        // a process that started at the same instant.
        let epoch = 1_000 * SEC;
        let mut restarted = Engine::new(config);
        for record in log {
            let mut bytes = Vec::new();
            record.encode(epoch, &mut bytes);
            let decoded = LogRecord::decode(&bytes, epoch).expect("decodes");
            prop_assert_eq!(&decoded, &record);
            restarted.replay(decoded).expect("replays");
        }
        // A restarted server runs its timers at once: delays that ended
        // before the restart are over.
        restarted.tick(now);
        restarted.check_invariants();
        Ok((resting(&restarted), restarted.next_job_id()))
    }
}
