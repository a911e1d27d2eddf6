//! `FineTuneJob`: fine-tune a base model on a dataset, on GPUs the cluster has, within a
//! budget. The operator turns one into a batch/v1 Job of trainer pods and reports
//! progress, evaluation, cost and the artifact in its status.

// `#[kube(printcolumn(..))]` repeats `type_ = "string"` by design; clippy reads the
// repetition as a duplicated attribute.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::decimal::{Decimal, Money};
use crate::kubernetes::Toleration;
use crate::rules;
use crate::training::{
    CheckpointSpec, DatasetFormat, DpoSpec, Hyperparameters, LoraSpec, Method, QloraSpec,
};

/// Fine-tune a base model on a dataset with LoRA, QLoRA, full fine-tuning or DPO.
#[derive(CustomResource, KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "kubetune.io",
    version = "v1alpha1",
    kind = "FineTuneJob",
    namespaced,
    status = "FineTuneJobStatus",
    shortname = "ftj",
    category = "kubetune",
    printcolumn(name = "Method", type_ = "string", json_path = ".spec.method"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Progress",
        type_ = "integer",
        json_path = ".status.progress.percent",
        description = "Percent of the optimizer steps done"
    ),
    printcolumn(
        name = "Restarts",
        type_ = "integer",
        json_path = ".status.restarts",
        description = "Restarts from a checkpoint so far"
    ),
    printcolumn(
        name = "Cost",
        type_ = "string",
        json_path = ".status.cost.amount",
        description = "Compute cost so far, in the price table's currency"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    printcolumn(
        name = "Nodes",
        type_ = "integer",
        json_path = ".spec.resources.nodes",
        description = "Trainer pods, one per node",
        priority = 1
    ),
    printcolumn(
        name = "GPUs/Node",
        type_ = "integer",
        json_path = ".spec.resources.gpu.perNode",
        description = "GPUs of each trainer pod (none: CPU)",
        priority = 1
    ),
    printcolumn(
        name = "Queue",
        type_ = "string",
        json_path = ".spec.scheduling.queueName",
        description = "Kueue LocalQueue",
        priority = 1
    ),
    printcolumn(
        name = "Eval-Improvement",
        type_ = "string",
        json_path = ".status.evaluation.improvement",
        description = "Relative eval-loss improvement over the base model",
        priority = 1
    ),
    doc = "Fine-tune a base model on a dataset with LoRA, QLoRA, full fine-tuning or DPO.",
    validation = Rule::new("size(self.metadata.name) <= 63").message("metadata.name must be at most 63 characters: it names the trainer pods, their Service and their labels"),
    validation = Rule::new("self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')").message("metadata.name must be lowercase letters, digits and dashes, starting with a letter (a DNS-1035 label): it names the trainer pods and their Service")
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = rules::at(Rule::new("self.method == 'full' || self.resources.nodes == 1").message("methods lora, qlora and dpo run on one node: set resources.nodes to 1, or use method full"), ".resources.nodes", Reason::FieldValueInvalid))]
#[x_kube(validation = rules::at(Rule::new("self.method == 'full' || !has(self.resources.ranksPerNode) || self.resources.ranksPerNode == 1").message("methods lora, qlora and dpo train in one process: set resources.ranksPerNode to 1, or use method full"), ".resources.ranksPerNode", Reason::FieldValueInvalid))]
#[x_kube(validation = rules::at(Rule::new("!has(self.resources.ranksPerNode) || !has(self.resources.gpu) || self.resources.ranksPerNode == self.resources.gpu.perNode").message("resources.ranksPerNode must equal resources.gpu.perNode: each rank drives one GPU"), ".resources.ranksPerNode", Reason::FieldValueInvalid))]
#[x_kube(validation = rules::at(Rule::new("self.method == 'full' || !has(self.resources.gpu) || self.resources.gpu.perNode == 1").message("methods lora, qlora and dpo train on one GPU: set resources.gpu.perNode to 1, or use method full"), ".resources.gpu.perNode", Reason::FieldValueInvalid))]
#[x_kube(validation = rules::at(Rule::new("self.method != 'full' || !has(self.lora)").message("spec.lora is not allowed with method full, which trains every weight"), ".lora", Reason::FieldValueForbidden))]
#[x_kube(validation = rules::at(Rule::new("self.method == 'qlora' || !has(self.qlora)").message("spec.qlora is only allowed with method qlora"), ".qlora", Reason::FieldValueForbidden))]
#[x_kube(validation = rules::at(Rule::new("self.method != 'dpo' || has(self.dpo)").message("method dpo requires spec.dpo"), ".dpo", Reason::FieldValueRequired))]
#[x_kube(validation = rules::at(Rule::new("self.method == 'dpo' || !has(self.dpo)").message("spec.dpo is only allowed with method dpo"), ".dpo", Reason::FieldValueForbidden))]
#[x_kube(validation = rules::at(Rule::new("self.method != 'dpo' || self.dataset.format == 'preference'").message("method dpo needs a dataset with format preference"), ".dataset.format", Reason::FieldValueInvalid))]
#[x_kube(validation = rules::at(Rule::new("self.method == 'dpo' || self.dataset.format != 'preference'").message("a preference dataset is only used by method dpo"), ".dataset.format", Reason::FieldValueInvalid))]
#[x_kube(validation = rules::at(Rule::new("!has(self.resources.gpu) || !has(self.scheduling.nodeSelector) || !('nvidia.com/gpu.product' in self.scheduling.nodeSelector) || self.scheduling.nodeSelector['nvidia.com/gpu.product'] == self.resources.gpu.product").message(Message::Expression("'scheduling.nodeSelector asks for nvidia.com/gpu.product ' + self.scheduling.nodeSelector['nvidia.com/gpu.product'] + ' but resources.gpu.product is ' + self.resources.gpu.product + ': no node has both; remove the selector entry, the product is selected already'".into())), ".scheduling.nodeSelector", Reason::FieldValueInvalid))]
#[x_kube(validation = rules::at(Rule::new("self.resources.nodes == 1 || !self.scheduling.onePodPerNode || !has(self.scheduling.nodeSelector) || !('kubernetes.io/hostname' in self.scheduling.nodeSelector)").message("scheduling.nodeSelector pins every pod to one node with kubernetes.io/hostname, but the pods of a gang run on distinct nodes (scheduling.onePodPerNode): remove kubernetes.io/hostname, or set onePodPerNode to false"), ".scheduling.nodeSelector", Reason::FieldValueInvalid))]
pub struct FineTuneJobSpec {
    /// How to fine-tune: lora (adapter on a frozen base, one GPU), qlora (adapter on a
    /// 4-bit base, one GPU), full (every weight, across nodes) or dpo (preference tuning
    /// with an adapter, one GPU). Immutable.
    #[x_kube(validation = Rule::new("self == oldSelf").message("method is immutable"))]
    pub method: Method,

