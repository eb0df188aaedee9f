//! Building blocks of the fast f32 paths: an exp and an erf that rustc can
//! vectorize (libm's are scalar calls), and splitting a buffer of rows over
//! the kernel threads.

use rayon::prelude::*;

/// Below this many elements a kernel stays on one thread (a fork costs more).
const PAR_MIN: usize = 1 << 15;

/// e^x in f32 within 2 ulp (Cody–Waite range reduction and Cephes' degree-6
/// polynomial), written without branches or calls so that loops over it
/// vectorize. Results below f32's smallest normal (x < −87.33) flush to 0;
/// exp(+∞) = +∞; NaN propagates.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const MIN: f32 = -87.336_55; // ln(f32::MIN_POSITIVE)
    const MAX: f32 = 88.722_83; // ln(f32::MAX)
    const SHIFT: f32 = 12_582_912.0; // 1.5 · 2²³
    let xc = x.clamp(MIN, MAX);
    // n = round(x·log2 e) by the 1.5·2²³ trick: the sum's low mantissa bits
    // hold n, so no float-to-int conversion (which would not vectorize).
    let t = xc * LOG2E + SHIFT;
    let n = t - SHIFT;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 1.666_666_5e-1)
        * r
        + 0.5;
    // 2^n for n in [−126, 128] as two normal powers of two.
    let n = (t.to_bits() as i32).wrapping_sub(SHIFT.to_bits() as i32);
    let h = n >> 1;
    let pow2 = |e: i32| f32::from_bits(((e + 127) << 23) as u32);
    let y = (1.0 + r + r * r * p) * pow2(h) * pow2(n - h);
    if x < MIN {
        0.0
    } else if x > MAX {
        f32::INFINITY
    } else if x.is_nan() {
        x
    } else {
        y
    }
}

/// erf in f32 (Abramowitz & Stegun 7.1.26: 1.5e-7 in exact arithmetic;
/// evaluated in f32 the absolute error stays below 6e-7), vectorizable.
#[inline(always)]
pub fn erf_f32(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = ((((1.061_405_4 * t - 1.453_152_1) * t + 1.421_413_7) * t - 0.284_496_74) * t + 0.254_829_6) * t;
    (1.0 - poly * exp_f32(-a * a)).copysign(x)
}

/// Σ x over 8 independent lanes, so that the loop vectorizes (a float sum
/// in one accumulator cannot be reordered by the compiler).
#[inline(always)]
pub fn sum<T: crate::tensor::Real>(x: &[T]) -> T {
    let mut acc = [T::zero(); 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += *v;
        }
    }
    let mut s = acc.iter().fold(T::zero(), |a, b| a + *b);
    for v in rest {
        s += *v;
    }
    s
}

/// Σ f(i) for i in 0..n, in [`sum`]'s order (8 lanes added in lane order,
/// then the tail): the one order of a row sum, shared by the row functions
/// and the fused kernels' row reductions so that both give the same bits.
#[inline(always)]
pub fn sum_by<T: crate::tensor::Real>(n: usize, f: impl Fn(usize) -> T) -> T {
    let mut acc = [T::zero(); 8];
    let whole = n / 8 * 8;
    for c in (0..whole).step_by(8) {
        for (k, a) in acc.iter_mut().enumerate() {
            *a += f(c + k);
        }
    }
    let mut s = acc.iter().fold(T::zero(), |a, b| a + *b);
    for i in whole..n {
        s += f(i);
    }
    s
}

/// Σ x·y over 8 lanes.
#[inline(always)]
pub fn dot<T: crate::tensor::Real>(x: &[T], y: &[T]) -> T {
    let mut acc = [T::zero(); 8];
    let n = x.len().min(y.len());
    let (xc, yc) = (x[..n].chunks_exact(8), y[..n].chunks_exact(8));
    let (xr, yr) = (xc.remainder(), yc.remainder());
    for (a, b) in xc.zip(yc) {
        for k in 0..8 {
            acc[k] += a[k] * b[k];
        }
    }
    let mut s = acc.iter().fold(T::zero(), |a, b| a + *b);
    for (a, b) in xr.iter().zip(yr) {
        s += *a * *b;
    }
    s
}

