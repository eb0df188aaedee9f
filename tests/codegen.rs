//! Generated Rust (`tessera::spec!`): the modules' kernels, compiled by
//! rustc with this test crate, train as the runtime's JIT does, bit for bit,
//! for the four tiny specs, the demo, and the tiny GPT and MoE under
//! dp2×tp2 and pp2 (1F1B); checkpoints move between the generated trainer
//! and the runtime's.

use std::path::PathBuf;
use tessera::compiler::ir::DType;
use tessera::runtime::generated::Spec;
use tessera::runtime::tensor::Tensor;
use tessera::runtime::train::optim::{OptimizerState, learning_rate};
use tessera::runtime::train::ranks::{Ranks, Start, StepArgs};
use tessera::runtime::train::{Engine, RunConfig, Trainer};

tessera::spec!("specs/tiny/gpt.spec");
tessera::spec!("specs/tiny/moe.spec");
tessera::spec!("specs/tiny/bert.spec");
tessera::spec!("specs/tiny/vit.spec");
tessera::spec!("specs/tiny/shakespeare.spec");

mod gpt2_hf {
    tessera::spec!("tests/fixtures/hf/gpt2-tiny.spec");
}
mod gpt_dp2_tp2 {
    tessera::spec!("specs/tiny/gpt.spec", set {
        "parallel.mesh.data" = 2, "parallel.layout.batch" = data,
        "parallel.mesh.tensor" = 2, "parallel.layout.heads" = tensor, "parallel.layout.mlp" = tensor,
    });
}

mod gpt_pp2 {
    tessera::spec!("specs/tiny/gpt.spec", set {
        "parallel.mesh.pipeline" = 2, "parallel.layout.layer" = pipeline,
        "parallel.pipeline.schedule" = "1f1b", "parallel.pipeline.microbatches" = 4,
    });
}

mod moe_dp2_tp2 {
    tessera::spec!("specs/tiny/moe.spec", set {
        "parallel.mesh.tensor" = 2, "parallel.layout.heads" = tensor, "parallel.layout.mlp" = tensor,
    });
}

mod moe_pp2 {
    tessera::spec!("specs/tiny/moe.spec", set {
        "parallel.mesh.data" = 1, "parallel.mesh.pipeline" = 2, "parallel.layout.layer" = pipeline,
        "parallel.pipeline.schedule" = "1f1b", "parallel.pipeline.microbatches" = 4,
    });
}

/// The committed module of the tiny GPT: the emitter's output, compiled and
/// linted (`clippy -D warnings`) as this crate's own source, and checked
/// against a fresh emission below.
#[path = "generated/tiny_gpt.rs"]
#[rustfmt::skip]
mod golden;

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tessera-codegen-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn data() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/shakespeare/shakespeare.txt")
}

/// Deterministic inputs for any model: floats in [-1, 1), integers in {0, 1}
/// (below every vocabulary and class count).
fn inputs(spec: &Spec, k: u64) -> Vec<Tensor<f32>> {
    let t = spec.training().expect("compiles");
    t.step
        .inputs
        .iter()
        .enumerate()
        .map(|(i, input)| {
            let n = input.ty.numel() as usize;
            let int = !matches!(input.ty.dtype, DType::F32 | DType::Bf16 | DType::F16);
            let data = (0..n)
                .map(|j| {
                    let h = (j as u64 ^ (k << 32) ^ ((i as u64) << 48)).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 40;
                    if int { (h & 1) as f32 } else { (h as f32 / (1u64 << 24) as f32) * 2.0 - 1.0 }
                })
                .collect();
            Tensor { dims: input.ty.dims.clone(), data }
        })
        .collect()
}

