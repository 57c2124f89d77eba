//! SQL for the lease table.
//!
//! Every operation is ONE autocommit statement sent with the simple query protocol, with
//! values inlined as escaped literals. That is deliberate: PgBouncer in transaction mode
//! (before 1.21) cannot keep a prepared statement between transactions, and sqlx's
//! extended protocol parses and executes in two round trips that PgBouncer may route to
//! different server connections. A simple query is one message, one transaction, no
//! session state. Times come only from `clock_timestamp()` on the database server.
//!
//! Each statement is preceded, in the same query message, by
//! `SET LOCAL lock_timeout = ...; SET LOCAL statement_timeout = ...;
//! SET LOCAL synchronous_commit = on`: the server runs them as one implicit transaction,
//! so the settings bound that statement's lock waits and running time, make its commit
//! durable before it is acknowledged, and are gone when it ends (see
//! [`LeaseStore::with_lock_timeout`]).
//!
//! A failover of the database is not trusted to have kept the latest commits: rows
//! carry the WAL timeline they were acquired on, and the statements refuse what a
//! promotion may have made stale (migrations/20261203000001_lease_timeline.sql).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use std::sync::Arc;

use sqlx::postgres::{PgPool, PgPoolOptions, PgRow};
use sqlx::{AssertSqlSafe, Row};

use super::connect::connect_options;
use super::conns::Connections;
use super::identity::{ClusterName, Holder, LeaseName, cluster_of};
use crate::config::Schema;
use crate::{Error, Result};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// One lease row as seen by the database at `observed_at`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub name: String,
    /// `""` when free.
    pub holder: String,
    pub epoch: i64,
    pub ttl: Duration,
    pub acquired_at: DateTime<Utc>,
    pub renewed_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    /// Holder displaced by the latest acquisition (`""` if the lease was free then).
    pub previous_holder: String,
    /// The database's clock when the row was read or written.
    pub observed_at: DateTime<Utc>,
    /// Acquired on the database server's current WAL timeline. `false` after a failover
    /// (a promoted standby): the holder may have lost the lease in history that did not
    /// reach the standby, so the row no longer proves anything and nobody can renew it
    /// (migrations/20261203000001_lease_timeline.sql).
    pub on_current_timeline: bool,
}

impl Lease {
    pub fn is_free(&self) -> bool {
        self.holder.is_empty()
    }

    pub fn is_expired(&self) -> bool {
        self.expires_at <= self.observed_at
    }

    /// The cluster of its holder, if the holder names one (see [`cluster_of`]).
    pub fn holder_cluster(&self) -> Option<&str> {
        cluster_of(&self.holder)
    }

    /// Held by someone, not expired as of `observed_at`, and acquired since the last
    /// failover of the database.
    pub fn is_held(&self) -> bool {
        !self.is_free() && !self.is_expired() && self.on_current_timeline
    }

    fn from_row(row: &PgRow) -> Result<Self> {
        let ttl_ms: i64 = row.try_get("ttl_ms")?;
        Ok(Self {
            name: row.try_get("name")?,
            holder: row.try_get("holder")?,
            epoch: row.try_get("epoch")?,
            ttl: Duration::from_millis(ttl_ms.max(0) as u64),
            acquired_at: row.try_get("acquired_at")?,
            renewed_at: row.try_get("renewed_at")?,
            expires_at: row.try_get("expires_at")?,
            previous_holder: row.try_get("previous_holder")?,
            observed_at: row.try_get("observed_at")?,
            on_current_timeline: row.try_get("on_current_timeline")?,
        })
    }
}

/// What [`LeaseStore::acquirable`] found for one lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Availability {
    pub name: String,
    /// The row as it is; `None` when there is none.
    pub lease: Option<Lease>,
    /// Whether an `acquire` could take the lease at the database's `observed_at`.
    pub acquirable: bool,
    /// When not `acquirable`: how long after `observed_at` it becomes so, on the
    /// database's clock, unless its holder renews first (zero when `acquirable`).
    pub acquirable_in: Duration,
}

impl Availability {
    fn from_row(row: &PgRow) -> Result<Self> {
        let has_row: bool = row.try_get("has_row")?;
        let in_ms: i64 = row.try_get("acquirable_in_ms")?;
        Ok(Self {
            name: row.try_get("requested")?,
            lease: has_row.then(|| Lease::from_row(row)).transpose()?,
            acquirable: row.try_get("acquirable_now")?,
            acquirable_in: Duration::from_millis(in_ms.max(0) as u64),
        })
    }
}

/// What one cluster sees of a lease's workload.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WorkloadCounts {
    pub replicas: i32,
    pub running_pods: i32,
    pub ready_pods: i32,
}

/// One row of the append-only `lease_event` audit table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseEvent {
    pub id: i64,
    pub name: String,
    pub epoch: i64,
    pub holder: String,
    pub previous_holder: String,
    /// `acquire`, `takeover` or `release`.
    pub kind: String,
    pub at: DateTime<Utc>,
}

/// Channel on which acquire and release notify (payload: the lease name), so standbys
/// and the previous holder's cluster can react at once instead of on their next tick.
pub const NOTIFY_CHANNEL: &str = "reaper_lease";
const NOTIFY_CHANNEL_LITERAL: &str = "'reaper_lease'";

/// One cluster's last report of the workload behind a lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkloadReport {
    pub cluster: String,
    pub reported_by: String,
    pub replicas: i32,
    pub running_pods: i32,
    pub ready_pods: i32,
    pub reported_at: DateTime<Utc>,
    /// Age of the report on the database's clock.
    pub age: Duration,
    /// The reporter's own bound: older than this, the report is stale.
    pub stale_after: Duration,
    /// How often the reporter refreshes it while it can reach the database.
    pub refresh: Duration,
}

/// What [`LeaseStore::sync_workloads`] did and read.
#[derive(Clone, Debug, Default)]
pub struct SyncedReports {
    /// Per lease of the call, the other clusters' reports.
    pub others: HashMap<String, Vec<WorkloadReport>>,
    /// The leases whose report was recorded (the others were refused).
    pub written: HashSet<String>,
}

/// One lease's workload as this replica sees it, for [`LeaseStore::sync_workloads`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkloadUpdate {
    pub name: LeaseName,
    pub counts: WorkloadCounts,
    pub timing: ReportTiming,
}

