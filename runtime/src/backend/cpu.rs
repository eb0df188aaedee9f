//! The CPU backend: the program's regions as f32 words in host memory, ops
//! run by the interpreter's kernels.
//!
//! An op reads its operands out of the arena into tensors, runs the same
//! kernel the node-by-node interpreter runs (`exec::Interpreter::eval_node`,
//! so both paths agree by construction), and writes (or, with
//! `accumulate`, adds) the result into its output's bytes. Token ids are
//! held as f32 values, as the interpreter holds them (exact below 2²⁴);
//! elements of other sizes than 4 bytes (a `bool` mask) are held as f32
//! values beside the regions.

use super::Backend;
use crate::comm::{self, RankComm};
use crate::exec::Interpreter;
use crate::tensor::Tensor;
use tessera_compiler::ir::{Graph, Node, Op, ReduceOp, ValueId};
use tessera_compiler::lower::{Buffer, Collective, Instr, Kind, Program, Region};

#[derive(Default)]
pub struct Cpu {
    regions: [Vec<f32>; 5],
    /// Buffers whose elements are not 4 bytes (a `bool` mask, `i64` ids):
    /// held as f32 values beside the regions, by (region, offset).
    other: std::collections::HashMap<(usize, u64), Vec<f32>>,
}

/// Whether the regions hold a buffer's elements (as f32 words).
fn in_regions(b: &Buffer) -> bool {
    b.ty.dtype.bytes() == 4
}

fn region_index(r: Region) -> usize {
    Region::ALL.iter().position(|&x| x == r).expect("a region")
}

fn range(b: &Buffer) -> std::ops::Range<usize> {
    let at = (b.offset / 4) as usize;
    at..at + b.ty.numel() as usize
}

impl Cpu {
    pub fn new() -> Cpu {
        Cpu::default()
    }

    fn slice(&self, b: &Buffer) -> &[f32] {
        if in_regions(b) {
            return &self.regions[region_index(b.region)][range(b)];
        }
        self.other.get(&(region_index(b.region), b.offset)).map(Vec::as_slice).unwrap_or(&[])
    }

    fn slice_mut(&mut self, b: &Buffer) -> &mut [f32] {
        if in_regions(b) {
            return &mut self.regions[region_index(b.region)][range(b)];
        }
        let n = b.ty.numel() as usize;
        self.other.entry((region_index(b.region), b.offset)).or_insert_with(|| vec![0f32; n])
    }

    /// Make room for an instruction's buffers of other element sizes.
    fn prepare<'b>(&mut self, bufs: impl IntoIterator<Item = &'b Buffer>) -> Result<(), String> {
        for b in bufs.into_iter().filter(|b| !in_regions(b)) {
            if b.view_of.is_some() {
                return Err(format!(
                    "the CPU backend holds {} values apart from the arena and cannot view them ({})",
                    b.ty.dtype.name(),
                    b.ty
                ));
            }
            self.slice_mut(b);
        }
        Ok(())
    }

    /// Fill `outs` in order from the flat elements of `data`.
    fn scatter(&mut self, outs: &[&Buffer], data: &[f32]) {
        let mut at = 0;
        for b in outs {
            let n = b.ty.numel() as usize;
            self.slice_mut(b).copy_from_slice(&data[at..at + n]);
            at += n;
        }
    }

    fn tensor(&self, b: &Buffer) -> Tensor<f32> {
        Tensor { dims: b.ty.dims.clone(), data: self.slice(b).to_vec() }
    }

    fn store(&mut self, b: &Buffer, t: &Tensor<f32>, accumulate: bool) -> Result<(), String> {
        if t.numel() as u64 != b.ty.numel() {
            return Err(format!("the kernel produced {} elements for a buffer of {}", t.numel(), b.ty));
        }
        let out = self.slice_mut(b);
        if accumulate {
            out.iter_mut().zip(&t.data).for_each(|(o, x)| *o += *x);
        } else {
            out.copy_from_slice(&t.data);
        }
        Ok(())
    }
}

