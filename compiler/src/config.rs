//! The validated `parallel`, `train` and `infer` sections.

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
    Adamw { lr: f64, beta1: f64, beta2: f64, eps: f64, weight_decay: f64 },
    Sgd { lr: f64, momentum: f64, weight_decay: f64, nesterov: bool },
}

impl Optimizer {
    /// fp32 state elements per parameter (Adam: m and v; SGD: momentum if any).
    pub fn state_per_param(&self) -> u64 {
        match self {
            Optimizer::Adamw { .. } => 2,
            Optimizer::Sgd { momentum, .. } => u64::from(*momentum != 0.0),
        }
    }
    pub fn lr(&self) -> f64 {
        match self {
            Optimizer::Adamw { lr, .. } | Optimizer::Sgd { lr, .. } => *lr,
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

/// Dynamic loss scaling (`precision = fp16`), as PyTorch's `GradScaler`:
/// the backward pass runs on the loss times the scale; a step whose
/// gradients overflow is skipped and halves the scale; `window` good steps
/// in a row double it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LossScaling {
    /// The first step's scale (`loss_scale`, default 65536 = 2^16).
    pub initial: f64,
    /// Good steps in a row before the scale doubles (`loss_scale_window`, default 2000).
    pub window: u64,
}

impl Default for LossScaling {
    fn default() -> LossScaling {
        LossScaling { initial: 65536.0, window: 2000 }
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
