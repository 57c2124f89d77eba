//! The controller end to end: real local control planes (two of them, as two
//! clusters), a real PostgreSQL (directly and through PgBouncer), and `reaper-operator run`
//! processes that the scenarios kill, stop, cut off and restart.
//!
//! Every scenario is a case of its own (support::trials) on the same two clusters
//! (starting clusters is the slow part), each in its own namespaces, lease names and
//! schema. The cases run in the order listed below; a failing one does not stop the
//! others, and the clusters are stopped after the last. A filter runs some of them:
//! `cargo test --test operator -- 'kill -9'`.

#[path = "operator/event_driven.rs"]
mod event_driven;
#[path = "operator/silent_api.rs"]
mod silent_api;
mod support;
#[path = "operator/workload_safety.rs"]
mod workload_safety;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::id;

use anyhow::{Context, Result, anyhow, ensure};
use chrono::Utc;
use k8s_openapi::api::apps::v1::Deployment;
use kube::Client;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use libtest_mimic::Trial;
use reaper_operator::config::Schema;
use reaper_operator::lease::{Lease, LeaseStore};
use reaper_operator::reaper::{LeaseSpec, Reaper, ReaperStatus, status};
use serde_json::json;
use support::cluster::wait_until;
use support::command::run;
use support::fixtures::{
    PodStop, create_deployment, create_deployment_with_stop, create_namespace, create_reaper,
};
use support::operator::{OperatorProcess, OperatorSpec, with_replica_logs};
use support::proxy::{FaultProxy, Mode};
use support::trials::Suite;
use support::two_clusters::{self, Cluster};
use support::{db, fixtures};

const TTL: u64 = 3;
const DEADLINE: u64 = 2;
const RETRY: u64 = 1;

fn main() -> ExitCode {
    let suite = Suite::new(set_up);
    let trials = vec![
        case(
            &suite,
            "one operator leads and records the lease",
            one_operator_leads,
        ),
        case(
            &suite,
            "kill -9 of the holder: the peer takes over",
            kill_nine_peer_takes_over,
        ),
        case(
            &suite,
            "two clusters: SIGTERM hands over without overlap",
            two_clusters_graceful_handover,
        ),
        case(
            &suite,
            "paused holder does not act when it wakes",
            paused_holder_stands_down,
        ),
        case(
            &suite,
            "paused holder with a peer in its cluster: the running pod is left alone",
            paused_holder_with_peer_leaves_pod_alone,
        ),
        case(
            &suite,
            "database outage: the leader stops before its lease expires",
            database_outage,
        ),
        case(
            &suite,
            "a replica cut off from the database leaves its leading peer's status alone",
            cut_off_peer_leaves_the_leaders_status_alone,
        ),
        case(
            &suite,
            "the examples are accepted by the API server",
            examples_are_accepted,
        ),
        case(
            &suite,
            "API partition leaving its connections dead: the fence gets through on a new one",
            silent_api::fence_gets_through_a_silent_api_connection,
        ),
        case(
            &suite,
            "watches behind the operator's own writes: the status is written back all the same",
            silent_api::status_is_written_back_while_watches_lag,
        ),
        case(
            &suite,
            "database down at start: alive and unready, then leads by itself",
            database_down_at_start,
        ),
        case(
            &suite,
            "bad input and unsafe Deployments: refused or reported, never a crash",
            bad_input,
        ),
        case(
            &suite,
            "workload safety: SIGTERM with a slow-stopping pod: no second pod until it is gone",
            workload_safety::graceful_handover_waits_for_a_slow_pod,
        ),
        case(
            &suite,
            "workload safety: Deployment deleted before its Reaper: its stopping pod still counts",
            workload_safety::deployment_deleted_before_its_reaper,
        ),
        case(
            &suite,
            "workload safety: a tenant naming another namespace's lease is refused",
            workload_safety::tenant_cannot_squat_another_namespace,
        ),
        case(
            &suite,
            "workload safety: a second Reaper on one lease or one Deployment is refused",
            workload_safety::second_reaper_on_a_lease_is_refused,
        ),
        case(
            &suite,
            "workload safety: a peer waits for its own cluster's stopping pod",
            workload_safety::peer_waits_for_the_stopping_pod_of_its_own_cluster,
        ),
        case(
            &suite,
            "event-driven: Deployment, pod and HPA changes are acted on at once; an idle Reaper is not reconciled",
            event_driven::changes_are_acted_on_at_once,
        ),
        case(
            &suite,
            "workload safety: a restarted replica stops a pod nobody can vouch for",
            workload_safety::restarted_replica_stops_a_pod_nobody_vouches_for,
        ),
        case(
            &suite,
            "workload safety: a quiet leader vouches for its pod through its presence",
            workload_safety::a_quiet_leader_vouches_for_its_pod_through_its_presence,
        ),
    ];
    suite.run(trials, async |clusters| two_clusters::stop(clusters))
}

/// A trial of `scenario` whose error carries the log tails of the replicas it started.
fn case(
    suite: &Arc<Suite<[Cluster; 2]>>,
    name: &str,
    scenario: impl AsyncFnOnce(&[Cluster; 2]) -> Result<()> + Send + 'static,
) -> Trial {
    suite.case(name, async move |clusters| {
        with_replica_logs(scenario(clusters)).await
    })
}

