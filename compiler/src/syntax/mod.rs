//! Syntax: the pest grammar (`spec.pest`), the AST, the parser and the
//! canonical printer. Knows nothing of checking.

pub mod ast;
pub mod limits;
pub mod parser;
pub mod printer;
pub mod span;

pub use parser::{parse_file, parse_value};
pub use printer::print_file;
