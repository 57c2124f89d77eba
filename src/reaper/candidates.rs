//! One lease elector per Reaper in this process, each in its own task.
//!
//! Electors publish on watch channels; every leadership change pushes the Reaper into
//! the controller's trigger queue, so the reconcile that scales the Deployment runs at
//! once instead of on the next resync.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::ObjectRef;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::task::JoinHandle;

use super::crd::Reaper;
use super::events::Events;
use super::status::LastWrite;
use crate::config::LeaseTimings;
use crate::lease::batch::DEFAULT_LINGER;
use crate::lease::{
    Clock, Elector, ElectorConfig, Holder, LeaderWatch, Leadership, Lease, LeaseBatcher, LeaseName,
    LeaseStore, MonotonicClock, Tick, WorkloadReport, WorkloadUpdate,
};
use crate::metrics::Metrics;

/// A running elector for one Reaper.
pub struct Candidate {
    pub lease_name: LeaseName,
    pub timings: LeaseTimings,
    /// The Deployment this elector's leadership scales, in the Reaper's namespace.
    pub namespace: String,
    pub deployment: String,
    /// The Reaper, for Events.
    pub reference: Arc<ObjectReference>,
    pub watch: LeaderWatch,
    /// False while the elector's last database call failed.
    pub database_ok: Arc<AtomicBool>,
    /// Since when the elector's database calls have been failing (`None` while they work).
    pub database_failing_since: Arc<Mutex<Option<Instant>>>,
    /// The workload's pod selector, as last observed (for the handover, which counts the
    /// pods until they are gone, even if the Deployment is deleted meanwhile).
    pub pod_selector: Option<String>,
    /// How often the Deployment was found scaled up while this replica did not lead.
    pub external_scale_ups: u32,
    /// The lease row as the elector last saw it (its renew's or acquire's answer);
    /// `None` after a tick that could not read it.
    pub row: Arc<Mutex<Option<Lease>>>,
    /// This replica's report of the workload, as last written and recorded; the report
    /// refresher writes it again every refresh period. `None` when the database refused
    /// it (see `LeaseStore::sync_workloads`) or nothing was written yet.
    pub report: Option<WorkloadUpdate>,
    /// When `report` was last sent (before the statement that recorded it).
    pub report_written: Option<Instant>,
    /// The other clusters' reports as last read (by a reconcile or the refresher).
    pub others: Option<Vec<WorkloadReport>>,
    /// Clusters already warned about (stale reports), per epoch.
    pub warned_stale_epoch: Option<i64>,
    /// This replica's last write of the Reaper's status, which the Reaper cache may not
    /// show yet (`status::needs_write`).
    pub status_written: Option<LastWrite>,
    waker: Arc<Notify>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Elector>,
}

impl Candidate {
    /// How long the elector's database calls have been failing (zero while they work).
    pub fn database_failing_for(&self) -> Duration {
        self.database_failing_since
            .lock()
            .expect("failing-since mutex poisoned")
            .map_or(Duration::ZERO, |since| since.elapsed())
    }

    /// Stops the elector. It publishes `Follower` but still holds the row: stop the
    /// workload, then `release()` the returned elector.
    pub async fn stop(mut self) -> Option<Elector> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.await.ok()
    }
}

/// How much later than one retry period after the last renew was sent a presence may
/// still be written (the batcher's linger and the call itself).
const FRESH_RENEW_SLACK: Duration = Duration::from_millis(500);

#[derive(Clone)]
pub struct Candidates {
    inner: Arc<Mutex<HashMap<ObjectRef<Reaper>, Candidate>>>,
    store: LeaseStore,
    /// All electors of this replica renew through it: one statement per retry period.
    batcher: LeaseBatcher,
    holder: Holder,
    trigger: mpsc::UnboundedSender<ObjectRef<Reaper>>,
    events: Events,
    clock: Arc<dyn Clock>,
    /// For fences only (`kube_client::unpooled`).
    fence_client: Client,
    metrics: Arc<Metrics>,
}

