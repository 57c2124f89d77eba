//! The Reaper controller: per Reaper, hold the lease, scale the singleton Deployment
//! (1 where this replica leads, 0 where another cluster or nobody does) and record the
//! lease on the status.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use chrono::Utc;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::events::{Event, EventType};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::{self, ObjectRef, Store, reflector};
use kube::runtime::{Predicate, PredicateConfig, WatchStreamExt, predicates, watcher};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use tokio::sync::mpsc;

use super::candidates::Candidates;
use super::crd::{LeaseScope, LeaseSpec, Reaper, ReaperStatus};
use super::decide::{self, Gate, Role, Scale, ScaleFacts, ScaleRecord};
use super::events::Events;
use super::handover::{cleanup, forget_deleted, hand_over};
use super::observe::{self, Workload};
use super::status::{self, LastWrite, Observation};
use super::watches::{self, Caches, Watches};
use crate::config::LeaseTimings;
use crate::lease::{
    ClusterName, Holder, LeaderWatch, Lease, LeaseName, LeaseStore, WorkloadCounts, WorkloadReport,
    WorkloadUpdate, cluster_of,
};

pub const FINALIZER: &str = "pglease.dev/cleanup";
pub const FIELD_MANAGER: &str = "reaper-operator";
/// Reconciles in flight at once (never two of one Reaper): enough for 1 000 Reapers at
/// the default timings (~270 periodic reconciles/s at ~100 ms each), while bounding the
/// API calls and responses held at once.
const RECONCILE_CONCURRENCY: u16 = 64;
/// The resync of a Reaper with nothing to do here: a safety net only, since a change of
/// its Deployment, its pods, its lease row or the other clusters' reports reconciles it
/// at once. Every Reaper costs one reconcile per period (from the caches: no API call,
/// no statement), so with a minute, 1 000 Reapers cost 17 reconciles/s for nothing.
const IDLE_RESYNC: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// The finalizer helper refused the object (no name, an invalid finalizer).
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    /// Another replica changed the finalizers at the same moment; retried shortly.
    #[error("finalizer update conflicted with another replica: {0}")]
    FinalizerConflict(kube::Error),
    #[error("still waiting for {0} pod(s) of the Deployment to stop")]
    PodsStillRunning(i32),
    #[error("cannot count the pods of Deployment {0}: {1}")]
    Selector(String, String),
    #[error("lease database: {0}")]
    Database(#[from] crate::Error),
}

/// Shared by every reconcile of this process.
pub struct Context {
    pub client: Client,
    pub store: LeaseStore,
    pub cluster: ClusterName,
    /// `<cluster>/<identity>`.
    pub holder: Holder,
    pub candidates: Candidates,
    pub events: Events,
    /// Bound for scaling down and waiting for pods at handover.
    pub shutdown_timeout: Duration,
    /// Watch only this namespace (all when `None`).
    pub namespace: Option<String>,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Which lease rows a Reaper may compete for.
    pub lease_scope: LeaseScope,
    /// Every Reaper of this cluster (for conflicts), once the controller runs.
    pub reapers: OnceLock<Store<Reaper>>,
    /// Set once that cache has listed every Reaper: before, a conflict could go unseen.
    pub reapers_synced: AtomicBool,
    /// The Deployments, pods and HPAs reconciles read.
    pub caches: Caches,
    /// Held while this replica's workload reports are written (see `reports`).
    pub report_lock: tokio::sync::Mutex<()>,
    /// The presences of this cluster's replicas, as this replica sees them.
    pub presences: Arc<super::presence::Presences>,
}

