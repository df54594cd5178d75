//! beanstalkd's commands on the engine: sessions (the tube used, the tubes
//! watched, blocked reserves, the leases a session holds) and one function
//! per command, answering through the outbox with beanstalkd's replies.

use super::*;

impl Engine {
    /// How many jobs `conn` has reserved (0 for an unknown session).
    pub fn reserved_count(&self, conn: ConnId) -> usize {
        self.conns.get(&conn).map_or(0, |c| c.reserved_count())
    }

    /// Replies produced since the last call, in the order they were made.
    pub fn take_replies(&mut self) -> Vec<(ConnId, Response)> {
        std::mem::take(&mut self.outbox)
    }

    /// Like [`Engine::take_replies`], reusing the caller's vector.
    pub fn drain_replies_into(&mut self, out: &mut Vec<(ConnId, Response)>) {
        out.append(&mut self.outbox);
    }

    /// True while `conn` is blocked in a `reserve`: its next request must
    /// wait until a reply for it appears in the outbox.
    pub fn is_waiting(&self, conn: ConnId) -> bool {
        self.conns.get(&conn).is_some_and(|c| c.wait().is_some())
    }

    /// Opens a session using and watching the `default` tube. The caller
    /// numbers sessions; an id must not be reused while connected.
    pub fn connect(&mut self, id: ConnId) {
        assert!(
            !self.conns.contains_key(&id),
            "connection {id} is already open"
        );
        let tube = self.default_tube;
        self.incref(tube);
        self.incref(tube);
        let t = self.tube_mut(tube);
        t.using += 1;
        t.watching += 1;
        self.conns.insert(id, Conn::new(tube));
        self.counters.current_connections += 1;
        self.counters.total_connections += 1;
    }

    /// Closes a session: a blocked reserve is abandoned and reserved jobs
    /// go back to ready, as when a beanstalkd client hangs up.
    pub fn disconnect(&mut self, conn_id: ConnId, now: u64) {
        self.remove_waiting_conn(conn_id);
        let Some(mut conn) = self.conns.remove(&conn_id) else {
            return;
        };
        self.counters.current_connections -= 1;
        self.counters.producers -= u64::from(conn.producer);
        self.counters.workers -= u64::from(conn.worker);
        for (_, id) in conn.take_reserved() {
            self.release_reservation_of(id);
            // The lease ends by itself: not a change (see `lease_job`).
            let version = self.jobs[&id].version;
            self.enqueue(id, 0, now);
            self.jobs.get_mut(&id).expect("job exists").version = version;
        }
        // Release watched tubes front first, as beanstalkd's `ms_clear` does:
        // the order decides where freed tubes leave holes in `list-tubes`.
        let mut watch = conn.take_watched();
        while let Some(tube) = watch.delete_at(0) {
            self.tube_mut(tube).watching -= 1;
            self.decref(tube);
        }
        self.tube_mut(conn.use_tube).using -= 1;
        self.decref(conn.use_tube);
        self.serve_freed_slots(now);
    }

    /// Ends a blocked reserve with `TIMED_OUT`, as beanstalkd does when the
    /// client closes its sending side while waiting. No-op if not waiting.
    pub fn time_out_wait(&mut self, conn_id: ConnId) {
        if self.is_waiting(conn_id) {
            self.remove_waiting_conn(conn_id);
            self.outbox.push((conn_id, Response::TimedOut));
        }
    }