/// The two clusters every scenario runs on.
async fn set_up() -> Result<[Cluster; 2]> {
    // Before the clusters are started: without a database this stops at once.
    db::direct_url();
    two_clusters::start("op").await
}

fn suffix() -> String {
    format!("{:x}", Utc::now().timestamp_subsec_nanos())
}

async fn namespace(client: &Client, prefix: &str) -> Result<String> {
    let name = format!("{prefix}-{}", suffix());
    create_namespace(client, &name).await?;
    Ok(name)
}

/// A migrated schema of its own, and a store on it through a direct connection.
async fn schema() -> Result<(Schema, LeaseStore)> {
    let schema = db::unique_schema("op");
    let store = LeaseStore::connect(&db::direct_url(), &schema, Duration::from_secs(5), 2).await?;
    store.migrate().await?;
    Ok((schema, store))
}

fn operator(
    cluster: &Cluster,
    ns: &str,
    identity: &str,
    schema: &Schema,
    url: &str,
    listen: Option<&str>,
    migrate: bool,
) -> OperatorProcess {
    OperatorProcess::start(OperatorSpec {
        kubeconfig: cluster.test.kubeconfig(),
        database_url: url,
        listen_database_url: listen,
        schema: schema.as_str(),
        cluster: cluster.name,
        identity,
        migrate,
        namespace: ns,
    })
}

/// The reaper Deployment and a Reaper on a lease of its own in a new namespace of `c`;
/// returns the namespace and the lease row name.
async fn reaper_in_one_cluster(c: &Cluster, prefix: &str) -> Result<(String, String)> {
    let ns = namespace(&c.client, prefix).await?;
    let lease_name = format!("{ns}.{prefix}-{}", suffix());
    create_deployment(&c.client, &ns, "reaper", "Recreate", json!({})).await?;
    create_reaper(&c.client, &ns, "reaper", "reaper", lease_spec(&lease_name)).await?;
    Ok((ns, lease_name))
}

/// The same Reaper (same lease name) with its Deployment in a new namespace of the same
/// name in each cluster (a lease is shared across clusters within one namespace);
/// returns the namespaces in cluster order and the lease row name.
async fn reaper_in_each_cluster(
    clusters: &[Cluster; 2],
    prefix: &str,
    stop: PodStop,
) -> Result<(Vec<String>, String)> {
    let ns = format!("{prefix}-{}", suffix());
    let lease_name = format!("{ns}.shared");
    for c in clusters {
        create_namespace(&c.client, &ns).await?;
        create_deployment_with_stop(&c.client, &ns, "reaper", "Recreate", json!({}), stop).await?;
        create_reaper(&c.client, &ns, "reaper", "reaper", lease_spec(&lease_name)).await?;
    }
    Ok((vec![ns.clone(), ns], lease_name))
}

fn lease_spec(name: &str) -> LeaseSpec {
    fixtures::lease_spec(name, TTL, DEADLINE, RETRY, 0)
}

/// The Reaper and the Deployment named `name` in namespace `ns` of one cluster (a
/// scenario names its Reaper after its Deployment).
#[derive(Clone, Copy)]
struct ReaperAt<'a> {
    client: &'a Client,
    ns: &'a str,
    name: &'a str,
}

fn at<'a>(client: &'a Client, ns: &'a str, name: &'a str) -> ReaperAt<'a> {
    ReaperAt { client, ns, name }
}

impl ReaperAt<'_> {
    /// The Deployment's (spec.replicas, status.readyReplicas).
    async fn replicas(self) -> Result<(i32, i32)> {
        let d = Api::<Deployment>::namespaced(self.client.clone(), self.ns)
            .get(self.name)
            .await?;
        let ready = d.status.and_then(|s| s.ready_replicas).unwrap_or(0);
        Ok((d.spec.replicas.unwrap_or(1), ready))
    }

    async fn status(self) -> Result<ReaperStatus> {
        Ok(self
            .reapers()
            .get(self.name)
            .await?
            .status
            .unwrap_or_default())
    }

    fn reapers(self) -> Api<Reaper> {
        Api::namespaced(self.client.clone(), self.ns)
    }

    async fn wait_replicas(self, want: (i32, i32), timeout: Duration) -> Result<()> {
        let what = format!("deployment {}/{} at {want:?}", self.ns, self.name);
        wait_until(&what, timeout, || async {
            Ok((self.replicas().await? == want).then_some(()))
        })
        .await
    }

    async fn wait_leading(self, timeout: Duration) -> Result<ReaperStatus> {
        let what = format!("reaper {}/{} to be Leading", self.ns, self.name);
        wait_until(&what, timeout, || async {
            let s = self.status().await?;
            Ok((s.phase == Some(reaper_operator::reaper::Phase::Leading)
                && s.ready.as_deref() == Some("1/1"))
            .then_some(s))
        })
        .await
    }

    /// Waits until the Deployment asks for no pod (its spec; its pods may still be
    /// stopping). `what` names the wait in the error when `timeout` runs out.
    async fn wait_scaled_to_zero(self, what: &str, timeout: Duration) -> Result<()> {
        wait_until(what, timeout, || async {
            Ok((self.replicas().await?.0 == 0).then_some(()))
        })
        .await
    }

    /// Waits until the Reaper is gone: its finalizer has run and let it go.
    async fn wait_gone(self, what: &str, timeout: Duration) -> Result<()> {
        wait_until(what, timeout, || async {
            Ok(self
                .reapers()
                .get_opt(self.name)
                .await?
                .is_none()
                .then_some(()))
        })
        .await
    }
}

