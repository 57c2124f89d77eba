//! What reconciles read from Kubernetes, kept by watches: the Deployments, the pods and
//! the HorizontalPodAutoscalers in the operator's namespaces. A reconcile reads these
//! caches instead of the API server, and a change to any of them reconciles the Reapers
//! it concerns at once, so a steady state costs the API server nothing but the watches.
//!
//! The caches hold only what the controller reads: pods and Deployments are read as
//! summaries (see `summary`; the rest is never allocated), HPAs keep their target.
//! Each watch has its own health flag: a cache that has not listed everything yet, or
//! whose watch is failing, is not read as "no pods" (the caller falls back to the API
//! server or reports the workload as unobservable).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{StreamExt, future};
use k8s_openapi::api::autoscaling::v2::{HorizontalPodAutoscaler, HorizontalPodAutoscalerSpec};
use kube::api::Api;
use kube::core::{Selector, SelectorExt};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use tokio::sync::watch;

use super::crd::Reaper;
use super::observe;
use super::summary::{DeploymentSummary, PodSummary};

/// The read side of the three caches.
#[derive(Clone)]
pub struct Caches {
    pub deployments: Store<DeploymentSummary>,
    pub pods: Store<PodSummary>,
    pub autoscalers: Store<HorizontalPodAutoscaler>,
    deployments_live: Arc<WatchHealth>,
    pods_live: Arc<WatchHealth>,
    /// Bumped after every change a Deployment or pod event made to its cache.
    changes: Arc<watch::Sender<()>>,
}

/// The caches, and the changes of each for the controller to map to Reapers.
pub struct Watches {
    pub caches: Caches,
    pub deployments: futures::stream::BoxStream<'static, Result<DeploymentSummary, watcher::Error>>,
    pub pods: futures::stream::BoxStream<'static, Result<PodSummary, watcher::Error>>,
    pub autoscalers:
        futures::stream::BoxStream<'static, Result<HorizontalPodAutoscaler, watcher::Error>>,
    /// Yields when the Deployment or the pod cache stops being trusted.
    pub distrusted: futures::stream::BoxStream<'static, ()>,
}

impl Caches {
    /// Both caches a workload count needs have listed everything and their watches
    /// are not failing.
    pub fn live(&self) -> bool {
        self.deployments_live.live() && self.pods_live.live()
    }

    /// Resolves at the next change of the Deployment or pod cache after this call.
    pub fn changes(&self) -> watch::Receiver<()> {
        self.changes.subscribe()
    }

    pub fn deployment(&self, ns: &str, name: &str) -> Option<Arc<DeploymentSummary>> {
        self.deployments.get(&ObjectRef::new(name).within(ns))
    }

    /// The pods of namespace `ns` that `selector` matches.
    pub fn pods_matching(&self, ns: &str, selector: &Selector) -> Vec<Arc<PodSummary>> {
        self.pods.state_filter(|pod| {
            pod.metadata.namespace.as_deref() == Some(ns) && selector.matches(pod.labels())
        })
    }

    /// The name of an HPA in `ns` that targets Deployment `deployment`.
    pub fn autoscaler_for(&self, ns: &str, deployment: &str) -> Option<String> {
        self.autoscalers
            .find(|h| {
                h.metadata.namespace.as_deref() == Some(ns)
                    && h.spec.scale_target_ref.kind == "Deployment"
                    && h.spec.scale_target_ref.name == deployment
            })
            .map(|h| h.name_any())
    }
}

/// Starts the three watches, each in a task that runs until the process ends.
pub fn watches(client: &Client, namespace: Option<&str>) -> Watches {
    fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        match namespace {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        }
    }
    let changes = Arc::new(watch::Sender::new(()));
    let distrusted = Arc::new(watch::Sender::new(()));
    let (deployments, deployments_live, deployment_stream) = cached(
        api::<DeploymentSummary>(client, namespace),
        Some(changes.clone()),
        Some(distrusted.clone()),
        |_: &mut DeploymentSummary| {},
    );
    let (pods, pods_live, pod_stream) = cached(
        api::<PodSummary>(client, namespace),
        Some(changes.clone()),
        Some(distrusted.clone()),
        |_: &mut PodSummary| {},
    );
    let (autoscalers, _, autoscaler_stream) = cached(
        api::<HorizontalPodAutoscaler>(client, namespace),
        None,
        None,
        trim_autoscaler,
    );
    Watches {
        caches: Caches {
            deployments,
            pods,
            autoscalers,
            deployments_live,
            pods_live,
            changes,
        },
        deployments: deployment_stream,
        pods: pod_stream,
        autoscalers: autoscaler_stream,
        distrusted: futures::stream::unfold(distrusted.subscribe(), |mut rx| async move {
            rx.changed().await.ok().map(|()| ((), rx))
        })
        .boxed(),
    }
}

/// What a cached watch can hold: a kind whose objects kube can list, watch and parse.
/// The kinds the operator caches are listed, so a new one is a deliberate choice.
trait Watched:
    Resource<DynamicType = ()>
    + Clone
    + std::fmt::Debug
    + serde::de::DeserializeOwned
    + Send
    + Sync
    + 'static
{
}

