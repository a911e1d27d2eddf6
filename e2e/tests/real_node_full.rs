//! A multi-rank full fine-tune as real pods: the chart's operator on the real node runs
//! FineTuneJobs of method full as a gang of two pods with two ranks each (`nodes: 2`,
//! `ranksPerNode: 2`, `onePodPerNode: false`, CPU): four ranks, fully sharded over
//! Gloo, that find rank 0 through the cluster's DNS (the headless Service's name, as
//! on any cluster); rank 0 writes a Hugging Face checkpoint and the job ends Succeeded
//! with its evaluation, artifact and cost (both pods' running time). A second job has
//! one of its two pods deleted mid-run: the whole gang stops, the attempt fails,
//! attempt 2 resumes from the checkpoint, and the weights it ends with are the
//! uninterrupted job's.
//!
//! Needs the real node and the dev images, as `real_node.rs` does.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use candle_core::{Device, Tensor};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kubetune_crds::finetunejob::{FineTuneJob, Phase};
use kubetune_e2e::cluster_or_skip;
use kubetune_e2e::flow::{self, Volumes};
use kubetune_e2e::jobs::trainer_run;
use kubetune_e2e::test_support::Cluster;
use kubetune_trainer::test_support::{TinyLlama, max_abs_diff, memorisable_chats};
use serde_json::json;

const IMAGE_TAG: &str = "KUBETUNE_E2E_IMAGE_TAG";
const REQUIRE_REAL_NODE: &str = "KUBETUNE_REQUIRE_REAL_NODE";
/// Steps of each job, and how often it checkpoints.
const STEPS: u64 = 300;
const CHECKPOINT_EVERY: u64 = 25;
/// Pods of each job's gang.
const PODS: usize = 2;

fn skip(test: &str, why: &str) -> Result<()> {
    if std::env::var(REQUIRE_REAL_NODE).is_ok_and(|value| value == "1") {
        anyhow::bail!("{test} needs the real node and {REQUIRE_REAL_NODE}=1: {why}");
    }
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {why}");
    Ok(())
}

fn full_job(name: &str, output: &str) -> Result<FineTuneJob> {
    // The real node is the only node these pods may use: the gang shares it.
    let mut placement = flow::placement();
    placement["onePodPerNode"] = json!(false);
    Ok(serde_json::from_value(json!({
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": { "name": name },
        "spec": {
            "method": "full",
            "baseModel": { "name": "base", "volume": { "claimName": "models", "path": "base" } },
            "dataset": {
                "format": "chat",
                "claimName": "datasets",
                "trainPath": "train.jsonl",
                "evalPath": "eval.jsonl",
            },
            "hyperparameters": {
                "maxSteps": STEPS, "learningRate": "2e-3", "batchSize": 2,
                "maxSeqLength": 64, "warmupSteps": 2,
            },
            "checkpoint": { "everySteps": CHECKPOINT_EVERY, "keep": 2 },
            // Two pods of two ranks each on CPU: the gang's world is 4. Half a core a
            // pod: both fit the 2-core real node beside the operator.
            "resources": { "cpu": "500m", "memory": "2Gi", "nodes": PODS, "ranksPerNode": 2 },
            "maxRestarts": 2,
            "output": { "volume": { "claimName": "adapters", "path": output } },
            "scheduling": placement,
        },
    }))?)
}

fn weights(dir: &Path) -> Result<std::collections::HashMap<String, Tensor>> {
    let file = dir.join("model.safetensors");
    candle_core::safetensors::load(&file, &Device::Cpu)
        .with_context(|| format!("failed to read {}", file.display()))
}

/// The newest complete checkpoint's step under `dir`, if any.
fn newest_checkpoint(dir: &Path) -> Option<u64> {
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("trainer_state.json").is_file())
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_prefix("checkpoint-")?
                .parse()
                .ok()
        })
        .max()
}

/// Seconds each pod of `job`'s gang ran its trainer container, and the seconds they
/// lived (created to finished) summed.
async fn pod_seconds(cluster: &Cluster, ns: &str, job: &str) -> Result<(Vec<u64>, u64)> {
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), ns);
    let list = pods
        .list(&ListParams::default().labels(&format!("kubetune.io/finetunejob={job}")))
        .await?;
    let mut ran = Vec::new();
    let mut lived = 0;
    for pod in &list.items {
        let name = pod.metadata.name.as_deref().unwrap_or_default();
        let (started, finished) = trainer_run(pod)?;
        let created = pod
            .metadata
            .creation_timestamp
            .as_ref()
            .with_context(|| format!("pod {name} has a creation time"))?
            .0;
        let seconds = |since: i64| u64::try_from(finished.as_second() - since).unwrap_or(0);
        ran.push(seconds(started.as_second()));
        lived += seconds(created.as_second());
    }
    Ok((ran, lived))
}

