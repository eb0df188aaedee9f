//! Sampling from a trained language model.
//!
//! Two ways, with the same tokens for greedy decoding (`tests/train.rs`):
//! - with a KV cache (`exec::decode`): each new token runs only its own row
//!   of the graph, attending to cached keys and values; when the context is
//!   full, the cache restarts from the last half of the window;
//! - by recomputation: each new token runs the forward graph on the last
//!   `seq` tokens (left-aligned, the rest padding) and reads the logits at the
//!   last real position (causal attention ignores the padding after it).

use crate::exec::Interpreter;
use crate::exec::kernels::uniform;
use crate::tensor::Tensor;
use tessera_compiler::Model;

#[derive(Debug, Clone)]
pub struct SampleConfig {
    pub tokens: usize,
    /// 0 is greedy.
    pub temperature: f64,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    pub seed: u64,
    /// Decode with a KV cache (falls back to recomputation for models it cannot run).
    pub kv_cache: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum SampleError {
    #[error("{0}")]
    Setup(String),
    #[error("{0}")]
    Exec(#[from] crate::exec::ExecError),
}

/// What generation needs of a language model: the `tokens` input, the
/// `logits` output, the sequence dim and the vocabulary size.
struct Lm {
    tokens: usize,
    logits: tessera_compiler::ir::ValueId,
    seq: tessera_compiler::model::Dim,
    vocab: usize,
}

fn lm(model: &Model) -> Result<Lm, SampleError> {
    let tokens = model
        .inputs
        .iter()
        .position(|i| i.name == "tokens")
        .ok_or_else(|| SampleError::Setup("the model has no `tokens` input".into()))?;
    let logits =
        model.graph.output("logits").ok_or_else(|| SampleError::Setup("the model defines no `logits`".into()))?;
    let lt = model.graph.ty(logits);
    if lt.dims.len() != 3 {
        return Err(SampleError::Setup(format!("`logits` should be [batch, seq, vocab], found {lt}")));
    }
    let seq = model.inputs[tokens]
        .ty
        .dims
        .last()
        .cloned()
        .ok_or_else(|| SampleError::Setup("`tokens` has no dims".into()))?;
    let vocab = lt.dims.last().map(|d| d.size as usize).unwrap_or(1);
    Ok(Lm { tokens, logits, seq, vocab })
}

/// Pick a token from logits: greedy, or temperature with optional top-k / top-p.
pub fn pick(logits: &[f32], cfg: &SampleConfig, step: u64) -> usize {
    if cfg.temperature <= 0.0 {
        return logits.iter().enumerate().fold((0, f32::NEG_INFINITY), |b, (i, &v)| if v > b.1 { (i, v) } else { b }).0;
    }
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    if let Some(k) = cfg.top_k {
        idx.truncate(k.max(1));
    }
    let max = logits[idx[0]] as f64;
    let mut probs: Vec<f64> = idx.iter().map(|&i| ((logits[i] as f64 - max) / cfg.temperature).exp()).collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if let Some(p) = cfg.top_p {
        let mut acc = 0.0;
        let mut keep = probs.len();
        for (j, q) in probs.iter().enumerate() {
            acc += q;
            if acc >= p {
                keep = j + 1;
                break;
            }
        }
        probs.truncate(keep);
        idx.truncate(keep);
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|q| *q /= total);
    }
    let u = uniform(cfg.seed, 0x5A3F, step);
    let mut acc = 0.0;
    for (j, q) in probs.iter().enumerate() {
        acc += q;
        if u < acc {
            return idx[j];
        }
    }
    *idx.last().unwrap_or(&0)
}

/// Continue `prompt` by `cfg.tokens` tokens. The model must have been checked
/// with a microbatch of one sequence and have a `tokens` input and `logits`.
pub fn generate(
    model: &Model,
    params: &[Tensor<f32>],
    prompt: &[u32],
    cfg: &SampleConfig,
) -> Result<Vec<u32>, SampleError> {
    if cfg.kv_cache {
        match generate_cached(model, params, prompt, cfg) {
            Ok(out) => return Ok(out),
            Err(SampleError::Exec(_)) => {} // an op the decoder cannot run: recompute instead
            Err(e) => return Err(e),
        }
    }
    generate_window(model, params, prompt, cfg)
}

/// Generation with a KV cache.
pub fn generate_cached(
    model: &Model,
    params: &[Tensor<f32>],
    prompt: &[u32],
    cfg: &SampleConfig,
) -> Result<Vec<u32>, SampleError> {
    use crate::exec::decode::Decoder;
    use tessera_compiler::model::Dim;
    let Lm { logits: logits_id, seq: seq_dim, vocab, .. } = lm(model)?;
    let seq = seq_dim.size as usize;
    let interp = Interpreter { graph: &model.graph, params: &model.params, dropout: None, comm: None };
    let step_inputs = |t: u32| -> Vec<Tensor<f32>> {
        model
            .inputs
            .iter()
            .map(|i| {
                let dims: Vec<Dim> =
                    i.ty.dims
                        .iter()
                        .map(|d| if d.name == seq_dim.name { Dim::new(d.name.clone(), 1) } else { d.clone() })
                        .collect();
                let mut x = Tensor::zeros(&dims);
                if i.name == "tokens" {
                    x.data.iter_mut().for_each(|v| *v = t as f32);
                }
                x
            })
            .collect()
    };
    // Restart the cache from the last half of the window (the context is full).
    let refill = |out: &[u32]| -> Result<(Decoder<'_, f32>, Vec<f32>), SampleError> {
        let mut dec = Decoder::new(&interp, params, &seq_dim.name);
        let mut last = Vec::new();
        let start = out.len().saturating_sub(if out.len() > seq { seq / 2 } else { seq });
        for &t in &out[start..] {
            last = dec.step(&step_inputs(t))?[logits_id.index()].data.clone();
        }
        Ok((dec, last))
    };
    let mut out: Vec<u32> = prompt.to_vec();
    if out.is_empty() {
        out.push(b'\n' as u32);
    }
    let (mut dec, mut last) = refill(&out)?;
    for step in 0..cfg.tokens {
        let next = pick(&last[..vocab], cfg, step as u64) as u32;
        out.push(next);
        if step + 1 == cfg.tokens {
            break;
        }
        if dec.position == seq {
            (dec, last) = refill(&out)?;
        } else {
            last = dec.step(&step_inputs(next))?[logits_id.index()].data.clone();
        }
    }
    Ok(out[prompt.len().max(1).min(out.len())..].to_vec())
}

/// Generation by recomputing the window for every token.
pub fn generate_window(
    model: &Model,
    params: &[Tensor<f32>],
    prompt: &[u32],
    cfg: &SampleConfig,
) -> Result<Vec<u32>, SampleError> {
    let Lm { tokens: tok, logits: logits_id, seq, vocab } = lm(model)?;
    let seq = seq.size as usize;
    let interp = Interpreter { graph: &model.graph, params: &model.params, dropout: None, comm: None };
    let mut out: Vec<u32> = prompt.to_vec();
    if out.is_empty() {
        out.push(b'\n' as u32);
    }
    for step in 0..cfg.tokens {
        let window = &out[out.len().saturating_sub(seq)..];
        let mut inputs: Vec<Tensor<f32>> = model.inputs.iter().map(|i| Tensor::zeros(&i.ty.dims)).collect();
        for (j, t) in window.iter().enumerate() {
            inputs[tok].data[j] = *t as f32;
        }
        let vals = interp.run(&inputs, params)?;
        let logits = &vals[logits_id.index()];
        let at = window.len() - 1;
        let row = &logits.data[at * vocab..(at + 1) * vocab];
        out.push(pick(row, cfg, step as u64) as u32);
    }
    Ok(out[prompt.len().max(1).min(out.len())..].to_vec())
}
