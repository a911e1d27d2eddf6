//! Full fine-tuning: every weight gets a correct gradient (with and without layer-wise
//! recompute), the loss falls, the output is a Hugging Face checkpoint (sharded above
//! the threshold) that loads back, and a resumed run equals an uninterrupted one.

use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use kubetune_crds::training::{DatasetFormat, Scheduler, TargetModule};
use kubetune_trainer::cli::{EvalArgs, FormatArg, run_eval};
use kubetune_trainer::data::{Batch, load_dataset, make_batch};
use kubetune_trainer::error::Error;
use kubetune_trainer::lora::LoraSettings;
use kubetune_trainer::model::{BaseFormat, Llama, Pass};
use kubetune_trainer::optim::{AdamW, AdamWConfig};
use kubetune_trainer::rng::Rng;
use kubetune_trainer::test_support::{
    TinyLlama, max_abs, max_abs_diff, memorisable_chats, write_jsonl,
};
use kubetune_trainer::tokenizer::TextTokenizer;
use kubetune_trainer::train::{Control, MethodOptions, TrainOptions, forward_backward, train};

fn options(root: &Path, out: &str, max_shard_bytes: u64) -> TrainOptions {
    TrainOptions {
        method: MethodOptions::Full { max_shard_bytes },
        model_dir: root.join("model"),
        base_model_name: None,
        train_file: root.join("train.jsonl"),
        eval_file: Some(root.join("train.jsonl")),
        eval_split_percent: 0,
        format: DatasetFormat::Chat,
        output_dir: root.join(out),
        checkpoint_dir: root.join(out).join("checkpoints"),
        epochs: 1,
        max_steps: Some(40),
        learning_rate: 3e-3,
        batch_size: 4,
        grad_accum: 1,
        max_seq_length: 64,
        warmup_steps: 2,
        scheduler: Scheduler::Cosine,
        weight_decay: 0.0,
        max_grad_norm: 1.0,
        seed: 3,
        // Unused by full fine-tuning.
        lora: LoraSettings {
            rank: 8,
            alpha: 16.0,
            dropout: 0.0,
            rs_lora: false,
            targets: TargetModule::ALL.to_vec(),
        },
        checkpoint_every: 1000,
        checkpoint_keep: 2,
        recompute: false,
        gpu_memory_bytes: None,
        interrupt_after_step: None,
        gang: None,
    }
}

fn setup(spec: TinyLlama) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    spec.write(&dir.path().join("model")).expect("model");
    write_jsonl(&dir.path().join("train.jsonl"), &memorisable_chats(8)).expect("data");
    dir
}

/// The first `n` examples of the setup's training data, as one batch for `model`.
fn first_batch(root: &Path, model: &Llama, n: usize) -> Batch {
    let tokenizer = TextTokenizer::load(&root.join("model"), &model.config).expect("tokenizer");
    let examples = load_dataset(
        &root.join("train.jsonl"),
        DatasetFormat::Chat,
        &tokenizer,
        64,
    )
    .expect("data");
    let refs: Vec<_> = examples.iter().take(n).collect();
    make_batch(&refs, tokenizer.pad_id, &Device::Cpu).expect("batch")
}

