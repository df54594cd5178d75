//! Crash test of schedules: `kill -9` the durable server while `@every 1s`
//! and per-second cron schedules fire, leave it down for a moment (so
//! instants fall due while nothing runs), restart it on the same data
//! directory, and check that no instant was fired twice or lost:
//! - with `misfire: all` (and a catch-up bound above the downtime) the
//!   fired instants are every second from the first to the last, each
//!   once;
//! - under every policy no instant has two jobs, every job carries the key
//!   `schedule:<name>:<due ms>` and the `spool-scheduled-at` header of the
//!   same instant, and the schedule's `fires` equals its jobs: a firing's
//!   jobs and the schedule's new state are committed together.
//!
//! Real time passes here (the server is a real process), but nothing is
//! asserted about how long anything took: waits are bounded loops.

mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::{Server, TempDir};

/// Kill/restart rounds.
const ROUNDS: usize = 3;
/// Bound on waiting for the server to settle or a schedule to fire.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the server stays down per round: instants fall due meanwhile.
const DOWNTIME: Duration = Duration::from_millis(1_500);
/// (name, cron, misfire): each fires into its own queue of that name.
const SCHEDULES: [(&str, &str, &str); 4] = [
    ("cs-every-all", "@every 1s", "all"),
    ("cs-cron-all", "* * * * * *", "all"),
    ("cs-once", "@every 1s", "once"),
    ("cs-skip", "@every 1s", "skip"),
];

fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn start(dir: &TempDir, round: usize) -> Server {
    // A SIGKILL loses nothing that reached the OS: both policies must keep
    // every acknowledged firing.
    let fsync = if round.is_multiple_of(2) {
        "always"
    } else {
        "never"
    };
    let server = Server::start_durable(dir.path(), &["--fsync", fsync]);
    wait_until("/readyz to answer 200", || {
        server.http("GET", "/readyz", "").status == 200
    });
    server
}

fn fires(server: &Server, name: &str) -> u64 {
    let reply = server.http("GET", &format!("/v1/schedules/{name}"), "");
    assert_eq!(reply.status, 200, "{}", reply.body);
    reply.json()["fires"].as_u64().expect("fires")
}

/// Every job of the queue (they stay ready: nobody works them).
fn jobs(server: &Server, queue: &str) -> Vec<Value> {
    let mut out = Vec::new();
    let mut after = String::new();
    loop {
        let reply = server.http(
            "GET",
            &format!("/v1/queues/{queue}/jobs?state=ready&limit=1000{after}"),
            "",
        );
        assert_eq!(reply.status, 200, "{}", reply.body);
        let page = reply.json();
        out.extend(page["jobs"].as_array().expect("jobs").iter().cloned());
        match page["next"].as_u64() {
            Some(next) => after = format!("&after={next}"),
            None => return out,
        }
    }
}

