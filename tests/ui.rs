//! The corpus of wrong specs in tests/ui: each must fail with diagnostics that
//! point into the source (file:line:col, a labelled span) and say what to do.
//! The rendered text of each is a snapshot.

mod common;

use common::{check, specs_under};
use tessera::compiler::diag::render;

#[test]
fn every_wrong_spec_is_reported_with_location_and_help() {
    let specs = specs_under("tests/ui");
    assert!(specs.len() >= 40, "the corpus must hold at least 40 wrong specs, found {}", specs.len());
    for p in specs {
        let (sources, r) = check(&p, &[]);
        let diags = match r {
            Ok(m) => panic!("{} should fail to check, but checked model `{}`", p.display(), m.name),
            Err(d) => d,
        };
        assert!(!diags.is_empty(), "{}: an error without diagnostics", p.display());
        for d in &diags.0 {
            assert!(d.primary_span().is_some(), "{}: `{}` has no primary label", p.display(), d.message);
            assert!(d.help.as_deref().is_some_and(|h| !h.is_empty()), "{}: `{}` has no help", p.display(), d.message);
        }
        let text = render(&sources, &diags.0);
        // The first location names the file, line and column.
        let loc = text
            .lines()
            .find(|l| l.trim_start().starts_with("┌─"))
            .unwrap_or_else(|| panic!("{}: no location in\n{text}", p.display()));
        let loc = loc.trim_start().trim_start_matches("┌─").trim();
        let parts: Vec<&str> = loc.rsplitn(3, ':').collect();
        assert!(
            parts.len() == 3 && parts[0].parse::<u32>().is_ok() && parts[1].parse::<u32>().is_ok(),
            "{}: location `{loc}` is not file:line:col",
            p.display()
        );
        let name = p.file_stem().expect("stem").to_string_lossy().into_owned();
        insta::assert_snapshot!(format!("ui_{name}"), text);
    }
}

/// Several independent mistakes are reported in one run.
#[test]
fn several_errors_in_one_run() {
    let (_, r) = check(std::path::Path::new("tests/ui/unknown_dim.spec"), &[]);
    assert_eq!(r.expect_err("fails").len(), 1, "a failed param must not cascade into `unknown name`");
    let (_, r) = check(std::path::Path::new("tests/ui/experts_not_divisible.spec"), &[]);
    assert!(r.expect_err("fails").len() >= 2, "layout errors are all reported");
}

/// Batch-mixing ops are an error only when a microbatch is smaller than the
/// batch, except a contrastive `rename` of the batch, which the per-rank
/// programs gather over the data axis: it checks on one rank, and under data
/// parallelism with one microbatch per rank, and is refused under gradient
/// accumulation and under a pipeline.
#[test]
fn batch_mixing_is_refused_only_where_it_would_change_meaning() {
    let spec = std::path::Path::new("tests/specs/contrastive.spec");
    assert!(check(spec, &[]).1.is_ok(), "one microbatch of the whole batch checks");
    let dp2 = ["parallel.mesh.data=2", "parallel.layout.batch=data"];
    assert!(check(spec, &dp2).1.is_ok(), "data 2, one microbatch per rank: the batch is gathered");
    // `iota(batch)` numbers the examples of the global batch: gathered alike.
    let clip = std::path::Path::new("specs/tiny/clip.spec");
    assert!(check(clip, &dp2).1.is_ok(), "CLIP-tiny under data 2");
    let (sources, r) = check(clip, &["train.micro_batch=4"]);
    let text = render(&sources, &r.expect_err("refused").0);
    assert!(text.contains("`iota` numbers the examples by their place in the batch"), "{text}");
    for (sets, says) in [
        (vec!["train.micro_batch=4"], "gradient accumulation runs microbatches of 4"),
        (vec!["parallel.mesh.data=2", "parallel.layout.batch=data", "train.micro_batch=2"], "microbatches of 2"),
    ] {
        let (sources, r) = check(spec, &sets);
        let text = render(&sources, &r.expect_err("refused").0);
        assert!(text.contains(says), "{sets:?}: {text}");
    }
}

