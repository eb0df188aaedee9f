//! Pipeline parallelism: the forward graph cut into model chunks along
//! `layer`, each chunk's own backward, and the schedules that order chunks
//! and microbatches on a stage (GPipe, 1F1B, interleaved 1F1B).
//!
//! Chunk `c` of `stages × virtual` holds a contiguous block of layers and
//! lives on stage `c mod stages` (interleaving puts several on a stage). A
//! node belongs to the latest chunk among its inputs; nodes that depend on
//! no layer (inputs, constants, unstacked parameters and what is computed
//! from them alone, such as the token embedding) are copied into each chunk
//! that reads them, so a tied embedding lives on the first and the last
//! stage and their gradients are summed. A value a later chunk reads is sent
//! to it: it becomes a *boundary* parameter of the reader (index after the
//! model's parameters), whose gradient is sent back.
//!
//! A non-final chunk's backward is the gradient of Σ sum(out ⊙ g_out) over
//! its outgoing values, with each g_out an input (the gradient received
//! from the reader); the final chunk's is the model's loss. The backward
//! program recomputes the chunk's forward from its stashed inputs (full
//! activation recomputation): numerically the same, and what keeps a
//! stage's memory to its boundary inputs in flight.

use super::{ParallelError, err};
use crate::autodiff::{Backward, differentiate_trainable};
use crate::config::Schedule;
use crate::ir::{BinaryOp, Graph, Op, ReduceOp, ValueId};
use crate::model::{Init, Model, Param, Placement, TensorType};
use crate::syntax::ast::DType;

/// One model chunk.
#[derive(Debug, Clone)]
pub struct Chunk {
    pub index: usize,
    pub stage: u64,
    /// Forward: outputs `send.j` (outgoing values) and `loss` (the objective).
    pub forward: Backward,
    /// Forward and backward of the objective.
    pub backward: Backward,
    /// The model's parameters, then one boundary parameter per incoming value.
    pub params: Vec<Param>,
    /// Incoming values: (global forward value, producing chunk).
    pub incoming: Vec<(ValueId, usize)>,
    /// Outgoing values: (global forward value, reading chunks).
    pub outgoing: Vec<(ValueId, Vec<usize>)>,
    /// Model parameters this chunk reads.
    pub uses: Vec<bool>,
}

/// A step of a stage's schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Forward { chunk: usize, micro: u64 },
    Backward { chunk: usize, micro: u64 },
}

/// The chunk that holds layer `i` of `n`.
pub fn chunk_of_layer(chunks: u64, n: u64, i: u64) -> u64 {
    let per = n.div_ceil(chunks).max(1);
    (i / per).min(chunks - 1)
}

/// Cut `m`'s forward graph into `stages × virtual` chunks.
pub fn chunks(m: &Model, stages: u64, virtual_stages: u64) -> Result<Vec<Chunk>, ParallelError> {
    let g = &m.graph;
    let n_chunks = (stages * virtual_stages.max(1)) as usize;
    if m.stacks.len() != 1 {
        return err(format!("pipeline parallelism splits one `repeat` of layers; `{}` has {}", m.name, m.stacks.len()));
    }
    let layers = m.stacks[0].layers;
    if layers < n_chunks as u64 {
        return err(format!(
            "{layers} layers cannot fill {n_chunks} pipeline chunks (stages × virtual); use fewer stages or virtual stages"
        ));
    }
    // Each node's chunk; None for nodes that depend on no layer.
    let mut chunk: Vec<Option<usize>> = vec![None; g.len()];
    for (i, node) in g.nodes.iter().enumerate() {
        chunk[i] = match node.op {
            Op::Param { layer: Some(l), .. } => Some(chunk_of_layer(n_chunks as u64, layers, l) as usize),
            Op::Param { .. }
            | Op::Input { .. }
            | Op::Scalar { .. }
            | Op::Sinusoid
            | Op::Iota { .. }
            | Op::LossScale => None,
            _ => node.inputs.iter().filter_map(|x| chunk[x.index()]).max(),
        };
    }
    let loss = g.output("loss").ok_or_else(|| ParallelError("the model defines no `loss`".into()))?;
    if chunk[loss.index()] != Some(n_chunks - 1) && n_chunks > 1 {
        return err("the loss does not depend on the last layers: nothing for the last pipeline stage to do");
    }
    // Readers of each value by chunk.
    let mut readers: Vec<Vec<usize>> = vec![Vec::new(); g.len()];
    for (i, node) in g.nodes.iter().enumerate() {
        if let Some(c) = chunk[i] {
            for x in &node.inputs {
                if !readers[x.index()].contains(&c) {
                    readers[x.index()].push(c);
                }
            }
        }
    }
    let mut out = Vec::with_capacity(n_chunks);
    for c in 0..n_chunks {
        out.push(build_chunk(m, &chunk, &readers, c, n_chunks, stages, loss)?);
    }
    Ok(out)
}

