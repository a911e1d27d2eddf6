//! The command line: `train` (from the operator's mounted config or from flags) and
//! `eval`, and the process-level glue around them (progress server, signals, the
//! termination log).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use kubetune_crds::decimal::Decimal;
use kubetune_crds::training::contract;
use kubetune_crds::training::{
    CheckpointSpec, DatasetFormat, DpoSpec, Hyperparameters, LoraSpec, Method, QloraSpec,
    Scheduler, TargetModule, TrainerConfig,
};
use serde::Serialize;

use crate::adapter::load_adapter;
use crate::data::load_dataset;
use crate::dpo::DpoSettings;
use crate::error::{Error, Result, read_input_file};
use crate::full::DEFAULT_MAX_SHARD_BYTES;
use crate::gguf::{ImportSummary, import_gguf};
use crate::lora::LoraSettings;
use crate::model::{Llama, Pass, default_device};
use crate::parallel::{Gang, Sharding};
use crate::progress::{self, SharedProgress};
use crate::tokenizer::TextTokenizer;
use crate::train::{Control, MethodOptions, RunSummary, TrainOptions, evaluate, train};

/// kubetune's trainer: LoRA fine-tuning of Llama-family models, PEFT adapters out.
#[derive(Debug, Parser)]
#[command(name = "kubetune-trainer", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Fine-tune a model and write a PEFT adapter.
    Train(Box<TrainArgs>),
    /// Print the mean cross-entropy of a model (and adapter) on a dataset as one JSON line.
    Eval(EvalArgs),
    /// Convert a llama.cpp GGUF file of a Llama-architecture model into a Hugging Face
    /// checkpoint directory (f32 weights, tokenizer, chat template).
    ImportGguf(ImportGgufArgs),
}

/// Dataset formats on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum FormatArg {
    /// `{"messages": [...]}`.
    Chat,
    /// `{"prompt": ..., "completion": ...}`.
    Instruction,
    /// `{"text": ...}`.
    Text,
    /// `{"prompt": ..., "chosen": ..., "rejected": ...}` (method dpo).
    Preference,
}

impl From<FormatArg> for DatasetFormat {
    fn from(f: FormatArg) -> Self {
        match f {
            FormatArg::Chat => Self::Chat,
            FormatArg::Instruction => Self::Instruction,
            FormatArg::Text => Self::Text,
            FormatArg::Preference => Self::Preference,
        }
    }
}

/// Methods on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum MethodArg {
    /// LoRA on a frozen base.
    Lora,
    /// LoRA on a base quantized to 4-bit NF4.
    Qlora,
    /// Direct Preference Optimization with a LoRA adapter (needs --format preference).
    Dpo,
    /// Every weight trained; writes a Hugging Face checkpoint (data-parallel across
    /// the ranks of KUBETUNE_WORLD_SIZE).
    Full,
}

/// Schedulers on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SchedulerArg {
    /// Cosine decay.
    Cosine,
    /// Linear decay.
    Linear,
    /// No decay.
    Constant,
}