/// How a workload report is to be judged by other clusters: stale once older than
/// `stale_after`; refreshed every `refresh` while its writer reaches the database.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReportTiming {
    pub stale_after: Duration,
    pub refresh: Duration,
}

impl From<Duration> for ReportTiming {
    /// Stale after `stale_after`, refreshed four times within it.
    fn from(stale_after: Duration) -> Self {
        Self {
            stale_after,
            refresh: stale_after / 4,
        }
    }
}

impl WorkloadReport {
    /// The reporting cluster has not refreshed its report within its own bound: it is
    /// dead or cut off from the database.
    pub fn is_stale(&self) -> bool {
        self.age >= self.stale_after
    }
}

/// When the lease of row `alias` expires, on the database's clock: the one definition
/// every statement judges expiry by.
fn expires_at(alias: &str) -> String {
    format!("{alias}.renewed_at + {alias}.ttl_ms * interval '1 millisecond'")
}

/// Columns every statement returns, given the lease row alias `l` and the call of the
/// schema's `lease_server_timeline()`.
fn lease_columns(timeline: &str) -> String {
    let expires = expires_at("l");
    format!(
        "l.name, l.holder, l.epoch, l.ttl_ms, l.acquired_at, l.renewed_at, \
         {expires} AS expires_at, l.previous_holder, \
         clock_timestamp() AS observed_at, l.timeline = {timeline} AS on_current_timeline"
    )
}

/// A lease statement, for [`LeaseStore::statement_text`].
#[doc(hidden)]
#[derive(Clone, Copy, Debug)]
pub enum Statement<'a> {
    Acquire {
        name: &'a LeaseName,
        holder: &'a Holder,
        ttl: Duration,
    },
    Renew {
        name: &'a LeaseName,
        holder: &'a Holder,
        epoch: i64,
    },
    Release {
        name: &'a LeaseName,
        holder: &'a Holder,
        epoch: i64,
    },
}

/// A statement [`LeaseStore::execute_reference`] runs.
#[doc(hidden)]
#[derive(Clone, Copy, Debug)]
pub enum Reference {
    /// `SELECT 1`.
    Select1,
    /// A durable one-row `UPDATE` of the table [`PROBE_TABLE`] in the store's schema
    /// (`id int PRIMARY KEY, n bigint`, one row with id 1), which the caller creates.
    BumpProbe,
}

/// The table [`Reference::BumpProbe`] updates.
#[doc(hidden)]
pub const PROBE_TABLE: &str = "bench_probe";

/// Access to the lease table of one schema. Cheap to clone (the connections are
/// shared).
#[derive(Clone, Debug)]
pub struct LeaseStore {
    /// Where the lease statements run (see `conns`).
    conns: Arc<Connections>,
    /// For everything else: migrations, and callers' own statements ([`Self::pool`]).
    pool: PgPool,
    schema: Schema,
    // Shared, not copied: every elector and fence keeps a clone of the store.
    lease_table: Arc<str>,
    event_table: Arc<str>,
    timeline_table: Arc<str>,
    /// `"schema".lease_server_timeline()`: the WAL timeline the server writes on now.
    timeline: Arc<str>,
    /// [`lease_columns`] of this schema.
    columns: Arc<str>,
    call_timeout: Duration,
    /// `SET LOCAL lock_timeout` sent with every statement, in whole milliseconds (≥ 1).
    lock_timeout_ms: u64,
}

impl LeaseStore {
    /// A store whose lock timeout is a quarter of `call_timeout` (see
    /// [`with_lock_timeout`](Self::with_lock_timeout)).
    ///
    /// The lease statements run on connections of their own, opened with `pool`'s
    /// connect options, up to `pool`'s maximum size; `pool` itself serves
    /// [`migrate`](Self::migrate) and [`pool`](Self::pool).
    pub fn new(pool: PgPool, schema: &Schema, call_timeout: Duration) -> Self {
        let options = (*pool.connect_options()).clone();
        let max = pool.options().get_max_connections();
        Self {
            conns: Arc::new(Connections::new(options, max)),
            pool,
            lease_table: schema.qualify("lease").into(),
            event_table: schema.qualify("lease_event").into(),
            timeline_table: schema.qualify("lease_timeline").into(),
            timeline: format!("{}()", schema.qualify("lease_server_timeline")).into(),
            columns: lease_columns(&format!("{}()", schema.qualify("lease_server_timeline")))
                .into(),
            schema: schema.clone(),
            call_timeout,
            lock_timeout_ms: lock_timeout_millis(call_timeout / 4),
        }
    }

    /// How long one lease statement may wait for one lock before the server cancels it
    /// with [`Error::LockTimeout`] (rounded down to whole milliseconds, at least 1 ms).
    ///
    /// Without it a statement blocked by a row lock (a transaction that locked a lease
    /// row and stays open) waits on the server until the call timeout drops it on the
    /// client, and its pooled connection stays busy with the blocked statement for as
    /// long as the lock is held, so every tick blocks one more connection until the pool
    /// is empty. With it the server gives up, the implicit transaction ends and the
    /// connection is free again.
    ///
    /// The setting travels with each statement as `SET LOCAL lock_timeout = '...'` in the
    /// same simple query message. The server runs a multi-statement query message as one
    /// implicit transaction, so the `SET LOCAL` covers exactly that statement and leaves
    /// no session state behind, which is what PgBouncer in transaction mode needs. A
    /// startup parameter (`options=-c lock_timeout=...`) would not do: PgBouncer refuses
    /// startup parameters it does not track unless told to ignore them
    /// (`ignore_startup_parameters`), and then drops them.
    ///
    /// An acquire can wait for two locks (the fence lock of a takeover, then the row), so
    /// the default, a quarter of the call timeout, keeps both waits inside the call.
    pub fn with_lock_timeout(mut self, lock_timeout: Duration) -> Self {
        self.lock_timeout_ms = lock_timeout_millis(lock_timeout);
        self
    }

    pub fn lock_timeout(&self) -> Duration {
        Duration::from_millis(self.lock_timeout_ms)
    }

