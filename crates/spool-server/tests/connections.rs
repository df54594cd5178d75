//! Connection lifecycle of the beanstalkd front door over real loopback TCP:
//! admission (max connections, fd ceiling), the request deadlines (a line
//! from its first byte, a body at a minimum rate) and the write timeout,
//! `close_all`, and what the registry lists and counts.
//!
//! Each test runs `beanstalk::serve` with an in-memory `LocalBroker` on a
//! current-thread runtime of its own thread (as `spool serve` does) and
//! talks to it with blocking std sockets. Every wait is bounded by a
//! generous deadline; nothing asserts that something was fast.

// Helpers outside #[test] functions unwrap too: a failure there is a test failure.
#![allow(clippy::unwrap_used)]

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use spool_engine::{Engine, EngineConfig};
use spool_server::beanstalk::{self, BeanstalkConfig, BeanstalkListener};
use spool_server::connections::{
    CloseReason, ConnState, ConnectionMetrics, Connections, Protocol, RejectReason,
};
use spool_server::limits::{FD_HEADROOM, HTTP_FD_RESERVE, REQUEST_BODY_MIN_BYTES_PER_SEC};
use spool_server::process::{self, ProcessInfo};
use spool_server::{engine_clock, LocalBroker};

/// Longest any expected event (a reply, a close) may take.
const WAIT_LIMIT: Duration = Duration::from_secs(20);
/// Short timeouts so that the stalled clients are closed quickly.
const SHORT_TIMEOUT: Duration = Duration::from_millis(300);

struct TestServer {
    addr: SocketAddr,
    connections: Connections,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl TestServer {
    fn start(config: BeanstalkConfig, connections: Connections) -> TestServer {
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (shutdown_tx, shutdown_rx) = tokio::sync::oneshot::channel::<()>();
        let registry = connections.clone();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                addr_tx.send(listener.local_addr().unwrap()).unwrap();
                let engine = Engine::new(EngineConfig {
                    max_job_size: config.max_job_size,
                });
                let broker =
                    LocalBroker::start(engine, engine_clock(), None, ProcessInfo::new("test"));
                beanstalk::serve(
                    BeanstalkListener::Tcp(listener),
                    broker,
                    config,
                    registry,
                    async {
                        let _ = shutdown_rx.await;
                    },
                )
                .await;
            });
        });
        let addr = addr_rx.recv_timeout(WAIT_LIMIT).unwrap();
        TestServer {
            addr,
            connections,
            shutdown: Some(shutdown_tx),
            thread: Some(thread),
        }
    }

    fn with_timeouts(request_timeout: Duration, write_timeout: Duration) -> TestServer {
        let config = BeanstalkConfig {
            request_timeout,
            write_timeout,
            ..BeanstalkConfig::new(65_535)
        };
        TestServer::start(config, Connections::with_fd_limit(None, None))
    }

    fn client(&self) -> Client {
        let stream = TcpStream::connect(self.addr).unwrap();
        stream.set_read_timeout(Some(WAIT_LIMIT)).unwrap();
        Client { stream }
    }

    fn metrics(&self) -> ConnectionMetrics {
        self.connections.metrics()
    }

    fn closed(&self, reason: CloseReason) -> u64 {
        self.metrics()
            .protocol(Protocol::Beanstalk)
            .unwrap()
            .closed(reason)
    }

    /// Waits (bounded) until `count` connections have closed for `reason`
    /// (a client sees the close a moment before the registry counts it).
    fn wait_closed(&self, reason: CloseReason, count: u64) {
        self.wait_until(&format!("{count} closed for {reason:?}"), |c| {
            c.metrics()
                .protocol(Protocol::Beanstalk)
                .is_some_and(|p| p.closed(reason) == count)
        });
    }

    /// Waits (bounded) until `done` holds of the registry.
    fn wait_until(&self, what: &str, done: impl Fn(&Connections) -> bool) {
        let deadline = Instant::now() + WAIT_LIMIT;
        while !done(&self.connections) {
            assert!(
                Instant::now() < deadline,
                "not within {WAIT_LIMIT:?}: {what}; metrics {:?}",
                self.metrics()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        // The runtime, and every connection task with it, ends with the
        // thread once serve returns.
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

struct Client {
    stream: TcpStream,
}

impl Client {
    fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    /// Reads until `expected` bytes have arrived and compares them.
    fn expect(&mut self, request: &[u8], expected: &str) {
        self.send(request);
        self.expect_reply(expected);
    }

    fn expect_reply(&mut self, expected: &str) {
        let mut got = vec![0u8; expected.len()];
        self.stream.read_exact(&mut got).unwrap();
        assert_eq!(String::from_utf8_lossy(&got), expected);
    }

    /// Reads one reply line.
    fn line(&mut self) -> String {
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while !line.ends_with(b"\r\n") {
            assert!(line.len() < 1024, "no line end in {line:?}");
            self.stream.read_exact(&mut byte).unwrap();
            line.push(byte[0]);
        }
        String::from_utf8_lossy(&line).into_owned()
    }

    /// True once the server has closed the connection (EOF or reset),
    /// waiting at most the read timeout.
    fn is_closed_by_server(&mut self) -> bool {
        let mut buf = [0u8; 4096];
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => return true,
                // Replies still on their way: keep reading.
                Ok(_) => continue,
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return true,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return false
                }
                Err(e) => panic!("reading: {e}"),
            }
        }
    }

    fn local_addr(&self) -> String {
        self.stream.local_addr().unwrap().to_string()
    }
}

