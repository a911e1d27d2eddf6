//! Data parallelism: this process' place in a gang of ranks, and the collectives the
//! training loop needs from it, on Gloo through `kubetune-collective` (the `gloo`
//! cargo feature).
//!
//! Every rank holds the whole model and the whole dataset. The training loop cuts each
//! global micro-batch (`batch_size × world_size` sequences, in the order one process
//! would use) into contiguous per-rank shards of `batch_size`; each rank back-propagates
//! its shard's loss scaled by the *global* step weight (target tokens of the whole
//! step, which every rank can count from the data), so the sum of the ranks' gradients
//! is exactly the gradient one process would compute on the global batch. Every rank
//! then clips and applies the same AdamW step to the same summed gradients, and the
//! weights stay identical (checked at the end). Rank 0 alone writes checkpoints and
//! outputs.
//!
//! With one rank (no gang) every collective is the identity.

use std::time::Duration;

use candle_core::{DType, Tensor, Var};

use crate::error::{Error, Result};

/// This process' place in a data-parallel gang (from the operator's environment).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Gang {
    /// This rank, `0..world_size`.
    pub rank: usize,
    /// The number of ranks (at least 2).
    pub world_size: usize,
    /// `host:port` of rank 0's rendezvous.
    pub rendezvous: String,
    /// How long to wait for all ranks to join.
    pub rendezvous_timeout: Duration,
    /// How long one collective (a gradient sum) may wait for the other ranks.
    pub timeout: Duration,
}

/// The ranks of a run as the training loop sees them.
#[derive(Debug)]
pub struct Ranks {
    rank: usize,
    world_size: usize,
    #[cfg(feature = "gloo")]
    comm: Option<kubetune_collective::Collective>,
}

#[cfg(feature = "gloo")]
fn collective(err: kubetune_collective::Error) -> Error {
    Error::Collective(err.to_string())
}

impl Ranks {
    /// One process, no gang.
    pub fn single() -> Self {
        Self {
            rank: 0,
            world_size: 1,
            #[cfg(feature = "gloo")]
            comm: None,
        }
    }

