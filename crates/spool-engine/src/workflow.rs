//! Workflows (API.md, "Workflows") as a pure state machine, shared by every
//! broker: the in-memory engine and the PostgreSQL broker call the same
//! functions, so both run the same rules.
//!
//! A [`Workflow`] is plain data: what the client defined ([`StepSpec`]s) and
//! where each step is ([`StepProgress`]), plus the workflow's own state. The
//! broker feeds it events (a step's or compensation's job completed, was
//! buried, was cancelled or deleted, was kicked; the workflow was cancelled)
//! and carries out the [`Effects`] it returns (enqueue these jobs, cancel
//! those) in the same commit as the job change that caused the event. The
//! only state changes are the ones [`workflow_transition_is_legal`] and
//! [`step_transition_is_legal`] allow; every change goes through them.
//!
//! Rules:
//! - a step's job is enqueued once every step it depends on completed, with
//!   `parents` {dependency → its result} and the headers `spool-workflow` and
//!   `spool-step`; when every step completed the workflow `succeeded`;
//! - a step's job buried (attempts used up or by hand), cancelled or deleted,
//!   or the workflow cancelled: `compensating`. Pending steps never start,
//!   running step jobs are cancelled, and the completed steps that have a
//!   `compensate` body are undone in reverse order of completion, one at a
//!   time, each compensation job getting `parents` {step → its result};
//! - all undone: `compensated`; a compensation job buried, cancelled or
//!   deleted: `compensation_failed`; kicking that buried job resumes
//!   `compensating`;
//! - a step failing with attempts left is just retried: the broker sends no
//!   event for it.
//!
//! Events about jobs the workflow no longer waits on (a step's buried job
//! kicked after compensation began, a step completing after it was cancelled)
//! change nothing. Times are wall-clock milliseconds.

use std::collections::BTreeMap;

use bytes::Bytes;
pub use spool_broker::workflow::{HEADER_STEP, HEADER_WORKFLOW};
use spool_broker::{BrokerError, JobId, JobState, NewJob, QueueName, RunAt};
pub use spool_broker::{
    NewStep, NewWorkflow, StepState, StepView, WorkflowId, WorkflowState, WorkflowView,
};

use crate::limits;
use crate::record::{Reader, RecordError, Writer};
use crate::validate;

/// One step as defined at start, with `depends_on` as indices into the
/// workflow's steps.
#[derive(Debug, Clone, PartialEq)]
pub struct StepSpec {
    pub name: String,
    pub queue: QueueName,
    /// The step job's template; `parents` and the workflow headers are added
    /// when it is enqueued.
    pub job: NewJob,
    pub depends_on: Vec<u32>,
    pub compensate: Option<(QueueName, NewJob)>,
}

/// Where one step is: everything about it that changes.
#[derive(Debug, Clone, PartialEq)]
pub struct StepProgress {
    pub state: StepState,
    /// The step's job, once enqueued.
    pub job: Option<JobId>,
    pub result: Option<Bytes>,
    /// Why the step's job failed (buried) or the compensation job's error.
    pub error: Option<String>,
    /// Order of completion among the workflow's steps, from 1; 0 while not
    /// completed. Compensation runs in descending order of it.
    pub completed_seq: u32,
    pub completed_at_ms: Option<u64>,
    pub compensation_job: Option<JobId>,
}

impl Default for StepProgress {
    fn default() -> Self {
        StepProgress {
            state: StepState::Pending,
            job: None,
            result: None,
            error: None,
            completed_seq: 0,
            completed_at_ms: None,
            compensation_job: None,
        }
    }
}

/// The workflow-level fields that change with transitions.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkflowStatus {
    pub state: WorkflowState,
    /// Why compensation started.
    pub error: Option<String>,
    pub cancel_requested: bool,
    pub updated_at_ms: u64,
    pub finished_at_ms: Option<u64>,
    /// Bumped by every change.
    pub version: u64,
}

/// A workflow: its definition and its progress, as plain data that the log
/// and SQL both store ([`Workflow::encode`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Workflow {
    pub id: WorkflowId,
    pub name: Option<String>,
    pub idempotency_key: Option<String>,
    /// Wall-clock ms after which the key no longer matches.
    pub idempotency_expires_at_ms: u64,
    pub created_at_ms: u64,
    pub steps: Vec<StepSpec>,
    /// One per step, same order.
    pub progress: Vec<StepProgress>,
    pub status: WorkflowStatus,
}

/// Which of a step's two jobs an event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobRole {
    Step,
    Compensation,
}

