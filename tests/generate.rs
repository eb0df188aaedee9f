//! Generation programs (`driver::compile_generate`, `runtime::infer`): the
//! window program over a context and the decode step over the KV cache give
//! the logits of the reference forward pass (the model's forward graph
//! evaluated node by node, `exec::Interpreter`) at every position — learned
//! and sinusoidal position tables, rope, grouped-query and sliding-window
//! attention, dropless MoE routing — and a model whose logits mix positions
//! has no step program and says why.

mod common;

use std::path::Path;
use tessera::compiler::{Model, Options, SourceMap, check_path};
use tessera::runtime::exec::Interpreter;
use tessera::runtime::infer::{Generator, SampleConfig, generate};
use tessera::runtime::tensor::Tensor;

/// `spec` with `sets`, checked for one sequence at a time (as `tessera sample` checks it).
fn model(spec: &str, sets: &[&str]) -> Model {
    let mut sources = SourceMap::new();
    let opts =
        Options { overrides: sets.iter().map(|s| s.to_string()).collect(), micro_batch: Some(1), ..Default::default() };
    check_path(&mut sources, Path::new(spec), &opts)
        .unwrap_or_else(|d| panic!("{spec}:\n{}", tessera::compiler::diag::render(&sources, &d.0)))
}

fn programs(m: &Model) -> tessera::compiler::driver::Generation {
    tessera::compiler::driver::compile_one_sequence(m, Default::default()).expect("compiles")
}

/// The reference logits `[seq, vocab]` of a full context, with generation's
/// dropless routing (`lower::dropless`: every token reaches its top-k experts).
fn reference(m: &Model, params: &[Tensor<f32>], context: &[u32]) -> Vec<f32> {
    let mut inputs: Vec<Tensor<f32>> = m.inputs.iter().map(|i| Tensor::zeros(&i.ty.dims)).collect();
    let at = m.inputs.iter().position(|i| i.name == "tokens").expect("tokens");
    inputs[at].data.iter_mut().zip(context).for_each(|(x, &t)| *x = t as f32);
    let logits = m.graph.output("logits").expect("logits");
    let graph = tessera::compiler::lower::dropless(&m.graph, context.len() as u64);
    Interpreter { graph: &graph, params: &m.params, dropout: None, comm: None }
        .run(&inputs, params)
        .expect("the reference runs")[logits.index()]
    .data
    .clone()
}

