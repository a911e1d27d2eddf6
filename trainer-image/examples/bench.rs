//! LoRA training throughput and peak memory of the trainer on CPU, side by side with
//! PyTorch + PEFT on the same model shape, data and settings; and, with `--method`,
//! the other methods.
//!
//! ```text
//! cargo run --release -p kubetune-trainer --example bench -- [--steps N] [--seq-len T]
//!     [--batch-size B] [--rank R] [--recompute] [--no-pytorch] [--venv DIR]
//!     [--method lora|qlora|dpo|full]
//! ```
//!
//! - `--method qlora`: the base linear weights' memory with LoRA (f32 on the CPU, and
//!   what bf16 would take) and with QLoRA (NF4 with double quantization), the process'
//!   resident memory right after loading each way, and the training step time of both.
//! - `--method dpo`: DPO's training step time on random preference pairs (`--batch-size`
//!   pairs per step, prompt and each completion `--seq-len`/2 tokens), next to a LoRA
//!   step on sequences of the same length.
//! - `--method full` (build with `--features gloo`): data-parallel full fine-tuning of a
//!   smaller Llama (~6M parameters, hidden 256, 4 blocks, vocabulary 8000) on 1, 2 and
//!   4 ranks, each rank a process with one compute thread (`RAYON_NUM_THREADS=1`) and
//!   `--batch-size` sequences per step, gradients summed with Gloo over loopback: tokens/s
//!   of each, the seconds per step rank 0 spends in the gradient exchange (waiting for
//!   the other ranks included) and the scaling efficiency
//!   `tokens/s(N) / (N × tokens/s(1))`. Ranks beyond
//!   the machine's cores share cores, which caps the efficiency at `cores / N`. The
//!   gangs are fully sharded (ZeRO stage 3, the trainer's default); one more on 4
//!   ranks keeps gathered weights from forward to backward (`shard-grad-op`), two on 2
//!   ranks use stage 1 and replicated state. Per gang: rank 0's bytes of weights,
//!   gradients and optimizer state (`sharded_state_bytes_per_rank_ratio_4_ranks`
//!   against one rank), its peak RSS, the seconds and bytes per step of its
//!   collectives, and those bytes against the ring bound of an all-reduce of the f32
//!   gradients, 2(N−1)/N·4P (`comm_bytes_vs_ring_bound_ratio`, 4 ranks).
//!
//! It writes a random ~50M-parameter Llama (hidden 512, 10 blocks, 8 heads / 4 KV
//! heads, MLP 1536, vocabulary 32000, tied embeddings) and a text dataset into a
//! temporary directory, then trains it in a child process (so peak RSS is the
//! trainer's alone) with LoRA on q/k/v/o. With PyTorch it creates a throwaway virtual
//! environment (or reuses `--venv`), installs torch, transformers and peft from PyPI,
//! and runs the same steps with `LlamaForCausalLM` + `get_peft_model`. It then checks
//! parity: a tiny model trained here is evaluated by `eval` and by transformers + PEFT
//! loading the written checkpoint and adapter (`PeftModel.from_pretrained`); the
//! absolute differences of the two mean losses are reported. The last line of output
//! is one JSON object with snake_case keys carrying units.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kubetune_crds::memory;
use kubetune_crds::training::{DatasetFormat, Scheduler, TargetModule};
use kubetune_trainer::cli::ENV_SHARDING;
use kubetune_trainer::config::ModelConfig;
use kubetune_trainer::dpo::DpoSettings;
use kubetune_trainer::lora::LoraSettings;
use kubetune_trainer::model::Llama;
use kubetune_trainer::parallel::Sharding;
use kubetune_trainer::rng::Rng;
use kubetune_trainer::test_support::{TinyLlama, write_jsonl};
use kubetune_trainer::tokenizer::TextTokenizer;
use kubetune_trainer::train::{Control, MethodOptions, TrainOptions, train};

const PYTHON_PINS: [&str; 3] = ["torch==2.15.0", "transformers==5.24.0", "peft==0.21.2"];

#[derive(Debug)]
struct Args {
    steps: u64,
    seq_len: usize,
    batch_size: usize,
    rank: usize,
    pytorch: bool,
    venv: Option<PathBuf>,
    worker: Option<PathBuf>,
    recompute: bool,
    method: String,
    measure_load: bool,
}

impl Default for Args {
    fn default() -> Self {
        Self {
            steps: 12,
            seq_len: 256,
            batch_size: 4,
            rank: 16,
            pytorch: true,
            venv: None,
            worker: None,
            recompute: false,
            method: "lora".into(),
            measure_load: false,
        }
    }
}

