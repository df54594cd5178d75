//! [`Client`]: one typed async method per `/v1` operation, over hyper's
//! pooled HTTP/1 client (connections are kept alive and reused; a clone of
//! the client shares the pool). Every request is bounded in time: a long
//! poll by its own wait plus [`Client::request_timeout`].

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{header, Method, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;

use crate::error::{Error, ErrorCode};
use crate::types::{
    Body, Enqueue, Failure, Job, JobChange, JobPage, JobState, JsonBody, Policy, QueueInfo,
    Schedule, ScheduleInfo,
};
use crate::workflow::{NewWorkflow, Workflow, WorkflowPage, WorkflowState};

/// Default bound on one request (besides a long poll's own wait): above the
/// server's 10 s handler timeout, so a slow server's 503, which says why,
/// arrives before the client gives up.
pub const REQUEST_TIMEOUT_DEFAULT: Duration = Duration::from_secs(15);

/// The longest `?wait_ms` or reserve `timeout_ms` the server takes in one
/// request (its `JOB_WAIT_MAX` and `RESERVE_WAIT_MAX`); longer waits are
/// several requests.
pub const LONG_POLL_MAX: Duration = Duration::from_secs(30);

/// Largest answer read by default: a listing page or batch of large jobs is
/// a few MiB; anything far past that is not the API talking.
pub const RESPONSE_MAX_BYTES_DEFAULT: usize = 64 << 20;

/// How long an idle pooled connection is kept: half the server's idle
/// close (its 10 s header read timeout), so the client does not pick a
/// connection in the instant the server closes it (a request lost that
/// way may or may not have been applied).
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(5);

/// A client of one spool server's HTTP listener. Cheap to clone.
///
/// ```no_run
/// use spool_client::{Client, Enqueue};
///
/// # async fn demo() -> Result<(), spool_client::Error> {
/// let client = Client::new("127.0.0.1:11301")?;
/// let job = client.enqueue("emails", &Enqueue::json(&serde_json::json!({"to": "a@b.c"}))?).await?;
/// let done = client.wait(job.id, std::time::Duration::from_secs(30)).await?;
/// println!("job {} is {:?}", done.id, done.state);
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    http: hyper_util::client::legacy::Client<HttpConnector, Full<Bytes>>,
    /// `host:port`.
    authority: String,
    token: Option<String>,
    request_timeout: Duration,
    response_max_bytes: usize,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("authority", &self.authority)
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .field("request_timeout", &self.request_timeout)
            .finish()
    }
}

/// Builds a [`Client`] with a token or another timeout.
#[derive(Debug, Clone)]
pub struct ClientBuilder {
    addr: String,
    token: Option<String>,
    request_timeout: Duration,
    response_max_bytes: usize,
}

impl ClientBuilder {
    /// `Authorization: Bearer <token>`, for a server with `SPOOL_AUTH_TOKEN`.
    pub fn token(mut self, token: impl Into<String>) -> ClientBuilder {
        self.token = Some(token.into());
        self
    }

    /// Bound on one request, connecting included (a long poll gets its wait
    /// on top).
    pub fn request_timeout(mut self, timeout: Duration) -> ClientBuilder {
        self.request_timeout = timeout;
        self
    }

    /// Largest answer read; a longer one is an [`Error::Connect`].
    pub fn response_max_bytes(mut self, bytes: usize) -> ClientBuilder {
        self.response_max_bytes = bytes;
        self
    }

    pub fn build(self) -> Result<Client, Error> {
        let authority = self
            .addr
            .strip_prefix("http://")
            .unwrap_or(&self.addr)
            .trim_end_matches('/')
            .to_string();
        if authority.is_empty() || authority.contains('/') || !authority.contains(':') {
            return Err(Error::Usage(format!(
                "{:?} is not a server address: give HOST:PORT",
                self.addr
            )));
        }
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(self.request_timeout));
        let http = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .build(connector);
        Ok(Client {
            inner: Arc::new(Inner {
                http,
                authority,
                token: self.token,
                request_timeout: self.request_timeout,
                response_max_bytes: self.response_max_bytes,
            }),
        })
    }
}