/// `train`'s flags.
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// The TrainerConfig file the operator mounts (JSON or YAML); the other flags
    /// below are then not allowed, except --progress-addr, --recompute and the
    /// timeouts.
    #[arg(long, conflicts_with_all = ["model", "data", "out"])]
    pub config: Option<PathBuf>,
    /// Hugging Face checkpoint directory.
    #[arg(long, required_unless_present = "config")]
    pub model: Option<PathBuf>,
    /// Training JSONL.
    #[arg(long, required_unless_present = "config")]
    pub data: Option<PathBuf>,
    /// Output directory for the adapter and metrics.json.
    #[arg(long, required_unless_present = "config")]
    pub out: Option<PathBuf>,
    /// Dataset format.
    #[arg(long, value_enum, default_value = "chat")]
    pub format: FormatArg,
    /// Fine-tuning method.
    #[arg(long, value_enum, default_value = "lora")]
    pub method: MethodArg,
    /// Held-out JSONL for evaluation.
    #[arg(long)]
    pub eval_data: Option<PathBuf>,
    /// Percent of the training data held out when there is no --eval-data.
    #[arg(long, default_value_t = 0)]
    pub eval_split_percent: u32,
    /// Checkpoint directory (default OUT/checkpoints).
    #[arg(long)]
    pub checkpoint_dir: Option<PathBuf>,
    /// Passes over the data.
    #[arg(long, conflicts_with = "max_steps")]
    pub epochs: Option<u32>,
    /// Optimizer steps instead of epochs.
    #[arg(long)]
    pub max_steps: Option<u32>,
    /// Peak learning rate (default 2e-4).
    #[arg(long)]
    pub lr: Option<String>,
    /// Sequences per micro-batch (default 4).
    #[arg(long)]
    pub batch_size: Option<u32>,
    /// Micro-batches per optimizer step (default 1).
    #[arg(long)]
    pub grad_accum: Option<u32>,
    /// Longest sequence in tokens (default 2048).
    #[arg(long)]
    pub max_seq_length: Option<u32>,
    /// Warmup steps (default 0).
    #[arg(long)]
    pub warmup_steps: Option<u32>,
    /// Learning-rate decay.
    #[arg(long, value_enum)]
    pub scheduler: Option<SchedulerArg>,
    /// AdamW weight decay (default 0).
    #[arg(long)]
    pub weight_decay: Option<String>,
    /// Global gradient-norm clip, 0 for none (default 1.0).
    #[arg(long)]
    pub max_grad_norm: Option<String>,
    /// Seed (default 42).
    #[arg(long)]
    pub seed: Option<u64>,
    /// LoRA rank (default 16).
    #[arg(long)]
    pub rank: Option<u32>,
    /// LoRA alpha (default 32).
    #[arg(long)]
    pub alpha: Option<u32>,
    /// LoRA dropout (default 0.05).
    #[arg(long)]
    pub dropout: Option<String>,
    /// Comma-separated target modules (default q_proj,k_proj,v_proj,o_proj).
    #[arg(long, value_delimiter = ',')]
    pub target_modules: Option<Vec<String>>,
    /// rsLoRA scaling alpha/√r.
    #[arg(long)]
    pub rs_lora: bool,
    /// Steps between checkpoints (default 200).
    #[arg(long)]
    pub checkpoint_every: Option<u32>,
    /// Checkpoints to keep (default 2).
    #[arg(long)]
    pub checkpoint_keep: Option<u32>,
    /// Full fine-tuning: write the weights in shards of at most this many bytes, with
    /// an index (default 5e9, as transformers).
    #[arg(long)]
    pub max_shard_bytes: Option<u64>,
    /// DPO's β (default 0.1).
    #[arg(long)]
    pub beta: Option<String>,
    /// DPO's label smoothing ε (default 0).
    #[arg(long)]
    pub label_smoothing: Option<String>,
    /// QLoRA: quantize only the weights, not their block maxima (default: both).
    #[arg(long)]
    pub no_double_quant: bool,
    /// Recompute each block in backward instead of keeping activations.
    #[arg(long)]
    pub recompute: bool,
    /// Bytes of memory of the GPU (the operator sets it from the job's GPU product):
    /// a run whose memory plan needs more refuses to start. Unset: not checked.
    #[arg(long, env = kubetune_crds::training::contract::ENV_GPU_MEMORY_BYTES)]
    pub gpu_memory_bytes: Option<u64>,
    /// Where progress is served over HTTP.
    #[arg(long, env = kubetune_crds::training::contract::ENV_PROGRESS_ADDR, default_value = "0.0.0.0:8080")]
    pub progress_addr: String,
    /// Data-parallel runs: seconds to wait for rank 0's rendezvous and for every rank
    /// to join it (pods of a gang may start minutes apart).
    #[arg(long, env = ENV_RENDEZVOUS_TIMEOUT, default_value_t = 600)]
    pub rendezvous_timeout_seconds: u64,
    /// Data-parallel runs: seconds one gradient exchange may wait for the other ranks.
    /// A rank that dies is noticed at once; this bounds one that hangs, and must exceed
    /// rank 0's checkpoint writes, which the others wait for.
    #[arg(long, env = ENV_COLLECTIVE_TIMEOUT, default_value_t = 300)]
    pub collective_timeout_seconds: u64,
    /// Data-parallel runs: what each rank keeps of the weights, gradients and optimizer
    /// state. `full` (ZeRO stage 3, the default): an even share of each, the weights
    /// gathered a block at a time; `shard-grad-op` (FSDP's SHARD_GRAD_OP): the same
    /// between steps, but weights gathered in forward stay until backward (the whole
    /// weights at the peak, a third less traffic); `optimizer-state` (ZeRO stage 1):
    /// whole weights and gradients, a share of AdamW's moments; `replicated`:
    /// everything on every rank.
    #[arg(long, env = ENV_SHARDING, default_value = "full")]
    pub sharding: Sharding,
    /// Data-parallel runs: the same as `--sharding replicated`.
    #[arg(long, env = ENV_REPLICATE_OPTIMIZER_STATE)]
    pub replicate_optimizer_state: bool,
    /// Behave as if SIGTERM arrived right after this step (tests and drills).
    #[arg(long, hide = true)]
    pub interrupt_after_step: Option<u64>,
}

