//! `/admin/*`: introspection for people and the `spool stats` / `spool
//! conns` / `spool top` verbs, and the runtime log level.
//!
//! The JSON shapes here are what the CLI reads; fields are added, never
//! renamed. Durations are seconds (floats), sizes bytes.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::Json;
use serde_json::{json, Value};
use spool_engine::{EngineSnapshot, QueueSnapshot, SessionSnapshot, SnapshotScope};

use super::jobs::{invalid, number_param, query, PolicyOut, QueryPairs};
use super::metrics::{ProcessFigures, RuntimeFigures};
use super::{ApiError, HttpState};
use crate::durable::StorageStats;
use crate::limits::{ADMIN_CONNECTIONS_PAGE_DEFAULT, ADMIN_CONNECTIONS_PAGE_MAX};
use spool_broker::{Broker, Op, Outcome, ScheduleSnapshot};

/// Quantile shown as a queue's wait figure: the p99 an on-call engineer
/// compares against the queue's latency objective.
const WAIT_QUANTILE: f64 = 0.99;

const NS_PER_SECOND: f64 = 1e9;

/// The engine snapshot of `scope`, or why there is none yet (503: recovery
/// runs, or the broker is gone; neither is the client's fault nor a server
/// bug).
async fn snapshot<B: Broker>(
    state: &HttpState<B>,
    scope: SnapshotScope,
) -> Result<EngineSnapshot, ApiError> {
    let Some(broker) = state.broker() else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "recovering",
            "the write-ahead log is being recovered; try again shortly",
        ));
    };
    broker.snapshot(scope).await.map_err(|e| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            format!("the broker cannot answer: {e}"),
        )
    })
}

/// Each queue's policy (as `GET /v1/queues` shows it), by queue name.
/// A second call to the broker, so it may see a queue the snapshot did
/// not (or miss one); such a queue shows `"policy": null`.
async fn policies<B: Broker>(state: &HttpState<B>) -> HashMap<String, Value> {
    let Some(broker) = state.broker() else {
        return HashMap::new();
    };
    match broker.call(Op::ListQueues).await {
        Ok(Outcome::Queues(queues)) => queues
            .iter()
            .map(|q| {
                let policy = serde_json::to_value(PolicyOut::new(&q.policy)).unwrap_or(Value::Null);
                (q.name.clone(), policy)
            })
            .collect(),
        _ => HashMap::new(),
    }
}

fn queue_json(queue: &QueueSnapshot, policies: &HashMap<String, Value>) -> Value {
    let c = &queue.counters;
    json!({
        "policy": policies.get(&queue.name).cloned().unwrap_or(Value::Null),
        "name": queue.name,
        "ready": queue.ready,
        "reserved": queue.reserved,
        "delayed": queue.delayed,
        "buried": queue.buried,
        "urgent": queue.urgent,
        "waiting_reservers": queue.waiting_reservers,
        "paused": queue.paused,
        "counters": {
            "put": c.put,
            "reserved": c.reserved,
            "deleted": c.deleted,
            "released": c.released,
            "buried": c.buried,
            "kicked": c.kicked,
            "timed_out": c.timed_out,
            "failed": c.failed,
            "dead_lettered": c.dead_lettered,
            "cancelled": c.cancelled,
            "completed": c.completed,
            "duplicates": c.duplicates,
            "refused_full": c.refused_full,
        },
        "wait_p99_seconds": queue.wait.quantile(WAIT_QUANTILE),
        "run_p99_seconds": queue.run.quantile(WAIT_QUANTILE),
        "skew_p99_seconds": queue.skew.quantile(WAIT_QUANTILE),
        "skew_p999_seconds": queue.skew.quantile(0.999),
        "skew_max_seconds": queue.skew.max(),
    })
}

fn schedule_json(schedule: &ScheduleSnapshot) -> Value {
    let at = |ms: Option<u64>| ms.map(super::encoding::format_rfc3339);
    json!({
        "name": schedule.name,
        "queue": schedule.queue,
        "paused": schedule.paused,
        "next_fire_at": at(schedule.next_fire_at_ms),
        "last_fire_at": at(schedule.last_fire_at_ms),
        "last_skew_ms": schedule.last_skew_ms,
        "fires": schedule.fires,
        "misfires_skipped": schedule.misfires_skipped,
        "backlog_skips": schedule.backlog_skips,
        "fire_skew_p99_seconds": schedule.skew.quantile(WAIT_QUANTILE),
        "fire_skew_max_seconds": schedule.skew.max(),
    })
}

