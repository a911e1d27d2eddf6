//! Full fine-tuning's output: a Hugging Face checkpoint directory that transformers'
//! `from_pretrained` (and this trainer) load like the original.
//!
//! `config.json` is the input's with `torch_dtype` set to what was written (f32); the
//! weights are safetensors with the checkpoint's own names and `{"format": "pt"}`
//! metadata, in one `model.safetensors` or, when they exceed the shard size, in
//! `model-0000i-of-0000n.safetensors` shards listed by `model.safetensors.index.json`
//! (`{"metadata": {"total_size"}, "weight_map"}`), as `save_pretrained` writes them. The
//! tokenizer files are copied unchanged.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::Tensor;

use crate::adapter::{Artifact, safetensors_bytes, sha256_hex, write_atomic};
use crate::error::{Error, Result, read_input_file};
use crate::model::Llama;

/// transformers' default `max_shard_size` ("5GB").
pub const DEFAULT_MAX_SHARD_BYTES: u64 = 5_000_000_000;

/// The index of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Files next to the weights that a checkpoint's users need, copied when present.
const TOKENIZER_FILES: [&str; 5] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "tokenizer.model",
];

/// Writes the fully fine-tuned `model` (see [`Llama::make_trainable`]) into `out` as a
/// Hugging Face checkpoint, with `config.json` and the tokenizer files of `source`.
/// The artifact is the single weights file, or the index when sharded.
pub fn save_full_model(
    model: &Llama,
    source: &Path,
    out: &Path,
    max_shard_bytes: u64,
) -> Result<Artifact> {
    let tensors = model
        .full_params()
        .into_iter()
        .map(|(name, var)| (name, var.as_tensor().clone()))
        .collect();
    save_full_tensors(tensors, source, out, max_shard_bytes)
}

/// Writes `tensors` (every weight, by Hugging Face name, in checkpoint order) into
/// `out` as a Hugging Face checkpoint with `config.json` and the tokenizer files of
/// `source`; see [`save_full_model`].
pub fn save_full_tensors(
    tensors: Vec<(String, Tensor)>,
    source: &Path,
    out: &Path,
    max_shard_bytes: u64,
) -> Result<Artifact> {
    std::fs::create_dir_all(out).map_err(Error::io("create", out))?;
    let config_path = source.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_slice(&read_input_file(&config_path, "model config")?).map_err(|err| {
            Error::invalid(format!("{} is not JSON: {err}", config_path.display()))
        })?;
    config["torch_dtype"] = "float32".into();
    let json = serde_json::to_vec_pretty(&config).expect("a JSON value serialises");
    write_atomic(&out.join("config.json"), &json)?;
    for name in TOKENIZER_FILES {
        let from = source.join(name);
        if from.is_file() {
            let to = out.join(name);
            std::fs::copy(&from, &to).map_err(Error::io("copy", &to))?;
        }
    }
    write_weights(out, tensors, max_shard_bytes)
}

/// Writes `tensors` (Hugging Face names, checkpoint order) into `out` as
/// `model.safetensors`, or as shards of at most `max_shard_bytes` with an index, and
/// removes weights a previous attempt left under other names. The artifact is the
/// single weights file, or the index when sharded.
pub fn write_weights(
    out: &Path,
    tensors: Vec<(String, Tensor)>,
    max_shard_bytes: u64,
) -> Result<Artifact> {
    // Greedy shards in checkpoint order, each at most max_shard_bytes unless a single
    // tensor is larger (transformers does the same).
    let mut shards: Vec<Vec<(String, Tensor)>> = vec![Vec::new()];
    let mut shard_bytes = 0u64;
    let mut total = 0u64;
    for (name, t) in tensors {
        let bytes = (t.elem_count() * t.dtype().size_in_bytes()) as u64;
        let current = shards.last_mut().expect("there is always a current shard");
        if !current.is_empty() && shard_bytes + bytes > max_shard_bytes {
            shards.push(Vec::new());
            shard_bytes = 0;
        }
        shard_bytes += bytes;
        total += bytes;
        shards
            .last_mut()
            .expect("there is always a current shard")
            .push((name, t));
    }
    // A previous attempt may have left weights under other names.
    remove_stale_weights(out)?;
    let n = shards.len();
    if n == 1 {
        let file = "model.safetensors";
        let bytes = safetensors_bytes(shards.pop().expect("one shard"), file)?;
        write_atomic(&out.join(file), &bytes)?;
        return Ok(Artifact {
            sha256: sha256_hex(&bytes),
            size_bytes: bytes.len() as u64,
        });
    }
    let mut weight_map = BTreeMap::new();
    let mut written = 0u64;
    for (i, shard) in shards.into_iter().enumerate() {
        let file = format!("model-{:05}-of-{n:05}.safetensors", i + 1);
        for (name, _) in &shard {
            weight_map.insert(name.clone(), file.clone());
        }
        let bytes = safetensors_bytes(shard, &file)?;
        written += bytes.len() as u64;
        write_atomic(&out.join(&file), &bytes)?;
    }
    let index = serde_json::json!({
        "metadata": {"total_size": total},
        "weight_map": weight_map,
    });
    let index = serde_json::to_vec_pretty(&index).expect("a JSON value serialises");
    write_atomic(&out.join(INDEX_FILE), &index)?;
    Ok(Artifact {
        sha256: sha256_hex(&index),
        size_bytes: written,
    })
}

fn remove_stale_weights(out: &Path) -> Result<()> {
    for entry in std::fs::read_dir(out).map_err(Error::io("list", out))? {
        let path = entry.map_err(Error::io("list", out))?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if name.starts_with("model") && (name.ends_with(".safetensors") || name == INDEX_FILE) {
            std::fs::remove_file(&path).map_err(Error::io("remove", &path))?;
        }
    }
    Ok(())
}
