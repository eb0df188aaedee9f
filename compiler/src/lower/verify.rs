//! The lowered program's verifier.
//!
//! - every buffer lies inside its region, a view inside what it views, in the same region;
//! - every instruction names buffers that exist, in the number its kind
//!   takes, of the types its rule derives (an IR op by the IR verifier's
//!   own rule, [`crate::ir::check_op`]);
//! - no temporary is read before it is written, and no two temporaries
//!   whose lives overlap share a byte of the arena;
//! - a `wait` names an event recorded before it, and a guard skips
//!   instructions that exist;
//! - the communication stream runs collectives and events only, and each
//!   of its collectives is joined by a compute `wait`; from the compute
//!   event it waits for to that join the two streams run at the same time,
//!   so no compute instruction there writes the collective's buffers or
//!   reads its outputs.

use super::{BufId, Buffer, Collective, Instr, Kind, Program, Region, Stream};
use crate::ir::{DType, Dim, Op, TensorType};

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("program of rank {rank}: {what}: {message}")]
pub struct VerifyError {
    pub rank: u64,
    /// The instruction (`instruction 12: matmul`) or buffer (`b3`) at fault.
    pub what: String,
    pub message: String,
}

pub fn verify(p: &Program) -> Result<(), VerifyError> {
    let fail = |what: String, message: String| VerifyError { rank: p.rank, what, message };
    let nb = p.buffers.len();
    // Temporaries no instruction names (a fused kernel's intermediates) take no bytes.
    let mut named = vec![false; nb];
    for ins in &p.instrs {
        for b in ins.ins.iter().chain(&ins.outs).filter(|b| b.index() < nb) {
            // The root, following only views declared before (a malformed view is reported below).
            let mut r = b.index();
            while let Some(v) = p.buffers[r].view_of.filter(|v| v.index() < r) {
                r = v.index();
            }
            named[r] = true;
        }
    }
    for (i, b) in p.buffers.iter().enumerate() {
        let what = || format!("b{i}");
        if b.region == Region::Arena && b.view_of.is_none() && !named[i] {
            continue;
        }
        let end = b.offset + b.ty.bytes();
        match b.view_of {
            Some(v) => {
                if v.index() >= i {
                    return Err(fail(what(), format!("views {v}, which is not declared before it")));
                }
                let of = &p.buffers[v.index()];
                if of.region != b.region {
                    return Err(fail(
                        what(),
                        format!("is in {} but views {v} in {}", b.region.name(), of.region.name()),
                    ));
                }
                if b.offset < of.offset || end > of.offset + of.ty.bytes() {
                    return Err(fail(
                        what(),
                        format!(
                            "bytes {}..{end} fall outside {v}'s {}..{}",
                            b.offset,
                            of.offset,
                            of.offset + of.ty.bytes()
                        ),
                    ));
                }
            }
            None if end > p.region_bytes(b.region) => {
                return Err(fail(
                    what(),
                    format!(
                        "bytes {}..{end} fall outside the {} region of {} bytes",
                        b.offset,
                        b.region.name(),
                        p.region_bytes(b.region)
                    ),
                ));
            }
            None => {}
        }
    }
    let mut recorded = std::collections::HashSet::new();
    for (i, ins) in p.instrs.iter().enumerate() {
        let what = || format!("instruction {i}: {}", ins.kind.name());
        for b in ins.ins.iter().chain(&ins.outs) {
            if b.index() >= nb {
                return Err(fail(what(), format!("{b} is not a buffer")));
            }
        }
        check(p, ins, &mut recorded).map_err(|m| fail(what(), m))?;
        if let Kind::SkipIfNonFinite { count } = ins.kind {
            if i + count as usize >= p.instrs.len() {
                return Err(fail(what(), format!("skips {count} instructions, past the end of the program")));
            }
            if let Some(ph) = p.phases.iter().find(|ph| (i + 1..=i + count as usize).contains(&(ph.at as usize))) {
                return Err(fail(what(), format!("guards instructions of two phases (`{}` starts inside)", ph.name)));
            }
        }
    }
    for (k, ph) in p.phases.iter().enumerate() {
        let after = k == 0 || p.phases[k - 1].at < ph.at;
        if !after || ph.at as usize >= p.instrs.len() {
            return Err(fail(
                format!("phase `{}`", ph.name),
                format!("starts at instruction {}: phases start in order, each at an instruction", ph.at),
            ));
        }
    }
    streams(p).map_err(|(i, m)| fail(format!("instruction {i}: {}", p.instrs[i].kind.name()), m))?;
    liveness(p).map_err(|(i, m)| fail(format!("instruction {i}: {}", p.instrs[i].kind.name()), m))
}

