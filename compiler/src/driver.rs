//! The compiler driver: the passes after checking, in order, each output
//! verified — autodiff → sharding (per-rank programs, their collectives
//! cross-checked) → pipeline schedule → memory plan and lowering → one
//! [`Program`] per rank.
//!
//! Verification runs in every build; `TESSERA_VERIFY=0` turns it off (for
//! speed on very large programs). Fusion runs in lowering; `TESSERA_FUSE=0`
//! turns it off ([`Passes`]).

use crate::autodiff::{Backward, differentiate_trainable};
use crate::config::{Parallel, Train};
use crate::cost;
use crate::diag::Diag;
use crate::ir::{Input, Param};
use crate::lower::{self, Paging, Program};
use crate::model::Model;
use crate::parallel::{self, Mesh, RankProgram};

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{pass}: {message}")]
pub struct PassError {
    /// The pass that failed, or whose output the verifier rejected.
    pub pass: &'static str,
    pub message: String,
}

fn fail(pass: &'static str) -> impl Fn(String) -> PassError {
    move |message| PassError { pass, message }
}

/// Whether every rank of `m`'s layout fits the memory of its `train.device`
/// (the cost model's per-rank estimate; nothing to check without a device):
/// an error at the `train` section that breaks the worst rank's bytes down
/// and says how to shard more. The CLI runs it after checking; the planner
/// prices memory itself, layout by layout.
pub fn check_memory(m: &Model) -> Result<(), Diag> {
    let Some(t) = &m.train else { return Ok(()) };
    let Some(dev) = t.device.as_deref().and_then(crate::device::device) else {
        return Ok(());
    };
    let mem = cost::memory::memory_per_rank(m);
    let (rank, worst) = cost::memory::worst_rank(&mem);
    if worst.total <= dev.memory {
        return Ok(());
    }
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let order = parallel::mesh::rank_order(&m.parallel);
    let c = parallel::mesh::coords(&order, rank as u64);
    let at: Vec<String> = order.iter().zip(&c).map(|((a, _), i)| format!("{a} {i}")).collect();
    Err(Diag::error(format!(
        "rank {rank} needs {:.1} GiB, but {} has {:.1} GiB",
        gib(worst.total),
        dev.name,
        gib(dev.memory)
    ))
    .at(m.train_span, "does not fit on this device")
    .note(format!(
        "rank {rank} ({}): params {:.2} GiB, grads {:.2} GiB, optimizer {:.2} GiB, activations {:.2} GiB",
        if at.is_empty() { "single device".into() } else { at.join(", ") },
        gib(worst.params),
        gib(worst.grads),
        gib(worst.optimizer),
        gib(worst.activations)
    ))
    .help(format!(
        "shard more: raise ZeRO, tensor or pipeline parallelism, use `recompute = selective` or `full`, or lower \
         `micro_batch`; `tessera plan FILE --search --world {} --device {}` ranks the layouts that fit",
        m.parallel.world(),
        dev.name
    )))
}

/// What the driver hands over: every pass's typed result.
#[derive(Debug, Clone)]
pub struct Compiled {
    pub mesh: Mesh,
    pub backward: Backward,
    pub ranks: Vec<RankProgram>,
    pub programs: Vec<Program>,
    /// The logical parameters: a program's [`lower::Bound::Weight`]`(k)` is
    /// its rank's cut of `params[k]` (`ranks[r].params[k]` says which cut).
    pub params: Vec<Param>,
    /// The model's inputs: [`lower::Bound::Input`]`(i, j)` is `inputs[i]` of microbatch `j`.
    pub inputs: Vec<Input>,
}

/// A model's training, compiled: everything the runtime needs to train it
/// (it never sees the checked `Model`).
#[derive(Debug, Clone)]
pub struct Training {
    /// The model's name (checkpoints record it).
    pub name: String,
    /// The spec's `train` section.
    pub train: Train,
    /// The layout the step runs under (checkpoints record it).
    pub parallel: Parallel,
    /// Sequences per microbatch and data-parallel rank.
    pub micro_batch: u64,
    /// The size of the model's `vocab` dim, if it has one (token ids must be below it).
    pub vocab: Option<u64>,
    /// The step: every rank's lowered program, and the logical parameters and inputs.
    pub step: Compiled,
    /// Under a batch ramp-up (`train.batch_rampup`), the step of each
    /// smaller global batch it passes through: (sequences, its programs),
    /// fewer microbatches of the same size on every data rank.
    pub ramp: Vec<(u64, Compiled)>,
    /// The evaluation program: one microbatch's forward pass on one device,
    /// dropout off, from the logical weights ([`compile_eval`]); for a model
    /// whose examples meet across a data-parallel batch, the microbatch of
    /// the whole data-parallel group ([`Model::whole_batch`]).
    pub eval: Program,
    /// The evaluation program's inputs ([`lower::Bound::Input`]`(i, 0)` is `eval_inputs[i]`).
    pub eval_inputs: Vec<crate::ir::Input>,
}

