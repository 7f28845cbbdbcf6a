"""The `r-zones` probe: where does R live among the prototype's seven tone zones?

On ``n_windows`` validation windows, every value of the chosen R (``element`` of the
internal's trailing dims, default 0: ``kssm.R[..., 0, 0]``, the whole population's first
harmonic) at every position and every site (layer) is binned into the zones

    <0.10 unformed | 0.10-0.30 intimacy | 0.30-0.50 balance | 0.50-0.70 mystery |
    0.70-0.85 wonder | 0.85-0.95 passion | 0.95-1.00 ache

Metrics: the fraction in each zone, the number of zones visited (at least one value),
R's mean, std, min and max, and each site's mean; when the model publishes ``kssm.u``, u's
min, max, 5% / 50% / 95% quantiles over the same windows. A text is then generated from a
validation prompt (``statelab.generate``) and R is read along it by one forward pass over
prompt + continuation (``forward`` equals ``step`` by the state contract): the plot
``r_trajectory.png`` shows R per layer against the token index with the zones shaded.
Every site's R is also compared with the finite-N random-phase null of its group
(:mod:`kssm_oscillators.rnull`: same number of values, R of uniform random phases), and the
null's zone fractions are reported beside the model's (``null_zone_*``): 64 random phases
visit several zones too. Verdict ``at null`` when every site's R is at the incoherent level
(whatever zones it visits); otherwise ``multi-zone`` when at least ``min_zones`` zones are
visited (the v3 target was 3), else ``locked``.
"""

from __future__ import annotations

import json

import torch
from torch import Tensor

from statelab.interfaces import Probe, ProbeContext, ProbeResult
from statelab.internals import select

from kssm_oscillators.plugin import TONE_NAMES, TONE_ZONES
from kssm_oscillators.rnull import compare_to_null, group_size, sample_null_r
from kssm_oscillators.probing import atomic_path, eval_mode, model_device, pick, windows, write_text


def zone_index(r: Tensor) -> Tensor:
    """Zone of each value (0..6): zone i holds ``lower_i <= r < upper_i``; values >= 0.95 are zone 6."""
    bounds = torch.tensor(TONE_ZONES[:-1], dtype=r.dtype, device=r.device)
    return torch.bucketize(r, bounds, right=True)


def _select_element(v: Tensor, B: int, T: int, element: int, internal: str) -> Tensor:
    flat = v.detach().float().reshape(B, T, -1)  # (B, T, E)
    if element >= flat.shape[-1]:
        raise ValueError(f"r-zones: element {element} is out of range; {internal} has {flat.shape[-1]} entries per position")
    return flat[..., element]  # (B, T)


