//! CPU kernels of the reference interpreter, one per IR op, over named-dim
//! tensors. Contractions go to the `gemm` crate; the rest are plain loops
//! over contiguous rows after a transpose by name.

use super::fast::{as_f32, as_f32_mut, erf_f32, exp_f32, par_rows};
use crate::tensor::{Real, Tensor, View, aligned_strides, for_each_offset, for_each_offset2, r};
use tessera_compiler::ir::Dim;
use tessera_compiler::ir::{BinaryOp, CompareOp, UnaryOp, Windows};

/// Broadcast elementwise `a ∘ b` into `out` dims.
pub fn binary<T: Real>(op: BinaryOp, a: &Tensor<T>, b: &Tensor<T>, out: &[Dim]) -> Tensor<T> {
    let n: usize = out.iter().map(|d| d.size as usize).product();
    // Fast path, split over threads: one side has the output's dims and the
    // other lines up with its rows (see `rows_of`).
    let side =
        |full: &'_ Tensor<T>, part: &'_ Tensor<T>| (full.dims == out).then(|| rows_of(&part.dims, out)).flatten();
    let fast = side(a, b).map(|r| (a, b, false, r)).or_else(|| side(b, a).map(|r| (b, a, true, r)));
    if let Some((full, part, part_left, r)) = fast {
        let mut data = vec![T::zero(); n];
        for_rows(&mut data, &part.data, r, |start, o, y| {
            let x = &full.data[start..start + o.len()];
            if part_left { zip_into(op, o, y, x) } else { zip_into(op, o, x, y) }
        });
        return Tensor { dims: out.to_vec(), data };
    }
    let f = |x: T, y: T| match op {
        BinaryOp::Add => x + y,
        BinaryOp::Sub => x - y,
        BinaryOp::Mul => x * y,
        BinaryOp::Div => x / y,
    };
    let (sa, sb) = (aligned_strides(&a.dims, out), aligned_strides(&b.dims, out));
    let mut data = Vec::with_capacity(n);
    for_each_offset2(out, &sa, &sb, |i, j| data.push(f(a.data[i], b.data[j])));
    Tensor { dims: out.to_vec(), data }
}

/// Broadcast `a ∘ b` into `out` dims as a `bool` tensor: 1 where it holds, else 0.
pub fn compare<T: Real>(op: CompareOp, a: &Tensor<T>, b: &Tensor<T>, out: &[Dim]) -> Tensor<T> {
    let (sa, sb) = (aligned_strides(&a.dims, out), aligned_strides(&b.dims, out));
    let mut data = Vec::with_capacity(out.iter().map(|d| d.size as usize).product());
    for_each_offset2(out, &sa, &sb, |i, j| {
        let (x, y) = (a.data[i].to_f64().unwrap_or(f64::NAN), b.data[j].to_f64().unwrap_or(f64::NAN));
        data.push(if op.apply(x, y) { T::one() } else { T::zero() });
    });
    Tensor { dims: out.to_vec(), data }
}

/// `a` where `cond` is non-zero, else `b`, broadcast by name into `out` dims.
pub fn select_where<T: Real>(cond: &Tensor<T>, a: &Tensor<T>, b: &Tensor<T>, out: &[Dim]) -> Tensor<T> {
    let mut at = Vec::new();
    for_each_offset(out, &aligned_strides(&cond.dims, out), |c| at.push(c));
    let (sa, sb) = (aligned_strides(&a.dims, out), aligned_strides(&b.dims, out));
    let mut data = Vec::with_capacity(at.len());
    let mut k = 0;
    for_each_offset2(out, &sa, &sb, |i, j| {
        data.push(if cond.data[at[k]] != T::zero() { a.data[i] } else { b.data[j] });
        k += 1;
    });
    Tensor { dims: out.to_vec(), data }
}

/// The position of the largest value along `dim` (the first of ties; NaN
/// counts as largest, as in PyTorch), into `out` (x's other dims, in order).
pub fn argmax<T: Real>(x: &Tensor<T>, dim: &str, out: &[Dim]) -> Tensor<T> {
    let p = x.move_last(&[dim]);
    let w = p.dims.last().map_or(1, |d| d.size as usize).max(1);
    let data = p
        .data
        .chunks(w)
        .map(|row| {
            let mut best = 0;
            for (i, v) in row.iter().enumerate() {
                if row[best].is_nan() {
                    break;
                }
                if v.is_nan() || *v > row[best] {
                    best = i;
                }
            }
            r(best as f64)
        })
        .collect();
    Tensor { dims: out.to_vec(), data }
}

/// For each element of the unfolded tensor (dims `u`), the offset of its
/// source element in `x` (dims `x`), or `None` where it falls in the padding.
fn window_sources(x: &[Dim], u: &[Dim], w: &Windows, mut f: impl FnMut(usize, Option<usize>)) {
    let xs = crate::tensor::strides(x);
    // Per dim of `u`, its step: how much it moves the source offset, or
    // which spatial position it moves and by how much (a position of the
    // output by the stride, a window element by the dilation).
    let steps: Vec<(usize, Option<(usize, i64)>)> = u
        .iter()
        .map(|d| {
            if let Some(i) = w.into.iter().position(|n| *n == d.name) {
                (0, Some((i, w.stride as i64)))
            } else if let Some(i) = w.window.iter().position(|n| *n == d.name) {
                (0, Some((i, w.dilation as i64)))
            } else {
                (x.iter().position(|xd| xd.name == d.name).map_or(0, |k| xs[k]), None)
            }
        })
        .collect();
    let spatial: Vec<(usize, i64)> = w
        .over
        .iter()
        .map(|o| x.iter().position(|d| d.name == *o).map_or((0, 0), |k| (xs[k], x[k].size as i64)))
        .collect();
    // Walk `u` in order, moving the offset and the positions by each dim's
    // step as its index counts up (and back when it wraps): each element
    // costs a bounds check, not a pass over every dim.
    let mut idx = vec![0u64; u.len()];
    let n: u64 = u.iter().map(|d| d.size).product();
    let mut pos = vec![-(w.padding as i64); spatial.len()];
    let mut off = 0usize;
    for e in 0..n as usize {
        let inside = pos.iter().zip(&spatial).all(|(p, (_, size))| *p >= 0 && p < size);
        let src = inside.then(|| off + pos.iter().zip(&spatial).map(|(p, (s, _))| *p as usize * s).sum::<usize>());
        f(e, src);
        for k in (0..idx.len()).rev() {
            let (ds, dp) = steps[k];
            idx[k] += 1;
            if idx[k] < u[k].size {
                off += ds;
                if let Some((i, d)) = dp {
                    pos[i] += d;
                }
                break;
            }
            let back = (u[k].size - 1) as usize;
            off -= ds * back;
            if let Some((i, d)) = dp {
                pos[i] -= d * back as i64;
            }
            idx[k] = 0;
        }
    }
}

