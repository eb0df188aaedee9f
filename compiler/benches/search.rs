//! How long the layout search takes (target: 10,000 layouts in under 2 s).
//!
//! `cargo bench -p tessera-compiler --bench search` searches GPT-3 175B on
//! 1024, 2048 and 4096 A100s and Mixtral 8x7B on 64 H100s, and prints the
//! layouts considered, those that fit, and the median and fastest of
//! repeated searches. Each search includes its checks of the spec (one per
//! tensor degree, and per data degree where experts sit on the data axis).

use std::path::Path;
use std::time::{Duration, Instant};
use tessera_compiler::cost::search;
use tessera_compiler::device;
use tessera_compiler::{Options, SourceMap, check_path};

fn check(spec: &str, overrides: &[String], micro_batch: Option<u64>) -> Result<tessera_compiler::Model, String> {
    let mut sources = SourceMap::new();
    let opts = Options { overrides: overrides.to_vec(), model: None, micro_batch };
    check_path(&mut sources, Path::new(spec), &opts).map_err(|d| d.0[0].message.clone())
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    std::env::set_current_dir(&root).expect("repository root");
    let runs: usize = std::env::var("TESSERA_BENCH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(10);
    let gpt3 = vec!["dims.vocab=51200".to_string(), "parallel.layout.vocab=tensor".to_string()];
    let cases = [
        ("specs/models/gpt3-175b.spec", &gpt3, 1024, "a100_80gb"),
        ("specs/models/gpt3-175b.spec", &gpt3, 2048, "a100_80gb"),
        ("specs/models/gpt3-175b.spec", &gpt3, 4096, "a100_80gb"),
        ("specs/models/mixtral-8x7b.spec", &Vec::new(), 64, "h100_80gb"),
    ];
    println!(
        "{:<32} {:>6} {:<10} {:>10} {:>6} {:>10} {:>10}",
        "spec", "world", "device", "layouts", "fit", "median", "fastest"
    );
    for (spec, base, world, dev) in cases {
        let dev = device::device(dev).expect("device");
        let mut times = Vec::with_capacity(runs);
        let (mut considered, mut fit) = (0, 0);
        for _ in 0..runs {
            let t = Instant::now();
            let m = check(spec, base, None).expect("the spec checks");
            let recheck = |o: &[String], micro_batch: u64| {
                let mut all = base.clone();
                all.extend(o.iter().cloned());
                check(spec, &all, Some(micro_batch))
            };
            let found = search::search(&m, world, dev, recheck).expect("search");
            times.push(t.elapsed());
            (considered, fit) = (found.considered, found.candidates.len());
        }
        times.sort();
        let s = |d: Duration| format!("{:.3} s", d.as_secs_f64());
        println!(
            "{:<32} {:>6} {:<10} {:>10} {:>6} {:>10} {:>10}",
            spec,
            world,
            dev.name,
            considered,
            fit,
            s(times[runs / 2]),
            s(times[0])
        );
    }
}
