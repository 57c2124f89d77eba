//! The reconcile's safety rules as pure functions: which part this replica plays for a
//! lease, whether a leader may scale up, and what to do to the Deployment. No I/O, so
//! every row of the rule table (README, "The operator") is a unit test below.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde::{Deserialize, Serialize};

use super::crd::{LeaseScope, Reaper};
use crate::lease::{ClusterName, Holder, Lease, WorkloadCounts, WorkloadReport};

/// Who last scaled this cluster's Deployment up, recorded on the Reaper's status before
/// the scale-up, so that a restarted replica (which has forgotten) still knows the
/// running pod was started under a lease that somebody must still prove to hold.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ScaleRecord {
    /// `<cluster>/<identity>` of the replica that scaled the Deployment to 1.
    pub holder: String,
    /// The lease epoch it held then.
    pub epoch: i64,
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
    /// The row still names this replica but its elector no longer leads (renew deadline
    /// passed, or it restarted under the same identity). The elector's fence decides
    /// with a fresh read (a peer of this cluster may already hold the lease and run the
    /// pod); a reconcile acting on this row, read before a stall, would restart it.
    Lapsed,
    /// The database cannot be read.
    Unknown,
}

pub fn role(
    leader_epoch: Option<i64>,
    row: &Result<Option<Lease>, String>,
    me: &Holder,
    cluster: &ClusterName,
) -> Role {
    if let Some(epoch) = leader_epoch {
        return Role::Leader { epoch };
    }
    match row {
        Ok(Some(lease)) if !lease.is_free() => {
            let ours = lease.holder_cluster() == Some(cluster.as_str());
            if lease.is_held() && *me == lease.holder {
                Role::Lapsed
            } else if ours && (lease.is_held() || recently_expired(lease)) {
                // A peer holds it, or this cluster held it until moments ago (a peer, or
                // this replica before a restart): the Deployment is the same object and a
                // replica of this cluster takes the lease on its next tick, so scaling
                // down now would only restart the pod.
                Role::PeerLeads {
                    holder: lease.holder.clone(),
                }
            } else if lease.is_held() {
                Role::Standby {
                    holder: Some(lease.holder.clone()),
                }
            } else {
                Role::Standby { holder: None }
            }
        }
        Ok(_) => Role::Standby { holder: None },
        Err(_) => Role::Unknown,
    }
}

/// Expired for less than one more ttl: its cluster is expected to take it back.
fn recently_expired(lease: &Lease) -> bool {
    let ttl = chrono::Duration::from_std(lease.ttl).unwrap_or_default();
    lease.is_expired() && lease.observed_at < lease.expires_at + ttl
}

/// Whether a leader may scale up, and if not, why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Gate {
    Open {
        /// Clusters whose last report still showed pods but is older than the reporter's
        /// own bound: presumed dead or cut off; only the workload's fencing protects now.
        stale: Vec<String>,
    },
    /// The lease row read in this reconcile does not show this replica holding an
    /// unexpired lease at this epoch (or could not be read): no scale-up on the
    /// elector's word alone, since the handover delay and the takeover's origin are
    /// judged from that row.
    Unconfirmed { reason: String },
    /// The other clusters' reports could not be read.
    ReportsUnknown { reason: String },
    /// Another cluster still runs (or wants) pods of this singleton.
    WaitForCluster { cluster: String, running_pods: i32 },
    /// This cluster's own pods are still stopping (a scale-down by a replica that lost
    /// the lease moments ago): a ReplicaSet ignores Terminating pods, so scaling up now
    /// would start a second one beside them.
    OwnPodsStopping { running_pods: i32 },
    /// The handover delay after a takeover from another cluster has not passed.
    HandoverDelay { remaining: Duration },
}

