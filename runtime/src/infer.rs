//! Generation from a language model, on the lowered generation programs
//! (`driver::compile_generate`) and the CPU backend: what runs here is the
//! programs, never the checked model.
//!
//! The programs share one allocation (the weights and the paged KV cache):
//! - the **window** program runs the forward pass over a whole context
//!   (left-aligned, the rest padding; causal attention ignores what follows
//!   the last real token), without a cache;
//! - **prefill** programs run a chunk of one sequence's positions from its
//!   run-time position, writing their keys and values into the cache
//!   blocks its block table names;
//! - **decode steps** run one position of each sequence of a batch, each at
//!   its own position over its own blocks.
//!
//! [`Decoder`] runs them for any set of sequences (what `tessera serve`
//! batches); [`Generator`] decodes one sequence (`tessera sample`): the
//! prompt is prefilled, then each new token is one step; when the context
//! is full, the cache restarts from the last half of it. Without the cache
//! (`--no-kv-cache`, or a model whose logits mix positions, which has no
//! paged programs), every token reruns the window. Greedy decoding gives the
//! same tokens both ways (`tests/train.rs`).

use crate::backend::{
    self, Backend,
    cpu::{Cpu, Engine},
};
use crate::exec::kernels::uniform;
use crate::tensor::Tensor;
use tessera_compiler::driver::Generation;
use tessera_compiler::ir::TensorType;
use tessera_compiler::lower::{Bound, BufId, Buffer, Paging, Program};

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

/// A program's io buffers, and the sequences and positions it runs.
struct Io {
    tokens: BufId,
    logits: BufId,
    pos: Option<BufId>,
    blocks: Option<BufId>,
    batch: usize,
    positions: usize,
}

impl Io {
    fn of(p: &Program) -> Result<Io, SampleError> {
        let get = |b: Bound| {
            p.bound(b).ok_or_else(|| SampleError::Setup(format!("the program has no `{}` buffer", b.name())))
        };
        let tokens = get(Bound::Tokens)?;
        let logits = get(Bound::Logits)?;
        let (t, l) = (&p.buffer(tokens).ty, &p.buffer(logits).ty);
        let [batch, positions] = &t.dims[..] else {
            return Err(SampleError::Setup(format!("`tokens` should be [batch, seq], found {t}")));
        };
        if l.dims.len() != 3 || l.dims[..2] != t.dims[..] {
            return Err(SampleError::Setup(format!(
                "`logits` should be [batch, seq, vocab] for `tokens` {t}, found {l}"
            )));
        }
        Ok(Io {
            tokens,
            logits,
            pos: p.bound(Bound::Pos),
            blocks: p.bound(Bound::Blocks),
            batch: batch.size as usize,
            positions: positions.size as usize,
        })
    }
}

/// One sequence of a decode step: its next token, that token's position,
/// and its block table (the cache blocks of its positions, in order).
#[derive(Debug, Clone, Copy)]
pub struct Row<'a> {
    pub token: u32,
    pub pos: usize,
    pub table: &'a [u32],
}

/// A model's generation programs loaded with its weights: the window, and
/// over one paged KV cache the prefills and the decode steps of any batch
/// up to the largest compiled. Which cache blocks each sequence holds is
/// the caller's to decide (a block table per sequence).
pub struct Decoder {
    programs: Generation,
    cpu: Cpu,
    window: Io,
    prefill: Vec<Io>,
    steps: Vec<Io>,
    /// The window (`seq`) and the vocabulary size.
    pub seq: usize,
    pub vocab: usize,
}

