//! Ranks as processes (issue 15's acceptance): every layout of the tiny GPT
//! and the tiny MoE, run as 2, 4 or 8 processes, reproduces the
//! single-device run: the loss of each of 5 steps, the validation loss after
//! them and the final weights (from the checkpoint rank 0 writes), relative
//! error ≤ 1e-5 in fp32, as the simulated ranks do (`tests/parallel.rs`).
//! The processes are started three ways: `tessera launch` (the TCP
//! transport), two `tessera launch --nnodes 2` launches on this machine (two
//! "nodes" over the loopback), and `mpirun` (MPI; needs `--features mpi`
//! and Open MPI, which `tools/test` installs). Over TCP the reductions run
//! in the in-process order, so those runs also give the threads' bits.

mod common;

use common::{free_port, rel, text, zero_gradient};
use std::path::PathBuf;
use std::process::{Command, Output};
use tessera::runtime::tensor::Tensor;
use tessera::runtime::train::RunConfig;

const TESSERA: &str = env!("CARGO_BIN_EXE_tessera");
const DATA: &str = "data/shakespeare/shakespeare.txt";
const STEPS: u64 = 5;
const SEED: u64 = 7;

/// A fresh folder of its own: the tests of this file run side by side in one process.
fn tmp(name: &str) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let d = std::env::temp_dir().join(format!("tessera-processes-{name}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// How a test starts `n` processes of `tessera ARGS`.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Start {
    /// `tessera launch --nproc-per-node N -- ARGS` (TCP).
    Launch,
    /// Two launches of N/2 ranks each, as nodes 0 and 1 (TCP over the loopback).
    TwoNodes,
    /// `mpirun -n N tessera ARGS` (as root where the tests run as root; more
    /// processes than cores on a small machine).
    #[cfg(feature = "mpi")]
    Mpirun,
}

fn start(how: Start, n: usize, args: &[String]) -> Output {
    let launch = |nproc: usize, extra: &[String]| {
        Command::new(TESSERA)
            .args(["launch", "--nproc-per-node", &nproc.to_string()])
            .args(extra)
            .arg("--")
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("tessera launch starts")
    };
    match how {
        Start::Launch => launch(n, &[]).wait_with_output().expect("launch runs"),
        Start::TwoNodes => {
            let master = format!("127.0.0.1:{}", free_port());
            let node = |r: usize| {
                let extra: Vec<String> =
                    ["--nnodes", "2", "--node-rank", &r.to_string(), "--master", &master].map(String::from).to_vec();
                launch(n / 2, &extra)
            };
            let (a, b) = (node(0), node(1));
            let (a, b) = (a.wait_with_output().expect("node 0 runs"), b.wait_with_output().expect("node 1 runs"));
            // Node 0 holds rank 0, which writes and prints; node 1 must succeed too.
            assert!(b.status.success(), "node 1 failed:\n{}\n{}", text(&b.stdout), text(&b.stderr));
            a
        }
        #[cfg(feature = "mpi")]
        Start::Mpirun => Command::new("mpirun")
            .args(["--oversubscribe", "-n", &n.to_string(), TESSERA])
            .args(args)
            .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
            .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
            .output()
            .expect("mpirun runs (Open MPI: apt install openmpi-bin)"),
    }
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

/// The run of `overrides` in this process (one device, or the layout's
/// ranks as threads), and its first step's gradients on one device (which
/// weights have a gradient that is zero in exact arithmetic).
fn in_process(spec: &str, overrides: &[&str]) -> (Run, Vec<Tensor<f32>>) {
    let m = common::check_ok(spec, overrides);
    let out = tmp("single");
    let cfg = RunConfig { steps: STEPS, seed: SEED, data: Some(PathBuf::from(DATA)), ..RunConfig::new(&out) };
    let mut t = common::trainer(&m, cfg).expect("starts");
    let one = t.training.step.programs.len() == 1;
    let grads = if one { t.reference_gradients().expect("gradients") } else { Vec::new() };
    let mut losses: Vec<f64> = (0..STEPS).map(|_| t.train_step().expect("a step").loss).collect();
    // As many batches as `tessera train` evaluates.
    let batches = t.training.train.eval_steps.unwrap_or(8);
    losses.push(t.evaluate(batches).expect("evaluates"));
    let _ = std::fs::remove_dir_all(&out);
    (Run { losses, weights: t.weights().expect("weights") }, grads)
}

/// `tessera train` as `n` processes: the losses from rank 0's metrics and
/// the weights of its last checkpoint.
fn processes(how: Start, n: usize, spec: &str, overrides: &[&str], name: &str) -> Run {
    let out = tmp(name);
    let mut args: Vec<String> = vec!["train".into(), spec.into()];
    args.extend(sets(overrides));
    for a in ["--steps", &STEPS.to_string(), "--seed", &SEED.to_string(), "--data", DATA, "--eval-interval", "5"] {
        args.push(a.to_string());
    }
    args.extend(["--out".to_string(), out.to_string_lossy().into_owned()]);
    let o = start(how, n, &args);
    assert!(o.status.success(), "{name}: {how:?} of {n} failed:\n{}\n{}", text(&o.stdout), text(&o.stderr));
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

/// `n` processes running `layout` on top of `base` reproduce the single
/// device running `base`; over TCP, also the bits of the same layout's
/// ranks as threads.
fn same(how: Start, n: usize, spec: &str, base: &[&str], layout: &[&str], name: &str) {
    let (one, grads) = in_process(spec, base);
    let overrides: Vec<&str> = base.iter().chain(layout).copied().collect();
    let run = processes(how, n, spec, &overrides, name);
    #[cfg(feature = "mpi")]
    let tcp = how != Start::Mpirun;
    #[cfg(not(feature = "mpi"))]
    let tcp = true;
    if tcp {
        let (threads, _) = in_process(spec, &overrides);
        let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&run.losses), bits(&threads.losses), "{name}: the losses over TCP are the threads' bits");
        for (k, (a, b)) in run.weights.iter().zip(&threads.weights).enumerate() {
            let eq = a.data.iter().zip(&b.data).all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(eq, "{name}: parameter {k} over TCP differs from the threads' bits");
        }
    }
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
    eprintln!("{name} ({how:?}, {n} processes): worst loss error {worst:.1e}, worst weight error {wmax:.1e}");
}

const GPT: &str = "specs/tiny/gpt.spec";
const MOE: &str = "specs/tiny/moe.spec";
const BUCKETS: &[&str] = &["parallel.bucket=8Ki"];
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

/// A case: (processes, spec, single-device overrides, layout, name).
type Case = (usize, &'static str, Vec<&'static str>, Vec<&'static str>, &'static str);

fn cases() -> Vec<Case> {
    let dp = |n: &'static str| vec![n, "parallel.layout.batch=data"];
    // The MoE lays its experts over the data axis (dp2 × ep2); its oracle
    // is one rank with one data rank's microbatch.
    let moe_one = vec!["parallel.mesh.data=1", "train.micro_batch=4"];
    vec![
        (4, GPT, vec![], dp("parallel.mesh.data=4"), "gpt_dp4"),
        // Small buckets: the data buckets reduce on each rank's communication
        // stream while its compute stream runs the tensor-parallel collectives.
        (4, GPT, vec![], with(&with(&dp("parallel.mesh.data=2"), TP2), BUCKETS), "gpt_dp2_tp2"),
        (4, GPT, vec![], with(TP2, PP2_1F1B), "gpt_tp2_pp2_1f1b"),
        (4, GPT, vec![], with(&dp("parallel.mesh.data=4"), &["parallel.zero=3"]), "gpt_zero3_dp4"),
        // Eight processes on a small machine: dp2 × tp2 × pp2.
        (8, GPT, vec![], with(&with(&with(&dp("parallel.mesh.data=2"), TP2), PP2_1F1B), BUCKETS), "gpt_dp2_tp2_pp2"),
        (2, MOE, moe_one.clone(), vec!["parallel.mesh.data=2"], "moe_dp2_ep2"),
        (4, MOE, moe_one, with(&["parallel.mesh.data=2"], TP2), "moe_dp2_ep2_tp2"),
    ]
}

#[test]
fn layouts_under_tessera_launch() {
    for (n, spec, base, layout, name) in cases() {
        same(Start::Launch, n, spec, &base, &layout, name);
    }
}

#[test]
fn layouts_on_two_nodes_over_the_loopback() {
    for (n, spec, base, layout, name) in cases().into_iter().filter(|c| [4, 8].contains(&c.0)).take(3) {
        same(Start::TwoNodes, n, spec, &base, &layout, name);
    }
    let (n, spec, base, layout, name) = cases().pop().expect("the MoE case");
    same(Start::TwoNodes, n, spec, &base, &layout, name);
}

#[cfg(feature = "mpi")]
#[test]
fn layouts_under_mpirun() {
    for (n, spec, base, layout, name) in cases() {
        same(Start::Mpirun, n, spec, &base, &layout, name);
    }
}

/// A world that does not match the mesh stops at once, on every rank,
/// saying which is which; no checkpoint or metrics are written.
#[cfg(feature = "mpi")]
#[test]
fn world_must_match_the_mesh() {
    let out = tmp("mismatch");
    let mut args: Vec<String> = vec!["train".into(), GPT.into()];
    args.extend(sets(&["parallel.mesh.data=2", "parallel.layout.batch=data"]));
    args.extend(["--steps", "2", "--out", &out.to_string_lossy()].map(String::from));
    let o = start(Start::Mpirun, 3, &args);
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
    #[cfg(feature = "mpi")]
    failing_rank_stops(Start::Mpirun);
    failing_rank_stops(Start::Launch);
}

fn failing_rank_stops(how: Start) {
    let out = tmp(&format!("fail-{how:?}"));
    // Rank 0 refuses a folder that holds another run; the others wait in
    // their first collective until rank 0's MPI_Abort ends them.
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("metrics.jsonl"), "{\"step\":1}\n").unwrap();
    let mut args: Vec<String> = vec!["train".into(), GPT.into()];
    args.extend(sets(&["parallel.mesh.data=2", "parallel.layout.batch=data"]));
    args.extend(["--steps", "2", "--data", DATA, "--out", &out.to_string_lossy()].map(String::from));
    let t0 = std::time::Instant::now();
    let o = start(how, 2, &args);
    assert!(!o.status.success());
    let err = text(&o.stderr);
    assert!(err.contains("holds another run"), "{how:?}: {err}");
    assert!(t0.elapsed() < std::time::Duration::from_secs(60), "the job ended after {:?}", t0.elapsed());
    let _ = std::fs::remove_dir_all(&out);
}

