//! The reference interpreter: runs a graph (forward, or forward + backward)
//! node by node on the CPU. It is the numerical oracle later backends are
//! compared with, so it favours clarity; every value is kept.

pub mod attention;
pub mod collective;
pub(crate) mod fast;
pub mod kernels;
pub mod moe;
pub mod padded;
pub mod peak;
pub mod vocab;

use crate::tensor::{Real, Tensor, r};
use kernels as k;
use tessera_compiler::ir::Param;
use tessera_compiler::ir::{Graph, Node, Op, ReduceOp, ValueId};

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("at {value} (`{op}`): {message}")]
pub struct ExecError {
    pub value: ValueId,
    pub op: &'static str,
    pub message: String,
}

thread_local! {
    static THREADS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    static SKIP_EMPTY_SLOTS: std::cell::Cell<bool> = const { std::cell::Cell::new(true) };
}

/// Whether graphs run on this thread compute experts over their filled slots
/// only (`padded`; on by default). Off runs every slot, for comparisons.
pub fn set_skip_empty_slots(on: bool) {
    SKIP_EMPTY_SLOTS.with(|c| c.set(on));
}

/// How many threads kernels started on this thread may use (default: all cores).
pub fn threads() -> usize {
    // `available_parallelism` reads the affinity mask and cgroup files on
    // every call; kernels ask often, so it is read once.
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    match THREADS.with(|c| c.get()) {
        0 => *CORES.get_or_init(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)),
        n => n,
    }
}

/// Limit the kernels run on this thread to `n` threads (a worker of a
/// parallel step sets 1 so that workers do not oversubscribe the cores).
pub fn set_threads(n: usize) {
    THREADS.with(|c| c.set(n));
}

/// Runs graphs of one model.
pub struct Interpreter<'a> {
    pub graph: &'a Graph,
    /// The model's parameter list (to map a layer index to a slice of its stack).
    pub params: &'a [Param],
    /// Training mode with the seed of this step's dropout masks, or `None`:
    /// evaluation and sampling, where dropout is the identity.
    pub dropout: Option<u64>,
    /// The rank's collectives, for per-rank programs of parallel layouts.
    pub comm: Option<&'a crate::comm::RankComm<'a>>,
}

/// The state of a run over a graph's nodes in order.
struct Run<T> {
    vals: Vec<Tensor<T>>,
    /// Padded expert values (`padded`), and whether their empty slots hold their tail yet.
    pads: Vec<Option<padded::Pad<T>>>,
    filled: Vec<bool>,
    /// With `needed`: the node after which each other value is dead.
    /// (A value nothing reads dies where it is made; a needed one never.)
    last_use: Vec<Option<usize>>,
    moved: Vec<Option<Tensor<T>>>,
    attn_grads: std::collections::HashMap<Vec<ValueId>, Vec<Tensor<T>>>,
    times: std::collections::BTreeMap<&'static str, (f64, usize)>,
    profile: bool,
}

impl<T: Real> Run<T> {
    fn new(g: &Graph, moved: Vec<Option<Tensor<T>>>, needed: Option<&[ValueId]>) -> Run<T> {
        let mut last_use: Vec<Option<usize>> = vec![None; g.len()];
        if let Some(keep) = needed {
            for (i, node) in g.nodes.iter().enumerate() {
                last_use[i] = last_use[i].or(Some(i));
                for j in &node.inputs {
                    last_use[j.index()] = Some(i);
                }
            }
            for j in keep {
                if let Some(l) = last_use.get_mut(j.index()) {
                    *l = None;
                }
            }
        }
        Run {
            vals: Vec::with_capacity(g.len()),
            pads: Vec::with_capacity(g.len()),
            filled: Vec::with_capacity(g.len()),
            last_use,
            moved,
            attn_grads: Default::default(),
            times: Default::default(),
            profile: std::env::var_os("TESSERA_PROFILE").is_some(),
        }
    }