impl Candidates {
    pub fn new(
        store: LeaseStore,
        holder: Holder,
        trigger: mpsc::UnboundedSender<ObjectRef<Reaper>>,
        events: Events,
        fence_client: Client,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            inner: Arc::default(),
            batcher: LeaseBatcher::spawn(store.clone(), holder.clone(), DEFAULT_LINGER),
            store,
            holder,
            trigger,
            events,
            clock: Arc::new(MonotonicClock),
            fence_client,
            metrics,
        }
    }

    /// Runs `f` on the candidate of `key`, starting an elector if there is none.
    /// Returns `Err(old)` without starting anything when the running elector has a
    /// different lease name, timings or Deployment: the caller hands it over first.
    pub fn with<R>(
        &self,
        key: &ObjectRef<Reaper>,
        lease_name: &LeaseName,
        timings: LeaseTimings,
        deployment: &str,
        reference: ObjectReference,
        f: impl FnOnce(&mut Candidate) -> R,
    ) -> Result<R, Box<Candidate>> {
        let mut map = self.inner.lock().expect("candidates mutex poisoned");
        if let Some(existing) = map.get(key)
            && (existing.lease_name != *lease_name
                || existing.timings != timings
                || existing.deployment != deployment)
        {
            return Err(Box::new(map.remove(key).expect("present")));
        }
        let candidate = map
            .entry(key.clone())
            .or_insert_with(|| self.spawn(key.clone(), lease_name, timings, deployment, reference));
        Ok(f(candidate))
    }

    pub fn update<R>(
        &self,
        key: &ObjectRef<Reaper>,
        f: impl FnOnce(&mut Candidate) -> R,
    ) -> Option<R> {
        self.inner
            .lock()
            .expect("candidates mutex poisoned")
            .get_mut(key)
            .map(f)
    }

    pub fn take(&self, key: &ObjectRef<Reaper>) -> Option<Candidate> {
        self.inner
            .lock()
            .expect("candidates mutex poisoned")
            .remove(key)
    }

    pub fn take_all(&self) -> Vec<(ObjectRef<Reaper>, Candidate)> {
        self.inner
            .lock()
            .expect("candidates mutex poisoned")
            .drain()
            .collect()
    }

    pub fn keys(&self) -> Vec<ObjectRef<Reaper>> {
        self.inner
            .lock()
            .expect("candidates mutex poisoned")
            .keys()
            .cloned()
            .collect()
    }

    /// How often this replica's presence must be renewed (see `presence`): a third of
    /// the shortest renew deadline of the leases it leads, at least a second. `None`
    /// when it leads nothing, or when a lease it leads was not renewed by a call sent
    /// within the last retry period (and half a second): a presence written after the
    /// last renew would let a peer count on this replica for longer than its lease
    /// allows it to act.
    pub fn presence_period(&self) -> Option<Duration> {
        let map = self.inner.lock().expect("candidates mutex poisoned");
        let now = Instant::now();
        let mut period: Option<Duration> = None;
        for candidate in map.values() {
            let Leadership::Leader { valid_until, .. } = candidate.watch.published() else {
                continue;
            };
            if valid_until <= now {
                continue;
            }
            let timings = candidate.timings;
            // The leadership lasts a renew deadline from the sending of its last renew.
            let renewed_ago = (now + timings.renew_deadline).saturating_duration_since(valid_until);
            if !candidate.database_ok.load(Ordering::Relaxed)
                || renewed_ago > timings.retry_period + FRESH_RENEW_SLACK
            {
                return None;
            }
            let own = (timings.renew_deadline / 3).max(Duration::from_secs(1));
            period = Some(period.map_or(own, |p| p.min(own)));
        }
        period
    }

    /// A NOTIFY about `lease_name`: tick its electors now and reconcile their Reapers.
    pub fn wake_lease(&self, lease_name: &str) {
        let map = self.inner.lock().expect("candidates mutex poisoned");
        for (key, candidate) in map.iter().filter(|(_, c)| c.lease_name == lease_name) {
            candidate.waker.notify_one();
            let _ = self.trigger.send(key.clone());
        }
    }

    /// Runs `f` on every candidate, with the lock held: `f` must not block.
    pub fn for_each(&self, mut f: impl FnMut(&ObjectRef<Reaper>, &mut Candidate)) {
        let mut map = self.inner.lock().expect("candidates mutex poisoned");
        for (key, candidate) in map.iter_mut() {
            f(key, candidate);
        }
    }

    /// Reconciles `key` now.
    pub fn trigger(&self, key: &ObjectRef<Reaper>) {
        let _ = self.trigger.send(key.clone());
    }

    fn spawn(
        &self,
        key: ObjectRef<Reaper>,
        lease_name: &LeaseName,
        timings: LeaseTimings,
        deployment: &str,
        reference: ObjectReference,
    ) -> Candidate {
        let config = ElectorConfig {
            lease_name: lease_name.clone(),
            holder: self.holder.clone(),
            timings,
        };
        let mut elector = Elector::new(config, self.store.clone(), self.clock.clone())
            .with_batcher(self.batcher.clone());
        let watch = elector.watch();
        let waker = elector.waker();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let fence = Fence {
            client: self.fence_client.clone(),
            store: self.store.clone(),
            namespace: key.namespace.clone().unwrap_or_default(),
            deployment: deployment.to_owned(),
            lease_name: lease_name.clone(),
            holder: self.holder.clone(),
            check_timeout: fence_check_timeout(timings),
            attempt_timeout: fence_attempt_timeout(timings),
        };
        let reference = Arc::new(reference);
        let observer = TickObserver {
            key,
            reference: reference.clone(),
            leadership: watch.clone(),
            database_ok: Arc::new(AtomicBool::new(true)),
            database_failing_since: Arc::new(Mutex::new(None)),
            row: Arc::new(Mutex::new(None)),
            fence,
            trigger: self.trigger.clone(),
            events: self.events.clone(),
            metrics: self.metrics.clone(),
        };
        let (database_ok, database_failing_since, row) = (
            observer.database_ok.clone(),
            observer.database_failing_since.clone(),
            observer.row.clone(),
        );
        let namespace = observer.fence.namespace.clone();
        let task = tokio::spawn(async move {
            elector
                .run(
                    async {
                        let _ = stop_rx.await;
                    },
                    |tick, took| observer.observe(tick, took),
                )
                .await;
            observer
                .metrics
                .forget_lease(observer.fence.lease_name.as_str());
            elector
        });
        Candidate {
            lease_name: lease_name.clone(),
            timings,
            namespace,
            deployment: deployment.to_owned(),
            reference,
            watch,
            database_ok,
            database_failing_since,
            pod_selector: None,
            row,
            report: None,
            report_written: None,
            others: None,
            external_scale_ups: 0,
            warned_stale_epoch: None,
            status_written: None,
            waker,
            stop: Some(stop_tx),
            task,
        }
    }
}

