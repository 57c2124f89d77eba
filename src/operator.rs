//! `reaper-operator run`: wires the lease store, the controller, the NOTIFY listener
//! and the probes together, and hands every lease over on shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder, Retryable};
use kube::runtime::events::Reporter;
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Client};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::Schema;
use crate::http::{self, Health};
use crate::kube_client;
use crate::lease::{ClusterName, Holder, LeaseStore, NOTIFY_CHANNEL};
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
    pub cluster: ClusterName,
    /// `<cluster>/<identity>`.
    pub holder: Holder,
    pub http_addr: SocketAddr,
    pub migrate: bool,
    pub shutdown_timeout: Duration,
    /// Bound of one Kubernetes API call, until its response begins.
    pub kube_api_timeout: Duration,
    pub namespace: Option<String>,
    pub lease_scope: crate::reaper::LeaseScope,
}

/// Connections of the electors' pool: one batched renew and one batched read per retry
/// period, plus acquires and releases.
const LEASE_POOL_SIZE: u32 = 3;

/// Runs until `stop` is cancelled, then hands over every held lease.
///
/// The probes answer from the first moment: `/healthz` while the process is alive,
/// `/readyz` only once the database answers and the controller's caches are synced. A
/// database or API server that is down at start leaves the replica running and unready
/// (it retries, with a log line per attempt), never crash-looping.
pub async fn run(settings: Settings, stop: CancellationToken) -> anyhow::Result<()> {
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
        stop.clone().cancelled_owned(),
    ));

    let store =
        LeaseStore::connect_lazy(&settings.database_url, &settings.schema, CALL_TIMEOUT, 8)?;
    let heartbeat = tokio::spawn(heartbeat(health.clone(), store.clone()));
    let started = start(&settings, &store, &health, &stop).await;
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

    let watches = watches::watches(&client, settings.namespace.as_deref());
    let (ctx, trigger_rx) = context(&settings, (client, &kube_config), &watches, store, metrics)?;
    tracing::info!(holder = %ctx.holder, schema = %settings.schema, "starting");
    let own_presence = presence::Presence::new(
        ctx.client.clone(),
        ctx.client.default_namespace(),
        settings.holder.identity(),
        ctx.holder.as_str(),
    );
    let mut background = background_tasks(&settings, &ctx, &own_presence);
    background.push(heartbeat);
    let ready_health = health.clone();
    reconcile::run(
        ctx.clone(),
        watches,
        trigger_rx,
        stop.cancelled_owned(),
        move || ready_health.caches_synced.store(true, Ordering::Relaxed),
    )
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

/// Bound of one database call: at most the smallest retry period a Reaper may have, so
/// no call outlives a tick.
const CALL_TIMEOUT: Duration = Duration::from_secs(1);

/// The controller's context: its electors (with a pool of their own), Events, and the
/// presences of the replicas. The receiver gets the Reapers whose electors changed.
fn context(
    settings: &Settings,
    (client, kube_config): (Client, &kube::Config),
    watches: &watches::Watches,
    store: LeaseStore,
    metrics: Arc<Metrics>,
) -> anyhow::Result<(Arc<Context>, mpsc::UnboundedReceiver<ObjectRef<Reaper>>)> {
    let holder = settings.holder.clone();
    let events = Events::spawn(
        client.clone(),
        Reporter {
            controller: "reaper-operator".into(),
            instance: Some(holder.to_string()),
        },
    );
    let (trigger_tx, trigger_rx) = mpsc::unbounded_channel::<ObjectRef<Reaper>>();
    // The electors get connections of their own: with many Reapers the reconciles'
    // reads and reports could otherwise queue the batched renew behind them in the pool
    // until a leader misses its deadline.
    let lease_store = LeaseStore::connect_lazy(
        &settings.database_url,
        &settings.schema,
        CALL_TIMEOUT,
        LEASE_POOL_SIZE,
    )?;
    let candidates = Candidates::new(
        lease_store,
        holder.clone(),
        trigger_tx,
        events.clone(),
        kube_client::unpooled(kube_config, FENCE_CALL_TIMEOUT)?,
        metrics.clone(),
    );
    let ctx = Context {
        presences: Arc::default(),
        caches: watches.caches.clone(),
        report_lock: Default::default(),
        client,
        store,
        cluster: settings.cluster.clone(),
        holder,
        candidates,
        events,
        shutdown_timeout: settings.shutdown_timeout,
        namespace: settings.namespace.clone(),
        metrics,
        lease_scope: settings.lease_scope,
        reapers: Default::default(),
        reapers_synced: Default::default(),
    };
    Ok((Arc::new(ctx), trigger_rx))
}

