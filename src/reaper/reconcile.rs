//! The Reaper controller: per Reaper, hold the lease, scale the singleton Deployment
//! (1 where this replica leads, 0 where another cluster or nobody does) and record the
//! lease on the status.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use chrono::Utc;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::{self, ObjectRef, reflector};
use kube::runtime::{Predicate, PredicateConfig, WatchStreamExt, predicates, watcher};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use tokio::sync::mpsc;

use super::candidates::{Candidate, Candidates, publish};
use super::crd::{LeaseSpec, Reaper, ReaperStatus};
use super::status::{self, Gate, Observation, Role};
use crate::config::{LeaseTimings, validate_label};
use crate::lease::{LeaseStore, WorkloadCounts};

pub const FINALIZER: &str = "pglease.dev/cleanup";
pub const FIELD_MANAGER: &str = "reaper-operator";
/// Reconciles in flight at once (never two of one Reaper): enough for 1 000 Reapers at
/// the default timings (~270 periodic reconciles/s at ~100 ms each), while bounding the
/// API calls and responses held at once.
const RECONCILE_CONCURRENCY: u16 = 64;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("finalizer: {0}")]
    Finalizer(String),
    /// Another replica changed the finalizers at the same moment; retried shortly.
    #[error("finalizer update conflicted with another replica: {0}")]
    FinalizerConflict(kube::Error),
    #[error("still waiting for {0} pod(s) of the Deployment to stop")]
    PodsStillRunning(i32),
}

/// Shared by every reconcile of this process.
pub struct Context {
    pub client: Client,
    pub store: LeaseStore,
    pub cluster: String,
    /// `<cluster>/<identity>`.
    pub holder: String,
    pub candidates: Candidates,
    pub recorder: Recorder,
    /// Bound for scaling down and waiting for pods at handover.
    pub shutdown_timeout: Duration,
    /// Watch only this namespace (all when `None`).
    pub namespace: Option<String>,
    pub metrics: Arc<crate::metrics::Metrics>,
}

/// Runs the controller until `shutdown` resolves; then the caller hands over.
pub async fn run(
    ctx: Arc<Context>,
    triggers: mpsc::UnboundedReceiver<ObjectRef<Reaper>>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
    on_ready: impl FnOnce() + Send + 'static,
) {
    let (reapers, deployments) = match &ctx.namespace {
        Some(ns) => (
            Api::<Reaper>::namespaced(ctx.client.clone(), ns),
            Api::<Deployment>::namespaced(ctx.client.clone(), ns),
        ),
        None => (Api::all(ctx.client.clone()), Api::all(ctx.client.clone())),
    };
    // Bounded: with 1 000 Reapers an unbounded controller starts every periodic reconcile
    // at once (each lists pods and HPAs), which floods the API server and holds all the
    // responses in memory together.
    // managedFields are dropped before caching: nothing here reads them, and with the
    // status writes' entries they are a large part of each cached Reaper. Status-only
    // changes (our own writes, a peer's) trigger nothing: spec changes and deletion
    // marking move the generation, and finalizers are watched for the cleanup.
    let (store, writer) = reflector::store();
    let reaper_events = reflector(
        writer,
        watcher(reapers, watcher::Config::default().any_semantic())
            .modify(|reaper| reaper.managed_fields_mut().clear()),
    )
    .applied_objects()
    .predicate_filter(
        predicates::generation.combine(predicates::finalizers),
        PredicateConfig::default(),
    );
    let controller = Controller::for_stream(reaper_events, store)
        .with_config(controller::Config::default().concurrency(RECONCILE_CONCURRENCY));
    let store = controller.store();
    let ready_store = store.clone();
    let gc_ctx = ctx.clone();
    tokio::spawn(async move {
        // The store's readiness future wakes only its most recent poller, and the
        // controller polls it too: poll again each second instead of waiting once.
        loop {
            match tokio::time::timeout(Duration::from_secs(1), ready_store.wait_until_ready()).await
            {
                Ok(Ok(())) => break,
                Ok(Err(error)) => {
                    tracing::warn!(%error, "Reaper cache never synced");
                    return;
                }
                Err(_) => {}
            }
        }
        tracing::info!("Reaper cache synced");
        on_ready();
        // Electors of Reapers that disappeared without this replica running their
        // finalizer (a peer did) are handed over here.
        let mut interval = tokio::time::interval(Duration::from_secs(5));
        loop {
            interval.tick().await;
            let existing: Vec<ObjectRef<Reaper>> = ready_store
                .state()
                .iter()
                .map(|r| ObjectRef::from_obj(&**r))
                .collect();
            forget_deleted(&gc_ctx, &existing).await;
        }
    });
    let trigger_stream = futures::stream::unfold(triggers, |mut rx| async move {
        rx.recv().await.map(|r| (r, rx))
    });
    controller
        .watches(
            deployments,
            watcher::Config::default().any_semantic(),
            move |d| {
                let (ns, name) = (d.namespace(), d.name_any());
                store
                    .state()
                    .into_iter()
                    .filter(|r| r.namespace() == ns && r.spec.deployment_name == name)
                    .map(|r| ObjectRef::from_obj(&*r))
                    .collect::<Vec<_>>()
            },
        )
        .reconcile_on(trigger_stream)
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(error) = result {
                tracing::debug!(%error, "reconcile failed");
            }
        })
        .await;
}

