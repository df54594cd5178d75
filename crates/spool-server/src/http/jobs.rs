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

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::Router;
use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;
use spool_broker::{
    Backoff, Broker, BrokerError, JobChange, JobId, JobState, JobView, Lease, NewJob, Op, Outcome,
    QueueInfo, QueueName, QueuePolicy, RunAt,
};

use super::encoding::{base64_decode, base64_encode, format_rfc3339, parse_rfc3339};
use super::{ApiError, HttpState};
use crate::limits::{JOB_WAIT_MAX, RESERVE_WAIT_MAX, V1_BATCH_JOBS_MAX};

/// Jobs a listing page holds when `limit` is not given.
const LIST_LIMIT_DEFAULT: u32 = 100;

type Shared<B> = State<Arc<HttpState<B>>>;
type IdPath = Result<Path<String>, PathRejection>;
type QueryPairs = Result<Query<Vec<(String, String)>>, QueryRejection>;

/// The `/v1` routes (state still to be given).
pub(super) fn routes<B: Broker>() -> Router<Arc<HttpState<B>>> {
    Router::new()
        .route("/v1/queues", get(list_queues::<B>))
        .route("/v1/queues/{queue}", get(get_queue::<B>))
        .route(
            "/v1/queues/{queue}/jobs",
            post(enqueue::<B>).get(list_jobs::<B>).delete(purge::<B>),
        )
        .route("/v1/queues/{queue}/jobs/batch", post(enqueue_batch::<B>))
        .route("/v1/queues/{queue}/policy", put(set_policy::<B>))
        .route("/v1/queues/{queue}/pause", post(pause::<B>))
        .route("/v1/queues/{queue}/resume", post(resume::<B>))
        .route("/v1/reserve", post(reserve::<B>))
        .route(
            "/v1/jobs/{id}",
            get(get_job::<B>)
                .patch(update_job::<B>)
                .delete(delete_job::<B>),
        )
        .route("/v1/jobs/{id}/cancel", post(cancel::<B>))
        .route("/v1/jobs/{id}/heartbeat", post(heartbeat::<B>))
        .route("/v1/jobs/{id}/complete", post(complete::<B>))
        .route("/v1/jobs/{id}/fail", post(fail::<B>))
        .route("/v1/jobs/{id}/release", post(release::<B>))
        .route("/v1/jobs/{id}/bury", post(bury::<B>))
        .route("/v1/jobs/{id}/kick", post(kick::<B>))
}

// ---- errors ---------------------------------------------------------------

