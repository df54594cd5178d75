//! `/v1/workflows`: sagas and DAGs of steps (API.md, "Workflows"), each
//! endpoint one [`Broker::call`], with the job API's conventions (strict
//! bodies, errors naming the field, JSON text kept as sent).
//!
//! Decisions the contract leaves open:
//! - a step is an enqueue body plus `name`, `queue`, `depends_on` and
//!   `compensate` (an enqueue body plus its `queue`); a step's job takes no
//!   `idempotency_key` (the workflow's covers it);
//! - `POST /v1/workflows` answers 201 with the workflow, or 200 with the
//!   existing one and `"duplicate": true` when its idempotency key matched;
//! - results (the workflow's `results`, a step's `result`) show as JSON
//!   when the stored bytes are JSON text, else under `*_base64`;
//! - cancelling a succeeded or compensated workflow is 409 `wrong_state`;
//!   cancelling one already compensating only sets `cancel_requested`.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::Response;
use axum::routing::{get, post, MethodRouter};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use spool_broker::{
    Broker, NewStep, NewWorkflow, Op, Outcome, QueueName, StepState, StepView, WorkflowId,
    WorkflowState, WorkflowView,
};
use utoipa::ToSchema;

use super::encoding::{base64_encode, format_rfc3339};
use super::jobs::{
    as_json, call, invalid, json_response, parse, present_raw, query, unexpected, BackoffBody,
    EmptyBody, EnqueueBody, IdPath, QueryPairs, Shared, StateOut,
};
use super::{ApiError, ErrorBody, HttpState};

/// Workflows a listing page holds when `limit` is not given.
const LIST_LIMIT_DEFAULT: u32 = 100;

/// The `/v1/workflows` routes, for `jobs::route_table`.
pub(super) fn route_table<B: Broker>() -> Vec<(&'static str, MethodRouter<Arc<HttpState<B>>>)> {
    vec![
        (
            "/v1/workflows",
            post(start_workflow::<B>).get(list_workflows::<B>),
        ),
        ("/v1/workflows/{id}", get(get_workflow::<B>)),
        ("/v1/workflows/{id}/cancel", post(cancel_workflow::<B>)),
    ]
}

/// The metric label of a workflow request, by its path's segments after
/// `/v1/`.
pub(super) fn command_name(method: &str, segments: &[&str]) -> Option<&'static str> {
    Some(match (method, segments) {
        ("POST", ["workflows"]) => "POST /v1/workflows",
        ("GET", ["workflows"]) => "GET /v1/workflows",
        ("GET", ["workflows", _]) => "GET /v1/workflows/{id}",
        ("POST", ["workflows", _, "cancel"]) => "POST /v1/workflows/{id}/cancel",
        _ => return None,
    })
}

/// Whether a request starts a workflow: its body holds many jobs, so it
/// gets a batch's bound.
pub(super) fn is_start(method: &str, path: &str) -> bool {
    method == "POST" && path == "/v1/workflows"
}

// ---- input ----------------------------------------------------------------

