//! The status a reconcile reports, built from what it observed and decided. No I/O
//! here, so all of it is unit tested.

use std::hash::{Hash, Hasher};

use chrono::{DateTime, Utc};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use super::crd::{Phase, ReaperStatus};
use super::decide::{Gate, Role, ScaleRecord};
use crate::lease::{Holder, Lease};

/// Reasons the Deployment could briefly run two pods, or is scaled by someone else.
pub fn singleton_risks(
    rolling_surge: Option<String>,
    autoscaler: Option<String>,
    external_scale_ups: u32,
) -> Vec<(&'static str, String)> {
    let mut risks = Vec::new();
    if let Some(surge) = rolling_surge {
        risks.push((
            "SurgeAllowed",
            format!(
                "the Deployment uses RollingUpdate with maxSurge {surge}: a rollout briefly runs two pods; \
                 use strategy Recreate or maxSurge 0"
            ),
        ));
    }
    if let Some(hpa) = autoscaler {
        risks.push((
            "AutoscalerAttached",
            format!("HorizontalPodAutoscaler {hpa} targets the Deployment and can scale it past 1"),
        ));
    }
    if external_scale_ups >= 3 {
        risks.push((
            "ScaledExternally",
            format!(
                "something else scaled the Deployment up {external_scale_ups} times; the operator scaled it back"
            ),
        ));
    }
    risks
}

/// Everything the status is built from.
pub struct Observation<'a> {
    pub role: &'a Role,
    pub lease_name: &'a str,
    pub lease: Option<&'a Lease>,
    pub database_error: Option<&'a str>,
    pub deployment_found: bool,
    pub replicas: i32,
    pub ready_replicas: i32,
    pub running_pods: i32,
    pub gate: Option<&'a Gate>,
    pub paused: bool,
    pub risks: &'a [(&'static str, String)],
    pub generation: Option<i64>,
    pub now: DateTime<Utc>,
    /// The label selector this cluster's workload pods are counted by (remembered so
    /// they are still counted after the Deployment is deleted).
    pub pod_selector: Option<&'a str>,
    /// Who scaled the Deployment up, after this reconcile's action.
    pub scaled_up_by: Option<&'a ScaleRecord>,
}

/// The `DatabaseReachable` message: connection errors name hosts, users and databases,
/// which everyone who may read Reapers would see; the operator logs the error instead.
pub const DATABASE_UNREACHABLE: &str =
    "the lease database did not answer or refused a statement; the operator's log has the error";

/// `Ready` (for `kubectl wait` and tools that read a Ready condition): True when this
/// cluster is in the state it should be in, leading with its one pod ready, or standing
/// by (another cluster holds the lease) with none running. Paused is never Ready: nobody
/// manages the Deployment then. `SingletonSafe` is advice about the Deployment and does
/// not count.
fn ready_condition(
    phase: Phase,
    paused: bool,
    running_pods: i32,
    parts: &[&Condition],
    previous: &[Condition],
    generation: Option<i64>,
    now: DateTime<Utc>,
) -> Condition {
    let leader = parts.iter().find(|c| c.type_ == "Leader");
    let failing = parts
        .iter()
        .find(|c| c.type_ != "Leader" && c.status != "True");
    let (ok, reason, message) = match (failing, leader) {
        _ if paused => (
            false,
            "Paused".to_owned(),
            "spec.paused is true: the operator does not manage the Deployment".to_owned(),
        ),
        (Some(c), _) => (false, c.reason.clone(), c.message.clone()),
        (None, Some(l)) if l.status == "True" && running_pods > 1 => (
            false,
            "ExtraPods".to_owned(),
            format!("{running_pods} pods run here; waiting for the extra ones to stop"),
        ),
        (None, Some(l)) if l.status == "True" => (
            true,
            "Leading".to_owned(),
            "this cluster holds the lease and its pod is ready".to_owned(),
        ),
        (None, Some(l)) if phase == Phase::Standby && l.reason == "HeldElsewhere" => (
            true,
            "StandingBy".to_owned(),
            "another cluster holds the lease, and nothing runs here".to_owned(),
        ),
        (None, Some(l)) => (false, l.reason.clone(), l.message.clone()),
        (None, None) => (false, "Unknown".to_owned(), String::new()),
    };
    make_condition(previous, "Ready", ok, &reason, message, generation, now)
}

