//! `tessera serve`: an OpenAI-compatible HTTP server (axum on tokio) over
//! the serving engine (`runtime::serve`: continuous batching over the paged
//! KV cache).
//!
//! - `GET /v1/models`;
//! - `POST /v1/completions` and `POST /v1/chat/completions` (the model's chat
//!   template), whole or streamed as server-sent events (`stream: true`,
//!   ending with `data: [DONE]`);
//! - `POST /v1/embeddings`, for a model with an `embedding` output (an encoder);
//! - `GET /health`.
//!
//! Errors are OpenAI's JSON (`{"error": {"message", "type", "param", "code"}}`):
//! 400 for a request that cannot be served (too long, a bad field), 404 for
//! another model's name, 429 when the queue is full, 503 once the engine has
//! stopped. The engine runs on its own thread; each request's tokens come
//! back through a channel, and a client that disconnects drops the channel,
//! which cancels the request and frees its blocks.

use super::Loaded;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use tessera_runtime::infer::{Decoder, Forward, SampleConfig};
use tessera_runtime::serve::{Engine, Event, Finish, Handle, Limits, Refused, Request, Sink};
use tessera_runtime::train::tokenizer::{ChatTemplate, Tokenizer};
use tokio::sync::mpsc;

/// `tessera serve`'s options (those not given come from the spec's `infer` section).
pub struct ServeArgs {
    pub host: String,
    pub port: u16,
    pub name: Option<String>,
    pub max_batch: Option<u64>,
    pub max_len: Option<u64>,
    pub num_blocks: Option<u64>,
    pub max_queue: Option<usize>,
}

/// What the handlers share.
struct Served {
    name: String,
    created: u64,
    tok: Tokenizer,
    template: Option<ChatTemplate>,
    /// The spec's sampling (a request's fields override it).
    sampling: SampleConfig,
    eos: Option<u32>,
    /// The generation engine (`None`: the model has no `logits` to generate from).
    engine: Option<Handle>,
    /// The encoder (`None`: the model has no `embedding` output).
    embed: Option<Embedder>,
}

/// An encoder's forward program to its `embedding`, one text at a time.
struct Embedder {
    forward: Mutex<Forward>,
    inputs: Vec<(String, Vec<tessera_compiler::ir::Dim>)>,
    seq: usize,
}