impl Decoder {
    /// Load a model's generation programs with its logical weights `params`
    /// (parameter `k` into `w.k`), fused kernels run by `engine`.
    pub fn new(programs: Generation, params: &[Tensor<f32>], engine: Engine) -> Result<Decoder, SampleError> {
        let setup = |e: &dyn std::fmt::Display| SampleError::Setup(e.to_string());
        let window = Io::of(&programs.window)?;
        if window.batch != 1 {
            return Err(setup(&"the window runs one sequence: check the model with a microbatch of 1"));
        }
        let (prefill, steps) = match &programs.paged {
            Ok(p) => (
                p.prefill.iter().map(|(_, p)| Io::of(p)).collect::<Result<Vec<_>, _>>()?,
                p.steps.iter().map(|(_, p)| Io::of(p)).collect::<Result<Vec<_>, _>>()?,
            ),
            Err(_) => (Vec::new(), Vec::new()),
        };
        let mut cpu = Cpu::with_engine(engine);
        cpu.alloc(programs.sizes()).map_err(|e| setup(&e))?;
        for p in programs.programs() {
            cpu.prepare(p).map_err(|e| setup(&e))?;
        }
        for (k, t) in params.iter().enumerate() {
            let w = Bound::Weight(k);
            let b = programs.window.bound(w).ok_or_else(|| setup(&format!("no weights `{}`", w.name())))?;
            cpu.upload(programs.window.buffer(b), &t.data).map_err(|e| setup(&e))?;
        }
        let l = &programs.window.buffer(window.logits).ty;
        let (seq, vocab) = (window.positions, l.dims[2].size as usize);
        Ok(Decoder { programs, cpu, window, prefill, steps, seq, vocab })
    }

    /// Why the model has no KV cache (`None`: it has one).
    pub fn no_cache(&self) -> Option<&str> {
        self.programs.paged.as_ref().err().map(|s| s.as_str())
    }

    /// The cache's layout (`None`: no cache).
    pub fn paging(&self) -> Option<Paging> {
        self.programs.paged.as_ref().ok().map(|p| p.paging)
    }

    /// The most sequences one decode step runs.
    pub fn max_batch(&self) -> usize {
        self.steps.last().map_or(0, |s| s.batch)
    }

    /// The logits after `context` (at most `seq` tokens): the window program over it.
    pub fn window(&mut self, context: &[u32]) -> Result<Vec<f32>, SampleError> {
        let n = context.len();
        if n == 0 || n > self.seq {
            return Err(SampleError::Run(format!("a window of {n} tokens; the context holds 1 to {}", self.seq)));
        }
        let mut x = vec![0f32; self.seq];
        x.iter_mut().zip(context).for_each(|(x, &t)| *x = t as f32);
        let p = &self.programs.window;
        run(&mut self.cpu, p, &self.window, &x, None)?;
        read_rows(&mut self.cpu, p, &self.window, n - 1, 1).map(|mut r| r.remove(0))
    }

    /// Write the keys and values of `tokens` at positions `start..` of a
    /// sequence into the cache blocks its `table` names (which must cover
    /// them), and return the logits after the last: the prefill programs in
    /// chunks, the longest that fits the tokens left, the last one padded.
    pub fn prefill(&mut self, tokens: &[u32], start: usize, table: &[u32]) -> Result<Vec<f32>, SampleError> {
        let Ok(paged) = &self.programs.paged else {
            return Err(SampleError::Run(format!("no KV cache: {}", self.no_cache().unwrap_or("?"))));
        };
        let end = start + tokens.len();
        if tokens.is_empty() || end > table.len() * paged.paging.block as usize {
            return Err(SampleError::Run(format!(
                "a prefill of positions {start}..{end} past the {} its {} blocks hold",
                table.len() * paged.paging.block as usize,
                table.len()
            )));
        }
        let blocks = table_row(table, paged.paging.table as usize)?;
        let mut last = Vec::new();
        let mut done = 0;
        while done < tokens.len() {
            let left = tokens.len() - done;
            let fits = self.prefill.iter().rposition(|io| io.positions <= left);
            let k = fits.unwrap_or_else(|| self.prefill.iter().position(|io| io.positions >= left).unwrap_or(0));
            let (io, p) = (&self.prefill[k], &paged.prefill[k].1);
            let n = io.positions.min(left);
            let mut x = vec![0f32; io.positions];
            x.iter_mut().zip(&tokens[done..done + n]).for_each(|(x, &t)| *x = t as f32);
            run(&mut self.cpu, p, io, &x, Some((&[(start + done) as f32], &blocks)))?;
            done += n;
            if done == tokens.len() {
                last = read_rows(&mut self.cpu, p, io, n - 1, 1)?.remove(0);
            }
        }
        Ok(last)
    }

