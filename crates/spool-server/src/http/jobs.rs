//! `/v1`: the job API of API.md (jobs, leases, queues), each endpoint one
//! [`Broker::call`]. This module only translates: JSON and paths in, typed
//! [`Op`]s to the broker, [`Outcome`]s and [`BrokerError`]s back out as
//! JSON with API.md's statuses. The job model's rules live in the broker.
//!
//! Decisions the contract leaves open:
//! - bodies are parsed strictly: an unknown field is a 400 naming it, so a
//!   typo (`delay` for `delay_ms`) is not silently ignored;
//! - a `payload` is stored as the JSON text sent, byte for byte
//!   ([`RawValue`]), so key order and number spelling survive;
//! - `DELETE /v1/jobs/{id}` answers 204 without a body;
//! - `If-Match` goes to the broker as the expected version where the
//!   operation takes one (update, delete, cancel); on the other job
//!   actions it is checked against a read just before (not atomically, as
//!   those ops have no expected version yet);
//! - `?wait_ms=N` (at most [`JOB_WAIT_MAX`]) on an enqueue or a job read
//!   waits in the broker, holding no thread, until the job is completed,
//!   cancelled or buried, or N ms passed, or the server shuts down; then
//!   it answers with the job as it is. An enqueue answers 201 (200 for a
//!   duplicate) when the job settled, else 202; a read answers 200 either
//!   way (the job's `state` says which). Past [`crate::limits::JOB_WAITS_MAX`] waits at
//!   once a read is refused with 503 `too_many_waits`; an enqueue, whose
//!   job exists by then, answers 202 with the job as enqueued.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::HttpBody as _;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put, MethodRouter};
use axum::Router;
use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::value::RawValue;
use spool_broker::{
    Backoff, Broker, BrokerError, JobChange, JobId, JobState, JobView, Lease, NewJob, Op, Outcome,
    QueueInfo, QueueName, QueuePolicy, RunAt,
};
use spool_proto::push_decimal;
use utoipa::ToSchema;

use super::encoding::{base64_decode, base64_encode, format_rfc3339, parse_rfc3339, write_rfc3339};
use super::{ApiError, ErrorBody, ErrorDetail, HttpState};
use crate::limits::{JOB_WAIT_MAX, RESERVE_WAIT_MAX, V1_BATCH_JOBS_MAX, V1_COMPLETE_BATCH_MAX};

/// Jobs a listing page holds when `limit` is not given.
const LIST_LIMIT_DEFAULT: u32 = 100;

pub(super) type Shared<B> = State<Arc<HttpState<B>>>;
pub(super) type IdPath = Result<Path<String>, PathRejection>;
pub(super) type QueryPairs = Result<Query<Vec<(String, String)>>, QueryRejection>;

/// The `/v1` routes (state still to be given).
pub(super) fn routes<B: Broker>() -> Router<Arc<HttpState<B>>> {
    route_table::<B>()
        .into_iter()
        .fold(Router::new(), |router, (path, methods)| {
            router.route(path, methods)
        })
}

/// Every `/v1` path with its handlers: one table, so the OpenAPI test can
/// ask the router about each path the router serves.
pub(super) fn route_table<B: Broker>() -> Vec<(&'static str, MethodRouter<Arc<HttpState<B>>>)> {
    vec![
        ("/v1/queues", get(list_queues::<B>)),
        ("/v1/queues/{queue}", get(get_queue::<B>)),
        (
            "/v1/queues/{queue}/jobs",
            post(enqueue::<B>).get(list_jobs::<B>).delete(purge::<B>),
        ),
        ("/v1/queues/{queue}/jobs/batch", post(enqueue_batch::<B>)),
        ("/v1/queues/{queue}/policy", put(set_policy::<B>)),
        ("/v1/queues/{queue}/pause", post(pause::<B>)),
        ("/v1/queues/{queue}/resume", post(resume::<B>)),
        ("/v1/reserve", post(reserve::<B>)),
        (
            "/v1/jobs/{id}",
            get(get_job::<B>)
                .patch(update_job::<B>)
                .delete(delete_job::<B>),
        ),
        ("/v1/jobs/{id}/cancel", post(cancel::<B>)),
        ("/v1/jobs/{id}/heartbeat", post(heartbeat::<B>)),
        ("/v1/jobs/complete", post(complete_batch::<B>)),
        ("/v1/jobs/{id}/complete", post(complete::<B>)),
        ("/v1/jobs/{id}/fail", post(fail::<B>)),
        ("/v1/jobs/{id}/release", post(release::<B>)),
        ("/v1/jobs/{id}/bury", post(bury::<B>)),
        ("/v1/jobs/{id}/kick", post(kick::<B>)),
    ]
    .into_iter()
    .chain(super::schedules::route_table::<B>())
    .chain(super::workflows::route_table::<B>())
    .collect()
}

// ---- errors ---------------------------------------------------------------

pub(super) fn invalid(field: impl Into<String>, message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "invalid", message).with_field(field)
}

/// API.md's status for each broker error; the code is the broker's own.
pub(super) fn broker_error(error: BrokerError) -> ApiError {
    let status = match &error {
        BrokerError::Invalid { .. } => StatusCode::BAD_REQUEST,
        BrokerError::NotFound => StatusCode::NOT_FOUND,
        BrokerError::Conflict(_) => StatusCode::CONFLICT,
        BrokerError::VersionMismatch { .. } => StatusCode::PRECONDITION_FAILED,
        BrokerError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        BrokerError::QueueFull { .. } => StatusCode::TOO_MANY_REQUESTS,
        BrokerError::Closed
        | BrokerError::Draining
        | BrokerError::TooManyWaits { .. }
        | BrokerError::Storage(_)
        | BrokerError::Internal(_) => StatusCode::SERVICE_UNAVAILABLE,
    };
    let api = ApiError::new(status, error.code(), error.to_string());
    match error {
        BrokerError::Invalid { field, .. } => api.with_field(field),
        _ => api,
    }
}

/// A broker that answered an op with another op's outcome: a bug, but
/// the client still gets JSON.
pub(super) fn unexpected() -> ApiError {
    broker_error(BrokerError::Internal(
        "the broker answered with the wrong kind of outcome".into(),
    ))
}

/// A JSON body that does not parse into the endpoint's shape: 400 naming
/// the field where serde stopped (`jobs[2].priority`), or the missing or
/// unknown one.
fn json_error(error: serde_path_to_error::Error<serde_json::Error>) -> ApiError {
    let path = error.path().to_string();
    let inner = error.into_inner();
    let message = inner.to_string();
    let named = ["missing field `", "unknown field `"]
        .iter()
        .find_map(|prefix| message.strip_prefix(prefix))
        .and_then(|rest| rest.split_once('`'))
        .map(|(name, _)| name);
    let field = match (path.as_str(), named) {
        (".", None) => None,
        (".", Some(name)) => Some(name.to_string()),
        (path, Some(name)) if !path.ends_with(name) => Some(format!("{path}.{name}")),
        (path, _) => Some(path.to_string()),
    };
    let api = ApiError::new(
        StatusCode::BAD_REQUEST,
        "invalid",
        format!("the body is not valid: {message}"),
    );
    match field {
        Some(field) => api.with_field(field),
        None => api,
    }
}

// ---- input ----------------------------------------------------------------

/// Parses a JSON body; an empty one, or `null`, counts as `{}` (for
/// actions whose fields are all optional: kick, cancel, pause, ...; the
/// OpenAPI document says such a body may be absent or null).
pub(super) fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let trimmed = body.trim_ascii();
    let body: &[u8] = if trimmed.is_empty() || trimmed == b"null" {
        b"{}"
    } else {
        body
    };
    // Most bodies are valid: parse them without tracking the path, which
    // costs on every field, and parse again with it only to name the field
    // of an error (parsing is deterministic: the same error comes back).
    let mut de = serde_json::Deserializer::from_slice(body);
    let value = match T::deserialize(&mut de) {
        Ok(value) => value,
        Err(_) => {
            let mut de = serde_json::Deserializer::from_slice(body);
            return Err(match serde_path_to_error::deserialize::<_, T>(&mut de) {
                Err(error) => json_error(error),
                // Only if parsing were not deterministic.
                Ok(_) => ApiError::new(StatusCode::BAD_REQUEST, "invalid", "the body is not valid"),
            });
        }
    };
    de.end().map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid",
            format!("the body is not valid: {e}"),
        )
    })?;
    Ok(value)
}

/// A field given as JSON `null` is still given: `payload: null` stores the
/// text `null` (plain `Option` would read it as absent).
pub(super) fn present_raw<'de, D: Deserializer<'de>>(
    de: D,
) -> Result<Option<Box<RawValue>>, D::Error> {
    Box::<RawValue>::deserialize(de).map(Some)
}

fn job_id(path: IdPath) -> Result<JobId, ApiError> {
    let Path(text) = path.map_err(|e| invalid("id", e.body_text()))?;
    text.parse().map_err(|_| {
        invalid(
            "id",
            format!("{text:?} is not a job id (a positive integer)"),
        )
    })
}

pub(super) fn queue_name(path: IdPath) -> Result<QueueName, ApiError> {
    let Path(text) = path.map_err(|e| invalid("queue", e.body_text()))?;
    QueueName::new(text.as_bytes()).map_err(|e| invalid("queue", format!("{text:?}: {e}")))
}

/// The query's parameters, each at most once and each one the endpoint
/// knows: a misspelt option is an error, not a silent default.
pub(super) fn query(
    pairs: QueryPairs,
    known: &[&str],
) -> Result<BTreeMap<String, String>, ApiError> {
    let Query(pairs) = pairs.map_err(|e| {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid", e.body_text()).with_field("query")
    })?;
    let mut params = BTreeMap::new();
    for (name, value) in pairs {
        if !known.contains(&name.as_str()) {
            return Err(invalid(
                name.as_str(),
                format!("unknown query parameter {name:?}"),
            ));
        }
        if params.contains_key(&name) {
            return Err(invalid(name.as_str(), "given more than once"));
        }
        params.insert(name, value);
    }
    Ok(params)
}

pub(super) fn number_param<T: std::str::FromStr>(
    params: &BTreeMap<String, String>,
    name: &str,
) -> Result<Option<T>, ApiError> {
    params
        .get(name)
        .map(|v| {
            v.parse()
                .map_err(|_| invalid(name, format!("{v:?} is not a valid number")))
        })
        .transpose()
}

/// `?wait_ms`, bounded by [`JOB_WAIT_MAX`].
fn wait_param(params: &BTreeMap<String, String>) -> Result<Option<u64>, ApiError> {
    let wait_ms = number_param::<u64>(params, "wait_ms")?;
    let max_ms = JOB_WAIT_MAX.as_millis() as u64;
    match wait_ms {
        Some(ms) if ms > max_ms => Err(invalid(
            "wait_ms",
            format!("at most {max_ms} ms: ask again for longer waits"),
        )),
        other => Ok(other),
    }
}

/// Whether a job wait ends at this state: final, or buried (dead until
/// someone kicks it).
fn settled(state: JobState) -> bool {
    state.is_final() || state == JobState::Buried
}

