//! What the PostgreSQL broker adds to the conformance suite: schema
//! versions, an unreachable or vanished database, a bounded pool, several
//! nodes on one database, beanstalkd sessions' other commands, shutdown.
//! Each test has a fresh database of the private test cluster and a manual
//! clock (shared by the nodes of a test).

use std::future::poll_fn;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use spool_broker::{
    Broker, BrokerError, JobState, JobView, Leased, Misfire, NewJob, NewStep, NewWorkflow, Op,
    Outcome, Peer, QueueName, QueuePolicy, ScheduleSpec, ScheduleView, Session, SnapshotScope,
    StepState, WorkflowState, WorkflowView,
};
use spool_pg::testing::TestCluster;
use spool_pg::{Clock, ConnectError, PgBroker, PgConfig, SCHEMA_VERSION};
use spool_proto::{Put, PutBody, Request, Response};

/// 2026-12-04T00:00:00Z in nanoseconds since the Unix epoch.
const START_NS: u64 = 1_796_342_400_000_000_000;

/// Turns a test lets another task take before it gives up on seeing
/// what that task does.
const YIELDS_MAX: usize = 1_000;

fn config(url: &str, node: &str) -> PgConfig {
    let mut config = PgConfig::new(url, node);
    config.pool_size = 4;
    config
}

async fn node(url: &str, name: &str, clock: &Clock) -> PgBroker {
    PgBroker::connect(config(url, name), clock.clone())
        .await
        .unwrap_or_else(|e| panic!("connect {name}: {e}"))
}

fn queue(name: &str) -> QueueName {
    QueueName::new(name.as_bytes()).expect("a queue name")
}

fn job(payload: &'static str) -> NewJob {
    NewJob {
        payload: Bytes::from_static(payload.as_bytes()),
        ..NewJob::default()
    }
}

/// A plain client of the test database, for what the broker must survive.
/// Vacuums of both partitions of `spool_jobs` so far.
async fn vacuum_count(admin: &tokio_postgres::Client) -> i64 {
    admin
        .query_one(
            "SELECT pg_stat_get_vacuum_count('spool_jobs_live'::regclass) \
             + pg_stat_get_vacuum_count('spool_jobs_final'::regclass)",
            &[],
        )
        .await
        .expect("vacuum count")
        .get::<_, i64>(0)
}

/// `batches` batch enqueues of `per_batch` plain jobs each into `name`.
async fn enqueue_batches(broker: &PgBroker, name: &str, batches: usize, per_batch: usize) {
    for _ in 0..batches {
        let batch = (0..per_batch).map(|_| (queue(name), job("x"))).collect();
        match broker.call(Op::EnqueueBatch { jobs: batch }).await {
            Ok(Outcome::Batch(made)) => assert_eq!(made.len(), per_batch),
            other => panic!("a batch enqueue: {other:?}"),
        }
    }
}

/// Every row of `spool_jobs` updated once: as many dead versions as rows,
/// in the statistics when the transaction ends.
async fn update_every_row(admin: &tokio_postgres::Client) {
    admin
        .batch_execute(
            "BEGIN; UPDATE spool_jobs SET updated_ns = updated_ns; \
             SELECT pg_stat_force_next_flush(); COMMIT",
        )
        .await
        .expect("churn");
}

async fn admin(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect as admin");
    tokio::spawn(connection);
    client
}

