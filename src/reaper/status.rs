//! Pure decisions of the reconcile loop: what this replica's role is, whether a new
//! holder may scale up, and the status it reports. No I/O here, so all of it is unit
//! tested.

use std::time::Duration;

use chrono::{DateTime, Utc};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use super::crd::{Phase, ReaperStatus};
use crate::lease::{Lease, WorkloadReport};

/// The cluster part of a holder identity `<cluster>/<identity>`.
pub fn holder_cluster(holder: &str) -> &str {
    holder
        .split_once('/')
        .map_or(holder, |(cluster, _)| cluster)
}

/// This replica's part for one lease, decided from its elector and the lease row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    /// This replica holds the lease right now (checked on the monotonic clock).
    Leader { epoch: i64 },
    /// Another replica of this cluster holds it: that one acts, this one does nothing.
    PeerLeads { holder: String },
    /// Another cluster holds it, or nobody does: the workload must be at 0 here.
    Standby { holder: Option<String> },
    /// The database cannot be read. `was_leader`: this replica scaled the workload up
    /// and has since lost the ability to prove it still leads.
    Unknown { was_leader: bool },
}

pub fn role(
    leader_epoch: Option<i64>,
    row: Option<&Result<Option<Lease>, String>>,
    me: &str,
    cluster: &str,
    scaled_up: bool,
) -> Role {
    if let Some(epoch) = leader_epoch {
        return Role::Leader { epoch };
    }
    match row {
        Some(Ok(Some(lease))) if !lease.is_free() => {
            let peer = lease.holder != me && holder_cluster(&lease.holder) == cluster;
            if peer && (lease.is_held() || recently_expired(lease)) {
                // A peer holds it, or held it until moments ago: the Deployment is the
                // same object and a replica of this cluster (maybe this one) takes the
                // lease on its next tick, so scaling down now would only restart the pod.
                Role::PeerLeads {
                    holder: lease.holder.clone(),
                }
            } else if lease.is_held() {
                // Includes a row that still names this replica although its elector
                // no longer leads (deadline passed): it must not keep the workload up.
                Role::Standby {
                    holder: Some(lease.holder.clone()),
                }
            } else {
                Role::Standby { holder: None }
            }
        }
        Some(Ok(_)) => Role::Standby { holder: None },
        Some(Err(_)) | None => Role::Unknown {
            was_leader: scaled_up,
        },
    }
}

/// Expired for less than one more ttl: its cluster is expected to take it back.
fn recently_expired(lease: &Lease) -> bool {
    let ttl = chrono::Duration::from_std(lease.ttl).unwrap_or_default();
    lease.is_expired() && lease.observed_at < lease.expires_at + ttl
}

/// Why a leader may not scale up yet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Gate {
    Open {
        /// Clusters whose last report still showed pods but is older than the ttl: they
        /// are presumed dead or cut off, and only the workload's fencing protects now.
        stale: Vec<String>,
    },
    /// Another cluster still runs pods of this singleton.
    WaitForCluster { cluster: String, running_pods: i32 },
    /// The handover delay after a takeover from another cluster has not passed.
    HandoverDelay { remaining: Duration },
}

pub fn handover_gate(
    lease: Option<&Lease>,
    reports: &[WorkloadReport],
    cluster: &str,
    ttl: Duration,
    handover_delay: Duration,
) -> Gate {
    let mut stale = Vec::new();
    for report in reports
        .iter()
        .filter(|r| r.cluster != cluster && r.running_pods > 0)
    {
        if report.age < ttl {
            return Gate::WaitForCluster {
                cluster: report.cluster.clone(),
                running_pods: report.running_pods,
            };
        }
        stale.push(report.cluster.clone());
    }
    if let Some(lease) = lease {
        let from_elsewhere =
            !lease.previous_holder.is_empty() && holder_cluster(&lease.previous_holder) != cluster;
        if from_elsewhere && !handover_delay.is_zero() {
            let held_for = (lease.observed_at - lease.acquired_at)
                .to_std()
                .unwrap_or_default();
            if held_for < handover_delay {
                return Gate::HandoverDelay {
                    remaining: handover_delay - held_for,
                };
            }
        }
    }
    Gate::Open { stale }
}

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

    let phase = if obs.database_error.is_some() || !obs.deployment_found {
        Phase::Degraded
    } else if matches!(obs.role, Role::Leader { .. }) {
        Phase::Leading
    } else {
        Phase::Standby
    };

    let leader = match (obs.role, obs.lease) {
        (Role::Leader { epoch }, _) => condition(
            "Leader",
            true,
            "HoldsLease",
            format!(
                "this cluster holds lease {} at epoch {epoch}",
                obs.lease_name
            ),
        ),
        (Role::Unknown { .. }, _) => condition(
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
    };

    let workload = if !obs.deployment_found {
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
                    "cluster {cluster} still reports {running_pods} running pod(s); scaling up once it reports 0 or its report is older than the ttl"
                ),
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
    };

    let database = match obs.database_error {
        None => condition(
            "DatabaseReachable",
            true,
            "Reachable",
            "the lease database answered".into(),
        ),
        Some(err) => condition("DatabaseReachable", false, "Unreachable", err.to_owned()),
    };

    let singleton = match obs.risks {
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
    };

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
        renewed_at: obs.lease.map(|l| rfc3339(l.renewed_at)),
        expires_at: obs.lease.map(|l| rfc3339(l.expires_at)),
        replicas: Some(obs.replicas),
        ready_replicas: Some(obs.ready_replicas),
        ready: Some(format!("{}/{}", obs.ready_replicas, obs.replicas)),
        observed_generation: obs.generation,
        conditions: vec![leader, workload, database, singleton],
    }
}

