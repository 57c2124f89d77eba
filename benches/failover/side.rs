//! The two clusters of `failover`: each one's Deployment, Reaper, watches and replicas
//! ([`Side`]), and waiting until the two are stable again ([`Stability`]).

use crate::support::id;
use std::path::Path;
use std::time::Duration;

use anyhow::{Result, anyhow, ensure};
use chrono::{DateTime, Utc};
use k8s_openapi::api::apps::v1::Deployment;
use kube::Client;
use kube::api::Api;
use reaper_operator::config::Schema;
use reaper_operator::lease::{LeaseEvent, LeaseStore};
use reaper_operator::reaper::{LeaseSpec, Phase, Reaper};
use serde_json::json;
use sqlx::{AssertSqlSafe, Row};

use super::cluster::start_cluster;
use super::database::Urls;
use super::deployments::{DeploymentWatch, Scale, scale_of};
use super::operator::{Operator, with_logs};
use super::pods;
use super::report::{Stats, fmt_dur, since};
use super::support::cluster::{TestCluster, install_reaper_crd, wait_until};
use super::support::fixtures::{
    PodStop, create_deployment_with_stop, create_namespace, create_reaper,
};
use super::support::operator::OperatorSpec;
use super::{FailoverArgs, TimingArgs};

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

    /// Waits until this cluster (the one that takes over) has scaled up after the signal
    /// at `t0`.
    pub async fn wait_scale_up(&self, t0: DateTime<Utc>, timeout: Duration) -> Result<ScaleUp> {
        // Each wait looks through the recorded history, so they may run at once.
        let deployment =
            |pred: fn(Scale) -> bool, what| self.watch.wait_first_after(t0, pred, timeout, what);
        let scaled = deployment(|s| s.replicas >= 1, "the other Deployment to scale up");
        let ready = deployment(|s| s.ready >= 1, "the other Deployment's readyReplicas");
        let pod_ready = self.pods.wait_first_after(
            t0,
            |c| c.ready >= 1,
            timeout,
            "the other cluster's pod to be Ready",
        );
        let (scaled, pod_ready, ready) = tokio::try_join!(scaled, pod_ready, ready)?;
        Ok(ScaleUp {
            scaled: since(t0, scaled, "scale-up")?,
            pod_ready: since(t0, pod_ready, "pod readiness")?,
            ready: since(t0, ready, "readiness")?,
        })
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

/// The other cluster's scale-up in a trial, each from the signal: what every mode measures
/// after the lease changed hands.
#[derive(Clone, Copy)]
pub struct ScaleUp {
    /// Its Deployment at `spec.replicas` 1.
    pub scaled: Duration,
    /// Its pod's own Ready condition (pod watch).
    pub pod_ready: Duration,
    /// Its Deployment's `status.readyReplicas` at 1.
    pub ready: Duration,
}

impl ScaleUp {
    /// Its part of a trial's line.
    pub fn line(&self) -> String {
        format!(
            "Deployment scaled {}, pod Ready {}, readyReplicas 1 {}",
            fmt_dur(self.scaled),
            fmt_dur(self.pod_ready),
            fmt_dur(self.ready)
        )
    }

    /// Its rows of a summary table, over the trials' scale-ups.
    pub fn summary_rows(ups: &[ScaleUp]) -> [(&'static str, Option<Stats>); 3] {
        let col = |f: fn(&ScaleUp) -> Duration| Stats::of(ups.iter().map(f).collect());
        [
            (
                "**Deployment scaled** (other cluster, `spec.replicas` = 1)",
                col(|u| u.scaled),
            ),
            (
                "pod Ready (the pod's condition, pod watch)",
                col(|u| u.pod_ready),
            ),
            (
                "**pod ready** (`status.readyReplicas` = 1)",
                col(|u| u.ready),
            ),
        ]
    }
}

/// What a `failover` run starts its clusters and replicas with.
#[derive(Clone, Copy)]
pub struct Bench<'a> {
    pub args: &'a FailoverArgs,
    pub urls: &'a Urls,
    pub schema: &'a Schema,
    /// The bench's own connection to the database (direct).
    pub store: &'a LeaseStore,
    /// Where the operators log.
    pub log_dir: &'a Path,
}

impl<'a> Bench<'a> {
    /// The run's view of the lease `lease_name`.
    pub fn stability(&self, lease_name: &'a str) -> Stability<'a> {
        Stability::new(self.store, self.schema, lease_name, self.args.timing)
    }

    /// Starts the two control planes `clusters` with a Reaper of the lease `lease_name`
    /// each (see [`Side::start_both`]).
    pub async fn start_sides(
        &self,
        clusters: [&'static str; 2],
        lease_name: &str,
    ) -> Result<[Side; 2]> {
        let lease = self.args.timing.lease_spec(lease_name);
        Side::start_both(clusters, lease, self.args.grace_seconds).await
    }

    /// Starts a new replica in `side`.
    pub fn start_operator(&self, side: &mut Side) -> Result<Operator> {
        side.start_operator(self.urls, self.schema, self.log_dir)
    }
}

/// The two clusters of a `failover` run, their replicas, and which cluster leads. Fields
/// drop in order: the replicas are killed before the control planes stop.
pub struct Clusters<'a> {
    /// Each cluster's replicas.
    pub ops: [Vec<Operator>; 2],
    pub sides: [Side; 2],
    /// The cluster whose replica holds the lease.
    pub leader: usize,
    pub ctx: Stability<'a>,
    pub bench: Bench<'a>,
}

impl<'a> Clusters<'a> {
    /// Starts the control planes `names` with `replicas` replicas each, a random fraction of
    /// a retry period apart (so the electors do not tick in step; a restarted replica has a
    /// random phase too), and waits until one cluster leads and the system is stable.
    pub async fn start(
        bench: Bench<'a>,
        lease_name: &'a str,
        names: [&'static str; 2],
        replicas: usize,
    ) -> Result<Self> {
        let timing = bench.args.timing;
        let mut sides = bench.start_sides(names, lease_name).await?;
        let mut ops: [Vec<Operator>; 2] = [Vec::new(), Vec::new()];
        for (k, i) in (0..replicas).flat_map(|_| [0, 1]).enumerate() {
            if k > 0 {
                sleep_random_phase(timing).await;
            }
            ops[i].push(bench.start_operator(&mut sides[i])?);
        }
        let mut run = Self {
            ops,
            sides,
            leader: 0,
            ctx: bench.stability(lease_name),
            bench,
        };
        let begun = Utc::now();
        let found = run
            .ctx
            .wait_first_leader(&[run.holders(0), run.holders(1)])
            .await;
        run.leader = with_logs(found, &run.all_ops())?;
        run.wait_stable(begun).await?;
        tokio::time::sleep(Duration::from_secs(timing.retry)).await;
        Ok(run)
    }

    /// The cluster that does not lead.
    pub fn follower(&self) -> usize {
        1 - self.leader
    }

    /// The identities of cluster `i`'s replicas.
    pub fn holders(&self, i: usize) -> Vec<String> {
        self.ops[i].iter().map(|op| op.holder()).collect()
    }

    pub fn all_ops(&self) -> Vec<&Operator> {
        self.ops.iter().flatten().collect()
    }

    /// Waits until the leading cluster holds the lease and the other one is the standby,
    /// its replicas (started at `since`) having reported; with the replicas' logs if not.
    pub async fn wait_stable(&self, since: DateTime<Utc>) -> Result<()> {
        let (leader, follower) = (self.leader, self.follower());
        let stable = self
            .ctx
            .wait_stable_holders(
                &self.sides,
                &self.holders(leader),
                &self.holders(follower),
                leader,
                since,
            )
            .await;
        with_logs(stable, &self.all_ops())
    }

    /// Replaces cluster `i`'s replicas with `replicas` new ones.
    pub fn restart_replicas(&mut self, i: usize, replicas: usize) -> Result<()> {
        let mut fresh = Vec::new();
        for _ in 0..replicas {
            fresh.push(self.bench.start_operator(&mut self.sides[i])?);
        }
        self.ops[i] = fresh;
        Ok(())
    }

    /// Fails if a replica exited during the run.
    pub fn check_running(&mut self) -> Result<()> {
        for op in self.ops.iter_mut().flatten() {
            ensure!(op.running(), "{} exited during the run", op.holder());
        }
        Ok(())
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

    /// The lease's `lease_event` rows after the one with id `last_id`, oldest first.
    pub async fn events_after(&self, last_id: i64) -> Result<Vec<LeaseEvent>> {
        let events = self.store.events(&id::lease(self.lease_name)).await?;
        Ok(events.into_iter().filter(|e| e.id > last_id).collect())
    }

    /// When, from the signal at `t0`, the lease of the stopped holder (one of `holders`)
    /// expires: its last renewal is final. Fails if someone else holds it.
    pub async fn expiry_after(&self, t0: DateTime<Utc>, holders: &[String]) -> Result<Duration> {
        let row = self
            .store
            .get(&id::lease(self.lease_name))
            .await?
            .ok_or_else(|| anyhow!("lease {} vanished", self.lease_name))?;
        ensure!(
            holders.contains(&row.holder),
            "holder changed before the kill: {row:?}"
        );
        since(t0, row.expires_at, "expiry")
    }

    /// Waits until `leader`'s cluster runs the pod, is Leading and one of its replicas
    /// `leader_holders` holds the lease, and the other cluster is at 0 and Standby, its
    /// report (written by any of `follower_holders`) newer than `since`.
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
