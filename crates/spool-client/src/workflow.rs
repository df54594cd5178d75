//! Workflows (API.md, "Workflows"): what a client starts and what the
//! server shows.

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;

use crate::types::{stored_bytes, Enqueue, JobState, JsonBody};
use crate::Error;

/// One step: an enqueue body, its queue, the steps it waits for and what
/// undoes it.
#[derive(Debug, Clone)]
pub struct Step {
    name: String,
    queue: String,
    job: Enqueue,
    depends_on: Vec<String>,
    compensate: Option<(String, Enqueue)>,
}

impl Step {
    pub fn new(name: impl Into<String>, queue: impl Into<String>, job: Enqueue) -> Step {
        Step {
            name: name.into(),
            queue: queue.into(),
            job,
            depends_on: Vec::new(),
            compensate: None,
        }
    }

    /// Starts only once `step` completed.
    pub fn depends_on(mut self, step: impl Into<String>) -> Step {
        self.depends_on.push(step.into());
        self
    }

    /// Undoes the step, should a later one fail for good.
    pub fn compensate(mut self, queue: impl Into<String>, job: Enqueue) -> Step {
        self.compensate = Some((queue.into(), job));
        self
    }

    fn to_json(&self) -> Result<JsonBody, Error> {
        let mut body = self.job.to_json()?;
        body.put("name", self.name.clone());
        body.put("queue", self.queue.clone());
        if !self.depends_on.is_empty() {
            body.put("depends_on", self.depends_on.clone());
        }
        if let Some((queue, job)) = &self.compensate {
            let mut undo = job.to_json()?;
            undo.put("queue", queue.clone());
            body.raw.push(("compensate".into(), raw(&undo)?));
        }
        Ok(body)
    }
}

fn raw(body: &impl serde::Serialize) -> Result<Box<RawValue>, Error> {
    serde_json::value::to_raw_value(body)
        .map_err(|e| Error::Usage(format!("cannot encode the request: {e}")))
}

/// `POST /v1/workflows`.
#[derive(Debug, Clone, Default)]
pub struct NewWorkflow {
    name: Option<String>,
    idempotency_key: Option<String>,
    idempotency_ttl_ms: Option<u64>,
    steps: Vec<Step>,
}

impl NewWorkflow {
    pub fn new() -> NewWorkflow {
        NewWorkflow::default()
    }

    pub fn name(mut self, name: impl Into<String>) -> NewWorkflow {
        self.name = Some(name.into());
        self
    }

    /// A second start with this key (within its ttl) answers the existing
    /// workflow and starts nothing.
    pub fn idempotency_key(mut self, key: impl Into<String>) -> NewWorkflow {
        self.idempotency_key = Some(key.into());
        self
    }

    pub fn idempotency_ttl(mut self, ttl: std::time::Duration) -> NewWorkflow {
        self.idempotency_ttl_ms = Some(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX));
        self
    }

    pub fn step(mut self, step: Step) -> NewWorkflow {
        self.steps.push(step);
        self
    }

    pub(crate) fn to_json(&self) -> Result<JsonBody, Error> {
        let mut body = JsonBody::default();
        if let Some(name) = &self.name {
            body.put("name", name.clone());
        }
        if let Some(key) = &self.idempotency_key {
            body.put("idempotency_key", key.clone());
        }
        if let Some(ttl) = self.idempotency_ttl_ms {
            body.put("idempotency_ttl_ms", ttl);
        }
        let steps = self
            .steps
            .iter()
            .map(|s| s.to_json().and_then(|b| raw(&b)))
            .collect::<Result<Vec<_>, _>>()?;
        body.raw.push(("steps".into(), raw(&steps)?));
        Ok(body)
    }
}

/// A workflow's state (`Unknown` for a state this client does not know).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkflowState {
    Running,
    Succeeded,
    Compensating,
    Compensated,
    CompensationFailed,
    #[serde(other)]
    Unknown,
}

impl WorkflowState {
    pub fn as_str(self) -> &'static str {
        match self {
            WorkflowState::Running => "running",
            WorkflowState::Succeeded => "succeeded",
            WorkflowState::Compensating => "compensating",
            WorkflowState::Compensated => "compensated",
            WorkflowState::CompensationFailed => "compensation_failed",
            WorkflowState::Unknown => "unknown",
        }
    }

    /// Succeeded or compensated: it changes no more.
    pub fn is_final(self) -> bool {
        matches!(self, WorkflowState::Succeeded | WorkflowState::Compensated)
    }
}

/// One step as the server shows it.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct WorkflowStep {
    pub name: String,
    pub queue: String,
    pub depends_on: Vec<String>,
    /// pending, running, completed, failed, cancelled, compensating,
    /// compensated or compensation_failed.
    pub state: String,
    pub job: Option<u64>,
    pub job_state: Option<JobState>,
    pub attempts: u32,
    pub last_error: Option<String>,
    pub result: Option<Bytes>,
    pub completed_at: Option<String>,
    pub has_compensation: bool,
    pub compensation_job: Option<u64>,
}

#[derive(Deserialize)]
struct StepWire {
    name: String,
    #[serde(default)]
    queue: String,
    #[serde(default)]
    depends_on: Vec<String>,
    state: String,
    job: Option<u64>,
    job_state: Option<JobState>,
    #[serde(default)]
    attempts: u32,
    last_error: Option<String>,
    result: Option<Box<RawValue>>,
    result_base64: Option<String>,
    completed_at: Option<String>,
    #[serde(default)]
    has_compensation: bool,
    compensation_job: Option<u64>,
}