fn build_chunk(
    m: &Model,
    chunk: &[Option<usize>],
    readers: &[Vec<usize>],
    c: usize,
    n_chunks: usize,
    stages: u64,
    loss: ValueId,
) -> Result<Chunk, ParallelError> {
    let g = &m.graph;
    // Free nodes (no chunk) this chunk needs, transitively.
    let mut need = vec![false; g.len()];
    for i in (0..g.len()).rev() {
        let mine = chunk[i] == Some(c) || (i == loss.index() && c == n_chunks - 1);
        if mine || (chunk[i].is_none() && need[i]) {
            need[i] = true;
            for x in &g.nodes[i].inputs {
                if chunk[x.index()].is_none() || chunk[x.index()] == Some(c) {
                    need[x.index()] = true;
                }
            }
        }
    }
    let mut f = Graph::new();
    let mut map: Vec<Option<ValueId>> = vec![None; g.len()];
    let mut params = m.params.clone();
    let mut incoming = Vec::new();
    let mut uses = vec![false; m.params.len()];
    for i in 0..g.len() {
        let here = chunk[i] == Some(c) || (chunk[i].is_none() && need[i]);
        if !here {
            continue;
        }
        let node = &g.nodes[i];
        let mut ins = Vec::with_capacity(node.inputs.len());
        for x in &node.inputs {
            let v = match map[x.index()] {
                Some(v) => v,
                None => {
                    // A value from an earlier chunk: a boundary parameter.
                    let from = chunk[x.index()]
                        .ok_or_else(|| ParallelError("internal: a free value was not copied".into()))?;
                    let ty = g.ty(*x).clone();
                    if ty.dtype != DType::F32 {
                        return err(format!(
                            "a {} value crosses a pipeline stage boundary; only f32 values can",
                            ty.dtype.name()
                        ));
                    }
                    let index = params.len();
                    params.push(boundary_param(index, c, &ty));
                    incoming.push((*x, from));
                    let v = f.push(Op::Param { index, layer: None }, vec![], ty, g.span(*x));
                    map[x.index()] = Some(v);
                    v
                }
            };
            ins.push(v);
        }
        if let Op::Param { index, .. } = node.op {
            uses[index] = true;
        }
        map[i] = Some(f.push(node.op.clone(), ins, node.ty.clone(), g.span(ValueId(i as u32))));
    }
    // Outgoing values, and the objective whose gradient is the chunk's backward.
    let outgoing: Vec<(ValueId, Vec<usize>)> = (0..g.len())
        .filter(|&i| chunk[i] == Some(c))
        .filter_map(|i| {
            let later: Vec<usize> = readers[i].iter().copied().filter(|&r| r > c).collect();
            (!later.is_empty()).then_some((ValueId(i as u32), later))
        })
        .collect();
    let scalar = TensorType::scalar(DType::F32);
    let n_inputs = m.inputs.len();
    let objective = if c == n_chunks - 1 {
        map[loss.index()].ok_or_else(|| ParallelError("internal: the loss is not in the last chunk".into()))?
    } else {
        let mut total: Option<ValueId> = None;
        for (j, (v, _)) in outgoing.iter().enumerate() {
            let o = map[v.index()].expect("outgoing values are in the chunk");
            let ty = f.ty(o).clone();
            let gin = f.push(Op::Input { index: n_inputs + j }, vec![], ty.clone(), Default::default());
            let prod = f.push(Op::Binary { op: BinaryOp::Mul }, vec![o, gin], ty.clone(), Default::default());
            let dims = ty.dims.iter().map(|d| d.name.clone()).collect();
            let s = f.push(Op::Reduce { op: ReduceOp::Sum, dims }, vec![prod], scalar.clone(), Default::default());
            total = Some(match total {
                None => s,
                Some(t) => f.push(Op::Binary { op: BinaryOp::Add }, vec![t, s], scalar.clone(), Default::default()),
            });
        }
        total.ok_or_else(|| ParallelError(format!("pipeline chunk {c} sends nothing to the next")))?
    };
    for (j, (v, _)) in outgoing.iter().enumerate() {
        f.set_output(&format!("send.{j}"), map[v.index()].expect("in the chunk"));
    }
    f.set_output("loss", objective);
    crate::ir::verify(&f).map_err(|e| ParallelError(format!("internal: chunk {c} does not verify: {e:?}")))?;
    let frozen: Vec<bool> = m.params.iter().map(|p| p.frozen).collect();
    let backward =
        differentiate_trainable(&f, objective, &frozen).map_err(|e| ParallelError(format!("chunk {c}: {e}")))?;
    let forward = Backward {
        graph: f.clone(),
        loss: objective,
        forward_len: f.len(),
        param_grads: Vec::new(),
        reduce_grads: Default::default(),
    };
    Ok(Chunk { index: c, stage: c as u64 % stages, forward, backward, params, incoming, outgoing, uses })
}

