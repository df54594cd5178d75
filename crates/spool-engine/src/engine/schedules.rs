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
//!
//! Fire ahead: [`limits::SCHEDULE_FIRE_AHEAD_MS`] before an instant, its
//! job is made delayed until the instant and logged with the schedule's
//! state naming it ([`FiringAhead`]), so the instant itself only moves a
//! delayed job to ready. Until the instant the schedule shows the firing as
//! not done (`next_fire_at` is the instant, `fires` and `last_fire_at` as
//! before); from the instant on it shows it done ("settled", in memory
//! first, logged again `SCHEDULE_FIRE_AHEAD_MS` later). Pause, delete and
//! replace remove a firing made ahead whose job is still delayed. A
//! firing's job that becomes ready more than `MISFIRE_GRACE_MS` late (the
//! server was down or stalled across its instant) meets the misfire policy
//! then, as an instant not made ahead does. At the instant the delay timer
//! moves the job like any delayed job; the schedule's books (skew, the map
//! entry, the move logged so that a crash before the settle is logged does
//! not judge the firing missed) follow as timers of their own.

use spool_broker::{
    BrokerError, Op, Outcome, RunAt, ScheduleName, ScheduleSnapshot, ScheduleSpec, ScheduleView,
};

use super::tasks::NS_PER_MS;
use super::*;
use crate::limits::SCHEDULE_FIRE_AHEAD_MS;
use crate::record::{FiringAhead, ScheduleRecord};
use crate::schedule::{self as rules, Rule, EVERY_MS_MIN, MISFIRE_GRACE_MS};

// A schedule has at most one firing made ahead: the next instant is made
// only after the one before it has passed.
const _: () = assert!(SCHEDULE_FIRE_AHEAD_MS < EVERY_MS_MIN);

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
    /// The next instant's firing, made ahead of it, until it is settled
    /// (and logged so) by the schedule's timer or an operation.
    ahead: Option<Ahead>,
}

/// A firing made ahead, with the instant after it.
#[derive(Debug, Clone, Copy)]
struct Ahead {
    firing: FiringAhead,
    next_ms: Option<u64>,
}

impl Schedule {
    /// The schedule as it shows at `now_ms`: a firing made ahead counts
    /// from its instant on.
    fn view_at(&self, now_ms: u64) -> ScheduleView {
        let mut view = self.view.clone();
        if let Some(ahead) = self.ahead.filter(|a| a.firing.due_ms <= now_ms) {
            settle_view(&mut view, ahead);
        }
        view
    }

    /// When its timer should run: `SCHEDULE_FIRE_AHEAD_MS` before the next
    /// instant not yet made, and while a firing made ahead is pending, no
    /// later than that long after its instant (to log it settled).
    fn timer_ms(&self) -> Option<u64> {
        if self.view.spec.paused || self.rule.is_none() {
            return None;
        }
        match self.ahead {
            Some(ahead) => {
                let due = ahead.firing.due_ms;
                let log_at = due.saturating_add(SCHEDULE_FIRE_AHEAD_MS);
                Some(match ahead.next_ms {
                    Some(next) => next
                        .saturating_sub(SCHEDULE_FIRE_AHEAD_MS)
                        .clamp(due, log_at),
                    None => log_at,
                })
            }
            None => self
                .view
                .next_fire_at_ms
                .map(|next| next.saturating_sub(SCHEDULE_FIRE_AHEAD_MS)),
        }
    }
}

/// A firing made ahead, counted: its instant has passed.
fn settle_view(view: &mut ScheduleView, ahead: Ahead) {
    let due = ahead.firing.due_ms;
    view.fires += 1;
    view.last_fire_at_ms = view.last_fire_at_ms.max(Some(due));
    view.last_job = Some(ahead.firing.job);
    view.next_fire_at_ms = ahead.next_ms;
    view.updated_at_ms = view.updated_at_ms.max(due);
    view.version += 1;
}

