//! Fully sharded data parallelism (ZeRO stage 3, PyTorch FSDP's `FULL_SHARD`): each rank
//! of a gang keeps an even share of every weight, of its gradient and of AdamW's two
//! moments, so the state of full fine-tuning takes 16/W bytes a weight per rank
//! instead of 16.
//!
//! The model is cut into *units*, the pieces gathered at once: the embedding, each
//! decoder block, and the final norm with the LM head. A unit's tensors, flattened in
//! checkpoint order and padded to a multiple of the world size, are split into equal
//! contiguous shards; rank r holds shard r (split tensors, not whole tensors placed on
//! ranks, so the shares differ by at most the padding).
//!
//! A micro-batch runs unit by unit: all-gather a unit's shards, build its tensors,
//! compute, drop them. The forward pass keeps only each block's input; backward goes
//! back block by block, gathering each again, recomputing it from its input and
//! back-propagating the upstream gradient through it (layer-wise recompute is
//! inherent: a block's forward graph would keep its gathered weights alive). Each
//! unit's gradient is reduce-scattered as soon as backward has it, so a rank never
//! holds more than one unit's whole gradient, and keeps the sum of its own shard.
//! The optimizer then updates each rank's shards alone, elementwise: the same AdamW
//! arithmetic, element for element, as one process with the whole model; the
//! gradient-norm clip uses the norm over every rank's shards.
//!
//! Per step and rank, with W ranks and P weights in f32, the traffic is two
//! all-gathers and one reduce-scatter of the padded weights, each (W−1)/W·4P bytes:
//! 1.5 times a data-parallel all-reduce of the gradients (the ring bound), the price of
//! not holding the weights between forward and backward. A tied embedding, needed by
//! the first and the last unit, is kept gathered from the head to its own backward
//! rather than gathered a third time. With `keep_gathered` (FSDP's `SHARD_GRAD_OP`,
//! [`Sharding::ShardGradOp`](crate::parallel::Sharding)) each unit gathered in forward
//! stays until its backward: one all-gather a unit, the ring bound exactly, for the
//! whole weights held at the peak of a step (the state between steps stays sharded).
//!
//! Checkpoints are sharded: every rank writes its shards of the weights and moments
//! into the checkpoint directory (`shard-RRRRR-of-WWWWW.safetensors`), rank 0 the unit
//! layout (`zero3.json`) and the trainer state, after a barrier, so a checkpoint with
//! its state file is complete. A resume reads the element ranges it needs from
//! whichever files hold them, so a run may resume on another number of ranks (or from
//! a checkpoint of unsharded full fine-tuning). At the end the ranks gather every unit
//! and rank 0 writes an ordinary Hugging Face checkpoint.

use std::collections::VecDeque;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::adapter::{Artifact, write_atomic};
use crate::checkpoint::{self, TrainerState};
use crate::config::ModelConfig;
use crate::data::Batch;
use crate::error::{Error, Result};
use crate::full::save_full_tensors;
use crate::model::{BaseFormat, Block, Llama, Pass, Weights, block_tensors};
use crate::optim::{AdamW, AdamWConfig, Moments, global_norm};
use crate::parallel::{Ranks, SideGather};

/// A piece of the model gathered at once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unit {
    /// What it is, for messages: `embedding`, `block 3`, `head`.
    pub name: String,
    /// Its tensors' Hugging Face names and shapes, in the order they are flattened.
    pub tensors: Vec<(String, Vec<usize>)>,
    /// Elements of all its tensors.
    pub numel: usize,
}

impl Unit {
    fn new(name: String, tensors: Vec<(String, Vec<usize>)>) -> Self {
        let numel = tensors
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum();
        Self {
            name,
            tensors,
            numel,
        }
    }

    /// Elements of each rank's shard: the unit padded to a multiple of `world`, cut
    /// into `world` equal pieces.
    pub fn shard_len(&self, world: usize) -> usize {
        self.numel.div_ceil(world.max(1))
    }

    /// The elements of the unit (of its padded flat vector) rank `rank` holds.
    pub fn shard_range(&self, rank: usize, world: usize) -> Range<usize> {
        let len = self.shard_len(world);
        rank * len..(rank + 1) * len
    }
}

