//! A Deployment's scale, and a watch that times every change of it.

use chrono::Utc;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};

use super::pods::Timeline;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scale {
    /// spec.replicas
    pub replicas: i32,
    /// status.readyReplicas
    pub ready: i32,
}

pub fn scale_of(d: &Deployment) -> Scale {
    Scale {
        replicas: d.spec.replicas.unwrap_or(1),
        ready: d
            .status
            .as_ref()
            .and_then(|s| s.ready_replicas)
            .unwrap_or(0),
    }
}

/// A watch on one Deployment that records every change of its scale with the wall-clock
/// time the event arrived.
pub struct DeploymentWatch {
    timeline: Timeline<Scale>,
    task: tokio::task::JoinHandle<()>,
}

impl DeploymentWatch {
    pub fn start(api: Api<Deployment>, name: &str) -> Self {
        let timeline = Timeline::default();
        let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
        let stream = watcher(api, config).default_backoff();
        let record = timeline.clone();
        let task = tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            while let Some(event) = stream.next().await {
                let now = Utc::now();
                match event {
                    Ok(watcher::Event::Apply(d) | watcher::Event::InitApply(d)) => {
                        record.record(now, scale_of(&d));
                    }
                    Ok(_) => {}
                    Err(error) => eprintln!("deployment watch: {error}"),
                }
            }
        });
        Self { timeline, task }
    }
}

impl std::ops::Deref for DeploymentWatch {
    type Target = Timeline<Scale>;

    fn deref(&self) -> &Timeline<Scale> {
        &self.timeline
    }
}

impl Drop for DeploymentWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}