/// Load, build the engine, and serve until interrupted.
pub fn serve(loaded: Loaded, template: Option<ChatTemplate>, a: ServeArgs) -> ExitCode {
    let fail = |e: &dyn std::fmt::Display| {
        eprintln!("error: {e}");
        ExitCode::from(1)
    };
    let m = &loaded.m;
    let infer = m.infer.clone();
    let seq = m.inputs.iter().find(|x| x.name == "tokens").and_then(|x| x.ty.dims.last()).map_or(0, |d| d.size);
    let max_batch = a.max_batch.or(infer.as_ref().map(|i| i.max_batch)).unwrap_or(1).max(1);
    let max_len = a.max_len.or(infer.as_ref().map(|i| i.max_len).filter(|&l| l > 0)).unwrap_or(seq).max(1);
    let block = match infer.as_ref().map(|i| &i.kv_cache) {
        Some(tessera_compiler::config::KvCache::Paged { block }) => *block,
        Some(tessera_compiler::config::KvCache::Contiguous) => max_len,
        None => 16,
    };
    let mut paging = tessera_compiler::lower::Paging::new(block, max_len, max_batch);
    if let Some(n) = a.num_blocks {
        paging.blocks = n;
    }
    let encoder = m.graph.output("embedding").is_some();
    let engine = if m.graph.output("logits").is_some() {
        match build_engine(&loaded, paging, max_batch, max_len, seq, a.max_queue, encoder) {
            Ok(h) => h,
            Err(code) => return code,
        }
    } else {
        None
    };
    let embed = if encoder {
        match Forward::new(m, "embedding", &loaded.params) {
            Ok(f) => Some(Embedder {
                forward: Mutex::new(f),
                inputs: m.inputs.iter().map(|x| (x.name.clone(), x.ty.dims.clone())).collect(),
                seq: seq as usize,
            }),
            Err(e) => return fail(&e),
        }
    } else {
        None
    };
    if engine.is_none() && embed.is_none() {
        return fail(&format!(
            "`{}` has neither `logits` to generate from nor an `embedding` to serve; name one of its outputs so",
            m.name
        ));
    }
    let created = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let served = Arc::new(Served {
        name: a.name.clone().unwrap_or_else(|| m.name.clone()),
        created,
        eos: loaded.tok.eos(),
        tok: loaded.tok,
        template,
        sampling: SampleConfig::of_spec(infer.as_ref()),
        engine,
        embed,
    });
    let app = Router::new()
        .route("/health", get(|| async { "ok" }))
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/embeddings", post(embeddings))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "not_found_error", "no such route; see /v1/models") })
        .with_state(served.clone());
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(r) => r,
        Err(e) => return fail(&e),
    };
    runtime.block_on(async move {
        let listener = match tokio::net::TcpListener::bind((a.host.as_str(), a.port)).await {
            Ok(l) => l,
            Err(e) => return fail(&format!("cannot listen on {}:{}: {e}", a.host, a.port)),
        };
        let addr = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
        if let Some(h) = &served.engine {
            eprintln!(
                "serving `{}`: up to {} sequences of {} positions, KV cache of {} blocks of {} positions",
                served.name, h.limits.max_batch, h.limits.max_len, paging.blocks, paging.block
            );
        }
        eprintln!("listening on http://{addr}");
        let shutdown = async {
            let _ = tokio::signal::ctrl_c().await;
        };
        match axum::serve(listener, app).with_graceful_shutdown(shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&e),
        }
    })
}

/// The decoder for batches up to `max_batch` (the model checked for each
/// power of two up to it, and for it) and the engine on its own thread.
fn build_engine(
    loaded: &Loaded,
    paging: tessera_compiler::lower::Paging,
    max_batch: u64,
    max_len: u64,
    seq: u64,
    max_queue: Option<usize>,
    encoder: bool,
) -> Result<Option<Handle>, ExitCode> {
    let fail = |e: &dyn std::fmt::Display| {
        eprintln!("error: {e}");
        ExitCode::from(1)
    };
    let mut batches: Vec<u64> = (0..).map(|k| 1u64 << k).take_while(|&b| b < max_batch).collect();
    batches.push(max_batch);
    let mut models = vec![loaded.m.clone()];
    for &b in batches.iter().skip(1) {
        models.push(loaded.with_batch(b)?);
    }
    let programs = match tessera_compiler::driver::compile_generate(&models, paging, Default::default()) {
        Ok(p) => p,
        Err(e) if encoder => {
            eprintln!("note: `{}` serves embeddings only; its logits cannot be generated from: {e}", loaded.m.name);
            return Ok(None);
        }
        Err(e) => return Err(fail(&e)),
    };
    match &programs.paged {
        // An encoder's logits (a masked language model's) mix positions: it serves embeddings only.
        Err(why) if encoder => {
            eprintln!("note: `{}` serves embeddings only; its logits cannot be decoded: {why}", loaded.m.name);
            return Ok(None);
        }
        Err(why) => return Err(fail(&format!("`{}` cannot be served: it has no KV cache: {why}", loaded.m.name))),
        Ok(_) => {}
    }
    if let Ok(p) = &programs.paged {
        // A position table has rows for the window only.
        let table = p.prefill.iter().flat_map(|(_, p)| &p.instrs).any(|i| i.kind.name() == "rows_at");
        if table && max_len > seq {
            return Err(fail(&format!(
                "max_len {max_len} is longer than the {seq} positions of `{}`'s position table; serve with \
                 --max-len {seq} or less",
                loaded.m.name
            )));
        }
    }
    let decoder = Decoder::new(programs, &loaded.params, Default::default()).map_err(|e| fail(&e))?;
    let limits = Limits {
        max_batch: max_batch as usize,
        max_len: max_len as usize,
        max_queue: max_queue.unwrap_or(4 * max_batch as usize),
    };
    let (engine, handle) = Engine::new(decoder, limits).map_err(|e| fail(&e))?;
    std::thread::Builder::new().name("engine".into()).spawn(move || engine.run()).map_err(|e| fail(&e))?;
    Ok(Some(handle))
}