fn state_param(params: &BTreeMap<String, String>) -> Result<Option<JobState>, ApiError> {
    params
        .get("state")
        .map(|v| {
            JobState::parse(v).ok_or_else(|| {
                invalid(
                    "state",
                    format!("{v:?} is not a state: ready, reserved, delayed, buried, completed or cancelled"),
                )
            })
        })
        .transpose()
}

/// `If-Match: "<version>"` (quotes optional; `*` matches any version).
fn if_match(headers: &HeaderMap) -> Result<Option<u64>, ApiError> {
    let Some(value) = headers.get(header::IF_MATCH) else {
        return Ok(None);
    };
    let bad = || {
        invalid(
            "If-Match",
            "expected the job's version, as its ETag gives it",
        )
    };
    let text = value.to_str().map_err(|_| bad())?.trim();
    if text == "*" {
        return Ok(None);
    }
    let text = text
        .strip_prefix('"')
        .and_then(|t| t.strip_suffix('"'))
        .unwrap_or(text);
    text.parse().map(Some).map_err(|_| bad())
}

/// `If-Match` for an op without an expected version: checked against the
/// job as it is now, just before the op runs.
async fn check_if_match<B: Broker>(
    state: &HttpState<B>,
    id: JobId,
    headers: &HeaderMap,
) -> Result<(), ApiError> {
    let Some(expected) = if_match(headers)? else {
        return Ok(());
    };
    let current = broker(state)?.get(id).await.map_err(broker_error)?.version;
    if current != expected {
        return Err(broker_error(BrokerError::VersionMismatch { current }));
    }
    Ok(())
}

fn lease_for(text: &str, id: JobId) -> Result<Lease, ApiError> {
    let lease = Lease::decode(text)
        .ok_or_else(|| invalid("lease", "not a lease: give the one /v1/reserve handed out"))?;
    if lease.job != id {
        return Err(invalid(
            "lease",
            format!("this lease is for job {}, not job {id}", lease.job),
        ));
    }
    Ok(lease)
}

fn field_name(prefix: &str, name: &str) -> String {
    format!("{prefix}{name}")
}

/// Bytes from `<name>` (JSON, stored as its text) or `<name>_base64`.
fn bytes_of(
    json: Option<Box<RawValue>>,
    base64: Option<String>,
    prefix: &str,
    name: &str,
) -> Result<Option<Bytes>, ApiError> {
    match (json, base64) {
        (Some(_), Some(_)) => Err(invalid(
            field_name(prefix, &format!("{name}_base64")),
            format!("give {name} or {name}_base64, not both"),
        )),
        (Some(raw), None) => Ok(Some(Bytes::from(String::from(Box::<str>::from(raw))))),
        (None, Some(text)) => base64_decode(&text)
            .map(|b| Some(Bytes::from(b)))
            .ok_or_else(|| {
                invalid(
                    field_name(prefix, &format!("{name}_base64")),
                    "not standard base64 (RFC 4648, + and /)",
                )
            }),
        (None, None) => Ok(None),
    }
}

/// `delay_ms` or `run_at` (RFC 3339; an instant in the past means now).
fn run_at_of(
    delay_ms: Option<u64>,
    run_at: Option<String>,
    prefix: &str,
) -> Result<Option<RunAt>, ApiError> {
    match (delay_ms, run_at) {
        (Some(_), Some(_)) => Err(invalid(
            field_name(prefix, "run_at"),
            "give delay_ms or run_at, not both",
        )),
        (Some(ms), None) => Ok(Some(RunAt::DelayMs(ms))),
        (None, Some(text)) => {
            let ms = parse_rfc3339(&text).ok_or_else(|| {
                invalid(
                    field_name(prefix, "run_at"),
                    format!("{text:?} is not an RFC 3339 instant, e.g. 2026-12-04T10:00:00Z"),
                )
            })?;
            Ok(Some(RunAt::AtMs(u64::try_from(ms).unwrap_or(0))))
        }
        (None, None) => Ok(None),
    }
}

/// A backoff; the fields not given take API.md's defaults.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct BackoffBody {
    initial_ms: Option<u64>,
    max_ms: Option<u64>,
    multiplier: Option<f64>,
    jitter: Option<f64>,
}

impl BackoffBody {
    fn into_backoff(self) -> Backoff {
        let default = Backoff::default();
        Backoff {
            initial_ms: self.initial_ms.unwrap_or(default.initial_ms),
            max_ms: self.max_ms.unwrap_or(default.max_ms),
            multiplier: self.multiplier.unwrap_or(default.multiplier),
            jitter: self.jitter.unwrap_or(default.jitter),
        }
    }
}

/// An enqueue body (also each job of a batch).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"payload": {"order": 42}, "priority": 10, "max_attempts": 5, "headers": {"trace": "abc"}, "idempotency_key": "order-42"}))]
pub(super) struct EnqueueBody {
    /// Any JSON value, stored as its text (or give `payload_base64`).
    #[serde(default, deserialize_with = "present_raw")]
    #[schema(value_type = Option<serde_json::Value>)]
    pub(super) payload: Option<Box<RawValue>>,
    pub(super) payload_base64: Option<String>,
    pub(super) priority: Option<u32>,
    pub(super) delay_ms: Option<u64>,
    /// An RFC 3339 instant (or give `delay_ms`).
    #[schema(format = DateTime)]
    pub(super) run_at: Option<String>,
    pub(super) ttr_ms: Option<u64>,
    pub(super) max_attempts: Option<u32>,
    pub(super) backoff: Option<BackoffBody>,
    pub(super) headers: Option<BTreeMap<String, String>>,
    pub(super) idempotency_key: Option<String>,
    pub(super) idempotency_ttl_ms: Option<u64>,
}

impl EnqueueBody {
    /// `prefix` names the job in a batch (`jobs[3].`) in errors.
    pub(super) fn into_new_job(self, prefix: &str) -> Result<NewJob, ApiError> {
        let payload =
            bytes_of(self.payload, self.payload_base64, prefix, "payload")?.ok_or_else(|| {
                invalid(
                    field_name(prefix, "payload"),
                    "give payload (any JSON) or payload_base64 (bytes)",
                )
            })?;
        Ok(NewJob {
            payload,
            priority: self.priority,
            run_at: run_at_of(self.delay_ms, self.run_at, prefix)?.unwrap_or_default(),
            ttr_ms: self.ttr_ms,
            max_attempts: self.max_attempts,
            backoff: self.backoff.map(BackoffBody::into_backoff),
            headers: self.headers.unwrap_or_default(),
            idempotency_key: self.idempotency_key,
            idempotency_ttl_ms: self.idempotency_ttl_ms,
            parents: BTreeMap::new(),
        })
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"jobs": [{"payload": {"order": 42}}, {"payload_base64": "aGVsbG8=", "delay_ms": 1000}]}))]
pub(super) struct BatchBody {
    jobs: Vec<EnqueueBody>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"priority": 5, "delay_ms": 0}))]
pub(super) struct PatchBody {
    priority: Option<u32>,
    delay_ms: Option<u64>,
    /// An RFC 3339 instant (or give `delay_ms`).
    #[schema(format = DateTime)]
    run_at: Option<String>,
    /// Any JSON value, stored as its text (or give `payload_base64`).
    #[serde(default, deserialize_with = "present_raw")]
    #[schema(value_type = Option<serde_json::Value>)]
    payload: Option<Box<RawValue>>,
    payload_base64: Option<String>,
    headers: Option<BTreeMap<String, String>>,
    max_attempts: Option<u32>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"queues": ["orders"], "timeout_ms": 100, "batch": 10}))]
