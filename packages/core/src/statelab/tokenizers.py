"""Tokenizers: ``char``, ``byte`` and ``bpe`` (plus ``ids`` for synthetic tasks), and our BPE trainer.

- ``char``: the vocabulary is the sorted set of the corpus' characters (nanoGPT's
  shakespeare_char: 65 characters for Tiny Shakespeare). Encoding a character outside the
  vocabulary is an error that says what to do.
- ``byte``: the 256 values of UTF-8 bytes. Decoding invalid UTF-8 gives U+FFFD.
- ``bpe``: a :class:`tiktoken.Encoding` built from a ranks file, never from a download:
  ``tokenizer: {kind: bpe, path: FILE.tiktoken}`` or a bundled one by name
  (``{kind: bpe, name: shakespeare-1024}``; ``statelab tokenizer list``). The ranks are
  trained by :func:`train_bpe` (``statelab tokenizer train CORPUS --vocab N -o FILE``);
  tiktoken only encodes and decodes.
- ``ids``: token ids written as decimal numbers; the tokenizer of synthetic tasks (MQAR)
  whose tokens are not text.
- ``hf``: a HuggingFace ``tokenizer.json`` (``{kind: hf, path: tokenizer.json}``), encoded
  by the ``tokenizers`` library; what ``statelab import-hf`` gives imported models.
- ``word``: the ``vocab_size - 1`` most frequent words of the corpus (a word keeps its leading
  space; punctuation marks and whitespace runs are words too, so text made of known words
  decodes back exactly), plus ``<unk>`` (id 0) for everything else.
- ``sentencepiece``: a SentencePiece unigram or BPE model trained offline on the corpus by
  the ``sentencepiece`` library (``pip install "statelab-core[sentencepiece]"``), or loaded
  from a local ``.model`` file (``path``). Trained with identity normalisation, no dummy
  prefix and byte fallback, so every text round-trips exactly.

Every tokenizer serialises itself completely with :meth:`Tokenizer.to_json` (the BPE ranks
included), so a checkpoint decodes with that dict alone: :func:`tokenizer_from_json`.

Decoding never raises on an id below ``vocab_size``; ids at or above it (a model whose
``vocab_size`` is padded past the tokenizer's) decode to U+FFFD so that sampling from such a
model cannot crash.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import heapq
import json
import os
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import tiktoken

    from statelab.spec import TokenizerSpec

REPLACEMENT = "\ufffd"

#: Pre-tokenization pattern of our BPE vocabularies (GPT-2's): contractions, letters with an
#: optional leading space, numbers, punctuation runs, whitespace. Merges never cross these chunks.
BPE_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

#: Pattern for a ranks file that is OpenAI's cl100k_base (recognised by its 100256 ranks), so a
#: user who has that file locally gets its original tokenization.
_CL100K_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)

#: Names of OpenAI encodings, which tiktoken would download; we never do.
DOWNLOADABLE = ("gpt2", "r50k_base", "p50k_base", "p50k_edit", "cl100k_base", "o200k_base", "o200k_harmony")


class TokenizerError(ValueError):
    """A tokenizer cannot be made or cannot encode the given text; the message says what to do."""


class Tokenizer:
    """Base class: ``encode(text) -> ids``, ``decode(ids) -> text``, ``to_json() -> dict``."""

    kind: str = ""
    vocab_size: int = 0

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def encode_array(self, text: str) -> np.ndarray:
        """``encode`` as a 1-D int64 array (the fast path used for whole corpora)."""
        return np.asarray(self.encode(text), dtype=np.int64)

    def decode(self, ids: Sequence[int]) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def to_json(self) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def fingerprint(self) -> str:
        """sha256 of the canonical JSON: equal fingerprints encode identically."""
        fp = self.__dict__.get("_fingerprint")
        if fp is None:  # tokenizers are immutable once made
            blob = json.dumps(self.to_json(), sort_keys=True, ensure_ascii=True).encode()
            fp = self.__dict__["_fingerprint"] = hashlib.sha256(blob).hexdigest()
        return fp

    def _ids(self, ids: Sequence[int]) -> np.ndarray:
        """Any sequence of ids (list, tensor, array) as a 1-D int64 array."""
        if hasattr(ids, "detach"):
            ids = ids.detach().cpu().numpy()  # a torch tensor
        return np.asarray(ids, dtype=np.int64).reshape(-1)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"


class CharTokenizer(Tokenizer):
    """One id per character of a fixed alphabet (ids follow the sorted order of ``chars``)."""

    kind = "char"

    def __init__(self, chars: str | Sequence[str]) -> None:
        chars = sorted(set(chars))
        if not chars:
            raise TokenizerError("a char tokenizer needs at least one character; its corpus is empty")
        if any(len(c) != 1 for c in chars):
            raise TokenizerError("a char tokenizer's alphabet must be single characters")
        self.chars = chars
        self.vocab_size = len(chars)
        self.stoi = {c: i for i, c in enumerate(chars)}
        codes = np.array([ord(c) for c in chars], dtype=np.int64)
        # code point -> id lookup table, -1 for characters outside the vocabulary
        self._codes = codes
        self._lut = np.full(int(codes.max()) + 2, -1, dtype=np.int64)
        self._lut[codes] = np.arange(len(chars))

    @classmethod
    def from_corpus(cls, text: str) -> "CharTokenizer":
        return cls(alphabet(text))

    def encode_array(self, text: str) -> np.ndarray:
        cps = np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype=np.uint32).astype(np.int64)
        cps_in = np.minimum(cps, len(self._lut) - 1)  # anything past the table maps to its -1 sentinel
        ids = self._lut[cps_in]
        bad = ids < 0
        if bad.any():
            unknown = sorted({chr(c) for c in cps[bad][:10_000].tolist()})
            shown = ", ".join(repr(c) for c in unknown[:10]) + (" ..." if len(unknown) > 10 else "")
            raise TokenizerError(
                f"{int(bad.sum())} character(s) are not in this char tokenizer's vocabulary of {self.vocab_size} "
                f"(the characters of its training corpus): {shown}. Use tokenizer kind 'byte' or 'bpe', which "
                "encode any text, or train on a corpus that contains these characters"
            )
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        ids = self._ids(ids)
        cps = np.where((ids >= 0) & (ids < self.vocab_size), self._codes[np.clip(ids, 0, self.vocab_size - 1)], 0xFFFD)
        return cps.astype("<u4").tobytes().decode("utf-32-le")

    def to_json(self) -> dict[str, Any]:
        return {"kind": "char", "chars": "".join(self.chars)}


class ByteTokenizer(Tokenizer):
    """The UTF-8 bytes of the text: 256 ids."""

    kind = "byte"
    vocab_size = 256

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8", errors="surrogatepass"), dtype=np.uint8).astype(np.int64)

    def decode(self, ids: Sequence[int]) -> str:
        ids = self._ids(ids)
        bad = (ids < 0) | (ids >= 256)
        if not bad.any():
            return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")
        # rare: out-of-range ids (a padded model vocabulary) stay visible as U+FFFD
        cuts = np.flatnonzero(bad)
        parts, prev = [], 0
        for c in cuts.tolist():
            parts.append(ids[prev:c].astype(np.uint8).tobytes().decode("utf-8", errors="replace") + REPLACEMENT)
            prev = c + 1
        return "".join(parts) + ids[prev:].astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def to_json(self) -> dict[str, Any]:
        return {"kind": "byte"}


class IdsTokenizer(Tokenizer):
    """Tokens that are not text (synthetic tasks): ids written as space-separated numbers."""

    kind = "ids"

    def __init__(self, vocab_size: int) -> None:
        if vocab_size < 1:
            raise TokenizerError(f"vocab_size must be positive, got {vocab_size}")
        self.vocab_size = int(vocab_size)

    def encode_array(self, text: str) -> np.ndarray:
        try:
            ids = np.array([int(t) for t in text.split()], dtype=np.int64)
        except ValueError:
            raise TokenizerError(
                "an 'ids' tokenizer encodes whitespace-separated integers such as '12 7 4095'; "
                f"got {text[:40]!r}"
            ) from None
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise TokenizerError(f"token ids must be in 0..{self.vocab_size - 1}")
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(str(i) if 0 <= i < self.vocab_size else REPLACEMENT for i in self._ids(ids).tolist())

    def to_json(self) -> dict[str, Any]:
        return {"kind": "ids", "vocab_size": self.vocab_size}


class BPETokenizer(Tokenizer):
    """Byte-level BPE encoded by tiktoken from mergeable ranks (no special tokens)."""

    kind = "bpe"
    #: texts longer than this are encoded in pieces of about ``piece_chars`` characters
    long_text_chars = 1 << 20
    piece_chars = 1 << 18

    def __init__(self, ranks: dict[bytes, int], *, name: str = "bpe", pattern: str | None = None) -> None:
        import tiktoken

        _check_ranks(ranks, name)
        self.ranks = ranks
        self.name = name
        self.pattern = pattern or (_CL100K_PATTERN if len(ranks) == 100256 else BPE_PATTERN)
        self.vocab_size = len(ranks)
        self.encoding: tiktoken.Encoding = tiktoken.Encoding(
            name=f"statelab-{name}", pat_str=self.pattern, mergeable_ranks=ranks, special_tokens={}
        )

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def encode_array(self, text: str) -> np.ndarray:
        if len(text) < self.long_text_chars:
            return np.asarray(self.encoding.encode_ordinary(text), dtype=np.int64)
        # long texts: encode pieces in parallel, cut after a "\n" between two non-space characters,
        # where no chunk of the pre-tokenization pattern can span the cut, so the ids are the same
        pieces, start, step = [], 0, self.piece_chars
        while start < len(text):
            end = text.find("\n", start + step)
            while 0 <= end < len(text) - 1 and (text[end - 1].isspace() or text[end + 1].isspace()):
                end = text.find("\n", end + 1)
            end = len(text) if end < 0 else end + 1
            pieces.append(text[start:end])
            start = end
        out = self.encoding.encode_ordinary_batch(pieces)
        return np.concatenate([np.asarray(o, dtype=np.int64) for o in out])

    def decode(self, ids: Sequence[int]) -> str:
        ids = self._ids(ids).tolist()
        if all(0 <= i < self.vocab_size for i in ids):
            return self.encoding.decode(ids, errors="replace")
        parts, run = [], []
        for i in ids:
            if 0 <= i < self.vocab_size:
                run.append(i)
            else:
                parts.append(self.encoding.decode(run, errors="replace") + REPLACEMENT)
                run = []
        return "".join(parts) + self.encoding.decode(run, errors="replace")

    def token_bytes(self, i: int) -> bytes:
        return self.encoding.decode_single_token_bytes(i)

    def to_json(self) -> dict[str, Any]:
        return {"kind": "bpe", "name": self.name, "pattern": self.pattern, "ranks": dump_ranks(self.ranks)}


#: Pre-tokenization of the ``word`` tokenizer: a word with its leading space, one punctuation
#: mark with its leading space, or a run of whitespace. The pieces concatenate back to the text.
WORD_PATTERN = r" ?\w+| ?[^\w\s]|\s+"
UNK = "<unk>"


class WordTokenizer(Tokenizer):
    """A closed vocabulary of words; anything else is ``<unk>`` (id 0, decoded as U+FFFD)."""

    kind = "word"
    unk_id = 0

    def __init__(self, words: Sequence[str]) -> None:
        import re

        words = list(words)
        if len(set(words)) != len(words) or UNK in words or any(not w for w in words):
            raise TokenizerError("a word tokenizer's words must be distinct, non-empty and not '<unk>'")
        self.words = words
        self.vocab_size = len(words) + 1
        self.stoi = {w: i + 1 for i, w in enumerate(words)}
        self._split = re.compile(WORD_PATTERN).findall

    @classmethod
    def from_corpus(cls, chunks: "Iterable[str]", vocab_size: int) -> "WordTokenizer":
        """The ``vocab_size - 1`` most frequent pieces of the corpus (ties: in string order)."""
        import re

        if vocab_size < 2:
            raise TokenizerError(f"a word tokenizer needs vocab_size >= 2 (<unk> and one word); got {vocab_size}")
        split = re.compile(WORD_PATTERN).findall
        counts: collections.Counter[str] = collections.Counter()
        for chunk in chunks:
            counts.update(split(chunk))
        if not counts:
            raise TokenizerError("a word tokenizer cannot be made from an empty corpus")
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[: vocab_size - 1]
        return cls([w for w, _ in ranked])

    def encode_array(self, text: str) -> np.ndarray:
        get = self.stoi.get
        return np.fromiter((get(p, 0) for p in self._split(text)), dtype=np.int64)

    def decode(self, ids: Sequence[int]) -> str:
        words, n = self.words, self.vocab_size
        return "".join(words[i - 1] if 0 < i < n else REPLACEMENT for i in self._ids(ids).tolist())

    def to_json(self) -> dict[str, Any]:
        return {"kind": "word", "words": self.words}


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model (unigram or BPE), kept whole (serialised) in :meth:`to_json`."""

    kind = "sentencepiece"

    def __init__(self, model: bytes) -> None:
        spm = _sentencepiece()
        self.model = bytes(model)
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(self.model)
        except Exception as exc:  # noqa: BLE001 - the library raises RuntimeError/OSError variants
            raise TokenizerError(f"not a SentencePiece model ({exc})") from None
        self.vocab_size = self._sp.get_piece_size()
        self.unk_id = self._sp.unk_id()

    @classmethod
    def train(cls, chunks: "Iterable[str]", vocab_size: int, model_type: str = "unigram") -> "SentencePieceTokenizer":
        """Train on the corpus' lines, deterministically (one thread, no sampling of sentences)."""
        import io

        spm = _sentencepiece()
        lines = [line for chunk in chunks for line in chunk.splitlines() if line.strip()]
        if not lines:
            raise TokenizerError("a sentencepiece tokenizer cannot be trained on an empty corpus")
        out = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(lines), model_writer=out, vocab_size=vocab_size, model_type=model_type,
                character_coverage=1.0, byte_fallback=True, normalization_rule_name="identity",
                remove_extra_whitespaces=False, add_dummy_prefix=False, allow_whitespace_only_pieces=True,
                split_digits=True, num_threads=1, unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1,
                input_sentence_size=0, max_sentence_length=1 << 16, minloglevel=2,
            )
        except RuntimeError as exc:  # e.g. a vocab_size the corpus cannot fill
            raise TokenizerError(f"sentencepiece training failed: {exc}") from None
        return cls(out.getvalue())

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self._sp.encode(text), dtype=np.int64)

    def decode(self, ids: Sequence[int]) -> str:
        out, run = [], []
        for i in self._ids(ids).tolist():  # ids past the vocabulary decode to U+FFFD, like every kind
            if 0 <= i < self.vocab_size:
                run.append(i)
                continue
            out += [self._sp.decode(run), REPLACEMENT]
            run = []
        out.append(self._sp.decode(run))
        return "".join(out)

    def to_json(self) -> dict[str, Any]:
        return {"kind": "sentencepiece", "model": base64.b64encode(self.model).decode("ascii")}