/// A request's events, into the tokio side.
struct Channel(mpsc::UnboundedSender<Event>);

impl Sink for Channel {
    fn send(&mut self, e: Event) -> bool {
        self.0.send(e).is_ok()
    }

    fn is_open(&self) -> bool {
        !self.0.is_closed()
    }
}

/// An OpenAI error: its status, type and message.
struct ApiError(StatusCode, &'static str, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let ApiError(status, kind, message) = self;
        let body = json!({"error": {"message": message, "type": kind, "param": null, "code": status.as_u16()}});
        (status, axum::Json(body)).into_response()
    }
}

fn error(status: StatusCode, kind: &'static str, message: &str) -> ApiError {
    ApiError(status, kind, message.to_string())
}

fn bad(message: impl AsRef<str>) -> ApiError {
    error(StatusCode::BAD_REQUEST, "invalid_request_error", message.as_ref())
}

async fn models(State(s): State<Arc<Served>>) -> Response {
    let data = json!([{"id": s.name, "object": "model", "created": s.created, "owned_by": "tessera"}]);
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

/// The request's JSON object, or a 400.
fn parse(body: &Bytes) -> Result<serde_json::Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(o)) => Ok(o),
        Ok(_) => Err(bad("the request body is not a JSON object")),
        Err(e) => Err(bad(format!("the request body is not JSON: {e}"))),
    }
}

/// What a generation request asks for, beyond its prompt.
struct Ask {
    max_tokens: Option<usize>,
    sampling: SampleConfig,
    stop: Vec<String>,
    stream: bool,
    include_usage: bool,
    /// Generate past the end of sequence (vLLM's `ignore_eos`, for benchmarks).
    ignore_eos: bool,
}

/// A request's `model`, if it names one, is the model served (else a 404, as OpenAI answers).
fn named(s: &Served, o: &serde_json::Map<String, Value>) -> Result<(), ApiError> {
    match o.get("model").and_then(Value::as_str) {
        Some(m) if m != s.name => Err(error(
            StatusCode::NOT_FOUND,
            "not_found_error",
            &format!("The model `{m}` does not exist; this server serves `{}`.", s.name),
        )),
        _ => Ok(()),
    }
}

