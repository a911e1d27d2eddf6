//! The decoder's numerics: adapter gradients against finite differences, merged versus
//! unmerged adapters, layer-wise recompute, and that every trainable tensor learns.

use candle_core::{Device, Tensor, Var};
use kubetune_crds::training::{DatasetFormat, TargetModule};
use kubetune_trainer::data::{load_dataset, make_batch};
use kubetune_trainer::lora::{DropoutKey, LoraSettings};
use kubetune_trainer::model::{BaseFormat, Llama, Pass};
use kubetune_trainer::rng::Rng;
use kubetune_trainer::test_support::{
    TinyLlama, max_abs, max_abs_diff, memorisable_chats, write_jsonl,
};
use kubetune_trainer::tokenizer::TextTokenizer;
use kubetune_trainer::train::forward_backward;

struct Fixture {
    _dir: tempfile::TempDir,
    model: Llama,
    batch: kubetune_trainer::data::Batch,
}

/// A tiny model with adapters on every module whose B is random (a fresh B is zero,
/// which would make every gradient of A vanish).
fn fixture(tie: bool) -> Fixture {
    fixture_of(TinyLlama {
        tie_embeddings: tie,
        ..TinyLlama::default()
    })
}

fn fixture_of(spec: TinyLlama) -> Fixture {
    fixture_as(spec, BaseFormat::Frozen)
}

fn fixture_as(spec: TinyLlama, format: BaseFormat) -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    spec.write(dir.path()).expect("write model");
    let mut model = Llama::load_as(dir.path(), &Device::Cpu, format).expect("load");
    let settings = LoraSettings {
        rank: 4,
        alpha: 8.0,
        dropout: 0.1,
        rs_lora: false,
        targets: TargetModule::ALL.to_vec(),
    };
    model.add_lora(settings, &mut Rng::new(1)).expect("lora");
    let mut rng = Rng::new(2);
    for (key, var) in model.lora_params() {
        if key.contains("lora_B") {
            let n = var.as_tensor().elem_count();
            let values: Vec<f32> = (0..n).map(|_| (rng.next_f32() - 0.5) * 0.2).collect();
            let t = Tensor::from_vec(values, var.as_tensor().shape(), &Device::Cpu).expect("t");
            var.set(&t).expect("set");
        }
    }
    let data = dir.path().join("data.jsonl");
    write_jsonl(&data, &memorisable_chats(3)).expect("data");
    let tokenizer = TextTokenizer::load(dir.path(), &model.config).expect("tokenizer");
    let examples = load_dataset(&data, DatasetFormat::Chat, &tokenizer, 64).expect("dataset");
    let refs: Vec<_> = examples.iter().collect();
    let batch = make_batch(&refs, tokenizer.pad_id, &Device::Cpu).expect("batch");
    Fixture {
        _dir: dir,
        model,
        batch,
    }
}

const TRAIN_PASS: Pass = Pass {
    adapters: true,
    dropout: Some(DropoutKey {
        seed: 5,
        micro_batch: 3,
    }),
};

fn loss(f: &Fixture, pass: Pass) -> f64 {
    let params: Vec<&Var> = Vec::new();
    forward_backward(&f.model, &f.batch, &params, 1.0, pass, false)
        .expect("forward")
        .0
}

#[test]
fn adapter_gradients_match_finite_differences() {
    check_finite_differences(&fixture(false));
}

#[test]
fn qwen2_checkpoints_with_qkv_biases_load_and_differentiate_correctly() {
    let f = fixture_of(TinyLlama {
        qwen2: true,
        llama3_rope: false,
        ..TinyLlama::default()
    });
    check_finite_differences(&f);
}

#[test]
fn qlora_adapter_gradients_through_nf4_base_weights_match_finite_differences() {
    let f = fixture_as(TinyLlama::default(), BaseFormat::Nf4 { double_quant: true });
    assert!(
        f.model
            .blocks()
            .iter()
            .all(|b| b.linears().iter().all(|l| l.is_quantized()))
    );
    check_finite_differences(&f);
}

#[test]
fn an_nf4_model_computes_what_the_dense_model_with_dequantized_weights_computes() {
    let f = fixture_as(
        TinyLlama::default(),
        BaseFormat::Nf4 {
            double_quant: false,
        },
    );
    let dense = fixture(false);
    let ids = f.batch.ids.clone();
    let quantized = f.model.logits(&ids, Pass::BASE).expect("nf4 logits");
    let full = dense.model.logits(&ids, Pass::BASE).expect("dense logits");
    // Quantization moves the logits, but by far less than their spread.
    let moved = max_abs_diff(&quantized, &full);
    assert!(moved > 0.0 && moved < 0.25 * max_abs(&full), "{moved}");
    // A dense model holding exactly the dequantized weights agrees to rounding.
    let mut replica = f.model.clone();
    replica.dequantize_base().expect("dequantize");
    assert!(replica.base_linear_bytes() > 7 * f.model.base_linear_bytes());
    let same = replica.logits(&ids, Pass::BASE).expect("replica logits");
    assert!(max_abs_diff(&quantized, &same) < 1e-4);
}

