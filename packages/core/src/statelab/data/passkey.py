"""Passkey retrieval (the Landmark-attention protocol): find a number hidden in filler text.

A document is, with ``\\n`` between the parts::

    <filler, a tokens>
    The pass key is K. Remember it. K is the pass key.
    <filler, b tokens>
    What is the pass key? The pass key is

and the answer is `` K`` (``digits`` random digits, the first not 0). The filler repeats
"The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
and is cut at token level, so a document has exactly the requested number of tokens;
``a = round(depth * (a + b))`` places the key line at ``depth`` (0: first, 1: last before the
question). Each part is tokenized on its own, so the key's tokens are known exactly
(``key_token_span``) whatever the tokenizer.

Scoring is exact match: :func:`passkey_accuracy` compares the first number in each
generated continuation with the key.

The ``passkey`` data kind trains on documents of ``seq_len + 1`` tokens with random depth
and key; the loss counts only the positions that predict the answer tokens (``Batch.mask``),
so its validation accuracy is the per-token accuracy of the answer. Mixed into text
(``data.passkey.mix``) every token counts: with random batching, that fraction of the
windows are whole documents of ``seq_len + 1`` tokens; with stream batching, documents of
``data.passkey.lengths`` tokens are inserted into the text stream (:func:`mix_into_stream`),
about that fraction of its tokens, so a key may have to be carried across windows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np
import torch

from statelab.data.base import MIX, TRAIN, VAL, Batch, DataError, DataSource, rank_rows, rng_for
from statelab.tokenizers import CharTokenizer, Tokenizer, alphabet, make_tokenizer

if TYPE_CHECKING:  # pragma: no cover
    from statelab.spec import PasskeySpec, TokenizerSpec

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
KEY_LINE = ("The pass key is ", ". Remember it. ", " is the pass key.")  # around the two copies of the key
QUESTION = "What is the pass key? The pass key is"
SEP = "\n"
#: Characters a char tokenizer needs to write passkey documents.
PASSKEY_ALPHABET = alphabet(FILLER + "".join(KEY_LINE) + QUESTION + SEP + "0123456789")
#: Validation documents of the ``passkey`` data kind (depths cycle through ``spec.depths``).
VAL_EXAMPLES = 256


@dataclass
class PasskeyExample:
    """A passkey prompt: ``ids`` (exactly the requested length) ends with the question; the
    model should continue with ``answer_ids`` (`` K``). ``tokenizer.decode(ids[s:e]) == key``
    for ``(s, e) = key_token_span`` (the key's first occurrence)."""

    ids: list[int]
    key: str
    key_token_span: tuple[int, int]
    prompt_text: str
    answer_ids: list[int] = field(default_factory=list)
    depth: float = 0.0


class _Parts:
    """A tokenizer's encodings of the fixed pieces of a document (computed once per tokenizer)."""

    def __init__(self, tok: Tokenizer) -> None:
        try:
            enc = lambda s: np.asarray(tok.encode(s), dtype=np.int64)  # noqa: E731
            self.filler = enc(FILLER)
            self.sep = enc(SEP)
            self.pre, self.mid, self.post = (enc(s) for s in KEY_LINE)
            self.question = enc(QUESTION)
        except ValueError as exc:
            raise DataError(f"this tokenizer cannot write passkey documents: {exc}") from None
        self.fixed = 3 * len(self.sep) + len(self.pre) + len(self.mid) + len(self.post) + len(self.question)

    def filler_tokens(self, n: int) -> np.ndarray:
        reps = n // len(self.filler) + 1
        return np.tile(self.filler, reps)[:n]


def _parts(tok: Tokenizer) -> _Parts:
    parts = getattr(tok, "_statelab_passkey_parts", None)
    if parts is None:
        parts = _Parts(tok)
        tok._statelab_passkey_parts = parts  # type: ignore[attr-defined]
    return parts


def _rng(rng: np.random.Generator | int | None) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def random_key(rng: np.random.Generator, digits: int) -> str:
    return str(int(rng.integers(10 ** (digits - 1), 10**digits)))


def _build(
    tok: Tokenizer, length: int, depth: float, key: str, answer_len: int = 0
) -> tuple[np.ndarray, tuple[int, int]]:
    """Prompt ids of exactly ``length - answer_len`` tokens and the span of the key's first copy."""
    p = _parts(tok)
    key_ids = np.asarray(tok.encode(key), dtype=np.int64)
    fixed = p.fixed + 2 * len(key_ids)
    n_filler = length - answer_len - fixed
    if n_filler < 0:
        raise DataError(
            f"a passkey document needs at least {fixed + answer_len} tokens with this tokenizer; "
            f"{length} were asked for (raise the length, e.g. train.seq_len or data.passkey.lengths)"
        )
    if not 0.0 <= depth <= 1.0:
        raise DataError(f"passkey depth must be in [0, 1], got {depth}")
    a = int(round(depth * n_filler))
    pieces = [p.filler_tokens(a), p.sep, p.pre]
    start = sum(len(x) for x in pieces)
    pieces += [key_ids, p.mid, key_ids, p.post, p.sep, p.filler_tokens(n_filler - a), p.sep, p.question]
    return np.concatenate(pieces), (start, start + len(key_ids))


def make_passkey_example(
    tokenizer: Tokenizer, length_tokens: int, depth: float, rng: np.random.Generator | int | None, digits: int = 5
) -> PasskeyExample:
    """A prompt of exactly ``length_tokens`` tokens with a random ``digits``-digit key at ``depth``."""
    key = random_key(_rng(rng), digits)
    ids, span = _build(tokenizer, length_tokens, depth, key)
    answer = tokenizer.encode(" " + key)
    return PasskeyExample(ids.tolist(), key, span, tokenizer.decode(ids.tolist()), answer, depth)


def passkey_document(
    tokenizer: Tokenizer, length_tokens: int, depth: float, rng: np.random.Generator | int | None, digits: int = 5
) -> tuple[np.ndarray, int]:
    """A training document: prompt and answer, exactly ``length_tokens`` ids, and the number
    of answer tokens at its end."""
    key = random_key(_rng(rng), digits)
    answer = np.asarray(tokenizer.encode(" " + key), dtype=np.int64)
    prompt, _ = _build(tokenizer, length_tokens, depth, key, answer_len=len(answer))
    return np.concatenate([prompt, answer]), len(answer)


def mix_into_stream(
    tokens: np.ndarray, tokenizer: Tokenizer, spec: "PasskeySpec", *, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Insert passkey documents into a token stream so that about ``spec.mix`` of its tokens are theirs.

    For stream batching (state carried across windows): each document has a length drawn
    from ``spec.lengths``, a uniform random depth and key, is framed by newlines, and goes at
    a uniformly random position of the text. Deterministic from ``seed``. Returns the mixed
    stream (the dtype of ``tokens``) and the start offset of every inserted document.
    """
    if not 0 < spec.mix < 1:
        raise DataError(f"stream mixing needs 0 < data.passkey.mix < 1, got {spec.mix}")
    rng = rng_for(seed, MIX)
    target = spec.mix / (1 - spec.mix) * len(tokens)
    sep = _parts(tokenizer).sep
    docs, total = [], 0
    while total < target:
        length = int(spec.lengths[int(rng.integers(len(spec.lengths)))])
        ids, _ = passkey_document(tokenizer, length, float(rng.random()), rng, spec.digits)
        docs.append(np.concatenate([sep, ids, sep]))
        total += len(docs[-1])
    cuts = np.sort(rng.integers(0, len(tokens) + 1, size=len(docs)))
    pieces, starts, prev, offset = [], [], 0, 0
    for cut, doc in zip(cuts.tolist(), docs):
        pieces.append(tokens[prev:cut])
        offset += cut - prev
        starts.append(offset + len(sep))
        pieces.append(doc.astype(tokens.dtype))
        offset += len(doc)
        prev = cut
    pieces.append(tokens[prev:])
    return np.concatenate(pieces), np.asarray(starts, dtype=np.int64)


def extract_key(prediction: str) -> str | None:
    """The first run of digits in a generated continuation (leading spaces allowed), or None."""
    m = re.match(r"\s*(\d+)", prediction)
    return m.group(1) if m else None


def passkey_accuracy(predictions: Sequence[str], keys: Sequence[str]) -> float:
    """Exact-match accuracy: a prediction is right when its first number equals the key
    (``" 12345. The grass"`` matches ``"12345"``; ``" 1234"`` or ``" 123456"`` do not)."""
    if len(predictions) != len(keys):
        raise ValueError(f"{len(predictions)} predictions for {len(keys)} keys")
    if not keys:
        raise ValueError("passkey_accuracy needs at least one prediction")
    return sum(extract_key(p) == str(k) for p, k in zip(predictions, keys)) / len(keys)


def passkey_eval_set(
    tokenizer: Tokenizer, spec: "PasskeySpec", *, seed: int, per_cell: int = 5
) -> list[PasskeyExample]:
    """``per_cell`` examples for every (length, depth) of the spec, deterministic from ``seed``."""
    out = []
    for li, length in enumerate(spec.lengths):
        for di, depth in enumerate(spec.depths):
            for i in range(per_cell):
                out.append(make_passkey_example(tokenizer, length, depth, rng_for(seed, VAL, li, di, i), spec.digits))
    return out


def passkey_tokenizer(spec: "TokenizerSpec") -> Tokenizer:
    """The tokenizer of the ``passkey`` data kind: ``char`` uses the passkey alphabet."""
    if spec.kind == "char":
        return CharTokenizer(PASSKEY_ALPHABET)
    return make_tokenizer(spec)


class PasskeyData(DataSource):
    """Passkey documents of ``seq_len + 1`` tokens; loss on the answer tokens (see the module doc)."""

    kind = "passkey"

    def __init__(self, tokenizer: Tokenizer, spec: "PasskeySpec", *, seed: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.vocab_size
        self.spec = spec
        self.seed = seed
        sample, _ = passkey_document(tokenizer, 512 + _parts(tokenizer).fixed, 0.5, 0, spec.digits)
        self.bytes_per_token = len(tokenizer.decode(sample.tolist()).encode("utf-8")) / len(sample)

    def _rows(self, docs: list[tuple[np.ndarray, int]], seq_len: int) -> Batch:
        xy = torch.from_numpy(np.stack([d for d, _ in docs]))  # (B, T+1)
        mask = torch.zeros(len(docs), seq_len, dtype=torch.bool)
        for i, (_, n_answer) in enumerate(docs):
            mask[i, seq_len - n_answer :] = True  # the positions whose targets are answer tokens
        return Batch(xy[:, :-1], xy[:, 1:], mask)

    def train_batch(
        self, step: int, batch_size: int, seq_len: int, *, mode: str = "random", rank: int = 0, world_size: int = 1
    ) -> Batch:
        self._check_mode(mode, ("random",))
        rows = rank_rows(batch_size, rank, world_size)
        docs = []
        for b in range(rows.start, rows.stop):
            r = rng_for(self.seed, TRAIN, step, b)
            docs.append(passkey_document(self.tokenizer, seq_len + 1, float(r.random()), r, self.spec.digits))
        return self._rows(docs, seq_len)

    def val_batches(self, batch_size: int, seq_len: int, max_batches: int | None = None) -> Iterator[Batch]:
        n = VAL_EXAMPLES if max_batches is None else min(VAL_EXAMPLES, max_batches * batch_size)
        depths = self.spec.depths
        for lo in range(0, n, batch_size):
            docs = [
                passkey_document(self.tokenizer, seq_len + 1, depths[i % len(depths)], rng_for(self.seed, VAL, i),
                                 self.spec.digits)
                for i in range(lo, min(n, lo + batch_size))
            ]
            yield self._rows(docs, seq_len)




# --------------------------------------------------------------------------------------
# needle in a haystack, RULER S-NIAH / MK-NIAH style: real-text or Landmark filler, one or
# several keys; the task `passkey` (statelab.tasks.passkey) trains and scores on these.

#: names of the keys of a multi-key document (the question asks for one of them)
KEY_NAMES = ("red", "blue", "green", "gold", "gray", "pink", "teal", "plum", "rose", "jade", "sand", "snow", "iron",
             "salt", "wind", "rain")
NAMED_NEEDLE = ("The pass key of ", " is ", ". Remember it.")
NAMED_QUESTION = ("What is the pass key of ", "? The pass key of ", " is")
ANSWER_END = "."
#: characters of the named templates, the answer end and the key names
NIAH_ALPHABET = alphabet(PASSKEY_ALPHABET + "".join(NAMED_NEEDLE + NAMED_QUESTION) + ANSWER_END + "".join(KEY_NAMES))


class Haystack:
    """Filler for needle documents: the repeated Landmark sentence (``tokens=None``), or
    windows of a tokenized text corpus starting at random offsets (RULER's real-text haystack)."""

    def __init__(self, tokenizer: Tokenizer, tokens: np.ndarray | None = None) -> None:
        self.tokenizer = tokenizer
        self.tokens = tokens

    @property
    def kind(self) -> str:
        return "landmark" if self.tokens is None else "text"

    def take(self, n: int, rng: np.random.Generator) -> np.ndarray:
        if self.tokens is None:
            return _parts(self.tokenizer).filler_tokens(n)
        if n > len(self.tokens):
            raise DataError(f"a haystack of {n} tokens does not fit the filler corpus ({len(self.tokens)} tokens); "
                            "use a longer corpus or shorter documents")
        start = int(rng.integers(0, len(self.tokens) - n + 1))
        return np.asarray(self.tokens[start:start + n], dtype=np.int64)


@dataclass
class NeedleDocument:
    """``ids``: exactly the requested length, ending with the answer (``answer_len`` tokens:
    `` K.``); ``prompt_chars``: characters of the prompt (everything before the answer)."""

    ids: np.ndarray
    answer_len: int
    key: str
    depth: float
    prompt_chars: int


def needle_document(tokenizer: Tokenizer, length: int, depth: float, n_keys: int, rng: np.random.Generator,
                    haystack: Haystack, digits: int = 5) -> NeedleDocument:
    """A document of exactly ``length`` tokens: haystack with ``n_keys`` needles, the question
    for the first one (placed at ``depth`` of the haystack; the others at uniform random depths),
    and its answer. One key uses the Landmark sentences (``The pass key is K. Remember it. K is
    the pass key.``); several keys are named (``The pass key of teal is K. Remember it.``)."""
    if not 1 <= n_keys <= len(KEY_NAMES):
        raise DataError(f"a needle document holds 1 to {len(KEY_NAMES)} keys, got {n_keys}")
    if not 0.0 <= depth <= 1.0:
        raise DataError(f"passkey depth must be in [0, 1], got {depth}")
    p = _parts(tokenizer)
    enc = lambda s: np.asarray(tokenizer.encode(s), dtype=np.int64)  # noqa: E731
    keys = [random_key(rng, digits) for _ in range(n_keys)]
    if n_keys == 1:
        k = enc(keys[0])
        needles = [np.concatenate([p.pre, k, p.mid, k, p.post])]
        question = p.question
    else:
        names = [KEY_NAMES[i] for i in rng.permutation(len(KEY_NAMES))[:n_keys]]
        needles = [enc(NAMED_NEEDLE[0] + n + NAMED_NEEDLE[1] + k + NAMED_NEEDLE[2]) for n, k in zip(names, keys)]
        question = enc(NAMED_QUESTION[0] + names[0] + NAMED_QUESTION[1] + names[0] + NAMED_QUESTION[2])
    answer = enc(" " + keys[0] + ANSWER_END)
    fixed = sum(2 * len(p.sep) + len(nd) for nd in needles) + len(p.sep) + len(question) + len(answer)
    n_filler = length - fixed
    if n_filler < 0:
        raise DataError(f"a document with {n_keys} key(s) needs at least {fixed} tokens with this tokenizer; "
                        f"{length} were asked for (raise the lengths)")
    cuts = [int(round(depth * n_filler))] + rng.integers(0, n_filler + 1, size=n_keys - 1).tolist()
    filler = haystack.take(n_filler, rng)
    pieces, prev = [], 0
    for i in sorted(range(n_keys), key=lambda j: (cuts[j], j)):
        pieces += [filler[prev:cuts[i]], p.sep, needles[i], p.sep]
        prev = cuts[i]
    pieces += [filler[prev:], p.sep, question]
    prompt = np.concatenate(pieces)
    return NeedleDocument(np.concatenate([prompt, answer]), len(answer), keys[0], depth,
                          len(tokenizer.decode(prompt.tolist())))


class NeedleData(DataSource):
    """Needle documents of ``seq_len + 1`` tokens at random depths; loss on the answer tokens.
    Training haystacks come from the filler corpus's training split, validation ones from its
    held-out split (``Haystack`` objects for each)."""

    kind = "passkey-niah"

    def __init__(self, tokenizer: Tokenizer, train_hay: Haystack, val_hay: Haystack, *, n_keys: int, digits: int,
                 seed: int, depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0)) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.vocab_size
        self.train_hay, self.val_hay = train_hay, val_hay
        self.n_keys, self.digits, self.seed, self.depths = n_keys, digits, seed, list(depths)
        sample = needle_document(tokenizer, 256 + 40 * n_keys + _parts(tokenizer).fixed, 0.5, n_keys,
                                 rng_for(seed, VAL), val_hay, digits)
        text = tokenizer.decode(sample.ids.tolist())
        self.bytes_per_token = len(text.encode("utf-8")) / len(sample.ids)
        self.chars_per_token = len(text) / len(sample.ids)

    def document(self, split: int, length: int, depth: float, *keys: int) -> NeedleDocument:
        hay = self.train_hay if split == TRAIN else self.val_hay
        return needle_document(self.tokenizer, length, depth, self.n_keys, rng_for(self.seed, split, *keys), hay,
                               self.digits)

    @staticmethod
    def rows(docs: Sequence[NeedleDocument]) -> Batch:
        xy = torch.from_numpy(np.stack([d.ids for d in docs]))  # (B, T + 1)
        T = xy.shape[1] - 1
        mask = torch.zeros(len(docs), T, dtype=torch.bool)
        for i, d in enumerate(docs):
            mask[i, T - d.answer_len:] = True  # positions whose targets are answer tokens
        return Batch(xy[:, :-1], xy[:, 1:], mask)

    def train_batch(self, step: int, batch_size: int, seq_len: int, *, mode: str = "random", rank: int = 0,
                    world_size: int = 1) -> Batch:
        self._check_mode(mode, ("random",))
        rows = rank_rows(batch_size, rank, world_size)
        docs = []
        for b in range(rows.start, rows.stop):
            depth = float(rng_for(self.seed, TRAIN, step, b, 1).random())
            docs.append(self.document(TRAIN, seq_len + 1, depth, step, b))
        return self.rows(docs)

    def val_batches(self, batch_size: int, seq_len: int, max_batches: int | None = None) -> Iterator[Batch]:
        n = VAL_EXAMPLES if max_batches is None else min(VAL_EXAMPLES, max_batches * batch_size)
        for lo in range(0, n, batch_size):
            yield self.rows([self.document(VAL, seq_len + 1, self.depths[i % len(self.depths)], i)
                             for i in range(lo, min(n, lo + batch_size))])


__all__ = [
    "FILLER",
    "Haystack",
    "KEY_NAMES",
    "NIAH_ALPHABET",
    "NeedleData",
    "NeedleDocument",
    "needle_document",
    "PASSKEY_ALPHABET",
    "PasskeyData",
    "PasskeyExample",
    "QUESTION",
    "extract_key",
    "make_passkey_example",
    "mix_into_stream",
    "passkey_accuracy",
    "passkey_document",
    "passkey_eval_set",
    "passkey_tokenizer",
]