/// The fields common to completions and chat, checked.
fn ask(s: &Served, o: &serde_json::Map<String, Value>) -> Result<Ask, ApiError> {
    named(s, o)?;
    let num = |k: &str| -> Result<Option<f64>, ApiError> {
        match o.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| bad(format!("`{k}` must be a number"))),
        }
    };
    let whole = |k: &str| -> Result<Option<u64>, ApiError> {
        match num(k)? {
            Some(x) if x < 0.0 || x.fract() != 0.0 => Err(bad(format!("`{k}` must be a whole number of 0 or more"))),
            x => Ok(x.map(|x| x as u64)),
        }
    };
    if whole("n")?.is_some_and(|n| n != 1) {
        return Err(bad("`n` other than 1 is not supported: send one request per completion"));
    }
    for unsupported in ["logprobs", "top_logprobs", "echo", "best_of", "tools", "functions"] {
        if o.get(unsupported).is_some_and(|v| !v.is_null() && *v != Value::Bool(false)) {
            return Err(bad(format!("`{unsupported}` is not supported by this server")));
        }
    }
    let mut sampling = s.sampling.clone();
    if let Some(t) = num("temperature")? {
        if !(0.0..=2.0).contains(&t) {
            return Err(bad("`temperature` must be between 0 and 2"));
        }
        sampling.temperature = t;
    }
    if let Some(p) = num("top_p")? {
        if !(p > 0.0 && p <= 1.0) {
            return Err(bad("`top_p` must be in (0, 1]"));
        }
        sampling.top_p = (p < 1.0).then_some(p);
    }
    if let Some(k) = whole("top_k")? {
        sampling.top_k = (k > 0).then_some(k as usize);
    }
    if let Some(seed) = whole("seed")? {
        sampling.seed = seed;
    }
    let max_tokens = match whole("max_completion_tokens")? {
        Some(n) => Some(n as usize),
        None => whole("max_tokens")?.map(|n| n as usize),
    };
    if max_tokens == Some(0) {
        return Err(bad("`max_tokens` must be at least 1"));
    }
    let stop = match o.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(x)) => vec![x.clone()],
        Some(Value::Array(xs)) => xs
            .iter()
            .map(|x| x.as_str().map(String::from).ok_or_else(|| bad("`stop` must be a string or a list of strings")))
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(bad("`stop` must be a string or a list of strings")),
    };
    let stream = o.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let include_usage =
        o.get("stream_options").and_then(|x| x.get("include_usage")).and_then(Value::as_bool).unwrap_or(false);
    let ignore_eos = o.get("ignore_eos").and_then(Value::as_bool).unwrap_or(false);
    Ok(Ask { max_tokens, sampling, stop, stream, include_usage, ignore_eos })
}

/// Whether the request is a chat completion (its response's shape).
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Text,
    Chat,
}

async fn completions(State(s): State<Arc<Served>>, body: Bytes) -> Result<Response, ApiError> {
    let o = parse(&body)?;
    let ids = match o.get("prompt") {
        Some(Value::String(p)) => s.tok.encode(p).map_err(|e| bad(e.to_string())),
        Some(Value::Array(xs)) if xs.len() == 1 && xs[0].is_string() => {
            s.tok.encode(xs[0].as_str().unwrap_or("")).map_err(|e| bad(e.to_string()))
        }
        Some(Value::Array(xs)) if !xs.is_empty() && xs.iter().all(Value::is_u64) => {
            Ok(xs.iter().filter_map(Value::as_u64).map(|x| x as u32).collect())
        }
        Some(Value::Array(_)) => {
            Err(bad("`prompt` as a list holds one string or token ids; send one request per prompt"))
        }
        _ => Err(bad("`prompt` is required: a string or a list of token ids")),
    }?;
    generate(s, &o, ids, Kind::Text).await
}

async fn chat(State(s): State<Arc<Served>>, body: Bytes) -> Result<Response, ApiError> {
    let o = parse(&body)?;
    let Some(template) = &s.template else {
        return Err(bad(
            "this model has no chat template (its weights carry none); use /v1/completions, or serve with \
             --chat-template FILE",
        ));
    };
    let Some(Value::Array(msgs)) = o.get("messages") else {
        return Err(bad("`messages` is required: a list of {role, content}"));
    };
    let mut turns = Vec::new();
    for (i, m) in msgs.iter().enumerate() {
        let role = m.get("role").and_then(Value::as_str);
        let content = match m.get("content") {
            Some(Value::String(c)) => Some(c.clone()),
            // Content parts: the text ones, in order.
            Some(Value::Array(parts)) => parts
                .iter()
                .map(|p| match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                    (Some("text"), Some(t)) => Some(t.to_string()),
                    _ => None,
                })
                .collect::<Option<String>>(),
            _ => None,
        };
        match (role, content) {
            (Some(r), Some(c)) => turns.push((r.to_string(), c)),
            _ => return Err(bad(format!("messages[{i}] needs a `role` and a text `content`"))),
        }
    }
    let pairs: Vec<(&str, &str)> = turns.iter().map(|(r, c)| (r.as_str(), c.as_str())).collect();
    let prompt = template.render(&pairs).map_err(|e| bad(e.to_string()))?;
    let ids = s.tok.encode(&prompt).map_err(|e| bad(e.to_string()))?;
    generate(s, &o, ids, Kind::Chat).await
}

