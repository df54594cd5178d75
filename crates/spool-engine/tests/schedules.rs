//! Schedules in the engine, driven directly: the orders of operations and
//! timers a broker round can produce, which the conformance suite (one
//! operation at a time) cannot arrange.

use spool_broker::{
    JobState, JobView, Misfire, NewJob, Op, Outcome, QueueName, ScheduleSpec, ScheduleView,
};
use spool_engine::limits::SCHEDULE_FIRE_AHEAD_MS;
use spool_engine::{
    Engine, EngineConfig, FiringAhead, LogRecord, SCHEDULE_TIMERS_PER_TICK_MAX, TIMERS_PER_TICK_MAX,
};

const NS_PER_MS: u64 = 1_000_000;
/// 2026-12-04T00:00:00Z in wall-clock ms.
const START_MS: u64 = 1_796_342_400_000;

fn name(text: &str) -> QueueName {
    QueueName::new(text.as_bytes()).expect("a valid name")
}

fn engine() -> Engine {
    let mut engine = Engine::new(EngineConfig {
        max_job_size: 1 << 16,
    });
    engine.set_epoch_ns(START_MS * NS_PER_MS);
    engine.enable_logging();
    engine
}

fn spec(cron: &str) -> ScheduleSpec {
    ScheduleSpec {
        cron: cron.into(),
        timezone: "UTC".into(),
        queue: name("q"),
        job: NewJob::default(),
        misfire: Misfire::All,
        catch_up_max: 100,
        jitter_ms: 0,
        max_backlog: None,
        paused: false,
    }
}

fn at(ms: u64) -> u64 {
    (ms - START_MS) * NS_PER_MS
}

fn view(engine: &mut Engine, op: Op, now_ms: u64) -> ScheduleView {
    match engine.apply(op, at(now_ms)).expect("op") {
        Outcome::Schedule { schedule, .. } => *schedule,
        other => panic!("a schedule, not {other:?}"),
    }
}

fn ready(engine: &mut Engine, now_ms: u64) -> usize {
    match engine
        .apply(
            Op::List {
                queue: name("q"),
                state: JobState::Ready,
                after: None,
                limit: 1_000,
            },
            at(now_ms),
        )
        .expect("list")
    {
        Outcome::Page(page) => page.jobs.len(),
        other => panic!("a page, not {other:?}"),
    }
}

#[test]
fn replaced_while_due_and_not_yet_fired_fires_that_instant_once() {
    let mut e = engine();
    let put = |spec| Op::PutSchedule {
        name: name("s"),
        spec: Box::new(spec),
    };
    let made = view(&mut e, put(spec("@every 10s")), START_MS);
    let due = made.next_fire_at_ms.expect("armed");
    // The round at the due instant runs the replace before its timers.
    let replaced = view(&mut e, put(spec("@every 10s")), due);
    assert_eq!(replaced.next_fire_at_ms, Some(due), "still due");
    e.tick(at(due));
    assert_eq!(ready(&mut e, due), 1);
    // And again, replaced in the round that already fired it: not again.
    let again = view(&mut e, put(spec("@every 10s")), due);
    assert_eq!(again.next_fire_at_ms, Some(due + 10_000));
    e.tick(at(due));
    assert_eq!(ready(&mut e, due), 1);
    let view = view(&mut e, Op::GetSchedule { name: name("s") }, due);
    assert_eq!((view.fires, view.last_fire_at_ms), (1, Some(due)));
}