async fn reconcile(reaper: Arc<Reaper>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let result = reconcile_inner(reaper, &ctx).await;
    ctx.metrics.reconciliations.inc();
    ctx.metrics
        .reconcile_duration
        .observe(started.elapsed().as_secs_f64());
    if result.is_err() {
        ctx.metrics.reconcile_errors.inc();
    }
    result
}

async fn reconcile_inner(reaper: Arc<Reaper>, ctx: &Context) -> Result<Action, Error> {
    let ns = reaper.namespace().unwrap_or_default();
    let api: Api<Reaper> = Api::namespaced(ctx.client.clone(), &ns);
    finalizer(&api, FINALIZER, reaper, |event| async {
        match event {
            Finalizer::Apply(reaper) => apply(&reaper, ctx).await,
            Finalizer::Cleanup(reaper) => cleanup(&reaper, ctx).await,
        }
    })
    .await
    .map_err(|e| match e {
        kube::runtime::finalizer::Error::ApplyFailed(e)
        | kube::runtime::finalizer::Error::CleanupFailed(e) => e,
        kube::runtime::finalizer::Error::AddFinalizer(e)
        | kube::runtime::finalizer::Error::RemoveFinalizer(e) => Error::FinalizerConflict(e),
        other => Error::Finalizer(other.to_string()),
    })
}

fn error_policy(reaper: Arc<Reaper>, error: &Error, _ctx: Arc<Context>) -> Action {
    match error {
        Error::PodsStillRunning(_) => Action::requeue(Duration::from_secs(1)),
        // Replicas race to add the finalizer (a JSON-patch `test` guards it): expected.
        Error::FinalizerConflict(kube::Error::Api(status))
            if status.code == 422 || status.code == 409 =>
        {
            tracing::debug!(reaper = %reaper.name_any(), %error, "finalizer race; retrying");
            Action::requeue(Duration::from_millis(500))
        }
        _ => {
            tracing::warn!(reaper = %reaper.name_any(), %error, "reconcile failed");
            Action::requeue(Duration::from_secs(5))
        }
    }
}

/// The spec's timings, or the reason they cannot be used (the CRD's CEL rules refuse
/// such specs; this catches what slips through, e.g. an older CRD).
pub fn timings_of(spec: &LeaseSpec) -> Result<LeaseTimings, String> {
    let secs = |v: i32, what: &str| {
        u64::try_from(v)
            .map(Duration::from_secs)
            .map_err(|_| format!("lease.{what} must not be negative"))
    };
    LeaseTimings::new(
        secs(spec.ttl_seconds, "ttlSeconds")?,
        secs(spec.renew_deadline_seconds, "renewDeadlineSeconds")?,
        secs(spec.retry_period_seconds, "retryPeriodSeconds")?,
    )
    .map_err(|e| e.to_string())
}