/// An answer's status and body, for callers of [`Client::request`].
#[derive(Debug, Clone)]
pub struct RawResponse {
    pub status: u16,
    pub body: Bytes,
}

#[derive(Deserialize)]
struct Jobs {
    jobs: Vec<Job>,
}

#[derive(serde::Serialize)]
struct Batch {
    jobs: Vec<JsonBody>,
}

#[derive(Deserialize)]
struct Queues {
    queues: Vec<QueueInfo>,
}

#[derive(Deserialize)]
struct Deleted {
    deleted: u64,
}

/// `POST /v1/jobs/complete`'s answer: each completion's outcome in order.
#[derive(Deserialize)]
struct CompletedList {
    jobs: Vec<Completed>,
}

#[derive(Deserialize)]
struct Completed {
    status: u16,
    #[serde(default)]
    version: Option<u64>,
    #[serde(default)]
    error: Option<Value>,
}

impl Completed {
    /// The job's new version, or the error a single complete would have
    /// answered.
    fn outcome(self) -> Result<u64, Error> {
        if self.status == StatusCode::OK.as_u16() {
            return Ok(self.version.unwrap_or_default());
        }
        let text = |key: &str| {
            self.error
                .as_ref()
                .and_then(|e| e.get(key))
                .and_then(Value::as_str)
                .map(str::to_string)
        };
        Err(Error::Api {
            status: self.status,
            code: text("code")
                .map(|code| ErrorCode::parse(&code))
                .unwrap_or_else(|| ErrorCode::Other(format!("http_{}", self.status))),
            message: text("message").unwrap_or_default(),
            field: text("field"),
        })
    }
}

/// Most completions one [`Client::complete_many`] carries: the server's
/// bound, which is what one reserve may hand out.
pub const COMPLETE_MANY_MAX: usize = 1_000;

#[derive(Deserialize)]
struct Deadline {
    deadline_at: String,
}

/// `text` percent-encoded for one path segment or query value: a queue
/// name may hold `/`, `+`, `;`, `$` and parentheses.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// A request body as JSON bytes.
fn encode(body: &impl serde::Serialize) -> Result<Bytes, Error> {
    serde_json::to_vec(body)
        .map(Bytes::from)
        .map_err(|e| Error::Usage(format!("cannot encode the request: {e}")))
}

fn lease_body(lease: &str) -> Result<Bytes, Error> {
    encode(&serde_json::json!({ "lease": lease }))
}

impl Client {
    /// A client of the server whose HTTP listener is at `addr`
    /// (`HOST:PORT`, or `http://HOST:PORT`).
    pub fn new(addr: impl Into<String>) -> Result<Client, Error> {
        Client::builder(addr).build()
    }

    pub fn builder(addr: impl Into<String>) -> ClientBuilder {
        ClientBuilder {
            addr: addr.into(),
            token: None,
            request_timeout: REQUEST_TIMEOUT_DEFAULT,
            response_max_bytes: RESPONSE_MAX_BYTES_DEFAULT,
        }
    }

    /// The server's `host:port`.
    pub fn addr(&self) -> &str {
        &self.inner.authority
    }

    /// The bound on one request besides a long poll's wait.
    pub fn request_timeout(&self) -> Duration {
        self.inner.request_timeout
    }

