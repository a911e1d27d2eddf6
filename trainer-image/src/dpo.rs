//! Direct Preference Optimization (Rafailov et al., 2023) with a LoRA adapter, as TRL's
//! `DPOTrainer` computes its sigmoid loss.
//!
//! A micro-batch of P preference pairs is one batch of 2P sequences (chosen first, then
//! rejected). Each sequence's log-probability is the sum over its completion tokens
//! only. The reference policy is the same model with the adapter disabled
//! ([`Pass::BASE`]), so no second model is held; its forward builds no graph because no
//! trainable tensor takes part. With Δ = (log πθ(c) − log πref(c)) − (log πθ(r) −
//! log πref(r)), the loss of a pair is `−(1−ε)·log σ(βΔ) − ε·log σ(−βΔ)` (ε: label
//! smoothing, conservative DPO), averaged over the pairs of an optimizer step.
//!
//! Reported, as TRL names them: `rewards/chosen` = β·(log πθ − log πref)(chosen),
//! `rewards/rejected` likewise, `accuracy` (the share of pairs whose chosen reward
//! exceeds the rejected one) and `margin` (chosen minus rejected reward), each a mean
//! over pairs.

use std::collections::BTreeMap;

use candle_core::{Device, Tensor};

use crate::data::{Batch, PreferencePair, make_batch};
use crate::error::Result;
use crate::model::{Llama, Pass};

/// DPO's settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DpoSettings {
    /// β, the strength of the pull towards the reference.
    pub beta: f64,
    /// ε, the probability that a label is flipped (0: plain DPO).
    pub label_smoothing: f64,
}

/// A micro-batch of preference pairs.
#[derive(Debug)]
pub struct PairBatch {
    /// 2P sequences: the chosen ones, then the rejected ones in the same order.
    pub batch: Batch,
    /// f32 `[2P, targets]`: 1 where a target row belongs to a sequence, so that
    /// `membership · logp` sums each sequence's completion.
    pub membership: Tensor,
    /// P.
    pub pairs: usize,
}

/// Pads `pairs` into one batch of their chosen then rejected sequences.
pub fn make_pair_batch(
    pairs: &[&PreferencePair],
    pad_id: u32,
    device: &Device,
) -> Result<PairBatch> {
    let sequences: Vec<_> = pairs
        .iter()
        .map(|p| &p.chosen)
        .chain(pairs.iter().map(|p| &p.rejected))
        .collect();
    let batch = make_batch(&sequences, pad_id, device)?;
    let (n_seq, seq) = batch.ids.dims2()?;
    let rows = batch.rows.to_vec1::<u32>()?;
    let mut membership = vec![0f32; n_seq * rows.len()];
    for (j, &row) in rows.iter().enumerate() {
        membership[(row as usize / seq) * rows.len() + j] = 1.0;
    }
    Ok(PairBatch {
        membership: Tensor::from_vec(membership, (n_seq, rows.len()), device)?,
        batch,
        pairs: pairs.len(),
    })
}

/// Sums of the completion log-probabilities of each sequence, f32 `[2P]`, from the
/// last block's hidden states `h`.
pub fn sequence_logps(model: &Llama, h: &Tensor, pb: &PairBatch) -> Result<Tensor> {
    let ce = model.head_loss_rows(h, &pb.batch.rows, &pb.batch.targets)?;
    Ok(pb.membership.matmul(&ce.unsqueeze(1)?)?.squeeze(1)?.neg()?)
}

/// The sequences' log-probabilities under `pass`, without a graph (for the reference
/// and for evaluation).
pub fn logps_under(model: &Llama, pb: &PairBatch, pass: Pass) -> Result<Tensor> {
    let (_, t) = pb.batch.ids.dims2()?;
    let pos = model.positions(t)?;
    let mut x = model.embed(&pb.batch.ids)?;
    for i in 0..model.blocks().len() {
        x = model.block_forward(i, &x, &pos, pass)?.detach();
    }
    Ok(sequence_logps(model, &x, pb)?.detach())
}

/// Sums over pairs of DPO's figures; [`DpoStats::metrics`] turns them into means.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct DpoStats {
    /// Pairs seen.
    pub pairs: usize,
    /// Summed loss.
    pub loss_sum: f64,
    /// Summed β·(log πθ − log πref)(chosen).
    pub chosen_reward_sum: f64,
    /// Summed β·(log πθ − log πref)(rejected).
    pub rejected_reward_sum: f64,
    /// Pairs whose chosen reward exceeds the rejected one.
    pub correct: usize,
}

