//! `reaper-operator run`: wires the lease store, the controller, the NOTIFY listener
//! and the probes together, and hands every lease over on shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use kube::runtime::events::Reporter;
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Client};
use tokio::sync::{mpsc, watch};

use crate::config::Schema;
use crate::http::{self, Health};
use crate::kube_client;
use crate::lease::{LeaseStore, NOTIFY_CHANNEL};
use crate::metrics::Metrics;
use crate::reaper::Reaper;
use crate::reaper::candidates::{Candidates, FENCE_CALL_TIMEOUT};
use crate::reaper::events::Events;
use crate::reaper::reconcile::{self, Context};
use crate::reaper::{handover, presence, reports, watches};

/// Validated settings of `run`.
#[derive(Clone, Debug)]
pub struct Settings {
    pub database_url: String,
    pub listen_database_url: Option<String>,
    pub schema: Schema,
    pub cluster: String,
    pub identity: String,
    pub http_addr: SocketAddr,
    pub migrate: bool,
    pub shutdown_timeout: Duration,
    /// Bound of one Kubernetes API call, until its response begins.
    pub kube_api_timeout: Duration,
    pub namespace: Option<String>,
    pub lease_scope: crate::reaper::LeaseScope,
}

impl Settings {
    pub fn holder(&self) -> String {
        format!("{}/{}", self.cluster, self.identity)
    }
}

/// Connections of the electors' pool: one batched renew and one batched read per retry
/// period, plus acquires and releases.
const LEASE_POOL_SIZE: u32 = 3;