/// Three steps of `spec`'s training step on every rank of its layout, with
/// the module's kernels and with the JIT's, from the same weights on the
/// same batches: the same reports and weights, bit for bit.
fn trains_as_the_jit(name: &str, spec: &Spec) {
    let t = spec.training().unwrap_or_else(|e| panic!("{name}: {e}"));
    let c = &t.step;
    let params = spec.init(5).expect("initial weights");
    let opt = OptimizerState::new(&c.params, &t.train.optimizer);
    let start = |engine| Ranks::new(c, Start::State(&params, &opt), &opt.optimizer, engine, None).expect("starts");
    let (jit, native) = (start(Engine::Jit), start(spec.engine()));
    let kernels = c.programs.iter().flat_map(|p| &p.instrs).filter(|i| i.kind.name() == "kernel").count();
    assert!(kernels > 0, "{name}: no fused kernels to compare");
    let feed = |k: u64| inputs(spec, k);
    for step in 0..3 {
        let args = StepArgs::new(step, 11, learning_rate(&t.train, step, 1, 3));
        let a = jit.step(args, &feed, None).expect("the JIT runs");
        let b = native.step(args, &feed, None).expect("the generated kernels run");
        assert_eq!(a, b, "{name} step {step}: the reports differ");
    }
    let (a, b) = (jit.weights(c).expect("weights"), native.weights(c).expect("weights"));
    for (k, (x, y)) in a.iter().zip(&b).enumerate() {
        let same = x.data.iter().zip(&y.data).all(|(p, q)| p.to_bits() == q.to_bits());
        assert!(same, "{name}: `{}` differs after 3 steps", c.params[k].path);
    }
    eprintln!("{name}: {} ranks, {kernels} kernel instructions, 3 steps, the same bits", c.programs.len());
}

#[test]
fn the_tiny_specs_and_the_demo_train_as_the_jit() {
    use tessera::runtime::backend::native::in_place_stats;
    let before = in_place_stats();
    trains_as_the_jit("gpt", &tiny_gpt::SPEC);
    // AdamW updates its moments and the weights in place: with the module's in-place code.
    let after = in_place_stats();
    assert!(after.0 > before.0, "no in-place kernel code ran");
    trains_as_the_jit("moe (dp2, experts over data)", &tiny_moe::SPEC);
    trains_as_the_jit("bert", &tiny_bert::SPEC);
    trains_as_the_jit("vit", &tiny_vit::SPEC);
    trains_as_the_jit("shakespeare", &shakespeare::SPEC);
}

#[test]
fn layouts_train_as_the_jit() {
    trains_as_the_jit("gpt dp2×tp2", &gpt_dp2_tp2::tiny_gpt::SPEC);
    trains_as_the_jit("gpt pp2 1f1b", &gpt_pp2::tiny_gpt::SPEC);
    trains_as_the_jit("moe dp2×tp2", &moe_dp2_tp2::tiny_moe::SPEC);
    trains_as_the_jit("moe pp2 1f1b", &moe_pp2::tiny_moe::SPEC);
}

