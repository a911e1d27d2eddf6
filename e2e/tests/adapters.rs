//! The AdapterDeployment controller against the real API server, with serving pods on
//! the simulated nodes and, at each pod's (loopback) IP, a real `kubetune-serve` — the
//! trainer image's vLLM-compatible adapter server — serving a tiny model. Adapters are
//! real PEFT adapters written by the trainer's own code.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use candle_core::Device;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kubetune_crds::adapterdeployment::{AdapterDeployment, AdapterDeploymentPhase};
use kubetune_crds::training::TargetModule;
use kubetune_e2e::cluster_or_skip;
use kubetune_e2e::test_support::{GpuPod, TestNamespace, wait_for};
use kubetune_operator::adapterdeployment::controller;
use kubetune_operator::metrics::Metrics;
use kubetune_trainer::adapter::save_adapter;
use kubetune_trainer::lora::LoraSettings;
use kubetune_trainer::model::Llama;
use kubetune_trainer::rng::Rng;
use kubetune_trainer::serve::engine::Engine;
use kubetune_trainer::serve::{AppState, ServeArgs, serve};
use kubetune_trainer::test_support::TinyLlama;
use serde_json::{Value, json};

const TIMEOUT: Duration = Duration::from_secs(90);

/// The artifact volume as the servers see it, with a tiny base model and adapters.
struct Artifacts {
    dir: tempfile::TempDir,
    model: PathBuf,
}

impl Artifacts {
    fn new() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let model = dir.path().join("base");
        TinyLlama::default().write(&model)?;
        Ok(Self { dir, model })
    }

    fn root(&self) -> &Path {
        self.dir.path()
    }

    /// A PEFT adapter of `rank` for `base` (the served model when `None`) at
    /// `<root>/<name>`, with random non-zero weights so that it changes the model's
    /// answers; its weights' sha256.
    fn adapter(&self, name: &str, rank: usize, seed: u64, base: Option<&str>) -> Result<String> {
        let mut model = Llama::load(&self.model, &Device::Cpu)?;
        model.add_lora(
            LoraSettings {
                rank,
                alpha: 2.0 * rank as f64,
                dropout: 0.0,
                rs_lora: false,
                targets: vec![TargetModule::QProj, TargetModule::VProj],
            },
            &mut Rng::new(seed),
        )?;
        for (param, var) in model.trainable_params() {
            if param.contains("lora_B") {
                var.set(&(candle_core::Tensor::randn(0f32, 1.0, var.shape(), &Device::Cpu)?))?;
            }
        }
        let served = self.model.to_string_lossy().into_owned();
        let base = base.unwrap_or(&served);
        Ok(save_adapter(&model, &self.root().join(name), Some(base))?.sha256)
    }
}

/// A kubetune-serve at `ip:8000`, stopped when dropped.
struct Server {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    addr: SocketAddr,
}

impl Server {
    /// Stops the server and waits until its port is free again.
    async fn shut_down(mut self) -> Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await?;
        }
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

async fn start_server(model: &Path, ip: &str) -> Result<Server> {
    use clap::Parser as _;
    let model = model.to_string_lossy().into_owned();
    let args =
        ServeArgs::try_parse_from(["kubetune-serve", "--model", &model, "--max-lora-rank", "8"])?;
    let engine = Engine::load(&args.engine_options(), &Device::Cpu)?;
    let state = AppState::new(Arc::new(engine), usize::from(args.max_num_seqs));
    let (stop, stopped) = tokio::sync::oneshot::channel();
    let (bound_tx, bound_rx) = tokio::sync::oneshot::channel();
    let host = ip.to_owned();
    let (failed_tx, failed_rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let served = serve(
            state,
            &host,
            8000,
            |addr| {
                let _ = bound_tx.send(addr);
            },
            async {
                let _ = stopped.await;
            },
        )
        .await;
        if let Err(error) = served {
            let _ = failed_tx.send(error.to_string());
        }
    });
    let addr = match bound_rx.await {
        Ok(addr) => addr,
        Err(_) => {
            let why = failed_rx.await.unwrap_or_default();
            anyhow::bail!("kubetune-serve did not bind {ip}:8000: {why}");
        }
    };
    Ok(Server {
        stop: Some(stop),
        task: Some(task),
        addr,
    })
}

/// A serving pod on a simulated node (it runs until deleted) and its IP once Running.
async fn serving_pod(namespace: &TestNamespace, name: &str) -> Result<String> {
    let pods: Api<Pod> = namespace.api();
    let mut pod = GpuPod::new(name, 1).build()?;
    pod.metadata.labels = Some([("app".to_owned(), "serve".to_owned())].into());
    pods.create(&PostParams::default(), &pod).await?;
    let running = wait_for(&pods, name, TIMEOUT, |p| {
        p.status.as_ref().and_then(|s| s.pod_ip.as_ref()).is_some()
    })
    .await?;
    running
        .status
        .and_then(|s| s.pod_ip)
        .context("the pod has an IP")
}

/// Eight greedy tokens of `model` from `server`.
async fn complete(server: &Server, model: &str) -> Result<String> {
    let reply = reqwest::Client::new()
        .post(format!("http://{}/v1/completions", server.addr))
        .json(&json!({
            "model": model, "prompt": "The capital of France is",
            "max_tokens": 8, "temperature": 0, "ignore_eos": true,
        }))
        .send()
        .await?
        .json::<Value>()
        .await?;
    reply["choices"][0]["text"]
        .as_str()
        .map(str::to_owned)
        .with_context(|| format!("no completion: {reply}"))
}

