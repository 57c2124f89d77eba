//! Giving a lease up without a second reaper: at shutdown, when a Reaper is deleted, when
//! its lease changes, and when it disappeared while a peer ran its finalizer.
//!
//! The rule in every case: while any pod of the workload has not finished (Terminating
//! ones included), this cluster keeps holding the lease (the elector keeps renewing) and
//! keeps reporting the real pod counts, so no other cluster may start. Only when the
//! pods are gone does it report 0 and release. If its time runs out first it releases
//! nothing and reports nothing more: the lease expires and the other clusters wait for
//! this cluster's last report (pods running) to go stale.

use std::time::{Duration, Instant};

use kube::ResourceExt;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::ObjectRef;

use super::candidates::Candidate;
use super::crd::Reaper;
use super::observe::{observe_cached, observe_workload};
use super::reconcile::{Context, Error, refusal, report, scale};
use crate::lease::{WorkloadCounts, WorkloadUpdate};

/// A Reaper is being deleted: scale its Deployment to 0 and keep reporting (and, if this
/// replica leads, keep renewing: its elector runs on) until the pods are gone; then
/// report 0, release the lease and let the finalizer go.
pub async fn cleanup(reaper: &Reaper, ctx: &Context) -> Result<Action, Error> {
    let ns = reaper.namespace().unwrap_or_default();
    let key = ObjectRef::from_obj(reaper);
    let deployment = &reaper.spec.deployment_name;
    let usable = refusal(reaper, ctx);
    if usable
        .as_ref()
        .is_err_and(|r| r.reason == "DeploymentConflict")
    {
        // The Deployment is another Reaper's: nothing of it is this one's to stop.
        if let Some(candidate) = ctx.candidates.take(&key) {
            let _ = candidate.stop().await;
        }
        return Ok(Action::await_change());
    }
    let remembered = reaper
        .status
        .as_ref()
        .and_then(|s| s.pod_selector.as_deref());
    let workload = observe_workload(&ctx.client, &ns, deployment, remembered).await?;
    let mut counts = workload.counts;
    if workload.deployment.is_some() && counts.replicas > 0 {
        scale(&ctx.client, &ns, deployment, 0).await?;
        counts.replicas = 0;
        // The ReplicaSet may be creating a pod this list did not see: look again.
        counts.running_pods = counts.running_pods.max(1);
    }
    // A Reaper refused for its lease name must not overwrite the report of the Reaper
    // that owns that lease in this cluster.
    // Through the candidate, so the report refresher repeats this report, not an older one.
    if let Ok((lease_name, timings)) = &usable {
        let update = WorkloadUpdate {
            name: lease_name.clone(),
            counts,
            timing: workload.report_timing(*timings),
        };
        report(ctx, &key, &update).await.map_err(Error::Database)?;
    }
    if counts.running_pods > 0 {
        return Err(Error::PodsStillRunning(counts.running_pods));
    }
    if let Some(candidate) = ctx.candidates.take(&key) {
        release(ctx, candidate, "the Reaper was deleted").await;
    }
    Ok(Action::await_change())
}

/// Scales the candidate's workload to 0 and waits, bounded by the shutdown timeout, for
/// its pods to go, renewing and reporting meanwhile; then releases (see the module).
pub async fn hand_over(ctx: &Context, candidate: Candidate) {
    let lease_name = candidate.lease_name.clone();
    if candidate.watch.leader_epoch().is_none() {
        // Not leading: nothing runs on this replica's behalf (its fence stopped what it
        // had started). A row still naming it expires by itself; releasing it early
        // could hand over while a fenced pod is still stopping.
        let _ = candidate.stop().await;
        return;
    }
    let deadline = Instant::now() + ctx.shutdown_timeout;
    // Subscribed before the first look, so no change between a look and the wait is missed.
    let mut changes = ctx.caches.changes();
    let pods_gone = loop {
        if candidate.watch.leader_epoch().is_none() {
            tracing::warn!(lease = %lease_name, "handover: lost the lease while waiting for the pods; not releasing");
            break false;
        }
        if workload_stopped(ctx, &candidate).await {
            break true;
        }
        if Instant::now() >= deadline {
            tracing::warn!(
                lease = %lease_name,
                "handover: pods still running at the shutdown timeout; exiting without releasing \
                 (the lease expires after its ttl and other clusters wait until this cluster's \
                 last report goes stale; raise --shutdown-timeout-seconds and the pod's \
                 terminationGracePeriodSeconds above the workload's stop time)"
            );
            break false;
        }
        // The next pod or Deployment change, or a look anyway after a while (a change
        // the caches missed, or a report to refresh).
        let _ = tokio::time::timeout(HANDOVER_RECHECK, changes.changed()).await;
    };
    if pods_gone {
        release(ctx, candidate, "after scaling the workload to 0").await;
    } else {
        let _ = candidate.stop().await;
    }
}

