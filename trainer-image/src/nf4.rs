//! QLoRA's 4-bit NormalFloat (NF4) base weights, as bitsandbytes stores them.
//!
//! A weight is cut into blocks of [`BLOCK`] values in row-major order; each block keeps
//! its absolute maximum, and each value divided by it is replaced by the index of the
//! nearest of the 16 [`NF4_CODE`] values, two indices per byte with the first in the
//! high nibble (bitsandbytes' `quantize_4bit(quant_type="nf4")`). With double
//! quantization the block maxima, minus their mean, are themselves quantized to 8 bits
//! in groups of [`GROUP`] with bitsandbytes' signed dynamic code
//! (`create_dynamic_map`), which brings the cost to about 4.13 bits per weight.
//!
//! [`nf4_linear`] multiplies by such a weight: forward and backward dequantize it on
//! the fly into a temporary, so only the 4-bit codes live between the two, and backward
//! returns the input's gradient only (the base stays frozen, as in QLoRA).

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Storage, Tensor};

use crate::error::Result;

/// Values per quantization block (bitsandbytes' default for NF4).
pub const BLOCK: usize = 64;
/// Block maxima per 8-bit group under double quantization.
pub const GROUP: usize = 256;

/// bitsandbytes' NF4 code (`functional.py`, `get_4bit_type("nf4")`), index → value.
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// Index of the code value nearest to `x` (`x` in [−1, 1]) in a sorted `code`.
fn nearest(code: &[f32], x: f32) -> usize {
    // The number of midpoints below x is the index of the nearest value.
    let i = code.partition_point(|c| *c < x);
    if i == 0 {
        0
    } else if i == code.len() || x - code[i - 1] <= code[i] - x {
        i - 1
    } else {
        i
    }
}

/// The NF4 index of `x` (a value already divided by its block's absmax).
pub fn nf4_index(x: f32) -> u8 {
    nearest(&NF4_CODE, x) as u8
}

/// bitsandbytes' signed 8-bit dynamic code, `create_dynamic_map(signed=True,
/// max_exponent_bits=7, total_bits=8)`: for each exponent `i` in 0..7, the midpoints of
/// `2^i` equal steps between 0.1 and 1, times `10^(i−6)`, with both signs; then 0 and
/// 1; sorted. 256 values in [−1, 1], dense near zero.
pub fn dynamic_code() -> Vec<f32> {
    let mut data = Vec::with_capacity(256);
    for i in 0..7i32 {
        let items = (1usize << i) + 1;
        let scale = 10f64.powi(i - 6);
        let boundary = |k: usize| 0.1 + 0.9 * k as f64 / (items - 1) as f64;
        for k in 0..items - 1 {
            let mean = (boundary(k) + boundary(k + 1)) / 2.0;
            data.push((scale * mean) as f32);
            data.push((-scale * mean) as f32);
        }
    }
    data.push(0.0);
    data.push(1.0);
    data.sort_by(f32::total_cmp);
    data
}

/// The block maxima of a quantized weight.
#[derive(Debug)]
enum Absmax {
    /// One f32 per block.
    Plain(Tensor),
    /// Double quantization: `mean + dynamic[code] · scale[group]`.
    Double {
        /// u8 `[groups·GROUP]`, one per block (padded with the code of 0).
        codes: Tensor,
        /// f32 `[groups]`: the absolute maximum of each group of centred maxima.
        scales: Tensor,
        /// The mean of the block maxima.
        mean: f64,
        /// The dynamic code, f32 `[256]`, on the weight's device.
        code: Tensor,
    },
}

/// A `[out, in]` weight in NF4.
#[derive(Debug)]
pub struct Nf4Weight {
    /// Packed indices, u8 `[blocks·BLOCK/2]`.
    codes: Tensor,
    absmax: Absmax,
    /// The NF4 code, f32 `[16]`, on the weight's device.
    table: Tensor,
    shape: (usize, usize),
    /// The dtype dequantized weights come out in.
    dtype: DType,
}

