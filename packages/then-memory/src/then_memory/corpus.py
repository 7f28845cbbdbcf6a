"""A training corpus for stateful pretraining: Tiny Shakespeare interleaved with passkey documents.

The core's passkey data (``statelab.data.passkey``) mixes passkey documents only into
*random* windows, where no state is carried. For the ``then`` memory the point is the
opposite: the key must be written into memory in one training segment and read back in a
later one. So the documents are written into the text itself, and ``train.batching:
stream`` (contiguous streams, state carried and detached between segments) sees each
document's key several segments before its question, exactly as at ingest time.

Each document uses the Landmark filler and wording of :mod:`statelab.data.passkey`::

    <filler, a chars>
    The pass key is K. Remember it. K is the pass key.
    <filler, b chars>
    What is the pass key? The pass key is K.

with ``a + b`` drawn from ``lengths`` (characters, = tokens for the char tokenizer) and the
key at a uniform random depth. Documents and Shakespeare passages alternate, at least
``min_gap`` characters of Shakespeare apart, so that a memory ring of ``min_gap`` traces
never holds an earlier document's key when a question is asked.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from statelab.io import atomic_write_text


def passkey_document_text(length: int, depth: float, key: str) -> str:
    from statelab.data.passkey import FILLER, KEY_LINE, QUESTION, SEP

    a = int(round(depth * length))
    fill = lambda n: (FILLER * (n // len(FILLER) + 1))[:n]  # noqa: E731
    key_line = f"{KEY_LINE[0]}{key}{KEY_LINE[1]}{key}{KEY_LINE[2]}"
    return f"{fill(a)}{SEP}{key_line}{SEP}{fill(length - a)}{SEP}{QUESTION} {key}.\n\n"


def make_passkey_corpus(
    out: str | os.PathLike,
    *,
    docs: int = 400,
    lengths: Sequence[int] = (512, 1024, 2048),
    digits: int = 5,
    seed: int = 0,
    base_text: str | None = None,
    min_gap: int | None = None,
) -> dict:
    """Write the corpus to ``out`` (atomically); returns counts.

    ``min_gap``: at least this many characters of the base text between two documents
    (default: the longest document). With a memory ring of at most ``min_gap`` traces, a
    document's key and answer have left the ring before the next document's question, so
    every question has exactly one key to find."""
    if base_text is None:
        from statelab.data import bundled_corpus_path

        base_text = Path(bundled_corpus_path()).read_text(encoding="utf-8")
    gap = max(lengths) if min_gap is None else min_gap
    spacing = len(base_text) // docs
    if spacing < gap + 100:
        raise ValueError(f"{docs} documents at least {gap} characters apart do not fit in {len(base_text)} characters "
                         f"of text; use at most {len(base_text) // (gap + 100)} documents or a smaller min_gap")
    rng = np.random.default_rng(seed)
    parts, prev, n_doc_chars = [], 0, 0
    for i in range(docs):
        c = i * spacing + int(rng.integers(0, spacing - gap)) + (gap if i else 0)
        c = max(c, prev + gap) if i else c
        nl = base_text.find("\n", c)  # documents start at a line boundary
        c = nl + 1 if nl >= 0 else len(base_text)
        parts.append(base_text[prev:c])
        key = str(int(rng.integers(10 ** (digits - 1), 10**digits)))
        doc = passkey_document_text(int(rng.choice(lengths)), float(rng.random()), key)
        parts.append(doc)
        n_doc_chars += len(doc)
        prev = c
    parts.append(base_text[prev:])
    text = "".join(parts)
    atomic_write_text(out, text)
    return {"chars": len(text), "passkey_docs": docs, "passkey_chars": n_doc_chars, "shakespeare_chars": len(base_text),
            "min_gap": gap}