pub fn build_status(obs: &Observation<'_>, previous: Option<&ReaperStatus>) -> ReaperStatus {
    let prev_conditions = previous
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    let condition = |type_: &str, ok: bool, reason: &str, message: String| {
        make_condition(
            prev_conditions,
            type_,
            ok,
            reason,
            message,
            obs.generation,
            obs.now,
        )
    };

    let phase = phase_of(obs);
    let leader = leader_condition(obs, &condition);
    let workload = workload_condition(obs, &condition);
    let database = database_condition(obs.database_error, &condition);
    let singleton = singleton_condition(obs.risks, &condition);

    let ready = ready_condition(
        phase,
        obs.paused,
        obs.running_pods,
        &[&leader, &workload, &database],
        prev_conditions,
        obs.generation,
        obs.now,
    );

    let rfc3339 = |t: DateTime<Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    ReaperStatus {
        phase: Some(phase),
        lease_name: Some(obs.lease_name.to_owned()),
        holder: obs.lease.map(|l| {
            if l.is_held() {
                l.holder.clone()
            } else {
                String::new()
            }
        }),
        epoch: obs.lease.map(|l| l.epoch),
        acquired_at: obs.lease.map(|l| rfc3339(l.acquired_at)),
        // Nothing here moves with time alone: a write per Reaper per period to show the
        // renewals would load the API server for nothing (see `differs`).
        renewed_at: None,
        expires_at: None,
        replicas: Some(obs.replicas),
        ready_replicas: Some(obs.ready_replicas),
        ready: Some(format!("{}/{}", obs.ready_replicas, obs.replicas)),
        observed_generation: obs.generation,
        conditions: vec![ready, leader, workload, database, singleton],
        pod_selector: obs.pod_selector.map(str::to_owned),
        scaled_up_by: obs.scaled_up_by.cloned(),
    }
}

fn phase_of(obs: &Observation<'_>) -> Phase {
    if obs.database_error.is_some() || !obs.deployment_found {
        Phase::Degraded
    } else if matches!(obs.role, Role::Leader { .. }) {
        Phase::Leading
    } else {
        Phase::Standby
    }
}

fn leader_condition(
    obs: &Observation<'_>,
    condition: &impl Fn(&str, bool, &str, String) -> Condition,
) -> Condition {
    match (obs.role, obs.lease) {
        (Role::Leader { epoch }, _) => condition(
            "Leader",
            true,
            "HoldsLease",
            format!(
                "this cluster holds lease {} at epoch {epoch}",
                obs.lease_name
            ),
        ),
        (Role::Lapsed, _) => condition(
            "Leader",
            false,
            "RenewDeadlineMissed",
            format!(
                "the lease row still names this replica but it could not renew within the renew deadline; not acting as leader (lease {})",
                obs.lease_name
            ),
        ),
        (Role::Unknown, _) => condition(
            "Leader",
            false,
            "DatabaseUnreachable",
            "the lease cannot be read; not acting as leader".into(),
        ),
        (_, Some(lease)) if lease.is_held() => condition(
            "Leader",
            false,
            "HeldElsewhere",
            format!(
                "lease {} is held by {} (epoch {})",
                obs.lease_name, lease.holder, lease.epoch
            ),
        ),
        _ => condition(
            "Leader",
            false,
            "LeaseFree",
            format!(
                "lease {} is free or expired; competing for it",
                obs.lease_name
            ),
        ),
    }
}

fn workload_condition(
    obs: &Observation<'_>,
    condition: &impl Fn(&str, bool, &str, String) -> Condition,
) -> Condition {
    if !obs.deployment_found {
        condition(
            "WorkloadReady",
            false,
            "DeploymentNotFound",
            "the Deployment named in spec.deploymentName does not exist in this namespace".into(),
        )
    } else if obs.paused {
        condition(
            "WorkloadReady",
            obs.ready_replicas <= 1,
            "Paused",
            format!(
                "spec.paused is true: the Deployment is left at {} replica(s)",
                obs.replicas
            ),
        )
    } else {
        managed_workload_condition(obs, condition)
    }
}

