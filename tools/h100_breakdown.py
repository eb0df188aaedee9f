"""Where a single-GPU training step's time goes, beside tools/h100_check.py.

Run on the GPU machine (PyTorch with CUDA):

    python3 tools/h100_breakdown.py OUT.json

For each GPT configuration of h100_check.py it times, in bf16 autocast:
  - one microbatch's forward and backward in eager PyTorch,
  - the fused AdamW step alone,
  - the whole step with the model under torch.compile (fused elementwise
    kernels, as Megatron's fused LayerNorm/GELU/bias kernels give),
so that the planner's prediction can be set against a step whose
memory-bound ops are fused, and the eager step's per-microbatch overhead
is visible.

It also measures what the MoE layer's price rests on: bf16 GEMM rates as
the tokens per expert fall (one expert's GEMM, and all experts as one
batched GEMM), and the bandwidth of the token permutation (a gather of
token rows by index and the scatter-add back).
"""

import json
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from h100_check import CONFIGS, Gpt, dev, timed  # noqa: E402


def breakdown(cfg, compiled):
    torch.manual_seed(0)
    m = Gpt(cfg["vocab"], cfg["seq"], cfg["h"], cfg["heads"], cfg["layers"]).to(dev)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True)
    micro = cfg["batch"] // cfg["micro_batch"]
    tokens = torch.randint(0, cfg["vocab"], (cfg["micro_batch"], cfg["seq"]), device=dev)
    targets = torch.randint(0, cfg["vocab"], (cfg["micro_batch"], cfg["seq"]), device=dev)
    fwd = torch.compile(m) if compiled else m

    def fb():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fwd(tokens, targets) / micro
        loss.backward()

    out = {"name": cfg["name"], "compiled": compiled}
    started = time.time()
    out["forward_backward_s"] = timed(fb, warmup=3, reps=10)
    out["warmup_wall_s"] = time.time() - started

    def step():
        for _ in range(micro):
            fb()
        opt.step()
        opt.zero_grad(set_to_none=True)

    out["step_s"] = timed(step, warmup=2, reps=5)
    for p in m.parameters():
        p.grad = torch.zeros_like(p)
    out["optimizer_s"] = timed(lambda: opt.step(), warmup=2, reps=5)
    del m, opt, fwd
    torch.cuda.empty_cache()
    return out


def expert_gemms():
    out = []
    # (hidden, ffn, experts): Mixtral 8x7B's expert, Switch-Base's, a small one.
    for h, f, experts in ((4096, 14336, 8), (768, 3072, 128), (1024, 4096, 64)):
        for tokens in (16, 64, 256, 1024, 4096, 16384):
            x = torch.randn(tokens, h, device=dev, dtype=torch.bfloat16)
            w = torch.randn(h, f, device=dev, dtype=torch.bfloat16)
            one = timed(lambda: x @ w, warmup=3, reps=20)
            e = min(experts, max(1, (1 << 31) // (tokens * h * 2 + h * f * 2)))
            xb = torch.randn(e, tokens, h, device=dev, dtype=torch.bfloat16)
            wb = torch.randn(e, h, f, device=dev, dtype=torch.bfloat16)
            batched = timed(lambda: torch.bmm(xb, wb), warmup=3, reps=10)
            flops = 2 * tokens * h * f
            out.append({
                "h": h, "f": f, "tokens_per_expert": tokens,
                "one_s": one, "one_tflops": flops / one / 1e12,
                "batched_experts": e, "batched_s": batched, "batched_tflops": e * flops / batched / 1e12,
            })
            del x, w, xb, wb
    return out


def permutation():
    out = []
    for tokens, h in ((16384, 4096), (65536, 1024)):
        x = torch.randn(tokens, h, device=dev, dtype=torch.bfloat16)
        idx = torch.randperm(tokens, device=dev)
        g = timed(lambda: x.index_select(0, idx), warmup=3, reps=20)
        y = torch.zeros_like(x)
        s = timed(lambda: y.index_add_(0, idx, x), warmup=3, reps=20)
        moved = 2 * tokens * h * 2
        out.append({"tokens": tokens, "h": h, "gather_s": g, "gather_tb_s": moved / g / 1e12,
                    "scatter_add_s": s, "scatter_add_tb_s": 1.5 * moved / s / 1e12})
    return out


def main():
    out_path = sys.argv[1] if len(sys.argv) > 1 else "h100_breakdown.json"
    started = time.time()
    r = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    for name, fn in (("expert_gemm", expert_gemms), ("permutation", permutation)):
        try:
            r[name] = fn()
        except Exception as e:
            r[name] = {"error": repr(e)}
        print(name, json.dumps(r[name]), flush=True)
    r["train"] = []
    for compiled in (False, True):
        for cfg in CONFIGS:
            try:
                r["train"].append(breakdown(cfg, compiled))
            except Exception as e:
                r["train"].append({"name": cfg["name"], "compiled": compiled, "error": repr(e)})
            print("train", json.dumps(r["train"][-1]), flush=True)
            with open(out_path, "w") as f:
                json.dump(r, f, indent=1)
    r["seconds"] = time.time() - started
    with open(out_path, "w") as f:
        json.dump(r, f, indent=1)


if __name__ == "__main__":
    main()
