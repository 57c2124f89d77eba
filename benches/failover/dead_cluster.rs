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

use crate::support::id;
use std::ffi::OsString;
use std::fmt::Write as _;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use chrono::{DateTime, Utc};
use reaper_operator::config::Schema;
use reaper_operator::lease::LeaseStore;
use sqlx::{AssertSqlSafe, Row};

use super::FailoverArgs;
use super::database::Urls;
use super::deployments::Scale;
use super::machine::Machine;
use super::operator::{Operator, with_logs};
use super::report::{Stats, fmt_dur, since, write_date_line, write_stats_table};
use super::side::{FAILOVER_NS, Side, Stability, WORKLOAD, sleep_random_phase};
use super::support::cluster::{TestCluster, wait_until};
use super::support::fixtures::live_pods;

const REPLICAS_PER_CLUSTER: usize = 2;

pub struct DeadTrial {
    n: usize,
    from: &'static str,
    to: String,
    /// The dead holder's lease expiry (its last renewed_at + ttl).
    expired: Duration,
    /// The dead cluster's last report (pods running) becomes stale: reported_at +
    /// stale_after, both from its row.
    stale: Duration,
    /// That report's own bound and refresh period.
    stale_after: Duration,
    refresh: Duration,
    lease: Duration,
    scaled: Duration,
    pod_ready: Duration,
    ready: Duration,
    /// From starting the apiserver again to its answering.
    apiserver_back: Duration,
    /// Pods of the dead cluster's Deployment when its apiserver answered again (nobody
    /// was there to stop its pod: 1).
    pods_on_return: usize,
}

impl DeadTrial {
    /// When the other cluster may scale up at the earliest: the report is stale and the
    /// lease has been held for two of the report's refresh periods.
    fn gate(&self) -> Duration {
        self.stale.max(self.lease + self.refresh * 2)
    }