    /// One decode step of each row's sequence: its token's keys and values
    /// into its cache at its position, and the logits after it, in order.
    /// Runs the smallest step program that holds the rows (idle rows
    /// padded), several when they are more than the largest holds.
    pub fn step(&mut self, rows: &[Row]) -> Result<Vec<Vec<f32>>, SampleError> {
        let Ok(paged) = &self.programs.paged else {
            return Err(SampleError::Run(format!("no KV cache: {}", self.no_cache().unwrap_or("?"))));
        };
        let block = paged.paging.block as usize;
        let per = paged.paging.table as usize;
        let mut out = Vec::with_capacity(rows.len());
        for group in rows.chunks(self.max_batch().max(1)) {
            let k = self.steps.iter().position(|io| io.batch >= group.len()).unwrap_or(self.steps.len() - 1);
            let (io, p) = (&self.steps[k], &paged.steps[k].1);
            let mut x = vec![0f32; io.batch];
            let mut pos = vec![-1f32; io.batch];
            let mut blocks = vec![-1f32; io.batch * per];
            for (b, r) in group.iter().enumerate() {
                if r.pos >= r.table.len() * block {
                    return Err(SampleError::Run(format!(
                        "position {} is past the {} positions its {} cache blocks hold",
                        r.pos,
                        r.table.len() * block,
                        r.table.len()
                    )));
                }
                x[b] = r.token as f32;
                pos[b] = r.pos as f32;
                blocks[b * per..(b + 1) * per].copy_from_slice(&table_row(r.table, per)?);
            }
            run(&mut self.cpu, p, io, &x, Some((&pos, &blocks)))?;
            out.extend(read_rows(&mut self.cpu, p, io, 0, group.len())?);
        }
        Ok(out)
    }
}

/// A block table as a program's row of `per` entries (-1 past its blocks).
fn table_row(table: &[u32], per: usize) -> Result<Vec<f32>, SampleError> {
    if table.len() > per {
        return Err(SampleError::Run(format!(
            "a block table of {} blocks; the cache holds {per} per sequence",
            table.len()
        )));
    }
    let mut row = vec![-1f32; per];
    row.iter_mut().zip(table).for_each(|(r, &b)| *r = b as f32);
    Ok(row)
}

/// Run `p` on `tokens`, with the positions and block tables of a paged program.
fn run(
    cpu: &mut Cpu,
    p: &Program,
    io: &Io,
    tokens: &[f32],
    paged: Option<(&[f32], &[f32])>,
) -> Result<(), SampleError> {
    let fail = |e: &dyn std::fmt::Display| SampleError::Run(e.to_string());
    cpu.upload(p.buffer(io.tokens), tokens).map_err(|e| fail(&e))?;
    if let (Some(pb), Some(bb), Some((pos, blocks))) = (io.pos, io.blocks, paged) {
        cpu.upload(p.buffer(pb), pos).map_err(|e| fail(&e))?;
        cpu.upload(p.buffer(bb), blocks).map_err(|e| fail(&e))?;
    }
    backend::run(cpu, p, None, 0).map(|_| ()).map_err(|e| fail(&e))
}

/// Rows `first..first + count` of `p`'s logits `[batch, positions, vocab]`
/// taken flat (only those rows are copied out).
fn read_rows(cpu: &mut Cpu, p: &Program, io: &Io, first: usize, count: usize) -> Result<Vec<Vec<f32>>, SampleError> {
    let fail = |e: &dyn std::fmt::Display| SampleError::Run(e.to_string());
    let logits = p.buffer(io.logits);
    let vocab = logits.ty.dims.last().cloned().ok_or_else(|| fail(&"logits without dims"))?;
    let rows = Buffer {
        offset: logits.offset + first as u64 * vocab.size * logits.ty.dtype.bytes(),
        ty: TensorType::new(logits.ty.dtype, vec![tessera_compiler::ir::Dim::new("row", count as u64), vocab.clone()]),
        view_of: Some(io.logits),
        name: "logits".into(),
        ..logits.clone()
    };
    let flat = cpu.download(&rows).map_err(|e| fail(&e))?;
    Ok(flat.chunks(vocab.size as usize).map(<[f32]>::to_vec).collect())
}

