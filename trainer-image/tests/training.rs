//! Training runs end to end on a tiny model: the loss falls, a resumed run equals an
//! uninterrupted one, and the adapter is written in PEFT's format.

use std::path::Path;

use candle_core::{DType, Device};
use kubetune_crds::training::{DatasetFormat, Scheduler, TargetModule};
use kubetune_trainer::adapter::load_adapter;
use kubetune_trainer::adapter::sha256_hex;
use kubetune_trainer::config::ModelConfig;
use kubetune_trainer::data::load_preferences;
use kubetune_trainer::dpo::{DpoSettings, preference_accuracy};
use kubetune_trainer::error::Error;
use kubetune_trainer::lora::LoraSettings;
use kubetune_trainer::model::{Llama, Pass};
use kubetune_trainer::test_support::{TinyLlama, max_abs_diff, memorisable_chats, write_jsonl};
use kubetune_trainer::tokenizer::TextTokenizer;
use kubetune_trainer::train::{Control, MethodOptions, TrainOptions, train};

fn options(root: &Path, out: &str) -> TrainOptions {
    TrainOptions {
        method: MethodOptions::Lora,
        model_dir: root.join("model"),
        base_model_name: Some("tiny-llama".into()),
        train_file: root.join("train.jsonl"),
        eval_file: None,
        eval_split_percent: 0,
        format: DatasetFormat::Chat,
        output_dir: root.join(out),
        checkpoint_dir: root.join(out).join("checkpoints"),
        epochs: 1,
        max_steps: Some(100),
        learning_rate: 1e-2,
        batch_size: 4,
        grad_accum: 1,
        max_seq_length: 64,
        warmup_steps: 5,
        scheduler: Scheduler::Cosine,
        weight_decay: 0.0,
        max_grad_norm: 1.0,
        seed: 3,
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

fn setup(examples: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    TinyLlama::default()
        .write(&dir.path().join("model"))
        .expect("model");
    write_jsonl(
        &dir.path().join("train.jsonl"),
        &memorisable_chats(examples),
    )
    .expect("data");
    dir
}

#[test]
fn a_hundred_steps_on_a_memorisable_dataset_cut_the_training_loss_by_80_percent() {
    let dir = setup(8);
    let mut opts = options(dir.path(), "out");
    opts.eval_file = Some(dir.path().join("train.jsonl"));
    let summary = train(&opts, &Device::Cpu, &Control::default()).expect("train");
    assert_eq!(summary.steps, 100);
    let first = summary.loss_history[0];
    let last = summary.loss_history[99];
    println!(
        "loss {first:.4} -> {last:.4} ({:.1}% lower), {:.0} tokens/s",
        100.0 * (1.0 - last / first),
        summary.tokens_per_second
    );
    assert!(last <= 0.2 * first, "loss fell only from {first} to {last}");
    let (base, tuned) = (
        summary.base_eval_loss.expect("base"),
        summary.eval_loss.expect("tuned"),
    );
    assert!(tuned < 0.2 * base, "eval loss {base} -> {tuned}");
}

#[test]
fn qlora_on_an_nf4_base_cuts_the_training_loss_and_writes_a_plain_peft_adapter() {
    let dir = setup(8);
    let mut opts = options(dir.path(), "out");
    opts.method = MethodOptions::Qlora { double_quant: true };
    opts.max_steps = Some(60);
    opts.eval_file = Some(dir.path().join("train.jsonl"));
    let summary = train(&opts, &Device::Cpu, &Control::default()).expect("train");
    let (first, last) = (summary.loss_history[0], summary.loss_history[59]);
    println!("qlora loss {first:.4} -> {last:.4}");
    assert!(last <= 0.3 * first, "loss fell only from {first} to {last}");
    let (base, tuned) = (
        summary.base_eval_loss.expect("base"),
        summary.eval_loss.expect("tuned"),
    );
    assert!(tuned < 0.3 * base, "eval loss {base} -> {tuned}");
    let out = dir.path().join("out");
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("adapter_config.json")).expect("config"))
            .expect("json");
    assert_eq!(config["peft_type"], "LORA");
    let tensors =
        candle_core::safetensors::load(out.join("adapter_model.safetensors"), &Device::Cpu)
            .expect("adapter");
    assert_eq!(tensors.len(), 2 * 7 * 2);
    assert!(
        tensors
            .keys()
            .all(|k| k.contains(".lora_A.") || k.contains(".lora_B."))
    );
}

/// Preference pairs a tiny model can learn to separate: the chosen answer is always
/// the animal's sound, the rejected one a colour, for prompts that differ.
fn separable_preferences(n: usize) -> Vec<serde_json::Value> {
    let animals = [
        ("cat", "meow"),
        ("dog", "woof"),
        ("cow", "moo"),
        ("duck", "quack"),
    ];
    let colours = ["red", "blue", "green", "grey"];
    (0..n)
        .map(|i| {
            let (animal, sound) = animals[i % animals.len()];
            serde_json::json!({
                "prompt": [{"role": "user", "content": format!("What does the {animal} say? ({i})")}],
                "chosen": [{"role": "assistant", "content": sound}],
                "rejected": [{"role": "assistant", "content": colours[(i / 4 + i) % 4]}],
            })
        })
        .collect()
}

