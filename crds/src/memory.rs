//! The memory plan: the peak bytes one rank of a fine-tune needs, from the model's
//! shape and the job's settings, before anything runs.
//!
//! The trainer computes it once it has read the model's `config.json` (and refuses to
//! start a run whose plan exceeds its GPU); the operator computes it at admission from
//! the model's shape in the spec, and warns when the job cannot fit the product's
//! memory. One formula, here, so the two agree.
//!
//! The formula follows what the trainer holds, term by term:
//! - **state**: weights, gradients and the two AdamW moments. Full fine-tuning keeps
//!   all four in f32 (16 bytes a weight); ZeRO stage 3 keeps `1/W` of each (the units'
//!   padded shards), stage 1 the weights and gradients whole and `1/W` of the moments.
//!   Adapter methods keep the frozen base in the compute dtype (NF4 for QLoRA: half a
//!   byte a weight and a scale per 64) and f32 adapters.
//! - **gathered**: with ZeRO stage 3, the unit (embedding, a block, or the head) in use,
//!   its gradient before the reduce-scatter, and the next unit in flight; with
//!   `shard-grad-op`, every unit's weights from forward to backward.
//! - **activations**: each block's input while blocks are recomputed (always, when
//!   sharded), or every block's autograd graph when not, plus one block's graph and its
//!   backward; the attention matrix is materialised (`batch × heads × seq²`), and the
//!   LM head's logits are either all rows at once (CPU, fused cross-entropy) or chunks
//!   of 1024 rows (GPU).
//! - **buffers**: the flat f32 copies the collectives send and receive (a unit, with
//!   ZeRO stage 3; every gradient, with stage 1 and replicated ranks), which live in host
//!   memory, so a GPU's plan has none.
//! - **runtime**: the CUDA context, cuBLAS workspace and allocator slack on a GPU
//!   ([`GPU_RUNTIME_BYTES`]); on a CPU, whatever the caller measured before loading.

use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::training::Method;

/// A GPU's memory the CUDA context, cuBLAS workspaces and allocator fragmentation take
/// before and around the tensors: 2 GiB.
pub const GPU_RUNTIME_BYTES: u64 = 2 << 30;

/// Rows of logits the GPU trainer computes at a time (the trainer's `HEAD_CHUNK_ROWS`).
pub const HEAD_CHUNK_ROWS: u64 = 1024;

/// The dimensions of a Llama-family decoder that memory depends on: the fields of its
/// `config.json` of the same names (`num_hidden_layers`, `num_attention_heads`,
/// `num_key_value_heads`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.attentionHeads % self.keyValueHeads == 0").message("baseModel.shape.attentionHeads must be a multiple of keyValueHeads"))]
pub struct ModelShape {
    /// Width of the residual stream (`hidden_size`).
    #[schemars(range(min = 1, max = 1_048_576))]
    pub hidden_size: u64,
    /// Width of the MLP (`intermediate_size`).
    #[schemars(range(min = 1, max = 4_194_304))]
    pub intermediate_size: u64,
    /// Decoder blocks (`num_hidden_layers`).
    #[schemars(range(min = 1, max = 1024))]
    pub layers: u64,
    /// Query heads (`num_attention_heads`).
    #[schemars(range(min = 1, max = 1024))]
    pub attention_heads: u64,
    /// Key/value heads (`num_key_value_heads`).
    #[schemars(range(min = 1, max = 1024))]
    pub key_value_heads: u64,
    /// Width of a head (`head_dim`, else hidden size / attention heads).
    #[schemars(range(min = 1, max = 4096))]
    pub head_dim: u64,
    /// Vocabulary size (`vocab_size`).
    #[schemars(range(min = 1, max = 4_194_304))]
    pub vocab_size: u64,
    /// Whether the LM head is the token embedding (`tie_word_embeddings`). Default
    /// false.
    #[serde(default)]
    pub tie_word_embeddings: bool,
}

impl ModelShape {
    /// Meta's Llama 3.1 8B (and its Instruct model): 8.03B weights.
    pub const LLAMA_3_1_8B: Self = Self {
        hidden_size: 4096,
        intermediate_size: 14336,
        layers: 32,
        attention_heads: 32,
        key_value_heads: 8,
        head_dim: 128,
        vocab_size: 128_256,
        tie_word_embeddings: false,
    };

