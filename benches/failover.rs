//! End-to-end benchmarks of the operator binary on real local control planes: a plain
//! binary (`harness = false`), not a test. Two subcommands:
//!
//! - `failover`: two control planes (clusters `a` and `b`), one operator replica in each,
//!   one Reaper per cluster with the same lease name and its own Deployment. Each trial
//!   kills the leading replica (`--mode kill9`: SIGKILL, `--mode graceful`: SIGTERM) and
//!   measures, from the signal: the other replica's acquire row in `lease_event` (its
//!   `at`, the database's `clock_timestamp()`, same machine), the other cluster's
//!   Deployment `spec.replicas` becoming 1 and its `status.readyReplicas` becoming 1 (both
//!   seen by a watch), and the pod's own Ready condition (a pod watch). Then it restarts
//!   the killed replica as a standby, waits until the system is stable again, and repeats
//!   with the roles swapped. `--mode dead-cluster` (`failover/dead_cluster.rs`) runs two
//!   replicas per cluster and kills both of the leading cluster's replicas and its
//!   kube-apiserver at once, then brings that apiserver back.
//! - `footprint`: one control plane and one replica holding N leases (N Reapers, each
//!   with its own Deployment and lease name), for each N of `--sizes`: resident memory,
//!   CPU, the statements per second it sends to the database (by kind, with
//!   `pg_stat_statements`) and the requests per second it sends to the kube-apiserver
//!   (by verb, from the apiserver's audit log of the replica's own identity,
//!   `failover/audit.rs`), over a measurement window; `--unrelated-pods M` adds M pods
//!   that no Reaper selects (`failover/unrelated.rs`).
//!
//! ```text
//! export CARGO_TARGET_DIR=...                 # optional, as for any cargo command
//! set -a; . "$(REAPER_DB_PG_STAT_STATEMENTS=1 tests/db/up.sh bench | tail -n 1)"; set +a
//! cargo bench --bench failover -- failover --mode kill9 --trials 30 --write       # ~10 min
//! cargo bench --bench failover -- failover --mode kill9 --trials 30 --ttl 3 --deadline 2 --retry 1 --write
//! cargo bench --bench failover -- failover --mode graceful --trials 30 --write    # ~5 min
//! cargo bench --bench failover -- failover --mode dead-cluster --trials 30 --grace-seconds 5 --write  # ~30 min
//! cargo bench --bench failover -- footprint --write   # N = 0, 1, 100, 1000; 60 s windows; ~15 min
//! cargo bench --bench failover -- --help
//! ```
//!
//! `cargo bench --bench failover` builds the operator binary (`reaper-operator`, release
//! profile) from the same checkout and runs exactly that file
//! (`CARGO_BIN_EXE_reaper-operator`); `REAPER_BENCH_OPERATOR=/path/to/reaper-operator`
//! runs another build instead. The control planes come from `tests/cluster/up.sh` (built
//! once by `tests/cluster/build.sh`) and are stopped with `tests/cluster/down.sh`, the
//! operators are killed, and the schema (`failover`) or database (`footprint`) is dropped,
//! also when a run fails or is interrupted with Ctrl-C. `REAPER_KEEP_CLUSTER=1` leaves
//! the control planes running. Operator logs go to `$TMPDIR/reaper-bench-<kind>-<pid>/`,
//! kept only when the run fails. `REAPER_BENCH_RUST_LOG` sets the operators' `RUST_LOG`
//! (default: unset, i.e. the binary's own `info,sqlx=warn`).
//!
//! `--write` writes `docs/benchmarks-failover.md` (one section per mode and timings,
//! replaced when the same configuration is written again) or
//! `docs/benchmarks-footprint.md` (the whole file).

#[path = "failover/audit.rs"]
mod audit;
#[path = "failover/dead_cluster.rs"]
mod dead_cluster;
#[path = "support/host.rs"]
mod host;
#[path = "failover/pods.rs"]
mod pods;
use pods::Timeline;
#[path = "../tests/support/mod.rs"]
mod support;
#[path = "failover/unrelated.rs"]
mod unrelated;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use chrono::{DateTime, Utc};
use clap::{Args, Parser, Subcommand, ValueEnum};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Node;
use kube::Client;
use kube::api::{Api, ListParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use reaper_operator::config::{LeaseTimings, Schema};
use reaper_operator::lease::LeaseStore;
use reaper_operator::reaper::{LeaseSpec, Phase, Reaper};
use serde_json::json;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, Row};
use support::cluster::{TestCluster, install_reaper_crd, wait_until};
use support::fixtures::{
    PodStop, create_deployment, create_deployment_with_stop, create_namespace, create_reaper,
};

const DIRECT_ENV: &str = "REAPER_TEST_DATABASE_URL";
const FAILOVER_DOC: &str = "docs/benchmarks-failover.md";
const FOOTPRINT_DOC: &str = "docs/benchmarks-footprint.md";
const SHUTDOWN_TIMEOUT_S: u64 = 30;
/// Reapers (and Deployments) per namespace in `footprint`.
const PER_NAMESPACE: usize = 100;
/// Pods the fake Node of `tests/cluster/up.sh` accepts.
const DEFAULT_NODE_PODS: usize = 110;

// ---------------------------------------------------------------------------------------
// Command line

#[derive(Debug, Parser)]
#[command(
    name = "cargo bench --bench failover --",
    about = "Failover latency and footprint of the reaper-operator binary on local control planes",
    after_help = "Needs REAPER_TEST_DATABASE_URL and REAPER_TEST_PGBOUNCER_URL: \
                  set -a; . \"$(REAPER_DB_PG_STAT_STATEMENTS=1 tests/db/up.sh bench | tail -n 1)\"; set +a"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Bench>,
}

#[derive(Debug, Subcommand)]
enum Bench {
    /// Kill the leading replica of two clusters and time the other cluster's takeover.
    Failover(FailoverArgs),
    /// Memory, CPU and database statements of one replica holding N leases.
    Footprint(FootprintArgs),
}

#[derive(Clone, Copy, Debug, Args)]
struct TimingArgs {
    /// spec.lease.ttlSeconds of the Reapers.
    #[arg(long, default_value_t = 15)]
    ttl: u64,
    /// spec.lease.renewDeadlineSeconds.
    #[arg(long, default_value_t = 10)]
    deadline: u64,
    /// spec.lease.retryPeriodSeconds.
    #[arg(long, default_value_t = 2)]
    retry: u64,
}

impl TimingArgs {
    fn validate(&self) -> Result<LeaseTimings> {
        ensure!(
            self.ttl <= 3600 && self.deadline <= 3600 && self.retry <= 3600,
            "timings above 3600 s are not allowed by the CRD"
        );
        Ok(LeaseTimings::new(
            Duration::from_secs(self.ttl),
            Duration::from_secs(self.deadline),
            Duration::from_secs(self.retry),
        )?)
    }

    fn lease_spec(&self, name: &str) -> LeaseSpec {
        LeaseSpec {
            name: Some(name.to_owned()),
            ttl_seconds: self.ttl as i32,
            renew_deadline_seconds: self.deadline as i32,
            retry_period_seconds: self.retry as i32,
            handover_delay_seconds: 0,
        }
    }

    fn flags(&self) -> String {
        format!(
            "--ttl {} --deadline {} --retry {}",
            self.ttl, self.deadline, self.retry
        )
    }

