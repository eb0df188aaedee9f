//! Training: seeded determinism, exact resume, atomic checkpoints, and that
//! the loss goes down; `tessera train`'s command-line contract.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use tessera::compiler::{Options, SourceMap, check_path};
use tessera::runtime::train::{RunConfig, Trainer};

fn tiny() -> tessera::compiler::Model {
    tiny_in("fp32")
}

/// The tiny GPT, trained in `precision`.
fn tiny_in(precision: &str) -> tessera::compiler::Model {
    let mut sources = SourceMap::new();
    let opts = Options {
        overrides: vec![
            "dims.seq=16".into(),
            "dims.embed=32".into(),
            "train.batch=4".into(),
            format!("train.precision={precision}"),
        ],
        model: None,
        micro_batch: None,
    };
    check_path(&mut sources, Path::new("specs/tiny/gpt.spec"), &opts).expect("tiny gpt checks")
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tessera-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn cfg(out: &Path, resume: Option<PathBuf>) -> RunConfig {
    RunConfig {
        steps: 10,
        resume,
        seed: 42,
        data: Some(PathBuf::from("data/shakespeare/shakespeare.txt")),
        ..RunConfig::new(out)
    }
}

fn run(t: &mut Trainer, until: u64) -> Vec<f64> {
    let mut losses = Vec::new();
    while t.step < until {
        losses.push(t.train_step().expect("step").loss);
    }
    losses
}

/// In every precision: under bf16 and fp16 a checkpoint holds the f32
/// master weights, and the 16-bit weights are their rounding, as in the
/// running step.
#[test]
fn same_seed_same_bits_and_resume_is_exact() {
    for precision in ["fp32", "bf16", "fp16"] {
        resume_is_exact(precision);
    }
}

fn resume_is_exact(precision: &str) {
    let tiny = || tiny_in(precision);
    let (a, b) = (tmp(&format!("straight-{precision}")), tmp(&format!("resumed-{precision}")));
    let mut straight = common::trainer(&tiny(), cfg(&a, None)).expect("trainer");
    let losses = run(&mut straight, 10);

    let mut first = common::trainer(&tiny(), cfg(&b, None)).expect("trainer");
    let mut resumed_losses = run(&mut first, 5);
    first.save().expect("save");
    drop(first);
    let mut second = common::trainer(&tiny(), cfg(&b, Some(b.clone()))).expect("resume");
    assert_eq!(second.step, 5);
    resumed_losses.extend(run(&mut second, 10));

    assert_eq!(losses, resumed_losses, "10 straight steps and 5 + resume + 5 give the same losses, bit for bit");
    for (x, y) in straight.weights().expect("weights").iter().zip(&second.weights().expect("weights")) {
        assert_eq!(x.data, y.data, "and the same weights");
    }
    // A second run with the same seed repeats the first exactly.
    let mut again = common::trainer(&tiny(), cfg(&tmp(&format!("again-{precision}")), None)).expect("trainer");
    assert_eq!(run(&mut again, 10), losses);
    assert!(losses[9] < losses[0], "the loss goes down: {losses:?}");
}

/// The tiny GPT in fp16 with loss scaling set by `scaling` overrides.
fn tiny_fp16(scaling: &[&str]) -> tessera::compiler::Model {
    let mut sources = SourceMap::new();
    let mut overrides: Vec<String> =
        ["dims.seq=16", "dims.embed=32", "train.batch=4", "train.precision=fp16"].map(String::from).to_vec();
    overrides.extend(scaling.iter().map(|s| s.to_string()));
    let opts = Options { overrides, model: None, micro_batch: None };
    check_path(&mut sources, Path::new("specs/tiny/gpt.spec"), &opts).expect("tiny gpt checks")
}

/// Under `precision = fp16` the loss is scaled dynamically, as PyTorch's
/// GradScaler does: a step whose gradients overflow leaves the weights as
/// they were and halves the scale; `loss_scale_window` good steps in a row
/// double it. A start far too high (2^34) overflows until the scale has
/// come down; the run then trains. The scaler's state is checkpointed: 12
/// steps, a resume, and 12 more equal 24 straight, bit for bit.
#[test]
fn fp16_scales_the_loss_dynamically_and_resumes_exactly() {
    let scaling = ["train.loss_scale=17179869184", "train.loss_scale_window=3"];
    let out = tmp("fp16-straight");
    let mut t = common::trainer(&tiny_fp16(&scaling), RunConfig { steps: 24, ..cfg(&out, None) }).expect("trainer");
    let mut reports = Vec::new();
    while t.step < 24 {
        let before = t.weights().expect("weights");
        let r = t.train_step().expect("step");
        let after = t.weights().expect("weights");
        let same = before.iter().zip(&after).all(|(a, b)| a.data == b.data);
        assert_eq!(same, r.skipped, "step {}: a skipped step leaves the weights, any other moves them", r.step);
        reports.push(r);
    }
    let scales: Vec<f64> = reports.iter().map(|r| r.loss_scale.expect("fp16 reports its scale")).collect();
    assert_eq!(scales[0], 2f64.powi(34));
    assert!(reports[0].skipped && reports[0].grad_norm.is_nan(), "2^40 overflows f16");
    let mut good = 0;
    for (i, r) in reports.iter().enumerate().take(23) {
        good = if r.skipped { 0 } else { good + 1 };
        let next = if r.skipped {
            scales[i] / 2.0
        } else if good == 3 {
            good = 0;
            scales[i] * 2.0
        } else {
            scales[i]
        };
        assert_eq!(scales[i + 1], next, "step {}: {scales:?}", r.step);
    }
    let trained: Vec<&tessera::runtime::train::StepReport> = reports.iter().filter(|r| !r.skipped).collect();
    assert!(trained.len() >= 3, "the scale came down and steps trained: {scales:?}");
    assert!(scales.windows(2).any(|w| w[1] == 2.0 * w[0]), "good steps in a row grew the scale: {scales:?}");
    eprintln!("loss scales: {scales:?}");
    assert!(trained.last().unwrap().loss < reports[0].loss, "and the loss went down");
    assert_eq!(t.skipped_steps, reports.iter().filter(|r| r.skipped).count() as u64);

    // Resumed halfway: the same losses, scales and weights.
    let b = tmp("fp16-resumed");
    let mut first = common::trainer(&tiny_fp16(&scaling), RunConfig { steps: 24, ..cfg(&b, None) }).expect("trainer");
    let mut again = Vec::new();
    while first.step < 12 {
        again.push(first.train_step().expect("step"));
    }
    first.save().expect("save");
    drop(first);
    let mut second =
        common::trainer(&tiny_fp16(&scaling), RunConfig { steps: 24, ..cfg(&b, Some(b.clone())) }).expect("resume");
    while second.step < 24 {
        again.push(second.train_step().expect("step"));
    }
    let key = |r: &tessera::runtime::train::StepReport| (r.loss.to_bits(), r.loss_scale, r.skipped, r.skipped_steps);
    assert_eq!(reports.iter().map(key).collect::<Vec<_>>(), again.iter().map(key).collect::<Vec<_>>());
    for (x, y) in t.weights().expect("weights").iter().zip(&second.weights().expect("weights")) {
        assert_eq!(x.data, y.data, "the same weights");
    }
}

/// fp16 follows fp32: f16 keeps 11 significant bits (a relative rounding of
/// 2^-11, about 4.9e-4, on every stored weight and activation), so the
/// first loss agrees to about that, and ten steps later the losses still
/// agree within 1%.
#[test]
fn fp16_follows_fp32() {
    let mut a = common::trainer(&tiny_in("fp32"), cfg(&tmp("fp16-vs-32"), None)).expect("trainer");
    let mut b = common::trainer(&tiny_in("fp16"), cfg(&tmp("fp16-vs-16"), None)).expect("trainer");
    let (x, y) = (run(&mut a, 10), run(&mut b, 10));
    assert!(((x[0] - y[0]) / x[0]).abs() < 1e-3, "first loss: fp32 {} fp16 {}", x[0], y[0]);
    for (i, (p, q)) in x.iter().zip(&y).enumerate() {
        assert!(((p - q) / p).abs() < 1e-2, "step {}: fp32 {p} fp16 {q}", i + 1);
    }
    assert_ne!(x, y, "fp16 rounds: the runs are not the same bits");
}

#[test]
fn an_interrupted_save_leaves_the_latest_checkpoint_intact() {
    let out = tmp("atomic");
    let mut t = common::trainer(&tiny(), cfg(&out, None)).expect("trainer");
    run(&mut t, 2);
    let first = t.save().expect("save");
    // A crash mid-save leaves a temporary folder and a temporary `latest`.
    std::fs::create_dir_all(out.join(".tmp-step-00000003-1")).unwrap();
    std::fs::write(out.join(".tmp-step-00000003-1/model.safetensors"), b"half a file").unwrap();
    std::fs::write(out.join("latest.tmp"), b"step-00000003").unwrap();
    assert_eq!(std::fs::read_to_string(out.join("latest")).unwrap(), first.file_name().unwrap().to_string_lossy());
    let resumed = common::trainer(&tiny(), cfg(&out, Some(out.clone()))).expect("resumes from the intact checkpoint");
    assert_eq!(resumed.step, 2);
}

#[test]
fn checkpoints_are_safetensors_named_by_parameter_path() {
    let out = tmp("names");
    let mut t = common::trainer(&tiny(), cfg(&out, None)).expect("trainer");
    run(&mut t, 1);
    let dir = t.save().expect("save");
    let buf = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors_names(&buf);
    for p in &t.training.step.params {
        assert!(st.contains(&p.path), "{} missing from {st:?}", p.path);
    }
}

/// Tensor names of a safetensors file: an 8-byte header length, then JSON.
fn safetensors_names(buf: &[u8]) -> Vec<String> {
    let n = u64::from_le_bytes(buf[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&buf[8..8 + n]).unwrap();
    header.as_object().unwrap().keys().filter(|k| *k != "__metadata__").cloned().collect()
}

#[test]
fn train_command_writes_metrics_and_checkpoints() {
    let out = tmp("cli");
    let o = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args([
            "train",
            "specs/tiny/gpt.spec",
            "--steps",
            "4",
            "--eval-interval",
            "2",
            "--data",
            "data/shakespeare/shakespeare.txt",
        ])
        .args(["--set", "dims.seq=16", "--set", "dims.embed=32", "--out"])
        .arg(&out)
        .output()
        .expect("run tessera");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    assert_eq!(lines.len(), 4);
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["step"], i as u64 + 1);
        for k in ["loss", "lr", "tokens_per_s"] {
            assert!(l[k].as_f64().is_some(), "{k} in {l}");
        }
        assert_eq!(l["val_loss"].is_f64(), (i + 1) % 2 == 0, "val_loss on eval steps only: {l}");
    }
    assert!(out.join("latest").is_file());
    // Bad data gets a clear error, not a panic.
    let o = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["train", "specs/tiny/gpt.spec", "--steps", "1", "--data", "no/such/file.txt"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("cannot read data"));
}