/// Submit a generation and answer it, whole or as a stream.
async fn generate(
    s: Arc<Served>,
    o: &serde_json::Map<String, Value>,
    ids: Vec<u32>,
    kind: Kind,
) -> Result<Response, ApiError> {
    let Some(engine) = &s.engine else {
        return Err(bad(format!("`{}` does not generate text; it serves /v1/embeddings", s.name)));
    };
    let a = ask(&s, o)?;
    let prompt_tokens = ids.len();
    // Without max_tokens, the rest of the context (as vLLM does).
    let max_tokens = a.max_tokens.unwrap_or_else(|| engine.limits.max_len.saturating_sub(prompt_tokens).max(1));
    let (tx, rx) = mpsc::unbounded_channel();
    let request = Request {
        prompt: ids,
        max_tokens,
        sampling: a.sampling.clone(),
        stop: s.eos.into_iter().filter(|_| !a.ignore_eos).collect(),
        sink: Box::new(Channel(tx)),
    };
    engine.submit(request).map_err(|r| match r {
        Refused::TooLong(m) => bad(m),
        Refused::Busy(m) => error(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", &m),
        Refused::Stopped => error(StatusCode::SERVICE_UNAVAILABLE, "server_error", "the engine has stopped"),
    })?;
    let id = format!("{}-{}", if kind == Kind::Chat { "chatcmpl" } else { "cmpl" }, next_id());
    let text = Text { tok: &s.tok, stop: a.stop.clone(), ids: Vec::new(), sent: 0, held: 0 };
    if a.stream {
        Ok(stream(s.clone(), rx, a.stop, id, kind, prompt_tokens, a.include_usage).into_response())
    } else {
        whole(&s, rx, text, id, kind, prompt_tokens).await
    }
}

fn next_id() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// A request's events as text: each call gives the next piece (maybe
/// empty) and, with the last, why it ended; the model's end of sequence is
/// not text.
struct Pieces<'t> {
    rx: mpsc::UnboundedReceiver<Event>,
    text: Text<'t>,
    eos: Option<u32>,
    /// Tokens generated (the end of sequence counted).
    generated: usize,
}

impl Pieces<'_> {
    async fn next(&mut self) -> Result<(String, Option<Finish>), String> {
        match self.rx.recv().await {
            Some(Event::Token(t)) => {
                self.generated += 1;
                if Some(t) == self.eos {
                    return Ok((String::new(), None));
                }
                let (piece, stopped) = self.text.push(t);
                Ok((piece, stopped.then_some(Finish::Stop)))
            }
            Some(Event::Done(f)) => Ok((self.text.flush(), Some(f))),
            Some(Event::Failed(e)) => Err(e),
            None => Err("the engine dropped the request".into()),
        }
    }
}

/// The text of the generated tokens, released as it becomes final: not
/// within a multi-byte character still incomplete, and cut at a stop string.
struct Text<'t> {
    tok: &'t Tokenizer,
    stop: Vec<String>,
    ids: Vec<u32>,
    /// Bytes of the decoded text already released.
    sent: usize,
    /// Tokens held back since the last release.
    held: usize,
}

