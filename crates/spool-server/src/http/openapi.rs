//! `GET /openapi.json`: the OpenAPI 3.1 document of the HTTP API, generated
//! from the handlers' `#[utoipa::path]` attributes and the body types that
//! also parse requests and write answers, so it cannot drift from them.
//! Served without auth: it describes the API, it shows no data. The bearer
//! scheme `/v1/*` needs when `SPOOL_AUTH_TOKEN` is set is declared in it.

use std::sync::OnceLock;

use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::{jobs, metrics, schedules, workflows};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "spool",
        description = "The HTTP/JSON job API of spool, a task queue and job scheduler (API.md), \
                       with its probes and metrics.",
    ),
    paths(
        super::livez,
        super::readyz,
        metrics::metrics,
        jobs::enqueue,
        jobs::enqueue_batch,
        jobs::get_job,
        jobs::update_job,
        jobs::delete_job,
        jobs::cancel,
        jobs::reserve,
        jobs::heartbeat,
        jobs::complete,
        jobs::complete_batch,
        jobs::fail,
        jobs::release,
        jobs::bury,
        jobs::kick,
        jobs::list_queues,
        jobs::get_queue,
        jobs::list_jobs,
        jobs::purge,
        jobs::set_policy,
        jobs::pause,
        jobs::resume,
        schedules::put_schedule,
        schedules::list_schedules,
        schedules::get_schedule,
        schedules::delete_schedule,
        schedules::pause_schedule,
        schedules::resume_schedule,
        schedules::trigger_schedule,
        workflows::start_workflow,
        workflows::get_workflow,
        workflows::list_workflows,
        workflows::cancel_workflow,
    ),
    modifiers(&BearerScheme),
    tags(
        (name = "jobs", description = "Enqueue, read, change and cancel jobs"),
        (name = "workers", description = "Lease jobs and settle them"),
        (name = "queues", description = "Queues: listings, purges, policies, pauses"),
        (name = "schedules", description = "Cron schedules that enqueue a job at each due instant"),
        (name = "workflows", description = "Sagas and DAGs of steps with compensation"),
        (name = "operations", description = "Probes and metrics"),
    ),
)]
pub(super) struct ApiDoc;

/// Declares the `bearer` scheme the `/v1` operations name.
struct BearerScheme;

impl Modify for BearerScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "Needed when the server runs with SPOOL_AUTH_TOKEN: \
                         `Authorization: Bearer <token>`",
                    ))
                    .build(),
            ),
        );
    }
}

/// The document as JSON text, built once.
pub(super) fn json() -> &'static str {
    static DOCUMENT: OnceLock<String> = OnceLock::new();
    DOCUMENT.get_or_init(|| {
        // The document is plain data built by derived code; encoding it
        // cannot fail short of a bug, which the tests would show.
        ApiDoc::openapi().to_json().unwrap_or_else(|e| {
            serde_json::json!({"error": {"code": "internal", "message": e.to_string()}}).to_string()
        })
    })
}

pub(super) async fn document() -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        json(),
    )
        .into_response()
}
