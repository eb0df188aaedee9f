//! Training steps as lowered programs: every rank of the mesh (one on a
//! single device) runs its `compiler::lower::Program` on a backend, as a
//! thread with the in-process communicator, or as a process of its own with
//! the process world's (MPI's): the same programs, another transport. Weights, gradients, moments and
//! activations live in the backend's regions; the host only uploads each
//! step's batches and hyperparameters and reads back the loss and the norm.
//!
//! The data-parallel rank `d` of `n` takes microbatches `d·m .. (d+1)·m` of
//! the step (m per rank), so a run reproduces the single-device run with the
//! same microbatches.
//!
//! Checkpoints hold logical tensors: [`Ranks::new`] cuts them into each
//! rank's buffers (ZeRO's flat shards where the program has them) and
//! [`Ranks::logical`] assembles them again, under any layout. Across
//! processes, each rank broadcasts its buffers and every process assembles
//! the same logical tensors; what only one process needs to do with them
//! (write a checkpoint) is the caller's to decide.

use super::optim::OptimizerState;
use super::shards::{cut_elements, flat_shard, holds_flat_shard, place, state_param, weight_buffer, whole};
use crate::backend::{
    self, Backend,
    cpu::{Cpu, Engine},
};
use crate::comm::{Communicator, ProcessWorld, RankComm, World};
use crate::tensor::Tensor;
use std::sync::Mutex;
use tessera_compiler::config::Optimizer;
use tessera_compiler::driver::Compiled;
use tessera_compiler::ir::Dim;
use tessera_compiler::lower::{Bound, BufId, Kind, Program};
use tessera_compiler::parallel::Mesh;

/// How long a collective may wait for the other ranks before the step fails.
pub const TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// Rank buffers by (rank, role), as the processes exchanged them.
type Buffers = std::collections::HashMap<(usize, Bound), Vec<f32>>;

/// Pieces of a sharded checkpoint, per file: (file name, (key, elements)).
pub type ShardFiles = Vec<(String, Vec<(String, Tensor<f32>)>)>;

