//! Parallel plans: from a model's mesh and layout rules to one program per rank.
//!
//! [`shard`] gives every value of the training step's forward and backward
//! graph a sharding over the mesh (which of its dims are split over which
//! axis, and over which axes it is a partial sum) and writes the rank's
//! local graph, with the collectives the math needs:
//!
//! - a contraction over a split dim leaves a *partial sum*; it is reduced
//!   (`all_reduce`, or `reduce_scatter` over `seq` with sequence parallelism)
//!   where something non-linear first reads it. Megatron's column and row
//!   splits of attention and the MLP fall out of `heads -> tensor` and
//!   `mlp -> tensor`: one all-reduce after each row-parallel matmul forward,
//!   one after each column-parallel input gradient backward.
//! - an op that needs a dim whole (a softmax over it, a norm, attention over
//!   `seq`) gets it by `all_gather`; a value held whole that meets a split one
//!   is cut locally (`select`), which costs nothing.
//! - expert weights split over an axis whose ranks hold the same tokens
//!   compute their own experts' slots and combine as a partial sum; over the
//!   data axis (ranks with different tokens) dispatch and combine exchange
//!   tokens with `all_to_all`.
//!
//! The data axis needs nothing inside the graph: its types are already one
//! rank's microbatch. Gradient reduction over it (in buckets), ZeRO's
//! sharding of optimizer state, gradients and weights, and the gradient-norm
//! reductions are step-level collectives, listed in [`StepCollective`].

pub mod check;
pub mod mesh;
pub mod pipeline;
mod program;
mod propagate;

pub use program::{ChunkProgram, RankProgram, StageProgram, StepCollective, shard, shard_all};

use crate::config::ExpertPlacement;
use crate::model::{Dim, Model, Param, TensorType};
use mesh::{coords, rank_order};

/// How a dim of a value is split over a mesh axis.
#[derive(Debug, Clone, PartialEq)]
pub struct Split {
    pub axis: String,
    /// The indices of the dim this rank holds, in local order.
    pub indices: Vec<u64>,
    /// `Some(dim)`: the value's tokens came from every rank of the axis,
    /// stacked along `dim` (expert slots after an all-to-all).
    pub exchanged: Option<String>,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct ParallelError(pub String);

fn err<T>(m: impl Into<String>) -> Result<T, ParallelError> {
    Err(ParallelError(m.into()))
}

/// The mesh as the sharding pass sees it.
#[derive(Debug, Clone)]
pub struct Mesh {
    /// Axes in rank numbering order (outermost first).
    pub order: Vec<(String, u64)>,
    /// Layout rules on axes other than the data and pipeline ones: dim → axis.
    pub rules: Vec<(String, String)>,
    pub data_axis: Option<String>,
    pub expert_dim: Option<String>,
    pub placement: ExpertPlacement,
    pub sequence_parallel: bool,
    pub zero: u8,
    /// Gradient elements per bucket (`parallel.bucket`).
    pub bucket: u64,
    /// The axis `layer` is laid out on, when it has more than one stage.
    pub pipeline_axis: Option<String>,
}

impl Mesh {
    pub fn of(m: &Model) -> Result<Mesh, ParallelError> {
        let p = &m.parallel;
        let data_axis = p.data_axis().map(str::to_string);
        let expert_dim = m.expert_dim().map(str::to_string);
        let mut rules = Vec::new();
        for (d, a) in &p.layout {
            if d == "batch" {
                continue;
            }
            if d == "layer" {
                continue;
            }
            if Some(a) == data_axis.as_ref() && Some(d) != expert_dim.as_ref() {
                return err(format!(
                    "`{d} -> {a}`: only `batch` and the expert dim may be laid out on the data axis `{a}`; \
                     give `{d}` its own mesh axis"
                ));
            }
            rules.push((d.clone(), a.clone()));
        }
        let tensor = p.axis_of("heads").or_else(|| p.axis_of("mlp"));
        Ok(Mesh {
            order: rank_order(p),
            rules,
            data_axis,
            expert_dim,
            placement: p.experts.as_ref().map(|e| e.placement.clone()).unwrap_or(ExpertPlacement::Blocked),
            sequence_parallel: p.sequence_parallel && tensor.is_some_and(|t| p.axis_size(t) > 1),
            zero: p.zero,
            bucket: p.bucket,
            pipeline_axis: p.axis_of("layer").filter(|a| p.axis_size(a) > 1).map(str::to_string),
        })
    }

    pub fn world(&self) -> u64 {
        self.order.iter().map(|(_, n)| n).product()
    }

    pub fn size(&self, axis: &str) -> u64 {
        self.order.iter().find(|(a, _)| a == axis).map(|(_, n)| *n).unwrap_or(1)
    }

