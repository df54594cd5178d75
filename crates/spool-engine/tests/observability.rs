//! The engine's operating surface: per-queue counters move exactly when
//! their event happens, the wait/run/skew histograms see the right
//! durations, snapshots show queues and sessions as they are, counters of a
//! freed tube survive its return, and a graceful shutdown refuses puts and
//! never lets a reserve block.
#![allow(clippy::unwrap_used)]

use bytes::Bytes;
use spool_engine::{
    ConnId, Engine, EngineConfig, EngineSnapshot, JobState, QueueCounters, QueueSnapshot,
    SnapshotScope, SNAPSHOT_RESERVED_IDS_MAX,
};
use spool_proto::{Put, PutBody, Request, Response, TubeName};

const SEC: u64 = 1_000_000_000;
const MS: u64 = 1_000_000;

fn engine() -> Engine {
    Engine::new(EngineConfig {
        max_job_size: 1 << 16,
    })
}

fn put(pri: u32, delay_secs: u32, ttr_secs: u32) -> Request {
    Request::Put(Put {
        pri,
        delay_secs,
        ttr_secs,
        body: PutBody::Complete(Bytes::from_static(b"job")),
    })
}

fn tube(name: &str) -> TubeName {
    TubeName::new(name.as_bytes()).unwrap()
}

/// Runs one request at `now`, ticks, and returns the replies for `conn`.
fn run(e: &mut Engine, conn: ConnId, request: Request, now: u64) -> Vec<Response> {
    e.execute(conn, request, now);
    e.tick(now);
    replies_for(e, conn)
}

fn replies_for(e: &mut Engine, conn: ConnId) -> Vec<Response> {
    e.take_replies()
        .into_iter()
        .filter(|(c, _)| *c == conn)
        .map(|(_, r)| r)
        .collect()
}

fn put_id(e: &mut Engine, conn: ConnId, request: Request, now: u64) -> u64 {
    match run(e, conn, request, now).as_slice() {
        [Response::Inserted(id)] => *id,
        other => panic!("put answered {other:?}"),
    }
}

fn reserve_id(e: &mut Engine, conn: ConnId, now: u64) -> u64 {
    match run(e, conn, Request::Reserve, now).as_slice() {
        [Response::Reserved { id, .. }] => *id,
        other => panic!("reserve answered {other:?}"),
    }
}

fn queue<'a>(snapshot: &'a EngineSnapshot, name: &str) -> &'a QueueSnapshot {
    snapshot
        .queues
        .iter()
        .find(|q| q.name == name)
        .unwrap_or_else(|| panic!("no queue {name} in {snapshot:?}"))
}

fn counters(e: &Engine, name: &str, now: u64) -> QueueCounters {
    queue(&e.snapshot(now, SnapshotScope::Full), name).counters
}

