//! Completed and cancelled jobs: kept, readable, for their queue's
//! retention (an age and a count), then forgotten.
//!
//! A final job leaves its tube (it holds no reference to it, so a tube of
//! only finished jobs is freed like an empty one) and lives here by queue
//! name. Forgetting is not logged: replay applies the same bounds to the
//! same finish times, and compaction snapshots only what is kept.

use std::collections::{BTreeSet, HashMap, VecDeque};

use spool_broker::JobView;

use super::*;

/// A final job and the queue it finished in.
#[derive(Debug)]
pub(super) struct Finished {
    pub(super) job: Job,
    pub(super) queue: TubeName,
    /// When its retention ends.
    expires_at_ns: u64,
}

#[derive(Debug, Default)]
pub(super) struct Retention {
    jobs: IdMap<Finished>,
    /// Per queue, (finished at, job) in that order: the count bound drops
    /// the front. Ordered by the finish, not by arrival, so that a replay
    /// of snapshots in any order keeps the same jobs.
    by_queue: HashMap<TubeName, VecDeque<(u64, JobId)>>,
    /// (expires at, job): the age bound's timer.
    expiries: BTreeSet<(u64, JobId)>,
}

impl Retention {
    pub(super) fn get(&self, id: JobId) -> Option<&Finished> {
        self.jobs.get(&id)
    }

    pub(super) fn get_mut(&mut self, id: JobId) -> Option<&mut Finished> {
        self.jobs.get_mut(&id)
    }

    pub(super) fn len(&self) -> usize {
        self.jobs.len()
    }

    pub(super) fn contains(&self, id: JobId) -> bool {
        self.jobs.contains_key(&id)
    }

    pub(super) fn ids(&self) -> impl Iterator<Item = JobId> + '_ {
        self.jobs.keys().copied()
    }

    /// The final jobs of `queue` in finish order.
    pub(super) fn of_queue(&self, queue: &TubeName) -> impl Iterator<Item = &Finished> + '_ {
        self.by_queue
            .get(queue)
            .into_iter()
            .flatten()
            .filter_map(|(_, id)| self.jobs.get(id))
    }

    pub(super) fn count_in(&self, queue: &TubeName, state: JobState) -> u64 {
        self.of_queue(queue)
            .filter(|f| f.job.state == state)
            .count() as u64
    }

    pub(super) fn queues(&self) -> impl Iterator<Item = &TubeName> + '_ {
        self.by_queue.keys()
    }

    /// Keeps a job that just finished (its `deadline_at_ns` holds when) and
    /// returns the jobs the count bound pushed out.
    pub(super) fn insert(
        &mut self,
        job: Job,
        queue: TubeName,
        retention_ns: u64,
        max_jobs: u64,
    ) -> Vec<Finished> {
        let id = job.id;
        let finished_at = job.deadline_at_ns;
        let expires_at_ns = finished_at.saturating_add(retention_ns);
        self.expiries.insert((expires_at_ns, id));
        let order = self.by_queue.entry(queue.clone()).or_default();
        // Nearly always the back: jobs finish in time order.
        let at = order.partition_point(|&other| other <= (finished_at, id));
        order.insert(at, (finished_at, id));
        self.jobs.insert(
            id,
            Finished {
                job,
                queue: queue.clone(),
                expires_at_ns,
            },
        );
        self.trim(&queue, max_jobs)
    }

    /// Drops the oldest final jobs of `queue` past `max_jobs`.
    fn trim(&mut self, queue: &TubeName, max_jobs: u64) -> Vec<Finished> {
        let mut over = Vec::new();
        if let Some(order) = self.by_queue.get_mut(queue) {
            while order.len() as u64 > max_jobs {
                let Some((_, oldest)) = order.pop_front() else {
                    break;
                };
                over.push(oldest);
            }
        }
        over.into_iter()
            .filter_map(|id| self.take(id, false))
            .collect()
    }

    /// A queue's retention changed: its jobs expire by the new age from
    /// their finish, and the count bound applies now (so that a replay,
    /// which meets the policy before or after the jobs, keeps the same).
    pub(super) fn rebound(
        &mut self,
        queue: &TubeName,
        retention_ns: u64,
        max_jobs: u64,
    ) -> Vec<Finished> {
        let ids: Vec<(u64, JobId)> = self
            .by_queue
            .get(queue)
            .map(|order| order.iter().copied().collect())
            .unwrap_or_default();
        for (finished_at, id) in ids {
            if let Some(f) = self.jobs.get_mut(&id) {
                self.expiries.remove(&(f.expires_at_ns, id));
                f.expires_at_ns = finished_at.saturating_add(retention_ns);
                self.expiries.insert((f.expires_at_ns, id));
            }
        }
        self.trim(queue, max_jobs)
    }

    /// Forgets a job; `unlink` when it may still be in its queue's order.
    fn take(&mut self, id: JobId, unlink: bool) -> Option<Finished> {
        let finished = self.jobs.remove(&id)?;
        self.expiries.remove(&(finished.expires_at_ns, id));
        if unlink {
            if let Some(order) = self.by_queue.get_mut(&finished.queue) {
                // Usually the front: jobs expire in about the order they
                // finished.
                if order.front().is_some_and(|&(_, front)| front == id) {
                    order.pop_front();
                } else {
                    order.retain(|&(_, other)| other != id);
                }
            }
        }
        if self
            .by_queue
            .get(&finished.queue)
            .is_some_and(VecDeque::is_empty)
        {
            self.by_queue.remove(&finished.queue);
        }
        Some(finished)
    }

    pub(super) fn remove(&mut self, id: JobId) -> Option<Finished> {
        self.take(id, true)
    }

    /// When the next job's retention ends.
    pub(super) fn next_expiry(&self) -> Option<u64> {
        self.expiries.first().map(|&(at, _)| at)
    }

    /// Forgets the next job whose retention ended by `now`, if any.
    pub(super) fn pop_expired(&mut self, now: u64) -> Option<Finished> {
        let &(at, id) = self.expiries.first()?;
        if at > now {
            return None;
        }
        self.take(id, true)
    }

    pub(super) fn check_invariants(&self, live: &IdMap<Job>) {
        assert_eq!(self.expiries.len(), self.jobs.len());
        let ordered: usize = self.by_queue.values().map(VecDeque::len).sum();
        assert_eq!(ordered, self.jobs.len());
        for (id, finished) in &self.jobs {
            assert!(finished.job.state.is_final());
            assert!(!live.contains_key(id), "job {id} is both live and final");
            assert!(self.expiries.contains(&(finished.expires_at_ns, *id)));
        }
    }
}

