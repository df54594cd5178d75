//! A small bounded pool of tokio-postgres connections, each with a cache of
//! prepared statements. Acquiring waits at most the configured time and
//! then fails with a clear error instead of pinning the caller; a
//! connection that broke, or was abandoned inside a transaction (its
//! operation timed out or was dropped), is closed instead of reused.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use spool_broker::{Buckets, Histogram};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls, Row, Statement};

use crate::error::DbError;

/// Pool figures for `spool_db_pool_connections{state}` and alerts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Connections the pool may hold.
    pub max: u64,
    /// Open and lent out now.
    pub busy: u64,
    /// Open and waiting in the pool.
    pub idle: u64,
    /// Callers waiting for a connection now.
    pub waiting: u64,
    /// Acquires that gave up after the acquire timeout.
    pub acquire_timeouts: u64,
    /// Connection attempts that failed.
    pub connect_errors: u64,
    /// Operations that failed in the database (not refusals of the job
    /// model): lost connections, timeouts, errors.
    pub query_errors: u64,
    /// Round trips to the database by operations (statements pipelined
    /// together count once): what an operation costs in latency.
    pub round_trips: u64,
}

#[derive(Debug)]
pub(crate) struct Pool {
    config: tokio_postgres::Config,
    idle: Mutex<Vec<Conn>>,
    permits: Arc<Semaphore>,
    max: usize,
    acquire_timeout: Duration,
    connect_timeout: Duration,
    busy: AtomicU64,
    waiting: AtomicU64,
    round_trips: Arc<AtomicU64>,
    acquire_timeouts: AtomicU64,
    connect_errors: AtomicU64,
    /// How long each acquire waited, a timed-out one included
    /// (`spool_db_pool_acquire_seconds`): a pool too small for the load
    /// shows here long before acquires time out.
    acquire_wait: Mutex<Histogram>,
}

/// One open connection and its prepared statements.
///
/// Round trips are what an operation costs, so a transaction's `BEGIN` is
/// not sent on its own: it goes out pipelined with the transaction's first
/// statement; and its notifications go out pipelined with its `COMMIT`
/// (`pg_notify` delivers at commit anyway). A statement that fails aborts
/// the transaction, so a `COMMIT` pipelined behind it commits nothing.
#[derive(Debug)]
pub(crate) struct Conn {
    client: Client,
    statements: HashMap<&'static str, Statement>,
    /// A `BEGIN` was sent (or is pending) and no `COMMIT` or `ROLLBACK`
    /// finished.
    in_transaction: bool,
    /// `begin` was called and no statement has carried the `BEGIN` yet.
    begin_pending: bool,
    /// Queues to announce on the `spool` channel at commit, without repeats.
    notify_at_commit: Vec<String>,
    /// The pool's count of round trips.
    round_trips: Arc<AtomicU64>,
}

/// One statement of a pipeline: its text and parameters.
pub(crate) type Stmt<'a> = (&'static str, &'a [&'a (dyn ToSql + Sync)]);

/// The partitions of `spool_jobs` (schema version 4): the live jobs, the
/// final ones.
/// `pg_try_advisory_lock`'s key for rebuilding `spool_jobs_live`'s
/// indexes: "spoolrx" in ASCII.
const REINDEX_LOCK_KEY: i64 = 0x73_70_6f_6f_6c_72_78;

pub(crate) const JOB_PARTITIONS: [&str; 2] = ["spool_jobs_live", "spool_jobs_final"];

/// Announces queues on the `spool` channel, one statement for all.
const NOTIFY_SQL: &str = "SELECT pg_notify('spool', q) FROM unnest($1::text[]) AS q";

impl Conn {
    async fn statement(&mut self, sql: &'static str) -> Result<Statement, DbError> {
        if let Some(statement) = self.statements.get(sql) {
            return Ok(statement.clone());
        }
        self.round_trip();
        let statement = self.client.prepare(sql).await?;
        self.statements.insert(sql, statement.clone());
        Ok(statement)
    }

