//! `/v1/schedules`: cron schedules (API.md, "schedules"), each endpoint one
//! [`Broker::call`]. Only translation lives here: the rules (cron syntax,
//! time zones, misfires) are the broker's (`spool_engine::schedule`).
//!
//! `PUT` answers 201 when it created the schedule, 200 when it replaced
//! one; `DELETE` answers 204. Instants are RFC 3339 UTC; `job` is an
//! enqueue body whose `run_at` is refused (a recurring job has no fixed
//! instant) and whose `idempotency_key` is replaced by the firing's.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{post, MethodRouter};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use spool_broker::{
    Broker, JobId, Misfire, Op, Outcome, QueueName, RunAt, ScheduleSpec, ScheduleView,
};
use utoipa::ToSchema;

use super::encoding::{base64_encode, format_rfc3339};
use super::jobs::{
    as_json, call, invalid, json_response, parse, query, queue_name, unexpected, BackoffOut,
    EmptyBody, EnqueueBody, IdPath, QueryPairs, Shared,
};
use super::{ApiError, ErrorBody, HttpState};

/// The `/v1/schedules` routes, for `jobs::route_table`.
pub(super) fn route_table<B: Broker>() -> Vec<(&'static str, MethodRouter<Arc<HttpState<B>>>)> {
    vec![
        ("/v1/schedules", axum::routing::get(list_schedules::<B>)),
        (
            "/v1/schedules/{name}",
            axum::routing::put(put_schedule::<B>)
                .get(get_schedule::<B>)
                .delete(delete_schedule::<B>),
        ),
        ("/v1/schedules/{name}/pause", post(pause_schedule::<B>)),
        ("/v1/schedules/{name}/resume", post(resume_schedule::<B>)),
        ("/v1/schedules/{name}/trigger", post(trigger_schedule::<B>)),
    ]
}

/// A fixed name for a `/v1/schedules` request (see `jobs::command_name`).
pub(super) fn command_name(method: &str, segments: &[&str]) -> Option<&'static str> {
    Some(match (method, segments) {
        ("GET", ["schedules"]) => "GET /v1/schedules",
        ("PUT", ["schedules", _]) => "PUT /v1/schedules/{name}",
        ("GET", ["schedules", _]) => "GET /v1/schedules/{name}",
        ("DELETE", ["schedules", _]) => "DELETE /v1/schedules/{name}",
        ("POST", ["schedules", _, "pause"]) => "POST /v1/schedules/{name}/pause",
        ("POST", ["schedules", _, "resume"]) => "POST /v1/schedules/{name}/resume",
        ("POST", ["schedules", _, "trigger"]) => "POST /v1/schedules/{name}/trigger",
        _ => return None,
    })
}

fn schedule_name(path: IdPath) -> Result<QueueName, ApiError> {
    queue_name(path).map_err(|e| e.with_field("name"))
}

// ---- input ----------------------------------------------------------------

/// What happens to instants missed while the server was down or late.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub(super) enum MisfireBody {
    /// Missed instants are counted and dropped.
    Skip,
    /// One job for all missed instants (the latest).
    Once,
    /// One job per missed instant, at most `catch_up_max` (the latest).
    All,
}

impl From<MisfireBody> for Misfire {
    fn from(m: MisfireBody) -> Misfire {
        match m {
            MisfireBody::Skip => Misfire::Skip,
            MisfireBody::Once => Misfire::Once,
            MisfireBody::All => Misfire::All,
        }
    }
}

impl From<Misfire> for MisfireBody {
    fn from(m: Misfire) -> MisfireBody {
        match m {
            Misfire::Skip => MisfireBody::Skip,
            Misfire::Once => MisfireBody::Once,
            Misfire::All => MisfireBody::All,
        }
    }
}

