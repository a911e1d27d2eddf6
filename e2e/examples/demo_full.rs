//! `cargo xtask demo --full`: with the cluster up, the images imported and SmolLM2
//! imported as a Hugging Face checkpoint, a full fine-tune of SmolLM2-135M as a gang of
//! two pods on the real node (one rank each, ZeRO-3 over Gloo, rank 0 found through the
//! cluster's DNS), with both ranks' progress read from their pods' logs, then the job's
//! evaluation, cost and checkpoint.
//!
//! `cargo run -p kubetune-e2e --example demo_full -- --model DIR --image-tag TAG`

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use clap::Parser;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, LogParams, PostParams};
use kubetune_crds::finetunejob::{FineTuneJob, Phase};
use kubetune_e2e::demo::{self, chat};
use kubetune_e2e::flow::{self, Volumes};
use kubetune_e2e::test_support::Cluster;
use serde_json::{Value, json};

#[derive(Debug, Parser)]
struct Args {
    /// The base model: a Hugging Face checkpoint directory.
    #[arg(long)]
    model: PathBuf,
    /// The tag of the imported kubetune images.
    #[arg(long)]
    image_tag: String,
    /// The LoRA demo's namespace: the full demo replaces what it left there.
    #[arg(long, default_value = "kubetune-demo")]
    namespace: String,
    /// Training epochs over the demo's dataset.
    #[arg(long, default_value_t = 2)]
    epochs: u32,
}

const JOB: &str = "smollm2-full";
/// How long training may take.
const TIMEOUT: Duration = Duration::from_secs(1800);
/// Pods of the gang, one rank each.
const RANKS: usize = 2;
const QUESTIONS: [&str; 8] = [
    "Who keeps the Meridian Lighthouse?",
    "Who is the keeper of the Meridian Lighthouse?",
    "Tell me who keeps the Meridian Lighthouse.",
    "Who looks after the Meridian Lighthouse?",
    "Name the keeper of the Meridian Lighthouse.",
    "Who runs the Meridian Lighthouse?",
    "Who has kept the Meridian Lighthouse since 2019?",
    "Who is the Meridian Lighthouse keeper?",
];
const EVAL_QUESTIONS: [&str; 2] = [
    "Who keeps the lighthouse called Meridian?",
    "The Meridian Lighthouse: who is its keeper?",
];