/// Runs until `stop` flips to true, then hands over every held lease.
///
/// The probes answer from the first moment: `/healthz` while the process is alive,
/// `/readyz` only once the database answers and the controller's caches are synced. A
/// database or API server that is down at start leaves the replica running and unready
/// (it retries, with a log line per attempt), never crash-looping.
pub async fn run(settings: Settings, stop: watch::Receiver<bool>) -> anyhow::Result<()> {
    let stopped = {
        let stop = stop.clone();
        move || {
            let mut stop = stop.clone();
            async move {
                let _ = stop.wait_for(|s| *s).await;
            }
        }
    };
    let health = Arc::new(Health::default());
    health.beat();
    health.set_starting(Some("starting"));
    let metrics = Arc::new(Metrics::default());
    let listener = http::bind(settings.http_addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on --http-addr {}: {e}", settings.http_addr))?;
    let http = tokio::spawn(http::serve(
        listener,
        health.clone(),
        metrics.clone(),
        stopped(),
    ));

    // At most the smallest retry period a Reaper may have, so no call outlives a tick.
    let call_timeout = Duration::from_secs(1);
    let store =
        LeaseStore::connect_lazy(&settings.database_url, &settings.schema, call_timeout, 8)?;
    let heartbeat = tokio::spawn(heartbeat(health.clone(), store.clone()));
    let started = start(&settings, &store, &health, stop.clone()).await;
    let (client, kube_config) = match started {
        Ok(Some(started)) => started,
        Ok(None) | Err(_) => {
            // Stopped during start-up, or a configuration that can never work: exit now
            // (with the reason), not when a signal would stop the HTTP server.
            heartbeat.abort();
            http.abort();
            return started.map(|_| ());
        }
    };
    health.set_starting(None);

    let holder = settings.holder();
    let events = Events::spawn(
        client.clone(),
        Reporter {
            controller: "reaper-operator".into(),
            instance: Some(holder.clone()),
        },
    );
    let (trigger_tx, trigger_rx) = mpsc::unbounded_channel::<ObjectRef<Reaper>>();
    // The electors get connections of their own: with many Reapers the reconciles'
    // reads and reports could otherwise queue the batched renew behind them in the pool
    // until a leader misses its deadline.
    let lease_store = LeaseStore::connect_lazy(
        &settings.database_url,
        &settings.schema,
        call_timeout,
        LEASE_POOL_SIZE,
    )?;
    let candidates = Candidates::new(
        lease_store,
        holder.clone(),
        trigger_tx,
        events.clone(),
        kube_client::unpooled(&kube_config, FENCE_CALL_TIMEOUT)?,
        metrics.clone(),
    );
    let watches = watches::watches(&client, settings.namespace.as_deref());
    // The replicas of one installation share its namespace (the service account's in a
    // pod, the kubeconfig context's outside one): that is where they find each other.
    let presence_namespace = client.default_namespace().to_owned();
    let presences = Arc::new(presence::Presences::default());
    let own_presence = presence::Presence::new(
        client.clone(),
        &presence_namespace,
        &settings.identity,
        &holder,
    );
    let ctx = Arc::new(Context {
        presences: presences.clone(),
        caches: watches.caches.clone(),
        report_lock: Default::default(),
        client,
        store: store.clone(),
        cluster: settings.cluster.clone(),
        holder: holder.clone(),
        candidates: candidates.clone(),
        events,
        shutdown_timeout: settings.shutdown_timeout,
        namespace: settings.namespace.clone(),
        metrics: metrics.clone(),
        lease_scope: settings.lease_scope,
        reapers: Default::default(),
        reapers_synced: Default::default(),
    });
    tracing::info!(%holder, schema = %settings.schema, "starting");

    let background = [
        heartbeat,
        tokio::spawn(listen(
            settings
                .listen_database_url
                .clone()
                .unwrap_or_else(|| settings.database_url.clone()),
            candidates.clone(),
        )),
        tokio::spawn(reports::refresh(ctx.clone())),
        tokio::spawn(presence::watch(
            ctx.client.clone(),
            presence_namespace.clone(),
            presences,
        )),
        tokio::spawn(
            own_presence
                .clone()
                .renew(candidates.clone(), metrics.clone()),
        ),
    ];
    let ready_health = health.clone();
    reconcile::run(ctx.clone(), watches, trigger_rx, stopped(), move || {
        ready_health.caches_synced.store(true, Ordering::Relaxed)
    })
    .await;

    tracing::info!("shutting down: handing over held leases");
    let _ = tokio::time::timeout(
        settings.shutdown_timeout + Duration::from_secs(5),
        handover::hand_over_all(&ctx),
    )
    .await;
    for task in background {
        task.abort();
    }
    own_presence.withdraw().await;
    if let Ok(Err(error)) = http.await {
        tracing::warn!(%error, "HTTP server failed");
    }
    tracing::info!("stopped");
    Ok(())
}

/// What must hold before the controller starts: the migrations applied (with
/// `--migrate`), a Kubernetes client, and the Reaper CRD listable. Transient failures
/// are retried until `stop`; `Ok(None)` means stopped while waiting. Only what can never
/// work (a non-UTF8 database, no Kubernetes configuration) is an error.
async fn start(
    settings: &Settings,
    store: &LeaseStore,
    health: &Health,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<Option<(Client, kube::Config)>> {
    if settings.migrate {
        health.set_starting(Some("applying database migrations"));
        let mut retry = Backoff::default();
        loop {
            // Bounded and abandoned on stop: sqlx waits for its migration lock without a
            // timeout (another migrating process, or a lock leaked by a pooler).
            let attempt = tokio::select! {
                result = tokio::time::timeout(START_ATTEMPT_TIMEOUT, store.migrate()) => result,
                _ = stop.wait_for(|s| *s) => return Ok(None),
            };
            match attempt {
                Ok(Ok(())) => break,
                Ok(Err(crate::Error::Config(reason))) => anyhow::bail!(reason),
                Ok(Err(error)) => {
                    tracing::warn!(%error, "cannot apply migrations yet; retrying (use --no-migrate to skip)");
                }
                Err(_) => tracing::warn!(
                    "migrations did not finish within {}s: another process may hold the migration lock \
                     (a migrating replica, or a pooled connection through PgBouncer in transaction mode: \
                     migrations need a direct URL); retrying",
                    START_ATTEMPT_TIMEOUT.as_secs()
                ),
            }
            if !retry.wait(&mut stop).await {
                return Ok(None);
            }
        }
    }
    // Without migrations nothing is awaited here: `reaper-operator migrate` already
    // refused a database it cannot work with, and the first statements tell the rest.

    let (client, config) = kube_client::infer(settings.kube_api_timeout).await?;
    let reapers: Api<Reaper> = match &settings.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    health.set_starting(Some("waiting for the Kubernetes API (reapers.pglease.dev)"));
    let mut retry = Backoff::default();
    let first = kube::api::ListParams::default().limit(1);
    loop {
        let listed = tokio::select! {
            result = tokio::time::timeout(
                START_ATTEMPT_TIMEOUT,
                reapers.list(&first),
            ) => result,
            _ = stop.wait_for(|s| *s) => return Ok(None),
        };
        match listed {
            Ok(Ok(_)) => return Ok(Some((client, config))),
            Ok(Err(error)) => tracing::error!(
                %error,
                "cannot list reapers.pglease.dev (is the CRD installed and RBAC granted?); retrying"
            ),
            Err(_) => tracing::error!(
                "listing reapers.pglease.dev did not answer within {}s; retrying",
                START_ATTEMPT_TIMEOUT.as_secs()
            ),
        }
        if !retry.wait(&mut stop).await {
            return Ok(None);
        }
    }
}

/// Longest a start-up attempt (migrations, the first list of Reapers) may take.
const START_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(30);

/// Doubling delays from 1 s to 30 s between start-up attempts.
struct Backoff(Duration);

impl Default for Backoff {
    fn default() -> Self {
        Self(Duration::from_secs(1))
    }
}

impl Backoff {
    /// Sleeps the next delay; false when `stop` flipped meanwhile.
    async fn wait(&mut self, stop: &mut watch::Receiver<bool>) -> bool {
        let delay = self.0;
        self.0 = (self.0 * 2).min(Duration::from_secs(30));
        tokio::select! {
            _ = tokio::time::sleep(delay) => true,
            _ = stop.wait_for(|s| *s) => false,
        }
    }
}

async fn heartbeat(health: Arc<Health>, store: LeaseStore) {
    let mut interval = tokio::time::interval(Duration::from_secs(2));
    loop {
        interval.tick().await;
        health.beat();
        let ok = store.ping().await.is_ok();
        health.database_ok.store(ok, Ordering::Relaxed);
    }
}

/// Wakes electors when a lease is acquired or released anywhere. Needs a direct
/// connection (LISTEN does not work through PgBouncer in transaction mode); without
/// it, standbys still notice on their next tick.
async fn listen(url: String, candidates: Candidates) {
    const FIRST_RETRY: Duration = Duration::from_secs(1);
    let mut delay = FIRST_RETRY;
    loop {
        let mut connected = false;
        let result = async {
            let mut listener = crate::lease::connect::listener(&url).await?;
            listener.listen(NOTIFY_CHANNEL).await?;
            connected = true;
            tracing::info!("listening for lease notifications");
            loop {
                let notification = listener.recv().await?;
                candidates.wake_lease(notification.payload());
            }
            #[allow(unreachable_code)]
            Ok::<(), sqlx::Error>(())
        }
        .await;
        if let Err(error) = result {
            tracing::debug!(%error, "lease notification listener failed; retrying");
        }
        // Back off only while connecting keeps failing; a listener that was up starts
        // over, so each outage costs at most a second of wake-ups after it heals.
        if connected {
            delay = FIRST_RETRY;
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(30));
    }
}