/// A schedule as `PUT` creates or replaces it.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"cron": "0 30 2 * * *", "timezone": "Europe/Berlin", "queue": "reports", "job": {"payload": {"report": "daily"}}, "misfire": "once"}))]
pub(super) struct ScheduleBody {
    /// 5 fields, 6 with seconds first, `@every 10s` (units d h m s), or
    /// `@yearly`, `@monthly`, `@weekly`, `@daily`, `@hourly`.
    #[schema(max_length = 256)]
    cron: String,
    /// An IANA time zone (default UTC).
    timezone: Option<String>,
    /// The queue fired jobs go to.
    #[schema(
        min_length = 1,
        max_length = 200,
        pattern = r"^[A-Za-z0-9+/;.$_()][A-Za-z0-9+/;.$_()-]*$"
    )]
    queue: String,
    /// The job each firing enqueues (an enqueue body; no `run_at`).
    job: EnqueueBody,
    /// Default `once`.
    misfire: Option<MisfireBody>,
    /// Default 100.
    #[schema(minimum = 1, maximum = 10000)]
    catch_up_max: Option<u32>,
    /// Each job becomes ready up to this long after its instant (default 0).
    #[schema(maximum = 86400000)]
    jitter_ms: Option<u64>,
    /// Skip a firing while this many jobs it fired wait in the queue.
    #[schema(minimum = 1)]
    max_backlog: Option<u64>,
    /// Default false.
    paused: Option<bool>,
}

impl ScheduleBody {
    fn into_spec(self) -> Result<ScheduleSpec, ApiError> {
        let queue = QueueName::new(self.queue.as_bytes())
            .map_err(|e| invalid("queue", format!("{:?}: {e}", self.queue)))?;
        Ok(ScheduleSpec {
            cron: self.cron,
            timezone: self.timezone.unwrap_or_else(|| "UTC".to_owned()),
            queue,
            job: self.job.into_new_job("job.")?,
            misfire: self.misfire.map_or(Misfire::default(), Misfire::from),
            catch_up_max: self
                .catch_up_max
                .unwrap_or(spool_engine::schedule::CATCH_UP_MAX_DEFAULT),
            jitter_ms: self.jitter_ms.unwrap_or(0),
            max_backlog: self.max_backlog,
            paused: self.paused.unwrap_or(false),
        })
    }
}

// ---- output ---------------------------------------------------------------

/// A schedule's job template as answers show it.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = ScheduleJob)]
pub(super) struct TemplateOut<'a> {
    /// The stored bytes when they are a JSON text (else `payload_base64`).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<serde_json::Value>)]
    payload: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload_base64: Option<String>,
    priority: Option<u32>,
    delay_ms: Option<u64>,
    ttr_ms: Option<u64>,
    max_attempts: Option<u32>,
    backoff: Option<BackoffOut>,
    #[schema(value_type = BTreeMap<String, String>)]
    headers: &'a BTreeMap<String, String>,
    idempotency_ttl_ms: Option<u64>,
}

/// A schedule as API.md shows it.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Schedule)]
pub(super) struct ScheduleOut<'a> {
    #[schema(value_type = String)]
    name: &'a str,
    #[schema(value_type = String)]
    cron: &'a str,
    #[schema(value_type = String)]
    timezone: &'a str,
    #[schema(value_type = String)]
    queue: &'a str,
    job: TemplateOut<'a>,
    misfire: MisfireBody,
    catch_up_max: u32,
    jitter_ms: u64,
    max_backlog: Option<u64>,
    paused: bool,
    /// The next due instant; null while paused.
    #[schema(format = DateTime)]
    next_fire_at: Option<String>,
    /// The due instant of the last firing.
    #[schema(format = DateTime)]
    last_fire_at: Option<String>,
    #[schema(value_type = Option<u64>)]
    last_job: Option<JobId>,
    /// Jobs fired (triggers included).
    fires: u64,
    /// Instants dropped by the misfire policy.
    misfires_skipped: u64,
    /// Instants skipped because of `max_backlog`.
    backlog_skips: u64,
    /// How late the last firing was, in ms.
    last_skew_ms: Option<u64>,
    #[schema(format = DateTime)]
    created_at: String,
    #[schema(format = DateTime)]
    updated_at: String,
    version: u64,
}

