//! How long a lease goes without a holder when its database fails over: a PostgreSQL
//! primary with a synchronous standby (`REAPER_DB_STANDBY=sync tests/db/up.sh`), four
//! electors (two clusters of two replicas) going through PgBouncer in transaction mode,
//! and `kill -9` of the primary with the standby promoted (`tests/db/failover.sh`), a
//! new standby after each run (`tests/db/standby.sh`).
//!
//! ```sh
//! cargo bench --locked --bench db_failover              # 5 runs per timing set
//! cargo bench --locked --bench db_failover -- --runs 10 --write
//! ```
//!
//! `--write` writes docs/benchmarks-db-failover.md. It starts its own database pair (no
//! environment needed) and needs `socat`, PostgreSQL and PgBouncer like the tests.
//!
//! Per run, from the kill: when the first acquire reached the new primary (it starts
//! the wait of a ttl, `lease_timeline.first_seen_at`), when the holder stepped down,
//! and when a candidate held the lease again. An acquisition while another elector
//! still led by its own clock (its last successful renew sent less than a renew
//! deadline before) is counted as an overlap; there must be none.

#[path = "support/markdown.rs"]
mod markdown;
#[path = "../tests/support/mod.rs"]
mod support;

use std::fmt::Write as _;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use markdown::Table;
use reaper_operator::config::{LeaseTimings, Schema};
use reaper_operator::lease::{Elector, ElectorConfig, LeaseStore, MonotonicClock, Tick};
use support::db::unique_schema;
use support::ha_db::{HaDatabase, Replication, first_seen_on_timeline};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

const DOC_PATH: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/docs/benchmarks-db-failover.md"
);
const HOLDERS: [&str; 4] = ["a/op-1", "a/op-2", "b/op-1", "b/op-2"];

