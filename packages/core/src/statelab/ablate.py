"""Functional ablation: is a named internal *used for prediction*, or merely *on the path*?

For an internal published with :func:`statelab.publish` (``kssm.R``, ``memory.recall``...),
:func:`ablate` replaces it during the forward pass and measures the change of the
next-token loss on the same batches:

* ``mean``: its mean over the ablation batches (over rows, and over positions when the
  internal has a time axis), so the model sees an in-distribution value carrying no
  information about the input;
* ``zero``: zeros (often off-distribution: reported, not used for the verdict);
* ``shuffle-positions``: each row's values permuted across positions (timing destroyed,
  marginal kept);
* ``shuffle-rows``: values permuted across batch rows (content swapped between examples).

Each mode gives one loss change per batch and an interval over batches
(:func:`statelab.stats.interval`), plus the mean KL divergence between the clean and ablated
next-token distributions. The same ablation on an **untrained model of the same spec** is
the null: an untrained network also "depends" on every internal on its path. The verdicts:

* ``no effect``: the output does not change (KL at most ``kl_tolerance``) under the
  verdict modes (``mean``, ``shuffle-positions``, ``shuffle-rows`` by default);
* ``on the path``: the output changes, but the loss increase is not larger than the null's;
* ``used for prediction``: for at least one verdict mode the loss increase, paired by
  batch, exceeds the untrained model's with an interval above 0.

A constant fed through (the same value at every row and position) is unchanged by ``mean``
and the shuffles, so it is ``no effect`` however large it is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from statelab import stats
from statelab.data.base import Batch
from statelab.interfaces import Probe, ProbeResult
from statelab.internals import intervene, select

MODES = ("mean", "zero", "shuffle-positions", "shuffle-rows")
VERDICT_MODES = ("mean", "shuffle-positions", "shuffle-rows")
NO_EFFECT = "no effect"
ON_PATH = "on the path"
USED = "used for prediction"


@dataclass(frozen=True)
class ModeResult:
    """One ablation mode on one model: loss change per batch and its interval, mean KL."""

    mode: str
    delta_loss: stats.Interval
    kl: float
    per_batch: tuple[float, ...]


@dataclass
class AblationResult:
    """The ablation of ``internal`` on the trained model and on the untrained null.

    ``versus_null[mode]`` is the paired difference (trained loss change minus null loss
    change, per batch) with its verdict (``better`` = the trained model loses more).
    """

    internal: str
    clean_loss: float
    trained: dict[str, ModeResult]
    null: dict[str, ModeResult] = field(default_factory=dict)
    versus_null: dict[str, stats.PairedDifference] = field(default_factory=dict)
    verdict: str = NO_EFFECT
    kl_tolerance: float = 1e-9

    def metrics(self) -> dict[str, float]:
        """Flat metrics for a :class:`~statelab.interfaces.ProbeResult` or an mlflow run."""
        out: dict[str, float] = {"clean_loss": self.clean_loss}
        for prefix, results in (("", self.trained), ("null.", self.null)):
            for mode, r in results.items():
                out[f"{prefix}{mode}.delta_loss"] = r.delta_loss.mean
                out[f"{prefix}{mode}.delta_loss_low"] = r.delta_loss.low
                out[f"{prefix}{mode}.delta_loss_high"] = r.delta_loss.high
                out[f"{prefix}{mode}.kl"] = r.kl
        for mode, d in self.versus_null.items():
            out[f"{mode}.vs_null"] = d.diff.mean
            out[f"{mode}.vs_null_low"] = d.diff.low
            out[f"{mode}.vs_null_high"] = d.diff.high
        return out

    def table(self) -> str:
        """A markdown table: one row per mode, trained next to null."""
        lines = [
            f"ablation of `{self.internal}` (clean loss {self.clean_loss:.4f}): **{self.verdict}**",
            "",
            "| mode | trained: loss change | KL | untrained: loss change | KL | trained - untrained |",
            "|---|---|---|---|---|---|",
        ]
        for mode, r in self.trained.items():
            n = self.null.get(mode)
            d = self.versus_null.get(mode)
            lines.append(
                f"| {mode} | {r.delta_loss.format(4)} | {r.kl:.3g} | {n.delta_loss.format(4) if n else '-'} | "
                f"{f'{n.kl:.3g}' if n else '-'} | {d.format(4) if d else '-'} |"
            )
        return "\n".join(lines)


def _as_batch(b: Batch | Tensor | tuple) -> Batch:
    if isinstance(b, Batch):
        return b
    if isinstance(b, Tensor):  # (B, T + 1) token windows
        return Batch(b[:, :-1], b[:, 1:])
    x, y, *rest = b
    return Batch(x, y, rest[0] if rest else None)


def _token_losses(logits: Tensor, batch: Batch) -> tuple[Tensor, Tensor]:
    """Mean loss over the counted positions, and the log-probs at those positions ``(N, V)``."""
    logp = F.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    mask = batch.mask if batch.mask is not None else torch.ones_like(batch.y, dtype=torch.bool)
    lp = logp[mask]  # (N, V)
    loss = F.nll_loss(lp, batch.y[mask])
    return loss, lp


def _reduce_dims(value: Tensor, seq_len: int) -> tuple[int, ...]:
    """Rows, and positions when the internal has a time axis of the input's length."""
    return (0, 1) if value.dim() >= 2 and value.shape[1] == seq_len else (0,)


