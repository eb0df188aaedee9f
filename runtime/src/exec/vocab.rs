//! Vocabulary-parallel kernels (Megatron): a rank holds rows
//! `[start, start + rows)` of the embedding table and the matching slice of
//! the logits. Lookups of other rows give zeros (the all-reduce after the
//! embedding adds the owner's row); the cross-entropy's max, sum of
//! exponentials and target logit are reduced across ranks by the program's
//! collectives, and its gradient is computed on the local slice.

use crate::tensor::{Real, Tensor, r};
use tessera_compiler::ir::Dim;

fn in_range(id: f64, start: u64, rows: usize) -> Option<usize> {
    let i = id - start as f64;
    (i >= 0.0 && i.fract() == 0.0 && (i as usize) < rows).then_some(i as usize)
}

/// Rows of the local table for ids in its range, zeros elsewhere.
pub fn embed_rows<T: Real>(table: &Tensor<T>, ids: &Tensor<T>, start: u64, out: &[Dim]) -> Tensor<T> {
    let rows = table.dims[0].size as usize;
    let width: usize = table.dims[1..].iter().map(|d| d.size as usize).product();
    let mut data = vec![T::zero(); ids.numel() * width];
    for (k, id) in ids.data.iter().enumerate() {
        if let Some(i) = in_range(id.to_f64().unwrap_or(-1.0), start, rows) {
            data[k * width..(k + 1) * width].copy_from_slice(&table.data[i * width..(i + 1) * width]);
        }
    }
    Tensor { dims: out.to_vec(), data }
}

/// The local table's gradient: rows of ids in its range, scatter-added.
pub fn embed_grad_rows<T: Real>(ids: &Tensor<T>, g: &Tensor<T>, start: u64, table: &[Dim]) -> Tensor<T> {
    let mut out = Tensor::zeros(table);
    let rows = table[0].size as usize;
    let width: usize = table[1..].iter().map(|d| d.size as usize).product();
    for (k, id) in ids.data.iter().enumerate() {
        if let Some(i) = in_range(id.to_f64().unwrap_or(-1.0), start, rows) {
            for j in 0..width {
                out.data[i * width + j] += g.data[k * width + j];
            }
        }
    }
    out
}

/// Logits and targets as rows [tokens][class] in the targets' order.
fn rows_of<T: Real>(logits: &Tensor<T>, targets: &Tensor<T>) -> (Tensor<T>, usize) {
    let class = logits.dims.iter().find(|d| !targets.dims.iter().any(|t| t.name == d.name)).expect("class dim").clone();
    let mut order = targets.dims.clone();
    order.push(class.clone());
    (logits.permute(&order), class.size as usize)
}

/// Each token's logit of its target when the target is in this rank's slice, else 0.
pub fn target_logit<T: Real>(logits: &Tensor<T>, targets: &Tensor<T>, start: u64) -> Tensor<T> {
    let (p, c) = rows_of(logits, targets);
    let data = p
        .data
        .chunks(c)
        .zip(&targets.data)
        .map(|(row, t)| in_range(t.to_f64().unwrap_or(-1.0), start, c).map(|j| row[j]).unwrap_or_else(T::zero))
        .collect();
    Tensor { dims: targets.dims.clone(), data }
}

/// d logits of the mean cross-entropy on the local slice, given the global
/// max and sum of exponentials per token: (softmax − one-hot) · g / tokens.
pub fn cross_entropy_grad<T: Real>(
    logits: &Tensor<T>,
    targets: &Tensor<T>,
    max: &Tensor<T>,
    sumexp: &Tensor<T>,
    g: T,
    start: u64,
) -> Tensor<T> {
    let (p, c) = rows_of(logits, targets);
    let scale = g.to_f64().unwrap_or(0.0) / targets.numel().max(1) as f64;
    let mut out = vec![T::zero(); p.data.len()];
    for (k, (o, row)) in out.chunks_mut(c).zip(p.data.chunks(c)).enumerate() {
        let m = max.data[k].to_f64().unwrap_or(0.0);
        let z = sumexp.data[k].to_f64().unwrap_or(1.0);
        let t = in_range(targets.data[k].to_f64().unwrap_or(-1.0), start, c);
        for j in 0..c {
            let sm = (row[j].to_f64().unwrap_or(f64::NAN) - m).exp() / z;
            o[j] = r((sm - if Some(j) == t { 1.0 } else { 0.0 }) * scale);
        }
    }
    let mut order = targets.dims.clone();
    order.push(p.dims.last().expect("class").clone());
    Tensor { dims: order, data: out }.permute(&logits.dims)
}