pub(super) struct ReserveBody {
    queues: Vec<String>,
    #[serde(default)]
    timeout_ms: u64,
    /// Jobs to lease at most (default 1; at most
    /// `spool_engine::limits::RESERVE_BATCH_MAX`).
    #[schema(minimum = 1, maximum = 1000)]
    batch: Option<u32>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct LeaseBody {
    #[schema(pattern = r"^[0-9]+-[0-9]+$")]
    lease: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct CompleteBody {
    /// The lease the reserve handed out.
    #[schema(pattern = r"^[0-9]+-[0-9]+$")]
    lease: String,
    /// Any JSON value, stored as its text (or give `result_base64`).
    #[serde(default, deserialize_with = "present_raw")]
    #[schema(value_type = Option<serde_json::Value>)]
    result: Option<Box<RawValue>>,
    result_base64: Option<String>,
}

/// Completions of several leased jobs: each lease names its job.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"jobs": [{"lease": "7-31"}, {"lease": "8-32", "result": {"rows": 3}}]}))]
pub(super) struct CompleteBatchBody {
    jobs: Vec<CompleteBody>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct FailBody {
    /// The lease the reserve handed out.
    #[schema(pattern = r"^[0-9]+-[0-9]+$")]
    lease: String,
    error: String,
    retry_in_ms: Option<u64>,
    #[serde(default)]
    permanent: bool,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct ReleaseBody {
    /// The lease the reserve handed out.
    #[schema(pattern = r"^[0-9]+-[0-9]+$")]
    lease: String,
    #[serde(default)]
    delay_ms: u64,
    priority: Option<u32>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct BuryBody {
    /// The lease, when the job is reserved.
    #[schema(pattern = r"^[0-9]+-[0-9]+$")]
    lease: Option<String>,
    reason: Option<String>,
}

/// For actions that take no fields: `{}` or nothing.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct EmptyBody {}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"duration_ms": 1000}))]
pub(super) struct PauseBody {
    duration_ms: Option<u64>,
}

/// A queue's policy as `PUT` replaces it: fields left out go back to the
/// defaults.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"max_jobs": 10000, "concurrency": 4, "rate_per_s": 50.0, "max_attempts": 3, "ttr_ms": 30000}))]
pub(super) struct PolicyBody {
    max_jobs: Option<u64>,
    max_attempts: Option<u32>,
    backoff: Option<BackoffBody>,
    ttr_ms: Option<u64>,
    retention_ms: Option<u64>,
    retention_max_jobs: Option<u64>,
    concurrency: Option<u32>,
    rate_per_s: Option<f64>,
}

// ---- output ---------------------------------------------------------------

/// The stored bytes as JSON, when they are a JSON text.
pub(super) fn as_json(bytes: &[u8]) -> Option<&RawValue> {
    let text = std::str::from_utf8(bytes).ok()?;
    serde_json::from_str::<&RawValue>(text).ok()
}

/// A backoff as responses show it (every field filled in).
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = BackoffOut)]
pub(super) struct BackoffOut {
    initial_ms: u64,
    max_ms: u64,
    multiplier: f64,
    jitter: f64,
}

impl From<&Backoff> for BackoffOut {
    fn from(b: &Backoff) -> BackoffOut {
        BackoffOut {
            initial_ms: b.initial_ms,
            max_ms: b.max_ms,
            multiplier: b.multiplier,
            jitter: b.jitter,
        }
    }
}

/// A job's state as the API names it.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub(super) enum StateOut {
    Ready,
    Reserved,
    Delayed,
    Buried,
    Completed,
    Cancelled,
}

impl From<JobState> for StateOut {
    fn from(state: JobState) -> StateOut {
        match state {
            JobState::Ready => StateOut::Ready,
            JobState::Reserved => StateOut::Reserved,
            JobState::Delayed => StateOut::Delayed,
            JobState::Buried => StateOut::Buried,
            JobState::Completed => StateOut::Completed,
            JobState::Cancelled => StateOut::Cancelled,
        }
    }
}

/// A job as API.md shows it, plus its lease when handed out by a reserve
/// and `duplicate` when answering an enqueue. Borrowed from the
/// [`JobView`], so answering copies no payload. The same type writes the
/// JSON and the OpenAPI schema, so the two cannot drift.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Job)]
pub(super) struct JobOut<'a> {
    #[schema(value_type = u64, minimum = 1)]
    id: JobId,
    #[schema(value_type = String)]
    queue: &'a str,
    state: StateOut,
    priority: u32,
    /// The stored bytes when they are a JSON text (else `payload_base64`).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<serde_json::Value>)]
    payload: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload_base64: Option<String>,
    #[schema(value_type = BTreeMap<String, String>)]
    headers: &'a BTreeMap<String, String>,
    attempts: u32,
    /// 0: no limit.
    max_attempts: u32,
    backoff: BackoffOut,
    ttr_ms: u64,
    #[schema(value_type = Option<String>, format = DateTime)]
    run_at: Option<Rfc3339>,
    #[schema(value_type = Option<String>, format = DateTime)]
    deadline_at: Option<Rfc3339>,
    #[schema(value_type = String, format = DateTime)]
    created_at: Rfc3339,
    #[schema(value_type = String, format = DateTime)]
    updated_at: Rfc3339,
    #[schema(value_type = Option<String>, format = DateTime)]
    finished_at: Option<Rfc3339>,
    #[schema(value_type = Option<String>)]
    last_error: Option<&'a str>,
    /// Absent when the result is not JSON text (then `result_base64`);
    /// null before there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<serde_json::Value>)]
    result: Option<Option<&'a RawValue>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    result_base64: Option<String>,
    #[schema(value_type = Option<String>)]
    idempotency_key: Option<&'a str>,
    cancel_requested: bool,
    version: u64,
    /// The lease a reserve handed out, to name in heartbeat, complete,
    /// fail, release and bury.
    #[serde(skip_serializing_if = "Option::is_none")]
    lease: Option<String>,
    /// On an enqueue: whether the idempotency key named an existing job.
    #[serde(skip_serializing_if = "Option::is_none")]
    duplicate: Option<bool>,
    /// A workflow step's (or compensation's) inputs: step → its result,
    /// as JSON when the result is JSON text (null when there was none).
    /// Absent on other jobs.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    #[schema(value_type = BTreeMap<String, serde_json::Value>)]
    parents: BTreeMap<&'a str, Option<&'a RawValue>>,
    /// Parents' results that are not JSON text, as base64.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    #[schema(value_type = BTreeMap<String, String>)]
    parents_base64: BTreeMap<&'a str, String>,
}

impl<'a> JobOut<'a> {
    fn new(j: &'a JobView) -> JobOut<'a> {
        let at = |ms: Option<u64>| ms.map(Rfc3339);
        let (payload, payload_base64) = match as_json(&j.payload) {
            Some(json) => (Some(json), None),
            None => (None, Some(base64_encode(&j.payload))),
        };
        let (parents, parents_base64) = super::workflows::parents_out(&j.parents);
        let (result, result_base64) = match j.result.as_deref() {
            None => (Some(None), None),
            Some(bytes) => match as_json(bytes) {
                Some(json) => (Some(Some(json)), None),
                None => (None, Some(base64_encode(bytes))),
            },
        };
        JobOut {
            id: j.id,
            queue: &j.queue,
            state: j.state.into(),
            priority: j.priority,
            payload,
            payload_base64,
            headers: &j.headers,
            attempts: j.attempts,
            max_attempts: j.max_attempts,
            backoff: (&j.backoff).into(),
            ttr_ms: j.ttr_ms,
            run_at: at(j.run_at_ms),
            deadline_at: at(j.deadline_at_ms),
            created_at: Rfc3339(j.created_at_ms),
            updated_at: Rfc3339(j.updated_at_ms),
            finished_at: at(j.finished_at_ms),
            last_error: j.last_error.as_deref(),
            result,
            result_base64,
            idempotency_key: j.idempotency_key.as_deref(),
            cancel_requested: j.cancel_requested,
            version: j.version,
            lease: None,
            duplicate: None,
            parents,
            parents_base64,
        }
    }
}

/// An instant (milliseconds since the Unix epoch) as RFC 3339 text,
/// written straight into the answer by [`JobOut::write_json`].
#[derive(Debug, Clone, Copy)]
pub(super) struct Rfc3339(u64);

impl Serialize for Rfc3339 {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&format_rfc3339(self.0))
    }
}

impl BackoffOut {
    fn is_default(&self) -> bool {
        let default = Backoff::default();
        // Bit patterns, not float equality: the same bits write the same
        // text.
        self.initial_ms == default.initial_ms
            && self.max_ms == default.max_ms
            && self.multiplier.to_bits() == default.multiplier.to_bits()
            && self.jitter.to_bits() == default.jitter.to_bits()
    }
}

/// The default backoff as serde_json writes it, written once.
fn default_backoff_json() -> Option<&'static [u8]> {
    static JSON: std::sync::OnceLock<Option<Vec<u8>>> = std::sync::OnceLock::new();
    JSON.get_or_init(|| serde_json::to_vec(&BackoffOut::from(&Backoff::default())).ok())
        .as_deref()
}

/// Appends one value as serde_json writes it.
fn write_value(out: &mut Vec<u8>, value: &impl Serialize) -> Result<(), serde_json::Error> {
    serde_json::to_writer(&mut *out, value)
}

/// Appends `"name":` (names here are plain ASCII: nothing to escape).
fn write_name(out: &mut Vec<u8>, first: bool, name: &str) {
    if !first {
        out.push(b',');
    }
    out.push(b'"');
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\":");
}

fn write_instant(out: &mut Vec<u8>, at: Option<Rfc3339>) {
    match at {
        Some(Rfc3339(ms)) => {
            out.push(b'"');
            write_rfc3339(out, ms);
            out.push(b'"');
        }
        None => out.extend_from_slice(b"null"),
    }
}

/// Bytes a job's JSON takes besides its payload and result, about: the
/// first guess of an answer's size, so the buffer rarely grows.
const JOB_JSON_OVERHEAD_BYTES: usize = 512;

impl JobOut<'_> {
    /// Roughly how many bytes [`JobOut::write_json`] writes.
    fn json_size_hint(&self) -> usize {
        let raw = |value: Option<&RawValue>| value.map_or(0, |v| v.get().len());
        JOB_JSON_OVERHEAD_BYTES
            + raw(self.payload)
            + self.payload_base64.as_ref().map_or(0, String::len)
            + raw(self.result.flatten())
            + self.result_base64.as_ref().map_or(0, String::len)
    }

    /// Writes exactly what `serde_json::to_writer` writes for this job
    /// (a test holds the two equal), without serde's per-field work:
    /// field names as literal bytes, instants formatted in place. A job is
    /// most of every hot answer (enqueue, reserve, complete), and serde
    /// took about a sixth of the server's instructions per enqueue
    /// (callgrind).
    fn write_json(&self, out: &mut Vec<u8>) -> Result<(), serde_json::Error> {
        out.push(b'{');
        write_name(out, true, "id");
        write_value(out, &self.id)?;
        write_name(out, false, "queue");
        write_value(out, &self.queue)?;
        write_name(out, false, "state");
        write_value(out, &self.state)?;
        write_name(out, false, "priority");
        write_value(out, &self.priority)?;
        if let Some(payload) = self.payload {
            write_name(out, false, "payload");
            out.extend_from_slice(payload.get().as_bytes());
        }
        if let Some(payload_base64) = &self.payload_base64 {
            write_name(out, false, "payload_base64");
            write_value(out, payload_base64)?;
        }
        write_name(out, false, "headers");
        if self.headers.is_empty() {
            out.extend_from_slice(b"{}");
        } else {
            write_value(out, self.headers)?;
        }
        write_name(out, false, "attempts");
        write_value(out, &self.attempts)?;
        write_name(out, false, "max_attempts");
        write_value(out, &self.max_attempts)?;
        write_name(out, false, "backoff");
        match default_backoff_json() {
            // Most jobs have it, and formatting its two floats cost about
            // a quarter of writing a job (callgrind).
            Some(json) if self.backoff.is_default() => out.extend_from_slice(json),
            _ => write_value(out, &self.backoff)?,
        }
        write_name(out, false, "ttr_ms");
        write_value(out, &self.ttr_ms)?;
        write_name(out, false, "run_at");
        write_instant(out, self.run_at);
        write_name(out, false, "deadline_at");
        write_instant(out, self.deadline_at);
        write_name(out, false, "created_at");
        write_instant(out, Some(self.created_at));
        write_name(out, false, "updated_at");
        write_instant(out, Some(self.updated_at));
        write_name(out, false, "finished_at");
        write_instant(out, self.finished_at);
        write_name(out, false, "last_error");
        write_value(out, &self.last_error)?;
        if let Some(result) = self.result {
            write_name(out, false, "result");
            match result {
                Some(json) => out.extend_from_slice(json.get().as_bytes()),
                None => out.extend_from_slice(b"null"),
            }
        }
        if let Some(result_base64) = &self.result_base64 {
            write_name(out, false, "result_base64");
            write_value(out, result_base64)?;
        }
        write_name(out, false, "idempotency_key");
        write_value(out, &self.idempotency_key)?;
        write_name(out, false, "cancel_requested");
        out.extend_from_slice(if self.cancel_requested {
            b"true"
        } else {
            b"false"
        });
        write_name(out, false, "version");
        write_value(out, &self.version)?;
        if let Some(lease) = &self.lease {
            write_name(out, false, "lease");
            write_value(out, lease)?;
        }
        if let Some(duplicate) = self.duplicate {
            write_name(out, false, "duplicate");
            write_value(out, &duplicate)?;
        }
        if !self.parents.is_empty() {
            write_name(out, false, "parents");
            write_value(out, &self.parents)?;
        }
        if !self.parents_base64.is_empty() {
            write_name(out, false, "parents_base64");
            write_value(out, &self.parents_base64)?;
        }
        out.push(b'}');
        Ok(())
    }
}

/// `{"jobs": [...]}` as `serde_json` writes a [`JobsOut`], by
/// [`JobOut::write_json`].
fn write_jobs_json(jobs: &[JobOut<'_>]) -> Result<Vec<u8>, serde_json::Error> {
    let size: usize = jobs.iter().map(JobOut::json_size_hint).sum();
    let mut out = Vec::with_capacity(size + 16);
    out.extend_from_slice(b"{\"jobs\":[");
    for (i, job) in jobs.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        job.write_json(&mut out)?;
    }
    out.extend_from_slice(b"]}");
    Ok(out)
}

/// `{"jobs": [...]}`: a batch enqueue's jobs, or a reserve's (each with
/// its lease; none when the wait ended empty).
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = JobList)]
pub(super) struct JobsOut<'a> {
    jobs: Vec<JobOut<'a>>,
}

/// A page of a queue's jobs; `next` is the `after` of the next page.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = JobPage)]
pub(super) struct PageOut<'a> {
    jobs: Vec<JobOut<'a>>,
    #[schema(value_type = Option<u64>)]
    next: Option<JobId>,
}

