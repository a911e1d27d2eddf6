//! The FineTuneJob controller against the real API server, scheduler and controller
//! manager, with trainer pods on the simulated GPU nodes. Each test runs its own
//! operator, watching only its own namespace, which enforces Pod Security
//! "restricted": a trainer pod that broke it would never be created.
//!
//! Trainer outcomes are steered through `spec.podMetadata.annotations` with the
//! `sim.kubetune.io/…` annotations of the cluster's kwok stages.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kubetune_crds::finetunejob::{FineTuneJob, Phase};
use kubetune_e2e::cluster_or_skip;
use kubetune_e2e::jobs::{
    Operator, create_claim, create_prices, example, namespace, ran_seconds, start_operator,
    start_pricing_operator,
};
use kubetune_e2e::test_support::{Cluster, TestNamespace, wait_for};
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(90);
/// For what the controller manager's garbage collector deletes: milliseconds here, but
/// it lagged past [`TIMEOUT`] once on a loaded CI machine.
const GC_TIMEOUT: Duration = Duration::from_secs(180);

/// A namespace with its operator and the LoRA example running (its pod never ends).
struct RunningLora {
    namespace: TestNamespace,
    operator: Operator,
    ftjs: Api<FineTuneJob>,
    running: FineTuneJob,
}

async fn running_lora(cluster: &Cluster, test: &str) -> Result<RunningLora> {
    let namespace = namespace(cluster, test, &["models", "datasets", "adapters"]).await?;
    let operator = start_operator(cluster, &namespace);
    let ftjs: Api<FineTuneJob> = namespace.api();
    let ftj = example("lora-a100.yaml", &[("outcome", "run")])?;
    ftjs.create(&PostParams::default(), &ftj).await?;
    let running = wait_for(&ftjs, "support-lora", TIMEOUT, |f| {
        phase(f) == Phase::Running
    })
    .await?;
    Ok(RunningLora {
        namespace,
        operator,
        ftjs,
        running,
    })
}

fn phase(ftj: &FineTuneJob) -> Phase {
    ftj.status.as_ref().map(|s| s.phase).unwrap_or_default()
}

fn condition<'a>(
    ftj: &'a FineTuneJob,
    type_: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    ftj.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
}

async fn pods_of(namespace: &TestNamespace, job: &str) -> Result<Vec<Pod>> {
    let pods: Api<Pod> = namespace.api();
    Ok(pods
        .list(&ListParams::default().labels(&format!("batch.kubernetes.io/job-name={job}")))
        .await?
        .items)
}

fn node_of(pod: &Pod) -> Option<String> {
    pod.spec.as_ref().and_then(|s| s.node_name.clone())
}

#[tokio::test]
async fn lora_job_runs_one_trainer_pod_on_an_a100_node_and_succeeds() -> Result<()> {
    let cluster = cluster_or_skip!("lora_job_runs_one_trainer_pod_on_an_a100_node_and_succeeds");
    let namespace = namespace(&cluster, "ftj-lora", &["models", "datasets", "adapters"]).await?;
    let _operator = start_operator(&cluster, &namespace);
    let ftjs: Api<FineTuneJob> = namespace.api();
    // What the real trainer writes to its termination log when it succeeds.
    let result = r#"{"adapterSha256":"5f2b0c","adapterSizeBytes":73728,"baseEvalLoss":2.4,"evalLoss":1.8,"steps":120}"#;
    let ftj = example("lora-a100.yaml", &[("run-for", "2s"), ("message", result)])?;
    ftjs.create(&PostParams::default(), &ftj).await?;

    let done = wait_for(&ftjs, "support-lora", TIMEOUT, |f| {
        phase(f) == Phase::Succeeded
    })
    .await?;
    let status = done.status.as_ref().context("status")?;
    let artifact = status
        .artifact
        .as_ref()
        .context("the artifact is in status")?;
    assert_eq!(artifact.sha256, "5f2b0c");
    assert_eq!(artifact.size_bytes, 73728);
    assert_eq!(artifact.claim_name, ftj.spec.output.volume.claim_name);
    let evaluation = status.evaluation.as_ref().context("evaluation")?;
    assert_eq!(evaluation.improvement.as_deref(), Some("0.2500"));
    assert_eq!(status.progress.as_ref().map(|p| p.percent), Some(100));
    let children = status.children.as_ref().context("children")?;
    assert_eq!(children.job.as_deref(), Some("support-lora-a1"));
    assert_eq!(status.attempts.len(), 1);
    assert_eq!(status.restarts, 0);
    assert!(status.start_time.is_some() && status.completion_time.is_some());
    assert_eq!(status.observed_generation, done.metadata.generation);

    let pods = pods_of(&namespace, "support-lora-a1").await?;
    assert_eq!(pods.len(), 1, "one trainer pod");
    let node = node_of(&pods[0]).context("the pod ran on a node")?;
    let nodes: Api<Node> = Api::all(cluster.client.clone());
    let node = nodes.get(&node).await?;
    assert_eq!(
        node.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("nvidia.com/gpu.product"))
            .map(String::as_str),
        Some("NVIDIA-A100-SXM4-80GB")
    );
    assert_eq!(
        status.attempts[0].nodes,
        vec![node.metadata.name.clone().unwrap_or_default()]
    );
    Ok(())
}