#[test]
fn max_connections_refuses_the_next_connection_and_counts_it() {
    let server = TestServer::start(
        BeanstalkConfig::new(65_535),
        Connections::with_fd_limit(Some(2), None),
    );
    let mut a = server.client();
    let mut b = server.client();
    a.expect(b"list-tube-used\r\n", "USING default\r\n");
    b.expect(b"list-tube-used\r\n", "USING default\r\n");
    let mut refused = server.client();
    assert!(
        refused.is_closed_by_server(),
        "the third connection stayed open"
    );
    assert_eq!(server.metrics().rejected(RejectReason::MaxConnections), 1);
    // Those admitted are still served; a freed place admits a new one.
    a.expect(b"list-tube-used\r\n", "USING default\r\n");
    drop(b);
    server.wait_until("the closed connection leaves", |c| {
        c.active(Protocol::Beanstalk) == 1
    });
    let mut c = server.client();
    c.expect(b"use c\r\n", "USING c\r\n");
    let metrics = server.metrics();
    let beanstalk = metrics.protocol(Protocol::Beanstalk).unwrap();
    assert_eq!(beanstalk.opened_total, 3);
    assert_eq!(beanstalk.active, 2);
    assert_eq!(metrics.rejected(RejectReason::MaxConnections), 1);
}

#[test]
fn the_fd_ceiling_refuses_connections_and_the_server_keeps_answering() {
    // An fd limit a little above what the process has open, instead of
    // lowering the real limit (which other tests in this process share).
    let open = process::open_fd_count().unwrap();
    let server = TestServer::start(
        BeanstalkConfig::new(65_535),
        Connections::with_fd_limit(None, Some(open + FD_HEADROOM + HTTP_FD_RESERVE + 24)),
    );
    let mut first = server.client();
    first.expect(b"list-tube-used\r\n", "USING default\r\n");
    let mut clients = Vec::new();
    let mut refused = false;
    for _ in 0..200 {
        let mut client = server.client();
        client.send(b"list-tube-used\r\n");
        let mut reply = [0u8; 15];
        match client.stream.read_exact(&mut reply) {
            Ok(()) => clients.push(client),
            Err(_) => {
                refused = true;
                break;
            }
        }
    }
    assert!(
        refused,
        "200 connections admitted under a ceiling of about 24"
    );
    assert!(server.metrics().rejected(RejectReason::FdLimit) >= 1);
    first.expect(b"use still-here\r\n", "USING still-here\r\n");
}

#[test]
fn a_stalled_command_line_is_closed_while_idle_and_reserving_clients_survive() {
    let server = TestServer::with_timeouts(SHORT_TIMEOUT, WAIT_LIMIT);
    let mut idle = server.client();
    idle.expect(b"list-tube-used\r\n", "USING default\r\n");
    let mut reserver = server.client();
    reserver.send(b"reserve\r\n");
    server.wait_until("the reserver blocks", |c| {
        c.list().iter().any(|i| i.state == ConnState::Reserving)
    });
    let mut slow = server.client();
    slow.send(b"put 0 0 10");
    assert!(
        slow.is_closed_by_server(),
        "the slowloris client stayed open"
    );
    server.wait_closed(CloseReason::RequestTimeout, 1);
    // Several more timeouts' worth of idling harms neither of the others.
    std::thread::sleep(SHORT_TIMEOUT * 4);
    idle.expect(b"put 0 0 10 2\r\nhi\r\n", "INSERTED 1\r\n");
    reserver.expect_reply("RESERVED 1 2\r\nhi\r\n");
    assert_eq!(server.closed(CloseReason::RequestTimeout), 1);
    assert_eq!(
        server
            .metrics()
            .protocol(Protocol::Beanstalk)
            .unwrap()
            .active,
        2
    );
}

