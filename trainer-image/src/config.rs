//! The model's `config.json`: which Hugging Face decoder configurations the trainer
//! accepts, and the derived shapes it needs.

use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result, read_input_file};

/// The architectures whose checkpoints this decoder reads (all Llama-shaped: pre-norm
/// RMSNorm, RoPE, grouped-query attention, SwiGLU MLP).
pub const SUPPORTED_ARCHITECTURES: [&str; 3] =
    ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"];

/// RoPE scaling as written in `config.json`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct RopeScaling {
    /// `rope_type` (newer configs) or `type` (older ones).
    #[serde(alias = "type")]
    pub rope_type: String,
    /// Scale factor.
    pub factor: f64,
    /// Llama 3: wavelengths above `original / low_freq_factor` are scaled fully.
    #[serde(default = "one")]
    pub low_freq_factor: f64,
    /// Llama 3: wavelengths below `original / high_freq_factor` are kept.
    #[serde(default = "four")]
    pub high_freq_factor: f64,
    /// Llama 3: the context length the model was pre-trained with.
    #[serde(default = "default_original_max")]
    pub original_max_position_embeddings: usize,
}

fn one() -> f64 {
    1.0
}
fn four() -> f64 {
    4.0
}
fn default_original_max() -> usize {
    8192
}

/// A token id or a list of them (`eos_token_id` is either in Llama 3 configs).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    /// One id.
    One(u32),
    /// Several ids.
    Many(Vec<u32>),
}

impl TokenIds {
    /// The first id.
    pub fn first(&self) -> Option<u32> {
        match self {
            Self::One(id) => Some(*id),
            Self::Many(ids) => ids.first().copied(),
        }
    }
}

/// The fields of a Hugging Face `config.json` the decoder uses.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct ModelConfig {
    /// E.g. `["LlamaForCausalLM"]`.
    #[serde(default)]
    pub architectures: Vec<String>,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Number of decoder blocks.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention); defaults to the query heads.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Per-head width; defaults to hidden_size / heads.
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// RMSNorm epsilon.
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// RoPE base.
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    /// RoPE scaling, if any.
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    /// Whether the LM head reuses the token embedding.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Whether q/k/v projections have biases (Qwen2: always true).
    #[serde(default)]
    pub attention_bias: bool,
    /// Mistral's sliding attention window, if any.
    #[serde(default)]
    pub sliding_window: Option<usize>,
    /// Maximum context.
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    /// Beginning-of-sequence token.
    #[serde(default)]
    pub bos_token_id: Option<TokenIds>,
    /// End-of-sequence token(s).
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
    /// `silu` for every supported model.
    #[serde(default = "default_act")]
    pub hidden_act: String,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_theta() -> f64 {
    10_000.0
}
fn default_max_pos() -> usize {
    4096
}
fn default_act() -> String {
    "silu".to_owned()
}

impl ModelConfig {
    /// Reads and validates `config.json` in a checkpoint directory.
    pub fn load(model_dir: &Path) -> Result<Self> {
        let path = model_dir.join("config.json");
        let bytes = read_input_file(&path, "model config")?;
        let config: Self = serde_json::from_slice(&bytes).map_err(|err| {
            Error::invalid(format!(
                "{} is not a valid model config: {err}",
                path.display()
            ))
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Whether q/k/v carry a bias.
    pub fn qkv_bias(&self) -> bool {
        self.attention_bias || self.architectures.iter().any(|a| a == "Qwen2ForCausalLM")
    }

    /// Key/value heads.
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Per-head width.
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Checks that the decoder can run this configuration.
    pub fn validate(&self) -> Result<()> {
        let arch_ok = self
            .architectures
            .iter()
            .any(|a| SUPPORTED_ARCHITECTURES.contains(&a.as_str()));
        if !arch_ok {
            return Err(Error::invalid(format!(
                "unsupported architecture {:?}: the trainer supports {}",
                self.architectures,
                SUPPORTED_ARCHITECTURES.join(", ")
            )));
        }
        if self.hidden_act != "silu" {
            return Err(Error::invalid(format!(
                "unsupported hidden_act {:?}: only silu is supported",
                self.hidden_act
            )));
        }
        let heads = self.num_attention_heads;
        let kv = self.kv_heads();
        if heads == 0 || kv == 0 || !heads.is_multiple_of(kv) {
            return Err(Error::invalid(format!(
                "num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}"
            )));
        }
        if !self.head_dim().is_multiple_of(2) || self.head_dim() == 0 {
            return Err(Error::invalid(format!(
                "head dimension {} must be even for RoPE",
                self.head_dim()
            )));
        }
        if let Some(scaling) = &self.rope_scaling {
            match scaling.rope_type.as_str() {
                "llama3" | "linear" | "default" => {}
                other => {
                    return Err(Error::invalid(format!(
                        "unsupported rope_scaling type {other:?}: the trainer supports llama3 and linear"
                    )));
                }
            }
        }
        Ok(())
    }

    /// Inverse RoPE frequencies, one per pair of dimensions, with any scaling applied.
    pub fn inv_freq(&self) -> Vec<f64> {
        let dim = self.head_dim();
        let base: Vec<f64> = (0..dim / 2)
            .map(|i| 1.0 / self.rope_theta.powf((2 * i) as f64 / dim as f64))
            .collect();
        match &self.rope_scaling {
            Some(s) if s.rope_type == "linear" => base.iter().map(|f| f / s.factor).collect(),
            Some(s) if s.rope_type == "llama3" => {
                // Llama 3.1's frequency-dependent scaling, as in transformers'
                // `_compute_llama3_parameters`.
                let original = s.original_max_position_embeddings as f64;
                let low_wavelen = original / s.low_freq_factor;
                let high_wavelen = original / s.high_freq_factor;
                base.iter()
                    .map(|&freq| {
                        let wavelen = 2.0 * std::f64::consts::PI / freq;
                        if wavelen < high_wavelen {
                            freq
                        } else if wavelen > low_wavelen {
                            freq / s.factor
                        } else {
                            let smooth = (original / wavelen - s.low_freq_factor)
                                / (s.high_freq_factor - s.low_freq_factor);
                            (1.0 - smooth) * freq / s.factor + smooth * freq
                        }
                    })
                    .collect()
            }
            _ => base,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn llama3_config() -> ModelConfig {
        serde_json::from_value(serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 10,
            "rope_theta": 500000.0,
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        }))
        .expect("valid config")
    }

    #[test]
    fn llama3_scaling_keeps_high_frequencies_and_divides_low_ones() {
        let config = llama3_config();
        let scaled = config.inv_freq();
        let plain = ModelConfig {
            rope_scaling: None,
            ..config
        }
        .inv_freq();
        // The fastest rotation has a wavelength far below 8192/4: unchanged.
        assert_eq!(scaled[0], plain[0]);
        // The slowest has a wavelength far above 8192: divided by the factor.
        let last = plain.len() - 1;
        assert!((scaled[last] - plain[last] / 8.0).abs() < 1e-15);
    }

    #[test]
    fn unknown_architecture_is_invalid_input() {
        let mut config = llama3_config();
        config.architectures = vec!["GPT2LMHeadModel".into()];
        let err = config.validate().expect_err("gpt2 is not supported");
        assert!(err.is_invalid_input());
        assert!(err.to_string().contains("GPT2LMHeadModel"));
    }
}
