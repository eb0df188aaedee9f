//! Training on simulated ranks: every rank of the mesh is a thread that runs
//! its own program (`compiler::parallel`) on its shards of the weights, with
//! the in-process communicator between them.
//!
//! A step on a rank: (ZeRO 3: all-gather the weights;) forward and backward
//! over its microbatches, summing gradients; the gradient all-reduce (or
//! ZeRO 2's reduce-scatter) over the data axis in buckets; the
//! squared-norm sums for clipping; the optimizer update of what the rank
//! owns (ZeRO 1+: its flat shard of each data-replicated tensor); ZeRO 1/2's
//! all-gather of the updated weights.
//!
//! The data-parallel rank `d` of `n` takes microbatches `d·m .. (d+1)·m` of
//! the step (m per rank), so a run reproduces the single-device run with the
//! same microbatches. Checkpoints hold logical tensors: [`Ranks::logical`]
//! assembles them from the shards and [`Ranks::new`] cuts them again, under
//! any layout.

use super::optim::OptimizerState;
use crate::comm::{self, Communicator, RankComm, World};
use crate::exec::Interpreter;
use crate::tensor::Tensor;
use std::sync::Mutex;
use tessera_compiler::Model;
use tessera_compiler::autodiff::update::UpdateParam;
use tessera_compiler::driver::Compiled;
use tessera_compiler::ir::ValueId;
use tessera_compiler::model::{Dim, Param};
use tessera_compiler::parallel::{self, Mesh, RankProgram, StepCollective};

/// How long a collective may wait for the other ranks before the step fails.
pub const TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

struct RankState {
    /// Local weights (ZeRO 3: flat shards of the data-replicated ones).
    params: Vec<Tensor<f32>>,
    opt: OptimizerState,
}

/// The simulated ranks of a run.
pub struct Ranks {
    pub mesh: Mesh,
    pub programs: Vec<RankProgram>,
    states: Vec<Mutex<RankState>>,
    /// Microbatches per data-parallel rank and step.
    pub local_micro: u64,
    shapes: Vec<Vec<UpdateParam>>,
    metas: Vec<Vec<Param>>,
}

/// What one rank reports after a step.
pub struct RankStep {
    /// The summed loss of the rank's microbatches (`None` on pipeline stages before the last).
    pub loss_sum: Option<f64>,
    pub grad_norm: f64,
    /// Whether the update was applied (it is not when the norm is not finite).
    pub updated: bool,
    /// The first of the rank's parameters that holds a non-finite value after the step.
    pub nonfinite_param: Option<String>,
}

/// The flat shard `d` of `n` of a tensor's elements (zero-padded to a multiple of n).
pub(crate) fn flat_shard(x: &[f32], n: usize, d: usize) -> Vec<f32> {
    let per = x.len().div_ceil(n);
    (d * per..(d + 1) * per).map(|i| x.get(i).copied().unwrap_or(0.0)).collect()
}

/// Index maps of a shard: for each logical dim, the logical indices held.
fn maps(p: &parallel::ParamShard, logical: &Param) -> Vec<Vec<u64>> {
    logical
        .ty
        .dims
        .iter()
        .enumerate()
        .map(|(i, d)| match p.splits.iter().find(|(pos, _)| *pos == i) {
            Some((_, sp)) => sp.indices.clone(),
            None => (0..d.size).collect(),
        })
        .collect()
}

/// Visit every element of a local tensor with its logical offset.
fn for_each_logical(logical_dims: &[Dim], maps: &[Vec<u64>], mut f: impl FnMut(usize, usize)) {
    let n = logical_dims.len();
    let mut strides = vec![1usize; n];
    for i in (0..n.saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * logical_dims[i + 1].size as usize;
    }
    let total: usize = maps.iter().map(Vec::len).product();
    let mut idx = vec![0usize; n];
    for local in 0..total {
        let off: usize = (0..n).map(|i| maps[i][idx[i]] as usize * strides[i]).sum();
        f(local, off);
        for i in (0..n).rev() {
            idx[i] += 1;
            if idx[i] < maps[i].len() {
                break;
            }
            idx[i] = 0;
        }
    }
}