async fn run(cluster: &Cluster, ns: &str, volumes: &Volumes) -> Result<()> {
    let jobs: Api<FineTuneJob> = Api::namespaced(cluster.client.clone(), ns);
    let timeout = Duration::from_secs(420);

    // Uninterrupted.
    jobs.create(&PostParams::default(), &full_job("full-a", "full/a")?)
        .await
        .context("failed to create FineTuneJob full-a")?;
    let a = flow::watch_job(&jobs, "full-a", timeout, |_| std::future::ready(Ok(()))).await?;
    let status = a.status.clone().context("full-a has a status")?;
    assert_eq!(status.phase, Phase::Succeeded);
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
        tuned < base,
        "full fine-tuning did not lower the eval loss: {base} -> {tuned}"
    );
    let artifact = status.artifact.context("artifact")?;
    let out_a: PathBuf = volumes.adapters.join(&artifact.path);
    let trained = weights(&out_a)?;
    let cost = status.cost.context("cost")?;
    ensure!(
        cost.attempts.len() == 1 && cost.rates.keys().any(|key| key.starts_with("cpu/")),
        "one attempt priced per core: {cost:?}"
    );
    // Both pods' running time, each a started core: between what their containers ran
    // and what the pods lived, summed.
    let (ran, lived) = pod_seconds(cluster, ns, "full-a").await?;
    ensure!(
        cost.gpu_hours.is_none() && cost.attempts[0].gpu_seconds.is_none(),
        "a CPU job reports CPU core-hours, not GPU-hours: {cost:?}"
    );
    let billed = cost.attempts[0].cpu_core_seconds.unwrap_or(0);
    ensure!(
        ran.len() == PODS && billed + PODS as u64 >= ran.iter().sum::<u64>(),
        "cost counts every pod of the gang: billed {billed} core-seconds, pods ran {ran:?} s"
    );
    ensure!(
        billed <= lived + PODS as u64,
        "cost counts no more than the pods lived: billed {billed}, lived {lived} s"
    );

    // One of its two pods (not rank 0's) deleted once a checkpoint is written: the
    // other pod's ranks must be torn down with it, and the gang restarted.
    jobs.create(&PostParams::default(), &full_job("full-b", "full/b")?)
        .await
        .context("failed to create FineTuneJob full-b")?;
    let checkpoints = volumes.adapters.join("full/b/checkpoints");
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), ns);
    let mut killed_after = None;
    let mut killed_at: Option<std::time::Instant> = None;
    let mut restarted_after = None;
    let b = flow::watch_job(&jobs, "full-b", timeout, |job| {
        let attempt = job.status.as_ref().map_or(0, |s| s.attempts.len());
        if let (Some(at), None) = (killed_at, restarted_after)
            && attempt >= 2
        {
            restarted_after = Some(at.elapsed());
        }
        let due = killed_after.is_none()
            && attempt <= 1
            && newest_checkpoint(&checkpoints).is_some_and(|step| step >= CHECKPOINT_EVERY);
        let pods = pods.clone();
        if due {
            killed_after = newest_checkpoint(&checkpoints);
            killed_at = Some(std::time::Instant::now());
        }
        async move {
            if due {
                let list = pods
                    .list(&ListParams::default().labels(
                        "kubetune.io/finetunejob=full-b,batch.kubernetes.io/job-completion-index=1",
                    ))
                    .await?;
                ensure!(list.items.len() == 1, "full-b has one pod of index 1");
                for pod in list.items {
                    let name = pod.metadata.name.unwrap_or_default();
                    eprintln!("deleting trainer pod {name} (ranks 2 and 3) mid-run");
                    pods.delete(&name, &DeleteParams::default()).await?;
                }
            }
            Ok(())
        }
    })
    .await?;
    let killed_after = killed_after.context("a pod of full-b was deleted mid-run")?;
    let restarted_after = restarted_after.with_context(|| {
        format!(
            "attempt 2 of full-b was never seen after the deletion; attempts: {:?}",
            b.status.as_ref().map(|status| &status.attempts)
        )
    })?;
    let status = b.status.clone().context("full-b has a status")?;
    ensure!(
        status.attempts.len() == 2,
        "the deleted pod's attempt failed and attempt 2 finished the job: {:?}",
        status.attempts
    );
    let artifact = status.artifact.context("artifact of full-b")?;
    let resumed = weights(&volumes.adapters.join(&artifact.path))?;
    let mut diff = 0f32;
    for (name, t) in &trained {
        let other = resumed
            .get(name)
            .with_context(|| format!("full-b has no {name}"))?;
        diff = diff.max(max_abs_diff(t, other));
    }
    eprintln!(
        "real node, {PODS} pods × 2 ranks: eval loss {base} -> {tuned}; full-b's second pod deleted after checkpoint {killed_after}, attempt 2 after {:.1}s, resumed; max |Δweight| vs full-a = {diff:e}",
        restarted_after.as_secs_f64()
    );
    ensure!(
        diff < 1e-5,
        "the resumed job ended {diff} away from the uninterrupted one"
    );
    for name in ["full-a", "full-b"] {
        let _ = jobs.delete(name, &DeleteParams::background()).await;
    }
    Ok(())
}

#[tokio::test]
async fn a_two_rank_full_fine_tune_runs_as_pods_and_resumes_after_its_pod_is_deleted() -> Result<()>
{
    const TEST: &str =
        "a_two_rank_full_fine_tune_runs_as_pods_and_resumes_after_its_pod_is_deleted";
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
    let namespace = cluster.namespace("real-node-full").await?;
    let ns = namespace.name.clone();
    flow::ensure_namespace(&cluster, &ns).await?;
    let volumes = Volumes::claim(&cluster, &ns).await?;
    let model = tempfile::tempdir()?;
    TinyLlama::default().write(model.path())?;
    let chats = memorisable_chats(16);
    volumes.put(model.path(), &chats, &chats[..8])?;
    flow::install_chart(&cluster, &ns, &image_tag)?;

    let outcome = run(&cluster, &ns, &volumes).await;
    let released = flow::release_volumes(&cluster, &ns).await;
    let uninstalled = flow::uninstall_chart(&cluster, &ns);
    outcome?;
    released?;
    uninstalled?;
    Ok(())
}
