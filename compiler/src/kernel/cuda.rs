//! CUDA C for the kernel IR: each fused kernel becomes one `extern "C"
//! __global__` function, which NVRTC compiles at run time (no header, no
//! CUDA toolkit: bf16 and f16 are converted by bit operations and PTX).
//!
//! Launch conventions (`CudaKernel::rows`):
//! - an elementwise kernel walks its loop positions with a grid-stride loop,
//!   any grid, any block size;
//! - a kernel with row reductions runs one row per block at a time
//!   (grid-stride over the rows) with exactly [`THREADS`] threads: for each
//!   reduction in body order, the block's threads stride over the row
//!   computing its operand from the kernel's inputs (and earlier
//!   reductions), combine their partial results in shared memory, and every
//!   thread reads the row's value; a last sweep computes the stores. A
//!   per-row output (stride 0 along the row) is written by the thread at
//!   the row's first position.
//!
//! Arguments are the kernel's, in order, typed by their buffers' dtypes
//! (`float`; `unsigned short` holding bf16 or f16; `int`), then the step's
//! seed (dropout). A value is computed in f32, as on the CPU; the sums of a
//! row are a tree over the block, not the CPU's eight lanes, so GPU results
//! agree with the CPU's within rounding, not bit for bit.

use super::{Expr, Kernel};
use crate::ir::{BinaryOp, DType, ReduceOp, UnaryOp};
use std::fmt::Write as _;

/// Threads per block of a row kernel (a power of two).
pub const THREADS: u32 = 256;

/// A kernel's CUDA C.
#[derive(Debug, Clone, PartialEq)]
pub struct CudaKernel {
    /// The `extern "C"` function's name.
    pub name: String,
    pub source: String,
    /// Whether it is a row kernel (one row per block, [`THREADS`] threads).
    pub rows: bool,
}

/// Helpers every kernel's source starts with.
const PRELUDE: &str = r#"typedef unsigned long long u64;
__device__ __forceinline__ float gelu_tanh_df(float x) {
  float t = tanhf(0.79788456080286536f * (x + 0.044715f * x * x * x));
  return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * 0.79788456080286536f * (1.0f + 0.134145f * x * x);
}
__device__ __forceinline__ float silu_df(float x) { float s = 1.0f / (1.0f + expf(-x)); return s * (1.0f + x * (1.0f - s)); }
__device__ __forceinline__ float sigmoid_df(float x) { float s = 1.0f / (1.0f + expf(-x)); return s * (1.0f - s); }
__device__ __forceinline__ float bf16_in(unsigned short h) { return __uint_as_float(((unsigned int)h) << 16); }
__device__ __forceinline__ unsigned short bf16_out(float f) {
  unsigned int u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);
  return (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
__device__ __forceinline__ float f16_in(unsigned short h) { float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f; }
__device__ __forceinline__ unsigned short f16_out(float f) { unsigned short h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h; }
__device__ __forceinline__ double uniform01(u64 seed, u64 node, u64 i) {
  u64 z = seed ^ (node * 0x9E3779B97F4A7C15ull) ^ (i * 0xBF58476D1CE4E5B9ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return (double)(z >> 11) / 9007199254740992.0;
}
__device__ __forceinline__ float block_reduce(float v, float* red, bool max) {
  red[threadIdx.x] = v;
  __syncthreads();
  for (unsigned int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) red[threadIdx.x] = max ? fmaxf(red[threadIdx.x], red[threadIdx.x + s]) : red[threadIdx.x] + red[threadIdx.x + s];
    __syncthreads();
  }
  float r = red[0];
  __syncthreads();
  return r;
}
"#;

fn c_type(d: DType) -> Result<&'static str, String> {
    Ok(match d {
        DType::F32 => "float",
        DType::Bf16 | DType::F16 => "unsigned short",
        DType::I32 => "int",
        other => return Err(format!("a kernel argument of dtype {}", other.name())),
    })
}

