//! The CPU backend: the program's regions in host memory.
//!
//! - Fused kernels run on the regions themselves, their loop positions split
//!   over the kernel threads, either compiled to native code by the
//!   cranelift JIT (`jit`) or walked by the kernel-IR interpreter (`interp`):
//!   [`Engine`], `--backend jit|interp`. Both compute the same bits.
//! - Contractions (`matmul`, `einsum`) run as strided batched GEMMs (the
//!   `gemm` crate) straight on the regions, accumulating in place where the
//!   program says so.
//! - Attention, the norms and their gradients, sums over a contiguous run of
//!   dims, contiguous takes and untakes, cross-entropy and its gradient, MoE
//!   dispatch and combine and their gradients, the step's copies, scalings
//!   and sums of squares read their operands where they lie, with the
//!   interpreter's own row functions and orders of summation (so the same bits).
//! - Other ops (gathers, routing, the vocabulary-parallel ops) read their
//!   operands out of the arena into tensors, run the node-by-node
//!   interpreter's kernel (`exec::Interpreter::eval_node`, so both paths
//!   agree by construction) and write (or add) the result into their
//!   output's bytes.
//!
//! Every buffer's bytes hold its elements in its own dtype: f32, bf16
//! (`precision = bf16`), i32 token ids and counts, an i64, a `bool` mask.
//! The kernels above compute on f32 words, so an instruction that touches a
//! buffer of another dtype is *staged*: that buffer is decoded into an f32
//! shadow past the arena (exact: bf16, f16 and integers below 2²⁴), the
//! instruction runs on the shadows by the f32 paths above, and each such
//! output is encoded back (floats rounded to nearest, ties to even). Every
//! op thus computes in f32 from bf16 operands and rounds what it stores, as
//! a GPU's bf16 kernels with f32 accumulation do; the shadows cost one
//! instruction's operands in f32, on top of an arena half the size.

use super::{Backend, interp, jit, native, rows};
use crate::comm::RankComm;
use crate::exec::Interpreter;
use crate::exec::attention::Attn;
use crate::exec::kernels::group_strides;
use crate::tensor::{Tensor, View};
use half::bf16;
use tessera_compiler::ir::{DType, Dim, Graph, Node, Op, ReduceOp, ValueId};
use tessera_compiler::lower::{BufId, Buffer, Instr, Kind, Program, Region};

/// How the CPU backend runs fused kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Engine {
    /// Native code from the cranelift JIT (the faster on the machines
    /// measured: benches/README.md).
    #[default]
    Jit,
    /// The kernel-IR interpreter.
    Interp,
    /// A generated module's kernels, compiled ahead of time by rustc
    /// (`native`); every kernel of the program must be among them.
    Native(native::Kernels),
}

impl Engine {
    pub fn name(self) -> &'static str {
        match self {
            Engine::Jit => "jit",
            Engine::Interp => "interp",
            Engine::Native(_) => "native",
        }
    }
}

impl Engine {
    /// The code of elementwise kernel `k` under this engine: compiled by the
    /// JIT, or found in the generated module; `None` for the interpreter.
    fn code(self, k: &tessera_compiler::kernel::Kernel) -> Result<Option<Code>, String> {
        Ok(match self {
            Engine::Interp => None,
            Engine::Jit => Some(Code::Jit(jit::compile(k)?)),
            Engine::Native(kernels) => Some(Code::Native(kernels.find(k)?)),
        })
    }

    /// The generated kernels a native engine runs (none for the others).
    fn kernels(self) -> native::Kernels {
        match self {
            Engine::Native(k) => k,
            _ => native::Kernels(&[]),
        }
    }
}

impl std::str::FromStr for Engine {
    type Err = String;
    fn from_str(s: &str) -> Result<Engine, String> {
        match s {
            "jit" => Ok(Engine::Jit),
            "interp" => Ok(Engine::Interp),
            other => Err(format!("unknown CPU backend `{other}`: use `jit` or `interp`")),
        }
    }
}

#[derive(Default)]
pub struct Cpu {
    engine: Engine,
    /// Compiled kernels by the address of their IR, with the IR they were
    /// compiled from (checked on every use).
    compiled: std::collections::HashMap<usize, (tessera_compiler::kernel::Kernel, Code)>,
    /// The regions' bytes (held as f32 words, so 4-byte aligned); the arena's
    /// words past `arena_bytes` are the shadows of staged buffers.
    regions: [Vec<f32>; Region::COUNT],
    /// The program's arena size, where the shadows start.
    arena_bytes: u64,
    /// Row kernels' passes (and their native code under the JIT), by the
    /// address of their IR, with the IR they were planned from.
    row_plans: std::collections::HashMap<usize, (tessera_compiler::kernel::Kernel, rows::Plan, Vec<Option<Code>>)>,
}

/// The code of a kernel (or of a row kernel's pass) under the compiled engines.
#[derive(Clone, Copy)]
enum Code {
    Jit(jit::Segment),
    Native(native::Found),
}

/// Whether an instruction reads a buffer's elements where they lie, as f32
/// words (else they are staged through an f32 shadow).
fn in_regions(b: &Buffer) -> bool {
    b.ty.dtype == DType::F32
}

/// Whether a buffer's elements are encoded in another dtype than f32 (and
/// staged through f32 shadows).
fn staged(b: &Buffer) -> bool {
    !in_regions(b)
}

fn range(b: &Buffer) -> std::ops::Range<usize> {
    let at = (b.offset / 4) as usize;
    at..at + b.ty.numel() as usize
}

/// Whether two buffers share no bytes.
fn disjoint(a: &Buffer, b: &Buffer) -> bool {
    a.region != b.region || a.offset + a.ty.bytes() <= b.offset || b.offset + b.ty.bytes() <= a.offset
}

/// A buffer's first element, from its region's base pointer in `bases`
/// ([`Cpu::bases`]): every pointer an instruction uses comes from one base
/// per region, so that its loads and in-place stores share their provenance.
fn at(bases: &[*mut f32; Region::COUNT], b: &Buffer) -> *mut f32 {
    // SAFETY: a buffer's elements lie inside its region.
    unsafe { bases[b.region.index()].add(range(b).start) }
}

/// A buffer's elements, from `bases` ([`Cpu::bases`]).
///
/// # Safety
/// While the slice lives nothing writes these elements (the caller checks
/// that an instruction's output shares no bytes with it, or that each
/// element is read before the same position is written).
unsafe fn elems<'a>(bases: &[*mut f32; Region::COUNT], b: &Buffer) -> &'a [f32] {
    // SAFETY: a buffer's elements lie inside its region; the rest is the caller's.
    unsafe { std::slice::from_raw_parts(at(bases, b), b.ty.numel() as usize) }
}

/// A buffer's elements to write, from `bases` ([`Cpu::bases`]).
///
/// # Safety
/// As [`elems`], and nothing else reads these elements while the slice lives.
unsafe fn elems_mut<'a>(bases: &[*mut f32; Region::COUNT], b: &Buffer) -> &'a mut [f32] {
    // SAFETY: a buffer's elements lie inside its region; the rest is the caller's.
    unsafe { std::slice::from_raw_parts_mut(at(bases, b), b.ty.numel() as usize) }
}

impl Cpu {
    /// Write a buffer's elements in place with `f` (as [`Backend::upload`]
    /// does from a slice, without one).
    pub fn write_with(&mut self, buf: &Buffer, f: impl FnOnce(&mut [f32])) -> Result<(), String> {
        if staged(buf) {
            let mut v = vec![0f32; buf.ty.numel() as usize];
            f(&mut v);
            return self.upload(buf, &v);
        }
        f(self.slice_mut(buf));
        Ok(())
    }

    /// A backend running kernels with the default engine.
    pub fn new() -> Cpu {
        Cpu::default()
    }

    pub fn with_engine(engine: Engine) -> Cpu {
        Cpu { engine, ..Cpu::default() }
    }

    /// The code of elementwise kernel `k` under the engine: the JIT's
    /// (compiled at its first use) or the generated module's (found at its
    /// first use), kept by the address of the kernel's IR; `None` for the
    /// interpreter.
    fn code(&mut self, k: &tessera_compiler::kernel::Kernel) -> Result<Option<Code>, String> {
        let key = k as *const _ as usize;
        if let Some((ir, f)) = self.compiled.get(&key)
            && ir == k
        {
            return Ok(Some(*f));
        }
        let Some(f) = self.engine.code(k)? else { return Ok(None) };
        self.compiled.insert(key, (k.clone(), f));
        Ok(Some(f))
    }

    /// An f32 buffer's elements.
    fn slice(&self, b: &Buffer) -> &[f32] {
        debug_assert!(!staged(b), "a {} buffer read as f32", b.ty);
        &self.regions[b.region.index()][range(b)]
    }

    fn slice_mut(&mut self, b: &Buffer) -> &mut [f32] {
        debug_assert!(!staged(b), "a {} buffer written as f32", b.ty);
        &mut self.regions[b.region.index()][range(b)]
    }

    /// A buffer's bytes.
    fn bytes(&self, b: &Buffer) -> &[u8] {
        region_bytes(&self.regions[b.region.index()], b)
    }

    fn bytes_mut(&mut self, b: &Buffer) -> &mut [u8] {
        region_bytes_mut(&mut self.regions[b.region.index()], b)
    }

    /// A buffer's elements as f32 values.
    fn read(&self, b: &Buffer) -> Vec<f32> {
        if staged(b) {
            let mut out = vec![0f32; b.ty.numel() as usize];
            decode(b.ty.dtype, self.bytes(b), &mut out);
            return out;
        }
        self.slice(b).to_vec()
    }

    /// Write f32 values into a buffer, encoded in its dtype.
    fn write(&mut self, b: &Buffer, data: &[f32]) {
        if staged(b) {
            encode(b.ty.dtype, data, self.bytes_mut(b));
        } else {
            self.slice_mut(b).copy_from_slice(data);
        }
    }

