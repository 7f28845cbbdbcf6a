"""Asynchronous planning during generation: a background worker and the generation hook.

Timeline of one plan (``statelab.generate`` calls the hook after every step)::

    step t      hook: snapshot (clone) of the injectable state + logits -> request queue
    ...         generation continues; the worker thread searches on the snapshot
    step t+lag  hook: the result is taken from the result queue and applied with
                a = alpha * lag_decay**lag, or dropped if lag > max_lag; the target is
                first capped at the norm of the state it replaces (``target_norm``)

Guarantees, each tested:

* **Generation never waits.** Requests go in with ``put_nowait`` (a full queue skips the
  request and counts it), results come out with ``get_nowait``. The worker runs at one
  intra-op thread (``torch.set_num_threads`` is per thread) and, on CUDA, on its own
  stream, synchronised with events rather than with the host.
* **Nothing crosses generations.** Every request and result carries its
  ``generation_id``; the hook drops any result whose id is not the current generation's
  (a late result of generation A arriving during B), and on ``finished`` it discards the
  results still pending. The worker skips queued requests of generations already finished.
* **Stale results are dropped** past ``max_lag`` steps.

The worker is shared by all generations of one planner (``MCTSPlanner.worker()``);
a failure in it is re-raised in the generating thread at its next hook call.

``PlanningHook(..., inline=True)`` (or ``asynchronous: false`` in the params) plans in
the calling thread and applies each result exactly ``sync_lag`` steps later: the same
protocol, deterministic, for probes and tests.
"""

from __future__ import annotations

import queue
import threading
import time
import traceback
from typing import Any, Callable

import torch
from torch import Tensor

from statelab.interfaces import PlanRequest, PlanResult, State, StepContext, prefix_state, unprefix_state
from statelab.internals import publish

from crsm_planner.planner import cap_target_norm

PlanFn = Callable[[Any, PlanRequest], PlanResult]


class PlanWorker:
    """One background thread that turns :class:`PlanRequest` into :class:`PlanResult`."""

    def __init__(self, planner, queue_size: int = 1, duty: float = 1.0) -> None:
        self.planner = planner
        self.duty = duty
        self.request_queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self.results: queue.Queue = queue.Queue()
        self.finished_generations: set[int] = set()
        self.error: BaseException | None = None
        self.error_trace = ""
        self.busy = threading.Event()
        self._streams: dict[Any, Any] = {}
        self.thread = threading.Thread(target=self._loop, name="crsm-planner-worker", daemon=True)
        self.thread.start()

    @property
    def alive(self) -> bool:
        return self.thread.is_alive()

    def submit(self, model, request: PlanRequest, plan_fn: PlanFn, event: Any = None) -> bool:
        """Queue a request without waiting; False when the queue is full."""
        try:
            self.request_queue.put_nowait((model, request, plan_fn, event))
            return True
        except queue.Full:
            return False

    def stop(self, timeout: float = 5.0) -> None:
        try:
            self.request_queue.put(None, timeout=timeout)
        except queue.Full:
            pass
        self.thread.join(timeout)

    def _stream(self, device: torch.device):
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device=device)
        return self._streams[device]

    def _loop(self) -> None:
        torch.set_num_threads(1)  # per-thread: generation keeps its own intra-op threads
        while True:
            item = self.request_queue.get()
            if item is None:
                return
            model, request, plan_fn, event = item
            if request.generation_id in self.finished_generations:
                continue  # its generation ended while it waited
            self.busy.set()
            t0 = time.perf_counter()
            try:
                with torch.no_grad():
                    dev = request.logits.device
                    if dev.type == "cuda":
                        stream = self._stream(dev)
                        with torch.cuda.device(dev), torch.cuda.stream(stream):
                            if event is not None:
                                stream.wait_event(event)  # the snapshot's clone is done
                            for t in [*request.state.values(), request.logits]:
                                t.record_stream(stream)
                            result = plan_fn(model, request)
                            done = torch.cuda.Event()
                            done.record(stream)
                            result.info["_cuda_event"] = done
                        done.synchronize()  # wait here, not in generation: results arrive complete
                    else:
                        result = plan_fn(model, request)
                self.results.put(result)
            except BaseException as e:  # surfaced in the generating thread
                self.error, self.error_trace = e, traceback.format_exc()
                return
            finally:
                self.busy.clear()
            if self.duty < 1.0:  # rest, so that planning takes at most `duty` of the wall time
                time.sleep((time.perf_counter() - t0) * (1.0 / self.duty - 1.0))


