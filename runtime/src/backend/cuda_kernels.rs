//! Every fused kernel of a program, run on a GPU and compared with the CPU
//! backend's on the same random inputs (issue 13 point 8): the generated
//! CUDA C (`compiler::kernel::cuda`), compiled by NVRTC for the GPU's
//! architecture (cached on disk), loaded by the driver and launched with the
//! emitter's conventions; the CPU side is the CPU backend's own kernel (the
//! JIT) on the same values.
//!
//! Tolerance: the GPU computes each value in f32 as the CPU does, but sums a
//! row as a tree over the block where the CPU sums eight lanes, and its
//! `expf`, `logf`, `tanhf` differ from the CPU's in the last bits. So an
//! element agrees when |gpu − cpu| ≤ 1e-5 · (1 + max |cpu| of the output),
//! or, for a 16-bit output, within one unit in the last place of its dtype
//! (a value on a rounding boundary may round either way).

use super::Backend as _;
use super::cpu::Cpu;
use super::nvrtc;
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, LaunchConfig, PushKernelArg};
use std::sync::Arc;
use tessera_compiler::ir::{DType, TensorType};
use tessera_compiler::kernel::cuda;
use tessera_compiler::lower::{Buffer, Instr, Kind, Program, Region};

/// One GPU with a stream, for running single kernels.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    /// `sm_90` for an H100 or H200.
    pub arch: String,
    pub name: String,
}

impl Gpu {
    /// GPU `ordinal` (the process's `LOCAL_RANK` under a launcher), or why
    /// there is none.
    pub fn open(ordinal: usize) -> Result<Gpu, String> {
        let all = super::cuda::gpus()?;
        let g = all.get(ordinal).ok_or_else(|| {
            format!("there is no GPU {ordinal}: the driver found {} (check CUDA_VISIBLE_DEVICES)", all.len())
        })?;
        let ctx = CudaContext::new(ordinal).map_err(|e| format!("GPU {ordinal}: cannot create a context: {e:?}"))?;
        let stream = ctx.default_stream();
        Ok(Gpu { ctx, stream, arch: format!("sm_{}{}", g.capability.0, g.capability.1), name: g.name.clone() })
    }
}

/// How one kernel compared.
#[derive(Debug, Clone, serde::Serialize)]
pub struct KernelCheck {
    /// The instruction, as the lowered program's text prints it.
    pub instr: String,
    pub ops: Vec<String>,
    pub positions: u64,
    /// The largest |gpu − cpu| over its outputs, and what it was allowed.
    pub max_error: f64,
    pub tolerance: f64,
    pub ok: bool,
}

/// Elements of a buffer as the device stores them (the CPU backend's encoding).
fn bytes_of(values: &[f32], dtype: DType) -> Vec<u8> {
    let mut b = vec![0u8; values.len() * dtype.bytes() as usize];
    super::cpu::encode(dtype, values, &mut b);
    b
}

fn values_of(bytes: &[u8], dtype: DType) -> Vec<f32> {
    let mut v = vec![0f32; bytes.len() / dtype.bytes() as usize];
    super::cpu::decode(dtype, bytes, &mut v);
    v
}

/// One unit in the last place of `dtype` at magnitude `x`.
fn ulp(x: f32, dtype: DType) -> f64 {
    let bits = match dtype {
        DType::Bf16 => 8,
        DType::F16 => 11,
        _ => return 0.0,
    };
    let e = (x.abs().max(f32::MIN_POSITIVE) as f64).log2().floor();
    2f64.powf(e - (bits as f64 - 1.0))
}

/// Deterministic values in [-2, 2), or in [0.25, 2.25) where `positive`
/// (an optimizer's second moments and step sizes), or whole numbers below
/// `int_below` (class ids, row bounds).
fn random(n: u64, salt: u64, int_below: Option<u64>, positive: bool) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let mut z = (i ^ (salt << 32)).wrapping_mul(0x9E3779B97F4A7C15);
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
            z ^= z >> 31;
            match int_below {
                Some(m) => (z % m.max(1)) as f32,
                None if positive => (z >> 40) as f32 / (1u64 << 24) as f32 * 2.0 + 0.25,
                None => (z >> 40) as f32 / (1u64 << 24) as f32 * 4.0 - 2.0,
            }
        })
        .collect()
}

/// Every distinct fused kernel of `programs`, run on `gpu` and on the CPU
/// backend with the same inputs, compared. `cache` is NVRTC's disk cache.
pub fn compare(gpu: &Gpu, programs: &[&Program], cache: &std::path::Path) -> Result<Vec<KernelCheck>, String> {
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for p in programs {
        for ins in &p.instrs {
            let Kind::Kernel { kernel } = &ins.kind else { continue };
            let dtypes: Vec<DType> = ins.ins.iter().chain(&ins.outs).map(|b| p.buffer(*b).ty.dtype).collect();
            let k = cuda::emit(kernel, &dtypes, "k")?;
            if !seen.insert(k.source.clone()) {
                continue;
            }
            out.push(compare_one(gpu, p, ins, &k, cache)?);
        }
    }
    Ok(out)
}