    /// Sends one request and returns the answer whatever its status, for
    /// endpoints this client has no method for (`/admin/*`, `/metrics`).
    /// `extra_wait` is added to the request's time bound.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
        extra_wait: Duration,
    ) -> Result<RawResponse, Error> {
        self.send(method, path, body, extra_wait, None).await
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
        extra_wait: Duration,
        if_match: Option<u64>,
    ) -> Result<RawResponse, Error> {
        let inner = &self.inner;
        let limit = inner.request_timeout.saturating_add(extra_wait);
        let uri = format!("http://{}{path}", inner.authority);
        let mut request = hyper::Request::builder()
            .method(method)
            .uri(uri)
            .header(header::ACCEPT, "application/json");
        if body.is_some() {
            request = request.header(header::CONTENT_TYPE, "application/json");
        }
        if let Some(token) = &inner.token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        if let Some(version) = if_match {
            request = request.header(header::IF_MATCH, format!("\"{version}\""));
        }
        let request = request
            .body(Full::new(body.unwrap_or_default()))
            .map_err(|e| Error::Usage(format!("cannot build a request for {path:?}: {e}")))?;
        let exchange = async {
            let response = inner.http.request(request).await.map_err(|e| {
                // The error's source chain says what failed (refused, reset).
                let mut message = e.to_string();
                let mut source = std::error::Error::source(&e);
                while let Some(cause) = source {
                    message.push_str(": ");
                    message.push_str(&cause.to_string());
                    source = cause.source();
                }
                Error::Connect {
                    addr: inner.authority.clone(),
                    message,
                }
            })?;
            let status = response.status();
            let body = Limited::new(response.into_body(), inner.response_max_bytes)
                .collect()
                .await
                .map_err(|e| Error::Connect {
                    addr: inner.authority.clone(),
                    message: format!("reading the answer: {e}"),
                })?
                .to_bytes();
            Ok(RawResponse {
                status: status.as_u16(),
                body,
            })
        };
        tokio::time::timeout(limit, exchange)
            .await
            .map_err(|_| Error::Timeout { after: limit })?
    }

    /// One API call: a success's body parsed as `T`, a refusal as
    /// [`Error::Api`].
    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
        extra_wait: Duration,
    ) -> Result<T, Error> {
        self.call_with(method, path, body, extra_wait, None).await
    }

    async fn call_with<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
        extra_wait: Duration,
        if_match: Option<u64>,
    ) -> Result<T, Error> {
        let answer = self.send(method, path, body, extra_wait, if_match).await?;
        let status = StatusCode::from_u16(answer.status)
            .map_err(|_| Error::Protocol(format!("status {}", answer.status)))?;
        if status.is_success() {
            let bytes: &[u8] = if answer.body.is_empty() {
                b"null"
            } else {
                &answer.body
            };
            return serde_json::from_slice(bytes).map_err(|e| {
                Error::Protocol(format!(
                    "{path}: {status} with a body that is not the API's: {e}"
                ))
            });
        }
        Err(api_error(status, &answer.body))
    }

    // ---- jobs ---------------------------------------------------------

    /// Enqueues a job; with a duplicate idempotency key, the existing job
    /// (with `duplicate` set).
    pub async fn enqueue(&self, queue: &str, job: &Enqueue) -> Result<Job, Error> {
        let path = format!("/v1/queues/{}/jobs", escape(queue));
        self.call(
            Method::POST,
            &path,
            Some(encode(&job.to_json()?)?),
            Duration::ZERO,
        )
        .await
    }

    /// Enqueues a job and waits up to `wait` (at most [`LONG_POLL_MAX`]) for
    /// it to be completed, cancelled or buried; answers the job as it is
    /// then (check its `state`).
    pub async fn enqueue_and_wait(
        &self,
        queue: &str,
        job: &Enqueue,
        wait: Duration,
    ) -> Result<Job, Error> {
        let wait = wait.min(LONG_POLL_MAX);
        let path = format!("/v1/queues/{}/jobs?wait_ms={}", escape(queue), millis(wait));
        self.call(Method::POST, &path, Some(encode(&job.to_json()?)?), wait)
            .await
    }

    /// Enqueues every job or none.
    pub async fn enqueue_batch(&self, queue: &str, jobs: &[Enqueue]) -> Result<Vec<Job>, Error> {
        let path = format!("/v1/queues/{}/jobs/batch", escape(queue));
        let jobs = jobs
            .iter()
            .map(Enqueue::to_json)
            .collect::<Result<Vec<_>, _>>()?;
        let body = encode(&Batch { jobs })?;
        let answer: Jobs = self
            .call(Method::POST, &path, Some(body), Duration::ZERO)
            .await?;
        Ok(answer.jobs)
    }

    pub async fn get(&self, id: u64) -> Result<Job, Error> {
        self.call(Method::GET, &format!("/v1/jobs/{id}"), None, Duration::ZERO)
            .await
    }

    /// Waits up to `wait` for the job to be completed, cancelled or buried
    /// (long polls of at most [`LONG_POLL_MAX`] each); answers the job as it
    /// is then.
    pub async fn wait(&self, id: u64, wait: Duration) -> Result<Job, Error> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let slice = deadline
                .saturating_duration_since(tokio::time::Instant::now())
                .min(LONG_POLL_MAX);
            let path = format!("/v1/jobs/{id}?wait_ms={}", millis(slice));
            let job: Job = self.call(Method::GET, &path, None, slice).await?;
            if job.state.is_settled() || slice.is_zero() {
                return Ok(job);
            }
        }
    }

    /// Changes a job that is not reserved or final; with `if_version`, only
    /// if it is still at that version (else [`ErrorCode::VersionMismatch`]).
    pub async fn update(
        &self,
        id: u64,
        change: &JobChange,
        if_version: Option<u64>,
    ) -> Result<Job, Error> {
        let path = format!("/v1/jobs/{id}");
        match if_version {
            None => {
                self.call(
                    Method::PATCH,
                    &path,
                    Some(encode(&change.to_json()?)?),
                    Duration::ZERO,
                )
                .await
            }
            Some(version) => {
                self.call_with(
                    Method::PATCH,
                    &path,
                    Some(encode(&change.to_json()?)?),
                    Duration::ZERO,
                    Some(version),
                )
                .await
            }
        }
    }

    /// Removes a job that is not reserved (a reserved one: cancel it).
    pub async fn delete(&self, id: u64) -> Result<(), Error> {
        let _: Value = self
            .call(
                Method::DELETE,
                &format!("/v1/jobs/{id}"),
                None,
                Duration::ZERO,
            )
            .await?;
        Ok(())
    }

    /// Makes the job final at once; a worker holding it learns at its next
    /// heartbeat, complete or fail.
    pub async fn cancel(&self, id: u64) -> Result<Job, Error> {
        self.call(
            Method::POST,
            &format!("/v1/jobs/{id}/cancel"),
            None,
            Duration::ZERO,
        )
        .await
    }

    /// A buried or delayed job → ready.
    pub async fn kick(&self, id: u64) -> Result<Job, Error> {
        self.call(
            Method::POST,
            &format!("/v1/jobs/{id}/kick"),
            None,
            Duration::ZERO,
        )
        .await
    }

    /// Buries a job; a reserved one needs its lease.
    pub async fn bury(
        &self,
        id: u64,
        lease: Option<&str>,
        reason: Option<&str>,
    ) -> Result<Job, Error> {
        let mut body = serde_json::Map::new();
        if let Some(lease) = lease {
            body.insert("lease".into(), lease.into());
        }
        if let Some(reason) = reason {
            body.insert("reason".into(), reason.into());
        }
        self.call(
            Method::POST,
            &format!("/v1/jobs/{id}/bury"),
            Some(encode(&body)?),
            Duration::ZERO,
        )
        .await
    }

    // ---- leases ---------------------------------------------------------

    /// Reserves up to `batch` jobs from the first of `queues` that has them,
    /// waiting up to `timeout` (at most [`LONG_POLL_MAX`]) for one; an empty
    /// list when none came. Each job carries its `lease`.
    pub async fn reserve(
        &self,
        queues: &[impl AsRef<str>],
        batch: u32,
        timeout: Duration,
    ) -> Result<Vec<Job>, Error> {
        let timeout = timeout.min(LONG_POLL_MAX);
        let body = serde_json::json!({
            "queues": queues.iter().map(AsRef::as_ref).collect::<Vec<&str>>(),
            "timeout_ms": millis(timeout),
            "batch": batch,
        });
        let answer: Jobs = self
            .call(Method::POST, "/v1/reserve", Some(encode(&body)?), timeout)
            .await?;
        Ok(answer.jobs)
    }

    /// Starts the job's TTR again; answers the new deadline (RFC 3339).
    /// [`ErrorCode::Cancelled`] when the job was cancelled.
    pub async fn heartbeat(&self, id: u64, lease: &str) -> Result<String, Error> {
        let answer: Deadline = self
            .call(
                Method::POST,
                &format!("/v1/jobs/{id}/heartbeat"),
                Some(lease_body(lease)?),
                Duration::ZERO,
            )
            .await?;
        Ok(answer.deadline_at)
    }

    /// Completes the job with a result ([`Body::None`] for none).
    pub async fn complete(&self, id: u64, lease: &str, result: &Body) -> Result<Job, Error> {
        let mut body = JsonBody::default();
        body.put("lease", lease);
        result.write_into("result", &mut body)?;
        self.call(
            Method::POST,
            &format!("/v1/jobs/{id}/complete"),
            Some(encode(&body)?),
            Duration::ZERO,
        )
        .await
    }

    /// Completes several leased jobs in one request
    /// (`POST /v1/jobs/complete`), each `(lease, result)`; at most
    /// [`COMPLETE_MANY_MAX`]. Each answer, in order, is the job's new
    /// version or the error [`Client::complete`] would have returned for
    /// it: one refused completion does not hold back the others. The
    /// request's own failure (the server away, a server older than the
    /// endpoint: 404 or 405) is the outer error.
    pub async fn complete_many(
        &self,
        jobs: &[(&str, &Body)],
    ) -> Result<Vec<Result<u64, Error>>, Error> {
        if jobs.len() > COMPLETE_MANY_MAX {
            return Err(Error::Usage(format!(
                "at most {COMPLETE_MANY_MAX} completions a request, not {}",
                jobs.len()
            )));
        }
        #[derive(serde::Serialize)]
        struct Completions {
            jobs: Vec<JsonBody>,
        }
        let mut body = Completions {
            jobs: Vec::with_capacity(jobs.len()),
        };
        for (lease, result) in jobs {
            let mut job = JsonBody::default();
            job.put("lease", *lease);
            result.write_into("result", &mut job)?;
            body.jobs.push(job);
        }
        let answer: CompletedList = self
            .call(
                Method::POST,
                "/v1/jobs/complete",
                Some(encode(&body)?),
                Duration::ZERO,
            )
            .await?;
        if answer.jobs.len() != jobs.len() {
            return Err(Error::Protocol(format!(
                "/v1/jobs/complete answered {} of {} completions",
                answer.jobs.len(),
                jobs.len()
            )));
        }
        Ok(answer.jobs.into_iter().map(Completed::outcome).collect())
    }

    /// Fails this attempt: the job retries by its backoff while attempts
    /// remain, else is buried.
    pub async fn fail(&self, id: u64, lease: &str, failure: &Failure) -> Result<Job, Error> {
        self.call(
            Method::POST,
            &format!("/v1/jobs/{id}/fail"),
            Some(encode(&failure.to_json(lease))?),
            Duration::ZERO,
        )
        .await
    }

    /// Hands the job back (ready, or delayed by `delay`), not counted as an
    /// attempt.
    pub async fn release(
        &self,
        id: u64,
        lease: &str,
        delay: Option<Duration>,
        priority: Option<u32>,
    ) -> Result<Job, Error> {
        let mut body = serde_json::Map::new();
        body.insert("lease".into(), lease.into());
        if let Some(delay) = delay {
            body.insert("delay_ms".into(), millis(delay).into());
        }
        if let Some(priority) = priority {
            body.insert("priority".into(), priority.into());
        }
        self.call(
            Method::POST,
            &format!("/v1/jobs/{id}/release"),
            Some(encode(&body)?),
            Duration::ZERO,
        )
        .await
    }

    // ---- queues ---------------------------------------------------------

    pub async fn queues(&self) -> Result<Vec<QueueInfo>, Error> {
        let answer: Queues = self
            .call(Method::GET, "/v1/queues", None, Duration::ZERO)
            .await?;
        Ok(answer.queues)
    }

    pub async fn queue(&self, queue: &str) -> Result<QueueInfo, Error> {
        self.call(
            Method::GET,
            &format!("/v1/queues/{}", escape(queue)),
            None,
            Duration::ZERO,
        )
        .await
    }

    /// Starts a workflow; with a live idempotency key, the existing one
    /// (with `duplicate` set).
    pub async fn start_workflow(&self, workflow: &NewWorkflow) -> Result<Workflow, Error> {
        let body = encode(&workflow.to_json()?)?;
        self.call(Method::POST, "/v1/workflows", Some(body), Duration::ZERO)
            .await
    }

    pub async fn workflow(&self, id: u64) -> Result<Workflow, Error> {
        let path = format!("/v1/workflows/{id}");
        self.call(Method::GET, &path, None, Duration::ZERO).await
    }

    /// One page of workflows (in `state`, if given), after workflow `after`.
    pub async fn workflows(
        &self,
        state: Option<WorkflowState>,
        limit: Option<u32>,
        after: Option<u64>,
    ) -> Result<WorkflowPage, Error> {
        let mut query = Vec::new();
        if let Some(state) = state {
            query.push(format!("state={}", state.as_str()));
        }
        if let Some(limit) = limit {
            query.push(format!("limit={limit}"));
        }
        if let Some(after) = after {
            query.push(format!("after={after}"));
        }
        let mut path = "/v1/workflows".to_string();
        if !query.is_empty() {
            path.push('?');
            path.push_str(&query.join("&"));
        }
        self.call(Method::GET, &path, None, Duration::ZERO).await
    }

    /// Cancels a workflow: no new step starts, running ones are cancelled
    /// and completed ones compensated.
    pub async fn cancel_workflow(&self, id: u64) -> Result<Workflow, Error> {
        let path = format!("/v1/workflows/{id}/cancel");
        self.call(Method::POST, &path, None, Duration::ZERO).await
    }

    /// One page of the queue's jobs in `state`, after job id `after`.
    pub async fn list(
        &self,
        queue: &str,
        state: JobState,
        limit: Option<u32>,
        after: Option<u64>,
    ) -> Result<JobPage, Error> {
        let mut path = format!("/v1/queues/{}/jobs?state={}", escape(queue), state.as_str());
        if let Some(limit) = limit {
            path.push_str(&format!("&limit={limit}"));
        }
        if let Some(after) = after {
            path.push_str(&format!("&after={after}"));
        }
        self.call(Method::GET, &path, None, Duration::ZERO).await
    }

    /// Deletes the queue's jobs in `state` (buried, ready or delayed);
    /// answers how many.
    pub async fn purge(&self, queue: &str, state: JobState) -> Result<u64, Error> {
        let path = format!("/v1/queues/{}/jobs?state={}", escape(queue), state.as_str());
        let answer: Deleted = self
            .call(Method::DELETE, &path, None, Duration::ZERO)
            .await?;
        Ok(answer.deleted)
    }

    /// Replaces the queue's policy.
    pub async fn set_policy(&self, queue: &str, policy: &Policy) -> Result<QueueInfo, Error> {
        self.call(
            Method::PUT,
            &format!("/v1/queues/{}/policy", escape(queue)),
            Some(encode(policy)?),
            Duration::ZERO,
        )
        .await
    }

    /// Stops handing out the queue's jobs, for `duration` or until resumed.
    pub async fn pause(&self, queue: &str, duration: Option<Duration>) -> Result<QueueInfo, Error> {
        let body = match duration {
            Some(d) => serde_json::json!({ "duration_ms": millis(d) }),
            None => serde_json::json!({}),
        };
        self.call(
            Method::POST,
            &format!("/v1/queues/{}/pause", escape(queue)),
            Some(encode(&body)?),
            Duration::ZERO,
        )
        .await
    }

    pub async fn resume(&self, queue: &str) -> Result<QueueInfo, Error> {
        self.call(
            Method::POST,
            &format!("/v1/queues/{}/resume", escape(queue)),
            None,
            Duration::ZERO,
        )
        .await
    }
}