fn parse_args() -> Args {
    let mut args = Args::default();
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--steps" => args.steps = value().parse().expect("--steps is a number"),
            "--seq-len" => args.seq_len = value().parse().expect("--seq-len is a number"),
            "--batch-size" => args.batch_size = value().parse().expect("--batch-size is a number"),
            "--rank" => args.rank = value().parse().expect("--rank is a number"),
            "--no-pytorch" => args.pytorch = false,
            "--recompute" => args.recompute = true,
            "--venv" => args.venv = Some(value().into()),
            "--worker" => args.worker = Some(value().into()),
            "--method" => args.method = value(),
            "--measure-load" => args.measure_load = true,
            other => panic!("unknown flag {other}"),
        }
    }
    args
}

fn model_spec() -> TinyLlama {
    TinyLlama {
        hidden: 512,
        intermediate: 1536,
        layers: 10,
        heads: 8,
        kv_heads: 4,
        vocab: 32000,
        tie_embeddings: true,
        llama3_rope: false,
        shards: 1,
        init_std: 0.02,
        embed_std: 0.02,
        seed: 1,
        qwen2: false,
    }
}

fn options(root: &Path, args: &Args) -> TrainOptions {
    TrainOptions {
        method: MethodOptions::Lora,
        model_dir: root.join("model"),
        base_model_name: None,
        train_file: root.join("train.jsonl"),
        eval_file: None,
        eval_split_percent: 0,
        format: DatasetFormat::Text,
        output_dir: root.join("out"),
        checkpoint_dir: root.join("out").join("checkpoints"),
        epochs: 1,
        max_steps: Some(args.steps),
        learning_rate: 2e-4,
        batch_size: args.batch_size,
        grad_accum: 1,
        max_seq_length: args.seq_len,
        warmup_steps: 0,
        scheduler: Scheduler::Constant,
        weight_decay: 0.0,
        max_grad_norm: 1.0,
        seed: 1,
        lora: LoraSettings {
            rank: args.rank,
            alpha: 2.0 * args.rank as f64,
            dropout: 0.0,
            rs_lora: false,
            targets: vec![
                TargetModule::QProj,
                TargetModule::KProj,
                TargetModule::VProj,
                TargetModule::OProj,
            ],
        },
        checkpoint_every: 1_000_000,
        checkpoint_keep: 1,
        recompute: args.recompute,
        gpu_memory_bytes: None,
        interrupt_after_step: None,
        gang: None,
    }
}

/// The run options of `--method` (the LoRA options otherwise the same).
fn method_options(root: &Path, args: &Args) -> TrainOptions {
    let mut opts = options(root, args);
    match args.method.as_str() {
        "lora" => {}
        "qlora" => opts.method = MethodOptions::Qlora { double_quant: true },
        "dpo" => {
            opts.method = MethodOptions::Dpo(DpoSettings {
                beta: 0.1,
                label_smoothing: 0.0,
            });
            opts.format = DatasetFormat::Preference;
            opts.train_file = root.join("prefs.jsonl");
        }
        "full" => {
            opts.method = MethodOptions::Full {
                max_shard_bytes: u64::MAX,
            };
            opts.model_dir = root.join("full-model");
            opts.learning_rate = 1e-4;
            let gang = kubetune_trainer::cli::gang_from_env(
                Duration::from_secs(60),
                Duration::from_secs(60),
            )
            .expect("the gang's environment");
            let world = gang.as_ref().map_or(1, |g| g.world_size);
            let sharding: Sharding = std::env::var(ENV_SHARDING)
                .map(|s| s.parse().expect("a sharding"))
                .unwrap_or_default();
            opts.output_dir = root.join(format!("out-full-{world}-{}", sharding.as_str()));
            opts.checkpoint_dir = opts.output_dir.join("checkpoints");
            opts.gang = gang.map(|gang| kubetune_trainer::parallel::Gang { sharding, ..gang });
        }
        other => panic!("--method {other}: expected lora, qlora, dpo or full"),
    }
    opts
}

/// Resident memory of this process now (kB → MiB).
fn rss_now_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .expect("VmRSS");
    let kib: f64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("a number of kB");
    kib / 1024.0
}

/// Runs this benchmark as a child in `--worker` mode for `method`; returns its JSON
/// report and peak RSS.
fn run_worker(
    root: &Path,
    args: &Args,
    method: &str,
    measure_load: bool,
) -> (serde_json::Value, f64) {
    let exe = std::env::current_exe().expect("own path");
    let mut worker = Command::new(exe);
    if args.recompute {
        worker.arg("--recompute");
    }
    if measure_load {
        worker.arg("--measure-load");
    }
    let (out, peak) = run_measured(
        worker
            .args(["--worker", &root.to_string_lossy(), "--method", method])
            .args(["--steps", &args.steps.to_string()])
            .args(["--seq-len", &args.seq_len.to_string()])
            .args(["--batch-size", &args.batch_size.to_string()])
            .args(["--rank", &args.rank.to_string()]),
    );
    (last_json(&out), peak)
}