/// `WorkloadReady` of a Deployment the operator manages (found, not paused).
fn managed_workload_condition(
    obs: &Observation<'_>,
    condition: &impl Fn(&str, bool, &str, String) -> Condition,
) -> Condition {
    match (obs.role, obs.gate) {
        (
            Role::Leader { .. },
            Some(Gate::WaitForCluster {
                cluster,
                running_pods,
            }),
        ) => condition(
            "WorkloadReady",
            false,
            "WaitingForHandover",
            format!(
                "cluster {cluster} still reports {running_pods} running pod(s); scaling up once it reports 0 or its report is older than its bound (ttl + grace period + refresh + retry)"
            ),
        ),
        (Role::Leader { .. }, Some(Gate::OwnPodsStopping { running_pods })) => condition(
            "WorkloadReady",
            false,
            "WaitingForOwnPods",
            format!(
                "{running_pods} pod(s) of this cluster are still stopping; scaling up once they are gone"
            ),
        ),
        (Role::Leader { .. }, Some(Gate::Unconfirmed { reason })) => condition(
            "WorkloadReady",
            false,
            "LeaseUnconfirmed",
            format!("not scaling up until the lease row confirms this holder: {reason}"),
        ),
        (Role::Leader { .. }, Some(Gate::ReportsUnknown { .. })) => condition(
            "WorkloadReady",
            false,
            "ReportsUnknown",
            "not scaling up until the other clusters' workload reports can be read".into(),
        ),
        (Role::Leader { .. }, Some(Gate::HandoverDelay { remaining })) => condition(
            "WorkloadReady",
            false,
            "HandoverDelay",
            format!(
                "waiting {:.1}s more before scaling up after a takeover from another cluster",
                remaining.as_secs_f64()
            ),
        ),
        (Role::Leader { .. }, _) if obs.ready_replicas >= 1 => condition(
            "WorkloadReady",
            true,
            "Running",
            "the singleton pod is ready".into(),
        ),
        (Role::Leader { .. }, _) => condition(
            "WorkloadReady",
            false,
            "Starting",
            "scaled to 1; waiting for the pod to become ready".into(),
        ),
        (_, _) if obs.replicas == 0 && obs.running_pods == 0 => condition(
            "WorkloadReady",
            true,
            "ScaledDown",
            "not leading here: the Deployment is at 0 and no pod runs".into(),
        ),
        _ => condition(
            "WorkloadReady",
            false,
            "ScalingDown",
            format!(
                "not leading here: waiting for {} pod(s) to stop",
                obs.running_pods.max(obs.replicas)
            ),
        ),
    }
}

fn database_condition(
    database_error: Option<&str>,
    condition: &impl Fn(&str, bool, &str, String) -> Condition,
) -> Condition {
    match database_error {
        None => condition(
            "DatabaseReachable",
            true,
            "Reachable",
            "the lease database answered".into(),
        ),
        Some(_) => condition(
            "DatabaseReachable",
            false,
            "Unreachable",
            DATABASE_UNREACHABLE.into(),
        ),
    }
}

