//! Admission control and timeouts of a real `spool serve`: connections are
//! refused near a lowered fd limit (`ulimit -n`) while the server keeps
//! answering, `--max-connections` refuses the next beanstalkd client but
//! not probes and scrapes, and
//! `--request-timeout` closes a stalled client but not an idle one.

mod support;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::{
    clear_spool_env, drain_output, free_port, http_request, spool_bin, Addr, Client, Server,
};

/// Longest any expected event (a start, a reply, a close) may take.
const WAIT_LIMIT: Duration = Duration::from_secs(60);

/// The open file limit the server runs under: above the fds it opens for
/// itself (about 20) plus the headroom and HTTP reserve it keeps (40), low
/// enough that a test reaches it in a few dozen connections.
const LOWERED_FD_LIMIT: u32 = 128;

/// `spool serve --in-memory` started through `bash -c 'ulimit -n N; exec
/// spool ...'`, so that only the server runs under the lowered limit.
struct LimitedServer {
    child: Child,
    addr: SocketAddr,
    http: SocketAddr,
    output: Arc<Mutex<Vec<u8>>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl LimitedServer {
    fn start(fd_limit: u32) -> LimitedServer {
        let mut last_error = String::new();
        // A port picked free may be taken before the server binds it: retry.
        for _ in 0..5 {
            match LimitedServer::try_start(fd_limit) {
                Ok(server) => return server,
                Err(e) => last_error = e,
            }
        }
        panic!("could not start a server under ulimit -n {fd_limit}: {last_error}");
    }

    fn try_start(fd_limit: u32) -> Result<LimitedServer, String> {
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let http = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let mut cmd = Command::new("bash");
        clear_spool_env(&mut cmd);
        cmd.arg("-c")
            .arg(format!("ulimit -n {fd_limit} && exec \"$@\""))
            .arg("bash")
            .arg(spool_bin())
            .args(["serve", "--in-memory", "-l", "127.0.0.1", "-p"])
            .arg(addr.port().to_string())
            .arg("--http-listen")
            .arg(http.to_string())
            .env("SPOOL_LOG_LEVEL", "debug")
            .env("SPOOL_LOG_FORMAT", "text")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(|e| format!("spawning bash: {e}"))?;
        let (output, readers) = drain_output(&mut child);
        let mut server = LimitedServer {
            child,
            addr,
            http,
            output,
            readers,
        };
        let deadline = Instant::now() + WAIT_LIMIT;
        loop {
            if let Some(status) = server.child.try_wait().map_err(|e| e.to_string())? {
                return Err(format!("exited with {status}: {}", server.output_text()));
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(server);
            }
            if Instant::now() >= deadline {
                return Err(format!("not accepting after {WAIT_LIMIT:?}"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn client(&self) -> Client {
        Client::connect(&Addr::Tcp(self.addr))
    }

    fn output_text(&self) -> String {
        let kept = self.output.lock().unwrap_or_else(|e| e.into_inner());
        String::from_utf8_lossy(&kept).into_owned()
    }

    fn metrics_text(&self) -> String {
        let reply = http_request(self.http, "GET", "/metrics", &[], "");
        assert_eq!(reply.status, 200, "{}", reply.body);
        reply.body
    }
}

impl Drop for LimitedServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
    }
}

/// A raw connection that sends one command and says whether a reply came
/// (`false`: the server closed it, which is how a refusal looks).
fn served(addr: SocketAddr) -> Option<TcpStream> {
    let mut stream = TcpStream::connect_timeout(&addr, WAIT_LIMIT).ok()?;
    stream.set_read_timeout(Some(WAIT_LIMIT)).ok()?;
    stream.write_all(b"list-tube-used\r\n").ok()?;
    let mut reply = [0u8; 15];
    match stream.read_exact(&mut reply) {
        Ok(()) => {
            assert_eq!(&reply, b"USING default\r\n");
            Some(stream)
        }
        Err(e) => {
            assert!(
                matches!(
                    e.kind(),
                    ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset
                ),
                "a refused connection must be closed, not left hanging: {e}"
            );
            None
        }
    }
}

/// The value of the sample of `name` with exactly `labels` (in any order)
/// in a Prometheus exposition text.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut wanted: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    wanted.sort();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (series_name, mut have) = match series.split_once('{') {
                Some((n, rest)) => (
                    n,
                    rest.strip_suffix('}')?
                        .split(',')
                        .filter(|l| !l.is_empty())
                        .map(str::to_string)
                        .collect::<Vec<_>>(),
                ),
                None => (series, Vec::new()),
            };
            have.sort();
            (series_name == name && have == wanted).then(|| value.parse().ok())?
        })
}

