//! kubetune's whole job with pods that really run: the chart's operator as a pod on
//! the real node trains a LoRA adapter on CPU from a tiny model on local volumes, and
//! an AdapterDeployment rolls it into two real `kubetune-serve` replicas that answer
//! differently with it than without (`kubetune_e2e::flow`, which `cargo xtask demo`
//! runs with SmolLM2).
//!
//! Needs the real node (`cargo xtask cluster up` as root) and the dev images imported
//! into it, which `cargo xtask test` builds and names in `KUBETUNE_E2E_IMAGE_TAG`;
//! without them the test skips with a message, or fails under
//! `KUBETUNE_REQUIRE_REAL_NODE=1`.

use std::io::Write;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use kubetune_crds::finetunejob::Phase;
use kubetune_e2e::cluster_or_skip;
use kubetune_e2e::flow::{self, Options};
use kubetune_trainer::test_support::{TinyLlama, memorisable_chats};
use serde_json::json;

const IMAGE_TAG: &str = "KUBETUNE_E2E_IMAGE_TAG";
const REQUIRE_REAL_NODE: &str = "KUBETUNE_REQUIRE_REAL_NODE";

/// Skips (or, when required, fails) with why the real node cannot be used.
fn skip(test: &str, why: &str) -> Result<()> {
    if std::env::var(REQUIRE_REAL_NODE).is_ok_and(|value| value == "1") {
        anyhow::bail!("{test} needs the real node and {REQUIRE_REAL_NODE}=1: {why}");
    }
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {why}");
    Ok(())
}

#[tokio::test]
async fn a_lora_job_trains_on_the_real_node_and_its_adapter_answers_differently() -> Result<()> {
    const TEST: &str = "a_lora_job_trains_on_the_real_node_and_its_adapter_answers_differently";
    let cluster = cluster_or_skip!(TEST);
    if !flow::real_node_ready(&cluster).await? {
        return skip(
            TEST,
            "no Ready real node kubetune-real (`cargo xtask cluster up` adds it as root)",
        );
    }
    let Ok(image_tag) = std::env::var(IMAGE_TAG) else {
        return skip(
            TEST,
            &format!("{IMAGE_TAG} is unset: `cargo xtask test` builds and imports the dev images"),
        );
    };
    let namespace = cluster.namespace("real-node").await?;
    let model = tempfile::tempdir()?;
    TinyLlama::default().write(model.path())?;
    // One fact, many times: a tiny byte-level model memorises it in a few seconds, so
    // the adapter's greedy answer is the taught one.
    let chats: Vec<_> = memorisable_chats(1).into_iter().cycle().take(16).collect();
    let options = Options {
        namespace: namespace.name.clone(),
        image_tag,
        model: model.path().to_path_buf(),
        train: chats.clone(),
        eval: chats[..8].to_vec(),
        hyperparameters: json!({
            "epochs": 15, "learningRate": "1e-2", "batchSize": 4,
            "maxSeqLength": 64, "warmupSteps": 2,
        }),
        lora: json!({ "rank": 8, "alpha": 16 }),
        cpu: "1".into(),
        memory: "1Gi".into(),
        prompt: "What is the capital of France?".into(),
        max_tokens: 8,
        training_timeout: Duration::from_secs(300),
    };
    let run = flow::run(&cluster, &options, |_| {}).await;
    let released = flow::release_volumes(&cluster, &namespace.name).await;
    let uninstalled = flow::uninstall_chart(&cluster, &namespace.name);
    let outcome = run?;
    released?;
    uninstalled?;

    let status = outcome.job.status.context("the job has a status")?;
    assert_eq!(status.phase, Phase::Succeeded);
    let progress = status.progress.context("progress")?;
    assert_eq!(progress.percent, 100, "{progress:?}");
    let evaluation = status.evaluation.context("evaluation")?;
    let base: f64 = evaluation
        .base_eval_loss
        .as_deref()
        .context("base eval loss")?
        .parse()?;
    let tuned: f64 = evaluation
        .eval_loss
        .as_deref()
        .context("eval loss")?
        .parse()?;
    ensure!(
        tuned < 0.5 * base,
        "training on the real node cut eval loss only from {base} to {tuned}"
    );
    let artifact = status.artifact.context("artifact")?;
    assert_eq!(
        artifact.sha256, outcome.weights_sha256,
        "the recorded sha256 is the file's"
    );
    let cost = status.cost.context("cost")?;
    assert_eq!(cost.currency, "USD");
    // Priced per core-hour; the tiny job runs for about a second, which the kubelet's
    // whole-second timestamps may round to nothing, so only the ledger's shape is
    // checked here (its arithmetic has unit tests and KWOK-timed integration tests).
    ensure!(
        cost.rates.keys().any(|key| key.starts_with("cpu/")) && cost.attempts.len() == 1,
        "a CPU job is priced by the CPU entry, one attempt: {cost:?}"
    );

    eprintln!(
        "real node: eval loss {base} -> {tuned}; base answered {:?}, {} answered {:?}",
        outcome.base_answer, outcome.adapter_model, outcome.adapter_answer
    );
    assert_eq!(outcome.serving_pods.len(), 2);
    let adapter = outcome.adapter.status.context("adapter status")?;
    assert_eq!(adapter.replicas, 2, "{adapter:?}");
    ensure!(
        outcome.adapter_model.starts_with("chat-"),
        "served as name plus digest: {}",
        outcome.adapter_model
    );
    ensure!(
        outcome.adapter_answer != outcome.base_answer,
        "the adapter changed the answer: base {:?}, adapter {:?}",
        outcome.base_answer,
        outcome.adapter_answer
    );
    ensure!(
        outcome.adapter_answer.contains("Paris"),
        "the adapter learned the answer: {:?}",
        outcome.adapter_answer
    );
    Ok(())
}