#[test]
fn every_weight_gets_a_gradient_matching_finite_differences_with_and_without_recompute() {
    for tie in [false, true] {
        let dir = setup(TinyLlama {
            tie_embeddings: tie,
            qwen2: true,
            llama3_rope: false,
            ..TinyLlama::default()
        });
        let model_dir = dir.path().join("model");
        let mut model = Llama::load(&model_dir, &Device::Cpu).expect("load");
        model.make_trainable().expect("trainable");
        let batch = first_batch(dir.path(), &model, 3);
        let named = model.full_params();
        // Embedding, two norms, seven linears and three biases per block, final norm,
        // and the LM head unless tied.
        assert_eq!(named.len(), 1 + 2 * 12 + 1 + usize::from(!tie));
        let params: Vec<&Var> = named.iter().map(|(_, v)| *v).collect();
        let (_, grads) =
            forward_backward(&model, &batch, &params, 1.0, Pass::EVAL, false).expect("full");
        let (_, recomputed) =
            forward_backward(&model, &batch, &params, 1.0, Pass::EVAL, true).expect("recompute");
        let loss = || {
            forward_backward(&model, &batch, &[], 1.0, Pass::EVAL, false)
                .expect("loss")
                .0
        };
        let mut rng = Rng::new(11);
        for ((key, var), (grad, re)) in named.iter().zip(grads.iter().zip(&recomputed)) {
            assert!(max_abs(grad) > 0.0, "{key} got no gradient (tied: {tie})");
            assert!(
                max_abs_diff(grad, re) <= 1e-5 * max_abs(grad).max(1e-3),
                "{key}: recompute changed the gradient"
            );
            let original = var.as_tensor().copy().expect("copy");
            let d: Vec<f32> = (0..original.elem_count())
                .map(|_| rng.next_f32() - 0.5)
                .collect();
            let d = Tensor::from_vec(d, original.shape(), &Device::Cpu).expect("d");
            let analytic = f64::from(
                (grad * &d)
                    .and_then(|t| t.sum_all())
                    .and_then(|t| t.to_scalar::<f32>())
                    .expect("dot"),
            );
            let eps = 1e-2;
            var.set(&(&original + (&d * eps).expect("s")).expect("a"))
                .expect("set");
            let plus = loss();
            var.set(&(&original - (&d * eps).expect("s")).expect("a"))
                .expect("set");
            let minus = loss();
            var.set(&original).expect("restore");
            let numeric = (plus - minus) / (2.0 * eps);
            let tolerance = 3e-2 * analytic.abs().max(numeric.abs()) + 3e-3;
            assert!(
                (analytic - numeric).abs() <= tolerance,
                "{key}: analytic {analytic} vs finite difference {numeric} (tied: {tie})"
            );
        }
    }
}

/// Cosine similarity of two tensors' values.
fn cosine(a: &Tensor, b: &Tensor) -> f64 {
    let values = |t: &Tensor| -> Vec<f64> {
        let flat = t.flatten_all().and_then(|t| t.to_dtype(DType::F32));
        let flat = flat.and_then(|t| t.to_vec1::<f32>()).expect("f32 values");
        flat.into_iter().map(f64::from).collect()
    };
    let (a, b) = (values(a), values(b));
    let dot: f64 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    dot / (norm(&a) * norm(&b)).max(f64::MIN_POSITIVE)
}

#[test]
fn mixed_precision_computes_in_bf16_with_f32_master_weights_and_gradients() {
    // What the GPU does (bf16 compute), on the CPU, against f32 throughout.
    let dir = setup(TinyLlama {
        tie_embeddings: true,
        ..TinyLlama::default()
    });
    let model_dir = dir.path().join("model");
    let load = |dtype| {
        let mut model =
            Llama::load_in(&model_dir, &Device::Cpu, BaseFormat::Master, dtype).expect("load");
        model.make_trainable().expect("trainable");
        model
    };
    let (f32_model, bf16_model) = (load(DType::F32), load(DType::BF16));
    let batch = first_batch(dir.path(), &f32_model, 4);
    let step = |model: &Llama| {
        let params: Vec<&Var> = model.full_params().into_iter().map(|(_, v)| v).collect();
        forward_backward(model, &batch, &params, 1.0, Pass::EVAL, false).expect("step")
    };
    let (loss32, grads32) = step(&f32_model);
    let (loss16, grads16) = step(&bf16_model);
    // The bf16 model really computes in bf16: its activations are, and its loss rounds
    // differently.
    let activations = bf16_model.embed(&batch.ids).expect("embed");
    assert_eq!(activations.dtype(), DType::BF16);
    assert_ne!(loss16, loss32);
    assert!(
        (loss16 - loss32).abs() <= 1e-2 * loss32.abs(),
        "bf16 loss {loss16} vs f32 {loss32}"
    );
    let mut lowest = 1.0f64;
    for (((key, var), g32), g16) in bf16_model.full_params().iter().zip(&grads32).zip(&grads16) {
        // The masters and their gradients stay f32; only the arithmetic is bf16.
        assert_eq!(var.dtype(), DType::F32, "{key}");
        assert_eq!(g16.dtype(), DType::F32, "{key}");
        let similarity = cosine(g16, g32);
        assert!(similarity > 0.99, "{key}: gradient cosine {similarity}");
        lowest = lowest.min(similarity);
    }

    // It learns: a few AdamW steps on the bf16-computed gradients lower the loss.
    let params: Vec<&Var> = bf16_model
        .full_params()
        .into_iter()
        .map(|(_, v)| v)
        .collect();
    let mut optimizer = AdamW::new(AdamWConfig::default(), &params).expect("adamw");
    let first = loss16;
    let mut last = first;
    for _ in 0..10 {
        let (loss, grads) = step(&bf16_model);
        optimizer.update(&params, &grads, 3e-3).expect("update");
        last = loss;
    }
    println!(
        "bf16 compute: loss {loss16} (f32: {loss32}), lowest gradient cosine {lowest}, \
         loss after 10 steps {first} -> {last}"
    );
    assert!(last < 0.8 * first, "loss {first} -> {last}");
}

