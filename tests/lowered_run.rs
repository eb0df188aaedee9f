//! Lowered programs run: every rank's program of a layout, executed by the
//! CPU backend on simulated ranks, reproduces the node-by-node runtime (the
//! trainer's own step, single device or simulated ranks) from the same
//! weights on the same batches — per-step losses and the final weights.

mod common;

use std::path::PathBuf;
use tessera::compiler::driver::compile;
use tessera::runtime::train::data::Split;
use tessera::runtime::train::lowered::{LoweredRanks, step_loss};
use tessera::runtime::train::{RunConfig, Trainer, optim};

use common::{DP2, GPT, MOE, PP2, TP2, with};

/// Small enough that a layout runs in seconds in a debug build.
const SMALL: &[&str] = &["dims.seq=16", "dims.embed=32", "train.batch=4"];

fn rel(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum::<f64>().sqrt();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum::<f64>().sqrt();
    num / den.max(1e-30)
}

fn t_cfg(out: &std::path::Path) -> RunConfig {
    RunConfig {
        steps: 3,
        seed: 7,
        data: Some(PathBuf::from("data/shakespeare/shakespeare.txt")),
        ..RunConfig::new(out)
    }
}

/// Three steps both ways from the same start; returns the worst relative errors (loss, weights).
fn compare(spec: &str, sets: &[&str]) -> (f64, f64) {
    let m = common::check_ok(spec, sets);
    let out = std::env::temp_dir().join(format!(
        "tessera-lowered-{}-{}",
        sets.join("_").replace(['.', '=', '/'], "-"),
        std::process::id()
    ));
    let cfg = t_cfg(&out);
    let mut t = Trainer::new(m.clone(), cfg).unwrap_or_else(|e| panic!("{sets:?}: {e}"));
    // The two paths sum some things in other orders (on one device the
    // runtime clips with a norm its update graph sums in f32, the program
    // with per-tensor sums in f64; the runtime computes experts over their
    // filled slots only): a gradient that is zero in exact arithmetic (the
    // attention key bias: softmax ignores a shift shared by all keys) is
    // rounding noise that AdamW scales to full-size updates, so no two
    // summation orders agree on it. Those elements are left out, as in
    // tests/parallel.rs (below 1e-6 of their tensor's largest gradient).
    // The same model on one device gives the gradients that say which elements those are.
    // (An explicit expert placement names ranks the single device does not have.)
    let one: Vec<String> = sets
        .iter()
        .filter(|x| !x.starts_with("parallel.experts.placement"))
        .map(|x| x.to_string())
        .chain(m.parallel.mesh.iter().map(|(axis, _)| format!("parallel.mesh.{axis}=1")))
        .collect();
    let one: Vec<&str> = one.iter().map(String::as_str).collect();
    let single = Trainer::new(common::check_ok(spec, &one), RunConfig { out: out.join("one"), ..t_cfg(&out) })
        .unwrap_or_else(|e| panic!("{sets:?} on one device: {e}"));
    let noise: Vec<Vec<bool>> = single
        .gradients()
        .expect("gradients")
        .iter()
        .map(|g| {
            let top = g.data.iter().fold(0f32, |a, b| a.max(b.abs()));
            g.data.iter().map(|x| x.abs() <= 1e-6 * top).collect()
        })
        .collect();
    let c = compile(&m).unwrap_or_else(|e| panic!("{sets:?}: {e}"));
    let lowered = LoweredRanks::new(&m, &c, &t.params, &t.opt).unwrap_or_else(|e| panic!("{sets:?}: {e}"));
    let train = m.train.clone().expect("trains");
    let mut worst_loss = 0f64;
    for step in 0..3 {
        let lr = optim::learning_rate(&train, step, t.tokens_per_step(), 3);
        let reports = {
            let inputs = |k: u64| t.batch_inputs(Split::Train, step, k);
            lowered.step(step, 7, lr, &inputs).unwrap_or_else(|e| panic!("{sets:?}: {e}"))
        };
        let want = t.train_step().unwrap_or_else(|e| panic!("{sets:?}: {e}"));
        // The ranks of the last pipeline stage hold the loss; the data ranks average it.
        let per_rank = step_loss(&reports).expect("a rank computes the loss");
        let e = (per_rank - want.loss).abs() / want.loss.abs();
        assert!(e <= 1e-6, "{spec} {sets:?} step {step}: lowered loss {per_rank}, runtime {} ({e:.1e})", want.loss);
        assert!(reports.iter().all(|r| r.updated));
        worst_loss = worst_loss.max(e);
    }
    t.sync();
    let (params, _) = lowered.logical(&m, &c, &t.opt).unwrap_or_else(|e| panic!("{sets:?}: {e}"));
    let mut worst = 0f64;
    for (k, (a, b)) in params.iter().zip(&t.params).enumerate() {
        let keep = |x: &[f32]| x.iter().zip(&noise[k]).filter(|(_, n)| !**n).map(|(v, _)| *v).collect::<Vec<f32>>();
        let e = rel(&keep(&a.data), &keep(&b.data));
        assert!(e <= 1e-6, "{spec} {sets:?}: `{}` differs by {e:.2e}", m.params[k].path);
        worst = worst.max(e);
    }
    let _ = std::fs::remove_dir_all(&out);
    eprintln!("{spec} {sets:?}: worst loss error {worst_loss:.1e}, worst weight error {worst:.1e}");
    (worst_loss, worst)
}

