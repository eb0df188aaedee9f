//! The kernel-IR interpreter: runs a fused kernel (`compiler::kernel::Kernel`)
//! over f32 slices.
//!
//! The loop nest is walked in segments: runs of at most [`BLOCK`] positions
//! along the innermost dim. Within a segment every argument is read at a
//! fixed stride (1: a slice; 0: one broadcast value; other: a gather), and
//! each body value is computed for the whole segment before the next, in
//! loops the compiler vectorizes. The scalar functions are the node-by-node
//! interpreter's own (`exec::kernels`), so a fused kernel computes what its
//! ops computed one at a time.

use crate::exec::kernels::{gelu_dt_f32, gelu_f32, unary_df, unary_f, uniform};
use tessera_compiler::ir::{BinaryOp, DType, UnaryOp};
use tessera_compiler::kernel::{Expr, Kernel};

/// Positions a segment holds at most.
pub const BLOCK: usize = 256;

/// A kernel's arguments: one pointer to each argument's first element.
/// Loads and stores both go through them, since an output may share an
/// input's bytes (in place).
pub struct Args(pub Vec<*mut f32>);

// SAFETY: threads run disjoint loop positions (see `run`'s contract), so a
// store never meets another thread's load or store of the same element.
unsafe impl Sync for Args {}
unsafe impl Send for Args {}

impl Args {
    /// The pointers, one per argument.
    pub fn pointers(&self) -> &[*mut f32] {
        &self.0
    }
}

/// A kernel's loop nest as the walk sees it: dims of size 1 dropped and
/// adjacent dims merged wherever every argument is contiguous across them
/// (stride of the outer = stride of the inner × its size), so that a
/// segment is as long as the arguments' layouts allow. Positions keep their
/// row-major order.
pub struct Nest {
    pub sizes: Vec<usize>,
    /// Per argument, its stride along each dim.
    pub strides: Vec<Vec<usize>>,
}

impl Nest {
    pub fn of(k: &Kernel) -> Nest {
        let mut sizes: Vec<usize> = Vec::new();
        let mut strides: Vec<Vec<usize>> = vec![Vec::new(); k.strides.len()];
        for (d, dim) in k.dims.iter().enumerate().filter(|(_, dim)| dim.size != 1) {
            let n = dim.size as usize;
            let merge = !sizes.is_empty()
                && k.strides.iter().zip(&strides).all(|(s, own)| own.last().copied() == Some(s[d] as usize * n));
            if merge {
                *sizes.last_mut().expect("a dim to merge into") *= n;
                for (s, own) in k.strides.iter().zip(strides.iter_mut()) {
                    *own.last_mut().expect("a stride per dim") = s[d] as usize;
                }
            } else {
                sizes.push(n);
                for (s, own) in k.strides.iter().zip(strides.iter_mut()) {
                    own.push(s[d] as usize);
                }
            }
        }
        if sizes.is_empty() {
            sizes.push(1);
            strides.iter_mut().for_each(|s| s.push(0));
        }
        Nest { sizes, strides }
    }

    /// Argument `arg`'s stride along the innermost dim.
    pub fn inner(&self, arg: usize) -> usize {
        *self.strides[arg].last().expect("a stride per dim")
    }

    /// Walk loop positions `first .. first + count` in segments of at most
    /// `max` positions along the innermost dim, calling `f(offsets, start,
    /// len)` with each argument's element offset at the segment's first
    /// position, that position's row-major index, and the segment's length.
    pub fn segments(&self, first: usize, count: usize, max: usize, mut f: impl FnMut(&[usize], usize, usize)) {
        let sizes = &self.sizes;
        let rank = sizes.len();
        let inner = sizes[rank - 1].max(1);
        // The loop index of position `first`.
        let mut idx = vec![0usize; rank];
        let mut left = first;
        for d in (0..rank).rev() {
            idx[d] = left % sizes[d].max(1);
            left /= sizes[d].max(1);
        }
        let mut offsets = vec![0usize; self.strides.len()];
        let mut done = 0;
        while done < count {
            let len = max.min(inner - idx[rank - 1]).min(count - done);
            for (o, s) in offsets.iter_mut().zip(&self.strides) {
                *o = idx.iter().zip(s).map(|(i, s)| i * s).sum();
            }
            f(&offsets, first + done, len);
            // The loop index of the next segment's first position.
            let mut carry = len;
            for d in (0..rank).rev() {
                let total = idx[d] + carry;
                idx[d] = total % sizes[d].max(1);
                carry = total / sizes[d].max(1);
            }
            done += len;
        }
    }
}

