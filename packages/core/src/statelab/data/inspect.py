"""Data inspection: ``statelab data inspect SPEC`` and the check the trainer runs before step 0.

Silent data corruption trains without an error: a corpus padded with NUL bytes, a tokenizer
whose vocabulary misses most of the text, validation windows copied from the training
split. :func:`inspect_data` measures, on the data a spec trains on (a bounded sample of it):

========================  ================================================  ==================
check                     value                                             warns above
========================  ================================================  ==================
``flood``                 share of the most frequent id                     ``flood`` (0.3)
``unknown``               share of the tokenizer's unknown id               ``unknown`` (0.01)
``pad``                   share of padding (the tokenizer's pad id, or the  ``pad`` (0.01)
                          id of the NUL character)
``unused``                share of vocabulary ids never seen (learned       ``unused`` (0.5)
                          vocabularies only: byte and ids cover fixed
                          ranges by design)
``duplicate_windows``     share of training windows (every ``window``-th    ``duplicate_windows``
                          offset, ``window`` = min(seq_len, 64) ids) that   (0.05)
                          occur again at another offset of the training
                          sample (synthetic tasks: examples equal to an
                          earlier one)
``bad_bytes``             non-UTF-8 or control bytes (other than tab, LF,   ``bad_bytes`` (1e-4)
                          CR) per byte of the corpus files
``overlap``               share of validation windows that occur anywhere   ``overlap`` (0.01)
                          in the training sample (any offset; synthetic
                          tasks: identical examples)
========================  ================================================  ==================

and a histogram of the most frequent ids. Windows are compared by a 64-bit polynomial hash
of their ids (a collision would only overstate a rate, by ~1e-19 per pair).
"""

from __future__ import annotations

import codecs
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from statelab.callbacks import Callback

#: tokens of each split read by the checks (evenly spaced blocks of a larger split)
MAX_TOKENS = 2_000_000
BLOCK = 65_536
#: synthetic tasks: training examples sampled (batches of 64 rows)
SYNTHETIC_ROWS = 4096
_HASH_MUL = np.uint64(0x9E3779B97F4A7C15)


@dataclass(frozen=True)
class Thresholds:
    """A check warns when its value is above its threshold (see the module doc)."""

    flood: float = 0.3
    unknown: float = 0.01
    pad: float = 0.01
    unused: float = 0.5
    duplicate_windows: float = 0.05
    bad_bytes: float = 1e-4
    overlap: float = 0.01


@dataclass
class Finding:
    check: str
    value: float
    threshold: float
    detail: str

    @property
    def warn(self) -> bool:
        return self.value > self.threshold

    def line(self) -> str:
        flag = "WARNING" if self.warn else "ok"
        return f"{flag:<8} {self.check:<18} {self.value:>9.4%}  (threshold {self.threshold:.4%})  {self.detail}"


@dataclass
class DataReport:
    kind: str
    tokenizer: str
    vocab_size: int
    train_tokens: int
    val_tokens: int
    sampled_tokens: int
    histogram: list[dict[str, Any]] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.warn]

    def format(self) -> str:
        out = [f"{self.kind} data, {self.tokenizer} tokenizer, vocabulary {self.vocab_size}: "
               f"{self.train_tokens:,} training and {self.val_tokens:,} validation tokens "
               f"({self.sampled_tokens:,} training tokens sampled)", "", "most frequent ids:"]
        for h in self.histogram:
            out.append(f"  {h['id']:>7}  {h['share']:>8.3%}  {h['count']:>12,}  {h['text']!r}")
        out += ["", *(f.line() for f in self.findings), ""]
        n = len(self.warnings)
        out.append(f"{n} warning(s)" if n else "no warnings")
        return "\n".join(out)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for f, src in zip(d["findings"], self.findings):
            f["warn"] = src.warn
        return d


# --------------------------------------------------------------------------------------
# measurements


