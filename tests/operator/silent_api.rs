//! Faults between the operator and its API server.
//!
//! A partition that ends with every connection open during it dead but not reset (a
//! restarted load balancer, a NAT entry dropped): the calls sent on them get no answer,
//! ever, while new connections work. With the database cut off too, the leader's fence
//! fires during the partition; once it heals, the scale-down must get through on a new
//! connection within a few seconds. Fails on an operator whose API calls have no bound
//! (the fence and the reconcile wait on dead connections for good, and the workload
//! keeps running) and on one whose fence waits for an unanswered call to end before it
//! sends another.
//!
//! Watches behind the operator's own writes (a slow watch, a loaded API server): a
//! database hiccup shorter than the renew deadline turns the status Degraded and back.
//! The way back must be written although the Reaper cache still shows the status from
//! before the hiccup. Fails on an operator that takes "the cache shows it" for "it is
//! written": the status stays Degraded until the next resync, minutes later.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use reaper_operator::reaper::{LeaseSpec, Phase};
use serde_json::json;

use super::support::cluster::wait_until;
use super::support::fixtures::{create_deployment, create_reaper};
use super::support::operator::{OperatorProcess, OperatorSpec};
use super::support::proxy::{FaultProxy, Mode};
use super::{
    Cluster, DEADLINE, at, condition, database_proxy, lease_spec, namespace, schema, suffix,
};

pub async fn fence_gets_through_a_silent_api_connection(clusters: &[Cluster; 2]) -> Result<()> {
    let c = &clusters[0];
    let (schema, _store) = schema().await?;
    let ns = namespace(&c.client, "silent-api").await?;
    let lease_name = format!("{ns}.silent-{}", suffix());
    let reaper = at(&c.client, &ns, "reaper");
    let Proxied {
        db: db_proxy,
        api: api_proxy,
        op: _op,
    } = behind_proxies(c, &ns, schema.as_str(), lease_spec(&lease_name)).await?;
    reaper
        .wait_replicas((1, 1), Duration::from_secs(30))
        .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    api_proxy.set(Mode::Blackhole);
    db_proxy.set(Mode::Blackhole);
    // Past the renew deadline: the fence has fired and its call is out.
    tokio::time::sleep(Duration::from_secs(DEADLINE) + Duration::from_millis(500)).await;
    let dead = api_proxy.stall_open();
    api_proxy.set(Mode::Pass);
    let healed = Instant::now();
    eprintln!("API partition healed; {dead} connections stay dead");
    ensure!(dead > 0, "no connection to the API server was open to kill");
    // Generous against the half second a fence needs, and short of the 10 s after
    // which the fence's client ends a call: only a fence that sends another call
    // beside an unanswered one gets through in time.
    reaper
        .wait_scaled_to_zero(
            "the leader to scale down through a new connection",
            Duration::from_secs(5),
        )
        .await?;
    eprintln!(
        "scaled to 0 {:.2?} after the partition healed",
        healed.elapsed()
    );
    Ok(())
}

