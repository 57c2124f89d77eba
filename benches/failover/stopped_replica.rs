//! `failover --mode kill9` and `--mode graceful`: the leading replica is stopped (SIGKILL
//! or SIGTERM), one replica per cluster.

use std::fmt::Write as _;
use std::slice;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use chrono::{DateTime, Utc};

use super::deployments::Scale;
use super::markdown::Table;
use super::operator::{SHUTDOWN_TIMEOUT_S, with_logs};
use super::report::{RunInfo, Stats, fmt_dur, section_head, since, write_stats_table};
use super::side::{Bench, Clusters, FAILOVER_NS, ScaleUp, Stability, sleep_random_phase};
use super::support::cluster::wait_until;
use super::{FailoverArgs, Mode};

pub struct Trial {
    n: usize,
    from: String,
    to: String,
    /// kill9: when the killed holder's lease expired (last renewed_at + ttl).
    expired: Option<Duration>,
    /// graceful: the killed holder's release row.
    released: Option<Duration>,
    /// graceful: the killed holder's side after the signal.
    old: OldSide,
    lease: Duration,
    up: ScaleUp,
}

/// graceful: when the stopped holder's Deployment was at spec.replicas 0, and when its pod
/// was gone (pod watch: deleted, not just Terminating).
#[derive(Default)]
struct OldSide {
    down: Option<Duration>,
    gone: Option<Duration>,
}

impl Trial {
    fn line(&self) -> String {
        let mut s = format!("trial {:>3}: {} -> {}:", self.n, self.from, self.to);
        if let Some(e) = self.expired {
            let _ = write!(s, " lease expired {},", fmt_dur(e));
        }
        if let Some(d) = self.old.down {
            let _ = write!(s, " old Deployment at 0 {},", fmt_dur(d));
        }
        if let Some(d) = self.old.gone {
            let _ = write!(s, " old pod gone {},", fmt_dur(d));
        }
        if let Some(r) = self.released {
            let _ = write!(s, " released {},", fmt_dur(r));
        }
        let _ = write!(
            s,
            " lease taken {}, {}",
            fmt_dur(self.lease),
            self.up.line()
        );
        s
    }
}

pub async fn run(bench: Bench<'_>) -> Result<Vec<Trial>> {
    let lease_name = format!("{FAILOVER_NS}.failover-{}", std::process::id());
    let clusters = ["bench-fo-a", "bench-fo-b"];
    let mut c = Clusters::start(bench, &lease_name, clusters, 1).await?;
    eprintln!(
        "stable: {} leads; {} trials of --mode {}",
        c.ops[c.leader][0].holder(),
        bench.args.trials,
        bench.args.mode.flag()
    );
    let mut trials = Vec::new();
    for n in 1..=bench.args.trials {
        let result = stop_leading(&mut c, n).await;
        let trial = with_logs(result, &c.all_ops()).with_context(|| format!("trial {n}"))?;
        println!("{}", trial.line());
        trials.push(trial);
        restart_stopped(&mut c, n).await?;
    }
    c.check_running()?;
    Ok(trials)
}

/// Trial `n`: stops the leading replica, and measures the other cluster's takeover.
async fn stop_leading(c: &mut Clusters<'_>, n: usize) -> Result<Trial> {
    let (leader, follower) = (c.leader, c.follower());
    let (mode, timing) = (c.bench.args.mode, c.bench.args.timing);
    // Signal at a random phase of the renew cycle.
    sleep_random_phase(timing).await;
    let last_id = c.ctx.last_event_id().await?;
    let (from, to) = (c.ops[leader][0].holder(), c.ops[follower][0].holder());
    ensure!(
        c.sides[follower].watch.latest()
            == Some(Scale {
                replicas: 0,
                ready: 0
            }),
        "the standby's Deployment is not at 0 before the signal: {:?}",
        c.sides[follower].watch.latest()
    );

    let t0 = match mode {
        Mode::Kill9 => c.ops[leader][0].kill9()?,
        Mode::Graceful => c.ops[leader][0].terminate()?,
        Mode::DeadCluster => unreachable!("dead-cluster trials run in dead_cluster.rs"),
    };
    // The killed holder cannot renew any more: its row's expiry is final.
    let expired = match mode {
        Mode::Kill9 => Some(c.ctx.expiry_after(t0, slice::from_ref(&from)).await?),
        Mode::Graceful | Mode::DeadCluster => None,
    };
    let timeout = Duration::from_secs(timing.ttl + timing.retry + SHUTDOWN_TIMEOUT_S + 30);
    let (taken_at, released_at) = wait_takeover(&c.ctx, last_id, &from, &to, timeout).await?;
    let up = c.sides[follower].wait_scale_up(t0, timeout).await?;
    let old = wait_stopped(c, t0, &from).await?;
    Ok(Trial {
        n,
        from,
        to,
        expired,
        released: released_at.map(|at| since(t0, at, "release")).transpose()?,
        old,
        lease: since(t0, taken_at, "takeover")?,
        up,
    })
}

/// Waits for `to`'s acquire row after `last_id`: when, and when `from` released the
/// lease before it (graceful). Nothing else may follow the signal.
async fn wait_takeover(
    ctx: &Stability<'_>,
    last_id: i64,
    from: &str,
    to: &str,
    timeout: Duration,
) -> Result<(DateTime<Utc>, Option<DateTime<Utc>>)> {
    wait_until("the takeover row in lease_event", timeout, || async {
        let mut released = None;
        for e in ctx.events_after(last_id).await? {
            match e.kind.as_str() {
                "release" if e.holder == from => released = Some(e.at),
                "acquire" | "takeover" if e.holder == to => {
                    return Ok(Some((e.at, released)));
                }
                _ => bail!(
                    "unexpected lease_event {} by {} after the signal",
                    e.kind,
                    e.holder
                ),
            }
        }
        Ok(None)
    })
    .await
}