#[test]
fn a_firing_is_one_log_batch_with_the_schedules_state() {
    let mut e = engine();
    let made = view(
        &mut e,
        Op::PutSchedule {
            name: name("s"),
            spec: Box::new(spec("@every 1s")),
        },
        START_MS,
    );
    let mut log = Vec::new();
    e.drain_log_into(&mut log);
    let due = made.next_fire_at_ms.expect("armed");
    // Late by 2.5 s: three instants, all fired (misfire all), in one batch;
    // then the next instant, 0.5 s away, is made ahead in a batch of its
    // own.
    e.tick(at(due + 2_500));
    log.clear();
    e.drain_log_into(&mut log);
    assert_eq!(log.len(), 2, "{log:?}");
    let LogRecord::Batch(records) = &log[0] else {
        panic!("a batch, not {:?}", log[0]);
    };
    let jobs = records
        .iter()
        .filter(|r| matches!(r, LogRecord::Job(_)))
        .count();
    assert_eq!(jobs, 3);
    match records.last() {
        Some(LogRecord::Schedule(record)) => {
            let view = &record.view;
            assert_eq!(view.fires, 3);
            assert_eq!(view.last_fire_at_ms, Some(due + 2_000));
            assert_eq!(view.next_fire_at_ms, Some(due + 3_000));
            assert_eq!(record.ahead, None);
        }
        other => panic!("the schedule's state last, not {other:?}"),
    }
    let LogRecord::Batch(records) = &log[1] else {
        panic!("a batch, not {:?}", log[1]);
    };
    let made = match &records[..] {
        [LogRecord::Job(job), LogRecord::Schedule(record)] => {
            assert_eq!(record.view.fires, 3, "not counted before its instant");
            assert_eq!(record.view.next_fire_at_ms, Some(due + 3_000));
            job.job.id
        }
        other => panic!("the job made ahead and the state naming it, not {other:?}"),
    };
    match &records[1] {
        LogRecord::Schedule(record) => assert_eq!(
            record.ahead,
            Some(FiringAhead {
                due_ms: due + 3_000,
                job: made
            })
        ),
        other => panic!("{other:?}"),
    }
    // The job made ahead is the next timer.
    assert_eq!(e.next_wake(), Some(at(due + 3_000)));
}

#[test]
fn replay_restores_schedules_and_their_timer() {
    let mut e = engine();
    view(
        &mut e,
        Op::PutSchedule {
            name: name("s"),
            spec: Box::new(spec("@every 1s")),
        },
        START_MS,
    );
    e.tick(at(START_MS + 1_000));
    let mut log = Vec::new();
    e.drain_log_into(&mut log);
    // A new process, started 5 s later, replays the log.
    let mut replayed = Engine::new(EngineConfig {
        max_job_size: 1 << 16,
    });
    replayed.set_epoch_ns((START_MS + 5_000) * NS_PER_MS);
    for record in log {
        replayed.replay(record).expect("replay");
    }
    // Due instants 2 s ..= 5 s were missed while down: due at once.
    assert_eq!(replayed.next_wake(), Some(0));
    replayed.tick(0);
    match replayed
        .apply(Op::GetSchedule { name: name("s") }, 0)
        .expect("get")
    {
        Outcome::Schedule { schedule, .. } => {
            assert_eq!(schedule.fires, 1 + 4, "misfire all catches up 2 s ..= 5 s");
            assert_eq!(schedule.last_fire_at_ms, Some(START_MS + 5_000));
        }
        other => panic!("{other:?}"),
    }
}

/// Many schedules due on one instant fire in batches: a tick stops after
/// `SCHEDULE_TIMERS_PER_TICK_MAX` firings and says the rest are due, and
/// the next call fires the next batch at its own `now`, which is the skew
/// that batch shows (due → ready, not due → the first call).
#[test]
fn schedules_due_together_fire_in_batches_each_measured_when_it_fires() {
    let mut e = engine();
    let batch = SCHEDULE_TIMERS_PER_TICK_MAX;
    let count = 2 * batch + 10;
    let schedule = |i: usize| name(&format!("s{i:04}"));
    for i in 0..count {
        let put = Op::PutSchedule {
            name: schedule(i),
            spec: Box::new(spec("@every 1s")),
        };
        view(&mut e, put, START_MS);
    }
    let due = START_MS + 1_000;
    // Ticking first at the due instant (no chance to fire ahead): each
    // batch fires late, and the rest stay due.
    let made_ahead_at = due - SCHEDULE_FIRE_AHEAD_MS;
    assert_eq!(e.tick(at(due)), Some(at(made_ahead_at)), "more are due");
    assert_eq!(ready(&mut e, due), batch);
    assert_eq!(e.tick(at(due + 2)), Some(at(made_ahead_at)));
    assert_eq!(ready(&mut e, due + 2), 2 * batch);
    assert_eq!(
        e.tick(at(due + 4)),
        Some(at(due + 1_000 - SCHEDULE_FIRE_AHEAD_MS)),
        "all fired; the next instant is made ahead"
    );
    assert_eq!(ready(&mut e, due + 4), count);
    let skew_ms = |e: &mut Engine, i: usize| {
        view(e, Op::GetSchedule { name: schedule(i) }, due + 4).last_skew_ms
    };
    assert_eq!(skew_ms(&mut e, 0), Some(0));
    assert_eq!(skew_ms(&mut e, batch), Some(2));
    assert_eq!(skew_ms(&mut e, count - 1), Some(4));
}

