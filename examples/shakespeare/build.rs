//! The build-script way in: `tessera_build` writes the tiny GPT's module to
//! `$OUT_DIR/tiny_gpt.rs` (and reruns when the spec or a file it uses changes).

fn main() {
    tessera_build::Build::new("../../specs/tiny/gpt.spec").set("dims.layers", 1).compile().unwrap();
}