/// Overrides `--rendezvous-timeout-seconds`.
pub const ENV_RENDEZVOUS_TIMEOUT: &str = "KUBETUNE_RENDEZVOUS_TIMEOUT_SECONDS";
/// Overrides `--collective-timeout-seconds`.
pub const ENV_COLLECTIVE_TIMEOUT: &str = "KUBETUNE_COLLECTIVE_TIMEOUT_SECONDS";
/// Sets `--sharding`.
pub const ENV_SHARDING: &str = "KUBETUNE_SHARDING";
/// Sets `--replicate-optimizer-state` (`true`).
pub const ENV_REPLICATE_OPTIMIZER_STATE: &str = "KUBETUNE_REPLICATE_OPTIMIZER_STATE";

/// `eval`'s flags.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Hugging Face checkpoint directory.
    #[arg(long)]
    pub model: PathBuf,
    /// A PEFT LoRA adapter directory to apply.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// JSONL dataset.
    #[arg(long)]
    pub data: PathBuf,
    /// Dataset format.
    #[arg(long, value_enum, default_value = "chat")]
    pub format: FormatArg,
    /// Sequences per batch.
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    /// Longest sequence in tokens.
    #[arg(long, default_value_t = 2048)]
    pub max_seq_length: usize,
}

/// `import-gguf`'s arguments.
#[derive(Debug, Args)]
pub struct ImportGgufArgs {
    /// The GGUF file.
    pub file: PathBuf,
    /// The checkpoint directory to create (must not exist, or be empty).
    #[arg(long)]
    pub out: PathBuf,
}

/// Runs `import-gguf`.
pub fn run_import_gguf(args: &ImportGgufArgs) -> Result<ImportSummary> {
    import_gguf(&args.file, &args.out)
}

fn decimal(flag: &str, text: &str) -> Result<Decimal> {
    text.parse()
        .map_err(|err| Error::invalid(format!("--{flag}: {err}")))
}

fn value(field: &str, d: &Decimal) -> Result<f64> {
    d.value()
        .map_err(|err| Error::invalid(format!("{field}: {err}")))
}

fn target_module(name: &str) -> Result<TargetModule> {
    TargetModule::ALL
        .into_iter()
        .find(|m| m.as_str() == name.trim())
        .ok_or_else(|| {
            Error::invalid(format!(
                "unknown target module {name:?}; expected some of q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"
            ))
        })
}