/// The enqueue body's fields, spelt out in each struct that takes them:
/// serde's `flatten` would lose `deny_unknown_fields`, and a misspelt field
/// must stay a 400.
macro_rules! enqueue_fields {
    ($(#[$meta:meta])* $name:ident { $($(#[$field_meta:meta])* $field:ident: $ty:ty,)* }) => {
        $(#[$meta])*
        pub(super) struct $name {
            $($(#[$field_meta])* $field: $ty,)*
            /// Any JSON value, stored as its text (or give `payload_base64`).
            #[serde(default, deserialize_with = "present_raw")]
            #[schema(value_type = Option<serde_json::Value>)]
            payload: Option<Box<RawValue>>,
            payload_base64: Option<String>,
            priority: Option<u32>,
            delay_ms: Option<u64>,
            /// An RFC 3339 instant (or give `delay_ms`).
            #[schema(format = DateTime)]
            run_at: Option<String>,
            ttr_ms: Option<u64>,
            max_attempts: Option<u32>,
            backoff: Option<BackoffBody>,
            headers: Option<BTreeMap<String, String>>,
        }

        impl $name {
            fn enqueue_body(&mut self) -> EnqueueBody {
                EnqueueBody {
                    payload: self.payload.take(),
                    payload_base64: self.payload_base64.take(),
                    priority: self.priority,
                    delay_ms: self.delay_ms,
                    run_at: self.run_at.take(),
                    ttr_ms: self.ttr_ms,
                    max_attempts: self.max_attempts,
                    backoff: self.backoff.take(),
                    headers: self.headers.take(),
                    idempotency_key: None,
                    idempotency_ttl_ms: None,
                }
            }
        }
    };
}

enqueue_fields! {
    /// What undoes a step: an enqueue body and its queue.
    #[derive(Debug, Deserialize, ToSchema)]
    #[serde(deny_unknown_fields)]
    CompensateBody {
        queue: String,
    }
}

enqueue_fields! {
    /// One step: an enqueue body plus its name, queue, dependencies and
    /// compensation.
    #[derive(Debug, Deserialize, ToSchema)]
    #[serde(deny_unknown_fields)]
    StepBody {
        /// Unique in the workflow; 1 to 128 bytes.
        name: String,
        queue: String,
        /// Steps that must complete before this one starts.
        #[serde(default)]
        depends_on: Vec<String>,
        compensate: Option<CompensateBody>,
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"name": "order-42", "idempotency_key": "order-42", "steps": [
    {"name": "stock", "queue": "inventory", "payload": {"sku": 7, "qty": 1},
     "compensate": {"queue": "inventory", "payload": {"undo": "stock"}}},
    {"name": "coupon", "queue": "coupons", "payload": {"code": "X"}, "depends_on": ["stock"],
     "compensate": {"queue": "coupons", "payload": {"undo": "coupon"}}},
    {"name": "shipping", "queue": "logistics", "payload": {}, "depends_on": ["coupon"]}
]}))]
pub(super) struct WorkflowBody {
    name: Option<String>,
    /// Scoped to workflows: a second start with a live key answers the
    /// existing workflow.
    idempotency_key: Option<String>,
    idempotency_ttl_ms: Option<u64>,
    steps: Vec<StepBody>,
}

fn queue_of(text: &str, field: String) -> Result<QueueName, ApiError> {
    QueueName::new(text.as_bytes()).map_err(|e| invalid(field, format!("{text:?}: {e}")))
}

impl WorkflowBody {
    fn into_new_workflow(self) -> Result<NewWorkflow, ApiError> {
        let mut steps = Vec::with_capacity(self.steps.len());
        for (i, mut step) in self.steps.into_iter().enumerate() {
            let prefix = format!("steps[{i}].");
            let compensate = match step.compensate.take() {
                Some(mut c) => {
                    let prefix = format!("{prefix}compensate.");
                    Some((
                        queue_of(&c.queue, format!("{prefix}queue"))?,
                        c.enqueue_body().into_new_job(&prefix)?,
                    ))
                }
                None => None,
            };
            let job = step.enqueue_body().into_new_job(&prefix)?;
            steps.push(NewStep {
                queue: queue_of(&step.queue, format!("{prefix}queue"))?,
                job,
                name: step.name,
                depends_on: step.depends_on,
                compensate,
            });
        }
        Ok(NewWorkflow {
            name: self.name,
            idempotency_key: self.idempotency_key,
            idempotency_ttl_ms: self.idempotency_ttl_ms,
            steps,
        })
    }
}

fn workflow_id(path: IdPath) -> Result<WorkflowId, ApiError> {
    let Path(text) = path.map_err(|e| invalid("id", e.body_text()))?;
    text.parse().map_err(|_| {
        invalid(
            "id",
            format!("{text:?} is not a workflow id (a positive integer)"),
        )
    })
}

// ---- output ---------------------------------------------------------------

#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub(super) enum WorkflowStateOut {
    Running,
    Succeeded,
    Compensating,
    Compensated,
    CompensationFailed,
}

impl From<WorkflowState> for WorkflowStateOut {
    fn from(state: WorkflowState) -> Self {
        match state {
            WorkflowState::Running => WorkflowStateOut::Running,
            WorkflowState::Succeeded => WorkflowStateOut::Succeeded,
            WorkflowState::Compensating => WorkflowStateOut::Compensating,
            WorkflowState::Compensated => WorkflowStateOut::Compensated,
            WorkflowState::CompensationFailed => WorkflowStateOut::CompensationFailed,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub(super) enum StepStateOut {
    Pending,
    Running,
    Completed,
    Failed,
    Cancelled,
    Compensating,
    Compensated,
    CompensationFailed,
}

impl From<StepState> for StepStateOut {
    fn from(state: StepState) -> Self {
        match state {
            StepState::Pending => StepStateOut::Pending,
            StepState::Running => StepStateOut::Running,
            StepState::Completed => StepStateOut::Completed,
            StepState::Failed => StepStateOut::Failed,
            StepState::Cancelled => StepStateOut::Cancelled,
            StepState::Compensating => StepStateOut::Compensating,
            StepState::Compensated => StepStateOut::Compensated,
            StepState::CompensationFailed => StepStateOut::CompensationFailed,
        }
    }
}

/// A step as responses show it.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = WorkflowStep)]
pub(super) struct StepOut<'a> {
    #[schema(value_type = String)]
    name: &'a str,
    #[schema(value_type = String)]
    queue: &'a str,
    #[schema(value_type = Vec<String>)]
    depends_on: &'a [String],
    state: StepStateOut,
    /// The step's job, once enqueued.
    #[schema(value_type = Option<u64>)]
    job: Option<u64>,
    /// That job's state (null once it is gone past its retention).
    job_state: Option<StateOut>,
    attempts: u32,
    #[schema(value_type = Option<String>)]
    last_error: Option<&'a str>,
    /// Absent when the result is not JSON text (then `result_base64`);
    /// null before there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<serde_json::Value>)]
    result: Option<Option<&'a RawValue>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    result_base64: Option<String>,
    #[schema(format = DateTime)]
    completed_at: Option<String>,
    has_compensation: bool,
    #[schema(value_type = Option<u64>)]
    compensation_job: Option<u64>,
}

impl<'a> StepOut<'a> {
    fn new(s: &'a StepView) -> StepOut<'a> {
        let (result, result_base64) = match s.result.as_deref() {
            None => (Some(None), None),
            Some(bytes) => match as_json(bytes) {
                Some(json) => (Some(Some(json)), None),
                None => (None, Some(base64_encode(bytes))),
            },
        };
        StepOut {
            name: &s.name,
            queue: &s.queue,
            depends_on: &s.depends_on,
            state: s.state.into(),
            job: s.job,
            job_state: s.job_state.map(StateOut::from),
            attempts: s.attempts,
            last_error: s.last_error.as_deref(),
            result,
            result_base64,
            completed_at: s.completed_at_ms.map(format_rfc3339),
            has_compensation: s.has_compensation,
            compensation_job: s.compensation_job,
        }
    }
}

/// Step name → result: JSON text as JSON, the others (as base64) under a
/// second map, as payloads are shown.
#[allow(clippy::type_complexity)]
fn split_results<'a>(
    results: impl Iterator<Item = (&'a str, Option<&'a [u8]>)>,
) -> (
    BTreeMap<&'a str, Option<&'a RawValue>>,
    BTreeMap<&'a str, String>,
) {
    let mut json = BTreeMap::new();
    let mut base64 = BTreeMap::new();
    for (name, bytes) in results {
        match bytes {
            None => {
                json.insert(name, None);
            }
            Some(bytes) => match as_json(bytes) {
                Some(value) => {
                    json.insert(name, Some(value));
                }
                None => {
                    base64.insert(name, base64_encode(bytes));
                }
            },
        }
    }
    (json, base64)
}

/// A workflow as responses show it.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Workflow)]
pub(super) struct WorkflowOut<'a> {
    #[schema(value_type = u64, minimum = 1)]
    id: WorkflowId,
    #[schema(value_type = Option<String>)]
    name: Option<&'a str>,
    state: WorkflowStateOut,
    steps: Vec<StepOut<'a>>,
    /// When succeeded: step → result (JSON text as JSON).
    #[schema(value_type = BTreeMap<String, serde_json::Value>)]
    results: BTreeMap<&'a str, Option<&'a RawValue>>,
    /// Results that are not JSON text, as base64.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    #[schema(value_type = BTreeMap<String, String>)]
    results_base64: BTreeMap<&'a str, String>,
    /// Why compensation started.
    #[schema(value_type = Option<String>)]
    error: Option<&'a str>,
    cancel_requested: bool,
    #[schema(value_type = Option<String>)]
    idempotency_key: Option<&'a str>,
    #[schema(format = DateTime)]
    created_at: String,
    #[schema(format = DateTime)]
    updated_at: String,
    #[schema(format = DateTime)]
    finished_at: Option<String>,
    version: u64,
    /// On a start: whether the idempotency key named an existing workflow.
    #[serde(skip_serializing_if = "Option::is_none")]
    duplicate: Option<bool>,
}

impl<'a> WorkflowOut<'a> {
    fn new(w: &'a WorkflowView) -> WorkflowOut<'a> {
        let (results, results_base64) = split_results(
            w.results
                .iter()
                .map(|(name, bytes)| (name.as_str(), Some(&bytes[..]))),
        );
        WorkflowOut {
            id: w.id,
            name: w.name.as_deref(),
            state: w.state.into(),
            steps: w.steps.iter().map(StepOut::new).collect(),
            results,
            results_base64,
            error: w.error.as_deref(),
            cancel_requested: w.cancel_requested,
            idempotency_key: w.idempotency_key.as_deref(),
            created_at: format_rfc3339(w.created_at_ms),
            updated_at: format_rfc3339(w.updated_at_ms),
            finished_at: w.finished_at_ms.map(format_rfc3339),
            version: w.version,
            duplicate: None,
        }
    }
}

/// A page of workflows; `next` is the `after` of the next page.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = WorkflowPage)]
pub(super) struct WorkflowPageOut<'a> {
    workflows: Vec<WorkflowOut<'a>>,
    #[schema(value_type = Option<u64>)]
    next: Option<WorkflowId>,
}

/// The parents of a job: split like results (see [`split_results`]).
#[allow(clippy::type_complexity)]
pub(super) fn parents_out(
    parents: &BTreeMap<String, Option<Bytes>>,
) -> (BTreeMap<&str, Option<&RawValue>>, BTreeMap<&str, String>) {
    split_results(
        parents
            .iter()
            .map(|(name, result)| (name.as_str(), result.as_deref())),
    )
}

fn workflow_response(status: StatusCode, out: WorkflowOut<'_>) -> Response {
    let version = out.version;
    let id = out.id;
    let mut response = json_response(status, &out);
    if let Ok(etag) = HeaderValue::from_str(&format!("\"{version}\"")) {
        response.headers_mut().insert(header::ETAG, etag);
    }
    if status == StatusCode::CREATED {
        if let Ok(location) = HeaderValue::from_str(&format!("/v1/workflows/{id}")) {
            response.headers_mut().insert(header::LOCATION, location);
        }
    }
    response
}

fn workflow_of(outcome: Outcome) -> Result<(Box<WorkflowView>, bool), ApiError> {
    match outcome {
        Outcome::Workflow {
            workflow,
            duplicate,
        } => Ok((workflow, duplicate)),
        _ => Err(unexpected()),
    }
}

// ---- handlers -------------------------------------------------------------

#[utoipa::path(
    post,
    path = "/v1/workflows",
    tag = "workflows",
    summary = "Start a workflow: a saga or DAG of steps with compensations",
    request_body = WorkflowBody,
    responses(
        (
            status = 201,
            description = "Started: the steps that depend on nothing are enqueued",
            body = WorkflowOut,
            headers(
                ("ETag" = String, description = "The workflow's version"),
                ("Location" = String, description = "The workflow's URL"),
            ),
            links(
            ("get" = (operation_id = "get_workflow", parameters(("id" = "$response.body#/id")))),
            ("cancel" = (operation_id = "cancel_workflow", parameters(("id" = "$response.body#/id")))),
            ),
        ),
        (status = 200, description = "The idempotency key names an existing workflow: that one, `duplicate` true", body = WorkflowOut),
        (status = 400, description = "Invalid input (a cycle, an unknown dependency, a duplicate step name, ...); `field` and the message name it", body = ErrorBody),
        (status = 401, description = "Missing or wrong bearer token (with SPOOL_AUTH_TOKEN set)", body = ErrorBody),
        (status = 413, description = "The request body, or a step's payload, is too large", body = ErrorBody),
        (status = 503, description = "Recovering, draining or storage failing", body = ErrorBody),
    ),
    security(("bearer" = [])),
)]
async fn start_workflow<B: Broker>(
    State(state): Shared<B>,
    params: QueryPairs,
    body: Bytes,
) -> Result<Response, ApiError> {
    query(params, &[])?;
    let workflow = parse::<WorkflowBody>(&body)?.into_new_workflow()?;
    let (view, duplicate) = workflow_of(call(&state, Op::StartWorkflow { workflow }).await?)?;
    let status = if duplicate {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok(workflow_response(
        status,
        WorkflowOut {
            duplicate: Some(duplicate),
            ..WorkflowOut::new(&view)
        },
    ))
}

#[utoipa::path(
    get,
    path = "/v1/workflows/{id}",
    tag = "workflows",
    summary = "A workflow with each step's state, attempts and error",
    params(("id" = u64, Path, description = "The workflow id", minimum = 1)),
    responses(
        (status = 200, description = "The workflow", body = WorkflowOut, headers(("ETag" = String, description = "The workflow's version"))),
        (status = 400, description = "Invalid input; `field` names it", body = ErrorBody),
        (status = 401, description = "Missing or wrong bearer token (with SPOOL_AUTH_TOKEN set)", body = ErrorBody),
        (status = 404, description = "No such workflow (or forgotten after its retention)", body = ErrorBody),
        (status = 503, description = "Recovering or storage failing", body = ErrorBody),
    ),
    security(("bearer" = [])),
)]
async fn get_workflow<B: Broker>(
    State(state): Shared<B>,
    id: IdPath,
    params: QueryPairs,
) -> Result<Response, ApiError> {
    let id = workflow_id(id)?;
    query(params, &[])?;
    let (view, _) = workflow_of(call(&state, Op::GetWorkflow { id }).await?)?;
    Ok(workflow_response(StatusCode::OK, WorkflowOut::new(&view)))
}

