//! A Llama-architecture decoder built from differentiable pieces, with LoRA adapters on
//! chosen linear layers.
//!
//! It reads a Hugging Face checkpoint directory (`config.json` and one or more
//! memory-mapped `*.safetensors` shards) and runs grouped-query attention with RoPE
//! (Llama 3 scaling included), RMSNorm and a SwiGLU MLP, with tied or untied
//! embeddings. Base weights are frozen: every base matmul goes through
//! [`crate::ops::frozen_linear`], so backward computes input gradients only. The one
//! trainable state is the set of [`LoraPair`]s.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor, Var};
use kubetune_crds::training::TargetModule;

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::lora::{AdapterPairs, DropoutKey, LoraPair, LoraSettings, dropout_mask};
use crate::nf4::{Nf4Weight, nf4_linear};
use crate::ops::{
    causal_softmax, cross_entropy_rows, linear, log_softmax_last_dim, rms_norm, rope,
};
use crate::rng::Rng;

/// The device the trainer computes on: with the `cuda` feature, the CUDA GPU of this
/// process' local rank (`KUBETUNE_LOCAL_RANK`, 0 when it is its pod's only rank; an
/// error when it cannot be opened), the CPU otherwise.
pub fn default_device() -> Result<Device> {
    #[cfg(feature = "cuda")]
    {
        let ordinal = crate::launch::local_rank()?;
        // Not `Device::cuda_if_available`: with the feature on it never falls back to the
        // CPU either, and its error would read as a failed tensor operation.
        Device::new_cuda(ordinal).map_err(|source| Error::Device { ordinal, source })
    }
    #[cfg(not(feature = "cuda"))]
    {
        Ok(Device::Cpu)
    }
}

/// The dtype of base weights and activations: bf16 on GPUs, f32 on CPUs (candle has no
/// bf16 matmul on CPU).
pub fn compute_dtype(dev: &Device) -> DType {
    if dev.is_cuda() {
        DType::BF16
    } else {
        DType::F32
    }
}

/// How the base model's linear weights are held.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BaseFormat {
    /// Frozen, in the compute dtype (LoRA, DPO).
    Frozen,
    /// Frozen, quantized to NF4 at load (QLoRA); embeddings, norms and the LM head stay
    /// in the compute dtype, as with bitsandbytes.
    Nf4 {
        /// Quantize the block maxima too.
        double_quant: bool,
    },
    /// Every weight loaded in f32, to become the trainable master weights of full
    /// fine-tuning ([`Llama::make_trainable`]); forward passes still compute in the
    /// compute dtype.
    Master,
}

/// A linear layer's base weight (cloning shares it).
#[derive(Clone, Debug)]
enum BaseWeight {
    /// `[out, in]` in the compute dtype.
    Dense(Tensor),
    /// `[out, in]` in NF4, dequantized on the fly.
    Nf4(Arc<Nf4Weight>),
}

/// A frozen linear layer, possibly with a bias and an adapter.
#[derive(Clone, Debug)]
pub struct Linear {
    weight: BaseWeight,
    bias: Option<Tensor>,
    /// The adapter, when this layer is a LoRA target.
    pub lora: Option<LoraPair>,
    module: TargetModule,
}

/// How a forward pass runs.
#[derive(Clone, Copy, Debug)]
pub struct Pass {
    /// Apply the adapters (false: the base model, e.g. DPO's reference or "base eval").
    pub adapters: bool,
    /// Dropout masks to draw, while training; `None` in evaluation.
    pub dropout: Option<DropoutKey>,
}

impl Pass {
    /// Evaluation with adapters on and no dropout.
    pub const EVAL: Self = Self {
        adapters: true,
        dropout: None,
    };
    /// The base model alone.
    pub const BASE: Self = Self {
        adapters: false,
        dropout: None,
    };
}

impl Linear {
    fn forward(&self, x: &Tensor, layer: usize, lora: &LoraSettings, pass: Pass) -> Result<Tensor> {
        let mut y = match &self.weight {
            BaseWeight::Dense(w) => linear(x, w)?,
            BaseWeight::Nf4(q) => nf4_linear(x, q)?,
        };
        if let Some(bias) = &self.bias {
            y = y.broadcast_add(&bias.to_dtype(y.dtype())?)?;
        }
        let Some(pair) = self.lora.as_ref().filter(|_| pass.adapters) else {
            return Ok(y);
        };
        let dims = x.dims().to_vec();
        let in_dim = dims[dims.len() - 1];
        let rows = x.elem_count() / in_dim;
        let mut xa = x.reshape((rows, in_dim))?.to_dtype(DType::F32)?;
        if let Some(key) = pass.dropout.filter(|_| lora.dropout > 0.0) {
            let mask = dropout_mask(
                key,
                layer,
                self.module,
                lora.dropout,
                (rows, in_dim),
                x.device(),
            )?;
            xa = (xa * mask)?;
        }
        let update = xa
            .matmul(&pair.a.as_tensor().t()?)?
            .matmul(&pair.b.as_tensor().t()?)?;
        let update = (update * lora.scaling())?.to_dtype(y.dtype())?;
        let shape = y.shape().clone();
        Ok((y + update.reshape(shape)?)?)
    }