/// The units of a model of `config`, in the order a forward pass uses them: the
/// embedding, the blocks, the final norm with the LM head (`lm_head` false when the
/// head is the tied embedding, which then belongs to the first unit alone).
pub fn units(config: &ModelConfig, lm_head: bool) -> Vec<Unit> {
    let (v, h) = (config.vocab_size, config.hidden_size);
    let mut units = vec![Unit::new(
        "embedding".into(),
        vec![("model.embed_tokens.weight".into(), vec![v, h])],
    )];
    for layer in 0..config.num_hidden_layers {
        units.push(Unit::new(
            format!("block {layer}"),
            block_tensors(config, layer),
        ));
    }
    let mut head = vec![("model.norm.weight".to_owned(), vec![h])];
    if lm_head {
        head.push(("lm_head.weight".into(), vec![v, h]));
    }
    units.push(Unit::new("head".into(), head));
    units
}

/// What the collectives of a run moved and how long they took, on this rank.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Traffic {
    /// Bytes this rank sent (a ring all-gather or reduce-scatter of N bytes over W
    /// ranks sends (W−1)/W·N from each).
    pub bytes_sent: u64,
    /// Seconds spent in collectives, waiting for other ranks included.
    pub seconds: f64,
}

/// The unit layout a sharded checkpoint was written with.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Layout {
    world_size: usize,
    units: Vec<LayoutUnit>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LayoutUnit {
    name: String,
    numel: usize,
}

impl Traffic {
    /// What moved since `earlier` (a reading of the same counters).
    pub fn since(self, earlier: Self) -> Self {
        Self {
            bytes_sent: self.bytes_sent - earlier.bytes_sent,
            seconds: self.seconds - earlier.seconds,
        }
    }
}

const LAYOUT_FILE: &str = "zero3.json";

fn shard_file(rank: usize, world: usize) -> String {
    format!("shard-{rank:05}-of-{world:05}.safetensors")
}

/// A fully sharded model with its optimizer: this rank's shards, and the means to
/// gather the rest when they are needed.
#[derive(Debug)]
pub struct Zero3 {
    /// The model's configuration and compute settings, holding only what is gathered.
    shell: Llama,
    units: Vec<Unit>,
    /// The LM head is the embedding (unit 0).
    tied: bool,
    /// Keep each unit's weights gathered from its forward to its backward (FSDP's
    /// `SHARD_GRAD_OP`): the whole weights at the peak of a step, one all-gather a
    /// unit instead of two.
    keep_gathered: bool,
    rank: usize,
    world: usize,
    /// This rank's shard of each unit, f32.
    shards: Vec<Var>,
    /// This step's gradient of each shard so far.
    grads: Vec<Option<Tensor>>,
    optimizer: AdamW,
    traffic: Traffic,
    /// All-gathers beside the compute, when the gang has the connections for them.
    side: Option<SideGather>,
    /// The units the current pass gathers next, in order.
    plan: VecDeque<usize>,
    /// Whether the first of `plan` is travelling on `side` already.
    in_flight: bool,
}

impl Zero3 {
    /// Reads this rank's shards of the checkpoint in `model_dir` (one tensor in memory
    /// at a time, never the whole model), to compute in `dtype` on `device`.
    pub fn load(
        model_dir: &Path,
        config: ModelConfig,
        ranks: &mut Ranks,
        keep_gathered: bool,
        dtype: DType,
        device: &Device,
        optimizer: AdamWConfig,
    ) -> Result<Self> {
        let weights = Weights::open(model_dir, DType::F32, device)?;
        let tied = config.tie_word_embeddings && !weights.has("lm_head.weight");
        let units = units(&config, !tied);
        let (rank, world) = (ranks.rank(), ranks.world_size());
        let mut shards = Vec::with_capacity(units.len());
        for unit in &units {
            let wanted = unit.shard_range(rank, world);
            let mut flat = Vec::with_capacity(wanted.len());
            let mut offset = 0;
            for (name, shape) in &unit.tensors {
                let len: usize = shape.iter().product();
                let (lo, hi) = (wanted.start.max(offset), wanted.end.min(offset + len));
                if lo < hi {
                    let t = weights.get(name, shape)?.flatten_all()?;
                    flat.extend(t.narrow(0, lo - offset, hi - lo)?.to_vec1::<f32>()?);
                }
                offset += len;
            }
            flat.resize(wanted.len(), 0.0);
            shards.push(Var::from_vec(flat, wanted.len(), device)?);
        }
        let refs: Vec<&Var> = shards.iter().collect();
        let optimizer = AdamW::new(optimizer, &refs)?;
        Ok(Self {
            shell: Llama::shell(config, dtype, device)?,
            grads: vec![None; units.len()],
            units,
            tied,
            keep_gathered,
            rank,
            world,
            shards,
            optimizer,
            traffic: Traffic::default(),
            side: ranks.side_gather(),
            plan: VecDeque::new(),
            in_flight: false,
        })
    }