    /// Runs one beanstalkd command for `conn` (which must be connected and
    /// not waiting). `quit` is the caller's business and is ignored here.
    pub fn execute(&mut self, conn: ConnId, request: Request, now: u64) {
        if !self.conns.contains_key(&conn) {
            return;
        }
        let mark = self.log.len();
        let reply = match request {
            Request::Put(put) => self.cmd_put(conn, put, now),
            Request::Use(name) => self.cmd_use(conn, &name),
            Request::Reserve => {
                self.counters.cmd_reserve += 1;
                self.cmd_reserve(conn, None, now)
            }
            Request::ReserveWithTimeout { timeout_secs } => {
                self.counters.cmd_reserve_with_timeout += 1;
                let timeout = timeout_secs.map(|s| u64::from(s) * NS_PER_SEC);
                self.cmd_reserve(conn, Some(timeout), now)
            }
            Request::ReserveJob(id) => self.cmd_reserve_job(conn, id, now),
            Request::Delete(id) => self.cmd_delete(conn, id, now),
            Request::Release {
                id,
                pri,
                delay_secs,
            } => self.cmd_release(conn, id, pri, u64::from(delay_secs) * NS_PER_SEC, now),
            Request::Bury { id, pri } => self.cmd_bury(conn, id, pri, now),
            Request::Touch(id) => self.cmd_touch(conn, id, now),
            Request::Watch(name) => self.cmd_watch(conn, &name),
            Request::Ignore(name) => self.cmd_ignore(conn, &name),
            Request::Peek(id) => {
                self.counters.cmd_peek += 1;
                self.found(self.jobs.contains_key(&id).then_some(id))
            }
            Request::PeekReady => {
                self.counters.cmd_peek_ready += 1;
                let t = self.tube(self.conn(conn).use_tube);
                self.found(t.first_in(JobState::Ready))
            }
            Request::PeekDelayed => {
                self.counters.cmd_peek_delayed += 1;
                let t = self.tube(self.conn(conn).use_tube);
                self.found(t.first_in(JobState::Delayed))
            }
            Request::PeekBuried => {
                self.counters.cmd_peek_buried += 1;
                let t = self.tube(self.conn(conn).use_tube);
                self.found(t.first_in(JobState::Buried))
            }
            Request::Kick { bound } => self.cmd_kick(conn, bound, now),
            Request::KickJob(id) => self.cmd_kick_job(id, now),
            Request::StatsJob(id) => {
                self.counters.cmd_stats_job += 1;
                match self.job_stats(id, now) {
                    Some(stats) => Some(Response::StatsJob(Box::new(stats))),
                    None => Some(Response::NotFound),
                }
            }
            Request::StatsTube(name) => {
                self.counters.cmd_stats_tube += 1;
                match self.tube_stats(&name, now) {
                    Some(stats) => Some(Response::StatsTube(Box::new(stats))),
                    None => Some(Response::NotFound),
                }
            }
            Request::Stats => {
                self.counters.cmd_stats += 1;
                Some(Response::Stats(Box::new(self.stats())))
            }
            Request::ListTubes => {
                self.counters.cmd_list_tubes += 1;
                let names = self.tube_order.iter().map(|t| self.tube(t).name.clone());
                Some(Response::TubeList(names.collect()))
            }
            Request::ListTubeUsed => {
                self.counters.cmd_list_tube_used += 1;
                let t = self.tube(self.conn(conn).use_tube);
                Some(Response::Using(t.name.clone()))
            }
            Request::ListTubesWatched => {
                self.counters.cmd_list_tubes_watched += 1;
                let watch = self.conn(conn).watched().iter();
                let names = watch.map(|&t| self.tube(t).name.clone()).collect();
                Some(Response::TubeList(names))
            }
            Request::PauseTube { tube, delay_secs } => {
                self.counters.cmd_pause_tube += 1;
                self.cmd_pause_tube(&tube, u64::from(delay_secs) * NS_PER_SEC, now)
            }
            Request::Quit => None,
        };
        self.settle_workflows(mark, now);
        if let Some(reply) = reply {
            self.outbox.push((conn, reply));
        }
        self.serve_freed_slots(now);
    }

    // ---- commands -------------------------------------------------------

