//! The training spec: the part of a FineTuneJob that the trainer reads too.
//!
//! The operator embeds these types in `FineTuneJobSpec`, resolves the volume paths, and
//! renders a [`TrainerConfig`] into the ConfigMap mounted in every trainer pod; the
//! trainer deserialises the same type. One definition means a field added here reaches
//! both sides, and `kubectl explain` documents what the trainer will actually do.

use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::decimal::Decimal;

/// How the model is fine-tuned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Low-rank adapters on a frozen base model, one GPU.
    Lora,
    /// LoRA on a base model quantized to 4-bit NF4, one GPU.
    Qlora,
    /// Every weight trained, data-parallel across `resources.nodes` nodes.
    Full,
    /// Direct Preference Optimization with a LoRA adapter; the reference model is the
    /// base model with the adapter disabled.
    Dpo,
}

impl Method {
    /// The value as written in YAML.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Lora => "lora",
            Self::Qlora => "qlora",
            Self::Full => "full",
            Self::Dpo => "dpo",
        }
    }

    /// Whether the method trains a LoRA adapter (and so writes one as its artifact).
    pub fn trains_adapter(self) -> bool {
        !matches!(self, Self::Full)
    }
}

/// The shape of each JSONL line of a dataset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DatasetFormat {
    /// `{"messages": [{"role": "system|user|assistant", "content": "..."}]}`, rendered with
    /// the model's chat template; loss only on assistant turns.
    Chat,
    /// `{"prompt": "...", "completion": "..."}`; loss only on the completion.
    Instruction,
    /// `{"text": "..."}`; loss on every token.
    Text,
    /// `{"prompt": ..., "chosen": ..., "rejected": ...}` for DPO, each a string or a list
    /// of chat messages.
    Preference,
}

/// How the learning rate moves after warmup.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Scheduler {
    /// Half a cosine wave from the peak learning rate down to zero.
    #[default]
    Cosine,
    /// A straight line from the peak learning rate down to zero.
    Linear,
    /// The peak learning rate throughout.
    Constant,
}

/// Optimisation settings. Every field has a default suited to LoRA on a 7–8B model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = crate::rules::at(Rule::new("!has(self.maxSteps) || self.warmupSteps <= self.maxSteps").message("hyperparameters.warmupSteps must not exceed hyperparameters.maxSteps: the learning rate would never reach its peak"), ".warmupSteps", Reason::FieldValueInvalid))]
pub struct Hyperparameters {
    /// Passes over the training set. Default 1. Ignored when `maxSteps` is set.
    #[serde(default = "default_epochs")]
    #[schemars(range(min = 1, max = 1000))]
    pub epochs: u32,

    /// Stop after this many optimizer steps instead of after `epochs` passes. Optional.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10_000_000))]
    pub max_steps: Option<u32>,

    /// Peak learning rate of AdamW, as a decimal string. Default "2e-4"; must be above 0
    /// and at most 1.
    #[serde(default = "default_learning_rate")]
    #[x_kube(validation = crate::rules::decimal_range("hyperparameters.learningRate", "double(self) > 0.0 && double(self) <= 1.0", "above 0 and at most 1"))]
    pub learning_rate: Decimal,

    /// Sequences per micro-batch on each GPU. Default 4.
    #[serde(default = "default_batch_size")]
    #[schemars(range(min = 1, max = 4096))]
    pub batch_size: u32,

    /// Micro-batches whose gradients are summed before each optimizer step. The
    /// effective batch is batchSize × gradientAccumulationSteps × GPUs. Default 1.
    #[serde(default = "default_one")]
    #[schemars(range(min = 1, max = 1024))]
    pub gradient_accumulation_steps: u32,

    /// Longest sequence in tokens; longer examples are truncated. Default 2048.
    #[serde(default = "default_max_seq_length")]
    #[schemars(range(min = 16, max = 131_072))]
    pub max_seq_length: u32,

    /// Optimizer steps over which the learning rate rises linearly from 0 to its peak.
    /// Default 0; at most `maxSteps` when that is set.
    #[serde(default)]
    #[schemars(range(max = 1_000_000))]
    pub warmup_steps: u32,

