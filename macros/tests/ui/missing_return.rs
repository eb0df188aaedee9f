// `tests/ui/missing_return.spec` (a wrong spec of the corpus) is a compile error at the call.
tessera_macros::spec!("tests/ui/missing_return.spec");

fn main() {}
