//! tessera-runtime: executes the per-rank programs the compiler produces.
//!
//! A skeleton for now. The CPU backend (tuned GEMM, cranelift JIT, simulated
//! ranks) arrives with the graph IR and autodiff (issue #3), the parallel
//! executor and communicators with parallel plans (issue #4), and the CUDA
//! backend later. The runtime never sees the AST: it takes a checked model's
//! lowered program only.

/// The compiler this runtime executes programs of.
pub use tessera_compiler as compiler;