#[test]
fn each_counter_moves_with_its_event_only() {
    let mut e = engine();
    e.connect(1);
    let mut now = SEC;
    let mut expected = QueueCounters::default();
    assert_eq!(counters(&e, "default", now), expected);

    let a = put_id(&mut e, 1, put(10, 0, 60), now);
    let b = put_id(&mut e, 1, put(20, 0, 60), now);
    expected.put = 2;
    assert_eq!(counters(&e, "default", now), expected);

    assert_eq!(reserve_id(&mut e, 1, now), a);
    expected.reserved = 1;
    assert_eq!(counters(&e, "default", now), expected);

    assert_eq!(
        run(
            &mut e,
            1,
            Request::Release {
                id: a,
                pri: 10,
                delay_secs: 0
            },
            now
        ),
        vec![Response::Released]
    );
    expected.released = 1;
    assert_eq!(counters(&e, "default", now), expected);

    // A refused release, delete or bury (not reserved by us) counts nothing.
    assert_eq!(
        run(
            &mut e,
            1,
            Request::Release {
                id: b,
                pri: 1,
                delay_secs: 0
            },
            now
        ),
        vec![Response::NotFound]
    );
    assert_eq!(
        run(&mut e, 1, Request::Bury { id: b, pri: 1 }, now),
        vec![Response::NotFound]
    );
    assert_eq!(
        run(&mut e, 1, Request::Delete(999), now),
        vec![Response::NotFound]
    );
    assert_eq!(counters(&e, "default", now), expected);

    assert_eq!(reserve_id(&mut e, 1, now), a);
    assert_eq!(
        run(&mut e, 1, Request::Bury { id: a, pri: 10 }, now),
        vec![Response::Buried]
    );
    expected.reserved = 2;
    expected.buried = 1;
    assert_eq!(counters(&e, "default", now), expected);

    assert_eq!(
        run(&mut e, 1, Request::Kick { bound: 5 }, now),
        vec![Response::Kicked(1)]
    );
    expected.kicked = 1;
    assert_eq!(counters(&e, "default", now), expected);

    // TTR expiry: reserve b with a 1 s TTR... b has 60 s; put a short one.
    let c = put_id(&mut e, 1, put(0, 0, 1), now);
    expected.put = 3;
    assert_eq!(reserve_id(&mut e, 1, now), c);
    expected.reserved = 3;
    assert_eq!(counters(&e, "default", now), expected);
    now += 2 * SEC;
    e.tick(now);
    expected.timed_out = 1;
    assert_eq!(counters(&e, "default", now), expected);
    assert_eq!(e.stats().job_timeouts, 1);

    // Deletes of a ready job (not reserved) count too.
    assert_eq!(
        run(&mut e, 1, Request::Delete(c), now),
        vec![Response::Deleted]
    );
    expected.deleted = 1;
    assert_eq!(counters(&e, "default", now), expected);

    // reserve-job counts as a reservation.
    e.execute(1, Request::ReserveJob(b), now);
    e.tick(now);
    assert!(matches!(
        replies_for(&mut e, 1).as_slice(),
        [Response::Reserved { id, .. }] if *id == b
    ));
    expected.reserved = 4;
    assert_eq!(counters(&e, "default", now), expected);

    // A refused put counts nothing.
    e.set_draining(true);
    assert_eq!(run(&mut e, 1, put(0, 0, 1), now), vec![Response::Draining]);
    assert_eq!(counters(&e, "default", now), expected);
    e.check_invariants();
}

#[test]
fn kick_counts_every_job_kicked_in_its_own_queue() {
    let mut e = engine();
    e.connect(1);
    let now = SEC;
    assert_eq!(
        run(&mut e, 1, Request::Use(tube("k")), now),
        vec![Response::Using(tube("k"))]
    );
    for _ in 0..3 {
        put_id(&mut e, 1, put(0, 100, 60), now);
    }
    assert_eq!(
        run(&mut e, 1, Request::Kick { bound: 2 }, now),
        vec![Response::Kicked(2)]
    );
    let id = put_id(&mut e, 1, put(0, 100, 60), now);
    assert_eq!(
        run(&mut e, 1, Request::KickJob(id), now),
        vec![Response::KickedJob]
    );
    assert_eq!(counters(&e, "k", now).kicked, 3);
    assert_eq!(counters(&e, "default", now).kicked, 0);
    assert_eq!(counters(&e, "k", now).put, 4);
    // Kicked jobs did not wait for their due time: no skew observed.
    assert_eq!(
        queue(&e.snapshot(now, SnapshotScope::Full), "k")
            .skew
            .count(),
        0
    );
}

