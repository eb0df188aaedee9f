//! Emitters of source code from the lowered programs: Rust for user crates
//! ([`rust`]; the CUDA C emitter is `kernel::cuda`).

pub mod rust;
