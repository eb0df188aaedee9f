//! Training a compiled model (`driver::Training`): data, the learning-rate schedule, evaluation,
//! atomic checkpoints and exact resume around the compiler's lowered
//! programs, which hold the whole step (microbatches, gradient collectives,
//! clipping, the update) and run on the CPU backend, one thread per rank
//! ([`ranks`]).
//!
//! Determinism: every random choice is a pure function of (seed, step): the
//! windows of a step's batch, its dropout masks. So 10 straight steps and
//! 5 + resume + 5 see the same data and produce the same bits.

pub mod checkpoint;
pub mod data;
pub mod evaluate;
pub mod memory;
pub mod optim;
pub mod ranks;
pub mod reference;
pub mod sharded;
pub mod shards;
pub mod tokenizer;

pub use crate::backend::cpu::Engine;
use crate::exec::param_slice;
use crate::tensor::Tensor;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tessera_compiler::driver::Training;
use tessera_compiler::lower::Bound;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{0}")]
    Setup(String),
    #[error("{0}")]
    Exec(#[from] crate::exec::ExecError),
    #[error("{0}")]
    Io(String),
    /// A loss, gradient or weight that is not finite (nothing was saved).
    #[error("{0}")]
    NonFinite(String),
}

/// How to run (the spec's `train` section says what to train).
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub steps: u64,
    pub out: PathBuf,
    pub resume: Option<PathBuf>,
    pub seed: u64,
    /// Evaluate every this many steps (0: never).
    pub eval_interval: u64,
    pub eval_batches: u64,
    /// Save a checkpoint every this many steps (0: only at the end).
    pub save_interval: u64,
    /// The data file; defaults to the spec's `train.data`.
    pub data: Option<PathBuf>,
    /// The spec and its `--set` overrides, recorded in checkpoints so that
    /// `tessera sample` can rebuild the model; the spec's `data` path is
    /// resolved from its folder.
    pub spec: Option<(PathBuf, Vec<String>)>,
    /// The spec's text where the run holds it in memory (a generated
    /// module's embedded spec): its SHA-256 is recorded, not that of the
    /// file at `spec`, which may have changed since.
    pub spec_text: Option<&'static str>,
    /// Resume even where the run's record (spec, overrides, seed, data,
    /// tokenizer, optimizer) differs from the checkpoint's; the differences
    /// are in [`Trainer::resume_changes`].
    pub allow_changes: bool,
    /// How the CPU backend runs fused kernels (`--backend jit|interp`).
    pub backend: Engine,
    /// The world of processes this one is a rank of (`mpirun`), or `None`:
    /// every rank of the mesh is a thread of this process.
    pub world: Option<crate::comm::ProcessWorld>,
    /// How long a collective waits for the other ranks before the step
    /// fails (the threads' communicator; a process world has its own).
    pub timeout: std::time::Duration,
}

impl RunConfig {
    /// A run into `out` with nothing else chosen: no steps, seed 0, no
    /// evaluation, a checkpoint only at the end, the spec's own data.
    pub fn new(out: impl Into<PathBuf>) -> RunConfig {
        RunConfig {
            steps: 0,
            out: out.into(),
            resume: None,
            seed: 0,
            eval_interval: 0,
            eval_batches: 1,
            save_interval: 0,
            data: None,
            spec: None,
            spec_text: None,
            allow_changes: false,
            backend: Engine::default(),
            world: None,
            timeout: ranks::TIMEOUT,
        }
    }
}

/// One step's report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StepReport {
    pub step: u64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens_per_s: f64,
    /// The step's global batch in sequences (it grows under `batch_rampup`).
    pub batch: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f64>,
    /// Steps skipped so far for a non-finite loss or gradient norm
    /// (`nonfinite = skip`); this step was one of them when `skipped`.
    #[serde(skip_serializing_if = "is_zero")]
    pub skipped_steps: u64,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub skipped: bool,
    /// The loss scale this step ran with (`precision = fp16`); a step whose
    /// gradients overflowed at it is `skipped`, and the next has half of it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss_scale: Option<f64>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

