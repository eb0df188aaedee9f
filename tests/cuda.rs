//! Every fused kernel of the shipped specs, as CUDA C, compiles with NVRTC
//! for sm_80 and sm_90 (no GPU needed). The test command installs NVRTC
//! (`tools/test`); without it the test fails and says how to get it.

mod common;

use tessera::compiler::SourceMap;
use tessera::compiler::kernel::cuda;
use tessera::compiler::lower::{Instr, Kind, Program};
use tessera::runtime::backend::nvrtc;

/// The specs whose kernels are checked: the four tiny specs, the demo,
/// GPT-2 small and the bench specs, as they ship.
const SPECS: &[&str] = &[
    "specs/tiny/gpt.spec",
    "specs/tiny/moe.spec",
    "specs/tiny/bert.spec",
    "specs/tiny/vit.spec",
    "specs/tiny/clip.spec",
    "specs/tiny/digits-cnn.spec",
    "specs/tiny/igpt.spec",
    "specs/tiny/shakespeare.spec",
    "specs/models/gpt2-small.spec",
    "tests/fixtures/hf/llama-tiny.spec",
    "specs/bench/tiny.spec",
    "specs/bench/moe-tiny.spec",
    "specs/bench/small.spec",
];

const ARCHS: &[&str] = &["sm_80", "sm_90"];

/// Each distinct fused kernel of `programs`: its CUDA C (every one named
/// `k`: each compiles alone), and where it comes from (the spec lines of its
/// ops, and the instruction's text).
fn kernels(spec: &str, sources: &SourceMap, programs: &[&Program]) -> Vec<(cuda::CudaKernel, String)> {
    let mut out: Vec<(cuda::CudaKernel, String)> = Vec::new();
    for p in programs {
        for ins in &p.instrs {
            let Kind::Kernel { kernel } = &ins.kind else { continue };
            let dtypes: Vec<_> = ins.ins.iter().chain(&ins.outs).map(|b| p.buffer(*b).ty.dtype).collect();
            let k = cuda::emit(kernel, &dtypes, "k").unwrap_or_else(|e| panic!("{spec}: {e}"));
            if !out.iter().any(|(o, _)| o.source == k.source) {
                out.push((k, from(spec, sources, ins)));
            }
        }
    }
    out
}

/// Where instruction `ins` of a program of `spec` comes from: the spec
/// lines of its ops, one per line, then its text.
fn from(spec: &str, sources: &SourceMap, ins: &Instr) -> String {
    let mut s = String::new();
    for span in &ins.origin {
        s.push_str(&format!("  {}\n", sources.quote(*span)));
    }
    if ins.origin.is_empty() {
        s.push_str(&format!("  {spec} (no spec line: the compiler added it)\n"));
    }
    s + &format!("  as the instruction {}", tessera::compiler::lower::text::instr_text(ins))
}

#[test]
fn every_kernel_compiles_for_sm80_and_sm90() {
    if let Err(e) = nvrtc::available() {
        panic!("{e}\n(`tools/test` installs it and runs the tests)");
    }
    let (major, minor) = nvrtc::version().expect("NVRTC's version");
    let mut count = 0;
    for spec in SPECS {
        let (sources, m) = common::check(std::path::Path::new(spec), &[]);
        let m = m.unwrap_or_else(|d| panic!("{}", tessera::compiler::diag::render(&sources, &d.0)));
        let t = tessera::compiler::driver::compile_training(&m, None).unwrap_or_else(|e| panic!("{spec}: {e}"));
        let mut programs: Vec<&Program> = t.step.programs.iter().collect();
        programs.push(&t.eval);
        let ks = kernels(spec, &sources, &programs);
        assert!(!ks.is_empty(), "{spec}: no fused kernels");
        for (k, from) in &ks {
            for arch in ARCHS {
                let cubin = compile(k, from, arch).unwrap_or_else(|e| panic!("{e}"));
                assert!(cubin.len() > 64, "{from}: an empty cubin for {arch}");
            }
        }
        count += ks.len();
    }
    eprintln!("NVRTC {major}.{minor}: {count} distinct kernels compiled for {ARCHS:?}");
}

