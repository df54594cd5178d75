//! Plain-data pictures of the engine for metrics and introspection.
//!
//! `spool_engine::Engine::snapshot` fills an
//! [`EngineSnapshot`] at one `now`; adapters turn it into Prometheus text,
//! `/admin/*` JSON or `spool top` rows without touching the engine again.
//! Everything here is owned data, so a snapshot can cross threads and
//! outlive the round it was taken in.

use spool_proto::ServerStats;

use crate::metrics::Histogram;

/// Reserved job ids listed per session in a snapshot: enough to spot a
/// worker that hoards jobs; past it only the count grows, so one session
/// holding a million reservations cannot make a snapshot huge.
pub const SNAPSHOT_RESERVED_IDS_MAX: usize = 64;

/// How much of the engine a snapshot copies. Taking one runs on the engine's
/// single data-path thread, so a reader asks only for what it shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotScope {
    /// Queues (live and retired), server counters and flags; no sessions
    /// ([`EngineSnapshot::sessions`] is empty). For `/metrics` and
    /// `spool top`, which never show sessions.
    Queues,
    /// Everything, sessions included (one entry per client connection, with
    /// its strings and reserved ids): for introspection that lists them.
    Full,
}

/// Cumulative job events of one queue (tube), for the
/// `spool_jobs_*_total{queue}` counters. They start at zero when the
/// process starts (replaying the log counts nothing).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueCounters {
    /// Jobs put (accepted puts only).
    pub put: u64,
    /// Jobs handed to a worker: `reserve`, `reserve-with-timeout`,
    /// `reserve-job`.
    pub reserved: u64,
    pub deleted: u64,
    /// `release` commands that succeeded. Jobs that go back to ready because
    /// their session closed are not releases.
    pub released: u64,
    /// `bury` commands that succeeded.
    pub buried: u64,
    /// Jobs kicked, one per job (a `kick 10` that moves 10 jobs counts 10).
    pub kicked: u64,
    /// Reservations that expired (TTR).
    pub timed_out: u64,
    /// Failed attempts: a worker's `fail`, and a lease expiry of a job with
    /// an attempt limit (the job API's retry policy).
    pub failed: u64,
    /// Failures that buried the job (attempts used up, or a permanent
    /// failure): dead letters. Buries by hand are not counted here.
    pub dead_lettered: u64,
    /// Jobs cancelled through the job API.
    pub cancelled: u64,
    /// Jobs completed through the job API.
    pub completed: u64,
    /// Enqueues answered with an existing job (idempotency key within its
    /// ttl): no new job.
    pub duplicates: u64,
    /// Enqueues refused because the queue held `max_jobs` jobs (a batch
    /// counts once).
    pub refused_full: u64,
}

/// One queue at the snapshot's `now`.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueSnapshot {
    pub name: String,
    pub ready: u64,
    /// Ready jobs with a priority below 1024 (beanstalkd's "urgent").
    pub urgent: u64,
    pub reserved: u64,
    pub delayed: u64,
    pub buried: u64,
    /// Sessions blocked in a reserve that watch this queue.
    pub waiting_reservers: u64,
    /// Sessions using it (for puts) and watching it (for reserves).
    pub using: u64,
    pub watching: u64,
    pub paused: bool,
    /// Jobs ever put into this queue while it existed, counting replayed
    /// jobs (beanstalkd's `total-jobs`).
    pub total_jobs: u64,
    pub counters: QueueCounters,
    /// Ready → reserved.
    pub wait: Histogram,
    /// Reserved → deleted (from the last `touch`, if any: the engine keeps
    /// no separate reservation start per job).
    pub run: Histogram,
    /// Due time of a delayed job → the tick that made it ready.
    pub skew: Histogram,
}

/// A freed tube's job counters, kept so that Prometheus counters do not
/// restart at zero when a tube comes and goes. Its histograms are not kept
/// (see `spool_engine::RETIRED_QUEUES_MAX`); it holds no job
/// and no session refers to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetiredQueueSnapshot {
    pub name: String,
    pub counters: QueueCounters,
}

