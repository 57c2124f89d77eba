//! What the fault injector acts on: the shared PostgreSQL and PgBouncer (stopped and
//! started with the same commands `tests/db/up.sh` used), one cluster's kube-apiserver
//! (stopped and restarted with its exact command line), and the operator replicas, each
//! with its own fault proxies in front of the database.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};

use crate::support::command::run;
use crate::support::operator::{OperatorProcess, OperatorSpec};
use crate::support::proxy::{FaultProxy, Mode};

/// `host:port` of a postgres URL.
pub fn host_port(url: &str) -> Result<String> {
    let after_at = url
        .rsplit_once('@')
        .map(|(_, a)| a)
        .ok_or_else(|| anyhow!("no credentials in the database URL"))?;
    Ok(after_at.split('/').next().unwrap_or(after_at).to_owned())
}

fn env(var: &str) -> Result<String> {
    std::env::var(var)
        .ok()
        .filter(|v| !v.is_empty())
        .ok_or_else(|| {
            anyhow!(
                "{var} is not set: the chaos suite needs the database started by tests/db/up.sh \
                 (`set -a; . \"$(tests/db/up.sh NAME | tail -n 1)\"; set +a`)"
            )
        })
}

/// Whether `pid` is a live (not zombie) process whose command line contains `needle`.
pub fn pid_runs(pid: u32, needle: &str) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    // A zombie has an empty command line.
    !cmdline.is_empty() && String::from_utf8_lossy(&cmdline).contains(needle)
}