/// The two streams: see the module's rules.
fn streams(p: &Program) -> Result<(), (usize, String)> {
    // Where each event is recorded, and on which stream.
    let mut record: std::collections::HashMap<u32, (usize, Stream)> = std::collections::HashMap::new();
    for (i, ins) in p.instrs.iter().enumerate() {
        if let Kind::Record { event } = ins.kind {
            record.insert(event, (i, ins.stream));
        }
    }
    let touch = |a: &Buffer, b: &Buffer| {
        a.region == b.region && a.offset < b.offset + b.ty.bytes() && b.offset < a.offset + a.ty.bytes()
    };
    // The compute event the communication stream waited for last.
    let mut fence: Option<usize> = None;
    // The stream's calls so far: (instruction, its join).
    let mut calls: Vec<(usize, usize)> = Vec::new();
    for (i, ins) in p.instrs.iter().enumerate() {
        if ins.stream != Stream::Comm {
            continue;
        }
        match ins.kind {
            Kind::Record { .. } => {}
            Kind::Wait { event } => {
                if let Some(&(r, Stream::Compute)) = record.get(&event) {
                    fence = fence.max(Some(r));
                }
            }
            Kind::Collective { .. } => {
                let joined = |j: usize| match p.instrs[j].kind {
                    Kind::Wait { event } if p.instrs[j].stream == Stream::Compute => {
                        record.get(&event).is_some_and(|&(r, s)| s == Stream::Comm && r > i)
                    }
                    _ => false,
                };
                let Some(join) = (i + 1..p.instrs.len()).find(|&j| joined(j)) else {
                    return Err((
                        i,
                        "is never joined: the compute stream waits for no event the communication stream records \
                         after it"
                            .into(),
                    ));
                };
                // A call reads an earlier call's output not joined yet whole
                // or not at all (a backend that stages values forwards buffers).
                for &(c, _) in calls.iter().filter(|&&(_, j)| j > i) {
                    for b in &ins.ins {
                        let part = p.instrs[c].outs.iter().find(|o| *o != b && touch(p.buffer(**o), p.buffer(*b)));
                        if let Some(o) = part {
                            return Err((
                                i,
                                format!(
                                    "reads `{}`, which shares bytes with, but is not, `{}` that instruction {c} on \
                                     the same stream writes",
                                    p.buffer(*b).name,
                                    p.buffer(*o).name
                                ),
                            ));
                        }
                    }
                }
                calls.push((i, join));
                let from = fence.map_or(0, |r| r + 1);
                let ours: Vec<(&Buffer, bool)> = ins
                    .ins
                    .iter()
                    .map(|b| (p.buffer(*b), false))
                    .chain(ins.outs.iter().map(|b| (p.buffer(*b), true)))
                    .collect();
                for (k, other) in p.instrs.iter().enumerate().take(join).skip(from) {
                    if other.stream != Stream::Compute {
                        continue;
                    }
                    let writes = other.outs.iter().map(|b| (b, true));
                    for (b, write) in other.ins.iter().map(|b| (b, false)).chain(writes) {
                        let theirs = p.buffer(*b);
                        if let Some((mine, _)) = ours.iter().find(|(m, out)| (write || *out) && touch(m, theirs)) {
                            return Err((
                                k,
                                format!(
                                    "{} `{}` while the communication stream's `{}` (instruction {i}) uses `{}`: \
                                     from the compute event it waits for to the compute stream's join (instruction \
                                     {join}) the streams run at the same time",
                                    if write { "writes" } else { "reads" },
                                    theirs.name,
                                    ins.kind.name(),
                                    mine.name
                                ),
                            ));
                        }
                    }
                }
            }
            _ => return Err((i, "is on the communication stream, which runs collectives and events only".into())),
        }
    }
    Ok(())
}