impl<'a> ScheduleOut<'a> {
    fn new(s: &'a ScheduleView) -> ScheduleOut<'a> {
        let job = &s.spec.job;
        let (payload, payload_base64) = match as_json(&job.payload) {
            Some(json) => (Some(json), None),
            None => (None, Some(base64_encode(&job.payload))),
        };
        ScheduleOut {
            name: &s.name,
            cron: &s.spec.cron,
            timezone: &s.spec.timezone,
            queue: s.spec.queue.as_str(),
            job: TemplateOut {
                payload,
                payload_base64,
                priority: job.priority,
                delay_ms: match job.run_at {
                    RunAt::DelayMs(ms) => Some(ms),
                    RunAt::Now | RunAt::AtMs(_) => None,
                },
                ttr_ms: job.ttr_ms,
                max_attempts: job.max_attempts,
                backoff: job.backoff.as_ref().map(BackoffOut::from),
                headers: &job.headers,
                idempotency_ttl_ms: job.idempotency_ttl_ms,
            },
            misfire: s.spec.misfire.into(),
            catch_up_max: s.spec.catch_up_max,
            jitter_ms: s.spec.jitter_ms,
            max_backlog: s.spec.max_backlog,
            paused: s.spec.paused,
            next_fire_at: s.next_fire_at_ms.map(format_rfc3339),
            last_fire_at: s.last_fire_at_ms.map(format_rfc3339),
            last_job: s.last_job,
            fires: s.fires,
            misfires_skipped: s.misfires_skipped,
            backlog_skips: s.backlog_skips,
            last_skew_ms: s.last_skew_ms,
            created_at: format_rfc3339(s.created_at_ms),
            updated_at: format_rfc3339(s.updated_at_ms),
            version: s.version,
        }
    }
}

/// `{"schedules": [...]}`, by name.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = ScheduleList)]
pub(super) struct SchedulesOut<'a> {
    schedules: Vec<ScheduleOut<'a>>,
}

async fn call_schedule<B: Broker>(state: &HttpState<B>, op: Op) -> Result<Response, ApiError> {
    match call(state, op).await? {
        Outcome::Schedule { schedule, created } => {
            let status = if created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            Ok(json_response(status, &ScheduleOut::new(&schedule)))
        }
        _ => Err(unexpected()),
    }
}

// ---- handlers ---------------------------------------------------------------

#[utoipa::path(
    put,
    path = "/v1/schedules/{name}",
    tag = "schedules",
    summary = "Create or replace a schedule",
    description = "A replaced schedule keeps when it last fired and its counters, so a replace \
                   while due neither fires an instant twice nor loses it.",
    params(
        ("name" = String, Path, description = "The schedule (the rules of a queue name)", min_length = 1, max_length = 200, pattern = r"^[A-Za-z0-9+/;.$_()][A-Za-z0-9+/;.$_()-]*$"),
    ),
    request_body = ScheduleBody,
    responses(
        (status = 201, description = "Created", body = ScheduleOut),
        (status = 200, description = "Replaced", body = ScheduleOut),
        (status = 400, description = "Invalid input; `field` names it (cron, timezone, job.…)", body = ErrorBody),
        (status = 401, description = "Missing or wrong bearer token (with SPOOL_AUTH_TOKEN set)", body = ErrorBody),
        (status = 413, description = "The request body is too large", body = ErrorBody),
        (status = 503, description = "Recovering, draining or storage failing", body = ErrorBody),
    ),
    security(("bearer" = [])),
)]
pub(super) async fn put_schedule<B: Broker>(
    State(state): Shared<B>,
    name: IdPath,
    params: QueryPairs,
    body: Bytes,
) -> Result<Response, ApiError> {
    let name = schedule_name(name)?;
    query(params, &[])?;
    let spec = parse::<ScheduleBody>(&body)?.into_spec()?;
    call_schedule(
        &state,
        Op::PutSchedule {
            name,
            spec: Box::new(spec),
        },
    )
    .await
}

