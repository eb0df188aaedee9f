//! Rank numbering: where every rank sits on the mesh. The one place that
//! says it; the sharding pass, the cost model, the checker, the CLI and the
//! runtime's communicators all read it from here.
//!
//! Ranks are numbered with the pipeline axis outermost, then the data axis,
//! then the other axes in mesh order, and the tensor-parallel axis innermost
//! (so tensor groups are neighbours, as Megatron places them on one node).

use crate::config::Parallel;

/// The largest world size the checker accepts (per-rank reports enumerate ranks).
pub const MAX_WORLD: u64 = 1 << 20;

/// Mesh axes from outermost to innermost in rank numbering.
pub fn rank_order(p: &Parallel) -> Vec<(String, u64)> {
    let pipe = p.axis_of("layer").map(str::to_string);
    let data = p.data_axis().map(str::to_string);
    let tensor = p.axis_of("heads").or_else(|| p.axis_of("mlp")).map(str::to_string);
    let mut out: Vec<(String, u64)> = Vec::new();
    let push = |name: &Option<String>, out: &mut Vec<(String, u64)>| {
        if let Some(n) = name
            && !out.iter().any(|(a, _)| a == n)
            && let Some((_, s)) = p.mesh.iter().find(|(a, _)| a == n)
        {
            out.push((n.clone(), *s));
        }
    };
    push(&pipe, &mut out);
    push(&data, &mut out);
    for (a, s) in &p.mesh {
        if Some(a) != tensor.as_ref() && !out.iter().any(|(x, _)| x == a) {
            out.push((a.clone(), *s));
        }
    }
    push(&tensor, &mut out);
    out
}

/// Coordinates of a rank along each axis of [`rank_order`].
pub fn coords(order: &[(String, u64)], rank: u64) -> Vec<u64> {
    let mut c = vec![0; order.len()];
    let mut r = rank;
    for i in (0..order.len()).rev() {
        c[i] = r % order[i].1;
        r /= order[i].1;
    }
    c
}
