"""Short synthetic tasks on random tokens, for CPU checks: selective copying and induction.

Both are fixed-length examples with a loss mask, served like MQAR (:mod:`statelab.data.mqar`):
example ``i`` of a split is a pure function of ``(seed, split, i)``, training batch ``n``
takes examples ``n*B .. n*B + B - 1`` modulo ``num_train``.

**Selective copying** (Gu & Dao 2023, the Mamba paper's variant of the copying task). Ids:
``0`` noise, ``1`` separator, data tokens ``2 .. V-1``. An example is ``context_len``
positions holding ``num_tokens`` data tokens at random positions (in order) and noise
elsewhere, then the separator, then the data tokens again::

    . . a . . b . c . . . d | a b c d
                              '- answer: loss counts these positions only

The model has to remember which tokens appeared, in order, whatever the gaps.

**Induction** (the "induction head" pattern, Olsson et al. 2022). Ids: ``0`` the trigger,
``1 .. V-1`` ordinary tokens. A random sequence of ordinary tokens holds the trigger once,
followed by a value token ``v``; the last input is the trigger again and the target is
``v``::

    x x x x T v x x x x x x T -> v

Only the last position counts. Solving it needs one look-up of "what followed T".
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import torch
from torch import Tensor

from statelab.data.base import TRAIN, VAL, Batch, DataError, DataSource, rank_rows, rng_for
from statelab.tokenizers import IdsTokenizer

CHUNK = 512
Examples = Callable[[np.random.Generator, int], tuple[np.ndarray, np.ndarray, np.ndarray]]


def copy_examples(rng: np.random.Generator, n: int, *, vocab_size: int, context_len: int, num_tokens: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` selective-copying examples: x, y ``(n, context_len + num_tokens)`` int64, mask bool."""
    if vocab_size < 3:
        raise DataError(f"selective copying needs vocab_size >= 3 (noise, separator, data), got {vocab_size}")
    if num_tokens > context_len:
        raise DataError(f"selective copying: {num_tokens} tokens do not fit a context of {context_len}")
    L, K = context_len, num_tokens
    data = rng.integers(2, vocab_size, size=(n, K))  # (n, K)
    pos = np.sort(np.argsort(rng.random((n, L)), axis=1)[:, :K], axis=1)  # (n, K): K distinct sorted positions
    seq = np.zeros((n, L + 1 + K), dtype=np.int64)
    np.put_along_axis(seq, pos, data, axis=1)
    seq[:, L] = 1
    seq[:, L + 1 :] = data
    x, y = seq[:, :-1], seq[:, 1:]
    mask = np.zeros_like(y, dtype=bool)
    mask[:, L:] = True  # positions L .. L+K-1 predict the K answer tokens
    return x, y.copy(), mask


def induction_examples(rng: np.random.Generator, n: int, *, vocab_size: int, seq_len: int
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` induction examples: x, y ``(n, seq_len)`` int64; the mask marks the last position."""
    if vocab_size < 3:
        raise DataError(f"induction needs vocab_size >= 3 (trigger and at least two tokens), got {vocab_size}")
    if seq_len < 4:
        raise DataError(f"induction needs seq_len >= 4, got {seq_len}")
    T = seq_len
    seq = rng.integers(1, vocab_size, size=(n, T + 1))
    p = rng.integers(0, T - 2, size=n)  # trigger position, its value at p + 1 < T - 1
    rows = np.arange(n)
    seq[rows, p] = 0
    seq[:, T - 1] = 0
    seq[:, T] = seq[rows, p + 1]
    x, y = seq[:, :-1], seq[:, 1:].copy()
    mask = np.zeros((n, T), dtype=bool)
    mask[:, T - 1] = True
    return x, y, mask


class SyntheticData(DataSource):
    """Fixed-length masked examples from ``examples(rng, n)`` (see the module doc)."""

    def __init__(self, kind: str, examples: Examples, *, vocab_size: int, example_len: int, num_train: int,
                 num_val: int, seed: int) -> None:
        self.kind = kind
        self._examples = examples
        self.vocab_size = vocab_size
        self.tokenizer = IdsTokenizer(vocab_size)
        self.example_len = example_len
        self.num_train, self.num_val, self.seed = num_train, num_val, seed
        self._chunks: dict[tuple[int, int], tuple[Tensor, Tensor, Tensor]] = {}

    def _chunk(self, split: int, c: int) -> tuple[Tensor, Tensor, Tensor]:
        key = (split, c)
        if key not in self._chunks:
            total = self.num_train if split == TRAIN else self.num_val
            n = min(CHUNK, total - c * CHUNK)
            x, y, m = self._examples(rng_for(self.seed, split, c), n)
            self._chunks[key] = (torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y), torch.from_numpy(m))
            if len(self._chunks) > 8:
                del self._chunks[next(iter(self._chunks))]
        return self._chunks[key]

    def examples(self, split: int, index: np.ndarray) -> Batch:
        rows = [tuple(t[i % CHUNK] for t in self._chunk(split, int(i) // CHUNK)) for i in index.tolist()]
        return Batch(*(torch.stack([r[j] for r in rows]) for j in range(3)))

    def _check_len(self, seq_len: int) -> None:
        if seq_len != self.example_len:
            raise DataError(f"{self.kind} examples have {self.example_len} tokens but seq_len {seq_len} was asked for; "
                            f"set train.seq_len: {self.example_len}")

    def train_batch(self, step: int, batch_size: int, seq_len: int, *, mode: str = "random", rank: int = 0,
                    world_size: int = 1) -> Batch:
        self._check_mode(mode, ("random",))
        self._check_len(seq_len)
        rows = rank_rows(batch_size, rank, world_size)
        index = (step * batch_size + np.arange(rows.start, rows.stop, dtype=np.int64)) % self.num_train
        return self.examples(TRAIN, index)

    def val_batches(self, batch_size: int, seq_len: int, max_batches: int | None = None) -> Iterator[Batch]:
        self._check_len(seq_len)
        n = self.num_val if max_batches is None else min(self.num_val, max_batches * batch_size)
        for lo in range(0, n, batch_size):
            yield self.examples(VAL, np.arange(lo, min(n, lo + batch_size), dtype=np.int64))


__all__ = ["SyntheticData", "copy_examples", "induction_examples"]
