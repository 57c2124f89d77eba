//! The checker: pure functions over what the observer recorded, the fault log and the
//! `lease_event` history. See docs/chaos.md for the rules and the bound of check (a).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use chrono::{DateTime, Utc};
use reaper_operator::lease::LeaseEvent;

pub type Time = DateTime<Utc>;

/// A change of one Deployment, as the observer saw it.
#[derive(Clone, Debug)]
pub struct Sample {
    pub at: Time,
    pub cluster: usize,
    pub lease: usize,
    pub spec: i32,
    pub ready: i32,
}

/// A new `lease_workload` row (a cluster's report), as polled.
#[derive(Clone, Debug)]
pub struct Report {
    pub lease: usize,
    pub cluster: usize,
    pub reported_at: Time,
    pub running_pods: i32,
}

/// A time during which the observer's watch on a cluster was broken.
#[derive(Clone, Debug)]
pub struct Blind {
    pub cluster: usize,
    pub from: Time,
    pub to: Time,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Kill9,
    Pause,
    CutReset,
    CutBlackhole,
    RestartPgBouncer,
    RestartPostgres,
    RestartApiserver,
    FreezeCluster,
    CutCluster,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Kill9 => "kill-9",
            Kind::Pause => "sigstop",
            Kind::CutReset => "db-cut-reset",
            Kind::CutBlackhole => "db-cut-blackhole",
            Kind::RestartPgBouncer => "pgbouncer-restart",
            Kind::RestartPostgres => "postgres-restart",
            Kind::RestartApiserver => "apiserver-restart",
            Kind::FreezeCluster => "cluster-sigstop",
            Kind::CutCluster => "cluster-db-cut",
        }
    }
}

/// What a fault did to the operators' ability to act.
#[derive(Clone, Debug)]
pub enum Effect {
    /// These replicas could not act at all (killed until restarted, or stopped).
    Unable(Vec<usize>),
    /// These replicas could not reach the database (they can still scale down).
    Cut(Vec<usize>),
    /// Nobody could reach the database.
    DatabaseDown,
    /// Nobody in this cluster could read or scale a Deployment.
    ApiserverDown(usize),
}

#[derive(Clone, Debug)]
pub struct FaultRecord {
    pub id: usize,
    pub kind: Kind,
    pub target: String,
    pub effect: Effect,
    pub start: Time,
    pub healed: Option<Time>,
}

impl FaultRecord {
    /// Until when the fault may still keep its targets from acting: the heal plus the
    /// time to recover from it (a reconcile that failed against a restarting apiserver
    /// is retried after 5 s).
    pub fn effect_until(&self, end: Time) -> Time {
        let healed = self.healed.unwrap_or(end);
        let recovery = match self.kind {
            // Healed when the new process answers /readyz; then one reconcile.
            Kind::Kill9 => 2.0,
            Kind::Pause | Kind::FreezeCluster => 1.0,
            Kind::CutReset | Kind::CutBlackhole | Kind::CutCluster => 1.0,
            Kind::RestartPgBouncer | Kind::RestartPostgres => 2.0,
            Kind::RestartApiserver => 6.0,
        };
        healed + secs(recovery)
    }

    fn active(&self, t: Time, end: Time) -> bool {
        self.start <= t && t <= self.effect_until(end)
    }

    fn touches(&self, cluster: usize, replica_cluster: &[usize]) -> bool {
        match &self.effect {
            Effect::Unable(rs) | Effect::Cut(rs) => {
                rs.iter().any(|&r| replica_cluster[r] == cluster)
            }
            Effect::DatabaseDown => true,
            Effect::ApiserverDown(c) => *c == cluster,
        }
    }
}

pub fn secs(s: f64) -> chrono::Duration {
    chrono::Duration::milliseconds((s * 1000.0) as i64)
}

pub fn seconds(d: chrono::Duration) -> f64 {
    d.num_milliseconds() as f64 / 1000.0
}

pub struct Input<'a> {
    pub ttl: Duration,
    pub clusters: [&'a str; 2],
    /// Cluster index of each replica index.
    pub replica_cluster: &'a [usize],
    /// Holder name (`<cluster>/<identity>`) of each replica index.
    pub replica_names: &'a [String],
    pub leases: &'a [String],
    pub samples: &'a [Sample],
    pub reports: &'a [Report],
    pub blind: &'a [Blind],
    pub faults: &'a [FaultRecord],
    /// Per lease index, its `lease_event` rows in id order.
    pub events: &'a [Vec<LeaseEvent>],
    pub chaos_start: Time,
    /// End of observation.
    pub end: Time,
}