/// What this cluster's Deployment looks like.
struct Workload {
    deployment: Option<Deployment>,
    counts: WorkloadCounts,
}

async fn observe_workload(client: &Client, ns: &str, name: &str) -> Result<Workload, Error> {
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let Some(deployment) = deployments.get_opt(name).await? else {
        return Ok(Workload {
            deployment: None,
            counts: WorkloadCounts::default(),
        });
    };
    let replicas = deployment.spec.replicas.unwrap_or(1);
    let (running_pods, ready_pods) = count_pods(client, ns, &deployment).await?;
    Ok(Workload {
        deployment: Some(deployment),
        counts: WorkloadCounts {
            replicas,
            running_pods,
            ready_pods,
        },
    })
}

/// Pods of the Deployment that have not finished (terminating ones count: they may
/// still be acting), and how many of them are ready.
async fn count_pods(
    client: &Client,
    ns: &str,
    deployment: &Deployment,
) -> Result<(i32, i32), Error> {
    let Some(labels) = deployment
        .spec
        .selector
        .match_labels
        .as_ref()
        .filter(|l| !l.is_empty())
    else {
        return Ok((0, 0));
    };
    let selector = labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let list = pods.list(&ListParams::default().labels(&selector)).await?;
    let mut running = 0;
    let mut ready = 0;
    for pod in list.items {
        let phase = pod
            .status
            .as_ref()
            .and_then(|s| s.phase.as_deref())
            .unwrap_or("Pending");
        if phase == "Succeeded" || phase == "Failed" {
            continue;
        }
        running += 1;
        let is_ready = pod.metadata.deletion_timestamp.is_none()
            && pod
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        if is_ready {
            ready += 1;
        }
    }
    Ok((running, ready))
}

/// `Some(maxSurge)` when a rollout could briefly run two pods.
fn rolling_surge(deployment: &Deployment) -> Option<String> {
    let strategy = deployment.spec.strategy.as_ref();
    let kind = strategy
        .and_then(|s| s.type_.as_deref())
        .unwrap_or("RollingUpdate");
    if kind != "RollingUpdate" {
        return None;
    }
    let surge = strategy
        .and_then(|s| s.rolling_update.as_ref())
        .and_then(|r| r.max_surge.clone())
        .unwrap_or(IntOrString::String("25%".into()));
    match surge {
        IntOrString::Int(0) => None,
        IntOrString::String(s) if s == "0" || s == "0%" => None,
        IntOrString::Int(n) => Some(n.to_string()),
        IntOrString::String(s) => Some(s),
    }
}

async fn autoscaler_for(client: &Client, ns: &str, deployment: &str) -> Option<String> {
    let hpas: Api<HorizontalPodAutoscaler> = Api::namespaced(client.clone(), ns);
    match hpas.list(&ListParams::default()).await {
        Ok(list) => list
            .items
            .into_iter()
            .find(|h| {
                h.spec.scale_target_ref.kind == "Deployment"
                    && h.spec.scale_target_ref.name == deployment
            })
            .map(|h| h.name_any()),
        Err(error) => {
            tracing::debug!(%error, "cannot list HorizontalPodAutoscalers");
            None
        }
    }
}

async fn scale(client: &Client, ns: &str, name: &str, replicas: i32) -> Result<(), Error> {
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    deployments
        .patch_scale(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "replicas": replicas } })),
        )
        .await?;
    tracing::info!(
        namespace = ns,
        deployment = name,
        replicas,
        "scaled deployment"
    );
    Ok(())
}

