//! A rank's shards of the logical tensors: the cut of a parameter a layout
//! gives a rank ([`cut`]), ZeRO's flat shard of that cut ([`flat_shard`]),
//! and the way back ([`place`]). Checkpoints hold logical tensors, so one
//! written under a layout loads under any other.

use crate::tensor::Tensor;
use tessera_compiler::config::{Optimizer, StateRole};
use tessera_compiler::ir::{Dim, Param};
use tessera_compiler::lower::{Bound, Program};
use tessera_compiler::parallel::{self, Mesh};

/// Whether a rank's buffer `role` of a parameter holds ZeRO's flat shard of
/// its cut rather than the whole cut: the master weights and the moments
/// where the update is ZeRO-sharded, the weights themselves under ZeRO 3.
pub fn holds_flat_shard(mesh: &Mesh, shard: &parallel::ParamShard, role: Bound) -> bool {
    mesh.zero_sharded(shard) && (!matches!(role, Bound::Weight(_)) || mesh.zero >= 3)
}

/// The buffer of parameter `k` a checkpoint takes its weights from: the
/// f32 master weights where the program keeps them (`precision = bf16`),
/// else the weights.
pub fn weight_buffer(p: &Program, k: usize) -> Bound {
    if p.bound(Bound::Master(k)).is_some() { Bound::Master(k) } else { Bound::Weight(k) }
}

/// The flat shard `d` of `n` of a tensor's elements (zero-padded to a multiple of n).
pub fn flat_shard(x: &[f32], n: usize, d: usize) -> Vec<f32> {
    let per = x.len().div_ceil(n);
    (d * per..(d + 1) * per).map(|i| x.get(i).copied().unwrap_or(0.0)).collect()
}

/// Index maps of a shard: for each logical dim, the logical indices held.
pub fn maps(p: &parallel::ParamShard, logical: &Param) -> Vec<Vec<u64>> {
    logical
        .ty
        .dims
        .iter()
        .enumerate()
        .map(|(i, d)| match p.splits.iter().find(|(pos, _)| *pos == i) {
            Some((_, sp)) => sp.indices.clone(),
            None => (0..d.size).collect(),
        })
        .collect()
}

/// Visit every element of a local tensor with its logical offset.
fn for_each_logical(logical_dims: &[Dim], maps: &[Vec<u64>], mut f: impl FnMut(usize, usize)) {
    let n = logical_dims.len();
    let mut strides = vec![1usize; n];
    for i in (0..n.saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * logical_dims[i + 1].size as usize;
    }
    let total: usize = maps.iter().map(Vec::len).product();
    let mut idx = vec![0usize; n];
    for local in 0..total {
        let off: usize = (0..n).map(|i| maps[i][idx[i]] as usize * strides[i]).sum();
        f(local, off);
        for i in (0..n).rev() {
            idx[i] += 1;
            if idx[i] < maps[i].len() {
                break;
            }
            idx[i] = 0;
        }
    }
}

/// A rank's shard of a logical tensor.
pub fn cut(full: &Tensor<f32>, shard: &parallel::ParamShard, logical: &Param) -> Tensor<f32> {
    let m = maps(shard, logical);
    let mut data = vec![0f32; m.iter().map(Vec::len).product()];
    for_each_logical(&logical.ty.dims, &m, |l, off| data[l] = full.data[off]);
    Tensor { dims: shard.local.ty.dims.clone(), data }
}

/// Whether a rank's shard is the whole logical tensor, laid out as it is.
pub fn whole(shard: &parallel::ParamShard, logical: &Param) -> bool {
    shard.splits.is_empty() && shard.local.ty.dims == logical.ty.dims
}

/// A rank's elements of the logical tensor, as [`cut`], borrowed where the
/// rank holds it whole (no copy of a large parameter at start-up).
pub fn cut_elements<'a>(
    full: &'a Tensor<f32>,
    shard: &parallel::ParamShard,
    logical: &Param,
) -> std::borrow::Cow<'a, [f32]> {
    if whole(shard, logical) {
        std::borrow::Cow::Borrowed(&full.data)
    } else {
        std::borrow::Cow::Owned(cut(full, shard, logical).data)
    }
}

/// Write a rank's shard back into the logical tensor.
pub fn place(full: &mut Tensor<f32>, local: &[f32], shard: &parallel::ParamShard, logical: &Param) {
    let m = maps(shard, logical);
    for_each_logical(&logical.ty.dims, &m, |l, off| full.data[off] = local[l]);
}

/// The optimizer state `role` of parameter `logical`, as a parameter of the
/// dims that state keeps ([`Optimizer::state`]; Adafactor's factored
/// moments drop one), with the rank's cut of it: so [`cut`], [`place`] and
/// the sharded checkpoints handle a state tensor as they do a parameter.
/// `None` when the optimizer keeps no such state for it.
pub fn state_param(
    opt: &Optimizer,
    shard: &parallel::ParamShard,
    logical: &Param,
    role: StateRole,
) -> Option<(parallel::ParamShard, Param)> {
    let dims = &logical.ty.dims;
    let kept = opt.state(dims, dims).into_iter().find(|s| s.0 == role)?.1;
    let keeps = |d: &Dim| kept.iter().any(|k| k.name == d.name);
    let mut meta = logical.clone();
    meta.ty.dims.retain(keeps);
    let mut cut = shard.clone();
    cut.local.ty.dims.retain(keeps);
    cut.splits = shard
        .splits
        .iter()
        .filter(|(i, _)| keeps(&dims[*i]))
        .map(|(i, s)| (dims[..*i].iter().filter(|d| keeps(d)).count(), s.clone()))
        .collect();
    Some((cut, meta))
}

/// Every state tensor parameter `logical` keeps under `opt` (see [`state_param`]).
pub fn state_params(
    opt: &Optimizer,
    shard: &parallel::ParamShard,
    logical: &Param,
) -> Vec<(StateRole, parallel::ParamShard, Param)> {
    let dims = &logical.ty.dims;
    opt.state(dims, dims)
        .into_iter()
        .filter_map(|(role, _)| state_param(opt, shard, logical, role).map(|(s, m)| (role, s, m)))
        .collect()
}
