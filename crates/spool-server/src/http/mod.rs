//! The HTTP listener: probes (`/livez`, `/healthz`, `/readyz`),
//! Prometheus metrics (`/metrics`), the admin endpoints (`/admin/stats`,
//! `/admin/connections`, `/admin/log-level`) and the job API (`/v1/*`,
//! API.md; see `jobs.rs`), on a listener of its own.
//!
//! The listener starts before the write-ahead log is recovered, which can
//! take seconds: liveness answers at once, readiness says `recovering`, and
//! the broker is handed over with [`HttpState::set_broker`] once it exists.
//!
//! Connections are served by hyper's HTTP/1 server directly rather than
//! `axum::serve`, because the operating surface must hold its own against
//! slow or hostile clients, and `axum::serve` has no timeouts:
//! - hyper enforces the header read timeout. In hyper 1.x that timer starts
//!   whenever the connection waits for a request head, also between
//!   keep-alive requests, so it is the idle keep-alive timeout as well
//!   (hyper has no separate one). The metered stream notes whether any byte
//!   arrived since the last answer, which tells the two apart: a timeout
//!   with none closes an idle connection (`idle_timeout`, what every
//!   kept-alive scraper meets), one with some a stalled request
//!   (`request_timeout`, a slowloris);
//! - a request body must arrive within [`BODY_READ_TIMEOUT`] and fit in
//!   its bound (collected here, before routing): [`REQUEST_BODY_MAX_BYTES`]
//!   for admin, one job's worth for `/v1` ([`job_body_max_bytes`], from the
//!   max job size), more for a batch ([`batch_body_max_bytes`]);
//! - a handler must answer within [`HANDLER_TIMEOUT`]; a long-polling
//!   reserve within that plus [`RESERVE_WAIT_MAX`], the longest wait it
//!   may ask for;
//! - a response the client does not read is abandoned, and the connection
//!   closed, after [`WRITE_STALL_TIMEOUT`] without progress.
//!
//! Every accepted connection is registered in the [`Connections`] registry
//! with protocol `http`, so the connection metrics and `/admin/connections`
//! cover both front doors, and refusals (connection or fd limits) are
//! counted there.

mod admin;
/// Public for the CLI, which sends and shows job payloads the same way.
pub mod encoding;
pub mod exposition;
mod jobs;
mod metrics;
mod openapi;
mod schedules;
mod workflows;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use utoipa::ToSchema;

use crate::connections::{CloseReason, ConnHandle, ConnState, Connections, Protocol};
use crate::durable::SharedStorageStats;
use spool_broker::Broker;

pub use crate::limits::{
    batch_body_max_bytes, job_body_max_bytes, BODY_READ_TIMEOUT, DEFAULT_HTTP_LISTEN,
    HANDLER_TIMEOUT, HEADER_READ_TIMEOUT, JOB_WAIT_MAX, OVERSIZED_BODY_DRAIN_MAX_BYTES,
    REQUEST_BODY_MAX_BYTES, REQUEST_HEAD_MAX_BYTES, RESERVE_WAIT_MAX, SHUTDOWN_DRAIN_TIMEOUT,
    WRITE_STALL_TIMEOUT,
};
use crate::limits::{ACCEPT_ERROR_BACKOFF, HTTP_LISTEN_BACKLOG, HTTP_STALL_CHECK_INTERVAL};

/// The timeouts and size limits of the HTTP server. [`Default`] gives the
/// named constants; tests shorten them.
#[derive(Debug, Clone)]
pub struct HttpLimits {
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
    pub handler_timeout: Duration,
    pub write_stall_timeout: Duration,
    pub body_max_bytes: usize,
    pub shutdown_drain_timeout: Duration,
}

impl Default for HttpLimits {
    fn default() -> HttpLimits {
        HttpLimits {
            header_read_timeout: HEADER_READ_TIMEOUT,
            body_read_timeout: BODY_READ_TIMEOUT,
            handler_timeout: HANDLER_TIMEOUT,
            write_stall_timeout: WRITE_STALL_TIMEOUT,
            body_max_bytes: REQUEST_BODY_MAX_BYTES,
            shutdown_drain_timeout: SHUTDOWN_DRAIN_TIMEOUT,
        }
    }
}