/// [`Training`] for `m`. With `available` (the bytes this machine can give
/// the run), the CPU run's memory ([`cost::memory::cpu_training_bytes`]) is
/// checked against it first, before any pass runs.
pub fn compile_training(m: &Model, available: Option<u64>) -> Result<Training, PassError> {
    let train = m.train.clone().ok_or_else(|| {
        fail("training")(format!("model `{}` has no `train` section; add one (see docs/language.md)", m.name))
    })?;
    if let Some(avail) = available {
        let need = cost::memory::cpu_training_bytes(m);
        if need > avail as u128 {
            let ranks = m.parallel.world();
            let how = if ranks > 1 {
                format!("{ranks} simulated ranks in this one process, together")
            } else {
                "weights, gradients, optimizer state and activations".to_string()
            };
            let gb = |b: u128| format!("{:.2} GB", b as f64 / 1e9);
            return Err(fail("memory")(format!(
                "training `{}` on this CPU needs about {} ({how}), but only {} of memory is available\n  help: \
                 shrink the model or the batch, or use fewer simulated ranks (`--set parallel.mesh.AXIS=1`); \
                 `tessera plan` sizes runs for GPU clusters",
                m.name,
                gb(need),
                gb(avail as u128)
            )));
        }
    }
    let step = compile(m)?;
    // Evaluation on one device of the training batch's meaning: the model
    // itself, or, where its examples meet across a data-parallel batch, the
    // model checked for the group's whole microbatch.
    let (eval, eval_inputs) = match &m.whole_batch {
        Some(whole) => (compile_eval(whole, &backward_of(whole)?, Passes::default())?, whole.inputs.clone()),
        None => (compile_eval(m, &step.backward, Passes::default())?, m.inputs.clone()),
    };
    let mut ramp = Vec::new();
    for phase in train.batch_phases().iter().filter(|p| p.batch != train.batch) {
        ramp.push((phase.batch, compile(&with_batch(m, phase.batch))?));
    }
    Ok(Training {
        name: m.name.clone(),
        train,
        parallel: m.parallel.clone(),
        micro_batch: m.micro_batch,
        vocab: m.const_value("vocab").map(|v| v as u64),
        step,
        ramp,
        eval,
        eval_inputs,
    })
}

/// `m` with a global batch of `batch` sequences: the same microbatches, fewer
/// of them (a pipeline's count follows).
fn with_batch(m: &Model, batch: u64) -> Model {
    let mut m = m.clone();
    let dp = m.parallel.data().max(1);
    if let Some(t) = &mut m.train {
        t.batch = batch;
    }
    m.parallel.pipeline.microbatches = (batch / dp.saturating_mul(m.micro_batch.max(1))).max(1);
    m
}

/// Which optional passes run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Passes {
    /// The verifier after each pass (`TESSERA_VERIFY=0` turns it off).
    pub verify: bool,
    /// Fusion of elementwise runs into kernels (`TESSERA_FUSE=0` turns it off).
    pub fuse: bool,
    /// Whether to lower the per-rank programs (`Compiled::programs` is
    /// empty without): `inspect --ir rank` and the planner need only the
    /// per-rank graphs.
    pub lower: bool,
}

impl Default for Passes {
    /// Both on, unless the environment turns one off.
    fn default() -> Passes {
        let on = |var: &str| std::env::var(var).map(|v| v != "0").unwrap_or(true);
        Passes { verify: on("TESSERA_VERIFY"), fuse: on("TESSERA_FUSE"), lower: true }
    }
}

/// The evaluation program of `m` on one device, whatever its layout (the
/// weights are the logical ones): the forward pass of one microbatch, dropout
/// off, its loss in `loss`. `backward` is the step's ([`Compiled::backward`]).
pub fn compile_eval(m: &Model, backward: &Backward, passes: Passes) -> Result<Program, PassError> {
    let mut one = m.clone();
    one.parallel = Parallel::default();
    let mut prog = parallel::shard(&one, backward, 0).map_err(|e| fail("sharding")(e.to_string()))?;
    prog.micro = 1;
    let p = lower::lower_eval(&one, &prog, passes.fuse).map_err(|e| fail("lowering")(e.to_string()))?;
    if passes.verify {
        lower::verify::verify(&p).map_err(|e| fail("lowering")(e.to_string()))?;
    }
    Ok(p)
}

