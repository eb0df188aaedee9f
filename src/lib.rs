//! Tessera: one declarative, checked artefact for a model and its layout.
//!
//! This facade re-exports the compiler and runtime crates and holds the
//! command-line interface shared by the `tessera` and `cargo-tessera` binaries.

pub use tessera_compiler as compiler;
/// Expand a `.spec` into a typed Rust module: `tessera::spec!("specs/x.spec")` (docs/codegen.md).
pub use tessera_macros::spec;
pub use tessera_runtime as runtime;

pub mod alloc;
pub mod cli;
