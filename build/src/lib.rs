//! tessera-build: a spec's generated Rust module from a build script, for
//! crates that would rather not expand a proc macro.
//!
//! ```text
//! // build.rs
//! fn main() {
//!     tessera_build::compile("model.spec").unwrap();
//!     // or: tessera_build::Build::new("model.spec").set("dims.embed", 512).model("gpt").compile().unwrap();
//! }
//! // src/lib.rs
//! include!(concat!(env!("OUT_DIR"), "/tiny_gpt.rs"));
//! ```
//!
//! `compile` writes `$OUT_DIR/MODEL.rs` (the module `pub mod MODEL { .. }`,
//! as `tessera::spec!` expands it) and a `cargo:rerun-if-changed` line for
//! the spec and every file it uses. The spec path is relative to the
//! crate's folder. A spec that does not check is an error whose text is
//! `tessera check`'s diagnostics (file:line:col, labels, help).

use std::path::{Path, PathBuf};
use tessera_compiler::codegen::rust::{Options, generate};

/// Why no module was written: the spec's diagnostics, or an I/O failure.
/// Its `Debug` is the text itself, so that `compile(..).unwrap()` in a
/// build script prints the diagnostics as `tessera check` does.
pub struct Error(pub String);

impl std::fmt::Debug for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "\n{}", self.0)
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

/// A spec to generate, with overrides and a model choice.
#[derive(Debug, Clone)]
pub struct Build {
    spec: PathBuf,
    overrides: Vec<String>,
    model: Option<String>,
    out_dir: Option<PathBuf>,
}

impl Build {
    /// The spec at `spec`, relative to the crate's folder (`CARGO_MANIFEST_DIR`).
    pub fn new(spec: impl AsRef<Path>) -> Build {
        Build { spec: spec.as_ref().to_path_buf(), overrides: Vec::new(), model: None, out_dir: None }
    }

    /// Override a value, as `--set path=value` does.
    pub fn set(mut self, path: &str, value: impl std::fmt::Display) -> Build {
        self.overrides.push(format!("{path}={value}"));
        self
    }

    /// Which model of the file (default: the last one defined).
    pub fn model(mut self, name: &str) -> Build {
        self.model = Some(name.to_string());
        self
    }

    /// Where to write the module (default: `OUT_DIR`).
    pub fn out_dir(mut self, dir: impl AsRef<Path>) -> Build {
        self.out_dir = Some(dir.as_ref().to_path_buf());
        self
    }

    /// Write `OUT_DIR/MODEL.rs` and the `cargo:rerun-if-changed` lines;
    /// returns the module's path.
    pub fn compile(&self) -> Result<PathBuf, Error> {
        let root = std::env::var_os("CARGO_MANIFEST_DIR").map(PathBuf::from).unwrap_or_default();
        let spec = root.join(&self.spec);
        println!("cargo:rerun-if-changed={}", spec.display());
        let mut opts = Options::default();
        opts.check.overrides = self.overrides.clone();
        opts.check.model = self.model.clone();
        let g = generate(&spec, &opts).map_err(|e| Error(e.0))?;
        for (path, _) in &g.files {
            println!("cargo:rerun-if-changed={}", path.display());
        }
        let out = match &self.out_dir {
            Some(d) => d.clone(),
            None => std::env::var_os("OUT_DIR")
                .map(PathBuf::from)
                .ok_or_else(|| Error("OUT_DIR is not set: call tessera_build::compile from a build script".into()))?,
        };
        let path = out.join(format!("{}.rs", g.name));
        std::fs::write(&path, &g.code).map_err(|e| Error(format!("cannot write `{}`: {e}", path.display())))?;
        Ok(path)
    }
}

/// [`Build::new`]`(spec).compile()`.
pub fn compile(spec: impl AsRef<Path>) -> Result<PathBuf, Error> {
    Build::new(spec).compile()
}