class PlanningHook:
    """The generation hook of an :class:`~crsm_planner.planner.MCTSPlanner`.

    ``plan_fn`` replaces ``planner.plan`` (the random-injection ablation wraps it);
    ``alpha_fn`` transforms the applied gate (the stability probe forces a floor).
    Statistics of the current generation are in :attr:`stats` and are written to the
    generation's stats under ``planner.*``.
    """

    def __init__(self, planner, model, *, inline: bool | None = None, plan_fn: PlanFn | None = None,
                 alpha_fn: Callable[[Tensor], Tensor] | None = None, plan_every: int | None = None,
                 simulations: int | None = None) -> None:
        p = planner.params
        self.planner, self.model = planner, model
        self.inline = (not p.asynchronous) if inline is None else inline
        sims = self.simulations = simulations
        self.plan_fn: PlanFn = plan_fn or (lambda m, r: planner.plan(m, r, simulations=sims))
        self.alpha_fn = alpha_fn
        self.plan_every = plan_every or p.plan_every
        self.max_lag, self.lag_decay, self.sync_lag = p.max_lag, p.lag_decay, p.sync_lag
        self.worker = None if self.inline else planner.worker()
        self.generation_id: int | None = None
        self.host: torch.device | None = None
        self._pending: list[PlanResult] = []  # inline mode: results waiting for their step
        self.aux: dict[str, Tensor] = {}
        self.stats: dict[str, float] = {}
        self.lags: list[int] = []
        self.alphas: list[float] = []
        #: (generation_id, plan step, applied step) of every result applied, all generations
        self.applied_log: list[tuple[int, int, int]] = []

    # -- protocol ------------------------------------------------------------------
    def __call__(self, ctx: StepContext) -> State | None:
        if self.worker is not None and self.worker.error is not None:
            err = self.worker.error
            raise RuntimeError(f"the planner's background worker failed:\n{self.worker.error_trace}") from err
        if ctx.generation_id != self.generation_id:
            self._begin(ctx)
        new_state = None
        result = self._take(ctx)
        if result is not None:
            new_state = self._apply(ctx, result)
        if ctx.finished:
            self._end(ctx)
        elif ctx.step % self.plan_every == 0:
            self._request(ctx, new_state if new_state is not None else ctx.state)
        self._publish_stats(ctx)
        return new_state

    def _begin(self, ctx: StepContext) -> None:
        if self.generation_id is not None and self.worker is not None:
            self.worker.finished_generations.add(self.generation_id)
        self.generation_id = ctx.generation_id
        self._pending.clear()
        self.stats = {k: 0.0 for k in ("requested", "applied", "dropped_stale", "dropped_foreign",
                                       "discarded_at_end", "skipped_busy")}
        self.lags, self.alphas = [], []
        self.planner.ensure_ready(self.model, ctx.state)  # shapes the codec in this thread, not the worker's
        self.host = None  # the device plans are made on, when not the model's
        if self.planner.params.device == "cpu" and ctx.logits.device.type != "cpu":
            self.host = torch.device("cpu")
            self.planner.shadow_for(self.model, self.host).ensure_ready(self.model, ctx.state)
        elif ctx.logits.is_cuda:  # capture the search once per batch shape, here rather than in the worker
            self.planner.prepare(self.model, ctx.state, ctx.logits, self.simulations)

    def _request(self, ctx: StepContext, state: State) -> None:
        if not self.inline and self.worker.request_queue.full():  # busy: skip without paying for a snapshot
            self.stats["skipped_busy"] += 1
            return
        keys = self.planner.codec.keys
        if self.host is not None:
            snap = {k: state[k].detach().to(self.host) for k in keys}
            logits = ctx.logits.detach().to(self.host)
        else:
            snap = {k: state[k].detach().clone() for k in keys}
            logits = ctx.logits.detach().clone()
        req = PlanRequest(snap, logits, ctx.step, ctx.generation_id)
        self.stats["requested"] += 1
        if self.inline:
            self._pending.append(self.plan_fn(self.model, req))
            return
        event = None
        if req.logits.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        if not self.worker.submit(self.model, req, self.plan_fn, event):
            self.stats["requested"] -= 1
            self.stats["skipped_busy"] += 1

    def _arrived(self, ctx: StepContext) -> list[PlanResult]:
        if self.inline:
            ready = [r for r in self._pending if ctx.step - r.step >= self.sync_lag]
            self._pending = [r for r in self._pending if ctx.step - r.step < self.sync_lag]
            return ready
        out = []
        while True:
            try:
                out.append(self.worker.results.get_nowait())
            except queue.Empty:
                return out

    def _take(self, ctx: StepContext) -> PlanResult | None:
        """The newest valid result for this generation; everything else is counted and dropped."""
        best = None
        for r in self._arrived(ctx):
            if r.generation_id != ctx.generation_id:
                self.stats["dropped_foreign"] += 1
            elif ctx.finished:
                self.stats["discarded_at_end"] += 1
            elif ctx.step - r.step > self.max_lag:
                self.stats["dropped_stale"] += 1
            else:
                if best is not None:
                    self.stats["dropped_stale"] += 1  # superseded by a newer plan
                best = r if best is None or r.step >= best.step else best
        return best

    def _apply(self, ctx: StepContext, r: PlanResult) -> State | None:
        ev = r.info.pop("_cuda_event", None)
        if ev is not None:
            torch.cuda.current_stream().wait_event(ev)
            for t in [*r.target.values(), r.alpha, r.confidence]:
                t.record_stream(torch.cuda.current_stream())
        if any(ctx.state[k].shape != v.shape for k, v in r.target.items()):
            self.stats["dropped_foreign"] += 1  # a different batch: cannot belong here
            return None
        lag = ctx.step - r.step
        target = {k: v.to(ctx.state[k].device) for k, v in r.target.items()}  # from the CPU shadow, if any
        if self.planner.params.target_norm == "cap":  # never above the norm of the state it replaces
            target = cap_target_norm(target, ctx.state)
        alpha = r.alpha.to(ctx.logits.device) * (self.lag_decay**lag)
        if self.alpha_fn is not None:
            alpha = self.alpha_fn(alpha)
        alpha = publish(self.aux, "planner.alpha", alpha)
        bb = unprefix_state("backbone", ctx.state)
        new_bb = self.model.backbone.inject(bb, unprefix_state("backbone", target), alpha)
        state = dict(ctx.state)
        state.update(prefix_state("backbone", new_bb))
        self.stats["applied"] += 1
        self.applied_log.append((r.generation_id, r.step, ctx.step))
        self.lags.append(lag)
        self.alphas.append(float(alpha.float().mean()) if isinstance(alpha, Tensor) else float(alpha))
        return state

    def _end(self, ctx: StepContext) -> None:
        if self.worker is not None:
            self.worker.finished_generations.add(ctx.generation_id)
        self.stats["discarded_at_end"] += len(self._pending)
        self._pending.clear()

    def _publish_stats(self, ctx: StepContext) -> None:
        self.stats["mean_lag"] = sum(self.lags) / len(self.lags) if self.lags else float("nan")
        self.stats["mean_alpha"] = sum(self.alphas) / len(self.alphas) if self.alphas else 0.0
        if isinstance(ctx.stats, dict):
            ctx.stats.update({f"planner.{k}": v for k, v in self.stats.items()})
