//! Generated Rust against the JIT, in the same run on the same machine:
//! training throughput of `specs/bench/{tiny,moe-tiny,small}.spec` with the
//! generated module's kernels (rustc, this bench's release build) and with
//! the cranelift JIT's, rounds alternating, each round from the initial
//! weights (two warm-up steps, then the timed ones); and the generated
//! module's size per spec.
//!
//! `cargo bench --bench codegen [-- STEPS ROUNDS [tiny|moe-tiny|small]]`
//! (default 5 steps, 3 rounds, every spec).

use std::time::Instant;
use tessera::runtime::generated::Spec;
use tessera::runtime::train::{Engine, RunConfig, Trainer};

tessera::spec!("specs/bench/tiny.spec");
tessera::spec!("specs/bench/moe-tiny.spec");
tessera::spec!("specs/bench/small.spec");

const WARMUP: u64 = 2;

/// Tokens per second of `steps` timed steps of `spec` with `engine`.
fn throughput(spec: &Spec, engine: Engine, steps: u64) -> f64 {
    let cfg = RunConfig {
        steps: steps + WARMUP,
        seed: 1,
        backend: engine,
        ..spec.run_config(std::env::temp_dir().join(format!("tessera-bench-codegen-{}", std::process::id())))
    };
    let mut t = Trainer::new(spec.training().expect("compiles"), cfg).expect("starts");
    let mut start = Instant::now();
    for k in 0..WARMUP + steps {
        if k == WARMUP {
            start = Instant::now();
        }
        t.train_step().expect("a step");
    }
    (t.tokens_per_step() * steps) as f64 / start.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    use tessera::runtime::backend::native::in_place_stats;
    let args: Vec<u64> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let (steps, rounds) = (args.first().copied().unwrap_or(5), args.get(1).copied().unwrap_or(3));
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    println!(
        "{:<10} {:>8} {:>8} {:>9} {:>14} {:>14} {:>7}",
        "spec", "kernels", "lines", "KiB", "jit tok/s", "generated", "ratio"
    );
    let only = std::env::args().skip(1).find(|a| a.parse::<u64>().is_err() && !a.starts_with('-'));
    for (name, file, spec) in [
        ("tiny", "specs/bench/tiny.spec", &tiny::SPEC),
        ("moe-tiny", "specs/bench/moe-tiny.spec", &moe_tiny::SPEC),
        ("small", "specs/bench/small.spec", &small::SPEC),
    ] {
        if only.as_deref().is_some_and(|o| o != name) {
            continue;
        }
        let g = tessera::compiler::codegen::rust::generate(&root.join(file), &Default::default()).expect("generates");
        let (mut jit, mut native) = (Vec::new(), Vec::new());
        for r in 0..rounds {
            // Alternate which goes first, so that neither always meets a warmer machine.
            if r % 2 == 0 {
                jit.push(throughput(spec, Engine::Jit, steps));
                native.push(throughput(spec, spec.engine(), steps));
            } else {
                native.push(throughput(spec, spec.engine(), steps));
                jit.push(throughput(spec, Engine::Jit, steps));
            }
        }
        let (j, n) = (median(jit), median(native));
        println!(
            "{name:<10} {:>8} {:>8} {:>9.1} {j:>14.0} {n:>14.0} {:>7.3}",
            g.kernels,
            g.code.lines().count(),
            g.code.len() as f64 / 1024.0,
            n / j
        );
    }
    let (in_place, copied) = in_place_stats();
    println!(
        "kernel runs that updated an input in place: {in_place} with in-place code, {copied} by copying the input"
    );
}
