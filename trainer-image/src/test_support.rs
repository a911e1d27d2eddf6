//! Fixtures for tests and benchmarks: a tiny random Llama written in the real on-disk
//! formats (config.json, sharded safetensors, tokenizer.json built with the
//! `tokenizers` API, tokenizer_config.json with a ChatML template) or as the GGUF file
//! llama.cpp's converter would write, and JSONL datasets. Nothing is downloaded.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use candle_core::{Device, Tensor};
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, Tokenizer};

use crate::error::{Error, Result};
use crate::rng::Rng;

/// The special tokens the fixture tokenizer adds after its 256 byte tokens.
pub const SPECIAL_TOKENS: [&str; 4] = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"];

/// A ChatML chat template (as SmolLM2 and Qwen2 use).
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] | trim }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// Shape of a fixture model.
#[derive(Clone, Debug, PartialEq)]
pub struct TinyLlama {
    /// Residual width.
    pub hidden: usize,
    /// MLP width.
    pub intermediate: usize,
    /// Blocks.
    pub layers: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Vocabulary (at least 260: bytes plus the special tokens).
    pub vocab: usize,
    /// Tie the LM head to the embedding.
    pub tie_embeddings: bool,
    /// Write Llama 3 rope scaling into config.json.
    pub llama3_rope: bool,
    /// Number of safetensors shards.
    pub shards: usize,
    /// Standard deviation of the random linear weights.
    pub init_std: f64,
    /// Standard deviation of the embedding and LM head. Larger than `init_std` so
    /// that, as in trained models, logits can become confident (the head is frozen).
    pub embed_std: f64,
    /// Seed of the random weights.
    pub seed: u64,
    /// Write a Qwen2 checkpoint (q/k/v biases) instead of a Llama one.
    pub qwen2: bool,
}

impl Default for TinyLlama {
    fn default() -> Self {
        Self {
            hidden: 32,
            intermediate: 64,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            vocab: 264,
            tie_embeddings: false,
            llama3_rope: true,
            shards: 2,
            init_std: 0.1,
            embed_std: 0.5,
            seed: 7,
            qwen2: false,
        }
    }
}

fn io<'a>(path: &'a Path) -> impl FnOnce(std::io::Error) -> Error + 'a {
    Error::io("write", path)
}

impl TinyLlama {
    /// Parameter count of the base model.
    pub fn parameters(&self) -> usize {
        let hd = self.hidden / self.heads;
        let attn = self.hidden * (self.heads * hd) * 2 + self.hidden * (self.kv_heads * hd) * 2;
        let mlp = 3 * self.hidden * self.intermediate;
        let embed = self.vocab * self.hidden * if self.tie_embeddings { 1 } else { 2 };
        self.layers * (attn + mlp + 2 * self.hidden) + embed + self.hidden
    }

    /// The `config.json` of the model.
    pub fn config_json(&self) -> serde_json::Value {
        let mut config = serde_json::json!({
            "architectures": [if self.qwen2 { "Qwen2ForCausalLM" } else { "LlamaForCausalLM" }],
            "model_type": if self.qwen2 { "qwen2" } else { "llama" },
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "vocab_size": self.vocab,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "max_position_embeddings": 2048,
            "tie_word_embeddings": self.tie_embeddings,
            "hidden_act": "silu",
            "bos_token_id": 256,
            "eos_token_id": 257,
            "torch_dtype": "float32"
        });
        if self.llama3_rope {
            config["rope_scaling"] = serde_json::json!({
                "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64
            });
        }
        config
    }