/// What happened to a job of the workflow.
#[derive(Debug, Clone, PartialEq)]
pub enum JobEvent {
    /// Completed, with its result (`None`: none given, e.g. a beanstalkd
    /// worker's `delete` of its reserved job).
    Completed { result: Option<Bytes> },
    /// Buried: attempts used up, or buried by hand.
    Buried { error: Option<String> },
    /// Cancelled, or deleted before it completed.
    Cancelled,
    /// Kicked from buried back to ready.
    Kicked,
}

/// A job the broker must enqueue, in the same commit, then report with
/// [`Workflow::attach_job`].
#[derive(Debug, Clone, PartialEq)]
pub struct Enqueue {
    pub step: u32,
    pub role: JobRole,
    pub queue: QueueName,
    /// With `parents` and the workflow headers set.
    pub job: NewJob,
}

/// What the broker must do after a transition, in the same commit.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Effects {
    pub enqueue: Vec<Enqueue>,
    /// Step jobs to cancel (they are running and will never be needed).
    pub cancel: Vec<JobId>,
    /// The steps whose progress changed, ascending, without repeats.
    pub changed_steps: Vec<u32>,
    /// The workflow's state before and after, when it changed.
    pub transition: Option<(WorkflowState, WorkflowState)>,
    /// Anything changed at all (the status, a step): log it.
    pub changed: bool,
}

/// The workflow state changes the rules allow.
pub fn workflow_transition_is_legal(from: WorkflowState, to: WorkflowState) -> bool {
    use WorkflowState::*;
    matches!(
        (from, to),
        (Running, Succeeded)
            | (Running, Compensating)
            | (Compensating, Compensated)
            | (Compensating, CompensationFailed)
            | (CompensationFailed, Compensating)
    )
}

/// The step state changes the rules allow.
pub fn step_transition_is_legal(from: StepState, to: StepState) -> bool {
    use StepState::*;
    matches!(
        (from, to),
        (Pending, Running)
            | (Pending, Cancelled)
            | (Running, Completed)
            | (Running, Failed)
            | (Running, Cancelled)
            | (Completed, Compensating)
            | (Compensating, Compensated)
            | (Compensating, CompensationFailed)
            | (CompensationFailed, Compensating)
    )
}

fn illegal(what: &str) -> BrokerError {
    BrokerError::Internal(format!("illegal workflow transition: {what}"))
}

/// Checks a workflow definition: names, limits, each step's job, and the
/// graph (unknown dependencies, cycles). Errors name the step.
pub fn validate(workflow: &NewWorkflow) -> Result<(), BrokerError> {
    if let Some(name) = &workflow.name {
        if name.len() > limits::WORKFLOW_NAME_MAX_BYTES {
            return Err(BrokerError::invalid(
                "name",
                format!("at most {} bytes", limits::WORKFLOW_NAME_MAX_BYTES),
            ));
        }
    }
    if let Some(key) = &workflow.idempotency_key {
        if key.is_empty() || key.len() > limits::IDEMPOTENCY_KEY_MAX_BYTES {
            return Err(BrokerError::invalid(
                "idempotency_key",
                format!("1 to {} bytes", limits::IDEMPOTENCY_KEY_MAX_BYTES),
            ));
        }
    }
    if workflow.steps.is_empty() {
        return Err(BrokerError::invalid(
            "steps",
            "a workflow has at least one step",
        ));
    }
    if workflow.steps.len() > limits::WORKFLOW_STEPS_MAX {
        return Err(BrokerError::invalid(
            "steps",
            format!("at most {} steps", limits::WORKFLOW_STEPS_MAX),
        ));
    }
    let mut index: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, step) in workflow.steps.iter().enumerate() {
        if step.name.is_empty() || step.name.len() > limits::WORKFLOW_STEP_NAME_MAX_BYTES {
            return Err(BrokerError::invalid(
                "steps.name",
                format!(
                    "step {} has an empty or too long name (1 to {} bytes)",
                    i + 1,
                    limits::WORKFLOW_STEP_NAME_MAX_BYTES
                ),
            ));
        }
        if index.insert(&step.name, i).is_some() {
            return Err(BrokerError::invalid(
                "steps.name",
                format!("step {:?}: duplicate step name", step.name),
            ));
        }
    }
    for step in &workflow.steps {
        check_step_job(&step.name, &step.job, "steps.job")?;
        if let Some((_, job)) = &step.compensate {
            check_step_job(&step.name, job, "steps.compensate")?;
        }
        if step.depends_on.len() > limits::WORKFLOW_DEPENDS_ON_MAX {
            return Err(BrokerError::invalid(
                "steps.depends_on",
                format!(
                    "step {:?}: at most {} dependencies",
                    step.name,
                    limits::WORKFLOW_DEPENDS_ON_MAX
                ),
            ));
        }
        for (k, dep) in step.depends_on.iter().enumerate() {
            if !index.contains_key(dep.as_str()) {
                return Err(BrokerError::invalid(
                    "steps.depends_on",
                    format!("step {:?} depends on unknown step {dep:?}", step.name),
                ));
            }
            if step.depends_on[..k].contains(dep) {
                return Err(BrokerError::invalid(
                    "steps.depends_on",
                    format!("step {:?} names {dep:?} twice", step.name),
                ));
            }
        }
    }
    let deps: Vec<Vec<usize>> = workflow
        .steps
        .iter()
        .map(|s| {
            s.depends_on
                .iter()
                .filter_map(|d| index.get(d.as_str()).copied())
                .collect()
        })
        .collect();
    if let Some(on_cycle) = step_on_a_cycle(&deps) {
        return Err(BrokerError::invalid(
            "steps.depends_on",
            format!(
                "step {:?} is on a dependency cycle",
                workflow.steps[on_cycle].name
            ),
        ));
    }
    Ok(())
}

