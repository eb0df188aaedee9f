//! Autodiff against central finite differences, in f64, on random values.
//!
//! Each case is a small spec whose `loss` exercises some ops; the backward
//! graph (`compiler::autodiff`) runs in the reference interpreter and every
//! parameter's gradient is compared, element by element on a sample, with
//! (L(θ + h) − L(θ − h)) / 2h. The tiny GPT spec is checked the same way.
//! Each case's gradients, so checked, are then the oracle for the same step
//! as a lowered program on the CPU backend in f32 (`lowered_grads`).

use tessera::compiler::autodiff::differentiate;
use tessera::compiler::{Model, Options, SourceMap, check_text};
use tessera::runtime::exec::{Interpreter, kernels::uniform};
use tessera::runtime::init::init_params;
use tessera::runtime::tensor::Tensor;

fn model(src: &str) -> Model {
    let mut sources = SourceMap::new();
    check_text(&mut sources, "case.spec", src, std::path::Path::new("specs"), &Options::default())
        .unwrap_or_else(|d| panic!("{}", tessera::compiler::diag::render(&sources, &d.0)))
}

/// Random inputs: integer ids below `ids_below`, masks mostly true (never an empty row), floats N(0,1)-ish.
fn inputs(m: &Model, seed: u64, ids_below: u64) -> Vec<Tensor<f64>> {
    use tessera::compiler::syntax::ast::DType;
    m.inputs
        .iter()
        .enumerate()
        .map(|(k, inp)| {
            Tensor::from_fn(&inp.ty.dims, |i| {
                let u = uniform(seed, 1000 + k as u64, i as u64);
                match inp.ty.dtype {
                    DType::I32 | DType::I64 => (u * ids_below as f64).floor(),
                    DType::Bool => {
                        let last = inp.ty.dims.last().map(|d| d.size as usize).unwrap_or(1);
                        if i % last == 0 || u < 0.8 { 1.0 } else { 0.0 }
                    }
                    _ => 2.0 * u - 1.0,
                }
            })
        })
        .collect()
}

/// The same gradients as a lowered program computes them (f32, the CPU
/// backend: fused kernels, contractions on the regions, experts over filled
/// slots): one training step at learning rate 0 from `params` on `xs`, and
/// each parameter's gradient buffer read back. The case gets a `train`
/// section to lower: plain SGD, no clipping, one microbatch.
fn lowered_grads(src: &str, params: &[Tensor<f64>], xs: &[Tensor<f64>]) -> Vec<Vec<f32>> {
    use tessera::runtime::train::optim::OptimizerState;
    use tessera::runtime::train::ranks::{Ranks, Start, StepArgs};
    let m = model(&format!("{src}\ntrain {{\n  optimizer = sgd(lr = 0.0)\n  batch = 1 sequences\n}}\n"));
    let c = tessera::compiler::driver::compile(&m).unwrap_or_else(|e| panic!("lowering: {e}"));
    let f32s = |t: &[Tensor<f64>]| -> Vec<Tensor<f32>> {
        t.iter().map(|x| Tensor { dims: x.dims.clone(), data: x.data.iter().map(|v| *v as f32).collect() }).collect()
    };
    let opt = OptimizerState::new(&m.params, &m.train.as_ref().expect("a train section").optimizer);
    let ranks = Ranks::new(&c, Start::State(&f32s(params), &opt), &opt.optimizer, Default::default(), None)
        .unwrap_or_else(|e| panic!("{e}"));
    let feed = f32s(xs);
    ranks.step(StepArgs::new(0, 5, 0.0), &|_| feed.clone(), None).unwrap_or_else(|e| panic!("{e}"));
    (0..m.params.len())
        .map(|k| ranks.read(0, tessera::compiler::lower::Bound::Grad(k)).expect("reads").expect("a gradient buffer"))
        .collect()
}