    /// Learning-rate decay after warmup: cosine, linear or constant. Default cosine.
    #[serde(default)]
    pub scheduler: Scheduler,

    /// AdamW's decoupled weight decay, as a decimal string. Default "0"; at most 1.
    #[serde(default = "default_weight_decay")]
    #[x_kube(validation = crate::rules::decimal_range("hyperparameters.weightDecay", "double(self) <= 1.0", "at most 1"))]
    pub weight_decay: Decimal,

    /// Gradients are clipped to this global L2 norm, as a decimal string. Default "1.0";
    /// "0" turns clipping off; at most 1000000.
    #[serde(default = "default_max_grad_norm")]
    #[x_kube(validation = crate::rules::decimal_range("hyperparameters.maxGradNorm", "double(self) <= 1000000.0", "at most 1000000"))]
    pub max_grad_norm: Decimal,

    /// Seed for initialisation, dropout and data order: the same seed and data give the
    /// same result, also across a resume from a checkpoint. Default 42.
    #[serde(default = "default_seed")]
    pub seed: u64,
}

fn default_epochs() -> u32 {
    1
}
fn default_learning_rate() -> Decimal {
    Decimal::from_static("2e-4")
}
fn default_batch_size() -> u32 {
    4
}
fn default_one() -> u32 {
    1
}
fn default_max_seq_length() -> u32 {
    2048
}
fn default_weight_decay() -> Decimal {
    Decimal::from_static("0")
}
fn default_max_grad_norm() -> Decimal {
    Decimal::from_static("1.0")
}
fn default_seed() -> u64 {
    42
}

impl Default for Hyperparameters {
    fn default() -> Self {
        Self {
            epochs: default_epochs(),
            max_steps: None,
            learning_rate: default_learning_rate(),
            batch_size: default_batch_size(),
            gradient_accumulation_steps: default_one(),
            max_seq_length: default_max_seq_length(),
            warmup_steps: 0,
            scheduler: Scheduler::default(),
            weight_decay: default_weight_decay(),
            max_grad_norm: default_max_grad_norm(),
            seed: default_seed(),
        }
    }
}

/// A linear layer of a Llama-family decoder that LoRA can adapt, named as in Hugging Face
/// checkpoints and PEFT's `target_modules`.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum TargetModule {
    /// Attention query projection.
    QProj,
    /// Attention key projection.
    KProj,
    /// Attention value projection.
    VProj,
    /// Attention output projection.
    OProj,
    /// MLP gate projection.
    GateProj,
    /// MLP up projection.
    UpProj,
    /// MLP down projection.
    DownProj,
}

impl TargetModule {
    /// Every module, in checkpoint order.
    pub const ALL: [Self; 7] = [
        Self::QProj,
        Self::KProj,
        Self::VProj,
        Self::OProj,
        Self::GateProj,
        Self::UpProj,
        Self::DownProj,
    ];

    /// The module's name in checkpoints and in PEFT's `target_modules`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::QProj => "q_proj",
            Self::KProj => "k_proj",
            Self::VProj => "v_proj",
            Self::OProj => "o_proj",
            Self::GateProj => "gate_proj",
            Self::UpProj => "up_proj",
            Self::DownProj => "down_proj",
        }
    }
}

/// LoRA adapter settings (methods lora, qlora and dpo).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct LoraSpec {
    /// Rank r of the low-rank update B·A. Default 16; 1 to 512. Serving with vLLM needs
    /// `--max-lora-rank` at least this large.
    #[serde(default = "default_rank")]
    #[schemars(range(min = 1, max = 512))]
    pub rank: u32,

    /// Scaling numerator: the update is multiplied by alpha / rank (alpha / √rank with
    /// rsLoRA). Default 32; 1 to 4096.
    #[serde(default = "default_alpha")]
    #[schemars(range(min = 1, max = 4096))]
    pub alpha: u32,

    /// Dropout probability on the adapter's input, as a decimal string. Default "0.05";
    /// at least 0 and below 1.
    #[serde(default = "default_dropout")]
    #[x_kube(validation = crate::rules::decimal_range("lora.dropout", "double(self) < 1.0", "below 1"))]
    pub dropout: Decimal,

    /// Linear layers that get an adapter. Default: the four attention projections.
    #[serde(default = "default_target_modules")]
    #[schemars(length(min = 1, max = 7))]
    #[x_kube(validation = Rule::new("self.all(m, self.exists_one(n, n == m))").message("lora.targetModules must not repeat a module"))]
    pub target_modules: Vec<TargetModule>,

    /// Rank-stabilised LoRA: scale by alpha / √rank instead of alpha / rank, which keeps
    /// high ranks learning. Default false.
    #[serde(default)]
    pub rs_lora: bool,
}

