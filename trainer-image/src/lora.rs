//! LoRA adapters: the trainable low-rank update `B·A` beside a frozen linear layer, with
//! PEFT's initialisation and scaling.
//!
//! PEFT computes `base(x) + B(A(dropout(x)))·s` with `s = alpha/r` (or `alpha/√r` with
//! rsLoRA), initialises A like `kaiming_uniform_(a=√5)`, i.e. U(−1/√in, 1/√in), and B
//! as zeros, so a fresh adapter leaves the model unchanged. See PEFT's
//! `tuners/lora/layer.py` (`update_layer`, `reset_lora_parameters`).

use candle_core::{DType, Device, Tensor, Var};
use kubetune_crds::training::TargetModule;

use crate::error::Result;
use crate::rng::Rng;

/// Settings shared by every adapter of a model.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraSettings {
    /// Rank r.
    pub rank: usize,
    /// alpha (PEFT's `lora_alpha`).
    pub alpha: f64,
    /// Dropout probability on the adapter's input while training.
    pub dropout: f64,
    /// Scale by alpha/√r instead of alpha/r.
    pub rs_lora: bool,
    /// The adapted linear layers.
    pub targets: Vec<TargetModule>,
}

impl LoraSettings {
    /// The factor the update is multiplied by, as PEFT computes it.
    pub fn scaling(&self) -> f64 {
        let r = self.rank as f64;
        if self.rs_lora {
            self.alpha / r.sqrt()
        } else {
            self.alpha / r
        }
    }
}

/// One adapter: A `[r, in]` and B `[out, r]`, trainable, always f32.
#[derive(Clone, Debug)]
pub struct LoraPair {
    /// The down projection.
    pub a: Var,
    /// The up projection.
    pub b: Var,
}

impl LoraPair {
    /// PEFT's initialisation: A ~ U(−1/√in, 1/√in), B = 0.
    pub fn init(
        in_dim: usize,
        out_dim: usize,
        rank: usize,
        rng: &mut Rng,
        dev: &Device,
    ) -> Result<Self> {
        let bound = 1.0 / (in_dim as f64).sqrt();
        let a: Vec<f32> = (0..rank * in_dim)
            .map(|_| ((rng.next_f64() * 2.0 - 1.0) * bound) as f32)
            .collect();
        let a = Var::from_tensor(&Tensor::from_vec(a, (rank, in_dim), dev)?)?;
        let b = Var::zeros((out_dim, rank), DType::F32, dev)?;
        Ok(Self { a, b })
    }

    /// An adapter from saved tensors.
    pub fn from_tensors(a: &Tensor, b: &Tensor) -> Result<Self> {
        Ok(Self {
            a: Var::from_tensor(&a.to_dtype(DType::F32)?)?,
            b: Var::from_tensor(&b.to_dtype(DType::F32)?)?,
        })
    }

    /// `s · B·A`, the dense update this adapter adds to the weight.
    pub fn delta(&self, scaling: f64) -> Result<Tensor> {
        Ok((self.b.as_tensor().matmul(self.a.as_tensor())? * scaling)?)
    }
}

/// Adapters by (layer, module), as read from or written to a PEFT file.
pub type AdapterPairs = Vec<(usize, TargetModule, LoraPair)>;

/// Which dropout mask a forward pass draws, so that the same pass re-run (layer-wise
/// recompute) or replayed after a resume draws the same one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DropoutKey {
    /// The run's seed.
    pub seed: u64,
    /// Global index of the micro-batch.
    pub micro_batch: u64,
}

/// An inverted-dropout mask (`0` or `1/(1−p)`) of `shape` for one adapted layer.
pub fn dropout_mask(
    key: DropoutKey,
    layer: usize,
    module: TargetModule,
    p: f64,
    shape: (usize, usize),
    dev: &Device,
) -> Result<Tensor> {
    let stream = 0x6c6f_7261_0000 + (layer as u64) * 16 + module as u64;
    let mut rng = Rng::derive(key.seed, stream, key.micro_batch);
    let keep = (1.0 / (1.0 - p)) as f32;
    let values: Vec<f32> = (0..shape.0 * shape.1)
        .map(|_| if rng.next_f64() < p { 0.0 } else { keep })
        .collect();
    Ok(Tensor::from_vec(values, shape, dev)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_adapter_has_zero_b_and_a_within_the_kaiming_bound() {
        let pair = LoraPair::init(64, 32, 8, &mut Rng::new(1), &Device::Cpu).expect("init");
        assert_eq!(pair.a.as_tensor().dims(), &[8, 64]);
        assert_eq!(pair.b.as_tensor().dims(), &[32, 8]);
        let a = pair
            .a
            .as_tensor()
            .flatten_all()
            .expect("flat")
            .to_vec1::<f32>()
            .expect("vec");
        let bound = 1.0 / 8.0;
        assert!(a.iter().all(|v| v.abs() <= bound));
        assert!(
            a.iter().any(|v| v.abs() > bound / 2.0),
            "A is not spread over its range"
        );
        let b_max = pair
            .b
            .as_tensor()
            .abs()
            .expect("abs")
            .max_all()
            .expect("max");
        assert_eq!(b_max.to_scalar::<f32>().expect("scalar"), 0.0);
    }

    #[test]
    fn dropout_mask_keeps_about_one_minus_p_and_rescales() {
        let key = DropoutKey {
            seed: 1,
            micro_batch: 0,
        };
        let mask = dropout_mask(key, 0, TargetModule::QProj, 0.25, (100, 100), &Device::Cpu)
            .expect("mask");
        let values = mask
            .flatten_all()
            .expect("flat")
            .to_vec1::<f32>()
            .expect("vec");
        let kept = values.iter().filter(|v| **v > 0.0).count() as f64 / values.len() as f64;
        assert!((kept - 0.75).abs() < 0.03, "kept {kept}");
        assert!(
            values
                .iter()
                .all(|v| *v == 0.0 || (*v - 4.0 / 3.0).abs() < 1e-6)
        );
        let again = dropout_mask(key, 0, TargetModule::QProj, 0.25, (100, 100), &Device::Cpu)
            .expect("mask");
        assert_eq!(
            again.flatten_all().expect("f").to_vec1::<f32>().expect("v"),
            values
        );
    }
}
