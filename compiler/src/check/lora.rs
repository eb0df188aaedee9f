//! Fine-tuning settings applied to a checked model: `train.freeze` marks
//! parameters that do not train, and `train.lora` gives its target weights
//! low-rank adapters (Hu et al., 2021) and freezes everything else.
//!
//! A target W is used as W + (alpha / rank) · A·B wherever the model reads
//! it. A holds W's input dims and `lora` (rank), B holds `lora` and W's
//! output dims, so that under any layout the adapters are split as their
//! weight is (the layout rules name the same dims): a column-parallel W
//! splits B, a row-parallel W splits A. The input dims are those the
//! model contracts W over (`x @ W`); a weight only gathered (an embedding
//! table) takes its first dim as input. A stacked W has stacked adapters.

use crate::config::Train;
use crate::diag::{Diag, unknown_help};
use crate::ir::{BinaryOp, Graph, Op, ValueId};
use crate::model::glob;
use crate::model::{Dim, Init, Param, TensorType};
use crate::syntax::span::Span;
use std::collections::HashMap;

/// The rank dim of the adapters.
pub const LORA_DIM: &str = "lora";

/// Apply `train.freeze` and `train.lora` to the model's graph and
/// parameters; `at` is where the train section is (for diagnostics).
pub fn apply(graph: &mut Graph, params: &mut Vec<Param>, train: &Train, at: Span, diags: &mut Vec<Diag>) {
    let matching = |pattern: &str, params: &[Param]| -> Vec<usize> {
        (0..params.len()).filter(|&k| glob(pattern, &params[k].path)).collect()
    };
    let mut unmatched = |what: &str, pattern: &str, params: &[Param]| {
        let help = unknown_help("parameter", pattern, params.iter().map(|p| p.path.as_str()));
        diags.push(
            Diag::error(format!("`train.{what}` pattern `{pattern}` matches no parameter"))
                .at(at, "in this section")
                .help(format!("{help} (`tessera inspect SPEC` lists the parameter paths; `*` stands for any text)")),
        );
    };
    for pattern in &train.freeze {
        let ks = matching(pattern, params);
        if ks.is_empty() {
            unmatched("freeze", pattern, params);
        }
        ks.into_iter().for_each(|k| params[k].frozen = true);
    }
    let Some(lora) = &train.lora else { return };
    let mut targets: Vec<usize> = Vec::new();
    for pattern in &lora.targets {
        let ks = matching(pattern, params);
        if ks.is_empty() {
            unmatched("lora.targets", pattern, params);
        }
        targets.extend(ks);
    }
    targets.sort();
    targets.dedup();
    // Every base weight is frozen: only the adapters train.
    params.iter_mut().for_each(|p| p.frozen = true);
    let mut adapters: HashMap<usize, Adapter> = HashMap::new();
    for &k in &targets {
        let p = &params[k];
        let own: Vec<&Dim> = p.ty.dims.iter().filter(|d| d.name != "layer").collect();
        if own.len() < 2 {
            diags.push(
                Diag::error(format!("`{}` is {}: LoRA adapts weights of two dims or more", p.path, p.ty))
                    .at(at, "in `train.lora.targets`")
                    .help("target matrices (projections, embeddings), not biases or norm gains"),
            );
            continue;
        }
        let input = input_dims(graph, k, &own);
        let stacked = p.ty.dims.first().filter(|d| d.name == "layer").cloned();
        let rank = Dim::new(LORA_DIM, lora.rank);
        let a_dims: Vec<Dim> =
            own.iter().filter(|d| input.contains(&d.name)).map(|d| (*d).clone()).chain([rank.clone()]).collect();
        let b_dims: Vec<Dim> =
            [rank].into_iter().chain(own.iter().filter(|d| !input.contains(&d.name)).map(|d| (*d).clone())).collect();
        let full =
            |dims: &[Dim]| TensorType::new(p.ty.dtype, stacked.iter().cloned().chain(dims.iter().cloned()).collect());
        let adapter = |name: &str, dims: &[Dim], init: Init| Param {
            path: format!("{}.{name}", p.path),
            ty: full(dims),
            init,
            frozen: false,
            adapter_of: Some(k),
            ..p.clone()
        };
        let a = adapter("lora_a", &a_dims, Init::Normal { std: 0.02 });
        let b = adapter("lora_b", &b_dims, Init::Zeros);
        let delta: Vec<Dim> = a_dims[..a_dims.len() - 1].iter().chain(&b_dims[1..]).cloned().collect();
        params.push(a);
        params.push(b);
        adapters.insert(
            k,
            Adapter {
                a: params.len() - 2,
                b: params.len() - 1,
                a_dims,
                b_dims,
                delta,
                scale: lora.alpha / lora.rank as f64,
            },
        );
    }
    if !adapters.is_empty() {
        rewrite(graph, &adapters);
    }
}

