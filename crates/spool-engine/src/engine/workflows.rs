//! Workflows in the engine: the map of workflows, the index from a job to
//! the step it runs, the hooks where jobs settle, and the workflow
//! operations. The rules are `crate::workflow`'s (shared with the
//! PostgreSQL broker); this file only carries out their effects.
//!
//! Hooks: every place a job completes, is buried, kicked, cancelled or
//! deleted (typed operations, beanstalkd commands and timers alike) notes
//! an event when the job is a workflow's. An ordinary job pays one check of
//! an empty map, or one hash lookup while workflows exist; nothing is
//! allocated for it. Noted events are carried out before the call that
//! caused them returns (`run_workflow_events`), and their records join the
//! job change's in one `LogRecord::Batch`, so a crash replays both or
//! neither.
//!
//! A beanstalkd worker can work a step: `delete` of a step job it reserved
//! completes the step without a result; deleting one that is not reserved
//! (either protocol), or purging it, counts as cancelling it.

use spool_broker::{BrokerError, Outcome, WorkflowId, WorkflowPage, WorkflowState, WorkflowView};

use super::tasks::NS_PER_MS;
use super::*;
use crate::workflow::{Effects, JobEvent, JobRole, NewWorkflow, Workflow, WorkflowProgress};

/// The workflows an engine holds.
#[derive(Debug)]
pub(super) struct Workflows {
    map: BTreeMap<WorkflowId, Workflow>,
    next_id: WorkflowId,
    /// Every job a held workflow names → (workflow, step, role).
    jobs: HashMap<JobId, (WorkflowId, u32, JobRole)>,
    /// Idempotency key → workflow (the workflow holds the key's expiry).
    keys: HashMap<String, WorkflowId>,
    /// Succeeded and compensated workflows by (finished at ms, id), for
    /// their retention.
    finished: BTreeSet<(u64, WorkflowId)>,
    /// Noted, not yet carried out.
    events: Vec<(WorkflowId, u32, JobRole, JobEvent)>,
    pub(super) metrics: WorkflowMetrics,
}

impl Default for Workflows {
    fn default() -> Self {
        Workflows {
            map: BTreeMap::new(),
            next_id: 1,
            jobs: HashMap::new(),
            keys: HashMap::new(),
            finished: BTreeSet::new(),
            events: Vec::new(),
            metrics: WorkflowMetrics::default(),
        }
    }
}

/// Counters for `/metrics` (since this start of the engine; replay counts
/// nothing); `current` is filled when a snapshot is taken.
pub type WorkflowMetrics = spool_broker::WorkflowCounters;

impl Engine {
    // ---- hooks ----------------------------------------------------------

    /// Notes `event` for job `id` if a workflow runs it. `event` is only
    /// built for workflow jobs.
    pub(super) fn workflow_event(&mut self, id: JobId, event: impl FnOnce(&Engine) -> JobEvent) {
        if self.workflows.jobs.is_empty() {
            return;
        }
        if let Some(&(workflow, step, role)) = self.workflows.jobs.get(&id) {
            let event = event(self);
            self.workflows.events.push((workflow, step, role, event));
        }
    }

    /// A live workflow job leaves without finishing (deleted, purged):
    /// cancelled as far as its workflow is concerned, and forgotten.
    pub(super) fn workflow_job_dropped(&mut self, id: JobId) {
        if self.workflows.jobs.is_empty() {
            return;
        }
        if let Some((workflow, step, role)) = self.workflows.jobs.remove(&id) {
            self.workflows
                .events
                .push((workflow, step, role, JobEvent::Cancelled));
        }
    }

    /// A final job leaves memory: its workflow no longer finds it.
    pub(super) fn workflow_job_forgotten(&mut self, id: JobId) {
        if !self.workflows.jobs.is_empty() {
            self.workflows.jobs.remove(&id);
        }
    }

    /// Replay carries out nothing: the log holds every effect already.
    pub(super) fn discard_workflow_events(&mut self) {
        self.workflows.events.clear();
    }