    /// The weight with the adapter merged in: `W + s·B·A`.
    pub fn merged_weight(&self, scaling: f64) -> Result<Tensor> {
        let base = self.base_weight()?;
        match &self.lora {
            None => Ok(base),
            Some(pair) => {
                let delta = pair.delta(scaling)?.to_dtype(base.dtype())?;
                Ok((&base + delta)?)
            }
        }
    }

    /// The base weight `[out, in]` in the compute dtype (dequantized if it is NF4).
    pub fn base_weight(&self) -> Result<Tensor> {
        match &self.weight {
            BaseWeight::Dense(w) => Ok(w.clone()),
            BaseWeight::Nf4(q) => q.dequantize(),
        }
    }

    /// Replaces the weight by the merged one and drops the adapter.
    pub fn merge(&mut self, scaling: f64) -> Result<()> {
        self.weight = BaseWeight::Dense(self.merged_weight(scaling)?);
        self.lora = None;
        Ok(())
    }

    /// `[out, in]` of the base weight.
    pub fn dims(&self) -> Result<(usize, usize)> {
        match &self.weight {
            BaseWeight::Dense(w) => Ok(w.dims2()?),
            BaseWeight::Nf4(q) => Ok(q.dims()),
        }
    }

    /// Bytes the base weight occupies (codes and scales for NF4).
    pub fn base_bytes(&self) -> usize {
        match &self.weight {
            BaseWeight::Dense(w) => w.elem_count() * w.dtype().size_in_bytes(),
            BaseWeight::Nf4(q) => q.storage_bytes(),
        }
    }

    /// Whether the base weight is held in NF4.
    pub fn is_quantized(&self) -> bool {
        matches!(self.weight, BaseWeight::Nf4(_))
    }
}

/// The Hugging Face names and shapes of block `layer`'s tensors, in the order
/// [`Llama::make_trainable`] lists them: input norm, the seven linears (each weight,
/// then its bias where the architecture has one), post-attention norm.
pub fn block_tensors(config: &ModelConfig, layer: usize) -> Vec<(String, Vec<usize>)> {
    let p = format!("model.layers.{layer}");
    let (h, inter) = (config.hidden_size, config.intermediate_size);
    let q_out = config.num_attention_heads * config.head_dim();
    let kv_out = config.kv_heads() * config.head_dim();
    let mut specs = vec![(format!("{p}.input_layernorm.weight"), vec![h])];
    for (module, out, inp) in [
        (TargetModule::QProj, q_out, h),
        (TargetModule::KProj, kv_out, h),
        (TargetModule::VProj, kv_out, h),
        (TargetModule::OProj, h, q_out),
        (TargetModule::GateProj, inter, h),
        (TargetModule::UpProj, inter, h),
        (TargetModule::DownProj, h, inter),
    ] {
        let key = hf_key(layer, module);
        specs.push((format!("{key}.weight"), vec![out, inp]));
        let biased = matches!(
            module,
            TargetModule::QProj | TargetModule::KProj | TargetModule::VProj
        ) && config.qkv_bias();
        if biased {
            specs.push((format!("{key}.bias"), vec![out]));
        }
    }
    specs.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
    specs
}

/// One decoder block.
#[derive(Clone, Debug)]
pub struct Block {
    input_norm: Tensor,
    post_norm: Tensor,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    gate: Linear,
    up: Linear,
    down: Linear,
}

