//! The checker: pure functions over what the observer recorded, the fault log and the
//! `lease_event` history. See docs/chaos.md for the rules and the bound of check (a).
//!
//! Check (a) is about pods, not about `spec.replicas`: a pod counts from the moment the
//! observer saw it until it was gone (Terminating included), because a stopping pod may
//! still act.

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

/// One pod in a cluster's chaos namespace, from the moment the observer saw it until
/// it was gone.
#[derive(Clone, Debug)]
pub struct PodLife {
    pub cluster: usize,
    /// Its `app` label: the name of its Deployment.
    pub app: String,
    pub name: String,
    pub appeared: Time,
    /// When the observer first saw it Terminating (a `deletionTimestamp`).
    pub deleting: Option<Time>,
    /// When it was gone (deleted, or finished); `None`: still there at the end.
    pub gone: Option<Time>,
}

impl PodLife {
    fn until(&self, end: Time) -> Time {
        self.gone.unwrap_or(end)
    }
}

/// A change of `spec.replicas` of a Deployment that no lease owns (a second Reaper's).
#[derive(Clone, Debug)]
pub struct OtherSample {
    pub at: Time,
    pub cluster: usize,
    pub name: String,
    pub spec: i32,
}

/// A new `lease_workload` row (a cluster's report), as polled.
#[derive(Clone, Debug)]
pub struct Report {
    pub lease: usize,
    pub cluster: usize,
    pub reported_at: Time,
    pub running_pods: i32,
    /// How old its writer lets it get before others presume that cluster dead or cut
    /// off (`stale_after_ms`: the writer's ttl plus its pods' grace period).
    pub stale_after: Duration,
}

/// A time during which one of the observer's watches on a cluster was broken.
#[derive(Clone, Debug)]
pub struct Blind {
    /// `"deployments"` or `"pods"`.
    pub watch: &'static str,
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
    FailoverPostgres,
    RestartApiserver,
    FreezeCluster,
    CutCluster,
    StopOperators,
    RecreateReaper,
    DeleteDeployment,
    SecondReaperSameNamespace,
    SecondReaperOtherNamespace,
    GuardSigstop,
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
            Kind::FailoverPostgres => "postgres-failover",
            Kind::RestartApiserver => "apiserver-restart",
            Kind::FreezeCluster => "cluster-sigstop",
            Kind::CutCluster => "cluster-db-cut",
            Kind::StopOperators => "operator-scale-0",
            Kind::RecreateReaper => "reaper-recreate",
            Kind::DeleteDeployment => "deployment-delete",
            Kind::SecondReaperSameNamespace => "second-reaper-same-ns",
            Kind::SecondReaperOtherNamespace => "second-reaper-other-ns",
            Kind::GuardSigstop => "guard-sigstop",
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
    /// These replicas were shut down with SIGTERM (then started again). A graceful
    /// shutdown waits for the pods of the leases it holds: never an excuse for an
    /// overlap.
    Stopped(Vec<usize>),
    /// A lease's Reaper (and maybe its Deployment) was deleted in one cluster and
    /// created again: the operators keep every ability.
    Objects { cluster: usize, lease: usize },
    /// A second Reaper named this lease in one cluster. `deployment`: the Deployment of
    /// one that must be refused, which must never run a pod.
    SecondReaper {
        cluster: usize,
        lease: usize,
        deployment: Option<String>,
    },
}

