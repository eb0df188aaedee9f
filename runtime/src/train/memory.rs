//! Will a training run fit this machine? Checked before anything is
//! compiled or allocated: the simulated ranks are threads of one process, so
//! their memory adds up. The CPU stores weights and activations in the
//! spec's precision (f32 or bf16) and computes in f32.

use tessera_compiler::Model;
use tessera_compiler::config::Optimizer;
use tessera_compiler::cost::memory;

/// What the process itself takes: the binary, the checked model and its
/// graphs, one thread (peak RSS of a 2-step run of the tiny GPT: 64 MB).
const PROCESS_BYTES: u128 = 64 << 20;
/// What each rank takes beyond its regions: its lowered program, its
/// thread and the allocator's per-thread heap. Measured: peak RSS of the
/// tiny GPT (120K parameters) on 64 and 256 data-parallel ranks grows by
/// 24 MB per rank, of which its regions are 4 MB (docs/reliability.md).
const RANK_BYTES: u128 = 20 << 20;

/// Bytes a CPU training run of `m` needs, all ranks together: per rank the
/// regions of its lowered program (weights in the spec's precision, with
/// f32 master weights when that is narrower; f32 gradients and optimizer
/// state; the activation arena as the cost model estimates it) and the
/// arena again in f32 for the operands the CPU backend's library calls copy
/// out of it and the f32 shadows of bf16 operands (norms, gathers,
/// cross-entropy, routing; measured at 0.5–1.0× the f32 arena); the logical
/// weights and optimizer state that checkpoints and evaluation assemble;
/// and the runtime's own overhead, per process and per rank.
pub fn cpu_training_bytes(m: &Model) -> u128 {
    let opt_per_elem: u128 = match m.train.as_ref().map(|t| &t.optimizer) {
        Some(Optimizer::Sgd { .. }) => 1,
        _ => 2,
    };
    let spec_bytes = m.train.as_ref().map(|t| t.precision.bytes()).unwrap_or(4).max(1) as u128;
    let mem = memory::memory_per_rank(m);
    let held = memory::params_per_rank(m);
    let rank = |i: usize| -> u128 {
        let p = held.get(i).copied().unwrap_or(0) as u128;
        let acts = mem.get(i).map(|r| r.activations).unwrap_or(0) as u128;
        let master = if spec_bytes < 4 { 4 } else { 0 };
        // weights (and master weights), gradients, optimizer state; the arena and the f32 copies out of it
        p * (spec_bytes + master + 4 + 4 * opt_per_elem) + acts + acts * 4 / spec_bytes + RANK_BYTES
    };
    let logical: u128 = m.params.iter().map(|p| p.ty.numel() as u128).sum::<u128>() * 4 * (1 + opt_per_elem);
    PROCESS_BYTES + logical + (0..mem.len().max(1)).map(rank).sum::<u128>()
}

/// Memory the system can give this process now (`MemAvailable`), if known.
pub fn available_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib.saturating_mul(1024))
}

/// This process's peak resident memory so far (`VmHWM`), if known.
pub fn peak_rss_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = text.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib.saturating_mul(1024))
}

fn gb(b: u128) -> String {
    format!("{:.2} GB", b as f64 / 1e9)
}

/// An error that says what the run needs and what the machine has, when
/// training `m` on this CPU would not fit.
pub fn check_fits(m: &Model) -> Result<(), String> {
    let Some(avail) = available_bytes() else { return Ok(()) };
    let need = cpu_training_bytes(m);
    if need <= avail as u128 {
        return Ok(());
    }
    let ranks = m.parallel.world();
    let how = if ranks > 1 {
        format!("{ranks} simulated ranks in this one process, together")
    } else {
        "weights, gradients, optimizer state and activations".to_string()
    };
    Err(format!(
        "training `{}` on this CPU needs about {} ({how}), but only {} of memory is available\n  help: shrink \
         the model or the batch, or use fewer simulated ranks (`--set parallel.mesh.AXIS=1`); `tessera plan` \
         sizes runs for GPU clusters",
        m.name,
        gb(need),
        gb(avail as u128)
    ))
}
