//! Timers: one `tick` fires due schedules, moves due delayed jobs, ends pauses and blocked
//! reserves, expires leases and forgets final jobs past their retention.

use super::schedules::ReadyFiring;
use super::tasks::NS_PER_MS;
use super::*;
use crate::schedule::MISFIRE_GRACE_MS;

/// Schedule timers one `tick` runs before it returns (with work left due):
/// a firing costs microseconds (an enqueue and a log record), and thousands
/// of schedules due on the same second would otherwise hold the server for
/// tens of milliseconds in one call and all be measured against the one
/// `now` it started with. The caller reads its clock and calls again (after
/// serving others), so each batch's skew is measured when it fires.
pub const SCHEDULE_TIMERS_PER_TICK_MAX: usize = 256;

/// Timers of any kind one `tick` runs before it returns (with work left
/// due), for the same reason: thousands of delayed jobs due on one instant
/// (the jobs of schedules made ahead, say) take milliseconds to move, and
/// each batch's skew is measured against its own `now`, not the first.
pub const TIMERS_PER_TICK_MAX: usize = 1_024;

impl Engine {
    /// Runs timers due at `now`: delayed jobs become ready, pauses end,
    /// blocked reserves time out, reservations expire, schedules fire (at
    /// most [`SCHEDULE_TIMERS_PER_TICK_MAX`] schedules and
    /// [`TIMERS_PER_TICK_MAX`] timers in all). Returns when it next has
    /// work, if ever: `now` or earlier when it stopped with timers due.
    pub fn tick(&mut self, now: u64) -> Option<u64> {
        let mut schedule_timers = 0;
        let mut timers = 0;
        // One timer at a time, earliest first, whatever its kind: a caller
        // that runs late (a busy server) must see the same outcome as one
        // that woke on time. Ties go to the kinds in the order listed.
        while schedule_timers < SCHEDULE_TIMERS_PER_TICK_MAX && timers < TIMERS_PER_TICK_MAX {
            timers += 1;
            let other = self.earliest_other_timer();
            let due = other
                .into_iter()
                .chain(self.earliest_delayed().map(|(at, _, _)| (at, Timer::Delay)))
                .filter(|&(at, _)| at <= now)
                .min();
            let Some((mut instant, mut timer)) = due else {
                break;
            };
            // A schedule timer that runs late (a pass making thousands of
            // firings ahead that outlasted its half second, on a starved
            // CPU) must not hold back jobs due at an instant before the
            // one it fires or makes (or at it): those move first, as on time,
            // and are not all made late together.
            if timer == Timer::Schedule {
                if let Some((delay_at, _, _)) = self.earliest_delayed() {
                    if delay_at <= now
                        && self
                            .next_schedule_instant_ns()
                            .is_some_and(|instant| instant >= delay_at)
                    {
                        timer = Timer::Delay;
                        instant = delay_at;
                    }
                }
            }
            self.timer_instant_ns = Some(instant);
            let mark = self.log.len();
            match timer {
                Timer::Schedule => {
                    schedule_timers += 1;
                    self.run_schedule_timer(now);
                }
                Timer::Delay => {
                    let (due, id, tube) = self.earliest_delayed().expect("a delayed job is due");
                    // A schedule's firing made ahead whose job is late past
                    // the grace (the server was down or stalled across its
                    // instant) meets its misfire policy first; on time, its
                    // job moves like any other.
                    let late = now > due.saturating_add(MISFIRE_GRACE_MS * NS_PER_MS);
                    if !late && self.waited_tubes.is_empty() {
                        // The jobs that would move next one at a time, moved
                        // in one pass: nothing they do can change the order.
                        let left = TIMERS_PER_TICK_MAX - timers + 1;
                        let moved = self.move_due_run(tube, other, left, now);
                        timers += moved - 1;
                    } else if !(late && self.firing_jobs.contains_key(&id))
                        || self.firing_job_due(id, due, now)
                    {
                        // A firing's map entry stays for its books.
                        self.unfile_delayed(tube, due, id);
                        self.tube_mut(tube).metrics.skew.observe_ns(now - due);
                        self.enqueue(id, 0, now);
                        // The change happened at the due time, whenever the
                        // tick ran: replay must find the same instant.
                        if let Some(extra) =
                            self.jobs.get_mut(&id).and_then(|j| j.extra.as_deref_mut())
                        {
                            extra.updated_at_ns = due;
                            // Only job-API jobs can be firings; their
                            // schedules' books wait until the jobs due
                            // with them are ready.
                            if !self.firing_jobs.is_empty() {
                                self.ready_firings.push_back(ReadyFiring {
                                    ready_at_ns: now,
                                    id,
                                    skew_ns: now - due,
                                });
                            }
                        }
                    }
                }
                Timer::FiringReady => {
                    let ready = self.ready_firings.pop_front().expect("a firing is ready");
                    self.firing_job_ready(ready.id, ready.skew_ns);
                }
                Timer::Pause => {
                    let &(_, tube) = self.paused.first().expect("a pause is due");
                    self.unpause(tube);
                    self.process_queue(now);
                }
                Timer::Wait => {
                    let &(_, conn_id) = self.wait_timers.first().expect("a wait is due");
                    let soon = self.deadline_soon(conn_id, now);
                    self.remove_waiting_conn(conn_id);
                    let reply = if soon {
                        Response::DeadlineSoon
                    } else {
                        Response::TimedOut
                    };
                    self.outbox.push((conn_id, reply));
                }
                Timer::Ttr => {
                    let &(_, seq, id) = self.reservations.first().expect("a reservation is due");
                    let job = self.jobs.get_mut(&id).expect("reserved job exists");
                    debug_assert_eq!(job.seq, seq);
                    job.timeouts += 1;
                    let (tube, max_attempts) = (job.tube, job.max_attempts);
                    self.counters.job_timeouts += 1;
                    self.tube_mut(tube).metrics.counters.timed_out += 1;
                    self.release_reservation_of(id);
                    if max_attempts > 0 {
                        // A job with an attempt limit: the expiry is a failed
                        // attempt, retried after its backoff or buried.
                        let error = "lease expired: no heartbeat or completion within the TTR";
                        self.retry_or_bury(id, error.to_string(), None, false, now);
                    } else {
                        // beanstalkd's semantics: ready again at once.
                        let job = self.jobs.get_mut(&id).expect("job exists");
                        job.attempts = job.attempts.saturating_add(1);
                        self.enqueue(id, 0, now);
                        // Logged so that attempts and versions survive a
                        // restart.
                        self.record_change(id);
                    }
                }
                Timer::Rate => self.rate_timer_fired(now),
                Timer::Retention => self.expire_finished(now),
                Timer::WorkflowRetention => self.expire_workflows(now),
            }
            self.settle_workflows(mark, now);
            self.serve_freed_slots(now);
        }
        self.timer_instant_ns = None;
        self.next_wake()
    }

