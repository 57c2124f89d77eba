//! The guarded workload: in each cluster and for each lease, `reaper-operator guard`
//! runs a shell that ignores SIGTERM and appends a timestamp to a file every 50 ms. A
//! supervisor starts the guard again whenever it exits (as a pod's container is
//! restarted), so each cluster always has a guard waiting for, or holding, each lease:
//! only the guard decides when its command acts. The checker (`guard_check.rs`) reads
//! the files and counts the moments at which the commands of both clusters acted.
//!
//! The guards of a cluster reach the database as its operators do: their reads through
//! a fault proxy of their own to PgBouncer, their LISTEN through a second one to
//! PostgreSQL, both cut by a `cluster-db-cut`. A `cluster-sigstop` freezes the operators
//! only (a cluster whose control plane is stuck while its workload runs on);
//! `guard-sigstop` freezes the guards themselves (not their commands), so that only
//! their watchdogs can stop the commands.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use chrono::Utc;
use tokio::sync::Notify;

use crate::checker::Time;
use crate::guard_check::GuardExit;
use crate::infra::{Database, host_port, signal_pid};
use crate::support::proxy::{FaultProxy, Mode};

/// `--grace-seconds`: SIGTERM this long before the SIGKILL instant.
pub const GRACE_MS: u64 = 500;
/// `--poll-interval-ms`.
pub const POLL_MS: u64 = 200;
/// `--margin-ms`: the SIGKILL instant is this long before the lease could expire.
pub const MARGIN_MS: u64 = 300;
/// Pause before a guard that exited is started again (a container restart, without
/// Kubernetes' growing back-off: the lease may come back at once).
const RESTART_DELAY: Duration = Duration::from_millis(200);

/// The guarded command: ignores SIGTERM (and says so in its file), acts every 50 ms.
/// Every line is `<unix ns> <run> <epoch>`, or `<unix ns> <run> TERM` for a SIGTERM;
/// `date` writes it with one `write`, so a SIGKILL never leaves half a line.
const SCRIPT: &str = r#"echo $$ > "$GUARD_OUT.pid"
trap 'date "+%s%N $GUARD_RUN TERM" >> "$GUARD_OUT"' TERM
while :; do date "+%s%N $GUARD_RUN $REAPER_LEASE_EPOCH" >> "$GUARD_OUT"; sleep 0.05; done"#;

/// A guard that a fault froze: which incarnation of which slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrozenGuard {
    pub cluster: usize,
    pub lease: usize,
    pub run: u64,
    pid: u32,
}

#[derive(Default)]
struct SlotState {
    /// The running guard: its pid and incarnation.
    current: Option<(u32, u64)>,
    exits: Vec<GuardExit>,
    stopping: bool,
}

/// One cluster's guard of one lease, and its supervisor.
struct Slot {
    cluster: usize,
    lease: usize,
    ticks: PathBuf,
    log: PathBuf,
    state: Mutex<SlotState>,
    stop: Notify,
}

struct ClusterPath {
    bouncer_proxy: FaultProxy,
    listen_proxy: FaultProxy,
}

