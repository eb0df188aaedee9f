//! Training data:
//! - a token stream: a text file read byte by byte (ids 0..256) or through
//!   the spec's tokenizer, or a `.bin` of little-endian u16 token ids as
//!   nanoGPT writes them. The last `val_fraction` of the tokens is the
//!   validation split. A batch is a set of windows whose start positions are
//!   a pure function of (seed, step, micro);
//! - labelled examples: a `.jsonl` file of `{"text": ..., "label": k}`
//!   objects (or `{"pixels": [...], "label": k}` for images, the pixels
//!   row-major in the model's `images` order), each with an optional
//!   `"split": "train" | "val"` (without one, the last `val_fraction` of the
//!   examples is the validation split). Each text is tokenized with the
//!   tokenizer's special tokens (BERT's `[CLS] … [SEP]`). A training batch
//!   draws examples as a pure function of (seed, step, micro); a validation
//!   batch takes them in order.

use super::TrainError;
use crate::exec::kernels::uniform;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Val,
}

pub struct Dataset {
    source: Source,
    /// The file (canonical where it can be) and the SHA-256 of its bytes.
    pub path: std::path::PathBuf,
    pub sha256: String,
}

enum Source {
    /// A token stream and the first token of its validation split.
    Stream { tokens: Tokens, split_at: usize },
    /// Labelled examples of each split.
    Examples { train: Vec<Example>, val: Vec<Example> },
}

/// A labelled example: its token ids (of its text, if any), its pixels
/// (of its image, if any) and its class.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub ids: Vec<u32>,
    pub pixels: Vec<f32>,
    pub label: u32,
}

/// Token ids in the narrowest integers that hold them: the file's own bytes
/// for byte-level text, 16 bits for a vocabulary up to 65,536 (GPT-2's), else 32.
enum Tokens {
    U8(Vec<u8>),
    U16(Vec<u16>),
    U32(Vec<u32>),
}

impl Tokens {
    fn len(&self) -> usize {
        match self {
            Tokens::U8(t) => t.len(),
            Tokens::U16(t) => t.len(),
            Tokens::U32(t) => t.len(),
        }
    }

    fn get(&self, k: usize) -> Option<u32> {
        match self {
            Tokens::U8(t) => t.get(k).map(|&x| x as u32),
            Tokens::U16(t) => t.get(k).map(|&x| x as u32),
            Tokens::U32(t) => t.get(k).copied(),
        }
    }

    fn max(&self) -> Option<u32> {
        match self {
            Tokens::U8(t) => t.iter().max().map(|&x| x as u32),
            Tokens::U16(t) => t.iter().max().map(|&x| x as u32),
            Tokens::U32(t) => t.iter().max().copied(),
        }
    }
}

/// Where a spec's `data = "PATH"` is: an absolute path as it is; a relative
/// one the way `use` is resolved, next to the spec and then in each folder
/// above it (without a spec, from the working directory).
pub fn resolve(data: &str, spec: Option<&Path>) -> Result<std::path::PathBuf, TrainError> {
    let rel = Path::new(data);
    let Some(spec) = spec.filter(|_| rel.is_relative()) else {
        return Ok(rel.to_path_buf());
    };
    let spec = spec.canonicalize().unwrap_or(spec.to_path_buf());
    let mut tried = Vec::new();
    for dir in spec.ancestors().skip(1) {
        let candidate = dir.join(rel);
        if candidate.is_file() {
            return Ok(candidate);
        }
        tried.push(candidate.display().to_string());
    }
    Err(TrainError::Io(format!(
        "the spec's data `{data}` was not found; looked in:\n    {}\n  help: a spec's `data` path is resolved \
         like `use`: next to the spec, then in each folder above it; or pass --data PATH (from the working directory)",
        tried.join("\n    ")
    )))
}