    /// The earliest timer of every kind but the delay timer, with its kind
    /// (ties go to the kinds in the order `Timer` lists them).
    fn earliest_other_timer(&self) -> Option<(u64, Timer)> {
        [
            self.next_schedule_ns().map(|at| (at, Timer::Schedule)),
            self.ready_firings
                .front()
                .map(|r| (r.ready_at_ns, Timer::FiringReady)),
            self.paused.first().map(|&(at, _)| (at, Timer::Pause)),
            self.rate_timers.first().map(|&(at, _)| (at, Timer::Rate)),
            self.wait_timers.first().map(|&(at, _)| (at, Timer::Wait)),
            // A reservation expires once its deadline has passed
            // (beanstalkd keeps it while `deadline >= now`).
            self.reservations
                .first()
                .map(|&(at, _, _)| (at + 1, Timer::Ttr)),
            self.retention
                .next_expiry()
                .map(|at| (at, Timer::Retention)),
            self.next_workflow_expiry()
                .map(|at| (at, Timer::WorkflowRetention)),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Moves to ready, in one pass, the delayed jobs of `tube` that one
    /// timer at a time would move next at `now`: its earliest (the earliest
    /// of all, due and not late) and those after it that come before the
    /// next tube's earliest, before `other` (the earliest timer of another
    /// kind) and within `left` timers. Returns how many moved (at least one).
    ///
    /// The same outcome as one at a time, cheaper: the other timers are
    /// read once, not per job; the run leaves the delayed set in one split;
    /// and the jobs' lookups, which miss the cache, run in a loop of their
    /// own, where the processor overlaps them. Only while nobody waits to
    /// reserve: a job made ready then goes to no one, and nothing it does
    /// arms a timer.
    fn move_due_run(
        &mut self,
        tube: TubeId,
        other: Option<(u64, Timer)>,
        left: usize,
        now: u64,
    ) -> usize {
        // Jobs are ordered (due, id) across tubes: the run ends before the
        // first job of another tube and after the last job due by `now`.
        let mut end = (now.saturating_add(1), 0);
        if let Some(&(due, id, _)) = self.delayed_tubes.iter().nth(1) {
            end = end.min((due, id));
        }
        // The earliest timer of another kind goes before the jobs due after
        // it, or at its instant when it wins ties; a schedule timer also
        // lets through the jobs due by the instant it fires or makes (see
        // the loop in `tick`).
        match other {
            Some((at, Timer::Schedule)) => {
                let instant_end = self
                    .next_schedule_instant_ns()
                    .map_or(0, |instant| instant.saturating_add(1));
                end = end.min((at.max(instant_end), 0));
            }
            Some((at, _)) => end = end.min((at.saturating_add(1), 0)),
            None => {}
        }
        let t = self.tube_mut(tube);
        let first = t
            .delayed
            .first()
            .copied()
            .expect("the tube has a delayed job");
        debug_assert!(first < end, "its earliest job is the next timer");
        if let Some(&past_left) = t.delayed.range(..end).nth(left.max(1)) {
            end = past_left;
        }
        let rest = t.delayed.split_off(&end);
        let run = std::mem::replace(&mut t.delayed, rest);
        let next = t.delayed.first().copied();
        self.delayed_count -= run.len() as u64;
        self.delayed_tubes.remove(&(first.0, first.1, tube));
        if let Some((next_due, next_id)) = next {
            self.delayed_tubes.insert((next_due, next_id, tube));
        }
        // The jobs first, in a loop of their own: each lookup is
        // independent of the one before, so their cache misses overlap.
        let mut moved = Vec::with_capacity(run.len());
        let firings = !self.firing_jobs.is_empty();
        for (due, id) in run {
            let job = self.jobs.get_mut(&id).expect("a delayed job exists");
            job.reserver = None;
            job.version += 1;
            job.state = JobState::Ready;
            // A ready job has no deadline: the field holds when it became
            // ready, for the wait histogram.
            job.deadline_at_ns = now;
            if let Some(extra) = job.extra.as_deref_mut() {
                // The change happened at the due time, whenever the tick
                // ran: replay must find the same instant.
                extra.updated_at_ns = due;
                // Only job-API jobs can be firings; their schedules'
                // books wait until the jobs due with them are ready.
                if firings {
                    self.ready_firings.push_back(ReadyFiring {
                        ready_at_ns: now,
                        id,
                        skew_ns: now - due,
                    });
                }
            }
            moved.push((job.pri, id, now - due));
        }
        let count = moved.len();
        let mut urgent = 0;
        let t = self.tube_mut(tube);
        for (pri, id, skew_ns) in moved {
            t.metrics.skew.observe_ns(skew_ns);
            t.ready.insert((pri, id));
            urgent += u64::from(pri < URGENT_PRIORITY_THRESHOLD);
        }
        t.urgent += urgent;
        self.counters.ready += count as u64;
        self.counters.urgent += urgent;
        self.ready_events += count as u64;
        count
    }

    /// The earliest time at which [`Engine::tick`] has work.
    pub fn next_wake(&self) -> Option<u64> {
        [
            self.next_schedule_ns(),
            self.earliest_delayed().map(|(at, _, _)| at),
            self.ready_firings.front().map(|r| r.ready_at_ns),
            self.paused.first().map(|&(at, _)| at),
            self.rate_timers.first().map(|&(at, _)| at),
            self.wait_timers.first().map(|&(at, _)| at),
            self.reservations.first().map(|&(at, _, _)| at + 1),
            self.retention.next_expiry(),
            self.next_workflow_expiry(),
        ]
        .into_iter()
        .flatten()
        // A pause with no end is no timer.
        .filter(|&at| at != u64::MAX)
        .min()
    }
}