/// Both clusters at `spec.replicas >= 1` for one lease.
#[derive(Clone, Debug)]
pub struct Overlap {
    pub lease: usize,
    /// The cluster that was already up.
    pub first: usize,
    /// The cluster whose scale-up started the overlap.
    pub second: usize,
    pub start: Time,
    pub end: Time,
    pub causes: Vec<usize>,
    pub expected: bool,
    pub reason: String,
    /// The observer's watch on one of the clusters was broken around the start.
    pub observer_blind: bool,
}

/// One tenure from the audit history.
#[derive(Clone, Debug)]
pub struct Tenure {
    pub holder: String,
    pub epoch: i64,
    pub start: Time,
    pub end: Option<Time>,
}

#[derive(Clone, Debug)]
pub struct Failover {
    pub lease: usize,
    pub fault: Option<usize>,
    pub from: String,
    pub to: String,
    pub epoch: i64,
    /// Fault start → lease acquired.
    pub acquired: f64,
    /// Fault start → the new holder's Deployment ready (`None`: lost before ready).
    pub ready: Option<f64>,
}

impl Failover {
    pub fn class(&self, clusters: &[&str; 2]) -> &'static str {
        if self.from == self.to {
            "same replica"
        } else if cluster_of(&self.from, clusters) == cluster_of(&self.to, clusters) {
            "peer in the same cluster"
        } else {
            "other cluster"
        }
    }
}

#[derive(Clone, Debug)]
pub struct StrayScaleUp {
    pub lease: usize,
    pub cluster: usize,
    pub at: Time,
}

#[derive(Debug, Default)]
pub struct Analysis {
    pub overlaps: Vec<Overlap>,
    /// Check (b), per lease.
    pub audit: Vec<String>,
    pub events: usize,
    pub tenures: Vec<Vec<Tenure>>,
    pub failovers: Vec<Failover>,
    /// Scale-ups (0 → ≥ 1) seen in a cluster that did not hold the lease then.
    pub stray_scale_ups: Vec<StrayScaleUp>,
    /// Per lease: seconds without a ready replica in either cluster during chaos.
    pub unavailable: Vec<f64>,
    /// Both clusters with a ready replica at once: `(lease, start, end)`.
    pub ready_overlaps: Vec<(usize, Time, Time)>,
}

impl Analysis {
    pub fn violations(&self) -> usize {
        self.overlaps.iter().filter(|o| !o.expected).count() + self.audit.len()
    }
}

pub fn cluster_of(holder: &str, clusters: &[&str; 2]) -> Option<usize> {
    let c = holder.split_once('/').map_or(holder, |(c, _)| c);
    clusters.iter().position(|n| *n == c)
}

/// `(spec, ready)` of one Deployment over time.
pub struct Timeline(Vec<(Time, i32, i32)>);

impl Timeline {
    pub fn of(samples: &[Sample], cluster: usize, lease: usize) -> Self {
        let mut v: Vec<(Time, i32, i32)> = samples
            .iter()
            .filter(|s| s.cluster == cluster && s.lease == lease)
            .map(|s| (s.at, s.spec, s.ready))
            .collect();
        v.sort_by_key(|s| s.0);
        Self(v)
    }

    pub fn at(&self, t: Time) -> (i32, i32) {
        match self.0.partition_point(|s| s.0 <= t) {
            0 => (0, 0),
            i => (self.0[i - 1].1, self.0[i - 1].2),
        }
    }

    /// First time in `[from, until)` with a ready replica.
    pub fn ready_from(&self, from: Time, until: Time) -> Option<Time> {
        if self.at(from).1 >= 1 {
            return Some(from);
        }
        self.0
            .iter()
            .find(|s| s.0 > from && s.0 < until && s.2 >= 1)
            .map(|s| s.0)
    }
}

