//! Per-rank programs: the sharded step (or, with pipelines, each chunk's
//! forward and backward and the stage's schedule) and the step's
//! collectives outside the graph (gradient buckets, ZeRO, norms, shared
//! embeddings).

use super::mesh::coords;
use super::propagate::shard_graph;
use super::{Mesh, ParallelError, ParamShard, Split, err, param_shard, pipeline};
use crate::autodiff::{Backward, ParamGrad};
use crate::ir::{Graph, ValueId};
use crate::model::{Dim, Model, Param};
use std::collections::BTreeMap;

/// A collective of the optimizer step (outside the forward/backward graph).
#[derive(Debug, Clone, PartialEq)]
pub enum StepCollective {
    /// Sum a bucket of gradients over an axis: `params` in bucket order. (The
    /// trainer then divides by the step's microbatch count over all ranks.)
    GradAllReduce { axis: String, params: Vec<usize>, elems: u64 },
    /// ZeRO 2/3: reduce-scatter a bucket of flat gradients over the data axis.
    GradReduceScatter { axis: String, params: Vec<usize>, elems: u64 },
    /// ZeRO 1/2: all-gather updated weight shards; ZeRO 3: all-gather the
    /// weights before the forward pass.
    ParamAllGather { axis: String, params: Vec<usize>, elems: u64 },
    /// Sum the squared-gradient partial sums over these axes (global norm).
    NormAllReduce { axes: Vec<String>, params: Vec<usize> },
    /// Sum a parameter's gradients over the pipeline stages that read it
    /// (point to point, with the same ranks of those stages).
    SharedGradSum { param: usize, stages: Vec<u64> },
}

impl StepCollective {
    pub fn axis_label(&self) -> String {
        match self {
            StepCollective::GradAllReduce { axis, .. }
            | StepCollective::GradReduceScatter { axis, .. }
            | StepCollective::ParamAllGather { axis, .. } => axis.clone(),
            StepCollective::NormAllReduce { axes, .. } => axes.join("+"),
            StepCollective::SharedGradSum { .. } => "pipeline".into(),
        }
    }
    pub fn to_text(&self) -> String {
        let attrs = match self {
            StepCollective::GradAllReduce { axis, params, elems } => {
                format!("{{axis = {axis}, op = sum, elems = {elems}}} params {params:?}")
            }
            StepCollective::GradReduceScatter { axis, params, elems }
            | StepCollective::ParamAllGather { axis, params, elems } => {
                format!("{{axis = {axis}, elems = {elems}}} params {params:?}")
            }
            StepCollective::NormAllReduce { axes, params } => {
                format!("{{axes = [{}]}} params {params:?}", axes.join(", "))
            }
            StepCollective::SharedGradSum { param, stages } => format!("{{stages = {stages:?}}} param {param}"),
        };
        format!("{} {attrs}", self.name())
    }

    pub fn name(&self) -> &'static str {
        match self {
            StepCollective::GradAllReduce { .. } => "grad_all_reduce",
            StepCollective::GradReduceScatter { .. } => "grad_reduce_scatter",
            StepCollective::ParamAllGather { .. } => "param_all_gather",
            StepCollective::NormAllReduce { .. } => "norm_all_reduce",
            StepCollective::SharedGradSum { .. } => "shared_grad_sum",
        }
    }
}

/// One rank's training step.
#[derive(Debug, Clone)]
pub struct RankProgram {
    pub rank: u64,
    /// (axis, coordinate) in rank-numbering order.
    pub coords: Vec<(String, u64)>,
    /// Forward and backward, with collectives; outputs `loss` and the gradients.
    pub graph: Graph,
    pub loss: ValueId,
    pub param_grads: Vec<ParamGrad>,
    pub params: Vec<ParamShard>,
    /// Collectives before the first microbatch (ZeRO 3 gathers the weights).
    pub prologue: Vec<StepCollective>,
    /// The step's collectives after the backward pass, in issue order.
    pub step: Vec<StepCollective>,
    /// With pipeline parallelism: the stage's chunks and schedule (`graph` is then empty).
    pub stage: Option<StageProgram>,
    /// Microbatches per step on this rank (the graph runs once for each).
    pub micro: u64,
}

impl RankProgram {
    pub fn local_params(&self) -> Vec<Param> {
        self.params.iter().map(|p| p.local.clone()).collect()
    }