    /// The Hugging Face checkpoint to start from. Immutable.
    #[x_kube(validation = Rule::new("self == oldSelf").message("baseModel is immutable"))]
    pub base_model: BaseModel,

    /// The training (and optional evaluation) data. Immutable.
    #[x_kube(validation = Rule::new("self == oldSelf").message("dataset is immutable"))]
    pub dataset: Dataset,

    /// Optimisation settings; every field has a default.
    #[serde(default)]
    pub hyperparameters: Hyperparameters,

    /// LoRA settings for methods lora, qlora and dpo; defaults apply when omitted.
    /// Not allowed with method full.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<LoraSpec>,

    /// QLoRA settings; only with method qlora.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qlora: Option<QloraSpec>,

    /// DPO settings; required with method dpo and not allowed otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dpo: Option<DpoSpec>,

    /// The compute each trainer pod gets and how many pods there are.
    pub resources: Resources,

    /// Checkpoint cadence and retention.
    #[serde(default)]
    pub checkpoint: CheckpointSpec,

    /// Where the adapter (or, for method full, the model) is written. Immutable.
    #[x_kube(validation = Rule::new("self == oldSelf").message("output is immutable"))]
    pub output: Output,

    /// A spending limit. Omit for none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<Budget>,

    /// Restarts from the last checkpoint allowed after retryable failures (eviction,
    /// preemption, node loss, out of memory, a stalled trainer) before the job fails.
    /// Default 3; 0 to 100.
    #[serde(default = "default_max_restarts")]
    #[schemars(range(min = 0, max = 100))]
    pub max_restarts: u32,

    /// A trainer that reports no new step for this many seconds is restarted from its
    /// last checkpoint (counted as a restart). Default 1800; at least 60.
    #[serde(default = "default_stall_timeout")]
    #[schemars(range(min = 60, max = 604_800))]
    pub stall_timeout_seconds: u32,