    pub(super) fn cmd_put(&mut self, conn_id: ConnId, put: Put, now: u64) -> Option<Response> {
        self.counters.cmd_put += 1;
        let body = match put.body {
            PutBody::TooBig => return Some(Response::JobTooBig),
            PutBody::TrailingBytes => return Some(Response::BadFormat),
            PutBody::MissingCrlf => {
                self.set_producer(conn_id);
                self.next_job_id += 1; // beanstalkd spends the id on the header
                return Some(Response::ExpectedCrlf);
            }
            PutBody::Complete(body) => body,
        };
        self.set_producer(conn_id);
        let id = self.next_job_id;
        self.next_job_id += 1;
        if self.draining || self.shutting_down {
            return Some(Response::Draining);
        }
        if self.storage_failed || self.disk_full {
            return Some(Response::OutOfMemory);
        }
        let tube = self.conn(conn_id).use_tube;
        let delay_ns = u64::from(put.delay_secs) * NS_PER_SEC;
        let ttr_ns = u64::from(put.ttr_secs) * NS_PER_SEC;
        self.insert_job(id, tube, put.pri, delay_ns, ttr_ns, body, now);
        self.counters.total_jobs += 1;
        let t = self.tube_mut(tube);
        t.total_jobs += 1;
        t.metrics.counters.put += 1;
        if self.logging {
            let job = &self.jobs[&id];
            self.log.push(LogRecord::Put(JobRecord {
                id,
                tube: self.tube(tube).name.clone(),
                pri: job.pri,
                ttr_ns: job.ttr_ns,
                delay_ns,
                created_at_ns: now,
                state: if delay_ns > 0 {
                    RestState::Delayed {
                        due_ns: now + delay_ns,
                    }
                } else {
                    RestState::Ready
                },
                body: job.body.clone(),
            }));
        }
        self.enqueue(id, delay_ns, now);
        Some(Response::Inserted(id))
    }

    pub(super) fn cmd_use(&mut self, conn_id: ConnId, name: &TubeName) -> Option<Response> {
        self.counters.cmd_use += 1;
        let tube = self.find_or_make_tube(name);
        self.incref(tube);
        let conn = self.conns.get_mut(&conn_id).expect("connected");
        let old = std::mem::replace(&mut conn.use_tube, tube);
        self.tube_mut(old).using -= 1;
        self.tube_mut(tube).using += 1;
        self.decref(old);
        Some(Response::Using(name.clone()))
    }

    pub(super) fn cmd_watch(&mut self, conn_id: ConnId, name: &TubeName) -> Option<Response> {
        self.counters.cmd_watch += 1;
        let tube = self.find_or_make_tube(name);
        let conn = self.conns.get_mut(&conn_id).expect("connected");
        if conn.watch(tube) {
            self.incref(tube);
            self.tube_mut(tube).watching += 1;
        }
        let count = self.conn(conn_id).watched().len();
        Some(Response::Watching(count))
    }

    pub(super) fn cmd_ignore(&mut self, conn_id: ConnId, name: &TubeName) -> Option<Response> {
        self.counters.cmd_ignore += 1;
        let found = self
            .conn(conn_id)
            .watched()
            .iter()
            .copied()
            .find(|&t| self.tube(t).name == *name);
        if let Some(tube) = found {
            let conn = self.conns.get_mut(&conn_id).expect("connected");
            if conn.watched().len() < 2 {
                return Some(Response::NotIgnored);
            }
            conn.unwatch(tube);
            self.tube_mut(tube).watching -= 1;
            self.decref(tube);
        }
        Some(Response::Watching(self.conn(conn_id).watched().len()))
    }

    /// `timeout`: `None` for plain `reserve`, `Some(None)` for a negative
    /// (infinite) timeout.
    pub(super) fn cmd_reserve(
        &mut self,
        conn_id: ConnId,
        timeout: Option<Option<u64>>,
        now: u64,
    ) -> Option<Response> {
        self.set_worker(conn_id);
        if self.shutting_down {
            // No new work, and no reserve may hold a session open.
            return Some(Response::TimedOut);
        }
        if self.deadline_soon(conn_id, now) && !self.conn_ready(conn_id) {
            return Some(Response::DeadlineSoon);
        }
        self.wait_for_job(conn_id, timeout.flatten(), now);
        self.process_queue(now);
        None
    }

    pub(super) fn cmd_reserve_job(
        &mut self,
        conn_id: ConnId,
        id: JobId,
        now: u64,
    ) -> Option<Response> {
        match self.jobs.get(&id).map(|j| j.state) {
            Some(JobState::Ready | JobState::Buried | JobState::Delayed) => self.unqueue(id),
            _ => return Some(Response::NotFound),
        }
        self.set_worker(conn_id);
        self.reserve_job(conn_id, id, now);
        None
    }