async fn beanstalkd<S: Session>(session: &mut S, requests: Vec<Request>) -> Vec<Response> {
    let want = requests.len();
    session.submit(requests).expect("submit");
    let mut replies = Vec::new();
    poll_fn(|cx| {
        while replies.len() < want {
            match session.poll_recv(cx, &mut replies) {
                Poll::Ready(true) => {}
                Poll::Ready(false) => panic!("session closed with {replies:?}"),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(())
    })
    .await;
    replies
}

fn put(body: &'static [u8], delay_secs: u32) -> Request {
    put_at(body, 10, delay_secs)
}

fn put_at(body: &'static [u8], pri: u32, delay_secs: u32) -> Request {
    Request::Put(Put {
        pri,
        delay_secs,
        ttr_secs: 30,
        body: PutBody::Complete(Bytes::from_static(body)),
    })
}

/// The ids of `replies`, each of which must be `INSERTED`.
fn inserted(replies: &[Response]) -> Vec<u64> {
    replies
        .iter()
        .map(|r| match r {
            Response::Inserted(id) => *id,
            other => panic!("inserted: {other:?}"),
        })
        .collect()
}

#[tokio::test]
async fn a_schema_newer_than_the_binary_is_refused() {
    let url = TestCluster::shared().create_database();
    let clock = Clock::manual(START_NS);
    drop(node(&url, "a", &clock).await);
    let newer = SCHEMA_VERSION + 1;
    admin(&url)
        .await
        .execute("INSERT INTO spool_schema (version) VALUES ($1)", &[&newer])
        .await
        .expect("insert a newer version");
    match PgBroker::connect(config(&url, "a"), clock).await {
        Err(ConnectError::SchemaTooNew { found, known }) => {
            assert_eq!((found, known), (newer, SCHEMA_VERSION));
        }
        other => panic!("a newer schema must be refused: {other:?}"),
    }
}

#[tokio::test]
async fn connecting_twice_migrates_once() {
    let url = TestCluster::shared().create_database();
    let clock = Clock::manual(START_NS);
    let (a, b) = tokio::join!(node(&url, "a", &clock), node(&url, "b", &clock));
    let versions: i64 = admin(&url)
        .await
        .query_one("SELECT count(*) FROM spool_schema", &[])
        .await
        .expect("count versions")
        .get(0);
    assert_eq!(versions, i64::from(SCHEMA_VERSION));
    let made = a.enqueue(queue("q"), job("x")).await.expect("enqueue").0;
    assert_eq!(b.get(made.id).await.expect("get").id, made.id);
}

#[tokio::test]
async fn an_unreachable_database_is_a_clear_error() {
    let dir = std::env::temp_dir().join(format!("spool-pg-nothing-{}", std::process::id()));
    let url = format!("host={} port=5432 user=spool dbname=none", dir.display());
    let mut config = PgConfig::new(url, "a");
    config.connect_timeout = Duration::from_secs(2);
    match PgBroker::connect(config, Clock::manual(START_NS)).await {
        Err(error @ ConnectError::Unreachable(_)) => {
            assert!(error.to_string().contains("cannot reach the database"));
        }
        other => panic!("an unreachable database must be refused: {other:?}"),
    }
    let bad = PgBroker::connect(PgConfig::new("host=", "a"), Clock::manual(START_NS)).await;
    assert!(
        matches!(
            bad,
            Err(ConnectError::BadUrl(_) | ConnectError::Unreachable(_))
        ),
        "{bad:?}"
    );
}

#[tokio::test]
async fn an_exhausted_pool_fails_fast_and_recovers() {
    let url = TestCluster::shared().create_database();
    let mut config = config(&url, "a");
    config.pool_size = 1;
    config.acquire_timeout = Duration::from_millis(100);
    let broker = PgBroker::connect(config, Clock::manual(START_NS))
        .await
        .expect("connect");
    let made = broker
        .enqueue(queue("q"), job("x"))
        .await
        .expect("enqueue")
        .0;
    // Another client holds the job's row: a cancel waits for it, holding
    // the pool's only connection.
    let locker = admin(&url).await;
    locker.batch_execute("BEGIN").await.expect("begin");
    locker
        .execute(
            "SELECT 1 FROM spool_jobs WHERE id = $1 FOR UPDATE",
            &[&(made.id as i64)],
        )
        .await
        .expect("lock the row");
    let canceller = broker.clone();
    let cancel = tokio::spawn(async move {
        let op = Op::Cancel {
            id: made.id,
            expected_version: None,
        };
        canceller.call(op).await
    });
    // Until the cancel has the connection, a get may still get it; then
    // every get is refused at once with the pool's error.
    let mut refused = None;
    for _ in 0..YIELDS_MAX {
        match broker.get(made.id).await {
            Err(error) => {
                refused = Some(error);
                break;
            }
            Ok(_) => tokio::task::yield_now().await,
        }
    }
    match refused {
        Some(BrokerError::Storage(message)) => {
            assert!(message.contains("connections stayed busy"), "{message}");
        }
        other => panic!("an exhausted pool answers a storage error: {other:?}"),
    }
    assert_eq!(
        broker.health().storage_failed,
        None,
        "a busy pool is no storage failure"
    );
    // The refused acquire waited its whole timeout (100 ms) and is in the
    // acquire-wait histogram beside the acquires that got a connection.
    let waits = broker.pool_acquire_wait();
    let below_timeout = waits
        .cumulative()
        .take_while(|(bound, _)| *bound < 0.1)
        .last()
        .map_or(0, |(_, below)| below);
    assert!(
        waits.count() >= 3 && waits.count() - below_timeout >= 1,
        "the enqueue, the cancel and a refused get: {waits:?}"
    );
    assert!(waits.sum() >= 0.1, "{waits:?}");
    locker.batch_execute("COMMIT").await.expect("commit");
    let cancelled = cancel.await.expect("join").expect("cancel").into_job();
    assert_eq!(cancelled.expect("a job").state, JobState::Cancelled);
    assert_eq!(
        broker.get(made.id).await.expect("get").state,
        JobState::Cancelled
    );
}

#[tokio::test]
async fn lost_connections_are_replaced_and_a_vanished_database_is_a_storage_failure() {
    let url = TestCluster::shared().create_database();
    let clock = Clock::manual(START_NS);
    let broker = node(&url, "a", &clock).await;
    let made = broker
        .enqueue(queue("q"), job("x"))
        .await
        .expect("enqueue")
        .0;
    let admin_client = admin(&TestCluster::shared().url("postgres")).await;
    let database = url.rsplit('=').next().expect("a dbname").to_string();
    admin_client
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = $1 AND pid <> pg_backend_pid()",
            &[&database],
        )
        .await
        .expect("terminate the broker's connections");
    // A connection the server closed may fail one operation; the pool
    // replaces it.
    let mut seen = None;
    for _ in 0..5 {
        if let Ok(job) = broker.get(made.id).await {
            seen = Some(job);
            break;
        }
    }
    assert_eq!(seen.expect("the broker reconnects").id, made.id);
    assert_eq!(broker.health().storage_failed, None);
    admin_client
        .execute(&format!("DROP DATABASE {database} WITH (FORCE)"), &[])
        .await
        .expect("drop the database");
    let mut failed = false;
    for _ in 0..3 {
        if let Err(error) = broker.get(made.id).await {
            assert!(matches!(error, BrokerError::Storage(_)), "{error:?}");
            failed = true;
            break;
        }
    }
    assert!(failed, "operations fail once the database is gone");
    assert!(
        broker.health().storage_failed.is_some(),
        "readiness learns that the database is away"
    );
    assert!(broker.pool_stats().query_errors >= 1);
}

#[tokio::test]
async fn nodes_share_jobs_waits_and_a_global_concurrency() {
    let url = TestCluster::shared().create_database();
    let clock = Clock::manual(START_NS);
    let a = node(&url, "a", &clock).await;
    let b = node(&url, "b", &clock).await;
    a.call(Op::SetPolicy {
        queue: queue("c"),
        policy: QueuePolicy {
            concurrency: Some(1),
            ..QueuePolicy::default()
        },
    })
    .await
    .expect("policy");
    for payload in ["1", "2"] {
        a.enqueue(queue("c"), job(payload)).await.expect("enqueue");
    }
    let first = a.reserve(vec![queue("c")], 5, 0).await.expect("reserve");
    assert_eq!(first.len(), 1);
    assert!(
        b.reserve(vec![queue("c")], 5, 0)
            .await
            .expect("reserve")
            .is_empty(),
        "the concurrency holds across nodes"
    );
    // A reserve parked on b wakes when a frees the slot (a notification
    // from a's transaction to b's listener; the clock never moves).
    let reserver = b.clone();
    let parked = tokio::spawn(async move { reserver.reserve(vec![queue("c")], 5, 60_000).await });
    a.complete(first[0].lease, None).await.expect("complete");
    let woke = parked.await.expect("join").expect("reserve");
    assert_eq!(woke.len(), 1);
    // A beanstalkd worker on a sees a job enqueued on b.
    let mut session = a.open_session(Peer::default()).expect("session");
    let made = b
        .enqueue(queue("default"), job("for a"))
        .await
        .expect("enqueue")
        .0;
    let replies = beanstalkd(&mut session, vec![Request::Reserve]).await;
    assert!(
        matches!(&replies[0], Response::Reserved { id, .. } if *id == made.id),
        "{replies:?}"
    );
}

/// Completions arriving together at one node go to the database as one
/// statement; a bad lease among them is refused alone and the others
/// complete with their own results.
#[tokio::test]
async fn concurrent_completions_with_bad_ones_among_them() {
    const GOOD: usize = 40;
    let url = TestCluster::shared().create_database();
    let clock = Clock::manual(START_NS);
    let a = node(&url, "a", &clock).await;
    for n in 0..GOOD + 2 {
        a.enqueue(queue("g"), job(if n % 2 == 0 { "even" } else { "odd" }))
            .await
            .expect("enqueue");
    }
    let mut held = a
        .reserve(vec![queue("g")], (GOOD + 2) as u32, 0)
        .await
        .expect("reserve");
    assert_eq!(held.len(), GOOD + 2);
    let done_before = held.pop().expect("one to complete first");
    let too_large = held.pop().expect("one with a result over the limit");
    a.complete(done_before.lease, None)
        .await
        .expect("complete alone");
    let mut stale = held[0].lease;
    stale.token += 1_000;
    // A stale lease of a job whose good completion joins the same group
    // after it: the row must go to the good one, not to the first asker.
    let mut stale_first = held[1].lease;
    stale_first.token += 1_000;
    let stale_first_call = {
        let broker = a.clone();
        tokio::spawn(async move { broker.complete(stale_first, None).await })
    };

    let mut calls = Vec::new();
    for (n, leased) in held.iter().enumerate() {
        let (broker, lease) = (a.clone(), leased.lease);
        let result = Bytes::from(format!("result {n}"));
        calls.push(tokio::spawn(async move {
            broker.complete(lease, Some(result)).await
        }));
    }
    let bad = [
        (done_before.lease, None),
        (stale, None),
        (too_large.lease, Some(Bytes::from(vec![b'x'; 70_000]))),
    ];
    let mut bad_calls = Vec::new();
    for (lease, result) in bad {
        let broker = a.clone();
        bad_calls.push(tokio::spawn(
            async move { broker.complete(lease, result).await },
        ));
    }
    for (n, call) in calls.into_iter().enumerate() {
        let done = call.await.expect("join").expect("a held lease completes");
        assert_eq!(done.id, held[n].job.id);
        assert_eq!(done.state, JobState::Completed);
        assert_eq!(done.result, Some(Bytes::from(format!("result {n}"))));
    }
    let mut refusals = vec![stale_first_call
        .await
        .expect("join")
        .expect_err("a stale lease is refused")];
    for call in bad_calls {
        refusals.push(call.await.expect("join").expect_err("refused"));
    }
    // Never handed out, completed already, never handed out.
    for refusal in &refusals[..3] {
        assert_eq!(
            *refusal,
            BrokerError::Conflict(spool_broker::Conflict::LeaseExpired)
        );
    }
    assert!(
        matches!(refusals[3], BrokerError::TooLarge { .. }),
        "{:?}",
        refusals[3]
    );
    assert_eq!(
        a.get(too_large.job.id).await.expect("get").state,
        JobState::Reserved,
        "a refused completion changes nothing"
    );
}

/// Completions that go in one group statement, some in a queue that keeps
/// no final jobs (`retention_max_jobs` 0): those rows and their keys are
/// deleted, the others moved to the final jobs, and each caller is answered
/// with its own job as completed, result and version included.
#[tokio::test]
async fn grouped_completions_in_a_queue_keeping_none_delete_their_rows() {
    const EACH: usize = 20;
    let url = TestCluster::shared().create_database();
    let clock = Clock::manual(START_NS);
    let a = node(&url, "a", &clock).await;
    a.call(Op::SetPolicy {
        queue: queue("none"),
        policy: QueuePolicy {
            retention_max_jobs: Some(0),
            ..QueuePolicy::default()
        },
    })
    .await
    .expect("policy");
    for n in 0..EACH {
        for q in ["none", "kept"] {
            let keyed = NewJob {
                idempotency_key: Some(format!("{q}-{n}")),
                ..job("x")
            };
            a.enqueue(queue(q), keyed).await.expect("enqueue");
        }
    }
    let held = a
        .reserve(vec![queue("none"), queue("kept")], (2 * EACH) as u32, 0)
        .await
        .expect("reserve");
    assert_eq!(held.len(), 2 * EACH);
    let round_trips_before = a.pool_stats().round_trips;
    let calls: Vec<_> = held
        .iter()
        .enumerate()
        .map(|(n, leased)| {
            let (broker, lease) = (a.clone(), leased.lease);
            let result = Bytes::from(format!("result {n}"));
            tokio::spawn(async move { broker.complete(lease, Some(result)).await })
        })
        .collect();
    for (n, call) in calls.into_iter().enumerate() {
        let done = call.await.expect("join").expect("a held lease completes");
        assert_eq!((done.id, done.state), (held[n].job.id, JobState::Completed));
        assert_eq!(done.result, Some(Bytes::from(format!("result {n}"))));
        assert_eq!(done.version, held[n].job.version + 1);
        assert_eq!(done.queue, held[n].job.queue);
    }
    assert!(
        a.pool_stats().round_trips - round_trips_before < (2 * EACH) as u64,
        "the completions went in groups"
    );
    let admin = admin(&url).await;
    let rows: Vec<(String, String, i64)> = admin
        .query(
            "SELECT queue, state, count(*) FROM spool_jobs GROUP BY queue, state",
            &[],
        )
        .await
        .expect("count")
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect();
    assert_eq!(rows, vec![("kept".into(), "completed".into(), EACH as i64)]);
    let keys: Vec<String> = admin
        .query("SELECT key FROM spool_idempotency ORDER BY key", &[])
        .await
        .expect("keys")
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert!(
        keys.len() == EACH && keys.iter().all(|k| k.starts_with("kept-")),
        "{keys:?}"
    );
}

#[tokio::test]
async fn concurrent_enqueues_with_bad_ones_among_them() {
    const GOOD: usize = 40;
    let url = TestCluster::shared().create_database();
    let clock = Clock::manual(START_NS);
    let a = node(&url, "a", &clock).await;
    a.call(Op::SetPolicy {
        queue: queue("full"),
        policy: QueuePolicy {
            max_jobs: Some(1),
            ..QueuePolicy::default()
        },
    })
    .await
    .expect("policy");
    a.enqueue(queue("full"), job("first"))
        .await
        .expect("the one place");
    let round_trips_before = a.pool_stats().round_trips;
    // Spawned together: they join one node's groups of enqueues, the bad
    // ones among the good.
    let mut calls = Vec::new();
    for n in 0..GOOD {
        let broker = a.clone();
        let new = NewJob {
            payload: Bytes::from(format!("job {n}")),
            priority: Some(n as u32),
            ..NewJob::default()
        };
        calls.push(tokio::spawn(async move {
            broker
                .enqueue(queue(if n % 2 == 0 { "e" } else { "o" }), new)
                .await
        }));
    }
    let too_large = NewJob {
        payload: Bytes::from(vec![b'x'; 70_000]),
        ..NewJob::default()
    };
    let broker = a.clone();
    let bad_calls = vec![tokio::spawn(async move {
        broker.enqueue(queue("e"), too_large).await
    })];
    let mut answers = Vec::new();
    for call in calls {
        answers.push(call.await.expect("join").expect("a good job is enqueued"));
    }
    let refusals: Vec<BrokerError> = futures_join(bad_calls).await;
    assert!(
        a.pool_stats().round_trips - round_trips_before < GOOD as u64,
        "the good enqueues went in groups"
    );
    let mut ids = std::collections::HashSet::new();
    for (n, (made, duplicate)) in answers.into_iter().enumerate() {
        assert!(!duplicate);
        assert!(ids.insert(made.id), "one id a job");
        let stored = a.get(made.id).await.expect("get");
        assert_eq!(stored.payload, Bytes::from(format!("job {n}")));
        assert_eq!(stored.queue, if n % 2 == 0 { "e" } else { "o" });
        assert_eq!(stored.priority, n as u32);
        assert_eq!(stored.state, JobState::Ready);
        assert_eq!(stored, made, "the answer is the stored job");
    }
    assert!(
        matches!(refusals[0], BrokerError::TooLarge { .. }),
        "{:?}",
        refusals[0]
    );
    let leased = a.reserve(vec![queue("e")], 100, 0).await.expect("reserve");
    assert_eq!(leased.len(), GOOD / 2, "the refused job is nowhere");

    // A group the queue has no room for: refused as a batch, each member
    // runs alone, so the places left are taken and the rest refused.
    a.call(Op::SetPolicy {
        queue: queue("full"),
        policy: QueuePolicy {
            max_jobs: Some(4),
            ..QueuePolicy::default()
        },
    })
    .await
    .expect("policy");
    let mut calls = Vec::new();
    for _ in 0..6 {
        let broker = a.clone();
        calls.push(tokio::spawn(async move {
            broker.enqueue(queue("full"), job("maybe")).await
        }));
    }
    let mut made = 0;
    for call in calls {
        match call.await.expect("join") {
            Ok(_) => made += 1,
            Err(error) => assert_eq!(error, BrokerError::QueueFull { max_jobs: 4 }),
        }
    }
    assert_eq!(made, 3, "one place was taken before");
}

/// Each spawned call's refusal, in order.
async fn futures_join<T: std::fmt::Debug + Send + 'static>(
    calls: Vec<tokio::task::JoinHandle<Result<T, BrokerError>>>,
) -> Vec<BrokerError> {
    let mut refusals = Vec::new();
    for call in calls {
        refusals.push(call.await.expect("join").expect_err("refused"));
    }
    refusals
}