pub struct Trainer {
    /// The driver's result: the step's lowered programs (every rank's), the
    /// evaluation program, the logical parameters and the `train` settings.
    pub training: Training,
    pub step: u64,
    /// What feeds the inputs of `tessera train`'s steps; `None` for a model
    /// whose inputs the data does not feed (its caller feeds every step,
    /// [`Trainer::train_step_on`]).
    pub data: Option<data::Dataset>,
    pub cfg: RunConfig,
    /// Microbatches per optimizer step (data-parallel ranks × gradient
    /// accumulation) of the current global batch.
    pub accumulation: u64,
    /// The global batch (sequences) `training.step` runs: the spec's, or a
    /// smaller one of its ramp-up (`training.ramp` holds the others).
    pub batch: u64,
    /// Spans of the first steps for a Chrome trace (`tessera train --trace`).
    pub trace: Option<std::sync::Arc<crate::trace::Trace>>,
    /// Every rank of the mesh (one on a single device) with its program and
    /// its backend; they hold the weights and the optimizer state
    /// ([`Trainer::state`] assembles the logical tensors).
    pub ranks: ranks::Ranks,
    /// Steps skipped for a non-finite loss or gradient norm (`nonfinite =
    /// skip`, or an overflow under fp16's loss scaling).
    pub skipped_steps: u64,
    /// Dynamic loss scaling, under `precision = fp16`.
    pub scaler: Option<optim::LossScaler>,
    /// The evaluation program, compiled at the first evaluation.
    evaluator: std::sync::Mutex<Option<evaluate::Evaluator>>,
    /// What this run is (recorded in its checkpoints).
    pub run: checkpoint::RunRecord,
    /// How a resume differs from the checkpoint's run (`allow_changes`).
    pub resume_changes: Vec<String>,
    /// The checkpoint being written in the background, if any.
    saving: std::sync::Mutex<Option<Saving>>,
    /// What this process read of the sharded checkpoint it resumed from.
    pub resumed_pieces: Option<sharded::Reads>,
}

/// A checkpoint being written in the background.
enum Saving {
    /// One file of logical tensors, by this process.
    Logical(std::thread::JoinHandle<Result<PathBuf, TrainError>>),
    /// This process's files of a sharded checkpoint; once every rank's are
    /// on disk, rank 0 commits the manifest.
    Sharded {
        files: std::thread::JoinHandle<Result<(), TrainError>>,
        tmp: PathBuf,
        step: u64,
        manifest: sharded::Manifest,
        state: serde_json::Value,
    },
}

/// `tokens`, `images` and `targets` for a model's inputs.
fn input_names(inputs: &[tessera_compiler::model::Input]) -> String {
    inputs.iter().map(|i| format!("`{}`", i.name)).collect::<Vec<_>>().join(", ")
}

/// Whether data can feed a model with these inputs: `targets`, and `tokens`
/// or `images`.
fn fed_by_data(inputs: &[tessera_compiler::model::Input]) -> bool {
    let has = |n: &str| inputs.iter().any(|i| i.name == n);
    has("targets") && (has("tokens") || has("images"))
}

/// Open the data of `tessera train` for a model with `tokens` and `targets`:
/// a token stream for a language model, labelled examples for a classifier.
fn open_data(training: &Training, cfg: &RunConfig) -> Result<data::Dataset, TrainError> {
    let train = &training.train;
    let inputs = &training.step.inputs;
    let find = |n: &str| inputs.iter().position(|i| i.name == n);
    let (Some(targets_idx), true) = (find("targets"), fed_by_data(inputs)) else {
        return Err(TrainError::Setup(format!(
            "`tessera train` feeds a model's inputs `tokens` [batch, seq] or `images` [batch, ...], and `targets` \
             (the next tokens [batch, seq], or a label per example [batch]); this model's inputs are {}. Drop the \
             data setting and feed the inputs from code (`Trainer::train_step_on`)",
            input_names(inputs)
        )));
    };
    let vocab = training.vocab.unwrap_or(256);
    let path = match (&cfg.data, &train.data) {
        (Some(p), _) => p.clone(),
        (None, Some(d)) => data::resolve(d, cfg.spec.as_ref().map(|(p, _)| p.as_path()))?,
        (None, None) => {
            return Err(TrainError::Setup(
                "no training data: set `data = \"path\"` in the `train` section or pass --data".into(),
            ));
        }
    };
    let tok = tokenizer::Tokenizer::by_name(train.tokenizer.as_deref())?;
    let data = data::Dataset::open(&path, train.val_fraction.unwrap_or(0.1), vocab, &tok)?;
    let seq = find("tokens").and_then(|k| inputs[k].ty.dims.last()).map_or(1, |d| d.size as usize);
    data.check_windows(seq)?;
    // A token stream feeds language models (tokens and next tokens);
    // labelled examples feed classifiers (a label per example).
    let labelled = data.examples(data::Split::Train).is_some();
    let per_example = inputs[targets_idx].ty.dims.len() == 1;
    if labelled != per_example {
        return Err(TrainError::Setup(format!(
            "the model's `targets` is {}, but the data `{}` is {}: a language model ([batch, seq] targets) trains \
             on text or token ids, a classifier ([batch] targets) on labelled examples (a .jsonl of \
             {{\"text\", \"label\"}} or {{\"pixels\", \"label\"}})",
            inputs[targets_idx].ty,
            path.display(),
            if labelled { "labelled examples" } else { "a token stream" }
        )));
    }
    if !labelled && inputs.len() != 2 {
        return Err(TrainError::Setup(
            "a language model trains on `tokens` and `targets` only; this model has other inputs".into(),
        ));
    }
    if let Some(k) = find("images") {
        let batch = inputs[k].ty.dims.first().map_or(1, |d| d.size.max(1));
        data.check_pixels((inputs[k].ty.numel() / batch) as usize)?;
    }
    Ok(data)
}