/// A cluster in which no operator could scale the Deployment down: its apiserver was
/// down, or each replica was killed or stopped or cut off from the database, and at
/// least one was killed or stopped (a replica that is only cut off scales down what it
/// scaled up itself, so a cluster that is merely cut off must fence itself).
pub fn fence_incapable(input: &Input<'_>, cluster: usize, t: Time) -> bool {
    let active: Vec<&FaultRecord> = input
        .faults
        .iter()
        .filter(|f| f.active(t, input.end))
        .collect();
    if active
        .iter()
        .any(|f| matches!(f.effect, Effect::ApiserverDown(c) if c == cluster))
    {
        return true;
    }
    let db_down = active
        .iter()
        .any(|f| matches!(f.effect, Effect::DatabaseDown));
    let mut any_unable = false;
    for (r, _) in input
        .replica_cluster
        .iter()
        .enumerate()
        .filter(|(_, c)| **c == cluster)
    {
        let unable = active
            .iter()
            .any(|f| matches!(&f.effect, Effect::Unable(rs) if rs.contains(&r)));
        let cut = db_down
            || active
                .iter()
                .any(|f| matches!(&f.effect, Effect::Cut(rs) if rs.contains(&r)));
        if !(unable || cut) {
            return false;
        }
        any_unable |= unable;
    }
    any_unable
}

pub fn analyse(input: &Input<'_>) -> Analysis {
    let mut analysis = Analysis::default();
    for lease in 0..input.leases.len() {
        let timelines = [
            Timeline::of(input.samples, 0, lease),
            Timeline::of(input.samples, 1, lease),
        ];
        analysis.overlaps.extend(overlaps(input, lease));
        let events = input.events.get(lease).map(Vec::as_slice).unwrap_or(&[]);
        analysis.events += events.len();
        let (tenures, problems) = audit(events);
        analysis.audit.extend(
            problems
                .into_iter()
                .map(|p| format!("lease {}: {p}", input.leases[lease])),
        );
        failovers(input, lease, &tenures, &timelines, &mut analysis.failovers);
        stray_scale_ups(input, lease, &tenures, &mut analysis.stray_scale_ups);
        analysis.unavailable.push(unavailable(input, &timelines));
        analysis
            .ready_overlaps
            .extend(both_ready(input, lease, &timelines));
        analysis.tenures.push(tenures);
    }
    analysis
}

/// Check (a) for one lease.
pub fn overlaps(input: &Input<'_>, lease: usize) -> Vec<Overlap> {
    let mut samples: Vec<&Sample> = input.samples.iter().filter(|s| s.lease == lease).collect();
    samples.sort_by_key(|s| s.at);
    let mut spec = [0, 0];
    let mut open: Option<(Time, usize)> = None;
    let mut found = Vec::new();
    for s in samples {
        spec[s.cluster] = s.spec;
        let both = spec[0] >= 1 && spec[1] >= 1;
        match (both, open) {
            (true, None) => open = Some((s.at, s.cluster)),
            (false, Some((start, second))) => {
                found.push(classify(input, lease, second, start, s.at));
                open = None;
            }
            _ => {}
        }
    }
    if let Some((start, second)) = open {
        found.push(classify(input, lease, second, start, input.end));
    }
    found
}

fn classify(input: &Input<'_>, lease: usize, second: usize, start: Time, end: Time) -> Overlap {
    let first = 1 - second;
    let ttl = input.ttl.as_secs_f64();
    let last_report = input
        .reports
        .iter()
        .filter(|r| r.lease == lease && r.cluster == first && r.reported_at <= start)
        .max_by_key(|r| r.reported_at);
    let report_age = last_report.map(|r| seconds(start - r.reported_at));
    // The new holder judged the age a moment before it scaled up: a little tolerance.
    let stale = report_age.is_none_or(|age| age >= ttl - 0.25);
    let window_start = match last_report {
        Some(r) => r.reported_at - secs(1.0),
        None => start - secs(ttl + 1.0),
    };
    let mut incapable = false;
    let mut t = window_start;
    while t <= start {
        if fence_incapable(input, first, t) {
            incapable = true;
            break;
        }
        t += secs(0.1);
    }
    let causes: Vec<usize> = input
        .faults
        .iter()
        .filter(|f| {
            f.start <= start
                && f.effect_until(input.end) >= window_start
                && f.touches(first, input.replica_cluster)
        })
        .map(|f| f.id)
        .collect();
    let (c1, c2) = (input.clusters[first], input.clusters[second]);
    let age = report_age.map_or("never".to_owned(), |a| format!("{a:.1} s old"));
    let (expected, reason) = if stale && incapable {
        (
            true,
            format!(
                "no operator of cluster {c1} could act (faults {causes:?}) and its workload report was {age} \
                 (>= ttl), so the holder in {c2} scaled up as designed; only the workload's fencing protects \
                 until {c1}'s operators act again"
            ),
        )
    } else if !stale {
        let pods = last_report.map_or(0, |r| r.running_pods);
        (
            false,
            format!(
                "cluster {c1} was up and its workload report was only {age} ({pods} running pod(s)) when \
                 {c2} scaled up"
            ),
        )
    } else {
        (
            false,
            format!(
                "cluster {c1}'s report was {age} but no injected fault kept all of its operators from \
                 acting (faults nearby: {causes:?})"
            ),
        )
    };
    let observer_blind = input
        .blind
        .iter()
        .any(|b| b.from - secs(1.0) <= start && start <= b.to + secs(1.0));
    Overlap {
        lease,
        first,
        second,
        start,
        end,
        causes,
        expected,
        reason,
        observer_blind,
    }
}

