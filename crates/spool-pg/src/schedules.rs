//! Schedules on PostgreSQL: the shared rules of `spool_engine::schedule`
//! (validation, next instants, misfire planning, jitter, the firing's job)
//! over a row per schedule.
//!
//! Firing is a timer pass any node runs: due rows are taken `FOR UPDATE
//! SKIP LOCKED`, so one node fires a schedule at a time, and each firing's
//! job carries the key `schedule:<name>:<due ms>` and is inserted in the
//! transaction that moves the row's `next_fire_ms`: an instant fires once
//! whatever nodes race or crash.

use std::collections::BTreeMap;

use bytes::Bytes;
use spool_broker::{
    Backoff, BrokerError, Histogram, Misfire, NewJob, Outcome, QueueName, RunAt, ScheduleSnapshot,
    ScheduleSpec, ScheduleView,
};
use spool_engine::schedule::{check_spec, firing_job, first_due, jitter_ms, plan, Rule};

use crate::error::OpError;
use crate::ops::{db_u64, enqueue_from, from_db, Ctx, Effects, Origin, Skew, NS_PER_MS};
use crate::pool::Conn;

/// Schedules one firing pass takes: a pass stays a short transaction; the
/// rest are due still and fire in the next pass.
pub(crate) const FIRE_BATCH_SCHEDULES: i64 = 100;

/// The columns [`view`] reads, in its order.
macro_rules! cols {
    () => {
        "name, cron, timezone, queue, misfire, catch_up_max, jitter_ms, max_backlog, \
     paused, job_payload, job_priority, job_delay_ms, job_ttr_ms, job_max_attempts, \
     job_backoff_initial_ms, job_backoff_max_ms, job_backoff_multiplier, job_backoff_jitter, \
     job_header_names, job_header_values, job_idempotency_key, job_idempotency_ttl_ms, \
     next_fire_ms, last_fire_ms, last_job, fires, misfires_skipped, backlog_skips, \
     last_skew_ms, created_ns, updated_ns, version"
    };
}

fn internal(message: String) -> OpError {
    OpError::Broker(BrokerError::Internal(message))
}

fn queue_name(text: &str) -> Result<QueueName, OpError> {
    QueueName::new(text.as_bytes())
        .map_err(|_| internal(format!("bad queue name {text:?} in the database")))
}

fn opt_u64(row: &tokio_postgres::Row, index: usize) -> Option<u64> {
    row.get::<_, Option<i64>>(index).map(from_db)
}

fn view(row: &tokio_postgres::Row) -> Result<ScheduleView, OpError> {
    let misfire: &str = row.get(4);
    let misfire = Misfire::parse(misfire).ok_or_else(|| {
        internal(format!(
            "unknown misfire policy {misfire:?} in the database"
        ))
    })?;
    let names: Option<Vec<String>> = row.get(18);
    let values: Option<Vec<String>> = row.get(19);
    let headers: BTreeMap<String, String> = names
        .unwrap_or_default()
        .into_iter()
        .zip(values.unwrap_or_default())
        .collect();
    let backoff = (|| {
        Some(Backoff {
            initial_ms: opt_u64(row, 14)?,
            max_ms: opt_u64(row, 15)?,
            multiplier: row.get::<_, Option<f64>>(16)?,
            jitter: row.get::<_, Option<f64>>(17)?,
        })
    })();
    let job = NewJob {
        payload: Bytes::from(row.get::<_, Vec<u8>>(9)),
        priority: opt_u64(row, 10).map(|p| p.min(u64::from(u32::MAX)) as u32),
        run_at: opt_u64(row, 11).map_or(RunAt::Now, RunAt::DelayMs),
        ttr_ms: opt_u64(row, 12),
        max_attempts: row.get::<_, Option<i32>>(13).map(|n| n.max(0) as u32),
        backoff,
        headers,
        idempotency_key: row.get(20),
        idempotency_ttl_ms: opt_u64(row, 21),
        parents: BTreeMap::new(),
    };
    let spec = ScheduleSpec {
        cron: row.get(1),
        timezone: row.get(2),
        queue: queue_name(row.get(3))?,
        job,
        misfire,
        catch_up_max: row.get::<_, i32>(5).max(0) as u32,
        jitter_ms: from_db(row.get(6)),
        max_backlog: opt_u64(row, 7),
        paused: row.get(8),
    };
    Ok(ScheduleView {
        name: row.get(0),
        spec,
        next_fire_at_ms: opt_u64(row, 22),
        last_fire_at_ms: opt_u64(row, 23),
        last_job: opt_u64(row, 24),
        fires: from_db(row.get(25)),
        misfires_skipped: from_db(row.get(26)),
        backlog_skips: from_db(row.get(27)),
        last_skew_ms: opt_u64(row, 28),
        created_at_ms: from_db(row.get(29)) / NS_PER_MS,
        updated_at_ms: from_db(row.get(30)) / NS_PER_MS,
        version: from_db(row.get(31)),
    })
}

