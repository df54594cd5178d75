-- Schema version 5: the live partition loses its (queue, state, id) index.
--
-- No update of a live row is HOT (`state` is named by every partial index),
-- so each index of the live partition takes an entry at every insert and at
-- every reserve, and leaves a dead one for the vacuum: the listing index was
-- a third of that work for the hot path, which never reads it (the reserve
-- reads the ready index, completions the primary key). Measured with
-- scripts/bench-pg-graphile.sh: PostgreSQL's CPU a job 46-50 -> 40 us, WAL
-- 1,315 -> 1,090 bytes, jobs through +13%.
--
-- What the listings and counts read instead: delayed and buried jobs keep
-- (queue, state, id), partial, so that beanstalkd's peek-delayed,
-- peek-buried and kick, and their listings, stay an index range (neither
-- state is on the hot path, and their rows take the entry once); ready jobs
-- are read through the ready index or the primary key, reserved ones through
-- the primary key or the lease index; counts of live jobs scan the live
-- partition, which holds only the jobs waiting and running. The final
-- partition keeps its (queue, state, id) index (insert-only, read by
-- listings and the retention).

DROP INDEX spool_jobs_listing;
CREATE INDEX spool_jobs_final_listing ON spool_jobs_final (queue, state, id);
CREATE INDEX spool_jobs_parked ON spool_jobs_live (queue, state, id)
    WHERE state IN ('delayed', 'buried');
