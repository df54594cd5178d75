//! A beanstalkd [`Session`] for any [`Broker`], made of its typed
//! operations: `use`, `watch` and `ignore` are kept here, every other
//! request becomes one or two [`Op`]s, and the leases the session's
//! reserves took are held here and released when it ends.
//!
//! A broker whose engine speaks beanstalkd natively (the local broker)
//! has its own sessions; this one is for brokers that only run operations
//! (PostgreSQL). What beanstalkd can say that the job model cannot is
//! approximated, and documented on [`OpSession`].
//!
//! Each session is one task that runs its requests in order, so a blocked
//! reserve holds back the replies after it, as the trait requires. The task
//! and its channels start at the session's first request: until then a
//! session is a small record (its broker and the shutdown signal), since
//! most connections of a large fleet sit idle (the task and two channels
//! made an idle PostgreSQL-backed connection cost 5.1 KiB of RSS, against
//! ~840 B on the local broker). A task idle for [`SESSION_PARK_AFTER`]
//! holding no lease parks: it hands the session its tubes and ends, and
//! the next request starts a task again.

use std::collections::HashMap;
use std::future::Future;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use spool_proto::{JobStats, Put, PutBody, Request, Response, TubeName, TubeStats};
use tokio::sync::{mpsc, oneshot, watch};

use crate::model::{JobId, JobState, Lease, NewJob, Op, Outcome, QueueName, RunAt};
use crate::{Broker, BrokerError, JobChange, Session, SnapshotScope};

const MS_PER_SEC: u64 = 1_000;

/// Jobs one `kick` looks at per listing page.
const KICK_PAGE_JOBS: u32 = 1_000;

/// Largest size of a session's task future (checked in debug builds, whose
/// futures are the larger): what it holds while waiting for requests (the
/// channels' ends, the tube names and leases) and the boxed operation.
const SESSION_TASK_BYTES_MAX: usize = 1024;

/// How long a session's task waits for a request, holding no lease, before
/// it parks (hands its tubes back to the session and ends, freeing its
/// task and channels: ~4.5 KiB). Starting one again costs a spawn and two
/// channels, nothing next to an operation on the database.
pub const SESSION_PARK_AFTER: Duration = Duration::from_secs(1);

/// What an [`OpSession`] asks of its broker beyond [`Broker::call`]: two
/// steps with a default made of typed operations, which a broker may do
/// more cheaply.
pub trait SessionBroker: Broker {
    /// The attempt limit of `queue`'s policy, if it sets one: what a
    /// beanstalkd put gets (else 0: no limit). By default `Op::GetQueue`,
    /// which also counts the queue's jobs.
    fn attempt_limit(
        &self,
        queue: QueueName,
    ) -> impl Future<Output = Result<Option<u32>, BrokerError>> + Send {
        let info = self.call(Op::GetQueue { queue });
        async move {
            match info.await? {
                Outcome::Queue(info) => Ok(info.policy.max_attempts),
                other => Err(BrokerError::Internal(format!(
                    "a queue lookup answered {other:?}"
                ))),
            }
        }
    }

    /// A session's task ended: its connection closed, or shutdown closed
    /// it. A broker that counts its open sessions (`stats`'s
    /// `current-connections`) counts this one out.
    fn session_ended(&self) {}

    /// beanstalkd's `delete` of a job the session holds under `lease`: the
    /// job is gone. By default `Op::Complete` (which ends the lease, or is
    /// refused) then `Op::Delete`: two commits.
    fn delete_leased(&self, lease: Lease) -> impl Future<Output = Result<(), BrokerError>> + Send {
        let complete = self.call(Op::Complete {
            lease,
            result: None,
        });
        let this = self.clone();
        async move {
            complete.await?;
            let delete = this.call(Op::Delete {
                id: lease.job,
                expected_version: None,
            });
            match delete.await {
                Ok(_) | Err(BrokerError::NotFound) => Ok(()),
                Err(error) => Err(error),
            }
        }
    }
}

