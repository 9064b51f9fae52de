//! Liveness and readiness, and the HTTP endpoints that report them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;

/// What each worker last saw of the database and the broker.
#[derive(Debug)]
pub struct Health {
    database: Vec<AtomicBool>,
    broker: Vec<AtomicBool>,
    started: AtomicBool,
}

impl Health {
    pub(crate) fn new(workers: usize) -> Self {
        Health {
            database: (0..workers).map(|_| AtomicBool::new(false)).collect(),
            broker: (0..workers).map(|_| AtomicBool::new(false)).collect(),
            started: AtomicBool::new(false),
        }
    }

    pub(crate) fn set_started(&self) {
        self.started.store(true, Ordering::Relaxed);
    }

    pub(crate) fn set_database(&self, worker: usize, up: bool) {
        self.database[worker].store(up, Ordering::Relaxed);
    }

    pub(crate) fn set_broker(&self, worker: usize, up: bool) {
        self.broker[worker].store(up, Ordering::Relaxed);
    }

    /// Whether every worker reaches the database.
    pub fn database_up(&self) -> bool {
        self.started.load(Ordering::Relaxed)
            && self.database.iter().all(|b| b.load(Ordering::Relaxed))
    }

    /// Whether every worker has a usable broker channel.
    pub fn broker_up(&self) -> bool {
        self.started.load(Ordering::Relaxed)
            && self.broker.iter().all(|b| b.load(Ordering::Relaxed))
    }
}

#[derive(Clone)]
struct AppState {
    health: Arc<Health>,
    metrics: Option<PrometheusHandle>,
}

/// Serves `/healthz`, `/readyz` and `/metrics` until `cancel` fires.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    health: Arc<Health>,
    metrics: Option<PrometheusHandle>,
    cancel: CancellationToken,
) {
    let app = Router::new()
        .route("/healthz", get(|| async { "alive\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .with_state(AppState { health, metrics });
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(cancel.cancelled_owned())
        .await
    {
        tracing::error!(error = %e, "health endpoint failed");
    }
}

/// Binds the health endpoint's address.
pub(crate) async fn bind(addr: SocketAddr) -> crate::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| crate::Error::Config {
            field: "http_addr",
            reason: format!("cannot listen on {addr}: {e}"),
        })
}

async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let database = state.health.database_up();
    let broker = state.health.broker_up();
    let body = serde_json::json!({
        "ready": database && broker,
        "database": if database { "up" } else { "down" },
        "broker": if broker { "up" } else { "down" },
    })
    .to_string();
    let status = if database && broker {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, [("content-type", "application/json")], body)
}

async fn render_metrics(State(state): State<AppState>) -> impl IntoResponse {
    match state.metrics {
        Some(handle) => (
            StatusCode::OK,
            [("content-type", "text/plain; version=0.0.4")],
            handle.render(),
        ),
        None => (
            StatusCode::NOT_FOUND,
            [("content-type", "text/plain")],
            "no metrics recorder installed\n".to_owned(),
        ),
    }
}
