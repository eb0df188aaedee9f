//! Memory planning: one arena per device, buffers placed by liveness.
//! [`allocate`] is the allocator of the lowered program (`crate::lower`);
//! [`plan`] applies it to one graph.
//!
//! Every value a graph computes gets a byte range in one arena; a value's
//! range is free again after its last use, and later values reuse it
//! (largest first, lowest free offset). Parameters, their per-layer slices and the
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
    bytes_of(g.ty(v))
}

/// Bytes of a buffer of this type, aligned to 64 (a cache line).
pub fn bytes_of(t: &crate::ir::TensorType) -> u64 {
    (t.numel().saturating_mul(t.dtype.bytes())).div_ceil(64) * 64
}

fn in_arena(op: &Op) -> bool {
    !matches!(op, Op::Param { .. } | Op::Input { .. })
}

/// A buffer to place: `bytes` live from step `start` (it is written there)
/// through step `end` (its last reader), inclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interval {
    pub bytes: u64,
    pub start: usize,
    pub end: usize,
}

/// Offsets for intervals over a sequence of steps, in one arena: the
/// largest buffers are placed first, each at the lowest offset where it
/// overlaps no placed buffer whose life overlaps its own (the greedy-by-size
/// planner of TensorFlow Lite and MXNet, which stays within a few percent of
/// the most bytes live at once, where first fit in time order fragments).
/// Returns the offsets and the arena's size. Buffers of 0 bytes get offset 0.
pub fn allocate(items: &[Interval]) -> (Vec<u64>, u64) {
    // Where no buffer lives across a step (between microbatches), the two
    // sides are placed independently: the planner is quadratic in a part.
    let mut by_start: Vec<usize> = (0..items.len()).filter(|&k| items[k].bytes > 0).collect();
    by_start.sort_by_key(|&k| items[k].start);
    let mut offsets = vec![0u64; items.len()];
    let mut peak = 0u64;
    let mut part: Vec<usize> = Vec::new();
    let mut reach = 0usize;
    for k in by_start {
        if !part.is_empty() && items[k].start > reach {
            peak = peak.max(place(items, &part, &mut offsets));
            part.clear();
        }
        reach = if part.is_empty() { items[k].end } else { reach.max(items[k].end) };
        part.push(k);
    }
    peak = peak.max(place(items, &part, &mut offsets));
    (offsets, peak)
}

/// Greedy by size over the buffers `part`; returns the bytes they need.
fn place(items: &[Interval], part: &[usize], offsets: &mut [u64]) -> u64 {
    let mut order = part.to_vec();
    order.sort_by_key(|&k| (std::cmp::Reverse(items[k].bytes), items[k].start, k));
    // Placed buffers as (offset, end, start step, end step), kept sorted by offset.
    let mut placed: Vec<(u64, u64, usize, usize)> = Vec::new();
    let mut peak = 0u64;
    for k in order {
        let it = items[k];
        let (s, e) = (it.start, it.end.max(it.start));
        let mut at = 0u64;
        for &(o, oe, ps, pe) in &placed {
            if ps > e || pe < s {
                continue; // not live at the same time
            }
            if o >= at + it.bytes {
                break; // the gap below this one fits
            }
            at = at.max(oe);
        }
        offsets[k] = at;
        peak = peak.max(at + it.bytes);
        let pos = placed.partition_point(|p| p.0 < at);
        placed.insert(pos, (at, at + it.bytes, s, e));
    }
    peak
}

/// Plan a graph; `keep` are values live until the end (gradients, outputs).
pub fn plan(g: &Graph, keep: &[ValueId]) -> MemoryPlan {
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
    let sizes: Vec<u64> =
        (0..n).map(|i| if in_arena(&g.nodes[i].op) { size_of(g, ValueId(i as u32)) } else { 0 }).collect();
    let items: Vec<Interval> = (0..n).map(|i| Interval { bytes: sizes[i], start: i, end: last_use[i] }).collect();
    let (at, peak) = allocate(&items);
    let offsets = (0..n).map(|i| (sizes[i] > 0).then_some(at[i])).collect();
    MemoryPlan { offsets, sizes: sizes.clone(), peak, naive: sizes.iter().sum() }
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