/// Kernel `k` compiled for `arch`, or NVRTC's log with the spec lines the
/// kernel comes from (`from`) and its CUDA C.
fn compile(k: &cuda::CudaKernel, from: &str, arch: &str) -> Result<Vec<u8>, String> {
    nvrtc::compile(&k.source, &k.name, arch)
        .map_err(|e| format!("{e}\nthe kernel comes from\n{from}\n--- CUDA C ---\n{}", k.source))
}

/// A broken kernel fails with NVRTC's log and the spec lines it comes from:
/// the tiny GPT's layer_norm kernel, with an undefined name put into it.
#[test]
fn a_broken_kernel_fails_with_the_nvrtc_log_and_its_spec_lines() {
    if let Err(e) = nvrtc::available() {
        panic!("{e}");
    }
    let spec = "specs/tiny/gpt.spec";
    let (sources, m) = common::check(std::path::Path::new(spec), &[]);
    let t = tessera::compiler::driver::compile_training(&m.expect("checks"), None).expect("compiles");
    let p = &t.step.programs[0];
    let ins = p
        .instrs
        .iter()
        .find(|i| matches!(&i.kind, Kind::Kernel { kernel } if kernel.ops.iter().any(|o| o == "layer_norm")))
        .expect("a layer_norm kernel");
    let Kind::Kernel { kernel } = &ins.kind else { unreachable!() };
    let dtypes: Vec<_> = ins.ins.iter().chain(&ins.outs).map(|b| p.buffer(*b).ty.dtype).collect();
    let mut k = cuda::emit(kernel, &dtypes, "k").expect("emits");
    k.source = k.source.replacen('{', "{ undefined_name = 1;", 1);
    let e = compile(&k, &from(spec, &sources, ins), "sm_80").expect_err("an undefined name");
    eprintln!("{e}");
    assert!(e.contains("undefined_name") && e.contains("sm_80"), "NVRTC's log: {e}");
    // The line of the spec library that writes the layer_norm, quoted.
    assert!(e.contains("specs/std/") && e.contains(".spec:") && e.contains("layer_norm("), "{e}");
}

/// Compiled kernels are cached on disk by (source hash, architecture,
/// NVRTC version): the second compile of a source reads the first's cubin;
/// another architecture or another source compiles anew.
#[test]
fn compiled_kernels_are_cached_by_source_and_architecture() {
    if let Err(e) = nvrtc::available() {
        panic!("{e}");
    }
    let dir = std::env::temp_dir().join(format!("tessera-kernel-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let src = "extern \"C\" __global__ void k(float* a) { a[threadIdx.x] *= 2.0f; }";
    let (first, hit) = nvrtc::compile_cached(src, "k", "sm_80", &dir).expect("compiles");
    assert!(!hit, "a fresh cache");
    let (again, hit) = nvrtc::compile_cached(src, "k", "sm_80", &dir).expect("reads back");
    assert!(hit && again == first, "the same cubin, from the cache");
    let (_, hit) = nvrtc::compile_cached(src, "k", "sm_90", &dir).expect("compiles");
    assert!(!hit, "another architecture compiles anew");
    let (_, hit) = nvrtc::compile_cached(&src.replace("2.0f", "3.0f"), "k", "sm_80", &dir).expect("compiles");
    assert!(!hit, "an edited kernel compiles anew");
    let files: Vec<_> = std::fs::read_dir(&dir).expect("the cache").map(|e| e.expect("entry").path()).collect();
    assert_eq!(files.len(), 3, "one cubin per (source, architecture), no temporaries left: {files:?}");
    assert!(files.iter().all(|f| f.extension().is_some_and(|x| x == "cubin")));
    let _ = std::fs::remove_dir_all(&dir);
}
