//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use tessera::compiler::{Diags, Model, Options, SourceMap};

/// Every `.spec` file under `dir`, sorted.
pub fn specs_under(dir: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::from(dir)];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("read {}: {e}", d.display())) {
            let p = e.expect("dir entry").path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "spec") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

pub fn check(path: &Path, overrides: &[&str]) -> (SourceMap, Result<Model, Diags>) {
    let mut sources = SourceMap::new();
    let opts = Options { overrides: overrides.iter().map(|s| s.to_string()).collect(), model: None, micro_batch: None };
    // As `tessera check` does: the spec, then whether every rank fits its `train.device`.
    let r = tessera::compiler::check_path(&mut sources, path, &opts)
        .and_then(|m| tessera::compiler::driver::check_memory(&m).map(|()| m).map_err(Into::into));
    (sources, r)
}

pub fn check_ok(path: &str, overrides: &[&str]) -> Model {
    let (sources, r) = check(Path::new(path), overrides);
    r.unwrap_or_else(|d| panic!("{path} should check:\n{}", tessera::compiler::diag::render(&sources, &d.0)))
}

/// Specs and layouts the compiler and runtime tests share.
pub const GPT: &str = "specs/tiny/gpt.spec";
pub const MOE: &str = "specs/tiny/moe.spec";
pub const DP2: &[&str] = &["parallel.mesh.data=2", "parallel.layout.batch=data"];
pub const TP2: &[&str] = &["parallel.mesh.tensor=2", "parallel.layout.heads=tensor", "parallel.layout.mlp=tensor"];
pub const PP2: &[&str] =
    &["parallel.mesh.pipeline=2", "parallel.layout.layer=pipeline", "parallel.pipeline.microbatches=4"];
/// GPT-2 (`specs/models/gpt2-small.spec`: dropout, bf16 as it ships) cut to a test's size.
pub const GPT2: &str = "specs/models/gpt2-small.spec";
pub const GPT2_TINY: &[&str] =
    &["dims.layers=1", "dims.seq=16", "dims.embed=32", "dims.heads=2", "train.batch=4", "train.micro_batch=2"];

/// Two override lists, one after the other.
pub fn with(a: &[&'static str], b: &[&'static str]) -> Vec<&'static str> {
    a.iter().chain(b).copied().collect()
}

/// A trainer for `m`: the driver's passes (`compile_training`, no memory
/// check), then the runtime's `Trainer`.
pub fn trainer(m: &Model, cfg: tessera::runtime::train::RunConfig) -> Result<tessera::runtime::train::Trainer, String> {
    let training = tessera::compiler::driver::compile_training(m, None).map_err(|e| e.to_string())?;
    tessera::runtime::train::Trainer::new(training, cfg).map_err(|e| e.to_string())
}

/// ‖a − b‖ / ‖b‖, in f64.
pub fn rel(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum::<f64>().sqrt();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum::<f64>().sqrt();
    num / den.max(1e-30)
}

/// Whether weight element `i` of `g`'s tensor has a gradient that is zero in
/// exact arithmetic: the attention key bias is one (softmax ignores a shift
/// shared by all keys), and AdamW turns such a gradient's rounding noise,
/// which depends on summation order, into updates of full size, so no two
/// summation orders agree on it. Measured as below 1e-6 of the tensor's
/// largest gradient. The layout equivalence tests leave such weights out.
pub fn zero_gradient(g: &[f32], i: usize) -> bool {
    let top = g.iter().fold(0f32, |a, b| a.max(b.abs()));
    g[i].abs() <= 1e-6 * top
}

/// A process's output, as text.
pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A TCP port free on the loopback now (for a store or a launch's master).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap().local_addr().unwrap().port()
}

/// The children of process `parent`, with their `RANK` variable.
pub fn children_of(parent: u32) -> Vec<(u32, Option<String>)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        // `pid (comm) state ppid ...`; comm may hold spaces, so split after its `)`.
        let ppid = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
        if ppid != Some(parent) {
            continue;
        }
        let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        let rank = env.split(|&b| b == 0).find_map(|v| v.strip_prefix(b"RANK=").map(text));
        out.push((pid, rank));
    }
    out
}

/// Deterministic tokens below `vocab`.
pub fn tokens(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut z = seed;
    (0..n)
        .map(|_| {
            z = z.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((z >> 33) % vocab as u64) as u32
        })
        .collect()
}