    /// Carries out the noted events, and those their effects cause.
    pub(super) fn run_workflow_events(&mut self, now: u64) {
        // Each round moves workflows forward (an event a workflow does not
        // wait for changes nothing), so this ends.
        while !self.workflows.events.is_empty() {
            for (id, step, role, event) in std::mem::take(&mut self.workflows.events) {
                let now_ms = self.wall_ms(now);
                let Some(workflow) = self.workflows.map.get_mut(&id) else {
                    continue;
                };
                match workflow.on_job(step, role, event, now_ms) {
                    Ok(fx) => self.carry_out(id, fx, now),
                    Err(error) => {
                        // The pure rules refused a transition: a bug. Leave
                        // the workflow as it is rather than corrupt it.
                        debug_assert!(false, "workflow {id}: {error:?}");
                    }
                }
            }
        }
    }

    /// Wraps the records logged since `mark` into one batch when there are
    /// several: they are one change.
    pub(super) fn batch_since(&mut self, mark: usize) {
        if self.log.len() > mark + 1 {
            // Flat: a batch never holds a batch.
            let mut records = Vec::new();
            for record in self.log.split_off(mark) {
                match record {
                    LogRecord::Batch(inner) => records.extend(inner),
                    other => records.push(other),
                }
            }
            self.log.push(LogRecord::Batch(records));
        }
    }

    /// Runs noted workflow events after a beanstalkd command or a timer,
    /// joining their records with the change's (logged since `mark`).
    pub(super) fn settle_workflows(&mut self, mark: usize, now: u64) {
        if !self.workflows.events.is_empty() {
            self.run_workflow_events(now);
            self.batch_since(mark);
        }
    }

    // ---- effects --------------------------------------------------------

    /// Does what a transition asks, then logs it and counts it.
    fn carry_out(&mut self, id: WorkflowId, fx: Effects, now: u64) {
        if !fx.changed {
            return;
        }
        for job in &fx.cancel {
            self.cancel_for_workflow(*job, now);
        }
        let failed_enqueues = self.enqueue_effects(id, &fx, now);
        let Some(workflow) = self.workflows.map.get(&id) else {
            return;
        };
        let record = workflow.progress_record(&fx.changed_steps);
        let created_at_ms = workflow.created_at_ms;
        for &step in &fx.changed_steps {
            let outcome = match workflow.progress[step as usize].state {
                StepState::Completed => "completed",
                StepState::Failed => "failed",
                StepState::Cancelled => "cancelled",
                StepState::Compensated => "compensated",
                StepState::CompensationFailed => "compensation_failed",
                _ => continue,
            };
            *self.workflows.metrics.steps.entry(outcome).or_default() += 1;
        }
        self.record(|| LogRecord::WorkflowProgress(Box::new(record)));
        if let Some((_, to)) = fx.transition {
            self.workflow_reached(id, to, created_at_ms, now);
        }
        self.workflows.events.extend(failed_enqueues);
    }

    /// Enqueues the jobs an effect asks for and attaches them to their
    /// steps. A job that cannot be made (its queue's policy changed since
    /// the start, say) is returned as a burial of that step's job.
    fn enqueue_effects(
        &mut self,
        id: WorkflowId,
        fx: &Effects,
        now: u64,
    ) -> Vec<(WorkflowId, u32, JobRole, JobEvent)> {
        let mut failed = Vec::new();
        for enqueue in &fx.enqueue {
            match self.prepare(&enqueue.queue, enqueue.job.clone(), now) {
                Ok(prepared) => {
                    // Step jobs bypass `max_jobs`: the workflow was admitted
                    // whole, and refusing its next step would fail it.
                    let (view, _) = self.create(prepared, now);
                    self.workflows
                        .jobs
                        .insert(view.id, (id, enqueue.step, enqueue.role));
                    if let Some(workflow) = self.workflows.map.get_mut(&id) {
                        workflow.attach_job(enqueue.step, enqueue.role, view.id);
                    }
                }
                Err(error) => failed.push((
                    id,
                    enqueue.step,
                    enqueue.role,
                    JobEvent::Buried {
                        error: Some(format!("could not enqueue: {error:?}")),
                    },
                )),
            }
        }
        failed
    }

