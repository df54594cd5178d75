//! The job model of DESIGN.md §3 as plain data: what operations take and
//! what they answer, the same for every broker and every front door.
//!
//! Times here are wall-clock milliseconds since the Unix epoch (`*_at_ms`)
//! or durations in milliseconds (`*_ms`), as the HTTP API speaks them; an
//! engine's internal clock never leaks out.

use std::collections::BTreeMap;

use bytes::Bytes;
pub use spool_proto::TubeName as QueueName;

use crate::schedule::{ScheduleName, ScheduleSpec, ScheduleView};
use crate::workflow::{NewWorkflow, WorkflowId, WorkflowPage, WorkflowState, WorkflowView};

/// Job ids are handed out from 1 upwards and never reused.
pub type JobId = u64;

/// Where a job is in its life. `Completed` and `Cancelled` are final.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum JobState {
    Ready,
    Reserved,
    Delayed,
    Buried,
    Completed,
    Cancelled,
}

impl JobState {
    pub const ALL: [JobState; 6] = [
        JobState::Ready,
        JobState::Reserved,
        JobState::Delayed,
        JobState::Buried,
        JobState::Completed,
        JobState::Cancelled,
    ];

    /// The name the APIs use (and beanstalkd's `stats-job`, for the first
    /// four).
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Ready => "ready",
            JobState::Reserved => "reserved",
            JobState::Delayed => "delayed",
            JobState::Buried => "buried",
            JobState::Completed => "completed",
            JobState::Cancelled => "cancelled",
        }
    }

    pub fn parse(name: &str) -> Option<JobState> {
        JobState::ALL.into_iter().find(|s| s.as_str() == name)
    }

    /// Completed and cancelled jobs never change again; they are kept for
    /// their queue's retention and then forgotten.
    pub fn is_final(self) -> bool {
        matches!(self, JobState::Completed | JobState::Cancelled)
    }
}

/// How a failed attempt is delayed before the next one: exponential,
/// capped, jittered.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    pub initial_ms: u64,
    pub max_ms: u64,
    /// Growth per attempt, at least 1.
    pub multiplier: f64,
    /// The delay is spread uniformly over ± this fraction of itself (0..=1).
    pub jitter: f64,
}

impl Default for Backoff {
    /// API.md's defaults: 1 s, doubling, at most an hour, ±20 %.
    fn default() -> Self {
        Backoff {
            initial_ms: 1_000,
            max_ms: 3_600_000,
            multiplier: 2.0,
            jitter: 0.2,
        }
    }
}

impl Backoff {
    /// Checks the fields; names the bad one.
    pub fn validate(&self) -> Result<(), (&'static str, &'static str)> {
        if self.max_ms < self.initial_ms {
            return Err(("backoff.max_ms", "must be at least initial_ms"));
        }
        if !(self.multiplier.is_finite() && (1.0..=1_000.0).contains(&self.multiplier)) {
            return Err(("backoff.multiplier", "must be between 1 and 1000"));
        }
        if !(self.jitter.is_finite() && (0.0..=1.0).contains(&self.jitter)) {
            return Err(("backoff.jitter", "must be between 0 and 1"));
        }
        Ok(())
    }

    /// The delay before the attempt after `failed_attempts` failures (≥ 1),
    /// with `unit` uniform in [0, 1) choosing the jitter. Callers log the
    /// run-at this gives, never the random input, so replay is exact.
    pub fn delay_ms(&self, failed_attempts: u32, unit: f64) -> u64 {
        let exponent = failed_attempts.saturating_sub(1).min(1_000) as i32;
        let base = (self.initial_ms as f64) * self.multiplier.powi(exponent);
        let base = base.min(self.max_ms as f64);
        let spread = base * self.jitter * (2.0 * unit.clamp(0.0, 1.0) - 1.0);
        (base + spread).clamp(0.0, self.max_ms as f64) as u64
    }
}

/// When a new (or changed) job should run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RunAt {
    #[default]
    Now,
    /// This long from the operation.
    DelayMs(u64),
    /// At this wall-clock instant; one in the past means now.
    AtMs(u64),
}