    /// Meta's Llama 3.1 70B (and its Instruct model): 70.6B weights.
    pub const LLAMA_3_1_70B: Self = Self {
        hidden_size: 8192,
        intermediate_size: 28672,
        layers: 80,
        attention_heads: 64,
        key_value_heads: 8,
        head_dim: 128,
        vocab_size: 128_256,
        tie_word_embeddings: false,
    };

    /// Meta's Llama 3.2 1B: 1.24B weights, tied embeddings.
    pub const LLAMA_3_2_1B: Self = Self {
        hidden_size: 2048,
        intermediate_size: 8192,
        layers: 16,
        attention_heads: 32,
        key_value_heads: 8,
        head_dim: 64,
        vocab_size: 128_256,
        tie_word_embeddings: true,
    };

    /// Meta's Llama 3.2 3B: 3.21B weights, tied embeddings.
    pub const LLAMA_3_2_3B: Self = Self {
        hidden_size: 3072,
        intermediate_size: 8192,
        layers: 28,
        attention_heads: 24,
        key_value_heads: 8,
        head_dim: 128,
        vocab_size: 128_256,
        tie_word_embeddings: true,
    };

    /// The shape of a well-known model from its Hugging Face name
    /// (`meta-llama/Llama-3.1-8B-Instruct`, `Llama-3.1-70B`, ...), case-insensitive, with
    /// or without the organisation.
    pub fn known(name: &str) -> Option<Self> {
        let name = name.rsplit('/').next()?.to_ascii_lowercase();
        let name = name.strip_prefix("meta-").unwrap_or(&name);
        let base = name.strip_suffix("-instruct").unwrap_or(name);
        match base {
            "llama-3.1-8b" => Some(Self::LLAMA_3_1_8B),
            "llama-3.1-70b" => Some(Self::LLAMA_3_1_70B),
            "llama-3.2-1b" => Some(Self::LLAMA_3_2_1B),
            "llama-3.2-3b" => Some(Self::LLAMA_3_2_3B),
            _ => None,
        }
    }

    fn q_width(&self) -> u64 {
        self.attention_heads * self.head_dim
    }

    fn kv_width(&self) -> u64 {
        self.key_value_heads * self.head_dim
    }

    /// Weights of one decoder block: two norms, q/k/v/o and the gated MLP.
    pub fn block_parameters(&self) -> u64 {
        let h = self.hidden_size;
        2 * h + 2 * h * self.q_width() + 2 * h * self.kv_width() + 3 * h * self.intermediate_size
    }

    /// Weights of the token embedding (and of an untied LM head).
    pub fn embedding_parameters(&self) -> u64 {
        self.vocab_size * self.hidden_size
    }

    /// Weights of the linear layers of the blocks (what LoRA targets and QLoRA
    /// quantizes).
    pub fn linear_parameters(&self) -> u64 {
        self.layers * (self.block_parameters() - 2 * self.hidden_size)
    }

    /// Every weight.
    pub fn parameters(&self) -> u64 {
        self.units().iter().sum()
    }

    /// The weights of each unit ZeRO stage 3 gathers at once, in order: the embedding,
    /// each block, and the head (final norm, and the LM head when untied).
    pub fn units(&self) -> Vec<u64> {
        let mut units = Vec::with_capacity(self.layers as usize + 2);
        units.push(self.embedding_parameters());
        units.extend((0..self.layers).map(|_| self.block_parameters()));
        let head = if self.tie_word_embeddings {
            0
        } else {
            self.embedding_parameters()
        };
        units.push(self.hidden_size + head);
        units
    }
}

/// How a gang divides full fine-tuning's state (the trainer's `--sharding`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Sharding {
    /// ZeRO stage 3 (the trainer's `zero3`): an even share of each weight, gradient and
    /// moment; weights are gathered a unit at a time when used. 16/W bytes a weight per
    /// rank, for the state.
    #[default]
    Full,
    /// As [`Self::Full`] between steps, but a unit's weights gathered in forward stay
    /// until its backward (FSDP's `SHARD_GRAD_OP`, ZeRO stage 2 with sharded weights at
    /// rest): the whole f32 weights at a step's peak, one all-gather a unit instead of
    /// two, so the traffic is that of an all-reduce.
    ShardGradOp,
    /// ZeRO stage 1: whole weights and gradients, a share of the optimizer state.
    /// 8 + 8/W bytes a weight.
    OptimizerState,
    /// Every rank keeps everything and updates every weight itself. 16 bytes a weight.
    Replicated,
}

