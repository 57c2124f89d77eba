//! The two clusters of `failover`: each one's Deployment, Reaper, watches and replicas
//! ([`Side`]), and waiting until the two are stable again ([`Stability`]).

use crate::support::id;
use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use chrono::{DateTime, Utc};
use k8s_openapi::api::apps::v1::Deployment;
use kube::Client;
use kube::api::Api;
use reaper_operator::config::Schema;
use reaper_operator::lease::LeaseStore;
use reaper_operator::reaper::{LeaseSpec, Phase, Reaper};
use serde_json::json;
use sqlx::{AssertSqlSafe, Row};

use super::TimingArgs;
use super::database::{Urls, lit};
use super::deployments::{DeploymentWatch, Scale, scale_of};
use super::operator::Operator;
use super::pods;
use super::support::cluster::{TestCluster, install_reaper_crd, wait_until};
use super::support::fixtures::{
    PodStop, create_deployment_with_stop, create_namespace, create_reaper,
};
use super::support::operator::OperatorSpec;

/// One cluster of the failover bench. Fields drop in order: the watch stops before the
/// control plane does.
pub struct Side {
    pub watch: DeploymentWatch,
    pub pods: pods::PodWatch,
    pub name: &'static str,
    pub client: Client,
    reapers: Api<Reaper>,
    /// Replicas started in this cluster so far (the identity of the next one).
    generation: u32,
    pub test: TestCluster,
}

pub const FAILOVER_NS: &str = "bench-failover";
pub const WORKLOAD: &str = "reaper";

impl Side {
    pub async fn new(
        name: &'static str,
        test: TestCluster,
        lease: LeaseSpec,
        grace_seconds: i64,
    ) -> Result<Self> {
        let client = test.client().await?;
        install_reaper_crd(&client).await?;
        create_namespace(&client, FAILOVER_NS).await?;
        create_deployment_with_stop(
            &client,
            FAILOVER_NS,
            WORKLOAD,
            "Recreate",
            json!({"reaper-bench": "failover"}),
            PodStop::grace(grace_seconds),
        )
        .await?;
        create_reaper(&client, FAILOVER_NS, WORKLOAD, WORKLOAD, lease).await?;
        let (watch, pods) = Self::watches(&client);
        let reapers = Api::namespaced(client.clone(), FAILOVER_NS);
        Ok(Self {
            name,
            test,
            client,
            reapers,
            watch,
            pods,
            generation: 0,
        })
    }

    fn watches(client: &Client) -> (DeploymentWatch, pods::PodWatch) {
        let deployments: Api<Deployment> = Api::namespaced(client.clone(), FAILOVER_NS);
        let pods = Api::namespaced(client.clone(), FAILOVER_NS);
        (
            DeploymentWatch::start(deployments, WORKLOAD),
            pods::PodWatch::start(pods, WORKLOAD),
        )
    }

    /// New watches (after the apiserver came back: the old ones may sit in a backoff).
    pub fn restart_watches(&mut self) {
        (self.watch, self.pods) = Self::watches(&self.client);
    }

    pub async fn scale(&self) -> Result<Scale> {
        let api: Api<Deployment> = Api::namespaced(self.client.clone(), FAILOVER_NS);
        Ok(scale_of(&api.get(WORKLOAD).await?))
    }

    pub async fn phase(&self) -> Result<(Option<Phase>, Option<String>)> {
        let status = self.reapers.get(WORKLOAD).await?.status.unwrap_or_default();
        Ok((status.phase, status.holder))
    }

    pub fn start_operator(
        &mut self,
        urls: &Urls,
        schema: &Schema,
        log_dir: &Path,
    ) -> Result<Operator> {
        self.generation += 1;
        let identity = format!("op-{}", self.generation);
        Operator::start(
            OperatorSpec {
                kubeconfig: self.test.kubeconfig(),
                // Statements through PgBouncer like production; LISTEN needs a direct one.
                database_url: &urls.pgbouncer,
                listen_database_url: Some(&urls.direct),
                schema: schema.as_str(),
                cluster: self.name,
                identity: &identity,
                migrate: false,
                namespace: FAILOVER_NS,
            },
            log_dir,
        )
    }
}

pub struct Stability<'a> {
    pub store: &'a LeaseStore,
    pub lease_name: &'a str,
    pub workload: String,
    pub timing: TimingArgs,
}

impl Stability<'_> {
    /// Waits until `leader`'s cluster runs the pod, is Leading and holds the lease, and
    /// the other cluster is at 0 and Standby, its replica (started at `since`) having
    /// reported its workload.
    pub async fn wait_stable(
        &self,
        sides: &[Side; 2],
        ops: &[Operator],
        leader: usize,
        since: DateTime<Utc>,
    ) -> Result<()> {
        let follower = 1 - leader;
        self.wait_stable_holders(
            sides,
            &[ops[leader].holder()],
            &[ops[follower].holder()],
            leader,
            since,
        )
        .await
    }

    /// [`Stability::wait_stable`] with several replicas per cluster: one of
    /// `leader_holders` holds the lease, and the follower cluster's report (written by any
    /// of `follower_holders`) is newer than `since`.
    pub async fn wait_stable_holders(
        &self,
        sides: &[Side; 2],
        leader_holders: &[String],
        follower_holders: &[String],
        leader: usize,
        since: DateTime<Utc>,
    ) -> Result<()> {
        let follower = 1 - leader;
        let timeout = Duration::from_secs(2 * self.timing.ttl + 90);
        let report_sql = format!(
            "SELECT max(reported_at) AS at FROM {} WHERE name = {} AND reported_by IN ({})",
            self.workload,
            lit(self.lease_name),
            follower_holders
                .iter()
                .map(|h| lit(h))
                .collect::<Vec<_>>()
                .join(", ")
        );
        wait_until("the system to be stable", timeout, || async {
            let (l, f) = (sides[leader].scale().await?, sides[follower].scale().await?);
            if l != (Scale {
                replicas: 1,
                ready: 1,
            }) || f
                != (Scale {
                    replicas: 0,
                    ready: 0,
                })
            {
                return Ok(None);
            }
            let Some(row) = self.store.get(&id::lease(self.lease_name)).await? else {
                return Ok(None);
            };
            if !leader_holders.contains(&row.holder) || !row.is_held() {
                return Ok(None);
            }
            let leader_holder = row.holder;
            let reported: Option<DateTime<Utc>> = sqlx::raw_sql(AssertSqlSafe(report_sql.clone()))
                .fetch_one(self.store.pool())
                .await?
                .try_get("at")?;
            if reported.is_none_or(|at| at < since) {
                return Ok(None);
            }
            let (lp, lh) = sides[leader].phase().await?;
            let (fp, fh) = sides[follower].phase().await?;
            let ok = lp == Some(Phase::Leading)
                && lh.as_deref() == Some(leader_holder.as_str())
                && fp == Some(Phase::Standby)
                && fh.as_deref() == Some(leader_holder.as_str());
            Ok(ok.then_some(()))
        })
        .await
    }
}
