//! The job API's operations ([`Op`]): enqueue with options, leases,
//! heartbeats, completion with a result, failure with retries and backoff,
//! cancellation, idempotency keys, versions, listings, queue policies and
//! pauses. Each operation validates everything before it changes anything,
//! and its log records become one atomic batch.

use spool_broker::{
    BrokerError, Conflict, JobChange, JobView, Lease, Leased, NewJob, Op, Outcome, QueuePolicy,
    RunAt,
};

use super::*;
use crate::validate::{check_backoff, check_headers, check_policy};

pub(super) const NS_PER_MS: u64 = 1_000_000;

/// A validated enqueue, ready to become a job.
#[derive(Debug)]
pub(super) struct Prepared {
    queue: TubeName,
    pri: u32,
    delay_ns: u64,
    ttr_ns: u64,
    max_attempts: u32,
    body: Bytes,
    extra: Option<JobExtra>,
}

/// SplitMix64: a well-mixed 64-bit value from a seed. The jitter of a
/// backoff needs no more (and the engine reads no entropy source): the
/// run-at it picks is logged, so replay never draws again.
fn mix(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `text` cut to at most `max` bytes at a character boundary.
fn truncated(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

pub(super) fn wrong_state(state: JobState) -> BrokerError {
    BrokerError::Conflict(Conflict::WrongState(state))
}

impl Engine {
    /// Sets the wall-clock time of engine time 0 (nanoseconds since the
    /// Unix epoch), which the job API's instants are computed from.
    pub fn set_epoch_ns(&mut self, epoch_ns: u64) {
        self.epoch_ns = epoch_ns;
    }

    pub(super) fn wall_ms(&self, ns: u64) -> u64 {
        self.epoch_ns.saturating_add(ns) / NS_PER_MS
    }

    pub(super) fn engine_ns(&self, wall_ms: u64) -> u64 {
        wall_ms
            .saturating_mul(NS_PER_MS)
            .saturating_sub(self.epoch_ns)
    }

    /// Grows with every job that becomes ready and every pause that ends:
    /// a parked reserve is worth trying again only when it changed.
    pub fn ready_events(&self) -> u64 {
        self.ready_events
    }

    /// Runs one operation at `now`. Reserve never waits here: it answers
    /// what is ready now and the broker parks it if that is nothing. The
    /// records of the operation go to the log as one batch.
    pub fn apply(&mut self, op: Op, now: u64) -> Result<Outcome, BrokerError> {
        let mark = self.log.len();
        #[cfg(debug_assertions)]
        let described = format!("{op:?}");
        let outcome = self.apply_unbatched(op, now);
        self.run_workflow_events(now);
        self.serve_freed_slots(now);
        #[cfg(debug_assertions)]
        assert!(
            outcome.is_ok() || self.log.len() == mark,
            "a refused operation changed nothing: {described} {outcome:?}"
        );
        self.batch_since(mark);
        outcome
    }

    pub(super) fn apply_unbatched(&mut self, op: Op, now: u64) -> Result<Outcome, BrokerError> {
        match op {
            Op::Enqueue { queue, job } => {
                self.check_accepting()?;
                let prepared = self.prepare(&queue, job, now)?;
                self.check_room(std::slice::from_ref(&prepared), now)?;
                let (job, duplicate) = self.create(prepared, now);
                Ok(Outcome::Enqueued { job, duplicate })
            }
            Op::EnqueueBatch { jobs } => {
                self.check_accepting()?;
                if jobs.len() > limits::ENQUEUE_BATCH_JOBS_MAX {
                    return Err(BrokerError::invalid(
                        "jobs",
                        format!("at most {} jobs a batch", limits::ENQUEUE_BATCH_JOBS_MAX),
                    ));
                }
                let mut prepared = Vec::with_capacity(jobs.len());
                for (queue, job) in jobs {
                    prepared.push(self.prepare(&queue, job, now)?);
                }
                self.check_room(&prepared, now)?;
                let views = prepared
                    .into_iter()
                    .map(|p| self.create(p, now).0)
                    .collect();
                Ok(Outcome::Batch(views))
            }
            Op::Reserve { queues, batch, .. } => {
                Ok(Outcome::Leased(self.try_reserve(&queues, batch, now)?))
            }
            Op::Heartbeat { lease } => {
                self.check_lease(lease)?;
                let deadline = self.extend_lease(lease.job, now);
                Ok(Outcome::Deadline(self.wall_ms(deadline)))
            }
            Op::Complete { lease, result } => self.complete(lease, result, now),
            Op::Fail {
                lease,
                error,
                retry_in_ms,
                permanent,
            } => self.fail(lease, error, retry_in_ms, permanent, now),
            Op::Release {
                lease,
                delay_ms,
                priority,
            } => self.release(lease, delay_ms, priority, now),
            Op::Bury { id, lease, reason } => self.bury_job(id, lease, reason, now),
            Op::Kick { id } => {
                self.check_writable(false)?;
                match self.jobs.get(&id).map(|j| j.state) {
                    Some(JobState::Buried | JobState::Delayed) => {
                        self.kick(id, now);
                        self.view_outcome(id)
                    }
                    Some(state) => Err(wrong_state(state)),
                    None => Err(self.gone(id)),
                }
            }
            Op::Cancel {
                id,
                expected_version,
            } => self.cancel(id, expected_version, now),
            // The engine holds no waits: the broker parks them (see
            // `Engine::track_settled`); here the job is as it is.
            Op::Get { id } | Op::Wait { id, .. } => self.view_outcome(id),
            Op::Update {
                id,
                expected_version,
                change,
            } => self.update(id, expected_version, change, now),
            Op::Delete {
                id,
                expected_version,
            } => self.delete_job(id, expected_version),
            Op::List {
                queue,
                state,
                after,
                limit,
            } => self.list(&queue, state, after, limit),
            Op::Purge { queue, state } => self.purge(&queue, state),
            Op::Peek { queue, state } => self.peek(&queue, state),
            Op::SetPolicy { queue, policy } => {
                self.check_writable(true)?;
                check_policy(&policy)?;
                let mut settings = self.settings.get(&queue).cloned().unwrap_or_default();
                settings.policy = policy;
                self.set_settings(queue.clone(), settings);
                // Lifted or loosened limits may open the queue.
                self.ready_events += 1;
                self.process_queue(now);
                Ok(Outcome::Queue(self.queue_info(&queue, now)))
            }
            Op::GetQueue { queue } => Ok(Outcome::Queue(self.queue_info(&queue, now))),
            Op::ListQueues => {
                let mut names: Vec<TubeName> = self
                    .tube_order
                    .iter()
                    .map(|t| self.tube(t).name.clone())
                    .chain(self.settings.keys().cloned())
                    .chain(self.retention.queues().cloned())
                    .collect();
                names.sort_unstable_by(|a, b| a.as_str().cmp(b.as_str()));
                names.dedup();
                let infos = names.iter().map(|n| self.queue_info(n, now)).collect();
                Ok(Outcome::Queues(infos))
            }
            Op::Pause { queue, duration_ms } => {
                self.check_writable(true)?;
                let until = match duration_ms {
                    Some(ms) => now.saturating_add(ms.min(limits::DELAY_MS_MAX) * NS_PER_MS),
                    None => u64::MAX,
                };
                let mut settings = self.settings.get(&queue).cloned().unwrap_or_default();
                settings.pause = Some((now, until));
                self.set_settings(queue.clone(), settings);
                Ok(Outcome::Queue(self.queue_info(&queue, now)))
            }
            Op::Resume { queue } => {
                self.check_writable(true)?;
                let mut settings = self.settings.get(&queue).cloned().unwrap_or_default();
                settings.pause = None;
                self.set_settings(queue.clone(), settings);
                if let Some(&tube) = self.tube_ids.get(&queue) {
                    if self.tube(tube).pause_ns > 0 {
                        self.unpause(tube);
                        self.process_queue(now);
                    }
                }
                Ok(Outcome::Queue(self.queue_info(&queue, now)))
            }
            Op::StartWorkflow { workflow } => self.start_workflow(workflow, now),
            Op::GetWorkflow { id } => self.get_workflow(id),
            Op::ListWorkflows {
                state,
                after,
                limit,
            } => self.list_workflows(state, after, limit),
            Op::CancelWorkflow { id } => self.cancel_workflow(id, now),
            op @ (Op::PutSchedule { .. }
            | Op::GetSchedule { .. }
            | Op::ListSchedules
            | Op::DeleteSchedule { .. }
            | Op::PauseSchedule { .. }
            | Op::ResumeSchedule { .. }
            | Op::TriggerSchedule { .. }) => self.schedule_op(op, now),
        }
    }

    // ---- checks ---------------------------------------------------------

    pub(super) fn check_accepting(&self) -> Result<(), BrokerError> {
        if self.draining || self.shutting_down {
            return Err(BrokerError::Draining);
        }
        self.check_writable(true)
    }

    /// `adds`: the change adds to the log rather than making room (a
    /// delete); on a full disk only deletes go on.
    pub(super) fn check_writable(&self, adds: bool) -> Result<(), BrokerError> {
        if self.storage_failed {
            return Err(BrokerError::Storage(
                "the log failed; changes are refused until restart".into(),
            ));
        }
        if adds && self.disk_full {
            return Err(BrokerError::Storage(
                "the disk is full; delete jobs to make room".into(),
            ));
        }
        Ok(())
    }

    pub(super) fn check_version(
        &self,
        current: u64,
        expected: Option<u64>,
    ) -> Result<(), BrokerError> {
        match expected {
            Some(expected) if expected != current => Err(BrokerError::VersionMismatch { current }),
            _ => Ok(()),
        }
    }

    /// The error for an id that names no live job.
    pub(super) fn gone(&self, id: JobId) -> BrokerError {
        match self.retention.get(id) {
            Some(finished) => wrong_state(finished.job.state),
            None => BrokerError::NotFound,
        }
    }

    /// The lease is the job's current reservation.
    pub(super) fn check_lease(&self, lease: Lease) -> Result<(), BrokerError> {
        if let Some(job) = self.jobs.get(&lease.job) {
            if job.state == JobState::Reserved && job.seq == lease.token {
                return Ok(());
            }
            return Err(BrokerError::Conflict(Conflict::LeaseExpired));
        }
        match self.retention.get(lease.job) {
            Some(f) if f.job.state == JobState::Cancelled => {
                Err(BrokerError::Conflict(Conflict::Cancelled))
            }
            Some(_) => Err(BrokerError::Conflict(Conflict::LeaseExpired)),
            None => Err(BrokerError::NotFound),
        }
    }

    /// The queue's policy, or the defaults.
    pub(super) fn policy(&self, queue: &TubeName) -> Option<&QueuePolicy> {
        self.settings.get(queue).map(|s| &s.policy)
    }

    /// Jobs of `queue` that count against `max_jobs`: every live one.
    pub(super) fn queue_jobs(&self, queue: &TubeName) -> u64 {
        self.tube_ids.get(queue).map_or(0, |&tube| {
            let t = self.tube(tube);
            (t.ready.len() + t.delayed.len() + t.buried.len()) as u64 + t.reserved
        })
    }

    /// Refuses jobs that do not fit; a refusal for `max_jobs` is counted on
    /// the full queue (it has a tube: it holds jobs, or `max_jobs` is 0).
    pub(super) fn check_room(&mut self, jobs: &[Prepared], now: u64) -> Result<(), BrokerError> {
        let mut record_bytes = 0usize;
        let mut added: HashMap<&TubeName, u64> = HashMap::new();
        for job in jobs {
            record_bytes = record_bytes
                .saturating_add(job.body.len())
                .saturating_add(limits::JOB_METADATA_MAX_BYTES);
            let duplicate = job.extra.as_ref().and_then(|e| e.idempotency_key.as_ref());
            let duplicate =
                duplicate.is_some_and(|key| self.live_key(&job.queue, key, now).is_some());
            if !duplicate {
                *added.entry(&job.queue).or_default() += 1;
            }
        }
        if record_bytes > limits::RECORD_PAYLOAD_MAX_BYTES {
            return Err(BrokerError::TooLarge {
                max_bytes: limits::RECORD_PAYLOAD_MAX_BYTES as u64,
            });
        }
        for (queue, count) in added {
            if let Some(max_jobs) = self.policy(queue).and_then(|p| p.max_jobs) {
                if self.queue_jobs(queue) + count > max_jobs {
                    if let Some(&tube) = self.tube_ids.get(queue) {
                        self.tube_mut(tube).metrics.counters.refused_full += 1;
                    }
                    return Err(BrokerError::QueueFull { max_jobs });
                }
            }
        }
        Ok(())
    }

    /// The delay until `run_at`, checked.
    pub(super) fn delay_of(&self, run_at: RunAt, now: u64) -> Result<u64, BrokerError> {
        match run_at {
            RunAt::Now => Ok(0),
            RunAt::DelayMs(ms) if ms > limits::DELAY_MS_MAX => Err(BrokerError::invalid(
                "delay_ms",
                format!("at most {} ms", limits::DELAY_MS_MAX),
            )),
            RunAt::DelayMs(ms) => Ok(ms * NS_PER_MS),
            RunAt::AtMs(at) => {
                let delay = self.engine_ns(at).saturating_sub(now);
                if delay > limits::DELAY_MS_MAX * NS_PER_MS {
                    return Err(BrokerError::invalid("run_at", "too far in the future"));
                }
                Ok(delay)
            }
        }
    }

    pub(super) fn prepare(
        &self,
        queue: &TubeName,
        new: NewJob,
        now: u64,
    ) -> Result<Prepared, BrokerError> {
        if new.payload.len() > self.config.max_job_size as usize {
            return Err(BrokerError::TooLarge {
                max_bytes: u64::from(self.config.max_job_size),
            });
        }
        check_headers(&new.headers)?;
        check_backoff(new.backoff.as_ref())?;
        if let Some(key) = &new.idempotency_key {
            if key.is_empty() || key.len() > limits::IDEMPOTENCY_KEY_MAX_BYTES {
                return Err(BrokerError::invalid(
                    "idempotency_key",
                    format!("1 to {} bytes", limits::IDEMPOTENCY_KEY_MAX_BYTES),
                ));
            }
        }
        let policy = self.policy(queue);
        let ttr_ms = new
            .ttr_ms
            .or(policy.and_then(|p| p.ttr_ms))
            .unwrap_or(limits::TTR_MS_DEFAULT);
        if ttr_ms > limits::TTR_MS_MAX {
            return Err(BrokerError::invalid(
                "ttr_ms",
                format!("at most {} ms", limits::TTR_MS_MAX),
            ));
        }
        let max_attempts = new
            .max_attempts
            .or(policy.and_then(|p| p.max_attempts))
            .unwrap_or(limits::MAX_ATTEMPTS_DEFAULT);
        let delay_ns = self.delay_of(new.run_at, now)?;
        let ttl_ms = new
            .idempotency_ttl_ms
            .unwrap_or(limits::IDEMPOTENCY_TTL_MS_DEFAULT);
        let extra = JobExtra {
            headers: new.headers,
            idempotency_expires_at_ns: now.saturating_add(ttl_ms.saturating_mul(NS_PER_MS)),
            idempotency_key: new.idempotency_key,
            backoff: new.backoff.map(Box::new),
            updated_at_ns: now,
            ..JobExtra::default()
        };
        Ok(Prepared {
            queue: queue.clone(),
            pri: new.priority.unwrap_or(limits::PRIORITY_DEFAULT),
            delay_ns,
            ttr_ns: ttr_ms * NS_PER_MS,
            max_attempts,
            body: new.payload,
            extra: Some(extra),
        })
    }

    // ---- idempotency ----------------------------------------------------

    /// The job a key names, while the key holds.
    pub(super) fn live_key(&self, queue: &TubeName, key: &str, now: u64) -> Option<JobId> {
        let &id = self.keys.get(&(queue.clone(), key.to_string()))?;
        let job = self
            .jobs
            .get(&id)
            .or_else(|| self.retention.get(id).map(|f| &f.job))?;
        let expires = job.extra.as_ref()?.idempotency_expires_at_ns;
        (expires > now).then_some(id)
    }

    /// Registers a job's key, replacing an expired holder.
    pub(super) fn remember_key(&mut self, queue: &TubeName, id: JobId) {
        let key = self.jobs[&id]
            .extra
            .as_ref()
            .and_then(|e| e.idempotency_key.clone());
        if let Some(key) = key {
            self.keys.insert((queue.clone(), key), id);
        }
    }

    /// A job leaves memory: its key stops matching.
    pub(super) fn forget_key(&mut self, job: &Job, queue: &TubeName) {
        if let Some(key) = job.extra.as_ref().and_then(|e| e.idempotency_key.as_ref()) {
            let entry = (queue.clone(), key.clone());
            if self.keys.get(&entry) == Some(&job.id) {
                self.keys.remove(&entry);
            }
        }
    }

    // ---- creating -------------------------------------------------------

    pub(super) fn create(&mut self, p: Prepared, now: u64) -> (JobView, bool) {
        if let Some(key) = p.extra.as_ref().and_then(|e| e.idempotency_key.as_ref()) {
            if let Some(id) = self.live_key(&p.queue, key, now) {
                // The keyed job's tube may have been freed (a final job
                // kept by retention): then there is nothing to count on.
                if let Some(&tube) = self.tube_ids.get(&p.queue) {
                    self.tube_mut(tube).metrics.counters.duplicates += 1;
                }
                return (self.view(id).expect("a keyed job exists"), true);
            }
        }
        let id = self.next_job_id;
        self.next_job_id += 1;
        let tube = self.find_or_make_tube(&p.queue);
        self.insert_job(id, tube, p.pri, p.delay_ns, p.ttr_ns, p.body, now);
        let job = self.jobs.get_mut(&id).expect("job exists");
        job.max_attempts = p.max_attempts;
        job.extra = p.extra.map(Box::new);
        self.counters.total_jobs += 1;
        let t = self.tube_mut(tube);
        t.total_jobs += 1;
        t.metrics.counters.put += 1;
        self.remember_key(&p.queue, id);
        self.enqueue(id, p.delay_ns, now);
        if self.logging {
            let record = self.full_record(id).expect("job exists");
            self.log.push(LogRecord::Job(Box::new(record)));
        }
        (self.view(id).expect("job exists"), false)
    }

    // ---- leases ---------------------------------------------------------

    /// Leases up to `batch` ready jobs from `queues` (unpaused ones), best
    /// priority first, then oldest.
    pub fn try_reserve(
        &mut self,
        queues: &[TubeName],
        batch: u32,
        now: u64,
    ) -> Result<Vec<Leased>, BrokerError> {
        if batch == 0 || batch > limits::RESERVE_BATCH_MAX {
            return Err(BrokerError::invalid(
                "batch",
                format!("1 to {}", limits::RESERVE_BATCH_MAX),
            ));
        }
        if queues.is_empty() {
            return Err(BrokerError::invalid("queues", "name at least one queue"));
        }
        let mut tubes: Vec<TubeId> = queues
            .iter()
            .filter_map(|q| self.tube_ids.get(q).copied())
            .collect();
        tubes.sort_unstable();
        tubes.dedup();
        let mut leased = Vec::new();
        if self.shutting_down {
            return Ok(leased);
        }
        while leased.len() < batch as usize {
            let mut best: Option<(u32, JobId, TubeId)> = None;
            for &tube in &tubes {
                let t = self.tube(tube);
                if t.pause_ns > 0 && t.unpause_at_ns > now {
                    continue;
                }
                if t.limits.is_some() && !self.may_dispatch(tube, now) {
                    continue;
                }
                let t = self.tube(tube);
                if let Some(&(pri, id)) = t.ready.first() {
                    if best.is_none_or(|(bp, bid, _)| (pri, id) < (bp, bid)) {
                        best = Some((pri, id, tube));
                    }
                }
            }
            let Some((pri, id, tube)) = best else { break };
            self.remove_ready(tube, pri, id);
            let (token, _, _) = self.lease_job(id, None, now);
            leased.push(Leased {
                job: self.view(id).expect("job exists"),
                lease: Lease { job: id, token },
            });
        }
        Ok(leased)
    }

    /// Restarts a reserved job's TTR from `now`; returns the new deadline.
    pub(super) fn extend_lease(&mut self, id: JobId, now: u64) -> u64 {
        let job = self.jobs.get_mut(&id).expect("job exists");
        let (old, seq) = (job.deadline_at_ns, job.seq);
        job.deadline_at_ns = now + job.ttr_ns;
        let (new, holder) = (job.deadline_at_ns, job.reserver);
        if let Some(conn) = holder.and_then(|c| self.conns.get_mut(&c)) {
            conn.move_deadline(seq, old, new);
        }
        self.reservations.remove(&(old, seq, id));
        self.reservations.insert((new, seq, id));
        new
    }

    /// Observes a reservation's run time as it ends.
    pub(super) fn observe_run(&mut self, id: JobId, now: u64) {
        let job = &self.jobs[&id];
        let reserved_at = job.deadline_at_ns.saturating_sub(job.ttr_ns);
        let tube = job.tube;
        let run_ns = now.saturating_sub(reserved_at);
        self.tube_mut(tube).metrics.run.observe_ns(run_ns);
    }

    pub(super) fn complete(
        &mut self,
        lease: Lease,
        result: Option<Bytes>,
        now: u64,
    ) -> Result<Outcome, BrokerError> {
        self.check_writable(true)?;
        self.check_lease(lease)?;
        let id = lease.job;
        if let Some(result) = &result {
            let body_len = self.jobs[&id].body.len();
            if result.len() > self.config.max_job_size as usize
                || body_len + result.len() + limits::JOB_METADATA_MAX_BYTES
                    > limits::RECORD_PAYLOAD_MAX_BYTES
            {
                return Err(BrokerError::TooLarge {
                    max_bytes: u64::from(self.config.max_job_size),
                });
            }
        }
        self.observe_run(id, now);
        self.release_reservation_of(id);
        self.jobs
            .get_mut(&id)
            .expect("job exists")
            .extra_mut()
            .result = result;
        let tube = self.jobs[&id].tube;
        let counters = &mut self.tube_mut(tube).metrics.counters;
        counters.deleted += 1;
        counters.completed += 1;
        Ok(Outcome::Job(self.finish(id, JobState::Completed, now)))
    }

    pub(super) fn fail(
        &mut self,
        lease: Lease,
        error: String,
        retry_in_ms: Option<u64>,
        permanent: bool,
        now: u64,
    ) -> Result<Outcome, BrokerError> {
        self.check_writable(true)?;
        self.check_lease(lease)?;
        if retry_in_ms.is_some_and(|ms| ms > limits::DELAY_MS_MAX) {
            return Err(BrokerError::invalid(
                "retry_in_ms",
                format!("at most {} ms", limits::DELAY_MS_MAX),
            ));
        }
        let id = lease.job;
        self.observe_run(id, now);
        self.release_reservation_of(id);
        let error = truncated(error, limits::ERROR_MAX_BYTES);
        self.retry_or_bury(id, error, retry_in_ms, permanent, now);
        self.view_outcome(id)
    }

    /// A failed attempt of a job that is in no queue: counted, and the job
    /// is delayed by its backoff (or `retry_in_ms`) while attempts remain,
    /// else buried. Logged.
    pub(super) fn retry_or_bury(
        &mut self,
        id: JobId,
        error: String,
        retry_in_ms: Option<u64>,
        permanent: bool,
        now: u64,
    ) {
        let backoff = self.backoff_of(id);
        let job = self.jobs.get_mut(&id).expect("job exists");
        job.attempts = job.attempts.saturating_add(1);
        job.extra_mut().last_error = Some(error.into_boxed_str());
        let (attempts, max_attempts, tube) = (job.attempts, job.max_attempts, job.tube);
        self.tube_mut(tube).metrics.counters.failed += 1;
        if permanent || (max_attempts > 0 && attempts >= max_attempts) {
            let counters = &mut self.tube_mut(tube).metrics.counters;
            counters.buried += 1;
            counters.dead_lettered += 1;
            self.bury(id, now);
        } else {
            let delay_ms = retry_in_ms.unwrap_or_else(|| {
                let unit = (mix(now ^ id.rotate_left(32)) >> 11) as f64 / (1u64 << 53) as f64;
                backoff.delay_ms(attempts, unit)
            });
            let delay_ns = delay_ms.saturating_mul(NS_PER_MS);
            self.jobs.get_mut(&id).expect("job exists").delay_ns = delay_ns;
            self.enqueue(id, delay_ns, now);
        }
        self.record_change(id);
    }

    /// The backoff a job's failures get: its own, its queue's, the default.
    pub(super) fn backoff_of(&self, id: JobId) -> Backoff {
        let job = &self.jobs[&id];
        job.extra
            .as_ref()
            .and_then(|e| e.backoff.as_deref().copied())
            .or_else(|| self.policy(&self.tube(job.tube).name)?.backoff)
            .unwrap_or_default()
    }

    pub(super) fn release(
        &mut self,
        lease: Lease,
        delay_ms: u64,
        priority: Option<u32>,
        now: u64,
    ) -> Result<Outcome, BrokerError> {
        self.check_writable(true)?;
        self.check_lease(lease)?;
        let delay_ns = self.delay_of(RunAt::DelayMs(delay_ms), now)?;
        let id = lease.job;
        self.release_reservation_of(id);
        self.requeue_released(id, priority, delay_ns, now);
        self.view_outcome(id)
    }

    /// A released job (its reservation already ended) back to ready or
    /// delayed, not counted as an attempt; logged.
    pub(super) fn requeue_released(
        &mut self,
        id: JobId,
        priority: Option<u32>,
        delay_ns: u64,
        now: u64,
    ) {
        let job = self.jobs.get_mut(&id).expect("job exists");
        if let Some(pri) = priority {
            job.pri = pri;
        }
        job.delay_ns = delay_ns;
        job.releases += 1;
        let tube = job.tube;
        self.tube_mut(tube).metrics.counters.released += 1;
        self.enqueue(id, delay_ns, now);
        self.record_change(id);
    }

    pub(super) fn bury_job(
        &mut self,
        id: JobId,
        lease: Option<Lease>,
        reason: Option<String>,
        now: u64,
    ) -> Result<Outcome, BrokerError> {
        self.check_writable(true)?;
        match lease {
            Some(lease) if lease.job != id => {
                return Err(BrokerError::Conflict(Conflict::LeaseExpired))
            }
            Some(lease) => {
                self.check_lease(lease)?;
                self.release_reservation_of(id);
            }
            None => {
                let state = self.jobs.get(&id).map(|j| j.state).ok_or(self.gone(id))?;
                match state {
                    JobState::Ready | JobState::Delayed => self.unqueue(id),
                    other => return Err(wrong_state(other)),
                }
            }
        }
        let job = self.jobs.get_mut(&id).expect("job exists");
        if let Some(reason) = reason {
            job.extra_mut().last_error =
                Some(truncated(reason, limits::ERROR_MAX_BYTES).into_boxed_str());
        }
        let tube = job.tube;
        self.tube_mut(tube).metrics.counters.buried += 1;
        self.bury(id, now);
        self.record_change(id);
        self.view_outcome(id)
    }

    pub(super) fn cancel(
        &mut self,
        id: JobId,
        expected_version: Option<u64>,
        now: u64,
    ) -> Result<Outcome, BrokerError> {
        self.check_writable(true)?;
        let Some(job) = self.jobs.get(&id) else {
            return Err(self.gone(id));
        };
        self.check_version(job.version, expected_version)?;
        if job.state == JobState::Reserved {
            // The lease is revoked now; its holder learns it at its next
            // heartbeat, completion or failure (or beanstalkd touch/delete).
            self.release_reservation_of(id);
        } else {
            self.unqueue(id);
        }
        self.jobs
            .get_mut(&id)
            .expect("job exists")
            .extra_mut()
            .cancel_requested = true;
        let tube = self.jobs[&id].tube;
        self.tube_mut(tube).metrics.counters.cancelled += 1;
        Ok(Outcome::Job(self.finish(id, JobState::Cancelled, now)))
    }

    /// Takes a ready, delayed or buried job out of its queue.
    pub(super) fn unqueue(&mut self, id: JobId) {
        let job = &self.jobs[&id];
        let (state, tube, pri, seq, deadline) =
            (job.state, job.tube, job.pri, job.seq, job.deadline_at_ns);
        match state {
            JobState::Ready => self.remove_ready(tube, pri, id),
            JobState::Buried => self.remove_buried(tube, seq, id),
            JobState::Delayed => self.remove_delayed(tube, deadline, id),
            JobState::Reserved | JobState::Completed | JobState::Cancelled => {
                unreachable!("job {id} is in no queue")
            }
        }
    }

    pub(super) fn update(
        &mut self,
        id: JobId,
        expected_version: Option<u64>,
        change: JobChange,
        now: u64,
    ) -> Result<Outcome, BrokerError> {
        self.check_writable(true)?;
        let Some(job) = self.jobs.get(&id) else {
            return Err(self.gone(id));
        };
        if job.state == JobState::Reserved {
            return Err(wrong_state(JobState::Reserved));
        }
        self.check_version(job.version, expected_version)?;
        if let Some(payload) = &change.payload {
            if payload.len() > self.config.max_job_size as usize {
                return Err(BrokerError::TooLarge {
                    max_bytes: u64::from(self.config.max_job_size),
                });
            }
        }
        if let Some(headers) = &change.headers {
            check_headers(headers)?;
        }
        let delay_ns = change
            .run_at
            .map(|run_at| self.delay_of(run_at, now))
            .transpose()?;
        let (state, due) = (job.state, job.deadline_at_ns);
        self.unqueue(id);
        let job = self.jobs.get_mut(&id).expect("job exists");
        if let Some(pri) = change.priority {
            job.pri = pri;
        }
        if let Some(max_attempts) = change.max_attempts {
            job.max_attempts = max_attempts;
        }
        if let Some(headers) = change.headers {
            job.extra_mut().headers = headers;
        }
        let old_len = job.body.len();
        if let Some(payload) = change.payload {
            job.body = payload;
        }
        let new_len = job.body.len();
        let tube = job.tube;
        let tube_len = self.tube(tube).name.as_str().len();
        self.live_log_bytes = self.live_log_bytes - job_snapshot_log_bytes(tube_len, old_len)
            + job_snapshot_log_bytes(tube_len, new_len);
        match (delay_ns, state) {
            (Some(delay_ns), _) => {
                self.jobs.get_mut(&id).expect("job exists").delay_ns = delay_ns;
                self.enqueue(id, delay_ns, now);
            }
            (None, JobState::Delayed) => self.enqueue(id, due.saturating_sub(now).max(1), now),
            (None, JobState::Buried) => self.bury(id, now),
            (None, _) => self.enqueue(id, 0, now),
        }
        if self.logging {
            // A batch of one: a snapshot outside a batch is a compaction's,
            // which the log may drop when it abandons a compaction.
            let record = self.full_record(id).expect("job exists");
            self.log
                .push(LogRecord::Batch(vec![LogRecord::JobSnapshot(Box::new(
                    record,
                ))]));
        }
        self.view_outcome(id)
    }

    pub(super) fn delete_job(
        &mut self,
        id: JobId,
        expected_version: Option<u64>,
    ) -> Result<Outcome, BrokerError> {
        self.check_writable(false)?;
        if let Some(job) = self.jobs.get(&id) {
            if job.state == JobState::Reserved {
                return Err(wrong_state(JobState::Reserved));
            }
            self.check_version(job.version, expected_version)?;
            self.unqueue(id);
            let tube = self.jobs[&id].tube;
            let t = self.tube_mut(tube);
            t.cmd_delete += 1;
            t.metrics.counters.deleted += 1;
            self.drop_job(id);
        } else {
            let finished = self.retention.get(id).ok_or(BrokerError::NotFound)?;
            self.check_version(finished.job.version, expected_version)?;
            let gone = self.retention.remove(id).expect("final job exists");
            self.forget_finished(gone);
        }
        self.record(|| LogRecord::Delete { id });
        Ok(Outcome::Done)
    }
}
