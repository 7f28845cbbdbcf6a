"""Training throughput of the `transformer` backbone against a nanoGPT-architecture GPT.

    python benchmarks/traces/vs_nanogpt.py --device cuda                      # H100: the 0.95 goal
    python benchmarks/traces/vs_nanogpt.py --device cpu --batch 4 --steps 5  # CPU check

Both models: 6 layers, 6 heads, 384 wide, context 256, vocabulary 65 (characters), no
biases, tied embeddings, dropout 0.2, batch 64; AdamW (fused on CUDA), bf16 autocast on
CUDA, torch.compile on (``--no-compile`` to disable). The reference GPT below is our own
minimal reimplementation of nanoGPT's architecture (learned absolute positions, fused qkv,
SDPA causal attention, GELU MLP, pre-norm); ours is a StatelabModel with the transformer
backbone (rotary positions instead of learned ones). Tokens/s counts forward, backward and
the optimizer step over ``--steps`` timed steps after ``--warmup`` steps.
"""

from __future__ import annotations

import argparse
import math
import platform
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class RefAttention(nn.Module):
    def __init__(self, d: int, h: int, dropout: float, rope: tuple | None = None) -> None:
        super().__init__()
        self.h, self.dropout, self.rope = h, dropout, rope is not None
        if rope is not None:  # buffers, so they move to the GPU with the model
            self.register_buffer("cos", rope[0].clone(), persistent=False)
            self.register_buffer("sin", rope[1].clone(), persistent=False)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.out = nn.Linear(d, d, bias=False)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(x).split(D, dim=2)
        if self.rope:  # --diagnose: the reference with our rotary positions instead of learned ones
            from traces_crystallize.transformer import apply_rotary

            cos, sin = self.cos[:T, None], self.sin[:T, None]  # (T, 1, hd/2)
            q = apply_rotary(q.view(B, T, self.h, D // self.h), cos, sin).view(B, T, D)  # (B, T, D)
            k = apply_rotary(k.view(B, T, self.h, D // self.h), cos, sin).view(B, T, D)
        q, k, v = (t.view(B, T, self.h, D // self.h).transpose(1, 2) for t in (q, k, v))  # (B, H, T, hd)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        return self.drop(self.out(y.transpose(1, 2).contiguous().view(B, T, D)))  # (B, T, D)


class RefBlock(nn.Module):
    def __init__(self, d: int, h: int, dropout: float, rope: tuple | None = None) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d, bias=False), nn.LayerNorm(d, bias=False)
        self.attn = RefAttention(d, h, dropout, rope)
        self.fc, self.proj, self.drop = nn.Linear(d, 4 * d, bias=False), nn.Linear(4 * d, d, bias=False), nn.Dropout(dropout)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.drop(self.proj(F.gelu(self.fc(self.ln2(x)))))


class RefGPT(nn.Module):
    """nanoGPT's GPT architecture (written from its description, not copied)."""

    def __init__(self, vocab: int, ctx: int, d: int, h: int, n_layers: int, dropout: float, rope: bool = False) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), (None if rope else nn.Embedding(ctx, d))
        self.drop = nn.Dropout(dropout)
        tables = None
        if rope:
            from traces_crystallize.transformer import _rope_tables

            tables = _rope_tables(ctx, d // h, 10000.0)
        self.blocks = nn.ModuleList([RefBlock(d, h, dropout, tables) for _ in range(n_layers)])
        self.ln_f = nn.LayerNorm(d, bias=False)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.wte.weight
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * n_layers) if name.endswith(("proj.weight", "out.weight")) else 0.02)

    def forward(self, idx):
        T = idx.shape[1]
        x = self.wte(idx)  # (B, T, D)
        x = self.drop(x if self.wpe is None else x + self.wpe(torch.arange(T, device=idx.device)))
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln_f(x)), None, None


def ours(vocab: int, ctx: int, d: int, h: int, n_layers: int, dropout: float):
    import statelab

    spec = {"name": "bench", "tokenizer": {"kind": "char"},
            "model": {"d_model": d, "vocab_size": vocab, "dropout": dropout,
                      "backbone": {"kind": "transformer", "n_layers": n_layers, "n_heads": h, "dropout": dropout,
                                   "max_seq_len": ctx, "bias": False}},
            "tracking": {"enabled": False}}
    return statelab.build(spec)


class LogitsOnly(nn.Module):
    """--diagnose: our model with the state and aux dropped inside the compiled function."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)[0], None, None


def tokens_per_s(model, device, batch, ctx, vocab, steps, warmup, compile_, amp, profile: bool = False) -> float:
    model.to(device).train()
    fused = device.type == "cuda"
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.99), fused=fused)
    fwd = torch.compile(model) if compile_ else model
    g = torch.Generator(device="cpu").manual_seed(0)
    data = torch.randint(0, vocab, (steps + warmup, batch, ctx + 1), generator=g).to(device)

    def step(i):
        x, y = data[i, :, :-1], data[i, :, 1:]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = fwd(x)[0]
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for i in range(warmup):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for i in range(warmup, warmup + steps):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    tps = steps * batch * ctx / (time.perf_counter() - t)
    if profile:
        from torch.profiler import ProfilerActivity, profile as prof

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with prof(activities=acts) as p:
            for i in range(5):
                step(i % (steps + warmup))
            if device.type == "cuda":
                torch.cuda.synchronize()
        sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
        print(p.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=70))
    return tps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2, help="alternate the two models this many times; best of rounds")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--out", help="write the markdown section to this file")
    ap.add_argument("--diagnose", action="store_true",
                    help="also time the reference with our rotary and our model returning logits only, and profile both")
    args = ap.parse_args()
    device = torch.device(args.device)
    amp = device.type == "cuda"
    compile_ = not args.no_compile
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    V, D, H, L, drop = 65, 384, 6, 6, 0.2
    makers = [("nanogpt-arch GPT", RefGPT), ("statelab transformer", ours)]
    if args.diagnose:
        makers += [("nanogpt-arch GPT with our rotary", lambda *a: RefGPT(*a, rope=True)),
                   ("statelab transformer, logits only", lambda *a: LogitsOnly(ours(*a)))]
    best = {name: 0.0 for name, _ in makers}
    for r in range(args.rounds):
        for name, make in makers:
            torch.manual_seed(0)
            model = make(V, args.ctx, D, H, L, drop)
            profile = args.diagnose and r == args.rounds - 1 and name in ("nanogpt-arch GPT", "statelab transformer")
            if profile:
                print(f"== profile: {name}")
            tps = tokens_per_s(model, device, args.batch, args.ctx, V, args.steps, args.warmup, compile_, amp, profile)
            print(f"{name}: {tps:,.0f} tok/s", flush=True)
            best[name] = max(best[name], tps)
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    ratio = best["statelab transformer"] / best["nanogpt-arch GPT"]
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu {platform.machine()}, {torch.get_num_threads()} threads"
    md = "\n".join([
        f"### Transformer vs nanoGPT-architecture GPT, training throughput ({dev}, torch {torch.__version__})",
        "",
        f"6 layers, 6 heads, 384 wide, context {args.ctx}, batch {args.batch}, dropout 0.2, "
        f"{'bf16 autocast, ' if amp else ''}compile {'on' if compile_ else 'off'}; best of {args.rounds} rounds of {args.steps} steps.",
        "",
        "| model | tokens/s |",
        "|---|---|",
        *[f"| {k} | {v:,.0f} |" for k, v in best.items()],
        f"| **ratio (ours / nanoGPT-arch)** | **{ratio:.3f}** (goal >= 0.95 on the H100) |",
        "",
        f"Reproduce: `python benchmarks/traces/vs_nanogpt.py --device {args.device}"
        f"{'' if args.batch == 64 else f' --batch {args.batch}'}{'' if args.steps == 50 else f' --steps {args.steps}'}"
        f"{'' if args.warmup == 10 else f' --warmup {args.warmup}'}{'' if args.rounds == 2 else f' --rounds {args.rounds}'}"
        f"{' --diagnose' if args.diagnose else ''}{' --no-compile' if not compile_ else ''}`",
        "",
    ])
    print(md)
    if args.out:
        from statelab.io import atomic_write_text

        atomic_write_text(args.out, md)


if __name__ == "__main__":
    main()
