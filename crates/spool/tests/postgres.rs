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
    let metrics = a.http("GET", "/metrics", "").body;
    assert!(
        metrics.contains("spool_db_pool_connections{state=\"busy\"}")
            && metrics.contains("spool_db_pool_max_connections")
            && metrics.contains("spool_db_query_errors_total"),
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
