//! Lowering: a rank's program (its graph or its pipeline chunks and
//! schedule, its step collectives and the optimizer update) → one linear
//! [`Program`] over buffers.
//!
//! The step, in order:
//! 1. zero the gradients and the loss; under ZeRO 3, all-gather the weights;
//! 2. each microbatch in schedule order: its forward and backward ops (a
//!    pipeline stage receives activations and gradients from its neighbours
//!    and sends its own), the loss and every parameter gradient accumulated
//!    into the persistent ones;
//! 3. the gradient collectives in buckets on the `comm` stream (the grad
//!    region is laid out in bucket order, so a bucket is one contiguous
//!    range), ZeRO's reduce-scatter or local shard, the mean over the step's
//!    microbatches, gradients shared between pipeline stages summed in stage
//!    order;
//! 4. the squared norms, their sums over the axes that split them, the global norm;
//! 5. `skip_if_nonfinite(norm)` guarding the optimizer update (the update
//!    graph of `autodiff::update`, written in place into the weights and
//!    the moments) and ZeRO 1/2's all-gather of the updated weights.
//!
//! Precision (`train.precision`, [`storage`]): under `bf16` the weights and
//! every activation and activation gradient are stored in bf16; each op
//! computes in f32 and rounds what it stores. The gradients, which
//! accumulate over microbatches, the optimizer state and the **master
//! weights** (`master.k`, in the optim region, in the update's shape: a
//! ZeRO shard where the update is sharded) stay f32; the update writes the
//! master weights and a `copy` casts them to the bf16 weights (ZeRO 1/2
//! all-gather the bf16 shards, as Megatron's distributed optimizer does).

use super::{Bound, BufId, Buffer, Collective, Instr, Kind, Paging, Phase, Program, Region, Stream};
use crate::autodiff::update::{UpdateParam, update_graph};
use crate::config::{Optimizer, Precision, StateRole};
use crate::ir::Param;
use crate::ir::{BinaryOp, DType, Dim, Graph, Op, ReduceOp, TensorType, ValueId};
use crate::model::Model;
use crate::parallel::pipeline::Action;
use crate::parallel::{ChunkProgram, Mesh, RankProgram, StageProgram, StepCollective, check::shared_tag};
use crate::plan::{Interval, allocate, bytes_of};
use std::collections::HashMap;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("lowering rank {rank}: {message}")]
pub struct LowerError {
    pub rank: u64,
    pub message: String,
}

/// Lower rank `prog.rank`'s evaluation of model `m`: the forward pass of
/// each of its microbatches (the loss's ancestors in its graph), dropout
/// off, the losses summed into `loss`. No gradients, no update: the weights
/// `w.k` are the training program's, and nothing else is persistent.
pub fn lower_eval(m: &Model, prog: &RankProgram, fuse: bool) -> Result<Program, LowerError> {
    let fail = |message: String| LowerError { rank: prog.rank, message };
    let mesh = Mesh::of(m).map_err(|e| fail(e.to_string()))?;
    let mut b = Builder::new(prog, &mesh);
    b.act = storage(m).map_err(fail)?;
    b.training = false;
    b.evaluation(m).map_err(fail)?;
    Ok(b.finish(fuse))
}

/// Lower the generation of model `m`, laid out on one device (the driver
/// drops a training layout: the weights are the logical ones): the
/// `logits` of a run of the `tokens` input (`[batch, seq]`), in the io
/// buffer `logits`, dropout off.
///
/// - `run = None`, the **window** program: the forward pass over all `seq`
///   positions from position 0, without a cache (what generation without a
///   KV cache reruns for every token).
/// - `run = Some((n, paging))`, a **paged** program: `n` positions of each
///   of the model's `batch` sequences (`tokens` is `[batch, n]`), sequence
///   `b` from its run-time position `pos[b]` (`pos`: `i32[batch]`, io) over
///   the paged KV cache ([`Paging`]; `blocks`: `i32[batch, kv_table]`, io).
///   Every value over the sequence dim holds those `n` rows; a position table
///   (a learned or sinusoidal position parameter) gives each sequence its
///   rows `pos[b]..` (`rows_at`); rope rotates by `pos[b] + i`; each causal
///   attention writes its new keys and values into the cache's pools
///   (`k.cache.N`, `v.cache.N` in the cache region, N its node;
///   `[kv_block, .., seq = block, ..]`) and attends to the sequence's
///   positions `[0, pos[b] + n)`. A prefill runs one sequence over a chunk
///   of positions (`batch = 1`, `n` > 1); a decode step runs every
///   sequence of the batch one position on (`n = 1`). A model whose logits
///   mix positions otherwise (a reduction over the sequence, a masked or
///   relative-position attention) has no paged program: the error says
///   which op, and generation recomputes the window.
///
/// Routing is **dropless** in both ([`dropless`]): every token reaches its
/// top-k experts, as inference engines route, so that a token's logits do
/// not depend on which other tokens share its run (training's capacity
/// drops would make them depend on it).
///
/// Paged programs of one `paging` place the weights and the cache alike
/// whatever their batch and run, so one allocation runs them all.
pub fn lower_generate(m: &Model, run: Option<(u64, Paging)>, fuse: bool) -> Result<Program, LowerError> {
    let fail = |message: String| LowerError { rank: 0, message };
    if m.parallel.world() != 1 {
        return Err(fail(format!("generation runs on one device; lower `{}` without its layout", m.name)));
    }
    let logits = m
        .graph
        .output("logits")
        .ok_or_else(|| fail(format!("`{}` defines no `logits` to generate from; name the output `logits`", m.name)))?;
    let tokens = m
        .inputs
        .iter()
        .position(|x| x.name == "tokens")
        .ok_or_else(|| fail("generation needs a `tokens` input".into()))?;
    let seq = m.inputs[tokens].ty.dims.last().ok_or_else(|| fail("`tokens` has no dims".into()))?;
    let chunk = run.map(|(n, _)| n);
    let positions = m.inputs[tokens].ty.numel() / seq.size.max(1) * chunk.unwrap_or(seq.size);
    let prog = one_device(m, positions, logits);
    let mesh = Mesh::of(m).map_err(|e| fail(e.to_string()))?;
    let mut b = Builder::new(&prog, &mesh);
    b.act = storage(m).map_err(fail)?;
    b.training = false;
    b.generation(m, tokens, run).map_err(fail)?;
    Ok(b.finish(fuse))
}

/// Lower the forward pass of model `m` to its named value `output` on one
/// device (the driver drops a training layout), dropout off, routing
/// dropless: every model input `i` in the io buffer `x{i}.mb0`, the output
/// (as f32) in the io buffer `out`. What serves an encoder (its embeddings)
/// or reads any value of a model.
pub fn lower_forward(m: &Model, output: &str, fuse: bool) -> Result<Program, LowerError> {
    let fail = |message: String| LowerError { rank: 0, message };
    if m.parallel.world() != 1 {
        return Err(fail(format!("a forward program runs on one device; lower `{}` without its layout", m.name)));
    }
    let out = m.graph.output(output).ok_or_else(|| {
        let names: Vec<&str> = m.outputs.iter().map(|(n, _)| n.as_str()).collect();
        fail(format!("`{}` has no value `{output}` (its named values: {})", m.name, names.join(", ")))
    })?;
    let tokens: u64 = m.inputs.first().map(|x| x.ty.numel()).unwrap_or(1);
    let prog = one_device(m, tokens, out);
    let mesh = Mesh::of(m).map_err(|e| fail(e.to_string()))?;
    let mut b = Builder::new(&prog, &mesh);
    b.act = storage(m).map_err(fail)?;
    b.training = false;
    b.forward(m).map_err(fail)?;
    Ok(b.finish(fuse))
}

/// The program of one device that computes `value` of `m`'s graph (made
/// dropless for runs of `tokens` tokens), every weight held whole.
fn one_device(m: &Model, tokens: u64, value: ValueId) -> RankProgram {
    RankProgram {
        rank: 0,
        coords: Vec::new(),
        graph: dropless(&m.graph, tokens),
        loss: value,
        param_grads: Vec::new(),
        params: m
            .params
            .iter()
            .map(|p| crate::parallel::ParamShard { local: p.clone(), splits: Vec::new(), held: true })
            .collect(),
        prologue: Vec::new(),
        step: Vec::new(),
        stage: None,
        micro: 1,
    }
}

/// `g` with every `top_k` dropless for runs of `tokens` tokens: no capacity,
/// and `tokens` slots per expert (the `slot` dim of what it routes), so an
/// expert can take every token of the run.
pub fn dropless(g: &Graph, tokens: u64) -> Graph {
    let mut g = g.clone();
    if !g.nodes.iter().any(|n| matches!(n.op, Op::TopK { .. })) {
        return g;
    }
    for n in &mut g.nodes {
        if let Op::TopK { capacity, slots, .. } = &mut n.op {
            *capacity = None;
            *slots = tokens;
        }
        n.ty.dims.iter_mut().filter(|d| d.name == "slot").for_each(|d| d.size = tokens);
    }
    g
}

/// Lower rank `prog.rank`'s training step of model `m`; with `fuse`, runs
/// of elementwise ops become kernels (`crate::kernel::fuse`).
pub fn lower(m: &Model, prog: &RankProgram, fuse: bool) -> Result<Program, LowerError> {
    let fail = |message: String| LowerError { rank: prog.rank, message };
    let mesh = Mesh::of(m).map_err(|e| fail(e.to_string()))?;
    let train = m.train.as_ref().ok_or_else(|| fail(format!("`{}` has no `train` section to lower", m.name)))?;
    let mut b = Builder::new(prog, &mesh);
    b.act = storage(m).map_err(fail)?;
    b.step(m, &train.optimizer, train.clip).map_err(fail)?;
    Ok(b.finish(fuse))
}

