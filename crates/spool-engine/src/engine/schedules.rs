//! Schedules in the engine: the ops, the timer and the firing.
//!
//! The semantics (rules, misfires, jitter, the fired job) are in
//! [`crate::schedule`], shared with the PostgreSQL broker; this file keeps
//! the state and makes it durable. Schedule instants are wall-clock
//! milliseconds; [`Engine::wall_ms`] and [`Engine::engine_ns`] are the one
//! place the engine's clock is converted.
//!
//! A firing enqueues its jobs through the job API's enqueue path and logs
//! the schedule's new state in the same [`LogRecord::Batch`]: after a
//! crash either both are replayed or neither, so an instant is never fired
//! twice nor lost (the firing key `schedule:<name>:<due ms>` guards the
//! rest).

use spool_broker::{
    BrokerError, Op, Outcome, ScheduleName, ScheduleSnapshot, ScheduleSpec, ScheduleView,
};

use super::*;
use crate::schedule::{self as rules, Rule};

/// A firing that could not enqueue because the engine refuses changes
/// (draining, a full disk, a failed log) is tried again this much later;
/// its instant stays due and meets the misfire policy if it waits too long.
const SCHEDULE_RETRY_MS: u64 = 1_000;

/// A schedule's state in memory.
#[derive(Debug)]
pub(super) struct Schedule {
    /// Everything durable (what the log records).
    pub(super) view: ScheduleView,
    /// `None` only for a replayed spec this build no longer accepts (a time
    /// zone gone from the tz database): it is kept and shown, never fired.
    rule: Option<Rule>,
    /// The wall-clock ms of its entry in `schedule_timers`, if any: its
    /// next due instant, or a retry.
    timer_at_ms: Option<u64>,
    /// Live jobs this schedule fired, for `max_backlog` (only kept for
    /// schedules that set it); filled from the jobs after a restart.
    fired: BTreeSet<JobId>,
    /// Due → fired, for `spool_schedule_fire_skew_seconds`.
    pub(super) skew: Histogram,
}

/// What one due instant came to.
enum Firing {
    Fired {
        job: JobId,
    },
    /// `max_backlog` ready jobs (or a full queue) were waiting.
    BacklogSkip,
    /// The job was refused for another reason (it cannot be enqueued as
    /// the queue is now set up): counted as a skip, never retried.
    Refused,
}

impl Engine {
    pub(super) fn schedule_op(&mut self, op: Op, now: u64) -> Result<Outcome, BrokerError> {
        let now_ms = self.wall_ms(now);
        match op {
            Op::PutSchedule { name, spec } => {
                self.check_writable(true)?;
                self.put_schedule(name, *spec, now_ms)
            }
            Op::GetSchedule { name } => Ok(self.schedule_outcome(&name, false)?),
            Op::ListSchedules => Ok(Outcome::Schedules(
                self.schedules.values().map(|s| s.view.clone()).collect(),
            )),
            Op::DeleteSchedule { name } => {
                self.check_writable(false)?;
                let removed = self.schedules.remove(&name).ok_or(BrokerError::NotFound)?;
                if let Some(at_ms) = removed.timer_at_ms {
                    self.schedule_timers.remove(&(at_ms, name.clone()));
                }
                self.record(|| LogRecord::ScheduleDeleted { name });
                Ok(Outcome::Done)
            }
            Op::PauseSchedule { name } => {
                self.check_writable(true)?;
                self.change_schedule(&name, now_ms, |s| {
                    s.view.spec.paused = true;
                    s.view.next_fire_at_ms = None;
                })?;
                self.schedule_outcome(&name, false)
            }
            Op::ResumeSchedule { name } => {
                self.check_writable(true)?;
                self.change_schedule(&name, now_ms, |s| {
                    if s.view.spec.paused {
                        s.view.spec.paused = false;
                        s.view.next_fire_at_ms = s.rule.as_ref().and_then(|r| {
                            rules::first_due(r, s.view.last_fire_at_ms, None, now_ms)
                        });
                    }
                })?;
                self.schedule_outcome(&name, false)
            }
            Op::TriggerSchedule { name } => {
                self.check_accepting()?;
                let spec = match self.schedules.get(&name) {
                    Some(s) => s.view.spec.clone(),
                    None => return Err(BrokerError::NotFound),
                };
                let job = rules::firing_job(name.as_str(), &spec, now_ms, 0);
                let prepared = self.prepare(&spec.queue, job, now)?;
                self.check_room(std::slice::from_ref(&prepared), now)?;
                let (job, _) = self.create(prepared, now);
                self.change_schedule(&name, now_ms, |s| {
                    s.view.fires += 1;
                    s.view.last_job = Some(job.id);
                    s.view.last_fire_at_ms = s.view.last_fire_at_ms.max(Some(now_ms));
                    if s.view.spec.max_backlog.is_some() {
                        s.fired.insert(job.id);
                    }
                })?;
                self.schedule_outcome(&name, false)
            }
            other => Err(BrokerError::Internal(format!(
                "not a schedule operation: {other:?}"
            ))),
        }
    }

