//! The engine against a reference model (DESIGN.md §6, "property tests of the
//! engine against a simple model").
//!
//! The model below is written for obviousness, not speed: plain `Vec`s, linear
//! scans, one `match` per command, straight from beanstalkd 1.12's `prot.c`.
//! proptest drives both with random sessions of up to 200 operations over
//! three connections, three tube names and a virtual clock, and after every
//! operation compares:
//! - every reply, per connection and in order (`take_replies`);
//! - `is_waiting` for each connection;
//! - each job's state, priority, body, deadline and counters (`Engine::job`);
//! - the whole `stats` and every `stats-tube` reply;
//! - `next_wake` (the engine must never sleep past an event the model has due,
//!   nor wake for nothing), and `check_invariants`.
//!
//! What the model covers: put (incl. delay, TTR 0 raised to 1 s, too-big,
//! missing-CRLF and trailing-bytes puts), use, watch, ignore, reserve, reserve-with-timeout
//! (0, positive, negative = forever) with blocked waits that end in RESERVED,
//! TIMED_OUT or DEADLINE_SOON, reserve-job, delete, release, bury, touch,
//! kick, kick-job, peek*, stats-job, stats-tube, stats, list-tube*,
//! pause-tube, TTR expiry, disconnect (reserved jobs back to ready), tube
//! creation and freeing (with beanstalkd's `list-tubes` order).
//!
//! Conventions, each a deliberate choice:
//! - Which of several blocked connections gets a job is *replicated*, not
//!   relaxed: the model keeps each tube's waiters in a `Vec` with beanstalkd's
//!   `ms_take` cursor and swap-removal (`ms.c`), so replies are compared
//!   exactly even with several blocked connections.
//! - The clock is advanced the way a server on time would: `AdvanceClock`
//!   ticks at every `next_wake` up to the target and then at the target, and
//!   every command is followed by `tick(now)`. Events due at the very same
//!   nanosecond are ordered as the engine documents (delayed jobs by (due, id),
//!   then pause ends, then blocked-reserve timers by (time, connection), then
//!   TTR expiries by (deadline, reservation order)); beanstalkd leaves such
//!   ties to heap order. A *late* tick that finds events due at different
//!   times is not modelled here (see `late_tick_*` below).
//! - A command for a connection that is blocked in `reserve` goes to the next
//!   connection that is not (a real client would pipeline it behind the
//!   reserve); if all three are blocked the command is dropped. Disconnect
//!   works on blocked connections and reconnects the slot under a new id;
//!   a half-close (`time_out_wait`) ends a blocked reserve and leaves the
//!   connection usable, as the engine allows.
//! - `time-left` and `pause-time-left` count `now` as one nanosecond later,
//!   as the engine documents (beanstalkd reads its clock anew per reply).
//! - Not modelled: draining, `quit`, protocol errors (the codec's business),
//!   the HTTP-only job fields (attempts, backoff, versions).

use bytes::Bytes;
use proptest::prelude::*;
use proptest::test_runner::{FileFailurePersistence, TestCaseError};
use spool_engine::{ConnId, Engine, EngineConfig, JobState};
use spool_proto::{JobStats, Put, PutBody, Request, Response, ServerStats, TubeName, TubeStats};

const NS: u64 = 1_000_000_000;
const MS: u64 = 1_000_000;
/// beanstalkd's SAFETY_MARGIN.
const MARGIN: u64 = NS;
const URGENT: u32 = 1024;
const MAX_JOB_SIZE: u32 = 64;
const TUBES: [&str; 3] = ["default", "x", "y"];
const CONNS: usize = 3;

// ---- the model ------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MState {
    Ready,
    Delayed {
        until: u64,
    },
    /// `seq` orders a connection's reservations (disconnect returns them in
    /// that order) and breaks deadline ties.
    Reserved {
        by: ConnId,
        deadline: u64,
        seq: u64,
    },
    /// `seq` makes the buried list FIFO.
    Buried {
        seq: u64,
    },
}

#[derive(Debug, Clone)]
struct MJob {
    id: u64,
    tube: String,
    pri: u32,
    delay: u64,
    ttr: u64,
    body: Bytes,
    created: u64,
    state: MState,
    reserves: u64,
    timeouts: u64,
    releases: u64,
    buries: u64,
    kicks: u64,
}

#[derive(Debug, Clone)]
struct MConn {
    id: ConnId,
    use_tube: String,
    /// In beanstalkd's order: appended on watch, swap-removed on ignore.
    watch: Vec<String>,
    /// `Some(timeout_at)` while blocked in a reserve; `Some(None)` waits
    /// forever.
    waiting: Option<Option<u64>>,
    producer: bool,
    worker: bool,
}

#[derive(Debug, Clone)]
struct MTube {
    name: String,
    /// Blocked connections, as beanstalkd's `ms` of waiters.
    waiting: Vec<ConnId>,
    /// `ms.last`: where the next `ms_take` starts.
    cursor: usize,
    total_jobs: u64,
    cmd_delete: u64,
    cmd_pause_tube: u64,
    /// (length, until) of the current pause.
    pause: Option<(u64, u64)>,
}

#[derive(Debug)]
struct Model {
    now: u64,
    next_id: u64,
    seq: u64,
    jobs: Vec<MJob>,
    conns: Vec<MConn>,
    /// Live tubes in `list-tubes` order.
    tubes: Vec<MTube>,
    /// The counters of `stats`; the `current-*` fields are computed.
    counts: ServerStats,
    out: Vec<(ConnId, Response)>,
}

impl Model {
    fn new(now: u64) -> Model {
        let mut model = Model {
            now,
            next_id: 1,
            seq: 0,
            jobs: Vec::new(),
            conns: Vec::new(),
            tubes: Vec::new(),
            counts: ServerStats {
                max_job_size: u64::from(MAX_JOB_SIZE),
                ..ServerStats::default()
            },
            out: Vec::new(),
        };
        model.ensure_tube("default");
        model
    }

    // -- lookups --

    fn conn(&self, id: ConnId) -> &MConn {
        self.conns
            .iter()
            .find(|c| c.id == id)
            .expect("model: conn exists")
    }

    fn conn_mut(&mut self, id: ConnId) -> &mut MConn {
        self.conns
            .iter_mut()
            .find(|c| c.id == id)
            .expect("model: conn exists")
    }

    fn job(&self, id: u64) -> Option<&MJob> {
        self.jobs.iter().find(|j| j.id == id)
    }

    fn job_mut(&mut self, id: u64) -> &mut MJob {
        self.jobs
            .iter_mut()
            .find(|j| j.id == id)
            .expect("model: job exists")
    }

