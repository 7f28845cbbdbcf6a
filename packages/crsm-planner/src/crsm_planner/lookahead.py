"""``lookahead``: a task where looking ahead matters, scored exactly.

The text is random walks on ``modes`` fixed random directed graphs over the same nodes (token
``i`` is a node; in each mode's graph a node has ``degree`` successors, fixed by
``graph_seed``). A walk moves uniformly to a successor in its current, hidden mode, which
changes with probability ``switch`` per step. A model trained on the walks learns the
successor lists and must track the mode in its recurrent state (the last token alone does
not say which list applies): the state matters, so steering it can matter.

An *episode* gives a walk prefix and a goal, and samples ``horizon`` tokens:

* ``reach``: the prompt walks in one mode; the goal is at distance exactly ``distance`` from
  its last token in *another* mode's graph and not within that distance in the prompt's
  mode; success = the goal appears among the sampled tokens. Getting there takes a change
  of mode and the right choice at each branch point: a look ahead.
* ``avoid``: the same kind of goal; success = it never appears.

A sampled token that is not a successor of the previous one in any mode fails the episode,
so a steered state that forgets the graphs is not rewarded.

Settings, paired by episode (same prompt, goal and sampling seed): ``off``; ``planned`` (the
planner as gated, with a task reward of +reward / -reward on the goal's edges in its search);
``forced`` (its plans at a fixed alpha, the moves rescaled to ``move_norm`` of the state's
norm); ``random`` (a random direction in the planner's subspace, same length and alpha);
``oracle`` (the positive control: the direction of steepest descent of the loss of a
shortest path to the goal from the current token, same length and alpha; ascent for
``avoid``). Each episode's success is 0 or 1; the task reports the
success rates and the paired differences with their intervals.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from statelab.interfaces import Metric, StepContext, Task, TaskContext, TaskResult
from statelab.stats import paired_difference

from crsm_planner.planner_params import LookaheadParams

SETTINGS = ("off", "planned", "forced", "random", "oracle")


def successor_graph(vocab_size: int, degree: int, seed: int, modes: int = 1) -> np.ndarray:
    """``(modes, V, degree)`` successor lists, one graph per hidden mode: distinct nodes, chosen by ``seed``."""
    rng = np.random.default_rng(seed)
    return np.stack([np.stack([rng.choice(vocab_size, size=degree, replace=False) for _ in range(vocab_size)])
                     for _ in range(modes)])


def walk_examples(succ: np.ndarray, rng: np.random.Generator, n: int, length: int, switch: float = 0.0):
    """``n`` walks of ``length + 1`` nodes: x, y ``(n, length)``, mask all true. Each walk
    follows the graph of its hidden mode, which changes with probability ``switch`` per step."""
    M, V, deg = succ.shape
    seq = np.empty((n, length + 1), dtype=np.int64)
    seq[:, 0] = rng.integers(0, V, size=n)
    mode = rng.integers(0, M, size=n)
    for t in range(length):
        seq[:, t + 1] = succ[mode, seq[:, t], rng.integers(0, deg, size=n)]
        flip = rng.random(n) < switch
        mode = np.where(flip, rng.integers(0, M, size=n), mode)
    return seq[:, :-1], seq[:, 1:].copy(), np.ones((n, length), dtype=bool)


def _union(succ: np.ndarray) -> list[set[int]]:
    """Successors of each node under any mode."""
    return [set(succ[:, v].flatten().tolist()) for v in range(succ.shape[1])]


def shortest_path(succ: np.ndarray, start: int, goal: int) -> list[int]:
    """Nodes after ``start`` on a shortest path to ``goal`` over the edges of every mode
    (``[]`` if unreachable, equal, or ``start`` is no node of the graph)."""
    nxt = _union(succ)
    if not 0 <= start < len(nxt):
        return []
    prev = {start: -1}
    q = deque([start])
    while q:
        u = q.popleft()
        if u == goal:
            break
        for v in sorted(nxt[u]):
            if v not in prev:
                prev[v] = u
                q.append(v)
    if goal not in prev or goal == start:
        return []
    path = [goal]
    while prev[path[-1]] != start:
        path.append(prev[path[-1]])
    return path[::-1]


def at_distance(succ: np.ndarray, start: int, d: int, mode: int) -> list[int]:
    """Nodes at shortest distance exactly ``d`` from ``start`` within mode ``mode``'s graph
    and not reachable within ``d`` steps in any other mode's (only the right mode gets there)."""
    def ball(m: int) -> dict[int, int]:
        dist = {start: 0}
        q = deque([start])
        while q:
            u = q.popleft()
            if dist[u] == d:
                continue
            for v in succ[m, u].tolist():
                if v not in dist:
                    dist[v] = dist[u] + 1
                    q.append(v)
        return dist

    mine = ball(mode)
    others = set().union(*(ball(m) for m in range(succ.shape[0]) if m != mode)) if succ.shape[0] > 1 else set()
    return [v for v, k in mine.items() if k == d and v not in others]