struct Adapter {
    a: usize,
    b: usize,
    /// Per-layer dims (without `layer`).
    a_dims: Vec<Dim>,
    b_dims: Vec<Dim>,
    /// A·B's dims: A's input dims, then B's output dims.
    delta: Vec<Dim>,
    scale: f64,
}

/// The dims the model contracts parameter `k` over where it first reads it
/// in a contraction (`x @ W`); else (a gathered table) its first dim.
fn input_dims(g: &Graph, k: usize, own: &[&Dim]) -> Vec<String> {
    let reads_k = |v: &ValueId| matches!(g.nodes[v.index()].op, Op::Param { index, .. } if index == k);
    for n in &g.nodes {
        if let Op::MatMul { contract } = &n.op
            && n.inputs.iter().any(reads_k)
        {
            let dims: Vec<String> = contract.iter().filter(|c| own.iter().any(|d| &d.name == *c)).cloned().collect();
            if !dims.is_empty() && dims.len() < own.len() {
                return dims;
            }
        }
    }
    vec![own[0].name.clone()]
}

/// The graph with every read of an adapted weight W replaced by
/// W + scale · A·B (per layer for stacked weights), in node order.
fn rewrite(graph: &mut Graph, adapters: &HashMap<usize, Adapter>) {
    let old = std::mem::take(graph);
    let mut g = Graph::new();
    let mut map: Vec<ValueId> = Vec::with_capacity(old.nodes.len());
    for (i, node) in old.nodes.iter().enumerate() {
        let span = old.spans.get(i).copied().unwrap_or_default();
        let inputs = node.inputs.iter().map(|v| map[v.index()]).collect();
        let w = g.push(node.op.clone(), inputs, node.ty.clone(), span);
        let out = match &node.op {
            Op::Param { index, layer } if adapters.contains_key(index) => {
                let ad = &adapters[index];
                let ty = |dims: &[Dim]| TensorType::new(node.ty.dtype, dims.to_vec());
                let a = g.push(Op::Param { index: ad.a, layer: *layer }, vec![], ty(&ad.a_dims), span);
                let b = g.push(Op::Param { index: ad.b, layer: *layer }, vec![], ty(&ad.b_dims), span);
                let mut d = g.push(Op::MatMul { contract: vec![LORA_DIM.into()] }, vec![a, b], ty(&ad.delta), span);
                if ad.delta != node.ty.dims {
                    d = g.push(Op::Permute, vec![d], node.ty.clone(), span);
                }
                let s = g.push(Op::Scalar { value: ad.scale }, vec![], TensorType::scalar(node.ty.dtype), span);
                let sd = g.push(Op::Binary { op: BinaryOp::Mul }, vec![d, s], node.ty.clone(), span);
                g.push(Op::Binary { op: BinaryOp::Add }, vec![w, sd], node.ty.clone(), span)
            }
            _ => w,
        };
        map.push(out);
    }
    for (name, v) in &old.outputs {
        g.set_output(name, map[v.index()]);
    }
    *graph = g;
}
