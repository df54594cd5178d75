//! Everything of spool that does I/O: the [`Broker`] seam, the local broker
//! that runs the sans-IO engine on a task, and the network adapters that
//! speak to clients.

pub mod beanstalk;
pub mod connections;
pub mod durable;
pub mod http;
pub mod limits;
mod local;
pub mod net;
pub mod process;
mod wake;

pub use durable::{SharedStorageStats, StorageStats};
pub use local::{
    engine_clock, manual_engine_clock, CommitAck, LocalBroker, LocalSession, LogLink, LogMsg,
    LogSink, ENGINE_EPOCH_WALL_NS,
};
pub use spool_broker::{Broker, BrokerError, BrokerHealth, Clock, Peer, Session};
pub use spool_engine::metrics::{
    Buckets, Histogram, COMMIT_BATCH_BUCKETS_RECORDS, IO_LATENCY_BUCKETS_SECONDS,
    QUEUE_LATENCY_BUCKETS_SECONDS,
};
pub use spool_engine::{
    EngineSnapshot, QueueCounters, QueueSnapshot, RetiredQueueSnapshot, SessionSnapshot,
    SnapshotScope, RETIRED_QUEUES_MAX, SNAPSHOT_RESERVED_IDS_MAX,
};