#[test]
fn single_device_programs_match_the_runtime() {
    // (`tessera train` feeds language models: BERT and ViT have other inputs.)
    compare(GPT, &[]);
    compare("specs/tiny/shakespeare.spec", &[]);
    compare(GPT, &with(SMALL, &["train.micro_batch=2"]));
    compare(MOE, &["parallel.mesh.data=1"]);
}

#[test]
fn data_and_zero_programs_match_the_runtime() {
    compare(GPT, &with(SMALL, DP2));
    for z in ["parallel.zero=1", "parallel.zero=2", "parallel.zero=3"] {
        compare(GPT, &with(&with(SMALL, DP2), &[z]));
    }
    compare(MOE, &["parallel.mesh.data=2"]);
    // Dropout: the masks come from (seed, the instruction's random stream), as the runtime's do.
    compare(
        "specs/models/gpt2-small.spec",
        &with(
            &["dims.layers=1", "dims.seq=16", "dims.embed=32", "dims.heads=2", "train.batch=4", "train.micro_batch=2"],
            DP2,
        ),
    );
}

#[test]
fn tensor_and_pipeline_programs_match_the_runtime() {
    compare(GPT, &with(&with(SMALL, TP2), &["parallel.sequence_parallel=true"]));
    compare(GPT, &with(&with(SMALL, TP2), &["parallel.layout.vocab=tensor"]));
    compare(GPT, &with(&with(SMALL, PP2), &["parallel.pipeline.schedule=1f1b"]));
    compare(GPT, &with(&with(SMALL, PP2), &["parallel.pipeline.schedule=gpipe", "parallel.recompute=full"]));
    compare(MOE, &["parallel.mesh.data=1", "parallel.mesh.expert=2", "parallel.layout.expert=expert"]);
}