// ---- fire ahead --------------------------------------------------------

fn put(e: &mut Engine, schedule: &str, spec: ScheduleSpec, now_ms: u64) -> ScheduleView {
    let op = Op::PutSchedule {
        name: name(schedule),
        spec: Box::new(spec),
    };
    view(e, op, now_ms)
}

fn get(e: &mut Engine, schedule: &str, now_ms: u64) -> ScheduleView {
    view(
        e,
        Op::GetSchedule {
            name: name(schedule),
        },
        now_ms,
    )
}

fn jobs_in(e: &mut Engine, queue: &str, state: JobState, now_ms: u64) -> Vec<JobView> {
    match e
        .apply(
            Op::List {
                queue: name(queue),
                state,
                after: None,
                limit: 1_000,
            },
            at(now_ms),
        )
        .expect("list")
    {
        Outcome::Page(page) => page.jobs,
        other => panic!("a page, not {other:?}"),
    }
}

/// A new process replaying `e`'s log so far, its clock at `now_ms`.
fn restart(e: &mut Engine, log: &mut Vec<LogRecord>) -> Engine {
    e.drain_log_into(log);
    let mut replayed = Engine::new(EngineConfig {
        max_job_size: 1 << 16,
    });
    replayed.set_epoch_ns(START_MS * NS_PER_MS);
    for record in log.iter().cloned() {
        replayed.replay(record).expect("replay");
    }
    replayed.enable_logging();
    replayed.check_invariants();
    replayed
}

#[test]
fn a_firing_is_made_ahead_and_its_instant_only_makes_it_ready() {
    let mut e = engine();
    let made = put(&mut e, "s", spec("@every 10s"), START_MS);
    let due = made.next_fire_at_ms.expect("armed");
    let ahead_at = due - SCHEDULE_FIRE_AHEAD_MS;
    assert_eq!(e.next_wake(), Some(at(ahead_at)));
    e.tick(at(ahead_at - 1));
    assert!(jobs_in(&mut e, "q", JobState::Delayed, ahead_at - 1).is_empty());
    e.tick(at(ahead_at));
    let delayed = jobs_in(&mut e, "q", JobState::Delayed, ahead_at);
    assert_eq!(delayed.len(), 1, "made ahead, delayed until the instant");
    assert_eq!(
        delayed[0].idempotency_key.as_deref(),
        Some(format!("schedule:s:{due}").as_str())
    );
    // Not done before its instant.
    let before = get(&mut e, "s", due - 1);
    assert_eq!(
        (before.fires, before.last_fire_at_ms, before.last_job),
        (0, None, None)
    );
    assert_eq!(before.next_fire_at_ms, Some(due));
    assert_eq!(before.version, made.version);
    // The instant's only timer is the delayed job's.
    assert_eq!(e.next_wake(), Some(at(due)));
    e.tick(at(due));
    let ready_jobs = jobs_in(&mut e, "q", JobState::Ready, due);
    assert_eq!(ready_jobs.len(), 1);
    assert_eq!(ready_jobs[0].id, delayed[0].id);
    let after = get(&mut e, "s", due);
    assert_eq!(
        (after.fires, after.last_fire_at_ms, after.last_job),
        (1, Some(due), Some(delayed[0].id))
    );
    assert_eq!(after.next_fire_at_ms, Some(due + 10_000));
    assert_eq!(after.last_skew_ms, Some(0));
    // Logged settled half a lead after the instant, with nothing made ahead.
    let mut log = Vec::new();
    e.drain_log_into(&mut log);
    assert_eq!(e.next_wake(), Some(at(due + SCHEDULE_FIRE_AHEAD_MS)));
    e.tick(at(due + SCHEDULE_FIRE_AHEAD_MS));
    log.clear();
    e.drain_log_into(&mut log);
    match &log[..] {
        [LogRecord::Schedule(record)] => {
            assert_eq!(record.ahead, None);
            assert_eq!(record.view, after);
        }
        other => panic!("the settled state, not {other:?}"),
    }
    e.check_invariants();
}

