// An override of a dim the spec does not have.
tessera_macros::spec!("specs/tiny/gpt.spec", set { "dims.embedding" = 128 });

fn main() {}
