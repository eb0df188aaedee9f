//! How long checking the largest library specs takes (target: under 50 ms).
//!
//! `cargo bench -p tessera-compiler --bench check` prints the median and the
//! fastest of repeated runs per spec. Parsing, `use` loading, shape checking,
//! layout validation and the per-rank memory report are all included.

use std::path::Path;
use std::time::{Duration, Instant};
use tessera_compiler::{Options, SourceMap, check_path, cost::memory};

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    std::env::set_current_dir(&root).expect("repository root");
    let runs: usize = std::env::var("TESSERA_BENCH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(30);
    println!("{:<32} {:>10} {:>10} {:>8}", "spec", "median", "fastest", "ranks");
    for spec in [
        "specs/models/switch-c.spec",
        "specs/models/mt-nlg-530b.spec",
        "specs/models/gpt3-175b.spec",
        "specs/models/mixtral-8x7b.spec",
    ] {
        let mut times = Vec::with_capacity(runs);
        let mut ranks = 0;
        for _ in 0..runs {
            let t = Instant::now();
            let mut sources = SourceMap::new();
            let m = check_path(&mut sources, Path::new(spec), &Options::default())
                .unwrap_or_else(|_| panic!("{spec} checks"));
            ranks = memory::memory_per_rank(&m).len();
            times.push(t.elapsed());
        }
        times.sort();
        let ms = |d: Duration| format!("{:.2} ms", d.as_secs_f64() * 1e3);
        println!("{:<32} {:>10} {:>10} {:>8}", spec, ms(times[runs / 2]), ms(times[0]), ranks);
    }
}