    /// The per-rank IR text, with the step collectives after it.
    pub fn to_text(&self) -> String {
        let coords: Vec<String> = self.coords.iter().map(|(a, c)| format!("{a}={c}")).collect();
        let mut s = format!("// rank {} ({})\n", self.rank, coords.join(", "));
        for (k, p) in self.params.iter().enumerate() {
            if !p.splits.is_empty() {
                let cut: Vec<String> = p
                    .splits
                    .iter()
                    .map(|(pos, sp)| {
                        format!(
                            "{} over {} {}",
                            p.local.ty.dims[*pos].name,
                            sp.axis,
                            crate::ir::indices_text(&sp.indices)
                        )
                    })
                    .collect();
                s += &format!("// param {k} {}: {}\n", p.local.path, cut.join(", "));
            }
        }
        for c in &self.prologue {
            s += &format!("prologue {}\n", c.to_text());
        }
        match &self.stage {
            None => s += &self.graph.to_text(),
            Some(sp) => {
                let order: Vec<String> = sp
                    .schedule
                    .iter()
                    .map(|a| match a {
                        pipeline::Action::Forward { chunk, micro } => format!("F{chunk}.{micro}"),
                        pipeline::Action::Backward { chunk, micro } => format!("B{chunk}.{micro}"),
                    })
                    .collect();
                s += &format!("// stage {} of {}: schedule {}\n", sp.stage, sp.stages, order.join(" "));
                for c in &sp.chunks {
                    let ins: Vec<String> =
                        c.incoming.iter().map(|(v, from, st)| format!("{v} from chunk {from} (stage {st})")).collect();
                    let outs: Vec<String> = c
                        .outgoing
                        .iter()
                        .map(|(v, rs)| format!("{v} to chunks {:?}", rs.iter().map(|(r, _)| *r).collect::<Vec<_>>()))
                        .collect();
                    s += &format!("// chunk {}: receives [{}], sends [{}]\n", c.chunk, ins.join(", "), outs.join(", "));
                    match c.split {
                        Some(k) => {
                            s += &format!(
                                "// chunk {}: forward = nodes 0..{k} (their values wait for the gradient), backward = the rest\n{}",
                                c.chunk,
                                c.backward.to_text()
                            );
                        }
                        None => {
                            s += &format!("// chunk {} forward\n{}", c.chunk, c.forward.to_text());
                            s += &format!(
                                "// chunk {} forward (recomputed) and backward\n{}",
                                c.chunk,
                                c.backward.to_text()
                            );
                        }
                    }
                }
            }
        }
        for c in &self.step {
            s += &format!("step {}\n", c.to_text());
        }
        s
    }
}

/// The per-rank program of `rank` for the training step `bw` of model `m`.
pub fn shard(m: &Model, bw: &Backward, rank: u64) -> Result<RankProgram, ParallelError> {
    let mesh = Mesh::of(m)?;
    if rank >= mesh.world() {
        return err(format!("rank {rank} is outside the mesh of {} ranks", mesh.world()));
    }
    if let Some(pipe) = mesh.pipeline_axis.clone() {
        return pipeline_program(m, &mesh, rank, &pipe);
    }
    let params: Vec<ParamShard> = m.params.iter().map(|p| param_shard(&mesh, p, rank)).collect();
    let metas: Vec<Param> = m.params.clone();
    let local = shard_graph(&mesh, &metas, &params, bw, rank, &[], None, metas.len())?;
    let mut step = step_collectives(m, &mesh, &params, &[], &partial_grads(&local.param_grads));
    // ZeRO 3 gathers the weights before the forward pass instead of after the update.
    let prologue = match step.last() {
        Some(StepCollective::ParamAllGather { .. }) if mesh.zero >= 3 => step.split_off(step.len() - 1),
        _ => Vec::new(),
    };
    let c = coords(&mesh.order, rank);
    Ok(RankProgram {
        rank,
        coords: mesh.order.iter().zip(c).map(|((a, _), c)| (a.clone(), c)).collect(),
        graph: local.graph,
        loss: local.loss,
        param_grads: local.param_grads,
        params,
        prologue,
        step,
        stage: None,
        micro: micro_per_rank(m, &mesh),
    })
}

/// Microbatches per step on a data-parallel rank.
fn micro_per_rank(m: &Model, mesh: &Mesh) -> u64 {
    let dp = mesh.data_axis.as_deref().map(|a| mesh.size(a)).unwrap_or(1);
    let batch = m.train.as_ref().map(|t| t.batch).unwrap_or(m.micro_batch);
    (batch / m.micro_batch.max(1) / dp).max(1)
}

