//! kubetune's whole job on the real node, as a newcomer would run it: install the
//! chart (the operator as a real pod), put a base model and a chat dataset on local
//! volumes, train a LoRA adapter with a FineTuneJob, roll it into two `kubetune-serve`
//! replicas with an AdapterDeployment, and ask the base model and the adapter the same
//! question.
//!
//! `cargo xtask demo` runs it with SmolLM2-135M-Instruct and release images; the
//! end-to-end test `real_node` runs it with a tiny random model and the dev images
//! `cargo xtask test` builds. Both need the real node `cargo xtask cluster up` adds
//! as root, and the images imported into its containerd.

use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Node, PersistentVolume, PersistentVolumeClaim, Pod};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kubetune_crds::adapterdeployment::{AdapterDeployment, AdapterDeploymentPhase};
use kubetune_crds::finetunejob::{FineTuneJob, Phase};
use kubetune_trainer::adapter::sha256_hex;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::test_support::{Cluster, wait_for, workspace_root};

/// The real node's name, label and taint (`xtask/src/cluster/realnode.rs`).
pub const REAL_NODE: &str = "kubetune-real";
pub const REAL_NODE_LABEL: &str = "kubetune.io/real-node";
/// The local volumes' StorageClass.
pub const STORAGE_CLASS: &str = "kubetune-local";
/// The user the images run as, who must own what is put on the volumes.
const IMAGE_USER: u32 = 65532;
/// The FineTuneJob, Deployment and adapter names.
pub const JOB: &str = "chat-lora";
const SERVING: &str = "chat";
const ADAPTER: &str = "chat";
/// Where the serving pods mount the volumes, and the base model's served name.
const MODELS_MOUNT: &str = "/models";
const ADAPTERS_MOUNT: &str = "/adapters";
pub const BASE_MODEL_NAME: &str = "base";

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Created when missing, with Pod Security "restricted" enforced.
    pub namespace: String,
    /// The images' tag: `0.1.0` (release, `cargo xtask images`) or `0.1.0-dev`.
    pub image_tag: String,
    /// A Hugging Face checkpoint directory on this machine.
    pub model: PathBuf,
    /// Chat lines (`{"messages": …}`) for training and evaluation.
    pub train: Vec<Value>,
    pub eval: Vec<Value>,
    /// `spec.hyperparameters` and `spec.lora` of the job.
    pub hyperparameters: Value,
    pub lora: Value,
    /// CPU and memory of the trainer pod.
    pub cpu: String,
    pub memory: String,
    /// The question both models are asked, and how long an answer may be.
    pub prompt: String,
    pub max_tokens: u32,
    /// How long training may take.
    pub training_timeout: Duration,
}

/// What came of it.
#[derive(Debug)]
pub struct Outcome {
    pub job: FineTuneJob,
    /// The sha256 of the adapter's weights as found on the volume.
    pub weights_sha256: String,
    pub adapter: AdapterDeployment,
    /// The serving pods' IPs.
    pub serving_pods: Vec<String>,
    pub base_answer: String,
    pub adapter_answer: String,
    /// The name the adapter is served under (name plus digest).
    pub adapter_model: String,
}

/// Server-side apply of `object` under the flow's field manager.
async fn apply<K>(api: &Api<K>, name: &str, object: &K) -> kube::Result<K>
where
    K: kube::Resource + Clone + Debug + DeserializeOwned + Serialize,
{
    api.patch(
        name,
        &PatchParams::apply("kubetune-e2e").force(),
        &Patch::Apply(object),
    )
    .await
}

/// Whether the real node is there and Ready.
pub async fn real_node_ready(cluster: &Cluster) -> Result<bool> {
    let nodes: Api<Node> = Api::all(cluster.client.clone());
    let Some(node) = nodes.get_opt(REAL_NODE).await? else {
        return Ok(false);
    };
    Ok(node
        .status
        .and_then(|status| status.conditions)
        .unwrap_or_default()
        .iter()
        .any(|condition| condition.type_ == "Ready" && condition.status == "True"))
}

