//! The model's parameters and inputs as every pass after the checker sees
//! them: a parameter's path, logical type and initializer, where it lives
//! relative to the repeated layers, and its experts. The checker makes them;
//! the graph's `param` nodes, the per-rank cuts, the lowered programs'
//! weight buffers, the runtime and the checkpoints refer to them by index.

use super::types::TensorType;
use crate::syntax::span::Span;
use serde::Serialize;

/// How a parameter is initialised.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Init {
    Normal { std: f64 },
    TruncatedNormal { std: f64 },
    Uniform { low: f64, high: f64 },
    Zeros,
    Ones,
    Constant { value: f64 },
}

/// Where a parameter lives relative to the repeated layers (decides its pipeline stage).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Placement {
    /// Used only before the first repeat: first pipeline stage.
    First,
    /// Used only after the last repeat: last pipeline stage.
    Last,
    /// Used both before and after the layers (tied embeddings): on both end stages.
    Both,
    /// Stacked along `layer`: split across pipeline stages.
    Layers,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Param {
    /// Dotted path: scope names, then the parameter's name (`layers.attention.wqkv`).
    pub path: String,
    /// Full shape; stacked parameters have a leading `layer` dim.
    pub ty: TensorType,
    pub init: Init,
    pub placement: Placement,
    /// The routed expert dim, for expert weights (active with probability top_k / experts).
    pub expert: Option<ExpertDim>,
    /// Index of the repeat that stacked this parameter, if any.
    pub stack: Option<usize>,
    /// The layer indices (within its repeat) that hold this parameter.
    #[serde(skip)]
    pub layers: Vec<u64>,
    /// Does not train (`train.freeze`, or a base weight under `train.lora`):
    /// no gradient, no optimizer state, no update.
    pub frozen: bool,
    /// A LoRA adapter (`train.lora`): the index of the weight it adapts.
    pub adapter_of: Option<usize>,
    #[serde(skip)]
    pub span: Span,
}

impl Param {
    /// Weight decay applies to matrices and embeddings (two or more dims
    /// besides `layer`), not to biases and norm gains (GPT-2 / nanoGPT).
    pub fn decays(&self) -> bool {
        self.ty.dims.iter().filter(|d| d.name != "layer").count() >= 2
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ExpertDim {
    pub dim: String,
    pub count: u64,
    pub top_k: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Input {
    pub name: String,
    pub ty: TensorType,
}
