//! Ranks as processes under `mpirun` (issue 15's acceptance): every layout
//! of the tiny GPT and the tiny MoE, run as 2, 4 or 8 processes that talk
//! through MPI, reproduces the single-device run: the loss of each of 5
//! steps, the validation loss after them and the final weights (from the
//! checkpoint rank 0 writes), relative error ≤ 1e-5 in fp32, as the
//! simulated ranks do (`tests/parallel.rs`). Needs `--features mpi` and
//! Open MPI's `mpirun` (`tools/test` installs both).
#![cfg(feature = "mpi")]

mod common;

use common::{rel, zero_gradient};
use std::path::PathBuf;
use std::process::{Command, Output};
use tessera::runtime::tensor::Tensor;
use tessera::runtime::train::RunConfig;

const TESSERA: &str = env!("CARGO_BIN_EXE_tessera");
const DATA: &str = "data/shakespeare/shakespeare.txt";
const STEPS: u64 = 5;
const SEED: u64 = 7;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tessera-mpi-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// `mpirun -n N tessera ARGS` (as root where the tests run as root; more
/// processes than cores on a small machine).
fn mpirun(n: usize, args: &[String]) -> Output {
    Command::new("mpirun")
        .args(["--oversubscribe", "-n", &n.to_string(), TESSERA])
        .args(args)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .output()
        .expect("mpirun runs (Open MPI: apt install openmpi-bin)")
}

fn sets(overrides: &[&str]) -> Vec<String> {
    overrides.iter().flat_map(|s| ["--set".to_string(), s.to_string()]).collect()
}

/// What a run gives to compare: its step losses then its validation loss,
/// and its final logical weights.
struct Run {
    losses: Vec<f64>,
    weights: Vec<Tensor<f32>>,
}

/// The single-device run in this process, and its first step's gradients
/// (which weights have a gradient that is zero in exact arithmetic).
fn single(spec: &str, base: &[&str]) -> (Run, Vec<Tensor<f32>>) {
    let m = common::check_ok(spec, base);
    let out = tmp("single");
    let cfg = RunConfig { steps: STEPS, seed: SEED, data: Some(PathBuf::from(DATA)), ..RunConfig::new(&out) };
    let mut t = common::trainer(&m, cfg).expect("starts");
    let grads = t.reference_gradients().expect("gradients");
    let mut losses: Vec<f64> = (0..STEPS).map(|_| t.train_step().expect("a step").loss).collect();
    // As many batches as `tessera train` evaluates.
    let batches = t.training.train.eval_steps.unwrap_or(8);
    losses.push(t.evaluate(batches).expect("evaluates"));
    let _ = std::fs::remove_dir_all(&out);
    (Run { losses, weights: t.weights().expect("weights") }, grads)
}

/// `tessera train` as `n` MPI processes: the losses from rank 0's metrics
/// and the weights of its last checkpoint.
fn processes(n: usize, spec: &str, overrides: &[&str], name: &str) -> Run {
    let out = tmp(name);
    let mut args: Vec<String> = vec!["train".into(), spec.into()];
    args.extend(sets(overrides));
    for a in ["--steps", &STEPS.to_string(), "--seed", &SEED.to_string(), "--data", DATA, "--eval-interval", "5"] {
        args.push(a.to_string());
    }
    args.extend(["--out".to_string(), out.to_string_lossy().into_owned()]);
    let o = mpirun(n, &args);
    assert!(o.status.success(), "{name}: mpirun -n {n} failed:\n{}\n{}", text(&o.stdout), text(&o.stderr));
    assert!(text(&o.stderr).contains(&format!("training on {n} processes")), "{name}: {}", text(&o.stderr));
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).expect("rank 0 writes the metrics");
    let records: Vec<serde_json::Value> = metrics.lines().map(|l| serde_json::from_str(l).expect("json")).collect();
    assert_eq!(records.len() as u64, STEPS, "{name}: one record per step, from rank 0 only:\n{metrics}");
    let mut losses: Vec<f64> = records.iter().map(|r| r["loss"].as_f64().expect("loss")).collect();
    losses.push(records.last().and_then(|r| r["val_loss"].as_f64()).expect("a validation loss at the last step"));
    let m = common::check_ok(spec, overrides);
    let params = tessera::compiler::driver::compile_training(&m, None).expect("compiles").step.params;
    let weights = tessera::runtime::train::checkpoint::load_params(&out, &params).expect("rank 0's checkpoint loads");
    let _ = std::fs::remove_dir_all(&out);
    Run { losses, weights }
}