/// The TrainerConfig the standalone flags describe (defaults as in the CRD).
pub fn config_from_flags(args: &TrainArgs) -> Result<TrainerConfig> {
    let mut hp = Hyperparameters::default();
    if let Some(e) = args.epochs {
        hp.epochs = e;
    }
    hp.max_steps = args.max_steps;
    if let Some(lr) = &args.lr {
        hp.learning_rate = decimal("lr", lr)?;
    }
    if let Some(b) = args.batch_size {
        hp.batch_size = b;
    }
    if let Some(g) = args.grad_accum {
        hp.gradient_accumulation_steps = g;
    }
    if let Some(m) = args.max_seq_length {
        hp.max_seq_length = m;
    }
    if let Some(w) = args.warmup_steps {
        hp.warmup_steps = w;
    }
    if let Some(s) = args.scheduler {
        hp.scheduler = match s {
            SchedulerArg::Cosine => Scheduler::Cosine,
            SchedulerArg::Linear => Scheduler::Linear,
            SchedulerArg::Constant => Scheduler::Constant,
        };
    }
    if let Some(w) = &args.weight_decay {
        hp.weight_decay = decimal("weight-decay", w)?;
    }
    if let Some(m) = &args.max_grad_norm {
        hp.max_grad_norm = decimal("max-grad-norm", m)?;
    }
    if let Some(s) = args.seed {
        hp.seed = s;
    }
    let mut lora = LoraSpec::default();
    if let Some(r) = args.rank {
        lora.rank = r;
    }
    if let Some(a) = args.alpha {
        lora.alpha = a;
    }
    if let Some(d) = &args.dropout {
        lora.dropout = decimal("dropout", d)?;
    }
    if let Some(t) = &args.target_modules {
        lora.target_modules = t.iter().map(|n| target_module(n)).collect::<Result<_>>()?;
    }
    lora.rs_lora = args.rs_lora;
    let mut checkpoint = CheckpointSpec::default();
    if let Some(e) = args.checkpoint_every {
        checkpoint.every_steps = e;
    }
    if let Some(k) = args.checkpoint_keep {
        checkpoint.keep = k;
    }
    let missing = |flag: &str| Error::invalid(format!("--{flag} is required without --config"));
    let out = args.out.clone().ok_or_else(|| missing("out"))?;
    let model = args.model.clone().ok_or_else(|| missing("model"))?;
    Ok(TrainerConfig {
        method: match args.method {
            MethodArg::Lora => Method::Lora,
            MethodArg::Qlora => Method::Qlora,
            MethodArg::Dpo => Method::Dpo,
            MethodArg::Full => Method::Full,
        },
        base_model_name: model.file_name().map(|n| n.to_string_lossy().into_owned()),
        model_dir: model.to_string_lossy().into_owned(),
        dataset_format: args.format.into(),
        train_file: args
            .data
            .clone()
            .ok_or_else(|| missing("data"))?
            .to_string_lossy()
            .into_owned(),
        eval_file: args
            .eval_data
            .as_ref()
            .map(|p| p.to_string_lossy().into_owned()),
        eval_split_percent: args.eval_split_percent,
        checkpoint_dir: args
            .checkpoint_dir
            .clone()
            .unwrap_or_else(|| out.join("checkpoints"))
            .to_string_lossy()
            .into_owned(),
        output_dir: out.to_string_lossy().into_owned(),
        hyperparameters: hp,
        lora: Some(lora),
        qlora: (args.method == MethodArg::Qlora).then_some(QloraSpec {
            double_quantization: !args.no_double_quant,
        }),
        dpo: match args.method {
            MethodArg::Dpo => {
                let mut dpo = DpoSpec::default();
                if let Some(beta) = &args.beta {
                    dpo.beta = decimal("beta", beta)?;
                }
                if let Some(eps) = &args.label_smoothing {
                    dpo.label_smoothing = decimal("label-smoothing", eps)?;
                }
                Some(dpo)
            }
            _ => None,
        },
        checkpoint,
    })
}

/// Reads the operator's mounted TrainerConfig (JSON or YAML).
pub fn read_config(path: &Path) -> Result<TrainerConfig> {
    let bytes = read_input_file(path, "trainer config")?;
    serde_yaml::from_slice(&bytes).map_err(|err| {
        Error::invalid(format!(
            "{} is not a valid trainer config: {err}",
            path.display()
        ))
    })
}

