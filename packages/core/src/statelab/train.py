"""The trainer behind ``statelab train SPEC``: one loop, owned here, for every assembled model.

What a run does, in order:

1. Validate the spec (``--set key=value`` overrides applied first), take the run
   directory's lock (``<out_dir>/<name>/.lock``), build the data and the model.
2. Train for ``train.steps`` optimizer steps: AdamW (no decay on norms, biases,
   embeddings), warmup then cosine, gradient clipping, gradient accumulation, bf16
   autocast on CUDA (fp16 with a grad scaler when asked), optional ``torch.compile``.
   Loss = cross-entropy (on ``batch.mask`` positions when the data has a mask) plus the
   model's weighted regularizers. In ``stream`` batching the model state is carried from
   batch to batch, detached (truncated BPTT), and re-initialised on rows whose stream
   restarts. Under torchrun with ``WORLD_SIZE > 1``: DistributedDataParallel, each rank
   its slice of the global batch, rank 0 alone evaluates, logs and checkpoints.
3. Every ``eval_interval`` steps and at the end: validation loss, accuracy, bits per
   character/byte, perplexity, and a generated sample; a new best is saved to ``best/``.
   Every ``checkpoint_interval`` steps and at the end: a full checkpoint (the last
   ``keep_last`` are kept; ``last`` points at the newest).
4. After training: fit the planner (if any), then run the spec's probes, on the best
   weights; everything is logged to the run's mlflow run.

Host-device synchronisation happens only at log, eval and checkpoint steps (losses are
kept on the device until then), so the loop runs ahead of an accelerator.

Stops: ``train.time_budget_s`` (counted from process start), SIGINT/SIGTERM (a checkpoint
is saved and the run ends cleanly; ``--resume`` continues exactly), a non-finite loss
(:class:`TrainingDiverged`, with the last good checkpoint left in place).
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import signal
import socket
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from statelab import checkpoint as ckpt
from statelab import distributed as distr
from statelab.io import RunLock as OSRunLock  # the flock-based lock (statelab.io); RunLock below is unused
from statelab.io import atomic_write_text
from statelab.optim import lr_at, make_optimizer, set_lr
from statelab.spec import RunSpec, SpecError, SpecIssue, dump_spec, flatten, load_document, validate_spec

__all__ = [
    "ResumeError",
    "RunLock",
    "RunLockedError",
    "TrainResult",
    "TrainingDiverged",
    "apply_overrides",
    "evaluate",
    "process_start_time",
    "train",
]

LN2 = math.log(2.0)


class RunLockedError(RuntimeError):
    """Another live trainer owns the run directory."""


class ResumeError(RuntimeError):
    """``--resume`` cannot continue this run (nothing to resume, or the model changed)."""


class TrainingDiverged(RuntimeError):
    """A non-finite loss; the message names the step and the last good checkpoint."""


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    status: str  # "finished" | "interrupted" | "time_budget"
    best_val_loss: float | None
    metrics: dict[str, float]
    mlflow_run_id: str | None
    tokens_per_s: float
    checkpoint: Path | None
    history: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    model: Any = None


# --------------------------------------------------------------------------------------
# process start, spec overrides, lock


def process_start_time() -> float:
    """Wall-clock time (``time.time()``) at which this process started (Linux: from /proc)."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        start_ticks = int(fields[19])  # field 22 of stat: starttime, in clock ticks since boot
        with open("/proc/stat") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        return btime + start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return _IMPORT_TIME


_IMPORT_TIME = time.time()


