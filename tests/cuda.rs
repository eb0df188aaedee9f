//! Every fused kernel of the shipped specs, as CUDA C, compiles with NVRTC
//! for sm_80 and sm_90 (no GPU needed). The test command installs NVRTC
//! (`tools/test`); without it the test fails and says how to get it.

mod common;

use tessera::compiler::kernel::cuda;
use tessera::compiler::lower::{Kind, Program};
use tessera::runtime::backend::nvrtc;

/// The specs whose kernels are checked: the four tiny specs, the demo,
/// GPT-2 small and the bench specs, as they ship.
const SPECS: &[&str] = &[
    "specs/tiny/gpt.spec",
    "specs/tiny/moe.spec",
    "specs/tiny/bert.spec",
    "specs/tiny/vit.spec",
    "specs/tiny/shakespeare.spec",
    "specs/models/gpt2-small.spec",
    "specs/bench/tiny.spec",
    "specs/bench/moe-tiny.spec",
    "specs/bench/small.spec",
];

const ARCHS: &[&str] = &["sm_80", "sm_90"];

/// Each distinct fused kernel of `programs`: its CUDA C (every one named
/// `k`: each compiles alone), and where it comes from (the spec, the
/// instruction's text, its ops).
fn kernels(spec: &str, programs: &[&Program]) -> Vec<(cuda::CudaKernel, String)> {
    let mut out: Vec<(cuda::CudaKernel, String)> = Vec::new();
    for p in programs {
        for ins in &p.instrs {
            let Kind::Kernel { kernel } = &ins.kind else { continue };
            let dtypes: Vec<_> = ins.ins.iter().chain(&ins.outs).map(|b| p.buffer(*b).ty.dtype).collect();
            let k = cuda::emit(kernel, &dtypes, "k").unwrap_or_else(|e| panic!("{spec}: {e}"));
            if !out.iter().any(|(o, _)| o.source == k.source) {
                out.push((k, format!("{spec}: {}", tessera::compiler::lower::text::instr_text(ins))));
            }
        }
    }
    out
}

#[test]
fn every_kernel_compiles_for_sm80_and_sm90() {
    if let Err(e) = nvrtc::available() {
        panic!("{e}\n(`tools/test` installs it and runs the tests)");
    }
    let (major, minor) = nvrtc::version().expect("NVRTC's version");
    let mut count = 0;
    for spec in SPECS {
        let m = common::check_ok(spec, &[]);
        let t = tessera::compiler::driver::compile_training(&m, None).unwrap_or_else(|e| panic!("{spec}: {e}"));
        let mut programs: Vec<&Program> = t.step.programs.iter().collect();
        programs.push(&t.eval);
        let ks = kernels(spec, &programs);
        assert!(!ks.is_empty(), "{spec}: no fused kernels");
        for (k, from) in &ks {
            for arch in ARCHS {
                let cubin = nvrtc::compile(&k.source, &k.name, arch)
                    .unwrap_or_else(|e| panic!("{e}\nthe kernel comes from {from}\n--- CUDA C ---\n{}", k.source));
                assert!(cubin.len() > 64, "{from}: an empty cubin for {arch}");
            }
        }
        count += ks.len();
    }
    eprintln!("NVRTC {major}.{minor}: {count} distinct kernels compiled for {ARCHS:?}");
}

/// A broken kernel fails with NVRTC's log.
#[test]
fn a_broken_kernel_fails_with_the_nvrtc_log() {
    if let Err(e) = nvrtc::available() {
        panic!("{e}");
    }
    let e = nvrtc::compile("extern \"C\" __global__ void k(float* a) { a[0] = undefined_name; }", "k", "sm_80")
        .expect_err("an undefined name");
    assert!(e.contains("undefined_name") && e.contains("sm_80"), "{e}");
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
