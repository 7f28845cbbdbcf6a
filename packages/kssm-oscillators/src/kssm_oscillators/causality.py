"""The `causality` probe: is a named internal a cause of the output, or an epiphenomenon?

The prototype's three tests, for any internal any component publishes (``kssm.R``,
``memory.recall``, ``planner.alpha``...), on ``n_inputs`` validation windows:

1. **variance**: the internal's standard deviation across inputs and positions (per
   element of its trailing dims, averaged) exceeds ``std_threshold`` (0.01).
2. **intervention**: the internal is forced (through :func:`statelab.intervene`, at every
   site that publishes it) to a low and a high value, each window run under both. Per
   window ``i``, ``d_i`` is the difference of the two output log-distributions (all
   positions and tokens). Under the null "forcing changes nothing", the two conditions are
   exchangeable within each window, so flipping the sign of any ``d_i`` leaves the law of
   ``|| sum_i d_i ||`` unchanged: the paired sign-flip permutation test of that statistic
   (exact for ``n_inputs <= 16``) gives the p-value (pass below ``p_threshold``, 0.01).
   The effect size is ``KL(P_low || P_high)`` averaged over positions, and must also
   exceed ``min_kl`` so that a float-rounding-sized effect does not count.
3. **correlation**: Pearson's r between the internal (averaged over its trailing dims and
   sites, one value per position) and the entropy of the output distribution at that
   position; pass when ``|r| > r_threshold`` (0.05) with p below ``corr_p_threshold``.
   Positions within a window are not independent, so this p-value is optimistic.

Verdict: ``constant`` when the variance test fails; otherwise ``causal`` when the
intervention test passes (forcing the internal moves the output) and ``epiphenomenal`` when
it does not. ``passed`` follows the prototype's stricter rule: all three tests pass.
"""

from __future__ import annotations

import itertools
import json
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from statelab.interfaces import Probe, ProbeContext, ProbeResult
from statelab.internals import intervene

from kssm_oscillators.probing import eval_mode, model_device, per_position, pick, windows, write_text


def element_std(v: Tensor, B: int, T: int) -> Tensor:
    """Std of each element of an internal across inputs (and positions), averaged over elements."""
    v = v.detach().float()
    rows = v.reshape(B * T, -1) if v.dim() >= 2 and v.shape[:2] == (B, T) else v.reshape(B, -1)
    if rows.shape[0] < 2:
        return torch.zeros(())
    return rows.std(0, unbiased=False).mean()


def sign_flip_pvalue(diffs: Tensor, n_permutations: int, seed: int) -> tuple[float, float]:
    """Paired sign-flip permutation test of ``|| sum_i d_i ||`` for ``diffs (n, M)``.

    Returns ``(p_value, statistic)``; exact enumeration for ``n <= 16``. Uses the Gram
    matrix, so the cost is ``O(n^2 M + P n^2)`` whatever M is.
    """
    n = diffs.shape[0]
    d = diffs.double()
    gram = d @ d.T  # (n, n)
    if n <= 16:
        signs = torch.tensor(list(itertools.product((1.0, -1.0), repeat=n)), dtype=torch.float64)  # (2^n, n), row 0 = identity
    else:
        g = torch.Generator().manual_seed(seed)
        rand = torch.randint(0, 2, (n_permutations, n), generator=g).double() * 2 - 1
        signs = torch.cat([torch.ones(1, n, dtype=torch.float64), rand])
    stats = ((signs @ gram) * signs).sum(-1)  # (P, ) squared norms of the signed sums
    observed = stats[0]
    if observed <= 0:
        return 1.0, 0.0
    hits = (stats >= observed * (1 - 1e-9)).sum().item()  # includes the identity itself
    return hits / len(stats), math.sqrt(observed.item()) / n


def pearson(x: Tensor, y: Tensor) -> tuple[float, float]:
    """Pearson's r and its two-sided p-value (scipy); ``(0, 1)`` when either side is constant."""
    x, y = x.double().reshape(-1), y.double().reshape(-1)
    if len(x) < 3 or x.std() < 1e-12 or y.std() < 1e-12:
        return 0.0, 1.0
    from scipy import stats

    res = stats.pearsonr(x.numpy(), y.numpy())
    return float(res.statistic), float(res.pvalue)


