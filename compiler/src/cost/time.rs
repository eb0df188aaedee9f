//! Step time on a GPU cluster, predicted before anything runs.
//!
//! The model prices one training step of one rank from the figures the
//! checker gathered (per-rank FLOPs, kernels, activation bytes, partial-sum
//! and token-exchange bytes, all per microbatch) and a device profile:
//!
//! - **Compute.** Matmul FLOPs at the profile's achievable fraction of the
//!   dense peak, the attention core at its own fraction, plus a fixed cost
//!   per kernel (so small matmuls run below the large-matmul rate). The
//!   backward pass is twice the forward FLOPs and kernels.
//! - **Memory-bound ops.** Each byte of a layer's saved activations
//!   (Korthikanti's count) crosses HBM twice in the forward pass and four
//!   times in the backward, at the achievable HBM bandwidth. With a fused
//!   attention kernel (`achievable.fused_attention`, FlashAttention) the
//!   score matrix stays on chip and is left out.
//! - **Collectives.** An alpha-beta model by algorithm (ring, or a tree for
//!   an all-reduce when that is faster) over the link the group sits on:
//!   NVLink when the whole group is inside one node under the rank map
//!   (`parallel::mesh::rank_order`), else the per-GPU interconnect bandwidth.
//!   Tensor parallelism reduces every row-parallel matmul's output in the
//!   forward pass and the conjugate gradient in the backward (reduce-scatter
//!   plus all-gather with sequence parallelism). Experts on the data axis
//!   exchange their routed tokens by all-to-all, twice each way. Pipeline
//!   stages send a layer input forward and its gradient back per microbatch
//!   and model chunk; a parameter both end stages use (a tied embedding)
//!   has its gradient exchanged between them once per step.
//! - **Pipeline bubble.** GPipe and 1F1B: (m + p − 1) microbatch slots of
//!   the slowest stage; interleaved 1F1B with v chunks: (m + (p − 1)/v).
//! - **Data parallelism.** The gradient all-reduce (ZeRO 1/2: reduce-scatter)
//!   overlaps the last microbatch's backward pass; ZeRO 1/2's all-gather of
//!   the updated weights overlaps the next step's first forward pass. Only
//!   the excess is exposed. ZeRO 3 gathers
//!   the weights for every microbatch's forward and backward pass and
//!   reduce-scatters its gradients, overlapped with that microbatch.
//! - **Examples that meet across the batch.** Under data parallelism a
//!   contrastive loss's gathered side is all-gathered forward and its
//!   gradient reduce-scattered back, and each batch statistic
//!   (SyncBatchNorm) and its gradient are all-reduced, per microbatch and
//!   exposed (counted with the data-parallel communication).
//! - **Recompute.** `selective` reruns the attention core in the backward
//!   pass; `full` reruns each layer's forward pass, its collectives included.
//! - **Optimizer.** AdamW reads and writes its state once per step at HBM
//!   bandwidth: 28 bytes per element it updates (fp32 master, m, v, the
//!   gradient, the 16-bit weight copy).
//!
//! Throughput is reported in the crate's FLOP convention
//! ([`super::FLOP_CONVENTION`]): model FLOPs, recompute not counted; MFU is
//! that over the dense peak. `hardware_tflops_per_gpu` adds recompute.

use super::memory::{self, RankMemory};
use crate::config::{Parallel, Precision, Recompute};
use crate::device::Device;
use crate::model::{Model, OpCost};
use serde::Serialize;

/// The collective algorithms the model prices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    Ring,
    Tree,
    Pairwise,
    PointToPoint,
}

/// Collectives, by what they move.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    AllReduce,
    ReduceScatter,
    AllGather,
    AllToAll,
    SendRecv,
}

/// The link a group communicates over: achievable bandwidth (bytes/s per
/// GPU and direction) and the latency of one step.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Link {
    pub bandwidth: f64,
    pub latency: f64,
    pub inside_node: bool,
}