/// Runs the flow; `progress` sees the job at each poll while it trains.
pub async fn run(
    cluster: &Cluster,
    options: &Options,
    mut progress: impl FnMut(&FineTuneJob),
) -> Result<Outcome> {
    let ns = options.namespace.as_str();
    ensure_namespace(cluster, ns).await?;
    let volumes = Volumes::claim(cluster, ns).await?;
    volumes.fill(options)?;
    install_chart(cluster, ns, &options.image_tag)?;

    let jobs: Api<FineTuneJob> = Api::namespaced(cluster.client.clone(), ns);
    jobs.create(&PostParams::default(), &fine_tune_job(options)?)
        .await
        .context("failed to create the FineTuneJob")?;
    let job = watch_training(&jobs, options.training_timeout, &mut progress).await?;
    let artifact = job
        .status
        .as_ref()
        .and_then(|status| status.artifact.clone())
        .context("a Succeeded job records its artifact")?;
    let weights = volumes
        .adapters
        .join(&artifact.path)
        .join("adapter_model.safetensors");
    let weights_sha256 = sha256_hex(
        &std::fs::read(&weights)
            .with_context(|| format!("failed to read {}", weights.display()))?,
    );

    let serving_pods = start_serving(cluster, ns, &options.image_tag).await?;
    let adapters: Api<AdapterDeployment> = Api::namespaced(cluster.client.clone(), ns);
    adapters
        .create(&PostParams::default(), &adapter_deployment()?)
        .await
        .context("failed to create the AdapterDeployment")?;
    let adapter = wait_for(&adapters, ADAPTER, Duration::from_secs(180), |deployment| {
        deployment
            .status
            .as_ref()
            .is_some_and(|status| status.phase == AdapterDeploymentPhase::Available)
    })
    .await
    .context("the AdapterDeployment did not become Available")?;
    let adapter_model = adapter
        .status
        .as_ref()
        .and_then(|status| status.adapters.iter().find(|a| a.name == ADAPTER))
        .map(|version| version.version.clone())
        .context("an Available AdapterDeployment maps the adapter to its version")?;

    let pod = serving_pods.first().context("a serving pod")?;
    let base_answer = chat(pod, BASE_MODEL_NAME, &options.prompt, options.max_tokens).await?;
    let adapter_answer = chat(pod, &adapter_model, &options.prompt, options.max_tokens).await?;
    Ok(Outcome {
        job,
        weights_sha256,
        adapter,
        serving_pods,
        base_answer,
        adapter_answer,
        adapter_model,
    })
}

/// Creates namespace `name` with Pod Security "restricted" enforced, and waits for its
/// default service account.
pub async fn ensure_namespace(cluster: &Cluster, name: &str) -> Result<()> {
    let namespaces: Api<Namespace> = Api::all(cluster.client.clone());
    let namespace: Namespace = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": { "name": name, "labels": {
            // Every pod kubetune creates, and the chart's, must pass "restricted".
            "pod-security.kubernetes.io/enforce": "restricted",
            "pod-security.kubernetes.io/enforce-version": "latest",
        }},
    }))?;
    apply(&namespaces, name, &namespace)
        .await
        .with_context(|| format!("failed to create namespace {name}"))?;
    let accounts: Api<k8s_openapi::api::core::v1::ServiceAccount> =
        Api::namespaced(cluster.client.clone(), name);
    wait_for(&accounts, "default", Duration::from_secs(60), |_| true).await?;
    Ok(())
}

/// The three claims and the host directories behind them.
#[derive(Debug)]
pub struct Volumes {
    pub models: PathBuf,
    pub datasets: PathBuf,
    pub adapters: PathBuf,
}