/// Thousands of schedules due on one instant are made ahead in batches;
/// at the instant they all become ready in one tick, none late.
#[test]
fn schedules_due_together_are_made_ahead_in_batches_and_ready_on_time() {
    let mut e = engine();
    let count = 2 * SCHEDULE_TIMERS_PER_TICK_MAX + 10;
    for i in 0..count {
        put(&mut e, &format!("s{i:04}"), spec("@every 1s"), START_MS);
    }
    let due = START_MS + 1_000;
    let ahead_at = due - SCHEDULE_FIRE_AHEAD_MS;
    let mut now = ahead_at;
    while e.tick(at(now)).is_some_and(|wake| wake <= at(now)) {
        now += 1;
    }
    assert_eq!(now, ahead_at + 2, "three batches");
    assert_eq!(jobs_in(&mut e, "q", JobState::Delayed, now).len(), count);
    assert_eq!(e.next_wake(), Some(at(due)));
    e.tick(at(due));
    assert_eq!(jobs_in(&mut e, "q", JobState::Ready, due).len(), count);
    // Their schedules' books follow (the first tick's timers were spent).
    while e.tick(at(due)).is_some_and(|wake| wake <= at(due)) {}
    for i in [0, count - 1] {
        let view = get(&mut e, &format!("s{i:04}"), due);
        assert_eq!((view.fires, view.last_skew_ms), (1, Some(0)));
    }
    e.check_invariants();
}

#[test]
fn pause_delete_and_replace_take_back_a_firing_made_ahead() {
    let mut e = engine();
    let mut made = spec("@every 10s");
    made.job.payload = "old".into();
    let due = put(&mut e, "paused", made.clone(), START_MS)
        .next_fire_at_ms
        .expect("armed");
    put(&mut e, "deleted", made.clone(), START_MS);
    put(&mut e, "replaced", made.clone(), START_MS);
    put(&mut e, "triggered", made.clone(), START_MS);
    let now = due - 100;
    e.tick(at(now));
    assert_eq!(jobs_in(&mut e, "q", JobState::Delayed, now).len(), 4);
    let paused = view(
        &mut e,
        Op::PauseSchedule {
            name: name("paused"),
        },
        now,
    );
    assert_eq!((paused.next_fire_at_ms, paused.fires), (None, 0));
    e.apply(
        Op::DeleteSchedule {
            name: name("deleted"),
        },
        at(now),
    )
    .expect("delete");
    let mut new_spec = made.clone();
    new_spec.job.payload = "new".into();
    let replaced = put(&mut e, "replaced", new_spec, now);
    assert_eq!(replaced.next_fire_at_ms, Some(due), "the instant stays due");
    let triggered = view(
        &mut e,
        Op::TriggerSchedule {
            name: name("triggered"),
        },
        now,
    );
    assert_eq!(triggered.next_fire_at_ms, Some(due));
    // The paused and deleted schedules' jobs are gone; the replaced one's
    // is made again from the new spec in the next tick.
    e.tick(at(now));
    let delayed = jobs_in(&mut e, "q", JobState::Delayed, now);
    let payloads: Vec<_> = delayed.iter().map(|j| j.payload.clone()).collect();
    assert_eq!(payloads, ["old", "new"], "triggered's, then replaced's");
    e.tick(at(due));
    let fired = jobs_in(&mut e, "q", JobState::Ready, due);
    let mut keyed: Vec<_> = fired
        .iter()
        .map(|j| {
            (
                j.idempotency_key.clone().unwrap_or_default(),
                j.payload.clone(),
            )
        })
        .collect();
    keyed.sort();
    assert_eq!(
        keyed,
        [
            (format!("schedule:replaced:{due}"), "new".into()),
            (format!("schedule:triggered:{now}"), "old".into()),
            (format!("schedule:triggered:{due}"), "old".into()),
        ]
    );
    assert_eq!(get(&mut e, "paused", due).fires, 0);
    assert_eq!(get(&mut e, "replaced", due).fires, 1);
    assert_eq!(get(&mut e, "triggered", due).fires, 2);
    // Replayed, the log says the same.
    let mut log = Vec::new();
    let mut replayed = restart(&mut e, &mut log);
    replayed.tick(at(due));
    assert_eq!(jobs_in(&mut replayed, "q", JobState::Ready, due).len(), 3);
    assert_eq!(jobs_in(&mut replayed, "q", JobState::Delayed, due).len(), 0);
    assert_eq!(get(&mut replayed, "paused", due).next_fire_at_ms, None);
    e.check_invariants();
}