fn one(rows: &[tokio_postgres::Row]) -> Result<ScheduleView, OpError> {
    match rows.first() {
        Some(row) => view(row),
        None => Err(OpError::Broker(BrokerError::NotFound)),
    }
}

fn schedule(view: ScheduleView, created: bool) -> Outcome {
    Outcome::Schedule {
        schedule: Box::new(view),
        created,
    }
}

/// The schedule's row locked, as a view (`None`: no such schedule).
async fn lock(c: &mut Conn, name: &str) -> Result<Option<ScheduleView>, OpError> {
    let rows = c
        .query(
            concat!(
                "SELECT ",
                cols!(),
                " FROM spool_schedules WHERE name = $1 FOR UPDATE"
            ),
            &[&name],
        )
        .await?;
    rows.first().map(view).transpose()
}

pub(crate) async fn put(
    c: &mut Conn,
    ctx: &Ctx,
    name: &str,
    spec: ScheduleSpec,
    now: u64,
) -> Result<Outcome, OpError> {
    let rule = check_spec(&spec)?;
    if spec.job.payload.len() > ctx.max_job_size as usize {
        return Err(OpError::Broker(BrokerError::TooLarge {
            max_bytes: u64::from(ctx.max_job_size),
        }));
    }
    let now_ms = now / NS_PER_MS;
    // A replace keeps the firing state: an instant due and not yet fired
    // stays due, one fired never fires again.
    let existing = lock(c, name).await?;
    let next = if spec.paused {
        None
    } else {
        first_due(
            &rule,
            existing.as_ref().and_then(|s| s.last_fire_at_ms),
            existing.as_ref().and_then(|s| s.next_fire_at_ms),
            now_ms,
        )
    };
    let job = &spec.job;
    let (names, values): (Vec<&str>, Vec<&str>) = job
        .headers
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .unzip();
    let delay_ms = match job.run_at {
        RunAt::DelayMs(ms) => Some(db_u64(ms)),
        RunAt::Now | RunAt::AtMs(_) => None,
    };
    let rows = c
        .query(
            concat!(
                "INSERT INTO spool_schedules (name, cron, timezone, queue, misfire, \
                 catch_up_max, jitter_ms, max_backlog, paused, job_payload, job_priority, \
                 job_delay_ms, job_ttr_ms, job_max_attempts, job_backoff_initial_ms, \
                 job_backoff_max_ms, job_backoff_multiplier, job_backoff_jitter, \
                 job_header_names, job_header_values, job_idempotency_key, \
                 job_idempotency_ttl_ms, next_fire_ms, created_ns, updated_ns, version) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, \
                 $16, $17, $18, $19, $20, $21, $22, $23, $24, $24, 1) \
                 ON CONFLICT (name) DO UPDATE SET cron = EXCLUDED.cron, \
                 timezone = EXCLUDED.timezone, queue = EXCLUDED.queue, \
                 misfire = EXCLUDED.misfire, catch_up_max = EXCLUDED.catch_up_max, \
                 jitter_ms = EXCLUDED.jitter_ms, max_backlog = EXCLUDED.max_backlog, \
                 paused = EXCLUDED.paused, job_payload = EXCLUDED.job_payload, \
                 job_priority = EXCLUDED.job_priority, job_delay_ms = EXCLUDED.job_delay_ms, \
                 job_ttr_ms = EXCLUDED.job_ttr_ms, job_max_attempts = EXCLUDED.job_max_attempts, \
                 job_backoff_initial_ms = EXCLUDED.job_backoff_initial_ms, \
                 job_backoff_max_ms = EXCLUDED.job_backoff_max_ms, \
                 job_backoff_multiplier = EXCLUDED.job_backoff_multiplier, \
                 job_backoff_jitter = EXCLUDED.job_backoff_jitter, \
                 job_header_names = EXCLUDED.job_header_names, \
                 job_header_values = EXCLUDED.job_header_values, \
                 job_idempotency_key = EXCLUDED.job_idempotency_key, \
                 job_idempotency_ttl_ms = EXCLUDED.job_idempotency_ttl_ms, \
                 next_fire_ms = EXCLUDED.next_fire_ms, updated_ns = EXCLUDED.updated_ns, \
                 version = spool_schedules.version + 1 \
                 RETURNING ",
                cols!(),
                ""
            ),
            &[
                &name,
                &spec.cron,
                &spec.timezone,
                &spec.queue.as_str(),
                &spec.misfire.as_str(),
                &(spec.catch_up_max.min(i32::MAX as u32) as i32),
                &db_u64(spec.jitter_ms),
                &spec.max_backlog.map(db_u64),
                &spec.paused,
                &&job.payload[..],
                &job.priority.map(i64::from),
                &delay_ms,
                &job.ttr_ms.map(db_u64),
                &job.max_attempts.map(|n| n.min(i32::MAX as u32) as i32),
                &job.backoff.map(|b| db_u64(b.initial_ms)),
                &job.backoff.map(|b| db_u64(b.max_ms)),
                &job.backoff.map(|b| b.multiplier),
                &job.backoff.map(|b| b.jitter),
                &(!names.is_empty()).then_some(&names),
                &(!values.is_empty()).then_some(&values),
                &job.idempotency_key,
                &job.idempotency_ttl_ms.map(db_u64),
                &next.map(db_u64),
                &db_u64(now),
            ],
        )
        .await?;
    Ok(schedule(one(&rows)?, existing.is_none()))
}