    /// The i32 values of a run-time buffer (positions, block tables),
    /// stored as i32 or staged as f32.
    fn ints(&self, b: &Buffer) -> Vec<i64> {
        match b.ty.dtype {
            DType::I32 => self
                .bytes(b)
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().expect("four bytes")) as i64)
                .collect(),
            _ => self.read(b).into_iter().map(|x| x as i64).collect(),
        }
    }

    /// `rows_at`: each sequence's rows `pos[b]..pos[b] + n` of the table
    /// `src` along `dim` into `dst` (`[batch, ..]`), as bytes; rows past the
    /// table, or of an idle sequence, are zeros.
    fn rows_at(&mut self, src: &Buffer, dst: &Buffer, dim: &str, pos: &[i64]) -> Result<(), String> {
        let at = src.ty.dims.iter().position(|d| d.name == dim).ok_or_else(|| format!("no dim `{dim}`"))?;
        let rows = src.ty.dims[at].size as usize;
        let n = dst.ty.dims[at + 1].size as usize;
        let outer: usize = src.ty.dims[..at].iter().map(|d| d.size as usize).product();
        let row =
            src.ty.dims[at + 1..].iter().map(|d| d.size as usize).product::<usize>() * src.ty.dtype.bytes() as usize;
        // Only the rows taken are read (the output's layout, in order).
        let table = self.bytes(src);
        let mut taken = vec![0u8; pos.len() * outer * n * row];
        for (b, &p) in pos.iter().enumerate() {
            for o in 0..outer {
                for i in 0..n {
                    if let Some(p) = usize::try_from(p).ok().map(|p| p + i).filter(|&p| p < rows) {
                        let to = ((b * outer + o) * n + i) * row;
                        taken[to..to + row].copy_from_slice(&table[(o * rows + p) * row..][..row]);
                    }
                }
            }
        }
        self.bytes_mut(dst).copy_from_slice(&taken);
        Ok(())
    }

    /// `cache_write`: `x` (`[batch, .., dim = n, ..]`) into the paged pool
    /// (`[kv_block, .., dim = block, ..]`) at each sequence's positions
    /// through its block table, as bytes (one dtype, checked by the verifier).
    fn cache_write(&mut self, x: &Buffer, pool: &Buffer, dim: &str, pos: &[i64], tables: &[i64]) -> Result<(), String> {
        let dims = &pool.ty.dims;
        let at = dims.iter().position(|d| d.name == dim).ok_or_else(|| format!("no dim `{dim}`"))?;
        let (block, blocks) = (dims[at].size as usize, dims[0].size as usize);
        let n = x.ty.dims[at].size as usize;
        let outer: usize = dims[1..at].iter().map(|d| d.size as usize).product();
        let row = dims[at + 1..].iter().map(|d| d.size as usize).product::<usize>() * pool.ty.dtype.bytes() as usize;
        let per = tables.len() / pos.len().max(1);
        let src = self.bytes(x).to_vec();
        let dst = self.bytes_mut(pool);
        for (b, &p) in pos.iter().enumerate() {
            let Ok(p) = usize::try_from(p) else { continue };
            for i in 0..n {
                let (j, r) = ((p + i) / block, (p + i) % block);
                let Some(blk) = (j < per).then(|| tables[b * per + j]).and_then(|k| usize::try_from(k).ok()) else {
                    continue;
                };
                if blk >= blocks {
                    return Err(format!("sequence {b}'s block table names block {blk}, past the cache's {blocks}"));
                }
                for o in 0..outer {
                    let from = ((b * outer + o) * n + i) * row;
                    let to = ((blk * outer + o) * block + r) * row;
                    dst[to..to + row].copy_from_slice(&src[from..from + row]);
                }
            }
        }
        Ok(())
    }

    /// Positions `[0, n)` of one sequence from the paged `pool` through its
    /// block `table`, as f32: the pool's dims with `kv_block` → `batch` (one)
    /// and `dim` → `n`, and the elements, borrowed where they lie when the
    /// blocks are consecutive f32 rows (one sequence holding the pool in
    /// order, as `tessera sample`'s does). A position whose block the table
    /// lacks reads zeros.
    fn gather_cache(
        &self,
        pool: &Buffer,
        table: &[i64],
        n: usize,
        dim: &str,
        batch: &Dim,
    ) -> Result<(Vec<Dim>, std::borrow::Cow<'_, [f32]>), String> {
        let dims = &pool.ty.dims;
        let at = dims.iter().position(|d| d.name == dim).ok_or_else(|| format!("no dim `{dim}` in the cache"))?;
        let (block, blocks) = (dims[at].size as usize, dims[0].size as usize);
        let outer: usize = dims[1..at].iter().map(|d| d.size as usize).product();
        let row: usize = dims[at + 1..].iter().map(|d| d.size as usize).product();
        let mut out_dims = dims.clone();
        out_dims[0] = Dim::new(&batch.name, 1);
        out_dims[at].size = n as u64;
        let used = n.div_ceil(block);
        if let Some(&first) = table.first()
            && first >= 0
            && (first as usize + used) <= blocks
            && used <= table.len()
            && table[..used].iter().enumerate().all(|(j, &b)| b == first + j as i64)
            && outer == 1
            && pool.ty.dtype == DType::F32
        {
            let start = first as usize * block * row;
            return Ok((out_dims, std::borrow::Cow::Borrowed(&self.slice(pool)[start..start + n * row])));
        }
        let mut data = vec![0f32; outer * n * row];
        let es = pool.ty.dtype.bytes() as usize;
        let words = (pool.ty.dtype == DType::F32).then(|| self.slice(pool));
        let bytes = self.bytes(pool);
        for p in 0..n {
            let Some(blk) = table.get(p / block).and_then(|&k| usize::try_from(k).ok()) else { continue };
            if blk >= blocks {
                return Err(format!("a block table names block {blk}, past the cache's {blocks}"));
            }
            for o in 0..outer {
                let from = ((blk * outer + o) * block + p % block) * row;
                let to = &mut data[(o * n + p) * row..][..row];
                match words {
                    Some(w) => to.copy_from_slice(&w[from..from + row]),
                    None => decode(pool.ty.dtype, &bytes[from * es..(from + row) * es], to),
                }
            }
        }
        Ok((out_dims, std::borrow::Cow::Owned(data)))
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

    /// One raw pointer per region (see [`at`]).
    fn bases(&mut self) -> [*mut f32; Region::COUNT] {
        let mut out = [std::ptr::null_mut(); Region::COUNT];
        for (o, r) in out.iter_mut().zip(self.regions.iter_mut()) {
            *o = r.as_mut_ptr();
        }
        out
    }

    /// Read-only views of buffers where they lie.
    fn views<'s, 'b: 's>(&'s self, bufs: impl Iterator<Item = &'b Buffer>) -> Vec<View<'s, f32>> {
        bufs.map(|b| View { dims: &b.ty.dims, data: self.slice(b) }).collect()
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
) -> Result<Tensor<f32>, String> {
    static NO_GRAPH: std::sync::LazyLock<Graph> = std::sync::LazyLock::new(Graph::new);
    let interp = Interpreter { graph: &NO_GRAPH, params: &[], dropout: Some(seed), comm };
    let node = Node { op: op.clone(), inputs: (0..ins.len() as u32).map(ValueId).collect(), ty: out.ty.clone() };
    // The node's own index is the random stream of a dropout (and of attention's dropout).
    let at = rng.unwrap_or(0) as usize;
    // (Attention's gradients come from `Kind::AttentionGrads`, not here: no pass is shared.)
    interp.eval_node(&node, at, &ins, &[], &[], &mut Default::default()).map_err(|e| e.message)
}

/// What `op` computes from views of its operands where they lie, with the
/// interpreter's kernels (attention, cross-entropy, the embedding gather,
/// MoE dispatch and combine): no operand copied out.
fn on_views(op: &Op, v: &[View<'_, f32>], out: &[Dim], rng: Option<u64>, seed: u64) -> Result<Tensor<f32>, String> {
    use crate::exec::{kernels as k, moe};
    Ok(match op {
        Op::Dispatch => moe::dispatch(v[0], v[1], out),
        Op::DispatchGrad => moe::dispatch_grad(v[0], v[1], out),
        Op::Combine => moe::combine(v[0], v[1], out),
        Op::CombineGradY => moe::combine_grad_y(v[0], v[1], out),
        Op::CombineGradGates => moe::combine_grad_gates(v[0], v[1], v[2]),
        Op::CrossEntropy { label_smoothing, ignore } => {
            Tensor::scalar(k::cross_entropy(v[0], v[1], *label_smoothing, *ignore))
        }
        Op::CrossEntropyGrad { label_smoothing, ignore } => {
            let g = v[2].data.first().copied().ok_or("cross_entropy_grad has no upstream gradient")?;
            k::cross_entropy_grad(v[0], v[1], g, *label_smoothing, *ignore)
        }
        Op::Embed => k::embed(v[0], v[1], out)?,
        Op::Attention { .. } => {
            // The op's random stream is its node's index, as in the interpreter.
            Attn::of(op, v, Some(seed), rng.unwrap_or(0) as usize).ok_or("not an attention")?.forward(out)
        }
        other => return Err(format!("`{}` has no form over views", other.name())),
    })
}

impl Cpu {
    /// Run a fused kernel (compiled, or interpreted: [`Engine`]), its loop
    /// positions split over the kernel threads. A store writes straight into
    /// its buffer unless those bytes are also read at other positions (an output that shares an
    /// input's bytes but not its layout): then the stores go to a staging
    /// buffer first.
    fn kernel(
        &mut self,
        k: &tessera_compiler::kernel::Kernel,
        args: &[&Buffer],
        rows: Option<&[usize]>,
        seed: u64,
    ) -> Result<(), String> {
        let n = k.len() as usize;
        // The position ranges to compute: all, or each expert's filled rows.
        let ranges: Vec<(usize, usize)> = match rows {
            None => vec![(0, n)],
            Some(c) => {
                let outer = k.dims[0].size as usize;
                let block = n / outer.max(1);
                let row = block / (k.dims[1].size as usize).max(1);
                (0..outer).map(|e| (e * block, c.get(e).copied().unwrap_or(0).min(block / row.max(1)) * row)).collect()
            }
        };
        // A store is safe in place if every input sharing its bytes is the same bytes read at the same positions.
        let direct = tessera_compiler::lower::kernel_aliases(k, args).is_some();
        let mut staging: Vec<Vec<f32>> = Vec::new();
        let bases = self.bases();
        let mut ptrs: Vec<*mut f32> = args.iter().map(|b| at(&bases, b)).collect();
        if !direct {
            for &(s, _) in &k.stores {
                staging.push(vec![0f32; args[s].ty.numel() as usize]);
                ptrs[s] = staging.last_mut().expect("pushed").as_mut_ptr();
            }
        }
        if k.is_row() {
            self.rows(k, &ptrs, seed)?;
        } else {
            self.elementwise(k, ptrs, &ranges, seed)?;
        }
        if !direct {
            let mut staged = staging.into_iter();
            for &(s, _) in &k.stores {
                let data = staged.next().expect("one staging buffer per store");
                self.slice_mut(args[s]).copy_from_slice(&data);
            }
        }
        Ok(())
    }

    /// An elementwise kernel over position `ranges` ((first, count) each), split over the kernel threads.
    fn elementwise(
        &mut self,
        k: &tessera_compiler::kernel::Kernel,
        ptrs: Vec<*mut f32>,
        ranges: &[(usize, usize)],
        seed: u64,
    ) -> Result<(), String> {
        let args_p = interp::Args(ptrs);
        let kernels = self.engine.kernels();
        let native = self.code(k)?;
        let nest = interp::Nest::of(k);
        // Split the ranges into pieces for the kernel threads.
        let total: usize = ranges.iter().map(|r| r.1).sum();
        let threads = crate::exec::threads().min(total.div_ceil(interp::BLOCK * 16)).max(1);
        let per = total.div_ceil(threads).max(1);
        let pieces: Vec<(usize, usize)> = ranges
            .iter()
            .flat_map(|&(first, count)| (0..count).step_by(per).map(move |at| (first + at, per.min(count - at))))
            .collect();
        let job = |&(first, count): &(usize, usize)| {
            // SAFETY: the pointers address each argument's elements (a store's
            // own buffer, or staging of its length where it would meet other
            // positions' loads), and pieces are disjoint positions.
            unsafe {
                match native {
                    Some(Code::Jit(f)) => jit::run(f, &nest, &args_p, seed, first, count),
                    Some(Code::Native(f)) => native::run(f, kernels, k, &nest, &args_p, seed, first, count),
                    None => interp::run(k, &nest, &args_p, seed, first, count),
                }
            };
        };
        if threads == 1 {
            pieces.iter().for_each(job);
        } else {
            use rayon::prelude::*;
            pieces.par_iter().for_each(job);
        }
        Ok(())
    }

    /// Plan row kernel `k`'s passes (and compile them under the JIT) at its
    /// first use; returns its key in `row_plans`.
    fn row_plan(&mut self, k: &tessera_compiler::kernel::Kernel) -> Result<usize, String> {
        let key = k as *const _ as usize;
        if !self.row_plans.get(&key).is_some_and(|(ir, _, _)| ir == k) {
            let plan = rows::Plan::of(k)?;
            let native = plan.plan.passes.iter().map(|p| self.engine.code(&p.kernel)).collect::<Result<_, _>>()?;
            self.row_plans.insert(key, (k.clone(), plan, native));
        }
        Ok(key)
    }

    /// A row kernel (`rows::Plan`): its passes over each block of rows,
    /// blocks split over the kernel threads. `ptrs`: each argument's first
    /// element, as [`Cpu::kernel`] resolved them.
    fn rows(&mut self, k: &tessera_compiler::kernel::Kernel, ptrs: &[*mut f32], seed: u64) -> Result<(), String> {
        let key = self.row_plan(k)?;
        let kernels = self.engine.kernels();
        let (_, plan, native) = &self.row_plans[&key];
        let (nests, plan) = (&plan.nests, &plan.plan);
        let len = plan.len.max(1);
        let rows = k.len() as usize / len;
        // Blocks of about 4096 positions: a pass's reads of a block stay in cache for the next.
        let block = (4096 / len).max(1);
        let blocks: Vec<(usize, usize)> = (0..rows).step_by(block).map(|r| (r, block.min(rows - r))).collect();
        let inputs = k.inputs;
        let base = interp::Args(ptrs.to_vec());
        let job = |&(r0, nr): &(usize, usize)| {
            let mut scalars: Vec<Vec<f32>> = vec![vec![0f32; nr]; plan.reductions];
            // The block's arrays of the values passes hand on, by body value.
            let mut arrays: Vec<Vec<f32>> = vec![Vec::new(); plan.values];
            for ((pass, nest), f) in plan.passes.iter().zip(nests).zip(native) {
                for &v in &pass.writes {
                    arrays[v] = vec![0f32; nr * len];
                }
                // Pointers placed so that position (row r0 + i, j) of the loop nest lands on element
                // (i, j) of the block's arrays (the offsets only ever reach inside them).
                let mut args: Vec<*mut f32> = base.pointers()[..inputs].to_vec();
                args.extend(pass.reads.iter().map(|&r| scalars[r].as_mut_ptr().wrapping_sub(r0)));
                args.extend(pass.loads.iter().map(|&v| arrays[v].as_mut_ptr().wrapping_sub(r0 * len)));
                if pass.writes.is_empty() {
                    args.extend_from_slice(&base.pointers()[inputs..]);
                } else {
                    args.extend(pass.writes.iter().map(|&v| arrays[v].as_mut_ptr().wrapping_sub(r0 * len)));
                }
                let a = interp::Args(args);
                // SAFETY: every pointer addresses, at this block's positions, the elements its
                // strides reach (the kernel's buffers, or the block's arrays as placed above);
                // blocks are disjoint rows, and the kernel's own staging rule holds for its stores.
                // A pass once per row walks one position per row.
                let step = if pass.per_row { 1 } else { len };
                unsafe {
                    match f {
                        Some(Code::Jit(f)) => jit::run(*f, nest, &a, seed, r0 * step, nr * step),
                        Some(Code::Native(f)) => {
                            native::run(*f, kernels, &pass.kernel, nest, &a, seed, r0 * step, nr * step)
                        }
                        None => interp::run(&pass.kernel, nest, &a, seed, r0 * step, nr * step),
                    }
                }
                for &(r, op, v) in &pass.makes {
                    rows::reduce(op, &arrays[v], len, &mut scalars[r]);
                }
            }
        };
        let threads = crate::exec::threads().min(blocks.len()).max(1);
        if threads == 1 {
            blocks.iter().for_each(job);
        } else {
            use rayon::prelude::*;
            blocks.par_iter().for_each(job);
        }
        Ok(())
    }
}

impl Cpu {
    /// `out [+]= Σ a·b` over the dims `out` lacks, as batched GEMMs straight
    /// on the regions: the same grouping into batch, row, column and
    /// contracted dims as the interpreter's `einsum`, with the same GEMM, but
    /// no operand copied. `None` where a layout does not fit a strided GEMM
    /// (or an output shares an operand's bytes); the caller then runs the
    /// interpreter's kernel.
    ///
    /// With `rows` (an expert's filled slots, `lower::ragged`) the batch is
    /// the expert dim and either the rows are the slot dim (`x · w` per
    /// expert: only filled rows are computed) or the contracted dim is
    /// (a weight gradient: only filled slots are summed).
    fn contract(
        &mut self,
        a: &Buffer,
        b: &Buffer,
        out: &Buffer,
        accumulate: bool,
        rows: Option<&[usize]>,
    ) -> Option<()> {
        let has = |t: &Buffer, n: &str| t.ty.dims.iter().any(|d| d.name == n);
        let od = &out.ty.dims;
        let in_out = |n: &str| od.iter().any(|d| d.name == n);
        // A dim only one operand has and the output lacks is summed first: not here.
        if a.ty.dims.iter().chain(&b.ty.dims).any(|d| !(in_out(&d.name) || has(a, &d.name) && has(b, &d.name))) {
            return None;
        }
        if !disjoint(a, out) || !disjoint(b, out) || [a, b, out].iter().any(|x| x.ty.dtype.bytes() != 4) {
            return None;
        }
        // The output's dims must be [batch, rows, cols]; rows come from `a`.
        // If they are [batch, cols, rows] instead, swap the operands.
        let kind = |d: &Dim, l: &Buffer, r: &Buffer| match (has(l, &d.name), has(r, &d.name)) {
            (true, true) => 0,
            (true, false) => 1,
            _ => 2,
        };
        let (l, r) = if od.windows(2).all(|w| kind(&w[0], a, b) <= kind(&w[1], a, b)) {
            (a, b)
        } else if od.windows(2).all(|w| kind(&w[0], b, a) <= kind(&w[1], b, a)) {
            (b, a)
        } else {
            return None;
        };
        let group = |k: usize| -> Vec<&Dim> { od.iter().filter(|d| kind(d, l, r) == k).collect() };
        let (batch, m, n) = (group(0), group(1), group(2));
        let k: Vec<&Dim> = l.ty.dims.iter().filter(|d| has(r, &d.name) && !in_out(&d.name)).collect();
        let sl = group_strides(&l.ty.dims, [&batch, &m, &k])?;
        let sr = group_strides(&r.ty.dims, [&batch, &k, &n])?;
        let size = |v: &[&Dim]| v.iter().map(|d| d.size as usize).product::<usize>();
        let (nb, nm, nn, nk) = (size(&batch), size(&m), size(&n), size(&k));
        let bases = self.bases();
        let (pl, pr, po) = (at(&bases, l), at(&bases, r), at(&bases, out));
        // Per batch: the rows and the contracted length.
        let shape: Vec<(usize, usize)> = match rows {
            None => vec![(nm, nk); nb],
            // The rows are the slot dim: the ragged operand's second and the output's.
            Some(c)
                if c.len() == nb
                    && batch.len() == 1
                    && m.len() == 1
                    && od.get(1) == Some(m[0])
                    && l.ty.dims.get(1) == Some(m[0]) =>
            {
                c.iter().map(|&f| (f.min(nm), nk)).collect()
            }
            // The contracted dim is the slot dim of both operands.
            Some(c) if c.len() == nb && batch.len() == 1 && k.len() == 1 && l.ty.dims.get(1) == Some(k[0]) => {
                c.iter().map(|&f| (nm, f.min(nk))).collect()
            }
            Some(_) => return None,
        };
        for (bi, &(mm, kk)) in shape.iter().enumerate() {
            // An empty sum is zero (kept as it is when accumulating).
            if kk == 0 {
                if !accumulate {
                    // SAFETY: batch `bi`'s nm×nn block of the output (f32 zero is all zero bits).
                    unsafe { std::ptr::write_bytes(po.add(bi * nm * nn), 0, nm * nn) };
                }
                continue;
            }
            // SAFETY: the strides come from the buffers' own row-major layouts,
            // so the views address nm×nk, nk×nn and nm×nn elements inside
            // them (mm ≤ nm rows, kk ≤ nk); the output shares no bytes with
            // the operands (checked).
            unsafe {
                crate::exec::kernels::gemm_strided(
                    (mm, nn, kk),
                    po.add(bi * nm * nn),
                    nn,
                    accumulate,
                    (pl.add(bi * sl[0]), sl[1], sl[2]),
                    (pr.add(bi * sr[0]), sr[1], sr[2]),
                    1.0,
                    true,
                );
            }
        }
        Some(())
    }
}

impl Cpu {
    /// Attention's output written straight into its buffer (no result
    /// tensor to copy); `None` where a buffer is not f32 or the output
    /// shares bytes with an operand.
    fn attention_into(&mut self, op: &Op, ins: &[&Buffer], out: &Buffer, rng: Option<u64>, seed: u64) -> Option<()> {
        if !in_regions(out) || ins.iter().any(|b| !in_regions(b) || !disjoint(b, out)) {
            return None;
        }
        let bases = self.bases();
        // SAFETY: the output shares no bytes with an operand (checked), and nothing else runs.
        let views: Vec<View<'_, f32>> =
            ins.iter().map(|b| View { dims: &b.ty.dims, data: unsafe { elems(&bases, b) } }).collect();
        let o = unsafe { elems_mut(&bases, out) };
        // The op's random stream is its node's index, as in the interpreter.
        Attn::of(op, &views, Some(seed), rng.unwrap_or(0) as usize)?.forward_into(o);
        Some(())
    }

    /// Attention's dq, dk and dv written straight into their buffers (a
    /// gradient the instruction does not name goes to scratch); `None`
    /// where it names another gradient (the T5 table's), a buffer is not
    /// f32, or two buffers share bytes.
    fn attention_grads_into(
        &mut self,
        op: &Op,
        forward: usize,
        which: &[u8],
        ins: &[&Buffer],
        outs: &[&Buffer],
        seed: u64,
    ) -> Option<Result<(), String>> {
        let apart = outs.iter().enumerate().all(|(i, o)| {
            ins.iter().all(|b| disjoint(b, o)) && outs[..i].iter().all(|p| disjoint(p, o)) && in_regions(o)
        });
        if which.iter().any(|&w| w > 2) || !apart || ins.len() < 4 || ins.iter().any(|b| !in_regions(b)) {
            return None;
        }
        let bases = self.bases();
        // SAFETY: no output shares bytes with an operand or another output (checked).
        let views: Vec<View<'_, f32>> =
            ins.iter().map(|b| View { dims: &b.ty.dims, data: unsafe { elems(&bases, b) } }).collect();
        let at = Attn::of(op, &views, Some(seed), forward)?;
        let mut scratch: [Vec<f32>; 3] = Default::default();
        let mut grads: [Option<&mut [f32]>; 3] = [None, None, None];
        for (&w, o) in which.iter().zip(outs) {
            grads[w as usize] = Some(unsafe { elems_mut(&bases, o) });
        }
        for (k, (g, s)) in grads.iter_mut().zip(scratch.iter_mut()).enumerate() {
            if g.is_none() {
                *s = vec![0f32; ins[k].ty.numel() as usize];
            }
        }
        let [s0, s1, s2] = &mut scratch;
        let [g0, g1, g2] = grads;
        let (dq, dk, dv) = (g0.unwrap_or(s0), g1.unwrap_or(s1), g2.unwrap_or(s2));
        at.backward_into(views[views.len() - 1], dq, dk, dv);
        Some(Ok(()))
    }

    /// Filled-slot counts, held as f32 values.
    fn counts(&self, b: &Buffer) -> Vec<usize> {
        self.slice(b).iter().map(|&c| c as usize).collect()
    }

    /// `take` and `untake` where the taken dim's slices are contiguous
    /// blocks of the whole (the output's dims are the whole's without
    /// `dim`, in order): block copies between the regions, no operand copied
    /// out. Untake zeroes the whole and adds each part in order (as the
    /// interpreter's kernel does, so the result is the same bits). `None`:
    /// another layout, or buffers that share bytes, for the interpreter.
    fn take_blocks(&mut self, op: &Op, ins: &[&Buffer], out: &Buffer) -> Option<()> {
        let (dim, whole, parts): (&str, &Buffer, Vec<(&Buffer, usize)>) = match op {
            Op::Take { dim, index } => (dim, ins[0], vec![(out, *index as usize)]),
            Op::Untake { dim, indices } if indices.len() == ins.len() => {
                (dim, out, ins.iter().zip(indices).map(|(b, &i)| (*b, i as usize)).collect())
            }
            _ => return None,
        };
        let d = &whole.ty.dims;
        let p = d.iter().position(|x| x.name == dim)?;
        let fits = parts.iter().all(|(b, i)| {
            *i < d[p].size as usize && d.iter().filter(|x| x.name != dim).eq(b.ty.dims.iter()) && disjoint(b, whole)
        });
        if !fits || [whole].iter().chain(parts.iter().map(|(b, _)| b)).any(|b| !in_regions(b)) {
            return None;
        }
        let inner: usize = d[p + 1..].iter().map(|x| x.size as usize).product();
        let n = d[p].size as usize;
        let blocks = whole.ty.numel() as usize / (inner * n).max(1);
        let bases = self.bases();
        let w = at(&bases, whole);
        if matches!(op, Op::Untake { .. }) {
            // SAFETY: the whole's elements (f32 zero is all zero bits).
            unsafe { std::ptr::write_bytes(w, 0, whole.ty.numel() as usize) };
        }
        for (b, index) in parts {
            let part = at(&bases, b);
            for k in 0..blocks {
                // SAFETY: block k of the whole is inner·n elements, of the part
                // inner; the part and the whole share no bytes (checked).
                unsafe {
                    let whole_at = w.add(k * inner * n + index * inner);
                    let part_at = part.add(k * inner);
                    match op {
                        Op::Take { .. } => std::ptr::copy_nonoverlapping(whole_at, part_at, inner),
                        _ => {
                            let dst = std::slice::from_raw_parts_mut(whole_at, inner);
                            let src = std::slice::from_raw_parts(part_at, inner);
                            dst.iter_mut().zip(src).for_each(|(o, x)| *o += *x);
                        }
                    }
                }
            }
        }
        Some(())
    }

    /// LayerNorm, RMSNorm and their input gradient over a last, contiguous
    /// dim, row by row on the regions with the interpreter's row functions
    /// (so the same bits), no operand copied out. A norm may write over its
    /// own input; every other overlap, and any other layout, is `None`.
    fn norms(&mut self, op: &Op, ins: &[&Buffer], out: &Buffer) -> Option<()> {
        use crate::exec::kernels::{norm_grad_x_row, norm_row};
        let (dim, eps, rms, gain, bias, grad) = match op {
            Op::LayerNorm { dim, eps, gain, bias } => (dim, *eps, false, *gain, *bias, false),
            Op::RmsNorm { dim, eps, gain } => (dim, *eps, true, *gain, false, false),
            Op::NormGradX { dim, eps, gain, rms } => (dim, *eps, *rms, *gain, false, true),
            _ => return None,
        };
        let x = ins[0];
        let len = x.ty.dims.last().filter(|d| d.name == *dim)?.size as usize;
        let g = grad.then(|| ins[1 + usize::from(gain)]);
        let (gn, bs) = (gain.then(|| ins[1]), bias.then(|| ins[1 + usize::from(gain)]));
        let shaped = |b: &Buffer| b.ty.dims == out.ty.dims;
        let apart = |b: &Buffer| disjoint(b, out);
        let same = x.region == out.region && x.offset == out.offset;
        let ok = len > 0
            && shaped(x)
            && g.is_none_or(|g| shaped(g) && apart(g))
            && [gn, bs].iter().flatten().all(|p| p.ty.numel() as usize == len && apart(p))
            && (apart(x) || same && !grad)
            && ins.iter().chain([&out]).all(|b| in_regions(b));
        if !ok {
            return None;
        }
        let n = out.ty.numel() as usize;
        let bases = self.bases();
        // SAFETY (for every slice below): the output shares bytes with no input
        // (checked), except a norm's input when it is the output itself, which
        // is copied nowhere.
        let read = |b: &Buffer| unsafe { elems(&bases, b) };
        let (gs, bsl) = (gn.map(read), bs.map(read));
        if grad {
            let (xs, gv) = (read(x), read(g.expect("a gradient")));
            let ones = vec![1f32; len];
            let w = gs.unwrap_or(&ones);
            let o = unsafe { elems_mut(&bases, out) };
            crate::exec::fast::par_rows(o, len, |first, o| {
                for (k, o) in o.chunks_mut(len).enumerate() {
                    let r = (first + k) * len;
                    norm_grad_x_row(&xs[r..r + len], &gv[r..r + len], w, len as f32, eps, rms, o);
                }
            });
        } else {
            if !same {
                // SAFETY: n elements each, apart (checked).
                unsafe { std::ptr::copy_nonoverlapping(at(&bases, x), at(&bases, out), n) };
            }
            let o = unsafe { elems_mut(&bases, out) };
            crate::exec::fast::par_rows(o, len, |_, rows| {
                rows.chunks_mut(len).for_each(|row| norm_row(row, eps, rms, gs, bsl))
            });
        }
        Some(())
    }

    /// A sum or mean over dims that form one contiguous run of the operand's
    /// layout (a bias gradient: over the batch and sequence dims before the
    /// features), `out[o, i] [+]= Σ_r x[o, r, i]`, on the regions: every
    /// output element summed in the interpreter's order (r ascending, from
    /// zero; a mean divides after, then adds), so the same bits, with the
    /// output's elements split over the kernel threads and no operand copied
    /// out. `None`: another layout, or an output that shares the operand's bytes.
    fn sums(&mut self, op: &Op, x: &Buffer, out: &Buffer, accumulate: bool) -> Option<()> {
        use rayon::prelude::*;
        let Op::Reduce { op: how @ (ReduceOp::Sum | ReduceOp::Mean), dims: names } = op else { return None };
        let d = &x.ty.dims;
        // The interpreter's test for the contiguous case (`Tensor::sum_over`).
        let f = d.iter().position(|x| names.contains(&x.name))?;
        if names.len() > d.len() - f || !d[f..f + names.len()].iter().all(|x| names.contains(&x.name)) {
            return None;
        }
        let size = |ds: &[Dim]| ds.iter().map(|x| x.size as usize).product::<usize>();
        let (outer, reduced, inner) = (size(&d[..f]), size(&d[f..f + names.len()]), size(&d[f + names.len()..]));
        let keeps = d.iter().filter(|x| !names.contains(&x.name)).eq(out.ty.dims.iter());
        if !keeps || !disjoint(x, out) || !in_regions(x) || !in_regions(out) {
            return None;
        }
        let n = outer * inner;
        let mean = matches!(how, ReduceOp::Mean).then(|| (x.ty.numel() as usize / n.max(1)) as f32);
        let bases = self.bases();
        // (As addresses, to cross threads; each piece writes its own output elements.)
        let (xs, os) = (at(&bases, x) as usize, at(&bases, out) as usize);
        let pieces = if reduced * n < 1 << 16 { 1 } else { crate::exec::threads() * 4 }.clamp(1, n.max(1));
        let per = n.div_ceil(pieces).max(1);
        (0..pieces).into_par_iter().for_each(|k| {
            let (mut p, end) = (k * per, ((k + 1) * per).min(n));
            let mut acc: Vec<f32> = Vec::new();
            while p < end {
                let (o, i0) = (p / inner, p % inner);
                let len = (inner - i0).min(end - p);
                acc.clear();
                acc.resize(len, 0.0);
                for r in 0..reduced {
                    // SAFETY: row (o, r)'s columns i0 .. i0 + len lie in the operand.
                    let row = unsafe {
                        std::slice::from_raw_parts((xs as *const f32).add((o * reduced + r) * inner + i0), len)
                    };
                    acc.iter_mut().zip(row).for_each(|(a, v)| *a += *v);
                }
                if let Some(m) = mean {
                    acc.iter_mut().for_each(|a| *a /= m);
                }
                // SAFETY: output elements p .. p + len, this piece's alone, apart from the operand (checked).
                let dst = unsafe { std::slice::from_raw_parts_mut((os as *mut f32).add(p), len) };
                if accumulate {
                    dst.iter_mut().zip(&acc).for_each(|(o, a)| *o += *a);
                } else {
                    dst.copy_from_slice(&acc);
                }
                p += len;
            }
        });
        Some(())
    }

    /// A norm's gain gradient over a last, contiguous dim on the regions,
    /// `out[i] [+]= Σ_r g[r, i]·(x[r, i] − mean_r)·inv_r`: each row's
    /// statistics once (the interpreter's `norm_stats`), then each output
    /// element summed over the rows in order with the interpreter's
    /// operations (so the same bits), the elements split over the kernel
    /// threads, no operand copied out.
    fn norm_gain_grad(&mut self, op: &Op, ins: &[&Buffer], out: &Buffer, accumulate: bool) -> Option<()> {
        use rayon::prelude::*;
        let Op::NormGradGain { dim, eps, rms } = op else { return None };
        let (x, g) = (ins[0], ins[1]);
        let len = x.ty.dims.last().filter(|d| d.name == *dim)?.size as usize;
        let ok = len > 0
            && g.ty.dims == x.ty.dims
            && out.ty.numel() as usize == len
            && disjoint(x, out)
            && disjoint(g, out)
            && [x, g, out].iter().all(|b| in_regions(b));
        if !ok {
            return None;
        }
        let bases = self.bases();
        // SAFETY: the output shares bytes with neither input (checked).
        let (xs, gs, o) = unsafe { (elems(&bases, x), elems(&bases, g), elems_mut(&bases, out)) };
        let stats: Vec<(f32, f32)> =
            xs.par_chunks(len).map(|r| crate::exec::kernels::norm_stats(r, *eps, *rms)).collect();
        let pieces = crate::exec::threads().clamp(1, len);
        let per = len.div_ceil(pieces);
        o.par_chunks_mut(per).enumerate().for_each(|(k, o)| {
            let c0 = k * per;
            let mut acc = vec![0f32; o.len()];
            for (r, &(mean, inv)) in stats.iter().enumerate() {
                let (xr, gr) = (&xs[r * len + c0..][..o.len()], &gs[r * len + c0..][..o.len()]);
                for ((a, x), g) in acc.iter_mut().zip(xr).zip(gr) {
                    *a += *g * (*x - mean) * inv;
                }
            }
            if accumulate {
                o.iter_mut().zip(&acc).for_each(|(o, a)| *o += *a);
            } else {
                o.copy_from_slice(&acc);
            }
        });
        Some(())
    }

    /// An embedding table's gradient on the regions: each row the sum of
    /// the gradient rows of its ids in order, from zero, then added into the
    /// output (the interpreter's `embed_grad` and the store, so the same
    /// bits; a row no id names gets zero added), with no table-sized
    /// temporary (GPT-2's vocabulary: 103 MB per call at embed 512).
    /// `None`: a layout for the interpreter; an id outside the table is an error.
    fn embed_grad(&mut self, ins: &[&Buffer], out: &Buffer, accumulate: bool) -> Option<Result<(), String>> {
        let (ids, g) = (ins[0], ins[1]);
        let rows = out.ty.dims.first()?.size as usize;
        let width = out.ty.numel() as usize / rows.max(1);
        let n = ids.ty.numel() as usize;
        let ok = g.ty.numel() as usize == n * width
            && [ids, g].iter().all(|b| disjoint(b, out))
            && [ids, g, out].iter().all(|b| in_regions(b));
        if !ok {
            return None;
        }
        let bases = self.bases();
        // SAFETY: the output shares bytes with neither input (checked).
        let (idv, gv, o) = unsafe { (elems(&bases, ids), elems(&bases, g), elems_mut(&bases, out)) };
        let mut order: Vec<(usize, usize)> = Vec::with_capacity(n);
        for (k, &id) in idv.iter().enumerate() {
            if !(id >= 0.0 && id.fract() == 0.0 && (id as usize) < rows) {
                return Some(Err(format!("id {id} is outside the embedding table's {rows} rows")));
            }
            order.push((id as usize, k));
        }
        // By id, each id's positions in order.
        order.sort_unstable();
        let mut touched = vec![false; rows];
        let mut sum = vec![0f32; width];
        for group in order.chunk_by(|a, b| a.0 == b.0) {
            let id = group[0].0;
            sum.fill(0.0);
            for &(_, k) in group {
                sum.iter_mut().zip(&gv[k * width..(k + 1) * width]).for_each(|(s, v)| *s += *v);
            }
            let row = &mut o[id * width..(id + 1) * width];
            match accumulate {
                true => row.iter_mut().zip(&sum).for_each(|(o, s)| *o += *s),
                false => row.copy_from_slice(&sum),
            }
            touched[id] = true;
        }
        for (row, _) in o.chunks_mut(width.max(1)).zip(&touched).filter(|(_, t)| !**t) {
            match accumulate {
                true => row.iter_mut().for_each(|o| *o += 0.0),
                false => row.fill(0.0),
            }
        }
        Some(Ok(()))
    }

    /// MoE dispatch, combine and their gradients to the tokens and the
    /// expert outputs written straight into their output (no result tensor
    /// copied in): false for other ops, or where an operand shares the
    /// output's bytes.
    fn slots_into(&mut self, op: &Op, ins: &[&Buffer], out: &Buffer) -> bool {
        use crate::exec::moe;
        if !matches!(op, Op::Dispatch | Op::CombineGradY | Op::Combine | Op::DispatchGrad)
            || !in_regions(out)
            || !ins.iter().all(|b| in_regions(b) && disjoint(b, out))
        {
            return false;
        }
        let bases = self.bases();
        // SAFETY: operands apart from the output (checked).
        let (gates, x) = unsafe { (elems(&bases, ins[0]), elems(&bases, ins[1])) };
        let (gates, x) = (View { dims: &ins[0].ty.dims, data: gates }, View { dims: &ins[1].ty.dims, data: x });
        // SAFETY: the output's own elements, apart from the operands.
        let o = unsafe { elems_mut(&bases, out) };
        match op {
            Op::Dispatch => moe::dispatch_into(gates, x, &out.ty.dims, o),
            Op::Combine => moe::combine_into(gates, x, o),
            Op::DispatchGrad => moe::dispatch_grad_into(gates, x, o),
            _ => moe::combine_grad_y_into(gates, x, &out.ty.dims, o),
        }
        true
    }

    /// `out[e, ...] [+]= Σ_{s < counts[e]} x[e, s, ...]`: a sum over the filled slots.
    fn sum_slots(&mut self, x: &Buffer, out: &Buffer, accumulate: bool, counts: &[usize]) -> Option<()> {
        let d = &x.ty.dims;
        if d.len() < 2 || out.ty.dims.len() + 1 != d.len() || counts.len() != d[0].size as usize {
            return None;
        }
        if !disjoint(x, out) || !in_regions(x) || !in_regions(out) {
            return None;
        }
        let (s, w) = (d[1].size as usize, d[2..].iter().map(|d| d.size as usize).product::<usize>());
        let bases = self.bases();
        // SAFETY: the two share no bytes (checked).
        let (xs, o) = unsafe { (elems(&bases, x), elems_mut(&bases, out)) };
        // Experts on the kernel threads; each sums its filled rows in order.
        crate::exec::fast::par_rows(o, w.max(1), |first, dst| {
            for (k, dst) in dst.chunks_mut(w.max(1)).enumerate() {
                let e = first + k;
                if !accumulate {
                    dst.fill(0.0);
                }
                for row in xs[e * s * w..].chunks(w.max(1)).take(counts[e].min(s)) {
                    dst.iter_mut().zip(row).for_each(|(o, v)| *o += *v);
                }
            }
        });
        Some(())
    }
}

impl Backend for Cpu {
    fn prepare(&mut self, p: &Program) -> Result<(), String> {
        // Compile (or find) every kernel's code before the first step runs.
        if self.engine != Engine::Interp {
            for ins in &p.instrs {
                match &ins.kind {
                    Kind::Kernel { kernel } if kernel.is_row() => {
                        self.row_plan(kernel)?;
                    }
                    Kind::Kernel { kernel } => {
                        self.code(kernel)?;
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }

    fn alloc(&mut self, sizes: [u64; Region::COUNT]) -> Result<(), String> {
        for (r, &n) in self.regions.iter_mut().zip(&sizes) {
            *r = vec![0f32; n.div_ceil(4) as usize];
        }
        self.arena_bytes = sizes[Region::Arena.index()].div_ceil(64) * 64;
        Ok(())
    }

    fn upload(&mut self, buf: &Buffer, data: &[f32]) -> Result<(), String> {
        if data.len() as u64 != buf.ty.numel() {
            return Err(format!("{} elements for `{}` of type {}", data.len(), buf.name, buf.ty));
        }
        self.write(buf, data);
        Ok(())
    }

    fn download(&self, buf: &Buffer) -> Result<Vec<f32>, String> {
        Ok(self.read(buf))
    }

    fn finite(&self, buf: &Buffer) -> Result<bool, String> {
        if staged(buf) {
            return Ok(self.read(buf).iter().all(|x| x.is_finite()));
        }
        Ok(self.slice(buf).iter().all(|x| x.is_finite()))
    }

    fn execute<'c>(
        &mut self,
        p: &Program,
        ins: &Instr,
        comm: Option<&'c RankComm<'c>>,
        seed: u64,
    ) -> Result<(), String> {
        // Rows move as bytes, in their dtype (the verifier checks both sides share it).
        if let Kind::RowsAt { dim } | Kind::CacheWrite { dim } = &ins.kind {
            let (src, dst) = (p.buffer(ins.ins[0]), p.buffer(ins.outs[0]));
            let pos = self.ints(p.buffer(ins.ins[1]));
            return match ins.kind {
                Kind::RowsAt { .. } => self.rows_at(src, dst, dim, &pos),
                _ => {
                    let tables = self.ints(p.buffer(ins.ins[2]));
                    self.cache_write(src, dst, dim, &pos, &tables)
                }
            };
        }
        // Each buffer of another dtype than f32, once, with its f32 shadow past the arena.
        let mut shadows: Vec<(BufId, Buffer)> = Vec::new();
        let mut top = self.arena_bytes;
        for b in ins.ins.iter().chain(&ins.outs) {
            let buf = p.buffer(*b);
            // Attention reads the paged cache's rows where they lie (`gather_cache`).
            let paged = matches!(ins.kind, Kind::At { .. }) && buf.region == Region::Cache;
            if staged(buf) && !paged && !shadows.iter().any(|(s, _)| s == b) {
                let ty = tessera_compiler::ir::TensorType { dtype: DType::F32, ..buf.ty.clone() };
                let shadow = Buffer { ty, region: Region::Arena, offset: top, view_of: None, name: String::new() };
                top += buf.ty.numel().div_ceil(16) * 64;
                shadows.push((*b, shadow));
            }
        }
        if shadows.is_empty() {
            return self.run(ins, comm, seed, &|b| p.buffer(*b));
        }
        let arena = &mut self.regions[Region::Arena.index()];
        if (arena.len() as u64) < top / 4 {
            arena.resize((top / 4) as usize, 0.0);
        }
        // Outputs the instruction writes whole need no widening: only what it reads.
        let reads_outputs = match &ins.kind {
            Kind::Op { accumulate, rows, .. } => *accumulate || *rows,
            Kind::Kernel { kernel } => kernel.rows.is_some(),
            Kind::Accumulate | Kind::Scale { .. } | Kind::Collective { .. } => true,
            _ => false,
        };
        for (b, shadow) in &shadows {
            if !reads_outputs && !ins.ins.contains(b) {
                continue;
            }
            let src = p.buffer(*b);
            let (words, shade) = shadow_split(&mut self.regions, src.region, shadow);
            decode(src.ty.dtype, region_bytes(words, src), shade);
        }
        let resolve = |b: &BufId| -> &Buffer {
            shadows.iter().find(|(s, _)| s == b).map(|(_, sh)| sh).unwrap_or_else(|| p.buffer(*b))
        };
        self.run(ins, comm, seed, &resolve)?;
        // Encode the outputs back.
        for b in &ins.outs {
            if let Some((_, shadow)) = shadows.iter().find(|(s, _)| s == b) {
                let dst = p.buffer(*b);
                let (words, shade) = shadow_split(&mut self.regions, dst.region, shadow);
                encode(dst.ty.dtype, shade, region_bytes_mut(words, dst));
            }
        }
        Ok(())
    }
}

/// One sequence's cached keys or values: their dims and elements, borrowed where they lie.
type Rows<'a> = (Vec<Dim>, std::borrow::Cow<'a, [f32]>);

/// The words of `region` (of the arena: those below the shadows) and the
/// elements of `shadow`, apart, so that a staged buffer is decoded into its
/// shadow (or encoded back) with no copy in between.
fn shadow_split<'r>(
    regions: &'r mut [Vec<f32>; Region::COUNT],
    region: Region,
    shadow: &Buffer,
) -> (&'r mut [f32], &'r mut [f32]) {
    let (a, r) = (Region::Arena.index(), region.index());
    let (at, n) = (shadow.offset as usize / 4, shadow.ty.numel() as usize);
    if r == a {
        let (low, high) = regions[a].split_at_mut(at);
        return (low, &mut high[..n]);
    }
    let [words, arena] = regions.get_disjoint_mut([r, a]).expect("two regions");
    (&mut words[..], &mut arena[at..at + n])
}

/// Buffer `b`'s bytes within its region's `words`.
fn region_bytes<'a>(words: &'a [f32], b: &Buffer) -> &'a [u8] {
    let (at, n) = (b.offset as usize, b.ty.bytes() as usize);
    assert!(at + n <= words.len() * 4, "buffer {} outside its region", b.ty);
    // SAFETY: the bytes lie inside the words (checked); any bytes are valid u8.
    unsafe { std::slice::from_raw_parts((words.as_ptr() as *const u8).add(at), n) }
}

fn region_bytes_mut<'a>(words: &'a mut [f32], b: &Buffer) -> &'a mut [u8] {
    let (at, n) = (b.offset as usize, b.ty.bytes() as usize);
    assert!(at + n <= words.len() * 4, "buffer {} outside its region", b.ty);
    // SAFETY: as `region_bytes`, borrowed mutably.
    unsafe { std::slice::from_raw_parts_mut((words.as_mut_ptr() as *mut u8).add(at), n) }
}

