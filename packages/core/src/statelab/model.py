"""The assembled model: embedding -> backbone layers with memories interleaved -> head.

State layout (a flat :data:`~statelab.interfaces.State`)::

    backbone.layers.<i>.<key>   the i-th backbone layer's state
    memory.<j>.<key>            the j-th memory's state (j = index in spec.model.memories)

Named internals in ``aux`` are qualified by site: ``backbone.layers.<i>:<name>``,
``backbone:<name>`` (the final norm) and ``memory.<j>:<name>``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from statelab.interfaces import Aux, Backbone, Memory, Planner, Regularizer, State, prefix_state, unprefix_state
from statelab.internals import site


class StatelabModel(nn.Module):
    """``forward(tokens (B, T), state) -> (logits (B, T, V), state, aux)`` and
    ``step(tokens (B,), state) -> (logits (B, V), state, aux)``."""

    def __init__(
        self,
        *,
        vocab_size: int,
        d_model: int,
        backbone: Backbone,
        memories: list[tuple[int, Memory]] | None = None,
        planner: Planner | None = None,
        regularizers: list[tuple[float, Regularizer]] | None = None,
        tie_embeddings: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.d_model = d_model
        self.embed = nn.Embedding(vocab_size, d_model)
        self.drop = nn.Dropout(dropout)
        self.backbone = backbone
        memories = memories or []
        self.memories = nn.ModuleList([m for _, m in memories])
        self.memory_layers: list[int] = [k for k, _ in memories]
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        if tie_embeddings:
            self.head.weight = self.embed.weight
        self.planner = planner
        regularizers = regularizers or []
        self.regularizers = nn.ModuleList([r for _, r in regularizers])
        self.regularizer_weights: list[float] = [w for w, _ in regularizers]
        nn.init.normal_(self.embed.weight, std=0.02)
        if not tie_embeddings:
            nn.init.normal_(self.head.weight, std=0.02)
        # set by statelab.build: the validated spec this model was built from
        self.spec: Any = None

    # -- state ----------------------------------------------------------------------
    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> State:
        device = device if device is not None else self.embed.weight.device
        state = prefix_state("backbone", self.backbone.init_state(batch_size, device, None))
        for j, mem in enumerate(self.memories):
            state.update(prefix_state(f"memory.{j}", mem.init_state(batch_size, device, None)))
        return state

    def _memories_after(self, layer: int) -> list[int]:
        return [j for j, k in enumerate(self.memory_layers) if k == layer]

    # -- forward --------------------------------------------------------------------
    def hidden(self, tokens: Tensor, state: State | None = None) -> tuple[Tensor, State, Aux]:
        """Hidden states ``(B, T, D)`` before the head (used by probes and planners)."""
        return self._run(tokens, state, stepwise=False)

    def _run(self, tokens: Tensor, state: State | None, stepwise: bool) -> tuple[Tensor, State, Aux]:
        if state is None:
            state = self.init_state(tokens.shape[0], tokens.device)
        x = self.drop(self.embed(tokens))  # (B, T, D) or (B, D) when stepping
        new_state: State = {}
        aux: Aux = {}
        bb_state = unprefix_state("backbone", state)
        for i, layer in enumerate(self.backbone.layers):
            with site(f"backbone.layers.{i}"):
                fn = layer.step if stepwise else layer
                x, s, a = fn(x, unprefix_state(f"layers.{i}", bb_state))
            new_state.update(prefix_state(f"backbone.layers.{i}", s))
            aux.update(a)
            for j in self._memories_after(i):
                mem = self.memories[j]
                with site(f"memory.{j}"):
                    fn = mem.step if stepwise else mem
                    x, s, a = fn(x, unprefix_state(f"memory.{j}", state))
                new_state.update(prefix_state(f"memory.{j}", s))
                aux.update(a)
        with site("backbone"):
            x = self.backbone.final_norm(x)
        return x, new_state, aux

    def forward(self, tokens: Tensor, state: State | None = None) -> tuple[Tensor, State, Aux]:
        h, new_state, aux = self._run(tokens, state, stepwise=False)
        return self.head(h), new_state, aux  # (B, T, V)

    def step(self, tokens: Tensor, state: State | None = None) -> tuple[Tensor, State, Aux]:
        h, new_state, aux = self._run(tokens, state, stepwise=True)
        return self.head(h), new_state, aux  # (B, V)

    # -- losses ---------------------------------------------------------------------
    def regularization(self, aux: Aux) -> tuple[Tensor | None, dict[str, float | Tensor]]:
        """Weighted sum of the regularizers' losses, and their metrics (each loss logged
        separately as ``reg/<i>.<kind>``)."""
        total: Tensor | None = None
        metrics: dict[str, float | Tensor] = {}
        for idx, (w, reg) in enumerate(zip(self.regularizer_weights, self.regularizers)):
            loss, m = reg(aux, self)
            name = getattr(reg, "kind", type(reg).__name__)
            metrics[f"reg/{idx}.{name}"] = loss.detach()
            for k, v in m.items():
                metrics[f"reg/{idx}.{name}.{k}"] = v
            total = w * loss if total is None else total + w * loss
        return total, metrics

    # -- info -----------------------------------------------------------------------
    def num_parameters(self, trainable_only: bool = False) -> int:
        seen: set[int] = set()
        n = 0
        for p in self.parameters():
            if id(p) in seen or (trainable_only and not p.requires_grad):
                continue
            seen.add(id(p))
            n += p.numel()
        return n