impl Client {
    // ---- schedules ------------------------------------------------------

    /// Creates or replaces the schedule `name`.
    pub async fn put_schedule(
        &self,
        name: &str,
        schedule: &Schedule,
    ) -> Result<ScheduleInfo, Error> {
        self.call(
            Method::PUT,
            &format!("/v1/schedules/{}", escape(name)),
            Some(encode(&schedule.to_json()?)?),
            Duration::ZERO,
        )
        .await
    }

    pub async fn schedules(&self) -> Result<Vec<ScheduleInfo>, Error> {
        let answer: Schedules = self
            .call(Method::GET, "/v1/schedules", None, Duration::ZERO)
            .await?;
        Ok(answer.schedules)
    }

    pub async fn schedule(&self, name: &str) -> Result<ScheduleInfo, Error> {
        self.call(
            Method::GET,
            &format!("/v1/schedules/{}", escape(name)),
            None,
            Duration::ZERO,
        )
        .await
    }

    /// Deletes the schedule; the jobs it fired stay.
    pub async fn delete_schedule(&self, name: &str) -> Result<(), Error> {
        let _: Value = self
            .call(
                Method::DELETE,
                &format!("/v1/schedules/{}", escape(name)),
                None,
                Duration::ZERO,
            )
            .await?;
        Ok(())
    }

