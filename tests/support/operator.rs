//! `reaper-operator run` as a child process of a test, with the signals the failover
//! scenarios need (kill -9, SIGTERM, SIGSTOP/SIGCONT). `benches/failover.rs` runs its
//! replicas with it too, through [`OperatorProcess::launch`] and the fallible methods.

use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::Context as _;

pub struct OperatorProcess {
    pub cluster: String,
    pub identity: String,
    pub http_port: u16,
    pub log: PathBuf,
    child: Child,
}

pub struct OperatorSpec<'a> {
    pub kubeconfig: &'a Path,
    pub database_url: &'a str,
    pub listen_database_url: Option<&'a str>,
    pub schema: &'a str,
    pub cluster: &'a str,
    pub identity: &'a str,
    /// Apply migrations at start (needs a direct connection).
    pub migrate: bool,
    /// `--watch-namespace`, so scenarios sharing a cluster do not see each other (empty:
    /// every namespace, as the operator reads an empty value).
    pub namespace: &'a str,
}

/// How [`OperatorProcess::launch`] runs the binary, beyond the [`OperatorSpec`]: the
/// tests' choices ([`OperatorProcess::start`]) or a bench's.
pub struct Launch {
    pub bin: PathBuf,
    /// The replica's stdout and stderr.
    pub log: PathBuf,
    pub shutdown_timeout_seconds: u64,
    /// `RUST_LOG`; `None` leaves it unset (the binary's own default).
    pub rust_log: Option<OsString>,
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The `--shutdown-timeout-seconds` of [`OperatorProcess::start`].
pub const SHUTDOWN_TIMEOUT_SECONDS: u64 = 20;

impl OperatorProcess {
    pub fn start(spec: OperatorSpec<'_>) -> Self {
        Self::start_with_shutdown_timeout(spec, SHUTDOWN_TIMEOUT_SECONDS)
    }

    /// [`OperatorProcess::start`] with another `--shutdown-timeout-seconds` (how long a
    /// SIGTERM'd replica waits for its workload's pods to stop before exiting).
    pub fn start_with_shutdown_timeout(
        spec: OperatorSpec<'_>,
        shutdown_timeout_seconds: u64,
    ) -> Self {
        let log = std::env::temp_dir().join(format!(
            "reaper-operator-{}-{}-{}.log",
            std::process::id(),
            spec.cluster,
            spec.identity
        ));
        // REAPER_OPERATOR_BIN runs the scenarios against another build (e.g. the previous
        // commit's, to show that a new scenario fails there).
        let bin = std::env::var_os("REAPER_OPERATOR_BIN")
            .unwrap_or_else(|| env!("CARGO_BIN_EXE_reaper-operator").into());
        let launch = Launch {
            bin: bin.into(),
            log,
            shutdown_timeout_seconds,
            rust_log: Some("info,reaper_operator=debug,sqlx=warn".into()),
        };
        let started = Self::launch(spec, launch).expect("start reaper-operator run");
        STARTED
            .lock()
            .unwrap()
            .push((started.holder(), started.log.clone()));
        started
    }

    /// Starts `reaper-operator run` as `launch` says; an error instead of a panic.
    pub fn launch(spec: OperatorSpec<'_>, launch: Launch) -> anyhow::Result<Self> {
        let http_port = free_port()?;
        let out = File::create(&launch.log)
            .with_context(|| format!("create {}", launch.log.display()))?;
        let mut cmd = Command::new(&launch.bin);
        cmd.arg("run")
            .args(["--cluster-name", spec.cluster, "--identity", spec.identity])
            .args(["--http-addr", &format!("127.0.0.1:{http_port}")])
            .args([
                "--shutdown-timeout-seconds",
                &launch.shutdown_timeout_seconds.to_string(),
            ])
            .args(["--watch-namespace", spec.namespace])
            .env("KUBECONFIG", spec.kubeconfig)
            .env("DATABASE_URL", spec.database_url)
            .env("REAPER_DB_SCHEMA", spec.schema)
            .env_remove("RUST_LOG")
            .env_remove("REAPER_LISTEN_DATABASE_URL")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        if !spec.migrate {
            cmd.arg("--no-migrate");
        }
        if let Some(url) = spec.listen_database_url {
            cmd.env("REAPER_LISTEN_DATABASE_URL", url);
        }
        if let Some(filter) = launch.rust_log {
            cmd.env("RUST_LOG", filter);
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("start {} run", launch.bin.display()))?;
        Ok(Self {
            cluster: spec.cluster.to_owned(),
            identity: spec.identity.to_owned(),
            http_port,
            log: launch.log,
            child,
        })
    }