def apply_overrides(doc: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides (values parsed as YAML) to a spec document."""
    import yaml

    doc = copy.deepcopy(doc)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise SpecError([SpecIssue("--set", f"{item!r} is not key=value (e.g. --set train.steps=100)")])
        value = yaml.safe_load(raw) if raw != "" else None
        parts = key.split(".")
        node: Any = doc
        for i, part in enumerate(parts[:-1]):
            nxt = parts[i + 1]
            if isinstance(node, list):
                node = node[int(part)]
                continue
            if part not in node or node[part] is None:
                node[part] = [] if nxt.isdigit() else {}
            node = node[part]
        last = parts[-1]
        if isinstance(node, list):
            idx = int(last)
            if idx == len(node):
                node.append(value)
            else:
                node[idx] = value
        else:
            node[last] = value
    return doc


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """``<run_dir>/.lock`` holding the owner's PID: one trainer per run directory.

    A lock whose PID is dead (a crashed trainer) is reclaimed with a note on stderr.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / ".lock"
        self.held = False

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    info = json.loads(self.path.read_text() or "{}")
                except (OSError, ValueError):
                    info = {}
                pid, host = int(info.get("pid", -1)), info.get("host", "?")
                if pid == os.getpid() and host == me["host"]:
                    self.held = True
                    return self
                if host != me["host"]:
                    raise RunLockedError(
                        f"run directory {str(self.path.parent)!r} is locked by PID {pid} on host {host!r}; "
                        f"if no trainer runs there any more, delete {str(self.path)!r}"
                    ) from None
                if pid > 0 and _pid_alive(pid):
                    raise RunLockedError(
                        f"run directory {str(self.path.parent)!r} is in use by another trainer (PID {pid}); wait for "
                        f"it to finish, or train under another name or --out. If no trainer is running, delete "
                        f"{str(self.path)!r}"
                    ) from None
                print(f"statelab: reclaiming stale lock {self.path} (PID {pid} is not running)", file=sys.stderr)
                try:
                    self.path.unlink()
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise RunLockedError(f"could not take the lock {str(self.path)!r}: another process keeps taking it")

    def release(self) -> None:
        if not self.held:
            return
        try:
            info = json.loads(self.path.read_text())
            if int(info.get("pid", -1)) == os.getpid():
                self.path.unlink()
        except (OSError, ValueError):
            pass
        self.held = False


class _Signals:
    """SIGINT/SIGTERM set a flag the loop checks; a second SIGINT aborts at once."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._prev: dict[int, Any] = {}

    def install(self) -> "_Signals":
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._prev[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    def restore(self) -> None:
        for sig, prev in self._prev.items():
            signal.signal(sig, prev)
        self._prev.clear()


class _Progress:
    """A ``\\r`` progress line on a terminal, plain log lines otherwise (stderr)."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.enabled = enabled
        self.tty = enabled and sys.stderr.isatty()
        self.total = total
        self._open = False

    def train(self, step: int, loss: float, lr: float, tok_s: float, elapsed: float) -> None:
        if not self.enabled:
            return
        line = f"step {step}/{self.total} | loss {loss:.4f} | lr {lr:.2e} | {tok_s:,.0f} tok/s | {elapsed:.0f}s"
        if self.tty:
            frac = step / max(1, self.total)
            bar = "#" * int(20 * frac) + "-" * (20 - int(20 * frac))
            sys.stderr.write(f"\r[{bar}] {line}\033[K")
            sys.stderr.flush()
            self._open = True
        else:
            print(line, file=sys.stderr, flush=True)

    def note(self, text: str) -> None:
        if not self.enabled:
            return
        if self._open:
            sys.stderr.write("\n")
            self._open = False
        print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._open:
            sys.stderr.write("\n")
            self._open = False


# --------------------------------------------------------------------------------------
# loss and evaluation


def token_loss(logits: Tensor, y: Tensor, mask: Tensor | None) -> Tensor:
    """Mean cross-entropy over all positions, or over ``mask`` positions."""
    V = logits.shape[-1]
    if mask is None:
        return F.cross_entropy(logits.reshape(-1, V).float(), y.reshape(-1))  # (B*T, V)
    ce = F.cross_entropy(logits.reshape(-1, V).float(), y.reshape(-1), reduction="none")  # (B*T,)
    m = mask.reshape(-1).to(ce.dtype)
    return (ce * m).sum() / m.sum().clamp(min=1.0)


def evaluate(
    model: Any, data: Any, *, batch_size: int, seq_len: int, max_batches: int | None, device: torch.device,
    autocast: Any = None,
) -> dict[str, float]:
    """Validation loss (nats/token), accuracy, bits per character and per byte, perplexity.

    ``val/bpc`` = loss / ln 2 / characters per token and ``val/bpb`` = loss / ln 2 / UTF-8
    bytes per token, both over the validation text (equal for ASCII text with a char or
    byte tokenizer; for BPE they are the comparable numbers across tokenizers). Accuracy
    and loss count ``batch.mask`` positions only when the data has a mask.
    ``max_batches=None`` covers the whole validation split. Windows start from a fresh state.
    """
    was = model.training
    model.eval()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.float64)
    count = torch.zeros((), device=device, dtype=torch.float64)
    try:
        with torch.no_grad(), (autocast() if autocast is not None else nullcontext()):
            for batch in data.val_batches(batch_size, seq_len, max_batches):
                batch = _to_device(batch, device)
                logits, _, _ = model(batch.x)  # (B, T, V)
                V = logits.shape[-1]
                ce = F.cross_entropy(logits.reshape(-1, V).float(), batch.y.reshape(-1), reduction="none")  # (B*T,)
                hit = logits.argmax(-1).reshape(-1) == batch.y.reshape(-1)
                if batch.mask is not None:  # multiply, not index: boolean indexing would sync with the host
                    m = batch.mask.reshape(-1)
                    loss_sum += (ce.double() * m).sum()
                    correct += (hit & m).double().sum()
                    count += m.double().sum()
                else:
                    loss_sum += ce.double().sum()
                    correct += hit.double().sum()
                    count += ce.numel()
    finally:
        model.train(was)
    n = count.item()
    if n == 0:
        raise ValueError("evaluation saw no validation tokens; the data source has no validation split "
                         "for this seq_len")
    loss = loss_sum.item() / n
    bytes_pt = float(getattr(data, "bytes_per_token", None) or 1.0)
    chars_pt = float(getattr(data, "chars_per_token", None) or bytes_pt)
    return {
        "val/loss": loss,
        "val/acc": correct.item() / n,
        "val/bpc": loss / LN2 / chars_pt,
        "val/bpb": loss / LN2 / bytes_pt,
        "val/ppl": math.exp(min(loss, 50.0)),
        "val/tokens": n,
    }