/// A heartbeat's answer: the lease's new deadline.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct DeadlineOut {
    #[schema(format = DateTime)]
    deadline_at: String,
}

/// One completion's answer in `POST /v1/jobs/complete`, in the request's
/// order: `status` 200 with the job's new `version`, or the status and
/// `error` a single complete would have answered. Not the whole job: a
/// worker needs only the outcome, and echoing every payload would cost
/// the node and the worker much of what the batch saves.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct CompletedOut {
    /// The job the lease names (absent when the lease does not parse).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<u64>)]
    id: Option<JobId>,
    /// The HTTP status `POST /v1/jobs/{id}/complete` would have answered.
    status: u16,
    /// The completed job's version (with status 200).
    #[serde(skip_serializing_if = "Option::is_none")]
    version: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<ErrorDetail>,
}

impl CompletedOut {
    fn completed(job: &JobView) -> CompletedOut {
        CompletedOut {
            id: Some(job.id),
            status: StatusCode::OK.as_u16(),
            version: Some(job.version),
            error: None,
        }
    }

    fn refused(id: Option<JobId>, error: ApiError) -> CompletedOut {
        CompletedOut {
            id,
            status: error.status.as_u16(),
            version: None,
            error: Some(error.detail()),
        }
    }
}

/// `{"jobs": [...]}`: a batch completion's answers.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = CompletedList)]
pub(super) struct CompletedListOut {
    jobs: Vec<CompletedOut>,
}

/// A purge's answer.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct PurgedOut {
    deleted: u64,
}

/// A queue's jobs by state (final ones: those still retained).
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct CountsOut {
    buried: u64,
    cancelled: u64,
    completed: u64,
    delayed: u64,
    ready: u64,
    reserved: u64,
}

/// A queue's policy as set; null fields take the defaults.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct PolicyOut {
    backoff: Option<BackoffOut>,
    concurrency: Option<u32>,
    max_attempts: Option<u32>,
    max_jobs: Option<u64>,
    rate_per_s: Option<f64>,
    retention_max_jobs: Option<u64>,
    retention_ms: Option<u64>,
    ttr_ms: Option<u64>,
}

impl PolicyOut {
    pub(super) fn new(p: &QueuePolicy) -> PolicyOut {
        PolicyOut {
            backoff: p.backoff.as_ref().map(BackoffOut::from),
            concurrency: p.concurrency,
            max_attempts: p.max_attempts,
            max_jobs: p.max_jobs,
            rate_per_s: p.rate_per_s,
            retention_max_jobs: p.retention_max_jobs,
            retention_ms: p.retention_ms,
            ttr_ms: p.ttr_ms,
        }
    }
}

/// A queue: its jobs by state, its pause and its policy.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Queue)]
pub(super) struct QueueOut<'a> {
    #[schema(value_type = String)]
    name: &'a str,
    counts: CountsOut,
    paused: bool,
    /// Null while paused with no end, or not paused.
    #[schema(format = DateTime)]
    paused_until: Option<String>,
    policy: PolicyOut,
}

impl<'a> QueueOut<'a> {
    fn new(q: &'a QueueInfo) -> QueueOut<'a> {
        let p = &q.policy;
        QueueOut {
            name: &q.name,
            counts: CountsOut {
                buried: q.buried,
                cancelled: q.cancelled,
                completed: q.completed,
                delayed: q.delayed,
                ready: q.ready,
                reserved: q.reserved,
            },
            paused: q.paused_until_ms.is_some(),
            // Paused with no end: `paused` true, `paused_until` null.
            paused_until: q
                .paused_until_ms
                .filter(|&ms| ms != u64::MAX)
                .map(format_rfc3339),
            policy: PolicyOut::new(p),
        }
    }
}

/// `{"queues": [...]}`.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = QueueList)]
pub(super) struct QueuesOut<'a> {
    queues: Vec<QueueOut<'a>>,
}

pub(super) fn json_response(status: StatusCode, body: &impl Serialize) -> Response {
    encoded_response(status, serde_json::to_vec(body))
}

/// A JSON answer of bytes already written, or a 500 if writing failed.
fn encoded_response(status: StatusCode, encoded: Result<Vec<u8>, serde_json::Error>) -> Response {
    match encoded {
        Ok(bytes) => (
            status,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            bytes,
        )
            .into_response(),
        Err(e) => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("the answer could not be encoded: {e}"),
        )
        .into_response(),
    }
}

/// A job answer with its version as `ETag`.
fn job_response(status: StatusCode, out: JobOut<'_>) -> Response {
    let version = out.version;
    let mut body = Vec::with_capacity(out.json_size_hint());
    let encoded = out.write_json(&mut body).map(|()| body);
    let mut response = encoded_response(status, encoded);
    if let Ok(etag) = HeaderValue::from_str(&format!("\"{version}\"")) {
        response.headers_mut().insert(header::ETAG, etag);
    }
    response
}

/// `{"jobs": [...]}` answers (a reserve's, a batch enqueue's).
fn jobs_response(status: StatusCode, jobs: &[JobOut<'_>]) -> Response {
    encoded_response(status, write_jobs_json(jobs))
}

// ---- calling the broker -------------------------------------------------------

pub(super) fn broker<B: Broker>(state: &HttpState<B>) -> Result<&B, ApiError> {
    state.broker().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "recovering",
            "the write-ahead log is being recovered; try again shortly",
        )
    })
}

pub(super) async fn call<B: Broker>(state: &HttpState<B>, op: Op) -> Result<Outcome, ApiError> {
    broker(state)?.call(op).await.map_err(broker_error)
}

async fn call_job<B: Broker>(state: &HttpState<B>, op: Op) -> Result<Response, ApiError> {
    match call(state, op).await? {
        Outcome::Job(job) => Ok(job_response(StatusCode::OK, JobOut::new(&job))),
        _ => Err(unexpected()),
    }
}

async fn call_queue<B: Broker>(state: &HttpState<B>, op: Op) -> Result<Response, ApiError> {
    match call(state, op).await? {
        Outcome::Queue(info) => Ok(json_response(StatusCode::OK, &QueueOut::new(&info))),
        _ => Err(unexpected()),
    }
}

// ---- handlers: jobs -------------------------------------------------------------

#[utoipa::path(
    post,
    path = "/v1/queues/{queue}/jobs",
    tag = "jobs",
    summary = "Enqueue a job",
    params(
        ("queue" = String, Path, description = "The queue (a beanstalkd tube name: 1 to 200 bytes of A-Za-z0-9-+/;.$_(), not starting with -)", min_length = 1, max_length = 200, pattern = r"^[A-Za-z0-9+/;.$_()][A-Za-z0-9+/;.$_()-]*$"),
        ("wait_ms" = Option<u64>, Query, description = "Wait this long (at most 30,000 ms) for the job to be completed, cancelled or buried"),
    ),
    request_body = EnqueueBody,
    responses(
        (
            status = 201,
            description = "Enqueued (with `?wait_ms`: and settled within the wait)",
            body = JobOut,
            headers(
                ("ETag" = String, description = "The job's version"),
                ("Location" = String, description = "The job's URL"),
            ),
            links(
            ("get" = (operation_id = "get_job", parameters(("id" = "$response.body#/id")))),
            ("update" = (operation_id = "update_job", parameters(("id" = "$response.body#/id")))),
            ("delete" = (operation_id = "delete_job", parameters(("id" = "$response.body#/id")))),
            ("cancel" = (operation_id = "cancel", parameters(("id" = "$response.body#/id")))),
            ("kick" = (operation_id = "kick", parameters(("id" = "$response.body#/id")))),
            ("bury" = (operation_id = "bury", parameters(("id" = "$response.body#/id")))),
            ),
        ),
        (status = 200, description = "The idempotency key names an existing job: that job, `duplicate` true", body = JobOut),
        (status = 202, description = "With `?wait_ms`: enqueued, not settled within the wait", body = JobOut),
        (status = 400, description = "Invalid input; `field` names it", body = ErrorBody),
        (status = 401, description = "Missing or wrong bearer token (with SPOOL_AUTH_TOKEN set)", body = ErrorBody),
        (status = 413, description = "The request body is too large", body = ErrorBody),
        (status = 429, description = "The queue holds `max_jobs` already", body = ErrorBody),
        (status = 503, description = "Recovering, draining, storage failing, or too many waits", body = ErrorBody),
    ),
    security(("bearer" = [])),
)]
async fn enqueue<B: Broker>(
    State(state): Shared<B>,
    queue: IdPath,
    params: QueryPairs,
    body: Bytes,
) -> Result<Response, ApiError> {
    let queue = queue_name(queue)?;
    let wait_ms = wait_param(&query(params, &["wait_ms"])?)?;
    let job = parse::<EnqueueBody>(&body)?.into_new_job("")?;
    match call(&state, Op::Enqueue { queue, job }).await? {
        Outcome::Enqueued { mut job, duplicate } => {
            if let Some(wait_ms) = wait_ms.filter(|_| !settled(job.state)) {
                // The job exists now whatever the wait gives: a refused
                // or broken wait answers with the job as enqueued (202).
                let id = job.id;
                if let Ok(Outcome::Job(now)) = broker(&state)?.call(Op::Wait { id, wait_ms }).await
                {
                    job = now;
                }
            }
            // A duplicate made nothing: 200 with the job the key names.
            let status = match (wait_ms.is_some() && !settled(job.state), duplicate) {
                (true, _) => StatusCode::ACCEPTED,
                (false, true) => StatusCode::OK,
                (false, false) => StatusCode::CREATED,
            };
            let mut response = job_response(
                status,
                JobOut {
                    duplicate: Some(duplicate),
                    ..JobOut::new(&job)
                },
            );
            if let Ok(location) = job_location(job.id) {
                response.headers_mut().insert(header::LOCATION, location);
            }
            Ok(response)
        }
        _ => Err(unexpected()),
    }
}

/// `/v1/jobs/{id}`, written digit by digit: `format!` took about 700
/// instructions of every enqueue (callgrind).
fn job_location(id: JobId) -> Result<HeaderValue, header::InvalidHeaderValue> {
    const PREFIX: &[u8] = b"/v1/jobs/";
    let mut path = Vec::with_capacity(PREFIX.len() + 20);
    path.extend_from_slice(PREFIX);
    push_decimal(&mut path, id);
    HeaderValue::from_maybe_shared(Bytes::from(path))
}