class RZonesProbe(Probe):
    def __init__(self, params) -> None:
        self.p = params

    def _read(self, model, toks: Tensor, us: list[Tensor] | None = None) -> dict[str, Tensor]:
        out: dict[str, list[Tensor]] = {}
        for chunk in toks.split(16):
            _, _, aux = model(chunk)
            for k, v in pick(aux, self.p.internal).items():
                out.setdefault(k, []).append(_select_element(v, *chunk.shape, self.p.element, self.p.internal).cpu())
            if us is not None:  # the bistability variable, when the model has one
                us.extend(v.detach().float().reshape(-1).cpu() for v in select(aux, "kssm.u").values())
        return {k: torch.cat(v) for k, v in out.items()}  # site -> (n, T)

    def _generate(self, model, ctx: ProbeContext, prompt: Tensor) -> tuple[list[int], str]:
        import statelab

        res = statelab.generate(model, prompt.unsqueeze(0), tokenizer=ctx.tokenizer, max_new_tokens=self.p.gen_tokens,
                                temperature=self.p.temperature, seed=ctx.seed, use_planner=False)
        new = list(res.tokens[0])
        text = ""
        if ctx.tokenizer is not None:
            text = ctx.tokenizer.decode(prompt.tolist()) + "|>" + ctx.tokenizer.decode(new)
        return new, text

    def run(self, model, ctx: ProbeContext) -> ProbeResult:
        p = self.p
        device = model_device(model)
        with eval_mode(model), torch.no_grad():
            toks = windows(ctx, model.vocab_size, p.n_windows, p.seq_len).to(device)
            us: list[Tensor] = []
            per_site = self._read(model, toks, us)
            prompt = toks[0, : p.prompt_tokens]
        values = torch.cat([v.reshape(-1) for v in per_site.values()])
        counts = torch.bincount(zone_index(values), minlength=7).double()
        frac = counts / counts.sum()
        visited = int((counts > 0).sum())
        metrics = {f"zone_{i}_{name}": frac[i].item() for i, name in enumerate(TONE_NAMES)}
        metrics.update(
            zones_visited=float(visited), R_mean=values.mean().item(), R_std=values.std(unbiased=False).item(),
            R_min=values.min().item(), R_max=values.max().item(),
        )
        if us:  # u's range on the same windows (kssm.u, every layer)
            u = torch.cat(us)
            q = torch.quantile(u[:: max(1, len(u) // 100_000)], torch.tensor([0.05, 0.5, 0.95]))
            metrics.update(u_min=u.min().item(), u_max=u.max().item(), u_p05=q[0].item(), u_median=q[1].item(),
                           u_p95=q[2].item())
        null_verdicts = []
        null_values = []
        for site, v in per_site.items():
            name = site.rsplit(':', 1)[0] or 'model'
            metrics[f"R_mean.{name}"] = v.mean().item()
            layer = model.get_submodule(site.rsplit(":", 1)[0]) if ":" in site else None
            if layer is not None and hasattr(layer, "group_levels"):
                n = group_size(layer, p.element // layer.K)
                cmp = compare_to_null(v, n, seed=ctx.seed)
                metrics[f"null_R_mean.{name}"] = cmp["null_R_mean"]
                metrics[f"at_null.{name}"] = float(cmp["verdict"] == "at null")
                null_verdicts.append(cmp["verdict"])
                null_values.append(sample_null_r(n, tuple(v.shape), torch.Generator().manual_seed(ctx.seed)).reshape(-1))
        if null_values:
            nc = torch.bincount(zone_index(torch.cat(null_values)), minlength=7).double()
            metrics.update({f"null_zone_{i}_{name}": (nc[i] / nc.sum()).item() for i, name in enumerate(TONE_NAMES)})
            metrics["null_zones_visited"] = float((nc > 0).sum())

        # R along a generated text
        with eval_mode(model), torch.no_grad():
            new, text = self._generate(model, ctx, prompt)
            full = torch.cat([prompt.cpu(), torch.tensor(new, dtype=torch.long)]).to(device).unsqueeze(0)
            trajectory = self._read(model, full)  # site -> (1, P + G)
        traj_vals = torch.cat([v.reshape(-1) for v in trajectory.values()])
        gen_part = torch.cat([v[0, len(prompt) :] for v in trajectory.values()]) if new else traj_vals
        metrics.update(
            gen_R_mean=gen_part.mean().item(), gen_R_std=gen_part.std(unbiased=False).item(),
            gen_zones_visited=float(len(torch.unique(zone_index(gen_part)))),
        )
        artifacts = {}
        if ctx.out_dir is not None:
            artifacts["r_trajectory"] = self._plot(trajectory, len(prompt), ctx.out_dir / "r_trajectory.png")
            doc = {"internal": p.internal, "element": p.element, "zones": dict(zip(TONE_NAMES, frac.tolist())),
                   "metrics": metrics, "text": text,
                   "trajectory": {k: v[0].tolist() for k, v in trajectory.items()}}
            artifacts["r_zones"] = write_text(ctx.out_dir / "r_zones.json", json.dumps(doc, indent=1))
        at_null = bool(null_verdicts) and all(v == "at null" for v in null_verdicts)
        verdict = "at null" if at_null else "multi-zone" if visited >= p.min_zones else "locked"
        passed = visited >= p.min_zones and not at_null
        return ProbeResult(metrics, verdict=verdict, passed=passed, artifacts=artifacts)

    def _plot(self, trajectory: dict[str, Tensor], prompt_len: int, path):
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(10, 4))
        lows = (0.0,) + TONE_ZONES[:-1]
        for i, (lo, hi, name) in enumerate(zip(lows, TONE_ZONES, TONE_NAMES)):
            ax.axhspan(lo, hi, color=plt.cm.viridis(i / 6), alpha=0.12, lw=0)
            ax.text(1.005, (lo + hi) / 2, name, transform=ax.get_yaxis_transform(), va="center", fontsize=7)
        for site, v in trajectory.items():
            ax.plot(v[0].numpy(), lw=1, label=site.rsplit(":", 1)[0] or "model")
        ax.axvline(prompt_len - 0.5, color="k", ls="--", lw=0.8)
        ax.set_xlabel("token (dashed: end of prompt)")
        ax.set_ylabel(f"{self.p.internal} [element {self.p.element}]")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7, loc="upper left")
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
        plt.close(fig)
        return path


def build(params, ctx) -> RZonesProbe:
    return RZonesProbe(params)
