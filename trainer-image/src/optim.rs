//! AdamW with f32 moments, global-norm gradient clipping, and the learning-rate
//! schedules of Hugging Face's `get_{cosine,linear,constant}_schedule_with_warmup`.

use candle_core::{DType, Tensor, Var};
use kubetune_crds::training::Scheduler;

use crate::error::{Error, Result};

/// AdamW hyperparameters.
#[derive(Clone, Debug, PartialEq)]
pub struct AdamWConfig {
    /// β₁.
    pub beta1: f64,
    /// β₂.
    pub beta2: f64,
    /// ε.
    pub eps: f64,
    /// Decoupled weight decay (PyTorch's: `p ← p·(1 − lr·wd)`).
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// AdamW over a fixed list of f32 parameters, with checkpointable state.
///
/// With the optimizer state sharded across data-parallel ranks (ZeRO stage 1), each
/// rank keeps the moments of, and updates, only the parameters it owns; the others'
/// moments are `None` here, and the ranks swap the updated weights after each step.
#[derive(Debug)]
pub struct AdamW {
    config: AdamWConfig,
    /// Completed optimizer steps (for bias correction).
    pub step: u64,
    /// First moments, one per parameter; `None` where another rank owns it.
    m: Vec<Option<Tensor>>,
    /// Second moments, one per parameter; `None` where another rank owns it.
    v: Vec<Option<Tensor>>,
}

/// The moments of every parameter, as a checkpoint holds them.
#[derive(Clone, Debug)]
pub struct Moments {
    /// First moments, one per parameter.
    pub m: Vec<Tensor>,
    /// Second moments, one per parameter.
    pub v: Vec<Tensor>,
}

impl AdamW {
    /// Zero state for every parameter of `params`.
    pub fn new(config: AdamWConfig, params: &[&Var]) -> Result<Self> {
        Self::sharded(config, params, &vec![true; params.len()])
    }

    /// Zero state for the parameters of `params` whose `owned` entry is true; the
    /// others are left to other ranks.
    pub fn sharded(config: AdamWConfig, params: &[&Var], owned: &[bool]) -> Result<Self> {
        if owned.len() != params.len() {
            return Err(Error::invalid(format!(
                "{} ownership flags for {} parameters",
                owned.len(),
                params.len()
            )));
        }
        let zeros = |(p, owned): (&&Var, &bool)| -> candle_core::Result<Option<Tensor>> {
            owned
                .then(|| p.as_tensor().zeros_like()?.to_dtype(DType::F32))
                .transpose()
        };
        Ok(Self {
            config,
            step: 0,
            m: params
                .iter()
                .zip(owned)
                .map(zeros)
                .collect::<candle_core::Result<_>>()?,
            v: params
                .iter()
                .zip(owned)
                .map(zeros)
                .collect::<candle_core::Result<_>>()?,
        })
    }

    /// The moments of parameter `i`, when this optimizer owns it.
    pub fn moments_of(&self, i: usize) -> Option<(&Tensor, &Tensor)> {
        Some((self.m.get(i)?.as_ref()?, self.v.get(i)?.as_ref()?))
    }

    /// Every parameter's moments, when this optimizer owns them all.
    pub fn moments(&self) -> Option<Moments> {
        Some(Moments {
            m: self.m.iter().cloned().collect::<Option<_>>()?,
            v: self.v.iter().cloned().collect::<Option<_>>()?,
        })
    }

    /// Bytes of moment state this optimizer holds.
    pub fn state_bytes(&self) -> u64 {
        self.m
            .iter()
            .chain(&self.v)
            .flatten()
            .map(|t| (t.elem_count() * t.dtype().size_in_bytes()) as u64)
            .sum()
    }

