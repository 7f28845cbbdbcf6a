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

Corpora: ``data.path`` names one file, a folder (its ``.txt``, ``.md`` and ``.jsonl`` files,
sorted), a ``.jsonl`` file (one ``{"text": ...}`` document a line) or a list of these; the
documents are joined with a blank line (:data:`DOC_SEPARATOR`). Everything is streamed in
chunks (hash, alphabet, tokenization into the cache), so memory stays bounded for corpora of
any size; the cache is then read through ``mmap``.
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
from statelab.tokenizers import CharTokenizer, Tokenizer, alphabet, learn_tokenizer, make_tokenizer

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


#: characters per chunk when a corpus is streamed (hashing, alphabet, tokenizing): bounds memory
CHUNK_CHARS = 1 << 20
READ_BYTES = 1 << 20
#: what joins the documents of a multi-document corpus (files of a folder or list, JSONL lines)
DOC_SEPARATOR = "\n\n"
#: files a folder contributes (sorted by relative path); .jsonl files are read as JSONL
FOLDER_SUFFIXES = (".txt", ".md", ".jsonl")


@dataclass
class Corpus:
    """A text corpus: one file, or documents from several files, a folder or JSONL files,
    joined by :data:`DOC_SEPARATOR`. Read in chunks (:meth:`chunks`), so a corpus larger than
    memory can be hashed and tokenized; ``sha256`` is the hash of the joined UTF-8 text (of the
    file's bytes for a single plain file)."""

    path: Path
    files: list[Path]
    sha256: str
    n_chars: int
    n_bytes: int

    def chunks(self, size: int | None = None) -> Iterator[str]:
        """The corpus text in pieces of about ``size`` (default :data:`CHUNK_CHARS`) characters,
        cut after a newline where one is near (so a BPE tokenizer sees whole lines)."""
        size = size or CHUNK_CHARS
        pending = ""
        for piece in _documents(self.files):
            pending += piece
            while len(pending) >= size:
                cut = pending.rfind("\n", size // 2, size)
                cut = size if cut < 0 else cut + 1
                yield pending[:cut]
                pending = pending[cut:]
        if pending:
            yield pending

    @property
    def text(self) -> str:
        """The whole text in memory (small corpora: tokenizer training, tests)."""
        return "".join(self.chunks())

    @property
    def raw(self) -> bytes:
        return self.text.encode("utf-8")


def _utf8_pieces(path: Path) -> Iterator[str]:
    """A file's text in pieces, decoded strictly; a bad byte is a :class:`DataError` naming its offset."""
    offset, carry = 0, b""
    with open(path, "rb") as f:
        while True:
            block = f.read(READ_BYTES)
            data = carry + block
            if not data:
                return
            end = len(data)
            if block:  # keep an incomplete trailing character for the next block
                i = end - 1
                while i >= 0 and end - i <= 4 and (data[i] & 0xC0) == 0x80:
                    i -= 1
                if i >= 0 and end - i <= 4 and data[i] >= 0xC0:
                    end = i
            try:
                text = data[:end].decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(
                    f"corpus file {str(path)!r} is not UTF-8 text (invalid byte 0x{data[exc.start]:02x} at byte offset "
                    f"{offset + exc.start}); convert it, e.g. `iconv -f latin1 -t utf-8 IN > OUT`, and point data.path at "
                    "the result"
                ) from None
            offset += end
            carry = data[end:]
            if text:
                yield text
            if not block:
                if carry:
                    raise DataError(f"corpus file {str(path)!r} ends inside a UTF-8 character; it is truncated")
                return


def _jsonl_documents(path: Path) -> Iterator[str]:
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except (ValueError, UnicodeDecodeError) as exc:
                raise DataError(f"{str(path)!r} line {lineno}: not a JSON object ({exc}); a JSONL corpus has one "
                                '{"text": ...} document per line') from None
            text = doc.get("text") if isinstance(doc, dict) else None
            if not isinstance(text, str):
                raise DataError(f"{str(path)!r} line {lineno}: no string field \"text\"; a JSONL corpus has one "
                                '{"text": ...} document per line')
            if text:
                yield text


def _documents(files: list[Path]) -> Iterator[str]:
    """The joined text of ``files`` as pieces: each file (or JSONL line) is a document."""
    first = True
    for path in files:
        docs = _jsonl_documents(path) if path.suffix == ".jsonl" else [_utf8_pieces(path)]
        for doc in docs:
            if not first:
                yield DOC_SEPARATOR
            first = False
            if isinstance(doc, str):
                yield doc
            else:
                yield from doc


def _corpus_files(path: str | os.PathLike | list) -> list[Path]:
    items = path if isinstance(path, (list, tuple)) else [path]
    if not items:
        raise DataError("data.path is an empty list; name at least one file or folder")
    files: list[Path] = []
    for item in items:
        p = Path(item).expanduser()
        if not p.exists():
            raise DataError(f"corpus file {str(p)!r} does not exist; set data.path to a UTF-8 text file, a folder of "
                            "them, a .jsonl file or a list of these (or leave it null for the bundled Tiny Shakespeare)")
        if p.is_dir():
            found = sorted((f for f in p.rglob("*") if f.is_file() and f.suffix in FOLDER_SUFFIXES),
                           key=lambda f: f.relative_to(p).as_posix())
            if not found:
                raise DataError(f"corpus folder {str(p)!r} has no {', '.join(FOLDER_SUFFIXES)} files")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"corpus path {str(p)!r} is not a file or folder")
    return files


