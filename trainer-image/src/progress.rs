//! Live progress of a run, served over HTTP for the operator and for people.
//!
//! - `GET /progress`: JSON `{"phase", "step", "totalSteps", "epoch", "loss", "evalLoss",
//!   "baseEvalLoss", "tokensPerSecond", "etaSeconds", "metrics"}` (camelCase, as the
//!   operator's `status.progress`; `metrics` holds DPO's `rewards/chosen`,
//!   `rewards/rejected`, `accuracy` and `margin`, and is absent for other methods).
//! - `GET /metrics`: the same figures in Prometheus' text format.
//! - `GET /healthz`: `ok` while the process runs.

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

use crate::error::{Error, Result};

/// A snapshot of a run's progress: the type the operator reads, shared through the
/// operator↔trainer contract.
pub use kubetune_crds::training::contract::ProgressReport as Progress;

/// Progress shared between the training thread and the HTTP server.
pub type SharedProgress = Arc<Mutex<Progress>>;

/// Updates the shared progress (a poisoned lock only means a panicked writer; the data
/// is still a valid snapshot).
pub fn update(progress: &SharedProgress, f: impl FnOnce(&mut Progress)) {
    let mut guard = progress
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    f(&mut guard);
}

fn snapshot(progress: &SharedProgress) -> Progress {
    progress
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .clone()
}

/// The Prometheus exposition of a snapshot.
pub fn prometheus_text(p: &Progress) -> String {
    let mut out = String::new();
    let mut gauge = |name: &str, help: &str, value: Option<f64>| {
        if let Some(value) = value {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}\n"
            ));
        }
    };
    gauge(
        "kubetune_trainer_step",
        "Completed optimizer steps.",
        Some(p.step as f64),
    );
    gauge(
        "kubetune_trainer_total_steps",
        "Optimizer steps of the run.",
        Some(p.total_steps as f64),
    );
    gauge(
        "kubetune_trainer_epoch",
        "Fractional epochs completed.",
        Some(p.epoch),
    );
    gauge(
        "kubetune_trainer_loss",
        "Mean training loss of the last step.",
        p.loss,
    );
    gauge(
        "kubetune_trainer_eval_loss",
        "Eval loss of the tuned model.",
        p.eval_loss,
    );
    gauge(
        "kubetune_trainer_base_eval_loss",
        "Eval loss of the base model.",
        p.base_eval_loss,
    );
    gauge(
        "kubetune_trainer_tokens_per_second",
        "Training tokens per second in this attempt.",
        Some(p.tokens_per_second),
    );
    gauge(
        "kubetune_trainer_eta_seconds",
        "Estimated seconds to the end of training.",
        p.eta_seconds,
    );
    if !p.metrics.is_empty() {
        out.push_str(
            "# HELP kubetune_trainer_metric Method-specific figures of the last step (DPO rewards, accuracy, margin).\n# TYPE kubetune_trainer_metric gauge\n",
        );
        for (name, value) in &p.metrics {
            out.push_str(&format!(
                "kubetune_trainer_metric{{name=\"{name}\"}} {value}\n"
            ));
        }
    }
    out
}

async fn progress_json(State(progress): State<SharedProgress>) -> impl IntoResponse {
    axum::Json(snapshot(&progress))
}

async fn metrics(State(progress): State<SharedProgress>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        prometheus_text(&snapshot(&progress)),
    )
}

/// The router serving `/progress`, `/metrics` and `/healthz`.
pub fn router(progress: SharedProgress) -> Router {
    Router::new()
        .route("/progress", get(progress_json))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(progress)
}

/// Binds `addr` and serves until the process ends.
pub async fn serve(addr: &str, progress: SharedProgress) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Serve {
            addr: addr.to_owned(),
            source,
        })?;
    axum::serve(listener, router(progress))
        .await
        .map_err(|source| Error::Serve {
            addr: addr.to_owned(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_text_has_a_gauge_per_known_figure() {
        let text = prometheus_text(&Progress {
            step: 3,
            total_steps: 10,
            loss: Some(1.5),
            ..Progress::default()
        });
        assert!(text.contains("kubetune_trainer_step 3\n"));
        assert!(text.contains("kubetune_trainer_loss 1.5\n"));
        assert!(
            !text.contains("kubetune_trainer_eval_loss "),
            "unknown figures are omitted"
        );
        let dpo = prometheus_text(&Progress {
            metrics: std::collections::BTreeMap::from([("rewards/chosen".to_owned(), 0.25)]),
            ..Progress::default()
        });
        assert!(dpo.contains("kubetune_trainer_metric{name=\"rewards/chosen\"} 0.25\n"));
        assert!(!text.contains("kubetune_trainer_metric"));
    }
}
