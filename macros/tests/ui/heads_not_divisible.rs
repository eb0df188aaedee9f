// `tests/ui/heads_not_divisible.spec` (a wrong spec of the corpus) is a compile error at the call.
tessera_macros::spec!("tests/ui/heads_not_divisible.spec");

fn main() {}