/// One model chunk's programs on a rank.
#[derive(Debug, Clone)]
pub struct ChunkProgram {
    pub chunk: usize,
    /// Forward only (with full recomputation; else empty): outputs the
    /// values sent on (`sends`) and the objective.
    pub forward: Graph,
    /// The objective (the loss on the last chunk), in `forward`, or in
    /// `backward` when `split` is set.
    pub forward_loss: ValueId,
    /// The values sent to later chunks, whole, in the same graph.
    pub sends: Vec<ValueId>,
    /// Without full recomputation: the forward step runs `backward`'s nodes
    /// `0..split` and keeps their values; the backward step runs the rest.
    pub split: Option<usize>,
    /// Forward (recomputed) and backward.
    pub backward: Graph,
    pub param_grads: Vec<ParamGrad>,
    /// Local parameter metas: the model's, then the boundary parameters.
    pub params: Vec<Param>,
    /// Incoming values: (global value, producing chunk, its stage).
    pub incoming: Vec<(ValueId, usize, u64)>,
    /// Outgoing values: (global value, [(reading chunk, its stage)]).
    pub outgoing: Vec<(ValueId, Vec<(usize, u64)>)>,
    /// Inputs of the forward graph before the received gradients.
    pub model_inputs: usize,
}

impl ChunkProgram {
    /// The graph that computes `sends` and `forward_loss`.
    pub fn sends_graph(&self) -> &Graph {
        if self.split.is_some() { &self.backward } else { &self.forward }
    }
}

/// A pipeline stage's part of a rank program.
#[derive(Debug, Clone)]
pub struct StageProgram {
    pub axis: String,
    pub stage: u64,
    pub stages: u64,
    pub chunks: Vec<ChunkProgram>,
    pub schedule: Vec<pipeline::Action>,
    pub micro: u64,
    /// The pipeline axis's ranks that share this rank's other coordinates, by stage.
    pub stage_ranks: Vec<u64>,
    /// Tags of point-to-point messages are `tag(kind, micro, value)`.
    pub values: u64,
}

impl StageProgram {
    /// The tag of a forward activation (kind 0) or its gradient (kind 1).
    pub fn tag(&self, kind: u64, micro: u64, value: ValueId) -> u64 {
        ((micro * self.values + value.0 as u64) << 1) | kind
    }

    pub fn chunk(&self, c: usize) -> &ChunkProgram {
        self.chunks.iter().find(|p| p.chunk == c).expect("a chunk of this stage")
    }
}

