"""Probe ``memory-use``: does the model's loss depend on its memory's recall?

Config (``MemoryUseParams`` in plugin.py): ``internal`` (default ``memory.recall``),
``threshold`` (nats/token), ``batches``, ``batch_size``, ``seq_len``.

The validation loss is measured twice on the same batches: as is, and inside
``statelab.intervene({internal: 0.0})``, which forces every published recall vector to
zero (every memory, and the memories inside CRSD cells). ``delta = loss_ablated - loss``;
the verdict is ``"used"`` when ``delta > threshold``, else ``"unused"`` (a memory whose
removal changes nothing is not being used).

Batches, in order of preference: ``ctx.extra["data"]`` (a statelab DataSource), windows of
``ctx.val_tokens`` (text), or the model's own spec's data (``statelab.data.make_data``;
this is how MQAR, whose loss counts only the query positions, is probed).
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

import statelab
from statelab.interfaces import Probe, ProbeContext, ProbeResult


def _loss(model, x: Tensor, y: Tensor, mask: Tensor | None) -> tuple[float, int]:
    logits, _, _ = model(x)  # (B, T, V)
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1), reduction="none")  # (B*T,)
    if mask is not None:
        ce = ce[mask.reshape(-1)]
    return ce.double().sum().item(), ce.numel()


class MemoryUseProbe(Probe):
    def __init__(self, internal: str = "memory.recall", threshold: float = 0.01, batches: int = 8,
                 batch_size: int = 8, seq_len: int = 128) -> None:
        self.internal, self.threshold = internal, threshold
        self.batches, self.batch_size, self.seq_len = batches, batch_size, seq_len

    def _batches(self, model, ctx: ProbeContext) -> Iterator[tuple[Tensor, Tensor, Tensor | None]]:
        data = ctx.extra.get("data")
        if data is None and ctx.val_tokens is None and getattr(model, "spec", None) is not None:
            from statelab.data import make_data

            data = make_data(model.spec, seed=ctx.seed)
        if data is not None:
            seq_len = data.spec.seq_len if getattr(data, "kind", "") == "mqar" else self.seq_len
            for b in data.val_batches(self.batch_size, seq_len, self.batches):
                yield b.x, b.y, b.mask
            return
        toks = ctx.val_tokens
        if toks is None:
            raise ValueError(
                "memory-use probe: no validation data; pass ProbeContext(val_tokens=...) or "
                "ProbeContext(extra={'data': <DataSource>}), or run it through `statelab train`"
            )
        T = min(self.seq_len, len(toks) - 1)
        if T < 2:
            raise ValueError(f"memory-use probe: {len(toks)} validation tokens are too few; give at least 3")
        g = torch.Generator().manual_seed(ctx.seed)
        for _ in range(self.batches):
            starts = torch.randint(0, len(toks) - T, (self.batch_size,), generator=g).tolist()
            x = torch.stack([toks[s : s + T] for s in starts])  # (B, T)
            y = torch.stack([toks[s + 1 : s + T + 1] for s in starts])  # (B, T)
            yield x, y, None

    def run(self, model, ctx: ProbeContext) -> ProbeResult:
        was = model.training
        model.eval()
        tot = {"base": 0.0, "ablated": 0.0}
        n = 0
        try:
            with torch.no_grad():
                for x, y, mask in self._batches(model, ctx):
                    x, y = x.to(ctx.device), y.to(ctx.device)
                    mask = None if mask is None else mask.to(ctx.device)
                    s, c = _loss(model, x, y, mask)
                    with statelab.intervene({self.internal: 0.0}):
                        s0, _ = _loss(model, x, y, mask)
                    tot["base"] += s
                    tot["ablated"] += s0
                    n += c
        finally:
            model.train(was)
        if n == 0:
            raise ValueError("memory-use probe: the validation batches held no target positions")
        loss, ablated = tot["base"] / n, tot["ablated"] / n
        delta = ablated - loss
        used = delta > self.threshold
        metrics = {
            "loss": loss,
            "loss_without_recall": ablated,
            "delta": delta,
            "relative_delta": delta / max(loss, 1e-12),
            "threshold": self.threshold,
        }
        return ProbeResult(metrics, verdict="used" if used else "unused", passed=bool(used))


def build(params, ctx) -> MemoryUseProbe:
    return MemoryUseProbe(params.internal, params.threshold, params.batches, params.batch_size, params.seq_len)
