//! `failover --mode dead-cluster`: the leading cluster dies whole.
//!
//! Two replicas per cluster. A trial sends SIGKILL, in one `kill` call, to both replicas of
//! the cluster that holds the lease and to its kube-apiserver. Its etcd,
//! kube-controller-manager, kube-scheduler and kwok keep running: every one of them acts
//! only through that apiserver, so with it gone the cluster is as unreachable and as frozen
//! as if they had died too, while its pod object (and, on a real node, its container) stays
//! as it was, Running, with nobody left to stop it: the case a takeover must be careful
//! about. Keeping etcd also lets the same apiserver come back with the cluster's state.
//!
//! Measured from the kill: the other cluster's acquire row, its Deployment at
//! `spec.replicas` 1 and its pod Ready. The other cluster may scale up only once the dead
//! cluster's last workload report is stale (reported_at + its stale_after, read from the
//! database after the kill, so the bound is exact for each trial) and it has held the lease
//! for two of that report's refresh periods (`src/reaper/decide.rs`, `handover_gate`).
//!
//! Then the apiserver is started again with its own command line (read from /proc before
//! the kill), two new replicas join the dead cluster, and once the system is stable (the
//! returned cluster scaled to 0 and Standby) the next trial kills the other cluster.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::fs::OpenOptions;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use chrono::{DateTime, Utc};
use sqlx::{AssertSqlSafe, Row};

use super::FailoverArgs;
use super::deployments::Scale;
use super::markdown::Table;
use super::operator::with_logs;
use super::report::{RunInfo, Stats, fmt_dur, section_head, since, write_stats_table};
use super::side::{Bench, Clusters, FAILOVER_NS, ScaleUp, WORKLOAD, sleep_random_phase};
use super::support::cluster::{TestCluster, wait_until};
use super::support::fixtures::live_pods;

const REPLICAS_PER_CLUSTER: usize = 2;

pub struct DeadTrial {
    n: usize,
    from: &'static str,
    to: String,
    /// The dead holder's lease expiry (its last renewed_at + ttl).
    expired: Duration,
    /// The dead cluster's last report (pods running).
    report: LastReport,
    lease: Duration,
    up: ScaleUp,
    /// From starting the apiserver again to its answering.
    apiserver_back: Duration,
    /// Pods of the dead cluster's Deployment when its apiserver answered again (nobody
    /// was there to stop its pod: 1).
    pods_on_return: usize,
}

/// The dead cluster's last workload report, read after the kill.
#[derive(Clone, Copy)]
struct LastReport {
    /// When it becomes stale: reported_at + stale_after, both from its row.
    stale: Duration,
    /// Its own bound and refresh period.
    stale_after: Duration,
    refresh: Duration,
}

impl DeadTrial {
    /// When the other cluster may scale up at the earliest: the report is stale and the
    /// lease has been held for two of the report's refresh periods.
    fn gate(&self) -> Duration {
        self.report.stale.max(self.lease + self.report.refresh * 2)
    }

    fn line(&self) -> String {
        format!(
            "trial {:>3}: cluster {} dead -> {}: lease expired {}, report stale {} \
             (stale_after {}), gate open {}, lease taken {}, {}; apiserver back in {} with {} \
             pod(s) of the Deployment",
            self.n,
            self.from,
            self.to,
            fmt_dur(self.expired),
            fmt_dur(self.report.stale),
            fmt_dur(self.report.stale_after),
            fmt_dur(self.gate()),
            fmt_dur(self.lease),
            self.up.line(),
            fmt_dur(self.apiserver_back),
            self.pods_on_return
        )
    }
}

/// A cluster's kube-apiserver as `tests/cluster/up.sh` started it.
struct Apiserver {
    pid: u32,
    argv: Vec<OsString>,
    pidfile: PathBuf,
    log: PathBuf,
}

impl Apiserver {
    fn of(test: &TestCluster) -> Result<Self> {
        let state = test
            .kubeconfig()
            .parent()
            .ok_or_else(|| anyhow!("no state directory"))?
            .to_owned();
        let pidfile = state.join("pids/kube-apiserver.pid");
        let pid: u32 = std::fs::read_to_string(&pidfile)
            .with_context(|| format!("read {}", pidfile.display()))?
            .trim()
            .parse()
            .with_context(|| format!("parse {}", pidfile.display()))?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
            .with_context(|| format!("kube-apiserver (pid {pid}) is not running"))?;
        let argv: Vec<OsString> = cmdline
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| OsString::from(String::from_utf8_lossy(a).into_owned()))
            .collect();
        let state_s = state.to_string_lossy().into_owned();
        ensure!(
            argv.first()
                .is_some_and(|a| a.to_string_lossy().ends_with("kube-apiserver"))
                && argv.iter().any(|a| a.to_string_lossy().contains(&state_s)),
            "pid {pid} of {} is not this cluster's kube-apiserver",
            pidfile.display()
        );
        Ok(Self {
            pid,
            argv,
            pidfile,
            log: state.join("logs/kube-apiserver.log"),
        })
    }

    /// Starts it again with the same command line, its log appended to, its pid recorded
    /// where `tests/cluster/down.sh` looks for it.
    fn restart(&self) -> Result<Child> {
        let out = OpenOptions::new()
            .append(true)
            .open(&self.log)
            .with_context(|| format!("open {}", self.log.display()))?;
        let child = Command::new(&self.argv[0])
            .args(&self.argv[1..])
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("start kube-apiserver again")?;
        std::fs::write(&self.pidfile, format!("{}\n", child.id()))
            .with_context(|| format!("write {}", self.pidfile.display()))?;
        Ok(child)
    }
}