fn check_step_job(step: &str, job: &NewJob, field: &'static str) -> Result<(), BrokerError> {
    let named = |e: BrokerError| match e {
        BrokerError::Invalid { message, .. } => {
            BrokerError::invalid(field, format!("step {step:?}: {message}"))
        }
        other => other,
    };
    validate::check_headers(&job.headers).map_err(named)?;
    validate::check_backoff(job.backoff.as_ref()).map_err(named)?;
    if job.idempotency_key.is_some() {
        return Err(BrokerError::invalid(
            field,
            format!(
                "step {step:?}: a step's job takes no idempotency_key (the workflow's covers it)"
            ),
        ));
    }
    if job.ttr_ms.is_some_and(|t| t > limits::TTR_MS_MAX) {
        return Err(BrokerError::invalid(
            field,
            format!("step {step:?}: ttr_ms too large"),
        ));
    }
    if matches!(job.run_at, RunAt::DelayMs(d) if d > limits::DELAY_MS_MAX) {
        return Err(BrokerError::invalid(
            field,
            format!("step {step:?}: delay_ms too large"),
        ));
    }
    Ok(())
}

/// A step on a cycle of `deps` (step → the steps it depends on), if any:
/// Kahn's algorithm removes every step not downstream of a cycle; from any
/// step left, following dependencies that are left must revisit a step,
/// and the first step revisited is on a cycle.
fn step_on_a_cycle(deps: &[Vec<usize>]) -> Option<usize> {
    let n = deps.len();
    let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); n];
    let mut waiting: Vec<usize> = deps.iter().map(Vec::len).collect();
    for (step, ds) in deps.iter().enumerate() {
        for &d in ds {
            dependents[d].push(step);
        }
    }
    let mut ready: Vec<usize> = (0..n).filter(|&s| waiting[s] == 0).collect();
    let mut removed = vec![false; n];
    while let Some(step) = ready.pop() {
        removed[step] = true;
        for &after in &dependents[step] {
            waiting[after] -= 1;
            if waiting[after] == 0 {
                ready.push(after);
            }
        }
    }
    let mut at = (0..n).find(|&s| !removed[s])?;
    let mut seen = vec![false; n];
    while !seen[at] {
        seen[at] = true;
        // A step left has at least one dependency left.
        at = deps[at].iter().copied().find(|&d| !removed[d])?;
    }
    Some(at)
}