/// The adapters a server lists: name → path.
async fn listed(server: &Server) -> Result<Vec<(String, String)>> {
    let reply = reqwest::get(format!("http://{}/v1/models", server.addr))
        .await?
        .json::<Value>()
        .await?;
    Ok(reply["data"]
        .as_array()
        .context("a model list")?
        .iter()
        .filter(|m| !m["parent"].is_null())
        .map(|m| {
            (
                m["id"].as_str().unwrap_or_default().to_owned(),
                m["root"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect())
}

fn adep(root: &Path, path: &str, sha: &str) -> Result<AdapterDeployment> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "AdapterDeployment",
        "metadata": { "name": "support" },
        "spec": {
            "selector": { "matchLabels": { "app": "serve" } },
            "artifacts": { "claimName": "adapters", "mountPath": root },
            "adapters": [{ "name": "support", "artifact": { "path": path, "sha256": sha } }],
            "rollout": { "maxUnavailable": 2, "canary": { "replicas": 1, "holdSeconds": 2 } },
        },
    }))?)
}

fn degraded_reason(adep: &AdapterDeployment) -> Option<String> {
    adep.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == "Degraded" && c.status == "True")
        .map(|c| c.reason.clone())
}

#[tokio::test]
async fn adapters_roll_out_through_a_canary_verified_on_real_servers_and_a_bad_one_rolls_back()
-> Result<()> {
    let cluster = cluster_or_skip!(
        "adapters_roll_out_through_a_canary_verified_on_real_servers_and_a_bad_one_rolls_back"
    );
    let namespace = cluster.namespace("adep-rollout").await?;
    let artifacts = Artifacts::new()?;
    let good = artifacts.adapter("support-v1", 8, 1, None)?;
    // Trained on another base: every server refuses it.
    let broken = artifacts.adapter("support-v2", 8, 2, Some("meta-llama/Llama-3.1-8B"))?;

    let mut servers = Vec::new();
    let mut ips = Vec::new();
    for i in 0..6 {
        let ip = serving_pod(&namespace, &format!("serve-{i}")).await?;
        servers.push(start_server(&artifacts.model, &ip).await?);
        ips.push(ip);
    }
    let metrics = Arc::new(Metrics::register(&mut Default::default()));
    let operator = tokio::spawn(controller::run(
        cluster.client.clone(),
        vec![namespace.name.clone()],
        metrics,
    ));
    let _stop = scopeguard(operator);

    let adeps: Api<AdapterDeployment> = namespace.api();
    let root = artifacts.root().to_string_lossy().into_owned();
    adeps
        .create(
            &PostParams::default(),
            &adep(artifacts.root(), "support-v1", &good)?,
        )
        .await?;
    let all = |n: u32| {
        move |a: &AdapterDeployment| {
            a.status.as_ref().is_some_and(|s| {
                s.phase == AdapterDeploymentPhase::Available
                    && s.replicas == n
                    && s.updated_replicas == n
            })
        }
    };
    let available = wait_for(&adeps, "support", TIMEOUT, all(6)).await?;
    let status = available.status.as_ref().context("status")?;
    let version = format!("support-{}", &good[..8]);
    let expected = vec![(version.clone(), format!("{root}/support-v1"))];
    assert_eq!(status.adapters[0].version, version);
    // (Not ready_replicas: on a starved machine the node lifecycle controller can mark
    // simulated pods NotReady, and kwok does not mark them Ready again.)
    assert_eq!(status.revision, 1);
    for server in &servers {
        assert_eq!(
            listed(server).await?,
            expected,
            "exactly the version, from its path"
        );
    }
    let base = artifacts.model.to_string_lossy().into_owned();
    assert_ne!(
        complete(&servers[0], &version).await?,
        complete(&servers[0], &base).await?,
        "the adapter changes the answer"
    );

    // A server that restarts empty gets its adapters back (on the resync: the pod
    // itself did not change), and a replica added later gets them too.
    servers.remove(2).shut_down().await?;
    servers.insert(2, start_server(&artifacts.model, &ips[2]).await?);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while listed(&servers[2]).await? != expected {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "serve-2 was not restored"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let ip = serving_pod(&namespace, "serve-6").await?;
    servers.push(start_server(&artifacts.model, &ip).await?);
    wait_for(&adeps, "support", TIMEOUT, all(7)).await?;
    assert_eq!(listed(&servers[6]).await?, expected);

    // A broken version: the canary's load fails and the rollout returns to v1.
    let patch = json!({ "spec": { "adapters": [
        { "name": "support", "artifact": { "path": "support-v2", "sha256": broken } }
    ]}});
    adeps
        .patch("support", &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    let rolled_back = wait_for(&adeps, "support", TIMEOUT, |a| {
        degraded_reason(a).as_deref() == Some("RolledBack")
            && a.status.as_ref().is_some_and(|s| s.updated_replicas == 7)
    })
    .await?;
    let status = rolled_back.status.as_ref().context("status")?;
    assert_eq!(status.adapters[0].version, version, "back on v1");
    assert_eq!(status.previous_revision, Some(2));
    let degraded = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Degraded")
        .context("Degraded")?;
    assert!(
        degraded.message.contains("Llama-3.1-8B"),
        "the server's message: {}",
        degraded.message
    );
    for server in &servers {
        assert_eq!(
            listed(server).await?,
            expected,
            "no replica is left on the broken one"
        );
    }
    Ok(())
}

/// Aborts the controller task when the test ends.
fn scopeguard(task: tokio::task::JoinHandle<()>) -> impl Drop {
    struct Abort(tokio::task::JoinHandle<()>);
    impl Drop for Abort {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    Abort(task)
}