/// One client session at the snapshot's `now`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionSnapshot {
    pub conn_id: u64,
    pub tube_used: String,
    pub watched: Vec<String>,
    /// Reserved jobs in reservation order, at most
    /// [`SNAPSHOT_RESERVED_IDS_MAX`] of them.
    pub reserved_job_ids: Vec<u64>,
    /// All reserved jobs, listed or not.
    pub reserved_count: u64,
    /// How long it has been blocked in a reserve, if it is.
    pub blocked_in_reserve_ns: Option<u64>,
}

/// One schedule's figures (`spool_schedule_*`, `spool top`).
#[derive(Debug, Clone, PartialEq)]
pub struct ScheduleSnapshot {
    pub name: String,
    pub queue: String,
    pub paused: bool,
    pub next_fire_at_ms: Option<u64>,
    pub last_fire_at_ms: Option<u64>,
    pub last_skew_ms: Option<u64>,
    /// Jobs fired (triggers included).
    pub fires: u64,
    /// Instants dropped by the misfire policy.
    pub misfires_skipped: u64,
    /// Instants skipped for `max_backlog`.
    pub backlog_skips: u64,
    /// Due instant → fired, since this process started.
    pub skew: Histogram,
}

/// The engine at one `now`.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineSnapshot {
    /// The engine time the snapshot was taken at.
    pub now_ns: u64,
    /// Live jobs, in every state.
    pub jobs_total: u64,
    /// Live queues in `list-tubes` order.
    pub queues: Vec<QueueSnapshot>,
    /// Queues that were freed (no job, no session refers to them) after
    /// counting at least one job event, with their counters; oldest freed
    /// first, at most `spool_engine::RETIRED_QUEUES_MAX`.
    pub retired_queues: Vec<RetiredQueueSnapshot>,
    /// Sessions by id; empty when taken with [`SnapshotScope::Queues`].
    pub sessions: Vec<SessionSnapshot>,
    /// Puts are refused (SIGUSR1 drain or shutdown).
    pub draining: bool,
    /// A graceful shutdown has begun.
    pub shutting_down: bool,
    /// The log failed; durable changes are refused until restart.
    pub storage_failed: bool,
    /// The disk is full; puts are refused.
    pub disk_full: bool,
    /// The id the next job will get.
    pub next_job_id: u64,
    /// beanstalkd's `stats` counters (process fields left empty).
    pub server: ServerStats,
    /// Job-API waits held now, filled by the broker (the engine holds
    /// none; its own blocked beanstalkd reserves are in `server`).
    pub waits: WaitCounts,
    /// Schedules by name.
    pub schedules: Vec<ScheduleSnapshot>,
    /// Workflow figures; empty where a broker keeps none.
    pub workflows: WorkflowCounters,
}

/// Workflow figures for `spool_workflow*` metrics: counters since the
/// broker started (they restart at zero, as Prometheus counters may), and
/// the workflows held now by state.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkflowCounters {
    pub started: u64,
    /// By the state reached: succeeded, compensated, compensation_failed.
    pub finished: std::collections::BTreeMap<&'static str, u64>,
    /// Steps and compensations by outcome: completed, failed, cancelled,
    /// compensated, compensation_failed.
    pub steps: std::collections::BTreeMap<&'static str, u64>,
    /// Start to succeeded, compensated or compensation_failed.
    pub duration: Histogram,
    /// Workflows held now (live and retained), by state.
    pub current: std::collections::BTreeMap<&'static str, u64>,
}

impl Default for WorkflowCounters {
    fn default() -> Self {
        WorkflowCounters {
            started: 0,
            finished: Default::default(),
            steps: Default::default(),
            duration: Histogram::queue_latency(),
            current: Default::default(),
        }
    }
}

/// Job-API requests a broker holds open now, for `spool_waits{kind}`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WaitCounts {
    /// `POST /v1/reserve` calls parked until a job is ready or their timeout.
    pub reserve: u64,
    /// `?wait_ms` enqueues and gets waiting for their job to settle.
    pub job: u64,
}
