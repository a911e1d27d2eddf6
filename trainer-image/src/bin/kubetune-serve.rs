//! `kubetune-serve`: parses flags, sets up logging, loads the checkpoint and serves it
//! with vLLM's adapter API until SIGTERM or Ctrl-C (see `kubetune_trainer::serve`).

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser as _;
use kubetune_trainer::serve::{AppState, LogFormat, ServeArgs, load_engine, serve};

fn main() -> ExitCode {
    let args = ServeArgs::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter);
    match args.log_format {
        LogFormat::Json => logs.json().init(),
        LogFormat::Text => logs.init(),
    }
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = %err, "failed");
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: ServeArgs) -> anyhow::Result<()> {
    let engine = Arc::new(load_engine(&args)?);
    tracing::info!(
        model = %args.model,
        served_model_name = engine.base_name(),
        max_model_len = engine.max_model_len(),
        "loaded base model"
    );
    let state = AppState::new(engine, usize::from(args.max_num_seqs));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(serve(
        state,
        &args.host,
        args.port,
        |addr| tracing::info!(%addr, "listening"),
        shutdown_signal(),
    ))?;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
    tracing::info!("shutting down");
}