/// `n` processes running `layout` on top of `base` reproduce the single device running `base`.
fn same(n: usize, spec: &str, base: &[&str], layout: &[&str], name: &str) {
    let (one, grads) = single(spec, base);
    let overrides: Vec<&str> = base.iter().chain(layout).copied().collect();
    let run = processes(n, spec, &overrides, name);
    let mut worst = 0f64;
    for (k, (a, b)) in run.losses.iter().zip(&one.losses).enumerate() {
        let e = (a - b).abs() / b.abs();
        let what = if k as u64 == STEPS { "validation loss".to_string() } else { format!("loss {}", k + 1) };
        assert!(e <= 1e-5, "{name}: {what} is {a} under MPI, {b} on one device (rel. error {e:.2e})");
        worst = worst.max(e);
    }
    let (mut left_out, mut total, mut wmax) = (0, 0, 0f64);
    for (k, (a, b)) in run.weights.iter().zip(&one.weights).enumerate() {
        let g = &grads[k].data;
        let keep: Vec<usize> = (0..g.len()).filter(|&i| !zero_gradient(g, i)).collect();
        left_out += (0..g.len()).filter(|&i| g[i] != 0.0 && zero_gradient(g, i)).count();
        total += g.len();
        let pick = |t: &Tensor<f32>| keep.iter().map(|&i| t.data[i]).collect::<Vec<f32>>();
        let e = rel(&pick(a), &pick(b));
        assert!(e <= 1e-5, "{name}: final weights of parameter {k} differ from one device by {e:.2e}");
        wmax = wmax.max(e);
    }
    // Only the degenerate elements are left out (the key biases: 2 layers × 64).
    assert!(left_out <= 2 * 64 + total / 1000, "{name}: {left_out} of {total} weights have zero gradients");
    eprintln!("{name} (mpirun -n {n}): worst loss error {worst:.1e}, worst weight error {wmax:.1e}");
}

const GPT: &str = "specs/tiny/gpt.spec";
const MOE: &str = "specs/tiny/moe.spec";
const TP2: &[&str] = &["parallel.mesh.tensor=2", "parallel.layout.heads=tensor", "parallel.layout.mlp=tensor"];
const PP2_1F1B: &[&str] = &[
    "parallel.mesh.pipeline=2",
    "parallel.layout.layer=pipeline",
    "parallel.pipeline.schedule=1f1b",
    "parallel.pipeline.microbatches=4",
];

fn with<'a>(a: &[&'a str], b: &[&'a str]) -> Vec<&'a str> {
    a.iter().chain(b).copied().collect()
}

#[test]
fn gpt_layouts_as_processes() {
    let dp = |n: &'static str| vec![n, "parallel.layout.batch=data"];
    same(4, GPT, &[], &dp("parallel.mesh.data=4"), "gpt_dp4");
    same(4, GPT, &[], &with(&dp("parallel.mesh.data=2"), TP2), "gpt_dp2_tp2");
    same(4, GPT, &[], &with(TP2, PP2_1F1B), "gpt_tp2_pp2_1f1b");
    same(4, GPT, &[], &with(&dp("parallel.mesh.data=4"), &["parallel.zero=3"]), "gpt_zero3_dp4");
    // Eight processes on a small machine: dp2 × tp2 × pp2.
    same(8, GPT, &[], &with(&with(&dp("parallel.mesh.data=2"), TP2), PP2_1F1B), "gpt_dp2_tp2_pp2");
}

#[test]
fn moe_layouts_as_processes() {
    // The spec lays its experts over the data axis (dp2 × ep2); the oracle
    // is one rank with one data rank's microbatch.
    let one = &["parallel.mesh.data=1", "train.micro_batch=4"];
    same(2, MOE, one, &["parallel.mesh.data=2"], "moe_dp2_ep2");
    same(4, MOE, one, &with(&["parallel.mesh.data=2"], TP2), "moe_dp2_ep2_tp2");
}

/// A world that does not match the mesh stops at once, on every rank,
/// saying which is which; no checkpoint or metrics are written.
#[test]
fn world_must_match_the_mesh() {
    let out = tmp("mismatch");
    let mut args: Vec<String> = vec!["train".into(), GPT.into()];
    args.extend(sets(&["parallel.mesh.data=2", "parallel.layout.batch=data"]));
    args.extend(["--steps", "2", "--out", &out.to_string_lossy()].map(String::from));
    let o = mpirun(3, &args);
    assert!(!o.status.success());
    let err = text(&o.stderr);
    assert!(
        err.contains(
            "3 processes were launched (from the MPI launcher's variables), but the spec's mesh (data 2) has 2 ranks"
        ),
        "{err}"
    );
    assert!(!out.exists(), "nothing is written");
}

/// A rank that fails stops every rank: the job ends with the failing
/// rank's message instead of waiting for the collective timeout.
#[test]
fn a_failing_rank_stops_the_job() {
    let out = tmp("fail");
    // Rank 0 refuses a folder that holds another run; the others wait in
    // their first collective until rank 0's MPI_Abort ends them.
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("metrics.jsonl"), "{\"step\":1}\n").unwrap();
    let mut args: Vec<String> = vec!["train".into(), GPT.into()];
    args.extend(sets(&["parallel.mesh.data=2", "parallel.layout.batch=data"]));
    args.extend(["--steps", "2", "--data", DATA, "--out", &out.to_string_lossy()].map(String::from));
    let t0 = std::time::Instant::now();
    let o = mpirun(2, &args);
    assert!(!o.status.success());
    let err = text(&o.stderr);
    assert!(err.contains("holds another run"), "{err}");
    assert!(t0.elapsed() < std::time::Duration::from_secs(60), "the job ended after {:?}", t0.elapsed());
    let _ = std::fs::remove_dir_all(&out);
}
