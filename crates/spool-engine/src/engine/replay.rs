//! Rebuilding the engine from its log, and the records compaction writes.

use super::*;

impl Engine {
    /// The engine time replay runs at: when replayed ready jobs became
    /// ready, for their wait histogram. The caller's clock, read once.
    pub fn set_replay_now(&mut self, now: u64) {
        self.replay_now = now;
    }

    /// Applies one logged change while recovering, before any session is
    /// open. Records must come in the order they were logged.
    pub fn replay(&mut self, record: LogRecord) -> Result<(), ReplayError> {
        let replayed = self.replay_one(record);
        // Jobs placed by replay note workflow events like live ones; the
        // log already holds what those events did.
        self.discard_workflow_events();
        replayed
    }

    fn replay_one(&mut self, record: LogRecord) -> Result<(), ReplayError> {
        match record {
            LogRecord::Put(job) => {
                if self.holds(job.id) {
                    return Err(ReplayError::DuplicateJob(job.id));
                }
                self.replay_job(job, true);
            }
            LogRecord::Snapshot(job) => {
                let replaces = self.holds(job.id);
                if replaces {
                    self.remove_replayed(job.id);
                }
                self.replay_job(job, !replaces);
            }
            LogRecord::Job(full) => {
                if self.holds(full.job.id) {
                    return Err(ReplayError::DuplicateJob(full.job.id));
                }
                self.replay_full(*full, true);
            }
            LogRecord::JobSnapshot(full) => {
                let replaces = self.holds(full.job.id);
                if replaces {
                    self.remove_replayed(full.job.id);
                }
                self.replay_full(*full, !replaces);
            }
            LogRecord::Update { id, pri, state } => {
                // After a compaction the job's Put may be gone; the snapshot
                // that follows holds its state.
                if !self.jobs.contains_key(&id) {
                    return Ok(());
                }
                self.unqueue(id);
                self.jobs.get_mut(&id).expect("job exists").pri = pri;
                self.place(id, state);
            }
            LogRecord::Change(change) => self.replay_change(*change),
            LogRecord::Delete { id } => {
                if self.holds(id) {
                    self.remove_replayed(id);
                }
            }
            LogRecord::NextId { id } => self.next_job_id = self.next_job_id.max(id),
            LogRecord::Batch(records) => {
                for record in records {
                    self.replay_one(record)?;
                }
            }
            LogRecord::Workflow(workflow) => self.replay_workflow(*workflow),
            LogRecord::WorkflowProgress(progress) => self.replay_workflow_progress(&progress),
            LogRecord::WorkflowDelete { id } => self.replay_workflow_delete(id),
            LogRecord::WorkflowNextId { id } => self.replay_workflow_next_id(id),
            LogRecord::Queue(queue) => {
                let QueueRecord {
                    queue,
                    policy,
                    pause,
                } = *queue;
                if let Some(queue) = queue {
                    self.set_settings(queue, QueueSettings { policy, pause });
                }
            }
            LogRecord::Schedule(record) => self.replay_schedule(*record),
            LogRecord::ScheduleDeleted { name } => self.replay_schedule_deleted(&name),
        }
        Ok(())
    }

    /// Whether the engine holds job `id`, live or final.
    pub fn holds(&self, id: JobId) -> bool {
        self.jobs.contains_key(&id) || self.retention.contains(id)
    }

    /// A job as a beanstalkd put or a version-1 snapshot logged it; `new`
    /// as for `insert_replayed`.
    pub(super) fn replay_job(&mut self, job: JobRecord, new: bool) {
        let (id, state) = (job.id, job.state);
        self.insert_replayed(job, new);
        self.place(id, state);
    }

    /// Makes a replayed job, in no queue yet; `new`: it is not already
    /// counted in `total-jobs`.
    fn insert_replayed(&mut self, job: JobRecord, new: bool) -> TubeId {
        let tube = self.find_or_make_tube(&job.tube);
        self.insert_job(
            job.id,
            tube,
            job.pri,
            job.delay_ns,
            job.ttr_ns,
            job.body,
            job.created_at_ns,
        );
        if new {
            self.counters.total_jobs += 1;
            self.tube_mut(tube).total_jobs += 1;
        }
        self.next_job_id = self.next_job_id.max(job.id + 1);
        tube
    }

    pub(super) fn replay_full(&mut self, full: FullJobRecord, new: bool) {
        let FullJobRecord {
            job,
            attempts,
            max_attempts,
            version,
            extra,
        } = full;
        let (id, state) = (job.id, job.state);
        let tube = self.insert_replayed(job, new);
        let updated_at = extra.as_ref().map(|e| e.updated_at_ns);
        let job = self.jobs.get_mut(&id).expect("job exists");
        job.attempts = attempts;
        job.max_attempts = max_attempts;
        job.extra = extra.map(Box::new);
        self.remember_key(&self.tube(tube).name.clone(), id);
        self.place(id, state);
        self.restore(id, version, updated_at);
    }

