"""Three separate verdicts about one element of a named internal (the `verdicts` probe).

The old question "is R causal?" mixes three claims; each gets its own test and verdict:

* **on the path** -- an intervention changes the output. The element (for ``kssm.R``
  ``[0, 0]``: the whole population, harmonic 1) is forced to in-distribution values (by
  default its own 10% and 90% quantiles on the same data) and the KL divergence between the
  clean and forced next-token distributions is measured per batch; the verdict is read off
  the interval over batches (``on the path`` when its lower end exceeds ``min_kl``), never
  off a permutation p-value, which sits at its floor for any deterministic model.
* **functional** -- the model *uses* it. The element is set to its mean or shuffled across
  positions or rows, and the loss change per batch is compared, paired by batch, with the
  same ablation on an **untrained model of the same spec** (an untrained network also
  "depends" on everything on its path). ``functional`` when for some mode the trained loss
  rises by more than ``min_delta_loss`` with an interval above 0 and above the null's.
* **varies** -- it moves beyond a null. For ``kssm.R`` the null is random phases of the
  element's group size (:mod:`kssm_oscillators.rnull`, verdict ``at null`` at the incoherent
  level); for any other internal it is the same element in the untrained model.

Forcing one element uses :func:`statelab.intervene` with a function that rewrites that
slice only; every site (layer) is judged separately.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from statelab import stats
from statelab.ablate import untrained_like
from statelab.interfaces import Probe, ProbeContext, ProbeResult
from statelab.internals import intervene, key_name

from kssm_oscillators.probing import eval_mode, model_device, pick, windows, write_text
from kssm_oscillators.rnull import compare_to_null, group_size

ON_PATH, OFF_PATH = "on the path", "off the path"
FUNCTIONAL, NOT_FUNCTIONAL = "functional", "not functional"
MODES = ("mean", "shuffle-positions", "shuffle-rows")


def _index(element: Sequence[int] | None) -> tuple:
    return (Ellipsis,) if element is None else (slice(None), slice(None), *element)


def read_element(v: Tensor, element: Sequence[int] | None) -> Tensor:
    """The element of an internal ``(B, T, ...)`` as ``(B, T)`` (``None``: all trailing dims, flattened
    into ``(B, T * E)``)."""
    if element is not None and v.dim() != 2 + len(element):
        raise ValueError(f"element {list(element)} needs an internal of {2 + len(element)} dims (B, T, ...), "
                         f"got shape {tuple(v.shape)}")
    out = v[_index(element)].detach().float()
    return out.reshape(v.shape[0], -1) if element is None else out


def force_element(element: Sequence[int] | None, fn: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """A forcing for :func:`statelab.intervene` that replaces only ``v[:, :, *element]`` by ``fn(that slice)``."""
    idx = _index(element)

    def forcing(v: Tensor) -> Tensor:
        out = v.clone()
        out[idx] = fn(v[idx]).to(v.dtype)
        return out

    return forcing


def _losses(logits: Tensor, y: Tensor) -> tuple[float, Tensor]:
    logp = F.log_softmax(logits.float(), -1)  # (B, T, V)
    return float(F.nll_loss(logp.flatten(0, 1), y.reshape(-1))), logp


@torch.no_grad()
def _natural(model, batches, internal: str, element) -> dict[str, list[Tensor]]:
    """Site -> per batch the element's values ``(B, T)`` on clean inputs."""
    out: dict[str, list[Tensor]] = {}
    for x, _ in batches:
        _, _, aux = model(x)
        for k, v in pick(aux, internal).items():
            out.setdefault(k, []).append(read_element(v, element).cpu())
    return out


def _shuffle_positions(gen: torch.Generator) -> Callable[[Tensor], Tensor]:
    def f(v: Tensor) -> Tensor:  # (B, T, ...): each row's positions permuted
        perm = torch.rand(v.shape[0], v.shape[1], generator=gen).argsort(1).to(v.device)
        return v.gather(1, perm.view(*perm.shape, *([1] * (v.dim() - 2))).expand_as(v))
    return f


def _shuffle_rows(v: Tensor) -> Tensor:  # every row gets another row's values
    if v.shape[0] < 2:
        raise ValueError("shuffle-rows needs batch_size >= 2")
    return v.roll(1, 0)


@torch.no_grad()
def _ablation_deltas(model, batches, key: str, element, mode: str, mean: float, seed: int) -> list[float]:
    gen = torch.Generator().manual_seed(seed)
    fn = {"mean": lambda v: torch.full_like(v, mean), "shuffle-positions": _shuffle_positions(gen),
          "shuffle-rows": _shuffle_rows}[mode]
    deltas = []
    for x, y in batches:
        clean, _ = _losses(model(x)[0], y)
        with intervene({key: force_element(element, fn)}):
            forced, _ = _losses(model(x)[0], y)
        deltas.append(forced - clean)
    return deltas