#[tokio::test]
async fn concurrent_beanstalkd_deletes_with_bad_ones_among_them() {
    use spool_broker::SessionBroker;
    const GOOD: usize = 40;
    let url = TestCluster::shared().create_database();
    let clock = Clock::manual(START_NS);
    let a = node(&url, "a", &clock).await;
    for _ in 0..GOOD + 2 {
        a.enqueue(queue("d"), job("x")).await.expect("enqueue");
    }
    let mut held = a
        .reserve(vec![queue("d")], (GOOD + 2) as u32, 0)
        .await
        .expect("reserve");
    assert_eq!(held.len(), GOOD + 2);
    let deleted_before = held.pop().expect("one deleted first");
    let completed_before = held.pop().expect("one completed first");
    a.delete_leased(deleted_before.lease)
        .await
        .expect("delete alone");
    a.complete(completed_before.lease, None)
        .await
        .expect("complete");
    let mut stale = held[0].lease;
    stale.token += 1_000;
    let round_trips_before = a.pool_stats().round_trips;
    let mut calls = Vec::new();
    for leased in &held {
        let (broker, lease) = (a.clone(), leased.lease);
        calls.push(tokio::spawn(
            async move { broker.delete_leased(lease).await },
        ));
    }
    let mut bad_calls = Vec::new();
    for lease in [deleted_before.lease, completed_before.lease, stale] {
        let broker = a.clone();
        bad_calls.push(tokio::spawn(
            async move { broker.delete_leased(lease).await },
        ));
    }
    for call in calls {
        call.await.expect("join").expect("a held job is deleted");
    }
    let refusals = futures_join(bad_calls).await;
    assert_eq!(refusals[0], BrokerError::NotFound, "deleted already");
    assert_eq!(
        refusals[1],
        BrokerError::Conflict(spool_broker::Conflict::LeaseExpired),
        "completed: no longer held"
    );
    assert_eq!(
        refusals[2],
        BrokerError::NotFound,
        "held[0] was deleted by its own lease"
    );
    assert!(
        a.pool_stats().round_trips - round_trips_before < GOOD as u64,
        "the good deletes went in groups"
    );
    for leased in &held {
        assert_eq!(a.get(leased.job.id).await, Err(BrokerError::NotFound));
    }
    assert_eq!(
        a.get(completed_before.job.id).await.expect("kept").state,
        JobState::Completed
    );
}

#[tokio::test]
async fn a_restarting_node_hands_back_only_its_own_leases() {
    let url = TestCluster::shared().create_database();
    let clock = Clock::manual(START_NS);
    let a = node(&url, "a", &clock).await;
    let b = node(&url, "b", &clock).await;
    let one = a.enqueue(queue("q"), job("1")).await.expect("enqueue").0;
    let two = a.enqueue(queue("q"), job("2")).await.expect("enqueue").0;
    assert_eq!(
        a.reserve(vec![queue("q")], 1, 0).await.expect("r")[0]
            .job
            .id,
        one.id
    );
    assert_eq!(
        b.reserve(vec![queue("q")], 1, 0).await.expect("r")[0]
            .job
            .id,
        two.id
    );
    drop(a);
    let a = node(&url, "a", &clock).await;
    let back = a.get(one.id).await.expect("get");
    assert_eq!(back.state, JobState::Ready);
    assert_eq!(back.version, one.version, "a lease ending is no change");
    assert_eq!(a.get(two.id).await.expect("get").state, JobState::Reserved);
    // b's lease ends at its deadline, on any node's timers.
    a.advance_clock(60_001 * 1_000_000).await.expect("timers");
    let expired = b.get(two.id).await.expect("get");
    assert_eq!(
        expired.state,
        JobState::Delayed,
        "retried after its backoff"
    );
    assert_eq!(expired.attempts, 1);
}

#[tokio::test]
async fn beanstalkd_commands_over_typed_operations() {
    let url = TestCluster::shared().create_database();
    let clock = Clock::manual(START_NS);
    let broker = node(&url, "a", &clock).await;
    let mut s = broker.open_session(Peer::default()).expect("session");
    let tube = queue("bt");
    let replies = beanstalkd(
        &mut s,
        vec![
            Request::Use(tube.clone()),
            put(b"one", 0),
            put(b"two", 0),
            put(b"later", 60),
            Request::PeekReady,
            Request::PeekDelayed,
            Request::PeekBuried,
            Request::ListTubeUsed,
            Request::Watch(tube.clone()),
            Request::Ignore(queue("default")),
            Request::Ignore(tube.clone()),
            Request::ListTubesWatched,
        ],
    )
    .await;
    let ids = inserted(&replies[1..4]);
    assert_eq!(
        replies[4..],
        [
            Response::Found {
                id: ids[0],
                body: Bytes::from_static(b"one")
            },
            Response::Found {
                id: ids[2],
                body: Bytes::from_static(b"later")
            },
            Response::NotFound,
            Response::Using(tube.clone()),
            Response::Watching(2),
            Response::Watching(1),
            Response::NotIgnored,
            Response::TubeList(vec![tube.clone()]),
        ]
    );
    let replies = beanstalkd(
        &mut s,
        vec![
            Request::ReserveWithTimeout {
                timeout_secs: Some(0),
            },
            Request::Touch(ids[0]),
            Request::Bury { id: ids[0], pri: 3 },
            Request::Reserve,
            Request::Release {
                id: ids[1],
                pri: 7,
                delay_secs: 0,
            },
            Request::Touch(ids[1]),
            Request::Kick { bound: 5 },
            Request::Peek(ids[0]),
            Request::KickJob(ids[0]),
            Request::Delete(1 << 40),
            Request::ReserveJob(ids[1]),
        ],
    )
    .await;
    assert!(
        matches!(&replies[0], Response::Reserved { id, .. } if *id == ids[0]),
        "{replies:?}"
    );
    assert!(
        matches!(&replies[3], Response::Reserved { id, .. } if *id == ids[1]),
        "{replies:?}"
    );
    assert_eq!(
        replies[1..],
        [
            Response::Touched,
            Response::Buried,
            replies[3].clone(),
            Response::Released,
            Response::NotFound,
            Response::Kicked(1),
            Response::Found {
                id: ids[0],
                body: Bytes::from_static(b"one")
            },
            Response::NotFound,
            Response::NotFound,
            Response::NotFound,
        ]
    );
    let buried_then_kicked = broker.get(ids[0]).await.expect("get");
    assert_eq!(
        (buried_then_kicked.state, buried_then_kicked.priority),
        (JobState::Ready, 3),
        "bury took the new priority"
    );
    assert_eq!(broker.get(ids[1]).await.expect("get").priority, 7);
    let replies = beanstalkd(
        &mut s,
        vec![
            Request::StatsJob(ids[2]),
            Request::StatsTube(tube.clone()),
            Request::StatsTube(queue("nothing-here")),
            Request::Stats,
            Request::ListTubes,
            Request::PauseTube {
                tube: tube.clone(),
                delay_secs: 10,
            },
            Request::ReserveWithTimeout {
                timeout_secs: Some(0),
            },
        ],
    )
    .await;
    match &replies[0] {
        Response::StatsJob(stats) => {
            assert_eq!(
                (stats.state, stats.pri, stats.ttr_secs),
                ("delayed", 10, 30)
            );
        }
        other => panic!("stats-job: {other:?}"),
    }
    match &replies[1] {
        Response::StatsTube(stats) => {
            assert_eq!(
                (stats.current_jobs_ready, stats.current_jobs_delayed),
                (2, 1)
            );
        }
        other => panic!("stats-tube: {other:?}"),
    }
    assert_eq!(replies[2], Response::NotFound);
    match &replies[3] {
        Response::Stats(stats) => assert_eq!(stats.current_jobs_ready, 2),
        other => panic!("stats: {other:?}"),
    }
    assert_eq!(
        replies[4],
        Response::TubeList(vec![queue("default"), queue("bt")])
    );
    assert_eq!(replies[5..], [Response::Paused, Response::TimedOut]);
    match broker
        .call(Op::GetQueue { queue: tube })
        .await
        .expect("queue")
    {
        Outcome::Queue(info) => assert!(info.paused_until_ms.is_some()),
        other => panic!("a queue: {other:?}"),
    }
}

#[tokio::test]
async fn shutdown_ends_waits_and_closes_idle_sessions() {
    let url = TestCluster::shared().create_database();
    let clock = Clock::manual(START_NS);
    let broker = node(&url, "a", &clock).await;
    let reserver = broker.clone();
    let parked =
        tokio::spawn(async move { reserver.reserve(vec![queue("none")], 1, 3_600_000).await });
    let mut idle = broker.open_session(Peer::default()).expect("session");
    let mut busy = broker.open_session(Peer::default()).expect("session");
    broker
        .enqueue(queue("default"), job("held"))
        .await
        .expect("enqueue");
    let replies = beanstalkd(&mut busy, vec![Request::Reserve]).await;
    let Response::Reserved { id, .. } = replies[0] else {
        panic!("reserved: {replies:?}");
    };
    // Parked first: make sure the reserve is waiting, then shut down.
    let mut parked_seen = false;
    for _ in 0..YIELDS_MAX {
        let snapshot = broker
            .snapshot(spool_broker::SnapshotScope::Queues)
            .await
            .expect("snapshot");
        if snapshot.waits.reserve == 1 {
            parked_seen = true;
            break;
        }
        tokio::task::yield_now().await;
    }
    assert!(parked_seen, "the reserve parks");
    broker.begin_shutdown();
    assert!(parked.await.expect("join").expect("reserve").is_empty());
    let mut out = Vec::new();
    let closed = poll_fn(|cx| idle.poll_recv(cx, &mut out)).await;
    assert!(!closed && out.is_empty(), "an idle session closes");
    assert_eq!(
        broker.enqueue(queue("default"), job("late")).await,
        Err(BrokerError::Draining)
    );
    // The session holding a job stays until it gives it back.
    let replies = beanstalkd(&mut busy, vec![Request::Delete(id), Request::Reserve]).await;
    assert_eq!(replies, vec![Response::Deleted, Response::TimedOut]);
    let mut out = Vec::new();
    let closed = poll_fn(|cx| busy.poll_recv(cx, &mut out)).await;
    assert!(!closed, "then it closes too");
}

