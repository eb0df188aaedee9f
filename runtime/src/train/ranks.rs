//! Training steps as lowered programs: every rank of the mesh (one on a
//! single device) runs its `compiler::lower::Program` on a backend, as a
//! thread with the in-process communicator. Weights, gradients, moments and
//! activations live in the backend's regions; the host only uploads each
//! step's batches and hyperparameters and reads back the loss and the norm.
//!
//! The data-parallel rank `d` of `n` takes microbatches `d·m .. (d+1)·m` of
//! the step (m per rank), so a run reproduces the single-device run with the
//! same microbatches.
//!
//! Checkpoints hold logical tensors: [`Ranks::new`] cuts them into each
//! rank's buffers (ZeRO's flat shards where the program has them) and
//! [`Ranks::logical`] assembles them again, under any layout.

use super::optim::OptimizerState;
use super::shards::{cut_elements, flat_shard, place, whole};
use crate::backend::{
    self, Backend,
    cpu::{Cpu, Engine},
};
use crate::comm::{Communicator, RankComm, World};
use crate::tensor::Tensor;
use std::sync::Mutex;
use tessera_compiler::config::Optimizer;
use tessera_compiler::driver::Compiled;
use tessera_compiler::lower::{Bound, BufId, Kind, Program};
use tessera_compiler::parallel::Mesh;

/// How long a collective may wait for the other ranks before the step fails.
pub const TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// What one rank reports after a step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RankStep {
    /// The mean loss of the rank's microbatches (`None` on pipeline stages that compute no loss).
    pub loss: Option<f64>,
    /// The global gradient norm (after the mean over microbatches).
    pub grad_norm: f64,
    /// Whether the update ran (it does not when the norm is not finite).
    pub updated: bool,
    /// The first parameter (by index) whose local weights hold a non-finite value after the step.
    pub nonfinite_param: Option<usize>,
}

/// The step's loss: the mean over the ranks that compute one (data ranks
/// see different microbatches; a pipeline's last stage holds the loss).
pub fn step_loss(reports: &[RankStep]) -> Option<f64> {
    let losses: Vec<f64> = reports.iter().filter_map(|r| r.loss).collect();
    (!losses.is_empty()).then(|| losses.iter().sum::<f64>() / losses.len() as f64)
}

/// The buffers of a program the host reads or writes each step.
struct Bindings {
    /// Model input `i` of microbatch `j`: `inputs[j][i]`.
    inputs: Vec<Vec<Option<BufId>>>,
    hyper: BufId,
    loss_scale: BufId,
    loss: BufId,
    /// Each parameter's weights as the rank stores them (`None`: not held).
    weights: Vec<Option<BufId>>,
    norm: BufId,
    /// Whether the program accumulates a loss (a pipeline's first stages do not).
    has_loss: bool,
}

impl Bindings {
    fn of(p: &Program, micro: u64, inputs: usize, params: usize) -> Result<Bindings, String> {
        let named = |b: Bound| p.bound(b).ok_or_else(|| format!("the program has no `{}` buffer", b.name()));
        let loss = named(Bound::Loss)?;
        Ok(Bindings {
            inputs: (0..micro).map(|j| (0..inputs).map(|i| p.bound(Bound::Input(i, j))).collect()).collect(),
            hyper: named(Bound::Hyper)?,
            loss_scale: named(Bound::LossScale)?,
            weights: (0..params).map(|k| p.bound(Bound::Weight(k))).collect(),
            norm: named(Bound::Norm)?,
            has_loss: p.instrs.iter().any(|i| matches!(i.kind, Kind::Accumulate) && i.outs == [loss]),
            loss,
        })
    }
}

/// The ranks of a run, each with its program and its backend.
pub struct Ranks {
    pub mesh: Mesh,
    programs: Vec<Program>,
    backends: Vec<Mutex<Cpu>>,
    bindings: Vec<Bindings>,
    /// Microbatches per rank and step.
    micro: Vec<u64>,
    /// The optimizer whose state the ranks hold.
    optimizer: Optimizer,
}

/// What the host gives one step besides its data.
#[derive(Debug, Clone, Copy)]
pub struct StepArgs {
    pub step: u64,
    /// Updates applied so far (the steps before, less those skipped):
    /// Adam's bias correction counts them, as PyTorch's Adam counts its
    /// `step()` calls.
    pub updates: u64,
    pub seed: u64,
    pub lr: f64,
    /// The backward pass's seed: 1, or the dynamic loss scale under
    /// `precision = fp16` (the gradients are divided by it before their norm).
    pub loss_scale: f32,
}

impl StepArgs {
    /// Step `step` after `step` applied updates, its loss unscaled.
    pub fn new(step: u64, seed: u64, lr: f64) -> StepArgs {
        StepArgs { step, updates: step, seed, lr, loss_scale: 1.0 }
    }
}