def read_corpus(path: str | os.PathLike | list | None) -> Corpus:
    """Check and hash a corpus (``None``: the bundled one) in one streaming pass, with clear
    errors for missing, empty or non-UTF-8 inputs. ``path``: a file, a folder (its .txt, .md
    and .jsonl files), a .jsonl file (one ``{"text": ...}`` document per line) or a list."""
    if path is None:
        path = bundled_corpus_path()
    files = _corpus_files(path)
    h = hashlib.sha256()
    n_chars = n_bytes = 0
    has_text = False
    for piece in _documents(files):
        b = piece.encode("utf-8")
        h.update(b)
        n_chars += len(piece)
        n_bytes += len(b)
        has_text = has_text or bool(piece.strip())
    if not has_text:
        what = f"corpus file {str(files[0])!r}" if len(files) == 1 else f"corpus {path!r}"
        raise DataError(f"{what} is empty; data.path must name a UTF-8 text file with text in it")
    # messages name the file, or the folder or first file of a multi-document corpus
    name = files[0] if len(files) == 1 or isinstance(path, (list, tuple)) else Path(path)
    return Corpus(name, files, h.hexdigest(), n_chars, n_bytes)


def corpus_alphabet(corpus: Corpus, cache_dir: str | os.PathLike | None = None) -> str:
    """The sorted distinct characters of the corpus (one streaming pass), cached by content hash."""
    from statelab.io import atomic_write_text

    f = cache_root(cache_dir) / "alphabet" / f"{corpus.sha256}.json"
    try:
        return json.loads(f.read_text(encoding="utf-8"))["chars"]
    except (OSError, ValueError, KeyError):
        pass
    seen: set[str] = set()
    for chunk in corpus.chunks():
        seen.update(alphabet(chunk))
    chars = "".join(sorted(seen))
    try:
        atomic_write_text(f, json.dumps({"chars": chars}))
    except OSError:  # a read-only cache is not an error, only slower
        pass
    return chars


def text_tokenizer(spec: "RunSpec", corpus: Corpus | None = None) -> Tokenizer:
    """The tokenizer of a text-kind spec (``char``: the corpus alphabet, plus the passkey
    alphabet when passkey documents are mixed in)."""
    learned = spec.tokenizer.kind == "word" or (spec.tokenizer.kind == "sentencepiece" and not spec.tokenizer.path)
    if learned:
        return learn_tokenizer(spec.tokenizer, (corpus or read_corpus(spec.data.path)).chunks())
    if spec.tokenizer.kind != "char":
        return make_tokenizer(spec.tokenizer)
    corpus = corpus or read_corpus(spec.data.path)
    chars = corpus_alphabet(corpus, spec.data.cache_dir)
    if spec.data.passkey.mix > 0:
        from statelab.data.passkey import PASSKEY_ALPHABET

        chars += PASSKEY_ALPHABET
    return CharTokenizer(chars)


def _save_npy(path: Path, arr: np.ndarray) -> None:
    """Write ``arr`` as ``.npy``; a memory-mapped raw token file is copied in blocks (bounded memory)."""
    if isinstance(arr, np.memmap) and arr.filename:
        with open(path, "wb") as out, open(arr.filename, "rb") as src:
            np.lib.format.write_array_header_1_0(out, {"descr": np.lib.format.dtype_to_descr(arr.dtype),
                                                        "fortran_order": False, "shape": arr.shape})
            src.seek(arr.offset)
            left = arr.nbytes
            while left:
                block = src.read(min(left, READ_BYTES))
                out.write(block)
                left -= len(block)
        return
    with open(path, "wb") as f:
        np.save(f, arr)


