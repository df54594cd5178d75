-- Schema version 3: spool_jobs is a queue table, every row changed a few
-- times and then deleted by the retention. PostgreSQL's default autovacuum
-- waits for dead rows to reach 20% of the table before it cleans up, and
-- sleeps as it goes: the table and its indexes grow several times over the
-- rows they hold. Vacuumed after 1% (at least 1,000 dead rows), without
-- the cost sleeps, the space of deleted and updated rows is reused soon.
ALTER TABLE spool_jobs SET (
    autovacuum_vacuum_scale_factor = 0.01,
    autovacuum_vacuum_threshold = 1000,
    autovacuum_vacuum_insert_scale_factor = 0.01,
    autovacuum_analyze_scale_factor = 0.02,
    autovacuum_vacuum_cost_delay = 0
);