/// Elements of `dtype` (little-endian bytes) → f32 values: exact for
/// bf16, f16 and integers below 2²⁴ (token ids, counts).
pub(crate) fn decode(dtype: DType, bytes: &[u8], out: &mut [f32]) {
    fn each<const N: usize>(bytes: &[u8], out: &mut [f32], f: impl Fn([u8; N]) -> f32) {
        for (o, c) in out.iter_mut().zip(bytes.chunks_exact(N)) {
            *o = f(c.try_into().expect("N bytes"));
        }
    }
    match dtype {
        DType::F32 => each(bytes, out, f32::from_le_bytes),
        // bf16 is f32's upper half: widening is a shift.
        DType::Bf16 => each(bytes, out, |c| f32::from_bits(u32::from(u16::from_le_bytes(c)) << 16)),
        DType::F16 => each(bytes, out, |c| half::f16::from_bits(u16::from_le_bytes(c)).to_f32()),
        DType::I32 => each(bytes, out, |c| i32::from_le_bytes(c) as f32),
        DType::I64 => each(bytes, out, |c| i64::from_le_bytes(c) as f32),
        DType::Bool => each(bytes, out, |c: [u8; 1]| f32::from(c[0] != 0)),
    }
}

/// f32 values → elements of `dtype`: floats rounded to nearest (ties to
/// even, a NaN kept a NaN), integers truncated, `bool` nonzero.
pub(crate) fn encode(dtype: DType, src: &[f32], bytes: &mut [u8]) {
    fn each<const N: usize>(src: &[f32], bytes: &mut [u8], f: impl Fn(f32) -> [u8; N]) {
        for (x, c) in src.iter().zip(bytes.chunks_exact_mut(N)) {
            c.copy_from_slice(&f(*x));
        }
    }
    match dtype {
        DType::F32 => each(src, bytes, f32::to_le_bytes),
        DType::Bf16 => each(src, bytes, |x| bf16::from_f32(x).to_bits().to_le_bytes()),
        DType::F16 => each(src, bytes, |x| half::f16::from_f32(x).to_bits().to_le_bytes()),
        DType::I32 => each(src, bytes, |x| (x as i32).to_le_bytes()),
        DType::I64 => each(src, bytes, |x| (x as i64).to_le_bytes()),
        DType::Bool => each(src, bytes, |x| [u8::from(x != 0.0)]),
    }
}

