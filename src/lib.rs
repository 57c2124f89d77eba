//! reaper-operator: runs exactly one instance of a singleton workload, arbitrated by a
//! lease row in PostgreSQL.

// Not for unit tests: a table of cases reads better whole.
#![cfg_attr(not(test), warn(clippy::too_many_lines))]

pub mod cli;
pub mod config;
pub mod guard;
pub mod http;
pub mod kube_client;
pub mod lease;
pub mod metrics;
pub mod operator;
pub mod reaper;
pub mod telemetry;

use std::time::Duration;

/// Errors of the library. The binary maps them to exit codes and messages.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid configuration: {0}")]
    Config(String),

    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),

    #[error("database call timed out after {0:?}")]
    Timeout(Duration),

    /// The server cancelled a lease statement that waited longer than its `lock_timeout`
    /// for a lock: a transaction holds a lock on the lease row, (for a takeover) a fenced
    /// write of the workload is still in flight, or an earlier statement's commit still
    /// waits for a synchronous standby that does not answer (it holds the row lock).
    #[error(
        "lease statement gave up after waiting {0:?} for a lock (lock_timeout): another \
         transaction holds a lock on the lease row, a fenced workload write is in flight, \
         or a commit waits for a synchronous standby that does not answer"
    )]
    LockTimeout(Duration),

    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),

    /// The task that sends a replica's batched lease calls is gone (only a panic, or
    /// the runtime shutting down, ends it).
    #[error("the lease batcher has stopped")]
    BatcherStopped,

    /// One failure reported to every caller that shared a call (a batched renew).
    #[error("{0}")]
    Shared(std::sync::Arc<Error>),
}

impl Error {
    /// True when the lease tables do not exist yet (SQLSTATE 42P01 / 3F000).
    pub fn is_missing_schema(&self) -> bool {
        match self {
            Error::Shared(error) => error.is_missing_schema(),
            Error::Database(sqlx::Error::Database(db)) => {
                matches!(db.code().as_deref(), Some("42P01") | Some("3F000"))
            }
            _ => false,
        }
    }
}

impl Error {
    /// True when only a person can fix it: the lease tables are missing (wrong schema),
    /// the role may not read them, or the login or database is refused for good
    /// (SQLSTATE 42P01, 3F000, 42501, 28000, 28P01, 3D000).
    pub fn needs_a_person(&self) -> bool {
        match self {
            Error::Shared(error) => error.needs_a_person(),
            Error::Database(sqlx::Error::Database(db)) => matches!(
                db.code().as_deref(),
                Some("42P01" | "3F000" | "42501" | "28000" | "28P01" | "3D000")
            ),
            _ => false,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