/// The misfire policies, each the name of a schedule and of its queue.
const POLICIES: [(&str, Misfire); 3] = [
    ("skip", Misfire::Skip),
    ("once", Misfire::Once),
    ("all", Misfire::All),
];

/// Puts one schedule `@every 10s` per policy of [`POLICIES`]; returns
/// their first instant (the same for all).
fn put_one_per_policy(e: &mut Engine) -> u64 {
    let mut due = 0;
    for (schedule, misfire) in POLICIES {
        let mut s = spec("@every 10s");
        s.queue = name(schedule);
        s.misfire = misfire;
        due = put(e, schedule, s, START_MS)
            .next_fire_at_ms
            .expect("armed");
    }
    due
}

/// Killed with a firing made ahead: restarted before its instant, the
/// instant fires once, from the job already made; restarted long after
/// it, the misfire policy decides as for an instant not made ahead.
#[test]
fn a_firing_made_ahead_survives_a_restart_once_and_meets_the_misfire_policy() {
    let mut e = engine();
    let due = put_one_per_policy(&mut e);
    e.tick(at(due - 100));
    let mut log = Vec::new();
    // Back before the instant: the job made ahead is the firing.
    let mut soon = restart(&mut e, &mut log);
    let view = get(&mut soon, "skip", due - 50);
    assert_eq!((view.fires, view.next_fire_at_ms), (0, Some(due)));
    soon.tick(at(due));
    for (schedule, _) in POLICIES {
        let ready = jobs_in(&mut soon, schedule, JobState::Ready, due);
        assert_eq!(ready.len(), 1, "{schedule}");
        assert_eq!(
            ready[0].idempotency_key.as_deref(),
            Some(format!("schedule:{schedule}:{due}").as_str())
        );
        assert_eq!(get(&mut soon, schedule, due).fires, 1);
    }
    // Back 55.5 s after the instant: instants due ..= due + 50 s were
    // missed, the latest 5.5 s ago (past the grace).
    let late = due + 55_500;
    let mut e2 = restart(&mut e, &mut log);
    e2.tick(at(late));
    let keys = |e: &mut Engine, queue: &str| -> Vec<String> {
        let mut jobs = jobs_in(e, queue, JobState::Ready, late);
        jobs.extend(jobs_in(e, queue, JobState::Delayed, late));
        jobs.iter()
            .map(|j| j.idempotency_key.clone().unwrap_or_default())
            .collect()
    };
    assert_eq!(
        keys(&mut e2, "skip"),
        Vec::<String>::new(),
        "skip fires none"
    );
    assert_eq!(
        keys(&mut e2, "once"),
        [format!("schedule:once:{}", due + 50_000)],
        "once: the latest only"
    );
    assert_eq!(
        keys(&mut e2, "all").len(),
        6,
        "all: every missed instant, the one made ahead among them"
    );
    assert_eq!(keys(&mut e2, "all")[0], format!("schedule:all:{due}"));
    let counts = |e: &mut Engine, s: &str| {
        let v = get(e, s, late);
        (v.fires, v.misfires_skipped, v.next_fire_at_ms)
    };
    let next = Some(due + 60_000);
    assert_eq!(counts(&mut e2, "skip"), (0, 6, next));
    assert_eq!(counts(&mut e2, "once"), (1, 5, next));
    assert_eq!(counts(&mut e2, "all"), (6, 0, next));
    e2.check_invariants();
    // And the outcome is durable: a second restart fires nothing more.
    let mut log2 = log.clone();
    let mut e3 = restart(&mut e2, &mut log2);
    e3.tick(at(late));
    assert_eq!(keys(&mut e3, "all").len(), 6);
    assert_eq!(keys(&mut e3, "skip").len(), 0);
    assert_eq!(counts(&mut e3, "skip"), (0, 6, next));
}

