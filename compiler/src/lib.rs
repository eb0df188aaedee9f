//! tessera-compiler: the `.spec` language, its checker and the cost model.
//!
//! Pipeline (see ARCHITECTURE.md): `syntax` (text → AST) → `check`
//! (AST → checked [`model::Model`]) → `cost` (counts, FLOPs, memory). Later
//! stages (graph IR, autodiff, parallel plans) consume the checked model.

pub mod autodiff;
pub mod check;
pub mod codegen;
pub mod config;
pub mod cost;
pub mod device;
pub mod diag;
pub mod driver;
pub mod ir;
pub mod kernel;
pub mod lower;
pub mod model;
pub mod parallel;
pub mod plan;
pub mod syntax;

pub use check::{Options, check_embedded, check_path, check_text};
pub use diag::{Diag, Diags};
pub use model::Model;
pub use syntax::span::SourceMap;