/// The windows of `x` (im2col), `fill` in the padding.
pub fn unfold<T: Real>(x: &Tensor<T>, w: &Windows, fill: T, out: &[Dim]) -> Tensor<T> {
    let mut data = vec![fill; out.iter().map(|d| d.size as usize).product()];
    window_sources(&x.dims, out, w, |e, src| {
        if let Some(s) = src {
            data[e] = x.data[s];
        }
    });
    Tensor { dims: out.to_vec(), data }
}

/// The gradient of [`unfold`]: each window element of `g` added back to its source (col2im).
pub fn fold<T: Real>(g: &Tensor<T>, w: &Windows, out: &[Dim]) -> Tensor<T> {
    let mut data = vec![T::zero(); out.iter().map(|d| d.size as usize).product()];
    window_sources(out, &g.dims, w, |e, src| {
        if let Some(s) = src {
            data[s] += g.data[e];
        }
    });
    Tensor { dims: out.to_vec(), data }
}

/// The position of `idx` (at x's other dims) along `dim`, checked.
fn position<T: Real>(v: T, n: usize, dim: &str) -> Result<usize, String> {
    let p = v.to_f64().unwrap_or(f64::NAN);
    if p >= 0.0 && p < n as f64 && p.fract() == 0.0 {
        Ok(p as usize)
    } else {
        Err(format!("gather along `{dim}`: position {p} is outside 0..{n}"))
    }
}

/// `x` at position `idx` along `dim`, `dim` dropped (`out`: x's other dims, in order).
pub fn gather<T: Real>(x: &Tensor<T>, idx: &Tensor<T>, dim: &str, out: &[Dim]) -> Result<Tensor<T>, String> {
    let p = x.move_last(&[dim]);
    let n = p.dims.last().map_or(1, |d| d.size as usize);
    let mut at = Vec::new();
    for_each_offset(out, &aligned_strides(&idx.dims, out), |j| at.push(j));
    let mut data = Vec::with_capacity(at.len());
    for (k, j) in at.into_iter().enumerate() {
        data.push(p.data[k * n + position(idx.data[j], n, dim)?]);
    }
    Ok(Tensor { dims: out.to_vec(), data })
}

/// The gradient of [`gather`]: `g` placed at position `idx` along `out`'s `dim`, zeros elsewhere.
pub fn gather_grad<T: Real>(g: &Tensor<T>, idx: &Tensor<T>, dim: &str, out: &[Dim]) -> Result<Tensor<T>, String> {
    let kept: Vec<Dim> = out.iter().filter(|d| d.name != dim).cloned().collect();
    let n = out.iter().find(|d| d.name == dim).map_or(1, |d| d.size as usize);
    let gk = g.permute(&kept);
    let mut at = Vec::new();
    for_each_offset(&kept, &aligned_strides(&idx.dims, &kept), |j| at.push(j));
    let mut moved = vec![T::zero(); kept.iter().map(|d| d.size as usize).product::<usize>() * n];
    for (k, j) in at.into_iter().enumerate() {
        moved[k * n + position(idx.data[j], n, dim)?] += gk.data[k];
    }
    let mut dims = kept;
    dims.push(out.iter().find(|d| d.name == dim).cloned().unwrap_or_else(|| Dim::new(dim, 1)));
    Ok(Tensor { dims, data: moved }.permute(out))
}

/// How an operand of dims `part` lines up with the rows of a tensor of dims
/// `out`, as (w, mid): rows of `w` elements, and row r reads
/// - all of `part` at the same offset, when it has the same dims (mid = 1, w = all);
/// - the whole of `part`, when it is a trailing block or a scalar (mid = `usize::MAX`);
/// - `part`'s row r / mid, when it is `out` without a contiguous middle run of
///   dims, e.g. a bias `[expert, mlp]` over `[expert, slot, mlp]`.
///
/// `None` for other broadcasts, and for middle runs with rows under 16
/// elements (the strided walk is as fast there).
fn rows_of(part: &[Dim], out: &[Dim]) -> Option<(usize, usize)> {
    let size = |d: &[Dim]| d.iter().map(|d| d.size as usize).product::<usize>();
    if part == out {
        return Some((size(out).max(1), 1));
    }
    if out.ends_with(part) {
        return Some((size(part).max(1), usize::MAX));
    }
    let lead = out.iter().zip(part).take_while(|(o, d)| o == d).count();
    let tail = part.len() - lead;
    if tail > out.len() - lead || out[out.len() - tail..] != part[lead..] {
        return None;
    }
    let inner = size(&part[lead..]).max(1);
    (inner >= 16).then(|| (inner, size(&out[lead..out.len() - tail]).max(1)))
}

/// Call `f(start, o, y)` over `data` in rows that line up with `part` as
/// `rows_of` says: `o` is `data[start..]` for one row, `y` the part it meets.
/// Rows go to the kernel threads; a short repeated block is tiled first so
/// that rows stay long enough to vectorize.
fn for_rows<T: Real>(
    data: &mut [T],
    part: &[T],
    (w, mid): (usize, usize),
    f: impl Fn(usize, &mut [T], &[T]) + Sync + Send,
) {
    let n = data.len();
    let tiled: Vec<T>;
    let (w, part) = if mid == usize::MAX && w < 64 && n > w {
        // The most copies of the block, up to 64 elements, that divide the data.
        let k = (1..=(64 / w).max(1)).rev().find(|k| (n / w).is_multiple_of(*k)).unwrap_or(1);
        tiled = part[..w].repeat(k);
        (w * k, &tiled[..])
    } else {
        (w, part)
    };
    let row = if w == n { (n / 64).max(1) } else { w };
    par_rows(data, row, |first, chunk| {
        for (k, o) in chunk.chunks_mut(row).enumerate() {
            let start = (first + k) * row;
            let y = if w == n {
                &part[start..start + o.len()]
            } else if mid == usize::MAX {
                &part[..w]
            } else {
                &part[((first + k) / mid) * w..][..w]
            };
            f(start, o, y);
        }
    });
}

/// `target ∘= other` in place, when `target` has the output's dims and
/// `other` lines up with its rows (`rows_of`; `target_left`: whether `target`
/// is the left operand). Returns false, leaving `target` untouched, for other
/// broadcasts.
pub fn binary_assign<T: Real>(op: BinaryOp, target: &mut Tensor<T>, other: &Tensor<T>, target_left: bool) -> bool {
    let Some(r) = rows_of(&other.dims, &target.dims) else { return false };
    for_rows(&mut target.data, &other.data, r, |_, o, y| assign_into(op, o, y, target_left));
    true
}

/// o = o ∘ y (or y ∘ o when `!left`), one tight loop per op.
pub(crate) fn assign_into<T: Real>(op: BinaryOp, o: &mut [T], y: &[T], left: bool) {
    macro_rules! each {
        ($f:expr) => {
            if left {
                o.iter_mut().zip(y).for_each(|(o, y)| *o = $f(*o, *y));
            } else {
                o.iter_mut().zip(y).for_each(|(o, y)| *o = $f(*y, *o));
            }
        };
    }
    match op {
        BinaryOp::Add => each!(|x: T, y: T| x + y),
        BinaryOp::Sub => each!(|x: T, y: T| x - y),
        BinaryOp::Mul => each!(|x: T, y: T| x * y),
        BinaryOp::Div => each!(|x: T, y: T| x / y),
    }
}

