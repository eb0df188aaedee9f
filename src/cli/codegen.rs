//! Generated Rust from the command line: `tessera build` (`cargo tessera
//! build`) writes a standalone crate for a spec, `tessera new` scaffolds a
//! user crate that expands a spec with `tessera::spec!`, and `inspect --ir
//! rust` prints the generated module.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use tessera_compiler::codegen::rust::{self, Embed, Generated, Options};

/// The Tessera workspace this binary was built from: generated crates
/// depend on its `tessera` crate by path (Tessera is not on crates.io).
fn tessera_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn options(set: &[String], model: Option<&str>, embed: Embed) -> Options {
    let mut o = Options { embed, ..Options::default() };
    o.check.overrides = set.to_vec();
    o.check.model = model.map(String::from);
    o
}

fn generate(file: &Path, opts: &Options) -> Result<Generated, ExitCode> {
    rust::generate(file, opts).map_err(|e| {
        eprint!("{}", e.0);
        if !e.0.ends_with('\n') {
            eprintln!();
        }
        ExitCode::from(1)
    })
}

/// `inspect --ir rust`: the generated module on stdout.
pub fn print(file: &Path, set: &[String], model: Option<&str>) -> ExitCode {
    match generate(file, &options(set, model, Embed::Paths)) {
        Ok(g) => {
            print!("{}", g.code);
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

fn write(path: &Path, text: &str) -> Result<(), ExitCode> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| fail(&format!("cannot create `{}`: {e}", dir.display())))?;
    }
    std::fs::write(path, text).map_err(|e| fail(&format!("cannot write `{}`: {e}", path.display())))
}

fn fail(msg: &str) -> ExitCode {
    eprintln!("error: {msg}");
    ExitCode::from(1)
}

fn manifest(name: &str, bin: bool, tessera: &Path) -> String {
    let bin = if bin { format!("\n[[bin]]\nname = \"{name}\"\npath = \"src/main.rs\"\n") } else { String::new() };
    format!(
        "[package]\nname = \"{name}\"\nversion = \"0.1.0\"\nedition = \"2024\"\npublish = false\n{bin}\n\
         [dependencies]\ntessera = {{ path = \"{}\" }}\n\n\
         # Generated kernels are arithmetic loops: build them optimized even in debug builds.\n\
         [profile.dev]\nopt-level = 1\n\n[profile.dev.package.\"*\"]\nopt-level = 2\n\n\
         # A crate of its own, even inside another workspace.\n[workspace]\n",
        tessera.display()
    )
}

