//! The built-in ops: their arguments and their named-dim type rules, and what
//! each contributes to FLOPs and saved activations.
//!
//! Structural ops (split, merge, rename, concat, patches) are in
//! `structure.rs`, attention in `attention.rs`, routing in `moe.rs`.

mod attention;
mod conv;
mod moe;
mod structure;

use super::walk::{Frame, RouteVal, TVal, Val, Walker};
use crate::diag::{Diag, unknown_help};
use crate::ir::{Op, ReduceOp, UnaryOp};
use crate::model::{Dim, OpCost, TensorType};
use crate::syntax::ast::{Arg, DType, Expr, ExprKind, Ident};
use crate::syntax::span::Span;
use std::collections::HashMap;
use std::rc::Rc;

pub(super) struct OpSig {
    pub name: &'static str,
    /// Minimum and maximum positional arguments.
    pub pos: (usize, usize),
    pub kw: &'static [&'static str],
}

const fn op(name: &'static str, min: usize, max: usize, kw: &'static [&'static str]) -> OpSig {
    OpSig { name, pos: (min, max), kw }
}

const MANY: usize = usize::MAX;

pub(in crate::check) const OPS: &[OpSig] = &[
    // elementwise (also constant math on numbers)
    op("exp", 1, 1, &[]),
    op("log", 1, 1, &[]),
    op("sqrt", 1, 1, &[]),
    op("rsqrt", 1, 1, &[]),
    op("tanh", 1, 1, &[]),
    op("abs", 1, 1, &[]),
    op("square", 1, 1, &[]),
    op("gelu", 1, 1, &["approximate"]),
    op("gelu_tanh", 1, 1, &[]),
    op("silu", 1, 1, &[]),
    op("relu", 1, 1, &[]),
    op("sigmoid", 1, 1, &[]),
    op("ceil", 1, 1, &[]),
    op("floor", 1, 1, &[]),
    op("min", 2, MANY, &[]),
    op("max", 2, MANY, &[]),
    op("cast", 2, 2, &[]),
    // reductions
    op("sum", 2, MANY, &[]),
    op("mean", 2, MANY, &[]),
    op("amax", 2, MANY, &[]),
    op("softmax", 2, 2, &[]),
    op("log_softmax", 2, 2, &[]),
    op("layer_norm", 2, 2, &["gain", "bias", "eps"]),
    op("rms_norm", 2, 2, &["gain", "eps"]),
    // structure
    op("embed", 2, 2, &[]),
    op("split", 2, 2, &[]),
    op("merge", 2, 2, &[]),
    op("rename", 2, MANY, &[]),
    op("concat", 2, MANY, &["over", "into"]),
    op("permute", 2, 2, &[]),
    op("index", 3, 3, &[]),
    op("dropout", 2, 2, &[]),
    // attention
    op(
        "attention",
        3,
        3,
        &["causal", "mask", "dropout", "rel_bias", "rel_pos", "pos_bias_u", "pos_bias_v", "max_distance", "window"],
    ),
    op("rope", 1, 1, &["theta", "fraction"]),
    op("sinusoid", 2, 2, &[]),
    op("iota", 1, 1, &["start"]),
    op("where", 3, 3, &[]),
    op("argmax", 2, 2, &[]),
    op("gather", 3, 3, &[]),
    op("slice", 2, 2, &["start", "size"]),
    op("conv", 3, 3, &["window", "stride", "padding", "dilation", "per"]),
    op("max_pool", 2, 2, &["size", "stride", "padding"]),
    op("avg_pool", 2, 2, &["size", "stride", "padding"]),
    // losses
    op("cross_entropy", 2, 2, &["label_smoothing", "ignore"]),
    // vision
    op("patches", 1, 1, &["size", "into"]),
    // mixture of experts
    op("top_k", 1, 1, &["k", "capacity"]),
    op("dispatch", 2, 2, &[]),
    op("combine", 2, 2, &[]),
    op("load_balance", 1, 1, &[]),
    op("z_loss", 1, 1, &[]),
];

/// Names of every built-in op (for documentation checks and tools).
pub fn op_names() -> impl Iterator<Item = &'static str> {
    OPS.iter().map(|o| o.name)
}

/// Keyword arguments an op accepts.
pub fn op_keywords(name: &str) -> &'static [&'static str] {
    OPS.iter().find(|o| o.name == name).map(|o| o.kw).unwrap_or(&[])
}