/// A beanstalkd session over typed operations.
///
/// Differences from a native session, all where the job model has no
/// operation for what beanstalkd asks:
/// - `reserve-job <id>` answers `NOT_FOUND` (there is no operation that
///   reserves one named job);
/// - `DEADLINE_SOON` is never answered (the broker's clock is not visible);
/// - `peek-ready` and `peek-delayed` show the queue's oldest job in that
///   state, not the next to be reserved or to come due;
/// - `stats-job` counts no reserves, timeouts, releases, buries or kicks,
///   and its ages are on this machine's clock; `stats-tube` counts no
///   sessions;
/// - a session's leases end with a release when it closes, which moves the
///   job's version (a native session's do not).
pub struct OpSession<B: SessionBroker> {
    id: u64,
    stage: Stage<B>,
}

/// Where a session is in its life.
enum Stage<B: SessionBroker> {
    /// No request yet, or none since its task parked: no task, no channels.
    Dormant(Dormant<B>),
    /// The task runs the session's requests.
    Running(Running<B>),
    /// Closed without a task (hung up, or shut down, while dormant): the
    /// broker has counted it out.
    Closed,
}

/// What a dormant session keeps: what its task needs to start. It watches
/// no shutdown itself (a boxed future waiting on `shutdown` cost 192 bytes
/// a session): the front door polls every session again when the broker
/// begins shutting down (see [`Broker::begin_shutdown`]), and a dormant one
/// closes on that poll, as an idle task would.
struct Dormant<B: SessionBroker> {
    broker: B,
    shutdown: watch::Receiver<bool>,
    /// The tubes used and watched, when not beanstalkd's defaults (a
    /// parked session's).
    tubes: Option<Box<Tubes>>,
}

/// The tube a session uses and those it watches.
struct Tubes {
    using: TubeName,
    watching: Vec<TubeName>,
}

/// The ends of a running session's task.
struct Running<B: SessionBroker> {
    requests: Option<mpsc::UnboundedSender<Vec<Request>>>,
    events: mpsc::UnboundedReceiver<Event<B>>,
    /// Dropped on hangup: a blocked reserve then ends `TIMED_OUT`.
    alive: Option<oneshot::Sender<()>>,
}

/// What a session's task sends its session.
enum Event<B: SessionBroker> {
    Reply(Response),
    /// The task parked and ended; its last event.
    Parked(Box<Parked<B>>),
}

/// A parked task's state, handed back to its session: the session goes
/// dormant with it, or starts a task again at once with the requests that
/// reached the inbox while the task was parking.
struct Parked<B: SessionBroker> {
    /// Taken when the session takes the state back; dropped unclaimed (the
    /// session gone meanwhile), it counts the session out, as the end of
    /// the task would have.
    broker: Option<B>,
    shutdown: watch::Receiver<bool>,
    tubes: Option<Box<Tubes>>,
    inbox: mpsc::UnboundedReceiver<Vec<Request>>,
}

impl<B: SessionBroker> Drop for Parked<B> {
    fn drop(&mut self) {
        if let Some(broker) = self.broker.take() {
            broker.session_ended();
        }
    }
}

impl<B: SessionBroker> OpSession<B> {
    /// A session whose task starts on the current tokio runtime at its
    /// first request. `shutdown` turns true when the broker begins shutting
    /// down: the session then closes as soon as it holds no reserved job
    /// and is idle.
    pub fn new(broker: B, id: u64, shutdown: watch::Receiver<bool>) -> OpSession<B> {
        OpSession {
            id,
            stage: Stage::Dormant(Dormant {
                broker,
                shutdown,
                tubes: None,
            }),
        }
    }

    /// Closes a dormant session: the broker counts it out, as the end of
    /// its task would have.
    fn close_dormant(&mut self) {
        if let Stage::Dormant(dormant) = std::mem::replace(&mut self.stage, Stage::Closed) {
            dormant.broker.session_ended();
        }
    }
}

