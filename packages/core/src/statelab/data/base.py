"""The data contract: :class:`Batch` and :class:`DataSource`, and the seeding rule they share.

A data source is a pure function of ``(seed, step, rank, world_size)``: the batch of step
``n`` is computed from those numbers alone, so resuming a run at step ``n`` needs no data
state, and ``W`` data-parallel ranks together see exactly the rows of a single-process run
with the same global batch (rank ``r`` takes rows ``[r*B/W, (r+1)*B/W)``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch import Tensor

from statelab.tokenizers import Tokenizer

# stream ids that keep the random numbers of different uses of one seed independent
TRAIN, VAL, MIX = 0, 1, 2


class DataError(ValueError):
    """The data cannot be read or batched as asked; the message names the input and what to do."""


def rng_for(seed: int, *keys: int) -> np.random.Generator:
    """A generator that depends only on ``seed`` and ``keys`` (e.g. ``TRAIN, step``)."""
    return np.random.default_rng([seed & 0xFFFF_FFFF_FFFF_FFFF, *keys])


def rank_rows(batch_size: int, rank: int, world_size: int) -> slice:
    """Rows of the global batch that belong to ``rank``."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is not in 0..{world_size - 1} (world_size={world_size})")
    if batch_size % world_size:
        raise DataError(
            f"the global batch size {batch_size} is not divisible by the {world_size} data-parallel ranks; "
            f"set train.batch_size to a multiple of {world_size}"
        )
    per = batch_size // world_size
    return slice(rank * per, (rank + 1) * per)


@dataclass
class Batch:
    """One batch of next-token prediction.

    ``x``/``y``: (B, T) int64 inputs and targets. ``mask``: (B, T) bool, the positions that
    count for loss and accuracy (MQAR: the query positions; a short last validation window:
    its real positions), ``None`` = all. ``reset``: (B,) bool, stream mode only: rows that
    start a new stream, whose carried state must be re-initialised before this batch.
    """

    x: Tensor
    y: Tensor
    mask: Tensor | None = None
    reset: Tensor | None = None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        def mv(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return Batch(mv(self.x), mv(self.y), mv(self.mask), mv(self.reset))  # type: ignore[arg-type]

    @property
    def n_targets(self) -> int:
        """Number of positions that count (the denominator of a mean loss)."""
        return int(self.y.numel() if self.mask is None else self.mask.sum())


class DataSource:
    """Training batches by step, and a deterministic validation pass (see the module doc)."""

    tokenizer: Tokenizer
    vocab_size: int
    #: UTF-8 bytes of validation text per validation token: bits per byte = loss / ln 2 / bytes_per_token
    bytes_per_token: float = 1.0
    #: characters of validation text per validation token (text kinds; None otherwise)
    chars_per_token: float | None = None
    kind: str = ""

    @property
    def train_tokens(self) -> Tensor | None:
        """The training split as a 1-D int64 tensor (text kinds); ``None`` for synthetic tasks."""
        return None

    @property
    def val_tokens(self) -> Tensor | None:
        return None

    def train_batch(
        self, step: int, batch_size: int, seq_len: int, *, mode: str = "random", rank: int = 0, world_size: int = 1
    ) -> Batch:  # pragma: no cover - abstract
        raise NotImplementedError

    def val_batches(
        self, batch_size: int, seq_len: int, max_batches: int | None = None
    ) -> Iterator[Batch]:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> str:
        return f"{self.kind} data, {self.tokenizer.kind} tokenizer, vocabulary {self.vocab_size}"

    def _check_mode(self, mode: str, allowed: tuple[str, ...]) -> None:
        if mode not in ("random", "stream"):
            raise DataError(f"unknown batching mode {mode!r}; use 'random' or 'stream'")
        if mode not in allowed:
            raise DataError(
                f"{self.kind} examples are independent documents, so stream batching (carried state across "
                f"batches) does not apply; set train.batching: random"
            )


__all__ = ["Batch", "DataError", "DataSource", "MIX", "TRAIN", "VAL", "rank_rows", "rng_for"]