    /// Random weights named as in a Hugging Face Llama checkpoint.
    pub fn weights(&self) -> Result<Vec<(String, Tensor)>> {
        let dev = Device::Cpu;
        let mut rng = Rng::new(self.seed);
        let mut random = |shape: (usize, usize), std: f64| -> Result<Tensor> {
            // Sum of uniforms: close enough to a normal for random weights.
            let values: Vec<f32> = (0..shape.0 * shape.1)
                .map(|_| {
                    let s: f64 = (0..4).map(|_| rng.next_f64() - 0.5).sum();
                    (s * std * 3f64.sqrt()) as f32
                })
                .collect();
            Ok(Tensor::from_vec(values, shape, &dev)?)
        };
        let hd = self.hidden / self.heads;
        let (h, q, kv, i) = (
            self.hidden,
            self.heads * hd,
            self.kv_heads * hd,
            self.intermediate,
        );
        let mut tensors = vec![(
            "model.embed_tokens.weight".to_owned(),
            random((self.vocab, h), self.embed_std)?,
        )];
        for l in 0..self.layers {
            let p = format!("model.layers.{l}");
            for (name, shape) in [
                ("self_attn.q_proj", (q, h)),
                ("self_attn.k_proj", (kv, h)),
                ("self_attn.v_proj", (kv, h)),
                ("self_attn.o_proj", (h, q)),
                ("mlp.gate_proj", (i, h)),
                ("mlp.up_proj", (i, h)),
                ("mlp.down_proj", (h, i)),
            ] {
                tensors.push((format!("{p}.{name}.weight"), random(shape, self.init_std)?));
                if self.qwen2 && name.starts_with("self_attn.") && name != "self_attn.o_proj" {
                    let bias = random((1, shape.0), self.init_std)?.flatten_all()?;
                    tensors.push((format!("{p}.{name}.bias"), bias));
                }
            }
            let ones = || Tensor::ones(h, candle_core::DType::F32, &dev);
            tensors.push((format!("{p}.input_layernorm.weight"), ones()?));
            tensors.push((format!("{p}.post_attention_layernorm.weight"), ones()?));
        }
        tensors.push((
            "model.norm.weight".to_owned(),
            Tensor::ones(h, candle_core::DType::F32, &dev)?,
        ));
        if !self.tie_embeddings {
            tensors.push((
                "lm_head.weight".to_owned(),
                random((self.vocab, h), self.embed_std)?,
            ));
        }
        Ok(tensors)
    }

    /// Writes the whole checkpoint directory.
    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let config_path = dir.join("config.json");
        let config = serde_json::to_vec_pretty(&self.config_json()).expect("config serialises");
        std::fs::write(&config_path, config).map_err(io(&config_path))?;
        let weights = self.weights()?;
        let shards = self.shards.max(1);
        let per_shard = weights.len().div_ceil(shards);
        let mut index = serde_json::Map::new();
        for (s, chunk) in weights.chunks(per_shard).enumerate() {
            let name = format!("model-{:05}-of-{:05}.safetensors", s + 1, shards);
            let map: HashMap<String, Tensor> = chunk.iter().cloned().collect();
            for key in map.keys() {
                index.insert(key.clone(), serde_json::Value::String(name.clone()));
            }
            let path = dir.join(&name);
            candle_core::safetensors::save(&map, &path)?;
        }
        let index_path = dir.join("model.safetensors.index.json");
        let index = serde_json::json!({"metadata": {}, "weight_map": index});
        std::fs::write(&index_path, index.to_string()).map_err(io(&index_path))?;
        write_tokenizer(dir)?;
        Ok(())
    }
}

/// The merges of the fixture's GGUF vocabulary; their results follow the byte tokens and
/// [`SPECIAL_TOKENS`] in the vocabulary.
pub const GGUF_MERGES: [&str; 4] = ["Ġ t", "h e", "Ġt he", "i n"];

/// GGUF's names for the linear weights of a block, with the Hugging Face ones.
const GGUF_BLOCK_TENSORS: [(&str, &str); 9] = [
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
    ("attn_norm", "input_layernorm"),
    ("ffn_norm", "post_attention_layernorm"),
];

/// llama.cpp's `LlamaModel.permute` (convert_hf_to_gguf.py): each head's rows
/// reshaped `(heads, 2, head_dim/2, in)`, the middle axes swapped.
pub fn llama_cpp_permute(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    Ok(w.reshape((heads, 2, rows / heads / 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))?)
}

