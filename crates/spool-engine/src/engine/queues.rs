//! Queues seen whole through the job API: listings by state and purges,
//! policies and pauses (durable settings that outlive the tube), and the
//! counts a queue shows.

use spool_broker::{BrokerError, JobPage, Outcome, QueueInfo};

use super::*;

impl Engine {
    /// Ids of `queue`'s jobs in `state`, ascending.
    pub(super) fn ids_in(&self, queue: &TubeName, state: JobState) -> Vec<JobId> {
        let mut ids: Vec<JobId> = match state {
            JobState::Completed | JobState::Cancelled => self
                .retention
                .of_queue(queue)
                .filter(|f| f.job.state == state)
                .map(|f| f.job.id)
                .collect(),
            _ => match self.tube_ids.get(queue) {
                None => Vec::new(),
                Some(&tube) => {
                    let t = self.tube(tube);
                    match state {
                        JobState::Ready => t.ready.iter().map(|&(_, id)| id).collect(),
                        JobState::Delayed => t.delayed.iter().map(|&(_, id)| id).collect(),
                        JobState::Buried => t.buried.iter().map(|&(_, id)| id).collect(),
                        _ => self
                            .reservations
                            .iter()
                            .map(|&(_, _, id)| id)
                            .filter(|id| self.jobs[id].tube == tube)
                            .collect(),
                    }
                }
            },
        };
        ids.sort_unstable();
        ids
    }

    pub(super) fn list(
        &self,
        queue: &TubeName,
        state: JobState,
        after: Option<JobId>,
        limit: u32,
    ) -> Result<Outcome, BrokerError> {
        if limit == 0 || limit > limits::LIST_LIMIT_MAX {
            return Err(BrokerError::invalid(
                "limit",
                format!("1 to {}", limits::LIST_LIMIT_MAX),
            ));
        }
        let after = after.unwrap_or(0);
        let ids = self.ids_in(queue, state);
        let start = ids.partition_point(|&id| id <= after);
        let page: Vec<JobId> = ids[start..].iter().take(limit as usize).copied().collect();
        let more = ids.len() > start + page.len();
        let next = more.then(|| page.last().copied()).flatten();
        let jobs = page.iter().filter_map(|&id| self.view(id)).collect();
        Ok(Outcome::Page(JobPage { jobs, next }))
    }

    /// `Op::Peek`: the first job of a tube's ready, delayed or buried set,
    /// in the order beanstalkd's peek commands show them.
    pub(super) fn peek(&self, queue: &TubeName, state: JobState) -> Result<Outcome, BrokerError> {
        if !matches!(
            state,
            JobState::Ready | JobState::Delayed | JobState::Buried
        ) {
            return Err(BrokerError::invalid("state", "ready, delayed or buried"));
        }
        self.tube_ids
            .get(queue)
            .and_then(|&tube| self.tube(tube).first_in(state))
            .and_then(|id| self.view(id))
            .map(Outcome::Job)
            .ok_or(BrokerError::NotFound)
    }

    pub(super) fn purge(
        &mut self,
        queue: &TubeName,
        state: JobState,
    ) -> Result<Outcome, BrokerError> {
        if state == JobState::Reserved {
            return Err(BrokerError::invalid(
                "state",
                "reserved jobs are not purged: cancel them",
            ));
        }
        self.check_writable(false)?;
        let ids = self.ids_in(queue, state);
        let mut purged = 0;
        for id in ids.into_iter().take(limits::PURGE_JOBS_MAX) {
            self.delete_job(id, None)?;
            purged += 1;
        }
        Ok(Outcome::Purged(purged))
    }

    pub(super) fn set_settings(&mut self, queue: TubeName, settings: QueueSettings) {
        if let Some(&tube) = self.tube_ids.get(&queue) {
            self.apply_settings(tube, &settings);
        }
        self.record(|| {
            LogRecord::Queue(Box::new(QueueRecord {
                queue: Some(queue.clone()),
                policy: settings.policy.clone(),
                pause: settings.pause,
            }))
        });
        if settings.policy.rate_per_s.is_none() {
            self.rate_tats.remove(&queue);
        }
        if settings == QueueSettings::default() {
            self.settings.remove(&queue);
        } else {
            self.settings.insert(queue.clone(), settings);
        }
        self.rebound_retention(&queue);
    }

    /// Gives a live tube its settings: the policy's attempt limit for
    /// beanstalkd puts, its dispatch limits, and the pause.
    pub(super) fn apply_settings(&mut self, tube: TubeId, settings: &QueueSettings) {
        self.apply_limits(tube, &settings.policy);
        let t = self.tube_mut(tube);
        t.max_attempts = settings.policy.max_attempts.unwrap_or(0);
        if let Some((start, until)) = settings.pause {
            let old = (t.pause_ns > 0).then_some(t.unpause_at_ns);
            t.pause_ns = until.saturating_sub(start).max(1);
            t.unpause_at_ns = until;
            if let Some(old) = old {
                self.paused.remove(&(old, tube));
            }
            self.paused.insert((until, tube));
        }
    }

    pub(super) fn queue_info(&self, queue: &TubeName, now: u64) -> QueueInfo {
        let mut info = QueueInfo {
            name: queue.to_string(),
            completed: self.retention.count_in(queue, JobState::Completed),
            cancelled: self.retention.count_in(queue, JobState::Cancelled),
            ..QueueInfo::default()
        };
        if let Some(&tube) = self.tube_ids.get(queue) {
            let t = self.tube(tube);
            info.ready = t.ready.len() as u64;
            info.reserved = t.reserved;
            info.delayed = t.delayed.len() as u64;
            info.buried = t.buried.len() as u64;
            if t.pause_ns > 0 && t.unpause_at_ns > now {
                info.paused_until_ms = Some(if t.unpause_at_ns == u64::MAX {
                    u64::MAX
                } else {
                    self.wall_ms(t.unpause_at_ns)
                });
            }
        }
        if let Some(settings) = self.settings.get(queue) {
            info.policy = settings.policy.clone();
            if let Some((_, until)) = settings.pause.filter(|&(_, until)| until > now) {
                info.paused_until_ms = Some(if until == u64::MAX {
                    u64::MAX
                } else {
                    self.wall_ms(until)
                });
            }
        }
        info
    }
}
