//! Dispatch limits of a queue policy: `concurrency` (the most jobs of the
//! queue reserved at once) and `rate_per_s` (a token bucket). Both front
//! doors hand out jobs through `lease_job`, so both are held to them.
//! beanstalkd's `reserve-job <id>` is the exception: an operator naming one
//! job gets it, as it does from a paused tube, and it still takes a token.
//! The bucket is not durable: after a restart it starts full.

use spool_broker::QueuePolicy;

use super::*;

/// Why a queue with limits hands out nothing now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Closed {
    /// At its concurrency: it opens when one of its reservations ends.
    Full,
    /// Out of tokens until this instant.
    Until(u64),
}

/// A tube's dispatch limits, from its policy.
///
/// The rate is a token bucket kept as GCRA (the generic cell rate
/// algorithm): one instant, `tat_ns`, instead of a fractional token count,
/// so the engine's arithmetic stays in whole nanoseconds and exact. A token
/// arrives every `interval_ns`; the bucket holds `max(1, rate)` tokens,
/// which is `tau_ns` of credit beyond the one token due now.
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct DispatchLimits {
    /// 0: no concurrency limit.
    pub concurrency: u32,
    /// 0: no rate.
    pub interval_ns: u64,
    pub tau_ns: u64,
    /// When the bucket would be full again (the "theoretical arrival time"):
    /// a job may go out at `now` when `now + tau_ns >= tat_ns`.
    pub tat_ns: u64,
    /// When the armed timer for the next token fires; 0: none armed.
    pub timer_ns: u64,
}

impl DispatchLimits {
    /// The limits a policy sets, if any.
    pub fn of(policy: &QueuePolicy) -> Option<DispatchLimits> {
        if policy.concurrency.is_none() && policy.rate_per_s.is_none() {
            return None;
        }
        let mut limits = DispatchLimits {
            concurrency: policy.concurrency.unwrap_or(0),
            ..DispatchLimits::default()
        };
        if let Some(rate) = policy.rate_per_s {
            // Rounded up: the rate is never exceeded. Capped so that a tiny
            // rate still has an instant the engine can hold.
            let interval = (NS_PER_SEC as f64 / rate).ceil();
            let max = (limits::DELAY_MS_MAX * tasks::NS_PER_MS) as f64;
            limits.interval_ns = interval.clamp(1.0, max) as u64;
            // Credit for the tokens beyond the first, rounded down.
            let tau = (rate.max(1.0) - 1.0) * NS_PER_SEC as f64 / rate;
            limits.tau_ns = tau.clamp(0.0, max) as u64;
        }
        Some(limits)
    }

    /// Whether a job may go out at `now` with `reserved` of the queue's
    /// jobs reserved.
    pub fn check(&self, reserved: u64, now: u64) -> Result<(), Closed> {
        if self.concurrency > 0 && reserved >= u64::from(self.concurrency) {
            return Err(Closed::Full);
        }
        if self.interval_ns > 0 && now.saturating_add(self.tau_ns) < self.tat_ns {
            return Err(Closed::Until(self.tat_ns - self.tau_ns));
        }
        Ok(())
    }

    /// A job goes out at `now`: it takes a token.
    pub fn take_token(&mut self, now: u64) {
        if self.interval_ns > 0 {
            self.tat_ns = self.tat_ns.max(now).saturating_add(self.interval_ns);
        }
    }
}

impl Engine {
    /// Gives a live tube the policy's limits, keeping its bucket (a policy
    /// change is no reason to hand out a burst) and disarming its timer
    /// (the caller serves waiters again under the new limits).
    pub(super) fn apply_limits(&mut self, tube: TubeId, policy: &QueuePolicy) {
        let mut new = DispatchLimits::of(policy).map(Box::new);
        let t = self.tube_mut(tube);
        let old = t.limits.take();
        if let Some(old) = old.as_deref() {
            if let Some(new) = new.as_deref_mut() {
                new.tat_ns = old.tat_ns;
            }
            if old.timer_ns != 0 {
                self.rate_timers.remove(&(old.timer_ns, tube));
            }
        }
        self.tube_mut(tube).limits = new;
    }

    /// Whether `tube` may hand out a job at `now` (the job API's path);
    /// arms the next token's timer when only the rate stops a tube with a
    /// ready job, so that a parked reserve is retried then.
    pub(super) fn may_dispatch(&mut self, tube: TubeId, now: u64) -> bool {
        let t = self.tube(tube);
        let Some(limits) = t.limits.as_deref() else {
            return true;
        };
        match limits.check(t.reserved, now) {
            Ok(()) => true,
            Err(Closed::Full) => false,
            Err(Closed::Until(at)) => {
                if !t.ready.is_empty() {
                    self.arm_rate_timer(tube, at);
                }
                false
            }
        }
    }

    pub(super) fn arm_rate_timer(&mut self, tube: TubeId, at: u64) {
        let limits = self
            .tube_mut(tube)
            .limits
            .as_deref_mut()
            .expect("a rate-limited tube");
        let old = std::mem::replace(&mut limits.timer_ns, at);
        if old == at {
            return;
        }
        if old != 0 {
            self.rate_timers.remove(&(old, tube));
        }
        self.rate_timers.insert((at, tube));
    }

    /// The next token of a rate-limited tube arrived: parked reserves
    /// retry, blocked reservers are served.
    pub(super) fn rate_timer_fired(&mut self, now: u64) {
        let (_, tube) = self.rate_timers.pop_first().expect("a rate timer is due");
        if let Some(limits) = self.tube_mut(tube).limits.as_deref_mut() {
            limits.timer_ns = 0;
        }
        self.ready_events += 1;
        self.process_queue(now);
    }

    /// Serves blocked reservers after a call that freed a slot of a queue
    /// at its concurrency.
    pub(super) fn serve_freed_slots(&mut self, now: u64) {
        if self.slot_freed {
            self.slot_freed = false;
            self.process_queue(now);
        }
    }
}