fn invalid(field: impl Into<String>, message: impl Into<String>) -> ApiError {
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
fn unexpected() -> ApiError {
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

/// Parses a JSON body; an empty one counts as `{}` (for actions whose
/// fields are all optional: kick, cancel, pause, ...).
fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let body: &[u8] = if body.trim_ascii().is_empty() {
        b"{}"
    } else {
        body
    };
    let mut de = serde_json::Deserializer::from_slice(body);
    let value = serde_path_to_error::deserialize(&mut de).map_err(json_error)?;
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
fn present_raw<'de, D: Deserializer<'de>>(de: D) -> Result<Option<Box<RawValue>>, D::Error> {
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

fn queue_name(path: IdPath) -> Result<QueueName, ApiError> {
    let Path(text) = path.map_err(|e| invalid("queue", e.body_text()))?;
    QueueName::new(text.as_bytes()).map_err(|e| invalid("queue", format!("{text:?}: {e}")))
}

/// The query's parameters, each at most once and each one the endpoint
/// knows: a misspelt option is an error, not a silent default.
fn query(pairs: QueryPairs, known: &[&str]) -> Result<BTreeMap<String, String>, ApiError> {
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

fn number_param<T: std::str::FromStr>(
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
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BackoffBody {
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
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EnqueueBody {
    #[serde(default, deserialize_with = "present_raw")]
    payload: Option<Box<RawValue>>,
    payload_base64: Option<String>,
    priority: Option<u32>,
    delay_ms: Option<u64>,
    run_at: Option<String>,
    ttr_ms: Option<u64>,
    max_attempts: Option<u32>,
    backoff: Option<BackoffBody>,
    headers: Option<BTreeMap<String, String>>,
    idempotency_key: Option<String>,
    idempotency_ttl_ms: Option<u64>,
}

impl EnqueueBody {
    /// `prefix` names the job in a batch (`jobs[3].`) in errors.
    fn into_new_job(self, prefix: &str) -> Result<NewJob, ApiError> {
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
        })
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchBody {
    jobs: Vec<EnqueueBody>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PatchBody {
    priority: Option<u32>,
    delay_ms: Option<u64>,
    run_at: Option<String>,
    #[serde(default, deserialize_with = "present_raw")]
    payload: Option<Box<RawValue>>,
    payload_base64: Option<String>,
    headers: Option<BTreeMap<String, String>>,
    max_attempts: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReserveBody {
    queues: Vec<String>,
    #[serde(default)]
    timeout_ms: u64,
    batch: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LeaseBody {
    lease: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CompleteBody {
    lease: String,
    #[serde(default, deserialize_with = "present_raw")]
    result: Option<Box<RawValue>>,
    result_base64: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FailBody {
    lease: String,
    error: String,
    retry_in_ms: Option<u64>,
    #[serde(default)]
    permanent: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReleaseBody {
    lease: String,
    #[serde(default)]
    delay_ms: u64,
    priority: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BuryBody {
    lease: Option<String>,
    reason: Option<String>,
}

/// For actions that take no fields: `{}` or nothing.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EmptyBody {}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PauseBody {
    duration_ms: Option<u64>,
}

/// A queue's policy as `PUT` replaces it: fields left out go back to the
/// defaults.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyBody {
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
fn as_json(bytes: &[u8]) -> Option<&RawValue> {
    let text = std::str::from_utf8(bytes).ok()?;
    serde_json::from_str::<&RawValue>(text).ok()
}

struct BackoffOut<'a>(&'a Backoff);

impl Serialize for BackoffOut<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(4))?;
        m.serialize_entry("initial_ms", &self.0.initial_ms)?;
        m.serialize_entry("max_ms", &self.0.max_ms)?;
        m.serialize_entry("multiplier", &self.0.multiplier)?;
        m.serialize_entry("jitter", &self.0.jitter)?;
        m.end()
    }
}

/// A job as API.md shows it, plus its lease when handed out by a reserve
/// and `duplicate` when answering an enqueue.
struct JobOut<'a> {
    job: &'a JobView,
    lease: Option<Lease>,
    duplicate: Option<bool>,
}

impl<'a> JobOut<'a> {
    fn new(job: &'a JobView) -> JobOut<'a> {
        JobOut {
            job,
            lease: None,
            duplicate: None,
        }
    }
}

impl Serialize for JobOut<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let j = self.job;
        let at = |ms: Option<u64>| ms.map(format_rfc3339);
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("id", &j.id)?;
        m.serialize_entry("queue", &j.queue)?;
        m.serialize_entry("state", j.state.as_str())?;
        m.serialize_entry("priority", &j.priority)?;
        match as_json(&j.payload) {
            Some(json) => m.serialize_entry("payload", json)?,
            None => m.serialize_entry("payload_base64", &base64_encode(&j.payload))?,
        }
        m.serialize_entry("headers", &j.headers)?;
        m.serialize_entry("attempts", &j.attempts)?;
        m.serialize_entry("max_attempts", &j.max_attempts)?;
        m.serialize_entry("backoff", &BackoffOut(&j.backoff))?;
        m.serialize_entry("ttr_ms", &j.ttr_ms)?;
        m.serialize_entry("run_at", &at(j.run_at_ms))?;
        m.serialize_entry("deadline_at", &at(j.deadline_at_ms))?;
        m.serialize_entry("created_at", &format_rfc3339(j.created_at_ms))?;
        m.serialize_entry("updated_at", &format_rfc3339(j.updated_at_ms))?;
        m.serialize_entry("finished_at", &at(j.finished_at_ms))?;
        m.serialize_entry("last_error", &j.last_error)?;
        match j.result.as_deref() {
            None => m.serialize_entry("result", &None::<()>)?,
            Some(result) => match as_json(result) {
                Some(json) => m.serialize_entry("result", json)?,
                None => m.serialize_entry("result_base64", &base64_encode(result))?,
            },
        }
        m.serialize_entry("idempotency_key", &j.idempotency_key)?;
        m.serialize_entry("cancel_requested", &j.cancel_requested)?;
        m.serialize_entry("version", &j.version)?;
        if let Some(lease) = self.lease {
            m.serialize_entry("lease", &lease.encode())?;
        }
        if let Some(duplicate) = self.duplicate {
            m.serialize_entry("duplicate", &duplicate)?;
        }
        m.end()
    }
}

struct QueueOut<'a>(&'a QueueInfo);

impl Serialize for QueueOut<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let q = self.0;
        let p = &q.policy;
        let counts: BTreeMap<&str, u64> = [
            ("ready", q.ready),
            ("reserved", q.reserved),
            ("delayed", q.delayed),
            ("buried", q.buried),
            ("completed", q.completed),
            ("cancelled", q.cancelled),
        ]
        .into_iter()
        .collect();
        let policy = serde_json::json!({
            "max_jobs": p.max_jobs,
            "max_attempts": p.max_attempts,
            "backoff": p.backoff.as_ref().map(|b| serde_json::json!({
                "initial_ms": b.initial_ms,
                "max_ms": b.max_ms,
                "multiplier": b.multiplier,
                "jitter": b.jitter,
            })),
            "ttr_ms": p.ttr_ms,
            "retention_ms": p.retention_ms,
            "retention_max_jobs": p.retention_max_jobs,
            "concurrency": p.concurrency,
            "rate_per_s": p.rate_per_s,
        });
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("name", &q.name)?;
        m.serialize_entry("counts", &counts)?;
        m.serialize_entry("paused", &q.paused_until_ms.is_some())?;
        // Paused with no end: `paused` true, `paused_until` null.
        let until = q
            .paused_until_ms
            .filter(|&ms| ms != u64::MAX)
            .map(format_rfc3339);
        m.serialize_entry("paused_until", &until)?;
        m.serialize_entry("policy", &policy)?;
        m.end()
    }
}

fn json_response(status: StatusCode, body: &impl Serialize) -> Response {
    match serde_json::to_vec(body) {
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
    let version = out.job.version;
    let mut response = json_response(status, &out);
    if let Ok(etag) = HeaderValue::from_str(&format!("\"{version}\"")) {
        response.headers_mut().insert(header::ETAG, etag);
    }
    response
}

// ---- calling the broker -------------------------------------------------------

fn broker<B: Broker>(state: &HttpState<B>) -> Result<&B, ApiError> {
    state.broker().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "recovering",
            "the write-ahead log is being recovered; try again shortly",
        )
    })
}

async fn call<B: Broker>(state: &HttpState<B>, op: Op) -> Result<Outcome, ApiError> {
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
        Outcome::Queue(info) => Ok(json_response(StatusCode::OK, &QueueOut(&info))),
        _ => Err(unexpected()),
    }
}

