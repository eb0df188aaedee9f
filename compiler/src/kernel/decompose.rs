//! Which ops a kernel can compute, and as which primitive expressions: the
//! one place that decomposes an op for fusion.
//!
//! Elementwise ops map one to one. The optimizer's composite ops are
//! written out in primitives, in the order of operations of their
//! node-by-node kernels (`adam_moment`: β·m + (1 − β)·(g·s)², `adam_step`:
//! w − lr·((m / bc1) / (√(v / bc2) + ε) + wd·w)), so a fused update computes
//! the same f32 values. `adam_step` reads its three hyperparameters (lr and
//! the two bias corrections) as elements of one operand.
//!
//! The row ops reduce over their normalised dim, which must be the kernel's
//! innermost loop dim ([`row_dim`]), in the order of the runtime's row
//! functions (`exec::kernels::norm_stats`, `norm_row`, `norm_grad_x_row`):
//! `layer_norm`: mean = Σx / n, d = x − mean, inv = 1 / √(Σd² / n + ε),
//! y = d·inv (·gain) (+ bias); `rms_norm` the same with mean 0;
//! `norm_grad_x`: with w = g·gain, x̂ = (x − mean)·inv,
//! dx = inv·((w − Σw / n) − x̂·(Σ(w·(x − mean))·inv / n)), the last sum in
//! the same sweep as Σ(x − mean)²; `softmax`: m = max x, e = exp(x − m),
//! y = e·(1 / Σe), log-softmax y = x − (m + ln Σe); `softmax_grad` (from y
//! and g): y·(g − Σg·y), log: g − exp(y)·Σg (`exec::kernels::softmax`,
//! `softmax_grad`, with the elementwise ops' exp and ln).
//!
//! Cross-entropy reduces over the whole batch, so it is more than one
//! kernel ([`cross_entropy_rows`], [`cross_entropy_grad`]; the fusion pass
//! places them): per row (classes innermost, target t, smoothing s, c
//! classes) m = max x, lse = m + ln Σexp(x − m), x_t = Σ[j = t]·x,
//! loss = (1 − s)·(lse − x_t) + s·(lse − Σx / c), 0 on an ignored row; the
//! mean over the kept rows; and its gradient
//! (exp(x − m)·(1 / Σexp(x − m)) − ((1 − s)·[j = t] + s / c))·(g / kept),
//! 0 on an ignored row. The library kernels it replaces sum in f64
//! (`exec::kernels::cross_entropy`); these in f32, the order of every row
//! sum, as a GPU's kernels do.

use super::Expr;
use crate::ir::{BinaryOp, DType, Op, ReduceOp, UnaryOp};

/// Whether a kernel can compute `op` (a row op: where [`row_dim`] is the
/// innermost loop dim).
pub fn decomposes(op: &Op) -> bool {
    op.is_elementwise()
        || matches!(op, Op::AdamMoment { .. } | Op::AdamStep { .. })
        || matches!(op, Op::Cast { dtype } if dtype.is_float())
        || row_dim(op).is_some()
}

/// The dim a row op reduces over, which its kernel must have innermost.
pub fn row_dim(op: &Op) -> Option<&str> {
    match op {
        Op::LayerNorm { dim, .. }
        | Op::RmsNorm { dim, .. }
        | Op::NormGradX { dim, .. }
        | Op::Softmax { dim, .. }
        | Op::SoftmaxGrad { dim, .. } => Some(dim),
        _ => None,
    }
}

/// Whether `op` reads operand `i` by element index rather than at the loop
/// position (so its dims need not be among the loop's).
pub fn reads_whole(op: &Op, i: usize) -> bool {
    matches!(op, Op::AdamStep { .. }) && i == 3
}