impl Sharding {
    /// The name `--sharding` takes.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Full => "full",
            Self::ShardGradOp => "shard-grad-op",
            Self::OptimizerState => "optimizer-state",
            Self::Replicated => "replicated",
        }
    }
}

impl std::str::FromStr for Sharding {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [
            Self::Full,
            Self::ShardGradOp,
            Self::OptimizerState,
            Self::Replicated,
        ]
        .into_iter()
        .find(|x| x.as_str() == s)
        .ok_or_else(|| {
            format!("sharding {s:?}: expected full, shard-grad-op, optimizer-state or replicated")
        })
    }
}

/// Where the rank computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Processor {
    /// A GPU: bf16 compute for adapter methods, logits in chunks.
    Gpu,
    /// A CPU: f32 throughout, fused cross-entropy.
    Cpu,
}

/// What a plan depends on.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PlanInput {
    /// The model.
    pub shape: ModelShape,
    /// The fine-tuning method.
    pub method: Method,
    /// How a gang of more than one rank shares the state (full fine-tuning).
    pub sharding: Sharding,
    /// Ranks in the gang.
    pub world_size: u64,
    /// Tokens per sequence (the longest batch's padded length).
    pub seq_len: u64,
    /// Sequences per rank per micro-step.
    pub micro_batch: u64,
    /// Whether blocks are recomputed in backward (always, when fully sharded).
    pub recompute: bool,
    /// LoRA rank, for adapter methods.
    pub lora_rank: u64,
    /// Where it runs.
    pub processor: Processor,
    /// Bytes the process holds besides the plan's tensors: [`GPU_RUNTIME_BYTES`] on a
    /// GPU, or what a CPU process measured before loading.
    pub runtime_bytes: u64,
}

/// Peak bytes of one rank, by what they hold.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct MemoryPlan {
    /// Weights at rest (this rank's share, when sharded).
    pub weights_bytes: u64,
    /// Gradients (this rank's share, when sharded).
    pub gradients_bytes: u64,
    /// AdamW's moments (this rank's share, when sharded).
    pub optimizer_bytes: u64,
    /// Weights and gradients gathered for use (ZeRO stage 3).
    pub gathered_bytes: u64,
    /// Activations at the peak of a step.
    pub activations_bytes: u64,
    /// Flat copies the collectives send and receive.
    pub buffers_bytes: u64,
    /// The runtime's own.
    pub runtime_bytes: u64,
    /// The sum: the most this rank holds at once.
    pub peak_bytes: u64,
    /// Whether each block is recomputed in backward (so only its input is kept).
    pub recompute: bool,
}

const F32: u64 = 4;

impl PlanInput {
    /// Whether this is ZeRO stage 3 (a gang of full fine-tuning, fully sharded).
    pub fn fully_sharded(&self) -> bool {
        self.method == Method::Full
            && self.world_size > 1
            && matches!(self.sharding, Sharding::Full | Sharding::ShardGradOp)
    }

    /// Bytes of an activation element: f32, but bf16 for adapters on a GPU.
    fn activation_bytes(&self) -> u64 {
        match (self.method, self.processor) {
            (Method::Full, _) | (_, Processor::Cpu) => F32,
            _ => 2,
        }
    }

    /// Sequences a forward pass carries: DPO runs chosen and rejected together.
    fn sequences(&self) -> u64 {
        match self.method {
            Method::Dpo => 2 * self.micro_batch,
            _ => self.micro_batch,
        }
    }

