//! The IR verifier: a gate every pass's output goes through in tests.
//!
//! It checks that the graph is SSA in topological order (inputs come before
//! their users), that each op has the inputs it needs, and re-derives the
//! output type of every op whose rule is local, comparing it with the node's.

use super::{BinaryOp, Graph, Op, ValueId};
use crate::model::{Dim, TensorType};
use crate::syntax::ast::DType;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("IR verification failed at {value}: {message}")]
pub struct VerifyError {
    pub value: ValueId,
    pub message: String,
}

fn arity(op: &Op) -> (usize, usize) {
    match op {
        Op::Input { .. } | Op::Param { .. } | Op::Scalar { .. } | Op::Sinusoid => (0, 0),
        Op::Unary { .. }
        | Op::Pow { .. }
        | Op::Reduce { .. }
        | Op::Softmax { .. }
        | Op::Take { .. }
        | Op::SplitDim { .. }
        | Op::MergeDims { .. }
        | Op::Rename { .. }
        | Op::Permute
        | Op::Dropout { .. }
        | Op::Rope { .. }
        | Op::Patches { .. }
        | Op::TopK { .. }
        | Op::ZLoss
        | Op::Cast { .. } => (1, 1),
        Op::AllReduce { .. }
        | Op::AllGather { .. }
        | Op::ReduceScatter { .. }
        | Op::AllToAll { .. }
        | Op::Select { .. } => (1, 1),
        Op::EmbedRows { .. } | Op::EmbedGradRows { .. } | Op::TargetLogit { .. } => (2, 2),
        Op::CrossEntropyGradRows { .. } => (5, 5),
        Op::Binary { .. } | Op::MatMul { .. } | Op::Embed | Op::CrossEntropy { .. } => (2, 2),
        Op::Dispatch | Op::Combine | Op::LoadBalance => (2, 2),
        Op::LayerNorm { gain, bias, .. } => {
            let n = 1 + usize::from(*gain) + usize::from(*bias);
            (n, n)
        }
        Op::RmsNorm { gain, .. } => {
            let n = 1 + usize::from(*gain);
            (n, n)
        }
        Op::Concat { over, .. } => (over.len(), over.len()),
        Op::Untake { indices, .. } => (indices.len().max(1), indices.len().max(1)),
        Op::Expand | Op::Slice { .. } | Op::DropoutGrad { .. } | Op::RopeGrad { .. } => (1, 1),
        Op::ClipScale { .. } => (1, 1),
        Op::AdamMoment { .. } => (3, 3),
        Op::AdamStep { .. } => (4, 4),
        Op::Einsum | Op::UnaryGrad { .. } | Op::SoftmaxGrad { .. } | Op::EmbedGrad | Op::GateMask => (2, 2),
        Op::NormGradGain { .. } | Op::ZLossGrad | Op::DispatchGrad | Op::CombineGradY => (2, 2),
        Op::NormGradX { gain, .. } => (2 + usize::from(*gain), 2 + usize::from(*gain)),
        Op::CrossEntropyGrad { .. } | Op::CombineGradGates | Op::LoadBalanceGrad | Op::AmaxGrad { .. } => (3, 3),
        Op::AttentionGrad { mask, t5, xl, .. } => {
            let xl = xl.map_or(0, |b| 1 + 2 * usize::from(b));
            let n = 4 + usize::from(*mask) + usize::from(t5.is_some()) + xl;
            (n, n)
        }
        Op::Attention { mask, rel, .. } => {
            let n = 3
                + usize::from(*mask)
                + match rel {
                    super::RelPos::None => 0,
                    super::RelPos::T5 { .. } => 1,
                    super::RelPos::Xl { biases } => 1 + 2 * usize::from(*biases),
                };
            (n, n)
        }
    }
}

/// Broadcast by name: a's dims, then b's new dims.
fn broadcast(a: &TensorType, b: &TensorType) -> Result<Vec<Dim>, String> {
    let mut dims = a.dims.clone();
    for d in &b.dims {
        match a.dim(&d.name) {
            Some(x) if x.size != d.size => return Err(format!("dim `{}` is {} and {}", d.name, x.size, d.size)),
            Some(_) => {}
            None => dims.push(d.clone()),
        }
    }
    Ok(dims)
}

