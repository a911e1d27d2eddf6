//! `kubetune-operator`: parses flags, sets up logging and metrics, and runs the
//! controllers from the library.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use kubetune_operator::finetunejob::controller::{self, Settings};
use kubetune_operator::metrics::Metrics;
use kubetune_operator::server::{self, Shared};
use prometheus_client::registry::Registry;
use tracing_subscriber::EnvFilter;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    /// One JSON object per line, for log pipelines.
    Json,
    /// Human-readable lines.
    Text,
}

/// The kubetune operator: runs FineTuneJobs as trainer pods.
#[derive(Debug, Parser)]
#[command(version)]
struct Flags {
    /// The trainer image for FineTuneJobs that don't name one.
    #[arg(
        long,
        env = "KUBETUNE_TRAINER_IMAGE",
        default_value = "kubetune/trainer:latest"
    )]
    trainer_image: String,

    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "KUBETUNE_NAMESPACE")]
    namespace: Option<String>,

    /// Where /healthz, /readyz and /metrics are served.
    #[arg(long, env = "KUBETUNE_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,

    /// Seconds between resyncs of a job nothing happens to.
    #[arg(long, env = "KUBETUNE_RESYNC_SECONDS", default_value_t = 300)]
    resync_seconds: u64,

    /// Log format.
    #[arg(long, env = "KUBETUNE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Json)]
    log_format: LogFormat,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let flags = Flags::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    match flags.log_format {
        LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init(),
        LogFormat::Text => tracing_subscriber::fmt().with_env_filter(filter).init(),
    }

    // In cluster: the pod's service account; out of cluster: KUBECONFIG or ~/.kube/config.
    let client = kube::Client::try_default()
        .await
        .context("failed to build a Kubernetes client")?;

    let mut registry = Registry::default();
    let metrics = Arc::new(Metrics::register(&mut registry));
    let shared = Arc::new(Shared {
        registry,
        ready: AtomicBool::new(false),
    });
    let server = tokio::spawn(server::serve(flags.metrics_addr, shared.clone()));

    shared.ready.store(true, Ordering::Relaxed);
    let settings = Settings {
        trainer_image: flags.trainer_image,
        resync: Duration::from_secs(flags.resync_seconds),
    };
    tokio::select! {
        () = controller::run(client, flags.namespace, settings, metrics) => {}
        result = server => {
            result
                .context("the metrics server stopped")?
                .context("failed to serve metrics")?;
        }
    }
    Ok(())
}
