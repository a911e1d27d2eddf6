//! Data parallelism: this process' place in a gang of ranks, and the collectives the
//! training loop needs from it, on Gloo through `kubetune-collective` (the `gloo`
//! cargo feature).
//!
//! Every rank holds the whole dataset. The training loop cuts each global micro-batch
//! (`batch_size × world_size` sequences, in the order one process would use) into
//! contiguous per-rank shards of `batch_size`; each rank back-propagates its shard's
//! loss scaled by the *global* step weight (target tokens of the whole step, which
//! every rank can count from the data), so the sum of the ranks' gradients is exactly
//! the gradient one process would compute on the global batch.
//!
//! What each rank keeps of the model is its [`Sharding`]. By default
//! ([`Sharding::Full`], ZeRO stage 3, see [`crate::zero3`]) an even share of every
//! weight, gradient and moment, the weights gathered a unit at a time. With whole
//! weights on every rank, every rank clips and applies the same AdamW step to the same
//! summed gradients and the weights stay identical (checked at the end); rank 0 alone
//! writes checkpoints and outputs. Of those, [`Sharding::OptimizerState`] (ZeRO stage
//! 1, see [`Partition`]) has each rank keep the AdamW moments of, and update, only the
//! parameters it owns, then every owner broadcasts its updated parameters: on W ranks
//! each holds 2 + 2/W floats a weight instead of 4, for one extra exchange of the
//! weights a step, the same bits as [`Sharding::Replicated`]. Its checkpoints still
//! hold the whole state: the owners send their moments to rank 0 when one is written,
//! and every rank keeps its share of them on resume.
//!
//! With one rank (no gang) every collective is the identity.

use std::time::Duration;

use candle_core::{DType, Tensor, Var};

use crate::error::{Error, Result};
use crate::optim::{AdamW, Moments};

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
    /// What each rank keeps of the training state.
    pub sharding: Sharding,
}

/// What each rank of a data-parallel gang keeps of the weights, gradients and
/// optimizer state: the memory plan's type, so that the plan and the run agree.
pub use kubetune_crds::memory::Sharding;

/// The ranks of a run as the training loop sees them.
#[derive(Debug)]
pub struct Ranks {
    rank: usize,
    world_size: usize,
    #[cfg(feature = "gloo")]
    comm: Option<kubetune_collective::Collective>,
    /// A second set of connections for [`SideGather`] (fully sharded runs).
    #[cfg(feature = "gloo")]
    side: Option<kubetune_collective::Collective>,
}

/// All-gathers on a thread of their own, over connections of their own, so that the
/// next unit's weights travel while this thread computes (and reduce-scatters) the
/// current one. Requests are served in order; every rank must make the same ones in
/// the same order.
#[derive(Debug)]
pub struct SideGather {
    requests: std::sync::mpsc::Sender<Vec<f32>>,
    results: std::sync::mpsc::Receiver<Result<Vec<f32>>>,
    /// Detached when dropped, not joined: it ends when `requests` closes and its
    /// current gather returns, and a gather stuck on a dead gang must not hold up the
    /// exit that reports it.
    _thread: std::thread::JoinHandle<()>,
}

impl SideGather {
    /// Starts gathering `shard` from every rank (the next in order).
    pub fn start(&mut self, shard: Vec<f32>) -> Result<()> {
        self.requests
            .send(shard)
            .map_err(|_| Error::Collective("the gather thread has stopped".into()))
    }

