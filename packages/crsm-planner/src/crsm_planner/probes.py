"""Probes of the planner: its effect on loss and samples, and the stability of injection.

``planner-effect``
    Teacher-forced validation loss with the planner off, on, and with *random injections
    of the same norm* (same timing, same gate, a random direction instead of the planned
    one: the honest ablation), sample statistics (distinct-n, repetition rate) of
    generations from validation prompts under the three settings, tokens/s off and on (the
    planner as configured, asynchronous by default) and the mean lag of applied results.
    The loss is measured with the planner inline (``sync_lag`` steps between snapshot and
    application) so that it is deterministic. Verdict: ``inactive`` (the mean applied alpha
    is below ``min_alpha``: the gate let almost nothing through, so the comparison cannot
    say whether the plans are any good), ``helps`` (on beats off and random by more than the
    tolerance), ``hurts`` (on is worse than off by more than it) or ``no effect``.
    Apart from the gate, the planned and the random targets are also scored injected at a
    fixed ``forced_alpha`` (``val_loss_on_forced``, ``val_loss_random_forced``): a negative
    ``forced_planned_minus_random`` means the search's directions lower the loss more than
    random directions of the same norm do.

``injection-stability``
    ``steps`` consecutive generation steps with an injection at every step (planner
    target, gate floored at ``min_alpha``; random targets of the state's norm when the
    model has no planner): passes when no state or logit is ever non-finite, every token
    is valid, and the largest state norm stays within ``norm_factor`` times that of the
    same generation without injection.
"""

from __future__ import annotations

import itertools
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor
from torch.nn import functional as F

from statelab.interfaces import (PlanRequest, PlanResult, Probe, ProbeContext, ProbeResult, StepContext, prefix_state,
                                 unprefix_state)

from crsm_planner.async_planner import PlanningHook
from crsm_planner.planner_params import InjectionStabilityParams, PlannerEffectParams

# ids of the probes' own teacher-forced passes: negative, never equal to statelab.generate's
_probe_ids = itertools.count(-1, -1)


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _val_tokens(ctx: ProbeContext, what: str, need: int) -> Tensor:
    if ctx.val_tokens is None:
        raise ValueError(f"{what} needs validation tokens (ProbeContext.val_tokens); run it through `statelab train` "
                         "or `statelab probe` with a data section")
    v = ctx.val_tokens.flatten().long()
    if v.numel() < need:
        raise ValueError(f"{what} needs at least {need} validation tokens, got {v.numel()}; lower seq_len/prompt_len")
    return v


def _windows(tokens: Tensor, n: int, length: int, g: torch.Generator) -> Tensor:
    i = torch.randint(0, tokens.numel() - length, (n,), generator=g)
    return torch.stack([tokens[j : j + length] for j in i.tolist()])  # (n, length)


def random_direction_plan(plan_fn: Callable[[Any, PlanRequest], PlanResult], seed: int):
    """Wrap a plan function: same gate and timing, but each target is the snapshot moved by a
    random direction with the norm of the planned move (per key and row)."""
    g = torch.Generator().manual_seed(seed)

    def plan(model, request: PlanRequest) -> PlanResult:
        r = plan_fn(model, request)
        target = {}
        for k, t in r.target.items():
            s = request.state[k]
            d = (t - s).float()
            noise = torch.randn(d.shape, generator=g).to(d.device)
            dims = tuple(range(1, d.dim()))
            # vector norms over every non-batch dim (Tensor.norm treats a 3-tuple as a matrix norm)
            scale = torch.linalg.vector_norm(d, dim=dims, keepdim=True) / torch.linalg.vector_norm(
                noise, dim=dims, keepdim=True).clamp_min(1e-12)
            target[k] = (s.float() + noise * scale).to(s.dtype)
        info = {k: v for k, v in r.info.items() if k != "target_flat"}  # that was the planned target
        return PlanResult(target, r.confidence, r.alpha, r.step, r.generation_id, info)

    return plan