impl DpoStats {
    /// Adds another batch's sums.
    pub fn add(&mut self, other: &Self) {
        self.pairs += other.pairs;
        self.loss_sum += other.loss_sum;
        self.chosen_reward_sum += other.chosen_reward_sum;
        self.rejected_reward_sum += other.rejected_reward_sum;
        self.correct += other.correct;
    }

    /// Mean loss per pair.
    pub fn mean_loss(&self) -> f64 {
        self.loss_sum / self.pairs.max(1) as f64
    }

    /// The means under TRL's names: `rewards/chosen`, `rewards/rejected`, `accuracy`,
    /// `margin`.
    pub fn metrics(&self) -> BTreeMap<String, f64> {
        let n = self.pairs.max(1) as f64;
        BTreeMap::from([
            ("rewards/chosen".to_owned(), self.chosen_reward_sum / n),
            ("rewards/rejected".to_owned(), self.rejected_reward_sum / n),
            ("accuracy".to_owned(), self.correct as f64 / n),
            (
                "margin".to_owned(),
                (self.chosen_reward_sum - self.rejected_reward_sum) / n,
            ),
        ])
    }
}

/// `log(1 + eˣ)`, stable for large |x| and differentiable.
fn softplus(x: &Tensor) -> Result<Tensor> {
    let tail = (x.abs()?.neg()?.exp()? + 1.0)?.log()?;
    Ok((x.relu()? + tail)?)
}

/// Per-pair losses `[P]` from the policy's and the reference's sequence
/// log-probabilities (`[2P]` each, chosen then rejected), and their figures.
pub fn dpo_loss(
    policy: &Tensor,
    reference: &Tensor,
    settings: DpoSettings,
) -> Result<(Tensor, DpoStats)> {
    let p = policy.dim(0)? / 2;
    let ratio = (policy - reference)?;
    let chosen = ratio.narrow(0, 0, p)?;
    let rejected = ratio.narrow(0, p, p)?;
    let z = ((&chosen - &rejected)? * settings.beta)?;
    let eps = settings.label_smoothing;
    // −log σ(z) = softplus(−z).
    let mut losses = (softplus(&z.neg()?)? * (1.0 - eps))?;
    if eps > 0.0 {
        losses = (losses + (softplus(&z)? * eps)?)?;
    }
    let chosen_rewards = (chosen.detach() * settings.beta)?.to_vec1::<f32>()?;
    let rejected_rewards = (rejected.detach() * settings.beta)?.to_vec1::<f32>()?;
    let loss_values = losses.detach().to_vec1::<f32>()?;
    let stats = DpoStats {
        pairs: p,
        loss_sum: loss_values.iter().map(|&l| f64::from(l)).sum(),
        chosen_reward_sum: chosen_rewards.iter().map(|&r| f64::from(r)).sum(),
        rejected_reward_sum: rejected_rewards.iter().map(|&r| f64::from(r)).sum(),
        correct: chosen_rewards
            .iter()
            .zip(&rejected_rewards)
            .filter(|(c, r)| c > r)
            .count(),
    };
    Ok((losses, stats))
}

/// DPO's figures over `pairs` with the policy run as `pass` (adapters on for the tuned
/// model; [`Pass::BASE`] gives the reference against itself: loss ln 2, rewards 0).
pub fn evaluate_dpo(
    model: &Llama,
    pairs: &[PreferencePair],
    batch_size: usize,
    pad_id: u32,
    pass: Pass,
    settings: DpoSettings,
) -> Result<DpoStats> {
    let mut total = DpoStats::default();
    for chunk in pairs.chunks(batch_size.max(1)) {
        let refs: Vec<&PreferencePair> = chunk.iter().collect();
        let pb = make_pair_batch(&refs, pad_id, model.device())?;
        let reference = logps_under(model, &pb, Pass::BASE)?;
        let policy = if pass.adapters {
            logps_under(model, &pb, pass)?
        } else {
            reference.clone()
        };
        let (_, stats) = dpo_loss(&policy, &reference, settings)?;
        total.add(&stats);
    }
    Ok(total)
}

/// The share of `pairs` whose chosen completion the model (under `pass`) finds more
/// likely than the rejected one: the policy's own preference, independent of the
/// reference.
pub fn preference_accuracy(
    model: &Llama,
    pairs: &[PreferencePair],
    batch_size: usize,
    pad_id: u32,
    pass: Pass,
) -> Result<f64> {
    let mut correct = 0;
    for chunk in pairs.chunks(batch_size.max(1)) {
        let refs: Vec<&PreferencePair> = chunk.iter().collect();
        let pb = make_pair_batch(&refs, pad_id, model.device())?;
        let logps = logps_under(model, &pb, pass)?.to_vec1::<f32>()?;
        let (chosen, rejected) = logps.split_at(pb.pairs);
        correct += chosen.iter().zip(rejected).filter(|(c, r)| c > r).count();
    }
    Ok(correct as f64 / pairs.len().max(1) as f64)
}

