"""The optimizer and learning-rate schedule used by the trainer.

* AdamW with two parameter groups: weight decay on matrices (``ndim >= 2``) only; never on
  norms, biases, embeddings (any parameter owned by an ``nn.Embedding``, including a head
  tied to it) or scalars. Fused on CUDA.
* Schedule: linear warmup from ``lr / warmup_steps`` to ``lr`` over ``warmup_steps``, then a
  cosine from ``lr`` to ``min_lr`` over ``decay_steps`` (default: ``steps``), then flat at
  ``min_lr``. The schedule is a pure function of the step, so resuming needs no scheduler
  state beyond the step.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from statelab.spec import TrainSpec

__all__ = ["lr_at", "make_optimizer", "param_groups", "set_lr"]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split trainable parameters into a decayed and a non-decayed group (tied weights once)."""
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (no_decay if p.ndim < 2 or id(p) in embedding_ids else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def make_optimizer(model: nn.Module, cfg: TrainSpec, device: torch.device) -> torch.optim.AdamW:
    groups = param_groups(model, cfg.weight_decay)
    kwargs = {}
    if device.type == "cuda":
        kwargs["fused"] = True
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), **kwargs)


def lr_at(step: int, cfg: TrainSpec) -> float:
    """Learning rate for optimizer step ``step`` (0-based)."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay_steps = cfg.decay_steps or cfg.steps
    span = max(1, decay_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