/// An idle beanstalkd session is a small record: its task and channels
/// start at its first request (an idle PostgreSQL-backed connection cost
/// 5.1 KiB with them). Opened, counted and closed as before; a started one
/// still hands its lease back when its client hangs up.
#[tokio::test]
async fn a_session_starts_its_task_at_its_first_request() {
    let url = TestCluster::shared().create_database();
    let clock = Clock::manual(START_NS);
    let broker = node(&url, "a", &clock).await;
    let alive_tasks = || {
        tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks()
    };
    // Nothing awaits between the counts: no other task can start or end.
    let before = alive_tasks();
    let mut idle: Vec<_> = (0..100)
        .map(|_| broker.open_session(Peer::default()).expect("session"))
        .collect();
    let mut worker = broker.open_session(Peer::default()).expect("session");
    assert_eq!(alive_tasks(), before, "idle sessions start no task");
    idle.truncate(50);
    broker
        .enqueue(queue("default"), job("held"))
        .await
        .expect("enqueue");
    let before = alive_tasks();
    worker.submit(vec![Request::Reserve]).expect("submit");
    assert_eq!(alive_tasks(), before + 1, "the first request starts one");
    let mut replies = Vec::new();
    while replies.is_empty() {
        let open = poll_fn(|cx| worker.poll_recv(cx, &mut replies)).await;
        assert!(open, "the session closed");
    }
    let Response::Reserved { id, .. } = replies[0] else {
        panic!("reserved: {replies:?}");
    };
    // The dormant ones were counted in and the dropped ones out, as
    // running ones are.
    let stats = server_stats(&mut idle[0]).await;
    assert_eq!(
        (stats.current_connections, stats.total_connections),
        (51, 101)
    );
    // A dormant session that hangs up closes at once.
    let mut last = idle.pop().expect("an idle session");
    last.hangup();
    let mut out = Vec::new();
    assert!(!poll_fn(|cx| last.poll_recv(cx, &mut out)).await);
    assert_eq!(
        last.submit(vec![Request::ListTubeUsed]),
        Err(BrokerError::Closed)
    );
    // The worker hangs up holding the job: it is released.
    worker.hangup();
    drop(worker);
    let mut state = None;
    for _ in 0..YIELDS_MAX {
        let job = broker.call(Op::Get { id }).await.expect("get");
        state = Some(job.into_job().expect("a job").state);
        if state == Some(JobState::Ready) {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(state, Some(JobState::Ready), "the lease is handed back");
}

/// Polls a session once, without waiting: whether it is still open.
fn poll_once<S: Session>(session: &mut S, replies: &mut Vec<Response>) -> bool {
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    !matches!(session.poll_recv(&mut cx, replies), Poll::Ready(false))
}

/// Waits (polling) until `session`'s task has parked, at most 10 s.
async fn until_parked<S: Session + std::fmt::Debug>(session: &mut S) {
    let mut replies = Vec::new();
    for _ in 0..200 {
        assert!(poll_once(session, &mut replies), "closed: {session:?}");
        if format!("{session:?}").contains("dormant") {
            assert!(replies.is_empty(), "{replies:?}");
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the session's task never parked: {session:?}");
}

/// A session whose task waited `SESSION_PARK_AFTER` for a request holding
/// no lease parks: the task and its channels end (most of what a
/// connection that sent a command costs a PostgreSQL node), the session
/// keeps its tubes and stays counted, and its next request starts a task
/// again. One holding a lease keeps its task; a parked session dropped
/// before it took its state back is counted out.
#[tokio::test]
async fn an_idle_session_parks_its_task_and_keeps_its_tubes() {
    let url = TestCluster::shared().create_database();
    let clock = Clock::manual(START_NS);
    let broker = node(&url, "a", &clock).await;
    let tube = |name: &str| spool_proto::TubeName::new(name.as_bytes()).expect("a tube name");
    let mut session = broker.open_session(Peer::default()).expect("session");
    let replies = beanstalkd(
        &mut session,
        vec![
            Request::Use(tube("other")),
            Request::Watch(tube("other")),
            Request::Ignore(tube("default")),
        ],
    )
    .await;
    assert_eq!(
        replies,
        vec![
            Response::Using(tube("other")),
            Response::Watching(2),
            Response::Watching(1),
        ]
    );
    broker
        .enqueue(queue("held"), job("held"))
        .await
        .expect("enqueue");
    let mut holder = broker.open_session(Peer::default()).expect("session");
    let replies = beanstalkd(
        &mut holder,
        vec![
            Request::Watch(tube("held")),
            Request::ReserveWithTimeout {
                timeout_secs: Some(0),
            },
        ],
    )
    .await;
    assert!(
        matches!(replies[1], Response::Reserved { .. }),
        "{replies:?}"
    );

    until_parked(&mut session).await;
    assert!(
        format!("{holder:?}").contains("running"),
        "a session holding a lease keeps its task: {holder:?}"
    );
    let stats = server_stats(&mut holder).await;
    assert_eq!(stats.current_connections, 2, "a parked session is open");

    // Started again with its tubes.
    let replies = beanstalkd(
        &mut session,
        vec![
            Request::ListTubeUsed,
            Request::ListTubesWatched,
            put(b"after", 0),
        ],
    )
    .await;
    assert_eq!(replies[0], Response::Using(tube("other")));
    assert_eq!(replies[1], Response::TubeList(vec![tube("other")]));
    assert!(matches!(replies[2], Response::Inserted(_)), "{replies:?}");
    assert!(format!("{session:?}").contains("running"), "{session:?}");
    match broker
        .call(Op::List {
            queue: queue("other"),
            state: JobState::Ready,
            after: None,
            limit: 10,
        })
        .await
        .expect("list")
    {
        Outcome::Page(page) => assert_eq!(page.jobs.len(), 1, "put in `other`"),
        other => panic!("a page, not {other:?}"),
    }

    // Parks again; dropped with its state unclaimed (never polled after
    // its task parked), it is counted out.
    until_parked(&mut session).await;
    let mut third = broker.open_session(Peer::default()).expect("session");
    let _ = beanstalkd(&mut third, vec![Request::ListTubeUsed]).await;
    tokio::time::sleep(spool_broker::SESSION_PARK_AFTER * 2).await;
    drop(third);
    drop(session);
    let stats = server_stats(&mut holder).await;
    assert_eq!((stats.current_connections, stats.total_connections), (1, 3));
}

fn schedule_spec(cron: &str, queue_name: &str) -> ScheduleSpec {
    ScheduleSpec {
        cron: cron.into(),
        timezone: "UTC".into(),
        queue: queue(queue_name),
        job: job("tick"),
        misfire: Misfire::Once,
        catch_up_max: 100,
        jitter_ms: 0,
        max_backlog: None,
        paused: false,
    }
}

/// Three nodes run their firing pass at the same instants, racing: each
/// due instant of the schedule is one job, whichever node fires it.
#[tokio::test]
async fn nodes_racing_fire_each_instant_of_a_schedule_once() {
    const INSTANTS: u64 = 20;
    let url = TestCluster::shared().create_database();
    let clock = Clock::manual(START_NS);
    let nodes = [
        node(&url, "a", &clock).await,
        node(&url, "b", &clock).await,
        node(&url, "c", &clock).await,
    ];
    let name = queue("every-second");
    nodes[0]
        .call(Op::PutSchedule {
            name: name.clone(),
            spec: Box::new(schedule_spec("@every 1s", "ticks")),
        })
        .await
        .expect("put the schedule");
    for _ in 0..INSTANTS {
        clock.advance(1_000_000_000);
        let (a, b, c) = tokio::join!(
            nodes[0].run_timers(),
            nodes[1].run_timers(),
            nodes[2].run_timers()
        );
        a.and(b).and(c).expect("every node's timers run");
    }
    let page = match nodes[1]
        .call(Op::List {
            queue: queue("ticks"),
            state: JobState::Ready,
            after: None,
            limit: 1_000,
        })
        .await
        .expect("list")
    {
        Outcome::Page(page) => page,
        other => panic!("a page, not {other:?}"),
    };
    let start_ms = START_NS / 1_000_000;
    // In id order, which is firing order.
    let keys: Vec<String> = page
        .jobs
        .iter()
        .map(|j| j.idempotency_key.clone().expect("a firing's key"))
        .collect();
    let expected: Vec<String> = (1..=INSTANTS)
        .map(|i| format!("schedule:every-second:{}", start_ms + i * 1_000))
        .collect();
    assert_eq!(keys, expected, "one job per instant, every instant");
    for j in &page.jobs {
        assert_eq!(
            j.headers.get("spool-schedule").map(String::as_str),
            Some("every-second")
        );
    }
    match nodes[2]
        .call(Op::GetSchedule { name })
        .await
        .expect("get the schedule")
    {
        Outcome::Schedule { schedule, .. } => {
            assert_eq!(schedule.fires, INSTANTS);
            assert_eq!(schedule.misfires_skipped, 0);
            assert_eq!(schedule.last_fire_at_ms, Some(start_ms + INSTANTS * 1_000));
            assert_eq!(
                schedule.next_fire_at_ms,
                Some(start_ms + (INSTANTS + 1) * 1_000)
            );
        }
        other => panic!("a schedule, not {other:?}"),
    }
    // Every node's snapshot (`/metrics`) shows the durable counters.
    let snapshot = nodes[1]
        .snapshot(SnapshotScope::Queues)
        .await
        .expect("snapshot");
    let figures: Vec<_> = snapshot
        .schedules
        .iter()
        .map(|s| (s.name.as_str(), s.queue.as_str(), s.fires))
        .collect();
    assert_eq!(figures, [("every-second", "ticks", INSTANTS)]);
}

fn step(name: &str, q: &str, deps: &[&str], undo: bool) -> NewStep {
    NewStep {
        name: name.into(),
        queue: queue(q),
        job: job("do"),
        depends_on: deps.iter().map(|d| d.to_string()).collect(),
        compensate: undo.then(|| (queue("wf-undo"), job("undo"))),
    }
}

async fn take_one(broker: &PgBroker, q: &str) -> Leased {
    let mut leased = broker.reserve(vec![queue(q)], 1, 0).await.expect("reserve");
    assert_eq!(leased.len(), 1, "one job ready in {q}");
    leased.remove(0)
}

async fn workflow_state(broker: &PgBroker, id: u64) -> WorkflowView {
    match broker.call(Op::GetWorkflow { id }).await.expect("get") {
        Outcome::Workflow { workflow, .. } => *workflow,
        other => panic!("a workflow, not {other:?}"),
    }
}

/// Workers on two nodes take turns with a workflow's jobs: each completion
/// on one node starts the next step for the other, a failure on one node
/// compensates through the other, in reverse order of completion.
#[tokio::test]
async fn workers_on_two_nodes_advance_one_workflow() {
    let url = TestCluster::shared().create_database();
    let clock = Clock::manual(START_NS);
    let a = node(&url, "a", &clock).await;
    let b = node(&url, "b", &clock).await;
    let started = a
        .call(Op::StartWorkflow {
            workflow: NewWorkflow {
                name: Some("chain".into()),
                steps: vec![
                    step("one", "wf-1", &[], true),
                    step("two", "wf-2", &["one"], true),
                    step("three", "wf-3", &["two"], false),
                ],
                ..NewWorkflow::default()
            },
        })
        .await
        .expect("start");
    let Outcome::Workflow { workflow, .. } = started else {
        panic!("a workflow, not {started:?}");
    };
    let id = workflow.id;
    let one = take_one(&b, "wf-1").await;
    b.complete(one.lease, Some(Bytes::from_static(b"r1")))
        .await
        .expect("complete one on b");
    let two = take_one(&a, "wf-2").await;
    assert_eq!(
        two.job.parents.get("one"),
        Some(&Some(Bytes::from_static(b"r1"))),
        "step two gets step one's result"
    );
    assert_eq!(two.job.headers.get("spool-workflow"), Some(&id.to_string()));
    a.complete(two.lease, Some(Bytes::from_static(b"r2")))
        .await
        .expect("complete two on a");
    let three = take_one(&b, "wf-3").await;
    b.call(Op::Fail {
        lease: three.lease,
        error: "no courier".into(),
        retry_in_ms: None,
        permanent: true,
    })
    .await
    .expect("fail three for good on b");
    assert_eq!(
        workflow_state(&a, id).await.state,
        WorkflowState::Compensating
    );
    // Reverse order of completion: two's undo first, then one's.
    let undo_two = take_one(&a, "wf-undo").await;
    assert_eq!(
        undo_two.job.headers.get("spool-step").map(String::as_str),
        Some("two")
    );
    assert!(
        b.reserve(vec![queue("wf-undo")], 1, 0)
            .await
            .expect("reserve")
            .is_empty(),
        "one compensation at a time"
    );
    a.complete(undo_two.lease, None).await.expect("undo two");
    let undo_one = take_one(&b, "wf-undo").await;
    assert_eq!(
        undo_one.job.parents.get("one"),
        Some(&Some(Bytes::from_static(b"r1")))
    );
    b.complete(undo_one.lease, None).await.expect("undo one");
    let done = workflow_state(&b, id).await;
    assert_eq!(done.state, WorkflowState::Compensated);
    assert_eq!(done.error.as_deref(), Some("step three buried: no courier"));
    let snapshot = a.snapshot(SnapshotScope::Queues).await.expect("snapshot");
    assert_eq!(snapshot.workflows.current.get("compensated"), Some(&1));
    let states: Vec<StepState> = done.steps.iter().map(|s| s.state).collect();
    assert_eq!(
        states,
        [
            StepState::Compensated,
            StepState::Compensated,
            StepState::Failed
        ]
    );
}

async fn schedule_op(broker: &PgBroker, op: Op) -> ScheduleView {
    match broker.call(op).await.expect("a schedule operation") {
        Outcome::Schedule { schedule, .. } => *schedule,
        other => panic!("a schedule, not {other:?}"),
    }
}

async fn ready_in(broker: &PgBroker, q: &str) -> Vec<JobView> {
    match broker
        .call(Op::List {
            queue: queue(q),
            state: JobState::Ready,
            after: None,
            limit: 1_000,
        })
        .await
        .expect("list")
    {
        Outcome::Page(page) => page.jobs,
        other => panic!("a page, not {other:?}"),
    }
}

/// The schedule operations on PostgreSQL: misfires after a gap, the
/// backlog bound, pause and resume, trigger, replace, delete.
#[tokio::test]
async fn schedules_misfire_backlog_pause_trigger_and_delete() {
    let url = TestCluster::shared().create_database();
    let clock = Clock::manual(START_NS);
    let a = node(&url, "a", &clock).await;
    let start_ms = START_NS / 1_000_000;
    let name = queue("catch-up");
    let mut spec = schedule_spec("@every 1s", "caught");
    spec.misfire = Misfire::All;
    spec.catch_up_max = 3;
    let put = a
        .call(Op::PutSchedule {
            name: name.clone(),
            spec: Box::new(spec.clone()),
        })
        .await
        .expect("put");
    assert!(matches!(put, Outcome::Schedule { created: true, .. }));
    // Five instants missed at once: the latest three fire, two are counted.
    a.advance_clock(5_000_000_000).await.expect("timers");
    let keys: Vec<_> = ready_in(&a, "caught")
        .await
        .into_iter()
        .map(|j| j.idempotency_key.expect("key"))
        .collect();
    let expected: Vec<_> = (3..=5)
        .map(|i| format!("schedule:catch-up:{}", start_ms + i * 1_000))
        .collect();
    assert_eq!(keys, expected);
    let seen = schedule_op(&a, Op::GetSchedule { name: name.clone() }).await;
    assert_eq!((seen.fires, seen.misfires_skipped), (3, 2));
    // A replace keeps the firing state.
    spec.max_backlog = Some(3);
    let replaced = a
        .call(Op::PutSchedule {
            name: name.clone(),
            spec: Box::new(spec.clone()),
        })
        .await
        .expect("replace");
    let Outcome::Schedule { schedule, created } = replaced else {
        panic!("a schedule");
    };
    assert!(!created);
    assert_eq!(schedule.fires, 3);
    assert_eq!(schedule.last_fire_at_ms, Some(start_ms + 5_000));
    // Three of its jobs are ready: the next instant is a backlog skip.
    a.advance_clock(1_000_000_000).await.expect("timers");
    let seen = schedule_op(&a, Op::GetSchedule { name: name.clone() }).await;
    assert_eq!((seen.fires, seen.backlog_skips), (3, 1));
    assert_eq!(ready_in(&a, "caught").await.len(), 3);
    // Paused: nothing due; resumed: the next instant after now, no misfires.
    let paused = schedule_op(&a, Op::PauseSchedule { name: name.clone() }).await;
    assert_eq!(paused.next_fire_at_ms, None);
    a.advance_clock(10_000_000_000).await.expect("timers");
    let resumed = schedule_op(&a, Op::ResumeSchedule { name: name.clone() }).await;
    let now_ms = clock.now_ns() / 1_000_000;
    assert_eq!(resumed.next_fire_at_ms, Some(now_ms + 1_000));
    assert_eq!(resumed.misfires_skipped, 2);
    // A trigger fires now (the backlog does not hold it back) and leaves
    // the next instant where it was.
    let triggered = schedule_op(&a, Op::TriggerSchedule { name: name.clone() }).await;
    assert_eq!(triggered.fires, 4);
    assert_eq!(triggered.last_fire_at_ms, Some(now_ms));
    assert_eq!(triggered.next_fire_at_ms, Some(now_ms + 1_000));
    let last = a
        .get(triggered.last_job.expect("the trigger's job"))
        .await
        .expect("get");
    assert_eq!(
        last.idempotency_key,
        Some(format!("schedule:catch-up:{now_ms}"))
    );
    assert_eq!(
        last.headers.get("spool-scheduled-at").map(String::as_str),
        Some("2026-12-04T00:00:16Z")
    );
    assert!(matches!(
        a.call(Op::DeleteSchedule { name: name.clone() }).await,
        Ok(Outcome::Done)
    ));
    assert!(matches!(
        a.call(Op::GetSchedule { name }).await,
        Err(BrokerError::NotFound)
    ));
    // A bad rule names its field.
    let bad = schedule_spec("61 * * * *", "caught");
    match a
        .call(Op::PutSchedule {
            name: queue("bad"),
            spec: Box::new(bad),
        })
        .await
    {
        Err(BrokerError::Invalid { field, .. }) => assert_eq!(field, "cron"),
        other => panic!("a bad cron is invalid, not {other:?}"),
    }
}

/// The job changes the timer pass and purges make move workflows too: a
/// lease expiring on the last attempt buries the step (compensation
/// starts), a purged ready step is a cancelled one.
#[tokio::test]
async fn lease_expiry_and_purge_move_workflows() {
    let url = TestCluster::shared().create_database();
    let clock = Clock::manual(START_NS);
    let a = node(&url, "a", &clock).await;
    let mut expiring = step("only", "wf-expire", &[], false);
    expiring.job.max_attempts = Some(1);
    expiring.job.ttr_ms = Some(1_000);
    let start = |steps: Vec<NewStep>| Op::StartWorkflow {
        workflow: NewWorkflow {
            steps,
            ..NewWorkflow::default()
        },
    };
    let Outcome::Workflow {
        workflow: first, ..
    } = a.call(start(vec![expiring])).await.expect("start")
    else {
        panic!("a workflow");
    };
    let held = take_one(&a, "wf-expire").await;
    a.advance_clock(2_000_000_000).await.expect("timers");
    assert_eq!(
        a.get(held.job.id).await.expect("get").state,
        JobState::Buried
    );
    let expired = workflow_state(&a, first.id).await;
    assert_eq!(expired.state, WorkflowState::Compensated);
    assert!(
        expired
            .error
            .as_deref()
            .is_some_and(|e| e.starts_with("step only buried: lease expired")),
        "{:?}",
        expired.error
    );
    let Outcome::Workflow {
        workflow: second, ..
    } = a
        .call(start(vec![
            step("first", "wf-purge-1", &[], true),
            step("second", "wf-purge-2", &["first"], false),
        ]))
        .await
        .expect("start")
    else {
        panic!("a workflow");
    };
    let first_job = take_one(&a, "wf-purge-1").await;
    a.complete(first_job.lease, None).await.expect("complete");
    let purged = a
        .call(Op::Purge {
            queue: queue("wf-purge-2"),
            state: JobState::Ready,
        })
        .await
        .expect("purge");
    assert!(matches!(purged, Outcome::Purged(1)), "{purged:?}");
    let after = workflow_state(&a, second.id).await;
    assert_eq!(after.state, WorkflowState::Compensating);
    assert_eq!(after.error.as_deref(), Some("step second cancelled"));
    // The first step's compensation is waiting for a worker.
    let undo = take_one(&a, "wf-undo").await;
    assert_eq!(
        undo.job.headers.get("spool-step").map(String::as_str),
        Some("first")
    );
}

/// A node's snapshot (`/metrics`) shows the lateness, due → ready, of the
/// delayed jobs its timers made ready and of the instants it fired, as the
/// local broker's does; a node that ran no timer shows none.
#[tokio::test]
async fn timers_fill_the_skew_histograms_of_the_node_that_ran_them() {
    let url = TestCluster::shared().create_database();
    let clock = Clock::manual(START_NS);
    let a = node(&url, "a", &clock).await;
    let b = node(&url, "b", &clock).await;
    a.enqueue(
        queue("later"),
        NewJob {
            run_at: spool_broker::RunAt::DelayMs(1_000),
            ..job("due in a second")
        },
    )
    .await
    .expect("enqueue");
    schedule_op(
        &a,
        Op::PutSchedule {
            name: queue("each-second"),
            spec: Box::new(schedule_spec("@every 1s", "ticks")),
        },
    )
    .await;
    // Both are due at +1 s; the timers run at +1.5 s: 500 ms late.
    clock.advance(1_500_000_000);
    a.run_timers().await.expect("timers");
    assert_eq!(ready_in(&a, "later").await.len(), 1);
    assert_eq!(ready_in(&a, "ticks").await.len(), 1);
    let observed = |h: &spool_broker::Histogram| (h.count(), h.max());
    let snapshot = a.snapshot(SnapshotScope::Queues).await.expect("snapshot");
    let later = snapshot
        .queues
        .iter()
        .find(|q| q.name == "later")
        .expect("the queue");
    assert_eq!(observed(&later.skew), (1, Some(0.5)));
    let fired = &snapshot.schedules[0];
    assert_eq!(fired.name, "each-second");
    assert_eq!(observed(&fired.skew), (1, Some(0.5)));
    let other = b.snapshot(SnapshotScope::Queues).await.expect("snapshot");
    assert!(other.queues.iter().all(|q| q.skew.count() == 0));
    assert_eq!(other.schedules[0].skew.count(), 0);
}

#[test]
fn a_vacuum_is_due_by_dead_rows_against_live_ones() {
    use spool_pg::{vacuum_due, VACUUM_DEAD_ROWS_MIN, VACUUM_DEAD_SHARE_OF_LIVE};
    // A small table waits for the minimum.
    assert!(!vacuum_due(VACUUM_DEAD_ROWS_MIN - 1, 0));
    assert!(vacuum_due(VACUUM_DEAD_ROWS_MIN, 0));
    // A large one for its share of the live rows on top.
    let live = 1_000_000;
    let due_at = VACUUM_DEAD_ROWS_MIN + live / VACUUM_DEAD_SHARE_OF_LIVE;
    assert!(!vacuum_due(due_at - 1, live));
    assert!(vacuum_due(due_at, live));
    assert!(vacuum_due(u64::MAX, u64::MAX), "no overflow");
    // The final partition, holding what the retention keeps, is due for a
    // smaller share of its rows.
    use spool_pg::{final_vacuum_due, VACUUM_FINAL_DEAD_SHARE_OF_LIVE};
    let live = 30_000;
    let due_at = VACUUM_DEAD_ROWS_MIN + live / VACUUM_FINAL_DEAD_SHARE_OF_LIVE;
    assert!(!final_vacuum_due(due_at - 1, live));
    assert!(final_vacuum_due(due_at, live));
    assert!(
        !vacuum_due(due_at, live),
        "the live partition waits for more"
    );
    assert!(final_vacuum_due(u64::MAX, u64::MAX), "no overflow");
}

/// The timer task's vacuum, called directly: it reads the dead rows from
/// PostgreSQL's statistics, so the test makes them there (and flushes its
/// backend's statistics) instead of waiting for a timer.
#[tokio::test]
async fn the_hot_table_is_vacuumed_once_its_dead_rows_are_due() {
    let url = TestCluster::shared().create_database();
    let broker = node(&url, "a", &Clock::manual(START_NS)).await;
    let admin = admin(&url).await;
    // Only this test's calls vacuum the table.
    admin
        .batch_execute(
            "ALTER TABLE spool_jobs_live SET (autovacuum_enabled = false); \
             ALTER TABLE spool_jobs_final SET (autovacuum_enabled = false)",
        )
        .await
        .expect("autovacuum off");
    let quiet = broker.vacuum_if_churned().await.expect("check");
    assert!(!quiet.vacuumed, "an empty table is not vacuumed: {quiet:?}");
    let jobs = 1_500;
    enqueue_batches(&broker, "q", 2, jobs / 2).await;
    // Every row updated once: as many dead versions as jobs, counted in
    // the statistics when this transaction ends.
    update_every_row(&admin).await;
    let before = vacuum_count(&admin).await;
    let churned = broker.vacuum_if_churned().await.expect("vacuum");
    assert!(churned.dead_rows >= jobs as u64, "{churned:?}");
    assert!(churned.vacuumed, "{churned:?}");
    assert_eq!(vacuum_count(&admin).await, before + 1, "one vacuum ran");
    // The vacuum counted the dead rows away: nothing due any more.
    let after = broker.vacuum_if_churned().await.expect("check again");
    assert!(
        !after.vacuumed && after.dead_rows < churned.dead_rows,
        "{after:?}"
    );
    assert_eq!(vacuum_count(&admin).await, before + 1);
}

/// A node whose database role does not own `spool_jobs` cannot vacuum it
/// (PostgreSQL skips the table with a warning in its log, each time): it
/// asks once, vacuums never, and leaves the table to autovacuum, while
/// the owner's node vacuums as before.
#[tokio::test]
async fn a_node_that_may_not_vacuum_asks_once_and_leaves_it_to_autovacuum() {
    let url = TestCluster::shared().create_database();
    let clock = Clock::manual(START_NS);
    // The owner's node migrates the schema.
    let owner = node(&url, "owner", &clock).await;
    let admin = admin(&url).await;
    let role = format!(
        "worker_{}",
        url.rsplit('=').next().expect("a database name")
    );
    admin
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN; \
             GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}; \
             GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA public TO {role}; \
             ALTER TABLE spool_jobs_live SET (autovacuum_enabled = false); \
             ALTER TABLE spool_jobs_final SET (autovacuum_enabled = false)"
        ))
        .await
        .expect("a role that owns nothing");
    let as_role = url.replace("user=spool", &format!("user={role}"));
    assert_ne!(as_role, url, "the test URL names its user");
    let worker = node(&as_role, "worker", &clock).await;
    // Enough dead rows to be due.
    enqueue_batches(&worker, "q", 2, 750).await;
    update_every_row(&admin).await;
    let before = vacuum_count(&admin).await;
    let refused = worker.vacuum_if_churned().await.expect("a pass");
    assert!(!refused.permitted && !refused.vacuumed, "{refused:?}");
    // Asked once: the next pass costs no round trip at all.
    let trips = worker.pool_stats().round_trips;
    let again = worker.vacuum_if_churned().await.expect("a pass");
    assert!(!again.permitted && !again.vacuumed, "{again:?}");
    assert_eq!(worker.pool_stats().round_trips, trips, "asked once");
    assert_eq!(
        vacuum_count(&admin).await,
        before,
        "the role vacuumed nothing"
    );
    // The owner's node may, and does.
    let vacuumed = owner.vacuum_if_churned().await.expect("a pass");
    assert!(vacuumed.permitted && vacuumed.vacuumed, "{vacuumed:?}");
    assert_eq!(vacuum_count(&admin).await, before + 1);
}

/// A database at schema version 3 (one `spool_jobs` table) upgrades to 4
/// (partitioned into live and final jobs) when a node starts: every job
/// is there as it was, its key still answers, and work goes on.
#[tokio::test]
async fn a_schema_3_database_upgrades_with_its_jobs_intact() {
    let url = TestCluster::shared().create_database();
    let admin = admin(&url).await;
    // What a node of schema version 3 left behind.
    admin
        .batch_execute(concat!(
            "CREATE TABLE spool_schema (version integer PRIMARY KEY, \
             applied_at timestamptz NOT NULL DEFAULT now());\n",
            include_str!("../migrations/0001_init.sql"),
            include_str!("../migrations/0002_workflows_schedules.sql"),
            include_str!("../migrations/0003_vacuum.sql"),
            "INSERT INTO spool_schema (version) VALUES (1), (2), (3);"
        ))
        .await
        .expect("schema 3");
    let at = |n: u64| (START_NS - 1_000_000_000 + n) as i64;
    for (id, state, key) in [
        (1_i64, "ready", None),
        (2, "completed", Some("done-key")),
        (3, "buried", None),
        (4, "ready", Some("ready-key")),
    ] {
        let (finished, purge) = match state {
            "completed" => (Some(at(2)), Some(i64::MAX)),
            _ => (None, None),
        };
        admin
            .execute(
                "INSERT INTO spool_jobs (id, queue, state, priority, payload, max_attempts, \
                 ttr_ms, created_ns, updated_ns, finished_ns, purge_at_ns, idempotency_key, \
                 version) VALUES ($1, 'up', $2, 5, $3, 0, 60000, $4, $4, $5, $6, $7, 3)",
                &[
                    &id,
                    &state,
                    &format!("job {id}").into_bytes(),
                    &at(1),
                    &finished,
                    &purge,
                    &key,
                ],
            )
            .await
            .expect("a schema-3 job");
        if let Some(key) = key {
            admin
                .execute(
                    "INSERT INTO spool_idempotency (queue, key, job_id, expires_ns) \
                     VALUES ('up', $1, $2, $3)",
                    &[&key, &id, &i64::MAX],
                )
                .await
                .expect("its key");
        }
    }
    admin
        .batch_execute("SELECT setval('spool_job_ids', 4)")
        .await
        .expect("the id sequence");
    let broker = node(&url, "a", &Clock::manual(START_NS)).await;
    let version: i32 = admin
        .query_one("SELECT max(version) FROM spool_schema", &[])
        .await
        .expect("version")
        .get(0);
    assert_eq!(version, SCHEMA_VERSION);
    let partitions: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_partition_tree('spool_jobs') WHERE isleaf",
            &[],
        )
        .await
        .expect("partitions")
        .get(0);
    assert_eq!(partitions, 2);
    for (id, state) in [
        (1, JobState::Ready),
        (2, JobState::Completed),
        (3, JobState::Buried),
        (4, JobState::Ready),
    ] {
        let job = broker.get(id).await.expect("a job from before");
        assert_eq!(
            (job.state, &job.payload[..], job.version),
            (state, format!("job {id}").as_bytes(), 3),
            "{job:?}"
        );
    }
    let keyed = |key: &str| NewJob {
        idempotency_key: Some(key.into()),
        ..job("again")
    };
    let (same, duplicate) = broker
        .enqueue(queue("up"), keyed("done-key"))
        .await
        .expect("keyed");
    assert!(duplicate && same.id == 2, "{same:?}");
    // Work goes on: the ready jobs in priority then id order, completed
    // into the final partition with their key kept.
    let leased = broker
        .reserve(vec![queue("up")], 2, 0)
        .await
        .expect("reserve");
    let ids: Vec<u64> = leased.iter().map(|l| l.job.id).collect();
    assert_eq!(ids, [1, 4]);
    for l in &leased {
        let done = broker.complete(l.lease, None).await.expect("complete");
        assert_eq!(done.state, JobState::Completed);
    }
    let (same, duplicate) = broker
        .enqueue(queue("up"), keyed("ready-key"))
        .await
        .expect("keyed");
    assert!(
        duplicate && same.id == 4,
        "a completion keeps the key: {same:?}"
    );
    let final_rows: i64 = admin
        .query_one("SELECT count(*) FROM spool_jobs_final", &[])
        .await
        .expect("final rows")
        .get(0);
    assert_eq!(final_rows, 3);
    // A job deleted takes its key with it, as the foreign key's cascade did.
    match broker
        .call(Op::Delete {
            id: 4,
            expected_version: None,
        })
        .await
    {
        Ok(_) => {}
        other => panic!("delete: {other:?}"),
    }
    let (fresh, duplicate) = broker
        .enqueue(queue("up"), keyed("ready-key"))
        .await
        .expect("keyed");
    assert!(!duplicate && fresh.id > 4, "{fresh:?}");
}