impl Dataset {
    pub fn open(
        path: &Path,
        val_fraction: f64,
        vocab: u64,
        tokenizer: &super::tokenizer::Tokenizer,
    ) -> Result<Dataset, TrainError> {
        let bytes =
            std::fs::read(path).map_err(|e| TrainError::Io(format!("cannot read data `{}`: {e}", path.display())))?;
        let sha256 = super::checkpoint::sha256_hex(&bytes);
        let source = if path.extension().is_some_and(|e| e == "jsonl") {
            examples(path, &bytes, val_fraction, vocab, tokenizer)?
        } else {
            let tokens = stream(path, bytes, vocab, tokenizer)?;
            let split_at = ((tokens.len() as f64) * (1.0 - val_fraction)) as usize;
            Source::Stream { tokens, split_at }
        };
        let path = path.canonicalize().unwrap_or(path.to_path_buf());
        Ok(Dataset { source, path, sha256 })
    }

    /// The labelled examples of `split` (`None`: the data is a token stream).
    pub fn examples(&self, split: Split) -> Option<&[Example]> {
        match (&self.source, split) {
            (Source::Examples { train, .. }, Split::Train) => Some(train),
            (Source::Examples { val, .. }, Split::Val) => Some(val),
            (Source::Stream { .. }, _) => None,
        }
    }

    /// A token stream's splits must each hold at least one window of
    /// `seq + 1` tokens (inputs and their next-token targets): nothing is
    /// padded. Labelled examples need one example in each split.
    pub fn check_windows(&self, seq: usize) -> Result<(), TrainError> {
        let (tokens, split_at) = match &self.source {
            Source::Stream { tokens, split_at } => (tokens, *split_at),
            Source::Examples { train, val } if !train.is_empty() && !val.is_empty() => return Ok(()),
            Source::Examples { train, val } => {
                return Err(TrainError::Setup(format!(
                    "data `{}` holds {} training and {} validation examples; each split needs one at least\n  help: \
                     mark examples with \"split\": \"val\", or lower `val_fraction`",
                    self.path.display(),
                    train.len(),
                    val.len()
                )));
            }
        };
        let (train, val) = (split_at, tokens.len() - split_at);
        if train > seq && val > seq {
            return Ok(());
        }
        let frac = val as f64 / tokens.len().max(1) as f64;
        Err(TrainError::Setup(format!(
            "data `{}` is too short: it holds {} tokens, split into {train} for training and {val} for validation \
             ({:.0}%), but each split needs at least seq + 1 = {} tokens for one window\n  help: use a file with at \
             least {} tokens, or a smaller `seq`",
            self.path.display(),
            tokens.len(),
            100.0 * frac,
            seq + 1,
            ((seq + 1) as f64 / frac.clamp(1e-9, 0.5)).ceil() as u64
        )))
    }

