//! Crash test of workflows: `kill -9` the durable server while workers run
//! 5-step sagas (some failing for good at a random step) and a starter
//! keeps starting more, restart it on the same data directory, and check
//! that every workflow is in a state the rules allow, nothing acknowledged
//! is lost and nothing moves backwards. Then let the workers finish
//! everything without a kill and check the end: every workflow succeeded or
//! compensated, each compensation ran once, in reverse order of
//! completion.
//!
//! The kills land wherever the scheduler puts them: between a step's
//! completion and the next step's enqueue if the two were not one commit,
//! in the middle of a compensation chain, during a start. Each round runs
//! the load for a random 150–600 ms. `SPOOL_CRASH_SEED=N` reruns with the
//! same load lengths and failure choices.

mod support;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::{crash_seed, Rng, Server, TempDir};

/// Kill/restart rounds (each followed by a restart and a check).
const ROUNDS: usize = 5;
/// Steps of each saga; step `NO_UNDO_STEP` has no compensation.
const STEPS: usize = 5;
const NO_UNDO_STEP: usize = 2;
/// Worker threads of each round's load.
const WORKERS: usize = 3;
const LOAD_MIN_MS: u64 = 150;
const LOAD_MAX_MS: u64 = 600;
/// Bounds each thread even if it never notices the kill.
const MAX_OPS_PER_THREAD: usize = 5_000;
/// Workflows the starter starts at most per round.
const STARTS_PER_ROUND_MAX: u64 = 40;
/// One request's bound during the load (the kill ends most of them).
const LOAD_REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// Recovery in a debug build on a loaded machine.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Draining every workflow to its end after the last round.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(120);
const STEP_QUEUE: &str = "cw-steps";
const UNDO_QUEUE: &str = "cw-undo";
/// Final jobs stay readable for the whole test.
const RETENTION_MS: u64 = 7 * 24 * 3_600_000;
/// No lease expires during the test: a held job is ready again after the
/// kill, never failed by its TTR.
const TTR_MS: u64 = 600_000;

/// A whole reply: status and JSON body; Err when none came whole.
fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&Value>,
    timeout: Duration,
) -> std::io::Result<(u16, Value)> {
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let body = body.map(Value::to_string).unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body.as_bytes())?;
    let mut bytes = Vec::new();
    stream.read_to_end(&mut bytes)?;
    let text = String::from_utf8_lossy(&bytes);
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "no whole reply");
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(bad)?;
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(bad)?;
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .ok_or_else(bad)?;
    if body.len() != length {
        return Err(bad());
    }
    let json = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(body).map_err(|_| bad())?
    };
    Ok((status, json))
}

/// A request to a live, idle server: anything but a whole 2xx fails.
fn ok(addr: SocketAddr, method: &str, path: &str, body: Option<&Value>) -> Value {
    let (status, json) = request(addr, method, path, body, READY_TIMEOUT)
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    assert!(
        (200..300).contains(&status),
        "{method} {path}: {status} {json}"
    );
    json
}

fn saga(key: &str, fail_at: Option<usize>) -> Value {
    let steps: Vec<Value> = (0..STEPS)
        .map(|i| {
            let mut step = json!({
                "name": format!("s{i}"),
                "queue": STEP_QUEUE,
                "payload": {"step": i, "fail": fail_at == Some(i)},
                "max_attempts": 1,
            });
            if i > 0 {
                step["depends_on"] = json!([format!("s{}", i - 1)]);
            }
            if i != NO_UNDO_STEP {
                step["compensate"] = json!({"queue": UNDO_QUEUE, "payload": {"undo": i}});
            }
            step
        })
        .collect();
    json!({"name": key, "idempotency_key": key, "steps": steps})
}

/// Works one job of either queue: completes it, or fails it for good when
/// its payload says so. False when nothing was ready or the server is gone.
fn work_one(addr: SocketAddr) -> bool {
    let reserve = json!({"queues": [STEP_QUEUE, UNDO_QUEUE], "timeout_ms": 20});
    let Ok((200, reply)) = request(
        addr,
        "POST",
        "/v1/reserve",
        Some(&reserve),
        LOAD_REPLY_TIMEOUT,
    ) else {
        return false;
    };
    let Some(job) = reply["jobs"].get(0) else {
        return false;
    };
    let id = job["id"].as_u64().unwrap_or(0);
    let lease = job["lease"].clone();
    let (path, body) = if job["payload"]["fail"] == json!(true) {
        (
            format!("/v1/jobs/{id}/fail"),
            json!({"lease": lease, "error": "fails for good", "permanent": true}),
        )
    } else {
        (
            format!("/v1/jobs/{id}/complete"),
            json!({"lease": lease, "result": {"done": job["payload"]}}),
        )
    };
    // A 409 (cancelled by its workflow meanwhile) is an answer too.
    request(addr, "POST", &path, Some(&body), LOAD_REPLY_TIMEOUT).is_ok()
}

