// A model the file does not define.
tessera_macros::spec!("specs/tiny/gpt.spec", model = "gpt2");

fn main() {}