#[test]
fn sampling_picks_by_the_rules() {
    use tessera::runtime::infer::{SampleConfig, pick};
    let logits = [0.0f32, 3.0, 1.0, 2.9];
    let greedy =
        SampleConfig { tokens: 1, temperature: 0.0, top_k: None, top_p: None, seed: 0, kv_cache: false, stop: None };
    assert_eq!(pick(&logits, &greedy, 0), 1);
    // top-k = 1 is greedy whatever the temperature.
    let k1 = SampleConfig { temperature: 5.0, top_k: Some(1), ..greedy.clone() };
    assert!((0..50).all(|s| pick(&logits, &k1, s) == 1));
    // top-p keeps the smallest set above p: tokens 1 and 3 here, never 0 or 2.
    let p = SampleConfig { temperature: 1.0, top_p: Some(0.7), ..greedy.clone() };
    let seen: std::collections::BTreeSet<usize> = (0..200).map(|s| pick(&logits, &p, s)).collect();
    assert_eq!(seen, [1, 3].into_iter().collect());
    // The same seed and step give the same token.
    let t = SampleConfig { temperature: 1.0, ..greedy };
    assert_eq!(pick(&logits, &t, 7), pick(&logits, &t, 7));
}

#[test]
fn generation_continues_a_prompt_deterministically() {
    let mut sources = SourceMap::new();
    let overrides = vec!["dims.seq=16".into(), "dims.embed=32".into(), "train.batch=4".into()];
    let opts = Options { overrides: overrides.clone(), model: None, micro_batch: Some(1) };
    let m = check_path(&mut sources, Path::new("specs/tiny/gpt.spec"), &opts).expect("checks");
    let params = tessera::runtime::init::init_params::<f32>(&m.params, 1);
    let cfg = tessera::runtime::infer::SampleConfig {
        tokens: 20,
        temperature: 0.0,
        top_k: None,
        top_p: None,
        seed: 0,
        kv_cache: false,
        stop: None,
    };
    let prompt: Vec<u32> = b"ROMEO:".iter().map(|&b| b as u32).collect();
    let programs = tessera::compiler::driver::compile_one_sequence(&m, Default::default()).expect("compiles");
    let a = tessera::runtime::infer::generate(&programs, &params, &prompt, &cfg).expect("generates");
    let b = tessera::runtime::infer::generate(&programs, &params, &prompt, &cfg).expect("generates");
    assert_eq!(a.len(), 20);
    assert_eq!(a, b);
    // Greedy decoding of a window longer than the context slides it.
    let long = tessera::runtime::infer::SampleConfig { tokens: 30, ..cfg };
    assert_eq!(tessera::runtime::infer::generate(&programs, &params, &prompt, &long).expect("generates").len(), 30);
}

