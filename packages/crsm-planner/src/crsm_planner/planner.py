"""The `mcts` planner: PUCT search over a learned latent model of a steerable backbone.

    plan(model, request)   snapshot -> search -> PlanResult(target state, confidence, alpha)
    fit(model, batches)    distil the codec, dynamics, value and prior heads from real
                           rollouts of the trained backbone, calibrate the novelty test,
                           optionally reanalyse, fit the injection critic, then the gate
    generation_hook(model) asynchronous planning during statelab.generate (async_planner.py)

The candidates of a plan are the root children of the search: each moves the snapshot by
the change the decoder attributes to going from the root latent to the child's
(``D(z_child) - D(z_root)``; with ``world_model: backbone`` the true state change after
reading the child's token), so the part of the state the latent cannot represent is kept
as it is. The injection critic (:mod:`crsm_planner.critic`), fitted on the realised loss
deltas of such moves, picks the child with the best pessimistic gain and gives the
confidence; without a usable critic the search's most visited child and its confidence
(scaled by the value head's held-out skill) are used. The gate is
``a = a_max * sigmoid(gate + w . zhat) * confidence * trust`` with ``zhat`` the standardised
root latent and ``trust`` the novelty test's (0 on states far from the fitting states);
``gate`` and ``w`` are fitted on the realised loss of the backbone after injection (see
:meth:`MCTSPlanner._fit_gate`). The generation hook rebases the move onto the state it is
applied to (``target_frame``), and ``Backbone.inject`` (``gated_inject``) clamps ``a`` to
``[0, 1]``. Before injection a target is scaled so that its norm does not exceed that of
the state it replaces (:func:`cap_target_norm`, ``target_norm: cap``), so no injection can
raise the state's norm.
"""

from __future__ import annotations

import atexit
import itertools
import math
import warnings
import weakref
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from statelab.interfaces import Planner, PlanRequest, PlanResult, State, prefix_state, unprefix_state

from crsm_planner.critic import InjectionCritic, Novelty
from crsm_planner.dynamics import LatentDynamics, StateCodec
from crsm_planner.planner_params import MCTSParams
from crsm_planner.search import PUCTSearch
from crsm_planner.value import PriorHead, ValueHead

# background workers live outside the module so that models stay picklable / deep-copyable
_WORKERS: "weakref.WeakKeyDictionary[MCTSPlanner, Any]" = weakref.WeakKeyDictionary()


# CPU copies of planners whose model runs on CUDA (device: cpu), with the version they copy
_SHADOWS: "weakref.WeakKeyDictionary[MCTSPlanner, tuple]" = weakref.WeakKeyDictionary()
# captured CUDA graphs of the search, per planner and batch shape (see MCTSPlanner.prepare)
_GRAPHS: "weakref.WeakKeyDictionary[MCTSPlanner, dict]" = weakref.WeakKeyDictionary()
# GraphLaunchers over those graphs (asynchronous planning without a worker thread)
_LAUNCHERS: weakref.WeakKeyDictionary[MCTSPlanner, dict] = weakref.WeakKeyDictionary()


class _CapturedPlan:
    """``MCTSPlanner._plan_core`` captured as a CUDA graph for fixed shapes, replayed on the
    caller's current stream with the inputs copied into static buffers."""

    def __init__(self, planner: "MCTSPlanner", model, s: Tensor, logits: Tensor, simulations: int | None) -> None:
        dev = s.device
        self.s = torch.zeros_like(s)
        self.logits = torch.zeros_like(logits)
        K = planner.params.top_k
        self.noise = torch.full((s.shape[0], K), 1.0 / K, device=dev) if planner.params.root_noise > 0 else None
        with torch.no_grad():
            side = torch.cuda.Stream(device=dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):  # warm-up off the capture (cuBLAS handles, allocator)
                for _ in range(2):
                    planner._plan_core(model, self.s, self.logits, self.noise, simulations)
            torch.cuda.current_stream(dev).wait_stream(side)
            torch.cuda.synchronize(dev)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                self.out = planner._plan_core(model, self.s, self.logits, self.noise, simulations)
            torch.cuda.synchronize(dev)

    busy: Any = None  # a GraphLauncher's completion event: its replay may still read the static buffers

    def run(self, s: Tensor, logits: Tensor, noise: Tensor | None):
        if self.busy is not None:
            torch.cuda.current_stream().wait_event(self.busy)
        self.s.copy_(s)
        self.logits.copy_(logits)
        if self.noise is not None and noise is not None:
            self.noise.copy_(noise)
        self.graph.replay()
        return tuple(o.clone() for o in self.out)  # the static outputs are overwritten by the next replay


