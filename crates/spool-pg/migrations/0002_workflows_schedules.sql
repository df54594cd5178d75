-- spool's PostgreSQL schema, version 2: workflows and schedules. Same
-- conventions as version 1: times in Unix nanoseconds on the broker's clock.

-- Workflow ids: their own sequence, from 1, never reused.
CREATE SEQUENCE spool_workflow_ids;

-- One row per workflow. `data` is `spool_engine::workflow::Workflow::encode`
-- (definition and progress, versioned by its first byte): every transition
-- decodes it under `FOR UPDATE`, runs the shared state machine and writes it
-- back in the transaction of the job change that caused it. `state` and
-- `finished_ns` repeat what `data` holds, for listings and retention.
CREATE TABLE spool_workflows (
    id          bigint PRIMARY KEY,
    state       text NOT NULL CHECK (state IN
                    ('running', 'succeeded', 'compensating', 'compensated',
                     'compensation_failed')),
    created_ns  bigint NOT NULL,
    finished_ns bigint,
    data        bytea NOT NULL
);
CREATE INDEX spool_workflows_state ON spool_workflows (state, id);
CREATE INDEX spool_workflows_finished ON spool_workflows (finished_ns)
    WHERE finished_ns IS NOT NULL;

-- Workflow idempotency keys (scoped to workflows), raced on like the jobs'.
CREATE TABLE spool_workflow_keys (
    key          text PRIMARY KEY,
    workflow_id  bigint NOT NULL REFERENCES spool_workflows (id) ON DELETE CASCADE,
    expires_ns   bigint NOT NULL
);
CREATE INDEX spool_workflow_keys_workflow ON spool_workflow_keys (workflow_id);

-- A step's (or compensation's) job names its workflow; the workflow's data
-- says which step and role. NULL for every other job: the hooks cost those
-- one NULL check. `parents` (step name → result, NULL: none) as two arrays.
ALTER TABLE spool_jobs
    ADD COLUMN workflow_id    bigint,
    ADD COLUMN parent_names   text[],
    ADD COLUMN parent_results bytea[],
    -- The schedule that fired the job (its `max_backlog` counts them).
    ADD COLUMN schedule       text;

-- Schedules: the spec as columns (the job template's fields as a job's),
-- the firing state, and the counters of the view.
CREATE TABLE spool_schedules (
    name                 text PRIMARY KEY,
    cron                 text NOT NULL,
    timezone             text NOT NULL,
    queue                text NOT NULL,
    misfire              text NOT NULL CHECK (misfire IN ('skip', 'once', 'all')),
    catch_up_max         integer NOT NULL,
    jitter_ms            bigint NOT NULL,
    max_backlog          bigint,
    paused               boolean NOT NULL,
    -- The template of every fired job.
    job_payload          bytea NOT NULL,
    job_priority         bigint,
    -- A template runs at its due instant plus this delay, never at a fixed one.
    job_delay_ms         bigint,
    job_ttr_ms           bigint,
    job_max_attempts     integer,
    job_backoff_initial_ms  bigint,
    job_backoff_max_ms      bigint,
    job_backoff_multiplier  double precision,
    job_backoff_jitter      double precision,
    job_header_names     text[],
    job_header_values    text[],
    -- The template's own key is replaced by the firing's; kept for the view.
    job_idempotency_key  text,
    job_idempotency_ttl_ms  bigint,
    -- The next due instant (wall-clock ms); NULL while paused or when the
    -- rule has no future instant.
    next_fire_ms         bigint,
    last_fire_ms         bigint,
    last_job             bigint,
    fires                bigint NOT NULL DEFAULT 0,
    misfires_skipped     bigint NOT NULL DEFAULT 0,
    backlog_skips        bigint NOT NULL DEFAULT 0,
    last_skew_ms         bigint,
    created_ns           bigint NOT NULL,
    updated_ns           bigint NOT NULL,
    version              bigint NOT NULL
);
-- The timer pass: due schedules, earliest first.
CREATE INDEX spool_schedules_due ON spool_schedules (next_fire_ms)
    WHERE next_fire_ms IS NOT NULL;