/// Check every parameter's gradient at up to `samples` elements each, and
/// the lowered program's f32 gradients against these f64 ones.
fn check_grads(src: &str, ids_below: u64, samples: usize) {
    let m = model(src);
    let loss = m.graph.output("loss").expect("a loss");
    let bw = differentiate(&m.graph, loss).expect("differentiable");
    tessera::compiler::ir::verify(&bw.graph).unwrap_or_else(|e| panic!("backward graph: {e}\n{}", bw.graph.to_text()));
    let xs = inputs(&m, 7, ids_below);
    // Non-trivial parameters: scaled so activations are not tiny.
    let mut params: Vec<Tensor<f64>> = init_params(&m.params, 11);
    for (k, p) in params.iter_mut().enumerate() {
        for (i, v) in p.data.iter_mut().enumerate() {
            *v += 0.3 * (2.0 * uniform(3, k as u64, i as u64) - 1.0);
        }
    }
    let run = |g: &tessera::compiler::ir::Graph, ps: &[Tensor<f64>]| {
        Interpreter { graph: g, params: &m.params, dropout: Some(5), comm: None }
            .run(&xs, ps)
            .unwrap_or_else(|e| panic!("{e}"))
    };
    let vals = run(&bw.graph, &params);
    let loss_of = |ps: &[Tensor<f64>]| run(&m.graph, ps)[loss.index()].data[0];
    let grads = tessera::runtime::exec::param_grads(&m.params, &bw.param_grads, &vals);
    let h = 1e-6;
    let mut checked = 0;
    for (k, p) in params.iter().enumerate() {
        let n = p.numel();
        let picks: Vec<usize> = if n <= samples {
            (0..n).collect()
        } else {
            (0..samples).map(|j| (uniform(9, k as u64, j as u64) * n as f64) as usize).collect()
        };
        for i in picks {
            let mut plus = params.clone();
            plus[k].data[i] += h;
            let mut minus = params.clone();
            minus[k].data[i] -= h;
            let fd = (loss_of(&plus) - loss_of(&minus)) / (2.0 * h);
            let an = grads[k].data[i];
            let err = (fd - an).abs() / fd.abs().max(an.abs()).max(1e-3);
            assert!(
                err < 1e-5,
                "{}[{i}]: autodiff {an:.10e}, finite differences {fd:.10e} (relative error {err:.2e})",
                m.params[k].path
            );
            checked += 1;
        }
    }
    assert!(checked > 0);
    // Through the lowered path. (Not for dropout, whose masks the step
    // draws from its own seed, nor for the spec files with their own
    // training settings: the tiny GPT and MoE go through it in
    // tests/fixtures.rs and tests/lowered_run.rs.)
    if !src.contains("dropout") && !src.contains("train {") {
        for (k, got) in lowered_grads(src, &params, &xs).iter().enumerate() {
            let want = &grads[k].data;
            let top = want.iter().fold(0f64, |a, b| a.max(b.abs())).max(1e-6);
            let worst = got.iter().zip(want).map(|(a, b)| (*a as f64 - b).abs() / top).fold(0f64, f64::max);
            assert!(
                worst < 1e-5,
                "{}: lowered f32 gradient off by {worst:.2e} of its largest element",
                m.params[k].path
            );
        }
    }
}

#[test]
fn elementwise_matmul_and_broadcasting() {
    check_grads(
        "model m {
           dims { a = 3, b = 4, c = 5 }
           input x: f32[a, b]
           param w: [b, c]
           param bias: [c]
           param s: [a]
           y = x @ w + bias
           z = gelu(y) * tanh(y) + sigmoid(y) - silu(y) / (2.0 + square(y)) + gelu_tanh(y) ** 3
           u = exp(z * 0.1) + log(1.5 + sin_free(z))
           loss = sum(u * s, a, c)
         }
         block sin_free(x: f32[a, c]) -> f32[a, c] { return sqrt(1.0 + x * x) + abs(x) * 0.0 + rsqrt(2.0 + x * x) }",
        4,
        30,
    );
}

#[test]
fn softmax_and_log_softmax() {
    check_grads(
        "model m {
           dims { a = 3, c = 6 }
           input x: f32[a, c]
           param w: [c, c2 = 6]
           param t: [a, c2]
           y = x @ w
           loss = sum(softmax(y, c2) * t, a, c2) + sum(log_softmax(y, c2) * t, a, c2) * 0.5
         }",
        4,
        40,
    );
}

#[test]
fn amax_over_one_and_several_dims() {
    check_grads(
        "model m {
           dims { a = 3, b = 4, c = 5 }
           input x: f32[a, b, c]
           param w: [c, c2 = 6]
           param t: [a, b]
           y = x @ w
           loss = sum(amax(y, c2) * t, a, b) + sum(amax(y, a, c2), b)
         }",
        4,
        40,
    );
}

#[test]
fn amax_splits_the_gradient_between_ties() {
    use tessera::compiler::model::Dim;
    let (a, c) = (Dim::new("a", 2), Dim::new("c", 3));
    let x = Tensor::<f64> { dims: vec![a.clone(), c.clone()], data: vec![1.0, 5.0, 5.0, 2.0, 0.0, -1.0] };
    let max = Tensor::<f64> { dims: vec![a.clone()], data: vec![5.0, 2.0] };
    let g = Tensor::<f64> { dims: vec![a], data: vec![1.0, 3.0] };
    let dx = tessera::runtime::exec::kernels::amax_grad(&x, &max, &g, &["c".to_string()]);
    assert_eq!(dx.data, vec![0.0, 0.5, 0.5, 3.0, 0.0, 0.0]);
}

