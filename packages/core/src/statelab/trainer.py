"""The trainer: one optimisation loop; everything around it is a callback.

    setup      data, model (resume or init_from weights), optimizer, AMP, DDP, callbacks
    on_run_start; on --resume the callbacks' saved state, then on_checkpoint_load
    while step < train.steps and no stop:
        for each of grad_accum micro-batches:      on_micro_batch_start / forward, loss,
                                                   regularizers, backward / on_micro_batch_end
        clip, optimizer step, step += 1;           on_optimizer_step(step)   (gradients still set)
        every log_interval steps: host sync, loss and throughput logged, stop agreed across ranks
    on_train_end    final evaluation, final checkpoint, summary, planner fit, probes
    on_run_end      artifacts, mlflow status

The callbacks (:mod:`statelab.run_callbacks`, :mod:`statelab.post_training`, the model's
components, the spec's ``train.callbacks``) do the evaluation, checkpoints, tracking,
sampling and post-training work; the trainer gives them :meth:`Trainer.evaluate`,
:meth:`Trainer.save_checkpoint`, :meth:`Trainer.save_best`, :meth:`Trainer.log_metrics`,
:meth:`Trainer.stop_reason` and :meth:`Trainer.run_phase`.

Stops: SIGINT/SIGTERM and ``train.time_budget_s`` (counted from process start) end the loop
at the next step (under DDP: the next log step, agreed by all ranks) with a checkpoint; in
a post-training phase they interrupt the phase itself (the signal handler and a timer raise
:class:`StopRequested` there, since a plugin's ``fit`` or a probe's ``run`` polls nothing).
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import Tensor

from statelab import checkpoint as ckpt
from statelab import train as api
from statelab.callbacks import Callback, CallbackList, MicroBatch, component_callbacks
from statelab.optim import lr_at, make_optimizer, set_lr
from statelab.progress import Progress
from statelab.spec import SpecError, SpecIssue, dump_spec
from statelab.train_state import (
    load_optimizer_state, optimizer_state, prefixed, rng_json, set_rng_json, spec_diff,
)


class StopRequested(Exception):
    """Raised inside a post-training phase by a signal or the end of the time budget."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Signals:
    """SIGINT/SIGTERM set a flag the loop polls; while ``raising`` (a post-training phase)
    the handler raises :class:`StopRequested` instead. A second SIGINT aborts at once."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.raising = False
        self._prev: dict[int, Any] = {}

    def install(self) -> "Signals":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._prev[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum
        if self.raising:
            self.raising = False
            raise StopRequested("interrupted")

    def restore(self) -> None:
        for sig, prev in self._prev.items():
            signal.signal(sig, prev)
        self._prev.clear()

    def name(self) -> str:
        return {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}.get(self.received, "a stop request")


class Trainer:
    """One training run of a validated spec on one rank; see the module docstring.

    What callbacks read: ``spec``, ``cfg`` (= ``spec.train``), ``resolved``, ``model``
    (unwrapped), ``data``, ``device``, ``is_main``, ``world_size``, ``rank``, ``run_dir``,
    ``step``, ``start_step``, ``status`` (``running``, then ``finished``, ``interrupted``,
    ``time_budget`` or ``failed``), ``stopped_in`` (the phase a stop interrupted),
    ``metrics``, ``history``, ``best_val``, ``best_step``, ``tracker``, ``progress``,
    ``optimizer``, ``tokens_per_s`` (after the loop).
    """

    def __init__(self, resolved: Any, info: Any, run_dir: Path, *, registry: Any = None, resume: bool = False,
                 progress: bool | None = None, stop_after: int | None = None, start_wall: float | None = None,
                 signals: Signals | None = None, callbacks: tuple[Callback, ...] = ()) -> None:
        from statelab.tracking import NullTracker

        self.resolved, self.spec, self.cfg = resolved, resolved.spec, resolved.spec.train
        self.info, self.device, self.is_main = info, info.device, info.is_main
        self.world_size, self.rank = info.world_size, info.rank
        self.run_dir, self.registry, self.resume, self.stop_after = Path(run_dir), registry, resume, stop_after
        self.start_wall = start_wall if start_wall is not None else time.time()
        self.signals = signals or Signals()
        self.extra_callbacks = list(callbacks)
        self.step = self.start_step = 0
        self.status, self.stopped_in = "running", None
        self.metrics: dict[str, float] = {}
        self.history: dict[str, list[dict[str, float]]] = {"train": [], "val": []}
        self.best_val: float | None = None
        self.best_step: int | None = None
        self.run_id: str | None = None
        self.tracker: Any = NullTracker()
        self.checkpoint_meta: dict[str, str] = {}
        self.last_checkpoint: Path | None = None
        self.saved_at: int | None = None
        self.evaluated_at: int | None = None
        self.elapsed_before, self.tokens_before, self.seconds_before = 0.0, 0, 0.0
        self.tokens_per_s = float("nan")
        self.on_best_weights = False  # set once post-training phases loaded best/
        self.progress = Progress(info.is_main if progress is None else bool(progress and info.is_main), self.cfg.steps)
        self.callbacks = CallbackList({})
        self._pending: list[tuple[int, Tensor]] = []
        self._windows: list[tuple[int, float]] = []
        self._side_time = 0.0
        self._grad_norm: Tensor | None = None
        self._reg_metrics: dict[str, Any] = {}
        self.carried: dict[str, Tensor] | None = None
        self._saved: tuple[dict[str, Any], dict[str, Tensor]] | None = None

    # -- set-up ---------------------------------------------------------------------------
    def setup(self) -> None:
        from statelab.build import build
        from statelab.data import make_data

        cfg = self.cfg
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        self._check_layout()
        seed = self.spec.seed + self.rank
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        self.data = make_data(self.spec)
        self.model = build(self.resolved, vocab_size=self.data.vocab_size, registry=self.registry)
        self.model.tokenizer = self.data.tokenizer
        self.spec_doc = dump_spec(self.spec)
        if self.resume:
            self._saved = self._read_resume()
        elif cfg.init_from:
            init_from(self.model, cfg.init_from)
        self.model.to(self.device)
        if self.device.type == "cuda":
            torch.set_float32_matmul_precision("high")  # TF32 for fp32 matmuls, as in nanoGPT
        self.optimizer = make_optimizer(self.model, cfg, self.device)
        self.precision = _precision(cfg, self.device)
        self._amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None
        self.stream = cfg.batching == "stream"
        self.rows_per_rank = cfg.batch_size // self.world_size
        if self._saved is not None:
            self._restore_training_state(*self._saved)
        self.fwd = self._wrap(self.model)
        self._clip_params = [p for p in self.model.parameters() if p.requires_grad]  # walked once, not every step
        self.callbacks = CallbackList(self._collect_callbacks())
        self._micro_hooks = self.callbacks.has("on_micro_batch_start") or self.callbacks.has("on_micro_batch_end")

    def _check_layout(self) -> None:
        cfg, W = self.cfg, self.world_size
        per_rank, rem = divmod(cfg.batch_size, W * cfg.grad_accum)
        if rem or per_rank == 0:
            raise SpecError([SpecIssue("train.batch_size", f"{cfg.batch_size} is not divisible by world_size x "
                                       f"grad_accum = {W} x {cfg.grad_accum}; pick a multiple of {W * cfg.grad_accum}")])
        last, ck_dir = self.run_dir / "last", self.run_dir / "checkpoints"
        if self.resume and not (last / ckpt.MODEL_FILE).exists():
            raise api.ResumeError(f"nothing to resume in {str(self.run_dir)!r} (no checkpoint at {str(last)!r}); "
                                  "start the run without --resume")
        if not self.resume and ck_dir.exists() and any(ck_dir.glob("step-*")):
            raise api.ResumeError(f"{str(self.run_dir)!r} already holds checkpoints of an earlier run; pass --resume "
                                  "to continue it, or train under another name or --out (or delete the directory)")

    def _read_resume(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        ck, state, tensors = ckpt.load_training_state(self.run_dir / "last", tokenizer=self.data.tokenizer)
        diff = spec_diff(state.get("spec", {}), self.spec_doc, ("model", "tokenizer"))
        if ck.vocab_size != self.model.vocab_size:
            diff.append(f"  vocab_size: {ck.vocab_size} -> {self.model.vocab_size}")
        if diff:
            raise api.ResumeError(
                "the spec changed in ways that alter the model, so --resume cannot continue this run:\n"
                + "\n".join(diff)
                + "\nrevert these changes, or start a new run (another name or --out); changes to train and tracking "
                "(e.g. train.steps) are allowed")
        self.model.load_state_dict(ck.state_dict())
        ckpt.load_component_state(self.model, ck)
        self.step = self.start_step = int(state["step"])
        self.best_val, self.best_step = state.get("best_val_loss"), state.get("best_step")
        self.run_id = state.get("mlflow_run_id")
        self.history = state.get("history", self.history)
        self.elapsed_before = float(state.get("elapsed_s", 0.0))
        done = state.get("throughput", {})
        self.tokens_before, self.seconds_before = int(done.get("tokens", 0)), float(done.get("seconds", 0.0))
        self.last_checkpoint = (self.run_dir / "last").resolve()
        return state, tensors

    def _restore_training_state(self, state: dict[str, Any], tensors: dict[str, Tensor]) -> None:
        load_optimizer_state(self.optimizer, state["optimizer"], tensors)
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        set_rng_json(state["rng"])
        if f"rng.torch.{self.rank}" in tensors:
            torch.set_rng_state(tensors[f"rng.torch.{self.rank}"])
        if self.device.type == "cuda" and f"rng.cuda.{self.rank}" in tensors:
            torch.cuda.set_rng_state(tensors[f"rng.cuda.{self.rank}"], self.device)
        saved = prefixed(tensors, "stream.")
        if self.stream and saved:
            lo, hi = self.rank * self.rows_per_rank, (self.rank + 1) * self.rows_per_rank
            self.carried = {k: v[lo:hi].to(self.device) for k, v in saved.items()}

    def _wrap(self, model: torch.nn.Module) -> Any:
        fwd = torch.compile(model) if self.cfg.compile else model
        if self.info.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            planner = getattr(model, "planner", None)
            unused = planner is not None and any(p.requires_grad for p in planner.parameters())
            fwd = DDP(fwd, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                      find_unused_parameters=unused)
        return fwd

    def _collect_callbacks(self) -> dict[str, Callback]:
        from statelab.plugins import get_registry
        from statelab.run_callbacks import default_callbacks

        named = {cb.name: cb for cb in default_callbacks()}
        components = component_callbacks(self.model)
        self.component_names = set(components)
        named.update(components)
        if self.cfg.callbacks:
            registered = (self.registry or get_registry()).callbacks
            for name in self.cfg.callbacks:
                if name not in registered:
                    known = ", ".join(sorted(registered)) or "(none)"
                    raise SpecError([SpecIssue("train.callbacks", f"unknown callback {name!r}; installed: {known}")])
                named[name] = registered[name].build(self.spec)
        for cb in self.extra_callbacks:
            named[cb.name or type(cb).__name__] = cb
        return named

    def _restore_callbacks(self) -> None:
        state, tensors = self._saved
        self.callbacks.load_state(state.get("callbacks", {}), prefixed(tensors, "callbacks."))
        self.callbacks.call("on_checkpoint_load", self, self.last_checkpoint)

    # -- the run --------------------------------------------------------------------------
    def run(self) -> "api.TrainResult":
        try:
            self.setup()
            self.callbacks.call("on_run_start", self)
            if self._saved is not None:
                self._restore_callbacks()
            self.fit()
            self.progress.close()
            self.drain()
            self.tokens_per_s = self._mean_throughput()
            self.callbacks.call("on_train_end", self)
            self.callbacks.call("on_run_end", self)
        except BaseException as exc:
            self.progress.close()
            self.status, self.error = "failed", exc
            self._run_end_after_error()
            raise
        return self.result()

    def _run_end_after_error(self) -> None:
        for name, cb in self.callbacks.named.items():
            if type(cb).on_run_end is Callback.on_run_end:
                continue
            try:
                cb.on_run_end(self)
            except Exception as exc:  # noqa: BLE001 - the first error is the one raised
                print(f"statelab: callback {name!r} failed while ending a failed run: {exc}", file=sys.stderr)

    def result(self) -> "api.TrainResult":
        final = self.last_checkpoint if self.saved_at == self.step else None
        return api.TrainResult(self.run_dir, self.step, self.status, self.best_val, self.metrics,
                               self.run_id if self.is_main else None, self.tokens_per_s, final, self.history,
                               self.model, self.stopped_in)

    def fit(self) -> None:
        """The optimisation loop, until ``train.steps`` or a stop."""
        cfg = self.cfg
        self.model.train()
        self._t_last, self._last_log_step = time.perf_counter(), self.step
        while self.step < cfg.steps:
            if not self.info.enabled and (reason := self.loop_stop_reason()) is not None:
                self.status = reason
                break
            self._train_step()
            if self.step % cfg.log_interval == 0 or self.step == cfg.steps:
                reason = self._log_step()
                if reason is not None:
                    self.status = reason
                    break
        if self.status == "running":
            self.status = "finished"

    def _train_step(self) -> None:
        cfg = self.cfg
        self.lr = lr_at(self.step, cfg)
        set_lr(self.optimizer, self.lr)
        batch = self.data.train_batch(self.step, cfg.batch_size, cfg.seq_len, mode=cfg.batching, rank=self.rank,
                                      world_size=self.world_size)
        batch = api._to_device(batch, self.device)
        state_in = None
        if self.stream:
            init = self.model.init_state(self.rows_per_rank, self.device)
            self.carried = api._reset_rows(self.carried, batch.reset, init) if self.carried is not None else init
            state_in = self.carried
        step_loss: Tensor | None = None
        new_states: list[dict[str, Tensor]] = []
        for i in range(cfg.grad_accum):
            loss, new_state = self._micro_batch(i, batch, state_in)
            step_loss = loss if step_loss is None else step_loss + loss
            if self.stream:
                new_states.append(new_state)
        if self.stream:
            self.carried = {k: torch.cat([s[k] for s in new_states], 0) for k in new_states[0]}
        self._apply_gradients()
        self.step += 1
        self._pending.append((self.step, step_loss))
        self.callbacks.call("on_optimizer_step", self, self.step)
        self.optimizer.zero_grad(set_to_none=True)

    def _micro_batch(self, i: int, batch: Any, state_in: dict[str, Tensor] | None) -> tuple[Tensor, Any]:
        ga = self.cfg.grad_accum
        n = self.rows_per_rank // ga
        rows = slice(i * n, (i + 1) * n)
        x, y = batch.x[rows], batch.y[rows]
        mask = batch.mask[rows] if batch.mask is not None else None
        st = {k: v[rows] for k, v in state_in.items()} if state_in is not None else None
        mb = MicroBatch(i, x, y, mask) if self._micro_hooks else None
        if mb is not None:
            self.callbacks.call("on_micro_batch_start", self, mb)
        sync = self.fwd.no_sync() if (self.info.enabled and i < ga - 1) else nullcontext()
        with sync:
            with self.autocast():
                logits, new_state, aux = self.fwd(x, st)  # (b, T, V)
                loss = api.token_loss(logits, y, mask)
                reg, self._reg_metrics = self.model.regularization(aux)
                total = loss + reg if reg is not None else loss
            scaled = total / ga if ga > 1 else total  # no extra kernel when 1
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        if mb is not None:
            mb.loss, mb.aux = total.detach(), aux
            self.callbacks.call("on_micro_batch_end", self, mb)
        return scaled.detach(), ({k: v.detach() for k, v in new_state.items()} if self.stream else None)

    def _apply_gradients(self) -> None:
        if self.cfg.grad_clip > 0:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            self._grad_norm = torch.nn.utils.clip_grad_norm_(self._clip_params, self.cfg.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()

    def autocast(self) -> Any:
        if self._amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self._amp_dtype)

    # -- logging --------------------------------------------------------------------------
    def _log_step(self) -> str | None:
        """A log step: the one host sync of the loop; returns a stop reason agreed by every rank."""
        reason = self._agree(self.loop_stop_reason()) if self.info.enabled else None
        out = self.drain()
        now = time.perf_counter()
        window = now - self._t_last - self._side_time
        n_steps = self.step - self._last_log_step
        tok_s = n_steps * self.cfg.batch_size * self.cfg.seq_len / window if window > 0 else float("nan")
        self._windows.append((n_steps, window))
        self._t_last, self._side_time, self._last_log_step = now, 0.0, self.step
        mean_loss = sum(v for _, v in out) / max(1, len(out))
        m = {"train/loss": mean_loss, "train/lr": self.lr, "train/tok_per_s": tok_s, "train/elapsed_s": self.elapsed()}
        if self._grad_norm is not None:
            m["train/grad_norm"] = float(self._grad_norm)
        m.update({k: float(v) for k, v in self._reg_metrics.items()})
        self.history["train"].append({"step": self.step, "train/loss": mean_loss, "train/tok_per_s": tok_s})
        self.log_metrics(m)
        self.progress.train(self.step, mean_loss, self.lr, tok_s, self.elapsed())
        return reason

    def _agree(self, reason: str | None) -> str | None:
        """All ranks stop together; a non-finite loss on any rank stops every rank."""
        bad_local = not bool(torch.isfinite(torch.stack([v for _, v in self._pending])).all())
        flags = torch.tensor([float(reason is not None), float(bad_local)], device=self.device)
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        if flags[1].item() > 0 and not bad_local:
            raise api.TrainingDiverged(f"training diverged on another rank at or before step {self.step}")
        if flags[0].item() == 0:
            return None
        return "time_budget" if self._over_budget() and self.signals.received is None else "interrupted"

    def drain(self) -> list[tuple[int, float]]:
        """Bring pending per-step losses to the host (``metrics.jsonl``); stop on a non-finite one."""
        if not self._pending:
            return []
        vals = torch.stack([v for _, v in self._pending]).tolist()
        out = [(s, v) for (s, _), v in zip(self._pending, vals)]
        self._pending.clear()
        if self.is_main:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.writelines(json.dumps({"step": s, "train/loss": v}) + "\n" for s, v in out)
        bad = next(((s, v) for s, v in out if not math.isfinite(v)), None)
        if bad is not None:
            where = (f"the last good checkpoint is {str(self.last_checkpoint)!r}" if self.last_checkpoint
                     else "no checkpoint was written before it")
            raise api.TrainingDiverged(
                f"training diverged: the loss is {bad[1]} at step {bad[0]}; stopped without saving. {where}. "
                "Lower train.lr, raise train.warmup_steps, or enable train.grad_clip")
        return out

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Record ``metrics`` (``trainer.metrics``) and log them to the tracker at ``step`` (default: now)."""
        self.metrics.update(metrics)
        self.tracker.log_metrics(metrics, self.step if step is None else step)

    def elapsed(self) -> float:
        """Seconds of this run, earlier segments (before ``--resume``) included."""
        return self.elapsed_before + time.time() - self.start_wall

    def _mean_throughput(self) -> float:
        tokens, seconds = self._throughput_sums()
        return tokens / seconds if seconds > 0 else float("nan")

    def _throughput_sums(self) -> tuple[int, float]:
        """Tokens and seconds of the log windows, earlier segments included; a segment's first
        window (warm-up, compilation) is left out when it has others."""
        counted = self._windows[1:] if len(self._windows) > 1 else self._windows
        tokens = sum(n for n, _ in counted) * self.cfg.batch_size * self.cfg.seq_len
        return self.tokens_before + tokens, self.seconds_before + sum(w for _, w in counted)

    # -- evaluation and checkpoints (called by the callbacks) -----------------------------
    def evaluate(self) -> dict[str, float]:
        """Validation metrics now (rank 0), logged and recorded; a new best is noted in
        ``best_val``/``best_step``; then every callback's ``on_evaluate``."""
        t0 = time.perf_counter()
        self.drain()
        cfg = self.cfg
        m = api.evaluate(self.model, self.data, batch_size=max(1, cfg.batch_size // self.world_size),
                         seq_len=cfg.seq_len, max_batches=cfg.eval_batches, device=self.device, autocast=self.autocast)
        m["val/elapsed_s"] = self.elapsed()
        improved = self.best_val is None or m["val/loss"] < self.best_val
        if improved:
            self.best_val, self.best_step = m["val/loss"], self.step
        m["best/val_loss"] = self.best_val
        m["best/val_bpc"] = min(h["val/bpc"] for h in self.history["val"] + [m])
        self.history["val"].append({"step": self.step, **m})
        self.evaluated_at = self.step
        self.log_metrics(m)
        self.progress.note(f"eval step {self.step}: val loss {m['val/loss']:.4f} | bpc {m['val/bpc']:.4f} | "
                           f"acc {m['val/acc']:.3f} | ppl {m['val/ppl']:.2f}{' (best)' if improved else ''}")
        self.callbacks.call("on_evaluate", self, self.step, m)
        self._side_time += time.perf_counter() - t0
        return m

    def save_best(self) -> Path:
        """Write the current weights (and component state) to ``<run_dir>/best`` (rank 0)."""
        return ckpt.save(self.run_dir / "best", self.model, tokenizer=self.data.tokenizer,
                         extra_meta=self.checkpoint_meta)

    def save_checkpoint(self) -> Path | None:
        """A full training checkpoint at this step (collective: every rank calls it; rank 0 writes)."""
        t0 = time.perf_counter()
        self.drain()
        tensors = self._gathered_tensors()
        path = self.run_dir / "checkpoints" / f"step-{self.step:07d}"
        self.saved_at = self.step  # on every rank: the ranks agree on whether the end still needs a save
        if not self.is_main:
            return None
        from statelab.callbacks import split_state

        opt_js, opt_t = optimizer_state(self.optimizer)
        tensors.update(opt_t)
        states = {n: cb.state_dict() for n, cb in self.callbacks.named.items() if n not in self.component_names}
        cb_js, cb_t = split_state(states)
        tensors.update({f"callbacks.{k}": v for k, v in cb_t.items()})
        tokens, seconds = self._throughput_sums()
        state = {"step": self.step, "spec": self.spec_doc, "best_val_loss": self.best_val, "best_step": self.best_step,
                 "mlflow_run_id": self.run_id, "world_size": self.world_size, "optimizer": opt_js,
                 "scaler": self.scaler.state_dict() if self.scaler is not None else None, "rng": rng_json(),
                 "history": self.history, "elapsed_s": self.elapsed(),
                 "throughput": {"tokens": tokens, "seconds": seconds}, "callbacks": cb_js}
        ckpt.save(path, self.model, tokenizer=self.data.tokenizer, trainer_state=state, trainer_tensors=tensors,
                  extra_meta=self.checkpoint_meta)
        self._point_last_at(path)
        self.last_checkpoint = path
        self.callbacks.call("on_checkpoint_save", self, path)
        self._side_time += time.perf_counter() - t0
        return path

    def _gathered_tensors(self) -> dict[str, Tensor]:
        """Per-rank RNG states and carried stream state, gathered on every rank (collectives)."""
        from statelab import distributed as distr

        info, W, dev = self.info, self.world_size, self.device
        tensors: dict[str, Tensor] = {}
        rng = torch.get_rng_state()
        rngs = distr.all_gather_rows(info, rng.to(dev) if dev.type == "cuda" else rng).cpu().view(W, -1)
        tensors.update({f"rng.torch.{r}": rngs[r].clone() for r in range(W)})
        if dev.type == "cuda":
            crngs = distr.all_gather_rows(info, torch.cuda.get_rng_state(dev).to(dev)).cpu().view(W, -1)
            tensors.update({f"rng.cuda.{r}": crngs[r].clone() for r in range(W)})
        if self.stream and self.carried is not None:
            for k, v in self.carried.items():
                tensors[f"stream.{k}"] = distr.all_gather_rows(info, v.detach()).cpu()
        return tensors

    def _point_last_at(self, path: Path) -> None:
        """``last`` -> ``path`` (an atomic symlink swap), then keep the newest ``keep_last``."""
        import shutil

        tmp_link = self.run_dir / f".last.{os.getpid()}"
        tmp_link.unlink(missing_ok=True)
        os.symlink(os.path.relpath(path, self.run_dir), tmp_link)
        os.replace(tmp_link, self.run_dir / "last")
        for old in sorted((self.run_dir / "checkpoints").glob("step-*"))[: -self.cfg.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    # -- stops ----------------------------------------------------------------------------
    def _over_budget(self) -> bool:
        budget = self.cfg.time_budget_s
        return budget is not None and time.time() - self.start_wall > budget

    def stop_reason(self, *, budget: bool = True) -> str | None:
        """``"interrupted"`` after SIGINT/SIGTERM, ``"time_budget"`` past ``train.time_budget_s``, else ``None``."""
        if self.signals.received is not None:
            return "interrupted"
        if budget and self._over_budget():
            return "time_budget"
        return None

    def loop_stop_reason(self) -> str | None:
        reason = self.stop_reason()
        if reason is None and self.stop_after is not None and self.step >= self.stop_after:
            return "interrupted"
        return reason

    def run_phase(self, name: str, work: Callable[[Any], None], *, budget: bool = True) -> bool:
        """Run ``work(phase)`` as an interruptible post-training phase with a progress display
        (``phase.detail(text)``). A signal, or the time budget running out (unless
        ``budget=False``), stops it at once: the run's status becomes ``interrupted`` or
        ``time_budget`` and later phases do not start. Returns whether it completed."""
        reason = self.stop_reason(budget=budget)
        if reason is None:
            try:
                with self.progress.phase(name) as phase, self._interruptible(budget):
                    work(phase)
                return True
            except StopRequested as stop:
                reason = stop.reason
        self.stopped(reason, name)
        return False

    def stopped(self, reason: str, where: str) -> None:
        """Record that ``where`` was stopped (``reason``: interrupted or time_budget)."""
        if self.status in ("running", "finished"):
            self.status, self.stopped_in = reason, where
        what = f"{self.signals.name()}" if reason == "interrupted" else "the time budget"
        self.progress.note(f"statelab: {where} stopped by {what}")

    @contextmanager
    def _interruptible(self, budget: bool) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        sig = self.signals
        left = self.cfg.time_budget_s - (time.time() - self.start_wall) if budget and self.cfg.time_budget_s else None
        prev = None
        sig.raising = True  # before the timer, so an early alarm cannot be missed
        if left is not None:
            def alarm(signum, frame) -> None:
                if sig.raising:
                    sig.raising = False
                    raise StopRequested("time_budget")

            prev = signal.signal(signal.SIGALRM, alarm)
            signal.setitimer(signal.ITIMER_REAL, max(left, 1e-3))
        try:
            yield
        finally:
            sig.raising = False
            if prev is not None:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, prev)


def init_from(model: torch.nn.Module, path: str) -> None:
    """Load ``train.init_from``'s weights into the freshly built ``model``, or say why they do not fit."""
    ck = ckpt.read_checkpoint(path)
    if ck.vocab_size != model.vocab_size:
        raise ckpt.IncompatibleCheckpointError(
            f"train.init_from {path!r}: the checkpoint's vocabulary has {ck.vocab_size} tokens and this spec's has "
            f"{model.vocab_size}; use the tokenizer and data the checkpoint was trained with")
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
        raise ckpt.IncompatibleCheckpointError(
            f"train.init_from {path!r}: the checkpoint does not fit the model this spec builds ("
            + "; ".join(parts) + "); make the spec's model section match the checkpoint's")
    model.load_state_dict(theirs)
    ckpt.load_component_state(model, ck)


def _precision(cfg: Any, device: torch.device) -> str:
    prec = cfg.precision
    if prec == "auto":
        prec = "bf16" if device.type == "cuda" else "fp32"
    if prec == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        prec = "fp16"
    return prec