impl<B: SessionBroker> Dormant<B> {
    /// Starts the session's task.
    fn start(self) -> Running<B> {
        let (requests, inbox) = mpsc::unbounded_channel();
        let (outbox, events) = mpsc::unbounded_channel();
        let (alive, hung_up) = oneshot::channel();
        let (using, watching) = match self.tubes {
            Some(tubes) => (tubes.using, tubes.watching),
            None => (default_tube(), vec![default_tube()]),
        };
        let worker = Worker {
            broker: self.broker,
            using,
            watching,
            leases: HashMap::new(),
            hung_up: Some(hung_up),
        };
        let task = worker.run(inbox, outbox, self.shutdown);
        // Every running session's task is this size for as long as it
        // lives: the operations' futures it awaits are boxed to keep it so.
        debug_assert!(
            std::mem::size_of_val(&task) <= SESSION_TASK_BYTES_MAX,
            "a session's task takes {} bytes",
            std::mem::size_of_val(&task)
        );
        tokio::spawn(task);
        Running {
            requests: Some(requests),
            events,
            alive: Some(alive),
        }
    }

    /// Whether the broker has begun shutting down (or is gone).
    fn shut_down(&self) -> bool {
        *self.shutdown.borrow() || self.shutdown.has_changed().is_err()
    }
}

impl<B: SessionBroker> std::fmt::Debug for OpSession<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let stage = match &self.stage {
            Stage::Dormant(_) => "dormant",
            Stage::Running(running) if running.requests.is_some() => "running",
            Stage::Running(_) => "hung up",
            Stage::Closed => "closed",
        };
        f.debug_struct("OpSession")
            .field("id", &self.id)
            .field("stage", &stage)
            .finish_non_exhaustive()
    }
}

impl<B: SessionBroker> Session for OpSession<B> {
    fn id(&self) -> u64 {
        self.id
    }

    fn submit(&mut self, requests: Vec<Request>) -> Result<(), BrokerError> {
        if matches!(self.stage, Stage::Dormant(_)) {
            self.stage = match std::mem::replace(&mut self.stage, Stage::Closed) {
                Stage::Dormant(dormant) if *dormant.shutdown.borrow() => {
                    // An idle task would have closed already.
                    dormant.broker.session_ended();
                    return Err(BrokerError::Closed);
                }
                Stage::Dormant(dormant) => Stage::Running(dormant.start()),
                other => other,
            };
        }
        match &self.stage {
            Stage::Running(Running {
                requests: Some(sender),
                ..
            }) => sender.send(requests).map_err(|_| BrokerError::Closed),
            _ => Err(BrokerError::Closed),
        }
    }

    fn hangup(&mut self) {
        match &mut self.stage {
            Stage::Dormant(_) => self.close_dormant(),
            Stage::Running(running) => {
                running.requests = None;
                running.alive = None;
            }
            Stage::Closed => {}
        }
    }

