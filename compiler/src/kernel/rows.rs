//! Row kernels: a fused kernel with row reductions ([`Expr::Reduce`], a
//! layer_norm and what is fused around it) runs as a few elementwise passes
//! over each block of rows, which every engine already runs (the CPU
//! backend's interpreter and JIT, generated Rust).
//!
//! A value's *level* is the number of reductions it depends on in sequence
//! (a residual sum: 0; its mean: 1; the deviations' square sum: 2). Pass
//! `p` computes, for the block's positions, the operands of the reductions
//! of level-`p` values and writes them to a scratch array of the block; the
//! engine then sums (or maxes) each row of the scratch in the IR's fixed
//! order ([`Expr::Reduce`]) into a per-row scalar. The last pass computes what the kernel stores. A pass
//! reads the earlier reductions as inputs broadcast along the row (stride
//! 0 on the innermost dim) and recomputes the elementwise values it needs
//! from the kernel's inputs instead of keeping them: a block's rows are
//! read once per pass while they are in cache, and the kernel writes only
//! its outputs. A dropout recomputed draws the same mask (it is a function
//! of the position).

use super::{Expr, Kernel};
use crate::ir::ReduceOp;

/// One pass of a row kernel.
pub struct RowPass {
    /// An elementwise kernel over the row kernel's loop nest. Its
    /// arguments: the row kernel's inputs; one per-row scalar input per
    /// reduction in `reads`; one input per value in `loads` (the block's
    /// array of it, in position order); then its outputs: the block's
    /// arrays of the values in `writes`, or, in the last pass, the row
    /// kernel's outputs.
    pub kernel: Kernel,
    /// The reductions (by index) whose results the pass reads.
    pub reads: Vec<usize>,
    /// Body values computed by earlier passes that this one reads from the block's arrays.
    pub loads: Vec<usize>,
    /// Body values this pass writes to the block's arrays (for its reductions and later passes).
    pub writes: Vec<usize>,
    /// The reductions (index, op, the body value reduced) done after the pass.
    pub makes: Vec<(usize, ReduceOp, usize)>,
    /// Whether the pass runs once per row, not per position: the last pass
    /// of a kernel whose every output holds one value per row (a row's
    /// loss). Its kernel's innermost dim then has size 1.
    pub per_row: bool,
}

pub struct RowPlan {
    pub passes: Vec<RowPass>,
    /// Reductions in the kernel.
    pub reductions: usize,
    /// Body values in the kernel (the block's arrays are indexed by value).
    pub values: usize,
    /// Positions per row (the innermost loop dim's size).
    pub len: usize,
}

impl RowPlan {
    /// The passes of row kernel `k` (a kernel with at least one reduction).
    ///
    /// A value computed (not loaded) in one pass and needed by a later one
    /// is written to the block's array of it by the pass that computes it,
    /// and read back by the later pass, not recomputed; loads and constants
    /// are simply read again.
    pub fn of(k: &Kernel) -> Result<RowPlan, String> {
        k.check()?;
        let len = k.dims.last().ok_or("a row kernel without loop dims")?.size as usize;
        let n = k.body.len();
        let mut level = vec![0usize; n];
        let mut reduction = vec![None; n];
        let mut count = 0;
        for (i, e) in k.body.iter().enumerate() {
            let deps = e.operands().into_iter().map(|j| level[j]).max().unwrap_or(0);
            level[i] = match e {
                Expr::Reduce { .. } => {
                    reduction[i] = Some(count);
                    count += 1;
                    deps + 1
                }
                _ => deps,
            };
        }
        let last = level.iter().copied().max().unwrap_or(0);
        let trivial =
            |i: usize| matches!(k.body[i], Expr::Load { .. } | Expr::Element { .. } | Expr::Const { .. } | Expr::Index);
        // What each pass writes to the block's arrays: its reductions' operands, and what later passes read.
        let mut writes: Vec<std::collections::BTreeSet<usize>> = vec![Default::default(); last + 1];
        let mut makes: Vec<Vec<(usize, ReduceOp, usize)>> = vec![Vec::new(); last + 1];
        for (i, e) in k.body.iter().enumerate() {
            if let Expr::Reduce { x, op } = *e {
                writes[level[x]].insert(x);
                makes[level[x]].push((reduction[i].expect("numbered"), op, x));
            }
        }
        let mut passes = Vec::new();
        for p in (0..=last).rev() {
            let outs: Vec<usize> = if p == last {
                k.stores.iter().map(|&(_, v)| v).collect()
            } else {
                writes[p].iter().copied().collect()
            };
            // The values the pass needs: the closure of `outs`, cut at reductions and at values earlier passes compute.
            let mut need = vec![false; n];
            let mut loads = Vec::new();
            for &o in &outs {
                need[o] = true;
            }
            for i in (0..n).rev() {
                if !need[i] {
                    continue;
                }
                if matches!(k.body[i], Expr::Reduce { .. }) {
                    continue;
                }
                if level[i] < p && !trivial(i) {
                    writes[level[i]].insert(i);
                    loads.push(i);
                    continue;
                }
                for j in k.body[i].operands() {
                    need[j] = true;
                }
            }
            loads.sort_unstable();
            passes.push(pass(k, p == last, &outs, &need, &loads, &reduction, std::mem::take(&mut makes[p]))?);
        }
        passes.reverse();
        Ok(RowPlan { passes, reductions: count, values: n, len })
    }
}