pub fn handover_gate(
    row: &Result<Option<Lease>, String>,
    me: &Holder,
    epoch: i64,
    reports: &Result<Vec<WorkloadReport>, String>,
    own: WorkloadCounts,
    handover_delay: Duration,
) -> Gate {
    let lease = match row {
        Ok(Some(lease)) if *me == lease.holder && lease.epoch == epoch && lease.is_held() => lease,
        Ok(Some(lease)) => {
            return Gate::Unconfirmed {
                reason: format!(
                    "the lease row shows holder {:?} at epoch {} (expired: {}), not this replica at epoch {epoch}",
                    lease.holder,
                    lease.epoch,
                    lease.is_expired()
                ),
            };
        }
        Ok(None) => {
            return Gate::Unconfirmed {
                reason: "the lease row is missing".into(),
            };
        }
        Err(error) => {
            return Gate::Unconfirmed {
                reason: format!("the lease row cannot be read: {error}"),
            };
        }
    };
    let reports = match reports {
        Ok(reports) => reports,
        Err(error) => {
            return Gate::ReportsUnknown {
                reason: error.clone(),
            };
        }
    };
    if own.replicas == 0 && own.running_pods > 0 {
        return Gate::OwnPodsStopping {
            running_pods: own.running_pods,
        };
    }
    // A report is judged stale only once this holder has held the lease for two of the
    // reporter's refresh periods too: after an outage of the database itself every
    // report is old, live clusters' included, and they need that long to report again.
    let held_for = (lease.observed_at - lease.acquired_at)
        .to_std()
        .unwrap_or_default();
    let mut stale = Vec::new();
    for report in reports
        .iter()
        .filter(|r| Some(r.cluster.as_str()) != me.cluster() && r.running_pods.max(r.replicas) > 0)
    {
        if !report.is_stale() || held_for < report.refresh * 2 {
            return Gate::WaitForCluster {
                cluster: report.cluster.clone(),
                running_pods: report.running_pods.max(report.replicas),
            };
        }
        stale.push(report.cluster.clone());
    }
    // A takeover from a holder that names no cluster counts as one from elsewhere.
    let from_elsewhere = !lease.previous_holder.is_empty()
        && !me.same_cluster(&lease.previous_holder)
        && *me != lease.previous_holder;
    if from_elsewhere && held_for < handover_delay {
        return Gate::HandoverDelay {
            remaining: handover_delay - held_for,
        };
    }
    Gate::Open { stale }
}

/// What a reconcile does to the Deployment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scale {
    /// Record (holder, epoch) on the status, then make sure the Deployment runs 1.
    Up { epoch: i64 },
    /// Scale to 0 (and forget the record).
    Down,
    /// Leave the Deployment as it is.
    Hold,
}

/// Everything the scale decision needs.
#[derive(Clone, Debug)]
pub struct ScaleFacts<'a> {
    pub role: &'a Role,
    /// Only for a leader.
    pub gate: Option<&'a Gate>,
    pub paused: bool,
    /// `spec.replicas` of the Deployment; `None` when there is no Deployment.
    pub replicas: Option<i32>,
    /// The last recorded scale-up (status), if any.
    pub recorded: Option<&'a ScaleRecord>,
    /// This replica, `<cluster>/<identity>`.
    pub me: &'a str,
    /// How long this replica's database calls have been failing (zero when they work).
    pub database_failing_for: Duration,
    /// How long, on this replica's clock, the presence of the replica that recorded the
    /// scale-up has not been renewed (it renews it every third of a renew deadline, only
    /// right after renewing its leases: see `presence`).
    pub recorder_unseen_for: Duration,
    pub renew_deadline: Duration,
    pub ttl: Duration,
    /// This cluster's pods of the workload that have not finished.
    pub running_pods: i32,
    /// How often an undecided Reaper, or one with pods here that it does not lead, is
    /// reconciled when nothing happens: whether they may go on can change with time.
    pub steady: Duration,
    /// How often any other Reaper is (a leader too): changes of its Deployment, pods,
    /// lease row and reports trigger it at once, so this is only a safety net.
    pub idle: Duration,
}

/// What one reconcile does, decided from what it observed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub scale: Scale,
    /// The scale-up record the status carries after this reconcile.
    pub record: Option<ScaleRecord>,
    /// The Deployment was found scaled up by something other than this operator.
    pub scaled_externally: bool,
    pub requeue: Duration,
}