/// `max_backlog` is checked when the firing would be made ahead; a
/// schedule at its backlog fires (or skips) at the instant as before.
#[test]
fn max_backlog_is_checked_ahead_and_again_at_the_instant() {
    let mut e = engine();
    let mut s = spec("@every 10s");
    s.max_backlog = Some(1);
    let due = put(&mut e, "s", s, START_MS)
        .next_fire_at_ms
        .expect("armed");
    e.tick(at(due - 100));
    assert_eq!(jobs_in(&mut e, "q", JobState::Delayed, due - 100).len(), 1);
    e.tick(at(due));
    // One ready job of the schedule waits: the next is not made ahead...
    let next = due + 10_000;
    e.tick(at(next - 100));
    assert!(jobs_in(&mut e, "q", JobState::Delayed, next - 100).is_empty());
    // ...and at its instant it is a backlog skip.
    e.tick(at(next));
    let view = get(&mut e, "s", next);
    assert_eq!((view.fires, view.backlog_skips), (1, 1));
    assert_eq!(jobs_in(&mut e, "q", JobState::Ready, next).len(), 1);
}

/// `jitter_ms` and the template's delay move the job, not the instant: the
/// firing counts at its instant, its job is ready later.
#[test]
fn a_jittered_firing_counts_at_its_instant_and_is_ready_after_it() {
    let mut e = engine();
    let mut s = spec("@every 10s");
    s.jitter_ms = 3_000;
    s.job.run_at = spool_broker::RunAt::DelayMs(2_000);
    let due = put(&mut e, "s", s, START_MS)
        .next_fire_at_ms
        .expect("armed");
    e.tick(at(due - 100));
    let job = jobs_in(&mut e, "q", JobState::Delayed, due - 100)
        .pop()
        .expect("made ahead");
    let ready_at = job.run_at_ms.expect("delayed");
    assert!(
        (due + 2_000..=due + 5_000).contains(&ready_at),
        "{ready_at}"
    );
    e.tick(at(due));
    assert_eq!(get(&mut e, "s", due).fires, 1);
    assert_eq!(jobs_in(&mut e, "q", JobState::Delayed, due).len(), 1);
    e.tick(at(ready_at));
    assert_eq!(jobs_in(&mut e, "q", JobState::Ready, ready_at).len(), 1);
    assert_eq!(get(&mut e, "s", ready_at).last_skew_ms, Some(0));
}

