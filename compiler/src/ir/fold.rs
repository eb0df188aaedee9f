//! Values the checker can compute before anything runs: masks and positions
//! built from `iota`, numbers, comparisons and reshapes, with no input or
//! parameter under them. The cost model prices attention by the blocks such
//! a mask lets it compute.

use super::{BinaryOp, Graph, Op, ValueId};
use crate::model::{Dim, TensorType};

/// Values larger than this are not folded (the checker's time stays small).
pub const MAX_ELEMENTS: u64 = 1 << 22;

/// The elements of `v` in its type's row-major order, when they depend on
/// no input or parameter and every op under `v` is one this folds.
pub fn constant(g: &Graph, v: ValueId) -> Option<Vec<f64>> {
    let mut memo: Vec<Option<Vec<f64>>> = vec![None; v.index() + 1];
    eval(g, v, &mut memo)
}

fn eval(g: &Graph, v: ValueId, memo: &mut Vec<Option<Vec<f64>>>) -> Option<Vec<f64>> {
    if let Some(x) = &memo[v.index()] {
        return Some(x.clone());
    }
    let node = &g.nodes[v.index()];
    let ty = &node.ty;
    if !foldable(&node.op) || ty.numel() > MAX_ELEMENTS {
        return None;
    }
    let mut ins = Vec::with_capacity(node.inputs.len());
    for &i in &node.inputs {
        ins.push((eval(g, i, memo)?, &g.nodes[i.index()].ty));
    }
    let out: Vec<f64> = match &node.op {
        Op::Scalar { value } => vec![*value],
        Op::Iota { offset, .. } => (0..ty.numel()).map(|k| (offset + k) as f64).collect(),
        // The same elements in the same order under new names or shapes.
        Op::Rename { .. } | Op::SplitDim { .. } | Op::MergeDims { .. } | Op::Cast { .. } => ins[0].0.clone(),
        Op::Permute | Op::Expand => zip(&ins[..1], ty, |x| x[0]),
        Op::Compare { op } => zip(&ins, ty, |x| f64::from(u8::from(op.apply(x[0], x[1])))),
        Op::Binary { op } => zip(&ins, ty, |x| match op {
            BinaryOp::Add => x[0] + x[1],
            BinaryOp::Sub => x[0] - x[1],
            BinaryOp::Mul => x[0] * x[1],
            BinaryOp::Div => x[0] / x[1],
        }),
        Op::Where => zip(&ins, ty, |x| if x[0] != 0.0 { x[1] } else { x[2] }),
        _ => return None,
    };
    memo[v.index()] = Some(out.clone());
    Some(out)
}

/// A text that two foldable values share exactly when they compute the same
/// elements (their ops and types, inputs first): a cache key, so a mask
/// built in every layer is folded once. `None` where [`constant`] fails.
pub fn key(g: &Graph, v: ValueId) -> Option<String> {
    let node = &g.nodes[v.index()];
    if !foldable(&node.op) || node.ty.numel() > MAX_ELEMENTS {
        return None;
    }
    let mut text = format!("{:?}:{}(", node.op, node.ty);
    for &i in &node.inputs {
        text.push_str(&key(g, i)?);
        text.push(',');
    }
    text.push(')');
    Some(text)
}

/// The ops [`constant`] evaluates.
fn foldable(op: &Op) -> bool {
    matches!(
        op,
        Op::Scalar { .. }
            | Op::Iota { .. }
            | Op::Rename { .. }
            | Op::SplitDim { .. }
            | Op::MergeDims { .. }
            | Op::Cast { .. }
            | Op::Permute
            | Op::Expand
            | Op::Compare { .. }
            | Op::Binary { .. }
            | Op::Where
    )
}

/// Strides of `src`'s dims laid over `out`'s (0 where `src` lacks the dim).
fn strides(src: &[Dim], out: &[Dim]) -> Vec<u64> {
    let mut s = vec![0u64; src.len()];
    let mut acc = 1;
    for k in (0..src.len()).rev() {
        s[k] = acc;
        acc *= src[k].size;
    }
    out.iter().map(|d| src.iter().position(|x| x.name == d.name).map_or(0, |k| s[k])).collect()
}

/// `f` of the inputs' elements at each index of `ty`, broadcast by name.
fn zip(ins: &[(Vec<f64>, &TensorType)], ty: &TensorType, f: impl Fn(&[f64]) -> f64) -> Vec<f64> {
    let st: Vec<Vec<u64>> = ins.iter().map(|(_, t)| strides(&t.dims, &ty.dims)).collect();
    let mut idx = vec![0u64; ty.dims.len()];
    let mut out = Vec::with_capacity(ty.numel() as usize);
    let mut args = vec![0.0; ins.len()];
    for _ in 0..ty.numel() {
        for (a, ((data, _), s)) in args.iter_mut().zip(ins.iter().zip(&st)) {
            let off: u64 = idx.iter().zip(s).map(|(i, s)| i * s).sum();
            *a = data[off as usize];
        }
        out.push(f(&args));
        for k in (0..idx.len()).rev() {
            idx[k] += 1;
            if idx[k] < ty.dims[k].size {
                break;
            }
            idx[k] = 0;
        }
    }
    out
}

