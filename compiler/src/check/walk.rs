//! Walks a model body: resolves names, evaluates constants, calls blocks,
//! unrolls `repeat` (stacking parameters along `layer`), infers the named-dim
//! type of every value and gathers the cost figures of every op.
//!
//! Owns no syntax and no layout validation; ops are in `ops.rs`.

use super::program::Program;
use crate::config::Parallel;
use crate::diag::{Diag, unknown_help};
use crate::ir::BinaryOp;
use crate::ir::{Graph, Op, UnaryOp, ValueId};
use crate::model::*;
use crate::syntax::ast::{self, Arg, DType, DimEntry, Expr, ExprKind, Stmt, UnOp};
use crate::syntax::span::Span;
use std::collections::{HashMap, HashSet};
use std::rc::Rc;

/// A value during checking.
#[derive(Debug, Clone)]
pub(super) enum Val {
    Num(f64),
    Bool(bool),
    Str(String),
    Tensor(TVal),
    Route(Rc<RouteVal>),
    Tuple(Vec<Val>),
    /// The result of an expression that already produced a diagnostic.
    Poison,
}

impl Val {
    pub(super) fn kind(&self) -> &'static str {
        match self {
            Val::Num(_) => "a number",
            Val::Bool(_) => "a boolean",
            Val::Str(_) => "a string",
            Val::Tensor(_) => "a tensor",
            Val::Route(_) => "a routing",
            Val::Tuple(_) => "a tuple",
            Val::Poison => "an invalid value",
        }
    }
}

#[derive(Debug, Clone)]
pub(super) struct TVal {
    pub ty: TensorType,
    /// Index into the parameter list when this value is a parameter.
    pub param: Option<usize>,
    /// The graph IR value.
    pub id: ValueId,
}

#[derive(Debug)]
pub(super) struct RouteVal {
    /// Dims of the routed tokens (the router input without its expert dim).
    pub tokens: Vec<Dim>,
    pub expert: Dim,
    /// The capacity slot dim of dispatched tensors.
    pub slot: Dim,
    /// No capacity: slots are a static worst case, and only the routed
    /// tokens move (with a capacity factor the padded buffer moves).
    pub dropless: bool,
    /// The gates (top-k probabilities) and the router probabilities in the IR.
    pub gates: ValueId,
    pub probs: ValueId,
}

/// One lexical scope: the model body, or one block call.
#[derive(Debug, Clone, Default)]
pub(super) struct Frame {
    pub values: HashMap<String, Val>,
    pub consts: HashMap<String, Val>,
    /// Signature dim name → the caller's dim; also the dims a call passes
    /// (`heads -> image_heads`), in that call and the calls it makes.
    pub bindings: HashMap<String, Dim>,
    /// The names in `bindings` that a dim argument bound, each with its index in
    /// [`Walker::dim_args_used`].
    pub dim_args: HashMap<String, usize>,
    /// Dims declared inline in this scope (`qkv = 3`).
    pub local_dims: HashMap<String, Dim>,
    /// What `...` stands for in this block's signature.
    pub ellipsis: Option<Vec<Dim>>,
    /// Parameter path prefix.
    pub path: String,
    pub call_counts: HashMap<String, usize>,
    pub returned: Option<Val>,
    pub is_block: bool,
    /// The layer index, inside `repeat`.
    pub layer: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    Pre,
    Layers,
    Post,
}

pub(super) struct Walker<'a> {
    pub prog: &'a Program,
    pub consts: Vec<(String, f64)>,
    pub const_index: HashMap<String, usize>,
    pub parallel: &'a Parallel,
    /// Bytes of a float activation element in the training precision.
    pub act_bytes: u64,
    pub params: Vec<Param>,
    pub param_index: HashMap<String, usize>,
    pub param_phases: Vec<[bool; 3]>,
    pub inputs: Vec<Input>,
    pub accum: HashMap<String, TensorType>,
    /// The running sum of each accumulator in the graph.
    pub accum_ids: HashMap<String, ValueId>,
    /// The forward graph, built as values are typed.
    pub graph: Graph,
    pub routings: Vec<Routing>,
    pub stacks: Vec<Stack>,
    pub cost: CostProfile,
    pub phase: Phase,
    pub call_stack: Vec<String>,
    /// Useful fraction of each capacity slot dim (by size), for FLOPs of real work.
    pub slot_useful: HashMap<u64, f64>,
    pub diags: Vec<Diag>,
    seen: HashSet<(String, Span)>,
    /// Top-level tensors in the order of their last definition; entries
    /// with an empty name were redefined later.
    pub outputs: Vec<(String, TensorType)>,
    output_at: HashMap<String, usize>,
    /// Which dims are routed expert dims (name → (count, top_k)).
    pub expert_dims: HashMap<String, (u64, u64)>,
    pub current_stack: Option<usize>,
    pub value_dims: Vec<(Vec<String>, Span)>,
    value_dims_seen: HashSet<Vec<String>>,
    /// Where each model constant is defined.
    pub const_spans: HashMap<String, Span>,
    /// Constants already reported as invalid dim sizes.
    bad_dims: HashSet<String>,
    /// Whether each dim argument of a block call was read (an unread one has no effect).
    pub dim_args_used: Vec<bool>,
    /// The block share of each sparse attention pattern priced so far, by
    /// (mask's fold key, query dim, key dim, causal, window).
    pub attention_densities: HashMap<(String, Dim, Dim, bool, Option<u64>), f64>,
    /// Statements walked so far, and whether a size limit stopped the walk.
    walked: u64,
    pub(super) stopped: bool,
}

