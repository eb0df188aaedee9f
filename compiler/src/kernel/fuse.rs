//! Fusion: runs of elementwise and row ops become one kernel.
//!
//! A run is a sequence of consecutive instructions, each one IR op that is
//! elementwise (unary, binary with broadcasting, pow, an activation's
//! gradient, dropout and its gradient, a cast) or a row op (`layer_norm`,
//! `rms_norm`, `norm_grad_x`, `softmax`, `softmax_grad` over the innermost
//! dim) over floating values
//! of one and the same type, writing a fresh temporary, updating a persistent buffer in place
//! (the optimizer's), or adding into its output (`accumulate`: a gradient
//! summed from two paths, such as a tied embedding's, becomes `out + a + b`
//! in one pass, where it was a table-sized temporary and a second pass
//! before). Values made and read only inside the
//! run live in registers; the run's inputs are loaded once; what later
//! instructions read is stored. A bias add and its GELU, a residual add, a
//! GELU's gradient and the add after it are each one pass over memory; a
//! residual add and the layer_norm after it one kernel that reads the row
//! once per reduction and writes both results. A
//! lone elementwise op is a kernel too, so that every elementwise op of a
//! program reaches the backend in one form.
//!
//! Cross-entropy and its gradient (over logits whose classes are the
//! innermost dim) become kernels and sums ([`cross_entropy`]): a row kernel
//! for the rows' losses, the sum over the rows, and a scalar kernel for the
//! mean; the gradient is one row kernel (after the count of kept rows, where
//! the op ignores a class id).

use super::{Expr, Kernel, decompose, decomposes, expand, reads_whole, row_dim};
use crate::ir::{DType, Dim, Op, ReduceOp, TensorType};
use crate::lower::{BufId, Buffer, Instr, Kind, Region, Stream};
use std::collections::HashMap;

/// A kernel's loop nest: its dims, and the buffer bounding its ragged rows.
#[derive(Clone, PartialEq, Default)]
struct Loop {
    dims: Vec<Dim>,
    rows: Option<BufId>,
}

/// An op instruction's operands, without its filled-slot counts.
fn operands(ins: &Instr) -> &[BufId] {
    match ins.kind {
        Kind::Op { rows: true, .. } => &ins.ins[..ins.ins.len() - 1],
        _ => &ins.ins,
    }
}

/// Whether instruction `ins` may join a run over a loop nest, and which.
fn fusible(buffers: &[Buffer], ins: &Instr) -> Option<Loop> {
    let Kind::Op { op, accumulate, rows, .. } = &ins.kind else { return None };
    let [out] = ins.outs[..] else { return None };
    let o = &buffers[out.index()];
    // An output outside the arena is a persistent buffer updated in place
    // (the optimizer's), or added into (a gradient).
    let persistent = o.region != Region::Arena;
    let in_place = ins.ins.contains(&out) || *accumulate;
    if !decomposes(op) || o.view_of.is_some() || !o.ty.dtype.is_float() || (persistent && !in_place) {
        return None;
    }
    // An op that adds into its output computes `out + op(...)`: only over the output's own loop.
    if *accumulate && !op.is_elementwise() {
        return None;
    }
    // A row op reduces over the loop's innermost dim, over whole rows: its
    // input has the output's layout, and no rows are ragged.
    if let Some(dim) = row_dim(op) {
        let x = &buffers[ins.ins[0].index()].ty;
        if *accumulate || *rows || o.ty.dims.last().is_none_or(|d| d.name != dim) || x.dims != o.ty.dims {
            return None;
        }
    }
    // Every operand read at the loop position is floating with a subset of the output's dims, of the same sizes.
    let fits = |(i, b): (usize, &BufId)| {
        let t = &buffers[b.index()].ty;
        t.dtype.is_float() && (reads_whole(op, i) || t.dims.iter().all(|d| o.ty.dims.contains(d)))
    };
    let rows = rows.then(|| *ins.ins.last().expect("an op over filled slots reads their counts"));
    operands(ins).iter().enumerate().all(fits).then(|| Loop { dims: o.ty.dims.clone(), rows })
}

/// Row-major element strides of `t` along each of `dims` (0 where `t` lacks the dim).
pub fn strides(t: &TensorType, dims: &[Dim]) -> Vec<u64> {
    let mut own = vec![1u64; t.dims.len()];
    for i in (0..t.dims.len().saturating_sub(1)).rev() {
        own[i] = own[i + 1] * t.dims[i + 1].size;
    }
    dims.iter().map(|d| t.dims.iter().position(|x| x.name == d.name).map(|i| own[i]).unwrap_or(0)).collect()
}