impl Nf4Weight {
    /// Quantizes `weight` (`[out, in]`, any float dtype); dequantized values come back in
    /// the same dtype on the same device.
    pub fn quantize(weight: &Tensor, double_quant: bool) -> Result<Self> {
        let shape = weight.dims2()?;
        let dtype = weight.dtype();
        let dev = weight.device().clone();
        let values = weight
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let blocks = values.len().div_ceil(BLOCK);
        let mut absmax = Vec::with_capacity(blocks);
        let mut packed = vec![0u8; blocks * BLOCK / 2];
        for (b, chunk) in values.chunks(BLOCK).enumerate() {
            let max = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
            absmax.push(max);
            let inv = if max > 0.0 { 1.0 / max } else { 0.0 };
            // Padding past the end quantizes zero (index 7), as the values it stands for.
            let index = |j: usize| nf4_index(chunk.get(j).map_or(0.0, |v| v * inv));
            for pair in 0..BLOCK / 2 {
                packed[b * BLOCK / 2 + pair] = (index(2 * pair) << 4) | index(2 * pair + 1);
            }
        }
        let absmax = if double_quant {
            let mean = absmax.iter().map(|&a| f64::from(a)).sum::<f64>() / blocks as f64;
            let code = dynamic_code();
            let groups = blocks.div_ceil(GROUP);
            let zero = nearest(&code, 0.0) as u8;
            let mut codes = vec![zero; groups * GROUP];
            let mut scales = Vec::with_capacity(groups);
            for (g, chunk) in absmax.chunks(GROUP).enumerate() {
                let centred: Vec<f32> = chunk
                    .iter()
                    .map(|&a| (f64::from(a) - mean) as f32)
                    .collect();
                let scale = centred.iter().fold(0f32, |m, v| m.max(v.abs()));
                scales.push(scale);
                let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
                for (j, c) in centred.iter().enumerate() {
                    codes[g * GROUP + j] = nearest(&code, c * inv) as u8;
                }
            }
            Absmax::Double {
                codes: Tensor::from_vec(codes, groups * GROUP, &dev)?,
                scales: Tensor::from_vec(scales, groups, &dev)?,
                mean,
                code: Tensor::from_vec(code, 256, &dev)?,
            }
        } else {
            Absmax::Plain(Tensor::from_vec(absmax, blocks, &dev)?)
        };
        Ok(Self {
            codes: Tensor::from_vec(packed, blocks * BLOCK / 2, &dev)?,
            absmax,
            table: Tensor::new(&NF4_CODE, &dev)?,
            shape,
            dtype,
        })
    }

    /// `[out, in]`.
    pub fn dims(&self) -> (usize, usize) {
        self.shape
    }

    /// The packed 4-bit indices, u8 (two per byte, the first in the high nibble).
    pub fn codes(&self) -> &Tensor {
        &self.codes
    }

    /// Bytes held by the quantized weight (codes, maxima and their scales).
    pub fn storage_bytes(&self) -> usize {
        let codes = self.codes.elem_count();
        codes
            + match &self.absmax {
                Absmax::Plain(t) => 4 * t.elem_count(),
                Absmax::Double { codes, scales, .. } => {
                    codes.elem_count() + 4 * scales.elem_count() + 8
                }
            }
    }

    /// The block maxima as f32 `[blocks]`.
    pub fn absmax(&self) -> Result<Tensor> {
        let blocks = self.codes.elem_count() * 2 / BLOCK;
        match &self.absmax {
            Absmax::Plain(t) => Ok(t.clone()),
            Absmax::Double {
                codes,
                scales,
                mean,
                code,
            } => {
                let groups = scales.elem_count();
                let values = code
                    .index_select(&codes.to_dtype(DType::U32)?, 0)?
                    .reshape((groups, GROUP))?
                    .broadcast_mul(&scales.unsqueeze(1)?)?
                    .flatten_all()?
                    .narrow(0, 0, blocks)?;
                Ok((values + *mean)?)
            }
        }
    }

    /// The dequantized weight `[out, in]` in the weight's dtype.
    pub fn dequantize(&self) -> Result<Tensor> {
        let absmax = self.absmax()?;
        let (out, inp) = self.shape;
        let flat = if self.codes.device().is_cpu() {
            self.dequantize_cpu(&absmax)?
        } else {
            // Device-agnostic: split the nibbles with float ops, look the code up.
            let bytes = self.codes.to_dtype(DType::F32)?;
            let hi = (&bytes / 16.0)?.floor()?;
            let lo = (&bytes - (&hi * 16.0)?)?;
            let index = Tensor::stack(&[hi, lo], 1)?
                .flatten_all()?
                .to_dtype(DType::U32)?;
            let blocks = absmax.elem_count();
            self.table
                .index_select(&index, 0)?
                .reshape((blocks, BLOCK))?
                .broadcast_mul(&absmax.unsqueeze(1)?)?
                .flatten_all()?
        };
        Ok(flat
            .narrow(0, 0, out * inp)?
            .reshape((out, inp))?
            .to_dtype(self.dtype)?)
    }