/// How long a handover waits for a pod or Deployment change before it looks again.
const HANDOVER_RECHECK: Duration = Duration::from_secs(1);

/// One step of a handover: scale to 0, report what runs; true once nothing does. The
/// caches tell when to look; "nothing runs" is confirmed by the API server itself
/// before it is reported, since the release that follows cannot be taken back.
async fn workload_stopped(ctx: &Context, candidate: &Candidate) -> bool {
    let (ns, deployment) = (&candidate.namespace, &candidate.deployment);
    let selector = candidate.pod_selector.as_deref();
    let cached = match observe_cached(&ctx.caches, ns, deployment, selector) {
        Ok(Some(workload)) if workload.counts.running_pods > 0 => Ok(workload),
        Ok(_) => observe_workload(&ctx.client, ns, deployment, selector).await,
        Err(error) => Err(error),
    };
    let workload = match cached {
        Ok(workload) => workload,
        Err(error) => {
            tracing::warn!(%error, "handover: cannot read the workload");
            return false;
        }
    };
    let mut counts = workload.counts;
    if counts.replicas > 0 {
        if let Err(error) = scale(&ctx.client, ns, deployment, 0).await {
            tracing::warn!(%error, "handover: cannot scale down");
        }
        counts.running_pods = counts.running_pods.max(1);
    }
    // The truth, so that no other cluster starts while a pod here still stops. Under
    // the report lock: a refresh in flight could otherwise land after it.
    let _lock = ctx.report_lock.lock().await;
    if let Err(error) = ctx
        .store
        .sync_workload(
            &candidate.lease_name,
            &ctx.cluster,
            &ctx.holder,
            counts,
            workload.report_timing(candidate.timings),
        )
        .await
    {
        tracing::warn!(%error, "handover: cannot report the workload");
        return false;
    }
    counts == WorkloadCounts::default()
}

/// Stops the elector and releases its lease: only once this cluster has reported that
/// nothing of the workload runs any more.
async fn release(ctx: &Context, candidate: Candidate, why: &str) {
    let (lease_name, reference) = (candidate.lease_name.clone(), candidate.reference.clone());
    let Some(mut elector) = candidate.stop().await else {
        return;
    };
    let Some(epoch) = elector.held_epoch() else {
        return;
    };
    match elector.release().await {
        // Awaited, not spawned: at shutdown the process exits right after this.
        Ok(true) => {
            let event = Event {
                type_: EventType::Normal,
                reason: "LeaseReleased".into(),
                note: Some(format!("released lease {lease_name} (epoch {epoch}) {why}")),
                action: "Release".into(),
                secondary: None,
            };
            ctx.events.publish_now(&event, &reference).await;
        }
        Ok(false) => {}
        Err(error) => {
            tracing::warn!(lease = %lease_name, %error, "could not release the lease; it will expire")
        }
    }
}

/// Hands over every lease this process holds (graceful shutdown).
pub async fn hand_over_all(ctx: &Context) {
    let handovers = ctx
        .candidates
        .take_all()
        .into_iter()
        .map(|(_, candidate)| hand_over(ctx, candidate));
    futures::future::join_all(handovers).await;
}

/// Stops electors whose Reaper is gone (deleted while another replica ran the
/// finalizer), handing their leases over.
pub async fn forget_deleted(ctx: &Context, existing: &[ObjectRef<Reaper>]) {
    for key in ctx.candidates.keys() {
        if !existing.contains(&key)
            && let Some(candidate) = ctx.candidates.take(&key)
        {
            hand_over(ctx, candidate).await;
        }
    }
}