/// An enqueue: everything a producer may say about a new job. `None` fields
/// take the queue's policy, then API.md's defaults.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct NewJob {
    pub payload: Bytes,
    pub priority: Option<u32>,
    pub run_at: RunAt,
    pub ttr_ms: Option<u64>,
    /// 0: no limit (beanstalkd's semantics).
    pub max_attempts: Option<u32>,
    pub backoff: Option<Backoff>,
    pub headers: BTreeMap<String, String>,
    pub idempotency_key: Option<String>,
    pub idempotency_ttl_ms: Option<u64>,
    /// A workflow step's (or compensation's) inputs: step name → that
    /// step's result. Set by workflows, empty for every other job.
    pub parents: BTreeMap<String, Option<Bytes>>,
}

/// A job as every front door shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct JobView {
    pub id: JobId,
    pub queue: String,
    pub state: JobState,
    pub priority: u32,
    pub payload: Bytes,
    pub headers: BTreeMap<String, String>,
    /// Failed attempts so far (worker fails and lease expiries).
    pub attempts: u32,
    /// 0: no limit.
    pub max_attempts: u32,
    /// The backoff failed attempts get (the job's own, else the queue's,
    /// else the default).
    pub backoff: Backoff,
    pub ttr_ms: u64,
    /// When a delayed job becomes ready.
    pub run_at_ms: Option<u64>,
    /// When a reserved job's lease expires.
    pub deadline_at_ms: Option<u64>,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
    pub finished_at_ms: Option<u64>,
    pub last_error: Option<String>,
    pub result: Option<Bytes>,
    pub idempotency_key: Option<String>,
    pub cancel_requested: bool,
    /// Bumped by every change, timed ones included.
    pub version: u64,
    /// See [`NewJob::parents`].
    pub parents: BTreeMap<String, Option<Bytes>>,
}

/// Proof of a reservation: the job and the reservation's token. A lease is
/// not a connection; it ends at its deadline unless a heartbeat extends it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Lease {
    pub job: JobId,
    pub token: u64,
}

impl Lease {
    /// The form the HTTP API hands out: `<job>-<token>`.
    pub fn encode(&self) -> String {
        format!("{}-{}", self.job, self.token)
    }

    pub fn decode(text: &str) -> Option<Lease> {
        let (job, token) = text.split_once('-')?;
        Some(Lease {
            job: job.parse().ok()?,
            token: token.parse().ok()?,
        })
    }
}

/// A job handed to a worker.
#[derive(Debug, Clone, PartialEq)]
pub struct Leased {
    pub job: JobView,
    pub lease: Lease,
}

/// What an update may change (of a job that is neither reserved nor final).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct JobChange {
    pub priority: Option<u32>,
    pub run_at: Option<RunAt>,
    pub payload: Option<Bytes>,
    pub headers: Option<BTreeMap<String, String>>,
    pub max_attempts: Option<u32>,
}

/// A queue's policy: defaults for its jobs and bounds on it. `None` keeps
/// the built-in default.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct QueuePolicy {
    /// Jobs the queue may hold (not counting final ones); an enqueue beyond
    /// it is refused with [`BrokerError::QueueFull`](crate::BrokerError).
    pub max_jobs: Option<u64>,
    pub max_attempts: Option<u32>,
    pub backoff: Option<Backoff>,
    pub ttr_ms: Option<u64>,
    /// How long completed and cancelled jobs stay readable.
    pub retention_ms: Option<u64>,
    /// How many completed and cancelled jobs stay readable.
    pub retention_max_jobs: Option<u64>,
    /// The most jobs of the queue reserved at once, over both front doors.
    pub concurrency: Option<u32>,
    /// Jobs handed out per second: a token bucket holding
    /// `max(1, rate_per_s)` tokens, one per job handed out.
    pub rate_per_s: Option<f64>,
}

/// A queue's jobs by state, its pause and its policy.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct QueueInfo {
    pub name: String,
    pub ready: u64,
    pub reserved: u64,
    pub delayed: u64,
    pub buried: u64,
    /// Final jobs still retained.
    pub completed: u64,
    pub cancelled: u64,
    /// Paused until this instant, if paused.
    pub paused_until_ms: Option<u64>,
    pub policy: QueuePolicy,
}

/// One page of a listing; `next` is the `after` of the next page.
#[derive(Debug, Clone, PartialEq)]
pub struct JobPage {
    pub jobs: Vec<JobView>,
    pub next: Option<JobId>,
}

