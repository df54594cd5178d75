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
            let due = [
                self.next_schedule_ns().map(|at| (at, Timer::Schedule)),
                self.earliest_delayed().map(|(at, _, _)| (at, Timer::Delay)),
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
            .filter(|&(at, _)| at <= now)
            .min();
            let Some((_, mut timer)) = due else {
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
                    }
                }
            }
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
                    let settle = late && self.firing_jobs.contains_key(&id);
                    if !settle || self.firing_job_due(id, due, now) {
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
        self.next_wake()
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
