//! The API's JSON as Rust types: what goes in (enqueue bodies, policies,
//! failures) and what comes out (jobs, queues, pages). Answers are read
//! leniently (unknown fields ignored) so a newer server's additions do not
//! break an older client; requests leave out what the caller did not set,
//! so the queue's policy or the server's default applies.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::value::RawValue;

use crate::base64;
use crate::error::Error;

/// A job's state (API.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum JobState {
    Delayed,
    Ready,
    Reserved,
    Buried,
    Completed,
    Cancelled,
    /// A state this client does not know (a newer server's).
    #[serde(other)]
    Unknown,
}

impl JobState {
    /// The state as the API spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Delayed => "delayed",
            JobState::Ready => "ready",
            JobState::Reserved => "reserved",
            JobState::Buried => "buried",
            JobState::Completed => "completed",
            JobState::Cancelled => "cancelled",
            JobState::Unknown => "unknown",
        }
    }

    /// Whether the job moves no further by itself: final, or buried (dead
    /// until someone kicks it). A job wait ends at these.
    pub fn is_settled(self) -> bool {
        matches!(
            self,
            JobState::Completed | JobState::Cancelled | JobState::Buried
        )
    }
}

/// Retry backoff: exponential from `initial_ms`, capped at `max_ms`,
/// jittered by a fraction.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Backoff {
    pub initial_ms: u64,
    pub max_ms: u64,
    pub multiplier: f64,
    pub jitter: f64,
}

/// A job as the server shows it. `payload` and `result` are the stored
/// bytes, whichever way they travelled (`payload` as JSON text or
/// `payload_base64`).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Job {
    pub id: u64,
    pub queue: String,
    pub state: JobState,
    pub priority: u32,
    pub payload: Bytes,
    pub headers: BTreeMap<String, String>,
    pub attempts: u32,
    pub max_attempts: u32,
    pub backoff: Option<Backoff>,
    pub ttr_ms: u64,
    pub run_at: Option<String>,
    pub deadline_at: Option<String>,
    pub created_at: Option<String>,
    pub updated_at: Option<String>,
    pub finished_at: Option<String>,
    pub last_error: Option<String>,
    pub result: Option<Bytes>,
    pub idempotency_key: Option<String>,
    pub cancel_requested: bool,
    pub version: u64,
    /// The lease, on a job handed out by a reserve.
    pub lease: Option<String>,
    /// On an enqueue's answer: the idempotency key named an existing job.
    pub duplicate: bool,
    /// A workflow step's (or compensation's) inputs: step → its result
    /// (`None`: the step completed without one). Empty on other jobs.
    pub parents: BTreeMap<String, Option<Bytes>>,
}

impl Job {
    /// The payload parsed as JSON into `T`.
    pub fn payload_json<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_slice(&self.payload)
    }

    /// The result parsed as JSON into `T`; `None` without a result.
    pub fn result_json<T: DeserializeOwned>(&self) -> Option<Result<T, serde_json::Error>> {
        self.result.as_deref().map(serde_json::from_slice)
    }
}

/// The wire form of a job, turned into [`Job`] once read.
#[derive(Deserialize)]
struct JobWire {
    id: u64,
    #[serde(default)]
    queue: String,
    state: JobState,
    #[serde(default)]
    priority: u32,
    #[serde(default, deserialize_with = "present_raw")]
    payload: Option<Box<RawValue>>,
    payload_base64: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default)]
    attempts: u32,
    #[serde(default)]
    max_attempts: u32,
    backoff: Option<Backoff>,
    #[serde(default)]
    ttr_ms: u64,
    run_at: Option<String>,
    deadline_at: Option<String>,
    created_at: Option<String>,
    updated_at: Option<String>,
    finished_at: Option<String>,
    last_error: Option<String>,
    // `result: null` means no result, unlike `payload: null`.
    result: Option<Box<RawValue>>,
    result_base64: Option<String>,
    idempotency_key: Option<String>,
    #[serde(default)]
    cancel_requested: bool,
    #[serde(default)]
    version: u64,
    lease: Option<String>,
    #[serde(default)]
    duplicate: bool,
    #[serde(default)]
    parents: BTreeMap<String, Option<Box<RawValue>>>,
    #[serde(default)]
    parents_base64: BTreeMap<String, String>,
}

