//! The lowered program: one rank's whole training step as a linear list of
//! instructions over buffers, the contract between the compiler and every
//! backend and emitter (llm.c's one-arena model, made general).
//!
//! - **Buffers** are typed byte ranges. Each lives in one [`Region`]: the
//!   persistent parameters, gradients and optimizer state; the step's inputs
//!   and scalars (`io`); a generation program's KV cache (`cache`); or the
//!   **arena**, where every temporary gets an offset from the liveness plan
//!   ([`crate::plan::allocate`]). A *view*
//!   (a layer's slice of a stacked parameter, a renamed or reshaped value)
//!   shares the bytes of the buffer it views.
//! - **Instructions** read and write buffers: one IR op (the fusion pass
//!   will group them into kernels), a multi-output library call (attention's
//!   backward gives dq, dk and dv at once), accumulation into the persistent
//!   gradients, a collective or a send/receive on a named stream, events,
//!   and one guard (`skip_if_nonfinite`) that leaves the weights as they were
//!   when the gradient norm is not finite.
//! - **Randomness is explicit**: a dropout (and its gradient, and attention
//!   with dropout) carries an `rng` offset fixed at lowering; the mask is a
//!   function of (the step's seed, that offset), so a later pass that
//!   renumbers or reorders instructions cannot change a result.
//!
//! The step is unrolled: every microbatch of the schedule is its own run of
//! instructions, so a pipeline stage's stashed activations are simply
//! buffers that live from their forward to their backward, and the arena's
//! size is the real peak of the schedule. Generation has programs of its
//! own ([`lower_generate`]): a window over a whole context that fills the KV
//! cache, and a decode step at a run-time position that extends it.
//! [`build`] lowers a
//! [`RankProgram`](crate::parallel::RankProgram); [`text`] prints and parses
//! the text form; [`verify`] checks a program.

mod build;
pub mod ragged;
pub mod text;
pub mod verify;

pub use build::{LowerError, dropless, lower, lower_eval, lower_forward, lower_generate};

use crate::config::StateRole;
use crate::ir::{Op, ReduceOp, TensorType};
use crate::syntax::span::Span;
use serde::{Deserialize, Serialize};

/// A buffer of a program.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BufId(pub u32);

impl BufId {
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl std::fmt::Display for BufId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "b{}", self.0)
    }
}

/// Where a buffer's bytes live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Region {
    /// The rank's weights (under ZeRO 3, its flat shards of them).
    Param,
    /// The gradients the step accumulates and reduces (and ZeRO's shards of them).
    Grad,
    /// Optimizer state: AdamW's moments, SGD's momentum.
    Optim,
    /// The step's inputs (each microbatch's batch), the optimizer's
    /// hyperparameters and the scalars the step reports (loss, norm).
    Io,
    /// Temporaries, placed by liveness.
    Arena,
    /// A generation program's KV cache: the keys and values of every
    /// position decoded so far, kept between runs.
    Cache,
}

impl Region {
    pub const COUNT: usize = 6;
    pub const ALL: [Region; Region::COUNT] =
        [Region::Param, Region::Grad, Region::Optim, Region::Io, Region::Arena, Region::Cache];

    /// The region's place in [`Region::ALL`] (and in `Program::sizes`).
    pub fn index(self) -> usize {
        self as usize
    }

    pub fn name(self) -> &'static str {
        match self {
            Region::Param => "param",
            Region::Grad => "grad",
            Region::Optim => "optim",
            Region::Io => "io",
            Region::Arena => "arena",
            Region::Cache => "cache",
        }
    }

    pub fn from_name(s: &str) -> Option<Region> {
        Region::ALL.into_iter().find(|r| r.name() == s)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Buffer {
    pub ty: TensorType,
    pub region: Region,
    /// Byte offset in the region.
    pub offset: u64,
    /// The buffer whose bytes this one shares (`None`: it owns its bytes).
    pub view_of: Option<BufId>,
    /// What the buffer holds, for people and for the runtime's bindings
    /// (`w.3`, `g.3`, `m.3`, `x0.mb1`, `loss`); empty for temporaries.
    pub name: String,
}

/// The stream an instruction is issued on. Compute is in program order;
/// `comm` runs collectives beside it, ordered against compute by events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stream {
    Compute,
    Comm,
}

