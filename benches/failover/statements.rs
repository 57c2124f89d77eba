//! The statements the replica sends to the bench database, counted by kind with
//! pg_stat_statements (or its transactions with pg_stat_database).

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use sqlx::Row;
use sqlx::postgres::PgPool;

/// How the statements of the bench database are counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counting {
    /// pg_stat_statements (preloaded); `true` when this run created the extension.
    Statements { created: bool },
    /// pg_stat_database transaction counters only.
    Transactions,
}

/// Calls and rows per statement kind, and the database's committed transactions.
#[derive(Clone, Debug, Default)]
pub struct DbCounters {
    pub by_kind: BTreeMap<&'static str, (i64, i64)>,
    pub xacts: i64,
}

/// The statement kinds of `src/lease/store.rs`, from pg_stat_statements' normalised text.
fn classify(query: &str) -> &'static str {
    let q = query.trim_start();
    if q.contains("ON CONFLICT (name) DO UPDATE") && q.contains("lease_event") {
        "acquire"
    } else if q.contains("released AS") || q.contains("SET holder =") {
        // (Literals are normalised to $n, so match identifiers and keywords only.)
        "release"
    } else if q.contains("SET renewed_at") && q.contains("unnest(") {
        "renew_many"
    } else if q.contains("SET renewed_at") {
        "renew"
    } else if q.contains("lease_workload") {
        "sync_workload"
    } else if q.starts_with("SELECT") && q.contains("unnest(") {
        "acquirable"
    } else if q.starts_with("SELECT") && q.contains("\"lease\"") {
        "get"
    } else if q.eq_ignore_ascii_case("select $1") {
        "ping (SELECT 1)"
    } else if q.to_ascii_uppercase().starts_with("LISTEN") {
        "listen"
    } else if q.to_ascii_uppercase().starts_with("SET LOCAL") {
        // The lock and statement timeouts sent in front of each lease statement, in
        // its query message and transaction.
        "set local (timeouts)"
    } else {
        "other"
    }
}

pub async fn db_counters(admin: &PgPool, db: &str, counting: Counting) -> Result<DbCounters> {
    let mut c = DbCounters::default();
    if matches!(counting, Counting::Statements { .. }) {
        let rows = sqlx::query(
            "SELECT query, calls, rows FROM pg_stat_statements \
             WHERE dbid = (SELECT oid FROM pg_database WHERE datname = $1)",
        )
        .bind(db)
        .fetch_all(admin)
        .await
        .context("read pg_stat_statements")?;
        for row in rows {
            let query: String = row.try_get("query")?;
            let calls: i64 = row.try_get("calls")?;
            let n: i64 = row.try_get("rows")?;
            let e = c.by_kind.entry(classify(&query)).or_default();
            e.0 += calls;
            e.1 += n;
        }
    }
    c.xacts = sqlx::query(
        "SELECT (xact_commit + xact_rollback)::bigint AS x FROM pg_stat_database WHERE datname = $1",
    )
    .bind(db)
    .fetch_one(admin)
    .await
    .context("read pg_stat_database")?
    .try_get("x")?;
    Ok(c)
}