impl Block {
    /// Block `layer` of a model of `config` from its checkpoint tensors: `get(name,
    /// shape)` gives each by its Hugging Face name (see [`block_tensors`]), in the
    /// dtype it is to be held in; linear weights are quantized when `format` says so.
    pub fn assemble(
        config: &ModelConfig,
        layer: usize,
        format: BaseFormat,
        get: &mut dyn FnMut(&str, &[usize]) -> Result<Tensor>,
    ) -> Result<Self> {
        let p = format!("model.layers.{layer}");
        let (h, inter) = (config.hidden_size, config.intermediate_size);
        let q_out = config.num_attention_heads * config.head_dim();
        let kv_out = config.kv_heads() * config.head_dim();
        let qkv_bias = config.qkv_bias();
        let mut linear = |name: &str, module, out: usize, inp: usize, bias: bool| {
            let dense = get(&format!("{p}.{name}.weight"), &[out, inp])?;
            let weight = match format {
                BaseFormat::Frozen | BaseFormat::Master => BaseWeight::Dense(dense),
                BaseFormat::Nf4 { double_quant } => {
                    BaseWeight::Nf4(Arc::new(Nf4Weight::quantize(&dense, double_quant)?))
                }
            };
            let bias = if bias {
                Some(get(&format!("{p}.{name}.bias"), &[out])?)
            } else {
                None
            };
            Ok::<_, Error>(Linear {
                weight,
                bias,
                lora: None,
                module,
            })
        };
        let q = linear("self_attn.q_proj", TargetModule::QProj, q_out, h, qkv_bias)?;
        let k = linear("self_attn.k_proj", TargetModule::KProj, kv_out, h, qkv_bias)?;
        let v = linear("self_attn.v_proj", TargetModule::VProj, kv_out, h, qkv_bias)?;
        let o = linear("self_attn.o_proj", TargetModule::OProj, h, q_out, false)?;
        let gate = linear("mlp.gate_proj", TargetModule::GateProj, inter, h, false)?;
        let up = linear("mlp.up_proj", TargetModule::UpProj, inter, h, false)?;
        let down = linear("mlp.down_proj", TargetModule::DownProj, h, inter, false)?;
        Ok(Self {
            input_norm: get(&format!("{p}.input_layernorm.weight"), &[h])?,
            post_norm: get(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
            q,
            k,
            v,
            o,
            gate,
            up,
            down,
        })
    }

    /// The block's linear layers in checkpoint order.
    pub fn linears(&self) -> [&Linear; 7] {
        [
            &self.q, &self.k, &self.v, &self.o, &self.gate, &self.up, &self.down,
        ]
    }

    fn linears_mut(&mut self) -> [&mut Linear; 7] {
        [
            &mut self.q,
            &mut self.k,
            &mut self.v,
            &mut self.o,
            &mut self.gate,
            &mut self.up,
            &mut self.down,
        ]
    }

    /// The linear layer for a module name.
    pub fn linear(&self, module: TargetModule) -> &Linear {
        self.linears()[module as usize]
    }

    fn linear_mut(&mut self, module: TargetModule) -> &mut Linear {
        let index = module as usize;
        self.linears_mut()
            .into_iter()
            .nth(index)
            .expect("seven linears")
    }
}

/// Per-batch tensors the blocks share: RoPE tables and the causal mask.
#[derive(Debug)]
pub struct Positions {
    cos: Tensor,
    sin: Tensor,
    mask: Tensor,
}

/// A Llama-family decoder with optional LoRA adapters. Cloning shares the base
/// weights (candle tensors are reference-counted), so a clone with other adapters
/// costs only the adapters.
#[derive(Clone, Debug)]
pub struct Llama {
    /// The checkpoint's configuration.
    pub config: ModelConfig,
    /// The adapter settings.
    pub lora: LoraSettings,
    embed: Tensor,
    blocks: Vec<Block>,
    norm: Tensor,
    lm_head: Option<Tensor>,
    dtype: DType,
    device: Device,
    /// Full fine-tuning: every weight as a trainable f32 variable, by its Hugging Face
    /// name (the fields above hold the same tensors). Empty otherwise.
    full: Vec<(String, Var)>,
}

/// The safetensors shards of a checkpoint directory, in name order.
pub fn checkpoint_shards(model_dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(model_dir).map_err(|err| {
        if err.kind() == std::io::ErrorKind::NotFound {
            Error::invalid(format!(
                "model directory {} does not exist",
                model_dir.display()
            ))
        } else {
            Error::io("list", model_dir)(err)
        }
    })?;
    let mut shards = Vec::new();
    for entry in entries {
        let path = entry.map_err(Error::io("list", model_dir))?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if name.ends_with(".safetensors") && !name.starts_with("adapter_") {
            shards.push(path);
        }
    }
    shards.sort();
    if shards.is_empty() {
        return Err(Error::invalid(format!(
            "model directory {} has no *.safetensors weights",
            model_dir.display()
        )));
    }
    Ok(shards)
}

/// A checkpoint directory's safetensors, memory-mapped: tensors are read (and
/// converted) one at a time, by name.
pub(crate) struct Weights {
    st: MmapedSafetensors,
    dtype: DType,
    device: Device,
    dir: PathBuf,
}

impl Weights {
    /// Maps the weights of `model_dir`, to be read as `dtype` onto `device`.
    pub(crate) fn open(model_dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let shards = checkpoint_shards(model_dir)?;
        // SAFETY: the checkpoint files are mapped read-only and the trainer never writes
        // to them; a change by another process while mapped would be outside the
        // contract of a checkpoint directory (the operator mounts it read-only).
        #[allow(unsafe_code)]
        let st = unsafe { MmapedSafetensors::multi(&shards) }.map_err(|err| {
            Error::invalid(format!(
                "failed to read safetensors in {}: {err}",
                model_dir.display()
            ))
        })?;
        Ok(Self {
            st,
            dtype,
            device: device.clone(),
            dir: model_dir.to_owned(),
        })
    }

    /// Whether the checkpoint has a tensor `name`.
    pub(crate) fn has(&self, name: &str) -> bool {
        self.st.get(name).is_ok()
    }

    /// Tensor `name`, which must have `shape`.
    pub(crate) fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let tensor = self.st.load(name, &self.device).map_err(|_| {
            Error::invalid(format!(
                "checkpoint {} has no tensor {name}",
                self.dir.display()
            ))
        })?;
        if tensor.dims() != shape {
            return Err(Error::invalid(format!(
                "tensor {name} has shape {:?}, config.json implies {shape:?}",
                tensor.dims()
            )));
        }
        Ok(tensor.to_dtype(self.dtype)?)
    }
}