# --------------------------------------------------------------------------------------
# state helpers


def _reset_rows(state: dict[str, Tensor], reset: Tensor | None, init: dict[str, Tensor]) -> dict[str, Tensor]:
    """Re-initialise the rows of ``state`` where ``reset (B,)`` is true (no host sync)."""
    if reset is None:
        return state
    out = {}
    for k, v in state.items():
        fresh = init[k]
        if fresh.shape != v.shape:  # a growing state (KV cache): only whole-batch resets work
            if bool(reset.all()):
                out[k] = fresh
            elif not bool(reset.any()):
                out[k] = v
            else:
                raise RuntimeError(f"state entry {k!r} changes shape over time, so single stream rows cannot be reset; "
                                   "use train.batching: random for this model")
            continue
        r = reset.view(-1, *([1] * (v.dim() - 1)))  # (B, 1, ...)
        out[k] = torch.where(r, fresh.to(v.dtype), v)
    missing = set(init) - set(out)
    for k in missing:
        out[k] = init[k]
    return out


def _to_device(batch: Any, device: torch.device) -> Any:
    """Host -> device without a sync: pinned memory and a non-blocking copy on CUDA."""
    if device.type != "cuda":
        return batch.to(device)
    pinned = type(batch)(*(None if t is None else t.pin_memory() for t in (batch.x, batch.y, batch.mask, batch.reset)))
    return pinned.to(device, non_blocking=True)


def _optimizer_state(opt: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Tensor]]:
    sd = opt.state_dict()
    tensors: dict[str, Tensor] = {}
    extra: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, Tensor):
                tensors[f"optim.{pid}.{k}"] = v.detach().to("cpu").contiguous().clone()
            else:
                extra.setdefault(str(pid), {})[k] = v
    return {"param_groups": sd["param_groups"], "extra": extra}, tensors


def _load_optimizer_state(opt: torch.optim.Optimizer, js: Mapping[str, Any], tensors: Mapping[str, Tensor]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        if not key.startswith("optim."):
            continue
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = v
    for pid, d in js.get("extra", {}).items():
        state.setdefault(int(pid), {}).update(d)
    opt.load_state_dict({"state": state, "param_groups": js["param_groups"]})


def _rng_json() -> dict[str, Any]:
    py = random.getstate()
    npst = np.random.get_state()
    return {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [npst[0], npst[1].tolist(), int(npst[2]), int(npst[3]), float(npst[4])],
    }


def _set_rng_json(d: Mapping[str, Any]) -> None:
    py = d["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = d["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))


def _spec_diff(old: Mapping[str, Any], new: Mapping[str, Any], sections: tuple[str, ...]) -> list[str]:
    lines = []
    for sec in sections:
        a = flatten(old.get(sec), sec) if old.get(sec) is not None else {sec: "null"}
        b = flatten(new.get(sec), sec) if new.get(sec) is not None else {sec: "null"}
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                lines.append(f"  {k}: {a.get(k, '(absent)')} -> {b.get(k, '(absent)')}")
    return lines


# --------------------------------------------------------------------------------------
# the trainer


def _init_from(model: torch.nn.Module, path: str) -> None:
    """Load ``train.init_from``'s weights into the freshly built ``model``, or say why they do not fit."""
    ck = ckpt.read_checkpoint(path)
    if ck.vocab_size != model.vocab_size:
        raise ckpt.IncompatibleCheckpointError(f"train.init_from {path!r}: the checkpoint's vocabulary has {ck.vocab_size} tokens and this "
                         f"spec's has {model.vocab_size}; use the tokenizer and data the checkpoint was trained with")
    theirs, ours = ck.state_dict(), model.state_dict()
    missing = sorted(set(ours) - set(theirs))
    unexpected = sorted(set(theirs) - set(ours))
    reshaped = sorted(k for k in set(ours) & set(theirs) if ours[k].shape != theirs[k].shape)
    if missing or unexpected or reshaped:
        def few(keys: list[str]) -> str:
            return ", ".join(keys[:4]) + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "")
        parts = [f"{what}: {few(keys)}" for what, keys in
                 (("missing from the checkpoint", missing), ("not in this model", unexpected),
                  ("of another shape", [f"{k} {tuple(theirs[k].shape)} -> {tuple(ours[k].shape)}" for k in reshaped]))
                 if keys]
        raise ckpt.IncompatibleCheckpointError(f"train.init_from {path!r}: the checkpoint does not fit the model this spec builds ("
                         + "; ".join(parts) + "); make the spec's model section match the checkpoint's")
    model.load_state_dict(theirs)


def _load_doc(spec_or_path: Any) -> tuple[dict[str, Any], str | None]:
    if isinstance(spec_or_path, RunSpec):
        return dump_spec(spec_or_path), None
    if isinstance(spec_or_path, (str, Path)):
        return load_document(spec_or_path), str(spec_or_path)
    if isinstance(spec_or_path, Mapping):
        return copy.deepcopy(dict(spec_or_path)), None
    raise TypeError(f"train() takes a spec path, dict or RunSpec, not {type(spec_or_path).__name__}")


