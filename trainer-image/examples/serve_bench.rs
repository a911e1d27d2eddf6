//! Generation speed and request latency of `kubetune-serve` over HTTP on the CPU.
//!
//! ```text
//! cargo run --release -p kubetune-trainer --example serve_bench -- [--shape tiny|small]
//!     [--prompt-tokens P] [--max-tokens N] [--requests R] [--concurrency C]
//! ```
//!
//! It writes a random model (`tiny`: the tests' 2-block model; `small`: ~50M
//! parameters, hidden 512, 10 blocks, 8 heads / 4 KV heads, MLP 1536, vocabulary 32000,
//! tied embeddings, as the training benchmark) and a rank-16 adapter on q/k/v/o into a
//! temporary directory, starts the server in-process on an ephemeral port, loads the
//! adapter through `/v1/load_lora_adapter`, and times greedy `/v1/completions` of
//! `max_tokens` tokens (`ignore_eos`) for the base and the adapter, then `concurrency`
//! requests at once. The last line is one JSON object.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use candle_core::Device;
use kubetune_crds::training::TargetModule;
use kubetune_trainer::adapter::save_adapter;
use kubetune_trainer::lora::LoraSettings;
use kubetune_trainer::model::Llama;
use kubetune_trainer::rng::Rng;
use kubetune_trainer::serve::client::call;
use kubetune_trainer::serve::engine::{Engine, EngineOptions};
use kubetune_trainer::serve::{AppState, serve};
use kubetune_trainer::test_support::TinyLlama;
use serde_json::json;

#[derive(Debug)]
struct Args {
    shape: String,
    prompt_tokens: usize,
    max_tokens: usize,
    requests: usize,
    concurrency: usize,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        shape: "small".into(),
        prompt_tokens: 32,
        max_tokens: 64,
        requests: 3,
        concurrency: 4,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut it = argv.iter();
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .ok_or_else(|| anyhow::anyhow!("{flag} needs a value"))
        };
        match flag.as_str() {
            "--shape" => args.shape = value()?.clone(),
            "--prompt-tokens" => args.prompt_tokens = value()?.parse()?,
            "--max-tokens" => args.max_tokens = value()?.parse()?,
            "--requests" => args.requests = value()?.parse()?,
            "--concurrency" => args.concurrency = value()?.parse()?,
            other => anyhow::bail!("unknown flag {other}"),
        }
    }
    Ok(args)
}

fn shape(name: &str) -> anyhow::Result<TinyLlama> {
    match name {
        "tiny" => Ok(TinyLlama::default()),
        "small" => Ok(TinyLlama {
            hidden: 512,
            intermediate: 1536,
            layers: 10,
            heads: 8,
            kv_heads: 4,
            vocab: 32000,
            tie_embeddings: true,
            shards: 1,
            init_std: 0.02,
            embed_std: 0.02,
            ..TinyLlama::default()
        }),
        other => anyhow::bail!("unknown shape {other}; tiny or small"),
    }
}

/// Seconds and generated tokens of one greedy completion.
async fn complete(addr: SocketAddr, model: &str, prompt: &str, max_tokens: usize) -> (f64, u64) {
    let body = json!({
        "model": model, "prompt": prompt, "temperature": 0, "max_tokens": max_tokens,
        "ignore_eos": true
    })
    .to_string();
    let started = Instant::now();
    let answer = call(addr, "POST", "/v1/completions", Some(&body))
        .await
        .expect("the server answers");
    let seconds = started.elapsed().as_secs_f64();
    assert_eq!(answer.status, 200, "{}", answer.body);
    let tokens = answer.json()["usage"]["completion_tokens"]
        .as_u64()
        .expect("usage");
    (seconds, tokens)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let dir = tempfile::tempdir()?;
    let model_dir = dir.path().join("model");
    let spec = shape(&args.shape)?;
    spec.write(&model_dir)?;
    let mut llama = Llama::load(&model_dir, &Device::Cpu)?;
    llama.add_lora(
        LoraSettings {
            rank: 16,
            alpha: 32.0,
            dropout: 0.0,
            rs_lora: false,
            targets: vec![
                TargetModule::QProj,
                TargetModule::KProj,
                TargetModule::VProj,
                TargetModule::OProj,
            ],
        },
        &mut Rng::new(1),
    )?;
    let adapter_dir = dir.path().join("adapter");
    save_adapter(&llama, &adapter_dir, Some("model"))?;
    drop(llama);

    let engine = Engine::load(
        &EngineOptions {
            model: model_dir.to_string_lossy().into_owned(),
            served_model_names: vec!["base".into()],
            max_loras: 4,
            max_lora_rank: 16,
            max_model_len: None,
        },
        &Device::Cpu,
    )?;
    let state = AppState::new(Arc::new(engine), args.concurrency);
    let (bound_tx, bound_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(serve(
        state,
        "127.0.0.1",
        0,
        |addr| {
            let _ = bound_tx.send(addr);
        },
        std::future::pending(),
    ));
    let addr = bound_rx.await?;
    let load = json!({"lora_name": "adapter", "lora_path": adapter_dir}).to_string();
    let started = Instant::now();
    let loaded = call(addr, "POST", "/v1/load_lora_adapter", Some(&load)).await?;
    let load_ms = started.elapsed().as_secs_f64() * 1e3;
    anyhow::ensure!(loaded.status == 200, "load failed: {}", loaded.body);

    // One byte per token with the fixture tokenizer, plus BOS.
    let prompt: String = "abcdefgh"
        .chars()
        .cycle()
        .take(args.prompt_tokens - 1)
        .collect();
    let mut figures = serde_json::Map::new();
    for model in ["base", "adapter"] {
        // Warm-up.
        complete(addr, model, &prompt, 2).await;
        let mut seconds = 0.0;
        let mut tokens = 0;
        for _ in 0..args.requests {
            let (s, t) = complete(addr, model, &prompt, args.max_tokens).await;
            seconds += s;
            tokens += t;
        }
        let latency = seconds / args.requests as f64;
        println!(
            "{model}: {tokens} tokens in {seconds:.2} s over {} requests: {:.1} tokens/s, {:.0} ms per request",
            args.requests,
            tokens as f64 / seconds,
            latency * 1e3
        );
        figures.insert(
            format!("{model}_tokens_per_second"),
            json!(tokens as f64 / seconds),
        );
        figures.insert(format!("{model}_request_ms"), json!(latency * 1e3));
    }
    let started = Instant::now();
    let runs: Vec<_> = (0..args.concurrency)
        .map(|i| {
            let prompt = prompt.clone();
            let model = if i % 2 == 0 { "base" } else { "adapter" };
            tokio::spawn(async move { complete(addr, model, &prompt, args.max_tokens).await })
        })
        .collect();
    let mut tokens = 0;
    for run in runs {
        tokens += run.await?.1;
    }
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "{} concurrent requests (base and adapter alternating): {tokens} tokens in {seconds:.2} s: {:.1} tokens/s",
        args.concurrency,
        tokens as f64 / seconds
    );
    figures.insert("shape".into(), json!(args.shape));
    figures.insert("parameters".into(), json!(spec.parameters()));
    figures.insert("prompt_tokens".into(), json!(args.prompt_tokens));
    figures.insert("max_tokens".into(), json!(args.max_tokens));
    figures.insert("adapter_load_ms".into(), json!(load_ms));
    figures.insert("concurrency".into(), json!(args.concurrency));
    figures.insert(
        "concurrent_tokens_per_second".into(),
        json!(tokens as f64 / seconds),
    );
    println!("{}", serde_json::Value::Object(figures));
    Ok(())
}
