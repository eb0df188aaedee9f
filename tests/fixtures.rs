//! Numerics against an oracle: JAX (float64) fixtures written by
//! tests/fixtures/make_fixtures.py for the tiny GPT, MoE, BERT and ViT specs.
//! Logits, loss, every parameter gradient and the weights after one optimizer
//! step must match with relative error ≤ 1e-5 (L2 norm per tensor), through
//! the reference evaluator (`exec::Interpreter`, `train::reference`) and
//! through the lowered program.

use safetensors::SafeTensors;
use std::path::Path;
use tessera::compiler::autodiff::differentiate;
use tessera::compiler::driver::compile;
use tessera::compiler::{Model, Options, SourceMap, check_path};
use tessera::runtime::exec::Interpreter;
use tessera::runtime::tensor::Tensor;
use tessera::runtime::train::optim::{OptimizerState, learning_rate};
use tessera::runtime::train::ranks::{Ranks, Start, StepArgs};
use tessera::runtime::train::reference;

struct Fixture {
    bytes: Vec<u8>,
}

impl Fixture {
    fn open(name: &str) -> Fixture {
        Fixture {
            bytes: std::fs::read(format!("tests/fixtures/{name}.safetensors"))
                .expect("fixture (see tests/fixtures/README.md)"),
        }
    }

    fn get(&self, name: &str) -> Vec<f64> {
        let st = SafeTensors::deserialize(&self.bytes).expect("safetensors");
        let v = st.tensor(name).unwrap_or_else(|_| panic!("fixture has no `{name}`"));
        v.data().chunks(8).map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes"))).collect()
    }
}

fn model(spec: &str, small: bool) -> Model {
    model_with(spec, small, &[])
}

fn model_with(spec: &str, small: bool, more: &[&str]) -> Model {
    let mut sources = SourceMap::new();
    // The sizes make_fixtures.py uses; a constant learning rate so step 0 uses the peak.
    let mut overrides = vec!["train.schedule=constant".to_string()];
    overrides.extend(more.iter().map(|s| s.to_string()));
    if small {
        overrides.extend(["dims.seq=16", "dims.embed=32"].map(String::from));
    }
    let opts = Options { overrides, model: None, micro_batch: Some(2) };
    check_path(&mut sources, Path::new(spec), &opts)
        .unwrap_or_else(|d| panic!("{}", tessera::compiler::diag::render(&sources, &d.0)))
}

fn rel_err<T: Copy + Into<f64>>(ours: &[T], reference: &[f64]) -> f64 {
    assert_eq!(ours.len(), reference.len());
    let diff: f64 = ours.iter().zip(reference).map(|(a, b)| ((*a).into() - b).powi(2)).sum::<f64>().sqrt();
    let norm: f64 = reference.iter().map(|b| b * b).sum::<f64>().sqrt();
    diff / norm.max(1e-30)
}