/// What an elector's task does after each tick: keeps the database's health and the
/// row for reconciles, counts the tick, fences on a missed deadline, and triggers a
/// reconcile (with an Event) when what it decides from may have changed.
struct TickObserver {
    key: ObjectRef<Reaper>,
    reference: Arc<ObjectReference>,
    leadership: LeaderWatch,
    database_ok: Arc<AtomicBool>,
    database_failing_since: Arc<Mutex<Option<Instant>>>,
    row: Arc<Mutex<Option<Lease>>>,
    fence: Fence,
    trigger: mpsc::UnboundedSender<ObjectRef<Reaper>>,
    events: Events,
    metrics: Arc<Metrics>,
}

impl TickObserver {
    fn observe(&self, tick: &Tick, took: Duration) {
        let reachable = tick.database_reachable();
        let database_was_ok = self.database_ok.swap(reachable, Ordering::Relaxed);
        {
            let mut since = self
                .database_failing_since
                .lock()
                .expect("failing-since mutex poisoned");
            match (reachable, *since) {
                (true, _) => *since = None,
                (false, None) => *since = Some(Instant::now()),
                (false, Some(_)) => {}
            }
        }
        let leading = self.leadership.leader_epoch().is_some();
        self.metrics
            .observe_tick(self.fence.lease_name.as_str(), tick, took, leading);
        if let Tick::DeadlineMissed { error, .. } = tick {
            self.fence
                .stop_workload(error.is_some() || !database_was_ok);
        }
        let moved = remember_row(&self.row, tick);
        if let Some(event) = transition_event(tick) {
            let _ = self.trigger.send(self.key.clone());
            self.events.publish(event, &self.reference);
        } else if moved || database_was_ok != reachable {
            // A database that stops or starts answering changes the status
            // (DatabaseReachable) and, after a while, the decision.
            let _ = self.trigger.send(self.key.clone());
        }
    }
}

/// Scales a Deployment to 0 straight from the elector task, without waiting for the
/// reconcile queue, whose next reconcile of this Reaper may be stuck behind database
/// calls that hang until the lease expires. Scaling down is always safe, so it needs no
/// coordination with the reconcile loop.
#[derive(Clone)]
struct Fence {
    client: Client,
    store: LeaseStore,
    namespace: String,
    deployment: String,
    lease_name: LeaseName,
    holder: Holder,
    /// How long to ask the database who holds the lease before fencing anyway.
    check_timeout: Duration,
    /// How long one scale-down call may take before it is tried again, on a new
    /// connection if the one it went out on is the silent one.
    attempt_timeout: Duration,
}