fn storage_json(stats: &StorageStats) -> Value {
    json!({
        "log_bytes": stats.log_bytes,
        "segments": stats.segments,
        "commits": stats.commits,
        "records_written": stats.records_written,
        "bytes_written": stats.bytes_written,
        "fsyncs": stats.fsyncs,
        "fsync_seconds_max": stats.fsync_ns_max as f64 / NS_PER_SECOND,
        "fsync_p99_seconds": stats.fsync_seconds.quantile(WAIT_QUANTILE),
        "compactions": stats.compactions,
        "compactions_abandoned": stats.compactions_abandoned,
        "segments_trimmed": stats.segments_trimmed,
        "failed": stats.failed,
    })
}

pub(super) async fn stats<B: Broker>(
    State(state): State<Arc<HttpState<B>>>,
) -> Result<Json<Value>, ApiError> {
    // Queues only: the stats show no sessions, and copying every
    // session's strings and reserved ids would cost the data path for
    // nothing.
    let snapshot = snapshot(&state, SnapshotScope::Queues).await?;
    let policies = policies(&state).await;
    let process = ProcessFigures::read_off_the_runtime().await;
    let runtimes: serde_json::Map<String, Value> = RuntimeFigures::read(&state)
        .into_iter()
        .map(|(name, r)| {
            let figures = json!({
                "workers": r.workers,
                "alive_tasks": r.alive_tasks,
                "global_queue_depth": r.global_queue_depth,
            });
            (name.to_string(), figures)
        })
        .collect();
    let connection_metrics = state.connections.metrics();
    let wal = state.storage_stats().map(|s| storage_json(&s));
    let not_ready_reason = state.unready_reason();
    Ok(Json(json!({
        "version": state.version,
        "pid": std::process::id(),
        "uptime_seconds": state.uptime_seconds(),
        "ready": not_ready_reason.is_none(),
        "not_ready_reason": not_ready_reason,
        "process": {
            "open_fds": process.open_fds,
            "max_fds": process.max_fds,
            "threads": process.threads,
            "resident_memory_bytes": process.resident_memory_bytes,
            "cpu_seconds": process.cpu_seconds,
        },
        "runtime": runtimes,
        "connections": super::metrics::connections_json(&connection_metrics),
        "jobs": snapshot.jobs_total,
        "draining": snapshot.draining,
        "queues": snapshot
            .queues
            .iter()
            .map(|q| queue_json(q, &policies))
            .collect::<Vec<_>>(),
        "schedules": snapshot.schedules.iter().map(schedule_json).collect::<Vec<_>>(),
        "wal": wal,
    })))
}

fn session_json(session: &SessionSnapshot) -> Value {
    json!({
        "tube_used": session.tube_used,
        "watched": session.watched,
        "reserved_job_ids": session.reserved_job_ids,
        "reserved_count": session.reserved_count,
        "blocked_in_reserve_seconds": session
            .blocked_in_reserve_ns
            .map(|ns| ns as f64 / NS_PER_SECOND),
    })
}

