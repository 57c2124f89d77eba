//! Objects the end-to-end suites and benchmarks create: a singleton Deployment for kwok's
//! fake node, a Reaper naming it, and a plain HTTP GET for the operator's endpoints.

use std::io::{Read, Write};
use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::api::apps::v1::Deployment;
use kube::Client;
use kube::api::{Api, PostParams};
use reaper_operator::reaper::{LeaseSpec, Reaper, ReaperSpec};
use serde_json::json;

/// Creates a Deployment at 0 replicas with one container that never runs for real
/// (kwok fakes its pods), labelled `labels` besides its `app` selector.
pub async fn create_deployment(
    client: &Client,
    ns: &str,
    name: &str,
    strategy: &str,
    labels: serde_json::Value,
) -> Result<()> {
    let api: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let deployment: Deployment = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "replicas": 0,
            "strategy": {"type": strategy},
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "terminationGracePeriodSeconds": 1,
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