/// Applies a log filter directive at runtime: `Ok(the filter now in
/// force)` or `Err(why the directive is bad)`. The binary implements it
/// with a tracing-subscriber reload handle.
pub type LogFilterSetter = Arc<dyn Fn(&str) -> Result<String, String> + Send + Sync>;

/// The log filter in force now, as whatever applies it knows it. Asked on
/// every `GET /admin/log-level` rather than cached here, so that answers
/// cannot disagree with the filter in force after concurrent changes.
pub type LogFilterGetter = Arc<dyn Fn() -> String + Send + Sync>;

/// Writes metric families only the binary knows (a database pool's
/// figures), as Prometheus text appended to `/metrics`.
pub type ExtraMetrics = Arc<dyn Fn() -> String + Send + Sync>;

/// What the binary hands the HTTP server at start.
pub struct HttpSettings {
    /// Shown in `/admin/stats` and `spool_build_info`.
    pub version: String,
    /// When set, `/admin/*` and `/v1/*` need `Authorization: Bearer <token>`.
    pub auth_token: Option<String>,
    /// Reads the log filter in force.
    pub log_filter: LogFilterGetter,
    pub set_log_filter: LogFilterSetter,
    pub connections: Connections,
    pub limits: HttpLimits,
    /// The server's largest job body (`--max-job-size`): `/v1` request
    /// bodies are bounded by it.
    pub max_job_size: u32,
}

impl std::fmt::Debug for HttpSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpSettings")
            .field("version", &self.version)
            .field("auth_token", &self.auth_token.as_ref().map(|_| "<set>"))
            .field("log_filter", &(self.log_filter)())
            .field("limits", &self.limits)
            .field("max_job_size", &self.max_job_size)
            .finish_non_exhaustive()
    }
}

/// Everything the handlers read. Shared as `Arc<HttpState<B>>`; the binary
/// keeps a clone to hand over the broker once recovery has built it.
///
/// Readiness keeps no flags of its own: it is "a broker was handed over"
/// plus what [`Broker::health`] reports (drain and shutdown show there the
/// moment the binary asks the broker for them), so the two cannot disagree.
pub struct HttpState<B: Broker> {
    broker: OnceLock<B>,
    storage_stats: OnceLock<SharedStorageStats>,
    extra_metrics: OnceLock<ExtraMetrics>,
    data_runtime: OnceLock<tokio::runtime::Handle>,
    version: String,
    auth_token: Option<String>,
    log_filter: LogFilterGetter,
    set_log_filter: LogFilterSetter,
    connections: Connections,
    limits: HttpLimits,
    bodies: BodyBounds,
    started: Instant,
    /// Wall-clock time of `started`, in seconds since the Unix epoch: the
    /// process start as far as this server can tell (it is created first
    /// thing in `spool serve`).
    started_unix_seconds: f64,
}

impl<B: Broker> std::fmt::Debug for HttpState<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpState")
            .field("has_broker", &self.broker.get().is_some())
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

impl<B: Broker> HttpState<B> {
    pub fn new(settings: HttpSettings) -> Arc<HttpState<B>> {
        let started_unix_seconds = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        Arc::new(HttpState {
            broker: OnceLock::new(),
            storage_stats: OnceLock::new(),
            extra_metrics: OnceLock::new(),
            data_runtime: OnceLock::new(),
            version: settings.version,
            auth_token: settings.auth_token.filter(|t| !t.is_empty()),
            log_filter: settings.log_filter,
            set_log_filter: settings.set_log_filter,
            connections: settings.connections,
            bodies: BodyBounds {
                admin: settings.limits.body_max_bytes,
                job: job_body_max_bytes(settings.max_job_size),
                batch: batch_body_max_bytes(settings.max_job_size),
            },
            limits: settings.limits,
            started: Instant::now(),
            started_unix_seconds,
        })
    }

    /// Hands over the broker once recovery has built it: readiness may turn
    /// true from now on. A second call is ignored: there is one broker per
    /// process.
    pub fn set_broker(&self, broker: B) {
        let _ = self.broker.set(broker);
    }

    /// The log's figures, for `/metrics` and `/admin/stats` (none in memory).
    pub fn set_storage_stats(&self, stats: SharedStorageStats) {
        let _ = self.storage_stats.set(stats);
    }

    /// Families to append to `/metrics`; a second call is ignored.
    pub fn set_extra_metrics(&self, write: ExtraMetrics) {
        let _ = self.extra_metrics.set(write);
    }