fn singleton_condition(
    risks: &[(&'static str, String)],
    condition: &impl Fn(&str, bool, &str, String) -> Condition,
) -> Condition {
    match risks {
        [] => condition(
            "SingletonSafe",
            true,
            "NoRisk",
            "nothing else can run or scale a second pod".into(),
        ),
        risks => condition(
            "SingletonSafe",
            false,
            risks[0].0,
            risks
                .iter()
                .map(|(_, m)| m.as_str())
                .collect::<Vec<_>>()
                .join("; "),
        ),
    }
}

/// Status for a Reaper the operator refuses to act for (`reason`: `InvalidSpec`,
/// `LeaseNameConflict`, ...). The pod selector it remembers is kept.
pub fn refused_status(
    reason: &str,
    message: &str,
    generation: Option<i64>,
    previous: Option<&ReaperStatus>,
    scaled_up_by: Option<ScaleRecord>,
    now: DateTime<Utc>,
) -> ReaperStatus {
    let prev_conditions = previous
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    ReaperStatus {
        phase: Some(Phase::Invalid),
        observed_generation: generation,
        conditions: ["Ready", "Leader"]
            .into_iter()
            .map(|type_| {
                make_condition(
                    prev_conditions,
                    type_,
                    false,
                    reason,
                    message.to_owned(),
                    generation,
                    now,
                )
            })
            .collect(),
        pod_selector: previous.and_then(|s| s.pod_selector.clone()),
        scaled_up_by,
        ..Default::default()
    }
}

/// A condition that keeps its `lastTransitionTime` while its status does not change.
fn make_condition(
    previous: &[Condition],
    type_: &str,
    ok: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: DateTime<Utc>,
) -> Condition {
    let status = if ok { "True" } else { "False" };
    let last_transition_time = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| k8s_time(now));
    Condition {
        type_: type_.to_owned(),
        status: status.to_owned(),
        reason: reason.to_owned(),
        message,
        observed_generation: generation,
        last_transition_time,
    }
}

/// Kubernetes `metav1.Time` has second precision.
fn k8s_time(t: DateTime<Utc>) -> Time {
    Time(k8s_openapi::jiff::Timestamp::from_second(t.timestamp()).unwrap_or_default())
}

/// True when `new` is worth writing over `old`: it differs in anything but condition
/// timestamps. Nothing in the status moves with time alone (the renewals are in the
/// database row and in the replicas' presence, see `presence`), so a Reaper whose state
/// does not change costs no status write.
pub fn differs(old: &ReaperStatus, new: &ReaperStatus) -> bool {
    without_transition_times(old) != without_transition_times(new)
}

fn without_transition_times(status: &ReaperStatus) -> ReaperStatus {
    let mut status = status.clone();
    for c in &mut status.conditions {
        c.last_transition_time = k8s_time(DateTime::<Utc>::UNIX_EPOCH);
    }
    status
}

/// A status as [`differs`] compares it, in 8 bytes: what a replica keeps per Reaper of
/// the status it last wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fingerprint(u64);

impl Fingerprint {
    pub fn of(status: &ReaperStatus) -> Self {
        let mut hasher = std::hash::DefaultHasher::new();
        serde_json::to_vec(&without_transition_times(status))
            .expect("a status serializes")
            .hash(&mut hasher);
        Self(hasher.finish())
    }
}

/// This replica's last status write to a Reaper.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LastWrite {
    Wrote(Fingerprint),
    /// It failed, perhaps after the API server applied it.
    Unknown,
}

/// The holder `current` names when that is another replica of `me`'s cluster: while it
/// leads, it speaks for the cluster.
pub fn peer_holder<'a>(current: Option<&'a ReaperStatus>, me: &Holder) -> Option<&'a str> {
    current
        .and_then(|s| s.holder.as_deref())
        .filter(|holder| *holder != me.as_str() && me.same_cluster(holder))
}