/// One broker operation: each maps to one engine call or one SQL
/// transaction, and its changes commit all or none.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    Enqueue {
        queue: QueueName,
        job: NewJob,
    },
    /// All or none, in order.
    EnqueueBatch {
        jobs: Vec<(QueueName, NewJob)>,
    },
    /// Up to `batch` ready jobs from `queues`, best priority first; waits
    /// up to `timeout_ms` for the first one.
    Reserve {
        queues: Vec<QueueName>,
        batch: u32,
        timeout_ms: u64,
    },
    Heartbeat {
        lease: Lease,
    },
    Complete {
        lease: Lease,
        result: Option<Bytes>,
    },
    Fail {
        lease: Lease,
        error: String,
        retry_in_ms: Option<u64>,
        permanent: bool,
    },
    Release {
        lease: Lease,
        delay_ms: u64,
        priority: Option<u32>,
    },
    /// Without a lease: a job that is not reserved.
    Bury {
        id: JobId,
        lease: Option<Lease>,
        reason: Option<String>,
    },
    Kick {
        id: JobId,
    },
    Cancel {
        id: JobId,
        expected_version: Option<u64>,
    },
    Get {
        id: JobId,
    },
    /// The job once it has settled (completed, cancelled or buried), or as
    /// it is after `wait_ms` (counted from when it was sent). A broker holds
    /// the wait without a thread and may refuse it past its bound of waits
    /// ([`BrokerError::TooManyWaits`](crate::BrokerError)); shutting down
    /// ends the wait with the job as it is.
    Wait {
        id: JobId,
        wait_ms: u64,
    },
    Update {
        id: JobId,
        expected_version: Option<u64>,
        change: JobChange,
    },
    Delete {
        id: JobId,
        expected_version: Option<u64>,
    },
    List {
        queue: QueueName,
        state: JobState,
        after: Option<JobId>,
        limit: u32,
    },
    Purge {
        queue: QueueName,
        state: JobState,
    },
    /// The job beanstalkd's `peek-ready`, `peek-delayed` or `peek-buried`
    /// shows for a tube: the ready job reserved next (priority, then id),
    /// the delayed job due soonest (then id), the buried job buried
    /// longest ago. Answers [`Outcome::Job`], or `NotFound` when the state
    /// holds none; another state is invalid.
    Peek {
        queue: QueueName,
        state: JobState,
    },
    SetPolicy {
        queue: QueueName,
        policy: QueuePolicy,
    },
    GetQueue {
        queue: QueueName,
    },
    ListQueues,
    Pause {
        queue: QueueName,
        duration_ms: Option<u64>,
    },
    Resume {
        queue: QueueName,
    },
    /// Creates or replaces a schedule. A replaced schedule keeps its
    /// `last_fire_at` and counters, so a replace while due neither fires an
    /// instant twice nor loses it.
    PutSchedule {
        name: ScheduleName,
        spec: Box<ScheduleSpec>,
    },
    GetSchedule {
        name: ScheduleName,
    },
    ListSchedules,
    DeleteSchedule {
        name: ScheduleName,
    },
    PauseSchedule {
        name: ScheduleName,
    },
    ResumeSchedule {
        name: ScheduleName,
    },
    /// Fires the schedule now (due instant = now), outside its rule; does
    /// not move `next_fire_at`.
    TriggerSchedule {
        name: ScheduleName,
    },
    /// Validates the DAG (400 naming the step), then enqueues the steps
    /// that depend on nothing, all in one commit.
    StartWorkflow {
        workflow: NewWorkflow,
    },
    GetWorkflow {
        id: WorkflowId,
    },
    ListWorkflows {
        state: Option<WorkflowState>,
        after: Option<WorkflowId>,
        limit: u32,
    },
    /// Stops starting steps, cancels running ones, compensates.
    CancelWorkflow {
        id: WorkflowId,
    },
}

/// What an [`Op`] answers.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Job(JobView),
    Enqueued {
        job: JobView,
        duplicate: bool,
    },
    Batch(Vec<JobView>),
    Leased(Vec<Leased>),
    /// The lease's new deadline.
    Deadline(u64),
    Page(JobPage),
    /// How many jobs a purge removed.
    Purged(u64),
    Queue(QueueInfo),
    Queues(Vec<QueueInfo>),
    Done,
    /// `created`: no schedule of that name existed.
    Schedule {
        schedule: Box<ScheduleView>,
        created: bool,
    },
    Schedules(Vec<ScheduleView>),
    /// `duplicate`: an idempotency key matched an existing workflow.
    Workflow {
        workflow: Box<WorkflowView>,
        duplicate: bool,
    },
    Workflows(WorkflowPage),
}