    /// The units a forward pass gathers, in order: the embedding, the blocks, the
    /// head, and the tied embedding again when `for_backward` and it is not kept;
    /// backward then gathers the blocks again, last first, and the embedding, unless
    /// they were kept.
    fn schedule(&self, for_backward: bool) -> Vec<usize> {
        let head = self.units.len() - 1;
        let mut order: Vec<usize> = (0..=head).collect();
        if !for_backward {
            if self.tied {
                order.push(0);
            }
            return order;
        }
        if self.keep_gathered {
            return order;
        }
        if self.tied {
            order.push(0);
        }
        order.extend((1..head).rev());
        if !self.tied {
            order.push(0);
        }
        order
    }

    /// Starts a pass that gathers the units of `order`, in that order: with a side
    /// gatherer, each next one travels while the current one computes.
    fn begin_pass(&mut self, order: Vec<usize>) -> Result<()> {
        if !self.plan.is_empty() || self.in_flight {
            return Err(Error::Collective(format!(
                "a pass began with units {:?} still to gather",
                self.plan
            )));
        }
        self.plan = order.into();
        self.launch_next()
    }

    fn launch_next(&mut self) -> Result<()> {
        let Some(side) = self.side.as_mut() else {
            return Ok(());
        };
        if let Some(&u) = self.plan.front()
            && !self.in_flight
        {
            let shard = self.shards[u].as_tensor().to_vec1::<f32>()?;
            let len = shard.len();
            side.start(shard)?;
            self.in_flight = true;
            if self.world > 1 {
                self.traffic.bytes_sent += 4 * ((self.world - 1) * len) as u64;
            }
        }
        Ok(())
    }

    /// Ends a pass: every unit it planned was gathered.
    fn end_pass(&mut self) -> Result<()> {
        if self.plan.is_empty() {
            return Ok(());
        }
        Err(Error::Collective(format!(
            "a pass ended with units {:?} not gathered",
            self.plan
        )))
    }

    /// The units, in forward order.
    pub fn units(&self) -> &[Unit] {
        &self.units
    }

    /// What the collectives moved so far.
    pub fn traffic(&self) -> Traffic {
        self.traffic
    }

    /// Bytes of training state this rank holds between steps: its shards of the f32
    /// weights, of their gradients and of AdamW's two moments.
    pub fn state_bytes(&self) -> u64 {
        let elements: usize = self.shards.iter().map(|s| s.elem_count()).sum();
        4 * 4 * elements as u64
    }

    /// Bytes of optimizer state (the moments) this rank holds.
    pub fn optimizer_state_bytes(&self) -> u64 {
        self.optimizer.state_bytes()
    }

    /// The model shell: configuration, RoPE tables, compute dtype.
    pub fn shell(&self) -> &Llama {
        &self.shell
    }

    /// Unit `u` whole (padded), gathered from every rank's shard: on the side
    /// gatherer when the pass planned it (then the next planned unit starts
    /// travelling), here otherwise. Within a pass, units must come in the planned
    /// order.
    fn gather(&mut self, ranks: &mut Ranks, u: usize) -> Result<Vec<f32>> {
        if let Some(&next) = self.plan.front() {
            if next != u {
                return Err(Error::Collective(format!(
                    "unit {u} was gathered where the pass planned unit {next}"
                )));
            }
            if let Some(side) = self.side.as_mut() {
                let started = Instant::now();
                let all = side.finish()?;
                // The time this thread waited: what the overlap did not hide.
                self.traffic.seconds += started.elapsed().as_secs_f64();
                self.plan.pop_front();
                self.in_flight = false;
                self.launch_next()?;
                return Ok(all);
            }
            self.plan.pop_front();
        }
        let shard = self.shards[u].as_tensor().to_vec1::<f32>()?;
        let mut all = vec![0.0f32; shard.len() * self.world];
        let started = Instant::now();
        ranks.allgather(&shard, &mut all)?;
        self.count(started, shard.len());
        Ok(all)
    }