/// Delayed jobs due on one instant beyond `TIMERS_PER_TICK_MAX` become
/// ready in batches, each measured at the `now` it ran at.
#[test]
fn delayed_jobs_due_together_become_ready_in_batches_each_measured_when_it_runs() {
    let mut e = engine();
    let count = TIMERS_PER_TICK_MAX + 10;
    let due = START_MS + 1_000;
    let job = NewJob {
        run_at: spool_broker::RunAt::AtMs(due),
        ..NewJob::default()
    };
    let jobs: Vec<_> = (0..count).map(|_| (name("q"), job.clone())).collect();
    for chunk in jobs.chunks(500) {
        e.apply(
            Op::EnqueueBatch {
                jobs: chunk.to_vec(),
            },
            at(START_MS),
        )
        .expect("enqueue");
    }
    let queue = |e: &Engine, now_ms: u64| {
        let snapshot = e.snapshot(at(now_ms), spool_broker::SnapshotScope::Queues);
        snapshot
            .queues
            .into_iter()
            .find(|q| q.name == "q")
            .expect("queue")
    };
    assert_eq!(e.tick(at(due)), Some(at(due)), "more are due");
    assert_eq!(queue(&e, due).ready, TIMERS_PER_TICK_MAX as u64);
    assert_eq!(e.tick(at(due + 3)), None);
    let q = queue(&e, due + 3);
    assert_eq!(q.ready, count as u64);
    assert_eq!(q.skew.count(), count as u64);
    assert_eq!(q.skew.max(), Some(0.003), "the last batch ran 3 ms late");
}

/// At an instant, the jobs of firings made ahead become ready first, at the
/// cost of delayed jobs; their schedules' books (skew histogram, last skew)
/// follow once none due is waiting, and say the skew of the move, whenever
/// they run.
#[test]
fn an_instants_firings_are_all_ready_before_their_schedules_books() {
    let mut e = engine();
    let count = TIMERS_PER_TICK_MAX;
    for i in 0..count {
        put(&mut e, &format!("s{i:04}"), spec("@every 1s"), START_MS);
    }
    let due = START_MS + 1_000;
    let mut now = due - SCHEDULE_FIRE_AHEAD_MS;
    while e.tick(at(now)).is_some_and(|wake| wake <= at(now)) {
        now += 1;
    }
    assert_eq!(e.next_wake(), Some(at(due)));
    // One tick's worth of timers: every job moves; the books are left.
    assert_eq!(e.tick(at(due)), Some(at(due)), "the books are due");
    let snapshot = e.snapshot(at(due), spool_broker::SnapshotScope::Queues);
    let queue = snapshot.queues.iter().find(|q| q.name == "q");
    assert_eq!(queue.map(|q| q.ready), Some(count as u64));
    let last = format!("s{:04}", count - 1);
    assert_eq!(get(&mut e, &last, due).last_skew_ms, None, "not yet");
    // Done 7 ms later, they still say the move's skew: none.
    let books_at = due + 7;
    assert_eq!(
        e.tick(at(books_at)),
        Some(at(due + 1_000 - SCHEDULE_FIRE_AHEAD_MS))
    );
    for i in [0, count - 1] {
        let view = get(&mut e, &format!("s{i:04}"), books_at);
        assert_eq!((view.fires, view.last_skew_ms), (1, Some(0)));
    }
    let snapshot = e.snapshot(at(books_at), spool_broker::SnapshotScope::Queues);
    let skews: u64 = snapshot.schedules.iter().map(|s| s.skew.count()).sum();
    assert_eq!(skews, count as u64);
    assert!(snapshot.schedules.iter().all(|s| s.skew.max() == Some(0.0)));
    e.check_invariants();
}

/// A crash in the half second after an instant, before the schedule's
/// settled state is logged, and a restart past the grace: the server was
/// up at the instant and its job was ready, so under every policy the
/// firing counts as fired and its job stays.
#[test]
fn a_crash_just_after_an_instant_keeps_its_firing_whatever_the_policy() {
    let mut e = engine();
    let due = put_one_per_policy(&mut e);
    e.tick(at(due - SCHEDULE_FIRE_AHEAD_MS));
    e.tick(at(due));
    let crash_at = due + SCHEDULE_FIRE_AHEAD_MS / 2;
    e.tick(at(crash_at));
    for (schedule, _) in POLICIES {
        assert_eq!(
            jobs_in(&mut e, schedule, JobState::Ready, crash_at).len(),
            1
        );
    }
    let mut log = Vec::new();
    // Back 5 s after the instant (past the grace, before the next one).
    let back = due + 5_000;
    let mut e2 = restart(&mut e, &mut log);
    e2.tick(at(back));
    for (schedule, _) in POLICIES {
        let ready = jobs_in(&mut e2, schedule, JobState::Ready, back);
        assert_eq!(ready.len(), 1, "{schedule}: its job stays");
        assert_eq!(
            ready[0].idempotency_key.as_deref(),
            Some(format!("schedule:{schedule}:{due}").as_str())
        );
        let view = get(&mut e2, schedule, back);
        assert_eq!(
            (view.fires, view.misfires_skipped, view.last_fire_at_ms),
            (1, 0, Some(due)),
            "{schedule}"
        );
    }
    e2.check_invariants();
}