#[test]
fn layer_norm_and_rms_norm() {
    check_grads(
        "model m {
           dims { a = 3, e = 5 }
           input x: f32[a, e]
           param g: [e]
           param b: [e]
           param g2: [e]
           param t: [e, a]
           y = layer_norm(x * 3.0, e, gain = g, bias = b)
           z = rms_norm(y + x, e, gain = g2, eps = 1e-6)
           loss = sum(z * t, a, e) + sum(layer_norm(z, e) * t, e, a)
         }",
        4,
        40,
    );
}

#[test]
fn causal_grouped_query_attention() {
    check_grads(
        "model m {
           dims { seq = 5, embed = 8, heads = 4, kv_heads = 2, head_dim = 4 }
           input x: f32[batch, seq, embed]
           param wq: [embed, heads, head_dim]
           param wk: [embed, kv_heads, head_dim]
           param wv: [embed, kv_heads, head_dim]
           param t: [seq, heads, head_dim]
           y = attention(x @ wq, x @ wk, x @ wv, causal = true)
           loss = sum(y * t, batch, seq, heads, head_dim)
         }",
        4,
        25,
    );
}

#[test]
fn masked_bidirectional_attention() {
    check_grads(
        "model m {
           dims { seq = 4, embed = 6, heads = 2, head_dim = 3 }
           input x: f32[batch, seq, embed]
           input mask: bool[batch, seq]
           param wqkv: [embed, qkv = 3, heads, head_dim]
           param t: [seq, heads, head_dim]
           q, k, v = split(x @ wqkv, qkv)
           y = attention(q, k, v, mask = mask)
           loss = sum(y * t, batch, seq, heads, head_dim)
         }",
        4,
        30,
    );
}

#[test]
fn attention_and_activation_dropout() {
    // The masks are fixed by the step's seed, so finite differences see the
    // same dropped entries as the backward pass, which regenerates them.
    check_grads(
        "model m {
           dims { seq = 6, embed = 8, heads = 2, head_dim = 4 }
           input x: f32[batch, seq, embed]
           param wqkv: [embed, qkv = 3, heads, head_dim]
           param t: [seq, heads, head_dim]
           q, k, v = split(x @ wqkv, qkv)
           y = dropout(attention(q, k, v, causal = true, dropout = 0.3), 0.2)
           loss = sum(y * t, batch, seq, heads, head_dim)
         }",
        4,
        30,
    );
}

#[test]
fn t5_relative_bias_attention() {
    for causal in ["false", "true"] {
        check_grads(
            &"model m {
               dims { seq = 7, embed = 8, heads = 2, head_dim = 4, buckets = 6 }
               input x: f32[batch, seq, embed]
               param wqkv: [embed, qkv = 3, heads, head_dim]
               param rel: [buckets, heads]
               param t: [seq, heads, head_dim]
               q, k, v = split(x @ wqkv, qkv)
               y = attention(q, k, v, causal = CAUSAL, rel_bias = rel, max_distance = 5)
               loss = sum(y * t, batch, seq, heads, head_dim)
             }"
            .replace("CAUSAL", causal),
            4,
            30,
        );
    }
}

#[test]
fn transformer_xl_relative_attention() {
    // (u and v appear in the loss at weight 0 so that the spec uses them when
    // the attention does not.)
    for (causal, biases) in [("true", true), ("true", false), ("false", true)] {
        let bias_args = if biases { ", pos_bias_u = u, pos_bias_v = v" } else { "" };
        check_grads(
            &format!(
                "model m {{
                   dims {{ seq = 6, embed = 8, heads = 2, head_dim = 4 }}
                   input x: f32[batch, seq, embed]
                   param wq: [embed, heads, head_dim]
                   param wk: [embed, heads, head_dim]
                   param wv: [embed, heads, head_dim]
                   param w_r: [embed, heads, head_dim]
                   param u: [heads, head_dim]
                   param v: [heads, head_dim]
                   param t: [seq, heads, head_dim]
                   r = sinusoid(seq, embed) @ w_r
                   y = attention(x @ wq, x @ wk, x @ wv, causal = {causal}, rel_pos = r{bias_args})
                   loss = sum(y * t, batch, seq, heads, head_dim) + sum(u * v, heads, head_dim) * 0.0
                 }}"
            ),
            4,
            30,
        );
    }
}

#[test]
fn t5_buckets_match_the_reference_formula() {
    // Values from T5's `_relative_position_bucket` (32 buckets, max_distance 128),
    // computed by the formula in Python.
    use tessera::runtime::exec::attention::t5_bucket;
    let rel = [-200, -100, -20, -9, -8, -7, -1, 0, 1, 7, 8, 9, 20, 100, 200];
    let bi: Vec<usize> = rel.iter().map(|&r| t5_bucket(r, true, 32, 128.0)).collect();
    assert_eq!(bi, [15, 15, 10, 8, 8, 7, 1, 0, 17, 23, 24, 24, 26, 31, 31]);
    let rel = [-200, -100, -20, -16, -15, -1, 0, 1, 5];
    let uni: Vec<usize> = rel.iter().map(|&r| t5_bucket(r, false, 32, 128.0)).collect();
    assert_eq!(uni, [31, 30, 17, 16, 15, 1, 0, 0, 0]);
}