impl Cpu {
    /// Run one instruction whose buffers (resolved by `buf`) are f32 or held beside the regions.
    fn run<'c, 'p>(
        &mut self,
        ins: &Instr,
        comm: Option<&'c RankComm<'c>>,
        seed: u64,
        buf: &dyn Fn(&BufId) -> &'p Buffer,
    ) -> Result<(), String> {
        match &ins.kind {
            Kind::Op { op: Op::MatMul { .. } | Op::Einsum, accumulate, rows: false, .. }
                if self
                    .contract(buf(&ins.ins[0]), buf(&ins.ins[1]), buf(&ins.outs[0]), *accumulate, None)
                    .is_some() =>
            {
                Ok(())
            }
            Kind::Op {
                op: op @ (Op::LayerNorm { .. } | Op::RmsNorm { .. } | Op::NormGradX { .. }),
                accumulate: false,
                rows: false,
                ..
            } if self.norms(op, &ins.ins.iter().map(buf).collect::<Vec<_>>(), buf(&ins.outs[0])).is_some() => Ok(()),
            Kind::Op { op: op @ Op::Attention { .. }, rng, accumulate: false, rows: false }
                if self
                    .attention_into(op, &ins.ins.iter().map(buf).collect::<Vec<_>>(), buf(&ins.outs[0]), *rng, seed)
                    .is_some() =>
            {
                Ok(())
            }
            Kind::Op {
                op:
                    op @ (Op::Dispatch
                    | Op::DispatchGrad
                    | Op::Combine
                    | Op::CombineGradY
                    | Op::CombineGradGates
                    | Op::CrossEntropy { .. }
                    | Op::CrossEntropyGrad { .. }
                    | Op::Embed
                    | Op::Attention { .. }),
                rng,
                accumulate,
                rows: false,
            } => {
                let out = buf(&ins.outs[0]);
                if !*accumulate && self.slots_into(op, &ins.ins.iter().map(buf).collect::<Vec<_>>(), out) {
                    return Ok(());
                }
                let t = {
                    let v = self.views(ins.ins.iter().map(buf));
                    on_views(op, &v, &out.ty.dims, *rng, seed)?
                };
                self.store(out, &t, *accumulate)
            }
            Kind::Op { op: Op::EmbedGrad, accumulate, rows: false, .. }
                if let Some(done) =
                    self.embed_grad(&ins.ins.iter().map(buf).collect::<Vec<_>>(), buf(&ins.outs[0]), *accumulate) =>
            {
                done
            }
            Kind::Op { op: op @ Op::NormGradGain { .. }, accumulate, rows: false, .. }
                if self
                    .norm_gain_grad(op, &ins.ins.iter().map(buf).collect::<Vec<_>>(), buf(&ins.outs[0]), *accumulate)
                    .is_some() =>
            {
                Ok(())
            }
            Kind::Op { op: op @ Op::Reduce { .. }, accumulate, rows: false, .. }
                if self.sums(op, buf(&ins.ins[0]), buf(&ins.outs[0]), *accumulate).is_some() =>
            {
                Ok(())
            }
            Kind::Op { op: op @ (Op::Take { .. } | Op::Untake { .. }), accumulate: false, rows: false, .. }
                if self.take_blocks(op, &ins.ins.iter().map(buf).collect::<Vec<_>>(), buf(&ins.outs[0])).is_some() =>
            {
                Ok(())
            }
            Kind::Op { op, accumulate, rows: true, .. } if !op.is_elementwise() => {
                let counts = self.counts(buf(ins.ins.last().expect("counts")));
                let out = buf(&ins.outs[0]);
                let done = match op {
                    Op::MatMul { .. } | Op::Einsum => {
                        self.contract(buf(&ins.ins[0]), buf(&ins.ins[1]), out, *accumulate, Some(&counts))
                    }
                    Op::Reduce { op: ReduceOp::Sum, dims } if dims.len() == 1 => {
                        self.sum_slots(buf(&ins.ins[0]), out, *accumulate, &counts)
                    }
                    _ => None,
                };
                done.ok_or_else(|| format!("`{}` of {} has no filled-slot form on the CPU", op.name(), out.ty))
            }
            Kind::SlotCounts { slots } => {
                let gates = self.tensor(buf(&ins.ins[0]));
                let out = buf(&ins.outs[0]);
                let counts = crate::exec::moe::slot_counts(gates.view(), *slots as usize, out.ty.numel() as usize);
                let values: Vec<f32> = counts.iter().map(|&c| c as f32).collect();
                self.slice_mut(out).copy_from_slice(&values);
                Ok(())
            }
            // (An elementwise op over filled slots that was not fused computes every row: the empty ones hold anything.)
            Kind::Op { op, rng, accumulate, .. } => {
                let args: Vec<Tensor<f32>> = ins.ins.iter().map(|b| self.tensor(buf(b))).collect();
                let out = buf(&ins.outs[0]);
                let t = eval(op, args, out, *rng, seed, comm)?;
                self.store(out, &t, *accumulate)
            }
            Kind::AttentionGrads { op, which, .. } => {
                let Op::AttentionGrad { forward, .. } = op else {
                    return Err("attention_grads names an op that is not attention_grad".into());
                };
                let (inb, outb): (Vec<&Buffer>, Vec<&Buffer>) =
                    (ins.ins.iter().map(buf).collect(), ins.outs.iter().map(buf).collect());
                if let Some(done) = self.attention_grads_into(op, forward.index(), which, &inb, &outb, seed) {
                    return done;
                }
                // Every gradient from one pass over the operands where they lie.
                let grads = {
                    let views = self.views(ins.ins.iter().map(buf));
                    let at = Attn::of(op, &views, Some(seed), forward.index()).ok_or("not an attention")?;
                    at.backward(views[views.len() - 1])
                };
                for (w, o) in which.iter().zip(&ins.outs) {
                    let g = grads.get(*w as usize).ok_or_else(|| format!("attention has no gradient {w}"))?;
                    self.store(buf(o), g, false)?;
                }
                Ok(())
            }
            Kind::Kernel { kernel } => {
                let args: Vec<&Buffer> = ins.ins.iter().chain(&ins.outs).map(buf).collect();
                let rows = kernel.rows.map(|r| self.counts(args[r]));
                self.kernel(kernel, &args, rows.as_deref(), seed)
            }
            Kind::Accumulate | Kind::Copy | Kind::Scale { .. } => {
                let (x, o) = (buf(&ins.ins[0]), buf(&ins.outs[0]));
                let same = x.region == o.region && x.offset == o.offset && x.ty.numel() == o.ty.numel();
                // On the regions (the operand is the output itself, or apart from
                // it), split over the kernel threads; else through a copy.
                let owned =
                    (!(same || disjoint(x, o)) || !in_regions(x) || !in_regions(o)).then(|| self.slice(x).to_vec());
                let bases = self.bases();
                // SAFETY: the operand's elements are the same elements (read at
                // the same position) or apart (checked).
                let out = unsafe { elems_mut(&bases, o) };
                let src = match &owned {
                    Some(v) => v.as_ptr(),
                    None => at(&bases, x) as *const f32,
                } as usize;
                let kind = &ins.kind;
                crate::exec::fast::par_rows(out, 1 << 14, |first, out| {
                    // SAFETY: the operand's elements at this piece's positions.
                    let x = unsafe { std::slice::from_raw_parts((src as *const f32).add(first << 14), out.len()) };
                    match *kind {
                        Kind::Accumulate => out.iter_mut().zip(x).for_each(|(o, v)| *o += *v),
                        Kind::Copy if !same => out.copy_from_slice(x),
                        Kind::Copy => {}
                        Kind::Scale { factor } => {
                            let f = factor as f32;
                            out.iter_mut().zip(x).for_each(|(o, v)| *o = *v * f);
                        }
                        _ => unreachable!("matched above"),
                    }
                });
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
                use rayon::prelude::*;
                for (i, o) in ins.ins.iter().zip(&ins.outs) {
                    // In f64, over fixed blocks summed in order: the same result on any number of threads.
                    let s: f64 = self
                        .slice(buf(i))
                        .par_chunks(1 << 16)
                        .map(|c| c.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>())
                        .collect::<Vec<f64>>()
                        .iter()
                        .sum();
                    self.slice_mut(buf(o))[0] = s as f32;
                }
                Ok(())
            }
            Kind::AddScalars => {
                let s: f64 = ins.ins.iter().map(|b| self.slice(buf(b))[0] as f64).sum();
                self.slice_mut(buf(&ins.outs[0]))[0] = s as f32;
                Ok(())
            }
            Kind::Collective { .. } => Err("bucket collectives run in `backend::run`".into()),
            Kind::Send { peer, tag } => {
                let c = comm.ok_or("a send needs the rank's communicator")?;
                let data: Vec<f32> = ins.ins.iter().flat_map(|b| self.slice(buf(b)).iter().copied()).collect();
                c.span("p2p", format!("send to rank {peer}"), || c.comm().send(*peer as usize, *tag, &data))
                    .map_err(|e| e.to_string())
            }
            Kind::Recv { peer, tag } => {
                let c = comm.ok_or("a receive needs the rank's communicator")?;
                let n: usize = ins.outs.iter().map(|b| buf(b).ty.numel() as usize).sum();
                let mut data = vec![0f32; n];
                c.span("p2p", format!("recv from rank {peer}"), || c.comm().recv(*peer as usize, *tag, &mut data))
                    .map_err(|e| e.to_string())?;
                let outs: Vec<&Buffer> = ins.outs.iter().map(buf).collect();
                self.scatter(&outs, &data);
                Ok(())
            }
            Kind::At { op: Op::Attention { window, .. }, dim } => {
                let [q, kc, vc, pos, blocks] = [0, 1, 2, 3, 4].map(|j| buf(&ins.ins[j]));
                let out = buf(&ins.outs[0]);
                let (pos, tables) = (self.ints(pos), self.ints(blocks));
                let batch = q.ty.dims[0].clone();
                let n = q.ty.dim(dim).map_or(0, |d| d.size as usize);
                let per = tables.len() / pos.len().max(1);
                let (q_all, q_one) = (self.slice(q), q.ty.numel() as usize / pos.len().max(1));
                let mut q_dims = q.ty.dims.clone();
                q_dims[0].size = 1;
                let mut o = vec![0f32; out.ty.numel() as usize];
                let o_one = o.len() / pos.len().max(1);
                // Each sequence's keys and values of positions [0, pos + n)
                // (borrowed where they lie), then the sequences in parallel.
                let mut work = Vec::new();
                for (b, &p) in pos.iter().enumerate() {
                    let Ok(p) = usize::try_from(p) else { continue };
                    let table = &tables[b * per..(b + 1) * per];
                    let k = self.gather_cache(kc, table, p + n, dim, &batch)?;
                    let v = self.gather_cache(vc, table, p + n, dim, &batch)?;
                    work.push((b, k, v));
                }
                let attend = |(b, (kd, k), (vd, v)): &(usize, Rows, Rows)| {
                    let mut ob = vec![0f32; o_one];
                    Attn {
                        q: View { dims: &q_dims, data: &q_all[b * q_one..(b + 1) * q_one] },
                        k: View { dims: kd, data: k },
                        v: View { dims: vd, data: v },
                        mask: None,
                        causal: true,
                        window: *window,
                        dropout: None,
                        t5: None,
                        xl: None,
                    }
                    .forward_into(&mut ob);
                    (*b, ob)
                };
                use rayon::prelude::*;
                let done: Vec<(usize, Vec<f32>)> = if work.len() > 1 {
                    work.par_iter().map(attend).collect()
                } else {
                    work.iter().map(attend).collect()
                };
                for (b, ob) in done {
                    o[b * o_one..(b + 1) * o_one].copy_from_slice(&ob);
                }
                self.store(out, &Tensor { dims: out.ty.dims.clone(), data: o }, false)
            }
            Kind::At { op: Op::Rope { theta, fraction }, .. } => {
                let (x, out) = (buf(&ins.ins[0]), buf(&ins.outs[0]));
                let pos = self.ints(buf(&ins.ins[1]));
                let x = self.tensor(x);
                let one = x.data.len() / pos.len().max(1);
                let mut dims = x.dims.clone();
                dims[0].size = 1;
                let mut y = Vec::with_capacity(x.data.len());
                for (b, &p) in pos.iter().enumerate() {
                    let xb = Tensor { dims: dims.clone(), data: x.data[b * one..(b + 1) * one].to_vec() };
                    y.extend(crate::exec::kernels::rope(&xb, *theta, *fraction, false, p.max(0) as usize).data);
                }
                self.store(out, &Tensor { dims: x.dims.clone(), data: y }, false)
            }
            Kind::At { op, .. } => Err(format!("`{}` does not run at a position", op.name())),
            Kind::RowsAt { .. } | Kind::CacheWrite { .. } => Err("rows are moved as bytes by `execute`".into()),
            // Events between the streams are kept by `backend::run`.
            Kind::Record { .. } | Kind::Wait { .. } => Ok(()),
            Kind::SkipIfNonFinite { .. } => Err("the guard is decided by `backend::run`".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_compiler::ir::{BinaryOp, DType, TensorType, UnaryOp};
    use tessera_compiler::kernel::{Expr, Kernel, strides};

    fn buf(dims: &[(&str, u64)], offset: u64) -> Buffer {
        let ty = TensorType::new(DType::F32, dims.iter().map(|(n, s)| Dim::new(*n, *s)).collect());
        Buffer { ty, region: Region::Arena, offset, view_of: None, name: String::new() }
    }

    /// A bf16 instruction computes in f32 from its bf16 operands and rounds
    /// what it stores: a contraction and a scaling in place of a bf16 view
    /// at a 2-byte offset give the bits of the f32 instruction on the same
    /// (rounded) values, rounded to nearest even; what the view does not
    /// cover is untouched.
    #[test]
    fn bf16_instructions_compute_in_f32_and_round_what_they_store() {
        use tessera_compiler::lower::{BufId, Stream};
        let (n, k, m) = (5u64, 7u64, 3u64);
        let mk = |dtype: DType, dims: &[(&str, u64)], offset: u64, view_of: Option<BufId>| {
            let ty = TensorType::new(dtype, dims.iter().map(|(d, s)| Dim::new(*d, *s)).collect());
            Buffer { ty, region: Region::Arena, offset, view_of, name: String::new() }
        };
        let program = |dtype: DType| {
            let e = dtype.bytes();
            let buffers = vec![
                mk(dtype, &[("i", n), ("k", k)], 0, None),
                mk(dtype, &[("k", k), ("j", m)], 256, None),
                mk(dtype, &[("i", n), ("j", m)], 512, None),
                // Elements 1..=4 of the output: a view at a 2-byte offset under bf16.
                mk(dtype, &[("v", 4)], 512 + e, Some(BufId(2))),
            ];
            let op = |kind: Kind, ins: Vec<u32>, outs: Vec<u32>| {
                Instr::new(
                    kind,
                    ins.into_iter().map(BufId).collect(),
                    outs.into_iter().map(BufId).collect(),
                    Stream::Compute,
                )
            };
            let einsum = Kind::Op { op: Op::Einsum, rng: None, accumulate: false, rows: false };
            let instrs = vec![op(einsum, vec![0, 1], vec![2]), op(Kind::Scale { factor: 0.3 }, vec![3], vec![3])];
            Program { rank: 0, coords: vec![], sizes: [0, 0, 0, 0, 1024, 0], buffers, instrs, phases: vec![] }
        };
        let values = |len: u64, salt: u64| -> Vec<f32> {
            (0..len).map(|i| ((i * 2654435761 + salt * 97) % 1000) as f32 / 77.0 - 6.3).collect()
        };
        let run = |p: &Program, a: &[f32], b: &[f32]| -> (Vec<f32>, Vec<f32>) {
            let mut cpu = Cpu::new();
            cpu.alloc(p.sizes).unwrap();
            cpu.upload(&p.buffers[0], a).unwrap();
            cpu.upload(&p.buffers[1], b).unwrap();
            cpu.execute(p, &p.instrs[0], None, 0).unwrap();
            let product = cpu.download(&p.buffers[2]).unwrap();
            cpu.execute(p, &p.instrs[1], None, 0).unwrap();
            (product, cpu.download(&p.buffers[2]).unwrap())
        };
        let half = program(DType::Bf16);
        let (a, b) = (values(n * k, 1), values(k * m, 2));
        let rounded = |v: &[f32]| v.iter().map(|x| bf16::from_f32(*x).to_f32()).collect::<Vec<f32>>();
        let (product, scaled) = run(&half, &a, &b);
        // The f32 instructions on the rounded operands, rounded.
        let (want, _) = run(&program(DType::F32), &rounded(&a), &rounded(&b));
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&product), bits(&rounded(&want)));
        assert_ne!(bits(&want), bits(&rounded(&want)), "the case must need rounding");
        for (i, (s, p)) in scaled.iter().zip(&product).enumerate() {
            let want = if (1..=4).contains(&i) { bf16::from_f32(p * 0.3f32).to_f32() } else { *p };
            assert_eq!(s.to_bits(), want.to_bits(), "element {i}");
        }
    }

    /// out[i, j] = gelu(x[j, i] + b[j]) · 2, over a loop nest whose rows
    /// (7) are shorter than a segment and whose size (7 × 700) spans several
    /// segments and threads; `x` is read transposed, `b` broadcast.
    fn kernel_case(out_offset: u64, engine: Engine) -> (Cpu, Buffer, Vec<f32>) {
        let (n, m) = (700u64, 7u64);
        let x = buf(&[("j", m), ("i", n)], 0);
        let b = buf(&[("j", m)], 4 * n * m);
        let out = buf(&[("i", n), ("j", m)], out_offset);
        let dims = out.ty.dims.clone();
        let k = Kernel {
            dims: dims.clone(),
            inputs: 2,
            strides: [&x, &b, &out].iter().map(|t| strides(&t.ty, &dims)).collect(),
            body: vec![
                Expr::Load { arg: 0 },
                Expr::Load { arg: 1 },
                Expr::Binary { op: BinaryOp::Add, a: 0, b: 1 },
                Expr::Unary { op: UnaryOp::Gelu, x: 2 },
                Expr::Const { value: 2.0 },
                Expr::Binary { op: BinaryOp::Mul, a: 3, b: 4 },
            ],
            stores: vec![(2, 5)],
            ops: vec![],
            rows: None,
        };
        let mut cpu = Cpu::with_engine(engine);
        cpu.alloc([0, 0, 0, 0, 4 * (2 * n * m + m), 0]).unwrap();
        let xs: Vec<f32> = (0..n * m).map(|i| (i as f32 * 0.37).sin()).collect();
        let bs: Vec<f32> = (0..m).map(|j| j as f32 * 0.1 - 0.3).collect();
        cpu.upload(&x, &xs).unwrap();
        cpu.upload(&b, &bs).unwrap();
        let want: Vec<f32> = (0..n * m)
            .map(|p| {
                let (i, j) = (p / m, p % m);
                crate::exec::kernels::gelu_f32(xs[(j * n + i) as usize] + bs[j as usize]) * 2.0
            })
            .collect();
        cpu.kernel(&k, &[&x, &b, &out], None, 0).unwrap();
        (cpu, out, want)
    }

    #[test]
    fn kernels_read_transposed_and_broadcast_arguments() {
        for engine in [Engine::Jit, Engine::Interp] {
            let (cpu, out, want) = kernel_case(4 * (700 * 7 + 7), engine);
            assert_eq!(cpu.download(&out).unwrap(), want, "{engine:?}");
        }
    }

    #[test]
    fn a_kernel_writing_over_an_input_read_at_other_positions_stages_its_stores() {
        // The output takes the transposed input's bytes: a store in place would clobber later reads.
        for engine in [Engine::Jit, Engine::Interp] {
            let (cpu, out, want) = kernel_case(0, engine);
            assert_eq!(cpu.download(&out).unwrap(), want, "{engine:?}");
        }
    }

    /// Every expression of the kernel IR (each unary op and its derivative,
    /// the binary ops, a power, dropout, a constant, an element read, the
    /// position along the row, comparisons), over
    /// a contiguous argument, a broadcast one and a strided one, at lengths
    /// that leave a scalar tail, on data with zeros of both signs,
    /// infinities and NaNs: the JIT's code and the interpreter give the
    /// same bits.
    #[test]
    fn the_jit_computes_every_expression_as_the_interpreter_does() {
        use tessera_compiler::ir::UnaryOp as U;
        let ops = [
            U::Neg,
            U::Exp,
            U::Log,
            U::Sqrt,
            U::Rsqrt,
            U::Tanh,
            U::Abs,
            U::Square,
            U::Gelu,
            U::GeluTanh,
            U::Silu,
            U::Relu,
            U::Sigmoid,
        ];
        let specials = [0.0f32, -0.0, f32::INFINITY, f32::NEG_INFINITY, f32::NAN, 1e-30, -1e30, 88.5, -104.0];
        // With a transposed argument the code runs position by position; without, four at a time.
        for (n, m, transposed) in
            [(37u64, 5u64, true), (37, 5, false), (4, 1, false), (1, 3, true), (130, 9, false), (3, 11, false)]
        {
            let x = buf(&[("i", n), ("j", m)], 0);
            let g = buf(&[("i", n), ("j", m)], 4 * n * m);
            let row = buf(&[("j", m)], 8 * n * m);
            let xt = if transposed {
                buf(&[("j", m), ("i", n)], 4 * (2 * n * m + m))
            } else {
                buf(&[("i", n), ("j", m)], 4 * (2 * n * m + m))
            };
            let hyper = buf(&[("h", 3)], 4 * (3 * n * m + m));
            let outs: Vec<Buffer> = (0..2 * ops.len() + 11)
                .map(|o| buf(&[("i", n), ("j", m)], 4 * (3 * n * m + m + 3 + o as u64 * n * m)))
                .collect();
            let dims = x.ty.dims.clone();
            let mut body = vec![
                Expr::Load { arg: 0 },
                Expr::Load { arg: 1 },
                Expr::Load { arg: 2 },
                Expr::Load { arg: 3 },
                Expr::Element { arg: 4, index: 2 },
                Expr::Const { value: 0.1 },
            ];
            let mut stores = Vec::new();
            for op in ops {
                body.push(Expr::Unary { op, x: 0 });
                stores.push(body.len() - 1);
                body.push(Expr::UnaryGrad { op, x: 0, g: 1 });
                stores.push(body.len() - 1);
            }
            for e in [
                Expr::Binary { op: BinaryOp::Add, a: 0, b: 2 },
                Expr::Binary { op: BinaryOp::Sub, a: 3, b: 0 },
                Expr::Binary { op: BinaryOp::Mul, a: 4, b: 1 },
                Expr::Binary { op: BinaryOp::Div, a: 0, b: 5 },
                Expr::Pow { x: 1, exp: 1.5 },
                Expr::Dropout { x: 0, p: 0.3, rng: 7 },
                Expr::Round { x: 0, dtype: DType::Bf16 },
                Expr::Round { x: 1, dtype: DType::F16 },
                Expr::Index,
                Expr::Equal { a: 0, b: 2 },
                Expr::Equal { a: 0, b: 0 },
            ] {
                body.push(e);
                stores.push(body.len() - 1);
            }
            let args: Vec<&Buffer> = [&x, &g, &row, &xt, &hyper].into_iter().chain(&outs).collect();
            let k = Kernel {
                dims: dims.clone(),
                inputs: 5,
                strides: args.iter().map(|b| strides(&b.ty, &dims)).collect(),
                body,
                stores: stores.iter().enumerate().map(|(o, v)| (5 + o, *v)).collect(),
                ops: vec![],
                rows: None,
            };
            let size = 4 * (3 * n * m + m + 3 + outs.len() as u64 * n * m);
            let fill = |len: u64, salt: u64| -> Vec<f32> {
                (0..len)
                    .map(|i| {
                        let h = (i * 2654435761 + salt * 97) % 1000;
                        if h.is_multiple_of(7) {
                            specials[(h / 7) as usize % specials.len()]
                        } else {
                            (h as f32 - 500.0) / 97.0
                        }
                    })
                    .collect()
            };
            let mut results = Vec::new();
            for engine in [Engine::Jit, Engine::Interp] {
                let mut cpu = Cpu::with_engine(engine);
                cpu.alloc([0, 0, 0, 0, size, 0]).unwrap();
                for (b, salt) in [(&x, 1), (&g, 2), (&row, 3), (&xt, 4), (&hyper, 5)] {
                    cpu.upload(b, &fill(b.ty.numel(), salt)).unwrap();
                }
                cpu.kernel(&k, &args, None, 11).unwrap();
                results.push(outs.iter().map(|o| cpu.download(o).unwrap()).collect::<Vec<_>>());
            }
            for (o, (jit, interp)) in results[0].iter().zip(&results[1]).enumerate() {
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(jit), bits(interp), "output {o} ({:?}) of a {n} x {m} loop", k.body[stores[o]]);
            }
            // The position along the row is j; x = x holds except where x is NaN.
            let at = |e: Expr| stores.iter().position(|&v| k.body[v] == e).expect("stored");
            let want: Vec<f32> = (0..n * m).map(|p| (p % m) as f32).collect();
            assert_eq!(results[0][at(Expr::Index)], want, "positions along a row of {m}");
            let xs = fill(n * m, 1);
            let same: Vec<f32> = xs.iter().map(|v| if v.is_nan() { 0.0 } else { 1.0 }).collect();
            assert_eq!(results[0][at(Expr::Equal { a: 0, b: 0 })], same);
        }
    }