@dataclass
class SiteVerdicts:
    """The three verdicts of one site, with the numbers behind them."""

    site: str
    on_path: str
    kl: stats.Interval
    forced_values: tuple[float, ...]
    functional: str
    delta_loss: dict[str, stats.Interval] = field(default_factory=dict)
    null_delta_loss: dict[str, stats.Interval] = field(default_factory=dict)
    versus_null: dict[str, stats.PairedDifference] = field(default_factory=dict)
    varies: str = ""
    varies_detail: dict = field(default_factory=dict)

    def metrics(self, prefix: str) -> dict[str, float]:
        out = {f"{prefix}kl": self.kl.mean, f"{prefix}kl_low": self.kl.low, f"{prefix}kl_high": self.kl.high,
               f"{prefix}on_path": float(self.on_path == ON_PATH), f"{prefix}functional": float(self.functional == FUNCTIONAL)}
        for mode, iv in self.delta_loss.items():
            out[f"{prefix}{mode}.delta_loss"], out[f"{prefix}{mode}.delta_loss_low"] = iv.mean, iv.low
            out[f"{prefix}{mode}.delta_loss_high"] = iv.high
        for mode, d in self.versus_null.items():
            out[f"{prefix}{mode}.vs_null"], out[f"{prefix}{mode}.vs_null_low"] = d.diff.mean, d.diff.low
            out[f"{prefix}{mode}.vs_null_high"] = d.diff.high
        for k, v in self.varies_detail.items():
            if isinstance(v, (int, float)):
                out[f"{prefix}{k}"] = float(v)
        return out

    def lines(self) -> list[str]:
        out = [f"### {self.site}", "",
               f"- on the path: **{self.on_path}**, KL at forced values {', '.join(f'{v:.4g}' for v in self.forced_values)}: "
               f"{self.kl.format(5)} nats",
               f"- functional: **{self.functional}**"]
        for mode, iv in self.delta_loss.items():
            n, d = self.null_delta_loss.get(mode), self.versus_null.get(mode)
            out.append(f"  - {mode}: loss change {iv.format(4)}; untrained {n.format(4) if n else '-'}; "
                       f"trained - untrained {d.format(4) if d else '-'}")
        out.append(f"- varies: **{self.varies}**")
        for k, v in self.varies_detail.items():
            out.append(f"  - {k}: {v:.4g}" if isinstance(v, float) else f"  - {k}: {v}")
        return out + [""]


def judge(model, batches: Sequence[tuple[Tensor, Tensor]], internal: str, element: Sequence[int] | None = (0, 0), *,
          null_model="untrained", quantiles: Sequence[float] = (0.1, 0.9), modes: Sequence[str] = MODES,
          min_kl: float = 1e-6, min_delta_loss: float = 0.005, null_margin: float = 0.25, seed: int = 0,
          level: float = 0.95) -> list[SiteVerdicts]:
    """The three verdicts for ``internal[..., *element]`` at every site that publishes it.

    ``batches``: ``(x (B, T), y (B, T))`` token pairs, the same for every test and both models
    (differences are paired by batch). ``null_model``: ``"untrained"`` (built from the model's
    spec), a model, or ``None`` (then ``functional`` cannot be claimed: ``not functional``
    with no null). Quantiles, means and forced values are computed per site on these batches.
    """
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise ValueError(f"unknown mode(s) {bad}; use {', '.join(MODES)}")
    with eval_mode(model):
        natural = _natural(model, batches, internal, element)
        if isinstance(null_model, str):
            null_model = untrained_like(model, seed + 1)
        null_ctx = eval_mode(null_model) if null_model is not None else None
        if null_ctx is not None:
            null_ctx.__enter__()
        try:
            null_natural = _natural(null_model, batches, internal, element) if null_model is not None else {}
            return [_judge_site(model, null_model, batches, key, element, vals, null_natural.get(key), quantiles, modes,
                                min_kl, min_delta_loss, null_margin, seed, level, internal)
                    for key, vals in natural.items()]
        finally:
            if null_ctx is not None:
                null_ctx.__exit__(None, None, None)