/// The dtype a model's weights and activations are stored in, from its
/// `train.precision`: f32, or bf16 or f16 (computed in f32, stored rounded,
/// with f32 master weights, gradients and optimizer state; f16 with the
/// loss scaled, [`Bound::LossScale`]).
fn storage(m: &Model) -> Result<DType, String> {
    Ok(match m.train.as_ref().map(|t| t.precision) {
        None | Some(Precision::Fp32) => DType::F32,
        Some(Precision::Bf16) => DType::Bf16,
        Some(Precision::Fp16) => DType::F16,
    })
}

struct Builder<'a> {
    prog: &'a RankProgram,
    /// The dtype of weights and activations ([`storage`]).
    act: DType,
    mesh: &'a Mesh,
    buffers: Vec<Buffer>,
    instrs: Vec<Instr>,
    tops: [u64; Region::COUNT],
    events: u32,
    /// Where each phase of the step starts (instruction index, name).
    phases: Vec<(usize, String)>,
    /// Training (dropout on) or evaluation (dropout is the identity).
    training: bool,
    /// The nodes to lower (`None`: all of each range): an evaluation's forward pass.
    only: Option<Vec<bool>>,
    /// Per parameter: weights, gradient, and the buffers the update reads and writes.
    w: Vec<Option<BufId>>,
    /// ZeRO 3: the weights gathered for this step (a view of the local type).
    w_full: Vec<Option<BufId>>,
    g: Vec<Option<BufId>>,
    loss: BufId,
    /// The instruction that last wrote each buffer, how often each is read, and whether it is viewed.
    producer: HashMap<BufId, usize>,
    reads: HashMap<BufId, u32>,
    viewed: std::collections::HashSet<BufId>,
    /// Filled-slot counts by (gates, slots per expert), made once per microbatch's gates.
    counts: HashMap<(BufId, u64), BufId>,
    /// Each graph's `ragged::analyze`, once for all microbatches (by address:
    /// the graphs are the rank program's, borrowed for the whole lowering).
    roles: HashMap<*const Graph, std::rc::Rc<Vec<super::ragged::Role>>>,
    /// Lowering a generation program ([`lower_generate`]).
    generate: Option<Generate>,
    /// The span of the graph node being lowered: the origin of what it emits.
    span: Option<crate::syntax::span::Span>,
    /// The step's loss scale (`Bound::LossScale`), which seeds the backward pass.
    loss_scale: Option<BufId>,
}

/// What lowering a generation program adds to the forward pass.
struct Generate {
    /// The sequence dim (the `tokens` input's last).
    seq: String,
    /// A paged program's positions per run, run-time positions and block
    /// tables (`None`: the window program).
    step: Option<(u64, BufId, BufId)>,
    /// Each cached attention node's KV cache: (keys, values).
    caches: HashMap<usize, (BufId, BufId)>,
}

/// `ty` with `dim` cut to `n` positions (unchanged without it).
fn positions(ty: &TensorType, dim: &str, n: u64) -> TensorType {
    let mut t = ty.clone();
    t.dims.iter_mut().filter(|d| d.name == dim).for_each(|d| d.size = n);
    t
}

/// Whether node `i` is an attention that a step program runs over the KV
/// cache: causal self-attention over the sequence, without a mask or
/// relative positions.
fn cached_attention(g: &Graph, i: usize, seq: &str) -> bool {
    let n = &g.nodes[i];
    matches!(n.op, Op::Attention { causal: true, mask: false, rel: crate::ir::RelPos::None, .. })
        && n.ty.has(seq)
        && g.ty(n.inputs[1]).has(seq)
}

/// Why node `i` cannot run one run of positions at a time (`None`: it can):
/// its rows depend on other positions than its own.
fn mixes_positions(g: &Graph, i: usize, seq: &str) -> Option<String> {
    let n = &g.nodes[i];
    let reads_seq = n.inputs.iter().any(|v| g.ty(*v).has(seq));
    let why = match &n.op {
        Op::TopK { capacity: Some(_), .. } => {
            "routes tokens to experts with capacities counted over the whole sequence".to_string()
        }
        Op::Attention { .. } if n.ty.has(seq) && g.ty(n.inputs[1]).has(seq) && !cached_attention(g, i, seq) => {
            "is an attention over the sequence that is not causal, or has a mask or relative positions; \
             only causal attention without them reads a KV cache"
                .to_string()
        }
        // Dropless routing sends each token to its own slots: the run's tokens only.
        Op::Dispatch => return None,
        Op::Concat { into, .. } if into == seq => format!("concatenates along `{seq}`"),
        Op::SplitDim { dim, .. } | Op::Slice { dim, .. } | Op::Select { dim, .. } | Op::Take { dim, .. }
            if dim == seq =>
        {
            format!("splits or slices `{seq}`")
        }
        Op::MergeDims { dims, .. } if dims.iter().any(|d| d == seq) => format!("merges `{seq}` with other dims"),
        Op::Rename { from, .. } if from.iter().any(|d| d == seq) => format!("renames `{seq}`"),
        _ if reads_seq && !n.ty.has(seq) => format!("reduces over `{seq}`"),
        _ => return None,
    };
    Some(format!("`{}` (value v{i}) {why}", n.op.name()))
}

/// A microbatch's forward on a pipeline stage, kept for its backward: the
/// values its backward resumes from (empty under full recomputation) and the
/// buffers of the activations it received.
type Stashed = (Vec<Option<BufId>>, Vec<BufId>);

/// How a graph's nodes find their operands.
struct Bind<'b> {
    /// Model input `i` of this microbatch.
    inputs: &'b [BufId],
    /// Parameter metas of the graph (the model's, then boundary parameters).
    params: &'b [Param],
    /// Buffers of the graph's parameters by index (`None`: not held here).
    weights: &'b [Option<BufId>],
    /// Inputs with an index at or past `inputs.len()` (received gradients).
    extra: &'b HashMap<usize, BufId>,
    /// The model parameters' gradients the graph computes: kept in f32
    /// whatever the storage dtype, as they accumulate over the microbatches.
    grads: &'b [crate::autodiff::ParamGrad],
}