    /// Stop the trainer pods (the trainer checkpoints first) while true; setting it back
    /// to false resumes from the checkpoint. Default false.
    #[serde(default)]
    pub suspend: bool,

    /// Delete the trainer Job and its pods this many seconds after the job succeeds or
    /// fails. The FineTuneJob and its status stay. Omit to keep them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 31_536_000))]
    pub ttl_seconds_after_finished: Option<u32>,

    /// Placement: queue, priority, tolerations, node selector, gang timeout.
    #[serde(default)]
    pub scheduling: Scheduling,

    /// Labels and annotations added to every trainer pod, for cost allocation, a
    /// service mesh or monitoring. Optional.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_metadata: Option<PodMetadata>,

    /// Trainer image to use instead of the operator's default. Optional.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    #[x_kube(validation = Rule::new(format!("self.matches({})", rules::quoted(rules::IMAGE_PATTERN))).message(Message::Expression("'image must be an image reference such as \"registry.example.com/ml/kubetune-trainer:0.1.0\" (a lowercase repository, an optional tag or @sha256 digest); \"' + self + '\" is not'".into())))]
    pub image: Option<String>,
}

fn default_max_restarts() -> u32 {
    3
}
fn default_stall_timeout() -> u32 {
    1800
}

/// A file or directory on a PersistentVolumeClaim in the job's namespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct VolumePath {
    /// Name of the PersistentVolumeClaim.
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = rules::format("volume.claimName", "dns1123Subdomain", "a PersistentVolumeClaim name: lowercase letters, digits, \"-\" and \".\""))]
    pub claim_name: String,

    /// Path inside the volume, relative to its root: segments of letters, digits, "-",
    /// "_" and ".", none of them "." or "..", no leading "/". Empty: the volume's root.
    /// Omitted: the root for baseModel, `<namespace>/<job name>` for output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    #[x_kube(validation = Rule::new(format!("self == '' || self.matches({})", rules::quoted(rules::RELATIVE_PATH_PATTERN))).message(Message::Expression("'volume.path must be empty (the root) or a path relative to the volume root, without \"..\" or \".\" segments, such as \"models/llama\"; \"' + self + '\" is not'".into())))]
    pub path: Option<String>,
}

/// The Hugging Face checkpoint (config.json, *.safetensors, tokenizer.json,
/// tokenizer_config.json) to fine-tune.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct BaseModel {
    /// The model's name, such as "meta-llama/Llama-3.1-8B-Instruct", recorded in the
    /// adapter (base_model_name_or_path) and used by serving to check the base matches.
    /// Optional.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    #[x_kube(validation = Rule::new("!self.matches('[[:cntrl:]]')").message("baseModel.name must be one line of printable characters"))]
    pub name: Option<String>,

    /// The checkpoint directory on a PersistentVolumeClaim; mounted read-only.
    pub volume: VolumePath,

    /// The model's dimensions, as in its config.json, for the memory plan made at
    /// admission (`status.memoryPlan`, condition FitsGpuMemory). Optional: well-known
    /// names (Llama 3.1 8B and 70B, Llama 3.2 1B and 3B) need none; without either the
    /// plan waits for the trainer, which makes it from config.json.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shape: Option<crate::memory::ModelShape>,
}

/// Training and evaluation data as JSONL files on a PersistentVolumeClaim.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.evalPath) || self.evalSplitPercent == 0").message("set dataset.evalPath or dataset.evalSplitPercent, not both"))]
pub struct Dataset {
    /// The shape of each line: chat, instruction, text or preference (DPO only).
    pub format: DatasetFormat,

    /// Name of the PersistentVolumeClaim holding the files; mounted read-only.
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = rules::format("dataset.claimName", "dns1123Subdomain", "a PersistentVolumeClaim name: lowercase letters, digits, \"-\" and \".\""))]
    pub claim_name: String,

    /// The training JSONL file, relative to the volume's root.
    #[schemars(length(min = 1, max = 1024))]
    #[x_kube(validation = rules::relative_path("dataset.trainPath", "support/train.jsonl"))]
    pub train_path: String,

    /// A held-out JSONL file for evaluation, relative to the volume's root. Optional.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    #[x_kube(validation = rules::relative_path("dataset.evalPath", "support/eval.jsonl"))]
    pub eval_path: Option<String>,

    /// Percent of the training file held out for evaluation when evalPath is not set.
    /// Default 0 (no evaluation); at most 50.
    #[serde(default)]
    #[schemars(range(max = 50))]
    pub eval_split_percent: u32,

    /// About how many tokens the training file holds. Optional: with it, status.cost
    /// carries an estimate before the trainer first reports its throughput (from the
    /// price table's tokens per second per GPU).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub estimated_tokens: Option<u64>,
}