fn default_rank() -> u32 {
    16
}
fn default_alpha() -> u32 {
    32
}
fn default_dropout() -> Decimal {
    Decimal::from_static("0.05")
}
fn default_target_modules() -> Vec<TargetModule> {
    vec![
        TargetModule::QProj,
        TargetModule::KProj,
        TargetModule::VProj,
        TargetModule::OProj,
    ]
}

impl Default for LoraSpec {
    fn default() -> Self {
        Self {
            rank: default_rank(),
            alpha: default_alpha(),
            dropout: default_dropout(),
            target_modules: default_target_modules(),
            rs_lora: false,
        }
    }
}

impl LoraSpec {
    /// The factor the adapter's output is multiplied by, as PEFT computes it.
    pub fn scaling(&self) -> f64 {
        let alpha = f64::from(self.alpha);
        let rank = f64::from(self.rank);
        if self.rs_lora {
            alpha / rank.sqrt()
        } else {
            alpha / rank
        }
    }
}

/// QLoRA settings (method qlora only).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct QloraSpec {
    /// Quantize the per-block scales too (8-bit blocks of 256), saving about 0.37 bits
    /// per weight. Default true.
    #[serde(default = "default_true")]
    pub double_quantization: bool,
}

fn default_true() -> bool {
    true
}

impl Default for QloraSpec {
    fn default() -> Self {
        Self {
            double_quantization: true,
        }
    }
}

/// DPO settings (method dpo only; required there). The reference policy is the base
/// model with the adapter disabled, so no second model is held in memory.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct DpoSpec {
    /// Strength β of the KL penalty towards the reference, as a decimal string. Default
    /// "0.1"; above 0 and at most 10.
    #[serde(default = "default_beta")]
    #[x_kube(validation = crate::rules::decimal_range("dpo.beta", "double(self) > 0.0 && double(self) <= 10.0", "above 0 and at most 10"))]
    pub beta: Decimal,

    /// Label smoothing ε (conservative DPO), as a decimal string. Default "0"; below 0.5.
    #[serde(default = "default_label_smoothing")]
    #[x_kube(validation = crate::rules::decimal_range("dpo.labelSmoothing", "double(self) < 0.5", "below 0.5"))]
    pub label_smoothing: Decimal,
}

fn default_beta() -> Decimal {
    Decimal::from_static("0.1")
}
fn default_label_smoothing() -> Decimal {
    Decimal::from_static("0")
}

impl Default for DpoSpec {
    fn default() -> Self {
        Self {
            beta: default_beta(),
            label_smoothing: default_label_smoothing(),
        }
    }
}

/// How often the trainer checkpoints and how many checkpoints it keeps.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointSpec {
    /// Optimizer steps between checkpoints. Default 200. A restarted attempt resumes from
    /// the newest complete checkpoint, so this bounds the work a failure loses.
    #[serde(default = "default_every_steps")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub every_steps: u32,

    /// Checkpoints kept on the output volume; older ones are deleted. Default 2.
    #[serde(default = "default_keep")]
    #[schemars(range(min = 1, max = 100))]
    pub keep: u32,
}

fn default_every_steps() -> u32 {
    200
}
fn default_keep() -> u32 {
    2
}

impl Default for CheckpointSpec {
    fn default() -> Self {
        Self {
            every_steps: default_every_steps(),
            keep: default_keep(),
        }
    }
}