impl Trainer {
    /// A run of `training` (from `driver::compile_training`) as `cfg` says.
    pub fn new(training: Training, cfg: RunConfig) -> Result<Trainer, TrainError> {
        let train = training.train.clone();
        let configured = cfg.data.is_some() || train.data.is_some();
        // A model whose inputs the data does not feed (two towers) trains on
        // what its caller feeds (`Trainer::train_step_on`).
        let data =
            if fed_by_data(&training.step.inputs) || configured { Some(open_data(&training, &cfg)?) } else { None };
        let micro = training.micro_batch;
        let accumulation = (train.batch / micro.max(1)).max(1);
        let run = checkpoint::RunRecord {
            spec: cfg.spec.as_ref().map(|(p, _)| p.to_string_lossy().into_owned()),
            spec_sha256: match cfg.spec_text {
                Some(text) => Some(checkpoint::sha256_hex(text.as_bytes())),
                None => cfg.spec.as_ref().and_then(|(p, _)| std::fs::read(p).ok()).map(|t| checkpoint::sha256_hex(&t)),
            },
            overrides: cfg.spec.as_ref().map(|(_, o)| o.clone()).unwrap_or_default(),
            seed: cfg.seed,
            data: data.as_ref().map(|d| d.path.to_string_lossy().into_owned()).unwrap_or_default(),
            data_sha256: data.as_ref().map(|d| d.sha256.clone()).unwrap_or_default(),
            tokenizer: train.tokenizer.clone().unwrap_or_else(|| "bytes".into()),
            optimizer: serde_json::to_value(&train.optimizer).unwrap_or_default(),
        };
        // From a checkpoint, or from the initializers; the ranks are started once.
        let fp16 = train.precision == tessera_compiler::config::Precision::Fp16;
        let fresh_scaler = fp16.then(|| optim::LossScaler::new(&train.loss_scale));
        let mut reads = None;
        let sharded_resume = match (&cfg.resume, &cfg.world) {
            (Some(dir), Some(_)) => Some(checkpoint::resolve(dir)?).filter(|d| sharded::is_sharded(d)),
            _ => None,
        };
        let (ranks, step, resume_changes, scaler, skipped_steps) = match (&cfg.resume, sharded_resume) {
            // Ranks that are processes read only their pieces of a sharded checkpoint.
            (Some(dir), Some(at)) => {
                let (changes, fresh_optimizer) = resume_changes(dir, &run, cfg.allow_changes)?;
                let (step, saved_scaler, skipped) = checkpoint::progress(&at, &checkpoint::state_of(&at)?)?;
                let scaler = if fp16 { saved_scaler.or(fresh_scaler) } else { None };
                let reader = std::sync::Mutex::new(sharded::Reader::open(&at)?);
                let start = ranks::Start::Sharded { reader: &reader, moments: !fresh_optimizer };
                let ranks = start_ranks(&training, start, &cfg)?;
                reads = reader.into_inner().ok().map(|r| r.reads);
                (ranks, step, changes, scaler, skipped)
            }
            (Some(dir), None) => {
                let (params, opt, step, changes) = resume(dir, &training, &run, cfg.allow_changes)?;
                let scaler = if fp16 { opt.scaler.or(fresh_scaler) } else { None };
                let ranks = start_ranks(&training, ranks::Start::State(&params, &opt), &cfg)?;
                (ranks, step, changes, scaler, opt.skipped)
            }
            (None, _) => {
                let ranks = start_ranks(&training, ranks::Start::Init { seed: cfg.seed }, &cfg)?;
                (ranks, 0, Vec::new(), fresh_scaler, 0)
            }
        };
        Ok(Trainer {
            training,
            step,
            data,
            cfg,
            accumulation,
            batch: train.batch,
            ranks,
            trace: None,
            skipped_steps,
            scaler,
            evaluator: std::sync::Mutex::new(None),
            run,
            resume_changes,
            saving: std::sync::Mutex::new(None),
            resumed_pieces: reads,
        })
    }

    /// Positions per example: the `tokens` input's last dim, or 1 for a model
    /// without one (a token amount of its schedule then counts examples).
    pub fn seq(&self) -> usize {
        let inputs = &self.training.step.inputs;
        inputs.iter().find(|i| i.name == "tokens").and_then(|i| i.ty.dims.last()).map_or(1, |d| d.size as usize)
    }

    /// The dataset, or an error for a model whose inputs it does not feed.
    pub fn dataset(&self) -> Result<&data::Dataset, TrainError> {
        self.data.as_ref().ok_or_else(|| {
            TrainError::Setup(format!(
                "nothing feeds this model's inputs ({}): `tessera train`'s data feeds `tokens` and `targets` only; \
                 feed other inputs from code with `Trainer::train_step_on`",
                input_names(&self.training.step.inputs)
            ))
        })
    }