    fn put_schedule(
        &mut self,
        name: ScheduleName,
        spec: ScheduleSpec,
        now_ms: u64,
    ) -> Result<Outcome, BrokerError> {
        let rule = rules::check_spec(&spec)?;
        let created = !self.schedules.contains_key(&name);
        let schedule = self
            .schedules
            .entry(name.clone())
            .or_insert_with(|| Schedule {
                view: ScheduleView {
                    name: name.as_str().to_owned(),
                    spec: spec.clone(),
                    next_fire_at_ms: None,
                    last_fire_at_ms: None,
                    last_job: None,
                    fires: 0,
                    misfires_skipped: 0,
                    backlog_skips: 0,
                    last_skew_ms: None,
                    created_at_ms: now_ms,
                    updated_at_ms: now_ms,
                    version: 0,
                },
                rule: None,
                timer_at_ms: None,
                fired: BTreeSet::new(),
                skew: Histogram::skew(),
            });
        // A replaced schedule keeps when it last fired and, if it was due
        // and not yet fired, stays due: no instant twice, none lost.
        let previous_next = schedule.view.next_fire_at_ms;
        let next = if spec.paused {
            None
        } else {
            rules::first_due(&rule, schedule.view.last_fire_at_ms, previous_next, now_ms)
        };
        if spec.max_backlog.is_none() {
            schedule.fired.clear();
        } else if schedule.view.spec.max_backlog.is_none() && !created {
            // Its earlier jobs were not tracked: find them once more.
            self.schedule_backlog_indexed = false;
        }
        schedule.view.spec = spec;
        schedule.rule = Some(rule);
        schedule.view.next_fire_at_ms = next;
        schedule.view.updated_at_ms = now_ms;
        schedule.view.version += 1;
        self.arm_schedule(&name, next);
        self.record_schedule(&name);
        Ok(Outcome::Schedule {
            schedule: Box::new(self.schedules[&name].view.clone()),
            created,
        })
    }

    fn schedule_outcome(&self, name: &ScheduleName, created: bool) -> Result<Outcome, BrokerError> {
        let schedule = self.schedules.get(name).ok_or(BrokerError::NotFound)?;
        Ok(Outcome::Schedule {
            schedule: Box::new(schedule.view.clone()),
            created,
        })
    }

    /// Applies `change` to a schedule, bumps its version, re-arms its timer
    /// and logs it.
    fn change_schedule(
        &mut self,
        name: &ScheduleName,
        now_ms: u64,
        change: impl FnOnce(&mut Schedule),
    ) -> Result<(), BrokerError> {
        let schedule = self.schedules.get_mut(name).ok_or(BrokerError::NotFound)?;
        change(schedule);
        schedule.view.updated_at_ms = now_ms;
        schedule.view.version += 1;
        let next = schedule.view.next_fire_at_ms;
        self.arm_schedule(name, next);
        self.record_schedule(name);
        Ok(())
    }

    /// Points the schedule's timer at `at_ms` (none: no timer).
    fn arm_schedule(&mut self, name: &ScheduleName, at_ms: Option<u64>) {
        let Some(schedule) = self.schedules.get_mut(name) else {
            return;
        };
        if let Some(old) = schedule.timer_at_ms.take() {
            self.schedule_timers.remove(&(old, name.clone()));
        }
        if let Some(at_ms) = at_ms {
            schedule.timer_at_ms = Some(at_ms);
            self.schedule_timers.insert((at_ms, name.clone()));
        }
    }