/// A dim argument (`heads -> image_heads`) binds the name in the block it is
/// passed to and in every block that block calls, unless a signature binds
/// the name anew; a bound dim used as a number is its own size.
#[test]
fn dim_arguments_reach_the_blocks_a_block_calls() {
    let m = common::check_ok("specs/tiny/clip.spec", &[]);
    let dims = |path: &str| -> Vec<String> {
        let p = m.params.iter().find(|p| p.path == path).unwrap_or_else(|| panic!("no parameter `{path}`"));
        p.ty.dims.iter().map(|d| format!("{}={}", d.name, d.size)).collect()
    };
    // gpt_layer -> self_attention and mlp: two calls deep.
    assert_eq!(
        dims("image.vit_layer.self_attention.wqkv"),
        ["layer=2", "image_embed=48", "qkv=3", "image_heads=4", "image_head_dim=12"]
    );
    assert_eq!(dims("text.gpt_layer.mlp.w_in"), ["layer=2", "text_embed=32", "text_mlp=128"]);
    // `embed`, bound by the signature to `text_embed`, evaluates to 32 in a constant.
    let dir = std::env::temp_dir().join(format!("tessera-dimarg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let spec = dir.join("sized.spec");
    std::fs::write(
        &spec,
        "block widen(x: f32[batch, embed], by = 2) -> f32[batch, wide] {\n\
           param w: [embed, wide] init normal(1.0 / sqrt(embed))\n\
           return x @ w * sqrt(embed)\n\
         }\n\
         model m {\n\
           dims { embed = 8, text = 32, wide = 64 }\n\
           input x: f32[batch, text]\n\
           loss = mean(widen(x), batch, wide)\n\
         }\n",
    )
    .expect("write");
    let (_, r) = check(&spec, &[]);
    let m = r.unwrap_or_else(|e| panic!("checks: {e:?}"));
    let w = &m.params[0];
    assert_eq!(w.ty.dims[0].name, "text");
    let std = match &w.init {
        tessera::compiler::ir::params::Init::Normal { std } => *std,
        other => panic!("{other:?}"),
    };
    assert!((std - 1.0 / 32f64.sqrt()).abs() < 1e-12, "init std {std} is 1/sqrt(32), not 1/sqrt(8)");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `iota(d, start = k)` holds the positions k, k + 1, ... of `d`: OPT's
/// learned positions, offset by 2, are rows 2.. of its table.
#[test]
fn iota_numbers_the_positions_of_a_dim() {
    use tessera::runtime::exec::Interpreter;
    use tessera::runtime::tensor::Tensor;
    let dir = std::env::temp_dir().join(format!("tessera-iota-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let spec = dir.join("opt_positions.spec");
    std::fs::write(
        &spec,
        "model m {\n\
           dims { vocab = 64, seq = 8, embed = 4, pos = seq + 2 }\n\
           input tokens: i32[batch, seq]\n\
           input targets: i32[batch, seq]\n\
           param wte: [vocab, embed] init normal(0.02)\n\
           param wpe: [pos, embed] init normal(1.0)\n\
           positions = embed(wpe, iota(seq, start = 2))\n\
           loss = cross_entropy((embed(wte, tokens) + positions) @ wte, targets)\n\
         }\n",
    )
    .expect("write");
    let m = common::check_ok(spec.to_str().unwrap(), &["train.batch=1"]);
    let weights: Vec<Tensor<f32>> = m
        .params
        .iter()
        .enumerate()
        .map(|(k, p)| {
            let n = p.ty.numel() as usize;
            Tensor { dims: p.ty.dims.clone(), data: (0..n).map(|i| (k * 1000 + i) as f32).collect() }
        })
        .collect();
    let inputs: Vec<Tensor<f32>> =
        m.inputs.iter().map(|i| Tensor { dims: i.ty.dims.clone(), data: vec![0.0; i.ty.numel() as usize] }).collect();
    let interp = Interpreter { graph: &m.graph, params: &m.params, dropout: None, comm: None };
    let values = interp.run(&inputs, &weights).expect("runs");
    let got = &values[m.graph.output("positions").expect("an output").index()].data;
    let wpe = &weights[1].data;
    assert_eq!(got[..], wpe[2 * 4..10 * 4], "rows 2..10 of the position table");
    // A start past what f32 holds exactly is refused.
    std::fs::write(&spec, std::fs::read_to_string(&spec).unwrap().replace("start = 2", "start = 16777210")).unwrap();
    let (sources, r) = check(&spec, &[]);
    let text = tessera::compiler::diag::render(&sources, &r.expect_err("refused").0);
    assert!(text.contains("positions beyond 2^24"), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}