    /// Connects at once, so an unreachable database is reported now.
    pub async fn connect(
        url: &str,
        schema: &Schema,
        call_timeout: Duration,
        max_connections: u32,
    ) -> Result<Self> {
        let pool =
            pool_options(call_timeout, max_connections).connect_lazy_with(connect_options(url)?);
        let store = Self::new(pool, schema, call_timeout);
        // The first lease connection, kept for the first statement.
        let checkout = tokio::time::timeout(call_timeout, store.conns.checkout())
            .await
            .map_err(|_| Error::Timeout(call_timeout))??;
        store.conns.give_back(checkout);
        Ok(store)
    }

    /// Does not connect until the first statement, so a database outage at start-up
    /// degrades to "not leader" instead of failing the process.
    pub fn connect_lazy(
        url: &str,
        schema: &Schema,
        call_timeout: Duration,
        max_connections: u32,
    ) -> Result<Self> {
        let pool =
            pool_options(call_timeout, max_connections).connect_lazy_with(connect_options(url)?);
        Ok(Self::new(pool, schema, call_timeout))
    }

    /// A pool on the same database for statements of the caller's own (and
    /// [`migrate`](Self::migrate)); it opens connections only when used. The lease
    /// statements do not run on it (see [`open_connections`](Self::open_connections)).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// How many connections the lease statements hold open now, idle or busy (at most
    /// `max_connections`).
    pub fn open_connections(&self) -> usize {
        self.conns.open()
    }

    /// Closes the idle lease connections and [`pool`](Self::pool). Statements already
    /// running or waiting for a connection still run, and close their connection after;
    /// later ones fail.
    pub async fn close(&self) {
        self.conns.close().await;
        self.pool.close().await;
    }

    pub fn schema(&self) -> &Schema {
        &self.schema
    }

    /// Applies the embedded migrations to the schema; a no-op when they are applied.
    ///
    /// Needs a direct (or session-pooled) connection: sqlx serialises migrators with a
    /// session advisory lock, which PgBouncer in transaction mode cannot hold.
    pub async fn migrate(&self) -> Result<()> {
        migrate(&self.pool, &self.schema).await
    }

    /// Refuses a database the lease cannot work in: one whose encoding is not UTF8.
    /// Lease names and holders are UTF-8; in, say, a LATIN1 database a single name the
    /// encoding cannot represent fails every statement it is part of, and the batched
    /// statements (`acquirable`, `renew_many`) would fail for every lease of a replica.
    pub async fn check_server(&self) -> Result<()> {
        let rows = self.fetch("SHOW server_encoding".to_owned()).await?;
        let encoding: String = match rows.first() {
            Some(row) => row.try_get(0)?,
            None => return Err(Error::Config("SHOW server_encoding returned no row".into())),
        };
        check_encoding(&encoding)
    }

    /// Takes the lease if it is free or expired, creating the row if it is missing.
    /// Returns the new row (epoch + 1) or `None` when someone else holds it.
    pub async fn acquire(
        &self,
        name: &LeaseName,
        holder: &Holder,
        ttl: Duration,
    ) -> Result<Option<Lease>> {
        let sql = self.acquire_sql(name, holder, ttl)?;
        self.fetch_one_lease_once(sql).await
    }

    fn acquire_sql(&self, name: &LeaseName, holder: &Holder, ttl: Duration) -> Result<String> {
        let ttl_ms = ttl_millis(ttl)?;
        let (l, e, t) = (&self.lease_table, &self.event_table, &self.timeline_table);
        let (tl, c) = (&self.timeline, &self.columns);
        let key = literal(&fence_key_text(&self.schema, name.as_str()));
        let (name, holder) = (literal(name.as_str()), literal(holder.as_str()));
        // ON CONFLICT DO UPDATE re-checks its WHERE against the latest committed row
        // under a row lock, so among concurrent candidates exactly one can win. A row
        // that went missing is recreated with an epoch above any in the audit history,
        // so the fencing token never repeats.
        //
        // A failover (migrations/20261203000001_lease_timeline.sql): `tl` is the server's
        // WAL timeline; the first acquire on a new one records when it saw it (`seen`;
        // a row this statement or a concurrent one inserts is not in this snapshot, so
        // `since` is then now), and until a ttl has passed since then (`frozen`) nothing
        // is acquired, whatever the rows say. A row of an earlier timeline counts as
        // not held: nobody can renew it. Epochs on timeline T start above (T - 1) * 2^32.
        //
        // The fence (docs/fencing.md): a takeover must wait for the workload's fenced
        // writes in flight, which hold the lease's advisory lock in shared mode until
        // they commit. Unless the row, as of this statement's snapshot, is held and
        // unexpired (or acquiring is frozen), the statement first takes that lock
        // exclusively (`fence`), and only then reads the clock (`clk`) and decides (the
        // upsert): a fenced write that began earlier has committed by then, and one
        // that begins later waits for this statement and then sees the new epoch. When
        // the snapshot shows the lease held, no lock is taken and no row is produced at
        // all (`clk` is empty), so an acquire of a held lease never waits for the
        // workload; if the lease was released in the meantime, this attempt fails and
        // the next one takes the lock. The wait is bounded by the lock timeout: a longer
        // fenced write fails this attempt with `Error::LockTimeout` and the candidate
        // tries again on its next tick. Renews never touch the advisory lock.
        let expires = expires_at("l");
        let expires_h = expires_at("h");
        let sql = format!(
            "WITH tl AS MATERIALIZED (SELECT {tl} AS id, ({tl} - 1) * 4294967296 AS epoch_floor), \
             seen AS ( \
               INSERT INTO {t} (timeline, first_seen_at) SELECT tl.id, clock_timestamp() FROM tl \
               ON CONFLICT (timeline) DO NOTHING \
             ), \
             snap AS MATERIALIZED ( \
               SELECT EXISTS (SELECT 1 FROM {l} AS h WHERE h.name = {name} AND h.holder <> '' \
                 AND h.timeline = tl.id \
                 AND {expires_h} > clock_timestamp()) \
               OR clock_timestamp() < COALESCE( \
                    (SELECT s.first_seen_at FROM {t} AS s WHERE s.timeline = tl.id), clock_timestamp()) \
                  + greatest({ttl_ms}, (SELECT h.ttl_ms FROM {l} AS h WHERE h.name = {name})) \
                    * interval '1 millisecond' AS held \
               FROM tl \
             ), \
             fence AS MATERIALIZED ( \
               SELECT NOT snap.held AS locked, \
                      pg_advisory_xact_lock(CASE WHEN snap.held THEN NULL ELSE hashtextextended({key}, 0) END) AS fence_lock \
               FROM snap \
             ), \
             clk AS MATERIALIZED ( \
               SELECT clock_timestamp() AS now, tl.id AS timeline, tl.epoch_floor \
               FROM fence, tl WHERE fence.locked \
             ), \
             taken AS ( \
               INSERT INTO {l} AS l (name, holder, epoch, ttl_ms, acquired_at, renewed_at, previous_holder, timeline) \
               SELECT {name}, {holder}, \
                      greatest(COALESCE((SELECT max(ev.epoch) FROM {e} AS ev WHERE ev.name = {name}), 0), clk.epoch_floor) + 1, \
                      {ttl_ms}, clk.now, clk.now, '', clk.timeline \
               FROM clk \
               ON CONFLICT (name) DO UPDATE SET \
                 holder = EXCLUDED.holder, \
                 epoch = greatest(l.epoch, EXCLUDED.epoch - 1) + 1, ttl_ms = EXCLUDED.ttl_ms, \
                 acquired_at = EXCLUDED.acquired_at, renewed_at = EXCLUDED.renewed_at, \
                 previous_holder = l.holder, timeline = EXCLUDED.timeline \
               WHERE l.holder = '' OR l.timeline <> EXCLUDED.timeline \
                  OR {expires} <= EXCLUDED.renewed_at \
               RETURNING l.* \
             ), \
             audit AS ( \
               INSERT INTO {e} (name, epoch, holder, previous_holder, kind, at) \
               SELECT name, epoch, holder, previous_holder, \
                      CASE WHEN previous_holder = '' THEN 'acquire' ELSE 'takeover' END, acquired_at \
               FROM taken \
             ) \
             SELECT {c}, pg_notify({NOTIFY_CHANNEL_LITERAL}, l.name)::text AS notified \
             FROM taken AS l"
        );
        Ok(sql)
    }