class OracleSteerHook:
    """At every step, moves the state along the steepest descent (``sign`` +1; ascent for -1)
    of the loss of ``path_fn(row, last token)``, the tokens that should follow, by
    ``move_norm`` of its norm, injected at ``alpha``. The next token is already fixed by the
    logits the step produced, so the loss covers the path's tokens after its first."""

    def __init__(self, model, keys: list[str], path_fn, alpha: float, move_norm: float, sign: float,
                 prompt_last: Tensor) -> None:
        self.model, self.keys, self.path_fn = model, keys, path_fn
        self.alpha, self.move_norm, self.sign = alpha, move_norm, sign
        self.prompt_last = prompt_last.tolist()  # (B,) the last prompt token: generation's tokens start after it

    def __call__(self, sc: StepContext):
        if sc.finished:
            return None
        last = sc.tokens[:, -1].tolist() if sc.tokens.shape[1] else self.prompt_last
        rows = [self.path_fn(b, int(t)) for b, t in enumerate(last)]
        n = min(len(r) for r in rows)
        if n < 2:
            return None
        path = torch.tensor([r[:n] for r in rows], device=sc.logits.device)  # (B, n)
        st = {k: v.detach().clone().requires_grad_(k in self.keys) for k, v in sc.state.items()}
        with torch.enable_grad():
            lg, _, _ = self.model(path[:, :-1], st)  # (B, n-1, V): reading path[0], ... predicts path[1:]
            loss = F.cross_entropy(lg.flatten(0, 1).float(), path[:, 1:].flatten(), reduction="sum")
            grads = torch.autograd.grad(loss, [st[k] for k in self.keys])
        d = -self.sign * torch.cat([g.reshape(g.shape[0], -1).float() for g in grads], dim=1)  # (B, S)
        cur = torch.cat([sc.state[k].reshape(d.shape[0], -1).float() for k in self.keys], dim=1)  # (B, S)
        d = d * (self.move_norm * cur.norm(dim=1, keepdim=True) / d.norm(dim=1, keepdim=True).clamp_min(1e-12))
        new = dict(sc.state)
        i = 0
        for k in self.keys:
            m = sc.state[k][0].numel()
            new[k] = (sc.state[k].float() + self.alpha * d[:, i : i + m].view(sc.state[k].shape)).to(sc.state[k].dtype)
            i += m
        return new


