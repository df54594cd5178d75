//! [`Worker`]: runs a handler for jobs of some queues, at most
//! `concurrency` at once, and does for each what every worker must:
//! heartbeats, cancellation, timeouts, panics, retries by the server's
//! policy, a graceful drain, reconnecting when the server is away.
//!
//! Shape: one dispatcher loop reserves only as many jobs as it has free
//! slots (a semaphore of `concurrency` permits, up to `batch_max` a
//! request), and each job gets a supervisor task holding one permit. The
//! supervisor spawns the handler as its own task (so a panic ends only that
//! task and arrives as a `JoinError`), heartbeats while it runs, fires the
//! job's [`CancelToken`] when the server says the job was cancelled, the
//! lease runs out, the handler timeout passes or the shutdown grace ends,
//! gives the handler `cancel_grace` to return after that, then drops it;
//! and settles the job (complete, fail or release) with retries while the
//! server is away.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::task::{JoinError, JoinSet};
use tokio::time::{sleep, sleep_until, Instant};

use crate::cancel::{CancelReason, CancelToken};
use crate::client::{Client, COMPLETE_MANY_MAX, LONG_POLL_MAX};
use crate::error::{Error, ErrorCode};
use crate::types::{Body, Failure, Job};

/// Most jobs one reserve asks for by default: enough to amortise a request
/// over many jobs, few enough that one worker does not hoard a queue.
pub const BATCH_MAX_DEFAULT: u32 = 32;

/// How long the dispatcher waits for more free slots before reserving
/// for fewer: a few requests' time, nothing next to a real handler.
pub const BATCH_GATHER: Duration = Duration::from_millis(2);

/// The dispatcher waits (up to [`BATCH_GATHER`]) until this fraction of
/// the batch (or of the concurrency, if smaller) is free: a quarter keeps
/// the pool at least three-quarters busy while cutting reserves per job
/// by up to that factor.
const GATHER_DIVISOR: usize = 4;

/// How long a reserve waits for a job by default. Also how long a shutdown
/// may wait for the reserve in flight (its jobs are then released, never
/// left leased to nobody).
pub const POLL_TIMEOUT_DEFAULT: Duration = Duration::from_secs(2);

/// Heartbeats per TTR by default: a third leaves two more tries when one
/// fails or is slow.
pub const HEARTBEATS_PER_TTR: u32 = 3;

/// The shortest heartbeat interval: tighter than this is a busy loop.
pub const HEARTBEAT_INTERVAL_MIN: Duration = Duration::from_millis(10);

/// How long the handlers get to finish once a shutdown begins, by default.
pub const SHUTDOWN_GRACE_DEFAULT: Duration = Duration::from_secs(30);

/// How long a handler may keep running after its token fired, by default,
/// to clean up, before it is dropped.
pub const CANCEL_GRACE_DEFAULT: Duration = Duration::from_secs(5);

/// First and longest waits between tries while the server is away
/// (doubling, with jitter so a fleet does not retry in step).
pub const RECONNECT_BACKOFF_MIN: Duration = Duration::from_millis(100);
pub const RECONNECT_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// A handler's error: the job's attempt fails with `message`; the server's
/// policy decides about a retry unless `permanent` or `retry_in` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandlerError {
    pub message: String,
    pub retry_in: Option<Duration>,
    pub permanent: bool,
}

impl HandlerError {
    pub fn new(message: impl Into<String>) -> HandlerError {
        HandlerError {
            message: message.into(),
            retry_in: None,
            permanent: false,
        }
    }

    /// Bury the job now: retrying cannot help.
    pub fn permanent(mut self) -> HandlerError {
        self.permanent = true;
        self
    }

    /// Retry after this instead of the backoff.
    pub fn retry_in(mut self, delay: Duration) -> HandlerError {
        self.retry_in = Some(delay);
        self
    }

    fn failure(&self) -> Failure {
        Failure {
            error: self.message.clone(),
            retry_in: self.retry_in,
            permanent: self.permanent,
        }
    }
}

