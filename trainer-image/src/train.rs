//! The training loop: LoRA fine-tuning with AdamW, gradient accumulation, clipping,
//! a warmup schedule, evaluation before and after, checkpoints and exact resume.
//!
//! The data stream is the concatenation of epochs, each a seed-fixed permutation of the
//! training set cut into micro-batches; optimizer step `k` consumes micro-batches
//! `[k·accum, (k+1)·accum)`. Everything random is a function of the seed and a position
//! in that stream, so a checkpoint needs only the step, the stream position and the
//! generator state to continue bit-identically.
//!
//! The loss of a step is the mean cross-entropy per target token over all its
//! micro-batches (each micro-batch's summed loss is divided by the step's total target
//! count, so gradients do not depend on how tokens fall into micro-batches).
//!
//! Full fine-tuning can run data-parallel across ranks ([`parallel`](crate::parallel)):
//! a micro-batch of the stream is then `batch_size × world_size` sequences, each rank
//! back-propagates its contiguous `batch_size` of them, and the ranks' gradients are
//! summed before the optimizer step, which reproduces one process training with the
//! global batch. How the weights, gradients and optimizer state are held (whole in
//! this process, or sharded across the gang by [`crate::zero3`]) is the loop's
//! `Engine`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use kubetune_crds::training::{DatasetFormat, Scheduler};
use serde::Serialize;

use crate::adapter::{Artifact, save_adapter, write_atomic};
use crate::checkpoint::{TrainerState, resume_latest, save_checkpoint};
use crate::config::ModelConfig;
use crate::data::{
    Batch, Example, PreferencePair, epoch_order, load_dataset, load_preferences, make_batch,
    split_eval,
};
use crate::dpo::{
    DpoSettings, DpoStats, PairBatch, dpo_loss, evaluate_dpo, logps_under, make_pair_batch,
    sequence_logps,
};
use crate::error::{Error, Result};
use crate::full::save_full_model;
use crate::lora::{DropoutKey, LoraSettings};
use crate::model::{BaseFormat, Llama, Pass, compute_dtype};
use crate::optim::{AdamW, AdamWConfig, clip_grad_norm, learning_rate};
use crate::parallel::{Gang, Partition, Ranks, Sharding, weights_fingerprint};
use crate::progress::{SharedProgress, update};
use crate::rng::Rng;
use crate::tokenizer::TextTokenizer;
use crate::zero3::{Traffic, Zero3};
use kubetune_crds::memory::MemoryPlan;

/// The fine-tuning method of a run and its settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum MethodOptions {
    /// LoRA on a frozen base in the compute dtype.
    Lora,
    /// LoRA on a base quantized to NF4.
    Qlora {
        /// Quantize the block maxima too.
        double_quant: bool,
    },
    /// DPO with a LoRA adapter on a frozen base; preference data.
    Dpo(DpoSettings),
    /// Every weight trained (f32), written as a Hugging Face checkpoint.
    Full {
        /// Weights above this size are written in shards with an index.
        max_shard_bytes: u64,
    },
}

impl MethodOptions {
    /// How the base model's linear weights are loaded.
    pub fn base_format(self) -> BaseFormat {
        match self {
            Self::Qlora { double_quant } => BaseFormat::Nf4 { double_quant },
            Self::Full { .. } => BaseFormat::Master,
            Self::Lora | Self::Dpo(_) => BaseFormat::Frozen,
        }
    }
}

/// Everything a training run needs, resolved from the operator's config or the CLI.
#[derive(Clone, Debug)]
pub struct TrainOptions {
    /// The method.
    pub method: MethodOptions,
    /// Hugging Face checkpoint directory.
    pub model_dir: PathBuf,
    /// Name recorded as `base_model_name_or_path`.
    pub base_model_name: Option<String>,
    /// Training JSONL.
    pub train_file: PathBuf,
    /// Eval JSONL, if any.
    pub eval_file: Option<PathBuf>,
    /// Percent of the training set held out when there is no eval file.
    pub eval_split_percent: u32,
    /// Dataset format.
    pub format: DatasetFormat,
    /// Where the adapter and metrics go.
    pub output_dir: PathBuf,
    /// Where checkpoints go and are resumed from.
    pub checkpoint_dir: PathBuf,
    /// Passes over the data (ignored with `max_steps`).
    pub epochs: u64,
    /// Fixed number of optimizer steps.
    pub max_steps: Option<u64>,
    /// Peak learning rate.
    pub learning_rate: f64,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Longest sequence; longer ones are truncated.
    pub max_seq_length: usize,
    /// Warmup steps.
    pub warmup_steps: u64,
    /// Decay after warmup.
    pub scheduler: Scheduler,
    /// AdamW weight decay.
    pub weight_decay: f64,
    /// Global-norm clip (0: off).
    pub max_grad_norm: f64,
    /// Seed for init, data order and dropout.
    pub seed: u64,
    /// The adapter.
    pub lora: LoraSettings,
    /// Steps between checkpoints.
    pub checkpoint_every: u64,
    /// Checkpoints kept.
    pub checkpoint_keep: usize,
    /// Layer-wise recompute: keep only block inputs during forward and re-run each
    /// block in backward (less memory, about one more forward of compute).
    pub recompute: bool,
    /// Bytes of memory of the GPU, where the run has one and knows it: a memory plan
    /// above it refuses to start.
    pub gpu_memory_bytes: Option<u64>,
    /// Behave as if SIGTERM arrived right after this step (for tests and drills).
    pub interrupt_after_step: Option<u64>,
    /// The data-parallel gang this process trains in (full fine-tuning only); `None`:
    /// it trains alone. `batch_size` is then per rank.
    pub gang: Option<Gang>,
}

