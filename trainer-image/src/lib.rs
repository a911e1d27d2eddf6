//! kubetune's trainer: the program in kubetune's trainer pods.
//!
//! It fine-tunes a Llama-architecture model (Llama 2/3, Mistral, Qwen2 checkpoints in
//! Hugging Face's format) with LoRA on candle and writes an adapter in Hugging Face
//! PEFT's format, which `PeftModel.from_pretrained` and vLLM load unchanged.
//!
//! # Methods
//! - `lora`: adapters on a frozen base in the compute dtype.
//! - `qlora`: the same on base linear weights held in 4-bit NF4 ([`nf4`]), dequantized
//!   on the fly; the adapter written is a plain PEFT LoRA adapter.
//! - `dpo`: Direct Preference Optimization of an adapter on preference data ([`dpo`]);
//!   the reference is the base with the adapter disabled.
//! - `full`: every weight trained in f32; writes a Hugging Face checkpoint ([`full`]).
//!   Data-parallel across the ranks of a gang ([`parallel`]) when the operator sets
//!   `KUBETUNE_WORLD_SIZE` above 1 (with `KUBETUNE_RANK` and `KUBETUNE_RENDEZVOUS`,
//!   rank 0's `host:port`): each rank trains on its share of every global batch
//!   (`batch_size` per rank), gradients are summed with Gloo (the `gloo` cargo feature,
//!   crate `kubetune-collective`), every rank takes the same optimizer step, and rank 0
//!   alone writes checkpoints, the model, `metrics.json` and the termination log. A
//!   pod may run several ranks, one per GPU (`KUBETUNE_RANKS_PER_POD`, with
//!   `KUBETUNE_NODE_RANK`): the trainer it starts launches and supervises them
//!   ([`launch`]), each on its own CUDA device. The other methods run on one rank.
//!
//! # Pipeline
//! [`config`] and [`model`] read the checkpoint (memory-mapped safetensors) into a
//! decoder built from differentiable ops ([`ops`]) with adapters ([`lora`]);
//! [`tokenizer`] and [`data`] turn JSONL into masked token batches; [`train`] runs
//! AdamW ([`optim`]) with checkpoints ([`checkpoint`]) and writes the adapter
//! ([`adapter`]); [`progress`] serves live progress; [`cli`] is the command line.
//!
//! # Interfaces
//! - `kubetune-trainer train --config FILE`: the `TrainerConfig` (from
//!   `kubetune-crds`) the operator mounts, JSON or YAML.
//! - `kubetune-trainer train --model DIR --data FILE --out DIR [--format
//!   chat|instruction|text] [--epochs N | --max-steps N] [--lr X] [--rank R] ...`:
//!   standalone, defaults as in the CRD.
//! - `kubetune-trainer eval --model DIR [--adapter DIR] --data FILE [--format ...]`
//!   prints one JSON line `{"loss": <mean cross-entropy per target token>, "tokens": N}`.
//! - `kubetune-trainer import-gguf FILE --out DIR` writes a Hugging Face checkpoint
//!   (f32 weights, tokenizer, chat template) from a llama.cpp GGUF file of a
//!   Llama-architecture model ([`gguf`]) and prints a JSON summary line.
//! - While training: `GET /progress` (JSON), `/metrics` (Prometheus), `/healthz` on
//!   `--progress-addr` or `KUBETUNE_PROGRESS_ADDR` (default `0.0.0.0:8080`); logs are
//!   JSON lines on stderr.
//! - Data-parallel runs wait `KUBETUNE_RENDEZVOUS_TIMEOUT_SECONDS` (default 600) for
//!   every rank to join, and `KUBETUNE_COLLECTIVE_TIMEOUT_SECONDS` (default 300) at
//!   most for the others in one gradient exchange; a rank that dies is noticed at once.
//!   Either way the others exit 1 (retryable) with a message naming what failed.
//!
//! # Outputs
//! `OUTPUT/adapter_config.json`, `OUTPUT/adapter_model.safetensors` and
//! `OUTPUT/metrics.json` (loss history, base and tuned eval loss, tokens/s, the
//! adapter's sha256 and size). Checkpoints go to `checkpoint_dir/checkpoint-NNNNNNNN`.
//!
//! # Exit codes (the operator relies on these)
//! - `0`: success. The termination log holds one JSON object
//!   `{"adapterSha256", "adapterSizeBytes", "baseEvalLoss", "evalLoss", "steps"}`.
//! - `2`: invalid input that no retry can fix: a bad dataset line (reported as
//!   `FILE:LINE: message`), a missing file, an unsupported architecture or method, a
//!   LoRA rank that does not fit the model, a checkpoint directory written by a run
//!   with different settings. The message is also written to the termination log.
//! - `143`: stopped by SIGTERM (or Ctrl-C) after writing a checkpoint; retry resumes.
//!   In a gang a SIGTERM on any rank stops every rank after the same step.
//! - any other non-zero code (normally `1`): a retryable failure.
//!
//! The termination log is the file named by `KUBETUNE_TERMINATION_LOG` (default
//! `/dev/termination-log`, Kubernetes' `terminationMessagePath`); failing to write it
//! is ignored.
//!
//! # Devices
//! CPU by default, in f32. The `cuda` cargo feature builds candle's CUDA backend (it
//! needs nvcc and `CUDA_COMPUTE_CAP` at build time) and trains on GPU 0 in bf16, with
//! the adapters, full fine-tuning's master weights and gradients, and the optimizer
//! state in f32 (mixed precision; tested on the CPU, which can compute in bf16 too). Such a build never falls back to the CPU: it
//! needs the driver's `libcuda.so.1` to start at all, and without a usable GPU it exits
//! 1 with "failed to open CUDA device 0". `check-cuda-build.sh` compiles it without a
//! GPU or a CUDA install.
//!
//! # candle and autograd
//! candle's fused softmax, RMSNorm and RoPE kernels have no backward and silently cut
//! the graph, and its matmul computes weight gradients even for frozen weights; the
//! decoder therefore uses its own differentiable compositions and custom ops with a
//! backward ([`ops`]): a frozen linear layer (input gradient only), and on the CPU a
//! fused causal softmax and a fused cross-entropy that keep one tensor for backward
//! instead of a chain of intermediates. Tests check that every adapter tensor gets a
//! gradient that matches finite differences, and that the fused ops match the
//! compositions they replace.
//!
//! # Memory
//! `--recompute` (or [`train::TrainOptions::recompute`]) keeps only each block's input
//! during the forward pass and re-runs one block at a time in backward: gradients are
//! identical (tested), activation memory drops to one block's worth, at the cost of
//! about one more forward pass.
//!
//! # Benchmark
//! `cargo run --release -p kubetune-trainer --example bench` measures LoRA training
//! tokens/s and peak RSS on a ~50M-parameter Llama shape on the CPU, the same for
//! PyTorch + PEFT in a throwaway virtual environment (`--no-pytorch` skips it,
//! `--venv DIR` reuses one), and ends with one JSON line.
//!
//! # Compatibility
//! The examples' `bench` trains a tiny model and checks that Hugging Face transformers
//! with PEFT, loading the same checkpoint directory and the written adapter, computes
//! the same eval loss as `kubetune-trainer eval` (base and adapted).