    fn count(&mut self, started: Instant, shard_len: usize) {
        if self.world > 1 {
            self.traffic.seconds += started.elapsed().as_secs_f64();
            self.traffic.bytes_sent += 4 * ((self.world - 1) * shard_len) as u64;
        }
    }

    /// Unit `u`'s tensors as variables (so backward reaches them), gathered.
    fn materialise(&mut self, ranks: &mut Ranks, u: usize) -> Result<Vec<Var>> {
        let flat = self.gather(ranks, u)?;
        let device = self.shell.device().clone();
        let mut vars = Vec::with_capacity(self.units[u].tensors.len());
        let mut offset = 0;
        for (_, shape) in &self.units[u].tensors {
            let len: usize = shape.iter().product();
            vars.push(Var::from_slice(
                &flat[offset..offset + len],
                shape.as_slice(),
                &device,
            )?);
            offset += len;
        }
        Ok(vars)
    }

    /// Block `layer` from its unit's gathered variables.
    fn block(&self, layer: usize, vars: &[Var]) -> Result<Block> {
        let unit = &self.units[layer + 1];
        Block::assemble(
            &self.shell.config,
            layer,
            BaseFormat::Master,
            &mut |name, shape| {
                let index = unit
                    .tensors
                    .iter()
                    .position(|(n, _)| n == name)
                    .ok_or_else(|| Error::invalid(format!("{} has no tensor {name}", unit.name)))?;
                let t = vars[index].as_tensor();
                if t.dims() != shape {
                    return Err(Error::invalid(format!(
                        "tensor {name} has shape {:?}, expected {shape:?}",
                        t.dims()
                    )));
                }
                Ok(t.clone())
            },
        )
    }

    /// Reduce-scatters unit `u`'s gradient (one per tensor of the unit, in order; none
    /// where backward did not reach it) and adds this rank's shard of the sum to the
    /// step's.
    fn scatter_grads(
        &mut self,
        ranks: &mut Ranks,
        u: usize,
        grads: &[Option<Tensor>],
    ) -> Result<()> {
        let unit = &self.units[u];
        let len = unit.shard_len(self.world);
        let mut flat = Vec::with_capacity(len * self.world);
        for ((_, shape), grad) in unit.tensors.iter().zip(grads) {
            match grad {
                Some(g) => flat.extend(g.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?),
                None => flat.resize(flat.len() + shape.iter().product::<usize>(), 0.0),
            }
        }
        flat.resize(len * self.world, 0.0);
        let started = Instant::now();
        let mine = ranks.reduce_scatter(&mut flat)?;
        let mine = Tensor::from_slice(mine, len, self.shell.device())?;
        self.count(started, len);
        self.grads[u] = Some(match self.grads[u].take() {
            Some(sum) => (sum + mine)?,
            None => mine,
        });
        Ok(())
    }

    /// Sets the shell's end weights from gathered embedding and head variables.
    fn set_ends(&mut self, embed: Option<&[Var]>, head: Option<&[Var]>) -> Result<()> {
        let none = || Tensor::zeros(0, DType::F32, self.shell.device());
        let embed = match embed {
            Some(vars) => vars[0].as_tensor().clone(),
            None => none()?,
        };
        let (norm, lm_head) = match head {
            Some(vars) => (
                vars[0].as_tensor().clone(),
                vars.get(1).map(|v| v.as_tensor().clone()),
            ),
            None => (none()?, None),
        };
        self.shell.set_ends(embed, norm, lm_head);
        Ok(())
    }