    /// Sets what placing a replayed job changed back to what was logged.
    pub(super) fn restore(&mut self, id: JobId, version: u64, updated_at: Option<u64>) {
        let job = match self.jobs.get_mut(&id) {
            Some(job) => job,
            None => match self.retention.get_mut(id) {
                Some(finished) => &mut finished.job,
                None => return,
            },
        };
        job.version = version;
        if let (Some(extra), Some(at)) = (job.extra.as_deref_mut(), updated_at) {
            extra.updated_at_ns = at;
        }
    }

    pub(super) fn replay_change(&mut self, change: ChangeRecord) {
        let id = change.id;
        if let Some(finished) = self.retention.get_mut(id) {
            // A final job changes no more; a later Change of it can only
            // repeat what is known. Keep the logged fields.
            finished.job.version = change.version;
            return;
        }
        // After a compaction the job's creation may be gone; the snapshot
        // that follows holds its state.
        if !self.jobs.contains_key(&id) {
            return;
        }
        self.unqueue(id);
        let job = self.jobs.get_mut(&id).expect("job exists");
        job.pri = change.pri;
        job.attempts = change.attempts;
        job.delay_ns = change.delay_ns;
        let has_extra = job.extra.is_some()
            || change.cancel_requested
            || change.last_error.is_some()
            || change.result.is_some();
        if has_extra {
            let extra = job.extra_mut();
            extra.cancel_requested = change.cancel_requested;
            extra.last_error = change.last_error.map(String::into_boxed_str);
            extra.result = change.result;
        }
        self.place(id, change.state);
        self.restore(
            id,
            change.version,
            has_extra.then_some(change.updated_at_ns),
        );
    }

    /// Forgets a replayed job, live or final.
    pub(super) fn remove_replayed(&mut self, id: JobId) {
        if let Some(gone) = self.retention.remove(id) {
            self.forget_finished(gone);
            return;
        }
        self.unqueue(id);
        self.drop_job(id);
    }

    /// The whole current state of a live or final job, for compaction. A
    /// reserved job is logged as ready: reservations are not durable.
    pub fn snapshot_record(&self, id: JobId) -> Option<LogRecord> {
        Some(LogRecord::JobSnapshot(Box::new(self.full_record(id)?)))
    }

    /// Every job a compaction snapshots: live and final ones.
    pub fn compaction_ids(&self) -> Vec<JobId> {
        self.jobs
            .keys()
            .copied()
            .chain(self.retention.ids())
            .collect()
    }

    /// What a compaction writes first, before the jobs: the id the next
    /// job will get (so that ids are never reused after the records that
    /// used them are gone), every queue's settings and every schedule.
    pub fn compaction_start_records(&self) -> Vec<LogRecord> {
        let mut records = vec![self.next_id_record()];
        let mut queues: Vec<_> = self.settings.iter().collect();
        queues.sort_unstable_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
        for (queue, settings) in queues {
            records.push(LogRecord::Queue(Box::new(QueueRecord {
                queue: Some(queue.clone()),
                policy: settings.policy.clone(),
                pause: settings.pause,
            })));
        }
        records.extend(self.workflow_compaction_records());
        records.extend(self.schedule_records());
        records
    }

    /// The id the next job will get, as a record.
    pub fn next_id_record(&self) -> LogRecord {
        LogRecord::NextId {
            id: self.next_job_id,
        }
    }

    /// Puts a replayed job, in no queue yet, where its record says.
    pub(super) fn place(&mut self, id: JobId, state: RestState) {
        let now = self.replay_now;
        match state {
            RestState::Ready => self.enqueue(id, 0, now),
            RestState::Delayed { due_ns } => {
                let job = self.jobs.get_mut(&id).expect("job exists");
                job.state = JobState::Delayed;
                job.deadline_at_ns = due_ns;
                // As `enqueue` counts it live.
                job.version += 1;
                let tube = job.tube;
                self.add_delayed(tube, due_ns, id);
            }
            RestState::Buried => self.bury(id, now),
            RestState::Completed { at_ns } | RestState::Cancelled { at_ns } => {
                let state = match state {
                    RestState::Completed { .. } => JobState::Completed,
                    _ => JobState::Cancelled,
                };
                let mut job = self.jobs.remove(&id).expect("job exists");
                let queue = self.tube(job.tube).name.clone();
                self.decref(job.tube);
                job.state = state;
                job.reserver = None;
                job.deadline_at_ns = at_ns;
                self.keep_finished(job, queue);
            }
        }
    }
}