impl Volumes {
    /// Claims `models`, `datasets` and `adapters` from the local volumes; they bind at
    /// once (the class binds immediately), so data can go in before any pod runs.
    pub async fn claim(cluster: &Cluster, ns: &str) -> Result<Self> {
        let claims: Api<PersistentVolumeClaim> = Api::namespaced(cluster.client.clone(), ns);
        let volumes: Api<PersistentVolume> = Api::all(cluster.client.clone());
        let mut dirs = Vec::new();
        for name in ["models", "datasets", "adapters"] {
            let claim: PersistentVolumeClaim = serde_json::from_value(json!({
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "metadata": { "name": name },
                "spec": {
                    "storageClassName": STORAGE_CLASS,
                    "accessModes": ["ReadWriteOnce"],
                    "resources": { "requests": { "storage": "5Gi" } },
                },
            }))?;
            apply(&claims, name, &claim)
                .await
                .with_context(|| format!("failed to claim {name}"))?;
            let bound = wait_for(&claims, name, Duration::from_secs(60), |claim| {
                claim
                    .spec
                    .as_ref()
                    .and_then(|s| s.volume_name.as_ref())
                    .is_some()
            })
            .await
            .with_context(|| {
                format!(
                    "claim {name} did not bind: is the real node up (StorageClass {STORAGE_CLASS})?"
                )
            })?;
            let volume_name = bound
                .spec
                .and_then(|spec| spec.volume_name)
                .context("a bound claim names its volume")?;
            let volume = volumes.get(&volume_name).await?;
            let path = volume
                .spec
                .and_then(|spec| spec.local)
                .map(|local| PathBuf::from(local.path))
                .with_context(|| format!("volume {volume_name} is not a local volume"))?;
            dirs.push(path);
        }
        let [models, datasets, adapters] = <[PathBuf; 3]>::try_from(dirs)
            .map_err(|_| anyhow::anyhow!("three volumes were claimed"))?;
        Ok(Self {
            models,
            datasets,
            adapters,
        })
    }

    /// The base model under `base/`, the dataset as `train.jsonl` and `eval.jsonl`.
    fn fill(&self, options: &Options) -> Result<()> {
        self.put(&options.model, &options.train, &options.eval)
    }

    /// `model` under `base/`, `train` and `eval` as `train.jsonl` and `eval.jsonl`,
    /// owned by the images' user.
    pub fn put(&self, model: &Path, train: &[Value], eval: &[Value]) -> Result<()> {
        let base = self.models.join("base");
        copy_dir(model, &base)?;
        write_jsonl(&self.datasets.join("train.jsonl"), train)?;
        write_jsonl(&self.datasets.join("eval.jsonl"), eval)?;
        for dir in [&self.models, &self.datasets, &self.adapters] {
            chown_tree(dir)?;
        }
        Ok(())
    }
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("failed to create {}", to.display()))?;
    for entry in
        std::fs::read_dir(from).with_context(|| format!("failed to read {}", from.display()))?
    {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target).with_context(|| {
                format!(
                    "failed to copy {} to {}",
                    entry.path().display(),
                    target.display()
                )
            })?;
        }
    }
    Ok(())
}

fn write_jsonl(path: &Path, lines: &[Value]) -> Result<()> {
    let text: String = lines.iter().map(|line| format!("{line}\n")).collect();
    std::fs::write(path, text).with_context(|| format!("failed to write {}", path.display()))
}

/// The images' user owns everything on the volumes (they run as 65532, not root).
fn chown_tree(dir: &Path) -> Result<()> {
    std::os::unix::fs::chown(dir, Some(IMAGE_USER), Some(IMAGE_USER))
        .with_context(|| format!("failed to chown {}", dir.display()))?;
    if dir.is_dir() {
        for entry in std::fs::read_dir(dir)? {
            chown_tree(&entry?.path())?;
        }
    }
    Ok(())
}