/// Runs the controller until `shutdown` resolves; then the caller hands over.
pub async fn run(
    ctx: Arc<Context>,
    watches: Watches,
    triggers: mpsc::UnboundedReceiver<ObjectRef<Reaper>>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
    on_ready: impl FnOnce() + Send + 'static,
) {
    let reapers = match &ctx.namespace {
        Some(ns) => Api::<Reaper>::namespaced(ctx.client.clone(), ns),
        None => Api::all(ctx.client.clone()),
    };
    // Bounded: with 1 000 Reapers an unbounded controller starts every periodic reconcile
    // at once (each lists pods and HPAs), which floods the API server and holds all the
    // responses in memory together.
    // managedFields and annotations are dropped before caching: nothing here reads
    // them, and they are a large part of each cached Reaper (the status writes' entries,
    // `kubectl apply`'s copy of the whole object). Status-only
    // changes (our own writes, a peer's) trigger nothing: spec changes and deletion
    // marking move the generation, and finalizers are watched for the cleanup.
    let (store, writer) = reflector::store();
    let reaper_events = reflector(
        writer,
        watcher(reapers, watcher::Config::default().any_semantic())
            .default_backoff()
            .modify(|reaper| {
                reaper.metadata.managed_fields = None;
                reaper.metadata.annotations = None;
            }),
    )
    .applied_objects()
    .predicate_filter(
        predicates::generation.combine(predicates::finalizers),
        PredicateConfig::default(),
    )
    // The watch retries by itself (its own backoff); an error passed on would make the
    // controller back off every trigger for up to minutes, the electors' included.
    .filter_map(|event| async move {
        match event {
            Ok(reaper) => Some(Ok(reaper)),
            Err(error) => {
                tracing::warn!(%error, "Reaper watch failed; retrying");
                None
            }
        }
    });
    let controller = Controller::for_stream(reaper_events, store)
        .with_config(controller::Config::default().concurrency(RECONCILE_CONCURRENCY));
    let store = controller.store();
    let _ = ctx.reapers.set(store.clone());
    tokio::spawn(sync_then_collect(store.clone(), ctx.clone(), on_ready));
    let trigger_stream = futures::stream::unfold(triggers, |mut rx| async move {
        rx.recv().await.map(|r| (r, rx))
    });
    let (by_deployment, by_pod, by_autoscaler) = (store.clone(), store.clone(), store);
    let deployments = ctx.caches.deployments.clone();
    controller
        .watches_stream(watches.deployments, move |d| {
            watches::reapers_of_deployment(&by_deployment, d.namespace().as_deref(), &d.name_any())
        })
        .watches_stream(watches.pods, move |pod| {
            watches::reapers_of_pod(&by_pod, &deployments, &pod)
        })
        .watches_stream(watches.autoscalers, move |hpa| {
            watches::reapers_of_deployment(
                &by_autoscaler,
                hpa.namespace().as_deref(),
                &hpa.spec.scale_target_ref.name,
            )
        })
        .reconcile_on(trigger_stream)
        // Reapers reconciled from a cache just before it failed would otherwise come
        // back only at their idle resync, and one reconciled now reads the API server.
        .reconcile_all_on(watches.distrusted)
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(error) = result {
                tracing::debug!(%error, "reconcile failed");
            }
        })
        .await;
}