/// The compute each trainer pod gets, and how many pods.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Resources {
    /// GPUs per pod. Omit to train on CPU, for demos, tests and small models; the job is
    /// then priced by the CPU price.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<GpuRequest>,

    /// Number of trainer pods, one per node. Default 1; 1 to 64. Only method full may use
    /// more than one.
    #[serde(default = "default_nodes")]
    #[schemars(range(min = 1, max = 64))]
    pub nodes: u32,

    /// Trainer processes (ranks) in each pod, for method full. Default: one per GPU
    /// (`gpu.perNode`) with GPUs, 1 on CPU; with GPUs it must equal `gpu.perNode`, since
    /// each rank drives one GPU. The gang's world size is `nodes × ranksPerNode`. Set it
    /// on CPU to run several ranks in one pod (tests, demos, small models). 1 to 16.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 16))]
    pub ranks_per_node: Option<u32>,

    /// CPU request and limit per pod, as a Kubernetes quantity ("8", "500m"). Optional.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 32))]
    #[x_kube(validation = Rule::new("isQuantity(self) && quantity(self).isGreaterThan(quantity('0'))").message("resources.cpu must be a positive quantity such as \"8\" or \"500m\""))]
    pub cpu: Option<String>,

    /// Memory request and limit per pod, as a Kubernetes quantity ("64Gi"). Optional.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 32))]
    #[x_kube(validation = Rule::new("isQuantity(self) && quantity(self).isGreaterThan(quantity('0'))").message("resources.memory must be a positive quantity such as \"64Gi\""))]
    pub memory: Option<String>,
}

fn default_nodes() -> u32 {
    1
}

impl FineTuneJobSpec {
    /// The memory plan's input for this job on a model of `shape`, as the trainer will
    /// run it: fully sharded across a gang, no recompute unless it must, the CUDA
    /// runtime's reserve on a GPU and nothing besides on a CPU (which the trainer
    /// measures itself).
    pub fn plan_input(&self, shape: crate::memory::ModelShape) -> crate::memory::PlanInput {
        use crate::memory::{GPU_RUNTIME_BYTES, PlanInput, Processor, Sharding};
        let gpu = self.resources.gpu.is_some();
        PlanInput {
            shape,
            method: self.method,
            sharding: Sharding::Full,
            world_size: u64::from(self.resources.world_size()),
            seq_len: u64::from(self.hyperparameters.max_seq_length),
            micro_batch: u64::from(self.hyperparameters.batch_size),
            recompute: false,
            lora_rank: u64::from(self.lora.clone().unwrap_or_default().rank),
            processor: if gpu { Processor::Gpu } else { Processor::Cpu },
            runtime_bytes: if gpu { GPU_RUNTIME_BYTES } else { 0 },
        }
    }

    /// The model's dimensions, from `baseModel.shape` or a well-known `baseModel.name`.
    pub fn model_shape(&self) -> Option<crate::memory::ModelShape> {
        self.base_model.shape.or_else(|| {
            self.base_model
                .name
                .as_deref()
                .and_then(crate::memory::ModelShape::known)
        })
    }
}

impl Resources {
    /// Bytes of memory of one GPU of the product asked for, when it is known
    /// ([`crate::memory::gpu_memory_bytes`]).
    pub fn gpu_memory_bytes(&self) -> Option<u64> {
        self.gpu
            .as_ref()
            .and_then(|gpu| crate::memory::gpu_memory_bytes(&gpu.product))
    }

    /// Trainer processes in each pod: `ranksPerNode`, else one per GPU, else 1.
    pub fn ranks_per_pod(&self) -> u32 {
        self.ranks_per_node
            .or_else(|| self.gpu.as_ref().map(|gpu| gpu.per_node))
            .unwrap_or(1)
            .max(1)
    }

    /// The gang's number of ranks: pods × ranks per pod.
    pub fn world_size(&self) -> u32 {
        self.nodes.saturating_mul(self.ranks_per_pod())
    }
}

