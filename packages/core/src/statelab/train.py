"""``statelab train SPEC``: :func:`train` validates a spec, takes the run directory's lock and
runs a :class:`statelab.trainer.Trainer`, whose loop is the one place a model is trained.

What a run does, in order:

1. Validate the spec (``--set key=value`` overrides applied first), take the run
   directory's lock (``<out_dir>/<name>/.lock``), build the data and the model;
   ``train.threads`` sets torch's CPU threads.
2. Train for ``train.steps`` optimizer steps: AdamW (no decay on norms, biases,
   embeddings), warmup then cosine, gradient clipping, gradient accumulation, bf16
   autocast on CUDA (fp16 with a grad scaler when asked), optional ``torch.compile``.
   Loss = cross-entropy (on ``batch.mask`` positions when the data has a mask) plus the
   model's weighted regularizers. In ``stream`` batching the model state is carried from
   batch to batch, detached (truncated BPTT), and re-initialised on rows whose stream
   restarts. Under torchrun with ``WORLD_SIZE > 1``: DistributedDataParallel, each rank
   its slice of the global batch, rank 0 alone evaluates, logs and checkpoints.
3. Callbacks (:mod:`statelab.callbacks`) do the rest: every ``eval_interval`` steps and
   at the end validation loss, accuracy, bits per character/byte, perplexity and a
   generated sample, a new best saved to ``best/``; every ``checkpoint_interval`` steps and
   at the end a full checkpoint (the last ``keep_last`` kept; ``last`` points at the
   newest); mlflow tracking; the components' own training-time work.
4. After training: fit the planner (if any), then run the spec's probes, on the best
   weights; everything is logged to the run's mlflow run.

Host-device synchronisation happens only at log, eval and checkpoint steps (losses are
kept on the device until then), so the loop runs ahead of an accelerator.

Stops: ``train.time_budget_s`` (counted from process start) and SIGINT/SIGTERM end
training with a checkpoint (``--resume`` continues exactly) and interrupt the planner fit
or a probe within seconds; the result's ``status`` is then ``interrupted`` or
``time_budget`` (``statelab train`` exits non-zero, the mlflow run is KILLED). A
non-finite loss raises :class:`TrainingDiverged`, with the last good checkpoint left in place.
"""

from __future__ import annotations

import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from statelab import distributed as distr
from statelab.io import RunLock, RunLockedError
from statelab.spec import RunSpec, apply_overrides, dump_spec, load_document, validate_spec

__all__ = [
    "ResumeError",
    "RunLockedError",
    "TrainResult",
    "TrainingDiverged",
    "apply_overrides",
    "evaluate",
    "exit_status",
    "process_start_time",
    "train",
]

LN2 = math.log(2.0)


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
    tokens_per_s: float  # mean over the run, earlier segments (before --resume) included
    checkpoint: Path | None
    history: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    model: Any = None
    stopped_in: str | None = None  # the post-training phase a stop interrupted, if any


def exit_status(result: TrainResult) -> int:
    """``statelab train``'s exit status: 0 when the run finished; 3 when a signal or the
    time budget stopped it (training or a post-training phase) before it did, so
    ``statelab train ... && next`` does not treat a preempted run as done."""
    return 0 if result.status == "finished" else 3


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


def train(
    spec_or_path: Any,
    *,
    registry: Any = None,
    resume: bool = False,
    out_dir: str | os.PathLike | None = None,
    overrides: Iterable[str] = (),
    progress: bool | None = None,
    stop_after: int | None = None,
    callbacks: Iterable[Any] = (),
) -> TrainResult:
    """Train a spec (a path, a dict or a :class:`RunSpec`); see the module docstring.

    ``out_dir`` overrides ``train.out_dir``; ``overrides`` are ``key=value`` strings;
    ``progress`` shows progress on stderr (default: on for rank 0); ``stop_after`` stops as
    if interrupted once that many steps are done (tests and benchmarks); ``callbacks`` adds
    :class:`statelab.Callback` objects to this run (with their state in its checkpoints).
    """
    from statelab.trainer import Signals, Trainer

    start_wall = process_start_time()
    doc, source = _load_doc(spec_or_path)
    doc = apply_overrides(doc, overrides)
    resolved = validate_spec(doc, registry, source=source)
    cfg = resolved.spec.train
    info = distr.init(cfg.device)
    run_dir = Path(out_dir if out_dir is not None else cfg.out_dir) / resolved.spec.name
    lock = RunLock(run_dir)
    signals = Signals()
    try:
        if info.is_main:
            lock.acquire()
        distr.barrier(info)
        trainer = Trainer(resolved, info, run_dir, registry=registry, resume=resume, progress=progress,
                          stop_after=stop_after, start_wall=start_wall, signals=signals.install(),
                          callbacks=tuple(callbacks))
        result = trainer.run()
        # Every rank reaches the end before any rank tears the process group down: a gloo rank
        # that destroys its group and exits while a peer is still in its post-training work
        # aborted at interpreter exit ("terminate called without an active exception").
        distr.barrier(info)
        return result
    finally:
        signals.restore()
        lock.release()
        distr.shutdown(info)


def _load_doc(spec_or_path: Any) -> tuple[dict[str, Any], str | None]:
    import copy

    if isinstance(spec_or_path, RunSpec):
        return dump_spec(spec_or_path), None
    if isinstance(spec_or_path, (str, Path)):
        return load_document(spec_or_path), str(spec_or_path)
    if isinstance(spec_or_path, Mapping):
        return copy.deepcopy(dict(spec_or_path)), None
    raise TypeError(f"train() takes a spec path, dict or RunSpec, not {type(spec_or_path).__name__}")


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
# batches and carried state


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
