//! `reaper-operator guard` with real processes and a real PostgreSQL: the guarded
//! command is a shell that ignores SIGTERM and writes a timestamp every 50 ms, so the
//! tests can tell exactly when it last acted. Each case checks that it stopped acting
//! before anybody else could have taken the lease:
//!
//! (a) the lease moves to another cluster: stopped within a poll + the grace;
//! (b) the database becomes unreachable (a fault proxy): stopped before the lease could
//!     expire, although the holder keeps renewing;
//! (c) the guard is frozen (SIGSTOP) while the holder is frozen too: its watchdog
//!     stops the command before the lease expires; the guard, resumed, exits 3;
//! and the guard killed with SIGKILL: its watchdog stops the command within the grace.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use support::id::{self, SpelledNames};

use chrono::{DateTime, TimeZone, Utc};
use reaper_operator::config::Schema;
use reaper_operator::lease::LeaseStore;
use support::db::{self, Via};
use support::proxy::{FaultProxy, Mode};

const TTL: Duration = Duration::from_secs(6);
const GRACE_MS: u64 = 1000;
const POLL_MS: u64 = 200;
const MARGIN_MS: u64 = 300;

/// A running `guard` and the file its command writes to.
struct Guarded {
    child: Child,
    out: PathBuf,
    dir: PathBuf,
}

impl Guarded {
    fn start(url: &str, schema: &Schema, lease: &str, cluster: &str) -> Self {
        // Ignores SIGTERM (records it), acts every 50 ms.
        let script = r#"echo "$REAPER_LEASE_NAME $REAPER_LEASE_EPOCH $REAPER_HOLDER" > "$OUT.env"
trap 'echo TERM >> "$OUT.signals"' TERM
while :; do date +%s%N >> "$OUT"; sleep 0.05; done"#;
        Self::start_script(url, schema, lease, cluster, script)
    }

    /// [`Guarded::start`] for east on the test database, once its command acts.
    async fn running_for_east(schema: &Schema, lease: &str) -> Self {
        let guarded = Self::start(&db::direct_url(), schema, lease, "east");
        guarded.wait_running().await;
        guarded
    }