    /// The runtime of the data path (connections and the engine), when it
    /// is not the one serving HTTP: its task counts go into `/metrics` and
    /// `/admin/stats` under `runtime="data"`.
    pub fn set_data_runtime(&self, handle: tokio::runtime::Handle) {
        let _ = self.data_runtime.set(handle);
    }

    fn broker(&self) -> Option<&B> {
        self.broker.get()
    }

    /// A copy of the log's figures (two histograms among them): taken at
    /// most once per `/metrics` or `/admin/stats` request, under the lock
    /// the log thread updates them under.
    fn storage_stats(&self) -> Option<crate::durable::StorageStats> {
        let stats = self.storage_stats.get()?;
        Some(stats.lock().unwrap_or_else(|e| e.into_inner()).clone())
    }

    /// The log's failure, if it failed: all a probe needs of its figures,
    /// read without copying the rest.
    fn storage_failure(&self) -> Option<String> {
        let stats = self.storage_stats.get()?;
        let stats = stats.lock().unwrap_or_else(|e| e.into_inner());
        stats.failed.clone()
    }

    /// `None` when ready, otherwise why not, as `/readyz` reports it.
    fn unready_reason(&self) -> Option<String> {
        let Some(broker) = self.broker() else {
            return Some("recovering".to_string());
        };
        let health = broker.health();
        if health.shutting_down {
            return Some("shutting_down".to_string());
        }
        if let Some(error) = health.storage_failed {
            return Some(format!("storage_failed: {error}"));
        }
        if let Some(error) = self.storage_failure() {
            return Some(format!("storage_failed: {error}"));
        }
        // A full disk is not a reason to leave rotation: reserves and
        // deletes still work, and deletes are what frees the space. It shows
        // in the 200 body and as `spool_disk_full`.
        if health.draining {
            return Some("draining".to_string());
        }
        None
    }

    /// Puts are refused for want of disk space (deletes still work).
    fn disk_full(&self) -> bool {
        self.broker().is_some_and(|b| b.health().disk_full)
    }

    fn uptime_seconds(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }
}

/// How large a request body may be, by where it goes.
#[derive(Debug, Clone, Copy)]
struct BodyBounds {
    admin: usize,
    /// `/v1`: one job (see [`job_body_max_bytes`]).
    job: usize,
    /// A batch enqueue.
    batch: usize,
}

impl BodyBounds {
    /// The bound of a request, and the error code of a body over it
    /// (API.md's `too_large` for the job API; admin keeps the code it
    /// has always answered).
    fn of(&self, method: &Method, path: &str) -> (usize, &'static str) {
        if jobs::is_batch(method.as_str(), path) {
            (self.batch, "too_large")
        } else if path.starts_with("/v1/") {
            (self.job, "too_large")
        } else {
            (self.admin, "body_too_large")
        }
    }
}

/// An error answer: `{"error":{"code":...,"message":...,"field":...}}` with
/// its status; `field` only when one input is to blame.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub field: Option<String>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            field: None,
        }
    }

    /// Names the input at fault.
    pub fn with_field(mut self, field: impl Into<String>) -> ApiError {
        self.field = Some(field.into());
        self
    }
}

/// The body of every error answer.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ErrorDetail {
    /// What went wrong, for programs: `invalid`, `not_found`, `conflict`,
    /// `cancelled`, `lease_expired`, `wrong_state`, `version_mismatch`,
    /// `too_large`, `queue_full`, `draining`, `storage`, ...
    #[schema(value_type = String)]
    code: &'static str,
    /// What went wrong, for people.
    message: String,
    /// The input at fault, where one is.
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<String>,
}

