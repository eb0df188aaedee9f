//! Which ops a kernel can compute, and as which primitive expressions: the
//! one place that decomposes an op for fusion.
//!
//! Elementwise ops map one to one. The optimizer's composite ops are
//! written out in primitives, in the order of operations of their
//! node-by-node kernels (`adam_moment`: β·m + (1 − β)·(g·s)², `adam_step`:
//! w − lr·((m / bc1) / (√(v / bc2) + ε) + wd·w)), so a fused update computes
//! the same f32 values. `adam_step` reads its three hyperparameters (lr and
//! the two bias corrections) as elements of one operand.

use super::Expr;
use crate::ir::{BinaryOp, DType, Op, UnaryOp};

/// Whether a kernel can compute `op`.
pub fn decomposes(op: &Op) -> bool {
    op.is_elementwise()
        || matches!(op, Op::AdamMoment { .. } | Op::AdamStep { .. })
        || matches!(op, Op::Cast { dtype } if dtype.is_float())
}

/// Whether `op` reads operand `i` by element index rather than at the loop
/// position (so its dims need not be among the loop's).
pub fn reads_whole(op: &Op, i: usize) -> bool {
    matches!(op, Op::AdamStep { .. }) && i == 3
}

/// Append the expressions of `op` over operand values `x` (body indices;
/// for an operand read whole, its argument index) to `body`, and return the
/// value of the result. `rng` is the op's random stream (dropout).
pub fn expand(op: &Op, x: &[usize], rng: Option<u64>, body: &mut Vec<Expr>) -> Result<usize, String> {
    let mut push = |e: Expr| {
        body.push(e);
        body.len() - 1
    };
    Ok(match op {
        Op::Unary { op } => push(Expr::Unary { op: *op, x: x[0] }),
        Op::Binary { op } => push(Expr::Binary { op: *op, a: x[0], b: x[1] }),
        Op::Pow { exp } => push(Expr::Pow { x: x[0], exp: *exp }),
        Op::UnaryGrad { op } => push(Expr::UnaryGrad { op: *op, x: x[0], g: x[1] }),
        Op::Dropout { p } | Op::DropoutGrad { p, .. } if *p > 0.0 => {
            let rng = rng.ok_or("a dropout without its random stream")?;
            push(Expr::Dropout { x: x[0], p: *p, rng })
        }
        // A cast to a floating dtype: the value that dtype holds (f32 holds every kernel value).
        Op::Cast { dtype: DType::F32 } => x[0],
        Op::Cast { dtype } => push(Expr::Round { x: x[0], dtype: *dtype }),
        // Dropout with p = 0 is the identity.
        Op::Dropout { .. } | Op::DropoutGrad { .. } => x[0],
        Op::AdamMoment { beta, square } => {
            let (m, g, s) = (x[0], x[1], x[2]);
            let mul = |a, b| Expr::Binary { op: BinaryOp::Mul, a, b };
            let gs = push(mul(g, s));
            let u = if *square { push(mul(gs, gs)) } else { gs };
            let b = push(Expr::Const { value: f64::from(*beta as f32) });
            let one_minus = push(Expr::Const { value: f64::from(1.0 - *beta as f32) });
            let bm = push(mul(b, m));
            let ou = push(mul(one_minus, u));
            push(Expr::Binary { op: BinaryOp::Add, a: bm, b: ou })
        }
        Op::AdamStep { eps, weight_decay } => {
            let (w, m, v, hyper) = (x[0], x[1], x[2], x[3]);
            let bin = |op, a, b| Expr::Binary { op, a, b };
            let lr = push(Expr::Element { arg: hyper, index: 0 });
            let bc1 = push(Expr::Element { arg: hyper, index: 1 });
            let bc2 = push(Expr::Element { arg: hyper, index: 2 });
            let mh = push(bin(BinaryOp::Div, m, bc1));
            let vh = push(bin(BinaryOp::Div, v, bc2));
            let root = push(Expr::Unary { op: UnaryOp::Sqrt, x: vh });
            let e = push(Expr::Const { value: f64::from(*eps as f32) });
            let den = push(bin(BinaryOp::Add, root, e));
            let q = push(bin(BinaryOp::Div, mh, den));
            let wd = push(Expr::Const { value: f64::from(*weight_decay as f32) });
            let decay = push(bin(BinaryOp::Mul, wd, w));
            let sum = push(bin(BinaryOp::Add, q, decay));
            let step = push(bin(BinaryOp::Mul, lr, sum));
            push(bin(BinaryOp::Sub, w, step))
        }
        other => return Err(format!("`{}` has no kernel form", other.name())),
    })
}
