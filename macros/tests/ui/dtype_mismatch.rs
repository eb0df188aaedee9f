// `tests/ui/dtype_mismatch.spec` (a wrong spec of the corpus) is a compile error at the call.
tessera_macros::spec!("tests/ui/dtype_mismatch.spec");

fn main() {}
