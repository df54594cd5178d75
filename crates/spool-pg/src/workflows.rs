//! Workflows on PostgreSQL: the shared state machine of
//! `spool_engine::workflow` run inside the transaction of the job change
//! that caused each transition.
//!
//! A workflow is one row whose `data` holds [`Workflow::encode`]; a
//! transition locks it `FOR UPDATE`, decodes it, runs the pure transition,
//! carries out its effects (enqueue step or compensation jobs, cancel step
//! jobs) and writes the row back, all before the caller's commit. Locks are
//! taken job row first, then workflow row, except by `CancelWorkflow`
//! (workflow, then its jobs); a deadlock between the two is retried like any.

use std::collections::HashMap;

use spool_broker::workflow::WorkflowPage;
use spool_broker::{BrokerError, JobState, NewWorkflow, Outcome, WorkflowId, WorkflowState};
use spool_engine::limits;
use spool_engine::workflow::{self as pure, Effects, JobEvent, Workflow};

use crate::error::{DbError, OpError};
use crate::ops::{db_u64, delay_of, enqueue_from, from_db, notify, Ctx, Origin, NS_PER_MS};
use crate::pool::Conn;

fn corrupt(id: i64, error: impl std::fmt::Display) -> OpError {
    OpError::Broker(BrokerError::Internal(format!(
        "workflow {id} in the database cannot be read: {error}"
    )))
}

fn encoded(workflow: &Workflow) -> Vec<u8> {
    let mut out = Vec::new();
    workflow.encode(&mut out);
    out
}

/// `workflow`'s row: the row locked, or `None` when it is gone.
async fn lock(c: &mut Conn, id: i64) -> Result<Option<Workflow>, OpError> {
    let row = c
        .query_opt(
            "SELECT data FROM spool_workflows WHERE id = $1 FOR UPDATE",
            &[&id],
        )
        .await?;
    row.map(|row| Workflow::decode(row.get(0)).map_err(|e| corrupt(id, e)))
        .transpose()
}

/// Writes `workflow` back (its row exists and is locked).
async fn save(c: &mut Conn, workflow: &Workflow) -> Result<(), OpError> {
    c.execute(
        "UPDATE spool_workflows SET state = $2, finished_ns = $3, data = $4 WHERE id = $1",
        &[
            &db_u64(workflow.id),
            &workflow.status.state.as_str(),
            &finished_ns(workflow),
            &encoded(workflow),
        ],
    )
    .await?;
    Ok(())
}

fn finished_ns(workflow: &Workflow) -> Option<i64> {
    workflow
        .status
        .finished_at_ms
        .map(|ms| db_u64(ms.saturating_mul(NS_PER_MS)))
}

/// Carries out a transition's effects: cancels the step jobs it gave up
/// on, enqueues the jobs it starts and records their ids in `workflow`.
async fn apply_effects(
    c: &mut Conn,
    ctx: &Ctx,
    workflow: &mut Workflow,
    fx: Effects,
    now: u64,
) -> Result<(), OpError> {
    if !fx.cancel.is_empty() {
        let ids: Vec<i64> = fx.cancel.iter().map(|&id| db_u64(id)).collect();
        // As `Op::Cancel` leaves a job; the workflow already counts these
        // steps as cancelled, so no event comes back from them.
        let queues = c
            .query(
                "WITH j AS (UPDATE spool_jobs SET state = 'cancelled', cancel_requested = true, \
                 finished_ns = $2, updated_ns = $2, version = version + 1, run_at_ns = NULL, \
                 purge_at_ns = $2 + coalesce((SELECT retention_ms FROM spool_queues \
                 WHERE name = spool_jobs.queue), $3) * 1000000, \
                 lease_token = NULL, deadline_ns = NULL, lease_owner = NULL \
                 WHERE id = ANY($1) AND state IN ('ready', 'reserved', 'delayed', 'buried') \
                 RETURNING queue) SELECT DISTINCT queue FROM j",
                &[&ids, &db_u64(now), &db_u64(limits::RETENTION_MS_DEFAULT)],
            )
            .await?;
        for row in queues {
            notify(c, row.get(0)).await?;
        }
    }
    if !fx.enqueue.is_empty() {
        let targets: Vec<_> = fx.enqueue.iter().map(|e| (e.step, e.role)).collect();
        let jobs = fx.enqueue.into_iter().map(|e| (e.queue, e.job)).collect();
        let origin = Origin {
            workflow: Some(workflow.id),
            schedule: None,
            whole_op: false,
        };
        let made = enqueue_from(c, ctx, jobs, now, origin).await?;
        for ((step, role), (job, _)) in targets.into_iter().zip(made) {
            workflow.attach_job(step, role, job.id);
        }
    }
    Ok(())
}

