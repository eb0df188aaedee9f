//! The validated `parallel`, `train` and `infer` sections.

use crate::model::Dim;
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    Gpipe,
    #[serde(rename = "1f1b")]
    OneFOneB,
    #[serde(rename = "interleaved_1f1b")]
    Interleaved1f1b,
}

impl Schedule {
    pub const NAMES: &[&str] = &["gpipe", "1f1b", "interleaved_1f1b"];
    pub fn parse(s: &str) -> Option<Schedule> {
        Some(match s {
            "gpipe" => Schedule::Gpipe,
            "1f1b" => Schedule::OneFOneB,
            "interleaved_1f1b" => Schedule::Interleaved1f1b,
            _ => return None,
        })
    }
    pub fn name(self) -> &'static str {
        match self {
            Schedule::Gpipe => "gpipe",
            Schedule::OneFOneB => "1f1b",
            Schedule::Interleaved1f1b => "interleaved_1f1b",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Recompute {
    None,
    Selective,
    Full,
}

impl Recompute {
    pub const NAMES: &[&str] = &["none", "selective", "full"];
    pub fn parse(s: &str) -> Option<Recompute> {
        Some(match s {
            "none" => Recompute::None,
            "selective" => Recompute::Selective,
            "full" => Recompute::Full,
            _ => return None,
        })
    }
    pub fn name(self) -> &'static str {
        match self {
            Recompute::None => "none",
            Recompute::Selective => "selective",
            Recompute::Full => "full",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    Fp32,
    Bf16,
    Fp16,
}

impl Precision {
    pub const NAMES: &[&str] = &["fp32", "bf16", "fp16"];
    pub fn parse(s: &str) -> Option<Precision> {
        Some(match s {
            "fp32" | "f32" => Precision::Fp32,
            "bf16" => Precision::Bf16,
            "fp16" | "f16" => Precision::Fp16,
            _ => return None,
        })
    }
    /// Bytes of a weight, gradient or activation element in this precision.
    pub fn bytes(self) -> u64 {
        match self {
            Precision::Fp32 => 4,
            Precision::Bf16 | Precision::Fp16 => 2,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum ExpertPlacement {
    Blocked,
    RoundRobin,
    /// Experts held by each rank of the expert axis, in rank order.
    Explicit {
        ranks: Vec<Vec<u64>>,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Experts {
    pub placement: ExpertPlacement,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Pipeline {
    pub schedule: Schedule,
    pub microbatches: u64,
    pub virtual_stages: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Parallel {
    /// Mesh axes in declaration order.
    pub mesh: Vec<(String, u64)>,
    /// Layout rules: logical dim → mesh axis.
    pub layout: Vec<(String, String)>,
    pub pipeline: Pipeline,
    pub zero: u8,
    /// Gradient elements per bucket: each bucket is reduced on its own, as
    /// soon as the backward pass has finished its gradients.
    pub bucket: u64,
    pub sequence_parallel: bool,
    pub recompute: Recompute,
    pub precision: Option<Precision>,
    pub experts: Option<Experts>,
}

impl Default for Parallel {
    fn default() -> Parallel {
        Parallel {
            mesh: Vec::new(),
            layout: Vec::new(),
            pipeline: Pipeline { schedule: Schedule::OneFOneB, microbatches: 1, virtual_stages: 1 },
            zero: 0,
            bucket: crate::parallel::BUCKET_ELEMS,
            sequence_parallel: false,
            recompute: Recompute::None,
            precision: None,
            experts: None,
        }
    }
}

impl Parallel {
    pub fn world(&self) -> u64 {
        self.mesh.iter().map(|(_, n)| *n).fold(1u64, u64::saturating_mul)
    }
    pub fn axis_size(&self, axis: &str) -> u64 {
        self.mesh.iter().find(|(a, _)| a == axis).map(|(_, n)| *n).unwrap_or(1)
    }
    /// The mesh axis a logical dim is laid out on, if any.
    pub fn axis_of(&self, dim: &str) -> Option<&str> {
        self.layout.iter().find(|(d, _)| d == dim).map(|(_, a)| a.as_str())
    }
    /// How many ways a dim is split (1 when not laid out).
    pub fn split_of(&self, dim: &str) -> u64 {
        self.axis_of(dim).map(|a| self.axis_size(a)).unwrap_or(1)
    }
    /// Pipeline stages: the size of the axis `layer` is laid out on.
    pub fn stages(&self) -> u64 {
        self.split_of("layer")
    }
    /// Data-parallel degree: the size of the axis `batch` is laid out on.
    pub fn data(&self) -> u64 {
        self.split_of("batch")
    }
    /// The axis that `batch` is laid out on.
    pub fn data_axis(&self) -> Option<&str> {
        self.axis_of("batch")
    }
    /// Model chunks per pipeline stage: `virtual` under interleaved 1F1B, else 1.
    pub fn chunks_per_stage(&self) -> u64 {
        match self.pipeline.schedule {
            Schedule::Interleaved1f1b => self.pipeline.virtual_stages.max(1),
            _ => 1,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Optimizer {
    Adamw {
        lr: f64,
        beta1: f64,
        beta2: f64,
        eps: f64,
        weight_decay: f64,
    },
    Sgd {
        lr: f64,
        momentum: f64,
        weight_decay: f64,
        nesterov: bool,
    },
    /// Adafactor (Shazeer & Stern, 2018) as T5 and Switch train with it and
    /// as `transformers.optimization.Adafactor` computes it: the second
    /// moment of a matrix is factored into its row and column means
    /// ([`Optimizer::factored`]), decaying by 1 − t^(−`decay`) at step t;
    /// the update g/√v̂ is clipped to RMS `clip`; the step is the learning
    /// rate, times the parameter's RMS (at least `eps_scale`) under
    /// `scale_parameter`. `beta1` > 0 keeps a first moment of the updates.
    /// Its "relative step" is this scaling with the schedule
    /// `inverse_sqrt(warmup = 10000 steps, linear_warmup = false)` at
    /// `lr = 0.01`: min(10⁻², 1/√t) (the section's default for it).
    Adafactor {
        lr: f64,
        beta1: f64,
        decay: f64,
        /// Added to the squared gradient (ε₁, 1e-30).
        eps: f64,
        /// The least parameter scale (ε₂, 1e-3).
        eps_scale: f64,
        /// The update's RMS bound (d, 1.0).
        clip: f64,
        scale_parameter: bool,
        weight_decay: f64,
        /// The second-largest dim must hold this many elements for a
        /// parameter's moment to be factored (128, as Mesh TensorFlow and optax).
        factor_min: u64,
    },
}

/// A tensor of optimizer state a parameter keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StateRole {
    /// The first moment (Adam's `m`, SGD's momentum, Adafactor's with β1 > 0).
    M,
    /// The second moment, the parameter's shape (Adam's `v`, an unfactored Adafactor's).
    V,
    /// Adafactor's factored second moment: its mean over the column dim ...
    VRow,
    /// ... and over the row dim.
    VCol,
}

impl StateRole {
    pub const ALL: [StateRole; 4] = [StateRole::M, StateRole::V, StateRole::VRow, StateRole::VCol];

    /// The prefix of its tensors' names (`m.`, `v.`, `vr.`, `vc.` + the parameter).
    pub fn prefix(self) -> &'static str {
        match self {
            StateRole::M => "m",
            StateRole::V => "v",
            StateRole::VRow => "vr",
            StateRole::VCol => "vc",
        }
    }
}

impl Optimizer {
    /// The optimizer state of a parameter whose logical dims are `logical`,
    /// as the dims of `local` (the rank's cut of it) that each tensor keeps:
    /// the one rule of which state an optimizer keeps.
    pub fn state(&self, logical: &[Dim], local: &[Dim]) -> Vec<(StateRole, Vec<Dim>)> {
        let whole = || local.to_vec();
        match self {
            Optimizer::Adamw { .. } => vec![(StateRole::M, whole()), (StateRole::V, whole())],
            Optimizer::Sgd { momentum, .. } if *momentum != 0.0 => vec![(StateRole::M, whole())],
            Optimizer::Sgd { .. } => Vec::new(),
            Optimizer::Adafactor { beta1, .. } => {
                let mut s = Vec::new();
                if *beta1 > 0.0 {
                    s.push((StateRole::M, whole()));
                }
                match self.factored(logical) {
                    Some((row, col)) => {
                        let without = |d: &str| local.iter().filter(|x| x.name != d).cloned().collect();
                        s.push((StateRole::VRow, without(&col)));
                        s.push((StateRole::VCol, without(&row)));
                    }
                    None => s.push((StateRole::V, whole())),
                }
                s
            }
        }
    }

    /// The dims Adafactor factors a parameter's second moment over, as (row,
    /// column): its two largest dims other than the stacked `layer` (the
    /// later of equal ones; the row the smaller), when the row holds at
    /// least `factor_min` elements (Mesh TensorFlow's and optax's rule, by
    /// name). `VRow` keeps the row dim, `VCol` the column dim.
    pub fn factored(&self, logical: &[Dim]) -> Option<(String, String)> {
        let Optimizer::Adafactor { factor_min, .. } = self else { return None };
        let mut dims: Vec<(u64, usize)> =
            logical.iter().enumerate().filter(|(_, d)| d.name != "layer").map(|(i, d)| (d.size, i)).collect();
        dims.sort();
        let (&(rows, r), &(_, c)) = (dims.iter().rev().nth(1)?, dims.last()?);
        (rows >= *factor_min).then(|| (logical[r].name.clone(), logical[c].name.clone()))
    }

    /// f32 elements of optimizer state per parameter of these dims.
    pub fn state_elements(&self, dims: &[Dim]) -> u64 {
        self.state(dims, dims).iter().map(|(_, d)| d.iter().map(|x| x.size).product::<u64>()).sum()
    }

    pub fn lr(&self) -> f64 {
        match self {
            Optimizer::Adamw { lr, .. } | Optimizer::Sgd { lr, .. } | Optimizer::Adafactor { lr, .. } => *lr,
        }
    }

    /// The update graph's hyperparameters at update `t` (from 1) under
    /// learning rate `lr`: `[lr, 1 − β1^t, 1 − β2^t]` (Adam's bias
    /// corrections), or Adafactor's `[lr, 0, 1 − t^(−decay)]` (the
    /// second moment's decay; 0 at the first step, which takes g² whole).
    pub fn hyper(&self, lr: f64, t: u64) -> [f32; 3] {
        let t = t.max(1);
        match self {
            Optimizer::Adamw { beta1, beta2, .. } => {
                [lr as f32, (1.0 - beta1.powi(t as i32)) as f32, (1.0 - beta2.powi(t as i32)) as f32]
            }
            Optimizer::Sgd { .. } => [lr as f32, 0.0, 0.0],
            Optimizer::Adafactor { decay, .. } => [lr as f32, 0.0, (1.0 - (t as f64).powf(-decay)) as f32],
        }
    }

    /// The optimizer's name in a spec.
    pub fn name(&self) -> &'static str {
        match self {
            Optimizer::Adamw { .. } => "adamw",
            Optimizer::Sgd { .. } => "sgd",
            Optimizer::Adafactor { .. } => "adafactor",
        }
    }
}

/// An amount of training given in steps or in tokens.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Amount {
    Steps(f64),
    Tokens(f64),
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum LrSchedule {
    Constant {
        warmup: Amount,
    },
    Linear {
        warmup: Amount,
        decay: Option<Amount>,
        min: f64,
    },
    Cosine {
        warmup: Amount,
        decay: Option<Amount>,
        min: f64,
    },
    /// Warmup to the peak (a linear ramp, the Transformer's and fairseq's;
    /// or the peak held, T5's and Switch's `1/√max(step, warmup)`), then
    /// the peak × √(warmup / step).
    InverseSqrt {
        warmup: Amount,
        linear_warmup: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Train {
    pub optimizer: Optimizer,
    pub schedule: LrSchedule,
    /// Global batch in sequences.
    pub batch: u64,
    /// Sequences per microbatch per data-parallel rank, if given.
    pub micro_batch: Option<u64>,
    pub length: Option<Amount>,
    pub clip: Option<f64>,
    pub precision: Precision,
    pub device: Option<String>,
    pub data: Option<String>,
    pub eval_interval: Option<u64>,
    pub eval_steps: Option<u64>,
    pub save_interval: Option<u64>,
    pub log_interval: Option<u64>,
    pub val_fraction: Option<f64>,
    /// How text data becomes tokens: `bytes` (default) or `gpt2` (byte-level BPE).
    pub tokenizer: Option<String>,
    pub seed: u64,
    /// What a step whose loss or gradient norm is not finite does: stop the
    /// run (default, `nonfinite = stop`) or leave the weights as they were
    /// and go on (`nonfinite = skip`, counted in metrics).
    pub skip_nonfinite: bool,
    /// Dynamic loss scaling under `precision = fp16`.
    pub loss_scale: LossScaling,
    /// Parameters that do not train (`freeze = ["wte", "layers.*"]`):
    /// patterns of parameter paths, `*` standing for any text.
    pub freeze: Vec<String>,
    /// Low-rank adapters (`lora { rank, alpha, targets }`): the targets
    /// train through adapters only, and every other parameter is frozen.
    pub lora: Option<Lora>,
    /// The batch-size ramp-up (`batch_rampup`), if any.
    pub rampup: Option<Rampup>,
}

/// GPT-3's batch-size warm-up, as Megatron's `--rampup-batch-size start
/// increment samples`: the global batch starts at `start` sequences and
/// grows by `increment` each time another `samples / increments` sequences
/// have been consumed (increments = (batch − start) / increment), until it
/// is the full batch after `samples`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Rampup {
    pub start: u64,
    pub increment: u64,
    pub samples: u64,
}

/// A stretch of steps of one global batch size.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchPhase {
    pub first_step: u64,
    /// Sequences per step.
    pub batch: u64,
    /// Sequences the steps before `first_step` consumed.
    pub consumed: u64,
}

impl Train {
    /// The ramp-up, if the batch ramps, with the sequences between two
    /// increments of the batch.
    fn ramp(&self) -> Option<(Rampup, f64)> {
        let r = self.rampup.filter(|r| r.start < self.batch && r.increment > 0)?;
        let increments = ((self.batch - r.start) / r.increment).max(1);
        Some((r, r.samples as f64 / increments as f64))
    }

    /// The global batch after `consumed` sequences (Megatron's rule).
    fn batch_after(&self, consumed: u64) -> u64 {
        match self.ramp() {
            Some((r, per)) if consumed <= r.samples && per > 0.0 => {
                (r.start + (consumed as f64 / per).floor() as u64 * r.increment).min(self.batch)
            }
            _ => self.batch,
        }
    }

    /// The run's stretches of one batch size, in order; the last is the full batch.
    pub fn batch_phases(&self) -> Vec<BatchPhase> {
        let mut out = Vec::new();
        let (mut step, mut consumed) = (0u64, 0u64);
        loop {
            let batch = self.batch_after(consumed);
            out.push(BatchPhase { first_step: step, batch, consumed });
            let Some((_, per)) = self.ramp().filter(|_| batch != self.batch) else { return out };
            // Steps of this size until the next increment's boundary (again
            // if rounding left the batch where it was).
            while self.batch_after(consumed) == batch {
                let boundary = ((consumed as f64 / per).floor() + 1.0) * per;
                let n = (((boundary - consumed as f64) / batch as f64).ceil() as u64).max(1);
                step += n;
                consumed += n * batch;
            }
        }
    }

    /// The global batch of step `step` (from 0), and the sequences the steps before it consumed.
    pub fn batch_at(&self, step: u64) -> (u64, u64) {
        let phases = self.batch_phases();
        let p = phases.iter().rev().find(|p| p.first_step <= step).expect("the first phase starts at step 0");
        (p.batch, p.consumed + (step - p.first_step) * p.batch)
    }

    /// How many steps consume `sequences` sequences (fractional: a step's
    /// share counts), under the ramp-up.
    pub fn steps_for(&self, sequences: f64) -> f64 {
        let phases = self.batch_phases();
        let p = phases.iter().rev().find(|p| p.consumed as f64 <= sequences).expect("the first phase consumed 0");
        p.first_step as f64 + (sequences - p.consumed as f64) / p.batch.max(1) as f64
    }
}

/// LoRA (Hu et al., 2021): each target weight W is used as
/// W + (alpha / rank) · A·B, A [in..., lora = rank] drawn N(0, 0.02), B
/// [lora, out...] zeros; only A and B train.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Lora {
    pub rank: u64,
    pub alpha: f64,
    /// Patterns of the parameter paths that get adapters.
    pub targets: Vec<String>,
}

/// Dynamic loss scaling (`precision = fp16`), as PyTorch's `GradScaler`
/// and Megatron's `DynamicGradScaler`: the backward pass runs on the loss
/// times the scale; a step whose gradients overflow is skipped, and the
/// `hysteresis`-th overflow since the scale last grew halves it (not below
/// `min`); `window` good steps in a row double it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LossScaling {
    /// The first step's scale (`loss_scale`, default 65536 = 2^16).
    pub initial: f64,
    /// Good steps in a row before the scale doubles (`loss_scale_window`, default 2000).
    pub window: u64,
    /// The least scale (`loss_scale_min`, default 1): a run whose gradients
    /// still overflow there stops.
    pub min: f64,
    /// Overflowing steps before the scale halves (`loss_scale_hysteresis`,
    /// default 1 as PyTorch; Megatron's and DeepSpeed's default is 2).
    pub hysteresis: u64,
}

impl Default for LossScaling {
    fn default() -> LossScaling {
        LossScaling { initial: 65536.0, window: 2000, min: 1.0, hysteresis: 1 }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum KvCache {
    Contiguous,
    Paged { block: u64 },
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Sampling {
    Greedy,
    Temperature { temperature: f64 },
    TopK { k: u64, temperature: f64 },
    TopP { p: f64, temperature: f64 },
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Infer {
    pub max_batch: u64,
    pub max_len: u64,
    pub kv_cache: KvCache,
    pub sampling: Sampling,
    pub seed: u64,
}