    pub async fn pause_schedule(&self, name: &str) -> Result<ScheduleInfo, Error> {
        self.schedule_action(name, "pause").await
    }

    pub async fn resume_schedule(&self, name: &str) -> Result<ScheduleInfo, Error> {
        self.schedule_action(name, "resume").await
    }

    /// Fires the schedule now; its job is `last_job` of the answer.
    pub async fn trigger_schedule(&self, name: &str) -> Result<ScheduleInfo, Error> {
        self.schedule_action(name, "trigger").await
    }

    async fn schedule_action(&self, name: &str, action: &str) -> Result<ScheduleInfo, Error> {
        self.call(
            Method::POST,
            &format!("/v1/schedules/{}/{action}", escape(name)),
            None,
            Duration::ZERO,
        )
        .await
    }
}

#[derive(Deserialize)]
struct Schedules {
    schedules: Vec<ScheduleInfo>,
}

/// A refusal's status and `{"error": {...}}`; a body that is not the API's
/// still becomes an error naming the status.
fn api_error(status: StatusCode, body: &[u8]) -> Error {
    let value: Option<Value> = serde_json::from_slice(body).ok();
    let text = |key: &str| {
        value
            .as_ref()
            .and_then(|v| v.pointer(&format!("/error/{key}")))
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    let code = match text("code") {
        Some(code) => ErrorCode::parse(&code),
        None if status == StatusCode::UNAUTHORIZED => ErrorCode::Unauthorized,
        None => ErrorCode::Other(format!("http_{}", status.as_u16())),
    };
    let message = text("message").unwrap_or_else(|| {
        let snippet = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
        format!("{status} without the API's error body: {snippet:?}")
    });
    Error::Api {
        status: status.as_u16(),
        code,
        message,
        field: text("field"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_keeps_unreserved_and_encodes_the_rest() {
        assert_eq!(escape("orders-1.x_~"), "orders-1.x_~");
        assert_eq!(escape("a/b+c;$()"), "a%2Fb%2Bc%3B%24%28%29");
    }

    #[test]
    fn refusals_keep_code_message_and_field() {
        let error = api_error(
            StatusCode::CONFLICT,
            br#"{"error":{"code":"cancelled","message":"the job was cancelled"}}"#,
        );
        assert!(error.is_cancelled());
        let error = api_error(
            StatusCode::BAD_REQUEST,
            br#"{"error":{"code":"invalid","message":"m","field":"priority"}}"#,
        );
        assert_eq!(
            error,
            Error::Api {
                status: 400,
                code: ErrorCode::Invalid,
                message: "m".into(),
                field: Some("priority".into())
            }
        );
        let error = api_error(StatusCode::BAD_GATEWAY, b"<html>");
        assert!(error.is_transient());
        assert_eq!(error.code(), Some(&ErrorCode::Other("http_502".into())));
    }

    #[test]
    fn addresses_must_be_host_and_port() {
        assert!(Client::new("127.0.0.1:11301").is_ok());
        assert!(Client::new("http://127.0.0.1:11301/").is_ok());
        assert!(matches!(Client::new("localhost"), Err(Error::Usage(_))));
        assert!(matches!(
            Client::new("127.0.0.1:1/v1"),
            Err(Error::Usage(_))
        ));
    }
}