/// Random lowercase text of `n` bytes (one token per byte with the fixture tokenizer).
fn random_text(rng: &mut Rng, n: usize) -> String {
    (0..n)
        .map(|_| char::from(b'a' + rng.below(26) as u8))
        .collect()
}

fn mib(bytes: f64) -> f64 {
    bytes / (1024.0 * 1024.0)
}

/// `--method qlora`: base-weight memory and step time, LoRA against QLoRA.
fn bench_qlora(root: &Path, args: &Args, spec: &TinyLlama) {
    let mut report = serde_json::json!({
        "model_params_m": spec.parameters() as f64 / 1e6,
        "seq_len_tokens": args.seq_len,
        "batch_size": args.batch_size,
        "steps": args.steps,
    });
    for method in ["lora", "qlora"] {
        let (load, _) = run_worker(root, args, method, true);
        let (train, peak) = run_worker(root, args, method, false);
        let bytes = load["base_linear_bytes"].as_f64().expect("bytes");
        let rss = load["rss_after_load_mib"].as_f64().expect("rss");
        let step = train["step_s"].as_f64().expect("step_s");
        eprintln!(
            "{method}: base linear weights {:.1} MiB, RSS after load {rss:.0} MiB, step {step:.2} s, peak RSS {peak:.0} MiB",
            mib(bytes)
        );
        report[format!("{method}_base_linear_mib")] = mib(bytes).into();
        report[format!("{method}_rss_after_load_mib")] = rss.into();
        report[format!("{method}_step_s")] = step.into();
        report[format!("{method}_peak_rss_mib")] = peak.into();
        if method == "lora" {
            // The same elements in bf16, as QLoRA's comparison on a GPU would be.
            let elements = load["base_linear_elements"].as_f64().expect("elements");
            report["bf16_base_linear_mib"] = mib(2.0 * elements).into();
        }
    }
    let ratio = report["qlora_base_linear_mib"].as_f64().expect("q")
        / report["bf16_base_linear_mib"].as_f64().expect("b");
    eprintln!("qlora / bf16 base linear weights: {ratio:.3}");
    report["qlora_to_bf16_base_linear_ratio"] = ratio.into();
    println!("{report}");
}

/// `--method dpo`: DPO step time next to LoRA's on sequences of the same length.
fn bench_dpo(root: &Path, args: &Args, spec: &TinyLlama) {
    let mut rng = Rng::new(9);
    let half = args.seq_len / 2 - 2;
    let pairs: Vec<serde_json::Value> = (0..args.batch_size * args.steps as usize)
        .map(|_| {
            serde_json::json!({
                "prompt": random_text(&mut rng, half),
                "chosen": random_text(&mut rng, half),
                "rejected": random_text(&mut rng, half),
            })
        })
        .collect();
    write_jsonl(&root.join("prefs.jsonl"), &pairs).expect("write pairs");
    let (dpo, dpo_peak) = run_worker(root, args, "dpo", false);
    let (lora, lora_peak) = run_worker(root, args, "lora", false);
    let (dpo_step, lora_step) = (
        dpo["step_s"].as_f64().expect("step_s"),
        lora["step_s"].as_f64().expect("step_s"),
    );
    eprintln!(
        "dpo: {dpo_step:.2} s per step of {} pairs ({:.0} tokens/s, peak RSS {dpo_peak:.0} MiB); lora: {lora_step:.2} s per step of {} sequences (peak RSS {lora_peak:.0} MiB)",
        args.batch_size,
        dpo["tokens_per_s"].as_f64().unwrap_or(0.0),
        args.batch_size
    );
    println!(
        "{}",
        serde_json::json!({
            "model_params_m": spec.parameters() as f64 / 1e6,
            "seq_len_tokens": args.seq_len,
            "pairs_per_step": args.batch_size,
            "steps": args.steps,
            "dpo_step_s": dpo_step,
            "dpo_tokens_per_s": dpo["tokens_per_s"],
            "dpo_peak_rss_mib": dpo_peak,
            "lora_step_s": lora_step,
            "lora_peak_rss_mib": lora_peak,
            "dpo_to_lora_step_ratio": dpo_step / lora_step,
        })
    );
}

/// The model `--method full` trains: small enough that a full step on one thread takes
/// about a second at the default sequence length.
fn full_model_spec() -> TinyLlama {
    TinyLlama {
        hidden: 256,
        intermediate: 768,
        layers: 4,
        heads: 4,
        kv_heads: 2,
        vocab: 8000,
        ..model_spec()
    }
}

/// One gang of `--method full`.
#[derive(Clone, Copy)]
struct FullRun {
    ranks: usize,
    sharding: Sharding,
    /// Whether glibc's mmap threshold is pinned at 1 MiB, so that freed tensors leave
    /// the resident set and the peak RSS measures the live bytes the memory plan
    /// models (glibc otherwise raises the threshold after each large free and keeps
    /// freed tensors in its heap: 10–25% more RSS here, and faster).
    live_memory: bool,
}

