//! The benchmark database: its URLs, an admin pool, SQL helpers, the names of this run's
//! schema and database, and dropping them after an interrupted run.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use sqlx::AssertSqlSafe;
use sqlx::postgres::{PgPool, PgPoolOptions};

use super::host;

pub const DIRECT_ENV: &str = "REAPER_TEST_DATABASE_URL";

/// Set while this run's `footprint` has created the pg_stat_statements extension.
pub static CREATED_PG_STAT_STATEMENTS: AtomicBool = AtomicBool::new(false);

/// Drops what an interrupted run left in the database (its future was dropped before its
/// own clean-up ran).
pub async fn cleanup_after_interrupt() {
    let Ok(urls) = Urls::from_env() else { return };
    let Ok(pool) = admin_pool(&urls.direct).await else {
        return;
    };
    let pid = std::process::id();
    let mut statements = vec![
        format!(
            "DROP SCHEMA IF EXISTS \"{}\" CASCADE",
            failover_schema_name()
        ),
        format!(
            "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
            footprint_db_name()
        ),
    ];
    if CREATED_PG_STAT_STATEMENTS.load(Ordering::Relaxed) {
        statements.push("DROP EXTENSION IF EXISTS pg_stat_statements".to_owned());
    }
    for sql in statements {
        if let Err(e) = sqlx::raw_sql(AssertSqlSafe(sql.clone()))
            .execute(&pool)
            .await
        {
            eprintln!("clean-up after interrupt (pid {pid}): {sql}: {e}");
        }
    }
    pool.close().await;
}

pub struct Urls {
    pub direct: String,
    pub pgbouncer: String,
}

impl Urls {
    pub fn from_env() -> Result<Self> {
        let (direct, pgbouncer) = host::database_urls(
            "set -a; . \"$(REAPER_DB_PG_STAT_STATEMENTS=1 tests/db/up.sh bench | tail -n 1)\"; set +a",
        )?;
        Ok(Self { direct, pgbouncer })
    }
}

/// `url` with its database name replaced by `db` (PgBouncer's `* =` entry forwards any).
pub fn with_database(url: &str, db: &str) -> Result<String> {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let path_start = base[authority_start..]
        .find('/')
        .map(|i| authority_start + i)
        .ok_or_else(|| anyhow!("database URL has no database name"))?;
    let mut out = format!("{}/{db}", &base[..path_start]);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    Ok(out)
}

pub async fn admin_pool(url: &str) -> Result<PgPool> {
    PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(10))
        .connect(url)
        .await
        .with_context(|| format!("connect to {DIRECT_ENV}"))
}

pub async fn exec(pool: &PgPool, sql: &str) -> Result<()> {
    sqlx::raw_sql(AssertSqlSafe(sql.to_owned()))
        .execute(pool)
        .await
        .with_context(|| sql.to_owned())?;
    Ok(())
}

pub fn failover_schema_name() -> String {
    format!("bench_failover_{}", std::process::id())
}

pub fn footprint_db_name() -> String {
    format!("reaper_bench_fp_{}", std::process::id())
}