impl Workflow {
    /// Validates `definition` and starts it: the steps that depend on
    /// nothing are to be enqueued. `idempotency_ttl_ms` defaults to the job
    /// default (24 h).
    pub fn start(
        id: WorkflowId,
        definition: NewWorkflow,
        now_ms: u64,
    ) -> Result<(Workflow, Effects), BrokerError> {
        validate(&definition)?;
        let index: BTreeMap<String, u32> = definition
            .steps
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.clone(), i as u32))
            .collect();
        let steps: Vec<StepSpec> = definition
            .steps
            .into_iter()
            .map(|s| StepSpec {
                depends_on: s
                    .depends_on
                    .iter()
                    .filter_map(|d| index.get(d).copied())
                    .collect(),
                name: s.name,
                queue: s.queue,
                job: s.job,
                compensate: s.compensate,
            })
            .collect();
        let ttl_ms = definition
            .idempotency_ttl_ms
            .unwrap_or(limits::IDEMPOTENCY_TTL_MS_DEFAULT);
        let mut workflow = Workflow {
            id,
            name: definition.name,
            idempotency_expires_at_ms: if definition.idempotency_key.is_some() {
                now_ms.saturating_add(ttl_ms)
            } else {
                0
            },
            idempotency_key: definition.idempotency_key,
            created_at_ms: now_ms,
            progress: vec![StepProgress::default(); steps.len()],
            steps,
            status: WorkflowStatus {
                state: WorkflowState::Running,
                error: None,
                cancel_requested: false,
                updated_at_ms: now_ms,
                finished_at_ms: None,
                version: 1,
            },
        };
        let mut fx = Effects::default();
        workflow.start_ready_steps(&mut fx)?;
        fx.changed = true;
        Ok((workflow, fx))
    }

    /// Records the id of a job enqueued for an [`Enqueue`] effect. Part of
    /// the same change: log the progress after attaching.
    pub fn attach_job(&mut self, step: u32, role: JobRole, job: JobId) {
        if let Some(progress) = self.progress.get_mut(step as usize) {
            match role {
                JobRole::Step => progress.job = Some(job),
                JobRole::Compensation => progress.compensation_job = Some(job),
            }
        }
    }

    /// The step whose job (of `role`) is `job`, if any.
    pub fn step_of_job(&self, job: JobId) -> Option<(u32, JobRole)> {
        self.progress.iter().enumerate().find_map(|(i, p)| {
            if p.job == Some(job) {
                Some((i as u32, JobRole::Step))
            } else if p.compensation_job == Some(job) {
                Some((i as u32, JobRole::Compensation))
            } else {
                None
            }
        })
    }

    /// The `parents` of a step's job (its dependencies' results) or of its
    /// compensation's (the step's own result).
    pub fn parents(&self, step: u32, role: JobRole) -> BTreeMap<String, Option<Bytes>> {
        let Some(spec) = self.steps.get(step as usize) else {
            return BTreeMap::new();
        };
        let of = |i: u32| {
            let i = i as usize;
            (self.steps[i].name.clone(), self.progress[i].result.clone())
        };
        match role {
            JobRole::Step => spec.depends_on.iter().map(|&d| of(d)).collect(),
            JobRole::Compensation => std::iter::once(of(step)).collect(),
        }
    }

    /// Every job id the workflow names, with its step and role.
    pub fn jobs(&self) -> impl Iterator<Item = (JobId, u32, JobRole)> + '_ {
        self.progress.iter().enumerate().flat_map(|(i, p)| {
            let step = p.job.map(|j| (j, i as u32, JobRole::Step));
            let comp = p
                .compensation_job
                .map(|j| (j, i as u32, JobRole::Compensation));
            step.into_iter().chain(comp)
        })
    }

    /// A job of the workflow changed. Events the workflow is not waiting
    /// for change nothing (`changed` false).
    pub fn on_job(
        &mut self,
        step: u32,
        role: JobRole,
        event: JobEvent,
        now_ms: u64,
    ) -> Result<Effects, BrokerError> {
        let i = step as usize;
        let Some(progress) = self.progress.get(i) else {
            return Err(BrokerError::Internal(format!(
                "workflow {} has no step {step}",
                self.id
            )));
        };
        let mut fx = Effects::default();
        let state = self.status.state;
        match (role, progress.state, event) {
            (JobRole::Step, StepState::Running, JobEvent::Completed { result }) => {
                let seq = self
                    .progress
                    .iter()
                    .map(|p| p.completed_seq)
                    .max()
                    .unwrap_or(0)
                    + 1;
                self.set_step(&mut fx, step, StepState::Completed)?;
                let p = &mut self.progress[i];
                p.result = result;
                p.completed_seq = seq;
                p.completed_at_ms = Some(now_ms);
                if self
                    .progress
                    .iter()
                    .all(|p| p.state == StepState::Completed)
                {
                    self.set_state(&mut fx, WorkflowState::Succeeded, now_ms)?;
                } else if state == WorkflowState::Running {
                    self.start_ready_steps(&mut fx)?;
                }
            }
            (JobRole::Step, StepState::Running, JobEvent::Buried { error }) => {
                let name = &self.steps[i].name;
                let why = match &error {
                    Some(e) => format!("step {name} buried: {e}"),
                    None => format!("step {name} buried"),
                };
                self.set_step(&mut fx, step, StepState::Failed)?;
                self.progress[i].error = error;
                self.begin_compensation(&mut fx, why, now_ms)?;
            }
            (JobRole::Step, StepState::Running, JobEvent::Cancelled) => {
                let why = format!("step {} cancelled", self.steps[i].name);
                self.set_step(&mut fx, step, StepState::Failed)?;
                self.begin_compensation(&mut fx, why, now_ms)?;
            }
            (JobRole::Compensation, StepState::Compensating, JobEvent::Completed { .. }) => {
                self.set_step(&mut fx, step, StepState::Compensated)?;
                self.compensate_next(&mut fx, now_ms)?;
            }
            (JobRole::Compensation, StepState::Compensating, JobEvent::Buried { error }) => {
                self.set_step(&mut fx, step, StepState::CompensationFailed)?;
                self.progress[i].error = error;
                self.set_state(&mut fx, WorkflowState::CompensationFailed, now_ms)?;
            }
            (JobRole::Compensation, StepState::Compensating, JobEvent::Cancelled) => {
                self.set_step(&mut fx, step, StepState::CompensationFailed)?;
                self.progress[i].error = Some("compensation job cancelled".into());
                self.set_state(&mut fx, WorkflowState::CompensationFailed, now_ms)?;
            }
            (JobRole::Compensation, StepState::CompensationFailed, JobEvent::Kicked)
                if state == WorkflowState::CompensationFailed =>
            {
                self.set_step(&mut fx, step, StepState::Compensating)?;
                self.set_state(&mut fx, WorkflowState::Compensating, now_ms)?;
            }
            _ => {}
        }
        self.finish(&mut fx, now_ms);
        Ok(fx)
    }

    /// `POST /v1/workflows/{id}/cancel`. A running workflow starts
    /// compensating; one already compensating (or failed at it) only notes
    /// the request; a succeeded or compensated one is a conflict.
    pub fn cancel(&mut self, now_ms: u64) -> Result<Effects, BrokerError> {
        let mut fx = Effects::default();
        match self.status.state {
            WorkflowState::Succeeded | WorkflowState::Compensated => {
                return Err(BrokerError::Conflict(spool_broker::Conflict::WrongState(
                    JobState::Completed,
                )));
            }
            WorkflowState::Running => {
                self.status.cancel_requested = true;
                fx.changed = true;
                self.begin_compensation(&mut fx, "workflow cancelled".into(), now_ms)?;
            }
            WorkflowState::Compensating | WorkflowState::CompensationFailed => {
                if !self.status.cancel_requested {
                    self.status.cancel_requested = true;
                    fx.changed = true;
                }
            }
        }
        self.finish(&mut fx, now_ms);
        Ok(fx)
    }

    /// The view every front door shows. `job` looks up a live job's state,
    /// attempts and last error (`None`: gone, e.g. past its retention).
    pub fn view(
        &self,
        job: impl Fn(JobId) -> Option<(JobState, u32, Option<String>)>,
    ) -> WorkflowView {
        let steps = self
            .steps
            .iter()
            .zip(&self.progress)
            .map(|(spec, p)| {
                let live = p.job.and_then(&job);
                let (job_state, attempts, last_error) = match live {
                    Some((state, attempts, error)) => (Some(state), attempts, error),
                    None => (None, 0, None),
                };
                StepView {
                    name: spec.name.clone(),
                    queue: spec.queue.as_str().to_owned(),
                    depends_on: spec
                        .depends_on
                        .iter()
                        .map(|&d| self.steps[d as usize].name.clone())
                        .collect(),
                    state: p.state,
                    job: p.job,
                    job_state,
                    attempts,
                    last_error: last_error.or_else(|| p.error.clone()),
                    result: p.result.clone(),
                    completed_at_ms: p.completed_at_ms,
                    has_compensation: spec.compensate.is_some(),
                    compensation_job: p.compensation_job,
                }
            })
            .collect();
        let results = if self.status.state == WorkflowState::Succeeded {
            self.steps
                .iter()
                .zip(&self.progress)
                .filter_map(|(s, p)| Some((s.name.clone(), p.result.clone()?)))
                .collect()
        } else {
            BTreeMap::new()
        };
        WorkflowView {
            id: self.id,
            name: self.name.clone(),
            state: self.status.state,
            steps,
            results,
            error: self.status.error.clone(),
            cancel_requested: self.status.cancel_requested,
            idempotency_key: self.idempotency_key.clone(),
            created_at_ms: self.created_at_ms,
            updated_at_ms: self.status.updated_at_ms,
            finished_at_ms: self.status.finished_at_ms,
            version: self.status.version,
        }
    }

    fn set_state(
        &mut self,
        fx: &mut Effects,
        to: WorkflowState,
        now_ms: u64,
    ) -> Result<(), BrokerError> {
        let from = self.status.state;
        if !workflow_transition_is_legal(from, to) {
            return Err(illegal(&format!(
                "workflow {} {} → {}",
                self.id,
                from.as_str(),
                to.as_str()
            )));
        }
        self.status.state = to;
        if to.is_final() {
            self.status.finished_at_ms = Some(now_ms);
        }
        fx.transition = Some(match fx.transition {
            Some((first, _)) => (first, to),
            None => (from, to),
        });
        fx.changed = true;
        Ok(())
    }

    fn set_step(&mut self, fx: &mut Effects, step: u32, to: StepState) -> Result<(), BrokerError> {
        let p = &mut self.progress[step as usize];
        if !step_transition_is_legal(p.state, to) {
            return Err(illegal(&format!(
                "workflow {} step {} {} → {}",
                self.id,
                self.steps[step as usize].name,
                p.state.as_str(),
                to.as_str()
            )));
        }
        p.state = to;
        if let Err(at) = fx.changed_steps.binary_search(&step) {
            fx.changed_steps.insert(at, step);
        }
        fx.changed = true;
        Ok(())
    }

    /// Enqueues every pending step whose dependencies all completed.
    fn start_ready_steps(&mut self, fx: &mut Effects) -> Result<(), BrokerError> {
        for i in 0..self.steps.len() {
            let ready = self.progress[i].state == StepState::Pending
                && self.steps[i]
                    .depends_on
                    .iter()
                    .all(|&d| self.progress[d as usize].state == StepState::Completed);
            if ready {
                self.set_step(fx, i as u32, StepState::Running)?;
                let spec = &self.steps[i];
                let job = self.with_workflow_fields(spec.job.clone(), i as u32, JobRole::Step);
                fx.enqueue.push(Enqueue {
                    step: i as u32,
                    role: JobRole::Step,
                    queue: spec.queue.clone(),
                    job,
                });
            }
        }
        Ok(())
    }

    fn with_workflow_fields(&self, mut job: NewJob, step: u32, role: JobRole) -> NewJob {
        job.headers
            .insert(HEADER_WORKFLOW.to_owned(), self.id.to_string());
        job.headers.insert(
            HEADER_STEP.to_owned(),
            self.steps[step as usize].name.clone(),
        );
        job.parents = self.parents(step, role);
        job
    }

    fn begin_compensation(
        &mut self,
        fx: &mut Effects,
        why: String,
        now_ms: u64,
    ) -> Result<(), BrokerError> {
        self.set_state(fx, WorkflowState::Compensating, now_ms)?;
        self.status.error = Some(why);
        for i in 0..self.steps.len() {
            match self.progress[i].state {
                StepState::Pending => self.set_step(fx, i as u32, StepState::Cancelled)?,
                StepState::Running => {
                    self.set_step(fx, i as u32, StepState::Cancelled)?;
                    fx.cancel.extend(self.progress[i].job);
                }
                _ => {}
            }
        }
        self.compensate_next(fx, now_ms)
    }

    /// Enqueues the compensation of the most recently completed step that
    /// has one and is not undone yet; with none left, `compensated`.
    fn compensate_next(&mut self, fx: &mut Effects, now_ms: u64) -> Result<(), BrokerError> {
        let next = (0..self.steps.len())
            .filter(|&i| {
                self.progress[i].state == StepState::Completed && self.steps[i].compensate.is_some()
            })
            .max_by_key(|&i| self.progress[i].completed_seq);
        let Some(i) = next else {
            return self.set_state(fx, WorkflowState::Compensated, now_ms);
        };
        self.set_step(fx, i as u32, StepState::Compensating)?;
        if let Some((queue, job)) = &self.steps[i].compensate {
            let job = self.with_workflow_fields(job.clone(), i as u32, JobRole::Compensation);
            fx.enqueue.push(Enqueue {
                step: i as u32,
                role: JobRole::Compensation,
                queue: queue.clone(),
                job,
            });
        }
        Ok(())
    }

    fn finish(&mut self, fx: &mut Effects, now_ms: u64) {
        if fx.changed {
            self.status.version += 1;
            self.status.updated_at_ms = now_ms;
        }
    }

    /// The changing part of the workflow after a transition: what the log
    /// records for it (the definition was logged at start).
    pub fn progress_record(&self, changed_steps: &[u32]) -> WorkflowProgress {
        WorkflowProgress {
            id: self.id,
            status: self.status.clone(),
            steps: changed_steps
                .iter()
                .filter_map(|&s| Some((s, self.progress.get(s as usize)?.clone())))
                .collect(),
        }
    }

    /// Replays a [`WorkflowProgress`] of this workflow.
    pub fn apply_progress(&mut self, record: &WorkflowProgress) -> Result<(), RecordError> {
        for (step, progress) in &record.steps {
            let slot = self
                .progress
                .get_mut(*step as usize)
                .ok_or(RecordError::Truncated)?;
            *slot = progress.clone();
        }
        self.status = record.status.clone();
        Ok(())
    }
}