#[test]
fn a_half_sent_body_is_closed_by_the_request_timeout() {
    let server = TestServer::with_timeouts(SHORT_TIMEOUT, WAIT_LIMIT);
    let mut slow = server.client();
    slow.send(b"put 0 0 10 5\r\nhel");
    assert!(slow.is_closed_by_server(), "the half-sent body stayed open");
    server.wait_closed(CloseReason::RequestTimeout, 1);
    // The job was never inserted.
    let mut other = server.client();
    other.expect(b"peek-ready\r\n", "NOT_FOUND\r\n");
}

/// Sends `bytes` one at a time, `gap` apart, until the server closes the
/// connection; returns how many it took before it did (all of them if it
/// never did).
fn trickle_until_closed(client: &mut Client, bytes: &[u8], gap: Duration) -> usize {
    client.stream.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 256];
    for (sent, byte) in bytes.iter().enumerate() {
        match client.stream.read(&mut buf) {
            Ok(0) => return sent,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return sent,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Ok(_) => panic!("a reply to a request that was never completed"),
            Err(e) => panic!("reading: {e}"),
        }
        if client.stream.write_all(&[*byte]).is_err() {
            return sent;
        }
        std::thread::sleep(gap);
    }
    bytes.len()
}

#[test]
fn a_command_line_trickled_byte_by_byte_is_closed_after_one_timeout() {
    // A byte every quarter timeout would restart a per-byte timer forever;
    // the line's deadline runs from its first byte. The line takes 10
    // timeouts to send: it must be closed long before it is complete.
    let timeout = Duration::from_millis(500);
    let server = TestServer::with_timeouts(timeout, WAIT_LIMIT);
    let line = format!("use {}\r\n", "t".repeat(34));
    let mut slow = server.client();
    let sent = trickle_until_closed(&mut slow, line.as_bytes(), timeout / 4);
    assert!(sent < line.len(), "the trickled line was never cut off");
    slow.stream.set_nonblocking(false).unwrap();
    assert!(slow.is_closed_by_server());
    server.wait_closed(CloseReason::RequestTimeout, 1);
}

#[test]
fn a_body_trickled_below_the_minimum_rate_is_closed() {
    // 100 bytes at 8 bytes a second: their time at the minimum rate is a
    // fraction of a second, the trickle takes 12 seconds.
    let timeout = Duration::from_millis(500);
    let server = TestServer::with_timeouts(timeout, WAIT_LIMIT);
    let mut slow = server.client();
    slow.send(b"put 0 0 10 100\r\n");
    let body = [b'x'; 100];
    let sent = trickle_until_closed(&mut slow, &body, timeout / 4);
    assert!(sent < body.len(), "the trickled body was never cut off");
    slow.stream.set_nonblocking(false).unwrap();
    assert!(slow.is_closed_by_server());
    server.wait_closed(CloseReason::RequestTimeout, 1);
}

#[test]
fn a_body_arriving_slowly_above_the_minimum_rate_is_not_timed_out() {
    // Twice the minimum rate for three timeouts: longer than the timeout,
    // well within the body's allowance (the timeout plus six timeouts).
    let timeout = Duration::from_secs(1);
    let server = TestServer::with_timeouts(timeout, WAIT_LIMIT);
    let chunks = 12u32;
    let duration = timeout * 3;
    let len = (2 * REQUEST_BODY_MIN_BYTES_PER_SEC * duration.as_secs()) as usize;
    let chunk = len / chunks as usize;
    let body = vec![b'b'; chunk * chunks as usize];
    let mut slow = server.client();
    slow.send(format!("put 0 0 10 {}\r\n", body.len()).as_bytes());
    for piece in body.chunks(chunk) {
        slow.send(piece);
        std::thread::sleep(duration / chunks);
    }
    slow.expect(b"\r\n", "INSERTED 1\r\n");
    assert_eq!(server.closed(CloseReason::RequestTimeout), 0);
}

