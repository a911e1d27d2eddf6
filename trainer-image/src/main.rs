//! `kubetune-trainer`: parses flags, sets up JSON logging, runs the library, and maps
//! the outcome to the exit-code contract documented in the library's crate docs.

use clap::Parser as _;
use kubetune_crds::training::contract::TrainerResult;
use kubetune_trainer::cli::{Cli, Command, run_eval, run_import_gguf, run_train};
use kubetune_trainer::{exit_code, write_termination_log};

fn main() {
    kubetune_trainer::tune_allocator();
    tracing_subscriber::fmt()
        .json()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            // A usage error is invalid input too (clap exits 2); `--help` is not.
            if err.use_stderr() {
                write_termination_log(&err.to_string());
            }
            err.exit()
        }
    };
    let code = match launch_or_run(cli) {
        Ok(()) => 0,
        Err(err) => {
            let code = match err.downcast_ref::<kubetune_trainer::Error>() {
                Some(trainer_err) => {
                    if trainer_err.is_invalid_input() {
                        write_termination_log(&trainer_err.to_string());
                    }
                    tracing::error!(error = %trainer_err, category = trainer_err.category(), "failed");
                    exit_code(trainer_err)
                }
                None => {
                    tracing::error!(error = %err, "failed");
                    kubetune_trainer::EXIT_RETRYABLE
                }
            };
            eprintln!("error: {err}");
            code
        }
    };
    std::process::exit(code);
}

/// Runs the command, or, in a pod that runs several ranks, launches them
/// (`kubetune_trainer::launch`) and exits with the code the pod should report.
fn launch_or_run(cli: Cli) -> anyhow::Result<()> {
    if matches!(cli.command, Command::Train(_))
        && let Some(pod) = kubetune_trainer::launch::launcher_from_env()?
    {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let code = runtime.block_on(kubetune_trainer::launch::run(pod))?;
        std::process::exit(code);
    }
    run(cli)
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Eval(args) => {
            let report = run_eval(&args)?;
            println!("{}", serde_json::to_string(&report)?);
        }
        Command::ImportGguf(args) => {
            let started = std::time::Instant::now();
            let summary = run_import_gguf(&args)?;
            tracing::info!(seconds = started.elapsed().as_secs_f64(), "imported GGUF");
            println!("{}", serde_json::to_string(&summary)?);
        }
        Command::Train(args) => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()?;
            let summary = runtime.block_on(run_train(*args))?;
            if !summary.primary {
                // Rank 0 wrote the outputs and reports the result for the gang.
                runtime.shutdown_background();
                return Ok(());
            }
            // The operator reads this from the pod's termination message.
            let result = serde_json::to_string(&TrainerResult {
                adapter_sha256: summary.adapter.sha256,
                adapter_size_bytes: summary.adapter.size_bytes,
                base_eval_loss: summary.base_eval_loss,
                eval_loss: summary.eval_loss,
                steps: summary.steps,
            })?;
            write_termination_log(&result);
            println!("{result}");
            // The runtime's server task never ends; do not wait for it.
            runtime.shutdown_background();
        }
    }
    Ok(())
}
