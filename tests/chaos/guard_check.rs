//! Checks (f) and (g) of docs/chaos.md, over the guarded workload (`guarded.rs`): pure
//! functions of the commands' tick files, the guards' exits and the fault log.
//!
//! A *run* is one incarnation of a guarded command: from its first line to its last
//! it was alive, acting every 50 ms (each line is one action). Two runs of one lease in
//! different clusters **overlap** when these intervals intersect (a single instant
//! counts): at that moment both clusters' commands acted, which the guard must
//! never allow, with one exception, the *release* case: the guard's bound rests on the
//! lease expiring, and a release frees it at once. The operator releases a lease only
//! once its own pods have stopped, and a guard inside such a pod has stopped with it;
//! the guarded commands here run beside the pods, as a guard in a pod that the operator
//! does not manage would. So after a release by cluster X, another cluster may acquire
//! the lease and start its command while X's still runs on X's last confirmation: X's
//! stops at the latest `ttl - margin` after the release (that confirmation showed at
//! most a ttl), and in practice a poll and the grace after its guard sees the new
//! holder. Such an overlap is reported apart, and a violation when it outlasts that
//! bound.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use chrono::DateTime;
use reaper_operator::lease::LeaseEvent;

use crate::checker::{FaultRecord, Time, cluster_of, median, seconds, secs};

/// How late a frozen guard's watchdog may kill its command after the instant it had to
/// (its timer and the SIGKILL, scheduled on a loaded machine; the command's last `date`
/// may already have read the clock).
pub const WATCHDOG_TOLERANCE: f64 = 0.25;

/// One exit of a supervised guard.
#[derive(Clone, Debug)]
pub struct GuardExit {
    pub cluster: usize,
    pub lease: usize,
    pub run: u64,
    pub at: Time,
    /// `None`: killed by a signal, or it never started.
    pub code: Option<i32>,
    /// The guard's last line of output.
    pub reason: String,
}

/// One incarnation of a guarded command, from its tick file.
#[derive(Clone, Debug, PartialEq)]
pub struct GuardRun {
    pub cluster: usize,
    pub lease: usize,
    pub run: u64,
    /// `REAPER_LEASE_EPOCH` it was started with.
    pub epoch: Option<i64>,
    pub first: Time,
    pub last: Time,
    /// Lines written (actions), SIGTERMs recorded among them.
    pub actions: usize,
    pub terms: usize,
    /// Longest time between two actions (seconds): how long the command went unscheduled.
    pub max_gap: f64,
}

/// Reads one cluster's tick file of one lease (`<unix ns> <run> <epoch | TERM>` per
/// line) into runs, in order of their first action. Lines that do not parse are
/// skipped.
pub fn parse_runs(cluster: usize, lease: usize, text: &str) -> Vec<GuardRun> {
    let mut runs: BTreeMap<u64, GuardRun> = BTreeMap::new();
    for line in text.lines() {
        let mut fields = line.split_whitespace();
        let (Some(ns), Some(run), Some(what)) = (
            fields.next().and_then(|f| f.parse::<i64>().ok()),
            fields.next().and_then(|f| f.parse::<u64>().ok()),
            fields.next(),
        ) else {
            continue;
        };
        let at = DateTime::from_timestamp_nanos(ns);
        let term = what == "TERM";
        let r = runs.entry(run).or_insert_with(|| GuardRun {
            cluster,
            lease,
            run,
            epoch: None,
            first: at,
            last: at,
            actions: 0,
            terms: 0,
            max_gap: 0.0,
        });
        if !term && r.epoch.is_none() {
            r.epoch = what.parse().ok();
        }
        if r.actions > 0 {
            r.max_gap = r.max_gap.max(seconds(at - r.last));
        }
        r.first = r.first.min(at);
        r.last = r.last.max(at);
        r.actions += 1;
        r.terms += usize::from(term);
    }
    let mut runs: Vec<GuardRun> = runs.into_values().collect();
    runs.sort_by_key(|r| r.first);
    runs
}