/// GPUs for each trainer pod.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct GpuRequest {
    /// The GPU product, matched against the nodes' `nvidia.com/gpu.product` label, such
    /// as "NVIDIA-A100-SXM4-80GB" or "NVIDIA-H100-80GB-HBM3".
    #[schemars(length(min = 1, max = 63))]
    #[x_kube(validation = rules::format("resources.gpu.product", "labelValue", "a value of the node label nvidia.com/gpu.product, such as \"NVIDIA-A100-SXM4-80GB\""))]
    pub product: String,

    /// GPUs per pod (per node). Default 1; 1 to 16. Methods other than full use 1.
    #[serde(default = "default_gpus_per_node")]
    #[schemars(range(min = 1, max = 16))]
    pub per_node: u32,
}

fn default_gpus_per_node() -> u32 {
    1
}

/// Where the result is written.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Output {
    /// The volume and directory the adapter (or full model) is written to. When `path`
    /// is omitted it is `<namespace>/<job name>`. Checkpoints go to `checkpoints/` inside.
    pub volume: VolumePath,
}

/// A spending limit for the job, in the currency of the operator's price table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Budget {
    /// The most the job may cost, as a decimal string with at most two places
    /// ("125.50"). At this amount the trainer is stopped (after it checkpoints) and the
    /// job fails with reason BudgetExceeded.
    #[x_kube(validation = crate::rules::money_range("budget.maxCost", "double(self) > 0.0", "above 0"))]
    pub max_cost: Money,

    /// A warning event is recorded when the cost reaches this percent of maxCost.
    /// Default 80; 1 to 99.
    #[serde(default = "default_warn_percent")]
    #[schemars(range(min = 1, max = 99))]
    pub warn_percent: u32,
}

fn default_warn_percent() -> u32 {
    80
}

/// Extra metadata for the trainer pods. Keys under `kubetune.io/` are the operator's.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodMetadata {
    /// Labels added to every trainer pod. At most 32.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 32, "additionalProperties" = {"type": "string", "maxLength": 63}))]
    #[x_kube(validation = Rule::new("self.all(k, !k.startsWith('kubetune.io/'))").message("podMetadata.labels must not use the reserved prefix kubetune.io/"))]
    #[x_kube(validation = rules::map_keys("podMetadata.labels"))]
    #[x_kube(validation = rules::label_values("podMetadata.labels"))]
    pub labels: BTreeMap<String, String>,

    /// Annotations added to every trainer pod. At most 32.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 32))]
    #[x_kube(validation = Rule::new("self.all(k, !k.startsWith('kubetune.io/'))").message("podMetadata.annotations must not use the reserved prefix kubetune.io/"))]
    #[x_kube(validation = rules::map_keys("podMetadata.annotations"))]
    pub annotations: BTreeMap<String, String>,
}

/// Where and how the trainer pods are placed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Scheduling {
    /// Kueue LocalQueue to submit to. The trainer Job is then created suspended with the
    /// `kueue.x-k8s.io/queue-name` label and starts when Kueue admits it. Optional.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    #[x_kube(validation = rules::format("scheduling.queueName", "dns1123Label", "a LocalQueue name that fits a label value: at most 63 lowercase letters, digits and \"-\""))]
    pub queue_name: Option<String>,

    /// PriorityClass of the trainer pods. Optional.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = rules::format("scheduling.priorityClassName", "dns1123Subdomain", "a PriorityClass name: lowercase letters, digits, \"-\" and \".\""))]
    pub priority_class_name: Option<String>,

    /// Extra tolerations for the trainer pods; the `nvidia.com/gpu` taint is tolerated
    /// already. At most 32.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub tolerations: Vec<Toleration>,

    /// Extra node labels the trainer pods require, on top of the GPU product. At most 32.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 32, "additionalProperties" = {"type": "string", "maxLength": 63}))]
    #[x_kube(validation = rules::map_keys("scheduling.nodeSelector"))]
    #[x_kube(validation = rules::label_values("scheduling.nodeSelector"))]
    pub node_selector: BTreeMap<String, String>,

    /// A gang (method full) whose pods are not all running within this many seconds is
    /// torn down, releasing its GPUs, and retried later. Default 600; at least 30.
    #[serde(default = "default_gang_timeout")]
    #[schemars(range(min = 30, max = 86_400))]
    pub gang_timeout_seconds: u32,

    /// A gang's pods on distinct nodes (a required pod anti-affinity on the hostname),
    /// so each pod has its node's GPUs. Default true; false lets several pods of one
    /// gang share a node (one large node, tests), each still with its own requests.
    #[serde(default = "default_true")]
    pub one_pod_per_node: bool,
}