fn pipeline_program(m: &Model, mesh: &Mesh, rank: u64, axis: &str) -> Result<RankProgram, ParallelError> {
    let par = &m.parallel;
    let stages = mesh.size(axis);
    let v = par.chunks_per_stage();
    let micro = par.pipeline.microbatches.max(1);
    pipeline::check_schedule(par.pipeline.schedule, stages, v, micro)?;
    let chunks = pipeline::chunks(m, stages, v)?;
    let stage = mesh.coord(rank, axis);
    let n_chunks = chunks.len() as u64;
    let layers = m.stacks.first().map(|s| s.layers).unwrap_or(1);
    // What this stage holds of each model parameter.
    let mine: Vec<&pipeline::Chunk> = chunks.iter().filter(|c| c.stage == stage).collect();
    let mut params = Vec::with_capacity(m.params.len());
    for (k, p) in m.params.iter().enumerate() {
        let mut shard = param_shard(mesh, p, rank);
        let used = mine.iter().any(|c| c.uses[k]);
        if p.ty.dims.first().is_some_and(|d| d.name == "layer") {
            let held: Vec<u64> = (0..p.layers.len() as u64)
                .filter(|&j| pipeline::chunk_of_layer(n_chunks, layers, p.layers[j as usize]) % stages == stage)
                .collect();
            shard.local.layers = held.iter().map(|&j| p.layers[j as usize]).collect();
            shard.local.ty.dims[0] = Dim::new("layer", held.len() as u64);
            shard.splits.insert(0, (0, Split { axis: axis.to_string(), indices: held, exchanged: None }));
        } else if !used {
            shard.held = false;
        }
        if shard.local.ty.numel() == 0 {
            shard.held = false;
        }
        params.push(shard);
    }
    let mut progs = Vec::new();
    for c in &mine {
        let mut shards = params.clone();
        for b in &c.params[m.params.len()..] {
            // A boundary value arrives whole (the sender gathers it): layout rules do not cut it.
            shards.push(ParamShard { local: b.clone(), splits: Vec::new(), held: true });
        }
        let sends: Vec<ValueId> = c.outgoing.iter().map(|(v, _)| local_of(c, *v)).collect();
        // Without full recomputation the backward program's forward part runs
        // at the forward step and its values wait for the gradient (a stash);
        // with it, a forward-only program runs first and the backward program
        // recomputes.
        let recompute = m.parallel.recompute == crate::config::Recompute::Full;
        let f = if recompute {
            Some(shard_graph(mesh, &c.params, &shards, &c.forward, rank, &sends, None, 0)?)
        } else {
            None
        };
        let at = (!recompute).then_some(c.forward.graph.len());
        // With one chunk per stage, a replicated weight's partial gradient is
        // summed once per step; chunks that share a rank reduce their own.
        let defer = if v == 1 { m.params.len() } else { 0 };
        let b = shard_graph(mesh, &c.params, &shards, &c.backward, rank, &sends, at, defer)?;
        let stage_of = |k: usize| chunks[k].stage;
        progs.push(ChunkProgram {
            chunk: c.index,
            forward: f.as_ref().map(|f| f.graph.clone()).unwrap_or_default(),
            forward_loss: f.as_ref().map(|f| f.loss).unwrap_or(b.loss),
            sends: f.as_ref().map(|f| f.extra.clone()).unwrap_or_else(|| b.extra.clone()),
            split: b.split,
            backward: b.graph,
            param_grads: b.param_grads,
            params: shards.iter().map(|s| s.local.clone()).collect(),
            incoming: c.incoming.iter().map(|(v, from)| (*v, *from, stage_of(*from))).collect(),
            outgoing: c
                .outgoing
                .iter()
                .map(|(v, readers)| (*v, readers.iter().map(|&r| (r, stage_of(r))).collect()))
                .collect(),
            model_inputs: m.inputs.len(),
        });
    }
    // Parameters read on more than one stage (a tied embedding): their gradients are summed between those stages.
    let shared: Vec<(usize, Vec<u64>)> = (0..m.params.len())
        .filter(|&k| m.params[k].ty.dims.first().is_none_or(|d| d.name != "layer"))
        .filter_map(|k| {
            let mut st: Vec<u64> = chunks.iter().filter(|c| c.uses[k]).map(|c| c.stage).collect();
            st.sort();
            st.dedup();
            (st.len() > 1 && st.contains(&stage)).then_some((k, st))
        })
        .collect();
    let partial: Vec<(usize, Vec<String>)> = progs.iter().flat_map(|c| partial_grads(&c.param_grads)).collect();
    let mut step = step_collectives(m, mesh, &params, &shared, &partial);
    let prologue = match step.last() {
        Some(StepCollective::ParamAllGather { .. }) if mesh.zero >= 3 => step.split_off(step.len() - 1),
        _ => Vec::new(),
    };
    let c = coords(&mesh.order, rank);
    let stage_prog = StageProgram {
        axis: axis.to_string(),
        stage,
        stages,
        chunks: progs,
        schedule: pipeline::schedule(par.pipeline.schedule, stages, v, micro, stage),
        micro,
        stage_ranks: mesh.group(rank, axis),
        values: m.graph.len() as u64,
    };
    Ok(RankProgram {
        rank,
        coords: mesh.order.iter().zip(c).map(|((a, _), c)| (a.clone(), c)).collect(),
        graph: Graph::new(),
        loss: ValueId(0),
        param_grads: Vec::new(),
        params,
        prologue,
        step,
        stage: Some(stage_prog),
        micro,
    })
}

/// The chunk-local id of a global forward value the chunk computes.
fn local_of(c: &pipeline::Chunk, v: ValueId) -> ValueId {
    let k = c.outgoing.iter().position(|(x, _)| *x == v).expect("an outgoing value");
    c.forward.graph.output(&format!("send.{k}")).expect("the chunk names its sends")
}