impl Llama {
    /// Loads a checkpoint directory onto `device` without adapters.
    pub fn load(model_dir: &Path, device: &Device) -> Result<Self> {
        Self::load_as(model_dir, device, BaseFormat::Frozen)
    }

    /// Loads a checkpoint directory with the base linear weights held as `format`, to
    /// compute in the device's dtype ([`compute_dtype`]).
    pub fn load_as(model_dir: &Path, device: &Device, format: BaseFormat) -> Result<Self> {
        Self::load_in(model_dir, device, format, compute_dtype(device))
    }

    /// [`Self::load_as`], computing in `dtype` (f32 or bf16).
    pub fn load_in(
        model_dir: &Path,
        device: &Device,
        format: BaseFormat,
        dtype: DType,
    ) -> Result<Self> {
        let config = ModelConfig::load(model_dir)?;
        let stored = match format {
            BaseFormat::Master => DType::F32,
            BaseFormat::Frozen | BaseFormat::Nf4 { .. } => dtype,
        };
        let w = Weights::open(model_dir, stored, device)?;
        let h = config.hidden_size;
        let embed = w.get("model.embed_tokens.weight", &[config.vocab_size, h])?;
        let mut blocks = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            blocks.push(Block::assemble(&config, i, format, &mut |name, shape| {
                w.get(name, shape)
            })?);
        }
        let norm = w.get("model.norm.weight", &[h])?;
        let lm_head = if config.tie_word_embeddings && !w.has("lm_head.weight") {
            None
        } else {
            Some(w.get("lm_head.weight", &[config.vocab_size, h])?)
        };
        let mut model = Self::shell(config, dtype, device)?;
        model.set_ends(embed, norm, lm_head);
        model.blocks = blocks;
        Ok(model)
    }

    /// A model of `config` holding no weights yet: what a sharded run (see
    /// [`crate::zero3`]) computes with, handing it the end weights it has gathered
    /// ([`Self::set_ends`]) and running the blocks it gathers one at a time
    /// ([`Self::forward_block`]).
    pub fn shell(config: ModelConfig, dtype: DType, device: &Device) -> Result<Self> {
        let none = Tensor::zeros(0, DType::F32, device)?;
        Ok(Self {
            config,
            lora: LoraSettings {
                rank: 0,
                alpha: 0.0,
                dropout: 0.0,
                rs_lora: false,
                targets: Vec::new(),
            },
            embed: none.clone(),
            blocks: Vec::new(),
            norm: none,
            lm_head: None,
            dtype,
            device: device.clone(),
            full: Vec::new(),
        })
    }

    /// Sets the weights outside the blocks: the embedding (also the LM head when
    /// `lm_head` is `None` and the embeddings are tied) and the final norm.
    pub fn set_ends(&mut self, embed: Tensor, norm: Tensor, lm_head: Option<Tensor>) {
        self.embed = embed;
        self.norm = norm;
        self.lm_head = lm_head;
    }

    /// Makes every weight trainable (full fine-tuning): each becomes an f32 [`Var`], the
    /// master weight, that forward passes cast to the compute dtype at each use and
    /// differentiate through with ordinary matmuls (mixed precision: bf16 compute with
    /// f32 master weights and gradients on GPUs, f32 throughout on CPUs). Load with
    /// [`BaseFormat::Master`] so the masters keep the checkpoint's precision. Adapters
    /// are not allowed alongside.
    pub fn make_trainable(&mut self) -> Result<()> {
        if self.blocks.iter().any(|b| {
            b.linears()
                .iter()
                .any(|l| l.lora.is_some() || l.is_quantized())
        }) {
            return Err(Error::invalid(
                "full fine-tuning needs a model without adapters or quantized weights",
            ));
        }
        let mut full = Vec::new();
        let mut make = |t: &mut Tensor, name: String| -> Result<()> {
            let var = Var::from_tensor(&t.to_dtype(DType::F32)?)?;
            *t = var.as_tensor().clone();
            full.push((name, var));
            Ok(())
        };
        make(&mut self.embed, "model.embed_tokens.weight".into())?;
        for (i, block) in self.blocks.iter_mut().enumerate() {
            let p = format!("model.layers.{i}");
            make(&mut block.input_norm, format!("{p}.input_layernorm.weight"))?;
            for linear in block.linears_mut() {
                let key = hf_key(i, linear.module);
                let BaseWeight::Dense(weight) = &mut linear.weight else {
                    unreachable!("quantized weights were refused above");
                };
                make(weight, format!("{key}.weight"))?;
                if let Some(bias) = &mut linear.bias {
                    make(bias, format!("{key}.bias"))?;
                }
            }
            make(
                &mut block.post_norm,
                format!("{p}.post_attention_layernorm.weight"),
            )?;
        }
        make(&mut self.norm, "model.norm.weight".into())?;
        if let Some(head) = &mut self.lm_head {
            make(head, "lm_head.weight".into())?;
        }
        self.full = full;
        Ok(())
    }

    /// Whether every weight is trainable ([`Self::make_trainable`]).
    pub fn is_full(&self) -> bool {
        !self.full.is_empty()
    }

    /// Every weight with its Hugging Face name, after [`Self::make_trainable`]; in
    /// checkpoint order (embedding, blocks, final norm, LM head unless tied).
    pub fn full_params(&self) -> Vec<(String, &Var)> {
        self.full.iter().map(|(k, v)| (k.clone(), v)).collect()
    }

    /// What the optimizer trains: every weight after [`Self::make_trainable`], the
    /// adapters otherwise.
    pub fn trainable_params(&self) -> Vec<(String, &Var)> {
        if self.is_full() {
            self.full_params()
        } else {
            self.lora_params()
        }
    }

    /// The device the model lives on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The decoder blocks.
    pub fn blocks(&self) -> &[Block] {
        &self.blocks
    }

    /// Bytes held by the base linear weights of every block (NF4 codes and scales
    /// when quantized).
    pub fn base_linear_bytes(&self) -> usize {
        self.blocks
            .iter()
            .flat_map(|b| b.linears())
            .map(Linear::base_bytes)
            .sum()
    }

    /// Replaces NF4 base weights by their dequantized dense values.
    pub fn dequantize_base(&mut self) -> Result<()> {
        for block in &mut self.blocks {
            for linear in block.linears_mut() {
                if linear.is_quantized() {
                    linear.weight = BaseWeight::Dense(linear.base_weight()?);
                }
            }
        }
        Ok(())
    }

    /// Adds fresh adapters (PEFT's init) to every target module of every block. The
    /// draws for A come from `rng` in block then module order.
    pub fn add_lora(&mut self, settings: LoraSettings, rng: &mut Rng) -> Result<()> {
        for (i, block) in self.blocks.iter_mut().enumerate() {
            for &module in &settings.targets {
                let linear = block.linear_mut(module);
                let (out, inp) = linear.dims()?;
                if settings.rank == 0 || settings.rank > out.min(inp) {
                    return Err(Error::invalid(format!(
                        "LoRA rank {} does not fit layer {i} {} of shape [{out}, {inp}]: it must be between 1 and {}",
                        settings.rank,
                        module.as_str(),
                        out.min(inp)
                    )));
                }
                linear.lora = Some(LoraPair::init(inp, out, settings.rank, rng, &self.device)?);
            }
        }
        self.lora = settings;
        Ok(())
    }

    /// Sets adapters from tensors named by (layer, module), replacing any present.
    pub fn set_lora(&mut self, settings: LoraSettings, pairs: AdapterPairs) -> Result<()> {
        for block in &mut self.blocks {
            for linear in block.linears_mut() {
                linear.lora = None;
            }
        }
        for (layer, module, pair) in pairs {
            let block = self.blocks.get_mut(layer).ok_or_else(|| {
                Error::invalid(format!(
                    "adapter has layer {layer}, the model has fewer layers"
                ))
            })?;
            let linear = block.linear_mut(module);
            let (out, inp) = linear.dims()?;
            let a = pair.a.as_tensor().dims2()?;
            let b = pair.b.as_tensor().dims2()?;
            if a != (settings.rank, inp) || b != (out, settings.rank) {
                return Err(Error::invalid(format!(
                    "adapter for layer {layer} {} has A {a:?} and B {b:?}, expected A [{}, {inp}] and B [{out}, {}]",
                    module.as_str(),
                    settings.rank,
                    settings.rank
                )));
            }
            linear.lora = Some(pair);
        }
        self.lora = settings;
        Ok(())
    }

    /// Every adapter tensor with its PEFT key, in a fixed order (layer, module, A then B).
    pub fn lora_params(&self) -> Vec<(String, &Var)> {
        let mut params = Vec::new();
        for (i, block) in self.blocks.iter().enumerate() {
            for linear in block.linears() {
                if let Some(pair) = &linear.lora {
                    let key = peft_key(i, linear.module);
                    params.push((format!("{key}.lora_A.weight"), &pair.a));
                    params.push((format!("{key}.lora_B.weight"), &pair.b));
                }
            }
        }
        params
    }

    /// Folds every adapter into its base weight (`W + s·B·A`).
    pub fn merge_lora(&mut self) -> Result<()> {
        let scaling = self.lora.scaling();
        for block in &mut self.blocks {
            for linear in block.linears_mut() {
                linear.merge(scaling)?;
            }
        }
        Ok(())
    }

    /// Token embeddings `[batch, seq, hidden]` of `ids` (`[batch, seq]`, u32).
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let flat = self
            .embed
            .index_select(&ids.flatten_all()?, 0)?
            .to_dtype(self.dtype)?;
        Ok(flat.reshape((b, t, self.config.hidden_size))?)
    }

    /// RoPE tables and the causal (optionally sliding-window) mask for `seq` positions.
    pub fn positions(&self, seq: usize) -> Result<Positions> {
        let inv_freq = self.config.inv_freq();
        let half = inv_freq.len();
        let mut cos = Vec::with_capacity(seq * half * 2);
        let mut sin = Vec::with_capacity(seq * half * 2);
        for pos in 0..seq {
            for _half in 0..2 {
                for f in &inv_freq {
                    let angle = pos as f64 * f;
                    cos.push(angle.cos() as f32);
                    sin.push(angle.sin() as f32);
                }
            }
        }
        let window = self.config.sliding_window.unwrap_or(usize::MAX);
        let mask: Vec<f32> = (0..seq * seq)
            .map(|ij| {
                let (i, j) = (ij / seq, ij % seq);
                if j > i || i - j >= window {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        let dev = &self.device;
        Ok(Positions {
            cos: Tensor::from_vec(cos, (seq, half * 2), dev)?.to_dtype(self.dtype)?,
            sin: Tensor::from_vec(sin, (seq, half * 2), dev)?.to_dtype(self.dtype)?,
            mask: Tensor::from_vec(mask, (seq, seq), dev)?.to_dtype(self.dtype)?,
        })
    }

    /// Runs block `index` on `x` (`[batch, seq, hidden]`).
    pub fn block_forward(
        &self,
        index: usize,
        x: &Tensor,
        pos: &Positions,
        pass: Pass,
    ) -> Result<Tensor> {
        self.forward_block(&self.blocks[index], index, x, pos, pass)
    }

    /// Runs `block`, as block `index` of this model, on `x`: the blocks of a sharded
    /// model exist only while their parameters are gathered.
    pub fn forward_block(
        &self,
        block: &Block,
        index: usize,
        x: &Tensor,
        pos: &Positions,
        pass: Pass,
    ) -> Result<Tensor> {
        let cfg = &self.config;
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, hd) = (cfg.num_attention_heads, cfg.kv_heads(), cfg.head_dim());
        let lin = |l: &Linear, x: &Tensor| l.forward(x, index, &self.lora, pass);

        let h = rms_norm(x, &block.input_norm, cfg.rms_norm_eps)?;
        let q = lin(&block.q, &h)?
            .reshape((b, t, nh, hd))?
            .transpose(1, 2)?;
        let k = lin(&block.k, &h)?
            .reshape((b, t, nkv, hd))?
            .transpose(1, 2)?;
        let v = lin(&block.v, &h)?
            .reshape((b, t, nkv, hd))?
            .transpose(1, 2)?;
        let q = rope(&q.contiguous()?, &pos.cos, &pos.sin)?;
        let k = rope(&k.contiguous()?, &pos.cos, &pos.sin)?;
        let (k, v) = if nh == nkv {
            (k, v.contiguous()?)
        } else {
            let rep = nh / nkv;
            let expand = |x: &Tensor| -> Result<Tensor> {
                Ok(x.unsqueeze(2)?
                    .broadcast_as((b, nkv, rep, t, hd))?
                    .reshape((b, nh, t, hd))?)
            };
            (expand(&k)?, expand(&v)?)
        };
        let scores = q.matmul(&k.t()?)?;
        let window = cfg.sliding_window.unwrap_or(usize::MAX);
        let probs = causal_softmax(&scores, 1.0 / (hd as f64).sqrt(), window, &pos.mask)?;
        let attn = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((b, t, nh * hd))?;
        let x = (x + lin(&block.o, &attn)?)?;

        let h = rms_norm(&x, &block.post_norm, cfg.rms_norm_eps)?;
        let gated = (lin(&block.gate, &h)?.silu()? * lin(&block.up, &h)?)?;
        Ok((&x + lin(&block.down, &gated)?)?)
    }

    /// Summed cross-entropy (f32 scalar) of the hidden states `h` (`[batch, seq,
    /// hidden]`, the last block's output) predicting `targets` at the flattened
    /// positions `rows`. Only those rows go through the final norm and the LM head, so
    /// prompt and padding positions cost nothing.
    ///
    /// On the CPU the fused cross-entropy keeps one `[rows, vocab]` tensor for backward;
    /// elsewhere [`Self::head_loss_sum_chunked`] keeps none.
    pub fn head_loss_sum(&self, h: &Tensor, rows: &Tensor, targets: &Tensor) -> Result<Tensor> {
        if h.device().is_cpu() {
            return Ok(self.head_loss_rows(h, rows, targets)?.sum_all()?);
        }
        self.head_loss_sum_chunked(h, rows, targets, HEAD_CHUNK_ROWS)
    }

    /// [`Self::head_loss_sum`] that never holds more than `chunk` rows of logits: the
    /// logits, their softmax and the loss's gradient with respect to them are computed
    /// chunk by chunk outside the autograd graph, which is handed only what backward
    /// needs — the gradients `(softmax − onehot)·W` for the rows' final-norm outputs
    /// and, when the LM head trains, `Σ (softmax − onehot)ᵀ·x` for its weight — through
    /// a term that adds zero to the loss and exactly those gradients to backward. A
    /// composed cross-entropy keeps several f32 `[rows, vocab]` tensors until backward
    /// (8 GB each for 16k rows of a 128k vocabulary). Exact for a summed loss, whose
    /// every row's gradient has the same weight; DPO's per-row log-probabilities use
    /// [`Self::head_loss_rows`].
    pub fn head_loss_sum_chunked(
        &self,
        h: &Tensor,
        rows: &Tensor,
        targets: &Tensor,
        chunk: usize,
    ) -> Result<Tensor> {
        let hidden = self.config.hidden_size;
        let flat = h.reshape((h.elem_count() / hidden, hidden))?;
        let normed = rms_norm(
            &flat.index_select(rows, 0)?,
            &self.norm,
            self.config.rms_norm_eps,
        )?;
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        let w = head.to_dtype(normed.dtype())?.detach();
        let x = normed.detach();
        let n = x.dim(0)?;
        let device = x.device();
        let chunk = chunk.max(1);
        let mut loss = Tensor::zeros((), DType::F32, device)?;
        let mut grad_x = Vec::with_capacity(n.div_ceil(chunk));
        let mut grad_w: Option<Tensor> = None;
        // Evaluation passes detached states and, but for full fine-tuning, a frozen
        // head: only the loss is needed.
        let (wants_x, wants_w) = (normed.track_op(), head.is_variable());
        for start in (0..n).step_by(chunk) {
            let len = chunk.min(n - start);
            let xc = x.narrow(0, start, len)?;
            let tc = targets.narrow(0, start, len)?.unsqueeze(1)?;
            let logp = log_softmax_last_dim(&xc.matmul(&w.t()?)?.to_dtype(DType::F32)?)?;
            loss = (loss - logp.gather(&tc, 1)?.sum_all()?)?;
            if !wants_x && !wants_w {
                continue;
            }
            // ∂loss/∂logits = softmax − onehot(target).
            let minus_one = Tensor::full(-1f32, (len, 1), device)?;
            let dlogits = logp
                .exp()?
                .scatter_add(&tc, &minus_one, 1)?
                .to_dtype(w.dtype())?;
            if wants_x {
                grad_x.push(dlogits.matmul(&w)?);
            }
            if wants_w {
                let gw = dlogits.t()?.matmul(&xc)?.to_dtype(DType::F32)?;
                grad_w = Some(match grad_w {
                    Some(sum) => (sum + gw)?,
                    None => gw,
                });
            }
        }
        let mut surrogate = Tensor::zeros((), DType::F32, device)?;
        if !grad_x.is_empty() {
            let grad_x = Tensor::cat(&grad_x, 0)?;
            surrogate = (surrogate + (&normed * &grad_x)?.to_dtype(DType::F32)?.sum_all()?)?;
        }
        if let Some(grad_w) = grad_w {
            surrogate = (surrogate + (head.to_dtype(DType::F32)? * grad_w)?.sum_all()?)?;
        }
        Ok(((surrogate.detach().neg()? + surrogate)? + loss)?)
    }

    /// The cross-entropy (f32 `[n]`) of each target at the flattened positions `rows`
    /// of the hidden states `h`: minus the log-probability of each target token.
    pub fn head_loss_rows(&self, h: &Tensor, rows: &Tensor, targets: &Tensor) -> Result<Tensor> {
        let hidden = self.config.hidden_size;
        let flat = h.reshape((h.elem_count() / hidden, hidden))?;
        let picked = flat.index_select(rows, 0)?;
        let normed = rms_norm(&picked, &self.norm, self.config.rms_norm_eps)?;
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        let logits = linear(&normed, head)?.to_dtype(DType::F32)?;
        cross_entropy_rows(&logits, targets)
    }

    /// Logits `[batch, seq, vocab]` (f32) of a full forward pass, for inspection and tests.
    pub fn logits(&self, ids: &Tensor, pass: Pass) -> Result<Tensor> {
        let (_, t) = ids.dims2()?;
        let pos = self.positions(t)?;
        let mut x = self.embed(ids)?;
        for i in 0..self.blocks.len() {
            x = self.block_forward(i, &x, &pos, pass)?;
        }
        self.head_logits(&x)
    }

    /// Logits (f32) of hidden states `h` (`[..., hidden]`, the last block's output):
    /// the final norm and the LM head.
    pub fn head_logits(&self, h: &Tensor) -> Result<Tensor> {
        let normed = rms_norm(h, &self.norm, self.config.rms_norm_eps)?;
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        Ok(linear(&normed, head)?.to_dtype(DType::F32)?)
    }
}

/// Rows of logits [`Llama::head_loss_sum_chunked`] computes at once off the CPU: 1024
/// rows of a 128k vocabulary are 512 MiB of f32 per tensor.
pub const HEAD_CHUNK_ROWS: usize = 1024;

/// PEFT's key prefix for a module of a layer, e.g.
/// `base_model.model.model.layers.0.self_attn.q_proj`.
pub fn peft_key(layer: usize, module: TargetModule) -> String {
    format!("base_model.model.{}", hf_key(layer, module))
}

/// The Hugging Face checkpoint name of a module of a layer, e.g.
/// `model.layers.0.self_attn.q_proj`.
pub fn hf_key(layer: usize, module: TargetModule) -> String {
    let group = match module {
        TargetModule::QProj | TargetModule::KProj | TargetModule::VProj | TargetModule::OProj => {
            "self_attn"
        }
        TargetModule::GateProj | TargetModule::UpProj | TargetModule::DownProj => "mlp",
    };
    format!("model.layers.{layer}.{group}.{}", module.as_str())
}

/// Keys and values (after RoPE, before grouped-query expansion) of the positions a
/// [`Llama`] has already run, one pair per block, so that generation runs each new
/// token alone instead of the whole prefix again. Inference only.
#[derive(Clone, Debug, Default)]
pub struct KvCache {
    layers: Vec<(Tensor, Tensor)>,
}

impl KvCache {
    /// Positions cached.
    pub fn len(&self) -> usize {
        self.layers
            .first()
            .map_or(0, |(k, _)| k.dims().get(2).copied().unwrap_or(0))
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Llama {
    /// Logits (f32, `[vocab]`) of the token after `ids`, which continue the positions
    /// in `cache` (an empty cache: `ids` is the whole prompt); appends their keys and
    /// values to `cache`. Adapters on, no dropout: the last row of [`Self::logits`] on
    /// the whole sequence, computed incrementally.
    pub fn next_logits_cached(&self, ids: &[u32], cache: &mut KvCache) -> Result<Tensor> {
        let cfg = &self.config;
        let (nh, nkv, hd) = (cfg.num_attention_heads, cfg.kv_heads(), cfg.head_dim());
        let (offset, t) = (cache.len(), ids.len());
        let total = offset + t;
        let dev = &self.device;
        let inv_freq = cfg.inv_freq();
        let mut cos = Vec::with_capacity(t * hd);
        let mut sin = Vec::with_capacity(t * hd);
        for pos in offset..total {
            for _half in 0..2 {
                for f in &inv_freq {
                    let angle = pos as f64 * f;
                    cos.push(angle.cos() as f32);
                    sin.push(angle.sin() as f32);
                }
            }
        }
        let width = inv_freq.len() * 2;
        let cos = Tensor::from_vec(cos, (t, width), dev)?.to_dtype(self.dtype)?;
        let sin = Tensor::from_vec(sin, (t, width), dev)?.to_dtype(self.dtype)?;
        // Row i (position offset + i) sees keys 0..=offset + i within the window.
        let window = cfg.sliding_window.unwrap_or(usize::MAX);
        let masked = |i: usize, j: usize| j > offset + i || offset + i - j >= window;
        let mask = if (0..t).any(|i| (0..total).any(|j| masked(i, j))) {
            let values: Vec<f32> = (0..t * total)
                .map(|ij| {
                    if masked(ij / total, ij % total) {
                        f32::NEG_INFINITY
                    } else {
                        0.0
                    }
                })
                .collect();
            Some(Tensor::from_vec(values, (t, total), dev)?.to_dtype(self.dtype)?)
        } else {
            None
        };
        let scale = 1.0 / (hd as f64).sqrt();
        let input = Tensor::from_slice(ids, (1, t), dev)?;
        let mut x = self.embed(&input)?;
        for (index, block) in self.blocks.iter().enumerate() {
            let lin = |l: &Linear, x: &Tensor| l.forward(x, index, &self.lora, Pass::EVAL);
            let h = rms_norm(&x, &block.input_norm, cfg.rms_norm_eps)?;
            let q = lin(&block.q, &h)?
                .reshape((1, t, nh, hd))?
                .transpose(1, 2)?;
            let k = lin(&block.k, &h)?
                .reshape((1, t, nkv, hd))?
                .transpose(1, 2)?;
            let v = lin(&block.v, &h)?
                .reshape((1, t, nkv, hd))?
                .transpose(1, 2)?
                .contiguous()?;
            let q = rope(&q.contiguous()?, &cos, &sin)?;
            let k = rope(&k.contiguous()?, &cos, &sin)?;
            let (k, v) = match cache.layers.get(index) {
                Some((past_k, past_v)) => (
                    Tensor::cat(&[past_k, &k], 2)?,
                    Tensor::cat(&[past_v, &v], 2)?,
                ),
                None => (k, v),
            };
            if index < cache.layers.len() {
                cache.layers[index] = (k.clone(), v.clone());
            } else {
                cache.layers.push((k.clone(), v.clone()));
            }
            let (k, v) = if nh == nkv {
                (k, v)
            } else {
                let rep = nh / nkv;
                let expand = |x: &Tensor| -> Result<Tensor> {
                    Ok(x.unsqueeze(2)?
                        .broadcast_as((1, nkv, rep, total, hd))?
                        .reshape((1, nh, total, hd))?)
                };
                (expand(&k)?, expand(&v)?)
            };
            let mut scores = (q.matmul(&k.t()?)? * scale)?;
            if let Some(mask) = &mask {
                scores = scores.broadcast_add(mask)?;
            }
            let probs = crate::ops::softmax_last_dim(&scores)?;
            let attn = probs
                .matmul(&v)?
                .transpose(1, 2)?
                .reshape((1, t, nh * hd))?;
            x = (&x + lin(&block.o, &attn)?)?;
            let h = rms_norm(&x, &block.post_norm, cfg.rms_norm_eps)?;
            let gated = (lin(&block.gate, &h)?.silu()? * lin(&block.up, &h)?)?;
            x = (&x + lin(&block.down, &gated)?)?;
        }
        let last = x.narrow(1, t - 1, 1)?;
        Ok(self.head_logits(&last)?.flatten_all()?)
    }
}
