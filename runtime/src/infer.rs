//! Sampling from a trained language model, on the lowered generation
//! programs (`driver::compile_generate`) and the CPU backend: what runs here
//! is the programs, never the checked model.
//!
//! Two programs share one allocation (the weights and the KV cache):
//! - the **window** program runs the forward pass over a whole context
//!   (left-aligned, the rest padding; causal attention ignores what follows
//!   the last real token) and writes every position's keys and values to the
//!   cache;
//! - the **step** program runs one token at the run-time position `pos`,
//!   appending its keys and values to the cache and attending to it.
//!
//! With the cache, the prompt runs once through the window program, then
//! each new token is one step; when the context is full, the window program
//! restarts the cache from the last half of it. Without the cache
//! (`--no-kv-cache`, or a model whose logits mix positions, which has no step
//! program), every token reruns the window. Greedy decoding gives the same
//! tokens both ways (`tests/train.rs`).

use crate::backend::{
    self, Backend,
    cpu::{Cpu, Engine},
};
use crate::exec::kernels::uniform;
use crate::tensor::Tensor;
use tessera_compiler::driver::Generation;
use tessera_compiler::ir::TensorType;
use tessera_compiler::lower::{Bound, BufId, Buffer, Program};

#[derive(Debug, Clone)]
pub struct SampleConfig {
    pub tokens: usize,
    /// 0 is greedy.
    pub temperature: f64,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    pub seed: u64,
    /// Decode with the KV cache (a model without a step program recomputes the window instead).
    pub kv_cache: bool,
    /// Stop after generating this token (the model's end of sequence).
    pub stop: Option<u32>,
}