fn condition<'a>(
    status: &'a ReaperStatus,
    type_: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    status.conditions.iter().find(|c| c.type_ == type_)
}

/// A fault proxy in front of the test database, and the database URL through it.
async fn database_proxy() -> Result<(FaultProxy, String)> {
    let direct = db::direct_url();
    let upstream = direct
        .rsplit_once('@')
        .and_then(|(_, rest)| rest.split('/').next())
        .ok_or_else(|| anyhow!("no host in {direct}"))?
        .to_owned();
    let proxy = FaultProxy::start(upstream).await;
    let via_proxy = proxy.url_for(&direct);
    Ok((proxy, via_proxy))
}

/// Waits until exactly one of the two clusters runs the reaper; returns its index.
async fn one_leading_cluster(clusters: &[Cluster; 2], namespaces: &[String]) -> Result<usize> {
    wait_until(
        "one cluster at 1, the other at 0",
        Duration::from_secs(30),
        || async {
            let a = at(&clusters[0].client, &namespaces[0], "reaper")
                .replicas()
                .await?;
            let b = at(&clusters[1].client, &namespaces[1], "reaper")
                .replicas()
                .await?;
            Ok(match (a, b) {
                ((1, 1), (0, _)) => Some(0),
                ((0, _), (1, 1)) => Some(1),
                _ => None,
            })
        },
    )
    .await
}

async fn lease(store: &LeaseStore, name: &str) -> Result<Lease> {
    store
        .get(&id::lease(name))
        .await?
        .ok_or_else(|| anyhow!("lease {name} does not exist"))
}

async fn one_operator_leads(clusters: &[Cluster; 2]) -> Result<()> {
    let c = &clusters[0];
    let (schema, store) = schema().await?;
    let (ns, lease_name) = reaper_in_one_cluster(c, "one").await?;
    let op = operator(c, &ns, "op-1", &schema, &db::direct_url(), None, true);
    let reaper = at(&c.client, &ns, "reaper");
    reaper
        .wait_replicas((1, 1), Duration::from_secs(30))
        .await?;
    let s = reaper.wait_leading(Duration::from_secs(10)).await?;
    ensure!(
        s.holder.as_deref() == Some("a/op-1"),
        "holder {:?}",
        s.holder
    );
    let row = lease(&store, &lease_name).await?;
    ensure!(
        s.epoch == Some(row.epoch) && row.epoch >= 1,
        "status epoch {:?}, row {row:?}",
        s.epoch
    );
    for t in [
        "Ready",
        "Leader",
        "WorkloadReady",
        "DatabaseReachable",
        "SingletonSafe",
    ] {
        let cond = condition(&s, t).ok_or_else(|| anyhow!("no {t} condition"))?;
        ensure!(cond.status == "True", "{t}: {cond:?}");
    }

    kubectl_shows_the_reaper(c, &ns)?;

    let (code, metrics) = op.http("/metrics").ok_or_else(|| anyhow!("no /metrics"))?;
    ensure!(code == 200, "/metrics answered {code}");
    for series in [
        format!("reaper_leader{{lease=\"{lease_name}\"}} 1"),
        format!("reaper_lease_acquisitions_total{{lease=\"{lease_name}\"}} 1"),
        "reaper_reconciliations_total".to_owned(),
        "reaper_lease_renew_duration_seconds_bucket".to_owned(),
    ] {
        ensure!(
            metrics.contains(&series),
            "/metrics lacks {series}:\n{metrics}"
        );
    }

    // Deleting the Reaper scales the Deployment to 0 and releases the lease.
    Api::<Reaper>::namespaced(c.client.clone(), &ns)
        .delete("reaper", &DeleteParams::default())
        .await?;
    reaper
        .wait_gone("the Reaper to be gone", Duration::from_secs(30))
        .await?;
    ensure!(
        reaper.replicas().await?.0 == 0,
        "deployment not scaled down on delete"
    );
    let row = lease(&store, &lease_name).await?;
    ensure!(row.is_free(), "lease not released on delete: {row:?}");
    Ok(())
}

/// The Ready condition and its list-map shape work with the tools users script.
fn kubectl_shows_the_reaper(c: &Cluster, ns: &str) -> Result<()> {
    run(c
        .test
        .kubectl()?
        .args(["wait", "--for=condition=Ready", "reaper/reaper", "-n", ns])
        .args(["--timeout=20s"]))
    .context("kubectl wait --for=condition=Ready")?;
    let out = c
        .test
        .kubectl()?
        .args(["get", "reapers", "-n", ns])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let header: Vec<&str> = text
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    ensure!(
        header
            == [
                "NAME", "PHASE", "HOLDER", "EPOCH", "READY", "ACQUIRED", "AGE"
            ],
        "kubectl get reapers:\n{text}"
    );
    ensure!(
        text.contains("Leading") && text.contains("a/op-1") && text.contains("1/1"),
        "kubectl get reapers:\n{text}"
    );
    let out = c
        .test
        .kubectl()?
        .args(["get", "rpr", "-n", ns, "-o", "name"])
        .output()?;
    ensure!(
        String::from_utf8_lossy(&out.stdout).trim() == "reaper.pglease.dev/reaper",
        "short name rpr"
    );
    Ok(())
}

