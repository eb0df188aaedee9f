//! Reverse-mode automatic differentiation, IR → IR.
//!
//! [`differentiate`] takes a forward graph and a scalar loss and returns one
//! graph holding the forward pass and the backward pass, with the gradient of
//! every parameter slice the loss depends on. Each op's vector-Jacobian
//! product is written below in IR ops; gradients are accumulated by `add`.
//! Named dims make broadcasting's adjoint simple: a gradient is summed over
//! the dims its operand lacks and put in the operand's dim order.

pub mod update;

use std::collections::BTreeMap;

use crate::ir::{BinaryOp, Graph, Op, ReduceOp, RelPos, UnaryOp, ValueId};
use crate::model::{Dim, TensorType};
use crate::syntax::ast::DType;
use crate::syntax::span::Span;

/// The gradient of one parameter slice (a stacked parameter has one per layer).
#[derive(Debug, Clone, PartialEq)]
pub struct ParamGrad {
    pub param: usize,
    pub layer: Option<u64>,
    pub grad: ValueId,
    /// Mesh axes over which `grad` is a partial sum on a rank (per-rank
    /// programs only): the gradient is accumulated over the step's
    /// microbatches and summed over these axes once per step.
    pub partial: Vec<String>,
}

/// A forward + backward graph.
#[derive(Debug, Clone)]
pub struct Backward {
    pub graph: Graph,
    pub loss: ValueId,
    /// The number of forward nodes (the backward nodes follow them).
    pub forward_len: usize,
    pub param_grads: Vec<ParamGrad>,
    /// The backward `expand` (by node index) that carries each forward sum's
    /// or mean's gradient back over the reduced dims, with that reduction:
    /// the sharding pass all-reduces batch statistics' gradients there.
    pub reduce_grads: BTreeMap<usize, ReduceOp>,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AutodiffError {
    #[error("the loss must be a scalar float value, found {0}")]
    LossNotScalar(TensorType),
    #[error("`{op}` has no gradient rule yet ({why})")]
    NotDifferentiable { op: &'static str, why: &'static str, span: Span },
}

struct Builder<'a> {
    fwd: &'a Graph,
    g: Graph,
    adj: Vec<Option<ValueId>>,
}

impl Builder<'_> {
    fn push(&mut self, op: Op, inputs: Vec<ValueId>, ty: TensorType, span: Span) -> ValueId {
        self.g.push(op, inputs, ty, span)
    }

    fn ty(&self, v: ValueId) -> TensorType {
        self.g.ty(v).clone()
    }

    fn scalar(&mut self, value: f64, dtype: DType, span: Span) -> ValueId {
        self.push(Op::Scalar { value }, vec![], TensorType::scalar(dtype), span)
    }

    fn binary(&mut self, op: BinaryOp, a: ValueId, b: ValueId, span: Span) -> ValueId {
        let (ta, tb) = (self.ty(a), self.ty(b));
        let mut dims = ta.dims.clone();
        for d in &tb.dims {
            if !ta.has(&d.name) {
                dims.push(d.clone());
            }
        }
        self.push(Op::Binary { op }, vec![a, b], TensorType::new(ta.dtype, dims), span)
    }

    /// Bring a gradient to exactly `target`'s type: sum the dims it lacks, then
    /// reorder; broadcast dims it lacks (a scalar seed, say).
    fn conform(&mut self, v: ValueId, target: &TensorType, span: Span) -> ValueId {
        let t = self.ty(v);
        let extra: Vec<String> = t.dims.iter().filter(|d| !target.has(&d.name)).map(|d| d.name.clone()).collect();
        let mut v = v;
        if !extra.is_empty() {
            let dims = t.dims.iter().filter(|d| target.has(&d.name)).cloned().collect();
            v = self.push(Op::Reduce { op: ReduceOp::Sum, dims: extra }, vec![v], TensorType::new(t.dtype, dims), span);
        }
        let t = self.ty(v);
        if t.dims.len() < target.dims.len() {
            return self.push(Op::Expand, vec![v], target.clone(), span);
        }
        if t.dims != target.dims {
            v = self.push(Op::Permute, vec![v], target.clone(), span);
        }
        v
    }

    fn accumulate(&mut self, input: ValueId, grad: ValueId, span: Span) {
        let target = self.fwd.ty(input).clone();
        let grad = self.conform(grad, &target, span);
        let sum = match self.adj[input.index()] {
            Some(prev) => self.push(Op::Binary { op: BinaryOp::Add }, vec![prev, grad], target, span),
            None => grad,
        };
        self.adj[input.index()] = Some(sum);
    }
}