#[test]
fn histograms_measure_wait_run_and_skew() {
    let mut e = engine();
    e.connect(1);
    let t0 = 10 * SEC;
    let a = put_id(&mut e, 1, put(0, 0, 600), t0);
    // Ready for 3 s, then reserved: wait 3 s.
    assert_eq!(reserve_id(&mut e, 1, t0 + 3 * SEC), a);
    // Reserved for 40 ms, then deleted: run 40 ms.
    assert_eq!(
        run(&mut e, 1, Request::Delete(a), t0 + 3 * SEC + 40 * MS),
        vec![Response::Deleted]
    );
    let s = e.snapshot(t0 + 4 * SEC, SnapshotScope::Full);
    let q = queue(&s, "default");
    assert_eq!(q.wait.count(), 1);
    assert_eq!(q.wait.sum_observed(), 3 * SEC);
    assert_eq!(q.run.count(), 1);
    assert_eq!(q.run.sum_observed(), 40 * MS);
    assert_eq!(q.skew.count(), 0);

    // A delayed job due at t1 + 5 s, made ready by a tick 250 ms late.
    let t1 = 20 * SEC;
    let b = put_id(&mut e, 1, put(0, 5, 600), t1);
    e.tick(t1 + 5 * SEC + 250 * MS);
    let q = queue(&e.snapshot(t1 + 6 * SEC, SnapshotScope::Full), "default").clone();
    assert_eq!(q.skew.count(), 1);
    assert_eq!(q.skew.sum_observed(), 250 * MS);
    let p99 = q.skew.quantile(0.99).unwrap();
    assert!((0.1..=0.25).contains(&p99), "{p99}");
    // Its wait starts when it became ready, not when it was put.
    assert_eq!(reserve_id(&mut e, 1, t1 + 7 * SEC), b);
    let q = queue(&e.snapshot(t1 + 7 * SEC, SnapshotScope::Full), "default").clone();
    assert_eq!(q.wait.count(), 2);
    assert_eq!(
        q.wait.sum_observed(),
        3 * SEC + (7 * SEC - 5 * SEC - 250 * MS)
    );

    // A released job's wait restarts at the release; a job handed to an
    // already blocked reserver waited 0.
    assert_eq!(
        run(
            &mut e,
            1,
            Request::Release {
                id: b,
                pri: 0,
                delay_secs: 0
            },
            t1 + 8 * SEC
        ),
        vec![Response::Released]
    );
    assert_eq!(reserve_id(&mut e, 1, t1 + 9 * SEC), b);
    e.connect(2);
    e.execute(2, Request::Reserve, t1 + 9 * SEC);
    assert!(e.is_waiting(2));
    let c = put_id(&mut e, 1, put(0, 0, 600), t1 + 10 * SEC);
    let q = queue(&e.snapshot(t1 + 10 * SEC, SnapshotScope::Full), "default").clone();
    assert_eq!(q.wait.count(), 4);
    assert_eq!(q.wait.sum_observed(), 3 * SEC + 1_750 * MS + SEC);
    assert_eq!(
        e.job(c).map(|j| j.state),
        Some(spool_engine::JobState::Reserved)
    );

    // A buried job's wait starts at its kick, not at its bury.
    assert_eq!(
        run(&mut e, 2, Request::Bury { id: c, pri: 0 }, t1 + 11 * SEC),
        vec![Response::Buried]
    );
    assert_eq!(
        run(&mut e, 1, Request::KickJob(c), t1 + 20 * SEC),
        vec![Response::KickedJob]
    );
    assert_eq!(reserve_id(&mut e, 2, t1 + 21 * SEC), c);
    let q = queue(&e.snapshot(t1 + 21 * SEC, SnapshotScope::Full), "default").clone();
    assert_eq!(q.wait.count(), 5);
    assert_eq!(q.wait.sum_observed(), 3 * SEC + 1_750 * MS + SEC + SEC);
    e.check_invariants();
}