impl<'a> Builder<'a> {
    fn new(prog: &'a RankProgram, mesh: &'a Mesh) -> Builder<'a> {
        let n = prog.params.len();
        let mut b = Builder {
            prog,
            mesh,
            act: DType::F32,
            buffers: Vec::new(),
            instrs: Vec::new(),
            tops: [0; Region::COUNT],
            events: 0,
            phases: Vec::new(),
            training: true,
            only: None,
            span: None,
            loss_scale: None,
            w: vec![None; n],
            w_full: vec![None; n],
            g: vec![None; n],
            loss: BufId(0),
            producer: HashMap::new(),
            reads: HashMap::new(),
            counts: HashMap::new(),
            roles: HashMap::new(),
            viewed: Default::default(),
            generate: None,
        };
        b.loss = b.persistent(Region::Io, TensorType::scalar(DType::F32), &Bound::Loss.name());
        b
    }

    fn data(&self) -> Option<(&'a str, u64)> {
        self.mesh.data_group()
    }

    fn zero_sharded(&self, k: usize) -> bool {
        self.mesh.zero_sharded(&self.prog.params[k])
    }

    fn flat(&self, k: usize) -> TensorType {
        let (_, n) = self.data().expect("ZeRO shards over a data axis");
        let numel = self.prog.params[k].local.ty.numel();
        TensorType::new(DType::F32, vec![Dim::new("flat", numel.div_ceil(n))])
    }

    /// `ty` as weights and activations are stored: an f32 tensor (not a
    /// scalar: a loss stays f32) in the storage dtype. (A value the spec
    /// casts to a narrower dtype keeps it.)
    fn stored(&self, ty: &TensorType) -> TensorType {
        let mut t = ty.clone();
        if t.dtype == DType::F32 && t.numel() > 1 {
            t.dtype = self.act;
        }
        t
    }

    /// A temporary holding an activation or an activation's gradient.
    fn act_temp(&mut self, ty: &TensorType) -> BufId {
        let t = self.stored(ty);
        self.temp(t)
    }

    fn push_buffer(
        &mut self,
        ty: TensorType,
        region: Region,
        offset: u64,
        view_of: Option<BufId>,
        name: &str,
    ) -> BufId {
        self.buffers.push(Buffer { ty, region, offset, view_of, name: name.to_string() });
        BufId(self.buffers.len() as u32 - 1)
    }

    /// A buffer in a persistent region (bump-allocated, 64-byte aligned).
    fn persistent(&mut self, region: Region, ty: TensorType, name: &str) -> BufId {
        let i = region.index();
        let at = self.tops[i];
        self.tops[i] += bytes_of(&ty);
        self.push_buffer(ty, region, at, None, name)
    }

    /// A temporary; its offset comes from the liveness plan in `finish`.
    fn temp(&mut self, ty: TensorType) -> BufId {
        self.push_buffer(ty, Region::Arena, 0, None, "")
    }

    /// `ty` as a view of `of` holds it: a floating view stores its elements
    /// in the dtype `of` does.
    fn viewed_as(&self, of: BufId, mut ty: TensorType) -> TensorType {
        let dtype = self.buffers[of.index()].ty.dtype;
        if ty.dtype.is_float() && dtype.is_float() {
            ty.dtype = dtype;
        }
        ty
    }

    /// A view of `of`'s bytes from `offset` on, with type `ty` ([`Builder::viewed_as`]).
    fn view(&mut self, of: BufId, ty: TensorType, offset: u64, name: &str) -> BufId {
        let (region, ty) = (self.buffers[of.index()].region, self.viewed_as(of, ty));
        self.viewed.insert(of);
        self.push_buffer(ty, region, offset, Some(of), name)
    }

    /// Start phase `name` at the next instruction (one that would hold none is renamed).
    fn phase(&mut self, name: String) {
        match self.phases.last_mut() {
            Some((at, last)) if *at == self.instrs.len() => *last = name,
            _ => self.phases.push((self.instrs.len(), name)),
        }
    }

    fn emit(&mut self, kind: Kind, ins: Vec<BufId>, outs: Vec<BufId>) {
        self.push(Instr::new(kind, ins, outs, Stream::Compute));
    }

    fn push(&mut self, mut ins: Instr) {
        ins.origin.extend(self.span);
        for b in &ins.ins {
            *self.reads.entry(*b).or_default() += 1;
        }
        for b in &ins.outs {
            self.producer.insert(*b, self.instrs.len());
        }
        self.instrs.push(ins);
    }

    /// Put `calls` (communication-stream collectives over gradients, a
    /// stacked gradient cut by layer) on the communication stream as the
    /// backward pass finishes their gradients, each behind an event of the
    /// compute stream, so they reduce while the backward pass goes on
    /// (DDP's and Megatron's overlap). The all-reduces of an axis are
    /// rebucketed in the order their gradients become final, as DDP does;
    /// a call that shares bytes with an earlier one (a partial gradient
    /// summed over `tensor`, then over `data`) goes after it. Every rank of
    /// a group has the same program around them, so the same order. The
    /// compute stream joins them later ([`Builder::sync`]).
    fn overlap(&mut self, calls: Vec<Instr>) {
        // Each buffer's bytes: (region, start, end), views resolved.
        let bytes = |bufs: &[Buffer], b: BufId| {
            let (mut at, mut r) = (0, b.index());
            loop {
                at += bufs[r].offset;
                match bufs[r].view_of {
                    Some(v) => r = v.index(),
                    None => break,
                }
            }
            let x = &bufs[b.index()];
            (x.region, at, at + x.ty.bytes())
        };
        let meet = |a: (Region, u64, u64), b: (Region, u64, u64)| a.0 == b.0 && a.1 < b.2 && b.1 < a.2;
        // The instructions' outputs, as bytes.
        let written: Vec<Vec<(Region, u64, u64)>> =
            self.instrs.iter().map(|i| i.outs.iter().map(|b| bytes(&self.buffers, *b)).collect()).collect();
        let last_write = |x: (Region, u64, u64)| written.iter().rposition(|w| w.iter().any(|&y| meet(x, y)));
        // Issued so far: (after instruction, the call, the bytes it touches).
        let mut parts: Vec<Part> = Vec::new();
        // The instruction a buffer is final after: its last write, and the
        // issue of every earlier call that touches it (the stream keeps their order).
        let final_after = |parts: &[Part], x: Bytes| {
            let issued = parts.iter().filter(|(_, _, t)| t.iter().any(|&y| meet(x, y))).map(|(a, _, _)| *a).max();
            last_write(x).unwrap_or(0).max(issued.unwrap_or(0))
        };
        let mut calls = calls.into_iter().peekable();
        while let Some(call) = calls.next() {
            let Kind::Collective { op: Collective::AllReduce { .. }, axis } = &call.kind else {
                // A reduce-scatter's shards follow its whole inputs: it goes out whole.
                let t: Vec<_> = call.ins.iter().chain(&call.outs).map(|b| bytes(&self.buffers, *b)).collect();
                let at = t.iter().map(|&x| final_after(&parts, x)).max().unwrap_or(0);
                parts.push((at, call, t));
                continue;
            };
            // Every all-reduce of this axis that follows, rebucketed as DDP
            // does: the gradients in the order they become final, cut into
            // buckets of `parallel.bucket` elements, each issued when its
            // last gradient is final (element by element, the same sums).
            let (kind, axis) = (call.kind.clone(), axis.clone());
            let mut bufs: Vec<BufId> = call.ins.clone();
            while let Some(next) = calls.next_if(
                |c| matches!(&c.kind, Kind::Collective { op: Collective::AllReduce { .. }, axis: a } if *a == axis),
            ) {
                bufs.extend(next.ins.iter().filter(|b| !bufs.contains(b)).copied().collect::<Vec<_>>());
            }
            let mut ready: Vec<(usize, usize, BufId)> =
                bufs.iter().enumerate().map(|(n, b)| (final_after(&parts, bytes(&self.buffers, *b)), n, *b)).collect();
            ready.sort_unstable();
            let mut bucket: Vec<BufId> = Vec::new();
            let mut size = 0;
            let mut new = Vec::new();
            for (n, &(at, _, b)) in ready.iter().enumerate() {
                bucket.push(b);
                size += self.buffers[b.index()].ty.numel();
                let last = n + 1 == ready.len();
                if last || size + self.buffers[ready[n + 1].2.index()].ty.numel() > self.mesh.bucket {
                    let ins = std::mem::take(&mut bucket);
                    let t = ins.iter().map(|b| bytes(&self.buffers, *b)).collect();
                    new.push((at, Instr::new(kind.clone(), ins.clone(), ins, Stream::Comm), t));
                    size = 0;
                }
            }
            parts.extend(new);
        }
        // In the order they become ready (a stable sort: ties keep theirs).
        parts.sort_by_key(|(at, _, _)| *at);
        // (insert after instruction, what) in program order.
        let mut plan: Vec<(usize, Vec<Instr>)> = Vec::new();
        for (at, call, _) in parts {
            let event = self.events;
            self.events += 1;
            for b in &call.ins {
                *self.reads.entry(*b).or_default() += 1;
            }
            let group = [
                Instr::new(Kind::Record { event }, vec![], vec![], Stream::Compute),
                Instr::new(Kind::Wait { event }, vec![], vec![], Stream::Comm),
                call,
            ];
            match plan.last_mut() {
                Some((a, v)) if *a == at => v.extend(group),
                _ => plan.push((at, group.into())),
            }
        }
        let old = std::mem::take(&mut self.instrs);
        let mut plan = plan.into_iter().peekable();
        // Where each old instruction lands.
        let mut moved = Vec::with_capacity(old.len());
        for (i, ins) in old.into_iter().enumerate() {
            moved.push(self.instrs.len());
            self.instrs.push(ins);
            if let Some((_, group)) = plan.next_if(|(a, _)| *a == i) {
                self.instrs.extend(group);
            }
        }
        for (at, _) in &mut self.phases {
            *at = moved.get(*at).copied().unwrap_or(self.instrs.len());
        }
        self.producer.clear();
        for (i, ins) in self.instrs.iter().enumerate() {
            for b in &ins.outs {
                self.producer.insert(*b, i);
            }
        }
    }

    /// Order `to` after everything issued so far on `from`.
    fn sync(&mut self, from: Stream, to: Stream) {
        let event = self.events;
        self.events += 1;
        self.push(Instr::new(Kind::Record { event }, vec![], vec![], from));
        self.push(Instr::new(Kind::Wait { event }, vec![], vec![], to));
    }

    /// The slice of a (stacked) parameter-shaped buffer that holds `layer`.
    fn layer_view(&mut self, of: BufId, meta: &Param, layer: Option<u64>, ty: &TensorType) -> Result<BufId, String> {
        let Some(l) = layer else { return Ok(of) };
        let pos = meta
            .layers
            .iter()
            .position(|&x| x == l)
            .ok_or_else(|| format!("layer {l} of `{}` is not held here (held: {:?})", meta.path, meta.layers))?;
        let name = format!("{}[{l}]", self.buffers[of.index()].name);
        // The slice's bytes in the dtype `of` stores.
        let ty = self.viewed_as(of, ty.clone());
        let at = pos as u64 * ty.bytes();
        Ok(self.view(of, ty, at, &name))
    }

    /// Lower nodes `range` of `g`; `vals` holds the buffers of the values lowered so far.
    fn nodes(
        &mut self,
        g: &'a Graph,
        range: std::ops::Range<usize>,
        vals: &mut Vec<Option<BufId>>,
        bind: &Bind,
    ) -> Result<(), String> {
        vals.resize(g.len(), None);
        let wide = grad_values(g, bind.grads, self.prog.params.len());
        // A step program's values hold its run of positions only; a position
        // table (an input-less value over the sequence: learned positions, a
        // sinusoid) is whole, and its rows at `pos` are taken after it.
        let step = self.generate.as_ref().and_then(|x| x.step.map(|(n, pos, blocks)| (x.seq.clone(), n, pos, blocks)));
        let table = |i: usize| {
            let n = &g.nodes[i];
            step.as_ref()
                .is_some_and(|(seq, ..)| n.inputs.is_empty() && n.ty.has(seq) && !matches!(n.op, Op::Input { .. }))
        };
        let tys: Option<Vec<TensorType>> = step.as_ref().map(|(seq, n, ..)| {
            (0..g.len())
                .map(|i| if table(i) { g.nodes[i].ty.clone() } else { positions(&g.nodes[i].ty, seq, *n) })
                .collect()
        });
        let ty_of = |i: usize| tys.as_ref().map_or(&g.nodes[i].ty, |t| &t[i]);
        let temp = |b: &mut Self, i: usize| {
            if wide[i] { b.temp(ty_of(i).clone()) } else { b.act_temp(ty_of(i)) }
        };
        let roles = self.roles.entry(g as *const Graph).or_insert_with(|| super::ragged::analyze(g).into()).clone();
        // Attention's gradients with the same operands come from one pass.
        let mut siblings: HashMap<(Vec<ValueId>, String), Vec<usize>> = HashMap::new();
        for i in range.clone() {
            if let Op::AttentionGrad { .. } = &g.nodes[i].op {
                siblings.entry(attention_key(g, i)).or_default().push(i);
            }
        }
        for i in range {
            if vals[i].is_some() || self.only.as_ref().is_some_and(|o| !o[i]) {
                continue;
            }
            self.span = Some(g.span(ValueId(i as u32))).filter(|s| *s != Default::default());
            let node = &g.nodes[i];
            let operand = |v: &ValueId| vals[v.index()].ok_or_else(|| format!("{v} is read before it is computed"));
            let ins: Vec<BufId> = node.inputs.iter().map(operand).collect::<Result<_, _>>()?;
            if let Some((seq, ..)) = &step
                && let Some(why) = mixes_positions(g, i, seq)
            {
                return Err(why);
            }
            let out = match &node.op {
                Op::Input { index } => match bind.inputs.get(*index).or_else(|| bind.extra.get(index)) {
                    Some(&b) => b,
                    None => return Err(format!("input {index} has no buffer")),
                },
                // The backward pass's seed: the step's loss scale, which the host writes.
                Op::LossScale => self.loss_scale.ok_or("the loss's gradient outside a training step")?,
                Op::Param { index, layer } => {
                    let w =
                        bind.weights.get(*index).copied().flatten().ok_or_else(|| {
                            format!("parameter {index} is read but not held on rank {}", self.prog.rank)
                        })?;
                    self.layer_view(w, &bind.params[*index], *layer, &node.ty)?
                }
                // Row-major data is unchanged by renaming, splitting or merging dims.
                Op::Rename { .. } | Op::SplitDim { .. } | Op::MergeDims { .. } => {
                    self.view(ins[0], ty_of(i).clone(), 0, "")
                }
                // Out of training, dropout is the identity: its value is its operand's buffer.
                Op::Dropout { .. } if !self.training => ins[0],
                Op::AttentionGrad { forward, .. } => {
                    let group = siblings.get(&attention_key(g, i)).cloned().unwrap_or_else(|| vec![i]);
                    let mut which = Vec::new();
                    let mut outs = Vec::new();
                    for &j in &group {
                        if let Op::AttentionGrad { which: w, .. } = g.nodes[j].op {
                            which.push(w);
                            let o = temp(self, j);
                            vals[j] = Some(o);
                            outs.push(o);
                        }
                    }
                    let rng = dropout_of(&node.op).then_some(forward.0 as u64);
                    self.emit(Kind::AttentionGrads { op: node.op.clone(), which, rng }, ins, outs);
                    continue;
                }
                op => {
                    // Out of training, attention keeps every probability.
                    let mut op = op.clone();
                    if let Op::Attention { dropout, .. } = &mut op
                        && !self.training
                    {
                        *dropout = 0.0;
                    }
                    let rng = match &op {
                        Op::Dropout { .. } => Some(i as u64),
                        Op::Attention { dropout, .. } if *dropout > 0.0 => Some(i as u64),
                        Op::DropoutGrad { forward, .. } => Some(forward.0 as u64),
                        _ => None,
                    };
                    let mut ins = ins;
                    let rows = match roles[i].counts() {
                        Some(c) => {
                            let gates = vals[c.gates.index()].ok_or("the gates are read before they are computed")?;
                            ins.push(self.slot_counts(gates, c.slots));
                            true
                        }
                        None => false,
                    };
                    let o = temp(self, i);
                    let cache = self.generate.as_ref().and_then(|x| x.caches.get(&i).copied());
                    match (&step, cache) {
                        // A decode step: the run's keys and values into the
                        // cache, and attention over the cache up to them.
                        (Some((seq, _, pos, blocks)), Some((kc, vc))) => {
                            let dim = seq.clone();
                            self.emit(Kind::CacheWrite { dim: dim.clone() }, vec![ins[1], *pos, *blocks], vec![kc]);
                            self.emit(Kind::CacheWrite { dim: dim.clone() }, vec![ins[2], *pos, *blocks], vec![vc]);
                            self.emit(Kind::At { op, dim }, vec![ins[0], kc, vc, *pos, *blocks], vec![o]);
                        }
                        (Some((seq, _, pos, _)), None) if matches!(op, Op::Rope { .. }) => {
                            self.emit(Kind::At { op, dim: seq.clone() }, vec![ins[0], *pos], vec![o]);
                        }
                        _ => self.emit(Kind::Op { op, rng, accumulate: false, rows }, ins, vec![o]),
                    }
                    o
                }
            };
            // A position table's rows at each sequence's positions, batch first.
            let out = match &step {
                Some((seq, n, pos, _)) if table(i) => {
                    let mut ty = positions(&node.ty, seq, *n);
                    ty.dims.insert(0, self.buffers[pos.index()].ty.dims[0].clone());
                    let o = self.act_temp(&ty);
                    self.emit(Kind::RowsAt { dim: seq.clone() }, vec![out, *pos], vec![o]);
                    o
                }
                _ => out,
            };
            vals[i] = Some(out);
        }
        self.span = None;
        Ok(())
    }

    /// The filled-slot counts of `gates` (`lower::ragged`), emitted at their first use.
    fn slot_counts(&mut self, gates: BufId, slots: u64) -> BufId {
        if let Some(&c) = self.counts.get(&(gates, slots)) {
            return c;
        }
        let expert = self.buffers[gates.index()].ty.dims.last().cloned().expect("gates end in the expert dim");
        let c = self.temp(TensorType::new(DType::I32, vec![expert]));
        self.emit(Kind::SlotCounts { slots }, vec![gates], vec![c]);
        self.counts.insert((gates, slots), c);
        c
    }

    /// Accumulate a graph's parameter gradients into the persistent ones.
    fn accumulate_grads(
        &mut self,
        grads: &[crate::autodiff::ParamGrad],
        metas: &[Param],
        vals: &[Option<BufId>],
    ) -> Result<(), String> {
        for pg in grads {
            let Some(Some(gk)) = self.g.get(pg.param).copied() else { continue };
            let v = vals[pg.grad.index()].ok_or("a gradient was not computed")?;
            let ty = self.buffers[v.index()].ty.clone();
            let target = self.layer_view(gk, &metas[pg.param], pg.layer, &ty)?;
            // The op that made the gradient adds it into the persistent one
            // directly when nothing else reads it: no temporary.
            if let Some(i) = self.sole_producer(v) {
                if let Kind::Op { accumulate, .. } = &mut self.instrs[i].kind {
                    *accumulate = true;
                }
                self.instrs[i].outs[0] = target;
                self.producer.insert(target, i);
                continue;
            }
            self.emit(Kind::Accumulate, vec![v], vec![target]);
        }
        Ok(())
    }

    /// The op instruction that wrote temporary `v`, when no instruction reads or views `v`.
    fn sole_producer(&self, v: BufId) -> Option<usize> {
        let b = &self.buffers[v.index()];
        if b.region != Region::Arena || b.view_of.is_some() || self.reads.contains_key(&v) || self.viewed.contains(&v) {
            return None;
        }
        let i = *self.producer.get(&v)?;
        (matches!(self.instrs[i].kind, Kind::Op { .. }) && self.instrs[i].outs.len() == 1).then_some(i)
    }

    /// The weights of every parameter this rank holds, `w.k`, in the storage dtype.
    fn held_weights(&mut self) {
        for k in 0..self.prog.params.len() {
            if self.prog.params[k].held {
                let ty = self.stored(&self.prog.params[k].local.ty);
                self.w[k] = Some(self.persistent(Region::Param, ty, &Bound::Weight(k).name()));
            }
        }
    }

    /// An evaluation: every microbatch's forward pass, the losses summed.
    fn evaluation(&mut self, m: &Model) -> Result<(), String> {
        let prog = self.prog;
        if prog.stage.is_some() {
            return Err("evaluation programs of pipeline stages are not lowered yet; evaluate on one device".into());
        }
        if self.mesh.zero >= 3 {
            return Err("evaluation programs under ZeRO 3 are not lowered yet; evaluate on one device".into());
        }
        self.held_weights();
        // The forward pass: the loss and what it is computed from.
        let g = &prog.graph;
        self.only = Some(ancestors(g, prog.loss));
        self.phase("evaluation start".into());
        self.emit(Kind::Zero, vec![], vec![self.loss]);
        let metas = prog.local_params();
        let weights = self.w.clone();
        for j in 0..prog.micro {
            let x: Vec<BufId> = (0..m.inputs.len())
                .map(|i| {
                    let ty = input_type(prog, i).unwrap_or_else(|| m.inputs[i].ty.clone());
                    self.persistent(Region::Io, ty, &Bound::Input(i, j).name())
                })
                .collect();
            self.phase(format!("forward mb{}", self.data_coord() * prog.micro + j));
            let mut vals = Vec::new();
            let extra = HashMap::new();
            let bind = Bind { inputs: &x, params: &metas, weights: &weights, extra: &extra, grads: &[] };
            self.nodes(g, 0..g.len(), &mut vals, &bind)?;
            let l = vals[prog.loss.index()].ok_or("the loss was not computed")?;
            self.emit(Kind::Accumulate, vec![l], vec![self.loss]);
        }
        Ok(())
    }

    /// A forward program ([`lower_forward`]) of the value `prog.loss`.
    fn forward(&mut self, m: &Model) -> Result<(), String> {
        let prog = self.prog;
        let g = &prog.graph;
        let value = prog.loss;
        self.held_weights();
        self.only = Some(ancestors(g, value));
        let x: Vec<BufId> = (0..m.inputs.len())
            .map(|i| self.persistent(Region::Io, m.inputs[i].ty.clone(), &Bound::Input(i, 0).name()))
            .collect();
        let mut out_ty = g.ty(value).clone();
        out_ty.dtype = DType::F32;
        let out = self.persistent(Region::Io, out_ty, &Bound::Output.name());
        self.phase("forward".into());
        let metas = prog.local_params();
        let weights = self.w.clone();
        let extra = HashMap::new();
        let bind = Bind { inputs: &x, params: &metas, weights: &weights, extra: &extra, grads: &[] };
        let mut vals = Vec::new();
        self.nodes(g, 0..g.len(), &mut vals, &bind)?;
        let v = vals[value.index()].ok_or("the value was not computed")?;
        match self.sole_producer(v) {
            Some(i) if self.buffers[v.index()].ty.dtype == DType::F32 => {
                self.instrs[i].outs[0] = out;
                self.producer.insert(out, i);
            }
            _ => self.emit(Kind::Copy, vec![v], vec![out]),
        }
        Ok(())
    }

    /// A generation program ([`lower_generate`]) of the graph's `logits`
    /// (`prog.loss`), from model input `tokens`.
    fn generation(&mut self, m: &Model, tokens: usize, run: Option<(u64, Paging)>) -> Result<(), String> {
        let prog = self.prog;
        let g = &prog.graph;
        let logits = prog.loss;
        let x_dims = &m.inputs[tokens].ty.dims;
        let (Some(batch), Some(seq)) = (x_dims.first().cloned(), x_dims.last().cloned()) else {
            return Err("`tokens` has no dims".into());
        };
        if x_dims.len() != 2 {
            return Err(format!("`tokens` is {}; generation reads tokens as [batch, seq]", m.inputs[tokens].ty));
        }
        let chunk = run.map(|(n, _)| n);
        if let Some(n) = chunk
            && (n == 0 || n > seq.size)
        {
            return Err(format!("a step of {n} positions does not fit the window of {} (`{}`)", seq.size, seq.name));
        }
        if !g.ty(logits).has(&seq.name) {
            return Err(format!("`logits` is {}, without the sequence dim `{}`", g.ty(logits), seq.name));
        }
        self.held_weights();
        // The logits and what they are computed from.
        let need = ancestors(g, logits);
        for (i, n) in g.nodes.iter().enumerate() {
            if let Op::Input { index } = n.op
                && need[i]
                && index != tokens
            {
                return Err(format!(
                    "the logits read the input `{}`; generation feeds only `tokens`",
                    m.inputs[index].name
                ));
            }
        }
        // The cache's pools, in node order: every paged program places them alike.
        let mut caches = HashMap::new();
        if let Some((_, paging)) = run {
            for i in (0..g.len()).filter(|&i| need[i] && cached_attention(g, i, &seq.name)) {
                let mut pools = [0, 1].map(|_| None);
                for (j, which) in [(1, "k"), (2, "v")] {
                    let ty = g.ty(g.nodes[i].inputs[j]);
                    if ty.dims.first().is_none_or(|d| d.name != batch.name) {
                        return Err(format!(
                            "the {which} of attention node {i} are {ty}: a cached attention's keys and values \
                             have the batch dim `{}` outermost",
                            batch.name
                        ));
                    }
                    let mut pool = positions(ty, &seq.name, paging.block);
                    pool.dims[0] = Dim::new("kv_block", paging.blocks);
                    pools[j - 1] =
                        Some(self.persistent(Region::Cache, self.stored(&pool), &format!("{which}.cache.{i}")));
                }
                let [Some(kc), Some(vc)] = pools else { unreachable!("both pools are made") };
                caches.insert(i, (kc, vc));
            }
        }
        let n = chunk.unwrap_or(seq.size);
        let x_ty = positions(&m.inputs[tokens].ty, &seq.name, n);
        let x = self.persistent(Region::Io, x_ty, &Bound::Tokens.name());
        let step = run.map(|(n, paging)| {
            let pos = TensorType::new(DType::I32, vec![batch.clone()]);
            let table = TensorType::new(DType::I32, vec![batch.clone(), Dim::new("kv_table", paging.table)]);
            (
                n,
                self.persistent(Region::Io, pos, &Bound::Pos.name()),
                self.persistent(Region::Io, table, &Bound::Blocks.name()),
            )
        });
        let mut out_ty = positions(g.ty(logits), &seq.name, n);
        out_ty.dtype = DType::F32;
        let out = self.persistent(Region::Io, out_ty, &Bound::Logits.name());
        self.generate = Some(Generate { seq: seq.name.clone(), step, caches });
        self.only = Some(need);
        self.phase(match chunk {
            None => "window".into(),
            Some(1) => "decode step".into(),
            Some(_) => "prefill".into(),
        });
        let metas = prog.local_params();
        let weights = self.w.clone();
        // Only `tokens` is read (checked above): every input index binds to it.
        let inputs = vec![x; m.inputs.len()];
        let extra = HashMap::new();
        let bind = Bind { inputs: &inputs, params: &metas, weights: &weights, extra: &extra, grads: &[] };
        let mut vals = Vec::new();
        self.nodes(g, 0..g.len(), &mut vals, &bind)?;
        let l = vals[logits.index()].ok_or("the logits were not computed")?;
        // The op that makes the logits writes them out directly where nothing else reads them.
        match self.sole_producer(l) {
            Some(i) => {
                self.instrs[i].outs[0] = out;
                self.producer.insert(out, i);
            }
            None => self.emit(Kind::Copy, vec![l], vec![out]),
        }
        Ok(())
    }

    fn step(&mut self, m: &Model, opt: &Optimizer, clip: Option<f64>) -> Result<(), String> {
        let prog = self.prog;
        let n = prog.params.len();
        let zero3 = self.mesh.zero >= 3;
        // Weights, then gradients in bucket order (a bucket is contiguous), then optimizer state.
        for k in 0..n {
            if prog.params[k].held {
                let ty = if zero3 && self.zero_sharded(k) { self.flat(k) } else { prog.params[k].local.ty.clone() };
                let ty = self.stored(&ty);
                self.w[k] = Some(self.persistent(Region::Param, ty, &Bound::Weight(k).name()));
            }
        }
        let mut order: Vec<usize> = Vec::new();
        for c in &prog.step {
            if let StepCollective::GradAllReduce { params, .. } | StepCollective::GradReduceScatter { params, .. } = c {
                // A gradient summed over a model axis and then the data axis keeps its first place.
                let fresh: Vec<usize> = params.iter().copied().filter(|k| !order.contains(k)).collect();
                order.extend(fresh);
            }
        }
        let rest: Vec<usize> = (0..n).filter(|k| !order.contains(k)).collect();
        order.extend(rest);
        for &k in &order {
            if prog.params[k].held && !prog.params[k].local.frozen {
                self.g[k] =
                    Some(self.persistent(Region::Grad, prog.params[k].local.ty.clone(), &Bound::Grad(k).name()));
            }
        }
        let shapes: Vec<UpdateParam> = (0..n)
            .map(|k| {
                let shard = &prog.params[k];
                let mut u = UpdateParam::of(&shard.local);
                u.logical = m.params.get(k).map_or_else(|| u.dims.clone(), |p| p.ty.dims.clone());
                u.splits = shard.splits.iter().map(|(i, s)| (u.logical[*i].name.clone(), s.axis.clone())).collect();
                if !shard.held {
                    u.dims = vec![Dim::new("flat", 0)];
                } else if self.zero_sharded(k) {
                    u.dims = self.flat(k).dims;
                }
                u
            })
            .collect();
        // Per trainable parameter held here, its optimizer state's buffers.
        let mut state: Vec<Option<Vec<(StateRole, BufId)>>> = vec![None; n];
        // Weights stored in a narrower dtype are updated in f32 master
        // copies (the optimizer's shape: under ZeRO, the rank's flat shard).
        let mut master: Vec<Option<BufId>> = vec![None; n];
        // A frozen parameter has no optimizer state and no update.
        for k in 0..n {
            if prog.params[k].held && !prog.params[k].local.frozen {
                let ty = TensorType::new(DType::F32, shapes[k].dims.clone());
                let narrow = self.w[k].is_some_and(|w| self.buffers[w.index()].ty.dtype != DType::F32);
                if narrow {
                    master[k] = Some(self.persistent(Region::Optim, ty.clone(), &Bound::Master(k).name()));
                }
                let bufs = shapes[k]
                    .state(opt)
                    .into_iter()
                    .map(|(role, dims)| {
                        let ty = TensorType::new(DType::F32, dims);
                        (role, self.persistent(Region::Optim, ty, &Bound::State(k, role).name()))
                    })
                    .collect();
                state[k] = Some(bufs);
            }
        }
        let hyper =
            self.persistent(Region::Io, TensorType::new(DType::F32, vec![Dim::new("hyper", 3)]), &Bound::Hyper.name());
        let norm = self.persistent(Region::Io, TensorType::scalar(DType::F32), &Bound::Norm.name());
        let loss_scale = self.persistent(Region::Io, TensorType::scalar(DType::F32), &Bound::LossScale.name());
        self.loss_scale = Some(loss_scale);

        // 1. Start of the step.
        self.phase("step start".into());
        let grads: Vec<BufId> = self.g.iter().flatten().copied().collect();
        self.emit(Kind::Zero, vec![], grads.into_iter().chain([self.loss]).collect());
        for c in &prog.prologue {
            if let StepCollective::ParamAllGather { axis, params, .. } = c {
                let full = self.gather(axis, params, |b, k| b.w[k].expect("held"))?;
                for (&k, f) in params.iter().zip(full) {
                    let ty = prog.params[k].local.ty.clone();
                    self.w_full[k] = Some(self.view(f, ty, 0, &format!("w.{k}.full")));
                }
            }
        }
        let weights: Vec<Option<BufId>> = (0..n).map(|k| self.w_full[k].or(self.w[k])).collect();

        // 2. The microbatches.
        let inputs: Vec<Vec<BufId>> = (0..prog.micro)
            .map(|j| {
                (0..m.inputs.len())
                    .map(|i| {
                        // A stage that does not read an input still has its buffer: one upload per microbatch serves every rank.
                        let ty = input_type(prog, i).unwrap_or_else(|| m.inputs[i].ty.clone());
                        self.persistent(Region::Io, ty, &Bound::Input(i, j).name())
                    })
                    .collect()
            })
            .collect();
        let metas = prog.local_params();
        match &prog.stage {
            None => {
                for (j, x) in inputs.iter().enumerate() {
                    self.phase(format!("forward+backward mb{}", self.data_coord() * prog.micro + j as u64));
                    let mut vals = Vec::new();
                    let extra = HashMap::new();
                    let bind =
                        Bind { inputs: x, params: &metas, weights: &weights, extra: &extra, grads: &prog.param_grads };
                    self.nodes(&prog.graph, 0..prog.graph.len(), &mut vals, &bind)?;
                    let l = vals[prog.loss.index()].ok_or("the loss was not computed")?;
                    self.emit(Kind::Accumulate, vec![l], vec![self.loss]);
                    self.accumulate_grads(&prog.param_grads, &metas, &vals)?;
                }
            }
            Some(sp) => self.schedule(sp, &inputs, &weights)?,
        }

        // 3. Gradient reduction over the data axis, on the comm stream: each
        // bucket is issued as soon as the backward pass has written its
        // gradients for the last time, and the compute stream joins them here.
        self.phase("gradient reduction".into());
        let mut update_grad: Vec<Option<BufId>> = self.g.clone();
        let dp = self.data().map(|(_, n)| n).unwrap_or(1);
        let mut calls = Vec::new();
        // A stacked gradient is all-reduced layer by layer (each as the
        // backward pass finishes it); one view per (parameter, layer) serves
        // every call that reads it. One that a reduce-scatter also reads
        // stays whole: the stream forwards whole buffers between its calls.
        let mut slices: HashMap<(usize, u64), BufId> = HashMap::new();
        let scattered: Vec<usize> = prog
            .step
            .iter()
            .flat_map(|c| match c {
                StepCollective::GradReduceScatter { params, .. } => params.clone(),
                _ => Vec::new(),
            })
            .collect();
        for c in &prog.step {
            match c {
                StepCollective::GradAllReduce { axis, params, .. } => {
                    let mut bufs: Vec<BufId> = Vec::new();
                    for &k in params {
                        let Some(gk) = self.g[k] else { continue };
                        let meta = &metas[k];
                        let ty = &self.buffers[gk.index()].ty;
                        if meta.stack.is_none()
                            || meta.layers.len() < 2
                            || scattered.contains(&k)
                            || ty.dims.first().is_none_or(|d| d.name != "layer")
                        {
                            bufs.push(gk);
                            continue;
                        }
                        let slice = TensorType { dims: ty.dims[1..].to_vec(), ..ty.clone() };
                        for &l in &meta.layers {
                            let v = match slices.get(&(k, l)) {
                                Some(v) => *v,
                                None => {
                                    let v = self.layer_view(gk, meta, Some(l), &slice)?;
                                    slices.insert((k, l), v);
                                    v
                                }
                            };
                            bufs.push(v);
                        }
                    }
                    let kind = Kind::Collective { axis: axis.clone(), op: Collective::AllReduce { op: ReduceOp::Sum } };
                    calls.push(Instr::new(kind, bufs.clone(), bufs, Stream::Comm));
                }
                StepCollective::GradReduceScatter { axis, params, .. } => {
                    let ins: Vec<BufId> = params.iter().filter_map(|&k| self.g[k]).collect();
                    let outs: Vec<BufId> = params
                        .iter()
                        .map(|&k| {
                            let s = self.persistent(Region::Grad, self.flat(k), &format!("g.{k}.shard"));
                            update_grad[k] = Some(s);
                            s
                        })
                        .collect();
                    let kind = Kind::Collective { axis: axis.clone(), op: Collective::ReduceScatter };
                    calls.push(Instr::new(kind, ins, outs, Stream::Comm));
                }
                _ => {}
            }
        }
        if !calls.is_empty() {
            self.overlap(calls);
            self.sync(Stream::Comm, Stream::Compute);
        }
        // ZeRO 1: the rank's shard of the reduced gradient; then the mean over the step's microbatches.
        let scale = 1.0 / (dp * prog.micro) as f64;
        for (k, slot) in update_grad.iter_mut().enumerate() {
            let Some(gk) = *slot else { continue };
            let mut g = gk;
            if self.zero_sharded(k) && Some(gk) == self.g[k] {
                g = self.persistent(Region::Grad, self.flat(k), &format!("g.{k}.shard"));
                let part = self.data_coord();
                self.emit(Kind::FlatShard { parts: dp, part }, vec![gk], vec![g]);
                *slot = Some(g);
            }
            if scale != 1.0 {
                self.emit(Kind::Scale { factor: scale }, vec![g], vec![g]);
            }
        }
        // A parameter read on several pipeline stages sums its gradients over them, in stage order.
        let mut counted = vec![true; n];
        for c in &prog.step {
            if let StepCollective::SharedGradSum { param, stages } = c {
                let sp = prog.stage.as_ref().ok_or("a shared gradient outside a pipeline")?;
                let g = update_grad[*param].ok_or("a shared gradient that is not held")?;
                let ty = self.buffers[g.index()].ty.clone();
                let tag = shared_tag(*param);
                for &t in stages.iter().filter(|&&t| t != sp.stage) {
                    self.emit(Kind::Send { peer: sp.stage_ranks[t as usize], tag }, vec![g], vec![]);
                }
                let mut parts = Vec::new();
                for &t in stages {
                    if t == sp.stage {
                        parts.push(g);
                    } else {
                        let r = self.temp(ty.clone());
                        self.emit(Kind::Recv { peer: sp.stage_ranks[t as usize], tag }, vec![], vec![r]);
                        parts.push(r);
                    }
                }
                let sum = self.temp(ty);
                self.emit(Kind::Copy, vec![parts[0]], vec![sum]);
                for &p in &parts[1..] {
                    self.emit(Kind::Accumulate, vec![p], vec![sum]);
                }
                self.emit(Kind::Copy, vec![sum], vec![g]);
                // Counted once in the norm: on the first stage that reads it.
                counted[*param] = stages.first() == Some(&sp.stage);
            }
        }

        // 4. The global gradient norm, of the gradients of the loss itself:
        // under fp16 the backward pass ran on the loss times the loss scale.
        self.phase("global norm".into());
        if self.act == DType::F16 {
            let div = Kind::Op { op: Op::Binary { op: BinaryOp::Div }, rng: None, accumulate: false, rows: false };
            for g in update_grad.iter().flatten() {
                self.emit(div.clone(), vec![*g, loss_scale], vec![*g]);
            }
        }
        let mut sq: Vec<Option<BufId>> = vec![None; n];
        let (mut sq_ins, mut sq_outs) = (Vec::new(), Vec::new());
        // One partial sum per parameter, zero where this rank holds none of
        // it (a norm sum's buffers are the same list on every rank of its group).
        for k in 0..n {
            let s = self.persistent(Region::Io, TensorType::scalar(DType::F32), &format!("sq.{k}"));
            sq[k] = Some(s);
            match update_grad[k] {
                Some(g) if counted[k] => {
                    sq_ins.push(g);
                    sq_outs.push(s);
                }
                _ => self.emit(Kind::Zero, vec![], vec![s]),
            }
        }
        self.emit(Kind::SumSquares, sq_ins, sq_outs);
        for c in &prog.step {
            if let StepCollective::NormAllReduce { axes, params } = c {
                let bufs: Vec<BufId> = params.iter().filter_map(|&k| sq[k]).collect();
                for axis in axes {
                    let kind = Kind::Collective { axis: axis.clone(), op: Collective::AllReduce { op: ReduceOp::Sum } };
                    self.emit(kind, bufs.clone(), bufs.clone());
                }
            }
        }
        self.emit(Kind::AddScalars, sq.iter().flatten().copied().collect(), vec![norm]);

        // 5. The update, skipped when the norm is not finite.
        self.phase("optimizer update".into());
        let guard = self.instrs.len();
        self.emit(Kind::SkipIfNonFinite { count: 0 }, vec![norm], vec![]);
        // The update of the parameters this rank holds (a pipeline stage holds its own).
        let held: Vec<usize> = (0..n).filter(|&k| self.w[k].is_some() && state[k].is_some()).collect();
        let held_shapes: Vec<UpdateParam> = held.iter().map(|&k| shapes[k].clone()).collect();
        let update = update_graph(&held_shapes, opt, clip, true);
        let ug = &update.graph;
        let mut targets: HashMap<usize, BufId> = HashMap::new();
        let mut extra: HashMap<usize, BufId> = HashMap::new();
        let mut gathers: Vec<(usize, BufId)> = Vec::new();
        // (master, stored) pairs: updated f32 weights and where their rounded copies go.
        let mut casts: Vec<(BufId, BufId)> = Vec::new();
        for (j, &k) in held.iter().enumerate() {
            let (Some(wk), Some(gk), Some(bufs)) = (self.w[k], update_grad[k], &state[k]) else {
                return Err(format!("parameter {k} is held without its gradient"));
            };
            // ZeRO 1/2: the update runs on this rank's flat shard of the
            // weights; narrow weights, on their master copy, cast back after.
            let owned = match master[k] {
                Some(mw) => {
                    if self.zero_sharded(k) && !zero3 {
                        let s = self.temp(self.stored(&self.flat(k)));
                        gathers.push((k, s));
                        casts.push((mw, s));
                    } else {
                        casts.push((mw, wk));
                    }
                    mw
                }
                None if self.zero_sharded(k) && !zero3 => {
                    let s = self.temp(self.flat(k));
                    self.emit(Kind::FlatShard { parts: dp, part: self.data_coord() }, vec![wk], vec![s]);
                    gathers.push((k, s));
                    s
                }
                None => wk,
            };
            let made = &update.outputs[j];
            extra.insert(made.input, owned);
            extra.insert(made.input + 1, gk);
            targets.insert(made.weights.index(), owned);
            for &(role, input, value) in &made.state {
                let buf = bufs.iter().find(|b| b.0 == role).ok_or("a state the update keeps has no buffer")?.1;
                extra.insert(input, buf);
                targets.insert(value.index(), buf);
            }
        }
        extra.insert(update.hyper, hyper);
        extra.insert(update.norm.ok_or("the update reads the given norm")?, norm);
        self.update(ug, &extra, &targets)?;
        for (mw, w) in casts {
            self.emit(Kind::Copy, vec![mw], vec![w]);
        }
        for c in &prog.step {
            if let StepCollective::ParamAllGather { axis, params, .. } = c {
                let shards: HashMap<usize, BufId> = gathers.iter().copied().collect();
                let full = self.gather(axis, params, |_, k| shards[&k])?;
                for (&k, f) in params.iter().zip(full) {
                    let wk = self.w[k].expect("held");
                    let ty = self.buffers[wk.index()].ty.clone();
                    let v = self.view(f, ty, 0, "");
                    self.emit(Kind::Copy, vec![v], vec![wk]);
                }
            }
        }
        let count = (self.instrs.len() - guard - 1) as u32;
        self.instrs[guard].kind = Kind::SkipIfNonFinite { count };
        Ok(())
    }

    fn data_coord(&self) -> u64 {
        self.mesh.data_coord(self.prog.rank)
    }

    /// All-gather the flat shards `shard(k)` over `axis`: one padded flat buffer per parameter.
    fn gather(
        &mut self,
        axis: &str,
        params: &[usize],
        shard: impl Fn(&Self, usize) -> BufId,
    ) -> Result<Vec<BufId>, String> {
        let (_, n) = self.data().ok_or("a ZeRO gather without a data axis")?;
        let ins: Vec<BufId> = params.iter().map(|&k| shard(self, k)).collect();
        let outs: Vec<BufId> = params
            .iter()
            .zip(&ins)
            .map(|(&k, s)| {
                let per = self.flat(k).numel();
                let dtype = self.buffers[s.index()].ty.dtype;
                self.temp(TensorType::new(dtype, vec![Dim::new("flat", per * n)]))
            })
            .collect();
        self.emit(Kind::Collective { axis: axis.to_string(), op: Collective::AllGather }, ins, outs.clone());
        Ok(outs)
    }

    /// Lower the update graph with its named outputs written into `targets`.
    fn update(
        &mut self,
        g: &Graph,
        extra: &HashMap<usize, BufId>,
        targets: &HashMap<usize, BufId>,
    ) -> Result<(), String> {
        let mut vals: Vec<Option<BufId>> = vec![None; g.len()];
        for (i, node) in g.nodes.iter().enumerate() {
            self.span = Some(g.span(ValueId(i as u32))).filter(|s| *s != Default::default());
            let ins: Vec<BufId> = node
                .inputs
                .iter()
                .map(|v| vals[v.index()].ok_or_else(|| format!("{v} is read before it is computed")))
                .collect::<Result<_, _>>()?;
            let out = match &node.op {
                Op::Input { index } => {
                    *extra.get(index).ok_or_else(|| format!("update input {index} has no buffer"))?
                }
                op => {
                    let o = match targets.get(&i) {
                        Some(&t) => t,
                        None => self.temp(node.ty.clone()),
                    };
                    match op {
                        // A partial sum over a cut dim, summed over the ranks that hold the cuts.
                        Op::AllReduce { axis, op } => {
                            self.emit(Kind::Copy, ins, vec![o]);
                            let kind = Kind::Collective { axis: axis.clone(), op: Collective::AllReduce { op: *op } };
                            self.emit(kind, vec![o], vec![o]);
                        }
                        _ => {
                            let kind = Kind::Op { op: op.clone(), rng: None, accumulate: false, rows: false };
                            self.emit(kind, ins, vec![o]);
                        }
                    }
                    o
                }
            };
            vals[i] = Some(out);
        }
        self.span = None;
        Ok(())
    }

    /// A pipeline stage's schedule: each action's ops, with the activations
    /// and gradients it receives and sends.
    fn schedule(
        &mut self,
        sp: &'a StageProgram,
        inputs: &[Vec<BufId>],
        weights: &[Option<BufId>],
    ) -> Result<(), String> {
        let n_model = self.prog.params.len();
        // (chunk, micro) → the forward's values (when the backward resumes them) and its boundary buffers.
        let mut stash: HashMap<(usize, u64), Stashed> = HashMap::new();
        let mut local_fwd: HashMap<(u32, u64, usize), BufId> = HashMap::new();
        let mut local_grad: HashMap<(u32, u64, usize), BufId> = HashMap::new();
        for action in &sp.schedule {
            match *action {
                Action::Forward { chunk, micro } => {
                    self.phase(format!("F{chunk} mb{micro}"));
                    let c = sp.chunk(chunk);
                    let mut boundary = Vec::with_capacity(c.incoming.len());
                    for (j, (v, _, st)) in c.incoming.iter().enumerate() {
                        let b = if *st == sp.stage {
                            local_fwd.remove(&(v.0, micro, chunk)).ok_or("a local activation was not produced")?
                        } else {
                            let r = self.act_temp(&c.params[n_model + j].ty);
                            let peer = sp.stage_ranks[*st as usize];
                            self.emit(Kind::Recv { peer, tag: sp.tag(0, micro, *v) }, vec![], vec![r]);
                            r
                        };
                        boundary.push(b);
                    }
                    let ws: Vec<Option<BufId>> =
                        weights.iter().copied().chain(boundary.iter().map(|&b| Some(b))).collect();
                    let g = c.sends_graph();
                    let mut extra = HashMap::new();
                    for (i, node) in g.nodes.iter().enumerate() {
                        if let Op::Input { index } = node.op
                            && index >= c.model_inputs
                            && c.split.is_none_or(|k| i < k)
                        {
                            let z = self.act_temp(&node.ty);
                            self.emit(Kind::Zero, vec![], vec![z]);
                            extra.insert(index, z);
                        }
                    }
                    let x = &inputs[micro as usize];
                    let bind = Bind { inputs: x, params: &c.params, weights: &ws, extra: &extra, grads: &[] };
                    let mut vals = Vec::new();
                    self.nodes(g, 0..c.split.unwrap_or(g.len()), &mut vals, &bind)?;
                    let val = |v: ValueId| vals[v.index()].ok_or("a sent value was not computed");
                    if c.outgoing.is_empty() {
                        self.emit(Kind::Accumulate, vec![val(c.forward_loss)?], vec![self.loss]);
                    }
                    for (j, (v, readers)) in c.outgoing.iter().enumerate() {
                        let b = val(c.sends[j])?;
                        for (rchunk, st) in readers {
                            if *st == sp.stage {
                                local_fwd.insert((v.0, micro, *rchunk), b);
                            } else {
                                let peer = sp.stage_ranks[*st as usize];
                                self.emit(Kind::Send { peer, tag: sp.tag(0, micro, *v) }, vec![b], vec![]);
                            }
                        }
                    }
                    let kept = if c.split.is_some() { vals } else { Vec::new() };
                    stash.insert((chunk, micro), (kept, boundary));
                }
                Action::Backward { chunk, micro } => {
                    self.phase(format!("B{chunk} mb{micro}"));
                    let c = sp.chunk(chunk);
                    let (mut vals, boundary) =
                        stash.remove(&(chunk, micro)).ok_or("a backward pass before its forward")?;
                    let mut extra = HashMap::new();
                    for (j, (v, readers)) in c.outgoing.iter().enumerate() {
                        let ty = c.sends_graph().ty(c.sends[j]).clone();
                        let sum = self.act_temp(&ty);
                        self.emit(Kind::Zero, vec![], vec![sum]);
                        for (rchunk, st) in readers {
                            let t = if *st == sp.stage {
                                local_grad.remove(&(v.0, micro, *rchunk)).ok_or("a local gradient was not produced")?
                            } else {
                                let r = self.act_temp(&ty);
                                let peer = sp.stage_ranks[*st as usize];
                                self.emit(Kind::Recv { peer, tag: sp.tag(1, micro, *v) }, vec![], vec![r]);
                                r
                            };
                            self.emit(Kind::Accumulate, vec![t], vec![sum]);
                        }
                        extra.insert(c.model_inputs + j, sum);
                    }
                    let ws: Vec<Option<BufId>> =
                        weights.iter().copied().chain(boundary.iter().map(|&b| Some(b))).collect();
                    let x = &inputs[micro as usize];
                    let bind =
                        Bind { inputs: x, params: &c.params, weights: &ws, extra: &extra, grads: &c.param_grads };
                    // Resumed: the received gradients replace the zeros the forward part was given.
                    for (i, node) in c.backward.nodes.iter().enumerate().take(vals.len()) {
                        if let Op::Input { index } = node.op
                            && let Some(&b) = extra.get(&index)
                        {
                            vals[i] = Some(b);
                        }
                    }
                    self.nodes(&c.backward, 0..c.backward.len(), &mut vals, &bind)?;
                    let model_grads: Vec<_> = c.param_grads.iter().filter(|pg| pg.param < n_model).cloned().collect();
                    self.accumulate_grads(&model_grads, &c.params, &vals)?;
                    self.boundary_grads(sp, c, micro, &vals, &mut local_grad)?;
                }
            }
        }
        Ok(())
    }

    /// The gradients of a chunk's received values go back to their senders.
    fn boundary_grads(
        &mut self,
        sp: &StageProgram,
        c: &ChunkProgram,
        micro: u64,
        vals: &[Option<BufId>],
        local_grad: &mut HashMap<(u32, u64, usize), BufId>,
    ) -> Result<(), String> {
        let n_model = self.prog.params.len();
        for (j, (v, _, st)) in c.incoming.iter().enumerate() {
            let sum = self.act_temp(&c.params[n_model + j].ty);
            self.emit(Kind::Zero, vec![], vec![sum]);
            for pg in c.param_grads.iter().filter(|pg| pg.param == n_model + j) {
                let g = vals[pg.grad.index()].ok_or("a boundary gradient was not computed")?;
                self.emit(Kind::Accumulate, vec![g], vec![sum]);
            }
            if *st == sp.stage {
                local_grad.insert((v.0, micro, c.chunk), sum);
            } else {
                let peer = sp.stage_ranks[*st as usize];
                self.emit(Kind::Send { peer, tag: sp.tag(1, micro, *v) }, vec![sum], vec![]);
            }
        }
        Ok(())
    }

    /// An elementwise op whose operand dies at it writes over that operand
    /// (the output becomes a view of the operand's bytes): a bias add, an
    /// activation, a residual add, a dropout need no second buffer.
    fn in_place(&mut self) {
        let nb = self.buffers.len();
        // The last instruction that touches each root's bytes.
        let mut last = vec![0usize; nb];
        let mut first = vec![usize::MAX; nb];
        for (i, ins) in self.instrs.iter().enumerate() {
            for b in ins.ins.iter().chain(&ins.outs) {
                let r = root_of(&self.buffers, b.index());
                last[r] = last[r].max(i);
                first[r] = first[r].min(i);
            }
        }
        for i in 0..self.instrs.len() {
            let ins = &self.instrs[i];
            let pointwise = match &ins.kind {
                Kind::Op { op, accumulate: false, .. } => op.is_elementwise(),
                Kind::Kernel { .. } => true,
                _ => false,
            };
            if !pointwise || ins.outs.len() != 1 {
                continue;
            }
            let o = ins.outs[0].index();
            let out = &self.buffers[o];
            if out.view_of.is_some() || out.region != Region::Arena || first[o] != i {
                continue;
            }
            let dying = ins.ins.iter().map(|b| b.index()).find(|&x| {
                let r = root_of(&self.buffers, x);
                let b = &self.buffers[x];
                self.buffers[r].region == Region::Arena
                    && last[r] == i
                    && r < o
                    && b.ty.dims == out.ty.dims
                    && b.ty.dtype == out.ty.dtype
                    && b.offset == 0
                    && bytes_of(&self.buffers[r].ty) == bytes_of(&out.ty)
            });
            if let Some(x) = dying {
                let r = root_of(&self.buffers, x);
                self.buffers[o].view_of = Some(BufId(r as u32));
                last[r] = last[r].max(last[o]);
            }
        }
    }

    /// Place the arena by liveness and close the program.
    fn finish(mut self, fuse: bool) -> Program {
        // Phases that hold no instruction are dropped.
        let n = self.instrs.len();
        self.phases.retain(|(at, _)| *at < n);
        if fuse {
            let starts: Vec<usize> = self.phases.iter().map(|(at, _)| *at).collect();
            let (instrs, starts) = crate::kernel::fuse(&mut self.buffers, std::mem::take(&mut self.instrs), &starts);
            self.instrs = instrs;
            for ((at, _), s) in self.phases.iter_mut().zip(starts) {
                *at = s;
            }
        }
        self.in_place();
        let nb = self.buffers.len();
        let mut first = vec![usize::MAX; nb];
        let mut last = vec![0usize; nb];
        for (i, ins) in self.instrs.iter().enumerate() {
            for b in ins.ins.iter().chain(&ins.outs) {
                let r = root_of(&self.buffers, b.index());
                first[r] = first[r].min(i);
                last[r] = last[r].max(i);
            }
        }
        let arena: Vec<usize> = (0..nb)
            .filter(|&b| {
                self.buffers[b].region == Region::Arena && self.buffers[b].view_of.is_none() && first[b] != usize::MAX
            })
            .collect();
        let items: Vec<Interval> = arena
            .iter()
            .map(|&b| Interval { bytes: bytes_of(&self.buffers[b].ty), start: first[b], end: last[b] })
            .collect();
        let (offsets, peak) = allocate(&items);
        for (&b, off) in arena.iter().zip(offsets) {
            self.buffers[b].offset = off;
        }
        // A view's offset is relative to what it views until here (what it views comes first).
        for b in 0..nb {
            if let Some(v) = self.buffers[b].view_of {
                self.buffers[b].offset += self.buffers[v.index()].offset;
            }
        }
        let mut sizes = self.tops;
        sizes[Region::Arena.index()] = peak;
        Program {
            rank: self.prog.rank,
            coords: self.prog.coords.clone(),
            sizes,
            buffers: self.buffers,
            instrs: self.instrs,
            phases: self.phases.into_iter().map(|(at, name)| Phase { at: at as u32, name }).collect(),
        }
    }
}