/// The typed trainer on the spec's data: per-step losses and final weights
/// equal `tessera train`'s (the runtime's trainer with the JIT), bit for bit.
#[test]
fn the_generated_trainer_matches_the_runtime_trainer() {
    let dir = tmp("trainer");
    let mut cfg = tiny_gpt::Trainer::config(dir.join("gen"));
    (cfg.data, cfg.steps, cfg.seed) = (Some(data()), 3, 4);
    let mut generated = tiny_gpt::Trainer::new(cfg).expect("starts");
    let mut cfg = RunConfig { backend: Engine::Jit, ..RunConfig::new(dir.join("jit")) };
    (cfg.data, cfg.steps, cfg.seed) = (Some(data()), 3, 4);
    let mut runtime = Trainer::new(tiny_gpt::SPEC.training().expect("compiles"), cfg).expect("starts");
    for _ in 0..3 {
        let batch = generated.next_batch().expect("a batch");
        let a = generated.step(&batch).expect("a step");
        let b = runtime.train_step().expect("a step");
        assert_eq!(a.loss.to_bits(), b.loss.to_bits(), "step {}: {} against {}", a.step, a.loss, b.loss);
        assert_eq!(a.grad_norm.to_bits(), b.grad_norm.to_bits());
    }
    let (a, b) = (generated.params().expect("weights").into_vec(), runtime.weights().expect("weights"));
    assert!(a.iter().zip(&b).all(|(x, y)| x.data == y.data), "the weights differ");
    // A batch of another shape is an error that names the input, not a panic.
    let mut short = generated.next_batch().expect("a batch");
    short.tokens.data.truncate(10);
    let e = generated.step(&short).expect_err("a short batch");
    assert!(e.0.contains("input `tokens` holds 10 elements"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A checkpoint of the generated trainer resumes in the runtime's trainer
/// (what `tessera train --resume` runs), and the other way round: the
/// resumed steps equal an uninterrupted run's.
#[test]
fn checkpoints_move_between_the_generated_and_the_runtime_trainer() {
    let dir = tmp("resume");
    let cfg = |out: &str, engine: Option<Engine>, resume: Option<PathBuf>| {
        let mut c = tiny_gpt::Trainer::config(dir.join(out));
        (c.data, c.steps, c.seed, c.resume) = (Some(data()), 4, 9, resume);
        if let Some(e) = engine {
            c.backend = e;
        }
        c
    };
    // Four steps straight.
    let mut straight = tiny_gpt::Trainer::new(cfg("straight", None, None)).expect("starts");
    let losses: Vec<u64> = (0..4)
        .map(|_| {
            let b = straight.next_batch().expect("a batch");
            straight.step(&b).expect("a step").loss.to_bits()
        })
        .collect();
    // Two generated steps, saved; two runtime (JIT) steps resumed from them.
    let mut first = tiny_gpt::Trainer::new(cfg("a", None, None)).expect("starts");
    for _ in 0..2 {
        let b = first.next_batch().expect("a batch");
        first.step(&b).expect("a step");
    }
    let saved = first.save().expect("saves");
    let training = tiny_gpt::SPEC.training().expect("compiles");
    let mut runtime = Trainer::new(training, cfg("b", Some(Engine::Jit), Some(saved))).expect("resumes");
    assert!(runtime.resume_changes.is_empty(), "{:?}", runtime.resume_changes);
    for want in &losses[2..] {
        assert_eq!(runtime.train_step().expect("a step").loss.to_bits(), *want);
    }
    // The other way: two runtime steps, saved; two generated steps resumed.
    let training = tiny_gpt::SPEC.training().expect("compiles");
    let mut runtime = Trainer::new(training, cfg("c", Some(Engine::Jit), None)).expect("starts");
    for _ in 0..2 {
        runtime.train_step().expect("a step");
    }
    let saved = runtime.save().expect("saves");
    let mut generated = tiny_gpt::Trainer::new(cfg("d", None, Some(saved.clone()))).expect("resumes");
    for want in &losses[2..] {
        let b = generated.next_batch().expect("a batch");
        assert_eq!(generated.step(&b).expect("a step").loss.to_bits(), *want);
    }
    // Params load from a checkpoint folder and round-trip through a safetensors file.
    let p = tiny_gpt::Params::load(&saved).expect("loads");
    let file = dir.join("params.safetensors");
    p.save(&file).expect("saves");
    let q = tiny_gpt::Params::load(&file).expect("loads");
    assert!(p.to_vec().iter().zip(q.to_vec()).all(|(a, b)| a.data == b.data));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A generated module reads a published checkpoint through its spec's
/// `weights hf` mapping, as `tessera train --init` does.
#[test]
fn generated_code_loads_a_hugging_face_checkpoint() {
    let dir = std::path::Path::new("tests/fixtures/hf/gpt2-tiny");
    let p = gpt2_hf::gpt2_tiny::Params::load(dir).expect("loads through the mapping");
    let m = gpt2_hf::gpt2_tiny::SPEC.check(None).expect("checks");
    let want = tessera::runtime::weights::load(dir, &m.params, &m.weights).expect("loads");
    assert_eq!(want.naming, "hf");
    for (a, b) in p.to_vec().iter().zip(&want.params) {
        assert_eq!(a.data, b.as_ref().expect("every parameter").data);
    }
    let e = tiny_gpt::Params::load(dir).expect_err("the tiny GPT has no mapping for it").to_string();
    assert!(e.contains("its tensors are not the spec's parameters"), "{e}");
}

/// The typed API: config constants from the dims, one field per parameter
/// with the spec's shapes, the forward pass, and generation with the KV
/// cache equal to recomputing the window (greedy).
#[test]
fn the_typed_api_follows_the_spec() {
    assert_eq!((tiny_gpt::config::VOCAB, tiny_gpt::config::EMBED, tiny_gpt::config::LAYERS), (256, 64, 2));
    let p = tiny_gpt::Params::init(3).expect("initial weights");
    assert_eq!(p.wte.dims.iter().map(|d| d.size).collect::<Vec<_>>(), [256, 64]);
    assert_eq!(tiny_gpt::Params::PATHS.len(), p.to_vec().len());
    assert_eq!(tiny_gpt::Params::PATHS[0], "wte");
    let mut model = tiny_gpt::Model::new(&p).expect("loads");
    let seq = tiny_gpt::config::SEQ;
    let training = tiny_gpt::SPEC.training().expect("compiles");
    let ids = |n: usize, shift: usize| Tensor::<f32> {
        dims: training.step.inputs[0].ty.dims.clone(),
        data: (0..n).map(|i| ((i * 7 + shift) % 256) as f32).collect(),
    };
    let n = tiny_gpt::config::BATCH * seq;
    let batch = tiny_gpt::Batch { tokens: ids(n, 3), targets: ids(n, 10) };
    let loss = model.forward(&batch).expect("runs").loss;
    // Fresh weights predict about uniformly over 256 bytes; the JIT computes the same bits.
    assert!((loss - 256f64.ln()).abs() < 0.1, "loss {loss}");
    let mut eval = tessera::runtime::train::evaluate::Evaluator::new(&training, Engine::Jit).expect("compiles");
    eval.load(&p.to_vec()).expect("loads");
    let inputs: Vec<Tensor<f32>> = batch.to_vec().into_iter().cloned().collect();
    assert_eq!(eval.loss(&inputs).expect("runs").to_bits(), loss.to_bits());
    let mut cfg = tiny_gpt::SPEC.sampling(12).expect("sampling");
    cfg.temperature = 0.0;
    let cached = tiny_gpt::generate(&p, b"ROMEO:".map(u32::from).as_slice(), &cfg).expect("generates");
    let mut g = tiny_gpt::SPEC.generator(&p.to_vec()).expect("loads");
    let window = g.generate_window(b"ROMEO:".map(u32::from).as_slice(), &cfg).expect("generates");
    assert_eq!(cached, window);
    assert_eq!(cached.len(), 12);
}

/// The golden module is what the emitter writes today (`UPDATE_EXPECT=1`
/// rewrites it), and it trains as the JIT, as the macro's module does.
#[test]
fn the_golden_module_is_current_and_trains_as_the_jit() {
    use tessera::compiler::codegen::rust::{Embed, Options, generate};
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).canonicalize().expect("the crate's folder");
    let opts = Options { embed: Embed::Manifest(root.clone()), ..Options::default() };
    let g = generate(&root.join("specs/tiny/gpt.spec"), &opts).expect("generates");
    let text = format!(
        "//! The tiny GPT's generated module (`specs/tiny/gpt.spec`), committed so that it is compiled and \
         linted as\n//! source; `tests/codegen.rs` checks that it is current (`UPDATE_EXPECT=1` rewrites it).\n\n{}",
        g.code
    );
    let path = root.join("tests/generated/tiny_gpt.rs");
    if std::env::var("UPDATE_EXPECT").is_ok_and(|v| v == "1") {
        std::fs::write(&path, &text).expect("writes");
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    if committed != text {
        let first = committed.lines().zip(text.lines()).position(|(a, b)| a != b).unwrap_or(0);
        panic!(
            "tests/generated/tiny_gpt.rs is not what the emitter writes now (first difference at line {}):\n  \
             committed: {:?}\n  emitted:   {:?}\n(UPDATE_EXPECT=1 cargo test --test codegen rewrites it)",
            first + 1,
            committed.lines().nth(first).unwrap_or(""),
            text.lines().nth(first).unwrap_or("")
        );
    }
    assert!(!g.code.contains("unsafe"), "generated code has no `unsafe`");
    trains_as_the_jit("golden gpt", &golden::tiny_gpt::SPEC);
}