/// Marks the replica ready once every cache has listed its objects; from then on, every
/// 5 s, hands over the electors of Reapers that disappeared without this replica running
/// their finalizer (a peer did).
async fn sync_then_collect(reapers: Store<Reaper>, ctx: Arc<Context>, on_ready: impl FnOnce()) {
    // The store's readiness future wakes only its most recent poller, and the
    // controller polls it too: poll again each second instead of waiting once.
    loop {
        match tokio::time::timeout(Duration::from_secs(1), reapers.wait_until_ready()).await {
            Ok(Ok(())) => break,
            Ok(Err(error)) => {
                tracing::warn!(%error, "Reaper cache never synced");
                return;
            }
            Err(_) => {}
        }
    }
    watches::synced(&ctx.caches).await;
    tracing::info!("Reaper, Deployment, pod and HPA caches synced");
    ctx.reapers_synced.store(true, Ordering::Relaxed);
    on_ready();
    let mut interval = tokio::time::interval(Duration::from_secs(5));
    loop {
        interval.tick().await;
        let existing: Vec<ObjectRef<Reaper>> = reapers
            .state()
            .iter()
            .map(|r| ObjectRef::from_obj(&**r))
            .collect();
        forget_deleted(&ctx, &existing).await;
    }
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
        other => Error::Finalizer(Box::new(other)),
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

/// Why a Reaper does not act (`InvalidSpec`, `LeaseNameOutsideNamespace`,
/// `LeaseNameConflict`, `DeploymentConflict`), or the lease row and timings it acts with.
pub fn refusal(
    reaper: &Reaper,
    ctx: &Context,
) -> Result<(LeaseName, LeaseTimings), decide::Conflict> {
    let invalid = |message| decide::Conflict {
        reason: "InvalidSpec",
        message,
    };
    let timings = timings_of(&reaper.spec.lease).map_err(invalid)?;
    let lease_name = reaper
        .lease_name(ctx.lease_scope)
        .map_err(|message| decide::Conflict {
            reason: "LeaseNameOutsideNamespace",
            message,
        })?;
    let lease_name = LeaseName::new(lease_name).map_err(|e| invalid(e.to_string()))?;
    let all = ctx.reapers.get().map(|s| s.state()).unwrap_or_default();
    let others: Vec<&Reaper> = all.iter().map(|r| &**r).collect();
    match decide::conflict(reaper, &others, ctx.lease_scope) {
        Some(conflict) => Err(conflict),
        None => Ok((lease_name, timings)),
    }
}

/// The Reaper does not act: hand over whatever it held, stop its own Deployment (nothing
/// may run unarbitrated; a Deployment another Reaper manages is left alone), record why.
async fn refuse(
    reaper: &Reaper,
    ctx: &Context,
    key: &ObjectRef<Reaper>,
    refused: decide::Conflict,
) -> Result<Action, Error> {
    let foreign_deployment = refused.reason == "DeploymentConflict";
    if let Some(old) = ctx.candidates.take(key) {
        if foreign_deployment {
            // The Deployment is the older Reaper's now: stop competing, touch nothing;
            // a lease still held expires by itself.
            let _ = old.stop().await;
        } else {
            hand_over(ctx, old).await;
        }
    }
    let ns = reaper.namespace().unwrap_or_default();
    let previous = reaper.status.as_ref();
    // Stop only what this cluster's operator started under this Reaper (its record):
    // a pod started by anything else (an older operator during an upgrade, say) is not
    // ours to fight over, and scaling it down while that one scales up would stack
    // stopping pods.
    let mut record = previous.and_then(|s| s.scaled_up_by.clone());
    let ours = record
        .as_ref()
        .is_some_and(|r| cluster_of(&r.holder) == Some(ctx.cluster.as_str()));
    if !foreign_deployment && ours && !reaper.spec.paused {
        let workload =
            observe::observe_workload(&ctx.client, &ns, &reaper.spec.deployment_name, None).await?;
        if workload.deployment.is_some() && workload.counts.replicas > 0 {
            scale(&ctx.client, &ns, &reaper.spec.deployment_name, 0).await?;
        }
        record = None;
    }
    let first_time =
        previous.is_none_or(|s| !s.conditions.iter().any(|c| c.reason == refused.reason));
    let status = status::refused_status(
        refused.reason,
        &refused.message,
        reaper.metadata.generation,
        previous,
        record,
        Utc::now(),
    );
    if previous.is_none_or(|old| status::differs(old, &status)) {
        write_status(ctx, reaper, status).await?;
    }
    if first_time && refused.reason != "InvalidSpec" {
        ctx.events.publish(
            Event {
                type_: EventType::Warning,
                reason: refused.reason.into(),
                note: Some(refused.message),
                action: "Refuse".into(),
                secondary: None,
            },
            &reaper.object_ref(&()),
        );
    }
    Ok(match refused.reason {
        "InvalidSpec" | "LeaseNameOutsideNamespace" => Action::await_change(),
        // A conflict ends when the other Reaper goes, which does not touch this one.
        _ => Action::requeue(Duration::from_secs(10)),
    })
}

async fn apply(reaper: &Reaper, ctx: &Context) -> Result<Action, Error> {
    if !ctx.reapers_synced.load(Ordering::Relaxed) {
        // An older Reaper with the same lease or Deployment may not be cached yet.
        return Ok(Action::requeue(Duration::from_millis(500)));
    }
    let key = ObjectRef::from_obj(reaper);
    let (lease_name, timings) = match refusal(reaper, ctx) {
        Ok(usable) => usable,
        Err(refused) => return refuse(reaper, ctx, &key, refused).await,
    };
    let target = Target {
        reaper,
        key,
        ns: reaper.namespace().unwrap_or_default(),
        lease_name,
        timings,
        reference: reaper.object_ref(&()),
    };
    let elector = elector_of(ctx, &target).await;
    let recorded = stop_unvouched(ctx, &target, &elector).await?;
    let (workload, from_cache) = observe_or_report_unknown(ctx, &target).await?;
    let judged = judge(ctx, &target, &elector, &workload, recorded).await;
    act(ctx, &target, &elector, (&workload, from_cache), judged).await
}

/// A Reaper that acts, with the lease row and timings `refusal` found usable.
struct Target<'a> {
    reaper: &'a Reaper,
    key: ObjectRef<Reaper>,
    ns: String,
    lease_name: LeaseName,
    timings: LeaseTimings,
    /// The Reaper, for Events.
    reference: ObjectReference,
}