/// A transition's changes as the log stores them: the status and the steps
/// that changed.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkflowProgress {
    pub id: WorkflowId,
    pub status: WorkflowStatus,
    pub steps: Vec<(u32, StepProgress)>,
}

/// Version of the workflow encodings below; the first byte of each.
pub const WORKFLOW_FORMAT_VERSION: u8 = 1;

// Byte layout (little-endian; strN/bytesN/opt as in `record.rs`):
//
// workflow: u8 version 1 | u64 id | opt str32 name | opt str16 key
//   | u64 key_expires_ms | u64 created_ms | status | u32 step count
//   | count × (step spec) | count × (step progress)
// status: u8 state | opt str32 error | u8 flags (1 cancel requested)
//   | u64 updated_ms | opt u64 finished_ms | u64 version
// step spec: str16 name | str16 queue | new job | u32 dep count × u32 dep
//   | opt (str16 queue, new job)
// new job: bytes32 payload | opt u32 priority | run_at | opt u64 ttr_ms
//   | opt u32 max_attempts | opt backoff | u16 header count × (str16, str32)
//   | opt u64 idempotency_ttl_ms
// run_at: u8 0 now | 1 then u64 delay_ms | 2 then u64 at_ms
// step progress: u8 state | opt u64 job | opt bytes32 result
//   | opt str32 error | u32 completed_seq | opt u64 completed_ms
//   | opt u64 compensation job
// progress: u8 version 1 | u64 id | status | u32 count × (u32 step, step progress)