@torch.no_grad()
def teacher_forced_loss(model, x: Tensor, hook: PlanningHook | None) -> float:
    """Mean next-token loss over ``x (B, T)``, decoding step by step with the hook between steps."""
    state = model.init_state(x.shape[0], x.device)
    gid = next(_probe_ids)
    losses = []
    for t in range(x.shape[1] - 1):
        logits, state, _ = model.step(x[:, t], state)  # (B, V)
        losses.append(F.cross_entropy(logits.float(), x[:, t + 1]))
        if hook is not None:
            sc = StepContext(model=model, step=t, generation_id=gid, tokens=x[:, : t + 1], logits=logits, state=state)
            new = hook(sc)
            state = new if new is not None else state
    if hook is not None:
        hook(StepContext(model=model, step=x.shape[1] - 1, generation_id=gid, tokens=x, logits=logits, state=state,
                         finished=True))
    return torch.stack(losses).mean().item()


def sample_stats(samples: list[list[int]]) -> dict[str, float]:
    """distinct-1/2/3 (unique n-grams over all n-grams, per sample, averaged) and the repetition
    rate (fraction of 4-grams that already occurred earlier in the same sample)."""
    out: dict[str, float] = {}
    for n in (1, 2, 3):
        vals = []
        for s in samples:
            grams = [tuple(s[i : i + n]) for i in range(len(s) - n + 1)]
            if grams:
                vals.append(len(set(grams)) / len(grams))
        out[f"distinct_{n}"] = sum(vals) / len(vals) if vals else float("nan")
    reps = []
    for s in samples:
        seen: set[tuple[int, ...]] = set()
        grams = [tuple(s[i : i + 4]) for i in range(len(s) - 3)]
        if not grams:
            continue
        r = 0
        for gm in grams:
            r += gm in seen
            seen.add(gm)
        reps.append(r / len(grams))
    out["rep_rate"] = sum(reps) / len(reps) if reps else float("nan")
    return out