#[utoipa::path(
    post,
    path = "/v1/queues/{queue}/jobs/batch",
    tag = "jobs",
    summary = "Enqueue jobs, all or none",
    params(
        ("queue" = String, Path, description = "The queue (a beanstalkd tube name: 1 to 200 bytes of A-Za-z0-9-+/;.$_(), not starting with -)", min_length = 1, max_length = 200, pattern = r"^[A-Za-z0-9+/;.$_()][A-Za-z0-9+/;.$_()-]*$"),
    ),
    request_body = BatchBody,
    responses(
        (status = 201, description = "Enqueued, in order", body = JobsOut),
        (status = 400, description = "Invalid input; `field` names it", body = ErrorBody),
        (status = 401, description = "Missing or wrong bearer token (with SPOOL_AUTH_TOKEN set)", body = ErrorBody),
        (status = 413, description = "The request body is too large", body = ErrorBody),
        (status = 429, description = "The queue holds `max_jobs` already", body = ErrorBody),
        (status = 503, description = "Recovering, draining, storage failing, or too many waits", body = ErrorBody),
    ),
    security(("bearer" = [])),
)]
async fn enqueue_batch<B: Broker>(
    State(state): Shared<B>,
    queue: IdPath,
    params: QueryPairs,
    body: Bytes,
) -> Result<Response, ApiError> {
    let queue = queue_name(queue)?;
    query(params, &[])?;
    let batch = parse::<BatchBody>(&body)?;
    if batch.jobs.len() > V1_BATCH_JOBS_MAX {
        return Err(invalid(
            "jobs",
            format!("at most {V1_BATCH_JOBS_MAX} jobs a batch"),
        ));
    }
    let jobs = batch
        .jobs
        .into_iter()
        .enumerate()
        .map(|(i, job)| Ok((queue.clone(), job.into_new_job(&format!("jobs[{i}]."))?)))
        .collect::<Result<Vec<_>, ApiError>>()?;
    match call(&state, Op::EnqueueBatch { jobs }).await? {
        Outcome::Batch(jobs) => {
            let jobs: Vec<JobOut<'_>> = jobs.iter().map(JobOut::new).collect();
            Ok(jobs_response(StatusCode::CREATED, &jobs))
        }
        _ => Err(unexpected()),
    }
}

#[utoipa::path(
    get,
    path = "/v1/jobs/{id}",
    tag = "jobs",
    summary = "A job",
    params(
        ("id" = u64, Path, description = "The job id", minimum = 1),
        ("wait_ms" = Option<u64>, Query, description = "Wait this long (at most 30,000 ms) for the job to be completed, cancelled or buried"),
    ),
    responses(
        (status = 200, description = "The job (after `?wait_ms`: as it is when it settled or the wait ended)", body = JobOut, headers(("ETag" = String, description = "The job's version"))),
        (status = 400, description = "Invalid input; `field` names it", body = ErrorBody),
        (status = 401, description = "Missing or wrong bearer token (with SPOOL_AUTH_TOKEN set)", body = ErrorBody),
        (status = 404, description = "No such job", body = ErrorBody),
        (status = 413, description = "The request body is too large", body = ErrorBody),
        (status = 503, description = "Recovering, draining, storage failing, or too many waits", body = ErrorBody),
    ),
    security(("bearer" = [])),
)]
async fn get_job<B: Broker>(
    State(state): Shared<B>,
    id: IdPath,
    params: QueryPairs,
) -> Result<Response, ApiError> {
    let id = job_id(id)?;
    match wait_param(&query(params, &["wait_ms"])?)? {
        Some(wait_ms) => call_job(&state, Op::Wait { id, wait_ms }).await,
        None => call_job(&state, Op::Get { id }).await,
    }
}

#[utoipa::path(
    patch,
    path = "/v1/jobs/{id}",
    tag = "jobs",
    summary = "Change a job that is not reserved or final",
    params(
        ("id" = u64, Path, description = "The job id", minimum = 1),
        ("If-Match" = Option<String>, Header, description = "The job's version as its ETag gives it (quotes optional, `*` for any)"),
    ),
    request_body = PatchBody,
    responses(
        (status = 200, description = "The job as changed", body = JobOut),
        (status = 400, description = "Invalid input; `field` names it", body = ErrorBody),
        (status = 401, description = "Missing or wrong bearer token (with SPOOL_AUTH_TOKEN set)", body = ErrorBody),
        (status = 404, description = "No such job", body = ErrorBody),
        (status = 409, description = "Wrong state, lease not held or job cancelled: `code` is `wrong_state`, `lease_expired` or `cancelled`", body = ErrorBody),
        (status = 412, description = "`If-Match` names another version", body = ErrorBody),
        (status = 413, description = "The request body is too large", body = ErrorBody),
        (status = 503, description = "Recovering, draining, storage failing, or too many waits", body = ErrorBody),
    ),
    security(("bearer" = [])),
)]
async fn update_job<B: Broker>(
    State(state): Shared<B>,
    id: IdPath,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let id = job_id(id)?;
    let expected_version = if_match(&headers)?;
    let patch = parse::<PatchBody>(&body)?;
    let change = JobChange {
        priority: patch.priority,
        run_at: run_at_of(patch.delay_ms, patch.run_at, "")?,
        payload: bytes_of(patch.payload, patch.payload_base64, "", "payload")?,
        headers: patch.headers,
        max_attempts: patch.max_attempts,
    };
    call_job(
        &state,
        Op::Update {
            id,
            expected_version,
            change,
        },
    )
    .await
}

/// 204 without a body: the job is gone, there is nothing to show.
#[utoipa::path(
    delete,
    path = "/v1/jobs/{id}",
    tag = "jobs",
    summary = "Remove a job that is not reserved",
    params(
        ("id" = u64, Path, description = "The job id", minimum = 1),
        ("If-Match" = Option<String>, Header, description = "The job's version as its ETag gives it (quotes optional, `*` for any)"),
    ),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, description = "Invalid input; `field` names it", body = ErrorBody),
        (status = 401, description = "Missing or wrong bearer token (with SPOOL_AUTH_TOKEN set)", body = ErrorBody),
        (status = 404, description = "No such job", body = ErrorBody),
        (status = 409, description = "Wrong state, lease not held or job cancelled: `code` is `wrong_state`, `lease_expired` or `cancelled`", body = ErrorBody),
        (status = 412, description = "`If-Match` names another version", body = ErrorBody),
        (status = 413, description = "The request body is too large", body = ErrorBody),
        (status = 503, description = "Recovering, draining, storage failing, or too many waits", body = ErrorBody),
    ),
    security(("bearer" = [])),
)]
async fn delete_job<B: Broker>(
    State(state): Shared<B>,
    id: IdPath,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = job_id(id)?;
    let expected_version = if_match(&headers)?;
    match call(
        &state,
        Op::Delete {
            id,
            expected_version,
        },
    )
    .await?
    {
        Outcome::Done => Ok(StatusCode::NO_CONTENT.into_response()),
        _ => Err(unexpected()),
    }
}

#[utoipa::path(
    post,
    path = "/v1/jobs/{id}/cancel",
    tag = "jobs",
    summary = "Cancel a job: final at once, a lease on it revoked",
    params(
        ("id" = u64, Path, description = "The job id", minimum = 1),
        ("If-Match" = Option<String>, Header, description = "The job's version as its ETag gives it (quotes optional, `*` for any)"),
    ),
    request_body = Option<EmptyBody>,
    responses(
        (status = 200, description = "The job, cancelled", body = JobOut),
        (status = 400, description = "Invalid input; `field` names it", body = ErrorBody),
        (status = 401, description = "Missing or wrong bearer token (with SPOOL_AUTH_TOKEN set)", body = ErrorBody),
        (status = 404, description = "No such job", body = ErrorBody),
        (status = 409, description = "Wrong state, lease not held or job cancelled: `code` is `wrong_state`, `lease_expired` or `cancelled`", body = ErrorBody),
        (status = 412, description = "`If-Match` names another version", body = ErrorBody),
        (status = 413, description = "The request body is too large", body = ErrorBody),
        (status = 503, description = "Recovering, draining, storage failing, or too many waits", body = ErrorBody),
    ),
    security(("bearer" = [])),
)]
async fn cancel<B: Broker>(
    State(state): Shared<B>,
    id: IdPath,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let id = job_id(id)?;
    let expected_version = if_match(&headers)?;
    parse::<EmptyBody>(&body)?;
    call_job(
        &state,
        Op::Cancel {
            id,
            expected_version,
        },
    )
    .await
}

#[utoipa::path(
    post,
    path = "/v1/reserve",
    tag = "workers",
    summary = "Lease jobs from queues, waiting up to `timeout_ms`",
    request_body = ReserveBody,
    responses(
        (
            status = 200,
            description = "The jobs leased, each with its `lease`; none when the wait ended empty",
            body = JobsOut,
            links(
            ("heartbeat" = (
                operation_id = "heartbeat",
                parameters(("id" = "$response.body#/jobs/0/id")),
                request_body = json!({"lease": "$response.body#/jobs/0/lease"}),
            )),
            ("complete" = (
                operation_id = "complete",
                parameters(("id" = "$response.body#/jobs/0/id")),
                request_body = json!({"lease": "$response.body#/jobs/0/lease", "result": {"ok": true}}),
            )),
            ("fail" = (
                operation_id = "fail",
                parameters(("id" = "$response.body#/jobs/0/id")),
                request_body = json!({"lease": "$response.body#/jobs/0/lease", "error": "failed"}),
            )),
            ("release" = (
                operation_id = "release",
                parameters(("id" = "$response.body#/jobs/0/id")),
                request_body = json!({"lease": "$response.body#/jobs/0/lease"}),
            )),
            ("bury" = (
                operation_id = "bury",
                parameters(("id" = "$response.body#/jobs/0/id")),
                request_body = json!({"lease": "$response.body#/jobs/0/lease"}),
            )),
            ),
        ),
        (status = 400, description = "Invalid input; `field` names it", body = ErrorBody),
        (status = 401, description = "Missing or wrong bearer token (with SPOOL_AUTH_TOKEN set)", body = ErrorBody),
        (status = 413, description = "The request body is too large", body = ErrorBody),
        (status = 503, description = "Recovering, draining, storage failing, or too many waits", body = ErrorBody),
    ),
    security(("bearer" = [])),
)]
async fn reserve<B: Broker>(State(state): Shared<B>, body: Bytes) -> Result<Response, ApiError> {
    let body = parse::<ReserveBody>(&body)?;
    let queues = body
        .queues
        .iter()
        .enumerate()
        .map(|(i, name)| {
            QueueName::new(name.as_bytes())
                .map_err(|e| invalid(format!("queues[{i}]"), e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let wait_max_ms = RESERVE_WAIT_MAX.as_millis() as u64;
    if body.timeout_ms > wait_max_ms {
        return Err(invalid(
            "timeout_ms",
            format!("at most {wait_max_ms} ms: poll again for longer waits"),
        ));
    }
    let op = Op::Reserve {
        queues,
        batch: body.batch.unwrap_or(1),
        timeout_ms: body.timeout_ms,
    };
    let outcome = match broker(&state)?.call(op).await {
        // The broker stopped while the reserve waited (the process is
        // exiting): the long poll ends with nothing, as at a drain.
        Err(BrokerError::Closed) => Outcome::Leased(Vec::new()),
        other => other.map_err(broker_error)?,
    };
    match outcome {
        Outcome::Leased(leased) => {
            let jobs: Vec<JobOut<'_>> = leased
                .iter()
                .map(|l| JobOut {
                    lease: Some(l.lease.encode()),
                    ..JobOut::new(&l.job)
                })
                .collect();
            Ok(jobs_response(StatusCode::OK, &jobs))
        }
        _ => Err(unexpected()),
    }
}

#[utoipa::path(
    post,
    path = "/v1/jobs/{id}/heartbeat",
    tag = "workers",
    summary = "Extend a lease by the job's TTR",
    params(
        ("id" = u64, Path, description = "The job id", minimum = 1),
        ("If-Match" = Option<String>, Header, description = "The job's version as its ETag gives it (quotes optional, `*` for any)"),
    ),
    request_body = LeaseBody,
    responses(
        (status = 200, description = "The lease's new deadline", body = DeadlineOut),
        (status = 400, description = "Invalid input; `field` names it", body = ErrorBody),
        (status = 401, description = "Missing or wrong bearer token (with SPOOL_AUTH_TOKEN set)", body = ErrorBody),
        (status = 404, description = "No such job", body = ErrorBody),
        (status = 409, description = "Wrong state, lease not held or job cancelled: `code` is `wrong_state`, `lease_expired` or `cancelled`", body = ErrorBody),
        (status = 412, description = "`If-Match` names another version", body = ErrorBody),
        (status = 413, description = "The request body is too large", body = ErrorBody),
        (status = 503, description = "Recovering, draining, storage failing, or too many waits", body = ErrorBody),
    ),
    security(("bearer" = [])),
)]
async fn heartbeat<B: Broker>(
    State(state): Shared<B>,
    id: IdPath,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let id = job_id(id)?;
    let lease = lease_for(&parse::<LeaseBody>(&body)?.lease, id)?;
    check_if_match(&state, id, &headers).await?;
    match call(&state, Op::Heartbeat { lease }).await? {
        Outcome::Deadline(ms) => Ok(json_response(
            StatusCode::OK,
            &DeadlineOut {
                deadline_at: format_rfc3339(ms),
            },
        )),
        _ => Err(unexpected()),
    }
}

#[utoipa::path(
    post,
    path = "/v1/jobs/{id}/complete",
    tag = "workers",
    summary = "Complete a leased job with its result",
    params(
        ("id" = u64, Path, description = "The job id", minimum = 1),
        ("If-Match" = Option<String>, Header, description = "The job's version as its ETag gives it (quotes optional, `*` for any)"),
    ),
    request_body = CompleteBody,
    responses(
        (status = 200, description = "The job, completed", body = JobOut),
        (status = 400, description = "Invalid input; `field` names it", body = ErrorBody),
        (status = 401, description = "Missing or wrong bearer token (with SPOOL_AUTH_TOKEN set)", body = ErrorBody),
        (status = 404, description = "No such job", body = ErrorBody),
        (status = 409, description = "Wrong state, lease not held or job cancelled: `code` is `wrong_state`, `lease_expired` or `cancelled`", body = ErrorBody),
        (status = 412, description = "`If-Match` names another version", body = ErrorBody),
        (status = 413, description = "The request body is too large", body = ErrorBody),
        (status = 503, description = "Recovering, draining, storage failing, or too many waits", body = ErrorBody),
    ),
    security(("bearer" = [])),
)]
async fn complete<B: Broker>(
    State(state): Shared<B>,
    id: IdPath,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let id = job_id(id)?;
    let body = parse::<CompleteBody>(&body)?;
    let lease = lease_for(&body.lease, id)?;
    let result = bytes_of(body.result, body.result_base64, "", "result")?;
    check_if_match(&state, id, &headers).await?;
    call_job(&state, Op::Complete { lease, result }).await
}