impl Link {
    pub fn nvlink(dev: &Device) -> Link {
        Link {
            bandwidth: dev.nvlink_bandwidth * dev.achievable.link,
            latency: dev.achievable.nvlink_latency_us * 1e-6,
            inside_node: true,
        }
    }
    pub fn interconnect(dev: &Device) -> Link {
        Link {
            bandwidth: dev.interconnect_bandwidth * dev.achievable.link,
            latency: dev.achievable.interconnect_latency_us * 1e-6,
            inside_node: false,
        }
    }
}

/// Seconds for one collective over `n` ranks of a buffer of `bytes` (the
/// whole buffer each rank holds: an all-reduce's input, a reduce-scatter's
/// input, an all-gather's output, an all-to-all's send buffer), and the
/// algorithm that achieves it.
pub fn collective_time(kind: Kind, bytes: f64, n: u64, link: Link) -> (f64, Algorithm) {
    if n <= 1 && kind != Kind::SendRecv {
        return (0.0, Algorithm::Ring);
    }
    let nf = n as f64;
    let (a, b) = (link.latency, link.bandwidth);
    match kind {
        Kind::AllReduce => {
            let ring = 2.0 * (nf - 1.0) * a + 2.0 * (nf - 1.0) / nf * bytes / b;
            // Double binary tree: log-depth latency, each byte up and down once.
            let tree = 2.0 * nf.log2().ceil() * a + 2.0 * bytes / b;
            if tree < ring { (tree, Algorithm::Tree) } else { (ring, Algorithm::Ring) }
        }
        Kind::ReduceScatter | Kind::AllGather => ((nf - 1.0) * a + (nf - 1.0) / nf * bytes / b, Algorithm::Ring),
        Kind::AllToAll => ((nf - 1.0) * a + (nf - 1.0) / nf * bytes / b, Algorithm::Pairwise),
        Kind::SendRecv => (a + bytes / b, Algorithm::PointToPoint),
    }
}

/// The link a group along `axis` uses: NVLink when the group, under the
/// rank map, sits inside one node.
pub fn link_of(par: &Parallel, axis: &str, dev: &Device) -> Link {
    let order = crate::parallel::mesh::rank_order(par);
    let Some(i) = order.iter().position(|(a, _)| a == axis) else {
        return Link::nvlink(dev);
    };
    let stride: u64 = order[i + 1..].iter().map(|(_, n)| *n).product();
    let span = stride.saturating_mul(order[i].1);
    let gpn = dev.gpus_per_node.max(1) as u64;
    if span <= gpn && gpn.is_multiple_of(span) { Link::nvlink(dev) } else { Link::interconnect(dev) }
}

/// One collective's share of a step.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CollectiveCost {
    /// What it is for: `tensor`, `expert`, `pipeline`, `data`, `zero3`.
    pub purpose: &'static str,
    pub kind: Kind,
    pub axis: String,
    pub group: u64,
    pub inside_node: bool,
    pub algorithm: Algorithm,
    /// Calls per step on the busiest rank.
    pub calls: f64,
    /// Bytes per call (the buffer each rank holds).
    pub bytes: f64,
    /// Seconds per step, before any overlap.
    pub seconds: f64,
}

/// Where a step's time goes, seconds, on the critical path.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct Breakdown {
    /// Forward and backward compute of every microbatch on the slowest stage
    /// (matmuls, attention, memory-bound ops), recompute excluded.
    pub compute: f64,
    pub recompute: f64,
    /// Tensor-parallel collectives (forward, backward and recompute).
    pub tensor_comm: f64,
    /// Expert all-to-alls.
    pub expert_comm: f64,
    /// Pipeline sends and receives (a tied embedding's gradient included).
    pub pipeline_comm: f64,
    /// Pipeline fill and drain.
    pub bubble: f64,
    /// Data-parallel (and ZeRO) communication not hidden behind compute.
    pub data_comm_exposed: f64,
    /// All of it, hidden or not.
    pub data_comm: f64,
    pub optimizer: f64,
}

