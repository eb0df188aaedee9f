// `tests/ui/recursive_block.spec` (a wrong spec of the corpus) is a compile error at the call.
tessera_macros::spec!("tests/ui/recursive_block.spec");

fn main() {}
