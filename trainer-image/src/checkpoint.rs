//! Training checkpoints: everything needed to continue a run exactly where it stopped.
//!
//! A checkpoint is a directory `checkpoint-{step:08}` under the checkpoint dir holding
//! the adapter (`adapter_model.safetensors`, PEFT keys) or, with full fine-tuning, every
//! weight (`model.safetensors`, Hugging Face names), the optimizer moments
//! (`optimizer.safetensors`) and `trainer_state.json` (step, the position in the data
//! stream, the random-generator state, the loss history). It is written under a
//! temporary name and renamed, so a directory with the final name is always complete;
//! older checkpoints beyond `keep` are deleted after a new one lands.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::adapter::{WEIGHTS_FILE, safetensors_bytes, write_atomic};
use crate::error::{Error, Result};
use crate::model::Llama;
use crate::optim::{AdamW, Moments};
use crate::rng::Rng;

const STATE_FILE: &str = "trainer_state.json";
/// The optimizer moments of an unsharded checkpoint (`m.NAME`, `v.NAME`).
pub(crate) const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// The weights of an unsharded full fine-tuning checkpoint.
pub(crate) const FULL_WEIGHTS_FILE: &str = "model.safetensors";

/// The file a checkpoint keeps `model`'s trainable tensors in.
fn weights_file(model: &Llama) -> &'static str {
    if model.is_full() {
        FULL_WEIGHTS_FILE
    } else {
        WEIGHTS_FILE
    }
}

/// The run's bookkeeping at a step boundary.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TrainerState {
    /// Completed optimizer steps.
    pub step: u64,
    /// Micro-batches consumed from the data stream (the data position).
    pub micro_batch: u64,
    /// The generator state the run continues with (dropout masks and data order are
    /// derived from the seed and positions, so this is their root).
    pub rng: Rng,
    /// Mean training loss of each completed step.
    pub loss_history: Vec<f64>,
    /// Eval loss of the base model, measured before the first step.
    pub base_eval_loss: Option<f64>,
    /// Training tokens seen so far.
    pub tokens_seen: u64,
    /// What must match for a resume to be valid: rank, targets, seed, data sizes.
    pub fingerprint: String,
}

fn checkpoint_name(step: u64) -> String {
    format!("checkpoint-{step:08}")
}

/// Complete checkpoints in `dir`, oldest first.
pub fn list_checkpoints(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(Error::io("list", dir)(err)),
    };
    let mut found = Vec::new();
    for entry in entries {
        let path = entry.map_err(Error::io("list", dir))?.path();
        let Some(step) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("checkpoint-"))
            .and_then(|s| s.parse::<u64>().ok())
        else {
            continue;
        };
        if path.join(STATE_FILE).is_file() {
            found.push((step, path));
        }
    }
    found.sort();
    Ok(found)
}

/// Writes a checkpoint of step `state.step`, with the optimizer's `moments` of every
/// trainable parameter, and prunes all but the newest `keep`.
pub fn save_checkpoint(
    dir: &Path,
    keep: usize,
    model: &Llama,
    moments: &Moments,
    state: &TrainerState,
) -> Result<PathBuf> {
    let tmp_dir = partial_dir(dir, state.step);
    begin(&tmp_dir)?;
    let params = model.trainable_params();
    let file = weights_file(model);
    let tensors = params
        .iter()
        .map(|(key, var)| (key.clone(), var.as_tensor().clone()))
        .collect();
    write_atomic(&tmp_dir.join(file), &safetensors_bytes(tensors, file)?)?;
    if moments.m.len() != params.len() || moments.v.len() != params.len() {
        return Err(Error::invalid(format!(
            "{} optimizer moments for {} trainable tensors",
            moments.m.len(),
            params.len()
        )));
    }
    let mut named: Vec<(String, Tensor)> = Vec::new();
    for ((key, _), (m, v)) in params.into_iter().zip(moments.m.iter().zip(&moments.v)) {
        named.push((format!("m.{key}"), m.clone()));
        named.push((format!("v.{key}"), v.clone()));
    }
    let opt_bytes = safetensors::serialize(named, None).map_err(|err| Error::Safetensors {
        action: "serialise",
        path: tmp_dir.join(OPTIMIZER_FILE),
        message: err.to_string(),
    })?;
    write_atomic(&tmp_dir.join(OPTIMIZER_FILE), &opt_bytes)?;
    finish(dir, &tmp_dir, keep, state)
}

