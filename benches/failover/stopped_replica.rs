//! `failover --mode kill9` and `--mode graceful`: the leading replica is stopped (SIGKILL
//! or SIGTERM), one replica per cluster.

use crate::support::id;
use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use chrono::{DateTime, Utc};
use reaper_operator::config::Schema;
use reaper_operator::lease::LeaseStore;
use sqlx::{AssertSqlSafe, Row};

use super::database::Urls;
use super::deployments::Scale;
use super::machine::Machine;
use super::operator::{SHUTDOWN_TIMEOUT_S, with_logs};
use super::report::{Stats, fmt_dur, since, write_date_line, write_stats_table};
use super::side::{FAILOVER_NS, Side, Stability, sleep_random_phase};
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
    /// graceful: the killed holder's Deployment at spec.replicas 0.
    old_down: Option<Duration>,
    /// graceful: the killed holder's pod gone (pod watch: deleted, not just Terminating).
    old_gone: Option<Duration>,
    lease: Duration,
    scaled: Duration,
    /// The other cluster's pod Ready (its condition, pod watch).
    pod_ready: Duration,
    ready: Duration,
}

impl Trial {
    fn line(&self) -> String {
        let mut s = format!("trial {:>3}: {} -> {}:", self.n, self.from, self.to);
        if let Some(e) = self.expired {
            let _ = write!(s, " lease expired {},", fmt_dur(e));
        }
        if let Some(d) = self.old_down {
            let _ = write!(s, " old Deployment at 0 {},", fmt_dur(d));
        }
        if let Some(d) = self.old_gone {
            let _ = write!(s, " old pod gone {},", fmt_dur(d));
        }
        if let Some(r) = self.released {
            let _ = write!(s, " released {},", fmt_dur(r));
        }
        let _ = write!(
            s,
            " lease taken {}, Deployment scaled {}, pod Ready {}, readyReplicas 1 {}",
            fmt_dur(self.lease),
            fmt_dur(self.scaled),
            fmt_dur(self.pod_ready),
            fmt_dur(self.ready)
        );
        s
    }
}

