//! The seam between front doors and storage.
//!
//! Adapters (the beanstalkd listener, the HTTP API) talk to a [`Broker`] and
//! never to an engine or a database directly. Two kinds of call cross it:
//!
//! - [`Broker::call`] runs one typed [`Op`] of the job model. Each op is one
//!   unit of commit: the local broker runs it in one engine round and logs
//!   its records as one atomic batch; a PostgreSQL broker runs it as one
//!   transaction. Nothing is answered before its changes are durable.
//! - A [`Session`] is a beanstalkd client's view (the tube it uses, the
//!   tubes it watches, the leases it holds), fed with that protocol's
//!   requests in pipelined batches, so the beanstalkd path keeps its one
//!   message per batch. Its leases are the same leases typed ops use; when
//!   the session ends they are handed back.

use std::future::Future;
use std::task::{Context, Poll};

use spool_proto::{Request, Response};

use crate::error::BrokerError;
use crate::model::{JobId, JobView, Lease, Leased, NewJob, Op, Outcome, QueueName};
use crate::snapshot::{EngineSnapshot, SnapshotScope};

/// Who is on the other end of a session, for introspection.
#[derive(Debug, Clone, Default)]
pub struct Peer {
    pub addr: String,
}

/// What readiness probes and alerts need to know, read without asking the
/// engine (see [`Broker::health`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BrokerHealth {
    /// The log failed with this error; durable changes are refused until
    /// restart.
    pub storage_failed: Option<String>,
    /// The disk is full; puts are refused until space returns.
    pub disk_full: bool,
    /// Puts are refused with `DRAINING` (SIGUSR1, or shutting down).
    pub draining: bool,
    /// [`Broker::begin_shutdown`] was called.
    pub shutting_down: bool,
}

pub trait Broker: Clone + Send + Sync + 'static {
    type Session: Session;

    /// Opens a session: one client connection's view of the queues (the
    /// tube it uses, the tubes it watches, the jobs it has reserved).
    fn open_session(&self, peer: Peer) -> Result<Self::Session, BrokerError>;

    /// Refuses new jobs with `DRAINING` while set.
    fn set_draining(&self, draining: bool);

    /// Queues and counters as they are now, and sessions too with
    /// [`SnapshotScope::Full`], for metrics and introspection. Costs a pass
    /// over queues (and sessions) on the engine's data path: ask for
    /// [`SnapshotScope::Queues`] unless sessions are shown.
    fn snapshot(
        &self,
        scope: SnapshotScope,
    ) -> impl Future<Output = Result<EngineSnapshot, BrokerError>> + Send;

    /// Cheap and synchronous: for probes that must answer while the engine
    /// is busy.
    fn health(&self) -> BrokerHealth;

    /// Starts a graceful shutdown (SIGTERM), for good: puts are answered
    /// `DRAINING`; every blocked reserve, and every reserve from now on, is
    /// answered `TIMED_OUT` at once; a session that holds no reserved job
    /// and has no request in progress is closed (its `poll_recv` returns
    /// `Ready(false)` after its last replies); one that holds reserved jobs
    /// stays open so its worker can delete, release or bury them, and is
    /// closed once it holds none. Whoever enforces the grace period drops
    /// the sessions left, which releases their jobs. The front door polls
    /// every session once more after this call: an idle session need not
    /// register for the shutdown itself (a PostgreSQL broker's idle
    /// sessions do not, which keeps them small) and closes on that poll.
    fn begin_shutdown(&self);

    /// Runs one operation of the job model. Blocking ops (a reserve with a
    /// timeout) end early, with what they have, when a shutdown begins.
    fn call(&self, op: Op) -> impl Future<Output = Result<Outcome, BrokerError>> + Send;

    /// [`Op::Enqueue`]: the job, and whether an idempotency key matched an
    /// existing one (then nothing new was made).
    fn enqueue(
        &self,
        queue: QueueName,
        job: NewJob,
    ) -> impl Future<Output = Result<(JobView, bool), BrokerError>> + Send {
        let call = self.call(Op::Enqueue { queue, job });
        async move {
            match call.await? {
                Outcome::Enqueued { job, duplicate } => Ok((job, duplicate)),
                other => Err(BrokerError::unexpected(&other)),
            }
        }
    }

    /// [`Op::Get`].
    fn get(&self, id: JobId) -> impl Future<Output = Result<JobView, BrokerError>> + Send {
        let call = self.call(Op::Get { id });
        async move { call.await?.into_job() }
    }

    /// [`Op::Reserve`].
    fn reserve(
        &self,
        queues: Vec<QueueName>,
        batch: u32,
        timeout_ms: u64,
    ) -> impl Future<Output = Result<Vec<Leased>, BrokerError>> + Send {
        let call = self.call(Op::Reserve {
            queues,
            batch,
            timeout_ms,
        });
        async move {
            match call.await? {
                Outcome::Leased(jobs) => Ok(jobs),
                other => Err(BrokerError::unexpected(&other)),
            }
        }
    }

    /// [`Op::Complete`].
    fn complete(
        &self,
        lease: Lease,
        result: Option<bytes::Bytes>,
    ) -> impl Future<Output = Result<JobView, BrokerError>> + Send {
        let call = self.call(Op::Complete { lease, result });
        async move { call.await?.into_job() }
    }
}

/// One client's session. Dropping it closes the session: a blocked reserve
/// is abandoned and reserved jobs go back to ready.
pub trait Session: Send + 'static {
    /// The broker's number for this session, as snapshots show it
    /// ([`crate::SessionSnapshot::conn_id`]).
    fn id(&self) -> u64;

    /// Queues requests for execution in order. Every request gets exactly
    /// one response, in order; a blocking `reserve` holds back the responses
    /// of the requests after it until it completes. `quit` must not be sent:
    /// the adapter handles it by dropping the session.
    fn submit(&mut self, requests: Vec<Request>) -> Result<(), BrokerError>;

    /// The client will send nothing more: the broker finishes what was
    /// submitted (abandoning a blocked reserve) and then closes the session.
    fn hangup(&mut self);

    /// Moves available responses to `out` (`Ready(true)`), or registers the
    /// task to be woken when some arrive (`Pending`). `Ready(false)` once the
    /// session is closed and every response has been handed out.
    ///
    /// A poll function rather than an async one so that a connection task
    /// stores no future for it: idle connections stay small.
    fn poll_recv(&mut self, cx: &mut Context<'_>, out: &mut Vec<Response>) -> Poll<bool>;
}