impl Target<'_> {
    fn deployment(&self) -> &str {
        &self.reaper.spec.deployment_name
    }
}

/// What a reconcile reads of the Reaper's elector.
struct ElectorView {
    watch: LeaderWatch,
    database_ok: Arc<AtomicBool>,
}

impl ElectorView {
    /// False while the elector's last database call failed; read at each use, since
    /// the elector's task moves on while a reconcile runs.
    fn database_ok(&self) -> bool {
        self.database_ok.load(Ordering::Relaxed)
    }
}

/// The Reaper's elector, started if there is none.
async fn elector_of(ctx: &Context, target: &Target<'_>) -> ElectorView {
    loop {
        match ctx.candidates.with(
            &target.key,
            &target.lease_name,
            target.timings,
            target.deployment(),
            target.reference.clone(),
            |c| ElectorView {
                watch: c.watch.clone(),
                database_ok: c.database_ok.clone(),
            },
        ) {
            Ok(elector) => return elector,
            Err(old) => {
                // The lease name, timings or Deployment changed: hand the old lease over
                // cleanly (its Deployment to 0, then release).
                hand_over(ctx, *old).await;
            }
        }
    }
}

/// The scale-up record of the Reaper's status; `None` once this replica has stopped the
/// pod the record is its own for, because it can no longer prove it leads and the
/// database is failing.
async fn stop_unvouched(
    ctx: &Context,
    target: &Target<'_>,
    elector: &ElectorView,
) -> Result<Option<ScaleRecord>, Error> {
    let recorded = target
        .reaper
        .status
        .as_ref()
        .and_then(|s| s.scaled_up_by.clone());
    if !target.reaper.spec.paused
        && recorded.as_ref().is_some_and(|r| r.holder == ctx.holder)
        && elector.watch.leader_epoch().is_none()
        && !elector.database_ok()
    {
        // This replica started the pod, can no longer prove it leads, and the database
        // is failing: stop the workload first, before any call that could hang until
        // the lease expires.
        scale(&ctx.client, &target.ns, target.deployment(), 0).await?;
        return Ok(None);
    }
    Ok(recorded)
}

/// The workload and whether it came from the caches (see [`observe`]). One that cannot
/// be observed is reported as such before the error returns.
async fn observe_or_report_unknown(
    ctx: &Context,
    target: &Target<'_>,
) -> Result<(Workload, bool), Error> {
    let last_report = ctx
        .candidates
        .update(&target.key, |c| c.report.clone())
        .flatten();
    let previous = target.reaper.status.as_ref();
    let error = match observe(
        ctx,
        &target.ns,
        target.deployment(),
        previous,
        last_report.as_ref(),
    )
    .await
    {
        Ok(observed) => return Ok(observed),
        Err(error) => error,
    };
    // Another cluster must not take this cluster's silence for death while a pod here
    // may run on.
    let unknown = Workload::unobservable();
    let update = WorkloadUpdate {
        name: target.lease_name.clone(),
        counts: unknown.counts,
        timing: unknown.report_timing(target.timings),
    };
    if let Err(report_error) = report(ctx, &target.key, &update).await {
        tracing::debug!(%report_error, "cannot report the unobservable workload either");
    }
    Err(error)
}

/// What a reconcile decides by, and what it decided.
struct Judgement {
    /// The lease row, or why it could not be read.
    lease: Result<Option<Lease>, String>,
    /// The other clusters' reports, or why they could not be read.
    reports: Result<Vec<WorkloadReport>, String>,
    role: Role,
    gate: Option<Gate>,
    plan: decide::Plan,
    /// This replica's report of the workload as observed.
    update: WorkloadUpdate,
    /// The Deployment's replicas; `None` without a Deployment.
    replicas: Option<i32>,
}

