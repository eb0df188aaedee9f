//! The graph IR: SSA tensor ops over named dims.
//!
//! A [`Graph`] is an arena of [`Node`]s addressed by typed [`ValueId`]
//! handles; every node produces one value and lists its inputs, which always
//! come earlier (so the arena order is a topological order). Spans live in a
//! side table, so any later pass can point a diagnostic back into the spec.
//! Layers are unrolled: a repeated layer's parameters are `Param` nodes with
//! a layer index into the stacked parameter.
//!
//! The checker builds the forward graph while it types the model (one set of
//! shape rules); later passes (autodiff, parallel plans, memory planning)
//! transform graphs. This module owns the data and its text form; it never
//! touches the AST.

pub mod attrs;
pub mod fold;
pub mod params;
mod print;
pub mod types;
mod verify;

use crate::syntax::span::Span;
pub use params::{ExpertDim, Init, Input, Param, Placement};
use serde::{Deserialize, Serialize};
pub use types::{DType, Dim, TensorType};

pub use print::{ParseError, node_text, parse};
pub use verify::{VerifyError, check_op, unfolded, verify};

/// A value: the output of the node with this index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ValueId(pub u32);

impl ValueId {
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl std::fmt::Display for ValueId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "%{}", self.0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnaryOp {
    Neg,
    Exp,
    Log,
    Sqrt,
    Rsqrt,
    Tanh,
    Abs,
    Square,
    Gelu,
    GeluTanh,
    Silu,
    Relu,
    Sigmoid,
}

impl UnaryOp {
    pub fn name(self) -> &'static str {
        match self {
            UnaryOp::Neg => "neg",
            UnaryOp::Exp => "exp",
            UnaryOp::Log => "log",
            UnaryOp::Sqrt => "sqrt",
            UnaryOp::Rsqrt => "rsqrt",
            UnaryOp::Tanh => "tanh",
            UnaryOp::Abs => "abs",
            UnaryOp::Square => "square",
            UnaryOp::Gelu => "gelu",
            UnaryOp::GeluTanh => "gelu_tanh",
            UnaryOp::Silu => "silu",
            UnaryOp::Relu => "relu",
            UnaryOp::Sigmoid => "sigmoid",
        }
    }

    pub fn from_name(s: &str) -> Option<UnaryOp> {
        Some(match s {
            "neg" => UnaryOp::Neg,
            "exp" => UnaryOp::Exp,
            "log" => UnaryOp::Log,
            "sqrt" => UnaryOp::Sqrt,
            "rsqrt" => UnaryOp::Rsqrt,
            "tanh" => UnaryOp::Tanh,
            "abs" => UnaryOp::Abs,
            "square" => UnaryOp::Square,
            "gelu" => UnaryOp::Gelu,
            "gelu_tanh" => UnaryOp::GeluTanh,
            "silu" => UnaryOp::Silu,
            "relu" => UnaryOp::Relu,
            "sigmoid" => UnaryOp::Sigmoid,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
}

impl BinaryOp {
    pub fn name(self) -> &'static str {
        match self {
            BinaryOp::Add => "add",
            BinaryOp::Sub => "sub",
            BinaryOp::Mul => "mul",
            BinaryOp::Div => "div",
        }
    }
}

/// How `unfold` slides windows over spatial dims `over` (one each): each
/// `over[i]` becomes `into[i]`, and the window dims `window` (their sizes:
/// the kernel) are appended. Element [..., o, ..., k] of the windows is
/// x[..., o·stride − padding + k·dilation, ...].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Windows {
    pub over: Vec<String>,
    pub into: Vec<String>,
    pub window: Vec<String>,
    pub stride: u64,
    pub padding: u64,
    pub dilation: u64,
}

/// A comparison, or a boolean `and`/`or` of masks: the result is a `bool` tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CompareOp {
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
    And,
    Or,
}