    /// The summed loss of `batch` under `pass`, without gradients (evaluation). Every
    /// rank must call it as often as the others; one without a batch (`None`) only
    /// takes part in the gathers, and returns 0.
    pub fn loss_sum(
        &mut self,
        ranks: &mut Ranks,
        batch: Option<&Batch>,
        pass: Pass,
    ) -> Result<f64> {
        self.begin_pass(self.schedule(false))?;
        let Some(batch) = batch else {
            for u in self.schedule(false) {
                self.gather(ranks, u)?;
            }
            self.end_pass()?;
            return Ok(0.0);
        };
        let (_, t) = batch.ids.dims2()?;
        let pos = self.shell.positions(t)?;
        let embed = self.materialise(ranks, 0)?;
        self.set_ends(Some(&embed), None)?;
        let mut x = self.shell.embed(&batch.ids)?.detach();
        drop(embed);
        for layer in 0..self.shell.config.num_hidden_layers {
            let vars = self.materialise(ranks, layer + 1)?;
            let block = self.block(layer, &vars)?;
            x = self
                .shell
                .forward_block(&block, layer, &x, &pos, pass)?
                .detach();
        }
        let head = self.materialise(ranks, self.units.len() - 1)?;
        let embed = if self.tied {
            Some(self.materialise(ranks, 0)?)
        } else {
            None
        };
        self.set_ends(embed.as_deref(), Some(&head))?;
        let loss = self
            .shell
            .head_loss_sum(&x, &batch.rows, &batch.targets)?
            .detach();
        self.set_ends(None, None)?;
        self.end_pass()?;
        Ok(f64::from(loss.to_scalar::<f32>()?))
    }

    /// Forward and backward of one micro-batch: returns its summed loss and adds this
    /// rank's shard of the gradient of `scale · loss`, summed over the ranks, to the
    /// step's. Every rank must call it the same number of times a step; one without a
    /// batch (`None`, the end of an epoch) takes part in the collectives with a zero
    /// gradient, and returns 0.
    pub fn forward_backward(
        &mut self,
        ranks: &mut Ranks,
        batch: Option<&Batch>,
        scale: f64,
        pass: Pass,
    ) -> Result<f64> {
        self.begin_pass(self.schedule(true))?;
        let Some(batch) = batch else {
            self.idle_forward_backward(ranks)?;
            return self.end_pass().map(|()| 0.0);
        };
        let (_, t) = batch.ids.dims2()?;
        let pos = self.shell.positions(t)?;
        let layers = self.shell.config.num_hidden_layers;
        let head_unit = self.units.len() - 1;
        let keep = self.keep_gathered;
        // Units gathered in forward and kept for backward: every unit when keeping
        // them; otherwise only the tied embedding, from the head to the embedding's
        // backward (it is needed again soon, and gathering it twice more would cost
        // more traffic than any block).
        let mut kept: Vec<Option<Vec<Var>>> = vec![None; self.units.len()];

        // Forward, keeping each block's input.
        let embed = self.materialise(ranks, 0)?;
        self.set_ends(Some(&embed), None)?;
        let mut x = self.shell.embed(&batch.ids)?.detach();
        if keep {
            kept[0] = Some(embed);
        } else {
            drop(embed);
        }
        let mut inputs = Vec::with_capacity(layers);
        for layer in 0..layers {
            let vars = self.materialise(ranks, layer + 1)?;
            let block = self.block(layer, &vars)?;
            let out = self
                .shell
                .forward_block(&block, layer, &x, &pos, pass)?
                .detach();
            inputs.push(x);
            x = out;
            if keep {
                kept[layer + 1] = Some(vars);
            }
        }

        // The head: its gradient, and the gradient reaching the last block's output.
        let head = self.materialise(ranks, head_unit)?;
        if self.tied && kept[0].is_none() {
            kept[0] = Some(self.materialise(ranks, 0)?);
        }
        let tied_embed = if self.tied { kept[0].as_deref() } else { None };
        let embed_var = tied_embed.map(|vars| vars[0].clone());
        self.set_ends(tied_embed, Some(&head))?;
        let h = Var::from_tensor(&x)?;
        let loss = self
            .shell
            .head_loss_sum(h.as_tensor(), &batch.rows, &batch.targets)?;
        let loss_value = f64::from(loss.to_scalar::<f32>()?);
        let store = (loss * scale)?.backward()?;
        let grads: Vec<Option<Tensor>> = head
            .iter()
            .map(|v| store.get(v.as_tensor()).cloned())
            .collect();
        let mut embed_grad = embed_var
            .as_ref()
            .and_then(|var| store.get(var.as_tensor()).cloned());
        let mut upstream = store
            .get(h.as_tensor())
            .ok_or_else(|| Error::invalid("no gradient reached the last block"))?
            .detach();
        drop(store);
        self.set_ends(None, None)?;
        drop(head);
        self.scatter_grads(ranks, head_unit, &grads)?;

        // Backward through the blocks, last first, each recomputed from its input.
        for layer in (0..layers).rev() {
            let vars = match kept[layer + 1].take() {
                Some(vars) => vars,
                None => self.materialise(ranks, layer + 1)?,
            };
            let block = self.block(layer, &vars)?;
            let input = Var::from_tensor(&inputs[layer])?;
            let out = self
                .shell
                .forward_block(&block, layer, input.as_tensor(), &pos, pass)?;
            // d(Σ out·g)/dθ = gᵀ·∂out/∂θ: the vector-Jacobian product.
            let store = (out * &upstream)?.sum_all()?.backward()?;
            let grads: Vec<Option<Tensor>> = vars
                .iter()
                .map(|v| store.get(v.as_tensor()).cloned())
                .collect();
            upstream = store
                .get(input.as_tensor())
                .ok_or_else(|| {
                    Error::invalid(format!("no gradient reached block {layer}'s input"))
                })?
                .detach();
            drop((store, block, vars));
            inputs.truncate(layer);
            self.scatter_grads(ranks, layer + 1, &grads)?;
        }

        // The embedding: scatter the upstream gradient into the looked-up rows.
        let embed = match kept[0].take() {
            Some(vars) => vars,
            None => self.materialise(ranks, 0)?,
        };
        self.set_ends(Some(&embed), None)?;
        let x0 = self.shell.embed(&batch.ids)?;
        let store = (x0 * &upstream)?.sum_all()?.backward()?;
        let lookup = store.get(embed[0].as_tensor()).cloned();
        embed_grad = match (embed_grad, lookup) {
            (Some(a), Some(b)) => Some((a + b)?),
            (a, b) => a.or(b),
        };
        drop(store);
        self.set_ends(None, None)?;
        drop(embed);
        self.scatter_grads(ranks, 0, &[embed_grad])?;
        self.end_pass()?;
        Ok(loss_value)
    }