fn boundary_param(index: usize, c: usize, ty: &TensorType) -> Param {
    Param {
        path: format!("boundary.{c}.{index}"),
        ty: ty.clone(),
        init: Init::Zeros,
        placement: Placement::First,
        expert: None,
        stack: None,
        layers: Vec::new(),
        frozen: false,
        adapter_of: None,
        span: Default::default(),
    }
}

/// The order of forward and backward passes on `stage` over `micro`
/// microbatches. Chunks of a stage are `stage + k·stages`.
pub fn schedule(kind: Schedule, stages: u64, virtual_stages: u64, micro: u64, stage: u64) -> Vec<Action> {
    let (p, v, m) = (stages, virtual_stages.max(1), micro);
    let chunk = |local: u64| (local * p + stage) as usize;
    match kind {
        Schedule::Gpipe => {
            let mut out = Vec::new();
            for mb in 0..m {
                for k in 0..v {
                    out.push(Action::Forward { chunk: chunk(k), micro: mb });
                }
            }
            for mb in (0..m).rev() {
                for k in (0..v).rev() {
                    out.push(Action::Backward { chunk: chunk(k), micro: mb });
                }
            }
            out
        }
        Schedule::OneFOneB | Schedule::Interleaved1f1b => {
            // Megatron's order: virtual microbatch k is microbatch
            // (k / (p·v))·p + k mod p of local chunk (k / p) mod v (backward:
            // the chunks in reverse); warm-up forwards, then one forward and
            // one backward in turn, then the remaining backwards. With one
            // chunk per stage this is plain 1F1B (k is the microbatch).
            let total = m * v;
            let fwd = |k: u64| Action::Forward { chunk: chunk((k / p) % v), micro: (k / (p * v)) * p + k % p };
            let bwd = |k: u64| Action::Backward { chunk: chunk(v - 1 - (k / p) % v), micro: (k / (p * v)) * p + k % p };
            let warmup = if v == 1 { (p - stage - 1).min(m) } else { ((p - stage - 1) * 2 + (v - 1) * p).min(total) };
            let mut out: Vec<Action> = (0..warmup).map(fwd).collect();
            for i in 0..total - warmup {
                out.push(fwd(warmup + i));
                out.push(bwd(i));
            }
            out.extend((total - warmup..total).map(bwd));
            out
        }
    }
}

/// Check a schedule's preconditions (Megatron's interleaving needs whole groups of microbatches).
pub fn check_schedule(kind: Schedule, stages: u64, virtual_stages: u64, micro: u64) -> Result<(), ParallelError> {
    if kind == Schedule::Interleaved1f1b && virtual_stages > 1 && !micro.is_multiple_of(stages) {
        return err(format!(
            "interleaved 1F1B runs microbatches in groups of the {stages} stages; {micro} microbatches do not divide"
        ));
    }
    Ok(())
}
