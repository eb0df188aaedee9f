//! Expert computation over filled slots only.
//!
//! `dispatch` lays tokens out as `[expert, slot, ...]` with `capacity` slots
//! per expert, filled from slot 0 up; the rest are empty (zero rows). Every
//! op between dispatch and combine works row by row, so all empty slots of an
//! expert hold one and the same row at every step: a zero row becomes the
//! bias, then GELU of the bias, and so on. A `Pad` records that: expert `e`
//! has `counts[e]` filled slots and every later slot equals `tail[e]`.
//!
//! The ops below compute the filled rows and the one tail row per expert and
//! leave the empty slots unwritten; the interpreter writes the tail into them
//! (`fill_tail`) only before an op that reads the whole tensor, and before
//! handing values back. So the GEMMs and elementwise work shrink from the
//! capacity to the tokens actually routed (Megatron's grouped GEMM does the
//! same on GPUs), and every value a caller sees is the exact full tensor. Contractions over the slots (weight
//! gradients) add the tail's share as a rank-one term:
//! Σ_s a_s b_sᵀ = Σ_{s < c} a_s b_sᵀ + (S − c)·tail_a tail_bᵀ.
//!
//! Each function returns `None` when the operands do not have the shapes it
//! handles, and the caller runs the full kernel instead.

use super::kernels::{assign_into, gemm_strided, unary_grad_slice, unary_slice};
use crate::tensor::{Real, Tensor, r};
use rayon::prelude::*;
use std::sync::Arc;
use tessera_compiler::ir::Dim;
use tessera_compiler::ir::{BinaryOp, UnaryOp};

/// Filled-slot counts and the shared row of the empty slots, per expert.
#[derive(Debug, Clone)]
pub struct Pad<T> {
    pub counts: Arc<Vec<usize>>,
    /// `experts × width`: row `e` is the value of every empty slot of expert `e`.
    pub tail: Vec<T>,
}

/// (experts, slots, width) of an `[expert, slot, rest...]` tensor.
fn geometry<T>(t: &Tensor<T>) -> Option<(usize, usize, usize)> {
    (t.dims.len() >= 2).then(|| {
        (t.dims[0].size as usize, t.dims[1].size as usize, t.dims[2..].iter().map(|d| d.size as usize).product())
    })
}

/// Does `pad` describe `t` (its expert count, and counts within the slots)?
fn fits<T>(t: &Tensor<T>, pad: &Pad<T>) -> Option<(usize, usize, usize)> {
    let (e, s, w) = geometry(t)?;
    (pad.counts.len() == e && pad.tail.len() == e * w && pad.counts.iter().all(|&c| c <= s)).then_some((e, s, w))
}

/// Write each expert's tail row into the empty slots of `t` (padded by `pad`).
pub fn fill_tail<T: Real>(t: &mut Tensor<T>, pad: &Pad<T>) {
    if let Some((_, s, w)) = fits(t, pad) {
        fill(&mut t.data, pad, s, w);
    }
}

/// Write each expert's tail row into its empty slots.
fn fill<T: Real>(data: &mut [T], pad: &Pad<T>, s: usize, w: usize) {
    for (e, block) in data.chunks_mut(s * w).enumerate() {
        let tail = &pad.tail[e * w..(e + 1) * w];
        for row in block[pad.counts[e] * w..].chunks_mut(w.max(1)) {
            row.copy_from_slice(tail);
        }
    }
}

/// Run `f(e, out_block)` for every expert's `[slot, width]` block, over the kernel threads.
fn per_expert<T: Real>(data: &mut [T], block: usize, f: impl Fn(usize, &mut [T]) + Sync + Send) {
    if super::threads() > 1 && data.len() >= 1 << 15 {
        data.par_chunks_mut(block.max(1)).enumerate().for_each(|(e, b)| f(e, b));
    } else {
        data.chunks_mut(block.max(1)).enumerate().for_each(|(e, b)| f(e, b));
    }
}

