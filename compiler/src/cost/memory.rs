//! Memory per rank. Ranks are numbered by [`crate::parallel::mesh`].
//!
//! Per parameter element: weights and gradients take the training
//! precision's bytes; the optimizer keeps fp32 state (AdamW: m and v; SGD:
//! momentum) plus an fp32 master copy under mixed precision. ZeRO 1 shards
//! the optimizer over the data axis, 2 also gradients, 3 also weights.
//! Activations follow Korthikanti et al. (2022), per microbatch in flight:
//! GPipe keeps every microbatch, 1F1B keeps `stages - stage` on a stage, and
//! interleaved 1F1B keeps Megatron's warm-up count of model chunks.

use crate::config::{ExpertPlacement, Parallel, Precision, Recompute, Schedule};
use crate::model::{Model, Param, Placement};
use crate::parallel::mesh::{coords, rank_order};
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct RankMemory {
    pub params: u64,
    pub grads: u64,
    pub optimizer: u64,
    pub activations: u64,
    pub total: u64,
}

fn coord_of(order: &[(String, u64)], c: &[u64], axis: Option<&str>) -> u64 {
    axis.and_then(|a| order.iter().position(|(x, _)| x == a)).map(|i| c[i]).unwrap_or(0)
}

/// The pipeline stage that holds layer `i` of a repeat of `n` layers.
pub fn stage_of_layer(p: &Parallel, n: u64, i: u64) -> u64 {
    let stages = p.stages();
    let chunks = stages.saturating_mul(p.pipeline.virtual_stages.max(1));
    let per_chunk = n.div_ceil(chunks).max(1);
    (i / per_chunk) % stages
}

/// Elements of a parameter held by the rank at `stage` / `expert_rank`.
fn param_elems_on(m: &Model, par: &Parallel, p: &Param, stage: u64, expert_rank: u64) -> u64 {
    let stages = par.stages();
    let per_layer: u64 = p.ty.dims.iter().filter(|d| d.name != "layer").map(|d| d.size).fold(1u64, u64::saturating_mul);
    let layers_here = match p.placement {
        Placement::Layers => {
            let n = p.stack.and_then(|s| m.stacks.get(s)).map(|s| s.layers).unwrap_or(1);
            p.layers.iter().filter(|&&i| stage_of_layer(par, n, i) == stage).count() as u64
        }
        Placement::First => u64::from(stage == 0),
        Placement::Last => u64::from(stage == stages - 1),
        Placement::Both => u64::from(stage == 0 || stage == stages - 1),
    };
    if layers_here == 0 {
        return 0;
    }
    let mut elems = per_layer.saturating_mul(layers_here);
    for d in &p.ty.dims {
        if d.name == "layer" {
            continue;
        }
        let Some(axis) = par.axis_of(&d.name) else {
            continue;
        };
        let split = par.axis_size(axis);
        let is_expert = p.expert.as_ref().is_some_and(|e| e.dim == d.name);
        // The data axis splits the batch and expert weights, nothing else (a
        // router's expert dim stays whole on every rank).
        if Some(axis) == par.data_axis() && !is_expert {
            continue;
        }
        match (&par.experts, is_expert) {
            (Some(x), true) => {
                let held = match &x.placement {
                    ExpertPlacement::Explicit { ranks } => {
                        ranks.get(expert_rank as usize).map(|r| r.len() as u64).unwrap_or(0)
                    }
                    _ => d.size.div_ceil(split),
                };
                elems = (elems / d.size).saturating_mul(held);
            }
            _ => elems = (elems / d.size).saturating_mul(d.size.div_ceil(split)),
        }
    }
    elems
}

/// Is a parameter replicated over the data axis (so ZeRO can shard it)?
fn data_replicated(par: &Parallel, p: &Param) -> bool {
    let Some(data) = par.data_axis() else {
        return false;
    };
    !p.ty.dims.iter().any(|d| par.axis_of(&d.name) == Some(data) && p.expert.as_ref().is_some_and(|e| e.dim == d.name))
}

/// Parameter elements held by every rank, in rank order.
pub fn params_per_rank(m: &Model) -> Vec<u64> {
    let par = &m.parallel;
    per_rank(m, par, |stage, er| {
        m.params.iter().map(|p| param_elems_on(m, par, p, stage, er)).fold(0u64, u64::saturating_add)
    })
}

/// Elements of parameters used by both the first and the last pipeline
/// stage (a tied embedding) that the first stage's rank 0 holds: their
/// gradients are summed between the two stages every step.
pub fn shared_elems_for(m: &Model, par: &Parallel) -> u64 {
    if par.stages() <= 1 {
        return 0;
    }
    m.params
        .iter()
        .filter(|p| p.placement == Placement::Both)
        .map(|p| param_elems_on(m, par, p, 0, 0))
        .fold(0u64, u64::saturating_add)
}

