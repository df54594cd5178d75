//! Jobs as the job API shows them, and as the log records them after a
//! change.

use spool_broker::{BrokerError, JobView, Outcome};

use super::tasks::NS_PER_MS;
use super::*;

impl Engine {
    pub(super) fn view_outcome(&self, id: JobId) -> Result<Outcome, BrokerError> {
        self.view(id).map(Outcome::Job).ok_or(BrokerError::NotFound)
    }

    /// A live or final job as the APIs show it.
    pub fn view(&self, id: JobId) -> Option<JobView> {
        if let Some(job) = self.jobs.get(&id) {
            return Some(self.view_of(job, &self.tube(job.tube).name));
        }
        let finished = self.retention.get(id)?;
        Some(self.view_of(&finished.job, &finished.queue))
    }

    pub(super) fn view_of(&self, job: &Job, queue: &TubeName) -> JobView {
        let extra = job.extra.as_deref();
        let at = |ns: u64| self.wall_ms(ns);
        let updated_at_ns = match extra {
            Some(extra) => extra.updated_at_ns,
            // A plain job's last change is the start of its state: when it
            // became ready, was delayed or reserved; a buried one shows its
            // creation (beanstalkd jobs keep no burial time).
            None => match job.state {
                JobState::Ready => job.deadline_at_ns,
                JobState::Delayed => job.deadline_at_ns.saturating_sub(job.delay_ns),
                JobState::Reserved => job.deadline_at_ns.saturating_sub(job.ttr_ns),
                _ => job.created_at_ns,
            },
        };
        let backoff = extra
            .and_then(|e| e.backoff.as_deref().copied())
            .or_else(|| self.policy(queue).and_then(|p| p.backoff))
            .unwrap_or_default();
        JobView {
            id: job.id,
            queue: queue.to_string(),
            state: job.state,
            priority: job.pri,
            payload: job.body.clone(),
            headers: extra.map(|e| e.headers.clone()).unwrap_or_default(),
            attempts: job.attempts,
            max_attempts: job.max_attempts,
            backoff,
            ttr_ms: job.ttr_ns / NS_PER_MS,
            run_at_ms: (job.state == JobState::Delayed).then(|| at(job.deadline_at_ns)),
            deadline_at_ms: (job.state == JobState::Reserved).then(|| at(job.deadline_at_ns)),
            created_at_ms: at(job.created_at_ns),
            updated_at_ms: at(updated_at_ns),
            finished_at_ms: job.state.is_final().then(|| at(job.deadline_at_ns)),
            last_error: extra.and_then(|e| e.last_error.as_deref().map(String::from)),
            result: extra.and_then(|e| e.result.clone()),
            idempotency_key: extra.and_then(|e| e.idempotency_key.clone()),
            cancel_requested: extra.is_some_and(|e| e.cancel_requested),
            version: job.version,
            parents: self.parents_of(job.id),
        }
    }

    /// Where a job rests, as the log says it.
    pub(super) fn rest_state_of(job: &Job) -> RestState {
        match job.state {
            JobState::Ready | JobState::Reserved => RestState::Ready,
            JobState::Delayed => RestState::Delayed {
                due_ns: job.deadline_at_ns,
            },
            JobState::Buried => RestState::Buried,
            JobState::Completed => RestState::Completed {
                at_ns: job.deadline_at_ns,
            },
            JobState::Cancelled => RestState::Cancelled {
                at_ns: job.deadline_at_ns,
            },
        }
    }

    /// A live or final job's whole durable state.
    pub(super) fn full_record(&self, id: JobId) -> Option<FullJobRecord> {
        let (job, queue) = match self.jobs.get(&id) {
            Some(job) => (job, &self.tube(job.tube).name),
            None => {
                let finished = self.retention.get(id)?;
                (&finished.job, &finished.queue)
            }
        };
        Some(FullJobRecord {
            job: JobRecord {
                id,
                tube: queue.clone(),
                pri: job.pri,
                ttr_ns: job.ttr_ns,
                delay_ns: job.delay_ns,
                created_at_ns: job.created_at_ns,
                state: Self::rest_state_of(job),
                body: job.body.clone(),
            },
            attempts: job.attempts,
            max_attempts: job.max_attempts,
            version: job.version,
            extra: job.extra.as_deref().cloned(),
        })
    }

    /// Logs a job's durable fields after a change (live or final job).
    pub(super) fn record_change(&mut self, id: JobId) {
        if !self.logging {
            return;
        }
        let job = match self.jobs.get(&id) {
            Some(job) => job,
            None => &self.retention.get(id).expect("job exists").job,
        };
        let extra = job.extra.as_deref();
        let record = ChangeRecord {
            id,
            version: job.version,
            attempts: job.attempts,
            pri: job.pri,
            delay_ns: job.delay_ns,
            state: Self::rest_state_of(job),
            cancel_requested: extra.is_some_and(|e| e.cancel_requested),
            last_error: extra.and_then(|e| e.last_error.as_deref().map(String::from)),
            result: extra.and_then(|e| e.result.clone()),
            updated_at_ns: extra.map_or(0, |e| e.updated_at_ns),
        };
        self.log.push(LogRecord::Change(Box::new(record)));
    }
}