    pub fn coord(&self, rank: u64, axis: &str) -> u64 {
        let c = coords(&self.order, rank);
        self.order.iter().position(|(a, _)| a == axis).map(|i| c[i]).unwrap_or(0)
    }

    /// The data axis and its size, when it has more than one rank.
    pub fn data_group(&self) -> Option<(&str, u64)> {
        let a = self.data_axis.as_deref()?;
        let n = self.size(a);
        (n > 1).then_some((a, n))
    }

    /// `rank`'s coordinate on the data axis (0 without one).
    pub fn data_coord(&self, rank: u64) -> u64 {
        self.data_group().map(|(a, _)| self.coord(rank, a)).unwrap_or(0)
    }

    /// Whether ZeRO keeps a flat shard, one chunk per data rank, of this
    /// parameter's optimizer state (and gradient under ZeRO 2, weights under
    /// ZeRO 3): a held parameter that the data axis does not already split.
    pub fn zero_sharded(&self, p: &ParamShard) -> bool {
        self.zero >= 1 && p.held && self.data_group().is_some_and(|(a, _)| !p.split_over(a))
    }

    /// The axis a dim is split over (axes of size 1 split nothing).
    pub fn rule(&self, dim: &str) -> Option<&str> {
        self.rules.iter().find(|(d, a)| d == dim && self.size(a) > 1).map(|(_, a)| a.as_str())
    }

    /// The ranks of `rank`'s group along `axis`, in group order.
    pub fn group(&self, rank: u64, axis: &str) -> Vec<u64> {
        let Some(at) = self.order.iter().position(|(a, _)| a == axis) else { return vec![rank] };
        let stride: u64 = self.order[at + 1..].iter().map(|(_, s)| *s).product();
        let c = coords(&self.order, rank)[at];
        let base = rank - c * stride;
        (0..self.order[at].1).map(|k| base + k * stride).collect()
    }

    /// The tensor-parallel axis, where sequence parallelism splits `seq`.
    fn tensor_axis(&self) -> Option<&str> {
        self.rule("heads").or_else(|| self.rule("mlp"))
    }

    /// The indices of a dim of `size` held by the rank at `coord` of `axis`:
    /// contiguous blocks, or the expert placement for the expert dim.
    pub fn held(&self, dim: &str, size: u64, axis: &str, coord: u64) -> Vec<u64> {
        let n = self.size(axis);
        if Some(dim) == self.expert_dim.as_deref() {
            match &self.placement {
                ExpertPlacement::RoundRobin => return (0..size).filter(|e| e % n == coord).collect(),
                ExpertPlacement::Explicit { ranks } => return ranks.get(coord as usize).cloned().unwrap_or_default(),
                ExpertPlacement::Blocked => {}
            }
        }
        let per = size / n;
        (coord * per..(coord + 1) * per).collect()
    }
}

/// How one parameter is cut from its logical (unsharded) tensor on a rank.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamShard {
    /// The rank's part: the logical type with split dims shortened.
    pub local: Param,
    /// (position of the dim in the logical type, its split).
    pub splits: Vec<(usize, Split)>,
    /// Whether the rank holds any of it (a pipeline stage holds its layers only).
    pub held: bool,
}

impl ParamShard {
    /// Whether the parameter is split over `axis`.
    pub fn split_over(&self, axis: &str) -> bool {
        self.splits.iter().any(|(_, s)| s.axis == axis)
    }
}

fn with_size(ty: &TensorType, dim: &str, size: u64) -> TensorType {
    let dims = ty.dims.iter().map(|d| if d.name == dim { Dim::new(dim, size) } else { d.clone() }).collect();
    TensorType::new(ty.dtype, dims)
}

/// How parameter `p` is cut on `rank`.
pub fn param_shard(mesh: &Mesh, p: &Param, rank: u64) -> ParamShard {
    let mut splits = Vec::new();
    let mut local = p.clone();
    for (i, d) in p.ty.dims.iter().enumerate() {
        let Some(axis) = mesh.rule(&d.name) else { continue };
        // The expert dim splits expert weights only (a router serves every token).
        if Some(&d.name) == mesh.expert_dim.as_ref() && p.expert.is_none() {
            continue;
        }
        if Some(axis) == mesh.data_axis.as_deref() && p.expert.is_none() {
            continue;
        }
        let indices = mesh.held(&d.name, d.size, axis, mesh.coord(rank, axis));
        local.ty.dims[i] = Dim::new(&d.name, indices.len() as u64);
        splits.push((i, Split { axis: axis.to_string(), indices, exchanged: None }));
    }
    ParamShard { local, splits, held: true }
}

/// Gradient elements per bucket unless `parallel.bucket` says otherwise
/// (4Mi: PyTorch DDP's 25 MB of f32 is 6.25M; Megatron's default is 40M).
pub const BUCKET_ELEMS: u64 = 1 << 22;