impl std::fmt::Display for HandlerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<String> for HandlerError {
    fn from(message: String) -> HandlerError {
        HandlerError::new(message)
    }
}

impl From<&str> for HandlerError {
    fn from(message: &str) -> HandlerError {
        HandlerError::new(message)
    }
}

impl From<std::io::Error> for HandlerError {
    fn from(error: std::io::Error) -> HandlerError {
        HandlerError::new(error.to_string())
    }
}

impl From<serde_json::Error> for HandlerError {
    fn from(error: serde_json::Error) -> HandlerError {
        HandlerError::new(error.to_string())
    }
}

impl From<Error> for HandlerError {
    fn from(error: Error) -> HandlerError {
        HandlerError::new(error.to_string())
    }
}

impl From<Box<dyn std::error::Error + Send + Sync>> for HandlerError {
    fn from(error: Box<dyn std::error::Error + Send + Sync>) -> HandlerError {
        HandlerError::new(error.to_string())
    }
}

/// What a handler learns besides its job: whether to stop.
#[derive(Debug, Clone)]
pub struct JobContext {
    token: CancelToken,
    draining: CancelToken,
}

impl JobContext {
    /// The job's token: fires when the job was cancelled on the server, its
    /// lease ended, the handler timeout passed, or the shutdown grace ended.
    pub fn token(&self) -> &CancelToken {
        &self.token
    }

    /// Resolves when the token fires, with the reason.
    pub async fn cancelled(&self) -> CancelReason {
        self.token.cancelled().await
    }

    pub fn is_cancelled(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Whether the worker has begun to drain: the handler may finish (within
    /// the shutdown grace) or give up early; the token fires when the grace
    /// ends. A handler that returns an error while draining has its job
    /// released, not failed.
    pub fn is_shutting_down(&self) -> bool {
        self.draining.is_cancelled()
    }

    /// Resolves when the worker begins to drain.
    pub async fn shutting_down(&self) {
        self.draining.cancelled().await;
    }
}

/// A heartbeat in flight: when it was sent, and the answer.
type HeartbeatFuture = Pin<Box<dyn Future<Output = (Instant, Result<String, Error>)> + Send>>;

type HandlerFuture = Pin<Box<dyn Future<Output = Result<Body, HandlerError>> + Send>>;

/// A job handler: any `Fn(Job, JobContext) -> impl Future<Output =
/// Result<R, E>>` where the result converts to a [`Body`] (`()`,
/// `serde_json::Value`, `String`, bytes) and the error to a
/// [`HandlerError`].
pub trait Handler: Send + Sync + 'static {
    fn call(&self, job: Job, ctx: JobContext) -> HandlerFuture;
}

impl<F, Fut, R, E> Handler for F
where
    F: Fn(Job, JobContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<R, E>> + Send + 'static,
    R: Into<Body>,
    E: Into<HandlerError>,
{
    fn call(&self, job: Job, ctx: JobContext) -> HandlerFuture {
        let future = self(job, ctx);
        Box::pin(async move { future.await.map(Into::into).map_err(Into::into) })
    }
}

/// The worker's counters, for the application's own metrics. Each counts
/// jobs (or, `reconnects`, failed reserves), never resets.
#[derive(Debug, Default)]
pub struct WorkerCounters {
    reserved: AtomicU64,
    processed: AtomicU64,
    failed: AtomicU64,
    panicked: AtomicU64,
    timed_out: AtomicU64,
    cancelled: AtomicU64,
    lease_lost: AtomicU64,
    released: AtomicU64,
    reconnects: AtomicU64,
}

/// A reading of [`WorkerCounters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CounterSnapshot {
    /// Jobs handed to this worker.
    pub reserved: u64,
    /// Handlers that succeeded and whose job completed.
    pub processed: u64,
    /// Handlers that returned an error (the attempt was failed).
    pub failed: u64,
    /// Handlers that panicked (the attempt was failed with the message).
    pub panicked: u64,
    /// Handlers that ran past the handler timeout (the attempt was failed).
    pub timed_out: u64,
    /// Jobs cancelled on the server while their handler ran.
    pub cancelled: u64,
    /// Jobs whose lease ended before they were settled: the server runs
    /// them again.
    pub lease_lost: u64,
    /// Jobs handed back unfinished at shutdown.
    pub released: u64,
    /// Reserves that failed because the server was away or refusing.
    pub reconnects: u64,
}

impl WorkerCounters {
    pub fn snapshot(&self) -> CounterSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CounterSnapshot {
            reserved: get(&self.reserved),
            processed: get(&self.processed),
            failed: get(&self.failed),
            panicked: get(&self.panicked),
            timed_out: get(&self.timed_out),
            cancelled: get(&self.cancelled),
            lease_lost: get(&self.lease_lost),
            released: get(&self.released),
            reconnects: get(&self.reconnects),
        }
    }

    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Asks a running [`Worker`] to drain: stop reserving, give handlers the
/// shutdown grace, release what is left. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ShutdownHandle {
    draining: CancelToken,
    hard_stop: CancelToken,
}