    /// Write the tails of padded values still wanted, and report the profile.
    fn finish(mut self, needed: Option<&[ValueId]>) -> Vec<Tensor<T>> {
        for (j, p) in self.pads.iter().enumerate() {
            if let Some(p) = p
                && !self.filled[j]
                && needed.is_none_or(|n| n.contains(&ValueId(j as u32)))
            {
                padded::fill_tail(&mut self.vals[j], p);
            }
        }
        if self.profile {
            let mut rows: Vec<_> = self.times.into_iter().collect();
            rows.sort_by(|a, b| b.1.0.total_cmp(&a.1.0));
            for (op, (t, n)) in rows.iter().take(40) {
                eprintln!("profile {op:<20} {:>9.2} ms  {n:>5} nodes", t * 1e3);
            }
        }
        self.vals
    }
}

/// A run stopped part way ([`Interpreter::start`]): the values the rest of
/// the graph reads (a pipeline stage's stashed activations).
pub struct Suspended<T> {
    run: Run<T>,
    needed: Vec<ValueId>,
}

impl<T: Real> Suspended<T> {
    /// Copies of computed values (their padded tails written).
    pub fn values(&self, ids: impl Iterator<Item = ValueId>) -> Vec<(ValueId, Tensor<T>)> {
        ids.map(|v| {
            let mut t = self.run.vals[v.index()].clone();
            if let Some(p) = &self.run.pads[v.index()]
                && !self.run.filled[v.index()]
            {
                padded::fill_tail(&mut t, p);
            }
            (v, t)
        })
        .collect()
    }
}

/// Full parameter gradients from a backward graph's values: each parameter
/// slice's gradient goes to its place in the stacked parameter.
pub fn param_grads<T: Real>(
    params: &[Param],
    grads: &[tessera_compiler::autodiff::ParamGrad],
    vals: &[Tensor<T>],
) -> Vec<Tensor<T>> {
    let mut out: Vec<Tensor<T>> = params.iter().map(|p| Tensor::zeros(&p.ty.dims)).collect();
    for pg in grads {
        let g = &vals[pg.grad.index()];
        let off = match pg.layer {
            None => 0,
            Some(l) => params[pg.param].layers.iter().position(|&x| x == l).unwrap_or(0) * g.numel(),
        };
        for (d, s) in out[pg.param].data[off..off + g.numel()].iter_mut().zip(&g.data) {
            *d += *s;
        }
    }
    out
}

/// The slice of a stacked parameter tensor that holds `layer`.
pub fn param_slice<T: Real>(meta: &Param, full: &Tensor<T>, layer: Option<u64>) -> Option<Tensor<T>> {
    let Some(l) = layer else { return Some(full.clone()) };
    let pos = meta.layers.iter().position(|&x| x == l)?;
    let dims = full.dims[1..].to_vec();
    let n: usize = dims.iter().map(|d| d.size as usize).product();
    Some(Tensor { dims, data: full.data[pos * n..(pos + 1) * n].to_vec() })
}

/// A binary op one of whose operands dies at it writes into that operand's
/// buffer: over the filled rows when it is padded (`padded::binary_assign`),
/// else the whole tensor (`kernels::binary_assign`). `None` when neither
/// operand dies here or the broadcast has no in-place path.
fn in_place<T: Real>(
    op: tessera_compiler::ir::BinaryOp,
    node: &Node,
    vals: &mut [Tensor<T>],
    pads: &[Option<padded::Pad<T>>],
    dying: impl Fn(ValueId) -> bool,
) -> Option<(Tensor<T>, Option<padded::Pad<T>>)> {
    let [a, b] = node.inputs[..] else { return None };
    let k = [a, b].iter().position(|&x| a != b && dying(x) && vals[x.index()].dims == node.ty.dims)?;
    let (j, other) = ([a, b][k].index(), [a, b][1 - k].index());
    let mut t = std::mem::take(&mut vals[j]);
    let done = match &pads[j] {
        Some(pt) => padded::binary_assign(op, (&mut t, pt), (&vals[other], pads[other].as_ref()), k == 0).map(Some),
        None if pads[other].is_none() => k::binary_assign(op, &mut t, &vals[other], k == 0).then_some(None),
        None => None,
    };
    match done {
        Some(pad) => Some((t, pad)),
        None => {
            vals[j] = t;
            None
        }
    }
}