pub async fn run(
    args: &FailoverArgs,
    urls: &Urls,
    schema: &Schema,
    store: &LeaseStore,
    log_dir: &Path,
) -> Result<Vec<Trial>> {
    let timing = args.timing;
    let lease_name = format!("{FAILOVER_NS}.failover-{}", std::process::id());
    let ctx = Stability::new(store, schema, &lease_name, timing);
    let events = &ctx.events;

    let mut sides = Side::start_both(
        ["bench-fo-a", "bench-fo-b"],
        timing.lease_spec(&lease_name),
        args.grace_seconds,
    )
    .await?;
    // The second replica starts a random fraction of a retry period later, so the two
    // electors do not tick in step (a restarted replica has a random phase too).
    let mut ops = vec![sides[0].start_operator(urls, schema, log_dir)?];
    sleep_random_phase(timing).await;
    ops.push(sides[1].start_operator(urls, schema, log_dir)?);

    let begun = Utc::now();
    let holders = [vec![ops[0].holder()], vec![ops[1].holder()]];
    let found = ctx.wait_first_leader(&holders).await;
    let mut leader = with_logs(found, &ops.iter().collect::<Vec<_>>())?;
    let stable = ctx.wait_stable(&sides, &ops, leader, begun).await;
    with_logs(stable, &ops.iter().collect::<Vec<_>>())?;
    tokio::time::sleep(Duration::from_secs(timing.retry)).await;
    eprintln!(
        "stable: {} leads; {} trials of --mode {}",
        ops[leader].holder(),
        args.trials,
        args.mode.flag()
    );

    let mut trials = Vec::new();
    for n in 1..=args.trials {
        let follower = 1 - leader;
        let result = async {
            // Signal at a random phase of the renew cycle.
            sleep_random_phase(timing).await;
            let last_id = ctx.last_event_id().await?;
            let (from, to) = (ops[leader].holder(), ops[follower].holder());
            ensure!(
                sides[follower].watch.latest()
                    == Some(Scale {
                        replicas: 0,
                        ready: 0
                    }),
                "the standby's Deployment is not at 0 before the signal: {:?}",
                sides[follower].watch.latest()
            );

            let t0 = match args.mode {
                Mode::Kill9 => ops[leader].kill9()?,
                Mode::Graceful => ops[leader].terminate()?,
                Mode::DeadCluster => unreachable!("dead-cluster trials run in dead_cluster.rs"),
            };
            // The killed holder cannot renew any more: its row's expiry is final.
            let expired = match args.mode {
                Mode::Kill9 => {
                    let row = store
                        .get(&id::lease(&lease_name))
                        .await?
                        .ok_or_else(|| anyhow!("lease {lease_name} vanished"))?;
                    ensure!(
                        row.holder == from,
                        "holder changed before the kill: {row:?}"
                    );
                    Some(since(t0, row.expires_at, "expiry")?)
                }
                Mode::Graceful | Mode::DeadCluster => None,
            };
            let timeout = Duration::from_secs(timing.ttl + timing.retry + SHUTDOWN_TIMEOUT_S + 30);
            let (taken_at, released_at) =
                wait_until("the takeover row in lease_event", timeout, || async {
                    let rows = sqlx::query(AssertSqlSafe(format!(
                    "SELECT kind, holder, at FROM {events} WHERE name = $1 AND id > $2 ORDER BY id"
                )))
                .bind(&lease_name)
                .bind(last_id)
                .fetch_all(store.pool())
                .await?;
                    let mut released = None;
                    for row in rows {
                        let kind: String = row.try_get("kind")?;
                        let holder: String = row.try_get("holder")?;
                        let at: DateTime<Utc> = row.try_get("at")?;
                        match kind.as_str() {
                            "release" if holder == from => released = Some(at),
                            "acquire" | "takeover" if holder == to => {
                                return Ok(Some((at, released)));
                            }
                            _ => {
                                bail!("unexpected lease_event {kind} by {holder} after the signal")
                            }
                        }
                    }
                    Ok(None)
                })
                .await?;
            let other = &sides[follower].watch;
            let scaled_at = other
                .wait_first_after(
                    t0,
                    |s| s.replicas >= 1,
                    timeout,
                    "the other Deployment to scale up",
                )
                .await?;
            let ready_at = other
                .wait_first_after(
                    t0,
                    |s| s.ready >= 1,
                    timeout,
                    "the other Deployment's pod to be ready",
                )
                .await?;
            let pod_ready_at = sides[follower]
                .pods
                .wait_first_after(
                    t0,
                    |c| c.ready >= 1,
                    timeout,
                    "the other cluster's pod to be Ready",
                )
                .await?;
            let old_down = match args.mode {
                Mode::Graceful => {
                    let status = ops[leader]
                        .wait_exit(Duration::from_secs(SHUTDOWN_TIMEOUT_S + 15))
                        .await?;
                    ensure!(status.success(), "graceful exit of {from}: {status}");
                    let down = sides[leader]
                        .watch
                        .first_after(t0, |s| s.replicas == 0)
                        .map(|at| since(t0, at, "scale-down"))
                        .transpose()?;
                    let gone = sides[leader]
                        .pods
                        .first_after(t0, |c| c.live == 0)
                        .map(|at| since(t0, at, "pod gone"))
                        .transpose()?;
                    (down, gone)
                }
                Mode::Kill9 => {
                    ops[leader].wait_exit(Duration::from_secs(10)).await?;
                    (None, None)
                }
                Mode::DeadCluster => unreachable!("dead-cluster trials run in dead_cluster.rs"),
            };
            let (old_down, old_gone) = old_down;
            Ok(Trial {
                n,
                from,
                to,
                expired,
                released: released_at.map(|at| since(t0, at, "release")).transpose()?,
                old_down,
                old_gone,
                lease: since(t0, taken_at, "takeover")?,
                scaled: since(t0, scaled_at, "scale-up")?,
                pod_ready: since(t0, pod_ready_at, "pod readiness")?,
                ready: since(t0, ready_at, "readiness")?,
            })
        }
        .await;
        let trial = with_logs(result, &ops.iter().collect::<Vec<_>>())
            .with_context(|| format!("trial {n}"))?;
        println!("{}", trial.line());
        trials.push(trial);

        // The killed replica comes back as a standby; the roles are swapped.
        let restarted = Utc::now();
        ops[leader] = sides[leader].start_operator(urls, schema, log_dir)?;
        leader = follower;
        let restarting = Instant::now();
        let stable = ctx.wait_stable(&sides, &ops, leader, restarted).await;
        with_logs(stable, &ops.iter().collect::<Vec<_>>())
            .with_context(|| format!("after trial {n}"))?;
        eprintln!(
            "  restarted {} as a standby; stable again after {:.1?}",
            ops[1 - leader].holder(),
            restarting.elapsed()
        );
        // One more retry period, so the restarted standby's elector is ticking steadily.
        tokio::time::sleep(Duration::from_secs(timing.retry)).await;
    }
    for op in &mut ops {
        ensure!(op.running(), "{} exited during the run", op.holder());
    }
    Ok(trials)
}

