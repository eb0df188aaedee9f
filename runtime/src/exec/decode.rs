//! Incremental decoding with a KV cache.
//!
//! A causal model's forward graph, run one position at a time. Every node
//! whose type has the sequence dim computes only the new row; a parameter
//! with that dim (learned positions) gives its row; causal attention reads
//! its keys and values from a cache that each step appends to. Nodes without
//! the sequence dim are computed once. Ops whose rows depend on other
//! positions (reductions or concatenation along the sequence, routing with
//! capacity, rotary embeddings) are rejected with an error.

use super::{ExecError, Interpreter, attention, kernels as k, param_slice};
use crate::tensor::{Real, Tensor};
use tessera_compiler::ir::{Op, RelPos, ValueId};
use tessera_compiler::model::Dim;

pub struct Decoder<'a, T> {
    interp: &'a Interpreter<'a>,
    params: &'a [Tensor<T>],
    seq: String,
    /// Values without the sequence dim, computed on the first step.
    fixed: Vec<Option<Tensor<T>>>,
    /// For each attention node: the keys and values of every position so far.
    cache: Vec<Option<(Tensor<T>, Tensor<T>)>>,
    /// Positions decoded so far.
    pub position: usize,
}

/// `t` with `dim` cut to row `at` (kept, with size 1).
fn row<T: Real>(t: &Tensor<T>, dim: &str, at: usize) -> Tensor<T> {
    let without: Vec<Dim> = t.dims.iter().filter(|d| d.name != dim).cloned().collect();
    let data = k::take(t, dim, at, &without).data;
    // A size-1 dim can sit anywhere without moving data.
    Tensor { dims: t.dims.iter().map(|d| if d.name == dim { Dim::new(dim, 1) } else { d.clone() }).collect(), data }
}

/// `old` followed by `new` along `dim`.
fn append<T: Real>(old: &Tensor<T>, new: &Tensor<T>, dim: &str) -> Tensor<T> {
    let rename = |t: &Tensor<T>, to: &str| Tensor {
        dims: t.dims.iter().map(|d| if d.name == dim { Dim::new(to, d.size) } else { d.clone() }).collect(),
        data: t.data.clone(),
    };
    let len = (old.size(dim) + new.size(dim)) as u64;
    let out: Vec<Dim> = old.dims.iter().map(|d| if d.name == dim { Dim::new(dim, len) } else { d.clone() }).collect();
    k::concat(&[&rename(old, "__cached"), &rename(new, "__new")], &["__cached".into(), "__new".into()], dim, &out)
}

impl<'a, T: Real> Decoder<'a, T> {
    /// A decoder over `interp`'s forward graph; `seq` names the sequence dim.
    pub fn new(interp: &'a Interpreter<'a>, params: &'a [Tensor<T>], seq: &str) -> Decoder<'a, T> {
        let n = interp.graph.len();
        Decoder { interp, params, seq: seq.to_string(), fixed: vec![None; n], cache: vec![None; n], position: 0 }
    }

    /// Feed one position's inputs (their sequence dim of size 1); returns every
    /// value of the step, rows for values with the sequence dim.
    pub fn step(&mut self, inputs: &[Tensor<T>]) -> Result<Vec<Tensor<T>>, ExecError> {
        let g = self.interp.graph;
        let seq = self.seq.clone();
        let mut vals: Vec<Tensor<T>> = Vec::with_capacity(g.len());
        let mut no_grads = Default::default();
        for (i, node) in g.nodes.iter().enumerate() {
            let id = ValueId(i as u32);
            let fail = |m: String| ExecError { value: id, op: node.op.name(), message: m };
            let has_seq = node.ty.has(&seq);
            if !has_seq && let Some(v) = &self.fixed[i] {
                vals.push(v.clone());
                continue;
            }
            let out: Vec<Dim> =
                node.ty.dims.iter().map(|d| if d.name == seq { Dim::new(seq.clone(), 1) } else { d.clone() }).collect();
            let a = |j: usize| &vals[node.inputs[j].index()];
            let v = match &node.op {
                Op::Input { index } => {
                    inputs.get(*index).cloned().ok_or_else(|| fail(format!("input {index} missing")))?
                }
                Op::Param { index, layer } => {
                    let full = param_slice(&self.interp.params[*index], &self.params[*index], *layer)
                        .ok_or_else(|| fail("no such layer".into()))?;
                    if has_seq { row(&full, &seq, self.position) } else { full }
                }
                Op::Attention { causal, dropout, mask, rel, window } => {
                    // Decoding is inference: attention dropout is off.
                    let _ = dropout;
                    if *rel != RelPos::None || *mask || !*causal {
                        return Err(fail(
                            "incremental decoding supports causal attention without masks or relative positions".into(),
                        ));
                    }
                    let kdims = &g.ty(node.inputs[1]).dims;
                    let kseq = kdims[kdims.len() - 3].name.clone();
                    let (ck, cv) = match &self.cache[i] {
                        Some((ck, cv)) => (append(ck, a(1), &kseq), append(cv, a(2), &kseq)),
                        None => (a(1).clone(), a(2).clone()),
                    };
                    let o = attention::Attn {
                        q: a(0).view(),
                        k: ck.view(),
                        v: cv.view(),
                        mask: None,
                        causal: true,
                        window: *window,
                        dropout: None,
                        t5: None,
                        xl: None,
                    }
                    .forward(&out);
                    self.cache[i] = Some((ck, cv));
                    o
                }
                Op::Reduce { dims, .. } if dims.contains(&seq) => {
                    return Err(fail(format!("a reduction over `{seq}` mixes positions")));
                }
                Op::Concat { into, .. } if *into == seq => {
                    return Err(fail(format!("a concatenation along `{seq}` mixes positions")));
                }
                Op::Rope { .. } | Op::TopK { .. } | Op::Dispatch | Op::Combine => {
                    return Err(fail("not supported in incremental decoding yet".into()));
                }
                // Losses are not needed to decode.
                Op::CrossEntropy { .. } | Op::LoadBalance | Op::ZLoss => Tensor::scalar(T::zero()),
                _ => {
                    // Position-wise ops: the ordinary kernel on one row.
                    let mut one = node.clone();
                    one.ty.dims = out;
                    self.interp.eval_node(&one, i, &vals, inputs, self.params, &mut no_grads)?
                }
            };
            if !has_seq {
                self.fixed[i] = Some(v.clone());
            }
            vals.push(v);
        }
        self.position += 1;
        Ok(vals)
    }
}
