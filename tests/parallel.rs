//! Parallel layouts on simulated ranks reproduce the single-device run: the
//! loss at each of 5 steps and the final weights, relative error ≤ 1e-5 in
//! fp32 (issue 4's acceptance test). A layout's single-device oracle is the
//! same spec with one rank and the same microbatches (`train.micro_batch`),
//! so MoE capacity and the load-balancing loss see the same tokens.

mod common;

use common::{rel, zero_gradient};
use std::path::{Path, PathBuf};
use tessera::compiler::{Options, SourceMap, check_path};
use tessera::runtime::tensor::Tensor;
use tessera::runtime::train::RunConfig;

fn model(spec: &str, sets: &[&str]) -> tessera::compiler::Model {
    let mut sources = SourceMap::new();
    let opts = Options { overrides: sets.iter().map(|s| s.to_string()).collect(), model: None, micro_batch: None };
    match check_path(&mut sources, Path::new(spec), &opts) {
        Ok(m) => m,
        Err(d) => panic!("{spec} {sets:?} does not check:\n{}", tessera::compiler::diag::render(&sources, &d.0)),
    }
}

fn cfg(out: &Path) -> RunConfig {
    RunConfig {
        steps: 5,
        seed: 7,
        data: Some(PathBuf::from("data/shakespeare/shakespeare.txt")),
        ..RunConfig::new(out)
    }
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tessera-par-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

struct Run {
    losses: Vec<f64>,
    weights: Vec<Tensor<f32>>,
    /// The first step's gradients (single-device runs only).
    grads: Vec<Tensor<f32>>,
}

/// Losses of 5 steps and the final logical weights.
fn train(spec: &str, sets: &[&str]) -> Run {
    let out = tmp(&format!("{}-{}", spec.replace(['.', '/'], "-"), sets.join("_").replace(['.', '=', '/'], "-")));
    let m = model(spec, sets);
    // Image models train on the digits, the others on the Shakespeare text.
    let images = m.inputs.iter().any(|i| i.name == "images");
    let data =
        Some(PathBuf::from(if images { "data/digits/digits.jsonl" } else { "data/shakespeare/shakespeare.txt" }));
    let mut t = common::trainer(&m, RunConfig { data, ..cfg(&out) }).unwrap_or_else(|e| panic!("{sets:?}: {e}"));
    let one = t.training.step.programs.len() == 1;
    let grads = if one { t.reference_gradients().expect("gradients") } else { Vec::new() };
    let mut losses: Vec<f64> =
        (0..5).map(|_| t.train_step().unwrap_or_else(|e| panic!("{sets:?}: {e}")).loss).collect();
    // Validation reads the ranks' current weights.
    losses.push(t.evaluate(1).expect("evaluates"));
    let _ = std::fs::remove_dir_all(&out);
    Run { losses, weights: t.weights().expect("weights"), grads }
}

fn same(spec: &str, base: &[&str], layout: &[&str]) {
    within(spec, base, layout, 1e-5);
}

/// [`same`] with relative bound `bound` on the losses and the final weights.
fn within(spec: &str, base: &[&str], layout: &[&str], bound: f64) {
    let single = train(spec, base);
    let sets: Vec<&str> = base.iter().chain(layout).copied().collect();
    let run = train(spec, &sets);
    for (step, (a, b)) in run.losses.iter().zip(&single.losses).enumerate() {
        let e = (a - b).abs() / b.abs();
        assert!(e <= bound, "{layout:?}: loss {} is {a}, single device {b} (rel. error {e:.2e})", step + 1);
    }
    let m = model(spec, base);
    let (mut excluded, mut total, mut worst, mut worst_at) = (0, 0, 0f64, String::new());
    for (k, (a, b)) in run.weights.iter().zip(&single.weights).enumerate() {
        let g = &single.grads[k].data;
        let keep: Vec<usize> = (0..g.len()).filter(|&i| !zero_gradient(g, i)).collect();
        // Exact zeros (rows of an untied embedding for bytes the batch lacks)
        // are not counted against the limit below.
        excluded += (0..g.len()).filter(|&i| g[i] != 0.0 && zero_gradient(g, i)).count();
        total += g.len();
        let pick = |t: &Tensor<f32>| keep.iter().map(|&i| t.data[i]).collect::<Vec<f32>>();
        let e = rel(&pick(a), &pick(b));
        assert!(e <= bound, "{layout:?}: final `{}` differs from single device by {e:.2e}", m.params[k].path);
        if e > worst {
            worst = e;
            worst_at = m.params[k].path.clone();
        }
    }
    let loss_err = run.losses.iter().zip(&single.losses).map(|(a, b)| (a - b).abs() / b.abs()).fold(0.0, f64::max);
    eprintln!(
        "{spec} {layout:?}: worst loss error {loss_err:.1e}, worst weight error {worst:.1e} (`{worst_at}`), {excluded} weights left out"
    );
    // Only the degenerate elements are left out (the key biases: 2 layers × 64).
    assert!(excluded <= 2 * 64 + total / 1000, "{layout:?}: {excluded} of {total} weights have zero gradients");
}

const GPT: &str = "specs/tiny/gpt.spec";
const MOE: &str = "specs/tiny/moe.spec";
/// The tiny MoE on one rank (its spec lays experts over the data axis).
const MOE_ONE: &[&str] = &["parallel.mesh.data=1"];
/// The tiny MoE on one rank with one data rank's microbatch (4 of 8 sequences).
const MOE_HALF: &[&str] = &["parallel.mesh.data=1", "train.micro_batch=4"];
const GPT_HALF: &[&str] = &["train.micro_batch=4"];

const DP2: &[&str] = &["parallel.mesh.data=2", "parallel.layout.batch=data"];
const TP2: &[&str] = &["parallel.mesh.tensor=2", "parallel.layout.heads=tensor", "parallel.layout.mlp=tensor"];

fn with<'a>(a: &[&'a str], b: &[&'a str]) -> Vec<&'a str> {
    a.iter().chain(b).copied().collect()
}

#[test]
fn gpt_dp2() {
    // A step's batch is the same sequences however it is split: dp2 runs
    // microbatches of 4 against the single device's one of 8.
    same(GPT, &[], DP2);
}

#[test]
fn gpt_zero1_zero2_zero3_dp2() {
    for z in ["parallel.zero=1", "parallel.zero=2", "parallel.zero=3"] {
        same(GPT, GPT_HALF, &with(DP2, &[z]));
    }
}

/// `precision = bf16`: bf16 weights and activations, f32 master weights,
/// gradients and optimizer state. A layout that sums every value in the
/// single device's order (data parallel and ZeRO 1–3 over the same
/// microbatches) reproduces the single-device bf16 run as closely as f32
/// runs do (1e-5; measured: the same weights). A layout that sums in
/// another order agrees to bf16's precision: a pipeline's microbatches
/// split the weight gradients' sums, and tensor parallelism rounds each
/// rank's partial sums to bf16 before they are added (as Megatron's bf16
/// all-reduce does), and a last-bit f32 difference can flip the rounding
/// of a weight or an activation to bf16 (2⁻⁹ relative). Bounded here at
/// 1e-2 over the run, about 4 such roundings.
#[test]
fn bf16_layouts_reproduce_the_single_device_bf16_run() {
    let bf16 = with(GPT_HALF, &["train.precision=bf16"]);
    same(GPT, &bf16, DP2);
    for z in ["parallel.zero=1", "parallel.zero=3"] {
        same(GPT, &bf16, &with(DP2, &[z]));
    }
    let one = &["train.precision=bf16"];
    // And bf16 trains the model f32 does: the losses agree to 1%.
    let (b, f) = (train(GPT, one), train(GPT, &[]));
    for (step, (x, y)) in b.losses.iter().zip(&f.losses).enumerate() {
        assert!((x - y).abs() <= 1e-2 * y, "step {step}: bf16 loss {x}, f32 {y}");
    }
    within(GPT, one, &pp2("parallel.pipeline.schedule=1f1b"), 1e-2);
    within(GPT, one, TP2, 1e-2);
}

#[test]
fn gpt_tp2_and_sequence_parallel() {
    same(GPT, &[], TP2);
    same(GPT, &[], &with(TP2, &["parallel.sequence_parallel=true"]));
}

/// Megatron's vocabulary-parallel embedding and cross-entropy: the tied
/// table's rows split over the tensor axis.
#[test]
fn vocab_parallel_embedding_and_cross_entropy() {
    let vocab = with(TP2, &["parallel.layout.vocab=tensor"]);
    same(GPT, &[], &vocab);
    same(GPT, &[], &with(&vocab, &["parallel.sequence_parallel=true"]));
    same(MOE, MOE_ONE, &vocab);
    // The program has no gather of the logits: the loss reduces three per-token values.
    let m = model(GPT, &vocab);
    let loss = m.graph.output("loss").expect("loss");
    let bw = tessera::compiler::autodiff::differentiate(&m.graph, loss).expect("differentiates");
    let p = tessera::compiler::parallel::shard(&m, &bw, 1).expect("shards");
    let text = p.graph.to_text();
    assert!(
        text.contains("embed_rows(") && text.contains("target_logit(") && text.contains("cross_entropy_grad_rows(")
    );
    assert!(!text.lines().any(|l| l.contains("all_gather") && l.contains("vocab")), "{text}");
}

/// Adafactor under every layout that cuts its factored moments: tensor
/// parallelism cuts `mlp` (a w_in's column dim: its row means are
/// all-reduced over `tensor`) and `heads` (kept whole by the moments, but
/// in every RMS), vocabulary parallelism cuts the embedding's column dim,
/// a pipeline stage holds its layers' moments (one RMS per layer), data
/// parallelism replicates them. Each gives the single device's losses and
/// weights within 1e-5. The attention's qkv bias is frozen: its key part's
/// gradient is zero in exact arithmetic, and Adafactor would spread the
/// rounding noise there (a full-size update, as Adam's) over the whole
/// tensor through its RMS, which no layout can reproduce.
#[test]
fn adafactor_factored_moments_under_every_layout() {
    // factor_min = 16 factors the tiny model's matrices (the default 128 would factor none).
    let af = &[
        "train.optimizer=adafactor(lr = 1e-2, beta1 = 0.9, weight_decay = 0.1, factor_min = 16)",
        "train.freeze=\"*.bqkv\"",
    ];
    same(GPT, af, DP2);
    same(GPT, af, &with(TP2, &["parallel.layout.vocab=tensor", "parallel.sequence_parallel=true"]));
    same(GPT, af, &with(DP2, &pp2("parallel.pipeline.schedule=1f1b")));
    same(MOE, &with(MOE_ONE, af), &["parallel.mesh.expert=2", "parallel.layout.expert=expert"]);
    // The tensor-parallel update all-reduces its means over `tensor` (the
    // moments of w_in's cut mlp, the RMS of every cut weight and update).
    let c = tessera::compiler::driver::compile(&model(GPT, &with(af, TP2))).expect("compiles");
    let p = &c.programs[0];
    let at = p.phases.iter().find(|ph| ph.name == "optimizer update").expect("an update phase").at as usize;
    let sums = p.instrs[at..]
        .iter()
        .filter(|i| matches!(&i.kind, tessera::compiler::lower::Kind::Collective { axis, .. } if axis == "tensor"))
        .count();
    assert!(sums > 10, "{sums} all-reduces over `tensor` in the update");
}

/// A run with Adafactor's factored state moves between layouts through its
/// checkpoints (the sharded one cuts the row and column moments as the
/// layout cuts their dims) and resumes as if nothing had moved.
#[test]
fn adafactor_state_moves_between_layouts() {
    let af = "train.optimizer=adafactor(lr = 1e-2, beta1 = 0.9, factor_min = 16)";
    // As above, the qkv bias is frozen.
    let bqkv = "train.freeze=\"*.bqkv\"";
    let tp = with(&[af, bqkv, "parallel.layout.vocab=tensor"], TP2);
    moves(GPT, &[(tp, 3), (with(&[af, bqkv], &pp2("parallel.pipeline.schedule=1f1b")), 2), (vec![af, bqkv], 1)]);
}

/// A contrastive loss over the batch (CLIP's: each example against every
/// example of the global batch, `rename(x, batch -> other)`) means the same
/// under data parallelism: each rank's program gathers the other side over
/// the data axis and reduce-scatters its gradient back, so dp2 and dp4
/// reproduce one device's losses and weights within 1e-5. Without the
/// gather each rank contrasts its own examples only: dp2's first loss was
/// then ln 4 = 1.385 against one device's ln 8 = 2.079 (measured by
/// disabling it).
#[test]
fn contrastive_loss_means_the_global_batch_under_data_parallelism() {
    // Global microbatch k holds examples k·micro.., each labelled with its index in the batch.
    contrastive_layouts("tests/specs/contrastive.spec", &[DP2, DP4], |m, k| {
        let rows: Vec<u64> = (k * m.micro_batch..(k + 1) * m.micro_batch).collect();
        let tokens = rows.iter().flat_map(|&r| (0..8u64).map(move |p| ((r * 37 + p * 11) % 256) as f32)).collect();
        vec![
            Tensor { dims: m.inputs[0].ty.dims.clone(), data: tokens },
            Tensor { dims: m.inputs[1].ty.dims.clone(), data: rows.iter().map(|&r| r as f32).collect() },
        ]
    });
}

const DP4: &[&str] = &["parallel.mesh.data=4", "parallel.layout.batch=data"];

/// CLIP-tiny (`specs/tiny/clip.spec`): a text and an image tower of
/// different widths built from the same standard layers, and the symmetric
/// contrastive loss in both directions. dp2, dp4 and a tensor-parallel
/// layout over both towers' heads and MLPs (dp2 × tp2) reproduce one
/// device's losses and final weights within 1e-5.
#[test]
fn clip_tiny_under_data_and_tensor_parallelism() {
    const TP: &[&str] = &[
        "parallel.mesh.data=2",
        "parallel.mesh.tensor=2",
        "parallel.layout.batch=data",
        "parallel.layout.text_heads=tensor",
        "parallel.layout.text_mlp=tensor",
        "parallel.layout.image_heads=tensor",
        "parallel.layout.image_mlp=tensor",
    ];
    contrastive_layouts("specs/tiny/clip.spec", &[DP2, DP4, TP], |m, k| {
        let micro = m.micro_batch;
        let rows: Vec<u64> = (k * micro..(k + 1) * micro).collect();
        // Captions and images that differ by example, so the contrast is learnable.
        let captions = rows.iter().flat_map(|&r| (0..8u64).map(move |p| ((r * 29 + p * 13) % 256) as f32)).collect();
        let pixels = m.inputs[1].ty.numel() / micro;
        let images = rows
            .iter()
            .flat_map(|&r| (0..pixels).map(move |i| (((r * 7919 + i * 104_729) % 1000) as f32 / 500.0) - 1.0))
            .collect();
        vec![
            Tensor { dims: m.inputs[0].ty.dims.clone(), data: captions },
            Tensor { dims: m.inputs[1].ty.dims.clone(), data: images },
        ]
    });
}

/// Trains `spec` 5 steps on one device and under each layout, feeding global
/// microbatch k the inputs `inputs(model, k)`, and compares losses and final
/// weights within 1e-5, leaving out the weights whose gradient is zero in
/// exact arithmetic (the attention key biases, see [`zero_gradient`]).
fn contrastive_layouts(
    spec: &str,
    layouts: &[&[&str]],
    inputs: impl Fn(&tessera::compiler::Model, u64) -> Vec<Tensor<f32>> + Copy + Sync,
) {
    // Losses, final weights, and on one device the reference's first loss and gradients.
    type Reference = (f64, Vec<Tensor<f32>>);
    let run = |sets: &[&str]| -> (Vec<f64>, Vec<Tensor<f32>>, Reference) {
        let m = model(spec, sets);
        let out = tmp(&format!("contrastive-{}", sets.join("-").replace(['.', '=', '/'], "")));
        // A model with `tokens` and `targets` opens data (labelled examples
        // here); the steps below feed their own inputs either way.
        let fed = m.inputs.iter().any(|i| i.name == "tokens");
        let data = fed.then(|| PathBuf::from("data/shakespeare/genres.jsonl"));
        let mut t = common::trainer(&m, RunConfig { data, ..cfg(&out) }).unwrap_or_else(|e| panic!("{e}"));
        let feed = |k: u64| inputs(&m, k);
        let reference = if sets.is_empty() {
            let w = t.weights().expect("weights");
            let dropout = Some(cfg(&out).seed);
            tessera::runtime::train::reference::gradients(&t.training.step, &w, dropout, t.accumulation, &feed)
                .expect("gradients")
        } else {
            (0.0, Vec::new())
        };
        let losses = (0..5).map(|_| t.train_step_on(&feed).expect("step").loss).collect();
        let _ = std::fs::remove_dir_all(&out);
        (losses, t.weights().expect("weights"), reference)
    };
    let (one, w1, (first, grads)) = run(&[]);
    // The one-device program's first loss is the reference interpreter's.
    assert!(
        (one[0] - first).abs() <= 1e-5 * first.abs(),
        "{spec}: first loss {} against the reference {first}",
        one[0]
    );
    let m = model(spec, &[]);
    for layout in layouts {
        let (losses, w, _) = run(layout);
        for (step, (a, b)) in losses.iter().zip(&one).enumerate() {
            assert!((a - b).abs() <= 1e-5 * b.abs(), "{layout:?}: loss {} is {a}, one device {b}", step + 1);
        }
        let (mut excluded, mut total, mut worst) = (0, 0, 0f64);
        for (k, (x, y)) in w.iter().zip(&w1).enumerate() {
            let g = &grads[k].data;
            let keep: Vec<usize> = (0..g.len()).filter(|&i| !zero_gradient(g, i)).collect();
            // Exact zeros (embedding rows of absent tokens) are not counted.
            excluded += (0..g.len()).filter(|&i| g[i] != 0.0 && zero_gradient(g, i)).count();
            total += g.len();
            let pick = |t: &Tensor<f32>| keep.iter().map(|&i| t.data[i]).collect::<Vec<f32>>();
            let e = rel(&pick(x), &pick(y));
            assert!(e <= 1e-5, "{layout:?}: final `{}` differs from one device by {e:.1e}", m.params[k].path);
            worst = worst.max(e);
        }
        let loss_err = losses.iter().zip(&one).map(|(a, b)| (a - b).abs() / b.abs()).fold(0.0, f64::max);
        eprintln!(
            "{spec} {layout:?}: worst loss error {loss_err:.1e}, worst weight error {worst:.1e}, {excluded} left out"
        );
        // Only the key biases are left out, and a few weights beside them.
        let keys: u64 = m.params.iter().filter(|p| p.path.ends_with("bqkv")).map(|p| p.ty.numel() / 3).sum();
        assert!(excluded as u64 <= keys + total as u64 / 1000, "{layout:?}: {excluded} of {total} weights left out");
    }
    assert!(one[4] < one[0], "{spec} trains: {one:?}");
}

/// A convolutional network (`specs/tiny/digits-cnn.spec`: convolutions,
/// BatchNorm, max pooling, a residual block) on the digits under data
/// parallelism (BatchNorm's statistics all-reduced over the data ranks, as
/// SyncBatchNorm's) and under tensor parallelism over its channels (the
/// first convolution's output channels split, the second's input channels
/// summed across the tensor ranks), as one device.
#[test]
fn digits_cnn_under_data_and_tensor_parallelism() {
    const CNN: &str = "specs/tiny/digits-cnn.spec";
    same(CNN, &[], DP2);
    same(CNN, &[], &["parallel.mesh.data=4", "parallel.layout.batch=data"]);
    same(CNN, &[], &["parallel.mesh.tensor=2", "parallel.layout.c1=tensor"]);
}

/// Batch statistics over data and tensor ranks at once: each tensor rank
/// normalizes its channels with statistics all-reduced over the data ranks.
#[test]
fn batch_norm_under_data_and_tensor_parallelism() {
    const BN: &str = "tests/specs/batch-norm.spec";
    same(BN, &[], DP2);
    same(BN, &[], &with(DP2, &["parallel.mesh.tensor=2", "parallel.layout.c1=tensor"]));
}

#[test]
fn gpt_dp2_tp2() {
    same(GPT, &[], &with(DP2, TP2));
}

/// Small gradient buckets, each reduced on the communication stream while
/// the backward pass goes on: the same steps as one device, whether a
/// bucket is all-reduced, reduce-scattered (ZeRO 2), or a partial gradient
/// is summed over `tensor` and then over `data` on the same stream.
#[test]
fn overlapped_buckets() {
    same(GPT, GPT_HALF, &with(DP2, &["parallel.bucket=8Ki"]));
    same(GPT, GPT_HALF, &with(DP2, &["parallel.bucket=8Ki", "parallel.zero=2"]));
    same(GPT, &[], &with(&with(DP2, TP2), &["parallel.bucket=8Ki", "parallel.sequence_parallel=true"]));
}

#[test]
fn moe_dp2_and_zero() {
    same(MOE, MOE_HALF, DP2);
    same(MOE, MOE_HALF, &with(DP2, &["parallel.zero=1"]));
    same(MOE, MOE_HALF, &with(DP2, &["parallel.zero=3"]));
}

#[test]
fn moe_tp2_and_sequence_parallel() {
    same(MOE, MOE_ONE, TP2);
    same(MOE, MOE_ONE, &with(TP2, &["parallel.sequence_parallel=true"]));
}

#[test]
fn moe_expert_parallel() {
    let ep = |n: &'static str, placement: &'static str| vec![n, "parallel.layout.expert=expert", placement];
    same(MOE, MOE_ONE, &ep("parallel.mesh.expert=2", "parallel.experts.placement=blocked"));
    same(MOE, MOE_ONE, &ep("parallel.mesh.expert=4", "parallel.experts.placement=round_robin"));
    same(MOE, MOE_ONE, &ep("parallel.mesh.expert=2", "parallel.experts.placement=round_robin"));
    same(MOE, MOE_ONE, &ep("parallel.mesh.expert=2", "parallel.experts.placement=[[3, 0], [1, 2]]"));
}

#[test]
fn moe_dp2_ep2_over_the_data_axis() {
    // The spec's own layout: experts over the data axis, tokens exchanged by all-to-all.
    same(MOE, MOE_HALF, &["parallel.mesh.data=2"]);
    same(MOE, MOE_HALF, &["parallel.mesh.data=2", "parallel.experts.placement=round_robin"]);
}

#[test]
fn moe_dp2_tp2() {
    same(MOE, MOE_HALF, &with(DP2, TP2));
}

/// Every layout's per-rank program: rank 0's IR with its collectives is a
/// snapshot, and the collective check passes over all ranks.
#[test]
fn per_rank_programs() {
    use tessera::compiler::parallel::{self, Mesh, check};
    let small: &[&str] = &["dims.seq=8", "dims.embed=16", "train.batch=4"];
    let layouts: Vec<(&str, &str, Vec<&str>)> = vec![
        ("gpt_dp2", GPT, DP2.to_vec()),
        ("gpt_zero1_dp2", GPT, with(DP2, &["parallel.zero=1"])),
        ("gpt_zero3_dp2", GPT, with(DP2, &["parallel.zero=3"])),
        ("gpt_tp2", GPT, TP2.to_vec()),
        ("gpt_tp2_sp", GPT, with(TP2, &["parallel.sequence_parallel=true"])),
        ("gpt_dp2_tp2", GPT, with(DP2, TP2)),
        (
            "moe_ep2_blocked",
            MOE,
            vec!["parallel.mesh.data=1", "parallel.mesh.expert=2", "parallel.layout.expert=expert"],
        ),
        (
            "moe_ep4_round_robin",
            MOE,
            vec![
                "parallel.mesh.data=1",
                "parallel.mesh.expert=4",
                "parallel.layout.expert=expert",
                "parallel.experts.placement=round_robin",
            ],
        ),
        ("moe_dp2_ep2_data", MOE, vec![]),
        ("moe_tp2", MOE, with(&["parallel.mesh.data=1"], TP2)),
        ("gpt_tp2_vocab", GPT, with(TP2, &["parallel.layout.vocab=tensor"])),
        ("gpt_pp2_1f1b", GPT, pp2("parallel.pipeline.schedule=1f1b")),
        (
            "gpt_dp2_tp2_pp2",
            GPT,
            with(&with(&with(DP2, TP2), &pp2("parallel.pipeline.schedule=1f1b")), &["train.batch=8"]),
        ),
    ];
    for (name, spec, sets) in layouts {
        let m = model(spec, &with(small, &sets));
        let loss = m.graph.output("loss").expect("loss");
        let bw = tessera::compiler::autodiff::differentiate(&m.graph, loss).expect("differentiates");
        let programs = parallel::shard_all(&m, &bw).unwrap_or_else(|e| panic!("{name}: {e}"));
        check::check(&programs, &Mesh::of(&m).expect("mesh")).unwrap_or_else(|e| panic!("{name}: {e}"));
        insta::assert_snapshot!(format!("rank0_{name}"), programs[0].to_text());
    }
}

/// The collective check finds a program broken on purpose: the rank, the
/// op and what differs.
#[test]
fn collective_check_reports_a_broken_program() {
    use tessera::compiler::ir::Op;
    use tessera::compiler::parallel::{self, Mesh, check};
    let m = model(GPT, &with(&["dims.seq=8", "dims.embed=16", "train.batch=4"], &with(DP2, TP2)));
    let mesh = Mesh::of(&m).expect("mesh");
    let loss = m.graph.output("loss").expect("loss");
    let bw = tessera::compiler::autodiff::differentiate(&m.graph, loss).expect("differentiates");
    let programs = parallel::shard_all(&m, &bw).expect("shards");
    check::check(&programs, &mesh).expect("the programs agree");
    let first_all_reduce = |p: &parallel::RankProgram| {
        p.graph.nodes.iter().position(|n| matches!(n.op, Op::AllReduce { .. })).expect("one")
    };

    // Rank 1 gathers where its tensor group reduces.
    let mut broken = programs.clone();
    let at = first_all_reduce(&broken[1]);
    broken[1].graph.nodes[at].op = Op::AllGather { axis: "tensor".into(), dim: "embed".into() };
    let e = check::check(&broken, &mesh).expect_err("a mismatch").to_string();
    assert!(
        e.contains("rank 0") && e.contains("all_reduce") && e.contains("rank 1") && e.contains("all_gather"),
        "{e}"
    );
    assert!(e.contains(&format!("%{at}")), "{e}");

    // Rank 3 skips a collective: its group waits forever.
    let mut broken = programs.clone();
    let at = first_all_reduce(&broken[3]);
    let ty = broken[3].graph.nodes[at].ty.clone();
    broken[3].graph.nodes[at].op = Op::Select { dim: ty.dims[0].name.clone(), indices: (0..ty.dims[0].size).collect() };
    let e = check::check(&broken, &mesh).expect_err("a mismatch").to_string();
    assert!(e.contains("rank 2") && e.contains("rank 3"), "{e}");

    // Rank 0 reduces a tensor of another shape.
    let mut broken = programs;
    let at = first_all_reduce(&broken[0]);
    let x = broken[0].graph.nodes[at].inputs[0];
    broken[0].graph.nodes[at].inputs[0] = tessera::compiler::ir::ValueId(x.0 - 1);
    let e = check::check(&broken, &mesh).expect_err("a mismatch").to_string();
    assert!(e.contains("does not match"), "{e}");
}

/// Train `steps` more steps of `spec` under `sets`, resuming from `from`, saving into `out`.
fn leg(spec: &str, sets: &[&str], from: Option<&Path>, out: &Path, steps: u64) -> (Vec<f64>, Vec<Tensor<f32>>) {
    let mut c = cfg(out);
    c.resume = from.map(Path::to_path_buf);
    c.steps = 6;
    let mut t = common::trainer(&model(spec, sets), c).unwrap_or_else(|e| panic!("{sets:?}: {e}"));
    let until = t.step + steps;
    let mut losses = Vec::new();
    while t.step < until {
        losses.push(t.train_step().unwrap_or_else(|e| panic!("{sets:?}: {e}")).loss);
    }
    t.save().expect("save");
    (losses, t.weights().expect("weights"))
}

/// Checkpoints hold logical tensors: one written under a layout loads under
/// any other and training goes on as if nothing had moved.
fn moves(spec: &str, legs: &[(Vec<&str>, u64)]) {
    let single = legs.last().expect("legs").0.clone();
    let dir = tmp(&format!("moves-{}", spec.replace(['/', '.'], "-")));
    let (straight, w0) = leg(spec, &single, None, &dir.join("straight"), 6);
    let mut losses = Vec::new();
    let mut from: Option<PathBuf> = None;
    let mut w1 = Vec::new();
    for (k, (sets, steps)) in legs.iter().enumerate() {
        let out = dir.join(format!("leg{k}"));
        let (l, w) = leg(spec, sets, from.as_deref(), &out, *steps);
        losses.extend(l);
        w1 = w;
        from = Some(out);
    }
    for (step, (a, b)) in losses.iter().zip(&straight).enumerate() {
        let e = (a - b).abs() / b.abs();
        assert!(e <= 1e-5, "step {}: {a} after moving, {b} straight (rel. error {e:.2e})", step + 1);
    }
    assert_eq!(losses.len(), straight.len());
    let m = model(spec, &single);
    let grads =
        common::trainer(&m, cfg(&dir.join("grads"))).expect("trainer").reference_gradients().expect("gradients");
    for (k, (a, b)) in w1.iter().zip(&w0).enumerate() {
        // Elements with zero gradients are left out (see `zero_gradient`).
        let g = &grads[k].data;
        let keep: Vec<usize> = (0..g.len()).filter(|&i| !zero_gradient(g, i)).collect();
        let pick = |t: &Tensor<f32>| keep.iter().map(|&i| t.data[i]).collect::<Vec<f32>>();
        let e = rel(&pick(a), &pick(b));
        assert!(e <= 1e-5, "final `{}` differs by {e:.2e} after moving between layouts", m.params[k].path);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn checkpoints_move_between_layouts() {
    let tp_pp = with(TP2, &pp2("parallel.pipeline.schedule=1f1b"));
    moves(GPT, &[(tp_pp, 3), (vec!["parallel.mesh.data=4", "parallel.layout.batch=data"], 2), (vec![], 1)]);
    let ep_rr = vec![
        "parallel.mesh.data=1",
        "parallel.mesh.expert=2",
        "parallel.layout.expert=expert",
        "parallel.experts.placement=round_robin",
    ];
    moves(MOE, &[(ep_rr, 3), (with(MOE_ONE, &with(TP2, &["parallel.zero=1"])), 2), (MOE_ONE.to_vec(), 1)]);
}

/// LoRA (`train.lora`) under every layout: only the adapters train, the
/// frozen weights end bit for bit where they started, and every layout
/// (data, tensor and pipeline parallel, ZeRO 1–3) gives the single
/// device's losses and final weights within 1e-5. Tensor parallelism splits
/// each adapter as it splits its weight (B of a column-parallel wqkv or
/// w_in over heads or mlp, A of a row-parallel wo or w_out).
#[test]
fn lora_trains_the_adapters_alone_under_every_layout() {
    let lora =
        ["train.lora.rank=4", "train.lora.alpha=8", r#"train.lora.targets=["*.wqkv", "*.wo", "*.w_in", "*.w_out"]"#];
    let m = model(GPT, &lora);
    let adapters: Vec<usize> = (0..m.params.len()).filter(|&k| m.params[k].adapter_of.is_some()).collect();
    assert_eq!(adapters.len(), 8, "A and B for four weights");
    assert!(m.params.iter().all(|p| p.frozen == p.adapter_of.is_none()), "only adapters train");
    let single = train(GPT, &lora);
    let init = tessera::runtime::init::init_params::<f32>(&m.params, 7);
    for (k, p) in m.params.iter().enumerate() {
        let (end, start) = (&single.weights[k].data, &init[k].data);
        if p.frozen {
            assert!(end.iter().zip(start).all(|(a, b)| a.to_bits() == b.to_bits()), "frozen `{}` moved", p.path);
        } else {
            assert!(end != start, "adapter `{}` did not train", p.path);
        }
    }
    assert!(single.losses[4] < single.losses[0], "the adapters lower the loss: {:?}", single.losses);
    let half = with(&lora, GPT_HALF);
    let single_half = train(GPT, &half);
    for (base, layout, reference) in [
        (&lora[..], DP2.to_vec(), &single),
        (&lora[..], TP2.to_vec(), &single),
        (&half[..], with(DP2, &["parallel.zero=1"]), &single_half),
        (&half[..], with(DP2, &["parallel.zero=2"]), &single_half),
        (&half[..], with(DP2, &["parallel.zero=3"]), &single_half),
        (&lora[..], pp2("parallel.pipeline.schedule=1f1b"), &single),
    ] {
        let run = train(GPT, &with(base, &layout));
        for (step, (a, b)) in run.losses.iter().zip(&reference.losses).enumerate() {
            let e = (a - b).abs() / b.abs();
            assert!(e <= 1e-5, "{layout:?}: loss {} is {a}, single device {b}", step + 1);
        }
        for (k, (a, b)) in run.weights.iter().zip(&reference.weights).enumerate() {
            let e = rel(&a.data, &b.data);
            assert!(e <= 1e-5, "{layout:?}: final `{}` differs from single device by {e:.2e}", m.params[k].path);
        }
    }
}

fn pp2(schedule: &'static str) -> Vec<&'static str> {
    vec!["parallel.mesh.pipeline=2", "parallel.layout.layer=pipeline", schedule, "parallel.pipeline.microbatches=4"]
}

#[test]
fn gpt_pipeline_schedules() {
    same(GPT, &[], &pp2("parallel.pipeline.schedule=gpipe"));
    same(GPT, &[], &pp2("parallel.pipeline.schedule=1f1b"));
    // Interleaved: 2 stages × 2 virtual stages need 4 layers.
    let four = &["dims.layers=4"];
    same(GPT, four, &with(&pp2("parallel.pipeline.schedule=interleaved_1f1b"), &["parallel.pipeline.virtual=2"]));
}

/// With `recompute = full` a stage keeps only a chunk's inputs and
/// recomputes its forward in the backward pass; without, it keeps the
/// forward pass's values until the gradient arrives. Both match.
#[test]
fn pipeline_with_and_without_recompute() {
    let one_f_one_b = pp2("parallel.pipeline.schedule=1f1b");
    same(GPT, &[], &with(&one_f_one_b, &["parallel.recompute=full"]));
    same(GPT, &[], &with(&with(&one_f_one_b, TP2), &["parallel.recompute=full", "parallel.sequence_parallel=true"]));
    let m = model(GPT, &one_f_one_b);
    let loss = m.graph.output("loss").expect("loss");
    let bw = tessera::compiler::autodiff::differentiate(&m.graph, loss).expect("differentiates");
    let p = tessera::compiler::parallel::shard(&m, &bw, 0).expect("shards");
    assert!(p.stage.expect("a stage").chunks.iter().all(|c| c.split.is_some() && c.forward.is_empty()));
}

#[test]
fn gpt_pipeline_with_data_and_tensor() {
    let one_f_one_b = pp2("parallel.pipeline.schedule=1f1b");
    same(GPT, &[], &with(DP2, &one_f_one_b));
    same(GPT, &[], &with(TP2, &one_f_one_b));
    // World 8: data 2 × tensor 2 × pipeline 2.
    same(GPT, &[], &with(&with(DP2, TP2), &one_f_one_b));
}

#[test]
fn moe_pipeline() {
    // Four microbatches of 2 sequences: the single device runs the same ones.
    let quarter = &["parallel.mesh.data=1", "train.micro_batch=2"];
    let pp = |s: &'static str| vec!["parallel.mesh.pipeline=2", "parallel.layout.layer=pipeline", s];
    same(MOE, quarter, &pp("parallel.pipeline.schedule=gpipe"));
    same(MOE, quarter, &pp("parallel.pipeline.schedule=1f1b"));
    same(MOE, quarter, &with(&pp("parallel.pipeline.schedule=1f1b"), TP2));
    // Interleaved: 4 layers (two of them MoE) over 2 stages × 2 virtual stages.
    let four = &["parallel.mesh.data=1", "train.micro_batch=2", "dims.layers=4"];
    same(MOE, four, &with(&pp("parallel.pipeline.schedule=interleaved_1f1b"), &["parallel.pipeline.virtual=2"]));
    // Data 2 × pipeline 2 (two microbatches of 2 per data rank), and world 8 with tensor 2.
    let dp_pp = with(DP2, &pp("parallel.pipeline.schedule=1f1b"));
    same(MOE, quarter, &dp_pp);
    same(MOE, quarter, &with(&dp_pp, TP2));
}

/// Dropout: masks are keyed by the node that draws them, and a gradient
/// names its forward node's id in the rank's own program. Data-parallel
/// ranks run the single-device program's nodes and so its masks; a tensor
/// split draws its own masks (as Megatron's split regions do) and still
/// trains consistently.
#[test]
fn dropout_on_ranks() {
    const DROP: &str = "tests/specs/gpt-dropout.spec";
    same(DROP, &["train.micro_batch=4"], DP2);
    let run = train(DROP, TP2);
    assert!(run.losses.iter().all(|l| l.is_finite()));
    assert!(run.losses[4] < run.losses[0], "{:?}", run.losses);
    // Each dropout gradient regenerates the mask of a dropout node of the same program.
    let m = model(DROP, TP2);
    let loss = m.graph.output("loss").expect("loss");
    let bw = tessera::compiler::autodiff::differentiate(&m.graph, loss).expect("differentiates");
    let p = tessera::compiler::parallel::shard(&m, &bw, 1).expect("shards");
    for n in &p.graph.nodes {
        if let tessera::compiler::ir::Op::DropoutGrad { forward, .. } = n.op {
            assert!(matches!(p.graph.nodes[forward.index()].op, tessera::compiler::ir::Op::Dropout { .. }));
        }
    }
}

/// Layouts no recipe names still follow from the rules and reproduce the
/// single device: the embedding width, the sequence or the head width split.
#[test]
fn unusual_layouts_follow_from_the_rules() {
    for dim in ["embed", "seq", "head_dim"] {
        let rule = format!("parallel.layout.{dim}=tensor");
        same(GPT, &[], &["parallel.mesh.tensor=2", rule.as_str()]);
    }
    let mixed = ["parallel.mesh.tensor=2", "parallel.layout.embed=tensor", "parallel.mesh.expert=2"];
    same(MOE, MOE_ONE, &with(&mixed, &["parallel.layout.expert=expert"]));
}

/// Layouts drawn at random from the rules (`TESSERA_LAYOUT_SEEDS` for more
/// than the default few): every one the checker accepts reproduces the
/// single device.
#[test]
fn random_layouts() {
    let seeds: u64 = std::env::var("TESSERA_LAYOUT_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = |n: u64| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state % n
    };
    let mut ran = 0;
    for _ in 0..seeds * 4 {
        let which = next(3);
        let moe = which == 1;
        let (spec, mut base): (&str, Vec<String>) = match which {
            0 => (GPT, vec![]),
            1 => (MOE, vec!["parallel.mesh.data=1".into()]),
            _ => ("tests/specs/llama-tiny.spec", vec![]),
        };
        let mut sets: Vec<String> = Vec::new();
        let mut world = 1;
        if next(2) == 1 {
            sets.extend(["parallel.mesh.tensor=2".into()]);
            let dims = ["heads", "kv_heads", "mlp", "vocab", "embed", "head_dim", "seq"];
            let mut any = false;
            for d in dims {
                if next(3) == 0 || (!any && d == "seq") {
                    sets.push(format!("parallel.layout.{d}=tensor"));
                    any = true;
                }
            }
            if next(3) == 0 {
                sets.push("parallel.sequence_parallel=true".into());
            }
            world *= 2;
        }
        if next(2) == 1 {
            sets.extend(["parallel.mesh.data=2".into(), "parallel.layout.batch=data".into()]);
            sets.push(format!("parallel.zero={}", next(4)));
            base.push("train.micro_batch=4".into());
            world *= 2;
        }
        if moe && next(2) == 1 {
            let placement = ["blocked", "round_robin"][next(2) as usize];
            sets.extend(["parallel.mesh.expert=2".into(), "parallel.layout.expert=expert".into()]);
            sets.push(format!("parallel.experts.placement={placement}"));
            world *= 2;
        }
        if next(3) == 0 && world <= 4 {
            let schedule = ["gpipe", "1f1b"][next(2) as usize];
            sets.extend(["parallel.mesh.pipeline=2".into(), "parallel.layout.layer=pipeline".into()]);
            sets.push(format!("parallel.pipeline.schedule={schedule}"));
            base.retain(|s| !s.starts_with("train.micro_batch"));
            base.push("train.micro_batch=2".into());
        }
        if sets.is_empty() {
            continue;
        }
        // Gradient buckets of every size: the communication stream's calls
        // move through the backward pass and split where they fall.
        if next(2) == 1 {
            sets.push(format!("parallel.bucket={}", [1024, 8192, 65536][next(3) as usize]));
        }
        let base: Vec<&str> = base.iter().map(String::as_str).collect();
        let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
        let all: Vec<String> = base.iter().chain(&sets).map(|s| s.to_string()).collect();
        let opts = Options { overrides: all, model: None, micro_batch: None };
        if check_path(&mut SourceMap::new(), Path::new(spec), &opts).is_err() {
            continue; // the checker rules it out, with a diagnostic
        }
        same(spec, &base, &sets);
        ran += 1;
    }
    assert!(ran > 0);
}

/// Microbatches a stage holds activations for at once: GPipe all of them,
/// 1F1B at most `stages − stage`, interleaved 1F1B Megatron's warm-up count.
#[test]
fn schedules_bound_the_microbatches_in_flight() {
    use tessera::compiler::config::Schedule;
    use tessera::compiler::parallel::pipeline::{Action, schedule};
    let in_flight = |actions: &[Action]| {
        let (mut now, mut most) = (0i64, 0i64);
        for a in actions {
            now += if matches!(a, Action::Forward { .. }) { 1 } else { -1 };
            most = most.max(now);
        }
        assert_eq!(now, 0, "every forward has its backward");
        most
    };
    for stage in 0..4 {
        assert_eq!(in_flight(&schedule(Schedule::Gpipe, 4, 1, 8, stage)), 8);
        assert_eq!(in_flight(&schedule(Schedule::OneFOneB, 4, 1, 8, stage)), 4 - stage as i64);
        // 2 virtual stages: (p − s − 1)·2 + (v − 1)·p warm-up forwards, then one in, one out.
        let warmup = (4 - stage as i64 - 1) * 2 + 4;
        assert_eq!(in_flight(&schedule(Schedule::Interleaved1f1b, 4, 2, 8, stage)), warmup + 1);
    }
}

/// Grouped-query attention (LLaMA): query heads and key/value heads split
/// alike over the tensor axis, with RMSNorm, rotary embeddings, SwiGLU and an
/// untied, vocabulary-parallel head; and with only the query heads split
/// (the key/value heads are then gathered).
#[test]
fn grouped_query_attention_layouts() {
    const LLAMA: &str = "tests/specs/llama-tiny.spec";
    let tp = ["parallel.mesh.tensor=2", "parallel.layout.heads=tensor", "parallel.layout.kv_heads=tensor"];
    let megatron = with(&tp, &["parallel.layout.mlp=tensor", "parallel.layout.vocab=tensor"]);
    same(LLAMA, &[], &megatron);
    same(LLAMA, &[], &with(&megatron, &["parallel.sequence_parallel=true"]));
    same(LLAMA, &[], &["parallel.mesh.tensor=2", "parallel.layout.heads=tensor"]);
    same(LLAMA, &[], &with(&megatron, &pp2("parallel.pipeline.schedule=1f1b")));
}