impl Interpreter<'_> {
    /// Evaluate every node; every returned value is exact.
    pub fn run<T: Real>(&self, inputs: &[Tensor<T>], params: &[Tensor<T>]) -> Result<Vec<Tensor<T>>, ExecError> {
        self.run_for(inputs, params, None)
    }

    /// Evaluate every node. With `needed`, only those values come back: every
    /// other value is freed after its last use (its entry keeps its dims and
    /// no data), so the live set follows the memory plan's liveness, and the
    /// empty expert slots of `[expert, slot, ...]` values are written only
    /// where an op reads them (`padded`).
    pub fn run_for<T: Real>(
        &self,
        inputs: &[Tensor<T>],
        params: &[Tensor<T>],
        needed: Option<&[ValueId]>,
    ) -> Result<Vec<Tensor<T>>, ExecError> {
        self.run_impl(inputs, Vec::new(), params, needed)
    }

    /// `run_for`, with inputs the graph may keep: an input read by one
    /// `input` node moves into the values instead of being copied.
    pub fn run_owned<T: Real>(
        &self,
        inputs: Vec<Tensor<T>>,
        params: &[Tensor<T>],
        needed: Option<&[ValueId]>,
    ) -> Result<Vec<Tensor<T>>, ExecError> {
        let mut readers = vec![0usize; inputs.len()];
        for node in &self.graph.nodes {
            if let Op::Input { index } = node.op
                && index < readers.len()
            {
                readers[index] += 1;
            }
        }
        // Inputs read once move; the rest stay behind to be copied.
        let (mut moved, mut kept) = (Vec::with_capacity(inputs.len()), Vec::with_capacity(inputs.len()));
        for (t, n) in inputs.into_iter().zip(readers) {
            if n == 1 {
                moved.push(Some(t));
                kept.push(Tensor::default());
            } else {
                moved.push(None);
                kept.push(t);
            }
        }
        self.run_impl(&kept, moved, params, needed)
    }

    fn run_impl<T: Real>(
        &self,
        inputs: &[Tensor<T>],
        moved: Vec<Option<Tensor<T>>>,
        params: &[Tensor<T>],
        needed: Option<&[ValueId]>,
    ) -> Result<Vec<Tensor<T>>, ExecError> {
        let mut run = Run::new(self.graph, moved, needed);
        self.run_nodes(&mut run, self.graph.len(), inputs, params)?;
        Ok(run.finish(needed))
    }

    /// Run nodes `0..upto` and keep everything later nodes need: the first
    /// part of a graph whose rest runs later ([`resume`](Self::resume)), as a
    /// pipeline stage runs a chunk's forward pass and, when its gradient
    /// arrives, its backward pass on the stashed activations.
    pub fn start<T: Real>(
        &self,
        inputs: &[Tensor<T>],
        params: &[Tensor<T>],
        needed: &[ValueId],
        upto: usize,
    ) -> Result<Suspended<T>, ExecError> {
        let mut run = Run::new(self.graph, Vec::new(), Some(needed));
        self.run_nodes(&mut run, upto.min(self.graph.len()), inputs, params)?;
        Ok(Suspended { run, needed: needed.to_vec() })
    }

    /// Run the rest of a graph started with [`start`](Self::start), with
    /// the values in `set` replaced first (inputs that only arrive now).
    pub fn resume<T: Real>(
        &self,
        mut s: Suspended<T>,
        set: Vec<(ValueId, Tensor<T>)>,
        params: &[Tensor<T>],
    ) -> Result<Vec<Tensor<T>>, ExecError> {
        for (v, t) in set {
            let slot = s.run.vals.get_mut(v.index()).ok_or_else(|| ExecError {
                value: v,
                op: "resume",
                message: "the value was not computed before the split".into(),
            })?;
            if slot.dims != t.dims {
                return Err(ExecError {
                    value: v,
                    op: "resume",
                    message: format!("dims {:?} for {:?}", t.dims, slot.dims),
                });
            }
            *slot = t;
        }
        self.run_nodes(&mut s.run, self.graph.len(), &[], params)?;
        Ok(s.run.finish(Some(&s.needed)))
    }

    /// Evaluate the nodes from where `run` stopped up to `upto`.
    fn run_nodes<T: Real>(
        &self,
        run: &mut Run<T>,
        upto: usize,
        inputs: &[Tensor<T>],
        params: &[Tensor<T>],
    ) -> Result<(), ExecError> {
        let g = self.graph;
        let skip_empty = SKIP_EMPTY_SLOTS.with(|c| c.get());
        let Run { vals, pads, filled, last_use, moved, attn_grads, times, profile } = run;
        for i in vals.len()..upto {
            let node = &g.nodes[i];
            let t0 = profile.then(std::time::Instant::now);
            let fast = match node.op {
                Op::Input { index } if moved.get(index).is_some_and(Option::is_some) => {
                    moved[index].take().map(|t| (t, None))
                }
                Op::Binary { op } => {
                    let dying = |j: ValueId| last_use[j.index()] == Some(i) && !filled[j.index()];
                    in_place(op, node, vals, pads, dying)
                        .or_else(|| skip_empty.then(|| self.eval_padded(node, vals, pads)).flatten())
                }
                _ if skip_empty => self.eval_padded(node, vals, pads),
                _ => None,
            };
            let (v, pad) = match fast {
                Some(vp) => vp,
                None => {
                    // This op reads whole tensors: write the tails of its padded inputs first.
                    for j in &node.inputs {
                        if let Some(p) = &pads[j.index()]
                            && !filled[j.index()]
                        {
                            padded::fill_tail(&mut vals[j.index()], p);
                            filled[j.index()] = true;
                        }
                    }
                    (self.eval_node(node, i, vals, inputs, params, attn_grads)?, None)
                }
            };
            pads.push(pad);
            filled.push(false);
            let out = &node.ty.dims;
            let id = ValueId(i as u32);
            let fail = |m: String| ExecError { value: id, op: node.op.name(), message: m };
            if v.dims != *out {
                return Err(fail(format!("kernel produced dims {:?}, the node says {}", v.dims, node.ty)));
            }
            if let Some(t0) = t0 {
                let e = times.entry(node.op.name()).or_default();
                e.0 += t0.elapsed().as_secs_f64();
                e.1 += 1;
            }
            vals.push(v);
            for j in node.inputs.iter().map(|j| j.index()).chain([i]) {
                if last_use[j] == Some(i) {
                    vals[j].data = Vec::new();
                    pads[j] = None;
                }
            }
        }
        Ok(())
    }

    /// A node on the filled-slot path (`padded`), when an input carries a pad
    /// (or the node is where pads start) and the shapes are ones it handles.
    fn eval_padded<T: Real>(
        &self,
        node: &Node,
        vals: &[Tensor<T>],
        pads: &[Option<padded::Pad<T>>],
    ) -> Option<(Tensor<T>, Option<padded::Pad<T>>)> {
        let a = |j: usize| &vals[node.inputs[j].index()];
        let p = |j: usize| pads.get(node.inputs.get(j)?.index())?.as_ref();
        let out = &node.ty.dims;
        let padded = |r: Option<(Tensor<T>, padded::Pad<T>)>| r.map(|(t, p)| (t, Some(p)));
        match &node.op {
            Op::Dispatch | Op::CombineGradY if out.len() >= 2 => {
                let counts = moe::slot_counts(a(0).view(), out[1].size as usize, out[0].size as usize);
                let t = if matches!(node.op, Op::Dispatch) {
                    moe::dispatch(a(0).view(), a(1).view(), out)
                } else {
                    moe::combine_grad_y(a(0).view(), a(1).view(), out)
                };
                Some((t, Some(padded::dispatched(counts, out))))
            }
            Op::Unary { op } => padded(padded::unary(*op, a(0), p(0)?)),
            Op::UnaryGrad { op } => padded(padded::unary_grad(*op, (a(0), p(0)?), (a(1), p(1)?))),
            Op::Binary { op } if p(0).is_some() || p(1).is_some() => {
                padded(padded::binary(*op, (a(0), p(0)), (a(1), p(1)), out))
            }
            Op::MatMul { .. } | Op::Einsum => match (p(0), p(1)) {
                (Some(pa), Some(pb)) => padded::contract_slots((a(0), pa), (a(1), pb), out).map(|t| (t, None)),
                (Some(pa), None) => padded(padded::matmul_rows(a(0), pa, a(1), out)),
                _ => None,
            },
            Op::Reduce { op: ReduceOp::Sum, .. } => padded::sum_slots(a(0), p(0)?, out).map(|t| (t, None)),
            _ => None,
        }
    }

    /// Evaluate one node, given the values of every earlier node.
    pub fn eval_node<T: Real>(
        &self,
        node: &Node,
        i: usize,
        vals: &[Tensor<T>],
        inputs: &[Tensor<T>],
        params: &[Tensor<T>],
        attn_grads: &mut std::collections::HashMap<Vec<ValueId>, Vec<Tensor<T>>>,
    ) -> Result<Tensor<T>, ExecError> {
        let id = ValueId(i as u32);
        let fail = |m: String| ExecError { value: id, op: node.op.name(), message: m };
        let a = |j: usize| &vals[node.inputs[j].index()];
        // Attention over its operands' views (`Attn::of` says which is which).
        let attn = |forward: usize| {
            let views: Vec<crate::tensor::View<T>> = node.inputs.iter().map(|v| vals[v.index()].view()).collect();
            attention::Attn::of(&node.op, &views, self.dropout, forward).map(|at| (at, views))
        };
        let out = &node.ty.dims;
        let v: Tensor<T> = match &node.op {
            Op::AllReduce { .. } | Op::AllGather { .. } | Op::ReduceScatter { .. } | Op::AllToAll { .. } => {
                let c = self.comm.ok_or_else(|| {
                    fail("a collective op needs a communicator: run the per-rank program on ranks".into())
                })?;
                match &node.op {
                    Op::AllReduce { axis, op } => collective::all_reduce(c, a(0), axis, *op),
                    Op::AllGather { axis, dim } => collective::all_gather(c, a(0), axis, dim),
                    Op::ReduceScatter { axis, dim } => collective::reduce_scatter(c, a(0), axis, dim),
                    Op::AllToAll { axis, split, concat, chunks } => {
                        collective::all_to_all(c, a(0), axis, split, concat, chunks)
                    }
                    _ => unreachable!("matched above"),
                }
                .map_err(fail)?
            }
            Op::Select { dim, indices } => collective::select(a(0), dim, indices).map_err(fail)?,
            Op::EmbedRows { start } => vocab::embed_rows(a(0), a(1), *start, out),
            Op::EmbedGradRows { start } => vocab::embed_grad_rows(a(0), a(1), *start, out),
            Op::TargetLogit { start } => vocab::target_logit(a(0), a(1), *start),
            Op::CrossEntropyGradRows { start } => {
                let g = a(4).data.first().copied().unwrap_or_else(T::zero);
                vocab::cross_entropy_grad(a(0), a(1), a(2), a(3), g, *start)
            }
            Op::Input { index } => {
                let t = inputs.get(*index).ok_or_else(|| fail(format!("input {index} was not given")))?;
                if t.dims != *out {
                    return Err(fail(format!("input {index} has dims {:?}, expected {}", t.dims, node.ty)));
                }
                t.clone()
            }
            Op::Param { index, layer } => {
                let meta = self.params.get(*index).ok_or_else(|| fail(format!("no parameter {index}")))?;
                let full = params.get(*index).ok_or_else(|| fail(format!("parameter {} was not given", meta.path)))?;
                param_slice(meta, full, *layer).ok_or_else(|| fail(format!("{} has no layer {layer:?}", meta.path)))?
            }
            Op::Scalar { value } => Tensor::scalar(r(*value)),
            // The evaluator scales no loss.
            Op::LossScale => Tensor::scalar(r(1.0)),
            Op::Unary { op } => k::unary(*op, a(0)),
            Op::UnaryGrad { op } => k::unary_grad(*op, a(0), a(1)),
            Op::Binary { op } => k::binary(*op, a(0), a(1), out),
            Op::Pow { exp } => Tensor { dims: out.clone(), data: a(0).data.iter().map(|x| x.powf(r(*exp))).collect() },
            Op::MatMul { .. } | Op::Einsum => k::einsum(a(0), a(1), out),
            Op::Reduce { op, dims } => {
                let s = a(0).sum_over(dims);
                match op {
                    ReduceOp::Sum => s,
                    ReduceOp::Mean => {
                        let n = (a(0).numel() / s.numel().max(1)) as f64;
                        Tensor { dims: s.dims, data: s.data.iter().map(|x| *x / r(n)).collect() }
                    }
                    ReduceOp::Max => {
                        let names: Vec<&str> = dims.iter().map(String::as_str).collect();
                        let p = a(0).move_last(&names);
                        let n = p.numel() / s.numel().max(1);
                        let data = p
                            .data
                            .chunks(n.max(1))
                            .map(|c| c.iter().copied().fold(T::neg_infinity(), T::max))
                            .collect();
                        Tensor { dims: s.dims, data }
                    }
                }
            }
            Op::Expand => a(0).expand(out),
            Op::Sinusoid => k::sinusoid(out),
            Op::Iota { offset, .. } => Tensor::from_fn(out, |k| r((offset + k as u64) as f64)),
            Op::Compare { op } => k::compare(*op, a(0), a(1), out),
            Op::Where => k::select_where(a(0), a(1), a(2), out),
            Op::Argmax { dim } => k::argmax(a(0), dim, out),
            Op::Unfold { windows, fill } => k::unfold(a(0), windows, r(*fill), out),
            Op::Fold { windows } => k::fold(a(0), windows, out),
            Op::Gather { dim } => k::gather(a(0), a(1), dim, out).map_err(fail)?,
            Op::GatherGrad { dim } => k::gather_grad(a(0), a(1), dim, out).map_err(fail)?,
            Op::AmaxGrad { dims } => k::amax_grad(a(0), a(1), a(2), dims),
            Op::Softmax { dim, log } => k::softmax(a(0), dim, *log),
            Op::SoftmaxGrad { dim, log } => k::softmax_grad(a(0), a(1), dim, *log),
            Op::LayerNorm { dim, eps, gain, bias } => {
                let gn = gain.then(|| a(1));
                let bs = bias.then(|| a(1 + usize::from(*gain)));
                k::norm(a(0), dim, *eps, false, gn, bs)
            }
            Op::RmsNorm { dim, eps, gain } => k::norm(a(0), dim, *eps, true, gain.then(|| a(1)), None),
            Op::NormGradX { dim, eps, gain, rms } => {
                let gv = if *gain { a(2) } else { a(1) };
                k::norm_grad_x(a(0), gain.then(|| a(1)), gv, dim, *eps, *rms)
            }
            Op::NormGradGain { dim, eps, rms } => k::norm_grad_gain(a(0), a(1), dim, *eps, *rms),
            Op::Embed => k::embed(a(0).view(), a(1).view(), out).map_err(fail)?,
            Op::EmbedGrad => k::embed_grad(a(0), a(1), out),
            Op::Take { dim, index } => k::take(a(0), dim, *index as usize, out),
            Op::Untake { dim, indices } => {
                let parts: Vec<&Tensor<T>> = node.inputs.iter().map(|v| &vals[v.index()]).collect();
                k::untake(&parts, dim, indices, out)
            }
            Op::Slice { dim, start, to } => k::slice(a(0), dim, *start as usize, to, out),
            Op::SplitDim { .. } | Op::MergeDims { .. } | Op::Rename { .. } => {
                Tensor { dims: out.clone(), data: a(0).data.clone() }
            }
            Op::Permute => a(0).permute(out),
            Op::Concat { over, into } => {
                let parts: Vec<&Tensor<T>> = node.inputs.iter().map(|v| &vals[v.index()]).collect();
                k::concat(&parts, over, into, out)
            }
            Op::Dropout { p } | Op::DropoutGrad { p, .. } => {
                let node_id = match &node.op {
                    Op::DropoutGrad { forward, .. } => forward.0 as u64,
                    _ => i as u64,
                };
                match self.dropout {
                    Some(seed) if *p > 0.0 => k::dropout(a(0), *p, seed, node_id),
                    _ => a(0).clone(),
                }
            }
            Op::Attention { .. } => attn(i).expect("an attention").0.forward(out),
            Op::AttentionGrad { which, forward, .. } => {
                // One pass computes every operand's gradient; the nodes share it.
                let key = node.inputs.clone();
                if !attn_grads.contains_key(&key) {
                    let (at, views) = attn(forward.index()).expect("an attention's gradient");
                    let grads = at.backward(views[views.len() - 1]);
                    attn_grads.insert(key.clone(), grads);
                }
                // Each of dq, dk, dv is read once: move it out.
                std::mem::take(&mut attn_grads.get_mut(&key).expect("computed above")[*which as usize])
            }
            Op::CrossEntropy { label_smoothing, ignore } => {
                Tensor::scalar(k::cross_entropy(a(0).view(), a(1).view(), *label_smoothing, *ignore))
            }
            Op::CrossEntropyGrad { label_smoothing, ignore } => {
                k::cross_entropy_grad(a(0).view(), a(1).view(), a(2).data[0], *label_smoothing, *ignore)
            }
            Op::Cast { dtype } => {
                use tessera_compiler::ir::DType;
                // The value the narrower dtype holds, as a T again.
                let to = |x: T| -> T {
                    let f = x.to_f64().unwrap_or(f64::NAN);
                    r(match dtype {
                        // The widest dtype a program stores (the f64 oracle keeps its own).
                        DType::F32 => f,
                        DType::Bf16 => half::bf16::from_f64(f).to_f64(),
                        DType::F16 => half::f16::from_f64(f).to_f64(),
                        DType::I32 | DType::I64 => f.trunc(),
                        DType::Bool => (f != 0.0) as u8 as f64,
                    })
                };
                Tensor { dims: a(0).dims.clone(), data: a(0).data.iter().map(|&x| to(x)).collect() }
            }
            Op::Patches { size } => k::patches(a(0), *size as usize, out),
            Op::Rope { theta, fraction } => k::rope(a(0), *theta, *fraction, false, 0),
            Op::AdamMoment { beta, square } => {
                let (b, s) = (r::<T>(*beta), a(2).data[0]);
                let one_minus = T::one() - b;
                let (m, g) = (&a(0).data, &a(1).data);
                let mut data = vec![T::zero(); m.len()];
                let row = (m.len() / 64).max(1);
                fast::par_rows(&mut data, row, |first, o| {
                    let at = first * row;
                    for ((o, m), g) in o.iter_mut().zip(&m[at..]).zip(&g[at..]) {
                        let g = *g * s;
                        *o = b * *m + one_minus * if *square { g * g } else { g };
                    }
                });
                Tensor { dims: out.clone(), data }
            }
            Op::AdamStep { eps, weight_decay } => {
                let h = &a(3).data;
                let (lr, bc1, bc2) = (h[0], h[1], h[2]);
                let (eps, wd) = (r::<T>(*eps), r::<T>(*weight_decay));
                let (w, m, v) = (&a(0).data, &a(1).data, &a(2).data);
                let mut data = vec![T::zero(); w.len()];
                let row = (w.len() / 64).max(1);
                fast::par_rows(&mut data, row, |first, o| {
                    let at = first * row;
                    for (((o, w), m), v) in o.iter_mut().zip(&w[at..]).zip(&m[at..]).zip(&v[at..]) {
                        *o = *w - lr * ((*m / bc1) / ((*v / bc2).sqrt() + eps) + wd * *w);
                    }
                });
                Tensor { dims: out.clone(), data }
            }
            Op::ClipScale { clip } => {
                let norm = a(0).data[0].to_f64().unwrap_or(0.0).sqrt();
                Tensor::scalar(r(if norm > *clip && norm > 0.0 { clip / norm } else { 1.0 }))
            }
            Op::RopeGrad { theta, fraction } => k::rope(a(0), *theta, *fraction, true, 0),
            Op::TopK { k, slots, .. } => moe::top_k(a(0), *k as usize, *slots as usize),
            Op::GateMask => moe::gate_mask(a(0), a(1)),
            Op::Dispatch => moe::dispatch(a(0).view(), a(1).view(), out),
            Op::DispatchGrad => moe::dispatch_grad(a(0).view(), a(1).view(), out),
            Op::Combine => moe::combine(a(0).view(), a(1).view(), out),
            Op::CombineGradY => moe::combine_grad_y(a(0).view(), a(1).view(), out),
            Op::CombineGradGates => moe::combine_grad_gates(a(0).view(), a(1).view(), a(2).view()),
            Op::LoadBalance => Tensor::scalar(moe::load_balance(a(0), a(1))),
            Op::LoadBalanceGrad => moe::load_balance_grad(a(0), a(1), a(2).data[0]),
            Op::ZLoss => Tensor::scalar(moe::z_loss(a(0))),
            Op::ZLossGrad => moe::z_loss_grad(a(0), a(1).data[0]),
        };
        Ok(v)
    }
}