impl CompareOp {
    pub fn name(self) -> &'static str {
        match self {
            CompareOp::Lt => "lt",
            CompareOp::Le => "le",
            CompareOp::Gt => "gt",
            CompareOp::Ge => "ge",
            CompareOp::Eq => "eq",
            CompareOp::Ne => "ne",
            CompareOp::And => "and",
            CompareOp::Or => "or",
        }
    }

    /// The comparison of two numbers (booleans are 0 and 1).
    pub fn apply(self, x: f64, y: f64) -> bool {
        match self {
            CompareOp::Lt => x < y,
            CompareOp::Le => x <= y,
            CompareOp::Gt => x > y,
            CompareOp::Ge => x >= y,
            CompareOp::Eq => x == y,
            CompareOp::Ne => x != y,
            CompareOp::And => x != 0.0 && y != 0.0,
            CompareOp::Or => x != 0.0 || y != 0.0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReduceOp {
    Sum,
    Mean,
    Max,
}

impl ReduceOp {
    pub fn name(self) -> &'static str {
        match self {
            ReduceOp::Sum => "sum",
            ReduceOp::Mean => "mean",
            ReduceOp::Max => "max",
        }
    }

    pub fn from_name(s: &str) -> Option<ReduceOp> {
        [ReduceOp::Sum, ReduceOp::Mean, ReduceOp::Max].into_iter().find(|r| r.name() == s)
    }
}

/// Relative-position variants of attention.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum RelPos {
    #[default]
    None,
    /// T5 bucketed bias; the extra input is the table [buckets, heads].
    T5 { max_distance: f64 },
    /// Transformer-XL; extra inputs are r [kv_seq, heads, head_dim] and, with
    /// `biases`, u and v [heads, head_dim].
    Xl { biases: bool },
}

