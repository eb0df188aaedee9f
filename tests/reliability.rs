//! Hostile but honest input (issue 11): every failure found by trying to
//! break the CLI is a clean error that says what to do, or correct
//! behaviour. One test per point; docs/reliability.md states the limits.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn tessera(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tessera")).args(args).output().expect("run tessera")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tessera-rel-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

fn data() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data/shakespeare/shakespeare.txt").to_string_lossy().into_owned()
}

/// A byte-level GPT small enough to train in a fraction of a second.
fn tiny_spec(dir: &Path, optimizer: &str, extra_train: &str) -> String {
    let text = format!(
        "use std/transformer\n\
         model tiny {{\n\
         dims {{ vocab = 256, seq = 16, embed = 16, heads = 2, head_dim = embed / heads, mlp = 4 * embed, layers = 1 }}\n\
         input tokens: i32[batch, seq]\n\
         input targets: i32[batch, seq]\n\
         param wte: [vocab, embed] init normal(0.02)\n\
         h = embed(wte, tokens)\n\
         h = repeat layers {{ h = gpt_layer(h) }}\n\
         logits = layernorm(h) @ wte\n\
         loss = cross_entropy(logits, targets)\n\
         }}\n\
         train {{\n\
         optimizer = {optimizer}\n\
         batch = 4 sequences\n\
         steps = 3\n\
         seed = 3\n\
         {extra_train}\n\
         }}\n"
    );
    let p = dir.join("tiny.spec");
    std::fs::write(&p, text).expect("write spec");
    p.to_string_lossy().into_owned()
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write");
    p.to_string_lossy().into_owned()
}

/// Exit 1 (not a crash), with every `want` in stderr.
fn fails_with(o: &Output, want: &[&str]) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(1), "exit code {:?}, stderr:\n{err}", o.status.code());
    for w in want {
        assert!(err.contains(w), "`{w}` not in:\n{err}");
    }
}

fn train(args: &[&str]) -> Output {
    let mut a = vec!["train"];
    a.extend_from_slice(args);
    tessera(&a)
}