/// `helm upgrade --install` of charts/kubetune into `ns`, watching only `ns`, the
/// operator on the real node from the imported image; waits until it is available.
pub fn install_chart(cluster: &Cluster, ns: &str, tag: &str) -> Result<()> {
    let chart = workspace_root().join("charts/kubetune");
    let output = cluster.helm()
        .args(["upgrade", "--install", "kubetune"])
        .arg(&chart)
        .args(["--namespace", ns, "--skip-crds", "--wait", "--timeout", "180s"])
        .args([
            "--set",
            "image.repository=docker.io/kubetune/operator",
            "--set",
            &format!("image.tag={tag}"),
            "--set",
            "image.pullPolicy=Never",
            "--set",
            &format!("trainer.image=docker.io/kubetune/trainer:{tag}"),
            "--set",
            "replicaCount=1",
            "--set",
            "podDisruptionBudget.enabled=false",
            "--set",
            "scope.mode=namespaced",
            "--set",
            "logFormat=text",
            // A live view of one job: its progress read every 5 s instead of 60.
            "--set",
            "progressIntervalSeconds=5",
            "--set-json",
            &format!("nodeSelector={{\"{REAL_NODE_LABEL}\":\"true\"}}"),
            "--set-json",
            &format!(
                "tolerations=[{{\"key\":\"{REAL_NODE_LABEL}\",\"operator\":\"Exists\",\"effect\":\"NoSchedule\"}}]"
            ),
        ])
        .output()
        .context("failed to run helm")?;
    if !output.status.success() {
        bail!(
            "helm install failed ({}):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// `spec.scheduling` that puts a trainer on the real node.
pub fn placement() -> Value {
    json!({
        "tolerations": [{ "key": REAL_NODE_LABEL, "operator": "Exists", "effect": "NoSchedule" }],
        "nodeSelector": { REAL_NODE_LABEL: "true" },
    })
}

fn fine_tune_job(options: &Options) -> Result<FineTuneJob> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": { "name": JOB },
        "spec": {
            "method": "lora",
            "baseModel": { "name": BASE_MODEL_NAME, "volume": { "claimName": "models", "path": "base" } },
            "dataset": {
                "format": "chat",
                "claimName": "datasets",
                "trainPath": "train.jsonl",
                "evalPath": "eval.jsonl",
            },
            "hyperparameters": options.hyperparameters,
            "lora": options.lora,
            // No GPU: the CPU mode, priced per core-hour.
            "resources": { "cpu": options.cpu, "memory": options.memory },
            "output": { "volume": { "claimName": "adapters", "path": "chat/v1" } },
            "scheduling": placement(),
        },
    }))?)
}

/// Polls the job until it succeeds (and fails the flow when it fails or times out).
async fn watch_training(
    jobs: &Api<FineTuneJob>,
    timeout: Duration,
    progress: &mut impl FnMut(&FineTuneJob),
) -> Result<FineTuneJob> {
    watch_job(jobs, JOB, timeout, |job| {
        progress(job);
        std::future::ready(Ok(()))
    })
    .await
}