/// Kernel instruction `ins` of `p` alone: a program over fresh buffers of
/// its arguments' types (an argument read and written in place is one
/// buffer, as in the program), its inputs (class ids below the row's size,
/// row bounds up to the rows' extent, other values in [-2, 2), positive
/// for the optimizer, all rounded to their dtypes), and each argument's
/// buffer in it.
struct Alone {
    program: Program,
    inputs: Vec<Vec<f32>>,
    args: Vec<usize>,
    outs: Vec<usize>,
}

fn alone(p: &Program, ins: &Instr) -> Result<Alone, String> {
    let Kind::Kernel { kernel } = &ins.kind else { return Err("not a kernel".into()) };
    let all: Vec<_> = ins.ins.iter().chain(&ins.outs).copied().collect();
    let mut distinct: Vec<tessera_compiler::lower::BufId> = Vec::new();
    for a in &all {
        if !distinct.contains(a) {
            distinct.push(*a);
        }
    }
    let mut buffers = Vec::new();
    let mut offset = 0u64;
    for b in &distinct {
        let ty: TensorType = p.buffer(*b).ty.clone();
        let bytes = ty.bytes();
        buffers.push(Buffer { ty, region: Region::Arena, offset, view_of: None, name: String::new() });
        offset += bytes.div_ceil(64) * 64;
    }
    let local = |b: &tessera_compiler::lower::BufId| distinct.iter().position(|x| x == b).expect("listed");
    let id = |b: &tessera_compiler::lower::BufId| tessera_compiler::lower::BufId(local(b) as u32);
    let one =
        Instr::new(ins.kind.clone(), ins.ins.iter().map(id).collect(), ins.outs.iter().map(id).collect(), ins.stream);
    let mut sizes = [0u64; Region::COUNT];
    sizes[Region::Arena.index()] = offset.max(64);
    let program = Program { rank: 0, coords: vec![], sizes, buffers, instrs: vec![one], phases: vec![] };
    let row = kernel.dims.last().map_or(1, |d| d.size);
    let bound_extent = kernel.dims.get(1).map_or(1, |d| d.size + 1);
    let bound = kernel.rows.map(|r| local(&ins.ins[r]));
    let positive = kernel.ops.iter().any(|o| o.starts_with("adam"));
    let inputs = program
        .buffers
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let int = (b.ty.dtype == DType::I32).then_some(if bound == Some(i) { bound_extent } else { row });
            let v = random(b.ty.numel(), i as u64 + 1, int, positive);
            values_of(&bytes_of(&v, b.ty.dtype), b.ty.dtype)
        })
        .collect();
    Ok(Alone { program, inputs, args: all.iter().map(local).collect(), outs: ins.outs.iter().map(local).collect() })
}

/// The CPU backend's outputs of a kernel alone (its own JIT kernel).
fn on_cpu(a: &Alone, seed: u64) -> Result<Vec<Vec<f32>>, String> {
    let mut cpu = Cpu::new();
    cpu.alloc(a.program.sizes)?;
    cpu.prepare(&a.program)?;
    for (b, v) in a.program.buffers.iter().zip(&a.inputs) {
        cpu.upload(b, v)?;
    }
    cpu.execute(&a.program, &a.program.instrs[0], None, seed)?;
    a.outs.iter().map(|&o| cpu.download(&a.program.buffers[o])).collect()
}

