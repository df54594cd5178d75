//! Schedules under random orders of operations, timers, hand-made changes
//! to their jobs, drains and restarts: the engine's invariants hold after
//! every step (the schedules' timers and the map of firings made ahead
//! among them), no instant is ever fired twice, and a restart finds the
//! schedules' counts as they were and every job (perhaps more: firings the
//! old process had put off).

use proptest::prelude::*;
use spool_broker::{
    JobChange, JobState, JobView, Misfire, NewJob, Op, Outcome, QueueName, RunAt, ScheduleSpec,
    ScheduleView,
};
use spool_engine::{Engine, EngineConfig, LogRecord};

const NS_PER_MS: u64 = 1_000_000;
/// 2026-12-04T00:00:00Z in wall-clock ms.
const START_MS: u64 = 1_796_342_400_000;
const SCHEDULES: u8 = 3;

#[derive(Debug, Clone)]
enum Step {
    Put {
        schedule: u8,
        every_s: u64,
        misfire: u8,
        jitter_ms: u64,
        delay_ms: u64,
    },
    Pause(u8),
    Resume(u8),
    Delete(u8),
    Trigger(u8),
    /// A job of the queue, picked among the delayed ones.
    Kick(usize),
    DeleteJob(usize),
    MoveJob(usize, u64),
    /// The clock moves on by this many ms; timers run.
    Advance(u64),
    Drain(bool),
    /// A crash now, and a restart this many ms later.
    Restart(u64),
}

fn step() -> impl Strategy<Value = Step> {
    let schedule = 0..SCHEDULES;
    prop_oneof![
        3 => (
            schedule.clone(),
            prop::sample::select(vec![1u64, 2, 10]),
            0..3u8,
            prop::sample::select(vec![0u64, 300]),
            prop::sample::select(vec![0u64, 700, 2_500]),
        )
            .prop_map(|(schedule, every_s, misfire, jitter_ms, delay_ms)| Step::Put {
                schedule,
                every_s,
                misfire,
                jitter_ms,
                delay_ms,
            }),
        1 => schedule.clone().prop_map(Step::Pause),
        1 => schedule.clone().prop_map(Step::Resume),
        1 => schedule.clone().prop_map(Step::Delete),
        1 => schedule.prop_map(Step::Trigger),
        1 => (0..4usize).prop_map(Step::Kick),
        1 => (0..4usize).prop_map(Step::DeleteJob),
        1 => ((0..4usize), (0..3_000u64)).prop_map(|(pick, ms)| Step::MoveJob(pick, ms)),
        8 => prop::sample::select(vec![1u64, 100, 250, 499, 500, 501, 999, 1_000, 1_700, 4_000])
            .prop_map(Step::Advance),
        1 => any::<bool>().prop_map(Step::Drain),
        1 => prop::sample::select(vec![0u64, 300, 5_000]).prop_map(Step::Restart),
    ]
}

fn name(text: &str) -> QueueName {
    QueueName::new(text.as_bytes()).expect("a valid name")
}

fn schedule_name(i: u8) -> QueueName {
    name(&format!("s{i}"))
}

fn fresh() -> Engine {
    let mut engine = Engine::new(EngineConfig {
        max_job_size: 1 << 16,
    });
    engine.set_epoch_ns(START_MS * NS_PER_MS);
    engine
}

/// Every job of the schedules' queue, by id: (state, key).
fn jobs(e: &mut Engine, now: u64) -> Vec<(u64, JobState, Option<String>)> {
    let mut all: Vec<JobView> = Vec::new();
    for state in [
        JobState::Ready,
        JobState::Delayed,
        JobState::Reserved,
        JobState::Buried,
        JobState::Completed,
        JobState::Cancelled,
    ] {
        let mut after = None;
        loop {
            let op = Op::List {
                queue: name("q"),
                state,
                after,
                limit: 1_000,
            };
            let page = match e.apply(op, now) {
                Ok(Outcome::Page(page)) => page,
                other => panic!("a page, not {other:?}"),
            };
            after = page.jobs.last().map(|j| j.id);
            let done = page.jobs.len() < 1_000;
            all.extend(page.jobs);
            if done {
                break;
            }
        }
    }
    let mut jobs: Vec<_> = all
        .into_iter()
        .map(|j| (j.id, j.state, j.idempotency_key))
        .collect();
    jobs.sort_unstable_by_key(|j| j.0);
    jobs
}

fn schedules(e: &mut Engine, now: u64) -> Vec<ScheduleView> {
    match e.apply(Op::ListSchedules, now) {
        Ok(Outcome::Schedules(views)) => views,
        other => panic!("schedules, not {other:?}"),
    }
}

/// What a restart must keep of a schedule: name, fires, misfires skipped,
/// last and next instant.
type Counts = (String, u64, u64, Option<u64>, Option<u64>);

fn counts(views: &[ScheduleView]) -> Vec<Counts> {
    views
        .iter()
        .map(|v| {
            (
                v.name.clone(),
                v.fires,
                v.misfires_skipped,
                v.last_fire_at_ms,
                v.next_fire_at_ms,
            )
        })
        .collect()
}

fn delayed_pick(e: &mut Engine, now: u64, pick: usize) -> Option<u64> {
    let delayed: Vec<_> = jobs(e, now)
        .into_iter()
        .filter(|j| j.1 == JobState::Delayed)
        .collect();
    (!delayed.is_empty()).then(|| delayed[pick % delayed.len()].0)
}