class PlannerEffectProbe(Probe):
    def __init__(self, params: PlannerEffectParams) -> None:
        self.p = params

    def run(self, model, ctx: ProbeContext) -> ProbeResult:
        from statelab.generation import generate

        p = self.p
        planner = getattr(model, "planner", None)
        if planner is None:
            raise ValueError("planner-effect needs a model with a planner "
                             "(set model.planner in the spec, e.g. kind: mcts)")
        val = _val_tokens(ctx, "planner-effect", max(p.seq_len, p.prompt_len) + 1)
        was = model.training
        model.eval()
        dev = next(model.parameters()).device
        g = torch.Generator().manual_seed(ctx.seed)
        try:
            metrics: dict[str, float] = {}
            # -- teacher-forced loss: off / on / random, inline so it is deterministic --------
            batches = [_windows(val, p.batch_size, p.seq_len, g).to(dev) for _ in range(p.loss_batches)]
            plan_fn = planner.plan
            settings = {
                "off": lambda: None,
                "on": lambda: PlanningHook(planner, model, inline=True),
                "random": lambda: PlanningHook(planner, model, inline=True,
                                               plan_fn=random_direction_plan(plan_fn, ctx.seed)),
            }
            if p.forced_alpha > 0:  # the same plans and random directions, the gate bypassed
                def forced(a: Tensor) -> Tensor:
                    return torch.full_like(a, p.forced_alpha)

                settings["on_forced"] = lambda: PlanningHook(planner, model, inline=True, alpha_fn=forced)
                settings["random_forced"] = lambda: PlanningHook(
                    planner, model, inline=True, plan_fn=random_direction_plan(plan_fn, ctx.seed), alpha_fn=forced)
            hooks_used = {}
            for name, make in settings.items():
                losses = []
                for x in batches:
                    hook = make()
                    losses.append(teacher_forced_loss(model, x, hook))
                    hooks_used[name] = hook
                metrics[f"val_loss_{name}"] = sum(losses) / len(losses)
            metrics["loss_delta_on"] = metrics["val_loss_on"] - metrics["val_loss_off"]
            metrics["loss_delta_random"] = metrics["val_loss_random"] - metrics["val_loss_off"]
            if hooks_used["on"] is not None:
                metrics["loss_mean_alpha_on"] = hooks_used["on"].stats.get("mean_alpha", 0.0)
            if p.forced_alpha > 0:
                metrics["forced_alpha"] = p.forced_alpha
                metrics["loss_delta_on_forced"] = metrics["val_loss_on_forced"] - metrics["val_loss_off"]
                metrics["loss_delta_random_forced"] = metrics["val_loss_random_forced"] - metrics["val_loss_off"]
                metrics["forced_planned_minus_random"] = (metrics["val_loss_on_forced"]
                                                          - metrics["val_loss_random_forced"])
            # -- samples and speed: the planner as configured (asynchronous by default) ------
            prompts = _windows(val, p.batch_size, p.prompt_len, g)
            kw = dict(max_new_tokens=p.new_tokens, temperature=p.temperature, top_k=p.top_k, seed=ctx.seed)
            generate(model, prompts[:, : min(4, p.prompt_len)], max_new_tokens=4, use_planner=False)  # warm-up
            runs = {
                "off": generate(model, prompts, use_planner=False, **kw),
                "on": generate(model, prompts, use_planner=True, **kw),
                "random": generate(model, prompts, use_planner=False, **kw,
                                   hooks=[PlanningHook(planner, model,
                                                       plan_fn=random_direction_plan(plan_fn, ctx.seed + 1))]),
            }
            for name, r in runs.items():
                for k, v in sample_stats(r.tokens).items():
                    metrics[f"{k}_{name}"] = v
            on_stats = runs["on"].stats
            metrics["tokens_per_s_off"] = runs["off"].stats["tokens_per_s"]
            metrics["tokens_per_s_on"] = on_stats["tokens_per_s"]
            metrics["speed_ratio"] = metrics["tokens_per_s_on"] / max(metrics["tokens_per_s_off"], 1e-12)
            for k in ("requested", "applied", "dropped_stale", "dropped_foreign", "skipped_busy", "mean_lag",
                      "mean_alpha"):
                metrics[f"plans_{k}"] = float(on_stats.get(f"planner.{k}", float("nan")))
            rel = metrics["loss_delta_on"] / max(abs(metrics["val_loss_off"]), 1e-12)
            if metrics.get("loss_mean_alpha_on", 0.0) < p.min_alpha:
                verdict = "inactive"
            elif rel < -p.tolerance and metrics["val_loss_on"] < metrics["val_loss_random"]:
                verdict = "helps"
            elif rel > p.tolerance:
                verdict = "hurts"
            else:
                verdict = "no effect"
            artifacts = {}
            if ctx.out_dir is not None:
                out = Path(ctx.out_dir)
                lines = ["# planner-effect samples", ""]
                tok = ctx.tokenizer
                for name, r in runs.items():
                    lines += [f"## planner {name}", ""]
                    for row in r.tokens:
                        text = tok.decode(row) if tok is not None else " ".join(map(str, row))
                        lines += ["```", text, "```", ""]
                _atomic_write(out / "samples.md", "\n".join(lines))
                _atomic_write(out / "metrics.json", json.dumps({**metrics, "verdict": verdict}, indent=2))
                artifacts = {"samples": out / "samples.md", "metrics": out / "metrics.json"}
            return ProbeResult(metrics, verdict=verdict, passed=None, artifacts=artifacts)
        finally:
            model.train(was)


class RandomInjectionHook:
    """Without a planner: inject a random target with each entry's own norm at every step."""

    def __init__(self, model, alpha: float, seed: int) -> None:
        self.model, self.alpha = model, alpha
        self.g = torch.Generator().manual_seed(seed)
        self.stats = {"applied": 0.0, "mean_alpha": alpha}

    def __call__(self, sc: StepContext):
        if sc.finished:
            return None
        bb = unprefix_state("backbone", sc.state)
        target = {}
        for k in self.model.backbone.injectable_keys():
            s = bb[k]
            noise = torch.randn(s.shape, generator=self.g).to(s.device)
            dims = tuple(range(1, s.dim()))
            scale = torch.linalg.vector_norm(s.float(), dim=dims, keepdim=True) / torch.linalg.vector_norm(
                noise, dim=dims, keepdim=True)
            target[k] = (noise * scale).to(s.dtype)
        state = dict(sc.state)
        state.update(prefix_state("backbone", self.model.backbone.inject(bb, target, self.alpha)))
        self.stats["applied"] += 1
        return state


