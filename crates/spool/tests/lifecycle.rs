//! The process's life as an operator sees it: JSON logs on stdout, health
//! probes while the log is replayed, the log level changed at runtime, and
//! SIGTERM draining the server without losing work. Every wait is bounded;
//! nothing asserts how fast anything was.

mod support;

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::{
    clear_spool_env, drain_output, free_port, http_request, spool_bin, Client, Server, TempDir,
};

/// Polls `check` every 10 ms until it returns true or `limit` passes.
fn wait_until(limit: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn logs_are_json_lines_on_stdout() {
    let mut server = Server::start_with(&["--log-level", "info"]);
    let mut c = server.client();
    c.expect("list-tube-used\r\n", "USING default\r\n");
    server.signal("TERM");
    let status = server.wait_exit(Duration::from_secs(30)).expect("exit");
    assert!(status.success(), "{status}: {}", server.output_text());
    let output = server.output_text();
    let lines: Vec<&str> = output.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.len() >= 2, "some log lines: {output}");
    for line in &lines {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
        assert!(v["level"].is_string(), "level in {line}");
        assert!(v["message"].is_string(), "message in {line}");
        assert!(v["timestamp"].is_string(), "timestamp in {line}");
    }
    assert!(
        lines
            .iter()
            .any(|l| l.contains("serving the beanstalkd protocol")),
        "{output}"
    );
}

#[test]
fn log_format_text_is_for_people() {
    let mut server = Server::start_with(&["--log-level", "info", "--log-format", "text"]);
    server.signal("TERM");
    server.wait_exit(Duration::from_secs(30)).expect("exit");
    let output = server.output_text();
    assert!(output.contains("INFO"), "{output}");
    assert!(
        output
            .lines()
            .all(|l| serde_json::from_str::<serde_json::Value>(l).is_err()),
        "{output}"
    );
}

#[test]
fn the_log_level_changes_at_runtime() {
    let server = Server::start_with(&["--log-level", "warn"]);
    // Connections come and go at debug level: nothing of that yet.
    let mut c = server.client();
    c.expect("list-tube-used\r\n", "USING default\r\n");
    drop(c);
    // The server handled the close before it answers the next request.
    server
        .client()
        .expect("list-tube-used\r\n", "USING default\r\n");
    assert!(
        !server.output_text().contains("\"DEBUG\""),
        "{}",
        server.output_text()
    );
    let reply = server.http("PUT", "/admin/log-level", "warn,spool_server=debug");
    assert_eq!(reply.status, 200, "{}", reply.body);
    let reply = server.http("GET", "/admin/log-level", "");
    assert!(reply.body.contains("spool_server=debug"), "{}", reply.body);
    let mut c = server.client();
    c.expect("list-tube-used\r\n", "USING default\r\n");
    drop(c);
    wait_until(Duration::from_secs(60), "the close logged at debug", || {
        let output = server.output_text();
        output.contains("\"DEBUG\"") && output.contains("beanstalkd connection closed")
    });
    // A directive that does not parse changes nothing.
    let reply = server.http("PUT", "/admin/log-level", "[[[");
    assert_eq!(reply.status, 400, "{}", reply.body);
    let reply = server.http("GET", "/admin/log-level", "");
    assert!(reply.body.contains("spool_server=debug"), "{}", reply.body);
}

/// Fills `dir` with `jobs` durable jobs (fsync never: only the count
/// matters here), then stops that server.
fn fill(dir: &std::path::Path, jobs: usize) {
    let mut server = Server::start_durable(dir, &["--fsync", "never"]);
    let mut c = server.client();
    let body = [b'x'; 100];
    let mut batch = Vec::new();
    let mut sent = 0;
    while sent < jobs {
        batch.clear();
        let n = (jobs - sent).min(1000);
        for _ in 0..n {
            batch.extend_from_slice(b"put 0 0 60 100\r\n");
            batch.extend_from_slice(&body);
            batch.extend_from_slice(b"\r\n");
        }
        c.send(&batch);
        for _ in 0..n {
            let line = c.line();
            assert!(line.starts_with("INSERTED"), "{line}");
        }
        sent += n;
    }
    server.signal("TERM");
    let status = server.wait_exit(Duration::from_secs(60)).expect("exit");
    assert!(status.success(), "{status}");
}

/// `spool serve -b DIR` started on fresh ports, returned as soon as its
/// HTTP port accepts, which is before the log is replayed.
struct Recovering {
    child: std::process::Child,
    output: Arc<Mutex<Vec<u8>>>,
    _readers: Vec<std::thread::JoinHandle<()>>,
    http: SocketAddr,
    beanstalk: SocketAddr,
}

