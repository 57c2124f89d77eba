//! One port (`--http-addr`): `/metrics` (OpenMetrics), `/healthz` (the process and its
//! loops are alive) and `/readyz` (the database answers and the caches are synced).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::metrics::Metrics;

/// Shared health flags, set by the loops they describe.
#[derive(Default)]
pub struct Health {
    pub database_ok: AtomicBool,
    pub caches_synced: AtomicBool,
    /// Unix milliseconds of the last heartbeat of the async runtime.
    pub heartbeat_ms: AtomicU64,
    /// What start-up is waiting for, until the controller runs (shown by `/readyz`).
    starting: Mutex<Option<&'static str>>,
}

/// A runtime that has not beaten for this long is reported unhealthy.
const STALL: Duration = Duration::from_secs(15);

impl Health {
    pub fn beat(&self) {
        self.heartbeat_ms.store(unix_ms(), Ordering::Relaxed);
    }

    /// Start-up is waiting for `what`; `None` once the controller runs.
    pub fn set_starting(&self, what: Option<&'static str>) {
        *self.starting.lock().unwrap_or_else(|e| e.into_inner()) = what;
    }

    fn starting(&self) -> Option<&'static str> {
        *self.starting.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn alive(&self) -> bool {
        unix_ms().saturating_sub(self.heartbeat_ms.load(Ordering::Relaxed))
            < STALL.as_millis() as u64
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

#[derive(Clone)]
struct AppState {
    health: Arc<Health>,
    metrics: Arc<Metrics>,
}

pub fn router(health: Arc<Health>, metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(AppState { health, metrics })
}

/// Binds first, so an address that cannot be used stops the process at start.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

pub async fn serve(
    listener: tokio::net::TcpListener,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(health, metrics))
        .with_graceful_shutdown(shutdown)
        .await
}

async fn metrics_text(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
}

async fn healthz(State(state): State<AppState>) -> (StatusCode, &'static str) {
    if state.health.alive() {
        (StatusCode::OK, "ok\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "the control loop is stalled\n",
        )
    }
}

async fn readyz(State(state): State<AppState>) -> (StatusCode, String) {
    let mut problems = Vec::new();
    if let Some(what) = state.health.starting() {
        problems.push(what);
    }
    if !state.health.database_ok.load(Ordering::Relaxed) {
        problems.push("database unreachable");
    }
    if !state.health.caches_synced.load(Ordering::Relaxed) {
        problems.push("Kubernetes caches not synced");
    }
    if problems.is_empty() {
        (StatusCode::OK, "ok\n".into())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{}\n", problems.join(", ")),
        )
    }
}
