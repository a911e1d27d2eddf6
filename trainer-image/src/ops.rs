//! Differentiable building blocks the decoder is made of.
//!
//! candle's fused kernels for softmax, RMSNorm and RoPE have no backward pass and cut
//! the autograd graph silently (see the crate docs), so these are written from ops that
//! do differentiate. [`frozen_linear`] is the one custom op: a matmul by a frozen
//! weight whose backward returns only the input's gradient, which saves the weight-
//! gradient GEMM and a weight-sized buffer per linear layer that candle's own matmul
//! would compute and keep.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, D, DType, Layout, Shape, Tensor};

use crate::error::Result;

/// `x · Wᵀ` for a frozen weight `W` of shape `[out, in]`.
#[derive(Debug)]
struct FrozenLinear;

/// The forward of a frozen linear layer at the storage level: `x · Wᵀ`, `x` `[m, k]`,
/// `W` `[n, k]`.
pub(crate) fn frozen_matmul<S: BackendStorage>(
    xs: &S,
    xl: &Layout,
    ws: &S,
    wl: &Layout,
) -> candle_core::Result<(S, Shape)> {
    let (m, k) = xl.shape().dims2()?;
    let (n, k2) = wl.shape().dims2()?;
    if k != k2 {
        candle_core::bail!("frozen linear: input width {k} but weight is [{n}, {k2}]");
    }
    let wt = wl.transpose(0, 1)?;
    let out = xs.matmul(ws, (1, m, n, k), xl, &wt)?;
    Ok((out, Shape::from((m, n))))
}

impl CustomOp2 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        frozen_matmul(xs, xl, ws, wl)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        ws: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        frozen_matmul(xs, xl, ws, wl)
    }

    fn bwd(
        &self,
        _x: &Tensor,
        weight: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // dL/dx = dL/dy · W; the frozen weight gets no gradient at all.
        Ok((Some(grad.contiguous()?.matmul(weight)?), None))
    }
}

/// `x · Wᵀ` over the last dimension of `x` (any leading shape), with `W` frozen.
pub fn frozen_linear(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let dims = x.dims();
    let (last, lead) = dims
        .split_last()
        .expect("linear input has at least one dim");
    let rows: usize = lead.iter().product();
    let x2 = x.reshape((rows, *last))?;
    let x2 = if x2.is_contiguous() {
        x2
    } else {
        x2.contiguous()?
    };
    let y = x2.apply_op2(weight, FrozenLinear)?;
    let mut out_shape = lead.to_vec();
    out_shape.push(weight.dim(0)?);
    Ok(y.reshape(out_shape)?)
}

/// `x · Wᵀ` over the last dimension of `x`: through [`frozen_linear`] for a frozen
/// weight, an ordinary (weight-differentiating) matmul for a trainable one, in `x`'s
/// dtype: a trainable f32 master weight is cast to it (bf16 on GPUs), and its gradient
/// flows back through the cast in f32.
pub fn linear(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    if !weight.is_variable() {
        return frozen_linear(x, &weight.to_dtype(x.dtype())?);
    }
    let dims = x.dims();
    let (last, lead) = dims
        .split_last()
        .expect("linear input has at least one dim");
    let rows: usize = lead.iter().product();
    let y = x
        .reshape((rows, *last))?
        .matmul(&weight.to_dtype(x.dtype())?.t()?)?;
    let mut out_shape = lead.to_vec();
    out_shape.push(weight.dim(0)?);
    Ok(y.reshape(out_shape)?)
}

/// Per-row cross-entropy `logsumexp(logits) − logits[target]` of f32 logits `[n, vocab]`
/// and u32 targets `[n]`, fused on the CPU: one pass forward, and a backward that
/// writes `softmax − onehot` directly instead of differentiating through a chain of
/// `[n, vocab]` intermediates (which would also all be kept alive until backward).
#[derive(Debug)]
struct CrossEntropy;

/// The gradient of [`CrossEntropy`] with respect to the logits, already multiplied by
/// the upstream per-row gradient, so backward allocates one `[n, vocab]` tensor (no
/// backward itself).
#[derive(Debug)]
struct CrossEntropyGrad;