/// `build`: a standalone crate for the spec at `file` in `out`: the spec
/// and the files it uses copied under `spec/` (as laid out around it, so
/// that `use` resolves as before), its data file (a relative `data` path)
/// copied where the copy resolves it, and the module generated from the copy.
pub fn build(file: &Path, set: &[String], model: Option<&str>, out: Option<PathBuf>) -> ExitCode {
    let mut sources = tessera_compiler::SourceMap::new();
    let check =
        tessera_compiler::Options { overrides: set.to_vec(), model: model.map(String::from), micro_batch: None };
    let m = match tessera_compiler::check_path(&mut sources, file, &check) {
        Ok(m) => m,
        Err(d) => {
            eprint!("{}", tessera_compiler::diag::render(&sources, &d.0));
            return ExitCode::from(1);
        }
    };
    let krate = m.name.replace('_', "-");
    let out = out.unwrap_or_else(|| PathBuf::from(&krate));
    let result = (|| -> Result<(PathBuf, Option<PathBuf>), ExitCode> {
        std::fs::create_dir_all(&out).map_err(|e| fail(&format!("cannot create `{}`: {e}", out.display())))?;
        let out = out.canonicalize().map_err(|e| fail(&format!("`{}`: {e}", out.display())))?;
        let paths: Vec<&PathBuf> = sources.paths.iter().map(|(_, p)| p).collect();
        let Some(root) = paths.first() else { return Err(fail("the spec was not read from a file")) };
        // The folder every file is under.
        let mut common = root.parent().map(Path::to_path_buf).unwrap_or_default();
        while !paths.iter().all(|p| p.starts_with(&common)) {
            if !common.pop() {
                break;
            }
        }
        for (id, p) in &sources.paths {
            let rel = p.strip_prefix(&common).unwrap_or(p);
            write(&out.join("spec").join(rel), sources.text(*id))?;
        }
        let copy = out.join("spec").join(root.strip_prefix(&common).unwrap_or(root));
        // The data, where the copy of the spec finds it.
        let data = match m.train.as_ref().and_then(|t| t.data.as_deref()) {
            Some(d) if Path::new(d).is_relative() => {
                let from = tessera_runtime::train::data::resolve(d, Some(root)).map_err(|e| fail(&e.to_string()))?;
                let to = out.join(d);
                if let Some(dir) = to.parent() {
                    std::fs::create_dir_all(dir).map_err(|e| fail(&format!("`{}`: {e}", dir.display())))?;
                }
                std::fs::copy(&from, &to).map_err(|e| fail(&format!("cannot copy `{}`: {e}", from.display())))?;
                Some(to)
            }
            _ => None,
        };
        Ok((copy, data))
    })();
    let (copy, data) = match result {
        Ok(r) => r,
        Err(code) => return code,
    };
    let root = out.canonicalize().unwrap_or(out.clone());
    let g = match generate(&copy, &options(set, model, Embed::Manifest(root))) {
        Ok(g) => g,
        Err(code) => return code,
    };
    let lib = format!(
        "//! Model `{}`, generated by `tessera build {}`: the module below, and `src/main.rs`.\n\n{}",
        g.name,
        file.display(),
        g.code
    );
    let written = write(&out.join("Cargo.toml"), &manifest(&krate, true, &tessera_dir()))
        .and_then(|()| write(&out.join("src/lib.rs"), &lib))
        .and_then(|()| write(&out.join("src/main.rs"), &main_rs(&krate.replace('-', "_"), &g.name)));
    if let Err(code) = written {
        return code;
    }
    let lines = g.code.lines().count();
    let data = data.map(|d| format!(", the data {}", d.display())).unwrap_or_default();
    println!(
        "wrote {} (crate `{krate}`: {lines} lines of generated Rust, {} kernels, {} spec files{data})\n  \
         build it:  cargo build --release --manifest-path {}/Cargo.toml\n  \
         train:     {}/target/release/{krate} train --steps 100\n  \
         sample:    {}/target/release/{krate} sample --prompt 'ROMEO:'",
        out.display(),
        g.kernels,
        g.files.len(),
        out.display(),
        out.display(),
        out.display()
    );
    ExitCode::SUCCESS
}