#[utoipa::path(
    get,
    path = "/v1/schedules",
    tag = "schedules",
    summary = "Every schedule, by name",
    responses(
        (status = 200, description = "The schedules", body = SchedulesOut),
        (status = 400, description = "Invalid input; `field` names it", body = ErrorBody),
        (status = 401, description = "Missing or wrong bearer token (with SPOOL_AUTH_TOKEN set)", body = ErrorBody),
        (status = 413, description = "The request body is too large", body = ErrorBody),
        (status = 503, description = "Recovering", body = ErrorBody),
    ),
    security(("bearer" = [])),
)]
pub(super) async fn list_schedules<B: Broker>(
    State(state): Shared<B>,
    params: QueryPairs,
) -> Result<Response, ApiError> {
    query(params, &[])?;
    match call(&state, Op::ListSchedules).await? {
        Outcome::Schedules(list) => Ok(json_response(
            StatusCode::OK,
            &SchedulesOut {
                schedules: list.iter().map(ScheduleOut::new).collect(),
            },
        )),
        _ => Err(unexpected()),
    }
}

#[utoipa::path(
    get,
    path = "/v1/schedules/{name}",
    tag = "schedules",
    summary = "A schedule, with its next and last firing",
    params(
        ("name" = String, Path, description = "The schedule", min_length = 1, max_length = 200, pattern = r"^[A-Za-z0-9+/;.$_()][A-Za-z0-9+/;.$_()-]*$"),
    ),
    responses(
        (status = 200, description = "The schedule", body = ScheduleOut),
        (status = 400, description = "Invalid input; `field` names it", body = ErrorBody),
        (status = 401, description = "Missing or wrong bearer token (with SPOOL_AUTH_TOKEN set)", body = ErrorBody),
        (status = 404, description = "No such schedule", body = ErrorBody),
        (status = 413, description = "The request body is too large", body = ErrorBody),
        (status = 503, description = "Recovering", body = ErrorBody),
    ),
    security(("bearer" = [])),
)]
pub(super) async fn get_schedule<B: Broker>(
    State(state): Shared<B>,
    name: IdPath,
    params: QueryPairs,
) -> Result<Response, ApiError> {
    let name = schedule_name(name)?;
    query(params, &[])?;
    call_schedule(&state, Op::GetSchedule { name }).await
}

#[utoipa::path(
    delete,
    path = "/v1/schedules/{name}",
    tag = "schedules",
    summary = "Delete a schedule (the jobs it fired stay)",
    params(
        ("name" = String, Path, description = "The schedule", min_length = 1, max_length = 200, pattern = r"^[A-Za-z0-9+/;.$_()][A-Za-z0-9+/;.$_()-]*$"),
    ),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, description = "Invalid input; `field` names it", body = ErrorBody),
        (status = 401, description = "Missing or wrong bearer token (with SPOOL_AUTH_TOKEN set)", body = ErrorBody),
        (status = 404, description = "No such schedule", body = ErrorBody),
        (status = 413, description = "The request body is too large", body = ErrorBody),
        (status = 503, description = "Recovering or storage failing", body = ErrorBody),
    ),
    security(("bearer" = [])),
)]
pub(super) async fn delete_schedule<B: Broker>(
    State(state): Shared<B>,
    name: IdPath,
    params: QueryPairs,
) -> Result<Response, ApiError> {
    let name = schedule_name(name)?;
    query(params, &[])?;
    match call(&state, Op::DeleteSchedule { name }).await? {
        Outcome::Done => Ok(StatusCode::NO_CONTENT.into_response()),
        _ => Err(unexpected()),
    }
}

