"""Window arithmetic over a 1-D token array: random windows, contiguous streams, validation.

Each function returns start offsets (and flags); :func:`gather` turns offsets into a
(B, L) int64 tensor in one vectorised indexing operation (works on ``np.memmap``).

Stream layout (truncated BPTT). With ``N`` tokens and a global batch of ``B`` rows, row ``b``
owns the contiguous stream ``tokens[b*S : (b+1)*S]`` with ``S = N // B``. Batch ``n`` is window
``k = n mod K`` of every stream, ``K = (S - 1) // T`` windows of ``T`` inputs (the last target
of window ``k`` is the first input of window ``k + 1``), so batch ``n + 1`` continues exactly
where batch ``n`` ended. When ``k`` wraps to 0 the streams restart: ``reset`` is all-True
there (and at step 0), and the model state of those rows must be re-initialised.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from statelab.data.base import DataError


def gather(tokens: np.ndarray, starts: np.ndarray, length: int) -> Tensor:
    """``out[b] = tokens[starts[b] : starts[b] + length]`` as a (B, length) int64 tensor."""
    idx = np.asarray(starts, dtype=np.int64)[:, None] + np.arange(length, dtype=np.int64)  # (B, L)
    return torch.from_numpy(np.asarray(tokens[idx], dtype=np.int64))


def random_starts(rng: np.random.Generator, n_tokens: int, batch_size: int, seq_len: int, source: str) -> np.ndarray:
    """``batch_size`` uniform starts of windows of ``seq_len + 1`` tokens (inputs plus the shifted target)."""
    if n_tokens < seq_len + 1:
        raise DataError(
            f"{source}: the training split has {n_tokens} tokens, fewer than one window of seq_len + 1 = "
            f"{seq_len + 1}; use a longer corpus or a smaller train.seq_len"
        )
    return rng.integers(0, n_tokens - seq_len, size=batch_size, dtype=np.int64)


def stream_starts(step: int, n_tokens: int, batch_size: int, seq_len: int, source: str) -> tuple[np.ndarray, bool]:
    """Starts of batch ``step`` in stream mode and whether the streams (re)start there."""
    stream_len = n_tokens // batch_size
    windows = (stream_len - 1) // seq_len
    if windows < 1:
        raise DataError(
            f"{source}: {n_tokens} training tokens split into {batch_size} streams give {stream_len} tokens per "
            f"stream, fewer than one window of seq_len + 1 = {seq_len + 1}; lower train.batch_size or train.seq_len"
        )
    k = step % windows
    return np.arange(batch_size, dtype=np.int64) * stream_len + k * seq_len, k == 0


def val_windows(n_tokens: int, batch_size: int, seq_len: int, max_batches: int | None) -> list[list[tuple[int, int]]]:
    """Batches of validation windows ``(start, length)``.

    A window's ``length`` inputs predict ``tokens[start + 1 : start + 1 + length]``.

    ``max_batches=None`` (or more batches than the split has): non-overlapping windows covering
    the split, so each token after the first is predicted exactly once; the last window may be
    shorter. Otherwise ``max_batches * batch_size`` full windows at evenly spaced starts.
    """
    n_pred = n_tokens - 1  # the first token has no context
    if n_pred < 1:
        raise DataError(f"the validation split has {n_tokens} token(s); at least 2 are needed")
    n_full = math.ceil(n_pred / seq_len)
    if max_batches is None or max_batches * batch_size >= n_full or n_pred < seq_len:
        wins = [(s, min(seq_len, n_pred - s)) for s in range(0, n_pred, seq_len)]
        if max_batches is not None:
            wins = wins[: max_batches * batch_size]
    else:
        count = max_batches * batch_size
        starts = np.round(np.linspace(0, n_pred - seq_len, count)).astype(np.int64)
        wins = [(int(s), seq_len) for s in starts]
    return [wins[i : i + batch_size] for i in range(0, len(wins), batch_size)]


def gather_windows(
    tokens: np.ndarray, wins: list[tuple[int, int]], seq_len: int
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(x, y, mask) for validation windows; short windows are padded with 0 and masked out."""
    starts = np.array([s for s, _ in wins], dtype=np.int64)
    lengths = np.array([n for _, n in wins], dtype=np.int64)
    if (lengths == seq_len).all():
        xy = gather(tokens, starts, seq_len + 1)  # (B, T+1)
        return xy[:, :-1], xy[:, 1:], None
    pos = np.arange(seq_len + 1, dtype=np.int64)
    valid = pos[None, :] <= lengths[:, None]  # (B, T+1): the window's inputs and its last target
    idx = np.where(valid, starts[:, None] + pos[None, :], 0)  # (B, T+1)
    xy = torch.from_numpy(np.where(valid, np.asarray(tokens[idx], dtype=np.int64), 0))
    mask = torch.from_numpy(pos[None, :seq_len] < lengths[:, None])  # (B, T)
    return xy[:, :-1], xy[:, 1:], mask


__all__ = ["gather", "gather_windows", "random_starts", "stream_starts", "val_windows"]
