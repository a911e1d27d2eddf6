//! `kubetune-operator`: parses flags, sets up logging and metrics, and runs the
//! controllers from the library.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use kube::Api;
use kubetune_operator::adapterdeployment;
use kubetune_operator::cost::TableSource;
use kubetune_operator::finetunejob::controller::{self, Settings};
use kubetune_operator::leader::Elector;
use kubetune_operator::metrics::Metrics;
use kubetune_operator::server::{self, Shared};
use prometheus_client::registry::Registry;
use std::io::IsTerminal;
use tracing_subscriber::EnvFilter;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    /// One JSON object per line, for log pipelines.
    Json,
    /// Human-readable lines.
    Text,
}

/// The kubetune operator: runs FineTuneJobs as trainer pods and rolls trained adapters
/// into serving pods (AdapterDeployments).
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

    /// Watch only these namespaces, comma-separated or repeated (default: all).
    #[arg(long = "namespace", env = "KUBETUNE_NAMESPACES", value_delimiter = ',')]
    namespaces: Vec<String>,

    /// Where /healthz, /readyz and /metrics are served.
    #[arg(long, env = "KUBETUNE_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,

    /// Seconds between resyncs of a job nothing happens to.
    #[arg(long, env = "KUBETUNE_RESYNC_SECONDS", default_value_t = 300)]
    resync_seconds: u64,

    /// Least seconds between two reads of a running trainer's progress, and so between
    /// two status writes of a job that only makes progress.
    #[arg(long, env = "KUBETUNE_PROGRESS_INTERVAL_SECONDS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..))]
    progress_interval_seconds: u64,

    /// Elect a leader through a Lease so that only one replica reconciles.
    #[arg(long, env = "KUBETUNE_LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    leader_elect: bool,

    /// Namespace of the leadership Lease (the operator's own).
    #[arg(long, env = "POD_NAMESPACE", default_value = "kubetune-system")]
    lease_namespace: String,

    /// This replica's identity in the election.
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,

    /// The ConfigMap, in the operator's namespace (--lease-namespace), holding the price
    /// table under `prices.yaml`. Without it no cost is computed.
    #[arg(long, env = "KUBETUNE_PRICE_TABLE")]
    price_table: Option<String>,

    /// Log format.
    #[arg(long, env = "KUBETUNE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Json)]
    log_format: LogFormat,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let flags = Flags::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour only for a person at a terminal: piped into a file or a log collector,
    // escape codes are noise.
    let ansi = std::io::stdout().is_terminal();
    match flags.log_format {
        LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .with_ansi(false)
            .with_env_filter(filter)
            .init(),
        LogFormat::Text => tracing_subscriber::fmt()
            .with_ansi(ansi)
            .with_env_filter(filter)
            .init(),
    }

    let mut registry = Registry::default();
    let metrics = Arc::new(Metrics::register(&mut registry));

    // In cluster: the pod's service account; out of cluster: KUBECONFIG or ~/.kube/config.
    // Every request it sends is counted (kubetune_api_requests_total).
    let config = kube::Config::infer()
        .await
        .context("failed to find a Kubernetes configuration")?;
    let client = kube::client::ClientBuilder::try_from(config)
        .context("failed to build a Kubernetes client")?
        .with_layer(&kubetune_operator::metrics::counting_layer(
            metrics.api_requests.clone(),
        ))
        .build();
    let shared = Arc::new(Shared::new(registry));
    let server = tokio::spawn(server::serve(flags.metrics_addr, shared.clone()));
    tokio::spawn(server::probe_api(
        client.clone(),
        shared.clone(),
        Duration::from_secs(5),
    ));

    // Ready means able to serve: a follower is ready too, waiting for the Lease.
    shared.ready.store(true, Ordering::Relaxed);
    let settings = Settings {
        trainer_image: flags.trainer_image,
        resync: Duration::from_secs(flags.resync_seconds),
        progress_interval: Duration::from_secs(flags.progress_interval_seconds),
        price_table: flags.price_table.map(|name| TableSource {
            namespace: flags.lease_namespace.clone(),
            name,
        }),
    };
    let controllers = {
        let finetunejobs = controller::run(
            client.clone(),
            flags.namespaces.clone(),
            settings,
            metrics.clone(),
        );
        let adapters =
            adapterdeployment::controller::run(client.clone(), flags.namespaces.clone(), metrics);
        async move {
            tokio::join!(finetunejobs, adapters);
        }
    };
    let work = async {
        if flags.leader_elect {
            let identity = flags
                .identity
                .unwrap_or_else(|| format!("kubetune-operator-{}", std::process::id()));
            let elector = Elector {
                api: Api::namespaced(client, &flags.lease_namespace),
                name: "kubetune-operator".into(),
                identity,
                lease_duration: Duration::from_secs(15),
                renew_every: Duration::from_secs(5),
            };
            elector.run(controllers).await.context("leader election")
        } else {
            controllers.await;
            Ok(())
        }
    };
    tokio::select! {
        result = work => result?,
        result = server => {
            result
                .context("the metrics server stopped")?
                .context("failed to serve metrics")?;
        }
    }
    Ok(())
}