impl Fence {
    /// Called when the elector missed its renew deadline. If the database call of this
    /// tick or of the one before failed, it is unreachable: fence at once. Otherwise the process was
    /// stalled (SIGSTOP, starvation) and the lease may already belong to a peer in this
    /// cluster, whose pod is the one running: the Deployment is shared, so scaling it to
    /// 0 would only restart the singleton. That is checked first, briefly, and the fence
    /// fires whenever the answer is anything but "a live peer of this cluster holds it".
    fn stop_workload(&self, database_failed: bool) {
        let fence = self.clone();
        tokio::spawn(async move {
            if !database_failed && fence.peer_of_this_cluster_holds_lease().await {
                tracing::info!(
                    deployment = %fence.deployment,
                    lease = %fence.lease_name,
                    "renew deadline missed, but a peer in this cluster holds the lease: left the workload running"
                );
                return;
            }
            fence.scale_to_zero().await;
        });
    }

    async fn peer_of_this_cluster_holds_lease(&self) -> bool {
        let lookup = self.store.get(&self.lease_name);
        let Ok(Ok(Some(lease))) = tokio::time::timeout(self.check_timeout, lookup).await else {
            return false;
        };
        lease.is_held() && lease.holder != self.holder && self.holder.same_cluster(&lease.holder)
    }