/// What the ranks start from.
#[derive(Clone, Copy)]
pub enum Start<'a> {
    /// Fresh: the spec's initializers with this seed and zero optimizer
    /// state, made one parameter at a time (no logical copy of the model).
    Init { seed: u64 },
    /// Logical weights and optimizer state (a checkpoint's, or given).
    State(&'a [Tensor<f32>], &'a OptimizerState),
}

impl Ranks {
    /// Each rank's backend, holding its part of the logical weights
    /// (`c.params`) and optimizer state; `optimizer` is the state's kind.
    /// `engine` runs their fused kernels.
    pub fn new(c: &Compiled, start: Start<'_>, optimizer: &Optimizer, engine: Engine) -> Result<Ranks, String> {
        let mut backends = Vec::new();
        for p in &c.programs {
            let mut cpu = Cpu::with_engine(engine);
            cpu.alloc(p.sizes)?;
            cpu.prepare(p)?;
            backends.push(cpu);
        }
        let dp = c.mesh.data_group().map(|(_, n)| n).unwrap_or(1) as usize;
        for (k, meta) in c.params.iter().enumerate() {
            // Fresh weights that every rank holding them holds whole are
            // written straight into its buffer (no logical copy is made).
            if let Start::Init { seed } = start {
                // (Master weights, under bf16, are whole where the update is not ZeRO-sharded.)
                let held_whole = |(r, p): (&tessera_compiler::parallel::RankProgram, &Program)| {
                    let s = &r.params[k];
                    let sharded = c.mesh.zero_sharded(s);
                    !s.held
                        || whole(s, meta)
                            && !(sharded && c.mesh.zero >= 3)
                            && !(sharded && p.bound(Bound::Master(k)).is_some())
                };
                if c.ranks.iter().zip(&c.programs).all(held_whole) {
                    for ((p, rp), cpu) in c.programs.iter().zip(&c.ranks).zip(backends.iter_mut()) {
                        for role in [Bound::Weight(k), Bound::Master(k)] {
                            if let Some(b) = p.bound(role).filter(|_| rp.params[k].held) {
                                cpu.write_with(p.buffer(b), |o| crate::init::init_into(meta, k, seed, o))?;
                            }
                        }
                    }
                    continue;
                }
            }
            let fresh;
            let (w, moments): (&Tensor<f32>, Vec<(Bound, &Tensor<f32>)>) = match start {
                Start::Init { seed } => {
                    fresh = crate::init::init_param(meta, k, seed);
                    // The regions start zeroed: fresh moments need no upload.
                    (&fresh, Vec::new())
                }
                Start::State(params, opt) => {
                    let mut v = vec![(Bound::Moment1(k), &opt.m[k])];
                    v.extend(opt.v.get(k).map(|t| (Bound::Moment2(k), t)));
                    (&params[k], v)
                }
            };
            for ((p, rp), cpu) in c.programs.iter().zip(&c.ranks).zip(backends.iter_mut()) {
                let shard = &rp.params[k];
                if !shard.held {
                    continue;
                }
                let d = c.mesh.data_coord(p.rank) as usize;
                // A buffer holds the rank's cut of the logical tensor, or its flat ZeRO shard of that cut.
                let mut put = |role: Bound, full: &Tensor<f32>, sharded: bool| -> Result<(), String> {
                    let Some(b) = p.bound(role) else { return Ok(()) };
                    let local = cut_elements(full, shard, meta);
                    match sharded {
                        true => cpu.upload(p.buffer(b), &flat_shard(&local, dp, d)),
                        false => cpu.upload(p.buffer(b), &local),
                    }
                };
                let z = c.mesh.zero_sharded(shard);
                put(Bound::Weight(k), w, z && c.mesh.zero >= 3)?;
                put(Bound::Master(k), w, z)?;
                for &(role, t) in &moments {
                    put(role, t, z)?;
                }
            }
        }
        let backends = backends.into_iter().map(Mutex::new).collect();
        let micro: Vec<u64> = c.ranks.iter().map(|r| r.micro).collect();
        let bindings = c
            .programs
            .iter()
            .zip(&micro)
            .map(|(p, &n)| Bindings::of(p, n, c.inputs.len(), c.params.len()))
            .collect::<Result<_, _>>()?;
        Ok(Ranks {
            mesh: c.mesh.clone(),
            programs: c.programs.clone(),
            backends,
            bindings,
            micro,
            optimizer: optimizer.clone(),
        })
    }

