//! How long checking the largest library specs takes (target: under 50 ms),
//! and how checking and formatting scale with a spec's length (linear: the
//! time per line stays flat from 10⁴ to 10⁶ lines).
//!
//! `cargo bench -p tessera-compiler --bench check` prints the median and the
//! fastest of repeated runs per spec. Parsing, `use` loading, shape checking,
//! layout validation and the per-rank memory report are all included.

use std::path::Path;
use std::time::{Duration, Instant};
use tessera_compiler::{Options, SourceMap, check_path, check_text, cost::memory};

/// A spec of `n` dims and `n` statements (2n + 5 lines).
fn long_spec(n: usize) -> String {
    let mut text = String::from("model m {\n  dims {\n");
    for i in 0..n {
        text.push_str(&format!("    d{i} = {}\n", i + 1));
    }
    text.push_str("  }\n  input x: f32[batch, d = 4]\n  y0 = x\n");
    for i in 0..n {
        text.push_str(&format!("  y{} = y{i} * 2\n", i + 1));
    }
    text.push_str("}\n");
    text
}

fn scaling() {
    println!("\n{:<12} {:>12} {:>14} {:>12} {:>14}", "lines", "check", "per line", "fmt", "per line");
    for n in [5_000usize, 50_000, 500_000] {
        let text = long_spec(n);
        let lines = text.lines().count();
        let t = Instant::now();
        let mut sources = SourceMap::new();
        check_text(&mut sources, "long.spec", &text, Path::new("."), &Options::default()).expect("checks");
        let check = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let ast =
            tessera_compiler::syntax::parse_file(tessera_compiler::syntax::span::FileId(0), &text).expect("parses");
        let _ = tessera_compiler::syntax::print_file(&ast, &text);
        let fmt = t.elapsed().as_secs_f64();
        let per = |s: f64| format!("{:.2} µs", s * 1e6 / lines as f64);
        println!("{:<12} {:>10.2} s {:>14} {:>10.2} s {:>14}", lines, check, per(check), fmt, per(fmt));
    }
}

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
    scaling();
}