/// An f32 literal (infinities and NaN by their bits).
fn literal(v: f64) -> String {
    let f = v as f32;
    if f.is_finite() { format!("{f:?}f") } else { format!("__uint_as_float(0x{:08x}u)", f.to_bits()) }
}

fn unary(op: UnaryOp, x: &str) -> String {
    match op {
        UnaryOp::Neg => format!("(-{x})"),
        UnaryOp::Exp => format!("expf({x})"),
        UnaryOp::Log => format!("logf({x})"),
        UnaryOp::Sqrt => format!("sqrtf({x})"),
        UnaryOp::Rsqrt => format!("(1.0f / sqrtf({x}))"),
        UnaryOp::Tanh => format!("tanhf({x})"),
        UnaryOp::Abs => format!("fabsf({x})"),
        UnaryOp::Square => format!("({x} * {x})"),
        UnaryOp::Gelu => format!("(0.5f * {x} * (1.0f + erff({x} * 0.70710678118654752f)))"),
        UnaryOp::GeluTanh => {
            format!("(0.5f * {x} * (1.0f + tanhf(0.79788456080286536f * ({x} + 0.044715f * {x} * {x} * {x}))))")
        }
        UnaryOp::Silu => format!("({x} / (1.0f + expf(-{x})))"),
        UnaryOp::Relu => format!("fmaxf({x}, 0.0f)"),
        UnaryOp::Sigmoid => format!("(1.0f / (1.0f + expf(-{x})))"),
    }
}

/// g · f'(x), as `exec::kernels::unary_df` defines f'.
fn unary_grad(op: UnaryOp, x: &str, g: &str) -> String {
    let d = match op {
        UnaryOp::Neg => "-1.0f".to_string(),
        UnaryOp::Exp => format!("expf({x})"),
        UnaryOp::Log => format!("(1.0f / {x})"),
        UnaryOp::Sqrt => format!("(0.5f / sqrtf({x}))"),
        UnaryOp::Rsqrt => format!("(-0.5f * powf({x}, -1.5f))"),
        UnaryOp::Tanh => format!("(1.0f - tanhf({x}) * tanhf({x}))"),
        UnaryOp::Abs => format!("(({x} > 0.0f) ? 1.0f : (({x} < 0.0f) ? -1.0f : 0.0f))"),
        UnaryOp::Square => format!("(2.0f * {x})"),
        UnaryOp::Gelu => format!(
            "(0.5f * (1.0f + erff({x} * 0.70710678118654752f)) + {x} * expf(-0.5f * {x} * {x}) * 0.39894228040143268f)"
        ),
        // Derivatives that need a temporary are device functions of the
        // prelude (NVRTC has no statement expressions).
        UnaryOp::GeluTanh => format!("gelu_tanh_df({x})"),
        UnaryOp::Silu => format!("silu_df({x})"),
        UnaryOp::Relu => format!("(({x} > 0.0f) ? 1.0f : 0.0f)"),
        UnaryOp::Sigmoid => format!("sigmoid_df({x})"),
    };
    format!("({g} * {d})")
}

/// The CUDA C of kernel `k`, whose arguments (inputs, then outputs) hold
/// `dtypes`, as the function `name`.
pub fn emit(k: &Kernel, dtypes: &[DType], name: &str) -> Result<CudaKernel, String> {
    k.check()?;
    if dtypes.len() != k.strides.len() {
        return Err(format!("{} argument dtypes for {} arguments", dtypes.len(), k.strides.len()));
    }
    let rows = k.is_row();
    let e = Emit { k, dtypes };
    let mut s = String::from(PRELUDE);
    let params: Vec<String> = dtypes
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let c = if i < k.inputs { "const " } else { "" };
            Ok(format!("{c}{}* a{i}", c_type(*d)?))
        })
        .collect::<Result<_, String>>()?;
    let _ = writeln!(s, "extern \"C\" __global__ void {name}({}, u64 seed) {{", params.join(", "));
    let total = k.len();
    if rows {
        e.row_kernel(&mut s, total);
    } else {
        let _ = writeln!(
            s,
            "  for (u64 p = (u64)blockIdx.x * blockDim.x + threadIdx.x; p < {total}ull; p += (u64)gridDim.x * blockDim.x) {{"
        );
        e.position(&mut s, "    ");
        if let Some(b) = k.rows {
            // A ragged loop: positions past the row bound of the first index are not computed.
            let _ = writeln!(s, "    if (i1 >= (u64)a{b}[i0]) continue;");
        }
        let need = e.closure(k.stores.iter().map(|&(_, v)| v));
        e.values(&mut s, &need, "    ", &[]);
        e.stores(&mut s, "    ", false);
        s.push_str("  }\n");
    }
    s.push_str("}\n");
    Ok(CudaKernel { name: name.to_string(), source: s, rows })
}

