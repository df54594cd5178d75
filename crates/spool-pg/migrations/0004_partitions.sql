-- Schema version 4: spool_jobs partitioned by state into the live jobs
-- (ready, reserved, delayed, buried) and the final ones (completed,
-- cancelled), so that churn does not bloat the table.
--
-- In one table, a job left three dead row versions and nine index entries
-- (the reserve and completion updates change `state`, which every partial
-- index names, so no update is HOT), and the final rows the retention keeps
-- (most of the table) shared their pages and index leaves with that churn.
-- Now a job's completion moves its row to spool_jobs_final (PostgreSQL
-- runs a cross-partition update as a delete and an insert): the final
-- partition is insert-only until the retention deletes its oldest rows, one
-- entry per index and job, and the churn of updates stays in the live
-- partition, which holds only the jobs waiting or running and is vacuumed
-- often at little cost. Queries still name spool_jobs; a `state` condition
-- prunes to one partition.
--
-- A unique index of a partitioned table must contain the partition key, so
-- each partition has its own primary key on `id`; ids are unique across
-- them because one sequence draws them and a row only ever moves. For the
-- same reason a foreign key cannot name spool_jobs (id) any more: a
-- trigger does what `ON DELETE CASCADE` did for idempotency keys.

ALTER TABLE spool_jobs RENAME TO spool_jobs_v3;
ALTER INDEX spool_jobs_ready RENAME TO spool_jobs_v3_ready;
ALTER INDEX spool_jobs_due RENAME TO spool_jobs_v3_due;
ALTER INDEX spool_jobs_leases RENAME TO spool_jobs_v3_leases;
ALTER INDEX spool_jobs_purge RENAME TO spool_jobs_v3_purge;
ALTER INDEX spool_jobs_listing RENAME TO spool_jobs_v3_listing;

-- The same columns in the same order, defaults and CHECK included.
CREATE TABLE spool_jobs (LIKE spool_jobs_v3 INCLUDING DEFAULTS INCLUDING CONSTRAINTS)
    PARTITION BY LIST (state);

-- Vacuumed after 1% of dead rows, without cost sleeps (as migration 3 set
-- for the one table); the churn-driven vacuum of each node does the rest.
-- The live rows are updated in place where they can be: pages kept 80% full.
CREATE TABLE spool_jobs_live PARTITION OF spool_jobs
    FOR VALUES IN ('ready', 'reserved', 'delayed', 'buried')
    WITH (
        fillfactor = 80,
        autovacuum_vacuum_scale_factor = 0.01,
        autovacuum_vacuum_threshold = 1000,
        autovacuum_vacuum_insert_scale_factor = 0.01,
        autovacuum_analyze_scale_factor = 0.02,
        autovacuum_vacuum_cost_delay = 0
    );
-- Final rows are never updated: pages filled.
CREATE TABLE spool_jobs_final PARTITION OF spool_jobs
    FOR VALUES IN ('completed', 'cancelled')
    WITH (
        autovacuum_vacuum_scale_factor = 0.01,
        autovacuum_vacuum_threshold = 1000,
        autovacuum_vacuum_insert_scale_factor = 0.01,
        autovacuum_analyze_scale_factor = 0.02,
        autovacuum_vacuum_cost_delay = 0
    );
ALTER TABLE spool_jobs_live ADD PRIMARY KEY (id);
ALTER TABLE spool_jobs_final ADD PRIMARY KEY (id);

INSERT INTO spool_jobs SELECT * FROM spool_jobs_v3;
-- Also drops spool_idempotency's foreign key to it.
DROP TABLE spool_jobs_v3 CASCADE;

-- The indexes of version 1, each only where its rows can be.
CREATE INDEX spool_jobs_ready ON spool_jobs_live (queue, priority, id) WHERE state = 'ready';
CREATE INDEX spool_jobs_due ON spool_jobs_live (run_at_ns) WHERE state = 'delayed';
CREATE INDEX spool_jobs_leases ON spool_jobs_live (deadline_ns) WHERE state = 'reserved';
CREATE INDEX spool_jobs_purge ON spool_jobs_final (purge_at_ns);
CREATE INDEX spool_jobs_listing ON spool_jobs (queue, state, id);

-- A key goes with its job, as the foreign key's cascade did. A completion
-- or cancellation moving the row to the final partition is a delete there
-- too: the job then still exists (AFTER row triggers run at the end of the
-- statement, once the row is in its new partition), and the key stays.
CREATE FUNCTION spool_forget_idempotency_key() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM spool_idempotency
        WHERE job_id = OLD.id AND NOT EXISTS (SELECT 1 FROM spool_jobs WHERE id = OLD.id);
    RETURN NULL;
END
$$;
CREATE TRIGGER spool_jobs_forget_key AFTER DELETE ON spool_jobs
    FOR EACH ROW WHEN (OLD.idempotency_key IS NOT NULL)
    EXECUTE FUNCTION spool_forget_idempotency_key();
