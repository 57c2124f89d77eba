//! Real PostgreSQL for integration tests, started by `tests/db/up.sh` (the `make test`
//! target does that and exports the variables read here).
//!
//! Each call to [`fresh_schema`] creates and migrates a schema of its own, so tests run
//! in parallel and never see each other's rows.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use reaper_operator::config::Schema;
use reaper_operator::lease::LeaseStore;

/// Which path to the database a test takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    Direct,
    /// PgBouncer with `pool_mode = transaction` (and no `ignore_startup_parameters`).
    PgBouncer,
}

/// A variable of the env file `tests/db/up.sh` writes. Without it the test process
/// stops at once with one line, instead of every test panicking on its own: a plain
/// `cargo test` on a fresh machine has no database to run against. (A test that started
/// a control plane panics with that line instead, so the cluster is stopped.)
pub fn env_url(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        let line = format!(
            "{var} is not set: these tests need a real PostgreSQL and PgBouncer; run `make test` \
             (or `set -a; . \"$(tests/db/up.sh dev | tail -n 1)\"; set +a` before `cargo test`)"
        );
        if super::cluster::started_and_running() > 0 {
            panic!("{line}");
        }
        // Straight to the process's stderr: the test harness captures `eprintln!`, and
        // would drop the line with the process. On a line of its own: a harness that runs
        // tests one at a time (support::trials) has printed "test NAME ... " before it.
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "\n{line}");
        std::process::exit(2)
    })
}

pub fn direct_url() -> String {
    env_url("REAPER_TEST_DATABASE_URL")
}

pub fn url(via: Via) -> String {
    match via {
        Via::Direct => direct_url(),
        Via::PgBouncer => env_url("REAPER_TEST_PGBOUNCER_URL"),
    }
}

/// A schema name unique to this process and call.
pub fn unique_schema(prefix: &str) -> Schema {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    Schema::new(&format!("{prefix}_{}_{n}_{nanos}", std::process::id())).unwrap()
}

/// Creates a migrated schema (through a direct connection, as migrations need) and
/// returns a store on it that goes `via` the chosen path.
pub async fn fresh_schema(via: Via) -> (LeaseStore, Schema) {
    let schema = unique_schema("t");
    let admin = LeaseStore::connect(&direct_url(), &schema, Duration::from_secs(10), 1)
        .await
        .expect("connect to the test database");
    admin.migrate().await.expect("migrate test schema");
    admin.close().await;
    (store(via, &schema, 4).await, schema)
}

/// A store on an existing schema with its own pool of `max_connections`.
pub async fn store(via: Via, schema: &Schema, max_connections: u32) -> LeaseStore {
    LeaseStore::connect(&url(via), schema, Duration::from_secs(10), max_connections)
        .await
        .expect("connect to the test database")
}

/// The operator's connect options for `url` (no `extra_float_digits`, which a
/// PgBouncer with a default configuration refuses; TLS settings checked).
pub fn options(url: &str) -> sqlx::postgres::PgConnectOptions {
    reaper_operator::lease::connect_options(url).unwrap_or_else(|e| panic!("{e}"))
}

/// A pool of up to 5 connections going `via` the chosen path.
pub async fn pool(via: Via) -> sqlx::PgPool {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(5)
        .connect_with(options(&url(via)))
        .await
        .expect("connect to the test database")
}

/// Runs one SQL statement on a direct connection, for test set-up and inspection.
pub async fn exec(sql: &str) {
    let pool = sqlx::PgPool::connect_with(options(&direct_url()))
        .await
        .unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
        .execute(&pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    pool.close().await;
}

/// Declares `direct` and `pgbouncer` variants of an async scenario `fn(Via)`.
#[macro_export]
macro_rules! both_paths {
    ($($scenario:ident),* $(,)?) => {$(
        mod $scenario {
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn direct() {
                super::$scenario($crate::support::db::Via::Direct).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn pgbouncer() {
                super::$scenario($crate::support::db::Via::PgBouncer).await
            }
        }
    )*};
}

/// A single connection going `via` the chosen path, for a test that holds a transaction
/// open. Send it simple-protocol statements only (`sqlx::raw_sql`): through PgBouncer in
/// transaction mode a prepared statement does not outlive its transaction.
pub async fn connection(via: Via) -> sqlx::PgConnection {
    <sqlx::PgConnection as sqlx::Connection>::connect_with(&options(&url(via)))
        .await
        .expect("connect to the test database")
}

/// Runs one SQL string (simple protocol) on a new connection going `via` the chosen path
/// and returns the server's answer, error included.
pub async fn try_exec(via: Via, sql: &str) -> Result<(), sqlx::Error> {
    let mut conn = connection(via).await;
    let result = raw(&mut conn, sql).await;
    let _ = sqlx::Connection::close(conn).await;
    result
}

/// Runs one SQL string (simple protocol) on `conn`.
pub async fn raw(conn: &mut sqlx::PgConnection, sql: &str) -> Result<(), sqlx::Error> {
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
        .execute(&mut *conn)
        .await
        .map(|_| ())
}

/// The first column of the first row of a simple-protocol query on `conn`.
pub async fn scalar<T>(conn: &mut sqlx::PgConnection, sql: &str) -> Result<T, sqlx::Error>
where
    T: for<'r> sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>,
{
    use sqlx::Row;
    let row = sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
        .fetch_one(&mut *conn)
        .await?;
    row.try_get(0)
}

/// The PostgreSQL error `result` must be, whose message begins with `message`; returned
/// for checking its code and hint.
pub fn refused<T: std::fmt::Debug>(
    result: Result<T, sqlx::Error>,
    message: &str,
) -> Box<sqlx::postgres::PgDatabaseError> {
    let error = match result {
        Ok(ok) => panic!("accepted ({ok:?}); wanted the error \"{message}…\""),
        Err(sqlx::Error::Database(error)) => error.downcast::<sqlx::postgres::PgDatabaseError>(),
        Err(error) => panic!("not a database error: {error}"),
    };
    assert!(
        error.message().starts_with(message),
        "wanted \"{message}…\", got: {}",
        error.message()
    );
    error
}

/// The URL of another database on the same server, `via` the chosen path (PgBouncer
/// passes any database name through to the server).
pub fn url_for_database(via: Via, database: &str) -> String {
    let url = url(via);
    let (base, query) = url.split_once('?').unwrap_or((&url, ""));
    let (server, _) = base.rsplit_once('/').expect("a database URL with a path");
    let query = if query.is_empty() {
        String::new()
    } else {
        format!("?{query}")
    };
    format!("{server}/{database}{query}")
}
