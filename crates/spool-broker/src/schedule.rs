//! Schedules (API.md, "schedules"): a named cron rule that enqueues a job
//! from a template at each due instant, exactly once per instant.
//!
//! A firing is a job with the idempotency key `schedule:<name>:<due unix ms>`
//! and the headers [`HEADER_SCHEDULE`] and [`HEADER_SCHEDULED_AT`], committed
//! atomically with the schedule's new `last_fire_at`: no crash fires an
//! instant twice or loses it.

use crate::model::{JobId, NewJob, QueueName};

/// A schedule's name: the same rules as a queue name (it appears in
/// idempotency keys and metric labels).
pub type ScheduleName = QueueName;

/// The header naming the schedule that fired a job.
pub const HEADER_SCHEDULE: &str = "spool-schedule";
/// The header carrying the due instant a job was fired for (RFC 3339 UTC).
pub const HEADER_SCHEDULED_AT: &str = "spool-scheduled-at";

/// The idempotency key of the job fired for `name` at `due_at_ms`.
pub fn firing_key(name: &str, due_at_ms: u64) -> String {
    format!("schedule:{name}:{due_at_ms}")
}

/// What happens to instants that fell due while the server was down (or
/// the schedule could not fire).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Misfire {
    /// Missed instants are counted and dropped; the next future one fires.
    Skip,
    /// One job for all missed instants (for the latest of them).
    #[default]
    Once,
    /// One job per missed instant, at most `catch_up_max` (the latest
    /// ones); the rest are counted as skipped.
    All,
}

impl Misfire {
    pub fn as_str(self) -> &'static str {
        match self {
            Misfire::Skip => "skip",
            Misfire::Once => "once",
            Misfire::All => "all",
        }
    }

    pub fn parse(text: &str) -> Option<Misfire> {
        [Misfire::Skip, Misfire::Once, Misfire::All]
            .into_iter()
            .find(|m| m.as_str() == text)
    }
}

/// A schedule as a client defines it (`PUT /v1/schedules/{name}`).
#[derive(Debug, Clone, PartialEq)]
pub struct ScheduleSpec {
    /// 5 fields (minute precision), 6 (with seconds first), `@every <dur>`,
    /// or `@yearly`, `@monthly`, `@weekly`, `@daily`, `@hourly`; validated
    /// by the broker.
    pub cron: String,
    /// An IANA time zone name; `"UTC"` by default.
    pub timezone: String,
    pub queue: QueueName,
    /// The template of every fired job. Its idempotency key and the two
    /// schedule headers are set by the firing.
    pub job: NewJob,
    pub misfire: Misfire,
    /// With [`Misfire::All`]: the most missed instants fired at once
    /// (default 100).
    pub catch_up_max: u32,
    /// Each firing's job is made ready up to this long after its due
    /// instant, spread deterministically per instant (0: none).
    pub jitter_ms: u64,
    /// Skip a firing (counted) while the queue holds at least this many
    /// ready jobs fired by this schedule; `None`: no bound.
    pub max_backlog: Option<u64>,
    pub paused: bool,
}

/// A schedule as every front door shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct ScheduleView {
    pub name: String,
    pub spec: ScheduleSpec,
    /// The next due instant; `None` while paused or when the rule has no
    /// future instant.
    pub next_fire_at_ms: Option<u64>,
    /// The due instant of the last firing.
    pub last_fire_at_ms: Option<u64>,
    /// The job of the last firing.
    pub last_job: Option<JobId>,
    /// Jobs fired (triggers included).
    pub fires: u64,
    /// Instants dropped by the misfire policy.
    pub misfires_skipped: u64,
    /// Instants skipped because of `max_backlog`.
    pub backlog_skips: u64,
    /// How late the last firing became ready after its due instant.
    pub last_skew_ms: Option<u64>,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
    /// Bumped by every change of the schedule (firings included).
    pub version: u64,
}