/// o = x ∘ y elementwise, one tight loop per op.
pub(crate) fn zip_into<T: Real>(op: BinaryOp, o: &mut [T], x: &[T], y: &[T]) {
    macro_rules! each {
        ($f:expr) => {
            for ((o, x), y) in o.iter_mut().zip(x).zip(y) {
                *o = $f(*x, *y);
            }
        };
    }
    match op {
        BinaryOp::Add => each!(|x: T, y: T| x + y),
        BinaryOp::Sub => each!(|x: T, y: T| x - y),
        BinaryOp::Mul => each!(|x: T, y: T| x * y),
        BinaryOp::Div => each!(|x: T, y: T| x / y),
    }
}

fn erf(x: f64) -> f64 {
    libm::erf(x)
}

const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;

pub fn unary_f(op: UnaryOp, x: f64) -> f64 {
    match op {
        UnaryOp::Neg => -x,
        UnaryOp::Exp => x.exp(),
        UnaryOp::Log => x.ln(),
        UnaryOp::Sqrt => x.sqrt(),
        UnaryOp::Rsqrt => 1.0 / x.sqrt(),
        UnaryOp::Tanh => x.tanh(),
        UnaryOp::Abs => x.abs(),
        UnaryOp::Square => x * x,
        UnaryOp::Gelu => 0.5 * x * (1.0 + erf(x / std::f64::consts::SQRT_2)),
        UnaryOp::GeluTanh => 0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)).tanh()),
        UnaryOp::Silu => x / (1.0 + (-x).exp()),
        UnaryOp::Relu => x.max(0.0),
        UnaryOp::Sigmoid => 1.0 / (1.0 + (-x).exp()),
    }
}

/// f'(x).
pub fn unary_df(op: UnaryOp, x: f64) -> f64 {
    match op {
        UnaryOp::Neg => -1.0,
        UnaryOp::Exp => x.exp(),
        UnaryOp::Log => 1.0 / x,
        UnaryOp::Sqrt => 0.5 / x.sqrt(),
        UnaryOp::Rsqrt => -0.5 * x.powf(-1.5),
        UnaryOp::Tanh => 1.0 - x.tanh().powi(2),
        UnaryOp::Abs => x.signum(),
        UnaryOp::Square => 2.0 * x,
        UnaryOp::Gelu => {
            let cdf = 0.5 * (1.0 + erf(x / std::f64::consts::SQRT_2));
            let pdf = (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
            cdf + x * pdf
        }
        UnaryOp::GeluTanh => {
            let u = SQRT_2_OVER_PI * (x + 0.044715 * x * x * x);
            let t = u.tanh();
            0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * x * x)
        }
        UnaryOp::Silu => {
            let s = 1.0 / (1.0 + (-x).exp());
            s * (1.0 + x * (1.0 - s))
        }
        UnaryOp::Relu => {
            if x > 0.0 {
                1.0
            } else {
                0.0
            }
        }
        UnaryOp::Sigmoid => {
            let s = 1.0 / (1.0 + (-x).exp());
            s * (1.0 - s)
        }
    }
}

/// GELU(x) in f32 (vectorizable erf).
#[inline(always)]
pub(crate) fn gelu_f32(x: f32) -> f32 {
    0.5 * x * (1.0 + erf_f32(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// GELU'(x) in f32.
#[inline(always)]
pub(crate) fn gelu_dt_f32(x: f32) -> f32 {
    let cdf = 0.5 * (1.0 + erf_f32(x * std::f32::consts::FRAC_1_SQRT_2));
    cdf + x * exp_f32(-0.5 * x * x) * 0.398_942_3
}

/// `f` over x (and `g`), in f32 over all kernel threads; `None` for f64.
fn map_f32<T: Real>(
    x: &Tensor<T>,
    g: Option<&Tensor<T>>,
    f: impl Fn(f32, f32) -> f32 + Sync + Send,
) -> Option<Tensor<T>> {
    let xs = as_f32(&x.data)?;
    let gs = g.map(|g| as_f32(&g.data)).unwrap_or(Some(xs))?;
    let mut data = vec![T::zero(); xs.len()];
    let out = as_f32_mut(&mut data)?;
    let row = (xs.len() / 64).max(1);
    par_rows(out, row, |first, o| {
        let start = first * row;
        for ((o, x), g) in o.iter_mut().zip(&xs[start..]).zip(&gs[start..]) {
            *o = f(*x, *g);
        }
    });
    Some(Tensor { dims: x.dims.clone(), data })
}

pub fn unary<T: Real>(op: UnaryOp, x: &Tensor<T>) -> Tensor<T> {
    if op == UnaryOp::Gelu
        && let Some(t) = map_f32(x, None, |v, _| gelu_f32(v))
    {
        return t;
    }
    Tensor {
        dims: x.dims.clone(),
        data: x.data.iter().map(|v| r(unary_f(op, v.to_f64().unwrap_or(f64::NAN)))).collect(),
    }
}

/// out = f(x) on slices, one thread (the padded-slot paths).
pub(crate) fn unary_slice<T: Real>(op: UnaryOp, x: &[T], out: &mut [T]) {
    if op == UnaryOp::Gelu
        && let (Some(xs), Some(os)) = (as_f32(x), as_f32_mut(out))
    {
        os.iter_mut().zip(xs).for_each(|(o, v)| *o = gelu_f32(*v));
        return;
    }
    for (o, v) in out.iter_mut().zip(x) {
        *o = r(unary_f(op, v.to_f64().unwrap_or(f64::NAN)));
    }
}

/// out = g · f'(x) on slices, one thread.
pub(crate) fn unary_grad_slice<T: Real>(op: UnaryOp, x: &[T], g: &[T], out: &mut [T]) {
    if op == UnaryOp::Gelu
        && let (Some(xs), Some(gs), Some(os)) = (as_f32(x), as_f32(g), as_f32_mut(out))
    {
        os.iter_mut().zip(xs).zip(gs).for_each(|((o, v), gv)| *o = gv * gelu_dt_f32(*v));
        return;
    }
    for ((o, v), gv) in out.iter_mut().zip(x).zip(g) {
        *o = *gv * r::<T>(unary_df(op, v.to_f64().unwrap_or(f64::NAN)));
    }
}

pub fn unary_grad<T: Real>(op: UnaryOp, x: &Tensor<T>, g: &Tensor<T>) -> Tensor<T> {
    if op == UnaryOp::Gelu
        && let Some(t) = map_f32(x, Some(g), |v, gv| gv * gelu_dt_f32(v))
    {
        return t;
    }
    let data =
        x.data.iter().zip(&g.data).map(|(v, gv)| *gv * r::<T>(unary_df(op, v.to_f64().unwrap_or(f64::NAN)))).collect();
    Tensor { dims: x.dims.clone(), data }
}

/// dst (m×n, row stride `drs`) = [dst +] scale · lhs (m×k) · rhs (k×n), each
/// operand given as (pointer, row stride, column stride). With `par`, large
/// products use the kernel threads.
///
/// # Safety
/// The pointers and strides must address m×k, k×n and m×n elements inside
/// their buffers, and nothing else may write `dst`'s elements meanwhile.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_strided<T: Real>(
    (m, n, k): (usize, usize, usize),
    dst: *mut T,
    drs: usize,
    accumulate: bool,
    (lhs, lrs, lcs): (*const T, usize, usize),
    (rhs, rrs, rcs): (*const T, usize, usize),
    scale: T,
    par: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    let t = if par && m * n * k >= 1 << 18 { super::threads() } else { 1 };
    let par = if t > 1 { gemm::Parallelism::Rayon(t) } else { gemm::Parallelism::None };
    // SAFETY: the caller's contract.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            drs as isize,
            accumulate,
            lhs,
            lcs as isize,
            lrs as isize,
            rhs,
            rcs as isize,
            rrs as isize,
            T::one(),
            scale,
            false,
            false,
            false,
            par,
        )
    }
}

