//! Counts: parameters (total, active, per rank), FLOPs per token, memory per
//! rank by category. `inspect` and the checker's memory diagnostic use these
//! same functions.
//!
//! FLOP convention: forward FLOPs are 2 per multiply-add of every contraction
//! (`@`, including the output projection onto the vocabulary) plus the
//! attention score (q·k) and value (p·v) products over the full score matrix
//! (causal masking is not subtracted). Routed expert matmuls count the tokens
//! actually routed (top_k per token), not capacity padding. A training step
//! is 3× the forward pass (backward = 2× forward), i.e. 6N per token plus the
//! attention term; activation recompute is not counted.

pub mod memory;
pub mod search;
pub mod time;

use crate::model::Model;

/// The FLOP convention, one line, as reported by `inspect --json`.
pub const FLOP_CONVENTION: &str = "2 FLOPs per multiply-add of every matmul (logits included) + attention q·k and p·v over the full s×s matrix (causal not halved; windows and masks built in the spec: the 128×128 blocks they compute, relative to that); routed experts at top_k tokens; train = 3 × forward (6N + attention); recompute not counted";

pub fn params_total(m: &Model) -> u64 {
    m.params.iter().map(|p| p.ty.numel()).fold(0u64, u64::saturating_add)
}

/// Parameters used per token: expert weights count top_k of their experts.
pub fn params_active(m: &Model) -> u64 {
    m.params
        .iter()
        .map(|p| match &p.expert {
            Some(e) => (p.ty.numel() / e.count).saturating_mul(e.top_k),
            None => p.ty.numel(),
        })
        .fold(0u64, u64::saturating_add)
}

/// Forward FLOPs per token.
pub fn flops_per_token_forward(m: &Model) -> f64 {
    m.cost.total().flops / (m.micro_batch * m.tokens_per_sample) as f64
}

/// Training-step FLOPs per token (3× forward).
pub fn flops_per_token_train(m: &Model) -> f64 {
    3.0 * flops_per_token_forward(m)
}

/// Attention part of the forward FLOPs per token.
pub fn attention_flops_per_token(m: &Model) -> f64 {
    m.cost.total().attn_flops / (m.micro_batch * m.tokens_per_sample) as f64
}