#[cfg(test)]
mod tests {
    use candle_core::Var;

    use super::*;

    fn log_sigmoid(x: f64) -> f64 {
        -(1.0 + (-x).exp()).ln()
    }

    #[test]
    fn loss_rewards_and_accuracy_match_a_hand_computed_batch() {
        let dev = Device::Cpu;
        // Two pairs: policy [c1, c2, r1, r2] and reference log-probabilities.
        let policy = Var::new(&[-10.0f32, -20.0, -14.0, -18.0], &dev).expect("policy");
        let reference = Tensor::new(&[-12.0f32, -19.0, -13.0, -19.0], &dev).expect("ref");
        let settings = DpoSettings {
            beta: 0.5,
            label_smoothing: 0.1,
        };
        let (losses, stats) = dpo_loss(policy.as_tensor(), &reference, settings).expect("loss");
        // Pair 1: chosen ratio +2, rejected −1, Δ = 3; pair 2: chosen −1, rejected +1, Δ = −2.
        let expected = |delta: f64| {
            let z = 0.5 * delta;
            -(0.9 * log_sigmoid(z)) - 0.1 * log_sigmoid(-z)
        };
        let got = losses.to_vec1::<f32>().expect("losses");
        assert!((f64::from(got[0]) - expected(3.0)).abs() < 1e-6, "{got:?}");
        assert!((f64::from(got[1]) - expected(-2.0)).abs() < 1e-6, "{got:?}");
        assert_eq!(stats.pairs, 2);
        assert!((stats.chosen_reward_sum - 0.5 * (2.0 - 1.0)).abs() < 1e-6);
        assert!((stats.rejected_reward_sum - 0.5 * (-1.0 + 1.0)).abs() < 1e-6);
        assert_eq!(stats.correct, 1);
        let metrics = stats.metrics();
        assert_eq!(metrics["accuracy"], 0.5);
        assert!((metrics["margin"] - 0.5 * (3.0 - 2.0) / 2.0).abs() < 1e-6);

        // The gradient of the mean loss w.r.t. the chosen log-probability of pair 1:
        // −β·[(1−ε)·σ(−z) − ε·σ(z)] / 2 at z = 1.5.
        let grads = (losses.sum_all().expect("sum") * 0.5)
            .expect("mean")
            .backward()
            .expect("backward");
        let g = grads
            .get(policy.as_tensor())
            .expect("grad")
            .to_vec1::<f32>()
            .expect("v");
        let sigmoid = |x: f64| 1.0 / (1.0 + (-x).exp());
        let expected_g = -0.5 * (0.9 * sigmoid(-1.5) - 0.1 * sigmoid(1.5)) / 2.0;
        assert!(
            (f64::from(g[0]) - expected_g).abs() < 1e-6,
            "{g:?} vs {expected_g}"
        );
        // The rejected side of the same pair gets the opposite gradient.
        assert!((g[2] + g[0]).abs() < 1e-7);
    }

    #[test]
    fn equal_policy_and_reference_give_ln_2_and_zero_rewards() {
        let dev = Device::Cpu;
        let logps = Tensor::new(&[-3.0f32, -4.0, -5.0, -1.0], &dev).expect("t");
        let (losses, stats) = dpo_loss(
            &logps,
            &logps,
            DpoSettings {
                beta: 0.1,
                label_smoothing: 0.0,
            },
        )
        .expect("loss");
        for l in losses.to_vec1::<f32>().expect("v") {
            assert!((f64::from(l) - std::f64::consts::LN_2).abs() < 1e-6);
        }
        assert_eq!(stats.correct, 0, "ties are not correct");
        assert_eq!(stats.chosen_reward_sum, 0.0);
    }

    #[test]
    fn the_loss_is_finite_for_large_margins() {
        let dev = Device::Cpu;
        let policy = Tensor::new(&[0.0f32, -1000.0], &dev).expect("t");
        let reference = Tensor::new(&[-1000.0f32, 0.0], &dev).expect("t");
        for (beta, eps) in [(1.0, 0.0), (1.0, 0.2)] {
            let (losses, _) = dpo_loss(
                &policy,
                &reference,
                DpoSettings {
                    beta,
                    label_smoothing: eps,
                },
            )
            .expect("loss");
            let l = f64::from(losses.to_vec1::<f32>().expect("v")[0]);
            // Δ = 2000: −log σ(2000) ≈ 0; with ε the −log σ(−2000) ≈ 2000 term dominates.
            assert!((l - eps * 2000.0).abs() < 1e-3, "{l}");
        }
    }
}