    /// Extends the lease for the holder at `epoch`, only while it has not expired:
    /// an expired lease is never revived. `None` means "you are not the leader".
    pub async fn renew(
        &self,
        name: &LeaseName,
        holder: &Holder,
        epoch: i64,
    ) -> Result<Option<Lease>> {
        let sql = self.renew_sql(name, holder, epoch);
        self.fetch_one_lease(sql).await
    }

    fn renew_sql(&self, name: &LeaseName, holder: &Holder, epoch: i64) -> String {
        let (l, tl, c) = (&self.lease_table, &self.timeline, &self.columns);
        let (name, holder) = (literal(name.as_str()), literal(holder.as_str()));
        let expires = expires_at("l");
        format!(
            "UPDATE {l} AS l SET renewed_at = clock_timestamp() \
             WHERE l.name = {name} AND l.holder = {holder} AND l.epoch = {epoch} \
               AND {expires} > clock_timestamp() \
               AND l.timeline = {tl} \
             RETURNING {c}"
        )
    }

    /// Renews every `(name, epoch)` that `holder` still holds, in one statement.
    /// Returns the leases that were renewed; any lease missing from the result is lost.
    pub async fn renew_many(
        &self,
        holder: &Holder,
        held: &[(LeaseName, i64)],
    ) -> Result<Vec<Lease>> {
        if held.is_empty() {
            return Ok(Vec::new());
        }
        // Two array literals ('{...}'::text[]) rather than ARRAY[...] of 2 × N literals:
        // the server parses one string per array instead of planning N expressions.
        let names = text_array(held.iter().map(|(name, _)| name.as_str()));
        let mut epochs = String::with_capacity(held.len() * 8 + 2);
        epochs.push('{');
        for (i, (_, epoch)) in held.iter().enumerate() {
            if i > 0 {
                epochs.push(',');
            }
            epochs.push_str(&epoch.to_string());
        }
        epochs.push('}');
        let (l, tl, c) = (&self.lease_table, &self.timeline, &self.columns);
        let (holder, names, epochs) = (literal(holder.as_str()), literal(&names), literal(&epochs));
        let expires = expires_at("l");
        let sql = format!(
            "UPDATE {l} AS l SET renewed_at = clock_timestamp() \
             FROM unnest({names}::text[], {epochs}::bigint[]) AS h(name, epoch) \
             WHERE l.name = h.name AND l.epoch = h.epoch AND l.holder = {holder} \
               AND {expires} > clock_timestamp() \
               AND l.timeline = {tl} \
             RETURNING {c}"
        );
        self.fetch_leases(sql).await
    }

    /// For each of `names`, in that order: its row, whether an `acquire` could take it
    /// right now (missing, free or expired on the database's clock), and if not, how
    /// long until it could unless its holder renews first. One read for any number of
    /// leases, so standbys need not send an `acquire` per lease per retry period;
    /// `acquire` still decides.
    pub async fn acquirable(&self, names: &[LeaseName]) -> Result<Vec<Availability>> {
        if names.is_empty() {
            return Ok(Vec::new());
        }
        let array = literal(&text_array(names.iter().map(LeaseName::as_str)));
        let (l, t, tl, c) = (
            &self.lease_table,
            &self.timeline_table,
            &self.timeline,
            &self.columns,
        );
        // After a failover: until an acquire has recorded when the new timeline was first
        // seen, a row of an earlier timeline is acquirable (that acquire starts the wait);
        // during the wait, no row is (an acquire would fail).
        //
        // `acquirable_at` is the later of the two instants that keep a row from being
        // taken: its expiry, while a holder on this timeline has it, and the end of the
        // wait after this timeline was first seen (`-infinity` on timeline 1); NULL when
        // neither applies. Both the answer and the time left are judged against the
        // row's `observed_at`, one reading of the database's clock, so no client's
        // clock takes part. The time left is rounded up: an attempt made that long
        // after the answer arrived is not too early.
        let expires = expires_at("l");
        let sql = format!(
            "WITH seen AS MATERIALIZED ( \
               SELECT (SELECT s.first_seen_at FROM {t} AS s WHERE s.timeline = {tl}) AS at, {tl} AS tl \
             ), \
             r AS MATERIALIZED ( \
               SELECT n.name AS requested, n.ord, l.name IS NOT NULL AS has_row, {c}, \
                      greatest( \
                        CASE WHEN l.holder <> '' AND l.timeline = seen.tl \
                             THEN {expires} END, \
                        CASE WHEN l.name IS NOT NULL \
                             THEN seen.at + l.ttl_ms * interval '1 millisecond' END \
                      ) AS acquirable_at \
               FROM seen, unnest({array}::text[]) WITH ORDINALITY AS n(name, ord) \
               LEFT JOIN {l} AS l ON l.name = n.name \
             ) \
             SELECT r.*, \
                    r.acquirable_at IS NULL OR r.acquirable_at <= r.observed_at AS acquirable_now, \
                    CASE WHEN r.acquirable_at > r.observed_at \
                         THEN ceil(extract(epoch FROM r.acquirable_at - r.observed_at) * 1000)::bigint \
                         ELSE 0 END AS acquirable_in_ms \
             FROM r ORDER BY r.ord"
        );
        self.fetch(sql)
            .await?
            .iter()
            .map(Availability::from_row)
            .collect()
    }

