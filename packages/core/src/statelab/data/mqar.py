"""Multi-query associative recall (MQAR), the generator of Zoology (Arora et al., 2023).

An example of ``seq_len`` tokens over a vocabulary of ``V`` (P = ``num_kv_pairs``)::

    k1 v1 k2 v2 ... kP vP | . . k3 . . . . k1 . . k2 . . .
    '---- 2P tokens ----'   '-- queries: each key once, at even offsets --'

Keys are P distinct ids from ``1 .. V/2 - 1`` (the lower half; 0 is never a key), values P
distinct ids from ``V/2 .. V-1`` (the upper half), in random order. Each key is asked once
in the query section at offset ``2 * g`` with ``g`` drawn without replacement from
``0 .. (seq_len - 2P)/2 - 1`` with probability proportional to ``(g + 1) ** (power_a - 1)``
(Zoology's power law: most queries come soon after the key-value section). The target at a
query position is the key's value; loss and accuracy count only those P positions
(``Batch.mask``). The other query-section positions hold uniformly random tokens, and their
targets are simply the next input token (masked out).

Examples are generated in chunks of :data:`CHUNK` from ``(seed, split, chunk index)``:
example ``i`` of a split is the same whatever the batch size; training and validation use
different random streams. Training batch ``n`` takes examples ``n*B .. n*B + B - 1``
(modulo ``num_train``), i.e. epochs over the ``num_train`` examples in order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch
from torch import Tensor

from statelab.data.base import TRAIN, VAL, Batch, DataError, DataSource, rank_rows, rng_for
from statelab.tokenizers import IdsTokenizer

if TYPE_CHECKING:  # pragma: no cover
    from statelab.spec import MQARSpec

CHUNK = 512


def check_mqar(vocab_size: int, seq_len: int, num_kv_pairs: int) -> None:
    if seq_len < 4 * num_kv_pairs:
        raise DataError(
            f"MQAR: seq_len {seq_len} is too short for {num_kv_pairs} key-value pairs: the pairs take "
            f"{2 * num_kv_pairs} tokens and the queries need at least as many; use seq_len >= {4 * num_kv_pairs} "
            "or fewer num_kv_pairs"
        )
    if vocab_size // 2 - 1 < num_kv_pairs:
        raise DataError(
            f"MQAR: vocab_size {vocab_size} gives {vocab_size // 2 - 1} possible keys, fewer than num_kv_pairs "
            f"{num_kv_pairs}; use vocab_size >= {2 * num_kv_pairs + 2}"
        )


def _distinct(rng: np.random.Generator, n: int, low: int, high: int, k: int) -> np.ndarray:
    """(n, k): k distinct uniform ids from [low, high) per row, in uniformly random order.

    Floyd's subset sampling, vectorised over rows (O(n k^2), independent of high - low),
    then a uniform shuffle of each row."""
    size = high - low
    sel = np.empty((n, k), dtype=np.int64)
    for i, j in enumerate(range(size - k, size)):
        t = rng.integers(0, j + 1, size=n)
        taken = (sel[:, :i] == t[:, None]).any(axis=1)
        sel[:, i] = np.where(taken, j, t)
    order = np.argsort(rng.random((n, k)), axis=1)
    return low + np.take_along_axis(sel, order, axis=1)


def mqar_examples(
    rng: np.random.Generator, n: int, *, vocab_size: int, seq_len: int, num_kv_pairs: int, power_a: float = 0.01
) -> tuple[Tensor, Tensor, Tensor]:
    """``n`` examples: inputs, targets (both (n, seq_len) int64) and the query mask ((n, seq_len) bool)."""
    V, T, P = vocab_size, seq_len, num_kv_pairs
    check_mqar(V, T, P)
    keys = _distinct(rng, n, 1, V // 2, P)  # (n, P)
    values = _distinct(rng, n, V // 2, V, P)  # (n, P)
    space = (T - 2 * P) // 2
    # weighted sampling without replacement via Gumbel-top-k: log w + Gumbel noise, the P largest
    logw = (power_a - 1.0) * np.log(np.arange(1, space + 1, dtype=np.float64))  # (space,)
    scores = logw[None, :] - np.log(-np.log(rng.random((n, space))))  # (n, space)
    gaps = np.argpartition(-scores, P - 1, axis=1)[:, :P]  # (n, P)

    seq = rng.integers(0, V, size=(n, T + 1), dtype=np.int64)  # random filler everywhere, then overwrite
    seq[:, 0 : 2 * P : 2] = keys
    seq[:, 1 : 2 * P : 2] = values
    qpos = 2 * P + 2 * gaps  # (n, P): query positions, all < T - 1
    np.put_along_axis(seq, qpos, keys, axis=1)
    x = seq[:, :-1]  # (n, T) view
    y = seq[:, 1:].copy()  # (n, T)
    np.put_along_axis(y, qpos, values, axis=1)
    mask = np.zeros((n, T), dtype=bool)
    np.put_along_axis(mask, qpos, True, axis=1)
    return torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(mask)


class MQARData(DataSource):
    """MQAR examples as a data source (see the module doc); tokens are ids (``ids`` tokenizer)."""

    kind = "mqar"

    def __init__(self, spec: "MQARSpec", *, seed: int) -> None:
        check_mqar(spec.vocab_size, spec.seq_len, spec.num_kv_pairs)
        self.spec = spec
        self.seed = seed
        self.tokenizer = IdsTokenizer(spec.vocab_size)
        self.vocab_size = spec.vocab_size
        self.bytes_per_token = 1.0
        self._chunks: dict[tuple[int, int], tuple[Tensor, Tensor, Tensor]] = {}

    def _chunk(self, split: int, c: int) -> tuple[Tensor, Tensor, Tensor]:
        key = (split, c)
        if key not in self._chunks:
            total = self.spec.num_train if split == TRAIN else self.spec.num_val
            n = min(CHUNK, total - c * CHUNK)
            s = self.spec
            self._chunks[key] = mqar_examples(rng_for(self.seed, split, c), n, vocab_size=s.vocab_size,
                                              seq_len=s.seq_len, num_kv_pairs=s.num_kv_pairs, power_a=s.power_a)
            if len(self._chunks) > 8:  # keep a few recent chunks
                del self._chunks[next(iter(self._chunks))]
        return self._chunks[key]

    def examples(self, split: int, index: np.ndarray) -> Batch:
        """The examples ``index`` (1-D) of a split (``TRAIN`` or ``VAL``) as a batch."""
        xs, ys, ms = [], [], []
        chunk_of = index // CHUNK
        for c in np.unique(chunk_of).tolist():
            sel = torch.from_numpy(index[chunk_of == c] - c * CHUNK)
            x, y, m = self._chunk(split, c)
            xs.append(x.index_select(0, sel))  # (n_c, T)
            ys.append(y.index_select(0, sel))
            ms.append(m.index_select(0, sel))
        # back to the order of index
        order = torch.from_numpy(np.argsort(np.argsort(chunk_of, kind="stable"), kind="stable"))
        return Batch(*(torch.cat(t).index_select(0, order) for t in (xs, ys, ms)))

    def _check_len(self, seq_len: int) -> None:
        if seq_len != self.spec.seq_len:
            raise DataError(
                f"MQAR examples have data.mqar.seq_len = {self.spec.seq_len} tokens but seq_len {seq_len} was asked "
                f"for; set train.seq_len: {self.spec.seq_len} (or data.mqar.seq_len: {seq_len})"
            )

    def train_batch(
        self, step: int, batch_size: int, seq_len: int, *, mode: str = "random", rank: int = 0, world_size: int = 1
    ) -> Batch:
        self._check_mode(mode, ("random",))
        self._check_len(seq_len)
        rows = rank_rows(batch_size, rank, world_size)
        index = (step * batch_size + np.arange(rows.start, rows.stop, dtype=np.int64)) % self.spec.num_train
        return self.examples(TRAIN, index)

    def val_batches(self, batch_size: int, seq_len: int, max_batches: int | None = None) -> Iterator[Batch]:
        """The ``num_val`` validation examples in order (the first ``max_batches`` batches if given)."""
        self._check_len(seq_len)
        n = self.spec.num_val if max_batches is None else min(self.spec.num_val, max_batches * batch_size)
        for lo in range(0, n, batch_size):
            yield self.examples(VAL, np.arange(lo, min(n, lo + batch_size), dtype=np.int64))


__all__ = ["CHUNK", "MQARData", "check_mqar", "mqar_examples"]