struct Emit<'a> {
    k: &'a Kernel,
    dtypes: &'a [DType],
}

impl Emit<'_> {
    /// The loop indices `i0 ..` of position `p`, and each argument's offset `oN`.
    fn position(&self, s: &mut String, pad: &str) {
        let dims = &self.k.dims;
        let _ = writeln!(s, "{pad}u64 r_ = p;");
        for d in (0..dims.len()).rev() {
            let n = dims[d].size.max(1);
            let _ = writeln!(s, "{pad}u64 i{d} = r_ % {n}ull; r_ /= {n}ull;");
        }
        // A sweep of a row kernel uses some of the offsets only: the others
        // are marked so that NVRTC's log holds no warning for them.
        for (a, st) in self.k.strides.iter().enumerate() {
            let terms: Vec<String> =
                st.iter().enumerate().filter(|(_, x)| **x != 0).map(|(d, x)| format!("i{d} * {x}ull")).collect();
            let off = if terms.is_empty() { "0ull".to_string() } else { terms.join(" + ") };
            let _ = writeln!(s, "{pad}[[maybe_unused]] u64 o{a} = {off};");
        }
    }

    /// Element `at` of argument `arg`, as f32.
    fn load(&self, arg: usize, at: &str) -> String {
        match self.dtypes[arg] {
            DType::Bf16 => format!("bf16_in(a{arg}[{at}])"),
            DType::F16 => format!("f16_in(a{arg}[{at}])"),
            DType::I32 => format!("(float)a{arg}[{at}]"),
            _ => format!("a{arg}[{at}]"),
        }
    }

    /// The body values that `roots` read, up to (not through) reductions.
    fn closure(&self, roots: impl Iterator<Item = usize>) -> Vec<bool> {
        let body = &self.k.body;
        let mut need = vec![false; body.len()];
        roots.for_each(|r| need[r] = true);
        for i in (0..body.len()).rev() {
            if need[i] && !matches!(body[i], Expr::Reduce { .. }) {
                body[i].operands().into_iter().for_each(|o| need[o] = true);
            }
        }
        need
    }

    /// `float vI = ...;` for each needed value, in body order; reduction `i`
    /// reads `r{i}` (its row's value, computed before).
    fn values(&self, s: &mut String, need: &[bool], pad: &str, reductions: &[usize]) {
        let row = self.k.dims.last().map_or(1, |d| d.size.max(1));
        for (i, e) in self.k.body.iter().enumerate().filter(|(i, _)| need[*i]) {
            let v = |j: usize| format!("v{j}");
            let rhs = match *e {
                Expr::Load { arg } => self.load(arg, &format!("o{arg}")),
                Expr::Element { arg, index } => self.load(arg, &format!("{index}ull")),
                Expr::Const { value } => literal(value),
                Expr::Unary { op, x } => unary(op, &v(x)),
                Expr::UnaryGrad { op, x, g } => unary_grad(op, &v(x), &v(g)),
                Expr::Binary { op, a, b } => {
                    let o = match op {
                        BinaryOp::Add => "+",
                        BinaryOp::Sub => "-",
                        BinaryOp::Mul => "*",
                        BinaryOp::Div => "/",
                    };
                    format!("({} {o} {})", v(a), v(b))
                }
                Expr::Pow { x, exp } => format!("powf({}, {})", v(x), literal(exp)),
                Expr::Dropout { x, p, rng } => {
                    format!("(uniform01(seed, {rng}ull, p) < {p:?} ? 0.0f : {} * {})", v(x), literal(1.0 / (1.0 - p)))
                }
                Expr::Round { x, dtype: DType::Bf16 } => format!("bf16_in(bf16_out({}))", v(x)),
                Expr::Round { x, dtype: DType::F16 } => format!("f16_in(f16_out({}))", v(x)),
                Expr::Round { x, .. } => v(x),
                Expr::Reduce { .. } => {
                    let r = reductions.iter().position(|&x| x == i).expect("a reduction computed before its readers");
                    format!("r{r}")
                }
                Expr::Index => format!("(float)(p % {row}ull)"),
                Expr::Equal { a, b } => format!("({} == {} ? 1.0f : 0.0f)", v(a), v(b)),
            };
            let _ = writeln!(s, "{pad}float v{i} = {rhs};");
        }
    }

    /// The kernel's stores at this position (`per_row_first`: a per-row
    /// output is written at the row's first position only).
    fn stores(&self, s: &mut String, pad: &str, per_row_first: bool) {
        for &(arg, v) in &self.k.stores {
            let val = match self.dtypes[arg] {
                DType::Bf16 => format!("bf16_out(v{v})"),
                DType::F16 => format!("f16_out(v{v})"),
                DType::I32 => format!("(int)v{v}"),
                _ => format!("v{v}"),
            };
            let per_row = self.k.strides[arg].last() == Some(&0) && !self.k.dims.is_empty();
            let guard = if per_row && per_row_first { "if (j == 0) " } else { "" };
            let _ = writeln!(s, "{pad}{guard}a{arg}[o{arg}] = {val};");
        }
    }

    /// A row kernel: one row per block at a time, each reduction a sweep of
    /// the block over the row and a tree in shared memory, then the stores.
    fn row_kernel(&self, s: &mut String, total: u64) {
        let len = self.k.dims.last().map_or(1, |d| d.size.max(1));
        let rows = total / len;
        let _ = writeln!(s, "  __shared__ float red[{THREADS}];");
        let _ = writeln!(s, "  for (u64 q = blockIdx.x; q < {rows}ull; q += gridDim.x) {{");
        let mut done: Vec<usize> = Vec::new();
        for (i, e) in self.k.body.iter().enumerate() {
            let Expr::Reduce { x, op } = *e else { continue };
            let max = op == ReduceOp::Max;
            let init = if max { "__uint_as_float(0xff800000u)" } else { "0.0f" };
            let _ = writeln!(s, "    float r{};", done.len());
            let _ = writeln!(s, "    {{\n      float acc = {init};");
            let _ = writeln!(s, "      for (u64 j = threadIdx.x; j < {len}ull; j += blockDim.x) {{");
            let _ = writeln!(s, "        u64 p = q * {len}ull + j;");
            self.position(s, "        ");
            self.values(s, &self.closure(std::iter::once(x)), "        ", &done);
            let step = if max { format!("acc = fmaxf(acc, v{x});") } else { format!("acc = acc + v{x};") };
            let _ = writeln!(s, "        {step}\n      }}");
            let _ = writeln!(s, "      r{} = block_reduce(acc, red, {max});\n    }}", done.len());
            done.push(i);
        }
        let _ = writeln!(s, "    for (u64 j = threadIdx.x; j < {len}ull; j += blockDim.x) {{");
        let _ = writeln!(s, "      u64 p = q * {len}ull + j;");
        self.position(s, "      ");
        self.values(s, &self.closure(self.k.stores.iter().map(|&(_, v)| v)), "      ", &done);
        self.stores(s, "      ", true);
        s.push_str("    }\n  }\n");
    }
}