/// A rank's shard of a logical tensor.
pub fn cut(full: &Tensor<f32>, shard: &parallel::ParamShard, logical: &Param) -> Tensor<f32> {
    let m = maps(shard, logical);
    let mut data = vec![0f32; m.iter().map(Vec::len).product()];
    for_each_logical(&logical.ty.dims, &m, |l, off| data[l] = full.data[off]);
    Tensor { dims: shard.local.ty.dims.clone(), data }
}

pub(crate) fn place(full: &mut Tensor<f32>, local: &[f32], shard: &parallel::ParamShard, logical: &Param) {
    let m = maps(shard, logical);
    for_each_logical(&logical.ty.dims, &m, |l, off| full.data[off] = local[l]);
}

/// The `input` nodes of a chunk's graph that take received gradients, in input order.
fn grad_inputs(g: &tessera_compiler::ir::Graph, first: usize) -> Vec<ValueId> {
    let mut ids: Vec<(usize, ValueId)> = g
        .nodes
        .iter()
        .enumerate()
        .filter_map(|(i, n)| match n.op {
            tessera_compiler::ir::Op::Input { index } if index >= first => Some((index, ValueId(i as u32))),
            _ => None,
        })
        .collect();
    ids.sort();
    ids.into_iter().map(|(_, v)| v).collect()
}