/// Replace runs of elementwise instructions with kernels, phase by phase
/// (`phases`: the phases' first instructions, strictly increasing); returns
/// the instructions and each phase's new start. A guard's range
/// (`skip_if_nonfinite`, which lies within one phase) is fused on its own
/// and its count follows.
pub fn fuse(buffers: &mut Vec<Buffer>, instrs: Vec<Instr>, phases: &[usize]) -> (Vec<Instr>, Vec<usize>) {
    // How often each buffer is read, and which buffers something views.
    let mut reads: HashMap<BufId, usize> = HashMap::new();
    for ins in &instrs {
        for b in &ins.ins {
            *reads.entry(*b).or_default() += 1;
        }
    }
    let viewed: std::collections::HashSet<BufId> = buffers.iter().filter_map(|b| b.view_of).collect();
    // Each phase (strictly increasing starts) is fused on its own: a run
    // never spans two, so each phase keeps a start.
    let n = instrs.len();
    let mut out = Vec::with_capacity(n);
    let mut starts = Vec::with_capacity(phases.len());
    let mut rest = instrs.into_iter();
    let first = phases.first().copied().unwrap_or(n);
    out.extend(fuse_range(buffers, &reads, &viewed, rest.by_ref().take(first).collect()));
    for (i, &start) in phases.iter().enumerate() {
        let end = phases.get(i + 1).copied().unwrap_or(n);
        starts.push(out.len());
        out.extend(fuse_range(buffers, &reads, &viewed, rest.by_ref().take(end - start).collect()));
    }
    (out, starts)
}

fn fuse_range(
    buffers: &mut Vec<Buffer>,
    reads: &HashMap<BufId, usize>,
    viewed: &std::collections::HashSet<BufId>,
    instrs: Vec<Instr>,
) -> Vec<Instr> {
    let mut out = Vec::with_capacity(instrs.len());
    let mut instrs = instrs.into_iter();
    let mut run: Vec<Instr> = Vec::new();
    // A gradient bucket's issue (the compute stream's event and what the
    // communication stream does behind it) met inside a run: it follows the
    // run's kernel, so where buckets go never changes what fuses.
    let mut deferred: Vec<Instr> = Vec::new();
    let mut shape = Loop::default();
    let flush_run = |buffers: &mut Vec<Buffer>,
                     run: &mut Vec<Instr>,
                     shape: &Loop,
                     out: &mut Vec<Instr>,
                     deferred: &mut Vec<Instr>| {
        flush(buffers, reads, viewed, run, shape, out);
        out.append(deferred);
    };
    while let Some(mut ins) = instrs.next() {
        if !run.is_empty() && (ins.stream == Stream::Comm || matches!(ins.kind, Kind::Record { .. })) {
            deferred.push(ins);
            continue;
        }
        if let Kind::SkipIfNonFinite { count } = &mut ins.kind {
            flush_run(buffers, &mut run, &shape, &mut out, &mut deferred);
            let guarded: Vec<Instr> = instrs.by_ref().take(*count as usize).collect();
            let fused = fuse_range(buffers, reads, viewed, guarded);
            *count = fused.len() as u32;
            out.push(ins);
            out.extend(fused);
            continue;
        }
        if let Some(expanded) = cross_entropy(buffers, &ins) {
            flush_run(buffers, &mut run, &shape, &mut out, &mut deferred);
            out.extend(expanded);
            continue;
        }
        match fusible(buffers, &ins) {
            Some(d) if run.is_empty() || d == shape => {
                shape = d;
                run.push(ins);
            }
            other => {
                flush_run(buffers, &mut run, &shape, &mut out, &mut deferred);
                match other {
                    Some(d) => {
                        shape = d;
                        run.push(ins);
                    }
                    None => out.push(ins),
                }
            }
        }
    }
    flush_run(buffers, &mut run, &shape, &mut out, &mut deferred);
    out
}

/// The index of buffer `b` among the kernel's inputs, added if new.
fn argument(b: BufId, inputs: &mut Vec<BufId>) -> usize {
    inputs.iter().position(|&x| x == b).unwrap_or_else(|| {
        inputs.push(b);
        inputs.len() - 1
    })
}