/// The worst rank's memory, its held and data-synced parameter elements
/// (the most over ranks), without enumerating every rank: ranks differ only
/// by pipeline stage and expert coordinate. For the planner's search.
pub fn worst_for(m: &Model, par: &Parallel, micro_batch: u64) -> (u64, RankMemory, u64, u64) {
    let order = rank_order(par);
    let expert_axis = m.expert_dim().and_then(|d| par.axis_of(d));
    let stride = |axis: Option<&str>| -> u64 {
        axis.and_then(|a| order.iter().position(|(x, _)| x == a))
            .map(|i| order[i + 1..].iter().map(|(_, n)| *n).product())
            .unwrap_or(0)
    };
    let (pipe_stride, expert_stride) = (stride(par.axis_of("layer")), stride(expert_axis));
    let ep = expert_axis.map(|a| par.axis_size(a)).unwrap_or(1);
    let mut worst: Option<(u64, RankMemory)> = None;
    let (mut held, mut synced) = (0u64, 0u64);
    for stage in 0..par.stages().max(1) {
        for er in 0..ep {
            let mem = rank_memory(m, par, micro_batch, stage, er);
            let rank = stage * pipe_stride + er * expert_stride;
            if worst.is_none_or(|(r, w)| mem.total > w.total || (mem.total == w.total && rank < r)) {
                worst = Some((rank, mem));
            }
            let (mut h, mut s) = (0u64, 0u64);
            for p in &m.params {
                let n = param_elems_on(m, par, p, stage, er);
                h = h.saturating_add(n);
                if data_replicated(par, p) {
                    s = s.saturating_add(n);
                }
            }
            held = held.max(h);
            synced = synced.max(s);
        }
    }
    let (rank, mem) = worst.unwrap_or_default();
    (rank, mem, held, synced)
}

fn per_rank<T: Clone>(m: &Model, par: &Parallel, f: impl Fn(u64, u64) -> T) -> Vec<T> {
    let order = rank_order(par);
    let world = par.world().max(1);
    let expert_axis = m.expert_dim().and_then(|d| par.axis_of(d));
    let mut cache: std::collections::HashMap<(u64, u64), T> = std::collections::HashMap::new();
    (0..world)
        .map(|r| {
            let c = coords(&order, r);
            let stage = coord_of(&order, &c, par.axis_of("layer"));
            let er = coord_of(&order, &c, expert_axis);
            cache.entry((stage, er)).or_insert_with(|| f(stage, er)).clone()
        })
        .collect()
}

/// Model chunks (1F1B: microbatches; interleaved: chunks of layers) alive on a stage.
fn in_flight(par: &Parallel, stage: u64) -> f64 {
    let p = par.stages();
    let mb = par.pipeline.microbatches.max(1);
    let v = par.pipeline.virtual_stages.max(1);
    if p <= 1 {
        return 1.0;
    }
    match par.pipeline.schedule {
        Schedule::Gpipe => mb as f64,
        Schedule::OneFOneB => (p - stage).min(mb) as f64,
        Schedule::Interleaved1f1b => {
            let warmup = (2 * (p - stage - 1)).saturating_add((v - 1).saturating_mul(p));
            // In layer units: chunks alive × (1 / v of a stage's layers each).
            ((warmup.saturating_add(1)).min(mb.saturating_mul(v))) as f64 / v as f64
        }
    }
}

/// Memory per rank by category, in rank order.
pub fn memory_per_rank(m: &Model) -> Vec<RankMemory> {
    memory_per_rank_for(m, &m.parallel, m.micro_batch)
}

/// [`memory_per_rank`] under another layout and microbatch size. The model
/// must have been checked with the same split of its model axes (tensor,
/// expert): its activation figures are per rank. Pipeline, data, ZeRO,
/// schedule, recompute and microbatch size may differ.
pub fn memory_per_rank_for(m: &Model, par: &Parallel, micro_batch: u64) -> Vec<RankMemory> {
    per_rank(m, par, |stage, er| rank_memory(m, par, micro_batch, stage, er))
}

fn rank_memory(m: &Model, par: &Parallel, micro_batch: u64, stage: u64, er: u64) -> RankMemory {
    let precision = m.train.as_ref().map(|t| t.precision).or(par.precision).unwrap_or(Precision::Fp32);
    let w = precision.bytes();
    let dp = par.data().max(1);
    let (mut params, mut grads, mut optim) = (0f64, 0f64, 0f64);
    let master = if precision == Precision::Fp32 { 0 } else { 4 };
    for p in &m.params {
        let n = param_elems_on(m, par, p, stage, er) as f64;
        if n == 0.0 {
            continue;
        }
        let shard = if data_replicated(par, p) { dp as f64 } else { 1.0 };
        let z = par.zero;
        params += n * w as f64 / if z >= 3 { shard } else { 1.0 };
        // A frozen parameter (`train.freeze`, LoRA's base weights) has no gradient or optimizer state.
        if m.train.is_some() && !p.frozen {
            grads += n * w as f64 / if z >= 2 { shard } else { 1.0 };
            // f32 optimizer state per element (Adafactor's factored moments hold less than one).
            let state = m
                .train
                .as_ref()
                .map_or(0.0, |t| t.optimizer.state_elements(&p.ty.dims) as f64 / p.ty.numel().max(1) as f64);
            optim += n * (state * 4.0 + master as f64) / if z >= 1 { shard } else { 1.0 };
        }
    }
    let scale = micro_batch as f64 / m.micro_batch.max(1) as f64;
    let activations = if m.train.is_some() { activation_bytes_for(m, par, stage) * scale } else { 0.0 };
    let r = RankMemory {
        params: params as u64,
        grads: grads as u64,
        optimizer: optim as u64,
        activations: activations as u64,
        total: 0,
    };
    let total = r.params.saturating_add(r.grads).saturating_add(r.optimizer).saturating_add(r.activations);
    RankMemory { total, ..r }
}