/// One tick of one elector, stamped when the tick started (a renew's send time).
#[derive(Clone, Copy)]
struct Event {
    holder: usize,
    started: Instant,
    kind: EventKind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum EventKind {
    Acquired(i64),
    Renewed(i64),
    SteppedDown,
    Other,
}

struct Run {
    first_acquire_after: Duration,
    stepped_down_after: Option<Duration>,
    held_again_after: Duration,
    epoch: i64,
}

struct Series {
    timings: (u64, u64, u64),
    runs: Vec<Run>,
    overlaps: usize,
}

fn main() -> ExitCode {
    let mut runs = 5;
    let mut write = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--runs" => runs = args.next().and_then(|n| n.parse().ok()).unwrap_or(runs),
            "--write" => write = true,
            // cargo bench passes --bench.
            "--bench" => {}
            other => {
                eprintln!("db_failover: unknown argument {other:?} (--runs N, --write)");
                return ExitCode::from(2);
            }
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(bench(runs, write)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("db_failover: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn bench(runs: usize, write: bool) -> Result<()> {
    let mut series = Vec::new();
    for timings in [(3, 2, 1), (15, 10, 2)] {
        series.push(measure(timings, runs).await?);
    }
    let report = report(&series, runs);
    print!("{report}");
    if write {
        std::fs::write(DOC_PATH, &report).with_context(|| format!("writing {DOC_PATH}"))?;
        eprintln!("wrote {DOC_PATH}");
    }
    if series.iter().any(|s| s.overlaps > 0) {
        bail!("an elector acquired while another still led");
    }
    Ok(())
}

async fn measure(timings: (u64, u64, u64), runs: usize) -> Result<Series> {
    let (ttl, deadline, retry) = timings;
    let lease_timings = LeaseTimings::new(
        Duration::from_secs(ttl),
        Duration::from_secs(deadline),
        Duration::from_secs(retry),
    )?;
    let mut db = HaDatabase::start("bench-dbf", Replication::Sync)?;
    let schema = unique_schema("benchdbf");
    let admin = LeaseStore::connect(db.primary_url(), &schema, Duration::from_secs(10), 1).await?;
    admin.migrate().await?;

    let (tx, rx) = mpsc::unbounded_channel::<Event>();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let tasks = start_electors(&db, &schema, lease_timings, &tx, &stop_rx)?;
    let mut ticks = Ticks {
        rx,
        all: Vec::new(),
        // How long an election may take: four ttls, plus slack for a loaded machine.
        timeout: Duration::from_secs(ttl * 4 + 30),
    };
    let mut results = Vec::new();
    for run in 0..runs {
        let r = fail_over(&mut db, &schema, &mut ticks, run).await?;
        eprintln!(
            "{ttl}/{deadline}/{retry} run {}: first acquire on the new primary {:.2} s, \
             holder stepped down {}, held again {:.2} s after the kill (epoch {})",
            run + 1,
            r.first_acquire_after.as_secs_f64(),
            r.stepped_down_after
                .map_or("-".to_owned(), |d| format!("{:.2} s", d.as_secs_f64())),
            r.held_again_after.as_secs_f64(),
            r.epoch,
        );
        results.push(r);
        tokio::task::block_in_place(|| db.add_standby())?;
    }
    let _ = stop_tx.send(true);
    for task in tasks {
        let _ = task.await;
    }
    ticks.drain();
    admin.close().await;
    Ok(Series {
        timings,
        runs: results,
        overlaps: overlaps(&ticks.all, Duration::from_secs(deadline)),
    })
}

/// Starts an elector for each of [`HOLDERS`] through PgBouncer; each sends its ticks on
/// `tx` until `stop` turns true.
fn start_electors(
    db: &HaDatabase,
    schema: &Schema,
    timings: LeaseTimings,
    tx: &mpsc::UnboundedSender<Event>,
    stop: &tokio::sync::watch::Receiver<bool>,
) -> Result<Vec<JoinHandle<()>>> {
    let mut tasks = Vec::new();
    for (i, holder) in HOLDERS.iter().enumerate() {
        let store =
            LeaseStore::connect_lazy(db.pgbouncer_url(), schema, timings.call_timeout(), 3)?;
        let config = ElectorConfig {
            lease_name: support::id::lease("bench"),
            holder: support::id::holder(holder),
            timings,
        };
        let mut elector = Elector::new(config, store, Arc::new(MonotonicClock));
        let (tx, mut stop) = (tx.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let shutdown = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            elector
                .run(shutdown, |tick, took| {
                    let kind = match tick {
                        Tick::Acquired(l) => EventKind::Acquired(l.epoch),
                        Tick::Renewed(l) => EventKind::Renewed(l.epoch),
                        Tick::Lost { .. } | Tick::DeadlineMissed { .. } => EventKind::SteppedDown,
                        _ => EventKind::Other,
                    };
                    let started = Instant::now() - took;
                    let _ = tx.send(Event {
                        holder: i,
                        started,
                        kind,
                    });
                })
                .await;
        }));
    }
    Ok(tasks)
}

/// Run `run` (from 0): once someone holds the lease on the current timeline, kills the
/// primary and promotes the standby, and measures until a candidate holds it again.
async fn fail_over(
    db: &mut HaDatabase,
    schema: &Schema,
    ticks: &mut Ticks,
    run: usize,
) -> Result<Run> {
    // Steady: someone holds the lease on the current timeline.
    let floor = (run as i64) << 32;
    ticks
        .wait_for(|e| matches!(e.kind, EventKind::Renewed(epoch) if epoch > floor))
        .await
        .context("no holder before the failover")?;
    let leader = ticks.all.last().map(|e| e.holder);
    tokio::time::sleep(Duration::from_millis(500 + 137 * run as u64 % 900)).await;
    ticks.drain();

    let failover = tokio::task::block_in_place(|| db.fail_over())?;
    let next_floor = ((run as i64) + 1) << 32;
    let held = ticks
        .wait_for(|e| matches!(e.kind, EventKind::Acquired(epoch) if epoch > next_floor))
        .await
        .context("nobody acquired after the failover")?;
    let stepped_down = ticks
        .all
        .iter()
        .filter(|e| e.started >= failover.killed_at)
        .find(|e| Some(e.holder) == leader && e.kind == EventKind::SteppedDown)
        .map(|e| e.started - failover.killed_at);
    let first_seen = first_seen_on_timeline(db, schema, run as i64 + 2).await?;
    let EventKind::Acquired(epoch) = held.kind else {
        unreachable!()
    };
    Ok(Run {
        first_acquire_after: (first_seen - failover.killed_wall)
            .to_std()
            .unwrap_or_default(),
        stepped_down_after: stepped_down,
        held_again_after: held.started - failover.killed_at,
        epoch,
    })
}

/// The electors' ticks: the channel they arrive on, and every one received so far.
struct Ticks {
    rx: mpsc::UnboundedReceiver<Event>,
    all: Vec<Event>,
    /// How long an election may take.
    timeout: Duration,
}

impl Ticks {
    /// Takes the ticks that have arrived.
    fn drain(&mut self) {
        while let Ok(e) = self.rx.try_recv() {
            self.all.push(e);
        }
    }

