//! Pods on the simulated nodes go through the lifecycle kwok's stages
//! (`e2e/cluster/kwok-stages.yaml`) give them, and the controller manager turns
//! Jobs into pods and finishes them.

use std::net::{Ipv4Addr, TcpListener};
use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, ListParams, PostParams};
use kubetune_e2e::cluster_or_skip;
use kubetune_e2e::test_support::{GpuPod, H100, phase, pod_condition, wait_for};
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(60);

fn job(name: &str, pods: u32, template: &GpuPod) -> Result<Job> {
    Ok(serde_json::from_value(json!({
        "metadata": { "name": name },
        "spec": {
            "completions": pods,
            "parallelism": pods,
            "backoffLimit": 0,
            "template": template.template(),
        },
    }))?)
}

fn job_condition(job: &Job, kind: &str) -> bool {
    job.status
        .as_ref()
        .and_then(|status| status.conditions.as_ref())
        .is_some_and(|conditions| {
            conditions
                .iter()
                .any(|condition| condition.type_ == kind && condition.status == "True")
        })
}

#[tokio::test]
async fn job_becomes_pods_that_succeed_and_the_job_completes() -> Result<()> {
    let cluster = cluster_or_skip!("job_becomes_pods_that_succeed_and_the_job_completes");
    let namespace = cluster.namespace("job-succeeds").await?;
    let jobs: Api<Job> = namespace.api();
    let template = GpuPod::new("unused", 8).product(H100);
    jobs.create(&PostParams::default(), &job("finetune", 2, &template)?)
        .await?;

    let job = wait_for(&jobs, "finetune", TIMEOUT, |job: &Job| {
        job_condition(job, "Complete")
    })
    .await?;
    assert_eq!(job.status.and_then(|status| status.succeeded), Some(2));
    let pods: Api<Pod> = namespace.api();
    let pods = pods
        .list(&ListParams::default().labels("batch.kubernetes.io/job-name=finetune"))
        .await?;
    assert_eq!(pods.items.len(), 2);
    for pod in &pods.items {
        assert_eq!(phase(pod), "Succeeded");
        assert!(
            pod.spec
                .as_ref()
                .and_then(|s| s.node_name.as_ref())
                .is_some(),
            "a finished pod ran on a node"
        );
    }
    Ok(())
}

#[tokio::test]
async fn job_whose_pods_are_annotated_to_fail_ends_failed() -> Result<()> {
    let cluster = cluster_or_skip!("job_whose_pods_are_annotated_to_fail_ends_failed");
    let namespace = cluster.namespace("job-fails").await?;
    let jobs: Api<Job> = namespace.api();
    let template = GpuPod::new("unused", 1).annotation("sim.kubetune.io/outcome", "fail");
    jobs.create(&PostParams::default(), &job("doomed", 1, &template)?)
        .await?;

    let job = wait_for(&jobs, "doomed", TIMEOUT, |job: &Job| {
        job_condition(job, "Failed")
    })
    .await?;
    assert_eq!(job.status.and_then(|status| status.failed), Some(1));
    Ok(())
}

#[tokio::test]
async fn pod_annotated_to_fail_ends_failed_with_the_exit_code_it_names() -> Result<()> {
    let cluster = cluster_or_skip!("pod_annotated_to_fail_ends_failed_with_the_exit_code_it_names");
    let namespace = cluster.namespace("pod-fails").await?;
    let pods: Api<Pod> = namespace.api();
    let pod = GpuPod::new("crashes", 1)
        .annotation("sim.kubetune.io/outcome", "fail")
        .annotation("sim.kubetune.io/exit-code", "137")
        .annotation("sim.kubetune.io/message", "CUDA out of memory")
        .build()?;
    pods.create(&PostParams::default(), &pod).await?;

    let pod = wait_for(&pods, "crashes", TIMEOUT, |pod: &Pod| {
        phase(pod) == "Failed"
    })
    .await?;
    let terminated = pod
        .status
        .and_then(|status| status.container_statuses)
        .and_then(|statuses| statuses.into_iter().next())
        .and_then(|status| status.state)
        .and_then(|state| state.terminated)
        .context("a failed container is terminated")?;
    assert_eq!(terminated.exit_code, 137);
    assert_eq!(terminated.message.as_deref(), Some("CUDA out of memory"));
    Ok(())
}