    fn record_schedule(&mut self, name: &ScheduleName) {
        if let Some(schedule) = self.schedules.get(name) {
            let view = schedule.view.clone();
            self.record(|| LogRecord::Schedule(Box::new(view)));
        }
    }

    /// The engine time of the earliest schedule timer.
    pub(super) fn next_schedule_ns(&self) -> Option<u64> {
        self.schedule_timers
            .first()
            .map(|&(at_ms, _)| self.engine_ns(at_ms))
    }

    /// Runs the earliest schedule timer (due at `now`): fires what the
    /// misfire policy says, all in one log batch with the new state.
    pub(super) fn run_schedule_timer(&mut self, now: u64) {
        let Some((_, name)) = self.schedule_timers.pop_first() else {
            return;
        };
        let now_ms = self.wall_ms(now);
        let Some(schedule) = self.schedules.get_mut(&name) else {
            return;
        };
        schedule.timer_at_ms = None;
        let (Some(rule), false) = (schedule.rule.clone(), schedule.view.spec.paused) else {
            return;
        };
        let spec = schedule.view.spec.clone();
        let next_fire_at_ms = schedule.view.next_fire_at_ms;
        if self.check_accepting().is_err() {
            // Not now; the instant stays due.
            self.arm_schedule(&name, Some(now_ms + SCHEDULE_RETRY_MS));
            return;
        }
        let plan = rules::plan(&rule, &spec, next_fire_at_ms, now_ms);
        let mark = self.log.len();
        let mut fired = 0;
        let mut backlog_skips = 0;
        let mut refused = 0;
        let mut last_job = None;
        let mut last_fired_at = None;
        for &due in &plan.fire {
            match self.fire(&name, &spec, due, now) {
                Firing::Fired { job } => {
                    fired += 1;
                    last_job = Some(job);
                    last_fired_at = Some(due);
                }
                Firing::BacklogSkip => backlog_skips += 1,
                Firing::Refused => refused += 1,
            }
        }
        let Some(schedule) = self.schedules.get_mut(&name) else {
            return;
        };
        let view = &mut schedule.view;
        view.fires += fired;
        view.misfires_skipped += plan.skipped + refused;
        view.backlog_skips += backlog_skips;
        if let Some(due) = last_fired_at {
            view.last_fire_at_ms = view.last_fire_at_ms.max(Some(due));
            view.last_job = last_job;
            let skew_ms = now_ms.saturating_sub(due);
            view.last_skew_ms = Some(skew_ms);
        }
        view.next_fire_at_ms = plan.next_fire_at_ms;
        view.updated_at_ms = now_ms;
        view.version += 1;
        self.arm_schedule(&name, plan.next_fire_at_ms);
        self.record_schedule(&name);
        // The jobs and the schedule's new state: one batch, all or none.
        if self.log.len() > mark + 1 {
            let records = self.log.split_off(mark);
            self.log.push(LogRecord::Batch(records));
        }
    }

    /// Enqueues the job of one due instant, unless `max_backlog` says no.
    fn fire(&mut self, name: &ScheduleName, spec: &ScheduleSpec, due_ms: u64, now: u64) -> Firing {
        if let Some(max_backlog) = spec.max_backlog {
            if self.schedule_backlog(name) >= max_backlog {
                return Firing::BacklogSkip;
            }
        }
        let jitter = rules::jitter_ms(name.as_str(), due_ms, spec.jitter_ms);
        let job = rules::firing_job(name.as_str(), spec, due_ms, jitter);
        let prepared = match self.prepare(&spec.queue, job, now) {
            Ok(prepared) => prepared,
            Err(_) => return Firing::Refused,
        };
        match self.check_room(std::slice::from_ref(&prepared), now) {
            Ok(()) => {}
            Err(BrokerError::QueueFull { .. }) => return Firing::BacklogSkip,
            Err(_) => return Firing::Refused,
        }
        let (job, _) = self.create(prepared, now);
        let due_ns = self.engine_ns(due_ms);
        if let Some(schedule) = self.schedules.get_mut(name) {
            schedule.skew.observe_ns(now.saturating_sub(due_ns));
            if spec.max_backlog.is_some() {
                schedule.fired.insert(job.id);
            }
        }
        Firing::Fired { job: job.id }
    }

