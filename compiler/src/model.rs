//! The checked `Model`: typed, fully evaluated, with every parameter's
//! shape, the per-op cost figures the cost model needs, and the validated
//! parallel, train and infer settings. This is what later stages consume.

use crate::syntax::span::Span;
use serde::Serialize;

pub use crate::ir::params::{ExpertDim, Init, Input, Param, Placement};
pub use crate::ir::types::{Dim, TensorType};

/// A routing op in the model (one per MoE layer kind).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Routing {
    pub expert_dim: String,
    pub experts: u64,
    pub top_k: u64,
    /// `None` is dropless.
    pub capacity: Option<f64>,
    #[serde(skip)]
    pub span: Span,
}

/// One `repeat` of the model: its layer count and the per-layer cost figures.
#[derive(Debug, Clone, PartialEq, Serialize, Default)]
pub struct Stack {
    pub label: String,
    pub layers: u64,
}

/// Cost figures gathered while checking, per microbatch of `batch` sequences.
///
/// Activation bytes follow Korthikanti et al. (2022): what each op keeps for
/// its backward pass, in the training precision's bytes, already divided by
/// the tensor-parallel sharding of each value.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct OpCost {
    /// Forward FLOPs: 2 per multiply-add of every contraction, plus the attention
    /// score and value products over the full score matrix.
    pub flops: f64,
    /// Forward FLOPs of attention scores/values only (included in `flops`).
    pub attn_flops: f64,
    /// Saved activations with no recompute.
    pub act_none: f64,
    /// Saved activations with selective recompute (attention core recomputed).
    pub act_selective: f64,
    /// Forward FLOPs on one rank for its microbatch: each contraction divided
    /// by the layout's split of its output and contracted dims over the
    /// model axes (the data axis splits the batch, which is already per rank).
    pub rank_flops: f64,
    /// The attention part of `rank_flops`.
    pub rank_attn_flops: f64,
    /// Matmul and attention kernels launched in the forward pass.
    pub kernels: f64,
    /// Bytes of partial sums a rank reduces over a model axis in the forward
    /// pass: the outputs of contractions over a dim split on one (Megatron's
    /// row-parallel matmuls), at their size before the reduction.
    pub partial_bytes: f64,
    /// How many such reductions.
    pub reductions: f64,
    /// Bytes of routed tokens a rank sends to its experts and receives back
    /// in the forward pass (dispatch plus combine).
    pub exchange_bytes: f64,
    /// How many such exchanges (a dispatch and a combine per MoE layer).
    pub exchanges: f64,
}

impl std::ops::AddAssign for OpCost {
    fn add_assign(&mut self, o: OpCost) {
        self.flops += o.flops;
        self.attn_flops += o.attn_flops;
        self.act_none += o.act_none;
        self.act_selective += o.act_selective;
        self.rank_flops += o.rank_flops;
        self.rank_attn_flops += o.rank_attn_flops;
        self.kernels += o.kernels;
        self.partial_bytes += o.partial_bytes;
        self.reductions += o.reductions;
        self.exchange_bytes += o.exchange_bytes;
        self.exchanges += o.exchanges;
    }
}

impl std::ops::Mul<f64> for OpCost {
    type Output = OpCost;
    fn mul(self, k: f64) -> OpCost {
        OpCost {
            flops: self.flops * k,
            attn_flops: self.attn_flops * k,
            act_none: self.act_none * k,
            act_selective: self.act_selective * k,
            rank_flops: self.rank_flops * k,
            rank_attn_flops: self.rank_attn_flops * k,
            kernels: self.kernels * k,
            partial_bytes: self.partial_bytes * k,
            reductions: self.reductions * k,
            exchange_bytes: self.exchange_bytes * k,
            exchanges: self.exchanges * k,
        }
    }
}

impl OpCost {
    /// The same ops on `k` times the microbatch: FLOPs and bytes grow, the
    /// kernels, reductions and exchanges a pass issues do not.
    pub fn with_batch(self, k: f64) -> OpCost {
        OpCost { kernels: self.kernels, reductions: self.reductions, exchanges: self.exchanges, ..self * k }
    }
}

/// Costs split by where they run: before the layers, per layer, after them.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct CostProfile {
    pub pre: OpCost,
    /// Summed over all layers of all stacks.
    pub layers: OpCost,
    pub post: OpCost,
    /// Bytes of one layer's input (what full recompute keeps per layer).
    pub layer_input_bytes: f64,
    /// Total layers across stacks.
    pub layer_count: u64,
}

impl CostProfile {
    pub fn total(&self) -> OpCost {
        let mut t = self.pre;
        t += self.layers;
        t += self.post;
        t
    }
}

