//! The IR verifier: a gate every pass's output goes through in tests.
//!
//! It checks that the graph is SSA in topological order (inputs come before
//! their users), that each op has the inputs it needs, and re-derives the
//! output type of every op from its inputs' types and attributes, comparing
//! it with the node's. A few sizes come from the node itself (a split's part
//! sizes, a dispatch's slots, a gather's group size), and are checked against
//! what the inputs allow; inputs and parameters are typed by the model.

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
        Op::Input { .. } | Op::Param { .. } | Op::Scalar { .. } | Op::Sinusoid | Op::Iota { .. } | Op::LossScale => {
            (0, 0)
        }
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
        Op::Compare { .. } | Op::Gather { .. } | Op::GatherGrad { .. } => (2, 2),
        Op::Argmax { .. } | Op::Unfold { .. } | Op::Fold { .. } => (1, 1),
        Op::Where => (3, 3),
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

fn expected(op: &Op, ins: &[&TensorType], out: &TensorType) -> Result<Option<TensorType>, String> {
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
        Op::Compare { .. } => {
            if t(0).dtype != t(1).dtype {
                return Err("operand dtypes differ".into());
            }
            TensorType::new(DType::Bool, broadcast(t(0), t(1))?)
        }
        Op::Where => {
            if t(0).dtype != DType::Bool || t(1).dtype != t(2).dtype {
                return Err("`where` takes a bool condition and two values of one dtype".into());
            }
            let ab = TensorType::new(t(1).dtype, broadcast(t(1), t(2))?);
            TensorType::new(t(1).dtype, broadcast(&ab, t(0))?)
        }
        Op::Unfold { windows: w, .. } => {
            let (over, into, window) = (&w.over, &w.into, &w.window);
            let (stride, padding, dilation) = (&w.stride, &w.padding, &w.dilation);
            let x = t(0);
            if over.len() != into.len() || over.len() != window.len() || *stride == 0 || *dilation == 0 {
                return Err("unfold takes one output and one window dim per spatial dim".into());
            }
            let mut dims = Vec::new();
            for d in &x.dims {
                match over.iter().position(|o| *o == d.name) {
                    Some(i) => {
                        let k = out.dim(&window[i]).map_or(0, |w| w.size);
                        let n = unfolded(d.size, k, *stride, *padding, *dilation)
                            .ok_or_else(|| format!("a window of {k} does not fit `{}`", d.name))?;
                        dims.push(Dim::new(&into[i], n));
                    }
                    None => dims.push(d.clone()),
                }
            }
            for w in window {
                dims.push(out.dim(w).cloned().ok_or_else(|| format!("window dim `{w}` missing"))?);
            }
            TensorType::new(x.dtype, dims)
        }
        Op::Fold { windows } => {
            // The output is the unfolded input's type: check that unfolding it gives g.
            let op = Op::Unfold { windows: windows.clone(), fill: 0.0 };
            let back = expected(&op, &[out], t(0))?.unwrap_or_else(|| t(0).clone());
            if back != *t(0) {
                return Err(format!("fold of {} cannot come from unfolding {out}", t(0)));
            }
            out.clone()
        }
        Op::Argmax { dim } => {
            if !t(0).has(dim) {
                return Err(format!("argmax over `{dim}`, which the operand lacks"));
            }
            TensorType::new(DType::I32, t(0).dims.iter().filter(|d| d.name != *dim).cloned().collect())
        }
        Op::Gather { dim } => {
            let kept: Vec<Dim> = t(0).dims.iter().filter(|d| d.name != *dim).cloned().collect();
            if !t(0).has(dim) || t(1).dtype != DType::I32 || !t(1).dims.iter().all(|d| kept.contains(d)) {
                return Err(format!("gather along `{dim}` takes i32 positions over the operand's other dims"));
            }
            TensorType::new(t(0).dtype, kept)
        }
        Op::GatherGrad { dim } => {
            let kept: Vec<Dim> = out.dims.iter().filter(|d| d.name != *dim).cloned().collect();
            if !out.has(dim) || t(0).dims != kept || t(1).dtype != DType::I32 {
                return Err(format!("gather_grad places [{}] along `{dim}` of the output", kept.len()));
            }
            out.clone()
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

        Op::Scalar { .. } | Op::ClipScale { .. } | Op::LossScale => TensorType::scalar(out.dtype),
        Op::SplitDim { dim, into } => {
            let d = t(0).dim(dim).ok_or_else(|| format!("split dim `{dim}` is not in the input"))?;
            let parts: Vec<Dim> = into
                .iter()
                .map(|n| out.dim(n).cloned().ok_or_else(|| format!("`{n}` is not in the output")))
                .collect::<Result<_, _>>()?;
            if parts.iter().map(|p| p.size).product::<u64>() != d.size {
                return Err(format!("`{dim}` of {} does not split into {into:?}", d.size));
            }
            let dims =
                t(0).dims.iter().flat_map(|x| if &x.name == dim { parts.clone() } else { vec![x.clone()] }).collect();
            TensorType::new(t(0).dtype, dims)
        }
        Op::MergeDims { dims, into } => {
            let at = t(0)
                .dims
                .iter()
                .position(|d| Some(&d.name) == dims.first())
                .ok_or("merged dims are not in the input")?;
            let run: Vec<&str> = t(0).dims.iter().skip(at).take(dims.len()).map(|d| d.name.as_str()).collect();
            if run != dims.iter().map(String::as_str).collect::<Vec<_>>() {
                return Err(format!("merged dims {dims:?} are not adjacent and in order in the input"));
            }
            let size = t(0).dims[at..at + dims.len()].iter().map(|d| d.size).product();
            let mut ds = t(0).dims[..at].to_vec();
            ds.push(Dim::new(into, size));
            ds.extend(t(0).dims[at + dims.len()..].iter().cloned());
            TensorType::new(t(0).dtype, ds)
        }
        Op::Rename { from, to } => {
            let dims = t(0)
                .dims
                .iter()
                .map(|d| match from.iter().position(|f| f == &d.name) {
                    Some(i) => Dim::new(&to[i], d.size),
                    None => d.clone(),
                })
                .collect();
            TensorType::new(t(0).dtype, dims)
        }
        Op::Concat { over, into } => {
            let mut total = 0;
            for (i, o) in over.iter().enumerate() {
                total += t(i).dim(o).ok_or_else(|| format!("input {i} has no dim `{o}`"))?.size;
                if t(i).dtype != out.dtype {
                    return Err("inputs and output dtypes differ".into());
                }
            }
            if out.dim(into).map(|d| d.size) != Some(total) {
                return Err(format!("`{into}` must be the inputs' {total} elements"));
            }
            out.clone()
        }
        Op::Attention { .. } | Op::NormGradX { .. } | Op::DropoutGrad { .. } | Op::TopK { .. } => t(0).clone(),
        Op::CrossEntropyGrad { .. } | Op::CrossEntropyGradRows { .. } | Op::ZLossGrad => t(0).clone(),
        Op::AmaxGrad { .. } | Op::AdamMoment { .. } | Op::AdamStep { .. } | Op::AllReduce { .. } => t(0).clone(),
        Op::GateMask => t(0).clone(),
        Op::CombineGradGates => t(0).clone(),
        Op::LoadBalanceGrad => t(1).clone(),
        Op::NormGradGain { dim, .. } => {
            let d = t(0).dim(dim).ok_or_else(|| format!("normalised dim `{dim}` is not in the input"))?;
            TensorType::new(t(0).dtype, vec![d.clone()])
        }
        Op::AttentionGrad { which, mask, .. } => {
            // Gradient `which` has its operand's type: q, k, v, then (after
            // the mask) the relative-position operands in order.
            let i = if *which < 3 { *which as usize } else { 3 + usize::from(*mask) + (*which as usize - 3) };
            if i + 1 >= ins.len() {
                return Err(format!("gradient {which} has no operand"));
            }
            t(i).clone()
        }
        Op::Iota { dim, .. } => {
            if out.dims.len() != 1 || out.dims[0].name != *dim || out.dtype != DType::I32 {
                return Err(format!("iota's positions are i32[{dim}]"));
            }
            out.clone()
        }
        Op::Sinusoid => {
            if out.dims.len() != 2 {
                return Err("sinusoid positions are [seq, dim]".into());
            }
            out.clone()
        }
        Op::Patches { size } => {
            let n = t(0).dims.len();
            if n < 3 || out.dims.len() != n - 1 {
                return Err("patches take [..., channels, height, width] to [..., grid, pixels]".into());
            }
            let (c, h, w) = (t(0).dims[n - 3].size, t(0).dims[n - 2].size, t(0).dims[n - 1].size);
            let mut dims = t(0).dims[..n - 3].to_vec();
            dims.push(Dim::new(&out.dims[n - 3].name, (h / size) * (w / size)));
            dims.push(Dim::new(&out.dims[n - 2].name, c * size * size));
            TensorType::new(t(0).dtype, dims)
        }
        Op::Dispatch | Op::CombineGradY => {
            // gates [tokens..., expert], x [tokens..., rest...] → [expert, slot, rest...]
            let (gates, x) = (t(0), t(1));
            let tokens = &gates.dims[..gates.dims.len().saturating_sub(1)];
            if !x.dims.starts_with(tokens) || out.dims.len() < 2 || Some(&out.dims[0]) != gates.dims.last() {
                return Err("routed values are [expert, slot, ...] of the gates' tokens".into());
            }
            let mut dims = vec![out.dims[0].clone(), out.dims[1].clone()];
            dims.extend(x.dims[tokens.len()..].iter().cloned());
            TensorType::new(x.dtype, dims)
        }
        Op::Combine | Op::DispatchGrad => {
            // gates [tokens..., expert], y [expert, slot, rest...] → [tokens..., rest...]
            let (gates, y) = (t(0), t(1));
            if y.dims.len() < 2 || Some(&y.dims[0]) != gates.dims.last() {
                return Err("expert values are [expert, slot, ...]".into());
            }
            let mut dims = gates.dims[..gates.dims.len() - 1].to_vec();
            dims.extend(y.dims[2..].iter().cloned());
            TensorType::new(y.dtype, dims)
        }
        Op::Einsum => {
            for d in &out.dims {
                let found = [t(0), t(1)].iter().find_map(|x| x.dim(&d.name).cloned());
                if found.as_ref() != Some(d) {
                    return Err(format!("output dim `{}` of size {} is in neither operand", d.name, d.size));
                }
            }
            TensorType::new(t(0).dtype, out.dims.clone())
        }
        Op::EmbedGrad | Op::EmbedGradRows { .. } => {
            let (ids, g) = (t(0), t(1));
            if !g.dims.starts_with(&ids.dims) || out.dims.is_empty() || out.dims[1..] != g.dims[ids.dims.len()..] {
                return Err("a table's gradient is [rows, the gradient's dims after the ids']".into());
            }
            TensorType::new(g.dtype, out.dims.clone())
        }
        Op::EmbedRows { .. } => {
            let (table, ids) = (t(0), t(1));
            let mut dims = ids.dims.clone();
            dims.extend(table.dims.iter().skip(1).cloned());
            TensorType::new(table.dtype, dims)
        }
        Op::TargetLogit { .. } => TensorType::new(t(0).dtype, t(1).dims.clone()),
        Op::Untake { dim, indices } => {
            let d = out.dim(dim).ok_or_else(|| format!("`{dim}` is not in the output"))?;
            let mut rest: Vec<&Dim> = out.dims.iter().filter(|x| &x.name != dim).collect();
            rest.sort_by(|a, b| a.name.cmp(&b.name));
            for (i, &index) in indices.iter().enumerate() {
                let mut part: Vec<&Dim> = t(i).dims.iter().collect();
                part.sort_by(|a, b| a.name.cmp(&b.name));
                if part != rest || index >= d.size || t(i).dtype != out.dtype {
                    return Err(format!("part {i} does not fit slice {index} of `{dim}`"));
                }
            }
            out.clone()
        }
        Op::Slice { dim, start, to } => {
            let d = t(0).dim(dim).ok_or_else(|| format!("`{dim}` is not in the input"))?;
            let len = out.dim(to).ok_or_else(|| format!("`{to}` is not in the output"))?.size;
            if start + len > d.size {
                return Err(format!("slice {start}..{} of `{dim}` ({})", start + len, d.size));
            }
            let dims = t(0).dims.iter().map(|x| if &x.name == dim { Dim::new(to, len) } else { x.clone() }).collect();
            TensorType::new(t(0).dtype, dims)
        }
        Op::Select { dim, indices } => {
            let d = t(0).dim(dim).ok_or_else(|| format!("`{dim}` is not in the input"))?;
            if let Some(i) = indices.iter().find(|&&i| i >= d.size) {
                return Err(format!("index {i} of `{dim}` ({})", d.size));
            }
            let dims = t(0)
                .dims
                .iter()
                .map(|x| if &x.name == dim { Dim::new(dim, indices.len() as u64) } else { x.clone() })
                .collect();
            TensorType::new(t(0).dtype, dims)
        }
        Op::AllGather { dim, .. } | Op::ReduceScatter { dim, .. } => {
            // The dim grows (gather) or shrinks (scatter) by the group's size; nothing else changes.
            let (a, b) = (t(0).dim(dim).map(|d| d.size), out.dim(dim).map(|d| d.size));
            let (Some(a), Some(b)) = (a, b) else { return Err(format!("`{dim}` is not in the input and output")) };
            let ok = match op {
                Op::AllGather { .. } => a > 0 && b % a == 0,
                _ => b > 0 && a % b == 0,
            };
            if !ok {
                return Err(format!("`{dim}` goes from {a} to {b}"));
            }
            let dims = t(0).dims.iter().map(|x| if &x.name == dim { Dim::new(dim, b) } else { x.clone() }).collect();
            TensorType::new(t(0).dtype, dims)
        }
        Op::AllToAll { split, concat, .. } => {
            let names = |x: &TensorType| x.dims.iter().map(|d| d.name.clone()).collect::<Vec<_>>();
            if names(t(0)) != names(out) {
                return Err("an all-to-all keeps the dims".into());
            }
            for (a, b) in t(0).dims.iter().zip(&out.dims) {
                if a.size != b.size && &a.name != split && &a.name != concat {
                    return Err(format!("`{}` changes size outside the split and concat dims", a.name));
                }
            }
            out.clone()
        }
        Op::Expand => TensorType::new(t(0).dtype, out.dims.clone()),
        // Typed by the model: an input, a parameter (the lowering checks their buffers).
        Op::Input { .. } | Op::Param { .. } => return Ok(None),
        Op::Permute => TensorType::new(t(0).dtype, out.dims.clone()),
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
    match expected(op, ins, out) {
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

/// Positions a window of `k` (dilated) takes over `n`, padded by `padding`
/// on each side, at `stride`: PyTorch's ⌊(n + 2p − d·(k − 1) − 1) / s⌋ + 1.
pub fn unfolded(n: u64, k: u64, stride: u64, padding: u64, dilation: u64) -> Option<u64> {
    let span = dilation.checked_mul(k.checked_sub(1)?)?.checked_add(1)?;
    let room = n.checked_add(2 * padding)?.checked_sub(span)?;
    Some(room / stride.max(1) + 1)
}
