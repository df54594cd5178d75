//! The `spool-client` crate against a real `spool serve`: every client
//! call, and the `Worker`'s promises — cancellation reaching a handler
//! through a heartbeat, panics and timeouts failing only their job, a drain
//! that loses no job and runs none twice, and a server restarted under a
//! running worker. Outcomes are asserted, never durations; every wait is
//! bounded and fails the test with what it waited for.

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use spool_client::{
    Body, CancelReason, Client, Enqueue, ErrorCode, HandlerError, Job, JobContext, JobState,
    Policy, Worker,
};
use support::{free_port, Server, TempDir};
use tokio::sync::{mpsc, Semaphore};

/// Bound on any one wait of a test for the worker or the server.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(20);

fn client(server: &Server) -> Client {
    Client::new(server.http_addr().to_string()).expect("client")
}

/// Polls `check` until it holds, failing after [`SETTLE_TIMEOUT`].
async fn wait_until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits for every job of `ids` to reach a settled state and returns them.
async fn settled(client: &Client, ids: &[u64]) -> Vec<Job> {
    let mut jobs = Vec::new();
    for &id in ids {
        let job = client.wait(id, SETTLE_TIMEOUT).await.expect("wait");
        assert!(job.state.is_settled(), "job {id} is still {:?}", job.state);
        jobs.push(job);
    }
    jobs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_covers_the_job_api() {
    let server = Server::start();
    let c = client(&server);

    // Enqueue with options; the payload comes back as sent.
    let job = c
        .enqueue(
            "mail",
            &Enqueue::json(&json!({"to": "a@b.c"}))
                .expect("json")
                .priority(7)
                .ttr(Duration::from_secs(30))
                .max_attempts(3)
                .header("trace", "t1")
                .idempotency_key("k1"),
        )
        .await
        .expect("enqueue");
    assert_eq!(job.state, JobState::Ready);
    assert_eq!((job.priority, job.max_attempts, job.ttr_ms), (7, 3, 30_000));
    assert_eq!(job.headers.get("trace").map(String::as_str), Some("t1"));
    assert_eq!(
        job.payload_json::<serde_json::Value>().expect("payload"),
        json!({"to": "a@b.c"})
    );
    let duplicate = c
        .enqueue(
            "mail",
            &Enqueue::json("other").expect("json").idempotency_key("k1"),
        )
        .await
        .expect("duplicate enqueue");
    assert!(duplicate.duplicate);
    assert_eq!(duplicate.id, job.id);

    // A JSON text is stored as given, key order and spelling kept.
    let exact = c
        .enqueue(
            "mail",
            &Enqueue::new(Body::Json(r#"{"b":1,"a":2.50}"#.into())),
        )
        .await
        .expect("enqueue a JSON text");
    assert_eq!(&exact.payload[..], br#"{"b":1,"a":2.50}"#);
    c.delete(exact.id).await.expect("delete");

    // Bytes that are not JSON travel as base64 and come back as bytes.
    let binary = c
        .enqueue("mail", &Enqueue::bytes(vec![0u8, 159, 255]))
        .await
        .expect("enqueue bytes");
    assert_eq!(&binary.payload[..], &[0u8, 159, 255]);

    let batch = c
        .enqueue_batch(
            "mail",
            &[
                Enqueue::json(&1).expect("json"),
                Enqueue::json(&2)
                    .expect("json")
                    .delay(Duration::from_secs(3600)),
            ],
        )
        .await
        .expect("batch");
    assert_eq!(batch.len(), 2);
    assert_eq!(batch[1].state, JobState::Delayed);

    // Listing pages through the ready jobs.
    let page = c
        .list("mail", JobState::Ready, Some(2), None)
        .await
        .expect("list");
    assert_eq!(page.jobs.len(), 2);
    let rest = c
        .list("mail", JobState::Ready, Some(10), page.next)
        .await
        .expect("list");
    assert_eq!(rest.jobs.len(), 1);

    // The worker side by hand: reserve, heartbeat, complete with a result.
    let leased = c
        .reserve(&["mail"], 1, Duration::from_secs(1))
        .await
        .expect("reserve");
    assert_eq!(leased.len(), 1);
    let lease = leased[0].lease.clone().expect("a lease");
    c.heartbeat(leased[0].id, &lease).await.expect("heartbeat");
    let done = c
        .complete(leased[0].id, &lease, &Body::from(json!({"sent": true})))
        .await
        .expect("complete");
    assert_eq!(done.state, JobState::Completed);
    assert_eq!(
        done.result_json::<serde_json::Value>()
            .expect("a result")
            .expect("json"),
        json!({"sent": true})
    );
    // The lease is spent: the API's code comes back as a typed error.
    let again = c
        .complete(leased[0].id, &lease, &Body::None)
        .await
        .expect_err("a spent lease");
    assert!(again.is_lease_expired(), "{again}");

    // Fail, release, kick, cancel, get.
    let leased = c
        .reserve(&["mail"], 2, Duration::from_secs(1))
        .await
        .expect("reserve");
    assert_eq!(leased.len(), 2);
    let (a, b) = (&leased[0], &leased[1]);
    let failed = c
        .fail(
            a.id,
            a.lease.as_deref().expect("lease"),
            &spool_client::Failure {
                error: "smtp down".into(),
                retry_in: None,
                permanent: true,
            },
        )
        .await
        .expect("fail");
    assert_eq!(failed.state, JobState::Buried);
    assert_eq!(failed.last_error.as_deref(), Some("smtp down"));
    let released = c
        .release(b.id, b.lease.as_deref().expect("lease"), None, Some(1))
        .await
        .expect("release");
    assert_eq!((released.state, released.priority), (JobState::Ready, 1));
    assert_eq!(c.kick(a.id).await.expect("kick").state, JobState::Ready);
    assert_eq!(
        c.cancel(b.id).await.expect("cancel").state,
        JobState::Cancelled
    );
    assert_eq!(c.get(b.id).await.expect("get").state, JobState::Cancelled);
    let missing = c.get(999_999).await.expect_err("no such job");
    assert_eq!(missing.code(), Some(&ErrorCode::NotFound));

    // Update with a stale version: 412 as a typed error.
    let delayed = &batch[1];
    let stale = c
        .update(
            delayed.id,
            &spool_client::JobChange {
                priority: Some(3),
                ..Default::default()
            },
            Some(delayed.version + 100),
        )
        .await
        .expect_err("a stale version");
    assert_eq!(stale.code(), Some(&ErrorCode::VersionMismatch));
    let updated = c
        .update(
            delayed.id,
            &spool_client::JobChange {
                priority: Some(3),
                ..Default::default()
            },
            Some(delayed.version),
        )
        .await
        .expect("update");
    assert_eq!(updated.priority, 3);

    // Queues: policy, pause and resume, purge, counts.
    let queue = c
        .set_policy(
            "mail",
            &Policy {
                max_jobs: Some(100),
                ..Policy::default()
            },
        )
        .await
        .expect("policy");
    assert_eq!(queue.policy.max_jobs, Some(100));
    assert!(c.pause("mail", None).await.expect("pause").paused);
    assert!(!c.resume("mail").await.expect("resume").paused);
    assert_eq!(c.purge("mail", JobState::Delayed).await.expect("purge"), 1);
    let queues = c.queues().await.expect("queues");
    let mail = queues.iter().find(|q| q.name == "mail").expect("mail");
    assert_eq!(mail.count(JobState::Completed), 1);
    let invalid = c
        .enqueue(
            "mail",
            &Enqueue::json(&1)
                .expect("json")
                .priority(1)
                .run_at("yesterday"),
        )
        .await
        .expect_err("a bad run_at");
    assert_eq!(invalid.code(), Some(&ErrorCode::Invalid));
    assert!(
        matches!(invalid, spool_client::Error::Api { field: Some(ref f), .. } if f == "run_at")
    );

    // Enqueue-and-wait answers at once for a job nobody works: 202, ready.
    let waited = c
        .enqueue_and_wait(
            "idle",
            &Enqueue::json(&1).expect("json"),
            Duration::from_millis(50),
        )
        .await
        .expect("enqueue and wait");
    assert_eq!(waited.state, JobState::Ready);
    c.delete(waited.id).await.expect("delete");
    assert_eq!(
        c.get(waited.id).await.expect_err("deleted").code(),
        Some(&ErrorCode::NotFound)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_server_is_a_connect_error() {
    let c = Client::new(format!("127.0.0.1:{}", free_port())).expect("client");
    let error = c.get(1).await.expect_err("nobody listens");
    assert!(
        matches!(error, spool_client::Error::Connect { .. }),
        "{error:?}"
    );
    assert!(error.is_transient());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_job_fires_its_handlers_token_at_the_next_heartbeat() {
    let server = Server::start();
    let c = client(&server);
    let (started_tx, mut started) = mpsc::unbounded_channel::<u64>();
    let (seen_tx, mut seen) = mpsc::unbounded_channel::<CancelReason>();
    // A long TTR and no handler timeout: only a heartbeat answering
    // `cancelled` can fire the token before the shutdown below.
    let worker = Worker::builder(c.clone())
        .queue("cancel")
        .heartbeat_interval(Duration::from_millis(100))
        .build(move |job: Job, ctx: JobContext| {
            let started = started_tx.clone();
            let seen = seen_tx.clone();
            async move {
                let _ = started.send(job.id);
                let reason = ctx.cancelled().await;
                let _ = seen.send(reason);
                Err::<(), _>(HandlerError::new("stopped"))
            }
        });
    let counters = worker.counters();
    let stop = worker.shutdown_handle();
    let run = tokio::spawn(worker.run());

    let job = c
        .enqueue(
            "cancel",
            &Enqueue::json(&1)
                .expect("json")
                .ttr(Duration::from_secs(600)),
        )
        .await
        .expect("enqueue");
    let running = tokio::time::timeout(SETTLE_TIMEOUT, started.recv())
        .await
        .expect("the handler starts");
    assert_eq!(running, Some(job.id));
    c.cancel(job.id).await.expect("cancel");
    let reason = tokio::time::timeout(SETTLE_TIMEOUT, seen.recv())
        .await
        .expect("the handler sees its token");
    assert_eq!(reason, Some(CancelReason::Cancelled));

    stop.shutdown();
    let totals = run.await.expect("join").expect("run");
    assert_eq!(totals.cancelled, 1, "{totals:?}");
    assert_eq!(counters.snapshot().failed, 0);
    assert_eq!(c.get(job.id).await.expect("get").state, JobState::Cancelled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_fails_only_its_job() {
    let server = Server::start();
    let c = client(&server);
    let worker = Worker::builder(c.clone())
        .queue("panics")
        .concurrency(4)
        .build(|job: Job, _ctx: JobContext| async move {
            let value: serde_json::Value = job.payload_json()?;
            if value["panic"] == json!(true) {
                panic!("boom in job {}", job.id);
            }
            Ok::<_, HandlerError>(value)
        });
    let stop = worker.shutdown_handle();
    let run = tokio::spawn(worker.run());
    let mut ids = Vec::new();
    for i in 0..6 {
        let job = c
            .enqueue(
                "panics",
                &Enqueue::json(&json!({"panic": i % 3 == 0, "i": i}))
                    .expect("json")
                    .max_attempts(1),
            )
            .await
            .expect("enqueue");
        ids.push(job.id);
    }
    let jobs = settled(&c, &ids).await;
    stop.shutdown();
    let totals = run.await.expect("join").expect("run");
    for (i, job) in jobs.iter().enumerate() {
        if i % 3 == 0 {
            assert_eq!(job.state, JobState::Buried, "{job:?}");
            let error = job.last_error.as_deref().unwrap_or_default();
            assert!(
                error.contains(&format!("boom in job {}", job.id)) && error.contains("panicked"),
                "{error}"
            );
        } else {
            assert_eq!(job.state, JobState::Completed, "{job:?}");
        }
    }
    assert_eq!((totals.panicked, totals.processed), (2, 4), "{totals:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_past_its_timeout_is_failed_and_frees_its_slot() {
    let server = Server::start();
    let c = client(&server);
    // One slot: the second job runs only once the stuck one is dropped.
    let worker = Worker::builder(c.clone())
        .queue("slow")
        .concurrency(1)
        .handler_timeout(Duration::from_millis(200))
        .cancel_grace(Duration::from_millis(100))
        .build(|job: Job, _ctx: JobContext| async move {
            if job.payload_json::<String>()? == "hang" {
                // Ignores its token: only being dropped stops it.
                std::future::pending::<()>().await;
            }
            Ok::<_, HandlerError>(())
        });
    let stop = worker.shutdown_handle();
    let run = tokio::spawn(worker.run());
    let hang = c
        .enqueue(
            "slow",
            &Enqueue::json("hang").expect("json").max_attempts(1),
        )
        .await
        .expect("enqueue");
    let quick = c
        .enqueue("slow", &Enqueue::json("quick").expect("json"))
        .await
        .expect("enqueue");
    let jobs = settled(&c, &[hang.id, quick.id]).await;
    stop.shutdown();
    let totals = run.await.expect("join").expect("run");
    assert_eq!(jobs[0].state, JobState::Buried);
    assert!(
        jobs[0]
            .last_error
            .as_deref()
            .unwrap_or_default()
            .contains("timed out"),
        "{:?}",
        jobs[0].last_error
    );
    assert_eq!(jobs[1].state, JobState::Completed);
    assert_eq!((totals.timed_out, totals.processed), (1, 1), "{totals:?}");
}

/// Runs of each job whose handler returned success.
type Successes = Arc<Mutex<HashMap<u64, u32>>>;

fn gated_worker(
    c: &Client,
    gate: Arc<Semaphore>,
    successes: Successes,
    started: mpsc::UnboundedSender<u64>,
) -> Worker {
    Worker::builder(c.clone())
        .queue("drain")
        .concurrency(4)
        .shutdown_grace(Duration::from_millis(300))
        .cancel_grace(Duration::from_secs(5))
        .poll_timeout(Duration::from_millis(200))
        .build(move |job: Job, ctx: JobContext| {
            let gate = gate.clone();
            let successes = successes.clone();
            let started = started.clone();
            async move {
                let _ = started.send(job.id);
                tokio::select! {
                    permit = gate.acquire() => {
                        permit.map_err(|_| HandlerError::new("gate closed"))?.forget();
                        *successes.lock().expect("lock").entry(job.id).or_default() += 1;
                        Ok(())
                    }
                    reason = ctx.cancelled() => Err(HandlerError::new(reason.to_string())),
                }
            }
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_with_jobs_in_flight_loses_none_and_runs_none_twice() {
    let server = Server::start();
    let c = client(&server);
    let jobs = (0..20)
        .map(|i| Enqueue::json(&i).expect("json"))
        .collect::<Vec<_>>();
    let ids: Vec<u64> = c
        .enqueue_batch("drain", &jobs)
        .await
        .expect("batch")
        .iter()
        .map(|j| j.id)
        .collect();
    let successes: Successes = Arc::default();

    // Four handlers start and wait at the gate; the drain begins; two are
    // let through within the grace, two are still waiting when it ends.
    let gate = Arc::new(Semaphore::new(0));
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let first = gated_worker(&c, gate.clone(), successes.clone(), started_tx);
    let stop = first.shutdown_handle();
    let run = tokio::spawn(first.run());
    for _ in 0..4 {
        tokio::time::timeout(SETTLE_TIMEOUT, started.recv())
            .await
            .expect("four handlers start")
            .expect("a job id");
    }
    stop.shutdown();
    gate.add_permits(2);
    let first_totals = run.await.expect("join").expect("run");
    assert_eq!(first_totals.reserved, 4, "{first_totals:?}");
    assert_eq!(first_totals.processed, 2, "{first_totals:?}");
    assert_eq!(first_totals.released, 2, "{first_totals:?}");
    assert!(
        started.try_recv().is_err(),
        "no job started after the drain"
    );

    // A second worker finds everything the first did not finish.
    let gate = Arc::new(Semaphore::new(Semaphore::MAX_PERMITS));
    let (started_tx, _started) = mpsc::unbounded_channel();
    let second = gated_worker(&c, gate, successes.clone(), started_tx);
    let stop = second.shutdown_handle();
    let run = tokio::spawn(second.run());
    let finished = settled(&c, &ids).await;
    stop.shutdown();
    let second_totals = run.await.expect("join").expect("run");
    assert!(finished.iter().all(|j| j.state == JobState::Completed));
    assert_eq!(second_totals.processed, 18, "{second_totals:?}");
    let successes = successes.lock().expect("lock");
    for id in &ids {
        assert_eq!(successes.get(id), Some(&1), "job {id}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_carries_on_across_a_server_restart() {
    let dir = TempDir::new("worker-restart");
    let http = format!("127.0.0.1:{}", free_port());
    let server = Server::start_durable(dir.path(), &["--http-listen", &http]);
    let c = Client::new(http.clone()).expect("client");
    let worker = Worker::builder(c.clone())
        .queue("restart")
        .concurrency(2)
        .poll_timeout(Duration::from_millis(200))
        .build(|job: Job, _ctx: JobContext| async move {
            Ok::<_, HandlerError>(json!({"done": job.id}))
        });
    let counters = worker.counters();
    let stop = worker.shutdown_handle();
    let run = tokio::spawn(worker.run());

    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(
            c.enqueue("restart", &Enqueue::json(&i).expect("json"))
                .await
                .expect("enqueue")
                .id,
        );
    }
    settled(&c, &ids).await;

    // kill -9: the worker sees connection errors until the server is back.
    drop(server);
    let reconnects_before = counters.snapshot().reconnects;
    wait_until("the worker to notice the server is away", || {
        let counters = counters.clone();
        async move { counters.snapshot().reconnects > reconnects_before }
    })
    .await;
    let server = Server::start_durable(dir.path(), &["--http-listen", &http]);
    for i in 5..10 {
        ids.push(
            c.enqueue("restart", &Enqueue::json(&i).expect("json"))
                .await
                .expect("enqueue")
                .id,
        );
    }
    let jobs = settled(&c, &ids).await;
    stop.shutdown();
    let totals = run.await.expect("join").expect("run");
    for job in &jobs {
        assert_eq!(job.state, JobState::Completed, "{job:?}");
        assert_eq!(
            job.result_json::<serde_json::Value>()
                .expect("result")
                .expect("json"),
            json!({"done": job.id})
        );
    }
    assert!(totals.processed >= 10, "{totals:?}");
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_that_runs_out_while_the_server_is_away_fires_the_token() {
    let server = Server::start();
    let c = client(&server);
    let (started_tx, mut started) = mpsc::unbounded_channel::<u64>();
    let (seen_tx, mut seen) = mpsc::unbounded_channel::<CancelReason>();
    let worker =
        Worker::builder(c.clone())
            .queue("lease")
            .build(move |job: Job, ctx: JobContext| {
                let started = started_tx.clone();
                let seen = seen_tx.clone();
                async move {
                    let _ = started.send(job.id);
                    let _ = seen.send(ctx.cancelled().await);
                    Err::<(), _>(HandlerError::new("gave up"))
                }
            });
    let stop = worker.shutdown_handle();
    let run = tokio::spawn(worker.run());
    c.enqueue(
        "lease",
        &Enqueue::json(&1).expect("json").ttr(Duration::from_secs(1)),
    )
    .await
    .expect("enqueue");
    tokio::time::timeout(SETTLE_TIMEOUT, started.recv())
        .await
        .expect("the handler starts");
    // No heartbeat gets through now: the lease's deadline passes.
    drop(server);
    let reason = tokio::time::timeout(SETTLE_TIMEOUT, seen.recv())
        .await
        .expect("the handler sees its token");
    assert_eq!(reason, Some(CancelReason::Deadline));
    stop.shutdown();
    let totals = run.await.expect("join").expect("run");
    assert_eq!((totals.lease_lost, totals.failed), (1, 0), "{totals:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_reserve_is_refused_stops_with_the_servers_reason() {
    let server = Server::start();
    let worker = Worker::builder(client(&server))
        .queue("not a queue name")
        .build(|_job: Job, _ctx: JobContext| async { Ok::<(), HandlerError>(()) });
    let error = tokio::time::timeout(SETTLE_TIMEOUT, worker.run())
        .await
        .expect("run ends")
        .expect_err("the server refuses the queue name");
    assert_eq!(error.code(), Some(&ErrorCode::Invalid), "{error}");
    let no_queue = Worker::builder(client(&server))
        .build(|_job: Job, _ctx: JobContext| async { Ok::<(), HandlerError>(()) });
    assert!(matches!(
        no_queue.run().await,
        Err(spool_client::Error::Usage(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_reserves_only_what_it_can_start() {
    let server = Server::start();
    let c = client(&server);
    let jobs: Vec<Enqueue> = (0..10).map(|i| Enqueue::json(&i).expect("json")).collect();
    c.enqueue_batch("bounded", &jobs).await.expect("batch");
    let gate = Arc::new(Semaphore::new(0));
    let (started_tx, mut started) = mpsc::unbounded_channel::<u64>();
    let worker = Worker::builder(c.clone())
        .queue("bounded")
        .concurrency(3)
        .build({
            let gate = gate.clone();
            move |job: Job, _ctx: JobContext| {
                let gate = gate.clone();
                let started = started_tx.clone();
                async move {
                    let _ = started.send(job.id);
                    let _permit = gate.acquire().await;
                    Ok::<(), HandlerError>(())
                }
            }
        });
    let stop = worker.shutdown_handle();
    let run = tokio::spawn(worker.run());
    for _ in 0..3 {
        tokio::time::timeout(SETTLE_TIMEOUT, started.recv())
            .await
            .expect("three handlers start");
    }
    // Every slot is taken: the dispatcher waits for one instead of
    // reserving more.
    let queue = c.queue("bounded").await.expect("queue");
    assert_eq!(queue.count(JobState::Reserved), 3, "{queue:?}");
    assert_eq!(queue.count(JobState::Ready), 7, "{queue:?}");
    gate.add_permits(Semaphore::MAX_PERMITS);
    wait_until("every job to complete", || {
        let c = c.clone();
        async move {
            c.queue("bounded")
                .await
                .is_ok_and(|q| q.count(JobState::Completed) == 10)
        }
    })
    .await;
    stop.shutdown();
    let totals = run.await.expect("join").expect("run");
    assert_eq!((totals.reserved, totals.processed), (10, 10), "{totals:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_keep_a_job_past_its_ttr() {
    let server = Server::start();
    let c = client(&server);
    let worker =
        Worker::builder(c.clone())
            .queue("long")
            .build(|_job: Job, _ctx: JobContext| async {
                // Runs over two TTRs: only heartbeats keep the lease.
                tokio::time::sleep(Duration::from_millis(4_500)).await;
                Ok::<_, HandlerError>(json!("done"))
            });
    let stop = worker.shutdown_handle();
    let run = tokio::spawn(worker.run());
    let job = c
        .enqueue(
            "long",
            // 2 s: a heartbeat every 667 ms, so a stall of a loaded machine
            // (a second or more) does not lose the lease.
            &Enqueue::json(&1).expect("json").ttr(Duration::from_secs(2)),
        )
        .await
        .expect("enqueue");
    let job = settled(&c, &[job.id]).await.remove(0);
    stop.shutdown();
    let totals = run.await.expect("join").expect("run");
    assert_eq!(job.state, JobState::Completed, "{job:?}");
    assert_eq!(job.attempts, 0, "the lease never lapsed: {job:?}");
    assert_eq!(
        (totals.processed, totals.lease_lost, totals.reserved),
        (1, 0, 1),
        "{totals:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_covers_schedules() {
    use spool_client::Schedule;

    let server = Server::start();
    let c = client(&server);
    let spec = Schedule::new(
        "0 30 2 * * *",
        "cl-reports",
        Enqueue::json(&json!({"b": 1, "a": 2}))
            .expect("json")
            .priority(7),
    )
    .timezone("Europe/Berlin")
    .misfire("all")
    .catch_up_max(5)
    .max_backlog(3);
    let made = c.put_schedule("cl-nightly", &spec).await.expect("put");
    assert_eq!(made.name, "cl-nightly");
    assert_eq!(made.timezone, "Europe/Berlin");
    assert_eq!((made.misfire.as_str(), made.catch_up_max), ("all", 5));
    assert_eq!(made.max_backlog, Some(3));
    assert_eq!(made.job["priority"], 7);
    assert!(made.next_fire_at.is_some());
    assert_eq!(c.schedules().await.expect("list"), vec![made.clone()]);
    let paused = c.pause_schedule("cl-nightly").await.expect("pause");
    assert!(paused.paused && paused.next_fire_at.is_none());
    let fired = c.trigger_schedule("cl-nightly").await.expect("trigger");
    let job = c.get(fired.last_job.expect("a job")).await.expect("job");
    assert_eq!(job.headers["spool-schedule"], "cl-nightly");
    assert_eq!(
        job.payload_json::<serde_json::Value>().unwrap(),
        json!({"b": 1, "a": 2})
    );
    let resumed = c.resume_schedule("cl-nightly").await.expect("resume");
    assert_eq!(resumed.fires, 1);
    assert_eq!(c.schedule("cl-nightly").await.expect("get"), resumed);
    c.delete_schedule("cl-nightly").await.expect("delete");
    let gone = c.schedule("cl-nightly").await.expect_err("deleted");
    assert!(
        matches!(gone, spool_client::Error::Api { status: 404, .. }),
        "{gone:?}"
    );
    let refused = c
        .put_schedule(
            "cl-bad",
            &Schedule::new("* *", "q", Enqueue::json(&1).expect("json")),
        )
        .await
        .expect_err("bad cron");
    match refused {
        spool_client::Error::Api { code, field, .. } => {
            assert_eq!(code, ErrorCode::Invalid);
            assert_eq!(field.as_deref(), Some("cron"));
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_go_together_and_each_gets_its_own_answer() {
    let server = Server::start();
    let c = client(&server);
    let jobs: Vec<Enqueue> = (0..3).map(|i| Enqueue::json(&i).expect("json")).collect();
    c.enqueue_batch("many", &jobs).await.expect("batch");
    let leased = c
        .reserve(&["many"], 3, Duration::from_secs(1))
        .await
        .expect("reserve");
    assert_eq!(leased.len(), 3);
    let lease = |i: usize| leased[i].lease.clone().expect("a lease");
    c.cancel(leased[1].id).await.expect("cancel");
    let result = Body::Json(r#"{"rows":3}"#.into());
    let answers = c
        .complete_many(&[
            (&lease(0), &result),
            (&lease(1), &Body::None),
            ("x", &Body::None),
            (&lease(2), &Body::None),
        ])
        .await
        .expect("complete many");
    assert_eq!(answers.len(), 4);
    assert!(answers[0].is_ok(), "{answers:?}");
    assert!(
        answers[1].as_ref().is_err_and(|e| e.is_cancelled()),
        "{answers:?}"
    );
    assert_eq!(
        answers[2].as_ref().err().and_then(|e| e.code()),
        Some(&ErrorCode::Invalid),
        "{answers:?}"
    );
    assert!(answers[3].is_ok(), "{answers:?}");
    let done = c.get(leased[0].id).await.expect("get");
    assert_eq!(done.state, JobState::Completed);
    assert_eq!(&done.result.expect("a result")[..], br#"{"rows":3}"#);

    // A worker whose handlers finish together completes them in groups:
    // each job still gets its own result.
    let jobs: Vec<Enqueue> = (0..24).map(|i| Enqueue::json(&i).expect("json")).collect();
    let ids: Vec<u64> = c
        .enqueue_batch("grouped", &jobs)
        .await
        .expect("batch")
        .iter()
        .map(|j| j.id)
        .collect();
    let gate = Arc::new(Semaphore::new(0));
    let worker = Worker::builder(c.clone())
        .queue("grouped")
        .concurrency(24)
        .build({
            let gate = gate.clone();
            move |job: Job, _ctx: JobContext| {
                let gate = gate.clone();
                async move {
                    let _permit = gate.acquire().await;
                    let n: u64 = job.payload_json().expect("a number");
                    Ok::<_, HandlerError>(json!({ "twice": n * 2 }))
                }
            }
        });
    let stop = worker.shutdown_handle();
    let run = tokio::spawn(worker.run());
    wait_until("every job to be reserved", || {
        let c = c.clone();
        async move {
            c.queue("grouped")
                .await
                .is_ok_and(|q| q.count(JobState::Reserved) == 24)
        }
    })
    .await;
    gate.add_permits(Semaphore::MAX_PERMITS);
    for (n, job) in settled(&c, &ids).await.iter().enumerate() {
        assert_eq!(job.state, JobState::Completed, "{job:?}");
        let result: serde_json::Value = job.result_json().expect("a result").expect("JSON");
        assert_eq!(result, json!({ "twice": n as u64 * 2 }), "{job:?}");
    }
    stop.shutdown();
    let totals = run.await.expect("join").expect("run");
    assert_eq!(totals.processed, 24, "{totals:?}");
}
