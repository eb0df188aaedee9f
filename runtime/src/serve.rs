//! The serving engine behind `tessera serve`: continuous batching over the
//! paged KV cache of a [`Decoder`].
//!
//! Requests wait in a queue; at every iteration the engine
//! 1. drops the requests whose client has gone (their blocks go back to the pool),
//! 2. admits waiting requests while the batch has room and the pool has the
//!    blocks of their prompts (first come, first served),
//! 3. prefills the admitted requests that are not yet decoding, oldest
//!    first, up to a budget of prompt tokens per iteration (so that a long
//!    prompt does not stall the batch: it goes on in the next iteration), and
//! 4. runs one decode step of every decoding request, each at its own
//!    position over its own blocks, and hands each its next token.
//!
//! A request leaves the batch at its end of sequence, a stop token, its
//! `max_tokens` or the context's end, and its blocks are freed at once. When a
//! decoding request needs a new block and the pool is empty, the request
//! admitted last is preempted: its blocks are freed and it waits at the head
//! of the queue to be prefilled again from its prompt and the tokens it has
//! generated (vLLM's recompute preemption); what it has sent stays sent.
//!
//! The engine knows tokens only: the HTTP layer tokenizes, renders chat
//! templates and detokenizes.

use crate::infer::{Decoder, Row, SampleConfig, pick};
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;

/// Why a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// The model's end of sequence or one of the request's stop tokens.
    Stop,
    /// `max_tokens`, or the end of the context.
    Length,
}

impl Finish {
    /// OpenAI's `finish_reason`.
    pub fn reason(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
        }
    }
}

/// What the engine tells a request's client.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The next generated token.
    Token(u32),
    /// The request is done (no more events follow).
    Done(Finish),
    /// The request failed (no more events follow).
    Failed(String),
}

/// Where a request's events go. A client that has gone (a closed sink)
/// cancels its request, which frees its blocks.
pub trait Sink: Send {
    /// Deliver `e`; `false` when the client has gone.
    fn send(&mut self, e: Event) -> bool;
    /// Whether the client is still there.
    fn is_open(&self) -> bool;
}

impl Sink for mpsc::Sender<Event> {
    fn send(&mut self, e: Event) -> bool {
        mpsc::Sender::send(self, e).is_ok()
    }

    fn is_open(&self) -> bool {
        true
    }
}

/// One generation request.
pub struct Request {
    pub prompt: Vec<u32>,
    /// Tokens to generate at most (the context's end comes first if nearer).
    pub max_tokens: usize,
    /// Sampling (its `tokens`, `kv_cache` and `stop` are not read).
    pub sampling: SampleConfig,
    /// Tokens that end the request (the model's end of sequence among them).
    pub stop: Vec<u32>,
    pub sink: Box<dyn Sink>,
}

/// The engine's limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Requests in the running batch at once (`infer.max_batch`).
    pub max_batch: usize,
    /// Positions of one sequence, prompt and generated (`infer.max_len`).
    pub max_len: usize,
    /// Requests waiting beyond the batch before new ones are refused.
    pub max_queue: usize,
}

/// Why a request is refused before it is queued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// The request cannot fit the context (an HTTP 400).
    TooLong(String),
    /// The queue is full (an HTTP 429).
    Busy(String),
    /// The engine has stopped (an HTTP 503).
    Stopped,
}

/// The handle through which requests reach a running engine.
#[derive(Clone)]
pub struct Handle {
    tx: mpsc::Sender<Request>,
    /// Requests queued or running.
    load: Arc<AtomicUsize>,
    pub limits: Limits,
}

impl Handle {
    /// Queue `r`, or refuse it: too long for the context, or the queue full.
    pub fn submit(&self, r: Request) -> Result<(), Refused> {
        let asked = r.prompt.len() + r.max_tokens;
        if r.prompt.is_empty() {
            return Err(Refused::TooLong("the prompt is empty; give at least one token".into()));
        }
        if asked > self.limits.max_len {
            return Err(Refused::TooLong(format!(
                "This model's maximum context length is {} tokens. However, you requested {asked} tokens ({} in the \
                 prompt, {} in the completion). Please reduce the length of the prompt or of max_tokens.",
                self.limits.max_len,
                r.prompt.len(),
                r.max_tokens
            )));
        }
        let room = self.limits.max_batch + self.limits.max_queue;
        if self.load.fetch_add(1, Ordering::SeqCst) >= room {
            self.load.fetch_sub(1, Ordering::SeqCst);
            return Err(Refused::Busy(format!(
                "the server is full: {} requests run and {} wait; retry later",
                self.limits.max_batch, self.limits.max_queue
            )));
        }
        self.tx.send(r).map_err(|_| {
            self.load.fetch_sub(1, Ordering::SeqCst);
            Refused::Stopped
        })
    }