def _precision(cfg: Any, device: torch.device) -> str:
    prec = cfg.precision
    if prec == "auto":
        prec = "bf16" if device.type == "cuda" else "fp32"
    if prec == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        prec = "fp16"
    return prec


def train(
    spec_or_path: Any,
    *,
    registry: Any = None,
    resume: bool = False,
    out_dir: str | os.PathLike | None = None,
    overrides: Iterable[str] = (),
    progress: bool | None = None,
    stop_after: int | None = None,
) -> TrainResult:
    """Train a spec (a path, a dict or a :class:`RunSpec`); see the module docstring.

    ``out_dir`` overrides ``train.out_dir``; ``overrides`` are ``key=value`` strings;
    ``progress`` shows progress on stderr (default: on for rank 0); ``stop_after`` stops as
    if interrupted once that many steps are done (tests and benchmarks).
    """
    start_wall = process_start_time()
    doc, source = _load_doc(spec_or_path)
    doc = apply_overrides(doc, overrides)
    resolved = validate_spec(doc, registry, source=source)
    spec: RunSpec = resolved.spec
    cfg = spec.train
    info = distr.init(cfg.device)
    main = info.is_main
    run_dir = Path(out_dir if out_dir is not None else cfg.out_dir) / spec.name
    lock = OSRunLock(run_dir)
    signals = _Signals()
    live: dict[str, Any] = {}  # the open mlflow run, closed as FAILED if training raises
    try:
        if main:
            lock.acquire()
        distr.barrier(info)
        result = _train(spec, resolved, cfg, info, run_dir, registry, resume, progress, stop_after, start_wall,
                        signals.install(), live)
        # Every rank reaches the end before any rank tears the process group down: a gloo rank
        # that destroys its group and exits while a peer is still in its post-training work
        # aborted at interpreter exit ("terminate called without an active exception").
        distr.barrier(info)
        return result
    except BaseException as exc:
        if live.get("tracker") is not None:
            live["tracker"].set_tags({"statelab.error": f"{type(exc).__name__}: {exc}"})
            live["tracker"].finish("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    finally:
        signals.restore()
        lock.release()
        distr.shutdown(info)


def _train(spec, resolved, cfg, info, run_dir, registry, resume, progress, stop_after, start_wall, signals, live):
    from statelab.build import build
    from statelab.data import make_data
    from statelab.tracking import NullTracker, git_revision, open_tracker

    device, main, W, rank = info.device, info.is_main, info.world_size, info.rank
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    per_rank, rem = divmod(cfg.batch_size, W * cfg.grad_accum)
    if rem or per_rank == 0:
        raise SpecError([SpecIssue("train.batch_size", f"{cfg.batch_size} is not divisible by world_size x grad_accum "
                                   f"= {W} x {cfg.grad_accum}; pick a multiple of {W * cfg.grad_accum}")])
    last_link = run_dir / "last"
    ck_dir = run_dir / "checkpoints"
    if resume and not (last_link / ckpt.MODEL_FILE).exists():
        raise ResumeError(f"nothing to resume in {str(run_dir)!r} (no checkpoint at {str(last_link)!r}); "
                          "start the run without --resume")
    if not resume and ck_dir.exists() and any(ck_dir.glob("step-*")):
        raise ResumeError(f"{str(run_dir)!r} already holds checkpoints of an earlier run; pass --resume to continue "
                          "it, or train under another name or --out (or delete the directory)")

    stream = cfg.batching == "stream"
    torch.manual_seed(spec.seed + rank)
    random.seed(spec.seed + rank)
    np.random.seed((spec.seed + rank) % 2**32)
    data = make_data(spec)
    model = build(resolved, vocab_size=data.vocab_size, registry=registry)
    model.tokenizer = data.tokenizer
    spec_doc = dump_spec(spec)

    # -- resume -------------------------------------------------------------------------
    start_step, best_val, best_step, run_id = 0, None, None, None
    history: dict[str, list[dict[str, float]]] = {"train": [], "val": []}
    tstate: dict[str, Any] = {}
    ttensors: dict[str, Tensor] = {}
    if resume:
        ck, tstate, ttensors = ckpt.load_training_state(last_link, tokenizer=data.tokenizer)
        diff = _spec_diff(tstate.get("spec", {}), spec_doc, ("model", "tokenizer"))
        if ck.vocab_size != model.vocab_size:
            diff.append(f"  vocab_size: {ck.vocab_size} -> {model.vocab_size}")
        if diff:
            raise ResumeError(
                "the spec changed in ways that alter the model, so --resume cannot continue this run:\n"
                + "\n".join(diff)
                + "\nrevert these changes, or start a new run (another name or --out); changes to train and tracking "
                "(e.g. train.steps) are allowed"
            )
        model.load_state_dict(ck.state_dict())
        start_step = int(tstate["step"])
        best_val, best_step = tstate.get("best_val_loss"), tstate.get("best_step")
        run_id = tstate.get("mlflow_run_id")
        history = tstate.get("history", history)
    elif cfg.init_from:
        _init_from(model, cfg.init_from)
    model.to(device)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for fp32 matmuls, as in nanoGPT

    optimizer = make_optimizer(model, cfg, device)
    prec = _precision(cfg, device)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(prec)

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()

    scaler = torch.amp.GradScaler(device.type) if prec == "fp16" else None
    if resume:
        _load_optimizer_state(optimizer, tstate["optimizer"], ttensors)
        if scaler is not None and tstate.get("scaler"):
            scaler.load_state_dict(tstate["scaler"])
        _set_rng_json(tstate["rng"])
        key = f"rng.torch.{rank}"
        if key in ttensors:
            torch.set_rng_state(ttensors[key])
        if device.type == "cuda" and f"rng.cuda.{rank}" in ttensors:
            torch.cuda.set_rng_state(ttensors[f"rng.cuda.{rank}"], device)

    fwd = torch.compile(model) if cfg.compile else model
    if info.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        planner = getattr(model, "planner", None)
        unused = planner is not None and any(p.requires_grad for p in planner.parameters())
        fwd = DDP(fwd, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=unused)

    # carried stream state (per rank: this rank's rows)
    B_rank = cfg.batch_size // W
    carried: dict[str, Tensor] | None = None
    if resume and stream:
        saved = {k[len("stream."):]: v for k, v in ttensors.items() if k.startswith("stream.")}
        if saved:
            carried = {k: v[rank * B_rank : (rank + 1) * B_rank].to(device) for k, v in saved.items()}

    # -- tracking, run directory -------------------------------------------------------
    tracker = NullTracker()
    progress_on = main if progress is None else (progress and main)
    prog = _Progress(progress_on, cfg.steps)
    metrics_file = run_dir / "metrics.jsonl"
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        import yaml

        atomic_write_text(run_dir / "spec.yaml", yaml.safe_dump(spec_doc, sort_keys=False))
        if resume and metrics_file.exists():  # drop lines past the checkpoint we resume from
            keep = [ln for ln in metrics_file.read_text().splitlines() if ln and json.loads(ln)["step"] <= start_step]
            atomic_write_text(metrics_file, "".join(ln + "\n" for ln in keep))
        elif not resume:
            metrics_file.unlink(missing_ok=True)
            (run_dir / "samples.txt").unlink(missing_ok=True)
        tracker = open_tracker(spec.tracking, run_name=spec.name, resume_run_id=run_id)
        live["tracker"] = tracker
        run_id = tracker.run_id
        if not resume:
            tracker.log_params({**flatten(spec_doc), "model.parameters": model.num_parameters()})
        tags = {
            "statelab.core_version": _core_version(),
            "statelab.distributions": json.dumps(resolved.distributions()),
            "statelab.run_dir": str(run_dir.resolve()),
            "statelab.device": str(device),
            "statelab.world_size": W,
            "statelab.precision": prec,
            "statelab.backbone": resolved.backbone.component.name,
            "statelab.memories": ",".join(m.component.name for m in resolved.memories),
            "statelab.planner": resolved.planner.component.name if resolved.planner else "",
        }
        tags.update({f"plugin.{d}": v for d, v in resolved.distributions().items()})
        if resume:  # params stay those of the first start; a later change of train.* is recorded here
            tags[f"statelab.resumed_at.{start_step}"] = json.dumps(_spec_diff(tstate.get("spec", {}), spec_doc,
                                                                                ("train", "tracking")))
        rev = git_revision() if tracker.enabled else None
        if rev:
            tags["mlflow.source.git.commit"] = rev
            tags["statelab.git_revision"] = rev
        tracker.set_tags(tags)
        tracker.log_artifact(run_dir / "spec.yaml")
        prog.note(f"statelab: training {spec.name} ({model.num_parameters():,} parameters) on {device} x{W}, "
                  f"{prec}{', compiled' if cfg.compile else ''}"
                  f"{f', DDP over {torch.distributed.get_backend()}' if info.enabled else ''}; run dir {run_dir}"
                  + (f"; resuming at step {start_step}" if resume else ""))

    ck_meta = {"statelab.mlflow_run_id": run_id, "statelab.mlflow_uri": tracker.uri} if run_id else {}

    # -- helpers closing over the run -------------------------------------------------------
    pending: list[tuple[int, Tensor]] = []
    last_metrics: dict[str, float] = {}
    last_good_ckpt: list[Path | None] = [None]
    if resume:
        last_good_ckpt[0] = last_link.resolve()

    def drain() -> list[tuple[int, float]]:
        """Bring pending per-step losses to the host; stop on a non-finite one."""
        if not pending:
            return []
        vals = torch.stack([v for _, v in pending]).tolist()
        out = [(s, v) for (s, _), v in zip(pending, vals)]
        pending.clear()
        bad = next(((s, v) for s, v in out if not math.isfinite(v)), None)
        if main:
            with open(metrics_file, "a") as f:
                for s, v in out:
                    f.write(json.dumps({"step": s, "train/loss": v}) + "\n")
        if bad is not None:
            where = (f"the last good checkpoint is {str(last_good_ckpt[0])!r}" if last_good_ckpt[0]
                     else "no checkpoint was written before it")
            raise TrainingDiverged(
                f"training diverged: the loss is {bad[1]} at step {bad[0]}; stopped without saving. {where}. "
                "Lower train.lr, raise train.warmup_steps, or enable train.grad_clip"
            )
        return out

    def save_checkpoint(step: int) -> Path | None:
        drain()
        tensors: dict[str, Tensor] = {}
        # per-rank RNG and carried state are gathered on every rank (collectives), written by rank 0
        rng = torch.get_rng_state()
        rngs = distr.all_gather_rows(info, rng.to(device) if device.type == "cuda" else rng).cpu().view(W, -1)
        for r in range(W):
            tensors[f"rng.torch.{r}"] = rngs[r].clone()
        if device.type == "cuda":
            crng = torch.cuda.get_rng_state(device)
            crngs = distr.all_gather_rows(info, crng.to(device)).cpu().view(W, -1)
            for r in range(W):
                tensors[f"rng.cuda.{r}"] = crngs[r].clone()
        if stream and carried is not None:
            for k, v in carried.items():
                tensors[f"stream.{k}"] = distr.all_gather_rows(info, v.detach()).cpu()
        if not main:
            return None
        opt_js, opt_t = _optimizer_state(optimizer)
        tensors.update(opt_t)
        state = {
            "step": step,
            "spec": spec_doc,
            "best_val_loss": best_val,
            "best_step": best_step,
            "mlflow_run_id": run_id,
            "world_size": W,
            "optimizer": opt_js,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": _rng_json(),
            "history": history,
        }
        path = ck_dir / f"step-{step:07d}"
        ckpt.save(path, model, tokenizer=data.tokenizer, trainer_state=state, trainer_tensors=tensors,
                  extra_meta=ck_meta)
        tmp_link = run_dir / f".last.{os.getpid()}"
        tmp_link.unlink(missing_ok=True)
        os.symlink(os.path.relpath(path, run_dir), tmp_link)
        os.replace(tmp_link, last_link)
        old = sorted(ck_dir.glob("step-*"))[: -cfg.keep_last]
        for o in old:
            import shutil

            shutil.rmtree(o, ignore_errors=True)
        last_good_ckpt[0] = path
        return path

    sample_prompt = None
    if data.val_tokens is not None and len(data.val_tokens) > 0:
        sample_prompt = data.val_tokens[:8].tolist()

    def run_eval(step: int) -> None:
        nonlocal best_val, best_step
        drain()
        m = evaluate(model, data, batch_size=max(1, cfg.batch_size // W), seq_len=cfg.seq_len,
                     max_batches=cfg.eval_batches, device=device, autocast=autocast)
        m["val/elapsed_s"] = time.time() - start_wall
        improved = best_val is None or m["val/loss"] < best_val
        if improved:
            best_val, best_step = m["val/loss"], step
            ckpt.save(run_dir / "best", model, tokenizer=data.tokenizer, extra_meta=ck_meta)
        m["best/val_loss"] = best_val
        m["best/val_bpc"] = min(h["val/bpc"] for h in history["val"] + [m])
        history["val"].append({"step": step, **m})
        last_metrics.update(m)
        tracker.log_metrics(m, step)
        prog.note(f"eval step {step}: val loss {m['val/loss']:.4f} | bpc {m['val/bpc']:.4f} | acc {m['val/acc']:.3f}"
                  f" | ppl {m['val/ppl']:.2f}{' (best)' if improved else ''}")
        if cfg.sample_tokens > 0 and data.tokenizer is not None:
            from statelab.generation import generate

            prompt = sample_prompt or [0]
            try:
                res = generate(model, [prompt], tokenizer=data.tokenizer, max_new_tokens=cfg.sample_tokens,
                               temperature=0.8, top_k=50, seed=spec.seed + step, use_planner=False)
                text = data.tokenizer.decode(prompt) + res.texts[0]
            except Exception as exc:  # noqa: BLE001 - a sample must never kill training
                text = f"(sampling failed: {type(exc).__name__}: {exc})"
            with open(run_dir / "samples.txt", "a", encoding="utf-8") as f:
                f.write(f"=== step {step} ===\n{text}\n\n")

    # -- the loop ---------------------------------------------------------------------------
    model.train()
    tokens_per_step = cfg.batch_size * cfg.seq_len
    step = start_step
    stop_reason = None
    t_last = time.perf_counter()
    side_time = 0.0  # eval/checkpoint time inside the current log window
    tok_windows: list[tuple[int, float]] = []
    last_log_step = start_step
    last_gn: Tensor | None = None
    last_reg: dict[str, Any] = {}
    lr = lr_at(step, cfg)
    mb_rows = B_rank // cfg.grad_accum
    clip_params = [p for p in model.parameters() if p.requires_grad]  # walked once, not every step
    saved_at: int | None = None
    evaled_at: int | None = None
    budget = cfg.time_budget_s

    while step < cfg.steps:
        if not info.enabled:
            if signals.received is not None:
                stop_reason = "interrupted"
                break
            if budget is not None and time.time() - start_wall > budget:
                stop_reason = "time_budget"
                break
            if stop_after is not None and step >= stop_after:
                stop_reason = "interrupted"
                break
        lr = lr_at(step, cfg)
        set_lr(optimizer, lr)
        batch = data.train_batch(step, cfg.batch_size, cfg.seq_len, mode=cfg.batching, rank=rank, world_size=W)
        batch = _to_device(batch, device)
        state_in = None
        if stream:
            init = model.init_state(B_rank, device)
            carried = _reset_rows(carried, batch.reset, init) if carried is not None else init
            state_in = carried
        step_loss: Tensor | None = None
        new_states: list[dict[str, Tensor]] = []
        for i in range(cfg.grad_accum):
            rows = slice(i * mb_rows, (i + 1) * mb_rows)
            x, y = batch.x[rows], batch.y[rows]
            mask = batch.mask[rows] if batch.mask is not None else None
            st = {k: v[rows] for k, v in state_in.items()} if state_in is not None else None
            sync = fwd.no_sync() if (info.enabled and i < cfg.grad_accum - 1) else nullcontext()
            with sync:
                with autocast():
                    logits, new_st, aux = fwd(x, st)  # (b, T, V)
                    loss = token_loss(logits, y, mask)
                    reg, reg_metrics = model.regularization(aux)
                    total = loss + reg if reg is not None else loss
                scaled = total / cfg.grad_accum if cfg.grad_accum > 1 else total  # no extra kernel when 1
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
            d = scaled.detach()
            step_loss = d if step_loss is None else step_loss + d
            if stream:
                new_states.append({k: v.detach() for k, v in new_st.items()})
            last_reg = reg_metrics
        if stream:
            carried = {k: torch.cat([s[k] for s in new_states], 0) for k in new_states[0]}
        if cfg.grad_clip > 0:
            if scaler is not None:
                scaler.unscale_(optimizer)
            last_gn = torch.nn.utils.clip_grad_norm_(clip_params, cfg.grad_clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        pending.append((step, step_loss))

        # -- logging (a host sync), distributed stop agreement -----------------------------
        if step % cfg.log_interval == 0 or step == cfg.steps:
            stop_flag = signals.received is not None or (budget is not None and time.time() - start_wall > budget)
            if stop_after is not None and step >= stop_after:
                stop_flag = True
            if info.enabled:
                vals_local = torch.stack([v for _, v in pending])
                bad_local = not bool(torch.isfinite(vals_local).all())
                flags = torch.tensor([float(stop_flag), float(bad_local)], device=device)
                torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
                if flags[1].item() > 0 and not bad_local:
                    raise TrainingDiverged(f"training diverged on another rank at or before step {step}")
            out = drain()
            now = time.perf_counter()
            window = now - t_last - side_time
            n_steps = step - last_log_step
            tok_s = n_steps * tokens_per_step / window if window > 0 else float("nan")
            tok_windows.append((n_steps, window))
            t_last, side_time, last_log_step = now, 0.0, step
            mean_loss = sum(v for _, v in out) / max(1, len(out))
            m = {"train/loss": mean_loss, "train/lr": lr, "train/tok_per_s": tok_s,
                 "train/elapsed_s": time.time() - start_wall}
            if last_gn is not None:
                m["train/grad_norm"] = float(last_gn)
            for k, v in last_reg.items():
                m[k] = float(v)
            history["train"].append({"step": step, "train/loss": mean_loss, "train/tok_per_s": tok_s})
            last_metrics.update(m)
            tracker.log_metrics(m, step)
            prog.train(step, mean_loss, lr, tok_s, time.time() - start_wall)
            if info.enabled and flags[0].item() > 0:
                over = budget is not None and time.time() - start_wall > budget
                stop_reason = "time_budget" if over and signals.received is None else "interrupted"
                break

        t_side = time.perf_counter()
        if step % cfg.eval_interval == 0 and step < cfg.steps:
            if main:
                run_eval(step)
                evaled_at = step
        if step % cfg.checkpoint_interval == 0 and step < cfg.steps:
            save_checkpoint(step)
            saved_at = step
        side_time += time.perf_counter() - t_side

    # -- the end: final eval, checkpoint -------------------------------------------------------
    prog.close()
    drain()
    if stop_reason is None:
        stop_reason = "finished"
    if main and stop_reason != "time_budget" and evaled_at != step and step > start_step:
        run_eval(step)
    elif main and stop_reason == "time_budget" and not history["val"]:
        run_eval(step)
    final_ckpt = None
    if saved_at != step and step > start_step:
        final_ckpt = save_checkpoint(step)
    elif saved_at == step:
        final_ckpt = ck_dir / f"step-{step:07d}"
    status = stop_reason

    counted = tok_windows[1:] if len(tok_windows) > 1 else tok_windows
    tot_t = sum(w for _, w in counted)
    tokens_per_s = sum(n for n, _ in counted) * tokens_per_step / tot_t if tot_t > 0 else float("nan")

    if not main:
        return TrainResult(run_dir, step, status, best_val, last_metrics, None, tokens_per_s, final_ckpt, history,
                           model)

    if stop_reason == "interrupted":
        sig = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}.get(signals.received, "a stop request")
        prog.note(f"statelab: stopped by {sig} at step {step}; checkpoint {final_ckpt}; continue with --resume")
    elif stop_reason == "time_budget":
        prog.note(f"statelab: time budget of {budget:.0f}s reached at step {step}")
    summary = {"train/tok_per_s_mean": tokens_per_s, "train/steps_done": step,
               "train/elapsed_s": time.time() - start_wall}
    if device.type == "cuda":
        summary["train/peak_gpu_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    tracker.log_metrics(summary, step)
    last_metrics.update(summary)

    # post-training: planner fit and probes on the best weights
    has_planner = getattr(model, "planner", None) is not None and cfg.planner_fit.enabled
    probes = list(resolved.probes)
    if stop_reason in ("finished", "time_budget") and (has_planner or probes):  # not after an interruption
        if (run_dir / "best" / ckpt.MODEL_FILE).exists():
            best = ckpt.read_checkpoint(run_dir / "best")
            model.load_state_dict(best.state_dict())
        model.eval()
        if has_planner:
            pf = cfg.planner_fit
            counter = iter(range(10**12))

            def batches_fn() -> Tensor:
                i = next(counter)
                return data.train_batch(10**9 + i, pf.batch_size, pf.seq_len).x.to(device)  # (B, T)

            prog.note(f"statelab: fitting the planner ({pf.steps} steps)")
            pm = model.planner.fit(model, batches_fn, steps=pf.steps, batch_size=pf.batch_size,
                                   seq_len=pf.seq_len, lr=pf.lr) or {}
            pm = {f"planner/{k}": float(v) for k, v in pm.items()}
            tracker.log_metrics(pm, step)
            last_metrics.update(pm)
            if (run_dir / "best").exists():
                ckpt.save(run_dir / "best", model, tokenizer=data.tokenizer, extra_meta=ck_meta)
        if probes:
            last_metrics.update(_run_probes(model, probes, data, run_dir, device, spec.seed, tracker, prog, step))
    _finish_artifacts(run_dir, history, tracker)
    live["tracker"] = None
    tracker.finish("KILLED" if stop_reason == "interrupted" else "FINISHED")
    return TrainResult(run_dir, step, status, best_val, last_metrics, tracker.run_id, tokens_per_s, final_ckpt,
                       history, model)


def _core_version() -> str:
    from statelab.__about__ import __version__

    return __version__


def _run_probes(model, probes, data, run_dir, device, seed, tracker, prog, step) -> dict[str, float]:
    from statelab.build import build_probe
    from statelab.interfaces import ProbeContext
    from statelab.tracking import log_probe_result

    out: dict[str, float] = {}
    results = {}
    kinds = [rc.component.name for rc in probes]
    for i, rc in enumerate(probes):
        # a kind used twice in one spec (say, causality on two internals) gets its index, so
        # directories, metrics and tags of the two never overwrite each other
        kind = rc.component.name if kinds.count(rc.component.name) == 1 else f"{rc.component.name}.{i}"
        probe = build_probe(rc, model)
        pdir = run_dir / "probes" / kind
        pdir.mkdir(parents=True, exist_ok=True)
        ctx = ProbeContext(val_tokens=data.val_tokens, tokenizer=data.tokenizer, out_dir=pdir, device=device, seed=seed,
                           extra={"data": data})  # the DataSource, for probes that need batches (e.g. MQAR)
        res = probe.run(model, ctx)
        m = log_probe_result(tracker, kind, res, step)
        results[kind] = {"metrics": res.metrics, "verdict": res.verdict, "passed": res.passed,
                         "artifacts": {k: str(v) for k, v in res.artifacts.items()}}
        outcome = {True: "passed", False: "failed", None: ""}[res.passed]
        prog.note(f"probe {kind}: {res.verdict or ''} {outcome} "
                  + ", ".join(f"{k}={v:.4g}" for k, v in res.metrics.items()))
        out.update(m)
    atomic_write_text(run_dir / "probes" / "results.json", json.dumps(results, indent=1, default=str))
    return out


def _finish_artifacts(run_dir: Path, history: Mapping[str, list], tracker: Any) -> None:
    png = run_dir / "loss_curve.png"
    try:
        plot_history(history, png)
        tracker.log_artifact(png)
    except Exception as exc:  # noqa: BLE001 - a plot must never fail a run
        print(f"statelab: could not draw the loss curve ({exc})", file=sys.stderr)
    best = run_dir / "best" / ckpt.MODEL_FILE
    if best.exists():
        tracker.log_artifact(best, "best")
    if (run_dir / "samples.txt").exists():
        tracker.log_artifact(run_dir / "samples.txt")
    if (run_dir / "metrics.jsonl").exists():
        tracker.log_artifact(run_dir / "metrics.jsonl")


def plot_history(history: Mapping[str, list], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    tr = history.get("train", [])
    va = history.get("val", [])
    if tr:
        ax.plot([h["step"] for h in tr], [h["train/loss"] for h in tr], label="train loss")
    if va:
        ax.plot([h["step"] for h in va], [h["val/loss"] for h in va], "o-", label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
