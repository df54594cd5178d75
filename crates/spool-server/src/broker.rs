//! The seam between front doors and storage.
//!
//! Adapters (the beanstalkd listener now, the HTTP API later) talk to a
//! [`Broker`] and never to an engine or a database directly. The local
//! broker runs the in-process engine; a PostgreSQL broker will implement the
//! same two traits, so adapters need no change when it lands.

use std::fmt;
use std::future::Future;
use std::task::{Context, Poll};

use spool_engine::{EngineSnapshot, SnapshotScope};
use spool_proto::{Request, Response};

/// Why a broker could not serve a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BrokerError {
    /// The broker has shut down.
    Closed,
}

impl fmt::Display for BrokerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BrokerError::Closed => f.write_str("the broker has shut down"),
        }
    }
}

impl std::error::Error for BrokerError {}

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
    /// the sessions left, which releases their jobs.
    fn begin_shutdown(&self);
}

/// One client's session. Dropping it closes the session: a blocked reserve
/// is abandoned and reserved jobs go back to ready.
pub trait Session: Send + 'static {
    /// The broker's number for this session, as snapshots show it
    /// ([`spool_engine::SessionSnapshot::conn_id`]).
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