/// The gradient of one `take`: (index, gradient value, span).
type TakeGrad = (u64, ValueId, Span);

/// Differentiate `loss` with respect to every parameter it depends on.
pub fn differentiate(fwd: &Graph, loss: ValueId) -> Result<Backward, AutodiffError> {
    differentiate_trainable(fwd, loss, &[])
}

/// [`differentiate`], but not with respect to the parameters `frozen`
/// marks (indexed by parameter; those past its end train): their
/// gradients, and what only they need, are not computed.
pub fn differentiate_trainable(fwd: &Graph, loss: ValueId, frozen: &[bool]) -> Result<Backward, AutodiffError> {
    let lt = fwd.ty(loss).clone();
    if !lt.dims.is_empty() || !lt.dtype.is_float() {
        return Err(AutodiffError::LossNotScalar(lt));
    }
    let n = fwd.len();
    // Values that depend on a parameter carry gradients; nothing else does.
    let mut needs = vec![false; n];
    for (i, node) in fwd.nodes.iter().enumerate() {
        let trains = |k: usize| !frozen.get(k).copied().unwrap_or(false);
        needs[i] =
            matches!(node.op, Op::Param { index, .. } if trains(index)) || node.inputs.iter().any(|v| needs[v.index()]);
    }
    let mut b = Builder { fwd, g: fwd.clone(), adj: vec![None; n] };
    // The seed, d loss / d loss: 1, or the loss scale where the program scales the loss.
    let seed = b.push(Op::LossScale, vec![], TensorType::scalar(lt.dtype), fwd.span(loss));
    b.adj[loss.index()] = Some(seed);
    let mut param_grads = Vec::new();
    let mut reduce_grads = BTreeMap::new();
    // Gradients of `take`s, per (value, dim): summed into one `untake` when
    // the loop reaches the value (all its takes come after it).
    let mut takes: std::collections::BTreeMap<(usize, String), Vec<TakeGrad>> = Default::default();
    for i in (0..=loss.index()).rev() {
        let pending: Vec<String> =
            takes.range((i, String::new())..).take_while(|((x, _), _)| *x == i).map(|((_, d), _)| d.clone()).collect();
        for dim in pending {
            let parts = takes.remove(&(i, dim.clone())).unwrap_or_default();
            let span = parts[0].2;
            let op = Op::Untake { dim, indices: parts.iter().map(|p| p.0).collect() };
            let c = b.push(op, parts.iter().map(|p| p.1).collect(), fwd.ty(ValueId(i as u32)).clone(), span);
            b.accumulate(ValueId(i as u32), c, span);
        }
        let Some(gi) = b.adj[i] else { continue };
        if !needs[i] {
            continue;
        }
        let node = fwd.nodes[i].clone();
        let span = fwd.spans[i];
        let out = ValueId(i as u32);
        let ins = &node.inputs;
        let need = |j: usize| needs[ins[j].index()];
        let not = |op: &'static str, why: &'static str| Err(AutodiffError::NotDifferentiable { op, why, span });
        match &node.op {
            Op::Param { index, layer } => {
                param_grads.push(ParamGrad { param: *index, layer: *layer, grad: gi, partial: Vec::new() })
            }
            Op::Input { .. } | Op::Scalar { .. } | Op::Sinusoid | Op::Iota { .. } | Op::LossScale => {}
            Op::Unary { op: UnaryOp::Neg } => {
                let ty = b.ty(gi);
                let c = b.push(Op::Unary { op: UnaryOp::Neg }, vec![gi], ty, span);
                b.accumulate(ins[0], c, span);
            }
            Op::Unary { op } => {
                let c = b.push(Op::UnaryGrad { op: *op }, vec![ins[0], gi], node.ty.clone(), span);
                b.accumulate(ins[0], c, span);
            }
            Op::Binary { op } => {
                let (x, y) = (ins[0], ins[1]);
                match op {
                    BinaryOp::Add => {
                        if need(0) {
                            b.accumulate(x, gi, span);
                        }
                        if need(1) {
                            b.accumulate(y, gi, span);
                        }
                    }
                    BinaryOp::Sub => {
                        if need(0) {
                            b.accumulate(x, gi, span);
                        }
                        if need(1) {
                            let ty = b.ty(gi);
                            let c = b.push(Op::Unary { op: UnaryOp::Neg }, vec![gi], ty, span);
                            b.accumulate(y, c, span);
                        }
                    }
                    BinaryOp::Mul => {
                        if need(0) {
                            let c = b.binary(BinaryOp::Mul, gi, y, span);
                            b.accumulate(x, c, span);
                        }
                        if need(1) {
                            let c = b.binary(BinaryOp::Mul, gi, x, span);
                            b.accumulate(y, c, span);
                        }
                    }
                    BinaryOp::Div => {
                        if need(0) {
                            let c = b.binary(BinaryOp::Div, gi, y, span);
                            b.accumulate(x, c, span);
                        }
                        if need(1) {
                            // d(x/y)/dy = -x / y² = -out / y
                            let t = b.binary(BinaryOp::Mul, gi, out, span);
                            let t = b.binary(BinaryOp::Div, t, y, span);
                            let ty = b.ty(t);
                            let c = b.push(Op::Unary { op: UnaryOp::Neg }, vec![t], ty, span);
                            b.accumulate(y, c, span);
                        }
                    }
                }
            }
            Op::Pow { exp } => {
                let x = ins[0];
                let tx = b.ty(x);
                let p = b.push(Op::Pow { exp: exp - 1.0 }, vec![x], tx.clone(), span);
                let k = b.scalar(*exp, tx.dtype, span);
                let d = b.binary(BinaryOp::Mul, p, k, span);
                let c = b.binary(BinaryOp::Mul, gi, d, span);
                b.accumulate(x, c, span);
            }
            Op::MatMul { .. } | Op::Einsum => {
                // a's gradient contracts g with b over b's own dims, and vice versa.
                if need(0) {
                    let ta = fwd.ty(ins[0]).clone();
                    let c = b.push(Op::Einsum, vec![gi, ins[1]], ta, span);
                    b.accumulate(ins[0], c, span);
                }
                if need(1) {
                    let tb = fwd.ty(ins[1]).clone();
                    let c = b.push(Op::Einsum, vec![ins[0], gi], tb, span);
                    b.accumulate(ins[1], c, span);
                }
            }
            Op::Reduce { op: ReduceOp::Max, dims } => {
                let tx = fwd.ty(ins[0]).clone();
                let c = b.push(Op::AmaxGrad { dims: dims.clone() }, vec![ins[0], out, gi], tx, span);
                b.accumulate(ins[0], c, span);
            }
            Op::Reduce { op, dims } => {
                let tx = fwd.ty(ins[0]).clone();
                let mut c = b.push(Op::Expand, vec![gi], tx.clone(), span);
                reduce_grads.insert(c.index(), *op);
                match op {
                    ReduceOp::Sum => {}
                    ReduceOp::Mean => {
                        let count: u64 = tx.dims.iter().filter(|d| dims.contains(&d.name)).map(|d| d.size).product();
                        let k = b.scalar(1.0 / count.max(1) as f64, tx.dtype, span);
                        c = b.binary(BinaryOp::Mul, c, k, span);
                    }
                    ReduceOp::Max => unreachable!("amax is handled above"),
                }
                b.accumulate(ins[0], c, span);
            }
            Op::Softmax { dim, log } => {
                let c = b.push(Op::SoftmaxGrad { dim: dim.clone(), log: *log }, vec![out, gi], node.ty.clone(), span);
                b.accumulate(ins[0], c, span);
            }
            Op::LayerNorm { dim, eps, gain, .. } => {
                norm_grads(&mut b, &node, gi, dim, *eps, *gain, false, span, &needs)
            }
            Op::RmsNorm { dim, eps, gain } => norm_grads(&mut b, &node, gi, dim, *eps, *gain, true, span, &needs),
            Op::Embed => {
                let tt = fwd.ty(ins[0]).clone();
                let c = b.push(Op::EmbedGrad, vec![ins[1], gi], tt, span);
                b.accumulate(ins[0], c, span);
            }
            Op::Take { dim, index } => takes.entry((ins[0].index(), dim.clone())).or_default().push((*index, gi, span)),
            Op::SplitDim { dim, into } => {
                let tx = fwd.ty(ins[0]).clone();
                let c = b.push(Op::MergeDims { dims: into.clone(), into: dim.clone() }, vec![gi], tx, span);
                b.accumulate(ins[0], c, span);
            }
            Op::MergeDims { dims, into } => {
                let tx = fwd.ty(ins[0]).clone();
                let c = b.push(Op::SplitDim { dim: into.clone(), into: dims.clone() }, vec![gi], tx, span);
                b.accumulate(ins[0], c, span);
            }
            Op::Rename { from, to } => {
                let tx = fwd.ty(ins[0]).clone();
                let c = b.push(Op::Rename { from: to.clone(), to: from.clone() }, vec![gi], tx, span);
                b.accumulate(ins[0], c, span);
            }
            Op::Permute | Op::Expand => {
                // The adjoint of a transpose is the inverse transpose; of a broadcast, a sum.
                b.accumulate(ins[0], gi, span);
            }
            Op::Concat { over, into } => {
                let mut start = 0;
                for (j, v) in ins.iter().enumerate() {
                    let tv = fwd.ty(*v).clone();
                    let part = tv.dim(&over[j]).cloned().expect("verified concat");
                    if need(j) {
                        let gt = b.ty(gi);
                        let dims =
                            gt.dims.iter().map(|d| if &d.name == into { part.clone() } else { d.clone() }).collect();
                        let op = Op::Slice { dim: into.clone(), start, to: part.name.clone() };
                        let c = b.push(op, vec![gi], TensorType::new(gt.dtype, dims), span);
                        b.accumulate(*v, c, span);
                    }
                    start += part.size;
                }
            }
            // The gradient of a slice: zeros before and after it, concatenated.
            Op::Slice { dim, start, to } => {
                let tx = fwd.ty(ins[0]).clone();
                let (whole, part) = (tx.dim(dim).cloned(), b.ty(gi).dim(to).cloned());
                let (Some(whole), Some(part)) = (whole, part) else {
                    return not("slice", "its dims do not match its operand");
                };
                let gt = b.ty(gi);
                let mut parts = Vec::new();
                let mut over = Vec::new();
                let zero = b.scalar(0.0, gt.dtype, span);
                for (name, len) in [
                    (format!("{dim}_before"), *start),
                    (String::new(), 0),
                    (format!("{dim}_after"), whole.size - start - part.size),
                ] {
                    if name.is_empty() {
                        parts.push(gi);
                        over.push(to.clone());
                    } else if len > 0 {
                        let z =
                            b.push(Op::Expand, vec![zero], TensorType::new(gt.dtype, vec![Dim::new(&name, len)]), span);
                        parts.push(z);
                        over.push(name);
                    }
                }
                let c = b.push(Op::Concat { over, into: dim.clone() }, parts, tx, span);
                b.accumulate(ins[0], c, span);
            }
            Op::Dropout { p } => {
                if *p == 0.0 {
                    b.accumulate(ins[0], gi, span);
                } else {
                    let c = b.push(Op::DropoutGrad { p: *p, forward: out }, vec![gi], node.ty.clone(), span);
                    b.accumulate(ins[0], c, span);
                }
            }
            Op::Attention { causal, dropout, mask, rel, window } => {
                let (t5, xl) = match rel {
                    RelPos::None => (None, None),
                    RelPos::T5 { max_distance } => (Some(*max_distance), None),
                    RelPos::Xl { biases } => (None, Some(*biases)),
                };
                // Operands: q, k, v, [mask], then the T5 table or XL's r [, u, v]:
                // `which` 3.. are those extra operands in order.
                let first = 3 + usize::from(*mask);
                let extra = usize::from(t5.is_some()) + xl.map_or(0, |b| 1 + 2 * usize::from(b));
                let mut base: Vec<ValueId> = ins[..first + extra].to_vec();
                base.push(gi);
                let operand = |which: u8| if which >= 3 { first + which as usize - 3 } else { which as usize };
                for which in 0..(3 + extra) as u8 {
                    if need(operand(which)) {
                        let t = fwd.ty(ins[operand(which)]).clone();
                        let op = Op::AttentionGrad {
                            which,
                            causal: *causal,
                            mask: *mask,
                            window: *window,
                            dropout: *dropout,
                            forward: out,
                            t5,
                            xl,
                        };
                        let c = b.push(op, base.clone(), t, span);
                        b.accumulate(ins[operand(which)], c, span);
                    }
                }
            }
            Op::Rope { theta, fraction } => {
                let c = b.push(Op::RopeGrad { theta: *theta, fraction: *fraction }, vec![gi], node.ty.clone(), span);
                b.accumulate(ins[0], c, span);
            }
            Op::CrossEntropy { label_smoothing, ignore } => {
                let tl = fwd.ty(ins[0]).clone();
                let op = Op::CrossEntropyGrad { label_smoothing: *label_smoothing, ignore: *ignore };
                let c = b.push(op, vec![ins[0], ins[1], gi], tl, span);
                b.accumulate(ins[0], c, span);
            }
            Op::Patches { .. } => return not("patches", "the image is an input; nothing upstream has parameters"),
            Op::TopK { .. } => {
                let c = b.push(Op::GateMask, vec![gi, out], node.ty.clone(), span);
                b.accumulate(ins[0], c, span);
            }
            Op::Dispatch => {
                if need(1) {
                    let tx = fwd.ty(ins[1]).clone();
                    let c = b.push(Op::DispatchGrad, vec![ins[0], gi], tx, span);
                    b.accumulate(ins[1], c, span);
                }
            }
            Op::Combine => {
                if need(1) {
                    let ty = fwd.ty(ins[1]).clone();
                    let c = b.push(Op::CombineGradY, vec![ins[0], gi], ty, span);
                    b.accumulate(ins[1], c, span);
                }
                if need(0) {
                    let tg = fwd.ty(ins[0]).clone();
                    let c = b.push(Op::CombineGradGates, vec![ins[0], ins[1], gi], tg, span);
                    b.accumulate(ins[0], c, span);
                }
            }
            Op::LoadBalance => {
                if need(1) {
                    let tp = fwd.ty(ins[1]).clone();
                    let c = b.push(Op::LoadBalanceGrad, vec![ins[0], ins[1], gi], tp, span);
                    b.accumulate(ins[1], c, span);
                }
            }
            Op::ZLoss => {
                let tl = fwd.ty(ins[0]).clone();
                let c = b.push(Op::ZLossGrad, vec![ins[0], gi], tl, span);
                b.accumulate(ins[0], c, span);
            }
            Op::Cast { .. } => {
                let tx = fwd.ty(ins[0]).clone();
                let c = b.push(Op::Cast { dtype: tx.dtype }, vec![gi], tx, span);
                b.accumulate(ins[0], c, span);
            }
            // Masks and positions are piecewise constant: no gradient flows.
            Op::Compare { .. } | Op::Argmax { .. } => {}
            Op::Where => {
                let ty = b.ty(gi);
                let zero = b.scalar(0.0, ty.dtype, span);
                for (j, picked) in [(1, [gi, zero]), (2, [zero, gi])] {
                    if need(j) {
                        let c = b.push(Op::Where, vec![ins[0], picked[0], picked[1]], ty.clone(), span);
                        b.accumulate(ins[j], c, span);
                    }
                }
            }
            Op::Unfold { windows, .. } => {
                let tx = fwd.ty(ins[0]).clone();
                let c = b.push(Op::Fold { windows: windows.clone() }, vec![gi], tx, span);
                b.accumulate(ins[0], c, span);
            }
            Op::Gather { dim } => {
                let tx = fwd.ty(ins[0]).clone();
                let c = b.push(Op::GatherGrad { dim: dim.clone() }, vec![gi, ins[1]], tx, span);
                b.accumulate(ins[0], c, span);
            }
            other => return not(other.name(), "a backward op cannot be differentiated again"),
        }
    }
    param_grads.sort_by_key(|p| (p.param, p.layer));
    Ok(Backward { graph: b.g, loss, forward_len: n, param_grads, reduce_grads })
}

#[allow(clippy::too_many_arguments)]
fn norm_grads(
    b: &mut Builder,
    node: &crate::ir::Node,
    gi: ValueId,
    dim: &str,
    eps: f64,
    gain: bool,
    rms: bool,
    span: Span,
    needs: &[bool],
) {
    let ins = &node.inputs;
    let x = ins[0];
    let tx = b.fwd.ty(x).clone();
    if needs[x.index()] {
        let mut args = vec![x];
        if gain {
            args.push(ins[1]);
        }
        args.push(gi);
        let c = b.push(Op::NormGradX { dim: dim.to_string(), eps, gain, rms }, args, tx.clone(), span);
        b.accumulate(x, c, span);
    }
    if gain && needs[ins[1].index()] {
        let tg = b.fwd.ty(ins[1]).clone();
        let c = b.push(Op::NormGradGain { dim: dim.to_string(), eps, rms }, vec![x, gi], tg, span);
        b.accumulate(ins[1], c, span);
    }
    // LayerNorm's bias: the gradient summed over every other dim.
    let bias_at = if gain { 2 } else { 1 };
    if !rms && ins.len() > bias_at && needs[ins[bias_at].index()] {
        b.accumulate(ins[bias_at], gi, span);
    }
}