impl Engine {
    /// Jobs the log holds: live ones and final ones still retained.
    pub fn durable_job_count(&self) -> usize {
        self.jobs.len() + self.retention.len()
    }

    /// Moves a live job that is in no queue to its final `state` at `now`:
    /// it leaves its tube, is logged, and is kept for the retention.
    /// Returns the job as it finished: with a retention of few jobs, a job
    /// finishing in the same instant as others may be forgotten at once.
    pub(super) fn finish(&mut self, id: JobId, state: JobState, now: u64) -> JobView {
        debug_assert!(state.is_final());
        let job = self.jobs.get_mut(&id).expect("job exists");
        job.state = state;
        job.reserver = None;
        job.deadline_at_ns = now;
        job.version += 1;
        job.extra_mut().updated_at_ns = now;
        self.record_change(id);
        self.settled(id);
        self.workflow_event(id, |engine| match state {
            JobState::Completed => JobEvent::Completed {
                result: engine.jobs[&id]
                    .extra
                    .as_ref()
                    .and_then(|e| e.result.clone()),
            },
            _ => JobEvent::Cancelled,
        });
        let view = self.view(id).expect("job exists");
        let job = self.jobs.remove(&id).expect("job exists");
        let queue = self.tube(job.tube).name.clone();
        self.decref(job.tube);
        self.keep_finished(job, queue);
        view
    }

    /// A queue's retention: (age in ns, count).
    fn retention_of(&self, queue: &TubeName) -> (u64, u64) {
        let policy = self.settings.get(queue).map(|s| &s.policy);
        let retention_ms = policy
            .and_then(|p| p.retention_ms)
            .unwrap_or(limits::RETENTION_MS_DEFAULT);
        let max_jobs = policy
            .and_then(|p| p.retention_max_jobs)
            .unwrap_or(limits::RETENTION_MAX_JOBS_DEFAULT);
        (retention_ms.saturating_mul(1_000_000), max_jobs)
    }

    /// Hands a final job to the retention under its queue's bounds.
    pub(super) fn keep_finished(&mut self, job: Job, queue: TubeName) {
        let (age_ns, max_jobs) = self.retention_of(&queue);
        let over = self.retention.insert(job, queue, age_ns, max_jobs);
        for gone in over {
            self.evict_finished(gone);
        }
    }

    /// Applies a queue's (new) retention to the final jobs it keeps.
    pub(super) fn rebound_retention(&mut self, queue: &TubeName) {
        let (age_ns, max_jobs) = self.retention_of(queue);
        let over = self.retention.rebound(queue, age_ns, max_jobs);
        for gone in over {
            self.evict_finished(gone);
        }
    }

    /// The retention lets a final job go: logged as a Delete, so that the
    /// log's bookkeeping of which segments hold live jobs stays exact
    /// (replay would forget it by the same rule anyway).
    fn evict_finished(&mut self, gone: Finished) {
        let id = gone.job.id;
        self.forget_finished(gone);
        self.record(|| LogRecord::Delete { id });
    }

    /// A final job leaves memory for good: its key and its log bytes go.
    pub(super) fn forget_finished(&mut self, gone: Finished) {
        self.workflow_job_forgotten(gone.job.id);
        self.forget_key(&gone.job, &gone.queue);
        self.live_log_bytes = self.live_log_bytes.saturating_sub(job_snapshot_log_bytes(
            gone.queue.as_str().len(),
            gone.job.body.len(),
        ));
    }

    /// Forgets final jobs whose retention ended by `now`.
    pub(super) fn expire_finished(&mut self, now: u64) {
        while let Some(gone) = self.retention.pop_expired(now) {
            self.evict_finished(gone);
        }
    }
}