/// The file the operator mounts into every trainer pod, and that `kubetune-trainer`
/// reads. Paths are inside the container. Rank, world size and the rendezvous address
/// are not here: they differ per pod and come from the environment.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TrainerConfig {
    /// The fine-tuning method.
    pub method: Method,
    /// Name of the base model, recorded in the adapter's metadata
    /// (`base_model_name_or_path`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_model_name: Option<String>,
    /// Directory of the Hugging Face checkpoint (config.json, *.safetensors, tokenizer.json).
    pub model_dir: String,
    /// The dataset's format.
    pub dataset_format: DatasetFormat,
    /// The training JSONL file.
    pub train_file: String,
    /// A held-out JSONL file for evaluation, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_file: Option<String>,
    /// Percent of the training set held out for evaluation when no eval file is given.
    #[serde(default)]
    pub eval_split_percent: u32,
    /// Where the adapter or model is written.
    pub output_dir: String,
    /// Where checkpoints are written and resumed from.
    pub checkpoint_dir: String,
    /// Optimisation settings.
    #[serde(default)]
    pub hyperparameters: Hyperparameters,
    /// LoRA settings, for the methods that train an adapter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<LoraSpec>,
    /// QLoRA settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qlora: Option<QloraSpec>,
    /// DPO settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dpo: Option<DpoSpec>,
    /// Checkpoint cadence and retention.
    #[serde(default)]
    pub checkpoint: CheckpointSpec,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lora_scaling_follows_peft() {
        let lora = LoraSpec {
            rank: 16,
            alpha: 32,
            ..LoraSpec::default()
        };
        assert_eq!(lora.scaling(), 2.0);
        let rs = LoraSpec {
            rs_lora: true,
            ..lora
        };
        assert_eq!(rs.scaling(), 8.0);
    }

    #[test]
    fn empty_hyperparameters_take_every_default() {
        let parsed: Hyperparameters = serde_json::from_str("{}").expect("all fields default");
        assert_eq!(parsed, Hyperparameters::default());
        assert_eq!(parsed.learning_rate.value(), Ok(2e-4));
    }

    #[test]
    fn trainer_config_round_trips_through_json() {
        let config = TrainerConfig {
            method: Method::Lora,
            base_model_name: Some("tiny".into()),
            model_dir: "/model".into(),
            dataset_format: DatasetFormat::Chat,
            train_file: "/data/train.jsonl".into(),
            eval_file: None,
            eval_split_percent: 5,
            output_dir: "/out".into(),
            checkpoint_dir: "/out/checkpoints".into(),
            hyperparameters: Hyperparameters::default(),
            lora: Some(LoraSpec::default()),
            qlora: None,
            dpo: None,
            checkpoint: CheckpointSpec::default(),
        };
        let json = serde_json::to_string(&config).expect("serialises");
        let back: TrainerConfig = serde_json::from_str(&json).expect("deserialises");
        assert_eq!(back, config);
    }
}

/// The contract between the operator and the trainer pods it creates: where the config
/// is mounted, which environment variables carry each pod's place in the gang, where
/// progress is served, and what exit codes mean. Both sides use these constants.
pub mod contract {
    use serde::{Deserialize, Serialize};

