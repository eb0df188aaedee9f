// `tests/ui/loss_not_scalar.spec` (a wrong spec of the corpus) is a compile error at the call.
tessera_macros::spec!("tests/ui/loss_not_scalar.spec");

fn main() {}