#[utoipa::path(
    get,
    path = "/v1/workflows",
    tag = "workflows",
    summary = "A page of workflows, oldest first",
    params(
        ("state" = Option<WorkflowStateOut>, Query, description = "Only workflows in this state"),
        ("limit" = Option<u32>, Query, description = "Workflows per page (default 100, at most 1000)", minimum = 1, maximum = 1000),
        ("after" = Option<u64>, Query, description = "List workflows after this id (the previous page's `next`)"),
    ),
    responses(
        (status = 200, description = "The page", body = WorkflowPageOut),
        (status = 400, description = "Invalid input; `field` names it", body = ErrorBody),
        (status = 401, description = "Missing or wrong bearer token (with SPOOL_AUTH_TOKEN set)", body = ErrorBody),
        (status = 503, description = "Recovering or storage failing", body = ErrorBody),
    ),
    security(("bearer" = [])),
)]
async fn list_workflows<B: Broker>(
    State(state): Shared<B>,
    params: QueryPairs,
) -> Result<Response, ApiError> {
    let params = query(params, &["state", "after", "limit"])?;
    let state_filter = params
        .get("state")
        .map(|v| {
            WorkflowState::parse(v).ok_or_else(|| {
                invalid(
                    "state",
                    format!(
                        "{v:?} is not a workflow state: running, succeeded, compensating, \
                         compensated or compensation_failed"
                    ),
                )
            })
        })
        .transpose()?;
    let number = |name: &str| -> Result<Option<u64>, ApiError> {
        params
            .get(name)
            .map(|v| {
                v.parse::<u64>()
                    .map_err(|_| invalid(name, format!("{v:?} is not a valid number")))
            })
            .transpose()
    };
    let after = number("after")?;
    let limit = match number("limit")? {
        None => LIST_LIMIT_DEFAULT,
        Some(n) => u32::try_from(n).map_err(|_| invalid("limit", "1 to 1000"))?,
    };
    match call(
        &state,
        Op::ListWorkflows {
            state: state_filter,
            after,
            limit,
        },
    )
    .await?
    {
        Outcome::Workflows(page) => Ok(json_response(
            StatusCode::OK,
            &WorkflowPageOut {
                workflows: page.workflows.iter().map(WorkflowOut::new).collect(),
                next: page.next,
            },
        )),
        _ => Err(unexpected()),
    }
}

