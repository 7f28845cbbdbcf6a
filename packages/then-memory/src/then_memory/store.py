"""The trace store: hot (device ring) -> warm (host RAM ring) -> cold (immutable chunk files).

Config (keyword arguments of :class:`TraceStore`)::

    dim            width of a trace key (= of its value)
    hot_budget     traces kept on the compute device (a ring buffer; the GPU on CUDA machines)
    warm_budget    traces kept in host RAM (pinned when CUDA is available); >= chunk_traces
    chunk_traces   traces per cold chunk file
    device         compute device of the hot tier and of every search
    coarse_lists   > 0: a coarse index (k-means centroids) is trained when the first cold chunk
                   is sealed, on up to 64 traces per list (that chunk plus the warm and hot
                   traces held then), and every cold chunk is laid out by list, so a coarse
                   search reads only the lists nearest to each query (per query: a batch of
                   queries never widens one query's search); whenever the cold tier has
                   doubled since the last training, the index is retrained on a sample of
                   every chunk and the chunks are re-laid (``retrain_coarse``); 0 = exact only
    durable        fsync the log on every append (survives power loss, not only a killed process)
    private        the directory is created 0700 and every file 0600 (per-user memory: other
                   accounts on the machine cannot read it)

Every trace has a time index ``t`` (0, 1, 2, ... in append order). The tiers hold
contiguous ranges of time: cold ``[0, n_cold)``, warm ``[n_cold, n_cold + n_warm)``, hot the
newest. Appending past the hot budget moves the oldest hot traces to warm; past the warm
budget the oldest ``chunk_traces`` warm traces are sealed into a cold chunk file. Memory
held in each tier never exceeds its budget; the cold tier is read through ``mmap`` in
blocks, so the OS page cache does the caching.

On disk (``root``)::

    index.safetensors                 sealed chunks: (n, 2) [t0, t1) + metadata (dim, chunk size)
    chunk_<t0>.safetensors            immutable: k, v (n, dim) fp16; with a coarse index also
                                      ids (n,) time index of each row, rows (n,) row of each
                                      time, offsets (lists + 1,) list boundaries
    centroids.safetensors             the coarse index, when trained
    log_<t0>.bin                      append-only log of the traces not yet sealed (time
                                      [t0, t0 + chunk_traces)): fixed-size records with a CRC

Crash safety. Chunk files and the index are written to a temporary file, fsynced and
renamed; a chunk is sealed (file, then index) before its log is deleted. Appends go to the
log first, one fixed-size record per trace with its own checksum. Reopening replays the
log and stops at the first incomplete or corrupt record, so a process killed mid-append
loses at most the records being written, and never anything sealed or logged earlier.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save as st_save
from torch import Tensor

from statelab.io import atomic_write_bytes

__all__ = ["SearchResult", "TraceStore", "read_safetensors_mmap"]

_ST_DTYPES = {"F16": np.float16, "F32": np.float32, "I64": np.int64, "BF16": None}


def read_safetensors_mmap(path: Path) -> dict[str, np.ndarray]:
    """Memory-map every tensor of a safetensors file (zero-copy, read-only numpy views)."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"{path}: truncated safetensors file (no header)")
        (n,) = struct.unpack("<Q", head)
        meta = json.loads(f.read(n))
    size = path.stat().st_size
    out = {}
    for name, info in meta.items():
        if name == "__metadata__":
            continue
        dt = _ST_DTYPES.get(info["dtype"])
        if dt is None:
            raise ValueError(f"{path}: unsupported dtype {info['dtype']} for tensor {name!r}")
        b0, b1 = info["data_offsets"]
        if 8 + n + b1 > size:
            raise ValueError(f"{path}: truncated safetensors file (tensor {name!r} ends past the file)")
        shape = tuple(info["shape"])
        if int(np.prod(shape)) == 0:
            out[name] = np.zeros(shape, dt)
        else:
            out[name] = np.memmap(path, dtype=dt, mode="r", offset=8 + n + b0, shape=shape)
    return out


def _load_malloc_trim():
    try:
        name = ctypes.util.find_library("c")
        return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:
        return None


_malloc_trim = _load_malloc_trim()


def _release_freed_heap() -> None:
    """Give the freed buffers of a seal back to the OS. glibc raises its mmap threshold after the
    first large free, so a seal's tens of MiB of transient buffers come from the heap afterwards
    and stay resident: without this the heap grew ~100 MiB per million traces ingested."""
    if _malloc_trim is not None:
        _malloc_trim(0)