    /// Frees the lease if `holder` holds it at `epoch`; a late release after a takeover
    /// matches nothing and returns `None`.
    pub async fn release(
        &self,
        name: &LeaseName,
        holder: &Holder,
        epoch: i64,
    ) -> Result<Option<Lease>> {
        let sql = self.release_sql(name, holder, epoch);
        self.fetch_one_lease_once(sql).await
    }

    fn release_sql(&self, name: &LeaseName, holder: &Holder, epoch: i64) -> String {
        let (l, e, tl, c) = (
            &self.lease_table,
            &self.event_table,
            &self.timeline,
            &self.columns,
        );
        let (name, holder) = (literal(name.as_str()), literal(holder.as_str()));
        // A row of an earlier timeline stays as it is: freeing it would let a candidate
        // take it before the ttl after the failover has passed.
        format!(
            "WITH released AS ( \
               UPDATE {l} AS l SET holder = '' \
               WHERE l.name = {name} AND l.holder = {holder} AND l.epoch = {epoch} \
                 AND l.timeline = {tl} \
               RETURNING l.* \
             ), \
             audit AS ( \
               INSERT INTO {e} (name, epoch, holder, previous_holder, kind, at) \
               SELECT name, epoch, {holder}, '', 'release', clock_timestamp() FROM released \
             ) \
             SELECT {c}, pg_notify({NOTIFY_CHANNEL_LITERAL}, l.name)::text AS notified \
             FROM released AS l"
        )
    }

    /// The query message a lease statement sends, `SET LOCAL`s included, so a benchmark
    /// can send the very same text with another client (benches/lease.rs).
    #[doc(hidden)]
    pub fn statement_text(&self, statement: Statement<'_>) -> Result<String> {
        let sql = match statement {
            Statement::Acquire { name, holder, ttl } => self.acquire_sql(name, holder, ttl)?,
            Statement::Renew {
                name,
                holder,
                epoch,
            } => self.renew_sql(name, holder, epoch),
            Statement::Release {
                name,
                holder,
                epoch,
            } => self.release_sql(name, holder, epoch),
        };
        Ok(self.with_settings(&sql))
    }

    pub async fn get(&self, name: &LeaseName) -> Result<Option<Lease>> {
        let (l, c) = (&self.lease_table, &self.columns);
        let name = literal(name.as_str());
        let sql = format!("SELECT {c} FROM {l} AS l WHERE l.name = {name}");
        self.fetch_one_lease(sql).await
    }

    pub async fn list(&self) -> Result<Vec<Lease>> {
        let (l, c) = (&self.lease_table, &self.columns);
        self.fetch_leases(format!("SELECT {c} FROM {l} AS l ORDER BY l.name"))
            .await
    }

    /// Records this cluster's view of the workload behind `name` and returns the latest
    /// reports of the OTHER clusters, in one statement: [`LeaseStore::sync_workloads`]
    /// for one lease.
    pub async fn sync_workload(
        &self,
        name: &LeaseName,
        cluster: &ClusterName,
        reported_by: &Holder,
        counts: WorkloadCounts,
        timing: impl Into<ReportTiming>,
    ) -> Result<Vec<WorkloadReport>> {
        let mut synced = self
            .sync_workloads(
                cluster,
                reported_by,
                &[WorkloadUpdate {
                    name: name.clone(),
                    counts,
                    timing: timing.into(),
                }],
            )
            .await?;
        Ok(synced.others.remove(name.as_str()).unwrap_or_default())
    }

    /// Records this cluster's view of every workload in `updates` and returns, per lease
    /// name, the latest reports of the OTHER clusters, in one statement whatever the
    /// number of leases. A report of no running pods by a replica that does not hold the
    /// lease while a replica of its cluster does is not recorded (see the statement);
    /// [`SyncedReports::written`] names those that were.
    /// Each report's timing tells readers how old it may get before they presume this
    /// cluster dead, and how often it is refreshed.
    pub async fn sync_workloads(
        &self,
        cluster: &ClusterName,
        reported_by: &Holder,
        updates: &[WorkloadUpdate],
    ) -> Result<SyncedReports> {
        if updates.is_empty() {
            return Ok(SyncedReports::default());
        }
        let by_name = one_update_per_lease(updates);
        let sql = self.sync_workloads_statement(cluster, reported_by, &by_name)?;
        let rows = self.fetch(sql).await?;
        synced_reports(by_name.into_keys(), &rows)
    }