/// An IR operation. Inputs are listed on the node, in the order given here.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Op {
    /// Model input number `index` (no inputs).
    Input { index: usize },
    /// Parameter `index` of the model; `layer` selects one slice of a stacked parameter.
    Param { index: usize, layer: Option<u64> },
    /// A scalar constant, `f32[]`.
    Scalar { value: f64 },
    /// The seed of the backward pass, the gradient of the loss by itself,
    /// a scalar of the loss's type: 1, times the step's run-time loss scale where the program
    /// scales the loss (`precision = fp16`, dynamic loss scaling).
    LossScale,
    /// `x` → f(x).
    Unary { op: UnaryOp },
    /// `a, b` → a ∘ b, broadcast by dim name (result: a's dims, then b's new dims).
    Binary { op: BinaryOp },
    /// `x` → x ** exp.
    Pow { exp: f64 },
    /// `a, b` → contraction over `contract` (other shared dims are batch dims).
    MatMul { contract: Vec<String> },
    /// `x` → reduction over `dims`.
    Reduce { op: ReduceOp, dims: Vec<String> },
    /// `x` → softmax (or log-softmax) over `dim`.
    Softmax { dim: String, log: bool },
    /// `x [, gain] [, bias]` → LayerNorm over `dim`.
    LayerNorm { dim: String, eps: f64, gain: bool, bias: bool },
    /// `x [, gain]` → RMSNorm over `dim`.
    RmsNorm { dim: String, eps: f64, gain: bool },
    /// `table, ids` → rows of `table` (its first dim) gathered by ids.
    Embed,
    /// `x` → slice `index` of `dim` (the dim is dropped). Also `index(x, d, i)`.
    Take { dim: String, index: u64 },
    /// `x` → `dim` split in place into `into` (row-major; sizes multiply out).
    SplitDim { dim: String, into: Vec<String> },
    /// `x` → the adjacent `dims` merged in place into `into`.
    MergeDims { dims: Vec<String>, into: String },
    /// `x` → the same data with dims renamed (`from[i]` becomes `to[i]`).
    Rename { from: Vec<String>, to: Vec<String> },
    /// `x` → the same dims in the output type's order (a transpose).
    Permute,
    /// `x1, x2, ...` → concatenation along each input's `over` dim into `into`.
    Concat { over: Vec<String>, into: String },
    /// `x` → dropout with rate `p`.
    Dropout { p: f64 },
    /// `q, k, v [, mask] [, rel inputs]` → attention.
    Attention {
        causal: bool,
        dropout: f64,
        mask: bool,
        #[serde(default)]
        rel: RelPos,
        window: Option<u64>,
    },
    /// `x` → rotary embeddings on [..., seq, heads, head_dim]: pairs (2i, 2i+1)
    /// of the first `fraction` of head_dim rotate by position · theta^(−2i/rotated).
    Rope { theta: f64, fraction: f64 },
    /// (no inputs) → fixed sinusoidal positions [seq, dim].
    Sinusoid,
    /// (no inputs) → `i32[dim]`: the positions offset, offset + 1, ... of `dim`.
    /// The checker emits offset 0; a per-rank program whose examples continue
    /// other ranks' (`batch` under data parallelism) starts at its first one.
    Iota { dim: String, offset: u64 },
    /// `a, b` → `bool`: a ∘ b elementwise, broadcast by dim name as `Binary`.
    Compare { op: CompareOp },
    /// `cond, a, b` → a where cond holds, else b, broadcast by dim name
    /// (result: a's dims, then b's new dims, then cond's).
    Where,
    /// `x` → `i32`: the position of the largest value along `dim` (the
    /// first of ties), `dim` dropped.
    Argmax { dim: String },
    /// `x` → the windows a convolution or pooling slides over x (see
    /// [`Windows`]), `fill` outside x.
    Unfold {
        #[serde(flatten)]
        windows: Windows,
        fill: f64,
    },
    /// `g` → the gradient of `unfold`: each window element added back to the
    /// position it came from (col2im).
    Fold {
        #[serde(flatten)]
        windows: Windows,
    },
    /// `x, idx` → x's value at position idx along `dim`, `dim` dropped:
    /// `idx` (`i32`) holds one position for each index of its dims, all of
    /// them x's other dims.
    Gather { dim: String },
    /// `logits, targets` → mean cross-entropy, `f32[]`.
    CrossEntropy { label_smoothing: f64, ignore: Option<i64> },
    /// `image` → patches [..., grid, pixels].
    Patches { size: u64 },
    /// `probs` → gates [tokens..., expert]: each token's top-k probabilities,
    /// zero elsewhere and where the expert's `slots` overflowed (`capacity`
    /// is the factor they came from; dropless gives every expert all tokens).
    TopK { k: u64, capacity: Option<f64>, slots: u64 },
    /// `gates, x` → [expert, slot, ...] routed tokens.
    Dispatch,
    /// `gates, y` → [tokens..., ...] gate-weighted sum of expert outputs.
    Combine,
    /// `gates, probs` → Switch load-balancing loss, `f32[]`.
    LoadBalance,
    /// `logits` → router z-loss, `f32[]`.
    ZLoss,
    /// `x` → x in another dtype.
    Cast { dtype: DType },

    // ---- ops that gradients are made of (emitted by autodiff)
    /// `a, b` → Σ over every dim not in the output type: a general contraction
    /// (the output type names and orders the kept dims).
    Einsum,
    /// `x` → x broadcast to the output type (x's dims are a subset; any order).
    Expand,
    /// `x, g` → g · f'(x).
    UnaryGrad { op: UnaryOp },
    /// `y, g` → the input gradient of softmax (or log-softmax) over `dim`, given its output y.
    SoftmaxGrad { dim: String, log: bool },
    /// `x [, gain], g` → dx of LayerNorm (`rms` for RMSNorm) over `dim`.
    NormGradX { dim: String, eps: f64, gain: bool, rms: bool },
    /// `x, g` → dgain of LayerNorm / RMSNorm over `dim` (shape [dim]).
    NormGradGain { dim: String, eps: f64, rms: bool },
    /// `ids, g` → the gradient of an embedding table (rows scatter-added).
    EmbedGrad,
    /// `g₀, g₁, ...` → each gᵢ placed at slice `indices[i]` of the output's
    /// `dim` (added where an index repeats), zeros elsewhere: the gradient of
    /// the `take`s of one value along one dim, in one pass.
    Untake { dim: String, indices: Vec<u64> },
    /// `g, idx` → g placed at position idx along the output's `dim`, zeros
    /// elsewhere: the gradient of `gather`.
    GatherGrad { dim: String },
    /// `g` → the slice `[start, start + len)` of `dim`, renamed to the output's `to` dim.
    Slice { dim: String, start: u64, to: String },
    /// `x, max, g` → the gradient of `amax` over `dims`: g where x equals the
    /// maximum, split evenly between ties (as PyTorch and JAX do), else 0.
    AmaxGrad { dims: Vec<String> },
    /// `g` → the gradient of dropout (the same mask as forward node `forward`).
    DropoutGrad { p: f64, forward: ValueId },
    /// `q, k, v, [mask,] [t5 table,] g` → dq (`which` = 0), dk (1), dv (2)
    /// or the T5 bias table (3). With `dropout` > 0 the probabilities were
    /// dropped with the mask of forward node `forward`, which the backward
    /// pass regenerates.
    AttentionGrad {
        which: u8,
        causal: bool,
        mask: bool,
        window: Option<u64>,
        dropout: f64,
        forward: ValueId,
        /// `Some(max_distance)` with a T5 relative-bias table.
        t5: Option<f64>,
        /// `Some(biases)` with Transformer-XL positions `r` (and biases `u`, `v`).
        xl: Option<bool>,
    },
    /// `logits, targets, g` → dlogits of the mean cross-entropy.
    CrossEntropyGrad { label_smoothing: f64, ignore: Option<i64> },
    /// `sum of squares` → min(1, clip / sqrt(sum)): the factor that clips a
    /// gradient's global norm (1 for a zero gradient).
    ClipScale { clip: f64 },
    /// `moment, g, scale` → β·moment + (1 − β)·(scale·g)ᵖ with p = 2 for the
    /// second moment (a fused AdamW moment update; `scale` is the clip factor).
    AdamMoment { beta: f64, square: bool },
    /// `w, m, v, hyper` → w − lr·((m / bc1) / (√(v / bc2) + eps) + wd·w), with
    /// hyper = [lr, bc1, bc2] (a fused AdamW weight update).
    AdamStep { eps: f64, weight_decay: f64 },
    /// `g` → the gradient of rope: the inverse rotation.
    RopeGrad { theta: f64, fraction: f64 },
    /// `g, gates` → g where the gate is non-zero, 0 elsewhere (top-k's gradient).
    GateMask,
    /// `gates, g` → d tokens of dispatch: each token gathers its experts' slots.
    DispatchGrad,
    /// `gates, g` → d expert outputs of combine: each slot gets its token's g × gate.
    CombineGradY,
    /// `gates, y, g` → d gates of combine: <g[token], y[expert, slot]>.
    CombineGradGates,
    /// `gates, probs, g` → d probs of the load-balancing loss.
    LoadBalanceGrad,
    /// `logits, g` → d logits of the z-loss.
    ZLossGrad,

    // ---- ops of per-rank programs (emitted by `parallel`)
    /// `x` → the reduction of every rank's x over the ranks of mesh axis
    /// `axis` that share this rank's other coordinates (every rank gets it).
    AllReduce { axis: String, op: ReduceOp },
    /// `x` → the ranks' x along `axis`, concatenated along `dim` in rank order.
    AllGather { axis: String, dim: String },
    /// `x` → the reduction (sum) of the ranks' x along `axis`, of which this
    /// rank keeps its chunk of `dim` (chunk i for the i-th rank of the group).
    ReduceScatter { axis: String, dim: String },
    /// `x` → the slices `chunks[j]` of `split` go to the j-th rank along
    /// `axis`; what the ranks sent here is concatenated along `concat` in
    /// rank order (expert dispatch and combine when experts are spread over
    /// ranks that hold different tokens).
    AllToAll { axis: String, split: String, concat: String, chunks: Vec<Vec<u64>> },
    /// `x` → the slices `indices` of `dim`, in that order, under the same
    /// dim name (a rank's shard of a value every rank holds whole).
    Select { dim: String, indices: Vec<u64> },
    /// `table, ids` → embed with a vocabulary-parallel shard of the table
    /// (rows `start..`): ids outside it give zeros.
    EmbedRows { start: u64 },
    /// `ids, g` → the gradient of a vocabulary-parallel table shard (rows `start..`).
    EmbedGradRows { start: u64 },
    /// `logits, targets` → each token's target logit when the target is in
    /// this rank's vocabulary slice (`start..`), else 0.
    TargetLogit { start: u64 },
    /// `logits, targets, max, sumexp, g` → d logits of the mean cross-entropy
    /// on a vocabulary slice (`start..`), given the global max and sum of
    /// exponentials per token.
    CrossEntropyGradRows { start: u64 },
}