/// The whole decision of a reconcile (see [`decide_scale`] for the Deployment).
pub fn plan(f: &ScaleFacts<'_>) -> Plan {
    let scale = decide_scale(f);
    let scaled_externally = match scale {
        Scale::Up { .. } => f.replicas.is_some_and(|r| r > 1),
        Scale::Down => f.recorded.is_none() && matches!(f.role, Role::Standby { .. }),
        Scale::Hold => false,
    };
    let record = match scale {
        Scale::Up { epoch } => Some(ScaleRecord {
            holder: f.me.to_owned(),
            epoch,
        }),
        Scale::Down => None,
        Scale::Hold => f.recorded.cloned(),
    };
    let requeue = match (f.role, f.gate) {
        // Waiting for another cluster, own pods, the handover delay or a confirming read.
        (Role::Leader { .. }, Some(gate)) if !matches!(gate, Gate::Open { .. }) => {
            Duration::from_millis(500)
        }
        // Running its pod: every change it must act on (its pods, its Deployment, its
        // lease, the other clusters' reports) reconciles it at once.
        (Role::Leader { .. }, _) => f.idle,
        // Pods still stopping here: report them going as soon as they are gone.
        _ if f.running_pods > 0 && f.replicas.is_none_or(|r| r == 0) => Duration::from_secs(1),
        // Its decision depends on how long the database has been failing: look again
        // the moment a pod here stops being vouched for.
        (Role::Unknown, _) => match unprovable_in(f) {
            Some(wait) if f.replicas.is_some_and(|r| r > 0) && !wait.is_zero() => {
                f.steady.min(wait + Duration::from_millis(10))
            }
            _ => f.steady,
        },
        // Something of the workload runs here without this replica leading: whether it
        // may go on can change with time alone (a peer's lease lapsing), not only with
        // an event.
        _ if f.running_pods > 0 || f.replicas.is_some_and(|r| r > 0) => f.steady,
        _ => f.idle,
    };
    Plan {
        scale,
        record,
        scaled_externally,
        requeue,
    }
}

/// For a replica that cannot read the database, how long until nobody can vouch for a
/// scale-up recorded by another replica of its cluster (zero: already): its own calls
/// have failed for a renew deadline, and the recorder's presence has not been renewed
/// for as long. The recorder renews it only right after renewing its leases, so by then
/// it has either renewed since (and stops its pod itself if it loses the lease) or has
/// been silent for longer than its leadership lasts. `None` when there is no such record.
fn unprovable_in(f: &ScaleFacts<'_>) -> Option<Duration> {
    f.recorded.filter(|r| r.holder != f.me)?;
    Some(
        f.renew_deadline
            .saturating_sub(f.database_failing_for)
            .max(f.renew_deadline.saturating_sub(f.recorder_unseen_for)),
    )
}

pub fn decide_scale(f: &ScaleFacts<'_>) -> Scale {
    let Some(replicas) = f.replicas else {
        return Scale::Hold;
    };
    if f.paused {
        return Scale::Hold;
    }
    match (f.role, f.gate) {
        (Role::Leader { epoch }, Some(Gate::Open { .. })) => {
            let recorded_mine = f
                .recorded
                .is_some_and(|r| r.holder == f.me && r.epoch == *epoch);
            if replicas == 1 && recorded_mine {
                Scale::Hold
            } else {
                Scale::Up { epoch: *epoch }
            }
        }
        // Waiting for another cluster, the handover delay or a confirming read.
        (Role::Leader { .. }, _) => Scale::Hold,
        (Role::PeerLeads { .. } | Role::Lapsed, _) => Scale::Hold,
        (Role::Standby { .. }, _) if replicas > 0 => Scale::Down,
        (Role::Standby { .. }, _) => Scale::Hold,
        (Role::Unknown, _) => {
            // Nobody here can prove the running pod's lease is still held: this replica
            // started it (the elector says it no longer leads), or the database has been
            // out of reach for longer than a holder may act without renewing and the
            // replica that started the pod has not renewed its presence for as long (a
            // healthy peer that leads does; this replica's own trouble must not stop its
            // pod).
            let started_by_me = f.recorded.is_some_and(|r| r.holder == f.me);
            if replicas > 0 && (started_by_me || unprovable_in(f) == Some(Duration::ZERO)) {
                Scale::Down
            } else {
                Scale::Hold
            }
        }
    }
}

/// Why a Reaper must not act although its spec is valid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conflict {
    /// `LeaseNameConflict` or `DeploymentConflict`.
    pub reason: &'static str,
    pub message: String,
}