#[test]
fn bench_reports_tokens_per_second_and_gflops() {
    let o = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["bench", "specs/bench/tiny.spec", "--steps", "1", "--json"])
        .args([
            "--set",
            "dims.seq=16",
            "--set",
            "dims.embed=32",
            "--set",
            "train.batch=4",
            "--set",
            "train.micro_batch=2",
        ])
        .output()
        .expect("run tessera bench");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).expect("one JSON object");
    for k in ["tokens_per_s", "gflops", "gemm_gflops_1024", "step_time_s"] {
        assert!(j[k].as_f64().is_some_and(|v| v > 0.0), "{k} in {j}");
    }
}

#[test]
fn kv_cache_and_recomputation_give_the_same_greedy_tokens() {
    use tessera::runtime::infer::{Generator, SampleConfig};
    let mut sources = SourceMap::new();
    let overrides = vec!["dims.seq=16".into(), "dims.embed=32".into(), "train.batch=4".into()];
    let opts = Options { overrides, model: None, micro_batch: Some(1) };
    let m = check_path(&mut sources, Path::new("specs/tiny/gpt.spec"), &opts).expect("checks");
    // Trained a little, so greedy decoding is not degenerate.
    let out = tmp("kv");
    let mut t = common::trainer(&tiny(), cfg(&out, None)).expect("trainer");
    run(&mut t, 10);
    let params = t.weights().expect("weights");
    let prompt: Vec<u32> = b"ROMEO:".iter().map(|&b| b as u32).collect();
    let m = tessera::compiler::driver::compile_one_sequence(&m, Default::default()).expect("compiles");
    for tokens in [5, 10, 30] {
        // 30 tokens overflow the 16-token context: both restart/slide.
        let greedy =
            SampleConfig { tokens, temperature: 0.0, top_k: None, top_p: None, seed: 0, kv_cache: true, stop: None };
        let mut g = Generator::new(m.clone(), &params).expect("loads");
        let cached = g.generate_cached(&prompt, &greedy).expect("cached");
        let window = g.generate_window(&prompt, &greedy).expect("recomputed");
        let within = (16 - prompt.len()).min(tokens);
        assert_eq!(cached[..within], window[..within], "the first {within} tokens agree");
        assert_eq!(cached.len(), tokens);
    }
    // Seeded sampling explores varied tokens; both paths draw the same ones.
    let sampled =
        SampleConfig { tokens: 10, temperature: 1.0, top_k: None, top_p: None, seed: 3, kv_cache: true, stop: None };
    let mut g = Generator::new(m, &params).expect("loads");
    let cached = g.generate_cached(&prompt, &sampled).expect("cached");
    let window = g.generate_window(&prompt, &sampled).expect("recomputed");
    assert_eq!(cached, window);
    let distinct: std::collections::BTreeSet<_> = cached.iter().collect();
    assert!(distinct.len() >= 3, "a non-degenerate sample: {cached:?}");
}

