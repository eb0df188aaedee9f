//! Wrong specs are compile errors at the `spec!` call that carry the spec's
//! file:line:col, its labels and its help, as `tessera check` prints them
//! (trybuild; `TRYBUILD=overwrite` rewrites the expected `.stderr` files).

#[test]
fn wrong_specs_are_compile_errors_at_the_macro_call() {
    // trybuild builds the cases in a crate of its own under target/: the
    // cases name specs relative to the workspace root, through the macro's
    // override of `CARGO_MANIFEST_DIR`.
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace root");
    // SAFETY: this is the test binary's only test, and nothing else reads the environment yet.
    unsafe { std::env::set_var("TESSERA_SPEC_ROOT", root) };
    let cases = std::fs::read_dir("tests/ui")
        .expect("the cases")
        .filter(|e| e.as_ref().is_ok_and(|e| e.path().extension().is_some_and(|x| x == "rs")))
        .count();
    assert!(cases >= 10, "at least 10 wrong specs, found {cases}");
    trybuild::TestCases::new().compile_fail("tests/ui/*.rs");
}