/// The IR's type rule for `op`, on buffers that may store floating values
/// in any floating dtype (an op computes in f32 and stores its result in
/// its buffer's dtype, `train.precision`): the dims must be the rule's, and
/// a floating value floating.
fn check_stored(op: &Op, ins: &[&TensorType], out: &TensorType) -> Result<(), String> {
    let wide = |t: &TensorType| {
        let mut t = t.clone();
        if t.dtype.is_float() {
            t.dtype = DType::F32;
        }
        t
    };
    let tys: Vec<TensorType> = ins.iter().map(|t| wide(t)).collect();
    let refs: Vec<&TensorType> = tys.iter().collect();
    let op = match op {
        Op::Cast { dtype } if dtype.is_float() => Op::Cast { dtype: DType::F32 },
        other => other.clone(),
    };
    crate::ir::check_op(&op, &refs, &wide(out))
}

fn check(p: &Program, ins: &Instr, recorded: &mut std::collections::HashSet<u32>) -> Result<(), String> {
    let ty = |b: &BufId| &p.buffer(*b).ty;
    let count = |n_in: usize, n_out: usize| {
        if ins.ins.len() == n_in && ins.outs.len() == n_out {
            Ok(())
        } else {
            Err(format!("takes {n_in} inputs and {n_out} outputs, has {} and {}", ins.ins.len(), ins.outs.len()))
        }
    };
    let same_numel = |a: &BufId, b: &BufId| {
        if ty(a).numel() == ty(b).numel() {
            Ok(())
        } else {
            Err(format!("{a} has {} elements, {b} has {}", ty(a).numel(), ty(b).numel()))
        }
    };
    let scalar = |b: &BufId| {
        if ty(b).numel() == 1 && ty(b).dtype == DType::F32 {
            Ok(())
        } else {
            Err(format!("{b} is {}, not an f32 scalar", ty(b)))
        }
    };
    match &ins.kind {
        Kind::Op { op, rows, .. } => {
            if ins.outs.len() != 1 {
                return Err(format!("an op writes one buffer, this names {}", ins.outs.len()));
            }
            let mut tys: Vec<&TensorType> = ins.ins.iter().map(ty).collect();
            if *rows {
                let counts = tys.pop().ok_or("an op over filled slots without its counts")?;
                if counts.dtype != DType::I32 || counts.dims.len() != 1 {
                    return Err(format!("filled-slot counts are i32[expert], not {counts}"));
                }
            }
            check_stored(op, &tys, ty(&ins.outs[0]))
        }
        Kind::SlotCounts { .. } => {
            count(1, 1)?;
            let (gates, out) = (ty(&ins.ins[0]), ty(&ins.outs[0]));
            if out.dtype != DType::I32 || out.dims.len() != 1 || gates.dims.last() != out.dims.first() {
                return Err(format!("counts of gates {gates} are i32[expert] over their last dim, not {out}"));
            }
            Ok(())
        }
        Kind::AttentionGrads { op, which, .. } => {
            let Op::AttentionGrad { .. } = op else { return Err("names an op that is not attention_grad".into()) };
            if which.len() != ins.outs.len() || which.is_empty() {
                return Err(format!("names {} gradients for {} outputs", which.len(), ins.outs.len()));
            }
            // Each gradient has its operand's type, by the IR verifier's rule.
            let tys: Vec<&TensorType> = ins.ins.iter().map(ty).collect();
            for (w, o) in which.iter().zip(&ins.outs) {
                let mut one = op.clone();
                if let Op::AttentionGrad { which, .. } = &mut one {
                    *which = *w;
                }
                check_stored(&one, &tys, ty(o)).map_err(|m| format!("gradient {w}: {m}"))?;
            }
            Ok(())
        }
        Kind::Kernel { kernel } => {
            kernel.check()?;
            count(kernel.inputs, kernel.strides.len() - kernel.inputs)?;
            for (i, b) in ins.ins.iter().chain(&ins.outs).enumerate() {
                let t = ty(b);
                if kernel.rows == Some(i) {
                    if t.dtype != DType::I32 || t.dims.first() != kernel.dims.first() || t.dims.len() != 1 {
                        return Err(format!("the row bounds {b} are {t}, not i32 over the outer loop dim"));
                    }
                    continue;
                }
                // An input may hold integers (class ids: loaded as their f32 values, exact below 2²⁴).
                let integer = i < kernel.inputs && matches!(t.dtype, DType::I32);
                if !t.dtype.is_float() && !integer {
                    return Err(format!(
                        "argument {i} ({b}) is {t}: kernels load floating values and class ids, and store floating values"
                    ));
                }
                // The last element any loop position touches lies inside the buffer.
                let last: u64 =
                    kernel.dims.iter().zip(&kernel.strides[i]).map(|(d, s)| d.size.saturating_sub(1) * s).sum();
                if !kernel.is_empty() && last >= t.numel() {
                    return Err(format!("argument {i} ({b}, {t}) is read past its end"));
                }
            }
            for e in &kernel.body {
                if let crate::kernel::Expr::Element { arg, index } = *e
                    && index >= ty(&ins.ins[arg]).numel()
                {
                    return Err(format!("element {index} of argument {arg} ({}) is past its end", ins.ins[arg]));
                }
            }
            for (j, b) in ins.outs.iter().enumerate() {
                // Over the loop nest, or one value per row (the nest without its innermost dim).
                let per_row = kernel.dims.split_last().is_some_and(|(_, outer)| ty(b).dims == outer)
                    && kernel.strides[kernel.inputs + j].last() == Some(&0);
                if ty(b).dims != kernel.dims && !per_row {
                    return Err(format!("output {b} is {}, the loop nest is over {:?}", ty(b), kernel.dims));
                }
            }
            Ok(())
        }
        Kind::Accumulate | Kind::Copy | Kind::Scale { .. } => {
            count(1, 1)?;
            same_numel(&ins.ins[0], &ins.outs[0])
        }
        Kind::Zero => {
            if ins.ins.is_empty() && !ins.outs.is_empty() {
                Ok(())
            } else {
                Err("zero writes its outputs and reads nothing".into())
            }
        }
        Kind::FlatShard { parts, part } => {
            count(1, 1)?;
            if part >= parts {
                return Err(format!("part {part} of {parts}"));
            }
            let want = ty(&ins.ins[0]).numel().div_ceil(*parts);
            if ty(&ins.outs[0]).numel() != want {
                return Err(format!(
                    "a shard of {} elements is {want}, {} has {}",
                    ty(&ins.ins[0]).numel(),
                    ins.outs[0],
                    ty(&ins.outs[0]).numel()
                ));
            }
            Ok(())
        }
        Kind::SumSquares => {
            count(ins.outs.len(), ins.outs.len())?;
            ins.outs.iter().try_for_each(scalar)
        }
        Kind::AddScalars => {
            count(ins.ins.len(), 1)?;
            ins.ins.iter().chain(&ins.outs).try_for_each(scalar)
        }
        Kind::Collective { op, .. } => {
            count(ins.ins.len(), ins.ins.len())?;
            for (a, b) in ins.ins.iter().zip(&ins.outs) {
                let (x, y) = (ty(a).numel(), ty(b).numel());
                let ok = match op {
                    Collective::AllReduce { .. } => x == y,
                    Collective::AllGather => x > 0 && y % x == 0,
                    Collective::ReduceScatter => y > 0 && x.div_ceil(y) <= x.max(1) && y <= x.max(1),
                };
                if !ok {
                    return Err(format!("{a} ({x} elements) and {b} ({y}) do not fit `{}`", ins.kind.name()));
                }
            }
            Ok(())
        }
        Kind::Send { .. } => count(ins.ins.len().max(1), 0),
        Kind::Recv { .. } => count(0, ins.outs.len().max(1)),
        Kind::Record { event } => {
            count(0, 0)?;
            recorded.insert(*event);
            Ok(())
        }
        Kind::Wait { event } => {
            count(0, 0)?;
            if recorded.contains(event) {
                Ok(())
            } else {
                Err(format!("waits for event {event}, never recorded before it"))
            }
        }
        Kind::SkipIfNonFinite { .. } => {
            count(1, 0)?;
            scalar(&ins.ins[0])
        }
        Kind::RowsAt { dim } => {
            count(2, 1)?;
            let batch = positions_of(ty(&ins.ins[1]), &ins.ins[1])?;
            let out = ty(&ins.outs[0]);
            let rows = TensorType { dims: out.dims.iter().skip(1).cloned().collect(), ..out.clone() };
            if out.dims.first() != Some(batch) {
                return Err(format!("the rows {out} of each sequence do not lead with the batch dim `{}`", batch.name));
            }
            let table = ty(&ins.ins[0]);
            let names = |t: &TensorType| t.dims.iter().map(|d| d.name.clone()).collect::<Vec<_>>();
            if names(&rows) != names(table)
                || rows.dtype != table.dtype
                || rows.dims.iter().zip(&table.dims).any(|(a, b)| a.name != *dim && a.size != b.size)
            {
                return Err(format!("{out} is not a batch of rows of {table} along `{dim}`"));
            }
            Ok(())
        }
        Kind::CacheWrite { dim } => {
            count(3, 1)?;
            let batch = positions_of(ty(&ins.ins[1]), &ins.ins[1])?;
            block_table(ty(&ins.ins[2]), &ins.ins[2], batch)?;
            let (x, pool) = (ty(&ins.ins[0]), ty(&ins.outs[0]));
            paged(x, pool, dim, batch)
        }
        Kind::At { op, dim } => {
            if ins.outs.len() != 1 || ins.ins.len() < 2 {
                return Err("an op at a position reads its operands and the position, and writes one buffer".into());
            }
            let out = ty(&ins.outs[0]);
            match op {
                Op::Attention { causal: true, mask: false, rel: crate::ir::RelPos::None, .. } => {
                    let [q, kc, vc, pos, blocks] = ins.ins[..] else {
                        return Err(
                            "attention at positions reads q, the k and v caches, the positions and the block tables"
                                .into(),
                        );
                    };
                    let batch = positions_of(ty(&pos), &pos)?;
                    let table = block_table(ty(&blocks), &blocks, batch)?;
                    let q = ty(&q);
                    // Each pool as the keys or values of the whole batch (the positions a table reaches).
                    let mut whole = Vec::new();
                    for c in [kc, vc] {
                        let pool = ty(&c);
                        let block = pool.dim(dim).map_or(0, |d| d.size);
                        let mut w = pool.clone();
                        w.dims[0] = batch.clone();
                        w.dims.iter_mut().filter(|d| d.name == *dim).for_each(|d| d.size = block * table.size);
                        let (qn, wn) = (q.dim(dim).map(|d| d.size), w.dim(dim).map(|d| d.size));
                        if qn.is_none() || wn.is_none() || qn > wn {
                            return Err(format!(
                                "the queries {q} sit on `{dim}` of the cache {pool}, whose block tables reach fewer positions"
                            ));
                        }
                        whole.push(w);
                    }
                    if q.dims.first() != Some(batch) {
                        return Err(format!("the queries {q} do not lead with the batch dim `{}`", batch.name));
                    }
                    check_stored(op, &[q, &whole[0], &whole[1]], out)
                }
                Op::Rope { .. } => {
                    count(2, 1)?;
                    let batch = positions_of(ty(&ins.ins[1]), &ins.ins[1])?;
                    let x = ty(&ins.ins[0]);
                    if x.dims.first() != Some(batch) {
                        return Err(format!("{x} does not lead with the batch dim `{}` of its positions", batch.name));
                    }
                    check_stored(op, &[x], out)
                }
                _ => Err(format!("`{}` does not run at a position (attention and rope do)", op.name())),
            }
        }
    }
}

