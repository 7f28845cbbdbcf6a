"""Training step time with persistent traces on, over off, at T=1024.

    python benchmarks/traces/step_time.py --device cuda           # H100: the <= 1.10 goal
    python benchmarks/traces/step_time.py --device cpu            # small CPU version

"Off" is the transformer with traces disabled (the flash path). "On" has traces enabled
and populated (every head holds entries, as after training), so every step runs the
biased attention (FlexAttention on CUDA, SDPA with a float mask on CPU), and one step in
``update_interval`` also runs the capture (explicit attention weights, no gradient). The
ratio reported is the amortised one: ``((interval - 1) * biased + capture) / interval``
over the off step, with ``interval`` = 100 (the prototype's default), each step time a
median over ``--steps`` timed steps; the variants' steps are interleaved so that load drift
affects them alike.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F

import statelab


def make(traces: bool, d: int, layers: int, heads: int, T: int, vocab: int, learn_alpha: bool = True):
    tr = {"enabled": traces, "warmup_steps": 0, "alpha_warmup_steps": 0, "update_interval": 1_000_000, "learn_alpha": learn_alpha}
    spec = {"name": "bench", "tokenizer": {"kind": "byte"},
            "model": {"d_model": d, "vocab_size": vocab,
                      "backbone": {"kind": "transformer", "n_layers": layers, "n_heads": heads, "max_seq_len": T, "traces": tr}},
            "tracking": {"enabled": False}}
    return statelab.build(spec)


def populate(model, x) -> None:
    """Capture traces from a few forward passes (as training would), so every head has entries."""
    for block in model.backbone.layers:
        t = block.attn.traces
        t.threshold = 0.0
    bb = model.backbone
    for block in bb.layers:
        block.attn.traces.update_interval = 1
    model.train()
    with torch.no_grad():
        model(x)
    for block in bb.layers:
        block.attn.traces.update_interval = 1_000_000


class Runner:
    """One model, its optimizer and (optionally) its compiled forward; ``step()`` times one train step."""

    def __init__(self, model, x, amp, compile_, capture: bool | None = None) -> None:
        self.model, self.x, self.amp, self.capture = model, x, amp, capture
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=x.device.type == "cuda")
        self.fwd = torch.compile(model) if compile_ else model
        self.times: list[float] = []

    def step(self, record: bool) -> None:
        model, x = self.model, self.x
        model.train()
        if self.capture is not None:
            for block in model.backbone.layers:  # force (or suppress) a capture on this step
                block.attn.traces.update_interval = 1 if self.capture else 1_000_000
        cuda = x.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.amp):
            logits = self.fwd(x[:, :-1])[0]
            loss = F.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten())
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if record:
            self.times.append(time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--T", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=None, help="default: 16 on CUDA, 2 on CPU")
    ap.add_argument("--d", type=int, default=None, help="width; default 512 on CUDA, 128 on CPU")
    ap.add_argument("--layers", type=int, default=None, help="default 8 on CUDA, 2 on CPU")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--steps", type=int, default=None, help="timed steps; default 30 on CUDA, 5 on CPU")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--interval", type=int, default=100, help="update_interval for the amortised ratio")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (both variants)")
    ap.add_argument("--out", help="write the markdown section to this file")
    a = ap.parse_args()
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    B = a.batch or (16 if cuda else 2)
    d = a.d or (512 if cuda else 128)
    L = a.layers or (8 if cuda else 2)
    steps = a.steps or (30 if cuda else 5)
    warmup = a.warmup if a.warmup is not None else (10 if cuda else 2)
    V = 256
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, V, (B, a.T + 1), generator=g).to(device)
    models = {}
    for name, traces, learn in (("off", False, True), ("biased", True, True), ("fixed", True, False)):
        torch.manual_seed(0)
        models[name] = make(traces, d, L, a.heads, a.T, V, learn_alpha=learn).to(device)
        if traces:
            populate(models[name], x[:, :-1])
    entries = sum(b.attn.traces.n_live for b in models["biased"].backbone.layers)
    runners = {
        "off": Runner(models["off"], x, cuda, a.compile),
        "biased": Runner(models["biased"], x, cuda, a.compile, capture=False),
        "fixed": Runner(models["fixed"], x, cuda, a.compile, capture=False),
    }
    capture = Runner(models["biased"], x, cuda, a.compile, capture=True)
    capture.opt = runners["biased"].opt
    for i in range(warmup + steps):  # interleaved, so load drift hits every variant alike
        for r in runners.values():
            r.step(record=i >= warmup)
        if i >= warmup and (i - warmup) % 5 == 0:
            capture.step(record=True)
    res = {name: statistics.median(r.times) for name, r in runners.items()}
    res["capture"] = statistics.median(capture.times)
    amort = ((a.interval - 1) * res["biased"] + res["capture"]) / a.interval
    amort_fixed = ((a.interval - 1) * res["fixed"] + res["capture"]) / a.interval
    ratio = amort / res["off"]
    dev = torch.cuda.get_device_name(device) if cuda else f"cpu {platform.machine()}, {torch.get_num_threads()} threads"
    kernel = "FlexAttention score_mod" if cuda else "SDPA + float mask"
    md = "\n".join([
        f"### Train step time, traces on / off, T={a.T} ({dev}, torch {torch.__version__})",
        "",
        f"{L} layers, {a.heads} heads, {d} wide, batch {B}, T={a.T}{', bf16 autocast' if cuda else ''}, "
        f"compile {'on' if a.compile else 'off'}; biased attention via {kernel}; {entries} trace entries in the model.",
        "",
        "| step | median time |",
        "|---|---|",
        f"| traces off (flash / SDPA causal) | {res['off'] * 1e3:.1f} ms |",
        f"| traces on, biased attention | {res['biased'] * 1e3:.1f} ms ({res['biased'] / res['off']:.3f}x) |",
        f"| traces on, capture step | {res['capture'] * 1e3:.1f} ms ({res['capture'] / res['off']:.3f}x) |",
        f"| traces on, biased attention, fixed alpha (learn_alpha: false, no bias gradient) | {res['fixed'] * 1e3:.1f} ms ({res['fixed'] / res['off']:.3f}x) |",
        f"| **on / off, amortised over update_interval={a.interval}** | **{ratio:.3f}** (goal <= 1.10 on the H100) |",
        f"| on / off amortised, fixed alpha | {amort_fixed / res['off']:.3f} |",
        "",
        f"Reproduce: `python benchmarks/traces/step_time.py --device {a.device}{' --compile' if a.compile else ''}`",
        "",
    ])
    print(md)
    if a.out:
        from statelab.io import atomic_write_text

        atomic_write_text(a.out, md)


if __name__ == "__main__":
    main()