impl TrainOptions {
    /// Whether this run is fully sharded across its gang ([`Sharding::Full`] or
    /// [`Sharding::ShardGradOp`], method full, more than one rank): see
    /// [`crate::zero3`].
    pub fn is_fully_sharded(&self) -> bool {
        matches!(self.method, MethodOptions::Full { .. })
            && self.gang.as_ref().is_some_and(|g| {
                g.world_size > 1 && matches!(g.sharding, Sharding::Full | Sharding::ShardGradOp)
            })
    }
}

/// What a finished run reports (also written as `metrics.json`).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RunSummary {
    /// Optimizer steps taken in total.
    pub steps: u64,
    /// Training examples.
    pub train_examples: usize,
    /// Eval examples.
    pub eval_examples: usize,
    /// Mean loss of each step.
    pub loss_history: Vec<f64>,
    /// Eval loss of the base model before training.
    pub base_eval_loss: Option<f64>,
    /// Eval loss of the tuned model.
    pub eval_loss: Option<f64>,
    /// Training tokens (non-padding inputs) over the whole run.
    pub tokens_seen: u64,
    /// Throughput of the last attempt.
    pub tokens_per_second: f64,
    /// Wall time of the last attempt.
    pub duration_seconds: f64,
    /// Step the last attempt resumed from (0: fresh start).
    pub resumed_from_step: u64,
    /// The adapter file's hash and size (full fine-tuning: the model's weights file, or
    /// its index when sharded).
    pub adapter: Artifact,
    /// Method-specific figures: for DPO the last step's `rewards/chosen`,
    /// `rewards/rejected`, `accuracy`, `margin`, and the same on the eval set prefixed
    /// `eval_`.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub metrics: BTreeMap<String, f64>,
    /// Data-parallel runs: seconds of the last attempt's steps this rank spent in
    /// collectives (gradients, and weights when sharded), waiting for slower ranks
    /// included.
    #[serde(skip_serializing_if = "is_zero")]
    pub collective_seconds: f64,
    /// Bytes of optimizer state (AdamW's moments) this rank held: all of it alone or
    /// replicated, its share when sharded across a gang.
    pub optimizer_state_bytes: u64,
    /// Bytes of training state this rank held between steps: weights, gradients and
    /// optimizer state (its shares of them when fully sharded).
    pub state_bytes: u64,
    /// Data-parallel runs: bytes this rank sent in the collectives of the last
    /// attempt's steps.
    #[serde(skip_serializing_if = "is_zero_u64")]
    pub collective_bytes: u64,
    /// The run's memory plan, per rank ([`crate::memory`]).
    pub memory_plan: MemoryPlan,
    /// Whether this process wrote the outputs: rank 0 of a gang, or a lone process.
    /// Other ranks write nothing, and their `adapter` is empty.
    #[serde(skip)]
    pub primary: bool,
}

fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

fn is_zero_u64(x: &u64) -> bool {
    *x == 0
}

/// Summed loss and the target count of a dataset under `pass`.
pub fn evaluate(
    model: &Llama,
    examples: &[Example],
    batch_size: usize,
    pad_id: u32,
    pass: Pass,
) -> Result<(f64, usize)> {
    evaluate_shard(model, examples, batch_size, pad_id, pass, 0, 1)
}

/// [`evaluate`] on every `world_size`-th batch from batch `rank` on: the share of one
/// rank of a gang, whose sums add up to the whole set's.
pub fn evaluate_shard(
    model: &Llama,
    examples: &[Example],
    batch_size: usize,
    pad_id: u32,
    pass: Pass,
    rank: usize,
    world_size: usize,
) -> Result<(f64, usize)> {
    let mut total = 0.0;
    let mut count = 0;
    let chunks = examples.chunks(batch_size.max(1));
    for chunk in chunks.skip(rank).step_by(world_size.max(1)) {
        let refs: Vec<&Example> = chunk.iter().collect();
        let batch = make_batch(&refs, pad_id, model.device())?;
        let (_, t) = batch.ids.dims2()?;
        let pos = model.positions(t)?;
        let mut x = model.embed(&batch.ids)?;
        for i in 0..model.blocks().len() {
            x = model.block_forward(i, &x, &pos, pass)?.detach();
        }
        let loss = model.head_loss_sum(&x, &batch.rows, &batch.targets)?;
        total += f64::from(loss.to_scalar::<f32>()?);
        count += batch.target_count;
    }
    Ok((total, count))
}

/// Forward and backward of one micro-batch; returns its summed loss and the gradient
/// of `scale · loss` for each of `params` (zeros where a parameter got none).
pub fn forward_backward(
    model: &Llama,
    batch: &Batch,
    params: &[&Var],
    scale: f64,
    pass: Pass,
    recompute: bool,
) -> Result<(f64, Vec<Tensor>)> {
    forward_backward_with(
        model,
        &batch.ids,
        params,
        scale,
        pass,
        recompute,
        &mut |h| model.head_loss_sum(h, &batch.rows, &batch.targets),
    )
}

/// DPO's forward and backward of one micro-batch of pairs: the reference's
/// log-probabilities first (adapters off, no graph), then the policy's with gradients.
/// Returns the summed loss over pairs, the gradients of `scale ·` that, and the figures.
pub fn dpo_forward_backward(
    model: &Llama,
    pb: &PairBatch,
    params: &[&Var],
    scale: f64,
    pass: Pass,
    recompute: bool,
    settings: DpoSettings,
) -> Result<(f64, Vec<Tensor>, DpoStats)> {
    let reference = logps_under(model, pb, Pass::BASE)?;
    let mut stats = DpoStats::default();
    let (loss, grads) = forward_backward_with(
        model,
        &pb.batch.ids,
        params,
        scale,
        pass,
        recompute,
        &mut |h| {
            let policy = sequence_logps(model, h, pb)?;
            let (losses, s) = dpo_loss(&policy, &reference, settings)?;
            stats = s;
            Ok(losses.sum_all()?)
        },
    )?;
    Ok((loss, grads, stats))
}