impl Text<'_> {
    /// Take `token`; the new text to release, and whether a stop string ended it.
    fn push(&mut self, token: u32) -> (String, bool) {
        self.ids.push(token);
        let all = self.tok.decode(&self.ids);
        if let Some(at) = self.stop.iter().filter_map(|x| all.find(x.as_str())).min() {
            let new = all.get(self.sent..at).unwrap_or("").to_string();
            self.sent = at;
            return (new, true);
        }
        // Hold back what may be an incomplete character (decoded as U+FFFD)
        // until the next token completes it: a UTF-8 character spans at
        // most 4 byte tokens, so after 3 held tokens the bytes are invalid
        // and go out as they decode.
        if all.ends_with('\u{FFFD}') && self.held < 3 {
            self.held += 1;
            return (String::new(), false);
        }
        self.held = 0;
        let new = all.get(self.sent..).unwrap_or("").to_string();
        self.sent = all.len();
        (new, false)
    }

    /// The text held back at the end (an incomplete character, as U+FFFD).
    fn flush(&mut self) -> String {
        let all = self.tok.decode(&self.ids);
        let new = all.get(self.sent..).unwrap_or("").to_string();
        self.sent = all.len();
        new
    }
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

/// Wait for the whole completion.
async fn whole(
    s: &Served,
    rx: mpsc::UnboundedReceiver<Event>,
    text: Text<'_>,
    id: String,
    kind: Kind,
    prompt_tokens: usize,
) -> Result<Response, ApiError> {
    let mut pieces = Pieces { rx, text, eos: s.eos, generated: 0 };
    let mut out = String::new();
    let finish = loop {
        let (piece, end) =
            pieces.next().await.map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, "server_error", &e))?;
        out.push_str(&piece);
        if let Some(f) = end {
            break f;
        }
    };
    let generated = pieces.generated;
    drop(pieces);
    let choice = match kind {
        Kind::Text => json!({"index": 0, "text": out, "logprobs": null, "finish_reason": finish.reason()}),
        Kind::Chat => {
            json!({"index": 0, "message": {"role": "assistant", "content": out}, "logprobs": null, "finish_reason": finish.reason()})
        }
    };
    let object = if kind == Kind::Chat { "chat.completion" } else { "text_completion" };
    Ok(axum::Json(json!({
        "id": id,
        "object": object,
        "created": s.created,
        "model": s.name,
        "choices": [choice],
        "usage": usage(prompt_tokens, generated),
    }))
    .into_response())
}

/// Stream the completion as server-sent events.
fn stream(
    s: Arc<Served>,
    rx: mpsc::UnboundedReceiver<Event>,
    stop: Vec<String>,
    id: String,
    kind: Kind,
    prompt_tokens: usize,
    include_usage: bool,
) -> Sse<impl tokio_stream::Stream<Item = Result<SseEvent, std::convert::Infallible>>> {
    let object = if kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" };
    let chunk = {
        let s = s.clone();
        let id = id.clone();
        move |piece: Option<&str>, role: bool, finish: Option<Finish>| {
            let finish = finish.map(Finish::reason);
            let choice = match kind {
                Kind::Text => {
                    json!({"index": 0, "text": piece.unwrap_or(""), "logprobs": null, "finish_reason": finish})
                }
                Kind::Chat => {
                    let mut delta = serde_json::Map::new();
                    if role {
                        delta.insert("role".into(), json!("assistant"));
                    }
                    if let Some(p) = piece {
                        delta.insert("content".into(), json!(p));
                    }
                    json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
                }
            };
            json!({"id": id, "object": object, "created": s.created, "model": s.name, "choices": [choice]})
        }
    };
    let (out_tx, out_rx) = mpsc::unbounded_channel::<Result<SseEvent, std::convert::Infallible>>();
    tokio::spawn(async move {
        let text = Text { tok: &s.tok, stop, ids: Vec::new(), sent: 0, held: 0 };
        let mut pieces = Pieces { rx, text, eos: s.eos, generated: 0 };
        let send = |v: Value| out_tx.send(Ok(SseEvent::default().data(v.to_string()))).is_ok();
        if kind == Kind::Chat && !send(chunk(Some(""), true, None)) {
            return;
        }
        let finish = loop {
            match pieces.next().await {
                Ok((piece, end)) => {
                    // A client that has gone: dropping `pieces` cancels the request.
                    if !piece.is_empty() && !send(chunk(Some(&piece), false, None)) {
                        return;
                    }
                    if end.is_some() {
                        break end;
                    }
                }
                Err(e) => {
                    let _ = send(json!({"error": {"message": e, "type": "server_error", "param": null, "code": 500}}));
                    break None;
                }
            }
        };
        let generated = pieces.generated;
        drop(pieces);
        if let Some(f) = finish {
            let mut last = chunk(None, false, Some(f));
            if kind == Kind::Text {
                last["choices"][0]["text"] = json!("");
            }
            let _ = send(last);
        }
        if include_usage {
            let mut u = chunk(None, false, None);
            u["choices"] = json!([]);
            u["usage"] = usage(prompt_tokens, generated);
            let _ = send(u);
        }
        let _ = out_tx.send(Ok(SseEvent::default().data("[DONE]")));
    });
    Sse::new(tokio_stream::wrappers::UnboundedReceiverStream::new(out_rx)).keep_alive(KeepAlive::default())
}