impl TinyLlama {
    /// The GGUF metadata llama.cpp's converter writes for this model: `llama.*`
    /// hyperparameters and a `gpt2` tokenizer whose vocabulary is the 256 byte tokens
    /// (ids as in [`write_tokenizer`]), the special tokens (control), the results of
    /// [`GGUF_MERGES`] and unused fillers up to the vocabulary size; EOS `<|im_end|>`,
    /// the ChatML template.
    pub fn gguf_metadata(&self) -> Result<Vec<(String, Value)>> {
        let mut alphabet: Vec<char> = ByteLevel::alphabet().into_iter().collect();
        alphabet.sort_unstable();
        let mut tokens: Vec<String> = alphabet.iter().map(|c| c.to_string()).collect();
        let mut types = vec![1i32; tokens.len()];
        for special in SPECIAL_TOKENS {
            tokens.push(special.to_owned());
            types.push(3);
        }
        for merge in GGUF_MERGES {
            tokens.push(merge.replace(' ', ""));
            types.push(1);
        }
        if tokens.len() > self.vocab {
            return Err(Error::invalid(format!(
                "the GGUF fixture needs a vocabulary of at least {}",
                tokens.len()
            )));
        }
        while tokens.len() < self.vocab {
            tokens.push(format!("<unused{}>", tokens.len()));
            types.push(5);
        }
        if self.llama3_rope || self.qwen2 {
            return Err(Error::invalid(
                "GGUF fixtures are plain llama models (no llama3 RoPE, no Qwen2 biases)",
            ));
        }
        let id = |t: &str| -> u32 {
            tokens
                .iter()
                .position(|x| x == t)
                .expect("a special token is in the vocabulary") as u32
        };
        let strings =
            |items: Vec<String>| Value::Array(items.into_iter().map(Value::String).collect());
        let u32_of = |n: usize| Value::U32(n as u32);
        Ok(vec![
            ("general.architecture".into(), Value::String("llama".into())),
            ("general.name".into(), Value::String("tiny".into())),
            ("llama.block_count".into(), u32_of(self.layers)),
            ("llama.context_length".into(), u32_of(2048)),
            ("llama.embedding_length".into(), u32_of(self.hidden)),
            (
                "llama.feed_forward_length".into(),
                u32_of(self.intermediate),
            ),
            ("llama.attention.head_count".into(), u32_of(self.heads)),
            (
                "llama.attention.head_count_kv".into(),
                u32_of(self.kv_heads),
            ),
            ("llama.rope.freq_base".into(), Value::F32(10_000.0)),
            (
                "llama.attention.layer_norm_rms_epsilon".into(),
                Value::F32(1e-5),
            ),
            ("llama.vocab_size".into(), u32_of(self.vocab)),
            (
                "llama.rope.dimension_count".into(),
                u32_of(self.hidden / self.heads),
            ),
            ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
            ("tokenizer.ggml.pre".into(), Value::String("smollm".into())),
            ("tokenizer.ggml.add_bos_token".into(), Value::Bool(false)),
            (
                "tokenizer.ggml.token_type".into(),
                Value::Array(types.into_iter().map(Value::I32).collect()),
            ),
            (
                "tokenizer.ggml.merges".into(),
                strings(GGUF_MERGES.iter().map(|m| m.to_string()).collect()),
            ),
            ("tokenizer.ggml.bos_token_id".into(), Value::U32(id("<s>"))),
            (
                "tokenizer.ggml.eos_token_id".into(),
                Value::U32(id("<|im_end|>")),
            ),
            (
                "tokenizer.ggml.padding_token_id".into(),
                Value::U32(id("</s>")),
            ),
            (
                "tokenizer.chat_template".into(),
                Value::String(CHATML_TEMPLATE.into()),
            ),
            ("tokenizer.ggml.tokens".into(), strings(tokens)),
        ])
    }

    /// The model's weights under GGUF names as llama.cpp's converter writes them: q and
    /// k rows permuted ([`llama_cpp_permute`]), linear weights as `linear`, the
    /// embedding and LM head as `embedding`, norms in f32.
    pub fn gguf_tensors(
        &self,
        linear: GgmlDType,
        embedding: GgmlDType,
    ) -> Result<Vec<(String, QTensor)>> {
        let weights: HashMap<String, Tensor> = self.weights()?.into_iter().collect();
        let get = |name: &str| {
            weights
                .get(name)
                .cloned()
                .ok_or_else(|| Error::invalid(format!("fixture has no {name}")))
        };
        let mut out = vec![(
            "token_embd.weight".to_owned(),
            QTensor::quantize(&get("model.embed_tokens.weight")?, embedding)?,
        )];
        for i in 0..self.layers {
            for (gguf, hf) in GGUF_BLOCK_TENSORS {
                let mut w = get(&format!("model.layers.{i}.{hf}.weight"))?;
                let dtype = if w.rank() == 1 {
                    GgmlDType::F32
                } else {
                    linear
                };
                if gguf == "attn_q" {
                    w = llama_cpp_permute(&w, self.heads)?;
                } else if gguf == "attn_k" {
                    w = llama_cpp_permute(&w, self.kv_heads)?;
                }
                out.push((
                    format!("blk.{i}.{gguf}.weight"),
                    QTensor::quantize(&w, dtype)?,
                ));
            }
        }
        out.push((
            "output_norm.weight".to_owned(),
            QTensor::quantize(&get("model.norm.weight")?, GgmlDType::F32)?,
        ));
        if !self.tie_embeddings {
            out.push((
                "output.weight".to_owned(),
                QTensor::quantize(&get("lm_head.weight")?, embedding)?,
            ));
        }
        Ok(out)
    }