    /// Collects ticks until one matches (within the election timeout), and returns it.
    async fn wait_for(&mut self, matches: impl Fn(&Event) -> bool) -> Result<Event> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        loop {
            let event = tokio::time::timeout_at(deadline, self.rx.recv())
                .await
                .context("timed out")?
                .context("every elector stopped")?;
            let found = matches(&event).then_some(event);
            self.all.push(event);
            if let Some(found) = found {
                return Ok(found);
            }
        }
    }
}

/// Acquisitions while another elector still led by its own clock: its last successful
/// acquire or renew started less than `deadline` before, and it had not stepped down.
fn overlaps(events: &[Event], deadline: Duration) -> usize {
    let mut sorted: Vec<&Event> = events.iter().collect();
    sorted.sort_by_key(|e| e.started);
    let mut last_success: [Option<Instant>; HOLDERS.len()] = [None; HOLDERS.len()];
    let mut count = 0;
    for e in sorted {
        match e.kind {
            EventKind::Acquired(_) => {
                count += (0..HOLDERS.len())
                    .filter(|&h| h != e.holder)
                    .filter(|&h| last_success[h].is_some_and(|s| e.started < s + deadline))
                    .count();
                last_success[e.holder] = Some(e.started);
            }
            EventKind::Renewed(_) => last_success[e.holder] = Some(e.started),
            EventKind::SteppedDown => last_success[e.holder] = None,
            EventKind::Other => {}
        }
    }
    count
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

fn spread(values: Vec<f64>) -> String {
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{:.2} s ({:.2}–{:.2})", median(values), min, max)
}

fn report(series: &[Series], runs: usize) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Benchmark: a lease through a failover of its database\n\n\
         Written by `cargo bench --locked --bench db_failover -- --runs {runs} --write` on \
         {} ({} cores). A PostgreSQL 15 primary with a synchronous standby \
         (`REAPER_DB_STANDBY=sync tests/db/up.sh`), four electors (two clusters of two \
         replicas) through PgBouncer in transaction mode, `kill -9` of every process of the \
         primary and the standby promoted (`tests/db/failover.sh`), a new standby after \
         each run. Times from the kill; median (min–max) of {runs} runs per timing set.\n",
        chrono::Utc::now().format("%Y-%m-%d"),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );
    let mut table = Table::new(
        &mut out,
        "lllll",
        "ttl / renew deadline / retry | first acquire reaches the new primary | holder steps down | lease held again | acquisitions while another elector led",
    );
    for s in series {
        let (ttl, deadline, retry) = s.timings;
        let seconds = |of: fn(&Run) -> Option<Duration>| -> Vec<f64> {
            s.runs
                .iter()
                .filter_map(of)
                .map(|d| d.as_secs_f64())
                .collect()
        };
        let stepped = seconds(|r| r.stepped_down_after);
        table.row(&[
            format!("{ttl} s / {deadline} s / {retry} s"),
            spread(seconds(|r| Some(r.first_acquire_after))),
            if stepped.is_empty() {
                "-".to_owned()
            } else {
                spread(stepped)
            },
            spread(seconds(|r| Some(r.held_again_after))),
            s.overlaps.to_string(),
        ]);
    }
    let epochs: Vec<String> = series
        .iter()
        .flat_map(|s| s.runs.iter().map(|r| r.epoch.to_string()))
        .collect();
    let _ = writeln!(
        out,
        "\nThe lease is held again a ttl after the first acquire reaches the new primary, \
         plus up to one retry period: nothing is acquired before (docs/operations.md, \"A \
         highly available database\"). The holder steps down at its first renew on the new \
         primary (the row is from an earlier timeline) or at its renew deadline, whichever \
         comes first. Epochs after each failover (timeline 2, 3, ...): {}.",
        epochs.join(", ")
    );
    out
}