#[test]
fn embedding_with_repeated_ids_and_cross_entropy() {
    // 16 positions drawn from 3 ids: every id repeats.
    check_grads(
        "model m {
           dims { vocab = 3, seq = 8, embed = 4 }
           input tokens: i32[batch, seq]
           input targets: i32[batch, seq]
           param wte: [vocab, embed]
           param head: [embed, vocab]
           logits = embed(wte, tokens) @ head
           loss = cross_entropy(logits, targets) + cross_entropy(logits, targets, label_smoothing = 0.1) * 0.5
         }",
        3,
        12,
    );
}

#[test]
fn cross_entropy_with_an_ignored_class_and_smoothing() {
    // Targets drawn from 4 ids, one of them ignored: some rows do not count.
    check_grads(
        "model m {
           dims { vocab = 4, seq = 8, embed = 4 }
           input tokens: i32[batch, seq]
           input targets: i32[batch, seq]
           param wte: [vocab, embed]
           param head: [embed, vocab]
           logits = embed(wte, tokens) @ head
           loss = cross_entropy(logits, targets, ignore = 2) + cross_entropy(logits, targets, label_smoothing = 0.2, ignore = 0)
         }",
        4,
        12,
    );
}

#[test]
fn structural_ops() {
    check_grads(
        "model m {
           dims { a = 2, e = 6, heads = 2, hd = 3, one = 1, seq = 3 }
           input x: f32[a, seq, e]
           param cls: [one, e]
           param w: [heads, hd, e2 = 4]
           param t: [a, total = 4, e2]
           y = split(x, e -> [heads, hd])
           z = merge(permute(y, [a, seq, heads, hd]), [heads, hd] -> e)
           c = concat(cls, z, over = [one, seq], into = total)
           r = rename(c, total -> pos)
           s = split(r, e -> [heads, hd]) @ w
           loss = sum(rename(s, pos -> total) * t, a, total, e2) + mean(index(c, total, 1), e, a)
         }",
        4,
        30,
    );
}

/// The tensor builders: a [query, key] mask built from `iota` and
/// comparisons (`>=`, `==`, `&&`, `||`, `!`) into attention, `where` between
/// two projections, the feature at each sequence's largest id picked by
/// `argmax` and `gather` (CLIP's end token), and slices by range.
#[test]
fn masks_where_argmax_and_gather() {
    check_grads(
        "model m {
           dims { seq = 5, embed = 4, heads = 2, head_dim = 2, e2 = 3 }
           input x: f32[batch, seq, embed]
           input tokens: i32[batch, seq]
           param wq: [embed, heads, head_dim]
           param wk: [embed, heads, head_dim]
           param wv: [embed, heads, head_dim]
           param t: [seq, heads, head_dim]
           param w1: [embed, e2]
           param w2: [embed, e2]
           param u: [e2]
           q_pos = iota(seq)
           k_pos = rename(iota(seq), seq -> kv_seq)
           allowed = q_pos >= k_pos && !(k_pos == 1) || q_pos == k_pos
           k = rename(x @ wk, seq -> kv_seq)
           v = rename(x @ wv, seq -> kv_seq)
           y = attention(x @ wq, k, v, mask = allowed)
           h = where(sum(x, embed) > 0.2, x @ w1, x @ w2)
           last = gather(h, argmax(tokens, seq), seq)
           mid = slice(h, seq -> middle, start = 1, size = 3)
           loss = sum(y * t, batch, seq, heads, head_dim) + sum(last * u, batch, e2)
             + sum(where(tokens > 1, 0.0, h * h), batch, seq, e2) + sum(mid * mid * u, batch, middle, e2)
             + sum(slice(h, seq -> head, size = 2) * u, batch, head, e2)
         }",
        4,
        30,
    );
}

