//! A typed async client and a worker SDK for spool's HTTP/JSON job API.
//!
//! - [`Client`]: one method per `/v1` operation (enqueue with options,
//!   batches, get, wait for a result, list, cancel, kick, purge, policies,
//!   pause and resume, and the worker's reserve, heartbeat, complete, fail
//!   and release), errors as [`Error`] with the API's codes ([`ErrorCode`]).
//! - [`Worker`]: serves queues with a bounded pool of handlers, heartbeats
//!   for them, tells them through a [`CancelToken`] when their job was
//!   cancelled, its lease ended, their timeout passed or the shutdown grace
//!   ended, turns panics into failed attempts, drains gracefully, and
//!   reconnects when the server is away.
//!
//! ```no_run
//! use spool_client::{Client, Enqueue, HandlerError, Job, JobContext, Worker};
//!
//! async fn greet(job: Job, _ctx: JobContext) -> Result<String, HandlerError> {
//!     let name: String = job.payload_json()?;
//!     Ok(format!("hello, {name}"))
//! }
//!
//! # async fn demo() -> Result<(), spool_client::Error> {
//! let client = Client::new("127.0.0.1:11301")?;
//! client.enqueue("greetings", &Enqueue::json("world")?).await?;
//!
//! let worker = Worker::builder(client).queue("greetings").concurrency(4).build(greet);
//! let stop = worker.shutdown_handle();
//! tokio::spawn(async move {
//!     let _ = tokio::signal::ctrl_c().await;
//!     stop.shutdown();
//! });
//! worker.run().await?;
//! # Ok(())
//! # }
//! ```
//!

mod base64;
mod cancel;
mod client;
mod error;
mod types;
mod worker;
mod workflow;

pub use cancel::{CancelReason, CancelToken};
pub use client::{
    escape, Client, ClientBuilder, RawResponse, COMPLETE_MANY_MAX, LONG_POLL_MAX,
    REQUEST_TIMEOUT_DEFAULT, RESPONSE_MAX_BYTES_DEFAULT,
};
pub use error::{Error, ErrorCode};
pub use types::{
    Backoff, Body, Enqueue, Failure, Job, JobChange, JobPage, JobState, Policy, QueueInfo,
    Schedule, ScheduleInfo,
};
pub use worker::{
    CounterSnapshot, Handler, HandlerError, JobContext, ShutdownHandle, Worker, WorkerBuilder,
    WorkerCounters, BATCH_MAX_DEFAULT, CANCEL_GRACE_DEFAULT, HEARTBEATS_PER_TTR,
    HEARTBEAT_INTERVAL_MIN, POLL_TIMEOUT_DEFAULT, RECONNECT_BACKOFF_MAX, RECONNECT_BACKOFF_MIN,
    SHUTDOWN_GRACE_DEFAULT,
};
pub use workflow::{NewWorkflow, Step, Workflow, WorkflowPage, WorkflowState, WorkflowStep};

pub use bytes::Bytes;
pub use hyper::Method;
