//! The optimizer update as IR: clipping by global norm, then AdamW, SGD or
//! Adafactor, for every parameter, in one graph the runtime executes after
//! the gradients are summed (and that parallel plans can shard, as ZeRO does).
//!
//! Inputs, for each parameter in turn: its weights, its gradient, then the
//! state tensors [`Optimizer::state`] gives it (AdamW: `m`, `v`; SGD with
//! momentum: `m`; Adafactor: `m` when β1 > 0, then `vr` and `vc`, or `v`
//! for a moment it does not factor); after them the step's hyperparameters,
//! `f32[hyper = 3]` ([`Optimizer::hyper`]), and with `given_norm` the
//! global squared gradient norm. [`Update::outputs`] says which input is
//! which. Outputs: `param.k` and each state's `{prefix}.k` (named so in the
//! text form; consumers take them typed).
//!
//! A reduction over a dim a rank holds a cut of (Adafactor's row and column
//! means, its RMS of the update and of the weights) all-reduces its partial
//! sums over the dim's mesh axis, so every cut computes the logical value.

use crate::config::{Optimizer, StateRole};
use crate::ir::{BinaryOp, Graph, Op, ReduceOp, UnaryOp, ValueId};
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

/// What the update needs of a parameter (or of a rank's cut of one).
#[derive(Debug, Clone, PartialEq)]
pub struct UpdateParam {
    /// The dims the update sees: the logical ones, a rank's cut, or a flat ZeRO shard.
    pub dims: Vec<Dim>,
    /// The logical parameter's dims (which state it keeps, the sizes its means divide by).
    pub logical: Vec<Dim>,
    /// The dims of `dims` that are a cut of the logical dim, with the mesh axis that cuts them.
    pub splits: Vec<(String, String)>,
    /// Whether weight decay applies (`Param::decays` of the logical parameter).
    pub decays: bool,
    /// The parameter's declaration: where its update comes from.
    pub span: Span,
}

impl UpdateParam {
    pub fn of(p: &Param) -> UpdateParam {
        UpdateParam {
            dims: p.ty.dims.clone(),
            logical: p.ty.dims.clone(),
            splits: Vec::new(),
            decays: p.decays(),
            span: p.span,
        }
    }

    /// The optimizer state this parameter keeps, as the update sees it.
    pub fn state(&self, opt: &Optimizer) -> Vec<(StateRole, Vec<Dim>)> {
        opt.state(&self.logical, &self.dims)
    }
}

/// The update graph for these parameters.
pub fn optimizer_update(params: &[Param], opt: &Optimizer, clip: Option<f64>) -> Graph {
    let ps: Vec<UpdateParam> = params.iter().map(UpdateParam::of).collect();
    update_graph(&ps, opt, clip, false).graph
}

/// An update graph, and what it reads and computes for each parameter.
#[derive(Debug, Clone)]
pub struct Update {
    pub graph: Graph,
    /// Per parameter (in the order given), its inputs and updated values.
    pub outputs: Vec<Updated>,
    /// The input index of the hyperparameters, `f32[hyper = 3]`.
    pub hyper: usize,
    /// The input index of the global squared gradient norm (`given_norm`).
    pub norm: Option<usize>,
}

/// One parameter's inputs to the update and its values after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Updated {
    /// The input index of the weights; the gradient is the next.
    pub input: usize,
    pub weights: ValueId,
    /// Each state tensor: its role, its input index and its updated value.
    pub state: Vec<(StateRole, usize, ValueId)>,
}