def _internal_means(model, batches: Sequence[Batch], internal: str) -> dict[str, Tensor]:
    """Mean of every published key matching ``internal`` over the batches."""
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}
    for b in batches:
        _, _, aux = model(b.x)
        found = select(aux, internal)
        if not found:
            raise LookupError(
                f"ablate: no component published {internal!r}; published internals: "
                f"{', '.join(sorted(aux)) or '(none)'}"
            )
        for k, v in found.items():
            dims = _reduce_dims(v, b.x.shape[1])
            n = math.prod(v.shape[d] for d in dims)
            s = v.detach().double().sum(dim=dims)
            sums[k] = sums[k] + s if k in sums else s
            counts[k] = counts.get(k, 0) + n
    return {k: (sums[k] / counts[k]) for k in sums}


def _forcing(mode: str, means: dict[str, Tensor], seq_len: int, gen: torch.Generator) -> dict[str, Any]:
    def mean_of(key: str) -> Callable[[Tensor], Tensor]:
        def f(v: Tensor) -> Tensor:
            m = means[key].to(v.dtype)
            if _reduce_dims(v, seq_len) == (0, 1):
                return m.expand_as(v)
            return m.unsqueeze(0).expand_as(v)

        return f

    def shuffle_positions(v: Tensor) -> Tensor:
        if v.dim() < 2 or v.shape[1] != seq_len:
            raise ValueError(f"shuffle-positions needs a time axis of length {seq_len} at dim 1, got shape {tuple(v.shape)}")
        perm = torch.rand(v.shape[0], v.shape[1], generator=gen).argsort(dim=1).to(v.device)  # (B, T)
        idx = perm.view(*perm.shape, *([1] * (v.dim() - 2))).expand_as(v)
        return v.gather(1, idx)

    def shuffle_rows(v: Tensor) -> Tensor:
        if v.shape[0] < 2:
            raise ValueError("shuffle-rows needs at least 2 rows per batch")
        # a derangement-free random permutation could leave rows in place; rotate instead of
        # permuting so that every row receives another row's values
        shift = int(torch.randint(1, v.shape[0], (1,), generator=gen))
        return v.roll(shift, dims=0)

    if mode == "zero":
        return {key: 0.0 for key in means}
    if mode == "mean":
        return {key: mean_of(key) for key in means}
    if mode == "shuffle-positions":
        return {key: shuffle_positions for key in means}
    if mode == "shuffle-rows":
        return {key: shuffle_rows for key in means}
    raise ValueError(f"unknown ablation mode {mode!r}; use one of {', '.join(MODES)}")


@torch.no_grad()
def _run_modes(model, batches: Sequence[Batch], internal: str, modes: Sequence[str], seed: int,
               level: float) -> tuple[float, dict[str, ModeResult]]:
    was_training = model.training
    model.eval()
    try:
        means = _internal_means(model, batches, internal)
        clean = []
        clean_lp = []
        for b in batches:
            loss, lp = _token_losses(model(b.x)[0], b)
            clean.append(float(loss))
            clean_lp.append(lp)
        results: dict[str, ModeResult] = {}
        for mode in modes:
            gen = torch.Generator().manual_seed(seed)
            deltas, kls = [], []
            for b, c, clp in zip(batches, clean, clean_lp):
                forcing = _forcing(mode, means, b.x.shape[1], gen)
                with intervene(forcing):
                    loss, lp = _token_losses(model(b.x)[0], b)
                deltas.append(float(loss) - c)
                kls.append(float((clp.exp() * (clp - lp)).sum(-1).mean()))
            results[mode] = ModeResult(mode, stats.interval(deltas, level=level), sum(kls) / len(kls), tuple(deltas))
        return sum(clean) / len(clean), results
    finally:
        model.train(was_training)