/// A collective over a bucket of buffers (their elements, flat), among the
/// ranks of a mesh axis that share this rank's other coordinates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "collective")]
pub enum Collective {
    /// Each output is the reduction of its input over the group (in place when they are the same buffers).
    #[serde(rename = "bucket_all_reduce")]
    AllReduce { op: ReduceOp },
    /// The inputs, flattened and concatenated, from every rank in group
    /// order: output `i` is input `i` of the rank with group index `i / inputs`.
    #[serde(rename = "bucket_all_gather")]
    AllGather,
    /// The inputs' flat elements are cut into one chunk per rank (each
    /// input padded to a multiple of the group size); each rank keeps the
    /// sum of its chunk of every input.
    #[serde(rename = "bucket_reduce_scatter")]
    ReduceScatter,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Kind {
    /// One IR op on its inputs; `rng` is the random stream of a dropout
    /// mask. With `accumulate` the result is added to the output's contents
    /// (a weight gradient summed into the persistent gradient, as a GEMM
    /// with β = 1 does, instead of a temporary and an `accumulate`). With
    /// `rows` the last input holds each expert's filled slots (from
    /// `slot_counts`) and the op computes, or sums over, those slots only
    /// (`lower::ragged`).
    Op {
        op: Op,
        rng: Option<u64>,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        accumulate: bool,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        rows: bool,
    },
    /// `outs[0]` (`i32[expert]`) = how many of each expert's `slots` slots
    /// the gates `ins[0]` fill (as `dispatch` fills them).
    SlotCounts { slots: u64 },
    /// The gradients of one attention, from one pass: `outs[i]` is gradient
    /// `which[i]` (0 dq, 1 dk, 2 dv, 3 the T5 bias table) of `op`
    /// (an `attention_grad`, whose own `which` is `which[0]`).
    AttentionGrads { op: Op, which: Vec<u8>, rng: Option<u64> },
    /// A fused kernel (`crate::kernel`): its inputs are `ins`, its outputs `outs`, in argument order.
    Kernel { kernel: crate::kernel::Kernel },
    /// `outs[0] += ins[0]` (a gradient accumulated over microbatches).
    Accumulate,
    /// `outs[0] = ins[0] · factor`, elementwise (in place when the buffers are the same).
    Scale { factor: f64 },
    /// Every output set to zero.
    Zero,
    /// `outs[0] = ins[0]` (the same elements; the types may differ in shape).
    Copy,
    /// `outs[0]` = the `part`-th of `parts` equal flat chunks of `ins[0]`
    /// (zero-padded to a multiple of `parts`): a rank's ZeRO shard.
    FlatShard { parts: u64, part: u64 },
    /// `outs[k]` = the sum of the squares of `ins[k]`'s elements, `f32[]`.
    SumSquares,
    /// `outs[0]` = the sum of the scalars `ins`.
    AddScalars,
    /// A collective over `axis`.
    Collective { axis: String, op: Collective },
    /// Send `ins` to `peer` (a rank) with message tag `tag`.
    Send { peer: u64, tag: u64 },
    /// Receive `outs` from `peer` with message tag `tag`.
    Recv { peer: u64, tag: u64 },
    /// Mark a point of this instruction's stream that `wait` can name.
    Record { event: u32 },
    /// Hold this instruction's stream until `event` has been reached.
    Wait { event: u32 },
    /// When the scalar `ins[0]` is not finite, skip the next `count` instructions.
    #[serde(rename = "skip_if_nonfinite")]
    SkipIfNonFinite { count: u32 },
    /// `outs[0]` = for each sequence `b` of the batch, rows `pos[b]..pos[b] + n`
    /// of the table `ins[0]` along `dim`, where `pos` is the run-time
    /// positions `ins[1]` (`i32[batch]`) and `n` the output's size along `dim`:
    /// the rows of a position table (learned or sinusoidal positions) that a
    /// decode step reads. The output is the table's rows with the batch dim
    /// first; a row past the table (a padded position) reads as zeros.
    RowsAt { dim: String },
    /// Write the keys or values `ins[0]` (`[batch, .., dim = n, ..]`) of
    /// positions `pos[b]..pos[b] + n` into the paged cache `outs[0]`
    /// (`[kv_block, .., dim = block, ..]`, the other rows kept): position `p`
    /// of sequence `b` lies in row `p % block` of block `blocks[b, p / block]`.
    /// `ins[1]` is the positions (`i32[batch]`), `ins[2]` the block tables
    /// (`i32[batch, kv_table]`). A sequence at a negative position (an idle
    /// row of the batch) writes nothing, nor does a position whose table
    /// entry is negative or past the table (padding past the blocks held).
    CacheWrite { dim: String },
    /// `op` at the run-time positions of sequence dim `dim`, one per
    /// sequence of the batch. `attention(q, k cache, v cache, pos, blocks)`:
    /// sequence `b`'s queries sit at positions `pos[b]..pos[b] + n` and
    /// attend causally to its cached positions `[0, pos[b] + n)`, read
    /// through its block table (as [`Kind::CacheWrite`] places them; an idle
    /// sequence's output is zeros). `rope(x, pos)` rotates row `i` of
    /// sequence `b` by position `pos[b] + i`.
    At { op: Op, dim: String },
}

impl Kind {
    pub fn name(&self) -> &'static str {
        match self {
            Kind::Op { op, .. } => op.name(),
            Kind::AttentionGrads { .. } => "attention_grads",
            Kind::SlotCounts { .. } => "slot_counts",
            Kind::Kernel { .. } => "kernel",
            Kind::Accumulate => "accumulate",
            Kind::Scale { .. } => "scale",
            Kind::Zero => "zero",
            Kind::Copy => "copy",
            Kind::FlatShard { .. } => "flat_shard",
            Kind::SumSquares => "sum_squares",
            Kind::AddScalars => "add_scalars",
            Kind::Collective { op: Collective::AllReduce { .. }, .. } => "bucket_all_reduce",
            Kind::Collective { op: Collective::AllGather, .. } => "bucket_all_gather",
            Kind::Collective { op: Collective::ReduceScatter, .. } => "bucket_reduce_scatter",
            Kind::Send { .. } => "send",
            Kind::Recv { .. } => "recv",
            Kind::Record { .. } => "record",
            Kind::Wait { .. } => "wait",
            Kind::SkipIfNonFinite { .. } => "skip_if_nonfinite",
            Kind::RowsAt { .. } => "rows_at",
            Kind::CacheWrite { .. } => "cache_write",
            Kind::At { op, .. } => op.name(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Instr {
    pub kind: Kind,
    pub ins: Vec<BufId>,
    pub outs: Vec<BufId>,
    pub stream: Stream,
    /// The spec expressions this instruction computes (a fused kernel: all
    /// of its ops'), in program order, each once; empty for what lowering
    /// adds on its own (gradient buckets, copies). Like the graph's spans,
    /// not part of the text form.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub origin: Vec<Span>,
}

impl Instr {
    /// An instruction with no origin (the text form's, or lowering's own).
    pub fn new(kind: Kind, ins: Vec<BufId>, outs: Vec<BufId>, stream: Stream) -> Instr {
        Instr { kind, ins, outs, stream, origin: Vec::new() }
    }
}

/// How a fused kernel's arguments `args` (inputs, then outputs) share
/// bytes: `None` where a store meets an input's bytes at other positions
/// (a backend then stages the stores, as the CPU backend does); else, per
/// input, the output whose bytes it is, read and written at the same
/// positions (in place), if any.
pub fn kernel_aliases(k: &crate::kernel::Kernel, args: &[&Buffer]) -> Option<Vec<Option<usize>>> {
    let disjoint = |a: &Buffer, b: &Buffer| {
        a.region != b.region || a.offset + a.ty.bytes() <= b.offset || b.offset + b.ty.bytes() <= a.offset
    };
    let same = |l: usize, s: usize| {
        args[l].region == args[s].region && args[l].offset == args[s].offset && k.strides[l] == k.strides[s]
    };
    let direct = k.stores.iter().all(|&(s, _)| (0..k.inputs).all(|l| disjoint(args[l], args[s]) || same(l, s)));
    direct.then(|| {
        (0..k.inputs)
            .map(|l| {
                k.stores.iter().find(|&&(s, _)| same(l, s) && !disjoint(args[l], args[s])).map(|&(s, _)| s - k.inputs)
            })
            .collect()
    })
}

/// `spans` with each span once, in first-seen order (a fused kernel's origin).
pub fn merge_origins<'a>(spans: impl IntoIterator<Item = &'a Span>) -> Vec<Span> {
    let mut out: Vec<Span> = Vec::new();
    for s in spans {
        if !out.contains(s) {
            out.push(*s);
        }
    }
    out
}

/// A named part of the step (`F0 mb1`, `optimizer update`): it starts at
/// instruction `at` and runs to the next phase. Backends label traces with
/// them; fusion never merges instructions of two phases.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Phase {
    pub at: u32,
    pub name: String,
}

/// A paged KV cache (`infer { kv_cache = paged(block) }`; `contiguous` is one
/// block per sequence): each cached attention's keys and values live in a
/// pool of `blocks` blocks of `block` positions, and each sequence's block
/// table names the blocks that hold its positions, `table` entries at most.
/// Every generation program of a model places the pools alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Paging {
    pub block: u64,
    pub blocks: u64,
    pub table: u64,
}

impl Paging {
    /// Room for `len` positions per sequence (`len` rounded up to whole
    /// blocks) for `sequences` sequences at once.
    pub fn new(block: u64, len: u64, sequences: u64) -> Paging {
        let block = block.clamp(1, len.max(1));
        let table = len.max(1).div_ceil(block);
        Paging { block, blocks: table * sequences.max(1), table }
    }