/// The pad of `dispatch`'s output: `counts` filled slots, zero tails.
pub fn dispatched<T: Real>(counts: Vec<usize>, out: &[Dim]) -> Pad<T> {
    let w: usize = out[2..].iter().map(|d| d.size as usize).product();
    Pad { tail: vec![T::zero(); counts.len() * w], counts: Arc::new(counts) }
}

/// A row-wise op on the filled rows and the tails: `row(e, src_row_index, out_row)`
/// where `src_row_index` is `Some(slot)` for a filled slot and `None` for the tail.
fn rowwise<T: Real>(
    dims: &[Dim],
    pad: &Pad<T>,
    row: impl Fn(usize, Option<usize>, &mut [T]) + Sync + Send,
) -> (Tensor<T>, Pad<T>) {
    let (e, s) = (dims[0].size as usize, dims[1].size as usize);
    let w: usize = dims[2..].iter().map(|d| d.size as usize).product();
    let mut tail = vec![T::zero(); e * w];
    for (k, t) in tail.chunks_mut(w.max(1)).enumerate() {
        row(k, None, t);
    }
    let out_pad = Pad { counts: pad.counts.clone(), tail };
    let mut data = vec![T::zero(); e * s * w];
    per_expert(&mut data, s * w, |k, block| {
        for (slot, o) in block[..pad.counts[k] * w].chunks_mut(w.max(1)).enumerate() {
            row(k, Some(slot), o);
        }
    });
    (Tensor { dims: dims.to_vec(), data }, out_pad)
}

/// The row of `t` (padded by `pad`) for expert `e` at `slot`, or its tail.
fn row_of<'a, T>(t: &'a Tensor<T>, pad: &'a Pad<T>, s: usize, w: usize, e: usize, slot: Option<usize>) -> &'a [T] {
    match slot {
        Some(j) => &t.data[(e * s + j) * w..][..w],
        None => &pad.tail[e * w..][..w],
    }
}

pub fn unary<T: Real>(op: UnaryOp, x: &Tensor<T>, pad: &Pad<T>) -> Option<(Tensor<T>, Pad<T>)> {
    let (_, s, w) = fits(x, pad)?;
    Some(rowwise(&x.dims, pad, |e, slot, o| unary_slice(op, row_of(x, pad, s, w, e, slot), o)))
}

pub fn unary_grad<T: Real>(
    op: UnaryOp,
    (x, px): (&Tensor<T>, &Pad<T>),
    (g, pg): (&Tensor<T>, &Pad<T>),
) -> Option<(Tensor<T>, Pad<T>)> {
    let (_, s, w) = fits(x, px)?;
    (x.dims == g.dims && fits(g, pg).is_some() && px.counts == pg.counts).then_some(())?;
    Some(rowwise(&x.dims, px, |e, slot, o| {
        unary_grad_slice(op, row_of(x, px, s, w, e, slot), row_of(g, pg, s, w, e, slot), o)
    }))
}

/// `a ∘ b` where one side is padded and `out`-shaped, and the other is padded
/// alike, or broadcast without the slot dim: `[expert, rest...]`, `[rest...]`
/// or a scalar.
pub fn binary<T: Real>(
    op: BinaryOp,
    (a, pa): (&Tensor<T>, Option<&Pad<T>>),
    (b, pb): (&Tensor<T>, Option<&Pad<T>>),
    out: &[Dim],
) -> Option<(Tensor<T>, Pad<T>)> {
    // Orient: `full` is padded and has the output's dims.
    let (full, pf, other, po, swapped) = match (pa, pb) {
        (Some(p), _) if a.dims == out => (a, p, b, pb, false),
        (_, Some(p)) if b.dims == out => (b, p, a, pa, true),
        _ => return None,
    };
    // The filled rows of a copy of `full`, updated in place.
    let mut t = full.clone();
    let pad = binary_assign(op, (&mut t, pf), (other, po), !swapped)?;
    Some((t, pad))
}

