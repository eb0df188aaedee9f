//! The kernel IR: what a fused kernel computes, written once for every
//! emitter (the CPU backend's interpreter now; the cranelift JIT, generated
//! Rust and CUDA C later). It holds nothing CPU-specific.
//!
//! A kernel is a loop nest over named dims (row-major, outermost first),
//! strided loads of its arguments (stride 0 broadcasts a dim the argument
//! lacks; an integer argument, such as a class id, loads as its f32 value),
//! a straight-line body of scalar expressions in SSA form, the position
//! along the innermost dim ([`Expr::Index`]) and comparisons
//! ([`Expr::Equal`]), row reductions over the innermost dim
//! ([`Expr::Reduce`]), and strided stores (stride 0 along the row: one
//! value per row, which must be the same along it). [`fuse`] groups runs of elementwise ops, the row ops (layer_norm,
//! rms_norm, softmax and their gradients) and the optimizer's update, each
//! decomposed into primitives by [`expand`], into kernels. Fusing them
//! computes every element with the same operations in the same order as
//! the ops' own kernels, row sums included (one fixed order, which the CPU
//! backend's row functions share), so it changes no result: nothing is
//! reassociated.

pub mod cuda;
mod decompose;
mod fuse;
pub mod rows;

pub use decompose::{cross_entropy_grad, cross_entropy_rows, decomposes, expand, kept, mean_of, reads_whole, row_dim};
pub use fuse::{fuse, strides};

use crate::ir::{BinaryOp, DType, Dim, ReduceOp, UnaryOp};
use serde::{Deserialize, Serialize};

/// FNV-1a over `bytes`, from `h`.
fn fnv(h: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(h, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
}

/// The key of the in-place code of the kernel with key `key`
/// ([`Kernel::native_key`]): per input, the output it is read from
/// (the same bytes at the same positions, contiguous along the segment).
pub fn in_place_key(key: u64, alias: &[Option<usize>]) -> u64 {
    alias.iter().fold(fnv(key, b"|in place"), |h, a| fnv(h, &a.map_or(u64::MAX, |o| o as u64).to_le_bytes()))
}

/// A scalar value of the body; operands name earlier values by index.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "e")]
pub enum Expr {
    /// Argument `arg`'s element at the loop position.
    Load {
        arg: usize,
    },
    /// Element `index` of argument `arg`, the same at every position (a
    /// hyperparameter read from a buffer).
    Element {
        arg: usize,
        index: u64,
    },
    Const {
        value: f64,
    },
    Unary {
        op: UnaryOp,
        x: usize,
    },
    /// g · f'(x).
    UnaryGrad {
        op: UnaryOp,
        x: usize,
        g: usize,
    },
    Binary {
        op: BinaryOp,
        a: usize,
        b: usize,
    },
    Pow {
        x: usize,
        exp: f64,
    },
    /// x / (1 − p), or 0 where the uniform draw of random stream `rng` at
    /// the element's row-major index in the loop nest is below p.
    Dropout {
        x: usize,
        p: f64,
        rng: u64,
    },
    /// x rounded to `dtype`'s precision (to nearest, ties to even) and kept
    /// in f32: the value a buffer of that dtype would hold. Fusion rounds
    /// each op's result that the unfused program would store narrower, so a
    /// fused kernel computes the unfused program's bits in every precision.
    Round {
        x: usize,
        dtype: DType,
    },
    /// The sum (or max) of x over the kernel's innermost loop dim: a row
    /// reduction, the same value at every position of the row. A sum runs
    /// in one fixed order: eight interleaved partial sums over the row's
    /// positions (position i into lane i mod 8, whole groups of eight),
    /// added in lane order, then the positions past the last whole group.
    Reduce {
        x: usize,
        op: ReduceOp,
    },
    /// The loop position along the innermost dim (0, 1, ...), as f32: a
    /// class index (exact below 2²⁴).
    Index,
    /// 1 where a = b, else 0.
    Equal {
        a: usize,
        b: usize,
    },
}

impl Expr {
    /// The body values this expression reads.
    pub fn operands(&self) -> Vec<usize> {
        match *self {
            Expr::Unary { x, .. }
            | Expr::Pow { x, .. }
            | Expr::Dropout { x, .. }
            | Expr::Round { x, .. }
            | Expr::Reduce { x, .. } => vec![x],
            Expr::UnaryGrad { x, g, .. } => vec![x, g],
            Expr::Binary { a, b, .. } | Expr::Equal { a, b } => vec![a, b],
            Expr::Load { .. } | Expr::Element { .. } | Expr::Const { .. } | Expr::Index => vec![],
        }
    }
}

/// A fused kernel. It computes in f32: a load widens its argument's element
/// (f32 or bf16) to f32 and a store rounds to its argument's dtype. Values
/// kept in registers are rounded where the unfused ops would have stored
/// them narrower ([`Expr::Round`]), so fusion changes no result under
/// `precision = bf16` either.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Kernel {
    /// The loop nest, outermost first.
    pub dims: Vec<Dim>,
    /// How many of the arguments are inputs; the rest are outputs.
    pub inputs: usize,
    /// Per argument: its element stride along each loop dim.
    pub strides: Vec<Vec<u64>>,
    pub body: Vec<Expr>,
    /// (output argument, body value) pairs: what the kernel writes.
    pub stores: Vec<(usize, usize)>,
    /// The IR ops it computes, in order (for people and emitted comments).
    pub ops: Vec<String>,
    /// Ragged loops: the input argument whose element `i` bounds the
    /// second loop dim at index `i` of the first (an expert's filled slots,
    /// `lower::ragged`); positions past the bound are not computed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows: Option<usize>,
}