    /// Global microbatch `micro` of step `step` from the dataset.
    pub fn batch_inputs(&self, split: data::Split, step: u64, micro: u64) -> Result<Vec<Tensor<f32>>, TrainError> {
        Ok(self.dataset()?.batch(split, &self.training.step.inputs, self.cfg.seed, step, micro))
    }

    /// A classifier's accuracy on the whole validation split of labelled
    /// examples: the fraction whose largest logit is their label, from the
    /// model's forward program to `logits` (`[batch, classes]`) with the
    /// current weights; `None` for a token stream or a model without such
    /// logits. `m` is the model checked as it trains (its microbatch).
    pub fn val_accuracy(&self, m: &tessera_compiler::Model) -> Result<Option<(usize, usize)>, TrainError> {
        let Some(val) = self.data.as_ref().and_then(|d| d.examples(data::Split::Val)) else { return Ok(None) };
        // A validation batch means what a training batch means (batch statistics).
        let m = m.whole_batch.as_deref().unwrap_or(m);
        let Some(logits) = m.graph.output("logits").map(|v| m.graph.ty(v).clone()) else { return Ok(None) };
        if logits.dims.len() != 2 {
            return Ok(None);
        }
        let weights = self.weights()?;
        let mut f = crate::infer::Forward::new(m, "logits", &weights).map_err(|e| TrainError::Setup(e.to_string()))?;
        let (batch, classes) = (logits.dims[0].size as usize, logits.dims[1].size as usize);
        let mut correct = 0;
        for micro in 0..val.len().div_ceil(batch) as u64 {
            let inputs = self.dataset()?.batch(data::Split::Val, &m.inputs, self.cfg.seed, 0, micro);
            let out = f.run(&inputs).map_err(|e| TrainError::Setup(e.to_string()))?;
            for b in 0..batch {
                let k = micro as usize * batch + b;
                let Some(e) = val.get(k) else { break };
                let row = &out.data[b * classes..(b + 1) * classes];
                let best = row.iter().enumerate().fold(0, |best, (i, x)| if *x > row[best] { i } else { best });
                correct += usize::from(best as u32 == e.label);
            }
        }
        Ok(Some((correct, val.len())))
    }

    /// Tokens of one optimizer step.
    pub fn tokens_per_step(&self) -> u64 {
        self.training.micro_batch * self.seq() as u64 * self.accumulation
    }

    /// The logical weights and optimizer state, assembled from the ranks' buffers.
    pub fn state(&self) -> Result<(Vec<Tensor<f32>>, optim::OptimizerState), TrainError> {
        let (params, mut opt) = self.ranks.logical(&self.training.step).map_err(TrainError::Setup)?;
        opt.scaler = self.scaler;
        opt.skipped = self.skipped_steps;
        Ok((params, opt))
    }

    /// The current logical weights, assembled from the ranks' buffers.
    pub fn weights(&self) -> Result<Vec<Tensor<f32>>, TrainError> {
        self.ranks.weights(&self.training.step).map_err(TrainError::Setup)
    }

    /// Start the ranks from these logical weights, keeping the optimizer state.
    pub fn set_weights(&mut self, params: &[Tensor<f32>]) -> Result<(), TrainError> {
        let (_, opt) = self.state()?;
        self.ranks = start_ranks(&self.training, ranks::Start::State(params, &opt), &self.cfg)?;
        Ok(())
    }

    /// One optimizer step: every rank runs its program (forward and backward
    /// over its microbatches, the gradient collectives, clipping, the update).
    pub fn train_step(&mut self) -> Result<StepReport, TrainError> {
        self.use_step_batch()?;
        let batches: Vec<Vec<Tensor<f32>>> = (0..self.accumulation)
            .map(|k| self.batch_inputs(data::Split::Train, self.step, k))
            .collect::<Result<_, _>>()?;
        self.train_step_on(&|k| batches[k as usize].clone())
    }

    /// Run the next step's program, of its global batch (under a ramp-up,
    /// the batch grows between steps): the ranks restart with its programs
    /// from the logical weights and optimizer state, as a checkpoint moves
    /// between layouts. [`Trainer::train_step_on`] calls it first.
    pub fn use_step_batch(&mut self) -> Result<(), TrainError> {
        self.use_batch(self.training.train.batch_at(self.step).0)
    }

    /// Microbatches of step `step`'s global batch (it grows under `batch_rampup`).
    pub fn accumulation_at(&self, step: u64) -> u64 {
        (self.training.train.batch_at(step).0 / self.training.micro_batch.max(1)).max(1)
    }