/// What runs beside the controller until the handover: the NOTIFY listener, the report
/// refresher, and this replica's presence and its peers'.
fn background_tasks(
    settings: &Settings,
    ctx: &Arc<Context>,
    own_presence: &Arc<presence::Presence>,
) -> Vec<JoinHandle<()>> {
    // The replicas of one installation share its namespace (the service account's in a
    // pod, the kubeconfig context's outside one): that is where they find each other.
    let presence_namespace = ctx.client.default_namespace().to_owned();
    let listen_url = settings
        .listen_database_url
        .clone()
        .unwrap_or_else(|| settings.database_url.clone());
    vec![
        tokio::spawn(listen(listen_url, ctx.candidates.clone())),
        tokio::spawn(reports::refresh(ctx.clone())),
        tokio::spawn(presence::watch(
            ctx.client.clone(),
            presence_namespace,
            ctx.presences.clone(),
        )),
        tokio::spawn(
            own_presence
                .clone()
                .renew(ctx.candidates.clone(), ctx.metrics.clone()),
        ),
    ]
}

/// What must hold before the controller starts: the migrations applied (with
/// `--migrate`), a Kubernetes client, and the Reaper CRD listable. Transient failures
/// are retried until `stop`; `Ok(None)` means stopped while waiting. Only what can never
/// work (a non-UTF8 database, no Kubernetes configuration) is an error.
async fn start(
    settings: &Settings,
    store: &LeaseStore,
    health: &Health,
    stop: &CancellationToken,
) -> anyhow::Result<Option<(Client, kube::Config)>> {
    if settings.migrate {
        health.set_starting(Some("applying database migrations"));
        // Bounded: sqlx waits for its migration lock without a timeout (another
        // migrating process, or a lock leaked by a pooler).
        let migrate = || async {
            tokio::time::timeout(START_ATTEMPT_TIMEOUT, store.migrate())
                .await
                .unwrap_or(Err(crate::Error::Timeout(START_ATTEMPT_TIMEOUT)))
        };
        let migrated = migrate
            .retry(start_backoff())
            .when(|error| !matches!(error, crate::Error::Config(_)))
            .notify(|error, _| match error {
                crate::Error::Timeout(after) if *after == START_ATTEMPT_TIMEOUT => tracing::warn!(
                    "migrations did not finish within {}s: another process may hold the migration lock \
                     (a migrating replica, or a pooled connection through PgBouncer in transaction mode: \
                     migrations need a direct URL); retrying",
                    START_ATTEMPT_TIMEOUT.as_secs()
                ),
                error => tracing::warn!(%error, "cannot apply migrations yet; retrying (use --no-migrate to skip)"),
            });
        match stop.run_until_cancelled(migrated).await {
            None => return Ok(None),
            Some(Err(crate::Error::Config(reason))) => anyhow::bail!(reason),
            Some(result) => result?,
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
    let first = kube::api::ListParams::default().limit(1);
    let list = || async {
        tokio::time::timeout(START_ATTEMPT_TIMEOUT, reapers.list(&first))
            .await
            .map_err(|_| None)?
            .map_err(Some)
    };
    let listed = list
        .retry(start_backoff())
        .notify(|error: &Option<kube::Error>, _| match error {
            Some(error) => tracing::error!(
                %error,
                "cannot list reapers.pglease.dev (is the CRD installed and RBAC granted?); retrying"
            ),
            None => tracing::error!(
                "listing reapers.pglease.dev did not answer within {}s; retrying",
                START_ATTEMPT_TIMEOUT.as_secs()
            ),
        });
    match stop.run_until_cancelled(listed).await {
        Some(Ok(_)) => Ok(Some((client, config))),
        Some(Err(error)) => Err(anyhow::anyhow!(
            "cannot list reapers.pglease.dev: {}",
            error.map_or_else(|| "no answer".to_owned(), |e| e.to_string())
        )),
        None => Ok(None),
    }
}

/// Longest a start-up attempt (migrations, the first list of Reapers) may take.
const START_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(30);

/// Start-up attempts: doubling delays from 1 s to 30 s, for as long as it takes.
fn start_backoff() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_secs(1))
        .with_max_delay(Duration::from_secs(30))
        .without_max_times()
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
    let mut delays = start_backoff().build();
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
            delays = start_backoff().build();
        }
        let delay = delays.next().unwrap_or(Duration::from_secs(30));
        tokio::time::sleep(delay).await;
    }
}