    /// Requests queued or running now.
    pub fn load(&self) -> usize {
        self.load.load(Ordering::SeqCst)
    }
}

/// A request in the engine.
struct Seq {
    r: Request,
    /// The prompt and what has been generated.
    tokens: Vec<u32>,
    generated: usize,
    /// Positions whose keys and values are in the cache.
    cached: usize,
    table: Vec<u32>,
    /// The logits after the last cached token, once it is fully prefilled.
    next: Option<Vec<f32>>,
}

impl Seq {
    fn prefilled(&self) -> bool {
        self.cached == self.tokens.len()
    }
}

/// What one iteration did (for the statistics and tests).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tick {
    pub prefilled: usize,
    pub decoded: usize,
    pub preempted: usize,
    /// Requests dropped because their client had gone.
    pub cancelled: usize,
}

/// The engine: a decoder, its free blocks, the queue and the running batch.
pub struct Engine {
    decoder: Decoder,
    limits: Limits,
    block: usize,
    free: Vec<u32>,
    waiting: VecDeque<Seq>,
    running: Vec<Seq>,
    rx: mpsc::Receiver<Request>,
    load: Arc<AtomicUsize>,
    /// Prompt tokens prefilled per iteration at most (a longer prompt goes
    /// on over several iterations, so that the batch keeps decoding).
    chunk: usize,
}

impl Engine {
    /// An engine over `decoder` (which must have a KV cache) and its handle.
    pub fn new(decoder: Decoder, limits: Limits) -> Result<(Engine, Handle), String> {
        let paging = decoder.paging().ok_or_else(|| {
            format!("serving needs a KV cache, and this model has none: {}", decoder.no_cache().unwrap_or("?"))
        })?;
        let per_seq = paging.positions() as usize;
        if limits.max_len > per_seq {
            return Err(format!(
                "max_len {} is longer than the {per_seq} positions a sequence's block table holds",
                limits.max_len
            ));
        }
        let table = limits.max_len.div_ceil(paging.block as usize);
        if (paging.blocks as usize) < table {
            return Err(format!(
                "the KV cache's {} blocks of {} positions cannot hold one sequence of max_len {}",
                paging.blocks, paging.block, limits.max_len
            ));
        }
        if limits.max_batch == 0 || limits.max_batch > decoder.max_batch() {
            return Err(format!(
                "max_batch {} needs decode steps of that many sequences; the decoder has up to {}",
                limits.max_batch,
                decoder.max_batch()
            ));
        }
        let (tx, rx) = mpsc::channel();
        let load = Arc::new(AtomicUsize::new(0));
        let engine = Engine {
            block: paging.block as usize,
            free: (0..paging.blocks as u32).rev().collect(),
            decoder,
            limits,
            waiting: VecDeque::new(),
            running: Vec::new(),
            rx,
            load: load.clone(),
            chunk: 256,
        };
        Ok((engine, Handle { tx, load, limits }))
    }

    /// Serve until every handle is dropped and no request is left.
    pub fn run(mut self) {
        while self.receive() {
            let t = self.tick();
            if t.cancelled > 0 {
                eprintln!("cancelled {} request(s): the client has gone", t.cancelled);
            }
        }
    }

    /// Take the requests that have arrived into the queue, waiting for one
    /// when there is nothing to do; `false` once every handle is dropped and
    /// nothing is left to do.
    pub fn receive(&mut self) -> bool {
        if self.idle() {
            match self.rx.recv() {
                Ok(r) => self.queue(r),
                Err(_) => return false,
            }
        }
        while let Ok(r) = self.rx.try_recv() {
            self.queue(r);
        }
        true
    }

    fn queue(&mut self, r: Request) {
        self.waiting.push_back(Seq {
            tokens: r.prompt.clone(),
            r,
            generated: 0,
            cached: 0,
            table: Vec::new(),
            next: None,
        });
    }

    /// Whether no request is queued or running.
    pub fn idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    /// Requests running and waiting.
    pub fn counts(&self) -> (usize, usize) {
        (self.running.len(), self.waiting.len())
    }