class LookaheadTask(Task):
    kind = "lookahead"
    metrics = tuple(Metric(f"success_{s}", True, f"episodes solved, {s}") for s in SETTINGS) + (
        Metric("planned_minus_off", True, "paired success difference, gated planner against none"),
        Metric("forced_minus_random", True, "paired success difference, planned against matched random directions"),
        Metric("oracle_minus_off", True, "paired success difference, the oracle against none"),
    )
    primary = "planned_minus_off"

    def __init__(self, params: LookaheadParams) -> None:
        super().__init__(params)
        p = params
        self.succ = successor_graph(p.vocab_size, p.degree, p.graph_seed, p.modes)  # (M, V, degree)

    def spec_overrides(self) -> dict:
        return {**super().spec_overrides(), "train.seq_len": self.params.seq_len}

    def make_data(self, spec, seed: int):
        from statelab.data.synthetic import SyntheticData

        p = self.params
        return SyntheticData("lookahead", lambda rng, n: walk_examples(self.succ, rng, n, p.seq_len, p.switch),
                             vocab_size=p.vocab_size, example_len=p.seq_len, num_train=p.num_train,
                             num_val=p.episodes, seed=seed)

    # -- episodes ------------------------------------------------------------------
    def episodes(self, seed: int) -> tuple[Tensor, list[int]]:
        """Prompts ``(E, prompt_len)`` and goals of ``episodes`` episodes, from ``seed``."""
        p = self.params
        rng = np.random.default_rng([seed, 77])
        prompts, goals = [], []
        while len(goals) < p.episodes:
            # the prompt walks in one mode; the goal is only reachable in time through another
            mode = int(rng.integers(0, p.modes))
            x, _, _ = walk_examples(self.succ[mode : mode + 1], rng, 1, p.prompt_len)
            other = (mode + 1) % p.modes
            cands = at_distance(self.succ, int(x[0, -1]), p.distance, other)
            if not cands:
                continue
            prompts.append(x[0])
            goals.append(int(cands[rng.integers(0, len(cands))]))
        return torch.from_numpy(np.stack(prompts)), goals

    def score(self, prompts: Tensor, rows: list[list[int]], goals: list[int]) -> list[float]:
        """1.0 for a solved episode: the goal reached (or avoided) with every step an edge of the graph."""
        out = []
        for prompt, row, goal in zip(prompts.tolist(), rows, goals):
            seq = [prompt[-1], *row]
            nxt = _union(self.succ)
            legal = all(0 <= a < len(nxt) and b in nxt[a] for a, b in zip(seq[:-1], seq[1:]))
            hit = goal in row
            out.append(float(legal and (hit if self.params.mode == "reach" else not hit)))
        return out

    def run_setting(self, model, name: str, prompts: Tensor, goals: list[int], seed: int) -> list[float]:
        """Per-episode success of one setting, in episode order. Episodes run in batches that
        share a goal (the search's task reward is per token, the same for every row); each batch
        samples from its own seed, the same in every setting."""
        from statelab.generation import generate

        from crsm_planner.async_planner import PlanningHook
        from crsm_planner.controls import rescaled_plan, subspace_random_plan

        p = self.params
        planner = getattr(model, "planner", None)
        if name != "off" and planner is None:
            return []
        dev = next(model.parameters()).device
        sign = 1.0 if p.mode == "reach" else -1.0
        out = [0.0] * len(goals)
        for goal in sorted(set(goals)):
            idx = [i for i, g in enumerate(goals) if g == goal]
            for j in range(0, len(idx), p.batch_size):
                rows = idx[j : j + p.batch_size]
                forced = dict(alpha_fn=lambda a: torch.full_like(a, p.forced_alpha))
                hook = {
                    "off": lambda: None,
                    "planned": lambda: PlanningHook(planner, model, inline=True, plan_every=1),
                    "forced": lambda: PlanningHook(planner, model, inline=True, plan_every=1, **forced,
                                                   plan_fn=rescaled_plan(planner, planner.plan, p.move_norm)),
                    "random": lambda: PlanningHook(planner, model, inline=True, plan_every=1, **forced,
                                                   plan_fn=subspace_random_plan(planner, planner.plan, seed + rows[0],
                                                                                p.move_norm)),
                    "oracle": lambda: OracleSteerHook(model, planner.codec.keys, self._oracle_path(goal),
                                                      p.forced_alpha, p.move_norm, sign, prompts[rows, -1]),
                }[name]()
                if planner is not None:
                    planner.set_token_rewards({goal: sign * p.reward})
                try:
                    res = generate(model, prompts[rows].to(dev), max_new_tokens=p.horizon, use_planner=False,
                                   hooks=[hook] if hook is not None else [], seed=seed * 1_000_003 + rows[0],
                                   temperature=1.0)
                finally:
                    if planner is not None:
                        planner.set_token_rewards(None)
                for i, v in zip(rows, self.score(prompts[rows], res.tokens, [goal] * len(rows))):
                    out[i] = v
        return out

    def _oracle_path(self, goal: int):
        def path(b: int, token: int) -> list[int]:
            return shortest_path(self.succ, token, goal)

        return path

    def evaluate(self, model, data, ctx: TaskContext) -> TaskResult:
        was = model.training
        model.eval()
        try:
            prompts, goals = self.episodes(ctx.seed)
            succ = {name: self.run_setting(model, name, prompts, goals, ctx.seed) for name in SETTINGS}
        finally:
            model.train(was)
        metrics = {f"success_{k}": (sum(v) / len(v) if v else float("nan")) for k, v in succ.items()}
        for cand, base in (("planned", "off"), ("forced", "random"), ("oracle", "off"), ("forced", "off")):
            if succ[cand]:
                d = paired_difference(succ[cand], succ[base], higher_is_better=True)
                metrics[f"{cand}_minus_{base}"] = d.diff.mean
                metrics[f"{cand}_minus_{base}_low"], metrics[f"{cand}_minus_{base}_high"] = d.diff.low, d.diff.high
        return TaskResult(metrics, samples={f"success_{k}": v for k, v in succ.items() if v})


def build_lookahead(params: LookaheadParams, ctx) -> LookaheadTask:
    return LookaheadTask(params)