/// The optimizer step's collectives: gradient reduction over the data axis
/// in buckets (last parameters first: the order backward finishes them),
/// ZeRO's scatter and gather, and the gradient-norm sums.
fn step_collectives(
    m: &Model,
    mesh: &Mesh,
    params: &[ParamShard],
    shared: &[(usize, Vec<u64>)],
    partial: &[(usize, Vec<String>)],
) -> Vec<StepCollective> {
    let mut out = Vec::new();
    let elems = |k: usize| params[k].local.ty.numel();
    // A frozen parameter has no gradient to reduce and no update to gather.
    let trains = |k: usize| !params[k].local.frozen;
    // Gradients that are partial sums over a model axis: summed over it once
    // per step, in buckets, before anything else reads them.
    let mut by_axis: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (k, axes) in partial {
        for a in axes {
            let list = by_axis.entry(a.clone()).or_default();
            if !list.contains(k) {
                list.push(*k);
            }
        }
    }
    for (axis, mut ks) in by_axis {
        ks.sort_by(|a, b| b.cmp(a));
        let mut bucket: Vec<usize> = Vec::new();
        let mut size = 0u64;
        for k in ks {
            if size + elems(k) > mesh.bucket && !bucket.is_empty() {
                out.push(StepCollective::GradAllReduce {
                    axis: axis.clone(),
                    params: std::mem::take(&mut bucket),
                    elems: size,
                });
                size = 0;
            }
            bucket.push(k);
            size += elems(k);
        }
        if !bucket.is_empty() {
            out.push(StepCollective::GradAllReduce { axis, params: bucket, elems: size });
        }
    }
    if let Some(data) = mesh.data_axis.clone().filter(|a| mesh.size(a) > 1) {
        let n = mesh.size(&data);
        let reduced: Vec<usize> =
            (0..params.len()).rev().filter(|&k| params[k].held && trains(k) && !params[k].split_over(&data)).collect();
        let mut bucket: Vec<usize> = Vec::new();
        let mut size = 0u64;
        let flush = |bucket: &mut Vec<usize>, size: &mut u64, out: &mut Vec<StepCollective>| {
            if bucket.is_empty() {
                return;
            }
            let params = std::mem::take(bucket);
            if mesh.zero >= 2 {
                out.push(StepCollective::GradReduceScatter { axis: data.clone(), params, elems: *size });
            } else {
                out.push(StepCollective::GradAllReduce { axis: data.clone(), params, elems: *size });
            }
            *size = 0;
        };
        for k in reduced {
            let e = elems(k).div_ceil(n) * n;
            if size + e > mesh.bucket && !bucket.is_empty() {
                flush(&mut bucket, &mut size, &mut out);
            }
            bucket.push(k);
            size += e;
        }
        flush(&mut bucket, &mut size, &mut out);
    }
    // A parameter read on several stages sums its gradients over them.
    for (k, stages) in shared.iter().filter(|(k, _)| trains(*k)) {
        out.push(StepCollective::SharedGradSum { param: *k, stages: stages.clone() });
    }
    // Squared-norm partial sums: each parameter over the axes it is split on
    // (and over the data axis when ZeRO shards it there, and the pipeline
    // axis, whose stages hold different parameters).
    let mut by_axes: BTreeMap<Vec<String>, Vec<usize>> = BTreeMap::new();
    for (k, p) in params.iter().enumerate().filter(|(k, _)| trains(*k)) {
        let mut axes: Vec<String> = p.splits.iter().map(|(_, s)| s.axis.clone()).collect();
        if let Some(pipe) = &mesh.pipeline_axis {
            axes.push(pipe.clone());
        }
        if mesh.zero >= 1
            && let Some(d) = &mesh.data_axis
            && mesh.size(d) > 1
            && !p.split_over(d)
        {
            axes.push(d.clone());
        }
        axes.sort();
        axes.dedup();
        if !axes.is_empty() {
            by_axes.entry(axes).or_default().push(k);
        }
    }
    if m.train.as_ref().is_some_and(|t| t.clip.is_some()) {
        for (axes, params) in by_axes {
            out.push(StepCollective::NormAllReduce { axes, params });
        }
    }
    // ZeRO 1/2 gather the updated shards (a frozen weight is not updated);
    // ZeRO 3 stores every weight sharded and gathers all of them before the
    // forward pass (this gather becomes the step's prologue).
    let gathered = |k: usize| trains(k) || mesh.zero >= 3;
    if mesh.zero >= 1
        && let Some(data) = mesh.data_axis.clone().filter(|a| mesh.size(a) > 1)
        && (0..params.len()).any(|k| params[k].held && gathered(k) && !params[k].split_over(&data))
    {
        let n = mesh.size(&data);
        let ps: Vec<usize> =
            (0..params.len()).filter(|&k| params[k].held && gathered(k) && !params[k].split_over(&data)).collect();
        let total = ps.iter().map(|&k| elems(k).div_ceil(n) * n).sum();
        out.push(StepCollective::ParamAllGather { axis: data, params: ps, elems: total });
    }
    out
}

/// The parameters whose gradients a graph leaves partial, with the axes.
fn partial_grads(grads: &[ParamGrad]) -> Vec<(usize, Vec<String>)> {
    let mut out: Vec<(usize, Vec<String>)> = Vec::new();
    for pg in grads.iter().filter(|pg| !pg.partial.is_empty()) {
        if !out.iter().any(|(k, _)| *k == pg.param) {
            out.push((pg.param, pg.partial.clone()));
        }
    }
    out
}

/// Every rank's program.
pub fn shard_all(m: &Model, bw: &Backward) -> Result<Vec<RankProgram>, ParallelError> {
    let mesh = Mesh::of(m)?;
    (0..mesh.world()).map(|r| shard(m, bw, r)).collect()
}