    /// The statement of [`LeaseStore::sync_workloads`], for updates of distinct leases.
    fn sync_workloads_statement(
        &self,
        cluster: &ClusterName,
        reported_by: &Holder,
        by_name: &BTreeMap<&str, &WorkloadUpdate>,
    ) -> Result<String> {
        let numbers = |f: &dyn Fn(&WorkloadUpdate) -> Result<i64>| -> Result<String> {
            let values = by_name
                .values()
                .map(|u| f(u).map(|v| v.to_string()))
                .collect::<Result<Vec<_>>>()?;
            Ok(format!("'{{{}}}'::bigint[]", values.join(",")))
        };
        let names = literal(&text_array(by_name.keys().copied()));
        let replicas = numbers(&|u| Ok(u.counts.replicas.into()))?;
        let running = numbers(&|u| Ok(u.counts.running_pods.into()))?;
        let ready = numbers(&|u| Ok(u.counts.ready_pods.into()))?;
        let stale_after = numbers(&|u| ttl_millis(u.timing.stale_after))?;
        let refresh = numbers(&|u| ttl_millis(u.timing.refresh))?;
        let w = self.schema.qualify("lease_workload");
        let (cluster, reported_by) = (literal(cluster.as_str()), literal(reported_by.as_str()));
        let (l, t, tl) = (&self.lease_table, &self.timeline_table, &self.timeline);
        // "No pods" from a replica that does not hold the lease, while another replica of
        // its cluster does, is refused: its observation may predate that holder's
        // scale-up and would overwrite the holder's report of the starting pod. Only the
        // holder may say its cluster runs nothing (reports of pods are always taken).
        //
        // A report from an earlier timeline (before a failover) is read as "may run
        // pods", dated when this timeline was first seen (now if not yet): that cluster's
        // later reports may be lost, and it goes stale by its own bound from there. Its
        // own date is not used: it is on the old primary's clock.
        let expires = expires_at("l");
        Ok(format!(
            "WITH tl AS MATERIALIZED (SELECT {tl} AS id), \
             input AS ( \
               SELECT * FROM unnest({names}::text[], {replicas}, {running}, {ready}, {stale_after}, {refresh}) \
                 AS i(name, replicas, running_pods, ready_pods, stale_after_ms, refresh_ms) \
             ), \
             report AS ( \
               INSERT INTO {w} AS w (name, cluster, reported_by, replicas, running_pods, ready_pods, reported_at, stale_after_ms, refresh_ms, timeline) \
               SELECT i.name, {cluster}, {reported_by}, i.replicas, i.running_pods, i.ready_pods, clock_timestamp(), i.stale_after_ms, i.refresh_ms, tl.id \
               FROM input AS i, tl \
               WHERE i.running_pods > 0 OR NOT EXISTS ( \
                 SELECT 1 FROM {l} AS l WHERE l.name = i.name AND l.holder <> {reported_by} \
                   AND strpos(l.holder, '/') > 1 AND split_part(l.holder, '/', 1) = {cluster} \
                   AND {expires} > clock_timestamp()) \
               ON CONFLICT (name, cluster) DO UPDATE SET reported_by = EXCLUDED.reported_by, \
                 replicas = EXCLUDED.replicas, running_pods = EXCLUDED.running_pods, \
                 ready_pods = EXCLUDED.ready_pods, reported_at = EXCLUDED.reported_at, \
                 stale_after_ms = EXCLUDED.stale_after_ms, refresh_ms = EXCLUDED.refresh_ms, \
                 timeline = EXCLUDED.timeline \
               RETURNING w.name \
             ), \
             seen AS MATERIALIZED ( \
               SELECT COALESCE((SELECT s.first_seen_at FROM {t} AS s WHERE s.timeline = tl.id), \
                               clock_timestamp()) AS at \
               FROM tl \
             ), \
             judged AS ( \
               SELECT w.name, cluster, reported_by, replicas, ready_pods, stale_after_ms, refresh_ms, \
                      CASE WHEN w.timeline = tl.id THEN running_pods ELSE greatest(running_pods, 1) END AS running_pods, \
                      CASE WHEN w.timeline = tl.id THEN reported_at ELSE seen.at END AS reported_at \
               FROM {w} AS w, tl, seen WHERE w.name IN (SELECT name FROM input) AND w.cluster <> {cluster} \
             ) \
             SELECT i.name, i.name IN (SELECT name FROM report) AS written, \
                    j.cluster, j.reported_by, j.replicas, j.running_pods, j.ready_pods, j.reported_at, \
                    j.stale_after_ms, j.refresh_ms, \
                    (extract(epoch FROM clock_timestamp() - j.reported_at) * 1000)::bigint AS age_ms \
             FROM input AS i LEFT JOIN judged AS j ON j.name = i.name ORDER BY i.name, j.cluster"
        ))
    }

    /// One round trip, for readiness probes: a bare `SELECT 1` on a lease connection
    /// (no `SET LOCAL`s: it takes no lock, and the call timeout bounds it).
    pub async fn ping(&self) -> Result<()> {
        self.execute_reference(Reference::Select1).await.map(|_| ())
    }

    /// Runs a reference statement as it is (one simple-query message, no `SET LOCAL`s)
    /// on a lease connection and returns the rows it returned; for readiness and for
    /// benchmarks that compare the lease statements with reference statements on the
    /// same path. Only these fixed statements: arbitrary SQL (a `BEGIN`, a `SET`) could
    /// leave state on a connection the next renew reuses.
    #[doc(hidden)]
    pub async fn execute_reference(&self, reference: Reference) -> Result<usize> {
        let sql = match reference {
            Reference::Select1 => "SELECT 1".to_owned(),
            Reference::BumpProbe => format!(
                "UPDATE {} SET n = n + 1 WHERE id = 1 RETURNING n",
                self.schema.qualify(PROBE_TABLE)
            ),
        };
        // Either may run twice.
        let rows = self.run_with_retries(&sql, self.conns.max()).await?;
        Ok(rows.len())
    }

    /// The audit history of one lease, oldest first.
    pub async fn events(&self, name: &LeaseName) -> Result<Vec<LeaseEvent>> {
        let e = &self.event_table;
        let name = literal(name.as_str());
        let sql = format!(
            "SELECT id, name, epoch, holder, previous_holder, kind, at FROM {e} \
             WHERE name = {name} ORDER BY id"
        );
        let rows = self.fetch(sql).await?;
        rows.iter()
            .map(|row| {
                Ok(LeaseEvent {
                    id: row.try_get("id")?,
                    name: row.try_get("name")?,
                    epoch: row.try_get("epoch")?,
                    holder: row.try_get("holder")?,
                    previous_holder: row.try_get("previous_holder")?,
                    kind: row.try_get("kind")?,
                    at: row.try_get("at")?,
                })
            })
            .collect()
    }

    /// Runs a statement that may safely run twice (a read, a renew, an upsert of the
    /// latest report). Connections are not tested before use (see `pool_options`), so
    /// after a database restart or a network reset every idle connection in the pool is
    /// dead and fails the first statement sent on it; such a statement is sent again on
    /// another connection, within the same call timeout, instead of costing a tick per
    /// dead connection (which can add up to a missed renew deadline).
    async fn fetch(&self, sql: String) -> Result<Vec<PgRow>> {
        self.run_with_retries(&self.with_settings(&sql), self.conns.max())
            .await
    }