    /// Writes the model as a GGUF file (see [`Self::gguf_metadata`] and
    /// [`Self::gguf_tensors`]).
    pub fn write_gguf(&self, path: &Path, linear: GgmlDType, embedding: GgmlDType) -> Result<()> {
        write_gguf(
            path,
            &self.gguf_metadata()?,
            &self.gguf_tensors(linear, embedding)?,
        )
    }
}

/// Writes a GGUF file with candle's writer.
pub fn write_gguf(
    path: &Path,
    metadata: &[(String, Value)],
    tensors: &[(String, QTensor)],
) -> Result<()> {
    let mut file = std::fs::File::create(path).map_err(io(path))?;
    let metadata: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    gguf_file::write(&mut file, &metadata, &tensors)?;
    Ok(())
}

/// Writes `tokenizer.json` (byte-level BPE over the 256 bytes, no merges, BOS added by
/// its post-processor) and `tokenizer_config.json` (ChatML template) into `dir`.
pub fn write_tokenizer(dir: &Path) -> Result<()> {
    let mut alphabet: Vec<char> = ByteLevel::alphabet().into_iter().collect();
    alphabet.sort_unstable();
    let vocab: tokenizers::models::bpe::Vocab = alphabet
        .iter()
        .enumerate()
        .map(|(i, c)| (c.to_string(), i as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, Vec::new())
        .build()
        .map_err(|err| Error::Tokenizer(err.to_string()))?;
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tokenizer.with_decoder(Some(ByteLevel::new(false, true, true)));
    let specials: Vec<AddedToken> = SPECIAL_TOKENS
        .iter()
        .map(|t| AddedToken::from(*t, true))
        .collect();
    tokenizer.add_special_tokens(&specials);
    let bos = tokenizer
        .token_to_id("<s>")
        .ok_or_else(|| Error::Tokenizer("<s> was not added".into()))?;
    let template = TemplateProcessing::builder()
        .try_single("<s> $A")
        .map_err(|err| Error::Tokenizer(err.to_string()))?
        .special_tokens(vec![("<s>", bos)])
        .build()
        .map_err(|err| Error::Tokenizer(err.to_string()))?;
    tokenizer.with_post_processor(Some(template));
    let path = dir.join("tokenizer.json");
    tokenizer
        .save(&path, false)
        .map_err(|err| Error::Tokenizer(err.to_string()))?;
    let config = serde_json::json!({
        "bos_token": "<s>",
        "eos_token": "<|im_end|>",
        "pad_token": "</s>",
        "chat_template": CHATML_TEMPLATE,
    });
    let config_path = dir.join("tokenizer_config.json");
    std::fs::write(&config_path, config.to_string()).map_err(io(&config_path))?;
    Ok(())
}

/// Writes JSONL lines.
pub fn write_jsonl(path: &Path, lines: &[serde_json::Value]) -> Result<()> {
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(path, text).map_err(io(path))
}

/// A small chat dataset whose answers are easy to memorise.
pub fn memorisable_chats(n: usize) -> Vec<serde_json::Value> {
    let facts = [
        ("capital of France", "Paris"),
        ("colour of the sky", "blue"),
        ("two plus two", "four"),
        ("opposite of hot", "cold"),
        ("first letter", "A"),
        ("planet we live on", "Earth"),
        ("animal that barks", "dog"),
        ("number after nine", "ten"),
    ];
    (0..n)
        .map(|i| {
            let (q, a) = facts[i % facts.len()];
            serde_json::json!({"messages": [
                {"role": "user", "content": format!("What is the {q}?")},
                {"role": "assistant", "content": a}
            ]})
        })
        .collect()
}

/// The largest absolute value of `t`, for comparing tensors in tests.
pub fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .and_then(|a| a.max_all())
        .and_then(|m| m.to_scalar::<f32>())
        .expect("an f32 tensor has a largest absolute value")
}

/// The largest absolute difference between `a` and `b` (same shape), for tests.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    max_abs(&(a - b).expect("tensors of the same shape subtract"))
}