impl Recovering {
    fn start(dir: &std::path::Path) -> Recovering {
        let mut last = String::new();
        // Another process may take a picked port before the server binds
        // it: the server then exits, and a new pair of ports is tried.
        for _ in 0..3 {
            let beanstalk: SocketAddr = ([127, 0, 0, 1], free_port()).into();
            let http: SocketAddr = ([127, 0, 0, 1], free_port()).into();
            let mut cmd = Command::new(spool_bin());
            clear_spool_env(&mut cmd);
            cmd.args(["serve", "-b", dir.to_str().expect("utf-8")])
                .args(["-l", "127.0.0.1", "-p", &beanstalk.port().to_string()])
                .args(["--http-listen", &http.to_string()])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            let mut child = cmd.spawn().expect("spawning");
            let (output, readers) = drain_output(&mut child);
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if let Ok(Some(status)) = child.try_wait() {
                    last = format!(
                        "exited {status}: {}",
                        String::from_utf8_lossy(&output.lock().expect("lock"))
                    );
                    break;
                }
                if TcpStream::connect_timeout(&http, Duration::from_millis(100)).is_ok() {
                    return Recovering {
                        child,
                        output,
                        _readers: readers,
                        http,
                        beanstalk,
                    };
                }
                assert!(Instant::now() < deadline, "the HTTP port never opened");
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        panic!("could not start the server: {last}");
    }

    fn output_text(&self) -> String {
        String::from_utf8_lossy(&self.output.lock().expect("lock")).into_owned()
    }
}

impl Drop for Recovering {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn probes_answer_while_the_log_is_replayed() {
    let dir = TempDir::new("probe-recovery");
    // Enough jobs that replay takes a while even in a release build.
    fill(dir.path(), 300_000);
    let mut server = Recovering::start(dir.path());
    let http = server.http;
    let mut seen_recovering = false;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        assert!(Instant::now() < deadline, "never became ready");
        if let Ok(Some(status)) = server.child.try_wait() {
            panic!("exited {status}: {}", server.output_text());
        }
        // The probes answer from the moment the HTTP port opens, long
        // before replay ends and the beanstalkd port opens.
        let live = http_request(http, "GET", "/livez", &[], "");
        assert_eq!(live.status, 200, "livez: {}", live.body);
        let health = http_request(http, "GET", "/healthz", &[], "");
        assert_eq!(health.status, 200, "healthz: {}", health.body);
        let ready = http_request(http, "GET", "/readyz", &[], "");
        if ready.status == 503 {
            assert!(ready.body.contains("recovering"), "{}", ready.body);
            seen_recovering = true;
        } else {
            assert_eq!(ready.status, 200, "{}", ready.body);
            break;
        }
    }
    assert!(
        seen_recovering,
        "the probes never answered during replay (is 300k jobs too few here?)"
    );
    let mut c = Client::connect(&support::Addr::Tcp(server.beanstalk));
    assert_eq!(c.stats_map("stats\r\n")["current-jobs-ready"], "300000");
}

#[test]
fn sigterm_during_replay_stops_the_server_at_once() {
    let dir = TempDir::new("term-recovery");
    fill(dir.path(), 300_000);
    let mut server = Recovering::start(dir.path());
    let ready = http_request(server.http, "GET", "/readyz", &[], "");
    assert_eq!(ready.status, 503, "still replaying: {}", ready.body);
    let status = Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status()
        .expect("running kill");
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = server.child.try_wait().expect("try_wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "still running after SIGTERM");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(status.success(), "{status}: {}", server.output_text());
    let output = server.output_text();
    assert!(output.contains("stopped during log replay"), "{output}");
    assert!(
        !output.contains("serving the beanstalkd protocol"),
        "{output}"
    );
    drop(server);
    // Nothing was lost by stopping mid-replay.
    let server = Server::start_durable(dir.path(), &[]);
    let mut c = server.client();
    assert_eq!(c.stats_map("stats\r\n")["current-jobs-ready"], "300000");
}

/// A client that puts jobs one at a time until told to stop or the server
/// refuses or goes away, recording every id the server acknowledged.
/// Returns whether it saw `DRAINING`.
fn producer(addr: SocketAddr, stop: Arc<AtomicBool>, acked: Arc<Mutex<Vec<u64>>>) -> bool {
    let Ok(stream) = TcpStream::connect_timeout(&addr, Duration::from_secs(5)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut writer = match stream.try_clone() {
        Ok(w) => w,
        Err(_) => return false,
    };
    let mut reader = BufReader::new(stream);
    for n in 0..200_000u64 {
        if stop.load(Ordering::Relaxed) {
            return false;
        }
        let body = format!("job-{n}");
        if writer
            .write_all(format!("put 0 0 60 {}\r\n{body}\r\n", body.len()).as_bytes())
            .is_err()
        {
            return false;
        }
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return false,
            Ok(_) => {}
        }
        if let Some(id) = line.strip_prefix("INSERTED ") {
            acked
                .lock()
                .expect("lock")
                .push(id.trim().parse().expect("id"));
        } else {
            return line.starts_with("DRAINING");
        }
    }
    false
}

#[test]
fn sigterm_drains_without_losing_work() {
    let dir = TempDir::new("sigterm");
    let mut server = Server::start_durable(dir.path(), &["--shutdown-grace", "20s"]);
    let support::Addr::Tcp(addr) = server.addr().clone() else {
        unreachable!("a TCP server")
    };

    // A worker holds a job across the SIGTERM and finishes it afterwards.
    let mut setup = server.client();
    let held_id = setup.put(0, 0, 120, b"held");
    let mut worker = server.client();
    let (reserved, _) = worker.reserve_now();
    assert_eq!(reserved, held_id);
    // A second worker is blocked in reserve on an empty tube.
    let mut waiter = server.client();
    waiter.send("watch idle\r\nignore default\r\n");
    assert_eq!(waiter.line(), "WATCHING 2");
    assert_eq!(waiter.line(), "WATCHING 1");
    waiter.send("reserve\r\n");

    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Vec::new()));
    let producers: Vec<_> = (0..4)
        .map(|_| {
            let (stop, acked) = (stop.clone(), acked.clone());
            std::thread::spawn(move || producer(addr, stop, acked))
        })
        .collect();
    wait_until(Duration::from_secs(30), "some puts", || {
        acked.lock().unwrap().len() >= 200
    });