def _token_dtype(tokenizer: Tokenizer) -> type:
    return np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32


def tokenize_corpus(
    corpus: Corpus, tokenizer: Tokenizer, val_fraction: float, cache_dir: str | os.PathLike | None = None
) -> tuple[np.ndarray, np.ndarray, dict]:
    """(train, val, meta): memory-mapped token arrays, from the cache or tokenized now and cached.

    The corpus is streamed: chunks of about :data:`CHUNK_CHARS` characters are tokenized and
    appended to raw files in the cache entry being written, so memory stays bounded whatever
    the corpus size. (A BPE tokenizer sees chunk boundaries as text boundaries; chunks end at
    a newline, so this only matters for corpora longer than one chunk.)
    """
    from statelab.io import atomic_directory

    key = f"{corpus.sha256[:24]}-{tokenizer.fingerprint()[:16]}-val{val_fraction!r}"
    d = cache_root(cache_dir) / "tokens" / key
    try:
        meta = json.loads((d / "meta.json").read_text(encoding="utf-8"))
        if meta.get("format") == CACHE_FORMAT and meta.get("corpus_sha256") == corpus.sha256:
            return np.load(d / "train.npy", mmap_mode="r"), np.load(d / "val.npy", mmap_mode="r"), meta
    except (OSError, ValueError):
        pass

    cut = int(corpus.n_chars * (1 - val_fraction))
    dtype = _token_dtype(tokenizer)
    counts = {"train": [0, 0, 0], "val": [0, 0, 0]}  # tokens, chars, bytes

    def write_splits(tmp: Path) -> dict[str, np.ndarray]:
        files = {split: open(tmp / f"{split}.raw", "wb") for split in counts}
        try:
            seen = 0
            for chunk in corpus.chunks():
                parts = (("train", chunk[: max(0, cut - seen)]), ("val", chunk[max(0, cut - seen):]))
                seen += len(chunk)
                for split, part in parts:
                    if not part:
                        continue
                    try:
                        ids = tokenizer.encode_array(part)
                    except ValueError as exc:
                        raise DataError(f"corpus {str(corpus.path)!r}, {split} split: {exc}") from None
                    files[split].write(ids.astype(dtype).tobytes())
                    c = counts[split]
                    c[0] += len(ids)
                    c[1] += len(part)
                    c[2] += len(part.encode("utf-8"))
        finally:
            for f in files.values():
                f.close()
        for split, (n_tok, n_chr, _) in counts.items():
            if n_tok < 2:
                raise DataError(
                    f"corpus file {str(corpus.path)!r} is too short: its {split} split ({n_chr} characters) has "
                    f"{n_tok} token(s) with val_fraction={val_fraction}; use a longer corpus (at least a few windows "
                    "of train.seq_len tokens)"
                )
        return {split: np.memmap(tmp / f"{split}.raw", dtype=dtype, mode="r", shape=(counts[split][0],))
                for split in counts}

    def meta_doc() -> dict:
        return {
            "format": CACHE_FORMAT,
            "corpus": str(corpus.path),
            "corpus_files": len(corpus.files),
            "corpus_sha256": corpus.sha256,
            "tokenizer": tokenizer.to_json() if tokenizer.kind != "bpe" else {"kind": "bpe", "name": tokenizer.name},
            "tokenizer_sha256": tokenizer.fingerprint(),
            "val_fraction": val_fraction,
            "n_train": counts["train"][0],
            "n_val": counts["val"][0],
            "train_bytes": counts["train"][2],
            "val_bytes": counts["val"][2],
            "val_chars": counts["val"][1],
        }

    try:
        with atomic_directory(d) as tmp:
            arrays = write_splits(tmp)
            _save_npy(tmp / "train.npy", arrays["train"])
            _save_npy(tmp / "val.npy", arrays["val"])
            del arrays
            for split in counts:
                (tmp / f"{split}.raw").unlink()
            (tmp / "meta.json").write_text(json.dumps(meta_doc(), indent=1), encoding="utf-8")
        return np.load(d / "train.npy", mmap_mode="r"), np.load(d / "val.npy", mmap_mode="r"), meta_doc()
    except OSError:  # read-only cache location: work from a temporary directory
        import tempfile

        tmp = Path(tempfile.mkdtemp(prefix="statelab-tokens-"))
        arrays = write_splits(tmp)
        return arrays["train"], arrays["val"], meta_doc()


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