/// The rest of `tests/parallel.rs`'s layouts: the MoE under ZeRO, tensor
/// parallelism (with sequence parallelism), expert parallelism over 2 and
/// 4 ranks with every placement, data × tensor for both models, and
/// data × tensor × pipeline. The experts run over their filled slots on
/// every one of them where a layout keeps dispatch and its readers on a rank.
#[test]
fn the_other_parallel_layouts_match_the_runtime() {
    let moe_one: &[&str] = &["parallel.mesh.data=1"];
    let moe_half: &[&str] = &["parallel.mesh.data=1", "train.micro_batch=4"];
    compare(GPT, &with(&with(SMALL, DP2), TP2));
    compare(
        GPT,
        &with(&with(&with(SMALL, DP2), TP2), &with(PP2, &["parallel.pipeline.schedule=1f1b", "train.batch=8"])),
    );
    compare(MOE, &with(&with(moe_half, DP2), &["parallel.zero=1"]));
    compare(MOE, &with(&with(moe_half, DP2), &["parallel.zero=3"]));
    compare(MOE, &with(moe_one, TP2));
    compare(MOE, &with(&with(moe_one, TP2), &["parallel.sequence_parallel=true"]));
    for (n, placement) in [
        ("parallel.mesh.expert=4", "parallel.experts.placement=round_robin"),
        ("parallel.mesh.expert=2", "parallel.experts.placement=round_robin"),
        ("parallel.mesh.expert=2", "parallel.experts.placement=[[3, 0], [1, 2]]"),
    ] {
        compare(MOE, &with(moe_one, &[n, "parallel.layout.expert=expert", placement]));
    }
    compare(MOE, &with(moe_half, &["parallel.mesh.data=2", "parallel.experts.placement=round_robin"]));
    compare(MOE, &with(&with(moe_half, DP2), TP2));
}

/// Fusion changes no result: the same programs with and without their
/// elementwise runs fused into kernels give the same losses and weights, bit
/// for bit (fused kernels do the same operations in the same order; nothing
/// is reassociated). Under data 2 with ZeRO 2 and under tensor 2 with
/// sequence parallelism; GPT-2's dropout included; AdamW's update and SGD's.
#[test]
fn fusion_changes_no_result() {
    use tessera::compiler::driver::{Passes, compile_with};
    let gpt2: &[&str] =
        &["dims.layers=1", "dims.seq=16", "dims.embed=32", "dims.heads=2", "train.batch=4", "train.micro_batch=2"];
    for (spec, sets) in [
        ("specs/models/gpt2-small.spec", with(&with(gpt2, DP2), &["parallel.zero=2"])),
        (GPT, with(&with(SMALL, TP2), &["parallel.sequence_parallel=true"])),
        // SGD's update fuses from plain elementwise ops (AdamW's from its decomposed moments and step).
        (GPT, with(SMALL, &["train.optimizer=sgd(lr = 0.1, momentum = 0.9, weight_decay = 0.01, nesterov = true)"])),
    ] {
        let m = common::check_ok(spec, &sets);
        let out = std::env::temp_dir().join(format!("tessera-fuse-{}", std::process::id()));
        let t = Trainer::new(m.clone(), t_cfg(&out)).unwrap_or_else(|e| panic!("{sets:?}: {e}"));
        let fused = compile_with(&m, None, Passes { verify: true, fuse: true, lower: true }).expect("compiles");
        let plain = compile_with(&m, None, Passes { verify: true, fuse: false, lower: true }).expect("compiles");
        let kernels = fused.programs[0].instrs.iter().filter(|i| i.kind.name() == "kernel").count();
        assert!(kernels > 0, "{sets:?}: no kernels were fused");
        assert!(plain.programs[0].instrs.iter().all(|i| i.kind.name() != "kernel"));
        let runs: Vec<LoweredRanks> =
            [&fused, &plain].iter().map(|c| LoweredRanks::new(&m, c, &t.params, &t.opt).expect("starts")).collect();
        let train = m.train.clone().expect("trains");
        for step in 0..2 {
            let lr = optim::learning_rate(&train, step, t.tokens_per_step(), 3);
            let inputs = |k: u64| t.batch_inputs(Split::Train, step, k);
            let a = runs[0].step(step, 7, lr, &inputs).expect("runs");
            let b = runs[1].step(step, 7, lr, &inputs).expect("runs");
            assert_eq!(a, b, "{sets:?} step {step}: the reports differ");
        }
        let (wa, _) = runs[0].logical(&m, &fused, &t.opt).expect("weights");
        let (wb, _) = runs[1].logical(&m, &plain, &t.opt).expect("weights");
        for (k, (x, y)) in wa.iter().zip(&wb).enumerate() {
            assert!(x.data == y.data, "{sets:?}: `{}` differs with fusion", m.params[k].path);
        }
        let _ = std::fs::remove_dir_all(&out);
        eprintln!("{sets:?}: {kernels} kernels on rank 0, the same bits");
    }
}