    /// Retried until the API server accepts it: a fence that gave up after one failed
    /// call would leave the pod running past the lease's expiry. A call with no answer
    /// within `attempt_timeout` is left running and another is sent beside it, on a new
    /// connection (the fence's client keeps none idle, and ends a call after
    /// [`FENCE_CALL_TIMEOUT`]): neither connections that went silent nor a slow API
    /// server hold the fence, and a slow answer still counts.
    async fn scale_to_zero(&self) {
        use tokio::time::Instant;
        let api: Api<Deployment> = Api::namespaced(self.client.clone(), &self.namespace);
        let name = &self.deployment;
        let give_up = Instant::now() + FENCE_GIVE_UP;
        let mut pending = FuturesUnordered::new();
        let mut sent = 0;
        let mut pause = Duration::from_millis(100);
        // When the next call goes out: at once; then once the calls out have had the
        // attempt timeout to answer, or a pause after a refusal, whichever is first.
        // The calls out are polled all the while, so a late answer still ends the fence.
        let mut next_call = Instant::now();
        loop {
            let now = Instant::now();
            if now >= next_call && now < give_up {
                sent += 1;
                pending.push(scale_call(api.clone(), name.clone(), sent));
                next_call = now + self.attempt_timeout;
            }
            let answer = if now < give_up {
                match tokio::time::timeout_at(next_call, pending.next()).await {
                    Ok(answer) => answer,
                    Err(_) => {
                        tracing::warn!(deployment = %name, in_flight = pending.len(), timeout = ?self.attempt_timeout, "renew deadline missed: the scale-down has no answer yet; sending another beside it");
                        continue;
                    }
                }
            } else {
                pending.next().await
            };
            match answer {
                Some((_, Ok(_))) => {
                    tracing::warn!(deployment = %name, "renew deadline missed: scaled the workload to 0");
                    return;
                }
                Some((_, Err(kube::Error::Api(e)))) if e.code == 404 => return,
                Some((attempt, Err(error))) => {
                    tracing::warn!(deployment = %name, %error, attempt, "renew deadline missed: cannot scale to 0 yet; retrying");
                    // With calls still out, the pause may only bring the next call
                    // sooner; with none, it alone decides.
                    let after_pause = Instant::now() + pause;
                    next_call = if pending.is_empty() {
                        after_pause
                    } else {
                        next_call.min(after_pause)
                    };
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
                // Nothing out: the next call waits for its time.
                None if Instant::now() < give_up => tokio::time::sleep_until(next_call).await,
                None => break,
            }
        }
        tracing::error!(deployment = %name, "renew deadline missed: gave up scaling the workload to 0");
    }
}

async fn scale_call(
    api: Api<Deployment>,
    name: String,
    attempt: u32,
) -> (u32, kube::Result<k8s_openapi::api::autoscaling::v1::Scale>) {
    let patch = Patch::Merge(serde_json::json!({ "spec": { "replicas": 0 } }));
    let answer = api
        .patch_scale(&name, &PatchParams::default(), &patch)
        .await;
    (attempt, answer)
}

/// How long a fence sends calls: past that the reconcile loop (and the workload's own
/// fencing) must take over.
const FENCE_GIVE_UP: Duration = Duration::from_secs(120);

/// How long the fence's client waits for one call. Twice the longest
/// [`fence_attempt_timeout`]: a slow answer still counts, and a call sent on a
/// connection that went silent ends soon, so the calls waiting at once stay few (at
/// most this over the shortest attempt timeout, 40).
pub const FENCE_CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// The fence's database check must leave most of the margin between the renew deadline
/// and the ttl to the scale-down itself.
fn fence_check_timeout(timings: LeaseTimings) -> Duration {
    ((timings.ttl - timings.renew_deadline) / 4)
        .clamp(Duration::from_millis(50), Duration::from_secs(1))
}

/// A scale-down call gets half the margin between the renew deadline and the ttl
/// before another is sent beside it, so a call lost on a silent connection leaves time
/// for a second one before the lease expires.
fn fence_attempt_timeout(timings: LeaseTimings) -> Duration {
    ((timings.ttl - timings.renew_deadline) / 2)
        .clamp(Duration::from_millis(250), Duration::from_secs(5))
}

/// Keeps the row a tick saw for reconciles, and tells whether what a reconcile decides
/// from it changed (who holds it, at which epoch, held or expired, on which timeline):
/// then the Reaper is reconciled at once instead of at its next resync.
fn remember_row(row: &Mutex<Option<Lease>>, tick: &Tick) -> bool {
    let seen = match tick {
        Tick::Acquired(lease) | Tick::Renewed(lease) | Tick::Standby(Some(lease)) => {
            Some(lease.clone())
        }
        _ => None,
    };
    let class = |l: &Option<Lease>| {
        l.as_ref().map(|l| {
            (
                l.holder.clone(),
                l.epoch,
                l.is_held(),
                l.on_current_timeline,
            )
        })
    };
    let mut kept = row.lock().expect("row mutex poisoned");
    let moved = class(&kept) != class(&seen) && seen.is_some();
    *kept = seen;
    moved
}

fn transition_event(tick: &Tick) -> Option<Event> {
    let (type_, reason, note) = match tick {
        Tick::Acquired(lease) if lease.previous_holder.is_empty() => (
            EventType::Normal,
            "LeaseAcquired",
            format!(
                "acquired lease {} at epoch {} as {}",
                lease.name, lease.epoch, lease.holder
            ),
        ),
        Tick::Acquired(lease) => (
            EventType::Warning,
            "LeaseTakenOver",
            format!(
                "took over expired lease {} from {} at epoch {} as {}",
                lease.name, lease.previous_holder, lease.epoch, lease.holder
            ),
        ),
        Tick::Lost { epoch } => (
            EventType::Warning,
            "LeaseLost",
            format!("lost the lease held at epoch {epoch}: another holder took it or it expired"),
        ),
        Tick::DeadlineMissed { epoch, .. } => (
            EventType::Warning,
            "LeaseLost",
            format!("no successful renew within the renew deadline at epoch {epoch}: stepped down"),
        ),
        _ => return None,
    };
    Some(Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: "Elect".into(),
        secondary: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The check leaves most of the margin between the renew deadline and the ttl; an
    /// attempt leaves time for a second one.
    #[test]
    fn fence_timeouts_split_the_margin() {
        let t = LeaseTimings::from_millis;
        // (ttl, renew deadline, retry period) -> (check, attempt), all in ms
        for (timings, check, attempt) in [
            (t(15_000, 10_000, 2_000), 1_000, 2_500),
            (t(3_000, 2_000, 1_000), 250, 500),
            (t(1_000, 990, 500), 50, 250),
            (t(600_000, 10_000, 2_000), 1_000, 5_000),
        ] {
            let got = (fence_check_timeout(timings), fence_attempt_timeout(timings));
            let want = (Duration::from_millis(check), Duration::from_millis(attempt));
            assert_eq!(got, want, "{timings:?}");
        }
        // A call outlives the attempt timeout, so a slow answer still counts.
        assert!(FENCE_CALL_TIMEOUT >= 2 * fence_attempt_timeout(t(600_000, 10_000, 2_000)));
    }
}
