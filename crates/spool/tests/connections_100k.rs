//! One `spool serve` holding 100,000 idle beanstalkd connections (issue 14).
//!
//! The 100,000 test is `#[ignore]`d: it cannot run where the open-file limit
//! cannot be raised past 20,000 (this project's machines, where root lacks
//! `CAP_SYS_RESOURCE`), and there it would fail, saying so. The same checks
//! run in the test command at 16,000 connections, under the limit.
//!
//! The test raises what it needs as root: the open-file limit of its own
//! process (the server, its child, inherits it), and `fs.nr_open` and
//! `fs.file-max` where they are below that. Clients are spread over
//! loopback source addresses 127.0.0.2 and up (127.0.0.1 is left to other
//! tests), as many connections on each as the ephemeral port range allows,
//! so the port range itself need not change. While they connect, a prober
//! checks that `/livez`, `/metrics` and a client connected before them keep
//! answering: every connector stops at each checkpoint until the prober
//! has completed a round after it, so rounds interleave with the connects
//! by construction, not by timing. Nothing is timed: the latency of
//! `/livez` during the burst is measured by `scripts/bench-connections.sh`
//! (`CONNECTIONS=100000`). Every wait is bounded; a limit it cannot raise
//! fails the test with what to do, never skips it.

mod support;

use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use socket2::{Domain, Socket, Type};
use support::{Addr, Client, Server};

/// Idle connections the server must hold in the 100k test.
const CONNECTIONS_DEFAULT: usize = 100_000;

/// Idle connections of the test that runs in the test command: as many as
/// fit under the open-file limit of a machine that cannot raise it (this
/// project's development and CI machines: hard limit 20,000, no
/// `CAP_SYS_RESOURCE`), with room for the test's own sockets.
const CONNECTIONS_IN_SUITE: usize = 16_000;

/// Connections per connector thread between two probe rounds.
const CHECKPOINT_EVERY: usize = 5_000;

/// Fds each process gets beyond one per connection: the server's own
/// files, the admission headroom it keeps, the test's probes.
const FDS_BESIDE_CONNECTIONS: u64 = 1_000;

/// Ephemeral ports of one source address left unused, for anything else
/// on the machine connecting from it.
const PORTS_SPARE_PER_ADDRESS: usize = 2_000;

/// Longest the connecting may take in all: the test fails past it rather
/// than run on. 18,000 took 28-80 s with a debug server at load 5 on 2
/// cores, so 100,000 should take 2.5-7.5 minutes.
const CONNECTING_TIME_LIMIT: Duration = Duration::from_secs(900);

/// Longest any single expected event may take (a connect, a reply, the
/// server counting its connections) before the test fails.
const WAIT_LIMIT: Duration = Duration::from_secs(60);

/// [`CONNECTIONS_DEFAULT`], or `SPOOL_TEST_CONNECTIONS` to try the same
/// checks at another scale (e.g. on a machine where the limit cannot be
/// raised, to see that the rest works); the count is printed either way.
fn connections() -> usize {
    match std::env::var("SPOOL_TEST_CONNECTIONS") {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("SPOOL_TEST_CONNECTIONS={v:?}: expected a count")),
        Err(_) => CONNECTIONS_DEFAULT,
    }
}

#[test]
fn one_server_holds_16k_idle_connections_and_keeps_answering() {
    holds_idle_connections_and_keeps_answering(CONNECTIONS_IN_SUITE);
}

#[test]
#[ignore = "needs CAP_SYS_RESOURCE to raise the open-file limit past 100,000 (the project's \
            machines stop at 20,000) and minutes of connecting: run it where it can with \
            `cargo test -p spool --test connections_100k -- --ignored`"]
fn one_server_holds_100k_idle_connections_and_keeps_answering() {
    holds_idle_connections_and_keeps_answering(connections());
}