impl ApiError {
    /// What the error answer's body says (without the status).
    pub(crate) fn detail(self) -> ErrorDetail {
        ErrorDetail {
            code: self.code,
            message: self.message,
            field: self.field,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status;
        let body = ErrorBody {
            error: self.detail(),
        };
        (status, Json(body)).into_response()
    }
}

/// The routes, with the auth check in front of `/admin/*` and `/v1/*`.
pub fn router<B: Broker>(state: Arc<HttpState<B>>) -> Router {
    Router::new()
        .route("/openapi.json", get(openapi::document))
        .route("/livez", get(livez))
        .route("/healthz", get(livez))
        .route("/readyz", get(readyz::<B>))
        .route("/metrics", get(metrics::metrics::<B>))
        .route("/admin/stats", get(admin::stats::<B>))
        .route("/admin/connections", get(admin::connections::<B>))
        .route(
            "/admin/log-level",
            get(admin::get_log_level::<B>).put(admin::put_log_level::<B>),
        )
        .merge(jobs::routes::<B>())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_token::<B>,
        ))
        // Bodies are bounded (per route) while they are collected, before
        // routing; axum's own 2 MB default would refuse large jobs in
        // plain text.
        .layer(DefaultBodyLimit::disable())
        .with_state(state)
}

/// A probe's answer.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ProbeBody {
    /// `ok` (alive), `ready` or `unavailable`.
    #[schema(value_type = String)]
    status: &'static str,
    /// Why not ready: `recovering`, `draining`, `shutting_down`,
    /// `storage_failed: ...`.
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    /// Ready, with these troubles (`disk_full`).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<String>>)]
    degraded: Option<Vec<&'static str>>,
}

impl ProbeBody {
    fn status(status: &'static str) -> ProbeBody {
        ProbeBody {
            status,
            reason: None,
            degraded: None,
        }
    }
}

/// Liveness: answers while the process runs, during recovery too.
#[utoipa::path(
    get,
    path = "/livez",
    tag = "operations",
    summary = "Liveness (also at /healthz)",
    responses((status = 200, description = "The process is alive", body = ProbeBody)),
)]
async fn livez() -> Json<ProbeBody> {
    Json(ProbeBody::status("ok"))
}

#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    summary = "Readiness: recovered, storage healthy, not draining",
    responses(
        (status = 200, description = "Ready", body = ProbeBody),
        (status = 503, description = "Not ready, and why", body = ProbeBody),
    ),
)]
async fn readyz<B: Broker>(State(state): State<Arc<HttpState<B>>>) -> Response {
    match state.unready_reason() {
        None if state.disk_full() => Json(ProbeBody {
            degraded: Some(vec!["disk_full"]),
            ..ProbeBody::status("ready")
        })
        .into_response(),
        None => Json(ProbeBody::status("ready")).into_response(),
        Some(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(ProbeBody {
                reason: Some(reason),
                ..ProbeBody::status("unavailable")
            }),
        )
            .into_response(),
    }
}

async fn not_found(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no such endpoint: {method} {}", uri.path()),
    )
}

async fn method_not_allowed(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{method} is not allowed on {}", uri.path()),
    )
}

/// True for paths that need the bearer token when one is set.
fn is_protected(path: &str) -> bool {
    let under = |prefix: &str| path == prefix || path.starts_with(&format!("{prefix}/"));
    under("/admin") || under("/v1")
}

/// Compares in time that depends only on the expected token's length, so a
/// client cannot find the token byte by byte by timing answers.
fn token_matches(given: &[u8], expected: &[u8]) -> bool {
    let mut differences = u8::from(given.len() != expected.len());
    for (i, e) in expected.iter().enumerate() {
        differences |= e ^ given.get(i).copied().unwrap_or(0);
    }
    differences == 0
}

/// The token of an `Authorization: Bearer <token>` header.
fn bearer_token(headers: &HeaderMap) -> Option<&[u8]> {
    let value = headers.get(header::AUTHORIZATION)?.as_bytes();
    let (scheme, token) = value.split_at(value.iter().position(|&b| b == b' ')?);
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return None;
    }
    Some(token.trim_ascii())
}

/// Whether a request may reach a protected path.
fn authorized(headers: &HeaderMap, expected: &str) -> bool {
    bearer_token(headers).is_some_and(|given| token_matches(given, expected.as_bytes()))
}

/// The 401 for a request to a protected path without the token, if it is
/// one: shared by the router's layer and the hot routes, which bypass it.
fn refused_for_token<B: Broker>(
    state: &HttpState<B>,
    path: &str,
    headers: &HeaderMap,
) -> Option<Response> {
    let expected = state.auth_token.as_ref()?;
    if !is_protected(path) || authorized(headers, expected) {
        return None;
    }
    let mut response = ApiError::new(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "this endpoint needs `Authorization: Bearer <token>` (SPOOL_AUTH_TOKEN)",
    )
    .into_response();
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    Some(response)
}

