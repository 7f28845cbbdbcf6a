"""Data for statelab runs: text corpora and the synthetic tasks used across plugins.

``make_data(spec)`` returns a :class:`DataSource` for ``spec.data.kind``:

- ``text``: a UTF-8 corpus (default: the bundled Tiny Shakespeare), tokenized once and
  cached memory-mapped; the last ``val_fraction`` of the text is validation
  (:mod:`statelab.data.text`). Batching modes ``random`` and ``stream``
  (:mod:`statelab.data.batching`). ``data.passkey.mix > 0`` mixes passkey documents in
  (loss on all their tokens): that fraction of the random windows, or, in stream mode,
  documents of ``data.passkey.lengths`` tokens inserted into the stream.
- ``mqar``: Zoology's multi-query associative recall (:mod:`statelab.data.mqar`); loss and
  accuracy on the query positions (``Batch.mask``).
- ``passkey``: passkey-retrieval documents (:mod:`statelab.data.passkey`); loss on the
  answer tokens (``Batch.mask``).
- any other kind names a registered task (:class:`statelab.interfaces.Task`, slot ``task``):
  its ``make_data(spec, seed)`` with ``data.params`` as the task's params; so does a built-in
  kind given ``data.params`` when a task of that name exists (the ``passkey`` task).

Every ``train_batch`` is a pure function of ``(seed, step, rank, world_size)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from statelab.data.base import Batch, DataError, DataSource, rank_rows, rng_for
from statelab.data.text import TextData, bundled_corpus_path, cache_root, read_corpus

if TYPE_CHECKING:  # pragma: no cover
    from statelab.spec import RunSpec


# synthetic-task helpers, importable from here without loading them with statelab.data
_LAZY = {
    "PasskeyExample": "passkey",
    "make_passkey_example": "passkey",
    "passkey_accuracy": "passkey",
    "passkey_eval_set": "passkey",
    "passkey_document": "passkey",
    "mqar_examples": "mqar",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"statelab.data.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'statelab.data' has no attribute {name!r}")


def make_data(spec: "RunSpec", *, seed: int | None = None) -> DataSource:
    """The data source of a run spec (``seed`` defaults to ``spec.seed``)."""
    from statelab.spec import parse_spec, uses_builtin_data

    spec = parse_spec(getattr(spec, "spec", spec))  # a RunSpec, a ResolvedSpec or a spec document
    seed = spec.seed if seed is None else seed
    kind = spec.data.kind
    if not uses_builtin_data(spec.data):
        from statelab.tasks import make_task

        return make_task(kind, spec.data.params).make_data(spec, seed)
    if kind == "text":
        from statelab.data.text import make_text_data

        return make_text_data(spec, seed)
    if kind == "mqar":
        from statelab.data.mqar import MQARData

        return MQARData(spec.data.mqar, seed=seed)
    from statelab.data.passkey import PasskeyData, passkey_tokenizer  # the last built-in kind: passkey

    return PasskeyData(passkey_tokenizer(spec.tokenizer), spec.data.passkey, seed=seed)


def corpus_vocab_size(spec: "RunSpec") -> int:
    """The vocabulary size the spec's data will have (reads the corpus, cached, for ``char``)."""
    from statelab.spec import parse_spec, uses_builtin_data

    spec = parse_spec(getattr(spec, "spec", spec))
    kind = spec.data.kind
    if not uses_builtin_data(spec.data):
        return make_data(spec).vocab_size
    if kind == "mqar":
        return spec.data.mqar.vocab_size
    if kind == "passkey":
        from statelab.data.passkey import passkey_tokenizer

        return passkey_tokenizer(spec.tokenizer).vocab_size
    from statelab.data.text import text_tokenizer

    return text_tokenizer(spec).vocab_size


__all__ = [
    *_LAZY,
    "Batch",
    "DataError",
    "DataSource",
    "TextData",
    "bundled_corpus_path",
    "cache_root",
    "corpus_vocab_size",
    "make_data",
    "rank_rows",
    "read_corpus",
    "rng_for",
]