    fn tube(&self, name: &str) -> Option<&MTube> {
        self.tubes.iter().find(|t| t.name == name)
    }

    fn tube_mut(&mut self, name: &str) -> &mut MTube {
        self.tubes
            .iter_mut()
            .find(|t| t.name == name)
            .expect("model: tube exists")
    }

    fn reserved_by(&self, id: u64, conn: ConnId) -> bool {
        self.job(id)
            .is_some_and(|j| matches!(j.state, MState::Reserved { by, .. } if by == conn))
    }

    // -- tubes --

    /// A tube lives while a connection uses or watches it or a job is in it;
    /// `default` lives forever.
    fn tube_referenced(&self, name: &str) -> bool {
        name == "default"
            || self
                .conns
                .iter()
                .any(|c| c.use_tube == name || c.watch.iter().any(|w| w == name))
            || self.jobs.iter().any(|j| j.tube == name)
    }

    fn ensure_tube(&mut self, name: &str) {
        if self.tube(name).is_none() {
            self.tubes.push(MTube {
                name: name.to_string(),
                waiting: Vec::new(),
                cursor: 0,
                total_jobs: 0,
                cmd_delete: 0,
                cmd_pause_tube: 0,
                pause: None,
            });
        }
    }

    /// Frees an unreferenced tube; like beanstalkd's `ms_remove` on the tube
    /// list, the last tube moves into its place.
    fn free_if_unreferenced(&mut self, name: &str) {
        if self.tube_referenced(name) {
            return;
        }
        if let Some(i) = self.tubes.iter().position(|t| t.name == name) {
            self.tubes.swap_remove(i);
        }
    }

    fn paused(&self, name: &str) -> bool {
        self.tube(name)
            .and_then(|t| t.pause)
            .is_some_and(|(_, until)| until > self.now)
    }

    // -- reservations and waits --

    fn soonest_deadline(&self, conn: ConnId) -> Option<u64> {
        self.jobs
            .iter()
            .filter_map(|j| match j.state {
                MState::Reserved { by, deadline, .. } if by == conn => Some(deadline),
                _ => None,
            })
            .min()
    }

    /// beanstalkd's `conndeadlinesoon`.
    fn deadline_soon(&self, conn: ConnId) -> bool {
        self.soonest_deadline(conn)
            .is_some_and(|d| self.now >= d.saturating_sub(MARGIN))
    }

    /// beanstalkd's `conn_ready`: a ready job in a watched tube, paused or not.
    fn conn_ready(&self, conn: ConnId) -> bool {
        let c = self.conn(conn);
        self.jobs
            .iter()
            .any(|j| j.state == MState::Ready && c.watch.contains(&j.tube))
    }

    /// When a blocked reserve ends by itself: its timeout, or one safety
    /// margin before its soonest reservation expires.
    fn wait_timer(&self, conn: &MConn) -> Option<u64> {
        let timeout = conn.waiting?;
        let soon = self
            .soonest_deadline(conn.id)
            .map(|d| d.saturating_sub(MARGIN));
        [timeout, soon].into_iter().flatten().min()
    }

    fn start_wait(&mut self, conn: ConnId, timeout_at: Option<u64>) {
        let c = self.conn_mut(conn);
        c.waiting = Some(timeout_at);
        let watch = c.watch.clone();
        for t in watch {
            self.tube_mut(&t).waiting.push(conn);
        }
    }

    fn stop_wait(&mut self, conn: ConnId) {
        let Some(c) = self.conns.iter_mut().find(|c| c.id == conn) else {
            return;
        };
        if c.waiting.take().is_none() {
            return;
        }
        let watch = c.watch.clone();
        for t in watch {
            let waiting = &mut self.tube_mut(&t).waiting;
            if let Some(i) = waiting.iter().position(|&w| w == conn) {
                waiting.swap_remove(i);
            }
        }
    }

    fn reserve(&mut self, conn: ConnId, id: u64) {
        self.seq += 1;
        let (now, seq) = (self.now, self.seq);
        let job = self.job_mut(id);
        job.state = MState::Reserved {
            by: conn,
            deadline: now + job.ttr,
            seq,
        };
        job.reserves += 1;
        let body = job.body.clone();
        self.out.push((conn, Response::Reserved { id, body }));
    }

    /// beanstalkd's `process_queue`: while some unpaused tube has both a
    /// waiter and a ready job, the best ready job of all such tubes goes to
    /// that tube's next waiter.
    fn process_queue(&mut self) {
        for _ in 0..=self.jobs.len() {
            let best = self
                .jobs
                .iter()
                .filter(|j| {
                    j.state == MState::Ready
                        && !self.paused(&j.tube)
                        && self.tube(&j.tube).is_some_and(|t| !t.waiting.is_empty())
                })
                .min_by_key(|j| (j.pri, j.id))
                .map(|j| (j.id, j.tube.clone()));
            let Some((id, tube)) = best else { return };
            let t = self.tube_mut(&tube);
            t.cursor %= t.waiting.len();
            let conn = t.waiting.swap_remove(t.cursor);
            t.cursor += 1;
            self.stop_wait(conn);
            self.reserve(conn, id);
        }
        panic!("model: process_queue reserved more jobs than exist");
    }

    fn enqueue(&mut self, id: u64, delay: u64) {
        let until = self.now + delay;
        self.job_mut(id).state = if delay > 0 {
            MState::Delayed { until }
        } else {
            MState::Ready
        };
        self.process_queue();
    }

    // -- sessions --

    fn connect(&mut self, id: ConnId) {
        self.conns.push(MConn {
            id,
            use_tube: "default".to_string(),
            watch: vec!["default".to_string()],
            waiting: None,
            producer: false,
            worker: false,
        });
        self.counts.total_connections += 1;
    }

    fn disconnect(&mut self, conn: ConnId) {
        self.stop_wait(conn);
        let i = self
            .conns
            .iter()
            .position(|c| c.id == conn)
            .expect("model: conn exists");
        let c = self.conns.remove(i);
        let mut mine: Vec<(u64, u64)> = self
            .jobs
            .iter()
            .filter_map(|j| match j.state {
                MState::Reserved { by, seq, .. } if by == conn => Some((seq, j.id)),
                _ => None,
            })
            .collect();
        mine.sort_unstable();
        for (_, id) in mine {
            self.enqueue(id, 0);
        }
        // beanstalkd's ms_clear deletes index 0 until empty, each time moving
        // the last tube to the front; the used tube goes last. The order in
        // which tubes are freed decides the `list-tubes` order.
        let mut watch = c.watch.clone();
        while !watch.is_empty() {
            let name = watch.swap_remove(0);
            if name != c.use_tube {
                self.free_if_unreferenced(&name);
            }
        }
        self.free_if_unreferenced(&c.use_tube);
    }