/// Two Reapers of one cluster with one lease name would overwrite each other's workload
/// report (it is per lease and cluster), and two naming one Deployment would fight over
/// its replicas. The oldest of them (creation time, then namespace and name) keeps
/// acting; the others are refused. A Deployment conflict is reported first: such a
/// Reaper must not touch the Deployment at all (it is the older one's). `others` may
/// include `reaper` itself.
pub fn conflict(reaper: &Reaper, others: &[&Reaper], scope: LeaseScope) -> Option<Conflict> {
    fn key(r: &Reaper) -> (Option<&Time>, Option<&str>, Option<&str>) {
        (
            r.metadata.creation_timestamp.as_ref(),
            r.metadata.namespace.as_deref(),
            r.metadata.name.as_deref(),
        )
    }
    let me = key(reaper);
    let lease = reaper.lease_name(scope).ok();
    let older = |r: &&&Reaper| key(r) < me;
    // Within a namespace's scope only its own Reapers can name the same row.
    let may_share = |r: &&&Reaper| {
        scope == LeaseScope::Shared || r.metadata.namespace == reaper.metadata.namespace
    };
    if let Some(first) = others
        .iter()
        .filter(older)
        .filter(|r| {
            r.metadata.namespace == reaper.metadata.namespace
                && r.spec.deployment_name == reaper.spec.deployment_name
        })
        .min_by_key(|r| key(r))
    {
        return Some(Conflict {
            reason: "DeploymentConflict",
            message: format!(
                "Reaper {} already manages Deployment {}; a Deployment is managed by at most one Reaper, so this one does not act",
                first.metadata.name.as_deref().unwrap_or_default(),
                reaper.spec.deployment_name,
            ),
        });
    }
    let first = others
        .iter()
        .filter(older)
        .filter(may_share)
        .filter(|r| lease.is_some() && r.lease_name(scope).ok() == lease)
        .min_by_key(|r| key(r))?;
    Some(Conflict {
        reason: "LeaseNameConflict",
        message: format!(
            "Reaper {}/{} already uses lease {} in this cluster; a lease is used by at most one Reaper per cluster, so this one does not act (rename spec.lease.name or delete one of them)",
            first.metadata.namespace.as_deref().unwrap_or_default(),
            first.metadata.name.as_deref().unwrap_or_default(),
            lease.unwrap_or_default(),
        ),
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use chrono::Utc;

    const ME: &str = "east/a";

    fn me() -> Holder {
        Holder::new(ME).unwrap()
    }
    const DEADLINE: Duration = Duration::from_secs(10);
    const TTL: Duration = Duration::from_secs(15);
    const IDLE: WorkloadCounts = WorkloadCounts {
        replicas: 0,
        running_pods: 0,
        ready_pods: 0,
    };

    /// A row observed now: acquired a second ago, and expired a second ago or valid for
    /// ten more seconds.
    pub(crate) fn lease(holder: &str, epoch: i64, previous: &str, expired: bool) -> Lease {
        let now = Utc::now();
        let acquired = now - chrono::Duration::seconds(1);
        Lease {
            name: "ns.l".into(),
            holder: holder.into(),
            epoch,
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
            on_current_timeline: true,
        }
    }

    fn row(l: Lease) -> Result<Option<Lease>, String> {
        Ok(Some(l))
    }

    fn report(cluster: &str, running: i32, age_s: u64, stale_after_s: u64) -> WorkloadReport {
        WorkloadReport {
            cluster: cluster.into(),
            reported_by: format!("{cluster}/x"),
            replicas: running,
            running_pods: running,
            ready_pods: running,
            reported_at: Utc::now(),
            age: Duration::from_secs(age_s),
            stale_after: Duration::from_secs(stale_after_s),
            // Refreshed four times within its bound.
            refresh: Duration::from_secs(stale_after_s) / 4,
        }
    }

    fn record(holder: &str, epoch: i64) -> ScaleRecord {
        ScaleRecord {
            holder: holder.into(),
            epoch,
        }
    }

    #[test]
    fn role_follows_the_reconcile_table() {
        let r = |leader: Option<i64>, row: Result<Option<Lease>, String>| {
            role(leader, &row, &me(), &ClusterName::new("east").unwrap())
        };
        // | it holds the lease (elector, at the moment of asking) | Leader |
        assert_eq!(r(Some(4), Err("down".into())), Role::Leader { epoch: 4 });

        // The elector says it does not hold the lease; the row read now decides.
        let peer = |holder: &str| Role::PeerLeads {
            holder: holder.into(),
        };
        let standby = |holder: Option<&str>| Role::Standby {
            holder: holder.map(Into::into),
        };
        // (the row's holder, expired moments ago, the role)
        for (holder, expired, want) in [
            // | someone in this cluster holds it | the peer acts |
            ("east/b", false, peer("east/b")),
            // | another cluster holds it | 0 here |
            ("west/b", false, standby(Some("west/b"))),
            // A holder without a cluster is never a peer.
            ("east", false, standby(Some("east"))),
            // A row naming me while my elector says no (deadline passed, or restarted
            // under the same name): the elector's fence decides with a fresh read; a
            // reconcile acting on a row read before a stall would restart a peer's pod.
            (ME, false, Role::Lapsed),
            // A peer's lease that expired moments ago: this cluster takes it back.
            ("east/b", true, peer("east/b")),
            // | free or expired (elsewhere) | 0 here |
            ("west/b", true, standby(None)),
            // This replica's own row, expired moments ago (a restart under the same
            // name): it takes the lease back on its next tick; the running pod is left
            // alone.
            (ME, true, peer(ME)),
            // Released.
            ("", false, standby(None)),
        ] {
            let got = r(None, row(lease(holder, 3, "", expired)));
            assert_eq!(got, want, "held by {holder:?}, expired: {expired}");
        }

        // A row acquired before a failover of the database, whoever it names: its holder
        // may have lost the lease in history the failover dropped and nobody can renew
        // it, so nothing vouches for this cluster's pod.
        for holder in ["east/b", ME, "west/b"] {
            let before_failover = Lease {
                on_current_timeline: false,
                ..lease(holder, 3, "", false)
            };
            assert_eq!(r(None, row(before_failover)), standby(None), "{holder}");
        }
        let mut long_expired = lease("east/b", 3, "", true);
        long_expired.expires_at -= chrono::Duration::seconds(60);
        assert_eq!(r(None, row(long_expired)), standby(None));
        assert_eq!(r(None, Ok(None)), standby(None));
        // | the database cannot be read | Unknown |
        assert_eq!(r(None, Err("down".into())), Role::Unknown);
    }

    /// The gate with no pods of this cluster and no handover delay.
    fn gate_of(row: Result<Option<Lease>, String>, reports: Vec<WorkloadReport>) -> Gate {
        handover_gate(&row, &me(), 3, &Ok(reports), IDLE, Duration::ZERO)
    }

    /// A row showing this replica holding epoch 3 since `held_s` seconds.
    fn held_since(held_s: i64, previous: &str) -> Result<Option<Lease>, String> {
        let mut l = lease(ME, 3, previous, false);
        l.acquired_at = l.observed_at - chrono::Duration::seconds(held_s);
        row(l)
    }

    #[test]
    fn gate_opens_only_on_a_row_read_now_that_shows_this_holder_at_this_epoch() {
        let gate = |row: Result<Option<Lease>, String>| gate_of(row, vec![]);
        assert_eq!(gate(held_since(1, "")), Gate::Open { stale: vec![] });
        // Hole: a failed or stale read used to open the gate and skip the handover delay.
        for unconfirmed in [
            Err("timeout".into()),
            Ok(None),
            row(lease(ME, 2, "", false)),
            row(lease("west/b", 3, "", false)),
            row(lease(ME, 3, "", true)),
        ] {
            assert!(matches!(gate(unconfirmed), Gate::Unconfirmed { .. }));
        }
        assert!(matches!(
            handover_gate(
                &held_since(1, ""),
                &me(),
                3,
                &Err("down".into()),
                IDLE,
                Duration::ZERO
            ),
            Gate::ReportsUnknown { .. }
        ));
    }

    #[test]
    fn gate_waits_for_other_clusters_pods_judged_by_the_reporters_bound() {
        // Held for a minute: longer than every report's bound below.
        let gate = |reports: Vec<WorkloadReport>| gate_of(held_since(60, "west/b"), reports);
        let waits = |running_pods| Gate::WaitForCluster {
            cluster: "west".into(),
            running_pods,
        };
        assert_eq!(gate(vec![]), Gate::Open { stale: vec![] });
        assert_eq!(gate(vec![report("west", 1, 3, 15)]), waits(1));
        assert_eq!(
            gate(vec![report("west", 1, 16, 15)]),
            Gate::Open {
                stale: vec!["west".into()]
            }
        );
        // A slow reporter (ttl 60) is not presumed dead after the reader's 15 s.
        assert_eq!(gate(vec![report("west", 1, 16, 60)]), waits(1));
        assert_eq!(
            gate(vec![report("west", 0, 1, 15)]),
            Gate::Open { stale: vec![] }
        );
        // A pod it wants but has not started yet counts as one.
        let mut wanting = report("west", 0, 1, 15);
        wanting.replicas = 1;
        assert_eq!(gate(vec![wanting]), waits(1));
        // Own cluster's report is never a blocker.
        assert_eq!(
            gate(vec![report("east", 1, 1, 15)]),
            Gate::Open { stale: vec![] }
        );
    }

    #[test]
    fn an_old_report_is_stale_only_once_the_holder_held_the_lease_for_two_refreshes() {
        // Just taken over after a database outage: every report is old, live clusters'
        // too; they get two of their refresh periods (2 × 15/4 s here) to report again.
        let old_report = || vec![report("west", 1, 40, 15)];
        assert!(matches!(
            gate_of(held_since(1, "west/b"), old_report()),
            Gate::WaitForCluster { .. }
        ));
        assert!(matches!(
            gate_of(held_since(7, "west/b"), old_report()),
            Gate::WaitForCluster { .. }
        ));
        assert_eq!(
            gate_of(held_since(8, "west/b"), old_report()),
            Gate::Open {
                stale: vec!["west".into()]
            }
        );
    }

    #[test]
    fn a_leader_does_not_start_a_pod_beside_its_own_stopping_one() {
        let stopping = WorkloadCounts {
            replicas: 0,
            running_pods: 1,
            ready_pods: 0,
        };
        let gate = |own| {
            handover_gate(
                &held_since(1, ""),
                &me(),
                3,
                &Ok(vec![]),
                own,
                Duration::ZERO,
            )
        };
        assert_eq!(gate(stopping), Gate::OwnPodsStopping { running_pods: 1 });
        // Running at 1 already: nothing to start.
        let running = WorkloadCounts {
            replicas: 1,
            ..stopping
        };
        assert_eq!(gate(running), Gate::Open { stale: vec![] });
    }

    #[test]
    fn handover_delay_applies_only_after_a_takeover_from_another_cluster() {
        let delay = Duration::from_secs(5);
        let gate = |previous: &str| {
            handover_gate(&held_since(1, previous), &me(), 3, &Ok(vec![]), IDLE, delay)
        };
        assert!(
            matches!(gate("west/b"), Gate::HandoverDelay { remaining } if remaining <= Duration::from_secs(4))
        );
        assert!(matches!(gate("nocluster"), Gate::HandoverDelay { .. }));
        assert_eq!(gate("east/b"), Gate::Open { stale: vec![] });
        assert_eq!(gate(""), Gate::Open { stale: vec![] });
    }

    fn facts<'a>(role: &'a Role, gate: Option<&'a Gate>, replicas: Option<i32>) -> ScaleFacts<'a> {
        ScaleFacts {
            role,
            gate,
            paused: false,
            replicas,
            recorded: None,
            me: ME,
            database_failing_for: Duration::ZERO,
            recorder_unseen_for: Duration::ZERO,
            renew_deadline: DEADLINE,
            ttl: TTL,
            running_pods: replicas.unwrap_or(0),
            steady: STEADY,
            idle: IDLE_RESYNC,
        }
    }

    const STEADY: Duration = Duration::from_millis(3750);
    const IDLE_RESYNC: Duration = Duration::from_secs(60);

    #[test]
    fn a_plan_records_scale_ups_before_they_happen_and_forgets_them_on_scale_down() {
        let leader = Role::Leader { epoch: 3 };
        let open = Gate::Open { stale: vec![] };
        let up = plan(&facts(&leader, Some(&open), Some(0)));
        assert_eq!(up.scale, Scale::Up { epoch: 3 });
        assert_eq!(up.record, Some(record(ME, 3)));
        assert!(!up.scaled_externally);
        // The Deployment's and the pods' changes bring it back.
        assert_eq!(up.requeue, IDLE_RESYNC);
        // Found at 2 while leading: someone else scaled it.
        assert!(plan(&facts(&leader, Some(&open), Some(2))).scaled_externally);
        let standby = Role::Standby {
            holder: Some("west/b".into()),
        };
        let mine = record(ME, 3);
        let down = plan(&ScaleFacts {
            recorded: Some(&mine),
            ..facts(&standby, None, Some(1))
        });
        assert_eq!(
            (down.scale, down.record, down.scaled_externally),
            (Scale::Down, None, false)
        );
        // Scaled up with no record of this operator: someone else did it.
        assert!(plan(&facts(&standby, None, Some(1))).scaled_externally);
        // Holding keeps the record as it is.
        let peer = Role::PeerLeads {
            holder: "east/b".into(),
        };
        let other = record("east/b", 4);
        let hold = plan(&ScaleFacts {
            recorded: Some(&other),
            ..facts(&peer, None, Some(1))
        });
        assert_eq!(
            (hold.scale, hold.record),
            (Scale::Hold, Some(other.clone()))
        );
    }

    #[test]
    fn a_plan_looks_again_soon_while_waiting_or_while_pods_stop() {
        let leader = Role::Leader { epoch: 3 };
        let waiting = Gate::OwnPodsStopping { running_pods: 1 };
        assert_eq!(
            plan(&facts(&leader, Some(&waiting), Some(0))).requeue,
            Duration::from_millis(500)
        );
        let standby = Role::Standby { holder: None };
        let stopping = ScaleFacts {
            running_pods: 1,
            ..facts(&standby, None, Some(0))
        };
        assert_eq!(plan(&stopping).requeue, Duration::from_secs(1));
        // Nothing to wait for: only events (or the idle resync) bring it back, except
        // where time alone changes the decision.
        assert_eq!(plan(&facts(&standby, None, Some(0))).requeue, IDLE_RESYNC);
        assert_eq!(plan(&facts(&Role::Unknown, None, Some(1))).requeue, STEADY);
        let peer = Role::PeerLeads {
            holder: "east/b".into(),
        };
        assert_eq!(plan(&facts(&peer, None, Some(1))).requeue, STEADY);
        // A leader running its pod writes nothing periodically: its presence vouches
        // for it, and every change it must act on is an event.
        let open = Gate::Open { stale: vec![] };
        assert_eq!(
            plan(&facts(&leader, Some(&open), Some(1))).requeue,
            IDLE_RESYNC
        );
    }

    #[test]
    fn scale_follows_the_reconcile_table() {
        let leader = Role::Leader { epoch: 3 };
        let open = Gate::Open { stale: vec![] };
        let mine = record(ME, 3);
        // | it holds the lease, gate open | replicas = 1 (recorded first) |
        assert_eq!(
            decide_scale(&facts(&leader, Some(&open), Some(0))),
            Scale::Up { epoch: 3 }
        );
        assert_eq!(
            decide_scale(&facts(&leader, Some(&open), Some(2))),
            Scale::Up { epoch: 3 }
        );
        // Running at 1 under another record (a peer's, an older epoch): record anew.
        assert_eq!(
            decide_scale(&facts(&leader, Some(&open), Some(1))),
            Scale::Up { epoch: 3 }
        );
        assert_eq!(
            decide_scale(&ScaleFacts {
                recorded: Some(&mine),
                ..facts(&leader, Some(&open), Some(1))
            }),
            Scale::Hold
        );
        // Leader, gate closed for any reason: hold (never up, never down).
        for gate in [
            Gate::Unconfirmed { reason: "x".into() },
            Gate::ReportsUnknown { reason: "x".into() },
            Gate::WaitForCluster {
                cluster: "west".into(),
                running_pods: 1,
            },
            Gate::HandoverDelay {
                remaining: Duration::from_secs(1),
            },
        ] {
            assert_eq!(
                decide_scale(&facts(&leader, Some(&gate), Some(0))),
                Scale::Hold
            );
            assert_eq!(
                decide_scale(&facts(&leader, Some(&gate), Some(1))),
                Scale::Hold
            );
        }
        assert_eq!(decide_scale(&facts(&leader, None, Some(0))), Scale::Hold);
        // | someone in this cluster holds it | nothing |
        let peer = Role::PeerLeads {
            holder: "east/b".into(),
        };
        assert_eq!(decide_scale(&facts(&peer, None, Some(1))), Scale::Hold);
        // | another cluster or nobody | replicas = 0 |
        let standby = Role::Standby {
            holder: Some("west/b".into()),
        };
        assert_eq!(decide_scale(&facts(&standby, None, Some(1))), Scale::Down);
        assert_eq!(decide_scale(&facts(&standby, None, Some(0))), Scale::Hold);
        // No Deployment, or paused: nothing to do.
        assert_eq!(
            decide_scale(&facts(&leader, Some(&open), None)),
            Scale::Hold
        );
        assert_eq!(
            decide_scale(&ScaleFacts {
                paused: true,
                ..facts(&standby, None, Some(1))
            }),
            Scale::Hold
        );
    }

    #[test]
    fn unreadable_database_stops_only_a_pod_nobody_can_vouch_for() {
        let unknown = Role::Unknown;
        let base = facts(&unknown, None, Some(1));
        // Never scaled up by anyone on record: nothing to stop.
        assert_eq!(decide_scale(&base), Scale::Hold);
        // Started by this replica, which no longer leads: stop it now.
        let mine = record(ME, 3);
        assert_eq!(
            decide_scale(&ScaleFacts {
                recorded: Some(&mine),
                ..base.clone()
            }),
            Scale::Down
        );
        // Started by another replica (a peer, or this pod before a restart): hold while
        // that one may still be renewing, stop once no holder could still act: this
        // replica's database calls have failed for the renew deadline and the recorder
        // has not renewed its presence for as long (a healthy leading peer does, right
        // after each renew of its leases).
        let other = record("east/old-pod", 3);
        let by_other = ScaleFacts {
            recorded: Some(&other),
            ..base.clone()
        };
        assert_eq!(decide_scale(&by_other), Scale::Hold);
        let sick_here_only = ScaleFacts {
            database_failing_for: DEADLINE,
            ..by_other.clone()
        };
        assert_eq!(decide_scale(&sick_here_only), Scale::Hold);
        let almost = ScaleFacts {
            recorder_unseen_for: DEADLINE - Duration::from_millis(1),
            ..sick_here_only.clone()
        };
        assert_eq!(decide_scale(&almost), Scale::Hold);
        let silent = ScaleFacts {
            recorder_unseen_for: DEADLINE,
            ..sick_here_only.clone()
        };
        assert_eq!(decide_scale(&silent), Scale::Down);
        // Waiting for that moment, it looks again exactly then, not a steady period later.
        assert_eq!(
            plan(&ScaleFacts {
                recorder_unseen_for: DEADLINE - Duration::from_secs(1),
                ..sick_here_only.clone()
            })
            .requeue,
            Duration::from_millis(1010)
        );
        assert_eq!(
            plan(&ScaleFacts {
                database_failing_for: DEADLINE - Duration::from_millis(500),
                recorder_unseen_for: DEADLINE,
                ..sick_here_only
            })
            .requeue,
            Duration::from_millis(510)
        );
        // The row still names this replica but its elector lapsed: the fence decides.
        assert_eq!(
            decide_scale(&facts(&Role::Lapsed, None, Some(1))),
            Scale::Hold
        );
        // Already at 0.
        assert_eq!(
            decide_scale(&ScaleFacts {
                recorded: Some(&mine),
                ..facts(&unknown, None, Some(0))
            }),
            Scale::Hold
        );
    }

    fn reaper(ns: &str, name: &str, age_s: i64, deployment: &str, lease: Option<&str>) -> Reaper {
        use super::super::crd::{LeaseSpec, ReaperSpec};
        let mut r = Reaper::new(
            name,
            ReaperSpec {
                deployment_name: deployment.into(),
                lease: LeaseSpec {
                    name: lease.map(str::to_owned),
                    ..LeaseSpec::default()
                },
                paused: false,
            },
        );
        r.metadata.namespace = Some(ns.into());
        r.metadata.creation_timestamp = Some(Time(
            k8s_openapi::jiff::Timestamp::from_second(1_700_000_000 - age_s).unwrap(),
        ));
        r
    }

    #[test]
    fn the_oldest_reaper_of_a_lease_or_deployment_acts_the_others_are_refused() {
        let scope = LeaseScope::Namespace;
        let old = reaper("prod", "a", 100, "d1", Some("prod.pay"));
        let new = reaper("prod", "b", 10, "d2", Some("prod.pay"));
        let all = [&old, &new];
        assert_eq!(conflict(&old, &all, scope), None);
        let refused = conflict(&new, &all, scope).unwrap();
        assert_eq!(refused.reason, "LeaseNameConflict");
        assert!(refused.message.contains("prod/a"), "{}", refused.message);
        // Another namespace naming the lease: refused for its name (not a conflict)
        // unless the operator shares lease names across namespaces.
        let elsewhere = reaper("dev", "b", 10, "d1", Some("prod.pay"));
        assert_eq!(conflict(&elsewhere, &[&old, &elsewhere], scope), None);
        let shared = conflict(&elsewhere, &[&old, &elsewhere], LeaseScope::Shared).unwrap();
        assert_eq!(shared.reason, "LeaseNameConflict");
        // Two leases, one Deployment.
        let same_deployment = reaper("prod", "c", 5, "d1", Some("prod.other"));
        let refused = conflict(&same_deployment, &[&old, &same_deployment], scope).unwrap();
        assert_eq!(refused.reason, "DeploymentConflict");
        // A copy (same lease, same Deployment) is a Deployment conflict: it must not
        // touch the older one's Deployment at all.
        let copy = reaper("prod", "d", 1, "d1", Some("prod.pay"));
        let refused = conflict(&copy, &[&old, &copy], scope).unwrap();
        assert_eq!(refused.reason, "DeploymentConflict");
        // A tie in age is broken by name, the same way in every replica.
        let twin_a = reaper("prod", "x", 50, "dx", Some("prod.tie"));
        let twin_b = reaper("prod", "y", 50, "dy", Some("prod.tie"));
        assert_eq!(conflict(&twin_a, &[&twin_a, &twin_b], scope), None);
        assert!(conflict(&twin_b, &[&twin_a, &twin_b], scope).is_some());
    }
}