/// `target ∘= other` in place over the filled rows (the target dies here).
/// `other` is padded alike, or broadcast without the slot dim: `[expert,
/// rest...]`, `[rest...]` or a scalar. Returns the new pad, or `None` (target
/// untouched).
pub fn binary_assign<T: Real>(
    op: BinaryOp,
    (target, pt): (&mut Tensor<T>, &Pad<T>),
    (other, po): (&Tensor<T>, Option<&Pad<T>>),
    target_left: bool,
) -> Option<Pad<T>> {
    let (_, s, w) = fits(target, pt)?;
    let out = &target.dims;
    // Row k of `other` for expert e: its own rows (padded alike), a per-expert
    // row, one shared row, or a scalar.
    let by_expert = other.dims.len() == out.len() - 1 && other.dims[0] == out[0] && other.dims[1..] == out[2..];
    let scalar = vec![*other.data.first()?; w];
    let row = |k: usize, slot: Option<usize>| -> Option<&[T]> {
        if other.dims == *out {
            let p = po?;
            Some(row_of(other, p, s, w, k, slot))
        } else if by_expert {
            Some(&other.data[k * w..][..w])
        } else if other.dims == out[2..] {
            Some(&other.data[..w])
        } else if other.dims.is_empty() {
            Some(&scalar)
        } else {
            None
        }
    };
    if other.dims == *out && !po.is_some_and(|p| fits(other, p).is_some() && p.counts == pt.counts) {
        return None;
    }
    row(0, None)?;
    let mut tail = pt.tail.clone();
    for (k, t) in tail.chunks_mut(w.max(1)).enumerate() {
        assign_into(op, t, row(k, None)?, target_left);
    }
    per_expert(&mut target.data, s * w, |k, block| {
        for (slot, o) in block[..pt.counts[k] * w].chunks_mut(w.max(1)).enumerate() {
            if let Some(y) = row(k, Some(slot)) {
                assign_into(op, o, y, target_left);
            }
        }
    });
    Some(Pad { counts: pt.counts.clone(), tail })
}

/// Σ over the slots of a padded `[expert, slot, rest...]` value.
pub fn sum_slots<T: Real>(x: &Tensor<T>, pad: &Pad<T>, out: &[Dim]) -> Option<Tensor<T>> {
    let (e, s, w) = fits(x, pad)?;
    (out.len() == x.dims.len() - 1 && out[0] == x.dims[0] && out[1..] == x.dims[2..]).then_some(())?;
    let mut data = vec![T::zero(); e * w];
    for (k, o) in data.chunks_mut(w.max(1)).enumerate() {
        let c = pad.counts[k];
        for row in x.data[k * s * w..(k * s + c) * w].chunks(w.max(1)) {
            o.iter_mut().zip(row).for_each(|(o, v)| *o += *v);
        }
        let empty = r::<T>((s - c) as f64);
        o.iter_mut().zip(&pad.tail[k * w..(k + 1) * w]).for_each(|(o, t)| *o += empty * *t);
    }
    Some(Tensor { dims: out.to_vec(), data })
}

/// Where `b`'s per-expert `k × n` matrix lies: (has expert dim, row stride, col stride).
fn weight_view<T>(b: &Tensor<T>, expert: &Dim, kd: &[Dim], nd: &[Dim]) -> Option<(bool, usize, usize)> {
    let lead = b.dims.first() == Some(expert);
    let rest = &b.dims[usize::from(lead)..];
    let (k, n): (usize, usize) =
        (kd.iter().map(|d| d.size as usize).product(), nd.iter().map(|d| d.size as usize).product());
    if rest.len() != kd.len() + nd.len() {
        return None;
    }
    if rest[..kd.len()] == *kd && rest[kd.len()..] == *nd {
        Some((lead, n, 1))
    } else if rest[..nd.len()] == *nd && rest[nd.len()..] == *kd {
        Some((lead, 1, k))
    } else {
        None
    }
}