fn expected(op: &Op, ins: &[&TensorType]) -> Result<Option<TensorType>, String> {
    let t = |i: usize| ins[i];
    Ok(Some(match op {
        Op::Unary { .. }
        | Op::Pow { .. }
        | Op::Softmax { .. }
        | Op::Dropout { .. }
        | Op::Rope { .. }
        | Op::RopeGrad { .. } => t(0).clone(),
        Op::Binary { op: BinaryOp::Add | BinaryOp::Sub | BinaryOp::Mul | BinaryOp::Div } => {
            if t(0).dtype != t(1).dtype {
                return Err("operand dtypes differ".into());
            }
            TensorType::new(t(0).dtype, broadcast(t(0), t(1))?)
        }
        Op::MatMul { contract } => {
            let (a, b) = (t(0), t(1));
            for c in contract {
                match (a.dim(c), b.dim(c)) {
                    (Some(x), Some(y)) if x == y => {}
                    _ => return Err(format!("contracted dim `{c}` is not in both operands with one size")),
                }
            }
            let mut dims: Vec<Dim> = a.dims.iter().filter(|d| !contract.contains(&d.name)).cloned().collect();
            for d in &b.dims {
                if !contract.contains(&d.name) && !dims.iter().any(|x| x.name == d.name) {
                    dims.push(d.clone());
                }
            }
            TensorType::new(a.dtype, dims)
        }
        Op::Reduce { dims, .. } => {
            for d in dims {
                if !t(0).has(d) {
                    return Err(format!("reduced dim `{d}` is not in the input"));
                }
            }
            TensorType::new(t(0).dtype, t(0).dims.iter().filter(|d| !dims.contains(&d.name)).cloned().collect())
        }
        Op::LayerNorm { dim, .. } | Op::RmsNorm { dim, .. } => {
            if !t(0).has(dim) {
                return Err(format!("normalised dim `{dim}` is not in the input"));
            }
            for i in 1..ins.len() {
                if t(i).dims != [t(0).dim(dim).cloned().expect("checked")] {
                    return Err(format!("gain/bias must be [{dim}]"));
                }
            }
            t(0).clone()
        }
        Op::Embed => {
            let (table, ids) = (t(0), t(1));
            if !matches!(ids.dtype, DType::I32 | DType::I64) || table.dims.is_empty() {
                return Err("embed takes a table and integer ids".into());
            }
            let mut dims = ids.dims.clone();
            dims.extend(table.dims[1..].iter().cloned());
            TensorType::new(table.dtype, dims)
        }
        Op::Take { dim, index } => {
            let d = t(0).dim(dim).ok_or_else(|| format!("dim `{dim}` is not in the input"))?;
            if *index >= d.size {
                return Err(format!("index {index} out of range for `{dim}`"));
            }
            TensorType::new(t(0).dtype, t(0).dims.iter().filter(|x| &x.name != dim).cloned().collect())
        }

        Op::CrossEntropy { .. } | Op::LoadBalance | Op::ZLoss => TensorType::scalar(DType::F32),
        Op::Cast { dtype } => TensorType::new(*dtype, t(0).dims.clone()),
        Op::UnaryGrad { .. } | Op::SoftmaxGrad { .. } => {
            if t(0) != t(1) {
                return Err("value and gradient types differ".into());
            }
            t(0).clone()
        }

        _ => return Ok(None),
    }))
}

/// Check one op: its number of inputs, and its output type against the
/// one its rule derives from the input types.
pub fn check_op(op: &Op, ins: &[&TensorType], out: &TensorType) -> Result<(), String> {
    let (lo, hi) = arity(op);
    if ins.len() < lo || ins.len() > hi {
        return Err(format!("`{}` takes {lo}..{hi} inputs, has {}", op.name(), ins.len()));
    }
    if matches!(op, Op::SplitDim { .. } | Op::MergeDims { .. } | Op::Rename { .. } | Op::Permute) {
        let src = ins[0];
        if src.numel() != out.numel() || src.dtype != out.dtype {
            return Err(format!("`{}` changes the element count or dtype: {src} -> {out}", op.name()));
        }
        if let Op::Permute = op {
            let mut a: Vec<&Dim> = src.dims.iter().collect();
            let mut b: Vec<&Dim> = out.dims.iter().collect();
            a.sort_by(|x, y| x.name.cmp(&y.name));
            b.sort_by(|x, y| x.name.cmp(&y.name));
            if a != b {
                return Err(format!("permute must keep the same dims: {src} -> {out}"));
            }
        }
    }
    if let Op::Expand = op
        && let Some(d) = ins[0].dims.iter().find(|d| !out.dims.contains(d))
    {
        return Err(format!("expand drops dim `{}`", d.name));
    }
    match expected(op, ins) {
        Ok(Some(t)) if &t != out => Err(format!("`{}` should produce {t}, the node says {out}", op.name())),
        Ok(_) => Ok(()),
        Err(m) => Err(format!("`{}`: {m}", op.name())),
    }
}

/// Verify a graph; the first problem found is returned.
pub fn verify(g: &Graph) -> Result<(), VerifyError> {
    if g.spans.len() != g.nodes.len() {
        return Err(VerifyError { value: ValueId(0), message: "span table and nodes differ in length".into() });
    }
    for (i, n) in g.nodes.iter().enumerate() {
        let id = ValueId(i as u32);
        let fail = |message: String| Err(VerifyError { value: id, message });
        for v in &n.inputs {
            if v.index() >= i {
                return fail(format!("input {v} is not defined before its use"));
            }
        }
        let ins: Vec<&TensorType> = n.inputs.iter().map(|v| g.ty(*v)).collect();
        if let Err(m) = check_op(&n.op, &ins, &n.ty) {
            return fail(m);
        }
    }
    for (name, v) in &g.outputs {
        if v.index() >= g.nodes.len() {
            return Err(VerifyError { value: *v, message: format!("output `{name}` is not a node") });
        }
    }
    Ok(())
}