    /// Bytes of one block's autograd graph in forward, and the most its backward adds.
    fn block_graph(&self) -> (u64, u64) {
        let s = &self.shape;
        let (b, t) = (self.sequences(), self.sequences() * self.seq_len);
        let (h, q, kv, f) = (
            s.hidden_size,
            s.q_width(),
            s.kv_width(),
            s.intermediate_size,
        );
        let scores = b * s.attention_heads * self.seq_len * self.seq_len;
        // The GPU's softmax is composed: the scaled and masked scores are kept too.
        let score_copies = match self.processor {
            Processor::Cpu => 2,
            Processor::Gpu => 4,
        };
        // The norms, o's output, down's and the residuals (6 h); q, its contiguous and
        // RoPE copies, the attention output and its re-layout (5 q); k and v, k's copies
        // (4 kv); under grouped-query attention, k and v expanded to every head (2 q);
        // the MLP's gate, SiLU, up and product (4 f); scores and probabilities.
        let expanded = if s.key_value_heads < s.attention_heads {
            2 * q
        } else {
            kv
        };
        let forward = t * (6 * h + 5 * q + 4 * kv + expanded + 4 * f) + score_copies * scores;
        // Backward's transients: the probabilities' and scores' gradients, the MLP's.
        let backward = t * (2 * h + 2 * f) + 2 * scores;
        let e = self.activation_bytes();
        (forward * e, backward * e)
    }

    /// Bytes of the LM head's logits (and their gradient) at once.
    fn head_bytes(&self) -> u64 {
        let rows = self.sequences() * self.seq_len;
        let rows = match self.processor {
            Processor::Cpu => rows,
            Processor::Gpu => rows.min(HEAD_CHUNK_ROWS),
        };
        // Logits, their log-softmax, and softmax − onehot: f32 each.
        3 * rows * self.shape.vocab_size * F32
    }

    /// These settings, recomputing blocks in backward when keeping their activations
    /// would not fit in `capacity` bytes: what the trainer runs with.
    pub fn fitted(self, capacity: Option<u64>) -> Self {
        match capacity {
            Some(capacity) if !self.recompute && self.plan().peak_bytes > capacity => Self {
                recompute: true,
                ..self
            },
            _ => self,
        }
    }

    /// The plan.
    pub fn plan(&self) -> MemoryPlan {
        let s = &self.shape;
        let p = s.parameters();
        let world = self.world_size.max(1);
        let t = self.sequences() * self.seq_len;
        let e = self.activation_bytes();
        let (graph, backward) = self.block_graph();
        let recompute = self.recompute || self.fully_sharded();
        let saved_inputs = if recompute {
            (s.layers + 1) * t * s.hidden_size * e
        } else {
            s.layers.saturating_sub(1) * graph
        };
        let activations = saved_inputs + graph + backward + self.head_bytes();
        let host_buffers = |bytes: u64| match self.processor {
            Processor::Cpu => bytes,
            Processor::Gpu => 0,
        };
        let mut plan = MemoryPlan {
            activations_bytes: activations,
            runtime_bytes: self.runtime_bytes,
            recompute,
            ..MemoryPlan::default()
        };
        if self.method == Method::Full {
            let units = s.units();
            let shard = |n: u64| n.div_ceil(world);
            let shards: u64 = units.iter().map(|&n| shard(n)).sum();
            if self.fully_sharded() {
                plan.weights_bytes = shards * F32;
                plan.gradients_bytes = shards * F32;
                plan.optimizer_bytes = 2 * shards * F32;
                // The unit in use and its gradient, and the next in flight.
                let largest_pair = units
                    .windows(2)
                    .map(|w| 2 * w[0].max(w[1]) + w[0].min(w[1]))
                    .max()
                    .unwrap_or(2 * units[0]);
                let largest = units.iter().copied().max().unwrap_or(0);
                plan.gathered_bytes = if self.sharding == Sharding::ShardGradOp {
                    (p + largest) * F32
                } else {
                    largest_pair * F32
                };
                // The gathered unit's flat copy and the gradient's.
                plan.buffers_bytes = host_buffers(2 * largest * F32);
            } else {
                plan.weights_bytes = p * F32;
                plan.gradients_bytes = p * F32;
                plan.optimizer_bytes = if world > 1 && self.sharding == Sharding::OptimizerState {
                    2 * shards * F32
                } else {
                    2 * p * F32
                };
                if world > 1 {
                    plan.buffers_bytes = host_buffers(p * F32);
                }
            }
        } else {
            let linear = s.linear_parameters();
            let rest = p - linear;
            let base = match (self.method, self.processor) {
                // 4-bit codes, and an f32 scale per 64 weights.
                (Method::Qlora, _) => linear / 2 + linear / 64 * F32,
                (_, Processor::Gpu) => linear * 2,
                (_, Processor::Cpu) => linear * F32,
            };
            plan.weights_bytes = base + rest * self.activation_bytes();
            // An adapter pair on each of the seven linear layers of each block.
            let adapters = s.layers
                * self.lora_rank
                * (s.hidden_size * 2
                    + (s.hidden_size + s.q_width()) * 2
                    + (s.hidden_size + s.kv_width()) * 2 * 2
                    + (s.hidden_size + s.intermediate_size) * 3);
            plan.weights_bytes += adapters * F32;
            plan.gradients_bytes = adapters * F32;
            plan.optimizer_bytes = 2 * adapters * F32;
        }
        plan.peak_bytes = plan.weights_bytes
            + plan.gradients_bytes
            + plan.optimizer_bytes
            + plan.gathered_bytes
            + plan.activations_bytes
            + plan.buffers_bytes
            + plan.runtime_bytes;
        plan
    }
}

