//! The optimizer update as IR: clipping by global norm, then AdamW or SGD,
//! for every parameter, in one graph the runtime executes after the
//! gradients are summed (and that parallel plans can shard, as ZeRO does).
//!
//! Inputs, for parameter k (full, stacked tensors): `4k` the weights, `4k+1`
//! the gradient, `4k+2` the first moment (AdamW) or momentum (SGD), `4k+3`
//! the second moment (AdamW; unused by SGD); then `4n` the hyperparameters
//! of this step, `f32[hyper = 3]`: learning rate, 1 − β1^t, 1 − β2^t.
//! Outputs: `param.k`, `m.k` and, for AdamW, `v.k` (named so in the text
//! form; consumers take them typed, from [`Update::outputs`]).

use crate::config::Optimizer;
use crate::ir::{BinaryOp, Graph, Op, ReduceOp, ValueId};
use crate::model::{Dim, Param, TensorType};
use crate::syntax::ast::DType;
use crate::syntax::span::Span;

struct B {
    g: Graph,
    /// The declaration of the parameter whose update is being built (the
    /// span of its nodes); none for what all parameters share.
    span: Span,
}

impl B {
    fn push(&mut self, op: Op, ins: Vec<ValueId>, ty: TensorType) -> ValueId {
        self.g.push(op, ins, ty, self.span)
    }
    fn scalar(&mut self, v: f64) -> ValueId {
        self.push(Op::Scalar { value: v }, vec![], TensorType::scalar(DType::F32))
    }
    fn bin(&mut self, op: BinaryOp, a: ValueId, b: ValueId) -> ValueId {
        // Operands are the parameter's type or scalars: the result has the larger type.
        let (ta, tb) = (self.g.ty(a).clone(), self.g.ty(b).clone());
        let ty = if ta.dims.len() >= tb.dims.len() { ta } else { tb };
        self.push(Op::Binary { op }, vec![a, b], ty)
    }
    /// a · k for a constant k.
    fn scale(&mut self, a: ValueId, k: f64) -> ValueId {
        let s = self.scalar(k);
        self.bin(BinaryOp::Mul, a, s)
    }
}

/// Number of inputs per parameter (weights, gradient, two moments).
pub const PER_PARAM: usize = 4;

/// What the update needs of a parameter (or of a rank's shard of one).
#[derive(Debug, Clone, PartialEq)]
pub struct UpdateParam {
    pub dims: Vec<Dim>,
    /// Whether weight decay applies (`Param::decays` of the logical parameter).
    pub decays: bool,
    /// The parameter's declaration: where its update comes from.
    pub span: Span,
}

impl UpdateParam {
    pub fn of(p: &Param) -> UpdateParam {
        UpdateParam { dims: p.ty.dims.clone(), decays: p.decays(), span: p.span }
    }
}

/// The update graph for these parameters.
pub fn optimizer_update(params: &[Param], opt: &Optimizer, clip: Option<f64>) -> Graph {
    let ps: Vec<UpdateParam> = params.iter().map(UpdateParam::of).collect();
    update_graph(&ps, opt, clip, false).graph
}

/// An update graph, and what it computes for each parameter.
#[derive(Debug, Clone)]
pub struct Update {
    pub graph: Graph,
    /// Per parameter (in the order given), its updated values.
    pub outputs: Vec<Updated>,
}

/// One parameter's values after the update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Updated {
    pub weights: ValueId,
    /// The first moment (AdamW) or momentum (SGD).
    pub m: ValueId,
    /// The second moment (AdamW).
    pub v: Option<ValueId>,
}