/// A predicted training step.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Estimate {
    pub device: String,
    pub world: u64,
    pub step_time_s: f64,
    pub tokens_per_s: f64,
    /// Model FLOPs per second per GPU (the crate's convention, recompute not counted), TFLOP/s.
    pub tflops_per_gpu: f64,
    /// With recomputed FLOPs counted.
    pub hardware_tflops_per_gpu: f64,
    /// `tflops_per_gpu` over the device's dense peak for the training precision.
    pub mfu: f64,
    pub peak_tflops: f64,
    pub model_flops_per_step: f64,
    pub tokens_per_step: u64,
    pub micro_batch: u64,
    pub microbatches: u64,
    /// One microbatch's forward and backward pass on the slowest stage, with
    /// its collectives: the pipeline's beat.
    pub microbatch_s: f64,
    pub breakdown: Breakdown,
    pub collectives: Vec<CollectiveCost>,
    /// The rank with the most memory and its figures.
    pub memory_max_rank: usize,
    pub memory_max: RankMemory,
}

/// The collectives of a step, priced as they are added.
struct Ledger<'a> {
    par: &'a Parallel,
    dev: &'a Device,
    items: Vec<CollectiveCost>,
}

impl Ledger<'_> {
    /// Price `calls` collectives of `per_call` bytes over the `n` ranks of
    /// `axis`; returns their seconds.
    fn add(&mut self, purpose: &'static str, kind: Kind, axis: &str, n: u64, calls: f64, per_call: f64) -> f64 {
        if calls <= 0.0 || per_call <= 0.0 || (n <= 1 && kind != Kind::SendRecv) {
            return 0.0;
        }
        let link = link_of(self.par, axis, self.dev);
        let (t, algorithm) = collective_time(kind, per_call, n, link);
        let seconds = t * calls;
        self.items.push(CollectiveCost {
            purpose,
            kind,
            axis: axis.to_string(),
            group: n,
            inside_node: link.inside_node,
            algorithm,
            calls,
            bytes: per_call,
            seconds,
        });
        seconds
    }
}

/// The dtype whose peak a precision runs at.
pub fn peak_dtype(p: Precision) -> &'static str {
    match p {
        Precision::Bf16 => "bf16",
        Precision::Fp16 => "fp16",
        Precision::Fp32 => "fp32",
    }
}

/// Predict a training step of `m` under its own layout on `dev`.
pub fn estimate(m: &Model, dev: &Device) -> Result<Estimate, String> {
    let batch = m.train.as_ref().map(|t| t.batch).ok_or_else(|| format!("`{}` has no `train` section", m.name))?;
    estimate_for(m, &m.parallel, m.micro_batch, batch, dev)
}

/// Forward time of one microbatch's ops on one rank (compute and memory-bound).
fn forward_time(c: &OpCost, dev: &Device, peak: f64) -> f64 {
    let a = &dev.achievable;
    (c.rank_flops - c.rank_attn_flops) / (a.matmul * peak)
        + c.rank_attn_flops / (a.attention * peak)
        + c.kernels * a.kernel_us * 1e-6
        + 2.0 * hbm_bytes(c, dev) / (a.hbm * dev.hbm_bandwidth)
}

/// The activation bytes memory-bound kernels move, per HBM pass.
fn hbm_bytes(c: &OpCost, dev: &Device) -> f64 {
    if dev.achievable.fused_attention { c.act_selective } else { c.act_none }
}

/// Backward time of the same ops: twice the FLOPs and kernels, four HBM passes.
fn backward_time(c: &OpCost, dev: &Device, peak: f64) -> f64 {
    let a = &dev.achievable;
    2.0 * ((c.rank_flops - c.rank_attn_flops) / (a.matmul * peak)
        + c.rank_attn_flops / (a.attention * peak)
        + c.kernels * a.kernel_us * 1e-6)
        + 4.0 * hbm_bytes(c, dev) / (a.hbm * dev.hbm_bandwidth)
}