pub(in crate::check) fn is_op(name: &str) -> bool {
    OPS.iter().any(|o| o.name == name)
}

fn sig(name: &str) -> &'static OpSig {
    OPS.iter().find(|o| o.name == name).expect("known op")
}

/// `from -> to` as written: the dims on each side, whether each side was a
/// `[list]`, and the span.
pub(super) type DimMapArg<'e> = (&'e [Ident], &'e [Ident], bool, bool, Span);

/// Arguments of one op call, split into positional and keyword.
pub(super) struct Args<'e> {
    pub(super) pos: Vec<&'e Expr>,
    pub(super) kw: HashMap<&'e str, &'e Expr>,
    pub(super) maps: Vec<DimMapArg<'e>>,
}

const UNARY_FLOAT: &[&str] =
    &["exp", "log", "sqrt", "rsqrt", "tanh", "abs", "square", "gelu", "gelu_tanh", "silu", "relu", "sigmoid"];

impl Walker<'_> {
    pub(in crate::check) fn op(&mut self, frame: &mut Frame, name: &Ident, args: &[Arg], span: Span) -> Val {
        let s = sig(&name.name);
        let mut a = Args { pos: Vec::new(), kw: HashMap::new(), maps: Vec::new() };
        for arg in args {
            match arg {
                Arg::Pos(e) => a.pos.push(e),
                Arg::Kw(k, e) => {
                    if !s.kw.contains(&k.name.as_str()) {
                        let help = if s.kw.is_empty() {
                            format!("`{}` takes no keyword arguments", s.name)
                        } else {
                            unknown_help("keyword", &k.name, s.kw.iter().copied())
                        };
                        return self.err(
                            Diag::error(format!("`{}` has no argument `{}`", s.name, k.name))
                                .at(k.span, "unknown keyword argument")
                                .help(help),
                        );
                    }
                    a.kw.insert(k.name.as_str(), e);
                }
                Arg::DimMap { from, to, from_list, to_list, span } => {
                    a.maps.push((from.as_slice(), to.as_slice(), *from_list, *to_list, *span))
                }
            }
        }
        if !a.maps.is_empty()
            && !matches!(s.name, "rename" | "merge" | "split" | "slice" | "conv" | "max_pool" | "avg_pool")
        {
            return self.err(
                Diag::error(format!("`{}` does not take a dim mapping", s.name))
                    .at(a.maps[0].4, "`a -> b` here")
                    .help("only `rename`, `merge`, `split`, `slice`, `conv` and the pools take `a -> b`"),
            );
        }
        let npos = a.pos.len() + a.maps.len();
        if npos < s.pos.0 || npos > s.pos.1 {
            let expect = match s.pos {
                (a, b) if a == b => format!("{a}"),
                (a, MANY) => format!("at least {a}"),
                (a, b) => format!("{a} to {b}"),
            };
            return self.err(
                Diag::error(format!("`{}` takes {expect} positional arguments, got {npos}", s.name))
                    .at(span, "wrong number of arguments")
                    .help(format!("see `{}` in docs/language.md", s.name)),
            );
        }
        let n = s.name;
        match n {
            _ if UNARY_FLOAT.contains(&n) || matches!(n, "ceil" | "floor") => self.unary(frame, n, &a, span),
            "min" | "max" => {
                let vals: Vec<Val> = a.pos.iter().map(|e| self.expr(frame, e)).collect();
                let mut out = Vec::new();
                for (v, e) in vals.into_iter().zip(&a.pos) {
                    match v {
                        Val::Num(x) => out.push(x),
                        Val::Poison => return Val::Poison,
                        Val::Tensor(_) => {
                            return self.err(Diag::error(format!("`{n}` of tensors")).at(e.span, "a tensor").help(
                                format!("`{n}` takes numbers; to reduce a tensor over a dim use `amax(x, dim)`"),
                            ));
                        }
                        other => {
                            return self.err(
                                Diag::error(format!("`{n}` needs numbers, found {}", other.kind()))
                                    .at(e.span, "not a number")
                                    .help("pass numbers"),
                            );
                        }
                    }
                }
                let r = if n == "min" {
                    out.into_iter().fold(f64::INFINITY, f64::min)
                } else {
                    out.into_iter().fold(f64::NEG_INFINITY, f64::max)
                };
                Val::Num(r)
            }
            "cast" => {
                let Some(x) = self.tensor(frame, a.pos[0]) else {
                    return Val::Poison;
                };
                let dt = match &a.pos[1].kind {
                    ExprKind::Name(d) => DType::parse(d),
                    _ => None,
                };
                let Some(dt) = dt else {
                    return self.err(
                        Diag::error("`cast` needs a dtype")
                            .at(a.pos[1].span, "not a dtype")
                            .help("one of f32, bf16, f16, i32, i64, bool"),
                    );
                };
                Val::Tensor(self.emit(Op::Cast { dtype: dt }, vec![x.id], TensorType::new(dt, x.ty.dims), span))
            }
            "sum" | "mean" | "amax" => {
                let Some(x) = self.tensor(frame, a.pos[0]) else {
                    return Val::Poison;
                };
                let mut dims = x.ty.dims.clone();
                let mut reduced = Vec::new();
                for e in &a.pos[1..] {
                    let Some(d) = self.dim_of(frame, e, &x.ty) else {
                        return Val::Poison;
                    };
                    dims.retain(|o| o.name != d.name);
                    if !reduced.contains(&d.name) {
                        reduced.push(d.name);
                    }
                }
                if n != "sum" {
                    self.save(&x.ty);
                }
                let op = match n {
                    "sum" => ReduceOp::Sum,
                    "mean" => ReduceOp::Mean,
                    _ => ReduceOp::Max,
                };
                let out = TensorType::new(x.ty.dtype, dims);
                Val::Tensor(self.emit(Op::Reduce { op, dims: reduced }, vec![x.id], out, span))
            }
            "softmax" | "log_softmax" => {
                let Some(x) = self.float_tensor(frame, a.pos[0], n) else {
                    return Val::Poison;
                };
                let Some(d) = self.dim_of(frame, a.pos[1], &x.ty) else {
                    return Val::Poison;
                };
                self.save(&x.ty);
                let op = Op::Softmax { dim: d.name, log: n == "log_softmax" };
                Val::Tensor(self.emit(op, vec![x.id], x.ty, span))
            }
            "layer_norm" | "rms_norm" => {
                let Some(x) = self.float_tensor(frame, a.pos[0], n) else {
                    return Val::Poison;
                };
                let Some(d) = self.dim_of(frame, a.pos[1], &x.ty) else {
                    return Val::Poison;
                };
                let mut ins = vec![x.id];
                let mut has = [false; 2];
                for (j, k) in ["gain", "bias"].into_iter().enumerate() {
                    if let Some(e) = a.kw.get(k) {
                        let Some(g) = self.tensor(frame, e) else {
                            return Val::Poison;
                        };
                        ins.push(g.id);
                        has[j] = true;
                        if g.ty.dims != [d.clone()] || g.ty.dtype != x.ty.dtype {
                            return self.err(
                                Diag::error(format!(
                                    "`{k}` of `{n}` must be {}[{}={}], found {}",
                                    x.ty.dtype.name(),
                                    d.name,
                                    d.size,
                                    g.ty
                                ))
                                .at(e.span, "wrong shape")
                                .help(format!("declare it as `param {k}: [{}]`", d.name)),
                            );
                        }
                    }
                }
                let eps = match a.kw.get("eps") {
                    Some(e) => match self.positive(frame, e, "eps") {
                        Some(v) => v,
                        None => return Val::Poison,
                    },
                    None if n == "layer_norm" => 1e-5,
                    None => 1e-6,
                };
                self.save(&x.ty);
                let op = if n == "layer_norm" {
                    Op::LayerNorm { dim: d.name, eps, gain: has[0], bias: has[1] }
                } else {
                    Op::RmsNorm { dim: d.name, eps, gain: has[0] }
                };
                Val::Tensor(self.emit(op, ins, x.ty, span))
            }
            "embed" => {
                let Some(table) = self.float_tensor(frame, a.pos[0], n) else {
                    return Val::Poison;
                };
                let Some(ids) = self.tensor(frame, a.pos[1]) else {
                    return Val::Poison;
                };
                if !matches!(ids.ty.dtype, DType::I32 | DType::I64) {
                    return self.err(
                        Diag::error(format!("`embed` ids must be i32 or i64, found {}", ids.ty.dtype.name()))
                            .at(a.pos[1].span, "not integer ids")
                            .help("token ids are integers: `input tokens: i32[batch, seq]`"),
                    );
                }
                if table.ty.dims.len() < 2 {
                    return self.err(
                        Diag::error(format!("`embed` table must have a row dim and feature dims, found {}", table.ty))
                            .at(a.pos[0].span, "not a table")
                            .help("declare the table as `param wte: [vocab, embed]`"),
                    );
                }
                let rows = &table.ty.dims[0];
                if ids.ty.has(&rows.name) {
                    return self.err(
                        Diag::error(format!("ids already have the table's row dim `{}`", rows.name))
                            .at(a.pos[1].span, format!("{}", ids.ty))
                            .help("ids index the first dim of the table; pass integer ids without it"),
                    );
                }
                let mut dims = ids.ty.dims.clone();
                for d in &table.ty.dims[1..] {
                    if ids.ty.has(&d.name) {
                        return self.err(
                            Diag::error(format!("dim `{}` is in both the ids and the table's features", d.name))
                                .at(span, "ambiguous result")
                                .help("rename one of them"),
                        );
                    }
                    dims.push(d.clone());
                }
                self.save(&ids.ty);
                let out = TensorType::new(table.ty.dtype, dims);
                // A table split by rows on a model axis gives each rank the
                // rows it holds and zeros elsewhere: a partial sum to reduce.
                if self.compute_split(std::iter::once(rows)) > 1 {
                    let elem = if out.dtype.is_float() { self.act_bytes } else { out.dtype.bytes() };
                    let bytes = out.numel() as f64 * elem as f64 / self.compute_split(out.dims.iter()) as f64;
                    self.add_cost(OpCost { partial_bytes: bytes, reductions: 1.0, ..OpCost::default() });
                }
                Val::Tensor(self.emit(Op::Embed, vec![table.id, ids.id], out, span))
            }
            "split" => self.split(frame, &a, span),
            "merge" => self.merge(frame, &a, span),
            "rename" => self.rename(frame, &a, span),
            "concat" => self.concat(frame, &a, span),
            "conv" => self.conv(frame, &a, span),
            "slice" => self.slice(frame, &a, span),
            "max_pool" | "avg_pool" => self.pool(frame, &a, n == "max_pool", span),
            "permute" => self.permute(frame, &a, span),
            "index" => {
                let Some(x) = self.tensor(frame, a.pos[0]) else {
                    return Val::Poison;
                };
                let Some(d) = self.dim_of(frame, a.pos[1], &x.ty) else {
                    return Val::Poison;
                };
                let Some(i) = self.eval_const(frame, a.pos[2]) else {
                    return Val::Poison;
                };
                if i.fract() != 0.0 || i < 0.0 || i >= d.size as f64 {
                    return self.err(
                        Diag::error(format!("index {i} is out of range for dim `{}` of size {}", d.name, d.size))
                            .at(a.pos[2].span, "out of range")
                            .help(format!("use a whole number from 0 to {}", d.size.saturating_sub(1))),
                    );
                }
                let dims = x.ty.dims.iter().filter(|o| o.name != d.name).cloned().collect();
                let op = Op::Take { dim: d.name, index: i as u64 };
                Val::Tensor(self.emit(op, vec![x.id], TensorType::new(x.ty.dtype, dims), span))
            }
            "dropout" => {
                let Some(x) = self.float_tensor(frame, a.pos[0], n) else {
                    return Val::Poison;
                };
                let Some(p) = self.eval_const(frame, a.pos[1]) else {
                    return Val::Poison;
                };
                if !(0.0..1.0).contains(&p) {
                    return self.err(
                        Diag::error(format!("dropout rate must be in [0, 1), got {p}"))
                            .at(a.pos[1].span, "rate")
                            .help("typical rates are 0.0 to 0.1"),
                    );
                }
                if p > 0.0 {
                    let mask = x.ty.numel() as f64 / self.shard_factor(&x.ty) as f64;
                    self.add_cost(OpCost { act_none: mask, act_selective: mask, ..OpCost::default() });
                }
                if p == 0.0 {
                    // Dropout at rate 0 is the identity: no node.
                    return Val::Tensor(x);
                }
                Val::Tensor(self.emit(Op::Dropout { p }, vec![x.id], x.ty, span))
            }
            "attention" => self.attention(frame, &a, span),
            "rope" => {
                let Some(x) = self.float_tensor(frame, a.pos[0], n) else {
                    return Val::Poison;
                };
                if x.ty.dims.len() < 3 {
                    return self.err(
                        Diag::error(format!("`rope` needs [..., seq, heads, head_dim], found {}", x.ty))
                            .at(a.pos[0].span, "too few dims")
                            .help("apply rope to queries or keys before attention"),
                    );
                }
                let hd = x.ty.dims.last().expect("dims").size;
                if hd % 2 != 0 {
                    return self.err(
                        Diag::error(format!("`rope` rotates pairs, but the last dim has odd size {hd}"))
                            .at(a.pos[0].span, "odd head_dim")
                            .help("use an even head_dim"),
                    );
                }
                let mut vals = [10000.0, 1.0];
                for (j, k) in ["theta", "fraction"].into_iter().enumerate() {
                    if let Some(e) = a.kw.get(k) {
                        match self.positive(frame, e, k) {
                            Some(v) => vals[j] = v,
                            None => return Val::Poison,
                        }
                    }
                }
                Val::Tensor(self.emit(Op::Rope { theta: vals[0], fraction: vals[1] }, vec![x.id], x.ty, span))
            }
            "where" => {
                let Some(c) = self.tensor(frame, a.pos[0]) else {
                    return Val::Poison;
                };
                if c.ty.dtype != DType::Bool {
                    return self.err(
                        Diag::error(format!("`where` needs a bool condition, found {}", c.ty))
                            .at(a.pos[0].span, "not a mask")
                            .help("compare first, e.g. `where(iota(seq) < 4, x, 0.0)`"),
                    );
                }
                // Values: tensors of one dtype, or a number in the other's dtype.
                let (va, vb) = (self.expr(frame, a.pos[1]), self.expr(frame, a.pos[2]));
                let (x, y) = match (va, vb) {
                    (Val::Tensor(x), Val::Tensor(y)) => (x, y),
                    (Val::Tensor(x), Val::Num(v)) => {
                        let k = self.emit(Op::Scalar { value: v }, vec![], TensorType::scalar(x.ty.dtype), span);
                        (x, k)
                    }
                    (Val::Num(v), Val::Tensor(y)) => {
                        let k = self.emit(Op::Scalar { value: v }, vec![], TensorType::scalar(y.ty.dtype), span);
                        (k, y)
                    }
                    (Val::Poison, _) | (_, Val::Poison) => return Val::Poison,
                    (p, q) => {
                        return self.err(
                            Diag::error(format!(
                                "`where` chooses between tensors, found {} and {}",
                                p.kind(),
                                q.kind()
                            ))
                            .at(span, "no tensor to choose from")
                            .help("pass a tensor for at least one of the two values"),
                        );
                    }
                };
                if x.ty.dtype != y.ty.dtype {
                    return self.err(
                        Diag::error(format!("`where` chooses between {} and {}", x.ty, y.ty))
                            .at(span, "dtypes differ")
                            .help("cast one side with `cast(x, dtype)`"),
                    );
                }
                let mut dims = x.ty.dims.clone();
                for t in [&y.ty, &c.ty] {
                    for d in &t.dims {
                        match dims.iter().find(|o| o.name == d.name) {
                            Some(o) if o.size != d.size => {
                                return self.err(
                                    Diag::error(format!("dim `{}` has sizes {} and {}", d.name, o.size, d.size))
                                        .at(span, "in this `where`")
                                        .help("broadcasting is by name: dims of the same name must have the same size"),
                                );
                            }
                            Some(_) => {}
                            None => dims.push(d.clone()),
                        }
                    }
                }
                // The backward pass routes the gradient by the condition.
                self.save(&c.ty);
                let out = TensorType::new(x.ty.dtype, dims);
                Val::Tensor(self.emit(Op::Where, vec![c.id, x.id, y.id], out, span))
            }
            "argmax" => {
                let Some(x) = self.tensor(frame, a.pos[0]) else {
                    return Val::Poison;
                };
                let Some(d) = self.dim_of(frame, a.pos[1], &x.ty) else {
                    return Val::Poison;
                };
                let dims = x.ty.dims.iter().filter(|o| o.name != d.name).cloned().collect();
                Val::Tensor(self.emit(Op::Argmax { dim: d.name }, vec![x.id], TensorType::new(DType::I32, dims), span))
            }
            "gather" => {
                let Some(x) = self.tensor(frame, a.pos[0]) else {
                    return Val::Poison;
                };
                let Some(idx) = self.tensor(frame, a.pos[1]) else {
                    return Val::Poison;
                };
                let Some(d) = self.dim_of(frame, a.pos[2], &x.ty) else {
                    return Val::Poison;
                };
                let kept: Vec<Dim> = x.ty.dims.iter().filter(|o| o.name != d.name).cloned().collect();
                if idx.ty.dtype != DType::I32 || !idx.ty.dims.iter().all(|i| kept.contains(i)) {
                    return self.err(
                        Diag::error(format!("`gather` along `{}` of {} takes i32 positions over its other dims, found {}", d.name, x.ty, idx.ty))
                            .at(a.pos[1].span, "not positions of this operand")
                            .help("positions come from `argmax` or `iota` over the operand's other dims, e.g. `gather(h, argmax(tokens, seq), seq)`"),
                    );
                }
                self.save(&idx.ty);
                Val::Tensor(self.emit(
                    Op::Gather { dim: d.name },
                    vec![x.id, idx.id],
                    TensorType::new(x.ty.dtype, kept),
                    span,
                ))
            }
            "iota" => {
                let Some(d) = self.dim_name(frame, a.pos[0]) else {
                    return Val::Poison;
                };
                let Some(start) = self.whole_kw(frame, &a, "start", 0) else {
                    return Val::Poison;
                };
                let start = start.unwrap_or(0);
                // Integer tensors travel as f32 values, exact up to 2^24.
                if start.saturating_add(d.size) > 1 << 24 {
                    return self.err(
                        Diag::error(format!("`iota` over `{}` reaches {}", d.name, start.saturating_add(d.size)))
                            .at(span, "positions beyond 2^24")
                            .help("positions are exact up to 16,777,216; use a smaller dim or start"),
                    );
                }
                let ty = TensorType::new(DType::I32, vec![d.clone()]);
                Val::Tensor(self.emit(Op::Iota { dim: d.name, offset: start }, vec![], ty, span))
            }
            "sinusoid" => {
                let Some(a0) = self.dim_name(frame, a.pos[0]) else {
                    return Val::Poison;
                };
                let Some(a1) = self.dim_name(frame, a.pos[1]) else {
                    return Val::Poison;
                };
                Val::Tensor(self.emit(Op::Sinusoid, vec![], TensorType::new(DType::F32, vec![a0, a1]), span))
            }
            "cross_entropy" => {
                let Some(logits) = self.float_tensor(frame, a.pos[0], n) else {
                    return Val::Poison;
                };
                let Some(t) = self.tensor(frame, a.pos[1]) else {
                    return Val::Poison;
                };
                if !matches!(t.ty.dtype, DType::I32 | DType::I64) {
                    return self.err(
                        Diag::error(format!(
                            "`cross_entropy` targets must be integer class ids, found {}",
                            t.ty.dtype.name()
                        ))
                        .at(a.pos[1].span, "not class ids")
                        .help("declare targets as `input targets: i32[batch, seq]`"),
                    );
                }
                let extra: Vec<&Dim> = logits.ty.dims.iter().filter(|d| !t.ty.has(&d.name)).collect();
                let ok_targets = t.ty.dims.iter().all(|d| logits.ty.dim(&d.name) == Some(d));
                if extra.len() != 1 || !ok_targets {
                    return self.err(
                        Diag::error(format!("`cross_entropy` needs logits with the targets' dims plus one class dim; found logits {} and targets {}", logits.ty, t.ty))
                            .at(span, "shapes do not line up")
                            .help("logits [batch, seq, vocab] go with targets [batch, seq]"),
                    );
                }
                let label_smoothing = match a.kw.get("label_smoothing") {
                    Some(e) => match self.eval_const(frame, e) {
                        Some(v) if (0.0..1.0).contains(&v) => v,
                        Some(v) => {
                            return self.err(
                                Diag::error(format!("label smoothing must be in [0, 1), got {v}"))
                                    .at(e.span, "out of range")
                                    .help("typical values are 0.0 to 0.1"),
                            );
                        }
                        None => return Val::Poison,
                    },
                    None => 0.0,
                };
                let ignore = match a.kw.get("ignore") {
                    Some(e) => match self.eval_const(frame, e) {
                        Some(v) if v.fract() == 0.0 && v.abs() < 1e15 => Some(v as i64),
                        Some(v) => {
                            return self.err(
                                Diag::error(format!("the ignored class id must be a whole number, got {v}"))
                                    .at(e.span, "not a class id")
                                    .help("PyTorch's convention is -100"),
                            );
                        }
                        None => return Val::Poison,
                    },
                    None => None,
                };
                // The softmax over classes is kept in fp32 for the backward pass.
                let bytes = logits.ty.numel() as f64 * 4.0 / self.shard_factor(&logits.ty) as f64;
                self.add_cost(OpCost { act_none: bytes, act_selective: bytes, ..OpCost::default() });
                let op = Op::CrossEntropy { label_smoothing, ignore };
                Val::Tensor(self.emit(op, vec![logits.id, t.id], TensorType::scalar(DType::F32), span))
            }
            "patches" => self.patches(frame, &a, span),
            "top_k" => self.top_k(frame, &a, span),
            "dispatch" | "combine" => self.dispatch_combine(frame, n, &a, span),
            "load_balance" => {
                let Some(r) = self.route(frame, a.pos[0]) else {
                    return Val::Poison;
                };
                Val::Tensor(self.emit(Op::LoadBalance, vec![r.gates, r.probs], TensorType::scalar(DType::F32), span))
            }
            "z_loss" => {
                let Some(x) = self.float_tensor(frame, a.pos[0], n) else {
                    return Val::Poison;
                };
                self.save(&x.ty);
                Val::Tensor(self.emit(Op::ZLoss, vec![x.id], TensorType::scalar(DType::F32), span))
            }
            _ => unreachable!("op table and handlers agree"),
        }
    }

    // ------------------------------------------------------------ argument helpers

    pub(super) fn tensor(&mut self, frame: &mut Frame, e: &Expr) -> Option<TVal> {
        match self.expr(frame, e) {
            Val::Tensor(t) => Some(t),
            Val::Poison => None,
            other => {
                self.err(
                    Diag::error(format!("expected a tensor, found {}", other.kind()))
                        .at(e.span, "not a tensor")
                        .help("pass a tensor value here"),
                );
                None
            }
        }
    }

    pub(super) fn float_tensor(&mut self, frame: &mut Frame, e: &Expr, op: &str) -> Option<TVal> {
        let t = self.tensor(frame, e)?;
        if !t.ty.dtype.is_float() {
            self.err(
                Diag::error(format!("`{op}` needs a float tensor, found {}", t.ty))
                    .at(e.span, "not floating point")
                    .help("cast it first: `cast(x, f32)`"),
            );
            return None;
        }
        Some(t)
    }

    pub(super) fn route(&mut self, frame: &mut Frame, e: &Expr) -> Option<Rc<RouteVal>> {
        match self.expr(frame, e) {
            Val::Route(r) => Some(r),
            Val::Poison => None,
            other => {
                self.err(
                    Diag::error(format!("expected a routing from `top_k`, found {}", other.kind()))
                        .at(e.span, "not a routing")
                        .help("route first: `route = top_k(softmax(x @ router, expert), k = 2, capacity = 1.25)`"),
                );
                None
            }
        }
    }

    /// A dim argument given by name, resolved in the current scope.
    pub(super) fn dim_name(&mut self, frame: &mut Frame, e: &Expr) -> Option<Dim> {
        match &e.kind {
            ExprKind::Name(n) => self.dim(frame, n, e.span),
            _ => {
                self.err(
                    Diag::error("expected a dim name")
                        .at(e.span, "not a name")
                        .help("name a dim, e.g. `softmax(x, seq)`"),
                );
                None
            }
        }
    }

    /// A dim argument that must be a dim of `ty`.
    pub(super) fn dim_of(&mut self, frame: &mut Frame, e: &Expr, ty: &TensorType) -> Option<Dim> {
        match &e.kind {
            ExprKind::Name(n) => self.dim_in(frame, n, e.span, ty),
            _ => self.dim_name(frame, e),
        }
    }

    /// The dim `name` of the scope, which must also be a dim of `ty`.
    pub(super) fn dim_in(&mut self, frame: &mut Frame, name: &str, span: Span, ty: &TensorType) -> Option<Dim> {
        // A name the operand carries (e.g. made by `rename`) needs no declaration,
        // unless a block signature binds it to another dim.
        if !frame.bindings.contains_key(name)
            && let Some(d) = ty.dim(name)
        {
            return Some(d.clone());
        }
        let d = self.dim(frame, name, span)?;
        match ty.dim(&d.name) {
            Some(x) => Some(x.clone()),
            None => {
                let help = unknown_help("dim", &d.name, ty.names());
                self.err(
                    Diag::error(format!("dim `{}` is not a dim of {ty}", d.name))
                        .at(span, "no such dim in the operand")
                        .help(help),
                );
                None
            }
        }
    }

    pub(super) fn positive(&mut self, frame: &mut Frame, e: &Expr, what: &str) -> Option<f64> {
        let v = self.eval_const(frame, e)?;
        if v <= 0.0 || !v.is_finite() {
            self.err(
                Diag::error(format!("`{what}` must be positive, got {v}"))
                    .at(e.span, "not positive")
                    .help(format!("give `{what}` a positive value")),
            );
            return None;
        }
        Some(v)
    }

    /// The op keeps its input for the backward pass.
    pub(super) fn save(&mut self, ty: &TensorType) {
        let b = self.act_size(ty);
        self.add_cost(OpCost { act_none: b, act_selective: b, ..OpCost::default() });
    }

    // ------------------------------------------------------------ op rules

    fn unary(&mut self, frame: &mut Frame, n: &str, a: &Args, span: Span) -> Val {
        match self.expr(frame, a.pos[0]) {
            Val::Num(x) => {
                let r = match n {
                    "exp" => x.exp(),
                    "log" => x.ln(),
                    "sqrt" => x.sqrt(),
                    "rsqrt" => 1.0 / x.sqrt(),
                    "tanh" => x.tanh(),
                    "abs" => x.abs(),
                    "square" => x * x,
                    "ceil" => x.ceil(),
                    "floor" => x.floor(),
                    "relu" => x.max(0.0),
                    "sigmoid" => 1.0 / (1.0 + (-x).exp()),
                    _ => {
                        return self.err(
                            Diag::error(format!("`{n}` of a number"))
                                .at(a.pos[0].span, "a number")
                                .help(format!("`{n}` applies to tensors")),
                        );
                    }
                };
                if !r.is_finite() {
                    return self.err(
                        Diag::error(format!("`{n}({x})` is not a finite number"))
                            .at(a.pos[0].span, "out of the function's domain")
                            .help("check the constants"),
                    );
                }
                Val::Num(r)
            }
            Val::Tensor(t) => {
                if !t.ty.dtype.is_float() {
                    return self.err(
                        Diag::error(format!("`{n}` needs a float tensor, found {}", t.ty))
                            .at(a.pos[0].span, "not floating point")
                            .help("cast it first: `cast(x, f32)`"),
                    );
                }
                if matches!(n, "ceil" | "floor") {
                    return self.err(
                        Diag::error(format!("`{n}` applies to numbers"))
                            .at(a.pos[0].span, "a tensor")
                            .help("round constants, not tensors"),
                    );
                }
                let mut name = n;
                if let Some(e) = a.kw.get("approximate") {
                    match &e.kind {
                        ExprKind::Name(x) if x == "tanh" => name = "gelu_tanh",
                        ExprKind::Name(x) if x == "none" => {}
                        _ => {
                            return self.err(
                                Diag::error("`approximate` must be `none` or `tanh`")
                                    .at(e.span, "here")
                                    .help("gelu(x, approximate = tanh)"),
                            );
                        }
                    }
                }
                self.save(&t.ty);
                let op = UnaryOp::from_name(name).expect("unary op names are IR names");
                Val::Tensor(self.emit(Op::Unary { op }, vec![t.id], t.ty, span))
            }
            Val::Poison => Val::Poison,
            other => self.err(
                Diag::error(format!("`{n}` of {}", other.kind()))
                    .at(a.pos[0].span, "invalid operand")
                    .help("pass a number or a float tensor"),
            ),
        }
    }
}