    /// Where the rendered [`TrainerConfig`](super::TrainerConfig) is mounted, as JSON.
    pub const CONFIG_PATH: &str = "/etc/kubetune/trainer.json";
    /// The trainer process' rank, 0 to world size − 1 (rank 0 hosts the rendezvous and
    /// reports progress). The operator sets it when a pod runs one rank; with several
    /// ranks a pod, the pod's launcher sets it for each process it starts
    /// (`node rank × ranks per pod + local rank`).
    pub const ENV_RANK: &str = "KUBETUNE_RANK";
    /// The pod's index in the gang, 0 to pods − 1 (the Indexed Job's completion index).
    pub const ENV_NODE_RANK: &str = "KUBETUNE_NODE_RANK";
    /// Trainer processes in each pod, one per GPU; above 1 the trainer started in the pod
    /// launches that many ranks of itself and supervises them.
    pub const ENV_RANKS_PER_POD: &str = "KUBETUNE_RANKS_PER_POD";
    /// A process' index among its pod's ranks, 0 to ranks per pod − 1, set by the
    /// launcher: the CUDA device the rank drives.
    pub const ENV_LOCAL_RANK: &str = "KUBETUNE_LOCAL_RANK";
    /// The number of ranks in the gang: pods × ranks per pod.
    pub const ENV_WORLD_SIZE: &str = "KUBETUNE_WORLD_SIZE";
    /// `host:port` of rank 0's rendezvous, resolvable from every rank.
    pub const ENV_RENDEZVOUS: &str = "KUBETUNE_RENDEZVOUS";
    /// The address the trainer serves progress and metrics on.
    pub const ENV_PROGRESS_ADDR: &str = "KUBETUNE_PROGRESS_ADDR";
    /// Bytes of memory of each of the pod's GPUs (from the product the job asks for):
    /// the trainer refuses a run whose memory plan exceeds it.
    pub const ENV_GPU_MEMORY_BYTES: &str = "KUBETUNE_GPU_MEMORY_BYTES";
    /// The port progress is served on (`GET /progress`, `/metrics`, `/healthz`).
    pub const PROGRESS_PORT: u16 = 8080;
    /// The port rank 0 listens on for the rendezvous.
    pub const RENDEZVOUS_PORT: u16 = 29500;
    /// Where the trainer writes why it failed; the operator reads it from the pod's
    /// terminated state.
    pub const ENV_TERMINATION_LOG: &str = "KUBETUNE_TERMINATION_LOG";
    /// Exit code for success.
    pub const EXIT_SUCCESS: i32 = 0;
    /// Exit code for invalid input (a bad dataset line, a missing file, an unsupported
    /// model): retrying cannot help, so the job fails at once with the trainer's message.
    /// Every other non-zero code is retryable.
    pub const EXIT_INVALID_INPUT: i32 = 2;

    /// `GET /progress` on [`PROGRESS_PORT`]: rank 0's progress, read by the operator at
    /// a bounded rate into `status.progress`. Fields the trainer does not know yet are
    /// absent; unknown fields are ignored, so either side can grow first.
    #[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
    #[serde(rename_all = "camelCase", default)]
    pub struct ProgressReport {
        /// `loading`, `evaluating`, `training`, `saving` or `done`.
        pub phase: String,
        /// Completed optimizer steps.
        pub step: u64,
        /// Steps the run will take.
        pub total_steps: u64,
        /// Fractional epochs completed.
        pub epoch: f64,
        /// Mean training loss of the last step.
        pub loss: Option<f64>,
        /// Eval loss of the tuned model (after training).
        pub eval_loss: Option<f64>,
        /// Eval loss of the base model (before training).
        pub base_eval_loss: Option<f64>,
        /// Training throughput of this attempt (non-padding input tokens per second,
        /// across all ranks).
        pub tokens_per_second: f64,
        /// Estimated seconds to the end of training.
        pub eta_seconds: Option<f64>,
        /// Method-specific figures of the last step (DPO: `rewards/chosen`,
        /// `rewards/rejected`, `accuracy`, `margin`; after training also `eval_`-prefixed).
        #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
        pub metrics: std::collections::BTreeMap<String, f64>,
        /// The run's memory plan, per rank (from the model's `config.json`).
        #[serde(skip_serializing_if = "Option::is_none")]
        pub memory_plan: Option<crate::memory::MemoryPlan>,
    }

    /// What a successful trainer writes to its termination log: one JSON object the
    /// operator turns into `status.evaluation` and `status.artifact`.
    #[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
    #[serde(rename_all = "camelCase", default)]
    pub struct TrainerResult {
        /// SHA-256 of the weights written (the adapter file, or the model index).
        pub adapter_sha256: String,
        /// Their size in bytes.
        pub adapter_size_bytes: u64,
        /// Eval loss of the base model on the held-out set.
        pub base_eval_loss: Option<f64>,
        /// Eval loss of the result on the held-out set.
        pub eval_loss: Option<f64>,
        /// Optimizer steps taken.
        pub steps: u64,
    }
}
