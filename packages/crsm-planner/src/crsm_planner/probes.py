"""Probes of the planner: its effect on loss and samples, and the stability of injection.

``planner-effect``
    Per-row teacher-forced validation loss over ``seeds`` draws of windows, the planner inline
    (``sync_lag`` steps between snapshot and application, deterministic), in seven settings:
    ``off``; ``on`` (the planner as gated); and, injected at one fixed ``forced_alpha`` so that
    only the direction differs, the controls of :mod:`crsm_planner.controls`: ``planned``
    (the search's move), ``random`` (a random direction in the planner's own subspace, same
    length), ``stale`` (the planned target applied as an absolute target, not rebased),
    ``oracle`` (the positive control: steepest descent of the loss on the true next tokens,
    same length) and ``future`` (toward the state after reading the true next tokens).
    Every comparison (:attr:`PlannerEffectProbe.COMPARISONS`) is a paired difference over
    rows with a 95% interval (:func:`statelab.stats.paired_difference`), read as helps /
    hurts / no effect. Verdict: ``inactive`` (the gated run's mean alpha is below
    ``min_alpha``), ``helps`` (on beats off and the planned direction beats the matched
    random one), ``hurts`` (on is worse than off) or ``no effect``; ``verdicts`` in
    ``metrics.json`` adds ``forced`` (the same rule at the forced alpha), ``oracle`` and
    ``rebase``. Beside them: the latent world model's one- and k-step error against the copy
    predictor and its explained variance on validation windows (``world_model/*``); optionally
    (``samples``) sample statistics and tokens/s off, on and random.

``injection-stability``
    ``steps`` consecutive generation steps with an injection at every step (planner
    target, gate floored at ``min_alpha``; random targets of the state's norm when the
    model has no planner): passes when no state or logit is ever non-finite, every token
    is valid, and the largest state norm stays within ``norm_factor`` times that of the
    same generation without injection. Beside the norms: the teacher-forced validation loss
    with an injection at every step against none (paired over windows), and the coherence of
    the samples (their loss under the un-injected model, their repetition);
    ``max_loss_increase`` turns the loss into a criterion.
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

from statelab.stats import BETTER, NO_DIFFERENCE, WORSE, paired_difference

from crsm_planner.async_planner import PlanningHook
from crsm_planner.controls import future_state_plan, oracle_plan, rescaled_plan, subspace_random_plan
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
def teacher_forced_loss(model, x: Tensor, hook: PlanningHook | None) -> Tensor:
    """Per-row mean next-token loss ``(B,)`` over ``x (B, T)``, decoding step by step with the
    hook between steps."""
    state = model.init_state(x.shape[0], x.device)
    gid = next(_probe_ids)
    losses = []
    for t in range(x.shape[1] - 1):
        logits, state, _ = model.step(x[:, t], state)  # (B, V)
        losses.append(F.cross_entropy(logits.float(), x[:, t + 1], reduction="none"))  # (B,)
        if hook is not None:
            sc = StepContext(model=model, step=t, generation_id=gid, tokens=x[:, : t + 1], logits=logits, state=state)
            new = hook(sc)
            state = new if new is not None else state
    if hook is not None:
        hook(StepContext(model=model, step=x.shape[1] - 1, generation_id=gid, tokens=x, logits=logits, state=state,
                         finished=True))
    return torch.stack(losses, 1).mean(1)  # (B,)


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


_WORDS = {BETTER: "helps", WORSE: "hurts", NO_DIFFERENCE: "no effect"}


class PlannerEffectProbe(Probe):
    #: teacher-forced settings: gated ones first, then the controls forced to ``forced_alpha``
    SETTINGS = ("off", "on", "planned", "random", "stale", "oracle", "future")
    #: (candidate, baseline) pairs reported as paired differences of per-row loss
    COMPARISONS = (("on", "off"), ("planned", "off"), ("random", "off"), ("stale", "off"), ("oracle", "off"),
                   ("future", "off"), ("planned", "random"), ("planned", "stale"), ("oracle", "planned"))

    def __init__(self, params: PlannerEffectParams) -> None:
        self.p = params
        self.verdicts: dict[str, str] = {}  # of the last run: forced, oracle, rebase (also in metrics.json)

    def _hook(self, name: str, planner, model, x: Tensor, seed: int) -> PlanningHook | None:
        p = self.p
        if name == "off":
            return None
        if name == "on":
            return PlanningHook(planner, model, inline=True)
        lag, h, norm = planner.params.sync_lag, p.oracle_horizon, p.control_norm
        plan_fn = {
            "planned": lambda: rescaled_plan(planner, planner.plan, norm),
            "stale": lambda: rescaled_plan(planner, planner.plan, norm),
            "random": lambda: subspace_random_plan(planner, planner.plan, seed, norm),
            "oracle": lambda: oracle_plan(planner, planner.plan, x, lag=lag, horizon=h, norm=norm),
            "future": lambda: future_state_plan(planner, planner.plan, x, lag=lag, horizon=h, norm=norm),
        }[name]()
        return PlanningHook(planner, model, inline=True, plan_fn=plan_fn,
                            alpha_fn=lambda a: torch.full_like(a, p.forced_alpha),
                            target_frame="snapshot" if name == "stale" else None)

    def losses(self, model, val: Tensor, seed: int) -> tuple[dict[str, dict[tuple, float]], float]:
        """Per-row teacher-forced loss of every setting, keyed ``(seed, seed_index, batch, row)``,
        and the mean applied alpha of the gated run."""
        p = self.p
        planner = model.planner
        dev = next(model.parameters()).device
        rows: dict[str, dict[tuple, float]] = {name: {} for name in self.SETTINGS}
        alphas = []
        for si in range(p.seeds):
            g = torch.Generator().manual_seed(seed * 1_000_003 + si)
            for b in range(p.loss_batches):
                x = _windows(val, p.batch_size, p.seq_len, g).to(dev)
                for name in self.SETTINGS:
                    hook = self._hook(name, planner, model, x, seed * 1_000_003 + si * 1009 + b)
                    loss = teacher_forced_loss(model, x, hook)
                    rows[name].update({(seed, si, b, r): v for r, v in enumerate(loss.tolist())})
                    if name == "on":
                        alphas.append(hook.stats.get("mean_alpha", 0.0))
        return rows, sum(alphas) / len(alphas)

    def run(self, model, ctx: ProbeContext) -> ProbeResult:
        p = self.p
        planner = getattr(model, "planner", None)
        if planner is None:
            raise ValueError("planner-effect needs a model with a planner "
                             "(set model.planner in the spec, e.g. kind: mcts)")
        val = _val_tokens(ctx, "planner-effect", max(p.seq_len, p.prompt_len) + 1)
        was = model.training
        model.eval()
        try:
            rows, mean_alpha = self.losses(model, val, ctx.seed)
            metrics: dict[str, float] = {"loss_mean_alpha_on": mean_alpha, "forced_alpha": p.forced_alpha,
                                         "rows": float(len(rows["off"]))}
            metrics.update(self._world_model(model, planner, val, ctx.seed))
            for name, r in rows.items():
                metrics[f"val_loss_{name}"] = sum(r.values()) / len(r)
            comparisons = {}
            for cand, base in self.COMPARISONS:
                d = paired_difference(rows[cand], rows[base], higher_is_better=False)
                comparisons[f"{cand}_minus_{base}"] = {**d.diff.to_dict(), "verdict": d.verdict, "word": _WORDS[d.verdict]}
                metrics.update({f"{cand}_minus_{base}": d.diff.mean, f"{cand}_minus_{base}_low": d.diff.low,
                                f"{cand}_minus_{base}_high": d.diff.high})
            word = {k: v["word"] for k, v in comparisons.items()}
            verdicts = {
                # the controls, at one alpha: does the search's direction beat the matched random one and no steering?
                "forced": self._verdict(word["planned_minus_off"], word["planned_minus_random"]),
                "oracle": word["oracle_minus_off"],
                "rebase": word["planned_minus_stale"],  # "helps": rebased plans beat the same plans applied stale
            }
            verdict = ("inactive" if mean_alpha < p.min_alpha
                       else self._verdict(word["on_minus_off"], word["planned_minus_random"]))
            if p.samples:
                metrics.update(self._samples(model, planner, val, ctx))
            artifacts = {}
            if ctx.out_dir is not None:
                out = Path(ctx.out_dir)
                report = {**metrics, "verdict": verdict, "verdicts": verdicts, "comparisons": comparisons}
                _atomic_write(out / "metrics.json", json.dumps(report, indent=2))
                artifacts["metrics"] = out / "metrics.json"
                if p.samples:
                    artifacts["samples"] = out / "samples.md"
            self.verdicts = verdicts
            return ProbeResult(metrics, verdict=verdict, passed=None, artifacts=artifacts)
        finally:
            model.train(was)

    def _world_model(self, model, planner, val: Tensor, seed: int) -> dict[str, float]:
        """The latent world model on validation windows: one- and k-step state errors against the
        "state unchanged" (copy) predictor, the explained variance of the state change, the codec's
        reconstruction, the value head's correlation (:meth:`MCTSPlanner._losses`)."""
        p = self.p
        need = max(planner.params.value_horizon, planner.params.fit_multistep) + 2
        if not planner.fitted.item() or p.seq_len < need:
            return {}
        g = torch.Generator().manual_seed(seed * 1_000_003 + 99)
        x = _windows(val, p.batch_size, p.seq_len, g).to(next(model.parameters()).device)
        _, m = planner._losses(model, planner.rollout(model, x), metrics=True)
        keep = ("dyn/one_step_ratio", "dyn/k_step_ratio", "dyn/one_step_explained_variance",
                "dyn/k_step_explained_variance", "dyn/recon_explained_variance", "dyn/k", "value/corr")
        return {f"world_model/{k.split('/', 1)[1]}" if k.startswith("dyn/") else k: m[k] for k in keep}

    @staticmethod
    def _verdict(against_off: str, against_random: str) -> str:
        """helps: better than no steering and than the matched random direction; hurts: worse than
        no steering; otherwise no effect."""
        if against_off == "helps" and against_random == "helps":
            return "helps"
        return "hurts" if against_off == "hurts" else "no effect"

    def _samples(self, model, planner, val: Tensor, ctx: ProbeContext) -> dict[str, float]:
        """Samples off / on / matched random (the planner as configured, asynchronous by
        default): their statistics, tokens/s and the plans' bookkeeping."""
        from statelab.generation import generate

        p = self.p
        g = torch.Generator().manual_seed(ctx.seed + 7)
        prompts = _windows(val, p.batch_size, p.prompt_len, g)
        kw = dict(max_new_tokens=p.new_tokens, temperature=p.temperature, top_k=p.top_k, seed=ctx.seed)
        generate(model, prompts[:, : min(4, p.prompt_len)], max_new_tokens=4, use_planner=False)  # warm-up
        rnd = subspace_random_plan(planner, planner.plan, ctx.seed + 1)
        runs = {
            "off": generate(model, prompts, use_planner=False, **kw),
            "on": generate(model, prompts, use_planner=True, **kw),
            "random": generate(model, prompts, use_planner=False, **kw, hooks=[PlanningHook(planner, model,
                                                                                            plan_fn=rnd)]),
        }
        metrics: dict[str, float] = {}
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
        if ctx.out_dir is not None:
            lines = ["# planner-effect samples", ""]
            tok = ctx.tokenizer
            for name, r in runs.items():
                lines += [f"## planner {name}", ""]
                for row in r.tokens:
                    text = tok.decode(row) if tok is not None else " ".join(map(str, row))
                    lines += ["```", text, "```", ""]
            _atomic_write(Path(ctx.out_dir) / "samples.md", "\n".join(lines))
        return metrics


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
            ref_run = generate(model, prompts, hooks=[recorder(ref_log)], **kw)  # also the samples for coherence
            planner = getattr(model, "planner", None)

            def forced_hook():
                if planner is None:
                    return RandomInjectionHook(model, p.min_alpha, ctx.seed)
                h = PlanningHook(planner, model, inline=True, plan_every=1, simulations=p.simulations,
                                 alpha_fn=lambda a: a.clamp_min(p.min_alpha))
                h.sync_lag = 1
                return h

            hook = forced_hook()
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
            quality = self._quality(model, ctx, g, prompts, ref_run.tokens, None if error else run.tokens, forced_hook)
            if p.max_loss_increase is not None and quality.get("loss_increase") is not None:
                passed = passed and quality["loss_increase"] <= p.max_loss_increase
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
                **quality,
            }
            artifacts = {}
            if error and ctx.out_dir is not None:
                _atomic_write(Path(ctx.out_dir) / "error.txt", error)
                artifacts["error"] = Path(ctx.out_dir) / "error.txt"
            return ProbeResult(metrics, verdict="stable" if passed else "unstable", passed=passed, artifacts=artifacts)
        finally:
            model.train(was)


    def _quality(self, model, ctx: ProbeContext, g: torch.Generator, prompts: Tensor, plain: list[list[int]],
                 injected: list[list[int]] | None, forced_hook: Callable[[], Any]) -> dict[str, float]:
        """Does the text survive forced injection? Teacher-forced validation loss with an
        injection at every step against none (same windows), and the coherence of the samples:
        their mean next-token loss scored by the model without injection (a state pushed off
        its manifold tends to emit text the model itself finds unlikely) and their repetition."""
        p = self.p
        out: dict[str, float] = {}
        if p.loss_rows and ctx.val_tokens is not None and ctx.val_tokens.numel() > p.loss_seq_len + 1:
            x = _windows(ctx.val_tokens.flatten().long(), p.loss_rows, p.loss_seq_len, g)
            none = teacher_forced_loss(model, x, None)  # (R,)
            forced = teacher_forced_loss(model, x, forced_hook())  # (R,)
            d = paired_difference(forced.tolist(), none.tolist(), higher_is_better=False)
            out.update(val_loss_none=none.mean().item(), val_loss_injected=forced.mean().item(),
                       loss_increase=d.diff.mean, loss_increase_low=d.diff.low, loss_increase_high=d.diff.high)
        for name, samples in (("none", plain), ("injected", injected)):
            if samples is None:
                continue
            x = torch.cat([prompts, torch.tensor(samples, dtype=torch.long)], dim=1)  # (B, P + steps)
            with torch.no_grad():
                logits, _, _ = model(x[:, :-1])
            out[f"sample_nll_{name}"] = F.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten()).item()
            out[f"rep_rate_{name}"] = sample_stats(samples)["rep_rate"]
        return out


def build_planner_effect(params: PlannerEffectParams, ctx) -> PlannerEffectProbe:
    return PlannerEffectProbe(params)


def build_injection_stability(params: InjectionStabilityParams, ctx) -> InjectionStabilityProbe:
    return InjectionStabilityProbe(params)