    fn poll_recv(&mut self, cx: &mut Context<'_>, out: &mut Vec<Response>) -> Poll<bool> {
        let running = match &mut self.stage {
            Stage::Running(running) => running,
            Stage::Dormant(dormant) => {
                if !dormant.shut_down() {
                    return Poll::Pending;
                }
                self.close_dormant();
                return Poll::Ready(false);
            }
            Stage::Closed => return Poll::Ready(false),
        };
        let mut got = false;
        loop {
            match running.events.poll_recv(cx) {
                Poll::Ready(Some(Event::Reply(reply))) => {
                    out.push(reply);
                    got = true;
                }
                Poll::Ready(Some(Event::Parked(parked))) => {
                    if !self.unpark(*parked) {
                        return Poll::Ready(got);
                    }
                    // Dormant again or running again: what is next comes
                    // from there.
                    return match self.poll_recv(cx, out) {
                        Poll::Pending if got => Poll::Ready(true),
                        Poll::Ready(open) => Poll::Ready(open || got),
                        Poll::Pending => Poll::Pending,
                    };
                }
                Poll::Ready(None) => return Poll::Ready(got),
                Poll::Pending if got => return Poll::Ready(true),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl<B: SessionBroker> OpSession<B> {
    /// Takes a parked task's state back: dormant with it, or running again
    /// at once when requests reached the inbox while the task was parking
    /// (they go first, in order). False: the session hung up meanwhile and
    /// is closed (counted out).
    fn unpark(&mut self, mut parked: Parked<B>) -> bool {
        let Stage::Running(running) = &mut self.stage else {
            return false;
        };
        let Some(broker) = parked.broker.take() else {
            return false;
        };
        if running.requests.is_none() {
            broker.session_ended();
            self.stage = Stage::Closed;
            return false;
        }
        let mut waiting = Vec::new();
        while let Ok(batch) = parked.inbox.try_recv() {
            waiting.extend(batch);
        }
        let dormant = Dormant {
            broker,
            shutdown: parked.shutdown.clone(),
            tubes: parked.tubes.take(),
        };
        self.stage = Stage::Dormant(dormant);
        if !waiting.is_empty() && self.submit(waiting).is_err() {
            // Shut down meanwhile: closed and counted out by `submit`.
            return false;
        }
        true
    }
}

impl<B: SessionBroker> Drop for OpSession<B> {
    fn drop(&mut self) {
        // A running session's task counts it out when it ends.
        self.close_dormant();
    }
}

fn default_tube() -> TubeName {
    TubeName::new(b"default").unwrap_or_else(|_| unreachable!("\"default\" is a tube name"))
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// What a session's task does next.
enum Next {
    Requests(Option<Vec<Request>>),
    Park,
}

/// The session's state, owned by its task.
struct Worker<B: SessionBroker> {
    broker: B,
    using: TubeName,
    watching: Vec<TubeName>,
    leases: HashMap<JobId, Lease>,
    hung_up: Option<oneshot::Receiver<()>>,
}

impl<B: SessionBroker> Worker<B> {
    async fn run(
        mut self,
        mut inbox: mpsc::UnboundedReceiver<Vec<Request>>,
        outbox: mpsc::UnboundedSender<Event<B>>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        loop {
            if *shutdown.borrow() && self.leases.is_empty() {
                break;
            }
            let next = if self.leases.is_empty() {
                tokio::select! {
                    batch = inbox.recv() => Next::Requests(batch),
                    _ = shutdown.wait_for(|down| *down) => Next::Requests(None),
                    () = tokio::time::sleep(SESSION_PARK_AFTER) => Next::Park,
                }
            } else {
                Next::Requests(inbox.recv().await)
            };
            let batch = match next {
                Next::Requests(batch) => batch,
                Next::Park => {
                    let tubes = (self.using != default_tube() || self.watching != [default_tube()])
                        .then(|| {
                            Box::new(Tubes {
                                using: self.using,
                                watching: self.watching,
                            })
                        });
                    let parked = Parked {
                        broker: Some(self.broker),
                        shutdown,
                        tubes,
                        inbox,
                    };
                    // The session gone: the unsent state, dropped, counts
                    // it out.
                    let _ = outbox.send(Event::Parked(Box::new(parked)));
                    return;
                }
            };
            let Some(batch) = batch else { break };
            for request in batch {
                // Boxed: an operation's future (the database's queries
                // inside) is tens of KiB; awaited inline it would size the
                // task of every session, idle ones included (28.8 KiB of
                // RSS per idle connection on a PostgreSQL node), instead of
                // one allocation per request.
                if let Some(reply) = Box::pin(self.execute(request)).await {
                    // A closed outbox: the session is gone; finish anyway
                    // so that the leases are handed back below.
                    let _ = outbox.send(Event::Reply(reply));
                }
            }
        }
        drop(outbox);
        for (_, lease) in self.leases.drain() {
            let op = Op::Release {
                lease,
                delay_ms: 0,
                priority: None,
            };
            // A lease that already ended needs no release. Boxed, as
            // `execute` is above.
            let _ = Box::pin(self.broker.call(op)).await;
        }
        self.broker.session_ended();
    }

    async fn call(&self, op: Op) -> Result<Outcome, BrokerError> {
        self.broker.call(op).await
    }

    async fn execute(&mut self, request: Request) -> Option<Response> {
        Some(match request {
            Request::Quit => return None,
            Request::Put(put) => self.put(put).await,
            Request::Use(tube) => {
                self.using = tube.clone();
                Response::Using(tube)
            }
            Request::Watch(tube) => {
                if !self.watching.contains(&tube) {
                    self.watching.push(tube);
                }
                Response::Watching(self.watching.len())
            }
            Request::Ignore(tube) => match self.watching.iter().position(|t| *t == tube) {
                Some(_) if self.watching.len() < 2 => Response::NotIgnored,
                Some(at) => {
                    self.watching.remove(at);
                    Response::Watching(self.watching.len())
                }
                None => Response::Watching(self.watching.len()),
            },
            Request::Reserve => self.reserve(None).await,
            Request::ReserveWithTimeout { timeout_secs } => {
                // A negative timeout waits forever, like plain `reserve`.
                self.reserve(timeout_secs).await
            }
            Request::ReserveJob(_) => Response::NotFound,
            Request::Delete(id) => self.delete(id).await,
            Request::Release {
                id,
                pri,
                delay_secs,
            } => {
                let Some(&lease) = self.leases.get(&id) else {
                    return Some(Response::NotFound);
                };
                let op = Op::Release {
                    lease,
                    delay_ms: u64::from(delay_secs) * MS_PER_SEC,
                    priority: Some(pri),
                };
                match self.call(op).await {
                    Ok(_) => {
                        self.leases.remove(&id);
                        Response::Released
                    }
                    Err(error) => self.lease_refused(id, error),
                }
            }
            Request::Bury { id, pri } => {
                let Some(&lease) = self.leases.get(&id) else {
                    return Some(Response::NotFound);
                };
                let op = Op::Bury {
                    id,
                    lease: Some(lease),
                    reason: None,
                };
                match self.call(op).await.and_then(Outcome::into_job) {
                    Ok(job) => {
                        self.leases.remove(&id);
                        if job.priority != pri {
                            let change = JobChange {
                                priority: Some(pri),
                                ..JobChange::default()
                            };
                            let op = Op::Update {
                                id,
                                expected_version: Some(job.version),
                                change,
                            };
                            // Changed meanwhile (kicked, deleted): the
                            // burial stands, with the old priority.
                            let _ = self.call(op).await;
                        }
                        Response::Buried
                    }
                    Err(error) => self.lease_refused(id, error),
                }
            }
            Request::Touch(id) => {
                let Some(&lease) = self.leases.get(&id) else {
                    return Some(Response::NotFound);
                };
                match self.call(Op::Heartbeat { lease }).await {
                    Ok(_) => Response::Touched,
                    Err(error) => self.lease_refused(id, error),
                }
            }
            Request::Peek(id) => {
                match self.call(Op::Get { id }).await.and_then(Outcome::into_job) {
                    Ok(job) if !job.state.is_final() => Response::Found {
                        id: job.id,
                        body: job.payload,
                    },
                    Ok(_) | Err(BrokerError::NotFound) => Response::NotFound,
                    Err(_) => Response::InternalError,
                }
            }
            Request::PeekReady => self.peek(JobState::Ready).await,
            Request::PeekDelayed => self.peek(JobState::Delayed).await,
            Request::PeekBuried => self.peek(JobState::Buried).await,
            Request::Kick { bound } => self.kick(bound).await,
            Request::KickJob(id) => match self.call(Op::Kick { id }).await {
                Ok(_) => Response::KickedJob,
                Err(BrokerError::NotFound | BrokerError::Conflict(_)) => Response::NotFound,
                Err(_) => Response::InternalError,
            },
            Request::StatsJob(id) => self.stats_job(id).await,
            Request::StatsTube(tube) => self.stats_tube(tube).await,
            Request::Stats => match self.broker.snapshot(SnapshotScope::Queues).await {
                Ok(snapshot) => Response::Stats(Box::new(snapshot.server)),
                Err(_) => Response::InternalError,
            },
            Request::ListTubes => self.list_tubes().await,
            Request::ListTubeUsed => Response::Using(self.using.clone()),
            Request::ListTubesWatched => Response::TubeList(self.watching.clone()),
            Request::PauseTube { tube, delay_secs } => {
                let op = Op::Pause {
                    queue: tube,
                    duration_ms: Some(u64::from(delay_secs) * MS_PER_SEC),
                };
                match self.call(op).await {
                    Ok(_) => Response::Paused,
                    Err(_) => Response::InternalError,
                }
            }
        })
    }

    /// A refused operation under a lease this session held: the lease is
    /// gone (expired, cancelled, taken over), and beanstalkd says
    /// `NOT_FOUND`.
    fn lease_refused(&mut self, id: JobId, error: BrokerError) -> Response {
        match error {
            BrokerError::NotFound | BrokerError::Conflict(_) => {
                self.leases.remove(&id);
                Response::NotFound
            }
            _ => Response::InternalError,
        }
    }

    async fn put(&mut self, put: Put) -> Response {
        let body = match put.body {
            PutBody::Complete(body) => body,
            PutBody::TooBig => return Response::JobTooBig,
            PutBody::TrailingBytes => return Response::BadFormat,
            PutBody::MissingCrlf => return Response::ExpectedCrlf,
        };
        // beanstalkd's semantics (no attempt limit, an expired lease back
        // to ready at once) unless the queue's policy sets a limit.
        let policy_attempts = self.broker.attempt_limit(self.using.clone()).await;
        let policy_attempts = match policy_attempts {
            Ok(limit) => limit,
            Err(BrokerError::Draining | BrokerError::Closed) => return Response::Draining,
            Err(_) => return Response::InternalError,
        };
        let job = NewJob {
            payload: body,
            priority: Some(put.pri),
            run_at: match put.delay_secs {
                0 => RunAt::Now,
                secs => RunAt::DelayMs(u64::from(secs) * MS_PER_SEC),
            },
            ttr_ms: Some(u64::from(put.ttr_secs.max(1)) * MS_PER_SEC),
            max_attempts: Some(policy_attempts.unwrap_or(0)),
            ..NewJob::default()
        };
        match self.broker.enqueue(self.using.clone(), job).await {
            Ok((job, _)) => Response::Inserted(job.id),
            Err(BrokerError::Draining | BrokerError::Closed) => Response::Draining,
            Err(BrokerError::TooLarge { .. }) => Response::JobTooBig,
            Err(BrokerError::Storage(_) | BrokerError::QueueFull { .. }) => Response::OutOfMemory,
            Err(_) => Response::InternalError,
        }
    }

    /// `timeout_secs`: `None` waits forever.
    async fn reserve(&mut self, timeout_secs: Option<u32>) -> Response {
        let timeout_ms = timeout_secs.map_or(u64::MAX, |secs| u64::from(secs) * MS_PER_SEC);
        let reserve = self.broker.reserve(self.watching.clone(), 1, timeout_ms);
        let got = match self.hung_up.as_mut() {
            Some(hung_up) => tokio::select! {
                got = reserve => got,
                _ = hung_up => {
                    self.hung_up = None;
                    return Response::TimedOut;
                }
            },
            // The client hung up: nothing more waits.
            None => return Response::TimedOut,
        };
        match got {
            Ok(mut jobs) if !jobs.is_empty() => {
                let leased = jobs.swap_remove(0);
                self.leases.insert(leased.job.id, leased.lease);
                Response::Reserved {
                    id: leased.job.id,
                    body: leased.job.payload,
                }
            }
            Ok(_) => Response::TimedOut,
            Err(_) => Response::InternalError,
        }
    }

    async fn delete(&mut self, id: JobId) -> Response {
        if let Some(&lease) = self.leases.get(&id) {
            return match self.broker.delete_leased(lease).await {
                Ok(()) => {
                    self.leases.remove(&id);
                    Response::Deleted
                }
                Err(error) => self.lease_refused(id, error),
            };
        }
        let job = match self.call(Op::Get { id }).await.and_then(Outcome::into_job) {
            Ok(job) => job,
            Err(BrokerError::NotFound) => return Response::NotFound,
            Err(_) => return Response::InternalError,
        };
        if job.state.is_final() || job.state == JobState::Reserved {
            // Finished, or reserved by someone else.
            return Response::NotFound;
        }
        let op = Op::Delete {
            id,
            expected_version: Some(job.version),
        };
        match self.call(op).await {
            Ok(_) => Response::Deleted,
            Err(
                BrokerError::NotFound
                | BrokerError::Conflict(_)
                | BrokerError::VersionMismatch { .. },
            ) => Response::NotFound,
            Err(_) => Response::InternalError,
        }
    }

    async fn first_in(&self, state: JobState, limit: u32) -> Result<Vec<crate::JobView>, Response> {
        let op = Op::List {
            queue: self.using.clone(),
            state,
            after: None,
            limit,
        };
        match self.call(op).await {
            Ok(Outcome::Page(page)) => Ok(page.jobs),
            Ok(_) | Err(_) => Err(Response::InternalError),
        }
    }

    async fn peek(&self, state: JobState) -> Response {
        let op = Op::Peek {
            queue: self.using.clone(),
            state,
        };
        match self.call(op).await {
            Ok(Outcome::Job(job)) => Response::Found {
                id: job.id,
                body: job.payload,
            },
            Err(BrokerError::NotFound) => Response::NotFound,
            Ok(_) | Err(_) => Response::InternalError,
        }
    }

    /// Kicks up to `bound` buried jobs of the used tube, or if it has none,
    /// delayed ones.
    async fn kick(&self, bound: u32) -> Response {
        let buried = match self.first_in(JobState::Buried, 1).await {
            Ok(jobs) => !jobs.is_empty(),
            Err(reply) => return reply,
        };
        let state = if buried {
            JobState::Buried
        } else {
            JobState::Delayed
        };
        let mut kicked = 0u32;
        while kicked < bound {
            let page = match self
                .first_in(state, (bound - kicked).min(KICK_PAGE_JOBS))
                .await
            {
                Ok(jobs) => jobs,
                Err(reply) => return reply,
            };
            if page.is_empty() {
                break;
            }
            let mut moved = 0;
            for job in page {
                if self.call(Op::Kick { id: job.id }).await.is_ok() {
                    kicked += 1;
                    moved += 1;
                }
            }
            if moved == 0 {
                break;
            }
        }
        Response::Kicked(kicked)
    }

    async fn stats_job(&self, id: JobId) -> Response {
        let job = match self.call(Op::Get { id }).await.and_then(Outcome::into_job) {
            Ok(job) if !job.state.is_final() => job,
            Ok(_) | Err(BrokerError::NotFound) => return Response::NotFound,
            Err(_) => return Response::InternalError,
        };
        let now = now_ms();
        let time_left_ms = match job.state {
            JobState::Reserved => job.deadline_at_ms.unwrap_or(now).saturating_sub(now),
            JobState::Delayed => job.run_at_ms.unwrap_or(now).saturating_sub(now),
            _ => 0,
        };
        Response::StatsJob(Box::new(JobStats {
            id: job.id,
            tube: job.queue,
            state: job.state.as_str(),
            pri: job.priority,
            age_secs: now.saturating_sub(job.created_at_ms) / MS_PER_SEC,
            delay_secs: job
                .run_at_ms
                .map_or(0, |at| at.saturating_sub(job.updated_at_ms) / MS_PER_SEC),
            ttr_secs: job.ttr_ms / MS_PER_SEC,
            time_left_secs: time_left_ms / MS_PER_SEC,
            ..JobStats::default()
        }))
    }

    async fn stats_tube(&self, tube: TubeName) -> Response {
        let snapshot = match self.broker.snapshot(SnapshotScope::Queues).await {
            Ok(snapshot) => snapshot,
            Err(_) => return Response::InternalError,
        };
        let in_session = self.using == tube || self.watching.contains(&tube);
        match snapshot
            .queues
            .into_iter()
            .find(|q| q.name == tube.as_str())
        {
            Some(q) => Response::StatsTube(Box::new(TubeStats {
                name: q.name,
                current_jobs_urgent: q.urgent,
                current_jobs_ready: q.ready,
                current_jobs_reserved: q.reserved,
                current_jobs_delayed: q.delayed,
                current_jobs_buried: q.buried,
                total_jobs: q.total_jobs,
                ..TubeStats::default()
            })),
            None if in_session => Response::StatsTube(Box::new(TubeStats {
                name: tube.to_string(),
                ..TubeStats::default()
            })),
            None => Response::NotFound,
        }
    }

    async fn list_tubes(&self) -> Response {
        let mut names: Vec<TubeName> = match self.call(Op::ListQueues).await {
            Ok(Outcome::Queues(queues)) => queues
                .into_iter()
                .filter(|q| q.ready + q.reserved + q.delayed + q.buried > 0)
                .filter_map(|q| QueueName::new(q.name.as_bytes()).ok())
                .collect(),
            Ok(_) | Err(_) => return Response::InternalError,
        };
        for tube in std::iter::once(&self.using).chain(&self.watching) {
            if !names.contains(tube) {
                names.push(tube.clone());
            }
        }
        let default = default_tube();
        if !names.contains(&default) {
            names.insert(0, default);
        }
        Response::TubeList(names)
    }
}