    /// The guard running `sh -c script`, with `$OUT` the file it writes to.
    fn start_script(url: &str, schema: &Schema, lease: &str, cluster: &str, script: &str) -> Self {
        let dir = empty_dir(&format!("test-{}", lease.replace('.', "-")));
        let out = dir.join("ticks");
        let log = std::fs::File::create(dir.join("guard.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_reaper-operator"))
            .arg("guard")
            .args(["--lease", lease, "--cluster-name", cluster])
            .args(["--grace-seconds", &format!("{}", GRACE_MS as f64 / 1000.0)])
            .args(["--poll-interval-ms", &POLL_MS.to_string()])
            .args(["--margin-ms", &MARGIN_MS.to_string()])
            .args(["--", "sh", "-c", script])
            .env("DATABASE_URL", url)
            .env("REAPER_DB_SCHEMA", schema.as_str())
            .env("OUT", &out)
            .env("RUST_LOG", "info")
            .env_remove("REAPER_LISTEN_DATABASE_URL")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start reaper-operator guard");
        Self { child, out, dir }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("guard.log")).unwrap_or_default()
    }

    /// Every instant the command acted.
    fn ticks(&self) -> Vec<DateTime<Utc>> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse::<i64>().ok())
            .map(|ns| Utc.timestamp_nanos(ns))
            .collect()
    }

    fn last_tick(&self) -> DateTime<Utc> {
        *self.ticks().last().expect("the command acted")
    }

    fn signals(&self) -> String {
        std::fs::read_to_string(path_with(&self.out, ".signals")).unwrap_or_default()
    }

    fn env_line(&self) -> String {
        std::fs::read_to_string(path_with(&self.out, ".env")).unwrap_or_default()
    }

    async fn wait_running(&self) {
        let started = Instant::now();
        while self.ticks().len() < 3 {
            assert!(
                started.elapsed() < Duration::from_secs(15),
                "the command did not start; guard log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn wait_exit(&mut self, timeout: Duration) -> i32 {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code().unwrap_or(-1);
            }
            assert!(
                started.elapsed() < timeout,
                "guard did not exit within {timeout:?}; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the guard to exit and checks that it exited 3: it stopped the command.
    #[track_caller]
    fn assert_exits_3(&mut self, timeout: Duration) {
        let code = self.wait_exit(timeout);
        assert_eq!(code, 3, "exit code; log:\n{}", self.log());
    }

    /// Waits for the guard to exit and checks that it refused to run the command (exit 2)
    /// for `reason`, named in its log, and never started it.
    #[track_caller]
    fn assert_refuses(&mut self, timeout: Duration, reason: &str) {
        let code = self.wait_exit(timeout);
        assert_eq!(code, 2, "log:\n{}", self.log());
        self.assert_log_names(reason);
        assert!(self.ticks().is_empty(), "the command ran");
    }

    #[track_caller]
    fn assert_log_names(&self, text: &str) {
        assert!(self.log().contains(text), "log:\n{}", self.log());
    }

    fn signal(&self, signal: &str) {
        let ok = Command::new("kill")
            .args([format!("-{signal}"), self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{signal}");
    }

    /// The command has stopped acting: no tick for a while.
    async fn assert_stopped(&self) {
        let before = self.ticks().len();
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(
            self.ticks().len(),
            before,
            "the command still acts; log:\n{}",
            self.log()
        );
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-CONT", &self.child.id().to_string()])
            .stderr(Stdio::null())
            .status();
        // kill -9 of the guard: its watchdog sees stdin close and stops the command.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn path_with(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// Renews `holder`'s lease every second until the returned sender is dropped or fires.
fn keep_renewing(
    store: LeaseStore,
    name: String,
    holder: &'static str,
    epoch: i64,
) -> tokio::sync::oneshot::Sender<()> {
    let (tx, mut rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = &mut rx => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            let _ = store
                .renew(&id::lease(&name), &id::holder(holder), epoch)
                .await;
        }
    });
    tx
}

/// east/op-1 stops renewing and releases its lease; west/op-1 takes it at once.
/// Returns the release and west's lease.
async fn hand_over_to_west(
    store: &LeaseStore,
    name: &str,
    held: &reaper_operator::lease::Lease,
    renewing: tokio::sync::oneshot::Sender<()>,
) -> (reaper_operator::lease::Lease, reaper_operator::lease::Lease) {
    drop(renewing);
    let released = store
        .try_release(name, "east/op-1", held.epoch)
        .await
        .unwrap();
    let west = store.try_acquire(name, "west/op-1", TTL).await.unwrap();
    (released, west)
}

/// [`hand_over_to_west`], after which the guard must exit 3 within 10 s, and `actor`
/// must have stopped acting by the guard's next read after the release, plus the grace
/// and slack for scheduling. Returns the release and west's lease.
async fn hand_over_to_west_and_see_the_guard_stop(
    guarded: &mut Guarded,
    store: &LeaseStore,
    (name, held): (&str, &reaper_operator::lease::Lease),
    renewing: tokio::sync::oneshot::Sender<()>,
    actor: &str,
) -> (reaper_operator::lease::Lease, reaper_operator::lease::Lease) {
    let (released, west) = hand_over_to_west(store, name, held, renewing).await;
    guarded.assert_exits_3(Duration::from_secs(10));
    guarded.assert_stopped().await;
    let bound =
        released.observed_at + chrono::Duration::milliseconds((POLL_MS + GRACE_MS + 500) as i64);
    assert!(
        guarded.last_tick() <= bound,
        "{actor} acted until {}, more than a poll + the grace after the release ({})",
        guarded.last_tick(),
        released.observed_at
    );
    (released, west)
}

/// An empty directory of this test process, named `guard-<name>-<pid>` (what an earlier
/// run left there is removed).
fn empty_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("guard-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A fresh schema whose lease `name` is held, and renewed every second, by east/op-1.
async fn held_by_east(
    name: &str,
) -> (
    LeaseStore,
    Schema,
    reaper_operator::lease::Lease,
    tokio::sync::oneshot::Sender<()>,
) {
    let (store, schema) = db::fresh_schema(Via::Direct).await;
    let held = store.try_acquire(name, "east/op-1", TTL).await.unwrap();
    let renewing = keep_renewing(store.clone(), name.into(), "east/op-1", held.epoch);
    (store, schema, held, renewing)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guard_stops_the_command_when_the_lease_moves_to_another_cluster() {
    let name = "guard.moves";
    let (store, schema, held, renewing) = held_by_east(name).await;
    let mut guarded = Guarded::running_for_east(&schema, name).await;
    assert_eq!(
        guarded.env_line().trim(),
        format!("{name} {} east/op-1", held.epoch),
        "the fencing token is exported to the command"
    );

    // The release already stops it: its holder handed over on purpose.
    let (released, west) = hand_over_to_west_and_see_the_guard_stop(
        &mut guarded,
        &store,
        (name, &held),
        renewing,
        "the command",
    )
    .await;
    assert!(west.acquired_at >= released.observed_at);
    assert!(
        guarded.signals().contains("TERM"),
        "SIGTERM came before SIGKILL"
    );
    assert!(
        // The release, or west's acquisition if the guard's read came after it.
        guarded.log().contains("the lease was released at epoch")
            || guarded.log().contains("held by west/op-1"),
        "the reason is named:\n{}",
        guarded.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guard_stops_the_command_before_expiry_when_the_database_is_unreachable() {
    let name = "guard.cut";
    let (store, schema, _held, _renewing) = held_by_east(name).await;
    let direct = db::direct_url();
    let upstream = direct
        .rsplit_once('@')
        .and_then(|(_, rest)| rest.split('/').next())
        .unwrap()
        .to_owned();
    let proxy = FaultProxy::start(upstream).await;
    let mut guarded = Guarded::start(&proxy.url_for(&direct), &schema, name, "east");
    guarded.wait_running().await;

    // What the guard can have seen at most: the row as of the cut.
    let at_cut = store.row(name).await.unwrap();
    proxy.set(Mode::Blackhole);
    guarded.assert_exits_3(TTL + Duration::from_secs(4));
    guarded.assert_stopped().await;
    assert!(
        guarded.last_tick() < at_cut.expires_at,
        "the command acted at {} although the lease it could confirm expired at {}",
        guarded.last_tick(),
        at_cut.expires_at
    );
    assert!(
        guarded.signals().contains("TERM"),
        "SIGTERM came before SIGKILL"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_guard_still_stops_the_command_before_the_lease_expires() {
    let name = "guard.frozen";
    let (store, schema, _held, renewing) = held_by_east(name).await;
    let mut guarded = Guarded::running_for_east(&schema, name).await;

    // The whole cluster freezes: its operator stops renewing, the guard is stopped.
    drop(renewing);
    guarded.signal("STOP");
    let last = store.row(name).await.unwrap();
    tokio::time::sleep(TTL + Duration::from_millis(500)).await;
    let west = store.try_acquire(name, "west/op-1", TTL).await;
    let west = west.expect("the lease expired and another cluster took it");
    assert!(
        guarded.last_tick() < last.expires_at,
        "the command acted at {} after the lease expired at {}",
        guarded.last_tick(),
        last.expires_at
    );
    assert!(guarded.last_tick() < west.acquired_at);
    guarded.assert_stopped().await;

    guarded.signal("CONT");
    guarded.assert_exits_3(Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guard_waits_for_the_lease_and_refuses_a_ttl_too_short_for_its_grace() {
    let (store, schema) = db::fresh_schema(Via::Direct).await;
    let name = "guard.short";
    // Held by another cluster: the command does not start.
    let west = store.try_acquire(name, "west/op-1", TTL).await.unwrap();
    let mut guarded = Guarded::start(&db::direct_url(), &schema, name, "east");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        guarded.ticks().is_empty(),
        "the command started while another cluster holds the lease"
    );
    assert!(guarded.child.try_wait().unwrap().is_none());
    // Now this cluster holds it, with a ttl that leaves no room for the grace.
    store.try_release(name, "west/op-1", west.epoch).await;
    store
        .try_acquire(name, "east/op-1", Duration::from_secs(3))
        .await
        .unwrap();
    guarded.assert_refuses(Duration::from_secs(10), "is too short");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_guard_stops_the_command_through_its_watchdog() {
    let name = "guard.killed";
    let (_store, schema, _held, _renewing) = held_by_east(name).await;
    let mut guarded = Guarded::running_for_east(&schema, name).await;

    guarded.signal("KILL");
    let killed_at = Utc::now();
    guarded.wait_exit(Duration::from_secs(2));
    // The lease is still held and renewed: only the watchdog, seeing the guard's pipe
    // close, can stop the command (SIGTERM, then SIGKILL after the grace).
    tokio::time::sleep(Duration::from_millis(GRACE_MS + 700)).await;
    guarded.assert_stopped().await;
    assert!(
        guarded.last_tick() <= killed_at + chrono::Duration::milliseconds((GRACE_MS + 500) as i64),
        "the command acted until {} after its guard was killed at {killed_at}",
        guarded.last_tick()
    );
    assert!(guarded.signals().contains("TERM"), "SIGTERM came first");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_starts_only_once_its_watchdog_runs() {
    let name = "guard.gated";
    let (_store, schema, _held, _renewing) = held_by_east(name).await;
    // The command's first act: look for the watchdog of its own process group ($$ is
    // the group leader, the process the guard started).
    let script = r#"pgrep -f -- "guard-watchdog --pgid $$ " > "$OUT.watchdog" || echo none > "$OUT.watchdog"
while :; do date +%s%N >> "$OUT"; sleep 0.05; done"#;
    let guarded = Guarded::start_script(&db::direct_url(), &schema, name, "east", script);
    guarded.wait_running().await;
    let seen = std::fs::read_to_string(path_with(&guarded.out, ".watchdog")).unwrap();
    assert!(
        seen.trim().parse::<u32>().is_ok(),
        "no watchdog when the command started: {seen:?}; log:\n{}",
        guarded.log()
    );
}

#[test]
fn a_gate_the_guard_never_opened_does_not_start_the_command() {
    let dir = empty_dir("gate");
    let marker = dir.join("ran");
    let gate = |stdin: Stdio| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_reaper-operator"))
            .args(["guard-exec", "--gate-fd", "0", "--", "touch"])
            .arg(&marker)
            .stdin(stdin)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        (child.stdin.take(), child)
    };
    // The guard gone (end of file) before it opened the gate.
    let (_, closed) = gate(Stdio::null());
    let out = closed.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not starting it"));
    assert!(!marker.exists(), "the command ran behind a closed gate");
    // Opened: the gate becomes the command.
    let (stdin, opened) = gate(Stdio::piped());
    std::io::Write::write_all(&mut stdin.unwrap(), b"go\n").unwrap();
    assert!(opened.wait_with_output().unwrap().status.success());
    assert!(
        marker.exists(),
        "the command did not run behind an open gate"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_table_the_guard_cannot_read_stops_it_with_the_reason() {
    // Never migrated: the tables are missing (a wrong schema setting).
    let missing = db::unique_schema("guard_missing");
    let mut guarded = Guarded::start(&db::direct_url(), &missing, "guard.missing", "east");
    guarded.assert_refuses(Duration::from_secs(10), "reaper-operator migrate");

    // A role that may not read the lease tables.
    let (_store, schema) = db::fresh_schema(Via::Direct).await;
    let role = format!("guard_no_read_{}", std::process::id());
    db::exec(&format!("CREATE ROLE {role} LOGIN PASSWORD 'no-read'")).await;
    let mut url = url::Url::parse(&db::direct_url()).unwrap();
    url.set_username(&role).unwrap();
    url.set_password(Some("no-read")).unwrap();
    let mut guarded = Guarded::start(url.as_str(), &schema, "guard.denied", "east");
    guarded.assert_refuses(Duration::from_secs(10), "permission denied");
}

#[test]
fn install_guard_replaces_a_busy_copy_whole() {
    use std::os::unix::fs::PermissionsExt;
    let dir = empty_dir("install");
    let target = dir.join("guard");
    // A running program at the destination: writing into it fails (text file busy).
    std::fs::copy("/bin/sleep", &target).unwrap();
    let mut busy = Command::new(&target).arg("30").spawn().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_reaper-operator"))
        .arg("install-guard")
        .arg(&target)
        .output()
        .unwrap();
    let _ = busy.kill();
    let _ = busy.wait();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mode = std::fs::metadata(&target).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o755);
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n != "guard")
        .collect();
    assert!(leftovers.is_empty(), "left behind: {leftovers:?}");
    let help = Command::new(&target).arg("--help").output().unwrap();
    assert!(String::from_utf8_lossy(&help.stdout).contains("--lease"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_watchdog_stops_the_command() {
    let name = "guard.wdstop";
    let (_store, schema, _held, _renewing) = held_by_east(name).await;
    let mut guarded = Guarded::running_for_east(&schema, name).await;
    let watchdog = Command::new("pgrep")
        .args([
            "-P",
            &guarded.child.id().to_string(),
            "-f",
            "guard-watchdog",
        ])
        .output()
        .unwrap();
    let watchdog = String::from_utf8_lossy(&watchdog.stdout).trim().to_string();
    assert!(watchdog.parse::<u32>().is_ok(), "no watchdog: {watchdog:?}");
    // The lease is held and renewed: only the watchdog's silence can stop the command.
    let ok = Command::new("kill")
        .args(["-STOP", &watchdog])
        .status()
        .unwrap();
    assert!(ok.success());
    let stopped_at = Utc::now();
    guarded.assert_exits_3(Duration::from_secs(10));
    guarded.assert_log_names("has not answered");
    guarded.assert_stopped().await;
    // The answer limit (2 s), a poll, the grace.
    let bound =
        stopped_at + chrono::Duration::milliseconds((2000 + POLL_MS + GRACE_MS + 700) as i64);
    assert!(
        guarded.last_tick() <= bound,
        "the command acted until {}, watchdog stopped at {stopped_at}",
        guarded.last_tick()
    );
    assert!(
        !Path::new(&format!("/proc/{watchdog}")).exists(),
        "the stopped watchdog was left behind"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_that_left_the_command_group_is_stopped_too() {
    let name = "guard.setpgid";
    let (store, schema, held, renewing) = held_by_east(name).await;
    // A background process moves to a process group of its own (as `timeout` and
    // job-control shells do) and keeps acting.
    let script = r#"python3 -c '
import os, sys, time
os.setpgid(0, 0)
while True:
    with open(os.environ["OUT"], "a") as f:
        f.write("%d\n" % time.time_ns())
    time.sleep(0.05)
' &
wait"#;
    let mut guarded = Guarded::start_script(&db::direct_url(), &schema, name, "east", script);
    guarded.wait_running().await;

    hand_over_to_west_and_see_the_guard_stop(
        &mut guarded,
        &store,
        (name, &held),
        renewing,
        "the process outside the command's group",
    )
    .await;
}