    #[test]
    fn contractions_on_the_regions_match_the_interpreters_einsum() {
        // A projection [b, s, e] · [f, e] -> [b, s, f], then its accumulating weight gradient.
        let (bs, s, e, f) = (2u64, 5u64, 3u64, 4u64);
        let x = buf(&[("b", bs), ("s", s), ("e", e)], 0);
        let w = buf(&[("f", f), ("e", e)], 4 * bs * s * e);
        let y = buf(&[("b", bs), ("s", s), ("f", f)], 4 * (bs * s * e + f * e));
        let g = buf(&[("f", f), ("e", e)], 4 * (2 * bs * s * e + f * e + bs * s * f));
        let mut cpu = Cpu::new();
        cpu.alloc([0, 0, 0, 0, 4 * (2 * bs * s * e + 2 * f * e + bs * s * f), 0]).unwrap();
        let xs: Vec<f32> = (0..bs * s * e).map(|i| (i as f32 * 0.7).cos()).collect();
        let ws: Vec<f32> = (0..f * e).map(|i| (i as f32 * 0.3).sin()).collect();
        cpu.upload(&x, &xs).unwrap();
        cpu.upload(&w, &ws).unwrap();
        cpu.upload(&g, &vec![1.0; (f * e) as usize]).unwrap();
        let t = |b: &Buffer, d: &[f32]| Tensor { dims: b.ty.dims.clone(), data: d.to_vec() };
        assert!(cpu.contract(&x, &w, &y, false, None).is_some());
        let want = crate::exec::kernels::einsum(&t(&x, &xs), &t(&w, &ws), &y.ty.dims);
        assert_eq!(cpu.download(&y).unwrap(), want.data);
        // The weight gradient Σ_{b,s} y·x, added to what the buffer holds.
        let ys = want.data.clone();
        assert!(cpu.contract(&y, &x, &g, true, None).is_some());
        let want = crate::exec::kernels::einsum(&t(&y, &ys), &t(&x, &xs), &g.ty.dims);
        let got = cpu.download(&g).unwrap();
        for (a, b) in got.iter().zip(&want.data) {
            assert!((a - (b + 1.0)).abs() <= 1e-6 * (1.0 + b.abs()), "{a} vs {b} + 1");
        }
        // An output over its own operand's bytes is left to the interpreter's kernel.
        assert!(cpu.contract(&x, &w, &x, false, None).is_none());
    }