/// Every workflow the server holds, by id.
fn all_workflows(addr: SocketAddr) -> BTreeMap<u64, Value> {
    let mut out = BTreeMap::new();
    let mut after = 0;
    loop {
        let page = ok(
            addr,
            "GET",
            &format!("/v1/workflows?limit=1000&after={after}"),
            None,
        );
        for w in page["workflows"].as_array().expect("workflows") {
            out.insert(w["id"].as_u64().expect("id"), w.clone());
        }
        match page["next"].as_u64() {
            Some(next) => after = next,
            None => return out,
        }
    }
}

fn step_states(w: &Value) -> Vec<String> {
    w["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .map(|s| s["state"].as_str().expect("state").to_string())
        .collect()
}

/// What the rules allow of one saga at rest.
fn check_consistent(w: &Value) {
    let states = step_states(w);
    let state = w["state"].as_str().expect("state");
    let count = |s: &str| states.iter().filter(|x| *x == s).count();
    match state {
        "running" => {
            // A chain: completed steps, then one running, then pending.
            let done = count("completed");
            assert!(done < STEPS, "{w}");
            assert_eq!(states[done], "running", "{w}");
            assert!(states[done + 1..].iter().all(|s| s == "pending"), "{w}");
        }
        "succeeded" => assert_eq!(count("completed"), STEPS, "{w}"),
        "compensating" | "compensated" | "compensation_failed" => {
            assert!(count("failed") >= 1, "compensation has a cause: {w}");
            assert_eq!(count("running") + count("pending"), 0, "{w}");
            assert!(
                count("compensating") <= 1,
                "one compensation at a time: {w}"
            );
            if state == "compensated" {
                assert_eq!(count("compensating"), 0, "{w}");
                // Only the step without an undo may stay completed.
                for (i, s) in states.iter().enumerate() {
                    if s == "completed" {
                        assert_eq!(i, NO_UNDO_STEP, "{w}");
                    }
                }
            }
            // Undone steps are the latest completed ones: every step
            // still completed (with an undo) comes before every undone one.
            let last_waiting = states
                .iter()
                .enumerate()
                .filter(|(i, s)| *s == "completed" && *i != NO_UNDO_STEP)
                .map(|(i, _)| i)
                .max();
            let first_undone = states
                .iter()
                .position(|s| s == "compensated" || s == "compensating");
            if let (Some(a), Some(b)) = (last_waiting, first_undone) {
                assert!(a < b, "reverse order: {w}");
            }
        }
        other => panic!("unknown state {other}: {w}"),
    }
}

/// A later look at a workflow never shows it earlier in its life.
fn check_forward(before: &Value, after: &Value) {
    assert!(
        after["version"].as_u64() >= before["version"].as_u64(),
        "version went back: {before} → {after}"
    );
    let rank = |s: &str| match s {
        "running" => 0,
        "compensating" | "compensation_failed" => 1,
        _ => 2,
    };
    let (b, a) = (
        before["state"].as_str().unwrap_or(""),
        after["state"].as_str().unwrap_or(""),
    );
    assert!(rank(a) >= rank(b), "state went back: {b} → {a}");
    if rank(b) == 2 {
        assert_eq!(a, b, "a final workflow changed");
    }
}

fn start(dir: &Path, round: usize) -> Server {
    let fsync = if round.is_multiple_of(2) {
        "always"
    } else {
        "never"
    };
    let server = Server::start_durable(dir, &["--fsync", fsync, "-s", "1048576"]);
    let addr = server.http_addr();
    let deadline = Instant::now() + READY_TIMEOUT;
    while !matches!(
        request(addr, "GET", "/readyz", None, READY_TIMEOUT),
        Ok((200, _))
    ) {
        assert!(
            Instant::now() < deadline,
            "not ready: {}",
            server.output_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    server
}

#[test]
fn kill_9_mid_workflow_keeps_every_saga_consistent() {
    let seed = crash_seed();
    eprintln!("crash_workflows: SPOOL_CRASH_SEED={seed}");
    let mut rng = Rng::new(seed);
    let dir = TempDir::new("crash-workflows");
    // key → the failing step, for every start that was sent.
    let mut sent: BTreeMap<String, Option<usize>> = BTreeMap::new();
    // keys whose start was acknowledged, with the id it got.
    let acknowledged: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    let mut seen: BTreeMap<u64, Value> = BTreeMap::new();
    let next_key = Arc::new(AtomicU64::new(0));
    let mut kills = 0;

    for round in 0..=ROUNDS {
        let mut server = start(dir.path(), round);
        let addr = server.http_addr();
        if round == 0 {
            for queue in [STEP_QUEUE, UNDO_QUEUE] {
                ok(
                    addr,
                    "PUT",
                    &format!("/v1/queues/{queue}/policy"),
                    Some(
                        &json!({"ttr_ms": TTR_MS, "retention_ms": RETENTION_MS, "retention_max_jobs": 1_000_000}),
                    ),
                );
            }
        }
        // The check: every acknowledged start is there under its key, and
        // every workflow is consistent and no earlier than last seen.
        let now = all_workflows(addr);
        for (key, id) in acknowledged.lock().unwrap().iter() {
            let w = now
                .get(id)
                .unwrap_or_else(|| panic!("acknowledged {key} (id {id}) lost"));
            assert_eq!(w["idempotency_key"], json!(key));
        }
        for (id, w) in &now {
            check_consistent(w);
            if let Some(before) = seen.get(id) {
                check_forward(before, w);
            }
            let key = w["idempotency_key"].as_str().expect("key");
            assert!(sent.contains_key(key), "a workflow nobody started: {w}");
        }
        seen = now;
        if round == ROUNDS {
            // The end: drain without a kill.
            let deadline = Instant::now() + DRAIN_TIMEOUT;
            loop {
                let ws = all_workflows(addr);
                if ws
                    .values()
                    .all(|w| matches!(w["state"].as_str(), Some("succeeded" | "compensated")))
                {
                    seen = ws;
                    break;
                }
                assert!(Instant::now() < deadline, "workflows never ended: {ws:?}");
                for _ in 0..50 {
                    work_one(addr);
                }
            }
            break;
        }

        // The load: a starter and workers, then the kill.
        let stop = Arc::new(AtomicBool::new(false));
        let plans: Vec<(String, Option<usize>)> = (0..STARTS_PER_ROUND_MAX)
            .map(|_| {
                let n = next_key.fetch_add(1, Ordering::Relaxed);
                let fail_at = rng
                    .next()
                    .is_multiple_of(3)
                    .then(|| (rng.next() % STEPS as u64) as usize);
                (format!("saga-{n}"), fail_at)
            })
            .collect();
        for (key, fail_at) in &plans {
            sent.insert(key.clone(), *fail_at);
        }
        let starter = {
            let (stop, acknowledged) = (stop.clone(), acknowledged.clone());
            std::thread::spawn(move || {
                for (key, fail_at) in plans {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let body = saga(&key, fail_at);
                    match request(
                        addr,
                        "POST",
                        "/v1/workflows",
                        Some(&body),
                        LOAD_REPLY_TIMEOUT,
                    ) {
                        Ok((status, w)) if status == 200 || status == 201 => {
                            let id = w["id"].as_u64().expect("id");
                            acknowledged.lock().unwrap().insert(key, id);
                        }
                        Ok((status, w)) => panic!("start refused: {status} {w}"),
                        Err(_) => break,
                    }
                }
            })
        };
        let workers: Vec<_> = (0..WORKERS)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    for _ in 0..MAX_OPS_PER_THREAD {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        work_one(addr);
                    }
                })
            })
            .collect();
        let load_ms = LOAD_MIN_MS + rng.next() % (LOAD_MAX_MS - LOAD_MIN_MS);
        std::thread::sleep(Duration::from_millis(load_ms));
        server.signal("KILL");
        assert!(server.wait_exit(READY_TIMEOUT).is_some(), "the kill took");
        kills += 1;
        stop.store(true, Ordering::Relaxed);
        starter.join().expect("starter");
        for w in workers {
            w.join().expect("worker");
        }
    }

    // Every workflow ended as its plan says, each compensation once, in
    // reverse order of completion (a chain completes in step order, and
    // compensation jobs are made one after another, so their ids fall
    // along the chain).
    assert!(kills >= 1);
    assert!(!seen.is_empty(), "some workflow was started");
    for w in seen.values() {
        let key = w["idempotency_key"].as_str().expect("key");
        let fail_at = sent[key];
        let states = step_states(w);
        match fail_at {
            None => assert_eq!(w["state"], "succeeded", "{w}"),
            Some(f) => {
                assert_eq!(w["state"], "compensated", "{w}");
                assert_eq!(states[f], "failed", "{w}");
                let undo_jobs: Vec<u64> = (0..f)
                    .filter(|&i| i != NO_UNDO_STEP)
                    .map(|i| {
                        assert_eq!(states[i], "compensated", "{w}");
                        w["steps"][i]["compensation_job"]
                            .as_u64()
                            .expect("an undo job")
                    })
                    .collect();
                assert!(
                    undo_jobs.windows(2).all(|p| p[0] > p[1]),
                    "compensations in reverse order: {w}"
                );
                for i in f + 1..STEPS {
                    assert_eq!(states[i], "cancelled", "{w}");
                    assert!(w["steps"][i]["compensation_job"].is_null(), "{w}");
                }
            }
        }
    }
    // One compensation job per undone step, however often the server died:
    // the undo queue holds exactly those, all completed.
    let undone: usize = seen
        .values()
        .map(|w| {
            step_states(w)
                .iter()
                .filter(|s| *s == "compensated")
                .count()
        })
        .sum();
    let server = start(dir.path(), ROUNDS + 1);
    let undo = ok(
        server.http_addr(),
        "GET",
        &format!("/v1/queues/{UNDO_QUEUE}"),
        None,
    );
    let counts = &undo["counts"];
    assert_eq!(counts["completed"].as_u64(), Some(undone as u64), "{undo}");
    for state in ["ready", "reserved", "delayed", "buried", "cancelled"] {
        assert_eq!(counts[state].as_u64(), Some(0), "{state}: {undo}");
    }
    eprintln!(
        "crash_workflows: {kills} kills, {} workflows checked, {undone} compensations",
        seen.len()
    );
}