    pub fn holder(&self) -> String {
        format!("{}/{}", self.cluster, self.identity)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, signal: &str) {
        if let Err(e) = self.try_signal(signal) {
            panic!("{e:#}");
        }
    }

    /// [`OperatorProcess::signal`], an error instead of a panic.
    pub fn try_signal(&self, signal: &str) -> anyhow::Result<()> {
        let status = Command::new("kill")
            .args([format!("-{signal}"), self.pid().to_string()])
            .status()
            .with_context(|| format!("run kill -{signal}"))?;
        anyhow::ensure!(status.success(), "kill -{signal} {} failed", self.pid());
        Ok(())
    }

    /// SIGKILL from this process itself, with no `kill` process started in between: for
    /// a caller that takes the time of the signal.
    pub fn kill(&mut self) -> std::io::Result<()> {
        self.child.kill()
    }

    /// `None` while running.
    pub fn exit_code(&mut self) -> Option<std::process::ExitStatus> {
        self.try_exit_code().unwrap()
    }

    /// [`OperatorProcess::exit_code`], an error instead of a panic.
    pub fn try_exit_code(&mut self) -> std::io::Result<Option<std::process::ExitStatus>> {
        self.child.try_wait()
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not exit within {timeout:?}; log:\n{}",
                self.holder(),
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_tail(&self) -> String {
        self.last_log_lines(40)
    }

    /// The last `count` lines of the log.
    pub fn last_log_lines(&self, count: usize) -> String {
        last_lines(&self.log, count)
    }

    /// The status code of `GET path`, `None` when nothing answers.
    pub fn http_get(&self, path: &str) -> Option<u16> {
        self.http(path).map(|(code, _)| code)
    }

    /// Status code and body of `GET path`.
    pub fn http(&self, path: &str) -> Option<(u16, String)> {
        super::fixtures::http_get(self.http_port, path, Duration::from_secs(2))
    }

    /// The value of an unlabelled series in `/metrics`.
    pub fn metric(&self, series: &str) -> Option<f64> {
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

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        // Only while it runs: the pid of a child already reaped may be another process's.
        if matches!(self.child.try_wait(), Ok(None)) {
            // SIGCONT first, in case a scenario left it stopped.
            let _ = Command::new("kill")
                .args(["-CONT", &self.pid().to_string()])
                .stderr(Stdio::null())
                .status();
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// The replicas [`OperatorProcess::start`] started in this test process, in order: their
/// holder and log file, for [`with_replica_logs`].
static STARTED: Mutex<Vec<(String, PathBuf)>> = Mutex::new(Vec::new());

/// Runs `scenario`; an error it returns gets the log tails of every replica
/// [`OperatorProcess::start`] started while it ran (their log files outlive them).
pub async fn with_replica_logs(
    scenario: impl Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<()> {
    let first = STARTED.lock().unwrap().len();
    let result = scenario.await;
    let started = STARTED.lock().unwrap()[first..].to_vec();
    with_log_tails(
        result,
        started.iter().map(|(h, log)| (h.clone(), log.as_path())),
    )
}

/// The last `count` lines of the file at `path` (none when it cannot be read).
fn last_lines(path: &Path, count: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(count)..].join("\n")
}

/// `result`, with the log tails of the replicas `ops` added to an error.
pub fn with_logs<'a>(
    result: anyhow::Result<()>,
    ops: impl IntoIterator<Item = &'a OperatorProcess>,
) -> anyhow::Result<()> {
    with_log_tails(
        result,
        ops.into_iter().map(|o| (o.holder(), o.log.as_path())),
    )
}

/// `result`, with the last 40 lines of each `(holder, log file)` added to an error.
fn with_log_tails<'a>(
    result: anyhow::Result<()>,
    logs: impl Iterator<Item = (String, &'a Path)>,
) -> anyhow::Result<()> {
    result.map_err(|e| {
        let tails: Vec<String> = logs
            .map(|(holder, log)| format!("--- log of {holder}:\n{}", last_lines(log, 40)))
            .collect();
        anyhow::anyhow!("{e:#}\n{}", tails.join("\n"))
    })
}