/// A contraction's operand as a strided `[batch, rows, cols]` view of its
/// row-major layout `dims`: the element stride of each group's last dim (0
/// for an empty group), or `None` where a group's dims are not one run of
/// the layout in the group's order.
pub(crate) fn group_strides<D: std::borrow::Borrow<Dim>>(dims: &[Dim], groups: [&[D]; 3]) -> Option<[usize; 3]> {
    let st = crate::tensor::strides(dims);
    let mut out = [0usize; 3];
    for (slot, group) in groups.iter().enumerate() {
        let pos: Vec<usize> =
            group.iter().map(|g| dims.iter().position(|d| d.name == g.borrow().name)).collect::<Option<_>>()?;
        if pos.windows(2).any(|w| w[1] != w[0] + 1) {
            return None;
        }
        out[slot] = pos.last().map(|&p| st[p]).unwrap_or(0);
    }
    Some(out)
}

/// Σ over every dim not in `out` of a·b (a general contraction), via batched GEMM.
pub fn einsum<T: Real>(a: &Tensor<T>, b: &Tensor<T>, out: &[Dim]) -> Tensor<T> {
    let has = |t: &Tensor<T>, n: &str| t.dims.iter().any(|d| d.name == n);
    let in_out = |n: &str| out.iter().any(|d| d.name == n);
    // Sum away dims that only one operand has and the output does not keep.
    let a_only: Vec<String> =
        a.dims.iter().filter(|d| !has(b, &d.name) && !in_out(&d.name)).map(|d| d.name.clone()).collect();
    let b_only: Vec<String> =
        b.dims.iter().filter(|d| !has(a, &d.name) && !in_out(&d.name)).map(|d| d.name.clone()).collect();
    let a_sum;
    let a = if a_only.is_empty() {
        a
    } else {
        a_sum = a.sum_over(&a_only);
        &a_sum
    };
    let b_sum;
    let b = if b_only.is_empty() {
        b
    } else {
        b_sum = b.sum_over(&b_only);
        &b_sum
    };
    let batch: Vec<Dim> = out.iter().filter(|d| has(a, &d.name) && has(b, &d.name)).cloned().collect();
    let m: Vec<Dim> = out.iter().filter(|d| has(a, &d.name) && !has(b, &d.name)).cloned().collect();
    let n: Vec<Dim> = out.iter().filter(|d| has(b, &d.name) && !has(a, &d.name)).cloned().collect();
    let k: Vec<Dim> = a.dims.iter().filter(|d| has(b, &d.name) && !in_out(&d.name)).cloned().collect();
    let size = |v: &[Dim]| v.iter().map(|d| d.size as usize).product::<usize>();
    let (nb, nm, nn, nk) = (size(&batch), size(&m), size(&n), size(&k));
    // Each operand as a strided [batch, rows, cols] view when its groups are
    // contiguous runs of its layout; otherwise a transposed copy.
    let view = |t: &Tensor<T>, g: [&[Dim]; 3]| group_strides(&t.dims, g);
    let (pa, sa) = match view(a, [&batch, &m, &k]) {
        Some(st) => (std::borrow::Cow::Borrowed(a), st),
        None => (std::borrow::Cow::Owned(a.permute(&[batch.clone(), m.clone(), k.clone()].concat())), [nm * nk, nk, 1]),
    };
    let (pb, sb) = match view(b, [&batch, &k, &n]) {
        Some(st) => (std::borrow::Cow::Borrowed(b), st),
        None => (std::borrow::Cow::Owned(b.permute(&[batch.clone(), k.clone(), n.clone()].concat())), [nk * nn, nn, 1]),
    };
    let mut c = vec![T::zero(); nb * nm * nn];
    if nk > 0 {
        for bi in 0..nb {
            // SAFETY: the views address nm×nk and nk×nn elements inside `pa` and
            // `pb` at the batch offsets (strides come from their own layouts), and
            // `c` holds nm×nn elements per batch.
            unsafe {
                gemm_strided(
                    (nm, nn, nk),
                    c.as_mut_ptr().add(bi * nm * nn),
                    nn,
                    false,
                    (pa.data.as_ptr().add(bi * sa[0]), sa[1], sa[2]),
                    (pb.data.as_ptr().add(bi * sb[0]), sb[1], sb[2]),
                    T::one(),
                    true,
                );
            }
        }
    }
    let t = Tensor { dims: [batch, m, n].concat(), data: c };
    t.permuted(out).into_owned()
}

/// Apply `f` to each row along `dim` (moved last), then restore the order.
fn rows<T: Real>(x: &Tensor<T>, dim: &str, f: impl Fn(&mut [T]) + Sync + Send) -> Tensor<T> {
    let last = x.dims.last().is_some_and(|d| d.name == dim);
    let p = if last { x.clone() } else { x.move_last(&[dim]) };
    let len = p.size(dim).max(1);
    let mut data = p.data;
    par_rows(&mut data, len, |_, rows| rows.chunks_mut(len).for_each(&f));
    let t = Tensor { dims: p.dims, data };
    if last { t } else { t.permute(&x.dims) }
}

/// `x` with `dim` last, borrowed when it already is.
fn dim_last<'t, T: Real>(x: &'t Tensor<T>, dim: &str) -> std::borrow::Cow<'t, Tensor<T>> {
    if x.dims.last().is_some_and(|d| d.name == dim) {
        std::borrow::Cow::Borrowed(x)
    } else {
        std::borrow::Cow::Owned(x.move_last(&[dim]))
    }
}

