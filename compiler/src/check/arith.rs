//! Arithmetic on values: numbers, booleans and tensors. Elementwise ops
//! broadcast by name; `@` contracts named dims (and counts its FLOPs and
//! saved activations).

use super::walk::{TVal, Val, Walker};
use crate::diag::Diag;
use crate::ir::{BinaryOp, CompareOp, DType, Op};
use crate::model::{Dim, OpCost, TensorType};
use crate::syntax::ast::BinOp;
use crate::syntax::span::Span;

impl Walker<'_> {
    pub(super) fn binary(&mut self, op: BinOp, a: Val, b: Val, sa: Span, sb: Span, span: Span) -> Val {
        use Val::*;
        match (op, a, b) {
            (_, Poison, _) | (_, _, Poison) => Poison,
            (BinOp::MatMul, Tensor(x), Tensor(y)) => self.matmul(x, y, sa, sb, span),
            (BinOp::MatMul, x, y) => self.err(
                Diag::error(format!("`@` needs two tensors, found {} and {}", x.kind(), y.kind()))
                    .at(span, "contraction of non-tensors")
                    .help("`a @ b` contracts named dims of two tensors; use `*` for numbers"),
            ),
            (op, Num(x), Num(y)) => match op {
                BinOp::Add => Num(x + y),
                BinOp::Sub => Num(x - y),
                BinOp::Mul => Num(x * y),
                BinOp::Div | BinOp::Rem if y == 0.0 => self.err(
                    Diag::error("division by zero")
                        .at(sb, "this is zero")
                        .help("check the dims used in this expression"),
                ),
                BinOp::Div => Num(x / y),
                BinOp::Rem => Num(x.rem_euclid(y)),
                BinOp::Pow => Num(x.powf(y)),
                BinOp::Eq => Bool(x == y),
                BinOp::Ne => Bool(x != y),
                BinOp::Lt => Bool(x < y),
                BinOp::Le => Bool(x <= y),
                BinOp::Gt => Bool(x > y),
                BinOp::Ge => Bool(x >= y),
                BinOp::And | BinOp::Or | BinOp::MatMul => self.err(
                    Diag::error(format!("`{}` needs booleans", op.symbol()))
                        .at(span, "numbers here")
                        .help("compare numbers first, e.g. `layer % 2 == 1 && layer > 0`"),
                ),
            },
            (BinOp::And, Bool(x), Bool(y)) => Bool(x && y),
            (BinOp::Or, Bool(x), Bool(y)) => Bool(x || y),
            (BinOp::Eq, Bool(x), Bool(y)) => Bool(x == y),
            (BinOp::Ne, Bool(x), Bool(y)) => Bool(x != y),
            (BinOp::Eq, Str(x), Str(y)) => Bool(x == y),
            (BinOp::Ne, Str(x), Str(y)) => Bool(x != y),
            (op @ (BinOp::Add | BinOp::Sub | BinOp::Mul | BinOp::Div), Tensor(x), Tensor(y)) => {
                self.elementwise(op, x, y, sa, sb, span)
            }
            (op @ (BinOp::Add | BinOp::Sub | BinOp::Mul | BinOp::Div | BinOp::Pow), Tensor(x), Num(c)) => {
                self.tensor_scalar(op, x, c, false, span)
            }
            (op @ (BinOp::Add | BinOp::Sub | BinOp::Mul), Num(c), Tensor(x)) => {
                self.tensor_scalar(op, x, c, true, span)
            }
            (op, Tensor(x), Tensor(y)) if compare_op(op).is_some() => self.compare(op, x, y, sa, sb, span),
            (op, Tensor(x), Num(c)) if compare_op(op).is_some() => {
                let k = self.emit(Op::Scalar { value: c }, vec![], TensorType::scalar(x.ty.dtype), sb);
                self.compare(op, x, k, sa, sb, span)
            }
            (op, Num(c), Tensor(y)) if compare_op(op).is_some() => {
                let k = self.emit(Op::Scalar { value: c }, vec![], TensorType::scalar(y.ty.dtype), sa);
                self.compare(op, k, y, sa, sb, span)
            }
            (op, x, y) => self.err(
                Diag::error(format!("`{}` cannot combine {} and {}", op.symbol(), x.kind(), y.kind()))
                    .at(span, "invalid operands")
                    .help("arithmetic works on numbers and tensors; comparisons on numbers and tensors"),
            ),
        }
    }

    /// A comparison of two tensors (or `&&`, `||` of two masks), broadcast by
    /// name as arithmetic is: a `bool` tensor.
    fn compare(&mut self, op: BinOp, x: TVal, y: TVal, sa: Span, sb: Span, span: Span) -> Val {
        let logic = matches!(op, BinOp::And | BinOp::Or);
        let dtype = x.ty.dtype;
        if dtype != y.ty.dtype || (logic && dtype != DType::Bool) {
            let want = if logic { "two bool masks" } else { "two tensors of one dtype" };
            return self.err(
                Diag::error(format!("`{}` needs {want}, found {} and {}", op.symbol(), x.ty, y.ty))
                    .at(sa, format!("{}", x.ty))
                    .also(sb, format!("{}", y.ty))
                    .help("cast one side with `cast(x, dtype)`; compare numbers with tensors of their kind"),
            );
        }
        let Some(dims) = self.broadcast(&x, &y, sa, sb) else {
            return Val::Poison;
        };
        let Some(cmp) = compare_op(op) else { return Val::Poison };
        let out = TensorType::new(DType::Bool, dims);
        Val::Tensor(self.emit(Op::Compare { op: cmp }, vec![x.id, y.id], out, span))
    }

    /// The dims of `x ∘ y` broadcast by name: x's, then y's new ones.
    fn broadcast(&mut self, x: &TVal, y: &TVal, sa: Span, sb: Span) -> Option<Vec<Dim>> {
        let mut dims = x.ty.dims.clone();
        for d in &y.ty.dims {
            match x.ty.dim(&d.name) {
                Some(xd) if xd.size != d.size => {
                    self.err(
                        Diag::error(format!(
                            "dim `{}` has size {} on the left but {} on the right",
                            d.name, xd.size, d.size
                        ))
                        .at(sa, format!("{}", x.ty))
                        .also(sb, format!("{}", y.ty))
                        .help("broadcasting is by name: dims of the same name must have the same size"),
                    );
                    return None;
                }
                Some(_) => {}
                None => dims.push(d.clone()),
            }
        }
        Some(dims)
    }

    /// `x ∘ c` (or `c ∘ x` when `scalar_first`) for a tensor and a number.
    fn tensor_scalar(&mut self, op: BinOp, x: TVal, c: f64, scalar_first: bool, span: Span) -> Val {
        // Positions shift by whole numbers (`k_pos + 4`); they stay exact.
        let shift = x.ty.dtype == DType::I32 && matches!(op, BinOp::Add | BinOp::Sub) && c.fract() == 0.0;
        if !x.ty.dtype.is_float() && !shift {
            return self.err(
                Diag::error(format!("arithmetic on a {} tensor", x.ty.dtype.name()))
                    .at(span, "integer or boolean tensor")
                    .help(
                        "integer tensors only shift by whole numbers (`iota(seq) + 2`); cast it first: `cast(x, f32)`",
                    ),
            );
        }
        if op == BinOp::Pow {
            let saved = self.act_size(&x.ty);
            self.add_cost(OpCost { act_none: saved, act_selective: saved, ..OpCost::default() });
            return Val::Tensor(self.emit(Op::Pow { exp: c }, vec![x.id], x.ty, span));
        }
        let k = self.emit(Op::Scalar { value: c }, vec![], TensorType::scalar(x.ty.dtype), span);
        let ir_op = match op {
            BinOp::Add => BinaryOp::Add,
            BinOp::Sub => BinaryOp::Sub,
            BinOp::Mul => BinaryOp::Mul,
            _ => BinaryOp::Div,
        };
        let ins = if scalar_first { vec![k.id, x.id] } else { vec![x.id, k.id] };
        Val::Tensor(self.emit(Op::Binary { op: ir_op }, ins, x.ty, span))
    }

    /// Broadcast by name: the result has the left operand's dims, then the right one's new dims.
    pub(super) fn elementwise(&mut self, op: BinOp, x: TVal, y: TVal, sa: Span, sb: Span, span: Span) -> Val {
        if x.ty.dtype != y.ty.dtype {
            return self.err(
                Diag::error(format!(
                    "dtype mismatch: `{}` of {} and {}",
                    op.symbol(),
                    x.ty.dtype.name(),
                    y.ty.dtype.name()
                ))
                .at(sa, format!("{}", x.ty))
                .also(sb, format!("{}", y.ty))
                .help("cast one side with `cast(x, dtype)`"),
            );
        }
        let Some(dims) = self.broadcast(&x, &y, sa, sb) else {
            return Val::Poison;
        };
        let out = TensorType::new(x.ty.dtype, dims);
        if matches!(op, BinOp::Mul | BinOp::Div) {
            // Backward of a product needs both operands (parameters are not activations).
            let mut saved = 0.0;
            for v in [&x, &y] {
                if v.param.is_none() && v.ty.numel() > 1 {
                    saved += self.act_size(&v.ty);
                }
            }
            self.add_cost(OpCost { act_none: saved, act_selective: saved, ..OpCost::default() });
        }
        let ir_op = match op {
            BinOp::Add => BinaryOp::Add,
            BinOp::Sub => BinaryOp::Sub,
            BinOp::Mul => BinaryOp::Mul,
            _ => BinaryOp::Div,
        };
        Val::Tensor(self.emit(Op::Binary { op: ir_op }, vec![x.id, y.id], out, span))
    }

    /// `a @ b`: contracts the trailing dims of `a` that `b` also has; other
    /// shared dims are batch dims. Result: `a`'s other dims, then `b`'s new dims.
    pub(super) fn matmul(&mut self, x: TVal, y: TVal, sa: Span, sb: Span, span: Span) -> Val {
        if x.ty.dtype != y.ty.dtype || !x.ty.dtype.is_float() {
            return self.err(
                Diag::error(format!(
                    "`@` needs two float tensors of one dtype, found {} and {}",
                    x.ty.dtype.name(),
                    y.ty.dtype.name()
                ))
                .at(sa, format!("{}", x.ty))
                .also(sb, format!("{}", y.ty))
                .help("cast with `cast(x, dtype)`"),
            );
        }
        let mut contract = Vec::new();
        for d in x.ty.dims.iter().rev() {
            if y.ty.has(&d.name) {
                contract.push(d.clone());
            } else {
                break;
            }
        }
        contract.reverse(); // in the left operand's order
        if contract.is_empty() {
            let last = x.ty.dims.last().map(|d| d.name.clone()).unwrap_or_else(|| "(none)".into());
            return self.err(
                Diag::error(format!("`@` has nothing to contract: the last dim of the left operand, `{last}`, is not a dim of the right operand"))
                    .at(sa, format!("{}", x.ty))
                    .also(sb, format!("{}", y.ty))
                    .help("`a @ b` contracts the trailing dims of `a` that `b` also has; rename or reorder dims so they match"),
            );
        }
        for d in &contract {
            let yd = y.ty.dim(&d.name).expect("shared");
            if yd.size != d.size {
                return self.err(
                    Diag::error(format!(
                        "contracted dim `{}` has size {} on the left but {} on the right",
                        d.name, d.size, yd.size
                    ))
                    .at(sa, format!("{}", x.ty))
                    .also(sb, format!("{}", y.ty))
                    .help("both operands must agree on the size of every contracted dim"),
                );
            }
        }
        let mut dims: Vec<Dim> = x.ty.dims[..x.ty.dims.len() - contract.len()].to_vec();
        for d in &y.ty.dims {
            if contract.iter().any(|c| c.name == d.name) {
                continue;
            }
            match dims.iter().find(|o| o.name == d.name) {
                Some(o) if o.size != d.size => {
                    return self.err(
                        Diag::error(format!(
                            "batch dim `{}` has size {} on the left but {} on the right",
                            d.name, o.size, d.size
                        ))
                        .at(span, "mismatched shared dim")
                        .help("dims shared by both operands and not contracted must have one size"),
                    );
                }
                Some(_) => {}
                None => dims.push(d.clone()),
            }
        }
        let out = TensorType::new(x.ty.dtype, dims);
        let useful: f64 = out
            .dims
            .iter()
            .chain(x.ty.dims.iter())
            .filter(|d| d.name == "slot")
            .take(1)
            .map(|d| self.slot_useful.get(&d.size).copied().unwrap_or(1.0))
            .product();
        let flops = 2.0 * out.numel() as f64 * contract.iter().map(|d| d.size as f64).product::<f64>() * useful;
        let mut saved = 0.0;
        for v in [&x, &y] {
            if v.param.is_none() {
                saved += self.act_size(&v.ty);
            }
        }
        let split = self.compute_split(out.dims.iter().chain(contract.iter()));
        let out_split = self.compute_split(out.dims.iter());
        let partial_bytes = if self.compute_split(contract.iter()) > 1 {
            let elem = if out.dtype.is_float() { self.act_bytes } else { out.dtype.bytes() };
            out.numel() as f64 * elem as f64 / out_split as f64
        } else {
            0.0
        };
        self.add_cost(OpCost {
            flops,
            attn_flops: 0.0,
            act_none: saved,
            act_selective: saved,
            rank_flops: flops / split as f64,
            rank_attn_flops: 0.0,
            kernels: 1.0,
            partial_bytes,
            reductions: if partial_bytes > 0.0 { 1.0 } else { 0.0 },
            ..OpCost::default()
        });
        Val::Tensor(self.emit(
            Op::MatMul { contract: contract.iter().map(|d| d.name.clone()).collect() },
            vec![x.id, y.id],
            out,
            span,
        ))
    }
}

/// The IR comparison of a spec operator, for tensors.
fn compare_op(op: BinOp) -> Option<CompareOp> {
    Some(match op {
        BinOp::Lt => CompareOp::Lt,
        BinOp::Le => CompareOp::Le,
        BinOp::Gt => CompareOp::Gt,
        BinOp::Ge => CompareOp::Ge,
        BinOp::Eq => CompareOp::Eq,
        BinOp::Ne => CompareOp::Ne,
        BinOp::And => CompareOp::And,
        BinOp::Or => CompareOp::Or,
        _ => return None,
    })
}