#[tokio::test]
async fn pod_annotated_pending_is_scheduled_but_never_starts() -> Result<()> {
    let cluster = cluster_or_skip!("pod_annotated_pending_is_scheduled_but_never_starts");
    let namespace = cluster.namespace("pod-pending").await?;
    let pods: Api<Pod> = namespace.api();
    let pod = GpuPod::new("waiting", 1)
        .annotation("sim.kubetune.io/outcome", "pending")
        .build()?;
    pods.create(&PostParams::default(), &pod).await?;

    wait_for(&pods, "waiting", TIMEOUT, |pod: &Pod| {
        pod_condition(pod, "PodScheduled").is_some_and(|(status, _)| status == "True")
    })
    .await?;
    // kwok acts on a pod within milliseconds of its binding; give it ample time to
    // (wrongly) start this one.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let pod = pods.get("waiting").await?;
    assert_eq!(phase(&pod), "Pending");
    assert!(pod.status.and_then(|status| status.pod_ip).is_none());
    Ok(())
}

#[tokio::test]
async fn pod_annotated_to_run_for_a_while_succeeds_only_after_that_time() -> Result<()> {
    let cluster =
        cluster_or_skip!("pod_annotated_to_run_for_a_while_succeeds_only_after_that_time");
    let namespace = cluster.namespace("pod-runs-for").await?;
    let pods: Api<Pod> = namespace.api();
    let pod = GpuPod::new("short-run", 1)
        .annotation("sim.kubetune.io/outcome", "succeed")
        .annotation("sim.kubetune.io/run-for", "3s")
        .build()?;
    pods.create(&PostParams::default(), &pod).await?;

    let running = wait_for(&pods, "short-run", TIMEOUT, |pod: &Pod| {
        phase(pod) == "Running"
    })
    .await?;
    let started = running
        .status
        .and_then(|status| status.start_time)
        .context("a running pod has a start time")?;
    let done = wait_for(&pods, "short-run", TIMEOUT, |pod: &Pod| {
        phase(pod) == "Succeeded"
    })
    .await?;
    let finished = done
        .status
        .and_then(|status| status.container_statuses)
        .and_then(|statuses| statuses.into_iter().next())
        .and_then(|status| status.state)
        .and_then(|state| state.terminated)
        .map(|terminated| terminated.finished_at)
        .context("a succeeded container is terminated")?
        .context("with a finish time")?;
    // Timestamps have whole seconds.
    let ran = finished.0.duration_since(started.0);
    assert!(ran.as_millis() >= 2000, "ran {ran:?}, asked to run for 3s");
    Ok(())
}

#[tokio::test]
async fn running_pod_gets_a_loopback_ip_from_its_node_that_a_process_can_listen_on() -> Result<()> {
    let cluster = cluster_or_skip!(
        "running_pod_gets_a_loopback_ip_from_its_node_that_a_process_can_listen_on"
    );
    let namespace = cluster.namespace("pod-ip").await?;
    let pods: Api<Pod> = namespace.api();
    pods.create(&PostParams::default(), &GpuPod::new("server", 1).build()?)
        .await?;

    let pod = wait_for(&pods, "server", TIMEOUT, |pod: &Pod| {
        phase(pod) == "Running"
    })
    .await?;
    let ip: Ipv4Addr = pod
        .status
        .as_ref()
        .and_then(|status| status.pod_ip.as_deref())
        .context("a running pod has an IP")?
        .parse()?;
    let node_name = pod
        .spec
        .and_then(|spec| spec.node_name)
        .context("a running pod has a node")?;
    let node = Api::<Node>::all(cluster.client.clone())
        .get(&node_name)
        .await?;
    let cidr = node
        .spec
        .and_then(|spec| spec.pod_cidr)
        .context("simulated nodes have a pod CIDR")?;
    let network: Ipv4Addr = cidr
        .split_once('/')
        .context("a CIDR has a prefix length")?
        .0
        .parse()?;
    assert!(ip.is_loopback(), "{ip} is a loopback address");
    assert_eq!(
        ip.octets()[..3],
        network.octets()[..3],
        "{ip} is in its node's {cidr}"
    );
    let listener = TcpListener::bind((ip, 0))?;
    assert_eq!(listener.local_addr()?.ip(), ip);
    Ok(())
}