/// max x over 8 lanes (−∞ for an empty slice).
#[inline(always)]
pub fn max<T: crate::tensor::Real>(x: &[T]) -> T {
    let mut acc = [T::neg_infinity(); 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a = if *v > *a { *v } else { *a };
        }
    }
    acc.iter().chain(rest).fold(T::neg_infinity(), |a, b| if *b > a { *b } else { a })
}

/// `data` as f32 when `T` is f32 (the fast paths), else `None`.
pub fn as_f32<T: 'static>(data: &[T]) -> Option<&[f32]> {
    (std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>())
        // SAFETY: T is f32, so the slice has f32's layout.
        .then(|| unsafe { std::slice::from_raw_parts(data.as_ptr().cast::<f32>(), data.len()) })
}

/// `data` as mutable f32 when `T` is f32.
pub fn as_f32_mut<T: 'static>(data: &mut [T]) -> Option<&mut [f32]> {
    (std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>())
        // SAFETY: T is f32, so the slice has f32's layout.
        .then(|| unsafe { std::slice::from_raw_parts_mut(data.as_mut_ptr().cast::<f32>(), data.len()) })
}

/// Run `f(first_row, rows)` over `data` cut into whole rows of `row` elements,
/// one piece per kernel thread when the buffer is large enough.
pub fn par_rows<T: Send>(data: &mut [T], row: usize, f: impl Fn(usize, &mut [T]) + Sync + Send) {
    let row = row.max(1);
    let n_rows = data.len() / row;
    let threads = super::threads().min(n_rows).max(1);
    if threads == 1 || data.len() < PAR_MIN {
        f(0, data);
        return;
    }
    let per = n_rows.div_ceil(threads);
    data.par_chunks_mut(per * row).enumerate().for_each(|(i, c)| f(i * per, c));
}

#[cfg(test)]
mod tests {
    #[test]
    fn exp_is_within_two_ulp_of_libm() {
        let mut worst = 0.0f64;
        for i in -873_000..=887_000 {
            let x = i as f32 / 10_000.0;
            let want = (x as f64).exp();
            let got = super::exp_f32(x) as f64;
            worst = worst.max(((got - want) / want).abs());
        }
        assert!(worst < 2.5e-7, "max relative error {worst}");
        assert_eq!(super::exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(super::exp_f32(f32::INFINITY), f32::INFINITY);
        assert!(super::exp_f32(f32::NAN).is_nan());
        assert_eq!(super::exp_f32(0.0), 1.0);
    }

    #[test]
    fn erf_matches_libm_to_f32_resolution() {
        let mut worst = 0.0f64;
        for i in -4000..=4000 {
            let x = i as f32 / 1000.0;
            worst = worst.max((super::erf_f32(x) as f64 - libm::erf(x as f64)).abs());
        }
        assert!(worst < 6e-7, "max error {worst}");
    }

    #[test]
    fn lane_reductions_match_sequential_ones() {
        for n in [0usize, 1, 7, 8, 9, 100, 1027] {
            let x: Vec<f64> = (0..n).map(|i| ((i * 37) % 101) as f64 - 50.0).collect();
            let y: Vec<f64> = (0..n).map(|i| ((i * 13) % 7) as f64).collect();
            assert_eq!(super::sum(&x), x.iter().sum::<f64>());
            assert_eq!(super::dot(&x, &y), x.iter().zip(&y).map(|(a, b)| a * b).sum::<f64>());
            assert_eq!(super::max(&x), x.iter().copied().fold(f64::NEG_INFINITY, f64::max));
        }
    }

    #[test]
    fn par_rows_visits_every_row_once() {
        let mut v = vec![0u32; 3 * 40_000];
        super::par_rows(&mut v, 3, |first, c| {
            for (i, row) in c.chunks_mut(3).enumerate() {
                row.iter_mut().for_each(|x| *x += (first + i) as u32);
            }
        });
        assert!(v.chunks(3).enumerate().all(|(i, r)| r.iter().all(|&x| x == i as u32)));
    }
}