    /// The positions one sequence can hold.
    pub fn positions(&self) -> u64 {
        self.block * self.table
    }
}

/// The buffers a host reads or writes, by role. Lowering names them with
/// [`Bound::name`] and hosts find them with [`Program::bound`]: the naming
/// rule lives here only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Bound {
    /// Parameter `k`'s weights as the rank stores them (its cut, or its ZeRO-3 shard).
    Weight(usize),
    /// Parameter `k`'s f32 master weights (`precision = bf16`).
    Master(usize),
    /// Parameter `k`'s gradient.
    Grad(usize),
    /// A tensor of parameter `k`'s optimizer state (`Optimizer::state`).
    State(usize, StateRole),
    /// Model input `i` of microbatch `j`.
    Input(usize, u64),
    /// The step's summed loss (a scalar).
    Loss,
    /// The step's hyperparameters: learning rate and Adam's two bias corrections.
    Hyper,
    /// The global squared gradient norm.
    Norm,
    /// The step's loss scale (a scalar): the backward pass's seed. 1, or
    /// the dynamic scale under `precision = fp16`, by which the program
    /// divides the gradients again before their norm.
    LossScale,
    /// Generation: the token ids of the window or the step.
    Tokens,
    /// Generation: the logits the program writes.
    Logits,
    /// Generation: each sequence's first position in the run (`i32[batch]`;
    /// negative for an idle row of the batch).
    Pos,
    /// Generation: each sequence's block table (`i32[batch, kv_table]`) into
    /// the paged KV cache ([`Paging`]).
    Blocks,
    /// A forward program's named output ([`lower_forward`]).
    Output,
}