/// The live partition is vacuumed by the dead rows a node's own reserves
/// and completions left, which PostgreSQL's statistics count a second or
/// so late: a churned live partition is due at once.
#[tokio::test]
async fn a_nodes_own_churn_makes_the_live_partition_due() {
    use spool_pg::VACUUM_DEAD_ROWS_MIN;
    let url = TestCluster::shared().create_database();
    let broker = node(&url, "a", &Clock::manual(START_NS)).await;
    admin(&url)
        .await
        .batch_execute(
            "ALTER TABLE spool_jobs_live SET (autovacuum_enabled = false); \
             ALTER TABLE spool_jobs_final SET (autovacuum_enabled = false)",
        )
        .await
        .expect("autovacuum off");
    let jobs = VACUUM_DEAD_ROWS_MIN as usize / 2 + 100;
    enqueue_batches(&broker, "c", 1, jobs).await;
    let mut done = 0;
    while done < jobs {
        let leased = broker
            .reserve(vec![queue("c")], 100, 0)
            .await
            .expect("reserve");
        assert!(!leased.is_empty(), "{done} of {jobs} done, none left");
        for l in leased {
            broker.complete(l.lease, None).await.expect("complete");
            done += 1;
        }
    }
    // A reserve and a completion each left a dead version in the live
    // partition.
    let pass = broker.vacuum_if_churned().await.expect("a pass");
    assert!(pass.vacuumed, "{pass:?}");
    assert!(pass.dead_rows >= 2 * jobs as u64, "{pass:?}");
}