    /// One pass over the codes on the CPU.
    fn dequantize_cpu(&self, absmax: &Tensor) -> Result<Tensor> {
        use rayon::prelude::*;
        let absmax = absmax.to_vec1::<f32>()?;
        let (storage, layout) = self.codes.storage_and_layout();
        let Storage::Cpu(cpu) = &*storage else {
            unreachable!("dequantize_cpu is called for CPU tensors only");
        };
        let (start, end) = layout
            .contiguous_offsets()
            .expect("codes are created contiguous");
        let codes = &cpu.as_slice::<u8>()?[start..end];
        let mut out = vec![0f32; codes.len() * 2];
        out.par_chunks_mut(BLOCK)
            .zip(codes.par_chunks(BLOCK / 2))
            .zip(absmax.par_iter())
            .for_each(|((o, c), &m)| {
                for (pair, byte) in o.chunks_mut(2).zip(c) {
                    pair[0] = NF4_CODE[usize::from(byte >> 4)] * m;
                    pair[1] = NF4_CODE[usize::from(byte & 15)] * m;
                }
            });
        let n = out.len();
        Ok(Tensor::from_vec(out, n, &Device::Cpu)?)
    }

    /// Moves nothing: the device the codes live on.
    pub fn device(&self) -> &Device {
        self.codes.device()
    }
}

/// `x · Wᵀ` for an NF4 weight, with the dequantized weight alive only inside the op.
#[derive(Debug)]
struct Nf4Linear(Arc<Nf4Weight>);

fn to_candle(err: crate::error::Error) -> candle_core::Error {
    match err {
        crate::error::Error::Tensor(e) => e,
        other => candle_core::Error::Msg(other.to_string()),
    }
}

impl CustomOp1 for Nf4Linear {
    fn name(&self) -> &'static str {
        "nf4-linear"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let weight = self.0.dequantize().map_err(to_candle)?;
        let (storage, wl) = weight.storage_and_layout();
        let Storage::Cpu(ws) = &*storage else {
            candle_core::bail!("nf4 linear: the weight is not on the CPU like its input");
        };
        crate::ops::frozen_matmul(xs, xl, ws, wl)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let weight = self.0.dequantize().map_err(to_candle)?;
        let (storage, wl) = weight.storage_and_layout();
        let Storage::Cuda(ws) = &*storage else {
            candle_core::bail!("nf4 linear: the weight is not on the GPU like its input");
        };
        crate::ops::frozen_matmul(xs, xl, ws, wl)
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        // dL/dx = dL/dy · W, W dequantized again; the codes get no gradient.
        let weight = self.0.dequantize().map_err(to_candle)?;
        Ok(Some(grad.contiguous()?.matmul(&weight)?))
    }
}

/// `x · Wᵀ` over the last dimension of `x` (any leading shape) for an NF4 weight.
pub fn nf4_linear(x: &Tensor, weight: &Arc<Nf4Weight>) -> Result<Tensor> {
    let dims = x.dims();
    let (last, lead) = dims
        .split_last()
        .expect("linear input has at least one dim");
    let rows: usize = lead.iter().product();
    let x2 = x.reshape((rows, *last))?.contiguous()?;
    let y = x2.apply_op1(Nf4Linear(weight.clone()))?;
    let mut out_shape = lead.to_vec();
    out_shape.push(weight.dims().0);
    Ok(y.reshape(out_shape)?)
}

#[cfg(test)]
mod tests {
    use candle_core::Var;

    use super::*;
    use crate::rng::Rng;
    use crate::test_support::{max_abs, max_abs_diff};

    fn random(shape: (usize, usize), seed: u64) -> Tensor {
        let mut rng = Rng::new(seed);
        let values: Vec<f32> = (0..shape.0 * shape.1)
            .map(|_| (0..4).map(|_| rng.next_f32() - 0.5).sum::<f32>() * 0.1)
            .collect();
        Tensor::from_vec(values, shape, &Device::Cpu).expect("tensor")
    }

    #[test]
    fn the_code_table_is_bitsandbytes_nf4() {
        // Transcribed from bitsandbytes' functional.py, as f64 literals.
        let reference = [
            -1.0,
            -0.6961928009986877,
            -0.5250730514526367,
            -0.39491748809814453,
            -0.28444138169288635,
            -0.18477343022823334,
            -0.09105003625154495,
            0.0,
            0.07958029955625534,
            0.16093020141124725,
            0.24611230194568634,
            0.33791524171829224,
            0.44070982933044434,
            0.5626170039176941,
            0.7229568362236023,
            1.0,
        ];
        for (ours, theirs) in NF4_CODE.iter().zip(reference) {
            assert_eq!(*ours, theirs as f32);
        }
    }