/// A `payload` of JSON `null` is still a payload (plain `Option` would
/// read it as absent).
fn present_raw<'de, D: Deserializer<'de>>(de: D) -> Result<Option<Box<RawValue>>, D::Error> {
    Box::<RawValue>::deserialize(de).map(Some)
}

pub(crate) fn stored_bytes(
    json: Option<Box<RawValue>>,
    encoded: Option<String>,
    name: &str,
) -> Result<Option<Bytes>, Error> {
    match (json, encoded) {
        (Some(raw), _) => Ok(Some(Bytes::from(String::from(Box::<str>::from(raw))))),
        (None, Some(text)) => base64::decode(&text)
            .map(|b| Some(Bytes::from(b)))
            .ok_or_else(|| Error::Protocol(format!("{name}_base64 is not base64"))),
        (None, None) => Ok(None),
    }
}

impl<'de> Deserialize<'de> for Job {
    fn deserialize<D: Deserializer<'de>>(de: D) -> Result<Job, D::Error> {
        let w = JobWire::deserialize(de)?;
        let payload = stored_bytes(w.payload, w.payload_base64, "payload")
            .map_err(serde::de::Error::custom)?
            .unwrap_or_default();
        let result = match w.result {
            Some(raw) if raw.get() == "null" => None,
            other => other,
        };
        let result =
            stored_bytes(result, w.result_base64, "result").map_err(serde::de::Error::custom)?;
        Ok(Job {
            id: w.id,
            queue: w.queue,
            state: w.state,
            priority: w.priority,
            payload,
            headers: w.headers,
            attempts: w.attempts,
            max_attempts: w.max_attempts,
            backoff: w.backoff,
            ttr_ms: w.ttr_ms,
            run_at: w.run_at,
            deadline_at: w.deadline_at,
            created_at: w.created_at,
            updated_at: w.updated_at,
            finished_at: w.finished_at,
            last_error: w.last_error,
            result,
            idempotency_key: w.idempotency_key,
            cancel_requested: w.cancel_requested,
            version: w.version,
            lease: w.lease,
            duplicate: w.duplicate,
            parents: crate::workflow::byte_map(w.parents, w.parents_base64)
                .map_err(serde::de::Error::custom)?,
        })
    }
}

/// Bytes as the API carries them: a JSON text as `<name>`, anything else as
/// `<name>_base64`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Body {
    /// Nothing (a result only: the job completes without one).
    #[default]
    None,
    /// A JSON text, sent and stored as given.
    Json(String),
    /// Opaque bytes, sent as base64.
    Bytes(Bytes),
}

impl Body {
    /// `value` serialised as JSON.
    pub fn json<T: Serialize + ?Sized>(value: &T) -> Result<Body, Error> {
        serde_json::to_string(value)
            .map(Body::Json)
            .map_err(|e| Error::Usage(format!("the value cannot be JSON: {e}")))
    }

    /// Bytes that travel as JSON when they are a JSON text (the server
    /// stores either form as the same bytes), else as base64.
    pub fn detect(bytes: impl Into<Bytes>) -> Body {
        let bytes = bytes.into();
        match std::str::from_utf8(&bytes)
            .ok()
            .filter(|text| serde_json::from_str::<&RawValue>(text).is_ok())
        {
            Some(text) => Body::Json(text.to_string()),
            None => Body::Bytes(bytes),
        }
    }