def _sentencepiece():
    try:
        import sentencepiece
    except ImportError:
        raise TokenizerError(
            "the sentencepiece tokenizer needs the sentencepiece library: pip install \"statelab-core[sentencepiece]\""
        ) from None
    return sentencepiece


def load_sentencepiece(path: str | os.PathLike) -> SentencePieceTokenizer:
    """A :class:`SentencePieceTokenizer` from a local ``.model`` file."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise TokenizerError(f"SentencePiece model {str(p)!r} does not exist; give a local .model file, or no path "
                             "to train one on the corpus")
    return SentencePieceTokenizer(p.read_bytes())


def learn_tokenizer(spec: "TokenizerSpec", chunks: "Iterable[str]") -> Tokenizer:
    """The ``word`` or ``sentencepiece`` tokenizer of ``spec``, learned from the corpus ``chunks``."""
    if spec.vocab_size is None:
        raise TokenizerError(f"a {spec.kind} tokenizer learned from the corpus needs tokenizer.vocab_size")
    if spec.kind == "word":
        return WordTokenizer.from_corpus(chunks, spec.vocab_size)
    return SentencePieceTokenizer.train(chunks, spec.vocab_size, spec.model_type)


class HFTokenizer(Tokenizer):
    """A HuggingFace ``tokenizer.json`` (any model the ``tokenizers`` library reads), kept whole
    in :meth:`to_json` so a checkpoint decodes without the original file."""

    kind = "hf"

    def __init__(self, document: dict[str, Any]) -> None:
        from tokenizers import Tokenizer as _Tokenizer

        try:
            self._tok = _Tokenizer.from_str(json.dumps(document))
        except Exception as exc:  # noqa: BLE001 - the library raises plain Exceptions for bad files
            raise TokenizerError(f"not a HuggingFace tokenizer.json ({exc})") from None
        self.document = document
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def decode(self, ids: Sequence[int]) -> str:
        arr = self._ids(ids)
        out, run = [], []
        for i in arr.tolist():  # ids past the vocabulary decode to U+FFFD, like every kind
            if 0 <= i < self.vocab_size:
                run.append(i)
                continue
            out.append(self._tok.decode(run, skip_special_tokens=False))
            out.append(REPLACEMENT)
            run = []
        out.append(self._tok.decode(run, skip_special_tokens=False))
        return "".join(out)

    def to_json(self) -> dict[str, Any]:
        return {"kind": "hf", "tokenizer": self.document}


def load_hf(path: str | os.PathLike | None) -> HFTokenizer:
    """A :class:`HFTokenizer` from a local ``tokenizer.json`` (never a download)."""
    if path is None:
        raise TokenizerError("an hf tokenizer needs `path`: a local HuggingFace tokenizer.json")
    p = Path(path).expanduser()
    if not p.is_file():
        raise TokenizerError(f"tokenizer file {str(p)!r} does not exist; give the path of a HuggingFace "
                             "tokenizer.json (statelab never downloads tokenizers)")
    try:
        document = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise TokenizerError(f"{str(p)!r} is not a JSON tokenizer file ({exc})") from None
    return HFTokenizer(document)


# --------------------------------------------------------------------------------------
# construction


def alphabet(text: str) -> str:
    """The sorted distinct characters of ``text`` (vectorised; fast on megabytes)."""
    if not text:
        return ""
    cps = np.unique(np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype=np.uint32))
    return "".join(map(chr, cps.tolist()))


def tokenizer_from_json(d: dict[str, Any]) -> Tokenizer:
    """Rebuild a tokenizer from :meth:`Tokenizer.to_json` (a checkpoint needs nothing else)."""
    if not isinstance(d, dict) or "kind" not in d:
        raise TokenizerError("a tokenizer JSON must be a dict with a 'kind' field")
    kind = d["kind"]
    if kind == "char":
        return CharTokenizer(d["chars"])
    if kind == "byte":
        return ByteTokenizer()
    if kind == "ids":
        return IdsTokenizer(int(d["vocab_size"]))
    if kind == "bpe":
        return BPETokenizer(parse_ranks(d["ranks"], source="tokenizer JSON"), name=d.get("name", "bpe"),
                            pattern=d.get("pattern"))
    if kind == "hf":
        return HFTokenizer(d["tokenizer"])
    if kind == "word":
        return WordTokenizer(d["words"])
    if kind == "sentencepiece":
        return SentencePieceTokenizer(base64.b64decode(d["model"]))
    raise TokenizerError(f"unknown tokenizer kind {kind!r} (known: char, byte, bpe, ids, hf, word, sentencepiece)")


def bundled_encodings() -> dict[str, Path]:
    """Bundled BPE vocabularies: name -> ranks file (``statelab/assets/<name>.tiktoken``)."""
    assets = resources.files("statelab") / "assets"
    out = {}
    for entry in assets.iterdir():
        if entry.name.endswith(".tiktoken"):
            out[entry.name[: -len(".tiktoken")]] = Path(str(entry))
    return dict(sorted(out.items()))


def _offline_message(name: str) -> str:
    bundled = ", ".join(bundled_encodings()) or "(none)"
    how = (
        "Train one with `statelab tokenizer train CORPUS --vocab N -o FILE.tiktoken` and use "
        "`tokenizer: {kind: bpe, path: FILE.tiktoken}`, or point `path` at a local .tiktoken ranks file"
    )
    if name in DOWNLOADABLE:
        return (
            f"BPE encoding {name!r} is not available offline and cannot be downloaded here (statelab never "
            f"downloads at run time). {how} (for {name!r}, copy its {name}.tiktoken file to this machine). "
            f"Bundled encodings: {bundled}"
        )
    return f"unknown BPE encoding name {name!r}; bundled encodings: {bundled}. {how}"


def load_bpe(*, path: str | os.PathLike | None = None, name: str | None = None) -> BPETokenizer:
    """A BPE tokenizer from a local ranks file or a bundled name (never a download)."""
    if path is not None and name is not None:
        raise TokenizerError("give tokenizer.path or tokenizer.name for a bpe tokenizer, not both")
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise TokenizerError(f"BPE ranks file {str(p)!r} does not exist; give the path of a .tiktoken file "
                                 "(`statelab tokenizer train CORPUS --vocab N -o FILE.tiktoken` makes one)")
        return BPETokenizer(load_ranks(p), name=p.stem)
    if name is None:
        raise TokenizerError(
            "a bpe tokenizer needs `path` (a local .tiktoken ranks file) or `name` (bundled: "
            f"{', '.join(bundled_encodings()) or 'none'})"
        )
    table = bundled_encodings()
    if name not in table:
        raise TokenizerError(_offline_message(name))
    return BPETokenizer(load_ranks(table[name]), name=name)


def make_tokenizer(spec: "TokenizerSpec", corpus_text: str | None = None) -> Tokenizer:
    """The tokenizer a spec asks for; ``char`` takes its vocabulary from ``corpus_text``."""
    if spec.kind == "byte":
        return ByteTokenizer()
    if spec.kind == "bpe":
        return load_bpe(path=spec.path, name=spec.name)
    if spec.kind == "hf":
        return load_hf(spec.path)
    if spec.kind == "char":
        if corpus_text is None:
            raise TokenizerError("a char tokenizer takes its vocabulary from the corpus; pass the corpus text")
        if not corpus_text:
            raise TokenizerError("a char tokenizer cannot be made from an empty corpus")
        return CharTokenizer.from_corpus(corpus_text)
    if spec.kind == "sentencepiece" and spec.path is not None:
        return load_sentencepiece(spec.path)
    if spec.kind in ("word", "sentencepiece"):
        if not corpus_text:
            raise TokenizerError(f"a {spec.kind} tokenizer learns its vocabulary from the corpus; pass the corpus text")
        return learn_tokenizer(spec, [corpus_text])
    raise TokenizerError(f"unknown tokenizer kind {spec.kind!r} (known: char, byte, bpe, hf, word, sentencepiece)")


# --------------------------------------------------------------------------------------
# ranks files (.tiktoken: "base64(token) rank" per line)


def _check_ranks(ranks: dict[bytes, int], source: str) -> None:
    if not ranks:
        raise TokenizerError(f"{source}: the BPE ranks are empty")
    values = sorted(ranks.values())
    if values != list(range(len(values))):
        raise TokenizerError(f"{source}: BPE ranks must be the distinct integers 0..{len(values) - 1}")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise TokenizerError(
            f"{source}: a byte-level BPE vocabulary must contain all 256 single bytes; {len(missing)} are missing"
        )


def dump_ranks(ranks: dict[bytes, int]) -> str:
    """The ``.tiktoken`` text of ``ranks``, in rank order."""
    ordered = sorted(ranks.items(), key=lambda kv: kv[1])
    return "".join(f"{base64.b64encode(tok).decode('ascii')} {rank}\n" for tok, rank in ordered)


def parse_ranks(text: str, *, source: str = "ranks") -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            if len(parts) != 2:
                raise ValueError
            ranks[base64.b64decode(parts[0], validate=True)] = int(parts[1])
        except ValueError:
            raise TokenizerError(
                f"{source}, line {lineno}: expected 'BASE64TOKEN RANK' (the .tiktoken format), got {line[:60]!r}"
            ) from None
    return ranks


def save_ranks(ranks: dict[bytes, int], path: str | os.PathLike) -> None:
    """Write ``ranks`` as a ``.tiktoken`` file, atomically."""
    from statelab.io import atomic_write_text

    atomic_write_text(path, dump_ranks(ranks))


def load_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    p = Path(path)
    try:
        text = p.read_text(encoding="ascii")
    except UnicodeDecodeError:
        raise TokenizerError(f"{p}: not a .tiktoken ranks file (it is not ASCII text)") from None
    ranks = parse_ranks(text, source=str(p))
    _check_ranks(ranks, str(p))
    return ranks


# --------------------------------------------------------------------------------------
# BPE training


def train_bpe(text: str, vocab_size: int, *, pattern: str = BPE_PATTERN) -> dict[bytes, int]:
    """Train byte-level BPE ranks on ``text``: the 256 bytes, then ``vocab_size - 256`` merges.

    The text is split into chunks by ``pattern`` (the same pattern tiktoken uses to encode,
    so merges never cross chunk boundaries); distinct chunks are counted once with their
    frequency. Each round merges the most frequent adjacent pair (ties: the smaller pair of
    byte strings, so training is deterministic) and updates only the chunks that contain it.
    The merged token's rank is its merge order, which is what tiktoken's encoder applies.
    Stops early when no pair occurs twice (the text is too small for the requested size).
    """
    import regex

    if vocab_size < 256:
        raise TokenizerError(f"a byte-level BPE vocabulary has at least 256 tokens; got vocab_size={vocab_size}")
    if not text:
        raise TokenizerError("cannot train BPE on empty text")
    ranks: dict[bytes, int] = {bytes([b]): b for b in range(256)}
    counts = collections.Counter(regex.findall(pattern, text))
    words: list[list[bytes]] = []
    freqs: list[int] = []
    for chunk, c in counts.items():
        b = chunk.encode("utf-8", errors="surrogatepass")
        if len(b) > 1:
            words.append([b[i : i + 1] for i in range(len(b))])
            freqs.append(c)

    pair_count: collections.Counter[tuple[bytes, bytes]] = collections.Counter()
    where: dict[tuple[bytes, bytes], set[int]] = collections.defaultdict(set)
    for wi, w in enumerate(words):
        f = freqs[wi]
        for a, b in zip(w, w[1:]):
            pair_count[(a, b)] += f
            where[(a, b)].add(wi)

    # max-heap of (-count, pair); stale entries are skipped when popped
    heap = [(-c, p) for p, c in pair_count.items()]
    heapq.heapify(heap)
    while len(ranks) < vocab_size and heap:
        negc, pair = heapq.heappop(heap)
        c = pair_count.get(pair, 0)
        if c != -negc:  # stale: every changed pair was pushed again with its new count
            continue
        if c < 2:
            break
        a, b = pair
        new = a + b
        if new not in ranks:
            ranks[new] = len(ranks)
        touched: set[tuple[bytes, bytes]] = set()
        for wi in list(where.pop(pair, ())):
            w, f = words[wi], freqs[wi]
            for x, y in zip(w, w[1:]):  # remove this word's old pairs
                pair_count[(x, y)] -= f
                touched.add((x, y))
            merged, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and w[i] == a and w[i + 1] == b:
                    merged.append(new)
                    i += 2
                else:
                    merged.append(w[i])
                    i += 1
            words[wi] = merged
            for x, y in zip(merged, merged[1:]):
                pair_count[(x, y)] += f
                where[(x, y)].add(wi)
                touched.add((x, y))
        pair_count.pop(pair, None)
        for p in touched:
            n = pair_count.get(p, 0)
            if n > 0:
                heapq.heappush(heap, (-n, p))
            else:
                pair_count.pop(p, None)
    return ranks


__all__ = [
    "BPE_PATTERN",
    "BPETokenizer",
    "ByteTokenizer",
    "CharTokenizer",
    "IdsTokenizer",
    "SentencePieceTokenizer",
    "Tokenizer",
    "TokenizerError",
    "WordTokenizer",
    "alphabet",
    "bundled_encodings",
    "dump_ranks",
    "learn_tokenizer",
    "load_bpe",
    "load_sentencepiece",
    "load_ranks",
    "make_tokenizer",
    "parse_ranks",
    "save_ranks",
    "tokenizer_from_json",
    "train_bpe",
]