fn check_finite_differences(f: &Fixture) {
    let named = f.model.lora_params();
    let params: Vec<&Var> = named.iter().map(|(_, v)| *v).collect();
    let (_, grads) =
        forward_backward(&f.model, &f.batch, &params, 1.0, TRAIN_PASS, false).expect("backward");
    let mut rng = Rng::new(9);
    for ((key, var), grad) in named.iter().zip(&grads) {
        // The directional derivative along a random direction d: g·d against
        // (L(θ+εd) − L(θ−εd)) / 2ε. It checks the whole tensor at once and is far less
        // sensitive to f32 rounding than single entries.
        let original = var.as_tensor().copy().expect("copy");
        let n = original.elem_count();
        let d: Vec<f32> = (0..n).map(|_| rng.next_f32() - 0.5).collect();
        let d = Tensor::from_vec(d, original.shape(), &Device::Cpu).expect("d");
        let analytic = f64::from(
            (grad * &d)
                .expect("mul")
                .sum_all()
                .expect("sum")
                .to_scalar::<f32>()
                .expect("scalar"),
        );
        let eps = 1e-2;
        var.set(&(&original + (&d * eps).expect("scale")).expect("add"))
            .expect("set");
        let plus = loss(f, TRAIN_PASS);
        var.set(&(&original - (&d * eps).expect("scale")).expect("sub"))
            .expect("set");
        let minus = loss(f, TRAIN_PASS);
        var.set(&original).expect("restore");
        let numeric = (plus - minus) / (2.0 * eps);
        let tolerance = 2e-2 * analytic.abs().max(numeric.abs()) + 2e-3;
        assert!(
            (analytic - numeric).abs() <= tolerance,
            "{key}: analytic {analytic} vs finite difference {numeric}"
        );
    }
}

#[test]
fn every_trainable_tensor_gets_a_nonzero_gradient() {
    for tie in [false, true] {
        let f = fixture(tie);
        let named = f.model.lora_params();
        assert_eq!(named.len(), 2 * 7 * 2, "two layers, seven modules, A and B");
        let params: Vec<&Var> = named.iter().map(|(_, v)| *v).collect();
        let (_, grads) = forward_backward(&f.model, &f.batch, &params, 1.0, TRAIN_PASS, false)
            .expect("backward");
        for ((key, _), grad) in named.iter().zip(&grads) {
            let max = max_abs(grad);
            assert!(max > 0.0, "{key} got no gradient (tied embeddings: {tie})");
        }
    }
}

#[test]
fn layer_wise_recompute_gives_the_same_gradients_as_the_full_graph() {
    let f = fixture(false);
    let named = f.model.lora_params();
    let params: Vec<&Var> = named.iter().map(|(_, v)| *v).collect();
    let (loss_full, full) =
        forward_backward(&f.model, &f.batch, &params, 0.5, TRAIN_PASS, false).expect("full");
    let (loss_re, re) =
        forward_backward(&f.model, &f.batch, &params, 0.5, TRAIN_PASS, true).expect("recompute");
    assert_eq!(loss_full, loss_re);
    for ((key, _), (a, b)) in named.iter().zip(full.iter().zip(&re)) {
        let diff = max_abs_diff(a, b);
        let scale = max_abs(a);
        assert!(
            diff <= 1e-5 * scale.max(1e-3),
            "{key}: gradients differ by {diff}"
        );
    }
}

#[test]
fn merged_weights_give_the_same_logits_as_the_unmerged_adapter() {
    let mut f = fixture(false);
    let ids = f.batch.ids.clone();
    let unmerged = f.model.logits(&ids, Pass::EVAL).expect("unmerged");
    let base = f.model.logits(&ids, Pass::BASE).expect("base");
    f.model.merge_lora().expect("merge");
    let merged = f.model.logits(&ids, Pass::BASE).expect("merged");
    assert!(
        max_abs_diff(&unmerged, &merged) < 1e-4,
        "merge changed the output"
    );
    assert!(
        max_abs_diff(&unmerged, &base) > 1e-2,
        "the adapter had no effect to compare"
    );
}