/// The update graph for parameters (or shards). With `given_norm`, input
/// `4n + 1` is the global sum of squared gradients, `f32[]`, which the
/// caller has summed over every rank's shards; otherwise the graph sums the
/// squares of the gradients it is given.
pub fn update_graph(params: &[UpdateParam], opt: &Optimizer, clip: Option<f64>, given_norm: bool) -> Update {
    let mut b = B { g: Graph::new(), span: Span::default() };
    let mut outputs = Vec::with_capacity(params.len());
    let n = params.len();
    let mut ins = Vec::with_capacity(n);
    for (k, p) in params.iter().enumerate() {
        let ty = TensorType::new(DType::F32, p.dims.clone());
        let v: Vec<ValueId> =
            (0..PER_PARAM).map(|j| b.push(Op::Input { index: PER_PARAM * k + j }, vec![], ty.clone())).collect();
        ins.push(v);
    }
    let hyper =
        b.push(Op::Input { index: PER_PARAM * n }, vec![], TensorType::new(DType::F32, vec![Dim::new("hyper", 3)]));
    let scalar = TensorType::scalar(DType::F32);
    // The learning rate, for SGD (the fused AdamW step reads all of `hyper`).
    let lr = b.push(Op::Take { dim: "hyper".into(), index: 0 }, vec![hyper], scalar.clone());
    // Clip by the global norm of all gradients: a scalar factor (1 without clipping).
    let raw: Vec<ValueId> = ins.iter().map(|v| v[1]).collect();
    let factor = match clip {
        Some(c) if given_norm => {
            let total = b.push(Op::Input { index: PER_PARAM * n + 1 }, vec![], scalar.clone());
            b.push(Op::ClipScale { clip: c }, vec![total], scalar.clone())
        }
        Some(c) if !raw.is_empty() => {
            let mut total: Option<ValueId> = None;
            for (k, g) in raw.iter().enumerate() {
                let sq = b.bin(BinaryOp::Mul, *g, *g);
                let dims = params[k].dims.iter().map(|d| d.name.clone()).collect();
                let s = b.push(Op::Reduce { op: ReduceOp::Sum, dims }, vec![sq], scalar.clone());
                total = Some(match total {
                    None => s,
                    Some(t) => b.bin(BinaryOp::Add, t, s),
                });
            }
            b.push(Op::ClipScale { clip: c }, vec![total.expect("non-empty")], scalar.clone())
        }
        _ => b.scalar(1.0),
    };
    for (k, p) in params.iter().enumerate() {
        b.span = p.span;
        let (w, g, m, v) = (ins[k][0], raw[k], ins[k][2], ins[k][3]);
        let ty = b.g.ty(w).clone();
        let (new_w, new_m, new_v) = match opt {
            Optimizer::Adamw { beta1, beta2, eps, weight_decay, .. } => {
                // Fused: one pass per moment and one for the weights.
                let m_new = b.push(Op::AdamMoment { beta: *beta1, square: false }, vec![m, g, factor], ty.clone());
                let v_new = b.push(Op::AdamMoment { beta: *beta2, square: true }, vec![v, g, factor], ty.clone());
                let wd = if p.decays { *weight_decay } else { 0.0 };
                let w_new = b.push(Op::AdamStep { eps: *eps, weight_decay: wd }, vec![w, m_new, v_new, hyper], ty);
                (w_new, m_new, Some(v_new))
            }
            Optimizer::Sgd { momentum, weight_decay, nesterov, .. } => {
                let g = b.bin(BinaryOp::Mul, g, factor);
                let gi = if p.decays && *weight_decay != 0.0 {
                    let wd = b.scale(w, *weight_decay);
                    b.bin(BinaryOp::Add, g, wd)
                } else {
                    g
                };
                let mm = b.scale(m, *momentum);
                let buf = b.bin(BinaryOp::Add, mm, gi);
                let d = if *nesterov {
                    let mb = b.scale(buf, *momentum);
                    b.bin(BinaryOp::Add, gi, mb)
                } else if *momentum > 0.0 {
                    buf
                } else {
                    gi
                };
                let step = b.bin(BinaryOp::Mul, d, lr);
                (b.bin(BinaryOp::Sub, w, step), buf, None)
            }
        };
        b.g.set_output(&format!("param.{k}"), new_w);
        b.g.set_output(&format!("m.{k}"), new_m);
        if let Some(v) = new_v {
            b.g.set_output(&format!("v.{k}"), v);
        }
        outputs.push(Updated { weights: new_w, m: new_m, v: new_v });
    }
    Update { graph: b.g, outputs }
}