pub fn render(
    args: &FailoverArgs,
    m: &Machine,
    started: DateTime<Utc>,
    elapsed: Duration,
    trials: &[Trial],
) -> (String, String) {
    let t = args.timing;
    // The pods' grace period is part of the configuration when it is not the default.
    let grace = (args.grace_seconds != 1).then_some(args.grace_seconds);
    let heading = format!(
        "## `--mode {}`, {}{}",
        args.mode.flag(),
        t.label(),
        grace.map_or_else(String::new, |g| format!(", grace {g} s"))
    );
    let mut o = String::new();
    let w = &mut o;
    let _ = writeln!(
        w,
        "- **Command:** `cargo bench --bench failover -- failover --mode {} --trials {} {}{} --write`",
        args.mode.flag(),
        args.trials,
        t.flags(),
        grace.map_or_else(String::new, |g| format!(" --grace-seconds {g}"))
    );
    write_date_line(w, started, trials.len(), elapsed);
    m.describe(w);
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
            rows.push(("old Deployment at `spec.replicas` 0", col(|t| t.old_down)));
            rows.push((
                "old pod gone (pod watch: deleted, no longer Terminating)",
                col(|t| t.old_gone),
            ));
            rows.push(("lease released (`release` row)", col(|t| t.released)));
        }
    }
    rows.extend([
        (
            "**lease taken** (other replica's acquire row)",
            col(|t| Some(t.lease)),
        ),
        (
            "**Deployment scaled** (other cluster, `spec.replicas` = 1)",
            col(|t| Some(t.scaled)),
        ),
        (
            "pod Ready (the pod's condition, pod watch)",
            col(|t| Some(t.pod_ready)),
        ),
        (
            "**pod ready** (`status.readyReplicas` = 1)",
            col(|t| Some(t.ready)),
        ),
    ]);
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
    let extra = match mode {
        Mode::Kill9 => "lease expired",
        Mode::Graceful | Mode::DeadCluster => "old at 0 | old pod gone | released",
    };
    let _ = writeln!(
        w,
        "| # | from → to | {extra} | lease taken | scaled | pod Ready | ready |"
    );
    let _ = writeln!(
        w,
        "|---:|---|{}---:|---:|---:|---:|",
        if mode == Mode::Kill9 {
            "---:|"
        } else {
            "---:|---:|---:|"
        }
    );
    let opt = |d: Option<Duration>| d.map_or_else(|| "—".to_owned(), fmt_dur);
    for tr in trials {
        let extra = match mode {
            Mode::Kill9 => opt(tr.expired),
            Mode::Graceful | Mode::DeadCluster => format!(
                "{} | {} | {}",
                opt(tr.old_down),
                opt(tr.old_gone),
                opt(tr.released)
            ),
        };
        let _ = writeln!(
            w,
            "| {} | {} → {} | {extra} | {} | {} | {} | {} |",
            tr.n,
            tr.from,
            tr.to,
            fmt_dur(tr.lease),
            fmt_dur(tr.scaled),
            fmt_dur(tr.pod_ready),
            fmt_dur(tr.ready)
        );
    }
    let _ = writeln!(w, "\n</details>");
}