/// SIGKILL to every pid in one `kill` call (one process, the signals microseconds
/// apart); returns the time just before.
fn kill_all(pids: &[u32]) -> Result<DateTime<Utc>> {
    let mut cmd = Command::new("kill");
    cmd.arg("-KILL");
    for pid in pids {
        cmd.arg(pid.to_string());
    }
    let at = Utc::now();
    let status = cmd.status().context("run kill -KILL")?;
    ensure!(status.success(), "kill -KILL {pids:?} failed");
    Ok(at)
}

pub async fn run(bench: Bench<'_>) -> Result<Vec<DeadTrial>> {
    let lease_name = format!("{FAILOVER_NS}.dead-{}", std::process::id());
    let clusters = ["bench-dc-a", "bench-dc-b"];
    let c = Clusters::start(bench, &lease_name, clusters, REPLICAS_PER_CLUSTER).await?;
    eprintln!(
        "stable: cluster {} leads ({} replicas per cluster); {} trials of --mode dead-cluster",
        c.sides[c.leader].name, REPLICAS_PER_CLUSTER, bench.args.trials
    );
    let mut run = DeadRun {
        c,
        apiservers: Vec::new(),
    };
    let mut trials = Vec::new();
    for n in 1..=bench.args.trials {
        let apiserver = Apiserver::of(&run.c.sides[run.c.leader].test)?;
        let result = run.kill_leading(n, &apiserver).await;
        let mut trial =
            with_logs(result, &run.c.all_ops()).with_context(|| format!("trial {n}"))?;
        let restarting = run.bring_back(&apiserver, &mut trial).await?;
        println!("{}", trial.line());
        trials.push(trial);
        run.rejoin(n, restarting).await?;
    }
    run.c.check_running()?;
    for mut child in run.apiservers {
        // Still running: down.sh stops it; reaped here if it already exited.
        let _ = child.try_wait();
    }
    Ok(trials)
}

/// A run's clusters, and the apiservers it started again.
struct DeadRun<'a> {
    c: Clusters<'a>,
    /// Started again after a trial; down.sh stops them (their pids are in the pid files).
    apiservers: Vec<Child>,
}