/// The temporary directory a checkpoint of `step` is written in before its rename.
pub(crate) fn partial_dir(dir: &Path, step: u64) -> PathBuf {
    dir.join(format!(".{}.partial", checkpoint_name(step)))
}

/// Creates the empty temporary directory `tmp_dir` (see [`partial_dir`]), removing
/// what an interrupted attempt left there.
pub(crate) fn begin(tmp_dir: &Path) -> Result<()> {
    if tmp_dir.exists() {
        std::fs::remove_dir_all(tmp_dir).map_err(Error::io("remove", tmp_dir))?;
    }
    std::fs::create_dir_all(tmp_dir).map_err(Error::io("create", tmp_dir))
}

/// Completes a checkpoint whose files are in `tmp_dir`: writes the trainer state,
/// renames the directory to its final name and prunes all but the newest `keep`.
pub(crate) fn finish(
    dir: &Path,
    tmp_dir: &Path,
    keep: usize,
    state: &TrainerState,
) -> Result<PathBuf> {
    let final_dir = dir.join(checkpoint_name(state.step));
    let state_json = serde_json::to_vec_pretty(state).expect("trainer state serialises");
    write_atomic(&tmp_dir.join(STATE_FILE), &state_json)?;
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir).map_err(Error::io("remove", &final_dir))?;
    }
    std::fs::rename(tmp_dir, &final_dir).map_err(Error::io("rename", &final_dir))?;
    let all = list_checkpoints(dir)?;
    if all.len() > keep {
        for (_, old) in &all[..all.len() - keep] {
            std::fs::remove_dir_all(old).map_err(Error::io("remove", old))?;
        }
    }
    Ok(final_dir)
}

/// The newest checkpoint in `dir` and its state, which must have been written by a
/// run with `fingerprint`; `None` when there is none.
pub(crate) fn latest_state(
    dir: &Path,
    fingerprint: &str,
) -> Result<Option<(PathBuf, TrainerState)>> {
    let Some((_, path)) = list_checkpoints(dir)?.pop() else {
        return Ok(None);
    };
    let state_path = path.join(STATE_FILE);
    let state: TrainerState = serde_json::from_slice(
        &std::fs::read(&state_path).map_err(Error::io("read", &state_path))?,
    )
    .map_err(|err| Error::Safetensors {
        action: "parse",
        path: state_path.clone(),
        message: err.to_string(),
    })?;
    if state.fingerprint != fingerprint {
        return Err(Error::invalid(format!(
            "checkpoint {} was written by a run with different settings ({}), not ({fingerprint}); clear the checkpoint directory or restore the settings",
            path.display(),
            state.fingerprint
        )));
    }
    Ok(Some((path, state)))
}

/// Restores the newest checkpoint in `dir` into `model` and `optimizer` (which keeps
/// the moments it owns), if there is one.
pub fn resume_latest(
    dir: &Path,
    model: &Llama,
    optimizer: &mut AdamW,
    fingerprint: &str,
    device: &Device,
) -> Result<Option<TrainerState>> {
    let Some((path, state)) = latest_state(dir, fingerprint)? else {
        return Ok(None);
    };
    let load = |file: &str| -> Result<HashMap<String, Tensor>> {
        let p = path.join(file);
        let bytes = std::fs::read(&p).map_err(Error::io("read", &p))?;
        candle_core::safetensors::load_buffer(&bytes, device).map_err(|err| Error::Safetensors {
            action: "read",
            path: p.clone(),
            message: err.to_string(),
        })
    };
    let weights = load(weights_file(model))?;
    let moments = load(OPTIMIZER_FILE)?;
    let missing = |key: &str| Error::Safetensors {
        action: "read",
        path: path.clone(),
        message: format!("missing tensor {key}"),
    };
    let (mut m, mut v) = (Vec::new(), Vec::new());
    for (key, var) in model.trainable_params() {
        let value = weights.get(&key).ok_or_else(|| missing(&key))?;
        var.set(value)?;
        let mk = format!("m.{key}");
        let vk = format!("v.{key}");
        m.push(moments.get(&mk).ok_or_else(|| missing(&mk))?.clone());
        v.push(moments.get(&vk).ok_or_else(|| missing(&vk))?.clone());
    }
    optimizer.restore(state.step, Moments { m, v })?;
    Ok(Some(state))
}