fn default_true() -> bool {
    true
}

fn default_gang_timeout() -> u32 {
    600
}

impl Default for Scheduling {
    fn default() -> Self {
        Self {
            queue_name: None,
            priority_class_name: None,
            tolerations: Vec::new(),
            node_selector: BTreeMap::new(),
            gang_timeout_seconds: default_gang_timeout(),
            one_pod_per_node: true,
        }
    }
}

/// Where a FineTuneJob is in its life.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum Phase {
    /// Accepted; waiting for its inputs, its queue or its pods.
    #[default]
    Pending,
    /// Admitted by the queue (or without one), pods being placed.
    Admitted,
    /// The trainer is running.
    Running,
    /// Finished; the artifact is written.
    Succeeded,
    /// Finished without a result; see the Failed condition's reason.
    Failed,
    /// Stopped by spec.suspend; resumes from the checkpoint.
    Suspended,
}

impl Phase {
    /// Whether the job is over: a terminal job never gets its trainer Job recreated.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed)
    }

    /// The value as written in status.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "Pending",
            Self::Admitted => "Admitted",
            Self::Running => "Running",
            Self::Succeeded => "Succeeded",
            Self::Failed => "Failed",
            Self::Suspended => "Suspended",
        }
    }
}

/// What the operator observed of a FineTuneJob.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FineTuneJobStatus {
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Pending, Admitted, Running, Succeeded, Failed or Suspended.
    #[serde(default)]
    pub phase: Phase,

    /// Standard conditions, one per type (the types and reasons are listed in the CRD,
    /// from [`crate::conditions::finetunejob::TYPES`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"], "description" = crate::conditions::finetunejob::description()))]
    pub conditions: Vec<Condition>,

    /// When the first attempt's pods started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,

    /// When the job succeeded or failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,

    /// Restarts so far (attempts after the first).
    #[serde(default)]
    pub restarts: u32,

    /// Every attempt, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attempts: Vec<Attempt>,

    /// Training progress as the trainer (rank 0) reports it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,

    /// Eval loss of the base model and of the result on the held-out set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evaluation: Option<Evaluation>,

    /// What the run has cost so far, and what it will cost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost: Option<Cost>,

    /// The result, once written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact: Option<Artifact>,

    /// Names of the objects the operator created for this job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub children: Option<Children>,

    /// The peak memory one rank needs, planned before it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_plan: Option<MemoryPlanStatus>,
}

/// The memory plan of a job ([`crate::memory`]): per rank, by what it holds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MemoryPlanStatus {
    /// Where the model's dimensions came from.
    pub source: PlanSource,
    /// Bytes of memory of one GPU of the product asked for, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_memory_bytes: Option<u64>,
    /// The bytes, by part.
    #[serde(flatten)]
    pub plan: crate::memory::MemoryPlan,
}

/// Where a memory plan's model dimensions came from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum PlanSource {
    /// `baseModel.shape` or a well-known `baseModel.name`, at admission.
    #[default]
    Spec,
    /// The model's config.json, as the trainer read it.
    Trainer,
}

/// One run of the trainer pods, from placement to exit.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Attempt {
    /// 1 for the first attempt.
    pub number: u32,
    /// When the attempt's Job was created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When the attempt ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_time: Option<Time>,
    /// Why it ended, as a reason such as Succeeded, Preempted, NodeLost, OutOfMemory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// A human-readable explanation, such as the trainer's termination message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The nodes its pods ran on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<String>,
    /// The optimizer step it resumed from (0 for a fresh start).
    #[serde(default)]
    pub resumed_from_step: u64,
}

/// Training progress. Numbers with a fraction are decimal strings.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Progress {
    /// Optimizer steps done.
    pub step: u64,
    /// Optimizer steps in the whole run.
    pub total_steps: u64,
    /// Percent of the steps done, 0 to 100.
    pub percent: u32,
    /// Fractional epoch, such as "1.25".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<String>,
    /// Training loss of the latest step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<String>,
    /// Latest evaluation loss.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_loss: Option<String>,
    /// Training throughput in tokens per second, across all ranks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_second: Option<u64>,
    /// Estimated seconds until the run ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_seconds: Option<u64>,
    /// When the trainer last reported a new step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_step_time: Option<Time>,
    /// DPO metrics (method dpo): rewards of the chosen and rejected answers, preference
    /// accuracy and margin.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metrics: BTreeMap<String, String>,
}

