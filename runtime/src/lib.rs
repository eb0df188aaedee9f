//! tessera-runtime: executes the graphs the compiler produces.
//!
//! Today: named-dim tensors (`tensor`) and the reference CPU interpreter
//! (`exec`), generic over f32 and f64, which runs forward and backward
//! graphs and is the oracle for gradient checks. Training loops, the tuned
//! CPU backend, simulated ranks and CUDA come next (issues #3, #4).
//! The runtime never sees the AST: it takes graphs and parameter metadata.

pub mod exec;
pub mod infer;
pub mod init;
pub mod tensor;
pub mod train;

/// The compiler this runtime executes programs of.
pub use tessera_compiler as compiler;
