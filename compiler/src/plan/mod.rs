//! Memory planning: one arena per device, buffers placed by liveness.
//!
//! Every value a graph computes gets a byte range in one arena; a value's
//! range is free again after its last use, and later values reuse it
//! (first fit, lowest offset). Parameters, their per-layer slices and the
//! inputs live outside the arena. Values that must survive the graph (the
//! gradients the optimizer reads) stay live to the end.

use crate::ir::{Graph, Op, ValueId};

#[derive(Debug, Clone, PartialEq)]
pub struct MemoryPlan {
    /// Arena offset of each value (`None`: not in the arena).
    pub offsets: Vec<Option<u64>>,
    /// Bytes of each value.
    pub sizes: Vec<u64>,
    /// The arena's size: the most bytes live at once.
    pub peak: u64,
    /// One buffer per value, no reuse: the baseline a plan must beat.
    pub naive: u64,
}

/// Bytes of a value, aligned to 64 (a cache line).
fn size_of(g: &Graph, v: ValueId) -> u64 {
    let t = g.ty(v);
    (t.numel().saturating_mul(t.dtype.bytes())).div_ceil(64) * 64
}

fn in_arena(op: &Op) -> bool {
    !matches!(op, Op::Param { .. } | Op::Input { .. })
}

/// Plan a graph; `keep` are values live until the end (gradients, outputs).
pub fn plan(g: &Graph, keep: &[ValueId]) -> MemoryPlan {
    let n = g.len();
    let end = n;
    let mut last_use: Vec<usize> = (0..n).collect();
    for (i, node) in g.nodes.iter().enumerate() {
        for v in &node.inputs {
            last_use[v.index()] = last_use[v.index()].max(i);
        }
    }
    for v in keep {
        last_use[v.index()] = end;
    }
    let sizes: Vec<u64> =
        (0..n).map(|i| if in_arena(&g.nodes[i].op) { size_of(g, ValueId(i as u32)) } else { 0 }).collect();
    // Values to free after each step.
    let mut dies: Vec<Vec<usize>> = vec![Vec::new(); n + 1];
    for i in 0..n {
        if sizes[i] > 0 {
            dies[last_use[i]].push(i);
        }
    }
    // Free list of (offset, size), sorted by offset.
    let mut free: Vec<(u64, u64)> = Vec::new();
    let mut top = 0u64;
    let mut offsets = vec![None; n];
    for i in 0..n {
        let s = sizes[i];
        if s > 0 {
            let slot = free.iter().position(|&(_, fs)| fs >= s);
            let off = match slot {
                Some(k) => {
                    let (fo, fs) = free[k];
                    if fs == s {
                        free.remove(k);
                    } else {
                        free[k] = (fo + s, fs - s);
                    }
                    fo
                }
                None => {
                    let o = top;
                    top += s;
                    o
                }
            };
            offsets[i] = Some(off);
        }
        // Release what dies here (a value used only by this node dies after it runs).
        for &d in &dies[i] {
            if let Some(o) = offsets[d] {
                release(&mut free, &mut top, o, sizes[d]);
            }
        }
    }
    let peak = (0..n).filter_map(|i| offsets[i].map(|o| o + sizes[i])).max().unwrap_or(0);
    MemoryPlan { offsets, sizes: sizes.clone(), peak, naive: sizes.iter().sum() }
}

/// Return a block to the free list, merging neighbours and shrinking the top.
fn release(free: &mut Vec<(u64, u64)>, top: &mut u64, off: u64, size: u64) {
    let at = free.partition_point(|&(o, _)| o < off);
    free.insert(at, (off, size));
    // Merge with the next and the previous block.
    if at + 1 < free.len() && free[at].0 + free[at].1 == free[at + 1].0 {
        free[at].1 += free[at + 1].1;
        free.remove(at + 1);
    }
    if at > 0 && free[at - 1].0 + free[at - 1].1 == free[at].0 {
        free[at - 1].1 += free[at].1;
        free.remove(at);
    }
    if let Some(&(o, s)) = free.last()
        && o + s == *top
    {
        *top = o;
        free.pop();
    }
}

/// Check that no two values overlap in the arena while both are live.
pub fn validate(g: &Graph, p: &MemoryPlan, keep: &[ValueId]) -> Result<(), String> {
    let n = g.len();
    let mut last_use: Vec<usize> = (0..n).collect();
    for (i, node) in g.nodes.iter().enumerate() {
        for v in &node.inputs {
            last_use[v.index()] = last_use[v.index()].max(i);
        }
    }
    for v in keep {
        last_use[v.index()] = n;
    }
    let mut live: Vec<usize> = Vec::new();
    for i in 0..n {
        live.retain(|&j| last_use[j] >= i);
        let Some(oi) = p.offsets[i] else { continue };
        for &j in &live {
            let oj = p.offsets[j].expect("live values are placed");
            if oi < oj + p.sizes[j] && oj < oi + p.sizes[i] {
                return Err(format!("%{i} overlaps %{j}, which is still live"));
            }
        }
        live.push(i);
    }
    Ok(())
}