#[utoipa::path(
    post,
    path = "/v1/schedules/{name}/pause",
    tag = "schedules",
    summary = "Pause a schedule: no firing until resumed",
    params(
        ("name" = String, Path, description = "The schedule", min_length = 1, max_length = 200, pattern = r"^[A-Za-z0-9+/;.$_()][A-Za-z0-9+/;.$_()-]*$"),
    ),
    request_body = Option<EmptyBody>,
    responses(
        (status = 200, description = "The schedule", body = ScheduleOut),
        (status = 400, description = "Invalid input; `field` names it", body = ErrorBody),
        (status = 401, description = "Missing or wrong bearer token (with SPOOL_AUTH_TOKEN set)", body = ErrorBody),
        (status = 404, description = "No such schedule", body = ErrorBody),
        (status = 413, description = "The request body is too large", body = ErrorBody),
        (status = 503, description = "Recovering or storage failing", body = ErrorBody),
    ),
    security(("bearer" = [])),
)]
pub(super) async fn pause_schedule<B: Broker>(
    State(state): Shared<B>,
    name: IdPath,
    body: Bytes,
) -> Result<Response, ApiError> {
    let name = schedule_name(name)?;
    parse::<EmptyBody>(&body)?;
    call_schedule(&state, Op::PauseSchedule { name }).await
}

#[utoipa::path(
    post,
    path = "/v1/schedules/{name}/resume",
    tag = "schedules",
    summary = "Resume a schedule from the next instant after now",
    params(
        ("name" = String, Path, description = "The schedule", min_length = 1, max_length = 200, pattern = r"^[A-Za-z0-9+/;.$_()][A-Za-z0-9+/;.$_()-]*$"),
    ),
    request_body = Option<EmptyBody>,
    responses(
        (status = 200, description = "The schedule", body = ScheduleOut),
        (status = 400, description = "Invalid input; `field` names it", body = ErrorBody),
        (status = 401, description = "Missing or wrong bearer token (with SPOOL_AUTH_TOKEN set)", body = ErrorBody),
        (status = 404, description = "No such schedule", body = ErrorBody),
        (status = 413, description = "The request body is too large", body = ErrorBody),
        (status = 503, description = "Recovering or storage failing", body = ErrorBody),
    ),
    security(("bearer" = [])),
)]
pub(super) async fn resume_schedule<B: Broker>(
    State(state): Shared<B>,
    name: IdPath,
    body: Bytes,
) -> Result<Response, ApiError> {
    let name = schedule_name(name)?;
    parse::<EmptyBody>(&body)?;
    call_schedule(&state, Op::ResumeSchedule { name }).await
}

#[utoipa::path(
    post,
    path = "/v1/schedules/{name}/trigger",
    tag = "schedules",
    summary = "Fire a schedule now, outside its rule (paused ones too)",
    params(
        ("name" = String, Path, description = "The schedule", min_length = 1, max_length = 200, pattern = r"^[A-Za-z0-9+/;.$_()][A-Za-z0-9+/;.$_()-]*$"),
    ),
    request_body = Option<EmptyBody>,
    responses(
        (status = 200, description = "The schedule, with the job in `last_job`", body = ScheduleOut),
        (status = 400, description = "Invalid input; `field` names it", body = ErrorBody),
        (status = 401, description = "Missing or wrong bearer token (with SPOOL_AUTH_TOKEN set)", body = ErrorBody),
        (status = 404, description = "No such schedule", body = ErrorBody),
        (status = 413, description = "The request body is too large", body = ErrorBody),
        (status = 429, description = "The target queue is full", body = ErrorBody),
        (status = 503, description = "Recovering, draining or storage failing", body = ErrorBody),
    ),
    security(("bearer" = [])),
)]
pub(super) async fn trigger_schedule<B: Broker>(
    State(state): Shared<B>,
    name: IdPath,
    body: Bytes,
) -> Result<Response, ApiError> {
    let name = schedule_name(name)?;
    parse::<EmptyBody>(&body)?;
    call_schedule(&state, Op::TriggerSchedule { name }).await
}
