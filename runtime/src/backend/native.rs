//! Kernels compiled ahead of time: the fused kernels of a generated Rust
//! module (`tessera_compiler::codegen::rust`), which rustc compiled with
//! the user's crate. The CPU backend runs them as it runs the JIT's code
//! ([`super::cpu::Engine::Native`]): the same loop-nest walk, thread split,
//! staging and row passes; only the code of a segment differs.
//!
//! A generated kernel is a safe function of one [`Segment`]: its inputs and
//! outputs as slices, each either contiguous (`len` elements) or one
//! broadcast element. The walk here makes them so: an argument read or
//! written at another stride is gathered into (or scattered from) a
//! contiguous run, and an input that shares bytes with an output is copied
//! first, so that no slice aliases a mutable one.
//!
//! The scalar functions a kernel calls ([`f`]) are the interpreter's, so a
//! generated kernel computes the interpreter's (and the JIT's) bits.

use super::interp::{Args, Nest};
use tessera_compiler::kernel::{Expr, Kernel};

/// One segment of a kernel's loop nest: `len` positions along the innermost
/// dim, from row-major position `start`.
pub struct Segment<'s, 'a> {
    /// Per input: `len` elements, or one where it is broadcast along the segment.
    pub ins: &'s [&'a [f32]],
    /// Per output: `len` elements, or one where it holds one value per row.
    pub outs: &'s mut [&'a mut [f32]],
    /// The kernel's `Element` reads (hyperparameters), in body order.
    pub elements: &'s [f32],
    pub len: usize,
    pub start: usize,
    /// The step's seed (dropout's masks).
    pub seed: u64,
}

/// A generated kernel.
pub type KernelFn = fn(Segment<'_, '_>);

/// A generated kernel and the key of the kernels it computes
/// (`Kernel::native_key`).
#[derive(Clone, Copy)]
pub struct NativeKernel {
    pub key: u64,
    pub run: KernelFn,
}

/// A generated module's kernels.
#[derive(Clone, Copy)]
pub struct Kernels(pub &'static [NativeKernel]);

impl std::fmt::Debug for Kernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Kernels({} generated)", self.0.len())
    }
}

impl PartialEq for Kernels {
    fn eq(&self, other: &Kernels) -> bool {
        std::ptr::eq(self.0, other.0)
    }
}

impl Eq for Kernels {}

/// A kernel's generated code, as found in a module.
#[derive(Clone, Copy)]
pub struct Found {
    /// The kernel's key (`Kernel::native_key`).
    pub key: u64,
    /// The code that reads every input from its own slice.
    pub run: KernelFn,
}

impl Kernels {
    /// The generated code of kernel `k`.
    pub fn find(&self, k: &Kernel) -> Result<Found, String> {
        let key = k.native_key();
        self.get(key).map(|run| Found { key, run }).ok_or_else(|| {
            format!(
                "the generated module has no code for kernel [{}] (key {key:016x}): it was generated from another \
                 spec or another version of Tessera; rebuild the crate (`cargo clean -p` it if the spec changed)",
                k.ops.join(", ")
            )
        })
    }

    fn get(&self, key: u64) -> Option<KernelFn> {
        self.0.iter().find(|n| n.key == key).map(|n| n.run)
    }
}

static IN_PLACE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static COPIED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Kernel runs so far in this process that updated an input in place: with
/// the module's in-place code, and with its inputs copied for want of it.
pub fn in_place_stats() -> (u64, u64) {
    use std::sync::atomic::Ordering::Relaxed;
    (IN_PLACE.load(Relaxed), COPIED.load(Relaxed))
}