fn holds_idle_connections_and_keeps_answering(connections: usize) {
    raise_limits(connections as u64 + FDS_BESIDE_CONNECTIONS, connections);
    let mut server = Server::start();
    let Addr::Tcp(addr) = server.addr().clone() else {
        panic!("the server listens on TCP");
    };
    let rss_before = server.rss_bytes();

    let per_address = connections_per_source_address();
    let addresses = connections.div_ceil(per_address);
    eprintln!("{connections} connections from {addresses} source addresses, {per_address} each");

    let probe = Arc::new(Probe::default());
    let done = Arc::new(AtomicBool::new(false));
    let prober = {
        let probe = probe.clone();
        let done = done.clone();
        let http = server.http_addr();
        let mut client = Client::connect(&Addr::Tcp(addr));
        std::thread::spawn(move || {
            // Connectors waiting for a round stop waiting if this thread
            // fails, so that its panic is the one reported.
            let _stop = StopOnExit(probe.clone());
            let mut answers = ProbeAnswers::default();
            while !done.load(Ordering::Acquire) {
                answers = probe_round(http, &mut client);
                probe.completed_round();
            }
            (client, answers)
        })
    };

    let connectors: Vec<_> = (0..addresses)
        .map(|i| {
            let count = per_address.min(connections - i * per_address);
            let source = Ipv4Addr::new(127, 0, 0, u8::try_from(2 + i).expect("few addresses"));
            let probe = probe.clone();
            let deadline = Instant::now() + CONNECTING_TIME_LIMIT;
            std::thread::spawn(move || connect_many(addr, source, count, &probe, deadline))
        })
        .collect();
    let mut held: Vec<TcpStream> = Vec::with_capacity(connections);
    let mut connect_failed = false;
    for connector in connectors {
        match connector.join() {
            Ok(streams) => held.extend(streams),
            Err(_) => connect_failed = true,
        }
    }
    done.store(true, Ordering::Release);
    let (mut client, last) = match prober.join() {
        Ok(prober) => prober,
        Err(_) => panic!("a probe round failed while the clients connected (its message is above)"),
    };
    assert!(!connect_failed, "a connector failed (its message is above)");
    assert_eq!(held.len(), connections);
    // Each checkpoint of a connector waited for a round of its own.
    let checkpoints = (per_address.min(connections) - 1) / CHECKPOINT_EVERY;
    assert!(
        probe.rounds() >= checkpoints as u64,
        "{} probe rounds for {checkpoints} checkpoints",
        probe.rounds()
    );

    // The server accepts asynchronously: wait (bounded) until it counts
    // every connection, the prober's client included.
    let deadline = Instant::now() + WAIT_LIMIT;
    let counted = loop {
        let counted = current_connections(&mut client);
        if counted > connections as u64 || Instant::now() >= deadline {
            break counted;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        counted > connections as u64,
        "the server counts {counted} connections, not all {connections} (after {WAIT_LIMIT:?})"
    );
    server.assert_alive();

    // Everything still answers with all of them held.
    let answers = probe_round(server.http_addr(), &mut client);
    assert!(
        answers.beanstalk_connections > connections as u64,
        "/metrics shows {} beanstalkd connections (before the last round: {})",
        answers.beanstalk_connections,
        last.beanstalk_connections
    );
    let rss_after = server.rss_bytes();
    eprintln!(
        "server RSS {rss_before} -> {rss_after} bytes: {} bytes per idle connection",
        (rss_after.saturating_sub(rss_before)) / connections as u64
    );

    // The held connections are alive: none was closed by the server.
    for stream in held.iter().step_by(997) {
        stream
            .set_nonblocking(true)
            .expect("setting a held stream non-blocking");
        let mut byte = [0u8; 1];
        match (&*stream).read(&mut byte) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            other => panic!("a held connection was closed or sent bytes: {other:?}"),
        }
    }
    drop(held);
    server.assert_alive();
}