    /// beanstalkd answers a blocked reserve `TIMED_OUT` when the client
    /// closes its sending side.
    fn time_out_wait(&mut self, conn: ConnId) {
        if self.conn(conn).waiting.is_some() {
            self.stop_wait(conn);
            self.out.push((conn, Response::TimedOut));
        }
    }

    // -- commands --

    fn execute(&mut self, conn: ConnId, request: &Request) {
        let reply = self.command(conn, request);
        if let Some(reply) = reply {
            self.out.push((conn, reply));
        }
    }

    fn command(&mut self, conn: ConnId, request: &Request) -> Option<Response> {
        let now = self.now;
        let use_tube = self.conn(conn).use_tube.clone();
        Some(match request {
            Request::Put(put) => {
                self.counts.cmd_put += 1;
                match &put.body {
                    PutBody::TooBig => Response::JobTooBig,
                    // Counted as a put but refused before the producer mark.
                    PutBody::TrailingBytes => Response::BadFormat,
                    PutBody::MissingCrlf => {
                        self.conn_mut(conn).producer = true;
                        self.next_id += 1;
                        Response::ExpectedCrlf
                    }
                    PutBody::Complete(body) => {
                        self.conn_mut(conn).producer = true;
                        let id = self.next_id;
                        self.next_id += 1;
                        let delay = u64::from(put.delay_secs) * NS;
                        self.jobs.push(MJob {
                            id,
                            tube: use_tube.clone(),
                            pri: put.pri,
                            delay,
                            ttr: (u64::from(put.ttr_secs) * NS).max(NS),
                            body: body.clone(),
                            created: now,
                            state: MState::Ready,
                            reserves: 0,
                            timeouts: 0,
                            releases: 0,
                            buries: 0,
                            kicks: 0,
                        });
                        self.counts.total_jobs += 1;
                        self.tube_mut(&use_tube).total_jobs += 1;
                        self.enqueue(id, delay);
                        Response::Inserted(id)
                    }
                }
            }
            Request::Use(name) => {
                self.counts.cmd_use += 1;
                self.ensure_tube(name.as_str());
                self.conn_mut(conn).use_tube = name.as_str().to_string();
                self.free_if_unreferenced(&use_tube);
                Response::Using(name.clone())
            }
            Request::Watch(name) => {
                self.counts.cmd_watch += 1;
                self.ensure_tube(name.as_str());
                let c = self.conn_mut(conn);
                if !c.watch.iter().any(|w| w == name.as_str()) {
                    c.watch.push(name.as_str().to_string());
                }
                Response::Watching(c.watch.len())
            }
            Request::Ignore(name) => {
                self.counts.cmd_ignore += 1;
                let c = self.conn_mut(conn);
                if let Some(i) = c.watch.iter().position(|w| w == name.as_str()) {
                    if c.watch.len() < 2 {
                        return Some(Response::NotIgnored);
                    }
                    c.watch.swap_remove(i);
                    self.free_if_unreferenced(name.as_str());
                }
                Response::Watching(self.conn(conn).watch.len())
            }
            Request::Reserve | Request::ReserveWithTimeout { .. } => {
                let timeout_at = match request {
                    Request::ReserveWithTimeout { timeout_secs } => {
                        self.counts.cmd_reserve_with_timeout += 1;
                        timeout_secs.map(|s| now + u64::from(s) * NS)
                    }
                    _ => {
                        self.counts.cmd_reserve += 1;
                        None
                    }
                };
                self.conn_mut(conn).worker = true;
                if self.deadline_soon(conn) && !self.conn_ready(conn) {
                    return Some(Response::DeadlineSoon);
                }
                self.start_wait(conn, timeout_at);
                self.process_queue();
                return None;
            }
            Request::ReserveJob(id) => match self.job(*id).map(|j| j.state) {
                Some(MState::Ready | MState::Delayed { .. } | MState::Buried { .. }) => {
                    self.conn_mut(conn).worker = true;
                    self.reserve(conn, *id);
                    return None;
                }
                _ => Response::NotFound,
            },
            Request::Delete(id) => {
                self.counts.cmd_delete += 1;
                let deletable = self.job(*id).is_some_and(|j| match j.state {
                    MState::Reserved { by, .. } => by == conn,
                    _ => true,
                });
                if !deletable {
                    return Some(Response::NotFound);
                }
                let i = self.jobs.iter().position(|j| j.id == *id).expect("checked");
                let job = self.jobs.remove(i);
                self.tube_mut(&job.tube).cmd_delete += 1;
                self.free_if_unreferenced(&job.tube);
                Response::Deleted
            }
            Request::Release {
                id,
                pri,
                delay_secs,
            } => {
                self.counts.cmd_release += 1;
                if !self.reserved_by(*id, conn) {
                    return Some(Response::NotFound);
                }
                let delay = u64::from(*delay_secs) * NS;
                let job = self.job_mut(*id);
                job.pri = *pri;
                job.delay = delay;
                job.releases += 1;
                self.enqueue(*id, delay);
                Response::Released
            }
            Request::Bury { id, pri } => {
                self.counts.cmd_bury += 1;
                if !self.reserved_by(*id, conn) {
                    return Some(Response::NotFound);
                }
                self.seq += 1;
                let seq = self.seq;
                let job = self.job_mut(*id);
                job.pri = *pri;
                job.state = MState::Buried { seq };
                job.buries += 1;
                Response::Buried
            }
            Request::Touch(id) => {
                self.counts.cmd_touch += 1;
                if !self.reserved_by(*id, conn) {
                    return Some(Response::NotFound);
                }
                let job = self.job_mut(*id);
                if let MState::Reserved { deadline, .. } = &mut job.state {
                    *deadline = now + job.ttr;
                }
                Response::Touched
            }
            Request::Kick { bound } => {
                self.counts.cmd_kick += 1;
                let in_tube = |j: &&MJob| j.tube == use_tube;
                let from_buried = self
                    .jobs
                    .iter()
                    .filter(in_tube)
                    .any(|j| matches!(j.state, MState::Buried { .. }));
                let mut kicked = 0;
                while kicked < *bound {
                    let next = self
                        .jobs
                        .iter()
                        .filter(in_tube)
                        .filter_map(|j| match (j.state, from_buried) {
                            (MState::Buried { seq }, true) => Some((seq, j.id)),
                            (MState::Delayed { until }, false) => Some((until, j.id)),
                            _ => None,
                        })
                        .min();
                    let Some((_, id)) = next else { break };
                    self.job_mut(id).kicks += 1;
                    self.enqueue(id, 0);
                    kicked += 1;
                }
                Response::Kicked(kicked)
            }
            Request::KickJob(id) => match self.job(*id).map(|j| j.state) {
                Some(MState::Buried { .. } | MState::Delayed { .. }) => {
                    self.job_mut(*id).kicks += 1;
                    self.enqueue(*id, 0);
                    Response::KickedJob
                }
                _ => Response::NotFound,
            },
            Request::Peek(id) => {
                self.counts.cmd_peek += 1;
                self.found(Some(*id))
            }
            Request::PeekReady => {
                self.counts.cmd_peek_ready += 1;
                let id = self.first_in(&use_tube, |j| match j.state {
                    MState::Ready => Some((u64::from(j.pri), j.id)),
                    _ => None,
                });
                self.found(id)
            }
            Request::PeekDelayed => {
                self.counts.cmd_peek_delayed += 1;
                let id = self.first_in(&use_tube, |j| match j.state {
                    MState::Delayed { until } => Some((until, j.id)),
                    _ => None,
                });
                self.found(id)
            }
            Request::PeekBuried => {
                self.counts.cmd_peek_buried += 1;
                let id = self.first_in(&use_tube, |j| match j.state {
                    MState::Buried { seq } => Some((seq, j.id)),
                    _ => None,
                });
                self.found(id)
            }
            Request::StatsJob(id) => {
                self.counts.cmd_stats_job += 1;
                match self.job_stats(*id) {
                    Some(stats) => Response::StatsJob(Box::new(stats)),
                    None => Response::NotFound,
                }
            }
            Request::StatsTube(name) => {
                self.counts.cmd_stats_tube += 1;
                match self.tube_stats(name.as_str()) {
                    Some(stats) => Response::StatsTube(Box::new(stats)),
                    None => Response::NotFound,
                }
            }
            Request::Stats => {
                self.counts.cmd_stats += 1;
                Response::Stats(Box::new(self.server_stats()))
            }
            Request::ListTubes => {
                self.counts.cmd_list_tubes += 1;
                Response::TubeList(self.tubes.iter().map(|t| tube_name(&t.name)).collect())
            }
            Request::ListTubeUsed => {
                self.counts.cmd_list_tube_used += 1;
                Response::Using(tube_name(&use_tube))
            }
            Request::ListTubesWatched => {
                self.counts.cmd_list_tubes_watched += 1;
                let watch = &self.conn(conn).watch;
                Response::TubeList(watch.iter().map(|t| tube_name(t)).collect())
            }
            Request::PauseTube { tube, delay_secs } => {
                self.counts.cmd_pause_tube += 1;
                if self.tube(tube.as_str()).is_none() {
                    return Some(Response::NotFound);
                }
                // beanstalkd pauses for at least 1 ns so that the end of the
                // pause is an event; it reads its clock per command, so a
                // pause of 0 is over by the next command: here, at `now`.
                let length = u64::from(*delay_secs) * NS;
                let t = self.tube_mut(tube.as_str());
                t.pause = Some((length.max(1), now + length));
                t.cmd_pause_tube += 1;
                Response::Paused
            }
            Request::Quit => return None,
        })
    }