/// One sequence's generation (`tessera sample`, the generated code): a
/// [`Decoder`] whose single sequence holds every cache block.
pub struct Generator {
    decoder: Decoder,
    table: Vec<u32>,
    /// Positions whose keys and values the cache holds (`0..cached`).
    cached: usize,
    /// The context length (`seq`) and the vocabulary size.
    pub seq: usize,
    pub vocab: usize,
}

impl Generator {
    /// Load a model's generation programs (`driver::compile_generate` of the
    /// model checked for one sequence, `micro_batch = 1`) with its logical
    /// weights `params` (parameter `k` into `w.k`).
    pub fn new(programs: Generation, params: &[Tensor<f32>]) -> Result<Generator, SampleError> {
        Generator::with_engine(programs, params, Engine::default())
    }

    /// [`Generator::new`], running fused kernels with `engine`.
    pub fn with_engine(programs: Generation, params: &[Tensor<f32>], engine: Engine) -> Result<Generator, SampleError> {
        let decoder = Decoder::new(programs, params, engine)?;
        let table = decoder.paging().map_or(0, |p| p.table.min(p.blocks)) as u32;
        let (seq, vocab) = (decoder.seq, decoder.vocab);
        Ok(Generator { decoder, table: (0..table).collect(), cached: 0, seq, vocab })
    }

    /// Continue `prompt` by `cfg.tokens` tokens: with the KV cache when
    /// `cfg.kv_cache` and the model has one, else recomputing the window.
    pub fn generate(&mut self, prompt: &[u32], cfg: &SampleConfig) -> Result<Vec<u32>, SampleError> {
        if cfg.kv_cache && self.no_step().is_none() { cached(self, prompt, cfg) } else { recomputed(self, prompt, cfg) }
    }

    /// [`Generator::generate`] with the KV cache (an error for a model without one).
    pub fn generate_cached(&mut self, prompt: &[u32], cfg: &SampleConfig) -> Result<Vec<u32>, SampleError> {
        cached(self, prompt, cfg)
    }

    /// [`Generator::generate`] recomputing the window for every token.
    pub fn generate_window(&mut self, prompt: &[u32], cfg: &SampleConfig) -> Result<Vec<u32>, SampleError> {
        recomputed(self, prompt, cfg)
    }

    /// Why the model has no KV cache (`None`: it decodes with one).
    pub fn no_step(&self) -> Option<&str> {
        self.decoder.no_cache()
    }

    /// The logits after `context` (at most `seq` tokens), by the window
    /// program, which leaves the KV cache as it was.
    pub fn window(&mut self, context: &[u32]) -> Result<Vec<f32>, SampleError> {
        self.decoder.window(context)
    }

    /// The logits after `context` (at most `seq` tokens), with the KV cache
    /// filled for its positions `0..context.len()`.
    pub fn prefill(&mut self, context: &[u32]) -> Result<Vec<f32>, SampleError> {
        if context.len() > self.seq {
            return Err(SampleError::Run(format!(
                "a context of {} tokens; the window holds {}",
                context.len(),
                self.seq
            )));
        }
        self.cached = 0;
        let logits = self.decoder.prefill(context, 0, &self.table)?;
        self.cached = context.len();
        Ok(logits)
    }

    /// The logits after `token` at position `pos`, from a decode step over
    /// the KV cache of positions `0..pos` (which [`Generator::prefill`] and
    /// the steps before filled: `pos` is the next position).
    pub fn step(&mut self, token: u32, pos: usize) -> Result<Vec<f32>, SampleError> {
        if pos >= self.seq {
            return Err(SampleError::Run(format!("position {pos} is past the context of {}", self.seq)));
        }
        if pos != self.cached {
            return Err(SampleError::Run(format!(
                "a step at position {pos}, but the KV cache holds positions 0..{}: prefill the context first \
                 and step one position at a time",
                self.cached
            )));
        }
        let logits = self.decoder.step(&[Row { token, pos, table: &self.table }])?.remove(0);
        self.cached += 1;
        Ok(logits)
    }
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