class CausalityProbe(Probe):
    def __init__(self, params) -> None:
        self.p = params

    def _run_batches(self, model, toks: Tensor, forcing: float | None):
        out_logp, out_vals = [], []
        for chunk in toks.split(self.p.batch_size):
            if forcing is None:
                logits, _, aux = model(chunk)
            else:
                with intervene({self.p.internal: forcing}):
                    logits, _, aux = model(chunk)
            out_logp.append(F.log_softmax(logits.float(), -1).cpu())  # (b, T, V)
            out_vals.append({k: v.detach().cpu() for k, v in pick(aux, self.p.internal).items()})
        return torch.cat(out_logp), out_vals

    def run(self, model, ctx: ProbeContext) -> ProbeResult:
        p = self.p
        n, T = p.n_inputs, p.seq_len
        with eval_mode(model), torch.no_grad():
            toks = windows(ctx, model.vocab_size, n, T).to(model_device(model))
            logp, chunks = self._run_batches(model, toks, None)
            sites = sorted(chunks[0])
            per_site = {s: torch.cat([c[s] for c in chunks]) for s in sites}  # each (n, ...)

            # 1. variance
            std = torch.stack([element_std(v, n, T) for v in per_site.values()]).mean().item()
            variance_ok = std > p.std_threshold

            # 2. intervention
            if p.values is not None:
                lo, hi = p.values
            else:
                flat = torch.cat([v.float().reshape(-1) for v in per_site.values()])
                if flat.numel() > 1_000_000:
                    flat = flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(ctx.seed))[:1_000_000]]
                lo, hi = torch.quantile(flat, 0.1).item(), torch.quantile(flat, 0.9).item()
                if hi - lo < 1e-6:  # a constant internal: force it 1 above and below its value
                    lo, hi = lo - 1.0, hi + 1.0
            logp_lo, _ = self._run_batches(model, toks, lo)
            logp_hi, _ = self._run_batches(model, toks, hi)
            diffs = (logp_lo - logp_hi).reshape(n, -1)  # (n, T * V)
            p_value, stat = sign_flip_pvalue(diffs, p.n_permutations, ctx.seed)
            kl = (logp_lo.exp() * (logp_lo - logp_hi)).sum(-1).mean().item()
            logprob_diff = diffs.abs().mean().item()
            intervention_ok = p_value < p.p_threshold and kl > p.min_kl

            # 3. correlation with the output entropy
            entropy = -(logp.exp() * logp).sum(-1)  # (n, T)
            summary = torch.stack([per_position(v, n, T) for v in per_site.values()]).mean(0)  # (n, T) or (n, 1)
            if summary.shape[1] != T:
                entropy = entropy.mean(1, keepdim=True)
            r, r_p = pearson(summary, entropy)
            correlation_ok = abs(r) > p.r_threshold and r_p < p.corr_p_threshold

        verdict = "constant" if not variance_ok else "causal" if intervention_ok else "epiphenomenal"
        passed = variance_ok and intervention_ok and correlation_ok
        metrics = {
            "std": std,
            "variance_passed": float(variance_ok),
            "force_low": float(lo),
            "force_high": float(hi),
            "intervention_p": p_value,
            "intervention_kl": kl,
            "intervention_stat": stat,
            "intervention_logprob_diff": logprob_diff,
            "intervention_passed": float(intervention_ok),
            "entropy_r": r,
            "entropy_p": r_p,
            "correlation_passed": float(correlation_ok),
            "internal_mean": torch.stack([v.float().mean() for v in per_site.values()]).mean().item(),
            "n_sites": float(len(sites)),
        }
        artifacts = {}
        if ctx.out_dir is not None:
            doc = {"internal": p.internal, "sites": sites, "verdict": verdict, "metrics": metrics}
            artifacts["causality"] = write_text(ctx.out_dir / "causality.json", json.dumps(doc, indent=2))
        return ProbeResult(metrics, verdict=verdict, passed=bool(passed), artifacts=artifacts)


def build(params, ctx) -> CausalityProbe:
    return CausalityProbe(params)