/// e^x and ln x as the elementwise ops compute them (in f64, rounded to
/// T), so that a softmax fused into a kernel computes the same bits.
fn exp_of<T: Real>(x: T) -> T {
    r(unary_f(UnaryOp::Exp, x.to_f64().unwrap_or(f64::NAN)))
}

fn ln_of<T: Real>(x: T) -> T {
    r(unary_f(UnaryOp::Log, x.to_f64().unwrap_or(f64::NAN)))
}

/// Softmax (or log-softmax) over `dim`: max, e^(x − max), their sum in
/// `fast::sum`'s order, as a fused row kernel computes it.
pub fn softmax<T: Real>(x: &Tensor<T>, dim: &str, log: bool) -> Tensor<T> {
    rows(x, dim, |row| {
        let max = super::fast::max(row);
        if log {
            let sum = super::fast::sum_by(row.len(), |k| exp_of(row[k] - max));
            let lse = max + ln_of(sum);
            row.iter_mut().for_each(|v| *v = *v - lse);
        } else {
            row.iter_mut().for_each(|v| *v = exp_of(*v - max));
            let inv = T::one() / super::fast::sum(row);
            row.iter_mut().for_each(|v| *v = *v * inv);
        }
    })
}

pub fn softmax_grad<T: Real>(y: &Tensor<T>, g: &Tensor<T>, dim: &str, log: bool) -> Tensor<T> {
    let py = dim_last(y, dim);
    let pg = dim_last(g, dim);
    let len = py.size(dim).max(1);
    let mut out = pg.data.clone();
    for ((o, yr), gr) in out.chunks_mut(len).zip(py.data.chunks(len)).zip(pg.data.chunks(len)) {
        // The sums in `fast::sum`'s order, e^y as the elementwise op computes it (as a fused row kernel).
        if log {
            let s = super::fast::sum(gr);
            for ((o, y), g) in o.iter_mut().zip(yr).zip(gr) {
                *o = *g - exp_of(*y) * s;
            }
        } else {
            let s = super::fast::sum_by(len, |k| gr[k] * yr[k]);
            for ((o, y), g) in o.iter_mut().zip(yr).zip(gr) {
                *o = *y * (*g - s);
            }
        }
    }
    Tensor { dims: py.dims.clone(), data: out }.permuted(&y.dims).into_owned()
}

/// Fixed sinusoidal positions `[pos, dim]` (Vaswani et al. 2017): feature
/// 2i is sin(pos / 10000^(2i/dim)), feature 2i + 1 the cosine of the same angle.
pub fn sinusoid<T: Real>(out: &[Dim]) -> Tensor<T> {
    let width = out.last().map(|d| d.size as usize).unwrap_or(1);
    Tensor::from_fn(out, |k| {
        let (pos, f) = ((k / width.max(1)) as f64, k % width.max(1));
        let angle = pos / 10000f64.powf((f - f % 2) as f64 / width as f64);
        r(if f % 2 == 0 { angle.sin() } else { angle.cos() })
    })
}

/// The gradient of `amax` over `dims`: each group's g goes to the elements
/// equal to its maximum, split evenly between ties.
pub fn amax_grad<T: Real>(x: &Tensor<T>, max: &Tensor<T>, g: &Tensor<T>, dims: &[String]) -> Tensor<T> {
    let names: Vec<&str> = dims.iter().map(String::as_str).collect();
    let p = x.move_last(&names);
    // `max` and `g` have the kept dims; line them up with p's row order.
    let kept: Vec<Dim> = p.dims[..p.dims.len() - names.len()].to_vec();
    let (m, gk) = (max.permute(&kept), g.permute(&kept));
    let n = p.numel() / m.numel().max(1);
    let mut out = vec![T::zero(); p.numel()];
    for (((o, row), mx), gv) in out.chunks_mut(n.max(1)).zip(p.data.chunks(n.max(1))).zip(&m.data).zip(&gk.data) {
        let ties = row.iter().filter(|v| **v == *mx).count().max(1);
        let share = *gv / r::<T>(ties as f64);
        for (o, v) in o.iter_mut().zip(row) {
            if *v == *mx {
                *o = share;
            }
        }
    }
    Tensor { dims: p.dims.clone(), data: out }.permute(&x.dims)
}

/// Per row: (mean, 1/std) for LayerNorm, (0, 1/rms) for RMSNorm.
pub(crate) fn norm_stats<T: Real>(row: &[T], eps: f64, rms: bool) -> (T, T) {
    let n = r::<T>(row.len() as f64);
    let mean = if rms { T::zero() } else { super::fast::sum(row) / n };
    // Σ (x − mean)², in `fast::sum`'s order (as a fused kernel's row sum).
    let var = super::fast::sum_by(row.len(), |i| (row[i] - mean) * (row[i] - mean));
    (mean, T::one() / (var / n + r(eps)).sqrt())
}

pub fn norm<T: Real>(
    x: &Tensor<T>,
    dim: &str,
    eps: f64,
    rms: bool,
    gain: Option<&Tensor<T>>,
    bias: Option<&Tensor<T>>,
) -> Tensor<T> {
    let (gain, bias) = (gain.map(|g| &g.data[..]), bias.map(|b| &b.data[..]));
    rows(x, dim, |row| norm_row(row, eps, rms, gain, bias))
}

/// One row of a LayerNorm (RMSNorm with `rms`), in place.
pub(crate) fn norm_row<T: Real>(row: &mut [T], eps: f64, rms: bool, gain: Option<&[T]>, bias: Option<&[T]>) {
    let (mean, inv) = norm_stats(row, eps, rms);
    for (i, v) in row.iter_mut().enumerate() {
        let mut y = (*v - mean) * inv;
        if let Some(g) = gain {
            y = y * g[i];
        }
        if let Some(b) = bias {
            y += b[i];
        }
        *v = y;
    }
}

pub fn norm_grad_x<T: Real>(
    x: &Tensor<T>,
    gain: Option<&Tensor<T>>,
    g: &Tensor<T>,
    dim: &str,
    eps: f64,
    rms: bool,
) -> Tensor<T> {
    let px = dim_last(x, dim);
    let pg = dim_last(g, dim);
    let len = px.size(dim).max(1);
    let n = r::<T>(len as f64);
    let mut out = vec![T::zero(); px.data.len()];
    let ones = vec![T::one(); len];
    let gain = gain.map(|g| &g.data[..]).unwrap_or(&ones);
    par_rows(&mut out, len, |first, o| {
        for (k, o) in o.chunks_mut(len).enumerate() {
            let (xr, gr) = (&px.data[(first + k) * len..][..len], &pg.data[(first + k) * len..][..len]);
            norm_grad_x_row(xr, gr, gain, n, eps, rms, o);
        }
    });
    Tensor { dims: px.dims.clone(), data: out }.permuted(&x.dims).into_owned()
}

