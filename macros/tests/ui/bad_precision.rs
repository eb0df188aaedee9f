// `tests/ui/bad_precision.spec` (a wrong spec of the corpus) is a compile error at the call.
tessera_macros::spec!("tests/ui/bad_precision.spec");

fn main() {}