fn read_pid(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The PostgreSQL and PgBouncer of `tests/db/up.sh`, shared with the other tests.
#[derive(Clone, Debug)]
pub struct Database {
    pub direct_url: String,
    pub bouncer_url: String,
    pgdata: PathBuf,
    pg_ctl: PathBuf,
    run_as: Option<String>,
    dir: PathBuf,
    bouncer_ini: PathBuf,
    bouncer_pidfile: PathBuf,
    bouncer_addr: String,
}

impl Database {
    pub fn from_env() -> Result<Self> {
        let pgdata = PathBuf::from(env("REAPER_TEST_PGDATA")?);
        let dir = pgdata
            .parent()
            .ok_or_else(|| anyhow!("REAPER_TEST_PGDATA has no parent directory"))?
            .to_owned();
        let bouncer_ini = dir.join("pgbouncer.ini");
        ensure!(
            bouncer_ini.is_file(),
            "{} not found (expected beside REAPER_TEST_PGDATA, as tests/db/up.sh writes it)",
            bouncer_ini.display()
        );
        let ini = std::fs::read_to_string(&bouncer_ini)?;
        let bouncer_pidfile = ini
            .lines()
            .filter_map(|l| l.split_once('='))
            .find(|(k, _)| k.trim() == "pidfile")
            .map(|(_, v)| PathBuf::from(v.trim()))
            .unwrap_or_else(|| dir.join("pgbouncer.pid"));
        let bouncer_url = env("REAPER_TEST_PGBOUNCER_URL")?;
        let bouncer_addr = host_port(&bouncer_url)?;
        Ok(Self {
            direct_url: env("REAPER_TEST_DATABASE_URL")?,
            bouncer_url,
            pgdata,
            pg_ctl: PathBuf::from(env("REAPER_TEST_PG_CTL")?),
            run_as: std::env::var("REAPER_TEST_PG_RUN_AS")
                .ok()
                .filter(|v| !v.is_empty()),
            dir,
            bouncer_ini,
            bouncer_pidfile,
            bouncer_addr,
        })
    }

    /// `program args` as the database user (`runuser -u postgres --` when up.sh ran as root).
    fn command(&self, program: &Path, args: &[&str]) -> std::process::Command {
        let mut cmd = match &self.run_as {
            Some(user) => {
                let mut c = std::process::Command::new("runuser");
                c.args(["-u", user, "--"]).arg(program);
                c
            }
            None => std::process::Command::new(program),
        };
        cmd.args(args).stdin(Stdio::null());
        cmd
    }

    fn run(&self, program: &Path, args: &[&str]) -> Result<std::process::Output> {
        self.command(program, args)
            .output()
            .with_context(|| format!("running {} {args:?}", program.display()))
    }

    /// `program args` as the database user, to its end, off the runtime's threads;
    /// fails when it fails.
    async fn run_async(&self, program: &Path, args: &[&str]) -> Result<()> {
        let mut command = self.command(program, args);
        tokio::task::spawn_blocking(move || run(&mut command)).await??;
        Ok(())
    }

    fn pgdata(&self) -> String {
        self.pgdata.display().to_string()
    }

    /// `tests/db/<script> NAME` for this database (the pair scripts run as root and
    /// switch to the database user themselves).
    async fn pair_script(&self, script: &str) -> Result<()> {
        let path = crate::support::cluster::repo_root()
            .join("tests/db")
            .join(script);
        let name = self
            .dir
            .file_name()
            .ok_or_else(|| anyhow!("{} has no name", self.dir.display()))?
            .to_owned();
        let root = self.dir.parent().map(Path::to_path_buf).unwrap_or_default();
        let mut command = std::process::Command::new(path);
        command
            .arg(name)
            .env("REAPER_DB_DIR", root)
            .stdin(Stdio::null());
        tokio::task::spawn_blocking(move || run(&mut command)).await??;
        Ok(())
    }

    /// Kills the primary, promotes the standby and moves the primary address to it
    /// (`tests/db/failover.sh`).
    pub async fn fail_over(&self) -> Result<()> {
        self.pair_script("failover.sh").await
    }

    /// A new standby of the current primary, synchronous again (`tests/db/standby.sh`).
    pub async fn add_standby(&self) -> Result<()> {
        self.pair_script("standby.sh").await
    }

    pub fn postgres_running(&self) -> bool {
        self.run(&self.pg_ctl, &["-D", &self.pgdata(), "status"])
            .is_ok_and(|o| o.status.success())
    }

    /// `pg_ctl stop -m fast|immediate`.
    pub async fn stop_postgres(&self, mode: &str) -> Result<()> {
        self.run_async(
            &self.pg_ctl,
            &["-D", &self.pgdata(), "-m", mode, "-w", "-t", "60", "stop"],
        )
        .await
    }

    pub async fn start_postgres(&self) -> Result<()> {
        let log = self.dir.join("postgres.log").display().to_string();
        self.run_async(
            &self.pg_ctl,
            &["-D", &self.pgdata(), "-l", &log, "-w", "-t", "60", "start"],
        )
        .await
    }

    pub fn pgbouncer_pid(&self) -> Option<u32> {
        read_pid(&self.bouncer_pidfile).filter(|&pid| pid_runs(pid, "pgbouncer"))
    }

    /// SIGTERM (PgBouncer 1.18: immediate shutdown), SIGKILL after 10 s.
    pub async fn stop_pgbouncer(&self) -> Result<()> {
        let pid = self
            .pgbouncer_pid()
            .ok_or_else(|| anyhow!("PgBouncer is not running"))?;
        signal_pid(pid, "TERM")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while pid_runs(pid, "pgbouncer") {
            if Instant::now() > deadline {
                signal_pid(pid, "KILL")?;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    /// `pgbouncer -d <ini>`, then waits (10 s at most) until its port accepts connections.
    pub async fn start_pgbouncer(&self) -> Result<()> {
        let ini = self.bouncer_ini.display().to_string();
        let mut last = None;
        for _ in 0..20 {
            match self.run_async(Path::new("pgbouncer"), &["-d", &ini]).await {
                Ok(()) => {
                    last = None;
                    break;
                }
                // A previous instance still exiting: "pidfile exists".
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        if let Some(e) = last {
            return Err(e.context("PgBouncer did not start"));
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if tokio::net::TcpStream::connect(&self.bouncer_addr)
                .await
                .is_ok()
            {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "PgBouncer does not listen on {}",
                self.bouncer_addr
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until a new connection answers `SELECT 1` directly and through PgBouncer.
    /// After a PostgreSQL restart PgBouncer refuses logins for `server_login_retry`
    /// (15 s by default) once a server login failed, so the outage seen by the
    /// operators lasts until then.
    pub async fn wait_usable(&self, timeout: Duration) -> Result<()> {
        use sqlx::Connection as _;
        let deadline = Instant::now() + timeout;
        for url in [&self.direct_url, &self.bouncer_url] {
            // The operator's connect options: a default PgBouncer refuses sqlx's own.
            let options = reaper_operator::lease::connect_options(url)?;
            loop {
                let attempt = tokio::time::timeout(Duration::from_secs(2), async {
                    let mut c = sqlx::PgConnection::connect_with(&options).await?;
                    sqlx::raw_sql("SELECT 1").execute(&mut c).await?;
                    c.close().await
                })
                .await;
                match attempt {
                    Ok(Ok(())) => break,
                    Ok(Err(e)) if Instant::now() > deadline => return Err(e.into()),
                    Err(_) if Instant::now() > deadline => bail!("SELECT 1 timed out"),
                    _ => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        }
        Ok(())
    }

    /// Starts whatever is down (blocking; for the guard). Returns what it did.
    pub fn ensure_up_blocking(&self) -> Vec<String> {
        let mut done = Vec::new();
        if !self.postgres_running() {
            let log = self.dir.join("postgres.log").display().to_string();
            let out = self.run(
                &self.pg_ctl,
                &["-D", &self.pgdata(), "-l", &log, "-w", "-t", "60", "start"],
            );
            done.push(format!(
                "started PostgreSQL: {}",
                out.map(|o| o.status.to_string())
                    .unwrap_or_else(|e| e.to_string())
            ));
        }
        if self.pgbouncer_pid().is_none() {
            let ini = self.bouncer_ini.display().to_string();
            let mut result = String::new();
            for _ in 0..20 {
                match self.run(Path::new("pgbouncer"), &["-d", &ini]) {
                    Ok(o) if o.status.success() => {
                        result = "ok".into();
                        break;
                    }
                    Ok(o) => result = String::from_utf8_lossy(&o.stderr).into_owned(),
                    Err(e) => result = e.to_string(),
                }
                std::thread::sleep(Duration::from_millis(250));
            }
            done.push(format!("started PgBouncer: {result}"));
        }
        done
    }
}

/// Leaves PostgreSQL and PgBouncer running when dropped, also when the test panics:
/// other tests share them.
pub struct DatabaseGuard(pub Database);

impl Drop for DatabaseGuard {
    fn drop(&mut self) {
        for line in self.0.ensure_up_blocking() {
            eprintln!("[chaos] cleanup: {line}");
        }
        let pg = self.0.postgres_running();
        let bouncer = self.0.pgbouncer_pid();
        eprintln!(
            "[chaos] cleanup: PostgreSQL {}, PgBouncer {}",
            if pg { "up" } else { "DOWN" },
            bouncer.map_or("DOWN".to_owned(), |p| format!("up (pid {p})"))
        );
    }
}

pub fn signal_pid(pid: u32, signal: &str) -> Result<()> {
    let status = std::process::Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .stderr(Stdio::null())
        .status()?;
    ensure!(status.success(), "kill -{signal} {pid} failed");
    Ok(())
}

/// One cluster's kube-apiserver, found through the pid file that `tests/cluster/up.sh`
/// wrote; restarted with the same command line, and its new pid written back so that
/// `tests/cluster/down.sh` stops it.
pub struct ApiServer {
    state: PathBuf,
    pidfile: PathBuf,
    argv: Vec<String>,
    started: Vec<Child>,
}

impl ApiServer {
    pub fn of(cluster_name: &str) -> Result<Self> {
        let root = std::env::var_os("REAPER_CLUSTER_DIR")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/tmp/reaper-clusters"));
        let state = root.join(cluster_name);
        let pidfile = state.join("pids/kube-apiserver.pid");
        ensure!(pidfile.is_file(), "no {}", pidfile.display());
        Ok(Self {
            state,
            pidfile,
            argv: Vec::new(),
            started: Vec::new(),
        })
    }

    fn needle(&self) -> String {
        format!("{}/", self.state.display())
    }

    fn running_pid(&self) -> Option<u32> {
        read_pid(&self.pidfile).filter(|&pid| pid_runs(pid, &self.needle()))
    }

    /// SIGKILL (a crash: a graceful SIGTERM drains watches for up to a minute), then
    /// waits for it to be gone; remembers the command line for [`ApiServer::start`].
    pub async fn stop(&mut self) -> Result<()> {
        let pid = self
            .running_pid()
            .ok_or_else(|| anyhow!("kube-apiserver of {} is not running", self.state.display()))?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))?;
        self.argv = cmdline
            .split(|&b| b == 0)
            .filter(|s| !s.is_empty())
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect();
        ensure!(!self.argv.is_empty(), "empty command line of pid {pid}");
        signal_pid(pid, "KILL")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while pid_runs(pid, &self.needle()) {
            ensure!(
                Instant::now() < deadline,
                "kube-apiserver {pid} survived SIGKILL"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.reap();
        Ok(())
    }

    /// Starts it again with the remembered command line, appending to its log.
    pub fn start(&mut self) -> Result<()> {
        let (program, args) = self
            .argv
            .split_first()
            .ok_or_else(|| anyhow!("start without a previous stop"))?;
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.state.join("logs/kube-apiserver.log"))?;
        let child = std::process::Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("restarting {program}"))?;
        std::fs::write(&self.pidfile, format!("{}\n", child.id()))?;
        self.started.push(child);
        Ok(())
    }

    fn reap(&mut self) {
        self.started
            .retain_mut(|c| matches!(c.try_wait(), Ok(None)));
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        // The cluster's down.sh would stop it too; do not leave a child behind.
        for child in &mut self.started {
            if let Ok(None) = child.try_wait() {
                let _ = signal_pid(child.id(), "TERM");
                let deadline = Instant::now() + Duration::from_secs(10);
                while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(100));
                }
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// What a replica needs to (re)start.
pub struct ReplicaConfig {
    pub kubeconfig: PathBuf,
    pub schema: String,
    pub namespace: String,
    pub cluster: String,
    pub identity: String,
    /// `--shutdown-timeout-seconds`: above the workload's longest stop time.
    pub shutdown_timeout_seconds: u64,
}

/// One operator replica: `reaper-operator run` with its lease statements going through
/// its own proxy to PgBouncer (transaction mode) and its LISTEN connection through a
/// second proxy to PostgreSQL directly, so that a cut isolates it completely.
pub struct Replica {
    pub config: ReplicaConfig,
    pub process: Option<OperatorProcess>,
    bouncer_proxy: FaultProxy,
    listen_proxy: FaultProxy,
    bouncer_url: String,
    listen_url: String,
    /// Incarnations so far (logs of earlier ones are archived as `<name>.<n>.log`).
    pub incarnation: u32,
    pub archive: PathBuf,
    pub archived_logs: Vec<PathBuf>,
}

impl Replica {
    pub async fn new(config: ReplicaConfig, db: &Database, archive: &Path) -> Result<Self> {
        let bouncer_proxy = FaultProxy::start(host_port(&db.bouncer_url)?).await;
        let listen_proxy = FaultProxy::start(host_port(&db.direct_url)?).await;
        let bouncer_url = bouncer_proxy.url_for(&db.bouncer_url);
        let listen_url = listen_proxy.url_for(&db.direct_url);
        let mut replica = Self {
            config,
            process: None,
            bouncer_proxy,
            listen_proxy,
            bouncer_url,
            listen_url,
            incarnation: 0,
            archive: archive.to_owned(),
            archived_logs: Vec::new(),
        };
        replica.start();
        Ok(replica)
    }

    pub fn name(&self) -> String {
        format!("{}/{}", self.config.cluster, self.config.identity)
    }

    pub fn start(&mut self) {
        assert!(self.process.is_none(), "{} is running", self.name());
        self.incarnation += 1;
        self.process = Some(OperatorProcess::start_with_shutdown_timeout(
            OperatorSpec {
                kubeconfig: &self.config.kubeconfig,
                database_url: &self.bouncer_url,
                listen_database_url: Some(&self.listen_url),
                schema: &self.config.schema,
                cluster: &self.config.cluster,
                identity: &self.config.identity,
                migrate: false,
                namespace: &self.config.namespace,
            },
            self.config.shutdown_timeout_seconds,
        ));
    }

    pub fn signal(&self, signal: &str) -> Result<()> {
        let process = self
            .process
            .as_ref()
            .ok_or_else(|| anyhow!("{} is not running", self.name()))?;
        signal_pid(process.pid(), signal)
    }

    /// kill -9, reap, and archive the log of this incarnation.
    pub fn kill9(&mut self) -> Result<()> {
        self.signal("KILL")?;
        self.stop_and_archive();
        Ok(())
    }

    /// Kills the process if still running (Drop of OperatorProcess) and moves its log
    /// into the archive directory.
    pub fn stop_and_archive(&mut self) {
        if let Some(process) = self.process.take() {
            let log = process.log.clone();
            drop(process);
            let to = self.archive.join(format!(
                "{}-{}.{}.log",
                self.config.cluster, self.config.identity, self.incarnation
            ));
            if std::fs::rename(&log, &to).is_err() {
                let _ = std::fs::copy(&log, &to).map(|_| std::fs::remove_file(&log));
            }
            self.archived_logs.push(to);
        }
    }

    /// `Some(status)` when the process exited by itself.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.process.as_mut().and_then(|p| p.exit_code())
    }

    pub fn cut(&self, mode: Mode) {
        self.bouncer_proxy.set(mode);
        self.listen_proxy.set(mode);
    }

    pub fn http_port(&self) -> Option<u16> {
        self.process.as_ref().map(|p| p.http_port)
    }

    /// Every log this replica wrote (archived incarnations and the running one).
    pub fn logs(&self) -> Vec<PathBuf> {
        let mut logs = self.archived_logs.clone();
        if let Some(p) = &self.process {
            logs.push(p.log.clone());
        }
        logs
    }
}

impl Drop for Replica {
    /// Kills the process (also on an early error) and keeps its log with the run's.
    fn drop(&mut self) {
        self.stop_and_archive();
    }
}

/// `GET path` on 127.0.0.1:`port`: the body of a 200 answer (support::fixtures's
/// client, off the runtime's workers).
pub async fn http_get(port: u16, path: &str) -> Result<String> {
    let request = path.to_owned();
    let answer = tokio::task::spawn_blocking(move || {
        crate::support::fixtures::http_get(port, &request, Duration::from_secs(2))
    })
    .await?;
    match answer {
        Some((200, body)) => Ok(body),
        Some((code, _)) => bail!("GET {path} answered {code}"),
        None => bail!("GET {path}: no answer within 2 s"),
    }
}