    #[test]
    fn values_on_the_code_get_their_own_index_and_others_the_nearest() {
        for (i, &c) in NF4_CODE.iter().enumerate() {
            assert_eq!(nf4_index(c), i as u8);
        }
        // Just either side of the midpoint between codes 13 and 14.
        let mid = (NF4_CODE[13] + NF4_CODE[14]) / 2.0;
        assert_eq!(nf4_index(mid - 1e-4), 13);
        assert_eq!(nf4_index(mid + 1e-4), 14);
        assert_eq!(nf4_index(0.03), 7);
        assert_eq!(nf4_index(-0.99), 0);
    }

    #[test]
    fn codes_are_packed_high_nibble_first_per_block_of_64() {
        // Row 0 holds the 16 code values times 3 then their negatives; the absmax is 3.
        let mut values: Vec<f32> = NF4_CODE.iter().map(|c| c * 3.0).collect();
        values.extend(NF4_CODE.iter().rev().map(|c| c * 3.0));
        values.extend(std::iter::repeat_n(0.0, 32));
        values.extend((0..64).map(|i| if i == 5 { -0.5 } else { 0.0 }));
        let w = Tensor::from_vec(values, (2, 64), &Device::Cpu).expect("w");
        let q = Nf4Weight::quantize(&w, false).expect("quantize");
        let bytes = q.codes().to_vec1::<u8>().expect("codes");
        assert_eq!(bytes.len(), 64);
        let unpacked: Vec<u8> = bytes.iter().flat_map(|b| [b >> 4, b & 15]).collect();
        let mut expected: Vec<u8> = (0..16).collect();
        expected.extend((0..16).rev());
        expected.extend(std::iter::repeat_n(7, 32));
        expected.extend((0..64).map(|i| if i == 5 { 0 } else { 7 }));
        assert_eq!(unpacked, expected);
        assert_eq!(
            q.absmax().expect("absmax").to_vec1::<f32>().expect("v"),
            [3.0, 0.5]
        );
        // Values on the code come back exactly.
        assert_eq!(max_abs_diff(&q.dequantize().expect("deq"), &w), 0.0);
    }

    #[test]
    fn round_trip_error_is_within_half_the_widest_code_gap_times_the_block_max() {
        let w = random((48, 80), 3); // 3840 values: 60 blocks, one group
        let half_gap = NF4_CODE
            .windows(2)
            .map(|p| (p[1] - p[0]) / 2.0)
            .fold(0f32, f32::max);
        let values = w.flatten_all().expect("flat").to_vec1::<f32>().expect("v");
        for double in [false, true] {
            let q = Nf4Weight::quantize(&w, double).expect("quantize");
            let deq = q.dequantize().expect("deq");
            assert_eq!(deq.dims(), &[48, 80]);
            let got = deq
                .flatten_all()
                .expect("flat")
                .to_vec1::<f32>()
                .expect("v");
            let absmax = q.absmax().expect("absmax").to_vec1::<f32>().expect("v");
            let group_max = values.iter().fold(0f32, |m, v| m.max(v.abs()));
            let mut worst_ratio = 0f32;
            for (b, (chunk, deq)) in values.chunks(BLOCK).zip(got.chunks(BLOCK)).enumerate() {
                let true_max = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
                // With double quantization the block max itself is off by a little.
                let scale_err = (absmax[b] - true_max).abs();
                // The 8-bit dynamic code's widest half-step is under 0.71% of the
                // group's largest centred maximum, itself below the group's largest.
                assert!(
                    scale_err <= group_max * 0.0071 + 1e-6,
                    "block {b}: {scale_err}"
                );
                for (v, d) in chunk.iter().zip(deq) {
                    let bound = half_gap * true_max + scale_err + 1e-6;
                    assert!((v - d).abs() <= bound, "{v} -> {d}, bound {bound}");
                    worst_ratio = worst_ratio.max((v - d).abs() / true_max);
                }
            }
            let rms = (values
                .iter()
                .zip(&got)
                .map(|(a, b)| (a - b).powi(2))
                .sum::<f32>()
                / values.len() as f32)
                .sqrt();
            let std = (values.iter().map(|a| a * a).sum::<f32>() / values.len() as f32).sqrt();
            println!(
                "double={double}: worst error {worst_ratio:.3}·absmax, rms error {:.3}·std",
                rms / std
            );
            assert!(rms < 0.15 * std, "rms error {rms} vs std {std}");
        }
    }