impl ShutdownHandle {
    pub fn shutdown(&self) {
        self.draining.cancel(CancelReason::Shutdown);
    }

    /// A drain without the grace: every handler's token fires now (then
    /// `cancel_grace` as always), e.g. at an operator's second Ctrl-C.
    pub fn shutdown_now(&self) {
        self.draining.cancel(CancelReason::Shutdown);
        self.hard_stop.cancel(CancelReason::Shutdown);
    }
}

/// Settings of a [`Worker`]; see [`Worker::builder`].
#[derive(Debug, Clone)]
pub struct WorkerBuilder {
    client: Client,
    queues: Vec<String>,
    concurrency: usize,
    batch_max: u32,
    poll_timeout: Duration,
    heartbeat_interval: Option<Duration>,
    handler_timeout: Option<Duration>,
    cancel_grace: Duration,
    shutdown_grace: Duration,
}

impl WorkerBuilder {
    /// A queue to serve; repeat for several (a reserve takes from the first
    /// that has a job).
    pub fn queue(mut self, queue: impl Into<String>) -> WorkerBuilder {
        self.queues.push(queue.into());
        self
    }

    /// Most handlers in flight at once (at least 1).
    pub fn concurrency(mut self, handlers: usize) -> WorkerBuilder {
        self.concurrency = handlers.max(1);
        self
    }

    /// Most jobs one reserve asks for (at least 1).
    pub fn batch_max(mut self, jobs: u32) -> WorkerBuilder {
        self.batch_max = jobs.max(1);
        self
    }

    /// How long one reserve waits for a job (at most the server's 30 s).
    pub fn poll_timeout(mut self, timeout: Duration) -> WorkerBuilder {
        self.poll_timeout = timeout.min(LONG_POLL_MAX);
        self
    }

    /// Heartbeat this often instead of [`HEARTBEATS_PER_TTR`] times a TTR.
    /// It also bounds how late a handler learns its job was cancelled.
    pub fn heartbeat_interval(mut self, interval: Duration) -> WorkerBuilder {
        self.heartbeat_interval = Some(interval.max(HEARTBEAT_INTERVAL_MIN));
        self
    }

    /// Fail an attempt whose handler runs longer than this.
    pub fn handler_timeout(mut self, timeout: Duration) -> WorkerBuilder {
        self.handler_timeout = Some(timeout);
        self
    }

    /// How long a handler may run on after its token fired.
    pub fn cancel_grace(mut self, grace: Duration) -> WorkerBuilder {
        self.cancel_grace = grace;
        self
    }

    /// How long handlers may run on once a shutdown begins, before their
    /// tokens fire.
    pub fn shutdown_grace(mut self, grace: Duration) -> WorkerBuilder {
        self.shutdown_grace = grace;
        self
    }

    pub fn build(self, handler: impl Handler) -> Worker {
        Worker {
            settings: Arc::new(self),
            handler: Arc::new(handler),
            counters: Arc::new(WorkerCounters::default()),
            draining: CancelToken::new(),
            hard_stop: CancelToken::new(),
        }
    }
}

