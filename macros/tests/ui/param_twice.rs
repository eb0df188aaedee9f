// `tests/ui/param_twice.spec` (a wrong spec of the corpus) is a compile error at the call.
tessera_macros::spec!("tests/ui/param_twice.spec");

fn main() {}