/// Raises this process's open-file limit to `fd_limit` (its children
/// inherit it), first raising `fs.nr_open` and `fs.file-max` if they are
/// too low. Fails, saying what is missing, where it cannot.
fn raise_limits(fd_limit: u64, connections: usize) {
    let nr_open = read_sysctl("fs/nr_open");
    if nr_open < fd_limit {
        write_sysctl("fs/nr_open", fd_limit);
    }
    // The server and the clients each hold one fd per connection.
    let in_use: u64 = std::fs::read_to_string("/proc/sys/fs/file-nr")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .expect("reading /proc/sys/fs/file-nr");
    let file_max_needed = in_use + 2 * fd_limit;
    if read_sysctl("fs/file-max") < file_max_needed {
        write_sysctl("fs/file-max", file_max_needed);
    }
    let (soft, hard) = nofile_limits();
    if soft >= fd_limit && hard >= fd_limit {
        return;
    }
    let pid = std::process::id().to_string();
    let limit = format!("--nofile={fd_limit}:{fd_limit}");
    let output = std::process::Command::new("prlimit")
        .args(["--pid", &pid, &limit])
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run prlimit (util-linux) to raise the open-file limit: {e}")
        });
    let (soft, hard) = nofile_limits();
    assert!(
        output.status.success() && soft >= fd_limit && hard >= fd_limit,
        "cannot raise the open-file limit to {fd_limit} (now {soft} soft, {hard} hard): \
         this test holds {connections} connections and must run as root (or with \
         CAP_SYS_RESOURCE); prlimit said: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn read_sysctl(name: &str) -> u64 {
    let path = format!("/proc/sys/{name}");
    std::fs::read_to_string(&path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| panic!("cannot read {path}"))
}

fn write_sysctl(name: &str, value: u64) {
    let path = format!("/proc/sys/{name}");
    std::fs::write(&path, value.to_string()).unwrap_or_else(|e| {
        panic!("{path} is too low and cannot be raised to {value} (run as root): {e}")
    });
}

/// (soft, hard) open-file limits of this process, from /proc/self/limits.
fn nofile_limits() -> (u64, u64) {
    let limits = std::fs::read_to_string("/proc/self/limits").expect("reading /proc/self/limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("Max open files in /proc/self/limits");
    let values: Vec<u64> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    match values.as_slice() {
        [soft, hard, ..] => (*soft, *hard),
        _ => panic!("cannot parse {line:?}"),
    }
}

/// How many connections one source address can open: the ephemeral port
/// range (a connection from a bound address takes a port of that address)
/// less a margin.
fn connections_per_source_address() -> usize {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .expect("reading net.ipv4.ip_local_port_range");
    let bounds: Vec<usize> = range
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    let ports = match bounds.as_slice() {
        [low, high] if high > low => high - low + 1,
        _ => panic!("cannot parse net.ipv4.ip_local_port_range {range:?}"),
    };
    assert!(
        ports > 2 * PORTS_SPARE_PER_ADDRESS,
        "net.ipv4.ip_local_port_range has {ports} ports; widen it (sysctl -w \
         net.ipv4.ip_local_port_range='1024 65535')"
    );
    ports - PORTS_SPARE_PER_ADDRESS
}

/// Opens `count` connections from `source` to `addr`, waiting at every
/// [`CHECKPOINT_EVERY`] for a probe round to complete.
fn connect_many(
    addr: SocketAddr,
    source: Ipv4Addr,
    count: usize,
    probe: &Probe,
    deadline: Instant,
) -> Vec<TcpStream> {
    let mut held = Vec::with_capacity(count);
    let bind_to = SocketAddr::V4(SocketAddrV4::new(source, 0));
    for i in 0..count {
        assert!(
            Instant::now() < deadline,
            "{i} of {count} connections from {source} after {CONNECTING_TIME_LIMIT:?}"
        );
        if i > 0 && i % CHECKPOINT_EVERY == 0 {
            probe.wait_for_next_round();
        }
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None).expect("creating a socket");
        // Closing resets the connection instead of leaving the port in
        // TIME_WAIT, so a rerun finds the source ports free.
        socket
            .set_linger(Some(Duration::ZERO))
            .expect("setting SO_LINGER");
        socket
            .bind(&bind_to.into())
            .unwrap_or_else(|e| panic!("binding {bind_to} for connection {i}: {e}"));
        socket
            .connect_timeout(&addr.into(), WAIT_LIMIT)
            .unwrap_or_else(|e| panic!("connection {i} from {source} to {addr}: {e}"));
        held.push(TcpStream::from(socket));
    }
    held
}