fn check(spec: &str, fixture: &str, small: bool) {
    let m = model(spec, small);
    let fx = Fixture::open(fixture);
    let to32 = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect::<Vec<f32>>();
    let params: Vec<Tensor<f32>> = m
        .params
        .iter()
        .map(|p| Tensor { dims: p.ty.dims.clone(), data: to32(fx.get(&format!("param.{}", p.path))) })
        .collect();
    let inputs: Vec<Tensor<f32>> = m
        .inputs
        .iter()
        .map(|i| Tensor { dims: i.ty.dims.clone(), data: to32(fx.get(&format!("input.{}", i.name))) })
        .collect();
    let loss = m.graph.output("loss").expect("loss");
    let bw = differentiate(&m.graph, loss).expect("differentiable");
    let vals = Interpreter { graph: &bw.graph, params: &m.params, dropout: None, comm: None }
        .run(&inputs, &params)
        .expect("runs");

    let logits = &vals[m.graph.output("logits").expect("logits").index()];
    let e = rel_err(&logits.data, &fx.get("logits"));
    assert!(e <= 1e-5, "{fixture}: logits relative error {e:.2e}");
    let e = rel_err(&vals[loss.index()].data, &fx.get("loss"));
    assert!(e <= 1e-5, "{fixture}: loss relative error {e:.2e}");

    let grads = tessera::runtime::exec::param_grads(&m.params, &bw.param_grads, &vals);
    let mut worst = (0.0f64, String::new());
    for (p, g) in m.params.iter().zip(&grads) {
        let e = rel_err(&g.data, &fx.get(&format!("grad.{}", p.path)));
        assert!(e <= 1e-5, "{fixture}: gradient of {} relative error {e:.2e}", p.path);
        if e > worst.0 {
            worst = (e, p.path.clone());
        }
    }
    eprintln!("{fixture}: worst gradient relative error {:.2e} ({})", worst.0, worst.1);

    // One optimizer step (as the spec says: AdamW, clipping, SGD...), from the
    // reference gradients: Adam divides by |g|, so a gradient that is exactly
    // zero in exact arithmetic (the attention key bias: softmax ignores a
    // shift of every score) turns float32 rounding into a full step. Our
    // gradients were checked above; this checks the optimizer.
    let train = m.train.as_ref().expect("train section");
    let reference: Vec<Tensor<f32>> = m
        .params
        .iter()
        .map(|p| Tensor { dims: p.ty.dims.clone(), data: to32(fx.get(&format!("grad.{}", p.path))) })
        .collect();
    let mut opt = OptimizerState::new(&m.params, &train.optimizer);
    let mut updated = params.clone();
    reference::update(&m.params, &mut opt, &mut updated, &reference, learning_rate(train, 0, 1, 1), 1, train.clip);
    for (p, u) in m.params.iter().zip(&updated) {
        let e = rel_err(&u.data, &fx.get(&format!("updated.{}", p.path)));
        assert!(e <= 1e-5, "{fixture}: {} after one optimizer step, relative error {e:.2e}", p.path);
    }

    // The same step as a lowered program on the CPU backend (every
    // microbatch fed the fixture's batch, so the mean gradient is its
    // gradient): the loss, every gradient, and the weights after the step,
    // except the elements whose exact gradient is zero (see above).
    // One device: the fixture is one device's step (the MoE spec lays experts over data 2).
    let m = model_with(spec, small, &["parallel.mesh.data=1"]);
    let c = compile(&m).expect("lowers");
    let opt = OptimizerState::new(&m.params, &train.optimizer);
    let ranks = Ranks::new(&c, Start::State(&params, &opt), &opt.optimizer, Default::default(), None).expect("starts");
    let feed = |_: u64| inputs.clone();
    let report = ranks.step(StepArgs::new(0, 0, learning_rate(train, 0, 1, 1)), &feed, None).expect("runs")[0];
    let e = rel_err(&[report.loss.expect("one device computes the loss") as f32], &fx.get("loss"));
    assert!(e <= 1e-5, "{fixture}: lowered loss relative error {e:.2e}");
    let after = ranks.weights(&c).expect("weights");
    for (k, p) in m.params.iter().enumerate() {
        let g = ranks.read(0, tessera::compiler::lower::Bound::Grad(k)).expect("reads").expect("a gradient buffer");
        let want = fx.get(&format!("grad.{}", p.path));
        let e = rel_err(&g, &want);
        assert!(e <= 1e-5, "{fixture}: lowered gradient of {} relative error {e:.2e}", p.path);
        let top = want.iter().fold(0f64, |a, b| a.max(b.abs()));
        let keep: Vec<usize> = (0..want.len()).filter(|&i| want[i].abs() > 1e-6 * top).collect();
        let ours: Vec<f32> = keep.iter().map(|&i| after[k].data[i]).collect();
        let theirs: Vec<f64> = keep.iter().map(|&i| fx.get(&format!("updated.{}", p.path))[i]).collect();
        let e = rel_err(&ours, &theirs);
        assert!(e <= 1e-5, "{fixture}: lowered {} after one step, relative error {e:.2e}", p.path);
    }
    eprintln!("{fixture}: the lowered step matches too");
}