    fn label(&self) -> String {
        format!(
            "ttl {} s / renew deadline {} s / retry {} s",
            self.ttl, self.deadline, self.retry
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// SIGKILL: the lease must expire before the other replica can take it.
    Kill9,
    /// SIGTERM: the leader scales its Deployment to 0, then releases the lease.
    Graceful,
    /// The leading cluster dies whole: both of its replicas (two per cluster in this
    /// mode) and its kube-apiserver get SIGKILL at once; its pod object stays as it was.
    /// The apiserver is started again after each trial.
    DeadCluster,
}

impl Mode {
    fn flag(self) -> &'static str {
        match self {
            Mode::Kill9 => "kill9",
            Mode::Graceful => "graceful",
            Mode::DeadCluster => "dead-cluster",
        }
    }
}

#[derive(Debug, Args)]
struct FailoverArgs {
    /// How the leading replica is stopped.
    #[arg(long, value_enum, default_value_t = Mode::Kill9)]
    mode: Mode,
    /// Number of failovers (the roles swap after each).
    #[arg(long, default_value_t = 30)]
    trials: usize,
    #[command(flatten)]
    timing: TimingArgs,
    /// terminationGracePeriodSeconds of the bench Deployments' pods (kwok keeps a deleted
    /// pod Terminating that long; a dead cluster's report stays credible that much longer).
    #[arg(long, default_value_t = 1)]
    grace_seconds: i64,
    /// Add or replace this configuration's section in docs/benchmarks-failover.md.
    #[arg(long)]
    write: bool,
}

#[derive(Debug, Args)]
struct FootprintArgs {
    /// Numbers of Reapers (leases) to measure, comma-separated; run in ascending order.
    #[arg(long, value_delimiter = ',', default_value = "0,1,100,1000")]
    sizes: Vec<usize>,
    /// Measurement window per size, in seconds.
    #[arg(long, default_value_t = 60)]
    window: u64,
    /// Wait after the replica holds every lease and every Deployment is ready, in seconds.
    #[arg(long, default_value_t = 20)]
    settle: u64,
    /// Reapers and Deployments created concurrently.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Pods that belong to no Reaper, created once before the first size (kwok pods in a
    /// namespace of their own), to measure the replica in a cluster with many pods.
    #[arg(long, default_value_t = 0)]
    unrelated_pods: usize,
    #[command(flatten)]
    timing: TimingArgs,
    /// Write docs/benchmarks-footprint.md.
    #[arg(long)]
    write: bool,
}

fn main() -> ExitCode {
    // `cargo bench` appends `--bench`; drop it.
    let args = std::env::args_os().filter(|a| a != "--bench");
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let Some(command) = cli.command else {
        // A bare `cargo bench` runs every bench: do nothing here rather than start clusters.
        eprintln!(
            "failover bench: no subcommand; try `cargo bench --bench failover -- --help` \
             (nothing measured)"
        );
        return ExitCode::SUCCESS;
    };
    if matches!(command, Bench::Footprint(_)) {
        // The footprint's control plane logs the operator's requests (up.sh reads this);
        // set before any thread exists, so nothing reads the environment concurrently.
        // SAFETY: single-threaded here: the tokio runtime is built below.
        unsafe { std::env::set_var(audit::AUDIT_ENV, "1") };
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("failover bench: cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        // On Ctrl-C the bench future is dropped, which runs every guard's Drop (operators
        // killed, control planes stopped); the database clean-up of an interrupted run is
        // done below.
        tokio::select! {
            r = run(&command) => r,
            _ = tokio::signal::ctrl_c() => Err(anyhow!(Interrupted)),
        }
    });
    if result.as_ref().is_err_and(|e| e.is::<Interrupted>()) {
        runtime.block_on(cleanup_after_interrupt());
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("failover bench failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[derive(Debug)]
struct Interrupted;

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("interrupted")
    }
}

impl std::error::Error for Interrupted {}

async fn run(command: &Bench) -> Result<()> {
    match command {
        Bench::Failover(args) => failover(args).await,
        Bench::Footprint(args) => footprint(args).await,
    }
}

/// Set while this run's `footprint` has created the pg_stat_statements extension.
static CREATED_PG_STAT_STATEMENTS: AtomicBool = AtomicBool::new(false);

/// Drops what an interrupted run left in the database (its future was dropped before its
/// own clean-up ran).
async fn cleanup_after_interrupt() {
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

// ---------------------------------------------------------------------------------------
// Environment: database URLs, the operator binary, logs, the machine

struct Urls {
    direct: String,
    pgbouncer: String,
}

impl Urls {
    fn from_env() -> Result<Self> {
        let (direct, pgbouncer) = host::database_urls(
            "set -a; . \"$(REAPER_DB_PG_STAT_STATEMENTS=1 tests/db/up.sh bench | tail -n 1)\"; set +a",
        )?;
        Ok(Self { direct, pgbouncer })
    }
}

/// `url` with its database name replaced by `db` (PgBouncer's `* =` entry forwards any).
fn with_database(url: &str, db: &str) -> Result<String> {
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

async fn admin_pool(url: &str) -> Result<PgPool> {
    PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(10))
        .connect(url)
        .await
        .with_context(|| format!("connect to {DIRECT_ENV}"))
}

async fn exec(pool: &PgPool, sql: &str) -> Result<()> {
    sqlx::raw_sql(AssertSqlSafe(sql.to_owned()))
        .execute(pool)
        .await
        .with_context(|| sql.to_owned())?;
    Ok(())
}

/// A SQL string literal (the values here are our own, but quote them anyway).
fn lit(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

fn failover_schema_name() -> String {
    format!("bench_failover_{}", std::process::id())
}

fn footprint_db_name() -> String {
    format!("reaper_bench_fp_{}", std::process::id())
}

fn operator_bin() -> PathBuf {
    std::env::var_os("REAPER_BENCH_OPERATOR")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_reaper-operator")))
}

/// Directory of the operators' logs; removed on success, kept (and named) on failure.
struct LogDir {
    path: PathBuf,
    keep: bool,
}

impl LogDir {
    fn new(kind: &str) -> Result<Self> {
        let path = std::env::temp_dir().join(format!("reaper-bench-{kind}-{}", std::process::id()));
        std::fs::create_dir_all(&path).with_context(|| format!("create {}", path.display()))?;
        Ok(Self { path, keep: true })
    }

    fn succeeded(&mut self) {
        self.keep = false;
    }
}

impl Drop for LogDir {
    fn drop(&mut self) {
        if self.keep {
            eprintln!("operator logs kept in {}", self.path.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

#[derive(Default)]
struct Machine {
    host: host::Host,
    postgres: String,
    pgbouncer: String,
    commit: String,
    load_start: String,
    load_end: String,
}

impl Machine {
    async fn probe(pool: &PgPool) -> Result<Self> {
        let row = sqlx::raw_sql("SELECT current_setting('server_version') AS v")
            .fetch_one(pool)
            .await
            .context("read the server version")?;
        let host = host::Host::probe();
        let pgbouncer = host::first_line("pgbouncer", "--version")
            .unwrap_or_else(|| "PgBouncer (version unknown)".to_owned());
        let root = support::cluster::repo_root();
        let commit = Command::new("git")
            .arg("-C")
            .arg(&root)
            .args(["rev-parse", "--short=12", "HEAD"])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .map_or_else(
                || "unknown".to_owned(),
                |c| {
                    let dirty = Command::new("git")
                        .arg("-C")
                        .arg(&root)
                        .args(["status", "--porcelain", "--untracked-files=no"])
                        .output()
                        .is_ok_and(|o| !o.stdout.is_empty());
                    if dirty {
                        format!("{c} with uncommitted changes")
                    } else {
                        c
                    }
                },
            );
        let commit = if std::env::var_os("REAPER_BENCH_OPERATOR").is_some_and(|v| !v.is_empty()) {
            format!("{} (REAPER_BENCH_OPERATOR)", operator_bin().display())
        } else {
            format!("release build of commit {commit}")
        };
        Ok(Self {
            host,
            postgres: row.try_get("v")?,
            pgbouncer,
            commit,
            load_start: host::load_average(),
            ..Self::default()
        })
    }

    fn describe(&self, w: &mut String) {
        let (line, busy) = host::machine_line(&self.host, &self.load_start, &self.load_end);
        let _ = writeln!(w, "{line}");
        if busy >= self.host.nproc.max(1) as f64 * 0.75 {
            let _ = writeln!(
                w,
                "  The machine was busy (1-minute load up to {busy:.2} on {} CPUs): the control \
                 planes, PostgreSQL, PgBouncer, the operators and any other jobs competed for \
                 the CPUs, which mostly shows in the p99 and max columns.",
                self.host.nproc
            );
        }
        let _ = writeln!(
            w,
            "- **Software:** operator {}; PostgreSQL {} and {} (`pool_mode = transaction`) on \
             the same machine over loopback; control planes from `tests/cluster/up.sh` \
             (etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kwok).",
            self.commit, self.postgres, self.pgbouncer
        );
    }
}

// ---------------------------------------------------------------------------------------
// The operator as a child process

struct OperatorSpec<'a> {
    kubeconfig: &'a Path,
    database_url: &'a str,
    listen_url: &'a str,
    schema: &'a Schema,
    cluster: &'a str,
    identity: String,
    namespace: Option<&'a str>,
    log_dir: &'a Path,
}

struct Operator {
    cluster: String,
    identity: String,
    http_port: u16,
    log: PathBuf,
    child: Child,
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl Operator {
    fn start(spec: OperatorSpec<'_>) -> Result<Self> {
        let http_port = free_port()?;
        let log = spec
            .log_dir
            .join(format!("{}-{}.log", spec.cluster, spec.identity));
        let out = File::create(&log).with_context(|| format!("create {}", log.display()))?;
        let bin = operator_bin();
        ensure!(
            bin.is_file(),
            "operator binary {} not found (build it with `cargo build --release --bin reaper-operator`, \
             or let `cargo bench --bench failover` build it)",
            bin.display()
        );
        let mut cmd = Command::new(&bin);
        cmd.arg("run")
            .args(["--cluster-name", spec.cluster])
            .args(["--identity", &spec.identity])
            .args(["--http-addr", &format!("127.0.0.1:{http_port}")])
            .args([
                "--shutdown-timeout-seconds",
                &SHUTDOWN_TIMEOUT_S.to_string(),
            ])
            .arg("--no-migrate")
            .env("KUBECONFIG", spec.kubeconfig)
            .env("DATABASE_URL", spec.database_url)
            .env("REAPER_LISTEN_DATABASE_URL", spec.listen_url)
            .env("REAPER_DB_SCHEMA", spec.schema.as_str())
            .env_remove("REAPER_WATCH_NAMESPACE")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        if let Some(ns) = spec.namespace {
            cmd.args(["--watch-namespace", ns]);
        }
        if let Some(filter) = std::env::var_os("REAPER_BENCH_RUST_LOG").filter(|v| !v.is_empty()) {
            cmd.env("RUST_LOG", filter);
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("start {} run", bin.display()))?;
        Ok(Self {
            cluster: spec.cluster.to_owned(),
            identity: spec.identity,
            http_port,
            log,
            child,
        })
    }

    fn holder(&self) -> String {
        format!("{}/{}", self.cluster, self.identity)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL; returns the wall-clock time just before the signal.
    fn kill9(&mut self) -> Result<DateTime<Utc>> {
        let at = Utc::now();
        self.child.kill().context("SIGKILL the operator")?;
        Ok(at)
    }

    /// SIGTERM (through `kill`, a millisecond or two after the returned time).
    fn terminate(&self) -> Result<DateTime<Utc>> {
        let at = Utc::now();
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .context("run kill -TERM")?;
        ensure!(status.success(), "kill -TERM {} failed", self.pid());
        Ok(at)
    }

    async fn wait_exit(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            ensure!(
                Instant::now() < deadline,
                "{} did not exit within {timeout:?}",
                self.holder()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Status code and body of `GET path` on the operator's HTTP server.
    fn http(&self, path: &str) -> Option<(u16, String)> {
        support::fixtures::http_get(self.http_port, path, Duration::from_secs(2))
    }

    /// The value of an unlabelled series in `/metrics`.
    fn metric(&self, series: &str) -> Option<f64> {
        let (code, body) = self.http("/metrics")?;
        if code != 200 {
            return None;
        }
        body.lines().find_map(|l| {
            let (name, value) = l.split_once(' ')?;
            (name == series).then(|| value.trim().parse().ok())?
        })
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

fn with_logs<T>(result: Result<T>, ops: &[&Operator]) -> Result<T> {
    result.map_err(|e| {
        let logs: Vec<String> = ops
            .iter()
            .map(|o| {
                format!(
                    "--- last lines of {} ({}):\n{}",
                    o.holder(),
                    o.log.display(),
                    o.log_tail(25)
                )
            })
            .collect();
        anyhow!("{e:#}\n{}", logs.join("\n"))
    })
}

// ---------------------------------------------------------------------------------------
// Kubernetes helpers

async fn start_cluster(prefix: &'static str) -> Result<TestCluster> {
    tokio::task::spawn_blocking(move || TestCluster::start_new(prefix))
        .await
        .context("cluster start-up task")?
        .with_context(|| format!("start control plane {prefix}"))
}

/// A singleton Deployment as the README asks for: strategy Recreate, 0 replicas.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Scale {
    /// spec.replicas
    replicas: i32,
    /// status.readyReplicas
    ready: i32,
}

fn scale_of(d: &Deployment) -> Scale {
    Scale {
        replicas: d.spec.replicas.unwrap_or(1),
        ready: d
            .status
            .as_ref()
            .and_then(|s| s.ready_replicas)
            .unwrap_or(0),
    }
}

/// A watch on one Deployment that records every change of its scale with the wall-clock
/// time the event arrived.
struct DeploymentWatch {
    timeline: Timeline<Scale>,
    task: tokio::task::JoinHandle<()>,
}

impl DeploymentWatch {
    fn start(api: Api<Deployment>, name: &str) -> Self {
        let timeline = Timeline::default();
        let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
        let stream = watcher(api, config).default_backoff();
        let record = timeline.clone();
        let task = tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            while let Some(event) = stream.next().await {
                let now = Utc::now();
                match event {
                    Ok(watcher::Event::Apply(d) | watcher::Event::InitApply(d)) => {
                        record.record(now, scale_of(&d));
                    }
                    Ok(_) => {}
                    Err(error) => eprintln!("deployment watch: {error}"),
                }
            }
        });
        Self { timeline, task }
    }
}

impl std::ops::Deref for DeploymentWatch {
    type Target = Timeline<Scale>;

    fn deref(&self) -> &Timeline<Scale> {
        &self.timeline
    }
}

impl Drop for DeploymentWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------------------
// Statistics and formatting

#[derive(Clone, Copy, Debug)]
struct Stats {
    median: Duration,
    p99: Duration,
    min: Duration,
    max: Duration,
}

impl Stats {
    /// Nearest-rank percentiles.
    fn of(mut samples: Vec<Duration>) -> Option<Self> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_unstable();
        let rank = |q: f64| {
            let r = (q * samples.len() as f64).ceil() as usize;
            samples[r.clamp(1, samples.len()) - 1]
        };
        Some(Self {
            median: rank(0.50),
            p99: rank(0.99),
            min: samples[0],
            max: samples[samples.len() - 1],
        })
    }
}

/// A table of timing statistics, one row per measured step, from `origin` on.
fn write_stats_table(w: &mut String, origin: &str, rows: &[(&str, Option<Stats>)]) {
    let _ = writeln!(w, "| from {origin} to | median | p99 | min | max |");
    let _ = writeln!(w, "|---|---:|---:|---:|---:|");
    for (label, stats) in rows {
        if let Some(s) = stats {
            let _ = writeln!(
                w,
                "| {label} | {} | {} | {} | {} |",
                fmt_dur(s.median),
                fmt_dur(s.p99),
                fmt_dur(s.min),
                fmt_dur(s.max)
            );
        }
    }
}

fn fmt_dur(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1e3;
    if ms < 1_000.0 {
        format!("{ms:.0} ms")
    } else {
        format!("{:.2} s", ms / 1e3)
    }
}

fn fmt_rate(r: f64) -> String {
    if r >= 100.0 {
        format!("{r:.0}")
    } else if r >= 10.0 {
        format!("{r:.1}")
    } else {
        format!("{r:.2}")
    }
}

/// `t - t0` as a non-negative duration.
fn since(t0: DateTime<Utc>, t: DateTime<Utc>, what: &str) -> Result<Duration> {
    (t - t0)
        .to_std()
        .map_err(|_| anyhow!("{what} at {t} is before the signal at {t0}"))
}

/// Replaces the `## heading` section of a generated document, or appends it.
fn write_section(path: &Path, preamble: &str, heading: &str, section: &str) -> Result<()> {
    let existing = std::fs::read_to_string(path).unwrap_or_default();
    let mut sections: Vec<String> = Vec::new();
    for line in existing.lines() {
        if line.starts_with("## ") {
            sections.push(String::new());
        }
        if let Some(s) = sections.last_mut() {
            s.push_str(line);
            s.push('\n');
        }
    }
    let new = format!("{heading}\n\n{}", section.trim_end());
    match sections
        .iter_mut()
        .find(|s| s.lines().next() == Some(heading))
    {
        Some(s) => *s = new,
        None => sections.push(new),
    }
    let mut out = preamble.trim_end().to_owned();
    out.push('\n');
    for s in sections {
        out.push('\n');
        out.push_str(s.trim_end());
        out.push('\n');
    }
    std::fs::write(path, out).with_context(|| format!("write {}", path.display()))
}

// ---------------------------------------------------------------------------------------
// failover

/// One cluster of the failover bench. Fields drop in order: the watch stops before the
/// control plane does.
struct Side {
    watch: DeploymentWatch,
    pods: pods::PodWatch,
    name: &'static str,
    client: Client,
    reapers: Api<Reaper>,
    /// Replicas started in this cluster so far (the identity of the next one).
    generation: u32,
    test: TestCluster,
}

const FAILOVER_NS: &str = "bench-failover";
const WORKLOAD: &str = "reaper";

impl Side {
    async fn new(
        name: &'static str,
        test: TestCluster,
        lease: LeaseSpec,
        grace_seconds: i64,
    ) -> Result<Self> {
        let client = test.client().await?;
        install_reaper_crd(&client).await?;
        create_namespace(&client, FAILOVER_NS).await?;
        create_deployment_with_stop(
            &client,
            FAILOVER_NS,
            WORKLOAD,
            "Recreate",
            json!({"reaper-bench": "failover"}),
            PodStop::grace(grace_seconds),
        )
        .await?;
        create_reaper(&client, FAILOVER_NS, WORKLOAD, WORKLOAD, lease).await?;
        let (watch, pods) = Self::watches(&client);
        let reapers = Api::namespaced(client.clone(), FAILOVER_NS);
        Ok(Self {
            name,
            test,
            client,
            reapers,
            watch,
            pods,
            generation: 0,
        })
    }

    fn watches(client: &Client) -> (DeploymentWatch, pods::PodWatch) {
        let deployments: Api<Deployment> = Api::namespaced(client.clone(), FAILOVER_NS);
        let pods = Api::namespaced(client.clone(), FAILOVER_NS);
        (
            DeploymentWatch::start(deployments, WORKLOAD),
            pods::PodWatch::start(pods, WORKLOAD),
        )
    }

    /// New watches (after the apiserver came back: the old ones may sit in a backoff).
    fn restart_watches(&mut self) {
        (self.watch, self.pods) = Self::watches(&self.client);
    }

    async fn scale(&self) -> Result<Scale> {
        let api: Api<Deployment> = Api::namespaced(self.client.clone(), FAILOVER_NS);
        Ok(scale_of(&api.get(WORKLOAD).await?))
    }

    async fn phase(&self) -> Result<(Option<Phase>, Option<String>)> {
        let status = self.reapers.get(WORKLOAD).await?.status.unwrap_or_default();
        Ok((status.phase, status.holder))
    }

    fn start_operator(&mut self, urls: &Urls, schema: &Schema, log_dir: &Path) -> Result<Operator> {
        self.generation += 1;
        Operator::start(OperatorSpec {
            kubeconfig: self.test.kubeconfig(),
            // Statements through PgBouncer like production; LISTEN needs a direct one.
            database_url: &urls.pgbouncer,
            listen_url: &urls.direct,
            schema,
            cluster: self.name,
            identity: format!("op-{}", self.generation),
            namespace: Some(FAILOVER_NS),
            log_dir,
        })
    }
}

struct Trial {
    n: usize,
    from: String,
    to: String,
    /// kill9: when the killed holder's lease expired (last renewed_at + ttl).
    expired: Option<Duration>,
    /// graceful: the killed holder's release row.
    released: Option<Duration>,
    /// graceful: the killed holder's Deployment at spec.replicas 0.
    old_down: Option<Duration>,
    /// graceful: the killed holder's pod gone (pod watch: deleted, not just Terminating).
    old_gone: Option<Duration>,
    lease: Duration,
    scaled: Duration,
    /// The other cluster's pod Ready (its condition, pod watch).
    pod_ready: Duration,
    ready: Duration,
}

impl Trial {
    fn line(&self) -> String {
        let mut s = format!("trial {:>3}: {} -> {}:", self.n, self.from, self.to);
        if let Some(e) = self.expired {
            let _ = write!(s, " lease expired {},", fmt_dur(e));
        }
        if let Some(d) = self.old_down {
            let _ = write!(s, " old Deployment at 0 {},", fmt_dur(d));
        }
        if let Some(d) = self.old_gone {
            let _ = write!(s, " old pod gone {},", fmt_dur(d));
        }
        if let Some(r) = self.released {
            let _ = write!(s, " released {},", fmt_dur(r));
        }
        let _ = write!(
            s,
            " lease taken {}, Deployment scaled {}, pod Ready {}, readyReplicas 1 {}",
            fmt_dur(self.lease),
            fmt_dur(self.scaled),
            fmt_dur(self.pod_ready),
            fmt_dur(self.ready)
        );
        s
    }
}

struct Stability<'a> {
    store: &'a LeaseStore,
    lease_name: &'a str,
    workload: String,
    timing: TimingArgs,
}

impl Stability<'_> {
    /// Waits until `leader`'s cluster runs the pod, is Leading and holds the lease, and
    /// the other cluster is at 0 and Standby, its replica (started at `since`) having
    /// reported its workload.
    async fn wait_stable(
        &self,
        sides: &[Side; 2],
        ops: &[Operator],
        leader: usize,
        since: DateTime<Utc>,
    ) -> Result<()> {
        let follower = 1 - leader;
        self.wait_stable_holders(
            sides,
            &[ops[leader].holder()],
            &[ops[follower].holder()],
            leader,
            since,
        )
        .await
    }

    /// [`Stability::wait_stable`] with several replicas per cluster: one of
    /// `leader_holders` holds the lease, and the follower cluster's report (written by any
    /// of `follower_holders`) is newer than `since`.
    async fn wait_stable_holders(
        &self,
        sides: &[Side; 2],
        leader_holders: &[String],
        follower_holders: &[String],
        leader: usize,
        since: DateTime<Utc>,
    ) -> Result<()> {
        let follower = 1 - leader;
        let timeout = Duration::from_secs(2 * self.timing.ttl + 90);
        let report_sql = format!(
            "SELECT max(reported_at) AS at FROM {} WHERE name = {} AND reported_by IN ({})",
            self.workload,
            lit(self.lease_name),
            follower_holders
                .iter()
                .map(|h| lit(h))
                .collect::<Vec<_>>()
                .join(", ")
        );
        wait_until("the system to be stable", timeout, || async {
            let (l, f) = (sides[leader].scale().await?, sides[follower].scale().await?);
            if l != (Scale {
                replicas: 1,
                ready: 1,
            }) || f
                != (Scale {
                    replicas: 0,
                    ready: 0,
                })
            {
                return Ok(None);
            }
            let Some(row) = self.store.get(self.lease_name).await? else {
                return Ok(None);
            };
            if !leader_holders.contains(&row.holder) || !row.is_held() {
                return Ok(None);
            }
            let leader_holder = row.holder;
            let reported: Option<DateTime<Utc>> = sqlx::raw_sql(AssertSqlSafe(report_sql.clone()))
                .fetch_one(self.store.pool())
                .await?
                .try_get("at")?;
            if reported.is_none_or(|at| at < since) {
                return Ok(None);
            }
            let (lp, lh) = sides[leader].phase().await?;
            let (fp, fh) = sides[follower].phase().await?;
            let ok = lp == Some(Phase::Leading)
                && lh.as_deref() == Some(leader_holder.as_str())
                && fp == Some(Phase::Standby)
                && fh.as_deref() == Some(leader_holder.as_str());
            Ok(ok.then_some(()))
        })
        .await
    }
}

async fn failover(args: &FailoverArgs) -> Result<()> {
    args.timing.validate()?;
    ensure!(args.trials >= 1, "--trials must be at least 1");
    ensure!(
        (0..=3600).contains(&args.grace_seconds),
        "--grace-seconds must be between 0 and 3600, not {}",
        args.grace_seconds
    );
    let urls = Urls::from_env()?;
    let started = Utc::now();
    let wall = Instant::now();
    let schema = Schema::new(&failover_schema_name())?;
    let admin = LeaseStore::connect(&urls.direct, &schema, Duration::from_secs(10), 2)
        .await
        .with_context(|| format!("connect to {DIRECT_ENV}"))?;
    let mut machine = Machine::probe(admin.pool()).await?;
    eprintln!(
        "failover bench: --mode {} {}, {} trials, schema {schema}; load average {}",
        args.mode.flag(),
        args.timing.label(),
        args.trials,
        machine.load_start
    );
    let mut logs = LogDir::new("failover")?;
    let outcome = match admin.migrate().await {
        Ok(()) if args.mode == Mode::DeadCluster => {
            dead_cluster::run(args, &urls, &schema, &admin, &logs.path)
                .await
                .map(Trials::Dead)
        }
        Ok(()) => run_failover(args, &urls, &schema, &admin, &logs.path)
            .await
            .map(Trials::Process),
        Err(e) => Err(anyhow!(e).context("migrate the bench schema")),
    };
    let dropped = exec(
        admin.pool(),
        &format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"),
    )
    .await;
    admin.close().await;
    let trials = outcome?;
    dropped?;
    logs.succeeded();
    machine.load_end = host::load_average();

    let (heading, section) = match &trials {
        Trials::Process(trials) => render_failover(args, &machine, started, wall.elapsed(), trials),
        Trials::Dead(trials) => {
            dead_cluster::render(args, &machine, started, wall.elapsed(), trials)
        }
    };
    println!("\n{heading}\n\n{section}");
    if args.write {
        let path = support::cluster::repo_root().join(FAILOVER_DOC);
        write_section(&path, FAILOVER_PREAMBLE, &heading, &section)?;
        eprintln!("wrote {FAILOVER_DOC}");
    } else {
        eprintln!("(not written to {FAILOVER_DOC}; pass --write to add this section)");
    }
    Ok(())
}

/// The trials of a run: a replica stopped (kill9, graceful) or a whole cluster.
enum Trials {
    Process(Vec<Trial>),
    Dead(Vec<dead_cluster::DeadTrial>),
}

async fn run_failover(
    args: &FailoverArgs,
    urls: &Urls,
    schema: &Schema,
    store: &LeaseStore,
    log_dir: &Path,
) -> Result<Vec<Trial>> {
    let timing = args.timing;
    let lease_name = format!("{FAILOVER_NS}.failover-{}", std::process::id());
    let events = schema.qualify("lease_event");
    let ctx = Stability {
        store,
        lease_name: &lease_name,
        workload: schema.qualify("lease_workload"),
        timing,
    };

    eprintln!("starting two control planes (tests/cluster/up.sh)...");
    let (a, b) = tokio::join!(start_cluster("bench-fo-a"), start_cluster("bench-fo-b"));
    let (a, b) = (a?, b?);
    let mut sides = [
        Side::new("a", a, timing.lease_spec(&lease_name), args.grace_seconds).await?,
        Side::new("b", b, timing.lease_spec(&lease_name), args.grace_seconds).await?,
    ];
    // The second replica starts a random fraction of a retry period later, so the two
    // electors do not tick in step (a restarted replica has a random phase too).
    let mut ops = vec![sides[0].start_operator(urls, schema, log_dir)?];
    let stagger = rand::random_range(0..timing.retry * 1000);
    tokio::time::sleep(Duration::from_millis(stagger)).await;
    ops.push(sides[1].start_operator(urls, schema, log_dir)?);

    let begun = Utc::now();
    let mut leader = {
        let holders: Vec<String> = ops.iter().map(Operator::holder).collect();
        let found = wait_until("a first leader", Duration::from_secs(120), || async {
            Ok(store
                .get(&lease_name)
                .await?
                .filter(|row| row.is_held())
                .and_then(|row| holders.iter().position(|h| *h == row.holder)))
        })
        .await;
        with_logs(found, &ops.iter().collect::<Vec<_>>())?
    };
    let stable = ctx.wait_stable(&sides, &ops, leader, begun).await;
    with_logs(stable, &ops.iter().collect::<Vec<_>>())?;
    tokio::time::sleep(Duration::from_secs(timing.retry)).await;
    eprintln!(
        "stable: {} leads; {} trials of --mode {}",
        ops[leader].holder(),
        args.trials,
        args.mode.flag()
    );

    let mut trials = Vec::new();
    for n in 1..=args.trials {
        let follower = 1 - leader;
        let result = async {
            // Signal at a random phase of the renew cycle: stabilising takes about the
            // same time in every trial, which would otherwise keep the phase fixed.
            let phase = rand::random_range(0..timing.retry * 1000);
            tokio::time::sleep(Duration::from_millis(phase)).await;
            let last_id: i64 = sqlx::raw_sql(AssertSqlSafe(format!(
                "SELECT coalesce(max(id), 0) AS id FROM {events} WHERE name = {}",
                lit(&lease_name)
            )))
            .fetch_one(store.pool())
            .await?
            .try_get("id")?;
            let (from, to) = (ops[leader].holder(), ops[follower].holder());
            ensure!(
                sides[follower].watch.latest() == Some(Scale { replicas: 0, ready: 0 }),
                "the standby's Deployment is not at 0 before the signal: {:?}",
                sides[follower].watch.latest()
            );

            let t0 = match args.mode {
                Mode::Kill9 => ops[leader].kill9()?,
                Mode::Graceful => ops[leader].terminate()?,
                Mode::DeadCluster => unreachable!("dead-cluster trials run in dead_cluster.rs"),
            };
            // The killed holder cannot renew any more: its row's expiry is final.
            let expired = match args.mode {
                Mode::Kill9 => {
                    let row = store
                        .get(&lease_name)
                        .await?
                        .ok_or_else(|| anyhow!("lease {lease_name} vanished"))?;
                    ensure!(row.holder == from, "holder changed before the kill: {row:?}");
                    Some(since(t0, row.expires_at, "expiry")?)
                }
                Mode::Graceful | Mode::DeadCluster => None,
            };
            let timeout = Duration::from_secs(timing.ttl + timing.retry + SHUTDOWN_TIMEOUT_S + 30);
            let (taken_at, released_at) = wait_until("the takeover row in lease_event", timeout, || async {
                let rows = sqlx::raw_sql(AssertSqlSafe(format!(
                    "SELECT kind, holder, at FROM {events} WHERE name = {} AND id > {last_id} ORDER BY id",
                    lit(&lease_name)
                )))
                .fetch_all(store.pool())
                .await?;
                let mut released = None;
                for row in rows {
                    let kind: String = row.try_get("kind")?;
                    let holder: String = row.try_get("holder")?;
                    let at: DateTime<Utc> = row.try_get("at")?;
                    match kind.as_str() {
                        "release" if holder == from => released = Some(at),
                        "acquire" | "takeover" if holder == to => return Ok(Some((at, released))),
                        _ => bail!("unexpected lease_event {kind} by {holder} after the signal"),
                    }
                }
                Ok(None)
            })
            .await?;
            let other = &sides[follower].watch;
            let scaled_at = other
                .wait_first_after(t0, |s| s.replicas >= 1, timeout, "the other Deployment to scale up")
                .await?;
            let ready_at = other
                .wait_first_after(t0, |s| s.ready >= 1, timeout, "the other Deployment's pod to be ready")
                .await?;
            let pod_ready_at = sides[follower]
                .pods
                .wait_first_after(t0, |c| c.ready >= 1, timeout, "the other cluster's pod to be Ready")
                .await?;
            let old_down = match args.mode {
                Mode::Graceful => {
                    let status = ops[leader]
                        .wait_exit(Duration::from_secs(SHUTDOWN_TIMEOUT_S + 15))
                        .await?;
                    ensure!(status.success(), "graceful exit of {from}: {status}");
                    let down = sides[leader]
                        .watch
                        .first_after(t0, |s| s.replicas == 0)
                        .map(|at| since(t0, at, "scale-down"))
                        .transpose()?;
                    let gone = sides[leader]
                        .pods
                        .first_after(t0, |c| c.live == 0)
                        .map(|at| since(t0, at, "pod gone"))
                        .transpose()?;
                    (down, gone)
                }
                Mode::Kill9 => {
                    ops[leader].wait_exit(Duration::from_secs(10)).await?;
                    (None, None)
                }
                Mode::DeadCluster => unreachable!("dead-cluster trials run in dead_cluster.rs"),
            };
            let (old_down, old_gone) = old_down;
            Ok(Trial {
                n,
                from,
                to,
                expired,
                released: released_at
                    .map(|at| since(t0, at, "release"))
                    .transpose()?,
                old_down,
                old_gone,
                lease: since(t0, taken_at, "takeover")?,
                scaled: since(t0, scaled_at, "scale-up")?,
                pod_ready: since(t0, pod_ready_at, "pod readiness")?,
                ready: since(t0, ready_at, "readiness")?,
            })
        }
        .await;
        let trial = with_logs(result, &ops.iter().collect::<Vec<_>>())
            .with_context(|| format!("trial {n}"))?;
        println!("{}", trial.line());
        trials.push(trial);

        // The killed replica comes back as a standby; the roles are swapped.
        let restarted = Utc::now();
        ops[leader] = sides[leader].start_operator(urls, schema, log_dir)?;
        leader = follower;
        let restarting = Instant::now();
        let stable = ctx.wait_stable(&sides, &ops, leader, restarted).await;
        with_logs(stable, &ops.iter().collect::<Vec<_>>())
            .with_context(|| format!("after trial {n}"))?;
        eprintln!(
            "  restarted {} as a standby; stable again after {:.1?}",
            ops[1 - leader].holder(),
            restarting.elapsed()
        );
        // One more retry period, so the restarted standby's elector is ticking steadily.
        tokio::time::sleep(Duration::from_secs(timing.retry)).await;
    }
    for op in &mut ops {
        ensure!(op.running(), "{} exited during the run", op.holder());
    }
    Ok(trials)
}

const FAILOVER_PREAMBLE: &str = "# Failover benchmark

Generated by `benches/failover.rs` (`failover` subcommand); re-run a section's command
instead of editing its numbers by hand. Each section is one configuration (mode and lease
timings); writing the same configuration again replaces its section.

Set-up: two local control planes (clusters `a` and `b`, `tests/cluster/up.sh`), one
operator replica per cluster (release build, statements through PgBouncer in transaction
mode, LISTEN on a direct connection), one Reaper per cluster with the same lease name and
its own Deployment (strategy Recreate; kwok marks its pod Ready). Each trial stops the
replica that holds the lease and measures, from the moment just before the signal:

- **lease taken**: the other replica's `acquire`/`takeover` row in `lease_event` (its
  `at` column is the database's `clock_timestamp()` at the acquire; PostgreSQL runs on
  the same machine, so it is comparable with the harness's clock);
- **Deployment scaled**: the other cluster's Deployment `spec.replicas` becomes 1 (the
  arrival of that watch event);
- **pod ready**: its `status.readyReplicas` becomes 1 (watch event).

Then the stopped replica is started again (a new identity) as a standby, the harness waits
until the system is stable (the stopped cluster's Deployment at 0, the lease held by the
other replica, both Reapers reporting Leading/Standby) and the next trial stops the other
cluster's replica. Percentiles are nearest-rank; with fewer than 100 trials p99 is the
maximum.
";

fn render_failover(
    args: &FailoverArgs,
    m: &Machine,
    started: DateTime<Utc>,
    elapsed: Duration,
    trials: &[Trial],
) -> (String, String) {
    let t = args.timing;
    // The pods' grace period is part of the configuration when it is not the default.
    let grace = (args.grace_seconds != 1).then_some(args.grace_seconds);
    let heading = format!(
        "## `--mode {}`, {}{}",
        args.mode.flag(),
        t.label(),
        grace.map_or_else(String::new, |g| format!(", grace {g} s"))
    );
    let mut o = String::new();
    let w = &mut o;
    let _ = writeln!(
        w,
        "- **Command:** `cargo bench --bench failover -- failover --mode {} --trials {} {}{} --write`",
        args.mode.flag(),
        args.trials,
        t.flags(),
        grace.map_or_else(String::new, |g| format!(" --grace-seconds {g}"))
    );
    let _ = writeln!(
        w,
        "- **Date:** {} ({} trial{}, {:.0} s in all).",
        started.format("%Y-%m-%d %H:%M UTC"),
        trials.len(),
        if trials.len() == 1 { "" } else { "s" },
        elapsed.as_secs_f64()
    );
    m.describe(w);
    let _ = writeln!(w);

    let col = |f: fn(&Trial) -> Option<Duration>| Stats::of(trials.iter().filter_map(f).collect());
    let mut rows: Vec<(&str, Option<Stats>)> = Vec::new();
    match args.mode {
        Mode::Kill9 => rows.push((
            "lease expired (killed holder's last `renewed_at` + ttl)",
            col(|t| t.expired),
        )),
        Mode::Graceful | Mode::DeadCluster => {
            rows.push(("old Deployment at `spec.replicas` 0", col(|t| t.old_down)));
            rows.push((
                "old pod gone (pod watch: deleted, no longer Terminating)",
                col(|t| t.old_gone),
            ));
            rows.push(("lease released (`release` row)", col(|t| t.released)));
        }
    }
    rows.push((
        "**lease taken** (other replica's acquire row)",
        col(|t| Some(t.lease)),
    ));
    rows.push((
        "**Deployment scaled** (other cluster, `spec.replicas` = 1)",
        col(|t| Some(t.scaled)),
    ));
    rows.push((
        "pod Ready (the pod's condition, pod watch)",
        col(|t| Some(t.pod_ready)),
    ));
    rows.push((
        "**pod ready** (`status.readyReplicas` = 1)",
        col(|t| Some(t.ready)),
    ));
    write_stats_table(w, "the signal", &rows);
    let _ = writeln!(w);
    match args.mode {
        Mode::Kill9 => {
            let _ = writeln!(
                w,
                "Expected: the killed holder last renewed at most one retry period before the \
                 signal, so its lease expires {} to {} s after it; the standby learned the \
                 expiry instant from its last read and sends its acquire then, so **lease \
                 taken** follows the expiry within milliseconds. The standby scales up once \
                 the killed replica's last workload report is stale (refresh + ttl + retry + \
                 the pods' grace period after it was written, `Workload::report_timing`) and \
                 it has held the lease for two refresh periods: the report still shows a \
                 running pod, since nobody scales a dead replica's Deployment down (see \
                 docs/fencing.md); then the Deployment controller and kwok start the pod.",
                t.ttl - t.retry,
                t.ttl,
            );
        }
        Mode::Graceful | Mode::DeadCluster => {
            let _ = writeln!(
                w,
                "Expected: on SIGTERM the leader scales its Deployment to 0, waits until the \
                 pod is gone, reports that, and releases the lease; the release NOTIFY wakes \
                 the standby at once (it does not wait for its next tick), which takes the \
                 lease and scales its Deployment up. The ttl plays no part. The old pod stays \
                 Terminating until its `deletionTimestamp` (kwok's grace stage: the grace \
                 period is {} s and the timestamp has whole seconds, so {} to {} s after the \
                 scale-down); **lease released** minus **old pod gone** is how long the leader \
                 took to notice that the pod was gone.",
                args.grace_seconds,
                (args.grace_seconds - 1).max(0),
                args.grace_seconds
            );
        }
    }
    let _ = writeln!(
        w,
        "\nEvery time is the arrival of an event, not the moment the harness looked: the \
         `lease_event` rows carry the database's `clock_timestamp()`, and the Deployments and \
         pods are watched (each event is timestamped as it arrives), so the harness adds no \
         polling delay. **pod Ready** is the pod's own Ready condition (kwok sets it); \
         **pod ready** waits for the Deployment controller to copy it to \
         `status.readyReplicas`."
    );
    let _ = writeln!(w);
    let _ = writeln!(w, "<details><summary>Every trial</summary>\n");
    let extra = match args.mode {
        Mode::Kill9 => "lease expired",
        Mode::Graceful | Mode::DeadCluster => "old at 0 | old pod gone | released",
    };
    let _ = writeln!(
        w,
        "| # | from → to | {extra} | lease taken | scaled | pod Ready | ready |"
    );
    let _ = writeln!(
        w,
        "|---:|---|{}---:|---:|---:|---:|",
        if args.mode == Mode::Kill9 {
            "---:|"
        } else {
            "---:|---:|---:|"
        }
    );
    let opt = |d: Option<Duration>| d.map_or_else(|| "—".to_owned(), fmt_dur);
    for tr in trials {
        let extra = match args.mode {
            Mode::Kill9 => opt(tr.expired),
            Mode::Graceful | Mode::DeadCluster => format!(
                "{} | {} | {}",
                opt(tr.old_down),
                opt(tr.old_gone),
                opt(tr.released)
            ),
        };
        let _ = writeln!(
            w,
            "| {} | {} → {} | {extra} | {} | {} | {} | {} |",
            tr.n,
            tr.from,
            tr.to,
            fmt_dur(tr.lease),
            fmt_dur(tr.scaled),
            fmt_dur(tr.pod_ready),
            fmt_dur(tr.ready)
        );
    }
    let _ = writeln!(w, "\n</details>");
    (heading, o)
}

// ---------------------------------------------------------------------------------------
// footprint

/// The footprint's tables of API server requests: by verb, and by verb and resource.
fn render_api(w: &mut String, rows: &[FpRow]) {
    let mut verbs: Vec<&str> = rows
        .iter()
        .flat_map(|r| r.api.by_verb.keys().map(String::as_str))
        .collect();
    verbs.sort_unstable();
    verbs.dedup();
    let _ = writeln!(w, "\n## API server requests by verb\n");
    let _ = writeln!(
        w,
        "Requests per second the replica sent to the kube-apiserver over the window, from the \
         apiserver's audit log (each request once, by the time it was received). **watch \
         opens** is the number of watches opened in the window (not a rate): a replica in a \
         steady state keeps its watches open and opens none, except when one ends: a kube-rs \
         watcher asks for a 290 s timeout, so each watch is opened again about every 5 \
         minutes (a window shorter than that sees some of them or none). **errors** counts answers of 400 or more (conflicts included).\n"
    );
    let _ = writeln!(
        w,
        "| N | all (watches apart) | {} | watch opens | errors |",
        verbs
            .iter()
            .map(|v| format!("`{v}`"))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    let _ = writeln!(w, "|---:|---:|{}---:|---:|", "---:|".repeat(verbs.len()));
    for r in rows {
        let cells: Vec<String> = verbs
            .iter()
            .map(|v| fmt_rate(r.api.rate(r.api.by_verb.get(*v).copied().unwrap_or(0))))
            .collect();
        let _ = writeln!(
            w,
            "| {} | {} | {} | {} | {} |",
            r.n,
            fmt_rate(r.api.requests_per_s()),
            cells.join(" | "),
            r.api.watch_opens,
            r.api.errors
        );
    }
    let _ = writeln!(
        w,
        "\n<details><summary>By verb and resource (requests in the window)</summary>\n"
    );
    let _ = writeln!(w, "| N | verb resource | requests | per second |");
    let _ = writeln!(w, "|---:|---|---:|---:|");
    for r in rows {
        for (target, count) in &r.api.by_target {
            let _ = writeln!(
                w,
                "| {} | `{target}` | {count} | {} |",
                r.n,
                fmt_rate(r.api.rate(*count))
            );
        }
    }
    let _ = writeln!(w, "\n</details>");
}

/// How the statements of the bench database are counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Counting {
    /// pg_stat_statements (preloaded); `true` when this run created the extension.
    Statements { created: bool },
    /// pg_stat_database transaction counters only.
    Transactions,
}

/// Calls and rows per statement kind, and the database's committed transactions.
#[derive(Clone, Debug, Default)]
struct DbCounters {
    by_kind: BTreeMap<&'static str, (i64, i64)>,
    xacts: i64,
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

async fn db_counters(admin: &PgPool, db: &str, counting: Counting) -> Result<DbCounters> {
    let mut c = DbCounters::default();
    if matches!(counting, Counting::Statements { .. }) {
        let rows = sqlx::raw_sql(AssertSqlSafe(format!(
            "SELECT query, calls, rows FROM pg_stat_statements \
             WHERE dbid = (SELECT oid FROM pg_database WHERE datname = {})",
            lit(db)
        )))
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
    c.xacts = sqlx::raw_sql(AssertSqlSafe(format!(
        "SELECT (xact_commit + xact_rollback)::bigint AS x FROM pg_stat_database WHERE datname = {}",
        lit(db)
    )))
    .fetch_one(admin)
    .await
    .context("read pg_stat_database")?
    .try_get("x")?;
    Ok(c)
}

/// VmRSS and VmHWM of `pid`, in KiB.
fn memory_kib(pid: u32) -> Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> Result<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .ok_or_else(|| anyhow!("no {name} in /proc/{pid}/status"))
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// utime + stime of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat
        .rsplit_once(')')
        .map(|(_, a)| a)
        .ok_or_else(|| anyhow!("cannot parse /proc/{pid}/stat"))?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of stat(5); `after` starts at field 3.
    let utime: u64 = fields
        .get(11)
        .and_then(|v| v.parse().ok())
        .context("utime")?;
    let stime: u64 = fields
        .get(12)
        .and_then(|v| v.parse().ok())
        .context("stime")?;
    Ok(utime + stime)
}

fn clock_ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

struct FpRow {
    n: usize,
    rss_mib: f64,
    hwm_mib: f64,
    cpu_pct: f64,
    window: Duration,
    /// Statements per second by kind (pg_stat_statements), with rows per second.
    by_kind: Option<BTreeMap<&'static str, (f64, f64)>>,
    xacts_per_s: f64,
    reconciles_per_s: Option<f64>,
    /// Renew statements (and renewed rows) per retry period.
    renews_per_period: Option<(f64, f64)>,
    /// The replica's requests to the kube-apiserver (its audit log).
    api: audit::ApiCounts,
    /// Its requests from its start to the window.
    startup_api: audit::ApiCounts,
    /// From the replica's start to holding all N leases with every Deployment ready.
    ready_after: Duration,
    /// Whether the replica held all N leases with every Deployment ready in time.
    settled: bool,
    /// Leases the replica held before and after the window.
    held: (usize, usize),
    /// Deployments with one ready replica after the window.
    deployments_ready: usize,
}

impl FpRow {
    fn statements_per_s(&self) -> Option<f64> {
        self.by_kind
            .as_ref()
            .map(|m| m.values().map(|(c, _)| c).sum())
    }

    fn line(&self) -> String {
        format!(
            "N = {:>5}: RSS {:.1} MiB, peak {:.1} MiB, CPU {:.2} %, API requests/s {} ({}) + {} watch opens, statements/s {}, renews per retry period {}, transactions/s {}, reconciles/s {}, leases held {}/{} before/after",
            self.n,
            self.rss_mib,
            self.hwm_mib,
            self.cpu_pct,
            fmt_rate(self.api.requests_per_s()),
            self.api
                .by_verb
                .iter()
                .map(|(v, c)| format!("{v} {}", fmt_rate(self.api.rate(*c))))
                .collect::<Vec<_>>()
                .join(", "),
            self.api.watch_opens,
            self.statements_per_s()
                .map_or_else(|| "n/a".to_owned(), fmt_rate),
            self.renews_per_period.map_or_else(
                || "n/a".to_owned(),
                |(s, r)| format!("{} ({} rows)", fmt_rate(s), fmt_rate(r))
            ),
            fmt_rate(self.xacts_per_s),
            self.reconciles_per_s
                .map_or_else(|| "n/a".to_owned(), fmt_rate),
            self.held.0,
            self.held.1,
        )
    }
}

async fn footprint(args: &FootprintArgs) -> Result<()> {
    args.timing.validate()?;
    ensure!(args.window >= 1, "--window must be at least 1 s");
    ensure!(args.concurrency >= 1, "--concurrency must be at least 1");
    let mut sizes = args.sizes.clone();
    sizes.sort_unstable();
    sizes.dedup();
    ensure!(!sizes.is_empty(), "--sizes is empty");
    ensure!(
        *sizes.last().unwrap() <= 10_000,
        "sizes above 10 000 are not supported"
    );

    let urls = Urls::from_env()?;
    let started = Utc::now();
    let wall = Instant::now();
    let admin = admin_pool(&urls.direct).await?;
    let mut machine = Machine::probe(&admin).await?;
    let db = footprint_db_name();
    eprintln!(
        "footprint bench: sizes {sizes:?}, window {} s, {}; database {db}; load average {}",
        args.window,
        args.timing.label(),
        machine.load_start
    );

    // pg_stat_statements if the server preloads it; its view lives in the admin database.
    let preload: String = sqlx::raw_sql("SELECT current_setting('shared_preload_libraries') AS s")
        .fetch_one(&admin)
        .await?
        .try_get("s")?;
    let counting = if preload.contains("pg_stat_statements") {
        let exists: bool = sqlx::raw_sql(
            "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'pg_stat_statements') AS e",
        )
        .fetch_one(&admin)
        .await?
        .try_get("e")?;
        if !exists {
            exec(&admin, "CREATE EXTENSION pg_stat_statements").await?;
            CREATED_PG_STAT_STATEMENTS.store(true, Ordering::Relaxed);
        }
        Counting::Statements { created: !exists }
    } else {
        eprintln!(
            "pg_stat_statements is not preloaded: counting transactions only (start the \
             database with REAPER_DB_PG_STAT_STATEMENTS=1 tests/db/up.sh NAME for statements by kind)"
        );
        Counting::Transactions
    };

    let mut logs = LogDir::new("footprint")?;
    let outcome = match exec(&admin, &format!("CREATE DATABASE \"{db}\"")).await {
        Ok(()) => run_footprint(args, &sizes, &urls, &admin, &db, counting, &logs.path).await,
        Err(e) => Err(e),
    };
    let dropped = exec(
        &admin,
        &format!("DROP DATABASE IF EXISTS \"{db}\" WITH (FORCE)"),
    )
    .await;
    if counting == (Counting::Statements { created: true }) {
        let _ = exec(&admin, "DROP EXTENSION IF EXISTS pg_stat_statements").await;
        CREATED_PG_STAT_STATEMENTS.store(false, Ordering::Relaxed);
    }
    admin.close().await;
    let rows = outcome?;
    dropped?;
    logs.succeeded();
    machine.load_end = host::load_average();

    let report = render_footprint(
        args,
        &sizes,
        &machine,
        started,
        wall.elapsed(),
        counting,
        &rows,
    );
    println!("\n{report}");
    if args.write {
        let path = support::cluster::repo_root().join(FOOTPRINT_DOC);
        std::fs::write(&path, &report).with_context(|| format!("write {}", path.display()))?;
        eprintln!("wrote {FOOTPRINT_DOC}");
    } else {
        eprintln!("(not written to {FOOTPRINT_DOC}; pass --write to write it)");
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn run_footprint(
    args: &FootprintArgs,
    sizes: &[usize],
    urls: &Urls,
    admin: &PgPool,
    db: &str,
    counting: Counting,
    log_dir: &Path,
) -> Result<Vec<FpRow>> {
    let timing = args.timing;
    let direct = with_database(&urls.direct, db)?;
    let bouncer = with_database(&urls.pgbouncer, db)?;
    let schema = Schema::new("reaper")?;
    let store = LeaseStore::connect(&direct, &schema, Duration::from_secs(10), 2)
        .await
        .context("connect to the bench database")?;
    store
        .migrate()
        .await
        .context("migrate the bench database")?;
    let lease_table = schema.qualify("lease");

    eprintln!("starting a control plane (tests/cluster/up.sh)...");
    let cluster = start_cluster("bench-fp").await?;
    let client = cluster.client().await?;
    install_reaper_crd(&client).await?;
    let max_n = *sizes.last().unwrap_or(&0);
    if max_n + 10 > DEFAULT_NODE_PODS {
        add_fake_node(&client, "bench-kwok-node-1", max_n + 20).await?;
    }
    let audit = audit::AuditLog::of(cluster.kubeconfig())?;
    if args.unrelated_pods > 0 {
        unrelated::create_unrelated_pods(&client, args.unrelated_pods, args.concurrency).await?;
    }

    let ticks_per_s = clock_ticks_per_second();
    let mut created = 0usize;
    let mut namespaces = 0usize;
    let mut previous: Option<Operator> = None;
    let mut rows = Vec::new();
    for &n in sizes {
        // A fresh replica per size (a new identity): the previous one is killed, and the
        // new one takes its leases over when they expire (same cluster, Deployments stay up).
        if let Some(mut old) = previous.take() {
            old.kill9()?;
            old.wait_exit(Duration::from_secs(10)).await?;
        }
        if n > created {
            eprintln!("creating Reapers {}..{n}", created + 1);
            let creating = Instant::now();
            while namespaces * PER_NAMESPACE < n {
                create_namespace(&client, &fp_namespace(namespaces)).await?;
                namespaces += 1;
            }
            futures::stream::iter(created..n)
                .map(|i| {
                    let client = client.clone();
                    async move {
                        let ns = fp_namespace(i / PER_NAMESPACE);
                        let name = format!("r-{i:05}");
                        create_deployment(
                            &client,
                            &ns,
                            &name,
                            "Recreate",
                            json!({"reaper-bench": "footprint"}),
                        )
                        .await?;
                        create_reaper(
                            &client,
                            &ns,
                            &name,
                            &name,
                            timing.lease_spec(&format!("{ns}.fp-{i:05}")),
                        )
                        .await
                    }
                })
                .buffer_unordered(args.concurrency)
                .try_collect::<Vec<()>>()
                .await?;
            created = n;
            eprintln!("  created in {:.1?}", creating.elapsed());
        }

        let op_mark = audit.mark()?;
        let op = Operator::start(OperatorSpec {
            // Its own identity, whose requests the apiserver's audit log holds.
            kubeconfig: audit.kubeconfig(),
            database_url: &bouncer,
            listen_url: &direct,
            schema: &schema,
            cluster: "fp",
            identity: format!("op-{n}"),
            namespace: None,
            log_dir,
        })?;
        let holder = op.holder();
        let up = Instant::now();
        let timeout = Duration::from_secs(timing.ttl + 180) + Duration::from_millis(500) * n as u32;
        let readyz = wait_until(
            "the replica to be ready (/readyz)",
            Duration::from_secs(60),
            || async { Ok((op.http("/readyz").map(|(c, _)| c) == Some(200)).then_some(())) },
        )
        .await;
        with_logs(readyz, &[&op]).with_context(|| format!("N = {n}"))?;
        let held_sql = format!(
            "SELECT count(*) AS n FROM {lease_table} WHERE holder = {} \
             AND renewed_at + ttl_ms * interval '1 millisecond' > clock_timestamp()",
            lit(&holder)
        );
        let held = || async {
            let held: i64 = sqlx::raw_sql(AssertSqlSafe(held_sql.clone()))
                .fetch_one(store.pool())
                .await?
                .try_get("n")?;
            anyhow::Ok(held as usize)
        };
        let deployments_ready = || async {
            let list = Api::<Deployment>::all(client.clone())
                .list(&ListParams::default().labels("reaper-bench=footprint"))
                .await?;
            let one = Scale {
                replicas: 1,
                ready: 1,
            };
            anyhow::Ok(list.items.iter().filter(|d| scale_of(d) == one).count())
        };
        // A replica that cannot keep all N leases (or a control plane that cannot start
        // all pods) is measured anyway; the report shows how many it held.
        let settled = async {
            wait_until(&format!("{holder} to hold {n} leases"), timeout, || async {
                Ok((held().await? == n).then_some(()))
            })
            .await?;
            let last_report = std::cell::Cell::new(Instant::now());
            wait_until(
                &format!("{n} Deployments at 1 ready replica"),
                timeout,
                || async {
                    let ready = deployments_ready().await?;
                    if last_report.get().elapsed() > Duration::from_secs(15) {
                        eprintln!("  {ready} of {n} Deployments ready");
                        last_report.set(Instant::now());
                    }
                    Ok((ready == n).then_some(()))
                },
            )
            .await
        }
        .await;
        let ready_after = up.elapsed();
        let settled_ok = settled.is_ok();
        match settled {
            Ok(()) => eprintln!(
                "N = {n}: {holder} holds every lease, Deployments ready after {ready_after:.1?}; \
                 settling {} s, measuring {} s",
                args.settle, args.window
            ),
            Err(e) => eprintln!("warning: N = {n}: {e:#}; measuring anyway"),
        }
        tokio::time::sleep(Duration::from_secs(args.settle)).await;

        let held_before = held().await?;
        let measured = measure(
            &op,
            n,
            args,
            (admin, db, counting),
            (&audit, &op_mark),
            ticks_per_s,
            ready_after,
        )
        .await;
        let mut row = with_logs(measured, &[&op]).with_context(|| format!("N = {n}"))?;
        // After the window's last snapshot, so these reads are not counted.
        row.settled = settled_ok;
        row.held = (held_before, held().await?);
        row.deployments_ready = deployments_ready().await?;
        ensure!(
            row.n == 0 || row.held.1 > 0,
            "the replica holds none of the {n} leases after the window"
        );
        println!("{}", row.line());
        rows.push(row);
        previous = Some(op);
    }
    drop(previous);
    store.close().await;
    Ok(rows)
}

fn fp_namespace(k: usize) -> String {
    format!("bench-fp-{k:03}")
}

/// Another kwok-managed Node, `name`, with room for `pods` pods (the default one takes 110).
async fn add_fake_node(client: &Client, name: &str, pods: usize) -> Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let node: Node = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {
                "kubernetes.io/arch": "amd64",
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/role": "agent",
                "node-role.kubernetes.io/agent": "",
                "type": "kwok"
            }
        },
        "status": {
            "allocatable": {"cpu": "256", "memory": "1Ti", "pods": pods.to_string()},
            "capacity": {"cpu": "256", "memory": "1Ti", "pods": pods.to_string()}
        }
    }))?;
    nodes
        .create(&PostParams::default(), &node)
        .await
        .with_context(|| format!("create the fake Node {name}"))?;
    wait_until(
        &format!("the fake Node {name} to be Ready"),
        Duration::from_secs(60),
        || async {
            let node = nodes.get(name).await?;
            let ready = node
                .status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            Ok(ready.then_some(()))
        },
    )
    .await
}

async fn measure(
    op: &Operator,
    n: usize,
    args: &FootprintArgs,
    (admin, db, counting): (&PgPool, &str, Counting),
    (audit, op_mark): (&audit::AuditLog, &audit::Mark),
    ticks_per_s: f64,
    ready_after: Duration,
) -> Result<FpRow> {
    let pid = op.pid();
    let window = Duration::from_secs(args.window);
    let reconciles_0 = op.metric("reaper_reconciliations_total");
    let db_0 = db_counters(admin, db, counting).await?;
    let ticks_0 = cpu_ticks(pid)?;
    let api_mark = audit.mark()?;
    let t0 = Instant::now();
    let mut rss = Vec::new();
    let mut next = t0;
    while t0.elapsed() < window {
        rss.push(memory_kib(pid)?.0);
        next += Duration::from_secs(1);
        let until = next.min(t0 + window);
        tokio::time::sleep_until(until.into()).await;
    }
    let ticks_1 = cpu_ticks(pid)?;
    let elapsed = t0.elapsed();
    let api_end = Utc::now();
    let db_1 = db_counters(admin, db, counting).await?;
    let reconciles_1 = op.metric("reaper_reconciliations_total");
    let (rss_end, hwm) = memory_kib(pid)?;
    rss.push(rss_end);
    rss.sort_unstable();
    let secs = elapsed.as_secs_f64();

    let by_kind = matches!(counting, Counting::Statements { .. }).then(|| {
        let mut m = BTreeMap::new();
        for (kind, (calls, rows)) in &db_1.by_kind {
            let (c0, r0) = db_0.by_kind.get(kind).copied().unwrap_or_default();
            let (dc, dr) = (calls - c0, rows - r0);
            if dc > 0 {
                m.insert(*kind, (dc as f64 / secs, dr as f64 / secs));
            }
        }
        m
    });
    let api = audit.count(&api_mark, api_end).await?;
    let startup_api = audit.count(op_mark, api_mark.at()).await?;
    // Zero requests over both would rather mean that the replica does not use the audited
    // identity than that it is quiet: it lists and watches at start-up.
    ensure!(
        api.requests() + api.watch_opens + startup_api.requests() + startup_api.watch_opens > 0,
        "the apiserver's audit log holds no request of the replica since it started: does it \
         run with {}?",
        audit.kubeconfig().display()
    );
    let periods = secs / args.timing.retry as f64;
    let renews_per_period = by_kind.as_ref().map(|m| {
        let (c, r) = ["renew", "renew_many"]
            .iter()
            .filter_map(|k| m.get(k))
            .fold((0.0, 0.0), |(c, r), (dc, dr)| (c + dc, r + dr));
        (c * secs / periods, r * secs / periods)
    });
    Ok(FpRow {
        n,
        rss_mib: rss[rss.len() / 2] as f64 / 1024.0,
        hwm_mib: hwm as f64 / 1024.0,
        cpu_pct: (ticks_1 - ticks_0) as f64 / ticks_per_s / secs * 100.0,
        window: elapsed,
        by_kind,
        xacts_per_s: (db_1.xacts - db_0.xacts) as f64 / secs,
        reconciles_per_s: match (reconciles_0, reconciles_1) {
            (Some(a), Some(b)) => Some((b - a) / secs),
            _ => None,
        },
        renews_per_period,
        api,
        startup_api,
        ready_after,
        settled: true,
        held: (0, 0),
        deployments_ready: 0,
    })
}

fn render_footprint(
    args: &FootprintArgs,
    sizes: &[usize],
    m: &Machine,
    started: DateTime<Utc>,
    elapsed: Duration,
    counting: Counting,
    rows: &[FpRow],
) -> String {
    let t = args.timing;
    let mut o = String::new();
    let w = &mut o;
    let _ = writeln!(w, "# Operator footprint benchmark\n");
    let _ = writeln!(
        w,
        "Generated by `benches/failover.rs` (`footprint` subcommand); re-run the command \
         below instead of editing the numbers by hand.\n"
    );
    let sizes_s: Vec<String> = sizes.iter().map(|n| n.to_string()).collect();
    let _ = writeln!(
        w,
        "- **Command:** `cargo bench --bench failover -- footprint --sizes {} --window {} \
         --settle {} {}{} --write`, with the database from \
         `REAPER_DB_PG_STAT_STATEMENTS=1 tests/db/up.sh bench`.",
        sizes_s.join(","),
        args.window,
        args.settle,
        t.flags(),
        if args.unrelated_pods > 0 {
            format!(" --unrelated-pods {}", args.unrelated_pods)
        } else {
            String::new()
        }
    );
    let _ = writeln!(
        w,
        "- **Date:** {} ({:.0} s in all).",
        started.format("%Y-%m-%d %H:%M UTC"),
        elapsed.as_secs_f64()
    );
    m.describe(w);
    let _ = writeln!(
        w,
        "- **Set-up:** one local control plane, one operator replica (statements through \
         PgBouncer, LISTEN direct, watching all namespaces), N Reapers in namespaces of {PER_NAMESPACE}, \
         each with its own Deployment (Recreate, one kwok pod) and lease name; lease timings \
         {}. A fresh replica per N: the previous one is killed, the new one takes the \
         leases over once they expire; then the harness waits until it holds all N leases \
         (lease table) and all N Deployments have a ready replica, waits {} s more, and \
         measures over {} s.{}\n",
        t.label(),
        args.settle,
        args.window,
        if args.unrelated_pods > 0 {
            format!(
                " The cluster also holds {} unrelated pods (kwok, Running, in a namespace of \
                 their own, selected by no Reaper), created before the first N.",
                args.unrelated_pods
            )
        } else {
            String::new()
        }
    );

    let _ = writeln!(
        w,
        "| N | RSS MiB | peak MiB | CPU % | API requests/s | statements/s | renews per retry period |"
    );
    let _ = writeln!(w, "|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        let _ = writeln!(
            w,
            "| {} | {:.1} | {:.1} | {:.2} | {} | {} | {} |",
            r.n,
            r.rss_mib,
            r.hwm_mib,
            r.cpu_pct,
            fmt_rate(r.api.requests_per_s()),
            r.statements_per_s().map_or_else(
                || format!("≈ {} (transactions)", fmt_rate(r.xacts_per_s)),
                fmt_rate
            ),
            r.renews_per_period.map_or_else(
                || "n/a".to_owned(),
                |(s, rows)| format!("{} ({} leases)", fmt_rate(s), fmt_rate(rows))
            ),
        );
    }
    let _ = writeln!(w);
    let _ = writeln!(
        w,
        "- **RSS**: median of `VmRSS` (`/proc/<pid>/status`) sampled every second of the \
         window; **peak**: `VmHWM` at its end (since the replica started, so it includes \
         taking the N leases over and the first reconciles)."
    );
    let _ = writeln!(
        w,
        "- **CPU %**: `utime + stime` (`/proc/<pid>/stat`) over the window, as a percentage \
         of one core."
    );
    let _ = writeln!(
        w,
        "- **API requests/s**: requests the replica sent to the kube-apiserver over the \
         window, counted in the apiserver's audit log (the replica runs with an identity of \
         its own, and only that identity is logged; `tests/cluster/up.sh` with \
         `REAPER_CLUSTER_AUDIT=1`), by the time the apiserver received them. Watches are left \
         out of this column: an open watch is not traffic; the watches opened in the window \
         are counted apart below."
    );
    match counting {
        Counting::Statements { .. } => {
            let _ = writeln!(
                w,
                "- **statements/s**: calls recorded by `pg_stat_statements` in the bench's own \
                 database over the window (only the operator connects to it then; PgBouncer's \
                 occasional `server_check_query` would count as a ping). **renews per retry \
                 period**: `UPDATE ... SET renewed_at` statements (`renew` and `renew_many`) \
                 per retry period ({} s), with the lease rows they renewed in brackets: N \
                 statements means one statement per lease, 1 means one batched statement. \
                 Each elector ticks on its own phase, so a window holds one tick more or less \
                 of some leases: the per-period figures are exact to within retry period ÷ \
                 window ({:.0} %).",
                t.retry,
                100.0 * t.retry as f64 / args.window as f64
            );
        }
        Counting::Transactions => {
            let _ = writeln!(
                w,
                "- **statements/s**: `pg_stat_statements` was not available (start the \
                 database with `REAPER_DB_PG_STAT_STATEMENTS=1`), so this is the bench \
                 database's committed transactions per second from `pg_stat_database` (every \
                 store statement is one autocommit transaction; the counters are flushed \
                 about once a second, so this is approximate) and renews are not counted."
            );
        }
    }

    if rows.iter().any(|r| r.by_kind.is_some()) {
        let mut kinds: Vec<&'static str> = rows
            .iter()
            .filter_map(|r| r.by_kind.as_ref())
            .flat_map(|m| m.keys().copied())
            .collect();
        kinds.sort_unstable();
        kinds.dedup();
        let _ = writeln!(w, "\n## Statements per second by kind\n");
        let _ = writeln!(
            w,
            "From `pg_stat_statements` (calls/s; rows/s in brackets where a statement returns \
             or changes rows). `get` and `sync_workload` come from reconciles; `acquire` (and, \
             where the binary has it, the batched `acquirable` check before it) from standby \
             ticks; `ping` from the readiness heartbeat (every 2 s). transactions/s \
             (`pg_stat_database`, commits + rollbacks) is a cross-check: idle backends flush \
             those counters lazily, so at a few statements per second it can lag behind.\n"
        );
        let _ = writeln!(
            w,
            "| N | {} | transactions/s | reconciles/s |",
            kinds
                .iter()
                .map(|k| format!("`{k}`"))
                .collect::<Vec<_>>()
                .join(" | ")
        );
        let _ = writeln!(w, "|---:|{}---:|---:|", "---:|".repeat(kinds.len()));
        for r in rows {
            let cells: Vec<String> = kinds
                .iter()
                .map(|k| {
                    r.by_kind.as_ref().and_then(|m| m.get(k)).map_or_else(
                        || "0".to_owned(),
                        |(c, rows)| format!("{} ({})", fmt_rate(*c), fmt_rate(*rows)),
                    )
                })
                .collect();
            let _ = writeln!(
                w,
                "| {} | {} | {} | {} |",
                r.n,
                cells.join(" | "),
                fmt_rate(r.xacts_per_s),
                r.reconciles_per_s
                    .map_or_else(|| "n/a".to_owned(), fmt_rate)
            );
        }
    }

    render_api(w, rows);

    let mut incomplete = Vec::new();
    let _ = writeln!(w, "\n## Start-up and steadiness\n");
    let _ = writeln!(
        w,
        "**ready after**: from starting the replica to holding all N leases with every \
         Deployment ready (it includes waiting up to the ttl for the previous replica's leases \
         to expire); a dash means that never happened within the timeout and the size was \
         measured anyway. **held** is the number of leases the replica held just before and \
         just after the window; **Deployments ready** is counted after it. **API requests \
         before the window**: the replica's requests from its start to the window (start-up, \
         taking the leases over, scaling up, settling), watch opens apart.\n"
    );
    let _ = writeln!(
        w,
        "| N | ready after | held before / after | Deployments ready | window | API requests before the window |"
    );
    let _ = writeln!(w, "|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        let complete = r.held.0 == r.n && r.held.1 == r.n && r.deployments_ready == r.n;
        let _ = writeln!(
            w,
            "| {} | {} | {} / {} | {} | {} | {} + {} watch opens |",
            r.n,
            if r.settled {
                fmt_dur(r.ready_after)
            } else {
                "—".to_owned()
            },
            r.held.0,
            r.held.1,
            r.deployments_ready,
            fmt_dur(r.window),
            r.startup_api.requests(),
            r.startup_api.watch_opens
        );
        if !complete {
            incomplete.push(r.n);
        }
    }
    if !incomplete.is_empty() {
        let _ = writeln!(
            w,
            "\n**Not steady** at N = {}: the replica did not hold every lease, or not every \
             Deployment was ready, for the whole window; its figures describe an overloaded \
             replica or control plane, not a steady state.",
            incomplete
                .iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    o
}
