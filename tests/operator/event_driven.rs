//! The controller reacts to changes, not to a clock: with timings whose periodic
//! reconcile would come only every 15 s, a change of a Deployment, a pod or an HPA is
//! acted on within a few seconds, and a Reaper with nothing to do is not reconciled at
//! all while its workload report is still refreshed. Fails on an operator that reads
//! pods or HPAs only in a periodic reconcile, or that refreshes reports by reconciling.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, ensure};
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use reaper_operator::reaper::LeaseSpec;
use serde_json::json;

use super::support::cluster::wait_until;
use super::support::db;
use super::support::fixtures::{create_deployment, create_namespace, create_reaper};
use super::support::operator::OperatorProcess;
use super::{Cluster, at, condition, operator, schema, suffix};

/// Far longer than any reaction checked here: a periodic reconcile (every quarter ttl,
/// 15 s) cannot pass the checks by luck more than rarely.
fn slow_lease(name: &str) -> LeaseSpec {
    LeaseSpec {
        name: Some(name.to_owned()),
        ttl_seconds: 60,
        renew_deadline_seconds: 40,
        retry_period_seconds: 15,
        handover_delay_seconds: 0,
    }
}

/// How soon a change must be acted on.
const REACTION: Duration = Duration::from_secs(5);

pub async fn changes_are_acted_on_at_once(clusters: &[Cluster; 2]) -> Result<()> {
    let (schema, store) = schema().await?;
    let ns = format!("events-{}", suffix());
    let lease_name = format!("{ns}.shared");
    let mut ops = Vec::new();
    for c in clusters {
        create_namespace(&c.client, &ns).await?;
        create_deployment(&c.client, &ns, "reaper", "Recreate", json!({})).await?;
        create_reaper(&c.client, &ns, "reaper", "reaper", slow_lease(&lease_name)).await?;
    }
    // The first replica to start takes the free lease; the other stands by.
    let url = db::direct_url();
    ops.push(operator(
        &clusters[0],
        &ns,
        "op-1",
        &schema,
        &url,
        None,
        true,
    ));
    at(&clusters[0].client, &ns, "reaper")
        .wait_leading(Duration::from_secs(60))
        .await?;
    ops.push(operator(
        &clusters[1],
        &ns,
        "op-1",
        &schema,
        &url,
        None,
        false,
    ));
    let reader = Reports {
        pool: sqlx::PgPool::connect_with(db::options(&db::direct_url())).await?,
        table: schema.qualify("lease_workload"),
        lease_name,
    };
    drop(store);
    scenario(clusters, &ns, &reader, &ops).await
}

async fn scenario(
    clusters: &[Cluster; 2],
    ns: &str,
    reports: &Reports,
    ops: &[OperatorProcess],
) -> Result<()> {
    let (leader, standby) = (&clusters[0], &clusters[1]);
    idle_standby_is_not_reconciled_but_reports(standby, reports, &ops[1]).await?;
    external_scale_up_is_undone(standby, ns, reports).await?;
    stray_pod_is_reported(standby, ns, reports).await?;
    hpa_is_seen(leader, ns).await?;
    Ok(())
}

/// The standby reports once it has reconciled its Reaper; idle, its Reaper is not
/// reconciled, yet its report is refreshed.
async fn idle_standby_is_not_reconciled_but_reports(
    standby: &Cluster,
    reports: &Reports,
    op: &OperatorProcess,
) -> Result<()> {
    // The standby has reported once it has reconciled its Reaper.
    wait_until(
        "the standby cluster's first report",
        Duration::from_secs(30),
        || async { Ok(reports.of(standby.name).await?.map(|_| ())) },
    )
    .await?;

    // Idle: the standby's Reaper is not reconciled, yet its report is refreshed. Its
    // start-up reconciles (the first observation, then the elector's first word on the
    // lease) may still be under way when the first report lands: wait for them to end.
    let reconciles_before = settled_reconciliations(op).await?;
    let (_, reported_before) = reports
        .of(standby.name)
        .await?
        .ok_or_else(|| anyhow!("no report"))?;
    tokio::time::sleep(Duration::from_secs(20)).await;
    let reconciles_after = reconciliations(op)?;
    let (_, reported_after) = reports
        .of(standby.name)
        .await?
        .ok_or_else(|| anyhow!("no report"))?;
    ensure!(
        reconciles_after == reconciles_before,
        "the idle standby reconciled {} time(s) in 20 s",
        reconciles_after - reconciles_before
    );
    ensure!(
        reported_after > reported_before,
        "the standby's report was not refreshed in 20 s (refresh period 15 s)"
    );
    Ok(())
}

/// A Deployment change: scaled up behind the operator's back on the standby. The pod it started is
/// reported gone.
async fn external_scale_up_is_undone(standby: &Cluster, ns: &str, reports: &Reports) -> Result<()> {
    Api::<k8s_openapi::api::apps::v1::Deployment>::namespaced(standby.client.clone(), ns)
        .patch_scale(
            "reaper",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 1}})),
        )
        .await?;
    let started = Instant::now();
    wait_until("the standby back at 0", REACTION, || async {
        Ok((at(&standby.client, ns, "reaper").replicas().await?.0 == 0).then_some(()))
    })
    .await?;
    eprintln!(
        "    external scale-up undone after {:.2?}",
        started.elapsed()
    );

    // The pod that scale-up started has stopped and been reported gone.
    wait_until(
        "the standby's report of no pods",
        Duration::from_secs(30),
        || async {
            Ok(reports
                .of(standby.name)
                .await?
                .and_then(|(running, _)| (running == 0).then_some(())))
        },
    )
    .await?;
    Ok(())
}