#[test]
fn tiny_gpt_matches_jax() {
    check("specs/tiny/gpt.spec", "tiny_gpt", true);
}

#[test]
fn tiny_moe_matches_jax() {
    check("specs/tiny/moe.spec", "tiny_moe", true);
}

#[test]
fn tiny_bert_matches_jax() {
    check("specs/tiny/bert.spec", "tiny_bert", false);
}

#[test]
fn tiny_vit_matches_jax() {
    check("specs/tiny/vit.spec", "tiny_vit", false);
}

/// A float64 PyTorch tensor of a fixture under Tessera's names for its
/// dims, in PyTorch's order.
fn torch_tensor(st: &SafeTensors, name: &str, dims: &[(&str, u64)]) -> Tensor<f64> {
    let v = st.tensor(name).unwrap_or_else(|_| panic!("no `{name}` in the fixture"));
    let data = v.data().chunks(8).map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes"))).collect();
    Tensor { dims: dims.iter().map(|(n, s)| tessera::compiler::ir::Dim::new(*n, *s)).collect(), data }
}

/// Convolutions and pooling against PyTorch in float64
/// (tests/fixtures/conv/make.py): strided and padded, dilated, grouped,
/// depthwise and 1D convolutions, max and average pooling, through the
/// reference evaluator, each output within 1e-12 relative.
#[test]
fn convolutions_and_pooling_match_pytorch() {
    use tessera::compiler::ir::Dim;
    let bytes = std::fs::read("tests/fixtures/conv/conv.safetensors").expect("the fixture");
    let st = SafeTensors::deserialize(&bytes).expect("safetensors");
    let read = |name: &str, dims: &[(&str, u64)]| torch_tensor(&st, name, dims);
    let src = "model m {
        dims { h = 7, wd = 6, c = 4, o = 3, g = 2, cg = 2, og = 2, len = 9 }
        input x: f32[batch, c, h, wd]
        input xg: f32[batch, g, cg, h, wd]
        input s: f32[batch, c, len]
        param w1: [c, kh = 3, kw = 3, o]
        param w2: [c, kh2 = 2, kw2 = 3, o]
        param wg: [g, cg, kh, kw, og]
        param wd1: [c, kh, kw]
        param w1d: [c, k1 = 3, o]
        a = conv(x, w1, [h, wd] -> [oh, ow], window = [kh, kw], stride = 2, padding = 1)
        b = conv(x, w2, [h, wd] -> [dh, dw], window = [kh2, kw2], dilation = 2)
        gr = conv(xg, wg, [h, wd] -> [gh, gw], window = [kh, kw], padding = 1, per = [g])
        dw = conv(x, wd1, [h, wd] -> [eh, ew], window = [kh, kw], per = [c])
        one = conv(s, w1d, [len] -> [ol], window = [k1], stride = 2)
        mp = max_pool(a, [oh, ow] -> [mh, mw], size = 2, stride = 1)
        ap = avg_pool(tanh(b), [dh, dw] -> [ah, aw], size = 3, stride = 2, padding = 1)
        loss = sum(mp, batch, mh, mw, o)
      }
      train { optimizer = sgd(lr = 0.0)  batch = 2 sequences }";
    let mut sources = SourceMap::new();
    let m = tessera::compiler::check_text(&mut sources, "conv.spec", src, Path::new("specs"), &Options::default())
        .unwrap_or_else(|d| panic!("{}", tessera::compiler::diag::render(&sources, &d.0)));
    let x = read("x", &[("batch", 2), ("c", 4), ("h", 7), ("wd", 6)]);
    // The grouped input: channels (g, cg), g outer, as PyTorch's groups take them.
    let xg = Tensor { dims: m.inputs[1].ty.dims.clone(), data: x.data.clone() };
    let s = read("s", &[("batch", 2), ("c", 4), ("len", 9)]);
    let kernel = |name: &str, dims: &[(&str, u64)], k: usize| read(name, dims).permute(&m.params[k].ty.dims);
    let params = vec![
        kernel("w1", &[("o", 3), ("c", 4), ("kh", 3), ("kw", 3)], 0),
        kernel("w2", &[("o", 3), ("c", 4), ("kh2", 2), ("kw2", 3)], 1),
        // [g·og, cg, kh, kw], out channels g outer.
        kernel("wg", &[("g", 2), ("og", 2), ("cg", 2), ("kh", 3), ("kw", 3)], 2),
        kernel("wd1", &[("c", 4), ("kh", 3), ("kw", 3)], 3),
        kernel("w1d", &[("o", 3), ("c", 4), ("k1", 3)], 4),
    ];
    let vals = Interpreter { graph: &m.graph, params: &m.params, dropout: None, comm: None }
        .run(&[x, xg, s], &params)
        .unwrap_or_else(|e| panic!("{e}"));
    let outputs: [(&str, &[&str]); 7] = [
        ("a", &["batch", "o", "oh", "ow"]),
        ("b", &["batch", "o", "dh", "dw"]),
        ("gr", &["batch", "g", "og", "gh", "gw"]),
        ("dw", &["batch", "c", "eh", "ew"]),
        ("one", &["batch", "o", "ol"]),
        ("mp", &["batch", "o", "mh", "mw"]),
        ("ap", &["batch", "o", "ah", "aw"]),
    ];
    for (name, torch_order) in outputs {
        let ours = &vals[m.graph.output(name).expect("an output").index()];
        let order: Vec<Dim> =
            torch_order.iter().map(|n| ours.dims.iter().find(|d| d.name == *n).expect("a dim").clone()).collect();
        let ours = ours.permute(&order);
        let want = read(name, &order.iter().map(|d| (d.name.as_str(), d.size)).collect::<Vec<_>>());
        assert!(!want.data.is_empty() && ours.data.len() == want.data.len(), "{name}: size");
        let e = rel_err(&ours.data, &want.data);
        assert!(e < 1e-12, "{name}: relative error {e:.2e}");
    }
}

