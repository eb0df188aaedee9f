//! The IR's text form, one node a line, stable for snapshot tests:
//!
//! ```text
//! %7 = matmul(%5, %6) {contract = [embed]} : f32[batch=4, seq=64, vocab=256]
//! output loss = %9
//! ```

use super::{Graph, Op, RelPos};
use std::fmt::Write;

fn attrs(op: &Op) -> String {
    let list = |xs: &[String]| format!("[{}]", xs.join(", "));
    let a: Vec<String> = match op {
        Op::Input { index } => vec![format!("index = {index}")],
        Op::Param { index, layer: Some(l) } => vec![format!("index = {index}"), format!("layer = {l}")],
        Op::Param { index, layer: None } => vec![format!("index = {index}")],
        Op::Scalar { value } => vec![format!("value = {value}")],
        Op::Pow { exp } => vec![format!("exp = {exp}")],
        Op::MatMul { contract } => vec![format!("contract = {}", list(contract))],
        Op::Reduce { dims, .. } | Op::AmaxGrad { dims } => vec![format!("dims = {}", list(dims))],
        Op::Softmax { dim, .. } => vec![format!("dim = {dim}")],
        Op::LayerNorm { dim, eps, gain, bias } => {
            vec![format!("dim = {dim}"), format!("eps = {eps}"), format!("gain = {gain}"), format!("bias = {bias}")]
        }
        Op::RmsNorm { dim, eps, gain } => {
            vec![format!("dim = {dim}"), format!("eps = {eps}"), format!("gain = {gain}")]
        }
        Op::Take { dim, index } => vec![format!("dim = {dim}"), format!("index = {index}")],
        Op::SplitDim { dim, into } => vec![format!("dim = {dim}"), format!("into = {}", list(into))],
        Op::MergeDims { dims, into } => vec![format!("dims = {}", list(dims)), format!("into = {into}")],
        Op::Rename { from, to } => vec![format!("from = {}", list(from)), format!("to = {}", list(to))],
        Op::Concat { over, into } => vec![format!("over = {}", list(over)), format!("into = {into}")],
        Op::Dropout { p } => vec![format!("p = {p}")],
        Op::Attention { causal, dropout, mask, rel, window } => {
            let mut v = vec![format!("causal = {causal}"), format!("dropout = {dropout}"), format!("mask = {mask}")];
            match rel {
                RelPos::None => {}
                RelPos::T5 { max_distance } => v.push(format!("rel = t5({max_distance})")),
                RelPos::Xl { biases } => v.push(format!("rel = xl(biases = {biases})")),
            }
            if let Some(w) = window {
                v.push(format!("window = {w}"));
            }
            v
        }
        Op::Rope { theta, fraction } | Op::RopeGrad { theta, fraction } => {
            vec![format!("theta = {theta}"), format!("fraction = {fraction}")]
        }
        Op::CrossEntropy { label_smoothing, ignore } => {
            let mut v = vec![format!("label_smoothing = {label_smoothing}")];
            if let Some(i) = ignore {
                v.push(format!("ignore = {i}"));
            }
            v
        }
        Op::Patches { size } => vec![format!("size = {size}")],
        Op::TopK { k, capacity, slots } => {
            let c = capacity.map(|c| c.to_string()).unwrap_or_else(|| "dropless".into());
            vec![format!("k = {k}"), format!("capacity = {c}"), format!("slots = {slots}")]
        }
        Op::Cast { dtype } => vec![format!("dtype = {}", dtype.name())],
        Op::UnaryGrad { op } => vec![format!("op = {}", op.name())],
        Op::SoftmaxGrad { dim, log } => vec![format!("dim = {dim}"), format!("log = {log}")],
        Op::NormGradX { dim, eps, gain, rms } => {
            vec![format!("dim = {dim}"), format!("eps = {eps}"), format!("gain = {gain}"), format!("rms = {rms}")]
        }
        Op::NormGradGain { dim, eps, rms } => {
            vec![format!("dim = {dim}"), format!("eps = {eps}"), format!("rms = {rms}")]
        }
        Op::ClipScale { clip } => vec![format!("clip = {clip}")],
        Op::AdamMoment { beta, square } => vec![format!("beta = {beta}"), format!("square = {square}")],
        Op::AdamStep { eps, weight_decay } => vec![format!("eps = {eps}"), format!("weight_decay = {weight_decay}")],
        Op::Untake { dim, indices } => vec![format!("dim = {dim}"), format!("indices = {indices:?}")],
        Op::Slice { dim, start, to } => vec![format!("dim = {dim}"), format!("start = {start}"), format!("to = {to}")],
        Op::DropoutGrad { p, forward } => vec![format!("p = {p}"), format!("forward = {forward}")],
        Op::AttentionGrad { which, causal, mask, window, dropout, forward, t5, xl } => {
            let mut v = vec![format!("which = {which}"), format!("causal = {causal}"), format!("mask = {mask}")];
            if let Some(md) = t5 {
                v.push(format!("rel = t5({md})"));
            }
            if let Some(biases) = xl {
                v.push(format!("rel = xl(biases = {biases})"));
            }
            if let Some(w) = window {
                v.push(format!("window = {w}"));
            }
            if *dropout > 0.0 {
                v.push(format!("dropout = {dropout}"));
                v.push(format!("forward = {forward}"));
            }
            v
        }
        Op::CrossEntropyGrad { label_smoothing, ignore } => {
            let mut v = vec![format!("label_smoothing = {label_smoothing}")];
            if let Some(i) = ignore {
                v.push(format!("ignore = {i}"));
            }
            v
        }
        Op::AllReduce { axis, op } => {
            let op = match op {
                super::ReduceOp::Sum => "sum",
                super::ReduceOp::Mean => "mean",
                super::ReduceOp::Max => "max",
            };
            vec![format!("axis = {axis}"), format!("op = {op}")]
        }
        Op::AllGather { axis, dim } | Op::ReduceScatter { axis, dim } => {
            vec![format!("axis = {axis}"), format!("dim = {dim}")]
        }
        Op::AllToAll { axis, split, concat, chunks } => vec![
            format!("axis = {axis}"),
            format!("split = {split}"),
            format!("concat = {concat}"),
            format!("chunks = [{}]", chunks.iter().map(|c| super::indices_text(c)).collect::<Vec<_>>().join(", ")),
        ],
        Op::Select { dim, indices } => {
            vec![format!("dim = {dim}"), format!("indices = {}", super::indices_text(indices))]
        }
        Op::EmbedRows { start }
        | Op::EmbedGradRows { start }
        | Op::TargetLogit { start }
        | Op::CrossEntropyGradRows { start } => vec![format!("start = {start}")],
        Op::Unary { .. }
        | Op::Binary { .. }
        | Op::Embed
        | Op::Permute
        | Op::Sinusoid
        | Op::Dispatch
        | Op::Combine
        | Op::LoadBalance
        | Op::ZLoss
        | Op::Einsum
        | Op::Expand
        | Op::EmbedGrad
        | Op::GateMask
        | Op::DispatchGrad
        | Op::CombineGradY
        | Op::CombineGradGates
        | Op::LoadBalanceGrad
        | Op::ZLossGrad => vec![],
    };
    if a.is_empty() { String::new() } else { format!(" {{{}}}", a.join(", ")) }
}

pub(super) fn print(g: &Graph) -> String {
    let mut s = String::new();
    for (i, n) in g.nodes.iter().enumerate() {
        let ins: Vec<String> = n.inputs.iter().map(|v| v.to_string()).collect();
        let _ = writeln!(s, "%{i} = {}({}){} : {}", n.op.name(), ins.join(", "), attrs(&n.op), n.ty);
    }
    for (name, v) in &g.outputs {
        let _ = writeln!(s, "output {name} = {v}");
    }
    s
}