/// `x` rounded to bf16 (to nearest, ties to even).
fn bf16(x: f32) -> f32 {
    let b = x.to_bits();
    f32::from_bits((b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF_0000)
}

fn rel(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum::<f64>().sqrt();
    num / b.iter().map(|y| (*y as f64).powi(2)).sum::<f64>().sqrt().max(1e-30)
}

const GPT_SMALL: &[&str] = &["dims.seq=16", "dims.embed=32"];
const LLAMA: &str = "tests/specs/llama-tiny.spec";
const WINDOW: &str = "tests/specs/window-tiny.spec";

/// A prompt of 3 tokens through the window program, then one decode step per
/// position to the end of the context: each step's logits are the reference
/// forward pass's at that position, within 1e-5 (f32; the step's GEMMs have
/// one row, so they sum in other orders).
#[test]
fn decode_steps_reproduce_the_forward_pass_at_every_position() {
    let moe: &[&str] = &["parallel.mesh.data=1"];
    for (spec, sets) in [(common::GPT, GPT_SMALL), (LLAMA, &[][..]), (WINDOW, &[][..]), (common::MOE, moe)] {
        let m = model(spec, sets);
        let params = tessera::runtime::init::init_params::<f32>(&m.params, 3);
        let mut g = Generator::new(programs(&m), &params).expect("compiles");
        assert_eq!(g.no_step(), None, "{spec} decodes with a KV cache");
        let (seq, vocab) = (g.seq, g.vocab);
        let context = common::tokens(seq, vocab, 11);
        let want = reference(&m, &params, &context);
        let row = |p: usize| &want[p * vocab..(p + 1) * vocab];
        let mut worst = 0f64;
        let got = g.prefill(&context[..3]).expect("prefill");
        worst = worst.max(rel(&got, row(2)));
        for (p, &t) in context.iter().enumerate().skip(3) {
            let got = g.step(t, p).expect("step");
            worst = worst.max(rel(&got, row(p)));
        }
        eprintln!("{spec}: worst relative error over {seq} positions {worst:.1e}");
        assert!(worst <= 1e-5, "{spec}: decode steps differ from the forward pass by {worst:.1e}");
        // The window program alone gives every row.
        for n in [1, seq / 2, seq] {
            let e = rel(&g.window(&context[..n]).expect("window"), row(n - 1));
            assert!(e <= 1e-5, "{spec}: the window over {n} tokens differs by {e:.1e}");
        }
        // A step past the context, or at a position the cache does not
        // reach, is an error, not a crash or a silent result.
        let e = g.step(0, seq).expect_err("past the context");
        assert!(e.to_string().contains("past the context"), "{e}");
        g.prefill(&context[..2]).expect("prefill");
        let e = g.step(0, 5).expect_err("a gap in the cache");
        assert!(e.to_string().contains("holds positions 0..2"), "{e}");
    }
}

/// In bf16 the programs store weights, activations and the cache in bf16:
/// the step's logits stay within bf16's rounding of the f32 reference
/// (measured 5.5e-3 and 6.1e-3; the bound is 4 bf16 steps of 2^-8, relative).
#[test]
fn bf16_decode_steps_stay_within_bf16_rounding_of_the_reference() {
    for (spec, sets) in [(common::GPT, GPT_SMALL), (LLAMA, &[][..])] {
        let m = model(spec, &common::with(sets, &["train.precision=bf16"]));
        let params = tessera::runtime::init::init_params::<f32>(&m.params, 3);
        let mut g = Generator::new(programs(&m), &params).expect("compiles");
        let context = common::tokens(g.seq, g.vocab, 5);
        // The reference in f32 from the bf16-rounded weights.
        let rounded: Vec<Tensor<f32>> = params
            .iter()
            .map(|t| Tensor { dims: t.dims.clone(), data: t.data.iter().map(|&x| bf16(x)).collect() })
            .collect();
        let want = reference(&m, &rounded, &context);
        let vocab = g.vocab;
        g.prefill(&context[..1]).expect("prefill");
        let mut worst = 0f64;
        for (p, &t) in context.iter().enumerate().skip(1) {
            let got = g.step(t, p).expect("step");
            worst = worst.max(rel(&got, &want[p * vocab..(p + 1) * vocab]));
        }
        eprintln!("{spec} bf16: worst relative error {worst:.1e}");
        assert!(worst <= 4.0 * 2f64.powi(-8), "{spec}: bf16 decode steps differ by {worst:.1e}");
    }
}

/// A bidirectional model (attention that is not causal) has no step
/// program: the reason names the op, and generation recomputes the window,
/// as `generate_window` does.
#[test]
fn a_model_whose_logits_mix_positions_recomputes_the_window() {
    let text =
        std::fs::read_to_string(WINDOW).expect("the spec").replace("causal = true, window = 4", "causal = false");
    let path = std::env::temp_dir().join(format!("tessera-bidirectional-{}.spec", std::process::id()));
    std::fs::write(&path, text).expect("write the spec");
    let m = model(path.to_str().expect("a path"), &[]);
    let params = tessera::runtime::init::init_params::<f32>(&m.params, 2);
    let g = Generator::new(programs(&m), &params).expect("compiles");
    let why = g.no_step().expect("no step program");
    assert!(why.contains("`attention`") && why.contains("not causal"), "{why}");
    let cfg =
        SampleConfig { tokens: 6, temperature: 0.0, top_k: None, top_p: None, seed: 0, kv_cache: true, stop: None };
    let prompt = [10u32, 20, 30];
    let a = generate(&programs(&m), &params, &prompt, &cfg).expect("generates");
    let mut g = Generator::new(programs(&m), &params).expect("loads");
    assert_eq!(a, g.generate_window(&prompt, &cfg).expect("recomputes"));
    assert!(g.generate_cached(&prompt, &cfg).is_err(), "no cache to decode with");
    let _ = std::fs::remove_file(&path);
}

/// Continuous batching over the paged cache: sequences of different
/// lengths, their blocks scattered through one pool, join a batch at
/// different steps (one after another is prefilled, in chunks), and each
/// decode step runs them all at their own positions, idle rows padded. Every
/// sequence's logits at every position are the reference forward pass's
/// over that sequence alone, within 1e-5 (learned positions, rope with
/// grouped-query attention, a sliding window, dropless MoE).
#[test]
fn batched_decode_steps_over_scattered_blocks_reproduce_each_sequence() {
    use tessera::compiler::lower::Paging;
    use tessera::runtime::backend::cpu::Engine;
    use tessera::runtime::infer::{Decoder, Row};
    let moe: &[&str] = &["parallel.mesh.data=1"];
    for (spec, sets) in [(common::GPT, GPT_SMALL), (LLAMA, &[][..]), (WINDOW, &[][..]), (common::MOE, moe)] {
        let one = model(spec, sets);
        let mut sources = SourceMap::new();
        let opts = Options {
            overrides: sets.iter().map(|s| s.to_string()).collect(),
            micro_batch: Some(4),
            ..Default::default()
        };
        let four = check_path(&mut sources, Path::new(spec), &opts).expect("checks for a batch of 4");
        let seq = one.inputs[0].ty.dims.last().expect("seq").size;
        let paging = Paging::new(4, seq, 3);
        let g = tessera::compiler::driver::compile_generate(&[one.clone(), four], paging, Default::default())
            .expect("compiles");
        let params = tessera::runtime::init::init_params::<f32>(&one.params, 3);
        let mut d = Decoder::new(g, &params, Engine::default()).expect("loads");
        assert_eq!(d.max_batch(), 4);
        let (seq, vocab) = (d.seq, d.vocab);
        // Blocks handed out from the end of the pool, so that no sequence's are in order.
        let mut free: Vec<u32> = (0..paging.blocks as u32).collect();
        let contexts: Vec<Vec<u32>> = (0..3).map(|i| common::tokens(seq, vocab, 20 + i)).collect();
        let want: Vec<Vec<f32>> = contexts.iter().map(|c| reference(&one, &params, c)).collect();
        let prompts = [3usize, seq / 2 + 1, 1];
        let joins = [0usize, 2, 5];
        let mut tables: Vec<Vec<u32>> = vec![Vec::new(); 3];
        let mut pos = [0usize; 3];
        let mut worst = 0f64;
        for t in 0..3 * seq {
            for s in 0..3 {
                if joins[s] == t {
                    let need = prompts[s].div_ceil(paging.block as usize);
                    tables[s].extend((0..need).map(|_| free.pop().expect("a free block")));
                    let got = d.prefill(&contexts[s][..prompts[s]], 0, &tables[s]).expect("prefill");
                    let p = prompts[s] - 1;
                    worst = worst.max(rel(&got, &want[s][p * vocab..(p + 1) * vocab]));
                    pos[s] = prompts[s];
                }
            }
            let live: Vec<usize> = (0..3).filter(|&s| joins[s] <= t && pos[s] < seq).collect();
            if live.is_empty() {
                break;
            }
            for &s in &live {
                if pos[s] % paging.block as usize == 0 {
                    tables[s].push(free.pop().expect("a free block"));
                }
            }
            let rows: Vec<Row> =
                live.iter().map(|&s| Row { token: contexts[s][pos[s]], pos: pos[s], table: &tables[s] }).collect();
            let got = d.step(&rows).expect("a step");
            for (&s, l) in live.iter().zip(&got) {
                let p = pos[s];
                worst = worst.max(rel(l, &want[s][p * vocab..(p + 1) * vocab]));
                pos[s] += 1;
            }
        }
        assert_eq!(pos, [seq; 3], "{spec}: every sequence reached the end of its window");
        eprintln!("{spec}: batched, worst relative error {worst:.1e}");
        assert!(worst <= 1e-5, "{spec}: batched decode steps differ from the forward pass by {worst:.1e}");
        // A position past a sequence's blocks is an error, not a write elsewhere.
        let e = d.step(&[Row { token: 0, pos: 4, table: &tables[0][..1] }]).expect_err("past its blocks");
        assert!(e.to_string().contains("past the 4 positions"), "{e}");
    }
}