    /// Run the step program of global batch `batch`, as [`Trainer::use_step_batch`] does for the next step.
    pub fn use_batch(&mut self, batch: u64) -> Result<(), TrainError> {
        if batch == self.batch {
            return Ok(());
        }
        let Some(at) = self.training.ramp.iter().position(|(b, _)| *b == batch) else {
            return Err(TrainError::Setup(format!("no step program for a global batch of {batch} sequences")));
        };
        let (params, opt) = self.state()?;
        std::mem::swap(&mut self.training.step, &mut self.training.ramp[at].1);
        self.training.ramp[at].0 = self.batch;
        self.batch = batch;
        self.accumulation = (batch / self.training.micro_batch.max(1)).max(1);
        self.ranks = start_ranks(&self.training, ranks::Start::State(&params, &opt), &self.cfg)?;
        Ok(())
    }

    /// [`Trainer::train_step`] on the caller's batch: `inputs(k)` is global
    /// microbatch `k` of the step (of [`Trainer::accumulation`]), one tensor
    /// per model input.
    pub fn train_step_on(
        &mut self,
        inputs: &(dyn Fn(u64) -> Vec<Tensor<f32>> + Sync),
    ) -> Result<StepReport, TrainError> {
        let t0 = Instant::now();
        self.use_step_batch()?;
        let step = self.step;
        let lr = optim::learning_rate(&self.training.train, step, self.seq() as u64, self.cfg.steps);
        let trace = self.trace.as_deref().filter(|t| step < t.steps);
        let loss_scale = self.scaler.map(|s| s.scale);
        let args = ranks::StepArgs {
            updates: step - self.skipped_steps,
            loss_scale: loss_scale.unwrap_or(1.0) as f32,
            ..ranks::StepArgs::new(step, self.cfg.seed, lr)
        };
        let out = self.ranks.step(args, inputs, trace).map_err(TrainError::Setup)?;
        // Ranks that share a data coordinate report the same loss (the last
        // pipeline stage reports it): the mean over the reports is the step's.
        let loss = ranks::step_loss(&out).ok_or_else(|| TrainError::Setup("no rank computed the loss".into()))?;
        let grad_norm = out[0].grad_norm;
        if let Some(k) = out.iter().find_map(|s| s.nonfinite_param) {
            return Err(self.weights_went_nonfinite(step, &self.training.step.params[k].path, lr));
        }
        // Under loss scaling, gradients that overflow (with a finite loss)
        // skip the step (the program's guard) and halve the scale.
        let overflowed = self.scaler.is_some() && loss.is_finite() && !grad_norm.is_finite() && !out[0].updated;
        if let Some(s) = &mut self.scaler {
            s.update(overflowed, &self.training.train.loss_scale).map_err(|scale| {
                TrainError::NonFinite(format!(
                    "step {}: the gradients are not finite even at loss scale {scale}, though the loss ({loss}) \
                     is. Training stopped; nothing was saved for this run since the last checkpoint.\n  help: \
                     lower the learning rate, set `clip = 1.0` in `train`, or train in `bf16`, whose range is f32's",
                    step + 1
                ))
            })?;
        }
        let skipped = if overflowed {
            self.skipped_steps += 1;
            true
        } else {
            let first_bad_grad =
                if loss.is_finite() && grad_norm.is_finite() { None } else { self.first_nonfinite_grad() };
            self.check_finite(step, loss, grad_norm, out[0].updated, first_bad_grad)?
        };
        self.step += 1;
        self.commit_when_written()?;
        let secs = t0.elapsed().as_secs_f64().max(1e-9);
        Ok(StepReport {
            step: self.step,
            loss,
            lr,
            grad_norm,
            tokens_per_s: self.tokens_per_step() as f64 / secs,
            batch: self.batch,
            val_loss: None,
            skipped_steps: self.skipped_steps,
            skipped,
            loss_scale,
        })
    }

    /// The path of the first parameter whose gradient (on any rank) holds a non-finite value.
    fn first_nonfinite_grad(&self) -> Option<String> {
        let c = &self.training.step;
        let bad = self.ranks.nonfinite(c.params.len(), Bound::Grad).ok()?;
        bad.iter().position(|&b| b).map(|k| c.params[k].path.clone())
    }

    /// Whether this process writes the run's files: the only one, or rank 0
    /// of a world of processes.
    pub fn is_writer(&self) -> bool {
        self.ranks.world().is_none_or(|w| w.rank() == 0)
    }