/// The elementwise kernel of one pass: values `outs` of `k` from the values
/// marked in `need`, with the reductions it needs as per-row inputs and
/// `loads` read from the block's arrays.
fn pass(
    k: &Kernel,
    last: bool,
    outs: &[usize],
    need: &[bool],
    loads: &[usize],
    reduction: &[Option<usize>],
    makes: Vec<(usize, ReduceOp, usize)>,
) -> Result<RowPass, String> {
    let n = k.body.len();
    let reads: Vec<usize> = (0..n).filter(|&i| need[i]).filter_map(|i| reduction[i]).collect();
    let mut map = vec![usize::MAX; n];
    let mut body = Vec::new();
    for i in (0..n).filter(|&i| need[i]) {
        let e = if let Some(at) = loads.iter().position(|&v| v == i) {
            Expr::Load { arg: k.inputs + reads.len() + at }
        } else if let Some(r) = reduction[i] {
            Expr::Load { arg: k.inputs + reads.iter().position(|&x| x == r).expect("read") }
        } else {
            renumber(&k.body[i], &map)
        };
        body.push(e);
        map[i] = body.len() - 1;
    }
    let inputs = k.inputs + reads.len() + loads.len();
    let outer = &k.dims[..k.dims.len() - 1];
    // A per-row scalar: contiguous over the outer dims, broadcast along the row.
    let mut per_row = vec![0u64; k.dims.len()];
    let mut s = 1;
    for d in (0..outer.len()).rev() {
        per_row[d] = s;
        s *= outer[d].size;
    }
    // A block's array: every position in row-major order.
    let mut dense = vec![0u64; k.dims.len()];
    let mut s = 1;
    for d in (0..k.dims.len()).rev() {
        dense[d] = s;
        s *= k.dims[d].size;
    }
    let mut strides: Vec<Vec<u64>> = k.strides[..k.inputs].to_vec();
    strides.extend(std::iter::repeat_n(per_row, reads.len()));
    // A value the same along the row is read at the row's first position.
    let uniform = k.row_uniform();
    let mut first = dense.clone();
    if let Some(l) = first.last_mut() {
        *l = 0;
    }
    strides.extend(loads.iter().map(|&v| if uniform[v] { first.clone() } else { dense.clone() }));
    let stores: Vec<(usize, usize)> = if last {
        strides.extend(k.strides[k.inputs..].iter().cloned());
        k.stores.iter().map(|&(a, v)| (a - k.inputs + inputs, map[v])).collect()
    } else {
        strides.extend(std::iter::repeat_n(dense, outs.len()));
        outs.iter().enumerate().map(|(j, &v)| (inputs + j, map[v])).collect()
    };
    let mut kernel = Kernel { dims: k.dims.clone(), inputs, strides, body, stores, ops: k.ops.clone(), rows: None };
    kernel.check().map_err(|e| format!("a row kernel's pass: {e}"))?;
    // Outputs of one value per row (which `check` proved the same along it) are computed once per row.
    let per_row = last && k.stores.iter().all(|&(a, _)| k.strides[a].last() == Some(&0));
    if per_row && let Some(d) = kernel.dims.last_mut() {
        d.size = 1;
    }
    let writes = if last { Vec::new() } else { outs.to_vec() };
    Ok(RowPass { kernel, reads, loads: loads.to_vec(), writes, makes, per_row })
}

/// `e` with its operands renumbered by `map`.
fn renumber(e: &Expr, map: &[usize]) -> Expr {
    let m = |i: usize| map[i];
    match *e {
        Expr::Unary { op, x } => Expr::Unary { op, x: m(x) },
        Expr::UnaryGrad { op, x, g } => Expr::UnaryGrad { op, x: m(x), g: m(g) },
        Expr::Binary { op, a, b } => Expr::Binary { op, a: m(a), b: m(b) },
        Expr::Pow { x, exp } => Expr::Pow { x: m(x), exp },
        Expr::Dropout { x, p, rng } => Expr::Dropout { x: m(x), p, rng },
        Expr::Round { x, dtype } => Expr::Round { x: m(x), dtype },
        Expr::Reduce { x, op } => Expr::Reduce { x: m(x), op },
        Expr::Equal { a, b } => Expr::Equal { a: m(a), b: m(b) },
        Expr::Load { .. } | Expr::Element { .. } | Expr::Const { .. } | Expr::Index => e.clone(),
    }
}