/// Evaluate kernel `k` (walked as `nest`, its [`Nest::of`]) over loop
/// positions `first .. first + count`.
///
/// # Safety
/// Every pointer in `args` must address the elements its strides reach
/// over the whole loop nest; no other thread may touch the elements of
/// positions in this range; and a store's elements may be read by a load
/// only at the same position (the caller stages stores otherwise).
pub unsafe fn run(k: &Kernel, nest: &Nest, args: &Args, seed: u64, first: usize, count: usize) {
    let mut vals: Vec<[f32; BLOCK]> = vec![[0f32; BLOCK]; k.body.len()];
    let row = k.dims.last().map_or(1, |d| d.size as usize);
    nest.segments(first, count, BLOCK, |offsets, start, len| {
        // Each argument's offset at the segment's start, and its stride along the segment.
        let base = |arg: usize| -> (usize, usize) { (offsets[arg], nest.inner(arg)) };
        for (i, e) in k.body.iter().enumerate() {
            let (before, rest) = vals.split_at_mut(i);
            let o = &mut rest[0][..len];
            match *e {
                Expr::Load { arg } => {
                    let (off, step) = base(arg);
                    // SAFETY: the caller's contract: the argument's elements at this segment's positions.
                    let at = |j: usize| unsafe { *args.0[arg].add(off + j * step) };
                    match step {
                        // SAFETY: as above, `len` consecutive elements.
                        1 => o.copy_from_slice(unsafe { std::slice::from_raw_parts(args.0[arg].add(off), len) }),
                        0 => o.fill(at(0)),
                        _ => o.iter_mut().enumerate().for_each(|(j, o)| *o = at(j)),
                    }
                }
                Expr::Element { arg, index } => {
                    // SAFETY: the caller's contract covers the argument's whole buffer.
                    o.fill(unsafe { *args.0[arg].add(index as usize) })
                }
                Expr::Const { value } => o.fill(value as f32),
                Expr::Unary { op, x } => unary(op, &before[x][..len], o),
                Expr::UnaryGrad { op, x, g } => unary_grad(op, &before[x][..len], &before[g][..len], o),
                Expr::Binary { op, a, b } => {
                    let it = o.iter_mut().zip(&before[a][..len]).zip(&before[b][..len]);
                    match op {
                        BinaryOp::Add => it.for_each(|((o, x), y)| *o = *x + *y),
                        BinaryOp::Sub => it.for_each(|((o, x), y)| *o = *x - *y),
                        BinaryOp::Mul => it.for_each(|((o, x), y)| *o = *x * *y),
                        BinaryOp::Div => it.for_each(|((o, x), y)| *o = *x / *y),
                    }
                }
                Expr::Pow { x, exp } => pow(&before[x][..len], o, exp as f32),
                Expr::Dropout { x, p, rng } => dropout(&before[x][..len], o, seed, rng, start as u64, p),
                Expr::Round { x, dtype } => round(&before[x][..len], o, dtype),
                // A row kernel runs as elementwise passes (`backend::rows`), never here.
                Expr::Reduce { .. } => unreachable!("a row reduction outside its passes"),
                Expr::Index => index(o, start, row),
                Expr::Equal { a, b } => equal(&before[a][..len], &before[b][..len], o),
            }
        }
        for &(arg, v) in &k.stores {
            let (off, step) = base(arg);
            let dst = args.0[arg];
            if step == 1 {
                // SAFETY: the caller's contract: this segment's `len` elements of a store argument.
                unsafe { std::ptr::copy_nonoverlapping(vals[v].as_ptr(), dst.add(off), len) };
            } else {
                for (j, x) in vals[v][..len].iter().enumerate() {
                    // SAFETY: the caller's contract: this position's element of a store argument.
                    unsafe { *dst.add(off + j * step) = *x };
                }
            }
        }
    });
}

