//! A watch on the pods of one Deployment that records, with the wall-clock time each
//! event arrived, how many of them exist and how many are Ready. It tells the pod's own
//! Ready condition (set by kwok) apart from the Deployment's `status.readyReplicas`
//! (written later by the Deployment controller), and when a stopped pod is really gone.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};

use super::poll::poll;

/// Pods that exist (Terminating ones included) and pods whose Ready condition is True.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodCount {
    pub live: usize,
    pub ready: usize,
}

/// What a watch saw, each value with the wall-clock time its event arrived; a value equal
/// to the last one is not recorded again. Cloning shares it.
#[derive(Clone)]
pub struct Timeline<T>(Arc<Mutex<Seen<T>>>);

type Seen<T> = Vec<(DateTime<Utc>, T)>;

impl<T> Default for Timeline<T> {
    fn default() -> Self {
        Self(Arc::default())
    }
}

impl<T: Copy + PartialEq + std::fmt::Debug> Timeline<T> {
    pub fn record(&self, at: DateTime<Utc>, value: T) {
        let mut h = self.0.lock().expect("timeline mutex");
        if h.last().map(|(_, v)| *v) != Some(value) {
            h.push((at, value));
        }
    }

    /// When a value matching `pred` was first seen at or after `t`.
    pub fn first_after(&self, t: DateTime<Utc>, pred: impl Fn(T) -> bool) -> Option<DateTime<Utc>> {
        self.0
            .lock()
            .expect("timeline mutex")
            .iter()
            .find(|(at, v)| *at >= t && pred(*v))
            .map(|(at, _)| *at)
    }

    pub fn latest(&self) -> Option<T> {
        self.0
            .lock()
            .expect("timeline mutex")
            .last()
            .map(|(_, v)| *v)
    }

    /// Waits (polling the recorded history, whose times are the events' arrival) until
    /// `pred` holds at or after `t`.
    pub async fn wait_first_after(
        &self,
        t: DateTime<Utc>,
        pred: impl Fn(T) -> bool,
        timeout: Duration,
        what: &str,
    ) -> Result<DateTime<Utc>> {
        poll(
            Duration::from_millis(20),
            timeout,
            || Ok(self.first_after(t, &pred)),
            || {
                format!(
                    "timed out after {timeout:?} waiting for {what} (last seen {:?})",
                    self.latest()
                )
            },
        )
        .await
    }
}

/// A [`Timeline`] and the watch task that records into it; dropping it stops the task.
pub struct Watched<T> {
    timeline: Timeline<T>,
    task: tokio::task::JoinHandle<()>,
}

impl<T: Copy + PartialEq + std::fmt::Debug + Send + 'static> Watched<T> {
    /// Watches the objects of `api` that `config` selects, on a task of its own; `seen`
    /// turns each event into the value to record with the time the event arrived, or
    /// `None` when there is nothing to record.
    pub fn spawn<K>(
        api: Api<K>,
        config: watcher::Config,
        mut seen: impl FnMut(watcher::Result<watcher::Event<K>>) -> Option<T> + Send + 'static,
    ) -> Self
    where
        K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
    {
        let timeline = Timeline::default();
        let stream = watcher(api, config).default_backoff();
        let record = timeline.clone();
        let task = tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            while let Some(event) = stream.next().await {
                let now = Utc::now();
                if let Some(value) = seen(event) {
                    record.record(now, value);
                }
            }
        });
        Self { timeline, task }
    }
}

impl<T> std::ops::Deref for Watched<T> {
    type Target = Timeline<T>;

    fn deref(&self) -> &Timeline<T> {
        &self.timeline
    }
}

impl<T> Drop for Watched<T> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub type PodWatch = Watched<PodCount>;

fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

impl PodWatch {
    /// Watches the pods labelled `app=<app>` in `api`'s namespace.
    pub fn start(api: Api<Pod>, app: &str) -> Self {
        let config = watcher::Config::default().labels(&format!("app={app}"));
        let mut pods: BTreeMap<String, bool> = BTreeMap::new();
        let mut init: BTreeMap<String, bool> = BTreeMap::new();
        Self::spawn(api, config, move |event| {
            match event {
                Ok(watcher::Event::Apply(p)) => {
                    pods.insert(p.name_any(), is_ready(&p));
                }
                Ok(watcher::Event::Delete(p)) => {
                    pods.remove(&p.name_any());
                }
                Ok(watcher::Event::Init) => {
                    init.clear();
                    return None;
                }
                Ok(watcher::Event::InitApply(p)) => {
                    init.insert(p.name_any(), is_ready(&p));
                    return None;
                }
                Ok(watcher::Event::InitDone) => pods = std::mem::take(&mut init),
                // A watch that cannot reach its apiserver (a killed one) retries with
                // backoff; the errors say nothing the Deployment watch does not.
                Err(_) => return None,
            }
            Some(PodCount {
                live: pods.len(),
                ready: pods.values().filter(|r| **r).count(),
            })
        })
    }
}
