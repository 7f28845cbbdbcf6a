"""Training step time with persistent traces on, over off, at T=1024.

    python benchmarks/traces/step_time.py --device cuda           # H100: the <= 1.10 goal
    python benchmarks/traces/step_time.py --device cpu            # small CPU version

"Off" is the transformer with traces disabled (the flash path). "On" has traces enabled
and populated (every head holds entries, as after training), so every step runs the
biased attention (the default ``attention: auto``: on an H100 cuDNN's fused kernel with the
bias and the causal mask together; elsewhere SDPA with a float mask, in ``bias_chunks`` query
blocks) with the default fixed alpha (a non-learnable tensor: no bias gradient). One
step in ``update_interval`` is a capture step: a forward-only pass over ``capture_rows``
rows (explicit attention weights, no gradient) before the ordinary step. The ratio reported
is the amortised one, ``((interval - 1) * biased + capture) / interval`` over the off step
with ``interval`` = 100 (the prototype's default), each step time a median over ``--steps``
timed steps; the variants' steps are interleaved so that load drift affects them alike.
``--mask`` adds the float-mask path (``attention: sdpa``), the default before the fused
kernel. ``--learn-alpha`` adds the learnable-alpha variant (its gradient through the bias costs a
scatter in the attention backward). ``--chunks N,...`` adds the default path with other
``bias_chunks``. ``--flex`` adds the FlexAttention path (``attention: flex``, CUDA) with the
module's kernel tiles; ``--tiles NAME,...`` (names of ``attn_kernels.TILES``) or
``--tiles-from FILE`` (the fastest ``--top`` tile choices in ``attn_kernels.py --json FILE``)
add it with other tiles. Both sides are compiled unless ``--no-compile``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
from pathlib import Path
import statistics
import time

import torch
import torch.nn.functional as F

import statelab


def make(traces: bool, d: int, layers: int, heads: int, T: int, vocab: int, learn_alpha: bool = False,
         attention: str = "auto", chunks: int | None = None):
    tr = {"enabled": traces, "warmup_steps": 0, "alpha_warmup_steps": 0, "update_interval": 1_000_000, "learn_alpha": learn_alpha,
          "attention": attention, **({"bias_chunks": chunks} if chunks else {})}
    spec = {"name": "bench", "tokenizer": {"kind": "byte"},
            "model": {"d_model": d, "vocab_size": vocab,
                      "backbone": {"kind": "transformer", "n_layers": layers, "n_heads": heads, "max_seq_len": T, "traces": tr}},
            "tracking": {"enabled": False}}
    return statelab.build(spec)


def set_interval(model, interval: int) -> None:
    for block in model.backbone.layers:
        block.attn.traces.update_interval = interval


def populate(model, x) -> None:
    """One capture with theta = 0 (as training would, but keeping every salient offset), so every head has entries."""
    for block in model.backbone.layers:
        block.attn.traces.threshold = 0.0
    set_interval(model, 1)
    model.train()
    with torch.no_grad():
        model.backbone.begin_step(int(model.backbone.train_step) + 1, model.embed(x))
    set_interval(model, 1_000_000)


class Runner:
    """One model, its optimizer and (optionally) its compiled forward; ``step()`` times one train step."""

    def __init__(self, model, x, amp, compile_, capture: bool | None = None, tiles=None) -> None:
        self.model, self.x, self.amp, self.capture, self.tiles = model, x, amp, capture, tiles
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=x.device.type == "cuda")
        self.fwd = torch.compile(model) if compile_ else model
        self.times: list[float] = []

    def step(self, record: bool) -> None:
        model, x = self.model, self.x
        model.train()
        if self.capture is not None:  # force (or suppress) a capture on this step
            set_interval(model, 1 if self.capture else 1_000_000)
        from traces_crystallize import transformer

        # this variant's FlexAttention tiles (read when the graph is traced; set at every step so that each
        # compiled variant's guard on them keeps passing)
        transformer._FLEX_KERNEL_OPTIONS = self.tiles
        cuda = x.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.amp):
            bb = model.backbone
            if bb.ticking:  # what the trainer's callback does before a step: the counter, a capture when due
                step = int(bb.train_step) + 1
                due = bb.is_capture_step(step)
                bb.begin_step(step, model.embed(x[: bb.params.traces.capture_rows, :-1]) if due else None)
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
    ap.add_argument("--no-compile", action="store_true", help="run both variants eagerly")
    ap.add_argument("--learn-alpha", action="store_true", help="also time the learnable-alpha variant")
    ap.add_argument("--mask", action="store_true", help="also time the float-mask path (attention: sdpa)")
    ap.add_argument("--flex", action="store_true", help="also time the biased attention through FlexAttention (CUDA)")
    ap.add_argument("--chunks", default="", help="comma-separated bias_chunks values to time as extra variants")
    ap.add_argument("--tiles", default="", help="comma-separated names of attn_kernels.TILES to time as extra variants")
    ap.add_argument("--tiles-from", help="attn_kernels.py --json output: add its fastest --top tile choices")
    ap.add_argument("--top", type=int, default=1)
    ap.add_argument("--out", help="write the markdown section to this file")
    a = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from attn_kernels import TILES
    from traces_crystallize import transformer

    default_tiles = transformer._FLEX_KERNEL_OPTIONS
    tiles = [t for t in a.tiles.split(",") if t]
    if a.tiles_from:
        timings = json.loads(Path(a.tiles_from).read_text())
        ranked = sorted((ms, name.removeprefix("flex + bias, fixed, ")) for name, ms in timings.items()
                        if name.startswith("flex + bias, fixed, ") and not math.isnan(ms))
        tiles += [name for _, name in ranked[: a.top] if name not in tiles]
    tiles = [t for t in tiles if TILES[t] != default_tiles]  # the "on" variant already runs the default
    torch._dynamo.config.cache_size_limit = 32  # one compiled entry per variant
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    compile_ = not a.no_compile
    B = a.batch or (16 if cuda else 2)
    d = a.d or (512 if cuda else 128)
    L = a.layers or (8 if cuda else 2)
    steps = a.steps or (30 if cuda else 5)
    warmup = a.warmup if a.warmup is not None else (5 if cuda else 2)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    V = 256
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, V, (B, a.T + 1), generator=g).to(device)
    variants = [("off", False, False), ("on", True, False)] + ([("learnable", True, True)] if a.learn_alpha else [])
    variants += [("mask", True, False)] if a.mask else []
    variants += [("flex", True, False)] if (a.flex or tiles) and cuda else []
    variants += [(f"chunks: {c}", True, False) for c in a.chunks.split(",") if c]
    tiles = tiles if cuda else []  # FlexAttention runs on CUDA only
    variants += [(f"tiles: {t}", True, False) for t in tiles]
    models = {}
    for name, traces, learn in variants:
        torch.manual_seed(0)
        flex = name == "flex" or name.startswith("tiles: ")
        models[name] = make(traces, d, L, a.heads, a.T, V, learn_alpha=learn, attention="flex" if flex else ("sdpa" if name == "mask" else "auto"),
                            chunks=int(name[8:]) if name.startswith("chunks: ") else None).to(device)
        if traces:
            populate(models[name], x[:, :-1])
    entries = sum(b.attn.traces.n_live for b in models["on"].backbone.layers)
    rows = models["on"].backbone.params.traces.capture_rows
    runners = {name: Runner(models[name], x, cuda, compile_, capture=None if name == "off" else False,
                            tiles=TILES[name[7:]] if name.startswith("tiles: ") else default_tiles)
               for name, _, _ in variants}
    capture = Runner(models["on"], x, cuda, compile_, capture=True, tiles=default_tiles)
    capture.opt, capture.fwd = runners["on"].opt, runners["on"].fwd  # same compiled model: a capture must not recompile
    for i in range(warmup + steps):  # interleaved, so load drift hits every variant alike
        for r in runners.values():
            r.step(record=i >= warmup)
        if i == 0 or (i >= warmup and (i - warmup) % 3 == 0):
            capture.step(record=i >= warmup)
    res = {name: statistics.median(r.times) for name, r in runners.items()}
    res["capture"] = statistics.median(capture.times)

    def amortised(name: str) -> float:
        return ((a.interval - 1) * res[name] + res["capture"]) / a.interval / res["off"]

    tiles_arg = " --tiles '" + ",".join(tiles) + "'" if tiles else ""
    dev = torch.cuda.get_device_name(device) if cuda else f"cpu {platform.machine()}, {torch.get_num_threads()} threads"
    chunks = models["on"].backbone.params.traces.bias_chunks
    probe = torch.zeros(1, a.heads, a.T, d // a.heads, device=device, dtype=torch.bfloat16 if cuda else torch.float32)
    if transformer.cudnn_causal_bias_ok(probe, torch.zeros(a.heads, a.T, device=device), 0, 0.0):
        kernel = "cuDNN's fused kernel with the bias and the causal mask (attention: auto)"
    else:
        kernel = f"SDPA + float mask in {chunks} query blocks"
    rows_md = [
        f"| traces off (SDPA causal: cuDNN / flash) | {res['off'] * 1e3:.1f} ms |",
        f"| traces on, biased attention (fixed alpha, the default) | {res['on'] * 1e3:.1f} ms ({res['on'] / res['off']:.3f}x) |",
        f"| traces on, capture step (forward-only pass over {rows} rows + the step) | {res['capture'] * 1e3:.1f} ms ({res['capture'] / res['off']:.3f}x) |",
    ]
    if "learnable" in res:
        rows_md.append(f"| traces on, biased attention, learnable alpha (bias gradient) | {res['learnable'] * 1e3:.1f} ms "
                       f"({res['learnable'] / res['off']:.3f}x) |")
    for name in res:
        if name in ("flex", "mask") or name.startswith("chunks: "):
            label = {"flex": "FlexAttention score_mod (module tiles)", "mask": "SDPA + float mask (attention: sdpa)"}.get(
                name, f"bias_chunks {name[8:]}")
            rows_md.append(f"| traces on, biased attention, {label} | {res[name] * 1e3:.1f} ms ({res[name] / res['off']:.3f}x) |")
    for name in res:
        if name.startswith("tiles: "):
            rows_md.append(f"| traces on, biased attention, FlexAttention {name} | {res[name] * 1e3:.1f} ms "
                           f"({res[name] / res['off']:.3f}x) |")
    rows_md.append(f"| **on / off, amortised over update_interval={a.interval}** | **{amortised('on'):.3f}** (goal <= 1.10 on the H100) |")
    for name in res:
        if name.startswith("tiles: "):
            rows_md.append(f"| on / off amortised, {name} (capture step as measured with the default tiles) "
                           f"| {amortised(name):.3f} |")
    for name in res:
        if name in ("flex", "mask") or name.startswith("chunks: "):
            rows_md.append(f"| on / off amortised, {name} | {amortised(name):.3f} |")
    if "learnable" in res:
        rows_md.append(f"| on / off amortised, learnable alpha | {amortised('learnable'):.3f} |")
    md = "\n".join([
        f"### Train step time, traces on / off, T={a.T} ({dev}, torch {torch.__version__})",
        "",
        f"{L} layers, {a.heads} heads, {d} wide, batch {B}, T={a.T}{', bf16 autocast' if cuda else ''}, "
        f"compile {'on' if compile_ else 'off'} (both); biased attention via {kernel}; {entries} trace entries in the model.",
        "",
        "| step | median time |",
        "|---|---|",
        *rows_md,
        "",
        f"Reproduce: `python benchmarks/traces/step_time.py --device {a.device}{' --no-compile' if not compile_ else ''}"
        f"{' --learn-alpha' if a.learn_alpha else ''}{' --mask' if a.mask else ''}{' --flex' if a.flex else ''}"
        f"{f' --chunks {a.chunks}' if a.chunks else ''}"
        f"{tiles_arg}`",
        "",
    ])
    print(md)
    if a.out:
        from statelab.io import atomic_write_text

        atomic_write_text(a.out, md)


if __name__ == "__main__":
    main()