// The functions of a segment's values: the JIT's code calls them too
// (`jit`), so that both compute the same bits.

/// `o = op(x)`.
pub(super) fn unary(op: UnaryOp, x: &[f32], o: &mut [f32]) {
    let it = o.iter_mut().zip(x);
    match op {
        UnaryOp::Gelu => it.for_each(|(o, v)| *o = gelu_f32(*v)),
        UnaryOp::Neg => it.for_each(|(o, v)| *o = -*v),
        UnaryOp::Square => it.for_each(|(o, v)| *o = *v * *v),
        UnaryOp::Abs => it.for_each(|(o, v)| *o = v.abs()),
        // Rounding the f64 root to f32 gives the f32 root (the interpreter's result).
        UnaryOp::Sqrt => it.for_each(|(o, v)| *o = v.sqrt()),
        UnaryOp::Relu => it.for_each(|(o, v)| *o = v.max(0.0)),
        _ => it.for_each(|(o, v)| *o = unary_f(op, *v as f64) as f32),
    }
}

/// `o = g · op'(x)`.
pub(super) fn unary_grad(op: UnaryOp, x: &[f32], g: &[f32], o: &mut [f32]) {
    let it = o.iter_mut().zip(x).zip(g);
    match op {
        UnaryOp::Gelu => it.for_each(|((o, v), g)| *o = *g * gelu_dt_f32(*v)),
        _ => it.for_each(|((o, v), g)| *o = *g * unary_df(op, *v as f64) as f32),
    }
}

/// `o = x^e`.
pub(super) fn pow(x: &[f32], o: &mut [f32], e: f32) {
    o.iter_mut().zip(x).for_each(|(o, v)| *o = v.powf(e));
}

/// `o = x` rounded to `dtype`'s precision (to nearest, ties to even), as f32.
pub(super) fn round(x: &[f32], o: &mut [f32], dtype: DType) {
    let it = o.iter_mut().zip(x);
    match dtype {
        DType::Bf16 => it.for_each(|(o, v)| *o = half::bf16::from_f32(*v).to_f32()),
        DType::F16 => it.for_each(|(o, v)| *o = half::f16::from_f32(*v).to_f32()),
        _ => it.for_each(|(o, v)| *o = *v),
    }
}

/// Inverted dropout of positions `start ..` (row-major in the loop nest)
/// with random stream `rng`.
pub(super) fn dropout(x: &[f32], o: &mut [f32], seed: u64, rng: u64, start: u64, p: f64) {
    let scale = (1.0 / (1.0 - p)) as f32;
    for (j, (o, v)) in o.iter_mut().zip(x).enumerate() {
        *o = if uniform(seed, rng, start + j as u64) < p { 0.0 } else { *v * scale };
    }
}

/// `o[j]` = the position along the innermost dim (`row` long) of row-major
/// position `start + j`.
pub(super) fn index(o: &mut [f32], start: usize, row: usize) {
    let row = row.max(1);
    o.iter_mut().enumerate().for_each(|(j, o)| *o = ((start + j) % row) as f32);
}

/// `o = 1` where `a = b`, else 0.
pub(super) fn equal(a: &[f32], b: &[f32], o: &mut [f32]) {
    o.iter_mut().zip(a).zip(b).for_each(|((o, a), b)| *o = f32::from(u8::from(a == b)));
}