impl Op {
    pub fn name(&self) -> &'static str {
        match self {
            Op::Input { .. } => "input",
            Op::Param { .. } => "param",
            Op::Scalar { .. } => "scalar",
            Op::Unary { op } => op.name(),
            Op::Binary { op } => op.name(),
            Op::Pow { .. } => "pow",
            Op::MatMul { .. } => "matmul",
            Op::Reduce { op: ReduceOp::Sum, .. } => "sum",
            Op::Reduce { op: ReduceOp::Mean, .. } => "mean",
            Op::Reduce { op: ReduceOp::Max, .. } => "amax",
            Op::Softmax { log: false, .. } => "softmax",
            Op::Softmax { log: true, .. } => "log_softmax",
            Op::LayerNorm { .. } => "layer_norm",
            Op::RmsNorm { .. } => "rms_norm",
            Op::Embed => "embed",
            Op::Take { .. } => "take",
            Op::SplitDim { .. } => "split_dim",
            Op::MergeDims { .. } => "merge_dims",
            Op::Rename { .. } => "rename",
            Op::Permute => "permute",
            Op::Concat { .. } => "concat",
            Op::Dropout { .. } => "dropout",
            Op::Attention { .. } => "attention",
            Op::Rope { .. } => "rope",
            Op::Sinusoid => "sinusoid",
            Op::Iota { .. } => "iota",
            Op::Compare { .. } => "compare",
            Op::Where => "where",
            Op::Argmax { .. } => "argmax",
            Op::Gather { .. } => "gather",
            Op::Unfold { .. } => "unfold",
            Op::Fold { .. } => "fold",
            Op::GatherGrad { .. } => "gather_grad",
            Op::LossScale => "loss_scale",
            Op::CrossEntropy { .. } => "cross_entropy",
            Op::Patches { .. } => "patches",
            Op::TopK { .. } => "top_k",
            Op::Dispatch => "dispatch",
            Op::Combine => "combine",
            Op::LoadBalance => "load_balance",
            Op::ZLoss => "z_loss",
            Op::Cast { .. } => "cast",
            Op::Einsum => "einsum",
            Op::Expand => "expand",
            Op::UnaryGrad { .. } => "unary_grad",
            Op::SoftmaxGrad { .. } => "softmax_grad",
            Op::NormGradX { .. } => "norm_grad_x",
            Op::NormGradGain { .. } => "norm_grad_gain",
            Op::EmbedGrad => "embed_grad",
            Op::Untake { .. } => "untake",
            Op::Slice { .. } => "slice",
            Op::DropoutGrad { .. } => "dropout_grad",
            Op::AmaxGrad { .. } => "amax_grad",
            Op::AttentionGrad { .. } => "attention_grad",
            Op::CrossEntropyGrad { .. } => "cross_entropy_grad",
            Op::RopeGrad { .. } => "rope_grad",
            Op::ClipScale { .. } => "clip_scale",
            Op::AdamMoment { .. } => "adam_moment",
            Op::AdamStep { .. } => "adam_step",
            Op::GateMask => "gate_mask",
            Op::DispatchGrad => "dispatch_grad",
            Op::CombineGradY => "combine_grad_y",
            Op::CombineGradGates => "combine_grad_gates",
            Op::LoadBalanceGrad => "load_balance_grad",
            Op::ZLossGrad => "z_loss_grad",
            Op::AllReduce { .. } => "all_reduce",
            Op::AllGather { .. } => "all_gather",
            Op::ReduceScatter { .. } => "reduce_scatter",
            Op::AllToAll { .. } => "all_to_all",
            Op::Select { .. } => "select",
            Op::EmbedRows { .. } => "embed_rows",
            Op::EmbedGradRows { .. } => "embed_grad_rows",
            Op::TargetLogit { .. } => "target_logit",
            Op::CrossEntropyGradRows { .. } => "cross_entropy_grad_rows",
        }
    }

    /// Whether every output element reads only the same element of an
    /// operand of the output's type (and anything of the other, broadcast,
    /// operands): what may run in place and be fused into a kernel.
    pub fn is_elementwise(&self) -> bool {
        matches!(
            self,
            Op::Unary { .. }
                | Op::Binary { .. }
                | Op::Pow { .. }
                | Op::UnaryGrad { .. }
                | Op::Dropout { .. }
                | Op::DropoutGrad { .. }
        )
    }

    /// The mesh axis of a collective, if this op is one.
    pub fn collective_axis(&self) -> Option<&str> {
        match self {
            Op::AllReduce { axis, .. }
            | Op::AllGather { axis, .. }
            | Op::ReduceScatter { axis, .. }
            | Op::AllToAll { axis, .. } => Some(axis),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Node {
    pub op: Op,
    pub inputs: Vec<ValueId>,
    pub ty: TensorType,
}

/// A graph: nodes in topological order, a span for each, and its named outputs.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Graph {
    pub nodes: Vec<Node>,
    #[serde(skip)]
    pub spans: Vec<Span>,
    /// Named values the model defines at the top level (`loss`, `logits`, ...).
    pub outputs: Vec<(String, ValueId)>,
    /// Where each name sits in `outputs` (a spec may define 10⁶ names).
    #[serde(skip)]
    output_index: std::collections::HashMap<String, usize>,
}

impl Graph {
    pub fn new() -> Graph {
        Graph::default()
    }

    /// Append a node; its inputs must already be in the graph.
    pub fn push(&mut self, op: Op, inputs: Vec<ValueId>, ty: TensorType, span: Span) -> ValueId {
        let id = ValueId(self.nodes.len() as u32);
        self.nodes.push(Node { op, inputs, ty });
        self.spans.push(span);
        id
    }

    pub fn node(&self, v: ValueId) -> &Node {
        &self.nodes[v.index()]
    }

    pub fn ty(&self, v: ValueId) -> &TensorType {
        &self.nodes[v.index()].ty
    }

    pub fn span(&self, v: ValueId) -> Span {
        self.spans.get(v.index()).copied().unwrap_or_default()
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    pub fn output(&self, name: &str) -> Option<ValueId> {
        self.output_index.get(name).map(|&i| self.outputs[i].1)
    }

    /// Set (or replace) a named output.
    pub fn set_output(&mut self, name: &str, v: ValueId) {
        match self.output_index.get(name) {
            Some(&i) => self.outputs[i].1 = v,
            None => {
                self.output_index.insert(name.to_string(), self.outputs.len());
                self.outputs.push((name.to_string(), v));
            }
        }
    }

    /// The stable text form (see `print.rs`).
    pub fn to_text(&self) -> String {
        print::print(self)
    }
}

/// A list of indices as text: `[a..b]` when it is a contiguous run, else the list.
pub fn indices_text(xs: &[u64]) -> String {
    match (xs.first(), xs.last()) {
        (Some(&a), Some(&b)) if xs.len() > 2 && xs.windows(2).all(|w| w[1] == w[0] + 1) => format!("[{a}..{}]", b + 1),
        _ => format!("{xs:?}"),
    }
}
