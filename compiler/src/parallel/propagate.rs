//! Sharding propagation: one source graph (a training step, or a pipeline
//! chunk's forward or backward) rewritten for one rank, every value given a
//! sharding and the collectives its ops need inserted. It reads the mesh
//! and the parameters' shards; it never decides a layout.

use super::{Mesh, ParallelError, ParamShard, Split, err, with_size};
use crate::autodiff::{Backward, ParamGrad};
use crate::ir::{BinaryOp, Graph, Op, ReduceOp, ValueId};
use crate::model::{Dim, Param, TensorType};
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// The sharding of one value on one rank.
#[derive(Debug, Clone, Default, PartialEq)]
struct State {
    split: BTreeMap<String, Split>,
    partial: BTreeSet<String>,
}

/// Which inputs of an op may stay partial sums (the op is linear in them).
enum Linear {
    /// None: every input is reduced first.
    No,
    /// Linear in all inputs jointly (a sum): partial when all are, with the same axes.
    Joint,
    /// Linear in each of these inputs with the others fixed: at most one partial.
    Each(Vec<usize>),
}

fn linearity(op: &Op, n: usize) -> Linear {
    use Linear::*;
    match op {
        Op::Binary { op: BinaryOp::Add | BinaryOp::Sub } | Op::Concat { .. } | Op::Untake { .. } => Joint,
        Op::Binary { op: BinaryOp::Mul } | Op::MatMul { .. } | Op::Einsum => Each(vec![0, 1]),
        Op::Binary { op: BinaryOp::Div } => Each(vec![0]),
        Op::Gather { .. } | Op::GatherGrad { .. } | Op::Unfold { .. } | Op::Fold { .. } => Each(vec![0]),
        Op::Unary { op: crate::ir::UnaryOp::Neg }
        | Op::Cast { .. }
        | Op::Expand
        | Op::Rename { .. }
        | Op::Permute
        | Op::Take { .. }
        | Op::Slice { .. }
        | Op::SplitDim { .. }
        | Op::MergeDims { .. }
        | Op::Dropout { .. }
        | Op::DropoutGrad { .. }
        | Op::RopeGrad { .. }
        | Op::GateMask
        | Op::Reduce { op: ReduceOp::Sum | ReduceOp::Mean, .. } => Each(vec![0]),
        Op::UnaryGrad { .. }
        | Op::SoftmaxGrad { .. }
        | Op::NormGradGain { .. }
        | Op::EmbedGrad
        | Op::ZLossGrad
        | Op::Dispatch
        | Op::Combine
        | Op::DispatchGrad
        | Op::CombineGradY => Each(vec![1]),
        Op::CombineGradGates => Each(vec![1, 2]),
        Op::CrossEntropyGrad { .. } | Op::AmaxGrad { .. } | Op::LoadBalanceGrad => Each(vec![2]),
        Op::NormGradX { .. } | Op::AttentionGrad { .. } => Each(vec![n - 1]),
        _ => No,
    }
}

/// Whether input `pos` (of type `ty`) of `op` must hold dim `d` whole.
fn needs_whole(op: &Op, pos: usize, tys: &[&TensorType], d: &str) -> bool {
    let heads = |t: &TensorType| t.dims.len() >= 2 && t.dims[t.dims.len() - 2].name == d;
    match op {
        Op::Unary { .. }
        | Op::Binary { .. }
        | Op::Pow { .. }
        | Op::Cast { .. }
        | Op::Expand
        | Op::Permute
        | Op::Rename { .. }
        | Op::GateMask
        | Op::UnaryGrad { .. }
        | Op::MatMul { .. }
        | Op::Einsum
        | Op::EmbedGrad
        | Op::Reduce { op: ReduceOp::Sum, .. }
        | Op::Compare { .. }
        | Op::Where => false,
        Op::Argmax { dim } => dim == d,
        // The positions index `dim` of the operand (input 0); the indices' own dims may be split.
        Op::Gather { dim } => pos == 0 && dim == d,
        Op::GatherGrad { .. } => false,
        // Windows slide over the spatial dims (and come back to them); channels and batch may be split.
        Op::Unfold { windows, .. } => windows.over.iter().any(|x| x == d),
        Op::Fold { windows } => windows.into.iter().chain(&windows.window).any(|x| x == d),
        Op::Reduce { dims, .. } | Op::MergeDims { dims, .. } => dims.iter().any(|x| x == d),
        Op::Softmax { dim, .. }
        | Op::SoftmaxGrad { dim, .. }
        | Op::LayerNorm { dim, .. }
        | Op::RmsNorm { dim, .. }
        | Op::NormGradX { dim, .. }
        | Op::NormGradGain { dim, .. }
        | Op::Take { dim, .. }
        | Op::Slice { dim, .. }
        | Op::Untake { dim, .. }
        | Op::SplitDim { dim, .. } => dim == d,
        Op::Concat { over, .. } => over.iter().any(|x| x == d),
        // Dropout masks are drawn per element: keep them whole unless inactive.
        Op::Dropout { p } | Op::DropoutGrad { p, .. } => *p > 0.0,
        // Attention and rotary embeddings are per head: heads may be split.
        Op::Attention { .. } | Op::AttentionGrad { .. } | Op::Rope { .. } | Op::RopeGrad { .. } => {
            !tys.iter().take(3).any(|t| heads(t)) || (pos < 3 && !heads(tys[pos]) && tys[pos].has(d))
        }
        Op::Embed => pos == 0,
        _ => true,
    }
}