/// std/conv's `group_norm` against `torch.nn.functional.group_norm` in
/// float64 (tests/fixtures/conv/make.py): 6 channels in 3 groups.
#[test]
fn group_norm_matches_pytorch() {
    std_conv_norm_matches_pytorch("group_norm(x, groups = 3)", "gn", [2, 6, 5, 4]);
}

/// std/conv's `batch_norm` against `torch.nn.functional.batch_norm` in
/// training mode, float64 (tests/fixtures/conv/make.py): 5 channels over a
/// batch of 3 and 4 × 2 positions.
#[test]
fn batch_norm_matches_pytorch() {
    std_conv_norm_matches_pytorch("batch_norm(x)", "bn", [3, 5, 4, 2]);
}

/// A RegNetY stage of std/conv's blocks (`regnet_y_down`, then
/// `regnet_y`: 1×1, grouped 3×3 and 1×1 convolutions with BatchNorm,
/// squeeze-excitation, a strided projection of the residual) against
/// torchvision's block written in PyTorch's functional ops, in float64
/// (tests/fixtures/conv/make.py), through the reference evaluator: within
/// 1e-12 relative. The fixture holds every weight under its parameter path.
#[test]
fn regnet_y_blocks_match_pytorch() {
    let bytes = std::fs::read("tests/fixtures/conv/conv.safetensors").expect("the fixture");
    let st = SafeTensors::deserialize(&bytes).expect("safetensors");
    let src = "use std/conv
      model m {
        dims { h = 6, w = 6, c_in = 4, groups = 2, group_width = 3, c = groups * group_width, oh = 3, ow = 3 }
        input x: f32[batch, h, w, c_in]
        y = regnet_y(regnet_y_down(x, se = 2), se = 3)
        loss = sum(y, batch, oh, ow, c)
      }
      train { optimizer = sgd(lr = 0.0)  batch = 3 samples }";
    let mut sources = SourceMap::new();
    let m = tessera::compiler::check_text(&mut sources, "regnet.spec", src, Path::new("specs"), &Options::default())
        .unwrap_or_else(|d| panic!("{}", tessera::compiler::diag::render(&sources, &d.0)));
    let x = torch_tensor(&st, "rg_x", &[("batch", 3), ("c_in", 4), ("h", 6), ("w", 6)]).permute(&m.inputs[0].ty.dims);
    let params: Vec<Tensor<f64>> = m
        .params
        .iter()
        .map(|p| {
            let dims: Vec<(&str, u64)> = p.ty.dims.iter().map(|d| (d.name.as_str(), d.size)).collect();
            torch_tensor(&st, &p.path, &dims)
        })
        .collect();
    assert_eq!(params.len(), 29, "every weight of the two blocks is in the fixture");
    let vals = Interpreter { graph: &m.graph, params: &m.params, dropout: None, comm: None }
        .run(&[x], &params)
        .unwrap_or_else(|e| panic!("{e}"));
    let want = torch_tensor(&st, "rg_y", &[("batch", 3), ("c", 6), ("oh", 3), ("ow", 3)]);
    let ours = vals[m.graph.output("y").expect("y").index()].permute(&want.dims);
    let e = rel_err(&ours.data, &want.data);
    assert!(want.data.iter().any(|b| *b != 0.0) && e < 1e-12, "relative error {e:.2e}");
}

