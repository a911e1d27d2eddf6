//! FineTuneJobs on the simulated nodes: a namespace with the examples' claims, the
//! examples with a simulated trainer outcome, an in-process operator for the namespace
//! (stopped when dropped, as a crash would stop it) and price tables. Shared by the
//! FineTuneJob tests and the fault tests.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::{Namespace, PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kubetune_crds::finetunejob::{FineTuneJob, PodMetadata};
use kubetune_operator::cost::TableSource;
use kubetune_operator::finetunejob::controller::{self, Settings};
use kubetune_operator::metrics::Metrics;
use serde_json::json;

use crate::test_support::{Cluster, TestNamespace, workspace_root};

/// An operator for one namespace, stopped when dropped.
#[derive(Debug)]
pub struct Operator(tokio::task::JoinHandle<()>);

impl Operator {
    /// Whether its task ended (it should run until dropped).
    pub fn is_finished(&self) -> bool {
        self.0.is_finished()
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.0.abort();
    }
}

pub fn start_operator(cluster: &Cluster, namespace: &TestNamespace) -> Operator {
    start_operator_with(cluster, namespace, None)
}

/// An operator that prices jobs with the table in ConfigMap `prices` of the namespace.
pub fn start_pricing_operator(cluster: &Cluster, namespace: &TestNamespace) -> Operator {
    let source = TableSource {
        namespace: namespace.name.clone(),
        name: "prices".into(),
    };
    start_operator_with(cluster, namespace, Some(source))
}

pub fn start_operator_with(
    cluster: &Cluster,
    namespace: &TestNamespace,
    price_table: Option<TableSource>,
) -> Operator {
    let settings = Settings {
        trainer_image: "kubetune/trainer:e2e".into(),
        resync: Duration::from_secs(30),
        progress_interval: Duration::from_secs(2),
        price_table,
    };
    let metrics = Arc::new(Metrics::register(&mut Default::default()));
    Operator(tokio::spawn(controller::run(
        cluster.client.clone(),
        vec![namespace.name.clone()],
        settings,
        metrics,
    )))
}

/// A namespace that enforces Pod Security "restricted", with the claims the examples use.
pub async fn namespace(cluster: &Cluster, test: &str, claims: &[&str]) -> Result<TestNamespace> {
    let namespace = cluster.namespace(test).await?;
    let namespaces: Api<Namespace> = Api::all(cluster.client.clone());
    let labels = json!({ "metadata": { "labels": {
        "pod-security.kubernetes.io/enforce": "restricted",
        "pod-security.kubernetes.io/enforce-version": "latest",
    }}});
    namespaces
        .patch(
            &namespace.name,
            &PatchParams::default(),
            &Patch::Merge(&labels),
        )
        .await
        .context("failed to label the namespace restricted")?;
    for claim in claims {
        create_claim(cluster, &namespace, claim).await?;
    }
    Ok(namespace)
}

/// A claim, bound at once to a volume made for it: the scheduler only places pods whose
/// claims are bound, and this cluster has no provisioner. The volumes are never mounted
/// (the nodes are simulated); they stay behind, Released, until `cluster down`.
pub async fn create_claim(cluster: &Cluster, namespace: &TestNamespace, name: &str) -> Result<()> {
    let volume_name = format!("{}-{name}", namespace.name);
    let volumes: Api<PersistentVolume> = Api::all(cluster.client.clone());
    let volume: PersistentVolume = serde_json::from_value(json!({
        "metadata": { "name": volume_name, "labels": { "kubetune.io/e2e": "true" } },
        "spec": {
            "capacity": { "storage": "1Gi" },
            "accessModes": ["ReadWriteOnce"],
            "storageClassName": "",
            "persistentVolumeReclaimPolicy": "Retain",
            "hostPath": { "path": format!("/tmp/kubetune-e2e/{volume_name}") },
            "claimRef": { "namespace": namespace.name, "name": name },
        },
    }))?;
    volumes.create(&PostParams::default(), &volume).await?;
    let claims: Api<PersistentVolumeClaim> = namespace.api();
    let claim: PersistentVolumeClaim = serde_json::from_value(json!({
        "metadata": { "name": name },
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "storageClassName": "",
            "volumeName": volume_name,
            "resources": { "requests": { "storage": "1Gi" } },
        },
    }))?;
    claims.create(&PostParams::default(), &claim).await?;
    Ok(())
}

/// `examples/<file>` in the test's namespace, with the trainer's simulated outcome.
pub fn example(file: &str, outcome: &[(&str, &str)]) -> Result<FineTuneJob> {
    let path = workspace_root().join("examples").join(file);
    let text = std::fs::read_to_string(&path)?;
    let mut ftj: FineTuneJob = serde_yaml::from_str(&text)?;
    ftj.metadata.namespace = None;
    ftj.spec.scheduling.queue_name = None;
    ftj.spec.scheduling.priority_class_name = None;
    ftj.spec.scheduling.node_selector.clear();
    if !outcome.is_empty() {
        ftj.spec.pod_metadata = Some(PodMetadata {
            annotations: outcome
                .iter()
                .map(|(k, v)| (format!("sim.kubetune.io/{k}"), (*v).to_owned()))
                .collect(),
            ..PodMetadata::default()
        });
    }
    Ok(ftj)
}

/// The price table ConfigMap the pricing operator reads.
pub async fn create_prices(namespace: &TestNamespace, table: &str) -> Result<()> {
    let config_maps: Api<k8s_openapi::api::core::v1::ConfigMap> = namespace.api();
    let prices = json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": { "name": "prices" },
        "data": { "prices.yaml": table },
    });
    config_maps
        .patch(
            "prices",
            &PatchParams::apply("kubetune-e2e").force(),
            &Patch::Apply(&prices),
        )
        .await?;
    Ok(())
}

/// When the pod's trainer container started and finished, from its terminated state.
pub fn trainer_run(pod: &Pod) -> Result<(Timestamp, Timestamp)> {
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    let terminated = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|cs| cs.first())
        .and_then(|c| c.state.as_ref()?.terminated.as_ref())
        .with_context(|| format!("{name}'s trainer has not terminated"))?;
    let started = terminated.started_at.as_ref().context("startedAt")?.0;
    let finished = terminated.finished_at.as_ref().context("finishedAt")?.0;
    Ok((started, finished))
}

/// Seconds the pod's trainer container ran: what the cost ledger must have counted.
pub fn ran_seconds(pod: &Pod) -> Result<u64> {
    let (started, finished) = trainer_run(pod)?;
    Ok(u64::try_from(finished.as_second() - started.as_second())?)
}