    /// Joins `gang` (one process when `None`): returns once every rank is connected.
    pub fn join(gang: Option<&Gang>) -> Result<Self> {
        let Some(gang) = gang.filter(|g| g.world_size > 1) else {
            return Ok(Self::single());
        };
        #[cfg(feature = "gloo")]
        {
            let comm = kubetune_collective::Collective::connect(&kubetune_collective::Config {
                rank: gang.rank,
                world_size: gang.world_size,
                rendezvous: gang.rendezvous.clone(),
                host: None,
                rendezvous_timeout: gang.rendezvous_timeout,
                timeout: gang.timeout,
            })
            .map_err(collective)?;
            Ok(Self {
                rank: gang.rank,
                world_size: gang.world_size,
                comm: Some(comm),
            })
        }
        #[cfg(not(feature = "gloo"))]
        Err(Error::invalid(format!(
            "data-parallel training across {} ranks needs a trainer built with the gloo feature (Gloo collectives); this one was built without it",
            gang.world_size
        )))
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The number of ranks.
    pub fn world_size(&self) -> usize {
        self.world_size
    }

    /// Whether this rank writes checkpoints and outputs (rank 0).
    pub fn is_primary(&self) -> bool {
        self.rank == 0
    }

    /// This rank's contiguous share of a global micro-batch of `per_rank × world_size`
    /// items (possibly shorter or empty at the end of an epoch).
    pub fn shard<'a, T>(&self, global: &'a [T], per_rank: usize) -> &'a [T] {
        let start = (self.rank * per_rank).min(global.len());
        let end = ((self.rank + 1) * per_rank).min(global.len());
        &global[start..end]
    }

    /// Sums `grads` and `figures` over the ranks, in place.
    pub fn sum(&mut self, grads: &mut [Tensor], figures: &mut [f64]) -> Result<()> {
        #[cfg(feature = "gloo")]
        if let Some(comm) = &mut self.comm {
            comm.allreduce_sum_f64(figures).map_err(collective)?;
            // One flat buffer, one allreduce: Gloo's ring moves it in segments, and one
            // call per tensor would pay the ring's latency a hundred times a step.
            let total: usize = grads.iter().map(Tensor::elem_count).sum();
            let mut flat = Vec::with_capacity(total);
            for g in grads.iter() {
                flat.extend(g.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?);
            }
            comm.allreduce_sum_f32(&mut flat).map_err(collective)?;
            let mut offset = 0;
            for g in grads.iter_mut() {
                let n = g.elem_count();
                let summed = Tensor::from_slice(&flat[offset..offset + n], g.shape(), g.device())?
                    .to_dtype(g.dtype())?;
                *g = summed;
                offset += n;
            }
        }
        #[cfg(not(feature = "gloo"))]
        let _ = (grads, figures);
        Ok(())
    }

    /// Sums `figures` over the ranks, in place.
    pub fn sum_figures(&mut self, figures: &mut [f64]) -> Result<()> {
        self.sum(&mut [], figures)
    }

    /// Gives every rank rank 0's values of `params`.
    pub fn broadcast_params(&mut self, params: &[&Var]) -> Result<()> {
        #[cfg(feature = "gloo")]
        if let Some(comm) = &mut self.comm {
            for p in params {
                let t = p.as_tensor();
                let mut values = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
                comm.broadcast_f32(&mut values, 0).map_err(collective)?;
                let from_zero =
                    Tensor::from_vec(values, t.shape(), t.device())?.to_dtype(t.dtype())?;
                p.set(&from_zero)?;
            }
        }
        #[cfg(not(feature = "gloo"))]
        let _ = params;
        Ok(())
    }

    /// Fails unless every rank holds rank 0's `value` of `what` (compared bit for bit).
    pub fn check_same(&mut self, what: &str, value: f64) -> Result<()> {
        #[cfg(feature = "gloo")]
        if let Some(comm) = &mut self.comm {
            let mut zero = [value];
            comm.broadcast_f64(&mut zero, 0).map_err(collective)?;
            // Every rank learns whether any differs, so all fail together.
            let mut differs = [f64::from(u8::from(zero[0].to_bits() != value.to_bits()))];
            comm.allreduce_sum_f64(&mut differs).map_err(collective)?;
            if differs[0] > 0.0 {
                return Err(Error::Collective(format!(
                    "the ranks disagree on {what}: rank {} has {value}, rank 0 has {}",
                    self.rank, zero[0]
                )));
            }
        }
        #[cfg(not(feature = "gloo"))]
        let _ = (what, value);
        Ok(())
    }
}

/// A fingerprint of the exact bits of `params` (FNV-1a over each f32's bits), as an
/// f64 whose bits carry it: equal weights give equal fingerprints on every rank.
pub fn weights_fingerprint(params: &[&Var]) -> Result<f64> {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for p in params {
        for x in p
            .as_tensor()
            .flatten_all()?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?
        {
            hash ^= u64::from(x.to_bits());
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    // Keep it a finite number so that printing it is meaningful: 52 bits of the hash.
    Ok((hash >> 12) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_split_a_global_batch_contiguously_in_rank_order() {
        let global: Vec<usize> = (0..10).collect();
        let shard = |rank| {
            Ranks {
                rank,
                world_size: 3,
                #[cfg(feature = "gloo")]
                comm: None,
            }
            .shard(&global, 4)
            .to_vec()
        };
        assert_eq!(shard(0), vec![0, 1, 2, 3]);
        assert_eq!(shard(1), vec![4, 5, 6, 7]);
        assert_eq!(shard(2), vec![8, 9]);
        let short: Vec<usize> = (0..3).collect();
        let last = Ranks {
            rank: 2,
            world_size: 3,
            #[cfg(feature = "gloo")]
            comm: None,
        };
        assert!(last.shard(&short, 2).is_empty());
    }

    #[test]
    fn the_weights_fingerprint_sees_a_one_bit_change() {
        let dev = candle_core::Device::Cpu;
        let a = Var::from_slice(&[1.0f32, 2.0, 3.0], 3, &dev).expect("var");
        let before = weights_fingerprint(&[&a]).expect("fingerprint");
        a.set(&Tensor::new(&[1.0f32, 2.0, f32::from_bits(3.0f32.to_bits() + 1)], &dev).expect("t"))
            .expect("set");
        assert_ne!(before, weights_fingerprint(&[&a]).expect("fingerprint"));
    }
}