    server.signal("TERM");
    // The blocked reserve is answered rather than left hanging.
    assert_eq!(waiter.line(), "TIMED_OUT");
    // Readiness turns false while the held job keeps the process up.
    wait_until(Duration::from_secs(10), "readyz 503", || {
        server.http("GET", "/readyz", "").status == 503
    });
    assert_eq!(server.http("GET", "/livez", "").status, 200);
    // New puts are refused (idle connections are closed; the worker's
    // stays open while it holds a job); producers stop on DRAINING or close.
    worker.expect("put 0 0 60 4\r\nlate\r\n", "DRAINING\r\n");
    stop.store(true, Ordering::Relaxed);
    for p in producers {
        let _ = p.join();
    }
    // The idle connections the server closed are counted as shut down.
    wait_until(
        Duration::from_secs(10),
        "closes counted as shutdown",
        || {
            let metrics = server.http("GET", "/metrics", "").body;
            metrics.lines().any(|l| {
                l.starts_with(
                    "spool_connections_closed_total{protocol=\"beanstalk\",reason=\"shutdown\"}",
                ) && !l.ends_with(" 0")
            })
        },
    );
    // The worker finishes its job after the signal.
    worker.expect(format!("delete {held_id}\r\n"), "DELETED\r\n");
    let status = server
        .wait_exit(Duration::from_secs(30))
        .expect("exit after the last reservation finished");
    assert!(status.success(), "{status}: {}", server.output_text());
    drop(server);

    // Every acknowledged put is there exactly once; the deleted job is gone.
    let server = Server::start_durable(dir.path(), &[]);
    let mut c = server.client();
    let acked: HashSet<u64> = acked.lock().unwrap().iter().copied().collect();
    let stats = c.stats_map("stats\r\n");
    assert_eq!(
        stats["current-jobs-ready"],
        acked.len().to_string(),
        "jobs after restart"
    );
    for id in &acked {
        c.send(format!("peek {id}\r\n"));
        let reply = c.reply();
        assert!(reply.starts_with("FOUND"), "job {id}: {reply}");
    }
    c.expect(format!("peek {held_id}\r\n"), "NOT_FOUND\r\n");
}

#[test]
fn the_grace_period_releases_unfinished_reservations() {
    let dir = TempDir::new("grace");
    let mut server = Server::start_durable(dir.path(), &["--shutdown-grace", "1s"]);
    let mut c = server.client();
    let id = c.put(0, 0, 300, b"slow");
    let mut worker = server.client();
    assert_eq!(worker.reserve_now().0, id);
    server.signal("TERM");
    let status = server
        .wait_exit(Duration::from_secs(30))
        .expect("exit after the grace period");
    assert!(status.success(), "{status}: {}", server.output_text());
    drop(server);
    let server = Server::start_durable(dir.path(), &[]);
    let mut c = server.client();
    c.expect("peek-ready\r\n", &format!("FOUND {id} 4\r\nslow\r\n"));
}