    /// One training step on every rank. `inputs(k)` is global microbatch
    /// `k`; `trace` records a span per instruction.
    pub fn step(
        &self,
        args: StepArgs,
        inputs: &(dyn Fn(u64) -> Vec<Tensor<f32>> + Sync),
        trace: Option<&crate::trace::Trace>,
    ) -> Result<Vec<RankStep>, String> {
        let StepArgs { step, updates, seed, lr, loss_scale } = args;
        let world = World::new(self.programs.len(), TIMEOUT);
        let per_rank = (crate::exec::threads() / self.programs.len()).max(1);
        let t = (updates + 1) as i32;
        let (b1, b2) = match self.optimizer {
            Optimizer::Adamw { beta1, beta2, .. } => (beta1, beta2),
            Optimizer::Sgd { .. } => (0.0, 0.0),
        };
        let hyper = [lr as f32, (1.0 - b1.powi(t)) as f32, (1.0 - b2.powi(t)) as f32];
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
            cpu.upload(p.buffer(bind.loss_scale), &[loss_scale])?;
            let mut rc = RankComm::new(local, &self.mesh.order);
            rc.trace = trace;
            let report = backend::run(&mut *cpu, p, Some(&rc), seed ^ (step << 20)).map_err(|e| e.to_string())?;
            let read = |b: BufId| -> Result<f64, String> { Ok(cpu.download(p.buffer(b))?[0] as f64) };
            let loss = if bind.has_loss { Some(read(bind.loss)? / self.micro[r] as f64) } else { None };
            let mut nonfinite_param = None;
            if report.updated {
                for (k, w) in bind.weights.iter().enumerate() {
                    if let Some(w) = w
                        && !cpu.finite(p.buffer(*w))?
                    {
                        nonfinite_param = Some(k);
                        break;
                    }
                }
            }
            Ok(RankStep { loss, grad_norm: read(bind.norm)?.sqrt(), updated: report.updated, nonfinite_param })
        })
    }

    /// The elements of rank `rank`'s buffer that plays `role`, if it has one.
    pub fn read(&self, rank: usize, role: Bound) -> Result<Option<Vec<f32>>, String> {
        let p = self.programs.get(rank).ok_or_else(|| format!("no rank {rank}"))?;
        let Some(b) = p.bound(role) else { return Ok(None) };
        let cpu = self.backends[rank].lock().map_err(|_| "a rank's backend was poisoned by a panic".to_string())?;
        cpu.download(p.buffer(b)).map(Some)
    }

    /// The logical weights and optimizer state, assembled from the ranks' buffers.
    pub fn logical(&self, c: &Compiled) -> Result<(Vec<Tensor<f32>>, OptimizerState), String> {
        let mut out = OptimizerState::new(&c.params, &self.optimizer);
        let params = self.assemble(c, Some(&mut out))?;
        Ok((params, out))
    }

    /// The logical weights alone (evaluation and sampling read no optimizer state).
    pub fn weights(&self, c: &Compiled) -> Result<Vec<Tensor<f32>>, String> {
        self.assemble(c, None)
    }

    /// The logical weights, and into `state` the optimizer state, from every rank's buffers.
    fn assemble(&self, c: &Compiled, mut state: Option<&mut OptimizerState>) -> Result<Vec<Tensor<f32>>, String> {
        let mut params: Vec<Tensor<f32>> = c.params.iter().map(|p| Tensor::zeros(&p.ty.dims)).collect();
        for (r, (p, rp)) in self.programs.iter().zip(&c.ranks).enumerate() {
            let cpu = self.backends[r].lock().map_err(|_| "a rank's backend was poisoned by a panic".to_string())?;
            for (k, meta) in c.params.iter().enumerate() {
                let shard = &rp.params[k];
                if !shard.held {
                    continue;
                }
                let n = shard.local.ty.numel() as usize;
                // A flat ZeRO shard is whole across the rank's data group.
                let whole = |role: Bound, sharded: bool| -> Result<Option<Vec<f32>>, String> {
                    let Some(b) = p.bound(role) else { return Ok(None) };
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
                                o.download(q.buffer(q.bound(role).ok_or("a shard missing on a data rank")?))?
                            }
                            (Err(_), false) => return Err("a data rank's backend is busy".into()),
                        };
                        v.extend(data);
                    }
                    v.truncate(n);
                    Ok(Some(v))
                };
                let z = c.mesh.zero_sharded(shard);
                // The f32 master weights where the program keeps them (`precision = bf16`), else the weights.
                let w = match whole(Bound::Master(k), z)? {
                    Some(w) => Some(w),
                    None => whole(Bound::Weight(k), z && self.mesh.zero >= 3)?,
                };
                if let Some(w) = w {
                    place(&mut params[k], &w, shard, meta);
                }
                let Some(out) = state.as_deref_mut() else { continue };
                if let Some(w) = whole(Bound::Moment1(k), z)? {
                    place(&mut out.m[k], &w, shard, meta);
                }
                if !out.v.is_empty()
                    && let Some(w) = whole(Bound::Moment2(k), z)?
                {
                    place(&mut out.v[k], &w, shard, meta);
                }
            }
        }
        Ok(params)
    }
}