/// 20,000 jobs enqueued, purged and vacuumed away: the live partition is
/// empty and its indexes keep the peak's pages.
async fn leave_a_peak(broker: &PgBroker, admin: &tokio_postgres::Client) {
    enqueue_batches(broker, "peak", 20, 1_000).await;
    let purged = broker
        .call(Op::Purge {
            queue: queue("peak"),
            state: JobState::Ready,
        })
        .await
        .expect("a purge");
    assert_eq!(purged, Outcome::Purged(20_000));
    admin
        .batch_execute("VACUUM spool_jobs_live")
        .await
        .expect("a vacuum");
}

/// A peak of jobs leaves the live partition nearly empty with its indexes
/// still the peak's size (a vacuum keeps emptied B-tree pages for reuse);
/// the rebuild gives them back, drops what an earlier rebuild cut short
/// left behind (and nothing else), and is not due again right after.
#[tokio::test]
async fn a_live_partitions_indexes_left_from_a_peak_are_rebuilt() {
    use spool_pg::{reindex_due, REINDEX_LIVE_BYTES_MIN};
    let url = TestCluster::shared().create_database();
    let broker = node(&url, "a", &Clock::manual(START_NS)).await;
    let admin = admin(&url).await;
    leave_a_peak(&broker, &admin).await;
    let kept_jobs = 3;
    let kept = (0..kept_jobs).map(|_| (queue("kept"), job("y"))).collect();
    broker
        .call(Op::EnqueueBatch { jobs: kept })
        .await
        .expect("jobs kept through the rebuild");
    // What a rebuild cut short leaves (an invalid index named as
    // PostgreSQL names them; the kept jobs are its duplicates), and an index someone is building by hand.
    for (name, column) in [("spool_jobs_ready_ccnew", "queue"), ("by_hand", "priority")] {
        admin
            .batch_execute(&format!(
                "CREATE UNIQUE INDEX CONCURRENTLY {name} ON spool_jobs_live ({column})"
            ))
            .await
            .expect_err("duplicates make the index invalid");
    }

    let pass = broker.reindex_live_if_bloated().await.expect("a pass");
    assert!(pass.reindexed, "{pass:?}");
    assert!(
        pass.index_bytes_before >= REINDEX_LIVE_BYTES_MIN,
        "the peak's pages: {pass:?}"
    );
    assert!(
        pass.index_bytes_after * 4 < pass.index_bytes_before,
        "pages given back: {pass:?}"
    );
    assert_eq!(pass.leftovers_dropped, 1, "{pass:?}");
    let invalid: Vec<String> = admin
        .query(
            "SELECT c.relname::text FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid \
             WHERE i.indrelid = 'spool_jobs_live'::regclass AND NOT i.indisvalid",
            &[],
        )
        .await
        .expect("invalid indexes")
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(invalid, ["by_hand"]);
    admin
        .batch_execute("DROP INDEX by_hand")
        .await
        .expect("drop");
    let leased = broker
        .reserve(vec![queue("kept")], 10, 0)
        .await
        .expect("reserve after the rebuild");
    assert_eq!(
        leased.len(),
        kept_jobs,
        "the rebuilt indexes find every job"
    );

    let again = broker.reindex_live_if_bloated().await.expect("a pass");
    assert!(!again.reindexed, "{again:?}");
    assert!(
        !reindex_due(again.index_bytes_before, again.live_rows),
        "{again:?}"
    );
}