/// Run generated kernel `code` (of kernel `k`, walked as `nest`) over loop
/// positions `first .. first + count`. Where an input is an output's bytes
/// at the same positions (an update in place) and the module has code for
/// that (the emitter generates it for each such use in the programs it
/// reads), that code reads the input from the output's slice; otherwise
/// the input is copied first (the same results, a copy slower).
///
/// # Safety
/// As [`super::interp::run`]: every pointer in `args` addresses the elements
/// its strides reach, no other thread touches these positions' elements,
/// and a store's elements are read by a load only at the same position.
#[allow(clippy::too_many_arguments)]
pub unsafe fn run(
    code: Found,
    kernels: Kernels,
    k: &Kernel,
    nest: &Nest,
    args: &Args,
    seed: u64,
    first: usize,
    count: usize,
) {
    let p = args.pointers();
    let inputs = k.inputs;
    let stride: Vec<usize> = (0..p.len()).map(|a| nest.inner(a)).collect();
    let alias: Vec<Option<usize>> = (0..inputs)
        .map(|l| {
            (inputs..p.len())
                .find(|&o| p[l] == p[o] && nest.strides[l] == nest.strides[o] && stride[l] == 1)
                .map(|o| o - inputs)
        })
        .collect();
    let in_place = match alias.iter().any(Option::is_some) {
        true => kernels.get(tessera_compiler::kernel::in_place_key(code.key, &alias)),
        false => None,
    };
    if alias.iter().any(Option::is_some) {
        let counter = if in_place.is_some() { &IN_PLACE } else { &COPIED };
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    let f = in_place.unwrap_or(code.run);
    let aliased: Vec<bool> = (0..inputs).map(|l| in_place.is_some() && alias[l].is_some()).collect();
    // Each argument's byte extent over the whole loop nest: an input whose extent meets no
    // output's is never copied, and needs no check per segment.
    let extent = |a: usize| {
        let last: usize = nest.sizes.iter().zip(&nest.strides[a]).map(|(n, s)| n.saturating_sub(1) * s).sum();
        (p[a] as usize, p[a] as usize + 4 * (last + 1))
    };
    let may_meet: Vec<bool> = (0..inputs)
        .map(|l| {
            let (a0, a1) = extent(l);
            !aliased[l]
                && (inputs..p.len()).any(|o| {
                    let (b0, b1) = extent(o);
                    a0 < b1 && b0 < a1
                })
        })
        .collect();
    let elements: Vec<f32> = k
        .body
        .iter()
        .filter_map(|e| match *e {
            // SAFETY: the caller's contract covers the argument's whole buffer.
            Expr::Element { arg, index } => Some(unsafe { *p[arg].add(index as usize) }),
            _ => None,
        })
        .collect();
    // Runs of their own for gathered inputs, copied inputs and scattered outputs, made once.
    let mut scratch: Vec<Vec<f32>> = vec![Vec::new(); p.len()];
    // The segment's slices, their vectors made once: their elements are the arguments' (or the
    // scratch runs') at each segment, rebuilt before each call.
    let mut ins: Vec<&[f32]> = Vec::with_capacity(inputs);
    let mut outs: Vec<&mut [f32]> = Vec::with_capacity(p.len() - inputs);
    nest.segments(first, count, usize::MAX, |offsets, start, len| {
        // Each argument's elements at this segment: (first element, count).
        let span = |a: usize| -> (*mut f32, usize) {
            // SAFETY: the caller's contract: the argument's elements at this segment's positions.
            let at = unsafe { p[a].add(offsets[a]) };
            (at, if stride[a] == 0 { 1 } else { (len - 1) * stride[a] + 1 })
        };
        let overlaps = |a: usize, b: usize| {
            let ((pa, na), (pb, nb)) = (span(a), span(b));
            let (pa, pb) = (pa as usize, pb as usize);
            pa < pb + 4 * nb && pb < pa + 4 * na
        };
        ins.clear();
        outs.clear();
        for a in 0..inputs {
            let n = if stride[a] == 0 { 1 } else { len };
            // An input read from a run of its own: gathered (another stride) or copied (it shares an output's bytes).
            let own = !aliased[a] && (stride[a] > 1 || may_meet[a] && (inputs..p.len()).any(|o| overlaps(a, o)));
            let slice: &[f32] = if aliased[a] {
                // The in-place code reads it through its output's slice.
                &[]
            } else if own {
                let (at, _) = span(a);
                let s = &mut scratch[a];
                s.clear();
                // SAFETY: the caller's contract, for this segment's positions of argument `a`.
                s.extend((0..n).map(|j| unsafe { *at.add(j * stride[a]) }));
                // SAFETY: the run is not touched again before the next segment, when `ins` is cleared first.
                unsafe { std::slice::from_raw_parts(s.as_ptr(), n) }
            } else {
                // SAFETY: contiguous elements of this segment, which no output of it overlaps
                // and no other thread writes (the caller's contract).
                unsafe { std::slice::from_raw_parts(span(a).0, n) }
            };
            ins.push(slice);
        }
        for a in inputs..p.len() {
            let n = if stride[a] == 0 { 1 } else { len };
            let slice: &mut [f32] = if stride[a] > 1 {
                let s = &mut scratch[a];
                s.clear();
                s.resize(n, 0.0);
                // SAFETY: as above: the run lives, untouched, until the next segment clears `outs`.
                unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr(), n) }
            } else {
                // SAFETY: this segment's own elements of an output: no input slice overlaps them
                // (those were copied above, or are read through this slice), outputs are distinct
                // buffers, and no other thread touches these positions (the caller's contract).
                unsafe { std::slice::from_raw_parts_mut(span(a).0, n) }
            };
            outs.push(slice);
        }
        f(Segment { ins: &ins, outs: &mut outs, elements: &elements, len, start, seed });
        for a in (inputs..p.len()).filter(|&a| stride[a] > 1) {
            let at = span(a).0;
            for (j, v) in scratch[a].iter().enumerate() {
                // SAFETY: the caller's contract: this position's element of an output.
                unsafe { *at.add(j * stride[a]) = *v };
            }
        }
    });
}