/// Waits for the stopped replica `from` to exit; graceful: it must exit cleanly, and
/// its side's scale-down and pod removal after `t0` are measured.
async fn wait_stopped(c: &mut Clusters<'_>, t0: DateTime<Utc>, from: &str) -> Result<OldSide> {
    let leader = c.leader;
    match c.bench.args.mode {
        Mode::Graceful => {
            let status = c.ops[leader][0]
                .wait_exit(Duration::from_secs(SHUTDOWN_TIMEOUT_S + 15))
                .await?;
            ensure!(status.success(), "graceful exit of {from}: {status}");
            let side = &c.sides[leader];
            let down = side
                .watch
                .first_after(t0, |s| s.replicas == 0)
                .map(|at| since(t0, at, "scale-down"))
                .transpose()?;
            let gone = side
                .pods
                .first_after(t0, |c| c.live == 0)
                .map(|at| since(t0, at, "pod gone"))
                .transpose()?;
            Ok(OldSide { down, gone })
        }
        Mode::Kill9 => {
            c.ops[leader][0].wait_exit(Duration::from_secs(10)).await?;
            Ok(OldSide::default())
        }
        Mode::DeadCluster => unreachable!("dead-cluster trials run in dead_cluster.rs"),
    }
}

/// The stopped replica comes back as a standby; the roles are swapped. Waits until the
/// system is stable again.
async fn restart_stopped(c: &mut Clusters<'_>, n: usize) -> Result<()> {
    let stopped = c.leader;
    let restarted = Utc::now();
    c.restart_replicas(stopped, 1)?;
    c.leader = 1 - stopped;
    let restarting = Instant::now();
    c.wait_stable(restarted)
        .await
        .with_context(|| format!("after trial {n}"))?;
    eprintln!(
        "  restarted {} as a standby; stable again after {:.1?}",
        c.ops[stopped][0].holder(),
        restarting.elapsed()
    );
    // One more retry period, so the restarted standby's elector is ticking steadily.
    tokio::time::sleep(Duration::from_secs(c.bench.args.timing.retry)).await;
    Ok(())
}

pub fn render(run: &RunInfo, trials: &[Trial]) -> (String, String) {
    let args = run.args;
    // The pods' grace period is part of the configuration when it is not the default.
    let grace = (args.grace_seconds != 1).then_some(args.grace_seconds);
    let (heading, mut o) = section_head(run, grace, trials.len());
    let w = &mut o;
    let _ = writeln!(w);

    write_summary(w, args.mode, trials);
    write_expected(w, args);
    write_every_trial(w, args.mode, trials);
    (heading, o)
}

/// Median, p99 and spread of each signal over the trials.
fn write_summary(w: &mut String, mode: Mode, trials: &[Trial]) {
    let col = |f: fn(&Trial) -> Option<Duration>| Stats::of(trials.iter().filter_map(f).collect());
    let mut rows: Vec<(&str, Option<Stats>)> = Vec::new();
    match mode {
        Mode::Kill9 => rows.push((
            "lease expired (killed holder's last `renewed_at` + ttl)",
            col(|t| t.expired),
        )),
        Mode::Graceful | Mode::DeadCluster => {
            rows.push(("old Deployment at `spec.replicas` 0", col(|t| t.old.down)));
            rows.push((
                "old pod gone (pod watch: deleted, no longer Terminating)",
                col(|t| t.old.gone),
            ));
            rows.push(("lease released (`release` row)", col(|t| t.released)));
        }
    }
    rows.push((
        "**lease taken** (other replica's acquire row)",
        col(|t| Some(t.lease)),
    ));
    let ups: Vec<ScaleUp> = trials.iter().map(|t| t.up).collect();
    rows.extend(ScaleUp::summary_rows(&ups));
    write_stats_table(w, "the signal", &rows);
    let _ = writeln!(w);
}

/// What the figures should be, from the timings: the yardstick under the table.
fn write_expected(w: &mut String, args: &FailoverArgs) {
    let t = args.timing;
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
}

/// Every trial's times, folded away.
fn write_every_trial(w: &mut String, mode: Mode, trials: &[Trial]) {
    let _ = writeln!(w);
    let _ = writeln!(w, "<details><summary>Every trial</summary>\n");
    let (align, titles) = match mode {
        Mode::Kill9 => ("rlrrrrr", "lease expired"),
        Mode::Graceful | Mode::DeadCluster => ("rlrrrrrrr", "old at 0 | old pod gone | released"),
    };
    let titles = format!("# | from → to | {titles} | lease taken | scaled | pod Ready | ready");
    let mut table = Table::new(w, align, &titles);
    let opt = |d: Option<Duration>| d.map_or_else(|| "—".to_owned(), fmt_dur);
    for tr in trials {
        let mut cells = vec![tr.n.to_string(), format!("{} → {}", tr.from, tr.to)];
        match mode {
            Mode::Kill9 => cells.push(opt(tr.expired)),
            Mode::Graceful | Mode::DeadCluster => {
                cells.extend([tr.old.down, tr.old.gone, tr.released].map(opt));
            }
        }
        cells.extend([tr.lease, tr.up.scaled, tr.up.pod_ready, tr.up.ready].map(fmt_dur));
        table.row(&cells);
    }
    let _ = writeln!(w, "\n</details>");
}