#[derive(Clone, Debug)]
pub struct FaultRecord {
    pub id: usize,
    pub kind: Kind,
    pub target: String,
    pub effect: Effect,
    pub start: Time,
    pub healed: Option<Time>,
    /// What the injector found wrong while it held or healed the fault (a second Reaper
    /// not refused, a deleted Reaper never finalized, ...): violations.
    pub problems: Vec<String>,
    /// `guard-sigstop`: the guards it froze, as `(cluster, lease, run)`.
    pub frozen_guards: Vec<(usize, usize, u64)>,
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
            Kind::Pause | Kind::FreezeCluster | Kind::GuardSigstop => 1.0,
            Kind::CutReset | Kind::CutBlackhole | Kind::CutCluster => 1.0,
            Kind::RestartPgBouncer | Kind::RestartPostgres => 2.0,
            // Healed when the new standby streams; nothing is acquired until a ttl (3 s)
            // after the new primary first saw an acquire, then one retry period.
            Kind::FailoverPostgres => 5.0,
            Kind::RestartApiserver => 6.0,
            // Healed when the replicas answer /readyz again, or the objects are back.
            Kind::StopOperators | Kind::RecreateReaper | Kind::DeleteDeployment => 2.0,
            Kind::SecondReaperSameNamespace | Kind::SecondReaperOtherNamespace => 1.0,
        };
        healed + secs(recovery)
    }

    fn active(&self, t: Time, end: Time) -> bool {
        self.start <= t && t <= self.effect_until(end)
    }

    fn touches(&self, cluster: usize, replica_cluster: &[usize]) -> bool {
        match &self.effect {
            Effect::Unable(rs) | Effect::Cut(rs) | Effect::Stopped(rs) => {
                rs.iter().any(|&r| replica_cluster[r] == cluster)
            }
            Effect::DatabaseDown => true,
            Effect::ApiserverDown(c)
            | Effect::Objects { cluster: c, .. }
            | Effect::SecondReaper { cluster: c, .. } => *c == cluster,
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
    /// Per lease index: its Deployment (the `app` label of its pods).
    pub deployments: &'a [String],
    pub samples: &'a [Sample],
    pub pods: &'a [PodLife],
    pub other_samples: &'a [OtherSample],
    pub reports: &'a [Report],
    pub blind: &'a [Blind],
    pub faults: &'a [FaultRecord],
    /// Per lease index, its `lease_event` rows in id order.
    pub events: &'a [Vec<LeaseEvent>],
    /// The rows of second Reapers in other namespaces, with their events.
    pub extra_events: &'a [(String, Vec<LeaseEvent>)],
    pub chaos_start: Time,
    /// End of observation.
    pub end: Time,
}

/// Live pods of one lease in both clusters at once.
#[derive(Clone, Debug)]
pub struct Overlap {
    pub lease: usize,
    /// The cluster whose pod was already there.
    pub first: usize,
    /// The cluster whose new pod started the overlap.
    pub second: usize,
    /// When that cluster's Deployment went to 1 (what its leader judged the reports
    /// at), or the pod's appearance when no scale-up was seen.
    pub scaled_up: Time,
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
    /// Check (e): two live pods of one lease in one cluster (a new pod while the old one
    /// still stops): `(lease, cluster, start, end)`.
    pub double_pods: Vec<(usize, usize, Time, Time)>,
    /// Per lease: seconds from a pod's deletion to its end.
    pub stop_times: Vec<Vec<f64>>,
    /// Seconds between the last pod of one cluster and the first of the other, at each
    /// cross-cluster handover without overlap (all leases).
    pub handover_gaps: Vec<f64>,
    /// Check (d): what the object faults found (second Reapers, deletions).
    pub objects: Vec<String>,
}

impl Analysis {
    pub fn violations(&self) -> usize {
        self.overlaps.iter().filter(|o| !o.expected).count()
            + self.audit.len()
            + self.objects.len()
            + self.double_pods.len()
    }
}

/// Which of `clusters` `holder` (as a row stores it) is a replica of.
pub fn cluster_of(holder: &str, clusters: &[&str; 2]) -> Option<usize> {
    let cluster = reaper_operator::lease::cluster_of(holder)?;
    clusters.iter().position(|n| *n == cluster)
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

/// What the faults active at `t` left of one cluster's operators.
struct Ability {
    /// Its apiserver was down: nobody there could read or scale anything.
    apiserver_down: bool,
    /// Every replica was killed, stopped or cut off from the database.
    all_unable_or_cut: bool,
    /// At least one replica was killed or stopped.
    any_unable: bool,
}

fn ability(input: &Input<'_>, cluster: usize, t: Time) -> Ability {
    let active: Vec<&FaultRecord> = input
        .faults
        .iter()
        .filter(|f| f.active(t, input.end))
        .collect();
    let apiserver_down = active
        .iter()
        .any(|f| matches!(f.effect, Effect::ApiserverDown(c) if c == cluster));
    let db_down = active
        .iter()
        .any(|f| matches!(f.effect, Effect::DatabaseDown));
    let mut all_unable_or_cut = true;
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
        all_unable_or_cut &= unable || cut;
        any_unable |= unable;
    }
    Ability {
        apiserver_down,
        all_unable_or_cut,
        any_unable,
    }
}

/// A cluster in which no operator could scale the Deployment down: its apiserver was
/// down, or each replica was killed or stopped or cut off from the database, and at
/// least one was killed or stopped (a replica that is only cut off scales down what it
/// scaled up itself, so a cluster that is merely cut off must fence itself).
pub fn fence_incapable(input: &Input<'_>, cluster: usize, t: Time) -> bool {
    let a = ability(input, cluster, t);
    a.apiserver_down || (a.all_unable_or_cut && a.any_unable)
}

/// A cluster that could not tell the others about its pods: its apiserver was down
/// (nothing to count them with), or no replica could write to the database.
pub fn silenced(input: &Input<'_>, cluster: usize, t: Time) -> bool {
    let a = ability(input, cluster, t);
    a.apiserver_down || a.all_unable_or_cut
}

/// Whether `check` holds at some moment of `[from, to]` (sampled every 100 ms).
fn at_some_point(from: Time, to: Time, check: impl Fn(Time) -> bool) -> bool {
    let mut t = from;
    while t <= to {
        if check(t) {
            return true;
        }
        t += secs(0.1);
    }
    false
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
        for cluster in 0..2 {
            analysis
                .double_pods
                .extend(double_pods(input, lease, cluster));
        }
        analysis.stop_times.push(stop_times(input, lease));
        analysis.handover_gaps.extend(handover_gaps(input, lease));
    }
    analysis.handover_gaps.sort_by(f64::total_cmp);
    for (name, events) in input.extra_events {
        analysis.events += events.len();
        let (_, problems) = audit(events);
        analysis
            .audit
            .extend(problems.into_iter().map(|p| format!("lease {name}: {p}")));
    }
    analysis.objects = object_faults(input);
    analysis
}

