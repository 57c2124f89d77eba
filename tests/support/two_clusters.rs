//! Two local control planes as the clusters `a` and `b`, both with the Reaper CRD: the
//! shared set-up of the suites whose scenarios run replicas in two clusters.

use anyhow::{Context, Result};
use kube::Client;

use super::cluster::{TestCluster, install_reaper_crd};

/// One of the two clusters, by the name its replicas report as `--cluster`.
pub struct Cluster {
    pub name: &'static str,
    pub test: TestCluster,
    pub client: Client,
}

/// Starts both clusters (`a` may be the one `REAPER_TEST_KUBECONFIG` names; `b` is
/// always new), their names beginning with `prefix`, and installs the Reaper CRD in each.
pub async fn start(prefix: &str) -> Result<[Cluster; 2]> {
    let a = TestCluster::start(&format!("{prefix}-a")).context("start cluster a")?;
    let b = TestCluster::start_new(&format!("{prefix}-b")).context("start cluster b")?;
    let clusters = [connect("a", a).await?, connect("b", b).await?];
    for c in &clusters {
        install_reaper_crd(&c.client)
            .await
            .with_context(|| format!("install the CRD in cluster {}", c.name))?;
    }
    Ok(clusters)
}

/// Stops both clusters, the second also when stopping the first failed.
pub fn stop(clusters: [Cluster; 2]) -> Result<()> {
    let [a, b] = clusters.map(|c| {
        c.test
            .stop()
            .with_context(|| format!("stop cluster {}", c.name))
    });
    a.and(b)
}

async fn connect(name: &'static str, test: TestCluster) -> Result<Cluster> {
    let client = test
        .client()
        .await
        .with_context(|| format!("client of cluster {name}"))?;
    Ok(Cluster { name, test, client })
}
