//! This run's memory plan ([`kubetune_crds::memory`]): computed from the model's
//! `config.json` and the run's settings before any weight is loaded, logged, served in
//! progress, and checked against the GPU's memory.

use kubetune_crds::memory::{GPU_RUNTIME_BYTES, MemoryPlan, ModelShape, PlanInput, Processor, gib};

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::parallel::Sharding;
use crate::train::{MethodOptions, TrainOptions};

impl ModelConfig {
    /// The dimensions the memory plan needs.
    pub fn shape(&self) -> ModelShape {
        ModelShape {
            hidden_size: self.hidden_size as u64,
            intermediate_size: self.intermediate_size as u64,
            layers: self.num_hidden_layers as u64,
            attention_heads: self.num_attention_heads as u64,
            key_value_heads: self.kv_heads() as u64,
            head_dim: self.head_dim() as u64,
            vocab_size: self.vocab_size as u64,
            tie_word_embeddings: self.tie_word_embeddings,
        }
    }
}

/// What the plan of `opts` on `config` depends on; `cpu_runtime_bytes` is what the
/// process held before loading (a GPU's runtime is [`GPU_RUNTIME_BYTES`]).
pub fn plan_input(
    opts: &TrainOptions,
    config: &ModelConfig,
    on_gpu: bool,
    cpu_runtime_bytes: u64,
) -> PlanInput {
    let method = match opts.method {
        MethodOptions::Lora => kubetune_crds::Method::Lora,
        MethodOptions::Qlora { .. } => kubetune_crds::Method::Qlora,
        MethodOptions::Dpo(_) => kubetune_crds::Method::Dpo,
        MethodOptions::Full { .. } => kubetune_crds::Method::Full,
    };
    let (world_size, sharding) = opts
        .gang
        .as_ref()
        .map_or((1, Sharding::default()), |g| (g.world_size, g.sharding));
    PlanInput {
        shape: config.shape(),
        method,
        sharding,
        world_size: world_size as u64,
        seq_len: opts.max_seq_length as u64,
        micro_batch: opts.batch_size as u64,
        recompute: opts.recompute,
        lora_rank: opts.lora.rank as u64,
        processor: if on_gpu {
            Processor::Gpu
        } else {
            Processor::Cpu
        },
        runtime_bytes: if on_gpu {
            GPU_RUNTIME_BYTES
        } else {
            cpu_runtime_bytes
        },
    }
}

/// The plan of this run, recomputing blocks when keeping their activations would not
/// fit `capacity` (the GPU's bytes; `None` on a CPU): the settings it runs with and the
/// plan. Fails, before anything is loaded, when even that does not fit.
pub fn fit(input: PlanInput, capacity: Option<u64>) -> Result<(PlanInput, MemoryPlan)> {
    let fitted = input.fitted(capacity);
    let plan = fitted.plan();
    if let Some(capacity) = capacity
        && plan.peak_bytes > capacity
    {
        let advice = if input.method == kubetune_crds::Method::Full {
            "use more GPUs (resources.nodes), a smaller batchSize or maxSeqLength"
        } else {
            "use method qlora, a smaller batchSize or maxSeqLength, or a larger GPU"
        };
        return Err(Error::invalid(format!(
            "the memory plan needs {:.1} GiB per GPU but the GPU has {:.1} GiB ({}); {advice}",
            gib(plan.peak_bytes),
            gib(capacity),
            plan.summary()
        )));
    }
    Ok((fitted, plan))
}

/// This process's resident memory now, from `VmRSS` in `/proc/self/status` (in kB,
/// whatever the page size; 0 where there is none).
pub fn resident_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .map_or(0, |kib| kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lora_8b(batch: u64) -> PlanInput {
        PlanInput {
            shape: ModelShape::LLAMA_3_1_8B,
            method: kubetune_crds::Method::Lora,
            sharding: Sharding::Full,
            world_size: 1,
            seq_len: 4096,
            micro_batch: batch,
            recompute: false,
            lora_rank: 16,
            processor: Processor::Gpu,
            runtime_bytes: GPU_RUNTIME_BYTES,
        }
    }

    #[test]
    fn a_run_that_fits_only_by_recomputing_recomputes_and_one_that_cannot_is_refused() {
        let a100 = kubetune_crds::memory::gpu_memory_bytes("NVIDIA-A100-SXM4-80GB");
        let (fitted, plan) = fit(lora_8b(4), a100).expect("fits with recompute");
        assert!(fitted.recompute && plan.recompute);
        assert!(plan.peak_bytes <= a100.expect("known"));

        let error = fit(lora_8b(64), a100).expect_err("cannot fit");
        assert!(error.is_invalid_input(), "{error}");
        let message = error.to_string();
        assert!(message.contains("memory plan needs"), "{message}");
        assert!(message.contains("use method qlora"), "{message}");
        // Unchecked without a capacity (a CPU).
        assert!(fit(lora_8b(64), None).is_ok());
    }

    #[test]
    fn the_resident_set_is_measured() {
        assert!(resident_bytes() > 1 << 20);
    }
}