async fn require_token<B: Broker>(
    State(state): State<Arc<HttpState<B>>>,
    request: Request,
    next: Next,
) -> Response {
    if let Some(refusal) = refused_for_token(&state, request.uri().path(), request.headers()) {
        return refusal;
    }
    next.run(request).await
}

/// A short, fixed name for what a connection is doing, for
/// `/admin/connections` (the registry keeps `&'static str`s).
fn command_name(method: &Method, path: &str) -> &'static str {
    match (method.as_str(), path) {
        ("GET", "/openapi.json") => "GET /openapi.json",
        ("GET", "/livez") => "GET /livez",
        ("GET", "/healthz") => "GET /healthz",
        ("GET", "/readyz") => "GET /readyz",
        ("GET", "/metrics") => "GET /metrics",
        ("GET", "/admin/stats") => "GET /admin/stats",
        ("GET", "/admin/connections") => "GET /admin/connections",
        ("GET", "/admin/log-level") => "GET /admin/log-level",
        ("PUT", "/admin/log-level") => "PUT /admin/log-level",
        (method, path) => jobs::v1_segments(path)
            .and_then(|(segments, count)| {
                let segments = segments.get(..count)?;
                jobs::command_name(method, segments)
                    .or_else(|| schedules::command_name(method, segments))
            })
            .unwrap_or("other"),
    }
}

/// Binds the HTTP listener (call inside the runtime). `SO_REUSEADDR` so a
/// restarted server need not wait out the old connections' `TIME_WAIT`.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    crate::net::bind_tcp(addr, HTTP_LISTEN_BACKLOG)
}

/// Runs the HTTP server on `listener` until `shutdown` completes, then
/// stops accepting, lets requests in flight finish (up to the drain
/// timeout) and returns.
pub async fn serve<B: Broker>(
    listener: TcpListener,
    state: Arc<HttpState<B>>,
    shutdown: impl Future<Output = ()>,
) {
    let app = router(state.clone());
    let limits = state.limits.clone();
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            _ = &mut shutdown => break,
            // Reap finished connection tasks so the set does not grow.
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                let Ok(handle) = state.connections.try_admit(Protocol::Http) else {
                    // Refused (and counted) by the registry: dropping the
                    // stream closes it.
                    continue;
                };
                handle.set_peer(peer.to_string());
                let _ = stream.set_nodelay(true);
                tasks.spawn(serve_connection(
                    stream,
                    peer,
                    Arc::new(handle),
                    state.clone(),
                    app.clone(),
                    stop_rx.clone(),
                ));
            }
            Err(e) => {
                // Counted as an fd_limit refusal when out of fds.
                state.connections.record_accept_error(&e);
                tracing::warn!(error = %e, "http accept failed");
                tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
            }
        }
    }
    drop(listener);
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(limits.shutdown_drain_timeout, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            open = tasks.len(),
            "http connections still open after the drain timeout; closing them"
        );
        // Each of them recorded `shutdown` as its close reason when the
        // stop was signalled; aborting drops its handle with that reason.
        tasks.abort_all();
    }
}

/// When the connection last could not write (`u64::MAX`: it is not
/// blocked), in milliseconds since `base`.
#[derive(Debug)]
struct WriteStall {
    base: Instant,
    blocked_since_ms: AtomicU64,
}

impl WriteStall {
    const NOT_BLOCKED: u64 = u64::MAX;

    fn new() -> WriteStall {
        WriteStall {
            base: Instant::now(),
            blocked_since_ms: AtomicU64::new(Self::NOT_BLOCKED),
        }
    }

    fn now_ms(&self) -> u64 {
        self.base.elapsed().as_millis() as u64
    }