/// True when a reconcile must write `new`. The Reaper cache alone cannot say: a status
/// change does not trigger a reconcile, the elector's triggers do, and they can outrun
/// the watch that brings this replica's own last write. Judged on a cache that still
/// shows the write before, a change back to that status would look like no change and
/// never be written (the Reaper stuck on the status in between until its next resync).
/// `last_write` is given by a leader only (see `reconcile::apply`).
pub fn needs_write(
    cached: Option<&ReaperStatus>,
    last_write: Option<LastWrite>,
    new: &ReaperStatus,
) -> bool {
    cached.is_none_or(|old| differs(old, new))
        || match last_write {
            None => false,
            Some(LastWrite::Unknown) => true,
            Some(LastWrite::Wrote(fingerprint)) => fingerprint != Fingerprint::of(new),
        }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_peer_of_this_cluster_is_a_peer_holder() {
        let me = Holder::new("east/a").unwrap();
        let naming = |holder: Option<&str>| ReaperStatus {
            holder: holder.map(Into::into),
            ..ReaperStatus::default()
        };
        for (holder, peer) in [
            (Some("east/b"), Some("east/b")),
            (Some("east/a"), None),
            (Some("west/b"), None),
            (Some("east"), None),
            (None, None),
        ] {
            let status = naming(holder);
            assert_eq!(peer_holder(Some(&status), &me), peer, "{holder:?}");
        }
        assert_eq!(peer_holder(None, &me), None);
    }

    fn lease(holder: &str, previous: &str, expired: bool) -> Lease {
        crate::reaper::decide::tests::lease(holder, 3, previous, expired)
    }

    /// A leader of `lease` running its one pod, ready.
    fn leading_with_its_pod<'a>(
        role: &'a Role,
        lease: &'a Lease,
        now: DateTime<Utc>,
    ) -> Observation<'a> {
        Observation {
            role,
            lease_name: "ns.r",
            lease: Some(lease),
            database_error: None,
            deployment_found: true,
            replicas: 1,
            ready_replicas: 1,
            running_pods: 1,
            gate: None,
            paused: false,
            risks: &[],
            generation: Some(2),
            now,
            pod_selector: Some("app=r"),
            scaled_up_by: None,
        }
    }

    #[test]
    fn conditions_keep_transition_time_while_unchanged() {
        let l = lease("east/a", "", false);
        let role = Role::Leader { epoch: 3 };
        let t0 = Utc::now() - chrono::Duration::minutes(5);
        let obs = |now| leading_with_its_pod(&role, &l, now);
        let first = build_status(&obs(t0), None);
        assert_eq!(first.phase, Some(Phase::Leading));
        assert_eq!(first.ready.as_deref(), Some("1/1"));
        let types: Vec<_> = first
            .conditions
            .iter()
            .map(|c| (c.type_.as_str(), c.status.as_str()))
            .collect();
        assert_eq!(
            types,
            [
                ("Ready", "True"),
                ("Leader", "True"),
                ("WorkloadReady", "True"),
                ("DatabaseReachable", "True"),
                ("SingletonSafe", "True")
            ]
        );
        let second = build_status(&obs(Utc::now()), Some(&first));
        assert_eq!(
            second.conditions[0].last_transition_time,
            first.conditions[0].last_transition_time
        );
        assert!(!differs(&first, &second));

        let db_down = Observation {
            database_error: Some("timed out"),
            role: &Role::Unknown,
            ..obs(Utc::now())
        };
        let third = build_status(&db_down, Some(&second));
        assert_eq!(third.phase, Some(Phase::Degraded));
        let dbc = third
            .conditions
            .iter()
            .find(|c| c.type_ == "DatabaseReachable")
            .unwrap();
        assert_eq!(
            (dbc.status.as_str(), dbc.message.as_str()),
            ("False", DATABASE_UNREACHABLE),
            "the error's detail stays out of the status"
        );
        assert_ne!(
            dbc.last_transition_time,
            first.conditions[3].last_transition_time
        );
        assert!(differs(&second, &third));
    }

    fn ready_of(status: &ReaperStatus) -> (&str, &str) {
        let c = status
            .conditions
            .iter()
            .find(|c| c.type_ == "Ready")
            .expect("a Ready condition");
        (c.status.as_str(), c.reason.as_str())
    }

    #[test]
    fn ready_is_true_only_in_the_state_this_cluster_should_be_in() {
        let held_elsewhere = lease("west/b", "", false);
        let leader = Role::Leader { epoch: 3 };
        let standby = Role::Standby {
            holder: Some("west/b".into()),
        };
        let base = |role, replicas, ready_replicas, running_pods| Observation {
            role,
            lease_name: "ns.r",
            lease: Some(&held_elsewhere),
            database_error: None,
            deployment_found: true,
            replicas,
            ready_replicas,
            running_pods,
            gate: None,
            paused: false,
            risks: &[],
            generation: Some(1),
            now: Utc::now(),
            pod_selector: None,
            scaled_up_by: None,
        };
        let check = |obs: Observation<'_>, want: (&str, &str)| {
            let status = build_status(&obs, None);
            assert_eq!(ready_of(&status), want, "{:#?}", status.conditions);
        };
        check(base(&leader, 1, 1, 1), ("True", "Leading"));
        check(base(&leader, 1, 0, 1), ("False", "Starting"));
        check(base(&standby, 0, 0, 0), ("True", "StandingBy"));
        check(base(&standby, 0, 0, 1), ("False", "ScalingDown"));
        check(
            base(&Role::Lapsed, 0, 0, 0),
            ("False", "RenewDeadlineMissed"),
        );
        check(base(&leader, 1, 1, 2), ("False", "ExtraPods"));
        check(
            Observation {
                paused: true,
                ..base(&leader, 1, 1, 1)
            },
            ("False", "Paused"),
        );
        check(
            Observation {
                paused: true,
                ..base(&standby, 0, 0, 0)
            },
            ("False", "Paused"),
        );
        let free = lease("", "west/b", true);
        check(
            Observation {
                lease: Some(&free),
                ..base(&Role::Standby { holder: None }, 0, 0, 0)
            },
            ("False", "LeaseFree"),
        );
        let gate = Gate::WaitForCluster {
            cluster: "west".into(),
            running_pods: 1,
        };
        check(
            Observation {
                gate: Some(&gate),
                ..base(&leader, 0, 0, 0)
            },
            ("False", "WaitingForHandover"),
        );
        check(
            Observation {
                database_error: Some("password authentication failed for user \"x\""),
                ..base(&Role::Unknown, 0, 0, 0)
            },
            ("False", "Unreachable"),
        );
        check(
            Observation {
                deployment_found: false,
                ..base(&standby, 0, 0, 0)
            },
            ("False", "DeploymentNotFound"),
        );
        let refused = refused_status(
            "LeaseNameConflict",
            "taken",
            Some(1),
            None,
            None,
            Utc::now(),
        );
        assert_eq!(ready_of(&refused), ("False", "LeaseNameConflict"));
    }

    #[test]
    fn a_lease_renewed_since_the_last_write_is_no_reason_to_write() {
        let now = Utc::now();
        let role = Role::Leader { epoch: 3 };
        // One lease for both statuses: `lease()` reads the clock, and an acquiredAt a
        // second apart would differ for a reason this test is not about.
        let held = lease("east/a", "", false);
        let status = |renewed: DateTime<Utc>| {
            let mut lease = held.clone();
            lease.renewed_at = renewed;
            lease.expires_at = renewed + chrono::Duration::seconds(15);
            build_status(&leading_with_its_pod(&role, &lease, now), None)
        };
        let recorded = status(now);
        assert!(!differs(
            &recorded,
            &status(now + chrono::Duration::seconds(60))
        ));
        let mut other = recorded.clone();
        other.epoch = Some(9);
        assert!(differs(&recorded, &other));
    }

    #[test]
    fn a_cache_behind_the_last_write_does_not_hide_a_change_back() {
        let now = Utc::now();
        let held = lease("east/a", "", false);
        let leading = build_status(
            &leading_with_its_pod(&Role::Leader { epoch: 3 }, &held, now),
            None,
        );
        let mut degraded = leading.clone();
        degraded.phase = Some(Phase::Degraded);
        degraded.holder = None;
        let wrote = |s: &ReaperStatus| Some(LastWrite::Wrote(Fingerprint::of(s)));

        // Leading was written and seen; Degraded was written but the cache still shows
        // Leading when the database answers again: the cache alone says "no change".
        assert!(!differs(&leading, &leading));
        assert!(needs_write(Some(&leading), wrote(&degraded), &leading));
        // Quiet once the write and the cache agree, whichever timestamps the conditions carry.
        let mut later = leading.clone();
        later.conditions[0].last_transition_time = k8s_time(now + chrono::Duration::seconds(5));
        assert!(!needs_write(Some(&leading), wrote(&leading), &later));
        assert!(!needs_write(Some(&leading), None, &leading));
        // A failed write may or may not have landed.
        assert!(needs_write(
            Some(&leading),
            Some(LastWrite::Unknown),
            &leading
        ));
        // A cache ahead of this replica's write (a peer wrote since) is judged too.
        assert!(needs_write(Some(&degraded), wrote(&leading), &leading));
        assert!(needs_write(None, wrote(&leading), &leading));
    }

    #[test]
    fn risks_name_each_reason() {
        assert!(singleton_risks(None, None, 2).is_empty());
        let r = singleton_risks(Some("25%".into()), Some("hpa-1".into()), 3);
        let reasons: Vec<_> = r.iter().map(|(k, _)| *k).collect();
        assert_eq!(
            reasons,
            ["SurgeAllowed", "AutoscalerAttached", "ScaledExternally"]
        );
    }

    #[test]
    fn singleton_safe_takes_the_first_risk_as_reason_and_names_them_all() {
        let condition = |type_: &str, ok: bool, reason: &str, message: String| {
            make_condition(&[], type_, ok, reason, message, None, Utc::now())
        };
        let risks = singleton_risks(Some("25%".into()), Some("hpa-1".into()), 0);
        let unsafe_ = singleton_condition(&risks, &condition);
        assert_eq!(
            (unsafe_.status.as_str(), unsafe_.reason.as_str()),
            ("False", "SurgeAllowed")
        );
        assert_eq!(unsafe_.message, format!("{}; {}", risks[0].1, risks[1].1));
        let safe = singleton_condition(&[], &condition);
        assert_eq!(
            (safe.status.as_str(), safe.reason.as_str()),
            ("True", "NoRisk")
        );
    }
}