/// The interpreter's evaluation of one op on operand tensors.
fn eval<'c>(
    op: &Op,
    ins: Vec<Tensor<f32>>,
    out: &Buffer,
    rng: Option<u64>,
    seed: u64,
    comm: Option<&'c RankComm<'c>>,
    attn: &mut std::collections::HashMap<Vec<ValueId>, Vec<Tensor<f32>>>,
) -> Result<Tensor<f32>, String> {
    static NO_GRAPH: std::sync::LazyLock<Graph> = std::sync::LazyLock::new(Graph::new);
    let interp = Interpreter { graph: &NO_GRAPH, params: &[], dropout: Some(seed), comm };
    let node = Node { op: op.clone(), inputs: (0..ins.len() as u32).map(ValueId).collect(), ty: out.ty.clone() };
    // The node's own index is the random stream of a dropout (and of attention's dropout).
    let at = rng.unwrap_or(0) as usize;
    interp.eval_node(&node, at, &ins, &[], &[], attn).map_err(|e| e.message)
}

/// Elements a kernel evaluates at once: each body value is a block of them.
const BLOCK: usize = 256;

impl Cpu {
    /// Run a fused kernel. The loop positions are split over the kernel
    /// threads; each evaluates the body one block of positions at a time
    /// (each value computed for the whole block before the next) while the
    /// regions are only read, and the stores are written after every thread
    /// is done, so an output may share an input's bytes. The scalar functions
    /// are the interpreter's own, so a fused kernel computes what its ops
    /// computed one by one.
    fn kernel(&mut self, k: &tessera_compiler::kernel::Kernel, args: &[&Buffer], seed: u64) -> Result<(), String> {
        let n = k.len() as usize;
        let stores = k.stores.len().max(1);
        // Position-major: the values stored at a position sit together.
        let mut results = vec![0f32; n * stores];
        let regions = &self.regions;
        crate::exec::fast::par_rows(&mut results, stores, |first, chunk| {
            eval_kernel(k, args, regions, seed, first, chunk);
        });
        for (si, &(arg, _)) in k.stores.iter().enumerate() {
            let dst = self.slice_mut(args[arg]);
            for (p, d) in dst.iter_mut().enumerate() {
                *d = results[p * stores + si];
            }
        }
        Ok(())
    }
}