impl<'de> Deserialize<'de> for WorkflowStep {
    fn deserialize<D: Deserializer<'de>>(de: D) -> Result<WorkflowStep, D::Error> {
        let w = StepWire::deserialize(de)?;
        let result = w.result.filter(|r| r.get() != "null");
        let result =
            stored_bytes(result, w.result_base64, "result").map_err(serde::de::Error::custom)?;
        Ok(WorkflowStep {
            name: w.name,
            queue: w.queue,
            depends_on: w.depends_on,
            state: w.state,
            job: w.job,
            job_state: w.job_state,
            attempts: w.attempts,
            last_error: w.last_error,
            result,
            completed_at: w.completed_at,
            has_compensation: w.has_compensation,
            compensation_job: w.compensation_job,
        })
    }
}

/// A workflow as the server shows it.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Workflow {
    pub id: u64,
    pub name: Option<String>,
    pub state: WorkflowState,
    pub steps: Vec<WorkflowStep>,
    /// When succeeded: step → result.
    pub results: BTreeMap<String, Bytes>,
    /// Why compensation started.
    pub error: Option<String>,
    pub cancel_requested: bool,
    pub idempotency_key: Option<String>,
    pub created_at: Option<String>,
    pub updated_at: Option<String>,
    pub finished_at: Option<String>,
    pub version: u64,
    /// On a start's answer: the idempotency key named an existing workflow.
    pub duplicate: bool,
}

#[derive(Deserialize)]
struct WorkflowWire {
    id: u64,
    name: Option<String>,
    state: WorkflowState,
    #[serde(default)]
    steps: Vec<WorkflowStep>,
    #[serde(default)]
    results: BTreeMap<String, Option<Box<RawValue>>>,
    #[serde(default)]
    results_base64: BTreeMap<String, String>,
    error: Option<String>,
    #[serde(default)]
    cancel_requested: bool,
    idempotency_key: Option<String>,
    created_at: Option<String>,
    updated_at: Option<String>,
    finished_at: Option<String>,
    #[serde(default)]
    version: u64,
    #[serde(default)]
    duplicate: bool,
}

/// A JSON-or-base64 map (results, parents) as bytes by name; a JSON `null`
/// is no result.
pub(crate) fn byte_map(
    json: BTreeMap<String, Option<Box<RawValue>>>,
    base64: BTreeMap<String, String>,
) -> Result<BTreeMap<String, Option<Bytes>>, Error> {
    let mut out = BTreeMap::new();
    for (name, raw) in json {
        let raw = raw.filter(|r| r.get() != "null");
        out.insert(name, stored_bytes(raw, None, "result")?);
    }
    for (name, text) in base64 {
        out.insert(name, stored_bytes(None, Some(text), "result")?);
    }
    Ok(out)
}

impl<'de> Deserialize<'de> for Workflow {
    fn deserialize<D: Deserializer<'de>>(de: D) -> Result<Workflow, D::Error> {
        let w = WorkflowWire::deserialize(de)?;
        let results = byte_map(w.results, w.results_base64)
            .map_err(serde::de::Error::custom)?
            .into_iter()
            .map(|(name, bytes)| (name, bytes.unwrap_or_default()))
            .collect();
        Ok(Workflow {
            id: w.id,
            name: w.name,
            state: w.state,
            steps: w.steps,
            results,
            error: w.error,
            cancel_requested: w.cancel_requested,
            idempotency_key: w.idempotency_key,
            created_at: w.created_at,
            updated_at: w.updated_at,
            finished_at: w.finished_at,
            version: w.version,
            duplicate: w.duplicate,
        })
    }
}

/// One page of workflows; `next` is the `after` of the next page.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[non_exhaustive]
pub struct WorkflowPage {
    pub workflows: Vec<Workflow>,
    pub next: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_workflow_encodes_its_steps_and_reads_back() {
        let wf = NewWorkflow::new()
            .name("order-42")
            .idempotency_key("k")
            .step(
                Step::new("stock", "inventory", Enqueue::bytes(&b"\x00"[..]))
                    .compensate("inventory", Enqueue::json(&1).expect("json")),
            )
            .step(
                Step::new("ship", "logistics", Enqueue::json(&2).expect("json"))
                    .depends_on("stock"),
            );
        let text = serde_json::to_string(&wf.to_json().expect("encodes")).expect("json");
        let value: serde_json::Value = serde_json::from_str(&text).expect("json");
        assert_eq!(value["name"], "order-42");
        assert_eq!(value["steps"][0]["payload_base64"], "AA==");
        assert_eq!(value["steps"][0]["compensate"]["queue"], "inventory");
        assert_eq!(value["steps"][0]["compensate"]["payload"], 1);
        assert_eq!(value["steps"][1]["depends_on"][0], "stock");

        let shown: Workflow = serde_json::from_str(
            r#"{"id":3,"state":"succeeded","results":{"a":{"x":1}},"results_base64":{"b":"AP8="},
                "steps":[{"name":"a","state":"completed","job":7,"job_state":"completed","result":{"x":1}}],
                "future":true}"#,
        )
        .expect("a workflow");
        assert_eq!(shown.state, WorkflowState::Succeeded);
        assert_eq!(&shown.results["a"][..], br#"{"x":1}"#);
        assert_eq!(&shown.results["b"][..], &[0u8, 255]);
        assert_eq!(shown.steps[0].job, Some(7));
        assert_eq!(shown.steps[0].result.as_deref(), Some(&br#"{"x":1}"#[..]));
    }
}
