//! tessera-runtime: executes the graphs the compiler produces.
//!
//! Named-dim tensors (`tensor`); the CPU interpreter (`exec`), generic over
//! f32 and f64, which runs every IR op forward and backward and is the
//! oracle for gradient checks; training (`train`), generation (`infer`) and
//! the serving engine's continuous batching (`serve`); and
//! collectives between ranks (`comm`, for the simulated ranks of issue #4);
//! and ranks as processes (`launch`: launcher environments, the TCP store,
//! `tessera launch`).
//! The runtime never sees the AST: it takes graphs and parameter metadata.

pub mod backend;
pub mod comm;
pub mod exec;
pub mod generated;
pub mod infer;
pub mod init;
pub mod launch;
pub mod lora;
pub mod serve;
pub mod tensor;
pub mod trace;
pub mod train;
pub mod weights;

/// The compiler this runtime executes programs of.
pub use tessera_compiler as compiler;