    /// `take` and `untake` as block copies on the regions give the
    /// interpreter's kernels' results, bit for bit (a repeated index adds).
    #[test]
    fn takes_and_untakes_on_the_regions_match_the_interpreter() {
        let (b, q, h) = (3u64, 3u64, 5u64);
        let whole = buf(&[("b", b), ("qkv", q), ("h", h)], 0);
        let n = b * q * h;
        let part = |i: u64| buf(&[("b", b), ("h", h)], 4 * (n + i * b * h));
        let mut cpu = Cpu::new();
        cpu.alloc([0, 0, 0, 0, 4 * (n + 3 * b * h), 0]).unwrap();
        let xs: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
        cpu.upload(&whole, &xs).unwrap();
        let x = Tensor { dims: whole.ty.dims.clone(), data: xs.clone() };
        for i in 0..q {
            let op = Op::Take { dim: "qkv".into(), index: i };
            assert!(cpu.take_blocks(&op, &[&whole], &part(i)).is_some());
            let want = crate::exec::kernels::take(&x, "qkv", i as usize, &part(i).ty.dims);
            assert_eq!(cpu.download(&part(i)).unwrap(), want.data);
        }
        // Untake the three parts with index 1 twice: index 2 stays zero.
        let indices = vec![0, 1, 1];
        let parts: Vec<Tensor<f32>> =
            (0..q).map(|i| Tensor { dims: part(i).ty.dims.clone(), data: cpu.download(&part(i)).unwrap() }).collect();
        let op = Op::Untake { dim: "qkv".into(), indices: indices.clone() };
        let bufs: Vec<Buffer> = (0..q).map(part).collect();
        assert!(cpu.take_blocks(&op, &bufs.iter().collect::<Vec<_>>(), &whole).is_some());
        let refs: Vec<&Tensor<f32>> = parts.iter().collect();
        let want = crate::exec::kernels::untake(&refs, "qkv", &indices, &whole.ty.dims);
        assert_eq!(cpu.download(&whole).unwrap(), want.data);
        // A part laid out otherwise is left to the interpreter.
        let other = buf(&[("h", h), ("b", b)], 4 * n);
        assert!(cpu.take_blocks(&Op::Take { dim: "qkv".into(), index: 0 }, &[&whole], &other).is_none());
    }