/// Runs a handler for the jobs of some queues.
///
/// ```no_run
/// use std::time::Duration;
/// use spool_client::{Client, HandlerError, Job, JobContext, Worker};
///
/// async fn resize(job: Job, ctx: JobContext) -> Result<serde_json::Value, HandlerError> {
///     let request: serde_json::Value = job.payload_json()?;
///     tokio::select! {
///         reason = ctx.cancelled() => Err(HandlerError::new(reason.to_string())),
///         _ = tokio::time::sleep(Duration::from_millis(10)) => Ok(request),
///     }
/// }
///
/// # async fn demo() -> Result<(), spool_client::Error> {
/// let worker = Worker::builder(Client::new("127.0.0.1:11301")?)
///     .queue("images")
///     .concurrency(8)
///     .handler_timeout(Duration::from_secs(60))
///     .build(resize);
/// let stop = worker.shutdown_handle();
/// tokio::spawn(async move {
///     let _ = tokio::signal::ctrl_c().await;
///     stop.shutdown();
/// });
/// let counters = worker.run().await?;
/// println!("{} jobs done", counters.processed);
/// # Ok(())
/// # }
/// ```
pub struct Worker {
    settings: Arc<WorkerBuilder>,
    handler: Arc<dyn Handler>,
    counters: Arc<WorkerCounters>,
    draining: CancelToken,
    hard_stop: CancelToken,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("settings", &self.settings)
            .field("counters", &self.counters.snapshot())
            .finish()
    }
}

/// What one supervisor needs, shared by all.
struct Shared {
    client: Client,
    completions: Arc<CompleteGroups>,
    settings: Arc<WorkerBuilder>,
    handler: Arc<dyn Handler>,
    counters: Arc<WorkerCounters>,
    draining: CancelToken,
    /// Fires when the shutdown grace ends.
    hard_stop: CancelToken,
}

impl Shared {
    /// Releases a job that will not be run, as a task of `tasks`.
    fn release_unrun(self: &Arc<Shared>, tasks: &mut JoinSet<()>, job: Job, sent_at: Instant) {
        let shared = self.clone();
        tasks.spawn(async move {
            let Some(lease) = job.lease.as_deref() else {
                return;
            };
            let settle = Settle {
                shared: &shared,
                id: job.id,
                lease,
                lease_deadline: sent_at + Duration::from_millis(job.ttr_ms),
            };
            settle.release().await;
        });
    }
}