// ---- handlers: jobs -------------------------------------------------------------

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
            if let Ok(location) = HeaderValue::from_str(&format!("/v1/jobs/{}", job.id)) {
                response.headers_mut().insert(header::LOCATION, location);
            }
            Ok(response)
        }
        _ => Err(unexpected()),
    }
}

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
            Ok(json_response(
                StatusCode::CREATED,
                &serde_json::json!({ "jobs": jobs }),
            ))
        }
        _ => Err(unexpected()),
    }
}

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
                    lease: Some(l.lease),
                    ..JobOut::new(&l.job)
                })
                .collect();
            Ok(json_response(
                StatusCode::OK,
                &serde_json::json!({ "jobs": jobs }),
            ))
        }
        _ => Err(unexpected()),
    }
}

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
            &serde_json::json!({ "deadline_at": format_rfc3339(ms) }),
        )),
        _ => Err(unexpected()),
    }
}

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

async fn list_queues<B: Broker>(
    State(state): Shared<B>,
    params: QueryPairs,
) -> Result<Response, ApiError> {
    query(params, &[])?;
    match call(&state, Op::ListQueues).await? {
        Outcome::Queues(queues) => {
            let queues: Vec<QueueOut<'_>> = queues.iter().map(QueueOut).collect();
            Ok(json_response(
                StatusCode::OK,
                &serde_json::json!({ "queues": queues }),
            ))
        }
        _ => Err(unexpected()),
    }
}

async fn get_queue<B: Broker>(
    State(state): Shared<B>,
    queue: IdPath,
    params: QueryPairs,
) -> Result<Response, ApiError> {
    let queue = queue_name(queue)?;
    query(params, &[])?;
    call_queue(&state, Op::GetQueue { queue }).await
}

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
            let jobs: Vec<JobOut<'_>> = page.jobs.iter().map(JobOut::new).collect();
            Ok(json_response(
                StatusCode::OK,
                &serde_json::json!({ "jobs": jobs, "next": page.next }),
            ))
        }
        _ => Err(unexpected()),
    }
}

/// `state` is required: a purge of "whatever the default is" is too easy
/// to send by mistake.
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
        Outcome::Purged(deleted) => Ok(json_response(
            StatusCode::OK,
            &serde_json::json!({ "deleted": deleted }),
        )),
        _ => Err(unexpected()),
    }
}

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
pub(super) fn command_name(method: &str, path: &str) -> Option<&'static str> {
    let segments: Vec<&str> = path.strip_prefix("/v1/")?.split('/').collect();
    Some(match (method, segments.as_slice()) {
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
        ("POST", ["jobs", _, "complete"]) => "POST /v1/jobs/{id}/complete",
        ("POST", ["jobs", _, "fail"]) => "POST /v1/jobs/{id}/fail",
        ("POST", ["jobs", _, "release"]) => "POST /v1/jobs/{id}/release",
        ("POST", ["jobs", _, "bury"]) => "POST /v1/jobs/{id}/bury",
        ("POST", ["jobs", _, "kick"]) => "POST /v1/jobs/{id}/kick",
        _ => return None,
    })
}

/// Whether a request is a batch enqueue (its body has its own bound).
pub(super) fn is_batch(method: &str, path: &str) -> bool {
    method == "POST" && path.starts_with("/v1/queues/") && path.ends_with("/jobs/batch")
}