#[test]
fn gpt2_bpe_matches_the_reference_ids() {
    use tessera::runtime::train::tokenizer::Tokenizer;
    let t = Tokenizer::gpt2().expect("built-in vocabulary");
    assert_eq!(t.vocab(), 50257);
    // GPT-2's ids for these strings (as the original encoder gives them).
    assert_eq!(t.encode("Hello world").unwrap(), vec![15496, 995]);
    assert_eq!(t.encode(" the").unwrap(), vec![262]);
    let text = "ROMEO: But soft! What light through yonder window breaks?\n";
    let ids = t.encode(text).unwrap();
    assert!(ids.len() < text.len() / 2, "BPE compresses English: {} ids for {} bytes", ids.len(), text.len());
    assert_eq!(t.decode(&ids), text, "decoding inverts encoding");
    let bytes = Tokenizer::Bytes;
    assert_eq!(bytes.encode("Hi").unwrap(), vec![72, 105]);
    assert_eq!(bytes.decode(&[72, 105]), "Hi");
}

#[test]
fn token_files_are_little_endian_u16() {
    use tessera::runtime::train::data::{Dataset, Split};
    use tessera::runtime::train::tokenizer::Tokenizer;
    let dir = tmp("bin");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tokens.bin");
    let ids: Vec<u16> = (0..100u16).map(|i| (i * 7) % 300).collect();
    std::fs::write(&path, ids.iter().flat_map(|i| i.to_le_bytes()).collect::<Vec<u8>>()).unwrap();
    let d = Dataset::open(&path, 0.1, 300, &Tokenizer::Bytes).expect("opens");
    assert_eq!(d.len(), 100);
    // A window's targets are its inputs shifted by one token.
    use tessera::compiler::ir::{DType, Dim, Input, TensorType};
    let ty = TensorType::new(DType::I32, vec![Dim::new("batch", 2), Dim::new("seq", 8)]);
    let inputs = ["tokens", "targets"].map(|name| Input { name: name.into(), ty: ty.clone() });
    let [x, y] = <[_; 2]>::try_from(d.batch(Split::Train, &inputs, 1, 0, 0)).expect("two inputs").map(|t| t.data);
    assert_eq!(&x[1..8], &y[..7]);
    assert!(x.iter().all(|t| ids.contains(&(*t as u16))));
    // Ids beyond the model's vocabulary are an error, not a crash.
    let e = Dataset::open(&path, 0.1, 256, &Tokenizer::Bytes).err().expect("too small a vocab");
    assert!(e.to_string().contains("holds token id"), "{e}");
    // An odd number of bytes is not a u16 file.
    std::fs::write(&path, [1u8, 2, 3]).unwrap();
    assert!(Dataset::open(&path, 0.1, 300, &Tokenizer::Bytes).is_err());
}