async fn apply(reaper: &Reaper, ctx: &Context) -> Result<Action, Error> {
    let ns = reaper.namespace().unwrap_or_default();
    let key = ObjectRef::from_obj(reaper);
    let lease_name = reaper.lease_name();
    let timings = timings_of(&reaper.spec.lease).and_then(|t| {
        validate_label("lease name", &lease_name)
            .map(|_| t)
            .map_err(|e| e.to_string())
    });
    let timings = match timings {
        Ok(t) => t,
        Err(message) => {
            if let Some(old) = ctx.candidates.take(&key) {
                hand_over(ctx, old).await;
            }
            let status = status::invalid_status(
                &message,
                reaper.metadata.generation,
                reaper.status.as_ref(),
                Utc::now(),
            );
            write_status(ctx, reaper, status).await?;
            return Ok(Action::await_change());
        }
    };

    let reference = reaper.object_ref(&());
    let (watch, database_ok) = loop {
        match ctx.candidates.with(
            &key,
            &lease_name,
            timings,
            &reaper.spec.deployment_name,
            reference.clone(),
            |c| (c.watch.clone(), c.database_ok.clone()),
        ) {
            Ok(handles) => break handles,
            Err(old) => {
                // The lease name, timings or Deployment changed: hand the old lease over
                // cleanly (its Deployment to 0, then release).
                hand_over(ctx, *old).await;
            }
        }
    };

    let scaled_up = ctx
        .candidates
        .update(&key, |c| c.scaled_up_epoch.is_some())
        .unwrap_or(false);
    if scaled_up
        && watch.leader_epoch().is_none()
        && !database_ok.load(Ordering::Relaxed)
        && !reaper.spec.paused
    {
        // This replica scaled the workload up, can no longer prove it leads, and the
        // database is failing: stop the workload first, before any call that could hang
        // until the lease expires.
        scale(&ctx.client, &ns, &reaper.spec.deployment_name, 0).await?;
        ctx.candidates.update(&key, |c| c.scaled_up_epoch = None);
    }
    let workload = observe_workload(&ctx.client, &ns, &reaper.spec.deployment_name).await?;
    let lease = ctx.store.get(&lease_name).await.map_err(|e| e.to_string());
    let role = status::role(
        watch.leader_epoch(),
        Some(&lease),
        &ctx.holder,
        &ctx.cluster,
        scaled_up,
    );

    // Every replica reports what it sees of this cluster's workload (they agree; the
    // row is per cluster) and learns what the other clusters report.
    let reports = ctx
        .store
        .sync_workload(&lease_name, &ctx.cluster, &ctx.holder, workload.counts)
        .await
        .map_err(|e| e.to_string());
    let database_error = match (&lease, &reports) {
        (Err(e), _) | (_, Err(e)) => Some(e.clone()),
        _ if !database_ok.load(Ordering::Relaxed) => {
            Some("the lease elector's last database call failed".into())
        }
        _ => None,
    };
    // A leader without the other clusters' reports cannot tell whether scaling up is
    // safe: it gets no gate below, so it holds the Deployment where it is (a brief
    // database error must not restart the running singleton; the renew deadline, not
    // one failed call, decides when it stops).

    let lease_row = lease.as_ref().ok().and_then(|l| l.as_ref());
    let ttl = timings.ttl;
    let handover_delay =
        Duration::from_secs(reaper.spec.lease.handover_delay_seconds.max(0) as u64);
    let gate = match (&role, &reports) {
        (Role::Leader { .. }, Ok(reports)) => Some(status::handover_gate(
            lease_row,
            reports,
            &ctx.cluster,
            ttl,
            handover_delay,
        )),
        _ => None,
    };

    let mut requeue = steady_requeue(timings);
    if let (Some(deployment), false) = (&workload.deployment, reaper.spec.paused) {
        let current = workload.counts.replicas;
        let name = deployment.name_any();
        match (&role, &gate) {
            (Role::Leader { epoch }, Some(Gate::Open { stale })) => {
                if !stale.is_empty()
                    && ctx
                        .candidates
                        .update(&key, |c| c.warned_stale_epoch.replace(*epoch))
                        .flatten()
                        != Some(*epoch)
                {
                    publish(
                        &ctx.recorder,
                        Event {
                            type_: EventType::Warning,
                            reason: "StaleClusterReport".into(),
                            note: Some(format!(
                                "cluster(s) {} last reported running pods more than the ttl ago and are presumed dead or cut off; \
                             scaling up anyway: only the workload's own fencing (epoch check) protects against a second pod",
                                stale.join(", ")
                            )),
                            action: "Scale".into(),
                            secondary: None,
                        },
                        &reference,
                    );
                }
                if current != 1 {
                    // Decide at the moment of acting, not from what was true above.
                    if watch.leader_epoch() == Some(*epoch) {
                        if current > 1 {
                            ctx.candidates.update(&key, |c| c.external_scale_ups += 1);
                        }
                        scale(&ctx.client, &ns, &name, 1).await?;
                        ctx.candidates
                            .update(&key, |c| c.scaled_up_epoch = Some(*epoch));
                    }
                } else {
                    ctx.candidates
                        .update(&key, |c| c.scaled_up_epoch = Some(*epoch));
                }
            }
            (Role::Leader { .. }, _) => {
                // Waiting for another cluster or the handover delay: look again soon.
                requeue = Duration::from_millis(500);
            }
            (Role::PeerLeads { .. }, _) => {}
            (Role::Standby { .. }, _) | (Role::Unknown { was_leader: true }, _) => {
                if current > 0 {
                    let seen_before = ctx
                        .candidates
                        .update(&key, |c| c.scaled_up_epoch.is_none())
                        .unwrap_or(true);
                    if seen_before && matches!(role, Role::Standby { .. }) {
                        ctx.candidates.update(&key, |c| c.external_scale_ups += 1);
                    }
                    scale(&ctx.client, &ns, &name, 0).await?;
                }
                ctx.candidates.update(&key, |c| c.scaled_up_epoch = None);
                if workload.counts.running_pods > 0 {
                    requeue = Duration::from_secs(1);
                }
            }
            (Role::Unknown { was_leader: false }, _) => {}
        }
    }

    if matches!(role, Role::PeerLeads { .. }) {
        // The peer that leads writes the status.
        return Ok(Action::requeue(requeue));
    }
    let external = ctx
        .candidates
        .update(&key, |c| c.external_scale_ups)
        .unwrap_or(0);
    let risks = match &workload.deployment {
        Some(d) => status::singleton_risks(
            rolling_surge(d),
            autoscaler_for(&ctx.client, &ns, &reaper.spec.deployment_name).await,
            external,
        ),
        None => Vec::new(),
    };
    let observation = Observation {
        role: &role,
        lease_name: &lease_name,
        lease: lease_row,
        database_error: database_error.as_deref(),
        deployment_found: workload.deployment.is_some(),
        replicas: workload.counts.replicas,
        ready_replicas: workload.counts.ready_pods,
        running_pods: workload.counts.running_pods,
        gate: gate.as_ref(),
        paused: reaper.spec.paused,
        risks: &risks,
        generation: reaper.metadata.generation,
        now: Utc::now(),
    };
    let new_status = status::build_status(&observation, reaper.status.as_ref());
    let changed = reaper
        .status
        .as_ref()
        .is_none_or(|old| status::differs(old, &new_status, timings.ttl / 2));
    if changed {
        write_status(ctx, reaper, new_status).await?;
    }
    Ok(Action::requeue(requeue))
}

