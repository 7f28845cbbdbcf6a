"""Helpers shared by the probes: validation windows, reading an internal, atomic artifact writes."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor

from statelab.internals import key_name, select


def windows(ctx, vocab_size: int, n: int, T: int) -> Tensor:
    """``n`` windows of ``T`` tokens (n, T) from the validation tokens (random start
    positions under ``ctx.seed``), or uniform random tokens when the context has none."""
    g = torch.Generator().manual_seed(ctx.seed)
    toks = ctx.val_tokens
    if toks is None:
        return torch.randint(0, vocab_size, (n, T), generator=g)
    toks = toks.reshape(-1).long().cpu()
    if len(toks) < T + 1:
        raise ValueError(f"the validation split has {len(toks)} tokens, fewer than seq_len={T} + 1; lower seq_len")
    starts = torch.randint(0, len(toks) - T, (n,), generator=g)
    return torch.stack([toks[s : s + T] for s in starts.tolist()])


def pick(aux: dict[str, Tensor], internal: str, seen: list[str] | None = None) -> dict[str, Tensor]:
    """The entries of ``internal`` in ``aux``, or a ``LookupError`` naming what the model publishes."""
    got = select(aux, internal)
    if not got:
        names = sorted({key_name(k) for k in aux})
        raise LookupError(
            f"the model publishes no internal {internal!r} (it publishes: {', '.join(names) or 'nothing'}); "
            "pick one of those names (`statelab build SPEC` lists them)"
        )
    return got


def per_position(v: Tensor, B: int, T: int) -> Tensor:
    """Reduce an internal to one number per position (B, T) by averaging its trailing dims;
    internals without a time dim give (B, 1)."""
    v = v.detach().float()
    if v.dim() >= 2 and v.shape[0] == B and v.shape[1] == T:
        return v.reshape(B, T, -1).mean(-1)
    if v.dim() >= 1 and v.shape[0] == B:
        return v.reshape(B, -1).mean(-1, keepdim=True)
    return v.mean().reshape(1, 1).expand(B, 1)  # not batch-first: one global value


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary file name beside ``path``; on success it is renamed over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


@contextmanager
def eval_mode(model) -> Iterator[None]:
    """Probes leave the model in the mode they found it in."""
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover
        return torch.device("cpu")