    /// Jobs this schedule fired that wait in their queue (ready or
    /// delayed): a walk over its own live jobs, never over the queue.
    fn schedule_backlog(&mut self, name: &ScheduleName) -> u64 {
        if !self.schedule_backlog_indexed {
            self.index_schedule_jobs();
        }
        let Some(schedule) = self.schedules.get_mut(name) else {
            return 0;
        };
        let jobs = &self.jobs;
        schedule.fired.retain(|id| jobs.contains_key(id));
        schedule
            .fired
            .iter()
            .filter(|id| {
                jobs.get(id)
                    .is_some_and(|j| matches!(j.state, JobState::Ready | JobState::Delayed))
            })
            .count() as u64
    }

    /// After a restart: finds the live jobs of schedules with a
    /// `max_backlog` by their `spool-schedule` header (once).
    fn index_schedule_jobs(&mut self) {
        self.schedule_backlog_indexed = true;
        let header = spool_broker::schedule::HEADER_SCHEDULE;
        let tubes = &self.tubes;
        for job in self.jobs.values() {
            let Some(name) = job
                .extra
                .as_ref()
                .and_then(|e| e.headers.get(header))
                .and_then(|n| TubeName::try_from(n.as_str()).ok())
            else {
                continue;
            };
            if let Some(schedule) = self.schedules.get_mut(&name) {
                if schedule.view.spec.max_backlog.is_some()
                    && tubes
                        .get(job.tube.0 as usize)
                        .and_then(Option::as_ref)
                        .is_some_and(|t| t.name == schedule.view.spec.queue)
                {
                    schedule.fired.insert(job.id);
                }
            }
        }
    }

    /// A logged schedule state: replaces the schedule.
    pub(super) fn replay_schedule(&mut self, view: ScheduleView) {
        let Ok(name) = TubeName::try_from(view.name.as_str()) else {
            return;
        };
        let rule = rules::check_spec(&view.spec).ok();
        let next = view.next_fire_at_ms.filter(|_| rule.is_some());
        let mut skew = Histogram::skew();
        if let Some(old) = self.schedules.remove(&name) {
            if let Some(at_ms) = old.timer_at_ms {
                self.schedule_timers.remove(&(at_ms, name.clone()));
            }
            skew = old.skew;
        }
        self.schedules.insert(
            name.clone(),
            Schedule {
                view,
                rule,
                timer_at_ms: None,
                fired: BTreeSet::new(),
                skew,
            },
        );
        self.arm_schedule(&name, next);
    }

    pub(super) fn replay_schedule_deleted(&mut self, name: &ScheduleName) {
        if let Some(at_ms) = self.schedules.remove(name).and_then(|s| s.timer_at_ms) {
            self.schedule_timers.remove(&(at_ms, name.clone()));
        }
    }

    /// Every schedule's state, for a compaction.
    pub(super) fn schedule_records(&self) -> impl Iterator<Item = LogRecord> + '_ {
        self.schedules
            .values()
            .map(|s| LogRecord::Schedule(Box::new(s.view.clone())))
    }

    /// Every schedule's figures, by name, for metrics and `spool top`.
    pub(super) fn schedule_snapshots(&self) -> Vec<ScheduleSnapshot> {
        self.schedules
            .values()
            .map(|s| ScheduleSnapshot {
                name: s.view.name.clone(),
                queue: s.view.spec.queue.to_string(),
                paused: s.view.spec.paused,
                next_fire_at_ms: s.view.next_fire_at_ms,
                last_fire_at_ms: s.view.last_fire_at_ms,
                last_skew_ms: s.view.last_skew_ms,
                fires: s.view.fires,
                misfires_skipped: s.view.misfires_skipped,
                backlog_skips: s.view.backlog_skips,
                skew: s.skew.clone(),
            })
            .collect()
    }
}