def window_hashes(ids: np.ndarray, window: int, stride: int) -> np.ndarray:
    """64-bit polynomial hashes of ``ids[i : i + window]`` for i = 0, stride, 2 stride, ...
    (uint64 arithmetic wraps, which is the modulus)."""
    ids = np.asarray(ids, dtype=np.uint64)
    n = (len(ids) - window) // stride + 1
    if n <= 0:
        return np.zeros(0, dtype=np.uint64)
    h = np.zeros(n, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(window):
            h = h * _HASH_MUL + ids[j : j + (n - 1) * stride + 1 : stride] + np.uint64(1)
    return h


def bad_byte_rate(files: Iterable[Path]) -> tuple[float, int, int]:
    """(rate, bad bytes, bytes): invalid UTF-8 and control bytes (not tab, LF, CR) in the files."""
    bad = total = 0
    control = np.ones(256, dtype=bool)
    control[32:127] = False
    control[128:] = False
    control[[9, 10, 13]] = False
    for path in files:
        dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        with open(path, "rb") as f:
            while block := f.read(1 << 22):
                total += len(block)
                arr = np.frombuffer(block, dtype=np.uint8)
                bad += int(control[arr].sum())
                # U+FFFD the decoder made, less the ones the file really contains (EF BF BD)
                bad += dec.decode(block).count("\ufffd") - block.count(b"\xef\xbf\xbd")
        bad += dec.decode(b"", final=True).count("\ufffd")
    return (bad / total if total else 0.0), bad, total


def _sample(tokens: np.ndarray, limit: int) -> np.ndarray:
    """All of ``tokens``, or evenly spaced blocks of them adding up to about ``limit``."""
    if len(tokens) <= limit:
        return np.asarray(tokens, dtype=np.int64)
    starts = np.linspace(0, len(tokens) - BLOCK, max(1, limit // BLOCK)).astype(np.int64)
    return np.concatenate([np.asarray(tokens[s : s + BLOCK], dtype=np.int64) for s in starts])


def _pad_ids(tokenizer) -> list[int]:
    pad = getattr(tokenizer, "pad_id", None)
    if pad is not None:
        return [int(pad)]
    try:
        ids = tokenizer.encode("\x00")
    except Exception:  # noqa: BLE001 - a tokenizer that cannot encode NUL has no NUL padding
        return []
    return ids if len(ids) == 1 and ids[0] != getattr(tokenizer, "unk_id", None) else []


def _token_text(tokenizer, i: int) -> str:
    try:
        return tokenizer.decode([i])
    except Exception:  # noqa: BLE001 - the histogram shows ids even when one cannot be decoded
        return "?"


def _synthetic_rows(data, seq_len: int, rows: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, val rows) of input ids, sampled from a synthetic task's batches."""
    n = max(1, rows // batch_size)
    train = [data.train_batch(step, batch_size, seq_len).x.numpy() for step in range(n)]
    val = [b.x.numpy() for b in data.val_batches(batch_size, seq_len, max_batches=n)]
    return np.concatenate(train), np.concatenate(val)


def inspect_data(
    data, *, seq_len: int, files: Iterable[Path] = (), thresholds: Thresholds | None = None,
    max_tokens: int = MAX_TOKENS, rows: int = SYNTHETIC_ROWS, batch_size: int = 64, top: int = 10,
) -> DataReport:
    """Inspect a :class:`~statelab.data.DataSource` (``files``: the corpus files of text data,
    for the byte check). Reads at most ``max_tokens`` tokens of each text split, or ``rows``
    examples of each split of a synthetic task (in batches of ``batch_size``)."""
    th = thresholds or Thresholds()
    tok = data.tokenizer
    V = int(data.vocab_size)
    findings: list[Finding] = []
    if data.train_tokens is not None:
        train_all, val_all = data.train, data.val
        n_train, n_val = len(train_all), len(val_all)
        train, val = _sample(train_all, max_tokens), _sample(val_all, max_tokens // 4)
        window = max(8, min(seq_len, 64))
        every = window_hashes(train, window, 1)  # (n - window + 1,) a window at every offset
        uniq, seen = np.unique(every, return_counts=True)
        repeated = uniq[seen > 1]
        dup_hits = np.isin(every[::window], repeated)
        overlap_hits = np.isin(window_hashes(val, window, window), uniq)
        unit = f"windows of {window} ids"
    else:
        train_rows, val_rows = _synthetic_rows(data, seq_len, rows, batch_size)
        train, val = train_rows.reshape(-1), val_rows.reshape(-1)
        n_train, n_val = train.size, val.size
        rows_h = window_hashes(train, train_rows.shape[1], train_rows.shape[1])
        uniq, first = np.unique(rows_h, return_index=True)
        dup_hits = np.ones(len(rows_h), dtype=bool)
        dup_hits[first] = False  # a row repeats if an earlier row is the same
        overlap_hits = np.isin(window_hashes(val, val_rows.shape[1], val_rows.shape[1]), uniq)
        unit = "examples"
    counts = np.bincount(train[(train >= 0) & (train < V)], minlength=V)
    n = max(1, int(counts.sum()))
    order = np.argsort(-counts, kind="stable")[:top]
    histogram = [{"id": int(i), "count": int(counts[i]), "share": counts[i] / n, "text": _token_text(tok, int(i))}
                 for i in order if counts[i] > 0]

    top_id = int(order[0])
    findings.append(Finding("flood", counts[top_id] / n, th.flood,
                            f"id {top_id} ({_token_text(tok, top_id)!r}) is the most frequent"))
    unk = getattr(tok, "unk_id", None)
    if unk is not None:
        findings.append(Finding("unknown", counts[unk] / n, th.unknown, f"id {unk} is the unknown token"))
    pads = _pad_ids(tok)
    if pads:
        findings.append(Finding("pad", counts[pads].sum() / n, th.pad, f"padding id(s) {pads}"))
    if tok.kind not in ("byte", "ids"):
        unused = int((counts == 0).sum())
        findings.append(Finding("unused", unused / V, th.unused, f"{unused} of {V} ids never occur in training"))
    dups = int(dup_hits.sum())
    findings.append(Finding("duplicate_windows", dups / max(1, len(dup_hits)), th.duplicate_windows,
                            f"{dups} of {len(dup_hits)} training {unit} occur more than once"))
    files = list(files)
    if files:
        rate, bad, total = bad_byte_rate(files)
        findings.append(Finding("bad_bytes", rate, th.bad_bytes,
                                f"{bad} non-UTF-8 or control bytes in {total:,} bytes of {len(files)} file(s)"))
    hits = int(overlap_hits.sum())
    findings.append(Finding("overlap", hits / max(1, len(overlap_hits)), th.overlap,
                            f"{hits} of {len(overlap_hits)} validation {unit} also occur in training"))
    return DataReport(data.kind, tok.kind, V, n_train, n_val, int(train.size), histogram, findings)


def inspect_spec(spec, thresholds: Thresholds | None = None, max_tokens: int = MAX_TOKENS) -> DataReport:
    """:func:`inspect_data` on the data a run spec trains on."""
    from statelab.data import make_data
    from statelab.spec import parse_spec, uses_builtin_data

    spec = parse_spec(getattr(spec, "spec", spec))
    files: list[Path] = []
    if spec.data.kind == "text" and uses_builtin_data(spec.data):
        from statelab.data.text import read_corpus

        files = read_corpus(spec.data.path).files
    data = make_data(spec)
    return inspect_data(data, seq_len=spec.train.seq_len, files=files, thresholds=thresholds, max_tokens=max_tokens)


class DataCheck(Callback):
    """Before step 0 (rank 0, a new run): :func:`inspect_data` on a small sample of the run's
    data; each warning is printed to stderr (training goes on: a warning is not proof of a bug)."""

    name, order = "data-check", 5
    #: tokens (text) or examples (synthetic tasks) per split the check reads: it must stay cheap
    max_tokens, rows = 200_000, 256

    def on_run_start(self, trainer: Any) -> None:
        if not trainer.is_main:
            return
        cfg = trainer.spec.train
        report = inspect_data(trainer.data, seq_len=cfg.seq_len, max_tokens=self.max_tokens, rows=self.rows,
                              batch_size=cfg.batch_size)
        for f in report.warnings:
            print(f"statelab: data warning: {f.check} {f.value:.2%} > {f.threshold:.2%}: {f.detail} "
                  "(`statelab data inspect SPEC` for the full report)", file=sys.stderr)


__all__ = ["DataCheck", "DataReport", "Finding", "Thresholds", "bad_byte_rate", "inspect_data", "inspect_spec",
           "window_hashes"]