    /// [`Self::forward_backward`]'s collectives, in the same order, with no batch (the
    /// same interleaving of gathers and reduce-scatters matters: a rank waiting for a
    /// gather that the others start only after a reduce-scatter it has not joined
    /// would wait for ever).
    fn idle_forward_backward(&mut self, ranks: &mut Ranks) -> Result<()> {
        let head = self.units.len() - 1;
        let keep = self.keep_gathered;
        for u in 0..=head {
            self.gather(ranks, u)?;
        }
        // The tied embedding is gathered again for the head unless it was kept.
        let embed_kept = keep || self.tied;
        if self.tied && !keep {
            self.gather(ranks, 0)?;
        }
        for u in (1..=head).rev() {
            if u != head && !keep {
                self.gather(ranks, u)?;
            }
            let none = vec![None; self.units[u].tensors.len()];
            self.scatter_grads(ranks, u, &none)?;
        }
        if !embed_kept {
            self.gather(ranks, 0)?;
        }
        self.scatter_grads(ranks, 0, &[None])?;
        Ok(())
    }

    /// The optimizer step on this rank's shards with learning rate `lr`, after
    /// clipping the gradient's global norm (over every rank's shards) to `max_norm`
    /// (0: no clip). Returns the norm before clipping; clears the step's gradients.
    pub fn step(&mut self, ranks: &mut Ranks, lr: f64, max_norm: f64) -> Result<f64> {
        let mut grads = Vec::with_capacity(self.shards.len());
        for (slot, shard) in self.grads.iter_mut().zip(&self.shards) {
            grads.push(match slot.take() {
                Some(g) => g,
                None => shard.as_tensor().zeros_like()?,
            });
        }
        let local = global_norm(&grads)?;
        let mut squares = [local * local];
        ranks.sum_figures(&mut squares)?;
        let norm = squares[0].sqrt();
        if max_norm > 0.0 {
            // PyTorch's clip_grad_norm_ factor.
            let factor = max_norm / (norm + 1e-6);
            if factor < 1.0 {
                for g in &mut grads {
                    *g = (&*g * factor)?;
                }
            }
        }
        let params: Vec<&Var> = self.shards.iter().collect();
        self.optimizer.update(&params, &grads, lr)?;
        Ok(norm)
    }