impl FullRun {
    fn label(self) -> String {
        let plural = if self.ranks == 1 { "rank" } else { "ranks" };
        format!("{} {plural} {}", self.ranks, self.sharding.as_str())
    }
}

/// Runs one gang of `--method full` workers (one compute thread each) and returns rank
/// 0's report, or why it failed. Each rank has `timeout`.
fn run_full_gang(
    root: &Path,
    args: &Args,
    run: FullRun,
    timeout: Duration,
) -> Result<serde_json::Value, String> {
    let exe = std::env::current_exe().expect("own path");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|err| format!("no free port: {err}"))?
        .port();
    let mut children = Vec::with_capacity(run.ranks);
    for rank in 0..run.ranks {
        let child = Command::new(&exe)
            .args(["--worker", &root.to_string_lossy(), "--method", "full"])
            .args(["--steps", &args.steps.to_string()])
            .args(["--seq-len", &args.seq_len.to_string()])
            .args(["--batch-size", &args.batch_size.to_string()])
            .env("RAYON_NUM_THREADS", "1")
            .env("KUBETUNE_WORLD_SIZE", run.ranks.to_string())
            .env("KUBETUNE_RANK", rank.to_string())
            .env("KUBETUNE_RENDEZVOUS", format!("127.0.0.1:{port}"))
            .env(ENV_SHARDING, run.sharding.as_str())
            .envs(
                run.live_memory
                    .then_some(("MALLOC_MMAP_THRESHOLD_", "1048576")),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|err| format!("rank {rank} did not start: {err}"))?;
        children.push(child);
    }
    // Rank 0's output is read on a thread so that a full pipe never blocks it; every
    // rank is killed once the deadline passes.
    let stdout = children[0].stdout.take().expect("piped stdout");
    let reader = std::thread::spawn(move || std::io::read_to_string(stdout).unwrap_or_default());
    let deadline = Instant::now() + timeout;
    let mut failure = None;
    for (rank, child) in children.iter_mut().enumerate() {
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                _ => break None,
            }
        };
        match status {
            Some(status) if status.success() => {}
            Some(status) => {
                failure.get_or_insert(format!("{}: rank {rank} exited with {status}", run.label()));
            }
            None => {
                failure.get_or_insert(format!(
                    "{}: rank {rank} still running after {} s",
                    run.label(),
                    timeout.as_secs()
                ));
            }
        }
    }
    for child in &mut children {
        let _ = child.kill();
        let _ = child.wait();
    }
    let out = reader.join().unwrap_or_default();
    if let Some(failure) = failure {
        return Err(failure);
    }
    out.lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .and_then(|l| serde_json::from_str(l).ok())
        .ok_or_else(|| format!("{}: rank 0 printed no report", run.label()))
}

