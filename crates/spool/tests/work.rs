//! `spool work -- CMD` against a real server: commands that succeed, fail,
//! crash, hang past `--timeout` (and ignore SIGTERM), get cancelled, and a
//! SIGTERM to `spool work` in the middle of jobs. Outcomes are asserted
//! (job states, errors, which processes are left), never durations; every
//! wait is bounded.

mod support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::{clear_spool_env, wait_output, Server, TempDir};

/// Bound on any one wait of a test.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(20);

/// `spool work --http ADDR ARGS -- sh -c SCRIPT` with `DIR` in its
/// environment (the scripts leave files there).
fn start_work(server: &Server, dir: &Path, args: &[&str], script: &str) -> Child {
    let mut cmd = Command::new(support::spool_bin());
    clear_spool_env(&mut cmd);
    cmd.arg("work")
        .args(["--http", &server.http_addr().to_string()])
        .args(args)
        .args(["--", "sh", "-c", script])
        .env("DIR", dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd.spawn().expect("spawning spool work")
}

fn signal(child: &Child, signal: &str) {
    let status = Command::new("kill")
        .args([&format!("-{signal}"), &child.id().to_string()])
        .status()
        .expect("running kill");
    assert!(status.success(), "kill -{signal} failed");
}

fn enqueue(server: &Server, queue: &str, body: Value) -> u64 {
    let reply = server.http(
        "POST",
        &format!("/v1/queues/{queue}/jobs"),
        &body.to_string(),
    );
    assert_eq!(reply.status, 201, "{}", reply.body);
    reply.json()["id"].as_u64().expect("an id")
}

/// The job once it is completed, cancelled or buried.
fn settled(server: &Server, id: u64) -> Value {
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    loop {
        let reply = server.http("GET", &format!("/v1/jobs/{id}?wait_ms=2000"), "");
        assert_eq!(reply.status, 200, "{}", reply.body);
        let job = reply.json();
        if matches!(
            job["state"].as_str(),
            Some("completed" | "cancelled" | "buried")
        ) {
            return job;
        }
        assert!(Instant::now() < deadline, "job {id} never settled: {job}");
    }
}

fn wait_for_file(path: &Path) -> String {
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            if text.ends_with('\n') {
                return text.trim().to_string();
            }
        }
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether the process is gone (or a zombie nobody reaps: dead all the same).
fn process_gone(pid: &str) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
    }
}

fn wait_gone(pid: &str) {
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    while !process_gone(pid) {
        assert!(Instant::now() < deadline, "process {pid} is still running");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// SIGTERM, then the exit status and stderr; exit 0 is asserted.
fn stop(child: Child) -> String {
    signal(&child, "TERM");
    let out = wait_output(child, SETTLE_TIMEOUT);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "spool work: {:?}: {stderr}",
        out.status
    );
    stderr
}

#[test]
fn commands_that_succeed_fail_and_crash() {
    let server = Server::start();
    let dir = TempDir::new("work-outcomes");
    let script = r#"p=$(cat)
case "$p" in
  '"ok"') printf '{"id":%s,"attempt":%s,"queue":"%s"}\n' "$SPOOL_JOB_ID" "$SPOOL_ATTEMPT" "$SPOOL_QUEUE" ;;
  '"bytes"') printf 'plain text' ;;
  '"fail"') echo "noise" >&2; echo "the disk is on fire" >&2; exit 3 ;;
  '"crash"') kill -9 $$ ;;
esac"#;
    let work = start_work(
        &server,
        dir.path(),
        &["-q", "w", "--concurrency", "3"],
        script,
    );
    let ids: Vec<u64> = ["ok", "bytes", "fail", "crash"]
        .iter()
        .map(|p| enqueue(&server, "w", json!({"payload": p, "max_attempts": 1})))
        .collect();
    let jobs: Vec<Value> = ids.iter().map(|&id| settled(&server, id)).collect();

    assert_eq!(jobs[0]["state"], "completed", "{}", jobs[0]);
    assert_eq!(
        jobs[0]["result"],
        json!({"id": ids[0], "attempt": 1, "queue": "w"})
    );
    assert_eq!(jobs[1]["state"], "completed", "{}", jobs[1]);
    assert_eq!(jobs[1]["result_base64"], "cGxhaW4gdGV4dA==");
    assert_eq!(jobs[2]["state"], "buried", "{}", jobs[2]);
    assert_eq!(
        jobs[2]["last_error"],
        "exit status 3: noise\nthe disk is on fire"
    );
    assert_eq!(jobs[3]["state"], "buried", "{}", jobs[3]);
    assert_eq!(jobs[3]["last_error"], "killed by signal 9");

    let stderr = stop(work);
    assert!(stderr.contains("2 completed, 2 failed"), "{stderr}");
}