/// Append the expressions of `op` over operand values `x` (body indices;
/// for an operand read whole, its argument index) to `body`, and return the
/// value of the result. `rng` is the op's random stream (dropout); `row`
/// the length of the innermost loop dim (a row op's n).
pub fn expand(op: &Op, x: &[usize], rng: Option<u64>, row: u64, body: &mut Vec<Expr>) -> Result<usize, String> {
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
        Op::LayerNorm { eps, gain, bias, .. } => {
            let (d, inv) = norm_stats(x[0], *eps, false, row, &mut push);
            let mut y = push(Expr::Binary { op: BinaryOp::Mul, a: d, b: inv });
            if *gain {
                y = push(Expr::Binary { op: BinaryOp::Mul, a: y, b: x[1] });
            }
            if *bias {
                y = push(Expr::Binary { op: BinaryOp::Add, a: y, b: x[1 + usize::from(*gain)] });
            }
            y
        }
        Op::RmsNorm { eps, gain, .. } => {
            let (d, inv) = norm_stats(x[0], *eps, true, row, &mut push);
            let y = push(Expr::Binary { op: BinaryOp::Mul, a: d, b: inv });
            if *gain { push(Expr::Binary { op: BinaryOp::Mul, a: y, b: x[1] }) } else { y }
        }
        Op::NormGradX { eps, gain, rms, .. } => {
            let bin = |op, a, b| Expr::Binary { op, a, b };
            let (xm, inv) = norm_stats(x[0], *eps, *rms, row, &mut push);
            let g = x[1 + usize::from(*gain)];
            // w = g·gain (g·1 = g without one).
            let w = if *gain { push(bin(BinaryOp::Mul, g, x[1])) } else { g };
            let n = push(Expr::Const { value: row as f64 });
            let centred = if *rms {
                w
            } else {
                let s1 = push(Expr::Reduce { x: w, op: crate::ir::ReduceOp::Sum });
                let m1 = push(bin(BinaryOp::Div, s1, n));
                push(bin(BinaryOp::Sub, w, m1))
            };
            let t = push(bin(BinaryOp::Mul, w, xm));
            let s2 = push(Expr::Reduce { x: t, op: crate::ir::ReduceOp::Sum });
            let s2 = push(bin(BinaryOp::Mul, s2, inv));
            let m2 = push(bin(BinaryOp::Div, s2, n));
            let xhat = push(bin(BinaryOp::Mul, xm, inv));
            let proj = push(bin(BinaryOp::Mul, xhat, m2));
            let inner = push(bin(BinaryOp::Sub, centred, proj));
            push(bin(BinaryOp::Mul, inv, inner))
        }
        Op::Softmax { log, .. } => {
            let bin = |op, a, b| Expr::Binary { op, a, b };
            let m = push(Expr::Reduce { x: x[0], op: crate::ir::ReduceOp::Max });
            let d = push(bin(BinaryOp::Sub, x[0], m));
            let e = push(Expr::Unary { op: UnaryOp::Exp, x: d });
            let s = push(Expr::Reduce { x: e, op: crate::ir::ReduceOp::Sum });
            if *log {
                let l = push(Expr::Unary { op: UnaryOp::Log, x: s });
                let lse = push(bin(BinaryOp::Add, m, l));
                push(bin(BinaryOp::Sub, x[0], lse))
            } else {
                let one = push(Expr::Const { value: 1.0 });
                let inv = push(bin(BinaryOp::Div, one, s));
                push(bin(BinaryOp::Mul, e, inv))
            }
        }
        Op::SoftmaxGrad { log, .. } => {
            let bin = |op, a, b| Expr::Binary { op, a, b };
            let (y, g) = (x[0], x[1]);
            if *log {
                let s = push(Expr::Reduce { x: g, op: crate::ir::ReduceOp::Sum });
                let e = push(Expr::Unary { op: UnaryOp::Exp, x: y });
                let es = push(bin(BinaryOp::Mul, e, s));
                push(bin(BinaryOp::Sub, g, es))
            } else {
                let gy = push(bin(BinaryOp::Mul, g, y));
                let s = push(Expr::Reduce { x: gy, op: crate::ir::ReduceOp::Sum });
                let d = push(bin(BinaryOp::Sub, g, s));
                push(bin(BinaryOp::Mul, y, d))
            }
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

/// A row's x − mean (x itself under RMS, whose mean is 0) and
/// 1 / √(Σ(x − mean)² / n + ε), as `exec::kernels::norm_stats` computes them.
fn norm_stats(x: usize, eps: f64, rms: bool, row: u64, push: &mut impl FnMut(Expr) -> usize) -> (usize, usize) {
    let bin = |op, a, b| Expr::Binary { op, a, b };
    let n = push(Expr::Const { value: row as f64 });
    let d = if rms {
        x
    } else {
        let s = push(Expr::Reduce { x, op: crate::ir::ReduceOp::Sum });
        let mean = push(bin(BinaryOp::Div, s, n));
        push(bin(BinaryOp::Sub, x, mean))
    };
    let sq = push(bin(BinaryOp::Mul, d, d));
    let var = push(Expr::Reduce { x: sq, op: crate::ir::ReduceOp::Sum });
    let v = push(bin(BinaryOp::Div, var, n));
    let e = push(Expr::Const { value: f64::from(eps as f32) });
    let ve = push(bin(BinaryOp::Add, v, e));
    let root = push(Expr::Unary { op: UnaryOp::Sqrt, x: ve });
    let one = push(Expr::Const { value: 1.0 });
    let inv = push(bin(BinaryOp::Div, one, root));
    (d, inv)
}

/// 1 where class id `t` is not `ignore` (every row without one).
pub fn kept(t: usize, ignore: Option<i64>, body: &mut Vec<Expr>) -> Option<usize> {
    let mut push = |e: Expr| {
        body.push(e);
        body.len() - 1
    };
    let i = push(Expr::Const { value: ignore? as f64 });
    let is = push(Expr::Equal { a: t, b: i });
    let one = push(Expr::Const { value: 1.0 });
    Some(push(Expr::Binary { op: BinaryOp::Sub, a: one, b: is }))
}

/// One row's cross-entropy of logits `x` (the row: the kernel's innermost
/// dim, `c` classes) against class id `t`, with label smoothing; 0 on a row
/// whose target is `ignore`. Returns the row's loss and, with `ignore`,
/// whether the row counts (1 or 0).
pub fn cross_entropy_rows(
    x: usize,
    t: usize,
    smoothing: f64,
    ignore: Option<i64>,
    c: u64,
    body: &mut Vec<Expr>,
) -> (usize, Option<usize>) {
    let (m, _, sum) = exp_sum(x, body);
    let mut push = |e: Expr| {
        body.push(e);
        body.len() - 1
    };
    let bin = |op, a, b| Expr::Binary { op, a, b };
    let l = push(Expr::Unary { op: UnaryOp::Log, x: sum });
    let lse = push(bin(BinaryOp::Add, m, l));
    let j = push(Expr::Index);
    let hit = push(Expr::Equal { a: j, b: t });
    let picked = push(bin(BinaryOp::Mul, hit, x));
    let xt = push(Expr::Reduce { x: picked, op: ReduceOp::Sum });
    let mut loss = push(bin(BinaryOp::Sub, lse, xt));
    if smoothing > 0.0 {
        let sx = push(Expr::Reduce { x, op: ReduceOp::Sum });
        let n = push(Expr::Const { value: c as f64 });
        let mean = push(bin(BinaryOp::Div, sx, n));
        let smooth = push(bin(BinaryOp::Sub, lse, mean));
        let a = push(Expr::Const { value: 1.0 - smoothing });
        let b = push(Expr::Const { value: smoothing });
        let l1 = push(bin(BinaryOp::Mul, a, loss));
        let l2 = push(bin(BinaryOp::Mul, b, smooth));
        loss = push(bin(BinaryOp::Add, l1, l2));
    }
    let keep = kept(t, ignore, body);
    if let Some(k) = keep {
        body.push(Expr::Binary { op: BinaryOp::Mul, a: loss, b: k });
        loss = body.len() - 1;
    }
    (loss, keep)
}

/// d loss / d logits of the mean cross-entropy, times the upstream scalar
/// `g`, at logits `x` (the row innermost, `c` classes) and class id `t`.
/// `count` is the number of rows that count: a body value (the kept rows,
/// with `ignore`) or all `rows`.
#[allow(clippy::too_many_arguments)]
pub fn cross_entropy_grad(
    x: usize,
    t: usize,
    g: usize,
    count: Result<usize, u64>,
    smoothing: f64,
    ignore: Option<i64>,
    c: u64,
    body: &mut Vec<Expr>,
) -> usize {
    let (_, e, sum) = exp_sum(x, body);
    let mut push = |e: Expr| {
        body.push(e);
        body.len() - 1
    };
    let bin = |op, a, b| Expr::Binary { op, a, b };
    let one = push(Expr::Const { value: 1.0 });
    let inv = push(bin(BinaryOp::Div, one, sum));
    let p = push(bin(BinaryOp::Mul, e, inv));
    let j = push(Expr::Index);
    let mut target = push(Expr::Equal { a: j, b: t });
    if smoothing > 0.0 {
        let a = push(Expr::Const { value: 1.0 - smoothing });
        let b = push(Expr::Const { value: smoothing / c as f64 });
        let hit = push(bin(BinaryOp::Mul, target, a));
        target = push(bin(BinaryOp::Add, hit, b));
    }
    let diff = push(bin(BinaryOp::Sub, p, target));
    let den = counted(count, body);
    body.push(Expr::Binary { op: BinaryOp::Div, a: g, b: den });
    body.push(Expr::Binary { op: BinaryOp::Mul, a: diff, b: body.len() - 1 });
    let mut out = body.len() - 1;
    if let Some(k) = kept(t, ignore, body) {
        body.push(Expr::Binary { op: BinaryOp::Mul, a: out, b: k });
        out = body.len() - 1;
    }
    out
}

/// The mean of a sum over `count` rows (a body value, with no rows counting
/// as one, or a constant).
pub fn mean_of(sum: usize, count: Result<usize, u64>, body: &mut Vec<Expr>) -> usize {
    let den = counted(count, body);
    body.push(Expr::Binary { op: BinaryOp::Div, a: sum, b: den });
    body.len() - 1
}

/// A row's max m, exp(x − m) and Σexp(x − m).
fn exp_sum(x: usize, body: &mut Vec<Expr>) -> (usize, usize, usize) {
    let mut push = |e: Expr| {
        body.push(e);
        body.len() - 1
    };
    let m = push(Expr::Reduce { x, op: ReduceOp::Max });
    let d = push(Expr::Binary { op: BinaryOp::Sub, a: x, b: m });
    let e = push(Expr::Unary { op: UnaryOp::Exp, x: d });
    (m, e, push(Expr::Reduce { x: e, op: ReduceOp::Sum }))
}

/// The number of rows that count: a body value (none counting as one: the
/// loss is then 0) or a constant.
fn counted(count: Result<usize, u64>, body: &mut Vec<Expr>) -> usize {
    let mut push = |e: Expr| {
        body.push(e);
        body.len() - 1
    };
    match count {
        Ok(n) => {
            let zero = push(Expr::Const { value: 0.0 });
            let none = push(Expr::Equal { a: n, b: zero });
            push(Expr::Binary { op: BinaryOp::Add, a: n, b: none })
        }
        Err(rows) => push(Expr::Const { value: rows.max(1) as f64 }),
    }
}