fn metrics(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

// ---------------------------------------------------------------- 1. depth

#[test]
fn deep_nesting_is_a_diagnostic_not_a_stack_overflow() {
    let dir = tmp("deep");
    let n = 10_000;
    let x = "model m {\n  input x: f32[batch, d = 4]\n";
    let cases = [
        (
            "parens",
            format!("model m {{\n  dims {{ a = {}1{} }}\n}}\n", "(".repeat(4000), ")".repeat(4000)),
            "brackets nest more than 64 deep",
        ),
        ("minus", format!("model m {{\n  dims {{ a = {}1 }}\n}}\n", "-".repeat(n)), "nests more than 256"),
        ("pow", format!("model m {{\n  dims {{ a = {} }}\n}}\n", vec!["1"; n].join(" ** ")), "nests more than 256"),
        ("plus", format!("model m {{\n  dims {{ a = {} }}\n}}\n", vec!["1"; n].join(" + ")), "nests more than 256"),
        (
            "calls",
            format!("{x}  y = {}x{}\n}}\n", "gelu(".repeat(3000), ")".repeat(3000)),
            "brackets nest more than 64 deep",
        ),
        ("tensor_sum", format!("{x}  y = {}\n}}\n", vec!["x"; n].join(" + ")), "nests more than 256"),
        (
            "else_if",
            format!("{x}  y = x\n  if 1 > 2 {{ y = x }}{}\n}}\n", " else if 1 > 2 { y = x }".repeat(n)),
            "nests more than 256",
        ),
        (
            "mixed",
            format!("{x}  y = {}{}{}\n}}\n", "(".repeat(60), vec!["x"; 250].join(" + "), ")".repeat(60)),
            "nests more than 256",
        ),
    ];
    for (name, text, want) in cases {
        let f = write(&dir, &format!("{name}.spec"), &text);
        for cmd in ["check", "fmt"] {
            let o = tessera(&[cmd, &f]);
            fails_with(&o, &[want, &format!("{name}.spec:")]);
        }
    }
    // Right at the limits, it checks.
    let ok = write(&dir, "ok.spec", &format!("{x}  y = {}x{}\n}}\n", "gelu(".repeat(60), ")".repeat(60)));
    assert!(tessera(&["check", &ok]).status.success());
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------- 2. memory

#[test]
fn cpu_training_checks_memory_before_allocating() {
    let o = train(&["specs/bench/tiny.spec", "--set", "dims.vocab=1000000000000", "--out", "/nonexistent/never"]);
    fails_with(&o, &["needs about", "of memory is available"]);
    let o = tessera(&["bench", "specs/bench/tiny.spec", "--set", "dims.vocab=1000000000000"]);
    fails_with(&o, &["needs about", "of memory is available"]);
}

#[test]
fn simulated_ranks_count_their_memory_together() {
    let m = |data: u64| {
        let sets = [
            format!("parallel.mesh.data={data}"),
            "parallel.layout.batch=data".to_string(),
            format!("train.batch={}", data * 2),
        ];
        let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
        let m = tessera_check("specs/tiny/gpt.spec", &sets);
        tessera::compiler::cost::memory::cpu_training_bytes(&m)
    };
    let (one, many) = (m(1), m(256));
    // Each of 256 ranks holds every weight, its optimizer state and its own
    // runtime (measured: 5.75 GB peak RSS for this run, 83 MB for one device).
    assert!(many > 50 * one, "256 ranks: {many} bytes, one device: {one}");
    assert!(many > 4_000_000_000 && many < 7_000_000_000, "256 ranks: {many} bytes");
}

fn tessera_check(path: &str, sets: &[&str]) -> tessera::compiler::Model {
    let mut sources = tessera::compiler::SourceMap::new();
    let opts =
        tessera::compiler::Options { overrides: sets.iter().map(|s| s.to_string()).collect(), ..Default::default() };
    tessera::compiler::check_path(&mut sources, Path::new(path), &opts)
        .unwrap_or_else(|d| panic!("{}", tessera::compiler::diag::render(&sources, &d.0)))
}

// ---------------------------------------------------------------- 3. long specs

#[test]
fn a_long_spec_checks_and_formats() {
    // 10⁵ dims and 10⁵ statements (quadratic before: 25 s and 47 s to check,
    // over 120 s to format); `benches/check.rs` measures the time per line.
    let dir = tmp("long");
    let n = 100_000;
    let mut text = String::from("model m {\n  dims {\n");
    for i in 0..n {
        text.push_str(&format!("    d{i} = {}\n", i + 1));
    }
    text.push_str("  }\n  input x: f32[batch, d = 4]\n  y0 = x\n");
    for i in 0..n {
        text.push_str(&format!("  y{} = y{i} * 2\n", i + 1));
    }
    text.push_str("}\n");
    let f = write(&dir, "long.spec", &text);
    let o = tessera(&["check", &f]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = tessera(&["fmt", "--check", &f]);
    assert!(o.status.code() == Some(0) || o.status.code() == Some(1), "{}", stderr(&o));
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------- 4. worlds

#[test]
fn plan_worlds_are_bounded() {
    for w in ["18446744073709551615", "1048577", "0"] {
        let o = tessera(&["plan", "specs/models/gpt3-175b.spec", "--search", "--world", w, "--device", "a100_80gb"]);
        fails_with(&o, &["--world must be from 1 to 1048576 GPUs"]);
        let o = tessera(&["plan", "specs/models/gpt3-175b.spec", "--world", w]);
        fails_with(&o, &["--world must be from 1 to 1048576 GPUs"]);
    }
    // The largest world searches (its divisors come from its prime factors).
    let o = tessera(&["plan", "specs/models/gpt3-175b.spec", "--search", "--world", "1048576", "--top", "1"]);
    assert!(o.status.code() == Some(0) || o.status.code() == Some(1), "{}", stderr(&o));
    assert!(!stderr(&o).contains("panicked"));
}

// ---------------------------------------------------------------- 5. unrolled size

#[test]
fn the_unrolled_model_is_bounded_in_all() {
    let dir = tmp("unroll");
    let mut text = String::from(
        "use std/transformer\nmodel m {\n  dims { vocab = 256, seq = 8, embed = 8, heads = 2, head_dim = 4, mlp = 16, layers = 10000 }\n  input tokens: i32[batch, seq]\n  param wte: [vocab, embed] init normal(0.02)\n  h = embed(wte, tokens)\n",
    );
    for i in 0..100 {
        text.push_str(&format!("  h = repeat layers as s{i} {{ h = gpt_layer(h) }}\n"));
    }
    text.push_str("}\n");
    let f = write(&dir, "many.spec", &text);
    fails_with(&tessera(&["check", &f]), &["unrolls more than 10000 layers in all", "many.spec:8:"]);
    // Blocks that call blocks twice, 30 deep: 2³⁰ calls from a short spec.
    // With 40 operations at each leaf the graph's cap stops it; with one, the
    // statement count's.
    let fan = |leaf: &str| {
        let mut fan = format!("block b0(x: [...]) {{ return {leaf} }}\n");
        for i in 1..30 {
            fan.push_str(&format!("block b{i}(x: [...]) {{\n  y = b{}(x)\n  return b{}(y)\n}}\n", i - 1, i - 1));
        }
        fan.push_str("model m {\n  input x: f32[batch, d = 4]\n  y = b29(x)\n}\n");
        fan
    };
    let heavy = write(&dir, "heavy.spec", &fan(&format!("{}x{}", "gelu(".repeat(40), ")".repeat(40))));
    let o = tessera(&["check", &heavy]);
    fails_with(&o, &["unrolls to more than 4000000 operations", "heavy.spec:1:"]);
    assert_eq!(stderr(&o).matches("error:").count(), 1, "one error, no follow-ons: {}", stderr(&o));
    let light = write(&dir, "light.spec", &fan("gelu(x)"));
    fails_with(&tessera(&["check", &light]), &["checking walks more than 10000000 statements"]);
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------- 6. non-finite

#[test]
fn a_diverging_run_stops_and_saves_nothing() {
    let dir = tmp("nan");
    let spec = tiny_spec(&dir, "sgd(lr = 1e30)", "");
    let out = dir.join("run");
    let o = train(&[&spec, "--data", &data(), "--out", &out.to_string_lossy(), "--eval-interval", "100"]);
    fails_with(&o, &["step 2: the loss is NaN", "the first non-finite gradient is `", "nothing was saved"]);
    assert!(!out.join("latest").exists(), "no checkpoint of a diverged run");
    assert!(
        std::fs::read_dir(&out).expect("out").flatten().all(|e| !e.file_name().to_string_lossy().starts_with("step-"))
    );

    // A good checkpoint stays `latest` when a later resume diverges.
    let good = tiny_spec(&dir, "sgd(lr = 0.1)", "");
    let out2 = dir.join("run2");
    let o2 = out2.to_string_lossy().into_owned();
    assert!(train(&[&good, "--data", &data(), "--out", &o2, "--steps", "2"]).status.success());
    let latest = std::fs::read_to_string(out2.join("latest")).expect("latest");
    let bad = tiny_spec(&dir, "sgd(lr = 1e30)", "");
    let o = train(&[&bad, "--data", &data(), "--out", &o2, "--resume", &o2, "--allow-changes", "--steps", "6"]);
    fails_with(&o, &["non-finite"]);
    assert_eq!(std::fs::read_to_string(out2.join("latest")).expect("latest"), latest);

    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn skipped_steps_are_counted_in_metrics() {
    // A learning rate that overflows f32 on every update: `inf * 0` NaNs in the gradients.
    let dir = tmp("skip");
    let spec = tiny_spec(&dir, "sgd(lr = 1e30)", "nonfinite = skip");
    let out = dir.join("run");
    // Step 1 moves the weights by 10³⁰ × the gradient; steps 2 and 3 are not
    // finite and skipped; the evaluation after the last step finds the
    // weights themselves give NaN, and the run stops without saving.
    let o =
        train(&[&spec, "--data", &data(), "--out", &out.to_string_lossy(), "--steps", "3", "--eval-interval", "100"]);
    fails_with(&o, &["the validation loss at step 3 is NaN"]);
    assert!(!out.join("latest").exists());
    let m = metrics(&out);
    let skipped: Vec<u64> = m.iter().filter_map(|v| v["skipped_steps"].as_u64()).collect();
    assert!(!skipped.is_empty(), "skipped steps are counted: {m:?}");
    assert!(m.iter().any(|v| v["skipped"] == true));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sample_refuses_a_checkpoint_with_non_finite_weights() {
    use tessera::runtime::train::{RunConfig, checkpoint};
    let dir = tmp("nanckpt");
    let spec = tiny_spec(&dir, "sgd(lr = 0.1)", "");
    let m = tessera_check(&spec, &[]);
    let cfg = RunConfig {
        steps: 1,
        seed: 1,
        data: Some(PathBuf::from(data())),
        spec: Some((PathBuf::from(&spec), Vec::new())),
        ..RunConfig::new(dir.join("run"))
    };
    let mut t = common::trainer(&m, cfg).expect("trainer");
    let (mut w, opt) = t.state().expect("state");
    w[0].data[3] = f32::NAN;
    t.set_weights(&w).expect("the ranks take the weights");
    assert!(t.save().is_err(), "the trainer never saves non-finite weights");
    checkpoint::save(&dir.join("run"), &t.training, &w, &opt, 1, Some(&t.run)).expect("raw save");
    let o = tessera(&["sample", &dir.join("run").to_string_lossy(), "--tokens", "3"]);
    fails_with(&o, &["holds non-finite values"]);
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------- 7. short data

#[test]
fn data_shorter_than_a_window_is_an_error() {
    let dir = tmp("short");
    let spec = tiny_spec(&dir, "sgd(lr = 0.1)", "");
    let empty = write(&dir, "empty.txt", "");
    let three = write(&dir, "three.txt", "abc");
    // 300 bytes: 270 for training, but 30 for validation, and seq + 1 = 17... so
    // take seq = 64 for a validation split shorter than one window.
    let t300 = write(&dir, "t300.txt", &"x".repeat(300));
    for (f, sets) in [
        (empty.as_str(), "dims.seq=16"),
        ("/dev/null", "dims.seq=16"),
        (three.as_str(), "dims.seq=16"),
        (t300.as_str(), "dims.seq=64"),
    ] {
        let out = dir.join("run");
        let _ = std::fs::remove_dir_all(&out);
        let o = train(&[&spec, "--data", f, "--out", &out.to_string_lossy(), "--set", sets]);
        fails_with(&o, &["is too short", "each split needs at least seq + 1"]);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------- 8. resume

#[test]
fn resume_continues_the_recorded_run() {
    let dir = tmp("resume");
    let spec = tiny_spec(&dir, "adamw(lr = 1e-3)", "");
    let (a, b) = (dir.join("a"), dir.join("b"));
    let (a_s, b_s) = (a.to_string_lossy().into_owned(), b.to_string_lossy().into_owned());
    // Straight: 4 steps with --seed 9 (not the spec's 3) and an override.
    let d = data();
    let straight = [spec.as_str(), "--data", &d, "--out", &a_s, "--seed", "9", "--steps", "4", "--set", "dims.seq=8"];
    assert!(train(&straight).status.success());
    // 2 steps, then a resume that names neither seed, data nor overrides: the recorded ones are used.
    let half = [spec.as_str(), "--data", &d, "--out", &b_s, "--seed", "9", "--steps", "2", "--set", "dims.seq=8"];
    assert!(train(&half).status.success());
    let o = train(&[&spec, "--out", &b_s, "--resume", &b_s, "--steps", "4"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (ma, mb) = (metrics(&a), metrics(&b));
    assert_eq!(ma.len(), 4);
    assert_eq!(mb.len(), 4);
    assert_eq!(ma[3]["loss"], mb[3]["loss"], "the resumed run is the straight run");
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(b.join("step-00000004/state.json")).expect("state"))
            .expect("json");
    for k in ["spec", "spec_sha256", "overrides", "seed", "data", "data_sha256", "tokenizer", "optimizer"] {
        assert!(!state["run"][k].is_null(), "state.json records `{k}`: {state}");
    }

    // A different seed, or another optimizer, is refused...
    fails_with(
        &train(&[&spec, "--out", &b_s, "--resume", &b_s, "--steps", "5", "--seed", "1"]),
        &["the seed changed (was 9, now 1)", "--allow-changes"],
    );
    let sgd = tiny_spec(&dir, "sgd(lr = 0.1, momentum = 0.9)", "");
    fails_with(
        &train(&[&sgd, "--out", &b_s, "--resume", &b_s, "--steps", "5"]),
        &["the optimizer changed", "the spec's text changed"],
    );
    // ...unless the user says so; Adam's moments do not become momentum.
    let o = train(&[&sgd, "--out", &b_s, "--resume", &b_s, "--steps", "5", "--allow-changes"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("the optimizer state starts afresh"), "{}", stderr(&o));
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------- 9. locks

#[test]
fn a_run_folder_is_locked_and_never_taken_over() {
    let dir = tmp("lock");
    let spec = tiny_spec(&dir, "sgd(lr = 0.1)", "");
    let out = dir.join("run");
    let o_s = out.to_string_lossy().into_owned();
    std::fs::create_dir_all(&out).expect("out");
    // Another holder of the lock.
    let held = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(out.join(".lock"))
        .expect("lock file");
    held.try_lock().expect("lock");
    std::fs::write(out.join(".lock"), "pid 4242").expect("pid");
    fails_with(&train(&[&spec, "--data", &data(), "--out", &o_s]), &["is in use by another run", "pid 4242"]);
    drop(held);
    assert!(train(&[&spec, "--data", &data(), "--out", &o_s, "--steps", "2"]).status.success());
    // A fresh run into a finished run's folder is refused, or replaces it when asked.
    fails_with(
        &train(&[&spec, "--data", &data(), "--out", &o_s, "--steps", "1"]),
        &["holds another run", "--overwrite"],
    );
    assert_eq!(metrics(&out).len(), 2);
    let o = train(&[&spec, "--data", &data(), "--out", &o_s, "--steps", "1", "--overwrite"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(metrics(&out).len(), 1, "the old metrics are gone");
    assert_eq!(std::fs::read_to_string(out.join("latest")).expect("latest"), "step-00000001");
    assert!(!out.join("step-00000002").exists());
    // Nor does a resume from another run write into it.
    let other = dir.join("other").to_string_lossy().into_owned();
    assert!(train(&[&spec, "--data", &data(), "--out", &other, "--steps", "1"]).status.success());
    fails_with(
        &train(&[&spec, "--out", &o_s, "--resume", &other, "--steps", "2"]),
        &["needs an --out folder of its own"],
    );
    assert_eq!(metrics(&out).len(), 1);
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------- 10. atomic save

#[test]
fn saves_replace_without_a_window_and_killed_runs_are_tidied() {
    let dir = tmp("atomic");
    let spec = tiny_spec(&dir, "sgd(lr = 0.1)", "");
    let out = dir.join("run");
    let o_s = out.to_string_lossy().into_owned();
    let ok = train(&[&spec, "--data", &data(), "--out", &o_s, "--steps", "4", "--set", "train.save_interval=2"]);
    assert!(ok.status.success(), "{}", stderr(&ok));
    // Leftovers of a killed run: a half-written checkpoint, and step 4 set
    // aside by an interrupted replacement.
    std::fs::create_dir_all(out.join(".tmp-step-00000006-99999")).expect("tmp");
    std::fs::rename(out.join("step-00000004"), out.join(".old-step-00000004-99999")).expect("aside");
    // Resume from step 2 into the same folder: step 4 is rewritten in place.
    let o = train(&[
        &spec,
        "--out",
        &o_s,
        "--resume",
        &out.join("step-00000002").to_string_lossy(),
        "--steps",
        "4",
        "--set",
        "train.save_interval=2",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("removed the unfinished checkpoint `.tmp-step-00000006-99999`"), "{err}");
    assert!(err.contains("restored `step-00000004`"), "{err}");
    let names: Vec<String> =
        std::fs::read_dir(&out).expect("out").flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    assert!(names.iter().all(|n| !n.starts_with(".tmp-") && !n.starts_with(".old-")), "{names:?}");
    assert_eq!(std::fs::read_to_string(out.join("latest")).expect("latest"), "step-00000004");
    assert!(tessera(&["sample", &o_s, "--tokens", "3"]).status.success());
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------- 11. checksums

#[test]
fn damaged_checkpoints_are_named_not_loaded() {
    let dir = tmp("crc");
    let spec = tiny_spec(&dir, "sgd(lr = 0.1)", "");
    let out = dir.join("run");
    let o_s = out.to_string_lossy().into_owned();
    assert!(train(&[&spec, "--data", &data(), "--out", &o_s, "--steps", "1"]).status.success());
    let file = out.join("step-00000001/model.safetensors");
    let pristine = std::fs::read(&file).expect("read");
    let header_len = u64::from_le_bytes(pristine[..8].try_into().expect("8 bytes")) as usize;
    // 40 flipped data bytes.
    let mut b = pristine.clone();
    for i in 0..40 {
        b[8 + header_len + 100 + 13 * i] ^= 0x5a;
    }
    std::fs::write(&file, &b).expect("write");
    fails_with(&tessera(&["sample", &o_s, "--tokens", "2"]), &["fails its checksum", "checkpoint tensor `"]);
    fails_with(&train(&[&spec, "--out", &o_s, "--resume", &o_s, "--steps", "2"]), &["fails its checksum"]);
    // Two header names of equal length swapped.
    let header = String::from_utf8(pristine[8..8 + header_len].to_vec()).expect("utf8");
    let swapped = header
        .replace("\"layernorm.bias\"", "\"@\"")
        .replace("\"layernorm.gain\"", "\"layernorm.bias\"")
        .replace("\"@\"", "\"layernorm.gain\"");
    assert_ne!(swapped, header, "the spec has both names");
    let mut b = pristine.clone();
    b[8..8 + header_len].copy_from_slice(swapped.as_bytes());
    std::fs::write(&file, &b).expect("write");
    fails_with(
        &tessera(&["sample", &o_s, "--tokens", "2"]),
        &["its header (tensor names, shapes or offsets) fails its checksum"],
    );
    // Truncated: the safetensors library's own complaint, explained.
    std::fs::write(&file, &pristine[..100]).expect("write");
    fails_with(&tessera(&["sample", &o_s, "--tokens", "2"]), &["is damaged: it is truncated"]);
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------- 12. sample options

#[test]
fn sample_options_out_of_range_are_errors() {
    for (flag, v, want) in [
        ("--temperature", "nan", "a finite number 0 or more"),
        ("--temperature", "-1", "a finite number 0 or more"),
        ("--top-k", "0", "1 or more"),
        ("--top-p", "0", "above 0 and at most 1"),
        ("--top-p", "-1", "above 0 and at most 1"),
        ("--top-p", "2", "above 0 and at most 1"),
        ("--top-p", "nan", "above 0 and at most 1"),
    ] {
        let o = tessera(&["sample", "runs/none", flag, v]);
        assert_eq!(o.status.code(), Some(2), "{flag} {v}");
        assert!(stderr(&o).contains(want), "{flag} {v}: {}", stderr(&o));
    }
    let o = tessera(&["train", "specs/bench/tiny.spec", "--steps", "-1"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("expected a whole number 1 or more, got `-1`"), "{}", stderr(&o));
    assert!(!stderr(&o).contains("tip:"), "{}", stderr(&o));
}

// ---------------------------------------------------------------- 13. errors

#[test]
fn errors_say_what_went_wrong_and_what_to_do() {
    let dir = tmp("errors");
    // Division by zero in dims.
    fails_with(
        &tessera(&["check", "specs/bench/tiny.spec", "--set", "dims.heads=0"]),
        &["division by zero: `heads` is 0", "tiny.spec:7:"],
    );
    // One error for one bad override, not three.
    let o = tessera(&["check", "specs/bench/tiny.spec", "--set", "dims.embed=abc"]);
    fails_with(&o, &["expected a number, found `abc`"]);
    assert_eq!(stderr(&o).matches("error:").count(), 1, "{}", stderr(&o));
    // Not UTF-8.
    let f = dir.join("latin1.spec");
    std::fs::write(&f, b"model m {\xff }").expect("write");
    fails_with(&tessera(&["check", &f.to_string_lossy()]), &["is not UTF-8 text", "save it as UTF-8"]);
    // plan --world 0.
    fails_with(&tessera(&["plan", "specs/models/gpt3-175b.spec", "--world", "0"]), &["--world must be from 1"]);
    // A broken device profile named by plan --device.
    let devs = dir.join("devices");
    std::fs::create_dir_all(&devs).expect("dir");
    std::fs::write(devs.join("mine.toml"), "name = \"mine\"\npeak_tflops = [\n").expect("toml");
    let o = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["plan", "specs/models/gpt3-175b.spec", "--device", "mine", "--world", "1024"])
        .env("TESSERA_DEVICES", &devs)
        .output()
        .expect("run");
    fails_with(&o, &["did not load", "mine.toml"]);
    // Checkpoint folders: missing state.json, empty latest, moved spec, prompt outside the vocabulary.
    let spec = tiny_spec(&dir, "sgd(lr = 0.1)", "");
    let out = dir.join("run");
    let o_s = out.to_string_lossy().into_owned();
    assert!(
        train(&[&spec, "--data", &data(), "--out", &o_s, "--steps", "1", "--set", "dims.vocab=128"]).status.success()
    );
    fails_with(
        &tessera(&["sample", &o_s, "--prompt", "é", "--tokens", "1"]),
        &["outside the model's vocabulary of 128 tokens"],
    );
    std::fs::rename(&spec, dir.join("moved.spec")).expect("move");
    fails_with(&tessera(&["sample", &o_s, "--tokens", "1"]), &["which is no longer there; pass --spec FILE"]);
    std::fs::rename(dir.join("moved.spec"), &spec).expect("move back");
    std::fs::rename(out.join("step-00000001/state.json"), dir.join("state.json")).expect("hide");
    fails_with(&tessera(&["sample", &o_s, "--tokens", "1"]), &["step-00000001/state.json` is missing"]);
    std::fs::rename(dir.join("state.json"), out.join("step-00000001/state.json")).expect("restore");
    std::fs::write(out.join("latest"), "").expect("empty latest");
    fails_with(&tessera(&["sample", &o_s, "--tokens", "1"]), &["latest` is empty"]);
    // A spec's data is resolved like `use`, and a miss says where it looked.
    let nested = dir.join("a/b");
    std::fs::create_dir_all(&nested).expect("dir");
    std::fs::copy(data(), dir.join("corpus.txt")).expect("copy data");
    let s2 = tiny_spec(&nested, "sgd(lr = 0.1)", "data = \"corpus.txt\"");
    let o = train(&[&s2, "--out", &dir.join("r2").to_string_lossy(), "--steps", "1"]);
    assert!(o.status.success(), "found two folders up: {}", stderr(&o));
    let s3 = tiny_spec(&nested, "sgd(lr = 0.1)", "data = \"nowhere.txt\"");
    fails_with(
        &train(&[&s3, "--out", &dir.join("r3").to_string_lossy()]),
        &["was not found; looked in", "resolved like `use`"],
    );
    // A bad --trace path before the first step.
    let o = train(&[
        &spec,
        "--data",
        &data(),
        "--out",
        &dir.join("r4").to_string_lossy(),
        "--trace",
        "/proc/none/trace.json",
    ]);
    fails_with(&o, &["cannot write the trace"]);
    assert!(!dir.join("r4/metrics.jsonl").exists(), "nothing trained");
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------- 14. warnings and fmt

#[test]
fn unused_params_warn_and_fmt_wraps_at_100_columns() {
    let dir = tmp("fmt");
    let f = write(
        &dir,
        "unused.spec",
        "model m {\n  input x: f32[batch, d = 4]\n  param w: [d, e = 3] init normal(0.02)\n  y = x\n}\n",
    );
    let o = tessera(&["check", &f]);
    assert!(o.status.success());
    assert!(stderr(&o).contains("warning: parameter `w` is declared but nothing uses it"), "{}", stderr(&o));
    assert!(stderr(&o).contains("unused.spec:3:3"), "{}", stderr(&o));
    let used = tessera(&["check", "specs/tiny/gpt.spec"]);
    assert!(!stderr(&used).contains("warning"), "{}", stderr(&used));

    let long = write(
        &dir,
        "long.spec",
        "model m {\n  input x: f32[batch, d = 4]\n  y = some_function(x, argument_one = 123456789, argument_two = gelu(x) + gelu(x) + gelu(x) + gelu(x))\n  z = x + x + x + x + x + x + x + x + x + x + x + x + x + x + x + x + x + x + x + x + x + x + x + x + x + x + x + x + x\n}\n",
    );
    let o = tessera(&["fmt", &long]);
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(text.lines().all(|l| l.len() <= 100), "{text}");
    assert!(text.contains("  y = some_function(\n    x,\n"), "{text}");
    // The wrapped text is canonical and means the same.
    let again = write(&dir, "again.spec", &text);
    assert!(tessera(&["fmt", "--check", &again]).status.success());
    let _ = std::fs::remove_dir_all(&dir);
}

/// Killed at any moment, a run that rewrites existing checkpoints (a resume
/// from an older step into the same folder) leaves `latest` naming one
/// that loads, and the next start tidies what the kill left.
#[test]
fn kill_during_saves_never_loses_latest() {
    let dir = tmp("kill");
    let spec = tiny_spec(&dir, "sgd(lr = 0.1)", "");
    let out = dir.join("run");
    let o_s = out.to_string_lossy().into_owned();
    let every = ["--set", "train.save_interval=1"];
    let first =
        [spec.as_str(), "--data", &data(), "--out", &o_s, "--steps", "200", every[0], every[1]].map(str::to_string);
    assert!(train(&first.iter().map(String::as_str).collect::<Vec<_>>()).status.success());
    let step2 = out.join("step-00000002").to_string_lossy().into_owned();
    let mut killed = 0;
    for k in 0..8u64 {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tessera"))
            .args(["train", &spec, "--out", &o_s, "--resume", &step2, "--steps", "200", every[0], every[1]])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn");
        // Spread the kills over start-up, training and saving.
        std::thread::sleep(std::time::Duration::from_millis(40 + (k * 97) % 400));
        if child.try_wait().ok().flatten().is_none() {
            killed += 1;
        }
        let _ = child.kill();
        let _ = child.wait();
        let o = tessera(&["sample", &o_s, "--tokens", "2"]);
        assert!(o.status.success(), "after kill {k}: {}", stderr(&o));
    }
    eprintln!("{killed} of 8 runs killed while running");
    // The next run starts clean and leaves no leftovers.
    let o = train(&[&spec, "--out", &o_s, "--resume", &step2, "--steps", "200", every[0], every[1]]);
    assert!(o.status.success(), "{}", stderr(&o));
    let names: Vec<String> =
        std::fs::read_dir(&out).expect("out").flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    assert!(names.iter().all(|n| !n.starts_with(".tmp-") && !n.starts_with(".old-")), "{names:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