/// A pod change: a pod of the workload's labels appears on the standby (owned by
/// something else, so no ReplicaSet adopts and deletes it), then goes.
async fn stray_pod_is_reported(standby: &Cluster, ns: &str, reports: &Reports) -> Result<()> {
    let owner = Api::<ConfigMap>::namespaced(standby.client.clone(), ns)
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "stray-owner"}}))?,
        )
        .await?;
    let pods = Api::<Pod>::namespaced(standby.client.clone(), ns);
    let stray: Pod = serde_json::from_value(json!({
        "metadata": {
            "name": "stray",
            "labels": {"app": "reaper"},
            "ownerReferences": [{
                "apiVersion": "v1", "kind": "ConfigMap", "name": "stray-owner",
                "uid": owner.metadata.uid, "controller": true
            }]
        },
        "spec": {
            "terminationGracePeriodSeconds": 0,
            "containers": [{"name": "stray", "image": "example.invalid/stray:1"}]
        }
    }))?;
    pods.create(&PostParams::default(), &stray).await?;
    let started = Instant::now();
    wait_for_report(reports, standby.name, |running| running == 1).await?;
    eprintln!("    stray pod reported after {:.2?}", started.elapsed());
    pods.delete("stray", &DeleteParams::default().grace_period(0))
        .await?;
    let started = Instant::now();
    wait_for_report(reports, standby.name, |running| running == 0).await?;
    eprintln!(
        "    stray pod's end reported after {:.2?}",
        started.elapsed()
    );
    Ok(())
}

/// An HPA change: an autoscaler on the leader's singleton Deployment, then none.
async fn hpa_is_seen(leader: &Cluster, ns: &str) -> Result<()> {
    let hpas = Api::<HorizontalPodAutoscaler>::namespaced(leader.client.clone(), ns);
    let hpa: HorizontalPodAutoscaler = serde_json::from_value(json!({
        "metadata": {"name": "reaper"},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "reaper"},
            "minReplicas": 1,
            "maxReplicas": 3
        }
    }))?;
    hpas.create(&PostParams::default(), &hpa).await?;
    let started = Instant::now();
    wait_for_singleton_safe(leader, ns, "False").await?;
    eprintln!("    HPA seen after {:.2?}", started.elapsed());
    hpas.delete("reaper", &DeleteParams::default()).await?;
    let started = Instant::now();
    wait_for_singleton_safe(leader, ns, "True").await?;
    eprintln!("    HPA's removal seen after {:.2?}", started.elapsed());
    Ok(())
}

async fn wait_for_singleton_safe(cluster: &Cluster, ns: &str, want: &str) -> Result<()> {
    wait_until(
        &format!("SingletonSafe={want} in cluster {}", cluster.name),
        REACTION,
        || async {
            let s = at(&cluster.client, ns, "reaper").status().await?;
            Ok(condition(&s, "SingletonSafe")
                .is_some_and(|c| c.status == want)
                .then_some(()))
        },
    )
    .await
}

async fn wait_for_report(
    reports: &Reports,
    cluster: &str,
    want: impl Fn(i32) -> bool,
) -> Result<()> {
    wait_until(
        &format!("cluster {cluster}'s report of its pods"),
        REACTION,
        || async {
            Ok(reports
                .of(cluster)
                .await?
                .and_then(|(running, _)| want(running).then_some(())))
        },
    )
    .await
}

/// Reads the lease's workload reports straight from the table, writing nothing.
struct Reports {
    pool: sqlx::PgPool,
    table: String,
    lease_name: String,
}

impl Reports {
    /// `cluster`'s report: its running pods and when it was written.
    async fn of(&self, cluster: &str) -> Result<Option<(i32, chrono::DateTime<chrono::Utc>)>> {
        let sql = format!(
            "SELECT running_pods, reported_at FROM {} WHERE name = $1 AND cluster = $2",
            self.table
        );
        Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(&self.lease_name)
            .bind(cluster)
            .fetch_optional(&self.pool)
            .await?)
    }
}

/// The replica's `reaper_reconciliations_total`.
/// The reconcile count once it has not moved for three seconds (the start-up
/// reconciles come within a second of each other).
pub(super) async fn settled_reconciliations(op: &OperatorProcess) -> Result<u64> {
    const QUIET: Duration = Duration::from_secs(3);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = reconciliations(op)?;
    loop {
        tokio::time::sleep(QUIET).await;
        let now = reconciliations(op)?;
        if now == last {
            return Ok(now);
        }
        ensure!(
            Instant::now() < deadline,
            "the operator kept reconciling for 30 s"
        );
        last = now;
    }
}

pub(super) fn reconciliations(op: &OperatorProcess) -> Result<u64> {
    let (_, body) = op
        .http("/metrics")
        .ok_or_else(|| anyhow!("the operator's /metrics does not answer"))?;
    body.lines()
        .find_map(|l| l.strip_prefix("reaper_reconciliations_total "))
        .context("no reaper_reconciliations_total in /metrics")?
        .trim()
        .parse::<f64>()
        .map(|v| v as u64)
        .context("reaper_reconciliations_total is not a number")
}