/// One node rebuilds at a time: a node that finds the rebuild's advisory
/// lock held leaves the indexes as they are.
#[tokio::test]
async fn a_rebuild_another_node_is_running_is_not_started_twice() {
    let url = TestCluster::shared().create_database();
    let broker = node(&url, "a", &Clock::manual(START_NS)).await;
    let admin = admin(&url).await;
    leave_a_peak(&broker, &admin).await;
    // The rebuild's key: "spoolrx" in ASCII.
    admin
        .batch_execute("SELECT pg_advisory_lock(x'73706f6f6c7278'::bigint)")
        .await
        .expect("the lock");
    let pass = broker.reindex_live_if_bloated().await.expect("a pass");
    assert!(!pass.reindexed, "{pass:?}");
    assert_eq!(pass.index_bytes_after, pass.index_bytes_before);
    admin
        .batch_execute("SELECT pg_advisory_unlock(x'73706f6f6c7278'::bigint)")
        .await
        .expect("unlock");
    let pass = broker.reindex_live_if_bloated().await.expect("a pass");
    assert!(pass.reindexed, "{pass:?}");
}

#[test]
fn a_rebuild_is_due_for_pages_far_beyond_the_rows_and_never_for_a_large_backlog() {
    use spool_pg::{
        reindex_due, REINDEX_LIVE_BYTES_MIN, REINDEX_LIVE_BYTES_PER_ROW, REINDEX_LIVE_ROWS_MAX,
    };
    assert!(!reindex_due(REINDEX_LIVE_BYTES_MIN - 1, 0));
    assert!(reindex_due(REINDEX_LIVE_BYTES_MIN, 0));
    let rows = 10_000;
    assert!(!reindex_due(rows * REINDEX_LIVE_BYTES_PER_ROW - 1, rows));
    assert!(reindex_due(rows * REINDEX_LIVE_BYTES_PER_ROW, rows));
    assert!(!reindex_due(u64::MAX, REINDEX_LIVE_ROWS_MAX + 1));
}

/// `stats` of a beanstalkd session on this node.
async fn server_stats<S: Session>(session: &mut S) -> spool_proto::ServerStats {
    match beanstalkd(session, vec![Request::Stats]).await.remove(0) {
        Response::Stats(stats) => *stats,
        other => panic!("stats: {other:?}"),
    }
}