    /// A step whose loss or gradient norm is not finite: an error, or (with
    /// `nonfinite = skip`) true, the step counted as skipped. `updated` says
    /// whether the weights moved (they must not have, for a skip).
    fn check_finite(
        &mut self,
        step: u64,
        loss: f64,
        grad_norm: f64,
        updated: bool,
        first_bad_grad: Option<String>,
    ) -> Result<bool, TrainError> {
        if loss.is_finite() && grad_norm.is_finite() {
            return Ok(false);
        }
        let skip = self.training.train.skip_nonfinite;
        if skip && !updated {
            self.skipped_steps += 1;
            return Ok(true);
        }
        let grad = first_bad_grad.map(|p| format!("; the first non-finite gradient is `{p}`")).unwrap_or_default();
        Err(TrainError::NonFinite(format!(
            "step {}: the loss is {loss} and the gradient norm {grad_norm}{grad}. Training stopped; nothing was \
             saved for this run since the last checkpoint, and `latest` still names it.\n  help: lower the \
             learning rate, set `clip = 1.0` in `train`, or set `nonfinite = skip` in `train` to skip such steps",
            step + 1
        )))
    }

    fn weights_went_nonfinite(&self, step: u64, path: &str, lr: f64) -> TrainError {
        TrainError::NonFinite(format!(
            "step {}: parameter `{path}` holds a non-finite value after the update (learning rate {lr:e}). \
             Training stopped; nothing was saved for this run since the last checkpoint.\n  help: lower the \
             learning rate or set `clip = 1.0` in `train`",
            step + 1
        ))
    }

    /// The mean gradients of the next step at the current weights, from the
    /// reference evaluator ([`reference::gradients`]; tests use them as the oracle).
    pub fn reference_gradients(&self) -> Result<Vec<Tensor<f32>>, TrainError> {
        let step = self.step;
        let data = self.dataset()?;
        let inputs = |k: u64| data.batch(data::Split::Train, &self.training.step.inputs, self.cfg.seed, step, k);
        let dropout = Some(self.cfg.seed ^ (step << 20));
        let (_, g) = reference::gradients(&self.training.step, &self.weights()?, dropout, self.accumulation, &inputs)?;
        Ok(g)
    }