/// The scalar functions generated kernels call: the interpreter's, element
/// by element, so that generated code computes the same bits.
pub mod f {
    use crate::exec::kernels::{gelu_dt_f32, gelu_f32, unary_df, unary_f, uniform};
    pub use tessera_compiler::ir::UnaryOp;

    /// `op(x)`, as the interpreter computes it. Always inlined into the
    /// generated loops, which rustc then vectorizes as it does the interpreter's.
    #[inline(always)]
    pub fn unary(op: UnaryOp, x: f32) -> f32 {
        match op {
            UnaryOp::Gelu => gelu_f32(x),
            UnaryOp::Neg => -x,
            UnaryOp::Square => x * x,
            UnaryOp::Abs => x.abs(),
            UnaryOp::Sqrt => x.sqrt(),
            UnaryOp::Relu => x.max(0.0),
            _ => unary_f(op, x as f64) as f32,
        }
    }

    /// `g · op'(x)`.
    #[inline(always)]
    pub fn unary_grad(op: UnaryOp, x: f32, g: f32) -> f32 {
        match op {
            UnaryOp::Gelu => g * gelu_dt_f32(x),
            _ => g * unary_df(op, x as f64) as f32,
        }
    }

    /// `x` rounded to bf16's precision (to nearest, ties to even), as f32.
    #[inline(always)]
    pub fn round_bf16(x: f32) -> f32 {
        half::bf16::from_f32(x).to_f32()
    }

    /// `x` rounded to f16's precision, as f32.
    #[inline(always)]
    pub fn round_f16(x: f32) -> f32 {
        half::f16::from_f32(x).to_f32()
    }

    /// Inverted dropout of row-major position `at` with random stream `rng`.
    #[inline]
    pub fn dropout(x: f32, seed: u64, rng: u64, at: u64, p: f64) -> f32 {
        let scale = (1.0 / (1.0 - p)) as f32;
        if uniform(seed, rng, at) < p { 0.0 } else { x * scale }
    }

    /// 1 where `a = b`, else 0.
    #[inline(always)]
    pub fn equal(a: f32, b: f32) -> f32 {
        f32::from(u8::from(a == b))
    }
}