/// Runs of one lease in both clusters that acted at a common instant: pairs of indexes
/// into `runs` (a run of cluster 0, one of cluster 1) and the common interval.
pub fn overlaps(runs: &[GuardRun], lease: usize) -> Vec<(usize, usize, Time, Time)> {
    let of = |c: usize| {
        runs.iter()
            .enumerate()
            .filter(move |(_, r)| r.lease == lease && r.cluster == c)
    };
    let mut found = Vec::new();
    for (i, a) in of(0) {
        for (j, b) in of(1) {
            let start = a.first.max(b.first);
            let end = a.last.min(b.last);
            if start <= end {
                found.push((i, j, start, end));
            }
        }
    }
    found.sort_by_key(|f| f.2);
    found
}

/// At every cross-cluster handover of one lease's command (a run whose predecessor, by
/// first action, was in the other cluster): seconds from the other cluster's last
/// action before it to its first. Overlaps (negative gaps) are left to [`overlaps`].
pub fn handover_gaps(runs: &[GuardRun], lease: usize) -> Vec<f64> {
    let mut mine: Vec<&GuardRun> = runs.iter().filter(|r| r.lease == lease).collect();
    mine.sort_by_key(|r| r.first);
    let mut gaps = Vec::new();
    for w in mine.windows(2) {
        let (before, next) = (w[0], w[1]);
        if before.cluster == next.cluster {
            continue;
        }
        let last = mine
            .iter()
            .filter(|r| r.cluster == before.cluster && r.first < next.first)
            .map(|r| r.last)
            .max()
            .unwrap_or(before.last);
        if last < next.first {
            gaps.push(seconds(next.first - last));
        }
    }
    gaps
}

pub struct GuardInput<'a> {
    pub ttl: Duration,
    pub margin: Duration,
    pub clusters: [&'a str; 2],
    pub leases: &'a [String],
    pub runs: &'a [GuardRun],
    pub exits: &'a [GuardExit],
    pub faults: &'a [FaultRecord],
    /// Per lease, its `lease_event` rows in id order.
    pub events: &'a [Vec<LeaseEvent>],
    pub end: Time,
}

/// Both clusters' commands of one lease acting at once.
#[derive(Clone, Debug)]
pub struct GuardedOverlap {
    pub lease: usize,
    /// The run already acting, and the run that started the overlap.
    pub first: GuardRun,
    pub second: GuardRun,
    pub start: Time,
    pub end: Time,
    /// The release case: `first`'s cluster released the lease at this instant, and the
    /// overlap ended within the bound after it (see the module comment).
    pub released: Option<Time>,
    /// Faults in progress (or recovering) at the start.
    pub faults: Vec<usize>,
    /// The fault in progress, or the last one before, and the lease's latest events.
    pub context: String,
}

#[derive(Debug, Default)]
pub struct GuardAnalysis {
    /// Check (f): any overlap is a violation but the release case within its bound.
    pub overlaps: Vec<GuardedOverlap>,
    pub handover_gaps: Vec<f64>,
    /// Check (g): per frozen guard whose command was acting: `(fault id, cluster, lease,
    /// seconds from the freeze to the command's last action)`.
    pub watchdog_stops: Vec<(usize, usize, usize, f64)>,
    /// Check (g) violations, and guards that refused to run or exited for no reason.
    pub problems: Vec<String>,
}

impl GuardAnalysis {
    pub fn violations(&self) -> usize {
        self.overlaps
            .iter()
            .filter(|o| o.released.is_none())
            .count()
            + self.problems.len()
    }
}

/// How long after a release the releasing cluster's command may still act: its guard's
/// last confirmation came before the release and showed at most a ttl remaining, and it
/// kills the command `margin` before that runs out (plus the watchdog's tolerance).
pub fn release_bound(input: &GuardInput<'_>) -> f64 {
    (input.ttl - input.margin).as_secs_f64() + WATCHDOG_TOLERANCE
}