struct Shard<'a> {
    mesh: &'a Mesh,
    rank: u64,
    src: &'a Graph,
    g: Graph,
    /// Each source value's local value and sharding.
    vals: Vec<(ValueId, State)>,
    /// Collectives and cuts already applied to local values, by (local value, key).
    done: HashMap<(ValueId, String), (ValueId, State)>,
    /// Vocabulary-parallel cross-entropies: source logits → (max, sum of exponentials).
    ce: HashMap<usize, (ValueId, ValueId)>,
    span: crate::syntax::span::Span,
    /// Dims that hold the data-parallel group's whole batch: made by
    /// renaming `batch` (a contrastive loss's other side), gathered over the
    /// data axis.
    gathered: BTreeSet<String>,
    /// The source's forward part ends at the loss; later nodes are the backward pass.
    loss: usize,
    /// The source's `expand`s that carry a sum's or mean's gradient back.
    reduce_grads: &'a BTreeMap<usize, ReduceOp>,
}

impl Shard<'_> {
    /// `rename` across the batch under data parallelism: the global batch's
    /// meaning kept (the checker refuses every other op that mixes
    /// examples). Renaming `batch` away gathers it over the data axis, so
    /// every rank relates its examples to the whole group's, as CLIP's
    /// training does; in the backward pass, renaming such a dim back to
    /// `batch` sums every rank's contribution to each example's gradient
    /// and keeps this rank's rows (reduce-scatter), and in the forward
    /// pass it keeps this rank's rows. `None` for any other rename.
    fn batch_rename(&mut self, i: usize) -> Result<Option<(ValueId, State)>, ParallelError> {
        let node = &self.src.nodes[i];
        let Op::Rename { from, to } = &node.op else { return Ok(None) };
        let Some(axis) = self.mesh.data_axis.clone().filter(|a| self.mesh.size(a) > 1) else { return Ok(None) };
        // Which case, decided before any collective is issued for the input.
        let gather = from.iter().any(|d| d == "batch");
        let back = to.iter().position(|d| d == "batch").map(|k| from[k].clone()).filter(|d| self.gathered.contains(d));
        let split = &self.vals[node.inputs[0].index()].1.split;
        if (!gather && back.is_none()) || from.iter().any(|d| split.contains_key(d)) {
            return Ok(None);
        }
        let (from, to) = (from.clone(), to.clone());
        let n = self.mesh.size(&axis);
        let (x, st) = self.reduced(node.inputs[0])?;
        let ty = self.g.ty(x).clone();
        let x = match back {
            None => {
                let local = ty.dim("batch").map_or(0, |d| d.size);
                let out = with_size(&ty, "batch", local * n);
                let k = from.iter().position(|d| d == "batch").expect("gathering renames batch");
                self.gathered.insert(to[k].clone());
                self.push(Op::AllGather { axis, dim: "batch".into() }, vec![x], out)
            }
            Some(d) => {
                let whole = ty.dim(&d).map_or(0, |x| x.size);
                let local = with_size(&ty, &d, whole / n);
                if i > self.loss {
                    self.push(Op::ReduceScatter { axis, dim: d }, vec![x], local)
                } else {
                    let c = self.coord(&axis);
                    let rows = (c * (whole / n)..(c + 1) * (whole / n)).collect();
                    self.push(Op::Select { dim: d, indices: rows }, vec![x], local)
                }
            }
        };
        let src = self.g.ty(x).clone();
        let dims = src
            .dims
            .iter()
            .map(|d| match from.iter().position(|f| *f == d.name) {
                Some(k) => Dim::new(&to[k], d.size),
                None => d.clone(),
            })
            .collect();
        let out = TensorType::new(src.dtype, dims);
        Ok(Some((self.push(Op::Rename { from, to }, vec![x], out), st)))
    }

    /// Batch statistics under data parallelism, as SyncBatchNorm computes
    /// them: a forward sum or mean over `batch` that keeps other dims means
    /// the data-parallel group's whole batch, so each rank's statistic is
    /// all-reduced over the data axis (a mean of equal-sized parts is the
    /// mean of the whole); its gradient, which the backward pass expands
    /// over the batch again, is each rank's examples' share and is
    /// all-reduced alike before it is. `Some((axis, op))` for either node.
    /// (The checker refuses batch statistics under gradient accumulation
    /// and pipelines, where a rank's microbatch is not its whole batch.)
    fn batch_statistic(&self, i: usize) -> Option<(String, ReduceOp)> {
        let axis = self.mesh.data_axis.clone().filter(|a| self.mesh.size(a) > 1)?;
        let node = &self.src.nodes[i];
        let (op, stat) = match &node.op {
            Op::Reduce { op: op @ (ReduceOp::Sum | ReduceOp::Mean), dims } if i <= self.loss => {
                (*op, dims.iter().any(|d| d == "batch") && !node.ty.dims.is_empty())
            }
            Op::Expand if i > self.loss => {
                let x = self.src.ty(node.inputs[0]);
                let op = *self.reduce_grads.get(&i)?;
                (op, node.ty.has("batch") && !x.has("batch") && !x.dims.is_empty())
            }
            _ => return None,
        };
        stat.then_some((axis, op))
    }

    fn push(&mut self, op: Op, ins: Vec<ValueId>, ty: TensorType) -> ValueId {
        self.g.push(op, ins, ty, self.span)
    }

    fn coord(&self, axis: &str) -> u64 {
        self.mesh.coord(self.rank, axis)
    }

    /// Reduce every partial axis of a local value (`reduce_scatter` over `seq`
    /// on the tensor axis with sequence parallelism).
    fn reduce(&mut self, v: ValueId, st: State) -> Result<(ValueId, State), ParallelError> {
        if st.partial.is_empty() {
            return Ok((v, st));
        }
        let key = (v, "reduce".to_string());
        if let Some(r) = self.done.get(&key) {
            return Ok(r.clone());
        }
        let r = self.reduce_now(v, st)?;
        self.done.insert(key, r.clone());
        Ok(r)
    }

    fn reduce_now(&mut self, v: ValueId, mut st: State) -> Result<(ValueId, State), ParallelError> {
        let mut v = v;
        for axis in std::mem::take(&mut st.partial) {
            let ty = self.g.ty(v).clone();
            let sp_seq = self.mesh.sequence_parallel
                && Some(axis.as_str()) == self.mesh.tensor_axis()
                && ty.has("seq")
                && !st.split.contains_key("seq")
                && !st.split.values().any(|s| s.axis == axis);
            if sp_seq {
                let n = self.mesh.size(&axis);
                let seq = ty.dim("seq").expect("checked").size;
                if seq.is_multiple_of(n) {
                    let local = with_size(&ty, "seq", seq / n);
                    v = self.push(Op::ReduceScatter { axis: axis.clone(), dim: "seq".into() }, vec![v], local);
                    let c = self.coord(&axis);
                    st.split.insert(
                        "seq".into(),
                        Split {
                            axis: axis.clone(),
                            indices: (c * seq / n..(c + 1) * seq / n).collect(),
                            exchanged: None,
                        },
                    );
                    continue;
                }
            }
            v = self.push(Op::AllReduce { axis, op: ReduceOp::Sum }, vec![v], ty);
        }
        Ok((v, st))
    }

    /// Make dim `d` whole.
    fn gather(&mut self, v: ValueId, st: State, d: &str) -> Result<(ValueId, State), ParallelError> {
        if !st.split.contains_key(d) {
            return Ok((v, st));
        }
        let key = (v, format!("gather {d}"));
        if let Some(r) = self.done.get(&key) {
            return Ok(r.clone());
        }
        let r = self.gather_now(v, st, d)?;
        self.done.insert(key, r.clone());
        Ok(r)
    }

    fn gather_now(&mut self, v: ValueId, mut st: State, d: &str) -> Result<(ValueId, State), ParallelError> {
        let Some(sp) = st.split.remove(d) else { return Ok((v, st)) };
        if st.partial.contains(&sp.axis) {
            return err(format!("internal: `{d}` is split and partial over `{}`", sp.axis));
        }
        let n = self.mesh.size(&sp.axis);
        let ty = self.g.ty(v).clone();
        let local = ty.dim(d).map(|x| x.size).unwrap_or(0);
        let (mut v, order) = match &sp.exchanged {
            None => {
                let out = with_size(&ty, d, local * n);
                let order: Vec<u64> = (0..n).flat_map(|c| self.mesh.held(d, local * n, &sp.axis, c)).collect();
                (self.push(Op::AllGather { axis: sp.axis.clone(), dim: d.into() }, vec![v], out), order)
            }
            Some(concat) => {
                // Send each rank its tokens back; experts come home from every rank.
                let slots = ty.dim(concat).map(|x| x.size).unwrap_or(0);
                if !slots.is_multiple_of(n) {
                    return err(format!("internal: `{concat}` of {slots} does not split over {n} ranks"));
                }
                let per = slots / n;
                let chunks: Vec<Vec<u64>> = (0..n).map(|j| (j * per..(j + 1) * per).collect()).collect();
                let out = with_size(&with_size(&ty, concat, per), d, local * n);
                let order: Vec<u64> = (0..n).flat_map(|c| self.mesh.held(d, local * n, &sp.axis, c)).collect();
                let op = Op::AllToAll { axis: sp.axis.clone(), split: concat.clone(), concat: d.into(), chunks };
                (self.push(op, vec![v], out), order)
            }
        };
        if order.iter().enumerate().any(|(i, &x)| i as u64 != x) {
            // Back to logical order: position of each logical index in the gathered order.
            let mut inv = vec![0u64; order.len()];
            for (pos, &x) in order.iter().enumerate() {
                inv[x as usize] = pos as u64;
            }
            let ty = self.g.ty(v).clone();
            v = self.push(Op::Select { dim: d.into(), indices: inv }, vec![v], ty);
        }
        Ok((v, st))
    }

    /// Cut a whole dim `d` down to `sp` (free for a value every rank holds;
    /// an all-to-all when the split exchanges tokens).
    fn localize(&mut self, v: ValueId, st: State, d: &str, sp: &Split) -> Result<(ValueId, State), ParallelError> {
        let key = (v, format!("cut {d} {} {:?} {:?}", sp.axis, sp.indices, sp.exchanged));
        if let Some(r) = self.done.get(&key) {
            return Ok(r.clone());
        }
        let r = self.localize_now(v, st, d, sp)?;
        self.done.insert(key, r.clone());
        Ok(r)
    }

    fn localize_now(
        &mut self,
        v: ValueId,
        mut st: State,
        d: &str,
        sp: &Split,
    ) -> Result<(ValueId, State), ParallelError> {
        let ty = self.g.ty(v).clone();
        let v = match &sp.exchanged {
            Some(concat) if ty.has(concat) => {
                let n = self.mesh.size(&sp.axis);
                let size = ty.dim(d).map(|x| x.size).unwrap_or(0);
                let chunks: Vec<Vec<u64>> = (0..n).map(|c| self.mesh.held(d, size, &sp.axis, c)).collect();
                let slots = ty.dim(concat).map(|x| x.size).unwrap_or(0);
                let out = with_size(&with_size(&ty, d, sp.indices.len() as u64), concat, slots * n);
                let op = Op::AllToAll { axis: sp.axis.clone(), split: d.into(), concat: concat.clone(), chunks };
                self.push(op, vec![v], out)
            }
            _ => {
                let out = with_size(&ty, d, sp.indices.len() as u64);
                self.push(Op::Select { dim: d.into(), indices: sp.indices.clone() }, vec![v], out)
            }
        };
        st.split.insert(d.into(), sp.clone());
        Ok((v, st))
    }

    /// Source value `x` made whole in every dim and not partial (the
    /// collectives are memoized on local values, so asking twice is free).
    fn whole(&mut self, x: ValueId) -> Result<(ValueId, State), ParallelError> {
        let (mut v, mut st) = self.reduced(x)?;
        let dims: Vec<String> = st.split.keys().cloned().collect();
        for d in dims {
            (v, st) = self.gather(v, st, &d)?;
        }
        Ok((v, st))
    }

    /// Source value `x` with its partial sums reduced.
    fn reduced(&mut self, x: ValueId) -> Result<(ValueId, State), ParallelError> {
        let (v, st) = self.vals[x.index()].clone();
        self.reduce(v, st)
    }

    /// The local type of a node's output: each dim sized as the same-named
    /// dim of an input, or whole when no input has it.
    fn local_type(&self, global: &TensorType, ins: &[ValueId]) -> TensorType {
        let dims = global
            .dims
            .iter()
            .map(|d| {
                ins.iter()
                    .find_map(|&i| self.g.ty(i).dim(&d.name).cloned())
                    .map(|x| Dim::new(&d.name, x.size))
                    .unwrap_or_else(|| d.clone())
            })
            .collect();
        TensorType::new(global.dtype, dims)
    }

    fn node(&mut self, i: usize) -> Result<(ValueId, State), ParallelError> {
        let node = self.src.nodes[i].clone();
        self.span = self.src.span(ValueId(i as u32));
        match &node.op {
            Op::Input { .. } | Op::Scalar { .. } | Op::Sinusoid | Op::LossScale => {
                return Ok((self.push(node.op.clone(), vec![], node.ty.clone()), State::default()));
            }
            // A rank's examples continue the lower data ranks' (one microbatch
            // per data rank: the checker refuses it under accumulation).
            Op::Iota { dim, offset } => {
                let data = self.mesh.data_axis.clone().filter(|a| self.mesh.size(a) > 1 && dim == "batch");
                let start = data.map_or(0, |a| self.coord(&a) * node.ty.numel());
                let op = Op::Iota { dim: dim.clone(), offset: offset + start };
                return Ok((self.push(op, vec![], node.ty.clone()), State::default()));
            }
            Op::Param { .. } => unreachable!("params are placed by `shard`"),
            Op::Dispatch | Op::CombineGradY => return self.expert_major(&node),
            Op::Embed | Op::EmbedGrad | Op::CrossEntropy { .. } | Op::CrossEntropyGrad { .. } => {
                if let Some(r) = self.vocab_parallel(&node)? {
                    return Ok(r);
                }
            }
            Op::Combine | Op::DispatchGrad | Op::CombineGradGates => return self.token_major(&node),
            Op::Rename { .. } => {
                if let Some(r) = self.batch_rename(i)? {
                    return Ok(r);
                }
            }
            _ => {}
        }
        // 1. Partial sums: keep them where the op is linear in them.
        let n = node.inputs.len();
        let mut ins: Vec<(ValueId, State)> = Vec::with_capacity(n);
        let partial: Vec<bool> = node.inputs.iter().map(|x| !self.vals[x.index()].1.partial.is_empty()).collect();
        let keep: Vec<bool> = match linearity(&node.op, n) {
            Linear::No => vec![false; n],
            Linear::Joint => {
                let sets: Vec<&BTreeSet<String>> =
                    node.inputs.iter().map(|x| &self.vals[x.index()].1.partial).collect();
                let same = sets.iter().all(|s| *s == sets[0]);
                vec![same; n]
            }
            Linear::Each(pos) => {
                let first = pos.iter().copied().find(|&p| p < n && partial[p]);
                (0..n).map(|p| Some(p) == first).collect()
            }
        };
        for (k, x) in node.inputs.iter().enumerate() {
            ins.push(if keep[k] { self.vals[x.index()].clone() } else { self.reduced(*x)? });
        }
        // A batch statistic's gradient, on its way back over the batch: each
        // rank holds its own examples' part of it.
        if let Some((axis, op)) = self.batch_statistic(i).filter(|_| i > self.loss) {
            let (v, _) = &mut ins[0];
            let ty = self.g.ty(*v).clone();
            *v = self.push(Op::AllReduce { axis, op }, vec![*v], ty);
        }
        // 2. Dims the op needs whole.
        let tys: Vec<TensorType> = node.inputs.iter().map(|x| self.src.ty(*x).clone()).collect();
        let ty_refs: Vec<&TensorType> = tys.iter().collect();
        for (k, (v, st)) in ins.iter_mut().enumerate() {
            let split: Vec<String> = st.split.keys().cloned().collect();
            for d in split {
                if needs_whole(&node.op, k, &ty_refs, &d) {
                    let (nv, ns) = self.gather(*v, std::mem::take(st), &d)?;
                    *v = nv;
                    *st = ns;
                }
            }
        }
        // A partial sum over an axis that another input splits a dim over is reduced first.
        let split_axes: BTreeSet<String> =
            ins.iter().flat_map(|(_, st)| st.split.values().map(|s| s.axis.clone())).collect();
        for (v, st) in ins.iter_mut() {
            if st.partial.iter().any(|a| split_axes.contains(a)) {
                let (nv, ns) = self.reduce(*v, std::mem::take(st))?;
                *v = nv;
                *st = ns;
            }
        }
        // Grouped-query attention: query heads and key/value heads must be
        // split alike (the same axis, contiguous blocks) or both be whole.
        if matches!(node.op, Op::Attention { .. } | Op::AttentionGrad { .. }) && ins.len() >= 3 {
            let head = |t: &TensorType| t.dims.get(t.dims.len().wrapping_sub(2)).map(|d| d.name.clone());
            let (hq, hk) = (head(&tys[0]), head(&tys[1]));
            if let (Some(hq), Some(hk)) = (hq, hk)
                && hq != hk
            {
                let contiguous = |sp: &Split| sp.indices.windows(2).all(|w| w[1] == w[0] + 1);
                let (sq, sk) = (ins[0].1.split.get(&hq).cloned(), ins[1].1.split.get(&hk).cloned());
                let alike = match (&sq, &sk) {
                    (None, None) => true,
                    (Some(a), Some(b)) => a.axis == b.axis && contiguous(a) && contiguous(b),
                    _ => false,
                };
                if !alike {
                    for (v, st) in ins.iter_mut() {
                        for d in [&hq, &hk] {
                            if st.split.contains_key(d) {
                                let (nv, ns) = self.gather(*v, std::mem::take(st), d)?;
                                *v = nv;
                                *st = ns;
                            }
                        }
                    }
                }
            }
        }
        // Attention is per head: query `heads` and key/value `kv_heads`
        // split over one axis keep their groups (contiguous blocks), and a
        // dim of the inputs that the output lacks is not summed over.
        let per_head = matches!(node.op, Op::Attention { .. } | Op::AttentionGrad { .. });
        // Two dims split over one axis cannot meet in one op: the sequence
        // split (sequence parallelism) is gathered, as Megatron does before
        // a column-parallel matmul.
        loop {
            if per_head {
                break;
            }
            let mut by_axis: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
            for (_, st) in &ins {
                for (d, s) in &st.split {
                    by_axis.entry(s.axis.clone()).or_default().insert(d.clone());
                }
            }
            let Some(dims) = by_axis.values().find(|ds| ds.len() > 1) else { break };
            let victim = if dims.contains("seq") {
                "seq".to_string()
            } else {
                return err(format!(
                    "`{}` meets dims {:?} split over one mesh axis; lay them out on different axes",
                    node.op.name(),
                    dims
                ));
            };
            for (v, st) in ins.iter_mut() {
                if st.split.contains_key(&victim) {
                    let (nv, ns) = self.gather(*v, std::mem::take(st), &victim)?;
                    *v = nv;
                    *st = ns;
                }
            }
        }
        // 3. One split per dim name across the inputs.
        let mut target: BTreeMap<String, Split> = BTreeMap::new();
        for (_, st) in &ins {
            for (d, sp) in &st.split {
                target.entry(d.clone()).or_insert_with(|| sp.clone());
            }
        }
        // Ops that rename dims carry splits across (checked above for the rest).
        for (d, sp) in &target {
            for (v, st) in ins.iter_mut() {
                if !self.g.ty(*v).has(d) {
                    continue;
                }
                match st.split.get(d) {
                    Some(s) if s.axis == sp.axis && s.indices == sp.indices => {}
                    Some(_) => {
                        let (nv, ns) = self.gather(*v, std::mem::take(st), d)?;
                        let (nv, ns) = self.localize(nv, ns, d, sp)?;
                        *v = nv;
                        *st = ns;
                    }
                    None => {
                        if !st.partial.is_empty() && sp.exchanged.is_some() {
                            let (nv, ns) = self.reduce(*v, std::mem::take(st))?;
                            *v = nv;
                            *st = ns;
                        }
                        let (nv, ns) = self.localize(*v, std::mem::take(st), d, sp)?;
                        *v = nv;
                        *st = ns;
                    }
                }
            }
        }
        // 4. The output: dims named after the inputs' local dims; splits that
        // survive; contracted split dims make partial sums.
        let locals: Vec<ValueId> = ins.iter().map(|(v, _)| *v).collect();
        let mut out = State::default();
        for (_, st) in &ins {
            out.partial.extend(st.partial.iter().cloned());
        }
        let ty = match &node.op {
            Op::Rename { from, to } => {
                let (_, st) = &ins[0];
                for (d, sp) in &st.split {
                    let name = from.iter().position(|f| f == d).map(|k| to[k].clone()).unwrap_or(d.clone());
                    out.split.insert(name, sp.clone());
                }
                let src = self.g.ty(locals[0]).clone();
                let dims = node
                    .ty
                    .dims
                    .iter()
                    .map(|d| {
                        let orig =
                            to.iter().position(|t| *t == d.name).map(|k| from[k].clone()).unwrap_or(d.name.clone());
                        Dim::new(&d.name, src.dim(&orig).map(|x| x.size).unwrap_or(d.size))
                    })
                    .collect();
                TensorType::new(node.ty.dtype, dims)
            }
            _ => {
                for (d, sp) in &target {
                    if node.ty.has(d) {
                        out.split.insert(d.clone(), sp.clone());
                    } else if per_head {
                        continue;
                    } else if sp.exchanged.is_some() {
                        return err(format!("internal: `{}` contracts the exchanged dim `{d}`", node.op.name()));
                    } else {
                        out.partial.insert(sp.axis.clone());
                    }
                }
                self.local_type(&node.ty, &locals)
            }
        };
        if let Some(a) = out.split.values().map(|s| &s.axis).find(|a| out.partial.contains(*a)) {
            return err(format!(
                "`{}` at {:?} would be split and a partial sum over `{a}` at once",
                node.op.name(),
                self.span
            ));
        }
        let mut axes: Vec<&String> = out.split.values().map(|s| &s.axis).collect();
        axes.sort();
        if axes.windows(2).any(|w| w[0] == w[1]) {
            return err(format!(
                "`{}` would split two of its dims over one axis: {:?}",
                node.op.name(),
                out.split.iter().map(|(d, s)| format!("{d} -> {}", s.axis)).collect::<Vec<_>>()
            ));
        }
        let v = self.push(self.local_op(&node.op), locals, ty.clone());
        match self.batch_statistic(i) {
            Some((axis, op)) if i <= self.loss => Ok((self.push(Op::AllReduce { axis, op }, vec![v], ty), out)),
            _ => Ok((v, out)),
        }
    }

    /// The contiguous rows a split of the vocabulary holds: (axis, start, rows).
    fn rows(sp: &Split) -> Option<(String, u64, u64)> {
        let first = *sp.indices.first()?;
        let contiguous = sp.indices.iter().enumerate().all(|(i, &x)| x == first + i as u64);
        (contiguous && sp.exchanged.is_none()).then(|| (sp.axis.clone(), first, sp.indices.len() as u64))
    }

    /// Megatron's vocabulary-parallel embedding and cross-entropy, when the
    /// table's rows (and so the logits' class dim) are split: `None` leaves
    /// the op to the generic rule (which gathers).
    fn vocab_parallel(&mut self, node: &crate::ir::Node) -> Result<Option<(ValueId, State)>, ParallelError> {
        match &node.op {
            Op::Embed => {
                let (table, tst) = self.reduced(node.inputs[0])?;
                let row = self.src.ty(node.inputs[0]).dims[0].name.clone();
                let Some((axis, start, _)) = tst.split.get(&row).and_then(Self::rows) else { return Ok(None) };
                if tst.split.len() != 1 {
                    return Ok(None);
                }
                let (ids, _) = self.whole(node.inputs[1])?;
                let v = self.push(Op::EmbedRows { start }, vec![table, ids], node.ty.clone());
                let mut st = State::default();
                st.partial.insert(axis);
                Ok(Some((v, st)))
            }
            Op::EmbedGrad => {
                let row = node.ty.dims[0].name.clone();
                let Some(axis) = self.mesh.rule(&row).map(str::to_string) else { return Ok(None) };
                if Some(&row) == self.mesh.expert_dim.as_ref() || Some(&axis) == self.mesh.data_axis.as_ref() {
                    return Ok(None);
                }
                let held = self.mesh.held(&row, node.ty.dims[0].size, &axis, self.coord(&axis));
                let sp = Split { axis, indices: held, exchanged: None };
                let Some((_, start, rows)) = Self::rows(&sp) else { return Ok(None) };
                let (ids, _) = self.whole(node.inputs[0])?;
                let (g, _) = self.whole(node.inputs[1])?;
                let v = self.push(Op::EmbedGradRows { start }, vec![ids, g], with_size(&node.ty, &row, rows));
                let mut st = State::default();
                st.split.insert(row, sp);
                Ok(Some((v, st)))
            }
            Op::CrossEntropy { label_smoothing, ignore } if *label_smoothing == 0.0 && ignore.is_none() => {
                let (logits, lst) = self.reduced(node.inputs[0])?;
                let tty = self.src.ty(node.inputs[1]).clone();
                let lty = self.g.ty(logits).clone();
                let Some(class) = lty.dims.iter().find(|d| !tty.has(&d.name)).map(|d| d.name.clone()) else {
                    return Ok(None);
                };
                let Some((axis, start, _)) = lst.split.get(&class).and_then(Self::rows) else { return Ok(None) };
                if lst.split.len() != 1 {
                    return Ok(None);
                }
                let (targets, _) = self.whole(node.inputs[1])?;
                let per = TensorType::new(lty.dtype, tty.dims.clone());
                let reduce = |s: &mut Self, op: ReduceOp, x: ValueId| {
                    let l = s.push(Op::Reduce { op, dims: vec![class.clone()] }, vec![x], per.clone());
                    let cop = if op == ReduceOp::Max { ReduceOp::Max } else { ReduceOp::Sum };
                    s.push(Op::AllReduce { axis: axis.clone(), op: cop }, vec![l], per.clone())
                };
                let m = reduce(self, ReduceOp::Max, logits);
                let shifted = self.push(Op::Binary { op: BinaryOp::Sub }, vec![logits, m], lty.clone());
                let e = self.push(Op::Unary { op: crate::ir::UnaryOp::Exp }, vec![shifted], lty.clone());
                let z = reduce(self, ReduceOp::Sum, e);
                let tl = self.push(Op::TargetLogit { start }, vec![logits, targets], per.clone());
                let t = self.push(Op::AllReduce { axis: axis.clone(), op: ReduceOp::Sum }, vec![tl], per.clone());
                let lz = self.push(Op::Unary { op: crate::ir::UnaryOp::Log }, vec![z], per.clone());
                let lse = self.push(Op::Binary { op: BinaryOp::Add }, vec![lz, m], per.clone());
                let nll = self.push(Op::Binary { op: BinaryOp::Sub }, vec![lse, t], per.clone());
                let dims = tty.dims.iter().map(|d| d.name.clone()).collect();
                let loss = self.push(Op::Reduce { op: ReduceOp::Mean, dims }, vec![nll], node.ty.clone());
                self.ce.insert(node.inputs[0].index(), (m, z));
                Ok(Some((loss, State::default())))
            }
            Op::CrossEntropyGrad { label_smoothing, ignore } if *label_smoothing == 0.0 && ignore.is_none() => {
                let Some(&(m, z)) = self.ce.get(&node.inputs[0].index()) else { return Ok(None) };
                let (logits, lst) = self.reduced(node.inputs[0])?;
                let tty = self.src.ty(node.inputs[1]).clone();
                let lty = self.g.ty(logits).clone();
                let Some(class) = lty.dims.iter().find(|d| !tty.has(&d.name)).map(|d| d.name.clone()) else {
                    return Ok(None);
                };
                let Some(sp) = lst.split.get(&class).cloned() else { return Ok(None) };
                let Some((_, start, _)) = Self::rows(&sp) else { return Ok(None) };
                let (targets, _) = self.whole(node.inputs[1])?;
                let (g, _) = self.whole(node.inputs[2])?;
                let v = self.push(Op::CrossEntropyGradRows { start }, vec![logits, targets, m, z, g], lty);
                let mut st = State::default();
                st.split.insert(class, sp);
                Ok(Some((v, st)))
            }
            _ => Ok(None),
        }
    }

    /// An op for the local graph: gradients that regenerate a forward
    /// node's dropout mask name that node's local id (the mask is keyed by it).
    fn local_op(&self, op: &Op) -> Op {
        let mut op = op.clone();
        match &mut op {
            Op::DropoutGrad { forward, .. } | Op::AttentionGrad { forward, .. } => {
                *forward = self.vals[forward.index()].0;
            }
            _ => {}
        }
        op
    }

    /// Dispatch and its transpose: write `[expert, slot, ...]` for this
    /// rank's experts.
    fn expert_major(&mut self, node: &crate::ir::Node) -> Result<(ValueId, State), ParallelError> {
        let (gates, _) = self.whole(node.inputs[0])?;
        let (x, _) = self.whole(node.inputs[1])?;
        let e = node.ty.dims[0].name.clone();
        let slot = node.ty.dims[1].name.clone();
        let size = node.ty.dims[0].size;
        let Some(axis) = self.mesh.rule(&e).map(str::to_string) else {
            return Ok((self.push(node.op.clone(), vec![gates, x], node.ty.clone()), State::default()));
        };
        let held = self.mesh.held(&e, size, &axis, self.coord(&axis));
        let mut st = State::default();
        if Some(&axis) == self.mesh.data_axis.as_ref() {
            let full = self.push(node.op.clone(), vec![gates, x], node.ty.clone());
            let sp = Split { axis, indices: held, exchanged: Some(slot) };
            return self.localize(full, st, &e, &sp);
        }
        let cut = Split { axis: axis.clone(), indices: held.clone(), exchanged: None };
        let g = self.localize(gates, State::default(), &e, &cut)?.0;
        let ty = with_size(&node.ty, &e, held.len() as u64);
        st.split.insert(e, Split { axis, indices: held, exchanged: None });
        Ok((self.push(node.op.clone(), vec![g, x], ty), st))
    }

    /// Combine and the gradients that read expert-major values: back to tokens.
    fn token_major(&mut self, node: &crate::ir::Node) -> Result<(ValueId, State), ParallelError> {
        let (gates, _) = self.whole(node.inputs[0])?;
        let e = self.src.ty(node.inputs[0]).dims.last().map(|d| d.name.clone()).unwrap_or_default();
        let mut rest = Vec::new();
        let mut split: Option<Split> = None;
        for &x in &node.inputs[1..] {
            let (mut v, mut st) = self.reduced(x)?;
            // Other split dims are gathered; a model-axis expert split stays:
            // its slots were laid out from this rank's gates, so only this
            // rank's gates can combine them.
            let others: Vec<String> = st.split.keys().filter(|d| **d != e).cloned().collect();
            for d in others {
                (v, st) = self.gather(v, st, &d)?;
            }
            match st.split.get(&e) {
                Some(sp) if sp.exchanged.is_none() => split = Some(sp.clone()),
                Some(_) => (v, _) = self.gather(v, st, &e)?,
                None => {}
            }
            rest.push(v);
        }
        let mut out = State::default();
        let mut g = gates;
        let mut ty = node.ty.clone();
        if let Some(sp) = &split {
            // A rank whose experts are a model-axis split: mix its experts only.
            for (k, &x) in node.inputs[1..].iter().enumerate() {
                if !self.vals[x.index()].1.split.contains_key(&e) && self.src.ty(x).has(&e) {
                    let (v, st) = self.whole(x)?;
                    rest[k] = self.localize(v, st, &e, sp)?.0;
                }
            }
            g = self.localize(gates, State::default(), &e, sp)?.0;
            if node.ty.has(&e) {
                ty = with_size(&node.ty, &e, sp.indices.len() as u64);
                out.split.insert(e.clone(), sp.clone());
            } else {
                out.partial.insert(sp.axis.clone());
            }
        }
        let mut ins = vec![g];
        ins.extend(rest);
        Ok((self.push(node.op.clone(), ins, ty), out))
    }
}

