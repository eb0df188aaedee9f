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