fn step_state_code(s: StepState) -> u8 {
    match s {
        StepState::Pending => 0,
        StepState::Running => 1,
        StepState::Completed => 2,
        StepState::Failed => 3,
        StepState::Cancelled => 4,
        StepState::Compensating => 5,
        StepState::Compensated => 6,
        StepState::CompensationFailed => 7,
    }
}

fn step_state_of(code: u8) -> Result<StepState, RecordError> {
    Ok(match code {
        0 => StepState::Pending,
        1 => StepState::Running,
        2 => StepState::Completed,
        3 => StepState::Failed,
        4 => StepState::Cancelled,
        5 => StepState::Compensating,
        6 => StepState::Compensated,
        7 => StepState::CompensationFailed,
        other => return Err(RecordError::UnknownState(other)),
    })
}

fn workflow_state_code(s: WorkflowState) -> u8 {
    match s {
        WorkflowState::Running => 0,
        WorkflowState::Succeeded => 1,
        WorkflowState::Compensating => 2,
        WorkflowState::Compensated => 3,
        WorkflowState::CompensationFailed => 4,
    }
}

fn workflow_state_of(code: u8) -> Result<WorkflowState, RecordError> {
    Ok(match code {
        0 => WorkflowState::Running,
        1 => WorkflowState::Succeeded,
        2 => WorkflowState::Compensating,
        3 => WorkflowState::Compensated,
        4 => WorkflowState::CompensationFailed,
        other => return Err(RecordError::UnknownState(other)),
    })
}