class GraphLauncher:
    """Plans on a captured search without a second Python thread: :meth:`launch` copies the
    snapshot into the graph's static inputs on the generating stream and replays the graph on a
    side stream; :meth:`ready` polls its completion event (never blocks); :meth:`outputs` are
    the static outputs of the last replay, valid until the next launch. The generating thread
    issues a handful of calls per plan and the GPU searches while generation continues: no
    worker thread competes for the interpreter lock (what made the prototype stutter).

    One launcher is shared by every hook of a planner and batch shape; ``token`` counts
    launches so that a hook only reads outputs of its own launch."""

    def __init__(self, planner: MCTSPlanner, captured: _CapturedPlan) -> None:
        self.planner, self.captured = planner, captured
        dev = captured.s.device
        self.stream = torch.cuda.Stream(device=dev)
        self.done = torch.cuda.Event()
        captured.busy = self.done
        self.token = 0
        self.launched = False

    def idle(self) -> bool:
        """True when no replay is running (its outputs may then be overwritten)."""
        return not self.launched or self.done.query()

    def launch(self, state: State, logits: Tensor, step: int) -> int:
        cp = self.captured
        codec = self.planner.codec
        B = logits.shape[0]
        with torch.no_grad():
            # the snapshot, straight into the static input (generating stream: ordered after the step that made it)
            torch.cat([state[k].reshape(B, -1).float() for k in codec.keys], dim=1, out=cp.s)  # (B, S)
            cp.logits.copy_(logits)
            if cp.noise is not None:
                cp.noise.copy_(self.planner.root_noise(B, step, cp.noise.device))
            self.stream.wait_stream(torch.cuda.current_stream(cp.s.device))
            with torch.cuda.stream(self.stream):
                cp.graph.replay()
                self.done.record(self.stream)
        self.launched = True
        self.token += 1
        return self.token

    def ready(self) -> bool:
        return self.done.query()

    def result(self, state: State, step: int, generation_id: int) -> PlanResult:
        """The last replay's plan as a :class:`PlanResult` of views of the static outputs (read
        them before the next :meth:`launch`)."""
        target_flat, conf, alpha, best_token, visits, nodes = self.captured.out
        return PlanResult(
            target=self.planner.codec.unflatten(target_flat, state), confidence=conf, alpha=alpha, step=step,
            generation_id=generation_id,
            info={"best_token": best_token, "root_visits": visits, "nodes": nodes, "target_flat": target_flat,
                  "snapshot_flat": self.captured.s, "_stream_event": self.done},
        )


@atexit.register
def _stop_workers() -> None:
    """Let running searches finish before the interpreter tears torch down under them."""
    for w in list(_WORKERS.values()):
        w.stop(timeout=2.0)