/// The release that explains an overlap of `first`'s command (already acting) with
/// `second`'s from `start` to `end`: the latest release by a holder of `first`'s
/// cluster before `start`, after which that cluster did not hold the lease again and
/// `second`'s cluster acquired it, provided the overlap ended within the bound.
fn release_case(
    input: &GuardInput<'_>,
    lease: usize,
    first: &GuardRun,
    second: &GuardRun,
    start: Time,
    end: Time,
) -> Option<Time> {
    let events = input.events.get(lease)?;
    let of = |holder: &str| cluster_of(holder, &input.clusters);
    let release = events
        .iter()
        .filter(|e| e.kind == "release" && e.at <= start && of(&e.holder) == Some(first.cluster))
        .max_by_key(|e| e.at)?;
    let after: Vec<&LeaseEvent> = events
        .iter()
        .filter(|e| e.at > release.at && e.at <= end && e.kind != "release")
        .collect();
    let reacquired = after.iter().any(|e| of(&e.holder) == Some(first.cluster));
    let acquired = after
        .iter()
        .any(|e| e.kind == "acquire" && of(&e.holder) == Some(second.cluster));
    let within = seconds(end - release.at) <= release_bound(input);
    (!reacquired && acquired && within).then_some(release.at)
}

/// The SIGKILL instant of a guard frozen at `frozen`: its last confirming read was sent
/// before that and showed at most a ttl remaining, minus the margin.
pub fn watchdog_bound(input: &GuardInput<'_>) -> f64 {
    (input.ttl - input.margin).as_secs_f64() + WATCHDOG_TOLERANCE
}

pub fn analyse(input: &GuardInput<'_>) -> GuardAnalysis {
    let mut analysis = GuardAnalysis::default();
    for lease in 0..input.leases.len() {
        for (i, j, start, end) in overlaps(input.runs, lease) {
            let (a, b) = (&input.runs[i], &input.runs[j]);
            let (first, second) = if a.first <= b.first { (a, b) } else { (b, a) };
            let released = release_case(input, lease, first, second, start, end);
            let faults: Vec<usize> = input
                .faults
                .iter()
                .filter(|f| f.start <= start && start <= f.effect_until(input.end))
                .map(|f| f.id)
                .collect();
            analysis.overlaps.push(GuardedOverlap {
                lease,
                first: first.clone(),
                second: second.clone(),
                start,
                end,
                released,
                context: context(input, lease, start),
                faults,
            });
        }
        analysis
            .handover_gaps
            .extend(handover_gaps(input.runs, lease));
    }
    analysis.handover_gaps.sort_by(f64::total_cmp);
    let bound = watchdog_bound(input);
    for f in input.faults {
        for &(cluster, lease, run) in &f.frozen_guards {
            let Some(r) = input
                .runs
                .iter()
                .find(|r| (r.cluster, r.lease, r.run) == (cluster, lease, run))
            else {
                continue;
            };
            // A frozen guard cannot start a command: one whose first action came before
            // the thaw was running (or being started) when the guard froze. A guard frozen
            // while it waited starts its command after the thaw, with the same run.
            let thawed = f.healed.unwrap_or(input.end);
            if r.last <= f.start || r.first >= thawed {
                continue;
            }
            let after = seconds(r.last - f.start);
            analysis.watchdog_stops.push((f.id, cluster, lease, after));
            if after > bound {
                analysis.problems.push(format!(
                    "fault #{} {}: the command of the frozen guard of {} in {} (run {run}) acted until {}, {after:.2} s \
                     after the freeze: its watchdog had to kill it within {bound:.2} s",
                    f.id,
                    f.kind.name(),
                    input.leases[lease],
                    input.clusters[cluster],
                    r.last.format("%H:%M:%S%.3f"),
                ));
            }
        }
    }
    for e in input.exits {
        let who = format!(
            "guard of {} in {} (run {}) at {}",
            input.leases[e.lease],
            input.clusters[e.cluster],
            e.run,
            e.at.format("%H:%M:%S%.3f")
        );
        match e.code {
            Some(3) => {}
            // The timings do not fit the lease: the guard never runs its command.
            Some(2) if e.reason.contains("is too short") => analysis
                .problems
                .push(format!("{who} refused its timings: {}", e.reason)),
            Some(2) => {}
            other => analysis.problems.push(format!(
                "{who} exited with {other:?} although its command never exits by itself: {}",
                e.reason
            )),
        }
    }
    analysis
}