pub async fn status_is_written_back_while_watches_lag(clusters: &[Cluster; 2]) -> Result<()> {
    let c = &clusters[0];
    let (schema, _store) = schema().await?;
    let ns = namespace(&c.client, "lagging-watch").await?;
    let lease_name = format!("{ns}.lagging-{}", suffix());
    let reaper = at(&c.client, &ns, "reaper");
    // A renew deadline far beyond the hiccup: the leader keeps its lease and its pod.
    let lease = LeaseSpec {
        name: Some(lease_name),
        ttl_seconds: 15,
        renew_deadline_seconds: 10,
        retry_period_seconds: 1,
        handover_delay_seconds: 0,
    };
    let Proxied {
        db: db_proxy,
        api: api_proxy,
        op,
    } = behind_proxies(c, &ns, schema.as_str(), lease).await?;
    // Read straight from the API server, not through the proxy.
    let phase_is = |want: Phase| {
        let (client, ns) = (&c.client, &ns);
        move || async move {
            let s = at(client, ns, "reaper").status().await?;
            Ok((s.phase == Some(want)).then_some(s))
        }
    };
    reaper
        .wait_replicas((1, 1), Duration::from_secs(30))
        .await?;
    // Leading with its pod ready, and that write seen by the operator's watch before
    // the watches are held: otherwise the status after the hiccup (1/1) differs
    // from the cache (0/1) and even a cache-only rule writes it.
    wait_until(
        "the status to show the lease held and the pod ready",
        Duration::from_secs(10),
        || async {
            let s = reaper.status().await?;
            let ready = condition(&s, "Ready").is_some_and(|r| r.status == "True");
            Ok(
                (s.phase == Some(Phase::Leading) && s.ready.as_deref() == Some("1/1") && ready)
                    .then_some(()),
            )
        },
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    api_proxy.set(Mode::HoldPushes);
    db_proxy.set(Mode::Reset);
    let cut = Instant::now();
    // Well within the renew deadline (10 s), so the lease is never lost.
    wait_until(
        "the status to show the database failing",
        Duration::from_secs(6),
        phase_is(Phase::Degraded),
    )
    .await?;
    db_proxy.set(Mode::Pass);
    let healed = Instant::now();
    eprintln!("Degraded written {:.2?} after the cut", healed - cut);
    let back = wait_until(
        "the status to show the lease held again, its watches still held back",
        Duration::from_secs(10),
        phase_is(Phase::Leading),
    )
    .await?;
    eprintln!(
        "Leading written {:.2?} after the database answered again",
        healed.elapsed()
    );
    ensure!(
        back.holder.as_deref() == Some(op.holder().as_str()),
        "the status names {:?} as the holder, not {}",
        back.holder,
        op.holder()
    );
    ensure!(
        reaper.replicas().await?.0 == 1,
        "the leader stopped its pod over a hiccup shorter than its renew deadline"
    );
    api_proxy.set(Mode::Pass);
    Ok(())
}

/// A Reaper with its Deployment in `ns`, and an operator that reaches the database and
/// the API server through fault proxies of their own.
struct Proxied {
    db: FaultProxy,
    api: ApiProxy,
    op: OperatorProcess,
}

async fn behind_proxies(c: &Cluster, ns: &str, schema: &str, lease: LeaseSpec) -> Result<Proxied> {
    create_deployment(&c.client, ns, "reaper", "Recreate", json!({})).await?;
    create_reaper(&c.client, ns, "reaper", "reaper", lease).await?;
    let (db, via_db_proxy) = database_proxy().await?;
    let api = api_proxy(c).await?;
    let op = OperatorProcess::start(OperatorSpec {
        kubeconfig: &api.kubeconfig,
        database_url: &via_db_proxy,
        listen_database_url: None,
        schema,
        cluster: c.name,
        identity: "op-1",
        migrate: false,
        namespace: ns,
    });
    Ok(Proxied { db, api, op })
}

/// A fault proxy in front of the API server, and the kubeconfig copy that points at it
/// (removed with it).
struct ApiProxy {
    proxy: FaultProxy,
    kubeconfig: PathBuf,
}

impl std::ops::Deref for ApiProxy {
    type Target = FaultProxy;

    fn deref(&self) -> &FaultProxy {
        &self.proxy
    }
}

impl Drop for ApiProxy {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.kubeconfig);
    }
}

/// A fault proxy in front of the cluster's API server, and a copy of its kubeconfig
/// that points at the proxy (the server's certificate names 127.0.0.1).
async fn api_proxy(c: &Cluster) -> Result<ApiProxy> {
    let path = c.test.kubeconfig();
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    let server = text
        .lines()
        .find_map(|line| line.trim().strip_prefix("server: https://"))
        .with_context(|| format!("no https server in {}", path.display()))?
        .trim()
        .to_owned();
    let proxy = FaultProxy::start(server.clone()).await;
    let via_proxy = std::env::temp_dir().join(format!(
        "reaper-silent-api-{}-{}.kubeconfig",
        std::process::id(),
        suffix()
    ));
    std::fs::write(
        &via_proxy,
        text.replace(
            &format!("https://{server}"),
            &format!("https://127.0.0.1:{}", proxy.port),
        ),
    )?;
    Ok(ApiProxy {
        proxy,
        kubeconfig: via_proxy,
    })
}
