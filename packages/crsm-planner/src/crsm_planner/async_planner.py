"""Asynchronous planning during generation: a background worker and the generation hook.

Timeline of one plan (``statelab.generate`` calls the hook after every step)::

    step t      hook: snapshot (clone) of the injectable state + logits -> request queue
    ...         generation continues; the worker thread searches on the snapshot
    step t+lag  hook: the result is taken from the result queue and applied with
                a = alpha * lag_decay**lag, or dropped if lag > max_lag. With
                ``target_frame: rebase`` (the default) the planned move is rebased onto
                the current state: target = h_{t+lag} + (target - s_t), so a plan made
                on an old snapshot moves the state by the planned change and never pulls
                it back toward that snapshot. The target is then capped at the norm of
                the state it replaces (``target_norm``)

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

import math
import queue
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from statelab.interfaces import Backbone, PlanRequest, PlanResult, State, StepContext, prefix_state, unprefix_state
from statelab.internals import publish

from crsm_planner.planner import cap_target_norm

PlanFn = Callable[[Any, PlanRequest], PlanResult]


@dataclass
class SnapshotRequest(PlanRequest):
    """A :class:`PlanRequest` whose ``state`` entries are views of one flat snapshot ``flat
    (B, S)`` (the codec's layout): taking it costs generation one copy kernel instead of one
    per entry, and the planner reads ``flat`` without concatenating again."""

    flat: Tensor | None = None


class PlanWorker:
    """One background thread that turns :class:`PlanRequest` into :class:`PlanResult`."""

    #: the duty of a worker whose duty is None (auto) when it plans on the CPU (see MCTSParams.worker_duty)
    CPU_DUTY = 0.1

    def __init__(self, planner, queue_size: int = 1, duty: float | None = 1.0) -> None:
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
            dev = request.logits.device
            duty = self.duty if self.duty is not None else (1.0 if dev.type == "cuda" else self.CPU_DUTY)
            try:
                with torch.no_grad():
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
                        t_issued = time.perf_counter()
                        done.synchronize()  # wait here, not in generation: results arrive complete
                    else:
                        result = plan_fn(model, request)
                        t_issued = time.perf_counter()
                # (seconds issuing the plan, with the interpreter lock held for most of it; seconds in all)
                result.info["_worker_s"] = (t_issued - t0, time.perf_counter() - t0)
                self.results.put(result)
            except BaseException as e:  # surfaced in the generating thread
                self.error, self.error_trace = e, traceback.format_exc()
                return
            finally:
                self.busy.clear()
            if duty < 1.0:  # rest, so that planning takes at most `duty` of the wall time
                time.sleep((time.perf_counter() - t0) * (1.0 / duty - 1.0))


class EagerLauncher:
    """The launch / poll protocol of :class:`~crsm_planner.planner.GraphLauncher` with the
    search run eagerly at launch, in the calling thread, and reported ready after ``delay``
    polls. For tests of the hook's stream mode on the CPU (where no CUDA graph exists); it
    blocks for a whole plan at every launch, so it is no way to generate."""

    def __init__(self, planner, model, delay: int = 1, simulations: int | None = None) -> None:
        self.planner, self.model, self.delay, self.simulations = planner, model, delay, simulations
        self.token, self.polls, self.out, self.snapshot = 0, 0, None, None

    def idle(self) -> bool:
        return self.out is None or self.polls >= self.delay

    def launch(self, state: State, logits: Tensor, step: int) -> int:
        pl = self.planner
        with torch.no_grad():
            s = self.snapshot = pl.codec.flatten(state)
            noise = pl.root_noise(s.shape[0], step, s.device) if pl.params.root_noise > 0 else None
            self.out = pl._plan_core(self.model, s, logits, noise, self.simulations)
        self.polls = 0
        self.token += 1
        return self.token

    def ready(self) -> bool:
        self.polls += 1
        return self.polls >= self.delay

    def result(self, state: State, step: int, generation_id: int) -> PlanResult:
        target_flat, conf, alpha, best_token, visits, nodes = self.out
        return PlanResult(self.planner.codec.unflatten(target_flat, state), conf, alpha, step, generation_id,
                          {"best_token": best_token, "root_visits": visits, "nodes": nodes,
                           "target_flat": target_flat, "snapshot_flat": self.snapshot})


class PlanningHook:
    """The generation hook of an :class:`~crsm_planner.planner.MCTSPlanner`.

    ``plan_fn`` replaces ``planner.plan`` (the random-injection ablation wraps it);
    ``alpha_fn`` transforms the applied gate (the stability probe forces a floor);
    ``target_frame`` overrides the params' (``snapshot``: the stale-target control).
    Statistics of the current generation are in :attr:`stats` and are written to the
    generation's stats under ``planner.*``.
    """

    def __init__(self, planner, model, *, inline: bool | None = None, plan_fn: PlanFn | None = None,
                 alpha_fn: Callable[[Tensor], Tensor] | None = None, plan_every: int | None = None,
                 simulations: int | None = None, launcher: Any = None, target_frame: str | None = None) -> None:
        p = planner.params
        self.target_frame = target_frame or p.target_frame  # the stale-target control passes "snapshot"
        self.planner, self.model = planner, model
        self.inline = (not p.asynchronous) if inline is None else inline
        sims = self.simulations = simulations
        self.plan_fn: PlanFn = plan_fn or (lambda m, r: planner.plan(m, r, simulations=sims))
        # stream mode (see GraphLauncher): the planner's own search, asynchronous, not forced to a thread
        self._stream_ok = plan_fn is None and not self.inline and p.async_mode != "thread"
        self._given_launcher = launcher  # tests: an EagerLauncher on the CPU
        self.launcher = None
        self._inflight: tuple | None = None  # (token, step, generation_id, launch time, launch seconds)
        self.alpha_fn = alpha_fn
        self.plan_every = plan_every or p.plan_every
        self.max_lag, self.lag_decay, self.sync_lag = p.max_lag, p.lag_decay, p.sync_lag
        self.worker = None if self.inline else planner.worker()
        self.generation_id: int | None = None
        self.host: torch.device | None = None
        self._pending: list[PlanResult] = []  # inline mode: results waiting for their step
        self.aux: dict[str, Tensor] = {}
        self._stats: dict[str, float] = {}
        self.lags: list[int] = []
        self.alphas: list[Tensor] = []  # mean applied alpha of each result, on the device (read at the end)
        self._alpha_mean: float | None = 0.0
        self.worker_times: list[tuple[float, float]] = []
        self._unit: int | None = None  # common unit size of the capped norms, when the fused apply applies
        #: (generation_id, plan step, applied step) of every result applied, all generations
        self.applied_log: list[tuple[int, int, int]] = []

    @property
    def stats(self) -> dict[str, float]:
        """Counters of the current generation (``mean_alpha`` is read from the device here, once,
        rather than in every step)."""
        if self._alpha_mean is None:
            self._alpha_mean = float(torch.stack(self.alphas).mean()) if self.alphas else 0.0
        self._stats["mean_alpha"] = self._alpha_mean
        return self._stats

    @stats.setter
    def stats(self, value: dict[str, float]) -> None:
        self._stats = value

    # -- protocol ------------------------------------------------------------------
    def __call__(self, ctx: StepContext) -> State | None:
        t0 = time.perf_counter()
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
        self._stats["hook_s"] += time.perf_counter() - t0
        if ctx.finished:
            self._publish_stats(ctx)
        return new_state

    def _begin(self, ctx: StepContext) -> None:
        if self.generation_id is not None and self.worker is not None:
            self.worker.finished_generations.add(self.generation_id)
        self.generation_id = ctx.generation_id
        self._pending.clear()
        self.stats = {k: 0.0 for k in ("requested", "applied", "dropped_stale", "dropped_foreign",
                                       "discarded_at_end", "skipped_busy", "hook_s")}
        self.lags, self.alphas, self._alpha_mean, self.worker_times = [], [], 0.0, []
        self.planner.ensure_ready(self.model, ctx.state)  # shapes the codec in this thread, not the worker's
        self._unit = self._common_unit()
        self._inflight = None  # a launch of the previous generation is never read (the launcher's token moves on)
        self.launcher = None
        self.host = None  # the device plans are made on, when not the model's
        if self.planner.params.device == "cpu" and ctx.logits.device.type != "cpu":
            self.host = torch.device("cpu")
            self.planner.shadow_for(self.model, self.host).ensure_ready(self.model, ctx.state)
        elif self._given_launcher is not None:
            self.launcher = self._given_launcher
        elif ctx.logits.is_cuda:  # capture the search once per batch shape, here rather than in the worker
            if self._stream_ok:
                self.launcher = self.planner.launcher(self.model, ctx.state, ctx.logits, self.simulations)
            else:
                self.planner.prepare(self.model, ctx.state, ctx.logits, self.simulations)

    def _launch(self, ctx: StepContext, state: State) -> None:
        """Stream mode: snapshot into the captured search and replay it on its stream, unless the
        last launch is still running or unread (then skip: generation never waits)."""
        if self._inflight is not None or not self.launcher.idle():
            self._stats["skipped_busy"] += 1
            return
        t0 = time.perf_counter()
        token = self.launcher.launch(state, ctx.logits, ctx.step)
        t1 = time.perf_counter()
        self._inflight = (token, ctx.step, ctx.generation_id, t1, t1 - t0)
        self._stats["requested"] += 1

    def _request(self, ctx: StepContext, state: State) -> None:
        if self.launcher is not None:
            return self._launch(ctx, state)
        if not self.inline and self.worker.request_queue.full():  # busy: skip without paying for a snapshot
            self._stats["skipped_busy"] += 1
            return
        codec = self.planner.codec
        if self.planner.params.world_model == "backbone":  # the search steps the backbone: the whole state
            snap = {k: v.detach().clone() for k, v in state.items()}
            req = SnapshotRequest(snap, ctx.logits.detach().clone(), ctx.step, ctx.generation_id,
                                  flat=codec.flatten(snap))
        elif self.host is not None:
            snap = {k: state[k].detach().to(self.host) for k in codec.keys}
            req = PlanRequest(snap, ctx.logits.detach().to(self.host), ctx.step, ctx.generation_id)
        else:
            flat = codec.flatten(state).detach()  # (B, S): one copy kernel is the whole snapshot
            req = SnapshotRequest(codec.unflatten(flat, state), ctx.logits.detach().clone(), ctx.step,
                                  ctx.generation_id, flat=flat)
        self._stats["requested"] += 1
        if self.inline:
            self._pending.append(self.plan_fn(self.model, req))
            return
        event = None
        if req.logits.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        if not self.worker.submit(self.model, req, self.plan_fn, event):
            self._stats["requested"] -= 1
            self._stats["skipped_busy"] += 1

    def _arrived(self, ctx: StepContext) -> list[PlanResult]:
        if self.launcher is not None:
            if self._inflight is None or not self.launcher.ready():
                return []
            token, step, gid, t_launch, launch_s = self._inflight
            self._inflight = None
            if self.launcher.token != token:  # another hook launched since: these outputs are not ours
                self._stats["dropped_foreign"] += 1
                return []
            self.worker_times.append((launch_s, time.perf_counter() - t_launch + launch_s))
            return [self.launcher.result(ctx.state, step, gid)]
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
                self._stats["dropped_foreign"] += 1
            elif ctx.finished:
                self._stats["discarded_at_end"] += 1
            elif ctx.step - r.step > self.max_lag:
                self._stats["dropped_stale"] += 1
            else:
                if best is not None:
                    self._stats["dropped_stale"] += 1  # superseded by a newer plan
                best = r if best is None or r.step >= best.step else best
        return best

    def _common_unit(self) -> int | None:
        """The size of the units :func:`cap_target_norm` bounds (an entry's last two dims),
        when every injectable entry has the same one and the backbone injects by the standard
        gated interpolation: then :meth:`_apply` works on the flat ``(B, S)`` layout in a
        handful of kernels. None otherwise (the per-entry path)."""
        if type(self.model.backbone).inject is not Backbone.inject:
            return None
        units = {math.prod(shp[-2:]) for shp in self.planner.codec.shapes}
        return units.pop() if len(units) == 1 else None

    def _apply(self, ctx: StepContext, r: PlanResult) -> State | None:
        ev = r.info.pop("_cuda_event", None)
        stream_ev = r.info.pop("_stream_event", None)
        # the snapshot the plan was made from; without one (a foreign plan_fn) the target is absolute
        snap = r.info.pop("snapshot_flat", None) if self.target_frame == "rebase" else None
        if stream_ev is not None:  # a launcher's static outputs: complete (polled), kept alive by the graph
            torch.cuda.current_stream().wait_event(stream_ev)
        flat = r.info.pop("target_flat", None)
        if flat is not None and not all(getattr(t, "_base", None) is flat for t in r.target.values()):
            flat = None  # the targets are not (or no longer) views of it: a wrapped plan_fn replaced them
        if ev is not None:
            torch.cuda.current_stream().wait_event(ev)
            for t in [*r.target.values(), r.alpha, r.confidence] + [x for x in (flat, snap) if x is not None]:
                t.record_stream(torch.cuda.current_stream())
        if any(ctx.state[k].shape != v.shape for k, v in r.target.items()):
            self._stats["dropped_foreign"] += 1  # a different batch: cannot belong here
            return None
        lag = ctx.step - r.step
        alpha = r.alpha.to(ctx.logits.device) * (self.lag_decay**lag)
        if self.alpha_fn is not None:
            alpha = self.alpha_fn(alpha)
        alpha = publish(self.aux, "planner.alpha", alpha)
        codec = self.planner.codec
        if self._unit is not None and set(r.target) == set(codec.keys):
            state = self._apply_flat(ctx.state, r.target, flat, alpha, snap)
        else:
            target = {k: v.to(ctx.state[k].device) for k, v in r.target.items()}  # from the CPU shadow, if any
            if snap is not None:  # rebase: the current state moved by the planned change
                old = codec.unflatten(snap, r.target)
                target = {k: (ctx.state[k].float() + (v.float() - old[k].to(v.device).float())).to(v.dtype)
                          for k, v in target.items()}
            if self.planner.params.target_norm == "cap":  # never above the norm of the state it replaces
                target = cap_target_norm(target, ctx.state)
            bb = unprefix_state("backbone", ctx.state)
            new_bb = self.model.backbone.inject(bb, unprefix_state("backbone", target), alpha)
            state = dict(ctx.state)
            state.update(prefix_state("backbone", new_bb))
        self._stats["applied"] += 1
        self.applied_log.append((r.generation_id, r.step, ctx.step))
        self.lags.append(lag)
        self.alphas.append(alpha.detach().float().mean() if isinstance(alpha, Tensor)
                           else torch.tensor(float(alpha)))
        self._alpha_mean = None  # read from the device when the stats are read, not here
        if "_worker_s" in r.info:
            self.worker_times.append(r.info["_worker_s"])
        return state

    def _apply_flat(self, state: State, target: State, flat: Tensor | None, alpha: Tensor | float,
                    snapshot: Tensor | None = None) -> State:
        """Rebasing (``t <- h + t - snapshot`` when a ``snapshot (B, S)`` is given),
        :func:`cap_target_norm` and the gated interpolation ``h <- (1 - a) h + a t`` on the
        codec's flat layout: about ten kernels for all layers instead of ~9 per layer (the
        generating thread pays for every launch). Same arithmetic as the per-entry path."""
        codec = self.planner.codec
        cur = codec.flatten(state)  # (B, S)
        B, S = cur.shape
        tgt = (flat if flat is not None else codec.flatten(target)).to(cur.device, cur.dtype)  # (B, S)
        if snapshot is not None:
            tgt = cur + (tgt - snapshot.to(cur.device, cur.dtype))  # (B, S)
        if self.planner.params.target_norm == "cap":
            U = self._unit
            hn = torch.linalg.vector_norm(cur.view(B, S // U, U), dim=-1, keepdim=True)  # (B, S/U, 1)
            tn = torch.linalg.vector_norm(tgt.view(B, S // U, U), dim=-1, keepdim=True)  # (B, S/U, 1)
            tgt = (tgt.view(B, S // U, U) * (hn / tn.clamp_min(1e-12)).clamp(max=1.0)).view(B, S)  # (B, S)
        a = torch.as_tensor(alpha, device=cur.device, dtype=cur.dtype).clamp(0.0, 1.0)
        if a.dim() == 1:
            a = a.view(-1, 1)  # (B, 1)
        new = dict(state)
        new.update(codec.unflatten(torch.lerp(cur, tgt, a), state))
        return new

    def _end(self, ctx: StepContext) -> None:
        if self.worker is not None:
            self.worker.finished_generations.add(ctx.generation_id)
        self._stats["discarded_at_end"] += len(self._pending) + (self._inflight is not None)
        self._pending.clear()
        self._inflight = None

    def _publish_stats(self, ctx: StepContext) -> None:
        """At the end of a generation: the counters, the mean lag and alpha of applied results,
        and the worker's mean seconds per plan (issuing it; in all, GPU wait included)."""
        st = self.stats
        st["mean_lag"] = sum(self.lags) / len(self.lags) if self.lags else float("nan")
        if self.worker_times:
            n = len(self.worker_times)
            st["worker_issue_s"] = sum(w[0] for w in self.worker_times) / n
            st["worker_plan_s"] = sum(w[1] for w in self.worker_times) / n
        if isinstance(ctx.stats, dict):
            ctx.stats.update({f"planner.{k}": v for k, v in st.items()})