/// Check (b): epochs strictly increase, and every acquire starts a tenure only when none
/// is open, every takeover ends the open one, every release ends its own.
pub fn audit(events: &[LeaseEvent]) -> (Vec<Tenure>, Vec<String>) {
    let mut tenures: Vec<Tenure> = Vec::new();
    let mut problems = Vec::new();
    let mut open: Option<usize> = None;
    let mut max_epoch = i64::MIN;
    let mut last_at: Option<Time> = None;
    for e in events {
        let what = format!(
            "event {} ({} epoch {} by {:?}, previous {:?}, at {})",
            e.id, e.kind, e.epoch, e.holder, e.previous_holder, e.at
        );
        if last_at.is_some_and(|t| e.at < t) {
            problems.push(format!("{what}: earlier than the event before it"));
        }
        last_at = Some(e.at);
        match e.kind.as_str() {
            "acquire" | "takeover" => {
                if e.epoch <= max_epoch {
                    problems.push(format!(
                        "{what}: epoch does not increase (highest so far {max_epoch})"
                    ));
                }
                max_epoch = max_epoch.max(e.epoch);
                match (e.kind.as_str(), open) {
                    ("acquire", Some(i)) => problems.push(format!(
                        "{what}: acquired while {} held epoch {} (holders overlap)",
                        tenures[i].holder, tenures[i].epoch
                    )),
                    ("takeover", None) => {
                        problems.push(format!("{what}: a takeover although nobody held the lease"))
                    }
                    ("takeover", Some(i)) if tenures[i].holder != e.previous_holder => problems
                        .push(format!(
                            "{what}: displaced {:?} but {} held epoch {}",
                            e.previous_holder, tenures[i].holder, tenures[i].epoch
                        )),
                    _ => {}
                }
                if let Some(i) = open {
                    tenures[i].end = Some(e.at);
                }
                tenures.push(Tenure {
                    holder: e.holder.clone(),
                    epoch: e.epoch,
                    start: e.at,
                    end: None,
                });
                open = Some(tenures.len() - 1);
            }
            "release" => match open {
                Some(i) if tenures[i].holder == e.holder && tenures[i].epoch == e.epoch => {
                    tenures[i].end = Some(e.at);
                    open = None;
                }
                Some(i) => problems.push(format!(
                    "{what}: released, but {} holds epoch {}",
                    tenures[i].holder, tenures[i].epoch
                )),
                None => problems.push(format!("{what}: released a lease nobody held")),
            },
            other => problems.push(format!("{what}: unknown kind {other:?}")),
        }
    }
    (tenures, problems)
}

fn failovers(
    input: &Input<'_>,
    lease: usize,
    tenures: &[Tenure],
    timelines: &[Timeline; 2],
    out: &mut Vec<Failover>,
) {
    for (i, tenure) in tenures.iter().enumerate() {
        if tenure.start < input.chaos_start || i == 0 {
            continue;
        }
        // The latest fault that hit the previous holder (or the whole database) and
        // whose effect had not long worn off; `None`: a leadership change no injected
        // fault explains, listed separately.
        let previous = input
            .replica_names
            .iter()
            .position(|n| *n == tenures[i - 1].holder);
        let ttl = input.ttl.as_secs_f64();
        let fault = input
            .faults
            .iter()
            .filter(|f| {
                f.start <= tenure.start
                    && tenure.start <= f.effect_until(input.end) + secs(ttl + 5.0)
                    && match &f.effect {
                        Effect::DatabaseDown => true,
                        Effect::Unable(rs) | Effect::Cut(rs) => {
                            previous.is_some_and(|p| rs.contains(&p))
                        }
                        Effect::ApiserverDown(_) => false,
                    }
            })
            .max_by_key(|f| f.start);
        let origin = fault.map_or(tenure.start, |f| f.start);
        let ready = cluster_of(&tenure.holder, &input.clusters)
            .and_then(|c| timelines[c].ready_from(tenure.start, tenure.end.unwrap_or(input.end)));
        out.push(Failover {
            lease,
            fault: fault.map(|f| f.id),
            from: tenures[i - 1].holder.clone(),
            to: tenure.holder.clone(),
            epoch: tenure.epoch,
            acquired: seconds(tenure.start - origin),
            ready: ready.map(|t| seconds(t - origin)),
        });
    }
}

