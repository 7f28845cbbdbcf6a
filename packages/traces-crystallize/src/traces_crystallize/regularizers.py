"""Regularizers: load-balance, trace-utilization, crystallization, ewc.

* ``load-balance`` (Switch Transformer): per MoE layer ``E * sum_e f_e P_e`` with ``f_e`` the
  fraction of tokens whose first expert is ``e`` and ``P_e`` the mean router probability;
  1.0 when perfectly balanced. Averaged over layers.
* ``trace-utilization``: ``mean_h alpha_h^2 (1 - u_h)`` where ``u_h`` is the fraction of
  head ``h``'s attention mass that fell on traced links at the last capture: it shrinks the
  bias strength of heads whose traces attention does not use. It has a gradient only with
  ``traces.learn_alpha: true``; with the default fixed alpha schedule it is a constant (a metric).
* ``crystallization``: the mean router entropy divided by ``log E`` (stable routing lets
  paths crystallize). It also *drives* crystallization through its training callback: it
  keeps the tokens of each optimizer step's first micro-batch and, after every
  ``prune_interval``-th optimizer step, runs
  :func:`traces_crystallize.crystallize.crystallize_round` on them.
* ``ewc``: ``sum over crystallized experts of mean(F* (w - w*)^2)`` with ``w*`` the weights
  when the expert crystallized and ``F*`` the diagonal Fisher (an EMA, one update per
  optimizer step, of the squared accumulated gradient, normalised to mean 1) at that moment.
  With ``crystallization.freeze`` the experts are frozen exactly and the penalty stays ~0;
  without it, it is what protects them. The Fisher and the anchors are its callback's state,
  so they survive checkpoints and ``--resume``.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from statelab.callbacks import Callback, MicroBatch
from statelab.interfaces import Aux, Regularizer
from statelab.internals import select


def _layer_of(key: str) -> int | None:
    site = key.rsplit(":", 1)[0]
    parts = site.split(".")
    return int(parts[-1]) if len(parts) >= 3 and parts[-2] == "layers" and parts[-1].isdigit() else None


class LoadBalance(Regularizer):
    requires = ("router.probs",)

    def forward(self, aux: Aux, model: nn.Module | None = None) -> tuple[Tensor, dict[str, float]]:
        probs = select(aux, "router.probs")
        if not probs:
            raise ValueError("load-balance: no router.probs in aux; use a transformer backbone with ffn: moe")
        experts = {k.rsplit(":", 1)[0]: v for k, v in select(aux, "router.experts").items()}
        losses, max_load = [], []
        for key, p in probs.items():
            E = p.shape[-1]
            p = p.reshape(-1, E).float()  # (N, E)
            ex = experts.get(key.rsplit(":", 1)[0])
            first = ex.reshape(-1, ex.shape[-1])[:, 0] if ex is not None else p.argmax(-1)  # (N,)
            f = torch.bincount(first.clamp(min=0), minlength=E).float() / first.numel()  # (E,)
            losses.append(E * (f * p.mean(0)).sum())
            max_load.append(f.max())
        return torch.stack(losses).mean(), {"max_load": float(torch.stack(max_load).max())}


class TraceUtilization(Regularizer):
    requires = ("traces.alpha",)

    def forward(self, aux: Aux, model: nn.Module | None = None) -> tuple[Tensor, dict[str, float]]:
        alphas = select(aux, "traces.alpha")
        if not alphas:
            raise ValueError("trace-utilization: no traces.alpha in aux; enable traces on a transformer backbone")
        layers = list(model.backbone.layers) if model is not None and hasattr(model, "backbone") else None
        losses, uses, fills = [], [], []
        for key, a in alphas.items():
            i = _layer_of(key)
            store = layers[i].attn.traces if layers is not None and i is not None else None
            use = store.use if store is not None else torch.zeros_like(a)
            losses.append((a.pow(2) * (1 - use)).mean())
            uses.append(float(use.mean()))
            if store is not None:
                fills.append(store.n_live / store.off.numel())
        metrics = {"utilization": sum(uses) / len(uses)}
        if fills:
            metrics["fill"] = sum(fills) / len(fills)
        return torch.stack(losses).mean(), metrics


class Crystallization(Regularizer):
    requires = ("router.probs",)

    def __init__(self) -> None:
        super().__init__()
        self.last_round: dict[str, float] = {}
        self._callback = CrystallizationRounds(self)

    def training_callbacks(self) -> list[Callback]:
        return [self._callback]

    def forward(self, aux: Aux, model: nn.Module | None = None) -> tuple[Tensor, dict[str, float]]:
        probs = select(aux, "router.probs")
        if not probs:
            raise ValueError("crystallization: no router.probs in aux; use a transformer backbone with ffn: moe")
        ents = []
        for p in probs.values():
            p = p.float()
            ents.append(-(p * p.clamp(min=1e-9).log()).sum(-1).mean() / math.log(p.shape[-1]))
        loss = torch.stack(ents).mean()
        metrics: dict[str, float] = {}
        bb = getattr(model, "backbone", None) if model is not None else None
        if bb is not None and getattr(bb, "motifs", None) is not None:
            metrics["motifs"] = float(bb.motifs.n_active)
            metrics["trie_nodes"] = float(len(bb.trie))
        return loss, metrics


class CrystallizationRounds(Callback):
    """Keeps each optimizer step's first micro-batch and runs a crystallization round on it
    after every ``prune_interval``-th optimizer step (a no-grad pass; the gradients of the
    step were already applied)."""

    name = "crystallization"

    def __init__(self, reg: Crystallization) -> None:
        self._reg = [reg]
        self._tokens: Tensor | None = None

    def on_micro_batch_start(self, trainer: Any, mb: MicroBatch) -> None:
        if mb.index == 0:
            self._tokens = mb.x.detach()

    def on_optimizer_step(self, trainer: Any, step: int) -> None:
        bb = getattr(trainer.model, "backbone", None)
        if bb is None or getattr(bb, "motifs", None) is None or self._tokens is None:
            return
        if step % bb.params.crystallization.prune_interval == 0:
            from traces_crystallize.crystallize import crystallize_round

            self._reg[0].last_round = crystallize_round(trainer.model, self._tokens, step)

    def state_dict(self) -> dict[str, Any]:
        return {"last_round": self._reg[0].last_round}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._reg[0].last_round = dict(state.get("last_round", {}))


class EWC(Regularizer):
    requires = ("router.probs",)

    def __init__(self, fisher_decay: float = 0.99) -> None:
        super().__init__()
        self.fisher_decay = fisher_decay
        self._fisher: dict[tuple[int, str], Tensor] = {}  # (layer, "w1"/"w2") -> EMA of grad^2
        self._anchor: dict[tuple[int, int], tuple[Tensor, Tensor, Tensor, Tensor]] = {}  # (layer, e) -> w1*, w2*, F1*, F2*
        self._callback = EWCState(self)

    def training_callbacks(self) -> list[Callback]:
        return [self._callback]

    def update_fisher(self, model: nn.Module) -> None:
        """One EMA step of the diagonal Fisher from the experts' current gradients."""
        for i, block in enumerate(model.backbone.layers):
            if not getattr(block, "moe", False):
                continue
            for name in ("w1", "w2"):
                g = getattr(block.ffn, name).grad
                if g is None:
                    continue
                g2 = g.detach().float().pow(2)
                f = self._fisher.get((i, name))
                if f is None:
                    self._fisher[(i, name)] = g2
                else:
                    self._fisher[(i, name)] = f.to(g2.device).mul_(self.fisher_decay).add_(g2, alpha=1 - self.fisher_decay)

    def forward(self, aux: Aux, model: nn.Module | None = None) -> tuple[Tensor, dict[str, float]]:
        if model is None or not hasattr(model, "backbone"):
            raise ValueError("ewc: needs the model (a transformer backbone with ffn: moe)")
        terms = []
        live = set()
        for i, block in enumerate(model.backbone.layers):
            if not getattr(block, "moe", False):
                continue
            moe = block.ffn
            for e in moe.crystal.nonzero().flatten().tolist():
                live.add((i, e))
                if (i, e) not in self._anchor:
                    f1 = self._fisher.get((i, "w1"))
                    f2 = self._fisher.get((i, "w2"))
                    f1 = f1[e] / f1[e].mean().clamp(min=1e-20) if f1 is not None else torch.ones_like(moe.w1[e])
                    f2 = f2[e] / f2[e].mean().clamp(min=1e-20) if f2 is not None else torch.ones_like(moe.w2[e])
                    self._anchor[(i, e)] = (moe.w1.detach()[e].clone(), moe.w2.detach()[e].clone(), f1, f2)
                if self._anchor[(i, e)][0].device != moe.w1.device:  # restored from a checkpoint (CPU)
                    self._anchor[(i, e)] = tuple(a.to(moe.w1.device) for a in self._anchor[(i, e)])
                w1s, w2s, f1, f2 = self._anchor[(i, e)]
                terms.append((f1 * (moe.w1[e] - w1s).pow(2)).mean() + (f2 * (moe.w2[e] - w2s).pow(2)).mean())
        for k in list(self._anchor):
            if k not in live:
                del self._anchor[k]
        if not terms:
            ref = next(model.parameters())
            return ref.sum() * 0.0, {"protected": 0.0}
        return torch.stack(terms).sum(), {"protected": float(len(terms))}