/// A std/conv normalisation `call` of `x` (NCHW sizes `[b, c, h, w]`, with a
/// gain and a bias) against the fixture's `{prefix}_x`, `_gain`, `_bias`, `_y`.
fn std_conv_norm_matches_pytorch(call: &str, prefix: &str, [b, c, h, w]: [u64; 4]) {
    let bytes = std::fs::read("tests/fixtures/conv/conv.safetensors").expect("the fixture");
    let st = SafeTensors::deserialize(&bytes).expect("safetensors");
    let read = |name: &str, dims: &[(&str, u64)]| torch_tensor(&st, &format!("{prefix}_{name}"), dims);
    let src = format!(
        "use std/conv
      model m {{
        dims {{ h = {h}, w = {w}, c = {c} }}
        input x: f32[batch, h, w, c]
        y = {call}
        loss = sum(y, batch, h, w, c)
      }}
      train {{ optimizer = sgd(lr = 0.0)  batch = {b} sequences }}"
    );
    let mut sources = SourceMap::new();
    let m = tessera::compiler::check_text(&mut sources, "norm.spec", &src, Path::new("specs"), &Options::default())
        .unwrap_or_else(|d| panic!("{}", tessera::compiler::diag::render(&sources, &d.0)));
    let nchw = [("batch", b), ("c", c), ("h", h), ("w", w)];
    let x = read("x", &nchw).permute(&m.inputs[0].ty.dims);
    let params = vec![read("gain", &[("c", c)]), read("bias", &[("c", c)])];
    assert!(m.params[0].path.ends_with("norm.gain"), "{}", m.params[0].path);
    let vals = Interpreter { graph: &m.graph, params: &m.params, dropout: None, comm: None }
        .run(&[x], &params)
        .unwrap_or_else(|e| panic!("{e}"));
    let want = read("y", &nchw);
    let ours = vals[m.graph.output("y").expect("y").index()].permute(&want.dims);
    let e = rel_err(&ours.data, &want.data);
    assert!(want.data.iter().any(|b| *b != 0.0) && e < 1e-12, "relative error {e:.2e}");
}