/// How often a Reaper is reconciled when nothing happens. Leadership changes and
/// Deployment events trigger a reconcile at once; the periodic one refreshes this
/// cluster's workload report, which other clusters treat as stale after a ttl, so a
/// quarter ttl leaves three refreshes of margin, and never slower than the retry period
/// (at the default 15/10/2 s: every 3.75 s instead of every 2 s).
fn steady_requeue(timings: LeaseTimings) -> Duration {
    timings.retry_period.max(timings.ttl / 4)
}

async fn write_status(ctx: &Context, reaper: &Reaper, status: ReaperStatus) -> Result<(), Error> {
    let api: Api<Reaper> =
        Api::namespaced(ctx.client.clone(), &reaper.namespace().unwrap_or_default());
    let patch = json!({
        "apiVersion": Reaper::api_version(&()),
        "kind": Reaper::kind(&()),
        "status": status,
    });
    api.patch_status(
        &reaper.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(patch),
    )
    .await?;
    Ok(())
}

/// A Reaper is being deleted: scale its Deployment to 0 and release the lease.
async fn cleanup(reaper: &Reaper, ctx: &Context) -> Result<Action, Error> {
    let ns = reaper.namespace().unwrap_or_default();
    let key = ObjectRef::from_obj(reaper);
    let deployment = &reaper.spec.deployment_name;
    if let Some(candidate) = ctx.candidates.take(&key) {
        hand_over(ctx, candidate).await;
    }
    let workload = observe_workload(&ctx.client, &ns, deployment).await?;
    if workload.deployment.is_some() && workload.counts.replicas > 0 {
        scale(&ctx.client, &ns, deployment, 0).await?;
    }
    if workload.counts.running_pods > 0 {
        return Err(Error::PodsStillRunning(workload.counts.running_pods));
    }
    Ok(Action::await_change())
}