/// Evaluation of the result against the base model on the held-out set.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Evaluation {
    /// Mean cross-entropy per target token of the base model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_eval_loss: Option<String>,
    /// Mean cross-entropy per target token of the fine-tuned model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_loss: Option<String>,
    /// Relative improvement (base − tuned) / base, such as "0.23".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub improvement: Option<String>,
    /// Target tokens evaluated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<u64>,
}

/// The compute cost of the run: GPU-seconds of every attempt's pods × the price of the
/// GPU product (spot or on-demand) of the node each ran on; for a job without GPUs, CPU
/// core-seconds × the CPU price. GPU jobs report `gpuHours`, CPU jobs `cpuCoreHours`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Cost {
    /// The price table's currency, such as "USD".
    pub currency: String,
    /// Accrued cost so far, two decimal places.
    pub amount: Money,
    /// GPU-hours so far, as a decimal string (jobs with GPUs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_hours: Option<String>,
    /// GPU-hours of attempts that did not finish: time lost to restarts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lost_gpu_hours: Option<String>,
    /// CPU core-hours so far, as a decimal string (jobs without GPUs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_core_hours: Option<String>,
    /// CPU core-hours of attempts that did not finish: time lost to restarts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lost_cpu_core_hours: Option<String>,
    /// Estimated total cost at completion.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimated_total: Option<Money>,
    /// Rates applied, per GPU-hour (core-hour for CPU jobs), keyed by what was priced
    /// and the capacity type ("NVIDIA-A100-SXM4-80GB/on-demand", "p5.48xlarge/spot",
    /// "cpu/on-demand").
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub rates: BTreeMap<String, Decimal>,
    /// Per-attempt breakdown.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attempts: Vec<AttemptCost>,
}

/// The cost of one attempt.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AttemptCost {
    /// The attempt's number.
    pub number: u32,
    /// GPU-seconds consumed (GPUs × seconds running, summed over pods), for a job with
    /// GPUs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_seconds: Option<u64>,
    /// CPU core-seconds consumed (cores × seconds running, summed over pods), for a job
    /// without GPUs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_core_seconds: Option<u64>,
    /// Cost of those seconds, two decimal places.
    pub amount: Money,
    /// The exact ledger the amount is rounded from: the sum of seconds × GPUs × rate,
    /// the rate in ten-thousandths of the currency per hour (amount = rateSeconds /
    /// 36,000,000). Derived from pod timestamps, so recomputing it never counts twice.
    #[serde(default)]
    pub rate_seconds: u64,
    /// GPU-seconds (CPU core-seconds) settled at an earlier price table, before
    /// pricedSince.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub settled_seconds: u64,
    /// Rate-seconds settled at an earlier price table, before pricedSince.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub settled_rate_seconds: u64,
    /// Start of the current pricing period: time before it keeps its earlier rates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priced_since: Option<Time>,
    /// Version of the price table of the current period.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub price_table: String,
    /// When the ledger was last brought up to date.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated: Option<Time>,
}

fn is_zero(value: &u64) -> bool {
    *value == 0
}

impl AttemptCost {
    /// What the attempt consumed: GPU-seconds, or CPU core-seconds for a CPU job.
    pub fn usage_seconds(&self) -> u64 {
        self.gpu_seconds.or(self.cpu_core_seconds).unwrap_or(0)
    }

    /// Records what the attempt consumed in the field of its kind.
    pub fn set_usage_seconds(&mut self, seconds: u64) {
        match (&mut self.gpu_seconds, &mut self.cpu_core_seconds) {
            (_, Some(cpu)) => *cpu = seconds,
            (gpu, None) => *gpu = Some(seconds),
        }
    }
}

/// The result of a succeeded job.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Artifact {
    /// The PVC holding the result.
    pub claim_name: String,
    /// Directory inside the PVC.
    pub path: String,
    /// SHA-256 of the adapter weights file (adapter_model.safetensors) or, for full
    /// fine-tuning, of the model index.
    pub sha256: String,
    /// Size in bytes of the weights.
    pub size_bytes: u64,
}

/// The objects the operator owns for a FineTuneJob.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Children {
    /// The batch/v1 Job of the current attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    /// The headless Service ranks find rank 0 through (method full).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// The ConfigMap holding the trainer's configuration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map: Option<String>,
}