/// A drain (SIGTERM) refuses new jobs, schedules' included: a firing made
/// ahead before it began is a job already accepted (and logged), and
/// becomes ready at its instant like any delayed job; no firing is made
/// ahead while draining, and an instant that falls due is retried each
/// second (after a restart, it meets the misfire policy).
#[test]
fn a_drain_keeps_the_firing_made_before_it_and_makes_none_ahead() {
    let mut e = engine();
    let due = put(&mut e, "s", spec("@every 1s"), START_MS)
        .next_fire_at_ms
        .expect("armed");
    e.tick(at(due - SCHEDULE_FIRE_AHEAD_MS));
    assert_eq!(jobs_in(&mut e, "q", JobState::Delayed, due - 1).len(), 1);
    e.set_draining(true);
    e.tick(at(due));
    assert_eq!(jobs_in(&mut e, "q", JobState::Ready, due).len(), 1);
    let view = get(&mut e, "s", due);
    assert_eq!((view.fires, view.last_fire_at_ms), (1, Some(due)));
    // The next instant: not made ahead, not fired while draining.
    let next = due + 1_000;
    e.tick(at(next - SCHEDULE_FIRE_AHEAD_MS));
    assert!(jobs_in(&mut e, "q", JobState::Delayed, next).is_empty());
    e.tick(at(next));
    assert_eq!(jobs_in(&mut e, "q", JobState::Ready, next).len(), 1);
    let view = get(&mut e, "s", next);
    assert_eq!((view.fires, view.next_fire_at_ms), (1, Some(next)));
    e.check_invariants();
    // A drain called off: the retry a second later fires what fell due
    // (misfire `all`: both instants).
    e.set_draining(false);
    e.tick(at(next + 1_000));
    assert_eq!(jobs_in(&mut e, "q", JobState::Ready, next + 1_000).len(), 3);
    assert_eq!(get(&mut e, "s", next + 1_000).fires, 3);
    e.check_invariants();
}

/// A pass making firings ahead that runs late across their instant (the
/// server was starved) does not hold back the jobs it already made: they
/// become ready at the instant, before the schedules still to run, which
/// fire late.
#[test]
fn firings_made_ahead_are_not_held_back_by_a_late_pass_of_schedule_timers() {
    let mut e = engine();
    let batch = SCHEDULE_TIMERS_PER_TICK_MAX;
    for i in 0..2 * batch {
        put(&mut e, &format!("s{i:04}"), spec("@every 1s"), START_MS);
    }
    let due = START_MS + 1_000;
    // One batch is made ahead in time; the rest of the pass runs late.
    e.tick(at(due - SCHEDULE_FIRE_AHEAD_MS));
    assert_eq!(jobs_in(&mut e, "q", JobState::Delayed, due).len(), batch);
    let late = due + 40;
    e.tick(at(late));
    let snapshot = e.snapshot(at(late), spool_broker::SnapshotScope::Queues);
    let queue = snapshot.queues.iter().find(|q| q.name == "q");
    assert_eq!(
        queue.map(|q| (q.ready, q.delayed)),
        Some((2 * batch as u64, 0)),
        "the jobs made ahead moved, then the rest fired"
    );
    while e.tick(at(late)).is_some_and(|wake| wake <= at(late)) {}
    let skew = |e: &mut Engine, i: usize| get(e, &format!("s{i:04}"), late).last_skew_ms;
    assert_eq!(skew(&mut e, 0), Some(40), "made ahead, moved 40 ms late");
    assert_eq!(skew(&mut e, 2 * batch - 1), Some(40), "fired 40 ms late");
    e.check_invariants();
}