/// The update graph for parameters (or cuts of them). With `given_norm`,
/// an input after the hyperparameters is the global sum of squared
/// gradients, `f32[]`, which the caller has summed over every rank's cuts;
/// otherwise the graph sums the squares of the gradients it is given.
pub fn update_graph(params: &[UpdateParam], opt: &Optimizer, clip: Option<f64>, given_norm: bool) -> Update {
    let mut b = B { g: Graph::new(), span: Span::default() };
    let mut next = 0;
    let mut input = |b: &mut B, ty: TensorType| {
        next += 1;
        b.push(Op::Input { index: next - 1 }, vec![], ty)
    };
    // (weights, gradient, [(role, input index, value)]) per parameter.
    let mut ins = Vec::with_capacity(params.len());
    for p in params {
        let ty = TensorType::new(DType::F32, p.dims.clone());
        let (w, g) = (input(&mut b, ty.clone()), input(&mut b, ty));
        let state: Vec<(StateRole, usize, ValueId)> = p
            .state(opt)
            .into_iter()
            .map(|(role, dims)| {
                let v = input(&mut b, TensorType::new(DType::F32, dims));
                (role, v.index(), v)
            })
            .collect();
        ins.push((w, g, state));
    }
    let hyper = input(&mut b, TensorType::new(DType::F32, vec![Dim::new("hyper", 3)]));
    let scalar = TensorType::scalar(DType::F32);
    let norm_in = given_norm.then(|| input(&mut b, scalar.clone()));
    // The learning rate, for SGD and Adafactor (the fused AdamW step reads all of `hyper`).
    let lr = b.push(Op::Take { dim: "hyper".into(), index: 0 }, vec![hyper], scalar.clone());
    // Clip by the global norm of all gradients: a scalar factor (1 without clipping).
    let factor = match (clip, norm_in) {
        (Some(c), Some(total)) => b.push(Op::ClipScale { clip: c }, vec![total], scalar.clone()),
        (Some(c), None) if !ins.is_empty() => {
            let mut total: Option<ValueId> = None;
            for (k, (_, g, _)) in ins.iter().enumerate() {
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
    let mut outputs = Vec::with_capacity(params.len());
    for (k, (p, (w, g, state))) in params.iter().zip(ins).enumerate() {
        b.span = p.span;
        let ty = b.g.ty(w).clone();
        let find = |role| state.iter().find(|s| s.0 == role).map(|s| s.2);
        let mut made: Vec<(StateRole, ValueId)> = Vec::new();
        let new_w = match opt {
            Optimizer::Adamw { beta1, beta2, eps, weight_decay, .. } => {
                let (m, v) = (find(StateRole::M).expect("AdamW keeps m"), find(StateRole::V).expect("and v"));
                // Fused: one pass per moment and one for the weights.
                let m_new = b.push(Op::AdamMoment { beta: *beta1, square: false }, vec![m, g, factor], ty.clone());
                let v_new = b.push(Op::AdamMoment { beta: *beta2, square: true }, vec![v, g, factor], ty.clone());
                let wd = if p.decays { *weight_decay } else { 0.0 };
                made.extend([(StateRole::M, m_new), (StateRole::V, v_new)]);
                b.push(Op::AdamStep { eps: *eps, weight_decay: wd }, vec![w, m_new, v_new, hyper], ty)
            }
            Optimizer::Sgd { momentum, weight_decay, nesterov, .. } => {
                let g = b.bin(BinaryOp::Mul, g, factor);
                let gi = if p.decays && *weight_decay != 0.0 {
                    let wd = b.scale(w, *weight_decay);
                    b.bin(BinaryOp::Add, g, wd)
                } else {
                    g
                };
                let d = match find(StateRole::M) {
                    Some(m) => {
                        let mm = b.scale(m, *momentum);
                        let buf = b.bin(BinaryOp::Add, mm, gi);
                        made.push((StateRole::M, buf));
                        if *nesterov {
                            let mb = b.scale(buf, *momentum);
                            b.bin(BinaryOp::Add, gi, mb)
                        } else {
                            buf
                        }
                    }
                    None => gi,
                };
                let step = b.bin(BinaryOp::Mul, d, lr);
                b.bin(BinaryOp::Sub, w, step)
            }
            Optimizer::Adafactor { .. } => {
                let g = b.bin(BinaryOp::Mul, g, factor);
                adafactor(&mut b, p, opt, w, g, &state, hyper, lr, &mut made)
            }
        };
        b.g.set_output(&format!("param.{k}"), new_w);
        let mut out_state = Vec::with_capacity(state.len());
        for (role, index, _) in &state {
            let v = made.iter().find(|m| m.0 == *role).expect("every state is updated").1;
            b.g.set_output(&format!("{}.{k}", role.prefix()), v);
            out_state.push((*role, *index, v));
        }
        outputs.push(Updated { input: w.index(), weights: new_w, state: out_state });
    }
    Update { graph: b.g, outputs, hyper: hyper.index(), norm: norm_in.map(|v| v.index()) }
}

impl B {
    fn ty_without(&self, x: ValueId, dims: &[String]) -> TensorType {
        let t = self.g.ty(x);
        TensorType::new(t.dtype, t.dims.iter().filter(|d| !dims.contains(&d.name)).cloned().collect())
    }

    /// The logical mean of `x` (of parameter `p`'s dims or some of them)
    /// over `dims`: partial sums all-reduced over the axes that cut them.
    fn mean(&mut self, p: &UpdateParam, x: ValueId, dims: &[String]) -> ValueId {
        let ty = self.ty_without(x, dims);
        let mut s = self.push(Op::Reduce { op: ReduceOp::Sum, dims: dims.to_vec() }, vec![x], ty.clone());
        for (d, axis) in &p.splits {
            if dims.contains(d) {
                s = self.push(Op::AllReduce { axis: axis.clone(), op: ReduceOp::Sum }, vec![s], ty.clone());
            }
        }
        let n: u64 = p.logical.iter().filter(|d| dims.contains(&d.name)).map(|d| d.size).product();
        self.scale(s, 1.0 / n.max(1) as f64)
    }

    /// The root mean square of `x` over every dim but the stacked `layer`:
    /// one value per layer, as each layer's own matrix has its own.
    fn rms(&mut self, p: &UpdateParam, x: ValueId) -> ValueId {
        let dims: Vec<String> = p.dims.iter().map(|d| d.name.clone()).filter(|d| d != "layer").collect();
        let sq = self.bin(BinaryOp::Mul, x, x);
        let ms = self.mean(p, sq, &dims);
        let ty = self.g.ty(ms).clone();
        self.push(Op::Unary { op: UnaryOp::Sqrt }, vec![ms], ty)
    }

    /// max(x, k) for a constant k, as (x + k + |x − k|) / 2.
    fn max_const(&mut self, x: ValueId, k: f64) -> ValueId {
        let kk = self.scalar(k);
        let d = self.bin(BinaryOp::Sub, x, kk);
        let ty = self.g.ty(d).clone();
        let a = self.push(Op::Unary { op: UnaryOp::Abs }, vec![d], ty);
        let s = self.bin(BinaryOp::Add, x, kk);
        let t = self.bin(BinaryOp::Add, s, a);
        self.scale(t, 0.5)
    }

    /// `v · β + x · (1 − β)`, with β a scalar value.
    fn decayed(&mut self, v: ValueId, beta: ValueId, one_minus: ValueId, x: ValueId) -> ValueId {
        let a = self.bin(BinaryOp::Mul, v, beta);
        let c = self.bin(BinaryOp::Mul, x, one_minus);
        self.bin(BinaryOp::Add, a, c)
    }
}

/// One parameter's Adafactor step (see [`Optimizer::Adafactor`]), in
/// `transformers`' order: the second moment's decay, the update g/√v̂, its
/// RMS clipped, scaled by the step size (the learning rate × the weights'
/// RMS), the first moment, weight decay (× the step size), then w − u.
#[allow(clippy::too_many_arguments)]
fn adafactor(
    b: &mut B,
    p: &UpdateParam,
    opt: &Optimizer,
    w: ValueId,
    g: ValueId,
    state: &[(StateRole, usize, ValueId)],
    hyper: ValueId,
    lr: ValueId,
    made: &mut Vec<(StateRole, ValueId)>,
) -> ValueId {
    let Optimizer::Adafactor { beta1, eps, eps_scale, clip, scale_parameter, weight_decay, .. } = *opt else {
        unreachable!("called for Adafactor")
    };
    let find = |role| state.iter().find(|s| s.0 == role).map(|s| s.2);
    let scalar = TensorType::scalar(DType::F32);
    let ty = b.g.ty(w).clone();
    let beta2 = b.push(Op::Take { dim: "hyper".into(), index: 2 }, vec![hyper], scalar.clone());
    let one = b.scalar(1.0);
    let one_minus = b.bin(BinaryOp::Sub, one, beta2);
    let sq = b.bin(BinaryOp::Mul, g, g);
    let e = b.scalar(eps);
    let sq = b.bin(BinaryOp::Add, sq, e);
    let u = match opt.factored(&p.logical) {
        Some((row, col)) => {
            let (vr, vc) = (find(StateRole::VRow).expect("factored"), find(StateRole::VCol).expect("factored"));
            let mr = b.mean(p, sq, std::slice::from_ref(&col));
            let vr = b.decayed(vr, beta2, one_minus, mr);
            let mc = b.mean(p, sq, std::slice::from_ref(&row));
            let vc = b.decayed(vc, beta2, one_minus, mc);
            made.extend([(StateRole::VRow, vr), (StateRole::VCol, vc)]);
            // v̂ = vr ⊗ vc / mean(vr): the rank-one estimate of the moment.
            let total = b.mean(p, vr, std::slice::from_ref(&row));
            let rel = b.bin(BinaryOp::Div, vr, total);
            let rt = b.g.ty(rel).clone();
            let rf = b.push(Op::Unary { op: UnaryOp::Rsqrt }, vec![rel], rt);
            let ct = b.g.ty(vc).clone();
            let cf = b.push(Op::Unary { op: UnaryOp::Rsqrt }, vec![vc], ct);
            let gr = b.push(Op::Binary { op: BinaryOp::Mul }, vec![g, rf], ty.clone());
            b.push(Op::Binary { op: BinaryOp::Mul }, vec![gr, cf], ty.clone())
        }
        None => {
            let v = find(StateRole::V).expect("unfactored");
            let v = b.decayed(v, beta2, one_minus, sq);
            made.push((StateRole::V, v));
            let r = b.push(Op::Unary { op: UnaryOp::Rsqrt }, vec![v], ty.clone());
            b.bin(BinaryOp::Mul, g, r)
        }
    };
    // Update clipping: u / max(1, RMS(u) / d).
    let rms = b.rms(p, u);
    let over = b.scale(rms, 1.0 / clip);
    let div = b.max_const(over, 1.0);
    let u = b.push(Op::Binary { op: BinaryOp::Div }, vec![u, div], ty.clone());
    let step = match scale_parameter {
        true => {
            let r = b.rms(p, w);
            let s = b.max_const(r, eps_scale);
            b.bin(BinaryOp::Mul, s, lr)
        }
        false => lr,
    };
    let mut u = b.push(Op::Binary { op: BinaryOp::Mul }, vec![u, step], ty.clone());
    if let Some(m) = find(StateRole::M) {
        let (b1, ob1) = (b.scalar(beta1), b.scalar(1.0 - beta1));
        u = b.decayed(m, b1, ob1, u);
        made.push((StateRole::M, u));
    }
    let w = if p.decays && weight_decay != 0.0 {
        let k = b.scale(step, weight_decay);
        let d = b.push(Op::Binary { op: BinaryOp::Mul }, vec![w, k], ty.clone());
        b.bin(BinaryOp::Sub, w, d)
    } else {
        w
    };
    b.bin(BinaryOp::Sub, w, u)
}
