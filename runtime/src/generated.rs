//! What a generated module runs on (`tessera::spec!`, `tessera_build`,
//! `cargo tessera build`: the Rust emitter, `tessera_compiler::codegen`).
//!
//! A generated module carries its spec (the text of the spec and of every
//! file it uses, embedded at build time) and its fused kernels as Rust
//! functions that rustc compiled with the user's crate ([`Spec`]). At run
//! time the spec goes through the same compiler driver as `tessera train`,
//! and the lowered programs run on the CPU backend with the module's
//! kernels ([`Engine::Native`]): one execution path for the CLI and for
//! generated code, so a checkpoint moves between them. Every kernel of the
//! programs must be among the module's; one that is not (the spec or
//! Tessera changed since the module was generated) is an error that says to
//! rebuild, before anything runs.

pub use crate::backend::cpu::Engine;
pub use crate::backend::native::{Kernels, NativeKernel, Segment, f};
pub use crate::infer::{Generator, SampleConfig, SampleError};
pub use crate::tensor::Tensor as RawTensor;
use crate::train::checkpoint;
pub use crate::train::data::Split;
pub use crate::train::evaluate::Evaluator;
pub use crate::train::{RunConfig, StepReport, TrainError, Trainer};
use std::path::Path;
use tessera_compiler::driver::{self, Training};
use tessera_compiler::{Model, Options, SourceMap};

/// A tensor of f32 elements (token ids and other integers as their f32 values).
pub type Tensor = crate::tensor::Tensor<f32>;

/// An error of a generated module: a spec that no longer checks, a
/// checkpoint that does not fit, a failed step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error(pub String);

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

impl From<String> for Error {
    fn from(s: String) -> Error {
        Error(s)
    }
}

impl From<TrainError> for Error {
    fn from(e: TrainError) -> Error {
        Error(e.to_string())
    }
}

impl From<crate::weights::WeightsError> for Error {
    fn from(e: crate::weights::WeightsError) -> Error {
        Error(e.to_string())
    }
}

impl From<SampleError> for Error {
    fn from(e: SampleError) -> Error {
        Error(e.to_string())
    }
}

/// The spec of a generated module, embedded in it.
pub struct Spec {
    /// The model's name.
    pub model: &'static str,
    /// Where the root spec was read from at build time (checkpoints record
    /// it, and the spec's `data` path resolves from its folder).
    pub path: &'static str,
    /// The root spec and every file it uses: (path read from, text).
    pub files: &'static [(&'static str, &'static str)],
    /// The `set { .. }` overrides, as `--set` takes them.
    pub overrides: &'static [&'static str],
    /// The model chosen from the file, if not its last.
    pub choose: Option<&'static str>,
    /// The module's kernels.
    pub kernels: &'static [NativeKernel],
}

impl Spec {
    /// The CPU backend's engine for the module's kernels.
    pub fn engine(&self) -> Engine {
        Engine::Native(Kernels(self.kernels))
    }

    /// The checked model (`micro_batch`: force the microbatch, 1 for generation).
    pub fn check(&self, micro_batch: Option<u64>) -> Result<Model, Error> {
        let mut sources = SourceMap::new();
        let opts = Options {
            overrides: self.overrides.iter().map(|s| s.to_string()).collect(),
            model: self.choose.map(String::from),
            micro_batch,
        };
        tessera_compiler::check_embedded(&mut sources, self.files, &opts)
            .map_err(|d| Error(tessera_compiler::diag::render(&sources, &d.0)))
    }

    /// The training the driver compiles from the spec (as `tessera train`).
    pub fn training(&self) -> Result<Training, Error> {
        driver::compile_training(&self.check(None)?, None).map_err(|e| Error(e.to_string()))
    }

    /// A run into `out` that records this spec (and its overrides), runs
    /// the module's kernels, and takes the spec's `train.seed` and length
    /// in steps (100 without one), as `tessera train` does; the rest as
    /// [`RunConfig::new`]. The length shapes a learning-rate schedule that
    /// decays over the run.
    pub fn run_config(&self, out: impl Into<std::path::PathBuf>) -> RunConfig {
        let overrides = self.overrides.iter().map(|s| s.to_string()).collect();
        // A spec that no longer checks fails when the trainer starts, with its diagnostics.
        let train = self.check(None).ok().and_then(|m| m.train);
        let steps = match train.as_ref().and_then(|t| t.length) {
            Some(tessera_compiler::config::Amount::Steps(s)) => s as u64,
            _ => 100,
        };
        RunConfig {
            backend: self.engine(),
            spec: Some((self.path.into(), overrides)),
            spec_text: self.files.first().map(|f| f.1),
            seed: train.map_or(0, |t| t.seed),
            steps,
            ..RunConfig::new(out)
        }
    }

    /// A trainer for `cfg` (from [`Spec::run_config`]), with the module's kernels.
    pub fn trainer(&self, mut cfg: RunConfig) -> Result<Trainer, Error> {
        cfg.backend = self.engine();
        Ok(Trainer::new(self.training()?, cfg)?)
    }