    /// Replaces the state with a saved one of every parameter (shapes checked), keeping
    /// the moments of the parameters this optimizer owns.
    pub fn restore(&mut self, step: u64, saved: Moments) -> Result<()> {
        let mismatch = || Error::invalid("checkpoint optimizer state does not match the model");
        if saved.m.len() != self.m.len() || saved.v.len() != self.v.len() {
            return Err(mismatch());
        }
        for (mine, theirs) in [(&mut self.m, saved.m), (&mut self.v, saved.v)] {
            for (slot, new) in mine.iter_mut().zip(theirs) {
                if let Some(old) = slot {
                    if new.dims() != old.dims() {
                        return Err(mismatch());
                    }
                    *old = new.to_dtype(DType::F32)?;
                }
            }
        }
        self.step = step;
        Ok(())
    }

    /// One update with learning rate `lr` and (already clipped) gradients `grads`, of
    /// the parameters this optimizer owns.
    pub fn update(&mut self, params: &[&Var], grads: &[Tensor], lr: f64) -> Result<()> {
        self.step += 1;
        let c = &self.config;
        let t = self.step as i32;
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2 = 1.0 - c.beta2.powi(t);
        for (i, (param, grad)) in params.iter().zip(grads).enumerate() {
            let (Some(m), Some(v)) = (&self.m[i], &self.v[i]) else {
                continue;
            };
            let m = ((m * c.beta1)? + (grad * (1.0 - c.beta1))?)?;
            let v = ((v * c.beta2)? + (grad.sqr()? * (1.0 - c.beta2))?)?;
            let denom = ((&v * (1.0 / bc2))?.sqrt()? + c.eps)?;
            let step = ((&m * (lr / bc1))? / denom)?;
            let decayed = (param.as_tensor() * (1.0 - lr * c.weight_decay))?;
            param.set(&(decayed - step)?)?;
            self.m[i] = Some(m);
            self.v[i] = Some(v);
        }
        Ok(())
    }
}

/// The global L2 norm of `grads`.
pub fn global_norm(grads: &[Tensor]) -> Result<f64> {
    let mut total = 0.0f64;
    for g in grads {
        total += f64::from(g.sqr()?.sum_all()?.to_scalar::<f32>()?);
    }
    Ok(total.sqrt())
}

/// Scales `grads` so their global norm is at most `max_norm` (PyTorch's
/// `clip_grad_norm_`: factor `max_norm / (norm + 1e-6)` when below 1). Returns the norm
/// before clipping. `max_norm` 0 disables clipping.
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64> {
    let norm = global_norm(grads)?;
    if max_norm > 0.0 {
        let factor = max_norm / (norm + 1e-6);
        if factor < 1.0 {
            for g in grads.iter_mut() {
                *g = (&*g * factor)?;
            }
        }
    }
    Ok(norm)
}

/// Learning rate at optimizer step `step` (0-based) of `total`.
pub fn learning_rate(peak: f64, scheduler: Scheduler, warmup: u64, step: u64, total: u64) -> f64 {
    if step < warmup {
        return peak * step as f64 / warmup.max(1) as f64;
    }
    let decay_steps = total.saturating_sub(warmup).max(1) as f64;
    let progress = (step - warmup) as f64 / decay_steps;
    let factor = match scheduler {
        Scheduler::Constant => 1.0,
        Scheduler::Linear => (1.0 - progress).max(0.0),
        Scheduler::Cosine => (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0),
    };
    peak * factor
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn schedule_warms_up_linearly_then_decays_to_zero() {
        let lr = |s, step| learning_rate(1.0, s, 10, step, 110);
        assert_eq!(lr(Scheduler::Cosine, 0), 0.0);
        assert_eq!(lr(Scheduler::Cosine, 5), 0.5);
        assert_eq!(lr(Scheduler::Cosine, 10), 1.0);
        assert!((lr(Scheduler::Cosine, 60) - 0.5).abs() < 1e-12);
        assert!(lr(Scheduler::Cosine, 110).abs() < 1e-12);
        assert!((lr(Scheduler::Linear, 60) - 0.5).abs() < 1e-12);
        assert_eq!(lr(Scheduler::Constant, 100), 1.0);
    }

    #[test]
    fn adamw_first_step_moves_each_weight_by_lr_against_the_gradient_sign() {
        let dev = Device::Cpu;
        let p = Var::from_slice(&[1.0f32, -2.0, 3.0], 3, &dev).expect("var");
        let mut opt = AdamW::new(
            AdamWConfig {
                weight_decay: 0.1,
                ..AdamWConfig::default()
            },
            &[&p],
        )
        .expect("adamw");
        let g = Tensor::new(&[0.5f32, -4.0, 0.0], &dev).expect("grad");
        opt.update(&[&p], &[g], 0.01).expect("update");
        let got = p.as_tensor().to_vec1::<f32>().expect("vec");
        // Bias-corrected Adam's first step is lr·sign(g); decay shrinks by 1 − lr·wd.
        let expected = [1.0 * 0.999 - 0.01, -2.0 * 0.999 + 0.01, 3.0 * 0.999];
        for (a, b) in got.iter().zip(expected) {
            assert!((a - b).abs() < 1e-5, "{got:?} vs {expected:?}");
        }
    }

    #[test]
    fn a_sharded_optimizer_updates_and_keeps_state_only_for_what_it_owns() {
        let dev = Device::Cpu;
        let a = Var::from_slice(&[1.0f32, 2.0], 2, &dev).expect("var");
        let b = Var::from_slice(&[3.0f32, 4.0, 5.0], 3, &dev).expect("var");
        let config = AdamWConfig::default();
        let mut full = AdamW::new(config.clone(), &[&a, &b]).expect("adamw");
        let mut half = AdamW::sharded(config, &[&a, &b], &[false, true]).expect("adamw");
        assert_eq!(full.state_bytes(), 2 * 5 * 4);
        assert_eq!(half.state_bytes(), 2 * 3 * 4);
        assert!(half.moments().is_none() && full.moments().is_some());
        let grads = [
            Tensor::new(&[0.5f32, -1.0], &dev).expect("grad"),
            Tensor::new(&[1.0f32, 0.0, -2.0], &dev).expect("grad"),
        ];
        let (a2, b2) = (
            Var::from_slice(&[1.0f32, 2.0], 2, &dev).expect("var"),
            Var::from_slice(&[3.0f32, 4.0, 5.0], 3, &dev).expect("var"),
        );
        full.update(&[&a, &b], &grads, 0.1).expect("update");
        half.update(&[&a2, &b2], &grads, 0.1).expect("update");
        // The owned parameter moves exactly as with the whole state; the other is left
        // for its owner.
        assert_eq!(
            b.as_tensor().to_vec1::<f32>().expect("vec"),
            b2.as_tensor().to_vec1::<f32>().expect("vec")
        );
        assert_eq!(a2.as_tensor().to_vec1::<f32>().expect("vec"), [1.0, 2.0]);
        assert_eq!(half.step, 1);

        // Restoring a whole state keeps the owned share.
        let saved = full.moments().expect("all owned");
        half.restore(7, saved.clone()).expect("restore");
        assert_eq!(half.step, 7);
        let (m, _) = half.moments_of(1).expect("owned");
        assert_eq!(
            m.to_vec1::<f32>().expect("vec"),
            saved.m[1].to_vec1::<f32>().expect("vec")
        );
        assert!(half.moments_of(0).is_none());
    }

    #[test]
    fn clipping_scales_gradients_to_the_max_norm() {
        let dev = Device::Cpu;
        let mut grads = vec![
            Tensor::new(&[3.0f32], &dev).expect("t"),
            Tensor::new(&[4.0f32], &dev).expect("t"),
        ];
        let norm = clip_grad_norm(&mut grads, 1.0).expect("clip");
        assert!((norm - 5.0).abs() < 1e-6);
        assert!((global_norm(&grads).expect("norm") - 1.0).abs() < 1e-5);
    }
}