impl Kernel {
    /// Elements in the loop nest.
    pub fn len(&self) -> u64 {
        self.dims.iter().map(|d| d.size).product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the kernel reduces over rows ([`Expr::Reduce`]).
    pub fn is_row(&self) -> bool {
        self.body.iter().any(|e| matches!(e, Expr::Reduce { .. }))
    }

    /// Check the kernel's structure: operands come before their users, loads
    /// name inputs, stores name outputs, strides have one entry per loop dim.
    pub fn check(&self) -> Result<(), String> {
        let args = self.strides.len();
        if self.inputs > args {
            return Err(format!("{} inputs of {args} arguments", self.inputs));
        }
        if let Some(s) = self.strides.iter().find(|s| s.len() != self.dims.len()) {
            return Err(format!("an argument has {} strides for {} loop dims", s.len(), self.dims.len()));
        }
        for (i, e) in self.body.iter().enumerate() {
            match *e {
                Expr::Load { arg } if arg >= self.inputs => {
                    return Err(format!("value {i} loads argument {arg}, an output"));
                }
                Expr::Element { arg, .. } if arg >= self.inputs => {
                    return Err(format!("value {i} reads argument {arg}, an output"));
                }
                _ => {}
            }
            if let Some(j) = e.operands().into_iter().find(|&j| j >= i) {
                return Err(format!("value {i} reads value {j}, not computed before it"));
            }
        }
        if self.is_row() {
            if self.dims.is_empty() || self.rows.is_some() {
                return Err("a row reduction needs a loop nest and no ragged rows".into());
            }
            if let Some(i) =
                self.body.iter().position(|e| matches!(e, Expr::Reduce { op, .. } if *op == ReduceOp::Mean))
            {
                return Err(format!("value {i} is a mean: a kernel sums, then divides"));
            }
        }
        if let Some(r) = self.rows
            && (r >= self.inputs || self.dims.len() < 2)
        {
            return Err(format!("row bounds in argument {r} of a {}-deep loop nest", self.dims.len()));
        }
        let uniform = self.row_uniform();
        for &(arg, v) in &self.stores {
            if arg < self.inputs || arg >= args || v >= self.body.len() {
                return Err(format!("a store of value {v} to argument {arg}"));
            }
            // A per-row output (stride 0 along the row) holds one value per row.
            if self.strides[arg].last() == Some(&0) && !uniform[v] {
                return Err(format!("value {v}, which varies along the row, stored to per-row argument {arg}"));
            }
        }
        Ok(())
    }

    /// Per argument: its stride along the innermost loop dim that is
    /// longer than 1 (0 where there is none): the stride a segment of the
    /// loop nest reads or writes it at, once dims of size 1 are dropped and
    /// contiguous dims merged.
    pub fn inner_strides(&self) -> Vec<u64> {
        let inner = self.dims.iter().rposition(|d| d.size != 1);
        self.strides.iter().map(|s| inner.map_or(0, |d| s[d])).collect()
    }

    /// What compiled code for this kernel depends on: its body, its stores,
    /// how many arguments are inputs, the arguments' inner strides (where
    /// `unit_or_broadcast`, every stride other than 0 reads as 1: the caller
    /// gathers such arguments into contiguous runs) and the row's length
    /// where the body reads a position along the row. Kernels with the same
    /// key share code (the layers of a model, the ranks of a layout).
    pub fn code_key(&self, unit_or_broadcast: bool) -> String {
        let mut inner = self.inner_strides();
        if unit_or_broadcast {
            inner.iter_mut().for_each(|s| *s = u64::from(*s != 0));
        }
        let row = self.body.contains(&Expr::Index).then(|| self.dims.last().map_or(1, |d| d.size));
        format!("{}|{:?}|{:?}|{inner:?}|{row:?}", self.inputs, self.body, self.stores)
    }

    /// A 64-bit hash of [`Kernel::code_key`]`(true)`: how a generated
    /// module's ahead-of-time kernels are found at run time.
    pub fn native_key(&self) -> u64 {
        fnv(0xcbf2_9ce4_8422_2325, self.code_key(true).as_bytes())
    }

    /// Per body value: whether it is the same at every position of a row
    /// (a reduction, a constant, an element, a load broadcast along the row,
    /// and what is computed from those only).
    pub fn row_uniform(&self) -> Vec<bool> {
        let mut u = vec![false; self.body.len()];
        for (i, e) in self.body.iter().enumerate() {
            u[i] = match *e {
                Expr::Reduce { .. } | Expr::Const { .. } | Expr::Element { .. } => true,
                Expr::Load { arg } => self.strides.get(arg).and_then(|s| s.last()).is_none_or(|&s| s == 0),
                Expr::Index | Expr::Dropout { .. } => self.dims.is_empty(),
                _ => e.operands().iter().all(|&o| u[o]),
            };
        }
        u
    }
}
