//! Objects the end-to-end suites and benchmarks create: a singleton Deployment for kwok's
//! fake node (its pods stop as [`PodStop`] says), a Reaper naming it, and a plain HTTP
//! GET for the operator's endpoints.

use std::io::{Read, Write};
use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::Client;
use kube::api::{Api, ListParams, PostParams};
use reaper_operator::reaper::{LeaseSpec, Reaper, ReaperSpec};
use serde_json::json;

use super::cluster::{POD_DELETE_DELAY, POD_DELETE_JITTER_DELAY};

/// How the pods of a fixture Deployment stop once deleted. In the local cluster kwok
/// keeps a deleted pod Terminating (still Running) until its grace period has run out,
/// or for `delay` (plus a random part up to `jitter_to`) when that is set; see
/// docs/local-cluster.md.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodStop {
    /// `spec.terminationGracePeriodSeconds` (what a kubelet gives a container that ignores
    /// SIGTERM).
    pub grace_seconds: i64,
    /// Stay Terminating this long instead of the grace period (annotation
    /// [`POD_DELETE_DELAY`]).
    pub delay: Option<Duration>,
    /// Stay Terminating a uniformly random time between the delay (or the grace period)
    /// and this (annotation [`POD_DELETE_JITTER_DELAY`]).
    pub jitter_to: Option<Duration>,
}

impl Default for PodStop {
    /// What [`create_deployment`] uses: 1 s of grace, so a pod lingers up to 1 s.
    fn default() -> Self {
        Self::grace(1)
    }
}

impl PodStop {
    /// Stops when its grace period of `seconds` has run out.
    pub fn grace(seconds: i64) -> Self {
        Self {
            grace_seconds: seconds,
            delay: None,
            jitter_to: None,
        }
    }

    /// Stops after `delay`, whatever the grace period (1 s here; set `grace_seconds` for
    /// more).
    pub fn after(delay: Duration) -> Self {
        Self {
            delay: Some(delay),
            ..Self::default()
        }
    }

    /// Stops after a uniformly random time between `min` and `max`.
    pub fn between(min: Duration, max: Duration) -> Self {
        Self {
            delay: Some(min),
            jitter_to: Some(max),
            ..Self::default()
        }
    }

    /// The pod annotations that carry `delay` and `jitter_to` (an empty object for none).
    pub fn annotations(&self) -> serde_json::Value {
        let mut annotations = serde_json::Map::new();
        if let Some(delay) = self.delay {
            annotations.insert(POD_DELETE_DELAY.into(), go_duration(delay).into());
        }
        if let Some(jitter) = self.jitter_to {
            annotations.insert(POD_DELETE_JITTER_DELAY.into(), go_duration(jitter).into());
        }
        serde_json::Value::Object(annotations)
    }
}

/// A duration as Go's `time.ParseDuration` reads it, in whole milliseconds.
pub fn go_duration(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

/// Creates a Deployment at 0 replicas with one container that never runs for real
/// (kwok fakes its pods), labelled `labels` besides its `app` selector. Its pods stop
/// as [`PodStop::default`] says (1 s of grace).
pub async fn create_deployment(
    client: &Client,
    ns: &str,
    name: &str,
    strategy: &str,
    labels: serde_json::Value,
) -> Result<()> {
    create_deployment_with_stop(client, ns, name, strategy, labels, PodStop::default()).await
}

/// [`create_deployment`], with pods that stop as `stop` says.
pub async fn create_deployment_with_stop(
    client: &Client,
    ns: &str,
    name: &str,
    strategy: &str,
    labels: serde_json::Value,
    stop: PodStop,
) -> Result<()> {
    let api: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let deployment: Deployment = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "replicas": 0,
            "strategy": {"type": strategy},
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}, "annotations": stop.annotations()},
                "spec": {
                    "terminationGracePeriodSeconds": stop.grace_seconds,
                    "containers": [{"name": "reaper", "image": "example.invalid/reaper:1"}]
                }
            }
        }
    }))?;
    api.create(&PostParams::default(), &deployment)
        .await
        .with_context(|| format!("create deployment {ns}/{name}"))?;
    Ok(())
}

/// Creates the namespace `name`.
pub async fn create_namespace(client: &Client, name: &str) -> Result<()> {
    Api::<Namespace>::all(client.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": name}}))?,
        )
        .await
        .with_context(|| format!("create namespace {name}"))?;
    Ok(())
}

/// Pods of the Deployment `app` (label `app=<app>`) that have not finished: Terminating
/// ones count, they may still act.
pub async fn live_pods(client: &Client, ns: &str, app: &str) -> Result<usize> {
    let pods = Api::<Pod>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels(&format!("app={app}")))
        .await?;
    Ok(pods
        .items
        .iter()
        .filter(|p| {
            let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
            !matches!(phase, Some("Succeeded" | "Failed"))
        })
        .count())
}

/// The lease `name` with a ttl, renew deadline, retry period and handover delay of these
/// many seconds.
pub fn lease_spec(
    name: &str,
    ttl: u64,
    renew_deadline: u64,
    retry_period: u64,
    handover_delay: u64,
) -> LeaseSpec {
    LeaseSpec {
        name: Some(name.to_owned()),
        ttl_seconds: ttl as i32,
        renew_deadline_seconds: renew_deadline as i32,
        retry_period_seconds: retry_period as i32,
        handover_delay_seconds: handover_delay as i32,
    }
}

/// Creates a Reaper `name` for the Deployment `deployment`.
pub async fn create_reaper(
    client: &Client,
    ns: &str,
    name: &str,
    deployment: &str,
    lease: LeaseSpec,
) -> Result<()> {
    let api: Api<Reaper> = Api::namespaced(client.clone(), ns);
    let reaper = Reaper::new(
        name,
        ReaperSpec {
            deployment_name: deployment.to_owned(),
            lease,
            paused: false,
        },
    );
    api.create(&PostParams::default(), &reaper)
        .await
        .with_context(|| format!("create reaper {ns}/{name}"))?;
    Ok(())
}

/// `GET path` on 127.0.0.1:`port`: the status code and body, `None` when nothing answers.
pub fn http_get(port: u16, path: &str, timeout: Duration) -> Option<(u16, String)> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = std::net::TcpStream::connect_timeout(&addr, timeout).ok()?;
    stream.set_read_timeout(Some(timeout)).ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let code = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Some((code, body))
}