/// `a @ b` with `a` padded `[expert, slot, k...]`, every `k` dim contracted,
/// and `b` `[expert?, k..., n...]` or `[expert?, n..., k...]`: output
/// `[expert, slot, n...]`, one GEMM per expert over its filled slots.
pub fn matmul_rows<T: Real>(a: &Tensor<T>, pad: &Pad<T>, b: &Tensor<T>, out: &[Dim]) -> Option<(Tensor<T>, Pad<T>)> {
    let (e, s, kw) = fits(a, pad)?;
    let kd = &a.dims[2..];
    (out.len() >= 2 && out[..2] == a.dims[..2]).then_some(())?;
    let nd = &out[2..];
    if kd.iter().any(|d| nd.contains(d)) {
        return None;
    }
    let (per_expert_b, rs, cs) = weight_view(b, &a.dims[0], kd, nd)?;
    let nw: usize = nd.iter().map(|d| d.size as usize).product();
    let bstride = if per_expert_b { kw * nw } else { 0 };
    let mut tail = vec![T::zero(); e * nw];
    for k in 0..e {
        // SAFETY: row k of the tails is 1×kw; b's matrix k is kw×nw at k·bstride.
        unsafe {
            gemm_strided(
                (1, nw, kw),
                tail.as_mut_ptr().add(k * nw),
                nw,
                false,
                (pad.tail.as_ptr().add(k * kw), kw, 1),
                (b.data.as_ptr().add(k * bstride), rs, cs),
                T::one(),
                true,
            );
        }
    }
    let out_pad = Pad { counts: pad.counts.clone(), tail };
    let mut data = vec![T::zero(); e * s * nw];
    for k in 0..e {
        // SAFETY: the first counts[k] rows of expert k in `a` and in `data`.
        unsafe {
            gemm_strided(
                (pad.counts[k], nw, kw),
                data.as_mut_ptr().add(k * s * nw),
                nw,
                false,
                (a.data.as_ptr().add(k * s * kw), kw, 1),
                (b.data.as_ptr().add(k * bstride), rs, cs),
                T::one(),
                true,
            );
        }
    }
    Some((Tensor { dims: out.to_vec(), data }, out_pad))
}

/// Σ over the slots of a ⊗ b, both padded alike: `[expert, slot, m...]` and
/// `[expert, slot, n...]` → `[expert, m..., n...]` (a weight gradient).
pub fn contract_slots<T: Real>(
    (a, pa): (&Tensor<T>, &Pad<T>),
    (b, pb): (&Tensor<T>, &Pad<T>),
    out: &[Dim],
) -> Option<Tensor<T>> {
    let (e, s, mw) = fits(a, pa)?;
    let (_, _, nw) = fits(b, pb)?;
    (pa.counts == pb.counts && a.dims[..2] == b.dims[..2]).then_some(())?;
    let (md, nd) = (&a.dims[2..], &b.dims[2..]);
    (out.len() == 1 + md.len() + nd.len()
        && out[0] == a.dims[0]
        && out[1..1 + md.len()] == *md
        && out[1 + md.len()..] == *nd)
        .then_some(())?;
    let mut data = vec![T::zero(); e * mw * nw];
    for k in 0..e {
        let c = pa.counts[k];
        let dst = data[k * mw * nw..].as_mut_ptr();
        // SAFETY: expert k's filled rows of a (c×mw) and b (c×nw), its tails,
        // and its mw×nw block of the output.
        unsafe {
            // Σ_{s<c} a_sᵀ b_s: lhs is aᵀ (mw × c), read with row stride 1 and column stride mw.
            gemm_strided(
                (mw, nw, c),
                dst,
                nw,
                false,
                (a.data.as_ptr().add(k * s * mw), 1, mw),
                (b.data.as_ptr().add(k * s * nw), nw, 1),
                T::one(),
                true,
            );
            // + (S − c) · tail_aᵀ tail_b
            if c < s {
                gemm_strided(
                    (mw, nw, 1),
                    dst,
                    nw,
                    true,
                    (pa.tail.as_ptr().add(k * mw), 1, mw),
                    (pb.tail.as_ptr().add(k * nw), nw, 1),
                    r((s - c) as f64),
                    true,
                );
            }
        }
    }
    Some(Tensor { dims: out.to_vec(), data })
}