#[test]
fn the_chunked_head_loss_gives_the_fused_loss_and_gradients() {
    // The GPU's LM-head loss (logits a few rows at a time, gradients handed to
    // backward) against the CPU's fused cross-entropy: frozen head, trainable untied
    // head, trainable head tied to the embedding.
    for (full, tie) in [(false, false), (true, false), (true, true)] {
        let dir = setup(TinyLlama {
            tie_embeddings: tie,
            ..TinyLlama::default()
        });
        let model_dir = dir.path().join("model");
        let mut model = Llama::load(&model_dir, &Device::Cpu).expect("load");
        if full {
            model.make_trainable().expect("trainable");
        }
        let hidden = model.config.hidden_size;
        let mut rng = Rng::new(17);
        let values: Vec<f32> = (0..2 * 9 * hidden).map(|_| rng.next_f32() - 0.5).collect();
        let h = Var::from_vec(values, (2, 9, hidden), &Device::Cpu).expect("h");
        // 11 target rows of the 18 positions, in 4 chunks of 3.
        let rows =
            Tensor::new(&[0u32, 1, 2, 4, 5, 8, 9, 10, 12, 16, 17], &Device::Cpu).expect("rows");
        let vocab = model.config.vocab_size as u32;
        let targets: Vec<u32> = (0..11).map(|i| (i * 37 + 5) % vocab).collect();
        let targets = Tensor::new(targets.as_slice(), &Device::Cpu).expect("targets");
        let mut vars: Vec<(String, &Var)> = vec![("h".into(), &h)];
        vars.extend(model.full_params());
        let run = |loss: Tensor| {
            let grads = loss.backward().expect("backward");
            let value = loss.to_scalar::<f32>().expect("scalar");
            let grads: Vec<Option<Tensor>> =
                vars.iter().map(|(_, v)| grads.get(v).cloned()).collect();
            (value, grads)
        };
        let (fused, fused_grads) = run(model
            .head_loss_sum(h.as_tensor(), &rows, &targets)
            .expect("fused"));
        let (chunked, chunked_grads) = run(model
            .head_loss_sum_chunked(h.as_tensor(), &rows, &targets, 3)
            .expect("chunked"));
        // An evaluation pass (detached states) computes the loss alone.
        let evaluated = model
            .head_loss_sum_chunked(&h.as_tensor().detach(), &rows, &targets, 3)
            .and_then(|loss| Ok(loss.to_scalar::<f32>()?))
            .expect("evaluation");
        assert!((fused - evaluated).abs() <= 1e-5 * fused.abs());
        let reached = fused_grads.iter().filter(|g| g.is_some()).count();
        // h, and with full fine-tuning the final norm and the head (the embedding when
        // tied).
        assert_eq!(reached, if full { 3 } else { 1 }, "full {full}, tied {tie}");
        assert!(
            (fused - chunked).abs() <= 1e-5 * fused.abs(),
            "loss {fused} vs {chunked} (full {full}, tied {tie})"
        );
        for ((name, _), (a, b)) in vars.iter().zip(fused_grads.iter().zip(&chunked_grads)) {
            match (a, b) {
                (Some(a), Some(b)) => assert!(
                    max_abs_diff(a, b) <= 1e-5 * max_abs(a).max(1e-3),
                    "{name}: gradients differ by {} (full {full}, tied {tie})",
                    max_abs_diff(a, b)
                ),
                // Weights the head does not reach (the blocks') get none either way.
                (None, None) => {}
                _ => panic!("{name}: a gradient on one side only (full {full}, tied {tie})"),
            }
        }
    }
}

fn eval_of(model_dir: &Path, data: &Path) -> f64 {
    run_eval(&EvalArgs {
        model: model_dir.to_owned(),
        adapter: None,
        data: data.to_owned(),
        format: FormatArg::Chat,
        batch_size: 4,
        max_seq_length: 64,
    })
    .expect("eval")
    .loss
}