#[test]
fn snapshot_shows_queues_and_sessions() {
    let mut e = engine();
    e.connect(1);
    e.connect(2);
    let now = 5 * SEC;
    run(&mut e, 1, Request::Use(tube("jobs")), now);
    put_id(&mut e, 1, put(0, 0, 60), now); // ready, urgent
    put_id(&mut e, 1, put(2000, 0, 60), now); // ready
    put_id(&mut e, 1, put(0, 30, 60), now); // delayed
    let buried = put_id(&mut e, 1, put(0, 0, 60), now);
    run(&mut e, 2, Request::Watch(tube("jobs")), now);
    run(&mut e, 2, Request::Ignore(tube("default")), now);
    // Reserve the urgent ones in id order: the first, then `buried`.
    let first = reserve_id(&mut e, 2, now);
    assert_eq!(reserve_id(&mut e, 2, now), buried);
    run(&mut e, 2, Request::Bury { id: buried, pri: 0 }, now);
    // Session 1 blocks on `default`, which is empty.
    e.execute(
        1,
        Request::ReserveWithTimeout {
            timeout_secs: Some(100),
        },
        now,
    );
    assert!(e.is_waiting(1));
    run(
        &mut e,
        2,
        Request::PauseTube {
            tube: tube("jobs"),
            delay_secs: 60,
        },
        now,
    );

    let later = now + 2 * SEC;
    let s = e.snapshot(later, SnapshotScope::Full);
    assert_eq!(s.now_ns, later);
    assert_eq!(s.jobs_total, 4);
    assert!(!s.draining && !s.shutting_down && !s.storage_failed && !s.disk_full);
    assert_eq!(s.next_job_id, 5);
    assert_eq!(s.server.current_jobs_ready, 1);
    let names: Vec<&str> = s.queues.iter().map(|q| q.name.as_str()).collect();
    assert_eq!(names, ["default", "jobs"]);
    let jobs = queue(&s, "jobs");
    assert_eq!(
        (
            jobs.ready,
            jobs.urgent,
            jobs.reserved,
            jobs.delayed,
            jobs.buried
        ),
        (1, 0, 1, 1, 1)
    );
    assert_eq!((jobs.using, jobs.watching), (1, 1));
    assert!(jobs.paused);
    assert_eq!(jobs.total_jobs, 4);
    assert_eq!(jobs.counters.put, 4);
    let default = queue(&s, "default");
    assert_eq!(default.waiting_reservers, 1);
    assert!(!default.paused);

    assert_eq!(s.sessions.len(), 2);
    let one = &s.sessions[0];
    assert_eq!(one.conn_id, 1);
    assert_eq!(one.tube_used, "jobs");
    assert_eq!(one.watched, ["default"]);
    assert!(one.reserved_job_ids.is_empty());
    assert_eq!(one.reserved_count, 0);
    assert_eq!(one.blocked_in_reserve_ns, Some(2 * SEC));
    let two = &s.sessions[1];
    assert_eq!(two.conn_id, 2);
    assert_eq!(two.tube_used, "default");
    assert_eq!(two.watched, ["jobs"]);
    assert_eq!(two.reserved_job_ids, [first]);
    assert_eq!(two.reserved_count, 1);
    assert_eq!(two.blocked_in_reserve_ns, None);

    // After the pause ends the queue is not paused, tick or no tick.
    assert!(!queue(&e.snapshot(now + 61 * SEC, SnapshotScope::Full), "jobs").paused);
}

#[test]
fn snapshot_lists_a_bounded_number_of_reserved_ids() {
    let mut e = engine();
    e.connect(1);
    let now = SEC;
    let total = SNAPSHOT_RESERVED_IDS_MAX + 5;
    let mut ids = Vec::new();
    for _ in 0..total {
        put_id(&mut e, 1, put(0, 0, 600), now);
        ids.push(reserve_id(&mut e, 1, now));
    }
    let s = e.snapshot(now, SnapshotScope::Full);
    let session = &s.sessions[0];
    assert_eq!(session.reserved_count, total as u64);
    assert_eq!(session.reserved_job_ids, ids[..SNAPSHOT_RESERVED_IDS_MAX]);
}

#[test]
fn a_queues_snapshot_leaves_sessions_out_and_keeps_the_rest() {
    let mut e = engine();
    e.connect(1);
    e.connect(2);
    let now = SEC;
    put_id(&mut e, 1, put(0, 0, 600), now);
    reserve_id(&mut e, 2, now);
    let full = e.snapshot(now, SnapshotScope::Full);
    assert_eq!(full.sessions.len(), 2);
    let queues = e.snapshot(now, SnapshotScope::Queues);
    assert!(queues.sessions.is_empty());
    // Everything else is the same picture.
    assert_eq!(
        EngineSnapshot {
            sessions: Vec::new(),
            ..full
        },
        queues
    );
}