/// Probe rounds completed, for connectors to wait on.
#[derive(Default)]
struct Probe {
    /// Rounds completed, and whether the prober has stopped.
    rounds: Mutex<(u64, bool)>,
    changed: Condvar,
}

/// Marks the prober stopped when its thread ends, by panic included.
struct StopOnExit(Arc<Probe>);

impl Drop for StopOnExit {
    fn drop(&mut self) {
        self.0.rounds.lock().unwrap_or_else(|e| e.into_inner()).1 = true;
        self.0.changed.notify_all();
    }
}

impl Probe {
    fn completed_round(&self) {
        self.rounds.lock().unwrap_or_else(|e| e.into_inner()).0 += 1;
        self.changed.notify_all();
    }

    fn rounds(&self) -> u64 {
        self.rounds.lock().unwrap_or_else(|e| e.into_inner()).0
    }

    /// Returns once a round that started after this call has completed.
    fn wait_for_next_round(&self) {
        let rounds = self.rounds.lock().unwrap_or_else(|e| e.into_inner());
        // A round in progress may have started before the call: wait for
        // the one after it.
        let target = rounds.0 + 2;
        let (rounds, timeout) = self
            .changed
            .wait_timeout_while(rounds, WAIT_LIMIT, |(r, stopped)| *r < target && !*stopped)
            .unwrap_or_else(|e| e.into_inner());
        assert!(!rounds.1, "the prober stopped");
        assert!(
            !timeout.timed_out(),
            "no probe round completed within {WAIT_LIMIT:?} (at {} rounds)",
            rounds.0
        );
    }
}

#[derive(Debug, Default)]
struct ProbeAnswers {
    /// `spool_connections{protocol="beanstalk"}` from `/metrics`.
    beanstalk_connections: u64,
}

/// One round: `/livez`, `/metrics`, and a put, reserve and delete on the
/// established client. Panics (failing the test) if any does not answer
/// as it should.
fn probe_round(http: SocketAddr, client: &mut Client) -> ProbeAnswers {
    let livez = support::http_request(http, "GET", "/livez", &[], "");
    assert_eq!(livez.status, 200, "/livez: {}", livez.body);
    let metrics = support::http_request(http, "GET", "/metrics", &[], "");
    assert_eq!(metrics.status, 200, "/metrics: {}", metrics.body);
    let beanstalk_connections = metrics
        .body
        .lines()
        .find_map(|l| l.strip_prefix("spool_connections{protocol=\"beanstalk\"} "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or_else(|| panic!("/metrics has no spool_connections{{protocol=\"beanstalk\"}}"))
        as u64;

    client.send("put 0 0 60 5\r\nprobe\r\n");
    let inserted = reply_line(client);
    let id = inserted
        .strip_prefix("INSERTED ")
        .unwrap_or_else(|| panic!("put answered {inserted:?}"))
        .to_string();
    client.send("reserve-with-timeout 0\r\n");
    let reserved = reply_line(client);
    assert_eq!(reserved, format!("RESERVED {id} 5\r\nprobe"), "reserve");
    client.send(format!("delete {id}\r\n"));
    assert_eq!(reply_line(client), "DELETED", "delete");
    ProbeAnswers {
        beanstalk_connections,
    }
}

/// One whole reply (line and body) without its last `\r\n`, waiting up to
/// [`WAIT_LIMIT`].
fn reply_line(client: &mut Client) -> String {
    let reply = client
        .reply_bytes_within(WAIT_LIMIT)
        .unwrap_or_else(|| panic!("no reply within {WAIT_LIMIT:?}"));
    let text = String::from_utf8(reply).expect("a reply in UTF-8");
    text.strip_suffix("\r\n").unwrap_or(&text).to_string()
}

/// `current-connections` from `stats`.
fn current_connections(client: &mut Client) -> u64 {
    client.send("stats\r\n");
    let reply = reply_line(client);
    reply
        .lines()
        .find_map(|l| l.strip_prefix("current-connections: "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("stats has no current-connections: {reply}"))
}