/// Resolves a TrainerConfig into the options of a run, refusing what this trainer
/// cannot do.
pub fn options_from_config(config: &TrainerConfig, recompute: bool) -> Result<TrainOptions> {
    // The operator joins each path to its volume's mount; one with a ".." component
    // would open another team's files on a shared volume. The CRD refuses them at apply;
    // this refuses them again, whatever wrote the config.
    let paths = [
        ("modelDir", Some(&config.model_dir)),
        ("trainFile", Some(&config.train_file)),
        ("evalFile", config.eval_file.as_ref()),
        ("outputDir", Some(&config.output_dir)),
        ("checkpointDir", Some(&config.checkpoint_dir)),
    ];
    for (field, path) in paths {
        if let Some(path) = path
            && std::path::Path::new(path)
                .components()
                .any(|c| c == std::path::Component::ParentDir)
        {
            return Err(Error::invalid(format!(
                "{field} {path:?} has a \"..\" component: paths must stay inside their volume"
            )));
        }
    }
    let method = match config.method {
        Method::Lora => MethodOptions::Lora,
        Method::Qlora => MethodOptions::Qlora {
            double_quant: config.qlora.clone().unwrap_or_default().double_quantization,
        },
        Method::Dpo => {
            let dpo = config.dpo.clone().unwrap_or_default();
            let beta = value("dpo.beta", &dpo.beta)?;
            let label_smoothing = value("dpo.labelSmoothing", &dpo.label_smoothing)?;
            if !(beta > 0.0 && beta <= 10.0) {
                return Err(Error::invalid(format!(
                    "dpo.beta {beta} must be above 0 and at most 10"
                )));
            }
            if !(0.0..0.5).contains(&label_smoothing) {
                return Err(Error::invalid(format!(
                    "dpo.labelSmoothing {label_smoothing} must be at least 0 and below 0.5"
                )));
            }
            MethodOptions::Dpo(DpoSettings {
                beta,
                label_smoothing,
            })
        }
        Method::Full => MethodOptions::Full {
            max_shard_bytes: DEFAULT_MAX_SHARD_BYTES,
        },
    };
    let hp = &config.hyperparameters;
    let lora = config.lora.clone().unwrap_or_default();
    Ok(TrainOptions {
        method,
        model_dir: config.model_dir.clone().into(),
        base_model_name: config.base_model_name.clone(),
        train_file: config.train_file.clone().into(),
        eval_file: config.eval_file.clone().map(PathBuf::from),
        eval_split_percent: config.eval_split_percent,
        format: config.dataset_format,
        output_dir: config.output_dir.clone().into(),
        checkpoint_dir: config.checkpoint_dir.clone().into(),
        epochs: u64::from(hp.epochs),
        max_steps: hp.max_steps.map(u64::from),
        learning_rate: value("learningRate", &hp.learning_rate)?,
        batch_size: hp.batch_size as usize,
        grad_accum: hp.gradient_accumulation_steps as usize,
        max_seq_length: hp.max_seq_length as usize,
        warmup_steps: u64::from(hp.warmup_steps),
        scheduler: hp.scheduler,
        weight_decay: value("weightDecay", &hp.weight_decay)?,
        max_grad_norm: value("maxGradNorm", &hp.max_grad_norm)?,
        seed: hp.seed,
        lora: LoraSettings {
            rank: lora.rank as usize,
            alpha: f64::from(lora.alpha),
            dropout: value("lora.dropout", &lora.dropout)?,
            rs_lora: lora.rs_lora,
            targets: lora.target_modules.clone(),
        },
        checkpoint_every: u64::from(config.checkpoint.every_steps),
        checkpoint_keep: config.checkpoint.keep as usize,
        recompute,
        gpu_memory_bytes: None,
        interrupt_after_step: None,
        gang: None,
    })
}

/// The gang the operator placed this process in, from `KUBETUNE_WORLD_SIZE`,
/// `KUBETUNE_RANK` (else `KUBETUNE_NODE_RANK` × `KUBETUNE_RANKS_PER_POD`) and
/// `KUBETUNE_RENDEZVOUS`; `None` for a world of one (or none set).
pub fn gang_from_env(rendezvous_timeout: Duration, timeout: Duration) -> Result<Option<Gang>> {
    let var = |name: &str| std::env::var(name).ok().map(|v| v.trim().to_owned());
    let Some(world) = var(contract::ENV_WORLD_SIZE).filter(|w| !w.is_empty()) else {
        return Ok(None);
    };
    let world_size: usize = world.parse().map_err(|_| {
        Error::invalid(format!(
            "{} {world:?} is not a number of ranks",
            contract::ENV_WORLD_SIZE
        ))
    })?;
    if world_size <= 1 {
        return Ok(None);
    }
    // The operator sets the rank of a pod's only rank; a pod's launcher sets each of
    // its ranks'. Without either, the pod's first rank (node rank × ranks per pod).
    let rank = var(contract::ENV_RANK)
        .filter(|r| !r.is_empty())
        .or_else(|| {
            let per_pod: usize = var(contract::ENV_RANKS_PER_POD)?.parse().ok()?;
            let node: usize = var(contract::ENV_NODE_RANK)?.parse().ok()?;
            Some((node * per_pod.max(1)).to_string())
        })
        .unwrap_or_default();
    let rank: usize = rank
        .parse()
        .ok()
        .filter(|r| *r < world_size)
        .ok_or_else(|| {
            Error::invalid(format!(
                "{} {rank:?} is not a rank of a world of {world_size}",
                contract::ENV_RANK
            ))
        })?;
    let rendezvous = var(contract::ENV_RENDEZVOUS)
        .filter(|r| !r.is_empty())
        .ok_or_else(|| {
            Error::invalid(format!(
                "{} (rank 0's host:port) is needed with {} {world_size}",
                contract::ENV_RENDEZVOUS,
                contract::ENV_WORLD_SIZE
            ))
        })?;
    Ok(Some(Gang {
        rank,
        world_size,
        rendezvous,
        rendezvous_timeout,
        timeout,
        sharding: Sharding::default(),
    }))
}