async fn kill_nine_peer_takes_over(clusters: &[Cluster; 2]) -> Result<()> {
    let c = &clusters[0];
    let (schema, store) = schema().await?;
    let (ns, lease_name) = reaper_in_one_cluster(c, "kill").await?;
    let reaper = at(&c.client, &ns, "reaper");
    // Statements through PgBouncer (transaction mode); LISTEN on a direct connection.
    let bouncer = db::url(db::Via::PgBouncer);
    let ops = [
        operator(
            c,
            &ns,
            "op-1",
            &schema,
            &bouncer,
            Some(&db::direct_url()),
            false,
        ),
        operator(
            c,
            &ns,
            "op-2",
            &schema,
            &bouncer,
            Some(&db::direct_url()),
            false,
        ),
    ];
    reaper
        .wait_replicas((1, 1), Duration::from_secs(30))
        .await?;
    let before = lease(&store, &lease_name).await?;
    let holders: Vec<String> = ops.iter().map(|o| o.holder()).collect();
    ensure!(
        holders.contains(&before.holder),
        "holder {} is not one of {holders:?}",
        before.holder
    );
    let victim = ops
        .iter()
        .position(|o| o.holder() == before.holder)
        .unwrap();
    let survivor = ops[1 - victim].holder();

    let killed_at = Utc::now();
    ops[victim].signal("KILL");
    let mut samples = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(TTL + RETRY + 10);
    let after = loop {
        samples.push(reaper.replicas().await?.0);
        let row = lease(&store, &lease_name).await?;
        if row.holder == survivor && row.is_held() {
            break row;
        }
        ensure!(Instant::now() < deadline, "no takeover; lease {row:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let takeover = (after.acquired_at - killed_at).to_std().unwrap_or_default();
    eprintln!("kill -9 -> takeover by {survivor} in {takeover:.2?}");
    ensure!(
        takeover <= Duration::from_secs(TTL + RETRY + 2),
        "takeover took {takeover:?}"
    );
    ensure!(
        after.epoch > before.epoch,
        "epoch {} -> {}",
        before.epoch,
        after.epoch
    );
    ensure!(after.previous_holder == before.holder, "audit {after:?}");
    // The Deployment stayed at 1 throughout (same cluster: same Deployment).
    for _ in 0..20 {
        samples.push(reaper.replicas().await?.0);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ensure!(
        samples.iter().all(|&r| r == 1),
        "replicas during takeover: {samples:?}"
    );
    wait_until(
        "status to show the new holder",
        Duration::from_secs(10),
        || async {
            let s = reaper.status().await?;
            Ok(
                (s.holder.as_deref() == Some(survivor.as_str()) && s.epoch == Some(after.epoch))
                    .then_some(()),
            )
        },
    )
    .await?;
    Ok(())
}

async fn two_clusters_graceful_handover(clusters: &[Cluster; 2]) -> Result<()> {
    let (schema, store) = schema().await?;
    let (namespaces, lease_name) =
        reaper_in_each_cluster(clusters, "handover", PodStop::default()).await?;
    let mut ops: Vec<OperatorProcess> = clusters
        .iter()
        .zip(&namespaces)
        .map(|(c, ns)| operator(c, ns, "op-1", &schema, &db::direct_url(), None, true))
        .collect();
    // Exactly one cluster runs the reaper.
    let leader = one_leading_cluster(clusters, &namespaces).await?;
    let other = 1 - leader;
    let row = lease(&store, &lease_name).await?;
    ensure!(row.holder == ops[leader].holder(), "lease {row:?}");

    ops[leader].signal("TERM");
    let mut both_up = Vec::new();
    let mut other_up_at = None;
    let deadline = Instant::now() + Duration::from_secs(30);
    while other_up_at.is_none() {
        let l = at(&clusters[leader].client, &namespaces[leader], "reaper")
            .replicas()
            .await?
            .0;
        let o = at(&clusters[other].client, &namespaces[other], "reaper")
            .replicas()
            .await?
            .0;
        if l >= 1 && o >= 1 {
            both_up.push(Utc::now());
        }
        if o >= 1 {
            other_up_at = Some(Utc::now());
        }
        ensure!(
            Instant::now() < deadline,
            "the other cluster never scaled up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = ops[leader].wait_exit(Duration::from_secs(30));
    ensure!(status.success(), "graceful exit: {status:?}");
    ensure!(
        both_up.is_empty(),
        "both clusters had replicas at {both_up:?}"
    );
    ensure!(
        at(&clusters[leader].client, &namespaces[leader], "reaper")
            .replicas()
            .await?
            .0
            == 0,
        "old cluster not at 0"
    );
    let events = store.events(&id::lease(&lease_name)).await?;
    let release = events
        .iter()
        .rev()
        .find(|e| e.kind == "release")
        .ok_or_else(|| anyhow!("no release in {events:?}"))?;
    let gap = (other_up_at.unwrap() - release.at)
        .to_std()
        .unwrap_or_default();
    eprintln!("release -> other cluster scaled up in {gap:.2?}");
    ensure!(
        gap <= Duration::from_secs(2),
        "other cluster scaled up {gap:?} after the release"
    );
    at(&clusters[other].client, &namespaces[other], "reaper")
        .wait_replicas((1, 1), Duration::from_secs(20))
        .await?;
    Ok(())
}

async fn paused_holder_stands_down(clusters: &[Cluster; 2]) -> Result<()> {
    let (schema, store) = schema().await?;
    let (namespaces, lease_name) =
        reaper_in_each_cluster(clusters, "pause", PodStop::default()).await?;
    let (a, b) = (&clusters[0], &clusters[1]);
    let (reaper_a, reaper_b) = (
        at(&a.client, &namespaces[0], "reaper"),
        at(&b.client, &namespaces[1], "reaper"),
    );
    let op_a = operator(
        a,
        &namespaces[0],
        "op-1",
        &schema,
        &db::direct_url(),
        None,
        true,
    );
    reaper_a
        .wait_replicas((1, 1), Duration::from_secs(30))
        .await?;
    let op_b = operator(
        b,
        &namespaces[1],
        "op-1",
        &schema,
        &db::direct_url(),
        None,
        true,
    );
    let before = lease(&store, &lease_name).await?;
    ensure!(before.holder == op_a.holder(), "a should lead: {before:?}");
    op_a.signal("STOP");
    // Longer than the ttl, and long enough for a's last report to go stale.
    let paused_for = Duration::from_secs(2 * TTL + 2);
    tokio::time::sleep(paused_for).await;
    let during = lease(&store, &lease_name).await?;
    ensure!(
        during.holder == op_b.holder() && during.epoch > before.epoch,
        "b did not take over: {during:?}"
    );
    op_a.signal("CONT");
    let woke = Instant::now();
    let mut samples = Vec::new();
    let mut stood_down = false;
    while woke.elapsed() < Duration::from_secs(8) {
        let r = reaper_a.replicas().await?.0;
        samples.push(r);
        let s = reaper_a.status().await?;
        if r == 0
            && s.phase == Some(reaper_operator::reaper::Phase::Standby)
            && s.holder.as_deref() == Some(op_b.holder().as_str())
        {
            stood_down = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ensure!(
        stood_down,
        "a did not stand down after waking; replicas {samples:?}, status {:?}",
        reaper_a.status().await?
    );
    ensure!(
        samples.windows(2).all(|w| w[1] <= w[0]),
        "a scaled up after waking: {samples:?}"
    );
    // And it stays down while b leads.
    tokio::time::sleep(Duration::from_secs(2)).await;
    ensure!(reaper_a.replicas().await?.0 == 0, "a scaled back up");
    reaper_b
        .wait_replicas((1, 1), Duration::from_secs(10))
        .await?;
    let events = store.events(&id::lease(&lease_name)).await?;
    ensure!(
        events.windows(2).all(|w| w[0].epoch <= w[1].epoch),
        "epochs went back: {events:?}"
    );
    Ok(())
}

/// A holder stalled past its deadline while a peer of the same cluster takes the lease
/// over must not fence the shared Deployment when it wakes: the running pod is the
/// peer's now. Any write to the Deployment's spec (a scale to 0 and back) would bump
/// its generation.
async fn paused_holder_with_peer_leaves_pod_alone(clusters: &[Cluster; 2]) -> Result<()> {
    let c = &clusters[0];
    let (schema, store) = schema().await?;
    let (ns, lease_name) = reaper_in_one_cluster(c, "peer-pause").await?;
    let direct = db::direct_url();
    let ops = [
        operator(c, &ns, "op-1", &schema, &direct, None, false),
        operator(c, &ns, "op-2", &schema, &direct, None, false),
    ];
    let deployments: Api<Deployment> = Api::namespaced(c.client.clone(), &ns);
    at(&c.client, &ns, "reaper")
        .wait_replicas((1, 1), Duration::from_secs(30))
        .await?;
    let before = lease(&store, &lease_name).await?;
    let stalled = ops
        .iter()
        .find(|o| o.holder() == before.holder)
        .ok_or_else(|| anyhow!("holder {} is not ours", before.holder))?;
    let peer = ops.iter().find(|o| o.holder() != before.holder).unwrap();
    stalled.signal("STOP");
    wait_until(
        "the peer to take over",
        Duration::from_secs(TTL + RETRY + 10),
        || async {
            let row = lease(&store, &lease_name).await?;
            Ok((row.holder == peer.holder() && row.is_held()).then_some(()))
        },
    )
    .await?;
    let generation = deployments.get("reaper").await?.metadata.generation;
    stalled.signal("CONT");
    // Its next tick finds the deadline passed (the fence's trigger), then it settles.
    tokio::time::sleep(Duration::from_secs(RETRY * 3 + 2)).await;
    let after = deployments.get("reaper").await?;
    ensure!(
        after.metadata.generation == generation,
        "the woken replica wrote the Deployment (generation {:?} -> {:?}, replicas {:?})",
        generation,
        after.metadata.generation,
        after.spec.replicas
    );
    ensure!(
        stalled
            .log_tail()
            .contains("a peer in this cluster holds the lease"),
        "the woken replica did not report skipping its fence"
    );
    let row = lease(&store, &lease_name).await?;
    ensure!(
        row.holder == peer.holder() && row.epoch > before.epoch,
        "lease {row:?}"
    );
    Ok(())
}

async fn database_outage(clusters: &[Cluster; 2]) -> Result<()> {
    let c = &clusters[0];
    let (schema, store) = schema().await?;
    let (ns, lease_name) = reaper_in_one_cluster(c, "outage").await?;
    let (proxy, via_proxy) = database_proxy().await?;
    let op = operator(c, &ns, "op-1", &schema, &via_proxy, None, false);
    let reaper = at(&c.client, &ns, "reaper");
    reaper
        .wait_replicas((1, 1), Duration::from_secs(30))
        .await?;
    // A blip shorter than the renew deadline changes nothing: the running singleton
    // is neither restarted nor handed over.
    let steady = lease(&store, &lease_name).await?;
    proxy.set(Mode::Reset);
    let mut samples = Vec::new();
    let blip = Instant::now();
    while blip.elapsed() < Duration::from_secs(3) {
        if blip.elapsed() > Duration::from_millis(400) {
            proxy.set(Mode::Pass);
        }
        samples.push(reaper.replicas().await?.0);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ensure!(
        samples.iter().all(|&r| r == 1),
        "replicas during a short blip: {samples:?}"
    );
    let after_blip = lease(&store, &lease_name).await?;
    ensure!(
        after_blip.epoch == steady.epoch && after_blip.holder == steady.holder,
        "a short blip moved the lease: {steady:?} -> {after_blip:?}"
    );
    let before = lease(&store, &lease_name).await?;
    proxy.set(Mode::Blackhole);
    let cut = lease(&store, &lease_name).await?;
    reaper
        .wait_scaled_to_zero("the leader to scale down", Duration::from_secs(TTL + 5))
        .await?;
    let down_at = Utc::now();
    eprintln!(
        "database cut: scaled to 0 {:.2?} before the lease could expire",
        (cut.expires_at - down_at).to_std().unwrap_or_default()
    );
    ensure!(
        down_at < cut.expires_at,
        "scaled down at {down_at}, lease expired at {}",
        cut.expires_at
    );
    wait_until(
        "DatabaseReachable=False",
        Duration::from_secs(10),
        || async {
            let s = reaper.status().await?;
            let unreachable = condition(&s, "DatabaseReachable")
                .is_some_and(|c| c.status == "False" && c.message == status::DATABASE_UNREACHABLE)
                && condition(&s, "Ready")
                    .is_some_and(|c| c.status == "False" && c.reason == "Unreachable");
            Ok(
                (unreachable && s.phase == Some(reaper_operator::reaper::Phase::Degraded))
                    .then_some(()),
            )
        },
    )
    .await?;
    wait_until(
        "/readyz to fail without the database",
        Duration::from_secs(10),
        || async { Ok((op.http_get("/readyz") == Some(503)).then_some(())) },
    )
    .await?;
    ensure!(
        op.http_get("/healthz") == Some(200),
        "healthz should stay ok"
    );

    proxy.set(Mode::Pass);
    reaper
        .wait_replicas((1, 1), Duration::from_secs(20))
        .await?;
    let after = reaper.wait_leading(Duration::from_secs(10)).await?;
    ensure!(
        after.epoch > Some(before.epoch),
        "epoch {:?} after {}",
        after.epoch,
        before.epoch
    );
    let reachable = condition(&after, "DatabaseReachable").map(|c| c.status.clone());
    ensure!(
        reachable.as_deref() == Some("True"),
        "DatabaseReachable {reachable:?}"
    );
    Ok(())
}

/// A replica cut off from the database while a peer of its cluster leads: the cluster
/// is fine (the peer reads the lease and runs the pod), so the Reaper's status stays
/// the leader's. The cut-off replica used to write "Degraded, no holder" over it, and
/// nothing woke the leader to write its status back until its next resync, minutes
/// later. Once the leader dies (its presence goes quiet), the status says Degraded.
async fn cut_off_peer_leaves_the_leaders_status_alone(clusters: &[Cluster; 2]) -> Result<()> {
    let c = &clusters[0];
    let (schema, _store) = schema().await?;
    let (ns, _) = reaper_in_one_cluster(c, "peer-cut").await?;
    let mut leader = operator(c, &ns, "op-1", &schema, &db::direct_url(), None, true);
    let reaper = at(&c.client, &ns, "reaper");
    reaper
        .wait_replicas((1, 1), Duration::from_secs(30))
        .await?;
    reaper.wait_leading(Duration::from_secs(10)).await?;
    let (proxy, via_proxy) = database_proxy().await?;
    let peer = operator(c, &ns, "op-2", &schema, &via_proxy, None, false);
    wait_until(
        "the peer to be ready (it reads the lease)",
        Duration::from_secs(20),
        || async { Ok((peer.http_get("/readyz") == Some(200)).then_some(())) },
    )
    .await?;

    proxy.set(Mode::Blackhole);
    wait_until(
        "the cut-off peer to be unready",
        Duration::from_secs(10),
        || async { Ok((peer.http_get("/readyz") == Some(503)).then_some(())) },
    )
    .await?;
    // Past the ttl and several of the peer's retries, each a reconcile of the Reaper.
    let cut = Instant::now();
    while cut.elapsed() < Duration::from_secs(2 * TTL) {
        let s = reaper.status().await?;
        ensure!(
            s.phase == Some(reaper_operator::reaper::Phase::Leading)
                && s.holder.as_deref() == Some(leader.holder().as_str()),
            "{:.1?} into the peer's cut the status is {:?}, holder {:?}",
            cut.elapsed(),
            s.phase,
            s.holder
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    ensure!(leader.exit_code().is_none(), "the leader exited");
    // Not vacuous: the peer did reconcile the Reaper without the database meanwhile.
    let log = std::fs::read_to_string(&peer.log)?;
    ensure!(
        log.contains("decided") && log.contains("role=Unknown"),
        "the cut-off peer never reconciled the Reaper"
    );

    // The leader dies: its presence goes quiet, and the peer, still cut off, no longer
    // leaves a status naming it as it is.
    leader.signal("KILL");
    wait_until(
        "the status to stop naming the dead leader",
        Duration::from_secs(DEADLINE + 10),
        || async {
            let s = reaper.status().await?;
            Ok((s.phase == Some(reaper_operator::reaper::Phase::Degraded)).then_some(()))
        },
    )
    .await?;
    proxy.set(Mode::Pass);
    Ok(())
}

/// Every file in examples/ passes the API server's validation (the Reaper CRD's schema
/// and CEL rules included) in a server-side dry run.
async fn examples_are_accepted(clusters: &[Cluster; 2]) -> Result<()> {
    let c = &clusters[0];
    let ns = namespace(&c.client, "examples").await?;
    let dir = support::cluster::repo_root().join("examples");
    let mut files: Vec<_> = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    ensure!(files.len() >= 2, "examples: {files:?}");
    for file in files {
        run(c
            .test
            .kubectl()?
            .args(["apply", "--dry-run=server", "-n", &ns, "-f"])
            .arg(&file))
        .with_context(|| file.display().to_string())?;
    }
    Ok(())
}

async fn database_down_at_start(clusters: &[Cluster; 2]) -> Result<()> {
    let c = &clusters[0];
    // A schema nobody migrated: the replica has to apply the migrations itself once the
    // database answers.
    let schema = db::unique_schema("down");
    let (ns, _) = reaper_in_one_cluster(c, "down").await?;
    let (proxy, via_proxy) = database_proxy().await?;
    proxy.set(Mode::Reset);
    let mut op = operator(c, &ns, "op-1", &schema, &via_proxy, None, true);
    let reaper = at(&c.client, &ns, "reaper");
    // The probes answer from the first moment: alive, not ready, and why.
    let (code, body) = wait_until("/readyz to answer", Duration::from_secs(10), || async {
        Ok(op.http("/readyz"))
    })
    .await?;
    ensure!(
        code == 503 && body.contains("applying database migrations"),
        "/readyz with the database down at start: {code} {body:?}"
    );
    // Through several retries (1 s, 2 s, 4 s): never an exit, always alive.
    let down = Instant::now();
    while down.elapsed() < Duration::from_secs(8) {
        ensure!(
            op.exit_code().is_none(),
            "the replica exited with the database down"
        );
        ensure!(
            op.http_get("/healthz") == Some(200),
            "/healthz failed with the database down"
        );
        ensure!(
            op.http_get("/readyz") == Some(503),
            "/readyz passed with the database down"
        );
        ensure!(
            reaper.replicas().await?.0 == 0,
            "scaled up without the database"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    proxy.set(Mode::Pass);
    wait_until("/readyz to pass", Duration::from_secs(40), || async {
        Ok((op.http_get("/readyz") == Some(200)).then_some(()))
    })
    .await?;
    reaper
        .wait_replicas((1, 1), Duration::from_secs(30))
        .await?;
    reaper.wait_leading(Duration::from_secs(10)).await?;
    ensure!(op.exit_code().is_none(), "the replica exited");
    Ok(())
}

async fn bad_input(clusters: &[Cluster; 2]) -> Result<()> {
    let c = &clusters[0];
    let (schema, store) = schema().await?;
    let ns = namespace(&c.client, "bad").await?;
    let mut op = operator(c, &ns, "op-1", &schema, &db::direct_url(), None, true);
    refused_by_the_api_server(c, &ns).await?;

    // A missing Deployment is a condition, not an error loop.
    create_reaper(
        &c.client,
        &ns,
        "missing",
        "does-not-exist",
        lease_spec(&format!("{ns}.missing-{}", suffix())),
    )
    .await?;
    let s = wait_until("DeploymentNotFound", Duration::from_secs(20), || async {
        let s = at(&c.client, &ns, "missing").status().await?;
        let found =
            condition(&s, "WorkloadReady").is_some_and(|c| c.reason == "DeploymentNotFound");
        Ok(found.then_some(s))
    })
    .await?;
    ensure!(
        s.phase == Some(reaper_operator::reaper::Phase::Degraded),
        "{s:?}"
    );

    unsafe_deployments_are_flagged(c, &ns, &store).await?;

    ensure!(op.exit_code().is_none(), "the operator exited");
    ensure!(op.http_get("/healthz") == Some(200), "healthz");
    Ok(())
}

/// Refused by the API server's CEL rules and schema, with a message a person
/// understands.
async fn refused_by_the_api_server(c: &Cluster, ns: &str) -> Result<()> {
    let mut bad = lease_spec(&format!("{ns}.bad"));
    bad.ttl_seconds = 5;
    bad.renew_deadline_seconds = 10;
    let err = create_reaper(&c.client, ns, "bad-ttl", "whatever", bad)
        .await
        .err()
        .ok_or_else(|| anyhow!("ttl 5 < deadline 10 accepted"))?;
    ensure!(
        format!("{err:#}")
            .contains("lease.ttlSeconds must be greater than lease.renewDeadlineSeconds"),
        "{err:#}"
    );
    let mut bad = lease_spec(&format!("{ns}.bad"));
    bad.retry_period_seconds = 2;
    bad.renew_deadline_seconds = 2;
    let err = create_reaper(&c.client, ns, "bad-retry", "whatever", bad)
        .await
        .err()
        .ok_or_else(|| anyhow!("deadline 2 = retry 2 accepted"))?;
    ensure!(format!("{err:#}").contains("1.2"), "{err:#}");
    // Lease names are ASCII (a name a non-UTF8 database could not store would fail
    // every batched statement of a replica).
    for name in ["ünï", "a b", "-x", "o'brien"] {
        let err = create_reaper(&c.client, ns, "bad-name", "whatever", lease_spec(name))
            .await
            .err()
            .ok_or_else(|| anyhow!("lease name {name:?} accepted"))?;
        ensure!(
            format!("{err:#}").contains("lease.name may use only ASCII letters"),
            "{name:?}: {err:#}"
        );
    }
    let api: Api<kube::api::DynamicObject> = Api::namespaced_with(
        c.client.clone(),
        ns,
        &kube::api::ApiResource::erase::<Reaper>(&()),
    );
    let no_deployment: kube::api::DynamicObject = serde_json::from_value(json!({
        "apiVersion": "pglease.dev/v1alpha1", "kind": "Reaper",
        "metadata": {"name": "no-deployment-name"}, "spec": {}
    }))?;
    let err = api
        .create(&PostParams::default(), &no_deployment)
        .await
        .err()
        .ok_or_else(|| anyhow!("a Reaper without deploymentName was accepted"))?;
    ensure!(err.to_string().contains("deploymentName"), "{err}");
    for name in ["", "Upper", "a_b", "-x", "x-"] {
        let err = create_reaper(
            &c.client,
            ns,
            "bad-deployment",
            name,
            lease_spec(&format!("{ns}.bad")),
        )
        .await
        .err()
        .ok_or_else(|| anyhow!("deploymentName {name:?} accepted"))?;
        ensure!(
            format!("{err:#}").contains(
                "deploymentName must name a Deployment in this namespace: a DNS-1123 subdomain"
            ),
            "{name:?}: {err:#}"
        );
    }
    Ok(())
}

/// Deployments that could run two pods are flagged: a rollout surge, an autoscaler, and
/// something that keeps scaling a standby's Deployment up (scaled back too).
async fn unsafe_deployments_are_flagged(c: &Cluster, ns: &str, store: &LeaseStore) -> Result<()> {
    let surge = at(&c.client, ns, "surge");
    // A Deployment that could run two pods during a rollout is flagged.
    create_deployment(&c.client, ns, "surge", "RollingUpdate", json!({})).await?;
    create_reaper(
        &c.client,
        ns,
        "surge",
        "surge",
        lease_spec(&format!("{ns}.surge-{}", suffix())),
    )
    .await?;
    wait_until("SingletonSafe=False", Duration::from_secs(20), || async {
        let s = surge.status().await?;
        Ok(condition(&s, "SingletonSafe")
            .is_some_and(|c| c.status == "False" && c.reason == "SurgeAllowed")
            .then_some(()))
    })
    .await?;

    // An autoscaler on it is named too.
    let hpas: Api<k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler> =
        Api::namespaced(c.client.clone(), ns);
    hpas.create(
        &PostParams::default(),
        &serde_json::from_value(json!({
            "metadata": {"name": "surge-hpa"},
            "spec": {
                "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "surge"},
                "minReplicas": 1, "maxReplicas": 3
            }
        }))?,
    )
    .await?;
    wait_until(
        "the HPA in SingletonSafe",
        Duration::from_secs(20),
        || async {
            let s = surge.status().await?;
            Ok(condition(&s, "SingletonSafe")
                .is_some_and(|c| {
                    c.status == "False" && c.message.contains("HorizontalPodAutoscaler surge-hpa")
                })
                .then_some(()))
        },
    )
    .await?;

    // Something that keeps scaling a standby's Deployment up is scaled back and named.
    let held_elsewhere = format!("{ns}.elsewhere-{}", suffix());
    store
        .acquire(
            &id::lease(&held_elsewhere),
            &id::holder("ops/manual"),
            Duration::from_secs(600),
        )
        .await?
        .ok_or_else(|| anyhow!("could not take {held_elsewhere} by hand"))?;
    create_deployment(&c.client, ns, "pushed", "Recreate", json!({})).await?;
    create_reaper(
        &c.client,
        ns,
        "pushed",
        "pushed",
        lease_spec(&held_elsewhere),
    )
    .await?;
    let deployments: Api<Deployment> = Api::namespaced(c.client.clone(), ns);
    let pushed = at(&c.client, ns, "pushed");
    for round in 0..3 {
        deployments
            .patch_scale(
                "pushed",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"replicas": 1}})),
            )
            .await?;
        pushed
            .wait_scaled_to_zero(&format!("scale-back {round}"), Duration::from_secs(10))
            .await?;
    }
    wait_until("ScaledExternally", Duration::from_secs(20), || async {
        let s = pushed.status().await?;
        let flagged = condition(&s, "SingletonSafe")
            .is_some_and(|c| c.status == "False" && c.reason == "ScaledExternally");
        Ok((flagged
            && s.phase == Some(reaper_operator::reaper::Phase::Standby)
            && s.holder.as_deref() == Some("ops/manual"))
        .then_some(()))
    })
    .await?;
    Ok(())
}