    /// The oldest started gather's result, waiting for it.
    pub fn finish(&mut self) -> Result<Vec<f32>> {
        self.results
            .recv()
            .map_err(|_| Error::Collective("the gather thread has stopped".into()))?
    }
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
            #[cfg(feature = "gloo")]
            side: None,
        }
    }

    /// Joins `gang` (one process when `None`): returns once every rank is connected.
    pub fn join(gang: Option<&Gang>) -> Result<Self> {
        let Some(gang) = gang.filter(|g| g.world_size > 1) else {
            return Ok(Self::single());
        };
        #[cfg(feature = "gloo")]
        {
            // Fully sharded runs gather weights on a second context beside the first.
            let contexts = match gang.sharding {
                Sharding::Full | Sharding::ShardGradOp => 2,
                Sharding::OptimizerState | Sharding::Replicated => 1,
            };
            let config = kubetune_collective::Config {
                rank: gang.rank,
                world_size: gang.world_size,
                rendezvous: gang.rendezvous.clone(),
                host: None,
                rendezvous_timeout: gang.rendezvous_timeout,
                timeout: gang.timeout,
            };
            let mut comms = kubetune_collective::Collective::connect_many(&config, contexts)
                .map_err(collective)?
                .into_iter();
            Ok(Self {
                rank: gang.rank,
                world_size: gang.world_size,
                comm: comms.next(),
                side: comms.next(),
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
            let mut flat = flatten(&grads.iter().collect::<Vec<_>>())?;
            comm.allreduce_sum_f32(&mut flat).map_err(collective)?;
            let mut offset = 0;
            for g in grads.iter_mut() {
                let n = g.elem_count();
                *g = unflatten(&flat[offset..offset + n], g)?;
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
                let mut values = flatten(&[p.as_tensor()])?;
                comm.broadcast_f32(&mut values, 0).map_err(collective)?;
                p.set(&unflatten(&values, p.as_tensor())?)?;
            }
        }
        #[cfg(not(feature = "gloo"))]
        let _ = params;
        Ok(())
    }

    /// After a sharded optimizer step, gives every rank the parameters each owner
    /// updated.
    pub fn share_updates(&mut self, params: &[&Var], partition: &Partition) -> Result<()> {
        let me = self.rank;
        self.exchange_owned(
            params,
            partition,
            1,
            |i| Ok(vec![params[i].as_tensor().clone()]),
            |root, i, values| {
                if root != me {
                    params[i].set(&unflatten(values, params[i].as_tensor())?)?;
                }
                Ok(())
            },
        )
    }

    /// Every parameter's optimizer moments on rank 0 (`None` on the others), for a
    /// checkpoint: with sharded state, each owner broadcasts its moments. Every rank
    /// must call it at the same step.
    pub fn gather_moments(
        &mut self,
        optimizer: &AdamW,
        params: &[&Var],
        partition: &Partition,
    ) -> Result<Option<Moments>> {
        if self.world_size == 1 || partition.is_replicated() {
            return Ok(self.is_primary().then(|| optimizer.moments()).flatten());
        }
        let primary = self.is_primary();
        let mut m: Vec<Option<Tensor>> = vec![None; params.len()];
        let mut v: Vec<Option<Tensor>> = vec![None; params.len()];
        self.exchange_owned(
            params,
            partition,
            2,
            |i| {
                let (m, v) = optimizer.moments_of(i).ok_or_else(|| {
                    Error::Collective(format!(
                        "this rank should own parameter {i} but holds no moments for it"
                    ))
                })?;
                Ok(vec![m.clone(), v.clone()])
            },
            |_, i, values| {
                if primary {
                    let (first, second) = values.split_at(values.len() / 2);
                    let like = params[i].as_tensor().to_dtype(DType::F32)?;
                    m[i] = Some(unflatten(first, &like)?);
                    v[i] = Some(unflatten(second, &like)?);
                }
                Ok(())
            },
        )?;
        if !primary {
            return Ok(None);
        }
        let all = |moments: Vec<Option<Tensor>>| {
            moments
                .into_iter()
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| {
                    Error::Collective(
                        "a parameter has no owner in the optimizer's partition".into(),
                    )
                })
        };
        Ok(Some(Moments {
            m: all(m)?,
            v: all(v)?,
        }))
    }

    /// One broadcast per rank, in rank order, of what it holds for the parameters it
    /// owns: `per_param` tensors shaped like each parameter, which `local` gives on the
    /// owner. Every rank hands each parameter's values (`per_param` of them, one after
    /// the other) to `receive(owner, parameter, values)`, the owner too. Nothing moves
    /// with one rank or a replicated partition.
    fn exchange_owned(
        &mut self,
        params: &[&Var],
        partition: &Partition,
        per_param: usize,
        local: impl Fn(usize) -> Result<Vec<Tensor>>,
        mut receive: impl FnMut(usize, usize, &[f32]) -> Result<()>,
    ) -> Result<()> {
        if self.world_size == 1 || partition.is_replicated() {
            return Ok(());
        }
        for root in 0..self.world_size {
            let owned: Vec<usize> = partition.of(root).collect();
            let mut flat = if root == self.rank {
                let mut tensors = Vec::with_capacity(per_param * owned.len());
                for &i in &owned {
                    tensors.extend(local(i)?);
                }
                flatten(&tensors.iter().collect::<Vec<_>>())?
            } else {
                let size: usize = owned.iter().map(|&i| params[i].elem_count()).sum();
                vec![0.0; per_param * size]
            };
            if flat.is_empty() {
                continue;
            }
            self.broadcast_from(&mut flat, root)?;
            let mut offset = 0;
            for &i in &owned {
                let n = per_param * params[i].elem_count();
                receive(root, i, &flat[offset..offset + n])?;
                offset += n;
            }
        }
        Ok(())
    }

    /// Every rank's `shard` (all the same length), in rank order, into `out`
    /// (`world_size × shard.len()` elements): with one rank, a copy.
    pub fn allgather(&mut self, shard: &[f32], out: &mut [f32]) -> Result<()> {
        #[cfg(feature = "gloo")]
        if let Some(comm) = &mut self.comm {
            return comm.allgather_f32(shard, out).map_err(collective);
        }
        if out.len() != shard.len() * self.world_size {
            return Err(Error::Collective(format!(
                "an all-gather of {} elements needs {} of output, not {}",
                shard.len(),
                shard.len() * self.world_size,
                out.len()
            )));
        }
        out.copy_from_slice(shard);
        Ok(())
    }

    /// Sums `data` (a multiple of `world_size` elements) across ranks and returns this
    /// rank's segment of the sum (segment r of `world_size` equal ones); the rest of
    /// `data` is scratch afterwards. With one rank, all of `data`.
    pub fn reduce_scatter<'a>(&mut self, data: &'a mut [f32]) -> Result<&'a [f32]> {
        #[cfg(feature = "gloo")]
        if let Some(comm) = &mut self.comm {
            return comm.reduce_scatter_sum_f32(data).map_err(collective);
        }
        Ok(data)
    }

    /// The gang's second set of connections on a thread of its own, for all-gathers
    /// beside this thread's work; `None` with one rank, or when the gang was joined
    /// without them (or they were taken already).
    pub fn side_gather(&mut self) -> Option<SideGather> {
        #[cfg(feature = "gloo")]
        if let Some(mut comm) = self.side.take() {
            let world = self.world_size;
            let (requests, inbox) = std::sync::mpsc::channel::<Vec<f32>>();
            let (outbox, results) = std::sync::mpsc::channel();
            let thread = std::thread::Builder::new()
                .name("gather".into())
                .spawn(move || {
                    for shard in inbox {
                        let mut all = vec![0.0f32; shard.len() * world];
                        let done = comm.allgather_f32(&shard, &mut all).map(|()| all);
                        let failed = done.is_err();
                        if outbox.send(done.map_err(collective)).is_err() || failed {
                            return;
                        }
                    }
                })
                .ok()?;
            return Some(SideGather {
                requests,
                results,
                _thread: thread,
            });
        }
        None
    }

    /// Returns once every rank has called it.
    pub fn barrier(&mut self) -> Result<()> {
        #[cfg(feature = "gloo")]
        if let Some(comm) = &mut self.comm {
            comm.barrier().map_err(collective)?;
        }
        Ok(())
    }

    /// Broadcasts `values` from `root` to every rank.
    fn broadcast_from(&mut self, values: &mut [f32], root: usize) -> Result<()> {
        #[cfg(feature = "gloo")]
        if let Some(comm) = &mut self.comm {
            comm.broadcast_f32(values, root).map_err(collective)?;
        }
        #[cfg(not(feature = "gloo"))]
        let _ = (values, root);
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

/// Which rank owns each parameter: keeps its optimizer state and updates it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Partition {
    /// Every rank owns every one of this many parameters (the state replicated, as
    /// with one rank).
    Replicated(usize),
    /// The rank that owns each parameter.
    Sharded(Vec<usize>),
}