async fn judge(
    ctx: &Context,
    target: &Target<'_>,
    elector: &ElectorView,
    workload: &Workload,
    recorded: Option<ScaleRecord>,
) -> Judgement {
    let recorder_unseen_for = recorded
        .as_ref()
        .map_or(Duration::ZERO, |r| ctx.presences.unseen_for(&r.holder));
    let (database_failing_for, cached) = ctx
        .candidates
        .update(&target.key, |c| {
            c.pod_selector.clone_from(&workload.selector);
            (
                c.database_failing_for(),
                Cached {
                    row: c.row.lock().expect("row mutex poisoned").clone(),
                    report: c.report.clone(),
                    others: c.others.clone(),
                },
            )
        })
        .unwrap_or_default();
    let update = WorkloadUpdate {
        name: target.lease_name.clone(),
        counts: workload.counts,
        timing: workload.report_timing(target.timings),
    };
    let (lease, reports, role) = read_lease_and_reports(
        ctx,
        target,
        elector,
        workload,
        recorded.as_ref(),
        cached,
        &update,
    )
    .await;
    let replicas = workload
        .deployment
        .as_ref()
        .map(|_| workload.counts.replicas);
    let handover_delay =
        Duration::from_secs(target.reaper.spec.lease.handover_delay_seconds.max(0) as u64);
    let gate = match role {
        Role::Leader { epoch } => Some(decide::handover_gate(
            &lease,
            &ctx.holder,
            epoch,
            &reports,
            workload.counts,
            handover_delay,
        )),
        _ => None,
    };
    let timings = target.timings;
    let plan = decide::plan(&ScaleFacts {
        role: &role,
        gate: gate.as_ref(),
        paused: target.reaper.spec.paused,
        replicas,
        recorded: recorded.as_ref(),
        me: ctx.holder.as_str(),
        database_failing_for,
        recorder_unseen_for,
        renew_deadline: timings.renew_deadline,
        ttl: timings.ttl,
        running_pods: workload.counts.running_pods,
        steady: steady_requeue(timings),
        idle: steady_requeue(timings).max(IDLE_RESYNC),
    });
    Judgement {
        lease,
        reports,
        role,
        gate,
        plan,
        update,
        replicas,
    }
}

/// The lease row and the other clusters' reports, and the role they give.
///
/// The database is asked only when something may change: a leader that is not already
/// running its pod (it may scale up, and the gate must judge the row and the reports as
/// they are now), a report that changed, or nothing remembered. Otherwise the
/// elector's last answer and the last refresh of the reports stand.
async fn read_lease_and_reports(
    ctx: &Context,
    target: &Target<'_>,
    elector: &ElectorView,
    workload: &Workload,
    recorded: Option<&ScaleRecord>,
    cached: Cached,
    update: &WorkloadUpdate,
) -> (
    Result<Option<Lease>, String>,
    Result<Vec<WorkloadReport>, String>,
    Role,
) {
    let leader_epoch = elector.watch.leader_epoch();
    let settled_leader = leader_epoch.is_some_and(|epoch| {
        workload.deployment.is_some()
            && workload.counts.replicas == 1
            && recorded.is_some_and(|r| r.holder == ctx.holder && r.epoch == epoch)
    });
    let (mut lease, row_from_elector) = match cached.row {
        Some(row) if leader_epoch.is_none() || settled_leader => (Ok(Some(row)), true),
        // The elector's calls fail: this one would too, a call timeout later, delaying
        // the decision of a replica that may have to stop a pod nobody vouches for.
        _ if !elector.database_ok() => (
            Err("the lease elector's last database call failed".to_owned()),
            false,
        ),
        _ => (
            ctx.store
                .get(&target.lease_name)
                .await
                .map_err(|e| e.to_string()),
            false,
        ),
    };
    // Every replica reports what it sees of this cluster's workload (the database keeps
    // a non-holder from overwriting its holder's report with "no pods") and learns what
    // the other clusters report.
    let reports = match cached.others {
        Some(others)
            if cached.report.as_ref() == Some(update)
                && (leader_epoch.is_none() || settled_leader) =>
        {
            Ok(others)
        }
        // The elector's calls fail: this one would too, after holding the report lock
        // for its whole timeout, in the way of reconciles that must stop a pod. The
        // refresher writes the report once the database answers.
        _ if !elector.database_ok() => {
            Err("the lease elector's last database call failed".to_owned())
        }
        _ => report(ctx, &target.key, update)
            .await
            .map_err(|e| e.to_string()),
    };
    // The same leadership the reads above were chosen by: a leader judged on reports
    // kept for a follower could miss a report written since.
    let mut role = decide::role(leader_epoch, &lease, &ctx.holder, &ctx.cluster);
    let has_pods = workload.deployment.is_some() && workload.counts.replicas > 0;
    if row_from_elector && matches!(role, Role::Standby { .. }) && has_pods {
        // Standing by with pods here means scaling them down: not on a row up to a retry
        // period old, which may predate a peer of this cluster taking the lease and
        // starting its pod.
        lease = ctx
            .store
            .get(&target.lease_name)
            .await
            .map_err(|e| e.to_string());
        role = decide::role(leader_epoch, &lease, &ctx.holder, &ctx.cluster);
    }
    (lease, reports, role)
}