fn stray_scale_ups(
    input: &Input<'_>,
    lease: usize,
    tenures: &[Tenure],
    out: &mut Vec<StrayScaleUp>,
) {
    let Some(first) = tenures.first() else { return };
    for cluster in 0..2 {
        let timeline = Timeline::of(input.samples, cluster, lease);
        let mut previous = 0;
        for &(at, spec, _) in &timeline.0 {
            if previous == 0 && spec >= 1 && at >= first.start {
                let held = tenures.iter().any(|t| {
                    cluster_of(&t.holder, &input.clusters) == Some(cluster)
                        && t.start <= at + secs(0.05)
                        && t.end.is_none_or(|end| at <= end + secs(1.0))
                });
                if !held {
                    out.push(StrayScaleUp { lease, cluster, at });
                }
            }
            previous = spec;
        }
    }
}

fn both_ready(
    input: &Input<'_>,
    lease: usize,
    timelines: &[Timeline; 2],
) -> Vec<(usize, Time, Time)> {
    let mut points: Vec<Time> = timelines
        .iter()
        .flat_map(|t| t.0.iter().map(|s| s.0))
        .collect();
    points.push(input.end);
    points.sort();
    let mut found: Vec<(usize, Time, Time)> = Vec::new();
    for w in points.windows(2) {
        if timelines.iter().all(|t| t.at(w[0]).1 >= 1) {
            match found.last_mut() {
                Some(last) if last.2 == w[0] => last.2 = w[1],
                _ => found.push((lease, w[0], w[1])),
            }
        }
    }
    found
}

fn unavailable(input: &Input<'_>, timelines: &[Timeline; 2]) -> f64 {
    let mut points: Vec<Time> = timelines
        .iter()
        .flat_map(|t| t.0.iter().map(|s| s.0))
        .filter(|t| *t > input.chaos_start && *t < input.end)
        .collect();
    points.push(input.chaos_start);
    points.push(input.end);
    points.sort();
    points
        .windows(2)
        .filter(|w| timelines.iter().all(|t| t.at(w[0]).1 < 1))
        .map(|w| seconds(w[1] - w[0]))
        .sum()
}

pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