impl Partition {
    /// Parameters of `sizes` elements spread over `world_size` ranks so that each holds
    /// about the same number of elements: the largest first, each to the rank holding
    /// the fewest so far (the lowest rank on a tie). Every rank computes the same
    /// partition from the same sizes.
    pub fn balanced(sizes: &[usize], world_size: usize) -> Self {
        let mut order: Vec<usize> = (0..sizes.len()).collect();
        order.sort_by_key(|&i| (std::cmp::Reverse(sizes[i]), i));
        let mut load = vec![0usize; world_size.max(1)];
        let mut owner = vec![0; sizes.len()];
        for i in order {
            let rank = (0..load.len())
                .min_by_key(|&r| (load[r], r))
                .expect("at least one rank");
            owner[i] = rank;
            load[rank] += sizes[i];
        }
        Self::Sharded(owner)
    }

    /// Whether every rank owns every parameter.
    pub fn is_replicated(&self) -> bool {
        matches!(self, Self::Replicated(_))
    }

    /// Whether `rank` owns parameter `i`.
    pub fn owns(&self, rank: usize, i: usize) -> bool {
        match self {
            Self::Replicated(_) => true,
            Self::Sharded(owner) => owner[i] == rank,
        }
    }

    /// Per parameter, whether `rank` owns it.
    pub fn owned_by(&self, rank: usize) -> Vec<bool> {
        let params = match self {
            Self::Replicated(params) => *params,
            Self::Sharded(owner) => owner.len(),
        };
        (0..params).map(|i| self.owns(rank, i)).collect()
    }