#[utoipa::path(
    post,
    path = "/v1/jobs/complete",
    tag = "workers",
    summary = "Complete several leased jobs, each with its result, answered per job",
    description = "Each lease names its job. The completions are independent: each is \
                   answered in the request's order with the status and error \
                   `POST /v1/jobs/{id}/complete` would have answered, and one refused \
                   (a lease expired, a job cancelled) does not hold back the others. \
                   No `If-Match`: give one job a request for that.",
    request_body = CompleteBatchBody,
    responses(
        (status = 200, description = "Each completion's outcome, in order", body = CompletedListOut),
        (status = 400, description = "The body is not valid, or holds more completions than one reserve hands out; `field` names it", body = ErrorBody),
        (status = 401, description = "Missing or wrong bearer token (with SPOOL_AUTH_TOKEN set)", body = ErrorBody),
        (status = 413, description = "The request body is too large", body = ErrorBody),
        (status = 503, description = "Recovering", body = ErrorBody),
    ),
    security(("bearer" = [])),
)]
async fn complete_batch<B: Broker>(
    State(state): Shared<B>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let batch = parse::<CompleteBatchBody>(&body)?;
    if batch.jobs.len() > V1_COMPLETE_BATCH_MAX {
        return Err(invalid(
            "jobs",
            format!("at most {V1_COMPLETE_BATCH_MAX} completions a request"),
        ));
    }
    let broker = broker(&state)?;
    // Each its own call, all at once: a broker that groups completions
    // (PostgreSQL's) settles them together, and each keeps its own answer.
    let calls = batch
        .jobs
        .into_iter()
        .enumerate()
        .map(|(i, job)| async move {
            let Some(lease) = Lease::decode(&job.lease) else {
                let error = invalid(
                    format!("jobs[{i}].lease"),
                    "not a lease: give the one /v1/reserve handed out",
                );
                return CompletedOut::refused(None, error);
            };
            let result = match bytes_of(
                job.result,
                job.result_base64,
                &format!("jobs[{i}]."),
                "result",
            ) {
                Ok(result) => result,
                Err(error) => return CompletedOut::refused(Some(lease.job), error),
            };
            match broker.call(Op::Complete { lease, result }).await {
                Ok(Outcome::Job(job)) => CompletedOut::completed(&job),
                Ok(_) => CompletedOut::refused(Some(lease.job), unexpected()),
                Err(error) => CompletedOut::refused(Some(lease.job), broker_error(error)),
            }
        });
    let jobs = futures_util::future::join_all(calls).await;
    Ok(json_response(StatusCode::OK, &CompletedListOut { jobs }))
}

#[utoipa::path(
    post,
    path = "/v1/jobs/{id}/fail",
    tag = "workers",
    summary = "Fail an attempt: retried after the backoff while attempts remain, else buried",
    params(
        ("id" = u64, Path, description = "The job id", minimum = 1),
        ("If-Match" = Option<String>, Header, description = "The job's version as its ETag gives it (quotes optional, `*` for any)"),
    ),
    request_body = FailBody,
    responses(
        (status = 200, description = "The job, delayed or buried", body = JobOut),
        (status = 400, description = "Invalid input; `field` names it", body = ErrorBody),
        (status = 401, description = "Missing or wrong bearer token (with SPOOL_AUTH_TOKEN set)", body = ErrorBody),
        (status = 404, description = "No such job", body = ErrorBody),
        (status = 409, description = "Wrong state, lease not held or job cancelled: `code` is `wrong_state`, `lease_expired` or `cancelled`", body = ErrorBody),
        (status = 412, description = "`If-Match` names another version", body = ErrorBody),
        (status = 413, description = "The request body is too large", body = ErrorBody),
        (status = 503, description = "Recovering, draining, storage failing, or too many waits", body = ErrorBody),
    ),
    security(("bearer" = [])),
)]
async fn fail<B: Broker>(
    State(state): Shared<B>,
    id: IdPath,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let id = job_id(id)?;
    let body = parse::<FailBody>(&body)?;
    let lease = lease_for(&body.lease, id)?;
    check_if_match(&state, id, &headers).await?;
    call_job(
        &state,
        Op::Fail {
            lease,
            error: body.error,
            retry_in_ms: body.retry_in_ms,
            permanent: body.permanent,
        },
    )
    .await
}

#[utoipa::path(
    post,
    path = "/v1/jobs/{id}/release",
    tag = "workers",
    summary = "Hand a leased job back, not counted as an attempt",
    params(
        ("id" = u64, Path, description = "The job id", minimum = 1),
        ("If-Match" = Option<String>, Header, description = "The job's version as its ETag gives it (quotes optional, `*` for any)"),
    ),
    request_body = ReleaseBody,
    responses(
        (status = 200, description = "The job, ready or delayed", body = JobOut),
        (status = 400, description = "Invalid input; `field` names it", body = ErrorBody),
        (status = 401, description = "Missing or wrong bearer token (with SPOOL_AUTH_TOKEN set)", body = ErrorBody),
        (status = 404, description = "No such job", body = ErrorBody),
        (status = 409, description = "Wrong state, lease not held or job cancelled: `code` is `wrong_state`, `lease_expired` or `cancelled`", body = ErrorBody),
        (status = 412, description = "`If-Match` names another version", body = ErrorBody),
        (status = 413, description = "The request body is too large", body = ErrorBody),
        (status = 503, description = "Recovering, draining, storage failing, or too many waits", body = ErrorBody),
    ),
    security(("bearer" = [])),
)]
async fn release<B: Broker>(
    State(state): Shared<B>,
    id: IdPath,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let id = job_id(id)?;
    let body = parse::<ReleaseBody>(&body)?;
    let lease = lease_for(&body.lease, id)?;
    check_if_match(&state, id, &headers).await?;
    call_job(
        &state,
        Op::Release {
            lease,
            delay_ms: body.delay_ms,
            priority: body.priority,
        },
    )
    .await
}

#[utoipa::path(
    post,
    path = "/v1/jobs/{id}/bury",
    tag = "jobs",
    summary = "Bury a job (leased: name the lease)",
    params(
        ("id" = u64, Path, description = "The job id", minimum = 1),
        ("If-Match" = Option<String>, Header, description = "The job's version as its ETag gives it (quotes optional, `*` for any)"),
    ),
    request_body = Option<BuryBody>,
    responses(
        (status = 200, description = "The job, buried", body = JobOut),
        (status = 400, description = "Invalid input; `field` names it", body = ErrorBody),
        (status = 401, description = "Missing or wrong bearer token (with SPOOL_AUTH_TOKEN set)", body = ErrorBody),
        (status = 404, description = "No such job", body = ErrorBody),
        (status = 409, description = "Wrong state, lease not held or job cancelled: `code` is `wrong_state`, `lease_expired` or `cancelled`", body = ErrorBody),
        (status = 412, description = "`If-Match` names another version", body = ErrorBody),
        (status = 413, description = "The request body is too large", body = ErrorBody),
        (status = 503, description = "Recovering, draining, storage failing, or too many waits", body = ErrorBody),
    ),
    security(("bearer" = [])),
)]
async fn bury<B: Broker>(
    State(state): Shared<B>,
    id: IdPath,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let id = job_id(id)?;
    let body = parse::<BuryBody>(&body)?;
    let lease = body.lease.map(|l| lease_for(&l, id)).transpose()?;
    check_if_match(&state, id, &headers).await?;
    call_job(
        &state,
        Op::Bury {
            id,
            lease,
            reason: body.reason,
        },
    )
    .await
}

#[utoipa::path(
    post,
    path = "/v1/jobs/{id}/kick",
    tag = "jobs",
    summary = "Make a buried or delayed job ready",
    params(
        ("id" = u64, Path, description = "The job id", minimum = 1),
        ("If-Match" = Option<String>, Header, description = "The job's version as its ETag gives it (quotes optional, `*` for any)"),
    ),
    request_body = Option<EmptyBody>,
    responses(
        (status = 200, description = "The job, ready", body = JobOut),
        (status = 400, description = "Invalid input; `field` names it", body = ErrorBody),
        (status = 401, description = "Missing or wrong bearer token (with SPOOL_AUTH_TOKEN set)", body = ErrorBody),
        (status = 404, description = "No such job", body = ErrorBody),
        (status = 409, description = "Wrong state, lease not held or job cancelled: `code` is `wrong_state`, `lease_expired` or `cancelled`", body = ErrorBody),
        (status = 412, description = "`If-Match` names another version", body = ErrorBody),
        (status = 413, description = "The request body is too large", body = ErrorBody),
        (status = 503, description = "Recovering, draining, storage failing, or too many waits", body = ErrorBody),
    ),
    security(("bearer" = [])),
)]
async fn kick<B: Broker>(
    State(state): Shared<B>,
    id: IdPath,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let id = job_id(id)?;
    parse::<EmptyBody>(&body)?;
    check_if_match(&state, id, &headers).await?;
    call_job(&state, Op::Kick { id }).await
}