    /// Cancels a step job its workflow no longer needs.
    fn cancel_for_workflow(&mut self, job: JobId, now: u64) {
        let Some(state) = self.jobs.get(&job).map(|j| j.state) else {
            return;
        };
        if state == JobState::Reserved {
            self.release_reservation_of(job);
        } else {
            self.unqueue(job);
        }
        let j = self.jobs.get_mut(&job).expect("job exists");
        j.extra_mut().cancel_requested = true;
        let tube = j.tube;
        self.tube_mut(tube).metrics.counters.cancelled += 1;
        self.finish(job, JobState::Cancelled, now);
    }

    fn workflow_reached(
        &mut self,
        id: WorkflowId,
        state: WorkflowState,
        created_at_ms: u64,
        now: u64,
    ) {
        let now_ms = self.wall_ms(now);
        if matches!(
            state,
            WorkflowState::Succeeded
                | WorkflowState::Compensated
                | WorkflowState::CompensationFailed
        ) {
            let m = &mut self.workflows.metrics;
            *m.finished.entry(state.as_str()).or_default() += 1;
            m.duration.observe_ns(
                now_ms
                    .saturating_sub(created_at_ms)
                    .saturating_mul(NS_PER_MS),
            );
        }
        if state.is_final() {
            self.workflows.finished.insert((now_ms, id));
            while self.workflows.finished.len() > limits::WORKFLOW_RETENTION_MAX {
                if let Some((_, oldest)) = self.workflows.finished.pop_first() {
                    self.drop_workflow(oldest);
                }
            }
        }
    }

    /// Forgets a workflow past its retention; logged.
    fn drop_workflow(&mut self, id: WorkflowId) {
        self.forget_workflow(id);
        self.record(|| LogRecord::WorkflowDelete { id });
    }

    fn forget_workflow(&mut self, id: WorkflowId) {
        let Some(workflow) = self.workflows.map.remove(&id) else {
            return;
        };
        for (job, _, _) in workflow.jobs() {
            self.workflows.jobs.remove(&job);
        }
        if let Some(key) = &workflow.idempotency_key {
            if self.workflows.keys.get(key) == Some(&id) {
                self.workflows.keys.remove(key);
            }
        }
        if let Some(at) = workflow.status.finished_at_ms {
            self.workflows.finished.remove(&(at, id));
        }
    }

    /// When the oldest finished workflow's retention ends, in engine time.
    pub(super) fn next_workflow_expiry(&self) -> Option<u64> {
        let &(finished_ms, _) = self.workflows.finished.first()?;
        Some(self.engine_ns(finished_ms.saturating_add(limits::WORKFLOW_RETENTION_MS)))
    }

    /// Drops the finished workflows whose retention ended by `now`.
    pub(super) fn expire_workflows(&mut self, now: u64) {
        while let Some(&(finished_ms, id)) = self.workflows.finished.first() {
            let expires = self.engine_ns(finished_ms.saturating_add(limits::WORKFLOW_RETENTION_MS));
            if expires > now {
                break;
            }
            self.drop_workflow(id);
        }
    }

    // ---- operations -----------------------------------------------------