/// One row of a norm's input gradient: `o` from the row `xr`, its output
/// gradient `gr` and the gain (`n`: the row's length as a value).
pub(crate) fn norm_grad_x_row<T: Real>(xr: &[T], gr: &[T], gain: &[T], n: T, eps: f64, rms: bool, o: &mut [T]) {
    let (mean, inv) = norm_stats(xr, eps, rms);
    // With x̂ = (x − mean)·inv and d = g·gain: dx = inv·(d − mean(d) − x̂·mean(d·x̂)),
    // mean(d·x̂) taken as inv·Σ d·(x − mean) / n (one sweep fewer in a fused kernel).
    // The sums in `fast::sum`'s order (as a fused kernel's row sums).
    let len = xr.len().min(gr.len()).min(gain.len());
    let m1 = if rms { T::zero() } else { super::fast::sum_by(len, |k| gr[k] * gain[k]) / n };
    let m2 = super::fast::sum_by(len, |k| gr[k] * gain[k] * (xr[k] - mean)) * inv / n;
    for (((o, x), g), w) in o.iter_mut().zip(xr).zip(gr).zip(gain) {
        *o = inv * (*g * *w - m1 - (*x - mean) * inv * m2);
    }
}

pub fn norm_grad_gain<T: Real>(x: &Tensor<T>, g: &Tensor<T>, dim: &str, eps: f64, rms: bool) -> Tensor<T> {
    let px = dim_last(x, dim);
    let pg = dim_last(g, dim);
    let len = px.size(dim).max(1);
    let mut out = vec![T::zero(); len];
    for (xr, gr) in px.data.chunks(len).zip(pg.data.chunks(len)) {
        let (mean, inv) = norm_stats(xr, eps, rms);
        for i in 0..len {
            out[i] += gr[i] * (xr[i] - mean) * inv;
        }
    }
    let d = x.dims.iter().find(|d| d.name == dim).cloned().expect("normalised dim");
    Tensor { dims: vec![d], data: out }
}

pub fn embed<T: Real>(table: View<'_, T>, ids: View<'_, T>, out: &[Dim]) -> Result<Tensor<T>, String> {
    let rows = table.dims[0].size as usize;
    let width: usize = table.dims[1..].iter().map(|d| d.size as usize).product();
    let mut data = Vec::with_capacity(ids.numel() * width);
    for id in ids.data {
        let i = id.to_f64().unwrap_or(-1.0);
        if i < 0.0 || i as usize >= rows || i.fract() != 0.0 {
            return Err(format!("id {i} is outside the table's {rows} rows"));
        }
        let i = i as usize;
        data.extend_from_slice(&table.data[i * width..(i + 1) * width]);
    }
    Ok(Tensor { dims: out.to_vec(), data })
}

pub fn embed_grad<T: Real>(ids: &Tensor<T>, g: &Tensor<T>, table: &[Dim]) -> Tensor<T> {
    let mut out = Tensor::zeros(table);
    let width: usize = table[1..].iter().map(|d| d.size as usize).product();
    // g is [ids..., features...] in that order (the embed output order).
    for (k, id) in ids.data.iter().enumerate() {
        let i = id.to_f64().unwrap_or(0.0) as usize;
        for j in 0..width {
            out.data[i * width + j] += g.data[k * width + j];
        }
    }
    out
}

/// Slice `index` of `dim` (dropped).
pub fn take<T: Real>(x: &Tensor<T>, dim: &str, index: usize, out: &[Dim]) -> Tensor<T> {
    let p = x.position(dim).expect("dim");
    // In place of the dim: a copy of contiguous blocks.
    if x.dims.iter().filter(|d| d.name != dim).eq(out.iter()) {
        let inner: usize = x.dims[p + 1..].iter().map(|d| d.size as usize).product();
        let n = x.dims[p].size as usize;
        let mut data = Vec::with_capacity(out.iter().map(|d| d.size as usize).product());
        for block in x.data.chunks(inner * n) {
            data.extend_from_slice(&block[index * inner..(index + 1) * inner]);
        }
        return Tensor { dims: out.to_vec(), data };
    }
    let st = crate::tensor::strides(&x.dims);
    let base = index * st[p];
    let s = aligned_strides(&x.dims, out);
    let mut data = Vec::with_capacity(out.iter().map(|d| d.size as usize).product());
    for_each_offset(out, &s, |o| data.push(x.data[base + o]));
    Tensor { dims: out.to_vec(), data }
}

/// Each part placed at its index along `dim` (added where indices repeat), zeros elsewhere.
pub fn untake<T: Real>(parts: &[&Tensor<T>], dim: &str, indices: &[u64], out: &[Dim]) -> Tensor<T> {
    let mut t = Tensor::zeros(out);
    let p = t.position(dim).expect("dim");
    let st = crate::tensor::strides(out);
    let inner: usize = out[p + 1..].iter().map(|d| d.size as usize).product();
    let n = out[p].size as usize;
    for (g, &index) in parts.iter().zip(indices) {
        let index = index as usize;
        if out.iter().filter(|d| d.name != dim).eq(g.dims.iter()) {
            for (dst, src) in t.data.chunks_mut(inner * n).zip(g.data.chunks(inner)) {
                for (d, s) in dst[index * inner..(index + 1) * inner].iter_mut().zip(src) {
                    *d += *s;
                }
            }
            continue;
        }
        let base = index * st[p];
        let s = aligned_strides(out, &g.dims);
        let mut k = 0;
        for_each_offset(&g.dims, &s, |o| {
            t.data[base + o] += g.data[k];
            k += 1;
        });
    }
    t
}

/// The slice `[start, start + len)` of `dim` of `g`, as the output (where `dim` is called `to`).
pub fn slice<T: Real>(g: &Tensor<T>, dim: &str, start: usize, to: &str, out: &[Dim]) -> Tensor<T> {
    let gs = crate::tensor::strides(&g.dims);
    let p = g.position(dim).expect("dim");
    let strides: Vec<usize> = out
        .iter()
        .map(|d| {
            let name = if d.name == to { dim } else { d.name.as_str() };
            g.dims.iter().position(|x| x.name == name).map(|i| gs[i]).unwrap_or(0)
        })
        .collect();
    let base = start * gs[p];
    let mut data = Vec::with_capacity(out.iter().map(|d| d.size as usize).product());
    for_each_offset(out, &strides, |o| data.push(g.data[base + o]));
    Tensor { dims: out.to_vec(), data }
}

pub fn concat<T: Real>(parts: &[&Tensor<T>], over: &[String], into: &str, out: &[Dim]) -> Tensor<T> {
    let mut t = Tensor::zeros(out);
    let os = crate::tensor::strides(out);
    let pi = out.iter().position(|d| d.name == into).expect("into dim");
    let mut start = 0usize;
    for (x, o) in parts.iter().zip(over) {
        let len = x.size(o);
        // Iterate over the output region of this part; read x with broadcasting.
        let region: Vec<Dim> =
            out.iter().map(|d| if d.name == into { Dim::new(o.clone(), len as u64) } else { d.clone() }).collect();
        let xs = aligned_strides(&x.dims, &region);
        let base = start * os[pi];
        let mut k = Vec::with_capacity(region.iter().map(|d| d.size as usize).product());
        for_each_offset(&region, &xs, |off| k.push(x.data[off]));
        let mut j = 0;
        for_each_offset(&region, &os, |off| {
            t.data[base + off] = k[j];
            j += 1;
        });
        start += len;
    }
    t
}