    /// The job of `tube` with the smallest key, if any.
    fn first_in(&self, tube: &str, key: impl Fn(&MJob) -> Option<(u64, u64)>) -> Option<u64> {
        self.jobs
            .iter()
            .filter(|j| j.tube == tube)
            .filter_map(key)
            .min()
            .map(|(_, id)| id)
    }

    fn found(&self, id: Option<u64>) -> Response {
        match id.and_then(|id| self.job(id)) {
            Some(j) => Response::Found {
                id: j.id,
                body: j.body.clone(),
            },
            None => Response::NotFound,
        }
    }

    // -- time --

    /// What the engine must do at `now`, in its documented order.
    fn tick(&mut self, now: u64) {
        self.now = now;
        for _ in 0..=self.jobs.len() {
            let due = self
                .jobs
                .iter()
                .filter_map(|j| match j.state {
                    MState::Delayed { until } if until <= now => Some((until, j.id)),
                    _ => None,
                })
                .min();
            let Some((_, id)) = due else { break };
            self.enqueue(id, 0);
        }
        for t in &mut self.tubes {
            if t.pause.is_some_and(|(_, until)| until <= now) {
                t.pause = None;
            }
        }
        self.process_queue();
        let mut fired: Vec<(u64, ConnId)> = self
            .conns
            .iter()
            .filter_map(|c| Some((self.wait_timer(c).filter(|&at| at <= now)?, c.id)))
            .collect();
        fired.sort_unstable();
        for (_, conn) in fired {
            let soon = self.deadline_soon(conn);
            self.stop_wait(conn);
            let reply = if soon {
                Response::DeadlineSoon
            } else {
                Response::TimedOut
            };
            self.out.push((conn, reply));
        }
        for _ in 0..=self.jobs.len() {
            let expired = self
                .jobs
                .iter()
                .filter_map(|j| match j.state {
                    MState::Reserved { deadline, seq, .. } if deadline < now => {
                        Some((deadline, seq, j.id))
                    }
                    _ => None,
                })
                .min();
            let Some((_, _, id)) = expired else { break };
            self.job_mut(id).timeouts += 1;
            self.counts.job_timeouts += 1;
            self.enqueue(id, 0);
        }
    }

    /// The earliest time something is due: a delayed job, the end of a
    /// pause, a blocked reserve's timer, or the first nanosecond past a TTR.
    fn next_event(&self) -> Option<u64> {
        let jobs = self.jobs.iter().filter_map(|j| match j.state {
            MState::Delayed { until } => Some(until),
            MState::Reserved { deadline, .. } => Some(deadline + 1),
            _ => None,
        });
        let pauses = self.tubes.iter().filter_map(|t| t.pause.map(|(_, u)| u));
        let waits = self.conns.iter().filter_map(|c| self.wait_timer(c));
        jobs.chain(pauses).chain(waits).min()
    }

    // -- stats --

    fn count(&self, tube: Option<&str>, f: impl Fn(&MJob) -> bool) -> u64 {
        self.jobs
            .iter()
            .filter(|j| tube.is_none_or(|t| j.tube == t))
            .filter(|j| f(j))
            .count() as u64
    }