#[test]
fn a_client_that_never_reads_is_closed_by_the_write_timeout() {
    let server = TestServer::with_timeouts(WAIT_LIMIT, SHORT_TIMEOUT);
    let mut setup = server.client();
    let body = vec![b'x'; 60_000];
    setup.send(format!("put 0 0 60 {}\r\n", body.len()).as_bytes());
    setup.send(&body);
    setup.expect(b"\r\n", "INSERTED 1\r\n");
    let hog = server.client();
    let mut stream = hog.stream.try_clone().unwrap();
    stream
        .set_write_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let peeks = b"peek 1\r\n".repeat(256);
    let deadline = Instant::now() + WAIT_LIMIT;
    // Pipelines peeks of a 60 KB job without reading a reply, until the
    // server gives up on the connection.
    for _ in 0..100_000 {
        if server.closed(CloseReason::WriteTimeout) > 0 || Instant::now() >= deadline {
            break;
        }
        match stream.write(&peeks) {
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => break, // reset by the server's close
        }
    }
    server.wait_closed(CloseReason::WriteTimeout, 1);
    // The server is still serving others.
    setup.expect(b"list-tube-used\r\n", "USING default\r\n");
}

#[test]
fn close_all_closes_connections_and_their_reserved_jobs_go_back_to_ready() {
    let server = TestServer::with_timeouts(WAIT_LIMIT, WAIT_LIMIT);
    let mut worker = server.client();
    worker.expect(b"put 0 0 60 3\r\njob\r\n", "INSERTED 1\r\n");
    worker.expect(b"reserve\r\n", "RESERVED 1 3\r\njob\r\n");
    let mut waiter = server.client();
    waiter.send(b"reserve\r\n");
    let mut idle = server.client();
    idle.expect(b"list-tube-used\r\n", "USING default\r\n");
    server.wait_until("the waiter blocks", |c| {
        c.list().iter().any(|i| i.state == ConnState::Reserving)
    });
    server.connections.close_all();
    for client in [&mut worker, &mut waiter, &mut idle] {
        assert!(
            client.is_closed_by_server(),
            "a connection outlived close_all"
        );
    }
    server.wait_closed(CloseReason::Shutdown, 3);
    assert_eq!(server.connections.active(Protocol::Beanstalk), 0);
    // Connections opened after close_all are served, and see the job ready.
    let mut after = server.client();
    let deadline = Instant::now() + WAIT_LIMIT;
    loop {
        after.send(b"peek-ready\r\n");
        let line = after.line();
        if line == "FOUND 1 3\r\n" {
            after.expect_reply("job\r\n");
            break;
        }
        assert_eq!(line, "NOT_FOUND\r\n");
        assert!(
            Instant::now() < deadline,
            "the reserved job never came back"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn the_registry_lists_peer_command_and_bytes_and_counts_closes_by_reason() {
    let server = TestServer::with_timeouts(WAIT_LIMIT, WAIT_LIMIT);
    let mut client = server.client();
    client.expect(b"use jobs\r\n", "USING jobs\r\n");
    client.send(b"watch jobs\r\nreserve\r\n");
    client.expect_reply("WATCHING 2\r\n");
    server.wait_until("the client blocks in reserve", |c| {
        c.list().iter().any(|i| i.state == ConnState::Reserving)
    });
    let list = server.connections.list();
    assert_eq!(list.len(), 1);
    let info = &list[0];
    assert_eq!(info.protocol, Protocol::Beanstalk);
    assert_eq!(info.peer, client.local_addr());
    assert_eq!(info.command, Some("reserve"));
    assert!(info.session_id.is_some());
    assert_eq!(
        info.bytes_in,
        (b"use jobs\r\n".len() + b"watch jobs\r\nreserve\r\n".len()) as u64
    );
    assert_eq!(
        info.bytes_out,
        (b"USING jobs\r\n".len() + b"WATCHING 2\r\n".len()) as u64
    );
    // One closes by quitting, one by hanging up.
    let mut quitter = server.client();
    quitter.expect(b"list-tube-used\r\n", "USING default\r\n");
    quitter.send(b"quit\r\n");
    assert!(quitter.is_closed_by_server());
    drop(client);
    server.wait_until("both have ended", |c| c.active(Protocol::Beanstalk) == 0);
    let metrics = server.metrics();
    let beanstalk = metrics.protocol(Protocol::Beanstalk).unwrap();
    assert_eq!(beanstalk.opened_total, 2);
    assert_eq!(beanstalk.closed(CloseReason::Quit), 1);
    assert_eq!(beanstalk.closed(CloseReason::Client), 1);
    assert_eq!(beanstalk.duration.count(), 2);
    assert!(beanstalk.bytes_in_total >= info.bytes_in);
    assert_eq!(metrics.protocol(Protocol::Http).unwrap().opened_total, 0);
}