/// ViT patch extraction: `[..., c, h, w]` → `[..., grid, pixels]` with
/// grid = (h/p)·(w/p) patches in row-major order and, within a patch, pixels
/// ordered (channel, row, column) — a convolution kernel's flattening.
pub fn patches<T: Real>(x: &Tensor<T>, p: usize, out: &[Dim]) -> Tensor<T> {
    let n = x.dims.len();
    let (c, h, w) = (x.dims[n - 3].size as usize, x.dims[n - 2].size as usize, x.dims[n - 1].size as usize);
    let lead: usize = x.dims[..n - 3].iter().map(|d| d.size as usize).product();
    let (gh, gw) = (h / p, w / p);
    let mut data = Vec::with_capacity(lead * c * h * w);
    for l in 0..lead {
        let img = &x.data[l * c * h * w..(l + 1) * c * h * w];
        for by in 0..gh {
            for bx in 0..gw {
                for ch in 0..c {
                    for dy in 0..p {
                        let row = (ch * h + by * p + dy) * w + bx * p;
                        data.extend_from_slice(&img[row..row + p]);
                    }
                }
            }
        }
    }
    Tensor { dims: out.to_vec(), data }
}

/// Rotary embeddings on `[..., seq, heads, head_dim]`: pairs (2i, 2i+1) of
/// the first `fraction` of head_dim rotate by angle pos · theta^(−2i/rotated);
/// `inverse` rotates back (the gradient).
/// Rotary embeddings of `x` [..., seq, heads, head_dim] whose row `i` of
/// `seq` sits at position `start + i` (the inverse rotation with `inverse`).
pub fn rope<T: Real>(x: &Tensor<T>, theta: f64, fraction: f64, inverse: bool, start: usize) -> Tensor<T> {
    let n = x.dims.len();
    let (s, h, d) = (x.dims[n - 3].size as usize, x.dims[n - 2].size as usize, x.dims[n - 1].size as usize);
    let rotated = (((d as f64) * fraction) as usize / 2) * 2;
    let mut out = x.clone();
    let sign = if inverse { -1.0 } else { 1.0 };
    // Each position's (sin, cos) per rotated pair, computed once for all its heads.
    let mut table: Vec<(f64, f64)> = Vec::with_capacity(rotated / 2);
    let mut at = usize::MAX;
    for (idx, chunk) in out.data.chunks_mut(d).enumerate() {
        let pos = start + (idx / h) % s;
        if pos != at {
            at = pos;
            table.clear();
            table.extend(
                (0..rotated)
                    .step_by(2)
                    .map(|i| (sign * pos as f64 * theta.powf(-(i as f64) / rotated as f64)).sin_cos()),
            );
        }
        for (i, &(sin, cos)) in (0..rotated).step_by(2).zip(&table) {
            let (a, b) = (chunk[i].to_f64().unwrap_or(0.0), chunk[i + 1].to_f64().unwrap_or(0.0));
            chunk[i] = r(a * cos - b * sin);
            chunk[i + 1] = r(a * sin + b * cos);
        }
    }
    out
}

/// A reproducible uniform number in [0, 1) for (seed, node, element).
pub fn uniform(seed: u64, node: u64, i: u64) -> f64 {
    let mut z = seed ^ node.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ i.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

pub fn dropout<T: Real>(x: &Tensor<T>, p: f64, seed: u64, node: u64) -> Tensor<T> {
    let scale = r::<T>(1.0 / (1.0 - p));
    let data = x
        .data
        .iter()
        .enumerate()
        .map(|(i, v)| if uniform(seed, node, i as u64) < p { T::zero() } else { *v * scale })
        .collect();
    Tensor { dims: x.dims.clone(), data }
}

/// Logits as rows over the class dim (the dim targets lack), in the
/// targets' order: borrowed when they already are, else a transposed copy.
/// The logits as rows of classes in the targets' order (borrowed where they
/// are laid out so already), that order's dims, and the class count.
fn class_rows<'t, T: Real>(logits: View<'t, T>, targets: View<'_, T>) -> (std::borrow::Cow<'t, [T]>, Vec<Dim>, usize) {
    let class = logits.dims.iter().find(|d| !targets.dims.iter().any(|t| t.name == d.name)).expect("class dim").clone();
    let c = class.size as usize;
    let mut order = targets.dims.to_vec();
    order.push(class);
    let rows = if order.as_slice() == logits.dims {
        std::borrow::Cow::Borrowed(logits.data)
    } else {
        std::borrow::Cow::Owned(Tensor { dims: logits.dims.to_vec(), data: logits.data.to_vec() }.permute(&order).data)
    };
    (rows, order, c)
}

/// One row of [`cross_entropy`]: the row's loss and whether it counts (1
/// or 0), in the operations and order of the fused kernel
/// (`compiler::kernel::cross_entropy_rows`).
fn ce_row<T: Real>(row: &[T], t: T, smoothing: f64, ignore: Option<i64>) -> (T, T) {
    let c = row.len();
    let max = super::fast::max(row);
    let sum = super::fast::sum_by(c, |k| exp_of(row[k] - max));
    let lse = max + ln_of(sum);
    let at = |k: usize| r::<T>(f64::from(u8::from(r::<T>(k as f64) == t)));
    let picked = super::fast::sum_by(c, |k| at(k) * row[k]);
    let mut loss = lse - picked;
    if smoothing > 0.0 {
        let mean = super::fast::sum(row) / r(c as f64);
        loss = r::<T>(1.0 - smoothing) * loss + r::<T>(smoothing) * (lse - mean);
    }
    match kept(t, ignore) {
        Some(k) => (loss * k, k),
        None => (loss, T::one()),
    }
}

/// 1 where class id `t` is not `ignore`, else 0 (`None` without one), as
/// the fused kernels compute it (`compiler::kernel::kept`).
fn kept<T: Real>(t: T, ignore: Option<i64>) -> Option<T> {
    ignore.map(|i| T::one() - r(f64::from(u8::from(t == r(i as f64)))))
}

/// What a mean divides by: the rows that count (none counting as one: the
/// loss is then 0), summed in row order.
fn ce_count<T: Real>(targets: &[T], ignore: Option<i64>) -> T {
    match ignore {
        Some(_) => {
            let n = targets.iter().fold(T::zero(), |a, t| a + kept(*t, ignore).unwrap_or(T::one()));
            n + r(f64::from(u8::from(n == T::zero())))
        }
        None => r(targets.len().max(1) as f64),
    }
}