#[test]
fn counters_of_a_freed_tube_come_back_with_it() {
    let mut e = engine();
    e.connect(1);
    let now = SEC;
    run(&mut e, 1, Request::Use(tube("brief")), now);
    put_id(&mut e, 1, put(0, 0, 60), now);
    run(&mut e, 1, Request::Watch(tube("brief")), now);
    let id = reserve_id(&mut e, 1, now + SEC);
    run(&mut e, 1, Request::Delete(id), now + 2 * SEC);
    let before = queue(&e.snapshot(now, SnapshotScope::Queues), "brief").clone();
    assert_eq!(before.wait.count(), 1);
    assert_eq!(before.run.count(), 1);
    // Leaving the tube frees it: beanstalkd forgets idle tubes.
    run(&mut e, 1, Request::Ignore(tube("brief")), now);
    run(&mut e, 1, Request::Use(tube("default")), now);
    let s = e.snapshot(now, SnapshotScope::Queues);
    assert!(s.queues.iter().all(|q| q.name != "brief"));
    let retired = s.retired_queues.iter().find(|q| q.name == "brief").unwrap();
    assert_eq!(retired.counters, before.counters);
    assert_eq!(retired.counters.put, 1);
    assert_eq!(retired.counters.reserved, 1);
    assert_eq!(retired.counters.deleted, 1);

    // Back again: the counters continue where they were; the histograms,
    // which a retired tube does not keep, start empty.
    run(&mut e, 1, Request::Use(tube("brief")), now);
    put_id(&mut e, 1, put(0, 0, 60), now);
    let s = e.snapshot(now, SnapshotScope::Queues);
    assert!(s.retired_queues.iter().all(|q| q.name != "brief"));
    let back = queue(&s, "brief");
    assert_eq!(back.counters.put, 2);
    assert_eq!(back.counters.reserved, 1);
    assert_eq!(back.counters.deleted, 1);
    assert_eq!(back.wait.count() + back.run.count() + back.skew.count(), 0);
    e.check_invariants();
}

#[test]
fn retired_tubes_are_bounded_oldest_forgotten_first() {
    let mut e = engine();
    e.connect(1);
    let now = SEC;
    let total = spool_engine::RETIRED_QUEUES_MAX + 3;
    for i in 0..total {
        run(&mut e, 1, Request::Use(tube(&format!("t{i}"))), now);
        let id = put_id(&mut e, 1, put(0, 0, 60), now);
        run(&mut e, 1, Request::Delete(id), now);
    }
    // A tube that saw no job leaves nothing behind.
    run(&mut e, 1, Request::Use(tube("never-used")), now);
    run(&mut e, 1, Request::Use(tube("default")), now);
    let s = e.snapshot(now, SnapshotScope::Full);
    assert_eq!(s.retired_queues.len(), spool_engine::RETIRED_QUEUES_MAX);
    assert!(s.retired_queues.iter().all(|q| q.name != "never-used"));
    // Every tN was freed when the next name was used, t0 first: the three
    // oldest are forgotten.
    for i in 0..3 {
        let name = format!("t{i}");
        assert!(s.retired_queues.iter().all(|q| q.name != name), "{name}");
    }
    assert_eq!(s.retired_queues[0].name, "t3");
    assert_eq!(
        s.retired_queues.last().map(|q| q.name.clone()),
        Some(format!("t{}", total - 1))
    );
}

#[test]
fn shutdown_refuses_puts_and_never_blocks_a_reserve() {
    let mut e = engine();
    e.connect(1);
    e.connect(2);
    e.connect(3);
    let now = SEC;
    let held = put_id(&mut e, 1, put(0, 0, 5), now);
    assert_eq!(reserve_id(&mut e, 1, now), held);
    e.execute(2, Request::Reserve, now);
    e.execute(
        3,
        Request::ReserveWithTimeout {
            timeout_secs: Some(1000),
        },
        now,
    );
    assert!(e.is_waiting(2) && e.is_waiting(3));
    assert!(e.take_replies().is_empty());

    e.begin_shutdown();
    assert!(e.is_shutting_down());
    // Both blocked reserves end now.
    assert_eq!(
        e.take_replies(),
        vec![(2, Response::TimedOut), (3, Response::TimedOut)]
    );
    assert!(!e.is_waiting(2) && !e.is_waiting(3));

    // New reserves answer at once, even with a job ready.
    let ready = {
        e.set_draining(false);
        e.connect(4);
        e.execute(4, Request::Use(tube("default")), now);
        e.take_replies();
        e.job_count()
    };
    assert_eq!(ready, 1);
    assert_eq!(
        run(&mut e, 2, Request::Reserve, now),
        vec![Response::TimedOut]
    );
    assert_eq!(
        run(
            &mut e,
            3,
            Request::ReserveWithTimeout { timeout_secs: None },
            now
        ),
        vec![Response::TimedOut]
    );
    // Puts are refused, whatever SIGUSR1 drain says.
    assert_eq!(run(&mut e, 2, put(0, 0, 5), now), vec![Response::Draining]);
    assert!(e.snapshot(now, SnapshotScope::Full).draining);
    assert!(e.snapshot(now, SnapshotScope::Full).shutting_down);
    assert!(e.stats().draining);

    // The holder can still finish its job; TTR expiry still works.
    assert_eq!(e.reserved_count(1), 1);
    assert_eq!(
        run(&mut e, 1, Request::Touch(held), now),
        vec![Response::Touched]
    );
    e.tick(now + 10 * SEC);
    assert_eq!(e.reserved_count(1), 0);
    assert_eq!(counters(&e, "default", now + 10 * SEC).timed_out, 1);
    assert_eq!(
        run(&mut e, 1, Request::Delete(held), now + 10 * SEC),
        vec![Response::Deleted]
    );
    e.check_invariants();
}

