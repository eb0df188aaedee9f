//! Training steps as lowered programs: every rank of the mesh runs its
//! `compiler::lower::Program` on a backend, as a thread with the in-process
//! communicator. Weights, gradients, moments and activations live in the
//! backend's regions; the host only uploads each step's batches and
//! hyperparameters and reads back the loss and the norm.
//!
//! Checkpoints hold logical tensors: [`LoweredRanks::new`] cuts them into
//! each rank's buffers (ZeRO's flat shards where the program has them) and
//! [`LoweredRanks::logical`] assembles them again.

use super::optim::OptimizerState;
use super::ranks::{TIMEOUT, cut, flat_shard, place};
use crate::backend::{self, Backend, cpu::Cpu};
use crate::comm::{Communicator, RankComm, World};
use crate::tensor::Tensor;
use std::sync::Mutex;
use tessera_compiler::Model;
use tessera_compiler::config::Optimizer;
use tessera_compiler::driver::Compiled;
use tessera_compiler::lower::{BufId, Kind, Program};
use tessera_compiler::parallel::Mesh;

/// What one rank reports after a step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoweredStep {
    /// The mean loss of the rank's microbatches (`None` on pipeline stages that compute no loss).
    pub loss: Option<f64>,
    /// The global gradient norm (after the mean over microbatches).
    pub grad_norm: f64,
    pub updated: bool,
}

/// The step's loss: the mean over the ranks that compute one (data ranks
/// see different microbatches; a pipeline's last stage holds the loss).
pub fn step_loss(reports: &[LoweredStep]) -> Option<f64> {
    let losses: Vec<f64> = reports.iter().filter_map(|r| r.loss).collect();
    (!losses.is_empty()).then(|| losses.iter().sum::<f64>() / losses.len() as f64)
}

/// The buffers of a program the host reads or writes each step.
struct Bindings {
    /// Model input `i` of microbatch `j`: `inputs[j][i]`.
    inputs: Vec<Vec<Option<BufId>>>,
    hyper: BufId,
    loss: BufId,
    norm: BufId,
    /// Whether the program accumulates a loss (a pipeline's first stages do not).
    has_loss: bool,
}

impl Bindings {
    fn of(p: &Program, micro: u64, inputs: usize) -> Result<Bindings, String> {
        let named = |name: &str| p.named(name).ok_or_else(|| format!("the program has no `{name}` buffer"));
        let loss = named("loss")?;
        Ok(Bindings {
            inputs: (0..micro).map(|j| (0..inputs).map(|i| p.named(&format!("x{i}.mb{j}"))).collect()).collect(),
            hyper: named("hyper")?,
            norm: named("norm")?,
            has_loss: p.instrs.iter().any(|i| matches!(i.kind, Kind::Accumulate) && i.outs == [loss]),
            loss,
        })
    }
}

pub struct LoweredRanks {
    pub mesh: Mesh,
    programs: Vec<Program>,
    backends: Vec<Mutex<Cpu>>,
    bindings: Vec<Bindings>,
    /// Microbatches per rank and step.
    micro: Vec<u64>,
    betas: (f64, f64),
}

impl LoweredRanks {
    /// Each rank's backend, holding its part of the logical `params` and `opt`.
    pub fn new(m: &Model, c: &Compiled, params: &[Tensor<f32>], opt: &OptimizerState) -> Result<LoweredRanks, String> {
        let mut backends = Vec::new();
        let dp = c.mesh.data_group().map(|(_, n)| n).unwrap_or(1) as usize;
        for (p, rp) in c.programs.iter().zip(&c.ranks) {
            let mut cpu = Cpu::new();
            cpu.alloc(p.sizes)?;
            let d = c.mesh.data_coord(p.rank) as usize;
            for (k, meta) in m.params.iter().enumerate() {
                let shard = &rp.params[k];
                if !shard.held {
                    continue;
                }
                // A buffer holds the rank's cut of the logical tensor, or its flat ZeRO shard of that cut.
                let mut put = |name: String, full: &Tensor<f32>, sharded: bool| -> Result<(), String> {
                    let Some(b) = p.named(&name) else { return Ok(()) };
                    let local = cut(full, shard, meta);
                    let data = if sharded { flat_shard(&local.data, dp, d) } else { local.data };
                    cpu.upload(p.buffer(b), &data)
                };
                let z = c.mesh.zero_sharded(shard);
                put(format!("w.{k}"), &params[k], z && c.mesh.zero >= 3)?;
                put(format!("m.{k}"), &opt.m[k], z)?;
                if let Some(v) = opt.v.get(k) {
                    put(format!("v.{k}"), v, z)?;
                }
            }
            backends.push(Mutex::new(cpu));
        }
        let micro: Vec<u64> = c.ranks.iter().map(|r| r.micro).collect();
        let bindings = c
            .programs
            .iter()
            .zip(&micro)
            .map(|(p, &n)| Bindings::of(p, n, m.inputs.len()))
            .collect::<Result<_, _>>()?;
        let betas = match opt.optimizer {
            Optimizer::Adamw { beta1, beta2, .. } => (beta1, beta2),
            Optimizer::Sgd { .. } => (0.0, 0.0),
        };
        Ok(LoweredRanks { mesh: c.mesh.clone(), programs: c.programs.clone(), backends, bindings, micro, betas })
    }