async fn embeddings(State(s): State<Arc<Served>>, body: Bytes) -> Result<Response, ApiError> {
    let o = parse(&body)?;
    let Some(e) = &s.embed else {
        return Err(bad(format!("`{}` has no `embedding` output to serve; it serves completions", s.name)));
    };
    named(&s, &o)?;
    if o.get("encoding_format").and_then(Value::as_str).is_some_and(|f| f != "float") {
        return Err(bad("only `encoding_format: \"float\"` is supported"));
    }
    let texts: Vec<String> = match o.get("input") {
        Some(Value::String(x)) => vec![x.clone()],
        Some(Value::Array(xs)) if !xs.is_empty() && xs.iter().all(Value::is_string) => {
            xs.iter().filter_map(Value::as_str).map(String::from).collect()
        }
        _ => return Err(bad("`input` is required: a string or a list of strings")),
    };
    let mut ids = Vec::new();
    for (i, t) in texts.iter().enumerate() {
        let x = s.tok.encode_with_special(t).map_err(|err| bad(err.to_string()))?;
        if x.len() > e.seq {
            return Err(bad(format!("input {i} is {} tokens; this model embeds at most {} tokens", x.len(), e.seq)));
        }
        ids.push(x);
    }
    let tokens: usize = ids.iter().map(Vec::len).sum();
    let s2 = s.clone();
    let result = tokio::task::spawn_blocking(move || {
        let e = s2.embed.as_ref().expect("an encoder");
        let mut f = e.forward.lock().unwrap_or_else(|p| p.into_inner());
        ids.iter()
            .map(|x| {
                let inputs: Vec<tessera_runtime::tensor::Tensor<f32>> = e
                    .inputs
                    .iter()
                    .map(|(name, dims)| {
                        let n: usize = dims.iter().map(|d| d.size as usize).product();
                        let mut data = vec![0f32; n];
                        match name.as_str() {
                            "tokens" => data.iter_mut().zip(x).for_each(|(d, &t)| *d = t as f32),
                            "mask" => data.iter_mut().take(x.len()).for_each(|d| *d = 1.0),
                            _ => {}
                        }
                        tessera_runtime::tensor::Tensor { dims: dims.clone(), data }
                    })
                    .collect();
                f.run(&inputs).map(|t| t.data)
            })
            .collect::<Result<Vec<_>, _>>()
    })
    .await;
    let failed =
        |err: &dyn std::fmt::Display| error(StatusCode::INTERNAL_SERVER_ERROR, "server_error", &err.to_string());
    let vectors = result.map_err(|e| failed(&e))?.map_err(|e| failed(&e))?;
    let data: Vec<Value> = vectors
        .into_iter()
        .enumerate()
        .map(|(i, v)| json!({"object": "embedding", "index": i, "embedding": v}))
        .collect();
    Ok(axum::Json(json!({
        "object": "list",
        "data": data,
        "model": s.name,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }))
    .into_response())
}