#[test]
fn a_command_past_its_timeout_is_stopped_with_its_children_even_ignoring_sigterm() {
    let server = Server::start();
    let dir = TempDir::new("work-timeout");
    // Ignores SIGTERM (and so does its child): only SIGKILL to the group
    // ends them.
    let script = r#"trap '' TERM
sleep 600 &
echo $! > "$DIR/child"
echo $$ > "$DIR/leader"
wait"#;
    let work = start_work(
        &server,
        dir.path(),
        &["-q", "t", "--timeout", "300ms", "--kill-grace", "200ms"],
        script,
    );
    let id = enqueue(&server, "t", json!({"payload": 1, "max_attempts": 1}));
    let child = wait_for_file(&dir.path().join("child"));
    let leader = wait_for_file(&dir.path().join("leader"));
    let job = settled(&server, id);
    assert_eq!(job["state"], "buried", "{job}");
    let error = job["last_error"].as_str().unwrap_or_default();
    assert!(error.contains("timed out"), "{error}");
    wait_gone(&child);
    wait_gone(&leader);
    let stderr = stop(work);
    assert!(stderr.contains("1 timed out"), "{stderr}");
}

#[test]
fn a_cancelled_jobs_command_gets_sigterm() {
    let server = Server::start();
    let dir = TempDir::new("work-cancel");
    let script = r#"trap 'echo term > "$DIR/term"; exit 0' TERM
echo $$ > "$DIR/started"
while true; do sleep 0.05; done"#;
    // The cancel is seen at the next heartbeat.
    let work = start_work(
        &server,
        dir.path(),
        &["-q", "c", "--heartbeat", "100ms"],
        script,
    );
    let id = enqueue(&server, "c", json!({"payload": 1}));
    let leader = wait_for_file(&dir.path().join("started"));
    let reply = server.http("POST", &format!("/v1/jobs/{id}/cancel"), "");
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(wait_for_file(&dir.path().join("term")), "term");
    wait_gone(&leader);
    assert_eq!(settled(&server, id)["state"], "cancelled");
    let stderr = stop(work);
    assert!(stderr.contains("1 cancelled"), "{stderr}");
}

#[test]
fn sigterm_drains_finishing_what_it_can_and_releasing_the_rest() {
    let server = Server::start();
    let dir = TempDir::new("work-drain");
    let script = r#"p=$(cat)
echo $$ > "$DIR/started-$p"
if [ "$p" = '"hang"' ]; then sleep 600; fi
sleep 0.3
echo '"done"'"#;
    let work = start_work(
        &server,
        dir.path(),
        &[
            "-q",
            "d",
            "--concurrency",
            "2",
            "--shutdown-grace",
            "2s",
            "--kill-grace",
            "200ms",
        ],
        script,
    );
    let quick = enqueue(&server, "d", json!({"payload": "quick"}));
    let hang = enqueue(&server, "d", json!({"payload": "hang"}));
    wait_for_file(&dir.path().join("started-\"quick\""));
    let hanging = wait_for_file(&dir.path().join("started-\"hang\""));
    let stderr = stop(work);

    assert!(stderr.contains("1 completed"), "{stderr}");
    assert!(stderr.contains("1 released"), "{stderr}");
    assert_eq!(settled(&server, quick)["result"], "done");
    // Handed back unfinished, not counted as an attempt.
    let reply = server.http("GET", &format!("/v1/jobs/{hang}"), "");
    let job = reply.json();
    assert_eq!(job["state"], "ready", "{job}");
    assert_eq!(job["attempts"], 0, "{job}");
    wait_gone(&hanging);
}

#[test]
fn work_without_a_command_or_queue_is_a_usage_error() {
    let out = support::run_spool(&["work", "-q", "x"], &[]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let out = support::run_spool(&["work", "--", "true"], &[]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let out = support::run_spool(
        &["work", "-q", "x", "--concurrency", "0", "--", "true"],
        &[],
    );
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

#[test]
fn a_second_sigterm_ends_the_grace_at_once() {
    use std::io::BufRead;

    let server = Server::start();
    let dir = TempDir::new("work-second-term");
    let script = r#"echo $$ > "$DIR/started"
sleep 600"#;
    let mut work = start_work(
        &server,
        dir.path(),
        &["-q", "s", "--shutdown-grace", "1h", "--kill-grace", "200ms"],
        script,
    );
    let id = enqueue(&server, "s", json!({"payload": 1}));
    let leader = wait_for_file(&dir.path().join("started"));
    let stderr = work.stderr.take().expect("stderr");
    let (lines_tx, lines) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    signal(&work, "TERM");
    // The second signal only after the first was taken: two at once may
    // arrive as one.
    loop {
        let line = lines
            .recv_timeout(SETTLE_TIMEOUT)
            .expect("spool work says it drains");
        if line.contains("draining") {
            break;
        }
    }
    signal(&work, "TERM");
    let out = wait_output(work, SETTLE_TIMEOUT);
    assert!(out.status.success(), "{:?}", out.status);
    let rest: Vec<String> = lines.iter().collect();
    reader.join().expect("reader");
    assert!(rest.iter().any(|l| l.contains("1 released")), "{rest:?}");
    wait_gone(&leader);
    let job = server.http("GET", &format!("/v1/jobs/{id}"), "").json();
    assert_eq!(job["state"], "ready", "{job}");
}