/// Ranks started by hand from torchrun's variables, with no launcher to
/// stop them: only the transport can tell one rank that another is gone.
fn by_hand(world: usize, args: &[String]) -> Vec<std::process::Child> {
    let port = free_port().to_string();
    (0..world)
        .map(|r| {
            Command::new(TESSERA)
                .args(args)
                .env("RANK", r.to_string())
                .env("WORLD_SIZE", world.to_string())
                .env("LOCAL_RANK", r.to_string())
                .env("LOCAL_WORLD_SIZE", world.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", &port)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("a rank starts")
        })
        .collect()
}

/// A long dp2 run of the tiny GPT by hand, once rank 0 has logged two steps.
fn running(name: &str, timeout_s: u64) -> (Vec<std::process::Child>, PathBuf) {
    let out = tmp(name);
    let mut args: Vec<String> = vec!["train".into(), GPT.into()];
    args.extend(sets(&["parallel.mesh.data=2", "parallel.layout.batch=data"]));
    args.extend(["--steps", "1000000", "--eval-interval", "1000000", "--data", DATA].map(String::from));
    args.extend(["--collective-timeout".to_string(), timeout_s.to_string()]);
    args.extend(["--out".to_string(), out.to_string_lossy().into_owned()]);
    let ranks = by_hand(2, &args);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while std::fs::read_to_string(out.join("metrics.jsonl")).map_or(0, |m| m.lines().count()) < 2 {
        assert!(std::time::Instant::now() < deadline, "{name}: the ranks never logged two steps");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    (ranks, out)
}

/// Wait for `child` at most `within`; its exit status and stderr.
fn exit_of(child: std::process::Child, within: std::time::Duration) -> (Option<i32>, String) {
    let t0 = std::time::Instant::now();
    let mut child = child;
    while child.try_wait().expect("waits").is_none() {
        if t0.elapsed() > within {
            let _ = child.kill();
            let o = child.wait_with_output().expect("reaped");
            panic!("still running after {within:?}:\n{}", text(&o.stderr));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let o = child.wait_with_output().expect("reaped");
    (o.status.code(), text(&o.stderr))
}

/// A rank killed with SIGKILL mid-run: the other stops at once (well
/// within the 60 s collective timeout), naming it, the op, the group and
/// the step; both processes are gone afterwards.
#[test]
fn a_killed_rank_is_named_by_the_others() {
    let (mut ranks, out) = running("killed", 60);
    let t0 = std::time::Instant::now();
    ranks[1].kill().expect("SIGKILL rank 1");
    let one = ranks.pop().expect("rank 1");
    let zero = ranks.pop().expect("rank 0");
    let (code, err) = exit_of(zero, std::time::Duration::from_secs(30));
    eprintln!("rank 0, {:?} after rank 1 was killed:\n{err}", t0.elapsed());
    assert_eq!(code, Some(1), "{err}");
    assert!(t0.elapsed() < std::time::Duration::from_secs(30), "rank 0 took {:?}", t0.elapsed());
    assert!(err.contains("rank 1 is gone (the connection closed): it exited or was killed"), "{err}");
    // The op and group are the call that was waiting when rank 1 went: the
    // gradients' all-reduce on the data group, or the step reports'
    // all-gather on the world group; both hold ranks 0 and 1.
    assert!(err.contains("` on the ") && err.contains(" group [0, 1] at step "), "{err}");
    let (code, _) = exit_of(one, std::time::Duration::from_secs(5));
    assert_eq!(code, None, "rank 1 died of its signal");
    let _ = std::fs::remove_dir_all(&out);
}

/// A rank that hangs (SIGSTOP) mid-run: the other fails after the
/// collective timeout, naming the rank it waited for, the op, the group and
/// the step.
#[test]
fn a_hung_rank_is_named_after_the_timeout() {
    let (mut ranks, out) = running("hung", 3);
    let pid = ranks[1].id() as i32;
    // SAFETY: a signal to a child of this test, which it reaps below.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    let t0 = std::time::Instant::now();
    let one = ranks.pop().expect("rank 1");
    let zero = ranks.pop().expect("rank 0");
    let (code, err) = exit_of(zero, std::time::Duration::from_secs(60));
    let waited = t0.elapsed();
    let mut one = one;
    let _ = one.kill();
    let _ = one.wait();
    eprintln!("rank 0, {waited:?} after rank 1 stopped:\n{err}");
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("timed out after 3000 ms at step") && err.contains("waiting for ranks [1]"), "{err}");
    assert!(waited >= std::time::Duration::from_secs(2), "failed after {waited:?}, before the timeout");
    let _ = std::fs::remove_dir_all(&out);
}

/// `tessera launch --max-restarts 1`, as torchelastic restarts a job: rank
/// 1 is killed after the checkpoint of step 10; every rank is restarted,
/// resumes from the last complete checkpoint and finishes, and the final
/// weights are the bits of an uninterrupted run.
#[test]
fn a_killed_rank_restarts_the_job_from_its_last_checkpoint() {
    restarts(false);
}

/// The same over two launches as nodes 0 and 1 (one rank each): the rank on
/// node 1 is killed; node 1's launcher restarts it, node 0's rank fails (its
/// peer is gone) and node 0's launcher restarts it, and the second attempt
/// meets again at the store, turning away nothing of the first.
#[test]
fn a_killed_rank_restarts_a_job_of_two_nodes() {
    restarts(true);
}

fn restarts(two_nodes: bool) {
    let out = tmp(if two_nodes { "restart-nodes" } else { "restart" });
    let mut args: Vec<String> = vec!["train".into(), GPT.into()];
    args.extend(sets(&["parallel.mesh.data=2", "parallel.layout.batch=data", "train.save_interval=10"]));
    args.extend(["--steps", "40", "--eval-interval", "1000", "--seed", "3", "--data", DATA].map(String::from));
    let master = format!("127.0.0.1:{}", free_port());
    let launch = |node: &str| {
        let nodes: Vec<&str> = match two_nodes {
            true => vec!["--nproc-per-node", "1", "--nnodes", "2", "--node-rank", node, "--master", &master],
            false => vec!["--nproc-per-node", "2"],
        };
        Command::new(TESSERA)
            .arg("launch")
            .args(nodes)
            .args(["--max-restarts", "1", "--"])
            .args(&args)
            .args(["--out".to_string(), out.to_string_lossy().into_owned()])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("tessera launch starts")
    };
    let launcher = launch("0");
    // Rank 1 runs under node 1's launcher, or beside rank 0.
    let other = two_nodes.then(|| launch("1"));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while std::fs::read_to_string(out.join("metrics.jsonl")).map_or(0, |m| m.lines().count()) < 12 {
        assert!(std::time::Instant::now() < deadline, "the ranks never logged 12 steps");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let holder = other.as_ref().unwrap_or(&launcher).id();
    let one =
        common::children_of(holder).into_iter().find(|(_, rank)| rank.as_deref() == Some("1")).expect("rank 1 runs").0;
    // SAFETY: a signal to a rank that the launcher started and reaps.
    assert_eq!(unsafe { libc::kill(one as i32, libc::SIGKILL) }, 0);
    let o = launcher.wait_with_output().expect("the launcher ends");
    let mut err = text(&o.stderr);
    assert!(o.status.success(), "the restarted job failed:\n{err}");
    if let Some(other) = other {
        let o = other.wait_with_output().expect("node 1's launcher ends");
        let theirs = text(&o.stderr);
        assert!(o.status.success(), "node 1 failed:\n{theirs}");
        assert!(err.contains("restarting every rank (restart 1 of 1)"), "node 0 restarts too:\n{err}");
        err.push_str(&theirs);
    }
    assert!(err.contains("rank 1 (pid") && err.contains("SIGKILL"), "{err}");
    assert!(err.contains("restarting every rank (restart 1 of 1)"), "{err}");
    assert!(err.contains("restart 1: resuming from the last complete checkpoint"), "{err}");
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).expect("metrics");
    let steps: Vec<u64> = metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("json")["step"].as_u64().expect("step"))
        .collect();
    assert_eq!(steps, (1..=40).collect::<Vec<u64>>(), "each step logged once, in order");

    // The same run, uninterrupted, as one process (threads give TCP's bits).
    let straight = tmp(if two_nodes { "straight-nodes" } else { "straight" });
    let o = Command::new(TESSERA)
        .args(&args)
        .args(["--out".to_string(), straight.to_string_lossy().into_owned()])
        .output()
        .expect("train runs");
    assert!(o.status.success(), "{}", text(&o.stderr));
    let m = common::check_ok(GPT, &["parallel.mesh.data=2", "parallel.layout.batch=data"]);
    let params = tessera::compiler::driver::compile_training(&m, None).expect("compiles").step.params;
    let load = |dir: &PathBuf| tessera::runtime::train::checkpoint::load_params(dir, &params).expect("loads");
    let (restarted, uninterrupted) = (load(&out), load(&straight));
    for (k, (a, b)) in restarted.iter().zip(&uninterrupted).enumerate() {
        let same = a.data.iter().zip(&b.data).all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(same, "parameter {k} of the restarted run differs from the uninterrupted run's");
    }
    let _ = std::fs::remove_dir_all(&out);
    let _ = std::fs::remove_dir_all(&straight);
}

/// A checkpoint written under one layout and world size resumes under any
/// other, across processes: dp2×tp2 on 4 processes → tp2×pp2 on 4 → dp4 on
/// 4 → one process on one device, and the 8 steps match 8 straight steps on
/// one device (losses and final weights within 1e-5). The processes write
/// sharded checkpoints (a manifest and one file per rank that holds a piece
/// no lower rank holds); a tp2×pp2 rank resuming from one reads only the
/// pieces that overlap its cuts.
#[test]
fn checkpoints_move_between_layouts_and_world_sizes() {
    let out = tmp("chain");
    let common_args = |steps: u64| -> Vec<String> {
        let mut a: Vec<String> = vec!["train".into(), GPT.into()];
        a.extend(["--steps", &steps.to_string(), "--seed", &SEED.to_string(), "--data", DATA].map(String::from));
        a.extend(["--eval-interval".to_string(), "1000".to_string()]);
        a.extend(["--out".to_string(), out.to_string_lossy().into_owned()]);
        a
    };
    let resume = ["--resume".to_string(), out.to_string_lossy().into_owned(), "--allow-changes".to_string()];
    let reset = [
        "parallel.mesh.data=1",
        "parallel.mesh.tensor=1",
        "parallel.mesh.pipeline=1",
        "parallel.pipeline.microbatches=1",
    ];
    let dp = |n: &'static str| vec![n, "parallel.layout.batch=data"];
    let stages: Vec<(usize, u64, Vec<&str>)> = vec![
        (4, 3, with(&dp("parallel.mesh.data=2"), TP2)),
        (4, 5, with(&reset, &with(TP2, PP2_1F1B))),
        (4, 6, with(&reset, &dp("parallel.mesh.data=4"))),
        (1, 8, reset.to_vec()),
    ];
    for (i, (n, steps, layout)) in stages.iter().enumerate() {
        let mut args = common_args(*steps);
        args.extend(sets(layout));
        if i > 0 {
            args.extend(resume.iter().cloned());
        }
        let o = match n {
            1 => Command::new(TESSERA).args(&args).output().expect("train runs"),
            _ => start(Start::Launch, *n, &args),
        };
        let err = text(&o.stderr);
        assert!(o.status.success(), "stage {i} ({layout:?}):\n{err}");
        if i == 0 {
            // dp2 × tp2: the data replicas' pieces are written once, by data rank 0's tensor ranks.
            let step = out.join("step-00000003");
            assert!(step.join("manifest.json").is_file() && !step.join("model.safetensors").exists());
            let files: Vec<String> = std::fs::read_dir(&step)
                .expect("the checkpoint")
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("rank-"))
                .collect();
            let mut files = files;
            files.sort();
            assert_eq!(files, ["rank-00000.safetensors", "rank-00001.safetensors"]);
        }
        if i == 1 {
            // Each tp2 × pp2 rank reads only the pieces of its stage's layers and its tensor half.
            let reads: Vec<(u64, u64)> = err
                .lines()
                .filter_map(|l| {
                    let rest = l.split("reading ").nth(1)?;
                    let mut w = rest.split_whitespace();
                    let p = w.next()?.parse().ok()?;
                    let t = w.nth(2)?.parse().ok()?;
                    Some((p, t))
                })
                .collect();
            assert_eq!(reads.len(), 4, "every rank reports its reads:\n{err}");
            assert!(reads.iter().all(|&(p, t)| 0 < p && p < t), "{reads:?}:\n{err}");
            eprintln!("tp2 × pp2 ranks resuming from dp2 × tp2 read (pieces, of): {reads:?}");
        }
    }
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).expect("metrics");
    let losses: Vec<f64> = metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("json")["loss"].as_f64().expect("loss"))
        .collect();
    // The same 8 steps straight on one device, in this process.
    let m = common::check_ok(GPT, &[]);
    let straight_out = tmp("chain-straight");
    let cfg = RunConfig { steps: 8, seed: SEED, data: Some(PathBuf::from(DATA)), ..RunConfig::new(&straight_out) };
    let mut t = common::trainer(&m, cfg).expect("starts");
    let grads = t.reference_gradients().expect("gradients");
    let straight: Vec<f64> = (0..8).map(|_| t.train_step().expect("a step").loss).collect();
    assert_eq!(losses.len(), 8, "one record per step:\n{metrics}");
    for (k, (a, b)) in losses.iter().zip(&straight).enumerate() {
        let e = (a - b).abs() / b.abs();
        assert!(e <= 1e-5, "loss {} is {a} after the moves, {b} straight (rel. error {e:.2e})", k + 1);
    }
    let params = tessera::compiler::driver::compile_training(&m, None).expect("compiles").step.params;
    let moved = tessera::runtime::train::checkpoint::load_params(&out, &params).expect("loads");
    for (k, (a, b)) in moved.iter().zip(&t.weights().expect("weights")).enumerate() {
        let keep: Vec<usize> = (0..a.data.len()).filter(|&i| !zero_gradient(&grads[k].data, i)).collect();
        let pick = |x: &Tensor<f32>| keep.iter().map(|&i| x.data[i]).collect::<Vec<f32>>();
        let e = rel(&pick(a), &pick(b));
        assert!(e <= 1e-5, "parameter {k} after the moves differs from the straight run by {e:.2e}");
    }
    let _ = std::fs::remove_dir_all(&out);
    let _ = std::fs::remove_dir_all(&straight_out);
}
