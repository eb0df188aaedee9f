"""PyTorch peer for `tessera bench`: the benchmark models of specs/bench/.

The same models as specs/bench/tiny.spec, moe-tiny.spec and small.spec, written
the way a PyTorch user writes them (nanoGPT style): fused qkv projection with
biases, `F.scaled_dot_product_attention(is_causal=True)`, pre-LN blocks, exact
GELU, tied input/output embedding, AdamW. The MoE layer is the usual loop over
experts with index_select / index_add_ (top-2 of a softmax router, capacity
factor 1.25, overflow tokens dropped, Switch load-balancing loss).

Eager fp32 on the CPU with a fixed thread count. Prints one JSON object per
model: {"model", "tokens_per_s", "step_s", "threads", "torch"}.

    python benches/pytorch/train_bench.py --model tiny --steps 10 --threads 2

`cargo run --release -- bench specs/bench/tiny.spec --pytorch PYTHON` runs this
script in the same process tree and reports the ratio (see benches/README.md).
"""

import argparse
import json
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

# Each model's dims and batch, as its spec in specs/bench/ has them.
MODELS = {
    "tiny": dict(vocab=256, seq=256, embed=256, heads=4, layers=4, batch=16, moe=False),
    "moe-tiny": dict(vocab=256, seq=256, embed=256, heads=4, layers=4, batch=16, moe=True),
    "small": dict(vocab=50257, seq=512, embed=512, heads=8, layers=6, batch=8, moe=False),
}
VOCAB, SEQ, EMBED, HEADS, LAYERS = 256, 256, 256, 4, 4
EXPERTS, TOP_K, CAPACITY = 8, 2, 1.25


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(EMBED, 3 * EMBED)
        self.proj = nn.Linear(EMBED, EMBED)

    def forward(self, x):
        b, s, e = x.shape
        q, k, v = self.qkv(x).split(e, dim=2)
        q, k, v = (t.view(b, s, HEADS, e // HEADS).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, s, e))


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(EMBED, 4 * EMBED)
        self.proj = nn.Linear(4 * EMBED, EMBED)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x)))


class Moe(nn.Module):
    """Top-k routing with capacity; each expert runs on the tokens routed to it."""

    def __init__(self):
        super().__init__()
        self.router = nn.Linear(EMBED, EXPERTS, bias=False)
        self.experts = nn.ModuleList(Mlp() for _ in range(EXPERTS))
        self.aux = None

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, EMBED)
        n = x.shape[0]
        probs = F.softmax(self.router(x), dim=-1)
        gates, idx = probs.topk(TOP_K, dim=-1)
        capacity = math.ceil(CAPACITY * n * TOP_K / EXPERTS)
        # Switch load-balancing loss: E · Σ_e (fraction routed to e) · (mean prob of e).
        frac = F.one_hot(idx[:, 0], EXPERTS).float().mean(0)
        self.aux = EXPERTS * (frac * probs.mean(0)).sum()
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tok, slot = (idx == e).nonzero(as_tuple=True)
            tok, slot = tok[:capacity], slot[:capacity]  # drop overflow tokens
            if tok.numel() == 0:
                continue
            y = expert(x.index_select(0, tok)) * gates[tok, slot].unsqueeze(1)
            out.index_add_(0, tok, y)
        return out.view(shape)


class Block(nn.Module):
    def __init__(self, moe):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(EMBED), nn.LayerNorm(EMBED)
        self.attn = Attention()
        self.mlp = Moe() if moe else Mlp()

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class Gpt(nn.Module):
    def __init__(self, moe):
        super().__init__()
        self.wte = nn.Embedding(VOCAB, EMBED)
        self.wpe = nn.Embedding(SEQ, EMBED)
        self.blocks = nn.ModuleList(Block(moe) for _ in range(LAYERS))
        self.ln = nn.LayerNorm(EMBED)
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, tokens, targets):
        x = self.wte(tokens) + self.wpe.weight[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        logits = self.ln(x) @ self.wte.weight.t()
        loss = F.cross_entropy(logits.view(-1, VOCAB), targets.reshape(-1))
        aux = [b.mlp.aux for b in self.blocks if isinstance(b.mlp, Moe)]
        return loss + 0.01 * sum(aux) if aux else loss


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=sorted(MODELS), required=True)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=None, help="sequences per step (default: the spec's)")
    args = ap.parse_args()
    global VOCAB, SEQ, EMBED, HEADS, LAYERS
    cfg = MODELS[args.model]
    VOCAB, SEQ, EMBED, HEADS, LAYERS = cfg["vocab"], cfg["seq"], cfg["embed"], cfg["heads"], cfg["layers"]
    args.batch = args.batch or cfg["batch"]
    torch.set_num_threads(args.threads)
    torch.manual_seed(1)
    model = Gpt(moe=cfg["moe"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(1)

    def step():
        tokens = torch.randint(0, VOCAB, (args.batch, SEQ + 1), generator=gen)
        loss = model(tokens[:, :-1], tokens[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    for _ in range(args.warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    dt = (time.perf_counter() - t0) / args.steps
    print(
        json.dumps(
            {
                "model": args.model,
                "tokens_per_s": args.batch * SEQ / dt,
                "step_s": dt,
                "threads": args.threads,
                "torch": torch.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