/// The `main.rs` of a built crate: `train` and `sample` on the generated module.
fn main_rs(krate: &str, model: &str) -> String {
    format!(
        r#"//! `{krate} train [--steps N] [--out DIR] [--data FILE] [--resume DIR] [--seed N]` trains the
//! model with the spec's settings (as `tessera train` does, with the same results; the
//! steps and seed default to the spec's); `{krate} sample [--from DIR] [--prompt TEXT] [--tokens N]`
//! samples from its latest checkpoint. Generated by `cargo tessera build`.

use {krate}::{model} as model;
use std::process::ExitCode;

fn main() -> ExitCode {{
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {{
        Some("train") => train(&args[1..]),
        Some("sample") => sample(&args[1..]),
        _ => Err("usage: {krate} train [--steps N] [--out DIR] [--data FILE] [--resume DIR] [--seed N]\n       \
                  {krate} sample [--from DIR] [--prompt TEXT] [--tokens N]"
            .to_string()),
    }};
    match result {{
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {{
            eprintln!("error: {{e}}");
            ExitCode::from(1)
        }}
    }}
}}

/// The value of `--name` in `args`, if given.
fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {{
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).map(String::as_str)
}}

fn number(args: &[String], name: &str, default: u64) -> Result<u64, String> {{
    flag(args, name).map_or(Ok(default), |v| v.parse().map_err(|_| format!("{{name}} takes a number, not `{{v}}`")))
}}

fn train(args: &[String]) -> Result<(), String> {{
    let out = flag(args, "--out").unwrap_or("runs/{model}");
    let mut cfg = model::Trainer::config(out);
    cfg.steps = number(args, "--steps", cfg.steps)?;
    cfg.seed = number(args, "--seed", cfg.seed)?;
    cfg.data = flag(args, "--data").map(Into::into);
    cfg.resume = flag(args, "--resume").map(Into::into);
    let steps = cfg.steps;
    let mut t = model::Trainer::new(cfg).map_err(|e| e.to_string())?;
    while t.inner.step < steps {{
        let batch = t.next_batch().map_err(|e| e.to_string())?;
        let m = t.step(&batch).map_err(|e| e.to_string())?;
        if m.step % 10 == 0 || m.step == steps {{
            println!("step {{}}: loss {{:.4}}, {{:.0}} tokens/s", m.step, m.loss, m.tokens_per_s);
        }}
    }}
    println!("validation loss {{:.4}}", t.evaluate(4).map_err(|e| e.to_string())?);
    let saved = t.save().map_err(|e| e.to_string())?;
    println!("saved {{}}", saved.display());
    Ok(())
}}

fn sample(args: &[String]) -> Result<(), String> {{
    let from = flag(args, "--from").unwrap_or("runs/{model}");
    let params = model::Params::load(from).map_err(|e| e.to_string())?;
    let tok = model::SPEC.tokenizer().map_err(|e| e.to_string())?;
    let prompt = tok.encode(flag(args, "--prompt").unwrap_or("\n")).map_err(|e| e.to_string())?;
    let cfg = model::SPEC.sampling(number(args, "--tokens", 200)? as usize).map_err(|e| e.to_string())?;
    let out = model::generate(&params, &prompt, &cfg).map_err(|e| e.to_string())?;
    println!("{{}}", tok.decode(&out));
    Ok(())
}}
"#
    )
}

/// `new`: a user crate in `name/` that expands a copy of the tiny GPT spec with `tessera::spec!`.
pub fn new(name: &str) -> ExitCode {
    let out = PathBuf::from(name);
    if out.exists() {
        return fail(&format!("`{name}` already exists; pick another name or remove it"));
    }
    let krate = out.file_name().map(|n| n.to_string_lossy().replace('_', "-")).unwrap_or_else(|| name.into());
    let spec = include_str!("../../specs/tiny/gpt.spec");
    let main = r#"//! A user crate of Tessera: `tessera::spec!` expands `model.spec` into the
//! module `tiny_gpt` (its config, params, model, trainer and kernels);
//! editing the spec rebuilds the crate.

tessera::spec!("model.spec");

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let data = std::env::args().nth(1).ok_or("usage: cargo run --release -- DATA.txt")?;
    let mut cfg = tiny_gpt::Trainer::config("runs/tiny_gpt");
    cfg.steps = 50;
    cfg.data = Some(data.into());
    let mut trainer = tiny_gpt::Trainer::new(cfg)?;
    for _ in 0..50 {
        let batch = trainer.next_batch()?;
        let m = trainer.step(&batch)?;
        println!("step {}: loss {:.4}", m.step, m.loss);
    }
    trainer.save()?;
    Ok(())
}
"#;
    let result = (|| -> Result<(), ExitCode> {
        write(&out.join("Cargo.toml"), &manifest(&krate, false, &tessera_dir()))?;
        write(&out.join("model.spec"), spec)?;
        write(&out.join("src/main.rs"), main)
    })();
    match result {
        Ok(()) => {
            println!(
                "created `{}`: model.spec, src/main.rs\n  run it:  cd {} && cargo run --release -- DATA.txt",
                krate,
                out.display()
            );
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}