    /// One training step on every rank. `inputs(k)` is global microbatch `k`.
    pub fn step(
        &self,
        step: u64,
        seed: u64,
        lr: f64,
        inputs: &(dyn Fn(u64) -> Vec<Tensor<f32>> + Sync),
    ) -> Result<Vec<LoweredStep>, String> {
        let world = World::new(self.programs.len(), TIMEOUT);
        let per_rank = (crate::exec::threads() / self.programs.len()).max(1);
        let t = (step + 1) as i32;
        let hyper = [lr as f32, (1.0 - self.betas.0.powi(t)) as f32, (1.0 - self.betas.1.powi(t)) as f32];
        world.run(|local| {
            crate::exec::set_threads(per_rank);
            local.set_step(step);
            let r = local.rank();
            let p = &self.programs[r];
            let mut cpu =
                self.backends[r].lock().map_err(|_| "a rank's backend was poisoned by a panic".to_string())?;
            let bind = &self.bindings[r];
            let d = self.mesh.data_coord(r as u64);
            for (j, bufs) in bind.inputs.iter().enumerate() {
                for (x, b) in inputs(d * self.micro[r] + j as u64).iter().zip(bufs) {
                    if let Some(b) = b {
                        cpu.upload(p.buffer(*b), &x.data)?;
                    }
                }
            }
            cpu.upload(p.buffer(bind.hyper), &hyper)?;
            let rc = RankComm::new(local, &self.mesh.order);
            let report = backend::run(&mut *cpu, p, Some(&rc), seed ^ (step << 20)).map_err(|e| e.to_string())?;
            let read = |b: BufId| -> Result<f64, String> { Ok(cpu.download(p.buffer(b))?[0] as f64) };
            let loss = if bind.has_loss { Some(read(bind.loss)? / self.micro[r] as f64) } else { None };
            Ok(LoweredStep { loss, grad_norm: read(bind.norm)?.sqrt(), updated: report.updated })
        })
    }

    /// The elements of rank `rank`'s buffer `name` (`g.3`, `loss`, `norm`, ...), if it has one.
    pub fn read(&self, rank: usize, name: &str) -> Result<Option<Vec<f32>>, String> {
        let p = self.programs.get(rank).ok_or_else(|| format!("no rank {rank}"))?;
        let Some(b) = p.named(name) else { return Ok(None) };
        let cpu = self.backends[rank].lock().map_err(|_| "a rank's backend was poisoned by a panic".to_string())?;
        cpu.download(p.buffer(b)).map(Some)
    }

    /// The logical weights and optimizer state, assembled from the ranks' buffers.
    pub fn logical(
        &self,
        m: &Model,
        c: &Compiled,
        opt: &OptimizerState,
    ) -> Result<(Vec<Tensor<f32>>, OptimizerState), String> {
        let mut params: Vec<Tensor<f32>> = m.params.iter().map(|p| Tensor::zeros(&p.ty.dims)).collect();
        let mut out = opt.clone();
        out.m = params.clone();
        if !out.v.is_empty() {
            out.v = params.clone();
        }
        for (r, (p, rp)) in self.programs.iter().zip(&c.ranks).enumerate() {
            let cpu = self.backends[r].lock().map_err(|_| "a rank's backend was poisoned by a panic".to_string())?;
            for (k, meta) in m.params.iter().enumerate() {
                let shard = &rp.params[k];
                if !shard.held {
                    continue;
                }
                let n = shard.local.ty.numel() as usize;
                // A flat ZeRO shard is whole across the rank's data group.
                let whole = |name: &str, sharded: bool| -> Result<Option<Vec<f32>>, String> {
                    let Some(b) = p.named(name) else { return Ok(None) };
                    if !sharded {
                        return Ok(Some(cpu.download(p.buffer(b))?));
                    }
                    let axis = self.mesh.data_axis.as_deref().ok_or("a shard without a data axis")?;
                    let mut v = Vec::new();
                    for member in self.mesh.group(r as u64, axis) {
                        let q = &self.programs[member as usize];
                        let other = self.backends[member as usize].try_lock();
                        let data = match (&other, member as usize == r) {
                            (_, true) => cpu.download(p.buffer(b))?,
                            (Ok(o), false) => {
                                o.download(q.buffer(q.named(name).ok_or("a shard missing on a data rank")?))?
                            }
                            (Err(_), false) => return Err("a data rank's backend is busy".into()),
                        };
                        v.extend(data);
                    }
                    v.truncate(n);
                    Ok(Some(v))
                };
                let z = c.mesh.zero_sharded(shard);
                if let Some(w) = whole(&format!("w.{k}"), z && self.mesh.zero >= 3)? {
                    place(&mut params[k], &w, shard, meta);
                }
                if let Some(w) = whole(&format!("m.{k}"), z)? {
                    place(&mut out.m[k], &w, shard, meta);
                }
                if !out.v.is_empty()
                    && let Some(w) = whole(&format!("v.{k}"), z)?
                {
                    place(&mut out.v[k], &w, shard, meta);
                }
            }
        }
        Ok((params, out))
    }
}