impl Worker {
    /// A worker of `client`'s server; add queues, then [`WorkerBuilder::build`].
    pub fn builder(client: Client) -> WorkerBuilder {
        WorkerBuilder {
            client,
            queues: Vec::new(),
            concurrency: 1,
            batch_max: BATCH_MAX_DEFAULT,
            poll_timeout: POLL_TIMEOUT_DEFAULT,
            heartbeat_interval: None,
            handler_timeout: None,
            cancel_grace: CANCEL_GRACE_DEFAULT,
            shutdown_grace: SHUTDOWN_GRACE_DEFAULT,
        }
    }

    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle {
            draining: self.draining.clone(),
            hard_stop: self.hard_stop.clone(),
        }
    }

    pub fn counters(&self) -> Arc<WorkerCounters> {
        self.counters.clone()
    }

    /// Serves until a shutdown is asked for and the drain is over; answers
    /// the counters then. Fails only when the server refuses the reserve
    /// itself (no queue given, a bad queue name, a wrong token): after
    /// draining what is in flight.
    pub async fn run(self) -> Result<CounterSnapshot, Error> {
        let settings = self.settings.clone();
        if settings.queues.is_empty() {
            return Err(Error::Usage("a worker needs at least one queue".into()));
        }
        let shared = Arc::new(Shared {
            client: settings.client.clone(),
            completions: Arc::default(),
            settings: settings.clone(),
            handler: self.handler.clone(),
            counters: self.counters.clone(),
            draining: self.draining.clone(),
            hard_stop: self.hard_stop.clone(),
        });
        // The grace counts from the shutdown request, not from the end of
        // the reserve in flight then.
        let grace_timer = tokio::spawn({
            let shared = shared.clone();
            async move {
                shared.draining.cancelled().await;
                sleep(shared.settings.shutdown_grace).await;
                shared.hard_stop.cancel(CancelReason::Shutdown);
            }
        });
        let slots = Arc::new(Semaphore::new(settings.concurrency));
        let mut tasks = JoinSet::new();
        let mut backoff = RECONNECT_BACKOFF_MIN;
        let mut fatal = None;
        while !shared.draining.is_cancelled() {
            while tasks.try_join_next().is_some() {}
            let mut permit = tokio::select! {
                permit = slots.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break,
                },
                _ = shared.draining.cancelled() => break,
            };
            // With handlers in flight, wait a moment for a few more slots:
            // slots free one at a time, and a reserve per freed slot would
            // spend a request on each job.
            let gather = (settings.batch_max as usize).min(settings.concurrency) / GATHER_DIVISOR;
            if gather > 1 && slots.available_permits() + 1 < gather {
                let wanted = (gather - 1) as u32;
                if let Ok(Ok(extra)) =
                    tokio::time::timeout(BATCH_GATHER, slots.clone().acquire_many_owned(wanted))
                        .await
                {
                    permit.merge(extra);
                }
            }
            let more = slots
                .available_permits()
                .min(settings.batch_max as usize - permit.num_permits());
            if more > 0 {
                if let Ok(extra) = slots.clone().try_acquire_many_owned(more as u32) {
                    permit.merge(extra);
                }
            }
            let want = permit.num_permits() as u32;
            // Not interrupted by a shutdown: jobs it hands out are released,
            // never left leased to a request nobody reads.
            let sent_at = Instant::now();
            match shared
                .client
                .reserve(&settings.queues, want, settings.poll_timeout)
                .await
            {
                Ok(jobs) => {
                    backoff = RECONNECT_BACKOFF_MIN;
                    for job in jobs {
                        WorkerCounters::bump(&shared.counters.reserved);
                        match permit.split(1) {
                            Some(slot) => {
                                tasks.spawn(supervise(shared.clone(), job, sent_at, slot));
                            }
                            // More jobs than asked for (a server bug): each
                            // is handed back rather than run past the bound.
                            None => {
                                shared.release_unrun(&mut tasks, job, sent_at);
                            }
                        }
                    }
                }
                Err(e) if e.is_transient() => {
                    WorkerCounters::bump(&shared.counters.reconnects);
                    drop(permit);
                    tokio::select! {
                        _ = sleep(jittered(backoff)) => {}
                        _ = shared.draining.cancelled() => {}
                    }
                    backoff = (backoff * 2).min(RECONNECT_BACKOFF_MAX);
                }
                Err(e) => {
                    fatal = Some(e);
                    shared.draining.cancel(CancelReason::Shutdown);
                }
            }
        }
        while tasks.join_next().await.is_some() {}
        grace_timer.abort();
        match fatal {
            Some(e) => Err(e),
            None => Ok(self.counters.snapshot()),
        }
    }
}

/// `base` plus up to half again, from the clock's nanoseconds (no RNG
/// needed to keep a fleet from retrying in step).
fn jittered(base: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let half = base.as_nanos() as u64 / 2;
    base + Duration::from_nanos(if half == 0 {
        0
    } else {
        u64::from(nanos) % half
    })
}

/// How a handler's run ended.
enum Ended {
    Returned(Result<Result<Body, HandlerError>, JoinError>),
    /// Dropped: it ran `cancel_grace` past its token.
    Dropped,
}

fn panic_message(error: JoinError) -> String {
    match error.try_into_panic() {
        Ok(payload) => match payload.downcast::<String>() {
            Ok(text) => *text,
            Err(payload) => match payload.downcast::<&'static str>() {
                Ok(text) => (*text).to_string(),
                Err(_) => "a panic without a message".to_string(),
            },
        },
        Err(error) => error.to_string(),
    }
}