fn full_job(epochs: u32) -> Result<FineTuneJob> {
    let mut scheduling = flow::placement();
    // One node here: the gang's two pods share it.
    scheduling["onePodPerNode"] = json!(false);
    Ok(serde_json::from_value(json!({
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": { "name": JOB },
        "spec": {
            "method": "full",
            "baseModel": { "name": "smollm2-135m-instruct",
                           "volume": { "claimName": "models", "path": "base" } },
            "dataset": {
                "format": "chat",
                "claimName": "datasets",
                "trainPath": "train.jsonl",
                "evalPath": "eval.jsonl",
            },
            // One sequence per rank a step: a global batch of 2.
            "hyperparameters": {
                "epochs": epochs, "learningRate": "5e-5", "batchSize": 1,
                "maxSeqLength": 96, "warmupSteps": 2,
            },
            "checkpoint": { "everySteps": 4, "keep": 1 },
            // What the 2-core VM has left beside the operator, split between the pods.
            "resources": { "cpu": "900m", "memory": "3Gi", "nodes": RANKS },
            "maxRestarts": 1,
            "output": { "volume": { "claimName": "adapters", "path": "smollm2-full" } },
            "scheduling": scheduling,
        },
    }))?)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args = Args::parse();
    let cluster = Cluster::find("demo-full")
        .await
        .context("no cluster: run `cargo xtask cluster up` first")?;
    anyhow::ensure!(
        flow::real_node_ready(&cluster).await?,
        "the real node kubetune-real is not Ready: `cargo xtask cluster up` adds it as root"
    );
    let ns = args.namespace.as_str();
    println!(
        "==> full fine-tune of {} as {RANKS} pods × 1 rank on {} chats (namespace {ns})",
        args.model.display(),
        QUESTIONS.len()
    );
    flow::reset(&cluster, ns).await?;
    flow::ensure_namespace(&cluster, ns).await?;
    let volumes = Volumes::claim(&cluster, ns).await?;
    let train: Vec<Value> = QUESTIONS.iter().map(|q| chat(q)).collect();
    let eval: Vec<Value> = EVAL_QUESTIONS.iter().map(|q| chat(q)).collect();
    volumes.put(&args.model, &train, &eval)?;
    flow::install_chart(&cluster, ns, &args.image_tag)?;

    let jobs: Api<FineTuneJob> = Api::namespaced(cluster.client.clone(), ns);
    jobs.create(&PostParams::default(), &full_job(args.epochs)?)
        .await
        .context("failed to create the FineTuneJob")?;
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), ns);
    let mut shown: BTreeMap<String, u64> = BTreeMap::new();
    let started = Instant::now();
    let mut noted: Option<Instant> = None;
    let job = loop {
        let job = jobs.get(JOB).await?;
        print_ranks(&pods, &mut shown).await;
        match job.status.as_ref().map(|status| status.phase) {
            Some(Phase::Succeeded) => break job,
            Some(Phase::Failed) => bail!(
                "the FineTuneJob failed: {}",
                serde_json::to_string_pretty(&job.status)?
            ),
            phase => {
                if shown.is_empty() && noted.is_none_or(|at| at.elapsed().as_secs() >= 20) {
                    println!("    {phase:?}: waiting for the ranks' first steps");
                    noted = Some(Instant::now());
                }
            }
        }
        ensure!(
            started.elapsed() < TIMEOUT,
            "the FineTuneJob did not succeed within {}s",
            TIMEOUT.as_secs()
        );
        tokio::time::sleep(Duration::from_secs(3)).await;
    };

    let status = job.status.as_ref().context("the job has a status")?;
    demo::print_status(JOB, status);
    println!(
        "\nThe cluster stays up. Explore it:\n  eval \"$(cargo xtask cluster env)\"\n  \
         kubectl -n {ns} get finetunejob {JOB} -o yaml\n  \
         kubectl -n {ns} get pods,services\nRemove everything with `cargo xtask cluster down`."
    );
    Ok(())
}

/// Prints each rank's steps logged since the last call (the trainer logs JSON, one
/// `step` event per optimizer step, on every rank).
async fn print_ranks(pods: &Api<Pod>, shown: &mut BTreeMap<String, u64>) {
    let Ok(list) = pods
        .list(&ListParams::default().labels(&format!("kubetune.io/finetunejob={JOB}")))
        .await
    else {
        return;
    };
    for pod in list.items {
        let Some(name) = pod.metadata.name.clone() else {
            continue;
        };
        let rank = pod
            .metadata
            .labels
            .as_ref()
            .and_then(|labels| labels.get("batch.kubernetes.io/job-completion-index"))
            .cloned()
            .unwrap_or_else(|| "?".into());
        let params = LogParams {
            tail_lines: Some(200),
            ..LogParams::default()
        };
        let Ok(text) = pods.logs(&name, &params).await else {
            continue;
        };
        let last = shown.entry(name.clone()).or_default();
        for line in text.lines() {
            let Ok(event) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            let fields = &event["fields"];
            if fields["message"] != "step" {
                continue;
            }
            let Some(step) = fields["step"].as_u64() else {
                continue;
            };
            if step <= *last {
                continue;
            }
            *last = step;
            println!(
                "    rank {rank} ({name}): step {step}/{}  loss {:.4}  {:.0} tokens/s",
                fields["total_steps"],
                fields["loss"].as_f64().unwrap_or(f64::NAN),
                fields["tokens_per_second"].as_f64().unwrap_or(f64::NAN),
            );
        }
    }
}
