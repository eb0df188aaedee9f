//! Training: seeded determinism, exact resume, atomic checkpoints, and that
//! the loss goes down; `tessera train`'s command-line contract.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use tessera::compiler::{Options, SourceMap, check_path};
use tessera::runtime::train::{RunConfig, Trainer};

fn tiny() -> tessera::compiler::Model {
    tiny_in("fp32", &[])
}

/// The tiny GPT, trained in `precision`, with more `overrides`.
fn tiny_in(precision: &str, overrides: &[&str]) -> tessera::compiler::Model {
    let mut sources = SourceMap::new();
    let mut overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    overrides.extend(["dims.seq=16", "dims.embed=32", "train.batch=4"].map(String::from));
    overrides.push(format!("train.precision={precision}"));
    let opts = Options { overrides, model: None, micro_batch: None };
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
        resume_is_exact(precision, &[]);
    }
    // Adafactor's state (factored second moments and a first moment) is checkpointed too.
    resume_is_exact("fp32", &["train.optimizer=adafactor(lr = 1e-2, beta1 = 0.9, factor_min = 16)"]);
}

fn resume_is_exact(precision: &str, overrides: &[&str]) {
    let tiny = || tiny_in(precision, overrides);
    let name = format!("{precision}-{}", overrides.len());
    let (a, b) = (tmp(&format!("straight-{name}")), tmp(&format!("resumed-{name}")));
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
    let mut again = common::trainer(&tiny(), cfg(&tmp(&format!("again-{name}")), None)).expect("trainer");
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

/// `loss_scale_hysteresis` and `loss_scale_min`, as Megatron's
/// `DynamicGradScaler`: with a hysteresis of 2 the first overflow leaves the
/// scale and the second halves it (and each one after, until good steps
/// grow it again, which restores the hysteresis); every scale follows that
/// rule over 24 steps. With a floor the gradients still overflow at, the
/// run stops and names the scale.
#[test]
fn fp16_loss_scale_hysteresis_and_floor() {
    let scaling = ["train.loss_scale=17179869184", "train.loss_scale_window=3", "train.loss_scale_hysteresis=2"];
    let mut t = common::trainer(&tiny_fp16(&scaling), RunConfig { steps: 24, ..cfg(&tmp("fp16-hyst"), None) })
        .expect("trainer");
    let reports: Vec<_> = (0..24).map(|_| t.train_step().expect("step")).collect();
    let scales: Vec<f64> = reports.iter().map(|r| r.loss_scale.expect("fp16 reports its scale")).collect();
    assert!(reports[0].skipped && reports[1].skipped && scales[1] == scales[0], "{scales:?}");
    let (mut good, mut left) = (0, 2);
    for (i, r) in reports.iter().enumerate().take(23) {
        let next = if r.skipped {
            good = 0;
            left = (left - 1).max(0);
            if left == 0 { scales[i] / 2.0 } else { scales[i] }
        } else {
            good += 1;
            if good == 3 {
                good = 0;
                left = 2;
                scales[i] * 2.0
            } else {
                scales[i]
            }
        };
        assert_eq!(scales[i + 1], next, "step {}: {scales:?}", r.step);
    }
    assert!(reports.iter().any(|r| !r.skipped), "the scale came down and steps trained: {scales:?}");
    // A floor of 2^30, at which the loss (about 5.5 × 2^30) still overflows f16.
    let floor = ["train.loss_scale=17179869184", "train.loss_scale_min=1073741824"];
    let mut t =
        common::trainer(&tiny_fp16(&floor), RunConfig { steps: 24, ..cfg(&tmp("fp16-floor"), None) }).expect("trainer");
    let e = (0..24).find_map(|_| t.train_step().err()).expect("the run stops at its floor");
    assert!(e.to_string().contains("loss scale 1073741824"), "{e}");
}

/// fp16 follows fp32: f16 keeps 11 significant bits (a relative rounding of
/// 2^-11, about 4.9e-4, on every stored weight and activation), so the
/// first loss agrees to about that, and ten steps later the losses still
/// agree within 1%.
#[test]
fn fp16_follows_fp32() {
    let mut a = common::trainer(&tiny_in("fp32", &[]), cfg(&tmp("fp16-vs-32"), None)).expect("trainer");
    let mut b = common::trainer(&tiny_in("fp16", &[]), cfg(&tmp("fp16-vs-16"), None)).expect("trainer");
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

/// Adafactor's update against `transformers.optimization.Adafactor`
/// (tests/fixtures/adafactor/make.py, PyTorch in float64; Tessera's update
/// graph runs in float64 too, on the interpreter): six steps of three
/// settings (T5's relative step; a fixed rate with momentum and weight
/// decay; no parameter scale with a tight update clip and another decay),
/// on a matrix, a layer-stacked pair of them (each layer its own matrix, as
/// PyTorch sees two tensors), a short matrix (factored, as transformers
/// factors every matrix) and a vector (not). The displacement from the
/// initial weights agrees within 1e-12 relative, every step (measured: 1.2e-14).
#[test]
fn adafactor_steps_match_transformers() {
    use tessera::compiler::autodiff::update::{UpdateParam, update_graph};
    use tessera::compiler::config::Optimizer;
    use tessera::compiler::ir::Dim;
    use tessera::runtime::exec::Interpreter;
    use tessera::runtime::tensor::Tensor;
    let bytes = std::fs::read("tests/fixtures/adafactor/adafactor.safetensors").expect("the fixture");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    let shapes: [(&str, Vec<Dim>); 4] = [
        ("matrix", vec![Dim::new("row", 24), Dim::new("col", 40)]),
        ("stack", vec![Dim::new("layer", 2), Dim::new("row", 24), Dim::new("col", 40)]),
        ("short", vec![Dim::new("row", 4), Dim::new("col", 40)]),
        ("vector", vec![Dim::new("col", 40)]),
    ];
    let read = |name: &str, dims: &[Dim]| -> Tensor<f64> {
        let v = st.tensor(name).unwrap_or_else(|_| panic!("no `{name}` in the fixture"));
        let data = v.data().chunks(8).map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes"))).collect();
        Tensor { dims: dims.to_vec(), data }
    };
    // (setting, optimizer, the learning rate of each step)
    let adafactor = |lr, beta1, decay, clip, scale_parameter, weight_decay| Optimizer::Adafactor {
        lr,
        beta1,
        decay,
        eps: 1e-30,
        eps_scale: 1e-3,
        clip,
        scale_parameter,
        weight_decay,
        // transformers factors every matrix; Tessera's default (Mesh TensorFlow's and optax's) needs 128 rows.
        factor_min: 4,
    };
    let settings = [
        // The relative step, min(1e-2, 1/√t): the schedule inverse_sqrt(10000 steps, held) at lr 1e-2.
        ("relative", adafactor(1e-2, 0.0, 0.8, 1.0, true, 0.0)),
        ("momentum", adafactor(1e-3, 0.9, 0.8, 1.0, true, 0.1)),
        ("clipped", adafactor(1e-2, 0.0, 0.5, 0.5, false, 0.0)),
    ];
    let mut worst = 0f64;
    for (name, opt) in settings {
        let params: Vec<UpdateParam> = shapes
            .iter()
            .map(|(_, dims)| UpdateParam {
                dims: dims.clone(),
                logical: dims.clone(),
                splits: Vec::new(),
                decays: true,
                span: Default::default(),
            })
            .collect();
        let factored: Vec<bool> = shapes.iter().map(|(_, d)| opt.factored(d).is_some()).collect();
        assert_eq!(factored, [true, true, true, false], "which moments factor");
        let mut eight = opt.clone();
        if let Optimizer::Adafactor { factor_min, .. } = &mut eight {
            *factor_min = 8;
        }
        assert!(eight.factored(&shapes[2].1).is_none() && eight.factored(&shapes[0].1).is_some());
        let update = update_graph(&params, &opt, None, false);
        let init: Vec<Tensor<f64>> = shapes.iter().map(|(k, d)| read(&format!("{name}.init.{k}"), d)).collect();
        let mut w = init.clone();
        let mut state: Vec<Vec<Tensor<f64>>> =
            params.iter().map(|p| p.state(&opt).iter().map(|(_, d)| Tensor::zeros(d)).collect()).collect();
        for step in 0..6u64 {
            let mut inputs = vec![Tensor::zeros(&[]); update.hyper + 1];
            for (k, made) in update.outputs.iter().enumerate() {
                inputs[made.input] = w[k].clone();
                inputs[made.input + 1] = read(&format!("{name}.grad{step}.{}", shapes[k].0), &shapes[k].1);
                for (j, (_, i, _)) in made.state.iter().enumerate() {
                    inputs[*i] = state[k][j].clone();
                }
            }
            // The hyperparameters in f64 (the runtime's are f32: `Optimizer::hyper`).
            let t = (step + 1) as f64;
            let (lr, decay) = match opt {
                Optimizer::Adafactor { lr, decay, .. } => (lr, decay),
                _ => unreachable!(),
            };
            let hyper = vec![lr, 0.0, 1.0 - t.powf(-decay)];
            let runtime: Vec<f32> = hyper.iter().map(|&x| x as f32).collect();
            assert_eq!(opt.hyper(lr, step + 1).to_vec(), runtime, "the runtime's hyperparameters");
            inputs[update.hyper] = Tensor { dims: vec![Dim::new("hyper", 3)], data: hyper };
            let vals = Interpreter { graph: &update.graph, params: &[], dropout: None, comm: None }
                .run(&inputs, &[])
                .expect("the update runs");
            for (k, made) in update.outputs.iter().enumerate() {
                w[k] = vals[made.weights.index()].clone();
                for (j, (_, _, v)) in made.state.iter().enumerate() {
                    state[k][j] = vals[v.index()].clone();
                }
                let (key, dims) = (&shapes[k].0, &shapes[k].1);
                let theirs = read(&format!("{name}.after{step}.{key}"), dims);
                let moved =
                    |t: &Tensor<f64>| -> Vec<f64> { t.data.iter().zip(&init[k].data).map(|(a, b)| a - b).collect() };
                let (a, b) = (moved(&w[k]), moved(&theirs));
                let norm = |x: &[f64]| x.iter().map(|v| v * v).sum::<f64>().sqrt();
                let diff: Vec<f64> = a.iter().zip(&b).map(|(x, y)| x - y).collect();
                let e = norm(&diff) / norm(&b);
                assert!(e <= 1e-12, "{name} step {}: `{key}` moved {e:.2e} away from transformers' step", step + 1);
                worst = worst.max(e);
            }
        }
    }
    eprintln!("adafactor against transformers: worst relative error of the displacement {worst:.1e}");
}

/// The batch ramp-up follows Megatron's `--rampup-batch-size start
/// increment samples` step by step: GPT-3's (16 sequences, +16, over 12B
/// tokens = 5,859,375 sequences of 2048, to 1536) against a simulation of
/// Megatron's calculator (batch = start + ⌊consumed / (samples /
/// increments)⌋ · increment, the full batch past `samples`), and a token
/// amount converts back to the step that consumes it.
#[test]
fn batch_rampup_follows_megatron() {
    let sets = [
        "dims.seq=2048",
        "train.batch=1536",
        "train.micro_batch=1",
        "train.batch_rampup=rampup(start = 16 sequences, increment = 16 sequences, over = 12000000000 tokens)",
    ];
    let m = common::check_ok("specs/tiny/gpt.spec", &sets);
    let t = m.train.as_ref().expect("train");
    let (start, increment, samples) = (16u64, 16u64, 12_000_000_000u64 / 2048);
    assert_eq!(t.rampup.map(|r| (r.start, r.increment, r.samples)), Some((start, increment, samples)));
    let per = samples as f64 / ((1536 - start) / increment) as f64;
    let (mut consumed, mut step, mut sizes) = (0u64, 0u64, std::collections::BTreeSet::new());
    loop {
        let megatron =
            if consumed > samples { 1536 } else { start + (consumed as f64 / per).floor() as u64 * increment };
        assert_eq!(t.batch_at(step), (megatron.min(1536), consumed), "step {step}");
        assert!((t.steps_for(consumed as f64) - step as f64).abs() < 1e-9, "step {step}");
        sizes.insert(megatron);
        if megatron >= 1536 {
            break;
        }
        consumed += megatron;
        step += 1;
    }
    assert_eq!(sizes.len(), 96, "16, 32, ..., 1536");
    assert_eq!(t.batch_phases().len(), 96);
    eprintln!("GPT-3's ramp-up: {step} steps to the full batch, {consumed} sequences");
    // A ramp-up that does not end at the batch, or that a pipeline cannot schedule, is an error.
    for (bad, says) in [
        ("rampup(start = 16 sequences, increment = 20 sequences, over = 100 sequences)", "does not end at the batch"),
        ("rampup(start = 2 sequences, increment = 2 sequences, over = 100 sequences)", "do not run 1f1b"),
    ] {
        let pp = ["parallel.mesh.pipeline=2", "parallel.layout.layer=pipeline", "parallel.pipeline.schedule=1f1b"];
        let mut sets: Vec<String> = ["train.batch=64", "train.micro_batch=2"].map(String::from).to_vec();
        sets.extend(pp.map(String::from));
        sets.push(format!("train.batch_rampup={bad}"));
        let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
        let (sources, r) = common::check(Path::new("specs/tiny/gpt.spec"), &sets);
        let d = r.expect_err("an unusable ramp-up");
        let text = tessera::compiler::diag::render(&sources, &d.0);
        assert!(text.contains(says), "{text}");
    }
}

/// Training under a batch ramp-up: each step runs the step program of its
/// batch (fewer microbatches of the same size), and the weights and
/// optimizer state carry over when the batch grows. Its first step equals a
/// run whose batch is the ramp's start; the step after the batch grows
/// equals resuming the ramped run's checkpoint under that batch; and the
/// ramped run under data and pipeline parallelism equals one device.
#[test]
fn training_ramps_the_batch_up() {
    let ramp = "train.batch_rampup=rampup(start = 2 sequences, increment = 2 sequences, over = 24 sequences)";
    let base = ["dims.seq=16", "dims.embed=32", "train.batch=8", "train.micro_batch=1"];
    let spec = |extra: &[&str]| -> tessera::compiler::Model {
        let sets: Vec<&str> = base.iter().chain(extra).copied().collect();
        common::check_ok("specs/tiny/gpt.spec", &sets)
    };
    let m = spec(&[ramp]);
    let t = m.train.clone().expect("train");
    let sizes: Vec<u64> = (0..10).map(|s| t.batch_at(s).0).collect();
    assert_eq!(sizes, [2, 2, 2, 2, 4, 4, 6, 6, 8, 8], "per = 8 sequences between increments");
    let out = tmp("ramp");
    let mut ramped = common::trainer(&m, cfg(&out, None)).expect("trainer");
    let mut reports = Vec::new();
    while ramped.step < 4 {
        reports.push(ramped.train_step().expect("step"));
    }
    ramped.save().expect("save");
    let at4 = ramped.weights().expect("weights");
    while ramped.step < 10 {
        reports.push(ramped.train_step().expect("step"));
    }
    assert_eq!(reports.iter().map(|r| r.batch).collect::<Vec<_>>(), sizes);
    // Step 1 is a step of batch 2.
    let mut two = common::trainer(&spec(&["train.batch=2"]), cfg(&tmp("ramp-two"), None)).expect("trainer");
    assert_eq!(two.train_step().expect("step").loss, reports[0].loss, "the first step is a batch of 2");
    // Step 5, the first of batch 4, is the checkpoint of step 4 resumed under batch 4.
    let mut four = common::trainer(
        &spec(&["train.batch=4"]),
        RunConfig { allow_changes: true, ..cfg(&tmp("ramp-four"), Some(out.clone())) },
    )
    .expect("resumes under batch 4");
    assert_eq!(four.step, 4);
    assert_eq!(four.weights().expect("weights")[0].data, at4[0].data);
    assert_eq!(four.train_step().expect("step").loss, reports[4].loss, "step 5 is a batch of 4 from step 4's state");
    assert!(
        reports[9].loss < reports[0].loss,
        "and it trains: {:?}",
        reports.iter().map(|r| r.loss).collect::<Vec<_>>()
    );
    // The same ramp under data (2) and pipeline (2 stages, 1F1B) parallelism.
    let single: Vec<f64> = reports.iter().map(|r| r.loss).collect();
    let final_weights = ramped.weights().expect("weights");
    let grads = ramped.reference_gradients().expect("gradients");
    let layouts: [&[&str]; 2] = [
        &["parallel.mesh.data=2", "parallel.layout.batch=data"],
        &["parallel.mesh.pipeline=2", "parallel.layout.layer=pipeline", "parallel.pipeline.schedule=gpipe"],
    ];
    for layout in layouts {
        let mut sets = vec![ramp];
        sets.extend(layout);
        let mut p = common::trainer(&spec(&sets), cfg(&tmp("ramp-par"), None)).expect("trainer");
        let losses: Vec<f64> = (0..10).map(|_| p.train_step().expect("step").loss).collect();
        for (step, (a, b)) in losses.iter().zip(&single).enumerate() {
            assert!((a - b).abs() <= 1e-5 * b.abs(), "{layout:?} step {}: {a} against one device's {b}", step + 1);
        }
        for (k, (x, y)) in p.weights().expect("weights").iter().zip(&final_weights).enumerate() {
            // Weights whose gradient is zero in exact arithmetic (the
            // attention's key bias), which Adam turns into full steps of
            // rounding noise, are left out, as in tests/parallel.rs.
            let g = &grads[k].data;
            let keep: Vec<usize> = (0..g.len()).filter(|&i| !common::zero_gradient(g, i)).collect();
            let pick = |t: &[f32]| keep.iter().map(|&i| t[i]).collect::<Vec<f32>>();
            let e = common::rel(&pick(&x.data), &pick(&y.data));
            assert!(e <= 1e-5, "{layout:?}: final `{}` differs by {e:.1e}", m.params[k].path);
        }
    }
}