fn ce_inputs<'a>(
    logits: &'a CpuStorage,
    ll: &Layout,
    targets: &'a CpuStorage,
    tl: &Layout,
) -> candle_core::Result<(&'a [f32], &'a [u32], usize)> {
    let (n, vocab) = ll.shape().dims2()?;
    let (Some((ls, le)), Some((ts, te))) = (ll.contiguous_offsets(), tl.contiguous_offsets())
    else {
        candle_core::bail!("cross-entropy needs contiguous inputs");
    };
    let logits = &logits.as_slice::<f32>()?[ls..le];
    let targets = &targets.as_slice::<u32>()?[ts..te];
    if targets.len() != n {
        candle_core::bail!("cross-entropy: {n} rows but {} targets", targets.len());
    }
    if let Some(bad) = targets.iter().find(|t| **t as usize >= vocab) {
        candle_core::bail!("cross-entropy: target {bad} outside the vocabulary of {vocab}");
    }
    Ok((logits, targets, vocab))
}

fn row_max_and_sum(row: &[f32]) -> (f32, f32) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum = row.iter().map(|x| (x - max).exp()).sum();
    (max, sum)
}

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "cross-entropy"
    }

    fn cpu_fwd(
        &self,
        ls: &CpuStorage,
        ll: &Layout,
        ts: &CpuStorage,
        tl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let (logits, targets, vocab) = ce_inputs(ls, ll, ts, tl)?;
        let losses: Vec<f32> = logits
            .par_chunks(vocab)
            .zip(targets.par_iter())
            .map(|(row, &t)| {
                let (max, sum) = row_max_and_sum(row);
                max + sum.ln() - row[t as usize]
            })
            .collect();
        let n = losses.len();
        Ok((CpuStorage::F32(losses), Shape::from(n)))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.to_dtype(DType::F32)?.contiguous()?;
        let dlogits = logits.apply_op3_no_bwd(targets, &grad, &CrossEntropyGrad)?;
        Ok((Some(dlogits), None))
    }
}

impl CustomOp3 for CrossEntropyGrad {
    fn name(&self) -> &'static str {
        "cross-entropy-grad"
    }

    fn cpu_fwd(
        &self,
        ls: &CpuStorage,
        ll: &Layout,
        ts: &CpuStorage,
        tl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let (logits, targets, vocab) = ce_inputs(ls, ll, ts, tl)?;
        let Some((gstart, gend)) = gl.contiguous_offsets() else {
            candle_core::bail!("cross-entropy gradient needs a contiguous upstream gradient");
        };
        let upstream = &gs.as_slice::<f32>()?[gstart..gend];
        if upstream.len() != targets.len() {
            candle_core::bail!("cross-entropy gradient: one upstream value per row expected");
        }
        let mut out = vec![0f32; logits.len()];
        out.par_chunks_mut(vocab)
            .zip(logits.par_chunks(vocab))
            .zip(targets.par_iter().zip(upstream.par_iter()))
            .for_each(|((o, row), (&t, &g))| {
                let (max, sum) = row_max_and_sum(row);
                let scale = g / sum;
                for (o, x) in o.iter_mut().zip(row) {
                    *o = (x - max).exp() * scale;
                }
                o[t as usize] -= g;
            });
        Ok((CpuStorage::F32(out), ll.shape().clone()))
    }
}

/// `softmax(scale·scores)` over the last dimension with a causal (and optionally
/// sliding-window) mask, fused on the CPU. Only the probabilities are kept for
/// backward, instead of every intermediate of the composed chain (scaled, masked,
/// shifted, exponentiated), which dominate activation memory at longer sequences.
#[derive(Debug)]
struct CausalSoftmax {
    scale: f32,
    window: usize,
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "causal-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let dims = l.dims();
        let (Some(&t), Some((start, end))) = (dims.last(), l.contiguous_offsets()) else {
            candle_core::bail!("causal softmax needs contiguous scores");
        };
        let scores = &s.as_slice::<f32>()?[start..end];
        let mut out = vec![0f32; scores.len()];
        out.par_chunks_mut(t)
            .zip(scores.par_chunks(t))
            .enumerate()
            .for_each(|(row, (o, x))| {
                let i = row % t;
                let first = (i + 1).saturating_sub(self.window);
                let visible = &x[first..=i];
                let max = visible.iter().copied().fold(f32::NEG_INFINITY, f32::max) * self.scale;
                let mut sum = 0f32;
                for (o, x) in o[first..=i].iter_mut().zip(visible) {
                    *o = (x * self.scale - max).exp();
                    sum += *o;
                }
                let inv = 1.0 / sum;
                for o in &mut o[first..=i] {
                    *o *= inv;
                }
            });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(
        &self,
        _scores: &Tensor,
        probs: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        // d softmax: p ⊙ (g − Σ g⊙p), times the scale; masked entries have p = 0.
        let dot = (grad * probs)?.sum_keepdim(D::Minus1)?;
        let g = (grad.broadcast_sub(&dot)? * probs)?;
        Ok(Some((g * f64::from(self.scale))?))
    }
}

