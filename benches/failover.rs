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
#[path = "failover/cluster.rs"]
mod cluster;
#[path = "failover/database.rs"]
mod database;
#[path = "failover/dead_cluster.rs"]
mod dead_cluster;
#[path = "failover/deployments.rs"]
mod deployments;
#[path = "failover/failover_command.rs"]
mod failover_command;
#[path = "failover/footprint.rs"]
mod footprint;
#[path = "failover/footprint_report.rs"]
mod footprint_report;
#[path = "support/host.rs"]
mod host;
#[path = "failover/machine.rs"]
mod machine;
#[path = "support/markdown.rs"]
mod markdown;
#[path = "failover/operator.rs"]
mod operator;
#[path = "failover/pods.rs"]
mod pods;
#[path = "failover/poll.rs"]
mod poll;
#[path = "failover/report.rs"]
mod report;
#[path = "failover/resource_usage.rs"]
mod resource_usage;
#[path = "failover/side.rs"]
mod side;
#[path = "failover/statements.rs"]
mod statements;
#[path = "failover/stopped_replica.rs"]
mod stopped_replica;
#[path = "../tests/support/mod.rs"]
mod support;
#[path = "failover/unrelated.rs"]
mod unrelated;

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Result, anyhow, ensure};
use clap::{Args, Parser, Subcommand, ValueEnum};
use reaper_operator::config::LeaseTimings;
use reaper_operator::reaper::LeaseSpec;

use database::cleanup_after_interrupt;
use failover_command::failover;
use footprint::footprint;

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