/// A job of workflow `workflow_id` changed (`job` is locked by the caller):
/// the workflow's transition and its effects, in the caller's transaction.
pub(crate) async fn on_job_event(
    c: &mut Conn,
    ctx: &Ctx,
    workflow_id: i64,
    job: u64,
    event: JobEvent,
    now: u64,
) -> Result<(), OpError> {
    // Gone past its retention: nothing waits on this job any more.
    let Some(mut workflow) = lock(c, workflow_id).await? else {
        return Ok(());
    };
    let Some((step, role)) = workflow.step_of_job(job) else {
        return Ok(());
    };
    let fx = workflow.on_job(step, role, event, now / NS_PER_MS)?;
    if !fx.changed {
        return Ok(());
    }
    apply_effects(c, ctx, &mut workflow, fx, now).await?;
    save(c, &workflow).await
}

/// The view of `workflow`, with its jobs' states read now.
async fn view(c: &mut Conn, workflow: &Workflow) -> Result<spool_broker::WorkflowView, OpError> {
    let ids: Vec<i64> = workflow.jobs().map(|(id, _, _)| db_u64(id)).collect();
    let mut jobs: HashMap<u64, (JobState, u32, Option<String>)> = HashMap::new();
    if !ids.is_empty() {
        for row in c
            .query(
                "SELECT id, state, attempts, last_error FROM spool_jobs WHERE id = ANY($1)",
                &[&ids],
            )
            .await?
        {
            let Some(state) = JobState::parse(row.get(1)) else {
                continue;
            };
            jobs.insert(
                from_db(row.get(0)),
                (state, row.get::<_, i32>(2).max(0) as u32, row.get(3)),
            );
        }
    }
    Ok(workflow.view(|id| jobs.get(&id).cloned()))
}

fn outcome(view: spool_broker::WorkflowView, duplicate: bool) -> Outcome {
    Outcome::Workflow {
        workflow: Box::new(view),
        duplicate,
    }
}

pub(crate) async fn start(
    c: &mut Conn,
    ctx: &Ctx,
    definition: NewWorkflow,
    now: u64,
) -> Result<Outcome, OpError> {
    // A live key answers its workflow whatever this body says, as the
    // local broker does.
    let key = definition.idempotency_key.clone();
    if let Some(key) = &key {
        let holder = c
            .query_opt(
                "SELECT workflow_id FROM spool_workflow_keys WHERE key = $1 AND expires_ns > $2",
                &[key, &db_u64(now)],
            )
            .await?;
        if let Some(row) = holder {
            let id: i64 = row.get(0);
            if let Some(existing) = lock(c, id).await? {
                return Ok(outcome(view(c, &existing).await?, true));
            }
        }
    }
    pure::validate(&definition)?;
    // What the pure rules cannot know: this broker's job size and clock.
    for step in &definition.steps {
        let jobs = std::iter::once(&step.job).chain(step.compensate.as_ref().map(|(_, j)| j));
        for job in jobs {
            if job.payload.len() > ctx.max_job_size as usize {
                return Err(OpError::Broker(BrokerError::TooLarge {
                    max_bytes: u64::from(ctx.max_job_size),
                }));
            }
            delay_of(job.run_at, now)?;
        }
    }
    let id: i64 = c
        .query_opt("SELECT nextval('spool_workflow_ids')", &[])
        .await?
        .map(|row| row.get(0))
        .ok_or_else(|| BrokerError::Internal("nextval returned no row".into()))?;
    let (mut workflow, fx) = Workflow::start(from_db(id), definition, now / NS_PER_MS)?;
    apply_effects(c, ctx, &mut workflow, fx, now).await?;
    c.execute(
        "INSERT INTO spool_workflows (id, state, created_ns, finished_ns, data) \
         VALUES ($1, $2, $3, $4, $5)",
        &[
            &id,
            &workflow.status.state.as_str(),
            &db_u64(now),
            &finished_ns(&workflow),
            &encoded(&workflow),
        ],
    )
    .await?;
    if let Some(key) = &key {
        let expires = db_u64(workflow.idempotency_expires_at_ms.saturating_mul(NS_PER_MS));
        let claimed = c
            .execute(
                "INSERT INTO spool_workflow_keys (key, workflow_id, expires_ns) \
                 VALUES ($1, $2, $3) ON CONFLICT (key) DO UPDATE \
                 SET workflow_id = EXCLUDED.workflow_id, expires_ns = EXCLUDED.expires_ns \
                 WHERE spool_workflow_keys.expires_ns <= $4",
                &[key, &id, &expires, &db_u64(now)],
            )
            .await?;
        if claimed == 0 {
            // Another node started a workflow with this key since we
            // looked: run again, and answer its workflow.
            return Err(OpError::Db(DbError::Retry));
        }
    }
    Ok(outcome(view(c, &workflow).await?, false))
}