fn compare_one(
    gpu: &Gpu,
    p: &Program,
    ins: &Instr,
    k: &cuda::CudaKernel,
    cache: &std::path::Path,
) -> Result<KernelCheck, String> {
    let Kind::Kernel { kernel } = &ins.kind else { return Err("not a kernel".into()) };
    let text = tessera_compiler::lower::text::instr_text(ins);
    let a = alone(p, ins)?;
    let seed = 0x5eed_u64;
    let want_all = on_cpu(&a, seed)?;
    let row = kernel.dims.last().map_or(1, |d| d.size);
    // The GPU.
    let cubin = nvrtc::compile_cached(&k.source, &k.name, &gpu.arch, cache)?.0;
    let module = gpu
        .ctx
        .load_module(cudarc::nvrtc::Ptx::from_binary(cubin))
        .map_err(|e| format!("{text}: the driver cannot load the cubin: {e:?}"))?;
    let f = module.load_function(&k.name).map_err(|e| format!("{text}: {e:?}"))?;
    let mut dev: Vec<CudaSlice<u8>> = Vec::new();
    for (b, v) in a.program.buffers.iter().zip(&a.inputs) {
        dev.push(gpu.stream.clone_htod(&bytes_of(v, b.ty.dtype)).map_err(|e| format!("{text}: {e:?}"))?);
    }
    let total = kernel.dims.iter().map(|d| d.size).product::<u64>().max(1);
    let cfg = if k.rows {
        let rows = total / row.max(1);
        LaunchConfig {
            grid_dim: (rows.clamp(1, 65535) as u32, 1, 1),
            block_dim: (cuda::THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    } else {
        LaunchConfig {
            grid_dim: (total.div_ceil(256).clamp(1, 65535) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        }
    };
    {
        let mut launch = gpu.stream.launch_builder(&f);
        for &i in &a.args {
            launch.arg(&dev[i]);
        }
        launch.arg(&seed);
        // SAFETY: the arguments are the kernel's, in its order, each a device
        // buffer of its argument's type and size, then the u64 seed.
        unsafe { launch.launch(cfg) }.map_err(|e| format!("{text}: the launch failed: {e:?}"))?;
    }
    gpu.stream.synchronize().map_err(|e| format!("{text}: {e:?}"))?;
    // Compare every output.
    let (mut max_error, mut tolerance, mut ok) = (0f64, 0f64, true);
    for (&o, want) in a.outs.iter().zip(&want_all) {
        let b = &a.program.buffers[o];
        let got = values_of(&gpu.stream.clone_dtoh(&dev[o]).map_err(|e| format!("{e:?}"))?, b.ty.dtype);
        let scale = want.iter().fold(0f64, |m, x| m.max((*x as f64).abs()));
        let base = 1e-5 * (1.0 + scale);
        for (w, g) in want.iter().zip(&got) {
            let allowed = base.max(ulp(*w, b.ty.dtype));
            let err = if (w.is_nan() && g.is_nan()) || w == g { 0.0 } else { (*w as f64 - *g as f64).abs() };
            // (A NaN error, one side NaN, is outside any tolerance.)
            if err.is_nan() || err > allowed {
                ok = false;
            }
            if err > max_error || err.is_nan() {
                max_error = err;
                tolerance = allowed;
            }
        }
        if tolerance == 0.0 {
            tolerance = base;
        }
    }
    Ok(KernelCheck { instr: text, ops: kernel.ops.clone(), positions: total, max_error, tolerance, ok })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_bytes_round_trip_every_dtype() {
        let v = [0.5f32, -1.25, 3.0, 1e-3];
        for d in [DType::F32, DType::Bf16, DType::F16] {
            let back = values_of(&bytes_of(&v, d), d);
            for (x, y) in v.iter().zip(&back) {
                assert!((x - y).abs() <= ulp(*x, d) as f32 + 1e-9, "{d:?}: {x} → {y}");
            }
        }
        assert_eq!(values_of(&bytes_of(&[3.0, 7.0], DType::I32), DType::I32), vec![3.0, 7.0]);
        assert_eq!(ulp(1.0, DType::Bf16), 2f64.powi(-7));
        assert_eq!(ulp(1.0, DType::F16), 2f64.powi(-10));
    }

    /// Each kernel of the tiny GPT (step and evaluation), taken alone as the
    /// GPU check takes it, runs on the CPU backend over its random inputs:
    /// every argument has its buffer (an in-place one stays one buffer) and
    /// every output comes back finite.
    #[test]
    fn kernels_alone_run_on_the_cpu() {
        let mut sources = tessera_compiler::SourceMap::new();
        let m = tessera_compiler::check_path(
            &mut sources,
            std::path::Path::new("../specs/tiny/gpt.spec"),
            &Default::default(),
        )
        .expect("checks");
        let t = tessera_compiler::driver::compile_training(&m, None).expect("compiles");
        let mut n = 0;
        for ins in t.step.programs[0].instrs.iter().chain(&t.eval.instrs) {
            let Kind::Kernel { .. } = &ins.kind else { continue };
            let p = if t.step.programs[0].instrs.iter().any(|i| std::ptr::eq(i, ins)) {
                &t.step.programs[0]
            } else {
                &t.eval
            };
            let a = alone(p, ins).expect("alone");
            assert_eq!(a.args.len(), ins.ins.len() + ins.outs.len());
            for (i, x) in ins.ins.iter().enumerate() {
                if let Some(j) = ins.outs.iter().position(|o| o == x) {
                    assert_eq!(a.args[i], a.outs[j], "an in-place argument is one buffer");
                }
            }
            for out in on_cpu(&a, 1).expect("runs") {
                assert!(out.iter().all(|x| x.is_finite()), "{}", tessera_compiler::lower::text::instr_text(ins));
            }
            n += 1;
        }
        assert!(n > 10, "{n} kernels");
    }
}