/// Writes the status and scales as planned. The status is written by the replica that
/// acts for this cluster; a scale-up is recorded on it before it happens, a scale-down
/// clears the record after.
async fn act(
    ctx: &Context,
    target: &Target<'_>,
    elector: &ElectorView,
    (workload, from_cache): (&Workload, bool),
    judged: Judgement,
) -> Result<Action, Error> {
    let Judgement {
        role, gate, plan, ..
    } = &judged;
    tracing::debug!(reaper = %target.key, ?role, ?gate, scale = ?plan.scale, requeue = ?plan.requeue, from_cache, "decided");
    if plan.scaled_externally {
        ctx.candidates
            .update(&target.key, |c| c.external_scale_ups += 1);
    }
    if let (Role::Leader { epoch }, Some(Gate::Open { stale })) = (role, gate) {
        warn_stale_reports(ctx, &target.key, *epoch, stale, &target.reference);
    }
    let new_status = match role {
        Role::PeerLeads { .. } => None,
        Role::Unknown if peer_speaks_for_the_cluster(ctx, target, plan) => None,
        _ => Some(
            build_status(
                target.reaper,
                ctx,
                &target.key,
                workload,
                Seen {
                    role,
                    gate: gate.as_ref(),
                    lease_name: target.lease_name.as_str(),
                    lease: &judged.lease,
                    reports: &judged.reports,
                    database_ok: elector.database_ok(),
                    recorded: plan.record.as_ref(),
                },
            )
            .await,
        ),
    };
    let leading = matches!(role, Role::Leader { .. });
    match plan.scale {
        Scale::Up { epoch } => {
            write_new_status(ctx, target, leading, new_status).await?;
            let scaling = ScaleUp {
                epoch,
                workload,
                from_cache,
            };
            if let Some(wait) = scale_up(ctx, target, elector, scaling, &judged).await? {
                return Ok(wait);
            }
        }
        Scale::Down => {
            scale(&ctx.client, &target.ns, target.deployment(), 0).await?;
            write_new_status(ctx, target, leading, new_status).await?;
        }
        Scale::Hold => write_new_status(ctx, target, leading, new_status).await?,
    }
    // Without live caches the reads above went to the API server: look again every
    // steady period, as before the caches, so the report follows the workload.
    let requeue = if ctx.caches.live() {
        plan.requeue
    } else {
        plan.requeue.min(steady_requeue(target.timings))
    };
    Ok(Action::requeue(requeue))
}

/// True when a replica that cannot read the lease should leave the status as it is: it
/// changes nothing (no scale, the same scale-up record), and the status names a peer of
/// its cluster as the holder whose presence is fresh. That peer may lead still, reading
/// the database; a "Degraded" written over its status would stand until its resync, as a
/// status change wakes no reconcile. A peer unseen for the renew deadline cannot be
/// leading, and the status says so again.
fn peer_speaks_for_the_cluster(ctx: &Context, target: &Target<'_>, plan: &decide::Plan) -> bool {
    let current = target.reaper.status.as_ref();
    let same_record = plan.record.as_ref() == current.and_then(|s| s.scaled_up_by.as_ref());
    plan.scale == Scale::Hold
        && same_record
        && status::peer_holder(current, &ctx.holder)
            .is_some_and(|peer| ctx.presences.unseen_for(peer) < target.timings.renew_deadline)
}

/// Writes `status`, unless the Reaper shows it already (`status::needs_write`), and
/// remembers what was written.
///
/// Only a leader judges by its own last write too: it alone speaks for the cluster
/// then. A replica that cannot read the lease may have a peer that took it and wrote
/// its scale-up record since, which the cache does not show yet; writing what that
/// cache shows over it would erase the record.
async fn write_new_status(
    ctx: &Context,
    target: &Target<'_>,
    leading: bool,
    status: Option<ReaperStatus>,
) -> Result<(), Error> {
    let Some(status) = status else {
        return Ok(());
    };
    let last_write = ctx
        .candidates
        .update(&target.key, |c| c.status_written)
        .flatten()
        .filter(|_| leading);
    if !status::needs_write(target.reaper.status.as_ref(), last_write, &status) {
        return Ok(());
    }
    let fingerprint = status::Fingerprint::of(&status);
    let written = write_status(ctx, target.reaper, status).await;
    let last_write = match written {
        Ok(()) => LastWrite::Wrote(fingerprint),
        Err(_) => LastWrite::Unknown,
    };
    ctx.candidates
        .update(&target.key, |c| c.status_written = Some(last_write));
    written
}

