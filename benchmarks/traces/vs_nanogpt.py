"""Training throughput of the `transformer` backbone against a nanoGPT-architecture GPT.

    python benchmarks/traces/vs_nanogpt.py --device cuda                      # H100: the 0.95 goal
    python benchmarks/traces/vs_nanogpt.py --device cpu --batch 4 --steps 5  # CPU check

Both models: 6 layers, 6 heads, 384 wide, context 256, vocabulary 65 (characters), no
biases, tied embeddings, dropout 0.2, batch 64; AdamW (fused on CUDA), bf16 autocast on
CUDA, torch.compile on (``--no-compile`` to disable). The reference GPT below is our own
minimal reimplementation of nanoGPT's architecture (learned absolute positions, fused qkv,
SDPA causal attention, GELU MLP, pre-norm); ours is a StatelabModel with the transformer
backbone (rotary positions instead of learned ones). Tokens/s counts forward, backward and
the optimizer step (nanoGPT's: grad clipping at 1, fused AdamW). Every model is built and
compiled once and warmed up; then ``--rounds`` rounds alternate the models (``--steps`` steps
each, CUDA-synchronised before and after), and tokens/s come from the median time per step
over the rounds, so that drift in the host's speed hits both models alike.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
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


class Trainer:
    """One model with its optimizer and compiled forward; ``run(n)`` trains ``n`` steps (nanoGPT's step:
    forward, cross-entropy, backward, clip to norm 1, fused AdamW) and returns the CUDA-synchronised
    seconds per step."""

    def __init__(self, model, device, batch, ctx, vocab, steps, compile_, mode, amp) -> None:
        self.model, self.device, self.amp = model.to(device).train(), device, amp
        decay = [p for p in model.parameters() if p.dim() >= 2]
        rest = [p for p in model.parameters() if p.dim() < 2]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                                     lr=1e-3, betas=(0.9, 0.99), fused=device.type == "cuda")
        self.fwd = torch.compile(model, mode=mode) if compile_ else model
        g = torch.Generator(device="cpu").manual_seed(0)
        self.data = torch.randint(0, vocab, (steps, batch, ctx + 1), generator=g).to(device)  # (steps, B, T + 1)
        self.i = 0

    def step(self) -> None:
        x, y = self.data[self.i % len(self.data), :, :-1], self.data[self.i % len(self.data), :, 1:]
        self.i += 1
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            logits = self.fwd(x)[0]
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def run(self, n: int) -> float:
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        t = time.perf_counter()
        for _ in range(n):
            self.step()
        sync()
        return (time.perf_counter() - t) / n

    def profile(self, n: int = 10, table: bool = True) -> float:
        """Profile ``n`` steps; returns the GPU's busy time per step in ms (the sum of kernel times)."""
        from torch.profiler import ProfilerActivity, profile as prof

        cuda = self.device.type == "cuda"
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with prof(activities=acts) as p:
            self.run(n)
        if table:
            print(p.key_averages().table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=25,
                                         max_name_column_width=70))
        kernels = [e for e in p.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]  # GPU-side events
        busy = sum(e.self_device_time_total for e in kernels)  # us over n steps
        return busy / n / 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--steps", type=int, default=50, help="steps per model per round")
    ap.add_argument("--warmup", type=int, default=20, help="untimed steps per model first (compilation)")
    ap.add_argument("--rounds", type=int, default=10,
                    help="rounds; in each, every model trains --steps steps (order alternating between rounds)")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--mode", default=None, help="torch.compile mode for both models (default: nanoGPT's plain compile)")
    ap.add_argument("--out", help="write the markdown section to this file")
    ap.add_argument("--profile", action="store_true",
                    help="after the rounds, profile 10 steps of each model: GPU busy time per step against wall time")
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
    trainers = {}
    for name, make in makers:  # every model is built and compiled once, then all are timed in alternation
        torch.manual_seed(0)
        trainers[name] = Trainer(make(V, args.ctx, D, H, L, drop), device, args.batch, args.ctx, V,
                                 args.steps, compile_, args.mode, amp)
        trainers[name].run(args.warmup)
    per_step: dict[str, list[float]] = {name: [] for name in trainers}
    for r in range(args.rounds):
        order = list(trainers) if r % 2 == 0 else list(reversed(trainers))
        for name in order:
            per_step[name].append(trainers[name].run(args.steps))
        print(f"round {r + 1}: " + ", ".join(f"{n} {args.batch * args.ctx / per_step[n][-1]:,.0f} tok/s" for n in trainers),
              flush=True)
    busy: dict[str, float] = {}
    if args.diagnose or args.profile:
        for name in ("nanogpt-arch GPT", "statelab transformer"):
            print(f"== profile: {name}")
            busy[name] = trainers[name].profile(table=args.diagnose)
            print(f"GPU busy {busy[name]:.2f} ms per step", flush=True)
    tok = args.batch * args.ctx
    med = {name: tok / statistics.median(t) for name, t in per_step.items()}
    paired = [a / b for a, b in zip(per_step["nanogpt-arch GPT"], per_step["statelab transformer"])]  # ours / ref, per round
    ratio = med["statelab transformer"] / med["nanogpt-arch GPT"]
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu {platform.machine()}, {torch.get_num_threads()} threads"
    flags = "".join([
        "" if args.batch == 64 else f" --batch {args.batch}", "" if args.ctx == 256 else f" --ctx {args.ctx}", "" if args.steps == 50 else f" --steps {args.steps}",
        "" if args.warmup == 20 else f" --warmup {args.warmup}", "" if args.rounds == 10 else f" --rounds {args.rounds}",
        f" --mode {args.mode}" if args.mode else "", " --diagnose" if args.diagnose else "",
        " --profile" if args.profile and not args.diagnose else "",
        " --no-compile" if not compile_ else ""])
    md = "\n".join([
        f"### Transformer vs nanoGPT-architecture GPT, training throughput ({dev}, torch {torch.__version__})",
        "",
        f"6 layers, 6 heads, 384 wide, context {args.ctx}, batch {args.batch}, dropout 0.2, "
        f"{'bf16 autocast, ' if amp else ''}compile {'on' if compile_ else 'off'}{f' (mode {args.mode})' if args.mode else ''} "
        f"for both; {args.rounds} alternating rounds of {args.steps} steps per model after {args.warmup} warmup steps, "
        "CUDA-synchronised; tokens/s from the median seconds per step over the rounds.",
        "",
        "| model | tokens/s (median of rounds) | min - max of rounds |",
        "|---|---|---|",
        *[f"| {k} | {v:,.0f} | {tok / max(per_step[k]):,.0f} - {tok / min(per_step[k]):,.0f} |" for k, v in med.items()],
        f"| **ratio (ours / nanoGPT-arch)** | **{ratio:.3f}** (goal >= 0.95 on the H100) | per-round ratios: median "
        f"{statistics.median(paired):.3f}, {min(paired):.3f} - {max(paired):.3f} |",
        "",
        *(["Profiled (10 steps each, profiler on): GPU busy per step " + ", ".join(
            f"{k} {v:.2f} ms" for k, v in busy.items()) + "; median wall time per step " + ", ".join(
            f"{k} {statistics.median(per_step[k]) * 1e3:.2f} ms" for k in busy) + ".", ""] if busy else []),
        f"Reproduce: `python benchmarks/traces/vs_nanogpt.py --device {args.device}{flags}`",
        "",
    ])
    print(md)
    if args.out:
        from statelab.io import atomic_write_text

        atomic_write_text(args.out, md)


if __name__ == "__main__":
    main()