impl Watched for DeploymentSummary {}
impl Watched for PodSummary {}
impl Watched for HorizontalPodAutoscaler {}

/// A reflector over `api` whose objects are trimmed by `trim` before they are cached,
/// a flag that is true while its cache is complete and its watch is working, and the
/// stream of changed objects (deleted ones included) for the controller.
fn cached<K>(
    api: Api<K>,
    changes: Option<Arc<watch::Sender<()>>>,
    distrusted: Option<Arc<watch::Sender<()>>>,
    trim: impl FnMut(&mut K) + Send + 'static,
) -> (
    Store<K>,
    Arc<WatchHealth>,
    futures::stream::BoxStream<'static, Result<K, watcher::Error>>,
)
where
    K: Watched,
{
    let (store, writer) = reflector::store();
    let live = Arc::new(WatchHealth {
        distrusted,
        ..WatchHealth::default()
    });
    let health = live.clone();
    let kind = K::kind(&()).into_owned();
    let events = relisting_watcher(api).modify(trim);
    // After the reflector, so the cache holds what the health says it holds.
    let events = reflector::reflector(writer, events).inspect(move |event| {
        if let Err(error) = event {
            // A forbidden watch (RBAC without list/watch) shows here, once per retry.
            tracing::warn!(%error, kind, "watch failed; reading the API server instead until it works again");
        }
        health.saw(event.as_ref().map_err(|_| ()));
    });
    // The watch runs in a task of its own, not inside the controller: the caches must
    // stay current after the controller stops, while a shutdown hands leases over. The
    // controller gets the changed objects (deleted ones included) through a channel;
    // once it is gone, sends fail and are ignored.
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let stopped = StopsTrust(live.clone());
    let drive = events.touched_objects().for_each(move |object| {
        // After the reflector: its store already holds the change when a waiter wakes.
        if let (Ok(_), Some(changes)) = (&object, &changes) {
            changes.send_replace(());
        }
        // Errors stay here (logged above, and in the health): the controller backs off
        // ALL of its triggers after an error from any of them, the electors' included.
        if let Ok(object) = object {
            let _ = tx.send(Ok(object));
        }
        let _ = &stopped;
        future::ready(())
    });
    tokio::spawn(drive);
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|object| (object, rx))
    })
    .boxed();
    (store, live, stream)
}

/// A watcher that starts over, with a fresh list, after an event it could not parse:
/// kube's watcher reports that error and carries on from the next event, so the cache
/// would miss that change (a pod's start, or its end) for good.
fn relisting_watcher<K>(
    api: Api<K>,
) -> impl futures::Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send
where
    K: Watched,
{
    type Events<K> = futures::stream::BoxStream<'static, Result<watcher::Event<K>, watcher::Error>>;
    futures::stream::unfold(None::<Events<K>>, move |current| {
        let api = api.clone();
        async move {
            let mut events = current.unwrap_or_else(|| {
                watcher(api, watcher::Config::default().any_semantic())
                    .default_backoff()
                    .boxed()
            });
            let event = events.next().await?;
            let unparsable = matches!(
                &event,
                Err(watcher::Error::WatchFailed(kube::Error::SerdeError(_)))
            );
            Some((event, (!unparsable).then_some(events)))
        }
    })
}

/// Whether a watch's cache can be trusted: it has listed everything (a re-list is
/// complete only at `InitDone`), and its watch has not failed since its last event.
/// A watch that failed and then resumed without a re-list yields no event to say so:
/// it counts as working again once no error has come for longer than the watcher's
/// longest backoff between retries (30 s).
#[derive(Debug, Default)]
struct WatchHealth {
    state: Mutex<HealthState>,
    /// Told when the cache stops being trusted: Reapers reconciled from it a moment ago
    /// must not wait for their (long) idle resync to be looked at with the API server.
    distrusted: Option<Arc<watch::Sender<()>>>,
}

#[derive(Debug)]
struct HealthState {
    listing: bool,
    failed_at: Option<Instant>,
    stopped: bool,
}

impl Default for HealthState {
    fn default() -> Self {
        Self {
            listing: true,
            failed_at: None,
            stopped: false,
        }
    }
}

/// Marks a cache untrusted for good when its watch task ends (it never ends by itself:
/// only a panic, or the runtime shutting down, drops it).
struct StopsTrust(Arc<WatchHealth>);

impl Drop for StopsTrust {
    fn drop(&mut self) {
        self.0
            .state
            .lock()
            .expect("watch health mutex poisoned")
            .stopped = true;
    }
}

/// After a watch error, how long without another before the watch counts as working
/// again: longer than the watcher's longest backoff, so a watch that keeps failing is
/// never taken for a working one.
pub const QUIET_AFTER_FAILURE: Duration = Duration::from_secs(60);

impl HealthState {
    fn live(&self) -> bool {
        !self.stopped
            && !self.listing
            && self
                .failed_at
                .is_none_or(|at| at.elapsed() > QUIET_AFTER_FAILURE)
    }
}

