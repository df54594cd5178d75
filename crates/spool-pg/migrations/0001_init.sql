-- spool's PostgreSQL schema, version 1. Times are whole nanoseconds since
-- the Unix epoch on the broker's clock (never SQL now()), durations are
-- milliseconds; ids, priorities and versions are bigint (u64/u32 in Rust).

CREATE SEQUENCE spool_job_ids;
-- Lease tokens of every node: a token names one reservation, never reused.
CREATE SEQUENCE spool_lease_tokens;

-- One row per queue with a policy or a pause; the row a reserve locks when
-- the queue has dispatch limits (its GCRA instant lives here).
CREATE TABLE spool_queues (
    name                text PRIMARY KEY,
    max_jobs            bigint,
    max_attempts        integer,
    backoff_initial_ms  bigint,
    backoff_max_ms      bigint,
    backoff_multiplier  double precision,
    backoff_jitter      double precision,
    ttr_ms              bigint,
    retention_ms        bigint,
    retention_max_jobs  bigint,
    concurrency         integer,
    rate_per_s          double precision,
    -- Paused until this instant (i64::MAX: until resumed); NULL: not paused.
    paused_until_ns     bigint,
    -- GCRA's theoretical arrival time of the rate limit's bucket.
    rate_tat_ns         bigint NOT NULL DEFAULT 0
);

CREATE TABLE spool_jobs (
    id                  bigint PRIMARY KEY,
    queue               text NOT NULL,
    state               text NOT NULL CHECK (state IN
                            ('ready', 'reserved', 'delayed', 'buried', 'completed', 'cancelled')),
    priority            bigint NOT NULL,
    payload             bytea NOT NULL,
    header_names        text[],
    header_values       text[],
    attempts            integer NOT NULL DEFAULT 0,
    -- 0: no limit (beanstalkd's semantics).
    max_attempts        integer NOT NULL,
    -- The job's own backoff, all four or none.
    backoff_initial_ms  bigint,
    backoff_max_ms      bigint,
    backoff_multiplier  double precision,
    backoff_jitter      double precision,
    ttr_ms              bigint NOT NULL,
    -- delayed: when it becomes ready.
    run_at_ns           bigint,
    -- reserved: the lease's token, deadline and the node holding it.
    lease_token         bigint,
    deadline_ns         bigint,
    lease_owner         text,
    created_ns          bigint NOT NULL,
    updated_ns          bigint NOT NULL,
    -- completed, cancelled: when, and when the retention by age forgets it.
    finished_ns         bigint,
    purge_at_ns         bigint,
    last_error          text,
    result              bytea,
    idempotency_key     text,
    cancel_requested    boolean NOT NULL DEFAULT false,
    version             bigint NOT NULL,
    -- beanstalkd's stats-job counters.
    reserves            integer NOT NULL DEFAULT 0,
    timeouts            integer NOT NULL DEFAULT 0,
    releases            integer NOT NULL DEFAULT 0,
    buries              integer NOT NULL DEFAULT 0,
    kicks               integer NOT NULL DEFAULT 0
) WITH (fillfactor = 80);

-- The reserve: best priority, then oldest, of a queue's ready jobs.
CREATE INDEX spool_jobs_ready ON spool_jobs (queue, priority, id) WHERE state = 'ready';
-- Timers any node runs: due delayed jobs, expired leases, retention.
CREATE INDEX spool_jobs_due ON spool_jobs (run_at_ns) WHERE state = 'delayed';
CREATE INDEX spool_jobs_leases ON spool_jobs (deadline_ns) WHERE state = 'reserved';
CREATE INDEX spool_jobs_purge ON spool_jobs (purge_at_ns)
    WHERE state IN ('completed', 'cancelled');
-- Listings, counts and purges by queue and state.
CREATE INDEX spool_jobs_listing ON spool_jobs (queue, state, id);

-- Idempotency keys, one per queue and key: the primary key is the unique
-- index enqueues race on (ON CONFLICT). A key outlives nothing: it goes
-- with its job.
CREATE TABLE spool_idempotency (
    queue       text NOT NULL,
    key         text NOT NULL,
    job_id      bigint NOT NULL REFERENCES spool_jobs (id) ON DELETE CASCADE,
    expires_ns  bigint NOT NULL,
    PRIMARY KEY (queue, key)
);
CREATE INDEX spool_idempotency_job ON spool_idempotency (job_id);
CREATE INDEX spool_idempotency_expiry ON spool_idempotency (expires_ns);