/// Attention probabilities `softmax(scale·scores + mask)` for scores `[.., seq, seq]`:
/// fused on the CPU (causal, with `window` for sliding-window attention), composed
/// with the explicit additive `mask` elsewhere.
pub fn causal_softmax(scores: &Tensor, scale: f64, window: usize, mask: &Tensor) -> Result<Tensor> {
    if scores.device().is_cpu() && scores.dtype() == DType::F32 {
        let scores = scores.contiguous()?;
        Ok(scores.apply_op1(CausalSoftmax {
            scale: scale as f32,
            window: window.max(1),
        })?)
    } else {
        softmax_last_dim(&(scores * scale)?.broadcast_add(mask)?)
    }
}

/// Summed cross-entropy of f32 `logits` `[n, vocab]` against u32 `targets` `[n]`: fused
/// on the CPU, composed from differentiable ops elsewhere.
pub fn cross_entropy_sum(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    Ok(cross_entropy_rows(logits, targets)?.sum_all()?)
}

/// Cross-entropy of each row, f32 `[n]`, of `logits` `[n, vocab]` against u32 `targets`
/// `[n]` (the negative log-probability of each target): fused on the CPU, composed
/// from differentiable ops elsewhere.
pub fn cross_entropy_rows(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if logits.device().is_cpu() {
        let logits = logits.contiguous()?;
        let targets = targets.contiguous()?;
        Ok(logits.apply_op2(&targets, CrossEntropy)?)
    } else {
        let logp = log_softmax_last_dim(logits)?;
        let picked = logp.gather(&targets.unsqueeze(1)?, D::Minus1)?;
        Ok(picked.squeeze(1)?.neg()?)
    }
}

/// RMSNorm in f32, `x / sqrt(mean(x²) + eps) · w`, in `x`'s dtype (`w` cast to it).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let xf = x.to_dtype(DType::F32)?;
    let ms = xf.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = xf.broadcast_div(&(ms + eps)?.sqrt()?)?;
    Ok(normed
        .to_dtype(dtype)?
        .broadcast_mul(&weight.to_dtype(dtype)?)?)
}

/// Softmax over the last dimension. The max is detached: softmax does not depend on
/// it, so its gradient is zero anyway and need not be computed.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    Ok(e.broadcast_div(&sum)?)
}

/// `log softmax` over the last dimension (for the loss).
pub fn log_softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(shifted.broadcast_sub(&lse)?)
}