    /// Blocks in the pool that no sequence holds.
    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }

    /// One iteration: drop the gone, admit, prefill a chunk, decode a step.
    pub fn tick(&mut self) -> Tick {
        let mut t = Tick { cancelled: self.drop_gone(), ..Tick::default() };
        self.admit();
        // Prefill, oldest first, up to the iteration's budget of prompt tokens
        // (a longer prompt goes on in the next iteration).
        let mut budget = self.chunk;
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let s = &mut self.running[i];
            if s.prefilled() {
                i += 1;
                continue;
            }
            let n = (s.tokens.len() - s.cached).min(budget);
            match self.decoder.prefill(&s.tokens[s.cached..s.cached + n], s.cached, &s.table) {
                Ok(logits) => {
                    s.cached += n;
                    if s.prefilled() {
                        s.next = Some(logits);
                    }
                    t.prefilled += n;
                    budget -= n;
                    i += 1;
                }
                Err(e) => self.fail(i, e.to_string()),
            }
        }
        // Sample each prefilled sequence's next token.
        let mut i = 0;
        while i < self.running.len() {
            if let Some(logits) = self.running[i].next.take()
                && let Some(end) = self.emit(i, &logits)
            {
                self.finish(i, end);
                continue;
            }
            i += 1;
        }
        t.preempted = self.make_room();
        // Decode: every sequence whose last token is not cached yet.
        let ready: Vec<usize> =
            (0..self.running.len()).filter(|&i| self.running[i].cached + 1 == self.running[i].tokens.len()).collect();
        if !ready.is_empty() {
            let rows: Vec<Row> = ready
                .iter()
                .map(|&i| {
                    let s = &self.running[i];
                    Row { token: *s.tokens.last().expect("a token"), pos: s.cached, table: &s.table }
                })
                .collect();
            match self.decoder.step(&rows) {
                Ok(logits) => {
                    t.decoded = ready.len();
                    for (&i, l) in ready.iter().zip(logits) {
                        self.running[i].cached += 1;
                        self.running[i].next = Some(l);
                    }
                }
                Err(e) => {
                    for &i in ready.iter().rev() {
                        self.fail(i, e.to_string());
                    }
                }
            }
        }
        t
    }

    /// Hand sequence `i` the token its logits pick; why it ends, if it does.
    fn emit(&mut self, i: usize, logits: &[f32]) -> Option<Finish> {
        let s = &mut self.running[i];
        let token = pick(logits, &s.r.sampling, s.generated as u64) as u32;
        s.tokens.push(token);
        s.generated += 1;
        if !s.r.sink.send(Event::Token(token)) {
            return Some(Finish::Stop);
        }
        if s.r.stop.contains(&token) {
            Some(Finish::Stop)
        } else if s.generated >= s.r.max_tokens || s.tokens.len() >= self.limits.max_len {
            Some(Finish::Length)
        } else {
            None
        }
    }

    fn finish(&mut self, i: usize, end: Finish) {
        let mut s = self.running.remove(i);
        s.r.sink.send(Event::Done(end));
        self.release(&mut s);
    }

    fn fail(&mut self, i: usize, e: String) {
        let mut s = self.running.remove(i);
        s.r.sink.send(Event::Failed(e));
        self.release(&mut s);
    }

    fn release(&mut self, s: &mut Seq) {
        self.free.append(&mut s.table);
        self.load.fetch_sub(1, Ordering::SeqCst);
    }

    /// Cancel the requests whose client has gone (a closed sink); how many.
    fn drop_gone(&mut self) -> usize {
        let mut gone = Vec::new();
        for (i, s) in self.running.iter().enumerate() {
            if !s.r.sink.is_open() {
                gone.push(i);
            }
        }
        let mut n = gone.len();
        for i in gone.into_iter().rev() {
            let mut s = self.running.remove(i);
            self.release(&mut s);
        }
        let waiting = std::mem::take(&mut self.waiting);
        for mut s in waiting {
            if s.r.sink.is_open() {
                self.waiting.push_back(s);
            } else {
                self.release(&mut s);
                n += 1;
            }
        }
        n
    }

    /// Admit waiting sequences, first come first served, while the batch has
    /// room and the pool holds the blocks of their prompts (and the next token).
    fn admit(&mut self) {
        while self.running.len() < self.limits.max_batch {
            let Some(s) = self.waiting.front() else { break };
            let need = (s.tokens.len() + 1).div_ceil(self.block);
            if need > self.free.len() {
                break;
            }
            let mut s = self.waiting.pop_front().expect("a front");
            s.table = self.free.split_off(self.free.len() - need);
            self.running.push(s);
        }
    }

    /// Give every decoding sequence the block its next position needs,
    /// preempting the sequence admitted last while the pool is empty.
    fn make_room(&mut self) -> usize {
        let mut preempted = 0;
        let mut i = 0;
        while i < self.running.len() {
            let s = &self.running[i];
            let needs = s.cached + 1 == s.tokens.len() && s.cached >= s.table.len() * self.block;
            if !needs {
                i += 1;
                continue;
            }
            if let Some(b) = self.free.pop() {
                self.running[i].table.push(b);
                i += 1;
                continue;
            }
            // Recompute preemption: the last admitted goes back to the queue's head.
            let mut last = self.running.pop().expect("a running sequence");
            self.free.append(&mut last.table);
            last.cached = 0;
            last.next = None;
            self.waiting.push_front(last);
            preempted += 1;
        }
        preempted
    }
}