/// Predict a training step of `m` under another layout `par` with `micro_batch`
/// sequences per microbatch and `batch` sequences per step. `m` must have been
/// checked with the same split of its model axes (see
/// [`memory::memory_per_rank_for`]).
pub fn estimate_for(m: &Model, par: &Parallel, micro_batch: u64, batch: u64, dev: &Device) -> Result<Estimate, String> {
    let precision = m.train.as_ref().map(|t| t.precision).or(par.precision).unwrap_or(Precision::Fp32);
    let dtype = peak_dtype(precision);
    let peak = dev
        .peak_flops(dtype)
        .ok_or_else(|| format!("device `{}` has no {dtype} peak rate in its profile", dev.name))?;
    let dp = par.data().max(1);
    let mbs = micro_batch.max(1);
    if !batch.is_multiple_of(dp * mbs) {
        return Err(format!("batch {batch} does not split into microbatches of {mbs} over {dp} data ranks"));
    }
    let micro = batch / (dp * mbs);
    let stages = par.stages().max(1);
    let v = par.chunks_per_stage();
    let scale = mbs as f64 / m.micro_batch.max(1) as f64;
    let c = &m.cost;
    let layers = c.layer_count.max(1) as f64;
    let layer = (c.layers * (1.0 / layers)).with_batch(scale);
    let pre = c.pre.with_batch(scale);
    let post = c.post.with_batch(scale);
    let bytes = precision.bytes() as f64;

    let mut ledger = Ledger { par, dev, items: Vec::new() };
    // Tensor parallelism: one reduction per row-parallel matmul, each way.
    let tensor_axis = par.axis_of("heads").or_else(|| par.axis_of("mlp")).map(str::to_string);
    let tp = tensor_axis.as_deref().map(|a| par.axis_size(a)).unwrap_or(1);
    let per_stage_layers = layers / stages as f64;
    // One pass (forward, backward or recompute) over ops for every microbatch.
    let tensor_pass = |ledger: &mut Ledger, ops: &OpCost, calls_scale: f64| {
        let Some(axis) = tensor_axis.as_deref() else { return 0.0 };
        if ops.reductions <= 0.0 || tp <= 1 {
            return 0.0;
        }
        let per_call = ops.partial_bytes / ops.reductions;
        let calls = ops.reductions * calls_scale;
        if par.sequence_parallel {
            ledger.add("tensor", Kind::ReduceScatter, axis, tp, calls, per_call)
                + ledger.add("tensor", Kind::AllGather, axis, tp, calls, per_call)
        } else {
            ledger.add("tensor", Kind::AllReduce, axis, tp, calls, per_call)
        }
    };
    // Per microbatch on a stage's layers: forward, backward, recompute.
    let microbatches = micro as f64;
    let tp_fwd = tensor_pass(&mut ledger, &layer, per_stage_layers * microbatches) / microbatches;
    let tp_bwd = tensor_pass(&mut ledger, &layer, per_stage_layers * microbatches) / microbatches;
    // Before and after the layers (a vocabulary-parallel embedding), each way.
    let tp_pre =
        (tensor_pass(&mut ledger, &pre, microbatches) + tensor_pass(&mut ledger, &pre, microbatches)) / microbatches;
    let tp_post =
        (tensor_pass(&mut ledger, &post, microbatches) + tensor_pass(&mut ledger, &post, microbatches)) / microbatches;
    let tp_recompute = if par.recompute == Recompute::Full {
        tensor_pass(&mut ledger, &layer, per_stage_layers * microbatches) / microbatches
    } else {
        0.0
    };

    // Experts on the data axis: dispatch and combine are all-to-alls, each way.
    let expert_axis = m.expert_dim().and_then(|d| par.axis_of(d)).filter(|a| Some(*a) == par.data_axis());
    let a2a_each_way = match expert_axis {
        Some(axis) if layer.exchange_bytes > 0.0 && dp > 1 => {
            // Two all-to-alls (dispatch, combine) per MoE layer forward.
            let per_call = layer.exchange_bytes / layer.exchanges;
            let calls = layer.exchanges * per_stage_layers * microbatches;
            let f = ledger.add("expert", Kind::AllToAll, axis, dp, calls, per_call) / microbatches;
            let b = ledger.add("expert", Kind::AllToAll, axis, dp, calls, per_call) / microbatches;
            let r = if par.recompute == Recompute::Full {
                ledger.add("expert", Kind::AllToAll, axis, dp, calls, per_call) / microbatches
            } else {
                0.0
            };
            (f, b, r)
        }
        _ => (0.0, 0.0, 0.0),
    };

    // Pipeline: a layer input forward and its gradient back, per chunk.
    let pipe_each = match par.axis_of("layer") {
        Some(axis) if stages > 1 => {
            // One layer's input. Without sequence parallelism it is whole on
            // every tensor rank, and each sends 1/t of it (Megatron's
            // scatter-gather), gathered again over NVLink on arrival.
            let split = if par.sequence_parallel { 1.0 } else { tp as f64 };
            let per_call = c.layer_input_bytes / layers * scale / split;
            let calls = v as f64 * microbatches;
            let f = ledger.add("pipeline", Kind::SendRecv, axis, stages, calls, per_call) / microbatches;
            let b = ledger.add("pipeline", Kind::SendRecv, axis, stages, calls, per_call) / microbatches;
            (f, b)
        }
        _ => (0.0, 0.0),
    };

    // One microbatch on each stage; the slowest paces the pipeline.
    let body_f = forward_time(&layer, dev, peak) * per_stage_layers;
    let body_b = backward_time(&layer, dev, peak) * per_stage_layers;
    let recompute_layers = match par.recompute {
        Recompute::None => 0.0,
        Recompute::Selective => {
            let attn = OpCost {
                rank_flops: layer.rank_attn_flops,
                rank_attn_flops: layer.rank_attn_flops,
                kernels: if layer.rank_attn_flops > 0.0 { 2.0 } else { 0.0 },
                act_none: layer.act_none - layer.act_selective,
                ..OpCost::default()
            };
            forward_time(&attn, dev, peak) * per_stage_layers
        }
        Recompute::Full => body_f,
    };
    let recompute_comm = tp_recompute + a2a_each_way.2;
    let mut slot = 0.0f64;
    // (compute, recompute, backward, forward, tensor collectives outside the
    // layers) of one microbatch on the slowest stage
    let mut worst = (0.0, 0.0, 0.0, 0.0, 0.0);
    for s in 0..stages {
        let mut f = body_f;
        let mut b = body_b;
        if s == 0 {
            f += forward_time(&pre, dev, peak);
            b += backward_time(&pre, dev, peak);
        }
        if s == stages - 1 {
            f += forward_time(&post, dev, peak);
            b += backward_time(&post, dev, peak);
        }
        let mut comm = tp_fwd + tp_bwd + a2a_each_way.0 + a2a_each_way.1 + pipe_each.0 + pipe_each.1;
        if s == 0 {
            comm += tp_pre;
        }
        if s == stages - 1 {
            comm += tp_post;
        }
        let total = f + b + recompute_layers + recompute_comm + comm;
        if total > slot {
            slot = total;
            worst = (
                f + b,
                recompute_layers,
                b + recompute_layers + recompute_comm + tp_bwd + a2a_each_way.1,
                f + tp_fwd + a2a_each_way.0,
                comm - (tp_fwd + tp_bwd + a2a_each_way.0 + a2a_each_way.1 + pipe_each.0 + pipe_each.1),
            );
        }
    }
    let pipeline_time =
        if stages > 1 { (microbatches + (stages - 1) as f64 / v as f64) * slot } else { microbatches * slot };
    // A parameter both end stages use (a tied embedding): its gradient goes
    // from each to the other once per step, after the pipeline drains.
    let tied = match par.axis_of("layer") {
        Some(axis) if stages > 1 => {
            let per_call = memory::shared_elems_for(m, par) as f64 * bytes;
            let there = ledger.add("tied", Kind::SendRecv, axis, stages, 1.0, per_call);
            let back = ledger.add("tied", Kind::SendRecv, axis, stages, 1.0, per_call);
            there.max(back)
        }
        _ => 0.0,
    };

    // Data parallelism and ZeRO.
    let (worst_rank, worst_mem, held, synced) = memory::worst_for(m, par, mbs);
    let (held, synced) = (held as f64, synced as f64);
    let grad_bytes = synced * bytes;
    let (mut data_comm, mut exposed) = (0.0, 0.0);
    if let Some(axis) = par.data_axis()
        && dp > 1
    {
        match par.zero {
            0 => {
                data_comm = ledger.add("data", Kind::AllReduce, axis, dp, 1.0, grad_bytes);
                exposed = (data_comm - worst.2).max(0.0);
            }
            1 | 2 => {
                let rs = ledger.add("data", Kind::ReduceScatter, axis, dp, 1.0, grad_bytes);
                let ag = ledger.add("data", Kind::AllGather, axis, dp, 1.0, grad_bytes);
                data_comm = rs + ag;
                // The updated weights are gathered bucket by bucket as the
                // next step's first forward pass reaches them.
                exposed = (rs - worst.2).max(0.0) + (ag - worst.3).max(0.0);
            }
            _ => {
                // Every microbatch gathers the weights twice and scatters its gradients.
                let ag = ledger.add("zero3", Kind::AllGather, axis, dp, 2.0 * microbatches, grad_bytes);
                let rs = ledger.add("zero3", Kind::ReduceScatter, axis, dp, microbatches, grad_bytes);
                data_comm = ag + rs;
                let per_micro = (ag + rs) / microbatches;
                exposed = microbatches * (per_micro - slot).max(0.0) + ag / (2.0 * microbatches);
            }
        }
    }

    // Examples that meet across the batch, per microbatch and exposed (the
    // next op waits for them): a contrastive loss's gathered side
    // (all-gather forward, reduce-scatter of its gradient back) and batch
    // statistics (SyncBatchNorm: an all-reduce of each statistic forward
    // and of its gradient back).
    if let Some(axis) = par.data_axis()
        && dp > 1
    {
        let (mut gathered, mut stat_calls, mut stat_bytes) = (0.0, 0.0, 0.0);
        for mix in m.examples_meet().iter().filter(|x| x.gathers) {
            let node = &m.graph.nodes[mix.node];
            match &node.op {
                crate::ir::Op::Rename { .. } => gathered += node.ty.numel() as f64 * scale * bytes * dp as f64,
                crate::ir::Op::Reduce { .. } => {
                    stat_calls += 1.0;
                    stat_bytes += node.ty.numel() as f64 * bytes;
                }
                _ => {}
            }
        }
        // (The ledger prices nothing for no calls or no bytes.)
        let batch_comm = ledger.add("batch", Kind::AllGather, axis, dp, microbatches, gathered)
            + ledger.add("batch", Kind::ReduceScatter, axis, dp, microbatches, gathered)
            + ledger.add(
                "batch",
                Kind::AllReduce,
                axis,
                dp,
                2.0 * stat_calls * microbatches,
                stat_bytes / stat_calls.max(1.0),
            );
        data_comm += batch_comm;
        exposed += batch_comm;
    }

    // The optimizer: 28 bytes of HBM traffic per element it updates.
    let sharded = if par.zero >= 1 && dp > 1 { synced / dp as f64 + (held - synced) } else { held };
    let optimizer = sharded * 28.0 / (dev.achievable.hbm * dev.hbm_bandwidth);

    let step = pipeline_time + tied + exposed + optimizer;
    let tokens = batch * m.tokens_per_sample;
    let model_flops = super::flops_per_token_train(m) * tokens as f64;
    let recompute_flops = match par.recompute {
        Recompute::None => 0.0,
        Recompute::Selective => c.layers.attn_flops,
        Recompute::Full => c.layers.flops,
    } / m.micro_batch.max(1) as f64
        * batch as f64;
    let world = par.world().max(1);
    let tflops = model_flops / step / world as f64 / 1e12;
    let bubble = pipeline_time - microbatches * slot;
    let per_step = |x: f64| x * microbatches;
    Ok(Estimate {
        device: dev.name.clone(),
        world,
        step_time_s: step,
        tokens_per_s: tokens as f64 / step,
        tflops_per_gpu: tflops,
        hardware_tflops_per_gpu: (model_flops + recompute_flops) / step / world as f64 / 1e12,
        mfu: tflops * 1e12 / peak,
        peak_tflops: peak / 1e12,
        model_flops_per_step: model_flops,
        tokens_per_step: tokens,
        micro_batch: mbs,
        microbatches: micro,
        microbatch_s: slot,
        breakdown: Breakdown {
            compute: per_step(worst.0),
            recompute: per_step(worst.1),
            tensor_comm: per_step(tp_fwd + tp_bwd + tp_recompute + worst.4),
            expert_comm: per_step(a2a_each_way.0 + a2a_each_way.1 + a2a_each_way.2),
            pipeline_comm: per_step(pipe_each.0 + pipe_each.1) + tied,
            bubble,
            data_comm_exposed: exposed,
            data_comm,
            optimizer,
        },
        collectives: ledger.items,
        memory_max_rank: worst_rank as usize,
        memory_max: worst_mem,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a100() -> &'static Device {
        crate::device::device("a100_80gb").expect("a100")
    }

    #[test]
    fn ring_all_reduce_moves_twice_the_buffer_less_one_share() {
        let link = Link { bandwidth: 100e9, latency: 0.0, inside_node: true };
        let (t, alg) = collective_time(Kind::AllReduce, 1e9, 8, link);
        assert_eq!(alg, Algorithm::Ring);
        assert!((t - 2.0 * 7.0 / 8.0 * 1e9 / 100e9).abs() < 1e-12, "{t}");
        let (rs, _) = collective_time(Kind::ReduceScatter, 1e9, 8, link);
        let (ag, _) = collective_time(Kind::AllGather, 1e9, 8, link);
        assert!((rs + ag - t).abs() < 1e-12, "reduce-scatter + all-gather is an all-reduce");
        assert_eq!(collective_time(Kind::AllReduce, 1e9, 1, link).0, 0.0);
    }

    #[test]
    fn small_all_reduces_over_many_ranks_take_the_tree() {
        let link = Link { bandwidth: 25e9, latency: 10e-6, inside_node: false };
        let (t, alg) = collective_time(Kind::AllReduce, 1024.0, 1024, link);
        assert_eq!(alg, Algorithm::Tree);
        assert!((t - (2.0 * 10.0 * 10e-6 + 2.0 * 1024.0 / 25e9)).abs() < 1e-12);
        // Over few ranks large buffers ride the ring: it moves 2(n-1)/n of
        // the bytes, the tree 2. Over many, the ring's 2(n-1) steps of
        // latency lose even for large buffers.
        assert_eq!(collective_time(Kind::AllReduce, 1e9, 8, link).1, Algorithm::Ring);
        assert_eq!(collective_time(Kind::AllReduce, 1e8, 1024, link).1, Algorithm::Tree);
    }

    #[test]
    fn groups_inside_a_node_use_nvlink() {
        let par = Parallel {
            mesh: vec![("data".into(), 4), ("tensor".into(), 8), ("pipeline".into(), 2)],
            layout: vec![
                ("batch".into(), "data".into()),
                ("heads".into(), "tensor".into()),
                ("layer".into(), "pipeline".into()),
            ],
            ..Parallel::default()
        };
        let dev = a100();
        // Tensor is innermost (stride 1, 8 ranks): one node. Data has stride 8.
        assert!(link_of(&par, "tensor", dev).inside_node);
        assert!(!link_of(&par, "data", dev).inside_node);
        assert!(!link_of(&par, "pipeline", dev).inside_node);
        assert_eq!(link_of(&par, "data", dev).bandwidth, dev.interconnect_bandwidth * dev.achievable.link);
        let small = Parallel { mesh: vec![("data".into(), 2), ("tensor".into(), 4)], ..par };
        assert!(link_of(&small, "data", dev).inside_node, "2 × 4 ranks fit one 8-GPU node");
    }
}