#[utoipa::path(
    post,
    path = "/v1/workflows/{id}/cancel",
    tag = "workflows",
    summary = "Cancel a workflow: no new step starts, running ones are cancelled, completed ones compensated",
    params(("id" = u64, Path, description = "The workflow id", minimum = 1)),
    request_body = Option<EmptyBody>,
    responses(
        (status = 200, description = "The workflow, compensating (or already past it)", body = WorkflowOut),
        (status = 400, description = "Invalid input; `field` names it", body = ErrorBody),
        (status = 401, description = "Missing or wrong bearer token (with SPOOL_AUTH_TOKEN set)", body = ErrorBody),
        (status = 404, description = "No such workflow", body = ErrorBody),
        (status = 409, description = "The workflow already succeeded or was compensated: `wrong_state`", body = ErrorBody),
        (status = 413, description = "The request body is too large", body = ErrorBody),
        (status = 503, description = "Recovering or storage failing", body = ErrorBody),
    ),
    security(("bearer" = [])),
)]
async fn cancel_workflow<B: Broker>(
    State(state): Shared<B>,
    id: IdPath,
    params: QueryPairs,
    body: Bytes,
) -> Result<Response, ApiError> {
    let id = workflow_id(id)?;
    query(params, &[])?;
    parse::<EmptyBody>(&body)?;
    let (view, _) = workflow_of(call(&state, Op::CancelWorkflow { id }).await?)?;
    Ok(workflow_response(StatusCode::OK, WorkflowOut::new(&view)))
}