/// A job of `firing_jobs` the delay timer made ready, `skew_ns` after it
/// was due, waiting for its schedule's books.
#[derive(Debug, Clone, Copy)]
pub(super) struct ReadyFiring {
    /// When it became ready (engine ns): its place among the timers.
    pub(super) ready_at_ns: u64,
    pub(super) id: JobId,
    pub(super) skew_ns: u64,
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
                rules::check_spec(&spec)?;
                self.settle_for_op(&name, now);
                let mark = self.log.len();
                // The firing made ahead was made from the old spec: taken
                // back, and made again from the new one if the instant
                // stays due.
                self.drop_ahead(&name);
                let outcome = self.put_schedule(name, *spec, now_ms);
                self.batch_since(mark);
                outcome
            }
            Op::GetSchedule { name } => Ok(self.schedule_outcome(&name, false, now_ms)?),
            Op::ListSchedules => Ok(Outcome::Schedules(
                self.schedules.values().map(|s| s.view_at(now_ms)).collect(),
            )),
            Op::DeleteSchedule { name } => {
                self.check_writable(false)?;
                if !self.schedules.contains_key(&name) {
                    return Err(BrokerError::NotFound);
                }
                let mark = self.log.len();
                self.drop_ahead(&name);
                let removed = self.schedules.remove(&name).ok_or(BrokerError::NotFound)?;
                if let Some(at_ms) = removed.timer_at_ms {
                    self.schedule_timers.remove(&(at_ms, name.clone()));
                }
                self.record(|| LogRecord::ScheduleDeleted { name });
                self.batch_since(mark);
                Ok(Outcome::Done)
            }
            Op::PauseSchedule { name } => {
                self.check_writable(true)?;
                self.settle_for_op(&name, now);
                let mark = self.log.len();
                // A firing made ahead for an instant that has not come is
                // taken back: a paused schedule fires nothing.
                self.drop_ahead(&name);
                self.change_schedule(&name, now_ms, |s| {
                    s.view.spec.paused = true;
                    s.view.next_fire_at_ms = None;
                })?;
                self.batch_since(mark);
                self.schedule_outcome(&name, false, now_ms)
            }
            Op::ResumeSchedule { name } => {
                self.check_writable(true)?;
                self.settle_for_op(&name, now);
                self.change_schedule(&name, now_ms, |s| {
                    if s.view.spec.paused {
                        s.view.spec.paused = false;
                        s.view.next_fire_at_ms = s.rule.as_ref().and_then(|r| {
                            rules::first_due(r, s.view.last_fire_at_ms, None, now_ms)
                        });
                    }
                })?;
                self.schedule_outcome(&name, false, now_ms)
            }
            Op::TriggerSchedule { name } => {
                self.check_accepting()?;
                self.settle_for_op(&name, now);
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
                self.schedule_outcome(&name, false, now_ms)
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
                ahead: None,
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
        self.arm_default(&name);
        self.record_schedule(&name);
        Ok(Outcome::Schedule {
            schedule: Box::new(self.schedules[&name].view.clone()),
            created,
        })
    }

    fn schedule_outcome(
        &self,
        name: &ScheduleName,
        created: bool,
        now_ms: u64,
    ) -> Result<Outcome, BrokerError> {
        let schedule = self.schedules.get(name).ok_or(BrokerError::NotFound)?;
        Ok(Outcome::Schedule {
            schedule: Box::new(schedule.view_at(now_ms)),
            created,
        })
    }

    /// Before an operation changes a schedule: a firing made ahead whose
    /// instant has passed is settled (the operation logs the state).
    fn settle_for_op(&mut self, name: &ScheduleName, now: u64) {
        self.settle_ahead(name, now);
    }

    /// Settles the schedule's firing made ahead if its instant has passed:
    /// counted as fired, or, if its job is still delayed more than
    /// `MISFIRE_GRACE_MS` past when it was due (the server was down or
    /// stalled across the instant), put to the misfire policy like an
    /// instant not made ahead (logged here). Returns whether the schedule
    /// changed in memory only, for the caller to log.
    fn settle_ahead(&mut self, name: &ScheduleName, now: u64) -> bool {
        let now_ms = self.wall_ms(now);
        let Some(schedule) = self.schedules.get(name) else {
            return false;
        };
        let Some(ahead) = schedule.ahead.filter(|a| a.firing.due_ms <= now_ms) else {
            return false;
        };
        let job = ahead.firing.job;
        // A job moved by hand (kick, update; also replayed) left
        // `firing_jobs`: it runs when its owner said, never judged missed.
        let missed = self.firing_jobs.contains_key(&job)
            && self.jobs.get(&job).is_some_and(|j| {
                j.state == JobState::Delayed
                    && j.deadline_at_ns
                        .saturating_add(MISFIRE_GRACE_MS * NS_PER_MS)
                        < now
            });
        let accepting = self.check_accepting().is_ok();
        // A job made ready already (before a restart, or by hand) needs no
        // entry; one still delayed keeps it for its books.
        if !missed
            && self
                .jobs
                .get(&job)
                .is_none_or(|j| j.state != JobState::Delayed)
            && !self.ready_firings.iter().any(|r| r.id == job)
        {
            self.firing_jobs.remove(&job);
        }
        let schedule = self.schedules.get_mut(name).expect("schedule exists");
        schedule.ahead = None;
        let (Some(rule), true, true) = (schedule.rule.clone(), missed, accepting) else {
            settle_view(&mut schedule.view, ahead);
            return true;
        };
        let spec = schedule.view.spec.clone();
        let plan = rules::plan(&rule, &spec, Some(ahead.firing.due_ms), now_ms);
        let mark = self.log.len();
        let keep = plan.fire.contains(&ahead.firing.due_ms);
        if !keep {
            self.remove_firing_job(job);
        }
        self.fire_plan(name, &spec, plan, keep.then_some(ahead.firing), now);
        self.batch_since(mark);
        false
    }

    /// Takes back the schedule's firing made ahead, if any: its job goes
    /// if it is still delayed (not kicked, reserved or deleted since).
    fn drop_ahead(&mut self, name: &ScheduleName) {
        let Some(ahead) = self.schedules.get_mut(name).and_then(|s| s.ahead.take()) else {
            return;
        };
        self.remove_firing_job(ahead.firing.job);
    }

    fn remove_firing_job(&mut self, id: JobId) {
        self.firing_jobs.remove(&id);
        if self
            .jobs
            .get(&id)
            .is_some_and(|j| j.state == JobState::Delayed)
        {
            self.unqueue(id);
            self.drop_job(id);
            self.record(|| LogRecord::Delete { id });
        }
    }

    /// The delay timer found `id`, due at `due` (engine ns), among the jobs
    /// of firings made ahead. Settles its firing if it is late past the
    /// grace (which may remove it); returns whether it is still to be made
    /// ready.
    pub(super) fn firing_job_due(&mut self, id: JobId, due: u64, now: u64) -> bool {
        let Some(name) = self.firing_jobs.get(&id).cloned() else {
            return true;
        };
        let pending = self
            .schedules
            .get(&name)
            .and_then(|s| s.ahead)
            .is_some_and(|a| a.firing.job == id);
        if pending && now > due.saturating_add(MISFIRE_GRACE_MS * NS_PER_MS) {
            if self.settle_ahead(&name, now) {
                self.record_schedule(&name);
            }
            self.arm_default(&name);
        }
        self.jobs
            .get(&id)
            .is_some_and(|j| j.state == JobState::Delayed && j.deadline_at_ns == due)
    }

    /// A firing's job made ready by the delay timer, `skew_ns` after it
    /// was due: its schedule's books, and the move logged.
    pub(super) fn firing_job_ready(&mut self, id: JobId, skew_ns: u64) {
        let Some(name) = self.firing_jobs.remove(&id) else {
            return;
        };
        // Durable evidence that the server was up at the instant: after a
        // crash before the schedule's settled state is logged, a restart
        // finds the job ready, and the firing counts as fired (not missed).
        if self
            .jobs
            .get(&id)
            .is_some_and(|j| j.state != JobState::Delayed)
        {
            self.record_change(id);
        }
        if let Some(schedule) = self.schedules.get_mut(&name) {
            schedule.skew.observe_ns(skew_ns);
            // Logged with the schedule's next state.
            schedule.view.last_skew_ms = Some(skew_ns / NS_PER_MS);
        }
    }

    /// Makes the firing of `due_ms` ahead of it: a job delayed until the
    /// instant, logged with the schedule's state naming it. Returns false
    /// when it cannot be made now (not accepting, `max_backlog` reached, a
    /// refusal): the instant is then fired when due, as without fire ahead.
    fn fire_ahead(&mut self, name: &ScheduleName, due_ms: u64, now: u64) -> bool {
        let Some(schedule) = self.schedules.get(name) else {
            return false;
        };
        let Some(rule) = schedule.rule.clone() else {
            return false;
        };
        let spec = schedule.view.spec.clone();
        if self.check_accepting().is_err() {
            return false;
        }
        if let Some(max_backlog) = spec.max_backlog {
            if self.schedule_backlog(name) >= max_backlog {
                return false;
            }
        }
        let jitter = rules::jitter_ms(name.as_str(), due_ms, spec.jitter_ms);
        let mut job = rules::firing_job(name.as_str(), &spec, due_ms, jitter);
        if job.run_at == RunAt::Now {
            job.run_at = RunAt::AtMs(due_ms);
        }
        let Ok(prepared) = self.prepare(&spec.queue, job, now) else {
            return false;
        };
        if self
            .check_room(std::slice::from_ref(&prepared), now)
            .is_err()
        {
            return false;
        }
        let mark = self.log.len();
        let (job, _) = self.create(prepared, now);
        // The previous firing's entry went with its books, or its settle
        // (a job no longer delayed), or stays while its job is delayed (a
        // template delay longer than the interval).
        self.firing_jobs.insert(job.id, name.clone());
        let schedule = self.schedules.get_mut(name).expect("schedule exists");
        schedule.ahead = Some(Ahead {
            firing: FiringAhead {
                due_ms,
                job: job.id,
            },
            next_ms: rule.next_after(due_ms),
        });
        if spec.max_backlog.is_some() {
            schedule.fired.insert(job.id);
        }
        self.record_schedule(name);
        self.batch_since(mark);
        true
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
        self.arm_default(name);
        self.record_schedule(name);
        Ok(())
    }

    /// Points the schedule's timer where its state says.
    fn arm_default(&mut self, name: &ScheduleName) {
        let at_ms = self.schedules.get(name).and_then(Schedule::timer_ms);
        self.arm_schedule(name, at_ms);
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
            let record = ScheduleRecord {
                view: schedule.view.clone(),
                ahead: schedule.ahead.map(|a| a.firing),
            };
            self.record(|| LogRecord::Schedule(Box::new(record)));
        }
    }

    /// The instant (engine time) that the earliest schedule timer fires,
    /// or makes its firing ahead of: its schedule's next instant not yet
    /// made.
    pub(super) fn next_schedule_instant_ns(&self) -> Option<u64> {
        let (_, name) = self.schedule_timers.first()?;
        let schedule = self.schedules.get(name)?;
        let instant_ms = match schedule.ahead {
            Some(ahead) => ahead.next_ms,
            None => schedule.view.next_fire_at_ms,
        }?;
        Some(self.engine_ns(instant_ms))
    }

    /// The engine time of the earliest schedule timer.
    pub(super) fn next_schedule_ns(&self) -> Option<u64> {
        self.schedule_timers
            .first()
            .map(|&(at_ms, _)| self.engine_ns(at_ms))
    }

    /// Runs the earliest schedule timer (due at `now`): settles a firing
    /// made ahead whose instant has passed, then makes the next instant's
    /// firing ahead of it, or fires what is already due (what the misfire
    /// policy says, all in one log batch with the new state).
    pub(super) fn run_schedule_timer(&mut self, now: u64) {
        let Some((_, name)) = self.schedule_timers.pop_first() else {
            return;
        };
        let now_ms = self.wall_ms(now);
        let Some(schedule) = self.schedules.get_mut(&name) else {
            return;
        };
        schedule.timer_at_ms = None;
        let settled = self.settle_ahead(&name, now);
        let Some(schedule) = self.schedules.get(&name) else {
            return;
        };
        let next = schedule.view.next_fire_at_ms;
        let firing =
            schedule.ahead.is_none() && schedule.rule.is_some() && !schedule.view.spec.paused;
        match next {
            Some(due) if firing && due <= now_ms => {
                self.fire_due(&name, now);
                return;
            }
            Some(due) if firing && due.saturating_sub(SCHEDULE_FIRE_AHEAD_MS) <= now_ms => {
                if self.fire_ahead(&name, due, now) {
                    self.arm_default(&name);
                    return;
                }
                // Not now: fired when due, as without fire ahead.
                if settled {
                    self.record_schedule(&name);
                }
                self.arm_schedule(&name, Some(due));
                return;
            }
            _ => {}
        }
        if settled {
            self.record_schedule(&name);
        }
        self.arm_default(&name);
    }

    /// Fires the instants of a schedule that are due at `now` (none made
    /// ahead): what the misfire policy says.
    fn fire_due(&mut self, name: &ScheduleName, now: u64) {
        let now_ms = self.wall_ms(now);
        let Some(schedule) = self.schedules.get(name) else {
            return;
        };
        let Some(rule) = schedule.rule.clone() else {
            return;
        };
        let spec = schedule.view.spec.clone();
        let next_fire_at_ms = schedule.view.next_fire_at_ms;
        if self.check_accepting().is_err() {
            // Not now; the instant stays due.
            self.arm_schedule(name, Some(now_ms + SCHEDULE_RETRY_MS));
            return;
        }
        let plan = rules::plan(&rule, &spec, next_fire_at_ms, now_ms);
        let mark = self.log.len();
        self.fire_plan(name, &spec, plan, None, now);
        self.batch_since(mark);
    }

    /// Fires a plan's instants (`made`: one of them whose job exists
    /// already, made ahead), updates the schedule's state, logs it and
    /// re-arms its timer.
    fn fire_plan(
        &mut self,
        name: &ScheduleName,
        spec: &ScheduleSpec,
        plan: rules::Plan,
        made: Option<FiringAhead>,
        now: u64,
    ) {
        let now_ms = self.wall_ms(now);
        let mut fired = 0;
        let mut backlog_skips = 0;
        let mut refused = 0;
        let mut last_job = None;
        let mut last_fired_at = None;
        for &due in &plan.fire {
            let firing = match made {
                Some(made) if made.due_ms == due => Firing::Fired { job: made.job },
                _ => self.fire(name, spec, due, now),
            };
            match firing {
                Firing::Fired { job } => {
                    fired += 1;
                    last_job = Some(job);
                    last_fired_at = Some(due);
                }
                Firing::BacklogSkip => backlog_skips += 1,
                Firing::Refused => refused += 1,
            }
        }
        let Some(schedule) = self.schedules.get_mut(name) else {
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
        self.arm_default(name);
        self.record_schedule(name);
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
    pub(super) fn replay_schedule(&mut self, record: ScheduleRecord) {
        let ScheduleRecord { view, ahead } = record;
        let Ok(name) = TubeName::try_from(view.name.as_str()) else {
            return;
        };
        let rule = rules::check_spec(&view.spec).ok();
        let mut skew = Histogram::skew();
        if let Some(old) = self.schedules.remove(&name) {
            if let Some(at_ms) = old.timer_at_ms {
                self.schedule_timers.remove(&(at_ms, name.clone()));
            }
            if let Some(old_ahead) = old.ahead {
                self.firing_jobs.remove(&old_ahead.firing.job);
            }
            skew = old.skew;
        }
        let ahead = match (&rule, ahead) {
            (Some(rule), Some(firing)) => Some(Ahead {
                firing,
                next_ms: rule.next_after(firing.due_ms),
            }),
            _ => None,
        };
        if let Some(ahead) = ahead {
            self.firing_jobs.insert(ahead.firing.job, name.clone());
        }
        self.schedules.insert(
            name.clone(),
            Schedule {
                view,
                rule,
                timer_at_ms: None,
                fired: BTreeSet::new(),
                skew,
                ahead,
            },
        );
        self.arm_default(&name);
    }

    pub(super) fn replay_schedule_deleted(&mut self, name: &ScheduleName) {
        if let Some(old) = self.schedules.remove(name) {
            if let Some(at_ms) = old.timer_at_ms {
                self.schedule_timers.remove(&(at_ms, name.clone()));
            }
            if let Some(ahead) = old.ahead {
                self.firing_jobs.remove(&ahead.firing.job);
            }
        }
    }

    /// Every schedule's state, for a compaction.
    pub(super) fn schedule_records(&self) -> impl Iterator<Item = LogRecord> + '_ {
        self.schedules.values().map(|s| {
            LogRecord::Schedule(Box::new(ScheduleRecord {
                view: s.view.clone(),
                ahead: s.ahead.map(|a| a.firing),
            }))
        })
    }

    /// The schedules' timers and the map of firings made ahead agree with
    /// the schedules (for tests).
    pub(super) fn check_schedule_invariants(&self) {
        let mut armed = 0;
        for (name, schedule) in &self.schedules {
            if let Some(at_ms) = schedule.timer_at_ms {
                armed += 1;
                assert!(self.schedule_timers.contains(&(at_ms, name.clone())));
            }
            if let Some(ahead) = schedule.ahead {
                // Made ahead, not yet counted: still the next instant.
                assert_eq!(schedule.view.next_fire_at_ms, Some(ahead.firing.due_ms));
                if let Some(mapped) = self.firing_jobs.get(&ahead.firing.job) {
                    assert_eq!(mapped, name, "job {}", ahead.firing.job);
                }
            }
        }
        assert_eq!(armed, self.schedule_timers.len(), "no timer of no schedule");
        // Each entry's job waits in the delay timer, or for its books after
        // it, or is its schedule's firing until the schedule's timer
        // settles it (a replayed one, made ready before a restart).
        for (&job, name) in &self.firing_jobs {
            let delayed = self
                .jobs
                .get(&job)
                .is_some_and(|j| j.state == JobState::Delayed);
            let pending = self
                .schedules
                .get(name)
                .and_then(|s| s.ahead)
                .is_some_and(|a| a.firing.job == job);
            let books = self.ready_firings.iter().any(|r| r.id == job);
            assert!(delayed || pending || books, "firing job {job} of {name:?}");
        }
        let times: Vec<u64> = self.ready_firings.iter().map(|r| r.ready_at_ns).collect();
        assert!(
            times.is_sorted(),
            "books in the order the jobs became ready"
        );
    }

    /// Every schedule's figures, by name, for metrics and `spool top`, as
    /// they show at `now`.
    pub(super) fn schedule_snapshots(&self, now: u64) -> Vec<ScheduleSnapshot> {
        let now_ms = self.wall_ms(now);
        self.schedules
            .values()
            .map(|s| {
                let view = s.view_at(now_ms);
                ScheduleSnapshot {
                    name: view.name,
                    queue: view.spec.queue.to_string(),
                    paused: view.spec.paused,
                    next_fire_at_ms: view.next_fire_at_ms,
                    last_fire_at_ms: view.last_fire_at_ms,
                    last_skew_ms: view.last_skew_ms,
                    fires: view.fires,
                    misfires_skipped: view.misfires_skipped,
                    backlog_skips: view.backlog_skips,
                    skew: s.skew.clone(),
                }
            })
            .collect()
    }
}