/// A planned scale-up and the workload it was planned on.
struct ScaleUp<'a> {
    epoch: i64,
    workload: &'a Workload,
    from_cache: bool,
}

/// Starts the pod if this replica still leads with `epoch`, after reporting it. Returns
/// when to look again instead, while pods of this cluster are still stopping.
async fn scale_up(
    ctx: &Context,
    target: &Target<'_>,
    elector: &ElectorView,
    ScaleUp {
        epoch,
        workload,
        from_cache,
    }: ScaleUp<'_>,
    judged: &Judgement,
) -> Result<Option<Action>, Error> {
    // A cache behind the API server could miss a pod of this cluster still stopping (a
    // ReplicaSet ignores it and would start a second one): ask the API server before
    // starting one.
    if judged.replicas == Some(0) && from_cache {
        let live = observe::observe_workload(
            &ctx.client,
            &target.ns,
            target.deployment(),
            workload.selector.as_deref(),
        )
        .await?;
        if live.counts.running_pods > 0 {
            tracing::info!(reaper = %target.key, running_pods = live.counts.running_pods, "pods of this cluster still stopping; not scaling up yet");
            return Ok(Some(Action::requeue(Duration::from_millis(500))));
        }
    }
    // Decide at the moment of acting, not from what was true above.
    if judged.replicas != Some(1) && elector.watch.leader_epoch() == Some(epoch) {
        // Report the starting pod first: if that fails, do not start it (no other
        // cluster may read "no pods" from here while it runs).
        let starting = WorkloadUpdate {
            counts: WorkloadCounts {
                replicas: 1,
                running_pods: workload.counts.running_pods.max(1),
                ready_pods: workload.counts.ready_pods,
            },
            ..judged.update.clone()
        };
        report(ctx, &target.key, &starting).await?;
        if elector.watch.leader_epoch() == Some(epoch) {
            scale(&ctx.client, &target.ns, target.deployment(), 1).await?;
        }
    }
    Ok(None)
}

/// What this replica remembers of a Reaper between reconciles.
#[derive(Default)]
struct Cached {
    row: Option<crate::lease::Lease>,
    report: Option<WorkloadUpdate>,
    others: Option<Vec<crate::lease::WorkloadReport>>,
}

/// The workload from the watch caches, or from the API server when they cannot tell
/// (see [`observe::observe_cached`]); and whether it came from the caches.
///
/// A cache that says "no pods" where this replica last reported some is confirmed with
/// the API server first: "no pods" is what lets another cluster start, and a cache can
/// be behind (or silently stuck) where the API server is not.
async fn observe(
    ctx: &Context,
    ns: &str,
    deployment: &str,
    previous: Option<&ReaperStatus>,
    last_report: Option<&WorkloadUpdate>,
) -> Result<(Workload, bool), Error> {
    let remembered = previous.and_then(|s| s.pod_selector.as_deref());
    if let Some(workload) = observe::observe_cached(&ctx.caches, ns, deployment, remembered)? {
        let newly_idle = workload.counts.running_pods == 0
            && last_report.is_none_or(|r| r.counts.running_pods > 0);
        if !newly_idle {
            return Ok((workload, true));
        }
    }
    let workload = observe::observe_workload(&ctx.client, ns, deployment, remembered).await?;
    Ok((workload, false))
}

