//! Pods that belong to no Reaper, so that the operator's memory can be measured in a
//! cluster with many pods: bare kwok pods in a namespace of their own, bound straight to a
//! fake Node of their own (no scheduler work), labelled so that no Reaper's Deployment
//! selects them.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use kube::api::{Api, ListParams, PostParams};
use serde_json::json;

use super::support::cluster::wait_until;
use super::support::fixtures::create_namespace;

pub const UNRELATED_NS: &str = "bench-unrelated";
const UNRELATED_NODE: &str = "bench-kwok-node-unrelated";

/// Creates `count` Running pods (kwok) in [`UNRELATED_NS`]; returns how long it took.
pub async fn create_unrelated_pods(
    client: &Client,
    count: usize,
    concurrency: usize,
) -> Result<Duration> {
    let started = Instant::now();
    super::cluster::add_fake_node(client, UNRELATED_NODE, count + 10).await?;
    create_namespace(client, UNRELATED_NS).await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), UNRELATED_NS);
    eprintln!("creating {count} unrelated pods in namespace {UNRELATED_NS}...");
    futures::stream::iter(0..count)
        .map(|i| {
            let pods = pods.clone();
            async move {
                let pod: Pod = serde_json::from_value(json!({
                    "metadata": {
                        "name": format!("u-{i:05}"),
                        "labels": {"reaper-bench": "unrelated", "app": format!("unrelated-{}", i % 100)}
                    },
                    "spec": {
                        "nodeName": UNRELATED_NODE,
                        "terminationGracePeriodSeconds": 0,
                        "containers": [{"name": "c", "image": "example.invalid/unrelated:1"}]
                    }
                }))?;
                pods.create(&PostParams::default(), &pod)
                    .await
                    .with_context(|| format!("create pod {UNRELATED_NS}/u-{i:05}"))?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(concurrency)
        .try_collect::<Vec<()>>()
        .await?;
    let created = started.elapsed();
    let timeout = Duration::from_secs(120) + Duration::from_millis(50) * count as u32;
    let last = std::cell::Cell::new(Instant::now());
    wait_until(
        &format!("{count} unrelated pods to be Running"),
        timeout,
        || async {
            let running = pods
                .list_metadata(&ListParams::default().fields("status.phase=Running"))
                .await?
                .items
                .len();
            if last.get().elapsed() > Duration::from_secs(15) {
                eprintln!("  {running} of {count} unrelated pods Running");
                last.set(Instant::now());
            }
            if running == count {
                return Ok(Some(()));
            }
            // A list of thousands of pods is not free: do not add much load while waiting.
            tokio::time::sleep(Duration::from_secs(2)).await;
            Ok(None)
        },
    )
    .await?;
    eprintln!(
        "  created in {created:.1?}, all Running after {:.1?}",
        started.elapsed()
    );
    Ok(started.elapsed())
}