// ---- handlers: queues -----------------------------------------------------------

#[utoipa::path(
    get,
    path = "/v1/queues",
    tag = "queues",
    summary = "Every queue with its counts",
    responses(
        (status = 200, description = "The queues", body = QueuesOut),
        (status = 400, description = "Invalid input; `field` names it", body = ErrorBody),
        (status = 401, description = "Missing or wrong bearer token (with SPOOL_AUTH_TOKEN set)", body = ErrorBody),
        (status = 413, description = "The request body is too large", body = ErrorBody),
        (status = 503, description = "Recovering, draining, storage failing, or too many waits", body = ErrorBody),
    ),
    security(("bearer" = [])),
)]
async fn list_queues<B: Broker>(
    State(state): Shared<B>,
    params: QueryPairs,
) -> Result<Response, ApiError> {
    query(params, &[])?;
    match call(&state, Op::ListQueues).await? {
        Outcome::Queues(queues) => {
            let queues = queues.iter().map(QueueOut::new).collect();
            Ok(json_response(StatusCode::OK, &QueuesOut { queues }))
        }
        _ => Err(unexpected()),
    }
}

#[utoipa::path(
    get,
    path = "/v1/queues/{queue}",
    tag = "queues",
    summary = "A queue: counts, pause, policy",
    params(
        ("queue" = String, Path, description = "The queue (a beanstalkd tube name: 1 to 200 bytes of A-Za-z0-9-+/;.$_(), not starting with -)", min_length = 1, max_length = 200, pattern = r"^[A-Za-z0-9+/;.$_()][A-Za-z0-9+/;.$_()-]*$"),
    ),
    responses(
        (status = 200, description = "The queue", body = QueueOut),
        (status = 400, description = "Invalid input; `field` names it", body = ErrorBody),
        (status = 401, description = "Missing or wrong bearer token (with SPOOL_AUTH_TOKEN set)", body = ErrorBody),
        (status = 413, description = "The request body is too large", body = ErrorBody),
        (status = 503, description = "Recovering, draining, storage failing, or too many waits", body = ErrorBody),
    ),
    security(("bearer" = [])),
)]
async fn get_queue<B: Broker>(
    State(state): Shared<B>,
    queue: IdPath,
    params: QueryPairs,
) -> Result<Response, ApiError> {
    let queue = queue_name(queue)?;
    query(params, &[])?;
    call_queue(&state, Op::GetQueue { queue }).await
}

#[utoipa::path(
    get,
    path = "/v1/queues/{queue}/jobs",
    tag = "queues",
    summary = "A page of a queue's jobs in one state",
    params(
        ("queue" = String, Path, description = "The queue (a beanstalkd tube name: 1 to 200 bytes of A-Za-z0-9-+/;.$_(), not starting with -)", min_length = 1, max_length = 200, pattern = r"^[A-Za-z0-9+/;.$_()][A-Za-z0-9+/;.$_()-]*$"),
        ("state" = Option<StateOut>, Query, description = "The state listed (default ready)"),
        ("limit" = Option<u32>, Query, description = "Jobs per page (default 100)"),
        ("after" = Option<u64>, Query, description = "List jobs after this id (the previous page's `next`)"),
    ),
    responses(
        (status = 200, description = "The page", body = PageOut),
        (status = 400, description = "Invalid input; `field` names it", body = ErrorBody),
        (status = 401, description = "Missing or wrong bearer token (with SPOOL_AUTH_TOKEN set)", body = ErrorBody),
        (status = 413, description = "The request body is too large", body = ErrorBody),
        (status = 503, description = "Recovering, draining, storage failing, or too many waits", body = ErrorBody),
    ),
    security(("bearer" = [])),
)]
async fn list_jobs<B: Broker>(
    State(state): Shared<B>,
    queue: IdPath,
    params: QueryPairs,
) -> Result<Response, ApiError> {
    let queue = queue_name(queue)?;
    let params = query(params, &["state", "limit", "after"])?;
    let op = Op::List {
        queue,
        state: state_param(&params)?.unwrap_or(JobState::Ready),
        after: number_param(&params, "after")?,
        limit: number_param(&params, "limit")?.unwrap_or(LIST_LIMIT_DEFAULT),
    };
    match call(&state, op).await? {
        Outcome::Page(page) => {
            let jobs = page.jobs.iter().map(JobOut::new).collect();
            let next = page.next;
            Ok(json_response(StatusCode::OK, &PageOut { jobs, next }))
        }
        _ => Err(unexpected()),
    }
}

/// `state` is required: a purge of "whatever the default is" is too easy
/// to send by mistake.
#[utoipa::path(
    delete,
    path = "/v1/queues/{queue}/jobs",
    tag = "queues",
    summary = "Delete every job of a queue in one state",
    params(
        ("queue" = String, Path, description = "The queue (a beanstalkd tube name: 1 to 200 bytes of A-Za-z0-9-+/;.$_(), not starting with -)", min_length = 1, max_length = 200, pattern = r"^[A-Za-z0-9+/;.$_()][A-Za-z0-9+/;.$_()-]*$"),
        ("state" = StateOut, Query, description = "The state purged: buried, ready or delayed"),
    ),
    responses(
        (status = 200, description = "How many were deleted", body = PurgedOut),
        (status = 400, description = "Invalid input; `field` names it", body = ErrorBody),
        (status = 401, description = "Missing or wrong bearer token (with SPOOL_AUTH_TOKEN set)", body = ErrorBody),
        (status = 413, description = "The request body is too large", body = ErrorBody),
        (status = 503, description = "Recovering, draining, storage failing, or too many waits", body = ErrorBody),
    ),
    security(("bearer" = [])),
)]
async fn purge<B: Broker>(
    State(state): Shared<B>,
    queue: IdPath,
    params: QueryPairs,
) -> Result<Response, ApiError> {
    let queue = queue_name(queue)?;
    let params = query(params, &["state"])?;
    let job_state = state_param(&params)?.ok_or_else(|| {
        invalid(
            "state",
            "say which jobs to purge: ?state=buried, ready, delayed",
        )
    })?;
    match call(
        &state,
        Op::Purge {
            queue,
            state: job_state,
        },
    )
    .await?
    {
        Outcome::Purged(deleted) => Ok(json_response(StatusCode::OK, &PurgedOut { deleted })),
        _ => Err(unexpected()),
    }
}

#[utoipa::path(
    put,
    path = "/v1/queues/{queue}/policy",
    tag = "queues",
    summary = "Replace a queue's policy (fields left out: the defaults)",
    params(
        ("queue" = String, Path, description = "The queue (a beanstalkd tube name: 1 to 200 bytes of A-Za-z0-9-+/;.$_(), not starting with -)", min_length = 1, max_length = 200, pattern = r"^[A-Za-z0-9+/;.$_()][A-Za-z0-9+/;.$_()-]*$"),
    ),
    request_body = PolicyBody,
    responses(
        (status = 200, description = "The queue with its new policy", body = QueueOut),
        (status = 400, description = "Invalid input; `field` names it", body = ErrorBody),
        (status = 401, description = "Missing or wrong bearer token (with SPOOL_AUTH_TOKEN set)", body = ErrorBody),
        (status = 413, description = "The request body is too large", body = ErrorBody),
        (status = 503, description = "Recovering, draining, storage failing, or too many waits", body = ErrorBody),
    ),
    security(("bearer" = [])),
)]
async fn set_policy<B: Broker>(
    State(state): Shared<B>,
    queue: IdPath,
    body: Bytes,
) -> Result<Response, ApiError> {
    let queue = queue_name(queue)?;
    let body = parse::<PolicyBody>(&body)?;
    let policy = QueuePolicy {
        max_jobs: body.max_jobs,
        max_attempts: body.max_attempts,
        backoff: body.backoff.map(BackoffBody::into_backoff),
        ttr_ms: body.ttr_ms,
        retention_ms: body.retention_ms,
        retention_max_jobs: body.retention_max_jobs,
        concurrency: body.concurrency,
        rate_per_s: body.rate_per_s,
    };
    call_queue(&state, Op::SetPolicy { queue, policy }).await
}

#[utoipa::path(
    post,
    path = "/v1/queues/{queue}/pause",
    tag = "queues",
    summary = "Stop handing out the queue's jobs, for a while or until resumed",
    params(
        ("queue" = String, Path, description = "The queue (a beanstalkd tube name: 1 to 200 bytes of A-Za-z0-9-+/;.$_(), not starting with -)", min_length = 1, max_length = 200, pattern = r"^[A-Za-z0-9+/;.$_()][A-Za-z0-9+/;.$_()-]*$"),
    ),
    request_body = Option<PauseBody>,
    responses(
        (status = 200, description = "The queue, paused", body = QueueOut),
        (status = 400, description = "Invalid input; `field` names it", body = ErrorBody),
        (status = 401, description = "Missing or wrong bearer token (with SPOOL_AUTH_TOKEN set)", body = ErrorBody),
        (status = 413, description = "The request body is too large", body = ErrorBody),
        (status = 503, description = "Recovering, draining, storage failing, or too many waits", body = ErrorBody),
    ),
    security(("bearer" = [])),
)]
async fn pause<B: Broker>(
    State(state): Shared<B>,
    queue: IdPath,
    body: Bytes,
) -> Result<Response, ApiError> {
    let queue = queue_name(queue)?;
    let body = parse::<PauseBody>(&body)?;
    call_queue(
        &state,
        Op::Pause {
            queue,
            duration_ms: body.duration_ms,
        },
    )
    .await
}

#[utoipa::path(
    post,
    path = "/v1/queues/{queue}/resume",
    tag = "queues",
    summary = "Resume a paused queue",
    params(
        ("queue" = String, Path, description = "The queue (a beanstalkd tube name: 1 to 200 bytes of A-Za-z0-9-+/;.$_(), not starting with -)", min_length = 1, max_length = 200, pattern = r"^[A-Za-z0-9+/;.$_()][A-Za-z0-9+/;.$_()-]*$"),
    ),
    request_body = Option<EmptyBody>,
    responses(
        (status = 200, description = "The queue", body = QueueOut),
        (status = 400, description = "Invalid input; `field` names it", body = ErrorBody),
        (status = 401, description = "Missing or wrong bearer token (with SPOOL_AUTH_TOKEN set)", body = ErrorBody),
        (status = 413, description = "The request body is too large", body = ErrorBody),
        (status = 503, description = "Recovering, draining, storage failing, or too many waits", body = ErrorBody),
    ),
    security(("bearer" = [])),
)]
async fn resume<B: Broker>(
    State(state): Shared<B>,
    queue: IdPath,
    body: Bytes,
) -> Result<Response, ApiError> {
    let queue = queue_name(queue)?;
    parse::<EmptyBody>(&body)?;
    call_queue(&state, Op::Resume { queue }).await
}