    /// Adds this body to `out` as `<name>` or `<name>_base64`.
    pub(crate) fn write_into(&self, name: &str, out: &mut JsonBody) -> Result<(), Error> {
        match self {
            Body::None => {}
            Body::Json(text) => {
                // Kept as the text given (the server stores it byte for
                // byte), only trimmed of surrounding whitespace.
                let raw = RawValue::from_string(text.clone())
                    .map_err(|e| Error::Usage(format!("{name} is not a JSON text: {e}")))?;
                out.raw.push((name.to_string(), raw));
            }
            Body::Bytes(bytes) => {
                out.fields
                    .insert(format!("{name}_base64"), base64::encode(bytes).into());
            }
        }
        Ok(())
    }
}

/// A request body: JSON fields plus JSON texts kept exactly as given (a
/// `serde_json::Value` would re-encode them, sorting their keys).
#[derive(Debug, Default)]
pub(crate) struct JsonBody {
    pub(crate) fields: serde_json::Map<String, serde_json::Value>,
    pub(crate) raw: Vec<(String, Box<RawValue>)>,
}

impl JsonBody {
    pub(crate) fn put(&mut self, key: &str, value: impl Into<serde_json::Value>) {
        self.fields.insert(key.to_string(), value.into());
    }
}

impl Serialize for JsonBody {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(self.fields.len() + self.raw.len()))?;
        for (key, value) in &self.fields {
            m.serialize_entry(key, value)?;
        }
        for (key, raw) in &self.raw {
            m.serialize_entry(key, raw)?;
        }
        m.end()
    }
}

impl From<serde_json::Value> for Body {
    fn from(value: serde_json::Value) -> Body {
        Body::Json(value.to_string())
    }
}

impl From<()> for Body {
    fn from(_: ()) -> Body {
        Body::None
    }
}

impl From<Bytes> for Body {
    fn from(bytes: Bytes) -> Body {
        Body::Bytes(bytes)
    }
}

impl From<Vec<u8>> for Body {
    fn from(bytes: Vec<u8>) -> Body {
        Body::Bytes(Bytes::from(bytes))
    }
}

impl From<String> for Body {
    /// A string result is sent as a JSON string.
    fn from(text: String) -> Body {
        Body::from(serde_json::Value::String(text))
    }
}

/// An enqueue body. Fields left unset take the queue's policy or the
/// server's defaults.
///
/// ```
/// use std::time::Duration;
/// use spool_client::Enqueue;
///
/// let job = Enqueue::json(&serde_json::json!({"order": 42}))?
///     .priority(10)
///     .delay(Duration::from_secs(30))
///     .max_attempts(5)
///     .header("trace", "abc")
///     .idempotency_key("order-42");
/// # Ok::<(), spool_client::Error>(())
/// ```
#[derive(Debug, Clone, Default)]
pub struct Enqueue {
    payload: Body,
    priority: Option<u32>,
    delay_ms: Option<u64>,
    run_at: Option<String>,
    ttr_ms: Option<u64>,
    max_attempts: Option<u32>,
    backoff: Option<Backoff>,
    headers: BTreeMap<String, String>,
    idempotency_key: Option<String>,
    idempotency_ttl_ms: Option<u64>,
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

impl Enqueue {
    /// A job whose payload is `value` as JSON.
    pub fn json<T: Serialize + ?Sized>(value: &T) -> Result<Enqueue, Error> {
        Ok(Enqueue::new(Body::json(value)?))
    }

    /// A job whose payload is these bytes.
    pub fn bytes(bytes: impl Into<Bytes>) -> Enqueue {
        Enqueue::new(Body::Bytes(bytes.into()))
    }

    /// A job with this payload ([`Body::None`] sends JSON `null`).
    pub fn new(payload: Body) -> Enqueue {
        let payload = match payload {
            Body::None => Body::Json("null".to_string()),
            other => other,
        };
        Enqueue {
            payload,
            ..Enqueue::default()
        }
    }

    pub fn priority(mut self, priority: u32) -> Enqueue {
        self.priority = Some(priority);
        self
    }