pub(crate) async fn get(c: &mut Conn, name: &str) -> Result<Outcome, OpError> {
    let rows = c
        .query(
            concat!("SELECT ", cols!(), " FROM spool_schedules WHERE name = $1"),
            &[&name],
        )
        .await?;
    Ok(schedule(one(&rows)?, false))
}

pub(crate) async fn list(c: &mut Conn) -> Result<Outcome, OpError> {
    let rows = c
        .query(
            concat!("SELECT ", cols!(), " FROM spool_schedules ORDER BY name"),
            &[],
        )
        .await?;
    Ok(Outcome::Schedules(
        rows.iter().map(view).collect::<Result<_, _>>()?,
    ))
}

pub(crate) async fn delete(c: &mut Conn, name: &str) -> Result<Outcome, OpError> {
    let gone = c
        .execute("DELETE FROM spool_schedules WHERE name = $1", &[&name])
        .await?;
    if gone == 0 {
        return Err(OpError::Broker(BrokerError::NotFound));
    }
    Ok(Outcome::Done)
}

/// Pauses (`paused`) or resumes a schedule. A resumed one fires from the
/// next instant after now: instants while paused are not misfires.
pub(crate) async fn set_paused(
    c: &mut Conn,
    name: &str,
    paused: bool,
    now: u64,
) -> Result<Outcome, OpError> {
    let Some(current) = lock(c, name).await? else {
        return Err(OpError::Broker(BrokerError::NotFound));
    };
    if current.spec.paused == paused {
        return Ok(schedule(current, false));
    }
    let next = if paused {
        None
    } else {
        let rule = check_spec(&current.spec)?;
        first_due(&rule, current.last_fire_at_ms, None, now / NS_PER_MS)
    };
    let rows = c
        .query(
            concat!(
                "UPDATE spool_schedules SET paused = $2, next_fire_ms = $3, updated_ns = $4, \
                 version = version + 1 WHERE name = $1 RETURNING ",
                cols!(),
                ""
            ),
            &[&name, &paused, &next.map(db_u64), &db_u64(now)],
        )
        .await?;
    Ok(schedule(one(&rows)?, false))
}

