//! Scenarios where a second reaper pod could start while the first still runs: pods
//! that take their time to stop, Deployments deleted before their Reaper, tenants
//! naming other namespaces' leases, two Reapers on one lease, and a replica that
//! restarted without its memory. Each fails on an operator that counts a stopping pod
//! as gone, stops renewing before its pods are gone, or trusts a lease name blindly.

use crate::support::id;
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Api, DeleteParams};
use reaper_operator::reaper::{LeaseSpec, Phase, Reaper};
use serde_json::json;

use super::event_driven::{reconciliations, settled_reconciliations};
use super::support::cluster::wait_until;
use super::support::db;
use super::support::fixtures::{
    PodStop, create_deployment, create_deployment_with_stop, create_reaper, live_pods,
};
use super::support::operator::OperatorProcess;
use super::support::proxy::Mode;
use super::{
    Cluster, at, condition, database_proxy, lease_spec, namespace, one_leading_cluster, operator,
    reaper_in_each_cluster, schema,
};

/// How long the slow workload's pods stay Terminating: longer than the test ttl (3 s),
/// so a cluster that stopped renewing would lose the lease while its pod still runs.
const SLOW_STOP: Duration = Duration::from_secs(6);

/// Samples both clusters until `other` runs a ready pod, and returns the instants at
/// which the `leader` cluster still had a live pod while `other` had one or wanted one.
async fn watch_for_overlap(
    clusters: &[Cluster; 2],
    namespaces: &[String],
    leader: usize,
    timeout: Duration,
) -> Result<Vec<Duration>> {
    let other = 1 - leader;
    let started = Instant::now();
    let mut overlaps = Vec::new();
    loop {
        let old = live_pods(&clusters[leader].client, &namespaces[leader], "reaper").await?;
        let new_pods = live_pods(&clusters[other].client, &namespaces[other], "reaper").await?;
        let (wanted, ready) = at(&clusters[other].client, &namespaces[other], "reaper")
            .replicas()
            .await?;
        if old > 0 && (new_pods > 0 || wanted > 0) {
            overlaps.push(started.elapsed());
        }
        if ready >= 1 && old == 0 {
            return Ok(overlaps);
        }
        ensure!(
            started.elapsed() < timeout,
            "the other cluster never took over ({old} pod(s) left in the old one, other at {wanted}/{ready})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Two clusters with one operator each and slow-stopping pods, one of them leading.
struct SlowPair {
    namespaces: Vec<String>,
    lease_name: String,
    ops: Vec<OperatorProcess>,
    /// Index of the cluster that leads.
    leader: usize,
    store: reaper_operator::lease::LeaseStore,
}

async fn two_clusters_with_slow_pods(clusters: &[Cluster; 2], prefix: &str) -> Result<SlowPair> {
    let (schema, store) = schema().await?;
    let (namespaces, lease_name) =
        reaper_in_each_cluster(clusters, prefix, PodStop::after(SLOW_STOP)).await?;
    let ops: Vec<OperatorProcess> = clusters
        .iter()
        .zip(&namespaces)
        .map(|(c, ns)| operator(c, ns, "op-1", &schema, &db::direct_url(), None, true))
        .collect();
    let leader = one_leading_cluster(clusters, &namespaces).await?;
    Ok(SlowPair {
        namespaces,
        lease_name,
        ops,
        leader,
        store,
    })
}

/// SIGTERM to the leading cluster's only operator while its pod takes 6 s to stop: it
/// keeps the lease (renewing) and reports the pod until it is gone, then releases.
pub async fn graceful_handover_waits_for_a_slow_pod(clusters: &[Cluster; 2]) -> Result<()> {
    let SlowPair {
        namespaces,
        lease_name,
        mut ops,
        leader,
        store,
    } = two_clusters_with_slow_pods(clusters, "slow-term").await?;
    ops[leader].signal("TERM");
    let overlaps =
        watch_for_overlap(clusters, &namespaces, leader, Duration::from_secs(40)).await?;
    ensure!(
        overlaps.is_empty(),
        "the other cluster wanted or ran a pod while the old one still stopped, at {overlaps:?} after SIGTERM"
    );
    let exit = ops[leader].wait_exit(Duration::from_secs(30));
    ensure!(exit.success(), "graceful exit: {exit:?}");
    let events = store.events(&id::lease(&lease_name)).await?;
    ensure!(
        events.iter().any(|e| e.kind == "release"),
        "the lease was not released after the pod stopped: {events:?}"
    );
    Ok(())
}

/// `kubectl delete -f` of a file listing the Deployment first, then its Reaper: the
/// pods outlive their Deployment, and the Reaper's finalizer must wait for them.
pub async fn deployment_deleted_before_its_reaper(clusters: &[Cluster; 2]) -> Result<()> {
    let SlowPair {
        namespaces,
        ops: _ops,
        leader,
        ..
    } = two_clusters_with_slow_pods(clusters, "del-order").await?;
    let (client, ns) = (&clusters[leader].client, &namespaces[leader]);
    Api::<Deployment>::namespaced(client.clone(), ns)
        .delete("reaper", &DeleteParams::background())
        .await?;
    Api::<Reaper>::namespaced(client.clone(), ns)
        .delete("reaper", &DeleteParams::default())
        .await?;
    let overlaps =
        watch_for_overlap(clusters, &namespaces, leader, Duration::from_secs(40)).await?;
    ensure!(
        overlaps.is_empty(),
        "the other cluster wanted or ran a pod while the deleted Deployment's pod still stopped, at {overlaps:?}"
    );
    at(client, ns, "reaper")
        .wait_gone("the Reaper's finalizer to finish", Duration::from_secs(20))
        .await?;
    Ok(())
}

/// A tenant names another namespace's lease: it is refused (and so holds nothing), and
/// the victim's singleton runs.
pub async fn tenant_cannot_squat_another_namespace(clusters: &[Cluster; 2]) -> Result<()> {
    let c = &clusters[0];
    let (schema, _) = schema().await?;
    let victim_ns = namespace(&c.client, "victim").await?;
    let tenant_ns = namespace(&c.client, "tenant").await?;
    let squat = at(&c.client, &tenant_ns, "squat");
    let target = format!("{victim_ns}.victim");
    let victim = at(&c.client, &victim_ns, "victim");
    create_deployment(&c.client, &tenant_ns, "squat", "Recreate", json!({})).await?;
    create_reaper(&c.client, &tenant_ns, "squat", "squat", lease_spec(&target)).await?;
    let squatter = operator(
        c,
        &tenant_ns,
        "op-t",
        &schema,
        &db::direct_url(),
        None,
        true,
    );
    let mut ops = vec![squatter];
    let s = wait_until(
        "LeaseNameOutsideNamespace",
        Duration::from_secs(30),
        || async {
            let s = squat.status().await?;
            Ok(condition(&s, "Leader")
                .is_some_and(|c| c.reason == "LeaseNameOutsideNamespace")
                .then_some(s))
        },
    )
    .await?;
    ensure!(s.phase == Some(Phase::Invalid), "{s:?}");
    ensure!(
        squat.replicas().await?.0 == 0,
        "the refused Reaper's Deployment runs"
    );
    create_deployment(&c.client, &victim_ns, "victim", "Recreate", json!({})).await?;
    let mut spec = lease_spec("victim");
    spec.name = None;
    create_reaper(&c.client, &victim_ns, "victim", "victim", spec).await?;
    ops.push(operator(
        c,
        &victim_ns,
        "op-v",
        &schema,
        &db::direct_url(),
        None,
        false,
    ));
    victim
        .wait_replicas((1, 1), Duration::from_secs(30))
        .await?;
    let s = victim.status().await?;
    ensure!(s.lease_name.as_deref() == Some(target.as_str()), "{s:?}");
    Ok(())
}

/// Two Reapers of one cluster on one lease, or on one Deployment: the older acts, the
/// newer is refused with a condition and never scales anything up.
pub async fn second_reaper_on_a_lease_is_refused(clusters: &[Cluster; 2]) -> Result<()> {
    let c = &clusters[0];
    let (schema, _) = schema().await?;
    let ns = namespace(&c.client, "dup").await?;
    for d in ["first", "second"] {
        create_deployment(&c.client, &ns, d, "Recreate", json!({})).await?;
    }
    let dup = format!("{ns}.dup");
    create_reaper(&c.client, &ns, "first", "first", lease_spec(&dup)).await?;
    let mut op = operator(c, &ns, "op-1", &schema, &db::direct_url(), None, true);
    let first_reaper = at(&c.client, &ns, "first");
    let second_reaper = at(&c.client, &ns, "second");
    first_reaper.wait_leading(Duration::from_secs(30)).await?;
    create_reaper(&c.client, &ns, "second", "second", lease_spec(&dup)).await?;
    let other = format!("{ns}.other");
    create_reaper(&c.client, &ns, "third", "first", lease_spec(&other)).await?;
    for (name, reason) in [
        ("second", "LeaseNameConflict"),
        ("third", "DeploymentConflict"),
    ] {
        let s = wait_until(reason, Duration::from_secs(20), || async {
            let s = at(&c.client, &ns, name).status().await?;
            Ok(condition(&s, "Leader")
                .is_some_and(|c| c.reason == reason)
                .then_some(s))
        })
        .await?;
        ensure!(s.phase == Some(Phase::Invalid), "{name}: {s:?}");
    }
    // Neither stole anything: the first still runs, the second never scaled up.
    for _ in 0..20 {
        ensure!(second_reaper.replicas().await?.0 == 0, "second scaled up");
        ensure!(first_reaper.replicas().await?.0 == 1, "first scaled down");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Once the first is gone, the conflict is over.
    Api::<Reaper>::namespaced(c.client.clone(), &ns)
        .delete("first", &DeleteParams::default())
        .await?;
    second_reaper.wait_leading(Duration::from_secs(40)).await?;
    ensure!(op.exit_code().is_none(), "the operator exited");
    Ok(())
}

/// The replica that scaled the workload up dies while the database is out of reach; its
/// replacement (a new identity, no memory) cannot prove anyone still holds the lease the
/// pod runs under, and scales it to 0 instead of leaving it running past the lease.
pub async fn restarted_replica_stops_a_pod_nobody_vouches_for(
    clusters: &[Cluster; 2],
) -> Result<()> {
    let c = &clusters[0];
    let (schema, _) = schema().await?;
    let ns = namespace(&c.client, "amnesia").await?;
    create_deployment(&c.client, &ns, "reaper", "Recreate", json!({})).await?;
    let lease = format!("{ns}.amnesia");
    create_reaper(&c.client, &ns, "reaper", "reaper", lease_spec(&lease)).await?;
    let direct = db::direct_url();
    let (proxy, via_proxy) = database_proxy().await?;
    let first = operator(c, &ns, "op-1", &schema, &direct, None, true);
    let reaper = at(&c.client, &ns, "reaper");
    let mut ops = vec![first];
    // The first replica leads through the direct URL... then both it and the
    // database path of its successor go away at once.
    reaper
        .wait_replicas((1, 1), Duration::from_secs(30))
        .await?;
    proxy.set(Mode::Blackhole);
    ops[0].signal("KILL");
    ops[0].wait_exit(Duration::from_secs(10));
    ensure!(reaper.replicas().await?.0 == 1, "precondition: still at 1");
    ops.push(operator(c, &ns, "op-2", &schema, &via_proxy, None, false));
    let started = Instant::now();
    reaper
        .wait_scaled_to_zero(
            "the restarted replica to scale the unvouched pod to 0",
            Duration::from_secs(20),
        )
        .await?;
    eprintln!(
        "restarted replica scaled down {:.1?} after it started",
        started.elapsed()
    );
    Ok(())
}

/// The leader is cut off from the database: its fence scales the Deployment to 0 and the
/// pod takes 6 s to stop; a peer of the same cluster takes the lease over after the ttl
/// (3 s) and must not start a second pod beside the one still stopping (a ReplicaSet
/// does not count Terminating pods).
pub async fn peer_waits_for_the_stopping_pod_of_its_own_cluster(
    clusters: &[Cluster; 2],
) -> Result<()> {
    let c = &clusters[0];
    let (schema, _) = schema().await?;
    let ns = namespace(&c.client, "own-stop").await?;
    create_deployment_with_stop(
        &c.client,
        &ns,
        "reaper",
        "Recreate",
        json!({}),
        PodStop::after(SLOW_STOP),
    )
    .await?;
    let lease = format!("{ns}.own-stop");
    create_reaper(&c.client, &ns, "reaper", "reaper", lease_spec(&lease)).await?;
    let direct = db::direct_url();
    let (proxy, via_proxy) = database_proxy().await?;
    let mut ops = vec![operator(c, &ns, "op-1", &schema, &via_proxy, None, true)];
    let reaper = at(&c.client, &ns, "reaper");
    reaper
        .wait_replicas((1, 1), Duration::from_secs(30))
        .await?;
    ops.push(operator(c, &ns, "op-2", &schema, &direct, None, false));
    tokio::time::sleep(Duration::from_secs(2)).await;
    proxy.set(Mode::Blackhole);
    let cut = Instant::now();
    let mut doubles = Vec::new();
    let mut scaled_down = false;
    loop {
        let live = live_pods(&c.client, &ns, "reaper").await?;
        let (wanted, ready) = reaper.replicas().await?;
        scaled_down |= wanted == 0;
        if live > 1 {
            doubles.push(cut.elapsed());
        }
        if scaled_down && wanted == 1 && ready == 1 && live == 1 {
            break;
        }
        ensure!(
            cut.elapsed() < Duration::from_secs(40),
            "the peer never took over (live {live}, {wanted}/{ready})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ensure!(
        doubles.is_empty(),
        "two live pods of one cluster at {doubles:?} after the cut"
    );
    Ok(())
}

/// Three renew deadlines of the scenario below, and eight quarter ttls (the period at
/// which a leader that proved itself alive by reconciling would be seen).
const QUIET_WINDOW: Duration = Duration::from_secs(12);

/// A leader whose pod runs writes nothing per Reaper while nothing changes, yet a peer
/// of its cluster that is cut off from the database leaves the pod alone: the leader's
/// presence (one Lease per replica) says it still renews, so it can still stop its pod.
/// Once the leader is killed, its presence goes quiet and the cut-off peer scales the
/// pod down within a ttl. Fails on an operator whose leader reconciles (and writes its
/// status) periodically to show it is alive.
pub async fn a_quiet_leader_vouches_for_its_pod_through_its_presence(
    clusters: &[Cluster; 2],
) -> Result<()> {
    let c = &clusters[0];
    let (schema, _) = schema().await?;
    let ns = namespace(&c.client, "presence").await?;
    create_deployment(&c.client, &ns, "reaper", "Recreate", json!({})).await?;
    // A renew deadline of 4 s: the cut-off peer scales down once the leader's presence
    // (renewed every 1.33 s) has not moved for that long, so a slow API write here and
    // there must not pass for a dead leader.
    let timings = LeaseSpec {
        ttl_seconds: 6,
        renew_deadline_seconds: 4,
        ..lease_spec(&format!("{ns}.presence"))
    };
    create_reaper(&c.client, &ns, "reaper", "reaper", timings).await?;
    let direct = db::direct_url();
    let (proxy, via_proxy) = database_proxy().await?;
    proxy.set(Mode::Blackhole);
    let mut ops = vec![operator(c, &ns, "op-1", &schema, &direct, None, true)];
    let reaper = at(&c.client, &ns, "reaper");
    reaper
        .wait_replicas((1, 1), Duration::from_secs(30))
        .await?;
    // The peer never reaches the database: after the renew deadline it can only
    // judge the pod by the leader's presence.
    ops.push(operator(c, &ns, "op-2", &schema, &via_proxy, None, false));
    let leader_reconciles = settled_reconciliations(&ops[0]).await?;
    let quiet = Instant::now();
    while quiet.elapsed() < QUIET_WINDOW {
        ensure!(
            reaper.replicas().await?.0 == 1,
            "the cut-off peer scaled the healthy leader's pod down after {:.1?}",
            quiet.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let reconciled = reconciliations(&ops[0])? - leader_reconciles;
    ensure!(
        reconciled == 0,
        "the leader reconciled {reconciled} time(s) in {QUIET_WINDOW:?} with nothing changing"
    );
    ops[0].signal("KILL");
    ops[0].wait_exit(Duration::from_secs(10));
    let killed = Instant::now();
    reaper
        .wait_scaled_to_zero(
            "the cut-off peer to scale the pod of the dead leader to 0",
            Duration::from_secs(20),
        )
        .await?;
    eprintln!(
        "cut-off peer scaled down {:.1?} after the leader was killed",
        killed.elapsed()
    );
    Ok(())
}
