//! tessera-macros: proc macros that expand a `.spec` into a typed Rust module
//! (`tessera::spec!("specs/x.spec")`), with spec errors as compile errors.
//!
//! A skeleton for now: it arrives with the Rust emitter (see ARCHITECTURE.md,
//! "Code generation for user crates").