/// Status for a spec the operator cannot use.
pub fn invalid_status(
    message: &str,
    generation: Option<i64>,
    previous: Option<&ReaperStatus>,
    now: DateTime<Utc>,
) -> ReaperStatus {
    let prev_conditions = previous
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    ReaperStatus {
        phase: Some(Phase::Invalid),
        observed_generation: generation,
        conditions: vec![make_condition(
            prev_conditions,
            "Leader",
            false,
            "InvalidSpec",
            message.to_owned(),
            generation,
            now,
        )],
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
/// timestamps and the renewal times, or the recorded renewal is at least `refresh` older
/// than the new one. Every renew moves `renewedAt`; writing it each retry period would
/// cost a status write, and the reconcile its watch event triggers, per Reaper per
/// period, so the renewal times are refreshed only every `refresh` (half the ttl).
pub fn differs(old: &ReaperStatus, new: &ReaperStatus, refresh: Duration) -> bool {
    let strip = |s: &ReaperStatus| {
        let mut s = s.clone();
        for c in &mut s.conditions {
            c.last_transition_time = k8s_time(DateTime::<Utc>::UNIX_EPOCH);
        }
        s.renewed_at = None;
        s.expires_at = None;
        s
    };
    if strip(old) != strip(new) {
        return true;
    }
    let parse = |t: &Option<String>| {
        t.as_deref()
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.with_timezone(&Utc))
    };
    match (parse(&old.renewed_at), parse(&new.renewed_at)) {
        (Some(recorded), Some(latest)) => (latest - recorded)
            .to_std()
            .is_ok_and(|behind| behind >= refresh),
        (recorded, latest) => recorded != latest || old.expires_at != new.expires_at,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: &str, previous: &str, expired: bool) -> Lease {
        let now = Utc::now();
        let acquired = now - chrono::Duration::seconds(1);
        Lease {
            name: "l".into(),
            holder: holder.into(),
            epoch: 3,
            ttl: Duration::from_secs(15),
            acquired_at: acquired,
            renewed_at: acquired,
            expires_at: if expired {
                now - chrono::Duration::seconds(1)
            } else {
                now + chrono::Duration::seconds(10)
            },
            previous_holder: previous.into(),
            observed_at: now,
        }
    }

    fn report(cluster: &str, running: i32, age_s: u64) -> WorkloadReport {
        WorkloadReport {
            cluster: cluster.into(),
            reported_by: format!("{cluster}/x"),
            replicas: running,
            running_pods: running,
            ready_pods: running,
            reported_at: Utc::now(),
            age: Duration::from_secs(age_s),
        }
    }

    #[test]
    fn role_follows_the_reconcile_table() {
        let me = "east/a";
        let row = |l: Lease| Some(Ok(Some(l)));
        assert_eq!(
            role(Some(4), None, me, "east", false),
            Role::Leader { epoch: 4 }
        );
        assert_eq!(
            role(
                None,
                row(lease("east/b", "", false)).as_ref(),
                me,
                "east",
                false
            ),
            Role::PeerLeads {
                holder: "east/b".into()
            }
        );
        assert_eq!(
            role(
                None,
                row(lease("west/b", "", false)).as_ref(),
                me,
                "east",
                false
            ),
            Role::Standby {
                holder: Some("west/b".into())
            }
        );
        // A row naming me while my elector says no: I must not keep the workload up.
        assert_eq!(
            role(
                None,
                row(lease("east/a", "", false)).as_ref(),
                me,
                "east",
                true
            ),
            Role::Standby {
                holder: Some("east/a".into())
            }
        );
        // A peer's lease that expired moments ago: this cluster takes it back, leave the
        // Deployment alone; another cluster's expired lease is nobody's.
        assert_eq!(
            role(
                None,
                row(lease("east/b", "", true)).as_ref(),
                me,
                "east",
                false
            ),
            Role::PeerLeads {
                holder: "east/b".into()
            }
        );
        assert_eq!(
            role(
                None,
                row(lease("west/b", "", true)).as_ref(),
                me,
                "east",
                false
            ),
            Role::Standby { holder: None }
        );
        let mut long_expired = lease("east/b", "", true);
        long_expired.expires_at -= chrono::Duration::seconds(60);
        assert_eq!(
            role(None, Some(&Ok(Some(long_expired))), me, "east", false),
            Role::Standby { holder: None }
        );
        let free = lease("", "", false);
        assert_eq!(
            role(None, Some(&Ok(Some(free))), me, "east", false),
            Role::Standby { holder: None }
        );
        assert_eq!(
            role(None, Some(&Ok(None)), me, "east", false),
            Role::Standby { holder: None }
        );
        assert_eq!(
            role(None, Some(&Err("down".into())), me, "east", true),
            Role::Unknown { was_leader: true }
        );
        assert_eq!(
            role(None, Some(&Err("down".into())), me, "east", false),
            Role::Unknown { was_leader: false }
        );
    }

    #[test]
    fn holder_cluster_is_the_prefix() {
        assert_eq!(holder_cluster("east/pod-1"), "east");
        assert_eq!(holder_cluster("east/a/b"), "east");
        assert_eq!(holder_cluster("plain"), "plain");
    }

    #[test]
    fn gate_waits_for_other_clusters_pods_unless_their_report_is_stale() {
        let ttl = Duration::from_secs(15);
        let l = lease("east/a", "west/b", false);
        assert_eq!(
            handover_gate(Some(&l), &[], "east", ttl, Duration::ZERO),
            Gate::Open { stale: vec![] }
        );
        assert_eq!(
            handover_gate(
                Some(&l),
                &[report("west", 1, 3)],
                "east",
                ttl,
                Duration::ZERO
            ),
            Gate::WaitForCluster {
                cluster: "west".into(),
                running_pods: 1
            }
        );
        assert_eq!(
            handover_gate(
                Some(&l),
                &[report("west", 1, 16)],
                "east",
                ttl,
                Duration::ZERO
            ),
            Gate::Open {
                stale: vec!["west".into()]
            }
        );
        assert_eq!(
            handover_gate(
                Some(&l),
                &[report("west", 0, 1)],
                "east",
                ttl,
                Duration::ZERO
            ),
            Gate::Open { stale: vec![] }
        );
        // Own cluster's report is never a blocker.
        assert_eq!(
            handover_gate(
                Some(&l),
                &[report("east", 1, 1)],
                "east",
                ttl,
                Duration::ZERO
            ),
            Gate::Open { stale: vec![] }
        );
    }

    #[test]
    fn handover_delay_applies_only_after_a_takeover_from_another_cluster() {
        let ttl = Duration::from_secs(15);
        let delay = Duration::from_secs(5);
        let from_west = lease("east/a", "west/b", false);
        assert!(
            matches!(handover_gate(Some(&from_west), &[], "east", ttl, delay), Gate::HandoverDelay { remaining } if remaining <= Duration::from_secs(4))
        );
        let from_peer = lease("east/a", "east/b", false);
        assert_eq!(
            handover_gate(Some(&from_peer), &[], "east", ttl, delay),
            Gate::Open { stale: vec![] }
        );
        let from_free = lease("east/a", "", false);
        assert_eq!(
            handover_gate(Some(&from_free), &[], "east", ttl, delay),
            Gate::Open { stale: vec![] }
        );
    }

    #[test]
    fn conditions_keep_transition_time_while_unchanged() {
        let l = lease("east/a", "", false);
        let role = Role::Leader { epoch: 3 };
        let t0 = Utc::now() - chrono::Duration::minutes(5);
        let obs = |now| Observation {
            role: &role,
            lease_name: "ns.r",
            lease: Some(&l),
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
        };
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
        assert!(!differs(&first, &second, REFRESH));

        let db_down = Observation {
            database_error: Some("timed out"),
            role: &Role::Unknown { was_leader: true },
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
            ("False", "timed out")
        );
        assert_ne!(
            dbc.last_transition_time,
            first.conditions[2].last_transition_time
        );
        assert!(differs(&second, &third, REFRESH));
    }

    const REFRESH: Duration = Duration::from_secs(5);

    #[test]
    fn renewal_times_alone_are_refreshed_every_refresh_period() {
        let at = |secs: i64| {
            let t = Utc::now() + chrono::Duration::seconds(secs);
            ReaperStatus {
                renewed_at: Some(t.to_rfc3339()),
                expires_at: Some((t + chrono::Duration::seconds(15)).to_rfc3339()),
                ..ReaperStatus::default()
            }
        };
        let recorded = at(0);
        assert!(!differs(&recorded, &at(2), REFRESH));
        assert!(!differs(&recorded, &at(4), REFRESH));
        assert!(differs(&recorded, &at(5), REFRESH));
        // A new lease row (no renewal recorded yet, or none any more) is always written.
        assert!(differs(&ReaperStatus::default(), &at(1), REFRESH));
        assert!(differs(&recorded, &ReaperStatus::default(), REFRESH));
        // Anything else that changes is written at once, renewal times included.
        let mut other = at(1);
        other.epoch = Some(9);
        assert!(differs(&recorded, &other, REFRESH));
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
}