    /// Mean loss over `batches` validation batches of the global batch size
    /// (fixed windows: comparable across steps, and the same sequences under
    /// any microbatch size or layout).
    pub fn evaluate(&self, batches: u64) -> Result<f64, TrainError> {
        let weights = self.weights()?;
        let mut slot = self.evaluator.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            let e = evaluate::Evaluator::new(&self.training, self.cfg.backend)
                .map_err(|e| TrainError::Setup(format!("cannot start the evaluation: {e}")))?;
            *slot = Some(e);
        }
        let ev = slot.as_mut().expect("set above");
        ev.load(&weights).map_err(TrainError::Setup)?;
        drop(weights);
        // The evaluation microbatch is the training one, or, for a model
        // whose examples meet across a data-parallel batch, the group's.
        let rows = self.training.eval_inputs.first().and_then(|x| x.ty.dims.first()).map_or(1, |d| d.size.max(1));
        let n = (batches.max(1) * self.accumulation * self.training.micro_batch).div_ceil(rows);
        let data = self.dataset()?;
        let mut total = 0.0;
        for k in 0..n {
            let inputs = data.batch(data::Split::Val, &self.training.eval_inputs, self.cfg.seed, u64::MAX - 1, k);
            total += ev.loss(&inputs).map_err(TrainError::Setup)?;
        }
        let mean = total / n as f64;
        if !mean.is_finite() {
            return Err(TrainError::NonFinite(format!(
                "the validation loss at step {} is {mean}: the weights themselves give non-finite values. Training \
                 stopped; nothing was saved since the last checkpoint.\n  help: lower the learning rate or set \
                 `clip = 1.0` in `train`",
                self.step
            )));
        }
        Ok(mean)
    }

    /// Write the Chrome trace recorded so far to `path`, one track per rank.
    pub fn write_trace(&self, path: &Path) -> Result<(), TrainError> {
        let Some(t) = &self.trace else { return Ok(()) };
        let names: Vec<String> = match self.training.step.ranks.as_slice() {
            [_] => vec!["rank 0 (single device)".into()],
            ranks => ranks
                .iter()
                .map(|p| {
                    let c: Vec<String> = p.coords.iter().map(|(a, c)| format!("{a} {c}")).collect();
                    format!("rank {} ({})", p.rank, c.join(", "))
                })
                .collect(),
        };
        t.write(path, &names).map_err(|e| TrainError::Io(format!("{}: {e}", path.display())))
    }

    /// Save a checkpoint under `out`, atomically (logical tensors, whatever
    /// the layout), and wait until it is written. Weights that are not
    /// finite are never saved. Across processes every rank takes part in
    /// assembling the state, and rank 0 writes it.
    pub fn save(&self) -> Result<PathBuf, TrainError> {
        let dest = self.save_in_background()?;
        self.finish_saving()?;
        Ok(dest)
    }

    /// [`Trainer::save`], written in the background: the caller waits only
    /// for the state to be copied to host memory (and for the previous
    /// save, if it is still being written), and trains on while the files
    /// are written; [`Trainer::finish_saving`] waits for them. A write cut
    /// short leaves the previous checkpoint the latest.
    ///
    /// One process writes one file of logical tensors. Ranks that are
    /// processes write a sharded checkpoint: each rank its own pieces, in
    /// parallel, and rank 0 the manifest once every rank's file is on disk
    /// (at the next save, or at [`Trainer::finish_saving`]).
    pub fn save_in_background(&self) -> Result<PathBuf, TrainError> {
        self.finish_saving()?;
        if let Some(w) = self.ranks.world() {
            return self.save_sharded(w);
        }
        let (params, opt) = self.state()?;
        if let Some(k) = params.iter().position(|p| !p.is_finite()) {
            return Err(self.nonfinite_weights(k));
        }
        let dest = checkpoint::step_dir(&self.cfg.out, self.step);
        let snapshot = checkpoint::Snapshot::new(&self.training, params, opt, self.step, Some(&self.run));
        let out = self.cfg.out.clone();
        let handle = std::thread::Builder::new()
            .name("tessera-save".into())
            .spawn(move || snapshot.write(&out))
            .map_err(|e| TrainError::Io(format!("cannot start the thread that writes the checkpoint: {e}")))?;
        *self.saving.lock().unwrap_or_else(|e| e.into_inner()) = Some(Saving::Logical(handle));
        Ok(dest)
    }

    fn nonfinite_weights(&self, k: usize) -> TrainError {
        TrainError::NonFinite(format!(
            "parameter `{}` holds a non-finite value at step {}; no checkpoint was written",
            self.training.step.params[k].path, self.step
        ))
    }

    /// This process's part of a sharded checkpoint (every rank calls it at the same step).
    fn save_sharded(&self, w: &crate::comm::ProcessWorld) -> Result<PathBuf, TrainError> {
        let c = &self.training.step;
        let comm_err = |e: crate::comm::CommError| TrainError::Io(e.to_string());
        let bad = self.ranks.nonfinite(c.params.len(), Bound::Weight).map_err(TrainError::Setup)?;
        if let Some(k) = bad.iter().position(|&b| b) {
            return Err(self.nonfinite_weights(k));
        }
        let tmp = self.cfg.out.join(format!(".tmp-step-{:08}-shards", self.step));
        let made = match self.is_writer() {
            true => {
                let _ = std::fs::remove_dir_all(&tmp);
                std::fs::create_dir_all(&tmp).map(|_| 0.0).unwrap_or(1.0)
            }
            false => 0.0,
        };
        // Every rank learns whether rank 0 made the folder before writing into it.
        let mut flag = [made];
        w.lock().all_reduce(&w.everyone(), &mut flag, crate::comm::ReduceOp::Max).map_err(comm_err)?;
        if flag[0] != 0.0 {
            return Err(TrainError::Io(format!("rank 0 cannot create `{}`", tmp.display())));
        }
        let (manifest, writes) = sharded::plan(c, Some(&self.training.train.optimizer));
        let files = self.ranks.pieces(&writes).map_err(TrainError::Setup)?;
        let dir = tmp.clone();
        let handle = std::thread::Builder::new()
            .name("tessera-save".into())
            .spawn(move || files.iter().try_for_each(|(f, named)| sharded::write_file(&dir, f, named)))
            .map_err(|e| TrainError::Io(format!("cannot start the thread that writes the checkpoint: {e}")))?;
        let meta = optim::OptimizerState {
            state: Vec::new(),
            optimizer: self.training.train.optimizer.clone(),
            scaler: self.scaler,
            skipped: self.skipped_steps,
        };
        let state = checkpoint::state_json(&self.training, &meta, self.step, Some(&self.run), "sharded");
        *self.saving.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(Saving::Sharded { files: handle, tmp, step: self.step, manifest, state });
        Ok(checkpoint::step_dir(&self.cfg.out, self.step))
    }

    /// After a step: commit a sharded checkpoint as soon as every rank's
    /// files are on disk (the ranks agree on it with one small all-reduce
    /// per step while a save is pending), so that it becomes the latest
    /// without waiting for the next save.
    fn commit_when_written(&self) -> Result<(), TrainError> {
        let written = match &*self.saving.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(Saving::Sharded { files, .. }) => files.is_finished(),
            _ => return Ok(()),
        };
        let Some(w) = self.ranks.world() else { return Ok(()) };
        let mut all = [if written { 1.0 } else { 0.0 }];
        w.lock()
            .all_reduce(&w.everyone(), &mut all, crate::comm::ReduceOp::Min)
            .map_err(|e| TrainError::Io(e.to_string()))?;
        if all[0] == 1.0 {
            self.finish_saving()?;
        }
        Ok(())
    }

    /// Wait for the checkpoint being written in the background, if any: its
    /// folder, or the error that stopped it. For a sharded checkpoint every
    /// rank calls it at the same point: the ranks agree that every file is
    /// on disk, and rank 0 commits the manifest.
    pub fn finish_saving(&self) -> Result<Option<PathBuf>, TrainError> {
        let pending = self.saving.lock().unwrap_or_else(|e| e.into_inner()).take();
        match pending {
            None => Ok(None),
            Some(Saving::Logical(h)) => joined(h).map(Some),
            Some(Saving::Sharded { files, tmp, step, manifest, state }) => {
                let mine = joined(files);
                let mut failed = [if mine.is_err() { 1.0 } else { 0.0 }];
                if let Some(w) = self.ranks.world() {
                    w.lock()
                        .all_reduce(&w.everyone(), &mut failed, crate::comm::ReduceOp::Max)
                        .map_err(|e| TrainError::Io(e.to_string()))?;
                }
                mine?;
                if failed[0] != 0.0 {
                    return Err(TrainError::Io(format!(
                        "another rank could not write its part of the checkpoint of step {step}; `latest` still names \
                         the previous one"
                    )));
                }
                match self.is_writer() {
                    true => sharded::commit(&self.cfg.out, &tmp, step, &manifest, &state).map(Some),
                    false => Ok(Some(checkpoint::step_dir(&self.cfg.out, step))),
                }
            }
        }
    }

    /// The per-layer slice of a parameter (for inspection and sampling).
    pub fn param(&self, index: usize, layer: Option<u64>) -> Result<Option<Tensor<f32>>, TrainError> {
        Ok(param_slice(&self.training.step.params[index], &self.weights()?[index], layer))
    }
}