/// Polls FineTuneJob `name` every second until it succeeds (an error when it fails or
/// `timeout` passes), handing each reading to `progress` first.
pub async fn watch_job<F>(
    jobs: &Api<FineTuneJob>,
    name: &str,
    timeout: Duration,
    mut progress: impl FnMut(&FineTuneJob) -> F,
) -> Result<FineTuneJob>
where
    F: std::future::Future<Output = Result<()>>,
{
    let start = Instant::now();
    loop {
        let job = jobs.get(name).await?;
        progress(&job).await?;
        match job.status.as_ref().map(|status| status.phase) {
            Some(Phase::Succeeded) => return Ok(job),
            Some(Phase::Failed) => bail!(
                "the FineTuneJob failed: {}",
                serde_json::to_string_pretty(&job.status)?
            ),
            _ => {}
        }
        if start.elapsed() > timeout {
            bail!(
                "the FineTuneJob did not succeed within {}s: {}",
                timeout.as_secs(),
                serde_json::to_string_pretty(&job.status)?
            );
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Two `kubetune-serve` replicas of the base model with the adapters volume mounted;
/// their IPs once Ready.
async fn start_serving(cluster: &Cluster, ns: &str, tag: &str) -> Result<Vec<String>> {
    let deployments: Api<Deployment> = Api::namespaced(cluster.client.clone(), ns);
    let deployment: Deployment = serde_json::from_value(json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": { "name": SERVING },
        "spec": {
            "replicas": 2,
            "selector": { "matchLabels": { "app": SERVING } },
            "template": {
                "metadata": { "labels": { "app": SERVING } },
                "spec": {
                    "nodeSelector": { REAL_NODE_LABEL: "true" },
                    "tolerations": [{ "key": REAL_NODE_LABEL, "operator": "Exists", "effect": "NoSchedule" }],
                    "securityContext": {
                        "runAsNonRoot": true,
                        "runAsUser": IMAGE_USER,
                        "runAsGroup": IMAGE_USER,
                        "seccompProfile": { "type": "RuntimeDefault" },
                    },
                    "containers": [{
                        "name": "serve",
                        "image": format!("docker.io/kubetune/trainer:{tag}"),
                        "imagePullPolicy": "Never",
                        "command": ["kubetune-serve"],
                        "args": [
                            "--model", format!("{MODELS_MOUNT}/base"),
                            "--served-model-name", BASE_MODEL_NAME,
                            "--port", "8000",
                            "--log-format", "text",
                        ],
                        "ports": [{ "name": "http", "containerPort": 8000 }],
                        "readinessProbe": {
                            "httpGet": { "path": "/health", "port": "http" },
                            "periodSeconds": 2,
                        },
                        "volumeMounts": [
                            { "name": "models", "mountPath": MODELS_MOUNT, "readOnly": true },
                            { "name": "adapters", "mountPath": ADAPTERS_MOUNT, "readOnly": true },
                        ],
                        "securityContext": {
                            "allowPrivilegeEscalation": false,
                            "readOnlyRootFilesystem": true,
                            "capabilities": { "drop": ["ALL"] },
                        },
                    }],
                    "volumes": [
                        { "name": "models", "persistentVolumeClaim": { "claimName": "models", "readOnly": true } },
                        { "name": "adapters", "persistentVolumeClaim": { "claimName": "adapters", "readOnly": true } },
                    ],
                },
            },
        },
    }))?;
    apply(&deployments, SERVING, &deployment)
        .await
        .context("failed to create the serving Deployment")?;
    wait_for(
        &deployments,
        SERVING,
        Duration::from_secs(180),
        |deployment| {
            deployment
                .status
                .as_ref()
                .and_then(|status| status.ready_replicas)
                == Some(2)
        },
    )
    .await
    .context("the serving replicas did not become Ready")?;
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), ns);
    let ips = pods
        .list(&ListParams::default().labels(&format!("app={SERVING}")))
        .await?
        .items
        .into_iter()
        .filter_map(|pod| pod.status.and_then(|status| status.pod_ip))
        .collect::<Vec<_>>();
    ensure!(ips.len() == 2, "two serving pods with IPs, found {ips:?}");
    Ok(ips)
}

fn adapter_deployment() -> Result<AdapterDeployment> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "AdapterDeployment",
        "metadata": { "name": ADAPTER },
        "spec": {
            "selector": { "matchLabels": { "app": SERVING } },
            "server": { "api": "vllm", "port": 8000 },
            "artifacts": { "claimName": "adapters", "mountPath": ADAPTERS_MOUNT },
            "adapters": [{ "name": ADAPTER, "fromJob": { "name": JOB } }],
            "rollout": { "maxUnavailable": 1, "canary": { "replicas": 1, "holdSeconds": 5 } },
        },
    }))?)
}

/// One greedy chat answer of `model` from the server at `ip`.
pub async fn chat(ip: &str, model: &str, prompt: &str, max_tokens: u32) -> Result<String> {
    let response = reqwest::Client::new()
        .post(format!("http://{ip}:8000/v1/chat/completions"))
        .timeout(Duration::from_secs(120))
        .json(&json!({
            "model": model,
            "messages": [{ "role": "user", "content": prompt }],
            "max_tokens": max_tokens,
            "temperature": 0,
        }))
        .send()
        .await
        .with_context(|| format!("failed to ask {model} at {ip}"))?;
    let status = response.status();
    let reply: Value = response.json().await?;
    ensure!(
        status.is_success(),
        "{model} at {ip} answered {status}: {reply}"
    );
    reply["choices"][0]["message"]["content"]
        .as_str()
        .map(str::to_owned)
        .with_context(|| format!("no answer from {model}: {reply}"))
}