    pub(super) fn start_workflow(
        &mut self,
        definition: NewWorkflow,
        now: u64,
    ) -> Result<Outcome, BrokerError> {
        self.check_accepting()?;
        let now_ms = self.wall_ms(now);
        if let Some(key) = &definition.idempotency_key {
            if let Some(&id) = self.workflows.keys.get(key) {
                let live = self
                    .workflows
                    .map
                    .get(&id)
                    .is_some_and(|w| w.idempotency_expires_at_ms > now_ms);
                if live {
                    return Ok(Outcome::Workflow {
                        workflow: Box::new(self.workflow_view(id).expect("keyed workflow exists")),
                        duplicate: true,
                    });
                }
            }
        }
        crate::workflow::validate(&definition)?;
        // What the pure rules cannot know: this engine's job size and clock.
        let mut record_bytes = 0usize;
        for step in &definition.steps {
            let jobs = std::iter::once(&step.job).chain(step.compensate.as_ref().map(|(_, j)| j));
            for job in jobs {
                if job.payload.len() > self.config.max_job_size as usize {
                    return Err(BrokerError::TooLarge {
                        max_bytes: u64::from(self.config.max_job_size),
                    });
                }
                self.delay_of(job.run_at, now)?;
                record_bytes = record_bytes
                    .saturating_add(job.payload.len())
                    .saturating_add(limits::JOB_METADATA_MAX_BYTES);
            }
        }
        if record_bytes > limits::RECORD_PAYLOAD_MAX_BYTES {
            return Err(BrokerError::TooLarge {
                max_bytes: limits::RECORD_PAYLOAD_MAX_BYTES as u64,
            });
        }
        let id = self.workflows.next_id;
        let (workflow, fx) = Workflow::start(id, definition, now_ms)?;
        self.workflows.next_id += 1;
        if let Some(key) = &workflow.idempotency_key {
            self.workflows.keys.insert(key.clone(), id);
        }
        self.workflows.map.insert(id, workflow);
        self.workflows.metrics.started += 1;
        let failed = self.enqueue_effects(id, &fx, now);
        let workflow = &self.workflows.map[&id];
        let record = Box::new(workflow.clone());
        self.record(|| LogRecord::Workflow(record));
        // A root step whose job could not be made fails the workflow at
        // once, in the same change.
        self.workflows.events.extend(failed);
        self.run_workflow_events(now);
        Ok(Outcome::Workflow {
            workflow: Box::new(self.workflow_view(id).expect("workflow exists")),
            duplicate: false,
        })
    }

    pub(super) fn cancel_workflow(
        &mut self,
        id: WorkflowId,
        now: u64,
    ) -> Result<Outcome, BrokerError> {
        self.check_writable(true)?;
        let now_ms = self.wall_ms(now);
        let workflow = self
            .workflows
            .map
            .get_mut(&id)
            .ok_or(BrokerError::NotFound)?;
        let fx = workflow.cancel(now_ms)?;
        self.carry_out(id, fx, now);
        self.run_workflow_events(now);
        Ok(Outcome::Workflow {
            workflow: Box::new(self.workflow_view(id).expect("workflow exists")),
            duplicate: false,
        })
    }

    pub(super) fn get_workflow(&self, id: WorkflowId) -> Result<Outcome, BrokerError> {
        let view = self.workflow_view(id).ok_or(BrokerError::NotFound)?;
        Ok(Outcome::Workflow {
            workflow: Box::new(view),
            duplicate: false,
        })
    }

    pub(super) fn list_workflows(
        &self,
        state: Option<WorkflowState>,
        after: Option<WorkflowId>,
        limit: u32,
    ) -> Result<Outcome, BrokerError> {
        if limit == 0 || limit > limits::WORKFLOW_LIST_LIMIT_MAX {
            return Err(BrokerError::invalid(
                "limit",
                format!("1 to {}", limits::WORKFLOW_LIST_LIMIT_MAX),
            ));
        }
        let start = after.map_or(0, |a| a.saturating_add(1));
        let mut matching = self
            .workflows
            .map
            .range(start..)
            .filter(|(_, w)| state.is_none_or(|s| w.status.state == s))
            .map(|(&id, _)| id);
        let page: Vec<WorkflowId> = matching.by_ref().take(limit as usize).collect();
        let next = if matching.next().is_some() {
            page.last().copied()
        } else {
            None
        };
        let workflows = page
            .iter()
            .filter_map(|&id| self.workflow_view(id))
            .collect();
        Ok(Outcome::Workflows(WorkflowPage { workflows, next }))
    }

    /// A workflow as the APIs show it, its steps' jobs as they are now.
    pub fn workflow_view(&self, id: WorkflowId) -> Option<WorkflowView> {
        let workflow = self.workflows.map.get(&id)?;
        Some(workflow.view(|job| {
            let job = self
                .jobs
                .get(&job)
                .or_else(|| self.retention.get(job).map(|f| &f.job))?;
            let error = job
                .extra
                .as_ref()
                .and_then(|e| e.last_error.as_deref().map(String::from));
            Some((job.state, job.attempts, error))
        }))
    }