    fn blocked(&self) {
        // Only the first Pending of a stall sets the start.
        let _ = self.blocked_since_ms.compare_exchange(
            Self::NOT_BLOCKED,
            self.now_ms(),
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    fn progressed(&self) {
        self.blocked_since_ms
            .store(Self::NOT_BLOCKED, Ordering::Relaxed);
    }

    fn stalled_longer_than(&self, limit: Duration) -> bool {
        let since = self.blocked_since_ms.load(Ordering::Relaxed);
        since != Self::NOT_BLOCKED && self.now_ms().saturating_sub(since) > limit.as_millis() as u64
    }
}

/// Whether the client sent anything since the connection's last answer
/// (or since it opened): what tells a stalled request from an idle
/// keep-alive connection when hyper's header read timer fires. It also
/// holds the connection's handler timer (no allocation of its own).
#[derive(Debug, Default)]
struct RequestActivity {
    bytes_since_answer: AtomicBool,
    handler_timer: HandlerTimer,
}

impl RequestActivity {
    fn received(&self) {
        self.bytes_since_answer.store(true, Ordering::Relaxed);
    }

    /// An answer is ready: the request, body included, has been read, so
    /// bytes from now on belong to the next request. (Bytes of a pipelined
    /// next request read together with this one are forgotten: should that
    /// request stall, its close counts as idle. It is still closed.)
    fn answered(&self) {
        self.bytes_since_answer.store(false, Ordering::Relaxed);
    }

    /// Why a header read timeout closes the connection.
    fn timeout_reason(&self) -> CloseReason {
        if self.bytes_since_answer.load(Ordering::Relaxed) {
            CloseReason::RequestTimeout
        } else {
            CloseReason::IdleTimeout
        }
    }
}

/// The socket as hyper sees it: counts bytes into the registry, notes when
/// writes stop making progress and whether a request has begun.
struct MeteredStream {
    inner: TcpStream,
    handle: Arc<ConnHandle>,
    stall: Arc<WriteStall>,
    activity: Arc<RequestActivity>,
}

impl AsyncRead for MeteredStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = buf.filled().len().saturating_sub(before);
        if read > 0 {
            self.handle.add_bytes_in(read);
            self.activity.received();
        }
        result
    }
}

impl AsyncWrite for MeteredStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.note_write(&result);
        result
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.note_write(&result);
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl MeteredStream {
    fn note_write(&self, result: &Poll<std::io::Result<usize>>) {
        match result {
            Poll::Ready(Ok(written)) => {
                self.handle.add_bytes_out(*written);
                self.stall.progressed();
            }
            Poll::Ready(Err(_)) => self.stall.progressed(),
            Poll::Pending => self.stall.blocked(),
        }
    }
}