/// The checked model.
#[derive(Debug, Clone, Serialize)]
pub struct Model {
    pub name: String,
    /// Every named constant of the model (dims and scalars) after overrides, in order.
    pub consts: Vec<(String, f64)>,
    pub inputs: Vec<Input>,
    pub params: Vec<Param>,
    /// Named top-level values of interest (`loss`, `logits`, ...).
    pub outputs: Vec<(String, TensorType)>,
    pub routings: Vec<Routing>,
    pub stacks: Vec<Stack>,
    /// Tokens per sequence (size of `seq`, else the product of the first input's non-batch dims).
    pub tokens_per_sample: u64,
    /// Sequences per microbatch per data-parallel rank (the size of `batch`).
    pub micro_batch: u64,
    pub cost: CostProfile,
    /// The forward graph (layers unrolled), built while checking.
    #[serde(skip)]
    pub graph: crate::ir::Graph,
    /// The dims of every named value, with where it is defined (for layout checks).
    #[serde(skip)]
    pub value_dims: Vec<(Vec<String>, Span)>,
    pub parallel: crate::config::Parallel,
    pub train: Option<crate::config::Train>,
    pub infer: Option<crate::config::Infer>,
    /// How the parameters map to published checkpoints (`weights FORMAT for
    /// MODEL`), one per format: the model's own, else the nearest model it
    /// is a variant of.
    pub weights: Vec<WeightMap>,
    /// Where the `train` section is (else the `parallel` section): the
    /// driver's memory check points there.
    #[serde(skip)]
    pub train_span: Span,
    /// What the checker warns about (a declared parameter nothing reads, ...).
    #[serde(skip)]
    pub warnings: Vec<crate::diag::Diag>,
    /// The model checked for the data-parallel group's whole microbatch, on
    /// one device, when its examples meet across the batch (batch
    /// statistics, a contrastive loss) under data parallelism: evaluation
    /// runs it, so that a validation batch means what the training batch
    /// means, as on one device. `None` otherwise.
    #[serde(skip)]
    pub whole_batch: Option<Box<Model>>,
}

/// An op that relates examples across the batch ([`Model::batch_mixing`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchMixing {
    /// The node of the model's graph.
    pub node: usize,
    /// What it does, for a message: "renames the batch dim, ...".
    pub what: &'static str,
    /// Whether the per-rank programs keep its meaning with one microbatch per
    /// data rank and no pipeline (a contrastive `rename`, `iota(batch)`);
    /// otherwise it needs the whole batch in one microbatch.
    pub gathers: bool,
}

impl Model {
    /// The dim the model routes tokens over to its experts, if it has experts.
    pub fn expert_dim(&self) -> Option<&str> {
        self.params.iter().find_map(|p| p.expert.as_ref()).map(|e| e.dim.as_str())
    }
    pub fn const_value(&self, name: &str) -> Option<f64> {
        self.consts.iter().find(|(n, _)| n == name).map(|(_, v)| *v)
    }

    /// Every op that relates examples across the batch, whatever the run:
    /// [`Model::batch_mixing`] of one example per microbatch on one device.
    pub fn examples_meet(&self) -> Vec<BatchMixing> {
        self.batch_mixing(1, 1, 1)
    }