/// The fraction of `tile` × `tile` blocks of the (query `q`, key `k`) score
/// matrix a block-sparse attention kernel computes: those holding an
/// allowed pair, under the mask (`mask`'s elements in `mask_ty` order; any
/// other dims are averaged over), `causal` and a `window`. 1 for a dense pattern.
pub fn attention_blocks(
    mask: Option<(&[f64], &TensorType)>,
    q: &Dim,
    k: &Dim,
    causal: bool,
    window: Option<u64>,
    tile: u64,
) -> f64 {
    let (sq, sk) = (q.size, k.size);
    let (tq, tk) = (sq.div_ceil(tile), sk.div_ceil(tile));
    // Keys sit at the end of the query range (as the kernels align them):
    // query i sees keys lo(i) ..= hi(i), both growing with i.
    let shift = sk as i64 - sq as i64;
    let lo = |i: u64| window.map_or(i64::MIN, |w| i as i64 + shift - w as i64 + 1);
    let hi = |i: u64| if causal { i as i64 + shift } else { i64::MAX };
    let band = |bi: u64, bj: u64| {
        let (i0, i1) = (bi * tile, ((bi + 1) * tile).min(sq) - 1);
        let (j0, j1) = (bj * tile, ((bj + 1) * tile).min(sk) - 1);
        lo(i0).max(j0 as i64) <= hi(i1).min(j1 as i64)
    };
    let others: u64 = mask
        .map_or(1, |(_, t)| t.dims.iter().filter(|d| d.name != q.name && d.name != k.name).map(|d| d.size).product());
    // A mask too large to scan is priced by its band alone.
    let mask = mask.filter(|_| others.saturating_mul(sq).saturating_mul(sk) <= MAX_ELEMENTS);
    if let Some((m, t)) = mask {
        let mut computed = 0u64;
        for o in 0..others {
            for bi in 0..tq {
                for bj in 0..tk {
                    let hit = band(bi, bj)
                        && (bi * tile..((bi + 1) * tile).min(sq)).any(|i| {
                            (bj * tile..((bj + 1) * tile).min(sk)).any(|j| {
                                let end = i as i64 + shift;
                                let seen =
                                    (!causal || j as i64 <= end) && window.is_none_or(|w| j as i64 > end - w as i64);
                                seen && m[offset(t, q, k, o, i, j)] != 0.0
                            })
                        });
                    computed += u64::from(hit);
                }
            }
        }
        return computed as f64 / (others * tq * tk).max(1) as f64;
    }
    // The band alone: each row of blocks hits a contiguous run of key
    // blocks. Rows are counted exactly up to 4,096 of them, else on 4,096
    // evenly spaced rows (the run is the same away from the edges).
    let rows = tq.min(4096);
    let mut computed = 0u64;
    for r in 0..rows {
        let bi = if rows == tq { r } else { r * tq / rows };
        let (i0, i1) = (bi * tile, ((bi + 1) * tile).min(sq) - 1);
        let (first, last) = (lo(i0).max(0), hi(i1).min(sk as i64 - 1));
        if first <= last {
            computed += (last as u64 / tile) - (first as u64 / tile) + 1;
        }
    }
    computed as f64 / (rows * tk).max(1) as f64
}

/// Whether a mask allows only pairs with the key at or before the query (a
/// causal pattern, however it was written). False when too large to scan.
pub fn within_causal(mask: &[f64], t: &TensorType, q: &Dim, k: &Dim) -> bool {
    let others: u64 = t.dims.iter().filter(|d| d.name != q.name && d.name != k.name).map(|d| d.size).product();
    if q.name == k.name || others.saturating_mul(q.size).saturating_mul(k.size) > MAX_ELEMENTS {
        return false;
    }
    let shift = k.size as i64 - q.size as i64;
    (0..others).all(|o| {
        (0..q.size)
            .all(|i| ((i as i64 + shift + 1).max(0) as u64..k.size).all(|j| mask[offset(t, q, k, o, i, j)] == 0.0))
    })
}

/// The element of a mask of type `t` at (other-dims index `o`, query `i`, key `j`).
fn offset(t: &TensorType, q: &Dim, k: &Dim, mut o: u64, i: u64, j: u64) -> usize {
    let mut off = 0u64;
    let mut stride = 1u64;
    for d in t.dims.iter().rev() {
        // A self-attention mask over the shared sequence dim is over the keys.
        let at = if d.name == k.name {
            j
        } else if d.name == q.name {
            i
        } else {
            let x = o % d.size;
            o /= d.size;
            x
        };
        off += at * stride;
        stride *= d.size;
    }
    off as usize
}