#[tokio::test]
async fn stats_counts_the_sessions_open_on_this_node() {
    let url = TestCluster::shared().create_database();
    let clock = Clock::manual(START_NS);
    let a = node(&url, "a", &clock).await;
    let b = node(&url, "b", &clock).await;
    let mut sessions: Vec<_> = (0..3)
        .map(|_| a.open_session(Peer::default()).expect("session"))
        .collect();
    let stats = server_stats(&mut sessions[0]).await;
    assert_eq!((stats.current_connections, stats.total_connections), (3, 3));
    // Each node counts its own, as each beanstalkd server does.
    let mut on_b = b.open_session(Peer::default()).expect("session");
    let stats = server_stats(&mut on_b).await;
    assert_eq!((stats.current_connections, stats.total_connections), (1, 1));

    // Two hang up; their tasks end when they next run.
    sessions.truncate(1);
    let mut counted = None;
    for _ in 0..YIELDS_MAX {
        let stats = server_stats(&mut sessions[0]).await;
        counted = Some((stats.current_connections, stats.total_connections));
        if stats.current_connections == 1 {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(counted, Some((1, 3)), "closed sessions are counted out");
}

/// The retention's count of final jobs, per queue, where several queues
/// have final jobs: each queue over its count loses its oldest (by
/// finish) down to the count, a batch a pass, and a queue under its count
/// keeps every job.
#[tokio::test]
async fn the_retention_trims_each_queue_to_its_count_a_batch_a_pass() {
    let url = TestCluster::shared().create_database();
    let broker = node(&url, "a", &Clock::manual(START_NS)).await;
    let admin = admin(&url).await;
    for (name, keep) in [("big", 1), ("small", 3)] {
        broker
            .call(Op::SetPolicy {
                queue: queue(name),
                policy: QueuePolicy {
                    retention_max_jobs: Some(keep),
                    ..QueuePolicy::default()
                },
            })
            .await
            .expect("a policy");
    }
    // More than two batches over in one queue; a few in the others (the
    // last one keeps the default count).
    enqueue_batches(&broker, "big", 5, 500).await;
    enqueue_batches(&broker, "small", 1, 5).await;
    enqueue_batches(&broker, "plain", 1, 4).await;
    // Finished in the reverse order of their ids: the oldest by finish is
    // the newest id, so an order by id would trim the wrong ones.
    admin
        .batch_execute(&format!(
            "UPDATE spool_jobs SET state = 'completed', finished_ns = {START_NS} - id, \
             purge_at_ns = {START_NS} + 3600000000000"
        ))
        .await
        .expect("the jobs finished");
    let left = |name: &'static str| {
        let admin = &admin;
        async move {
            admin
                .query_one(
                    "SELECT count(*), min(id) FROM spool_jobs WHERE queue = $1",
                    &[&name],
                )
                .await
                .map(|row| (row.get::<_, i64>(0), row.get::<_, Option<i64>>(1)))
                .expect("a count")
        }
    };
    let (big_first, small_first) = (left("big").await.1, left("small").await.1);
    broker.run_timers().await.expect("a pass");
    assert_eq!(left("big").await, (1_500, big_first));
    assert_eq!(left("small").await, (3, small_first));
    assert_eq!(left("plain").await.0, 4);
    broker.run_timers().await.expect("a pass");
    assert_eq!(left("big").await, (500, big_first));
    broker.run_timers().await.expect("a pass");
    assert_eq!(left("big").await, (1, big_first), "the last to finish");
    assert_eq!(left("small").await, (3, small_first));
    assert_eq!(left("plain").await.0, 4);
}

/// The plan of `sql` prepared as `name` and executed with `args` (SQL
/// literals), as `EXPLAIN` prints it: the generic one under
/// `plan_cache_mode = force_generic_plan`.
async fn plan_of(admin: &tokio_postgres::Client, name: &str, sql: &str, args: &str) -> String {
    admin
        .batch_execute(&format!("PREPARE {name} AS {sql}"))
        .await
        .unwrap_or_else(|e| panic!("prepare {name}: {e}"));
    let lines: Vec<String> = admin
        .query(&format!("EXPLAIN EXECUTE {name}({args})"), &[])
        .await
        .unwrap_or_else(|e| panic!("explain {name}: {e}"))
        .iter()
        .map(|row| row.get(0))
        .collect();
    lines.join("\n")
}

/// The completion and delete groups find their jobs by key and join
/// nothing, in the generic plan PostgreSQL settles on after a few calls
/// (it assumes 10 input rows) too. Joined with their input, that plan
/// compared every row found with every input row (a join filter over the
/// two): a group of 810 took 654 ms.
#[tokio::test]
async fn the_group_statements_generic_plans_look_each_job_up_by_key() {
    let url = TestCluster::shared().create_database();
    let broker = node(&url, "a", &Clock::manual(START_NS)).await;
    let admin = admin(&url).await;
    // Jobs waiting, as under load (an empty table is scanned whole).
    enqueue_batches(&broker, "q", 4, 500).await;
    admin
        .batch_execute("ANALYZE spool_jobs_live; SET plan_cache_mode = force_generic_plan")
        .await
        .expect("generic plans");
    for (name, sql, args) in [
        (
            "complete_group",
            spool_pg::COMPLETE_GROUP_SQL,
            "'{1,2}', '{1,2}', '{NULL,NULL}', 0, 0",
        ),
        (
            "delete_group",
            spool_pg::DELETE_GROUP_SQL,
            "'{1,2}', '{1,2}', 0",
        ),
    ] {
        let plan = plan_of(&admin, name, sql, args).await;
        assert!(
            plan.contains("Index Cond: (id = ANY ($1))")
                && !plan.contains("Join Filter")
                && !plan.contains("Function Scan"),
            "{name}:\n{plan}"
        );
        // The final partition is only inserted into (a completion kept),
        // never searched.
        assert!(
            plan.lines()
                .filter(|line| line.contains("spool_jobs_final"))
                .all(|line| line.contains("Insert on spool_jobs_final")),
            "{name} pruned:\n{plan}"
        );
    }
}

/// Listings of delayed, buried and final jobs of a queue read an index in
/// id order and stop at the page's end, in the generic plan too, though
/// the live partition has no (queue, state, id) index any more (schema
/// 5): peek-delayed, peek-buried and kick (beanstalkd) look for the first
/// such job of a tube among any number of ready ones.
#[tokio::test]
async fn listings_of_parked_and_final_jobs_read_their_index() {
    let url = TestCluster::shared().create_database();
    let broker = node(&url, "a", &Clock::manual(START_NS)).await;
    let admin = admin(&url).await;
    enqueue_batches(&broker, "q", 4, 500).await;
    // Half of them final, as a queue's retention keeps them.
    admin
        .batch_execute(
            "UPDATE spool_jobs SET state = 'completed', finished_ns = created_ns, \
             purge_at_ns = created_ns WHERE id % 2 = 0; \
             ANALYZE spool_jobs_live; ANALYZE spool_jobs_final; \
             SET plan_cache_mode = force_generic_plan",
        )
        .await
        .expect("final jobs, generic plans");
    // Final jobs: by their own index or the final partition's primary
    // key, whichever the planner prefers; in id order either way.
    for (state, index) in [
        (JobState::Delayed, "spool_jobs_parked"),
        (JobState::Buried, "spool_jobs_parked"),
        (JobState::Completed, "spool_jobs_final"),
        (JobState::Cancelled, "spool_jobs_final"),
    ] {
        let name = format!("list_{}", state.as_str());
        let plan = plan_of(&admin, &name, spool_pg::list_sql(state), "'q', 0, 2").await;
        assert!(
            plan.contains(&format!("Index Scan using {index}"))
                && !plan.contains("Sort")
                && !plan.contains("Seq Scan"),
            "{name}:\n{plan}"
        );
    }
}

/// A completion moves a kept job to the final partition by an `INSERT`
/// that names every column (`complete_rows!`): a column added to
/// `spool_jobs` and not named there would be lost at every completion.
#[tokio::test]
async fn a_completion_carries_every_column_to_the_final_partition() {
    let url = TestCluster::shared().create_database();
    let _broker = node(&url, "a", &Clock::manual(START_NS)).await;
    let admin = admin(&url).await;
    let sql = spool_pg::COMPLETE_GROUP_SQL;
    let start = sql
        .find("INSERT INTO spool_jobs_final (")
        .expect("the completion inserts into the final partition")
        + "INSERT INTO spool_jobs_final (".len();
    let named: Vec<&str> = sql[start..]
        .split(')')
        .next()
        .expect("a column list")
        .split(',')
        .map(str::trim)
        .collect();
    let columns: Vec<String> = admin
        .query(
            "SELECT column_name::text FROM information_schema.columns \
             WHERE table_name = 'spool_jobs_final' ORDER BY ordinal_position",
            &[],
        )
        .await
        .expect("the final partition's columns")
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert!(!columns.is_empty());
    let missing: Vec<&String> = columns
        .iter()
        .filter(|c| !named.contains(&c.as_str()))
        .collect();
    assert!(missing.is_empty(), "not carried: {missing:?}");
    assert_eq!(named.len(), columns.len(), "{named:?}");
}

/// A small queue's counts (its page, `stats-tube`, and `max_jobs` at
/// every enqueue into a bounded queue) read indexes that lead with the
/// queue or hold only the jobs running, not the whole live partition where
/// another queue's backlog is (schema 5 took the live partition's
/// `(queue, state, id)` index). The plan for the queue named, as the
/// planner makes it for its first calls; a generic plan assumes every
/// queue holds an even share, as it did with that index.
#[tokio::test]
async fn a_queues_counts_read_its_part_of_the_indexes() {
    let url = TestCluster::shared().create_database();
    let broker = node(&url, "a", &Clock::manual(START_NS)).await;
    let admin = admin(&url).await;
    enqueue_batches(&broker, "q", 1, 100).await;
    enqueue_batches(&broker, "backlog", 8, 500).await;
    admin
        .batch_execute(
            "ANALYZE spool_jobs_live; ANALYZE spool_jobs_final; \
             SET plan_cache_mode = force_custom_plan",
        )
        .await
        .expect("custom plans");
    for (name, sql) in [
        ("live_counts", spool_pg::QUEUE_LIVE_COUNTS_SQL),
        ("counts", spool_pg::QUEUE_COUNTS_SQL),
    ] {
        let plan = plan_of(&admin, name, sql, "'q'").await;
        assert!(
            !plan.contains("Seq Scan on spool_jobs_live"),
            "{name}:\n{plan}"
        );
    }
}

/// beanstalkd's peek-ready over PostgreSQL shows the job a reserve would
/// take (priority first), not the oldest; peek-delayed the one due
/// soonest. Listed by id, as the session peeked before `Op::Peek`, both
/// answered the first job put.
#[tokio::test]
async fn peek_ready_and_delayed_over_postgresql_follow_beanstalkds_order() {
    let url = TestCluster::shared().create_database();
    let clock = Clock::manual(START_NS);
    let broker = node(&url, "a", &clock).await;
    let mut s = broker.open_session(Peer::default()).expect("session");
    let replies = beanstalkd(
        &mut s,
        vec![
            Request::Use(queue("pk")),
            put(b"first", 0),
            put_at(b"urgent", 1, 0),
            put(b"later", 60),
            put(b"sooner", 30),
            Request::PeekReady,
            Request::PeekDelayed,
        ],
    )
    .await;
    let ids = inserted(&replies[1..5]);
    assert_eq!(
        replies[5..],
        [
            Response::Found {
                id: ids[1],
                body: Bytes::from_static(b"urgent")
            },
            Response::Found {
                id: ids[3],
                body: Bytes::from_static(b"sooner")
            },
        ]
    );
}