fn flush(
    buffers: &[Buffer],
    reads: &HashMap<BufId, usize>,
    viewed: &std::collections::HashSet<BufId>,
    run: &mut Vec<Instr>,
    shape: &Loop,
    out: &mut Vec<Instr>,
) {
    let group = std::mem::take(run);
    if group.is_empty() {
        return;
    }
    let dims = &shape.dims[..];
    let mut body: Vec<Expr> = Vec::new();
    let mut value: HashMap<BufId, usize> = HashMap::new();
    let mut inputs: Vec<BufId> = Vec::new();
    let mut inside: HashMap<BufId, usize> = HashMap::new();
    let mut ops = Vec::new();
    for ins in &group {
        let Kind::Op { op, rng, .. } = &ins.kind else { unreachable!("fusible instructions are ops") };
        ops.push(op.name().to_string());
        let mut x = Vec::with_capacity(ins.ins.len());
        for (i, &b) in operands(ins).iter().enumerate() {
            *inside.entry(b).or_default() += 1;
            if reads_whole(op, i) {
                x.push(argument(b, &mut inputs));
            } else if let Some(&v) = value.get(&b) {
                x.push(v);
            } else {
                body.push(Expr::Load { arg: argument(b, &mut inputs) });
                value.insert(b, body.len() - 1);
                x.push(body.len() - 1);
            }
        }
        let row = dims.last().map_or(1, |d| d.size);
        let mut v = expand(op, &x, *rng, row, &mut body).expect("fusible ops expand");
        if let Kind::Op { accumulate: true, .. } = ins.kind {
            // out += op(...), as the backend's add into the output does: the old value, then the sum.
            // (This read is not among the program's counted reads, so it is not counted inside either.)
            let b = ins.outs[0];
            let old = match value.get(&b) {
                Some(&old) => old,
                None => {
                    body.push(Expr::Load { arg: argument(b, &mut inputs) });
                    body.len() - 1
                }
            };
            body.push(Expr::Binary { op: crate::ir::BinaryOp::Add, a: old, b: v });
            v = body.len() - 1;
        }
        // The value the unfused op would store (bf16 under `precision = bf16`).
        let dtype = buffers[ins.outs[0].index()].ty.dtype;
        if dtype != crate::ir::DType::F32 {
            body.push(Expr::Round { x: v, dtype });
            v = body.len() - 1;
        }
        value.insert(ins.outs[0], v);
    }
    // What the rest of the program (or the next step) reads is stored, once, with its last value.
    let mut outputs: Vec<(BufId, usize)> = Vec::new();
    for ins in &group {
        let b = ins.outs[0];
        let later = reads.get(&b).copied().unwrap_or(0) > inside.get(&b).copied().unwrap_or(0);
        let persistent = buffers[b.index()].region != Region::Arena;
        if (later || persistent || viewed.contains(&b)) && !outputs.iter().any(|(o, _)| *o == b) {
            outputs.push((b, value[&b]));
        }
    }
    if outputs.is_empty() {
        out.extend(group);
        return;
    }
    // A ragged loop reads its bounds as one more input.
    let rows = shape.rows.map(|c| argument(c, &mut inputs));
    let n_in = inputs.len();
    let mut all: Vec<BufId> = inputs.clone();
    all.extend(outputs.iter().map(|(b, _)| *b));
    let kernel = Kernel {
        dims: dims.to_vec(),
        inputs: n_in,
        strides: all.iter().map(|b| strides(&buffers[b.index()].ty, dims)).collect(),
        body,
        stores: outputs.iter().enumerate().map(|(i, (_, v))| (n_in + i, *v)).collect(),
        ops,
        rows,
    };
    out.push(Instr {
        kind: Kind::Kernel { kernel },
        ins: inputs,
        outs: outputs.into_iter().map(|(b, _)| b).collect(),
        stream: Stream::Compute,
        origin: crate::lower::merge_origins(group.iter().flat_map(|i| &i.origin)),
    });
}