impl DeadRun<'_> {
    /// Trial `n`: kills the leading cluster's replicas and `apiserver`, and measures the
    /// other cluster's takeover.
    async fn kill_leading(&mut self, n: usize, apiserver: &Apiserver) -> Result<DeadTrial> {
        let (leader, follower) = (self.c.leader, self.c.follower());
        let dead_holders = self.c.holders(leader);
        sleep_random_phase(self.c.bench.args.timing).await;
        let last_id = self.c.ctx.last_event_id().await?;
        ensure!(
            self.c.sides[follower].watch.latest()
                == Some(Scale {
                    replicas: 0,
                    ready: 0
                }),
            "the standby cluster's Deployment is not at 0 before the kill: {:?}",
            self.c.sides[follower].watch.latest()
        );

        let mut pids: Vec<u32> = self.c.ops[leader].iter().map(|op| op.pid()).collect();
        pids.push(apiserver.pid);
        let t0 = kill_all(&pids)?;
        for op in &mut self.c.ops[leader] {
            op.wait_exit(Duration::from_secs(10)).await?;
        }
        // Nobody of the dead cluster writes any more: its lease expiry and its last
        // report are final.
        let expired = self.c.ctx.expiry_after(t0, &dead_holders).await?;
        let report = self.last_report(t0).await?;
        let timeout = report.stale_after
            + report.refresh * 2
            + Duration::from_secs(self.c.bench.args.timing.ttl + 60);
        let (taken_at, to) = self.wait_takeover(last_id, timeout).await?;
        let up = self.c.sides[follower].wait_scale_up(t0, timeout).await?;
        Ok(DeadTrial {
            n,
            from: self.c.sides[leader].name,
            to,
            expired,
            report,
            lease: since(t0, taken_at, "takeover")?,
            up,
            apiserver_back: Duration::ZERO,
            pods_on_return: 0,
        })
    }

    /// The dead (leading) cluster's last workload report, which must show its pod running.
    async fn last_report(&self, t0: DateTime<Utc>) -> Result<LastReport> {
        let dead_name = self.c.sides[self.c.leader].name;
        let report = sqlx::query(AssertSqlSafe(format!(
            "SELECT reported_at + stale_after_ms * interval '1 millisecond' AS stale_at, \
             stale_after_ms, refresh_ms, running_pods FROM {} \
             WHERE name = $1 AND cluster = $2",
            self.c.ctx.workload
        )))
        .bind(self.c.ctx.lease_name)
        .bind(dead_name)
        .fetch_optional(self.c.ctx.store.pool())
        .await?
        .ok_or_else(|| anyhow!("cluster {dead_name} has no workload report"))?;
        let running: i32 = report.try_get("running_pods")?;
        ensure!(
            running >= 1,
            "the dead cluster's last report shows {running} running pods, not its pod"
        );
        let stale_at: DateTime<Utc> = report.try_get("stale_at")?;
        let ms = |col: &str| -> Result<Duration> {
            Ok(Duration::from_millis(
                report.try_get::<i64, _>(col)?.max(0) as u64
            ))
        };
        Ok(LastReport {
            stale: since(t0, stale_at, "report stale")?,
            stale_after: ms("stale_after_ms")?,
            refresh: ms("refresh_ms")?,
        })
    }

    /// Waits for the other cluster's acquire row after `last_id`: when, and by whom.
    async fn wait_takeover(
        &self,
        last_id: i64,
        timeout: Duration,
    ) -> Result<(DateTime<Utc>, String)> {
        let live_holders = self.c.holders(self.c.follower());
        wait_until("the takeover row in lease_event", timeout, || async {
            // Nothing but the other cluster's acquire may follow the kill.
            let Some(e) = self.c.ctx.events_after(last_id).await?.into_iter().next() else {
                return Ok(None);
            };
            match e.kind.as_str() {
                "acquire" | "takeover" if live_holders.contains(&e.holder) => {
                    Ok(Some((e.at, e.holder)))
                }
                _ => bail!(
                    "unexpected lease_event {} by {} after the kill",
                    e.kind,
                    e.holder
                ),
            }
        })
        .await
    }

    /// The dead cluster comes back: its apiserver starts again with the same command line;
    /// records in `trial` how long it took to answer and the pods of its Deployment then.
    /// Returns when the restart began.
    async fn bring_back(
        &mut self,
        apiserver: &Apiserver,
        trial: &mut DeadTrial,
    ) -> Result<Instant> {
        let restarting = Instant::now();
        self.apiservers.push(apiserver.restart()?);
        let side = &self.c.sides[self.c.leader];
        let client = side.client.clone();
        wait_until(
            "the restarted kube-apiserver to answer",
            Duration::from_secs(120),
            || async {
                let up = client.apiserver_version().await.is_ok()
                    && side.scale().await.is_ok()
                    && side.phase().await.is_ok();
                Ok(up.then_some(()))
            },
        )
        .await
        .with_context(|| format!("restart the kube-apiserver of cluster {}", side.name))?;
        trial.apiserver_back = restarting.elapsed();
        trial.pods_on_return = live_pods(&client, FAILOVER_NS, WORKLOAD).await?;
        Ok(restarting)
    }

    /// Two new replicas join the returned cluster, which becomes the standby: the roles
    /// swap. Waits until the system is stable again.
    async fn rejoin(&mut self, n: usize, restarting: Instant) -> Result<()> {
        let dead = self.c.leader;
        self.c.sides[dead].restart_watches();
        let restarted = Utc::now();
        self.c.restart_replicas(dead, REPLICAS_PER_CLUSTER)?;
        self.c.leader = 1 - dead;
        self.c
            .wait_stable(restarted)
            .await
            .with_context(|| format!("after trial {n}"))?;
        eprintln!(
            "  cluster {} back (apiserver and {REPLICAS_PER_CLUSTER} new replicas) as the \
             standby; stable again after {:.1?}",
            self.c.sides[dead].name,
            restarting.elapsed()
        );
        tokio::time::sleep(Duration::from_secs(self.c.bench.args.timing.retry)).await;
        Ok(())
    }
}

pub fn render(run: &RunInfo, trials: &[DeadTrial]) -> (String, String) {
    let args = run.args;
    let grace = Some(args.grace_seconds);
    let (heading, mut o) = section_head(run, grace, trials.len());
    let w = &mut o;
    let _ = writeln!(
        w,
        "- **Set-up:** {REPLICAS_PER_CLUSTER} replicas per cluster; a trial kills both replicas \
         of the leading cluster and its kube-apiserver with one `kill -KILL` (its etcd, \
         controller-manager, scheduler and kwok stay up but can do nothing without the \
         apiserver; its pod object stays Running), then starts that apiserver again with the \
         same command line and two new replicas, and waits until that cluster is the standby."
    );
    let _ = writeln!(w);

    write_summary(w, trials);
    write_expected(w, args, trials);
    write_every_trial(w, trials);
    (heading, o)
}