/// Gives the local volumes `run` claimed in `ns` back to the pool: deletes what uses
/// them (the AdapterDeployment, the serving Deployment, the FineTuneJob) and the
/// claims, empties each volume's directory and clears its claim reference, so the
/// Released volume is Available again (a `Retain` local volume is never reused
/// otherwise).
pub async fn release_volumes(cluster: &Cluster, ns: &str) -> Result<()> {
    let background = kube::api::DeleteParams::background();
    let adapters: Api<AdapterDeployment> = Api::namespaced(cluster.client.clone(), ns);
    let _ = adapters.delete(ADAPTER, &background).await;
    let deployments: Api<Deployment> = Api::namespaced(cluster.client.clone(), ns);
    let _ = deployments.delete(SERVING, &background).await;
    let jobs: Api<FineTuneJob> = Api::namespaced(cluster.client.clone(), ns);
    let _ = jobs.delete(JOB, &background).await;

    let claims: Api<PersistentVolumeClaim> = Api::namespaced(cluster.client.clone(), ns);
    let volumes: Api<PersistentVolume> = Api::all(cluster.client.clone());
    let mut claimed = Vec::new();
    for claim in claims.list(&ListParams::default()).await?.items {
        let class = claim
            .spec
            .as_ref()
            .and_then(|s| s.storage_class_name.as_deref());
        if class != Some(STORAGE_CLASS) {
            continue;
        }
        if let Some(volume) = claim.spec.as_ref().and_then(|s| s.volume_name.clone()) {
            claimed.push(volume);
        }
        let name = claim.metadata.name.clone().unwrap_or_default();
        claims.delete(&name, &background).await?;
    }
    for volume in claimed {
        // The claim goes once no pod uses it (its protection finalizer); then the
        // volume is Released.
        let released = wait_for(&volumes, &volume, Duration::from_secs(120), |pv| {
            pv.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Released")
        })
        .await
        .with_context(|| format!("volume {volume} was not released"))?;
        if let Some(local) = released.spec.as_ref().and_then(|s| s.local.as_ref()) {
            empty_dir(Path::new(&local.path))?;
        }
        volumes
            .patch(
                &volume,
                &PatchParams::default(),
                &Patch::Merge(json!({ "spec": { "claimRef": null } })),
            )
            .await
            .with_context(|| format!("failed to make volume {volume} Available again"))?;
    }
    Ok(())
}

fn empty_dir(dir: &Path) -> Result<()> {
    for entry in
        std::fs::read_dir(dir).with_context(|| format!("failed to read {}", dir.display()))?
    {
        let path = entry?.path();
        if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        }
        .with_context(|| format!("failed to remove {}", path.display()))?;
    }
    Ok(())
}

/// Removes what an earlier `run` left in `ns` (the release, the volumes' data, the
/// namespace), so that the demo can run again on the same cluster.
pub async fn reset(cluster: &Cluster, ns: &str) -> Result<()> {
    let namespaces: Api<Namespace> = Api::all(cluster.client.clone());
    if namespaces.get_opt(ns).await?.is_none() {
        return Ok(());
    }
    // The release may be half there or gone: uninstall is best effort.
    let _ = uninstall_chart(cluster, ns);
    release_volumes(cluster, ns).await?;
    namespaces
        .delete(ns, &kube::api::DeleteParams::background())
        .await?;
    let start = Instant::now();
    while namespaces.get_opt(ns).await?.is_some() {
        ensure!(
            start.elapsed() < Duration::from_secs(180),
            "namespace {ns} was not deleted within 180s"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Ok(())
}

/// `helm uninstall` of the release `run` installed (its node-reading ClusterRole would
/// outlive the namespace).
pub fn uninstall_chart(cluster: &Cluster, ns: &str) -> Result<()> {
    let output = cluster
        .helm()
        .args(["uninstall", "kubetune", "--namespace", ns, "--wait"])
        .output()
        .context("failed to run helm")?;
    ensure!(
        output.status.success(),
        "helm uninstall failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}