/// Kernel `k` over loop positions `first ..`, one per `k.stores.len()` values of `out`.
fn eval_kernel(
    k: &tessera_compiler::kernel::Kernel,
    args: &[&Buffer],
    regions: &[Vec<f32>; 5],
    seed: u64,
    first: usize,
    out: &mut [f32],
) {
    use crate::exec::kernels::{gelu_dt_f32, gelu_f32, unary_df, unary_f, uniform};
    use tessera_compiler::ir::{BinaryOp, UnaryOp};
    use tessera_compiler::kernel::Expr;
    let stores = k.stores.len().max(1);
    let count = out.len() / stores;
    let rank = k.dims.len();
    let sizes: Vec<usize> = k.dims.iter().map(|d| d.size as usize).collect();
    // An argument whose strides are the loop's own row-major strides is read at the loop index.
    let mut dense = vec![1u64; rank];
    for i in (0..rank.saturating_sub(1)).rev() {
        dense[i] = dense[i + 1] * sizes[i + 1] as u64;
    }
    let contiguous: Vec<bool> = k.strides.iter().map(|s| *s == dense).collect();
    let data: Vec<&[f32]> = args.iter().map(|b| &regions[region_index(b.region)][range(b)]).collect();
    // The loop index of position `first`.
    let mut idx = vec![0usize; rank];
    let mut left = first;
    for d in (0..rank).rev() {
        idx[d] = left % sizes[d].max(1);
        left /= sizes[d].max(1);
    }
    let mut vals: Vec<[f32; BLOCK]> = vec![[0f32; BLOCK]; k.body.len()];
    let mut offsets = [0usize; BLOCK];
    let mut done_count = 0;
    while done_count < count {
        let start = first + done_count;
        let len = BLOCK.min(count - done_count);
        for (i, e) in k.body.iter().enumerate() {
            let (before, rest) = vals.split_at_mut(i);
            let o = &mut rest[0][..len];
            match *e {
                Expr::Load { arg } => {
                    if contiguous[arg] {
                        o.copy_from_slice(&data[arg][start..start + len]);
                    } else {
                        // The argument's offset at each position of the block.
                        let mut at = idx.clone();
                        for off in offsets[..len].iter_mut() {
                            *off = at.iter().zip(&k.strides[arg]).map(|(i, s)| i * *s as usize).sum();
                            for d in (0..rank).rev() {
                                at[d] += 1;
                                if at[d] < sizes[d] {
                                    break;
                                }
                                at[d] = 0;
                            }
                        }
                        for (v, &off) in o.iter_mut().zip(&offsets[..len]) {
                            *v = data[arg][off];
                        }
                    }
                }
                Expr::Const { value } => o.fill(value as f32),
                Expr::Unary { op: UnaryOp::Gelu, x } => {
                    o.iter_mut().zip(&before[x][..len]).for_each(|(o, v)| *o = gelu_f32(*v))
                }
                Expr::Unary { op, x } => {
                    o.iter_mut().zip(&before[x][..len]).for_each(|(o, v)| *o = unary_f(op, *v as f64) as f32)
                }
                Expr::UnaryGrad { op, x, g } => {
                    let (x, g) = (&before[x][..len], &before[g][..len]);
                    if op == UnaryOp::Gelu {
                        o.iter_mut().zip(x).zip(g).for_each(|((o, v), g)| *o = *g * gelu_dt_f32(*v));
                    } else {
                        o.iter_mut().zip(x).zip(g).for_each(|((o, v), g)| *o = *g * unary_df(op, *v as f64) as f32);
                    }
                }
                Expr::Binary { op, a, b } => {
                    let (a, b) = (&before[a][..len], &before[b][..len]);
                    let it = o.iter_mut().zip(a).zip(b);
                    match op {
                        BinaryOp::Add => it.for_each(|((o, x), y)| *o = *x + *y),
                        BinaryOp::Sub => it.for_each(|((o, x), y)| *o = *x - *y),
                        BinaryOp::Mul => it.for_each(|((o, x), y)| *o = *x * *y),
                        BinaryOp::Div => it.for_each(|((o, x), y)| *o = *x / *y),
                    }
                }
                Expr::Pow { x, exp } => {
                    let e = exp as f32;
                    o.iter_mut().zip(&before[x][..len]).for_each(|(o, v)| *o = v.powf(e));
                }
                Expr::Dropout { x, p, rng } => {
                    let scale = (1.0 / (1.0 - p)) as f32;
                    for (j, (o, v)) in o.iter_mut().zip(&before[x][..len]).enumerate() {
                        *o = if uniform(seed, rng, (start + j) as u64) < p { 0.0 } else { *v * scale };
                    }
                }
            }
        }
        for (si, &(_, v)) in k.stores.iter().enumerate() {
            for j in 0..len {
                out[(done_count + j) * stores + si] = vals[v][j];
            }
        }
        // The loop index of the next block's first position.
        let mut carry = len;
        for d in (0..rank).rev() {
            let total = idx[d] + carry;
            idx[d] = total % sizes[d].max(1);
            carry = total / sizes[d].max(1);
        }
        done_count += len;
    }
}

impl Backend for Cpu {
    fn alloc(&mut self, sizes: [u64; 5]) -> Result<(), String> {
        for (r, &n) in self.regions.iter_mut().zip(&sizes) {
            *r = vec![0f32; (n / 4) as usize];
        }
        Ok(())
    }

