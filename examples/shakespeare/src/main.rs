//! A user crate of Tessera. `tessera::spec!` expands the Shakespeare demo
//! spec into the module `shakespeare` (config, params, model, trainer,
//! generation and its kernels, compiled by rustc with this crate); editing
//! the spec rebuilds it. `cargo run --release -p shakespeare-example -- 200`
//! trains 200 steps on the spec's data, evaluates, saves a checkpoint in
//! `runs/shakespeare-example` and samples from it.
//!
//! `build.rs` shows the other way in: `tessera_build` writes a one-layer
//! tiny GPT's module to `$OUT_DIR`, included below.

tessera::spec!("../../specs/tiny/shakespeare.spec");

/// The module `build.rs` wrote.
mod from_build_script {
    include!(concat!(env!("OUT_DIR"), "/tiny_gpt.rs"));
}

use std::path::Path;

/// Train `steps` steps into `out`, then sample `tokens` tokens after `prompt`.
fn run(steps: u64, out: &Path, prompt: &str, tokens: usize) -> Result<String, shakespeare::Error> {
    let mut cfg = shakespeare::Trainer::config(out);
    cfg.steps = steps;
    let mut trainer = shakespeare::Trainer::new(cfg)?;
    for _ in 0..steps {
        let batch = trainer.next_batch()?;
        let m = trainer.step(&batch)?;
        if m.step % 25 == 0 || m.step == steps {
            println!("step {:>4}: loss {:.4} ({:.0} tokens/s)", m.step, m.loss, m.tokens_per_s);
        }
    }
    println!("validation loss {:.4}", trainer.evaluate(2)?);
    println!("saved {}", trainer.save()?.display());
    let params = shakespeare::Params::load(out)?;
    let tok = shakespeare::SPEC.tokenizer()?;
    let ids = tok.encode(prompt).map_err(|e| shakespeare::Error(e.to_string()))?;
    let sampled = shakespeare::generate(&params, &ids, &shakespeare::SPEC.sampling(tokens)?)?;
    Ok(format!("{prompt}{}", tok.decode(&sampled)))
}

fn main() -> std::process::ExitCode {
    let steps = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(200);
    match run(steps, Path::new("runs/shakespeare-example"), "ROMEO:", 200) {
        Ok(text) => {
            println!("{text}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    /// A few steps of the demo through the generated module, a checkpoint,
    /// and a sample from it.
    #[test]
    fn the_demo_trains_and_samples() {
        let out = std::env::temp_dir().join(format!("tessera-example-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&out);
        let text = super::run(3, &out, "ROMEO:", 20).expect("trains and samples");
        assert!(text.starts_with("ROMEO:") && text.len() > 6, "{text:?}");
        let _ = std::fs::remove_dir_all(&out);
    }

    /// The build script's module is the macro's: the same spec and overrides
    /// give the same kernels, and the module trains.
    #[test]
    fn the_build_script_module_trains() {
        let spec = &super::from_build_script::tiny_gpt::SPEC;
        assert_eq!(spec.overrides, ["dims.layers=1"]);
        assert!(spec.files[0].0.ends_with("specs/tiny/gpt.spec"));
        let t = spec.training().expect("compiles");
        assert_eq!(super::from_build_script::tiny_gpt::config::LAYERS, 1);
        let kernels = t.step.programs[0].instrs.iter().filter(|i| i.kind.name() == "kernel").count();
        assert!(kernels > 0 && !spec.kernels.is_empty());
        let p = super::from_build_script::tiny_gpt::Params::init(1).expect("initial weights");
        let model = super::from_build_script::tiny_gpt::Model::new(&p);
        assert!(model.is_ok());
    }
}