    fn server_stats(&self) -> ServerStats {
        let mut s = self.counts.clone();
        s.current_jobs_urgent = self.count(None, |j| j.state == MState::Ready && j.pri < URGENT);
        s.current_jobs_ready = self.count(None, |j| j.state == MState::Ready);
        s.current_jobs_reserved = self.count(None, |j| matches!(j.state, MState::Reserved { .. }));
        s.current_jobs_delayed = self.count(None, |j| matches!(j.state, MState::Delayed { .. }));
        s.current_jobs_buried = self.count(None, |j| matches!(j.state, MState::Buried { .. }));
        s.current_tubes = self.tubes.len() as u64;
        s.current_connections = self.conns.len() as u64;
        s.current_producers = self.conns.iter().filter(|c| c.producer).count() as u64;
        s.current_workers = self.conns.iter().filter(|c| c.worker).count() as u64;
        s.current_waiting = self.conns.iter().filter(|c| c.waiting.is_some()).count() as u64;
        s
    }

    fn tube_stats(&self, name: &str) -> Option<TubeStats> {
        let t = self.tube(name)?;
        let (pause_secs, pause_time_left_secs) = match t.pause {
            Some((length, until)) if until > self.now => (length / NS, secs_left(until, self.now)),
            _ => (0, 0),
        };
        let n = Some(name);
        Some(TubeStats {
            name: name.to_string(),
            current_jobs_urgent: self.count(n, |j| j.state == MState::Ready && j.pri < URGENT),
            current_jobs_ready: self.count(n, |j| j.state == MState::Ready),
            current_jobs_reserved: self.count(n, |j| matches!(j.state, MState::Reserved { .. })),
            current_jobs_delayed: self.count(n, |j| matches!(j.state, MState::Delayed { .. })),
            current_jobs_buried: self.count(n, |j| matches!(j.state, MState::Buried { .. })),
            total_jobs: t.total_jobs,
            current_using: self.conns.iter().filter(|c| c.use_tube == name).count() as u64,
            current_watching: self
                .conns
                .iter()
                .filter(|c| c.watch.iter().any(|w| w == name))
                .count() as u64,
            current_waiting: t.waiting.len() as u64,
            cmd_delete: t.cmd_delete,
            cmd_pause_tube: t.cmd_pause_tube,
            pause_secs,
            pause_time_left_secs,
        })
    }

    fn job_stats(&self, id: u64) -> Option<JobStats> {
        let j = self.job(id)?;
        let (state, time_left_secs) = match j.state {
            MState::Ready => ("ready", 0),
            MState::Delayed { until } => ("delayed", secs_left(until, self.now)),
            MState::Reserved { deadline, .. } => ("reserved", secs_left(deadline, self.now)),
            MState::Buried { .. } => ("buried", 0),
        };
        Some(JobStats {
            id,
            tube: j.tube.clone(),
            state,
            pri: j.pri,
            age_secs: (self.now - j.created) / NS,
            delay_secs: j.delay / NS,
            ttr_secs: j.ttr / NS,
            time_left_secs,
            file: 0,
            reserves: j.reserves,
            timeouts: j.timeouts,
            releases: j.releases,
            buries: j.buries,
            kicks: j.kicks,
        })
    }
}

/// Whole seconds left until `deadline`, as beanstalkd shows them: it reads
/// its clock anew for each reply, so at least a nanosecond has always passed
/// since the event that set the deadline (a fresh 3 s TTR shows 2).
fn secs_left(deadline: u64, now: u64) -> u64 {
    deadline.saturating_sub(now + 1) / NS
}

fn tube_name(name: &str) -> TubeName {
    TubeName::new(name.as_bytes()).expect("test tube names are valid")
}

/// One of the test tubes, or (`None`) a tube no operation ever creates.
fn maybe_tube(index: Option<usize>) -> TubeName {
    tube_name(index.map_or("nosuchtube", |i| TUBES[i]))
}

// ---- operations -----------------------------------------------------------

/// How a command names a job: mostly jobs that exist.
#[derive(Debug, Clone)]
enum IdSel {
    /// Some live job (by index), else a small number.
    Live(usize),
    /// A job the commanding connection has reserved, else like `Live`.
    Mine(usize),
    /// Any id up to just past the last one handed out, 0 included.
    Raw(u8),
}

#[derive(Debug, Clone)]
enum Cmd {
    Put {
        pri: u32,
        delay_secs: u32,
        ttr_secs: u32,
        body: Vec<u8>,
    },
    PutTooBig,
    PutMissingCrlf,
    PutTrailingBytes,
    Use(usize),
    Watch(usize),
    Ignore(usize),
    Reserve,
    /// `None` is a negative timeout: wait forever.
    ReserveWithTimeout(Option<u32>),
    ReserveJob(IdSel),
    Delete(IdSel),
    Release {
        id: IdSel,
        pri: u32,
        delay_secs: u32,
    },
    Bury {
        id: IdSel,
        pri: u32,
    },
    Touch(IdSel),
    Kick(u32),
    KickJob(IdSel),
    Peek(IdSel),
    PeekReady,
    PeekDelayed,
    PeekBuried,
    StatsJob(IdSel),
    /// `None` is a tube that never exists.
    StatsTube(Option<usize>),
    Stats,
    ListTubes,
    ListTubeUsed,
    ListTubesWatched,
    /// `None` is a tube that never exists.
    PauseTube {
        tube: Option<usize>,
        delay_secs: u32,
    },
}

#[derive(Debug, Clone)]
enum Op {
    /// A command on connection slot `.0`.
    Cmd(usize, Cmd),
    /// Hang up slot `.0` (even while blocked) and connect it again.
    Disconnect(usize),
    /// Slot `.0` closes its sending side: a blocked reserve ends `TIMED_OUT`
    /// (`Engine::time_out_wait`).
    HalfClose(usize),
    /// Let this many milliseconds pass.
    AdvanceClock(u64),
}

fn pri() -> impl Strategy<Value = u32> {
    prop_oneof![0u32..3, 1022u32..1027, Just(u32::MAX)]
}

fn id_sel() -> impl Strategy<Value = IdSel> {
    prop_oneof![
        4 => any::<usize>().prop_map(IdSel::Live),
        4 => any::<usize>().prop_map(IdSel::Mine),
        1 => any::<u8>().prop_map(IdSel::Raw),
    ]
}

fn tube_index() -> impl Strategy<Value = usize> {
    0..TUBES.len()
}