/// Layers unrolled in the whole model, over every `repeat` (and every call
/// of a block that holds one).
pub(super) const MAX_LAYERS: u64 = 10_000;
/// Nodes of the forward graph: blocks that call blocks several times can
/// multiply a short spec into any size, so the walk stops here.
pub(super) const MAX_GRAPH_NODES: usize = 4_000_000;
/// Statements walked (inlined blocks and unrolled layers included).
pub(super) const MAX_STATEMENTS: u64 = 10_000_000;

impl<'a> Walker<'a> {
    pub(super) fn new(
        prog: &'a Program,
        consts: Vec<(String, f64)>,
        parallel: &'a Parallel,
        act_bytes: u64,
    ) -> Walker<'a> {
        let const_index = consts.iter().enumerate().map(|(i, (n, _))| (n.clone(), i)).collect();
        Walker {
            prog,
            consts,
            const_index,
            parallel,
            act_bytes,
            params: Vec::new(),
            param_index: HashMap::new(),
            param_phases: Vec::new(),
            inputs: Vec::new(),
            accum: HashMap::new(),
            accum_ids: HashMap::new(),
            graph: Graph::new(),
            routings: Vec::new(),
            stacks: Vec::new(),
            cost: CostProfile::default(),
            phase: Phase::Pre,
            call_stack: Vec::new(),
            slot_useful: HashMap::new(),
            diags: Vec::new(),
            seen: HashSet::new(),
            outputs: Vec::new(),
            output_at: HashMap::new(),
            expert_dims: HashMap::new(),
            current_stack: None,
            value_dims: Vec::new(),
            value_dims_seen: HashSet::new(),
            const_spans: HashMap::new(),
            bad_dims: HashSet::new(),
            dim_args_used: Vec::new(),
            attention_densities: HashMap::new(),
            walked: 0,
            stopped: false,
        }
    }

    /// Report a diagnostic once (a repeat body is walked once per layer).
    pub(super) fn err(&mut self, d: Diag) -> Val {
        // After a size limit stopped the walk, what is left half-walked says nothing new.
        if self.stopped {
            return Val::Poison;
        }
        let key = (d.message.clone(), d.primary_span().unwrap_or_default());
        if self.seen.insert(key) {
            self.diags.push(d);
        }
        Val::Poison
    }

    /// Add a node to the forward graph and return its typed value.
    pub(super) fn emit(&mut self, op: Op, inputs: Vec<ValueId>, ty: TensorType, span: Span) -> TVal {
        if self.graph.len() == MAX_GRAPH_NODES {
            self.too_big(span, format!("the model unrolls to more than {MAX_GRAPH_NODES} operations"), "this call");
        }
        let id = self.graph.push(op, inputs, ty.clone(), span);
        TVal { ty, param: None, id }
    }

    pub(super) fn model_const(&self, name: &str) -> Option<f64> {
        self.const_index.get(name).map(|&i| self.consts[i].1)
    }

    // ------------------------------------------------------------ cost

    pub(super) fn add_cost(&mut self, c: OpCost) {
        match self.phase {
            Phase::Pre => self.cost.pre += c,
            Phase::Layers => self.cost.layers += c,
            Phase::Post => self.cost.post += c,
        }
    }

    /// Bytes of an activation of this type on one rank: float values in the
    /// training precision, divided by the layout's split of each of its dims.
    pub(super) fn act_size(&self, ty: &TensorType) -> f64 {
        let elem = if ty.dtype.is_float() { self.act_bytes } else { ty.dtype.bytes() };
        ty.numel().saturating_mul(elem) as f64 / self.shard_factor(ty) as f64
    }

    /// How many ways the layout splits a value of this type (batch excluded:
    /// `batch` is already the per-rank microbatch).
    pub(super) fn shard_factor(&self, ty: &TensorType) -> u64 {
        let p = self.parallel;
        let mut axes: Vec<&str> = Vec::new();
        for d in &ty.dims {
            if d.name == "batch" || d.name == "layer" {
                continue;
            }
            if let Some(a) = p.axis_of(&d.name)
                && !axes.contains(&a)
            {
                axes.push(a);
            }
        }
        if p.sequence_parallel
            && let Some(tp) = p.axis_of("heads").or_else(|| p.axis_of("mlp"))
            && !axes.contains(&tp)
            && ty.has("seq")
        {
            axes.push(tp);
        }
        axes.iter().map(|a| p.axis_size(a)).fold(1u64, u64::saturating_mul).max(1)
    }

    /// How many ways the layout splits the work of a contraction with these
    /// output and contracted dims over one rank's microbatch: the model axes
    /// its dims are laid out on (the data axis only splits the batch, and a
    /// sequence split is gathered before a matmul).
    pub(super) fn compute_split<'d>(&self, dims: impl Iterator<Item = &'d Dim>) -> u64 {
        let p = self.parallel;
        let data = p.data_axis();
        let mut axes: Vec<&str> = Vec::new();
        for d in dims {
            if d.name == "batch" || d.name == "layer" {
                continue;
            }
            if let Some(a) = p.axis_of(&d.name)
                && Some(a) != data
                && !axes.contains(&a)
            {
                axes.push(a);
            }
        }
        axes.iter().map(|a| p.axis_size(a)).fold(1u64, u64::saturating_mul).max(1)
    }

    // ------------------------------------------------------------ dims

    /// Resolve a dim name in the current scope.
    pub(super) fn dim(&mut self, frame: &Frame, name: &str, span: Span) -> Option<Dim> {
        if let Some(d) = self.bound(frame, name) {
            return Some(d);
        }
        if let Some(d) = frame.local_dims.get(name) {
            return Some(d.clone());
        }
        if let Some(Val::Num(v)) = frame.consts.get(name) {
            return self.dim_size(name, *v, span).map(|s| Dim::new(name, s));
        }
        if let Some(v) = self.model_const(name) {
            return self.dim_size(name, v, span).map(|s| Dim::new(name, s));
        }
        let mut cands: Vec<&str> = self.consts.iter().map(|(n, _)| n.as_str()).collect();
        cands.extend(frame.bindings.keys().map(String::as_str));
        cands.extend(frame.local_dims.keys().map(String::as_str));
        let help = unknown_help("dim", name, cands.iter().copied());
        self.err(
            Diag::error(format!("unknown dim `{name}`"))
                .at(span, "not a dim of this model")
                .help(format!("{help} (declare dims in the model's `dims {{ ... }}` block)")),
        );
        None
    }

    /// The dim a block signature or a dim argument binds `name` to, marking a
    /// dim argument as read.
    pub(super) fn bound(&mut self, frame: &Frame, name: &str) -> Option<Dim> {
        let d = frame.bindings.get(name)?;
        if let Some(&i) = frame.dim_args.get(name) {
            self.dim_args_used[i] = true;
        }
        Some(d.clone())
    }

    fn dim_size(&mut self, name: &str, v: f64, span: Span) -> Option<u64> {
        if v.fract() != 0.0 || v < 1.0 || !v.is_finite() || v > 1e12 {
            if self.bad_dims.insert(name.to_string()) {
                let mut d = Diag::error(format!("`{name}` = {v} cannot be the size of a dim"))
                    .at(span, "used as a dim here")
                    .help("a dim size must be a whole number from 1 to 10^12");
                if let Some(def) = self.const_spans.get(name) {
                    d = d.also(*def, "defined here");
                }
                self.err(d);
            }
            return None;
        }
        Some(v as u64)
    }

    /// Resolve a type expression to dims (`...` expands to the bound leading dims).
    pub(super) fn type_dims(&mut self, frame: &mut Frame, te: &ast::TypeExpr) -> Option<Vec<Dim>> {
        let mut dims = Vec::new();
        let mut ok = true;
        for entry in &te.dims {
            match entry {
                DimEntry::Ellipsis(span) => {
                    match &frame.ellipsis {
                        Some(e) => dims.extend(e.iter().cloned()),
                        None => {
                            self.err(
                            Diag::error("`...` outside a block signature")
                                .at(*span, "nothing is bound to `...` here")
                                .help("`...` stands for the leading dims of a block's tensor input; write the dims out"),
                        );
                            ok = false;
                        }
                    }
                }
                DimEntry::Named { name, size: Some(e) } => {
                    let v = self.eval_const(frame, e);
                    match v.and_then(|v| self.dim_size(&name.name, v, e.span)) {
                        Some(size) => {
                            let existing = frame
                                .bindings
                                .get(&name.name)
                                .or_else(|| frame.local_dims.get(&name.name))
                                .map(|d| d.size)
                                .or_else(|| self.model_const(&name.name).map(|v| v as u64));
                            if let Some(old) = existing
                                && old != size
                            {
                                self.err(
                                    Diag::error(format!(
                                        "dim `{}` is declared with size {size} but is already {old}",
                                        name.name
                                    ))
                                    .at(name.span, "redeclared here")
                                    .help("use a new name for a dim of another size"),
                                );
                                ok = false;
                            }
                            frame.local_dims.insert(name.name.clone(), Dim::new(&name.name, size));
                            dims.push(Dim::new(&name.name, size));
                        }
                        None => ok = false,
                    }
                }
                DimEntry::Named { name, size: None } => match self.dim(frame, &name.name, name.span) {
                    Some(d) => dims.push(d),
                    None => ok = false,
                },
            }
        }
        let mut seen = HashSet::new();
        for d in &dims {
            if !seen.insert(d.name.clone()) {
                self.err(
                    Diag::error(format!("dim `{}` appears twice in one type", d.name))
                        .at(te.span, "repeated dim")
                        .help("a tensor's dims must have distinct names; declare a second name (e.g. `kv_seq = seq`)"),
                );
                ok = false;
            }
        }
        ok.then_some(dims)
    }

    // ------------------------------------------------------------ constants

    /// Evaluate an expression that must be a number.
    pub(super) fn eval_const(&mut self, frame: &mut Frame, e: &Expr) -> Option<f64> {
        match self.expr(frame, e) {
            Val::Num(v) => Some(v),
            Val::Poison => None,
            other => {
                self.err(
                    Diag::error(format!("expected a number, found {}", other.kind()))
                        .at(e.span, "must be a constant number")
                        .help("sizes, rates and counts are computed from dims and numbers only"),
                );
                None
            }
        }
    }

    // ------------------------------------------------------------ statements

    /// Stop the walk at a size limit (reported once).
    fn too_big(&mut self, span: Span, message: String, label: &str) {
        if !self.stopped {
            self.stopped = true;
            self.diags.push(Diag::error(message).at(span, label.to_string()).help(
                "checking unrolls every layer and inlines every block call; \
                 see docs/reliability.md for the limits",
            ));
        }
    }

    pub(super) fn body(&mut self, frame: &mut Frame, stmts: &[Stmt]) {
        let mut prev: Option<&Stmt> = None;
        for s in stmts {
            self.walked += 1;
            if self.walked > MAX_STATEMENTS {
                self.too_big(s.span(), format!("checking walks more than {MAX_STATEMENTS} statements"), "here");
            }
            if self.stopped {
                return;
            }
            if frame.returned.is_some() {
                // After a taken `if { return }` the rest is the other branch; after a
                // plain `return` it is dead code.
                if matches!(prev, Some(Stmt::Return(..))) {
                    self.err(
                        Diag::error("statement after `return`")
                            .at(s.span(), "never reached")
                            .help("`return` ends the block; move this statement before it"),
                    );
                }
                return;
            }
            self.stmt(frame, s);
            prev = Some(s);
        }
    }

    fn stmt(&mut self, frame: &mut Frame, s: &Stmt) {
        match s {
            Stmt::Dims(..) if !frame.is_block && frame.layer.is_none() => {} // evaluated before the walk
            Stmt::Dims(_, span) => {
                self.err(
                    Diag::error("`dims` inside a block or nested scope")
                        .at(*span, "only the model body declares dims")
                        .help("move these dims to the model's `dims { ... }`; a block may declare a local dim inline, e.g. `param w: [embed, qkv = 3]`"),
                );
            }
            Stmt::Input { name, ty, span } => {
                if frame.is_block || frame.layer.is_some() {
                    self.err(
                        Diag::error("`input` inside a block")
                            .at(*span, "inputs are declared by the model")
                            .help("pass the tensor to the block as an argument instead"),
                    );
                    return;
                }
                let Some((dtype, _)) = ty.dtype else {
                    self.err(
                        Diag::error(format!("input `{}` has no dtype", name.name))
                            .at(ty.span, "missing dtype")
                            .help("write the dtype before the dims, e.g. `i32[batch, seq]`"),
                    );
                    return;
                };
                if let Some(dims) = self.type_dims(frame, ty) {
                    let t = TensorType::new(dtype, dims);
                    let v = self.emit(Op::Input { index: self.inputs.len() }, vec![], t.clone(), *span);
                    self.inputs.push(Input { name: name.name.clone(), ty: t });
                    self.define(frame, name, Val::Tensor(v));
                }
            }
            Stmt::Param { name, ty, init, span } => self.param(frame, name, ty, init.as_ref(), *span),
            Stmt::Return(e, span) => {
                if !frame.is_block {
                    self.err(
                        Diag::error("`return` outside a block")
                            .at(*span, "a model has no caller to return to")
                            .help("name the model's outputs instead, e.g. `loss = cross_entropy(logits, targets)`"),
                    );
                    return;
                }
                let v = self.expr(frame, e);
                frame.returned = Some(v);
            }
            Stmt::If { cond, then, otherwise, .. } => {
                let c = self.expr(frame, cond);
                match c {
                    Val::Bool(true) => self.body(frame, &then.stmts),
                    Val::Bool(false) => {
                        if let Some(o) = otherwise {
                            self.body(frame, &o.stmts)
                        }
                    }
                    Val::Poison => {}
                    other => {
                        self.err(
                            Diag::error(format!("`if` needs a constant condition, found {}", other.kind()))
                                .at(cond.span, "not a constant true/false")
                                .help("conditions choose layer kinds from constants, e.g. `if layer % 2 == 1 { ... }`"),
                        );
                    }
                }
            }
            Stmt::Accum { name, value, span } => {
                let v = self.expr(frame, value);
                match v {
                    Val::Tensor(t) if t.ty.dims.is_empty() && t.ty.dtype.is_float() => {
                        if let Some(old) = self.accum.get(&name.name)
                            && old != &t.ty
                        {
                            self.err(
                                Diag::error(format!("`{}` accumulates values of different types", name.name))
                                    .at(*span, format!("this adds {}", t.ty))
                                    .help(format!("earlier additions were {old}")),
                            );
                        }
                        let sum = match self.accum_ids.get(&name.name) {
                            Some(&prev) => {
                                self.emit(Op::Binary { op: BinaryOp::Add }, vec![prev, t.id], t.ty.clone(), *span).id
                            }
                            None => t.id,
                        };
                        self.accum_ids.insert(name.name.clone(), sum);
                        self.accum.insert(name.name.clone(), t.ty);
                    }
                    Val::Poison => {
                        self.accum.entry(name.name.clone()).or_insert_with(|| TensorType::scalar(DType::F32));
                    }
                    other => {
                        let what = match &other {
                            Val::Tensor(t) => format!("a tensor of type {}", t.ty),
                            o => o.kind().to_string(),
                        };
                        self.err(
                            Diag::error(format!("`+=` accumulates scalar losses, found {what}"))
                                .at(value.span, "not a scalar")
                                .help("reduce to a scalar first, e.g. `aux_loss += load_balance(route) * 0.01`"),
                        );
                    }
                }
            }
            Stmt::Assign { names, value, span } => {
                if let ExprKind::Repeat { count, label, body } = &value.kind {
                    self.repeat(frame, names, count, label.as_ref(), body, *span);
                    return;
                }
                let v = self.expr(frame, value);
                if names.len() == 1 {
                    self.define(frame, &names[0], v);
                } else {
                    match v {
                        Val::Tuple(xs) if xs.len() == names.len() => {
                            for (n, x) in names.iter().zip(xs) {
                                self.define(frame, n, x);
                            }
                        }
                        Val::Poison => {
                            for n in names {
                                self.define(frame, n, Val::Poison);
                            }
                        }
                        other => {
                            let got = match &other {
                                Val::Tuple(xs) => format!("{} values", xs.len()),
                                o => o.kind().to_string(),
                            };
                            self.err(
                                Diag::error(format!(
                                    "{} names on the left, but the right side gives {got}",
                                    names.len()
                                ))
                                .at(value.span, "wrong number of values")
                                .help("`q, k, v = split(x, qkv)` needs a dim of size 3; match the names to the values"),
                            );
                            for n in names {
                                self.define(frame, n, Val::Poison);
                            }
                        }
                    }
                }
            }
        }
    }

    fn define(&mut self, frame: &mut Frame, name: &ast::Ident, v: Val) {
        if let Val::Tensor(t) = &v {
            let names: Vec<String> = t.ty.dims.iter().map(|d| d.name.clone()).collect();
            if self.value_dims_seen.insert(names.clone()) {
                self.value_dims.push((names, name.span));
            }
        }
        if !frame.is_block
            && frame.layer.is_none()
            && let Val::Tensor(t) = &v
        {
            // A redefined name moves to the end: its old entry is blanked
            // here and dropped once, after the walk (linear in the spec).
            if let Some(i) = self.output_at.insert(name.name.clone(), self.outputs.len()) {
                self.outputs[i].0.clear();
            }
            self.outputs.push((name.name.clone(), t.ty.clone()));
            self.graph.set_output(&name.name, t.id);
        }
        frame.values.insert(name.name.clone(), v);
    }

    fn param(&mut self, frame: &mut Frame, name: &ast::Ident, ty: &ast::TypeExpr, init: Option<&Expr>, span: Span) {
        let dtype = ty.dtype.map(|(d, _)| d).unwrap_or(DType::F32);
        if !dtype.is_float() {
            self.err(
                Diag::error(format!("param `{}` has dtype {}", name.name, dtype.name()))
                    .at(ty.span, "parameters are trained, so they must be floating point")
                    .help("use f32 (the training precision decides the storage dtype)"),
            );
            return;
        }
        let dims = self.type_dims(frame, ty);
        let init = match init {
            None => Some(Init::Normal { std: 0.02 }),
            Some(e) => self.init(frame, e),
        };
        let (Some(dims), Some(init)) = (dims, init) else {
            // Already reported; later uses of the name should not cascade.
            frame.values.insert(name.name.clone(), Val::Poison);
            return;
        };
        let path = if frame.path.is_empty() { name.name.clone() } else { format!("{}.{}", frame.path, name.name) };
        let t = TensorType::new(dtype, dims);
        let idx = match self.param_index.get(&path) {
            Some(&i) if frame.layer.is_some() && self.params[i].stack == self.current_stack => {
                // Another layer of a stacked parameter: grow the `layer` dim.
                let p = &mut self.params[i];
                if p.ty.dims[1..] != t.dims[..] || p.ty.dtype != t.dtype {
                    let old = TensorType::new(p.ty.dtype, p.ty.dims[1..].to_vec());
                    return {
                        self.err(
                            Diag::error(format!("param `{path}` changes shape across layers"))
                                .at(span, format!("{t} in layer {}", frame.layer.unwrap_or(0)))
                                .help(format!(
                                    "earlier layers have {old}; give parameters of other layer kinds other names"
                                )),
                        );
                    };
                }
                p.ty.dims[0].size += 1;
                p.layers.push(frame.layer.unwrap_or(0));
                i
            }
            Some(&i) => {
                let first = self.params[i].span;
                self.err(
                    Diag::error(format!("param `{path}` is declared twice"))
                        .at(span, "second declaration")
                        .also(first, "first declared here")
                        .help("give each parameter its own name"),
                );
                return;
            }
            None => {
                let mut full = t.clone();
                let placement = if frame.layer.is_some() {
                    full.dims.insert(0, Dim::new("layer", 1));
                    Placement::Layers
                } else {
                    Placement::First
                };
                let layers = frame.layer.into_iter().collect();
                self.params.push(Param {
                    path: path.clone(),
                    ty: full,
                    init,
                    placement,
                    expert: None,
                    stack: self.current_stack,
                    layers,
                    frozen: false,
                    adapter_of: None,
                    span,
                });
                self.param_phases.push([false; 3]);
                self.param_index.insert(path, self.params.len() - 1);
                self.params.len() - 1
            }
        };
        if frame.values.contains_key(&name.name) {
            self.err(
                Diag::error(format!("`{}` is already defined in this scope", name.name))
                    .at(name.span, "parameter shadows a value")
                    .help("rename the parameter"),
            );
        }
        let node = self.graph.push(Op::Param { index: idx, layer: frame.layer }, vec![], t.clone(), span);
        frame.values.insert(name.name.clone(), Val::Tensor(TVal { ty: t, param: Some(idx), id: node }));
    }

    fn init(&mut self, frame: &mut Frame, e: &Expr) -> Option<Init> {
        let bad =
            |w: &mut Self, msg: &str| {
                w.err(Diag::error(format!("invalid initializer: {msg}")).at(e.span, "here").help(
                    "use normal(std), truncated_normal(std), uniform(low, high), zeros, ones or constant(value)",
                ));
                None
            };
        match &e.kind {
            ExprKind::Name(n) if n == "zeros" => Some(Init::Zeros),
            ExprKind::Name(n) if n == "ones" => Some(Init::Ones),
            ExprKind::Call { name, args } => {
                let mut nums = Vec::new();
                for a in args {
                    match a {
                        Arg::Pos(x) => nums.push(self.eval_const(frame, x)?),
                        _ => return bad(self, "initializers take positional numbers"),
                    }
                }
                let init = match (name.name.as_str(), nums.as_slice()) {
                    ("normal", [s]) => Init::Normal { std: *s },
                    ("truncated_normal", [s]) => Init::TruncatedNormal { std: *s },
                    ("uniform", [a, b]) => Init::Uniform { low: *a, high: *b },
                    ("uniform", [a]) => Init::Uniform { low: -*a, high: *a },
                    ("constant", [v]) => Init::Constant { value: *v },
                    ("normal" | "truncated_normal" | "uniform" | "constant", _) => {
                        return bad(self, &format!("wrong number of arguments to `{}`", name.name));
                    }
                    (other, _) => {
                        let help = unknown_help(
                            "initializer",
                            other,
                            ["normal", "truncated_normal", "uniform", "zeros", "ones", "constant"],
                        );
                        self.err(
                            Diag::error(format!("unknown initializer `{other}`"))
                                .at(name.span, "not an initializer")
                                .help(help),
                        );
                        return None;
                    }
                };
                if let Init::Normal { std } | Init::TruncatedNormal { std } = init
                    && !(std.is_finite() && std >= 0.0)
                {
                    return bad(self, &format!("std must be a finite non-negative number, got {std}"));
                }
                Some(init)
            }
            ExprKind::Name(other) => {
                let help = unknown_help(
                    "initializer",
                    other,
                    ["normal", "truncated_normal", "uniform", "zeros", "ones", "constant"],
                );
                self.err(
                    Diag::error(format!("unknown initializer `{other}`")).at(e.span, "not an initializer").help(help),
                );
                None
            }
            _ => bad(self, "expected an initializer"),
        }
    }

    fn repeat(
        &mut self,
        frame: &mut Frame,
        names: &[ast::Ident],
        count: &Expr,
        label: Option<&ast::Ident>,
        body: &ast::Body,
        span: Span,
    ) {
        if names.len() != 1 {
            self.err(
                Diag::error("`repeat` carries one value")
                    .at(span, "several names on the left")
                    .help("write `h = repeat layers { ... }`; the body updates `h` layer by layer"),
            );
            return;
        }
        let carried = &names[0];
        if frame.layer.is_some() {
            self.err(
                Diag::error("nested `repeat`")
                    .at(span, "a repeat inside a repeat")
                    .help("stack the inner layers as a block called several times, or flatten the two counts into one"),
            );
            return;
        }
        let Some(n) = self.eval_const(frame, count) else {
            return;
        };
        if n.fract() != 0.0 || !(1.0..=MAX_LAYERS as f64).contains(&n) {
            self.err(
                Diag::error(format!("repeat count must be a whole number from 1 to {MAX_LAYERS}, got {n}"))
                    .at(count.span, "layer count")
                    .help("check the dim that gives the number of layers"),
            );
            return;
        }
        let n = n as u64;
        if self.cost.layer_count + n > MAX_LAYERS {
            let before = self.cost.layer_count;
            self.too_big(
                count.span,
                format!("the model unrolls more than {MAX_LAYERS} layers in all ({before} before this repeat of {n})"),
                "these layers pass the limit",
            );
            return;
        }
        let Some(init) = frame.values.get(&carried.name).cloned() else {
            self.err(
                Diag::error(format!("`{}` must be defined before the repeat", carried.name))
                    .at(carried.name_span(), "the body reads the previous layer's value of this name")
                    .help(format!(
                        "define `{}` first, e.g. the embeddings: `{} = embed(wte, tokens)`",
                        carried.name, carried.name
                    )),
            );
            return;
        };
        let label_name = match (label, &count.kind) {
            (Some(l), _) => l.name.clone(),
            (None, ExprKind::Name(c)) => c.clone(),
            _ => format!("repeat{}", self.stacks.len()),
        };
        let stack = self.stacks.len();
        self.stacks.push(Stack { label: label_name.clone(), layers: n });
        let prev_phase = self.phase;
        self.phase = Phase::Layers;
        self.current_stack = Some(stack);
        let mut value = init.clone();
        let init_ty = match &init {
            Val::Tensor(t) => Some(t.ty.clone()),
            _ => None,
        };
        if let Val::Tensor(t) = &init {
            self.cost.layer_input_bytes += self.act_size(&t.ty) * n as f64;
        }
        self.cost.layer_count += n;
        let prefix = if frame.path.is_empty() { label_name } else { format!("{}.{}", frame.path, label_name) };
        for i in 0..n {
            let mut f = frame.clone();
            f.path = prefix.clone();
            f.layer = Some(i);
            f.call_counts.clear();
            f.values.insert(carried.name.clone(), value.clone());
            self.body(&mut f, &body.stmts);
            value = f.values.get(&carried.name).cloned().unwrap_or(Val::Poison);
            match (&value, &init_ty) {
                (Val::Tensor(t), Some(ty)) if &t.ty != ty => {
                    self.err(
                        Diag::error(format!("the repeat body changes the type of `{}`", carried.name))
                            .at(body.span, format!("layer {i} ends with {}", t.ty))
                            .help(format!("each layer must return what it takes: {ty}")),
                    );
                    value = Val::Poison;
                    break;
                }
                (Val::Poison, _) => break,
                _ => {}
            }
        }
        self.current_stack = None;
        let _ = prev_phase;
        self.phase = Phase::Post;
        if let Val::Tensor(t) = &mut value {
            t.param = None;
        }
        self.define(frame, carried, value);
    }

    // ------------------------------------------------------------ expressions

    pub(super) fn expr(&mut self, frame: &mut Frame, e: &Expr) -> Val {
        match &e.kind {
            ExprKind::Number { value, .. } => Val::Num(*value),
            ExprKind::Str(s) => Val::Str(s.clone()),
            ExprKind::Bool(b) => Val::Bool(*b),
            ExprKind::Paren(x) => self.expr(frame, x),
            ExprKind::Unit(x, u) => {
                self.err(
                    Diag::error(format!("unit `{u}` in a model expression"))
                        .at(e.span, "units belong to section values")
                        .help("write plain numbers inside models and blocks"),
                );
                self.expr(frame, x)
            }
            ExprKind::Name(n) => self.name(frame, n, e.span),
            ExprKind::Tuple(xs) => Val::Tuple(xs.iter().map(|x| self.expr(frame, x)).collect()),
            ExprKind::List(xs) => Val::Tuple(xs.iter().map(|x| self.expr(frame, x)).collect()),
            ExprKind::Repeat { .. } => self.err(
                Diag::error("`repeat` inside an expression")
                    .at(e.span, "repeat must be the whole right side of an assignment")
                    .help("write `h = repeat layers { ... }` as its own statement"),
            ),
            ExprKind::Unary(op, x) => {
                let v = self.expr(frame, x);
                match (op, v) {
                    (UnOp::Neg, Val::Num(a)) => Val::Num(-a),
                    (UnOp::Not, Val::Bool(b)) => Val::Bool(!b),
                    (UnOp::Neg, Val::Tensor(t)) if t.ty.dtype.is_float() => {
                        Val::Tensor(self.emit(Op::Unary { op: UnaryOp::Neg }, vec![t.id], t.ty, e.span))
                    }
                    // `!mask`: the mask equal to false.
                    (UnOp::Not, Val::Tensor(t)) if t.ty.dtype == DType::Bool => {
                        let f = self.emit(Op::Scalar { value: 0.0 }, vec![], TensorType::scalar(DType::Bool), e.span);
                        let op = Op::Compare { op: crate::ir::CompareOp::Eq };
                        Val::Tensor(self.emit(op, vec![t.id, f.id], t.ty, e.span))
                    }
                    (_, Val::Poison) => Val::Poison,
                    (op, v) => {
                        let sym = if *op == UnOp::Neg { "-" } else { "!" };
                        self.err(
                            Diag::error(format!("`{sym}` cannot apply to {}", v.kind()))
                                .at(e.span, "invalid operand")
                                .help("`-` negates numbers and float tensors; `!` negates booleans"),
                        )
                    }
                }
            }
            ExprKind::Binary(op, a, b) => {
                let va = self.expr(frame, a);
                let vb = self.expr(frame, b);
                self.binary(*op, va, vb, a.span, b.span, e.span)
            }
            ExprKind::Call { name, args } => self.call(frame, name, args, e.span),
        }
    }

    fn name(&mut self, frame: &mut Frame, n: &str, span: Span) -> Val {
        if let Some(v) = frame.values.get(n).or_else(|| frame.consts.get(n)) {
            let v = v.clone();
            if let Val::Tensor(TVal { param: Some(i), .. }) = &v {
                let slot = match self.phase {
                    Phase::Pre => 0,
                    Phase::Layers => 1,
                    Phase::Post => 2,
                };
                self.param_phases[*i][slot] = true;
            }
            return v;
        }
        if n == "layer"
            && let Some(i) = frame.layer
        {
            return Val::Num(i as f64);
        }
        // A dim the block binds counts as its own size (`embed` bound to `text_embed`).
        if let Some(d) = self.bound(frame, n) {
            return Val::Num(d.size as f64);
        }
        if let Some(v) = self.model_const(n) {
            return Val::Num(v);
        }
        if let Some(t) = self.accum.get(n) {
            // No running sum: every addition failed and was reported already.
            return match self.accum_ids.get(n) {
                Some(&id) => Val::Tensor(TVal { ty: t.clone(), param: None, id }),
                None => Val::Poison,
            };
        }
        let mut cands: Vec<String> = frame.values.keys().chain(frame.consts.keys()).cloned().collect();
        cands.extend(self.consts.iter().map(|(n, _)| n.clone()));
        cands.extend(self.accum.keys().cloned());
        let help = unknown_help("name", n, cands.iter().map(String::as_str));
        let extra = if n == "layer" { " (`layer` is the layer index inside `repeat`)" } else { "" };
        self.err(Diag::error(format!("unknown name `{n}`")).at(span, "not defined").help(format!("{help}{extra}")))
    }

    // ------------------------------------------------------------ calls

    fn call(&mut self, frame: &mut Frame, name: &ast::Ident, args: &[Arg], span: Span) -> Val {
        if let Some(def) = self.prog.blocks.get(&name.name) {
            let def = def.clone();
            return self.call_block(frame, &def, args, span);
        }
        if super::ops::is_op(&name.name) {
            return self.op(frame, name, args, span);
        }
        let mut cands: Vec<&str> = super::ops::OPS.iter().map(|o| o.name).collect();
        cands.extend(self.prog.blocks.keys().map(String::as_str));
        let help = unknown_help("op or block", &name.name, cands.iter().copied());
        self.err(
            Diag::error(format!("unknown op or block `{}`", name.name))
                .at(name.span, "not a built-in op or a block in scope")
                .help(format!("{help} (blocks from other files need `use`)")),
        )
    }
}

trait NameSpan {
    fn name_span(&self) -> Span;
}

impl NameSpan for ast::Ident {
    fn name_span(&self) -> Span {
        self.span
    }
}
