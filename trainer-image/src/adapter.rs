//! Adapters on disk in Hugging Face PEFT's format, which `PeftModel.from_pretrained`
//! and vLLM load unchanged: `adapter_config.json` plus `adapter_model.safetensors`
//! (metadata `{"format": "pt"}`, keys such as
//! `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`, A `[r, in]`,
//! B `[out, r]`). See PEFT's `utils/save_and_load.py` and `tuners/lora/config.py`.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use candle_core::{Device, Tensor};
use kubetune_crds::training::TargetModule;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result, read_input_file};
use crate::lora::{AdapterPairs, LoraPair, LoraSettings};
use crate::model::Llama;

/// The adapter weights file name.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// The adapter config file name.
pub const CONFIG_FILE: &str = "adapter_config.json";

/// The fields of PEFT's `LoraConfig` the trainer writes and reads.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdapterConfig {
    /// Always `LORA`.
    pub peft_type: String,
    /// Always `CAUSAL_LM`.
    pub task_type: String,
    /// Rank.
    pub r: usize,
    /// Scaling numerator (written as an integer when it is one, as PEFT writes it).
    #[serde(serialize_with = "integer_if_whole")]
    pub lora_alpha: f64,
    /// Adapted module names, derived from the keys actually written.
    pub target_modules: Vec<String>,
    /// Dropout used in training.
    pub lora_dropout: f64,
    /// Always `none`.
    pub bias: String,
    /// The base model's name.
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    /// rsLoRA scaling.
    #[serde(default)]
    pub use_rslora: bool,
    /// Always false (weights are `[out, in]`).
    #[serde(default)]
    pub fan_in_fan_out: bool,
    /// Always true in saved adapters.
    #[serde(default)]
    pub inference_mode: bool,
    /// Always false: no DoRA.
    #[serde(default)]
    pub use_dora: bool,
    /// No per-module overrides.
    #[serde(default)]
    pub rank_pattern: HashMap<String, usize>,
    /// No per-module overrides.
    #[serde(default)]
    pub alpha_pattern: HashMap<String, f64>,
    /// No extra trained modules.
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
}

fn integer_if_whole<S: serde::Serializer>(value: &f64, serializer: S) -> Result<S::Ok, S::Error> {
    if value.fract() == 0.0 && value.abs() < 1e15 {
        serializer.serialize_i64(*value as i64)
    } else {
        serializer.serialize_f64(*value)
    }
}

/// Where an adapter was written and what it hashes to.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Artifact {
    /// Hex sha256 of `adapter_model.safetensors`.
    pub sha256: String,
    /// Its size in bytes.
    pub size_bytes: u64,
}

/// Hex sha256 of bytes.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes `bytes` to `path` through a temporary file and a rename, so a reader never
/// sees half a file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(Error::io("write", &tmp))?;
    std::fs::rename(&tmp, path).map_err(Error::io("rename", path))
}

/// The adapter tensors of `model` serialised as safetensors with PEFT metadata.
pub fn adapter_bytes(model: &Llama) -> Result<Vec<u8>> {
    let tensors: Vec<(String, Tensor)> = model
        .lora_params()
        .into_iter()
        .map(|(key, var)| (key, var.as_tensor().clone()))
        .collect();
    safetensors_bytes(tensors, WEIGHTS_FILE)
}

/// Named tensors serialised as safetensors with the metadata `{"format": "pt"}` that
/// transformers and PEFT expect; `file` names the destination in errors.
pub fn safetensors_bytes(tensors: Vec<(String, Tensor)>, file: &str) -> Result<Vec<u8>> {
    let metadata = HashMap::from([("format".to_owned(), "pt".to_owned())]);
    safetensors::serialize(tensors, Some(metadata)).map_err(|err| Error::Safetensors {
        action: "serialise",
        path: file.into(),
        message: err.to_string(),
    })
}