    /// Runs a statement that must not run twice (acquire, release): one attempt.
    async fn fetch_once(&self, sql: String) -> Result<Vec<PgRow>> {
        self.run_with_retries(&self.with_settings(&sql), 0).await
    }

    /// Runs `sql` within the call timeout, sending it again (up to `retries` times) when
    /// its connection turns out dead.
    async fn run_with_retries(&self, sql: &str, retries: u32) -> Result<Vec<PgRow>> {
        let deadline = tokio::time::Instant::now() + self.call_timeout;
        let mut retries_left = retries;
        loop {
            match tokio::time::timeout_at(deadline, self.run(sql)).await {
                Ok(Ok(rows)) => return Ok(rows),
                Ok(Err(error)) if retries_left > 0 && ends_session(&error) => {
                    retries_left -= 1;
                    tracing::debug!(%error, "statement failed on a dead connection; sending it again");
                }
                Ok(Err(sqlx::Error::Database(db)))
                    if db.code().as_deref() == Some(LOCK_NOT_AVAILABLE) =>
                {
                    return Err(Error::LockTimeout(self.lock_timeout()));
                }
                Ok(Err(error)) => return Err(error.into()),
                Err(_) => return Err(Error::Timeout(self.call_timeout)),
            }
        }
    }

    /// One query message, four statements, one implicit transaction: the SET LOCALs
    /// apply to this statement only (see `with_lock_timeout`). The statement timeout is
    /// the call timeout, so a statement this client gave up on cannot still commit long
    /// after (a late "no pods" report, say); it does not cover time spent queued in a
    /// pooler before the server starts it (PgBouncer: `query_wait_timeout`), nor a
    /// commit waiting for a synchronous standby (PostgreSQL ends the timeout before the
    /// commit): such a statement commits when the standby answers, which this client no
    /// longer counts on.
    /// `synchronous_commit = on` whatever the server's default: a renew or acquire is
    /// acknowledged only once it is on disk (and on a synchronous standby, if the server
    /// has one), so neither a crash nor a failover to that standby loses it.
    fn with_settings(&self, sql: &str) -> String {
        format!(
            "SET LOCAL lock_timeout = '{}ms'; SET LOCAL statement_timeout = '{}ms'; \
             SET LOCAL synchronous_commit = on; {sql}",
            self.lock_timeout_ms,
            self.call_timeout.as_millis().max(1)
        )
    }

    /// One simple-query message on a lease connection. The connection is kept for the
    /// next statement only when this one ran to the end (rows, or an error of the
    /// statement, after which sqlx reads the pending `ReadyForQuery` before the next
    /// one); on any other outcome (a session the server ended, an I/O error, a caller
    /// that stopped waiting) it is closed.
    async fn run(&self, sql: &str) -> std::result::Result<Vec<PgRow>, sqlx::Error> {
        let mut checkout = self.conns.checkout().await?;
        let result = sqlx::raw_sql(AssertSqlSafe(sql))
            .fetch_all(checkout.conn())
            .await;
        let reusable = match &result {
            Ok(_) => true,
            Err(error @ sqlx::Error::Database(_)) => !ends_session(error),
            Err(_) => false,
        };
        if reusable {
            self.conns.give_back(checkout);
        }
        result
    }

    async fn fetch_leases(&self, sql: String) -> Result<Vec<Lease>> {
        self.fetch(sql).await?.iter().map(Lease::from_row).collect()
    }

    async fn fetch_one_lease(&self, sql: String) -> Result<Option<Lease>> {
        Ok(self.fetch_leases(sql).await?.into_iter().next())
    }

    async fn fetch_one_lease_once(&self, sql: String) -> Result<Option<Lease>> {
        let rows = self.fetch_once(sql).await?;
        rows.iter().map(Lease::from_row).next().transpose()
    }
}

/// SQLSTATE `lock_not_available`: the statement was cancelled by `lock_timeout`.
const LOCK_NOT_AVAILABLE: &str = "55P03";

/// The text whose `hashtextextended(text, 0)` is the advisory lock key of a lease's
/// fence. Must match `lease_fence_key()` in `migrations/20261202000001_lease_fence.sql`:
/// the schema is part of it, so schemas sharing a database do not share fences.
fn fence_key_text(schema: &Schema, name: &str) -> String {
    format!("reaper-operator:{}:{name}", schema.as_str())
}

/// Refuses a server that does not say which WAL timeline it writes on (some managed
/// services hide it): the lease detects a failover by it (docs/operations.md).
async fn check_timeline(pool: &PgPool) -> Result<()> {
    const UNSUPPORTED: [&str; 3] = ["42883", "0A000", "42501"];
    match sqlx::raw_sql("SELECT pg_walfile_name(pg_current_wal_lsn())")
        .fetch_one(pool)
        .await
    {
        Ok(_) => Ok(()),
        Err(sqlx::Error::Database(db))
            if db
                .code()
                .is_some_and(|code| UNSUPPORTED.contains(&code.as_ref())) =>
        {
            Err(Error::Config(format!(
                "the lease database does not report its WAL timeline \
                 (SELECT pg_walfile_name(pg_current_wal_lsn()) failed: {}); reaper-operator \
                 needs it to notice a failover of the database (docs/operations.md)",
                db.message()
            )))
        }
        Err(error) => Err(error.into()),
    }
}

fn check_encoding(encoding: &str) -> Result<()> {
    if encoding.eq_ignore_ascii_case("UTF8") {
        return Ok(());
    }
    Err(Error::Config(format!(
        "the lease database uses encoding {encoding}; reaper-operator needs UTF8 \
         (create the database with ENCODING 'UTF8')"
    )))
}

/// One update per lease: a second row of one lease would make the upsert fail the whole
/// batch. Of two updates of one lease the one that shows more pods is kept.
fn one_update_per_lease(updates: &[WorkloadUpdate]) -> BTreeMap<&str, &WorkloadUpdate> {
    let mut by_name: BTreeMap<&str, &WorkloadUpdate> = BTreeMap::new();
    for update in updates {
        by_name
            .entry(update.name.as_str())
            .and_modify(|kept| {
                if update.counts.running_pods > kept.counts.running_pods {
                    *kept = update;
                }
            })
            .or_insert(update);
    }
    by_name
}

