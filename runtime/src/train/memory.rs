//! Will a training run fit this machine? Checked before anything is
//! allocated: the simulated ranks are threads of one process, so their
//! memory adds up, and the CPU trains in f32 whatever the spec's precision.

use tessera_compiler::Model;
use tessera_compiler::config::Optimizer;
use tessera_compiler::cost::memory;

/// What the process itself takes: the binary, the checked model and its
/// graphs, one thread (peak RSS of a 2-step run of the tiny GPT: 64 MB).
const PROCESS_BYTES: u128 = 64 << 20;
/// What each simulated rank takes beyond its tensors: its program, its
/// interpreter's bookkeeping, its thread and the allocator's per-thread
/// heap. Measured: peak RSS of the tiny GPT (120K parameters) on 16, 64 and
/// 256 data-parallel ranks grows by 20 MB per rank, of which its tensors are
/// 3.4 MB (docs/reliability.md).
const RANK_BYTES: u128 = 16 << 20;

/// Bytes a CPU training run of `m` needs, all ranks together: per rank its
/// weights, gradients, optimizer state and activations in f32; the trainer's
/// logical copy of the weights and optimizer state when there are several
/// ranks; on one device, a gradient and activation set per concurrent
/// microbatch; and the runtime's own overhead, per process and per rank.
pub fn cpu_training_bytes(m: &Model) -> u128 {
    let opt_per_elem: u128 = match m.train.as_ref().map(|t| &t.optimizer) {
        Some(Optimizer::Sgd { .. }) => 1,
        _ => 2,
    };
    let spec_bytes = m.train.as_ref().map(|t| t.precision.bytes()).unwrap_or(4).max(1) as u128;
    let mem = memory::memory_per_rank(m);
    let held = memory::params_per_rank(m);
    let per_rank = |i: usize| -> (u128, u128) {
        let p = held.get(i).copied().unwrap_or(0) as u128;
        let acts = mem.get(i).map(|r| r.activations).unwrap_or(0) as u128 * 4 / spec_bytes;
        // weights, optimizer state; then what each microbatch adds: gradients, activations
        (4 * p * (1 + opt_per_elem), 4 * p + acts)
    };
    let logical: u128 = m.params.iter().map(|p| p.ty.numel() as u128).sum::<u128>() * 4 * (1 + opt_per_elem);
    if mem.len() <= 1 {
        let (fixed, each) = per_rank(0);
        let train = m.train.as_ref();
        let micro = train.map(|t| (t.batch / m.micro_batch.max(1)).max(1)).unwrap_or(1) as u128;
        let workers = (crate::exec::threads() as u128).clamp(1, micro);
        return PROCESS_BYTES + fixed + each * workers;
    }
    let ranks: u128 = (0..mem.len())
        .map(|i| {
            let (fixed, each) = per_rank(i);
            fixed + each + RANK_BYTES
        })
        .sum();
    PROCESS_BYTES + logical + ranks
}

/// Memory the system can give this process now (`MemAvailable`), if known.
pub fn available_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
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
        "weights, gradients, optimizer state and activations in f32".to_string()
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
