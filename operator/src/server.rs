//! The operator's HTTP endpoints: `/healthz` (the process is alive), `/readyz` (the
//! controllers are running and the Kubernetes API server answers) and `/metrics`
//! (Prometheus text).
//!
//! An API server that stops answering makes the operator unready, not unhealthy: its
//! watches resume by themselves when the server is back, so a restart would only lose
//! its caches.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::text::encode;
use prometheus_client::registry::Registry;

/// What the endpoints read.
#[derive(Debug)]
pub struct Shared {
    /// The metrics registry.
    pub registry: Registry,
    /// Set once the controllers run.
    pub ready: AtomicBool,
    /// Whether the API server answered the last probe ([`probe_api`]).
    pub api_reachable: AtomicBool,
}

impl Shared {
    /// Endpoints over `registry`, not ready until the controllers run and the API
    /// server answers.
    pub fn new(registry: Registry) -> Self {
        Self {
            registry,
            ready: AtomicBool::new(false),
            api_reachable: AtomicBool::new(false),
        }
    }

    /// What `/readyz` answers.
    pub fn readiness(&self) -> (StatusCode, &'static str) {
        if !self.ready.load(Ordering::Relaxed) {
            (StatusCode::SERVICE_UNAVAILABLE, "controllers not started")
        } else if !self.api_reachable.load(Ordering::Relaxed) {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "the Kubernetes API server does not answer",
            )
        } else {
            (StatusCode::OK, "ready")
        }
    }
}

/// How long a probe of the API server may take before it counts as unanswered.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// Asks the API server for its version every `every`, recording in `shared` whether
/// it answered within [`PROBE_TIMEOUT`]. Runs until the process ends.
pub async fn probe_api(client: kube::Client, shared: Arc<Shared>, every: Duration) {
    loop {
        let answered = tokio::time::timeout(PROBE_TIMEOUT, client.apiserver_version())
            .await
            .is_ok_and(|version| version.is_ok());
        let was = shared.api_reachable.swap(answered, Ordering::Relaxed);
        if was != answered {
            if answered {
                tracing::info!("the Kubernetes API server answers again");
            } else {
                tracing::warn!("the Kubernetes API server does not answer: not ready");
            }
        }
        tokio::time::sleep(every).await;
    }
}

/// The router of the health and metrics endpoints.
pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(shared)
}

async fn readyz(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    shared.readiness()
}

async fn metrics(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    let mut text = String::new();
    match encode(&mut text, &shared.registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(error) => (StatusCode::INTERNAL_SERVER_ERROR, error.to_string()).into_response(),
    }
}

/// Serves the endpoints on `address` until the process ends.
pub async fn serve(address: SocketAddr, shared: Arc<Shared>) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(address).await?;
    axum::serve(listener, router(shared)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_needs_the_controllers_and_an_answering_api_server() {
        let shared = Shared::new(Registry::default());
        assert_eq!(shared.readiness().0, StatusCode::SERVICE_UNAVAILABLE);
        shared.ready.store(true, Ordering::Relaxed);
        assert_eq!(
            shared.readiness(),
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "the Kubernetes API server does not answer"
            )
        );
        shared.api_reachable.store(true, Ordering::Relaxed);
        assert_eq!(shared.readiness(), (StatusCode::OK, "ready"));
    }
}
