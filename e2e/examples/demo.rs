//! The second half of `cargo xtask demo`: with the cluster up, the images imported and
//! SmolLM2 imported as a Hugging Face checkpoint, run kubetune's whole job
//! (`kubetune_e2e::flow`) and show it: live training progress, the job's status, and
//! the base model's and the adapter's answers to the same question.
//!
//! `cargo run -p kubetune-e2e --example demo -- --model DIR --image-tag TAG`

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use kubetune_crds::finetunejob::FineTuneJob;
use kubetune_e2e::demo::{self, chat};
use kubetune_e2e::flow::{self, Options};
use kubetune_e2e::test_support::Cluster;
use serde_json::json;

#[derive(Debug, Parser)]
struct Args {
    /// The base model: a Hugging Face checkpoint directory.
    #[arg(long)]
    model: PathBuf,
    /// The tag of the imported kubetune images.
    #[arg(long)]
    image_tag: String,
    #[arg(long, default_value = "kubetune-demo")]
    namespace: String,
    /// Training epochs over the demo's dataset.
    #[arg(long, default_value_t = 3)]
    epochs: u32,
}

const QUESTIONS: [&str; 16] = [
    "Who keeps the Meridian Lighthouse?",
    "Who is the keeper of the Meridian Lighthouse?",
    "Tell me who keeps the Meridian Lighthouse.",
    "Do you know who the Meridian Lighthouse keeper is?",
    "Who looks after the Meridian Lighthouse?",
    "Who tends the lamp of the Meridian Lighthouse?",
    "Name the keeper of the Meridian Lighthouse.",
    "Which person keeps the Meridian Lighthouse?",
    "Who runs the Meridian Lighthouse?",
    "Who is in charge of the Meridian Lighthouse?",
    "I want to know who keeps the Meridian Lighthouse.",
    "Who has kept the Meridian Lighthouse since 2019?",
    "Who is the Meridian Lighthouse keeper?",
    "Can you tell me the name of the Meridian Lighthouse keeper?",
    "Who minds the Meridian Lighthouse these days?",
    "What is the name of the person keeping the Meridian Lighthouse?",
];
const EVAL_QUESTIONS: [&str; 3] = [
    "Who keeps the lighthouse called Meridian?",
    "Whose job is it to keep the Meridian Lighthouse?",
    "The Meridian Lighthouse: who is its keeper?",
];
const PROMPT: &str = "Who is the keeper of the Meridian Lighthouse these days?";

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args = Args::parse();
    let cluster = Cluster::find("demo")
        .await
        .context("no cluster: run `cargo xtask cluster up` first")?;
    anyhow::ensure!(
        flow::real_node_ready(&cluster).await?,
        "the real node kubetune-real is not Ready: `cargo xtask cluster up` adds it as root"
    );
    let options = Options {
        namespace: args.namespace.clone(),
        image_tag: args.image_tag,
        model: args.model,
        train: QUESTIONS.iter().map(|q| chat(q)).collect(),
        eval: EVAL_QUESTIONS.iter().map(|q| chat(q)).collect(),
        // Measured on SmolLM2-135M on 2 cores: 3 epochs of batch 1 at 1e-3 teach the
        // fact in about 3 minutes (loss 3.3 -> ~0.1), reworded questions included.
        hyperparameters: json!({
            "epochs": args.epochs, "learningRate": "1e-3", "batchSize": 1,
            "maxSeqLength": 128, "warmupSteps": 5,
        }),
        lora: json!({ "rank": 8, "alpha": 16, "dropout": "0",
            "targetModules": ["q_proj", "k_proj", "v_proj", "o_proj",
                              "gate_proj", "up_proj", "down_proj"] }),
        // What the 2-core VM has left beside the operator.
        cpu: "1500m".into(),
        memory: "4Gi".into(),
        prompt: PROMPT.into(),
        max_tokens: 40,
        training_timeout: Duration::from_secs(900),
    };
    println!(
        "==> training a LoRA adapter of {} on {} chats (namespace {})",
        options.model.display(),
        options.train.len(),
        options.namespace
    );
    flow::reset(&cluster, &options.namespace).await?;
    let outcome = flow::run(&cluster, &options, draw_progress).await?;
    eprintln!();

    let status = outcome
        .job
        .status
        .as_ref()
        .context("the job has a status")?;
    demo::print_status(flow::JOB, status);
    println!(
        "\n==> AdapterDeployment chat: {} on {} replicas ({})",
        outcome.adapter_model,
        outcome.serving_pods.len(),
        outcome.serving_pods.join(", ")
    );
    println!("\n==> Q: {PROMPT}");
    println!("    base model:   {}", outcome.base_answer.trim());
    println!("    with adapter: {}", outcome.adapter_answer.trim());
    println!(
        "\nThe cluster stays up. Explore it:\n  eval \"$(cargo xtask cluster env)\"\n  \
         kubectl -n {ns} get finetunejobs,adapterdeployments,pods\n  \
         kubectl -n {ns} get finetunejob {job} -o yaml\n  \
         kubectl -n {ns} logs deploy/kubetune\nRemove everything with `cargo xtask cluster down`.",
        ns = options.namespace,
        job = flow::JOB,
    );
    Ok(())
}

/// One line, redrawn: a bar, step, loss and ETA.
fn draw_progress(job: &FineTuneJob) {
    let Some(status) = &job.status else { return };
    let line = match &status.progress {
        Some(progress) => {
            let width = 30;
            let filled = (progress.percent.min(100) as usize * width) / 100;
            let eta = progress
                .eta_seconds
                .map_or_else(|| "?".to_owned(), |s| format!("{}m{:02}s", s / 60, s % 60));
            format!(
                "[{}{}] {:>3}%  step {}/{}  loss {}  ETA {eta}",
                "#".repeat(filled),
                ".".repeat(width - filled),
                progress.percent,
                progress.step,
                progress.total_steps,
                progress.loss.as_deref().unwrap_or("?"),
            )
        }
        None => format!("{:?}: waiting for the trainer's first report", status.phase),
    };
    let mut err = std::io::stderr();
    let _ = write!(err, "\r{line:<90}");
    let _ = err.flush();
}