// opt_u64 and opt_u32 are record.rs's, shared with schedules.
impl Writer<'_> {
    fn opt_str16(&mut self, s: Option<&str>) {
        match s {
            Some(s) => {
                self.u8(1);
                self.str16(s);
            }
            None => self.u8(0),
        }
    }
    fn status(&mut self, s: &WorkflowStatus) {
        self.u8(workflow_state_code(s.state));
        self.opt_str32(s.error.as_deref());
        self.u8(u8::from(s.cancel_requested));
        self.u64(s.updated_at_ms);
        self.opt_u64(s.finished_at_ms);
        self.u64(s.version);
    }
    fn step_progress(&mut self, p: &StepProgress) {
        self.u8(step_state_code(p.state));
        self.opt_u64(p.job);
        self.opt_bytes32(p.result.as_ref());
        self.opt_str32(p.error.as_deref());
        self.u32(p.completed_seq);
        self.opt_u64(p.completed_at_ms);
        self.opt_u64(p.compensation_job);
    }
}

impl Reader<'_> {
    fn opt_str16(&mut self) -> Result<Option<String>, RecordError> {
        Ok(if self.present()? {
            Some(self.str16()?)
        } else {
            None
        })
    }
    fn queue(&mut self) -> Result<QueueName, RecordError> {
        let name = self.str16()?;
        QueueName::new(name.as_bytes()).map_err(|_| RecordError::BadTubeName)
    }
    fn version(&mut self) -> Result<(), RecordError> {
        match self.u8()? {
            WORKFLOW_FORMAT_VERSION => Ok(()),
            other => Err(RecordError::UnknownVersion(other)),
        }
    }
    fn status(&mut self) -> Result<WorkflowStatus, RecordError> {
        Ok(WorkflowStatus {
            state: workflow_state_of(self.u8()?)?,
            error: self.opt_str32()?,
            cancel_requested: self.u8()? & 1 == 1,
            updated_at_ms: self.u64()?,
            finished_at_ms: self.opt_u64()?,
            version: self.u64()?,
        })
    }
    fn step_progress(&mut self) -> Result<StepProgress, RecordError> {
        Ok(StepProgress {
            state: step_state_of(self.u8()?)?,
            job: self.opt_u64()?,
            result: self.opt_bytes32()?,
            error: self.opt_str32()?,
            completed_seq: self.u32()?,
            completed_at_ms: self.opt_u64()?,
            compensation_job: self.opt_u64()?,
        })
    }
}

