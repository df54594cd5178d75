#!/usr/bin/env node
// graphile-worker, the peer of `scripts/bench-pg-graphile.sh`: the same
// loads that script runs on spool, on the same database.
//
//   node scripts/graphile-bench.js work    JOBS PROCS CONCURRENCY LOCAL_QUEUE COMPLETE_DELAY_MS ENQUEUE_BATCH TIME_LIMIT_S
//   node scripts/graphile-bench.js enqueue JOBS CONNECTIONS TIME_LIMIT_S
//
// work: PROCS worker processes (`run()`, CONCURRENCY jobs at once each,
// `localQueue.size` LOCAL_QUEUE and `completeJobBatchDelay`
// COMPLETE_DELAY_MS, -1 = off) run a no-op task while this process
// enqueues JOBS jobs with `addJobs` in batches of ENQUEUE_BATCH. Timed from
// the first enqueue until every job's row is gone (a completed job is
// deleted), so a completion still waiting in a batch is not counted as
// done. Prints one JSON line.
//
// enqueue: CONNECTIONS loops each call `addJob` one job at a time, JOBS in
// all; rate and latency percentiles. Prints one JSON line.
//
// DATABASE_URL names the database; GRAPHILE_MODULES the node_modules
// directory graphile-worker was installed into. Every loop is bounded by
// its job count and TIME_LIMIT_S.
"use strict";

const path = require("path");
const { fork } = require("child_process");

const modules = process.env.GRAPHILE_MODULES;
if (!modules) {
  console.error("GRAPHILE_MODULES must name the node_modules holding graphile-worker");
  process.exit(2);
}
const gw = require(path.join(modules, "graphile-worker"));
const connectionString = process.env.DATABASE_URL;
if (!connectionString) {
  console.error("DATABASE_URL must name the database");
  process.exit(2);
}

const TASK = "noop";
// A task's no-op handler; counted per process and reported to the parent.
let handled = 0;

function intArg(args, i, name) {
  const n = Number(args[i]);
  if (!Number.isInteger(n)) {
    console.error(`${name}: expected an integer, got ${args[i]}`);
    process.exit(2);
  }
  return n;
}

function quiet() {
  // graphile-worker logs every job at info; only errors are worth printing.
  return new gw.Logger(() => (level, message) => {
    if (level === "error") console.error(message);
  });
}

async function child() {
  const [concurrency, localQueue, completeDelayMs] = JSON.parse(process.env.GRAPHILE_CHILD);
  const worker = {};
  if (localQueue > 1) worker.localQueue = { size: localQueue };
  if (completeDelayMs >= 0) worker.completeJobBatchDelay = completeDelayMs;
  const runner = await gw.run({
    connectionString,
    concurrency,
    maxPoolSize: concurrency + 2,
    noHandleSignals: true,
    pollInterval: 1000,
    logger: quiet(),
    taskList: {
      [TASK]: async () => {
        handled++;
      },
    },
    preset: { worker },
  });
  let reported = 0;
  const report = setInterval(() => {
    if (handled !== reported) {
      reported = handled;
      process.send({ handled });
    }
  }, 5);
  process.on("message", async (m) => {
    if (m === "stop") {
      clearInterval(report);
      await runner.stop();
      process.exit(0);
    }
  });
  process.send("ready");
}

function percentile(sorted, q) {
  if (sorted.length === 0) return null;
  return sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))];
}

async function jobRows(utils) {
  return utils.withPgClient(async (client) => {
    const r = await client.query("SELECT count(*)::int AS n FROM graphile_worker._private_jobs");
    return r.rows[0].n;
  });
}