/// A checkpoint of the same run: its weights, optimizer state and step, and
/// how its run differs from `run`. The record must match unless
/// `allow_changes`; another kind of optimizer starts from fresh state.
type Resumed = (Vec<Tensor<f32>>, optim::OptimizerState, u64, Vec<String>);

/// How a resume from `dir` changes the run (refused unless `allow_changes`),
/// and whether the optimizer state starts afresh.
fn resume_changes(
    dir: &Path,
    run: &checkpoint::RunRecord,
    allow_changes: bool,
) -> Result<(Vec<String>, bool), TrainError> {
    let then = checkpoint::run_of(dir)?;
    let mut changes = Vec::new();
    let mut fresh_optimizer = false;
    match &then {
        Some(then) => {
            changes = run.changes_from(then);
            fresh_optimizer = run.optimizer_kind_changed(then);
            if fresh_optimizer {
                changes.push(
                    "the optimizer state starts afresh: the checkpoint's moments belong to another optimizer".into(),
                );
            }
        }
        None => changes.push(
            "the checkpoint records no run (spec, seed, data): it was written by an older `tessera train`".into(),
        ),
    }
    if !changes.is_empty() && !allow_changes {
        return Err(TrainError::Setup(format!(
            "resuming from `{}` would not continue the same run:\n  - {}\n  help: resume with the run's own \
             settings (leave out --seed/--data to use the recorded ones), or pass --allow-changes to resume \
             anyway (the changes are logged)",
            dir.display(),
            changes.join("\n  - ")
        )));
    }
    Ok((changes, fresh_optimizer))
}

fn resume(dir: &Path, t: &Training, run: &checkpoint::RunRecord, allow_changes: bool) -> Result<Resumed, TrainError> {
    let (changes, fresh_optimizer) = resume_changes(dir, run, allow_changes)?;
    let fresh = optim::OptimizerState::new(&t.step.params, &t.train.optimizer);
    let (params, opt, step) = checkpoint::load(dir, &t.step.params, &fresh, fresh_optimizer)?;
    Ok((params, opt, step, changes))
}

/// Every local rank's backend, holding its part of the logical weights and optimizer state.
fn start_ranks(t: &Training, start: ranks::Start<'_>, cfg: &RunConfig) -> Result<ranks::Ranks, TrainError> {
    ranks::Ranks::new(&t.step, start, &t.train.optimizer, cfg.backend, cfg.world.as_ref())
        .map(|r| r.with_timeout(cfg.timeout))
        .map_err(|e| TrainError::Setup(format!("cannot start the ranks: {e}")))
}

/// The result of a thread that wrote (part of) a checkpoint.
fn joined<T>(h: std::thread::JoinHandle<Result<T, TrainError>>) -> Result<T, TrainError> {
    match h.join() {
        Ok(r) => r,
        Err(_) => Err(TrainError::Io("the thread that wrote the checkpoint panicked".into())),
    }
}

impl Drop for Trainer {
    /// A checkpoint still being written by this process is finished, not
    /// lost. (A sharded one is committed only by `finish_saving`, which every
    /// rank calls together; here its files are only waited for.)
    fn drop(&mut self) {
        match self.saving.lock().unwrap_or_else(|e| e.into_inner()).take() {
            Some(Saving::Logical(h)) => {
                let _ = h.join();
            }
            Some(Saving::Sharded { files, .. }) => {
                let _ = files.join();
            }
            None => {}
        }
    }
}