/// The line `eval` prints.
#[derive(Debug, Serialize)]
pub struct EvalReport {
    /// Mean cross-entropy per target token.
    pub loss: f64,
    /// Target tokens.
    pub tokens: usize,
}

/// Runs `eval`.
pub fn run_eval(args: &EvalArgs) -> Result<EvalReport> {
    let device = default_device()?;
    let mut model = Llama::load(&args.model, &device)?;
    let tokenizer = TextTokenizer::load(&args.model, &model.config)?;
    if let Some(dir) = &args.adapter {
        let (settings, pairs) = load_adapter(dir, &device)?;
        model.set_lora(settings, pairs)?;
    }
    let examples = load_dataset(
        &args.data,
        args.format.into(),
        &tokenizer,
        args.max_seq_length,
    )?;
    let (sum, tokens) = evaluate(
        &model,
        &examples,
        args.batch_size,
        tokenizer.pad_id,
        Pass::EVAL,
    )?;
    Ok(EvalReport {
        loss: sum / tokens.max(1) as f64,
        tokens,
    })
}

/// Runs `train`: serves progress, turns SIGTERM into checkpoint-and-stop, and trains
/// on a blocking thread.
pub async fn run_train(args: TrainArgs) -> Result<RunSummary> {
    let config = match &args.config {
        Some(path) => read_config(path)?,
        None => config_from_flags(&args)?,
    };
    let mut opts = options_from_config(&config, args.recompute)?;
    opts.interrupt_after_step = args.interrupt_after_step;
    opts.gpu_memory_bytes = args.gpu_memory_bytes;
    opts.gang = gang_from_env(
        Duration::from_secs(args.rendezvous_timeout_seconds),
        Duration::from_secs(args.collective_timeout_seconds),
    )?
    .map(|gang| Gang {
        sharding: if args.replicate_optimizer_state {
            Sharding::Replicated
        } else {
            args.sharding
        },
        ..gang
    });
    if let (MethodOptions::Full { max_shard_bytes }, Some(bytes)) =
        (&mut opts.method, args.max_shard_bytes)
    {
        *max_shard_bytes = bytes.max(1);
    }
    let progress = SharedProgress::default();
    let control = Control {
        stop: Arc::default(),
        progress: progress.clone(),
    };
    let addr = args.progress_addr.clone();
    tokio::spawn(async move {
        if let Err(err) = progress::serve(&addr, progress).await {
            // Training matters more than its progress page.
            tracing::warn!(error = %err, "progress server stopped");
        }
    });
    let stop = control.stop.clone();
    tokio::spawn(async move {
        wait_for_termination().await;
        tracing::warn!("termination requested: checkpointing after the current step");
        stop.store(true, Ordering::SeqCst);
    });
    let device = default_device()?;
    tokio::task::spawn_blocking(move || train(&opts, &device, &control))
        .await
        .map_err(|err| {
            Error::Tensor(candle_core::Error::Msg(format!(
                "training thread failed: {err}"
            )))
        })?
}

async fn wait_for_termination() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(err) => {
                tracing::warn!(error = %err, "cannot watch SIGTERM; watching Ctrl-C only");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(train_file: &str) -> TrainerConfig {
        serde_json::from_value(serde_json::json!({
            "method": "lora",
            "modelDir": "/model/tiny",
            "datasetFormat": "chat",
            "trainFile": train_file,
            "outputDir": "/output/team/job",
            "checkpointDir": "/output/team/job/checkpoints",
        }))
        .expect("a trainer config")
    }

    #[test]
    fn a_path_that_leaves_its_volume_is_refused() {
        assert!(options_from_config(&config("/data/support/train.jsonl"), false).is_ok());
        let error = options_from_config(&config("/data/../other-team/train.jsonl"), false)
            .expect_err("refused");
        assert!(error.is_invalid_input());
        assert!(error.to_string().contains("trainFile"), "{error}");
    }
}