/// Stops an elector and, if it held the lease, scales the workload to 0, waits (bounded)
/// for its pods to stop, and only then releases the lease, so a standby anywhere can
/// take over without overlap.
pub async fn hand_over(ctx: &Context, candidate: Candidate) {
    let (ns, deployment, reference) = (
        candidate.namespace.clone(),
        candidate.deployment.clone(),
        candidate.reference.clone(),
    );
    let (ns, deployment, reference) = (ns.as_str(), deployment.as_str(), &reference);
    let lease_name = candidate.lease_name.clone();
    let Some(mut elector) = candidate.stop().await else {
        return;
    };
    let Some(epoch) = elector.held_epoch() else {
        return;
    };
    let deadline = Instant::now() + ctx.shutdown_timeout;
    loop {
        match observe_workload(&ctx.client, ns, deployment).await {
            Ok(w)
                if w.deployment.is_none()
                    || (w.counts.replicas == 0 && w.counts.running_pods == 0) =>
            {
                break;
            }
            Ok(w) => {
                if w.counts.replicas > 0
                    && let Err(error) = scale(&ctx.client, ns, deployment, 0).await
                {
                    tracing::warn!(%error, "handover: cannot scale down");
                }
            }
            Err(error) => tracing::warn!(%error, "handover: cannot read the workload"),
        }
        if Instant::now() >= deadline {
            tracing::warn!(lease = %lease_name, "handover: pods still running at the timeout; releasing anyway");
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Tell the other clusters this one runs nothing before they can take the lease.
    if let Err(error) = ctx
        .store
        .sync_workload(
            &lease_name,
            &ctx.cluster,
            &ctx.holder,
            WorkloadCounts::default(),
        )
        .await
    {
        tracing::warn!(%error, "handover: cannot report the stopped workload");
    }
    match elector.release().await {
        // Awaited, not spawned: at shutdown the process exits right after this.
        Ok(true) => {
            let event = Event {
                type_: EventType::Normal,
                reason: "LeaseReleased".into(),
                note: Some(format!(
                    "released lease {lease_name} (epoch {epoch}) after scaling the workload to 0"
                )),
                action: "Release".into(),
                secondary: None,
            };
            if let Err(error) = ctx.recorder.publish(&event, reference).await {
                tracing::debug!(%error, "could not publish the release event");
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steady_requeue_refreshes_reports_well_within_the_ttl() {
        let t = LeaseTimings::from_millis;
        assert_eq!(
            steady_requeue(t(15_000, 10_000, 2_000)),
            Duration::from_millis(3_750)
        );
        assert_eq!(
            steady_requeue(t(3_000, 2_000, 1_000)),
            Duration::from_secs(1)
        );
        assert_eq!(
            steady_requeue(t(60_000, 40_000, 30_000)),
            Duration::from_secs(30)
        );
    }
}