    fn line(&self) -> String {
        format!(
            "trial {:>3}: cluster {} dead -> {}: lease expired {}, report stale {} \
             (stale_after {}), gate open {}, lease taken {}, Deployment scaled {}, pod Ready {}, \
             readyReplicas 1 {}; apiserver back in {} with {} pod(s) of the Deployment",
            self.n,
            self.from,
            self.to,
            fmt_dur(self.expired),
            fmt_dur(self.stale),
            fmt_dur(self.stale_after),
            fmt_dur(self.gate()),
            fmt_dur(self.lease),
            fmt_dur(self.scaled),
            fmt_dur(self.pod_ready),
            fmt_dur(self.ready),
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

fn holders(ops: &[Operator]) -> Vec<String> {
    ops.iter().map(|op| op.holder()).collect()
}

fn all_ops(ops: &[Vec<Operator>; 2]) -> Vec<&Operator> {
    ops.iter().flatten().collect()
}

pub async fn run(
    args: &FailoverArgs,
    urls: &Urls,
    schema: &Schema,
    store: &LeaseStore,
    log_dir: &Path,
) -> Result<Vec<DeadTrial>> {
    let timing = args.timing;
    let lease_name = format!("{FAILOVER_NS}.dead-{}", std::process::id());
    let ctx = Stability::new(store, schema, &lease_name, timing);
    let (events, workload) = (&ctx.events, &ctx.workload);

    let mut sides = Side::start_both(
        ["bench-dc-a", "bench-dc-b"],
        timing.lease_spec(&lease_name),
        args.grace_seconds,
    )
    .await?;
    let mut ops: [Vec<Operator>; 2] = [Vec::new(), Vec::new()];
    for _ in 0..REPLICAS_PER_CLUSTER {
        for (i, side) in sides.iter_mut().enumerate() {
            // Random phases, so the electors do not tick in step.
            sleep_random_phase(timing).await;
            ops[i].push(side.start_operator(urls, schema, log_dir)?);
        }
    }
    // Started again after a trial; down.sh stops them (their pids are in the pid files).
    let mut apiservers: Vec<Child> = Vec::new();

    let begun = Utc::now();
    let found = ctx
        .wait_first_leader(&[holders(&ops[0]), holders(&ops[1])])
        .await;
    let mut leader = with_logs(found, &all_ops(&ops))?;
    let stable = ctx
        .wait_stable_holders(
            &sides,
            &holders(&ops[leader]),
            &holders(&ops[1 - leader]),
            leader,
            begun,
        )
        .await;
    with_logs(stable, &all_ops(&ops))?;
    tokio::time::sleep(Duration::from_secs(timing.retry)).await;
    eprintln!(
        "stable: cluster {} leads ({} replicas per cluster); {} trials of --mode dead-cluster",
        sides[leader].name, REPLICAS_PER_CLUSTER, args.trials
    );

    let mut trials = Vec::new();
    for n in 1..=args.trials {
        let follower = 1 - leader;
        let (dead_holders, live_holders) = (holders(&ops[leader]), holders(&ops[follower]));
        let dead_name = sides[leader].name;
        let apiserver = Apiserver::of(&sides[leader].test)?;
        let result = async {
            sleep_random_phase(timing).await;
            let last_id = ctx.last_event_id().await?;
            ensure!(
                sides[follower].watch.latest() == Some(Scale { replicas: 0, ready: 0 }),
                "the standby cluster's Deployment is not at 0 before the kill: {:?}",
                sides[follower].watch.latest()
            );

            let mut pids: Vec<u32> = ops[leader].iter().map(|op| op.pid()).collect();
            pids.push(apiserver.pid);
            let t0 = kill_all(&pids)?;
            for op in &mut ops[leader] {
                op.wait_exit(Duration::from_secs(10)).await?;
            }
            // Nobody of the dead cluster writes any more: its lease expiry and its last
            // report are final.
            let row = store
                .get(&id::lease(&lease_name))
                .await?
                .ok_or_else(|| anyhow!("lease {lease_name} vanished"))?;
            ensure!(
                dead_holders.contains(&row.holder),
                "holder changed before the kill: {row:?}"
            );
            let expired = since(t0, row.expires_at, "expiry")?;
            let report = sqlx::query(AssertSqlSafe(format!(
                "SELECT reported_at + stale_after_ms * interval '1 millisecond' AS stale_at, \
                 stale_after_ms, refresh_ms, running_pods FROM {workload} \
                 WHERE name = $1 AND cluster = $2"
            )))
            .bind(&lease_name)
            .bind(dead_name)
            .fetch_optional(store.pool())
            .await?
            .ok_or_else(|| anyhow!("cluster {dead_name} has no workload report"))?;
            let running: i32 = report.try_get("running_pods")?;
            ensure!(
                running >= 1,
                "the dead cluster's last report shows {running} running pods, not its pod"
            );
            let stale_at: DateTime<Utc> = report.try_get("stale_at")?;
            let ms = |col: &str| -> Result<Duration> {
                Ok(Duration::from_millis(report.try_get::<i64, _>(col)?.max(0) as u64))
            };
            let (stale_after, refresh) = (ms("stale_after_ms")?, ms("refresh_ms")?);

            let timeout = stale_after + refresh * 2 + Duration::from_secs(timing.ttl + 60);
            let taken = wait_until("the takeover row in lease_event", timeout, || async {
                let rows = sqlx::query(AssertSqlSafe(format!(
                    "SELECT kind, holder, at FROM {events} WHERE name = $1 AND id > $2 ORDER BY id LIMIT 1"
                )))
                .bind(&lease_name)
                .bind(last_id)
                .fetch_optional(store.pool())
                .await?;
                // Nothing but the other cluster's acquire may follow the kill.
                let Some(row) = rows else { return Ok(None) };
                let kind: String = row.try_get("kind")?;
                let holder: String = row.try_get("holder")?;
                let at: DateTime<Utc> = row.try_get("at")?;
                match kind.as_str() {
                    "acquire" | "takeover" if live_holders.contains(&holder) => {
                        Ok(Some((at, holder)))
                    }
                    _ => bail!("unexpected lease_event {kind} by {holder} after the kill"),
                }
            })
            .await?;
            let (taken_at, taken_by) = taken;
            let other = &sides[follower];
            let scaled_at = other
                .watch
                .wait_first_after(t0, |s| s.replicas >= 1, timeout, "the other Deployment to scale up")
                .await?;
            let pod_ready_at = other
                .pods
                .wait_first_after(t0, |c| c.ready >= 1, timeout, "the other cluster's pod to be Ready")
                .await?;
            let ready_at = other
                .watch
                .wait_first_after(t0, |s| s.ready >= 1, timeout, "the other Deployment's readyReplicas")
                .await?;
            anyhow::Ok(DeadTrial {
                n,
                from: dead_name,
                to: taken_by,
                expired,
                stale: since(t0, stale_at, "report stale")?,
                stale_after,
                refresh,
                lease: since(t0, taken_at, "takeover")?,
                scaled: since(t0, scaled_at, "scale-up")?,
                pod_ready: since(t0, pod_ready_at, "pod readiness")?,
                ready: since(t0, ready_at, "readiness")?,
                apiserver_back: Duration::ZERO,
                pods_on_return: 0,
            })
        }
        .await;
        let mut trial = with_logs(result, &all_ops(&ops)).with_context(|| format!("trial {n}"))?;

        // The dead cluster comes back: the same apiserver, two new replicas (standbys).
        let restarting = Instant::now();
        apiservers.push(apiserver.restart()?);
        let client = sides[leader].client.clone();
        wait_until(
            "the restarted kube-apiserver to answer",
            Duration::from_secs(120),
            || async {
                let up = client.apiserver_version().await.is_ok()
                    && sides[leader].scale().await.is_ok()
                    && sides[leader].phase().await.is_ok();
                Ok(up.then_some(()))
            },
        )
        .await
        .with_context(|| format!("restart the kube-apiserver of cluster {dead_name}"))?;
        trial.apiserver_back = restarting.elapsed();
        trial.pods_on_return = live_pods(&client, FAILOVER_NS, WORKLOAD).await?;
        println!("{}", trial.line());
        trials.push(trial);
        sides[leader].restart_watches();
        let restarted = Utc::now();
        let mut fresh = Vec::new();
        for _ in 0..REPLICAS_PER_CLUSTER {
            fresh.push(sides[leader].start_operator(urls, schema, log_dir)?);
        }
        ops[leader] = fresh;
        leader = follower;
        let stable = ctx
            .wait_stable_holders(
                &sides,
                &holders(&ops[leader]),
                &holders(&ops[1 - leader]),
                leader,
                restarted,
            )
            .await;
        with_logs(stable, &all_ops(&ops)).with_context(|| format!("after trial {n}"))?;
        eprintln!(
            "  cluster {dead_name} back (apiserver and {REPLICAS_PER_CLUSTER} new replicas) as the \
             standby; stable again after {:.1?}",
            restarting.elapsed()
        );
        tokio::time::sleep(Duration::from_secs(timing.retry)).await;
    }
    for op in ops.iter_mut().flatten() {
        ensure!(op.running(), "{} exited during the run", op.holder());
    }
    for mut child in apiservers {
        // Still running: down.sh stops it; reaped here if it already exited.
        let _ = child.try_wait();
    }
    Ok(trials)
}

pub fn render(
    args: &FailoverArgs,
    m: &Machine,
    started: DateTime<Utc>,
    elapsed: Duration,
    trials: &[DeadTrial],
) -> (String, String) {
    let t = args.timing;
    let heading = format!(
        "## `--mode dead-cluster`, {}, grace {} s",
        t.label(),
        args.grace_seconds
    );
    let mut o = String::new();
    let w = &mut o;
    let _ = writeln!(
        w,
        "- **Command:** `cargo bench --bench failover -- failover --mode dead-cluster --trials {} {} \
         --grace-seconds {} --write`",
        args.trials,
        t.flags(),
        args.grace_seconds
    );
    write_date_line(w, started, trials.len(), elapsed);
    m.describe(w);
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
    let rows: Vec<(&str, Option<Stats>)> = vec![
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
            col(|t| t.stale),
        ),
        (
            "gate open: max(report stale, lease taken + 2 × refresh)",
            col(DeadTrial::gate),
        ),
        (
            "**Deployment scaled** (other cluster, `spec.replicas` = 1)",
            col(|t| t.scaled),
        ),
        (
            "pod Ready (the pod's condition, pod watch)",
            col(|t| t.pod_ready),
        ),
        (
            "**pod ready** (`status.readyReplicas` = 1)",
            col(|t| t.ready),
        ),
        (
            "(dead cluster's apiserver answering again, from its restart)",
            col(|t| t.apiserver_back),
        ),
    ];
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
    let recorded: Vec<Duration> = trials.iter().map(|t| t.stale_after).collect();
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
    let _ = writeln!(
        w,
        "| # | dead → taken by | lease expired | lease taken | report stale | gate open | scaled | pod Ready | ready | apiserver back | its pods then |"
    );
    let _ = writeln!(w, "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for tr in trials {
        let _ = writeln!(
            w,
            "| {} | {} → {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            tr.n,
            tr.from,
            tr.to,
            fmt_dur(tr.expired),
            fmt_dur(tr.lease),
            fmt_dur(tr.stale),
            fmt_dur(tr.gate()),
            fmt_dur(tr.scaled),
            fmt_dur(tr.pod_ready),
            fmt_dur(tr.ready),
            fmt_dur(tr.apiserver_back),
            tr.pods_on_return
        );
    }
    let _ = writeln!(w, "\n</details>");
}