/// A page of the live connections, oldest first: `?limit=` of them (at
/// most [`ADMIN_CONNECTIONS_PAGE_MAX`], [`ADMIN_CONNECTIONS_PAGE_DEFAULT`]
/// when not given) with ids above `?after=`. `next` is the id to pass as
/// `after` for the next page, `null` on the last: a server with fewer
/// connections than the default answers them all, as before paging.
pub(super) async fn connections<B: Broker>(
    State(state): State<Arc<HttpState<B>>>,
    params: QueryPairs,
) -> Result<Json<Value>, ApiError> {
    let params = query(params, &["limit", "after"])?;
    let limit = number_param::<usize>(&params, "limit")?.unwrap_or(ADMIN_CONNECTIONS_PAGE_DEFAULT);
    if !(1..=ADMIN_CONNECTIONS_PAGE_MAX).contains(&limit) {
        return Err(invalid(
            "limit",
            format!("1 to {ADMIN_CONNECTIONS_PAGE_MAX} connections per page"),
        ));
    }
    let after = number_param::<u64>(&params, "after")?.unwrap_or(0);
    // Sessions only exist once there is a broker; before that the list
    // still shows the (HTTP) connections.
    let snapshot = match state.broker() {
        Some(_) => Some(snapshot(&state, SnapshotScope::Full).await?),
        None => None,
    };
    let sessions: HashMap<u64, &SessionSnapshot> = snapshot
        .iter()
        .flat_map(|s| &s.sessions)
        .map(|s| (s.conn_id, s))
        .collect();
    let (page, more) = state.connections.list_page(after, limit);
    let next = page.last().filter(|_| more).map(|last| last.id);
    let list: Vec<Value> = page
        .into_iter()
        .map(|conn| {
            let session = conn
                .session_id
                .and_then(|id| sessions.get(&id))
                .map(|s| session_json(s));
            json!({
                "id": conn.id,
                "protocol": conn.protocol.as_str(),
                "peer": conn.peer,
                "age_seconds": conn.age.as_secs_f64(),
                "state": conn.state.as_str(),
                "command": conn.command,
                "bytes_in": conn.bytes_in,
                "bytes_out": conn.bytes_out,
                "session_id": conn.session_id,
                "session": session,
            })
        })
        .collect();
    Ok(Json(json!({ "connections": list, "next": next })))
}

pub(super) async fn get_log_level<B: Broker>(
    State(state): State<Arc<HttpState<B>>>,
) -> Json<Value> {
    Json(json!({ "filter": (state.log_filter)() }))
}

/// The directive of a `PUT /admin/log-level` body: JSON `{"filter": "..."}`
/// (when sent as JSON or shaped like it) or the directive as plain text.
fn directive_of(headers: &HeaderMap, body: &[u8]) -> Result<String, ApiError> {
    let bad = |message: String| ApiError::new(StatusCode::BAD_REQUEST, "bad_filter", message);
    let text = std::str::from_utf8(body)
        .map_err(|_| bad("the body is not UTF-8".to_string()))?
        .trim();
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"))
        || text.starts_with('{');
    let directive = if is_json {
        let value: Value = serde_json::from_str(text)
            .map_err(|e| bad(format!("the body is not valid JSON: {e}")))?;
        value
            .get("filter")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("expected {\"filter\": \"<directive>\"}".to_string()))?
            .trim()
            .to_string()
    } else {
        text.to_string()
    };
    if directive.is_empty() {
        return Err(bad(
            "expected a filter directive, e.g. `info` or `spool_server=debug`".to_string(),
        ));
    }
    Ok(directive)
}

pub(super) async fn put_log_level<B: Broker>(
    State(state): State<Arc<HttpState<B>>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let directive = directive_of(&headers, &body)?;
    // The setter answers with the filter it put in force; a later GET asks
    // the getter, so nothing is cached here to go stale.
    let filter = (state.set_log_filter)(&directive)
        .map_err(|message| ApiError::new(StatusCode::BAD_REQUEST, "bad_filter", message))?;
    Ok(Json(json!({ "filter": filter })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directive_from_text_and_json() {
        let none = HeaderMap::new();
        assert_eq!(directive_of(&none, b" debug \n").unwrap(), "debug");
        assert_eq!(
            directive_of(&none, br#"{"filter": "spool=trace"}"#).unwrap(),
            "spool=trace"
        );
        let mut json_headers = HeaderMap::new();
        json_headers.insert(header::CONTENT_TYPE, "application/json".parse().unwrap());
        assert_eq!(
            directive_of(&json_headers, br#"{"filter":"warn"}"#).unwrap(),
            "warn"
        );
    }

    #[test]
    fn bad_bodies_are_400() {
        let none = HeaderMap::new();
        for body in [
            &b""[..],
            b"   ",
            b"{not json",
            br#"{"level": "info"}"#,
            br#"{"filter": 3}"#,
            br#"{"filter": " "}"#,
            b"\xff\xfe",
        ] {
            let error = directive_of(&none, body).unwrap_err();
            assert_eq!(error.status, StatusCode::BAD_REQUEST, "{body:?}");
            assert_eq!(error.code, "bad_filter");
        }
    }
}