/// Cross-entropy (`cross_entropy`, `cross_entropy_grad`) as kernels and
/// sums, over new temporaries in `buffers`; `None` for another instruction,
/// or logits whose classes are not the innermost dim.
///
/// The loss: a row kernel over the logits writes each row's loss (and,
/// where a class id is ignored, whether the row counts) once per row; the
/// rows are summed; a scalar kernel divides by the rows that count. The
/// gradient: the count of kept rows first (where a class id is ignored),
/// then one row kernel over the logits.
fn cross_entropy(buffers: &mut Vec<Buffer>, ins: &Instr) -> Option<Vec<Instr>> {
    let Kind::Op { op, accumulate: false, rows: false, .. } = &ins.kind else { return None };
    let (smoothing, ignore, grad) = match op {
        Op::CrossEntropy { label_smoothing, ignore } => (*label_smoothing, *ignore, false),
        Op::CrossEntropyGrad { label_smoothing, ignore } => (*label_smoothing, *ignore, true),
        _ => return None,
    };
    let (&[x, t, ..], &[out]) = (&ins.ins[..], &ins.outs[..]) else { return None };
    let dims = buffers[x.index()].ty.dims.clone();
    let (class, rows) = dims.split_last()?;
    let o = &buffers[out.index()];
    let shaped = if grad { o.ty.dims == dims } else { o.ty.dims.is_empty() };
    if !buffers[x.index()].ty.dtype.is_float()
        || buffers[t.index()].ty.dims != rows
        || !o.ty.dtype.is_float()
        || o.view_of.is_some()
        || !shaped
    {
        return None;
    }
    let (c, n) = (class.size, rows.iter().map(|d| d.size).product::<u64>());
    let name = op.name();
    let mut made: Vec<Instr> = Vec::new();
    // With an ignored class id: each row's 1 or 0 (`kept`), and their sum, a scalar.
    let count = |buffers: &mut Vec<Buffer>, made: &mut Vec<Instr>, kept: BufId| -> BufId {
        let total = temp(buffers, &[]);
        made.push(sum_all(kept, total, rows));
        total
    };
    if grad {
        let mut args = vec![x, t, ins.ins[2]];
        let mut body = vec![Expr::Load { arg: 0 }, Expr::Load { arg: 1 }, Expr::Load { arg: 2 }];
        let counted = match ignore {
            Some(_) => {
                let kept = temp(buffers, rows);
                let mut k = vec![Expr::Load { arg: 0 }];
                let v = decompose::kept(0, ignore, &mut k).expect("an ignored class id");
                made.push(kernel(buffers, rows, &[t], &[kept], k, &[v], name));
                args.push(count(buffers, &mut made, kept));
                body.push(Expr::Load { arg: 3 });
                Ok(3)
            }
            None => Err(n),
        };
        let mut v = decompose::cross_entropy_grad(0, 1, 2, counted, smoothing, ignore, c, &mut body);
        let dtype = buffers[out.index()].ty.dtype;
        if dtype != DType::F32 {
            body.push(Expr::Round { x: v, dtype });
            v = body.len() - 1;
        }
        made.push(kernel(buffers, &dims, &args, &[out], body, &[v], name));
        return Some(with_origin(made, ins));
    }
    let losses = temp(buffers, rows);
    let mut outs = vec![losses];
    let mut body = vec![Expr::Load { arg: 0 }, Expr::Load { arg: 1 }];
    let (loss, keep) = decompose::cross_entropy_rows(0, 1, smoothing, ignore, c, &mut body);
    let mut values = vec![loss];
    if let Some(v) = keep {
        outs.push(temp(buffers, rows));
        values.push(v);
    }
    made.push(kernel(buffers, &dims, &[x, t], &outs, body, &values, name));
    let total = temp(buffers, &[]);
    made.push(sum_all(losses, total, rows));
    let mut args = vec![total];
    let mut body = vec![Expr::Load { arg: 0 }];
    let counted = match outs.get(1) {
        Some(&kept) => {
            args.push(count(buffers, &mut made, kept));
            body.push(Expr::Load { arg: 1 });
            Ok(1)
        }
        None => Err(n),
    };
    let mean = decompose::mean_of(0, counted, &mut body);
    made.push(kernel(buffers, &[], &args, &[out], body, &[mean], name));
    Some(with_origin(made, ins))
}

/// `made`, each with the origin of `from`, the instruction it expands.
fn with_origin(mut made: Vec<Instr>, from: &Instr) -> Vec<Instr> {
    for m in &mut made {
        m.origin = from.origin.clone();
    }
    made
}

/// A new f32 temporary over `dims` in the arena.
fn temp(buffers: &mut Vec<Buffer>, dims: &[Dim]) -> BufId {
    let ty = TensorType::new(DType::F32, dims.to_vec());
    buffers.push(Buffer { ty, region: Region::Arena, offset: 0, view_of: None, name: String::new() });
    BufId(buffers.len() as u32 - 1)
}

/// `to = Σ from` over all of `from`'s dims (`dims`).
fn sum_all(from: BufId, to: BufId, dims: &[Dim]) -> Instr {
    let op = Op::Reduce { op: ReduceOp::Sum, dims: dims.iter().map(|d| d.name.clone()).collect() };
    Instr::new(Kind::Op { op, rng: None, accumulate: false, rows: false }, vec![from], vec![to], Stream::Compute)
}

/// A kernel over `dims` reading `inputs` and storing `values` (body
/// indices) into `outputs`, in order, at their buffers' strides.
fn kernel(
    buffers: &[Buffer],
    dims: &[Dim],
    inputs: &[BufId],
    outputs: &[BufId],
    body: Vec<Expr>,
    values: &[usize],
    op: &str,
) -> Instr {
    let kernel = Kernel {
        dims: dims.to_vec(),
        inputs: inputs.len(),
        strides: inputs.iter().chain(outputs).map(|b| strides(&buffers[b.index()].ty, dims)).collect(),
        body,
        stores: values.iter().enumerate().map(|(i, &v)| (inputs.len() + i, v)).collect(),
        ops: vec![op.to_string()],
        rows: None,
    };
    Instr::new(Kind::Kernel { kernel }, inputs.to_vec(), outputs.to_vec(), Stream::Compute)
}