    /// Ready no sooner than this from now.
    pub fn delay(mut self, delay: Duration) -> Enqueue {
        self.delay_ms = Some(millis(delay));
        self.run_at = None;
        self
    }

    /// Ready no sooner than this RFC 3339 instant.
    pub fn run_at(mut self, instant: impl Into<String>) -> Enqueue {
        self.run_at = Some(instant.into());
        self.delay_ms = None;
        self
    }

    /// Time a worker has once it reserves the job, before the lease ends.
    pub fn ttr(mut self, ttr: Duration) -> Enqueue {
        self.ttr_ms = Some(millis(ttr));
        self
    }

    pub fn max_attempts(mut self, attempts: u32) -> Enqueue {
        self.max_attempts = Some(attempts);
        self
    }

    pub fn backoff(mut self, backoff: Backoff) -> Enqueue {
        self.backoff = Some(backoff);
        self
    }

    pub fn header(mut self, key: impl Into<String>, value: impl Into<String>) -> Enqueue {
        self.headers.insert(key.into(), value.into());
        self
    }

    /// A second enqueue with the same key (within its ttl) makes no job.
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Enqueue {
        self.idempotency_key = Some(key.into());
        self
    }

    pub fn idempotency_ttl(mut self, ttl: Duration) -> Enqueue {
        self.idempotency_ttl_ms = Some(millis(ttl));
        self
    }

    pub(crate) fn to_json(&self) -> Result<JsonBody, Error> {
        let mut body = JsonBody::default();
        self.payload.write_into("payload", &mut body)?;
        if let Some(v) = self.priority {
            body.put("priority", v);
        }
        if let Some(v) = self.delay_ms {
            body.put("delay_ms", v);
        }
        if let Some(v) = &self.run_at {
            body.put("run_at", v.clone());
        }
        if let Some(v) = self.ttr_ms {
            body.put("ttr_ms", v);
        }
        if let Some(v) = self.max_attempts {
            body.put("max_attempts", v);
        }
        if let Some(v) = self.backoff.and_then(|b| serde_json::to_value(b).ok()) {
            body.put("backoff", v);
        }
        if !self.headers.is_empty() {
            if let Ok(v) = serde_json::to_value(&self.headers) {
                body.put("headers", v);
            }
        }
        if let Some(v) = &self.idempotency_key {
            body.put("idempotency_key", v.clone());
        }
        if let Some(v) = self.idempotency_ttl_ms {
            body.put("idempotency_ttl_ms", v);
        }
        Ok(body)
    }
}

/// A change to a job that is not reserved or final (`PATCH /v1/jobs/{id}`).
#[derive(Debug, Clone, Default)]
pub struct JobChange {
    pub priority: Option<u32>,
    pub delay: Option<Duration>,
    pub run_at: Option<String>,
    pub payload: Option<Body>,
    pub headers: Option<BTreeMap<String, String>>,
    pub max_attempts: Option<u32>,
}

impl JobChange {
    pub(crate) fn to_json(&self) -> Result<JsonBody, Error> {
        let mut body = JsonBody::default();
        if let Some(payload) = &self.payload {
            payload.write_into("payload", &mut body)?;
        }
        let m = &mut body.fields;
        if let Some(p) = self.priority {
            m.insert("priority".into(), p.into());
        }
        if let Some(d) = self.delay {
            m.insert("delay_ms".into(), millis(d).into());
        }
        if let Some(r) = &self.run_at {
            m.insert("run_at".into(), r.clone().into());
        }
        if let Some(h) = &self.headers {
            if let Ok(v) = serde_json::to_value(h) {
                m.insert("headers".into(), v);
            }
        }
        if let Some(a) = self.max_attempts {
            m.insert("max_attempts".into(), a.into());
        }
        Ok(body)
    }
}

/// A failed attempt: the error and, optionally, how to retry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub error: String,
    /// Retry after this instead of the backoff.
    pub retry_in: Option<Duration>,
    /// Bury the job now, whatever attempts remain.
    pub permanent: bool,
}