/// The fault in progress at `t` (or the last one before) and the lease's events around it.
fn context(input: &GuardInput<'_>, lease: usize, t: Time) -> String {
    let mut parts = Vec::new();
    let active: Vec<String> = input
        .faults
        .iter()
        .filter(|f| f.start <= t && t <= f.effect_until(input.end))
        .map(|f| format!("fault #{} {} {} in progress", f.id, f.kind.name(), f.target))
        .collect();
    if active.is_empty() {
        if let Some(f) = input
            .faults
            .iter()
            .filter(|f| f.start <= t)
            .max_by_key(|f| f.start)
        {
            parts.push(format!(
                "no fault in progress (the last: #{} {} {}, healed {:.2} s before)",
                f.id,
                f.kind.name(),
                f.target,
                f.healed.map_or(f64::NAN, |h| seconds(t - h))
            ));
        } else {
            parts.push("no fault yet".to_owned());
        }
    } else {
        parts.extend(active);
    }
    let events = input.events.get(lease).map(Vec::as_slice).unwrap_or(&[]);
    let recent: Vec<String> = events
        .iter()
        .filter(|e| e.at <= t + secs(1.0) && e.at >= t - secs(input.ttl.as_secs_f64() + 2.0))
        .map(|e| {
            format!(
                "{} {} epoch {} {}",
                e.at.format("%H:%M:%S%.3f"),
                e.kind,
                e.epoch,
                e.holder
            )
        })
        .collect();
    if !recent.is_empty() {
        parts.push(format!("lease events: {}", recent.join(", ")));
    }
    parts.join("; ")
}

/// Lines for the summary.
pub fn summary(input: &GuardInput<'_>, analysis: &GuardAnalysis, settings: &str) -> String {
    let mut s = String::new();
    summary_runs(&mut s, input, settings);
    summary_overlaps(&mut s, input, analysis);
    summary_handovers(&mut s, input, analysis);
    summary_frozen_guards(&mut s, input, analysis);
    s
}

/// Check (f)'s first line: the guarded commands' runs, actions and exits.
fn summary_runs(s: &mut String, input: &GuardInput<'_>, settings: &str) {
    let mut stops: BTreeMap<&str, usize> = BTreeMap::new();
    for e in input.exits {
        let what = match e.code {
            Some(3) if e.reason.contains("watchdog") => "watchdog",
            Some(3) if e.reason.contains("another cluster") => "lease moved",
            Some(3) if e.reason.contains("epoch moved") => "epoch skipped",
            Some(3) if e.reason.contains("no read confirmed") => "unconfirmed",
            Some(3) => "other",
            Some(2) => "exit 2",
            _ => "unexpected",
        };
        *stops.entry(what).or_default() += 1;
    }
    let stopped: usize = input.exits.iter().filter(|e| e.code == Some(3)).count();
    let actions: usize = input.runs.iter().map(|r| r.actions).sum();
    let terms: usize = input.runs.iter().map(|r| r.terms).sum();
    let detail: Vec<String> = stops.iter().map(|(k, n)| format!("{k} {n}")).collect();
    let _ = writeln!(
        s,
        "(f) guarded commands ({settings}): {} runs, {actions} actions, {} guard exits ({}); {stopped} commands stopped by \
         their guard, {terms} SIGTERM(s) ignored",
        input.runs.len(),
        input.exits.len(),
        detail.join(", ")
    );
}

/// Check (f): the commands of both clusters that acted at once, violations and the
/// release case.
fn summary_overlaps(s: &mut String, input: &GuardInput<'_>, analysis: &GuardAnalysis) {
    let longest_overlap = |release: bool| {
        analysis
            .overlaps
            .iter()
            .filter(|o| o.released.is_some() == release)
            .map(|o| seconds(o.end - o.start))
            .fold(0.0, f64::max)
    };
    let bad = analysis
        .overlaps
        .iter()
        .filter(|o| o.released.is_none())
        .count();
    let residual = analysis.overlaps.len() - bad;
    let _ = writeln!(
        s,
        "    both clusters' commands acting at once: {bad} violation(s){}; after a release (the residual case, \
         bound {:.2} s after the release): {residual}{}",
        if bad == 0 {
            String::new()
        } else {
            format!(", the longest {:.3} s", longest_overlap(false))
        },
        release_bound(input),
        if residual == 0 {
            String::new()
        } else {
            let after: f64 = analysis
                .overlaps
                .iter()
                .filter_map(|o| o.released.map(|r| seconds(o.end - r)))
                .fold(0.0, f64::max);
            format!(
                ", the longest {:.3} s, ending at most {after:.2} s after the release",
                longest_overlap(true)
            )
        }
    );
    for o in &analysis.overlaps {
        let _ = writeln!(
            s,
            "    {} lease {}: {} run {} (epoch {:?}, {} to {}) and {} run {} (epoch {:?}, {} to {}) both acted \
             for {:.3} s from {}: {}",
            match o.released {
                Some(r) => format!(
                    "release case ({:.2} s after the release)",
                    seconds(o.end - r)
                ),
                None => "VIOLATION".to_owned(),
            },
            input.leases[o.lease],
            input.clusters[o.first.cluster],
            o.first.run,
            o.first.epoch,
            o.first.first.format("%H:%M:%S%.3f"),
            o.first.last.format("%H:%M:%S%.3f"),
            input.clusters[o.second.cluster],
            o.second.run,
            o.second.epoch,
            o.second.first.format("%H:%M:%S%.3f"),
            o.second.last.format("%H:%M:%S%.3f"),
            seconds(o.end - o.start),
            o.start.format("%H:%M:%S%.3f"),
            o.context
        );
    }
}