/// Rotary embedding in Hugging Face's half-split layout: `x·cos + rotate_half(x)·sin`
/// for `x` of shape `[batch, heads, seq, head_dim]` and tables of shape `[seq, head_dim]`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    Ok((x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?)?)
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use crate::test_support::max_abs_diff;

    use super::*;

    #[test]
    fn fused_cross_entropy_matches_the_composed_one_in_value_and_gradient() {
        let dev = Device::Cpu;
        let values: Vec<f32> = (0..3 * 7)
            .map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.3)
            .collect();
        let logits = Var::from_vec(values, (3, 7), &dev).expect("var");
        let targets = Tensor::new(&[2u32, 0, 6], &dev).expect("targets");
        let fused = cross_entropy_sum(logits.as_tensor(), &targets).expect("fused");
        let composed = log_softmax_last_dim(logits.as_tensor())
            .and_then(|l| {
                Ok(l.gather(&targets.unsqueeze(1)?, D::Minus1)?
                    .sum_all()?
                    .neg()?)
            })
            .expect("composed");
        let (a, b) = (
            fused.to_scalar::<f32>().expect("a"),
            composed.to_scalar::<f32>().expect("b"),
        );
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        // A scaled loss makes the upstream gradient differ from one.
        let ga = (fused * 1.5)
            .expect("scale")
            .backward()
            .expect("bwd")
            .get(logits.as_tensor())
            .cloned();
        let gb = (composed * 1.5)
            .expect("scale")
            .backward()
            .expect("bwd")
            .get(logits.as_tensor())
            .cloned();
        let (ga, gb) = (ga.expect("fused grad"), gb.expect("composed grad"));
        let diff = max_abs_diff(&ga, &gb);
        assert!(diff < 1e-5, "gradients differ by {diff}");
    }

    #[test]
    fn fused_causal_softmax_matches_the_masked_composition_in_value_and_gradient() {
        let dev = Device::Cpu;
        let t = 5;
        let values: Vec<f32> = (0..2 * t * t)
            .map(|i| ((i * 29 % 13) as f32 - 6.0) * 0.4)
            .collect();
        let scores = Var::from_vec(values, (2, t, t), &dev).expect("var");
        let weights: Vec<f32> = (0..2 * t * t).map(|i| (i % 7) as f32 - 3.0).collect();
        let weights = Tensor::from_vec(weights, (2, t, t), &dev).expect("weights");
        for window in [usize::MAX, 2] {
            let mask: Vec<f32> = (0..t * t)
                .map(|ij| {
                    let (i, j) = (ij / t, ij % t);
                    if j > i || i - j >= window {
                        f32::NEG_INFINITY
                    } else {
                        0.0
                    }
                })
                .collect();
            let mask = Tensor::from_vec(mask, (t, t), &dev).expect("mask");
            let fused = causal_softmax(scores.as_tensor(), 0.7, window, &mask).expect("fused");
            let composed = softmax_last_dim(
                &(scores.as_tensor() * 0.7)
                    .expect("scale")
                    .broadcast_add(&mask)
                    .expect("mask"),
            )
            .expect("composed");
            assert!(max_abs_diff(&fused, &composed) < 1e-6, "window {window}");
            let grad = |p: &Tensor| {
                (p * &weights)
                    .expect("mul")
                    .sum_all()
                    .expect("sum")
                    .backward()
                    .expect("bwd")
                    .get(scores.as_tensor())
                    .cloned()
                    .expect("grad")
            };
            assert!(
                max_abs_diff(&grad(&fused), &grad(&composed)) < 1e-5,
                "window {window}"
            );
        }
    }

    #[test]
    fn frozen_linear_matches_matmul_and_gives_the_weight_no_gradient() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(
            &Tensor::arange(0f32, 24.0, &dev)
                .expect("arange")
                .reshape((2, 3, 4))
                .expect("reshape"),
        )
        .expect("var");
        let w = Tensor::arange(0f32, 20.0, &dev)
            .expect("arange")
            .affine(0.1, -1.0)
            .expect("affine")
            .reshape((5, 4))
            .expect("reshape");
        let y = frozen_linear(x.as_tensor(), &w).expect("forward");
        let reference = x
            .as_tensor()
            .broadcast_matmul(&w.t().expect("t"))
            .expect("mm");
        let diff = max_abs_diff(&y, &reference);
        assert!(diff < 1e-5, "forward differs by {diff}");
        let grads = y.sum_all().expect("sum").backward().expect("backward");
        assert!(grads.get(&w).is_none(), "the frozen weight got a gradient");
        let gx = grads.get(x.as_tensor()).expect("input gradient");
        // d(sum(x Wᵀ))/dx = column sums of W, the same for every row.
        let expected = w.sum(0).expect("sum").to_vec1::<f32>().expect("vec");
        let got = gx
            .reshape((6, 4))
            .expect("reshape")
            .to_vec2::<f32>()
            .expect("vec");
        for row in got {
            for (a, b) in row.iter().zip(&expected) {
                assert!((a - b).abs() < 1e-5);
            }
        }
    }
}