#[test]
fn dpo_raises_preference_accuracy_on_a_separable_set_and_reports_rewards() {
    let dir = setup(4);
    write_jsonl(&dir.path().join("prefs.jsonl"), &separable_preferences(16)).expect("data");
    let mut opts = options(dir.path(), "dpo");
    opts.method = MethodOptions::Dpo(DpoSettings {
        beta: 0.1,
        label_smoothing: 0.0,
    });
    opts.format = DatasetFormat::Preference;
    opts.train_file = dir.path().join("prefs.jsonl");
    opts.eval_file = Some(dir.path().join("prefs.jsonl"));
    opts.max_steps = Some(40);
    opts.learning_rate = 5e-3;
    opts.batch_size = 4;

    let config = ModelConfig::load(&opts.model_dir).expect("config");
    let tokenizer = TextTokenizer::load(&opts.model_dir, &config).expect("tokenizer");
    let pairs = load_preferences(&opts.train_file, &tokenizer, 64).expect("pairs");
    let base = Llama::load(&opts.model_dir, &Device::Cpu).expect("model");
    let before = preference_accuracy(&base, &pairs, 4, tokenizer.pad_id, Pass::BASE).expect("acc");

    let control = Control::default();
    let summary = train(&opts, &Device::Cpu, &control).expect("train");
    let (first, last) = (summary.loss_history[0], summary.loss_history[39]);
    println!(
        "dpo loss {first:.4} -> {last:.4}, metrics {:?}",
        summary.metrics
    );
    // The first step's policy is the reference: every pair's loss is ln 2.
    assert!((first - std::f64::consts::LN_2).abs() < 1e-5, "{first}");
    assert!(last < 0.3, "loss fell only to {last}");
    assert!((summary.base_eval_loss.expect("base") - std::f64::consts::LN_2).abs() < 1e-5);
    assert!(summary.eval_loss.expect("eval") < 0.3);
    let m = &summary.metrics;
    assert_eq!(m["eval_accuracy"], 1.0, "{m:?}");
    assert!(
        m["eval_rewards/chosen"] > 0.0 && m["eval_rewards/rejected"] < 0.0,
        "{m:?}"
    );
    assert!(
        (m["eval_margin"] - (m["eval_rewards/chosen"] - m["eval_rewards/rejected"])).abs() < 1e-9
    );
    for key in ["rewards/chosen", "rewards/rejected", "accuracy", "margin"] {
        assert!(m.contains_key(key), "{key} missing from {m:?}");
    }
    // The progress JSON carries the same figures for the operator.
    let progress = serde_json::to_value(&*control.progress.lock().expect("lock")).expect("json");
    assert!(
        progress["metrics"]["eval_accuracy"].as_f64() == Some(1.0),
        "{progress}"
    );

    // The tuned policy itself now prefers every chosen answer.
    let mut tuned = Llama::load(&opts.model_dir, &Device::Cpu).expect("model");
    let (settings, adapter) = load_adapter(&dir.path().join("dpo"), &Device::Cpu).expect("adapter");
    tuned.set_lora(settings, adapter).expect("set");
    let after = preference_accuracy(&tuned, &pairs, 4, tokenizer.pad_id, Pass::EVAL).expect("acc");
    println!("preference accuracy {before:.2} -> {after:.2}");
    assert!(
        before < 0.9,
        "the base model already separates the set ({before})"
    );
    assert_eq!(after, 1.0);
}

#[test]
fn an_interrupted_and_resumed_dpo_run_ends_with_the_same_adapter() {
    let dir = setup(4);
    write_jsonl(&dir.path().join("prefs.jsonl"), &separable_preferences(10)).expect("data");
    let configure = |out: &str| {
        let mut opts = options(dir.path(), out);
        opts.method = MethodOptions::Dpo(DpoSettings {
            beta: 0.2,
            label_smoothing: 0.1,
        });
        opts.format = DatasetFormat::Preference;
        opts.train_file = dir.path().join("prefs.jsonl");
        opts.max_steps = Some(6);
        opts.batch_size = 2;
        opts.grad_accum = 2;
        opts.lora.dropout = 0.1;
        opts.checkpoint_every = 2;
        opts
    };
    let whole = train(&configure("whole"), &Device::Cpu, &Control::default()).expect("whole");
    let mut first = configure("resumed");
    first.interrupt_after_step = Some(3);
    let err = train(&first, &Device::Cpu, &Control::default()).expect_err("interrupted");
    assert!(matches!(err, Error::Interrupted { step: 3 }), "{err}");
    let resumed = train(&configure("resumed"), &Device::Cpu, &Control::default()).expect("resume");
    assert_eq!(resumed.resumed_from_step, 3);
    assert_eq!(resumed.adapter.sha256, whole.adapter.sha256);
    assert_eq!(resumed.metrics, whole.metrics);
}