    /// The model's parameters as its initializers draw them with `seed`
    /// (the weights a fresh `tessera train --seed` starts from).
    pub fn init(&self, seed: u64) -> Result<Vec<Tensor>, Error> {
        Ok(crate::init::init_params(&self.check(None)?.params, seed))
    }

    /// The logical weights in `path`: a checkpoint folder (its `latest`, or
    /// a `step-*` folder), a safetensors file of Tessera's (named by
    /// parameter paths, checksums verified), or a published checkpoint read
    /// through the spec's `weights` mappings (safetensors, a sharded index,
    /// GGUF; docs/inference.md), which must hold every parameter.
    pub fn load(&self, path: &Path) -> Result<Vec<Tensor>, Error> {
        let m = self.check(None)?;
        // Tessera's own weights file: read with its checksums verified.
        if path.is_file() {
            let file = crate::weights::WeightFile::open(path)?;
            if file.format() == crate::weights::Format::Safetensors
                && m.params.first().is_some_and(|p| file.get(&p.path).is_some())
            {
                return Ok(checkpoint::read_params(path, &m.params)?);
            }
        }
        Ok(crate::weights::read(path, &m)?.every(&m.params, path)?)
    }

    /// Write logical weights to a safetensors file, atomically.
    pub fn save(&self, path: &Path, tensors: &[Tensor]) -> Result<(), Error> {
        Ok(checkpoint::write_params(path, &self.check(None)?.params, tensors)?)
    }

    /// The forward pass of one microbatch (the evaluation program: dropout off).
    pub fn evaluator(&self, params: &[Tensor]) -> Result<Evaluator, Error> {
        let mut e = Evaluator::new(&self.training()?, self.engine())?;
        e.load(params)?;
        Ok(e)
    }

    /// The tokenizer of the spec's `train.tokenizer` (bytes by default).
    pub fn tokenizer(&self) -> Result<crate::train::tokenizer::Tokenizer, Error> {
        let m = self.check(None)?;
        Ok(crate::train::tokenizer::Tokenizer::by_name(m.train.as_ref().and_then(|t| t.tokenizer.as_deref()))?)
    }

    /// The sampling settings of the spec's `infer` section, for `tokens` tokens.
    pub fn sampling(&self, tokens: usize) -> Result<SampleConfig, Error> {
        Ok(SampleConfig { tokens, ..SampleConfig::of_spec(self.check(Some(1))?.infer.as_ref()) })
    }

    /// The generation programs with the KV cache, loaded with `params`.
    pub fn generator(&self, params: &[Tensor]) -> Result<Generator, Error> {
        let m = self.check(Some(1))?;
        let programs = driver::compile_one_sequence(&m, driver::Passes::default()).map_err(|e| Error(e.to_string()))?;
        Ok(Generator::with_engine(programs, params, self.engine())?)
    }
}

/// One optimizer step of `t` on `batch`: one tensor per model input, every
/// global microbatch of the step along its first dim (as [`next_batch`]
/// gives). A batch of another shape is an error that says which.
pub fn step(t: &mut Trainer, batch: &[&Tensor]) -> Result<StepReport, Error> {
    t.use_step_batch()?;
    let inputs = t.training.step.inputs.clone();
    let steps = t.accumulation;
    if batch.len() != inputs.len() {
        return Err(Error(format!("{} tensors for the model's {} inputs", batch.len(), inputs.len())));
    }
    for (x, input) in batch.iter().zip(&inputs) {
        let want = input.ty.numel() * steps;
        if x.data.len() as u64 != want {
            return Err(Error(format!(
                "input `{}` holds {} elements; a step's batch holds {steps} microbatches of {} ({want} elements)",
                input.name,
                x.data.len(),
                input.ty
            )));
        }
    }
    // Global microbatch `k`: rows `k·n .. (k+1)·n` of each input.
    let micro = |k: u64| -> Vec<Tensor> {
        batch
            .iter()
            .zip(&inputs)
            .map(|(x, input)| {
                let len = input.ty.numel() as usize;
                let from = k as usize * len;
                Tensor { dims: input.ty.dims.clone(), data: x.data[from..from + len].to_vec() }
            })
            .collect()
    };
    Ok(t.train_step_on(&micro)?)
}

/// The next step's batch of `t`'s data, as `tessera train` draws it: every
/// global microbatch of the step, joined along the first dim, per model input.
pub fn next_batch(t: &Trainer) -> Result<Vec<Tensor>, Error> {
    let n = t.accumulation_at(t.step);
    let micro: Vec<Vec<Tensor>> = (0..n).map(|k| t.batch_inputs(Split::Train, t.step, k)).collect::<Result<_, _>>()?;
    let inputs = micro.first().map_or(0, Vec::len);
    Ok((0..inputs)
        .map(|i| {
            let mut dims = micro[0][i].dims.clone();
            if let Some(d) = dims.first_mut() {
                d.size *= n;
            }
            Tensor { dims, data: micro.iter().flat_map(|m| m[i].data.iter().copied()).collect() }
        })
        .collect())
}
