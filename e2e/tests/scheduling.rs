//! The scheduler places GPU pods on the simulated GPU nodes by product and count.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, ListParams, PostParams};
use kubetune_e2e::cluster_or_skip;
use kubetune_e2e::test_support::{
    A100, GPU, GpuPod, SIMULATED_NODE_SELECTOR, pod_condition, wait_for,
};

const TIMEOUT: Duration = Duration::from_secs(60);

fn label<'a>(node: &'a Node, key: &str) -> Option<&'a str> {
    node.metadata.labels.as_ref()?.get(key).map(String::as_str)
}

fn allocatable_gpus(node: &Node) -> Option<&str> {
    node.status
        .as_ref()?
        .allocatable
        .as_ref()?
        .get(GPU)
        .map(|quantity| quantity.0.as_str())
}

#[tokio::test]
async fn pod_asking_for_eight_a100s_is_scheduled_on_an_a100_node() -> Result<()> {
    let cluster = cluster_or_skip!("pod_asking_for_eight_a100s_is_scheduled_on_an_a100_node");
    let namespace = cluster.namespace("eight-a100s").await?;
    let pods: Api<Pod> = namespace.api();
    let pod = GpuPod::new("trainer", 8).product(A100).build()?;
    pods.create(&PostParams::default(), &pod).await?;

    let pod = wait_for(&pods, "trainer", TIMEOUT, |pod: &Pod| {
        pod_condition(pod, "PodScheduled").is_some_and(|(status, _)| status == "True")
    })
    .await?;
    let node_name = pod
        .spec
        .and_then(|spec| spec.node_name)
        .context("a scheduled pod has a node")?;
    let node = Api::<Node>::all(cluster.client.clone())
        .get(&node_name)
        .await?;
    assert_eq!(label(&node, "nvidia.com/gpu.product"), Some(A100));
    assert_eq!(allocatable_gpus(&node), Some("8"));
    Ok(())
}

#[tokio::test]
async fn pod_asking_for_nine_gpus_stays_unschedulable() -> Result<()> {
    let cluster = cluster_or_skip!("pod_asking_for_nine_gpus_stays_unschedulable");
    let namespace = cluster.namespace("nine-gpus").await?;
    let pods: Api<Pod> = namespace.api();
    pods.create(&PostParams::default(), &GpuPod::new("too-big", 9).build()?)
        .await?;

    let pod = wait_for(&pods, "too-big", TIMEOUT, |pod: &Pod| {
        pod_condition(pod, "PodScheduled").is_some_and(|(status, _)| status == "False")
    })
    .await?;
    assert_eq!(
        pod_condition(&pod, "PodScheduled"),
        Some(("False", Some("Unschedulable")))
    );
    let message = pod
        .status
        .as_ref()
        .and_then(|status| status.conditions.as_ref())
        .and_then(|conditions| conditions.iter().find(|c| c.type_ == "PodScheduled"))
        .and_then(|condition| condition.message.clone())
        .unwrap_or_default();
    assert!(
        message.contains("Insufficient nvidia.com/gpu"),
        "the scheduler names the missing resource: {message}"
    );
    assert!(pod.spec.and_then(|spec| spec.node_name).is_none());
    Ok(())
}

#[tokio::test]
async fn pod_without_the_gpu_toleration_is_kept_off_the_gpu_nodes() -> Result<()> {
    let cluster = cluster_or_skip!("pod_without_the_gpu_toleration_is_kept_off_the_gpu_nodes");
    let namespace = cluster.namespace("no-toleration").await?;
    let pods: Api<Pod> = namespace.api();
    let pod = GpuPod::new("untolerated", 1)
        .without_gpu_toleration()
        .build()?;
    pods.create(&PostParams::default(), &pod).await?;

    let pod = wait_for(&pods, "untolerated", TIMEOUT, |pod: &Pod| {
        pod_condition(pod, "PodScheduled").is_some_and(|(status, _)| status == "False")
    })
    .await?;
    let message = pod
        .status
        .and_then(|status| status.conditions)
        .and_then(|conditions| conditions.into_iter().find(|c| c.type_ == "PodScheduled"))
        .and_then(|condition| condition.message)
        .unwrap_or_default();
    // The scheduler counts the nodes it rejected for a taint without naming the
    // taint; every simulated node carries only the GPU one.
    assert!(
        message.contains("had untolerated taint"),
        "the scheduler says a taint kept the pod off: {message}"
    );
    Ok(())
}

#[tokio::test]
async fn simulated_gpu_nodes_are_ready_and_advertise_their_gpus() -> Result<()> {
    let cluster = cluster_or_skip!("simulated_gpu_nodes_are_ready_and_advertise_their_gpus");
    let nodes = Api::<Node>::all(cluster.client.clone())
        .list(&ListParams::default().labels(SIMULATED_NODE_SELECTOR))
        .await?;
    ensure!(!nodes.items.is_empty(), "no simulated GPU nodes");
    for node in &nodes.items {
        let name = node.metadata.name.as_deref().unwrap_or("?");
        let count = label(node, "nvidia.com/gpu.count").context("gpu.count label")?;
        assert_eq!(
            allocatable_gpus(node),
            Some(count),
            "{name}: allocatable GPUs"
        );
        assert!(
            label(node, "nvidia.com/gpu.product").is_some_and(|p| !p.is_empty()),
            "{name}: gpu.product"
        );
        assert!(
            label(node, "node.kubernetes.io/instance-type").is_some(),
            "{name}: instance type"
        );
        assert!(
            matches!(
                label(node, "karpenter.sh/capacity-type"),
                Some("spot" | "on-demand")
            ),
            "{name}: capacity type"
        );
        let spec = node.spec.as_ref().context("node spec")?;
        assert!(
            spec.taints
                .iter()
                .flatten()
                .any(|taint| taint.key == GPU && taint.effect == "NoSchedule"),
            "{name}: GPU taint"
        );
        assert!(
            spec.pod_cidr
                .as_deref()
                .is_some_and(|cidr| cidr.starts_with("127.64.") && cidr.ends_with(".0/24")),
            "{name}: loopback pod CIDR {:?}",
            spec.pod_cidr
        );
        let ready = node
            .status
            .as_ref()
            .and_then(|status| status.conditions.as_ref())
            .and_then(|conditions| conditions.iter().find(|c| c.type_ == "Ready"))
            .map(|condition| condition.status.as_str());
        assert_eq!(ready, Some("True"), "{name}: Ready");
    }
    Ok(())
}
