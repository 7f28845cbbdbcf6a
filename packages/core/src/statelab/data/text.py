"""Text corpora: read, split, tokenize once, cache as memory-mapped ``.npy``, batch.

Split (nanoGPT's shakespeare_char split, so numbers compare): the corpus TEXT is cut at
character ``int(n_chars * (1 - val_fraction))``; the part before is training, the rest
validation, and each part is tokenized on its own (for Tiny Shakespeare with the char
tokenizer: 1,003,854 training and 111,540 validation tokens, vocabulary 65).

Cache: ``<cache_dir>/tokens/<corpus sha256>-<tokenizer sha256>-val<fraction>/`` holds
``train.npy``, ``val.npy`` (uint16, or uint32 past 65,536 ids) and ``meta.json``; the directory
is written atomically and loaded with ``np.load(mmap_mode="r")`` on every later run.
``cache_dir`` is ``data.cache_dir``, else ``$STATELAB_CACHE_DIR``, else ``~/.cache/statelab``.
A char tokenizer's alphabet (a pass over the whole corpus) is cached too.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch
from torch import Tensor

from statelab.data.base import MIX, TRAIN, Batch, DataError, DataSource, rank_rows, rng_for
from statelab.data.batching import gather, gather_windows, random_starts, stream_starts, val_windows
from statelab.tokenizers import CharTokenizer, Tokenizer, alphabet, make_tokenizer

if TYPE_CHECKING:  # pragma: no cover
    from statelab.spec import PasskeySpec, RunSpec

CACHE_FORMAT = 1


def bundled_corpus_path() -> Path:
    """The bundled Tiny Shakespeare corpus (``statelab/assets/tinyshakespeare.txt``)."""
    return Path(str(resources.files("statelab") / "assets" / "tinyshakespeare.txt"))


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    if cache_dir:
        return Path(cache_dir).expanduser()
    env = os.environ.get("STATELAB_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "statelab"


@dataclass
class Corpus:
    path: Path
    raw: bytes
    sha256: str

    @property
    def text(self) -> str:
        return self.raw.decode("utf-8")


def read_corpus(path: str | os.PathLike | None) -> Corpus:
    """Read a UTF-8 corpus (``None``: the bundled one), with clear errors for bad files."""
    p = bundled_corpus_path() if path is None else Path(path).expanduser()
    if not p.exists():
        raise DataError(f"corpus file {str(p)!r} does not exist; set data.path to a UTF-8 text file "
                        "(or leave it null for the bundled Tiny Shakespeare)")
    if not p.is_file():
        raise DataError(f"corpus path {str(p)!r} is not a file; data.path must name one UTF-8 text file")
    raw = p.read_bytes()
    if not raw.strip():
        raise DataError(f"corpus file {str(p)!r} is empty; data.path must name a UTF-8 text file with text in it")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"corpus file {str(p)!r} is not UTF-8 text (invalid byte 0x{raw[exc.start]:02x} at byte offset "
            f"{exc.start}); convert it, e.g. `iconv -f latin1 -t utf-8 IN > OUT`, and point data.path at the result"
        ) from None
    return Corpus(p, raw, hashlib.sha256(raw).hexdigest())


def corpus_alphabet(corpus: Corpus, cache_dir: str | os.PathLike | None = None) -> str:
    """The sorted distinct characters of the corpus, cached by content hash."""
    from statelab.io import atomic_write_text

    f = cache_root(cache_dir) / "alphabet" / f"{corpus.sha256}.json"
    try:
        return json.loads(f.read_text(encoding="utf-8"))["chars"]
    except (OSError, ValueError, KeyError):
        pass
    chars = alphabet(corpus.text)
    try:
        atomic_write_text(f, json.dumps({"chars": chars}))
    except OSError:  # a read-only cache is not an error, only slower
        pass
    return chars


def text_tokenizer(spec: "RunSpec", corpus: Corpus | None = None) -> Tokenizer:
    """The tokenizer of a text-kind spec (``char``: the corpus alphabet, plus the passkey
    alphabet when passkey documents are mixed in)."""
    if spec.tokenizer.kind != "char":
        return make_tokenizer(spec.tokenizer)
    corpus = corpus or read_corpus(spec.data.path)
    chars = corpus_alphabet(corpus, spec.data.cache_dir)
    if spec.data.passkey.mix > 0:
        from statelab.data.passkey import PASSKEY_ALPHABET

        chars += PASSKEY_ALPHABET
    return CharTokenizer(chars)


def _save_npy(path: Path, arr: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, arr)


def tokenize_corpus(
    corpus: Corpus, tokenizer: Tokenizer, val_fraction: float, cache_dir: str | os.PathLike | None = None
) -> tuple[np.ndarray, np.ndarray, dict]:
    """(train, val, meta): memory-mapped token arrays, from the cache or tokenized now and cached."""
    from statelab.io import atomic_directory

    key = f"{corpus.sha256[:24]}-{tokenizer.fingerprint()[:16]}-val{val_fraction!r}"
    d = cache_root(cache_dir) / "tokens" / key
    try:
        meta = json.loads((d / "meta.json").read_text(encoding="utf-8"))
        if meta.get("format") == CACHE_FORMAT and meta.get("corpus_sha256") == corpus.sha256:
            return np.load(d / "train.npy", mmap_mode="r"), np.load(d / "val.npy", mmap_mode="r"), meta
    except (OSError, ValueError):
        pass

    text = corpus.text
    cut = int(len(text) * (1 - val_fraction))
    train_text, val_text = text[:cut], text[cut:]
    arrays = {}
    for split, part in (("train", train_text), ("val", val_text)):
        try:
            ids = tokenizer.encode_array(part)
        except ValueError as exc:
            raise DataError(f"corpus {str(corpus.path)!r}, {split} split: {exc}") from None
        if len(ids) < 2:
            raise DataError(
                f"corpus file {str(corpus.path)!r} is too short: its {split} split ({len(part)} characters) has "
                f"{len(ids)} token(s) with val_fraction={val_fraction}; use a longer corpus (at least a few windows "
                "of train.seq_len tokens)"
            )
        arrays[split] = ids.astype(np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32)
    meta = {
        "format": CACHE_FORMAT,
        "corpus": str(corpus.path),
        "corpus_sha256": corpus.sha256,
        "tokenizer": tokenizer.to_json() if tokenizer.kind != "bpe" else {"kind": "bpe", "name": tokenizer.name},
        "tokenizer_sha256": tokenizer.fingerprint(),
        "val_fraction": val_fraction,
        "n_train": int(len(arrays["train"])),
        "n_val": int(len(arrays["val"])),
        "train_bytes": len(train_text.encode("utf-8")),
        "val_bytes": len(val_text.encode("utf-8")),
        "val_chars": len(val_text),
    }
    try:
        with atomic_directory(d) as tmp:
            _save_npy(tmp / "train.npy", arrays["train"])
            _save_npy(tmp / "val.npy", arrays["val"])
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
        return np.load(d / "train.npy", mmap_mode="r"), np.load(d / "val.npy", mmap_mode="r"), meta
    except OSError:  # read-only cache location: work from memory
        return arrays["train"], arrays["val"], meta


class TextData(DataSource):
    """A tokenized text corpus (see the module doc); optionally mixed with passkey documents."""

    kind = "text"

    def __init__(
        self,
        tokenizer: Tokenizer,
        train: np.ndarray,
        val: np.ndarray,
        *,
        seed: int,
        bytes_per_token: float,
        chars_per_token: float | None = None,
        source: str = "corpus",
        passkey: "PasskeySpec | None" = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.vocab_size
        self.train = train
        self.val = val
        self.seed = seed
        self.bytes_per_token = bytes_per_token
        self.chars_per_token = chars_per_token
        self.source = source
        self.passkey = passkey
        self._train_t: Tensor | None = None
        self._stream: np.ndarray | None = None
        self.passkey_starts: np.ndarray | None = None
        self._val_t: Tensor | None = None

    @property
    def train_tokens(self) -> Tensor:
        if self._train_t is None:
            self._train_t = torch.from_numpy(np.asarray(self.train, dtype=np.int64))
        return self._train_t

    @property
    def val_tokens(self) -> Tensor:
        if self._val_t is None:
            self._val_t = torch.from_numpy(np.asarray(self.val, dtype=np.int64))
        return self._val_t

    @property
    def stream_tokens(self) -> np.ndarray:
        """The token stream of stream batching: the training split, with passkey documents
        inserted when ``data.passkey.mix > 0`` (:func:`statelab.data.passkey.mix_into_stream`)."""
        if self.passkey is None or self.passkey.mix <= 0:
            return self.train
        if self._stream is None:
            from statelab.data.passkey import mix_into_stream

            self._stream, self.passkey_starts = mix_into_stream(np.asarray(self.train), self.tokenizer, self.passkey,
                                                                seed=self.seed)
        return self._stream

    def train_batch(
        self, step: int, batch_size: int, seq_len: int, *, mode: str = "random", rank: int = 0, world_size: int = 1
    ) -> Batch:
        self._check_mode(mode, ("random", "stream"))
        rows = rank_rows(batch_size, rank, world_size)
        mix = self.passkey.mix if self.passkey is not None else 0.0
        if mode == "stream":
            tokens = self.stream_tokens
            starts, fresh = stream_starts(step, len(tokens), batch_size, seq_len, self.source)
            xy = gather(tokens, starts[rows], seq_len + 1)  # (B/W, T+1)
            reset = torch.full((xy.shape[0],), fresh, dtype=torch.bool)
            return Batch(xy[:, :-1], xy[:, 1:], reset=reset)
        rng = rng_for(self.seed, TRAIN, step)
        starts = random_starts(rng, len(self.train), batch_size, seq_len, self.source)
        xy = gather(self.train, starts[rows], seq_len + 1)  # (B/W, T+1)
        if mix > 0:
            from statelab.data.passkey import passkey_document

            chosen = rng.random(batch_size) < mix  # drawn for the global batch: rank-independent
            for i, b in enumerate(range(rows.start, rows.stop)):
                if chosen[b]:
                    r = rng_for(self.seed, MIX, step, b)
                    ids, _ = passkey_document(self.tokenizer, seq_len + 1, float(r.random()), r, self.passkey.digits)
                    xy[i] = torch.as_tensor(ids, dtype=torch.int64)
        return Batch(xy[:, :-1], xy[:, 1:])

    def val_batches(self, batch_size: int, seq_len: int, max_batches: int | None = None) -> Iterator[Batch]:
        for wins in val_windows(len(self.val), batch_size, seq_len, max_batches):
            x, y, mask = gather_windows(self.val, wins, seq_len)
            yield Batch(x, y, mask)

    def describe(self) -> str:
        return (f"text {self.source}: {len(self.train):,} train / {len(self.val):,} val tokens, "
                f"{self.tokenizer.kind} tokenizer, vocabulary {self.vocab_size}")


def make_text_data(spec: "RunSpec", seed: int) -> TextData:
    corpus = read_corpus(spec.data.path)
    tokenizer = text_tokenizer(spec, corpus)
    train, val, meta = tokenize_corpus(corpus, tokenizer, spec.data.val_fraction, spec.data.cache_dir)
    return TextData(
        tokenizer,
        train,
        val,
        seed=seed,
        bytes_per_token=meta["val_bytes"] / meta["n_val"],
        chars_per_token=meta["val_chars"] / meta["n_val"],
        source=str(corpus.path),
        passkey=spec.data.passkey if spec.data.passkey.mix > 0 else None,
    )


__all__ = ["Corpus", "TextData", "bundled_corpus_path", "cache_root", "corpus_alphabet", "make_text_data",
           "read_corpus", "text_tokenizer", "tokenize_corpus"]