/// `b` is the run-time positions of a batch: an `i32[batch]`; its dim.
fn positions_of<'t>(t: &'t TensorType, b: &BufId) -> Result<&'t Dim, String> {
    match &t.dims[..] {
        [batch] if t.dtype == DType::I32 => Ok(batch),
        _ => Err(format!("the positions {b} are {t}, not an i32[batch]")),
    }
}

/// `b` is the block tables of `batch`: an `i32[batch, kv_table]`; the table's dim.
fn block_table<'t>(t: &'t TensorType, b: &BufId, batch: &Dim) -> Result<&'t Dim, String> {
    match &t.dims[..] {
        [n, table] if t.dtype == DType::I32 && n == batch => Ok(table),
        _ => Err(format!("the block tables {b} are {t}, not an i32[{}, kv_table]", batch.name)),
    }
}

/// `x` (`[batch, .., dim = n, ..]`) goes into the paged cache `pool`
/// (`[kv_block, .., dim = block, ..]`): the same dtype and other dims.
fn paged(x: &TensorType, pool: &TensorType, dim: &str, batch: &Dim) -> Result<(), String> {
    let fits = x.dims.first() == Some(batch)
        && x.dims.len() == pool.dims.len()
        && x.dtype == pool.dtype
        && x.has(dim)
        && x.dims.iter().zip(&pool.dims).skip(1).all(|(a, b)| a.name == b.name && (a.name == dim || a.size == b.size));
    if fits { Ok(()) } else { Err(format!("{x} does not go into the paged cache {pool} along `{dim}`")) }
}