/// What the firings of one pass (or a trigger) did to a schedule.
#[derive(Debug, Default)]
struct Fired {
    fires: u64,
    backlog_skips: u64,
    last_fire_ms: Option<u64>,
    last_job: Option<u64>,
    last_skew_ms: Option<u64>,
    /// Each fired instant's lateness (a pass's, not a trigger's).
    skews_ns: Vec<u64>,
}

/// Fires `current` for the instant `due_ms`, unless its backlog bound
/// holds it back (`check_backlog`).
async fn fire(
    c: &mut Conn,
    ctx: &Ctx,
    current: &ScheduleView,
    due_ms: u64,
    check_backlog: bool,
    now: u64,
    fired: &mut Fired,
) -> Result<(), OpError> {
    let name = current.name.as_str();
    let spec = &current.spec;
    if let (Some(max_backlog), true) = (spec.max_backlog, check_backlog) {
        // The schedule's jobs waiting (ready or delayed), as the local
        // broker counts them; bounded by the bound itself. One count a
        // state, so that each reads its index (ready, parked) from the
        // queue's part on, not the whole live partition.
        let backlog: i64 = c
            .query_opt(
                "SELECT (SELECT count(*) FROM (SELECT 1 FROM spool_jobs_live WHERE queue = $1 \
                 AND state = 'ready' AND schedule = $2 LIMIT $3) r) \
                 + (SELECT count(*) FROM (SELECT 1 FROM spool_jobs_live WHERE queue = $1 \
                 AND state = 'delayed' AND schedule = $2 LIMIT $3) d)",
                &[&spec.queue.as_str(), &name, &db_u64(max_backlog)],
            )
            .await?
            .map_or(0, |row| row.get(0));
        if from_db(backlog) >= max_backlog {
            fired.backlog_skips += 1;
            return Ok(());
        }
    }
    let jitter = jitter_ms(name, due_ms, spec.jitter_ms);
    let job = firing_job(name, spec, due_ms, jitter);
    let ready_at_ms = match job.run_at {
        RunAt::AtMs(at) => at,
        RunAt::Now | RunAt::DelayMs(_) => due_ms,
    };
    let origin = Origin {
        workflow: None,
        schedule: Some(name),
        whole_op: false,
    };
    let made = enqueue_from(c, ctx, vec![(spec.queue.clone(), job)], now, origin).await;
    let (job, duplicate) = match made {
        Ok(mut made) if !made.is_empty() => made.remove(0),
        Ok(_) => return Err(internal("an enqueue made no job".into())),
        // A refusal (the queue is full): the instant is skipped, counted
        // like a backlog skip, and the pass goes on.
        Err(OpError::Broker(error)) => {
            tracing::warn!(schedule = name, due_ms, %error, "a schedule's firing was refused");
            fired.backlog_skips += 1;
            return Ok(());
        }
        Err(error) => return Err(error),
    };
    // A key already used: this instant fired before (a trigger in the same
    // millisecond); it is not fired twice nor counted twice.
    if !duplicate {
        fired.fires += 1;
        // Due → fired, as the local broker measures it.
        fired
            .skews_ns
            .push(now.saturating_sub(due_ms.saturating_mul(NS_PER_MS)));
    }
    fired.last_fire_ms = Some(due_ms);
    fired.last_job = Some(job.id);
    let now_ms = now / NS_PER_MS;
    if ready_at_ms <= now_ms {
        fired.last_skew_ms = Some(now_ms - ready_at_ms);
    }
    Ok(())
}

async fn record(
    c: &mut Conn,
    name: &str,
    next_fire_ms: Option<u64>,
    misfires_skipped: u64,
    fired: &Fired,
    now: u64,
) -> Result<Vec<tokio_postgres::Row>, OpError> {
    Ok(c.query(
        concat!(
            "UPDATE spool_schedules SET next_fire_ms = $2, \
                 last_fire_ms = coalesce($3, last_fire_ms), last_job = coalesce($4, last_job), \
                 fires = fires + $5, misfires_skipped = misfires_skipped + $6, \
                 backlog_skips = backlog_skips + $7, \
                 last_skew_ms = coalesce($8, last_skew_ms), updated_ns = $9, \
                 version = version + 1 WHERE name = $1 RETURNING ",
            cols!(),
            ""
        ),
        &[
            &name,
            &next_fire_ms.map(db_u64),
            &fired.last_fire_ms.map(db_u64),
            &fired.last_job.map(db_u64),
            &db_u64(fired.fires),
            &db_u64(misfires_skipped),
            &db_u64(fired.backlog_skips),
            &fired.last_skew_ms.map(db_u64),
            &db_u64(now),
        ],
    )
    .await?)
}