/// A fixed name for a `/v1` request, for `/admin/connections` (the
/// registry keeps `&'static str`s): the route, with its parameters as
/// placeholders.
pub(super) fn command_name(method: &str, segments: &[&str]) -> Option<&'static str> {
    Some(match (method, segments) {
        ("POST", ["reserve"]) => "POST /v1/reserve",
        ("GET", ["queues"]) => "GET /v1/queues",
        ("GET", ["queues", _]) => "GET /v1/queues/{queue}",
        ("POST", ["queues", _, "jobs"]) => "POST /v1/queues/{queue}/jobs",
        ("GET", ["queues", _, "jobs"]) => "GET /v1/queues/{queue}/jobs",
        ("DELETE", ["queues", _, "jobs"]) => "DELETE /v1/queues/{queue}/jobs",
        ("POST", ["queues", _, "jobs", "batch"]) => "POST /v1/queues/{queue}/jobs/batch",
        ("PUT", ["queues", _, "policy"]) => "PUT /v1/queues/{queue}/policy",
        ("POST", ["queues", _, "pause"]) => "POST /v1/queues/{queue}/pause",
        ("POST", ["queues", _, "resume"]) => "POST /v1/queues/{queue}/resume",
        ("GET", ["jobs", _]) => "GET /v1/jobs/{id}",
        ("PATCH", ["jobs", _]) => "PATCH /v1/jobs/{id}",
        ("DELETE", ["jobs", _]) => "DELETE /v1/jobs/{id}",
        ("POST", ["jobs", _, "cancel"]) => "POST /v1/jobs/{id}/cancel",
        ("POST", ["jobs", _, "heartbeat"]) => "POST /v1/jobs/{id}/heartbeat",
        ("POST", ["jobs", "complete"]) => "POST /v1/jobs/complete",
        ("POST", ["jobs", _, "complete"]) => "POST /v1/jobs/{id}/complete",
        ("POST", ["jobs", _, "fail"]) => "POST /v1/jobs/{id}/fail",
        ("POST", ["jobs", _, "release"]) => "POST /v1/jobs/{id}/release",
        ("POST", ["jobs", _, "bury"]) => "POST /v1/jobs/{id}/bury",
        ("POST", ["jobs", _, "kick"]) => "POST /v1/jobs/{id}/kick",
        (method, segments) => return super::workflows::command_name(method, segments),
    })
}

/// The most segments a `/v1` route has after `/v1/`.
const V1_ROUTE_SEGMENTS_MAX: usize = 4;

/// The segments of a `/v1` path after `/v1/`, on the stack (this runs for
/// every request); `None` when it is not under `/v1/` or has more segments
/// than any route.
pub(super) fn v1_segments(path: &str) -> Option<([&str; V1_ROUTE_SEGMENTS_MAX], usize)> {
    let mut segments = [""; V1_ROUTE_SEGMENTS_MAX];
    let mut count = 0;
    for segment in path.strip_prefix("/v1/")?.split('/') {
        *segments.get_mut(count)? = segment;
        count += 1;
    }
    Some((segments, count))
}

/// The routes that carry the job API's load: enqueue, reserve and
/// complete. They are answered by calling their handler directly, not
/// through the router and its layers, which cost about as much as the
/// handler itself per request (callgrind). Everything else the router did
/// for them is done here: the same handlers, the bearer check (in
/// `answer`), path parameters and query as axum's extractors take them,
/// `Content-Length` as axum sets it. A path the router would treat
/// differently (a percent-encoded or empty parameter) is not hot: the
/// router answers it.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum HotRoute {
    /// `POST /v1/queues/{queue}/jobs`
    Enqueue { queue: String },
    /// `POST /v1/reserve`
    Reserve,
    /// `POST /v1/jobs/{id}/complete`
    Complete { id: String },
    /// `POST /v1/jobs/complete`
    CompleteBatch,
}

impl HotRoute {
    /// The route's name for `/admin/connections`, as [`command_name`]
    /// gives it.
    pub(super) fn command_name(&self) -> &'static str {
        match self {
            HotRoute::Enqueue { .. } => "POST /v1/queues/{queue}/jobs",
            HotRoute::Reserve => "POST /v1/reserve",
            HotRoute::Complete { .. } => "POST /v1/jobs/{id}/complete",
            HotRoute::CompleteBatch => "POST /v1/jobs/complete",
        }
    }

    pub(super) fn of(method: &Method, path: &str) -> Option<HotRoute> {
        if *method != Method::POST {
            return None;
        }
        match path {
            "/v1/reserve" => return Some(HotRoute::Reserve),
            "/v1/jobs/complete" => return Some(HotRoute::CompleteBatch),
            _ => {}
        }
        // As axum's `Path` gives it: a non-empty segment, which needs no
        // percent-decoding.
        let parameter = |rest: Option<&str>| {
            rest.filter(|p| !p.is_empty() && !p.contains(['/', '%']))
                .map(str::to_owned)
        };
        if let Some(queue) = parameter(
            path.strip_prefix("/v1/queues/")
                .and_then(|rest| rest.strip_suffix("/jobs")),
        ) {
            return Some(HotRoute::Enqueue { queue });
        }
        parameter(
            path.strip_prefix("/v1/jobs/")
                .and_then(|rest| rest.strip_suffix("/complete")),
        )
        .map(|id| HotRoute::Complete { id })
    }
}

/// Answers a hot route (see [`HotRoute`]) with its handler.
pub(super) async fn answer_hot<B: Broker>(
    state: Arc<HttpState<B>>,
    route: HotRoute,
    parts: Parts,
    body: Bytes,
) -> Response {
    let mut response = match route {
        HotRoute::Enqueue { queue } => {
            let params = Query::try_from_uri(&parts.uri);
            enqueue(State(state), Ok(Path(queue)), params, body)
                .await
                .into_response()
        }
        HotRoute::Reserve => reserve(State(state), body).await.into_response(),
        HotRoute::Complete { id } => complete(State(state), Ok(Path(id)), parts.headers, body)
            .await
            .into_response(),
        HotRoute::CompleteBatch => complete_batch(State(state), body).await.into_response(),
    };
    // What axum's router adds to every answer with a body of known size.
    if !response.headers().contains_key(header::CONTENT_LENGTH) {
        if let Some(length) = response.body().size_hint().exact() {
            response
                .headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from(length));
        }
    }
    response
}

/// Whether a request is a batch enqueue or completion (its body has its
/// own bound).
pub(super) fn is_batch(method: &str, path: &str) -> bool {
    (method == "POST" && path.starts_with("/v1/queues/") && path.ends_with("/jobs/batch"))
        || (method == "POST" && path == "/v1/jobs/complete")
        || super::workflows::is_start(method, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A job with every optional part filled in, in odd ways.
    fn full_view() -> JobView {
        JobView {
            id: u64::MAX,
            queue: "q.a+b$()_;/".to_string(),
            state: JobState::Completed,
            priority: u32::MAX,
            payload: Bytes::from_static(b"{ \"spaced\" : [1, 2.50, \"\\u00e9\"] }"),
            headers: [
                ("trace".to_string(), "a\"b\\c\n\u{1}é😀".to_string()),
                ("".to_string(), "".to_string()),
            ]
            .into_iter()
            .collect(),
            attempts: 3,
            max_attempts: 0,
            backoff: Backoff {
                initial_ms: 1,
                max_ms: u64::MAX,
                multiplier: 1.000_000_1,
                jitter: 1e-7,
            },
            ttr_ms: 0,
            run_at_ms: Some(0),
            deadline_at_ms: Some(253_402_300_800_000),
            created_at_ms: 951_782_400_123,
            updated_at_ms: 1_796_378_400_000,
            finished_at_ms: Some(1_796_378_400_001),
            last_error: Some("boom: \"quoted\"\t\u{7f}".to_string()),
            result: Some(Bytes::from_static(b"\xff\x00not json")),
            idempotency_key: Some("key \u{2028}".to_string()),
            cancel_requested: true,
            version: 42,
            parents: [
                ("a".to_string(), Some(Bytes::from_static(b"{\"x\":1}"))),
                ("b\"".to_string(), Some(Bytes::from_static(b"\x80"))),
                ("c".to_string(), None),
            ]
            .into_iter()
            .collect(),
        }
    }

    /// A job as a plain enqueue makes it: the optional parts absent.
    fn plain_view() -> JobView {
        JobView {
            id: 1,
            queue: "q".to_string(),
            state: JobState::Ready,
            priority: 1024,
            payload: Bytes::from_static(b"\"....\""),
            headers: BTreeMap::new(),
            attempts: 0,
            max_attempts: 25,
            backoff: Backoff::default(),
            ttr_ms: 60_000,
            run_at_ms: None,
            deadline_at_ms: None,
            created_at_ms: 1_796_378_400_000,
            updated_at_ms: 1_796_378_400_000,
            finished_at_ms: None,
            last_error: None,
            result: None,
            idempotency_key: None,
            cancel_requested: false,
            version: 1,
            parents: BTreeMap::new(),
        }
    }

    #[test]
    fn a_job_location_is_its_path() {
        for id in [0, 1, 9, 10, 12_345, u64::MAX] {
            assert_eq!(
                job_location(id).unwrap().to_str().unwrap(),
                format!("/v1/jobs/{id}")
            );
        }
    }

    #[test]
    fn the_job_writer_writes_what_serde_writes() {
        let mut views = vec![full_view(), plain_view()];
        let mut json_result = plain_view();
        json_result.result = Some(Bytes::from_static(b"null"));
        json_result.payload = Bytes::from_static(b"not json");
        views.push(json_result);
        let mut bad_floats = plain_view();
        bad_floats.backoff.multiplier = f64::NAN;
        bad_floats.backoff.jitter = f64::INFINITY;
        views.push(bad_floats);
        let mut outs = Vec::new();
        for view in &views {
            outs.push(JobOut::new(view));
            outs.push(JobOut {
                lease: Some("18446744073709551615-7".to_string()),
                duplicate: Some(false),
                ..JobOut::new(view)
            });
            outs.push(JobOut {
                duplicate: Some(true),
                ..JobOut::new(view)
            });
        }
        for out in &outs {
            let mut written = Vec::new();
            out.write_json(&mut written).unwrap();
            let expected = serde_json::to_vec(out).unwrap();
            assert_eq!(
                String::from_utf8_lossy(&written),
                String::from_utf8_lossy(&expected)
            );
        }
        let expected = serde_json::to_vec(&JobsOut { jobs: outs }).unwrap();
        let outs: Vec<JobOut<'_>> = views
            .iter()
            .flat_map(|v| {
                [
                    JobOut::new(v),
                    JobOut {
                        lease: Some("18446744073709551615-7".to_string()),
                        duplicate: Some(false),
                        ..JobOut::new(v)
                    },
                    JobOut {
                        duplicate: Some(true),
                        ..JobOut::new(v)
                    },
                ]
            })
            .collect();
        assert_eq!(write_jobs_json(&outs).unwrap(), expected);
        assert_eq!(
            write_jobs_json(&[]).unwrap(),
            serde_json::to_vec(&JobsOut { jobs: Vec::new() }).unwrap()
        );
    }
}