impl Failure {
    pub fn new(error: impl Into<String>) -> Failure {
        Failure {
            error: error.into(),
            retry_in: None,
            permanent: false,
        }
    }

    pub(crate) fn to_json(&self, lease: &str) -> serde_json::Value {
        let mut m = serde_json::Map::new();
        m.insert("lease".into(), lease.into());
        m.insert("error".into(), self.error.clone().into());
        if let Some(d) = self.retry_in {
            m.insert("retry_in_ms".into(), millis(d).into());
        }
        if self.permanent {
            m.insert("permanent".into(), true.into());
        }
        serde_json::Value::Object(m)
    }
}

/// A queue's policy; `None` is the default. `PUT` replaces the whole
/// policy, so set every key wanted.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Policy {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_jobs: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<Backoff>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttr_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention_max_jobs: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_per_s: Option<f64>,
}

/// A queue: counts by state, pause, policy.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[non_exhaustive]
pub struct QueueInfo {
    pub name: String,
    #[serde(default)]
    pub counts: BTreeMap<String, u64>,
    #[serde(default)]
    pub paused: bool,
    pub paused_until: Option<String>,
    #[serde(default)]
    pub policy: Policy,
}

impl QueueInfo {
    /// Jobs in `state` (0 when the server did not count it).
    pub fn count(&self, state: JobState) -> u64 {
        self.counts.get(state.as_str()).copied().unwrap_or(0)
    }
}

/// A schedule as `PUT /v1/schedules/{name}` creates or replaces it: a cron
/// rule that enqueues `job` into `queue` at each due instant.
///
/// ```
/// use spool_client::{Enqueue, Schedule};
///
/// let nightly = Schedule::new("30 2 * * *", "reports", Enqueue::json(&"daily")?)
///     .timezone("Europe/Berlin")
///     .misfire("skip");
/// # Ok::<(), spool_client::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct Schedule {
    cron: String,
    queue: String,
    job: Enqueue,
    timezone: Option<String>,
    misfire: Option<String>,
    catch_up_max: Option<u32>,
    jitter_ms: Option<u64>,
    max_backlog: Option<u64>,
    paused: bool,
}

impl Schedule {
    /// `cron`: 5 fields, 6 with seconds first, `@every 10s`, `@hourly` …
    pub fn new(cron: impl Into<String>, queue: impl Into<String>, job: Enqueue) -> Schedule {
        Schedule {
            cron: cron.into(),
            queue: queue.into(),
            job,
            timezone: None,
            misfire: None,
            catch_up_max: None,
            jitter_ms: None,
            max_backlog: None,
            paused: false,
        }
    }

    /// An IANA time zone (the server's default: UTC).
    pub fn timezone(mut self, zone: impl Into<String>) -> Schedule {
        self.timezone = Some(zone.into());
        self
    }

    /// `skip`, `once` (the server's default) or `all`.
    pub fn misfire(mut self, policy: impl Into<String>) -> Schedule {
        self.misfire = Some(policy.into());
        self
    }

    pub fn catch_up_max(mut self, instants: u32) -> Schedule {
        self.catch_up_max = Some(instants);
        self
    }

    pub fn jitter(mut self, jitter: Duration) -> Schedule {
        self.jitter_ms = Some(millis(jitter));
        self
    }

    pub fn max_backlog(mut self, jobs: u64) -> Schedule {
        self.max_backlog = Some(jobs);
        self
    }

    pub fn paused(mut self, paused: bool) -> Schedule {
        self.paused = paused;
        self
    }