impl SampleConfig {
    /// The sampling of a spec's `infer` section (`sampling`, `seed`), or
    /// temperature 0.8 and seed 0 without one; one token, the KV cache on.
    pub fn of_spec(infer: Option<&tessera_compiler::config::Infer>) -> SampleConfig {
        use tessera_compiler::config::Sampling;
        let mut c =
            SampleConfig { tokens: 1, temperature: 0.8, top_k: None, top_p: None, seed: 0, kv_cache: true, stop: None };
        if let Some(i) = infer {
            c.seed = i.seed;
            match i.sampling {
                Sampling::Greedy => c.temperature = 0.0,
                Sampling::Temperature { temperature } => c.temperature = temperature,
                Sampling::TopK { k, temperature } => (c.top_k, c.temperature) = (Some(k as usize), temperature),
                Sampling::TopP { p, temperature } => (c.top_p, c.temperature) = (Some(p), temperature),
            }
        }
        c
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SampleError {
    #[error("{0}")]
    Setup(String),
    #[error("{0}")]
    Run(String),
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

/// A program's io buffers.
struct Io {
    tokens: BufId,
    logits: BufId,
    pos: Option<BufId>,
}

impl Io {
    fn of(p: &Program) -> Result<Io, SampleError> {
        let get = |b: Bound| {
            p.bound(b).ok_or_else(|| SampleError::Setup(format!("the program has no `{}` buffer", b.name())))
        };
        Ok(Io { tokens: get(Bound::Tokens)?, logits: get(Bound::Logits)?, pos: p.bound(Bound::Pos) })
    }
}

/// A model's generation programs, loaded with its weights.
pub struct Generator {
    programs: Generation,
    cpu: Cpu,
    window: Io,
    step: Option<Io>,
    /// The context length (`seq`) and the vocabulary size.
    pub seq: usize,
    pub vocab: usize,
}

impl Generator {
    /// Load a model's generation programs (`driver::compile_generate`, the
    /// model checked for one sequence: `micro_batch = 1`) with its logical
    /// weights `params` (parameter `k` into `w.k`).
    pub fn new(programs: Generation, params: &[Tensor<f32>]) -> Result<Generator, SampleError> {
        Generator::with_engine(programs, params, Engine::default())
    }

    /// [`Generator::new`], running fused kernels with `engine`.
    pub fn with_engine(programs: Generation, params: &[Tensor<f32>], engine: Engine) -> Result<Generator, SampleError> {
        let setup = |e: &dyn std::fmt::Display| SampleError::Setup(e.to_string());
        let window = Io::of(&programs.window)?;
        let step = programs.step.as_ref().ok().map(Io::of).transpose()?;
        let (tokens, logits) = (&programs.window.buffer(window.tokens).ty, &programs.window.buffer(window.logits).ty);
        let [batch, seq] = &tokens.dims[..] else {
            return Err(setup(&format!("`tokens` should be [batch, seq], found {tokens}")));
        };
        if logits.dims.len() != 3 || logits.dims[..2] != tokens.dims[..] {
            return Err(setup(&format!(
                "`logits` should be [batch, seq, vocab] for `tokens` {tokens}, found {logits}"
            )));
        }
        if batch.size != 1 {
            return Err(setup(&"generation runs one sequence: check the model with a microbatch of 1"));
        }
        let mut cpu = Cpu::with_engine(engine);
        cpu.alloc(programs.sizes()).map_err(|e| setup(&e))?;
        cpu.prepare(&programs.window).map_err(|e| setup(&e))?;
        if let Ok(p) = &programs.step {
            cpu.prepare(p).map_err(|e| setup(&e))?;
        }
        for (k, t) in params.iter().enumerate() {
            let w = Bound::Weight(k);
            let b = programs.window.bound(w).ok_or_else(|| setup(&format!("no weights `{}`", w.name())))?;
            cpu.upload(programs.window.buffer(b), &t.data).map_err(|e| setup(&e))?;
        }
        let (seq, vocab) = (seq.size as usize, logits.dims[2].size as usize);
        Ok(Generator { programs, cpu, window, step, seq, vocab })
    }

    /// Continue `prompt` by `cfg.tokens` tokens: with the KV cache when
    /// `cfg.kv_cache` and the model has a step program, else recomputing the window.
    pub fn generate(&mut self, prompt: &[u32], cfg: &SampleConfig) -> Result<Vec<u32>, SampleError> {
        if cfg.kv_cache && self.no_step().is_none() { cached(self, prompt, cfg) } else { recomputed(self, prompt, cfg) }
    }

    /// [`Generator::generate`] with the KV cache (an error for a model without a step program).
    pub fn generate_cached(&mut self, prompt: &[u32], cfg: &SampleConfig) -> Result<Vec<u32>, SampleError> {
        cached(self, prompt, cfg)
    }

    /// [`Generator::generate`] recomputing the window for every token.
    pub fn generate_window(&mut self, prompt: &[u32], cfg: &SampleConfig) -> Result<Vec<u32>, SampleError> {
        recomputed(self, prompt, cfg)
    }

    /// Why the model has no step program (`None`: it decodes with the KV cache).
    pub fn no_step(&self) -> Option<&str> {
        self.programs.step.as_ref().err().map(|s| s.as_str())
    }

    /// The logits after `context` (at most `seq` tokens): the window program
    /// over it, which also fills the KV cache for positions `0..context.len()`.
    pub fn window(&mut self, context: &[u32]) -> Result<Vec<f32>, SampleError> {
        let n = context.len();
        if n == 0 || n > self.seq {
            return Err(SampleError::Run(format!("a window of {n} tokens; the context holds 1 to {}", self.seq)));
        }
        let mut x = vec![0f32; self.seq];
        x.iter_mut().zip(context).for_each(|(x, &t)| *x = t as f32);
        run(&mut self.cpu, &self.programs.window, &self.window, &x, None, n - 1)
    }

    /// The logits after `context`, with the KV cache filled for its
    /// positions: by the window program, or, for a context much shorter
    /// than the window (an eighth or less), by decode steps from position 0,
    /// which compute only its positions where the window computes all `seq`.
    pub fn prefill(&mut self, context: &[u32]) -> Result<Vec<f32>, SampleError> {
        if self.no_step().is_some() || context.is_empty() || context.len() * 8 > self.seq {
            return self.window(context);
        }
        let mut last = Vec::new();
        for (pos, &t) in context.iter().enumerate() {
            last = self.step(t, pos)?;
        }
        Ok(last)
    }

    /// The logits after `token` at position `pos`, from the step program
    /// over the KV cache of positions `0..pos`.
    pub fn step(&mut self, token: u32, pos: usize) -> Result<Vec<f32>, SampleError> {
        let (Ok(p), Some(io)) = (&self.programs.step, &self.step) else {
            return Err(SampleError::Run(format!("no step program: {}", self.no_step().unwrap_or("?"))));
        };
        if pos >= self.seq {
            return Err(SampleError::Run(format!("position {pos} is past the context of {}", self.seq)));
        }
        run(&mut self.cpu, p, io, &[token as f32], Some(pos), 0)
    }
}

/// Run `p` on `tokens` (at `pos` for a step) and read row `row` of its
/// logits `[1, positions, vocab]` (only that row is copied out).
fn run(
    cpu: &mut Cpu,
    p: &Program,
    io: &Io,
    tokens: &[f32],
    pos: Option<usize>,
    row: usize,
) -> Result<Vec<f32>, SampleError> {
    let fail = |e: &dyn std::fmt::Display| SampleError::Run(e.to_string());
    cpu.upload(p.buffer(io.tokens), tokens).map_err(|e| fail(&e))?;
    if let (Some(b), Some(pos)) = (io.pos, pos) {
        cpu.upload(p.buffer(b), &[pos as f32]).map_err(|e| fail(&e))?;
    }
    backend::run(cpu, p, None, 0).map_err(|e| fail(&e))?;
    let logits = p.buffer(io.logits);
    let vocab = logits.ty.dims.last().cloned().ok_or_else(|| fail(&"logits without dims"))?;
    let one = Buffer {
        offset: logits.offset + row as u64 * vocab.size * logits.ty.dtype.bytes(),
        ty: TensorType::new(logits.ty.dtype, vec![vocab]),
        view_of: Some(io.logits),
        name: "logits".into(),
        ..logits.clone()
    };
    cpu.download(&one).map_err(|e| fail(&e))
}

/// Continue `prompt` by `cfg.tokens` tokens with a model's generation
/// programs and weights ([`Generator::new`]).
pub fn generate(
    programs: &Generation,
    params: &[Tensor<f32>],
    prompt: &[u32],
    cfg: &SampleConfig,
) -> Result<Vec<u32>, SampleError> {
    Generator::new(programs.clone(), params)?.generate(prompt, cfg)
}

/// The prompt, or a newline when it is empty.
fn start(prompt: &[u32]) -> Vec<u32> {
    if prompt.is_empty() { vec![u32::from(b'\n')] } else { prompt.to_vec() }
}

fn cached(g: &mut Generator, prompt: &[u32], cfg: &SampleConfig) -> Result<Vec<u32>, SampleError> {
    let seq = g.seq;
    let mut out = start(prompt);
    // Fill the cache from the context: all of it, or its last half once it is full.
    let refill = |g: &mut Generator, out: &[u32]| -> Result<(Vec<f32>, usize), SampleError> {
        let keep = if out.len() > seq { seq / 2 } else { seq };
        let context = &out[out.len().saturating_sub(keep)..];
        Ok((g.prefill(context)?, context.len()))
    };
    let (mut last, mut pos) = refill(g, &out)?;
    for step in 0..cfg.tokens {
        let next = pick(&last, cfg, step as u64) as u32;
        out.push(next);
        if step + 1 == cfg.tokens || cfg.stop == Some(next) {
            break;
        }
        if pos == seq {
            (last, pos) = refill(g, &out)?;
        } else {
            last = g.step(next, pos)?;
            pos += 1;
        }
    }
    Ok(out[prompt.len().max(1).min(out.len())..].to_vec())
}

fn recomputed(g: &mut Generator, prompt: &[u32], cfg: &SampleConfig) -> Result<Vec<u32>, SampleError> {
    let mut out = start(prompt);
    for step in 0..cfg.tokens {
        let last = g.window(&out[out.len().saturating_sub(g.seq)..])?;
        let next = pick(&last, cfg, step as u64) as u32;
        out.push(next);
        if cfg.stop == Some(next) {
            break;
        }
    }
    Ok(out[prompt.len().max(1).min(out.len())..].to_vec())
}

/// A model's forward program to one named value
/// (`driver::compile_forward`), loaded with its weights: what serves an
/// encoder's embeddings.
pub struct Forward {
    program: Program,
    cpu: Cpu,
    /// Model input `i`'s buffer (`None`: the value does not read it).
    inputs: Vec<Option<BufId>>,
    out: BufId,
}

impl Forward {
    /// Compile `m`'s forward program to its value `output` and load it with
    /// the logical weights `params` (parameter `k` into `w.k`).
    pub fn new(m: &tessera_compiler::Model, output: &str, params: &[Tensor<f32>]) -> Result<Forward, SampleError> {
        let setup = |e: &dyn std::fmt::Display| SampleError::Setup(e.to_string());
        let program =
            tessera_compiler::driver::compile_forward(m, output, Default::default()).map_err(|e| setup(&e))?;
        let out = program.bound(Bound::Output).ok_or_else(|| setup(&"the program has no `out` buffer"))?;
        let mut cpu = Cpu::with_engine(Engine::default());
        cpu.alloc(program.sizes).map_err(|e| setup(&e))?;
        cpu.prepare(&program).map_err(|e| setup(&e))?;
        for (k, t) in params.iter().enumerate() {
            if let Some(b) = program.bound(Bound::Weight(k)) {
                cpu.upload(program.buffer(b), &t.data).map_err(|e| setup(&e))?;
            }
        }
        let inputs = (0..m.inputs.len()).map(|i| program.bound(Bound::Input(i, 0))).collect();
        Ok(Forward { program, cpu, inputs, out })
    }

    /// The value for the model's inputs (ids and masks as f32, each the
    /// input's whole shape), as a tensor of its dims.
    pub fn run(&mut self, inputs: &[Tensor<f32>]) -> Result<Tensor<f32>, SampleError> {
        let fail = |e: &dyn std::fmt::Display| SampleError::Run(e.to_string());
        for (i, b) in self.inputs.iter().enumerate() {
            let Some(b) = b else { continue };
            let x = inputs.get(i).ok_or_else(|| fail(&format!("input {i} is missing")))?;
            let want = self.program.buffer(*b).ty.numel() as usize;
            if x.data.len() != want {
                return Err(fail(&format!("input {i} has {} values; the program takes {want}", x.data.len())));
            }
            self.cpu.upload(self.program.buffer(*b), &x.data).map_err(|e| fail(&e))?;
        }
        backend::run(&mut self.cpu, &self.program, None, 0).map_err(|e| fail(&e))?;
        let out = self.program.buffer(self.out);
        Ok(Tensor { dims: out.ty.dims.clone(), data: self.cpu.download(out).map_err(|e| fail(&e))? })
    }
}