    /// Writes a sharded checkpoint of `state` in `dir` (every rank must call it at the
    /// same step), keeping the newest `keep`; rank 0 returns its path.
    pub fn save_checkpoint(
        &mut self,
        ranks: &mut Ranks,
        dir: &Path,
        keep: usize,
        state: &TrainerState,
    ) -> Result<Option<PathBuf>> {
        let tmp = checkpoint::partial_dir(dir, state.step);
        if ranks.is_primary() {
            checkpoint::begin(&tmp)?;
        }
        ranks.barrier()?;
        let moments = self.optimizer.moments().ok_or_else(|| {
            Error::invalid("the sharded optimizer holds every moment of its shards")
        })?;
        let mut named = Vec::with_capacity(3 * self.shards.len());
        for (u, shard) in self.shards.iter().enumerate() {
            named.push((format!("w.{u}"), shard.as_tensor().clone()));
            named.push((format!("m.{u}"), moments.m[u].clone()));
            named.push((format!("v.{u}"), moments.v[u].clone()));
        }
        let file = shard_file(self.rank, self.world);
        let bytes = crate::adapter::safetensors_bytes(named, &file)?;
        write_atomic(&tmp.join(&file), &bytes)?;
        ranks.barrier()?;
        let written = if ranks.is_primary() {
            let layout = Layout {
                world_size: self.world,
                units: self
                    .units
                    .iter()
                    .map(|u| LayoutUnit {
                        name: u.name.clone(),
                        numel: u.numel,
                    })
                    .collect(),
            };
            let json = serde_json::to_vec_pretty(&layout).expect("a layout serialises");
            write_atomic(&tmp.join(LAYOUT_FILE), &json)?;
            Some(checkpoint::finish(dir, &tmp, keep, state)?)
        } else {
            None
        };
        // Nobody goes on (and possibly fails) before the checkpoint is whole.
        ranks.barrier()?;
        Ok(written)
    }

    /// Restores the newest checkpoint in `dir`, sharded (written by any number of
    /// ranks) or whole (unsharded full fine-tuning), if there is one.
    pub fn resume_latest(&mut self, dir: &Path, fingerprint: &str) -> Result<Option<TrainerState>> {
        let Some((path, state)) = checkpoint::latest_state(dir, fingerprint)? else {
            return Ok(None);
        };
        let source = Source::open(&path, &self.units)?;
        let device = self.shell.device().clone();
        let (mut m, mut v) = (Vec::new(), Vec::new());
        for (u, unit) in self.units.iter().enumerate() {
            let range = unit.shard_range(self.rank, self.world);
            let read = |kind: Kind| -> Result<Tensor> {
                let values = source.read(kind, u, unit, range.clone())?;
                Ok(Tensor::from_vec(values, range.len(), &device)?)
            };
            self.shards[u].set(&read(Kind::Weight)?)?;
            m.push(read(Kind::First)?);
            v.push(read(Kind::Second)?);
        }
        self.optimizer.restore(state.step, Moments { m, v })?;
        Ok(Some(state))
    }

    /// Gathers every unit and, on rank 0, writes the model as a Hugging Face
    /// checkpoint in `out` with `source`'s config and tokenizer. Every rank must call
    /// it; rank 0 returns the artifact.
    pub fn save_model(
        &mut self,
        ranks: &mut Ranks,
        source: &Path,
        out: &Path,
        max_shard_bytes: u64,
    ) -> Result<Option<Artifact>> {
        let mut tensors = Vec::new();
        for u in 0..self.units.len() {
            let flat = self.gather(ranks, u)?;
            if !ranks.is_primary() {
                continue;
            }
            let mut offset = 0;
            for (name, shape) in &self.units[u].tensors {
                let len: usize = shape.iter().product();
                let t = Tensor::from_slice(
                    &flat[offset..offset + len],
                    shape.as_slice(),
                    &Device::Cpu,
                )?;
                tensors.push((name.clone(), t));
                offset += len;
            }
        }
        if !ranks.is_primary() {
            return Ok(None);
        }
        Ok(Some(save_full_tensors(
            tensors,
            source,
            out,
            max_shard_bytes,
        )?))
    }
}

/// What a checkpoint file holds of a unit.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Weight,
    First,
    Second,
}

impl Kind {
    fn prefix(self) -> &'static str {
        match self {
            Self::Weight => "w",
            Self::First => "m",
            Self::Second => "v",
        }
    }
}

