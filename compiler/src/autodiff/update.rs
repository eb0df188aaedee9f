//! The optimizer update as IR: clipping by global norm, then AdamW or SGD,
//! for every parameter, in one graph the runtime executes after the
//! gradients are summed (and that parallel plans can shard, as ZeRO does).
//!
//! Inputs, for parameter k (full, stacked tensors): `4k` the weights, `4k+1`
//! the gradient, `4k+2` the first moment (AdamW) or momentum (SGD), `4k+3`
//! the second moment (AdamW; unused by SGD); then `4n` the hyperparameters
//! of this step, `f32[hyper = 3]`: learning rate, 1 − β1^t, 1 − β2^t.
//! Outputs: `param.k`, `m.k` and, for AdamW, `v.k`.

use crate::config::Optimizer;
use crate::ir::{BinaryOp, Graph, Op, ReduceOp, UnaryOp, ValueId};
use crate::model::{Dim, Param, TensorType};
use crate::syntax::ast::DType;
use crate::syntax::span::Span;

struct B {
    g: Graph,
}

impl B {
    fn push(&mut self, op: Op, ins: Vec<ValueId>, ty: TensorType) -> ValueId {
        self.g.push(op, ins, ty, Span::default())
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

/// The update graph for these parameters.
pub fn optimizer_update(params: &[Param], opt: &Optimizer, clip: Option<f64>) -> Graph {
    let mut b = B { g: Graph::new() };
    let n = params.len();
    let mut ins = Vec::with_capacity(n);
    for (k, p) in params.iter().enumerate() {
        let ty = TensorType::new(DType::F32, p.ty.dims.clone());
        let v: Vec<ValueId> =
            (0..PER_PARAM).map(|j| b.push(Op::Input { index: PER_PARAM * k + j }, vec![], ty.clone())).collect();
        ins.push(v);
    }
    let hyper =
        b.push(Op::Input { index: PER_PARAM * n }, vec![], TensorType::new(DType::F32, vec![Dim::new("hyper", 3)]));
    let scalar = TensorType::scalar(DType::F32);
    let [lr, bc1, bc2] =
        [0, 1, 2].map(|i| b.push(Op::Take { dim: "hyper".into(), index: i }, vec![hyper], scalar.clone()));
    // Clip by the global norm of all gradients.
    let mut grads: Vec<ValueId> = ins.iter().map(|v| v[1]).collect();
    if let Some(c) = clip {
        let mut total: Option<ValueId> = None;
        for (k, g) in grads.iter().enumerate() {
            let sq = b.bin(BinaryOp::Mul, *g, *g);
            let dims = params[k].ty.dims.iter().map(|d| d.name.clone()).collect();
            let s = b.push(Op::Reduce { op: ReduceOp::Sum, dims }, vec![sq], scalar.clone());
            total = Some(match total {
                None => s,
                Some(t) => b.bin(BinaryOp::Add, t, s),
            });
        }
        if let Some(t) = total {
            let factor = b.push(Op::ClipScale { clip: c }, vec![t], scalar.clone());
            grads = grads.iter().map(|g| b.bin(BinaryOp::Mul, *g, factor)).collect();
        }
    }
    for (k, p) in params.iter().enumerate() {
        let (w, g, m, v) = (ins[k][0], grads[k], ins[k][2], ins[k][3]);
        let (new_w, new_m, new_v) = match opt {
            Optimizer::Adamw { beta1, beta2, eps, weight_decay, .. } => {
                let m1 = b.scale(m, *beta1);
                let m2 = b.scale(g, 1.0 - beta1);
                let m_new = b.bin(BinaryOp::Add, m1, m2);
                let gg = b.bin(BinaryOp::Mul, g, g);
                let v1 = b.scale(v, *beta2);
                let v2 = b.scale(gg, 1.0 - beta2);
                let v_new = b.bin(BinaryOp::Add, v1, v2);
                let mhat = b.bin(BinaryOp::Div, m_new, bc1);
                let vhat = b.bin(BinaryOp::Div, v_new, bc2);
                let ty = b.g.ty(vhat).clone();
                let root = b.push(Op::Unary { op: UnaryOp::Sqrt }, vec![vhat], ty);
                let e = b.scalar(*eps);
                let denom = b.bin(BinaryOp::Add, root, e);
                let mut upd = b.bin(BinaryOp::Div, mhat, denom);
                if p.decays() && *weight_decay != 0.0 {
                    let wd = b.scale(w, *weight_decay);
                    upd = b.bin(BinaryOp::Add, upd, wd);
                }
                let step = b.bin(BinaryOp::Mul, upd, lr);
                (b.bin(BinaryOp::Sub, w, step), m_new, Some(v_new))
            }
            Optimizer::Sgd { momentum, weight_decay, nesterov, .. } => {
                let gi = if p.decays() && *weight_decay != 0.0 {
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
    }
    b.g
}