@torch.no_grad()
def _judge_site(model, null_model, batches, key, element, vals, null_vals, quantiles, modes, min_kl, min_delta_loss,
                null_margin, seed, level, internal) -> SiteVerdicts:
    flat = torch.cat([v.reshape(-1) for v in vals])
    forced = tuple(float(q) for q in torch.quantile(flat[:: max(1, len(flat) // 100_000)], torch.tensor(list(quantiles))))
    # on the path: KL(clean || forced) per batch, averaged over the forced values
    kls = []
    for x, _ in batches:
        _, clean = _losses(model(x)[0], torch.zeros_like(x))
        per_value = []
        for q in forced:
            with intervene({key: force_element(element, lambda v, q=q: torch.full_like(v, q))}):
                _, lp = _losses(model(x)[0], torch.zeros_like(x))
            per_value.append(float((clean.exp() * (clean - lp)).sum(-1).mean()))
        kls.append(sum(per_value) / len(per_value))
    kl = stats.interval(kls, level=level)
    kl_low = kl.mean if math.isnan(kl.low) else kl.low
    res = SiteVerdicts(key, ON_PATH if kl_low > min_kl else OFF_PATH, kl, forced, NOT_FUNCTIONAL)
    # functional: ablations on the trained model against the same on the untrained one
    mean = float(flat.mean())
    for mode in modes:
        d = _ablation_deltas(model, batches, key, element, mode, mean, seed)
        res.delta_loss[mode] = stats.interval(d, level=level)
        if null_model is not None and null_vals is not None:
            null_mean = float(torch.cat([v.reshape(-1) for v in null_vals]).mean())
            dn = _ablation_deltas(null_model, batches, key, element, mode, null_mean, seed)
            res.null_delta_loss[mode] = stats.interval(dn, level=level)
            res.versus_null[mode] = stats.paired_difference(d, dn, higher_is_better=True, level=level)
            iv = res.delta_loss[mode]
            low = iv.mean if math.isnan(iv.low) else iv.low
            if res.versus_null[mode].verdict == stats.BETTER and low > 0 and iv.mean > min_delta_loss:
                res.functional = FUNCTIONAL
    # varies: against random phases (order parameters) or the untrained model's values
    per_batch = torch.stack([v.reshape(-1) for v in vals])  # (n_batches, M)
    if key_name(key) == "kssm.R" and element is not None:
        site = key.rsplit(":", 1)[0] if ":" in key else ""
        layer = model.get_submodule(site) if site else None
        if layer is None or not hasattr(layer, "group_levels"):
            raise ValueError(f"{key}: the random-phase null needs the KuramotoLayer that published it")
        detail = compare_to_null(per_batch, group_size(layer, element[0]), margin=null_margin, seed=seed, level=level)
        res.varies = detail.pop("verdict")
        res.varies_detail = {k: (v.format(4) if isinstance(v, stats.PairedDifference) else v) for k, v in detail.items()}
    else:
        sd = float(per_batch.std())
        res.varies_detail = {"sd": sd}
        if null_vals is not None:
            null_sd = float(torch.stack([v.reshape(-1) for v in null_vals]).std())
            res.varies_detail["untrained_sd"] = null_sd
        res.varies = "constant" if sd < 1e-6 else "varies"
    return res


class VerdictsProbe(Probe):
    def __init__(self, params) -> None:
        self.p = params

    def run(self, model, ctx: ProbeContext) -> ProbeResult:
        p = self.p
        device = model_device(model)
        toks = windows(ctx, model.vocab_size, p.batches * p.batch_size, p.seq_len + 1).to(device)
        batches = [(w[:, :-1], w[:, 1:]) for w in toks.split(p.batch_size)]
        sites = judge(model, batches, p.internal, p.element, null_model="untrained" if p.null else None,
                      quantiles=p.quantiles, modes=p.modes, min_kl=p.min_kl, min_delta_loss=p.min_delta_loss,
                      null_margin=p.null_margin, seed=ctx.seed)
        metrics: dict[str, float] = {}
        for s in sites:
            metrics.update(s.metrics(f"{s.site.rsplit(':', 1)[0] or 'model'}."))
        on_path = any(s.on_path == ON_PATH for s in sites)
        functional = any(s.functional == FUNCTIONAL for s in sites)
        metrics.update(on_path=float(on_path), functional=float(functional))
        verdict = ", ".join(f"{s.site}: {s.on_path} / {s.functional} / {s.varies}" for s in sites)
        artifacts = {}
        if ctx.out_dir is not None:
            text = "\n".join([f"# verdicts for `{p.internal}` element {p.element}", ""] + [ln for s in sites for ln in s.lines()])
            artifacts["verdicts"] = write_text(ctx.out_dir / "verdicts.md", text + "\n")
        return ProbeResult(metrics, verdict=verdict, passed=functional, artifacts=artifacts)


def build(params, ctx) -> VerdictsProbe:
    return VerdictsProbe(params)


__all__ = ["FUNCTIONAL", "NOT_FUNCTIONAL", "OFF_PATH", "ON_PATH", "SiteVerdicts", "VerdictsProbe", "force_element",
           "judge", "read_element"]
