"""Measure on a real GPU what the planner's device profile assumes.

Run on the GPU machine (PyTorch with CUDA):

    python3 tools/h100_check.py OUT.json

It measures, in bf16:
  - matmul rates at the shapes of transformer layers (the profile's
    `achievable.matmul` and `kernel_us`),
  - the attention core through torch's scaled_dot_product_attention
    (FlashAttention; `achievable.attention`), forward and backward,
  - HBM bandwidth of a copy (`hbm_tb_s` × `achievable.hbm`),
  - whole training steps of a GPT (pre-LN attention + GELU MLP, tied
    embedding, learned positions, no dropout, AdamW, bf16 autocast with fp32
    weights), to set against `tessera plan --device h100_80gb` for the same
    spec (tools/h100_predict.sh prints those predictions).

Times are CUDA-event medians over repeated runs after warm-up.
"""

import json
import math
import sys
import time

import torch
import torch.nn.functional as F

dev = torch.device("cuda")
torch.backends.cuda.matmul.allow_tf32 = True


def timed(fn, warmup=3, reps=10):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    times.sort()
    return times[len(times) // 2]


def gemms():
    out = []
    # (tokens, in, out): a GPT layer's four matmuls at h = 4096 and 2048 for
    # 2048 and 8192 tokens, a small one, and the 8192³ reference.
    shapes = []
    for h in (2048, 4096, 8192):
        for tokens in (2048, 8192):
            shapes += [(tokens, h, 3 * h), (tokens, h, h), (tokens, h, 4 * h), (tokens, 4 * h, h)]
    shapes += [(2048, 768, 3072), (8192, 8192, 8192)]
    for m, k, n in shapes:
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        w = torch.randn(k, n, device=dev, dtype=torch.bfloat16)
        t = timed(lambda: x @ w)
        out.append({"m": m, "k": k, "n": n, "seconds": t, "tflops": 2 * m * k * n / t / 1e12})
    return out


def attention():
    out = []
    for b, heads, s, d in ((1, 32, 2048, 128), (1, 32, 4096, 128), (4, 16, 2048, 128)):
        q, k, v = (
            torch.randn(b, heads, s, d, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3)
        )
        fwd = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        g = torch.randn_like(o)

        def both():
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            y.backward(g)

        fb = timed(both)
        # The crate's convention: q·k and p·v over the full s×s matrix (causal not halved).
        flops = 4 * b * heads * s * s * d
        out.append(
            {
                "b": b, "heads": heads, "s": s, "d": d,
                "forward_s": fwd, "forward_backward_s": fb,
                "forward_tflops_full_matrix": flops / fwd / 1e12,
                "forward_backward_tflops_full_matrix": 3 * flops / fb / 1e12,
            }
        )
    return out


def bandwidth():
    x = torch.empty(2 << 30, dtype=torch.uint8, device=dev)
    y = torch.empty_like(x)
    t = timed(lambda: y.copy_(x))
    return {"bytes": 2 * x.numel(), "seconds": t, "tb_s": 2 * x.numel() / t / 1e12}


class Layer(torch.nn.Module):
    def __init__(self, h, heads):
        super().__init__()
        self.heads = heads
        self.ln1 = torch.nn.LayerNorm(h)
        self.qkv = torch.nn.Linear(h, 3 * h)
        self.proj = torch.nn.Linear(h, h)
        self.ln2 = torch.nn.LayerNorm(h)
        self.up = torch.nn.Linear(h, 4 * h)
        self.down = torch.nn.Linear(4 * h, h)

    def forward(self, x):
        b, s, h = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, s, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, s, h))
        return x + self.down(F.gelu(self.up(self.ln2(x)), approximate="tanh"))


class Gpt(torch.nn.Module):
    def __init__(self, vocab, seq, h, heads, layers):
        super().__init__()
        self.wte = torch.nn.Embedding(vocab, h)
        self.wpe = torch.nn.Embedding(seq, h)
        self.layers = torch.nn.ModuleList(Layer(h, heads) for _ in range(layers))
        self.ln = torch.nn.LayerNorm(h)

    def forward(self, tokens, targets):
        x = self.wte(tokens) + self.wpe.weight[None, : tokens.shape[1]]
        for layer in self.layers:
            x = layer(x)
        logits = self.ln(x) @ self.wte.weight.t()
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.view(-1))


def train_step(cfg):
    torch.manual_seed(0)
    m = Gpt(cfg["vocab"], cfg["seq"], cfg["h"], cfg["heads"], cfg["layers"]).to(dev)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True)
    micro = cfg["batch"] // cfg["micro_batch"]
    data = [
        (
            torch.randint(0, cfg["vocab"], (cfg["micro_batch"], cfg["seq"]), device=dev),
            torch.randint(0, cfg["vocab"], (cfg["micro_batch"], cfg["seq"]), device=dev),
        )
        for _ in range(micro)
    ]

    def step():
        for tokens, targets in data:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = m(tokens, targets) / micro
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t = timed(step, warmup=2, reps=5)
    params = sum(p.numel() for p in m.parameters())
    del m, opt, data
    torch.cuda.empty_cache()
    return {**cfg, "params": params, "step_s": t, "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


CONFIGS = [
    {"name": "h4096-l8-mb1", "vocab": 51200, "seq": 2048, "h": 4096, "heads": 32, "layers": 8, "batch": 8, "micro_batch": 1},
    {"name": "h4096-l8-mb4", "vocab": 51200, "seq": 2048, "h": 4096, "heads": 32, "layers": 8, "batch": 8, "micro_batch": 4},
    {"name": "h2048-l16-mb2", "vocab": 51200, "seq": 2048, "h": 2048, "heads": 16, "layers": 16, "batch": 8, "micro_batch": 2},
]


def main():
    out_path = sys.argv[1] if len(sys.argv) > 1 else "h100_check.json"
    started = time.time()
    r = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    for name, fn in (("gemm", gemms), ("attention", attention), ("bandwidth", bandwidth)):
        try:
            r[name] = fn()
        except Exception as e:  # keep going: one failure should not lose the rest
            r[name] = {"error": repr(e)}
        print(name, json.dumps(r[name])[:2000], flush=True)
    r["train"] = []
    for cfg in CONFIGS:
        try:
            torch.cuda.reset_peak_memory_stats()
            r["train"].append(train_step(cfg))
        except Exception as e:
            r["train"].append({**cfg, "error": repr(e)})
        print("train", json.dumps(r["train"][-1]), flush=True)
    r["seconds"] = time.time() - started
    with open(out_path, "w") as f:
        json.dump(r, f, indent=1)


if __name__ == "__main__":
    main()