fn cmd() -> impl Strategy<Value = Cmd> {
    let put = (
        pri(),
        0u32..3,
        0u32..4,
        proptest::collection::vec(any::<u8>(), 0..6),
    )
        .prop_map(|(pri, delay_secs, ttr_secs, body)| Cmd::Put {
            pri,
            delay_secs,
            ttr_secs,
            body,
        });
    let timeout = prop_oneof![
        3 => Just(Some(0)),
        3 => (1u32..3).prop_map(Some),
        1 => Just(None),
    ];
    prop_oneof![
        14 => put.boxed(),
        1 => Just(Cmd::PutTooBig).boxed(),
        1 => Just(Cmd::PutMissingCrlf).boxed(),
        1 => Just(Cmd::PutTrailingBytes).boxed(),
        3 => tube_index().prop_map(Cmd::Use).boxed(),
        3 => tube_index().prop_map(Cmd::Watch).boxed(),
        2 => tube_index().prop_map(Cmd::Ignore).boxed(),
        3 => Just(Cmd::Reserve).boxed(),
        8 => timeout.prop_map(Cmd::ReserveWithTimeout).boxed(),
        2 => id_sel().prop_map(Cmd::ReserveJob).boxed(),
        4 => id_sel().prop_map(Cmd::Delete).boxed(),
        4 => (id_sel(), pri(), 0u32..3)
            .prop_map(|(id, pri, delay_secs)| Cmd::Release { id, pri, delay_secs })
            .boxed(),
        3 => (id_sel(), pri()).prop_map(|(id, pri)| Cmd::Bury { id, pri }).boxed(),
        3 => id_sel().prop_map(Cmd::Touch).boxed(),
        2 => (0u32..4).prop_map(Cmd::Kick).boxed(),
        2 => id_sel().prop_map(Cmd::KickJob).boxed(),
        1 => id_sel().prop_map(Cmd::Peek).boxed(),
        1 => Just(Cmd::PeekReady).boxed(),
        1 => Just(Cmd::PeekDelayed).boxed(),
        1 => Just(Cmd::PeekBuried).boxed(),
        2 => id_sel().prop_map(Cmd::StatsJob).boxed(),
        1 => proptest::option::weighted(0.9, tube_index()).prop_map(Cmd::StatsTube).boxed(),
        1 => Just(Cmd::Stats).boxed(),
        1 => Just(Cmd::ListTubes).boxed(),
        1 => Just(Cmd::ListTubeUsed).boxed(),
        1 => Just(Cmd::ListTubesWatched).boxed(),
        2 => (proptest::option::weighted(0.9, tube_index()), 0u32..3)
            .prop_map(|(tube, delay_secs)| Cmd::PauseTube { tube, delay_secs })
            .boxed(),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        40 => (0..CONNS, cmd()).prop_map(|(slot, cmd)| Op::Cmd(slot, cmd)),
        1 => (0..CONNS).prop_map(Op::Disconnect),
        1 => (0..CONNS).prop_map(Op::HalfClose),
        8 => (0u64..2500).prop_map(Op::AdvanceClock),
    ]
}

// ---- the harness ----------------------------------------------------------

/// Most steps one `AdvanceClock` may take; each step runs at least one timer,
/// and a session of 200 operations cannot set nearly this many.
const MAX_STEPS: usize = 10_000;

struct Harness {
    engine: Engine,
    model: Model,
    slots: [ConnId; CONNS],
    next_conn: ConnId,
    now: u64,
    /// What ran so far, for failure messages.
    trace: Vec<String>,
}

impl Harness {
    fn new(start: u64) -> Harness {
        let mut h = Harness {
            engine: Engine::new(EngineConfig {
                max_job_size: MAX_JOB_SIZE,
            }),
            model: Model::new(start),
            slots: [0; CONNS],
            next_conn: 1,
            now: start,
            trace: Vec::new(),
        };
        for slot in 0..CONNS {
            h.slots[slot] = h.open();
        }
        h
    }

    fn open(&mut self) -> ConnId {
        let id = self.next_conn;
        self.next_conn += 1;
        self.engine.connect(id);
        self.model.connect(id);
        id
    }

    fn fail(&self, what: String) -> TestCaseError {
        let tail = self.trace.len().saturating_sub(60);
        TestCaseError::fail(format!(
            "{what}\n-- trace (last {} steps) --\n{}",
            self.trace.len() - tail,
            self.trace[tail..].join("\n")
        ))
    }

    fn resolve(&self, conn: ConnId, sel: &IdSel) -> u64 {
        let m = &self.model;
        let live = |i: usize| match m.jobs.len() {
            0 => (i % 4) as u64,
            n => m.jobs[i % n].id,
        };
        match *sel {
            IdSel::Live(i) => live(i),
            IdSel::Mine(i) => {
                let mine: Vec<u64> = m
                    .jobs
                    .iter()
                    .filter(|j| matches!(j.state, MState::Reserved { by, .. } if by == conn))
                    .map(|j| j.id)
                    .collect();
                match mine.len() {
                    0 => live(i),
                    n => mine[i % n],
                }
            }
            IdSel::Raw(n) => u64::from(n) % (m.next_id + 2),
        }
    }

