//! A burst of connections opened at once, as a fleet of workers
//! reconnecting after a deploy: every one is accepted and served. Counted,
//! not timed: a connection the kernel dropped from the listen queue would
//! still get in after its SYN retry, so what this checks is that the
//! listener keeps draining the queue and that every accepted connection
//! gets its own task, not how fast.
//!
//! In a file of its own, so its thousands of fds live in a process of
//! their own: the fd-ceiling tests in `connections.rs` count the process's
//! open fds.

// Helpers outside #[test] functions unwrap too: a failure there is a test failure.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use spool_engine::{Engine, EngineConfig};
use spool_server::beanstalk::{self, BeanstalkConfig, BeanstalkListener, LISTEN_BACKLOG};
use spool_server::connections::{Connections, Protocol};
use spool_server::process::{self, ProcessInfo};
use spool_server::{engine_clock, LocalBroker};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Connections opened at once: twice the backlog tokio's own listener
/// would get (1024), and each side of each costs an fd in this process.
const BURST: usize = 2_000;

/// Connects in flight at once, as `spool bench --mode accept` does.
const CONNECTS_IN_FLIGHT: usize = 256;

/// Bound on the whole burst; generous, since this is no speed test.
const WAIT_LIMIT: Duration = Duration::from_secs(60);

#[test]
fn a_burst_of_connections_opened_at_once_is_accepted_and_served() {
    // Both ends of every connection are in this process, plus the runtime's.
    let needed = 2 * BURST as u64 + 64;
    let (soft, hard) = process::raise_fd_limit().unwrap();
    assert!(
        soft >= needed,
        "this test needs {needed} open files; the limit is {soft} (hard {hard}): raise `ulimit -n`"
    );

    let connections = Connections::with_fd_limit(None, None);
    let registry = connections.clone();
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let listener =
                spool_server::net::bind_tcp("127.0.0.1:0".parse().unwrap(), LISTEN_BACKLOG)
                    .unwrap();
            addr_tx.send(listener.local_addr().unwrap()).unwrap();
            let engine = Engine::new(EngineConfig {
                max_job_size: 65_535,
            });
            let broker = LocalBroker::start(engine, engine_clock(), None, ProcessInfo::new("test"));
            beanstalk::serve(
                BeanstalkListener::Tcp(listener),
                broker,
                BeanstalkConfig::new(65_535),
                registry,
                async {
                    let _ = stop_rx.await;
                },
            )
            .await;
        });
    });
    let addr = addr_rx.recv_timeout(WAIT_LIMIT).unwrap();

    let client = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let served = client.block_on(async {
        let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(CONNECTS_IN_FLIGHT));
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..BURST {
            let permits = permits.clone();
            tasks.spawn(async move {
                let permit = permits.acquire_owned().await.unwrap();
                let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
                drop(permit);
                stream.write_all(b"list-tube-used\r\n").await.unwrap();
                let mut reply = [0u8; 15];
                stream.read_exact(&mut reply).await.unwrap();
                assert_eq!(&reply, b"USING default\r\n");
                // Held until every connection is served: the server has
                // them all open at once.
                stream
            });
        }
        let mut held = Vec::with_capacity(BURST);
        let all = async {
            while let Some(joined) = tasks.join_next().await {
                held.push(joined.unwrap());
            }
        };
        tokio::time::timeout(WAIT_LIMIT, all)
            .await
            .unwrap_or_else(|_| panic!("{} of {BURST} served within {WAIT_LIMIT:?}", held.len()));
        held
    });
    assert_eq!(served.len(), BURST);
    let metrics = connections.metrics();
    let beanstalk = metrics.protocol(Protocol::Beanstalk).unwrap();
    assert_eq!(beanstalk.opened_total, BURST as u64);
    assert_eq!(beanstalk.active, BURST as u64);
    assert!(
        metrics.rejected_total.iter().all(|(_, n)| *n == 0),
        "{metrics:?}"
    );

    drop(served);
    let _ = stop_tx.send(());
    server.join().unwrap();
}