    fn round_trip(&self) {
        self.round_trips.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether the next statement carries the pending `BEGIN`.
    fn take_begin(&mut self) -> bool {
        std::mem::take(&mut self.begin_pending)
    }

    /// Sends `BEGIN` when `send`: a future to pipeline with a statement.
    async fn begin_if(client: &Client, send: bool) -> Result<(), tokio_postgres::Error> {
        if send {
            client.batch_execute("BEGIN").await
        } else {
            Ok(())
        }
    }

    pub async fn query(
        &mut self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, DbError> {
        let statement = self.statement(sql).await?;
        let begin = self.take_begin();
        self.round_trip();
        let client = &self.client;
        let (began, rows) = tokio::join!(
            Conn::begin_if(client, begin),
            client.query(&statement, params)
        );
        began?;
        Ok(rows?)
    }

    pub async fn query_opt(
        &mut self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, DbError> {
        let statement = self.statement(sql).await?;
        let begin = self.take_begin();
        self.round_trip();
        let client = &self.client;
        let (began, row) = tokio::join!(
            Conn::begin_if(client, begin),
            client.query_opt(&statement, params)
        );
        began?;
        Ok(row?)
    }

    pub async fn execute(
        &mut self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, DbError> {
        let statement = self.statement(sql).await?;
        let begin = self.take_begin();
        self.round_trip();
        let client = &self.client;
        let (began, count) = tokio::join!(
            Conn::begin_if(client, begin),
            client.execute(&statement, params)
        );
        began?;
        Ok(count?)
    }

    /// Three independent statements in one round trip (in order, in the
    /// transaction if one is open).
    pub async fn query3(
        &mut self,
        a: Stmt<'_>,
        b: Stmt<'_>,
        c: Stmt<'_>,
    ) -> Result<(Vec<Row>, Vec<Row>, Vec<Row>), DbError> {
        let (sa, sb, sc) = (
            self.statement(a.0).await?,
            self.statement(b.0).await?,
            self.statement(c.0).await?,
        );
        let begin = self.take_begin();
        self.round_trip();
        let client = &self.client;
        let (began, ra, rb, rc) = tokio::join!(
            Conn::begin_if(client, begin),
            client.query(&sa, a.1),
            client.query(&sb, b.1),
            client.query(&sc, c.1)
        );
        began?;
        Ok((ra?, rb?, rc?))
    }

    /// The transaction's last statement and its `COMMIT` in one round trip
    /// (with the pending notifications before them). After this the
    /// connection is out of the transaction, whatever happened.
    pub async fn query_and_commit(
        &mut self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, DbError> {
        let statement = self.statement(sql).await?;
        let notify = self.notify_statement().await?;
        let queues = std::mem::take(&mut self.notify_at_commit);
        let begin = self.take_begin();
        self.round_trip();
        let client = &self.client;
        let (began, notified, rows, committed) = tokio::join!(
            Conn::begin_if(client, begin),
            Conn::notify_if(client, notify.as_ref(), &queues),
            client.query(&statement, params),
            client.batch_execute("COMMIT")
        );
        // An error before the COMMIT aborted the transaction: the COMMIT
        // rolled it back, and the first error is the answer.
        began?;
        notified?;
        let rows = rows?;
        committed?;
        self.in_transaction = false;
        Ok(rows)
    }

    /// [`Conn::query_and_commit`] when `commit`, else [`Conn::query`].
    pub async fn query_maybe_committing(
        &mut self,
        commit: bool,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, DbError> {
        if commit {
            self.query_and_commit(sql, params).await
        } else {
            self.query(sql, params).await
        }
    }

    async fn notify_statement(&mut self) -> Result<Option<Statement>, DbError> {
        if self.notify_at_commit.is_empty() {
            return Ok(None);
        }
        Ok(Some(self.statement(NOTIFY_SQL).await?))
    }

    async fn notify_if(
        client: &Client,
        statement: Option<&Statement>,
        queues: &[String],
    ) -> Result<(), tokio_postgres::Error> {
        match statement {
            Some(statement) => client.execute(statement, &[&queues]).await.map(|_| ()),
            None => Ok(()),
        }
    }

    /// Wakes waits on `queue` on every node when the transaction commits.
    pub fn notify_at_commit(&mut self, queue: &str) {
        // Outside a transaction there is no commit to carry it.
        debug_assert!(self.in_transaction, "a notification outside a transaction");
        if !self.notify_at_commit.iter().any(|q| q == queue) {
            self.notify_at_commit.push(queue.to_owned());
        }
    }

    /// Announces `queues` in a transaction of their own, right after the
    /// caller's committed, with `synchronous_commit` off for it alone (one
    /// round trip). A notifying transaction holds PostgreSQL's database-
    /// wide notification lock from before its commit until the commit is
    /// done: with the flush inside, notifying commits of every node go one
    /// at a time; without it the lock is held for microseconds, and the
    /// caller's commit, made without notifications, shares its WAL flush
    /// with others. A notification is a hint to look again (a crash in
    /// between leaves waits to their fallback poll), so it needs no flush.
    /// On an error the connection is left marked inside a transaction, so
    /// the pool closes it.
    pub async fn notify_now(&mut self, queues: &[String]) -> Result<(), DbError> {
        if queues.is_empty() {
            return Ok(());
        }
        debug_assert!(!self.in_transaction, "notify_now inside a transaction");
        let statement = self.statement(NOTIFY_SQL).await?;
        self.in_transaction = true;
        self.round_trip();
        let client = &self.client;
        let params: [&(dyn ToSql + Sync); 1] = [&queues];
        let (began, notified, committed) = tokio::join!(
            client.batch_execute("BEGIN; SET LOCAL synchronous_commit = off"),
            client.execute(&statement, &params),
            client.batch_execute("COMMIT")
        );
        began?;
        notified?;
        committed?;
        self.in_transaction = false;
        Ok(())
    }

    /// Dead and live row versions of each partition of `spool_jobs`
    /// ([`JOB_PARTITIONS`], in that order) in PostgreSQL's statistics:
    /// every node's churn (and autovacuum's work), each backend's share at
    /// most about a second late.
    pub async fn jobs_dead_and_live_rows(&mut self) -> Result<[(u64, u64); 2], DbError> {
        debug_assert!(!self.in_transaction, "statistics are read alone");
        let statement = self
            .statement(
                "SELECT pg_stat_get_dead_tuples('spool_jobs_live'::regclass), \
                        pg_stat_get_live_tuples('spool_jobs_live'::regclass), \
                        pg_stat_get_dead_tuples('spool_jobs_final'::regclass), \
                        pg_stat_get_live_tuples('spool_jobs_final'::regclass)",
            )
            .await?;
        self.round_trip();
        let row = self.client.query_one(&statement, &[]).await?;
        let rows = |i: usize| u64::try_from(row.get::<_, i64>(i)).unwrap_or(0);
        Ok([(rows(0), rows(1)), (rows(2), rows(3))])
    }

    /// Whether this connection's role may vacuum `spool_jobs`: from
    /// PostgreSQL 17 the `MAINTAIN` privilege (owners, superusers,
    /// `pg_maintain` and grantees have it); before, the table's or the
    /// database's owner (superusers are members of every role).
    pub async fn may_vacuum_jobs(&mut self) -> Result<bool, DbError> {
        let statement = self
            .statement(
                "SELECT CASE WHEN current_setting('server_version_num')::int >= 170000 \
                        THEN has_table_privilege(c.oid, $1::text) \
                        ELSE pg_has_role(c.relowner, 'USAGE') OR pg_has_role(d.datdba, 'USAGE') \
                        END \
                 FROM pg_class c, pg_database d \
                 WHERE c.oid = 'spool_jobs'::regclass AND d.datname = current_database()",
            )
            .await?;
        self.round_trip();
        // A parameter, so that servers before 17, which do not know the
        // privilege's name, never parse it.
        let row = self.client.query_one(&statement, &[&"MAINTAIN"]).await?;
        Ok(row.get::<_, bool>(0))
    }

    /// `VACUUM (SKIP_LOCKED)` of the partitions of `spool_jobs` named by
    /// `due` (as [`JOB_PARTITIONS`]), alone (it cannot run in a
    /// transaction, nor in a pipeline, which is one); a partition another
    /// node or autovacuum is vacuuming is skipped.
    pub async fn vacuum_jobs(&mut self, due: [bool; 2]) -> Result<(), DbError> {
        debug_assert!(!self.in_transaction, "a vacuum inside a transaction");
        let tables: Vec<&str> = JOB_PARTITIONS
            .iter()
            .zip(due)
            .filter_map(|(table, due)| due.then_some(*table))
            .collect();
        if tables.is_empty() {
            return Ok(());
        }
        self.round_trip();
        self.client
            .batch_execute(&format!("VACUUM (SKIP_LOCKED) {}", tables.join(", ")))
            .await?;
        Ok(())
    }

    /// Bytes of `spool_jobs_live`'s indexes and its live rows in the
    /// statistics.
    pub async fn live_index_bytes_and_rows(&mut self) -> Result<(u64, u64), DbError> {
        debug_assert!(!self.in_transaction, "statistics are read alone");
        let statement = self
            .statement(
                "SELECT pg_indexes_size('spool_jobs_live'::regclass), \
                        pg_stat_get_live_tuples('spool_jobs_live'::regclass)",
            )
            .await?;
        self.round_trip();
        let row = self.client.query_one(&statement, &[]).await?;
        let figure = |i: usize| u64::try_from(row.get::<_, i64>(i)).unwrap_or(0);
        Ok((figure(0), figure(1)))
    }

    /// Rebuilds `spool_jobs_live`'s indexes with `REINDEX TABLE
    /// CONCURRENTLY` (reads and writes go on meanwhile), under a session
    /// advisory lock so that one node at a time rebuilds. First drops the
    /// invalid indexes a rebuild cut short left behind (by the statement
    /// timeout, say): PostgreSQL keeps updating them on every write.
    /// Answers how many it dropped, or `None` when another node holds the
    /// lock.
    pub async fn reindex_live(&mut self) -> Result<Option<u32>, DbError> {
        debug_assert!(!self.in_transaction, "a rebuild inside a transaction");
        self.round_trip();
        let locked: bool = self
            .client
            .query_one("SELECT pg_try_advisory_lock($1)", &[&REINDEX_LOCK_KEY])
            .await?
            .get(0);
        if !locked {
            return Ok(None);
        }
        let rebuilt = self.reindex_live_locked().await;
        self.round_trip();
        let unlocked = self
            .client
            .execute("SELECT pg_advisory_unlock($1)", &[&REINDEX_LOCK_KEY])
            .await;
        let dropped = rebuilt?;
        unlocked?;
        Ok(Some(dropped))
    }

    async fn reindex_live_locked(&mut self) -> Result<u32, DbError> {
        self.round_trip();
        // Only the rebuild's own names: an index someone is building by
        // hand is invalid too until it is done.
        let leftovers = self
            .client
            .query(
                "SELECT i.indexrelid::regclass::text FROM pg_index i \
                 JOIN pg_class c ON c.oid = i.indexrelid \
                 WHERE i.indrelid = 'spool_jobs_live'::regclass AND NOT i.indisvalid \
                 AND c.relname ~ '_cc(new|old)[0-9]*$'",
                &[],
            )
            .await?;
        for leftover in &leftovers {
            let name: String = leftover.get(0);
            self.round_trip();
            // The name comes from the catalog, quoted by `regclass`.
            self.client
                .batch_execute(&format!("DROP INDEX CONCURRENTLY IF EXISTS {name}"))
                .await?;
        }
        self.round_trip();
        self.client
            .batch_execute("REINDEX TABLE CONCURRENTLY spool_jobs_live")
            .await?;
        Ok(u32::try_from(leftovers.len()).unwrap_or(u32::MAX))
    }

    /// Opens a transaction; its `BEGIN` travels with its first statement.
    pub async fn begin(&mut self) -> Result<(), DbError> {
        self.in_transaction = true;
        self.begin_pending = true;
        self.notify_at_commit.clear();
        Ok(())
    }

    /// Commits (with the pending notifications); nothing to send if the
    /// transaction ran no statement or was committed already.
    pub async fn commit(&mut self) -> Result<(), DbError> {
        if !self.in_transaction {
            return Ok(());
        }
        if self.take_begin() {
            self.in_transaction = false;
            self.notify_at_commit.clear();
            return Ok(());
        }
        let notify = self.notify_statement().await?;
        let queues = std::mem::take(&mut self.notify_at_commit);
        self.round_trip();
        let client = &self.client;
        let (notified, committed) = tokio::join!(
            Conn::notify_if(client, notify.as_ref(), &queues),
            client.batch_execute("COMMIT")
        );
        notified?;
        committed?;
        self.in_transaction = false;
        Ok(())
    }

    pub async fn rollback(&mut self) -> Result<(), DbError> {
        self.notify_at_commit.clear();
        if !self.in_transaction {
            return Ok(());
        }
        if self.take_begin() {
            self.in_transaction = false;
            return Ok(());
        }
        self.round_trip();
        self.client.batch_execute("ROLLBACK").await?;
        self.in_transaction = false;
        Ok(())
    }
}

impl Pool {
    pub fn new(
        config: tokio_postgres::Config,
        max: usize,
        acquire_timeout: Duration,
        connect_timeout: Duration,
    ) -> Pool {
        Pool {
            config,
            idle: Mutex::new(Vec::new()),
            permits: Arc::new(Semaphore::new(max)),
            max,
            acquire_timeout,
            connect_timeout,
            busy: AtomicU64::new(0),
            waiting: AtomicU64::new(0),
            round_trips: Arc::new(AtomicU64::new(0)),
            acquire_timeouts: AtomicU64::new(0),
            connect_errors: AtomicU64::new(0),
            acquire_wait: Mutex::new(Histogram::new(Buckets::IoLatency)),
        }
    }

    fn observe_acquire(&self, started: std::time::Instant) {
        let waited_ns = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.acquire_wait
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .observe_ns(waited_ns);
    }

    /// A copy of the acquire-wait histogram (seconds).
    pub fn acquire_wait(&self) -> Histogram {
        self.acquire_wait
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Opens a connection outside the pool's bound (the listener, the
    /// migrations).
    pub async fn connect(
        &self,
    ) -> Result<
        (
            Client,
            tokio_postgres::Connection<tokio_postgres::Socket, tokio_postgres::tls::NoTlsStream>,
        ),
        DbError,
    > {
        match tokio::time::timeout(self.connect_timeout, self.config.connect(NoTls)).await {
            Ok(Ok(pair)) => Ok(pair),
            Ok(Err(error)) => {
                self.connect_errors.fetch_add(1, Ordering::Relaxed);
                Err(DbError::Unreachable(error.to_string()))
            }
            Err(_) => {
                self.connect_errors.fetch_add(1, Ordering::Relaxed);
                Err(DbError::Unreachable(format!(
                    "no connection within {} ms",
                    self.connect_timeout.as_millis()
                )))
            }
        }
    }

    async fn open(&self) -> Result<Conn, DbError> {
        let (client, connection) = self.connect().await?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "database connection ended");
            }
        });
        Ok(Conn {
            client,
            statements: HashMap::new(),
            in_transaction: false,
            begin_pending: false,
            notify_at_commit: Vec::new(),
            round_trips: self.round_trips.clone(),
        })
    }

    /// A connection, within the acquire timeout.
    pub async fn get(self: &Arc<Self>) -> Result<PooledConn, DbError> {
        let started = std::time::Instant::now();
        self.waiting.fetch_add(1, Ordering::Relaxed);
        let permit = tokio::time::timeout(
            self.acquire_timeout,
            Arc::clone(&self.permits).acquire_owned(),
        )
        .await;
        self.waiting.fetch_sub(1, Ordering::Relaxed);
        let permit = match permit {
            Ok(Ok(permit)) => permit,
            Ok(Err(_)) => return Err(DbError::Unreachable("the pool is closed".into())),
            Err(_) => {
                self.acquire_timeouts.fetch_add(1, Ordering::Relaxed);
                self.observe_acquire(started);
                return Err(DbError::PoolExhausted {
                    max: self.max,
                    waited_ms: self.acquire_timeout.as_millis() as u64,
                });
            }
        };
        let reused = loop {
            let next = self.idle.lock().map(|mut idle| idle.pop()).unwrap_or(None);
            match next {
                Some(conn) if conn.client.is_closed() => continue,
                other => break other,
            }
        };
        // The wait a caller sees includes opening a connection the pool
        // lacked (a failed open is counted in `connect_errors` instead).
        let conn = match reused {
            Some(conn) => conn,
            // Boxed: connecting is a large future, and rare; every
            // operation's future would hold it inline.
            None => Box::pin(self.open()).await?,
        };
        self.observe_acquire(started);
        self.busy.fetch_add(1, Ordering::Relaxed);
        Ok(PooledConn {
            conn: Some(conn),
            pool: Arc::clone(self),
            _permit: permit,
        })
    }

    pub fn stats(&self) -> PoolStats {
        let idle = self.idle.lock().map(|idle| idle.len()).unwrap_or(0) as u64;
        PoolStats {
            max: self.max as u64,
            busy: self.busy.load(Ordering::Relaxed),
            idle,
            waiting: self.waiting.load(Ordering::Relaxed),
            acquire_timeouts: self.acquire_timeouts.load(Ordering::Relaxed),
            connect_errors: self.connect_errors.load(Ordering::Relaxed),
            // Counted by the broker, which sees the operations.
            query_errors: 0,
            round_trips: self.round_trips.load(Ordering::Relaxed),
        }
    }
}

/// A lent connection; back to the pool when dropped, unless it broke or
/// was left inside a transaction.
#[derive(Debug)]
pub(crate) struct PooledConn {
    conn: Option<Conn>,
    pool: Arc<Pool>,
    _permit: OwnedSemaphorePermit,
}

impl std::ops::Deref for PooledConn {
    type Target = Conn;
    fn deref(&self) -> &Conn {
        self.conn.as_ref().expect("a lent connection")
    }
}

impl std::ops::DerefMut for PooledConn {
    fn deref_mut(&mut self) -> &mut Conn {
        self.conn.as_mut().expect("a lent connection")
    }
}

impl Drop for PooledConn {
    fn drop(&mut self) {
        self.pool.busy.fetch_sub(1, Ordering::Relaxed);
        if let Some(conn) = self.conn.take() {
            if !conn.in_transaction && !conn.client.is_closed() {
                if let Ok(mut idle) = self.pool.idle.lock() {
                    idle.push(conn);
                }
            }
        }
    }
}