    fn request(&self, conn: ConnId, cmd: &Cmd) -> Request {
        let id = |sel: &IdSel| self.resolve(conn, sel);
        let tube = |i: usize| tube_name(TUBES[i]);
        let put = |body| {
            Request::Put(Put {
                pri: 0,
                delay_secs: 0,
                ttr_secs: 1,
                body,
            })
        };
        match cmd {
            Cmd::Put {
                pri,
                delay_secs,
                ttr_secs,
                body,
            } => Request::Put(Put {
                pri: *pri,
                delay_secs: *delay_secs,
                ttr_secs: *ttr_secs,
                body: PutBody::Complete(Bytes::from(body.clone())),
            }),
            Cmd::PutTooBig => put(PutBody::TooBig),
            Cmd::PutMissingCrlf => put(PutBody::MissingCrlf),
            Cmd::PutTrailingBytes => put(PutBody::TrailingBytes),
            Cmd::Use(i) => Request::Use(tube(*i)),
            Cmd::Watch(i) => Request::Watch(tube(*i)),
            Cmd::Ignore(i) => Request::Ignore(tube(*i)),
            Cmd::Reserve => Request::Reserve,
            Cmd::ReserveWithTimeout(timeout_secs) => Request::ReserveWithTimeout {
                timeout_secs: *timeout_secs,
            },
            Cmd::ReserveJob(sel) => Request::ReserveJob(id(sel)),
            Cmd::Delete(sel) => Request::Delete(id(sel)),
            Cmd::Release {
                id: sel,
                pri,
                delay_secs,
            } => Request::Release {
                id: id(sel),
                pri: *pri,
                delay_secs: *delay_secs,
            },
            Cmd::Bury { id: sel, pri } => Request::Bury {
                id: id(sel),
                pri: *pri,
            },
            Cmd::Touch(sel) => Request::Touch(id(sel)),
            Cmd::Kick(bound) => Request::Kick { bound: *bound },
            Cmd::KickJob(sel) => Request::KickJob(id(sel)),
            Cmd::Peek(sel) => Request::Peek(id(sel)),
            Cmd::PeekReady => Request::PeekReady,
            Cmd::PeekDelayed => Request::PeekDelayed,
            Cmd::PeekBuried => Request::PeekBuried,
            Cmd::StatsJob(sel) => Request::StatsJob(id(sel)),
            Cmd::StatsTube(i) => Request::StatsTube(maybe_tube(*i)),
            Cmd::Stats => Request::Stats,
            Cmd::ListTubes => Request::ListTubes,
            Cmd::ListTubeUsed => Request::ListTubeUsed,
            Cmd::ListTubesWatched => Request::ListTubesWatched,
            Cmd::PauseTube {
                tube: i,
                delay_secs,
            } => Request::PauseTube {
                tube: maybe_tube(*i),
                delay_secs: *delay_secs,
            },
        }
    }

    /// The connection a command for `slot` runs on: the slot's own unless it
    /// is blocked, then the next slot that is not.
    fn free_conn(&self, slot: usize) -> Option<ConnId> {
        (0..CONNS)
            .map(|k| self.slots[(slot + k) % CONNS])
            .find(|&c| self.model.conn(c).waiting.is_none())
    }

    fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
        match op {
            Op::Cmd(slot, cmd) => {
                let Some(conn) = self.free_conn(*slot) else {
                    self.trace
                        .push("(all connections blocked; command dropped)".into());
                    return Ok(());
                };
                let request = self.request(conn, cmd);
                self.trace
                    .push(format!("t={} conn {conn}: {request:?}", self.now));
                self.engine.execute(conn, request.clone(), self.now);
                self.model.execute(conn, &request);
                self.tick_at(self.now)
            }
            Op::Disconnect(slot) => {
                let old = self.slots[*slot];
                self.engine.disconnect(old, self.now);
                self.model.disconnect(old);
                self.slots[*slot] = self.open();
                self.trace.push(format!(
                    "t={} disconnect conn {old}, connect conn {}",
                    self.now, self.slots[*slot]
                ));
                self.tick_at(self.now)
            }
            Op::HalfClose(slot) => {
                let conn = self.slots[*slot];
                self.trace
                    .push(format!("t={} conn {conn} half-closes", self.now));
                self.engine.time_out_wait(conn);
                self.model.time_out_wait(conn);
                self.tick_at(self.now)
            }
            Op::AdvanceClock(ms) => {
                let target = self.now + ms * MS;
                for _ in 0..MAX_STEPS {
                    match self.engine.next_wake() {
                        Some(wake) if wake <= target => self.tick_at(wake)?,
                        _ => return self.tick_at(target),
                    }
                }
                Err(self.fail(format!("clock did not reach {target} in {MAX_STEPS} steps")))
            }
        }
    }

    fn tick_at(&mut self, now: u64) -> Result<(), TestCaseError> {
        if now < self.now {
            return Err(self.fail(format!(
                "next_wake {now} is before the time already ticked, {}",
                self.now
            )));
        }
        if now != self.now {
            self.trace.push(format!("tick t={now}"));
        }
        self.now = now;
        self.engine.tick(now);
        self.model.tick(now);
        self.compare()
    }

    /// Everything observable must agree after every step.
    fn compare(&mut self) -> Result<(), TestCaseError> {
        let got = self.engine.take_replies();
        let want = std::mem::take(&mut self.model.out);
        let mut conns: Vec<ConnId> = got.iter().chain(&want).map(|(c, _)| *c).collect();
        conns.sort_unstable();
        conns.dedup();
        for conn in conns {
            let of = |replies: &[(ConnId, Response)]| -> Vec<Response> {
                replies
                    .iter()
                    .filter(|(c, _)| *c == conn)
                    .map(|(_, r)| r.clone())
                    .collect()
            };
            let (g, w) = (of(&got), of(&want));
            if g != w {
                return Err(self.fail(format!(
                    "replies to conn {conn} differ\n engine: {g:?}\n  model: {w:?}"
                )));
            }
        }
        for r in &want {
            self.trace.push(format!("    -> conn {}: {:?}", r.0, r.1));
        }

        self.engine.check_invariants();

        for &conn in &self.slots {
            let (g, w) = (
                self.engine.is_waiting(conn),
                self.model.conn(conn).waiting.is_some(),
            );
            if g != w {
                return Err(self.fail(format!(
                    "conn {conn}: engine is_waiting={g}, model says {w}"
                )));
            }
        }

        self.compare_jobs()?;

        let (g, w) = (self.engine.stats(), self.model.server_stats());
        if g != w {
            return Err(self.fail(format!("stats differ\n engine: {g:?}\n  model: {w:?}")));
        }
        for name in TUBES {
            let (g, w) = (
                self.engine.tube_stats(&tube_name(name), self.now),
                self.model.tube_stats(name),
            );
            if g != w {
                return Err(self.fail(format!(
                    "stats-tube {name} differs\n engine: {g:?}\n  model: {w:?}"
                )));
            }
        }

        let (g, w) = (self.engine.next_wake(), self.model.next_event());
        if g != w {
            return Err(self.fail(format!(
                "next_wake at t={}: engine {g:?}, model {w:?}",
                self.now
            )));
        }
        if let Some(at) = g.filter(|&at| at <= self.now) {
            return Err(self.fail(format!(
                "after tick({}) the engine still has work due at {at}",
                self.now
            )));
        }
        Ok(())
    }

    fn compare_jobs(&self) -> Result<(), TestCaseError> {
        if self.engine.job_count() != self.model.jobs.len() {
            return Err(self.fail(format!(
                "engine has {} jobs, model {}",
                self.engine.job_count(),
                self.model.jobs.len()
            )));
        }
        for m in &self.model.jobs {
            let Some(e) = self.engine.job(m.id) else {
                return Err(self.fail(format!("job {} is missing from the engine", m.id)));
            };
            let (state, deadline) = match m.state {
                MState::Ready => (JobState::Ready, None),
                MState::Delayed { until } => (JobState::Delayed, Some(until)),
                MState::Reserved { deadline, .. } => (JobState::Reserved, Some(deadline)),
                MState::Buried { .. } => (JobState::Buried, None),
            };
            let engine_view = (
                e.state,
                e.pri,
                e.delay_ns,
                e.ttr_ns,
                &e.body,
                e.created_at_ns,
                deadline.map(|_| e.deadline_at_ns),
                [e.reserves, e.timeouts, e.releases, e.buries, e.kicks].map(u64::from),
            );
            let model_view = (
                state,
                m.pri,
                m.delay,
                m.ttr,
                &m.body,
                m.created,
                deadline,
                [m.reserves, m.timeouts, m.releases, m.buries, m.kicks],
            );
            if engine_view != model_view {
                return Err(self.fail(format!(
                    "job {} differs (state, pri, delay, ttr, body, created, deadline, \
                     [reserves, timeouts, releases, buries, kicks])\n engine: {engine_view:?}\n  \
                     model: {model_view:?}",
                    m.id
                )));
            }
        }
        Ok(())
    }

    /// The end-of-session checks: every job in exactly one state, and the
    /// `stats` reply's counters.
    fn finish(&mut self) -> Result<(), TestCaseError> {
        let states = [
            JobState::Ready,
            JobState::Reserved,
            JobState::Delayed,
            JobState::Buried,
        ];
        for m in &self.model.jobs {
            let job = self.engine.job(m.id);
            let n = states
                .iter()
                .filter(|&&s| job.is_some_and(|j| j.state == s))
                .count();
            prop_assert_eq!(n, 1, "job {} is in {} states", m.id, n);
        }
        let Some(conn) = self.free_conn(0) else {
            return Ok(());
        };
        self.engine.execute(conn, Request::Stats, self.now);
        self.model.execute(conn, &Request::Stats);
        let got = self.engine.take_replies();
        let want = std::mem::take(&mut self.model.out);
        prop_assert_eq!(got, want, "final stats");
        Ok(())
    }
}

