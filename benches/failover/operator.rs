//! The operator replicas of a run: `tests/support/operator.rs`'s process, run from the
//! bench's binary with its logs in the run's log directory, and what the bench adds to it:
//! signals that return their time, and a wait that does not block the runtime's threads.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, ensure};
use chrono::{DateTime, Utc};

use super::poll::poll;
use super::support::operator::{Launch, OperatorProcess, OperatorSpec};

pub const SHUTDOWN_TIMEOUT_S: u64 = 30;

pub fn operator_bin() -> PathBuf {
    std::env::var_os("REAPER_BENCH_OPERATOR")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_reaper-operator")))
}

/// Directory of the operators' logs; removed on success, kept (and named) on failure.
pub struct LogDir {
    pub path: PathBuf,
    keep: bool,
}

impl LogDir {
    pub fn new(kind: &str) -> Result<Self> {
        let path = std::env::temp_dir().join(format!("reaper-bench-{kind}-{}", std::process::id()));
        std::fs::create_dir_all(&path).with_context(|| format!("create {}", path.display()))?;
        Ok(Self { path, keep: true })
    }

    pub fn succeeded(&mut self) {
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

/// A replica of the bench: [`OperatorProcess`] with the bench's binary, log directory
/// and log filter, and what the bench does with it beyond what the tests do.
pub struct Operator {
    process: OperatorProcess,
}

impl Operator {
    pub fn start(spec: OperatorSpec<'_>, log_dir: &Path) -> Result<Self> {
        let log = log_dir.join(format!("{}-{}.log", spec.cluster, spec.identity));
        let bin = operator_bin();
        ensure!(
            bin.is_file(),
            "operator binary {} not found (build it with `cargo build --release --bin reaper-operator`, \
             or let `cargo bench --bench failover` build it)",
            bin.display()
        );
        let launch = Launch {
            bin,
            log,
            shutdown_timeout_seconds: SHUTDOWN_TIMEOUT_S,
            rust_log: std::env::var_os("REAPER_BENCH_RUST_LOG").filter(|v| !v.is_empty()),
        };
        Ok(Self {
            process: OperatorProcess::launch(spec, launch)?,
        })
    }

    /// SIGKILL; returns the wall-clock time just before the signal.
    pub fn kill9(&mut self) -> Result<DateTime<Utc>> {
        let at = Utc::now();
        self.process.kill().context("SIGKILL the operator")?;
        Ok(at)
    }

    /// SIGTERM (through `kill`, a millisecond or two after the returned time).
    pub fn terminate(&self) -> Result<DateTime<Utc>> {
        let at = Utc::now();
        self.process.try_signal("TERM")?;
        Ok(at)
    }

    /// [`OperatorProcess::wait_exit`] without blocking a thread of the runtime, which
    /// the watches need to timestamp their events as they arrive.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let holder = self.holder();
        poll(
            Duration::from_millis(50),
            timeout,
            || Ok(self.process.try_exit_code()?),
            || format!("{holder} did not exit within {timeout:?}"),
        )
        .await
    }

    pub fn running(&mut self) -> bool {
        matches!(self.process.try_exit_code(), Ok(None))
    }
}

impl std::ops::Deref for Operator {
    type Target = OperatorProcess;

    fn deref(&self) -> &OperatorProcess {
        &self.process
    }
}

pub fn with_logs<T>(result: Result<T>, ops: &[&Operator]) -> Result<T> {
    result.map_err(|e| {
        let logs: Vec<String> = ops
            .iter()
            .map(|o| {
                format!(
                    "--- last lines of {} ({}):\n{}",
                    o.holder(),
                    o.log.display(),
                    o.last_log_lines(25)
                )
            })
            .collect();
        anyhow!("{e:#}\n{}", logs.join("\n"))
    })
}