async fn supervise(shared: Arc<Shared>, job: Job, sent_at: Instant, _slot: OwnedSemaphorePermit) {
    let settings = &shared.settings;
    let counters = &shared.counters;
    let Some(lease) = job.lease.clone() else {
        // A reserve answer without a lease is not the API's; nothing can be
        // settled, and the server gets the job back at its TTR.
        WorkerCounters::bump(&counters.lease_lost);
        return;
    };
    let id = job.id;
    let ttr = Duration::from_millis(job.ttr_ms);
    if shared.draining.is_cancelled() {
        // Handed out by the reserve that was in flight when the drain began.
        let settle = Settle {
            shared: &shared,
            id,
            lease: &lease,
            lease_deadline: sent_at + ttr,
        };
        return settle.release().await;
    }
    let heartbeat_every = settings
        .heartbeat_interval
        .unwrap_or(ttr / HEARTBEATS_PER_TTR)
        .max(HEARTBEAT_INTERVAL_MIN);
    // Counted from before the reserve was sent, so never later than the
    // server's own deadline.
    let mut lease_deadline = sent_at + ttr;
    let token = CancelToken::new();
    let ctx = JobContext {
        token: token.clone(),
        draining: shared.draining.clone(),
    };
    let started = Instant::now();
    let timeout_at = settings.handler_timeout.map(|t| started + t);
    let mut handle = tokio::spawn(shared.handler.call(job, ctx));
    let mut next_heartbeat = started + heartbeat_every;
    let mut heartbeat: Option<HeartbeatFuture> = None;
    let mut lease_held = true;
    let mut drop_at: Option<Instant> = None;
    let fire = |reason: CancelReason, drop_at: &mut Option<Instant>| {
        if token.cancel(reason) {
            *drop_at = Some(Instant::now() + settings.cancel_grace);
        }
    };
    let far = Instant::now() + Duration::from_secs(86_400 * 365);
    let ended = loop {
        tokio::select! {
            biased;
            result = &mut handle => break Ended::Returned(result),
            (sent, result) = async { heartbeat.as_mut().expect("guarded").await }, if heartbeat.is_some() => {
                heartbeat = None;
                next_heartbeat = Instant::now() + heartbeat_every;
                match result {
                    Ok(_) => lease_deadline = sent + ttr,
                    Err(e) if e.is_cancelled() || e.code() == Some(&ErrorCode::NotFound) => {
                        lease_held = false;
                        fire(CancelReason::Cancelled, &mut drop_at);
                    }
                    Err(e) if e.is_lease_expired() => {
                        lease_held = false;
                        fire(CancelReason::Deadline, &mut drop_at);
                    }
                    // The server is away or slow: the next beat tries again,
                    // the lease deadline says when to give up.
                    Err(_) => {}
                }
            }
            _ = sleep_until(next_heartbeat), if heartbeat.is_none() && lease_held => {
                let client = shared.client.clone();
                let lease = lease.clone();
                heartbeat = Some(Box::pin(async move {
                    let sent = Instant::now();
                    (sent, client.heartbeat(id, &lease).await)
                }));
            }
            _ = sleep_until(lease_deadline), if lease_held => {
                lease_held = false;
                fire(CancelReason::Deadline, &mut drop_at);
            }
            _ = sleep_until(timeout_at.unwrap_or(far)), if timeout_at.is_some() && !token.is_cancelled() => {
                fire(CancelReason::TimedOut, &mut drop_at);
            }
            _ = shared.hard_stop.cancelled(), if !token.is_cancelled() => {
                fire(CancelReason::Shutdown, &mut drop_at);
            }
            _ = sleep_until(drop_at.unwrap_or(far)), if drop_at.is_some() => {
                handle.abort();
                break Ended::Dropped;
            }
        }
    };
    drop(heartbeat);
    let reason = token.reason();
    let timed_out_failure = || {
        Failure::new(format!(
            "the handler timed out after {} ms",
            settings.handler_timeout.unwrap_or_default().as_millis()
        ))
    };
    let settle = Settle {
        shared: &shared,
        id,
        lease: &lease,
        lease_deadline,
    };
    match (ended, reason) {
        (_, Some(CancelReason::Cancelled)) => WorkerCounters::bump(&counters.cancelled),
        (Ended::Returned(Ok(Ok(result))), _) => settle.complete(&result).await,
        (Ended::Returned(Ok(Err(_))) | Ended::Dropped, Some(CancelReason::TimedOut)) => {
            settle.fail(&timed_out_failure(), &counters.timed_out).await
        }
        (Ended::Returned(Ok(Err(_))) | Ended::Dropped, Some(CancelReason::Shutdown)) => {
            settle.release().await
        }
        (Ended::Returned(Ok(Err(_))) | Ended::Dropped, Some(CancelReason::Deadline)) => {
            WorkerCounters::bump(&counters.lease_lost)
        }
        (Ended::Returned(Ok(Err(_))), None) if shared.draining.is_cancelled() => {
            settle.release().await
        }
        (Ended::Returned(Ok(Err(error))), _) => {
            settle.fail(&error.failure(), &counters.failed).await
        }
        (Ended::Returned(Err(error)), _) => {
            let failure = Failure::new(format!("the handler panicked: {}", panic_message(error)));
            settle.fail(&failure, &counters.panicked).await
        }
        // A token only fires with a reason.
        (Ended::Dropped, None) => WorkerCounters::bump(&counters.lease_lost),
    }
}

