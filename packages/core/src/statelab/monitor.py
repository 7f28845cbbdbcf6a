"""Run health from a run's metrics file: the view and the alerts behind ``statelab monitor RUN``.

The metrics file is ``<run_dir>/metrics.jsonl``: one JSON object per line with ``"step"``
and any number of metrics (``{"step": 40, "train/loss": 2.31}``; the trainer writes the
per-step training loss there). :class:`MetricsFile` is a training callback that appends the
rest of what the trainer logs (validation, gradient norm, tokens/s, the regularizers' and
components' metrics) and each checkpoint written, in the same format, so any run can be
watched; components add it with ``training_callbacks()``. Lines of one step are merged; a
later value wins.

What is watched is configuration, not code: :class:`Watch` names a metric (an exact key or
a key suffix such as ``bistability.u_mean``), optionally a metric holding the fraction of
positions at a clamp (``pinned_key``) and one holding the metric's null level
(``null_key``). :data:`PRESETS` holds named configurations (``kssm``: u and the population
order parameter R against the random-phase null); ``--watch`` adds any run's internals.

Alerts (:func:`alerts`), each with a kind and a message saying what to do:

* ``divergence``: the training loss is not finite, or its recent mean is more than
  ``divergence_ratio`` above the best so far;
* ``val-degradation``: validation perplexity is ``val_degradation`` or more above its best
  (K-SSM v2 went from 1087 to 2069: +90%);
* ``pinned``: a watched internal sits at a clamp (fraction at the bound >= ``pin_fraction``);
* ``at-null``: a watched internal is at its null level (at most ``1 + null_margin`` times it);
* ``stale``: a run that holds its lock (or whose lock names a dead process) has not written
  its metrics file for ``stale_after_s`` seconds.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from statelab.callbacks import Callback
from statelab.errors import UserError

METRICS_FILE = "metrics.jsonl"
SPARK = "▁▂▃▄▅▆▇█"

__all__ = ["Alert", "METRICS_FILE", "MetricsFile", "MonitorConfig", "PRESETS", "RunView", "Watch", "alerts",
           "load_run", "render", "parse_watch"]


class MonitorError(UserError):
    """The run or its metrics file cannot be read."""


@dataclass(frozen=True)
class Watch:
    """One internal to show: ``key`` (exact metric name or suffix), a label, and optionally the
    metric with the fraction at a clamp (``pinned_key``) and the metric with its null level (``null_key``)."""

    key: str
    label: str = ""
    pinned_key: str | None = None
    null_key: str | None = None


@dataclass(frozen=True)
class MonitorConfig:
    watches: tuple[Watch, ...] = ()
    loss_key: str = "train/loss"
    val_key: str = "val/loss"
    grad_key: str = "train/grad_norm"
    tok_key: str = "train/tok_per_s"
    divergence_ratio: float = 0.5
    val_degradation: float = 0.25
    pin_fraction: float = 0.9
    null_margin: float = 0.25
    stale_after_s: float = 300.0


#: named watch lists; ``kssm``: the bistability regularizer's u and the population order
#: parameter R of harmonic 1 with its random-phase null (both logged by kssm-oscillators)
PRESETS: dict[str, tuple[Watch, ...]] = {
    "kssm": (
        Watch("bistability.u_mean", "u", pinned_key="bistability.u_at_bound"),
        Watch("bistability.R_global_mean", "R (population)", null_key="bistability.R_global_null"),
    ),
    "none": (),
}


def parse_watch(text: str) -> Watch:
    """``KEY[,label=L][,pinned=KEY2][,null=KEY3]`` -> :class:`Watch`."""
    key, *opts = [p.strip() for p in text.split(",")]
    kw: dict[str, str] = {}
    for o in opts:
        name, sep, value = o.partition("=")
        if not sep or name not in ("label", "pinned", "null"):
            raise MonitorError(f"--watch {text!r}: options are label=, pinned=, null= (e.g. "
                               "'memory.gate_mean,null=memory.gate_null')")
        kw[{"pinned": "pinned_key", "null": "null_key"}.get(name, name)] = value
    if not key:
        raise MonitorError(f"--watch {text!r}: give a metric name first")
    return Watch(key, **kw)


@dataclass(frozen=True)
class Alert:
    kind: str
    message: str


@dataclass
class RunView:
    """Everything the view and the alerts need, read from a run directory."""

    run_dir: Path
    rows: list[dict[str, Any]]  # one per step, merged, sorted by step
    mtime: float | None  # of the metrics file
    lock: dict[str, Any] | None  # the lock file's content (pid, host, started), if any
    lock_alive: bool | None  # whether the lock's process runs (None: another host or unknown)
    checkpoints: list[tuple[float, Path]] = field(default_factory=list)  # (mtime, dir), newest last
    now: float = field(default_factory=time.time)

    def series(self, key: str) -> list[tuple[int, float]]:
        """``(step, value)`` of a metric, by exact key or, failing that, by key suffix."""
        exact = [(r["step"], float(r[key])) for r in self.rows if key in r and _num(r[key])]
        if exact:
            return exact
        return [(r["step"], float(v)) for r in self.rows for k, v in r.items()
                if k.endswith(key) and k != "step" and _num(v)]

    @property
    def running(self) -> bool:
        return self.lock is not None and self.lock_alive is not False


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def load_run(path: str | os.PathLike, now: float | None = None) -> RunView:
    """Read a run directory (or its metrics file directly)."""
    p = Path(path)
    if p.is_file():
        run_dir, mf = p.parent, p
    else:
        run_dir, mf = p, p / METRICS_FILE
    if not run_dir.exists():
        raise MonitorError(f"run directory {str(run_dir)!r} does not exist; pass a run directory such as runs/<name>")
    merged: dict[int, dict[str, Any]] = {}
    mtime = None
    if mf.exists():
        mtime = mf.stat().st_mtime
        with open(mf) as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line being written right now
                if isinstance(rec, dict) and isinstance(rec.get("step"), int):
                    merged.setdefault(rec["step"], {"step": rec["step"]}).update(rec)
    elif not (run_dir / ".lock").exists():
        raise MonitorError(f"{str(run_dir)!r} has no {METRICS_FILE} and no trainer holds it: not a run directory "
                           "(pass runs/<name>), or the run has not started")
    lock, alive = None, None
    lf = run_dir / ".lock"
    if lf.exists():
        try:
            lock = json.loads(lf.read_text() or "null")
        except (OSError, json.JSONDecodeError):
            lock = None
        if isinstance(lock, dict) and "pid" in lock:
            alive = _pid_alive(int(lock["pid"])) if lock.get("host") in (None, socket.gethostname()) else None
        else:
            lock = None
    cks, seen = [], set()
    sub = run_dir / "checkpoints"
    for d in [*run_dir.iterdir(), *(sub.iterdir() if sub.is_dir() else [])]:
        real = d.resolve()
        if real not in seen and d.is_dir() and (d / "model.safetensors").exists():
            seen.add(real)
            cks.append(((d / "model.safetensors").stat().st_mtime, real))
    return RunView(run_dir, [merged[s] for s in sorted(merged)], mtime, lock, alive, sorted(cks),
                   time.time() if now is None else now)


def _latest(series: list[tuple[int, float]]) -> tuple[int, float] | None:
    return series[-1] if series else None


def _best(series: list[tuple[int, float]]) -> tuple[int, float] | None:
    finite = [sv for sv in series if math.isfinite(sv[1])]
    return min(finite, key=lambda sv: sv[1]) if finite else None


def alerts(view: RunView, cfg: MonitorConfig) -> list[Alert]:
    out: list[Alert] = []
    loss = view.series(cfg.loss_key)
    if loss:
        recent = [v for _, v in loss[-5:]]
        best = _best(loss)
        if not all(math.isfinite(v) for v in recent):
            out.append(Alert("divergence", f"training loss is {recent[-1]} at step {loss[-1][0]}: the run diverged; "
                                           "resume from the last checkpoint with a lower train.lr or grad_clip"))
        elif best is not None and sum(recent) / len(recent) > best[1] * (1 + cfg.divergence_ratio):
            out.append(Alert("divergence", f"training loss {sum(recent) / len(recent):.4g} (last {len(recent)} logs) "
                                           f"is more than {cfg.divergence_ratio:.0%} above its best {best[1]:.4g} "
                                           f"(step {best[0]}): diverging; lower train.lr"))
    val = view.series(cfg.val_key)
    if len(val) >= 2:
        best, last = _best(val), val[-1]
        if best is not None and (not math.isfinite(last[1]) or math.exp(last[1] - best[1]) - 1 >= cfg.val_degradation):
            rise = math.exp(last[1] - best[1]) - 1 if math.isfinite(last[1]) else math.inf
            out.append(Alert("val-degradation", f"validation perplexity at step {last[0]} is {rise:+.0%} against its "
                                                f"best (loss {best[1]:.4g} at step {best[0]}, now {last[1]:.4g}): "
                                                "overfitting or instability; the best/ checkpoint keeps the best"))
    for w in cfg.watches:
        name = w.label or w.key
        if w.pinned_key:
            pin = _latest(view.series(w.pinned_key))
            if pin is not None and pin[1] >= cfg.pin_fraction:
                out.append(Alert("pinned", f"{name}: {pin[1]:.0%} of positions at a clamp (step {pin[0]}): pinned; "
                                           "the component is effectively switched off there"))
        if w.null_key:
            v, n = _latest(view.series(w.key)), _latest(view.series(w.null_key))
            if v is not None and n is not None and v[1] <= n[1] * (1 + cfg.null_margin):
                out.append(Alert("at-null", f"{name} = {v[1]:.4g} at step {v[0]} is at its null level {n[1]:.4g} "
                                            f"(within {cfg.null_margin:.0%}): no more structure than chance"))
    if view.mtime is not None and (view.running or (view.lock is not None and view.lock_alive is False)):
        age = view.now - view.mtime
        if view.lock_alive is False:
            out.append(Alert("stale", f"the lock names PID {view.lock['pid']}, which is not running: the trainer died "
                                      f"{age:.0f}s after its last metrics; continue with `statelab train SPEC --resume`"))
        elif age > cfg.stale_after_s:
            out.append(Alert("stale", f"no metrics for {age:.0f}s while the run holds its lock (PID "
                                      f"{view.lock['pid']}): hung or stopped; check the process"))
    return out


def sparkline(values: Sequence[float], width: int = 40) -> str:
    """The whole series in ``width`` characters (means of equal buckets: the trend, not the noise)."""
    finite = [v for v in values if math.isfinite(v)]
    n = len(finite)
    vals = finite if n <= width else [sum(b) / len(b) for b in (finite[i * n // width:(i + 1) * n // width]
                                                                for i in range(width))]
    if not vals:
        return ""
    lo, hi = min(vals), max(vals)
    if hi - lo < 1e-12:
        return SPARK[0] * len(vals)
    return "".join(SPARK[min(len(SPARK) - 1, int((v - lo) / (hi - lo) * len(SPARK)))] for v in vals)


def _ago(seconds: float) -> str:
    s = int(max(0, seconds))
    return f"{s}s" if s < 120 else f"{s // 60}m" if s < 7200 else f"{s // 3600}h{s % 3600 // 60:02d}m"


def render(view: RunView, cfg: MonitorConfig, found: list[Alert] | None = None) -> str:
    """The terminal view, plain text (one screen)."""
    found = alerts(view, cfg) if found is None else found
    lines = [f"statelab monitor: {view.run_dir}"]
    if view.lock is not None:
        state = {True: "running", False: "DEAD (lock left by a crashed trainer)", None: "running on another host"}
        lines.append(f"  status: {state[view.lock_alive]}; lock holder PID {view.lock.get('pid')} on "
                     f"{view.lock.get('host', '?')}, started {_ago(view.now - float(view.lock.get('started', view.now)))} ago")
    else:
        lines.append("  status: not running (no lock holder)")
    if view.mtime is not None:
        lines.append(f"  metrics: {len(view.rows)} steps logged, last write {_ago(view.now - view.mtime)} ago")
    if view.checkpoints:
        t, d = view.checkpoints[-1]
        root = view.run_dir.resolve()
        name = d.relative_to(root) if d.is_relative_to(root) else d
        lines.append(f"  last checkpoint: {name}/ ({_ago(view.now - t)} ago)")
    loss = view.series(cfg.loss_key)
    if loss:
        b = _best(loss)
        lines.append(f"  step {loss[-1][0]}: train loss {loss[-1][1]:.4f}"
                     + (f" (best {b[1]:.4f} at {b[0]})" if b else "") + f"  {sparkline([v for _, v in loss])}")
    val = view.series(cfg.val_key)
    if val:
        b = _best(val)
        lines.append(f"  val loss {val[-1][1]:.4f} at {val[-1][0]}" + (f" (best {b[1]:.4f} at {b[0]})" if b else "")
                     + f"  {sparkline([v for _, v in val])}")
    extras = []
    for key, label, fmt in ((cfg.grad_key, "grad norm", "{:.3g}"), (cfg.tok_key, "tok/s", "{:,.0f}")):
        s = _latest(view.series(key))
        if s is not None:
            extras.append(f"{label} {fmt.format(s[1])}")
    if extras:
        lines.append("  " + "   ".join(extras))
    for w in cfg.watches:
        s = view.series(w.key)
        if not s:
            continue
        text = f"  {w.label or w.key}: {s[-1][1]:.4g}"
        if w.pinned_key and (p := _latest(view.series(w.pinned_key))):
            text += f" ({p[1]:.0%} at a clamp)"
        if w.null_key and (n := _latest(view.series(w.null_key))):
            text += f" vs null {n[1]:.4g} ({s[-1][1] / n[1]:.2f}x)" if n[1] else f" vs null {n[1]:.4g}"
        lines.append(text + f"  {sparkline([v for _, v in s])}")
    lines.append("  alerts: " + ("none" if not found else ""))
    lines += [f"  ! {a.kind}: {a.message}" for a in found]
    return "\n".join(lines)


class MetricsFile(Callback):
    """Appends what the trainer logs to ``metrics.jsonl`` (rank 0): every logged metric whose
    value changed since the last line, after each optimizer step and evaluation, and a
    ``checkpoint`` entry for each checkpoint written. Same format as the trainer's lines."""

    name, order = "metrics-file", 95

    def __init__(self) -> None:
        self._last: dict[str, float] = {}

    def _write(self, trainer: Any, rec: Mapping[str, Any]) -> None:
        if not trainer.is_main or not rec:
            return
        with open(Path(trainer.run_dir) / METRICS_FILE, "a") as f:
            f.write(json.dumps({"step": int(trainer.step), "time": time.time(), **rec}) + "\n")

    def _changed(self, metrics: Mapping[str, Any]) -> dict[str, float]:
        out = {}
        for k, v in metrics.items():
            try:
                v = float(v)
            except (TypeError, ValueError):
                continue
            if k != "train/loss" and self._last.get(k) != v:
                out[k] = self._last[k] = v
        return out

    def on_optimizer_step(self, trainer: Any, step: int) -> None:
        self._write(trainer, self._changed(trainer.metrics))

    def on_evaluate(self, trainer: Any, step: int, metrics: Mapping[str, float]) -> None:
        self._write(trainer, self._changed({**trainer.metrics, **metrics}))

    def on_checkpoint_save(self, trainer: Any, path: Any) -> None:
        self._write(trainer, {"checkpoint": str(path)})