/// What a rank holds of a parameter that lives on other pipeline stages.
fn empty() -> Tensor<f32> {
    Tensor { dims: vec![Dim::new("flat", 0)], data: Vec::new() }
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

impl Ranks {
    /// The driver's programs for every rank (checked there), with the rank's shards of `params`
    /// and of the optimizer state `opt` (logical tensors).
    pub fn new(model: &Model, c: &Compiled, params: &[Tensor<f32>], opt: &OptimizerState) -> Result<Ranks, String> {
        let mesh = c.mesh.clone();
        let programs = c.ranks.clone();
        if programs.len() as u64 != mesh.world() {
            return Err(format!("{} rank programs for a mesh of {} ranks", programs.len(), mesh.world()));
        }
        let dp = mesh.data_axis.as_deref().map(|a| mesh.size(a)).unwrap_or(1);
        let accumulation = model.train.as_ref().map(|t| t.batch).unwrap_or(1) / model.micro_batch.max(1);
        let mut ranks = Ranks {
            local_micro: (accumulation / dp).max(1),
            states: Vec::new(),
            shapes: Vec::new(),
            metas: programs.iter().map(RankProgram::local_params).collect(),
            mesh,
            programs,
        };
        for r in 0..ranks.programs.len() {
            let shapes = ranks.update_shapes(r);
            let mut st = RankState { params: Vec::new(), opt: OptimizerState::for_shapes(&shapes, &opt.optimizer) };
            for (k, p) in model.params.iter().enumerate() {
                let shard = &ranks.programs[r].params[k];
                if !shard.held {
                    st.params.push(empty());
                    st.opt.m[k] = empty();
                    if !st.opt.v.is_empty() {
                        st.opt.v[k] = empty();
                    }
                    continue;
                }
                let local = cut(&params[k], shard, p);
                st.params.push(if ranks.zero_sharded(r, k) && ranks.mesh.zero >= 3 {
                    ranks.to_shard(r, &local)
                } else {
                    local
                });
                st.opt.m[k] = ranks.state_part(r, k, &cut(&opt.m[k], shard, p));
                if !st.opt.v.is_empty() {
                    st.opt.v[k] = ranks.state_part(r, k, &cut(&opt.v[k], shard, p));
                }
            }
            ranks.shapes.push(shapes);
            ranks.states.push(Mutex::new(st));
        }
        Ok(ranks)
    }

    fn data(&self) -> Option<(&str, usize)> {
        self.mesh.data_group().map(|(a, n)| (a, n as usize))
    }

    /// Whether ZeRO shards parameter `k`'s state over the data axis on rank `r`.
    fn zero_sharded(&self, r: usize, k: usize) -> bool {
        self.mesh.zero_sharded(&self.programs[r].params[k])
    }

    fn data_coord(&self, r: usize) -> usize {
        self.mesh.data_coord(r as u64) as usize
    }

    /// Rank `r`'s flat ZeRO shard of a local tensor.
    fn to_shard(&self, r: usize, local: &Tensor<f32>) -> Tensor<f32> {
        let (_, n) = self.data().expect("ZeRO shards over a data axis");
        let data = flat_shard(&local.data, n, self.data_coord(r));
        Tensor { dims: vec![Dim::new("flat", data.len() as u64)], data }
    }

    fn state_part(&self, r: usize, k: usize, local: &Tensor<f32>) -> Tensor<f32> {
        if self.zero_sharded(r, k) { self.to_shard(r, local) } else { local.clone() }
    }

    /// The shapes the update runs on: local tensors, or flat shards under ZeRO.
    fn update_shapes(&self, r: usize) -> Vec<UpdateParam> {
        let p = &self.programs[r];
        (0..p.params.len())
            .map(|k| {
                let local = &p.params[k].local;
                let mut u = UpdateParam::of(local);
                if !p.params[k].held {
                    u.dims = vec![Dim::new("flat", 0)];
                    return u;
                }
                if self.zero_sharded(r, k) {
                    let (_, n) = self.data().expect("sharded");
                    u.dims = vec![Dim::new("flat", local.ty.numel().div_ceil(n as u64))];
                }
                u
            })
            .collect()
    }

    /// The logical weights and optimizer state, assembled from the ranks.
    pub fn logical(&self, model: &Model, opt: &OptimizerState) -> (Vec<Tensor<f32>>, OptimizerState) {
        let mut params: Vec<Tensor<f32>> = model.params.iter().map(|p| Tensor::zeros(&p.ty.dims)).collect();
        let mut out = opt.clone();
        out.m = params.clone();
        if !out.v.is_empty() {
            out.v = params.clone();
        }
        let states: Vec<_> = self.states.iter().map(|s| s.lock().unwrap_or_else(|e| e.into_inner())).collect();
        for r in 0..self.programs.len() {
            for (k, p) in model.params.iter().enumerate() {
                let shard = &self.programs[r].params[k];
                if !shard.held {
                    continue;
                }
                let n = shard.local.ty.numel() as usize;
                // A ZeRO-sharded tensor is whole across the rank's data group.
                let whole = |pick: &dyn Fn(&RankState) -> &Tensor<f32>, sharded: bool| -> Vec<f32> {
                    if !sharded {
                        return pick(&states[r]).data.clone();
                    }
                    let (axis, _) = self.data().expect("sharded");
                    let mut v: Vec<f32> = self
                        .mesh
                        .group(r as u64, axis)
                        .iter()
                        .flat_map(|&m| pick(&states[m as usize]).data.iter().copied())
                        .collect();
                    v.truncate(n);
                    v
                };
                let z = self.zero_sharded(r, k);
                place(&mut params[k], &whole(&|s| &s.params[k], z && self.mesh.zero >= 3), shard, p);
                place(&mut out.m[k], &whole(&|s| &s.opt.m[k], z), shard, p);
                if !out.v.is_empty() {
                    place(&mut out.v[k], &whole(&|s| &s.opt.v[k], z), shard, p);
                }
            }
        }
        (params, out)
    }

    /// One training step on every rank. `inputs(step, k)` is global microbatch `k`.
    pub fn step(
        &self,
        step: u64,
        seed: u64,
        lr: f64,
        clip: Option<f64>,
        inputs: &(dyn Fn(u64) -> Vec<Tensor<f32>> + Sync),
        trace: Option<&crate::trace::Trace>,
    ) -> Result<Vec<RankStep>, String> {
        let world = World::new(self.programs.len(), TIMEOUT);
        let per_rank = (crate::exec::threads() / self.programs.len()).max(1);
        world.run(|local| {
            crate::exec::set_threads(per_rank);
            local.set_step(step);
            let r = local.rank();
            let mut st = self.states[r].lock().map_err(|_| "a rank's state was poisoned by a panic".to_string())?;
            let mut rc = RankComm::new(local, &self.mesh.order);
            rc.trace = trace;
            self.rank_step(r, &mut st, &rc, step, seed, lr, clip, inputs)
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn rank_step<'c>(
        &'c self,
        r: usize,
        st: &mut RankState,
        rc: &'c RankComm<'c>,
        step: u64,
        seed: u64,
        lr: f64,
        clip: Option<f64>,
        inputs: &(dyn Fn(u64) -> Vec<Tensor<f32>> + Sync),
    ) -> Result<RankStep, String> {
        let prog = &self.programs[r];
        let metas = &self.metas[r];
        let nparams = prog.params.len();
        // ZeRO 3: the whole local weights for this step only.
        let gathered;
        let weights: &[Tensor<f32>] = if prog.prologue.is_empty() {
            &st.params
        } else {
            let mut w: Vec<Tensor<f32>> = metas.iter().map(|p| Tensor::zeros(&p.ty.dims)).collect();
            for c in &prog.prologue {
                if let StepCollective::ParamAllGather { axis, params, .. } = c {
                    let shards: Vec<&Tensor<f32>> = params.iter().map(|&k| &st.params[k]).collect();
                    let full = self.gather_shards(rc, axis, &shards)?;
                    for (&k, v) in params.iter().zip(full) {
                        w[k].data = v[..w[k].numel()].to_vec();
                    }
                }
            }
            for (k, wk) in w.iter_mut().enumerate() {
                if !self.zero_sharded(r, k) {
                    *wk = st.params[k].clone();
                }
            }
            gathered = w;
            &gathered
        };
        // Forward and backward over this rank's microbatches.
        let d = self.data_coord(r) as u64;
        let mut loss_sum = 0.0;
        let mut grads: Vec<Tensor<f32>> = Vec::new();
        if let Some(sp) = &prog.stage {
            let mut w = weights.to_vec();
            grads = (0..nparams)
                .map(|k| if prog.params[k].held { Tensor::zeros(&metas[k].ty.dims) } else { empty() })
                .collect();
            let global = |j: u64| inputs(d * self.local_micro + j);
            let dropout = seed ^ (step << 20);
            let loss = self.run_stage(sp, prog, rc, &mut w, &mut grads, &global, dropout)?;
            let last = sp.stage == sp.stages - 1;
            return self.finish_step(r, st, rc, grads, last.then_some(loss), step, lr, clip);
        }
        let interp =
            Interpreter { graph: &prog.graph, params: metas, dropout: Some(seed ^ (step << 20)), comm: Some(rc) };
        let needed: Vec<_> = std::iter::once(prog.loss).chain(prog.param_grads.iter().map(|g| g.grad)).collect();
        for j in 0..self.local_micro {
            let k = d * self.local_micro + j;
            let vals = rc
                .span("compute", format!("forward+backward mb{k}"), || {
                    interp.run_for(&inputs(k), weights, Some(&needed))
                })
                .map_err(err)?;
            loss_sum += vals[prog.loss.index()].data[0] as f64;
            let g = crate::exec::param_grads(metas, &prog.param_grads, &vals);
            if grads.is_empty() {
                grads = g;
            } else {
                for (a, b) in grads.iter_mut().zip(&g) {
                    a.data.iter_mut().zip(&b.data).for_each(|(x, y)| *x += *y);
                }
            }
        }
        self.finish_step(r, st, rc, grads, Some(loss_sum), step, lr, clip)
    }

    /// The step after the microbatches: gradient reduction, clipping, the
    /// update, ZeRO's gathers.
    #[allow(clippy::too_many_arguments)]
    fn finish_step(
        &self,
        r: usize,
        st: &mut RankState,
        rc: &RankComm,
        mut grads: Vec<Tensor<f32>>,
        loss_sum: Option<f64>,
        step: u64,
        lr: f64,
        clip: Option<f64>,
    ) -> Result<RankStep, String> {
        let prog = &self.programs[r];
        let metas = &self.metas[r];
        let nparams = prog.params.len();
        // Gradient reduction over the data axis, bucket by bucket.
        let mut shards: Vec<Option<Tensor<f32>>> = vec![None; nparams];
        for c in &prog.step {
            match c {
                StepCollective::GradAllReduce { axis, params, .. } => {
                    let mut buf: Vec<f32> = params.iter().flat_map(|&k| grads[k].data.iter().copied()).collect();
                    rc.with("grad_all_reduce", axis, |c, g| c.all_reduce(g, &mut buf, comm::ReduceOp::Sum))
                        .map_err(err)?;
                    let mut at = 0;
                    for &k in params {
                        let n = grads[k].numel();
                        grads[k].data.copy_from_slice(&buf[at..at + n]);
                        at += n;
                    }
                }
                StepCollective::GradReduceScatter { axis, params, .. } => {
                    let (_, n) = self.data().expect("a data axis");
                    let mut input = Vec::new();
                    for i in 0..n {
                        for &k in params {
                            input.extend(flat_shard(&grads[k].data, n, i));
                        }
                    }
                    let mut out = vec![0f32; input.len() / n];
                    rc.with("grad_reduce_scatter", axis, |c, g| {
                        c.reduce_scatter(g, &input, &mut out, comm::ReduceOp::Sum)
                    })
                    .map_err(err)?;
                    let mut at = 0;
                    for &k in params {
                        let per = grads[k].numel().div_ceil(n);
                        shards[k] =
                            Some(Tensor { dims: vec![Dim::new("flat", per as u64)], data: out[at..at + per].to_vec() });
                        at += per;
                        grads[k] = Tensor::default();
                    }
                }
                _ => {}
            }
        }
        // The mean over every microbatch of the step.
        let dp = self.data().map(|(_, n)| n).unwrap_or(1) as f32;
        let scale = 1.0 / (dp * self.local_micro as f32);
        let mut upd_grads: Vec<Tensor<f32>> = Vec::with_capacity(nparams);
        for k in 0..nparams {
            let mut g = match shards[k].take() {
                Some(s) => s,
                None if self.zero_sharded(r, k) => self.to_shard(r, &grads[k]),
                None => std::mem::take(&mut grads[k]),
            };
            g.data.iter_mut().for_each(|x| *x *= scale);
            upd_grads.push(g);
        }
        // A parameter read on several pipeline stages: sum its gradients over them, in stage order.
        let mut counted = vec![true; nparams];
        for c in &prog.step {
            if let StepCollective::SharedGradSum { param, stages } = c {
                let sp = prog.stage.as_ref().ok_or("a shared gradient outside a pipeline")?;
                let tag = tessera_compiler::parallel::check::shared_tag(*param);
                let others: Vec<u64> = stages.iter().copied().filter(|&t| t != sp.stage).collect();
                for &t in &others {
                    rc.comm().send(sp.stage_ranks[t as usize] as usize, tag, &upd_grads[*param].data).map_err(err)?;
                }
                let mut parts: Vec<(u64, Vec<f32>)> = vec![(sp.stage, upd_grads[*param].data.clone())];
                for &t in &others {
                    let mut buf = vec![0f32; upd_grads[*param].numel()];
                    rc.comm().recv(sp.stage_ranks[t as usize] as usize, tag, &mut buf).map_err(err)?;
                    parts.push((t, buf));
                }
                parts.sort_by_key(|(t, _)| *t);
                let mut sum = parts[0].1.clone();
                for (_, p) in &parts[1..] {
                    sum.iter_mut().zip(p).for_each(|(a, b)| *a += *b);
                }
                upd_grads[*param].data = sum;
                // Counted once in the norm: on the first stage that reads it.
                counted[*param] = stages.first() == Some(&sp.stage);
            }
        }
        // The global gradient norm: each tensor's squares, summed over the ranks that split it.
        let mut sumsq: Vec<f64> = upd_grads
            .iter()
            .zip(&counted)
            .map(|(g, &c)| if c { g.data.iter().map(|&x| (x as f64) * (x as f64)).sum() } else { 0.0 })
            .collect();
        for c in &prog.step {
            if let StepCollective::NormAllReduce { axes, params } = c {
                let mut buf: Vec<f32> = params.iter().map(|&k| sumsq[k] as f32).collect();
                for axis in axes {
                    rc.with("norm_all_reduce", axis, |c, g| c.all_reduce(g, &mut buf, comm::ReduceOp::Sum))
                        .map_err(err)?;
                }
                for (&k, v) in params.iter().zip(buf) {
                    sumsq[k] = v as f64;
                }
            }
        }
        let total: f64 = sumsq.iter().sum();
        // The update of what this rank owns.
        let mut owned: Vec<Tensor<f32>> = (0..nparams)
            .map(|k| {
                let p = std::mem::take(&mut st.params[k]);
                if self.zero_sharded(r, k) && self.mesh.zero < 3 { self.to_shard(r, &p) } else { p }
            })
            .collect();
        let t = step + 1;
        // A non-finite norm (every rank sees the same global sum) leaves the
        // weights and the optimizer state as they were: the trainer stops, or
        // skips the step when the spec says `nonfinite = skip`.
        let updated = total.is_finite();
        if updated {
            rc.span("update", "optimizer update", || {
                st.opt.update_with(&mut owned, &upd_grads, &self.shapes[r], lr, t, clip, clip.map(|_| total))
            });
        }
        // ZeRO 1/2: every rank gets the updated weights back.
        for c in &prog.step {
            if let StepCollective::ParamAllGather { axis, params, .. } = c {
                let shards: Vec<&Tensor<f32>> = params.iter().map(|&k| &owned[k]).collect();
                let full = self.gather_shards(rc, axis, &shards)?;
                for (&k, v) in params.iter().zip(full) {
                    let dims = metas[k].ty.dims.clone();
                    let n: usize = dims.iter().map(|d| d.size as usize).product();
                    owned[k] = Tensor { dims, data: v[..n].to_vec() };
                }
            }
        }
        let nonfinite_param = owned.iter().position(|p| !p.is_finite()).map(|k| prog.params[k].local.path.clone());
        st.params = owned;
        Ok(RankStep { loss_sum, grad_norm: total.sqrt(), updated, nonfinite_param })
    }

    /// A pipeline stage's schedule: forward and backward passes of its chunks
    /// over the microbatches, activations and their gradients sent between stages.
    #[allow(clippy::too_many_arguments)]
    fn run_stage<'c>(
        &'c self,
        sp: &'c parallel::StageProgram,
        prog: &RankProgram,
        rc: &'c RankComm<'c>,
        w: &mut Vec<Tensor<f32>>,
        grads: &mut [Tensor<f32>],
        inputs: &dyn Fn(u64) -> Vec<Tensor<f32>>,
        dropout: u64,
    ) -> Result<f64, String> {
        use std::collections::HashMap;
        use tessera_compiler::parallel::pipeline::Action;
        let n_model = prog.params.len();
        let mut stash: HashMap<(usize, u64), Vec<Tensor<f32>>> = HashMap::new();
        let mut suspended: HashMap<(usize, u64), crate::exec::Suspended<f32>> = HashMap::new();
        let mut local_fwd: HashMap<(u32, u64, usize), Tensor<f32>> = HashMap::new();
        let mut local_grad: HashMap<(u32, u64, usize), Tensor<f32>> = HashMap::new();
        let mut loss = 0.0;
        let recv = |from: u64, tag: u64, ty: &tessera_compiler::model::TensorType| -> Result<Tensor<f32>, String> {
            let mut t = Tensor::zeros(&ty.dims);
            let from = sp.stage_ranks[from as usize] as usize;
            rc.span("p2p", format!("recv from {from}"), || rc.comm().recv(from, tag, &mut t.data)).map_err(err)?;
            Ok(t)
        };
        let send = |to: u64, tag: u64, t: &Tensor<f32>| -> Result<(), String> {
            let to = sp.stage_ranks[to as usize] as usize;
            rc.span("p2p", format!("send to {to}"), || rc.comm().send(to, tag, &t.data)).map_err(err)
        };
        for action in &sp.schedule {
            match *action {
                Action::Forward { chunk, micro } => {
                    let c = sp.chunk(chunk);
                    let mut bparams = Vec::with_capacity(c.incoming.len());
                    for (j, (v, _, st)) in c.incoming.iter().enumerate() {
                        let t = if *st == sp.stage {
                            local_fwd.remove(&(v.0, micro, chunk)).ok_or("a local activation was not produced")?
                        } else {
                            recv(*st, sp.tag(0, micro, *v), &c.params[n_model + j].ty)?
                        };
                        bparams.push(t);
                    }
                    let mut ins = inputs(micro);
                    let g_at = c.sends_graph();
                    ins.extend(grad_inputs(g_at, c.model_inputs).into_iter().map(|v| Tensor::zeros(&g_at.ty(v).dims)));
                    w.extend(bparams.iter().cloned());
                    let vals = match c.split {
                        // The forward part of the backward program; its values wait for the gradient.
                        Some(k) => {
                            let mut needed: Vec<_> = c.param_grads.iter().map(|g| g.grad).collect();
                            needed.push(c.forward_loss);
                            needed.extend(c.sends.iter().copied());
                            let interp = Interpreter {
                                graph: &c.backward,
                                params: &c.params,
                                dropout: Some(dropout),
                                comm: Some(rc),
                            };
                            let run =
                                rc.span("compute", format!("F{chunk} mb{micro}"), || interp.start(&ins, w, &needed, k));
                            w.truncate(n_model);
                            let run = run.map_err(err)?;
                            let vals = run.values(std::iter::once(c.forward_loss).chain(c.sends.iter().copied()));
                            suspended.insert((chunk, micro), run);
                            vals
                        }
                        None => {
                            let needed: Vec<_> =
                                std::iter::once(c.forward_loss).chain(c.sends.iter().copied()).collect();
                            let interp = Interpreter {
                                graph: &c.forward,
                                params: &c.params,
                                dropout: Some(dropout),
                                comm: Some(rc),
                            };
                            let vals = rc.span("compute", format!("F{chunk} mb{micro}"), || {
                                interp.run_for(&ins, w, Some(&needed))
                            });
                            w.truncate(n_model);
                            let vals = vals.map_err(err)?;
                            std::iter::once(c.forward_loss)
                                .chain(c.sends.iter().copied())
                                .map(|v| (v, vals[v.index()].clone()))
                                .collect()
                        }
                    };
                    let vals: HashMap<ValueId, Tensor<f32>> = vals.into_iter().collect();
                    stash.insert((chunk, micro), bparams);
                    if c.outgoing.is_empty() {
                        loss += vals[&c.forward_loss].data[0] as f64;
                    }
                    for (j, (v, readers)) in c.outgoing.iter().enumerate() {
                        for (rchunk, st) in readers {
                            let t = &vals[&c.sends[j]];
                            if *st == sp.stage {
                                local_fwd.insert((v.0, micro, *rchunk), t.clone());
                            } else {
                                send(*st, sp.tag(0, micro, *v), t)?;
                            }
                        }
                    }
                }
                Action::Backward { chunk, micro } => {
                    let c = sp.chunk(chunk);
                    let mut ins = inputs(micro);
                    for (j, (v, readers)) in c.outgoing.iter().enumerate() {
                        let ty = c.sends_graph().ty(c.sends[j]).clone();
                        let mut sum = Tensor::zeros(&ty.dims);
                        for (rchunk, st) in readers {
                            let t = if *st == sp.stage {
                                local_grad.remove(&(v.0, micro, *rchunk)).ok_or("a local gradient was not produced")?
                            } else {
                                recv(*st, sp.tag(1, micro, *v), &ty)?
                            };
                            sum.data.iter_mut().zip(&t.data).for_each(|(a, b)| *a += *b);
                        }
                        ins.push(sum);
                    }
                    let bparams = stash.remove(&(chunk, micro)).ok_or("a backward pass before its forward")?;
                    w.extend(bparams);
                    let needed: Vec<_> = c.param_grads.iter().map(|g| g.grad).collect();
                    let interp =
                        Interpreter { graph: &c.backward, params: &c.params, dropout: Some(dropout), comm: Some(rc) };
                    let vals = match suspended.remove(&(chunk, micro)) {
                        // Resume on the stashed activations with the gradients that arrived.
                        Some(run) => {
                            let grads_in = grad_inputs(&c.backward, c.model_inputs);
                            let set: Vec<(ValueId, Tensor<f32>)> =
                                grads_in.into_iter().zip(ins.drain(c.model_inputs..)).collect();
                            rc.span("compute", format!("B{chunk} mb{micro}"), || interp.resume(run, set, w))
                        }
                        None => {
                            rc.span("compute", format!("B{chunk} mb{micro}"), || interp.run_for(&ins, w, Some(&needed)))
                        }
                    };
                    w.truncate(n_model);
                    let vals = vals.map_err(err)?;
                    let g = crate::exec::param_grads(&c.params, &c.param_grads, &vals);
                    for (k, gk) in g.iter().enumerate().take(n_model) {
                        if prog.params[k].held && c.param_grads.iter().any(|pg| pg.param == k) {
                            grads[k].data.iter_mut().zip(&gk.data).for_each(|(a, b)| *a += *b);
                        }
                    }
                    for (j, (v, _, st)) in c.incoming.iter().enumerate() {
                        let t = &g[n_model + j];
                        if *st == sp.stage {
                            local_grad.insert((v.0, micro, chunk), t.clone());
                        } else {
                            send(*st, sp.tag(1, micro, *v), t)?;
                        }
                    }
                }
            }
        }
        Ok(loss)
    }

    /// All-gather flat shards over `axis`; each tensor comes back whole (padded).
    fn gather_shards(&self, rc: &RankComm, axis: &str, shards: &[&Tensor<f32>]) -> Result<Vec<Vec<f32>>, String> {
        let input: Vec<f32> = shards.iter().flat_map(|s| s.data.iter().copied()).collect();
        let n = rc.group(axis).map_err(err)?.ranks.len();
        let mut out = vec![0f32; input.len() * n];
        rc.with("param_all_gather", axis, |c, g| c.all_gather(g, &input, &mut out)).map_err(err)?;
        let mut whole: Vec<Vec<f32>> = shards.iter().map(|s| Vec::with_capacity(s.numel() * n)).collect();
        for member in out.chunks(input.len().max(1)) {
            let mut at = 0;
            for (w, s) in whole.iter_mut().zip(shards) {
                w.extend_from_slice(&member[at..at + s.numel()]);
                at += s.numel();
            }
        }
        Ok(whole)
    }
}
