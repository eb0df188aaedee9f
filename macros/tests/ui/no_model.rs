// `tests/ui/no_model.spec` (a wrong spec of the corpus) is a compile error at the call.
tessera_macros::spec!("tests/ui/no_model.spec");

fn main() {}
