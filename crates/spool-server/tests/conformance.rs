//! The broker conformance suite (`spool_broker::conformance`) against the
//! local broker: in memory, and on the write-ahead log under each fsync
//! policy (the log thread for `always`, the inline writer for `never`),
//! where the durability case restarts the broker on the same directory.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use spool_broker::conformance::Harness;
use spool_engine::{Engine, EngineConfig};
use spool_server::durable::{self, FsyncPolicy, InlineLog};
use spool_server::process::ProcessInfo;
use spool_server::{manual_engine_clock, Clock, LocalBroker, LogSink};
use spool_wal::WalOptions;

/// Attempts to reopen a log whose previous broker is still stopping.
const REOPEN_TRIES_MAX: usize = 2_000;

/// Engine time the tests start at: 2026-12-04, as engine nanoseconds.
const START_NS: u64 = 218_505_600_000_000_000;

fn engine() -> Engine {
    Engine::new(EngineConfig {
        max_job_size: 1 << 16,
    })
}

/// A fresh directory under the system's temporary one.
fn scratch_dir(name: &str) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "spool-conformance-{}-{name}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temporary directory");
    dir
}

#[derive(Debug)]
struct LocalHarness {
    broker: LocalBroker,
    clock: Clock,
    /// The log's directory and fsync policy, when durable.
    storage: Option<(PathBuf, FsyncPolicy)>,
    log_thread: Option<std::thread::JoinHandle<()>>,
}

impl LocalHarness {
    fn in_memory() -> LocalHarness {
        let clock = manual_engine_clock(START_NS);
        let broker = LocalBroker::start(engine(), clock.clone(), None, ProcessInfo::new("test"));
        LocalHarness {
            broker,
            clock,
            storage: None,
            log_thread: None,
        }
    }

    fn durable(dir: PathBuf, fsync: FsyncPolicy, now_ns: u64) -> LocalHarness {
        Self::try_durable(dir, fsync, now_ns).expect("open the log")
    }

    fn try_durable(dir: PathBuf, fsync: FsyncPolicy, now_ns: u64) -> Result<LocalHarness, String> {
        let clock = manual_engine_clock(now_ns);
        let (broker, log_thread) = open(&dir, fsync, &clock)?;
        Ok(LocalHarness {
            broker,
            clock,
            storage: Some((dir, fsync)),
            log_thread,
        })
    }
}

/// Recovers the log in `dir` and starts a broker on it.
type Opened = (LocalBroker, Option<std::thread::JoinHandle<()>>);

fn open(dir: &Path, fsync: FsyncPolicy, clock: &Clock) -> Result<Opened, String> {
    let mut engine = engine();
    let options = WalOptions::default().zero_fill_ahead_bytes(0);
    let (wal, _report) =
        durable::recover(dir, options, &mut engine, clock).map_err(|e| e.to_string())?;
    let segment = 1 << 20;
    let (sink, thread) = if fsync == FsyncPolicy::Always {
        let (link, thread) = durable::spawn_log_thread(
            wal,
            dir,
            fsync,
            clock.epoch_ns(),
            segment,
            Default::default(),
        )
        .expect("log thread");
        (LogSink::Thread(link), Some(thread))
    } else {
        let log = InlineLog::new(
            wal,
            dir,
            fsync,
            clock.epoch_ns(),
            segment,
            Default::default(),
        )
        .expect("inline log");
        (LogSink::Inline(Box::new(log)), None)
    };
    let broker = LocalBroker::start(engine, clock.clone(), Some(sink), ProcessInfo::new("test"));
    Ok((broker, thread))
}

impl Harness for LocalHarness {
    type Broker = LocalBroker;

    fn broker(&self) -> &LocalBroker {
        &self.broker
    }

    async fn advance(&self, ms: u64) {
        self.broker.advance_clock(ms * 1_000_000);
    }

    async fn restart(self) -> Option<LocalHarness> {
        let LocalHarness {
            broker,
            clock,
            storage,
            log_thread,
        } = self;
        let (dir, fsync) = storage?;
        let now = clock.now_ns();
        // The engine task ends when the last handle goes; the log thread
        // then makes its last sync and stops.
        drop(broker);
        if let Some(thread) = log_thread {
            tokio::task::spawn_blocking(move || thread.join())
                .await
                .expect("join")
                .expect("the log thread ends cleanly");
        }
        // The directory lock goes with the log, which the engine task drops
        // when it ends: retry (bounded) until it has.
        let mut last_error = String::new();
        for _ in 0..REOPEN_TRIES_MAX {
            match LocalHarness::try_durable(dir.clone(), fsync, now + 1_000_000) {
                Ok(harness) => return Some(harness),
                Err(error) => last_error = error,
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        panic!("the log did not reopen: {last_error}");
    }
}

mod in_memory {
    use super::*;

    spool_broker::conformance_tests!(async { LocalHarness::in_memory() });
}

mod log_fsync_always {
    use super::*;

    spool_broker::conformance_tests!(async {
        LocalHarness::durable(scratch_dir("always"), FsyncPolicy::Always, START_NS)
    });
}

mod log_fsync_never {
    use super::*;

    spool_broker::conformance_tests!(async {
        LocalHarness::durable(scratch_dir("never"), FsyncPolicy::Never, START_NS)
    });
}