/// The answer of the statement of [`LeaseStore::sync_workloads`]: every lease of
/// `names`, with the reports of the other clusters (none when no other cluster has
/// reported it).
fn synced_reports<'a>(
    names: impl Iterator<Item = &'a str>,
    rows: &[PgRow],
) -> Result<SyncedReports> {
    let mut synced = SyncedReports {
        others: names.map(|name| (name.to_owned(), Vec::new())).collect(),
        written: HashSet::new(),
    };
    for row in rows {
        let name: String = row.try_get("name")?;
        if row.try_get("written")? {
            synced.written.insert(name.clone());
        }
        // No other cluster has reported this lease.
        let Some(cluster) = row.try_get::<Option<String>, _>("cluster")? else {
            continue;
        };
        let age_ms: i64 = row.try_get("age_ms")?;
        let stale_after_ms: i64 = row.try_get("stale_after_ms")?;
        let refresh_ms: i64 = row.try_get("refresh_ms")?;
        synced.others.entry(name).or_default().push(WorkloadReport {
            cluster,
            reported_by: row.try_get("reported_by")?,
            replicas: row.try_get("replicas")?,
            running_pods: row.try_get("running_pods")?,
            ready_pods: row.try_get("ready_pods")?,
            reported_at: row.try_get("reported_at")?,
            age: Duration::from_millis(age_ms.max(0) as u64),
            stale_after: Duration::from_millis(stale_after_ms.max(1) as u64),
            refresh: Duration::from_millis(refresh_ms.max(1) as u64),
        });
    }
    Ok(synced)
}

/// Applies the embedded migrations inside `schema` (see [`LeaseStore::migrate`]), after
/// checking that the database is one the lease works in ([`LeaseStore::check_server`]).
pub async fn migrate(pool: &PgPool, schema: &Schema) -> Result<()> {
    let encoding: String = sqlx::raw_sql("SHOW server_encoding")
        .fetch_one(pool)
        .await?
        .try_get(0)?;
    check_encoding(&encoding)?;
    check_timeline(pool).await?;
    let quoted = format!("\"{schema}\"");
    let migrations = MIGRATOR
        .iter()
        .map(|m| {
            let sql = format!("SET LOCAL search_path TO {quoted};\n{}", m.sql.as_str());
            sqlx::migrate::Migration::new(
                m.version,
                m.description.clone(),
                m.migration_type,
                sqlx::SqlSafeStr::into_sql_str(AssertSqlSafe(sql)),
                m.no_tx,
            )
        })
        .collect();
    let mut migrator = sqlx::migrate::Migrator::with_migrations(migrations);
    migrator.create_schema(quoted.clone());
    migrator.dangerous_set_table_name(format!("{quoted}._sqlx_migrations"));
    let mut conn = pool.acquire().await?;
    migrator.run(&mut *conn).await?;
    Ok(())
}

fn pool_options(call_timeout: Duration, max_connections: u32) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(call_timeout)
        // Migrations and callers' statements are rare: no connection stays open for them.
        .idle_timeout(Duration::from_secs(30))
}

/// Whether `error` means the connection is gone: an I/O error, or a FATAL the server
/// sends as it ends the session (`pg_terminate_backend`, a shutdown, an idle-session
/// timeout; a pooler closing a client), which sqlx reads as the next statement's reply.
fn ends_session(error: &sqlx::Error) -> bool {
    use sqlx::postgres::{PgDatabaseError, PgSeverity};
    match error {
        sqlx::Error::Io(_) => true,
        sqlx::Error::Database(db) => db
            .try_downcast_ref::<PgDatabaseError>()
            .is_none_or(|e| matches!(e.severity(), PgSeverity::Fatal | PgSeverity::Panic)),
        _ => false,
    }
}

fn lock_timeout_millis(lock_timeout: Duration) -> u64 {
    // 0 would mean "no timeout" to the server.
    (lock_timeout.as_millis().min(i32::MAX as u128) as u64).max(1)
}

fn ttl_millis(ttl: Duration) -> Result<i64> {
    let ms = ttl.as_millis();
    if ms == 0 || ms > i64::MAX as u128 {
        return Err(Error::Config(format!(
            "ttl must be at least 1 ms, got {ttl:?}"
        )));
    }
    Ok(ms as i64)
}

/// A PostgreSQL array literal (`{"a","b"}`) of lease names, to be quoted with
/// [`literal`] and cast to `text[]`.
fn text_array<'a>(names: impl Iterator<Item = &'a str>) -> String {
    let mut out = String::from("{");
    for (i, name) in names.enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push('"');
        for c in name.chars() {
            if c == '"' || c == '\\' {
                out.push('\\');
            }
            out.push(c);
        }
        out.push('"');
    }
    out.push('}');
    out
}

/// A SQL string literal that means the same whatever `standard_conforming_strings` is.
/// Control characters (NUL included) cannot reach it: the names it quotes are checked
/// where they come in (`identity`).
fn literal(value: &str) -> String {
    postgres_protocol::escape::escape_literal(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literal_escapes_quotes_and_backslashes() {
        assert_eq!(literal("plain"), "'plain'");
        assert_eq!(literal("o'brien"), "'o''brien'");
        assert_eq!(literal(r"a\'b"), r" E'a\\''b'");
        assert_eq!(literal("ünï"), "'ünï'");
    }

    #[test]
    fn lock_timeout_is_whole_milliseconds_and_never_zero() {
        // 0 would disable the timeout on the server.
        assert_eq!(lock_timeout_millis(Duration::ZERO), 1);
        assert_eq!(lock_timeout_millis(Duration::from_micros(300)), 1);
        assert_eq!(lock_timeout_millis(Duration::from_millis(1500)), 1500);
        assert_eq!(lock_timeout_millis(Duration::from_secs(1) / 4), 250);
    }

    #[test]
    fn only_a_utf8_database_is_accepted() {
        assert!(check_encoding("UTF8").is_ok());
        let error = check_encoding("LATIN1").unwrap_err();
        assert_eq!(
            error.to_string(),
            "invalid configuration: the lease database uses encoding LATIN1; reaper-operator \
             needs UTF8 (create the database with ENCODING 'UTF8')"
        );
        assert!(check_encoding("SQL_ASCII").is_err());
    }

    #[test]
    fn ttl_must_be_positive() {
        assert!(ttl_millis(Duration::ZERO).is_err());
        assert_eq!(ttl_millis(Duration::from_secs(15)).unwrap(), 15_000);
    }
}
