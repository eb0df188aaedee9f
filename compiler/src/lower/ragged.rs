//! Expert computation over filled slots: which values of a graph are
//! *ragged*, and which ops may compute on their filled rows only.
//!
//! `dispatch` (and `combine_grad_y`, its transpose) lay tokens out as
//! `[expert, slot, ...]` with `slots` slots per expert, filled from slot 0
//! up; how many of each expert's slots are filled follows from the gates
//! alone. Between dispatch and combine an MoE layer works row by row, so the
//! rows of empty slots are never needed: `combine` and the other routed
//! readers read filled slots only. A value is ragged when only its filled
//! rows are computed; its other rows hold anything. Megatron's grouped GEMM
//! does the same on GPUs: the expert GEMMs shrink from the capacity to the
//! tokens routed.
//!
//! The ops that make or read ragged values:
//! - **rows**: an elementwise op with a ragged operand (the others ragged
//!   alike, or without the slot dim: a bias), and a contraction of one
//!   ragged operand with one that lacks the slot dim (`x · w` per expert).
//!   Their output is ragged.
//! - **contract**: a contraction over the slot dim of two ragged operands
//!   (a weight gradient), and a sum over the slot dim (a bias gradient):
//!   only the filled rows are summed. The full tensors' empty rows would
//!   add nothing only if one side's empty rows are zero, so one operand must
//!   be *zero-tailed*: dispatch's output (zero rows), and what keeps zero
//!   rows zero (a product with it, a contraction of it, an activation's
//!   gradient of it, dropout of it).
//! - the routed readers (`combine`, `dispatch_grad`, `combine_grad_gates`
//!   with the same gates): unchanged, they read filled slots anyway.
//!
//! A value is ragged only if every reader takes it ragged and it is not a
//! graph output; the analysis removes values until that holds (the largest
//! such set). Everything else is computed in full, as before.

use crate::ir::{Graph, Op, ReduceOp, ValueId};

/// What filled-slot counts a ragged value's rows follow: the gates it was
/// routed by and its slots per expert.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Counts {
    pub gates: ValueId,
    pub slots: u64,
}

/// How a node computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// In full.
    Full,
    /// Its output is ragged: it is dispatch itself (which writes every row).
    Root(Counts),
    /// Its output is ragged: it computes the filled rows of its ragged operands.
    Rows(Counts),
    /// Its output is full: it sums over the filled slots of its ragged operands.
    Contract(Counts),
}

impl Role {
    /// The counts the node's instruction reads (`None`: it needs none).
    pub fn counts(self) -> Option<Counts> {
        match self {
            Role::Rows(c) | Role::Contract(c) => Some(c),
            Role::Full | Role::Root(_) => None,
        }
    }

    fn ragged(self) -> Option<Counts> {
        match self {
            Role::Root(c) | Role::Rows(c) => Some(c),
            _ => None,
        }
    }
}

/// The role of every node of `g`.
pub fn analyze(g: &Graph) -> Vec<Role> {
    let n = g.len();
    let mut outputs = vec![false; n];
    for (_, v) in &g.outputs {
        outputs[v.index()] = true;
    }
    let mut readers: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (i, node) in g.nodes.iter().enumerate() {
        for v in &node.inputs {
            readers[v.index()].push(i);
        }
    }
    let mut allowed = vec![true; n];
    loop {
        let roles = classify(g, &allowed);
        let mut changed = false;
        for i in 0..n {
            if roles[i].ragged().is_some() && (outputs[i] || !readers[i].iter().all(|&r| takes(g, &roles, r, i))) {
                allowed[i] = false;
                changed = true;
            }
        }
        if !changed {
            return roles;
        }
    }
}

/// Roles in topological order, given which nodes may be ragged.
fn classify(g: &Graph, allowed: &[bool]) -> Vec<Role> {
    let n = g.len();
    let mut roles = vec![Role::Full; n];
    let mut zero = vec![false; n];
    // Each counts' root: its output's leading dims are `[expert, slot]`.
    let mut root_of: std::collections::HashMap<Counts, usize> = std::collections::HashMap::new();
    for i in 0..n {
        let node = &g.nodes[i];
        let out = &node.ty.dims;
        let ragged = |v: &ValueId| roles[v.index()].ragged();
        let key = node.inputs.iter().find_map(ragged);
        let role = match (&node.op, key) {
            (Op::Dispatch | Op::CombineGradY, _) if out.len() >= 2 => {
                zero[i] = true;
                Role::Root(Counts { gates: node.inputs[0], slots: out[1].size })
            }
            (op, Some(c)) => {
                // A ragged value descends from a root of its counts, classified before it.
                let slot = &g.nodes[root_of[&c]].ty.dims[..2];
                let lacks_slot = |v: &ValueId| !g.nodes[v.index()].ty.dims.iter().any(|d| d.name == slot[1].name);
                // Every operand ragged by the same counts, or without the slot dim.
                let aligned =
                    node.inputs.iter().all(|v| ragged(v) == Some(c) || (ragged(v).is_none() && lacks_slot(v)));
                let leads = out.len() >= 2 && out[..2] == *slot;
                let is_zero = |v: &ValueId| zero[v.index()];
                match op {
                    op if op.is_elementwise() && aligned && leads => {
                        zero[i] = match op {
                            Op::Binary { op: crate::ir::BinaryOp::Mul } => node.inputs.iter().any(is_zero),
                            Op::UnaryGrad { .. } => is_zero(&node.inputs[1]),
                            Op::Dropout { .. } | Op::DropoutGrad { .. } => is_zero(&node.inputs[0]),
                            _ => false,
                        };
                        Role::Rows(c)
                    }
                    Op::MatMul { .. } | Op::Einsum if node.inputs.len() == 2 => {
                        let r: Vec<bool> = node.inputs.iter().map(|v| ragged(v) == Some(c)).collect();
                        if r[0] != r[1] && aligned && leads {
                            zero[i] = node.inputs.iter().any(|v| ragged(v).is_some() && is_zero(v));
                            Role::Rows(c)
                        } else if r[0]
                            && r[1]
                            && !out.iter().any(|d| d.name == slot[1].name)
                            && node.inputs.iter().any(is_zero)
                        {
                            Role::Contract(c)
                        } else {
                            Role::Full
                        }
                    }
                    Op::Reduce { op: ReduceOp::Sum, dims } if dims.len() == 1 && dims[0] == slot[1].name && aligned => {
                        if is_zero(&node.inputs[0]) {
                            Role::Contract(c)
                        } else {
                            Role::Full
                        }
                    }
                    _ => Role::Full,
                }
            }
            _ => Role::Full,
        };
        roles[i] = if role.ragged().is_some() && !allowed[i] { Role::Full } else { role };
        if let Role::Root(c) = roles[i] {
            root_of.entry(c).or_insert(i);
        }
        if roles[i] == Role::Full {
            zero[i] = false;
        }
    }
    roles
}

/// Whether node `r` reads node `v`'s ragged output as ragged.
fn takes(g: &Graph, roles: &[Role], r: usize, v: usize) -> bool {
    let node = &g.nodes[r];
    let c = roles[v].ragged();
    match (&node.op, roles[r]) {
        (_, Role::Rows(k) | Role::Contract(k)) => c == Some(k),
        // The routed readers read the filled slots of their gates.
        (Op::Combine | Op::DispatchGrad, _) => {
            node.inputs[1].index() == v && c.map(|c| c.gates) == Some(node.inputs[0])
        }
        (Op::CombineGradGates, _) => node.inputs[1].index() == v && c.map(|c| c.gates) == Some(node.inputs[0]),
        _ => false,
    }
}