/// Temporaries: written before they are read, and disjoint while both live.
fn liveness(p: &Program) -> Result<(), (usize, String)> {
    let nb = p.buffers.len();
    let mut written = vec![false; nb];
    let mut first = vec![usize::MAX; nb];
    let mut last = vec![0usize; nb];
    for (i, ins) in p.instrs.iter().enumerate() {
        for b in &ins.ins {
            let r = p.root(*b).index();
            if p.buffers[r].region == Region::Arena && !written[r] {
                // Accumulate and scale read their output too; only a read of never-written bytes is wrong.
                return Err((i, format!("reads {b} before anything writes it")));
            }
        }
        for b in ins.ins.iter().chain(&ins.outs) {
            let r = p.root(*b).index();
            first[r] = first[r].min(i);
            last[r] = last[r].max(i);
        }
        for b in &ins.outs {
            let r = p.root(*b).index();
            if matches!(ins.kind, Kind::Accumulate) && p.buffers[r].region == Region::Arena && !written[r] {
                return Err((i, format!("accumulates into {b} before anything writes it")));
            }
            written[r] = true;
        }
    }
    // Sweep the temporaries in order of their first use; compare each with those still live.
    let mut roots: Vec<usize> = (0..nb)
        .filter(|&b| p.buffers[b].region == Region::Arena && p.buffers[b].view_of.is_none() && first[b] != usize::MAX)
        .collect();
    roots.sort_by_key(|&b| first[b]);
    let mut live: Vec<usize> = Vec::new();
    for &b in &roots {
        live.retain(|&o| last[o] >= first[b]);
        let (s, e) = (p.buffers[b].offset, p.buffers[b].offset + p.buffers[b].ty.bytes());
        for &o in &live {
            let (os, oe) = (p.buffers[o].offset, p.buffers[o].offset + p.buffers[o].ty.bytes());
            if s < oe && os < e {
                return Err((
                    first[b],
                    format!("b{b} (arena {s}..{e}) overlaps b{o} (arena {os}..{oe}), which is still live"),
                ));
            }
        }
        live.push(b);
    }
    Ok(())
}
