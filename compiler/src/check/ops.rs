//! The built-in ops: their arguments and their named-dim type rules, and what
//! each contributes to FLOPs and saved activations.

use super::walk::{Frame, RouteVal, TVal, Val, Walker};
use crate::diag::{Diag, unknown_help};
use crate::model::{Dim, OpCost, Routing, TensorType};
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

pub(super) const OPS: &[OpSig] = &[
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

pub(super) fn is_op(name: &str) -> bool {
    OPS.iter().any(|o| o.name == name)
}

fn sig(name: &str) -> &'static OpSig {
    OPS.iter().find(|o| o.name == name).expect("known op")
}

/// `from -> to` as written: the dims on each side, whether each side was a
/// `[list]`, and the span.
type DimMapArg<'e> = (&'e [Ident], &'e [Ident], bool, bool, Span);

/// Arguments of one op call, split into positional and keyword.
struct Args<'e> {
    pos: Vec<&'e Expr>,
    kw: HashMap<&'e str, &'e Expr>,
    maps: Vec<DimMapArg<'e>>,
}

const UNARY_FLOAT: &[&str] =
    &["exp", "log", "sqrt", "rsqrt", "tanh", "abs", "square", "gelu", "gelu_tanh", "silu", "relu", "sigmoid"];

impl Walker<'_> {
    pub(super) fn op(&mut self, frame: &mut Frame, name: &Ident, args: &[Arg], span: Span) -> Val {
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
        if !a.maps.is_empty() && !matches!(s.name, "rename" | "merge" | "split") {
            return self.err(
                Diag::error(format!("`{}` does not take a dim mapping", s.name))
                    .at(a.maps[0].4, "`a -> b` here")
                    .help("only `rename`, `merge` and `split` take `a -> b`"),
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
                Val::Tensor(TVal::new(TensorType::new(dt, x.ty.dims)))
            }
            "sum" | "mean" | "amax" => {
                let Some(x) = self.tensor(frame, a.pos[0]) else {
                    return Val::Poison;
                };
                let mut dims = x.ty.dims.clone();
                for e in &a.pos[1..] {
                    let Some(d) = self.dim_of(frame, e, &x.ty) else {
                        return Val::Poison;
                    };
                    dims.retain(|o| o.name != d.name);
                }
                if n != "sum" {
                    self.save(&x.ty);
                }
                Val::Tensor(TVal::new(TensorType::new(x.ty.dtype, dims)))
            }
            "softmax" | "log_softmax" => {
                let Some(x) = self.float_tensor(frame, a.pos[0], n) else {
                    return Val::Poison;
                };
                if self.dim_of(frame, a.pos[1], &x.ty).is_none() {
                    return Val::Poison;
                }
                self.save(&x.ty);
                Val::Tensor(TVal::new(x.ty))
            }
            "layer_norm" | "rms_norm" => {
                let Some(x) = self.float_tensor(frame, a.pos[0], n) else {
                    return Val::Poison;
                };
                let Some(d) = self.dim_of(frame, a.pos[1], &x.ty) else {
                    return Val::Poison;
                };
                for k in ["gain", "bias"] {
                    if let Some(e) = a.kw.get(k) {
                        let Some(g) = self.tensor(frame, e) else {
                            return Val::Poison;
                        };
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
                if let Some(e) = a.kw.get("eps") {
                    self.positive(frame, e, "eps");
                }
                self.save(&x.ty);
                Val::Tensor(TVal::new(x.ty))
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
                Val::Tensor(TVal::new(TensorType::new(table.ty.dtype, dims)))
            }
            "split" => self.split(frame, &a, span),
            "merge" => self.merge(frame, &a, span),
            "rename" => self.rename(frame, &a, span),
            "concat" => self.concat(frame, &a, span),
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
                Val::Tensor(TVal::new(TensorType::new(x.ty.dtype, dims)))
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
                Val::Tensor(TVal::new(x.ty))
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
                for k in ["theta", "fraction"] {
                    if let Some(e) = a.kw.get(k) {
                        self.positive(frame, e, k);
                    }
                }
                Val::Tensor(TVal::new(x.ty))
            }
            "sinusoid" => {
                let Some(a0) = self.dim_name(frame, a.pos[0]) else {
                    return Val::Poison;
                };
                let Some(a1) = self.dim_name(frame, a.pos[1]) else {
                    return Val::Poison;
                };
                Val::Tensor(TVal::new(TensorType::new(DType::F32, vec![a0, a1])))
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
                if let Some(e) = a.kw.get("label_smoothing") {
                    self.eval_const(frame, e);
                }
                if let Some(e) = a.kw.get("ignore") {
                    self.eval_const(frame, e);
                }
                // The softmax over classes is kept in fp32 for the backward pass.
                let bytes = logits.ty.numel() as f64 * 4.0 / self.shard_factor(&logits.ty) as f64;
                self.add_cost(OpCost { act_none: bytes, act_selective: bytes, ..OpCost::default() });
                Val::Tensor(TVal::new(TensorType::scalar(DType::F32)))
            }
            "patches" => self.patches(frame, &a, span),
            "top_k" => self.top_k(frame, &a, span),
            "dispatch" | "combine" => self.dispatch_combine(frame, n, &a, span),
            "load_balance" => {
                let Some(_) = self.route(frame, a.pos[0]) else {
                    return Val::Poison;
                };
                Val::Tensor(TVal::new(TensorType::scalar(DType::F32)))
            }
            "z_loss" => {
                let Some(x) = self.float_tensor(frame, a.pos[0], n) else {
                    return Val::Poison;
                };
                self.save(&x.ty);
                Val::Tensor(TVal::new(TensorType::scalar(x.ty.dtype)))
            }
            _ => unreachable!("op table and handlers agree"),
        }
    }

    // ------------------------------------------------------------ argument helpers

    fn tensor(&mut self, frame: &mut Frame, e: &Expr) -> Option<TVal> {
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

    fn float_tensor(&mut self, frame: &mut Frame, e: &Expr, op: &str) -> Option<TVal> {
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

    fn route(&mut self, frame: &mut Frame, e: &Expr) -> Option<Rc<RouteVal>> {
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
    fn dim_name(&mut self, frame: &mut Frame, e: &Expr) -> Option<Dim> {
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
    fn dim_of(&mut self, frame: &mut Frame, e: &Expr, ty: &TensorType) -> Option<Dim> {
        let d = self.dim_name(frame, e)?;
        match ty.dim(&d.name) {
            Some(x) => Some(x.clone()),
            None => {
                let help = unknown_help("dim", &d.name, ty.names());
                self.err(
                    Diag::error(format!("dim `{}` is not a dim of {ty}", d.name))
                        .at(e.span, "no such dim in the operand")
                        .help(help),
                );
                None
            }
        }
    }

    fn positive(&mut self, frame: &mut Frame, e: &Expr, what: &str) -> Option<f64> {
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
    fn save(&mut self, ty: &TensorType) {
        let b = self.act_size(ty);
        self.add_cost(OpCost { act_none: b, act_selective: b, ..OpCost::default() });
    }

    // ------------------------------------------------------------ op rules

    fn unary(&mut self, frame: &mut Frame, n: &str, a: &Args, _span: Span) -> Val {
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
                if let Some(e) = a.kw.get("approximate") {
                    match &e.kind {
                        ExprKind::Name(x) if x == "tanh" || x == "none" => {}
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
                Val::Tensor(TVal::new(t.ty))
            }
            Val::Poison => Val::Poison,
            other => self.err(
                Diag::error(format!("`{n}` of {}", other.kind()))
                    .at(a.pos[0].span, "invalid operand")
                    .help("pass a number or a float tensor"),
            ),
        }
    }

    fn split(&mut self, frame: &mut Frame, a: &Args, span: Span) -> Val {
        if let Some(&(from, to, from_list, _, mspan)) = a.maps.first() {
            // split(x, d -> [a, b]): one dim into several.
            let Some(x) = self.tensor(frame, a.pos[0]) else {
                return Val::Poison;
            };
            if from.len() != 1 || from_list {
                return self.err(
                    Diag::error("`split` maps one dim to a list of dims")
                        .at(mspan, "here")
                        .help("write `split(x, embed -> [heads, head_dim])`"),
                );
            }
            let Some(src) = self.dim_in(frame, &from[0], &x.ty) else {
                return Val::Poison;
            };
            let mut new = Vec::new();
            for t in to {
                let Some(d) = self.dim(frame, &t.name, t.span) else {
                    return Val::Poison;
                };
                if x.ty.has(&d.name) && d.name != src.name {
                    return self.err(
                        Diag::error(format!("`{}` is already a dim of {}", d.name, x.ty))
                            .at(t.span, "duplicate dim")
                            .help("split into new dim names"),
                    );
                }
                new.push(d);
            }
            let prod: u64 = new.iter().map(|d| d.size).fold(1u64, u64::saturating_mul);
            if prod != src.size {
                let sizes: Vec<String> = new.iter().map(|d| format!("{}={}", d.name, d.size)).collect();
                return self.err(
                    Diag::error(format!(
                        "cannot split `{}` of size {} into {} (product {prod})",
                        src.name,
                        src.size,
                        sizes.join(" × ")
                    ))
                    .at(mspan, "sizes do not multiply out")
                    .help("the new dims' sizes must multiply to the split dim's size"),
                );
            }
            let mut dims = Vec::new();
            for d in &x.ty.dims {
                if d.name == src.name {
                    dims.extend(new.iter().cloned());
                } else {
                    dims.push(d.clone());
                }
            }
            return Val::Tensor(TVal::new(TensorType::new(x.ty.dtype, dims)));
        }
        // split(x, qkv): unbind along a dim into a tuple.
        let Some(x) = self.tensor(frame, a.pos[0]) else {
            return Val::Poison;
        };
        let Some(d) = self.dim_of(frame, a.pos[1], &x.ty) else {
            return Val::Poison;
        };
        if d.size > 64 {
            return self.err(
                Diag::error(format!("`split(x, {})` would make {} values", d.name, d.size))
                    .at(span, "too many parts")
                    .help("unbinding is for small dims like `qkv = 3`; to reshape a dim write `split(x, d -> [a, b])`"),
            );
        }
        let dims: Vec<Dim> = x.ty.dims.iter().filter(|o| o.name != d.name).cloned().collect();
        let part = TensorType::new(x.ty.dtype, dims);
        Val::Tuple((0..d.size).map(|_| Val::Tensor(TVal::new(part.clone()))).collect())
    }

    fn dim_in(&mut self, frame: &mut Frame, id: &Ident, ty: &TensorType) -> Option<Dim> {
        let d = self.dim(frame, &id.name, id.span)?;
        match ty.dim(&d.name) {
            Some(x) => Some(x.clone()),
            None => {
                let help = unknown_help("dim", &d.name, ty.names());
                self.err(
                    Diag::error(format!("dim `{}` is not a dim of {ty}", d.name))
                        .at(id.span, "not in the operand")
                        .help(help),
                );
                None
            }
        }
    }

    fn merge(&mut self, frame: &mut Frame, a: &Args, _span: Span) -> Val {
        let Some(x) = self.tensor(frame, a.pos[0]) else {
            return Val::Poison;
        };
        let Some(&(from, to, _, to_list, mspan)) = a.maps.first() else {
            return self.err(
                Diag::error("`merge` needs a mapping")
                    .at(a.pos[0].span, "here")
                    .help("write `merge(x, [heads, head_dim] -> embed)`"),
            );
        };
        if to.len() != 1 || to_list {
            return self.err(
                Diag::error("`merge` maps a list of dims to one dim")
                    .at(mspan, "here")
                    .help("write `merge(x, [heads, head_dim] -> embed)`"),
            );
        }
        let mut src = Vec::new();
        for f in from {
            let Some(d) = self.dim_in(frame, f, &x.ty) else {
                return Val::Poison;
            };
            src.push(d);
        }
        let Some(target) = self.dim(frame, &to[0].name, to[0].span) else {
            return Val::Poison;
        };
        let prod: u64 = src.iter().map(|d| d.size).fold(1u64, u64::saturating_mul);
        if prod != target.size {
            return self.err(
                Diag::error(format!(
                    "cannot merge dims of total size {prod} into `{}` of size {}",
                    target.name, target.size
                ))
                .at(mspan, "sizes do not multiply out")
                .help("the merged dims' sizes must multiply to the target dim's size"),
            );
        }
        // Merged dims must be adjacent and in order.
        let first = x.ty.dims.iter().position(|d| d.name == src[0].name).expect("present");
        let adjacent = src.iter().enumerate().all(|(i, s)| x.ty.dims.get(first + i).map(|d| &d.name) == Some(&s.name));
        if !adjacent {
            return self.err(
                Diag::error(format!("`merge` needs adjacent dims in order, but {x} has them elsewhere", x = x.ty))
                    .at(mspan, "not adjacent")
                    .help("list the dims in the order they appear in the tensor"),
            );
        }
        if x.ty.has(&target.name) && !src.iter().any(|s| s.name == target.name) {
            return self.err(
                Diag::error(format!("`{}` is already a dim of {}", target.name, x.ty))
                    .at(to[0].span, "duplicate")
                    .help("merge into a new name"),
            );
        }
        let mut dims = x.ty.dims[..first].to_vec();
        dims.push(target);
        dims.extend(x.ty.dims[first + src.len()..].iter().cloned());
        Val::Tensor(TVal::new(TensorType::new(x.ty.dtype, dims)))
    }

    fn rename(&mut self, frame: &mut Frame, a: &Args, _span: Span) -> Val {
        let Some(x) = self.tensor(frame, a.pos[0]) else {
            return Val::Poison;
        };
        if a.pos.len() > 1 || a.maps.is_empty() {
            return self.err(
                Diag::error("`rename` takes a tensor and mappings")
                    .at(a.pos[0].span, "here")
                    .help("write `rename(x, seq -> kv_seq)`"),
            );
        }
        let mut dims = x.ty.dims.clone();
        for &(from, to, fl, tl, mspan) in &a.maps {
            if from.len() != 1 || to.len() != 1 || fl || tl {
                return self.err(
                    Diag::error("`rename` maps one dim to one dim")
                        .at(mspan, "here")
                        .help("write `rename(x, seq -> kv_seq)`"),
                );
            }
            let Some(src) = self.dim_in(frame, &from[0], &x.ty) else {
                return Val::Poison;
            };
            // The new name takes its size from the old dim unless it is declared.
            let new = match self.model_const(&to[0].name) {
                Some(_) => match self.dim(frame, &to[0].name, to[0].span) {
                    Some(d) => d,
                    None => return Val::Poison,
                },
                None => frame.bindings.get(&to[0].name).cloned().unwrap_or_else(|| Dim::new(&to[0].name, src.size)),
            };
            if new.size != src.size {
                return self.err(
                    Diag::error(format!(
                        "cannot rename `{}` (size {}) to `{}` (size {})",
                        src.name, src.size, new.name, new.size
                    ))
                    .at(mspan, "sizes differ")
                    .help("rename keeps the size; use `split` or `merge` to reshape"),
                );
            }
            if dims.iter().any(|d| d.name == new.name) {
                return self.err(
                    Diag::error(format!("`{}` is already a dim of {}", new.name, x.ty))
                        .at(to[0].span, "duplicate")
                        .help("choose a new name"),
                );
            }
            for d in dims.iter_mut() {
                if d.name == src.name {
                    *d = new.clone();
                }
            }
        }
        Val::Tensor(TVal::new(TensorType::new(x.ty.dtype, dims)))
    }

    fn concat(&mut self, frame: &mut Frame, a: &Args, span: Span) -> Val {
        let (Some(over), Some(into)) = (a.kw.get("over"), a.kw.get("into")) else {
            return self.err(Diag::error("`concat` needs `over` and `into`").at(span, "missing keywords").help(
                "write `concat(cls, x, over = [one, patches], into = seq)`: each input's own dim, then the result dim",
            ));
        };
        let ExprKind::List(over_names) = &over.kind else {
            return self.err(
                Diag::error("`over` must be a list of dims")
                    .at(over.span, "not a list")
                    .help("write `over = [one, patches]`"),
            );
        };
        if over_names.len() != a.pos.len() {
            return self.err(
                Diag::error(format!("`over` names {} dims for {} inputs", over_names.len(), a.pos.len()))
                    .at(over.span, "one dim per input")
                    .help("name the dim each input is concatenated along"),
            );
        }
        let Some(into_dim) = self.dim_name(frame, into) else {
            return Val::Poison;
        };
        let mut inputs = Vec::new();
        for (e, d) in a.pos.iter().zip(over_names) {
            let Some(t) = self.tensor(frame, e) else {
                return Val::Poison;
            };
            let Some(d) = self.dim_of(frame, d, &t.ty) else {
                return Val::Poison;
            };
            inputs.push((t, d));
        }
        let total: u64 = inputs.iter().map(|(_, d)| d.size).fold(0u64, u64::saturating_add);
        if total != into_dim.size {
            return self.err(
                Diag::error(format!(
                    "concatenated size {total} does not match `{}` = {}",
                    into_dim.name, into_dim.size
                ))
                .at(span, "sizes do not add up")
                .help(format!("the sizes of the `over` dims must add up to `{}`", into_dim.name)),
            );
        }
        // The result: the highest-rank input's dims with its concat dim
        // replaced, then every other input's dims broadcast in by name.
        let lead = (0..inputs.len()).max_by_key(|&i| (inputs[i].0.ty.dims.len(), usize::MAX - i)).unwrap_or(0);
        let (first, fd) = &inputs[lead];
        let dtype = first.ty.dtype;
        let mut dims: Vec<Dim> =
            first.ty.dims.iter().map(|d| if d.name == fd.name { into_dim.clone() } else { d.clone() }).collect();
        for (i, (t, cd)) in inputs.iter().enumerate() {
            if i == lead {
                continue;
            }
            if t.ty.dtype != dtype {
                return self.err(
                    Diag::error("`concat` inputs have different dtypes")
                        .at(span, "mixed dtypes")
                        .help("cast them to one dtype"),
                );
            }
            for d in &t.ty.dims {
                if d.name == cd.name {
                    continue;
                }
                match dims.iter().find(|o| o.name == d.name) {
                    Some(o) if o.size != d.size => {
                        return self.err(
                            Diag::error(format!("dim `{}` differs between `concat` inputs", d.name))
                                .at(span, "size mismatch")
                                .help("inputs must agree on every other dim"),
                        );
                    }
                    Some(_) => {}
                    None => dims.push(d.clone()),
                }
            }
        }
        Val::Tensor(TVal::new(TensorType::new(dtype, dims)))
    }

    fn attention(&mut self, frame: &mut Frame, a: &Args, span: Span) -> Val {
        let Some(q) = self.float_tensor(frame, a.pos[0], "attention") else {
            return Val::Poison;
        };
        let Some(k) = self.float_tensor(frame, a.pos[1], "attention") else {
            return Val::Poison;
        };
        let Some(v) = self.float_tensor(frame, a.pos[2], "attention") else {
            return Val::Poison;
        };
        let layout_help = "q is [..., seq, heads, head_dim]; k and v are [..., kv_seq, kv_heads, head_dim] with the same leading dims";
        for (t, e) in [(&q, a.pos[0]), (&k, a.pos[1]), (&v, a.pos[2])] {
            if t.ty.dims.len() < 3 {
                return self.err(
                    Diag::error(format!("attention operand {} has fewer than 3 dims", t.ty))
                        .at(e.span, "too few dims")
                        .help(layout_help),
                );
            }
        }
        let n = q.ty.dims.len();
        let (qs, qh, qd) = (&q.ty.dims[n - 3], &q.ty.dims[n - 2], &q.ty.dims[n - 1]);
        let m = k.ty.dims.len();
        let (ks, kh, kd) = (&k.ty.dims[m - 3], &k.ty.dims[m - 2], &k.ty.dims[m - 1]);
        if q.ty.dims[..n - 3] != k.ty.dims[..m - 3] {
            return self.err(
                Diag::error(format!("attention operands do not line up: q {}, k {}", q.ty, k.ty))
                    .at(span, "leading dims differ")
                    .help(layout_help),
            );
        }
        let vm = v.ty.dims.len();
        if vm != m || v.ty.dims[..vm - 1] != k.ty.dims[..m - 1] {
            return self.err(
                Diag::error(format!("keys {} and values {} must share all dims but the last", k.ty, v.ty))
                    .at(a.pos[2].span, "mismatched values")
                    .help(layout_help),
            );
        }
        if qd != kd {
            return self.err(
                Diag::error(format!(
                    "query head dim `{}`={} differs from key head dim `{}`={}",
                    qd.name, qd.size, kd.name, kd.size
                ))
                .at(a.pos[1].span, "mismatched head_dim")
                .help(layout_help),
            );
        }
        if kh.size == 0 || qh.size % kh.size != 0 {
            return self.err(
                Diag::error(format!("{} query heads cannot be grouped over {} key/value heads", qh.size, kh.size))
                    .at(a.pos[1].span, "heads not divisible")
                    .help("grouped-query attention needs heads divisible by kv_heads"),
            );
        }
        let causal = match a.kw.get("causal") {
            None => false,
            Some(e) => match self.expr(frame, e) {
                Val::Bool(b) => b,
                Val::Poison => return Val::Poison,
                other => {
                    return self.err(
                        Diag::error(format!("`causal` must be true or false, found {}", other.kind()))
                            .at(e.span, "not a boolean")
                            .help("causal = true"),
                    );
                }
            },
        };
        let mut drop_p = 0.0;
        if let Some(e) = a.kw.get("dropout") {
            drop_p = self.eval_const(frame, e).unwrap_or(0.0);
            if !(0.0..1.0).contains(&drop_p) {
                return self.err(
                    Diag::error(format!("attention dropout must be in [0, 1), got {drop_p}"))
                        .at(e.span, "rate")
                        .help("typical rates are 0.0 to 0.1"),
                );
            }
        }
        let lead: Vec<Dim> = q.ty.dims[..n - 3].to_vec();
        if let Some(e) = a.kw.get("mask") {
            let Some(mk) = self.tensor(frame, e) else {
                return Val::Poison;
            };
            let allowed: Vec<&Dim> = lead.iter().chain([qs, ks, qh]).collect();
            let fits =
                mk.ty.dtype == DType::Bool && mk.ty.dims.iter().all(|d| allowed.contains(&d)) && mk.ty.has(&ks.name);
            if !fits {
                return self.err(
                    Diag::error(format!("attention mask {} does not fit", mk.ty)).at(e.span, "bad mask").help(format!(
                        "a mask is bool over the key dim `{}`, optionally with the batch, query and head dims",
                        ks.name
                    )),
                );
            }
        }
        if let Some(e) = a.kw.get("rel_bias") {
            // T5 relative position bias: a table [buckets, heads].
            let Some(t) = self.tensor(frame, e) else {
                return Val::Poison;
            };
            if t.ty.dims.len() != 2 || t.ty.dims[1] != *qh {
                return self.err(
                    Diag::error(format!("`rel_bias` table must be [buckets, {}], found {}", qh.name, t.ty))
                        .at(e.span, "bad table")
                        .help("declare `param rel: [buckets, heads]`"),
                );
            }
            if let Some(md) = a.kw.get("max_distance") {
                self.positive(frame, md, "max_distance");
            }
        }
        if let Some(e) = a.kw.get("rel_pos") {
            // Transformer-XL: projected sinusoid positions [kv_seq, heads, head_dim].
            let Some(r) = self.tensor(frame, e) else {
                return Val::Poison;
            };
            let want = TensorType::new(q.ty.dtype, vec![ks.clone(), qh.clone(), qd.clone()]);
            if r.ty != want {
                return self.err(
                    Diag::error(format!("`rel_pos` must be {want}, found {}", r.ty))
                        .at(e.span, "bad relative positions")
                        .help("project sinusoids: `sinusoid(seq, embed) @ w_r` with `w_r: [embed, heads, head_dim]`"),
                );
            }
            self.save(&r.ty);
            for key in ["pos_bias_u", "pos_bias_v"] {
                if let Some(e) = a.kw.get(key) {
                    let Some(u) = self.tensor(frame, e) else {
                        return Val::Poison;
                    };
                    if u.ty.dims != [qh.clone(), qd.clone()] {
                        return self.err(
                            Diag::error(format!("`{key}` must be [{}, {}], found {}", qh.name, qd.name, u.ty))
                                .at(e.span, "bad bias")
                                .help(format!("declare `param u: [{}, {}]`", qh.name, qd.name)),
                        );
                    }
                }
            }
        }
        if let Some(e) = a.kw.get("window") {
            self.positive(frame, e, "window");
        }
        // Cost: q·k and p·v over the full score matrix (causal masking not subtracted).
        let batch: f64 = lead.iter().map(|d| d.size as f64).product();
        let pairs = batch * qh.size as f64 * qs.size as f64 * ks.size as f64;
        let flops = 2.0 * pairs * qd.size as f64 * 2.0;
        let mut saved = 0.0;
        for t in [&q, &k, &v] {
            saved += self.act_size(&t.ty);
        }
        // Without recompute, the softmax output (and with dropout its mask and
        // output) stay alive: 2 bytes each in 16-bit, 1 byte the mask.
        let head_split = self.shard_factor(&TensorType::new(q.ty.dtype, vec![qh.clone()]));
        let score_elems = pairs / head_split as f64;
        let elem = if q.ty.dtype.is_float() { self.act_bytes as f64 } else { 4.0 };
        let scores = if drop_p > 0.0 { score_elems * (2.0 * elem + 1.0) } else { score_elems * elem };
        self.add_cost(OpCost { flops, attn_flops: flops, act_none: saved + scores, act_selective: saved });
        let _ = causal;
        Val::Tensor(TVal::new(TensorType::new(
            q.ty.dtype,
            q.ty.dims[..n - 1].iter().cloned().chain([v.ty.dims[vm - 1].clone()]).collect(),
        )))
    }

    fn patches(&mut self, frame: &mut Frame, a: &Args, span: Span) -> Val {
        let Some(x) = self.float_tensor(frame, a.pos[0], "patches") else {
            return Val::Poison;
        };
        let (Some(size), Some(into)) = (a.kw.get("size"), a.kw.get("into")) else {
            return self.err(
                Diag::error("`patches` needs `size` and `into`")
                    .at(span, "missing keywords")
                    .help("write `patches(image, size = 16, into = [grid, patch_in])`"),
            );
        };
        let Some(p) = self.positive(frame, size, "size") else {
            return Val::Poison;
        };
        if p.fract() != 0.0 || p > 1e6 {
            return self.err(
                Diag::error(format!("patch size must be a whole number of pixels, got {p}"))
                    .at(size.span, "patch size")
                    .help("ViT uses 14 or 16 pixel patches"),
            );
        }
        let p = p as u64;
        let ExprKind::List(names) = &into.kind else {
            return self.err(
                Diag::error("`into` must be a list of two dims")
                    .at(into.span, "not a list")
                    .help("into = [grid, patch_in]"),
            );
        };
        if names.len() != 2 || x.ty.dims.len() < 3 {
            return self.err(
                Diag::error("`patches` maps [..., channels, height, width] to [..., grid, patch_in]")
                    .at(span, "wrong dims")
                    .help("into = [grid, patch_in] names the patch count and the pixels per patch"),
            );
        }
        let n = x.ty.dims.len();
        let (c, h, w) = (&x.ty.dims[n - 3], &x.ty.dims[n - 2], &x.ty.dims[n - 1]);
        if h.size % p != 0 || w.size % p != 0 {
            return self.err(
                Diag::error(format!("image {}×{} is not divisible into {p}×{p} patches", h.size, w.size))
                    .at(size.span, "patch size")
                    .help("choose a patch size that divides the height and width"),
            );
        }
        let grid = (h.size / p) * (w.size / p);
        let pix = c.size * p * p;
        let mut out = Vec::new();
        for (e, want) in names.iter().zip([grid, pix]) {
            let ExprKind::Name(nm) = &e.kind else {
                return self
                    .err(Diag::error("expected a dim name").at(e.span, "not a name").help("into = [grid, patch_in]"));
            };
            let d = match self.model_const(nm) {
                Some(_) => match self.dim(frame, nm, e.span) {
                    Some(d) => d,
                    None => return Val::Poison,
                },
                None => Dim::new(nm, want),
            };
            if d.size != want {
                return self.err(
                    Diag::error(format!("`{}` is {} but the image gives {want}", d.name, d.size))
                        .at(e.span, "wrong size")
                        .help(format!(
                            "{}×{} pixels in {p}×{p} patches of {} channels: {grid} patches of {pix} values",
                            h.size, w.size, c.size
                        )),
                );
            }
            out.push(d);
        }
        let mut dims = x.ty.dims[..n - 3].to_vec();
        dims.extend(out);
        Val::Tensor(TVal::new(TensorType::new(x.ty.dtype, dims)))
    }

    fn top_k(&mut self, frame: &mut Frame, a: &Args, span: Span) -> Val {
        let Some(probs) = self.float_tensor(frame, a.pos[0], "top_k") else {
            return Val::Poison;
        };
        let Some(expert) = probs.ty.dims.last().cloned() else {
            return self.err(
                Diag::error("`top_k` of a scalar")
                    .at(a.pos[0].span, "no dims")
                    .help("route router probabilities [..., expert]"),
            );
        };
        let k = match a.kw.get("k") {
            Some(e) => match self.eval_const(frame, e) {
                Some(v) if v.fract() == 0.0 && v >= 1.0 && v <= expert.size as f64 => v as u64,
                Some(v) => {
                    return self.err(
                        Diag::error(format!("`k` = {v} must be a whole number from 1 to the {} experts", expert.size))
                            .at(e.span, "bad k")
                            .help("Switch routes to 1 expert, Mixtral and GShard to 2"),
                    );
                }
                None => return Val::Poison,
            },
            None => 1,
        };
        let capacity = match a.kw.get("capacity") {
            None => None,
            Some(e) => match &e.kind {
                ExprKind::Name(nm) if nm == "dropless" => None,
                // A capacity of 0 is `dropless` passed through a constant.
                _ => match self.eval_const(frame, e) {
                    Some(0.0) => None,
                    Some(c) if c > 0.0 && c.is_finite() => Some(c),
                    Some(c) => {
                        return self.err(
                            Diag::error(format!("capacity factor must be positive, got {c}"))
                                .at(e.span, "bad capacity")
                                .help("typical factors are 1.0 to 2.0, or `dropless`"),
                        );
                    }
                    None => return Val::Poison,
                },
            },
        };
        let tokens: Vec<Dim> = probs.ty.dims[..probs.ty.dims.len() - 1].to_vec();
        let t: u64 = tokens.iter().map(|d| d.size).fold(1u64, u64::saturating_mul);
        let ideal = t.saturating_mul(k) as f64 / expert.size as f64;
        let slot = match capacity {
            Some(c) => (ideal * c).ceil().max(1.0) as u64,
            None => ideal.ceil().max(1.0) as u64,
        };
        self.slot_useful.insert(slot, (ideal / slot as f64).min(1.0));
        self.expert_dims.insert(expert.name.clone(), (expert.size, k));
        if !self.routings.iter().any(|r| r.expert_dim == expert.name && r.top_k == k && r.capacity == capacity) {
            self.routings.push(Routing {
                expert_dim: expert.name.clone(),
                experts: expert.size,
                top_k: k,
                capacity,
                span,
            });
        }
        self.save(&probs.ty);
        Val::Route(Rc::new(RouteVal { tokens, expert, slot: Dim::new("slot", slot) }))
    }

    fn dispatch_combine(&mut self, frame: &mut Frame, n: &str, a: &Args, _span: Span) -> Val {
        let Some(r) = self.route(frame, a.pos[0]) else {
            return Val::Poison;
        };
        let Some(x) = self.float_tensor(frame, a.pos[1], n) else {
            return Val::Poison;
        };
        if n == "dispatch" {
            let nt = r.tokens.len();
            if x.ty.dims.len() <= nt || x.ty.dims[..nt] != r.tokens[..] {
                let toks: Vec<String> = r.tokens.iter().map(|d| d.name.clone()).collect();
                return self.err(
                    Diag::error(format!(
                        "`dispatch` input {} does not start with the routed token dims [{}]",
                        x.ty,
                        toks.join(", ")
                    ))
                    .at(a.pos[1].span, "wrong token dims")
                    .help("dispatch the same tokens that were routed"),
                );
            }
            if self.expert_dims.contains_key(&r.expert.name) && x.ty.has(&r.expert.name) {
                return self.err(
                    Diag::error("`dispatch` input already has the expert dim")
                        .at(a.pos[1].span, "here")
                        .help("dispatch token features"),
                );
            }
            let mut dims = vec![r.expert.clone(), r.slot.clone()];
            dims.extend(x.ty.dims[nt..].iter().cloned());
            let out = TensorType::new(x.ty.dtype, dims);
            self.save(&out);
            Val::Tensor(TVal::new(out))
        } else {
            let ok = x.ty.dims.len() > 2 && x.ty.dims[0] == r.expert && x.ty.dims[1] == r.slot;
            if !ok {
                return self.err(
                    Diag::error(format!("`combine` input {} must start with [{}, slot]", x.ty, r.expert.name))
                        .at(a.pos[1].span, "not expert outputs")
                        .help("combine what the experts computed on dispatched tokens"),
                );
            }
            self.save(&x.ty);
            let mut dims = r.tokens.clone();
            dims.extend(x.ty.dims[2..].iter().cloned());
            Val::Tensor(TVal::new(TensorType::new(x.ty.dtype, dims)))
        }
    }
}