    fn upload(&mut self, buf: &Buffer, data: &[f32]) -> Result<(), String> {
        if data.len() as u64 != buf.ty.numel() {
            return Err(format!("{} elements for `{}` of type {}", data.len(), buf.name, buf.ty));
        }
        self.prepare([buf])?;
        self.slice_mut(buf).copy_from_slice(data);
        Ok(())
    }

    fn download(&self, buf: &Buffer) -> Result<Vec<f32>, String> {
        Ok(self.slice(buf).to_vec())
    }

    fn execute<'c>(
        &mut self,
        p: &Program,
        ins: &Instr,
        comm: Option<&'c RankComm<'c>>,
        seed: u64,
    ) -> Result<(), String> {
        let buf = |b: &tessera_compiler::lower::BufId| p.buffer(*b);
        self.prepare(ins.ins.iter().chain(&ins.outs).map(buf))?;
        match &ins.kind {
            Kind::Op { op, rng, accumulate } => {
                let args: Vec<Tensor<f32>> = ins.ins.iter().map(|b| self.tensor(buf(b))).collect();
                let out = buf(&ins.outs[0]);
                let mut cache = Default::default();
                let t = eval(op, args, out, *rng, seed, comm, &mut cache)?;
                self.store(out, &t, *accumulate)
            }
            Kind::AttentionGrads { op, which, rng } => {
                let args: Vec<Tensor<f32>> = ins.ins.iter().map(|b| self.tensor(buf(b))).collect();
                let key: Vec<ValueId> = (0..args.len() as u32).map(ValueId).collect();
                let mut cache = std::collections::HashMap::new();
                let first = eval(op, args, buf(&ins.outs[0]), *rng, seed, comm, &mut cache)?;
                self.store(buf(&ins.outs[0]), &first, false)?;
                let rest = cache.get_mut(&key).ok_or("attention's backward pass kept no gradients")?;
                for (w, o) in which.iter().zip(&ins.outs).skip(1) {
                    let t = std::mem::take(&mut rest[*w as usize]);
                    self.store(buf(o), &t, false)?;
                }
                Ok(())
            }
            Kind::Kernel { kernel } => {
                let args: Vec<&Buffer> = ins.ins.iter().chain(&ins.outs).map(buf).collect();
                self.kernel(kernel, &args, seed)
            }
            Kind::Accumulate | Kind::Copy | Kind::Scale { .. } => {
                let x = self.slice(buf(&ins.ins[0])).to_vec();
                let out = self.slice_mut(buf(&ins.outs[0]));
                match ins.kind {
                    Kind::Accumulate => out.iter_mut().zip(&x).for_each(|(o, v)| *o += *v),
                    Kind::Copy => out.copy_from_slice(&x),
                    Kind::Scale { factor } => {
                        let f = factor as f32;
                        out.iter_mut().zip(&x).for_each(|(o, v)| *o = *v * f);
                    }
                    _ => unreachable!("matched above"),
                }
                Ok(())
            }
            Kind::Zero => {
                for b in &ins.outs {
                    self.slice_mut(buf(b)).fill(0.0);
                }
                Ok(())
            }
            Kind::FlatShard { parts, part } => {
                let x = self.slice(buf(&ins.ins[0])).to_vec();
                let per = x.len().div_ceil(*parts as usize);
                let at = *part as usize * per;
                for (i, o) in self.slice_mut(buf(&ins.outs[0])).iter_mut().enumerate() {
                    *o = x.get(at + i).copied().unwrap_or(0.0);
                }
                Ok(())
            }
            Kind::SumSquares => {
                for (i, o) in ins.ins.iter().zip(&ins.outs) {
                    let s: f64 = self.slice(buf(i)).iter().map(|&x| (x as f64) * (x as f64)).sum();
                    self.slice_mut(buf(o))[0] = s as f32;
                }
                Ok(())
            }
            Kind::AddScalars => {
                let s: f64 = ins.ins.iter().map(|b| self.slice(buf(b))[0] as f64).sum();
                self.slice_mut(buf(&ins.outs[0]))[0] = s as f32;
                Ok(())
            }
            Kind::Collective { axis, op } => {
                let c = comm.ok_or("a collective needs the rank's communicator")?;
                let input: Vec<f32> = ins.ins.iter().flat_map(|b| self.slice(buf(b)).iter().copied()).collect();
                match op {
                    Collective::AllReduce { op } => {
                        let op = match op {
                            ReduceOp::Sum => comm::ReduceOp::Sum,
                            ReduceOp::Mean => comm::ReduceOp::Mean,
                            ReduceOp::Max => comm::ReduceOp::Max,
                        };
                        let mut data = input;
                        c.with("bucket_all_reduce", axis, |c, g| c.all_reduce(g, &mut data, op))
                            .map_err(|e| e.to_string())?;
                        let outs: Vec<&Buffer> = ins.outs.iter().map(buf).collect();
                        self.scatter(&outs, &data);
                    }
                    Collective::ReduceScatter => {
                        // Each input's flat elements, padded to the group size, in rank-chunk order.
                        let n = c.group(axis).map_err(|e| e.to_string())?.ranks.len();
                        let mut send = Vec::new();
                        for r in 0..n {
                            for (i, o) in ins.ins.iter().zip(&ins.outs) {
                                let x = self.slice(buf(i));
                                let per = buf(o).ty.numel() as usize;
                                send.extend((r * per..(r + 1) * per).map(|j| x.get(j).copied().unwrap_or(0.0)));
                            }
                        }
                        let mut out = vec![0f32; send.len() / n];
                        c.with("bucket_reduce_scatter", axis, |c, g| {
                            c.reduce_scatter(g, &send, &mut out, comm::ReduceOp::Sum)
                        })
                        .map_err(|e| e.to_string())?;
                        let outs: Vec<&Buffer> = ins.outs.iter().map(buf).collect();
                        self.scatter(&outs, &out);
                    }
                    Collective::AllGather => {
                        let n = c.group(axis).map_err(|e| e.to_string())?.ranks.len();
                        let mut out = vec![0f32; input.len() * n];
                        c.with("bucket_all_gather", axis, |c, g| c.all_gather(g, &input, &mut out))
                            .map_err(|e| e.to_string())?;
                        // Output i is input i of every member, in group order.
                        let sizes: Vec<usize> = ins.ins.iter().map(|b| buf(b).ty.numel() as usize).collect();
                        for (k, o) in ins.outs.iter().enumerate() {
                            let before: usize = sizes[..k].iter().sum();
                            let mut whole = Vec::with_capacity(sizes[k] * n);
                            for member in out.chunks(input.len().max(1)) {
                                whole.extend_from_slice(&member[before..before + sizes[k]]);
                            }
                            let dst = self.slice_mut(buf(o));
                            let m = dst.len().min(whole.len());
                            dst[..m].copy_from_slice(&whole[..m]);
                        }
                    }
                }
                Ok(())
            }
            Kind::Send { peer, tag } => {
                let c = comm.ok_or("a send needs the rank's communicator")?;
                let data: Vec<f32> = ins.ins.iter().flat_map(|b| self.slice(buf(b)).iter().copied()).collect();
                c.comm().send(*peer as usize, *tag, &data).map_err(|e| e.to_string())
            }
            Kind::Recv { peer, tag } => {
                let c = comm.ok_or("a receive needs the rank's communicator")?;
                let n: usize = ins.outs.iter().map(|b| buf(b).ty.numel() as usize).sum();
                let mut data = vec![0f32; n];
                c.comm().recv(*peer as usize, *tag, &mut data).map_err(|e| e.to_string())?;
                let outs: Vec<&Buffer> = ins.outs.iter().map(buf).collect();
                self.scatter(&outs, &data);
                Ok(())
            }
            // Both streams are program order on the CPU: events order nothing further.
            Kind::Record { .. } | Kind::Wait { .. } => Ok(()),
            Kind::SkipIfNonFinite { .. } => Err("the guard is decided by `backend::run`".into()),
        }
    }
}
