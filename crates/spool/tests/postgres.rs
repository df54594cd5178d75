//! `spool serve --database-url`: both front doors of real spool processes
//! on one PostgreSQL database (a private cluster this test process starts,
//! see `spool_pg::testing`), readiness, the pool's metrics, and the start
//! refusing what it cannot serve.

mod support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use spool_pg::testing::TestCluster;
use support::{run_spool, HttpReply, Server};

/// Bound on waiting for the server to settle into a state.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest wait a test's reserve asks for: below the test client's read
/// timeout, so a reserve that is never answered fails as a read error.
const RESERVE_WAIT_MS: u64 = 4_000;

fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_ready(server: &Server) {
    wait_until("/readyz to answer 200", || {
        server.http("GET", "/readyz", "").status == 200
    });
}

fn post(server: &Server, path: &str, body: Value) -> HttpReply {
    server.http("POST", path, &body.to_string())
}

#[track_caller]
fn ok(reply: HttpReply, status: u16) -> Value {
    assert_eq!(reply.status, status, "{}", reply.body);
    reply.json()
}

#[test]
fn two_nodes_serve_both_front_doors_on_one_database() {
    let url = TestCluster::shared().create_database();
    let a = Server::start_postgres(&url, &["--node-id", "a"]);
    let b = Server::start_postgres(&url, &["--node-id", "b"]);
    wait_ready(&a);
    wait_ready(&b);
    // Put over beanstalkd on a, worked over HTTP on b.
    let mut on_a = a.client();
    on_a.expect("use mixed\r\n", "USING mixed\r\n");
    on_a.send("put 3 0 60 5\r\nhello\r\n");
    let inserted = on_a.line();
    let id: u64 = inserted
        .strip_prefix("INSERTED ")
        .and_then(|n| n.trim_end().parse().ok())
        .unwrap_or_else(|| panic!("inserted: {inserted:?}"));
    let reply = post(
        &b,
        "/v1/reserve",
        json!({"queues": ["mixed"], "timeout_ms": RESERVE_WAIT_MS}),
    );
    let job = ok(reply, 200)["jobs"][0].clone();
    assert_eq!(
        (job["id"].clone(), job["payload_base64"].clone()),
        (json!(id), json!("aGVsbG8="))
    );
    let lease = job["lease"].as_str().expect("a lease").to_string();
    let done = ok(
        post(
            &b,
            &format!("/v1/jobs/{id}/complete"),
            json!({"lease": lease, "result": {"ok": true}}),
        ),
        200,
    );
    assert_eq!(done["state"], "completed");
    assert_eq!(
        ok(a.http("GET", &format!("/v1/jobs/{id}"), ""), 200)["result"],
        json!({"ok": true})
    );
    on_a.expect(format!("peek {id}\r\n"), "NOT_FOUND\r\n");
    // Enqueued over HTTP on a, reserved by a beanstalkd worker on b that
    // was already waiting.
    let mut on_b = b.client();
    on_b.expect("watch mixed\r\n", "WATCHING 2\r\n");
    on_b.send("reserve-with-timeout 4\r\n");
    let made = ok(
        post(&a, "/v1/queues/mixed/jobs", json!({"payload": {"a": 1}})),
        201,
    );
    let want = format!("RESERVED {} 7\r\n{{\"a\":1}}\r\n", made["id"]);
    assert_eq!(
        support::show(&on_b.reply_bytes()),
        support::show(want.as_bytes())
    );
    on_b.expect(format!("delete {}\r\n", made["id"]), "DELETED\r\n");
    // beanstalkd's `stats` on a PostgreSQL node names the process as the
    // local broker's does: a client that parses `version` (fivebeans) or
    // watches `pid` and `uptime` finds them, not zeros and an empty string.
    on_a.send("stats\r\n");
    let stats = on_a.reply();
    for line in [
        format!("pid: {}\n", a.pid()),
        "version: \"1.12\"\n".to_string(),
    ] {
        assert!(stats.contains(&line), "no {line:?} in {stats}");
    }
    assert!(!stats.contains("hostname: \n"), "{stats}");
    let metrics = a.http("GET", "/metrics", "").body;
    assert!(
        metrics.contains("spool_db_pool_connections{state=\"busy\"}")
            && metrics.contains("spool_db_pool_max_connections")
            && metrics.contains("spool_db_query_errors_total"),
        "{metrics}"
    );
    // Every operation above acquired a connection: the acquire-wait
    // histogram has counted them, and its `+Inf` bucket equals its count.
    let sample = |name: &str| -> u64 {
        metrics
            .lines()
            .find_map(|line| line.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in:\n{metrics}"))
    };
    let acquires = sample("spool_db_pool_acquire_seconds_count");
    assert!(acquires >= 2, "{metrics}");
    assert_eq!(
        sample("spool_db_pool_acquire_seconds_bucket{le=\"+Inf\"}"),
        acquires
    );
    assert!(
        metrics.contains("# TYPE spool_db_pool_acquire_seconds histogram"),
        "{metrics}"
    );
}

#[test]
fn the_start_refuses_an_unreachable_database_and_conflicting_flags() {
    let nowhere = std::env::temp_dir().join(format!("spool-no-db-{}", std::process::id()));
    let url = format!(
        "host={} port=5432 user=spool dbname=none",
        nowhere.display()
    );
    let out = run_spool(&["serve", "--database-url", &url, "-p", "0"], &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("cannot reach the database"), "{stderr}");
    let out = run_spool(&["serve", "--database-url", &url, "--in-memory"], &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--database-url/SPOOL_DATABASE_URL=<hidden> and --in-memory"),
        "{stderr}"
    );
    assert!(!stderr.contains(&url), "the URL is never echoed: {stderr}");
}

#[test]
fn readiness_drops_when_the_database_goes_away() {
    let cluster = TestCluster::shared();
    let url = cluster.create_database();
    let server = Server::start_postgres(&url, &[]);
    wait_ready(&server);
    let database = url.rsplit('=').next().expect("a dbname");
    cluster.psql(
        "postgres",
        &format!("DROP DATABASE {database} WITH (FORCE)"),
    );
    wait_until("/readyz to answer 503", || {
        let reply = server.http("GET", "/readyz", "");
        reply.status == 503 && reply.body.contains("storage_failed")
    });
    assert_eq!(server.http("GET", "/livez", "").status, 200);
}

/// SIGTERM with idle beanstalkd connections on a PostgreSQL node: a session
/// that never sent a request, one that did (idle or parked by now) and one
/// holding a job. The idle ones close at once, the holder when it gives its
/// job back, and the node exits then, long before its grace period: an
/// idle session starts no task and watches no shutdown of its own, so the
/// node wakes every connection when it begins shutting down.
#[test]
fn sigterm_closes_idle_postgresql_sessions_at_once() {
    let url = TestCluster::shared().create_database();
    let mut server = Server::start_postgres(&url, &["--shutdown-grace", "600s"]);
    wait_ready(&server);
    let mut silent = server.client();
    let mut used = server.client();
    used.expect("use elsewhere\r\n", "USING elsewhere\r\n");
    let mut holder = server.client();
    let id = holder.put(0, 0, 60, b"held");
    let (reserved, _) = holder.reserve_now();
    assert_eq!(reserved, id);
    server.signal("TERM");
    silent.expect_closed();
    used.expect_closed();
    holder.expect_no_reply(Duration::from_millis(200));
    holder.expect(format!("delete {id}\r\n"), "DELETED\r\n");
    holder.expect_closed();
    let status = server
        .wait_exit(SETTLE_TIMEOUT)
        .expect("exited after the last job");
    assert!(status.success(), "{status:?}");
}

/// The id of a `RESERVED <id> <bytes>` reply's first line.
fn reserved_id(reply: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(reply).ok()?;
    text.strip_prefix("RESERVED ")?
        .split(' ')
        .next()?
        .parse()
        .ok()
}

#[test]
fn a_killed_node_loses_nothing_and_its_jobs_come_back_after_their_leases() {
    const JOBS: u64 = 20;
    const HELD: u64 = 5;
    let url = TestCluster::shared().create_database();
    let mut a = Server::start_postgres(&url, &["--node-id", "a"]);
    let b = Server::start_postgres(&url, &["--node-id", "b"]);
    wait_ready(&a);
    wait_ready(&b);
    let mut on_a = a.client();
    on_a.expect("use kill\r\n", "USING kill\r\n");
    on_a.expect("watch kill\r\n", "WATCHING 2\r\n");
    let mut put = Vec::new();
    for n in 0..JOBS {
        // A TTR of 1 s: the dead node's leases end a second after it dies.
        on_a.send(format!("put 0 0 1 2\r\n{n:02}\r\n"));
        let line = on_a.line();
        let id: u64 = line
            .strip_prefix("INSERTED ")
            .and_then(|n| n.trim_end().parse().ok())
            .unwrap_or_else(|| panic!("inserted: {line:?}"));
        put.push(id);
    }
    for _ in 0..HELD {
        on_a.send("reserve-with-timeout 0\r\n");
        let reply = on_a.reply_bytes();
        assert!(reserved_id(&reply).is_some(), "{}", support::show(&reply));
    }
    a.signal("KILL");
    assert!(a.wait_exit(SETTLE_TIMEOUT).is_some(), "the node died");
    // Every acknowledged job is worked on b, the held ones once their
    // leases expired (b's timers end them).
    let mut on_b = b.client();
    on_b.expect("watch kill\r\n", "WATCHING 2\r\n");
    let mut got = Vec::new();
    for _ in 0..JOBS * 2 {
        if got.len() as u64 == JOBS {
            break;
        }
        // Below the test client's read timeout.
        on_b.send("reserve-with-timeout 3\r\n");
        let reply = on_b.reply_bytes();
        let Some(id) = reserved_id(&reply) else {
            panic!("reserve on b: {} after {got:?}", support::show(&reply));
        };
        on_b.expect(format!("delete {id}\r\n"), "DELETED\r\n");
        got.push(id);
    }
    got.sort_unstable();
    assert_eq!(got, put, "each job once, none lost");
}

/// Bound on waiting for work to finish after PostgreSQL came back: leases
/// broken by the restart end after their 1 s TTR, then a backoff.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);

/// Most enqueues one producer has acknowledged before it stops by itself.
const PRODUCE_ACKED_MAX: usize = 5_000;

/// Most enqueue requests one producer sends, refusals included: a second
/// bound on its count, far above what an outage of a minute refuses.
const PRODUCE_REQUESTS_MAX: u64 = 200_000;

/// How long a producer runs at most, whatever else happens.
const PRODUCE_TIME_MAX: Duration = Duration::from_secs(180);

/// Pause after a refusal, so that an outage costs the producer little of
/// its request bound and the machine little CPU.
const REFUSED_PAUSE: Duration = Duration::from_millis(5);

/// Enqueues over HTTP until `stop`, keeping the ids of acknowledged jobs
/// (201); refusals while the database is away are expected and counted.
/// Its budget is counted in acknowledged jobs, not requests: one counted
/// in requests ran out during a slow restart (every refusal is quick) and
/// left nothing for the work after it to do.
fn produce(server: &Server, stop: &std::sync::atomic::AtomicBool) -> (Vec<u64>, u64) {
    use std::sync::atomic::Ordering;
    let (mut acked, mut refused) = (Vec::new(), 0);
    let give_up_at = Instant::now() + PRODUCE_TIME_MAX;
    for n in 0..PRODUCE_REQUESTS_MAX {
        if stop.load(Ordering::Relaxed)
            || acked.len() >= PRODUCE_ACKED_MAX
            || Instant::now() >= give_up_at
        {
            break;
        }
        let body = json!({"payload": {"n": n}, "ttr_ms": 1_000,
            "backoff": {"initial_ms": 10, "max_ms": 100, "multiplier": 2.0, "jitter": 0.0}});
        let reply = post(server, "/v1/queues/restart/jobs", body);
        match reply.status {
            201 => acked.push(reply.json()["id"].as_u64().expect("an id")),
            503 => {
                refused += 1;
                std::thread::sleep(REFUSED_PAUSE);
            }
            other => panic!("enqueue answered {other}: {}", reply.body),
        }
    }
    (acked, refused)
}

/// Sets its flag when dropped: load threads of a scope stop when the
/// scope's body ends, a failed assertion included (the scope then waits
/// for them before the panic goes on, so they must not wait for a flag
/// the failed body never set).
struct StopOnDrop<'a>(&'a std::sync::atomic::AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Reserves and completes over HTTP until `stop` or after `rounds`
/// reserves; the ids whose completion was acknowledged.
fn work(server: &Server, stop: &std::sync::atomic::AtomicBool, rounds: u32) -> Vec<u64> {
    use std::sync::atomic::Ordering;
    let mut completed = Vec::new();
    for _ in 0..rounds {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let reply = post(
            server,
            "/v1/reserve",
            json!({"queues": ["restart"], "timeout_ms": 200, "batch": 8}),
        );
        if reply.status != 200 {
            assert_eq!(reply.status, 503, "reserve: {}", reply.body);
            continue;
        }
        for job in reply.json()["jobs"].as_array().expect("jobs").clone() {
            let id = job["id"].as_u64().expect("an id");
            let lease = job["lease"].as_str().expect("a lease");
            let done = post(
                server,
                &format!("/v1/jobs/{id}/complete"),
                json!({ "lease": lease }),
            );
            match done.status {
                200 => completed.push(id),
                // The database away, or a lease the outage outlived.
                503 | 409 => {}
                other => panic!("complete answered {other}: {}", done.body),
            }
        }
    }
    completed
}

/// Enqueued jobs with no acknowledged completion yet, on `server`.
fn unfinished(server: &Server, acked: &[u64]) -> Vec<u64> {
    acked
        .iter()
        .copied()
        .filter(|id| {
            let job = ok(server.http("GET", &format!("/v1/jobs/{id}"), ""), 200);
            job["state"] != "completed"
        })
        .collect()
}

/// PostgreSQL restarting under load (stopped, then started: the two
/// halves of `pg_ctl restart`, so that the test sees the nodes while the
/// database is away instead of racing a fast restart): both nodes turn
/// unready and ready again by themselves, every acknowledged enqueue and
/// completion survives, and the work goes on.
#[test]
fn a_postgresql_restart_under_load_loses_nothing_acknowledged() {
    use std::sync::atomic::AtomicBool;
    let cluster = TestCluster::private();
    let url = cluster.create_database();
    let a = Server::start_postgres(&url, &["--node-id", "a"]);
    let b = Server::start_postgres(&url, &["--node-id", "b"]);
    wait_ready(&a);
    wait_ready(&b);
    let stop = AtomicBool::new(false);
    let (produced, completed) = std::thread::scope(|scope| {
        let producer = scope.spawn(|| produce(&a, &stop));
        let worker = scope.spawn(|| work(&b, &stop, 50_000));
        let stop_on_drop = StopOnDrop(&stop);
        let done_before = || ok(a.http("GET", "/v1/queues/restart", ""), 200);
        wait_until("jobs to flow before the restart", || {
            done_before()["counts"]["completed"].as_u64().unwrap_or(0) >= 20
        });
        cluster.stop();
        for server in [&a, &b] {
            wait_until("/readyz to answer 503 with the database away", || {
                let reply = server.http("GET", "/readyz", "");
                reply.status == 503 && reply.body.contains("storage_failed")
            });
            assert_eq!(server.http("GET", "/livez", "").status, 200);
        }
        cluster.start_again();
        for server in [&a, &b] {
            wait_until("/readyz to answer 200 again by itself", || {
                server.http("GET", "/readyz", "").status == 200
            });
        }
        let completed_at_return = done_before()["counts"]["completed"]
            .as_u64()
            .expect("a count");
        wait_until("work to go on after the restart", || {
            done_before()["counts"]["completed"].as_u64().unwrap_or(0) >= completed_at_return + 20
        });
        drop(stop_on_drop);
        (
            producer.join().expect("producer"),
            worker.join().expect("worker"),
        )
    });
    let (acked, refused) = produced;
    assert!(
        !acked.is_empty() && !completed.is_empty(),
        "jobs went through ({} enqueues refused while the database was away)",
        refused
    );
    // Every acknowledged completion stands.
    for id in &completed {
        let job = ok(a.http("GET", &format!("/v1/jobs/{id}"), ""), 200);
        assert_eq!(job["state"], "completed", "job {id}: {job}");
    }
    // Every acknowledged enqueue is there; the ones the restart caught
    // held come back when their leases end and are worked to completion.
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    let mut left = unfinished(&a, &acked);
    while !left.is_empty() {
        assert!(
            Instant::now() < deadline,
            "jobs never completed after the restart: {left:?}"
        );
        // A few reserves (each waits at most 200 ms), then look again.
        work(&b, &AtomicBool::new(false), 5);
        left = unfinished(&a, &acked);
    }
}