/// A background save writes the state as it was when the save was asked
/// for, while training goes on: the step after it changes the weights, and
/// the checkpoint still holds the saved step's bits.
#[test]
fn a_background_save_holds_the_state_of_its_step() {
    let out = tmp("bg-save");
    let mut t = common::trainer(&tiny(), cfg(&out, None)).expect("trainer");
    run(&mut t, 3);
    let at_save = t.weights().expect("weights");
    let dest = t.save_in_background().expect("save starts");
    run(&mut t, 5);
    let now = t.weights().expect("weights");
    assert_ne!(now[0].data, at_save[0].data, "training went on after the save");
    assert_eq!(t.finish_saving().expect("written"), Some(dest.clone()));
    assert!(dest.ends_with("step-00000003"), "{}", dest.display());
    let params = &t.training.step.params;
    let saved = tessera::runtime::train::checkpoint::load_params(&out, params).expect("loads");
    for (k, (a, b)) in saved.iter().zip(&at_save).enumerate() {
        let same = a.data.iter().zip(&b.data).all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(same, "parameter {k} of the checkpoint is not the state at its step");
    }
    let _ = std::fs::remove_dir_all(&out);
}

/// `tessera train` saves in the background; killed in the middle of a
/// checkpoint's write, the job keeps its previous checkpoint as the latest,
/// complete and loadable, and a resume tidies the half-written one and goes
/// on. (A model big enough that its files take a while to write: 12.6M
/// parameters, 150 MB of weights and moments.)
#[test]
fn a_job_killed_while_saving_keeps_its_previous_checkpoint() {
    let out = tmp("killed-saving");
    let spec = "specs/tiny/gpt.spec";
    let sets = ["dims.embed=512", "dims.layers=4", "train.save_interval=2"];
    let mut args: Vec<String> = vec!["train".into(), spec.into()];
    args.extend(sets.iter().flat_map(|s| ["--set".to_string(), s.to_string()]));
    args.extend(
        ["--steps", "1000", "--eval-interval", "100000", "--data", "data/shakespeare/shakespeare.txt"]
            .map(String::from),
    );
    args.extend(["--out".to_string(), out.to_string_lossy().into_owned()]);
    let mut child = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(&args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("train starts");
    // Wait for the write of a checkpoint after the first (step 4 or later), and kill the job in it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    let writing = loop {
        assert!(std::time::Instant::now() < deadline, "no second checkpoint was written");
        let tmp_dir = std::fs::read_dir(&out).into_iter().flatten().flatten().find_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix(".tmp-step-")?.get(..8)?.parse::<u64>().ok()?;
            (step >= 4).then_some(step)
        });
        if let Some(step) = tmp_dir {
            child.kill().expect("SIGKILL");
            break step;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    };
    let _ = child.wait();
    let latest = std::fs::read_to_string(out.join("latest")).expect("a latest checkpoint");
    assert_eq!(latest.trim(), format!("step-{:08}", writing - 2), "the previous checkpoint stays the latest");
    let m = common::check_ok(spec, &sets);
    let params = tessera::compiler::driver::compile_training(&m, None).expect("compiles").step.params;
    tessera::runtime::train::checkpoint::load_params(&out, &params).expect("the latest checkpoint is complete");
    // A resume tidies the half-written folder and goes on from the latest.
    let mut resume: Vec<String> = args.clone();
    let at = resume.iter().position(|a| a == "--steps").expect("steps") + 1;
    resume[at] = writing.to_string();
    resume.extend(["--resume".to_string(), out.to_string_lossy().into_owned()]);
    let o = Command::new(env!("CARGO_BIN_EXE_tessera")).args(&resume).output().expect("resume runs");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(!std::fs::read_dir(&out).unwrap().flatten().any(|e| e.file_name().to_string_lossy().starts_with(".tmp")));
    let latest = std::fs::read_to_string(out.join("latest")).expect("latest");
    assert_eq!(latest.trim(), format!("step-{writing:08}"));
    let _ = std::fs::remove_dir_all(&out);
}