/// Saved activations on one pipeline stage for a training step.
pub fn activation_bytes(m: &Model, stage: u64) -> f64 {
    activation_bytes_for(m, &m.parallel, stage)
}

/// [`activation_bytes`] under another layout (same model-axis split), for
/// the microbatch size the model was checked with.
pub fn activation_bytes_for(m: &Model, par: &Parallel, stage: u64) -> f64 {
    let c = &m.cost;
    let stages = par.stages();
    let layers = c.layer_count.max(1) as f64;
    let pick = |o: &crate::model::OpCost| match par.recompute {
        Recompute::None => o.act_none,
        Recompute::Selective | Recompute::Full => o.act_selective,
    };
    let per_layer = match par.recompute {
        Recompute::Full => c.layer_input_bytes / layers,
        _ => pick(&c.layers) / layers,
    };
    let layers_here = c.layer_count as f64 / stages as f64;
    let chunks = in_flight(par, stage);
    let mut bytes = per_layer * layers_here * chunks;
    if par.recompute == Recompute::Full && c.layer_count > 0 {
        // One layer's activations are rebuilt at a time during backward.
        bytes += c.layers.act_selective / layers;
    }
    let mbs = chunks.ceil().max(1.0);
    if stage == 0 {
        bytes += pick(&c.pre) * mbs;
    }
    if stage == stages - 1 {
        bytes += pick(&c.post);
    }
    bytes
}

/// The rank with the most memory, and its figures.
pub fn worst_rank(mem: &[RankMemory]) -> (usize, RankMemory) {
    // The first rank among equals.
    mem.iter()
        .copied()
        .enumerate()
        .fold((0, RankMemory::default()), |best, (i, r)| if i == 0 || r.total > best.1.total { (i, r) } else { best })
}

/// What a CPU training process takes besides its ranks: the binary, the
/// checked model and its graphs, one thread (peak RSS of a 2-step run of
/// the tiny GPT: 64 MB).
const CPU_PROCESS_BYTES: u128 = 64 << 20;
/// What each simulated rank takes beyond its regions: its lowered program,
/// its thread and the allocator's per-thread heap. Measured: peak RSS of the
/// tiny GPT (120K parameters) on 64 and 256 data-parallel ranks grows by
/// 24 MB per rank, of which its regions are 4 MB (docs/reliability.md).
const CPU_RANK_BYTES: u128 = 20 << 20;

/// Bytes a CPU training run of `m` needs, every simulated rank of its
/// layout in one process: per rank the regions of its lowered program
/// (weights in the spec's precision, with f32 master weights when that is
/// narrower; f32 gradients and optimizer state; the activation arena as this
/// cost model estimates it) and the arena again in f32 for the operands the
/// CPU backend's library calls copy out of it and the f32 shadows of bf16
/// operands (norms, gathers, cross-entropy, routing; measured at 0.5–1.0×
/// the f32 arena); the logical weights and optimizer state that checkpoints
/// and evaluation assemble; and the runtime's own overhead, per process and
/// per rank. The driver checks it before any pass runs
/// (`driver::compile_training`): a layout of many simulated ranks can need
/// more than the machine has.
pub fn cpu_training_bytes(m: &Model) -> u128 {
    let opt_per_elem: u128 = match m.train.as_ref().map(|t| &t.optimizer) {
        Some(crate::config::Optimizer::Sgd { .. }) => 1,
        _ => 2,
    };
    let spec_bytes = m.train.as_ref().map(|t| t.precision.bytes()).unwrap_or(4).max(1) as u128;
    let mem = memory_per_rank(m);
    let held = params_per_rank(m);
    let rank = |i: usize| -> u128 {
        let p = held.get(i).copied().unwrap_or(0) as u128;
        let acts = mem.get(i).map(|r| r.activations).unwrap_or(0) as u128;
        let master = if spec_bytes < 4 { 4 } else { 0 };
        // weights (and master weights), gradients, optimizer state; the arena and the f32 copies out of it
        p * (spec_bytes + master + 4 + 4 * opt_per_elem) + acts + acts * 4 / spec_bytes + CPU_RANK_BYTES
    };
    let logical: u128 = m.params.iter().map(|p| p.ty.numel() as u128).sum::<u128>() * 4 * (1 + opt_per_elem);
    CPU_PROCESS_BYTES + logical + (0..mem.len().max(1)).map(rank).sum::<u128>()
}