    /// The parameters `rank` alone owns, in order (none in a replicated partition,
    /// which has no owners to hear from).
    fn of(&self, rank: usize) -> impl Iterator<Item = usize> + '_ {
        let owner: &[usize] = match self {
            Self::Replicated(_) => &[],
            Self::Sharded(owner) => owner,
        };
        (0..owner.len()).filter(move |&i| owner[i] == rank)
    }
}

/// `tensors` as one flat f32 vector.
fn flatten(tensors: &[&Tensor]) -> Result<Vec<f32>> {
    let mut flat = Vec::with_capacity(tensors.iter().map(|t| t.elem_count()).sum());
    for t in tensors {
        flat.extend(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?);
    }
    Ok(flat)
}

/// A tensor shaped, typed and placed like `like`, from `values`.
fn unflatten(values: &[f32], like: &Tensor) -> Result<Tensor> {
    Ok(Tensor::from_slice(values, like.shape(), like.device())?.to_dtype(like.dtype())?)
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
                #[cfg(feature = "gloo")]
                side: None,
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
            #[cfg(feature = "gloo")]
            side: None,
        };
        assert!(last.shard(&short, 2).is_empty());
    }

    #[test]
    fn a_balanced_partition_gives_each_rank_about_the_same_number_of_elements() {
        let sizes = [100, 10, 60, 40, 30, 30, 5, 5];
        let partition = Partition::balanced(&sizes, 3);
        let loads: Vec<usize> = (0..3)
            .map(|r| partition.of(r).map(|i| sizes[i]).sum())
            .collect();
        // 280 elements: the 100 alone, then the rest evened out around it.
        assert_eq!(loads, vec![100, 90, 90]);
        for i in 0..sizes.len() {
            assert_eq!((0..3).filter(|&r| partition.owns(r, i)).count(), 1);
        }
        assert_eq!(partition, Partition::balanced(&sizes, 3), "deterministic");
        assert_eq!(
            partition.owned_by(0),
            vec![true, false, false, false, false, false, false, false]
        );
        // More ranks than parameters: some own nothing.
        let sparse = Partition::balanced(&[4, 4], 3);
        assert_eq!(sparse.of(2).count(), 0);
        // Replicated: everyone owns everything, and nobody needs to send anything.
        let replicated = Partition::Replicated(3);
        assert!(replicated.owns(5, 2));
        assert_eq!(replicated.of(0).count(), 0);
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