pub struct Guards {
    paths: Vec<ClusterPath>,
    slots: Vec<Arc<Slot>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// Where cluster `cluster`'s guard of lease `lease` writes its command's ticks.
pub fn ticks_path(dir: &Path, cluster: &str, lease: usize) -> PathBuf {
    dir.join(format!("guarded-{cluster}-lease-{lease}.ticks"))
}

impl Guards {
    /// Starts a supervised guard per cluster and lease.
    pub async fn start(
        db: &Database,
        schema: &str,
        clusters: [&str; 2],
        leases: &[String],
        dir: &Path,
    ) -> Result<Self> {
        let bin: PathBuf = std::env::var_os("REAPER_OPERATOR_BIN")
            .unwrap_or_else(|| env!("CARGO_BIN_EXE_reaper-operator").into())
            .into();
        let mut guards = Self {
            paths: Vec::new(),
            slots: Vec::new(),
            tasks: Vec::new(),
        };
        for (c, cluster) in clusters.iter().enumerate() {
            let path = ClusterPath {
                bouncer_proxy: FaultProxy::start(host_port(&db.bouncer_url)?).await,
                listen_proxy: FaultProxy::start(host_port(&db.direct_url)?).await,
            };
            let url = path.bouncer_proxy.url_for(&db.bouncer_url);
            let listen_url = path.listen_proxy.url_for(&db.direct_url);
            guards.paths.push(path);
            for (l, lease) in leases.iter().enumerate() {
                let slot = Arc::new(Slot {
                    cluster: c,
                    lease: l,
                    ticks: ticks_path(dir, cluster, l),
                    log: dir.join(format!("guard-{cluster}-lease-{l}.log")),
                    state: Mutex::default(),
                    stop: Notify::new(),
                });
                let command = GuardCommand {
                    bin: bin.clone(),
                    cluster: (*cluster).to_owned(),
                    lease: lease.clone(),
                    url: url.clone(),
                    listen_url: listen_url.clone(),
                    schema: schema.to_owned(),
                };
                guards
                    .tasks
                    .push(tokio::spawn(supervise(slot.clone(), command)));
                guards.slots.push(slot);
            }
        }
        Ok(guards)
    }

    /// Cuts (or restores) the database path of one cluster's guards.
    pub fn cut(&self, cluster: usize, mode: Mode) {
        self.paths[cluster].bouncer_proxy.set(mode);
        self.paths[cluster].listen_proxy.set(mode);
    }

    /// SIGSTOPs the running guards of `cluster` (not their commands, which run in
    /// process groups of their own, nor their watchdogs).
    pub fn freeze(&self, cluster: usize) -> Vec<FrozenGuard> {
        let mut frozen = Vec::new();
        for slot in self.slots.iter().filter(|s| s.cluster == cluster) {
            let current = slot.state.lock().unwrap().current;
            if let Some((pid, run)) = current
                && signal_pid(pid, "STOP").is_ok()
            {
                frozen.push(FrozenGuard {
                    cluster,
                    lease: slot.lease,
                    run,
                    pid,
                });
            }
        }
        frozen
    }

    pub fn thaw(&self, frozen: &[FrozenGuard]) {
        for g in frozen {
            let _ = signal_pid(g.pid, "CONT");
        }
    }

    /// Stops every supervisor and kills every guard and command (also on a panic, from
    /// `Drop`). Returns every guard exit seen.
    pub async fn stop(&mut self) -> Vec<GuardExit> {
        for slot in &self.slots {
            slot.state.lock().unwrap().stopping = true;
            slot.stop.notify_one();
        }
        for task in self.tasks.drain(..) {
            let _ = task.await;
        }
        let mut exits = Vec::new();
        for slot in &self.slots {
            exits.extend(std::mem::take(&mut slot.state.lock().unwrap().exits));
        }
        exits.sort_by_key(|e| e.at);
        exits
    }

