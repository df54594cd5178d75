//! Workflows (API.md, "workflows"): a saga or DAG of steps, each an ordinary
//! job, whose transitions commit atomically with the job change that caused
//! them; when a step ends buried or cancelled (or the workflow is
//! cancelled), the completed steps are compensated in reverse order of
//! completion, one after another.

use std::collections::BTreeMap;

use bytes::Bytes;

use crate::model::{JobId, JobState, NewJob, QueueName};

/// Workflow ids are handed out from 1 upwards and never reused (their own
/// sequence, not job ids).
pub type WorkflowId = u64;

/// The header naming the workflow a step's (or compensation's) job belongs to.
pub const HEADER_WORKFLOW: &str = "spool-workflow";
/// The header naming the step a job runs (or compensates).
pub const HEADER_STEP: &str = "spool-step";

/// One step as a client defines it: an enqueue body plus its name, the
/// steps it waits for and what undoes it.
#[derive(Debug, Clone, PartialEq)]
pub struct NewStep {
    pub name: String,
    pub queue: QueueName,
    pub job: NewJob,
    pub depends_on: Vec<String>,
    pub compensate: Option<(QueueName, NewJob)>,
}

/// `POST /v1/workflows`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct NewWorkflow {
    pub name: Option<String>,
    /// Scoped to workflows; a second start with a live key answers the
    /// existing workflow and starts nothing.
    pub idempotency_key: Option<String>,
    pub idempotency_ttl_ms: Option<u64>,
    pub steps: Vec<NewStep>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum WorkflowState {
    Running,
    /// Every step completed.
    Succeeded,
    /// A step ended buried or cancelled, or the workflow was cancelled: no
    /// new step starts and completed steps are being undone.
    Compensating,
    /// Every compensation completed.
    Compensated,
    /// A compensation job was buried (or cancelled); kicking a buried one
    /// resumes compensating.
    CompensationFailed,
}

impl WorkflowState {
    pub const ALL: [WorkflowState; 5] = [
        WorkflowState::Running,
        WorkflowState::Succeeded,
        WorkflowState::Compensating,
        WorkflowState::Compensated,
        WorkflowState::CompensationFailed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            WorkflowState::Running => "running",
            WorkflowState::Succeeded => "succeeded",
            WorkflowState::Compensating => "compensating",
            WorkflowState::Compensated => "compensated",
            WorkflowState::CompensationFailed => "compensation_failed",
        }
    }

    pub fn parse(name: &str) -> Option<WorkflowState> {
        WorkflowState::ALL.into_iter().find(|s| s.as_str() == name)
    }

    /// Succeeded and compensated workflows never change again and are kept
    /// for the workflow retention. (A `compensation_failed` one can resume.)
    pub fn is_final(self) -> bool {
        matches!(self, WorkflowState::Succeeded | WorkflowState::Compensated)
    }
}

/// Where one step is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StepState {
    /// Waiting for the steps it depends on.
    Pending,
    /// Its job exists and is not final (ready, delayed, reserved; buried
    /// only transiently inside the commit that compensates).
    Running,
    Completed,
    /// Its job ended buried or cancelled: the cause of compensation.
    Failed,
    /// Never started, or cancelled by the workflow's compensation or cancel.
    Cancelled,
    /// Its compensation job is enqueued and not yet completed.
    Compensating,
    Compensated,
    /// Its compensation job was buried or cancelled.
    CompensationFailed,
}

impl StepState {
    pub fn as_str(self) -> &'static str {
        match self {
            StepState::Pending => "pending",
            StepState::Running => "running",
            StepState::Completed => "completed",
            StepState::Failed => "failed",
            StepState::Cancelled => "cancelled",
            StepState::Compensating => "compensating",
            StepState::Compensated => "compensated",
            StepState::CompensationFailed => "compensation_failed",
        }
    }
}

/// One step as every front door shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct StepView {
    pub name: String,
    pub queue: String,
    pub depends_on: Vec<String>,
    pub state: StepState,
    /// The step's job, once enqueued.
    pub job: Option<JobId>,
    /// That job's state, attempts and last error as last seen.
    pub job_state: Option<JobState>,
    pub attempts: u32,
    pub last_error: Option<String>,
    pub result: Option<Bytes>,
    pub completed_at_ms: Option<u64>,
    pub has_compensation: bool,
    pub compensation_job: Option<JobId>,
}

/// A workflow as every front door shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkflowView {
    pub id: WorkflowId,
    pub name: Option<String>,
    pub state: WorkflowState,
    /// In the order given at start.
    pub steps: Vec<StepView>,
    /// With `Succeeded`: step name → result (steps without a result are
    /// absent).
    pub results: BTreeMap<String, Bytes>,
    /// Why compensation started: `step <name> buried: <error>`,
    /// `step <name> cancelled`, or `workflow cancelled`.
    pub error: Option<String>,
    pub cancel_requested: bool,
    pub idempotency_key: Option<String>,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
    pub finished_at_ms: Option<u64>,
    /// Bumped by every transition.
    pub version: u64,
}

/// One page of `GET /v1/workflows`; `next` is the `after` of the next page.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkflowPage {
    pub workflows: Vec<WorkflowView>,
    pub next: Option<WorkflowId>,
}