/// A buffer's bytes: its region, first and end offsets.
type Bytes = (Region, u64, u64);

/// A communication-stream call placed by `overlap`: the instruction it
/// goes after, the call, and the bytes it touches.
type Part = (usize, Instr, Vec<Bytes>);

/// Which values of `g` `root` is computed from (`root` included).
fn ancestors(g: &Graph, root: ValueId) -> Vec<bool> {
    let mut need = vec![false; g.len()];
    need[root.index()] = true;
    for i in (0..g.len()).rev() {
        if need[i] {
            for v in &g.nodes[i].inputs {
                need[v.index()] = true;
            }
        }
    }
    need
}

/// Which values of `g` are model parameters' gradients (of the `grads`
/// whose parameter index is below `params`; a pipeline's boundary values
/// are activations), or the sums that make one (a tied weight's partial
/// gradients, added).
fn grad_values(g: &Graph, grads: &[crate::autodiff::ParamGrad], params: usize) -> Vec<bool> {
    let mut wide = vec![false; g.len()];
    for pg in grads.iter().filter(|pg| pg.param < params) {
        wide[pg.grad.index()] = true;
    }
    for i in (0..g.len()).rev() {
        let n = &g.nodes[i];
        if wide[i] && matches!(n.op, Op::Binary { op: crate::ir::BinaryOp::Add }) {
            for v in &n.inputs {
                if g.nodes[v.index()].ty.dims == n.ty.dims {
                    wide[v.index()] = true;
                }
            }
        }
    }
    wide
}

/// The buffer that owns the bytes of buffer `b`.
fn root_of(bufs: &[Buffer], mut b: usize) -> usize {
    while let Some(v) = bufs[b].view_of {
        b = v.index();
    }
    b
}

/// The type of model input `i` in a rank's graphs.
fn input_type(prog: &RankProgram, i: usize) -> Option<TensorType> {
    let find = |g: &Graph| {
        g.nodes.iter().find_map(|n| match n.op {
            Op::Input { index } if index == i => Some(n.ty.clone()),
            _ => None,
        })
    };
    match &prog.stage {
        None => find(&prog.graph),
        Some(sp) => sp.chunks.iter().find_map(|c| find(&c.backward).or_else(|| find(&c.forward))),
    }
}

fn dropout_of(op: &Op) -> bool {
    matches!(op, Op::AttentionGrad { dropout, .. } if *dropout > 0.0)
}

/// Attention gradients computed by one pass share their operands and attributes.
fn attention_key(g: &Graph, i: usize) -> (Vec<ValueId>, String) {
    let mut op = g.nodes[i].op.clone();
    if let Op::AttentionGrad { which, .. } = &mut op {
        *which = 0;
    }
    (g.nodes[i].inputs.clone(), format!("{op:?}"))
}