    /// Ops that relate examples across the batch (a contrastive loss's
    /// `rename(x, batch -> other)`, batch statistics, a softmax or max over the
    /// batch, picking an example) mean the step's global batch. A run whose
    /// microbatch is smaller (data parallelism, gradient accumulation) would
    /// compute them over each microbatch alone: a silent change of meaning, so
    /// it is an error until the compiler gathers the batch for them. Reductions
    /// of the batch to a scalar by a sum or mean (a loss) are linear and mean
    /// the same over microbatches; so is the cross-entropy. Renaming `batch` (a
    /// contrastive loss) and sums and means over the batch that keep other
    /// dims (batch statistics) are allowed under data parallelism when each
    /// data rank runs one microbatch and no pipeline splits the step: the
    /// per-rank programs gather the batch over the data axis, or all-reduce
    /// the statistics as SyncBatchNorm does (`parallel::propagate`), and
    /// evaluation runs the group's whole microbatch ([`Model::whole_batch`]).
    /// Mixture-of-experts routing over a microbatch's tokens is per microbatch by design (Switch's
    /// and GShard's capacity is per group), and is not flagged.
    ///
    /// The ops of the graph (index and what each does) that a run of
    /// microbatches of `micro` sequences over `dp` data ranks and `stages`
    /// pipeline stages would change the meaning of: the checker refuses them
    /// and the layout search does not propose such runs.
    pub fn batch_mixing(&self, micro: u64, dp: u64, stages: u64) -> Vec<BatchMixing> {
        use crate::ir::{Op, ReduceOp};
        let Some(t) = &self.train else { return Vec::new() };
        if micro >= t.batch {
            return Vec::new();
        }
        let batch = |ds: &[String]| ds.iter().any(|d| d == "batch");
        // Renaming `batch` is gathered over the data axis (the per-rank programs
        // do it), which covers the global batch when each data rank runs one
        // microbatch and no pipeline splits the step.
        let gathered = micro * dp.max(1) >= t.batch && stages <= 1;
        let mut found = Vec::new();
        for (i, n) in self.graph.nodes.iter().enumerate() {
            let what = match &n.op {
                Op::Rename { from, .. } if batch(from) && gathered => continue,
                Op::Rename { from, .. } if batch(from) => "renames the batch dim, relating each example to the others",
                Op::Reduce { op: ReduceOp::Max, dims } if batch(dims) => "takes a maximum over the batch",
                // Sums and means over the batch are partial sums per data
                // rank, all-reduced: SyncBatchNorm's statistics.
                Op::Reduce { dims, .. } if batch(dims) && gathered => continue,
                Op::Reduce { dims, .. } if batch(dims) && !n.ty.dims.is_empty() => {
                    "reduces over the batch but keeps other dims (batch statistics)"
                }
                Op::Softmax { dim, .. } | Op::LayerNorm { dim, .. } | Op::RmsNorm { dim, .. } if dim == "batch" => {
                    "normalizes over the batch"
                }
                Op::Take { dim, .. } | Op::Slice { dim, .. } if dim == "batch" => "picks examples out of the batch",
                Op::Iota { dim, .. } if dim == "batch" && !gathered => {
                    "numbers the examples by their place in the batch"
                }
                Op::MatMul { contract } if batch(contract) => "contracts over the batch",
                _ => continue,
            };
            let gathers = matches!(
                &n.op,
                Op::Rename { .. } | Op::Iota { .. } | Op::Reduce { op: ReduceOp::Sum | ReduceOp::Mean, .. }
            );
            found.push(BatchMixing { node: i, what, gathers });
        }
        found
    }
}

/// How a model's parameters map to the tensors of a published checkpoint
/// format (`weights hf for llama2_7b { ... }`), checked against the model.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WeightMap {
    /// The format's name as the spec gives it (`hf`, `gguf`).
    pub format: String,
    /// The model whose `weights` item this is.
    pub model: String,
    /// The checkpoint's `config.json` (`config { ... }`), for export.
    pub config: serde_json::Map<String, serde_json::Value>,
    pub rules: Vec<MapRule>,
}

/// One tensor name of a [`WeightMap`] and the parameter slice it holds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MapRule {
    /// The checkpoint's name; `{layer}` stands for the layer index of a
    /// stacked parameter, `*` (ignored names only) for any text.
    pub name: String,
    /// `None`: a tensor of the checkpoint that is no parameter (`= _`).
    pub target: Option<MapTarget>,
    #[serde(skip)]
    pub span: Span,
}

/// The parameter slice a checkpoint tensor holds, and the tensor's layout.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MapTarget {
    /// Index into [`Model::params`].
    pub param: usize,
    /// Dims of the parameter fixed at an index (`wqkv[qkv = 0]`).
    pub picks: Vec<(usize, u64)>,
    /// The checkpoint tensor's dims, outermost first. Each flattens the
    /// parts it lists, outermost first; no parts is a dim of size 1.
    pub layout: Vec<Vec<Part>>,
}

/// Part of a checkpoint dim: `size` indices of the parameter's dim `dim`
/// (by index) at steps of `inner` (a whole dim: its size, step 1; a split
/// dim stores each piece as its own checkpoint dim).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Part {
    pub dim: usize,
    pub size: u64,
    pub inner: u64,
    /// A rotary dim stored as two halves rather than as pairs.
    pub rope: bool,
}

impl MapRule {
    /// The tensor's name for layer `layer` of a stacked parameter.
    pub fn name_at(&self, layer: Option<u64>) -> String {
        match layer {
            Some(l) => self.name.replace("{layer}", &l.to_string()),
            None => self.name.clone(),
        }
    }

    /// Whether an ignored rule's name (with `*` and `{layer}` wildcards) matches `name`.
    pub fn ignores(&self, name: &str) -> bool {
        self.target.is_none() && glob(&self.name.replace("{layer}", "*"), name)
    }
}

/// `*` matches any text (none included); everything else matches itself.
pub fn glob(pattern: &str, text: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == text,
        Some((head, rest)) => {
            let Some(t) = text.strip_prefix(head) else { return false };
            (0..=t.len()).filter(|&i| t.is_char_boundary(i)).any(|i| glob(rest, &t[i..]))
        }
    }
}