/// The files of a checkpoint to read shards from.
enum Source {
    /// Shards written by `world` ranks.
    Sharded {
        world: usize,
        files: Vec<MmapedSafetensors>,
    },
    /// The whole weights and moments, by tensor name.
    Whole {
        weights: MmapedSafetensors,
        moments: MmapedSafetensors,
    },
}

fn map(path: &Path) -> Result<MmapedSafetensors> {
    // SAFETY: checkpoint files are written once under a temporary directory and never
    // modified after its rename; nothing writes them while a run reads them.
    #[allow(unsafe_code)]
    unsafe { MmapedSafetensors::new(path) }.map_err(|err| Error::Safetensors {
        action: "read",
        path: path.to_owned(),
        message: err.to_string(),
    })
}

fn floats(view: &safetensors::tensor::TensorView<'_>, range: Range<usize>) -> Vec<f32> {
    view.data()[4 * range.start..4 * range.end]
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

impl Source {
    fn open(path: &Path, units: &[Unit]) -> Result<Self> {
        let layout_path = path.join(LAYOUT_FILE);
        if !layout_path.is_file() {
            return Ok(Self::Whole {
                weights: map(&path.join(checkpoint::FULL_WEIGHTS_FILE))?,
                moments: map(&path.join(checkpoint::OPTIMIZER_FILE))?,
            });
        }
        let layout: Layout = serde_json::from_slice(
            &std::fs::read(&layout_path).map_err(Error::io("read", &layout_path))?,
        )
        .map_err(|err| Error::Safetensors {
            action: "parse",
            path: layout_path.clone(),
            message: err.to_string(),
        })?;
        let same = layout.units.len() == units.len()
            && layout
                .units
                .iter()
                .zip(units)
                .all(|(l, u)| l.numel == u.numel);
        if !same {
            return Err(Error::invalid(format!(
                "checkpoint {} was written for a model of other shapes",
                path.display()
            )));
        }
        let files = (0..layout.world_size)
            .map(|r| map(&path.join(shard_file(r, layout.world_size))))
            .collect::<Result<_>>()?;
        Ok(Self::Sharded {
            world: layout.world_size,
            files,
        })
    }

    /// Elements `range` of unit `u`'s padded flat vector of `kind`.
    fn read(&self, kind: Kind, u: usize, unit: &Unit, range: Range<usize>) -> Result<Vec<f32>> {
        let missing = |what: String| Error::invalid(format!("checkpoint has no tensor {what}"));
        let mut out = Vec::with_capacity(range.len());
        let real = range.start.min(unit.numel)..range.end.min(unit.numel);
        match self {
            Self::Sharded { world, files } => {
                let name = format!("{}.{u}", kind.prefix());
                for (r, file) in files.iter().enumerate() {
                    let theirs = unit.shard_range(r, *world);
                    let (lo, hi) = (real.start.max(theirs.start), real.end.min(theirs.end));
                    if lo < hi {
                        let view = file.get(&name).map_err(|_| missing(name.clone()))?;
                        out.extend(floats(&view, lo - theirs.start..hi - theirs.start));
                    }
                }
            }
            Self::Whole { weights, moments } => {
                let mut offset = 0;
                for (name, shape) in &unit.tensors {
                    let len: usize = shape.iter().product();
                    let (lo, hi) = (real.start.max(offset), real.end.min(offset + len));
                    if lo < hi {
                        let (file, key) = match kind {
                            Kind::Weight => (weights, name.clone()),
                            Kind::First | Kind::Second => {
                                (moments, format!("{}.{name}", kind.prefix()))
                            }
                        };
                        let view = file.get(&key).map_err(|_| missing(key.clone()))?;
                        out.extend(floats(&view, lo - offset..hi - offset));
                    }
                    offset += len;
                }
            }
        }
        out.resize(range.len(), 0.0);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(numel: usize) -> Unit {
        Unit::new("u".into(), vec![("t".into(), vec![numel])])
    }

    #[test]
    fn shards_are_even_and_cover_the_padded_unit_in_rank_order() {
        let u = unit(10);
        assert_eq!(u.shard_len(4), 3);
        let ranges: Vec<_> = (0..4).map(|r| u.shard_range(r, 4)).collect();
        assert_eq!(ranges, vec![0..3, 3..6, 6..9, 9..12]);
        assert_eq!(u.shard_range(0, 1), 0..10);
    }
}
