// A spec path that does not exist.
tessera_macros::spec!("tests/ui/no_such_file.spec");

fn main() {}
