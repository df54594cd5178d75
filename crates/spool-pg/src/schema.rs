//! Schema migrations, embedded in the binary and applied at connect under
//! an advisory lock, so that nodes starting together migrate once.

use tokio_postgres::Client;

use crate::error::ConnectError;

/// The migrations in order; the version of each is its place, from 1.
pub(crate) const MIGRATIONS: &[&str] = &[
    include_str!("../migrations/0001_init.sql"),
    include_str!("../migrations/0002_workflows_schedules.sql"),
    include_str!("../migrations/0003_vacuum.sql"),
    include_str!("../migrations/0004_partitions.sql"),
    include_str!("../migrations/0005_live_listing.sql"),
];

/// The schema version this binary writes and reads.
pub const SCHEMA_VERSION: i32 = MIGRATIONS.len() as i32;

/// `pg_advisory_lock`'s key for migrations: "spool" in ASCII.
const MIGRATION_LOCK_KEY: i64 = 0x73_70_6f_6f_6c;

fn failed(version: i32) -> impl Fn(tokio_postgres::Error) -> ConnectError {
    move |error| ConnectError::Migration {
        version,
        error: match error.as_db_error() {
            Some(db) => db.message().to_string(),
            None => error.to_string(),
        },
    }
}

/// Brings the schema to [`SCHEMA_VERSION`], or refuses a newer one.
pub(crate) async fn migrate(client: &Client) -> Result<(), ConnectError> {
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK_KEY])
        .await
        .map_err(failed(0))?;
    let result = migrate_locked(client).await;
    // A session lock: released here, or when the connection closes.
    let unlocked = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK_KEY])
        .await
        .map_err(failed(0));
    result.and(unlocked.map(|_| ()))
}

async fn migrate_locked(client: &Client) -> Result<(), ConnectError> {
    // Created only where missing: `CREATE TABLE IF NOT EXISTS` needs the
    // right to create in the schema even when the table is there, which a
    // node's role that only uses the tables lacks.
    let exists: bool = client
        .query_one("SELECT to_regclass('spool_schema') IS NOT NULL", &[])
        .await
        .map_err(failed(0))?
        .get(0);
    if exists {
        return migrate_from_recorded(client).await;
    }
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS spool_schema (
                 version integer PRIMARY KEY,
                 applied_at timestamptz NOT NULL DEFAULT now()
             )",
        )
        .await
        .map_err(failed(0))?;
    migrate_from_recorded(client).await
}

/// Applies the migrations after the version `spool_schema` records.
async fn migrate_from_recorded(client: &Client) -> Result<(), ConnectError> {
    let found: i32 = client
        .query_one("SELECT coalesce(max(version), 0) FROM spool_schema", &[])
        .await
        .map_err(failed(0))?
        .get(0);
    if found > SCHEMA_VERSION {
        return Err(ConnectError::SchemaTooNew {
            found,
            known: SCHEMA_VERSION,
        });
    }
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        let version = index as i32 + 1;
        // One transaction per migration: all of it or none.
        let script = format!(
            "BEGIN;\n{sql}\nINSERT INTO spool_schema (version) VALUES ({version});\nCOMMIT;"
        );
        if let Err(error) = client.batch_execute(&script).await {
            let _ = client.batch_execute("ROLLBACK").await;
            return Err(failed(version)(error));
        }
        tracing::info!(version, "applied a schema migration");
    }
    Ok(())
}