fn run(start: u64, ops: &[Op]) -> Result<(), TestCaseError> {
    let mut h = Harness::new(start);
    for op in ops {
        h.apply(op)?;
    }
    h.finish()
}

proptest! {
    // Cases: proptest's default (256, or PROPTEST_CASES); about 3 s in a
    // debug build. Failures are saved next to this file and replayed first.
    #![proptest_config(ProptestConfig {
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
            "proptest-regressions",
        ))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn engine_matches_model(
        start in prop_oneof![Just(0u64), 0u64..10 * NS],
        ops in proptest::collection::vec(op(), 0..200),
    ) {
        run(start, &ops)?;
    }
}

/// A late `tick` runs due timers in due order, whatever their kind: conn 2's
/// job runs out of TTR at 1 s while conn 3 is blocked in a reserve that times
/// out at 2 s, so even a tick that comes only at 3 s hands conn 3 the job, as
/// an on-time tick (and beanstalkd's `prottick`) would.
#[test]
fn late_tick_runs_timers_in_due_order() {
    let mut engine = Engine::new(EngineConfig {
        max_job_size: MAX_JOB_SIZE,
    });
    for conn in 1..=3 {
        engine.connect(conn);
    }
    let put = Request::Put(Put {
        pri: 0,
        delay_secs: 0,
        ttr_secs: 1,
        body: PutBody::Complete(Bytes::from_static(b"j")),
    });
    engine.execute(1, put, 0);
    engine.execute(2, Request::Reserve, 0);
    engine.execute(
        3,
        Request::ReserveWithTimeout {
            timeout_secs: Some(2),
        },
        0,
    );
    engine.tick(0);
    let replies = engine.take_replies();
    assert!(replies.contains(&(
        2,
        Response::Reserved {
            id: 1,
            body: Bytes::from_static(b"j")
        }
    )));
    assert!(engine.is_waiting(3));

    engine.tick(3 * NS);

    assert_eq!(
        engine.take_replies(),
        vec![(
            3,
            Response::Reserved {
                id: 1,
                body: Bytes::from_static(b"j")
            }
        )],
        "conn 3 was waiting when job 1's TTR ran out at 1 s"
    );
}

/// `pause-tube t 0` is over for the very next command, even one of the same
/// round (same `now`, no tick in between): beanstalkd reads its clock per
/// command, and its 1 ns pause has ended by then. A reserver blocked on the
/// tube gets its job when the round's timers run.
#[test]
fn pause_of_zero_is_over_for_the_next_command() {
    let mut engine = Engine::new(EngineConfig {
        max_job_size: MAX_JOB_SIZE,
    });
    for conn in 1..=2 {
        engine.connect(conn);
    }
    let t = tube_name("t");
    let now = 5 * NS;
    let job = Response::Reserved {
        id: 1,
        body: Bytes::from_static(b"j"),
    };
    engine.execute(1, Request::Use(t.clone()), now);
    engine.execute(
        1,
        Request::Put(Put {
            pri: 0,
            delay_secs: 0,
            ttr_secs: 10,
            body: PutBody::Complete(Bytes::from_static(b"j")),
        }),
        now,
    );
    engine.execute(1, Request::Watch(t.clone()), now);
    engine.execute(1, Request::Ignore(TubeName::default_tube()), now);
    engine.execute(
        1,
        Request::PauseTube {
            tube: t.clone(),
            delay_secs: 0,
        },
        now,
    );
    engine.execute(
        1,
        Request::ReserveWithTimeout {
            timeout_secs: Some(0),
        },
        now,
    );
    let replies = engine.take_replies();
    assert_eq!(
        replies.last(),
        Some(&(1, job.clone())),
        "reserve right after pause-tube t 0: {replies:?}"
    );

    // A reserver blocked on a paused tube is woken by a pause of 0.
    engine.execute(
        1,
        Request::Release {
            id: 1,
            pri: 0,
            delay_secs: 0,
        },
        now,
    );
    engine.execute(
        1,
        Request::PauseTube {
            tube: t.clone(),
            delay_secs: 100,
        },
        now,
    );
    engine.execute(2, Request::Watch(t.clone()), now);
    engine.execute(2, Request::Reserve, now);
    engine.tick(now);
    assert!(engine.is_waiting(2));
    let later = now + NS;
    engine.execute(
        1,
        Request::PauseTube {
            tube: t,
            delay_secs: 0,
        },
        later,
    );
    engine.tick(later);
    assert_eq!(engine.take_replies().last(), Some(&(2, job)));
    engine.check_invariants();
}