/// The programs that generate from a model on one device
/// ([`lower::lower_generate`]), sharing one allocation.
#[derive(Debug, Clone)]
pub struct Generation {
    /// The forward pass over a whole window from position 0, without a
    /// cache: what generation without a KV cache reruns for every token.
    pub window: Program,
    /// The programs over the paged KV cache; `Err` says why the model has
    /// none (generation then recomputes the window).
    pub paged: Result<Paged, String>,
}

/// A model's programs over one paged KV cache.
#[derive(Debug, Clone)]
pub struct Paged {
    pub paging: Paging,
    /// Prefills of one sequence, `(positions, program)`, fewest positions first.
    pub prefill: Vec<(u64, Program)>,
    /// Decode steps, `(sequences, program)`, one position of each sequence, fewest sequences first.
    pub steps: Vec<(u64, Program)>,
}

impl Generation {
    /// Every program.
    pub fn programs(&self) -> impl Iterator<Item = &Program> {
        let paged = self.paged.iter().flat_map(|p| p.prefill.iter().chain(&p.steps).map(|(_, p)| p));
        std::iter::once(&self.window).chain(paged)
    }

    /// Bytes of each region that runs every program (the largest of them).
    pub fn sizes(&self) -> [u64; crate::lower::Region::COUNT] {
        let mut s = [0; crate::lower::Region::COUNT];
        for p in self.programs() {
            s.iter_mut().zip(p.sizes).for_each(|(a, b)| *a = (*a).max(b));
        }
        s
    }
}

/// The prefill lengths for a window of `seq` positions: powers of two from
/// 16 to 256 (the whole window when it is shorter).
pub fn prefill_chunks(seq: u64) -> Vec<u64> {
    let top = seq.min(256);
    let chunks: Vec<u64> = (4..=8).map(|k| 1u64 << k).filter(|&n| n <= top).collect();
    if chunks.is_empty() { vec![seq] } else { chunks }
}

/// The paging of one sequence at a time over `m`'s window: blocks of the
/// spec's `infer.kv_cache = paged(block)` (16 positions without one; a
/// contiguous cache is one block of the window).
pub fn one_sequence(m: &Model) -> Paging {
    let seq = m.inputs.iter().find(|x| x.name == "tokens").and_then(|x| x.ty.dims.last()).map_or(1, |d| d.size);
    let block = match m.infer.as_ref().map(|i| &i.kv_cache) {
        Some(crate::config::KvCache::Contiguous) => seq,
        Some(crate::config::KvCache::Paged { block }) => *block,
        None => 16,
    };
    Paging::new(block, seq, 1)
}

/// [`compile_generate`] for one sequence at a time ([`one_sequence`]):
/// `m` checked with a microbatch of 1.
pub fn compile_one_sequence(m: &Model, passes: Passes) -> Result<Generation, PassError> {
    compile_generate(std::slice::from_ref(m), one_sequence(m), passes)
}

/// [`Generation`] for the same model checked for several batch sizes
/// (whatever its layout: the weights are the logical ones): `models[0]`,
/// checked for one sequence (`micro_batch = 1`; the runtime's decoder
/// needs it), gives the window, the prefills and the decode step of one
/// sequence; each other model gives the decode step of its batch. All
/// share the cache `paging`.
pub fn compile_generate(models: &[Model], paging: Paging, passes: Passes) -> Result<Generation, PassError> {
    let first = models.first().ok_or_else(|| fail("lowering")("no model to generate from".into()))?;
    let batch =
        |m: &Model| m.inputs.iter().find(|x| x.name == "tokens").and_then(|x| x.ty.dims.first()).map(|d| d.size);
    let one_device = |m: &Model| {
        let mut one = m.clone();
        one.parallel = Parallel::default();
        one
    };
    let lowered = |m: &Model, run| -> Result<Program, String> {
        let p = lower::lower_generate(&one_device(m), run, passes.fuse).map_err(|e| e.message)?;
        if passes.verify {
            lower::verify::verify(&p).map_err(|e| e.to_string())?;
        }
        Ok(p)
    };
    let window = lowered(first, None).map_err(fail("lowering"))?;
    let seq = first.inputs.iter().find(|x| x.name == "tokens").and_then(|x| x.ty.dims.last()).map_or(1, |d| d.size);
    let paged = (|| -> Result<Paged, String> {
        let mut steps = Vec::new();
        for m in models {
            let b = batch(m).unwrap_or(1);
            if !steps.iter().any(|(n, _)| *n == b) {
                steps.push((b, lowered(m, Some((1, paging)))?));
            }
        }
        steps.sort_by_key(|(n, _)| *n);
        let prefill = prefill_chunks(seq)
            .into_iter()
            .map(|n| Ok((n, lowered(first, Some((n, paging)))?)))
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Paged { paging, prefill, steps })
    })();
    // One allocation runs them all: the weights and the cache sit alike.
    let g = Generation { window, paged };
    check_placement(&g)?;
    Ok(g)
}