pub fn median(sorted: &[f64]) -> f64 {
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// The printed summary.
pub fn summary(
    input: &Input<'_>,
    analysis: &Analysis,
    converged: &Result<f64, String>,
    bound_c: f64,
) -> String {
    let mut s = String::new();
    let by_kind: BTreeMap<&str, usize> = input.faults.iter().fold(BTreeMap::new(), |mut m, f| {
        *m.entry(f.kind.name()).or_default() += 1;
        m
    });
    let kinds: Vec<String> = by_kind.iter().map(|(k, n)| format!("{k} {n}")).collect();
    let _ = writeln!(
        s,
        "faults injected: {} ({})",
        input.faults.len(),
        kinds.join(", ")
    );
    let mut classes: BTreeMap<&str, usize> = BTreeMap::new();
    for f in &analysis.failovers {
        *classes.entry(f.class(&input.clusters)).or_default() += 1;
    }
    let classes: Vec<String> = classes.iter().map(|(k, n)| format!("{k} {n}")).collect();
    let _ = writeln!(
        s,
        "failovers (new tenures during chaos): {} ({})",
        analysis.failovers.len(),
        classes.join(", ")
    );
    let mut ready: Vec<(f64, &Failover)> = analysis
        .failovers
        .iter()
        .filter(|f| f.fault.is_some())
        .filter_map(|f| f.ready.map(|r| (r, f)))
        .collect();
    ready.sort_by(|a, b| a.0.total_cmp(&b.0));
    let times: Vec<f64> = ready.iter().map(|r| r.0).collect();
    if let Some((worst, f)) = ready.last() {
        let kind = f
            .fault
            .and_then(|id| input.faults.iter().find(|x| x.id == id))
            .map_or("?", |x| x.kind.name());
        let _ = writeln!(
            s,
            "failover time (fault -> new holder's Deployment ready): median {:.2} s, p90 {:.2} s, worst {worst:.2} s \
             (fault #{} {kind}, lease {}, {} -> {} at epoch {})",
            median(&times),
            percentile(&times, 0.9),
            f.fault.unwrap_or(0),
            input.leases[f.lease],
            f.from,
            f.to,
            f.epoch
        );
    }
    let mut per_kind: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for (t, f) in &ready {
        if let Some(x) = f
            .fault
            .and_then(|id| input.faults.iter().find(|x| x.id == id))
        {
            per_kind.entry(x.kind.name()).or_default().push(*t);
        }
    }
    for (kind, times) in &per_kind {
        let _ = writeln!(
            s,
            "  after {kind}: n={} median {:.2} s, worst {:.2} s",
            times.len(),
            median(times),
            times.last().copied().unwrap_or(f64::NAN)
        );
    }
    let unattributed: Vec<String> = analysis
        .failovers
        .iter()
        .filter(|f| f.fault.is_none())
        .map(|f| {
            format!(
                "{} {} -> {} (epoch {})",
                input.leases[f.lease], f.from, f.to, f.epoch
            )
        })
        .collect();
    if !unattributed.is_empty() {
        let _ = writeln!(
            s,
            "  leadership changes no injected fault explains (not timed): {}",
            unattributed.join("; ")
        );
    }
    let lost = analysis
        .failovers
        .iter()
        .filter(|f| f.ready.is_none())
        .count();
    if lost > 0 {
        let _ = writeln!(
            s,
            "  tenures that ended before their workload was ready: {lost}"
        );
    }
    let unavailable: Vec<String> = analysis
        .unavailable
        .iter()
        .zip(input.leases)
        .map(|(u, l)| format!("{l} {u:.1} s"))
        .collect();
    let _ = writeln!(
        s,
        "no ready replica in either cluster, during chaos: {}",
        unavailable.join(", ")
    );
    let expected = analysis.overlaps.iter().filter(|o| o.expected).count();
    let bad = analysis.overlaps.len() - expected;
    let _ = writeln!(
        s,
        "(a) overlaps of spec.replicas >= 1 in both clusters: {expected} expected (fencing), {bad} violation(s)"
    );
    if expected > 0 {
        let lengths: Vec<f64> = analysis
            .overlaps
            .iter()
            .filter(|o| o.expected)
            .map(|o| seconds(o.end - o.start))
            .collect();
        let _ = writeln!(
            s,
            "    expected overlaps lasted {:.2} to {:.2} s",
            lengths.iter().copied().fold(f64::INFINITY, f64::min),
            lengths.iter().copied().fold(0.0, f64::max)
        );
    }
    // Every violation, and the first few expected overlaps (all are in timeline.txt).
    const SHOWN: usize = 6;
    let mut shown_expected = 0;
    for o in &analysis.overlaps {
        if o.expected {
            shown_expected += 1;
            if shown_expected > SHOWN {
                continue;
            }
        }
        let _ = writeln!(
            s,
            "    {} lease {} {} -> {}: {:.2} s from {}{}: {}",
            if o.expected { "expected" } else { "VIOLATION" },
            input.leases[o.lease],
            input.clusters[o.first],
            input.clusters[o.second],
            seconds(o.end - o.start),
            o.start.format("%H:%M:%S%.3f"),
            if o.observer_blind {
                " (observer was reconnecting)"
            } else {
                ""
            },
            o.reason
        );
    }
    if expected > SHOWN {
        let _ = writeln!(
            s,
            "    ... and {} more expected overlaps (all in timeline.txt)",
            expected - SHOWN
        );
    }
    // Pods ready in both clusters: informational, since a pod may take a moment to
    // stop after its Deployment went to 0 (the README's "time a pod takes to stop").
    let outside: Vec<String> = analysis
        .ready_overlaps
        .iter()
        .filter(|(lease, start, _)| {
            !analysis.overlaps.iter().any(|o| {
                o.expected && o.lease == *lease && o.start <= *start && *start <= o.end + secs(5.0)
            })
        })
        .map(|(lease, start, end)| {
            format!(
                "{} at {} for {:.2} s",
                input.leases[*lease],
                start.format("%H:%M:%S%.3f"),
                seconds(*end - *start)
            )
        })
        .collect();
    let _ = writeln!(
        s,
        "ready replicas in both clusters at once (informational): {} time(s), {:.1} s in total; outside the expected overlaps: {}",
        analysis.ready_overlaps.len(),
        analysis
            .ready_overlaps
            .iter()
            .map(|(_, a, b)| seconds(*b - *a))
            .sum::<f64>()
            .abs(),
        if outside.is_empty() {
            "none".to_owned()
        } else {
            outside.join("; ")
        }
    );
    let _ = writeln!(
        s,
        "(b) audit history: {} events, {} tenures: {} violation(s)",
        analysis.events,
        analysis.tenures.iter().map(Vec::len).sum::<usize>(),
        analysis.audit.len()
    );
    for a in &analysis.audit {
        let _ = writeln!(s, "    VIOLATION {a}");
    }
    match converged {
        Ok(t) => {
            let _ = writeln!(
                s,
                "(c) one leader and one ready replica per lease {t:.2} s after the last heal (bound {bound_c:.0} s): 0 violations"
            );
        }
        Err(e) => {
            let _ = writeln!(s, "(c) VIOLATION: {e}");
        }
    }
    let _ = writeln!(
        s,
        "scale-ups seen in a cluster that did not hold the lease (informational): {}",
        analysis.stray_scale_ups.len()
    );
    for x in &analysis.stray_scale_ups {
        let _ = writeln!(
            s,
            "    lease {} cluster {} at {}",
            input.leases[x.lease],
            input.clusters[x.cluster],
            x.at.format("%H:%M:%S%.3f")
        );
    }
    let blind: Vec<String> = (0..2)
        .map(|c| {
            let total: f64 = input
                .blind
                .iter()
                .filter(|b| b.cluster == c)
                .map(|b| seconds(b.to - b.from))
                .sum::<f64>()
                .abs();
            format!("{} {total:.1} s", input.clusters[c])
        })
        .collect();
    let _ = writeln!(
        s,
        "observer: {} Deployment changes, {} workload reports; watch reconnecting: {}",
        input.samples.len(),
        input.reports.len(),
        blind.join(", ")
    );
    let violations = analysis.violations() + usize::from(converged.is_err());
    let _ = writeln!(s, "violations: {violations}");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: f64) -> Time {
        DateTime::from_timestamp(1_800_000_000, 0).unwrap() + secs(s)
    }

    fn sample(at: f64, cluster: usize, spec: i32) -> Sample {
        Sample {
            at: t(at),
            cluster,
            lease: 0,
            spec,
            ready: spec,
        }
    }

    fn event(id: i64, kind: &str, epoch: i64, holder: &str, previous: &str, at: f64) -> LeaseEvent {
        LeaseEvent {
            id,
            name: "l".into(),
            epoch,
            holder: holder.into(),
            previous_holder: previous.into(),
            kind: kind.into(),
            at: t(at),
        }
    }

    fn names() -> &'static [String] {
        static NAMES: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
        NAMES.get_or_init(|| {
            ["a/op-1", "a/op-2", "b/op-1", "b/op-2"]
                .map(str::to_owned)
                .to_vec()
        })
    }

    fn input<'a>(
        leases: &'a [String],
        samples: &'a [Sample],
        reports: &'a [Report],
        faults: &'a [FaultRecord],
        events: &'a [Vec<LeaseEvent>],
    ) -> Input<'a> {
        Input {
            ttl: Duration::from_secs(3),
            clusters: ["a", "b"],
            replica_cluster: &[0, 0, 1, 1],
            replica_names: names(),
            leases,
            samples,
            reports,
            blind: &[],
            faults,
            events,
            chaos_start: t(0.0),
            end: t(100.0),
        }
    }

    #[test]
    fn overlap_with_a_fresh_report_is_a_violation() {
        let leases = ["l".to_owned()];
        let samples = [sample(1.0, 0, 1), sample(10.0, 1, 1), sample(10.5, 0, 0)];
        let reports = [Report {
            lease: 0,
            cluster: 0,
            reported_at: t(9.5),
            running_pods: 1,
        }];
        let a = analyse(&input(&leases, &samples, &reports, &[], &[]));
        assert_eq!(a.overlaps.len(), 1);
        assert!(!a.overlaps[0].expected, "{:?}", a.overlaps[0]);
        assert_eq!(a.violations(), 1);
    }

    /// Cluster `a` leads, a fault hits it at 5.2 s (healed at 13.5 s), and cluster `b`
    /// scales up at 10 s while `a`'s last report (5 s) still shows its pod running.
    fn overlap_during_a_fault_on_cluster_a(kind: Kind, effect: Effect) -> Analysis {
        let leases = ["l".to_owned()];
        let samples = [sample(1.0, 0, 1), sample(10.0, 1, 1), sample(14.0, 0, 0)];
        let reports = [Report {
            lease: 0,
            cluster: 0,
            reported_at: t(5.0),
            running_pods: 1,
        }];
        let fault = FaultRecord {
            id: 1,
            kind,
            target: "a".into(),
            effect,
            start: t(5.2),
            healed: Some(t(13.5)),
        };
        analyse(&input(&leases, &samples, &reports, &[fault], &[]))
    }

    #[test]
    fn overlap_after_a_frozen_cluster_is_expected() {
        let a =
            overlap_during_a_fault_on_cluster_a(Kind::FreezeCluster, Effect::Unable(vec![0, 1]));
        assert_eq!(a.overlaps.len(), 1);
        assert!(a.overlaps[0].expected, "{:?}", a.overlaps[0]);
        assert_eq!(a.overlaps[0].causes, vec![1]);
        assert_eq!(a.violations(), 0);
    }

    #[test]
    fn a_cluster_only_cut_off_must_fence_itself() {
        let a = overlap_during_a_fault_on_cluster_a(Kind::CutCluster, Effect::Cut(vec![0, 1]));
        assert_eq!(a.violations(), 1, "{:?}", a.overlaps);
    }

    #[test]
    fn audit_finds_overlapping_holders_and_repeated_epochs() {
        let ok = [
            event(1, "acquire", 1, "a/op-1", "", 0.0),
            event(2, "takeover", 2, "b/op-1", "a/op-1", 5.0),
            event(3, "release", 2, "b/op-1", "", 9.0),
            event(4, "acquire", 3, "a/op-2", "", 9.5),
        ];
        let (tenures, problems) = audit(&ok);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(tenures.len(), 3);
        assert_eq!(tenures[1].end, Some(t(9.0)));

        let bad = [
            event(1, "acquire", 1, "a/op-1", "", 0.0),
            event(2, "acquire", 2, "b/op-1", "", 1.0),
            event(3, "takeover", 2, "a/op-2", "a/op-1", 5.0),
            event(4, "release", 1, "a/op-1", "", 6.0),
        ];
        let (_, problems) = audit(&bad);
        assert_eq!(problems.len(), 4, "{problems:?}");
    }

    #[test]
    fn failover_time_runs_from_the_fault_to_the_ready_workload() {
        let leases = ["l".to_owned()];
        let samples = [
            sample(1.0, 0, 1),
            sample(12.0, 0, 0),
            Sample {
                at: t(14.0),
                cluster: 1,
                lease: 0,
                spec: 1,
                ready: 0,
            },
            Sample {
                at: t(14.5),
                cluster: 1,
                lease: 0,
                spec: 1,
                ready: 1,
            },
        ];
        let events = [vec![
            event(1, "acquire", 1, "a/op-1", "", 0.5),
            event(2, "takeover", 2, "b/op-2", "a/op-1", 13.5),
        ]];
        let kill = FaultRecord {
            id: 7,
            kind: Kind::Kill9,
            target: "a/op-1".into(),
            effect: Effect::Unable(vec![0]),
            start: t(10.0),
            healed: Some(t(12.0)),
        };
        let a = analyse(&input(&leases, &samples, &[], &[kill], &events));
        assert_eq!(a.failovers.len(), 1);
        let f = &a.failovers[0];
        assert_eq!(f.fault, Some(7));
        assert!(
            (f.acquired - 3.5).abs() < 1e-6 && (f.ready.unwrap() - 4.5).abs() < 1e-6,
            "{f:?}"
        );
        assert_eq!(f.class(&["a", "b"]), "other cluster");
        // Nothing ready before 1.0 (chaos starts at 0) and from 12.0 to 14.5.
        assert!((a.unavailable[0] - 3.5).abs() < 1e-6, "{:?}", a.unavailable);
    }
}