#[test]
fn connections_are_refused_near_a_lowered_fd_limit_and_the_server_keeps_answering() {
    let server = LimitedServer::start(LOWERED_FD_LIMIT);
    let mut first = server.client();
    first.expect("use early\r\n", "USING early\r\n");
    let mut open = Vec::new();
    let mut refused = false;
    for _ in 0..LOWERED_FD_LIMIT * 2 {
        match served(server.addr) {
            Some(stream) => open.push(stream),
            None => {
                refused = true;
                break;
            }
        }
    }
    assert!(
        refused,
        "{} connections admitted under ulimit -n {LOWERED_FD_LIMIT}",
        open.len()
    );
    assert!(!open.is_empty(), "no connection admitted at all");
    // The existing connection is still served, and so is HTTP: beanstalkd
    // connections may not take the fds reserved for it.
    first.expect("list-tube-used\r\n", "USING early\r\n");
    let metrics = server.metrics_text();
    let rejected = sample(
        &metrics,
        "spool_connections_rejected_total",
        &[("reason", "fd_limit")],
    );
    assert!(rejected.is_some_and(|n| n >= 1.0), "{metrics}");
    // Freed places admit new connections again.
    drop(open);
    let deadline = Instant::now() + WAIT_LIMIT;
    while served(server.addr).is_none() {
        assert!(
            Instant::now() < deadline,
            "no connection admitted after closing the others"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let output = server.output_text();
    assert!(!output.contains("panicked"), "{output}");
}

#[test]
fn max_connections_refuses_beanstalkd_clients_but_not_probes_and_scrapes() {
    let server = Server::start_with(&["--max-connections", "1"]);
    let &Addr::Tcp(addr) = server.addr() else {
        panic!("a TCP server was started");
    };
    // The start-up probe's connection may still hold the one place for a
    // moment: retry (bounded) until a client is served.
    let deadline = Instant::now() + WAIT_LIMIT;
    let worker = loop {
        if let Some(stream) = served(addr) {
            break stream;
        }
        assert!(Instant::now() < deadline, "no connection ever admitted");
        std::thread::sleep(Duration::from_millis(20));
    };
    let rejected = |metrics: &str| {
        sample(
            metrics,
            "spool_connections_rejected_total",
            &[("reason", "max_connections")],
        )
        .unwrap_or(0.0)
    };
    let before = rejected(&server.http("GET", "/metrics", "").body);
    assert!(
        served(addr).is_none(),
        "a second beanstalkd client was admitted"
    );
    // The server is full of beanstalkd clients, and still answers probes
    // and scrapes.
    let livez = server.http("GET", "/livez", "");
    assert_eq!(livez.status, 200, "{}", livez.body);
    let scrape = server.http("GET", "/metrics", "");
    assert_eq!(scrape.status, 200, "{}", scrape.body);
    assert_eq!(rejected(&scrape.body), before + 1.0, "{}", scrape.body);
    assert_eq!(
        sample(
            &scrape.body,
            "spool_connections",
            &[("protocol", "beanstalk")]
        ),
        Some(1.0),
        "{}",
        scrape.body
    );
    drop(worker);
}

#[test]
fn request_timeout_closes_a_stalled_client_but_not_an_idle_one() {
    let server = Server::start_with(&["--request-timeout", "300ms"]);
    let mut idle = server.client();
    idle.expect("list-tube-used\r\n", "USING default\r\n");
    let mut slow = server.client();
    slow.send("put 0 0 10 5\r\nhe");
    slow.expect_closed();
    // The idle client has idled as long as the slow one, and longer.
    idle.expect("list-tube-used\r\n", "USING default\r\n");
    let deadline = Instant::now() + WAIT_LIMIT;
    loop {
        let metrics = server.http("GET", "/metrics", "").body;
        let closed = sample(
            &metrics,
            "spool_connections_closed_total",
            &[("protocol", "beanstalk"), ("reason", "request_timeout")],
        );
        if closed == Some(1.0) {
            break;
        }
        assert!(Instant::now() < deadline, "{metrics}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