/// Fires the schedule now, outside its rule (due instant = now): the
/// backlog bound does not hold a trigger back, and `next_fire_at` stays.
pub(crate) async fn trigger(
    c: &mut Conn,
    ctx: &Ctx,
    name: &str,
    now: u64,
) -> Result<Outcome, OpError> {
    let Some(current) = lock(c, name).await? else {
        return Err(OpError::Broker(BrokerError::NotFound));
    };
    let mut fired = Fired::default();
    fire(c, ctx, &current, now / NS_PER_MS, false, now, &mut fired).await?;
    let rows = record(c, name, current.next_fire_at_ms, 0, &fired, now).await?;
    Ok(schedule(one(&rows)?, false))
}

/// Fires every schedule due at `now` (a bounded batch, earliest first, rows
/// other nodes are firing skipped) under its misfire policy; returns the
/// earliest due instant left (wall-clock ms), for the timer's next wake.
pub(crate) async fn fire_due(
    c: &mut Conn,
    ctx: &Ctx,
    now: u64,
    fx: &mut Effects,
) -> Result<Option<u64>, OpError> {
    let now_ms = now / NS_PER_MS;
    let rows = c
        .query(
            concat!(
                "SELECT ",
                cols!(),
                " FROM spool_schedules WHERE next_fire_ms <= $1 \
                 ORDER BY next_fire_ms LIMIT $2 FOR UPDATE SKIP LOCKED"
            ),
            &[&db_u64(now_ms), &FIRE_BATCH_SCHEDULES],
        )
        .await?;
    for row in &rows {
        let current = view(row)?;
        let rule: Rule = match check_spec(&current.spec) {
            Ok(rule) => rule,
            Err(error) => {
                // Accepted once, refused now (a time zone this build no
                // longer knows): parked instead of failing every pass.
                tracing::warn!(schedule = current.name, %error, "a schedule cannot fire");
                record(c, &current.name, None, 0, &Fired::default(), now).await?;
                continue;
            }
        };
        let planned = plan(&rule, &current.spec, current.next_fire_at_ms, now_ms);
        let mut fired = Fired::default();
        for &due_ms in &planned.fire {
            fire(c, ctx, &current, due_ms, true, now, &mut fired).await?;
        }
        fx.skews.extend(
            fired
                .skews_ns
                .iter()
                .map(|&skew_ns| Skew::Schedule(current.name.clone(), skew_ns)),
        );
        record(
            c,
            &current.name,
            planned.next_fire_at_ms,
            planned.skipped,
            &fired,
            now,
        )
        .await?;
    }
    let next = c
        .query_opt(
            "SELECT min(next_fire_ms) FROM spool_schedules WHERE next_fire_ms IS NOT NULL",
            &[],
        )
        .await?
        .and_then(|row| row.get::<_, Option<i64>>(0))
        .map(from_db);
    Ok(next)
}

/// Every schedule's figures for snapshots (`/metrics`, `spool stats`). The
/// counters are the durable ones of the rows; the skew histogram is left
/// empty here and filled by the broker from this node's firings.
pub(crate) async fn snapshots(c: &mut Conn) -> Result<Vec<ScheduleSnapshot>, OpError> {
    let rows = c
        .query(
            "SELECT name, queue, paused, next_fire_ms, last_fire_ms, last_skew_ms, fires, \
             misfires_skipped, backlog_skips FROM spool_schedules ORDER BY name",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|row| ScheduleSnapshot {
            name: row.get(0),
            queue: row.get(1),
            paused: row.get(2),
            next_fire_at_ms: opt_u64(row, 3),
            last_fire_at_ms: opt_u64(row, 4),
            last_skew_ms: opt_u64(row, 5),
            fires: from_db(row.get(6)),
            misfires_skipped: from_db(row.get(7)),
            backlog_skips: from_db(row.get(8)),
            skew: Histogram::skew(),
        })
        .collect())
}