    pub(super) fn cmd_delete(&mut self, conn_id: ConnId, id: JobId, now: u64) -> Option<Response> {
        self.counters.cmd_delete += 1;
        if self.storage_failed {
            return Some(Response::InternalError);
        }
        let Some(job) = self.jobs.get(&id) else {
            return Some(Response::NotFound);
        };
        let (state, tube, pri, deadline, seq, reserver, ttr) = (
            job.state,
            job.tube,
            job.pri,
            job.deadline_at_ns,
            job.seq,
            job.reserver,
            job.ttr_ns,
        );
        match state {
            JobState::Reserved if reserver == Some(conn_id) => {
                self.release_reservation_of(id);
                // The deadline is the reservation (or last touch) plus TTR.
                let reserved_at = deadline.saturating_sub(ttr);
                let run_ns = now.saturating_sub(reserved_at);
                self.tube_mut(tube).metrics.run.observe_ns(run_ns);
                // A beanstalkd worker finishes a job by deleting it: for a
                // workflow step, that is completion without a result.
                self.workflow_event(id, |_| JobEvent::Completed { result: None });
            }
            JobState::Reserved | JobState::Completed | JobState::Cancelled => {
                return Some(Response::NotFound)
            }
            JobState::Ready => self.remove_ready(tube, pri, id),
            JobState::Buried => self.remove_buried(tube, seq, id),
            JobState::Delayed => self.remove_delayed(tube, deadline, id),
        }
        let t = self.tube_mut(tube);
        t.cmd_delete += 1;
        t.metrics.counters.deleted += 1;
        self.drop_job(id);
        self.record(|| LogRecord::Delete { id });
        Some(Response::Deleted)
    }

    pub(super) fn cmd_release(
        &mut self,
        conn_id: ConnId,
        id: JobId,
        pri: u32,
        delay_ns: u64,
        now: u64,
    ) -> Option<Response> {
        self.counters.cmd_release += 1;
        if let Err(refusal) = self.take_back(conn_id, id) {
            return Some(refusal);
        }
        self.requeue_released(id, Some(pri), delay_ns, now);
        Some(Response::Released)
    }

    pub(super) fn cmd_bury(
        &mut self,
        conn_id: ConnId,
        id: JobId,
        pri: u32,
        now: u64,
    ) -> Option<Response> {
        self.counters.cmd_bury += 1;
        if let Err(refusal) = self.take_back(conn_id, id) {
            return Some(refusal);
        }
        let job = self.jobs.get_mut(&id).expect("job exists");
        job.pri = pri;
        let tube = job.tube;
        self.tube_mut(tube).metrics.counters.buried += 1;
        self.bury(id, now);
        self.record_change(id);
        Some(Response::Buried)
    }

    pub(super) fn cmd_touch(&mut self, conn_id: ConnId, id: JobId, now: u64) -> Option<Response> {
        self.counters.cmd_touch += 1;
        if !self.is_reserved_by(id, conn_id) {
            return Some(Response::NotFound);
        }
        self.extend_lease(id, now);
        Some(Response::Touched)
    }

    pub(super) fn cmd_kick(&mut self, conn_id: ConnId, bound: u32, now: u64) -> Option<Response> {
        self.counters.cmd_kick += 1;
        if self.storage_failed {
            return Some(Response::InternalError);
        }
        let tube = self.conn(conn_id).use_tube;
        let from_buried = !self.tube(tube).buried.is_empty();
        let mut kicked = 0;
        while kicked < bound {
            let t = self.tube(tube);
            let next = if from_buried {
                t.buried.first().map(|&(_, id)| id)
            } else {
                t.delayed.first().map(|&(_, id)| id)
            };
            let Some(id) = next else { break };
            self.kick(id, now);
            kicked += 1;
        }
        Some(Response::Kicked(kicked))
    }

    pub(super) fn cmd_kick_job(&mut self, id: JobId, now: u64) -> Option<Response> {
        if self.storage_failed {
            return Some(Response::InternalError);
        }
        match self.jobs.get(&id).map(|j| j.state) {
            Some(JobState::Buried | JobState::Delayed) => {
                self.kick(id, now);
                Some(Response::KickedJob)
            }
            _ => Some(Response::NotFound),
        }
    }