    /// Labelled examples that feed an `images` input of `per_example`
    /// values must each hold that many pixels.
    pub fn check_pixels(&self, per_example: usize) -> Result<(), TrainError> {
        let Source::Examples { train, val } = &self.source else {
            return Err(TrainError::Setup(format!(
                "the model has an `images` input, but the data `{}` is a token stream
  help: images come as labelled \
                 examples, a .jsonl of {{\"pixels\": [...], \"label\": k}}",
                self.path.display()
            )));
        };
        match train.iter().chain(val).position(|e| e.pixels.len() != per_example) {
            None => Ok(()),
            Some(k) => Err(TrainError::Setup(format!(
                "example {} of `{}` holds {} pixels, but the model's `images` takes {per_example} per example\n  help: \
                 write each image's pixels row-major in the order of the model's `images` dims after `batch`",
                k + 1,
                self.path.display(),
                train.iter().chain(val).nth(k).map_or(0, |e| e.pixels.len())
            ))),
        }
    }

    /// Tokens in a stream, or examples.
    pub fn len(&self) -> usize {
        match &self.source {
            Source::Stream { tokens, .. } => tokens.len(),
            Source::Examples { train, val } => train.len() + val.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Microbatch `micro` of a step as the model's `inputs` (each of the
    /// input's whole shape; `tokens` is `[batch, seq]`, which the trainer
    /// checks). A token stream gives windows: `tokens` and next-token
    /// `targets`. Labelled examples give `tokens` (each example's ids, cut to
    /// `seq`, then zeros), `mask` where the model has one (1 on the
    /// example's tokens), `images` (each example's pixels), `targets`
    /// `[batch]` (the labels), every other input zeros.
    pub fn batch(
        &self,
        split: Split,
        inputs: &[tessera_compiler::ir::Input],
        seed: u64,
        step: u64,
        micro: u64,
    ) -> Vec<crate::tensor::Tensor<f32>> {
        // Every input leads with `batch`; `tokens` (if any) ends with `seq`.
        let tokens = inputs.iter().find(|x| x.name == "tokens").unwrap_or(&inputs[0]);
        let batch = tokens.ty.dims.first().map_or(1, |d| d.size as usize);
        let seq = if tokens.name == "tokens" { tokens.ty.dims.last().map_or(1, |d| d.size as usize) } else { 1 };
        let rows = match &self.source {
            Source::Examples { train, val } => {
                if split == Split::Train {
                    train
                } else {
                    val
                }
            }
            Source::Stream { tokens, split_at } => {
                let (x, y) = windows(tokens, *split_at, split, batch, seq, seed, step, micro);
                return inputs
                    .iter()
                    .map(|i| crate::tensor::Tensor {
                        dims: i.ty.dims.clone(),
                        data: if i.name == "tokens" { x.clone() } else { y.clone() },
                    })
                    .collect();
            }
        };
        // Training draws examples with replacement as a pure function of
        // (seed, step, micro); validation takes them in order (microbatch
        // `micro` holds examples `micro·batch ..`, wrapping around).
        let picked: Vec<&Example> = (0..batch)
            .map(|b| {
                let global = micro.wrapping_mul(batch as u64).wrapping_add(b as u64);
                let k = match split {
                    Split::Train => {
                        (uniform(seed ^ 0xDA7A, step.wrapping_mul(1_000_003), global) * rows.len() as f64) as usize
                    }
                    Split::Val => (global % rows.len() as u64) as usize,
                };
                &rows[k.min(rows.len() - 1)]
            })
            .collect();
        inputs
            .iter()
            .map(|x| {
                let mut t = crate::tensor::Tensor::zeros(&x.ty.dims);
                match x.name.as_str() {
                    "tokens" | "mask" => {
                        for (b, e) in picked.iter().enumerate() {
                            let row = &mut t.data[b * seq..(b + 1) * seq];
                            for (r, &id) in row.iter_mut().zip(&e.ids) {
                                *r = if x.name == "tokens" { id as f32 } else { 1.0 };
                            }
                        }
                    }
                    "targets" => t.data.iter_mut().zip(&picked).for_each(|(r, e)| *r = e.label as f32),
                    "images" => {
                        let per = t.data.len() / batch.max(1);
                        for (b, e) in picked.iter().enumerate() {
                            t.data[b * per..(b + 1) * per].copy_from_slice(&e.pixels[..per]);
                        }
                    }
                    _ => {}
                }
                t
            })
            .collect()
    }
}

/// A token stream from a file: `.bin` u16 ids, bytes, or text through the tokenizer.
fn stream(
    path: &Path,
    bytes: Vec<u8>,
    vocab: u64,
    tokenizer: &super::tokenizer::Tokenizer,
) -> Result<Tokens, TrainError> {
    let tokens = if path.extension().is_some_and(|e| e == "bin") {
        if !bytes.len().is_multiple_of(2) {
            return Err(TrainError::Io(format!("`{}` is not a u16 token file (odd length)", path.display())));
        }
        Tokens::U16(bytes.chunks(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect())
    } else if let super::tokenizer::Tokenizer::Bytes = tokenizer {
        Tokens::U8(bytes)
    } else {
        let text = String::from_utf8(bytes).map_err(|_| {
            TrainError::Io(format!("`{}` is not UTF-8 text; the GPT-2 tokenizer reads text", path.display()))
        })?;
        let ids = tokenizer.encode(&text)?;
        match ids.iter().all(|&t| t <= u16::MAX as u32) {
            true => Tokens::U16(ids.into_iter().map(|t| t as u16).collect()),
            false => Tokens::U32(ids),
        }
    };
    if let Some(bad) = tokens.max().filter(|&t| t as u64 >= vocab) {
        return Err(TrainError::Setup(format!(
            "`{}` holds token id {bad}, but the model's vocab is {vocab}; byte-level text needs vocab = 256, GPT-2 BPE vocab = 50257",
            path.display()
        )));
    }
    Ok(tokens)
}

/// Labelled examples from a `.jsonl` file, with file:line in every error.
fn examples(
    path: &Path,
    bytes: &[u8],
    val_fraction: f64,
    vocab: u64,
    tokenizer: &super::tokenizer::Tokenizer,
) -> Result<Source, TrainError> {
    let text = std::str::from_utf8(bytes).map_err(|_| TrainError::Io(format!("`{}` is not UTF-8", path.display())))?;
    let mut marked = Vec::new();
    let mut unmarked = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let at = format!("{}:{}", path.display(), i + 1);
        let bad = |what: &str| {
            TrainError::Setup(format!(
                "{at}: {what}\n  help: each line is an object like {{\"text\": \"...\", \"label\": 0, \"split\": \"train\"}}"
            ))
        };
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| bad(&format!("not JSON: {e}")))?;
        let pixels: Vec<f32> = match v.get("pixels") {
            None => Vec::new(),
            Some(p) => p
                .as_array()
                .and_then(|a| a.iter().map(|x| x.as_f64().map(|x| x as f32)).collect::<Option<Vec<f32>>>())
                .ok_or_else(|| bad("`pixels` is not a list of numbers"))?,
        };
        let text = match v["text"].as_str() {
            Some(t) => t,
            None if !pixels.is_empty() => "",
            None => return Err(bad("no `text` string (or `pixels` list)")),
        };
        let label = v["label"]
            .as_u64()
            .and_then(|l| u32::try_from(l).ok())
            .ok_or_else(|| bad("no `label` (a class index, 0 or more)"))?;
        let ids =
            if text.is_empty() && !pixels.is_empty() { Vec::new() } else { tokenizer.encode_with_special(text)? };
        if let Some(&id) = ids.iter().find(|&&t| t as u64 >= vocab) {
            return Err(bad(&format!("the text holds token id {id}, but the model's vocab is {vocab}")));
        }
        let e = Example { ids, pixels, label };
        match v.get("split").and_then(|s| s.as_str()) {
            Some("train") => marked.push((Split::Train, e)),
            Some("val") => marked.push((Split::Val, e)),
            None => unmarked.push(e),
            Some(other) => return Err(bad(&format!("`split` is \"{other}\"; it is \"train\" or \"val\""))),
        }
    }
    let (mut train, mut val): (Vec<Example>, Vec<Example>) = (Vec::new(), Vec::new());
    for (s, e) in marked {
        if s == Split::Train { train.push(e) } else { val.push(e) }
    }
    let cut = ((unmarked.len() as f64) * (1.0 - val_fraction)) as usize;
    val.extend(unmarked.split_off(cut));
    train.extend(unmarked);
    Ok(Source::Examples { train, val })
}

/// `batch` windows of `seq + 1` tokens of a stream (validation from
/// `split_at` on): inputs and next-token targets, row-major [batch, seq].
/// Microbatch `micro` of a step holds sequences `micro·batch ..` of the
/// step's global batch, so a step sees the same windows however its batch is
/// split into microbatches and ranks.
#[allow(clippy::too_many_arguments)]
fn windows(
    tokens: &Tokens,
    split_at: usize,
    split: Split,
    batch: usize,
    seq: usize,
    seed: u64,
    step: u64,
    micro: u64,
) -> (Vec<f32>, Vec<f32>) {
    let (lo, hi) = match split {
        Split::Train => (0, split_at),
        Split::Val => (split_at, tokens.len()),
    };
    let room = hi.saturating_sub(lo + seq + 1).max(1);
    let mut x = Vec::with_capacity(batch * seq);
    let mut y = Vec::with_capacity(batch * seq);
    for b in 0..batch {
        let stream = step.wrapping_mul(1_000_003);
        let global = micro.wrapping_mul(batch as u64).wrapping_add(b as u64);
        let start = lo + (uniform(seed ^ 0xDA7A, stream, global) * room as f64) as usize;
        for i in 0..seq {
            let at = |k: usize| tokens.get(k).unwrap_or(0) as f32;
            x.push(at(start + i));
            y.push(at(start + i + 1));
        }
    }
    (x, y)
}