    /// The buffers of a norm case over `r` rows of `e`: x, gain, bias, an
    /// output gradient g and an output, one after another in the arena, with
    /// their values (x, gain, bias, g) and the arena's size.
    fn norm_case(r: u64, e: u64) -> ([Buffer; 5], [Vec<f32>; 4], u64) {
        let n = r * e;
        let bufs = [
            buf(&[("row", r), ("e", e)], 0),
            buf(&[("e", e)], 4 * n),
            buf(&[("e", e)], 4 * (n + e)),
            buf(&[("row", r), ("e", e)], 4 * (n + 2 * e)),
            buf(&[("row", r), ("e", e)], 4 * (2 * n + 2 * e)),
        ];
        let data = |k: f32, m: u64| -> Vec<f32> { (0..m).map(|i| (i as f32 * k).sin() * 3.0 + 0.1).collect() };
        (bufs, [data(0.37, n), data(0.11, e), data(0.23, e), data(0.71, n)], 4 * (3 * n + 2 * e))
    }

    /// Norms and their input gradient on the regions give the interpreter's
    /// kernels' results bit for bit, in place too; a norm over a dim that is
    /// not last is left to the interpreter.
    #[test]
    fn norms_on_the_regions_match_the_interpreter() {
        let ([x, gain, bias, g, out], [xs, ws, bs, gs], size) = norm_case(7, 48);
        let mut cpu = Cpu::new();
        cpu.alloc([0, 0, 0, 0, size, 0]).unwrap();
        for (b, d) in [(&x, &xs), (&gain, &ws), (&bias, &bs), (&g, &gs)] {
            cpu.upload(b, d).unwrap();
        }
        let t = |b: &Buffer, d: &[f32]| Tensor { dims: b.ty.dims.clone(), data: d.to_vec() };
        use crate::exec::kernels as k;
        let ln = Op::LayerNorm { dim: "e".into(), eps: 1e-5, gain: true, bias: true };
        assert!(cpu.norms(&ln, &[&x, &gain, &bias], &out).is_some());
        let want = k::norm(&t(&x, &xs), "e", 1e-5, false, Some(&t(&gain, &ws)), Some(&t(&bias, &bs)));
        assert_eq!(cpu.download(&out).unwrap(), want.data);
        let dx = Op::NormGradX { dim: "e".into(), eps: 1e-5, gain: true, rms: true };
        assert!(cpu.norms(&dx, &[&x, &gain, &g], &out).is_some());
        let want = k::norm_grad_x(&t(&x, &xs), Some(&t(&gain, &ws)), &t(&g, &gs), "e", 1e-5, true);
        assert_eq!(cpu.download(&out).unwrap(), want.data);
        // RMSNorm in place over its input.
        let rms = Op::RmsNorm { dim: "e".into(), eps: 1e-6, gain: false };
        assert!(cpu.norms(&rms, &[&x], &x).is_some());
        let want = k::norm(&t(&x, &xs), "e", 1e-6, true, None, None);
        assert_eq!(cpu.download(&x).unwrap(), want.data);
        let across = Op::LayerNorm { dim: "row".into(), eps: 1e-5, gain: false, bias: false };
        assert!(cpu.norms(&across, &[&g], &out).is_none());
        // The gain's gradient, into a gradient that holds a value already and into a fresh one.
        cpu.upload(&x, &xs).unwrap();
        for (rms, accumulate) in [(false, true), (true, false)] {
            let op = Op::NormGradGain { dim: "e".into(), eps: 1e-5, rms };
            cpu.upload(&gain, &ws).unwrap();
            assert!(cpu.norm_gain_grad(&op, &[&x, &g], &gain, accumulate).is_some());
            let mut want = k::norm_grad_gain(&t(&x, &xs), &t(&g, &gs), "e", 1e-5, rms).data;
            if accumulate {
                want.iter_mut().zip(&ws).for_each(|(v, w)| *v += *w);
            }
            assert_eq!(cpu.download(&gain).unwrap(), want, "rms {rms}, accumulate {accumulate}");
        }
    }

