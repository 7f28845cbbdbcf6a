"""Small models and data for the planner's tests and benchmarks (not used by the planner itself).

``mode_switch_tokens`` makes text whose difficulty depends on where you are: it alternates
between predictable stretches (a cycle of four letters) and random bytes, so a backbone's
realised loss over the next tokens is readable from its state, which is what the value
head has to learn. ``planner_model`` builds a toy-rnn (or mamba) model with the `mcts`
planner through the registry, and ``train_lm`` fits it briefly.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch.nn import functional as F


def mode_switch_tokens(n: int, seed: int = 0, segment: tuple[int, int] = (8, 24)) -> torch.Tensor:
    """``(n,)`` byte tokens: segments of ``abcd`` cycles and of random bytes 128..255."""
    g = torch.Generator().manual_seed(seed)
    out: list[int] = []
    predictable = True
    while len(out) < n:
        length = int(torch.randint(segment[0], segment[1] + 1, (1,), generator=g))
        if predictable:
            start = int(torch.randint(0, 4, (1,), generator=g))
            out.extend(97 + (start + i) % 4 for i in range(length))
        else:
            out.extend(torch.randint(128, 256, (length,), generator=g).tolist())
        predictable = not predictable
    return torch.tensor(out[:n], dtype=torch.long)


def window_batches(tokens: torch.Tensor, batch_size: int, seq_len: int, seed: int = 0):
    """A ``batches()`` function returning random windows ``(B, T)`` of ``tokens``."""
    g = torch.Generator().manual_seed(seed)

    def batches() -> torch.Tensor:
        i = torch.randint(0, len(tokens) - seq_len - 1, (batch_size,), generator=g)
        return torch.stack([tokens[j : j + seq_len] for j in i.tolist()])  # (B, T)

    return batches


def planner_model(backbone: dict[str, Any] | None = None, d_model: int = 32, seed: int = 0, **planner: Any):
    """A byte-level model with the `mcts` planner (default backbone: toy-rnn, 2 layers)."""
    import statelab
    from statelab.testing.toys import toy_registry, toy_spec

    import crsm_planner.plugin as plugin

    reg = toy_registry()
    reg.register_plugin(plugin, distribution="crsm-planner", version="0")
    spec = toy_spec(d_model=d_model, backbone=backbone or {"kind": "toy-rnn", "n_layers": 2, "d_state": 16},
                    planner={"kind": "mcts", **planner})
    return statelab.build(spec, registry=reg, seed=seed)


def train_lm(model, batches, steps: int = 150, lr: float = 1e-2) -> float:
    """Plain next-token training of the model's backbone (the planner is not touched); returns the last loss."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        x = batches()
        logits, _, _ = model(x[:, :-1])  # (B, T-1, V)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    return loss.item()


_CACHE: dict[tuple, Any] = {}


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run tiny models on one intra-op thread (a pool only adds overhead on a loaded small runner)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def trained_planner_model(steps: int = 120, fit_steps: int = 80, **planner: Any):
    """A toy-rnn model trained on :func:`mode_switch_tokens` with a fitted planner, and the
    fit metrics. Memoised per arguments (tests share it); callers get a deep copy."""
    import copy

    key = (steps, fit_steps, tuple(sorted(planner.items())))
    if key not in _CACHE:
        with single_thread():
            tokens = mode_switch_tokens(20000)
            model = planner_model(**{"simulations": 16, "d_latent": 16, "gate_steps": 10, **planner})
            train_lm(model, window_batches(tokens, 16, 32), steps)
            metrics = {}
            if fit_steps:
                metrics = model.planner.fit(model, window_batches(tokens, 8, 40, seed=1), steps=fit_steps, lr=3e-3)
        _CACHE[key] = (model, metrics, tokens)
    model, metrics, tokens = _CACHE[key]
    return copy.deepcopy(model), dict(metrics), tokens