class MCTSPlanner(Planner):
    def __init__(self, params: MCTSParams, vocab_size: int, d_model: int) -> None:
        super().__init__()
        self.params = params
        p = params
        self.codec = StateCodec(p.d_latent)
        self.dynamics = LatentDynamics(vocab_size, p.d_latent, p.d_token, p.d_hidden)
        self.value_head = ValueHead(p.d_latent, p.d_hidden)
        self.prior_head = PriorHead(p.d_latent, p.d_hidden, d_model)
        self.gate = nn.Parameter(torch.tensor(float(p.gate_init)))
        # the gate conditioned on the state: logit = gate + gate_weight . (standardised root latent)
        self.gate_weight = nn.Parameter(torch.zeros(p.d_latent))
        self.critic = InjectionCritic(p.d_latent, p.d_hidden, p.critic_members)
        self.novelty = Novelty(p.d_latent)
        # task rewards per token on the search's edges (set_token_rewards); not part of the fitted planner
        self.register_buffer("token_reward", torch.zeros(vocab_size), persistent=False)
        self.register_buffer("fitted", torch.zeros(()))  # 1.0 once fit() has run
        # number of value-head training targets of the last fit (see _value_fn); 1 = outcome variance
        self.register_buffer("value_count", torch.ones(()))
        # held-out skill of the value head at the last fit, 1 - mse / var (clamped to [0, 1]); scales the confidence
        self.register_buffer("value_skill", torch.ones(()))
        self.lm_head: nn.Module | None = None  # set only on a CPU shadow (see shadow_for)
        # the backbone trains without the planner: its parts get no gradient from the LM loss
        for prm in self.parameters():
            prm.requires_grad_(False)

    # -- state view ----------------------------------------------------------------
    def ensure_ready(self, model, state: State) -> None:
        """Bind the codec to this model's injectable state (weights get their shape on first use)."""
        with torch.no_grad():
            if not self.codec.is_materialized:
                keys = [f"backbone.{k}" for k in model.backbone.injectable_keys()]
                dim = sum(int(math.prod(state[k].shape[1:])) for k in keys if k in state)
                if dim:
                    self.codec.materialize(dim)
            self.codec.bind(model, state)

    def alpha_from(self, confidence: Tensor, z: Tensor | None = None) -> Tensor:
        """``a = a_max * sigmoid(gate + w . zhat) * confidence`` with ``zhat`` the root latent
        ``z (B, L)`` standardised by the fitting states' statistics (no state term without ``z``)."""
        logit = self.gate
        if z is not None:
            zhat = (z - self.novelty.z_mean) / self.novelty.z_var.clamp_min(1e-12).sqrt()  # (B, L)
            logit = logit + zhat @ self.gate_weight  # (B,)
        return self.params.alpha_max * torch.sigmoid(logit) * confidence

    def set_token_rewards(self, rewards: dict[int, float] | None) -> None:
        """Task rewards on the search's edges: ``{token: reward}`` for every edge that emits
        ``token`` (a lookahead task: + for tokens to reach, - for tokens to avoid); None clears."""
        self.token_reward.zero_()
        for tok, r in (rewards or {}).items():
            self.token_reward[int(tok)] = float(r)

    def _edge_reward(self, logp: Tensor, tokens: Tensor) -> Tensor:
        return self.params.edge_logprob * logp + self.token_reward[tokens]  # (M, K)

    # -- planning ------------------------------------------------------------------
    def _value_fn(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Value ``-predicted loss`` and the variance the search treats as the head's uncertainty.

        The head's own variance is that of a single outcome: the spread of the realised
        k-token loss around its mean (about 1.2-2 nats on text), however well the mean is
        known. The search compares *expected* losses of its children, which differ by a
        few hundredths of a nat, so against that spread every confidence was ~0 and the
        planner never injected. What matters for the comparison is how well the mean is
        known; the squared standard error ``var / n`` with ``n`` the number of targets the
        head was fitted on stands in for it (a heuristic: a head that predicts an enormous
        variance still gets confidence ~0, an unfitted planner keeps ``n = 1``)."""
        mean, logvar = self.value_head(z)
        return -mean, logvar.exp() / self.value_count.clamp_min(1.0)  # value = -predicted loss

    def make_search(self, model, simulations: int | None = None) -> PUCTSearch:
        p = self.params
        return PUCTSearch(
            self.dynamics,
            self._value_fn,
            lambda z: self.prior_head(z, self.lm_head if self.lm_head is not None else model.head),
            simulations=simulations or p.simulations,
            depth=p.depth,
            c_puct=p.c_puct,
            top_k=p.top_k,
            max_nodes=p.max_nodes,
            root_noise=p.root_noise,
            edge_reward=self._edge_reward,
        )

    def _plan_core(self, model, s: Tensor, logits: Tensor, noise: Tensor | None, simulations: int | None,
                   full: State | None = None):
        """Tensors in, tensors out, no host synchronisation: the part a CUDA graph captures.
        With ``full`` (the whole model state, ``world_model: backbone``) the search steps the
        backbone itself instead of the latent model."""
        z0 = self.codec.encode(s)  # (B, L)
        res, child_z, child_moves, best_move = self._candidates(model, s, z0, logits, noise, simulations, full)
        conf = res.confidence * self.fitted * self.value_skill  # unfitted, or a value head no better than a constant: 0
        # the critic ranks the root children's moves by their pessimistic predicted gain (where fitted)
        K = child_z.shape[1]
        gain, sd = self.critic.gain(z0.unsqueeze(1).expand(-1, K, -1), child_z - z0.unsqueeze(1))  # (B, K)
        lcb = gain - self.params.critic_kappa * sd
        pick = lcb.argmax(dim=1, keepdim=True)  # (B, 1)
        g, u, lo = gain.gather(1, pick)[:, 0], sd.gather(1, pick)[:, 0], lcb.gather(1, pick)[:, 0]
        critic_conf = (lo / (g.abs() + u + 1e-8)).clamp(0.0, 1.0) * self.fitted
        use = self.critic.fitted > 0
        rows = torch.arange(z0.shape[0], device=z0.device)
        move = torch.where(use, child_moves[rows, pick[:, 0]], best_move)  # (B, S)
        token = torch.where(use, res.root_tokens.gather(1, pick)[:, 0], res.best_token)
        conf = torch.where(use, critic_conf, conf)
        # an off-distribution state: no trust in anything the planner learned there
        resid = Novelty.residual(self.codec.normalize(s), self.codec.decode_normalized(z0))  # (B,)
        conf = conf * self.novelty.trust(z0, resid)
        target_flat = s + move  # (B, S)
        return target_flat, conf, self.alpha_from(conf, z0), token, res.root_visits, res.nodes_used

    def _candidates(self, model, s: Tensor, z0: Tensor, logits: Tensor, noise: Tensor | None,
                    simulations: int | None, full: State | None):
        """Search, then the root children as candidate injections: the search result, their
        latents ``(B, K, L)``, their moves ``(B, K, S)`` and the search's chosen move ``(B, S)``."""
        if full is None:
            res = self.make_search(model, simulations).run(z0, logits, noise=noise)
            child_moves = self.codec.decode_delta(res.root_latents, z0.unsqueeze(1))  # (B, K, S)
            return res, res.root_latents, child_moves, self.codec.decode_delta(res.best_latent, z0)
        res, child_s, best_s = self._backbone_search(model, full, logits, noise, simulations)
        return res, self.codec.encode(child_s), child_s - s.unsqueeze(1), best_s - s  # true state changes

    def _backbone_search(self, model, full: State, logits: Tensor, noise: Tensor | None, simulations: int | None):
        """PUCT with the backbone's own O(1) step as the world model. A node's "latent" is the
        whole model state flattened, followed by the LM's next-token logits there (so priors
        are the LM's own, not distilled); the value head reads the injectable part through the
        codec. Returns the search result and the injectable states ``(B, K, S)`` of the root
        children and ``(B, S)`` of the chosen one."""
        keys = list(full)
        B = logits.shape[0]
        sizes = [int(math.prod(full[k].shape[1:])) for k in keys]
        F_ = sum(sizes)
        offsets = dict(zip(keys, itertools.accumulate([0, *sizes[:-1]])))
        inj = torch.cat([torch.arange(offsets[k], offsets[k] + sizes[keys.index(k)]) for k in self.codec.keys])
        inj = inj.to(logits.device)

        def unflat(x: Tensor) -> State:
            return {k: x[:, offsets[k] : offsets[k] + n].reshape(x.shape[0], *full[k].shape[1:]).to(full[k].dtype)
                    for k, n in zip(keys, sizes)}

        def dynamics(x: Tensor, tok: Tensor) -> Tensor:
            lg, st, _ = model.step(tok, unflat(x[:, :F_]))
            return torch.cat([*(st[k].reshape(x.shape[0], -1).float() for k in keys), lg.float()], dim=1)

        search = self.make_search(model, simulations)
        search.dynamics = dynamics
        search.value = lambda x: self._value_fn(self.codec.encode(x[:, inj]))
        search.prior = lambda x: x[:, F_:]
        x0 = torch.cat([*(full[k].reshape(B, -1).float() for k in keys), logits.float()], dim=1)  # (B, F + V)
        res = search.run(x0, logits, noise=noise)
        return res, res.root_latents[..., inj], res.best_latent[:, inj]

    @torch.no_grad()
    def plan(self, model, request: PlanRequest, *, simulations: int | None = None) -> PlanResult:
        """Search from ``request.state`` and propose a target for the injectable entries.
        A request on another device than the planner (``device: cpu`` with a CUDA model) is
        planned by the planner's CPU shadow, prepared with :meth:`shadow_for`."""
        if request.logits.device != self.fitted.device:
            shadow = _SHADOWS.get(self)
            if shadow is None or shadow[0] != self._version:
                raise RuntimeError("mcts planner: a request on another device than the planner needs shadow_for(model, "
                                   "device) first (the generation hook does this)")
            return shadow[1].plan(model, request, simulations=simulations)
        self.ensure_ready(model, request.state)
        s = getattr(request, "flat", None)  # a SnapshotRequest carries the flat snapshot already
        if s is None:
            s = self.codec.flatten(request.state)  # (B, S)
        noise = self.root_noise(s.shape[0], request.step, s.device) if self.params.root_noise > 0 else None
        graph = _GRAPHS.get(self, {}).get(self._graph_key(s, request.logits, simulations))
        if graph is not None:
            outs = graph.run(s, request.logits, noise)
        else:
            outs = self._plan_core(model, s, request.logits, noise, simulations, self._full_state(model, request))
        target_flat, conf, alpha, best_token, visits, nodes = outs
        return PlanResult(
            target=self.codec.unflatten(target_flat, request.state),
            confidence=conf,
            alpha=alpha.detach(),
            step=request.step,
            generation_id=request.generation_id,
            info={"best_token": best_token, "root_visits": visits, "nodes": nodes,
                  "simulations": simulations or self.params.simulations,
                  "target_flat": target_flat,  # the target's entries are views of it (the hook's fused apply)
                  "snapshot_flat": s},  # what the target is relative to (the hook rebases the move onto the state)
        )

    def _full_state(self, model, request: PlanRequest) -> State | None:
        """The whole model state of a request, for ``world_model: backbone`` (None otherwise)."""
        if self.params.world_model != "backbone":
            return None
        missing = [k for k in model.init_state(1, request.logits.device) if k not in request.state]
        if missing:
            raise ValueError(f"world_model: backbone searches with the backbone's own step and needs the whole model "
                             f"state in the plan request; it lacks {missing[:4]} (the generation hook sends it)")
        return request.state

    def root_noise(self, B: int, step: int, device) -> Tensor:
        """The seeded Dirichlet noise on the root priors of the plan requested at ``step``."""
        gen = torch.Generator().manual_seed(self.params.seed * 1_000_003 + step)
        return PUCTSearch(None, None, None, top_k=self.params.top_k, max_nodes=self.params.max_nodes,
                          root_noise=self.params.root_noise).sample_noise(B, gen).to(device)

    # -- CUDA graphs ---------------------------------------------------------------
    def _graph_key(self, s: Tensor, logits: Tensor, simulations: int | None) -> tuple:
        return (s.device, tuple(s.shape), tuple(logits.shape), logits.dtype, simulations or self.params.simulations)

    def prepare(self, model, state: State, logits: Tensor, simulations: int | None = None) -> bool:
        """On CUDA (and with ``cuda_graphs``), capture the whole search for this batch shape as
        one CUDA graph, so that a plan costs the worker one launch instead of thousands (the
        worker then barely holds the interpreter lock). Call from the generating thread
        before planning starts; returns whether a graph is in place. A capture that fails
        falls back to eager planning with a warning."""
        if not (self.params.cuda_graphs and logits.is_cuda) or self.params.world_model == "backbone":
            return False
        self.ensure_ready(model, state)
        with torch.no_grad():
            s = self.codec.flatten(state)
        key = self._graph_key(s, logits, simulations)
        graphs = _GRAPHS.setdefault(self, {})
        if key in graphs:
            return graphs[key] is not None
        try:
            graphs[key] = _CapturedPlan(self, model, s, logits, simulations)
        except Exception as e:  # noqa: BLE001 - eager planning still works
            warnings.warn(f"mcts planner: CUDA graph capture failed ({type(e).__name__}: {e}); planning eagerly",
                          stacklevel=2)
            graphs[key] = None
        return graphs[key] is not None

    def launcher(self, model, state: State, logits: Tensor, simulations: int | None = None) -> GraphLauncher | None:
        """The :class:`GraphLauncher` of this batch shape (capturing the search first), or None
        where there is no captured graph (CPU, ``cuda_graphs: false``, a failed capture)."""
        if not self.prepare(model, state, logits, simulations):
            return None
        with torch.no_grad():
            key = self._graph_key(self.codec.flatten(state), logits, simulations)
        launchers = _LAUNCHERS.setdefault(self, {})
        if key not in launchers:
            launchers[key] = GraphLauncher(self, _GRAPHS[self][key])
        return launchers[key]

    _fit_count = 0  # bumped by fit and by loading weights: shadows of older weights are stale

    @property
    def _version(self) -> tuple:
        return (self._fit_count, self.codec.enc_weight.data_ptr())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._fit_count += 1
        # checkpoints from before value_count existed: the outcome variance, as they were fitted
        state_dict.setdefault(prefix + "value_count", torch.ones(()))
        state_dict.setdefault(prefix + "value_skill", torch.ones(()))
        # checkpoints from before the critic, the novelty test and the state-conditioned gate: none of them
        for k, v in self.state_dict().items():
            if k.startswith(("critic.", "novelty.", "gate_weight")):
                state_dict.setdefault(prefix + k, v.clone())
        return super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def shadow_for(self, model, device: torch.device | str) -> "MCTSPlanner":
        """A copy of this planner (and of the LM head it takes priors from) on ``device``,
        refreshed after each fit; lets the search run on the CPU while the model runs on
        CUDA, so the planner never puts work on the GPU the generation runs on."""
        device = torch.device(device)
        cached = _SHADOWS.get(self)
        if cached is not None and cached[0] == self._version:
            return cached[1]
        import copy

        with torch.no_grad():
            shadow = copy.deepcopy(self).to(device)
            shadow.lm_head = copy.deepcopy(model.head).to(device).requires_grad_(False)
            shadow.codec.keys, shadow.codec.shapes = list(self.codec.keys), list(self.codec.shapes)
        _SHADOWS[self] = (self._version, shadow)
        return shadow

    def _apply(self, fn, *args, **kwargs):  # .to() / .cuda() / .half(): captured graphs point at old storage
        _GRAPHS.pop(self, None)
        _LAUNCHERS.pop(self, None)
        return super()._apply(fn, *args, **kwargs)

    def generation_hook(self, model):
        from crsm_planner.async_planner import PlanningHook

        return PlanningHook(self, model)

    def worker(self):
        """The background worker of this planner (started on first use, shared by generations)."""
        from crsm_planner.async_planner import PlanWorker

        w = _WORKERS.get(self)
        if w is None or not w.alive:
            w = PlanWorker(self, queue_size=self.params.queue_size, duty=self.params.worker_duty)
            _WORKERS[self] = w
        return w

    def shutdown(self) -> None:
        w = _WORKERS.pop(self, None)
        if w is not None:
            w.stop()

    # -- fitting -------------------------------------------------------------------
    @torch.no_grad()
    def rollout(self, model, tokens: Tensor) -> dict[str, Tensor]:
        """Run the backbone token by token over ``tokens (B, T)``: injectable states after
        each token ``s (B, T, S)``, next-token logits ``(B, T, V)``, per-token losses
        ``(B, T-1)`` (loss of predicting ``tokens[:, t+1]`` from the state after ``t``)."""
        B, T = tokens.shape
        state = model.init_state(B, tokens.device)
        self.ensure_ready(model, state)
        ss, ls = [], []
        for t in range(T):
            logits, state, _ = model.step(tokens[:, t], state)  # (B, V)
            ss.append(self.codec.flatten(state))
            ls.append(logits.float())
        s = torch.stack(ss, 1)  # (B, T, S)
        logits = torch.stack(ls, 1)  # (B, T, V)
        V = logits.shape[-1]
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, V), tokens[:, 1:].reshape(-1), reduction="none")
        return {"tokens": tokens, "s": s, "logits": logits, "loss": loss.view(B, T - 1)}

    def _losses(self, model, roll: dict[str, Tensor], metrics: bool = False) -> tuple[Tensor, dict[str, float]]:
        p = self.params
        x, logits, loss_tok = roll["tokens"], roll["logits"], roll["loss"]
        B, T = x.shape
        m, k = p.fit_multistep, p.value_horizon
        sn = self.codec.normalize(roll["s"])  # (B, T, S)
        z = F.linear(sn, self.codec.enc_weight)  # (B, T, L)
        rec = F.mse_loss(self.codec.decode_normalized(z), sn)
        # k-step latent rollouts from every start t in [0, T-m). In state space a prediction is
        # the start state moved by the decoded latent change (as plan targets are), so the
        # part of the state the latent cannot represent is carried over, not lost.
        zh = z[:, : T - m]  # (B, T-m, L)
        base = sn[:, : T - m] - self.codec.decode_normalized(zh)  # (B, T-m, S)
        dyn_state, dyn_latent, zh1 = [], [], None
        for j in range(1, m + 1):
            zh = self.dynamics(zh, x[:, j : T - m + j])  # (B, T-m, L): latent after token t+j
            if j == 1:
                zh1 = zh
            dyn_state.append(F.mse_loss(base + self.codec.decode_normalized(zh), sn[:, j : T - m + j]))
            dyn_latent.append(F.mse_loss(zh, z[:, j : T - m + j]))
        dyn = torch.stack(dyn_state).mean() + torch.stack(dyn_latent).mean()
        # value: mean loss of the next k tokens from the state after token t
        vt = loss_tok.unfold(1, k, 1).mean(-1)  # (B, T-k)
        n0 = vt.shape[1]
        vm, vlv = self.value_head(z[:, :n0])
        n1 = min(T - m, n0 - 1)
        vm1, vlv1 = self.value_head(zh1[:, :n1])  # predicted latents at positions 1..n1
        val = ValueHead.loss(vm, vlv, vt) + ValueHead.loss(vm1, vlv1, vt[:, 1 : 1 + n1])
        # prior: distil the LM's next-token distribution (from encoded and predicted latents)
        target_p = torch.softmax(logits, dim=-1)  # (B, T, V)
        lp = torch.log_softmax(self.prior_head(z, model.head).float(), dim=-1)
        lp1 = torch.log_softmax(self.prior_head(zh1, model.head).float(), dim=-1)  # positions 1..T-m
        ent = (target_p * torch.log(target_p.clamp_min(1e-12))).sum(-1)  # (B, T): -entropy
        kl = (ent - (target_p * lp).sum(-1)).mean()
        kl1 = (ent[:, 1 : T - m + 1] - (target_p[:, 1 : T - m + 1] * lp1).sum(-1)).mean()
        total = rec + dyn + val + kl + kl1
        out: dict[str, float] = {}
        if metrics:
            copy1 = F.mse_loss(sn[:, : T - m], sn[:, 1 : T - m + 1])
            copyk = F.mse_loss(sn[:, : T - m], sn[:, m:])
            lat_copy1 = F.mse_loss(z[:, : T - m], z[:, 1 : T - m + 1])
            pred, tgt = vm.flatten(), vt.flatten()
            pc, tc = pred - pred.mean(), tgt - tgt.mean()
            corr = (pc * tc).sum() / (pc.norm() * tc.norm()).clamp_min(1e-12)
            out = {
                "dyn/recon_mse": rec.item(),
                "dyn/one_step_mse": dyn_state[0].item(),
                "dyn/one_step_copy_mse": copy1.item(),
                "dyn/one_step_ratio": (dyn_state[0] / copy1.clamp_min(1e-12)).item(),
                "dyn/k_step_mse": dyn_state[-1].item(),
                "dyn/k_step_copy_mse": copyk.item(),
                "dyn/k_step_ratio": (dyn_state[-1] / copyk.clamp_min(1e-12)).item(),
                # the share of the state's change over 1 and k tokens that the world model predicts
                "dyn/one_step_explained_variance": (1 - dyn_state[0] / copy1.clamp_min(1e-12)).item(),
                "dyn/k_step_explained_variance": (1 - dyn_state[-1] / copyk.clamp_min(1e-12)).item(),
                "dyn/recon_explained_variance": (1 - rec / sn.var(dim=(0, 1), unbiased=False).mean()).item(),
                "dyn/k": float(m),
                "dyn/latent_one_step_mse": dyn_latent[0].item(),
                "dyn/latent_one_step_copy_mse": lat_copy1.item(),
                "value/corr": corr.item(),
                "value/mse": F.mse_loss(pred, tgt).item(),
                "value/const_mse": tgt.var(unbiased=False).item(),
                "value/pred_std": vlv.mul(0.5).exp().mean().item(),
                "prior/kl": kl.item(),
                "prior/top1_agree": (lp.argmax(-1) == logits.argmax(-1)).float().mean().item(),
            }
        return total, out

    def fit(self, model, batches: Callable[[], Tensor], *, steps: int = 200, batch_size: int | None = None,
            seq_len: int | None = None, lr: float = 1e-3, seed: int | None = None,
            heldout: Callable[[], Tensor] | None = None, **kw: Any) -> dict[str, float]:
        """Distil the latent model from the backbone's own rollouts on ``batches()`` (each a
        ``(B, T)`` token tensor) and fit the gate; returns held-out metrics on one batch never
        optimised on (from ``heldout()`` when given, e.g. validation text, else one more
        ``batches()``): one-step and k-step state errors against the "state does not change"
        predictor, the value head's correlation with realised loss, the prior's KL.
        ``batch_size``/``seq_len`` are informational: the batches come from ``batches``."""
        p = self.params
        was = model.training
        model.eval()
        dev = model.embed.weight.device
        gen = torch.Generator().manual_seed(p.seed if seed is None else seed)
        _GRAPHS.pop(self, None)  # the codec may get new weights
        _LAUNCHERS.pop(self, None)
        self.critic.fitted.fill_(0.0)  # refitted below on this fit's proposals; until then the search chooses
        try:
            n_roll = max(1, min(p.fit_rollout_batches, steps))
            first = batches().to(dev)
            T = first.shape[1]
            need = max(p.value_horizon, p.fit_multistep) + 2
            if T < need:
                raise ValueError(f"planner fit needs sequences of at least {need} tokens "
                                 f"(value_horizon={p.value_horizon}, "
                                 f"fit_multistep={p.fit_multistep}); got seq_len={T}: raise train.planner_fit.seq_len")
            heldout_roll = self.rollout(model, (heldout or batches)().to(dev))
            roll = self.rollout(model, first)
            if self.fitted.item() == 0:
                self.codec.set_normalization(roll["s"].flatten(0, 1))
                self.codec.init_pca(roll["s"].flatten(0, 1))
                self.value_head.net[-1].bias[0] = roll["loss"].mean()  # start from the mean loss
            learn = [*self.codec.parameters(), *self.dynamics.parameters(), *self.value_head.parameters(),
                     *self.prior_head.parameters()]
            for prm in learn:
                prm.requires_grad_(True)
            opt = torch.optim.Adam(learn, lr=lr)
            per = math.ceil(steps / n_roll)
            losses = []
            token_batches = [first]
            with torch.enable_grad():
                for i in range(steps):
                    if i > 0 and i % per == 0:
                        nxt = batches().to(dev)
                        token_batches.append(nxt)
                        roll = self.rollout(model, nxt)
                    loss, _ = self._losses(model, roll)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(learn, 1.0)
                    opt.step()
                    losses.append(loss.item())
            for prm in learn:
                prm.requires_grad_(False)
            if losses:
                self.fitted.fill_(1.0)
                k = p.value_horizon  # value targets per rollout: B * (T - k)
                self.value_count.fill_(float(sum(b.shape[0] * max(b.shape[1] - k, 1) for b in token_batches)))
            self._fit_count += 1
            with torch.no_grad():
                _, metrics = self._losses(model, heldout_roll, metrics=True)
                if losses:  # a head that predicts held-out loss no better than its mean gets no say
                    skill = 1.0 - metrics["value/mse"] / max(metrics["value/const_mse"], 1e-12)
                    self.value_skill.fill_(min(max(skill, 0.0), 1.0))
                    metrics["value/skill"] = self.value_skill.item()
            metrics["fit/loss_first"] = losses[0] if losses else float("nan")
            metrics["fit/loss_last"] = losses[-1] if losses else float("nan")
            if losses:
                with torch.no_grad():
                    sn = self.codec.normalize(roll["s"].flatten(0, 1))  # (N, S) fitting states
                    z = F.linear(sn, self.codec.enc_weight)
                    self.novelty.calibrate(z, Novelty.residual(sn, self.codec.decode_normalized(z)))
                if p.reanalyse_steps:
                    metrics.update(self._reanalyse(model, roll, gen, lr))
                if p.critic_steps and p.gate_steps:
                    metrics.update(self._fit_critic(model, token_batches, gen))
            metrics.update(self._fit_gate(model, token_batches, gen, lr=0.05))
            return metrics
        finally:
            model.train(was)

    def _fit_gate(self, model, token_batches: list[Tensor], gen: torch.Generator, lr: float) -> dict[str, float]:
        """Fit the gate on the backbone's realised loss after an injection: plan from the
        state after token ``t0``, let ``sync_lag`` tokens pass, inject with
        ``a = a_max * sigmoid(gate) * confidence * lag_decay**lag`` and score the next
        ``value_horizon`` predictions. Only the gate moves (gradients flow through the
        backbone's forward, its weights are not touched)."""
        p = self.params
        lag, k = p.sync_lag, p.value_horizon
        deltas, alphas = [], []
        gate_params = [self.gate, self.gate_weight]
        for prm in gate_params:
            prm.requires_grad_(True)
        opt = torch.optim.Adam(gate_params, lr=lr)
        try:
            for i in range(p.gate_steps):
                x = token_batches[i % len(token_batches)]
                T = x.shape[1]
                hi = T - lag - k - 2
                if hi < 1:
                    break
                t0 = int(torch.randint(0, hi, (1,), generator=gen))
                with torch.no_grad():
                    logits, st, _ = model(x[:, : t0 + 1])  # state after token t0
                    res = self.plan(model, PlanRequest({k_: v.clone() for k_, v in st.items()}, logits[:, -1], t0, -1))
                    _, st2, _ = model(x[:, t0 + 1 : t0 + 1 + lag], st)  # lag tokens later
                a0 = t0 + lag + 1
                z0 = self.codec.encode(self.codec.flatten(st))  # (B, L)
                alpha = self.alpha_from(res.confidence, z0) * p.lag_decay**lag  # (B,) with grad to the gate
                bb = unprefix_state("backbone", st2)
                injected = dict(st2)
                target = res.target
                if p.target_frame == "rebase":  # as the generation hook applies it: the move, from the current state
                    target = {k_: st2[k_] + (v - st[k_]) for k_, v in target.items()}
                target = target if p.target_norm == "none" else cap_target_norm(target, st2)
                new_bb = model.backbone.inject(bb, unprefix_state("backbone", target), alpha)
                injected.update(prefix_state("backbone", new_bb))
                with torch.enable_grad():
                    lg, _, _ = model(x[:, a0 : a0 + k], injected)  # (B, k, V)
                    loss = F.cross_entropy(lg.reshape(-1, lg.shape[-1]).float(), x[:, a0 + 1 : a0 + k + 1].reshape(-1))
                    grads = torch.autograd.grad(loss, gate_params, allow_unused=True)
                with torch.no_grad():
                    lb, _, _ = model(x[:, a0 : a0 + k], st2)
                    base = F.cross_entropy(lb.reshape(-1, lb.shape[-1]).float(), x[:, a0 + 1 : a0 + k + 1].reshape(-1))
                deltas.append(loss.item() - base.item())
                alphas.append(alpha.mean().item())
                if grads[0] is not None:
                    for prm, g in zip(gate_params, grads):
                        prm.grad = g
                    opt.step()
        finally:
            for prm in gate_params:
                prm.requires_grad_(False)
        out = {"gate/sigmoid": torch.sigmoid(self.gate).item()}
        if deltas:
            out["gate/loss_delta"] = sum(deltas) / len(deltas)
            out["gate/alpha_mean"] = sum(alphas) / len(alphas)
        return out


    def _injected_losses(self, model, x: Tensor, a0: int, st2: State, moves: list[Tensor], alpha: float) -> Tensor:
        """Per-row mean loss over ``x[:, a0 + 1 : a0 + k + 1]`` from ``st2`` moved by each of
        ``moves`` (each ``(B, S)``, rebased onto ``st2``, capped, injected at ``alpha``), and
        without a move (last): ``(len(moves) + 1, B)``."""
        k = self.params.value_horizon
        cur = self.codec.flatten(st2)  # (B, S)
        out = []
        for move in [*moves, None]:
            state = st2
            if move is not None:
                target = self.codec.unflatten(cur + move, st2)
                if self.params.target_norm == "cap":
                    target = cap_target_norm(target, st2)
                new_bb = model.backbone.inject(unprefix_state("backbone", st2), unprefix_state("backbone", target),
                                               alpha)
                state = {**st2, **prefix_state("backbone", new_bb)}
            lg, _, _ = model(x[:, a0 : a0 + k], state)  # (B, k, V)
            ce = F.cross_entropy(lg.flatten(0, 1).float(), x[:, a0 + 1 : a0 + k + 1].flatten(), reduction="none")
            out.append(ce.view(x.shape[0], k).mean(1))
        return torch.stack(out)  # (moves + 1, B)

    @torch.no_grad()
    def _fit_critic(self, model, token_batches: list[Tensor], gen: torch.Generator) -> dict[str, float]:
        """Fit the injection critic on realised loss deltas: from the state after token ``t0``
        search, let ``sync_lag`` tokens pass, inject each root child's move (rebased) at
        ``alpha_max`` and score the next ``value_horizon`` predictions against no injection.
        The first 80% of the samples train it; on the rest it reports how well it predicts the
        deltas and what its choice realises against the search's choice and a random child. A
        critic no better than a constant on those held-out deltas is not used."""
        p = self.params
        lag, k = p.sync_lag, p.value_horizon
        zs, dzs, deltas, best = [], [], [], []
        for i in range(p.gate_steps):
            x = token_batches[i % len(token_batches)]
            hi = x.shape[1] - lag - k - 2
            if hi < 1:
                break
            t0 = int(torch.randint(0, hi, (1,), generator=gen))
            logits, st, _ = model(x[:, : t0 + 1])
            s = self.codec.flatten(st)
            z0 = self.codec.encode(s)  # (B, L)
            full = st if p.world_model == "backbone" else None
            res, child_z, child_moves, _ = self._candidates(model, s, z0, logits[:, -1], None, None, full)
            _, st2, _ = model(x[:, t0 + 1 : t0 + 1 + lag], st)
            K = child_z.shape[1]
            moves = [child_moves[:, c] for c in range(K)]
            losses = self._injected_losses(model, x, t0 + lag + 1, st2, moves, p.alpha_max)  # (K + 1, B)
            zs.append(z0.unsqueeze(1).expand(-1, K, -1))  # (B, K, L)
            dzs.append(child_z - z0.unsqueeze(1))  # (B, K, L)
            deltas.append((losses[:K] - losses[K]).T)  # (B, K)
            best.append((res.root_tokens == res.best_token.unsqueeze(1)).float().argmax(1))  # (B,) the search's choice
        if len(zs) < 2:
            return {}
        n_fit = max(1, int(0.8 * len(zs)))
        z, dz, d = (torch.cat(v[:n_fit]).flatten(0, 1) for v in (zs, dzs, deltas))
        for prm in self.critic.parameters():
            prm.requires_grad_(True)
        try:
            with torch.enable_grad():
                train_mse = self.critic.fit(z, dz, d, steps=p.critic_steps, lr=3e-3, generator=gen)
        finally:
            for prm in self.critic.parameters():
                prm.requires_grad_(False)
        zh, dzh, dh, bh = (torch.cat(v[n_fit:]) for v in (zs, dzs, deltas, best))  # (N, K, ...)
        gain, sd = self.critic.gain(zh, dzh)  # (N, K)
        pick = (gain - p.critic_kappa * sd).argmax(1, keepdim=True)
        pred = -gain.flatten()
        pc, tc = pred - pred.mean(), dh.flatten() - dh.mean()
        mse, const = float((pred - dh.flatten()).pow(2).mean()), float(dh.var(unbiased=False))
        skill = 1.0 - mse / max(const, 1e-12)
        if skill <= 0:  # no better than a constant on held-out injections: the search keeps the choice
            self.critic.fitted.fill_(0.0)
        return {
            "critic/used": float(self.critic.fitted.item()),
            "critic/heldout_skill": skill,
            "critic/train_mse": train_mse,
            "critic/heldout_mse": mse,
            "critic/heldout_const_mse": const,
            "critic/heldout_corr": float((pc * tc).sum() / (pc.norm() * tc.norm()).clamp_min(1e-12)),
            "critic/delta_of_critic_choice": float(dh.gather(1, pick).mean()),
            "critic/delta_of_search_choice": float(dh.gather(1, bh.unsqueeze(1)).mean()),
            "critic/delta_of_random_child": float(dh.mean()),
            "critic/samples": float(d.numel()),
        }

    def _reanalyse(self, model, roll: dict[str, Tensor], gen: torch.Generator, lr: float) -> dict[str, float]:
        """MuZero's reanalyse, for the prior: search again from fitting states with the fitted
        model and train the prior head toward the root visit distribution (renormalised over
        the searched top-k tokens), so that what the search learned to prefer is proposed first
        next time. Returns the KL of the prior to the visits before and after."""
        p = self.params
        B, T, _ = roll["s"].shape
        params = list(self.prior_head.parameters())
        opt = torch.optim.Adam(params, lr=lr)

        def sample():
            t = torch.randint(0, T, (B,), generator=gen).to(roll["s"].device)
            rows = torch.arange(B, device=t.device)
            with torch.no_grad():
                z0 = self.codec.encode(roll["s"][rows, t])  # (B, L)
                res = self.make_search(model).run(z0, roll["logits"][rows, t])
            pi = res.root_visits / res.root_visits.sum(1, keepdim=True).clamp_min(1)  # (B, K)
            return z0, res.root_tokens, pi

        def kl(z0, tok, pi):
            lp = torch.log_softmax(self.prior_head(z0, model.head).float().gather(1, tok), dim=-1)  # (B, K)
            return (pi * (torch.log(pi.clamp_min(1e-12)) - lp)).sum(1).mean()

        probe = sample()
        before = float(kl(*probe).detach())
        for prm in params:
            prm.requires_grad_(True)
        try:
            with torch.enable_grad():
                for _ in range(p.reanalyse_steps):
                    loss = kl(*sample())
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
        finally:
            for prm in params:
                prm.requires_grad_(False)
        with torch.no_grad():
            return {"reanalyse/prior_visit_kl_before": before, "reanalyse/prior_visit_kl_after": float(kl(*probe))}