fn check_placement(g: &Generation) -> Result<(), PassError> {
    use crate::lower::Region;
    let base = &g.window;
    let first_paged = g.paged.as_ref().ok().and_then(|p| p.steps.first()).map(|(_, p)| p);
    for p in g.programs().skip(1) {
        for (reference, regions) in
            [(base, &[Region::Param][..]), (first_paged.unwrap_or(base), &[Region::Param, Region::Cache][..])]
        {
            for b in reference.buffers.iter().filter(|b| b.view_of.is_none() && regions.contains(&b.region)) {
                let same = p.named(&b.name).map(|s| p.buffer(s));
                if same.is_none_or(|s| s.region != b.region || s.offset != b.offset || s.ty != b.ty) {
                    return Err(fail("lowering")(format!(
                        "the generation programs place `{}` unlike each other",
                        b.name
                    )));
                }
            }
        }
    }
    Ok(())
}

/// The forward pass of `m` to its named value `output`, on one device,
/// whatever its layout ([`lower::lower_forward`]).
pub fn compile_forward(m: &Model, output: &str, passes: Passes) -> Result<Program, PassError> {
    let mut one = m.clone();
    one.parallel = Parallel::default();
    let p = lower::lower_forward(&one, output, passes.fuse).map_err(|e| fail("lowering")(e.message))?;
    if passes.verify {
        lower::verify::verify(&p).map_err(|e| fail("lowering")(e.to_string()))?;
    }
    Ok(p)
}

/// The training step of `m`: its backward graph, and every rank's program, lowered.
pub fn compile(m: &Model) -> Result<Compiled, PassError> {
    compile_ranks(m, None)
}

/// [`compile`] for some ranks only (`None`: all, with their collectives
/// cross-checked); `ranks` and `programs` then hold those ranks, in the order given.
pub fn compile_ranks(m: &Model, only: Option<&[u64]>) -> Result<Compiled, PassError> {
    compile_with(m, only, Passes::default())
}

/// The training step of `m` on one device: its forward and backward pass
/// (frozen parameters get no gradient).
fn backward_of(m: &Model) -> Result<Backward, PassError> {
    let loss = m.graph.output("loss").ok_or_else(|| {
        fail("autodiff")(format!(
            "`{}` has no `loss` output to differentiate; assign `loss = ...` in the model",
            m.name
        ))
    })?;
    let frozen: Vec<bool> = m.params.iter().map(|p| p.frozen).collect();
    differentiate_trainable(&m.graph, loss, &frozen).map_err(|e| fail("autodiff")(e.to_string()))
}

/// [`compile_ranks`] with the optional passes chosen.
pub fn compile_with(m: &Model, only: Option<&[u64]>, passes: Passes) -> Result<Compiled, PassError> {
    let verify = passes.verify;
    let backward = backward_of(m)?;
    if verify {
        crate::ir::verify(&backward.graph).map_err(|e| fail("autodiff")(e.to_string()))?;
    }
    let mesh = Mesh::of(m).map_err(|e| fail("sharding")(e.to_string()))?;
    let ranks = match only {
        None => parallel::shard_all(m, &backward),
        Some(rs) => rs.iter().map(|&r| parallel::shard(m, &backward, r)).collect(),
    }
    .map_err(|e| fail("sharding")(e.to_string()))?;
    if verify {
        for r in &ranks {
            let graphs: Vec<&crate::ir::Graph> = match &r.stage {
                None => vec![&r.graph],
                Some(sp) => sp.chunks.iter().flat_map(|c| [&c.forward, &c.backward]).collect(),
            };
            for g in graphs {
                crate::ir::verify(g).map_err(|e| fail("sharding")(format!("rank {}: {e}", r.rank)))?;
            }
        }
        if only.is_none() {
            parallel::check::check(&ranks, &mesh)
                .map_err(|e| fail("sharding")(format!("the per-rank programs disagree: {e}")))?;
        }
    }
    if !passes.lower {
        return Ok(Compiled {
            mesh,
            backward,
            ranks,
            programs: Vec::new(),
            params: m.params.clone(),
            inputs: m.inputs.clone(),
        });
    }
    let programs: Vec<Program> = ranks
        .iter()
        .map(|r| lower::lower(m, r, passes.fuse).map_err(|e| fail("lowering")(e.to_string())))
        .collect::<Result<_, _>>()?;
    if verify {
        for p in &programs {
            lower::verify::verify(p).map_err(|e| fail("lowering")(e.to_string()))?;
        }
    }
    Ok(Compiled { mesh, backward, ranks, programs, params: m.params.clone(), inputs: m.inputs.clone() })
}