pub(crate) async fn get(c: &mut Conn, id: WorkflowId) -> Result<Outcome, OpError> {
    let row = c
        .query_opt(
            "SELECT data FROM spool_workflows WHERE id = $1",
            &[&db_u64(id)],
        )
        .await?;
    let Some(row) = row else {
        return Err(OpError::Broker(BrokerError::NotFound));
    };
    let workflow = Workflow::decode(row.get(0)).map_err(|e| corrupt(db_u64(id), e))?;
    Ok(outcome(view(c, &workflow).await?, false))
}

pub(crate) async fn list(
    c: &mut Conn,
    state: Option<WorkflowState>,
    after: Option<WorkflowId>,
    limit: u32,
) -> Result<Outcome, OpError> {
    if limit == 0 || limit > limits::WORKFLOW_LIST_LIMIT_MAX {
        return Err(OpError::Broker(BrokerError::invalid(
            "limit",
            format!("1 to {}", limits::WORKFLOW_LIST_LIMIT_MAX),
        )));
    }
    let rows = c
        .query(
            "SELECT id, data FROM spool_workflows WHERE ($1::text IS NULL OR state = $1) \
             AND id > $2 ORDER BY id LIMIT $3",
            &[
                &state.map(|s| s.as_str()),
                &db_u64(after.unwrap_or(0)),
                &(i64::from(limit) + 1),
            ],
        )
        .await?;
    let more = rows.len() > limit as usize;
    let mut workflows = Vec::with_capacity(rows.len().min(limit as usize));
    for row in rows.iter().take(limit as usize) {
        let workflow = Workflow::decode(row.get(1)).map_err(|e| corrupt(row.get(0), e))?;
        workflows.push(view(c, &workflow).await?);
    }
    let next = more.then(|| workflows.last().map(|w| w.id)).flatten();
    Ok(Outcome::Workflows(WorkflowPage { workflows, next }))
}

pub(crate) async fn cancel(
    c: &mut Conn,
    ctx: &Ctx,
    id: WorkflowId,
    now: u64,
) -> Result<Outcome, OpError> {
    let Some(mut workflow) = lock(c, db_u64(id)).await? else {
        return Err(OpError::Broker(BrokerError::NotFound));
    };
    let fx = workflow.cancel(now / NS_PER_MS)?;
    if fx.changed {
        apply_effects(c, ctx, &mut workflow, fx, now).await?;
        save(c, &workflow).await?;
    }
    Ok(outcome(view(c, &workflow).await?, false))
}

/// Succeeded and compensated workflows past the retention (age, then
/// count), a bounded batch per pass.
pub(crate) async fn retention(c: &mut Conn, now: u64, batch: i64) -> Result<(), OpError> {
    let horizon = now.saturating_sub(limits::WORKFLOW_RETENTION_MS.saturating_mul(NS_PER_MS));
    c.execute(
        "DELETE FROM spool_workflows WHERE id IN (SELECT id FROM spool_workflows \
         WHERE finished_ns <= $1 AND state IN ('succeeded', 'compensated') \
         LIMIT $2 FOR UPDATE SKIP LOCKED)",
        &[&db_u64(horizon), &batch],
    )
    .await?;
    c.execute(
        "DELETE FROM spool_workflows WHERE id IN (SELECT id FROM spool_workflows \
         WHERE finished_ns IS NOT NULL AND state IN ('succeeded', 'compensated') \
         ORDER BY finished_ns DESC, id DESC OFFSET $1 LIMIT $2 FOR UPDATE SKIP LOCKED)",
        &[&(limits::WORKFLOW_RETENTION_MAX as i64), &batch],
    )
    .await?;
    Ok(())
}

/// Workflows held now by state, for `spool_workflows{state}`.
pub(crate) async fn count_by_state(
    c: &mut Conn,
) -> Result<std::collections::BTreeMap<&'static str, u64>, OpError> {
    let mut counts = std::collections::BTreeMap::new();
    for row in c
        .query(
            "SELECT state, count(*) FROM spool_workflows GROUP BY state",
            &[],
        )
        .await?
    {
        if let Some(state) = WorkflowState::parse(row.get(0)) {
            counts.insert(state.as_str(), from_db(row.get(1)));
        }
    }
    Ok(counts)
}