pub mod adapter;
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod data;
pub mod dpo;
pub mod error;
pub mod full;
pub mod gguf;
pub mod launch;
pub mod lora;
pub mod memory;
pub mod model;
pub mod nf4;
pub mod ops;
pub mod optim;
pub mod parallel;
pub mod progress;
pub mod rng;
pub mod serve;
pub mod test_support;
pub mod tokenizer;
pub mod train;
pub mod zero3;

pub use error::{Error, Result};
use kubetune_crds::training::contract;

/// Exit code for invalid input: the operator fails the job at once (the contract in
/// `kubetune_crds::training::contract`).
pub const EXIT_INVALID_INPUT: i32 = contract::EXIT_INVALID_INPUT;
/// Exit code after a SIGTERM-triggered checkpoint.
pub const EXIT_INTERRUPTED: i32 = 143;
/// Exit code for other (retryable) failures.
pub const EXIT_RETRYABLE: i32 = 1;

/// Keeps glibc's malloc from handing each large freed block back to the kernel.
///
/// A training step allocates and frees activations and gradients of tens of MiB; glibc
/// serves blocks above its mmap threshold (dynamic, from 128 KiB) with fresh `mmap`s and
/// `munmap`s them on free, so every step faulted in and zeroed its memory again: a
/// profile of the LoRA benchmark spent a third of its time in the kernel (page faults,
/// page clearing, memcg charging). The threshold is fixed at its maximum (32 MiB) and
/// the heap's free top is returned only beyond 1 GiB. Measured on the benchmark (47.9M
/// parameters, B=4, T=256, 2 cores, two runs): 262 → 396–404 tokens/s, peak RSS 1,849 →
/// 1,876–1,997 MiB.
/// Call it first thing in `main`, before threads start.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets malloc's tunables; called before other threads exist.
    #[allow(unsafe_code)]
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

/// The exit code for a failure (see the crate docs).
pub fn exit_code(error: &Error) -> i32 {
    if error.is_invalid_input() {
        EXIT_INVALID_INPUT
    } else if matches!(error, Error::Interrupted { .. }) {
        EXIT_INTERRUPTED
    } else {
        EXIT_RETRYABLE
    }
}

/// Writes `message` to the termination log (`KUBETUNE_TERMINATION_LOG`, default
/// `/dev/termination-log`), ignoring failures: outside Kubernetes there is none.
pub fn write_termination_log(message: &str) {
    let path = std::env::var_os(contract::ENV_TERMINATION_LOG)
        .unwrap_or_else(|| "/dev/termination-log".into());
    // Kubernetes keeps at most 4096 bytes.
    let mut end = message.len().min(4096);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    let _ = std::fs::write(path, &message[..end]);
}