def cap_target_norm(target: State, current: State, eps: float = 1e-12) -> State:
    """``target`` with each entry scaled down to at most the norm of ``current[k]``, the state
    it is about to replace, per batch row and per unit: the norm runs over an entry's last
    two dims (a Mamba-2 head ``(P, N)`` of ``(B, H, P, N)``, a Mamba-1 layer ``(Di, N)``, a
    row of a ``(B, d)`` state). Targets already within the bound are unchanged.

    Then ``|(1 - a) h + a t| <= (1 - a) |h| + a |t| <= |h|`` for every unit and every
    ``a in [0, 1]``: an injection can move the state anywhere on or inside its own sphere
    but never push it outward. Without this, a target is the snapshot plus a decoded latent
    move (``s + D(z_best) - D(z_root)``) whose size nothing bounds; at a high gate and one
    injection per step those moves add up faster than the SSM's decay removes them (the
    Mamba-2 state norm of a briefly fitted planner grew 11.7x over 1200 forced injections).
    """
    out: State = {}
    for k, t in target.items():
        h = current[k]
        dims = tuple(range(max(1, t.dim() - 2), t.dim()))
        tn = torch.linalg.vector_norm(t.float(), dim=dims, keepdim=True)
        hn = torch.linalg.vector_norm(h.float(), dim=dims, keepdim=True).to(tn.device)
        scale = (hn / tn.clamp_min(eps)).clamp(max=1.0)  # 1 where the target is already within the bound
        out[k] = (t.float() * scale).to(t.dtype)
    return out


def build_planner(params: MCTSParams, ctx) -> MCTSPlanner:
    return MCTSPlanner(params, ctx.vocab_size, ctx.d_model)