    /// The tick files, per `(cluster, lease)`.
    pub fn tick_files(&self) -> Vec<(usize, usize, PathBuf)> {
        self.slots
            .iter()
            .map(|s| (s.cluster, s.lease, s.ticks.clone()))
            .collect()
    }
}

impl Drop for Guards {
    fn drop(&mut self) {
        for slot in &self.slots {
            let current = slot.state.lock().unwrap().current.take();
            if let Some((pid, _)) = current {
                kill_guard(pid, &slot.ticks);
            }
        }
        for task in &self.tasks {
            task.abort();
        }
    }
}

struct GuardCommand {
    bin: PathBuf,
    cluster: String,
    lease: String,
    url: String,
    listen_url: String,
    schema: String,
}

/// SIGCONT and SIGKILL a guard, then SIGKILL its command's process group (its watchdog
/// would do that too, after the grace).
fn kill_guard(pid: u32, ticks: &Path) {
    let _ = signal_pid(pid, "CONT");
    let _ = signal_pid(pid, "KILL");
    let pid_file = PathBuf::from(format!("{}.pid", ticks.display()));
    if let Some(pgid) = std::fs::read_to_string(pid_file)
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
    {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pgid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// Starts the guard, waits for it to exit, records why, starts it again.
async fn supervise(slot: Arc<Slot>, command: GuardCommand) {
    let mut run: u64 = 0;
    loop {
        if slot.state.lock().unwrap().stopping {
            return;
        }
        run += 1;
        let offset = std::fs::metadata(&slot.log).map_or(0, |m| m.len());
        let started = Utc::now();
        let child = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&slot.log)
            .and_then(|log| {
                use std::io::Write as _;
                let mut header = log.try_clone()?;
                writeln!(
                    header,
                    "=== run {run} started at {}",
                    started.format("%H:%M:%S%.3f")
                )?;
                tokio::process::Command::new(&command.bin)
                    .arg("guard")
                    .args(["--lease", &command.lease])
                    .args(["--cluster-name", &command.cluster])
                    .args(["--grace-seconds", &format!("{}", GRACE_MS as f64 / 1000.0)])
                    .args(["--poll-interval-ms", &POLL_MS.to_string()])
                    .args(["--margin-ms", &MARGIN_MS.to_string()])
                    .args(["--listen-database-url", &command.listen_url])
                    .args(["--", "sh", "-c", SCRIPT])
                    .env("DATABASE_URL", &command.url)
                    .env("REAPER_DB_SCHEMA", &command.schema)
                    .env("RUST_LOG", "info")
                    .env("GUARD_OUT", &slot.ticks)
                    .env("GUARD_RUN", run.to_string())
                    .env_remove("REAPER_LISTEN_DATABASE_URL")
                    .stdin(std::process::Stdio::null())
                    .stdout(log.try_clone()?)
                    .stderr(log)
                    .spawn()
            });
        let mut child = match child {
            Ok(child) => child,
            Err(error) => {
                record_exit(&slot, run, None, format!("cannot start the guard: {error}"));
                tokio::time::sleep(RESTART_DELAY).await;
                continue;
            }
        };
        let pid = child.id().unwrap_or_default();
        slot.state.lock().unwrap().current = Some((pid, run));
        tokio::select! {
            status = child.wait() => {
                slot.state.lock().unwrap().current = None;
                let code = status.ok().and_then(|s| s.code());
                let reason = last_line(&slot.log, offset);
                record_exit(&slot, run, code, reason);
            }
            _ = slot.stop.notified() => {
                slot.state.lock().unwrap().current = None;
                kill_guard(pid, &slot.ticks);
                let _ = child.wait().await;
                return;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(RESTART_DELAY) => {}
            _ = slot.stop.notified() => return,
        }
    }
}

fn record_exit(slot: &Slot, run: u64, code: Option<i32>, reason: String) {
    let at: Time = Utc::now();
    slot.state.lock().unwrap().exits.push(GuardExit {
        cluster: slot.cluster,
        lease: slot.lease,
        run,
        at,
        code,
        reason,
    });
}

/// The last non-empty line written to `path` after `offset` (the guard's last word).
fn last_line(path: &Path, offset: u64) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let tail = String::from_utf8_lossy(text.get(offset as usize..).unwrap_or_default());
    tail.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or_default()
        .trim()
        .to_owned()
}

/// Waits (`timeout` at most) until some guard's command of every lease is acting.
pub async fn wait_acting(
    files: &[(usize, usize, PathBuf)],
    leases: usize,
    timeout: Duration,
) -> Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let recent = Utc::now() - chrono::Duration::milliseconds(500);
        let acting: Vec<bool> = (0..leases)
            .map(|l| {
                files.iter().filter(|f| f.1 == l).any(|(_, _, path)| {
                    std::fs::read_to_string(path).is_ok_and(|text| {
                        text.lines()
                            .last()
                            .and_then(|line| line.split_whitespace().next())
                            .and_then(|ns| ns.parse::<i64>().ok())
                            .is_some_and(|ns| chrono::DateTime::from_timestamp_nanos(ns) >= recent)
                    })
                })
            })
            .collect();
        if acting.iter().all(|a| *a) {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!("guarded commands acting per lease: {acting:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
