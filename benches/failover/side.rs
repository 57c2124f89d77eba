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
use super::cluster::start_cluster;
use super::database::Urls;
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

    /// Starts the two control planes `clusters` at once and sets up side `a` in the first,
    /// `b` in the second.
    pub async fn start_both(
        clusters: [&'static str; 2],
        lease: LeaseSpec,
        grace_seconds: i64,
    ) -> Result<[Self; 2]> {
        eprintln!("starting two control planes (tests/cluster/up.sh)...");
        let (a, b) = tokio::join!(start_cluster(clusters[0]), start_cluster(clusters[1]));
        let (a, b) = (a?, b?);
        Ok([
            Self::new("a", a, lease.clone(), grace_seconds).await?,
            Self::new("b", b, lease, grace_seconds).await?,
        ])
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

/// Sleeps a random fraction of a retry period: what follows falls at a random phase of the
/// electors' renew cycle (stabilising takes about the same time after every trial, which
/// would otherwise keep the phase fixed).
pub async fn sleep_random_phase(timing: TimingArgs) {
    let phase = rand::random_range(0..timing.retry * 1000);
    tokio::time::sleep(Duration::from_millis(phase)).await;
}

pub struct Stability<'a> {
    pub store: &'a LeaseStore,
    pub lease_name: &'a str,
    /// The run's `lease_event` table, qualified with its schema.
    pub events: String,
    pub workload: String,
    pub timing: TimingArgs,
}

impl<'a> Stability<'a> {
    /// The run's view of the lease `lease_name` in `schema`.
    pub fn new(
        store: &'a LeaseStore,
        schema: &Schema,
        lease_name: &'a str,
        timing: TimingArgs,
    ) -> Self {
        Self {
            store,
            lease_name,
            events: schema.qualify("lease_event"),
            workload: schema.qualify("lease_workload"),
            timing,
        }
    }

    /// Waits until the lease is held by one of `holders[0]` (cluster a's replicas) or
    /// `holders[1]`; returns the index of that cluster.
    pub async fn wait_first_leader(&self, holders: &[Vec<String>; 2]) -> Result<usize> {
        wait_until("a first leader", Duration::from_secs(120), || async {
            Ok(self
                .store
                .get(&id::lease(self.lease_name))
                .await?
                .filter(|row| row.is_held())
                .and_then(|row| holders.iter().position(|h| h.contains(&row.holder))))
        })
        .await
    }

    /// The id of the lease's last `lease_event` row (0 if it has none): a trial's events
    /// are the rows after it.
    pub async fn last_event_id(&self) -> Result<i64> {
        Ok(sqlx::query(AssertSqlSafe(format!(
            "SELECT coalesce(max(id), 0) AS id FROM {} WHERE name = $1",
            self.events
        )))
        .bind(self.lease_name)
        .fetch_one(self.store.pool())
        .await?
        .try_get("id")?)
    }

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
            "SELECT max(reported_at) AS at FROM {} WHERE name = $1 AND reported_by = ANY($2)",
            self.workload
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
            let reported: Option<DateTime<Utc>> = sqlx::query(AssertSqlSafe(report_sql.clone()))
                .bind(self.lease_name)
                .bind(follower_holders)
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