/// What the builders compute, against values worked out here: a causal
/// mask built from `iota` gives `causal = true`'s attention, and a band
/// (`k_pos + 2`) gives `window = 2`'s; `argmax` takes
/// the first of ties; `gather` picks those positions; `where` chooses by the
/// mask; `iota(d, start)` counts from start.
#[test]
fn builders_compute_what_they_say() {
    let m = model(
        "model m {
           dims { seq = 5, embed = 4, heads = 2, head_dim = 2 }
           input x: f32[batch, seq, embed]
           input tokens: i32[batch, seq]
           param wq: [embed, heads, head_dim]
           param wk: [embed, heads, head_dim]
           param wv: [embed, heads, head_dim]
           k = rename(x @ wk, seq -> kv_seq)
           v = rename(x @ wv, seq -> kv_seq)
           built = attention(x @ wq, k, v, mask = iota(seq) >= rename(iota(seq), seq -> kv_seq))
           causal = attention(x @ wq, k, v, causal = true)
           q_pos = iota(seq)
           k_pos = rename(iota(seq), seq -> kv_seq)
           banded = attention(x @ wq, k, v, mask = q_pos >= k_pos && q_pos < k_pos + 2)
           windowed = attention(x @ wq, k, v, causal = true, window = 2)
           first = argmax(tokens, seq)
           picked = gather(x, first, seq)
           chosen = where(tokens > 1, sum(x, embed), -1.0)
           counted = iota(seq, start = 3)
           cut = slice(x, seq -> part, start = 2, size = 2)
           loss = sum(built, batch, seq, heads, head_dim)
         }",
    );
    let xs = inputs(&m, 3, 3);
    let params = init_params(&m.params, 2);
    let vals = Interpreter { graph: &m.graph, params: &m.params, dropout: None, comm: None }
        .run(&xs, &params)
        .unwrap_or_else(|e| panic!("{e}"));
    let out = |n: &str| &vals[m.graph.output(n).unwrap_or_else(|| panic!("no `{n}`")).index()].data;
    let (built, causal) = (out("built"), out("causal"));
    let gap = built.iter().zip(causal).map(|(a, b)| (a - b).abs()).fold(0f64, f64::max);
    assert!(gap < 1e-12, "built causal mask against causal = true: {gap:e}");
    let (banded, windowed) = (out("banded"), out("windowed"));
    let gap = banded.iter().zip(windowed).map(|(a, b)| (a - b).abs()).fold(0f64, f64::max);
    assert!(gap < 1e-12, "built band against window = 2: {gap:e}");
    assert!(banded.iter().zip(built).any(|(a, b)| (a - b).abs() > 1e-6), "the band differs from plain causal");
    let (x, tokens) = (&xs[0].data, &xs[1].data);
    let (batch, seq, embed) = (xs[1].dims[0].size as usize, 5, 4);
    let mut ties = 0;
    for b in 0..batch {
        let row = &tokens[b * seq..(b + 1) * seq];
        let top = row.iter().cloned().fold(f64::MIN, f64::max);
        let want = row.iter().position(|t| *t == top).unwrap();
        ties += usize::from(row.iter().filter(|t| **t == top).count() > 1);
        assert_eq!(out("first")[b], want as f64, "argmax of {row:?}");
        for e in 0..embed {
            assert_eq!(out("picked")[b * embed + e], x[(b * seq + want) * embed + e]);
        }
        for s in 0..seq {
            let sum: f64 = (0..embed).map(|e| x[(b * seq + s) * embed + e]).sum();
            let want = if row[s] > 1.0 { sum } else { -1.0 };
            assert!((out("chosen")[b * seq + s] - want).abs() < 1e-12);
        }
    }
    assert!(ties > 0, "the inputs have ties, so the first-of-ties rule is tested");
    assert_eq!(out("counted"), &[3.0, 4.0, 5.0, 6.0, 7.0]);
    for b in 0..batch {
        for p in 0..2 {
            for e in 0..embed {
                assert_eq!(out("cut")[(b * 2 + p) * embed + e], x[(b * seq + 2 + p) * embed + e], "slice at {b} {p}");
            }
        }
    }
}

/// Convolutions over named spatial dims: strided and padded, dilated,
/// grouped (`per = [g]`), depthwise, 1D and 3D, and max and average pooling.
#[test]
fn convolutions_and_pooling() {
    check_grads(
        "model m {
           dims { h = 7, wd = 6, c = 4, o = 3, g = 2, cg = 2, og = 2, len = 9 }
           input x: f32[batch, c, h, wd]
           input xg: f32[batch, g, cg, h, wd]
           input s: f32[batch, c, len]
           input v: f32[batch, c, dd = 3, h, wd]
           param w1: [c, kh = 3, kw = 3, o]
           param w3: [c, kd = 2, kh, kw, o]
           param w2: [c, kh2 = 2, kw2 = 3, o]
           param wg: [g, cg, kh, kw, og]
           param wd1: [c, kh, kw]
           param w1d: [c, k1 = 3, o]
           param t: [o]
           a = conv(x, w1, [h, wd] -> [oh, ow], window = [kh, kw], stride = 2, padding = 1)
           b = conv(x, w2, [h, wd] -> [dh, dw], window = [kh2, kw2], dilation = 2)
           gr = conv(xg, wg, [h, wd] -> [gh, gw], window = [kh, kw], padding = 1, per = [g])
           dw = conv(x, wd1, [h, wd] -> [eh, ew], window = [kh, kw], per = [c])
           one = conv(s, w1d, [len] -> [ol], window = [k1], stride = 2)
           mp = max_pool(a, [oh, ow] -> [mh, mw], size = 2, stride = 1)
           ap = avg_pool(tanh(b), [dh, dw] -> [ah, aw], size = 3, stride = 2, padding = 1)
           loss = sum(mp * t, batch, mh, mw, o) + sum(ap * t, batch, ah, aw, o) + sum(tanh(gr), batch, g, gh, gw, og)
             + sum(dw * dw, batch, c, eh, ew) + sum(one * t, batch, ol, o)
             + sum(conv(v, w3, [dd, h, wd] -> [od, vh, vw], window = [kd, kh, kw], stride = 2, padding = 1) * t,
                   batch, od, vh, vw, o)
         }",
        4,
        40,
    );
}