/// Fill the local ranks' buffers from logical tensors: fresh ones from
/// the initializers, or given ones (a checkpoint's), each rank taking its
/// cut of each parameter.
fn load_logical(c: &Compiled, local: &[usize], backends: &mut [Cpu], start: Start<'_>) -> Result<(), String> {
    for (k, meta) in c.params.iter().enumerate() {
        // Fresh weights that every rank holding them holds whole are
        // written straight into its buffer (no logical copy is made).
        if let Start::Init { seed } = start {
            // (Master weights, under bf16, are whole where the update is not ZeRO-sharded.)
            let held_whole = |(r, p): (&tessera_compiler::parallel::RankProgram, &Program)| {
                let s = &r.params[k];
                let flat = |role: Bound| p.bound(role).is_some() && holds_flat_shard(&c.mesh, s, role);
                !s.held || whole(s, meta) && !flat(Bound::Weight(k)) && !flat(Bound::Master(k))
            };
            if c.ranks.iter().zip(&c.programs).all(held_whole) {
                for (&r, cpu) in local.iter().zip(backends.iter_mut()) {
                    let (p, rp) = (&c.programs[r], &c.ranks[r]);
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
        let (w, opt): (&Tensor<f32>, Option<&OptimizerState>) = match start {
            Start::Init { seed } => {
                fresh = crate::init::init_param(meta, k, seed);
                // The regions start zeroed: a fresh optimizer state needs no upload.
                (&fresh, None)
            }
            Start::State(params, opt) => (&params[k], Some(opt)),
            Start::Sharded { .. } => unreachable!("a sharded start reads pieces, not logical tensors"),
        };
        for (&r, cpu) in local.iter().zip(backends.iter_mut()) {
            let shard = &c.ranks[r].params[k];
            if !shard.held {
                continue;
            }
            let cut = cut_elements(w, shard, meta);
            upload_cut(c, r, cpu, k, Bound::Weight(k), &cut)?;
            upload_cut(c, r, cpu, k, Bound::Master(k), &cut)?;
            let Some(opt) = opt else { continue };
            for (role, t) in opt.state.get(k).into_iter().flatten() {
                let (cut, state) = state_param(&opt.optimizer, shard, meta, *role)
                    .ok_or("the optimizer state does not belong to this optimizer")?;
                upload_cut(c, r, cpu, k, Bound::State(k, *role), &cut_elements(t, &cut, &state))?;
            }
        }
    }
    Ok(())
}

/// Upload rank `r`'s elements of parameter `k`'s buffer `role`, given its
/// `cut` of the logical tensor: the buffer holds the cut, or its ZeRO flat
/// shard of it (`shards::holds_flat_shard`).
fn upload_cut(c: &Compiled, r: usize, cpu: &mut Cpu, k: usize, role: Bound, cut: &[f32]) -> Result<(), String> {
    let p = &c.programs[r];
    let Some(b) = p.bound(role) else { return Ok(()) };
    match holds_flat_shard(&c.mesh, &c.ranks[r].params[k], role) {
        true => {
            let dp = c.mesh.data_group().map(|(_, n)| n).unwrap_or(1) as usize;
            cpu.upload(p.buffer(b), &flat_shard(cut, dp, c.mesh.data_coord(r as u64) as usize))
        }
        false => cpu.upload(p.buffer(b), cut),
    }
}

/// Fill rank `r`'s weights (and master weights) and, with `opt`, the
/// state of that optimizer from a sharded checkpoint: its cut of each
/// logical tensor, read from the pieces that overlap it.
fn load_shards(
    c: &Compiled,
    r: usize,
    cpu: &mut Cpu,
    reader: &mut super::sharded::Reader,
    opt: Option<&Optimizer>,
) -> Result<(), crate::train::TrainError> {
    use super::sharded::Role;
    let p = &c.programs[r];
    let err = crate::train::TrainError::Setup;
    for (k, meta) in c.params.iter().enumerate() {
        let shard = &c.ranks[r].params[k];
        if !shard.held {
            continue;
        }
        let target = super::shards::maps(shard, meta);
        let w = reader.cut(&meta.path, Role::Weight, &meta.ty.dims, &target)?;
        upload_cut(c, r, cpu, k, Bound::Weight(k), &w).map_err(err)?;
        upload_cut(c, r, cpu, k, Bound::Master(k), &w).map_err(err)?;
        let Some(opt) = opt else { continue };
        for (s, cut, state) in super::shards::state_params(opt, shard, meta) {
            let (role, bound) = (Role::State(s), Bound::State(k, s));
            if p.bound(bound).is_some() && reader.has(&meta.path, role) {
                let target = super::shards::maps(&cut, &state);
                let m = reader.cut(&meta.path, role, &state.ty.dims, &target)?;
                upload_cut(c, r, cpu, k, bound, &m).map_err(err)?;
            }
        }
    }
    Ok(())
}

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

/// The ranks of a run, each with its program, and the ranks this process
/// runs with their backends.
pub struct Ranks {
    pub mesh: Mesh,
    /// Every rank's program (a process reads the others' buffer sizes).
    programs: Vec<Program>,
    /// The ranks this process runs: all of them as threads, or its own.
    local: Vec<usize>,
    /// Per local rank.
    backends: Vec<Mutex<Cpu>>,
    bindings: Vec<Bindings>,
    /// Microbatches per rank and step (every rank's).
    micro: Vec<u64>,
    /// The optimizer whose state the ranks hold.
    optimizer: Optimizer,
    /// The world of processes this one is a rank of (`None`: threads).
    world: Option<ProcessWorld>,
    /// How long the threads' collectives wait for each other.
    timeout: std::time::Duration,
}

/// What one rank's step leaves in its buffers, as it crosses between processes.
#[derive(Debug, Clone, Copy)]
struct Raw {
    /// The loss accumulated over the rank's microbatches (`None`: no loss on this stage).
    loss: Option<f32>,
    /// The squared global gradient norm.
    norm: f32,
    updated: bool,
    nonfinite_param: Option<usize>,
}

impl Raw {
    const LEN: usize = 5;

    fn encode(&self) -> [f32; Raw::LEN] {
        [
            self.loss.is_some() as u8 as f32,
            self.loss.unwrap_or(0.0),
            self.norm,
            self.updated as u8 as f32,
            self.nonfinite_param.map_or(0.0, |k| (k + 1) as f32),
        ]
    }

    fn decode(v: &[f32]) -> Raw {
        Raw {
            loss: (v[0] != 0.0).then_some(v[1]),
            norm: v[2],
            updated: v[3] != 0.0,
            nonfinite_param: (v[4] != 0.0).then(|| v[4] as usize - 1),
        }
    }

    fn report(&self, micro: u64) -> RankStep {
        RankStep {
            loss: self.loss.map(|l| l as f64 / micro as f64),
            grad_norm: (self.norm as f64).sqrt(),
            updated: self.updated,
            nonfinite_param: self.nonfinite_param,
        }
    }
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
    /// A sharded checkpoint, of which each local rank reads only the pieces
    /// that overlap its cuts; with `moments` false the optimizer state
    /// starts from zero (another optimizer wrote it).
    Sharded { reader: &'a Mutex<super::sharded::Reader>, moments: bool },
}

impl Ranks {
    /// Each local rank's backend, holding its part of the logical weights
    /// (`c.params`) and optimizer state; `optimizer` is the state's kind.
    /// `engine` runs their fused kernels. With a process `world`, this
    /// process runs its own rank only, and the world must have one process
    /// per rank of the mesh.
    pub fn new(
        c: &Compiled,
        start: Start<'_>,
        optimizer: &Optimizer,
        engine: Engine,
        world: Option<&ProcessWorld>,
    ) -> Result<Ranks, String> {
        let local: Vec<usize> = match world {
            None => (0..c.programs.len()).collect(),
            Some(w) if w.size() != c.programs.len() => {
                return Err(format!(
                    "the world has {} processes but the mesh has {} ranks: start one process per rank",
                    w.size(),
                    c.programs.len()
                ));
            }
            Some(w) => {
                // This rank's group along each mesh axis, split by every process in axis order.
                let groups: Vec<_> = c
                    .mesh
                    .order
                    .iter()
                    .filter_map(|(axis, _)| crate::comm::group_along(&c.mesh.order, w.rank(), axis))
                    .collect();
                w.split_mesh(&groups).map_err(|e| e.to_string())?;
                vec![w.rank()]
            }
        };
        let mut backends = Vec::new();
        for &r in &local {
            let p = &c.programs[r];
            let mut cpu = Cpu::with_engine(engine);
            cpu.alloc(p.sizes)?;
            cpu.prepare(p)?;
            backends.push(cpu);
        }
        match start {
            Start::Sharded { reader, moments } => {
                let mut reader =
                    reader.lock().map_err(|_| "the checkpoint reader was poisoned by a panic".to_string())?;
                for (&r, cpu) in local.iter().zip(backends.iter_mut()) {
                    let opt = moments.then_some(optimizer);
                    load_shards(c, r, cpu, &mut reader, opt).map_err(|e| e.to_string())?;
                }
            }
            Start::Init { .. } | Start::State(..) => load_logical(c, &local, &mut backends, start)?,
        }
        let backends = backends.into_iter().map(Mutex::new).collect();
        let micro: Vec<u64> = c.ranks.iter().map(|r| r.micro).collect();
        let bindings = local
            .iter()
            .map(|&r| Bindings::of(&c.programs[r], micro[r], c.inputs.len(), c.params.len()))
            .collect::<Result<_, _>>()?;
        Ok(Ranks {
            mesh: c.mesh.clone(),
            programs: c.programs.clone(),
            local,
            backends,
            bindings,
            micro,
            optimizer: optimizer.clone(),
            world: world.cloned(),
            timeout: TIMEOUT,
        })
    }

    /// The same ranks, whose threads' collectives wait at most `timeout`.
    pub fn with_timeout(mut self, timeout: std::time::Duration) -> Ranks {
        self.timeout = timeout;
        self
    }

    /// The world of processes this one is a rank of (`None`: the ranks are threads).
    pub fn world(&self) -> Option<&ProcessWorld> {
        self.world.as_ref()
    }

    /// Where rank `rank`'s backend is in this process, if it runs here.
    fn slot(&self, rank: usize) -> Option<usize> {
        self.local.iter().position(|&r| r == rank)
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
        let hyper = self.optimizer.hyper(lr, updates + 1);
        // One rank's step on this process, with its communicator.
        // `stream` is the rank's communication stream's channel.
        let run_rank = |r: usize, comm: &mut dyn Communicator, stream: &mut dyn Communicator| -> Result<Raw, String> {
            // Errors name the step as the run reports it: from 1.
            comm.set_step(step + 1);
            stream.set_step(step + 1);
            let slot = self.slot(r).ok_or_else(|| format!("rank {r} does not run in this process"))?;
            let p = &self.programs[r];
            let mut cpu =
                self.backends[slot].lock().map_err(|_| "a rank's backend was poisoned by a panic".to_string())?;
            let bind = &self.bindings[slot];
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
            let mut rc = RankComm::new(comm, &self.mesh.order).with_stream(stream);
            rc.trace = trace;
            let report = backend::run(&mut *cpu, p, Some(&rc), seed ^ (step << 20)).map_err(|e| e.to_string())?;
            let read = |b: BufId| -> Result<f32, String> { Ok(cpu.download(p.buffer(b))?[0]) };
            let loss = if bind.has_loss { Some(read(bind.loss)?) } else { None };
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
            Ok(Raw { loss, norm: read(bind.norm)?, updated: report.updated, nonfinite_param })
        };
        let raw: Vec<Raw> = match &self.world {
            None => {
                let world = World::new(self.programs.len(), self.timeout);
                let per_rank = (crate::exec::threads() / self.programs.len()).max(1);
                world.run(|local| {
                    crate::exec::set_threads(per_rank);
                    let mut stream = local.comm_stream().map_err(|e| e.to_string())?;
                    run_rank(local.rank(), local, &mut *stream)
                })?
            }
            Some(w) => {
                // The processes of a machine share its cores.
                crate::exec::set_threads(0);
                crate::exec::set_threads((crate::exec::threads() / w.local_size.max(1)).max(1));
                let mut comm = w.lock();
                let mut stream = w.lock_stream();
                let stream = stream.as_mut().ok_or("the communication stream's channel was never opened")?;
                let mine = match run_rank(w.rank(), &mut **comm, &mut **stream) {
                    Ok(m) => m,
                    Err(e) => {
                        comm.abort(&e);
                        return Err(e);
                    }
                };
                // Every rank's report, on every process: the same decisions everywhere.
                let mut all = vec![0f32; Raw::LEN * w.size()];
                comm.all_gather(&w.everyone(), &mine.encode(), &mut all).map_err(|e| e.to_string())?;
                all.chunks(Raw::LEN).map(Raw::decode).collect()
            }
        };
        Ok(raw.iter().zip(&self.micro).map(|(r, &m)| r.report(m)).collect())
    }

    /// Per parameter, whether some rank's buffer of role `role(k)` holds a
    /// value that is not finite (every rank's, across processes).
    pub fn nonfinite(&self, params: usize, role: impl Fn(usize) -> Bound) -> Result<Vec<bool>, String> {
        let mut bad = vec![0f32; params];
        for (slot, &r) in self.local.iter().enumerate() {
            let p = &self.programs[r];
            let cpu = self.backends[slot].lock().map_err(|_| "a rank's backend was poisoned by a panic".to_string())?;
            for (k, flag) in bad.iter_mut().enumerate() {
                if let Some(b) = p.bound(role(k))
                    && !cpu.finite(p.buffer(b))?
                {
                    *flag = 1.0;
                }
            }
        }
        if let Some(w) = &self.world {
            w.lock().all_reduce(&w.everyone(), &mut bad, crate::comm::ReduceOp::Max).map_err(|e| e.to_string())?;
        }
        Ok(bad.iter().map(|&f| f != 0.0).collect())
    }

    /// The elements of rank `rank`'s buffer that plays `role`, if it has
    /// one (`None` too for a rank of another process).
    pub fn read(&self, rank: usize, role: Bound) -> Result<Option<Vec<f32>>, String> {
        let p = self.programs.get(rank).ok_or_else(|| format!("no rank {rank}"))?;
        let (Some(slot), Some(b)) = (self.slot(rank), p.bound(role)) else { return Ok(None) };
        let cpu = self.backends[slot].lock().map_err(|_| "a rank's backend was poisoned by a panic".to_string())?;
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

    /// This process's pieces of a sharded checkpoint (`writes`, from
    /// `sharded::plan`), copied out of the local ranks' buffers: per file,
    /// its pieces by key.
    pub fn pieces(&self, writes: &[Vec<super::sharded::Write>]) -> Result<ShardFiles, String> {
        let mut files = Vec::new();
        for &r in &self.local {
            let mut named = Vec::new();
            let mut file = None;
            for w in &writes[r] {
                let data =
                    self.read(r, w.bound)?.ok_or_else(|| format!("rank {r} has no `{}` buffer", w.bound.name()))?;
                let n = (w.piece.flat[1] - w.piece.flat[0]) as usize;
                let data = data
                    .get(..n)
                    .ok_or_else(|| format!("rank {r}'s `{}` is shorter than its piece", w.bound.name()))?;
                named.push((
                    w.piece.key.clone(),
                    Tensor { dims: vec![Dim::new("piece", n as u64)], data: data.to_vec() },
                ));
                file = Some(w.piece.file.clone());
            }
            if let Some(f) = file {
                files.push((f, named));
            }
        }
        Ok(files)
    }

    /// The roles of rank `r`'s buffers that hold logical state, in a fixed
    /// order (`sharded::state_buffers` of each parameter it holds).
    fn state_roles(&self, c: &Compiled, r: usize, moments: bool) -> Vec<Bound> {
        let p = &self.programs[r];
        (0..c.params.len())
            .filter(|&k| c.ranks[r].params[k].held)
            .flat_map(|k| super::sharded::state_buffers(p, k, moments).into_iter().map(|(_, b)| b))
            .collect()
    }

    /// Every rank's state buffers (`state_roles`), in every process: each
    /// rank broadcasts its own to the world, one message per rank.
    fn exchange(&self, c: &Compiled, w: &ProcessWorld, moments: bool) -> Result<Buffers, String> {
        let mut out = Buffers::new();
        let mut comm = w.lock();
        for r in 0..self.programs.len() {
            let p = &self.programs[r];
            let roles = self.state_roles(c, r, moments);
            let sizes: Vec<usize> =
                roles.iter().map(|&b| p.bound(b).map_or(0, |id| p.buffer(id).ty.numel() as usize)).collect();
            let mut flat = Vec::with_capacity(sizes.iter().sum());
            if r == w.rank() {
                for &role in &roles {
                    flat.extend(self.read(r, role)?.unwrap_or_default());
                }
            } else {
                flat.resize(sizes.iter().sum(), 0.0);
            }
            comm.broadcast(&w.everyone(), r, &mut flat).map_err(|e| e.to_string())?;
            let mut at = 0;
            for (role, n) in roles.into_iter().zip(sizes) {
                out.insert((r, role), flat[at..at + n].to_vec());
                at += n;
            }
        }
        Ok(out)
    }

    /// The logical weights, and into `state` the optimizer state, from every rank's buffers.
    fn assemble(&self, c: &Compiled, mut state: Option<&mut OptimizerState>) -> Result<Vec<Tensor<f32>>, String> {
        let exchanged = match &self.world {
            Some(w) => Some(self.exchange(c, w, state.is_some())?),
            None => None,
        };
        // Rank `r`'s buffer of `role`: from its backend here, or as another process sent it.
        let fetch = |r: usize, role: Bound| -> Result<Option<Vec<f32>>, String> {
            match &exchanged {
                Some(x) => Ok(x.get(&(r, role)).cloned()),
                None => self.read(r, role),
            }
        };
        let mut params: Vec<Tensor<f32>> = c.params.iter().map(|p| Tensor::zeros(&p.ty.dims)).collect();
        for (r, rp) in c.ranks.iter().enumerate() {
            for (k, meta) in c.params.iter().enumerate() {
                let shard = &rp.params[k];
                if !shard.held {
                    continue;
                }
                // A flat ZeRO shard of `n` elements is whole across the rank's data group.
                let whole = |role: Bound, n: u64| -> Result<Option<Vec<f32>>, String> {
                    if self.programs[r].bound(role).is_none() {
                        return Ok(None);
                    }
                    if !holds_flat_shard(&c.mesh, shard, role) {
                        return fetch(r, role);
                    }
                    let axis = self.mesh.data_axis.as_deref().ok_or("a shard without a data axis")?;
                    let mut v = Vec::new();
                    for member in self.mesh.group(r as u64, axis) {
                        v.extend(fetch(member as usize, role)?.ok_or("a shard missing on a data rank")?);
                    }
                    v.truncate(n as usize);
                    Ok(Some(v))
                };
                let w = whole(weight_buffer(&self.programs[r], k), shard.local.ty.numel())?;
                if let Some(w) = w {
                    place(&mut params[k], &w, shard, meta);
                }
                let Some(out) = state.as_deref_mut() else { continue };
                for (role, t) in out.state[k].iter_mut() {
                    let (cut, logical) = state_param(&self.optimizer, shard, meta, *role)
                        .ok_or("the optimizer state does not belong to this optimizer")?;
                    if let Some(w) = whole(Bound::State(k, *role), cut.local.ty.numel())? {
                        place(t, &w, &cut, &logical);
                    }
                }
            }
        }
        Ok(params)
    }
}