#[test]
fn an_interrupted_and_resumed_run_ends_with_the_same_adapter_as_an_uninterrupted_one() {
    let dir = setup(10);
    let configure = |out: &str| {
        let mut opts = options(dir.path(), out);
        opts.max_steps = None;
        opts.epochs = 3;
        opts.batch_size = 2;
        opts.grad_accum = 2;
        opts.lora.dropout = 0.1;
        opts.weight_decay = 0.01;
        opts.checkpoint_every = 2;
        opts
    };
    let whole = configure("whole");
    let summary = train(&whole, &Device::Cpu, &Control::default()).expect("uninterrupted");
    assert_eq!(summary.steps, 8, "3 epochs of 5 micro-batches, 2 per step");

    let mut first = configure("resumed");
    first.interrupt_after_step = Some(5);
    let err = train(&first, &Device::Cpu, &Control::default()).expect_err("interrupted");
    assert!(matches!(err, Error::Interrupted { step: 5 }), "{err}");
    let checkpoints: Vec<String> = std::fs::read_dir(&first.checkpoint_dir)
        .expect("checkpoints")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    let mut sorted = checkpoints.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        ["checkpoint-00000004", "checkpoint-00000005"],
        "keeps the last two"
    );

    let second = configure("resumed");
    let resumed = train(&second, &Device::Cpu, &Control::default()).expect("resumed");
    assert_eq!(resumed.resumed_from_step, 5);
    assert_eq!(resumed.loss_history, summary.loss_history);

    let load = |out: &str| {
        candle_core::safetensors::load(
            dir.path().join(out).join("adapter_model.safetensors"),
            &Device::Cpu,
        )
        .expect("adapter")
    };
    let (a, b) = (load("whole"), load("resumed"));
    assert_eq!(a.len(), b.len());
    for (key, ta) in &a {
        let tb = &b[key];
        let diff = max_abs_diff(ta, tb);
        assert!(diff <= 1e-7, "{key} differs by {diff}");
    }
    assert_eq!(summary.adapter.sha256, resumed.adapter.sha256);
}

#[test]
fn the_adapter_is_written_with_peft_key_names_shapes_config_and_hash() {
    let dir = setup(4);
    let mut opts = options(dir.path(), "out");
    opts.max_steps = Some(2);
    opts.lora.rank = 4;
    opts.lora.targets = vec![
        TargetModule::QProj,
        TargetModule::VProj,
        TargetModule::DownProj,
    ];
    opts.eval_split_percent = 25;
    let summary = train(&opts, &Device::Cpu, &Control::default()).expect("train");
    let out = dir.path().join("out");

    let bytes = std::fs::read(out.join("adapter_model.safetensors")).expect("adapter");
    assert_eq!(summary.adapter.sha256, sha256_hex(&bytes));
    assert_eq!(summary.adapter.size_bytes, bytes.len() as u64);
    let (_, metadata) = safetensors::SafeTensors::read_metadata(&bytes).expect("header");
    let meta = metadata.metadata().clone().expect("metadata");
    assert_eq!(meta.get("format").map(String::as_str), Some("pt"));

    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).expect("tensors");
    let spec = TinyLlama::default();
    let hd = spec.hidden / spec.heads;
    let mut expected = Vec::new();
    for layer in 0..spec.layers {
        for (path, inp, out) in [
            ("self_attn.q_proj", spec.hidden, spec.heads * hd),
            ("self_attn.v_proj", spec.hidden, spec.kv_heads * hd),
            ("mlp.down_proj", spec.intermediate, spec.hidden),
        ] {
            let key = format!("base_model.model.model.layers.{layer}.{path}");
            expected.push((format!("{key}.lora_A.weight"), vec![4, inp]));
            expected.push((format!("{key}.lora_B.weight"), vec![out, 4]));
        }
    }
    assert_eq!(tensors.len(), expected.len());
    for (key, shape) in expected {
        let t = tensors.get(&key).unwrap_or_else(|| panic!("missing {key}"));
        assert_eq!(t.dims(), shape.as_slice(), "{key}");
        assert_eq!(t.dtype(), DType::F32);
    }

    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("adapter_config.json")).expect("config"))
            .expect("json");
    assert_eq!(config["peft_type"], "LORA");
    assert_eq!(config["task_type"], "CAUSAL_LM");
    assert_eq!(config["r"], 4);
    assert_eq!(config["lora_alpha"], 16);
    assert_eq!(config["bias"], "none");
    assert_eq!(config["use_rslora"], false);
    assert_eq!(config["fan_in_fan_out"], false);
    assert_eq!(config["base_model_name_or_path"], "tiny-llama");
    assert_eq!(
        config["target_modules"],
        serde_json::json!(["down_proj", "q_proj", "v_proj"])
    );

    let metrics: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("metrics.json")).expect("metrics"))
            .expect("json");
    assert_eq!(metrics["adapter"]["sha256"], summary.adapter.sha256);
    assert_eq!(metrics["evalExamples"], 1);
    assert_eq!(metrics["trainExamples"], 3);
    assert!(metrics["baseEvalLoss"].as_f64().expect("base eval") > 0.0);
}