/// `(time, cluster, +1 | -1)` for every pod of `app` appearing and going, in time
/// order; at one instant a pod going comes before one appearing.
fn pod_edges(input: &Input<'_>, app: &str) -> Vec<(Time, usize, i32)> {
    let mut edges: Vec<(Time, usize, i32)> = Vec::new();
    for p in input.pods.iter().filter(|p| p.app == app) {
        edges.push((p.appeared, p.cluster, 1));
        edges.push((p.until(input.end), p.cluster, -1));
    }
    edges.sort_by_key(|e| (e.0, e.2));
    edges
}

/// Check (a) for one lease: every interval in which both clusters had a live pod.
pub fn overlaps(input: &Input<'_>, lease: usize) -> Vec<Overlap> {
    let mut live = [0, 0];
    let mut open: Option<(Time, usize)> = None;
    let mut found = Vec::new();
    for (at, cluster, delta) in pod_edges(input, &input.deployments[lease]) {
        live[cluster] += delta;
        let both = live[0] >= 1 && live[1] >= 1;
        match (both, open) {
            (true, None) => open = Some((at, cluster)),
            (false, Some((start, second))) => {
                found.push(classify(input, lease, second, start, at));
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

/// For every pod that started in one cluster after the other cluster's last pod was gone
/// (a cross-cluster handover without overlap): the seconds in between.
fn handover_gaps(input: &Input<'_>, lease: usize) -> Vec<f64> {
    let mut live = [0, 0];
    let mut emptied: [Option<Time>; 2] = [None, None];
    let mut gaps = Vec::new();
    for (at, c, delta) in pod_edges(input, &input.deployments[lease]) {
        let other = 1 - c;
        if delta > 0 && live == [0, 0] {
            let previous_here = emptied[c];
            if let Some(gone) = emptied[other].filter(|g| previous_here.is_none_or(|p| p < *g)) {
                gaps.push(seconds(at - gone));
            }
        }
        live[c] += delta;
        if live[c] == 0 {
            emptied[c] = Some(at);
        }
    }
    gaps
}

/// Check (e): two live pods of one lease in one cluster at once. A ReplicaSet does not
/// count a Terminating pod, so only the operator's own gate (no scale-up while a pod of
/// its cluster still stops) prevents it.
fn double_pods(input: &Input<'_>, lease: usize, cluster: usize) -> Vec<(usize, usize, Time, Time)> {
    let mut live = 0;
    let mut since = None;
    let mut found = Vec::new();
    for (at, c, delta) in pod_edges(input, &input.deployments[lease]) {
        if c != cluster {
            continue;
        }
        live += delta;
        match (live >= 2, since) {
            (true, None) => since = Some(at),
            (false, Some(from)) => {
                found.push((lease, cluster, from, at));
                since = None;
            }
            _ => {}
        }
    }
    found
}

/// Seconds from each pod's deletion to its end (pods of one lease, both clusters).
fn stop_times(input: &Input<'_>, lease: usize) -> Vec<f64> {
    let mut times: Vec<f64> = input
        .pods
        .iter()
        .filter(|p| p.app == input.deployments[lease])
        .filter_map(|p| Some(seconds(p.gone? - p.deleting?)))
        .collect();
    times.sort_by(f64::total_cmp);
    times
}

/// When `cluster`'s Deployment of `lease` last went from 0 to 1 replicas before its pod
/// appeared at `pod` (the two watches may deliver a little out of order: 1 s of slack).
fn scaled_up_at(input: &Input<'_>, cluster: usize, lease: usize, pod: Time) -> Option<Time> {
    let timeline = Timeline::of(input.samples, cluster, lease);
    let mut previous = 0;
    let mut last = None;
    for &(at, spec, _) in timeline.0.iter().take_while(|s| s.0 <= pod + secs(1.0)) {
        if previous < 1 && spec >= 1 {
            last = Some(at.min(pod));
        }
        previous = spec;
    }
    last
}

/// What decides whether an overlap is the documented fencing case (see [`classify`]).
struct OverlapFacts<'a> {
    /// The cluster whose pod was already there, and the one that scaled up.
    first: &'a str,
    second: &'a str,
    /// The age of `first`'s last report when `second` scaled up, with its bound.
    age: String,
    /// What that report said.
    pods: i32,
    /// That report was older than its bound.
    stale: bool,
    /// No operator of `first` could act (see [`fence_incapable`]).
    incapable: bool,
    /// No operator of `first` could report (see [`silenced`]).
    silent: bool,
    /// `first`'s `spec.replicas` when `second` scaled up.
    first_spec: i32,
    /// `first`'s operators had been shut down gracefully.
    stopped: bool,
    causes: &'a [usize],
}

impl OverlapFacts<'_> {
    /// Expected or not, and why.
    fn verdict(&self) -> (bool, String) {
        let (c1, c2, age, causes) = (self.first, self.second, &self.age, self.causes);
        let (stale, silent, first_spec) = (self.stale, self.silent, self.first_spec);
        if stale && self.incapable {
            (
                true,
                format!(
                    "no operator of cluster {c1} could act (faults {causes:?}) and its workload report was {age} \
                     (stale), so the holder in {c2} scaled up as designed; only the workload's fencing protects \
                     until {c1}'s operators act again and its pod has stopped"
                ),
            )
        } else if stale && silent && first_spec == 0 {
            (
                true,
                format!(
                    "cluster {c1} was cut off (faults {causes:?}): it scaled its Deployment to 0 in time but could \
                     not report its pod, still stopping past its grace period, and its report was {age} (stale), so the \
                     holder in {c2} scaled up as designed; only the workload's fencing protects until that pod has \
                     stopped"
                ),
            )
        } else if !stale {
            let pods = self.pods;
            (
                false,
                format!(
                    "cluster {c1} was up and its workload report was only {age} ({pods} running pod(s)) when \
                     {c2} scaled up"
                ),
            )
        } else if silent {
            (
                false,
                format!(
                    "cluster {c1} was cut off (faults {causes:?}) and its report was {age}, but its Deployment was \
                     still at {first_spec} replica(s) when {c2} scaled up: it did not fence itself in time"
                ),
            )
        } else {
            (
                false,
                format!(
                    "cluster {c1}'s report was {age} but no injected fault kept all of its operators from \
                     acting or reporting (faults nearby: {causes:?}){}",
                    if self.stopped {
                        "; its operators had been shut down gracefully, which must wait for the pods"
                    } else {
                        ""
                    }
                ),
            )
        }
    }
}

/// Expected (the documented fencing case) or a violation, and why. See docs/chaos.md.
fn classify(input: &Input<'_>, lease: usize, second: usize, start: Time, end: Time) -> Overlap {
    let first = 1 - second;
    let ttl = input.ttl.as_secs_f64();
    let scaled_up = scaled_up_at(input, second, lease, start).unwrap_or(start);
    let last_report = input
        .reports
        .iter()
        .filter(|r| r.lease == lease && r.cluster == first && r.reported_at <= scaled_up)
        .max_by_key(|r| r.reported_at);
    let report_age = last_report.map(|r| seconds(scaled_up - r.reported_at));
    // Judged by the writer's own bound (ttl when unknown); the new holder judged the age
    // a moment before it scaled up: a little tolerance.
    let bound = last_report.map_or(ttl, |r| r.stale_after.as_secs_f64());
    let stale = report_age.is_none_or(|age| age >= bound - 0.25);
    let window_start = match last_report {
        Some(r) => r.reported_at - secs(1.0),
        None => scaled_up - secs(bound + 1.0),
    };
    let incapable = at_some_point(window_start, scaled_up, |t| {
        fence_incapable(input, first, t)
    });
    let silent = at_some_point(window_start, scaled_up, |t| silenced(input, first, t));
    let first_spec = Timeline::of(input.samples, first, lease).at(scaled_up).0;
    let nearby: Vec<&FaultRecord> = input
        .faults
        .iter()
        .filter(|f| {
            f.start <= scaled_up
                && f.effect_until(input.end) >= window_start
                && f.touches(first, input.replica_cluster)
        })
        .collect();
    let causes: Vec<usize> = nearby.iter().map(|f| f.id).collect();
    let stopped = nearby
        .iter()
        .any(|f| matches!(f.effect, Effect::Stopped(_)));
    let facts = OverlapFacts {
        first: input.clusters[first],
        second: input.clusters[second],
        age: report_age.map_or("never".to_owned(), |a| {
            format!("{a:.1} s old, its bound {bound:.0} s")
        }),
        pods: last_report.map_or(0, |r| r.running_pods),
        stale,
        incapable,
        silent,
        first_spec,
        stopped,
        causes: &causes,
    };
    let (expected, reason) = facts.verdict();
    let observer_blind = input
        .blind
        .iter()
        .any(|b| b.from - secs(1.0) <= start && start <= b.to + secs(1.0));
    Overlap {
        lease,
        first,
        second,
        scaled_up,
        start,
        end,
        causes,
        expected,
        reason,
        observer_blind,
    }
}

/// Check (d): what the injector found wrong, and any pod or scale-up of a Deployment
/// whose Reaper had to be refused.
fn object_faults(input: &Input<'_>) -> Vec<String> {
    let mut found = Vec::new();
    for f in input.faults {
        let what = format!("fault #{} {}", f.id, f.kind.name());
        found.extend(f.problems.iter().map(|p| format!("{what}: {p}")));
        let Effect::SecondReaper {
            cluster,
            deployment: Some(deployment),
            ..
        } = &f.effect
        else {
            continue;
        };
        let c = input.clusters[*cluster];
        for p in input
            .pods
            .iter()
            .filter(|p| p.cluster == *cluster && p.app == *deployment)
        {
            found.push(format!(
                "{what}: the refused Reaper's Deployment {deployment} ran pod {} in {c} from {}",
                p.name,
                p.appeared.format("%H:%M:%S%.3f")
            ));
        }
        for s in input
            .other_samples
            .iter()
            .filter(|s| s.cluster == *cluster && s.name == *deployment && s.spec >= 1)
        {
            found.push(format!(
                "{what}: the refused Reaper's Deployment {deployment} was scaled to {} in {c} at {}",
                s.spec,
                s.at.format("%H:%M:%S%.3f")
            ));
        }
    }
    found
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
        let previous_cluster = cluster_of(&tenures[i - 1].holder, &input.clusters);
        let ttl = input.ttl.as_secs_f64();
        let fault = input
            .faults
            .iter()
            .filter(|f| {
                f.start <= tenure.start
                    && tenure.start <= f.effect_until(input.end) + secs(ttl + 5.0)
                    && match &f.effect {
                        Effect::DatabaseDown => true,
                        Effect::Unable(rs) | Effect::Cut(rs) | Effect::Stopped(rs) => {
                            previous.is_some_and(|p| rs.contains(&p))
                        }
                        Effect::Objects { cluster, lease: l } => {
                            *l == lease && previous_cluster == Some(*cluster)
                        }
                        Effect::ApiserverDown(_) | Effect::SecondReaper { .. } => false,
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
    summary_faults(&mut s, input, analysis);
    summary_failover_times(&mut s, input, analysis);
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
    summary_overlaps(&mut s, input, analysis);
    summary_pods(&mut s, input, analysis);
    summary_audit_and_convergence(&mut s, analysis, converged, bound_c);
    summary_observer(&mut s, input, analysis);
    s
}

/// The faults injected and the failovers seen, by kind and class, for the summary.
fn summary_faults(s: &mut String, input: &Input<'_>, analysis: &Analysis) {
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
}

/// How long the failovers took, overall and by fault kind, and those not timed, for the
/// summary.
fn summary_failover_times(s: &mut String, input: &Input<'_>, analysis: &Analysis) {
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
}

/// Check (b) and check (c), for the summary.
fn summary_audit_and_convergence(
    s: &mut String,
    analysis: &Analysis,
    converged: &Result<f64, String>,
    bound_c: f64,
) {
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
}

/// The scale-ups outside the holder and what the observer saw, for the summary.
fn summary_observer(s: &mut String, input: &Input<'_>, analysis: &Analysis) {
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
    let blind: Vec<String> = ["deployments", "pods"]
        .iter()
        .flat_map(|w| (0..2).map(move |c| (*w, c)))
        .map(|(w, c)| {
            let total: f64 = input
                .blind
                .iter()
                .filter(|b| b.cluster == c && b.watch == w)
                .map(|b| seconds(b.to - b.from))
                .sum::<f64>()
                .abs();
            format!("{w} {} {total:.1} s", input.clusters[c])
        })
        .collect();
    let _ = writeln!(
        s,
        "observer: {} Deployment changes, {} pods, {} workload reports; watch reconnecting: {}",
        input.samples.len(),
        input.pods.len(),
        input.reports.len(),
        blind.join(", ")
    );
}

/// Check (a) and the ready replicas seen in both clusters, for the summary.
fn summary_overlaps(s: &mut String, input: &Input<'_>, analysis: &Analysis) {
    let expected = analysis.overlaps.iter().filter(|o| o.expected).count();
    let bad = analysis.overlaps.len() - expected;
    let _ = writeln!(
        s,
        "(a) overlaps of live pods (Terminating included) in both clusters: {expected} expected (fencing), {bad} violation(s)"
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
            "    {} lease {} {} -> {}: {:.2} s from {} (scaled up at {}){}: {}",
            if o.expected { "expected" } else { "VIOLATION" },
            input.leases[o.lease],
            input.clusters[o.first],
            input.clusters[o.second],
            seconds(o.end - o.start),
            o.start.format("%H:%M:%S%.3f"),
            o.scaled_up.format("%H:%M:%S%.3f"),
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
}

/// For the faults that make the operator hand a lease over (a graceful shutdown, a
/// deleted Reaper): how many leases the hit cluster held when the fault started, and how
/// many of them it released (after their pods had stopped) before the heal.
fn handovers(input: &Input<'_>, analysis: &Analysis) -> (usize, usize) {
    let (mut held, mut released) = (0, 0);
    for f in input.faults {
        let (leases, holders): (Vec<usize>, Vec<&String>) = match &f.effect {
            Effect::Stopped(rs) => (
                (0..input.leases.len()).collect(),
                rs.iter().map(|&r| &input.replica_names[r]).collect(),
            ),
            Effect::Objects { cluster, lease } => (
                vec![*lease],
                input
                    .replica_names
                    .iter()
                    .filter(|n| cluster_of(n, &input.clusters) == Some(*cluster))
                    .collect(),
            ),
            _ => continue,
        };
        let healed = f.healed.unwrap_or(input.end);
        for lease in leases {
            let Some(tenure) = analysis.tenures[lease].iter().find(|t| {
                t.start <= f.start
                    && t.end.is_none_or(|e| e > f.start)
                    && holders.contains(&&t.holder)
            }) else {
                continue;
            };
            held += 1;
            released += usize::from(input.events[lease].iter().any(|e| {
                e.kind == "release"
                    && e.holder == tenure.holder
                    && e.epoch == tenure.epoch
                    && e.at <= healed
            }));
        }
    }
    (held, released)
}

/// Pod stop times, two pods in one cluster (informational) and check (d).
fn summary_pods(s: &mut String, input: &Input<'_>, analysis: &Analysis) {
    let stops: Vec<String> = analysis
        .stop_times
        .iter()
        .zip(input.leases)
        .map(|(t, l)| {
            format!(
                "{l} n={} median {:.1} s, max {:.1} s",
                t.len(),
                median(t),
                t.last().copied().unwrap_or(f64::NAN)
            )
        })
        .collect();
    let _ = writeln!(
        s,
        "pods: {} seen; stop time (deletion -> gone): {}",
        input.pods.len(),
        stops.join("; ")
    );
    let gaps = &analysis.handover_gaps;
    let _ = writeln!(
        s,
        "cross-cluster handovers without overlap: {}; new pod after the old one was gone: min {:.2} s, median {:.2} s",
        gaps.len(),
        gaps.first().copied().unwrap_or(f64::NAN),
        median(gaps)
    );
    let doubles: Vec<String> = analysis
        .double_pods
        .iter()
        .map(|(lease, cluster, from, to)| {
            format!(
                "{} in {} at {} for {:.2} s",
                input.leases[*lease],
                input.clusters[*cluster],
                from.format("%H:%M:%S%.3f"),
                seconds(*to - *from)
            )
        })
        .collect();
    let _ = writeln!(
        s,
        "(e) two live pods of one lease in one cluster (a new pod while the old one stops): {} violation(s){}",
        doubles.len(),
        if doubles.is_empty() {
            String::new()
        } else {
            format!(": {}", doubles.join("; "))
        }
    );
    let checked = input
        .faults
        .iter()
        .filter(|f| {
            matches!(
                f.effect,
                Effect::SecondReaper { .. } | Effect::Objects { .. } | Effect::Stopped(_)
            )
        })
        .count();
    let (held, released) = handovers(input, analysis);
    let _ = writeln!(
        s,
        "(d) operator shutdowns, deleted Reapers and Deployments, second Reapers: {checked} fault(s), {} violation(s); \
         of the {held} lease(s) they took from a holder, {released} released after the pods stopped (the rest expired)",
        analysis.objects.len()
    );
    for o in &analysis.objects {
        let _ = writeln!(s, "    VIOLATION {o}");
    }
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

    /// A pod of lease 0's Deployment `d`, seen at `from`, deleted at `deleting`, gone at `to`.
    fn pod(cluster: usize, from: f64, deleting: Option<f64>, to: Option<f64>) -> PodLife {
        PodLife {
            cluster,
            app: "d".into(),
            name: format!("d-{cluster}-{from}"),
            appeared: t(from),
            deleting: deleting.map(t),
            gone: to.map(t),
        }
    }

    fn report(cluster: usize, at: f64, running_pods: i32) -> Report {
        Report {
            lease: 0,
            cluster,
            reported_at: t(at),
            running_pods,
            stale_after: Duration::from_secs(4),
        }
    }

    fn fault(id: usize, kind: Kind, effect: Effect, start: f64, healed: f64) -> FaultRecord {
        FaultRecord {
            id,
            kind,
            target: "a".into(),
            effect,
            start: t(start),
            healed: Some(t(healed)),
            problems: Vec::new(),
            frozen_guards: Vec::new(),
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

    /// A synthetic run with one lease `l` whose Deployment is `d`, clusters `a` and `b`
    /// with replicas `a/op-1`, `a/op-2`, `b/op-1`, `b/op-2`.
    #[derive(Default)]
    struct Run {
        samples: Vec<Sample>,
        pods: Vec<PodLife>,
        other_samples: Vec<OtherSample>,
        reports: Vec<Report>,
        faults: Vec<FaultRecord>,
        events: Vec<LeaseEvent>,
    }

    impl Run {
        fn with_input<R>(&self, f: impl FnOnce(&Input<'_>) -> R) -> R {
            let names = ["a/op-1", "a/op-2", "b/op-1", "b/op-2"].map(str::to_owned);
            let leases = ["l".to_owned()];
            let deployments = ["d".to_owned()];
            let events = [self.events.clone()];
            f(&Input {
                ttl: Duration::from_secs(3),
                clusters: ["a", "b"],
                replica_cluster: &[0, 0, 1, 1],
                replica_names: &names,
                leases: &leases,
                deployments: &deployments,
                samples: &self.samples,
                pods: &self.pods,
                other_samples: &self.other_samples,
                reports: &self.reports,
                blind: &[],
                faults: &self.faults,
                events: &events,
                extra_events: &[],
                chaos_start: t(0.0),
                end: t(100.0),
            })
        }

        fn analyse(&self) -> Analysis {
            self.with_input(analyse)
        }
    }

    /// Cluster `a` leads from 1 s; its Deployment goes to 0 at 8 s but its pod stops
    /// until 12 s; `b` scales up at 10 s, its pod appears at 10.1 s.
    fn stopping_pod_in_a(a_report_at: f64) -> Run {
        Run {
            samples: vec![sample(1.0, 0, 1), sample(8.0, 0, 0), sample(10.0, 1, 1)],
            pods: vec![pod(0, 1.1, Some(8.0), Some(12.0)), pod(1, 10.1, None, None)],
            reports: vec![report(0, a_report_at, 1)],
            ..Run::default()
        }
    }

    #[test]
    fn a_stopping_pod_counts_and_a_fresh_report_makes_its_overlap_a_violation() {
        // No overlap of spec.replicas at all: only the pods overlap.
        let a = stopping_pod_in_a(9.5).analyse();
        assert_eq!(a.overlaps.len(), 1);
        let o = &a.overlaps[0];
        assert!(!o.expected, "{o:?}");
        assert_eq!((o.first, o.second), (0, 1));
        assert_eq!((o.scaled_up, o.start, o.end), (t(10.0), t(10.1), t(12.0)));
        assert_eq!(a.violations(), 1);
        assert_eq!(a.stop_times[0], vec![4.0]);
        // Older than the ttl (3 s) but younger than its writer's bound (4 s): still fresh.
        let a = stopping_pod_in_a(6.5).analyse();
        assert!(!a.overlaps[0].expected, "{:?}", a.overlaps[0]);
    }

    /// Cluster `a` leads, a fault hits it at 5.2 s (healed at 13.5 s), and cluster `b`
    /// scales up at 10 s while `a`'s last report (5 s) still shows its pod running; `a`
    /// scales down at `a_down` and its pod stops 5 s later.
    fn overlap_during_a_fault_on_cluster_a(kind: Kind, effect: Effect, a_down: f64) -> Analysis {
        Run {
            samples: vec![sample(1.0, 0, 1), sample(a_down, 0, 0), sample(10.0, 1, 1)],
            pods: vec![
                pod(0, 1.1, Some(a_down), Some(a_down + 5.0)),
                pod(1, 10.1, None, None),
            ],
            reports: vec![report(0, 5.0, 1)],
            faults: vec![fault(1, kind, effect, 5.2, 13.5)],
            ..Run::default()
        }
        .analyse()
    }

    #[test]
    fn overlap_after_a_frozen_cluster_is_expected() {
        let a = overlap_during_a_fault_on_cluster_a(
            Kind::FreezeCluster,
            Effect::Unable(vec![0, 1]),
            14.0,
        );
        assert_eq!(a.overlaps.len(), 1);
        assert!(a.overlaps[0].expected, "{:?}", a.overlaps[0]);
        assert_eq!(a.overlaps[0].causes, vec![1]);
        assert_eq!(a.overlaps[0].end, t(19.0));
        assert_eq!(a.violations(), 0);
    }

    #[test]
    fn a_cluster_only_cut_off_must_fence_itself() {
        let a =
            overlap_during_a_fault_on_cluster_a(Kind::CutCluster, Effect::Cut(vec![0, 1]), 14.0);
        assert_eq!(a.violations(), 1, "{:?}", a.overlaps);
    }

    #[test]
    fn a_cut_off_cluster_that_fenced_in_time_may_still_have_a_stopping_pod() {
        let a = overlap_during_a_fault_on_cluster_a(Kind::CutCluster, Effect::Cut(vec![0, 1]), 7.3);
        assert_eq!(a.overlaps.len(), 1);
        assert!(a.overlaps[0].expected, "{:?}", a.overlaps[0]);
        assert_eq!(a.violations(), 0);
    }

    #[test]
    fn a_graceful_shutdown_never_excuses_an_overlap() {
        let a = overlap_during_a_fault_on_cluster_a(
            Kind::StopOperators,
            Effect::Stopped(vec![0, 1]),
            7.3,
        );
        assert_eq!(a.violations(), 1, "{:?}", a.overlaps);
        assert!(
            a.overlaps[0].reason.contains("gracefully"),
            "{:?}",
            a.overlaps
        );
    }

    #[test]
    fn deleting_objects_is_no_violation_and_explains_the_failover() {
        // `a` leads; its Deployment is deleted at 10 s (pod gone at 16 s), its Reaper
        // finalized and the lease released at 16.2 s; `b` takes over and scales up.
        let run = Run {
            samples: vec![
                sample(1.0, 0, 1),
                sample(10.0, 0, 0),
                sample(16.5, 1, 1),
                sample(30.0, 0, 0),
            ],
            pods: vec![
                pod(0, 1.1, Some(10.1), Some(16.0)),
                pod(1, 16.6, None, None),
            ],
            reports: vec![report(0, 15.0, 1), report(0, 16.1, 0)],
            faults: vec![fault(
                3,
                Kind::DeleteDeployment,
                Effect::Objects {
                    cluster: 0,
                    lease: 0,
                },
                10.0,
                30.0,
            )],
            events: vec![
                event(1, "acquire", 1, "a/op-1", "", 0.5),
                event(2, "release", 1, "a/op-1", "", 16.2),
                event(3, "acquire", 2, "b/op-1", "", 16.3),
            ],
            ..Run::default()
        };
        let a = run.analyse();
        assert!(a.overlaps.is_empty(), "{:?}", a.overlaps);
        assert_eq!(a.handover_gaps, vec![0.6]);
        assert_eq!(a.violations(), 0, "{:?}", a.objects);
        assert_eq!(a.failovers.len(), 1);
        assert_eq!(a.failovers[0].fault, Some(3));
        // The lease was handed over by a release after the pod had stopped.
        assert_eq!(run.with_input(|i| handovers(i, &a)), (1, 1));
    }

    #[test]
    fn a_refused_reapers_pod_or_scale_up_is_a_violation() {
        let second = |deployment: &str| {
            let mut f = fault(
                4,
                Kind::SecondReaperSameNamespace,
                Effect::SecondReaper {
                    cluster: 1,
                    lease: 0,
                    deployment: Some(deployment.into()),
                },
                20.0,
                30.0,
            );
            f.problems.push("no LeaseNameConflict within 20 s".into());
            f
        };
        let mut intruder = pod(1, 21.0, None, Some(22.0));
        intruder.app = "x".into();
        let run = Run {
            pods: vec![intruder],
            other_samples: vec![OtherSample {
                at: t(20.9),
                cluster: 1,
                name: "x".into(),
                spec: 1,
            }],
            faults: vec![second("x")],
            ..Run::default()
        };
        let a = run.analyse();
        assert_eq!(a.objects.len(), 3, "{:?}", a.objects);
        assert_eq!(a.violations(), 3);
        // Another Deployment's pod is none of its business.
        let run = Run {
            faults: vec![second("y")],
            ..run
        };
        assert_eq!(run.analyse().objects.len(), 1);
    }

    #[test]
    fn two_pods_in_one_cluster_are_a_violation() {
        let run = Run {
            pods: vec![pod(0, 1.0, Some(5.0), Some(9.0)), pod(0, 6.0, None, None)],
            ..Run::default()
        };
        let a = run.analyse();
        assert_eq!(a.double_pods, vec![(0, 0, t(6.0), t(9.0))]);
        assert_eq!(a.violations(), 1);
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
        let run = Run {
            samples: vec![
                sample(1.0, 0, 1),
                sample(12.0, 0, 0),
                // Scaled up at 14.0, ready at 14.5.
                Sample {
                    ready: 0,
                    ..sample(14.0, 1, 1)
                },
                sample(14.5, 1, 1),
            ],
            events: vec![
                event(1, "acquire", 1, "a/op-1", "", 0.5),
                event(2, "takeover", 2, "b/op-2", "a/op-1", 13.5),
            ],
            faults: vec![fault(7, Kind::Kill9, Effect::Unable(vec![0]), 10.0, 12.0)],
            ..Run::default()
        };
        let a = run.analyse();
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