#[test]
fn kill_9_while_schedules_fire_neither_repeats_nor_loses_an_instant() {
    let dir = TempDir::new("crash-schedules");
    let mut server = start(&dir, 0);
    for (name, cron, misfire) in SCHEDULES {
        let reply = server.http(
            "PUT",
            &format!("/v1/schedules/{name}"),
            &json!({"cron": cron, "queue": name, "job": {"payload": {"from": name}},
                    "misfire": misfire, "catch_up_max": 10_000})
            .to_string(),
        );
        assert_eq!(reply.status, 201, "{}", reply.body);
    }
    for round in 0..=ROUNDS {
        // Let every schedule fire a couple of times in this life.
        let before: Vec<u64> = SCHEDULES.iter().map(|s| fires(&server, s.0)).collect();
        wait_until("the schedules to fire twice", || {
            SCHEDULES
                .iter()
                .zip(&before)
                .all(|(s, &b)| fires(&server, s.0) >= b + 2)
        });
        if round == ROUNDS {
            break;
        }
        server.signal("KILL");
        assert!(
            server.wait_exit(SETTLE_TIMEOUT).is_some(),
            "the server did not die"
        );
        std::thread::sleep(DOWNTIME);
        server = start(&dir, round + 1);
    }
    // No more firings while the jobs are read: pause all (a pause is
    // logged, and the answers say where each schedule stands).
    let mut totals = Vec::new();
    for (name, _, _) in SCHEDULES {
        let reply = server.http("POST", &format!("/v1/schedules/{name}/pause"), "");
        assert_eq!(reply.status, 200, "{}", reply.body);
        totals.push(reply.json()["fires"].as_u64().expect("fires"));
    }
    for ((name, _, misfire), fired) in SCHEDULES.into_iter().zip(totals) {
        let jobs = jobs(&server, name);
        let mut instants = BTreeSet::new();
        for job in &jobs {
            let key = job["idempotency_key"].as_str().expect("a key");
            let due: u64 = key
                .strip_prefix(&format!("schedule:{name}:"))
                .and_then(|ms| ms.parse().ok())
                .unwrap_or_else(|| panic!("{name}: a firing key, not {key:?}"));
            assert!(instants.insert(due), "{name}: instant {due} fired twice");
            assert_eq!(job["headers"]["spool-schedule"], name);
            let at = job["headers"]["spool-scheduled-at"]
                .as_str()
                .expect("header");
            assert!(at.starts_with("20"), "{name}: {at}");
        }
        assert_eq!(
            jobs.len() as u64,
            fired,
            "{name}: the schedule counts exactly the jobs it committed"
        );
        if misfire == "all" {
            let first = *instants.first().expect("fired");
            let last = *instants.last().expect("fired");
            assert_eq!(
                instants.len() as u64,
                (last - first) / 1_000 + 1,
                "{name}: every second from the first to the last, none lost"
            );
        }
    }
}

/// `spool cron add|ls|pause|resume|trigger|rm` against a running server.
#[test]
fn cron_verbs_drive_schedules() {
    let server = Server::start();
    wait_until("/readyz to answer 200", || {
        server.http("GET", "/readyz", "").status == 200
    });
    let http = server.http_addr().to_string();
    let spool = |args: &[&str]| {
        let mut all = vec!["cron"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--http", &http]);
        let out = support::run_spool(&all, &[]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let errors = String::from_utf8_lossy(&out.stderr).into_owned();
        (out.status.success(), text, errors)
    };
    let (ok, text, errors) = spool(&[
        "add",
        "nightly",
        "30 2 * * *",
        r#"{"report":"daily"}"#,
        "--queue",
        "reports",
        "--timezone",
        "Europe/Berlin",
        "--misfire",
        "skip",
        "--header",
        "team=ops",
    ]);
    assert!(ok, "{text}{errors}");
    assert!(
        text.starts_with("schedule nightly next fires at 20"),
        "{text}"
    );
    let (ok, text, _) = spool(&["ls"]);
    assert!(ok);
    assert!(
        text.contains("nightly") && text.contains("Europe/Berlin"),
        "{text}"
    );
    let (ok, text, _) = spool(&["pause", "nightly"]);
    assert!(ok && text.contains("paused"), "{text}");
    let (ok, text, _) = spool(&["trigger", "nightly"]);
    assert!(
        ok && text.starts_with("schedule nightly fired job "),
        "{text}"
    );
    let (ok, text, _) = spool(&["resume", "nightly", "--json"]);
    assert!(ok);
    let view: Value = serde_json::from_str(&text).expect("JSON");
    assert_eq!(view["paused"], false);
    assert_eq!(view["fires"], 1);
    assert_eq!(view["job"]["headers"]["team"], "ops");
    let (ok, _, errors) = spool(&["add", "bad", "* * *"]);
    assert!(!ok);
    assert!(errors.contains("cron"), "{errors}");
    let (ok, _, _) = spool(&["rm", "nightly"]);
    assert!(ok);
    let (ok, _, errors) = spool(&["rm", "nightly"]);
    assert!(!ok, "a second rm finds nothing: {errors}");
}