#[tokio::test]
async fn full_job_on_16_nodes_runs_16_ranks_on_16_distinct_h100_nodes() -> Result<()> {
    let cluster = cluster_or_skip!("full_job_on_16_nodes_runs_16_ranks_on_16_distinct_h100_nodes");
    let namespace = namespace(&cluster, "ftj-full", &["models", "datasets", "checkpoints"]).await?;
    let _operator = start_operator(&cluster, &namespace);
    let ftjs: Api<FineTuneJob> = namespace.api();
    let mut ftj = example("full-16-nodes.yaml", &[("run-for", "5s")])?;
    ftj.spec.resources.cpu = None;
    ftj.spec.resources.memory = None;
    ftjs.create(&PostParams::default(), &ftj).await?;

    let running = wait_for(&ftjs, "domain-full", TIMEOUT, |f| {
        matches!(phase(f), Phase::Running | Phase::Succeeded)
    })
    .await?;
    let pods = pods_of(&namespace, "domain-full-a1").await?;
    assert_eq!(pods.len(), 16);
    let nodes: BTreeSet<String> = pods.iter().filter_map(node_of).collect();
    assert_eq!(nodes.len(), 16, "one rank per node: {nodes:?}");
    let ranks: BTreeSet<String> = pods
        .iter()
        .filter_map(|p| {
            p.metadata
                .annotations
                .as_ref()?
                .get("batch.kubernetes.io/job-completion-index")
                .cloned()
        })
        .collect();
    assert_eq!(ranks.len(), 16, "ranks 0 to 15");
    let services: Api<Service> = namespace.api();
    let service = services.get("domain-full-ranks").await?;
    assert_eq!(
        service.spec.and_then(|s| s.cluster_ip).as_deref(),
        Some("None")
    );
    assert_eq!(
        running.status.as_ref().map(|s| s.attempts[0].nodes.len()),
        Some(16),
        "the attempt records its nodes"
    );
    wait_for(&ftjs, "domain-full", TIMEOUT, |f| {
        phase(f) == Phase::Succeeded
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn trainer_exiting_with_invalid_input_fails_the_job_at_once_with_its_message() -> Result<()> {
    let cluster = cluster_or_skip!(
        "trainer_exiting_with_invalid_input_fails_the_job_at_once_with_its_message"
    );
    let namespace = namespace(&cluster, "ftj-invalid", &["models", "datasets", "adapters"]).await?;
    let _operator = start_operator(&cluster, &namespace);
    let ftjs: Api<FineTuneJob> = namespace.api();
    let message = "/data/support/train.jsonl:3: expected a \"messages\" array";
    let ftj = example(
        "lora-a100.yaml",
        &[
            ("outcome", "fail"),
            ("exit-code", "2"),
            ("message", message),
        ],
    )?;
    ftjs.create(&PostParams::default(), &ftj).await?;

    let failed = wait_for(&ftjs, "support-lora", TIMEOUT, |f| {
        phase(f) == Phase::Failed
    })
    .await?;
    let condition = condition(&failed, "Failed").context("Failed condition")?;
    assert_eq!(condition.reason, "InvalidInput");
    assert_eq!(condition.message, message);
    let status = failed.status.as_ref().context("status")?;
    assert_eq!((status.restarts, status.attempts.len()), (0, 1), "no retry");
    Ok(())
}

#[tokio::test]
async fn retryable_failure_restarts_as_attempt_two_until_restarts_run_out() -> Result<()> {
    let cluster =
        cluster_or_skip!("retryable_failure_restarts_as_attempt_two_until_restarts_run_out");
    let namespace = namespace(&cluster, "ftj-retry", &["models", "datasets", "adapters"]).await?;
    let _operator = start_operator(&cluster, &namespace);
    let ftjs: Api<FineTuneJob> = namespace.api();
    let mut ftj = example(
        "lora-a100.yaml",
        &[
            ("outcome", "fail"),
            ("exit-code", "1"),
            ("message", "NCCL timeout"),
        ],
    )?;
    ftj.spec.max_restarts = 1;
    ftjs.create(&PostParams::default(), &ftj).await?;

    let failed = wait_for(&ftjs, "support-lora", TIMEOUT, |f| {
        phase(f) == Phase::Failed
    })
    .await?;
    let status = failed.status.as_ref().context("status")?;
    assert_eq!(status.restarts, 1);
    let attempts: Vec<(u32, Option<&str>)> = status
        .attempts
        .iter()
        .map(|a| (a.number, a.reason.as_deref()))
        .collect();
    assert_eq!(
        attempts,
        vec![(1, Some("TrainerError")), (2, Some("TrainerError"))]
    );
    assert_eq!(
        condition(&failed, "Failed").map(|c| c.reason.as_str()),
        Some("BackoffLimitExceeded")
    );
    let jobs: Api<Job> = namespace.api();
    assert!(
        jobs.get_opt("support-lora-a1").await?.is_none(),
        "attempt 1's Job was removed"
    );
    Ok(())
}

#[tokio::test]
async fn missing_claim_is_named_and_the_job_starts_once_it_appears() -> Result<()> {
    let cluster = cluster_or_skip!("missing_claim_is_named_and_the_job_starts_once_it_appears");
    let namespace = namespace(&cluster, "ftj-claim", &["models", "adapters"]).await?;
    let _operator = start_operator(&cluster, &namespace);
    let ftjs: Api<FineTuneJob> = namespace.api();
    ftjs.create(
        &PostParams::default(),
        &example("lora-a100.yaml", &[("outcome", "run")])?,
    )
    .await?;

    let waiting = wait_for(&ftjs, "support-lora", TIMEOUT, |f| {
        condition(f, "InputsReady").is_some_and(|c| c.status == "False")
    })
    .await?;
    assert!(condition(&waiting, "InputsReady").is_some_and(|c| c.message.contains("datasets")));
    let jobs: Api<Job> = namespace.api();
    assert!(
        jobs.list(&ListParams::default()).await?.items.is_empty(),
        "nothing created yet"
    );

    create_claim(&cluster, &namespace, "datasets").await?;
    wait_for(&ftjs, "support-lora", TIMEOUT, |f| {
        phase(f) == Phase::Running
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn restarted_operator_creates_no_duplicate_job_and_keeps_the_status() -> Result<()> {
    let cluster =
        cluster_or_skip!("restarted_operator_creates_no_duplicate_job_and_keeps_the_status");
    let RunningLora {
        namespace,
        operator,
        ftjs,
        running: before,
    } = running_lora(&cluster, "ftj-restart").await?;
    drop(operator);

    let _operator = start_operator(&cluster, &namespace);
    // Let the new operator reconcile a few times (the watch's initial list, pod events).
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = ftjs.get("support-lora").await?;
    let jobs: Api<Job> = namespace.api();
    let names: Vec<String> = jobs
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter_map(|j| j.metadata.name)
        .collect();
    assert_eq!(names, vec!["support-lora-a1".to_owned()]);
    let (before, after) = (
        before.status.context("status")?,
        after.status.context("status")?,
    );
    assert_eq!(after.attempts, before.attempts);
    assert_eq!(after.start_time, before.start_time);
    assert_eq!(after.phase, Phase::Running);
    Ok(())
}

#[tokio::test]
async fn gang_that_cannot_be_placed_is_torn_down_after_the_timeout() -> Result<()> {
    let cluster = cluster_or_skip!("gang_that_cannot_be_placed_is_torn_down_after_the_timeout");
    let namespace = namespace(&cluster, "ftj-gang", &["models", "datasets", "checkpoints"]).await?;
    let _operator = start_operator(&cluster, &namespace);
    let ftjs: Api<FineTuneJob> = namespace.api();
    let mut ftj = example("full-16-nodes.yaml", &[("outcome", "run")])?;
    // 5 ranks, one per node, on the cluster's 4 A100 nodes: one rank never fits. (The
    // H100 nodes are left to the 16-node test running next to this one.)
    let gpu = ftj
        .spec
        .resources
        .gpu
        .as_mut()
        .context("the example asks for GPUs")?;
    gpu.product = "NVIDIA-A100-SXM4-80GB".into();
    gpu.per_node = 1;
    ftj.spec.resources.nodes = 5;
    ftj.spec.resources.cpu = None;
    ftj.spec.resources.memory = None;
    ftj.spec.scheduling.gang_timeout_seconds = 30;
    ftj.spec.max_restarts = 0;
    ftjs.create(&PostParams::default(), &ftj).await?;

    let failed = wait_for(&ftjs, "domain-full", TIMEOUT, |f| phase(f) == Phase::Failed).await?;
    let status = failed.status.as_ref().context("status")?;
    assert_eq!(status.attempts[0].reason.as_deref(), Some("GangTimeout"));
    let jobs: Api<Job> = namespace.api();
    wait_for_gone(&jobs, "domain-full-a1").await?;
    // The Job's pods go with it (garbage collection): no GPU stays held.
    let pods: Api<Pod> = namespace.api();
    let deadline = tokio::time::Instant::now() + GC_TIMEOUT;
    loop {
        let left = pods.list(&ListParams::default()).await?.items;
        let held: Vec<&Pod> = left
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .collect();
        if held.is_empty() {
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "{} of {} pods still held, not being deleted: {}",
            held.len(),
            left.len(),
            held.iter()
                .map(|p| describe(p))
                .collect::<Vec<_>>()
                .join("; ")
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(())
}

/// A pod's name, node, phase, owners and finalizers, for a failure message.
fn describe(pod: &Pod) -> String {
    let owners: Vec<String> = pod
        .metadata
        .owner_references
        .iter()
        .flatten()
        .map(|owner| format!("{}/{} {}", owner.kind, owner.name, owner.uid))
        .collect();
    format!(
        "{} on {} ({}), owners [{}], finalizers {:?}",
        pod.metadata.name.as_deref().unwrap_or("?"),
        pod.spec
            .as_ref()
            .and_then(|spec| spec.node_name.as_deref())
            .unwrap_or("no node"),
        pod.status
            .as_ref()
            .and_then(|status| status.phase.as_deref())
            .unwrap_or("no phase"),
        owners.join(", "),
        pod.metadata.finalizers.as_deref().unwrap_or_default()
    )
}

#[tokio::test]
async fn deleting_the_finetunejob_garbage_collects_its_children() -> Result<()> {
    let cluster = cluster_or_skip!("deleting_the_finetunejob_garbage_collects_its_children");
    let RunningLora {
        namespace,
        operator: _operator,
        ftjs,
        ..
    } = running_lora(&cluster, "ftj-delete").await?;

    ftjs.delete("support-lora", &DeleteParams::default())
        .await?;
    let jobs: Api<Job> = namespace.api();
    wait_for_gone(&jobs, "support-lora-a1").await?;
    let config_maps: Api<k8s_openapi::api::core::v1::ConfigMap> = namespace.api();
    wait_for_gone(&config_maps, "support-lora-trainer").await?;
    Ok(())
}

async fn wait_for_gone<K>(api: &Api<K>, name: &str) -> Result<()>
where
    K: Clone + std::fmt::Debug + serde::de::DeserializeOwned + kube::Resource,
{
    let deadline = tokio::time::Instant::now() + GC_TIMEOUT;
    while api.get_opt(name).await?.is_some() {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "{name} is still there"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(())
}

#[tokio::test]
async fn suspend_stops_the_trainer_pods_and_resume_runs_them_again() -> Result<()> {
    let cluster = cluster_or_skip!("suspend_stops_the_trainer_pods_and_resume_runs_them_again");
    let RunningLora {
        namespace,
        operator: _operator,
        ftjs,
        ..
    } = running_lora(&cluster, "ftj-suspend").await?;

    let suspend = |value: bool| json!({ "spec": { "suspend": value } });
    ftjs.patch(
        "support-lora",
        &PatchParams::default(),
        &Patch::Merge(&suspend(true)),
    )
    .await?;
    wait_for(&ftjs, "support-lora", TIMEOUT, |f| {
        phase(f) == Phase::Suspended
    })
    .await?;
    let jobs: Api<Job> = namespace.api();
    wait_for(&jobs, "support-lora-a1", TIMEOUT, |job: &Job| {
        job.status.as_ref().and_then(|s| s.active).unwrap_or(0) == 0
    })
    .await
    .context("a suspended Job has no active pods")?;

    ftjs.patch(
        "support-lora",
        &PatchParams::default(),
        &Patch::Merge(&suspend(false)),
    )
    .await?;
    let resumed = wait_for(&ftjs, "support-lora", TIMEOUT, |f| {
        phase(f) == Phase::Running
    })
    .await?;
    let status = resumed.status.context("status")?;
    assert_eq!(
        status.attempts.len(),
        1,
        "a resume continues the same attempt"
    );
    assert!(condition_is(&status.conditions, "Suspended", "False"));
    Ok(())
}

fn condition_is(
    conditions: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    type_: &str,
    status: &str,
) -> bool {
    conditions
        .iter()
        .any(|c| c.type_ == type_ && c.status == status)
}

/// Serves `GET /progress` at `ip`, the way the trainer does: the step moves for the first
/// `moving` reads and then stays, like a trainer that hangs.
async fn serve_progress(ip: &str, moving: u64) -> Result<tokio::task::JoinHandle<()>> {
    use std::sync::atomic::{AtomicU64, Ordering};

    let reads = Arc::new(AtomicU64::new(0));
    let app = axum::Router::new().route(
        "/progress",
        axum::routing::get(move || {
            let reads = reads.clone();
            async move {
                let step = reads.fetch_add(1, Ordering::Relaxed).min(moving) + 1;
                axum::Json(json!({
                    "phase": "training", "step": step, "totalSteps": 200, "epoch": 0.5,
                    "loss": 1.75, "baseEvalLoss": 2.25, "tokensPerSecond": 1500.0,
                    "etaSeconds": 600.0,
                }))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind((ip, 8080))
        .await
        .with_context(|| format!("failed to listen on the pod's IP {ip}:8080"))?;
    Ok(tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    }))
}

#[tokio::test]
async fn progress_is_read_from_rank_zero_and_a_stalled_trainer_is_restarted() -> Result<()> {
    let cluster =
        cluster_or_skip!("progress_is_read_from_rank_zero_and_a_stalled_trainer_is_restarted");
    let namespace = namespace(
        &cluster,
        "ftj-progress",
        &["models", "datasets", "adapters"],
    )
    .await?;
    let _operator = start_operator(&cluster, &namespace);
    let ftjs: Api<FineTuneJob> = namespace.api();
    let mut ftj = example("lora-a100.yaml", &[("outcome", "run")])?;
    ftj.spec.stall_timeout_seconds = 60;
    ftjs.create(&PostParams::default(), &ftj).await?;
    wait_for(&ftjs, "support-lora", TIMEOUT, |f| {
        phase(f) == Phase::Running
    })
    .await?;

    // The simulated pod's IP is a loopback address: serve its progress from here.
    let pods = pods_of(&namespace, "support-lora-a1").await?;
    let ip = pods
        .first()
        .and_then(|p| p.status.as_ref()?.pod_ip.clone())
        .context("the trainer pod has an IP")?;
    let _server = serve_progress(&ip, 3).await?;

    let progressing = wait_for(&ftjs, "support-lora", TIMEOUT, |f| {
        f.status
            .as_ref()
            .and_then(|s| s.progress.as_ref())
            .is_some_and(|p| p.step >= 2)
    })
    .await?;
    let status = progressing.status.as_ref().context("status")?;
    let progress = status.progress.as_ref().context("progress")?;
    assert_eq!(progress.total_steps, 200);
    assert_eq!(progress.tokens_per_second, Some(1500));
    assert_eq!(progress.loss.as_deref(), Some("1.7500"));
    assert_eq!(
        status
            .evaluation
            .as_ref()
            .and_then(|e| e.base_eval_loss.as_deref()),
        Some("2.2500")
    );

    // The step stops at 4: after the stall timeout the trainer is restarted.
    let restarted = wait_for(&ftjs, "support-lora", Duration::from_secs(150), |f| {
        f.status.as_ref().is_some_and(|s| s.attempts.len() >= 2)
    })
    .await?;
    let status = restarted.status.as_ref().context("status")?;
    assert_eq!(status.attempts[0].reason.as_deref(), Some("Stalled"));
    assert_eq!(status.restarts, 1);
    let stalled = condition(&restarted, "Stalled").context("a Stalled condition")?;
    assert!(stalled.message.contains("step 4"), "{}", stalled.message);
    Ok(())
}

/// Spot A100s at 1.80 an hour, on demand at 3.60 (every fourth simulated node is spot).
const PRICES: &str = "currency: USD\n\
gpuHourly:\n  NVIDIA-A100-SXM4-80GB: {onDemand: \"3.60\", spot: \"1.80\"}\n\
defaultGpuHourly: {onDemand: \"4.00\", spot: \"2.00\"}\n";

#[tokio::test]
async fn cost_is_the_pods_running_time_at_its_nodes_rate_across_an_operator_restart() -> Result<()>
{
    let cluster = cluster_or_skip!(
        "cost_is_the_pods_running_time_at_its_nodes_rate_across_an_operator_restart"
    );
    let namespace = namespace(&cluster, "ftj-cost", &["models", "datasets", "adapters"]).await?;
    create_prices(&namespace, PRICES).await?;
    let operator = start_pricing_operator(&cluster, &namespace);
    let ftjs: Api<FineTuneJob> = namespace.api();
    let ftj = example("lora-a100.yaml", &[("run-for", "20s")])?;
    ftjs.create(&PostParams::default(), &ftj).await?;
    let running = wait_for(&ftjs, "support-lora", TIMEOUT, |f| {
        f.status.as_ref().and_then(|s| s.cost.as_ref()).is_some() && phase(f) == Phase::Running
    })
    .await?;
    assert_eq!(
        running
            .status
            .as_ref()
            .and_then(|s| s.cost.as_ref())
            .map(|c| c.currency.as_str()),
        Some("USD")
    );

    // The operator goes away mid-run and another takes over.
    drop(operator);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let _operator = start_pricing_operator(&cluster, &namespace);
    let done = wait_for(&ftjs, "support-lora", TIMEOUT, |f| {
        phase(f) == Phase::Succeeded
    })
    .await?;

    // Exactly the pod's running time on its one GPU, priced at its node's capacity type.
    let pods = pods_of(&namespace, "support-lora-a1").await?;
    let pod = pods.first().context("the trainer pod")?;
    let seconds = ran_seconds(pod)?;
    assert!(seconds >= 20, "the pod ran its 20 s ({seconds})");
    let nodes: Api<Node> = Api::all(cluster.client.clone());
    let node = nodes.get(&node_of(pod).context("bound")?).await?;
    let spot = node
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get("karpenter.sh/capacity-type"))
        .is_some_and(|v| v == "spot");
    let (rate, key) = if spot {
        (18_000u64, "NVIDIA-A100-SXM4-80GB/spot")
    } else {
        (36_000, "NVIDIA-A100-SXM4-80GB/on-demand")
    };
    let cost = done
        .status
        .as_ref()
        .and_then(|s| s.cost.clone())
        .context("cost")?;
    assert_eq!(cost.attempts.len(), 1);
    assert_eq!(
        cost.attempts[0].usage_seconds(),
        seconds,
        "counted once, exactly"
    );
    assert_eq!(cost.attempts[0].rate_seconds, seconds * rate);
    let cents = (seconds * rate + 180_000) / 360_000;
    assert_eq!(
        cost.amount.as_str(),
        format!("{}.{:02}", cents / 100, cents % 100)
    );
    assert!(cost.rates.contains_key(key), "{:?}", cost.rates);
    assert_eq!(cost.estimated_total.as_ref(), Some(&cost.amount));

    // An invalid table is reported and the valid one stays in force.
    create_prices(&namespace, "currency: dollars\n").await?;
    let events: Api<k8s_openapi::api::events::v1::Event> = namespace.api();
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let found = events
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .any(|e| {
                e.reason.as_deref() == Some("InvalidPriceTable")
                    && e.note
                        .as_deref()
                        .is_some_and(|n| n.contains("stays in force"))
            });
        if found {
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "no InvalidPriceTable event"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(())
}

#[tokio::test]
async fn a_budget_too_small_is_refused_and_a_budget_reached_stops_the_run() -> Result<()> {
    let cluster =
        cluster_or_skip!("a_budget_too_small_is_refused_and_a_budget_reached_stops_the_run");
    let namespace = namespace(&cluster, "ftj-budget", &["models", "datasets", "adapters"]).await?;
    // 360 an hour, spot or not: 0.10 a second.
    create_prices(
        &namespace,
        "currency: USD\ngpuHourly:\n  NVIDIA-A100-SXM4-80GB: {onDemand: \"360\", spot: \"360\"}\n\
         defaultGpuHourly: {onDemand: \"360\", spot: \"360\"}\n",
    )
    .await?;
    let _operator = start_pricing_operator(&cluster, &namespace);
    let ftjs: Api<FineTuneJob> = namespace.api();

    // 1.00 does not pay the first minute (6.00): refused, nothing created.
    let mut small = example("lora-a100.yaml", &[("outcome", "run")])?;
    small.metadata.name = Some("too-small".into());
    small.spec.budget = Some(serde_json::from_value(json!({ "maxCost": "1.00" }))?);
    ftjs.create(&PostParams::default(), &small).await?;
    let refused = wait_for(&ftjs, "too-small", TIMEOUT, |f| {
        condition(f, "Admitted").is_some_and(|c| c.reason == "BudgetTooSmall")
    })
    .await?;
    assert_eq!(phase(&refused), Phase::Pending);

    // 6.50 pays the first minute and runs out at 65 s.
    let mut capped = example("lora-a100.yaml", &[("outcome", "run")])?;
    capped.metadata.name = Some("capped".into());
    capped.spec.budget = Some(serde_json::from_value(json!({ "maxCost": "6.50" }))?);
    ftjs.create(&PostParams::default(), &capped).await?;
    let stopped = wait_for(&ftjs, "capped", Duration::from_secs(150), |f| {
        phase(f) == Phase::Failed
    })
    .await?;
    let failed = condition(&stopped, "Failed").context("Failed condition")?;
    assert_eq!(failed.reason, "BudgetExceeded");
    let cost = stopped
        .status
        .as_ref()
        .and_then(|s| s.cost.clone())
        .context("cost")?;
    let cents = kubetune_crds::Money::cents(&cost.amount)?;
    assert!((650..=700).contains(&cents), "stopped at {}", cost.amount);
    assert!(
        condition(&stopped, "BudgetWarning").is_some(),
        "warned at 80 %"
    );
    let jobs: Api<Job> = namespace.api();
    wait_for_gone(&jobs, "capped-a1").await?;
    assert!(jobs.get_opt("too-small-a1").await?.is_none());
    Ok(())
}