impl Workflow {
    /// The whole workflow as bytes (layout above), for the log's start and
    /// snapshot records and for a database column.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut w = Writer { out, epoch_ns: 0 };
        w.u8(WORKFLOW_FORMAT_VERSION);
        w.u64(self.id);
        w.opt_str32(self.name.as_deref());
        w.opt_str16(self.idempotency_key.as_deref());
        w.u64(self.idempotency_expires_at_ms);
        w.u64(self.created_at_ms);
        w.status(&self.status);
        // Bounded by `limits::WORKFLOW_STEPS_MAX`.
        w.u32(self.steps.len() as u32);
        for step in &self.steps {
            w.str16(&step.name);
            w.str16(step.queue.as_str());
            w.new_job(&step.job);
            w.u32(step.depends_on.len() as u32);
            for &d in &step.depends_on {
                w.u32(d);
            }
            match &step.compensate {
                Some((queue, job)) => {
                    w.u8(1);
                    w.str16(queue.as_str());
                    w.new_job(job);
                }
                None => w.u8(0),
            }
        }
        for p in &self.progress {
            w.step_progress(p);
        }
    }

    /// Reads what [`Workflow::encode`] wrote; the whole input must be used.
    pub fn decode(bytes: &[u8]) -> Result<Workflow, RecordError> {
        let mut r = Reader {
            buf: bytes,
            epoch_ns: 0,
        };
        r.version()?;
        let id = r.u64()?;
        let name = r.opt_str32()?;
        let idempotency_key = r.opt_str16()?;
        let idempotency_expires_at_ms = r.u64()?;
        let created_at_ms = r.u64()?;
        let status = r.status()?;
        let count = r.u32()? as usize;
        // Each step takes far more than one byte: a bad count cannot make
        // us reserve more than the input's size.
        let mut steps = Vec::with_capacity(count.min(r.buf.len()));
        for _ in 0..count {
            let name = r.str16()?;
            let queue = r.queue()?;
            let job = r.new_job()?;
            let deps = r.u32()? as usize;
            let mut depends_on = Vec::with_capacity(deps.min(r.buf.len()));
            for _ in 0..deps {
                let d = r.u32()?;
                if d as usize >= count {
                    return Err(RecordError::Truncated);
                }
                depends_on.push(d);
            }
            let compensate = if r.present()? {
                Some((r.queue()?, r.new_job()?))
            } else {
                None
            };
            steps.push(StepSpec {
                name,
                queue,
                job,
                depends_on,
                compensate,
            });
        }
        let mut progress = Vec::with_capacity(count.min(r.buf.len()));
        for _ in 0..count {
            progress.push(r.step_progress()?);
        }
        if !r.buf.is_empty() {
            return Err(RecordError::Truncated);
        }
        Ok(Workflow {
            id,
            name,
            idempotency_key,
            idempotency_expires_at_ms,
            created_at_ms,
            steps,
            progress,
            status,
        })
    }
}

impl WorkflowProgress {
    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut w = Writer { out, epoch_ns: 0 };
        w.u8(WORKFLOW_FORMAT_VERSION);
        w.u64(self.id);
        w.status(&self.status);
        w.u32(self.steps.len() as u32);
        for (step, p) in &self.steps {
            w.u32(*step);
            w.step_progress(p);
        }
    }

    pub fn decode(bytes: &[u8]) -> Result<WorkflowProgress, RecordError> {
        let mut r = Reader {
            buf: bytes,
            epoch_ns: 0,
        };
        r.version()?;
        let id = r.u64()?;
        let status = r.status()?;
        let count = r.u32()? as usize;
        let mut steps = Vec::with_capacity(count.min(r.buf.len()));
        for _ in 0..count {
            let step = r.u32()?;
            steps.push((step, r.step_progress()?));
        }
        if !r.buf.is_empty() {
            return Err(RecordError::Truncated);
        }
        Ok(WorkflowProgress { id, status, steps })
    }
}

#[cfg(test)]
mod tests;
