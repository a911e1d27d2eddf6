//! Fixtures for tests and benchmarks: a tiny random Llama written in the real on-disk
//! formats (config.json, sharded safetensors, tokenizer.json built with the
//! `tokenizers` API, tokenizer_config.json with a ChatML template), and JSONL datasets.
//! Nothing is downloaded.

use std::collections::HashMap;
use std::path::Path;

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
