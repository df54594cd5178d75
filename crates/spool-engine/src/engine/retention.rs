//! Completed and cancelled jobs: kept, readable, for their queue's
//! retention (an age and a count), then forgotten.
//!
//! A final job leaves its tube (it holds no reference to it, so a tube of
//! only finished jobs is freed like an empty one) and lives here by queue
//! name. Forgetting is not logged: replay applies the same bounds to the
//! same finish times, and compaction snapshots only what is kept.

use std::collections::{BTreeSet, HashMap, VecDeque};

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
    /// Per queue, in finish order: the count bound drops the front.
    by_queue: HashMap<TubeName, VecDeque<JobId>>,
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
            .filter_map(|id| self.jobs.get(id))
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
        let expires_at_ns = job.deadline_at_ns.saturating_add(retention_ns);
        self.expiries.insert((expires_at_ns, id));
        let order = self.by_queue.entry(queue.clone()).or_default();
        order.push_back(id);
        let mut over = Vec::new();
        while order.len() as u64 > max_jobs {
            let Some(oldest) = order.pop_front() else {
                break;
            };
            over.push(oldest);
        }
        self.jobs.insert(
            id,
            Finished {
                job,
                queue,
                expires_at_ns,
            },
        );
        over.into_iter()
            .filter_map(|id| self.take(id, false))
            .collect()
    }

    /// Forgets a job; `unlink` when it may still be in its queue's order.
    fn take(&mut self, id: JobId, unlink: bool) -> Option<Finished> {
        let finished = self.jobs.remove(&id)?;
        self.expiries.remove(&(finished.expires_at_ns, id));
        if unlink {
            if let Some(order) = self.by_queue.get_mut(&finished.queue) {
                // Usually the front: jobs expire in about the order they
                // finished.
                if order.front() == Some(&id) {
                    order.pop_front();
                } else {
                    order.retain(|&other| other != id);
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
    pub(super) fn finish(&mut self, id: JobId, state: JobState, now: u64) {
        debug_assert!(state.is_final());
        let job = self.jobs.get_mut(&id).expect("job exists");
        job.state = state;
        job.reserver = None;
        job.deadline_at_ns = now;
        job.version += 1;
        job.extra_mut().updated_at_ns = now;
        self.record_change(id);
        let job = self.jobs.remove(&id).expect("job exists");
        let queue = self.tube(job.tube).name.clone();
        self.decref(job.tube);
        self.keep_finished(job, queue);
    }

    /// Hands a final job to the retention under its queue's bounds.
    pub(super) fn keep_finished(&mut self, job: Job, queue: TubeName) {
        let policy = self.settings.get(&queue).map(|s| &s.policy);
        let retention_ms = policy
            .and_then(|p| p.retention_ms)
            .unwrap_or(limits::RETENTION_MS_DEFAULT);
        let max_jobs = policy
            .and_then(|p| p.retention_max_jobs)
            .unwrap_or(limits::RETENTION_MAX_JOBS_DEFAULT);
        let over =
            self.retention
                .insert(job, queue, retention_ms.saturating_mul(1_000_000), max_jobs);
        for gone in over {
            self.forget_finished(gone);
        }
    }

    /// A final job leaves memory for good: its key and its log bytes go.
    pub(super) fn forget_finished(&mut self, gone: Finished) {
        self.forget_key(&gone.job, &gone.queue);
        self.live_log_bytes = self.live_log_bytes.saturating_sub(job_snapshot_log_bytes(
            gone.queue.as_str().len(),
            gone.job.body.len(),
        ));
    }

    /// Forgets final jobs whose retention ended by `now`.
    pub(super) fn expire_finished(&mut self, now: u64) {
        while let Some(gone) = self.retention.pop_expired(now) {
            self.forget_finished(gone);
        }
    }
}