    #[test]
    fn double_quantization_costs_about_4_13_bits_per_weight() {
        let w = random((256, 256), 4);
        let plain = Nf4Weight::quantize(&w, false).expect("q");
        let double = Nf4Weight::quantize(&w, true).expect("q");
        let bits = |q: &Nf4Weight| 8.0 * q.storage_bytes() as f64 / 65536.0;
        assert!((bits(&plain) - 4.5).abs() < 1e-9, "{}", bits(&plain));
        assert!((bits(&double) - 4.127).abs() < 0.01, "{}", bits(&double));
    }

    #[test]
    fn dynamic_code_has_256_sorted_values_from_minus_one_to_one_dense_near_zero() {
        let code = dynamic_code();
        assert_eq!(code.len(), 256);
        assert!(code.windows(2).all(|p| p[0] <= p[1]));
        assert_eq!(code[0], -code[254]); // symmetric except the extra 1.0
        assert_eq!(code[255], 1.0);
        assert!(code.contains(&0.0));
        let smallest = code
            .iter()
            .filter(|v| **v > 0.0)
            .fold(1f32, |m, v| m.min(*v));
        assert!((smallest - 0.55e-6).abs() < 1e-9, "{smallest}");
    }

    #[test]
    fn cpu_dequantization_matches_the_device_agnostic_path() {
        let w = random((40, 70), 5); // not a multiple of the block size
        let q = Nf4Weight::quantize(&w, true).expect("q");
        let fast = q.dequantize().expect("cpu path");
        let bytes = q.codes.to_dtype(DType::F32).expect("f32");
        let hi = (&bytes / 16.0).expect("div").floor().expect("floor");
        let lo = (&bytes - (&hi * 16.0).expect("mul")).expect("sub");
        let index = Tensor::stack(&[hi, lo], 1)
            .expect("stack")
            .flatten_all()
            .expect("flat")
            .to_dtype(DType::U32)
            .expect("u32");
        let absmax = q.absmax().expect("absmax");
        let slow = q
            .table
            .index_select(&index, 0)
            .expect("lookup")
            .reshape((absmax.elem_count(), BLOCK))
            .expect("reshape")
            .broadcast_mul(&absmax.unsqueeze(1).expect("unsqueeze"))
            .expect("scale")
            .flatten_all()
            .expect("flat")
            .narrow(0, 0, 2800)
            .expect("narrow")
            .reshape((40, 70))
            .expect("reshape");
        assert_eq!(max_abs_diff(&fast, &slow), 0.0);
    }

    #[test]
    fn nf4_linear_matches_a_dense_matmul_by_the_dequantized_weight_with_an_input_gradient_only() {
        let w = random((24, 64), 6);
        let q = Arc::new(Nf4Weight::quantize(&w, true).expect("q"));
        let deq = q.dequantize().expect("deq");
        let x = Var::from_tensor(&random((6, 64), 7).reshape((2, 3, 64)).expect("r")).expect("var");
        let y = nf4_linear(x.as_tensor(), &q).expect("forward");
        let reference = x
            .as_tensor()
            .broadcast_matmul(&deq.t().expect("t"))
            .expect("mm");
        assert!(max_abs_diff(&y, &reference) < 1e-5);
        // The gradient of Σ y ⊙ g with respect to x, against finite differences.
        let g = random((6, 24), 8).reshape((2, 3, 24)).expect("g");
        let objective = |x: &Tensor| -> f64 {
            let y = nf4_linear(x, &q).expect("forward");
            f64::from(
                (y * &g)
                    .expect("mul")
                    .sum_all()
                    .expect("sum")
                    .to_scalar::<f32>()
                    .expect("s"),
            )
        };
        let grads = (&y * &g)
            .expect("mul")
            .sum_all()
            .expect("sum")
            .backward()
            .expect("bwd");
        assert!(grads.get(q.codes()).is_none());
        let gx = grads.get(x.as_tensor()).expect("input gradient");
        let d = random((6, 64), 9).reshape((2, 3, 64)).expect("d");
        let analytic = f64::from(
            (gx * &d)
                .expect("mul")
                .sum_all()
                .expect("s")
                .to_scalar::<f32>()
                .expect("s"),
        );
        let eps = 1e-2;
        let plus = objective(&(x.as_tensor() + (&d * eps).expect("s")).expect("a"));
        let minus = objective(&(x.as_tensor() - (&d * eps).expect("s")).expect("a"));
        let numeric = (plus - minus) / (2.0 * eps);
        assert!(
            (analytic - numeric).abs() <= 1e-3 * analytic.abs().max(1.0),
            "analytic {analytic} vs numeric {numeric}"
        );
        assert!(max_abs(gx) > 0.0);
    }
}