    /// A workflow job's `parents` (empty for every other job).
    pub(super) fn parents_of(&self, job: JobId) -> BTreeMap<String, Option<Bytes>> {
        if self.workflows.jobs.is_empty() {
            return BTreeMap::new();
        }
        let Some(&(id, step, role)) = self.workflows.jobs.get(&job) else {
            return BTreeMap::new();
        };
        self.workflows
            .map
            .get(&id)
            .map(|w| w.parents(step, role))
            .unwrap_or_default()
    }

    /// The workflow figures a snapshot carries.
    pub(super) fn workflow_counters(&self) -> WorkflowMetrics {
        let mut counters = self.workflows.metrics.clone();
        for (state, count) in self.workflow_counts() {
            counters.current.insert(state.as_str(), count);
        }
        counters
    }

    /// Workflows held, by state.
    pub fn workflow_counts(&self) -> BTreeMap<WorkflowState, u64> {
        let mut counts = BTreeMap::new();
        for workflow in self.workflows.map.values() {
            *counts.entry(workflow.status.state).or_default() += 1;
        }
        counts
    }

    // ---- replay and compaction -----------------------------------------

    /// A workflow's whole state: creates or replaces it.
    pub(super) fn replay_workflow(&mut self, workflow: Workflow) {
        let id = workflow.id;
        self.forget_workflow(id);
        self.workflows.next_id = self.workflows.next_id.max(id + 1);
        self.index_workflow(workflow);
    }

    pub(super) fn replay_workflow_progress(&mut self, progress: &WorkflowProgress) {
        let Some(mut workflow) = self.workflows.map.remove(&progress.id) else {
            // Compacted away before it: the snapshot that follows says all.
            return;
        };
        if let Some(at) = workflow.status.finished_at_ms {
            self.workflows.finished.remove(&(at, workflow.id));
        }
        if workflow.apply_progress(progress).is_ok() {
            self.index_workflow(workflow);
        }
    }

    pub(super) fn replay_workflow_delete(&mut self, id: WorkflowId) {
        self.forget_workflow(id);
    }

    pub(super) fn replay_workflow_next_id(&mut self, id: WorkflowId) {
        self.workflows.next_id = self.workflows.next_id.max(id);
    }

    fn index_workflow(&mut self, workflow: Workflow) {
        let id = workflow.id;
        for (job, step, role) in workflow.jobs() {
            self.workflows.jobs.insert(job, (id, step, role));
        }
        if let Some(key) = &workflow.idempotency_key {
            self.workflows.keys.insert(key.clone(), id);
        }
        if let (true, Some(at)) = (
            workflow.status.state.is_final(),
            workflow.status.finished_at_ms,
        ) {
            self.workflows.finished.insert((at, id));
        }
        self.workflows.map.insert(id, workflow);
    }

    /// What a compaction writes for workflows, after the next job id: the
    /// next workflow id and every workflow's whole state.
    pub(super) fn workflow_compaction_records(&self) -> Vec<LogRecord> {
        let mut records = vec![LogRecord::WorkflowNextId {
            id: self.workflows.next_id,
        }];
        records.extend(
            self.workflows
                .map
                .values()
                .map(|w| LogRecord::Workflow(Box::new(w.clone()))),
        );
        records
    }

    /// The next workflow id.
    pub fn next_workflow_id(&self) -> WorkflowId {
        self.workflows.next_id
    }

    /// Every index entry names a held workflow that names the job back.
    pub(super) fn check_workflow_invariants(&self) {
        for (&job, &(id, step, role)) in &self.workflows.jobs {
            let workflow = &self.workflows.map[&id];
            assert_eq!(workflow.step_of_job(job), Some((step, role)));
        }
        for &(at, id) in &self.workflows.finished {
            let workflow = &self.workflows.map[&id];
            assert!(workflow.status.state.is_final());
            assert_eq!(workflow.status.finished_at_ms, Some(at));
        }
    }
}
