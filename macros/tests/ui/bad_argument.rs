// A misspelt argument of the macro.
tessera_macros::spec!("specs/tiny/gpt.spec", modle = "tiny_gpt");

fn main() {}