def untrained_like(model, seed: int = 0):
    """A freshly initialised model of the same spec and vocabulary (the null)."""
    from statelab.build import build

    if getattr(model, "spec", None) is None:
        raise ValueError("ablate: the null needs a model built from a spec (statelab.build); pass null_model=")
    null = build(getattr(model, "resolved", None) or model.spec, vocab_size=model.vocab_size, seed=seed)
    return null.to(next(model.parameters()).device)


def ablate(
    model,
    internal: str,
    batches: Iterable[Batch | Tensor | tuple],
    *,
    modes: Sequence[str] = MODES,
    verdict_modes: Sequence[str] = VERDICT_MODES,
    null_model: Any = "untrained",
    seed: int = 0,
    level: float = 0.95,
    kl_tolerance: float = 1e-9,
) -> AblationResult:
    """Ablate ``internal`` (bare name or ``"<site>:<name>"``) on ``model`` and on the null.

    ``batches``: :class:`~statelab.data.Batch` objects, ``(B, T + 1)`` token windows or
    ``(x, y[, mask])`` tuples; the same batches are used for every mode and both models, so
    differences are paired by batch. ``null_model``: ``"untrained"`` (default: built from
    ``model.spec`` with ``seed``), a model, or ``None`` (no null: the verdict can then only be
    ``no effect`` or ``on the path``).
    """
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ValueError(f"unknown ablation mode(s) {unknown}; use {', '.join(MODES)}")
    device = next(model.parameters()).device
    bs = [_as_batch(b).to(device) for b in batches]
    if not bs:
        raise ValueError("ablate needs at least one batch")
    clean_loss, trained = _run_modes(model, bs, internal, modes, seed, level)
    res = AblationResult(internal, clean_loss, trained, kl_tolerance=kl_tolerance)
    if isinstance(null_model, str):
        if null_model != "untrained":
            raise ValueError(f"null_model must be 'untrained', a model or None, got {null_model!r}")
        null_model = untrained_like(model, seed)
    if null_model is not None:
        _, res.null = _run_modes(null_model, bs, internal, modes, seed, level)
        for mode in modes:
            res.versus_null[mode] = stats.paired_difference(
                list(trained[mode].per_batch), list(res.null[mode].per_batch), higher_is_better=True, level=level
            )
    judged = [m for m in verdict_modes if m in trained]
    if all(trained[m].kl <= kl_tolerance for m in judged):
        res.verdict = NO_EFFECT
    elif any(
        m in res.versus_null and res.versus_null[m].verdict == stats.BETTER and trained[m].delta_loss.excludes(0.0)
        and trained[m].delta_loss.low > 0
        for m in judged
    ):
        res.verdict = USED
    else:
        res.verdict = ON_PATH
    return res


__all__ = ["MODES", "NO_EFFECT", "ON_PATH", "USED", "VERDICT_MODES", "AblationResult", "ModeResult", "ablate",
           "untrained_like", "AblateProbe"]


class AblateProbe(Probe):
    """The ``ablate`` probe: :func:`ablate` on the validation data of the run, as a probe."""

    def __init__(self, params) -> None:
        self.params = params

    def run(self, model, ctx):
        p = self.params
        data = ctx.extra.get("data")
        seq_len = p.seq_len or model.spec.train.seq_len
        if data is not None:
            batches = list(data.val_batches(p.batch_size, seq_len, p.batches))
        elif ctx.val_tokens is not None:
            need = p.batch_size * (seq_len + 1)
            n = min(p.batches, len(ctx.val_tokens) // need)
            if n < 1:
                raise ValueError(f"ablate: the validation tokens ({len(ctx.val_tokens)}) do not fill one batch of "
                                 f"{p.batch_size} x {seq_len + 1}; lower batch_size or seq_len")
            batches = [ctx.val_tokens[i * need:(i + 1) * need].view(p.batch_size, seq_len + 1) for i in range(n)]
        else:
            raise ValueError("ablate needs validation data (run it through `statelab probe` or give ctx.val_tokens)")
        res = ablate(model, p.internal, batches, modes=p.modes, null_model="untrained" if p.null else None,
                     seed=ctx.seed)
        from statelab.io import atomic_write_text

        path = ctx.out_dir / "ablate.md"
        atomic_write_text(path, res.table() + "\n")
        return ProbeResult(res.metrics(), verdict=res.verdict, passed=None, artifacts={"table": path})