/// Forward and backward of one micro-batch of `ids` whose last hidden states `head`
/// turns into a summed loss (an f32 scalar); returns the loss and the gradient of
/// `scale · loss` for each of `params` (zeros where a parameter got none).
pub fn forward_backward_with(
    model: &Llama,
    ids: &Tensor,
    params: &[&Var],
    scale: f64,
    pass: Pass,
    recompute: bool,
    head: &mut dyn FnMut(&Tensor) -> Result<Tensor>,
) -> Result<(f64, Vec<Tensor>)> {
    let (_, t) = ids.dims2()?;
    let pos = model.positions(t)?;
    let x0 = model.embed(ids)?;
    let mut grads: Vec<Option<Tensor>> = vec![None; params.len()];
    let mut collect = |store: &candle_core::backprop::GradStore| -> Result<()> {
        for (slot, p) in grads.iter_mut().zip(params) {
            if let Some(g) = store.get(p.as_tensor()) {
                *slot = Some(match slot.take() {
                    Some(prev) => (prev + g)?,
                    None => g.clone(),
                });
            }
        }
        Ok(())
    };
    let loss_value;
    if recompute {
        // Forward keeping only each block's input; the graph of a block is dropped as
        // soon as its output is detached.
        let mut inputs = Vec::with_capacity(model.blocks().len());
        let mut x = x0;
        for i in 0..model.blocks().len() {
            let out = model.block_forward(i, &x, &pos, pass)?.detach();
            inputs.push(x);
            x = out;
        }
        let h = Var::from_tensor(&x)?;
        let loss = head(h.as_tensor())?;
        loss_value = f64::from(loss.to_scalar::<f32>()?);
        let store = (loss * scale)?.backward()?;
        collect(&store)?;
        let mut upstream = store
            .get(h.as_tensor())
            .ok_or_else(|| {
                Error::Tensor(candle_core::Error::Msg(
                    "no gradient reached the last block".into(),
                ))
            })?
            .detach();
        for i in (0..model.blocks().len()).rev() {
            let input = Var::from_tensor(&inputs[i])?;
            let out = model.block_forward(i, input.as_tensor(), &pos, pass)?;
            // d(Σ out·g)/dθ = gᵀ·∂out/∂θ: the vector-Jacobian product we need.
            let store = (out * &upstream)?.sum_all()?.backward()?;
            collect(&store)?;
            // With full fine-tuning the embedding learns too, so block 0's input
            // gradient is needed as well.
            if i > 0 || model.is_full() {
                upstream = store
                    .get(input.as_tensor())
                    .ok_or_else(|| {
                        Error::Tensor(candle_core::Error::Msg(format!(
                            "no gradient reached block {i}'s input"
                        )))
                    })?
                    .detach();
            }
        }
        if model.is_full() {
            // inputs[0] is the embedding lookup, still attached to the embedding.
            let store = (&inputs[0] * &upstream)?.sum_all()?.backward()?;
            collect(&store)?;
        }
    } else {
        let mut x = x0;
        for i in 0..model.blocks().len() {
            x = model.block_forward(i, &x, &pos, pass)?;
        }
        let loss = head(&x)?;
        loss_value = f64::from(loss.to_scalar::<f32>()?);
        let store = (loss * scale)?.backward()?;
        collect(&store)?;
    }
    let grads = grads
        .into_iter()
        .zip(params)
        .map(|(g, p)| match g {
            Some(g) => Ok(g),
            None => Ok(p.as_tensor().zeros_like()?),
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((loss_value, grads))
}

/// Signals the loop watches between steps.
#[derive(Clone, Debug, Default)]
pub struct Control {
    /// Set by SIGTERM: checkpoint after the current step, then stop.
    pub stop: Arc<AtomicBool>,
    /// Where progress is published.
    pub progress: SharedProgress,
}

/// Training and eval data of a run.
#[derive(Debug)]
pub enum Data {
    /// Token sequences with a loss mask (LoRA, QLoRA).
    Sft {
        /// Training examples.
        train: Vec<Example>,
        /// Eval examples (possibly none).
        eval: Vec<Example>,
    },
    /// Preference pairs (DPO).
    Dpo {
        /// Training pairs.
        train: Vec<PreferencePair>,
        /// Eval pairs (possibly none).
        eval: Vec<PreferencePair>,
    },
}

impl Data {
    /// Training items (examples or pairs).
    pub fn train_len(&self) -> usize {
        match self {
            Self::Sft { train, .. } => train.len(),
            Self::Dpo { train, .. } => train.len(),
        }
    }

    /// Eval items.
    pub fn eval_len(&self) -> usize {
        match self {
            Self::Sft { eval, .. } => eval.len(),
            Self::Dpo { eval, .. } => eval.len(),
        }
    }

    /// What a step's loss over these items is averaged over: target tokens, or pairs
    /// (counted from the data, so every rank knows the whole step's).
    fn weight(&self, indices: &[usize]) -> usize {
        match self {
            Self::Sft { train, .. } => indices.iter().map(|&i| train[i].target_count()).sum(),
            Self::Dpo { .. } => indices.len(),
        }
    }

    fn micro_batch(&self, indices: &[usize], pad: u32, device: &Device) -> Result<MicroBatch> {
        Ok(match self {
            Self::Sft { train, .. } => {
                let refs: Vec<&Example> = indices.iter().map(|&i| &train[i]).collect();
                MicroBatch::Sft(make_batch(&refs, pad, device)?)
            }
            Self::Dpo { train, .. } => {
                let refs: Vec<&PreferencePair> = indices.iter().map(|&i| &train[i]).collect();
                MicroBatch::Dpo(make_pair_batch(&refs, pad, device)?)
            }
        })
    }
}

/// One micro-batch of either kind.
enum MicroBatch {
    Sft(Batch),
    Dpo(PairBatch),
}

impl MicroBatch {
    /// Non-padding input tokens.
    fn tokens(&self) -> usize {
        match self {
            Self::Sft(b) => b.token_count,
            Self::Dpo(pb) => pb.batch.token_count,
        }
    }
}

/// A loaded model, tokenizer and datasets, ready to train.
#[derive(Debug)]
pub struct Prepared {
    /// The model with fresh adapters (or every weight trainable).
    pub model: Llama,
    /// The tokenizer.
    pub tokenizer: TextTokenizer,
    /// The data.
    pub data: Data,
}

/// The eval loss under `pass` (mean per target token, or DPO's mean per pair) and, for
/// DPO, its figures; `None` for an empty eval set. In a gang each rank scores a share of
/// the batches and the sums are added up.
fn eval_under(
    model: &Llama,
    engine: &mut Engine<'_>,
    data: &Data,
    opts: &TrainOptions,
    pad: u32,
    pass: Pass,
    ranks: &mut Ranks,
) -> Result<(Option<f64>, Option<DpoStats>)> {
    match (data, opts.method) {
        (Data::Sft { eval, .. }, _) if eval.is_empty() => Ok((None, None)),
        (Data::Sft { eval, .. }, _) => {
            let (sum, count) = engine.evaluate(model, ranks, eval, opts.batch_size, pad, pass)?;
            let mut figures = [sum, count as f64];
            ranks.sum_figures(&mut figures)?;
            Ok((Some(figures[0] / figures[1].max(1.0)), None))
        }
        (Data::Dpo { eval, .. }, _) if eval.is_empty() => Ok((None, None)),
        (Data::Dpo { eval, .. }, MethodOptions::Dpo(settings)) => {
            let stats = evaluate_dpo(model, eval, opts.batch_size, pad, pass, settings)?;
            Ok((Some(stats.mean_loss()), Some(stats)))
        }
        (Data::Dpo { .. }, _) => Err(Error::invalid("preference data needs method dpo")),
    }
}

/// Loads and validates everything before the first step.
pub fn prepare(opts: &TrainOptions, device: &Device) -> Result<Prepared> {
    if opts.batch_size == 0 || opts.grad_accum == 0 {
        return Err(Error::invalid(
            "batchSize and gradientAccumulationSteps must be at least 1",
        ));
    }
    if !(opts.learning_rate > 0.0 && opts.learning_rate <= 1.0) {
        return Err(Error::invalid(format!(
            "learning rate {} must be above 0 and at most 1",
            opts.learning_rate
        )));
    }
    let full = matches!(opts.method, MethodOptions::Full { .. });
    if !full && !(0.0..1.0).contains(&opts.lora.dropout) {
        return Err(Error::invalid(format!(
            "LoRA dropout {} must be in [0, 1)",
            opts.lora.dropout
        )));
    }
    if !full && opts.lora.targets.is_empty() {
        return Err(Error::invalid("LoRA needs at least one target module"));
    }
    let mut model = if opts.is_fully_sharded() {
        // Each rank reads its shards itself (crate::zero3); the whole model is never
        // loaded.
        Llama::shell(
            ModelConfig::load(&opts.model_dir)?,
            compute_dtype(device),
            device,
        )?
    } else {
        Llama::load_as(&opts.model_dir, device, opts.method.base_format())?
    };
    let tokenizer = TextTokenizer::load(&opts.model_dir, &model.config)?;
    if tokenizer.vocab_size() > model.config.vocab_size {
        return Err(Error::invalid(format!(
            "the tokenizer has {} tokens but the model's vocabulary is {}",
            tokenizer.vocab_size(),
            model.config.vocab_size
        )));
    }
    let is_dpo = matches!(opts.method, MethodOptions::Dpo(_));
    if is_dpo != (opts.format == DatasetFormat::Preference) {
        return Err(Error::invalid(
            "method dpo needs datasetFormat preference, and preference data needs method dpo",
        ));
    }
    let data = if is_dpo {
        let all = load_preferences(&opts.train_file, &tokenizer, opts.max_seq_length)?;
        let (train, eval) = match &opts.eval_file {
            Some(path) => (
                all,
                load_preferences(path, &tokenizer, opts.max_seq_length)?,
            ),
            None => split_eval(all, opts.eval_split_percent, opts.seed)?,
        };
        Data::Dpo { train, eval }
    } else {
        let all = load_dataset(
            &opts.train_file,
            opts.format,
            &tokenizer,
            opts.max_seq_length,
        )?;
        let (train, eval) = match &opts.eval_file {
            Some(path) => (
                all,
                load_dataset(path, opts.format, &tokenizer, opts.max_seq_length)?,
            ),
            None => split_eval(all, opts.eval_split_percent, opts.seed)?,
        };
        Data::Sft { train, eval }
    };
    if !full {
        model.add_lora(
            opts.lora.clone(),
            &mut Rng::derive(opts.seed, 0x696e_6974, 0),
        )?;
    }
    if full && !opts.is_fully_sharded() {
        model.make_trainable()?;
    }
    Ok(Prepared {
        model,
        tokenizer,
        data,
    })
}

/// What a checkpoint must match to be resumed. `batch` is the global micro-batch (per
/// rank × ranks): the data stream depends on it, not on how it is split.
fn fingerprint(opts: &TrainOptions, train: usize, total_steps: u64, batch: usize) -> String {
    let targets: Vec<&str> = opts.lora.targets.iter().map(|t| t.as_str()).collect();
    // LoRA keeps the fingerprint it had before other methods existed, so checkpoints of
    // running jobs stay resumable.
    let method = match opts.method {
        MethodOptions::Lora => String::new(),
        // The shard size only shapes the output files, not the training.
        MethodOptions::Full { .. } => "method=Full ".to_owned(),
        other => format!("method={other:?} "),
    };
    format!(
        "{method}rank={} targets={} seed={} batch={batch} accum={} examples={train} steps={total_steps}",
        opts.lora.rank,
        targets.join(","),
        opts.seed,
        opts.grad_accum
    )
}

const MIB: f64 = 1024.0 * 1024.0;

/// Runs (or resumes) training and writes the adapter and `metrics.json`.
pub fn train(opts: &TrainOptions, device: &Device, control: &Control) -> Result<RunSummary> {
    let started = Instant::now();
    if let Some(gang) = opts.gang.as_ref().filter(|g| g.world_size > 1)
        && !matches!(opts.method, MethodOptions::Full { .. })
    {
        return Err(Error::invalid(format!(
            "only method full trains data-parallel across ranks; {:?} runs on one, not {}",
            opts.method, gang.world_size
        )));
    }
    // Planned before anything is loaded: a run that cannot fit fails now, on every
    // rank alike, and one that fits only by recomputing blocks does so.
    let runtime_bytes = crate::memory::resident_bytes();
    let (planned, plan) = crate::memory::fit(
        crate::memory::plan_input(
            opts,
            &ModelConfig::load(&opts.model_dir)?,
            device.is_cuda(),
            runtime_bytes,
        ),
        opts.gpu_memory_bytes.filter(|_| device.is_cuda()),
    )?;
    tracing::info!("memory plan: {}", plan.summary());
    let recomputing;
    let opts = if planned.recompute && !opts.recompute {
        tracing::info!(
            "recomputing each block in backward: keeping their activations would not fit the GPU"
        );
        recomputing = TrainOptions {
            recompute: true,
            ..opts.clone()
        };
        &recomputing
    } else {
        opts
    };
    update(&control.progress, |p| {
        p.phase = "loading".into();
        p.memory_plan = Some(plan);
    });
    let Prepared {
        model,
        tokenizer,
        data,
    } = prepare(opts, device)?;
    // After loading, so that a rank with bad input fails on its own first, and the
    // rendezvous timeout absorbs the ranks' differing load times.
    let mut ranks = Ranks::join(opts.gang.as_ref())?;
    if device.is_cuda() && ranks.world_size() > 1 {
        // This trainer has no NCCL: a GPU gang works, at the speed of TCP and host memory.
        tracing::warn!(
            world_size = ranks.world_size(),
            "the gang's collectives run on Gloo over TCP, through host memory: this trainer \
             is built without NCCL, so every gather and reduce-scatter copies GPU tensors to \
             the host and back"
        );
    }
    let pad = tokenizer.pad_id;
    let n_train = data.train_len();
    let global_batch = opts.batch_size * ranks.world_size();
    let batches_per_epoch = n_train.div_ceil(global_batch) as u64;
    let accum = opts.grad_accum as u64;
    let (total_steps, total_micro) = match opts.max_steps {
        Some(steps) => (steps, steps * accum),
        None => {
            let micro = batches_per_epoch * opts.epochs.max(1);
            (micro.div_ceil(accum), micro)
        }
    };
    let print = fingerprint(opts, n_train, total_steps, global_batch);
    let params_named = model.trainable_params();
    let params: Vec<&Var> = params_named.iter().map(|(_, v)| *v).collect();
    let adamw = AdamWConfig {
        weight_decay: opts.weight_decay,
        ..AdamWConfig::default()
    };
    let mut engine = if opts.is_fully_sharded() {
        Engine::Sharded(Box::new(Zero3::load(
            &opts.model_dir,
            model.config.clone(),
            &mut ranks,
            opts.gang
                .as_ref()
                .is_some_and(|g| g.sharding == Sharding::ShardGradOp),
            compute_dtype(device),
            device,
            adamw,
        )?))
    } else {
        Engine::local(&params, adamw, opts.gang.as_ref(), &ranks)?
    };
    if ranks.world_size() > 1 {
        tracing::info!(
            rank = ranks.rank(),
            sharding = opts.gang.as_ref().map_or("none", |g| g.sharding.as_str()),
            state_mib = engine.state_bytes() as f64 / MIB,
            optimizer_state_mib = engine.optimizer_state_bytes() as f64 / MIB,
            "training state on this rank"
        );
    }
    std::fs::create_dir_all(&opts.checkpoint_dir)
        .map_err(Error::io("create", &opts.checkpoint_dir))?;
    let resumed = engine.resume_latest(&model, &opts.checkpoint_dir, &print, device)?;
    // Every rank reads the checkpoints from the shared checkpoint directory; they must
    // agree on where they are, and replicas start from rank 0's weights.
    ranks.check_same(
        "the step to resume from (the checkpoint directory must be shared by all ranks)",
        resumed.as_ref().map_or(0, |s| s.step) as f64,
    )?;
    engine.broadcast_weights(&mut ranks)?;
    let mut state = match resumed {
        Some(state) => {
            tracing::info!(step = state.step, "resumed from checkpoint");
            state
        }
        None => {
            update(&control.progress, |p| p.phase = "evaluating".into());
            let (base_eval_loss, _) = eval_under(
                &model,
                &mut engine,
                &data,
                opts,
                pad,
                Pass::BASE,
                &mut ranks,
            )?;
            tracing::info!(base_eval_loss, "evaluated the base model");
            TrainerState {
                step: 0,
                micro_batch: 0,
                rng: Rng::new(opts.seed),
                loss_history: Vec::new(),
                base_eval_loss,
                tokens_seen: 0,
                fingerprint: print.clone(),
            }
        }
    };
    let resumed_from_step = state.step;
    update(&control.progress, |p| {
        p.phase = "training".into();
        p.step = state.step;
        p.total_steps = total_steps;
        p.base_eval_loss = state.base_eval_loss;
        p.loss = state.loss_history.last().copied();
    });

    let train_started = Instant::now();
    // The collectives of the steps alone, not of evaluation or the final gather.
    let traffic_before = engine.traffic();
    let mut attempt_tokens = 0u64;
    let mut order_cache: Option<(u64, Vec<usize>)> = None;
    let mut last_metrics = BTreeMap::new();
    while state.step < total_steps {
        // This step's micro-batches: this rank's share of each (none at the end of an
        // epoch), and the weight of the whole step (every rank's share).
        let mut batches = Vec::with_capacity(opts.grad_accum);
        let mut weight = 0;
        for _ in 0..accum {
            let m = state.micro_batch + batches.len() as u64;
            if m >= total_micro {
                break;
            }
            let epoch = m / batches_per_epoch;
            let index = (m % batches_per_epoch) as usize;
            if order_cache.as_ref().map(|(e, _)| *e) != Some(epoch) {
                order_cache = Some((epoch, epoch_order(n_train, opts.seed, epoch)));
            }
            let order = &order_cache.as_ref().expect("order was just cached").1;
            let end = ((index + 1) * global_batch).min(n_train);
            let global = &order[index * global_batch..end];
            weight += data.weight(global);
            let mine = ranks.shard(global, opts.batch_size);
            let batch = if mine.is_empty() {
                None
            } else {
                Some(data.micro_batch(mine, pad, device)?)
            };
            batches.push((m, batch));
        }
        let scale = 1.0 / weight.max(1) as f64;
        let mut step_tokens = 0u64;
        let mut loss_sum = 0.0;
        let mut dpo_stats = DpoStats::default();
        // Dropout masks of this step derive from the run's generator, which the
        // checkpoint stores, and from the micro-batch's position in the stream.
        let dropout_seed = state.rng.next_u64();
        for (m, batch) in &batches {
            let pass = Pass {
                adapters: true,
                dropout: Some(DropoutKey {
                    seed: dropout_seed,
                    micro_batch: *m,
                }),
            };
            let micro = Micro {
                batch: batch.as_ref(),
                scale,
                pass,
            };
            loss_sum +=
                engine.forward_backward(&model, &mut ranks, &micro, opts, &mut dpo_stats)?;
            step_tokens += batch.as_ref().map_or(0, |b| b.tokens() as u64);
        }
        // A stop (SIGTERM) on any rank stops all of them after this same step.
        let stop_requested = control.stop.load(Ordering::SeqCst)
            || opts.interrupt_after_step == Some(state.step + 1);
        let mut figures = [
            loss_sum,
            step_tokens as f64,
            f64::from(u8::from(stop_requested)),
        ];
        let lr = learning_rate(
            opts.learning_rate,
            opts.scheduler,
            opts.warmup_steps,
            state.step,
            total_steps,
        );
        let grad_norm = engine.step(&mut ranks, &mut figures, lr, opts.max_grad_norm)?;
        let [loss_sum, step_tokens, stops] = figures;
        attempt_tokens += step_tokens as u64;
        state.tokens_seen += step_tokens as u64;
        state.step += 1;
        state.micro_batch += batches.len() as u64;
        let loss = loss_sum * scale;
        state.loss_history.push(loss);
        let step_metrics = if dpo_stats.pairs > 0 {
            dpo_stats.metrics()
        } else {
            BTreeMap::new()
        };

        let elapsed = train_started.elapsed().as_secs_f64();
        let tps = attempt_tokens as f64 / elapsed.max(1e-9);
        let steps_done = state.step - resumed_from_step;
        let eta = elapsed / steps_done as f64 * (total_steps - state.step) as f64;
        let epoch = state.micro_batch as f64 / batches_per_epoch as f64;
        tracing::info!(
            step = state.step,
            total_steps,
            loss,
            lr,
            grad_norm,
            epoch,
            tokens_per_second = tps,
            metrics = ?step_metrics,
            "step"
        );
        update(&control.progress, |p| {
            p.step = state.step;
            p.loss = Some(loss);
            p.metrics = step_metrics.clone();
            p.epoch = epoch;
            p.tokens_per_second = tps;
            p.eta_seconds = Some(eta);
        });

        last_metrics = step_metrics;

        let stop = stops > 0.0;
        if state.step % opts.checkpoint_every.max(1) == 0 || stop {
            let written = engine.save_checkpoint(&model, &mut ranks, opts, &state)?;
            if let Some(path) = written {
                tracing::info!(step = state.step, path = %path.display(), "checkpoint written");
            }
        }
        if stop && state.step < total_steps {
            return Err(Error::Interrupted { step: state.step });
        }
    }

    let traffic = engine.traffic().since(traffic_before);
    update(&control.progress, |p| p.phase = "evaluating".into());
    let (eval_loss, eval_dpo) = eval_under(
        &model,
        &mut engine,
        &data,
        opts,
        pad,
        Pass::EVAL,
        &mut ranks,
    )?;
    engine.check_replicas(&mut ranks)?;
    let mut metrics = last_metrics;
    if let Some(stats) = eval_dpo {
        for (key, value) in stats.metrics() {
            metrics.insert(format!("eval_{key}"), value);
        }
    }
    tracing::info!(
        eval_loss,
        base_eval_loss = state.base_eval_loss,
        "evaluated the tuned model"
    );
    update(&control.progress, |p| {
        p.phase = "saving".into();
        p.eval_loss = eval_loss;
        p.metrics = metrics.clone();
    });
    let adapter = engine
        .save_outputs(&model, &mut ranks, opts)?
        .unwrap_or(Artifact {
            sha256: String::new(),
            size_bytes: 0,
        });
    let elapsed = train_started.elapsed().as_secs_f64();
    let summary = RunSummary {
        steps: state.step,
        train_examples: n_train,
        eval_examples: data.eval_len(),
        loss_history: state.loss_history.clone(),
        base_eval_loss: state.base_eval_loss,
        eval_loss,
        tokens_seen: state.tokens_seen,
        tokens_per_second: attempt_tokens as f64 / elapsed.max(1e-9),
        duration_seconds: started.elapsed().as_secs_f64(),
        resumed_from_step,
        adapter,
        metrics,
        collective_seconds: traffic.seconds,
        collective_bytes: traffic.bytes_sent,
        optimizer_state_bytes: engine.optimizer_state_bytes(),
        state_bytes: engine.state_bytes(),
        memory_plan: plan,
        primary: ranks.is_primary(),
    };
    if summary.primary {
        let json = serde_json::to_vec_pretty(&summary).expect("summary serialises");
        write_atomic(&opts.output_dir.join("metrics.json"), &json)?;
    }
    update(&control.progress, |p| p.phase = "done".into());
    Ok(summary)
}

/// One micro-batch of a step as an engine sees it: this rank's share (none when it
/// got no examples), the loss scale of the whole step, and the pass.
struct Micro<'a> {
    batch: Option<&'a MicroBatch>,
    scale: f64,
    pass: Pass,
}

/// How the training state is held and updated: whole weights in this process
/// (alone, replicated, or with the optimizer state sharded: ZeRO stage 1), or fully
/// sharded across the gang (ZeRO stage 3).
enum Engine<'m> {
    /// The model's own trainable variables.
    Local(Local<'m>),
    /// This rank's shards ([`Zero3`]).
    Sharded(Box<Zero3>),
}

/// Whole weights in this process.
struct Local<'m> {
    params: Vec<&'m Var>,
    partition: Partition,
    optimizer: AdamW,
    /// This step's summed gradients so far.
    grads: Option<Vec<Tensor>>,
    traffic: Traffic,
}