async function work(args) {
  const jobs = intArg(args, 0, "JOBS");
  const procs = intArg(args, 1, "PROCS");
  const concurrency = intArg(args, 2, "CONCURRENCY");
  const localQueue = intArg(args, 3, "LOCAL_QUEUE");
  const completeDelayMs = intArg(args, 4, "COMPLETE_DELAY_MS");
  const batch = intArg(args, 5, "ENQUEUE_BATCH");
  const limitMs = intArg(args, 6, "TIME_LIMIT_S") * 1000;
  const deadline = Date.now() + limitMs;

  await gw.runMigrations({ connectionString, logger: quiet() });
  const utils = await gw.makeWorkerUtils({ connectionString, logger: quiet() });
  if ((await jobRows(utils)) !== 0) throw new Error("graphile-worker's job table is not empty");

  const children = [];
  const counts = new Array(procs).fill(0);
  const ready = [];
  for (let i = 0; i < procs; i++) {
    const c = fork(__filename, [], {
      env: { ...process.env, GRAPHILE_CHILD: JSON.stringify([concurrency, localQueue, completeDelayMs]) },
    });
    ready.push(
      new Promise((resolve, reject) => {
        c.on("message", (m) => {
          if (m === "ready") resolve();
          else if (m && typeof m.handled === "number") counts[i] = m.handled;
        });
        c.on("exit", (code) => {
          if (code !== 0) reject(new Error(`worker process ${i} exited with ${code}`));
        });
      }),
    );
    children.push(c);
  }
  await Promise.all(ready);

  const started = process.hrtime.bigint();
  // Four batches in flight, as the spool side's producers.
  let next = 0;
  async function producer() {
    while (next < jobs && Date.now() < deadline) {
      const n = Math.min(batch, jobs - next);
      next += n;
      const specs = [];
      for (let k = 0; k < n; k++) specs.push({ identifier: TASK, payload: {} });
      await utils.addJobs(specs);
    }
  }
  await Promise.all([producer(), producer(), producer(), producer()]);
  const enqueued = next;

  const sum = () => counts.reduce((a, b) => a + b, 0);
  while (sum() < enqueued && Date.now() < deadline) {
    await new Promise((r) => setTimeout(r, 2));
  }
  // Handled is not done: a batched completion commits later.
  let left = await jobRows(utils);
  while (left > 0 && Date.now() < deadline) {
    await new Promise((r) => setTimeout(r, 2));
    left = await jobRows(utils);
  }
  const elapsed = Number(process.hrtime.bigint() - started) / 1e9;
  for (const c of children) c.send("stop");
  await utils.release();
  const complete = left === 0 && enqueued === jobs && sum() === jobs;
  console.log(
    JSON.stringify({
      mode: "work",
      jobs,
      handled: sum(),
      rows_left: left,
      complete,
      procs,
      concurrency,
      local_queue: localQueue,
      complete_job_batch_delay_ms: completeDelayMs,
      enqueue_batch: batch,
      elapsed_secs: elapsed,
      jobs_per_sec: jobs / elapsed,
    }),
  );
  if (!complete) process.exitCode = 1;
}

async function enqueue(args) {
  const jobs = intArg(args, 0, "JOBS");
  const connections = intArg(args, 1, "CONNECTIONS");
  const deadline = Date.now() + intArg(args, 2, "TIME_LIMIT_S") * 1000;
  await gw.runMigrations({ connectionString, logger: quiet() });
  const utils = await gw.makeWorkerUtils({
    connectionString,
    maxPoolSize: connections,
    logger: quiet(),
  });
  const latenciesUs = [];
  let next = 0;
  async function loop() {
    while (next < jobs && Date.now() < deadline) {
      next++;
      const t = process.hrtime.bigint();
      await utils.addJob(TASK, {});
      latenciesUs.push(Number(process.hrtime.bigint() - t) / 1000);
    }
  }
  // Connections are opened before the clock starts, as spool's bench does.
  await Promise.all(
    Array.from({ length: connections }, () => utils.withPgClient((c) => c.query("SELECT 1"))),
  );
  const started = process.hrtime.bigint();
  await Promise.all(Array.from({ length: connections }, loop));
  const elapsed = Number(process.hrtime.bigint() - started) / 1e9;
  // Leave the table empty for the next run.
  await utils.withPgClient((c) => c.query("DELETE FROM graphile_worker._private_jobs"));
  await utils.release();
  latenciesUs.sort((a, b) => a - b);
  const done = latenciesUs.length;
  console.log(
    JSON.stringify({
      mode: "enqueue",
      jobs,
      done,
      complete: done === jobs,
      connections,
      elapsed_secs: elapsed,
      jobs_per_sec: done / elapsed,
      p50_us: percentile(latenciesUs, 0.5),
      p99_us: percentile(latenciesUs, 0.99),
      max_us: latenciesUs[done - 1],
    }),
  );
  if (done !== jobs) process.exitCode = 1;
}

async function main() {
  if (process.env.GRAPHILE_CHILD) return child();
  const [mode, ...args] = process.argv.slice(2);
  if (mode === "work") return work(args);
  if (mode === "enqueue") return enqueue(args);
  console.error("usage: graphile-bench.js work|enqueue ARGS (see the head of this file)");
  process.exit(2);
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
