//! Everything of spool that does I/O: the [`Broker`] seam, the local broker
//! that runs the sans-IO engine on a task, and the network adapters that
//! speak to clients.

pub mod beanstalk;
mod broker;
pub mod durable;
mod local;
pub mod process;

pub use broker::{Broker, BrokerError, Peer, Session};
pub use local::{Clock, CommitAck, LocalBroker, LocalSession, LogLink, LogMsg, LogSink};