def _tensor(arr: np.ndarray) -> Tensor:
    """A tensor view of a (read-only, memory-mapped) array; callers never write to it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.asarray(arr))


@dataclass
class SearchResult:
    """Top-k per query: ``ids`` (Q, k) time indices (-1 where fewer than k traces exist),
    ``scores`` (Q, k) inner products (descending), ``keys``/``values`` (Q, k, dim) float32."""

    ids: Tensor
    scores: Tensor
    keys: Tensor
    values: Tensor


class _Ring:
    """A fixed-capacity FIFO of (key, value) rows; the oldest row has time index ``t0``."""

    def __init__(self, cap: int, dim: int, device: torch.device, dtype: torch.dtype, pin: bool) -> None:
        self.cap = cap
        # zero-filled, so the whole budget is resident from the start (RSS does not creep up as it fills)
        self.k = torch.zeros(cap, dim, device=device, dtype=dtype, pin_memory=pin)
        self.v = torch.zeros(cap, dim, device=device, dtype=dtype, pin_memory=pin)
        self.start, self.n, self.t0 = 0, 0, 0

    def push(self, k: Tensor, v: Tensor) -> None:
        m = k.shape[0]
        assert self.n + m <= self.cap
        a = (self.start + self.n) % self.cap
        first = min(m, self.cap - a)
        self.k[a : a + first].copy_(k[:first], non_blocking=True)
        self.v[a : a + first].copy_(v[:first], non_blocking=True)
        if first < m:
            self.k[: m - first].copy_(k[first:], non_blocking=True)
            self.v[: m - first].copy_(v[first:], non_blocking=True)
        self.n += m

    def segments(self) -> list[tuple[int, Tensor, Tensor]]:
        """Up to two contiguous views ``(t0, k, v)`` in time order."""
        first = min(self.n, self.cap - self.start)
        segs = [(self.t0, self.k[self.start : self.start + first], self.v[self.start : self.start + first])]
        if first < self.n:
            segs.append((self.t0 + first, self.k[: self.n - first], self.v[: self.n - first]))
        return [s for s in segs if s[1].shape[0] > 0]

    def pop(self, m: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """Remove the oldest ``m`` rows and return them on ``device`` (views when possible:
        consume them before the next ``push``)."""
        ks, vs, got = [], [], 0
        for _, k, v in self.segments():
            take = min(m - got, k.shape[0])
            if take <= 0:
                break
            ks.append(k[:take])
            vs.append(v[:take])
            got += take
        # one segment: hand out views (valid until the next push, which callers do after consuming)
        k = ks[0].to(device) if len(ks) == 1 else torch.cat([x.to(device) for x in ks])
        v = vs[0].to(device) if len(vs) == 1 else torch.cat([x.to(device) for x in vs])
        self.start = (self.start + m) % self.cap
        self.n -= m
        self.t0 += m
        return k, v

    def rows(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """Rows of the time indices ``t`` (all inside this ring)."""
        idx = ((t - self.t0 + self.start) % self.cap).to(self.k.device)
        return self.k[idx], self.v[idx]


class _Chunk:
    """One sealed, memory-mapped cold chunk."""

    def __init__(self, path: Path | None, t0: int, t1: int, arrays: dict[str, np.ndarray] | None = None) -> None:
        self.path, self.t0, self.t1 = path, t0, t1
        arrs = arrays if arrays is not None else read_safetensors_mmap(path)
        self.k, self.v = arrs["k"], arrs["v"]
        if self.k.shape[0] != t1 - t0:
            raise ValueError(f"{path}: holds {self.k.shape[0]} traces, the index says {t1 - t0}")
        self.ids = arrs.get("ids")  # time index of each row (coarse layout); None = row i is t0 + i
        self.rows = arrs.get("rows")
        self.offsets = None if "offsets" not in arrs else np.asarray(arrs["offsets"])
        # the generation of the coarse index the layout was made with (chunks of an older one are read whole)
        self.gen = int(np.asarray(arrs["gen"])[0]) if "gen" in arrs else 0
        self.k_t = _tensor(self.k)  # torch views of the same memory, for gathers into a staging buffer
        self.ids_t = None if self.ids is None else _tensor(self.ids)


class TraceStore:
    """A tiered store of (key, value) traces with exact and coarse top-k search.

    ``root=None`` keeps everything in memory (no cold tier: appending past the warm budget
    is an error). ``read_only=True`` (incognito) reads the files but never writes: new
    traces live in memory only and are gone when the store is closed.
    """

    def __init__(
        self,
        root: str | os.PathLike | None,
        dim: int,
        *,
        hot_budget: int = 65536,
        warm_budget: int = 1 << 20,
        chunk_traces: int = 65536,
        device: str | torch.device = "cpu",
        coarse_lists: int = 0,
        durable: bool = False,
        read_only: bool = False,
        private: bool = False,
        block: int = 1 << 16,
    ) -> None:
        if warm_budget < chunk_traces:
            raise ValueError(f"warm_budget ({warm_budget}) must be >= chunk_traces ({chunk_traces}): "
                             "cold chunks are sealed from the warm tier")
        if hot_budget < 1:
            raise ValueError("hot_budget must be >= 1")
        self.root = Path(root) if root is not None else None
        self.dim, self.chunk_traces, self.block = dim, chunk_traces, block
        self.device = torch.device(device)
        self.durable, self.read_only, self.private = durable, read_only, private
        self.coarse_lists = coarse_lists
        self.dtype = torch.float16  # storage precision of every tier
        # in-memory tiers hold fp16 values; on a CPU-only store as float32 (CPU fp16 math is slow)
        self.ring_dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        pin = torch.cuda.is_available()
        self.hot = _Ring(hot_budget, dim, self.device, self.ring_dtype, pin=False)
        self.warm = _Ring(warm_budget, dim, torch.device("cpu"), self.ring_dtype, pin=pin)
        self.chunks: list[_Chunk] = []
        self.centroids: Tensor | None = None
        self.centroid_gen = 0  # bumped at every retraining; a chunk laid out with another generation is read whole
        self.trained_on = 0  # cold traces when the coarse index was last trained
        self._staging: tuple[Tensor, Tensor] | None = None  # coarse reads: gathered (keys, ids), reused
        self._offsets: tuple[list[_Chunk], np.ndarray] | None = None  # the list offsets of those chunks, stacked
        self._log_fd: int | None = None
        self._log_t0 = -1
        self._rec = struct.Struct(f"<q{2 * dim * 2}sI")  # time, fp16 key+value bytes, crc32
        self._rec_dtype = np.dtype([("t", "<i8"), ("kv", "<f2", (2 * dim,)), ("crc", "<u4")])  # the same, packed
        assert self._rec_dtype.itemsize == self._rec.size
        if self.root is not None:
            self._open()

    # -- sizes -----------------------------------------------------------------------
    def __len__(self) -> int:
        return self.n_cold + self.warm.n + self.hot.n

    @property
    def n_cold(self) -> int:
        return self.chunks[-1].t1 if self.chunks else 0

    def memory_bytes(self) -> dict[str, int]:
        """Bytes allocated per in-memory tier (fixed by the budgets) and on disk."""
        disk = sum(c.path.stat().st_size for c in self.chunks if c.path is not None)
        size = lambda r: 2 * r.k.numel() * r.k.element_size()  # noqa: E731 - keys and values
        return {"hot": size(self.hot), "warm": size(self.warm), "cold_disk": disk}

    # -- opening and recovery ---------------------------------------------------------
    def _open(self) -> None:
        root = self.root
        assert root is not None
        if not self.read_only:
            root.mkdir(parents=True, exist_ok=True)
            if self.private:
                os.chmod(root, 0o700)
            for tmp in root.glob(".*.tmp"):
                tmp.unlink(missing_ok=True)
        elif not root.exists():
            return
        index = root / "index.safetensors"
        spans: list[tuple[int, int]] = []
        if index.exists():
            arrs = read_safetensors_mmap(index)
            meta = self._metadata(index)
            if int(meta.get("dim", self.dim)) != self.dim:
                raise ValueError(f"{root}: the store holds traces of width {meta['dim']}, not {self.dim}")
            self.chunk_traces = int(meta.get("chunk_traces", self.chunk_traces))
            spans = [tuple(int(x) for x in row) for row in np.asarray(arrs["spans"])]
        for t0, t1 in spans:
            self.chunks.append(_Chunk(root / f"chunk_{t0:012d}.safetensors", t0, t1))
        cpath = root / "centroids.safetensors"
        if cpath.exists():
            arrs = read_safetensors_mmap(cpath)
            self.centroids = _tensor(np.array(arrs["c"])).float().to(self.device)
            self.centroid_gen = int(np.asarray(arrs["gen"])[0]) if "gen" in arrs else 0
            self.trained_on = int(np.asarray(arrs["trained_on"])[0]) if "trained_on" in arrs else 0
        if not self.read_only:  # orphans of an interrupted seal
            known = {c.path.name for c in self.chunks}
            for p in root.glob("chunk_*.safetensors"):
                if p.name not in known:
                    p.unlink()
        if not self.read_only and self.centroids is not None and any(c.gen != self.centroid_gen for c in self.chunks):
            self._relayout()  # a retraining was interrupted: finish re-laying its chunks
        self.hot.t0 = self.warm.t0 = self.n_cold
        for log in sorted(root.glob("log_*.bin")):
            t0 = int(log.stem.split("_")[1])
            if t0 < self.n_cold:  # sealed already; the seal was interrupted before deleting its log
                if not self.read_only:
                    log.unlink()
                continue
            self._replay(log, t0)

    @staticmethod
    def _metadata(path: Path) -> dict[str, str]:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            return json.loads(f.read(n)).get("__metadata__", {}) or {}

    def _replay(self, log: Path, t0: int) -> None:
        data = log.read_bytes()
        size = self._rec.size
        good = 0
        ks, vs = [], []
        for off in range(0, len(data) - size + 1, size):
            t, payload, crc = self._rec.unpack_from(data, off)
            if t != len(self) + len(ks) or zlib.crc32(payload) != crc:
                break
            kv = np.frombuffer(payload, dtype=np.float16).reshape(2, self.dim)
            ks.append(kv[0])
            vs.append(kv[1])
            good = off + size
        if good < len(data) and not self.read_only:  # drop a torn tail so later appends line up
            with open(log, "r+b") as f:
                f.truncate(good)
        if ks:
            self._insert(torch.from_numpy(np.stack(ks)).to(self.ring_dtype), torch.from_numpy(np.stack(vs)).to(self.ring_dtype),
                         log_it=False)

    # -- writing -----------------------------------------------------------------------
    def append(self, k: Tensor, v: Tensor) -> None:
        """Append traces ``k, v`` (n, dim); they get the next ``n`` time indices."""
        if k.dim() != 2 or k.shape[1] != self.dim or v.shape != k.shape:
            raise ValueError(f"append expects keys and values of shape (n, {self.dim}), got {tuple(k.shape)} and {tuple(v.shape)}")
        if k.shape[0] == 0:
            return
        k = k.detach().to(self.dtype).to(self.ring_dtype)  # rounded to the storage precision
        v = v.detach().to(self.dtype).to(self.ring_dtype)
        self._insert(k, v, log_it=self.root is not None and not self.read_only)

    def _insert(self, k: Tensor, v: Tensor, log_it: bool) -> None:
        i = 0
        n = k.shape[0]
        while i < n:  # in pieces that never cross a log segment nor overfill the hot tier
            t = len(self)
            seg_end = (t // self.chunk_traces + 1) * self.chunk_traces
            m = min(n - i, seg_end - t, self.hot.cap)
            kk, vv = k[i : i + m], v[i : i + m]
            if log_it:
                self._log(t, kk, vv)
            over = self.hot.n + m - self.hot.cap
            if over > 0:
                self._to_warm(*self.hot.pop(over, torch.device("cpu")))
            self.hot.push(kk.to(self.device), vv.to(self.device))
            i += m

    def _to_warm(self, k: Tensor, v: Tensor) -> None:
        i = 0
        while i < k.shape[0]:  # seal only a full warm tier (it then holds >= chunk_traces)
            if self.warm.n == self.warm.cap:
                self._seal()
            m = min(k.shape[0] - i, self.warm.cap - self.warm.n)
            self.warm.push(k[i : i + m], v[i : i + m])
            i += m

    def _log(self, t: int, k: Tensor, v: Tensor) -> None:
        seg = t // self.chunk_traces * self.chunk_traces
        if self._log_fd is None or self._log_t0 != seg:
            if self._log_fd is not None:
                os.close(self._log_fd)
            self._log_fd = os.open(self.root / f"log_{seg:012d}.bin", os.O_WRONLY | os.O_APPEND | os.O_CREAT,
                                   0o600 if self.private else 0o644)
            self._log_t0 = seg
        os.write(self._log_fd, self._records(t, k, v))
        if self.durable:
            os.fsync(self._log_fd)

    def _seal(self) -> None:
        """Move the oldest ``chunk_traces`` warm traces into an immutable cold chunk."""
        if self.root is None:
            raise RuntimeError(
                f"trace store over budget: {len(self)} traces exceed hot {self.hot.cap} + warm {self.warm.cap}, "
                "and the store has no directory for a cold tier; give it a root directory"
            )
        t0 = self.warm.t0
        k, v = self.warm.pop(self.chunk_traces, torch.device("cpu"))
        k, v = k.to(self.dtype), v.to(self.dtype)  # (n, dim) fp16 on disk
        t1 = t0 + k.shape[0]
        if self.read_only:  # incognito: the overflow stays in RAM (beyond the budgets) and is never written
            self.chunks.append(_Chunk(None, t0, t1, arrays={"k": k.numpy(), "v": v.numpy()}))
            return
        tensors = {"k": k.contiguous(), "v": v.contiguous()}
        if self.coarse_lists > 0:
            kf = k.to(self.device).float()  # k-means and assignment on the compute device
            if self.centroids is None:
                self._train_centroids(self._coarse_sample(kf), self.n_cold + t1 - t0)
            tensors = self._coarse_layout(kf, k, v, t0)
            del kf
        path = self.root / f"chunk_{t0:012d}.safetensors"
        self._write(path, st_save(tensors))
        spans = [(c.t0, c.t1) for c in self.chunks] + [(t0, t1)]
        meta = {"dim": str(self.dim), "chunk_traces": str(self.chunk_traces), "format": "then-trace-store/1"}
        self._write(self.root / "index.safetensors",
                           st_save({"spans": torch.tensor(spans, dtype=torch.int64).reshape(-1, 2)}, metadata=meta))
        self.chunks.append(_Chunk(path, t0, t1))
        if self.coarse_lists > 0 and self.n_cold >= 2 * max(self.trained_on, 1):
            self.retrain_coarse()  # the store doubled since the lists were made: retrain and re-lay them
        log = self.root / f"log_{t0:012d}.bin"
        if self._log_fd is not None and self._log_t0 == t0:
            os.close(self._log_fd)
            self._log_fd = None
        log.unlink(missing_ok=True)
        _release_freed_heap()

    def _train_centroids(self, sample: Tensor, n_cold: int) -> None:
        self.centroids = _kmeans(sample, self.coarse_lists, iters=10, seed=self.centroid_gen)
        self.centroid_gen += 1
        self.trained_on = n_cold
        i64 = lambda x: torch.tensor([x], dtype=torch.int64)  # noqa: E731
        self._write(self.root / "centroids.safetensors", st_save({
            "c": self.centroids.cpu().contiguous(), "gen": i64(self.centroid_gen), "trained_on": i64(n_cold)}))

    def _coarse_layout(self, kf: Tensor, k: Tensor, v: Tensor, t0: int, ids: Tensor | None = None) -> dict[str, Tensor]:
        """A chunk's tensors laid out by list: rows sorted by nearest centroid. ``kf`` the keys
        as float32 on the device, ``ids`` the time index of each row (default t0, t0 + 1, ...)."""
        assign = _nearest(kf, self.centroids).cpu()  # (n,) nearest list
        order = torch.argsort(assign, stable=True)
        ids = (torch.arange(k.shape[0]) + t0) if ids is None else ids
        ids = ids[order]
        rows = torch.empty_like(order)
        rows[ids - t0] = torch.arange(order.numel())
        counts = torch.bincount(assign, minlength=self.centroids.shape[0])
        return {
            "k": k[order].contiguous(),
            "v": v[order].contiguous(),
            "ids": ids.contiguous(),
            "rows": rows.contiguous(),
            "offsets": torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]),
            "gen": torch.tensor([self.centroid_gen], dtype=torch.int64),
        }

    def retrain_coarse(self) -> None:
        """Retrain the coarse index on a sample of every cold chunk (64 traces per list) and re-lay
        each chunk with it. Crash-safe: the new centroids are written first; until a chunk is
        rewritten (atomically) its layout belongs to the old generation and it is read whole,
        and reopening re-lays what is left."""
        if self.root is None or self.read_only or not self.chunks or self.coarse_lists <= 0:
            return
        g = torch.Generator().manual_seed(self.centroid_gen)
        want = 64 * self.coarse_lists
        parts = []
        for c in self.chunks:
            n = c.t1 - c.t0
            take = min(n, max(1, round(want * n / self.n_cold)))
            rows = np.sort(torch.randperm(n, generator=g)[:take].numpy())
            parts.append(torch.from_numpy(np.asarray(c.k[rows], dtype=np.float32)))
        self._train_centroids(torch.cat(parts).to(self.device), self.n_cold)
        self._relayout()

    def _relayout(self) -> None:
        """Rewrite every cold chunk laid out with an older generation of the coarse index."""
        for i, c in enumerate(self.chunks):
            if c.gen == self.centroid_gen and c.offsets is not None:
                continue
            k = torch.from_numpy(np.array(c.k))
            v = torch.from_numpy(np.array(c.v))
            ids = torch.from_numpy(np.array(c.ids)) if c.ids is not None else None
            tensors = self._coarse_layout(k.to(self.device).float(), k, v, c.t0, ids)
            self._write(c.path, st_save(tensors))
            self.chunks[i] = _Chunk(c.path, c.t0, c.t1)
        self._offsets = None
        _release_freed_heap()

    def _staging_buffers(self, n: int) -> tuple[Tensor, Tensor]:
        """Host buffers for ``n`` gathered keys and ids, grown on demand (pinned on CUDA, so the
        copy to the device is one DMA). A coarse read holds at most nprobe / lists of the cold
        tier here, freed with the store."""
        if self._staging is None or self._staging[0].shape[0] < n:
            cap = max(n, 1 << 16)
            pin = self.device.type == "cuda"
            self._staging = (torch.empty(cap, self.dim, dtype=self.dtype, pin_memory=pin),
                             torch.empty(cap, dtype=torch.int64, pin_memory=pin))
        return self._staging

    def _coarse_sample(self, k: Tensor) -> Tensor:
        """Training traces for the coarse index: the chunk being sealed (``k``, float32 on the
        compute device), then the oldest warm and hot traces, up to 64 per list. One chunk alone
        gives k-means too few points per list: lists then merge clusters, and an inner-product
        probe misses a merged list's traces."""
        want = 64 * self.coarse_lists - k.shape[0]
        parts = [k]
        for ring in (self.warm, self.hot):
            for _, kk, _ in ring.segments():
                if want <= 0:
                    break
                take = kk[:want].to(k.device, torch.float32)
                parts.append(take)
                want -= take.shape[0]
        return torch.cat(parts) if len(parts) > 1 else k

    def truncate(self, n: int) -> None:
        """Drop every trace with time index >= ``n`` (undoes an ingest that crashed after its
        traces were logged but before the user's state recorded them). Crash-safe: the kept
        part of a cut chunk is logged before the index forgets the chunk."""
        if n >= len(self):
            return
        if self.root is None or self.read_only:
            raise RuntimeError("truncate needs a writable store with a directory")
        root = self.root
        if self._log_fd is not None:
            os.close(self._log_fd)
            self._log_fd = None
        cut = [c for c in self.chunks if c.t1 > n]
        for c in cut:
            if c.t0 < n:  # the kept head of this chunk goes back to a log
                k, v = self.get(torch.arange(c.t0, n))
                self._write_log_file(c.t0, k.to(self.dtype), v.to(self.dtype))
        kept = [(c.t0, c.t1) for c in self.chunks if c.t1 <= n]
        meta = {"dim": str(self.dim), "chunk_traces": str(self.chunk_traces), "format": "then-trace-store/1"}
        self._write(root / "index.safetensors",
                           st_save({"spans": torch.tensor(kept, dtype=torch.int64).reshape(-1, 2)}, metadata=meta))
        for c in cut:
            c.path.unlink(missing_ok=True)
        for log in root.glob("log_*.bin"):
            t0 = int(log.stem.split("_")[1])
            if t0 >= n and not any(c.t0 == t0 and c.t0 < n for c in cut):
                log.unlink()
            elif t0 < n < t0 + self.chunk_traces and not any(c.t0 == t0 for c in cut):
                with open(log, "r+b") as f:
                    f.truncate((n - t0) * self._rec.size)
        self._reload()

    def _write_log_file(self, t0: int, k: Tensor, v: Tensor) -> None:
        self._write(self.root / f"log_{t0:012d}.bin", self._records(t0, k, v))

    def _write(self, path: Path, data: bytes) -> None:
        atomic_write_bytes(path, data)
        if self.private:  # inside a 0700 directory, so never readable by others in between
            os.chmod(path, 0o600)

    def _records(self, t0: int, k: Tensor, v: Tensor) -> bytes:
        """Log records of traces t0, t0 + 1, ...: time, fp16 key and value, crc32 of both."""
        m, d = k.shape
        rec = np.empty(m, dtype=self._rec_dtype)
        rec["t"] = np.arange(t0, t0 + m)
        rec["kv"][:, :d] = k.to(torch.float16).cpu().numpy()
        rec["kv"][:, d:] = v.to(torch.float16).cpu().numpy()
        kv = rec["kv"]
        rec["crc"] = [zlib.crc32(kv[j].tobytes()) for j in range(m)]
        return rec.tobytes()

    def _reload(self) -> None:
        pin = torch.cuda.is_available()
        self.hot = _Ring(self.hot.cap, self.dim, self.device, self.ring_dtype, pin=False)
        self.warm = _Ring(self.warm.cap, self.dim, torch.device("cpu"), self.ring_dtype, pin=pin)
        self.chunks = []
        self._open()

    def close(self) -> None:
        if self._log_fd is not None:
            os.close(self._log_fd)
            self._log_fd = None
        self.chunks = []

    def __enter__(self) -> "TraceStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- direct addressing -------------------------------------------------------------
    def fetch(self, t0: int, t1: int) -> tuple[Tensor, Tensor]:
        """Keys and values (t1 - t0, dim) of time indices [t0, t1), float32 on ``device``;
        reads only those rows (cold chunks through mmap)."""
        if not 0 <= t0 <= t1 <= len(self):
            raise IndexError(f"fetch [{t0}, {t1}) is outside the store's time range [0, {len(self)})")
        return self.get(torch.arange(t0, t1))

    def get(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values of arbitrary time indices ``ids`` (any shape; -1 gives zeros)."""
        shape = ids.shape
        flat = ids.reshape(-1).cpu()
        k = torch.zeros(flat.numel(), self.dim, dtype=torch.float32, device=self.device)
        v = torch.zeros_like(k)
        for ring in (self.hot, self.warm):
            sel = (flat >= ring.t0) & (flat < ring.t0 + ring.n)
            if sel.any():
                rk, rv = ring.rows(flat[sel])
                where = sel.nonzero().squeeze(1).to(self.device)
                k[where], v[where] = rk.to(self.device, torch.float32), rv.to(self.device, torch.float32)
        sel = (flat >= 0) & (flat < self.n_cold)
        if sel.any():
            tt = flat[sel].numpy()
            pos = sel.nonzero().squeeze(1).numpy()
            starts = np.array([c.t0 for c in self.chunks])
            which = np.searchsorted(starts, tt, side="right") - 1
            for ci in np.unique(which):
                c = self.chunks[ci]
                m = which == ci
                r = tt[m] - c.t0
                if c.rows is not None:
                    r = np.asarray(c.rows[r])
                order = np.argsort(r)  # mmap reads in file order
                rr = r[order]
                dst = torch.from_numpy(pos[m][order]).to(self.device)
                k[dst] = torch.from_numpy(np.asarray(c.k[rr], dtype=np.float32)).to(self.device)
                v[dst] = torch.from_numpy(np.asarray(c.v[rr], dtype=np.float32)).to(self.device)
        return k.view(*shape, self.dim), v.view(*shape, self.dim)

    # -- search --------------------------------------------------------------------------
    def search(self, q: Tensor, k: int, *, limit: int | None = None, coarse: bool = False, nprobe: int = 16) -> SearchResult:
        """Top-``k`` traces by inner product for each query ``q`` (Q, dim), over every tier.

        ``limit``: only traces with time index < limit. ``coarse``: in the cold tier read only
        the ``nprobe`` lists whose centroids score highest (needs ``coarse_lists > 0``); the
        hot and warm tiers are always searched exactly.
        """
        if q.dim() == 1:
            q = q[None]
        Q = q.shape[0]
        limit = len(self) if limit is None else min(limit, len(self))
        qd = q.detach().to(self.device, torch.float32)
        best_s = torch.full((Q, k), float("-inf"), device=self.device)
        best_i = torch.full((Q, k), -1, dtype=torch.int64, device=self.device)

        def merge(scores: Tensor, ids: Tensor | int) -> None:
            """scores (Q, n); ids (n,), (Q, n) or the first id of a contiguous range."""
            nonlocal best_s, best_i
            top = scores.topk(min(k, scores.shape[1]), dim=1)  # the block's own top-k first: small merges
            if isinstance(ids, int):
                cand = top.indices + ids
            else:
                cand = ids[top.indices] if ids.dim() == 1 else ids.gather(1, top.indices)  # (Q, k')
            s = torch.cat([best_s, top.values], 1)
            i = torch.cat([best_i, cand], 1)
            top = s.topk(k, dim=1)
            best_s, best_i = top.values, i.gather(1, top.indices)

        for ring in (self.hot, self.warm):
            for t0, kk, _ in ring.segments():
                n = max(0, min(kk.shape[0], limit - t0))
                for a in range(0, n, self.block):
                    b = min(n, a + self.block)
                    blk = kk[a:b].to(self.device, non_blocking=True)  # (n, dim)
                    merge((qd.to(blk.dtype) @ blk.T).float(), t0 + a)

        def score(blk: Tensor, ids: Tensor) -> None:  # blk (n, dim) fp16, ids (n,), both on the device
            sc = (qd.half() @ blk.T).float() if self.device.type == "cuda" else qd @ blk.float().T  # (Q, n)
            if limit < self.n_cold:
                sc = sc.masked_fill(ids[None] >= limit, float("-inf"))
            merge(sc, ids)

        cold = [c for c in self.chunks if c.t0 < limit]
        if coarse and self.centroids is not None:
            # chunks laid out with the current index: each query reads only its own nprobe lists;
            # the others (no layout, or laid out before a retraining finished) are read whole
            laid = [c for c in cold if c.offsets is not None and c.gen == self.centroid_gen]
            cold = [c for c in cold if not (c.offsets is not None and c.gen == self.centroid_gen)]
            if laid:
                self._coarse_search(qd, laid, nprobe, limit, merge)
        # the cold tier read whole, streamed in blocks of ``block`` rows
        pend_k: list[np.ndarray] = []
        pend_i: list[np.ndarray] = []
        pend_n = 0

        def flush() -> None:
            nonlocal pend_k, pend_i, pend_n
            if not pend_n:
                return
            blk = _tensor(pend_k[0] if len(pend_k) == 1 else np.concatenate(pend_k)).to(self.device)  # (n, dim) fp16
            ids = _tensor(pend_i[0] if len(pend_i) == 1 else np.concatenate(pend_i)).to(self.device)  # (n,)
            score(blk, ids)
            pend_k, pend_i, pend_n = [], [], 0

        for c in cold:
            for a in range(0, c.t1 - c.t0, self.block):
                b = min(c.t1 - c.t0, a + self.block)
                pend_k.append(c.k[a:b])
                pend_i.append(c.ids[a:b] if c.ids is not None else np.arange(c.t0 + a, c.t0 + b))
                pend_n += b - a
                if pend_n >= self.block:
                    flush()
        flush()
        best_i = torch.where(torch.isfinite(best_s), best_i, torch.full_like(best_i, -1))
        keys, values = self.get(best_i)
        return SearchResult(best_i, best_s, keys, values)

    def _coarse_search(self, qd: Tensor, laid: list[_Chunk], nprobe: int, limit: int, merge) -> None:
        """Per-query coarse search over the laid-out chunks ``laid``: query ``i`` scores only the
        rows of the ``nprobe`` lists whose centroids score highest for it (never the lists another
        query of the batch probes). The union of the probed lists is gathered once into a staging
        buffer (pinned on CUDA); each query then gathers its own spans from it."""
        Q = qd.shape[0]
        probe = (qd @ self.centroids.T).topk(min(nprobe, self.centroids.shape[0]), dim=1).indices.cpu()  # (Q, p)
        lists = torch.unique(probe).numpy()  # (U,) sorted
        if self._offsets is None or len(self._offsets[0]) != len(laid) or any(
                a is not b for a, b in zip(self._offsets[0], laid)):
            self._offsets = (laid, np.stack([c.offsets for c in laid]))  # (C, lists + 1)
        offs = self._offsets[1]
        a0 = offs[:, lists]  # (C, U) first row of each probed list in each chunk
        n = offs[:, lists + 1] - a0  # (C, U) its length
        total = int(n.sum())
        if not total:
            return
        # the union, chunk after chunk, list after list: span start repeated, plus 0..len-1
        nf, af = n.ravel(), a0.ravel()
        starts = np.cumsum(nf) - nf  # (C*U,) where each span begins in the buffer
        rows = torch.from_numpy(np.repeat(af - starts, nf) + np.arange(total))  # (total,) row in its chunk
        buf_k, buf_i = self._staging_buffers(total)
        pos = 0
        for c, m in zip(laid, n.sum(1).tolist()):
            if m:
                r = rows[pos : pos + m]
                torch.index_select(c.k_t, 0, r, out=buf_k[pos : pos + m])
                torch.index_select(c.ids_t, 0, r, out=buf_i[pos : pos + m])
                pos += m
        bk = buf_k[:total].to(self.device, non_blocking=True)  # (total, dim) fp16
        bi = buf_i[:total].to(self.device, non_blocking=True)  # (total,)
        # each query's spans in the buffer: its lists' positions among the union, in every chunk
        U = len(lists)
        where = np.searchsorted(lists, probe.numpy())  # (Q, p) index into the union
        span = (np.arange(len(laid))[:, None, None] * U + where[None]).transpose(1, 0, 2).reshape(Q, -1)  # (Q, C*p)
        span_n, span_s = nf[span], starts[span]  # (Q, C*p)
        per_q = span_n.sum(1)  # (Q,) rows each query scores
        R = int(per_q.max())
        idx = np.zeros((Q, R), dtype=np.int64)
        valid = np.arange(R)[None] < per_q[:, None]  # (Q, R)
        for i in range(Q):
            ln = span_n[i]
            idx[i, : per_q[i]] = np.repeat(span_s[i] - (np.cumsum(ln) - ln), ln) + np.arange(per_q[i])
        idx_t = torch.from_numpy(idx).to(self.device)
        ok = torch.from_numpy(valid).to(self.device)
        qb = max(1, (1 << 24) // max(1, R * self.dim))  # queries per block: a (qb, R, dim) gather stays ~32 MiB
        scores = []
        for a in range(0, Q, qb):
            kk = bk[idx_t[a : a + qb]]  # (qb, R, dim)
            q = qd[a : a + qb]
            scores.append(torch.einsum("qd,qrd->qr", q.half(), kk).float() if self.device.type == "cuda"
                          else torch.einsum("qd,qrd->qr", q, kk.float()))  # (qb, R)
        ids = bi[idx_t]  # (Q, R)
        merge(torch.cat(scores).masked_fill(~ok | (ids >= limit), float("-inf")), ids)


def _nearest(x: Tensor, c: Tensor) -> Tensor:
    """Index of the nearest centroid (L2) for each row of ``x``, in blocks."""
    c2 = (c * c).sum(1)  # (n,)
    rows = max(1024, (1 << 26) // c.shape[0])  # a (rows, n) distance block stays at 256 MiB in fp32
    return torch.cat([(c2 - 2 * x[a : a + rows] @ c.T).argmin(1) for a in range(0, x.shape[0], rows)])


def _kmeans(x: Tensor, n: int, iters: int, seed: int) -> Tensor:
    """Lloyd's k-means (L2) on ``x`` (N, d): centroids (n, d). Queries later probe the lists
    whose centroids have the largest inner product with them."""
    g = torch.Generator().manual_seed(seed)
    n = min(n, x.shape[0])
    c = x[torch.randperm(x.shape[0], generator=g)[:n]].clone()
    for _ in range(iters):
        assign = _nearest(x, c)  # (N,)
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        cnt = torch.bincount(assign, minlength=n)[:, None]
        c = torch.where(cnt > 0, sums / cnt.clamp(min=1), c)  # an empty list keeps its centroid
    return c