/// `--method full`: data-parallel full fine-tuning on 1, 2 and 4 ranks fully sharded
/// (ZeRO stage 3, the default), and on 2 ranks with stage 1 and replicated, for the
/// memory and traffic of each. A gang that fails is retried once, then named in
/// `failures`; the JSON line is printed either way.
fn bench_full(root: &Path, args: &Args) {
    let spec = full_model_spec();
    spec.write(&root.join("full-model")).expect("write model");
    let params = spec.parameters() as f64;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut report = serde_json::json!({
        "full_ft_model_params_m": params / 1e6,
        "seq_len_tokens": args.seq_len,
        "batch_size_per_rank": args.batch_size,
        "steps": args.steps,
        "cpu_cores": cores,
        "threads_per_rank": 1,
    });
    let runs = [
        FullRun {
            ranks: 1,
            sharding: Sharding::Full,
            live_memory: false,
        },
        FullRun {
            ranks: 2,
            sharding: Sharding::Full,
            live_memory: false,
        },
        FullRun {
            ranks: 4,
            sharding: Sharding::Full,
            live_memory: false,
        },
        FullRun {
            ranks: 4,
            sharding: Sharding::ShardGradOp,
            live_memory: false,
        },
        FullRun {
            ranks: 2,
            sharding: Sharding::OptimizerState,
            live_memory: false,
        },
        FullRun {
            ranks: 2,
            sharding: Sharding::Replicated,
            live_memory: false,
        },
    ];
    // Generous: a step of this model takes about a second on one thread.
    let timeout = Duration::from_secs(120 + 20 * args.steps);
    let mut single: Option<(f64, f64)> = None;
    let mut failures = Vec::new();
    let mut lines = Vec::new();
    for run in runs {
        let zero = match run_full_gang(root, args, run, timeout).or_else(|first| {
            eprintln!("{first}; retrying once");
            run_full_gang(root, args, run, timeout)
        }) {
            Ok(zero) => zero,
            Err(failure) => {
                eprintln!("{failure}");
                failures.push(failure);
                continue;
            }
        };
        let figure = |key: &str| zero[key].as_f64().unwrap_or(f64::NAN);
        let (tps, step, rss) = (
            figure("tokens_per_s"),
            figure("step_s"),
            figure("peak_rss_mib"),
        );
        let (comm_s, comm_bytes) = (
            figure("collective_s_per_step"),
            figure("collective_bytes_per_step"),
        );
        let state = figure("state_bytes");
        let planned = mib(figure("plan_peak_bytes"));
        if run.ranks == 1 {
            single = Some((tps, state));
        }
        let key = |what: &str| {
            let plural = if run.ranks == 1 { "rank" } else { "ranks" };
            match run.sharding {
                Sharding::Full => format!("full_ft_{what}_{}_{plural}", run.ranks),
                other => format!(
                    "full_ft_{}_{what}_{}_{plural}",
                    other.as_str().replace('-', "_"),
                    run.ranks
                ),
            }
        };
        report[key("tokens_per_s")] = tps.into();
        report[key("step_s")] = step.into();
        report[key("peak_rss_mib_rank0")] = rss.into();
        report[key("state_mib_rank0")] = mib(state).into();
        report[key("plan_peak_mib_rank0")] = planned.into();
        let mut line = format!(
            "{:<24} {tps:>7.0} tokens/s, {step:.2} s/step; rank 0: {:.1} MiB weights+gradients+optimizer, {rss:.0} MiB peak RSS (planned {planned:.0})",
            run.label(),
            mib(state)
        );
        if run.ranks > 1 {
            // The ring bound: an all-reduce of the f32 gradients sends 2(n−1)/n of them.
            let n = run.ranks as f64;
            let bound = 2.0 * (n - 1.0) / n * 4.0 * params;
            report[key("comm_s_per_step")] = comm_s.into();
            report[key("comm_mib_per_step")] = mib(comm_bytes).into();
            report[key("comm_bytes_vs_ring_bound_ratio")] = (comm_bytes / bound).into();
            line += &format!(
                "; {comm_s:.2} s/step in collectives, {:.1} MiB sent/step = {:.2} × the ring bound",
                mib(comm_bytes),
                comm_bytes / bound
            );
            if let Some((one_tps, one_state)) = single {
                let efficiency = tps / (n * one_tps);
                report[key("scaling_efficiency_ratio")] = efficiency.into();
                report[key("state_bytes_vs_1_rank_ratio")] = (state / one_state).into();
                line += &format!(", efficiency {efficiency:.2}");
            }
            if run.ranks > cores {
                line += &format!(" ({} ranks on {cores} cores: oversubscribed)", run.ranks);
            }
        }
        eprintln!("{line}");
        lines.push(line);
    }
    // The headline figures.
    for (name, source) in [
        (
            "sharded_state_bytes_per_rank_ratio_4_ranks",
            "full_ft_state_bytes_vs_1_rank_ratio_4_ranks",
        ),
        (
            "comm_bytes_vs_ring_bound_ratio",
            "full_ft_comm_bytes_vs_ring_bound_ratio_4_ranks",
        ),
        (
            "comm_bytes_vs_ring_bound_ratio_shard_grad_op",
            "full_ft_shard_grad_op_comm_bytes_vs_ring_bound_ratio_4_ranks",
        ),
    ] {
        if let Some(value) = report.get(source).cloned() {
            report[name] = value;
        }
    }
    // The plan against rank 0's peak RSS with the live bytes measured (see
    // `FullRun::live_memory`), on 1, 2 and 4 ranks fully sharded.
    let mut plan_ratios = Vec::new();
    for ranks in [1, 2, 4] {
        let run = FullRun {
            ranks,
            sharding: Sharding::Full,
            live_memory: true,
        };
        match run_full_gang(root, args, run, timeout).or_else(|first| {
            eprintln!("{first}; retrying once");
            run_full_gang(root, args, run, timeout)
        }) {
            Ok(zero) => {
                let figure = |key: &str| zero[key].as_f64().unwrap_or(f64::NAN);
                let (planned, rss) = (mib(figure("plan_peak_bytes")), figure("peak_rss_mib"));
                let ratio = planned / rss;
                report[format!("plan_vs_measured_rss_ratio_{ranks}_ranks")] = ratio.into();
                let line = format!(
                    "memory plan, {}: {planned:.0} MiB planned, {rss:.0} MiB live peak RSS of rank 0: {ratio:.2}",
                    run.label()
                );
                eprintln!("{line}");
                lines.push(line);
                plan_ratios.push(ratio);
            }
            Err(failure) => {
                eprintln!("memory plan: {failure}");
                failures.push(format!("memory plan: {failure}"));
            }
        }
    }
    // The plan's worst miss, either way: the figure to keep in 0.8–1.25.
    if let Some(worst) = plan_ratios
        .iter()
        .copied()
        .filter(|r| r.is_finite())
        .max_by(|a, b| (a.ln().abs()).total_cmp(&b.ln().abs()))
    {
        report["plan_vs_measured_rss_ratio"] = worst.into();
    }
    // What the same formula plans for Llama 3.1 on 16 nodes of 8 H100s, fully sharded,
    // with the job's default batchSize (4) and maxSeqLength (2048).
    let h100 = memory::gpu_memory_bytes("NVIDIA-H100-80GB-HBM3").unwrap_or(0);
    for (name, shape) in [
        ("8b", memory::ModelShape::LLAMA_3_1_8B),
        ("70b", memory::ModelShape::LLAMA_3_1_70B),
    ] {
        let plan = memory::PlanInput {
            shape,
            method: kubetune_crds::Method::Full,
            sharding: memory::Sharding::Full,
            world_size: 128,
            seq_len: 2048,
            micro_batch: 4,
            recompute: true,
            lora_rank: 0,
            processor: memory::Processor::Gpu,
            runtime_bytes: memory::GPU_RUNTIME_BYTES,
        }
        .plan();
        report[format!("plan_{name}_16x8_peak_gib_per_gpu")] = memory::gib(plan.peak_bytes).into();
        let line = format!(
            "plan, Llama 3.1 {} on 16×8 H100 ({:.1} GiB each): {}",
            name.to_uppercase(),
            memory::gib(h100),
            plan.summary()
        );
        eprintln!("{line}");
        lines.push(line);
    }
    report["failures"] = failures.into();
    eprintln!("full fine-tuning, data-parallel ({cores} cores, one thread per rank):");
    for line in lines {
        eprintln!("  {line}");
    }
    println!("{report}");
}