/// Completions on their way to the server together, as the server groups
/// them for its database: one arriving while a `POST /v1/jobs/complete` is
/// in flight waits and goes with the others in the next one, so the jobs
/// of a reserved batch, finishing close together, are settled in a request
/// or two instead of one each. Nothing waits for a timer: a lone
/// completion goes at once, alone (`POST /v1/jobs/{id}/complete`).
#[derive(Default)]
struct CompleteGroups {
    waiting: Mutex<CompletesWaiting>,
    /// Set once the server answered the batch path 404 or 405 (it is older
    /// than the endpoint): from then on each completion goes alone.
    batch_refused: AtomicBool,
}

#[derive(Default)]
struct CompletesWaiting {
    pending: Vec<PendingComplete>,
    /// A task is sending groups; it takes what is pending when it is free.
    leading: bool,
}

/// A group's answer to one completion: the server's, or `None`: send it
/// alone.
type GroupedComplete = Option<Result<(), Error>>;

struct PendingComplete {
    lease: String,
    result: Body,
    reply: oneshot::Sender<GroupedComplete>,
}

impl CompleteGroups {
    /// Completes in the next group, or answers `None`: complete it alone.
    async fn complete(
        self: &Arc<Self>,
        client: &Client,
        lease: &str,
        result: &Body,
    ) -> GroupedComplete {
        let (reply, answer) = oneshot::channel();
        let lead = {
            let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
            waiting.pending.push(PendingComplete {
                lease: lease.to_string(),
                result: result.clone(),
                reply,
            });
            !std::mem::replace(&mut waiting.leading, true)
        };
        if lead {
            tokio::spawn(Arc::clone(self).lead(client.clone()));
        }
        // The leader gone without an answer (the runtime ending): alone.
        answer.await.unwrap_or(None)
    }