/// Median, p99 and spread of each signal over the trials.
fn write_summary(w: &mut String, trials: &[DeadTrial]) {
    let col = |f: fn(&DeadTrial) -> Duration| Stats::of(trials.iter().map(f).collect());
    let mut rows: Vec<(&str, Option<Stats>)> = vec![
        (
            "lease expired (dead holder's last `renewed_at` + ttl)",
            col(|t| t.expired),
        ),
        (
            "**lease taken** (other cluster's acquire row)",
            col(|t| t.lease),
        ),
        (
            "dead cluster's report stale (its last `reported_at` + `stale_after`)",
            col(|t| t.report.stale),
        ),
        (
            "gate open: max(report stale, lease taken + 2 × refresh)",
            col(DeadTrial::gate),
        ),
    ];
    let ups: Vec<ScaleUp> = trials.iter().map(|t| t.up).collect();
    rows.extend(ScaleUp::summary_rows(&ups));
    rows.push((
        "(dead cluster's apiserver answering again, from its restart)",
        col(|t| t.apiserver_back),
    ));
    write_stats_table(w, "the kill", &rows);
    let _ = writeln!(w);
}

/// The bound the figures should keep, from the timings and the reports' own bounds.
fn write_expected(w: &mut String, args: &FailoverArgs, trials: &[DeadTrial]) {
    let t = args.timing;
    // src/reaper/observe.rs (Workload::report_timing) and src/reaper/reconcile.rs
    // (steady_requeue) as of this bench: refresh = max(retry, ttl / 4).
    let refresh = Duration::from_secs(t.retry).max(Duration::from_secs(t.ttl) / 4);
    let (ttl, retry) = (Duration::from_secs(t.ttl), Duration::from_secs(t.retry));
    let grace = Duration::from_secs(args.grace_seconds.max(0) as u64);
    let stale_after = refresh + ttl + retry + grace;
    let recorded: Vec<Duration> = trials.iter().map(|t| t.report.stale_after).collect();
    let _ = writeln!(
        w,
        "Bound: a report stays credible for refresh + ttl + retry + grace = {} + {} + {} + {} \
         = **{}** after it was written (`Workload::report_timing`; refresh = max(retry, ttl ÷ 4); \
         the rows said {}), and the dead cluster wrote its last one at most a refresh before \
         the kill, so its report goes stale **{} to {}** after the kill. The other cluster takes \
         the lease at its expiry ({} to {} after the kill, plus up to a retry period for its \
         tick), but scales up only once the report is stale and it has held the lease for two \
         refresh periods ({}): **Deployment scaled** is expected at the gate plus up to 500 ms \
         (a leader waiting at the gate looks again every 500 ms), then the Deployment \
         controller and kwok start the pod. **its pods then**: the pods of the dead cluster's \
         Deployment when its apiserver answered again (1: its pod ran on, nobody stopped it).",
        fmt_dur(refresh),
        fmt_dur(ttl),
        fmt_dur(retry),
        fmt_dur(grace),
        fmt_dur(stale_after),
        if recorded.iter().all(|d| *d == stale_after) {
            "the same".to_owned()
        } else {
            recorded
                .iter()
                .map(|d| fmt_dur(*d))
                .collect::<Vec<_>>()
                .join(", ")
        },
        fmt_dur(stale_after - refresh),
        fmt_dur(stale_after),
        fmt_dur(ttl.saturating_sub(retry)),
        fmt_dur(ttl),
        fmt_dur(refresh * 2)
    );
}

/// Every trial's times, folded away.
fn write_every_trial(w: &mut String, trials: &[DeadTrial]) {
    let _ = writeln!(w);
    let _ = writeln!(w, "<details><summary>Every trial</summary>\n");
    let mut table = Table::new(
        w,
        "rlrrrrrrrrr",
        "# | dead → taken by | lease expired | lease taken | report stale | gate open | scaled | pod Ready | ready | apiserver back | its pods then",
    );
    for tr in trials {
        let mut cells = vec![tr.n.to_string(), format!("{} → {}", tr.from, tr.to)];
        let (stale, up) = (tr.report.stale, tr.up);
        let times = [
            tr.expired,
            tr.lease,
            stale,
            tr.gate(),
            up.scaled,
            up.pod_ready,
            up.ready,
        ];
        cells.extend(times.map(fmt_dur));
        cells.extend([fmt_dur(tr.apiserver_back), tr.pods_on_return.to_string()]);
        table.row(&cells);
    }
    let _ = writeln!(w, "\n</details>");
}