/// Peak resident set of a running process, from /proc (kB → MiB).
fn peak_rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Runs a command, sampling its peak RSS until it exits; returns its stdout.
fn run_measured(command: &mut Command) -> (String, f64) {
    let mut child = command
        .stdout(Stdio::piped())
        .spawn()
        .expect("the benchmark child starts");
    let pid = child.id();
    let mut peak = 0f64;
    let stdout = child.stdout.take().expect("piped stdout");
    let reader = std::thread::spawn(move || std::io::read_to_string(stdout).unwrap_or_default());
    loop {
        if let Some(p) = peak_rss_mib(pid) {
            peak = peak.max(p);
        }
        if child.try_wait().expect("wait").is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = child.wait().expect("wait");
    assert!(status.success(), "benchmark child failed: {status}");
    (reader.join().expect("reader"), peak)
}

fn last_json(text: &str) -> serde_json::Value {
    let line = text
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .expect("a JSON line");
    serde_json::from_str(line).expect("valid JSON")
}

const PYTHON: &str = r#"
import json, os, resource, sys, time
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from peft import LoraConfig, get_peft_model
spec = json.load(open(sys.argv[1]))
torch.manual_seed(1)
torch.set_num_threads(os.cpu_count())
cfg = LlamaConfig(hidden_size=spec["hidden"], intermediate_size=spec["intermediate"],
    num_hidden_layers=spec["layers"], num_attention_heads=spec["heads"],
    num_key_value_heads=spec["kv_heads"], vocab_size=spec["vocab"],
    tie_word_embeddings=True, rms_norm_eps=1e-5, max_position_embeddings=4096)
model = LlamaForCausalLM(cfg).float()
model = get_peft_model(model, LoraConfig(r=spec["rank"], lora_alpha=2 * spec["rank"],
    lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM"))
model.train()
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4, weight_decay=0.0)
batches = spec["batches"]
def step(ids):
    x = torch.tensor(ids)
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    opt.step(); opt.zero_grad(set_to_none=True)
step(batches[0])
tokens = 0
start = time.perf_counter()
for ids in batches[1:]:
    step(ids)
    tokens += sum(len(s) - 1 for s in ids)
elapsed = time.perf_counter() - start
print(json.dumps({"tokens_per_s": tokens / elapsed,
    "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"#;

const PARITY: &str = r#"
import json, sys, torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
from peft import PeftModel
d = sys.argv[1]
tok = PreTrainedTokenizerFast(tokenizer_file=f"{d}/model/tokenizer.json")
eos = tok.convert_tokens_to_ids("<|im_end|>")
model = AutoModelForCausalLM.from_pretrained(f"{d}/model", dtype=torch.float32)
def loss(m):
    total, count = 0.0, 0
    for line in open(f"{d}/text.jsonl"):
        ids = tok(json.loads(line)["text"])["input_ids"] + [eos]
        x = torch.tensor([ids])
        with torch.no_grad():
            logp = torch.log_softmax(m(input_ids=x).logits[0, :-1].float(), -1)
        total += -logp.gather(1, x[0, 1:, None]).sum().item()
        count += len(ids) - 1
    return total / count
base = loss(model)
tuned = loss(PeftModel.from_pretrained(model, f"{d}/out"))
print(json.dumps({"base": base, "peft": tuned}))
"#;

/// Trains a tiny model, then compares `eval`'s losses with transformers + PEFT's on
/// the written files: (base difference, adapter difference).
fn peft_parity(root: &Path, python: &Path) -> (f64, f64) {
    use kubetune_trainer::cli::{EvalArgs, FormatArg, run_eval};
    let dir = root.join("parity");
    TinyLlama::default()
        .write(&dir.join("model"))
        .expect("tiny model");
    write_jsonl(
        &dir.join("train.jsonl"),
        &kubetune_trainer::test_support::memorisable_chats(8),
    )
    .expect("data");
    let texts: Vec<serde_json::Value> = (0..6)
        .map(|i| serde_json::json!({ "text": format!("sample {i} about the weather") }))
        .collect();
    write_jsonl(&dir.join("text.jsonl"), &texts).expect("data");
    let mut opts = options(
        &dir,
        &Args {
            steps: 30,
            ..Args::default()
        },
    );
    opts.format = DatasetFormat::Chat;
    opts.learning_rate = 1e-2;
    opts.batch_size = 4;
    opts.max_seq_length = 128;
    opts.lora.rank = 8;
    opts.lora.targets = TargetModule::ALL.to_vec();
    train(
        &opts,
        &kubetune_trainer::model::default_device().expect("device"),
        &Control::default(),
    )
    .expect("tiny training");
    let eval = |adapter: Option<PathBuf>| {
        run_eval(&EvalArgs {
            model: dir.join("model"),
            adapter,
            data: dir.join("text.jsonl"),
            format: FormatArg::Text,
            batch_size: 2,
            max_seq_length: 128,
        })
        .expect("eval")
        .loss
    };
    let (ours_base, ours_tuned) = (eval(None), eval(Some(dir.join("out"))));
    let script = root.join("parity.py");
    std::fs::write(&script, PARITY).expect("write script");
    let output = Command::new(python)
        .arg(&script)
        .arg(&dir)
        .output()
        .expect("python runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let theirs = last_json(&String::from_utf8_lossy(&output.stdout));
    let theirs_base = theirs["base"].as_f64().expect("base");
    let theirs_tuned = theirs["peft"].as_f64().expect("peft");
    eprintln!(
        "parity: base {ours_base:.6} vs {theirs_base:.6}, adapter {ours_tuned:.6} vs {theirs_tuned:.6}"
    );
    (
        (ours_base - theirs_base).abs(),
        (ours_tuned - theirs_tuned).abs(),
    )
}

fn venv_python(root: &Path, args: &Args) -> PathBuf {
    let venv = args.venv.clone().unwrap_or_else(|| root.join("venv"));
    let python = venv.join("bin").join("python");
    if !python.exists() {
        eprintln!(
            "creating a virtual environment in {} and installing {PYTHON_PINS:?}",
            venv.display()
        );
        let ok = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .expect("python3 runs")
            .success();
        assert!(ok, "python3 -m venv failed");
        let ok = Command::new(&python)
            .args(["-m", "pip", "install", "--quiet"])
            .args(PYTHON_PINS)
            .status()
            .expect("pip runs")
            .success();
        assert!(ok, "pip install failed");
    }
    python
}

fn pytorch(root: &Path, python: &Path, args: &Args, batches: &[Vec<Vec<u32>>]) -> (f64, f64) {
    let spec = model_spec();
    let input = serde_json::json!({
        "hidden": spec.hidden, "intermediate": spec.intermediate, "layers": spec.layers,
        "heads": spec.heads, "kv_heads": spec.kv_heads, "vocab": spec.vocab,
        "rank": args.rank, "batches": batches,
    });
    let input_path = root.join("pytorch-input.json");
    std::fs::write(&input_path, input.to_string()).expect("write input");
    let script = root.join("bench.py");
    std::fs::write(&script, PYTHON).expect("write script");
    let (out, peak) = run_measured(Command::new(python).arg(&script).arg(&input_path));
    let report = last_json(&out);
    let tps = report["tokens_per_s"].as_f64().expect("tokens_per_s");
    (
        tps,
        peak.max(report["peak_rss_mib"].as_f64().unwrap_or(0.0)),
    )
}

fn main() {
    // What the trainer binary does first; the benchmark's worker measures the same.
    kubetune_trainer::tune_allocator();
    let args = parse_args();
    if let Some(root) = &args.worker {
        // The child: train (or only load) and report.
        let opts = method_options(root, &args);
        let device = kubetune_trainer::model::default_device().expect("device");
        if args.measure_load {
            let model =
                Llama::load_as(&opts.model_dir, &device, opts.method.base_format()).expect("load");
            let elements: usize = model
                .blocks()
                .iter()
                .flat_map(|b| b.linears())
                .map(|l| l.dims().map(|(o, i)| o * i).expect("dims"))
                .sum();
            println!(
                "{}",
                serde_json::json!({
                    "base_linear_bytes": model.base_linear_bytes(),
                    "base_linear_elements": elements,
                    "rss_after_load_mib": rss_now_mib(),
                })
            );
            return;
        }
        let summary = train(&opts, &device, &Control::default()).expect("training runs");
        if !summary.primary {
            return;
        }
        let tokens_per_step = summary.tokens_seen as f64 / summary.steps.max(1) as f64;
        println!(
            "{}",
            serde_json::json!({
                "tokens_per_s": summary.tokens_per_second,
                "step_s": tokens_per_step / summary.tokens_per_second,
                "collective_s_per_step": summary.collective_seconds / summary.steps.max(1) as f64,
                "collective_bytes_per_step": summary.collective_bytes as f64 / summary.steps.max(1) as f64,
                "state_bytes": summary.state_bytes,
                "plan_peak_bytes": summary.memory_plan.peak_bytes,
                "optimizer_state_mib": mib(summary.optimizer_state_bytes as f64),
                "peak_rss_mib": peak_rss_mib(std::process::id()),
            })
        );
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let spec = model_spec();
    // Full fine-tuning writes its own (smaller) model; the data below serves all.
    let full = args.method == "full";
    let started = Instant::now();
    if !full {
        spec.write(&root.join("model")).expect("write model");
    }
    // Random lowercase text; the fixture tokenizer has one token per byte.
    let mut rng = Rng::new(5);
    // Enough for 4 ranks' global batches with full fine-tuning.
    let examples = args.batch_size * args.steps as usize * if full { 4 } else { 1 };
    let lines: Vec<serde_json::Value> = (0..examples)
        .map(|_| {
            let text: String = (0..args.seq_len - 2)
                .map(|_| char::from(b'a' + rng.below(26) as u8))
                .collect();
            serde_json::json!({ "text": text })
        })
        .collect();
    write_jsonl(&root.join("train.jsonl"), &lines).expect("write data");
    if !full {
        eprintln!(
            "model: {:.1}M parameters, written in {:.1}s",
            spec.parameters() as f64 / 1e6,
            started.elapsed().as_secs_f64()
        );
    }
    match args.method.as_str() {
        "qlora" => return bench_qlora(root, &args, &spec),
        "dpo" => return bench_dpo(root, &args, &spec),
        "full" => return bench_full(root, &args),
        "lora" => {}
        other => panic!("--method {other}: expected lora, qlora, dpo or full"),
    }

    let (report, rust_peak) = run_worker(root, &args, "lora", false);
    let rust_tps = report["tokens_per_s"].as_f64().expect("tokens_per_s");
    eprintln!("kubetune-trainer: {rust_tps:.0} tokens/s, peak RSS {rust_peak:.0} MiB");

    let mut report = serde_json::json!({
        "model_params_m": spec.parameters() as f64 / 1e6,
        "seq_len_tokens": args.seq_len,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "lora_rank": args.rank,
        "recompute": args.recompute,
        "tokens_per_s": rust_tps,
        "peak_rss_mib": rust_peak,
    });
    if args.pytorch {
        // The same token sequences, in the same batches and order.
        let config = ModelConfig::load(&root.join("model")).expect("config");
        let tokenizer = TextTokenizer::load(&root.join("model"), &config).expect("tokenizer");
        let seqs: Vec<Vec<u32>> = lines
            .iter()
            .map(|l| {
                let text = l["text"].as_str().expect("text");
                tokenizer.encode_text(text).expect("encode").tokens
            })
            .collect();
        let batches: Vec<Vec<Vec<u32>>> =
            seqs.chunks(args.batch_size).map(|c| c.to_vec()).collect();
        let python = venv_python(root, &args);
        let (py_tps, py_peak) = pytorch(root, &python, &args, &batches);
        eprintln!("pytorch + peft: {py_tps:.0} tokens/s, peak RSS {py_peak:.0} MiB");
        report["pytorch_tokens_per_s"] = py_tps.into();
        report["pytorch_peak_rss_mib"] = py_peak.into();
        report["tokens_per_s_ratio"] = (rust_tps / py_tps).into();
        report["peak_rss_ratio"] = (rust_peak / py_peak).into();
        let (base_diff, adapter_diff) = peft_parity(root, &python);
        report["peft_parity_base_loss_abs_diff_nats"] = base_diff.into();
        report["peft_parity_adapter_loss_abs_diff_nats"] = adapter_diff.into();
    }
    println!("{report}");
}
