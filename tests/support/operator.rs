//! `reaper-operator run` as a child process of a test, with the signals the failover
//! scenarios need (kill -9, SIGTERM, SIGSTOP/SIGCONT).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
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
        let http_port = free_port();
        let log = std::env::temp_dir().join(format!(
            "reaper-operator-{}-{}-{}.log",
            std::process::id(),
            spec.cluster,
            spec.identity
        ));
        let out = File::create(&log).unwrap();
        // REAPER_OPERATOR_BIN runs the scenarios against another build (e.g. the previous
        // commit's, to show that a new scenario fails there).
        let bin = std::env::var_os("REAPER_OPERATOR_BIN")
            .unwrap_or_else(|| env!("CARGO_BIN_EXE_reaper-operator").into());
        let mut cmd = Command::new(bin);
        cmd.arg("run")
            .args(["--cluster-name", spec.cluster, "--identity", spec.identity])
            .args(["--http-addr", &format!("127.0.0.1:{http_port}")])
            .args([
                "--shutdown-timeout-seconds",
                &shutdown_timeout_seconds.to_string(),
            ])
            .args(["--watch-namespace", spec.namespace])
            .env("KUBECONFIG", spec.kubeconfig)
            .env("DATABASE_URL", spec.database_url)
            .env("REAPER_DB_SCHEMA", spec.schema)
            .env("RUST_LOG", "info,reaper_operator=debug,sqlx=warn")
            .env_remove("REAPER_LISTEN_DATABASE_URL")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        if !spec.migrate {
            cmd.arg("--no-migrate");
        }
        if let Some(url) = spec.listen_database_url {
            cmd.env("REAPER_LISTEN_DATABASE_URL", url);
        }
        let child = cmd.spawn().expect("start reaper-operator run");
        Self {
            cluster: spec.cluster.to_owned(),
            identity: spec.identity.to_owned(),
            http_port,
            log,
            child,
        }
    }

    pub fn holder(&self) -> String {
        format!("{}/{}", self.cluster, self.identity)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([format!("-{signal}"), self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal} {}", self.pid());
    }

    /// `None` while running.
    pub fn exit_code(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().unwrap()
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
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// The status code of `GET path`, `None` when nothing answers.
    pub fn http_get(&self, path: &str) -> Option<u16> {
        self.http(path).map(|(code, _)| code)
    }

    /// Status code and body of `GET path`.
    pub fn http(&self, path: &str) -> Option<(u16, String)> {
        super::fixtures::http_get(self.http_port, path, Duration::from_secs(2))
    }
}

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        // SIGCONT first, in case a scenario left it stopped.
        let _ = Command::new("kill")
            .args(["-CONT", &self.pid().to_string()])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
