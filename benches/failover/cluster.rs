//! The bench's control planes: starting one, and a fake Node for more pods.

use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::Node;
use kube::Client;
use kube::api::{Api, PostParams};
use serde_json::json;

use super::support::cluster::{TestCluster, wait_condition};

pub async fn start_cluster(prefix: &'static str) -> Result<TestCluster> {
    tokio::task::spawn_blocking(move || TestCluster::start_new(prefix))
        .await
        .context("cluster start-up task")?
        .with_context(|| format!("start control plane {prefix}"))
}

/// Pods the fake Node of `tests/cluster/up.sh` accepts.
pub const DEFAULT_NODE_PODS: usize = 110;

/// Another kwok-managed Node, `name`, with room for `pods` pods (the default one takes 110).
pub async fn add_fake_node(client: &Client, name: &str, pods: usize) -> Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let node: Node = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {
                "kubernetes.io/arch": "amd64",
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/role": "agent",
                "node-role.kubernetes.io/agent": "",
                "type": "kwok"
            }
        },
        "status": {
            "allocatable": {"cpu": "256", "memory": "1Ti", "pods": pods.to_string()},
            "capacity": {"cpu": "256", "memory": "1Ti", "pods": pods.to_string()}
        }
    }))?;
    nodes
        .create(&PostParams::default(), &node)
        .await
        .with_context(|| format!("create the fake Node {name}"))?;
    wait_condition(
        &nodes,
        name,
        "Ready",
        &format!("the fake Node {name} to be Ready"),
        Duration::from_secs(60),
    )
    .await
}
