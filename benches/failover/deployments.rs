//! A Deployment's scale, and a watch that times every change of it.

use k8s_openapi::api::apps::v1::Deployment;
use kube::api::Api;
use kube::runtime::watcher;

use super::pods::Watched;

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
pub type DeploymentWatch = Watched<Scale>;

impl DeploymentWatch {
    pub fn start(api: Api<Deployment>, name: &str) -> Self {
        let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
        Self::spawn(api, config, |event| match event {
            Ok(watcher::Event::Apply(d) | watcher::Event::InitApply(d)) => Some(scale_of(&d)),
            Ok(_) => None,
            Err(error) => {
                eprintln!("deployment watch: {error}");
                None
            }
        })
    }
}
