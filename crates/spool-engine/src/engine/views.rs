//! Read-only views: beanstalkd's `stats`, `stats-tube` and `stats-job`, and
//! snapshots for the operating surface.

use super::*;

impl Engine {
    /// The `stats` counters. Process fields are left for the caller.
    pub fn stats(&self) -> ServerStats {
        let c = &self.counters;
        ServerStats {
            current_jobs_urgent: c.urgent,
            current_jobs_ready: c.ready,
            current_jobs_reserved: c.reserved,
            current_jobs_delayed: self.delayed_count,
            current_jobs_buried: c.buried,
            cmd_put: c.cmd_put,
            cmd_peek: c.cmd_peek,
            cmd_peek_ready: c.cmd_peek_ready,
            cmd_peek_delayed: c.cmd_peek_delayed,
            cmd_peek_buried: c.cmd_peek_buried,
            cmd_reserve: c.cmd_reserve,
            cmd_reserve_with_timeout: c.cmd_reserve_with_timeout,
            cmd_delete: c.cmd_delete,
            cmd_release: c.cmd_release,
            cmd_use: c.cmd_use,
            cmd_watch: c.cmd_watch,
            cmd_ignore: c.cmd_ignore,
            cmd_bury: c.cmd_bury,
            cmd_kick: c.cmd_kick,
            cmd_touch: c.cmd_touch,
            cmd_stats: c.cmd_stats,
            cmd_stats_job: c.cmd_stats_job,
            cmd_stats_tube: c.cmd_stats_tube,
            cmd_list_tubes: c.cmd_list_tubes,
            cmd_list_tube_used: c.cmd_list_tube_used,
            cmd_list_tubes_watched: c.cmd_list_tubes_watched,
            cmd_pause_tube: c.cmd_pause_tube,
            job_timeouts: c.job_timeouts,
            total_jobs: c.total_jobs,
            max_job_size: u64::from(self.config.max_job_size),
            current_tubes: self.tube_order.len() as u64,
            current_connections: c.current_connections,
            current_producers: c.producers,
            current_workers: c.workers,
            current_waiting: c.waiting,
            total_connections: c.total_connections,
            draining: self.draining || self.shutting_down,
            process: Default::default(),
        }
    }

    /// What the operating surface shows, at `now`. Costs a pass over tubes,
    /// and over sessions for [`SnapshotScope::Full`] (never over jobs): meant
    /// for scrapes and admin requests, not for every round.
    pub fn snapshot(&self, now: u64, scope: SnapshotScope) -> EngineSnapshot {
        let queues = self
            .tube_order
            .iter()
            .map(|tube| Self::queue_snapshot(self.tube(tube), now))
            .collect();
        let retired_queues = self
            .retired_order
            .values()
            .filter_map(|name| {
                let (_, counters) = self.retired.get(name)?;
                Some(RetiredQueueSnapshot {
                    name: name.to_string(),
                    counters: *counters,
                })
            })
            .collect();
        let sessions = match scope {
            SnapshotScope::Queues => Vec::new(),
            SnapshotScope::Full => self.session_snapshots(now),
        };
        EngineSnapshot {
            now_ns: now,
            jobs_total: self.jobs.len() as u64,
            queues,
            retired_queues,
            sessions,
            draining: self.draining || self.shutting_down,
            shutting_down: self.shutting_down,
            storage_failed: self.storage_failed,
            disk_full: self.disk_full,
            next_job_id: self.next_job_id,
            server: self.stats(),
            waits: Default::default(),
            workflows: self.workflow_counters(),
            schedules: self.schedule_snapshots(now),
        }
    }

    /// Every session, by id.
    pub(super) fn session_snapshots(&self, now: u64) -> Vec<SessionSnapshot> {
        let mut sessions: Vec<SessionSnapshot> = self
            .conns
            .iter()
            .map(|(&conn_id, conn)| SessionSnapshot {
                conn_id,
                tube_used: self.tube(conn.use_tube).name.to_string(),
                watched: conn
                    .watched()
                    .iter()
                    .map(|&t| self.tube(t).name.to_string())
                    .collect(),
                reserved_job_ids: conn.reserved().take(SNAPSHOT_RESERVED_IDS_MAX).collect(),
                reserved_count: conn.reserved_count() as u64,
                blocked_in_reserve_ns: conn.wait().map(|w| now.saturating_sub(w.since_ns)),
            })
            .collect();
        sessions.sort_unstable_by_key(|s| s.conn_id);
        sessions
    }

    /// A live tube's snapshot.
    pub(super) fn queue_snapshot(t: &Tube, now: u64) -> QueueSnapshot {
        QueueSnapshot {
            name: t.name.to_string(),
            ready: t.ready.len() as u64,
            urgent: t.urgent,
            reserved: t.reserved,
            delayed: t.delayed.len() as u64,
            buried: t.buried.len() as u64,
            waiting_reservers: t.waiting.len() as u64,
            using: t.using,
            watching: t.watching,
            // A pause whose end has passed is over even if no tick ran yet.
            paused: t.pause_ns > 0 && t.unpause_at_ns > now,
            total_jobs: t.total_jobs,
            counters: t.metrics.counters,
            wait: t.metrics.wait.clone(),
            run: t.metrics.run.clone(),
            skew: t.metrics.skew.clone(),
        }
    }

    pub fn tube_stats(&self, name: &TubeName, now: u64) -> Option<TubeStats> {
        let t = self.tube(*self.tube_ids.get(name)?);
        Some(TubeStats {
            name: t.name.to_string(),
            current_jobs_urgent: t.urgent,
            current_jobs_ready: t.ready.len() as u64,
            current_jobs_reserved: t.reserved,
            current_jobs_delayed: t.delayed.len() as u64,
            current_jobs_buried: t.buried.len() as u64,
            total_jobs: t.total_jobs,
            current_using: t.using,
            current_watching: t.watching,
            current_waiting: t.waiting.len() as u64,
            cmd_delete: t.cmd_delete,
            cmd_pause_tube: t.cmd_pause_tube,
            pause_secs: t.pause_ns / NS_PER_SEC,
            pause_time_left_secs: if t.pause_ns > 0 {
                time_left_secs(t.unpause_at_ns, now)
            } else {
                0
            },
        })
    }

    pub fn job_stats(&self, id: JobId, now: u64) -> Option<JobStats> {
        let j = self.jobs.get(&id)?;
        let time_left_secs = match j.state {
            JobState::Reserved | JobState::Delayed => time_left_secs(j.deadline_at_ns, now),
            _ => 0,
        };
        Some(JobStats {
            id,
            tube: self.tube(j.tube).name.to_string(),
            state: j.state.as_str(),
            pri: j.pri,
            age_secs: now.saturating_sub(j.created_at_ns) / NS_PER_SEC,
            delay_secs: j.delay_ns / NS_PER_SEC,
            ttr_secs: j.ttr_ns / NS_PER_SEC,
            time_left_secs,
            file: 0,
            reserves: u64::from(j.reserves),
            timeouts: u64::from(j.timeouts),
            releases: u64::from(j.releases),
            buries: u64::from(j.buries),
            kicks: u64::from(j.kicks),
        })
    }
}