/// std/conv's GroupNorm and squeeze-and-excitation blocks after a convolution.
#[test]
fn group_norm_and_squeeze_excitation() {
    check_grads(
        "use std/conv
         model m {
           dims { h = 5, wd = 4, c = 2, o = 6 }
           input x: f32[batch, c, h, wd]
           param w: [c, kh = 3, kw = 3, o]
           param t: [o]
           y = conv(x, w, [h, wd] -> [oh, ow], window = [kh, kw], padding = 1)
           y = squeeze_excite(group_norm(y, groups = 3), squeeze = 2)
           loss = sum(tanh(y) * t, batch, oh, ow, o)
         }",
        4,
        30,
    );
}

/// std/conv's BatchNorm (statistics over the batch, so every example's
/// gradient reaches every other's) inside a RegNetY stage: a strided block
/// with its projection, then a block with its identity residual.
#[test]
fn batch_norm_in_a_regnet_y_stage() {
    check_grads(
        "use std/conv
         model m {
           dims { h = 6, wd = 6, c_in = 2, groups = 2, group_width = 2, c = groups * group_width, oh = 3, ow = 3 }
           input x: f32[batch, h, wd, c_in]
           param t: [c]
           y = regnet_y(regnet_y_down(x, se = 2), se = 2)
           loss = sum(tanh(y) * t, batch, oh, ow, c)
         }",
        3,
        30,
    );
}

#[test]
fn tiny_gpt_end_to_end() {
    let src = std::fs::read_to_string("specs/tiny/gpt.spec").expect("spec");
    // Smaller than the demo so finite differences stay quick.
    let src = src
        .replace("seq = 64, embed = 64", "seq = 8, embed = 16")
        .replace("batch = 8 sequences", "batch = 2 sequences");
    check_grads(&src, 256, 6);
}

const MOE: &str = "model m {
   dims { seq = 6, embed = 4, mlp = 5, expert = 4 }
   input x: f32[batch, seq, embed]
   param router: [embed, expert]
   param w_in: [expert, embed, mlp]
   param w_out: [expert, mlp, embed]
   param t: [seq, embed]
   logits = x @ router
   route = top_k(softmax(logits, expert), k = 2, capacity = CAPACITY)
   y = combine(route, gelu(dispatch(route, x) @ w_in) @ w_out)
   aux_loss += load_balance(route) * 0.1
   aux_loss += z_loss(logits) * 0.01
   loss = sum(y * t, batch, seq, embed) + aux_loss
 }";

#[test]
fn top_k_routing_with_capacity_dispatch_and_combine() {
    // 12 assignments into 4 experts of 2 slots: some tokens are dropped.
    check_grads(&MOE.replace("CAPACITY", "0.5"), 4, 20);
}

#[test]
fn dropless_routing() {
    check_grads(&MOE.replace("CAPACITY", "dropless"), 4, 20);
}

#[test]
fn capacity_drops_tokens_in_priority_order() {
    use tessera::compiler::model::Dim;
    use tessera::runtime::exec::moe::{slots, top_k};
    // 4 tokens, 2 experts, top-1, 1 slot each: the first token to choose an expert gets it.
    let dims = [Dim::new("tok", 4), Dim::new("expert", 2)];
    let probs = Tensor::<f64> { dims: dims.to_vec(), data: vec![0.9, 0.1, 0.8, 0.2, 0.3, 0.7, 0.4, 0.6] };
    let gates = top_k(&probs, 1, 1);
    assert_eq!(gates.data, vec![0.9, 0.0, 0.0, 0.0, 0.0, 0.7, 0.0, 0.0]);
    let s = slots(gates.view(), 1);
    assert_eq!(s, vec![vec![(0, 0)], vec![], vec![(1, 0)], vec![]]);
    // Top-2 with room for everyone keeps both choices, the better one first.
    let gates = top_k(&probs, 2, 4);
    assert_eq!(gates.data, probs.data);
}