impl Bound {
    pub fn name(self) -> String {
        match self {
            Bound::Weight(k) => format!("w.{k}"),
            Bound::Master(k) => format!("master.{k}"),
            Bound::Grad(k) => format!("g.{k}"),
            Bound::State(k, role) => format!("{}.{k}", role.prefix()),
            Bound::Input(i, j) => format!("x{i}.mb{j}"),
            Bound::Loss => "loss".into(),
            Bound::Hyper => "hyper".into(),
            Bound::Norm => "norm".into(),
            Bound::LossScale => "loss_scale".into(),
            Bound::Tokens => "tokens".into(),
            Bound::Logits => "logits".into(),
            Bound::Pos => "pos".into(),
            Bound::Blocks => "blocks".into(),
            Bound::Output => "out".into(),
        }
    }
}

/// One rank's lowered training step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Program {
    pub rank: u64,
    /// (axis, coordinate) in rank-numbering order.
    pub coords: Vec<(String, u64)>,
    /// Bytes of each region, in [`Region::ALL`] order.
    pub sizes: [u64; Region::COUNT],
    pub buffers: Vec<Buffer>,
    pub instrs: Vec<Instr>,
    /// The step's phases in program order (strictly increasing `at`).
    #[serde(default)]
    pub phases: Vec<Phase>,
}

impl Program {
    pub fn buffer(&self, b: BufId) -> &Buffer {
        &self.buffers[b.index()]
    }

    /// The program as its text form holds it: without origins (what
    /// `text::parse(text::print(p))` gives back).
    pub fn without_origins(&self) -> Program {
        let mut p = self.clone();
        for ins in &mut p.instrs {
            ins.origin.clear();
        }
        p
    }

    pub fn region_bytes(&self, r: Region) -> u64 {
        self.sizes[r.index()]
    }

    /// The arena's size: the most temporary bytes live at once.
    pub fn arena_bytes(&self) -> u64 {
        self.region_bytes(Region::Arena)
    }

    /// Every region together: what the rank allocates for the step.
    pub fn total_bytes(&self) -> u64 {
        self.sizes.iter().sum()
    }

    /// The buffer named `name` (weights `w.k`, gradients `g.k`, ...).
    pub fn named(&self, name: &str) -> Option<BufId> {
        self.buffers.iter().position(|b| b.name == name).map(|i| BufId(i as u32))
    }

    /// The buffer that plays `role` (`None`: the program has none, e.g. the
    /// weights of a parameter another pipeline stage holds).
    pub fn bound(&self, role: Bound) -> Option<BufId> {
        self.named(&role.name())
    }

    /// The buffer that owns `b`'s bytes.
    pub fn root(&self, mut b: BufId) -> BufId {
        while let Some(v) = self.buffers[b.index()].view_of {
            b = v;
        }
        b
    }
}
