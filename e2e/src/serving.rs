//! Serving fixtures for the AdapterDeployment tests and the rollout benchmark: a tiny
//! base model and real PEFT adapters written by the trainer's own code, and real
//! `kubetune-serve` servers listening at simulated serving pods' (loopback) IPs.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use candle_core::Device;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};
use kubetune_crds::training::TargetModule;
use kubetune_trainer::adapter::save_adapter;
use kubetune_trainer::lora::LoraSettings;
use kubetune_trainer::model::Llama;
use kubetune_trainer::rng::Rng;
use kubetune_trainer::serve::engine::Engine;
use kubetune_trainer::serve::{AppState, ServeArgs, serve};
use kubetune_trainer::test_support::TinyLlama;
use serde_json::{Value, json};

use crate::test_support::{GpuPod, TestNamespace, wait_for};

const TIMEOUT: Duration = Duration::from_secs(90);

/// The artifact volume as the servers see it, with a tiny base model and adapters.
#[derive(Debug)]
pub struct Artifacts {
    dir: tempfile::TempDir,
    /// The base model's directory.
    pub model: PathBuf,
}

impl Artifacts {
    /// A temporary volume with the base model.
    pub fn new() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let model = dir.path().join("base");
        TinyLlama::default().write(&model)?;
        Ok(Self { dir, model })
    }

    /// The volume's root.
    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    /// A PEFT adapter of `rank` for `base` (the served model when `None`) at
    /// `<root>/<name>`, with random non-zero weights so that it changes the model's
    /// answers; its weights' sha256.
    pub fn adapter(
        &self,
        name: &str,
        rank: usize,
        seed: u64,
        base: Option<&str>,
    ) -> Result<String> {
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
#[derive(Debug)]
pub struct Server {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    /// Where it listens.
    pub addr: SocketAddr,
}

impl Server {
    /// Stops the server and waits until its port is free again.
    pub async fn shut_down(mut self) -> Result<()> {
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

/// A kubetune-serve for `model` at `ip:8000` (`--max-lora-rank 8`).
pub async fn start_server(model: &Path, ip: &str) -> Result<Server> {
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
pub async fn serving_pod(namespace: &TestNamespace, name: &str) -> Result<String> {
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
pub async fn complete(server: &Server, model: &str) -> Result<String> {
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
pub async fn listed(server: &Server) -> Result<Vec<(String, String)>> {
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

/// An AdapterDeployment `support` of the pods labelled `app=serve`, serving the adapter
/// at `path` on the volume mounted at `root`, with `rollout`.
pub fn adapter_deployment(
    root: &Path,
    path: &str,
    sha: &str,
    rollout: Value,
) -> Result<kubetune_crds::adapterdeployment::AdapterDeployment> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "AdapterDeployment",
        "metadata": { "name": "support" },
        "spec": {
            "selector": { "matchLabels": { "app": "serve" } },
            "artifacts": { "claimName": "adapters", "mountPath": root },
            "adapters": [{ "name": "support", "artifact": { "path": path, "sha256": sha } }],
            "rollout": rollout,
        },
    }))?)
}