class EWCState(Callback):
    """Updates the Fisher once per optimizer step (the accumulated gradient, so
    ``grad_accum`` does not change it) and saves the Fisher and the anchors."""

    name = "ewc"

    def __init__(self, reg: EWC) -> None:
        self._reg = [reg]

    def on_optimizer_step(self, trainer: Any, step: int) -> None:
        self._reg[0].update_fisher(trainer.model)

    def state_dict(self) -> dict[str, Any]:
        reg = self._reg[0]
        out: dict[str, Any] = {f"fisher.{i}.{name}": f for (i, name), f in reg._fisher.items()}
        for (i, e), tensors in reg._anchor.items():
            out.update({f"anchor.{i}.{e}.{n}": t for n, t in zip(("w1", "w2", "f1", "f2"), tensors)})
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        reg = self._reg[0]
        reg._fisher = {(int(k.split(".")[1]), k.split(".")[2]): v.clone() for k, v in state.items()
                       if k.startswith("fisher.")}
        anchors: dict[tuple[int, int], dict[str, Tensor]] = {}
        for k, v in state.items():
            if k.startswith("anchor."):
                _, i, e, n = k.split(".")
                anchors.setdefault((int(i), int(e)), {})[n] = v.clone()
        reg._anchor = {key: (d["w1"], d["w2"], d["f1"], d["f2"]) for key, d in anchors.items()}


def load_balance(params, ctx) -> LoadBalance:
    return LoadBalance()


def trace_utilization(params, ctx) -> TraceUtilization:
    return TraceUtilization()


def crystallization(params, ctx) -> Crystallization:
    return Crystallization()


def ewc(params, ctx) -> EWC:
    return EWC(params.fisher_decay)