impl WatchHealth {
    fn saw<K>(&self, event: Result<&watcher::Event<K>, ()>) {
        let mut state = self.state.lock().expect("watch health mutex poisoned");
        let was_live = state.live();
        match event {
            Ok(watcher::Event::Init) => state.listing = true,
            Ok(watcher::Event::InitApply(_)) => {}
            Ok(watcher::Event::InitDone) => {
                state.listing = false;
                state.failed_at = None;
            }
            Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_)) => state.failed_at = None,
            Err(()) => state.failed_at = Some(Instant::now()),
        }
        if was_live
            && !state.live()
            && let Some(distrusted) = &self.distrusted
        {
            distrusted.send_replace(());
        }
    }

    fn live(&self) -> bool {
        self.state
            .lock()
            .expect("watch health mutex poisoned")
            .live()
    }
}

fn trim_autoscaler(hpa: &mut HorizontalPodAutoscaler) {
    hpa.managed_fields_mut().clear();
    hpa.metadata.annotations = None;
    hpa.status = None;
    let spec = std::mem::take(&mut hpa.spec);
    hpa.spec = HorizontalPodAutoscalerSpec {
        scale_target_ref: spec.scale_target_ref,
        max_replicas: spec.max_replicas,
        ..HorizontalPodAutoscalerSpec::default()
    };
}

/// The Reapers of `reapers` that manage Deployment `ns/name`.
pub fn reapers_of_deployment(
    reapers: &Store<Reaper>,
    ns: Option<&str>,
    name: &str,
) -> Vec<ObjectRef<Reaper>> {
    reapers
        .state_filter(|r| r.namespace().as_deref() == ns && r.spec.deployment_name == name)
        .iter()
        .map(|r| ObjectRef::from_obj(&**r))
        .collect()
}

/// The Reapers whose workload `pod` may belong to: those whose cached Deployment's
/// selector matches it, and those whose Deployment is not cached (gone, its pods still
/// stopping) but whose status remembers a selector to count them by.
pub fn reapers_of_pod(
    reapers: &Store<Reaper>,
    deployments: &Store<DeploymentSummary>,
    pod: &PodSummary,
) -> Vec<ObjectRef<Reaper>> {
    let ns = pod.namespace();
    reapers
        .state_filter(|r| {
            if r.namespace() != ns {
                return false;
            }
            let key = ObjectRef::new(&r.spec.deployment_name).within(ns.as_deref().unwrap_or(""));
            match deployments.get(&key) {
                Some(d) => observe::pod_selector(&d).is_ok_and(|s| s.matches(pod.labels())),
                None => r.status.as_ref().is_some_and(|s| s.pod_selector.is_some()),
            }
        })
        .iter()
        .map(|r| ObjectRef::from_obj(&**r))
        .collect()
}

/// Waits until the Deployment and pod caches have listed their objects once. Not the
/// HPA cache: it only feeds a warning, and an HPA watch that is forbidden must not keep
/// the controller from working.
pub async fn synced(caches: &Caches) {
    let _ = future::join(
        caches.deployments.wait_until_ready(),
        caches.pods.wait_until_ready(),
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cache_is_trusted_only_when_listed_and_not_failing() {
        let health = WatchHealth::default();
        assert!(!health.live(), "not listed yet");
        health.saw::<PodSummary>(Ok(&watcher::Event::Init));
        health.saw::<PodSummary>(Ok(&watcher::Event::InitApply(PodSummary::default())));
        assert!(!health.live(), "listing");
        health.saw::<PodSummary>(Ok(&watcher::Event::InitDone));
        assert!(health.live());
        health.saw::<PodSummary>(Err(()));
        assert!(!health.live(), "failing");
        health.saw::<PodSummary>(Ok(&watcher::Event::Apply(PodSummary::default())));
        assert!(health.live(), "an event after the failure: the watch works");
        health.saw::<PodSummary>(Err(()));
        health.saw::<PodSummary>(Ok(&watcher::Event::Init));
        health.saw::<PodSummary>(Ok(&watcher::Event::Apply(PodSummary::default())));
        assert!(!health.live(), "re-listing after a failure");
        health.saw::<PodSummary>(Ok(&watcher::Event::InitDone));
        assert!(health.live());
        drop(StopsTrust(Arc::new(WatchHealth::default())));
        let health = Arc::new(health);
        drop(StopsTrust(health.clone()));
        assert!(!health.live(), "its watch task ended");
    }

    #[test]
    fn a_cache_that_stops_being_trusted_says_so_once() {
        let distrusted = Arc::new(watch::Sender::new(()));
        let mut told = distrusted.subscribe();
        let health = WatchHealth {
            distrusted: Some(distrusted.clone()),
            ..WatchHealth::default()
        };
        health.saw::<PodSummary>(Ok(&watcher::Event::Init));
        health.saw::<PodSummary>(Ok(&watcher::Event::InitDone));
        assert!(!told.has_changed().unwrap(), "becoming trusted is no news");
        health.saw::<PodSummary>(Err(()));
        assert!(told.has_changed().unwrap());
        told.mark_unchanged();
        health.saw::<PodSummary>(Err(()));
        assert!(!told.has_changed().unwrap(), "already untrusted");
    }
}