/// A source graph sharded for one rank.
pub(super) struct Local {
    pub(super) graph: Graph,
    pub(super) loss: ValueId,
    pub(super) param_grads: Vec<ParamGrad>,
    /// The extra outputs asked for, whole.
    pub(super) extra: Vec<ValueId>,
    /// With `extra_at`: the local node count where the source's forward part ends.
    pub(super) split: Option<usize>,
}

/// Shard the graph of `bw` for `rank`: `metas` are the logical parameters
/// the graph's `param` nodes index, `params` their shards on this rank.
/// The loss and `extra` come out whole, each gradient cut like its parameter.
/// Gradients of parameters `0..defer` may stay partial sums (see below);
/// the others (a pipeline chunk's received activations) are reduced.
#[allow(clippy::too_many_arguments)]
pub(super) fn shard_graph(
    mesh: &Mesh,
    metas: &[Param],
    params: &[ParamShard],
    bw: &Backward,
    rank: u64,
    extra: &[ValueId],
    extra_at: Option<usize>,
    defer: usize,
) -> Result<Local, ParallelError> {
    let src = &bw.graph;
    let mut s = Shard {
        mesh,
        rank,
        src,
        g: Graph::new(),
        vals: Vec::with_capacity(src.len()),
        done: HashMap::new(),
        ce: HashMap::new(),
        span: Default::default(),
        gathered: BTreeSet::new(),
        loss: bw.loss.index(),
        reduce_grads: &bw.reduce_grads,
    };
    let mut split = None;
    for i in 0..src.len() {
        let r = match src.nodes[i].op {
            Op::Param { index, layer } => {
                s.span = src.span(ValueId(i as u32));
                let shard = &params[index];
                let mut ty = src.nodes[i].ty.clone();
                let mut st = State::default();
                for (pos, sp) in &shard.splits {
                    let name = &metas[index].ty.dims[*pos].name;
                    if name == "layer" {
                        continue;
                    }
                    ty = with_size(&ty, name, sp.indices.len() as u64);
                    st.split.insert(name.clone(), sp.clone());
                }
                (s.push(Op::Param { index, layer }, vec![], ty), st)
            }
            _ => s.node(i)?,
        };
        s.vals.push(r);
        // The loss and the extra outputs right where the source's forward part ends.
        if extra_at == Some(i + 1) {
            s.whole(bw.loss)?;
            for x in extra {
                s.whole(*x)?;
            }
            split = Some(s.g.len());
        }
    }
    let (loss, _) = s.whole(bw.loss)?;
    let mut extra_out = Vec::with_capacity(extra.len());
    for x in extra {
        extra_out.push(s.whole(*x)?.0);
    }
    // A gradient that is a partial sum over a model axis (a replicated
    // weight read by sequence-parallel or vocabulary-parallel activations)
    // stays one: it is accumulated over the microbatches and summed over
    // that axis once per step, as Megatron does. That needs every gradient
    // of the parameter partial over the same axes, none of which cuts it.
    let want_of = |k: usize| -> BTreeMap<String, Split> {
        params[k]
            .splits
            .iter()
            .map(|(pos, sp)| (metas[k].ty.dims[*pos].name.clone(), sp.clone()))
            .filter(|(d, _)| d != "layer")
            .collect()
    };
    let keeps = |pg: &ParamGrad| -> Option<BTreeSet<String>> {
        let st = &s.vals[pg.grad.index()].1;
        let want = want_of(pg.param);
        let cut: BTreeSet<&String> =
            want.values().map(|sp| &sp.axis).chain(st.split.values().map(|sp| &sp.axis)).collect();
        (pg.param < defer && !st.partial.is_empty() && st.partial.iter().all(|a| !cut.contains(a)))
            .then(|| st.partial.clone())
    };
    let mut deferred: BTreeMap<usize, Option<BTreeSet<String>>> = BTreeMap::new();
    for pg in &bw.param_grads {
        let k = keeps(pg);
        let e = deferred.entry(pg.param).or_insert_with(|| k.clone());
        if *e != k {
            *e = None;
        }
    }
    let mut grads = Vec::with_capacity(bw.param_grads.len());
    for pg in &bw.param_grads {
        let defer = deferred.get(&pg.param).cloned().flatten();
        let (mut v, mut st) = match &defer {
            Some(_) => s.vals[pg.grad.index()].clone(),
            None => s.reduced(pg.grad)?,
        };
        let want = want_of(pg.param);
        let have: Vec<String> = st.split.keys().cloned().collect();
        for d in have {
            let same = want.get(&d).is_some_and(|w| w.axis == st.split[&d].axis && w.indices == st.split[&d].indices);
            if !same {
                (v, st) = s.gather(v, st, &d)?;
            }
        }
        for (d, sp) in &want {
            if !st.split.contains_key(d) {
                let plain = Split { exchanged: None, ..sp.clone() };
                (v, st) = s.localize(v, st, d, &plain)?;
            }
        }
        let partial = defer.map(|d| d.into_iter().collect()).unwrap_or_default();
        grads.push(ParamGrad { param: pg.param, layer: pg.layer, grad: v, partial });
    }
    s.g.set_output("loss", loss);
    for (k, x) in extra_out.iter().enumerate() {
        s.g.set_output(&format!("send.{k}"), *x);
    }
    for (k, pg) in grads.iter().enumerate() {
        s.g.set_output(&format!("grad.{k}"), pg.grad);
    }
    if let Err(e) = crate::ir::verify(&s.g) {
        return err(format!("internal: the program of rank {rank} does not verify: {e:?}"));
    }
    Ok(Local { graph: s.g, loss, param_grads: grads, extra: extra_out, split })
}