/// Writes `model`'s adapter into `dir` in PEFT's format.
pub fn save_adapter(model: &Llama, dir: &Path, base_model: Option<&str>) -> Result<Artifact> {
    std::fs::create_dir_all(dir).map_err(Error::io("create", dir))?;
    let bytes = adapter_bytes(model)?;
    let mut modules = BTreeSet::new();
    for block in model.blocks() {
        for module in TargetModule::ALL {
            if block.linear(module).lora.is_some() {
                modules.insert(module.as_str().to_owned());
            }
        }
    }
    let settings = &model.lora;
    let config = AdapterConfig {
        peft_type: "LORA".into(),
        task_type: "CAUSAL_LM".into(),
        r: settings.rank,
        lora_alpha: settings.alpha,
        target_modules: modules.into_iter().collect(),
        lora_dropout: settings.dropout,
        bias: "none".into(),
        base_model_name_or_path: base_model.map(str::to_owned),
        use_rslora: settings.rs_lora,
        fan_in_fan_out: false,
        inference_mode: true,
        use_dora: false,
        rank_pattern: HashMap::new(),
        alpha_pattern: HashMap::new(),
        modules_to_save: None,
    };
    let json = serde_json::to_vec_pretty(&config).expect("adapter config serialises");
    write_atomic(&dir.join(CONFIG_FILE), &json)?;
    write_atomic(&dir.join(WEIGHTS_FILE), &bytes)?;
    Ok(Artifact {
        sha256: sha256_hex(&bytes),
        size_bytes: bytes.len() as u64,
    })
}

/// Parses `base_model.model.model.layers.{i}.{self_attn|mlp}.{module}.lora_{A|B}.weight`.
fn parse_key(key: &str) -> Option<(usize, TargetModule, bool)> {
    let rest = key.strip_prefix("base_model.model.model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer = layer.parse().ok()?;
    let (_group, rest) = rest.split_once('.')?;
    let (module, rest) = rest.split_once('.')?;
    let module = TargetModule::ALL
        .into_iter()
        .find(|m| m.as_str() == module)?;
    match rest {
        "lora_A.weight" => Some((layer, module, true)),
        "lora_B.weight" => Some((layer, module, false)),
        _ => None,
    }
}

/// Reads a PEFT LoRA adapter directory: its settings and (layer, module, A/B) tensors.
pub fn load_adapter(dir: &Path, device: &Device) -> Result<(LoraSettings, AdapterPairs)> {
    let config_path = dir.join(CONFIG_FILE);
    let config: AdapterConfig =
        serde_json::from_slice(&read_input_file(&config_path, "adapter config")?).map_err(
            |err| {
                Error::invalid(format!(
                    "{} is not a LoRA adapter config: {err}",
                    config_path.display()
                ))
            },
        )?;
    if config.peft_type != "LORA" {
        return Err(Error::invalid(format!(
            "adapter peft_type {} is not LORA",
            config.peft_type
        )));
    }
    let weights_path = dir.join(WEIGHTS_FILE);
    let bytes = read_input_file(&weights_path, "adapter weights")?;
    let tensors = candle_core::safetensors::load_buffer(&bytes, device).map_err(|err| {
        Error::invalid(format!(
            "{} is not valid safetensors: {err}",
            weights_path.display()
        ))
    })?;
    let mut halves: HashMap<(usize, TargetModule), (Option<Tensor>, Option<Tensor>)> =
        HashMap::new();
    for (key, tensor) in tensors {
        let (layer, module, is_a) = parse_key(&key).ok_or_else(|| {
            Error::invalid(format!(
                "unexpected tensor {key} in {}",
                weights_path.display()
            ))
        })?;
        let entry = halves.entry((layer, module)).or_default();
        if is_a {
            entry.0 = Some(tensor)
        } else {
            entry.1 = Some(tensor)
        }
    }
    let mut pairs = Vec::new();
    let mut targets = BTreeSet::new();
    for ((layer, module), (a, b)) in halves {
        let (Some(a), Some(b)) = (a, b) else {
            return Err(Error::invalid(format!(
                "adapter has only one of lora_A/lora_B for layer {layer} {}",
                module.as_str()
            )));
        };
        targets.insert(module);
        pairs.push((layer, module, LoraPair::from_tensors(&a, &b)?));
    }
    pairs.sort_by_key(|(layer, module, _)| (*layer, *module));
    let settings = LoraSettings {
        rank: config.r,
        alpha: config.lora_alpha,
        dropout: config.lora_dropout,
        rs_lora: config.use_rslora,
        targets: targets.into_iter().collect(),
    };
    Ok((settings, pairs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peft_keys_parse_back_to_layer_and_module() {
        assert_eq!(
            parse_key("base_model.model.model.layers.12.mlp.down_proj.lora_B.weight"),
            Some((12, TargetModule::DownProj, false))
        );
        assert_eq!(
            parse_key("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"),
            Some((0, TargetModule::QProj, true))
        );
        assert_eq!(parse_key("model.layers.0.self_attn.q_proj.weight"), None);
    }

    #[test]
    fn sha256_of_empty_input_is_the_known_digest() {
        assert_eq!(
            sha256_hex(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