impl MemoryPlan {
    /// One line for logs and messages: the peak and what makes it up, in GiB.
    pub fn summary(&self) -> String {
        format!(
            "{:.2} GiB peak per rank: weights {:.2}, gradients {:.2}, optimizer {:.2}, \
             gathered {:.2}, activations {:.2}, buffers {:.2}, runtime {:.2}",
            gib(self.peak_bytes),
            gib(self.weights_bytes),
            gib(self.gradients_bytes),
            gib(self.optimizer_bytes),
            gib(self.gathered_bytes),
            gib(self.activations_bytes),
            gib(self.buffers_bytes),
            gib(self.runtime_bytes),
        )
    }
}

/// `bytes` in GiB, for messages.
pub fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

/// The memory of one GPU of a product, as the nodes' `nvidia.com/gpu.product` label
/// names it: the known products' (what the driver reports as total), else the
/// "NNGB" in the name (read as GiB, as NVIDIA's names mean it). `None` when the name
/// says nothing of it.
pub fn gpu_memory_bytes(product: &str) -> Option<u64> {
    const MIB: u64 = 1 << 20;
    let known = [
        ("NVIDIA-H100-80GB-HBM3", 81_559),
        ("NVIDIA-H100-PCIe", 81_559),
        ("NVIDIA-H100-NVL", 95_830),
        ("NVIDIA-H200", 143_771),
        ("NVIDIA-GH200-480GB", 97_871),
        ("NVIDIA-A100-SXM4-80GB", 81_920),
        ("NVIDIA-A100-80GB-PCIe", 81_920),
        ("NVIDIA-A100-SXM4-40GB", 40_960),
        ("NVIDIA-A100-PCIE-40GB", 40_960),
        ("NVIDIA-L40S", 46_068),
        ("NVIDIA-L4", 23_034),
        ("NVIDIA-A10G", 23_028),
        ("Tesla-T4", 15_360),
    ];
    if let Some((_, mib)) = known
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(product))
    {
        return Some(mib * MIB);
    }
    product.split(['-', '_']).find_map(|part| {
        let digits = part
            .strip_suffix("GB")
            .or_else(|| part.strip_suffix("gb"))?;
        let gib: u64 = digits.parse().ok()?;
        (gib > 0).then_some(gib << 30)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full(shape: ModelShape, world: u64, sharding: Sharding) -> PlanInput {
        PlanInput {
            shape,
            method: Method::Full,
            sharding,
            world_size: world,
            seq_len: 2048,
            micro_batch: 1,
            recompute: false,
            lora_rank: 0,
            processor: Processor::Gpu,
            runtime_bytes: GPU_RUNTIME_BYTES,
        }
    }

    #[test]
    fn the_presets_have_the_published_parameter_counts() {
        let billions = |s: ModelShape| s.parameters() as f64 / 1e9;
        assert!((billions(ModelShape::LLAMA_3_1_8B) - 8.03).abs() < 0.01);
        assert!((billions(ModelShape::LLAMA_3_1_70B) - 70.55).abs() < 0.01);
        assert!((billions(ModelShape::LLAMA_3_2_1B) - 1.24).abs() < 0.01);
        assert!((billions(ModelShape::LLAMA_3_2_3B) - 3.21).abs() < 0.01);
        assert_eq!(
            ModelShape::known("meta-llama/Llama-3.1-8B-Instruct"),
            Some(ModelShape::LLAMA_3_1_8B)
        );
        assert_eq!(
            ModelShape::known("Meta-Llama-3.1-70B"),
            Some(ModelShape::LLAMA_3_1_70B)
        );
        assert_eq!(ModelShape::known("mistralai/Mistral-7B-v0.1"), None);
    }

    #[test]
    fn sharding_divides_the_state_by_the_world() {
        let one = full(ModelShape::LLAMA_3_1_8B, 1, Sharding::Full).plan();
        let gang = full(ModelShape::LLAMA_3_1_8B, 128, Sharding::Full).plan();
        let state = |p: &MemoryPlan| p.weights_bytes + p.gradients_bytes + p.optimizer_bytes;
        assert_eq!(state(&one), 16 * ModelShape::LLAMA_3_1_8B.parameters());
        let ratio = state(&gang) as f64 / state(&one) as f64;
        assert!((ratio - 1.0 / 128.0).abs() < 1e-4, "{ratio}");
        // Stage 1 shards the moments only: 8 + 8/W bytes a weight.
        let stage1 = full(ModelShape::LLAMA_3_1_8B, 128, Sharding::OptimizerState).plan();
        assert_eq!(
            stage1.weights_bytes,
            4 * ModelShape::LLAMA_3_1_8B.parameters()
        );
        assert_eq!(stage1.optimizer_bytes, 2 * gang.weights_bytes);
    }

    #[test]
    fn llama_8b_and_70b_fit_16_nodes_of_8_h100s_fully_sharded_but_not_replicated() {
        let h100 = gpu_memory_bytes("NVIDIA-H100-80GB-HBM3").expect("known");
        for shape in [ModelShape::LLAMA_3_1_8B, ModelShape::LLAMA_3_1_70B] {
            let mut input = full(shape, 128, Sharding::Full);
            input.micro_batch = 4;
            let plan = input.plan();
            assert!(plan.peak_bytes < h100, "{}", plan.summary());
            let replicated = full(shape, 128, Sharding::Replicated).plan();
            assert!(replicated.peak_bytes > h100, "{}", replicated.summary());
        }
    }

    #[test]
    fn recompute_keeps_block_inputs_instead_of_graphs() {
        let mut input = full(ModelShape::LLAMA_3_2_1B, 1, Sharding::Replicated);
        let graphs = input.plan().activations_bytes;
        input.recompute = true;
        assert!(input.plan().activations_bytes * 3 < graphs);
    }

    #[test]
    fn qlora_quantizes_the_linear_weights() {
        let a100 = gpu_memory_bytes("NVIDIA-A100-SXM4-80GB").expect("known");
        let mut input = full(ModelShape::LLAMA_3_1_70B, 1, Sharding::Full);
        input.method = Method::Lora;
        input.lora_rank = 16;
        let lora = input.fitted(Some(a100)).plan();
        assert!(lora.peak_bytes > a100, "{}", lora.summary());
        // 70B in 4 bits fits an A100 once blocks are recomputed, and only then.
        input.method = Method::Qlora;
        assert!(input.plan().peak_bytes > a100);
        let fitted = input.fitted(Some(a100));
        assert!(fitted.recompute);
        let qlora = fitted.plan();
        assert!(qlora.peak_bytes < a100, "{}", qlora.summary());
    }

    #[test]
    fn gpu_memory_comes_from_the_product_name() {
        assert_eq!(
            gpu_memory_bytes("NVIDIA-A100-SXM4-80GB"),
            Some(81_920 << 20)
        );
        assert_eq!(gpu_memory_bytes("nvidia-h200"), Some(143_771 << 20));
        assert_eq!(gpu_memory_bytes("NVIDIA-RTX-6000-48GB"), Some(48 << 30));
        assert_eq!(gpu_memory_bytes("NVIDIA-Mystery"), None);
    }
}