#[test]
fn tiny_moe_end_to_end() {
    let src = std::fs::read_to_string("specs/tiny/moe.spec").expect("spec");
    let src = src
        .replace("seq = 64, embed = 64", "seq = 8, embed = 16")
        .replace("batch = 8 sequences", "batch = 4 sequences")
        .replace(
            "  mesh { data = 2 }\n  layout { batch -> data, expert -> data }\n  experts { placement = blocked }\n",
            "",
        );
    check_grads(&src, 256, 6);
}

#[test]
fn rotary_embeddings() {
    check_grads(
        "model m {
           dims { seq = 5, embed = 8, heads = 2, kv_heads = 2, head_dim = 4 }
           input x: f32[batch, seq, embed]
           param wq: [embed, heads, head_dim]
           param wk: [embed, kv_heads, head_dim]
           param wv: [embed, kv_heads, head_dim]
           param t: [seq, heads, head_dim]
           q = rope(x @ wq, theta = 100.0)
           k = rope(x @ wk, theta = 100.0, fraction = 0.5)
           loss = sum(attention(q, k, x @ wv, causal = true) * t, batch, seq, heads, head_dim) + sum(q * t, batch, seq, heads, head_dim)
         }",
        4,
        25,
    );
}

#[test]
fn dropout_is_the_identity_outside_training() {
    let m = model(
        "model m {
           dims { seq = 6, embed = 8, heads = 2, head_dim = 4 }
           input x: f32[batch, seq, embed]
           param wqkv: [embed, qkv = 3, heads, head_dim]
           q, k, v = split(dropout(x, 0.5) @ wqkv, qkv)
           y = attention(q, k, v, causal = true, dropout = 0.5)
           loss = sum(y, batch, seq, heads, head_dim)
         }",
    );
    let no_drop = model(
        "model m {
           dims { seq = 6, embed = 8, heads = 2, head_dim = 4 }
           input x: f32[batch, seq, embed]
           param wqkv: [embed, qkv = 3, heads, head_dim]
           q, k, v = split(x @ wqkv, qkv)
           y = attention(q, k, v, causal = true)
           loss = sum(y, batch, seq, heads, head_dim)
         }",
    );
    let xs = inputs(&m, 7, 4);
    let ps: Vec<Tensor<f64>> = init_params(&m.params, 11);
    let loss = |model: &Model, dropout| {
        let id = model.graph.output("loss").expect("loss");
        Interpreter { graph: &model.graph, params: &model.params, dropout, comm: None }.run(&xs, &ps).expect("runs")
            [id.index()]
        .data[0]
    };
    assert_eq!(loss(&m, None), loss(&no_drop, None), "evaluation must not drop");
    assert_ne!(loss(&m, Some(1)), loss(&no_drop, None), "training drops");
    assert_ne!(loss(&m, Some(1)), loss(&m, Some(2)), "the seed picks the masks");
}

#[test]
fn experts_over_filled_slots_match_every_slot() {
    // The tiny MoE's training step in f32, with the expert GEMMs and
    // elementwise ops over the filled slots only (the default) and over every
    // slot: every value of the forward and backward graph agrees.
    use tessera::runtime::exec::set_skip_empty_slots;
    let src = std::fs::read_to_string("specs/tiny/moe.spec").expect("spec");
    let m = model(&src);
    let loss = m.graph.output("loss").expect("loss");
    let bw = differentiate(&m.graph, loss).expect("differentiable");
    let xs: Vec<Tensor<f32>> = inputs(&m, 7, 256)
        .into_iter()
        .map(|t| Tensor { dims: t.dims, data: t.data.iter().map(|v| *v as f32).collect() })
        .collect();
    // Non-zero biases too (they start at zero), so every term shows.
    let mut ps: Vec<Tensor<f32>> = init_params(&m.params, 11);
    for (k, p) in ps.iter_mut().enumerate() {
        for (i, v) in p.data.iter_mut().enumerate() {
            *v += 0.05 * (2.0 * uniform(3, k as u64, i as u64) as f32 - 1.0);
        }
    }
    let run = |skip: bool| {
        set_skip_empty_slots(skip);
        let v = Interpreter { graph: &bw.graph, params: &m.params, dropout: Some(3), comm: None }
            .run(&xs, &ps)
            .expect("runs");
        set_skip_empty_slots(true);
        v
    };
    let (fast, full) = (run(true), run(false));
    // As the trainer runs it: only the loss and gradients asked for, values
    // freed after their last use, ops writing into operands that die there.
    let needed: Vec<_> = std::iter::once(loss).chain(bw.param_grads.iter().map(|g| g.grad)).collect();
    let lean = Interpreter { graph: &bw.graph, params: &m.params, dropout: Some(3), comm: None }
        .run_for(&xs, &ps, Some(&needed))
        .expect("runs");
    for id in &needed {
        let (a, b) = (&lean[id.index()], &full[id.index()]);
        let diff: f64 = a.data.iter().zip(&b.data).map(|(x, y)| (*x as f64 - *y as f64).powi(2)).sum::<f64>().sqrt();
        let norm: f64 = b.data.iter().map(|y| (*y as f64).powi(2)).sum::<f64>().sqrt();
        assert_eq!(a.data.len(), b.data.len(), "%{} came back", id.index());
        assert!(diff <= 1e-5 * norm.max(1e-30), "lean run, %{}: relative error {:.2e}", id.index(), diff / norm);
    }
    // The routing leaves slots empty, so the fast path has work to skip.
    let dispatch = bw.graph.nodes.iter().position(|n| n.op.name() == "dispatch").expect("a dispatch");
    let d = &full[dispatch];
    let width = d.dims[2..].iter().map(|d| d.size as usize).product::<usize>();
    let empty = d.data.chunks(width).filter(|row| row.iter().all(|v| *v == 0.0)).count();
    assert!(empty > 0, "no empty slots: the test would not exercise the filled-slot path");
    for (i, (a, b)) in fast.iter().zip(&full).enumerate() {
        assert_eq!(a.dims, b.dims);
        let diff: f64 = a.data.iter().zip(&b.data).map(|(x, y)| (*x as f64 - *y as f64).powi(2)).sum::<f64>().sqrt();
        let norm: f64 = b.data.iter().map(|y| (*y as f64).powi(2)).sum::<f64>().sqrt();
        assert!(
            diff <= 1e-5 * norm.max(1e-30),
            "value %{i} ({}): relative error {:.2e}",
            bw.graph.nodes[i].op.name(),
            diff / norm
        );
    }
}