/// The job API's counters: failed attempts (a worker's fail and a lease
/// expiry of a job with an attempt limit), dead letters (not a bury by
/// hand), cancels and completions; kept when the queue's tube is freed.
#[test]
fn job_model_counters_count_their_events_and_outlive_the_tube() {
    use spool_broker::{Lease, NewJob, Op, Outcome};
    let mut e = engine();
    let q = tube("jobs");
    let mut now = SEC;
    let enqueue = |e: &mut Engine, max_attempts: u32, now: u64| {
        let job = NewJob {
            payload: Bytes::from_static(b"1"),
            ttr_ms: Some(1_000),
            max_attempts: Some(max_attempts),
            ..NewJob::default()
        };
        let op = Op::Enqueue {
            queue: q.clone(),
            job,
        };
        e.apply(op, now).unwrap().into_job().unwrap().id
    };
    let reserve = |e: &mut Engine, now: u64| -> Lease {
        let op = Op::Reserve {
            queues: vec![q.clone()],
            batch: 1,
            timeout_ms: 0,
        };
        match e.apply(op, now).unwrap() {
            Outcome::Leased(mut leased) => leased.pop().unwrap().lease,
            other => panic!("reserve answered {other:?}"),
        }
    };
    let a = enqueue(&mut e, 2, now);
    reserve(&mut e, now);
    // The lease expires: a failed attempt, retried after its backoff.
    now += 2 * SEC;
    e.tick(now);
    let mut expected = QueueCounters {
        put: 1,
        reserved: 1,
        timed_out: 1,
        failed: 1,
        ..QueueCounters::default()
    };
    assert_eq!(counters(&e, "jobs", now), expected);
    e.apply(Op::Kick { id: a }, now).unwrap();
    let lease = reserve(&mut e, now);
    let fail = Op::Fail {
        lease,
        error: "no".into(),
        retry_in_ms: None,
        permanent: false,
    };
    assert_eq!(
        e.apply(fail, now).unwrap().into_job().unwrap().state,
        JobState::Buried
    );
    expected.kicked = 1;
    expected.reserved = 2;
    expected.failed = 2;
    expected.buried = 1;
    expected.dead_lettered = 1;
    assert_eq!(counters(&e, "jobs", now), expected);
    // Buried by hand: no dead letter.
    let b = enqueue(&mut e, 5, now);
    let bury = Op::Bury {
        id: b,
        lease: None,
        reason: None,
    };
    e.apply(bury, now).unwrap();
    expected.put = 2;
    expected.buried = 2;
    assert_eq!(counters(&e, "jobs", now), expected);
    let cancel = |id| Op::Cancel {
        id,
        expected_version: None,
    };
    e.apply(cancel(a), now).unwrap();
    e.apply(Op::Kick { id: b }, now).unwrap();
    let lease = reserve(&mut e, now);
    let complete = Op::Complete {
        lease,
        result: None,
    };
    e.apply(complete, now).unwrap();
    expected.cancelled = 1;
    expected.kicked = 2;
    expected.reserved = 3;
    expected.completed = 1;
    expected.deleted = 1;
    // Every job is final: the tube is freed, its counters kept.
    let snapshot = e.snapshot(now, SnapshotScope::Queues);
    assert!(snapshot.queues.iter().all(|q| q.name != "jobs"));
    let retired = snapshot.retired_queues.iter().find(|r| r.name == "jobs");
    assert_eq!(retired.unwrap().counters, expected);
}