    /// Sends groups until nothing waits.
    async fn lead(self: Arc<Self>, client: Client) {
        loop {
            let group: Vec<PendingComplete> = {
                let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
                if waiting.pending.is_empty() {
                    waiting.leading = false;
                    return;
                }
                let take = waiting.pending.len().min(COMPLETE_MANY_MAX);
                waiting.pending.drain(..take).collect()
            };
            if group.len() == 1 || self.batch_refused.load(Ordering::Relaxed) {
                for pending in group {
                    let _ = pending.reply.send(None);
                }
                continue;
            }
            let jobs: Vec<(&str, &Body)> = group
                .iter()
                .map(|p| (p.lease.as_str(), &p.result))
                .collect();
            match client.complete_many(&jobs).await {
                Ok(answers) => {
                    for (pending, answer) in group.into_iter().zip(answers) {
                        let _ = pending.reply.send(Some(answer.map(|_version| ())));
                    }
                }
                // The request as a whole failed (the server away, a body
                // too large for it, a server older than the endpoint):
                // each goes alone and gets its own answer, retried as a
                // single completion is.
                Err(error) => {
                    if matches!(
                        error,
                        Error::Api {
                            status: 404 | 405,
                            ..
                        }
                    ) {
                        self.batch_refused.store(true, Ordering::Relaxed);
                    }
                    for pending in group {
                        let _ = pending.reply.send(None);
                    }
                }
            }
        }
    }
}

/// Settling one job: each call retried while the server is away, until the
/// lease would have ended (then the server runs the job again anyway).
struct Settle<'a> {
    shared: &'a Shared,
    id: u64,
    lease: &'a str,
    lease_deadline: Instant,
}

enum Settled {
    Done,
    Cancelled,
    LeaseLost,
    /// Refused for another reason (a result too large, a bug).
    Refused(Error),
}

impl Settle<'_> {
    async fn retry<F, Fut, T>(&self, mut call: F) -> Settled
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Error>>,
    {
        let mut backoff = RECONNECT_BACKOFF_MIN;
        loop {
            match call().await {
                Ok(_) => return Settled::Done,
                Err(e) if e.is_cancelled() => return Settled::Cancelled,
                Err(e) if e.is_transient() && Instant::now() + backoff < self.lease_deadline => {
                    sleep(jittered(backoff)).await;
                    backoff = (backoff * 2).min(RECONNECT_BACKOFF_MAX);
                }
                Err(e @ Error::Api { .. })
                    if !e.is_lease_expired()
                        && !e.is_transient()
                        && e.code() != Some(&ErrorCode::NotFound)
                        && e.code() != Some(&ErrorCode::WrongState) =>
                {
                    return Settled::Refused(e)
                }
                // lease_expired, not_found, or the lease is over by now.
                Err(_) => return Settled::LeaseLost,
            }
        }
    }

    fn count(&self, settled: Settled, done: &AtomicU64) {
        let counters = &self.shared.counters;
        WorkerCounters::bump(match settled {
            Settled::Done => done,
            Settled::Cancelled => &counters.cancelled,
            Settled::LeaseLost | Settled::Refused(_) => &counters.lease_lost,
        });
    }

    async fn complete(&self, result: &Body) {
        let settled = self.retry(|| self.complete_once(result)).await;
        match settled {
            // The server refused the result itself (too large, not valid):
            // the attempt fails with why, rather than running again at
            // the TTR for the same refusal.
            Settled::Refused(error) => {
                let failure = Failure::new(format!("the result was refused: {error}"));
                self.fail(&failure, &self.shared.counters.failed).await
            }
            other => self.count(other, &self.shared.counters.processed),
        }
    }

    /// One try: in a group with the completions of the jobs finishing
    /// meanwhile, or alone.
    async fn complete_once(&self, result: &Body) -> Result<(), Error> {
        let client = &self.shared.client;
        match self
            .shared
            .completions
            .complete(client, self.lease, result)
            .await
        {
            Some(answer) => answer,
            None => client
                .complete(self.id, self.lease, result)
                .await
                .map(|_| ()),
        }
    }

    async fn fail(&self, failure: &Failure, counter: &AtomicU64) {
        let client = &self.shared.client;
        let settled = self
            .retry(|| client.fail(self.id, self.lease, failure))
            .await;
        self.count(settled, counter);
    }

    async fn release(&self) {
        let client = &self.shared.client;
        let settled = self
            .retry(|| client.release(self.id, self.lease, None, None))
            .await;
        self.count(settled, &self.shared.counters.released);
    }
}