#[test]
fn full_fine_tuning_cuts_the_loss_and_writes_a_sharded_checkpoint_that_loads_back() {
    let dir = setup(TinyLlama::default());
    let mut opts = options(dir.path(), "out", 40_000);
    opts.recompute = true;
    let summary = train(&opts, &Device::Cpu, &Control::default()).expect("train");
    let (first, last) = (summary.loss_history[0], summary.loss_history[39]);
    println!("full fine-tuning loss {first:.4} -> {last:.4}");
    assert!(last < 0.2 * first, "loss fell only from {first} to {last}");

    let out = dir.path().join("out");
    let index: serde_json::Value = serde_json::from_slice(
        &std::fs::read(out.join("model.safetensors.index.json")).expect("index"),
    )
    .expect("json");
    let map = index["weight_map"].as_object().expect("weight map");
    let shards: std::collections::BTreeSet<&str> =
        map.values().map(|v| v.as_str().expect("file")).collect();
    assert!(shards.len() > 1, "{shards:?}");
    let mut total = 0;
    for shard in &shards {
        assert!(
            shard.starts_with("model-")
                && shard.ends_with(&format!("-of-{:05}.safetensors", shards.len()))
        );
        let tensors = candle_core::safetensors::load(out.join(shard), &Device::Cpu).expect("shard");
        for (name, t) in &tensors {
            assert_eq!(map[name].as_str(), Some(*shard));
            total += t.elem_count() * 4;
        }
    }
    assert_eq!(index["metadata"]["total_size"].as_u64(), Some(total as u64));
    assert_eq!(map.len(), 1 + 2 * 9 + 1 + 1, "untied: lm_head written");
    assert_eq!(
        summary.adapter.sha256,
        kubetune_trainer::adapter::sha256_hex(
            &std::fs::read(out.join("model.safetensors.index.json")).expect("index")
        )
    );
    for file in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        assert!(out.join(file).is_file(), "{file} missing");
    }
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).expect("config"))
            .expect("json");
    assert_eq!(config["torch_dtype"], "float32");

    // The written checkpoint is a model like any other: loaded back, it scores what the
    // trained model scored, far below the original.
    let data = dir.path().join("train.jsonl");
    let reloaded = eval_of(&out, &data);
    let original = eval_of(&dir.path().join("model"), &data);
    let tuned = summary.eval_loss.expect("eval loss");
    assert!((reloaded - tuned).abs() < 1e-4, "{reloaded} vs {tuned}");
    assert!(reloaded < 0.2 * original, "{original} -> {reloaded}");

    // Below the threshold it is one file, and it loads into training again.
    let mut again = options(&out, "second", u64::MAX);
    again.model_dir = out.clone();
    again.train_file = data.clone();
    again.eval_file = None;
    again.max_steps = Some(1);
    train(&again, &Device::Cpu, &Control::default()).expect("train the written model");
    assert!(out.join("second").join("model.safetensors").is_file());
    assert!(
        !out.join("second")
            .join("model.safetensors.index.json")
            .exists()
    );
}

#[test]
fn an_interrupted_and_resumed_full_run_ends_with_the_same_weights() {
    let dir = setup(TinyLlama {
        tie_embeddings: true,
        ..TinyLlama::default()
    });
    let configure = |out: &str| {
        let mut opts = options(dir.path(), out, u64::MAX);
        opts.max_steps = Some(6);
        opts.batch_size = 2;
        opts.grad_accum = 2;
        opts.weight_decay = 0.01;
        opts.checkpoint_every = 2;
        opts
    };
    let whole = train(&configure("whole"), &Device::Cpu, &Control::default()).expect("whole");
    let mut first = configure("resumed");
    first.interrupt_after_step = Some(3);
    let err = train(&first, &Device::Cpu, &Control::default()).expect_err("interrupted");
    assert!(matches!(err, Error::Interrupted { step: 3 }), "{err}");
    // Another shard size does not stop the resume: it only shapes the output files.
    let mut second = configure("resumed");
    second.method = MethodOptions::Full {
        max_shard_bytes: u64::MAX - 1,
    };
    let resumed = train(&second, &Device::Cpu, &Control::default()).expect("resume");
    assert_eq!(resumed.resumed_from_step, 3);
    // The history before the interruption comes back through trainer_state.json, and
    // serde_json (without its float_roundtrip feature) may move the last bit.
    assert_eq!(resumed.loss_history.len(), whole.loss_history.len());
    for (a, b) in resumed.loss_history.iter().zip(&whole.loss_history) {
        assert!((a - b).abs() <= 1e-12 * b.abs(), "{a} vs {b}");
    }
    assert_eq!(
        resumed.adapter.sha256, whole.adapter.sha256,
        "identical weights files"
    );
}