/// Runs every timer due at `now`.
fn settle(e: &mut Engine, now: u64) {
    // Bounded: each call runs timers or says none is due.
    for _ in 0..10_000 {
        if e.tick(now).is_none_or(|wake| wake > now) {
            break;
        }
    }
    assert!(e.next_wake().is_none_or(|wake| wake > now), "timers left");
}

fn run(steps: Vec<Step>) {
    let mut e = fresh();
    e.enable_logging();
    let mut log: Vec<LogRecord> = Vec::new();
    let mut now_ms = START_MS;
    let mut draining = false;
    for step in steps {
        let now = (now_ms - START_MS) * NS_PER_MS;
        match step {
            Step::Put {
                schedule,
                every_s,
                misfire,
                jitter_ms,
                delay_ms,
            } => {
                let spec = ScheduleSpec {
                    cron: format!("@every {every_s}s"),
                    timezone: "UTC".into(),
                    queue: name("q"),
                    job: NewJob {
                        run_at: if delay_ms == 0 {
                            RunAt::Now
                        } else {
                            RunAt::DelayMs(delay_ms)
                        },
                        ..NewJob::default()
                    },
                    misfire: [Misfire::Skip, Misfire::Once, Misfire::All][misfire as usize],
                    catch_up_max: 5,
                    jitter_ms,
                    max_backlog: None,
                    paused: false,
                };
                let _ = e.apply(
                    Op::PutSchedule {
                        name: schedule_name(schedule),
                        spec: Box::new(spec),
                    },
                    now,
                );
            }
            Step::Pause(s) => {
                let _ = e.apply(
                    Op::PauseSchedule {
                        name: schedule_name(s),
                    },
                    now,
                );
            }
            Step::Resume(s) => {
                let _ = e.apply(
                    Op::ResumeSchedule {
                        name: schedule_name(s),
                    },
                    now,
                );
            }
            Step::Delete(s) => {
                let _ = e.apply(
                    Op::DeleteSchedule {
                        name: schedule_name(s),
                    },
                    now,
                );
            }
            Step::Trigger(s) => {
                let _ = e.apply(
                    Op::TriggerSchedule {
                        name: schedule_name(s),
                    },
                    now,
                );
            }
            Step::Kick(pick) => {
                if let Some(id) = delayed_pick(&mut e, now, pick) {
                    let _ = e.apply(Op::Kick { id }, now);
                }
            }
            Step::DeleteJob(pick) => {
                if let Some(id) = delayed_pick(&mut e, now, pick) {
                    let _ = e.apply(
                        Op::Delete {
                            id,
                            expected_version: None,
                        },
                        now,
                    );
                }
            }
            Step::MoveJob(pick, ms) => {
                if let Some(id) = delayed_pick(&mut e, now, pick) {
                    let change = JobChange {
                        run_at: Some(RunAt::DelayMs(ms)),
                        ..JobChange::default()
                    };
                    let _ = e.apply(
                        Op::Update {
                            id,
                            expected_version: None,
                            change,
                        },
                        now,
                    );
                }
            }
            Step::Advance(ms) => {
                now_ms += ms;
                settle(&mut e, (now_ms - START_MS) * NS_PER_MS);
            }
            Step::Drain(on) => {
                draining = on;
                e.set_draining(on);
            }
            Step::Restart(later_ms) => {
                // The crash comes after this moment's timers ran.
                settle(&mut e, now);
                let before_jobs = jobs(&mut e, now);
                let before = counts(&schedules(&mut e, now));
                e.drain_log_into(&mut log);
                let mut replayed = fresh();
                for record in log.iter().cloned() {
                    replayed.replay(record).expect("replay");
                }
                replayed.enable_logging();
                replayed.set_draining(draining);
                replayed.check_invariants();
                if later_ms == 0 {
                    assert_eq!(counts(&schedules(&mut replayed, now)), before);
                }
                now_ms += later_ms;
                let now = (now_ms - START_MS) * NS_PER_MS;
                // The restarted server runs its own timers (jobs whose delay
                // passed become ready: that is not logged).
                settle(&mut replayed, now);
                e = replayed;
                // Every job that had left the delay timer is still there
                // (reservations are not logged: a reserved job is back
                // ready). A delayed one may go only if its instant passed
                // while the server was down (the misfire policy); the
                // restarted server may have fired what the old one put off
                // (refused while it was draining, say).
                let after: Vec<_> = jobs(&mut e, now).into_iter().map(|j| (j.0, j.2)).collect();
                for job in &before_jobs {
                    let kept = after.contains(&(job.0, job.2.clone()));
                    assert!(
                        kept || (later_ms > 0 && job.1 == JobState::Delayed),
                        "{job:?} lost"
                    );
                }
            }
        }
        e.check_invariants();
        // No instant fired twice: one job per firing key.
        let now = (now_ms - START_MS) * NS_PER_MS;
        let mut keys: Vec<String> = jobs(&mut e, now).into_iter().filter_map(|j| j.2).collect();
        let count = keys.len();
        keys.sort_unstable();
        keys.dedup();
        assert_eq!(keys.len(), count, "a firing key twice");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1_000))]

    #[test]
    fn schedules_keep_their_invariants_through_any_order_of_events(
        steps in prop::collection::vec(step(), 1..60)
    ) {
        run(steps);
    }
}