/// The handovers of the commands between clusters, and the longest pause within one.
fn summary_handovers(s: &mut String, input: &GuardInput<'_>, analysis: &GuardAnalysis) {
    let longest = input.runs.iter().map(|r| r.max_gap).fold(0.0, f64::max);
    let gaps = &analysis.handover_gaps;
    let _ = writeln!(
        s,
        "    cross-cluster handovers of the commands: {}; the new command's first action after the old one's last: \
         min {:.2} s, median {:.2} s; longest pause within one command: {longest:.2} s",
        gaps.len(),
        gaps.first().copied().unwrap_or(f64::NAN),
        median(gaps)
    );
}

/// Check (g): frozen guards stopped by their watchdogs, guard problems, and the guards
/// that refused to start.
fn summary_frozen_guards(s: &mut String, input: &GuardInput<'_>, analysis: &GuardAnalysis) {
    let stops: Vec<f64> = analysis.watchdog_stops.iter().map(|w| w.3).collect();
    let _ = writeln!(
        s,
        "(g) frozen guards (guard-sigstop): {} acting command(s), stopped by their watchdogs {:.2} to {:.2} s after the \
         freeze (bound {:.2} s); guard problems: {} violation(s)",
        stops.len(),
        stops.iter().copied().fold(f64::INFINITY, f64::min),
        stops.iter().copied().fold(0.0, f64::max),
        watchdog_bound(input),
        analysis.problems.len()
    );
    for p in &analysis.problems {
        let _ = writeln!(s, "    VIOLATION {p}");
    }
    let refused: Vec<String> = input
        .exits
        .iter()
        .filter(|e| e.code == Some(2) && !e.reason.contains("is too short"))
        .map(|e| {
            format!(
                "{} {} at {}: {}",
                input.leases[e.lease],
                input.clusters[e.cluster],
                e.at.format("%H:%M:%S%.3f"),
                e.reason
            )
        })
        .collect();
    if !refused.is_empty() {
        let _ = writeln!(
            s,
            "    guards that exited with 2 (informational): {}",
            refused.join("; ")
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checker::{Effect, Kind};

    fn t(s: f64) -> Time {
        DateTime::from_timestamp(1_800_000_000, 0).unwrap() + secs(s)
    }

    /// Tick lines of run `run` every 50 ms from `from` to `to` (seconds), epoch `epoch`.
    fn ticks(run: u64, epoch: i64, from: f64, to: f64) -> String {
        let (from, to) = ((from * 1000.0).round() as i64, (to * 1000.0).round() as i64);
        let mut s = String::new();
        for ms in (from..=to).step_by(50) {
            let ns = t(ms as f64 / 1000.0).timestamp_nanos_opt().unwrap();
            let _ = writeln!(s, "{ns} {run} {epoch}");
        }
        s
    }

    fn runs(a: &str, b: &str) -> Vec<GuardRun> {
        let mut r = parse_runs(0, 0, a);
        r.extend(parse_runs(1, 0, b));
        r.sort_by_key(|r| r.first);
        r
    }

    #[test]
    fn runs_are_read_from_the_tick_lines() {
        let ns = t(2.0).timestamp_nanos_opt().unwrap();
        let text = format!(
            "{}{ns} 1 TERM\nnot a line\n17000 \n{}",
            ticks(1, 4, 0.0, 1.0),
            ticks(2, 6, 5.0, 5.2)
        );
        let r = parse_runs(0, 2, &text);
        assert_eq!(r.len(), 2, "{r:?}");
        assert_eq!((r[0].run, r[0].epoch, r[0].lease), (1, Some(4), 2));
        assert_eq!((r[0].first, r[0].last), (t(0.0), t(2.0)));
        assert_eq!((r[0].actions, r[0].terms), (22, 1));
        assert!((r[0].max_gap - 1.0).abs() < 1e-6, "{}", r[0].max_gap);
        assert_eq!((r[1].first, r[1].epoch), (t(5.0), Some(6)));
    }

    #[test]
    fn commands_acting_at_one_instant_in_both_clusters_overlap() {
        // a acts until 2.0 s, b from 2.4 s: a handover with a 0.4 s gap.
        let r = runs(&ticks(1, 4, 0.0, 2.0), &ticks(1, 5, 2.4, 4.0));
        assert!(overlaps(&r, 0).is_empty());
        let gaps = handover_gaps(&r, 0);
        assert_eq!(gaps.len(), 1);
        assert!((gaps[0] - 0.4).abs() < 1e-6, "{gaps:?}");
        // b starts while a still acts: they overlap from b's first action to a's last.
        let r = runs(&ticks(1, 4, 0.0, 2.0), &ticks(1, 5, 1.9, 4.0));
        let found = overlaps(&r, 0);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!((found[0].2, found[0].3), (t(1.9), t(2.0)));
        assert!(handover_gaps(&r, 0).is_empty());
        // A single action of b inside a's run is an overlap too.
        let r = runs(&ticks(1, 4, 0.0, 2.0), &ticks(1, 5, 1.0, 1.0));
        assert_eq!(overlaps(&r, 0).len(), 1);
        // The same cluster twice is not, nor another lease.
        let mut r = parse_runs(0, 0, &ticks(1, 4, 0.0, 2.0));
        r.extend(parse_runs(0, 0, &ticks(2, 4, 1.0, 3.0)));
        r.extend(parse_runs(1, 1, &ticks(1, 4, 1.0, 3.0)));
        assert!(overlaps(&r, 0).is_empty());
        assert!(overlaps(&r, 1).is_empty());
    }

    fn input_with<R>(
        runs: &[GuardRun],
        exits: &[GuardExit],
        faults: &[FaultRecord],
        f: impl FnOnce(&GuardInput<'_>) -> R,
    ) -> R {
        input_with_events(runs, exits, faults, Vec::new(), f)
    }

    fn input_with_events<R>(
        runs: &[GuardRun],
        exits: &[GuardExit],
        faults: &[FaultRecord],
        events: Vec<LeaseEvent>,
        f: impl FnOnce(&GuardInput<'_>) -> R,
    ) -> R {
        let leases = ["l".to_owned()];
        let events = [events];
        f(&GuardInput {
            ttl: Duration::from_secs(3),
            margin: Duration::from_millis(300),
            clusters: ["a", "b"],
            leases: &leases,
            runs,
            exits,
            faults,
            events: &events,
            end: t(100.0),
        })
    }

    fn freeze(start: f64, frozen: Vec<(usize, usize, u64)>) -> FaultRecord {
        FaultRecord {
            id: 9,
            kind: Kind::GuardSigstop,
            target: "guards of cluster a".into(),
            effect: Effect::Unable(vec![0, 1]),
            start: t(start),
            healed: Some(t(start + 6.0)),
            problems: Vec::new(),
            frozen_guards: frozen,
        }
    }

    #[test]
    fn an_overlap_names_the_fault_in_progress_and_fails_the_run() {
        let r = runs(&ticks(1, 4, 0.0, 4.0), &ticks(1, 5, 3.5, 6.0));
        let faults = [freeze(1.0, vec![(0, 0, 1)])];
        let a = input_with(&r, &[], &faults, analyse);
        assert_eq!(a.overlaps.len(), 1, "{:?}", a.overlaps);
        assert_eq!(a.overlaps[0].faults, vec![9]);
        assert!(
            a.overlaps[0].context.contains("guard-sigstop"),
            "{}",
            a.overlaps[0].context
        );
        // The frozen guard's command acted 3.0 s after the freeze: its watchdog was late.
        assert_eq!(a.problems.len(), 1, "{:?}", a.problems);
        assert_eq!(a.violations(), 2);
    }

    fn event(id: i64, kind: &str, epoch: i64, holder: &str, at: f64) -> LeaseEvent {
        LeaseEvent {
            id,
            name: "l".into(),
            epoch,
            holder: holder.into(),
            previous_holder: String::new(),
            kind: kind.into(),
            at: t(at),
        }
    }

    #[test]
    fn an_overlap_right_after_a_release_is_the_residual_case_within_its_bound() {
        // a released at 2.0 s (its pods had stopped), b acquired at 2.1 s and its
        // command acted from 2.3 s; a's command acted until `a_until`.
        let check = |a_until: f64, b_kind: &str| {
            let r = runs(&ticks(1, 4, 0.0, a_until), &ticks(1, 5, 2.3, 6.0));
            let events = vec![
                event(1, "acquire", 4, "a/op-1", 0.0),
                event(2, "release", 4, "a/op-1", 2.0),
                event(3, b_kind, 5, "b/op-1", 2.1),
            ];
            input_with_events(&r, &[], &[], events, analyse)
        };
        let a = check(2.8, "acquire");
        assert_eq!(a.overlaps.len(), 1);
        assert_eq!(a.overlaps[0].released, Some(t(2.0)));
        assert_eq!(a.violations(), 0);
        // Past ttl - margin (+ tolerance) after the release: its guard failed.
        let a = check(5.0, "acquire");
        assert_eq!((a.overlaps.len(), a.violations()), (1, 1));
        // b took it over from someone else: the release does not explain it.
        let a = check(2.8, "takeover");
        assert_eq!(a.violations(), 1);
    }

    #[test]
    fn a_frozen_guards_command_must_stop_before_the_lease_could_expire() {
        // Frozen at 1.0 s; the watchdog killed the command at 3.6 s (2.6 s later).
        let r = parse_runs(0, 0, &ticks(1, 4, 0.0, 3.6));
        let a = input_with(&r, &[], &[freeze(1.0, vec![(0, 0, 1)])], analyse);
        assert!(a.problems.is_empty(), "{:?}", a.problems);
        assert_eq!(a.watchdog_stops.len(), 1);
        assert!((a.watchdog_stops[0].3 - 2.6).abs() < 1e-6);
        // A run that was not frozen is none of its business.
        let a = input_with(&r, &[], &[freeze(1.0, vec![(0, 0, 2)])], analyse);
        assert!(a.watchdog_stops.is_empty() && a.problems.is_empty());
        // Nor a command that its guard, frozen while it waited, started after the thaw
        // (at 7.0 s).
        let r = parse_runs(0, 0, &ticks(1, 4, 7.5, 20.0));
        let a = input_with(&r, &[], &[freeze(1.0, vec![(0, 0, 1)])], analyse);
        assert!(a.watchdog_stops.is_empty() && a.problems.is_empty());
        // One started just before the freeze counts from the freeze.
        let r = parse_runs(0, 0, &ticks(1, 4, 1.02, 5.0));
        let a = input_with(&r, &[], &[freeze(1.0, vec![(0, 0, 1)])], analyse);
        assert_eq!(a.problems.len(), 1, "{:?}", a.problems);
    }

    #[test]
    fn a_guard_refusing_its_timings_or_exiting_oddly_is_a_violation() {
        let exit = |code, reason: &str| GuardExit {
            cluster: 0,
            lease: 0,
            run: 1,
            at: t(1.0),
            code,
            reason: reason.into(),
        };
        let exits = [
            exit(Some(3), "reaper-operator guard: stopped the command: ..."),
            exit(Some(2), "error: the first confirming read came too late"),
            exit(
                Some(2),
                "error: the lease's ttl (3.0 s) is too short for ...",
            ),
            exit(Some(0), "command exited"),
        ];
        let a = input_with(&[], &exits, &[], analyse);
        assert_eq!(a.problems.len(), 2, "{:?}", a.problems);
    }
}