/// The op families again on random shapes: each case's dims are drawn from
/// small ranges per seed (`TESSERA_GRAD_SEEDS` sets how many; 4 by default).
#[test]
fn op_families_on_random_shapes() {
    let seeds: u64 = std::env::var("TESSERA_GRAD_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(4);
    for seed in 0..seeds {
        let pick = |k: u64, lo: u64, hi: u64| lo + (uniform(seed, 77, k) * (hi - lo + 1) as f64) as u64;
        let (seq, heads, head_dim, group) = (pick(0, 2, 7), pick(1, 1, 3), pick(2, 1, 5), pick(3, 1, 2));
        let (embed, mlp, experts) = (pick(4, 2, 9), pick(5, 2, 6), pick(6, 2, 5));
        let kv = heads;
        let heads = heads * group;
        let case = format!("seed {seed}: seq {seq}, heads {heads}/{kv}, head_dim {head_dim}, embed {embed}");
        eprintln!("{case}");
        // Norms, softmax, GELU MLP and cross-entropy over a byte-like vocab.
        check_grads(
            &format!(
                "model m {{
                   dims {{ seq = {seq}, embed = {embed}, mlp = {mlp}, vocab = 5 }}
                   input tokens: i32[batch, seq]
                   input targets: i32[batch, seq]
                   param wte: [vocab, embed]
                   param g: [embed]
                   param b: [embed]
                   param w1: [embed, mlp]
                   param w2: [mlp, embed]
                   h = layer_norm(embed(wte, tokens), embed, gain = g, bias = b)
                   h = h + gelu(rms_norm(h, embed, gain = g) @ w1) @ w2
                   loss = cross_entropy(softmax(h, embed) @ wte, targets, label_smoothing = 0.1)
                 }}"
            ),
            5,
            20,
        );
        // Causal grouped-query attention with a window and T5 buckets.
        check_grads(
            &format!(
                "model m {{
                   dims {{ seq = {seq}, embed = {embed}, heads = {heads}, kv_heads = {kv}, head_dim = {head_dim}, buckets = 4 }}
                   input x: f32[batch, seq, embed]
                   param wq: [embed, heads, head_dim]
                   param wk: [embed, kv_heads, head_dim]
                   param wv: [embed, kv_heads, head_dim]
                   param rel: [buckets, heads]
                   param t: [seq, heads, head_dim]
                   y = attention(x @ wq, x @ wk, x @ wv, causal = true, window = 3, rel_bias = rel, max_distance = 4)
                   loss = sum(y * t, batch, seq, heads, head_dim)
                 }}"
            ),
            4,
            20,
        );
        // Top-k routing with capacity, dispatch and combine.
        check_grads(
            &MOE.replace(
                "seq = 6, embed = 4, mlp = 5, expert = 4",
                &format!("seq = {seq}, embed = {embed}, mlp = {mlp}, expert = {experts}"),
            )
            .replace("CAPACITY", "0.75"),
            4,
            20,
        );
    }
}
