//! The backend boundary: what executes a lowered program
//! (`compiler::lower::Program`).
//!
//! A [`Backend`] owns a rank's memory (one allocation per region of the
//! program) and runs instructions on it: an IR op (a kernel), attention's
//! multi-output backward, the elementwise helpers of the step (accumulate,
//! scale, copy, zero, shards, norms), collectives and point-to-point
//! messages on a stream, and events between streams. [`run`] is the one
//! loop that walks a program and hands each instruction to its backend,
//! with the rank's communicator and the step's seed; the guard
//! (`skip_if_nonfinite`) is decided here, by reading the norm back.
//!
//! The CPU backend ([`cpu::Cpu`]) runs ops with the interpreter's kernels
//! (the `gemm` crate, the flash-style attention, the MoE kernels) on the
//! arena's bytes; both of its streams are program order.

pub mod cpu;
pub mod cuda;
pub mod cuda_kernels;
pub mod interp;
pub mod jit;
pub mod native;
pub mod nvrtc;
pub mod rows;

use crate::comm::RankComm;
use tessera_compiler::lower::{Buffer, Instr, Kind, Program};

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("rank {rank}, instruction {at} (`{name}`): {message}")]
pub struct BackendError {
    pub rank: u64,
    pub at: usize,
    pub name: &'static str,
    pub message: String,
}

/// Executes the instructions of one rank's lowered program.
pub trait Backend {
    /// Allocate the program's regions (bytes per region, in `Region::ALL` order), zeroed.
    fn alloc(&mut self, sizes: [u64; tessera_compiler::lower::Region::COUNT]) -> Result<(), String>;
    /// Get ready to run program `p` (compile its kernels), before its first run.
    fn prepare(&mut self, _p: &Program) -> Result<(), String> {
        Ok(())
    }
    /// Write a buffer's elements (f32; token ids as their values).
    fn upload(&mut self, buf: &Buffer, data: &[f32]) -> Result<(), String>;
    /// Read a buffer's elements.
    fn download(&self, buf: &Buffer) -> Result<Vec<f32>, String>;
    /// Whether every element of a buffer is finite (the update's guard, and
    /// the check of the weights after it), without copying it out.
    fn finite(&self, buf: &Buffer) -> Result<bool, String> {
        Ok(self.download(buf)?.iter().all(|x| x.is_finite()))
    }
    /// Run one instruction that is not a guard. `seed` is the step's random seed.
    fn execute<'c>(
        &mut self,
        p: &Program,
        ins: &Instr,
        comm: Option<&'c RankComm<'c>>,
        seed: u64,
    ) -> Result<(), String>;
}

/// What a run of a program reports.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RunReport {
    /// Whether the guarded update ran (the norm was finite).
    pub updated: bool,
}

/// Run program `p` on `backend`: every instruction in order, the guard decided by the norm.
pub fn run<'c>(
    backend: &mut impl Backend,
    p: &Program,
    comm: Option<&'c RankComm<'c>>,
    seed: u64,
) -> Result<RunReport, BackendError> {
    let mut at = 0;
    let mut updated = true;
    // When tracing: the phase open now (its name, its start) and the next phase's index.
    let tracing = comm.filter(|c| c.trace.is_some());
    let mut phase: Option<(&str, std::time::Instant)> = None;
    let mut next_phase = 0;
    let mut profile = std::env::var_os("TESSERA_PROFILE").map(|_| std::collections::BTreeMap::new());
    while at < p.instrs.len() {
        if let Some(c) = tracing
            && let Some(ph) = p.phases.get(next_phase).filter(|ph| ph.at as usize == at)
        {
            if let Some((name, t0)) = phase.take() {
                c.record("compute", name, t0);
            }
            phase = Some((&ph.name, std::time::Instant::now()));
            next_phase += 1;
        }
        let t0 = profile.is_some().then(std::time::Instant::now);
        let ins = &p.instrs[at];
        let fail = |message: String| BackendError { rank: p.rank, at, name: ins.kind.name(), message };
        if let Kind::SkipIfNonFinite { count } = ins.kind {
            if !backend.finite(p.buffer(ins.ins[0])).map_err(fail)? {
                updated = false;
                at += count as usize;
            }
        } else {
            backend.execute(p, ins, comm, seed).map_err(fail)?;
        }
        if let (Some(t), Some(t0)) = (profile.as_mut(), t0) {
            let e: &mut (f64, usize) = t.entry(profile_key(ins)).or_default();
            e.0 += t0.elapsed().as_secs_f64();
            e.1 += 1;
        }
        at += 1;
    }
    if let (Some(c), Some((name, t0))) = (tracing, phase) {
        c.record("compute", name, t0);
    }
    if let Some(t) = profile {
        let mut rows: Vec<_> = t.into_iter().collect();
        rows.sort_by(|a, b| b.1.0.total_cmp(&a.1.0));
        for (name, (t, n)) in rows {
            eprintln!("profile rank {} {name:<24} {:>9.2} ms  {n:>5} instructions", p.rank, t * 1e3);
        }
    }
    Ok(RunReport { updated })
}

/// The profile's row of an instruction: its kind, or its op's name.
fn profile_key(ins: &Instr) -> String {
    match &ins.kind {
        Kind::Op { op, .. } => op.name().to_string(),
        Kind::AttentionGrads { .. } => "attention_grads".into(),
        Kind::Kernel { kernel } => format!("kernel[{}]", kernel.ops.join(",")),
        k => k.name().to_string(),
    }
}