/// Serves one connection until the client leaves, a timeout closes it, or
/// the server stops.
async fn serve_connection<B: Broker>(
    stream: TcpStream,
    peer: SocketAddr,
    handle: Arc<ConnHandle>,
    state: Arc<HttpState<B>>,
    app: Router,
    mut stop: watch::Receiver<bool>,
) {
    let limits = state.limits.clone();
    let bodies = state.bodies;
    let stall = Arc::new(WriteStall::new());
    let activity = Arc::new(RequestActivity::default());
    let io = TokioIo::new(MeteredStream {
        inner: stream,
        handle: handle.clone(),
        stall: stall.clone(),
        activity: activity.clone(),
    });
    let service_handle = handle.clone();
    let service_limits = limits.clone();
    let service_activity = activity.clone();
    let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
        let app = app.clone();
        let state = state.clone();
        let handle = service_handle.clone();
        let limits = service_limits.clone();
        let activity = service_activity.clone();
        async move {
            let response = answer(
                &state,
                app,
                request,
                &limits,
                bodies,
                &handle,
                &activity.handler_timer,
            )
            .await;
            activity.answered();
            Ok::<_, Infallible>(response)
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(REQUEST_HEAD_MAX_BYTES)
        .keep_alive(true);
    let connection = builder.serve_connection(io, service);
    tokio::pin!(connection);
    let mut stall_check = tokio::time::interval(HTTP_STALL_CHECK_INTERVAL);
    let mut stopping = *stop.borrow();
    if stopping {
        handle.close_reason(CloseReason::Shutdown);
        connection.as_mut().graceful_shutdown();
    }
    let reason = loop {
        tokio::select! {
            result = connection.as_mut() => break match result {
                Ok(()) if stopping => CloseReason::Shutdown,
                Ok(()) => CloseReason::Client,
                // hyper's only timer here is the header read timeout.
                Err(e) if e.is_timeout() => activity.timeout_reason(),
                Err(e) if e.is_parse() || e.is_parse_too_large() => CloseReason::Client,
                Err(_) => CloseReason::IoError,
            },
            changed = stop.changed(), if !stopping => {
                // A closed channel means the server is gone: stop too.
                let _ = changed;
                stopping = true;
                // Recorded now: a connection still busy at the drain
                // timeout is aborted and never reaches the end of this
                // loop, and its handle would otherwise count it as closed
                // by the client.
                handle.close_reason(CloseReason::Shutdown);
                connection.as_mut().graceful_shutdown();
            }
            _ = handle.close_requested() => break CloseReason::Shutdown,
            _ = stall_check.tick() => {
                if stall.stalled_longer_than(limits.write_stall_timeout) {
                    break CloseReason::WriteTimeout;
                }
            }
        }
    };
    tracing::debug!(%peer, reason = reason.as_str(), "http connection closed");
    handle.close_reason(reason);
}

/// One request: the body collected within its limits, then the router
/// (or, for the job API's hot routes, their handler directly: see
/// [`jobs::HotRoute`]) within the handler timeout.
async fn answer<B: Broker>(
    state: &Arc<HttpState<B>>,
    app: Router,
    request: hyper::Request<Incoming>,
    limits: &HttpLimits,
    bodies: BodyBounds,
    handle: &ConnHandle,
    timer: &HandlerTimer,
) -> Response {
    let path = request.uri().path();
    let hot = jobs::HotRoute::of(request.method(), path);
    handle.set_command(match &hot {
        Some(route) => route.command_name(),
        None => command_name(request.method(), path),
    });
    let (body_max_bytes, too_large_code) = bodies.of(request.method(), path);
    // A long poll may wait up to its own maximum before it has anything
    // to do; the handler timeout is for the work after that.
    let handler_timeout = if request.method() == Method::POST && path == "/v1/reserve" {
        limits.handler_timeout + RESERVE_WAIT_MAX
    } else if request
        .uri()
        .query()
        .is_some_and(|q| q.split('&').any(|p| p.starts_with("wait_ms=")))
    {
        // `?wait_ms` (an enqueue or a job read; elsewhere it is refused
        // at once as unknown).
        limits.handler_timeout + JOB_WAIT_MAX
    } else {
        limits.handler_timeout
    };
    handle.set_state(ConnState::Reading);
    let response = match collect_body(request, limits, body_max_bytes, too_large_code).await {
        Ok((parts, body)) => {
            handle.set_state(ConnState::Executing);
            let call = async {
                match hot {
                    Some(route) => {
                        match refused_for_token(state, parts.uri.path(), &parts.headers) {
                            Some(refusal) => refusal,
                            // Boxed: hyper keeps room for a request's future
                            // in every connection, idle ones too, and the
                            // handlers' futures would add about 1.4 KB to
                            // each (`bench --mode http-idle`).
                            None => {
                                Box::pin(jobs::answer_hot(state.clone(), route, parts, body)).await
                            }
                        }
                    }
                    None => {
                        let request = hyper::Request::from_parts(parts, Full::new(body));
                        let call = hyper::service::Service::call(
                            &hyper_util::service::TowerToHyperService::new(app),
                            request,
                        );
                        match call.await {
                            Ok(response) => response,
                            Err(never) => match never {},
                        }
                    }
                }
            };
            // Moved into the timer's future, not pinned here: `pin!` in an
            // async fn stored the handler's future a second time (+630 B
            // in hyper's room for it, which every connection keeps, idle
            // ones too).
            match timer.within(handler_timeout, call).await {
                Some(response) => response,
                None => ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "timeout",
                    format!(
                        "the server did not answer within {} s",
                        handler_timeout.as_secs()
                    ),
                )
                .into_response(),
            }
        }
        Err(error) => error.into_response(),
    };
    // hyper writes the response from here; a client that does not read
    // it is caught by the write-stall check.
    handle.set_state(ConnState::Idle);
    response
}

/// The handler timeout's timer: one per connection, reset for each of its
/// requests (HTTP/1 answers them one at a time). A fresh
/// `tokio::time::timeout` per request put a timer into tokio's wheel and took
/// it out again, about 2,000 instructions of an enqueue (callgrind); moving a
/// registered timer to a later deadline is one atomic store, and the wheel
/// re-files it only when the earlier deadline comes.
#[derive(Debug, Default)]
struct HandlerTimer {
    /// `None` until the connection's first request, and while one runs.
    idle: std::sync::Mutex<Option<Pin<Box<tokio::time::Sleep>>>>,
}

