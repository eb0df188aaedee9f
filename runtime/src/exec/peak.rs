//! This machine's fp32 peak, measured: what `tessera bench` compares its
//! achieved GFLOP/s against. Development machines differ (Zen 4 with AVX2
//! and AVX-512 on one FMA pipe pair, Xeons with two AVX-512 FMA ports), so
//! the peak is measured with an FMA loop rather than assumed.
//!
//! The loop keeps 16 independent vector accumulators, more than FMA latency
//! × FMA ports on any current x86 core, so it runs at the FMA throughput.

/// The CPU's model name (`/proc/cpuinfo`), or "unknown CPU".
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

/// Accumulators the loop keeps in flight.
const ACC: usize = 16;

/// `iters` rounds of one FMA into each of [`ACC`] 8-lane accumulators;
/// returns a sum so that the work cannot be optimised away.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn fma_loop_avx2(iters: u64, seed: f32) -> f32 {
    use std::arch::x86_64::*;
    let mut acc: [__m256; ACC] = std::array::from_fn(|i| _mm256_set1_ps(seed + i as f32));
    let (a, b) = (_mm256_set1_ps(std::hint::black_box(0.999_999)), _mm256_set1_ps(std::hint::black_box(1e-7)));
    for _ in 0..std::hint::black_box(iters) {
        for v in acc.iter_mut() {
            *v = _mm256_fmadd_ps(*v, a, b);
        }
    }
    let mut out = [0f32; 8];
    let sum = acc.iter().fold(_mm256_setzero_ps(), |s, v| _mm256_add_ps(s, *v));
    // SAFETY: `out` holds 8 f32s, the width of the store.
    unsafe { _mm256_storeu_ps(out.as_mut_ptr(), sum) };
    out.iter().sum()
}

/// The same with 16-lane AVX-512 accumulators.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn fma_loop_avx512(iters: u64, seed: f32) -> f32 {
    use std::arch::x86_64::*;
    let mut acc: [__m512; ACC] = std::array::from_fn(|i| _mm512_set1_ps(seed + i as f32));
    let (a, b) = (_mm512_set1_ps(std::hint::black_box(0.999_999)), _mm512_set1_ps(std::hint::black_box(1e-7)));
    for _ in 0..std::hint::black_box(iters) {
        for v in acc.iter_mut() {
            *v = _mm512_fmadd_ps(*v, a, b);
        }
    }
    acc.iter().map(|v| _mm512_reduce_add_ps(*v)).sum()
}

/// Portable fallback: scalar FMAs (a lower bound on other architectures).
#[cfg(not(target_arch = "x86_64"))]
fn fma_loop_scalar(iters: u64, seed: f32) -> f32 {
    let mut acc = [seed; ACC];
    for _ in 0..iters {
        for v in acc.iter_mut() {
            *v = v.mul_add(0.999_999, 1e-7);
        }
    }
    acc.iter().sum()
}

/// GFLOP/s of one thread running the FMA loop for about `millis`.
fn one_thread(millis: u64) -> f64 {
    #[cfg(target_arch = "x86_64")]
    let wide = std::arch::is_x86_feature_detected!("avx512f");
    #[cfg(not(target_arch = "x86_64"))]
    let wide = false;
    let lanes: u64 = if wide {
        16
    } else if cfg!(target_arch = "x86_64") {
        8
    } else {
        1
    };
    let run = |iters: u64| -> f64 {
        let t = std::time::Instant::now();
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX-512F was detected above; AVX2 and FMA are in the
        // x86-64-v3 baseline the workspace is built for (.cargo/config.toml).
        let s = unsafe { if wide { fma_loop_avx512(iters, 1.0) } else { fma_loop_avx2(iters, 1.0) } };
        #[cfg(not(target_arch = "x86_64"))]
        let s = fma_loop_scalar(iters, 1.0);
        std::hint::black_box(s);
        t.elapsed().as_secs_f64()
    };
    // Calibrate the iteration count, then take the best of three.
    let mut iters = 1u64 << 16;
    while run(iters) < 0.01 && iters < 1 << 40 {
        iters *= 2;
    }
    let secs = run(iters);
    let iters = ((iters as f64) * (millis as f64 / 1e3) / secs.max(1e-9)).max(1.0) as u64;
    let best = (0..3).map(|_| run(iters)).fold(f64::INFINITY, f64::min);
    (iters * ACC as u64 * lanes * 2) as f64 / best / 1e9
}

/// The fp32 peak of `threads` cores running at once, GFLOP/s (all cores
/// together, so that a lower all-core clock counts).
pub fn fp32_peak_gflops(threads: usize) -> f64 {
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads.max(1)).map(|_| s.spawn(|| one_thread(200))).collect();
        handles.into_iter().filter_map(|h| h.join().ok()).sum()
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_peak_is_measured_and_the_cpu_named() {
        let p = super::fp32_peak_gflops(1);
        assert!(p.is_finite() && p > 0.1, "{p} GFLOP/s");
        assert!(!super::cpu_model().is_empty());
    }
}