    /// The row ops as fused row kernels (`rows`): layer_norm, rms_norm,
    /// norm_grad_x, softmax and log-softmax and their gradients, each
    /// expanded by the compiler's one decomposition and
    /// followed by an elementwise op, give the bits of the unfused row
    /// functions, under both engines, for rows whose length is not a
    /// multiple of 8 (the sums' tail) and enough rows to span several
    /// blocks and threads, with the output written over the input.
    #[test]
    fn row_kernels_compute_the_row_functions_bits() {
        use crate::exec::kernels as k;
        use tessera_compiler::kernel::{Kernel, expand};
        for (r, e) in [(700u64, 13u64), (5, 64), (3, 1)] {
            let ([x, gain, bias, g, out], [xs, ws, bs, gs], size) = norm_case(r, e);
            let t = |b: &Buffer, d: &[f32]| Tensor { dims: b.ty.dims.clone(), data: d.to_vec() };
            let (tx, tw, tb, tg) = (t(&x, &xs), t(&gain, &ws), t(&bias, &bs), t(&g, &gs));
            let twice = |v: Vec<f32>| v.into_iter().map(|y| y * 2.0).collect::<Vec<f32>>();
            let cases: Vec<(Op, Vec<&Buffer>, Vec<f32>)> = vec![
                (
                    Op::LayerNorm { dim: "e".into(), eps: 1e-5, gain: true, bias: true },
                    vec![&x, &gain, &bias],
                    k::norm(&tx, "e", 1e-5, false, Some(&tw), Some(&tb)).data,
                ),
                (
                    Op::RmsNorm { dim: "e".into(), eps: 1e-6, gain: false },
                    vec![&x],
                    k::norm(&tx, "e", 1e-6, true, None, None).data,
                ),
                (
                    Op::NormGradX { dim: "e".into(), eps: 1e-5, gain: true, rms: false },
                    vec![&x, &gain, &g],
                    k::norm_grad_x(&tx, Some(&tw), &tg, "e", 1e-5, false).data,
                ),
                (
                    Op::NormGradX { dim: "e".into(), eps: 1e-5, gain: false, rms: true },
                    vec![&x, &g],
                    k::norm_grad_x(&tx, None, &tg, "e", 1e-5, true).data,
                ),
                (Op::Softmax { dim: "e".into(), log: false }, vec![&x], k::softmax(&tx, "e", false).data),
                (Op::Softmax { dim: "e".into(), log: true }, vec![&x], k::softmax(&tx, "e", true).data),
                (
                    Op::SoftmaxGrad { dim: "e".into(), log: false },
                    vec![&x, &g],
                    k::softmax_grad(&tx, &tg, "e", false).data,
                ),
                (
                    Op::SoftmaxGrad { dim: "e".into(), log: true },
                    vec![&x, &g],
                    k::softmax_grad(&tx, &tg, "e", true).data,
                ),
            ];
            for (op, ins, want) in cases {
                for (engine, target) in [(Engine::Jit, &out), (Engine::Interp, &out), (Engine::Jit, &x)] {
                    let mut body: Vec<Expr> = (0..ins.len()).map(|arg| Expr::Load { arg }).collect();
                    let loads: Vec<usize> = (0..ins.len()).collect();
                    let y = expand(&op, &loads, None, e, &mut body).unwrap();
                    let two = body.len();
                    body.push(Expr::Const { value: 2.0 });
                    body.push(Expr::Binary { op: BinaryOp::Mul, a: y, b: two });
                    let args: Vec<&Buffer> = ins.iter().copied().chain([target]).collect();
                    let dims = x.ty.dims.clone();
                    let kern = Kernel {
                        dims: dims.clone(),
                        inputs: ins.len(),
                        strides: args.iter().map(|b| strides(&b.ty, &dims)).collect(),
                        stores: vec![(ins.len(), body.len() - 1)],
                        body,
                        ops: vec![],
                        rows: None,
                    };
                    assert!(kern.is_row());
                    let mut cpu = Cpu::with_engine(engine);
                    cpu.alloc([0, 0, 0, 0, size, 0]).unwrap();
                    for (b, d) in [(&x, &xs), (&gain, &ws), (&bias, &bs), (&g, &gs)] {
                        cpu.upload(b, d).unwrap();
                    }
                    cpu.kernel(&kern, &args, None, 0).unwrap();
                    let got = cpu.download(target).unwrap();
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&got), bits(&twice(want.clone())), "{op:?} over {r} rows of {e}, {engine:?}");
                }
            }
        }
    }

    /// Sums and means over a contiguous run of dims (leading, middle, last,
    /// all), added into an output or not, large enough to split over the
    /// threads: the same bits as the interpreter's `sum_over`; a run that is
    /// not contiguous is left to the interpreter.
    #[test]
    fn sums_on_the_regions_match_the_interpreter() {
        let (a, b, c) = (33u64, 70u64, 29u64);
        let n = a * b * c;
        let x = buf(&[("a", a), ("b", b), ("c", c)], 0);
        let mut cpu = Cpu::new();
        cpu.alloc([0, 0, 0, 0, 4 * 2 * n, 0]).unwrap();
        let xs: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin() * 3.0 + 0.1).collect();
        cpu.upload(&x, &xs).unwrap();
        let t = Tensor { dims: x.ty.dims.clone(), data: xs.clone() };
        for names in [&["a"][..], &["a", "b"], &["b"], &["c"], &["b", "c"], &["a", "b", "c"]] {
            let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
            let keep: Vec<(&str, u64)> =
                [("a", a), ("b", b), ("c", c)].into_iter().filter(|(d, _)| !names.iter().any(|x| x == d)).collect();
            let out = buf(&keep, 4 * n);
            let prior: Vec<f32> = (0..out.ty.numel()).map(|i| i as f32 * 0.5 - 3.0).collect();
            for (how, accumulate) in [(ReduceOp::Sum, false), (ReduceOp::Sum, true), (ReduceOp::Mean, true)] {
                cpu.upload(&out, &prior).unwrap();
                let op = Op::Reduce { op: how, dims: names.clone() };
                assert!(cpu.sums(&op, &x, &out, accumulate).is_some(), "{names:?}");
                let mut want = t.sum_over(&names).data;
                if how == ReduceOp::Mean {
                    let m = (n as usize / want.len().max(1)) as f32;
                    want.iter_mut().for_each(|v| *v /= m);
                }
                if accumulate {
                    want.iter_mut().zip(&prior).for_each(|(v, p)| *v += *p);
                }
                assert_eq!(cpu.download(&out).unwrap(), want, "{how:?} over {names:?}, accumulate {accumulate}");
            }
        }
        let apart = Op::Reduce { op: ReduceOp::Sum, dims: vec!["a".into(), "c".into()] };
        assert!(cpu.sums(&apart, &x, &buf(&[("b", b)], 4 * n), false).is_none());
    }

    /// An embedding's gradient on the regions: repeated ids summed in order,
    /// rows no id names left plus zero (a −0 becomes +0, as the interpreter's
    /// add does), into a gradient that holds values and into a fresh one.
    #[test]
    fn embed_gradients_on_the_regions_match_the_interpreter() {
        let (v, w, n) = (11u64, 6u64, 9u64);
        let ids = buf(&[("t", n)], 0);
        let g = buf(&[("t", n), ("e", w)], 4 * n);
        let out = buf(&[("vocab", v), ("e", w)], 4 * (n + n * w));
        let mut cpu = Cpu::new();
        cpu.alloc([0, 0, 0, 0, 4 * (n + n * w + v * w), 0]).unwrap();
        let idv: Vec<f32> = [3.0, 7.0, 3.0, 0.0, 10.0, 3.0, 7.0, 1.0, 0.0].to_vec();
        let gv: Vec<f32> = (0..n * w).map(|i| (i as f32 * 0.61).sin()).collect();
        let mut prior: Vec<f32> = (0..v * w).map(|i| (i as f32 * 0.3).cos()).collect();
        prior[5 * w as usize] = -0.0;
        cpu.upload(&ids, &idv).unwrap();
        cpu.upload(&g, &gv).unwrap();
        let table = crate::exec::kernels::embed_grad(
            &Tensor { dims: ids.ty.dims.clone(), data: idv.clone() },
            &Tensor { dims: g.ty.dims.clone(), data: gv.clone() },
            &out.ty.dims,
        );
        for accumulate in [true, false] {
            cpu.upload(&out, &prior).unwrap();
            cpu.embed_grad(&[&ids, &g], &out, accumulate).expect("this layout").expect("ids in the table");
            let want: Vec<u32> = if accumulate {
                prior.iter().zip(&table.data).map(|(p, t)| (*p + *t).to_bits()).collect()
            } else {
                table.data.iter().map(|t| t.to_bits()).collect()
            };
            let got: Vec<u32> = cpu.download(&out).unwrap().iter().map(|x| x.to_bits()).collect();
            assert_eq!(got, want, "accumulate {accumulate}");
        }
        cpu.upload(&ids, &[11.0; 9]).unwrap();
        let e = cpu.embed_grad(&[&ids, &g], &out, true).expect("this layout").unwrap_err();
        assert!(e.contains("id 11 is outside the embedding table's 11 rows"), "{e}");
    }

    /// Over filled slots: an expert GEMM computes the filled rows only, and a
    /// weight gradient sums the filled slots only, whatever the empty rows hold.
    #[test]
    fn contractions_over_filled_slots_read_only_filled_rows() {
        let (e, s, d, f) = (3u64, 4u64, 2u64, 5u64);
        let counts = [2usize, 0, 4];
        let x = buf(&[("expert", e), ("slot", s), ("d", d)], 0);
        let w = buf(&[("expert", e), ("d", d), ("f", f)], 4 * e * s * d);
        let y = buf(&[("expert", e), ("slot", s), ("f", f)], 4 * (e * s * d + e * d * f));
        let g = buf(&[("expert", e), ("d", d), ("f", f)], 4 * (e * s * d + e * d * f + e * s * f));
        let mut cpu = Cpu::new();
        cpu.alloc([0, 0, 0, 0, 4 * (e * s * d + 2 * e * d * f + e * s * f), 0]).unwrap();
        // Empty rows hold NaN: nothing may read them.
        let filled = |i: usize, width: u64| (i as u64 / width) % s < counts[(i as u64 / (s * width)) as usize] as u64;
        let xs: Vec<f32> =
            (0..e * s * d).map(|i| if filled(i as usize, d) { (i as f32 * 0.3).sin() } else { f32::NAN }).collect();
        let ws: Vec<f32> = (0..e * d * f).map(|i| (i as f32 * 0.7).cos()).collect();
        cpu.upload(&x, &xs).unwrap();
        cpu.upload(&w, &ws).unwrap();
        assert!(cpu.contract(&x, &w, &y, false, Some(&counts)).is_some());
        let ys = cpu.download(&y).unwrap();
        let zero = |v: &[f32]| v.iter().map(|x| if x.is_nan() { 0.0 } else { *x }).collect::<Vec<f32>>();
        let t = |b: &Buffer, v: &[f32]| Tensor { dims: b.ty.dims.clone(), data: v.to_vec() };
        let want = crate::exec::kernels::einsum(&t(&x, &zero(&xs)), &t(&w, &ws), &y.ty.dims);
        for (i, (a, b)) in ys.iter().zip(&want.data).enumerate() {
            if filled(i, f) {
                assert!((a - b).abs() <= 1e-6, "row element {i}: {a} vs {b}");
            }
        }
        // The weight gradient Σ_{filled slots} x ⊗ y (y's empty rows are whatever the GEMM left: zeros here).
        let ys_nan: Vec<f32> = ys.iter().enumerate().map(|(i, v)| if filled(i, f) { *v } else { f32::NAN }).collect();
        cpu.upload(&y, &ys_nan).unwrap();
        assert!(cpu.contract(&x, &y, &g, false, Some(&counts)).is_some());
        let want = crate::exec::kernels::einsum(&t(&x, &zero(&xs)), &t(&y, &zero(&ys_nan)), &g.ty.dims);
        let got = cpu.download(&g).unwrap();
        assert!(got.iter().all(|v| v.is_finite()));
        for (a, b) in got.iter().zip(&want.data) {
            assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{a} vs {b}");
        }
        // An expert with no filled slot has a zero gradient.
        assert!(got[(d * f) as usize..(2 * d * f) as usize].iter().all(|v| *v == 0.0));
    }
}