impl HandlerTimer {
    /// `work`'s output, or `None` if `limit` passed first.
    fn within<F: Future>(&self, limit: Duration, work: F) -> Within<'_, F> {
        let deadline = tokio::time::Instant::now() + limit;
        let taken = self.idle.lock().ok().and_then(|mut idle| idle.take());
        let sleep = match taken {
            Some(mut sleep) => {
                sleep.as_mut().reset(deadline);
                sleep
            }
            None => Box::pin(tokio::time::sleep_until(deadline)),
        };
        Within {
            work,
            sleep: Some(sleep),
            timer: self,
        }
    }
}

pin_project_lite::pin_project! {
    /// [`HandlerTimer::within`]: a hand-written future, as
    /// `tokio::time::timeout` is, so the work is stored once (an `async fn`
    /// taking it held it twice).
    struct Within<'a, F> {
        #[pin]
        work: F,
        // Given back to the timer when the work ends; a request dropped
        // before (its client left) drops it, and the next makes another.
        sleep: Option<Pin<Box<tokio::time::Sleep>>>,
        timer: &'a HandlerTimer,
    }
}

impl<F: Future> Future for Within<'_, F> {
    type Output = Option<F::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let output = match this.work.poll(cx) {
            Poll::Ready(output) => Some(output),
            Poll::Pending => {
                let timed_out = this
                    .sleep
                    .as_mut()
                    .is_some_and(|sleep| sleep.as_mut().poll(cx).is_ready());
                if !timed_out {
                    return Poll::Pending;
                }
                None
            }
        };
        if let (Some(sleep), Ok(mut idle)) = (this.sleep.take(), this.timer.idle.lock()) {
            *idle = Some(sleep);
        }
        Poll::Ready(output)
    }
}

/// Reads the whole body, refusing one over `body_max_bytes` (413, with
/// `too_large_code`) or one that arrives too slowly (408).
///
/// The rest of a slightly oversized body is read and dropped before the
/// 413 goes out: closing a socket with unread bytes makes the kernel send a
/// reset, which can destroy the 413 before the client reads it.
///
/// A body that arrives as one frame (the usual small request) is kept as
/// that frame's `Bytes`, without a copy.
async fn collect_body(
    request: hyper::Request<Incoming>,
    limits: &HttpLimits,
    body_max_bytes: usize,
    too_large_code: &'static str,
) -> Result<(axum::http::request::Parts, Bytes), ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            too_large_code,
            format!("the request body exceeds {body_max_bytes} bytes"),
        )
    };
    let drain_max_bytes = body_max_bytes.saturating_add(OVERSIZED_BODY_DRAIN_MAX_BYTES) as u64;
    let announced = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    // Far too large: refuse before reading a byte of it.
    if announced.is_some_and(|len| len > drain_max_bytes) {
        return Err(too_large());
    }
    let (parts, mut body) = request.into_parts();
    let deadline = tokio::time::Instant::now() + limits.body_read_timeout;
    let mut first: Option<Bytes> = None;
    let mut collected = Vec::new();
    let mut received = 0u64;
    loop {
        let frame = tokio::time::timeout_at(deadline, body.frame())
            .await
            .map_err(|_| {
                ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "body_timeout",
                    format!(
                        "the request body did not arrive within {} s",
                        limits.body_read_timeout.as_secs()
                    ),
                )
            })?;
        let frame = match frame {
            None => break,
            Some(Ok(frame)) => frame,
            Some(Err(e)) => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "bad_body",
                    format!("the request body could not be read: {e}"),
                ))
            }
        };
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        received = received.saturating_add(data.len() as u64);
        if received > drain_max_bytes {
            return Err(too_large());
        }
        if received <= body_max_bytes as u64 {
            if first.is_none() && collected.is_empty() {
                first = Some(data);
            } else {
                if let Some(first) = first.take() {
                    collected.extend_from_slice(&first);
                }
                collected.extend_from_slice(&data);
            }
        }
    }
    if received > body_max_bytes as u64 {
        return Err(too_large());
    }
    let body = match first {
        Some(only) => only,
        None => Bytes::from(collected),
    };
    Ok((parts, body))
}

/// The body of a response, for handlers that build one by hand.
fn text_response(content_type: &'static str, text: String) -> Response {
    let mut response = Response::new(Body::from(text));
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

#[cfg(test)]
mod tests;