class InjectionStabilityProbe(Probe):
    def __init__(self, params: InjectionStabilityParams) -> None:
        self.p = params

    def run(self, model, ctx: ProbeContext) -> ProbeResult:
        from statelab.generation import generate

        p = self.p
        if not model.backbone.injectable_keys():
            raise ValueError(f"injection-stability needs a steerable backbone; {type(model.backbone).__name__} has no "
                             "injectable state")
        was = model.training
        model.eval()
        g = torch.Generator().manual_seed(ctx.seed)
        V = model.vocab_size
        if ctx.val_tokens is not None and ctx.val_tokens.numel() > 9:
            prompts = _windows(ctx.val_tokens.flatten().long(), p.batch_size, 8, g)
        else:
            prompts = torch.randint(0, V, (p.batch_size, 8), generator=g)
        keys = [f"backbone.{k}" for k in model.backbone.injectable_keys()]
        try:
            def recorder(log: dict[str, Any]):
                def hook(sc: StepContext):
                    norms = torch.stack([sc.state[k].float().flatten(1).norm(dim=1) for k in keys])  # (keys, B)
                    log["max_norm"] = max(log["max_norm"], norms.max().item())
                    finite = all(bool(torch.isfinite(sc.state[k]).all()) for k in keys)
                    finite = finite and bool(torch.isfinite(sc.logits).all())
                    log["nonfinite_steps"] += 0 if finite else 1
                    log["steps"] += 1
                return hook

            kw = dict(max_new_tokens=p.steps, seed=ctx.seed, use_planner=False)
            t0 = time.perf_counter()
            ref_log = {"max_norm": 0.0, "nonfinite_steps": 0, "steps": 0}
            generate(model, prompts, hooks=[recorder(ref_log)], **kw)
            planner = getattr(model, "planner", None)
            if planner is not None:
                hook = PlanningHook(planner, model, inline=True, plan_every=1, simulations=p.simulations,
                                    alpha_fn=lambda a: a.clamp_min(p.min_alpha))
                hook.sync_lag = 1
            else:
                hook = RandomInjectionHook(model, p.min_alpha, ctx.seed)
            inj_log = {"max_norm": 0.0, "nonfinite_steps": 0, "steps": 0}
            error = ""
            try:
                run = generate(model, prompts, hooks=[hook, recorder(inj_log)], **kw)
                toks = [t for row in run.tokens for t in row]
            except RuntimeError as e:  # e.g. sampling from non-finite logits
                error, toks = str(e), []
                inj_log["nonfinite_steps"] += 1
            elapsed = time.perf_counter() - t0
            invalid = sum(1 for t in toks if not 0 <= t < V)
            bound = p.norm_factor * max(ref_log["max_norm"], 1e-6)
            injections = hook.stats["applied"]
            passed = (inj_log["nonfinite_steps"] == 0 and invalid == 0 and inj_log["max_norm"] <= bound
                      and injections >= p.steps - 1 and len(toks) == p.batch_size * p.steps and not error)
            passed = bool(passed)
            metrics = {
                "injections": float(injections),
                "steps": float(p.steps),
                "max_state_norm": inj_log["max_norm"],
                "max_state_norm_no_injection": ref_log["max_norm"],
                "norm_ratio": inj_log["max_norm"] / max(ref_log["max_norm"], 1e-12),
                "nonfinite_steps": float(inj_log["nonfinite_steps"]),
                "invalid_tokens": float(invalid),
                "mean_alpha": hook.stats.get("mean_alpha", 0.0),
                "elapsed_s": elapsed,
            }
            artifacts = {}
            if error and ctx.out_dir is not None:
                _atomic_write(Path(ctx.out_dir) / "error.txt", error)
                artifacts["error"] = Path(ctx.out_dir) / "error.txt"
            return ProbeResult(metrics, verdict="stable" if passed else "unstable", passed=passed, artifacts=artifacts)
        finally:
            model.train(was)


def build_planner_effect(params: PlannerEffectParams, ctx) -> PlannerEffectProbe:
    return PlannerEffectProbe(params)


def build_injection_stability(params: InjectionStabilityParams, ctx) -> InjectionStabilityProbe:
    return InjectionStabilityProbe(params)