/// Mean cross-entropy of logits (class dim = the one targets lack) against
/// integer targets, with label smoothing and an ignored class id: what the
/// fused kernels compute (`compiler::kernel::cross_entropy_rows`, the sum
/// over rows, the mean), in T's precision: each row in the fixed order of
/// the row sums, the rows summed in row order from zero. Rows in parallel.
pub fn cross_entropy<T: Real>(logits: View<'_, T>, targets: View<'_, T>, smoothing: f64, ignore: Option<i64>) -> T {
    use rayon::prelude::*;
    let (p, _, c) = class_rows(logits, targets);
    let c = c.max(1);
    let losses: Vec<T> = if super::threads() > 1 {
        p.par_chunks(c).zip(targets.data.par_iter()).map(|(row, t)| ce_row(row, *t, smoothing, ignore).0).collect()
    } else {
        p.chunks(c).zip(targets.data).map(|(row, t)| ce_row(row, *t, smoothing, ignore).0).collect()
    };
    losses.iter().fold(T::zero(), |a, l| a + *l) / ce_count(targets.data, ignore)
}

/// d loss / d logits of [`cross_entropy`] times `g`, as the fused kernel
/// computes it (`compiler::kernel::cross_entropy_grad`): per row
/// (e^(x − max)·(1 / Σe^(x − max)) − target)·(g / kept rows), 0 on an
/// ignored row; rows over the kernel threads.
pub fn cross_entropy_grad<T: Real>(
    logits: View<'_, T>,
    targets: View<'_, T>,
    g: T,
    smoothing: f64,
    ignore: Option<i64>,
) -> Tensor<T> {
    let (p, order, c) = class_rows(logits, targets);
    let scale = g / ce_count(targets.data, ignore);
    let mut out = vec![T::zero(); p.len()];
    par_rows(&mut out, c, |first, o| {
        let mut e = vec![T::zero(); c];
        for (k, o) in o.chunks_mut(c.max(1)).enumerate() {
            let row = &p[(first + k) * c..(first + k + 1) * c];
            let t = targets.data[first + k];
            let max = super::fast::max(row);
            for (e, x) in e.iter_mut().zip(row) {
                *e = exp_of(*x - max);
            }
            let inv = T::one() / super::fast::sum(&e);
            let kept = kept(t, ignore);
            for (j, (o, e)) in o.iter_mut().zip(&e).enumerate() {
                let mut target: T = r(f64::from(u8::from(r::<T>(j as f64) == t)));
                if smoothing > 0.0 {
                    target = target * r(1.0 - smoothing) + r(smoothing / c as f64);
                }
                *o = (*e * inv - target) * scale;
                if let Some(k) = kept {
                    *o = *o * k;
                }
            }
        }
    });
    let t = Tensor { dims: order, data: out };
    if t.dims.as_slice() == logits.dims { t } else { t.permute(logits.dims) }
}

#[cfg(test)]
mod tests {
    #[test]
    fn sinusoid_interleaves_sine_and_cosine() {
        use tessera_compiler::ir::Dim;
        let t = super::sinusoid::<f64>(&[Dim::new("pos", 2), Dim::new("dim", 4)]);
        // Position 1: angles 1 and 1/100 (10000^(2/4) = 100).
        let want = [0.0, 1.0, 0.0, 1.0, 1f64.sin(), 1f64.cos(), 0.01f64.sin(), 0.01f64.cos()];
        assert!(t.data.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-15), "{:?}", t.data);
    }

    #[test]
    fn binary_broadcasts_by_name_on_every_path() {
        use crate::tensor::Tensor;
        use tessera_compiler::ir::BinaryOp;
        use tessera_compiler::ir::Dim;
        let (a, b, c) = (Dim::new("a", 3), Dim::new("b", 50), Dim::new("c", 700));
        let t = |dims: Vec<Dim>| {
            let n: usize = dims.iter().map(|d| d.size as usize).product();
            Tensor::<f32> { dims, data: (0..n).map(|i| (i % 97) as f32 + 0.5).collect() }
        };
        let out = vec![a.clone(), b.clone(), c.clone()];
        // Same layout, a trailing block on either side, a scalar, a middle dim.
        let cases = [
            (t(out.clone()), t(out.clone())),
            (t(out.clone()), t(vec![c.clone()])),
            (t(vec![b.clone(), c.clone()]), t(out.clone())),
            (t(out.clone()), t(vec![])),
            (t(out.clone()), t(vec![b.clone()])),
            (t(vec![a.clone()]), t(out.clone())),
            (t(out.clone()), t(vec![a.clone(), c.clone()])),
            (t(vec![a.clone(), c.clone()]), t(out.clone())),
        ];
        for (x, y) in &cases {
            let got = super::binary(BinaryOp::Sub, x, y, &out);
            // In place, into whichever side has the output's dims.
            let (mut t, other, left) = if x.dims == out { (x.clone(), y, true) } else { (y.clone(), x, false) };
            if super::binary_assign(BinaryOp::Sub, &mut t, other, left) {
                assert_eq!(t.data, got.data, "in place, {:?} ∘ {:?}", x.dims, y.dims);
            } else {
                let before = if left { x } else { y };
                assert_eq!(t.data, before.data, "a fallback leaves the target untouched");
            }
            let at = |t: &Tensor<f32>, i: usize, j: usize, k: usize| {
                let idx = t.dims.iter().fold(0, |acc, d| {
                    acc * d.size as usize
                        + if d.name == "a" {
                            i
                        } else if d.name == "b" {
                            j
                        } else {
                            k
                        }
                });
                t.data[idx]
            };
            for i in 0..3 {
                for j in 0..50 {
                    for k in 0..700 {
                        assert_eq!(got.data[(i * 50 + j) * 700 + k], at(x, i, j, k) - at(y, i, j, k));
                    }
                }
            }
        }
    }

    #[test]
    fn rope_rotates_pairs_by_position() {
        use crate::tensor::Tensor;
        use tessera_compiler::ir::Dim;
        // seq 2, one head, head_dim 4: x = (1, 0, 1, 0) at both positions.
        let dims = [Dim::new("seq", 2), Dim::new("heads", 1), Dim::new("head_dim", 4)];
        let x = Tensor::<f64> { dims: dims.to_vec(), data: vec![1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0] };
        let y = super::rope(&x, 100.0, 1.0, false, 0);
        // Position 0 is unchanged; position 1 turns pair 0 by 1 rad and pair 1 by 100^(-1/2) rad.
        assert_eq!(&y.data[..4], &[1.0, 0.0, 1.0, 0.0]);
        let (a, b) = (1.0f64, 0.1f64);
        for (got, want) in y.data[4..].iter().zip([a.cos(), a.sin(), b.cos(), b.sin()]) {
            assert!((got - want).abs() < 1e-12, "{got} vs {want}");
        }
        // The inverse rotation restores the input.
        assert!(super::rope(&y, 100.0, 1.0, true, 0).data.iter().zip(&x.data).all(|(p, q)| (p - q).abs() < 1e-12));
    }
}