    pub(super) fn cmd_pause_tube(
        &mut self,
        name: &TubeName,
        delay_ns: u64,
        now: u64,
    ) -> Option<Response> {
        let Some(&tube) = self.tube_ids.get(name) else {
            return Some(Response::NotFound);
        };
        // A positive length keeps the end of the pause an event that wakes
        // blocked reservers. A pause of 0 ends at `now`: beanstalkd pauses
        // 1 ns and reads its clock per command, so the next command (in the
        // same round here, which shares `now`) finds the tube unpaused.
        let t = self.tube_mut(tube);
        let old = (t.pause_ns > 0).then_some(t.unpause_at_ns);
        t.pause_ns = delay_ns.max(1);
        t.unpause_at_ns = now + delay_ns;
        t.cmd_pause_tube += 1;
        if let Some(old) = old {
            self.paused.remove(&(old, tube));
        }
        self.paused.insert((now + delay_ns, tube));
        Some(Response::Paused)
    }

    pub(super) fn found(&self, id: Option<JobId>) -> Option<Response> {
        Some(match id.and_then(|id| self.jobs.get(&id)) {
            Some(job) => Response::Found {
                id: job.id,
                body: job.body.clone(),
            },
            None => Response::NotFound,
        })
    }

    /// For release and bury: takes a job back from `conn`, which must hold
    /// it; the job is then in no queue until the caller puts it somewhere.
    pub(super) fn take_back(&mut self, conn_id: ConnId, id: JobId) -> Result<(), Response> {
        if self.storage_failed {
            return Err(Response::InternalError);
        }
        if !self.is_reserved_by(id, conn_id) {
            return Err(Response::NotFound);
        }
        self.release_reservation_of(id);
        Ok(())
    }

    pub(super) fn is_reserved_by(&self, id: JobId, conn: ConnId) -> bool {
        self.jobs
            .get(&id)
            .is_some_and(|j| j.state == JobState::Reserved && j.reserver == Some(conn))
    }

    pub(super) fn wait_for_job(&mut self, conn_id: ConnId, timeout_ns: Option<u64>, now: u64) {
        let conn = self.conns.get_mut(&conn_id).expect("connected");
        let soon_at = conn
            .first_deadline()
            .map(|d| d.saturating_sub(DEADLINE_SAFETY_MARGIN_NS));
        let timeout_at = timeout_ns.map(|t| now.saturating_add(t));
        let timer_at_ns = match (soon_at, timeout_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        conn.set_wait(Wait {
            timer_at_ns,
            since_ns: now,
        });
        let watch: Vec<TubeId> = conn.watched().to_vec();
        if let Some(at) = timer_at_ns {
            self.wait_timers.insert((at, conn_id));
        }
        self.counters.waiting += 1;
        for tube in watch {
            self.tube_mut(tube).waiting.push(conn_id);
            self.waited_tubes.insert(tube);
        }
    }

    pub(super) fn remove_waiting_conn(&mut self, conn_id: ConnId) {
        let Some(conn) = self.conns.get_mut(&conn_id) else {
            return;
        };
        let Some(wait) = conn.take_wait() else {
            return;
        };
        if let Some(at) = wait.timer_at_ns {
            self.wait_timers.remove(&(at, conn_id));
        }
        self.counters.waiting -= 1;
        let watch: Vec<TubeId> = conn.watched().to_vec();
        for tube in watch {
            let t = self.tube_mut(tube);
            t.waiting.remove(conn_id);
            if t.waiting.is_empty() {
                self.waited_tubes.remove(&tube);
            }
        }
    }

    pub(super) fn deadline_soon(&self, conn_id: ConnId, now: u64) -> bool {
        self.conn(conn_id)
            .first_deadline()
            .is_some_and(|d| now >= d.saturating_sub(DEADLINE_SAFETY_MARGIN_NS))
    }

    pub(super) fn conn_ready(&self, conn_id: ConnId) -> bool {
        self.conn(conn_id)
            .watched()
            .iter()
            .any(|&t| !self.tube(t).ready.is_empty())
    }

    pub(super) fn set_producer(&mut self, conn_id: ConnId) {
        let conn = self.conns.get_mut(&conn_id).expect("connected");
        if !conn.producer {
            conn.producer = true;
            self.counters.producers += 1;
        }
    }

    pub(super) fn set_worker(&mut self, conn_id: ConnId) {
        let conn = self.conns.get_mut(&conn_id).expect("connected");
        if !conn.worker {
            conn.worker = true;
            self.counters.workers += 1;
        }
    }
}