    pub(crate) fn to_json(&self) -> Result<JsonBody, Error> {
        let mut body = JsonBody::default();
        body.put("cron", self.cron.as_str());
        body.put("queue", self.queue.as_str());
        if let Some(v) = &self.timezone {
            body.put("timezone", v.as_str());
        }
        if let Some(v) = &self.misfire {
            body.put("misfire", v.as_str());
        }
        if let Some(v) = self.catch_up_max {
            body.put("catch_up_max", v);
        }
        if let Some(v) = self.jitter_ms {
            body.put("jitter_ms", v);
        }
        if let Some(v) = self.max_backlog {
            body.put("max_backlog", v);
        }
        body.put("paused", self.paused);
        // The job's JSON payload stays the text it was given.
        let job = serde_json::to_string(&self.job.to_json()?)
            .and_then(RawValue::from_string)
            .map_err(|e| Error::Usage(format!("cannot encode the job: {e}")))?;
        body.raw.push(("job".to_string(), job));
        Ok(body)
    }
}

/// A schedule as the server shows it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[non_exhaustive]
pub struct ScheduleInfo {
    pub name: String,
    pub cron: String,
    pub timezone: String,
    pub queue: String,
    /// The job template, as the server shows it.
    pub job: serde_json::Value,
    pub misfire: String,
    pub catch_up_max: u32,
    pub jitter_ms: u64,
    pub max_backlog: Option<u64>,
    pub paused: bool,
    /// RFC 3339; `None` while paused.
    pub next_fire_at: Option<String>,
    pub last_fire_at: Option<String>,
    pub last_job: Option<u64>,
    pub fires: u64,
    pub misfires_skipped: u64,
    pub backlog_skips: u64,
    pub last_skew_ms: Option<u64>,
    pub created_at: String,
    pub updated_at: String,
    pub version: u64,
}

/// One page of a listing; `next` is the `after` of the next page.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[non_exhaustive]
pub struct JobPage {
    pub jobs: Vec<Job>,
    pub next: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(json: &str) -> Job {
        serde_json::from_str(json).expect("a job")
    }

    #[test]
    fn a_job_reads_payloads_and_results_either_way() {
        let j = job(
            r#"{"id":1,"state":"ready","payload":{"b":1,"a":[1,2]},"result":null,"future_field":7}"#,
        );
        assert_eq!(&j.payload[..], br#"{"b":1,"a":[1,2]}"#);
        assert_eq!(j.result, None);
        let j = job(r#"{"id":2,"state":"completed","payload":null,"result_base64":"AP8="}"#);
        assert_eq!(&j.payload[..], b"null");
        assert_eq!(j.result.as_deref(), Some(&[0u8, 255][..]));
        let j = job(r#"{"id":3,"state":"zombie","payload_base64":"aGk="}"#);
        assert_eq!((j.state, &j.payload[..]), (JobState::Unknown, &b"hi"[..]));
        assert!(
            serde_json::from_str::<Job>(r#"{"id":4,"state":"ready","payload_base64":"!"}"#)
                .is_err()
        );
    }

    #[test]
    fn an_enqueue_body_sends_only_what_was_set_and_json_as_given() {
        let body = Enqueue::new(Body::Json(" {\"z\":1, \"a\":2}\n".into()))
            .priority(3)
            .delay(Duration::from_millis(1500))
            .run_at("2026-12-04T10:00:00Z")
            .to_json()
            .expect("a body");
        let text = serde_json::to_string(&body).expect("json");
        assert_eq!(
            text,
            r#"{"priority":3,"run_at":"2026-12-04T10:00:00Z","payload":{"z":1, "a":2}}"#
        );
        let bytes = serde_json::to_string(&Enqueue::bytes(vec![1u8, 2]).to_json().expect("a body"))
            .expect("json");
        assert_eq!(bytes, r#"{"payload_base64":"AQI="}"#);
        assert!(Enqueue::new(Body::Json("{nope".into())).to_json().is_err());
        assert_eq!(
            Body::detect(&b"[1, 2]\n"[..]),
            Body::Json("[1, 2]\n".into())
        );
        assert_eq!(
            Body::detect(&b"plain"[..]),
            Body::Bytes(Bytes::from_static(b"plain"))
        );
    }
}