/// Writes this replica's report of one workload now, and remembers it (the refresher
/// repeats it) with the other clusters' reports that came back. Under the report lock,
/// so a refresh in flight cannot land after it with an older report.
pub(super) async fn report(
    ctx: &Context,
    key: &ObjectRef<Reaper>,
    update: &WorkloadUpdate,
) -> Result<Vec<crate::lease::WorkloadReport>, crate::Error> {
    let _lock = ctx.report_lock.lock().await;
    let sent = Instant::now();
    let synced = ctx
        .store
        .sync_workloads(&ctx.cluster, &ctx.holder, std::slice::from_ref(update))
        .await;
    let mut synced = match synced {
        Ok(synced) => synced,
        Err(error) => {
            ctx.candidates.update(key, |c| c.others = None);
            return Err(error);
        }
    };
    let others = synced
        .others
        .remove(update.name.as_str())
        .unwrap_or_default();
    let written = synced.written.contains(update.name.as_str());
    ctx.candidates.update(key, |c| {
        (c.report, c.report_written) = if written {
            (Some(update.clone()), Some(sent))
        } else {
            (None, None)
        };
        c.others = Some(others.clone());
    });
    Ok(others)
}

/// What a reconcile saw and decided, for its status.
struct Seen<'a> {
    role: &'a Role,
    gate: Option<&'a Gate>,
    lease_name: &'a str,
    lease: &'a Result<Option<crate::lease::Lease>, String>,
    reports: &'a Result<Vec<crate::lease::WorkloadReport>, String>,
    database_ok: bool,
    recorded: Option<&'a ScaleRecord>,
}

async fn build_status(
    reaper: &Reaper,
    ctx: &Context,
    key: &ObjectRef<Reaper>,
    workload: &Workload,
    seen: Seen<'_>,
) -> ReaperStatus {
    let ns = reaper.namespace().unwrap_or_default();
    let database_error = match (seen.lease, seen.reports) {
        (Err(e), _) | (_, Err(e)) => Some(e.clone()),
        _ if !seen.database_ok => Some("the lease elector's last database call failed".into()),
        _ => None,
    };
    if let Some(error) = &database_error {
        // The detail (host, user, database names) stays in the log; the status that
        // everyone who can read Reapers sees says only that the database failed.
        tracing::warn!(reaper = %key, %error, "lease database call failed");
    }
    let external = ctx
        .candidates
        .update(key, |c| c.external_scale_ups)
        .unwrap_or(0);
    let risks = match &workload.deployment {
        Some(d) => status::singleton_risks(
            observe::rolling_surge(d),
            ctx.caches.autoscaler_for(&ns, &reaper.spec.deployment_name),
            external,
        ),
        None => Vec::new(),
    };
    let observation = Observation {
        role: seen.role,
        lease_name: seen.lease_name,
        lease: seen.lease.as_ref().ok().and_then(|l| l.as_ref()),
        database_error: database_error.as_deref(),
        deployment_found: workload.deployment.is_some(),
        replicas: workload.counts.replicas,
        ready_replicas: workload.counts.ready_pods,
        running_pods: workload.counts.running_pods,
        gate: seen.gate,
        paused: reaper.spec.paused,
        risks: &risks,
        generation: reaper.metadata.generation,
        now: Utc::now(),
        pod_selector: workload.selector.as_deref(),
        scaled_up_by: seen.recorded,
    };
    status::build_status(&observation, reaper.status.as_ref())
}

/// Warns once per epoch that clusters presumed dead may still run a pod.
fn warn_stale_reports(
    ctx: &Context,
    key: &ObjectRef<Reaper>,
    epoch: i64,
    stale: &[String],
    reference: &k8s_openapi::api::core::v1::ObjectReference,
) {
    if stale.is_empty()
        || ctx
            .candidates
            .update(key, |c| c.warned_stale_epoch.replace(epoch))
            .flatten()
            == Some(epoch)
    {
        return;
    }
    ctx.events.publish(
        Event {
            type_: EventType::Warning,
            reason: "StaleClusterReport".into(),
            note: Some(format!(
                "cluster(s) {} last reported running pods longer ago than their bound (ttl + grace period + refresh + retry) and are presumed dead or cut off; \
                 scaling up anyway: only the workload's own fencing (epoch check) protects against a second pod",
                stale.join(", ")
            )),
            action: "Scale".into(),
            secondary: None,
        },
        reference,
    );
}

pub async fn scale(client: &Client, ns: &str, name: &str, replicas: i32) -> Result<(), Error> {
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

/// How often a Reaper is reconciled when nothing happens. Leadership changes and
/// Deployment events trigger a reconcile at once; the periodic one refreshes this
/// cluster's workload report, which other clusters treat as stale after a ttl, so a
/// quarter ttl leaves three refreshes of margin, and never slower than the retry period
/// (at the default 15/10/2 s: every 3.75 s instead of every 2 s).
pub fn steady_requeue(timings: LeaseTimings) -> Duration {
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