impl<'m> Engine<'m> {
    fn local(
        params: &[&'m Var],
        adamw: AdamWConfig,
        gang: Option<&Gang>,
        ranks: &Ranks,
    ) -> Result<Self> {
        let partition = match gang {
            Some(gang) if gang.sharding == Sharding::OptimizerState && ranks.world_size() > 1 => {
                let sizes: Vec<usize> = params.iter().map(|p| p.elem_count()).collect();
                Partition::balanced(&sizes, ranks.world_size())
            }
            _ => Partition::Replicated(params.len()),
        };
        let optimizer = AdamW::sharded(adamw, params, &partition.owned_by(ranks.rank()))?;
        Ok(Self::Local(Local {
            params: params.to_vec(),
            partition,
            optimizer,
            grads: None,
            traffic: Traffic::default(),
        }))
    }

    /// Forward and backward of one micro-batch; returns its summed loss and adds its
    /// gradient to the step's.
    fn forward_backward(
        &mut self,
        model: &Llama,
        ranks: &mut Ranks,
        micro: &Micro<'_>,
        opts: &TrainOptions,
        dpo_stats: &mut DpoStats,
    ) -> Result<f64> {
        let Micro { batch, scale, pass } = *micro;
        let local = match self {
            Self::Sharded(zero3) => {
                return match batch {
                    Some(MicroBatch::Sft(b)) => zero3.forward_backward(ranks, Some(b), scale, pass),
                    None => zero3.forward_backward(ranks, None, scale, pass),
                    Some(MicroBatch::Dpo(_)) => {
                        Err(Error::invalid("preference data needs method dpo"))
                    }
                };
            }
            Self::Local(local) => local,
        };
        let Some(batch) = batch else {
            return Ok(0.0);
        };
        let params = &local.params;
        let (loss, g) = match (batch, opts.method) {
            (MicroBatch::Sft(b), _) => {
                forward_backward(model, b, params, scale, pass, opts.recompute)?
            }
            (MicroBatch::Dpo(pb), MethodOptions::Dpo(settings)) => {
                let (loss, g, stats) =
                    dpo_forward_backward(model, pb, params, scale, pass, opts.recompute, settings)?;
                dpo_stats.add(&stats);
                (loss, g)
            }
            (MicroBatch::Dpo(_), _) => {
                return Err(Error::invalid("preference data needs method dpo"));
            }
        };
        local.grads = Some(match local.grads.take() {
            None => g,
            Some(acc) => acc
                .into_iter()
                .zip(g)
                .map(|(a, b)| Ok((a + b)?))
                .collect::<Result<Vec<_>>>()?,
        });
        Ok(loss)
    }

    /// Sums the step's gradients and `figures` over the ranks, clips the gradients'
    /// global norm to `max_norm` and takes the optimizer step with `lr`; returns the
    /// norm before clipping.
    fn step(
        &mut self,
        ranks: &mut Ranks,
        figures: &mut [f64],
        lr: f64,
        max_norm: f64,
    ) -> Result<f64> {
        let local = match self {
            Self::Sharded(zero3) => {
                ranks.sum_figures(figures)?;
                return zero3.step(ranks, lr, max_norm);
            }
            Self::Local(local) => local,
        };
        // A rank whose shares were all empty (the end of an epoch) adds zeros.
        let mut grads = match local.grads.take() {
            Some(grads) => grads,
            None => local
                .params
                .iter()
                .map(|p| p.as_tensor().zeros_like())
                .collect::<candle_core::Result<Vec<_>>>()?,
        };
        let exchange = Instant::now();
        ranks.sum(&mut grads, figures)?;
        let mut seconds = exchange.elapsed().as_secs_f64();
        let grad_norm = clip_grad_norm(&mut grads, max_norm)?;
        local.optimizer.update(&local.params, &grads, lr)?;
        let exchange = Instant::now();
        ranks.share_updates(&local.params, &local.partition)?;
        seconds += exchange.elapsed().as_secs_f64();
        if ranks.world_size() > 1 {
            let n = ranks.world_size() as u64;
            let bytes: u64 = local.params.iter().map(|p| 4 * p.elem_count() as u64).sum();
            // A ring all-reduce sends 2(n−1)/n of the gradients; the owners'
            // broadcasts of their updated weights, (n−1)/n of them in all.
            let shared = if local.partition.is_replicated() {
                0
            } else {
                1
            };
            local.traffic.seconds += seconds;
            local.traffic.bytes_sent += (2 + shared) * (n - 1) * bytes / n;
        }
        Ok(grad_norm)
    }

    /// Restores the newest checkpoint in `dir` written with `fingerprint`, if any.
    fn resume_latest(
        &mut self,
        model: &Llama,
        dir: &Path,
        fingerprint: &str,
        device: &Device,
    ) -> Result<Option<TrainerState>> {
        match self {
            Self::Local(local) => {
                resume_latest(dir, model, &mut local.optimizer, fingerprint, device)
            }
            Self::Sharded(zero3) => zero3.resume_latest(dir, fingerprint),
        }
    }

    /// Gives every replica rank 0's weights (nothing to do for shards).
    fn broadcast_weights(&mut self, ranks: &mut Ranks) -> Result<()> {
        match self {
            Self::Local(local) => ranks.broadcast_params(&local.params),
            Self::Sharded(_) => Ok(()),
        }
    }

    /// Writes a checkpoint of `state` (every rank takes part); returns its path on the
    /// rank that completed it.
    fn save_checkpoint(
        &mut self,
        model: &Llama,
        ranks: &mut Ranks,
        opts: &TrainOptions,
        state: &TrainerState,
    ) -> Result<Option<PathBuf>> {
        let keep = opts.checkpoint_keep.max(1);
        match self {
            Self::Local(local) => {
                // Sharded moments come from their owners; rank 0 writes.
                let moments =
                    ranks.gather_moments(&local.optimizer, &local.params, &local.partition)?;
                moments
                    .map(|moments| {
                        save_checkpoint(&opts.checkpoint_dir, keep, model, &moments, state)
                    })
                    .transpose()
            }
            Self::Sharded(zero3) => zero3.save_checkpoint(ranks, &opts.checkpoint_dir, keep, state),
        }
    }

    /// This rank's share of the eval set's summed loss and target count (every
    /// `world_size`-th batch from batch `rank` on).
    fn evaluate(
        &mut self,
        model: &Llama,
        ranks: &mut Ranks,
        examples: &[Example],
        batch_size: usize,
        pad: u32,
        pass: Pass,
    ) -> Result<(f64, usize)> {
        let (rank, world) = (ranks.rank(), ranks.world_size());
        let zero3 = match self {
            Self::Local(_) => {
                return evaluate_shard(model, examples, batch_size, pad, pass, rank, world);
            }
            Self::Sharded(zero3) => zero3,
        };
        // Every rank gathers the weights for every round, with or without a batch.
        let chunks: Vec<&[Example]> = examples.chunks(batch_size.max(1)).collect();
        let (mut total, mut count) = (0.0, 0);
        for round in 0..chunks.len().div_ceil(world) {
            let batch = match chunks.get(round * world + rank) {
                Some(chunk) => {
                    let refs: Vec<&Example> = chunk.iter().collect();
                    Some(make_batch(&refs, pad, model.device())?)
                }
                None => None,
            };
            total += zero3.loss_sum(ranks, batch.as_ref(), pass)?;
            count += batch.map_or(0, |b| b.target_count);
        }
        Ok((total, count))
    }

    /// Fails unless every replica holds the same weights (identical summed gradients
    /// and identical steps keep them so): checked before rank 0 writes them as the
    /// result of all.
    fn check_replicas(&mut self, ranks: &mut Ranks) -> Result<()> {
        match self {
            Self::Local(local) if ranks.world_size() > 1 => {
                ranks.check_same("the trained weights", weights_fingerprint(&local.params)?)
            }
            _ => Ok(()),
        }
    }

    /// Writes the trained model or adapter (rank 0; every rank takes part when the
    /// weights are sharded); returns the artifact where it was written.
    fn save_outputs(
        &mut self,
        model: &Llama,
        ranks: &mut Ranks,
        opts: &TrainOptions,
    ) -> Result<Option<Artifact>> {
        match (self, opts.method) {
            (Self::Sharded(zero3), MethodOptions::Full { max_shard_bytes }) => {
                zero3.save_model(ranks, &opts.model_dir, &opts.output_dir, max_shard_bytes)
            }
            _ if !ranks.is_primary() => Ok(None),
            (_, MethodOptions::Full { max_shard_bytes }) => Ok(Some(save_full_model(
                model,
                &opts.model_dir,
                &opts.output_dir,
                max_shard_bytes,
            )?)),
            _ => Ok(Some(save_adapter(
                model,
                &opts.output_dir,
                opts.base_model_name.as_deref(),
            )?)),
        }
    }

    /// Bytes of training state this rank holds between steps.
    fn state_bytes(&self) -> u64 {
        match self {
            Self::Local(local) => {
                let weights: u64 = local.params.iter().map(|p| 4 * p.elem_count() as u64).sum();
                // The f32 weights and their gradients, and the moments held here.
                2 * weights + local.optimizer.state_bytes()
            }
            Self::Sharded(zero3) => zero3.state_bytes(),
        }
    }

    /// Bytes of optimizer state this rank holds.
    fn optimizer_state_bytes(&self) -> u64 {
        match self {
            Self::Local(local) => local.optimizer.state_bytes(),
            Self::Sharded(zero3) => zero3.optimizer_state_bytes(),
        }
    }

    /// What this rank's collectives moved in this attempt.
    fn traffic(&self) -> Traffic {
        match self {
            Self::Local(local) => local.traffic,
            Self::Sharded(zero3) => zero3.traffic(),
        }
    }
}
