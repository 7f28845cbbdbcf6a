"""Benchmark tasks (the ``task`` slot) and the helpers they share.

Core ships ``lm`` (held-out text: bits per character and byte), ``mqar`` (Zoology's
multi-query associative recall), ``passkey`` (retrieval from Landmark or real-text filler,
one or several keys, a length x depth grid), ``copy`` (selective copying) and ``induction``;
they are registered by :mod:`statelab.builtin` through the ``statelab`` entry-point group like
any plugin's components. :func:`make_task` instantiates any registered task.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.nn.functional as F
from pydantic import BaseModel

from statelab.interfaces import Task


def make_task(kind: str, params: dict[str, Any] | BaseModel | None = None, registry: Any = None) -> Task:
    """The registered task ``kind`` with ``params`` validated by its params model."""
    from statelab.plugins import get_registry, unknown_kind_message
    from statelab.spec import SpecError, SpecIssue, _pydantic_issues
    from pydantic import ValidationError

    registry = registry or get_registry()
    if ("task", kind) not in registry:
        raise SpecError([SpecIssue("task", unknown_kind_message(registry, "task", kind))])
    comp = registry.get("task", kind)
    if isinstance(params, BaseModel):
        p = params
    else:
        try:
            p = comp.params.model_validate(params or {})
        except ValidationError as err:
            raise SpecError(_pydantic_issues(err, f"task {kind}")) from None
    task = comp.load_factory()(p, None)
    if not isinstance(task, Task):
        raise TypeError(f"task factory of {kind!r} ({comp.distribution}) returned {type(task).__name__}, not a Task")
    task.kind = kind
    return task


@torch.no_grad()
def masked_eval(model, batches: Iterable[Any], device: torch.device) -> dict[str, Any]:
    """Loss and accuracy over the masked positions of ``batches``.

    Returns ``loss`` (nats per counted token), ``accuracy`` (per counted token) and
    ``example_accuracy``: one value per example, 1.0 when every counted position of the
    example is right (a whole answer), as a list for intervals.
    """
    was = model.training
    model.eval()
    loss_sum, hits, count, per_example = 0.0, 0.0, 0.0, []
    try:
        for b in batches:
            b = b.to(device)
            logits, _, _ = model(b.x)  # (B, T, V)
            mask = b.mask if b.mask is not None else torch.ones_like(b.y, dtype=torch.bool)
            ce = F.cross_entropy(logits.float().transpose(1, 2), b.y, reduction="none")  # (B, T)
            right = (logits.argmax(-1) == b.y) & mask  # (B, T)
            loss_sum += float((ce * mask).sum())
            hits += float(right.sum())
            count += float(mask.sum())
            per_example += (right.sum(1) == mask.sum(1)).double().tolist()
    finally:
        model.train(was)
    if count == 0:
        raise ValueError("evaluation saw no counted positions")
    return {"loss": loss_sum / count, "accuracy": hits / count, "example_accuracy": per_example}


@torch.no_grad()
def state_bytes(model, seq_len: int, device: torch.device) -> int:
    """Bytes of one row's recurrent state after reading ``seq_len`` tokens (attention caches
    grow with ``seq_len``; a recurrent state does not), in the model's own dtypes."""
    was = model.training
    model.eval()
    try:
        _, state, _ = model(torch.zeros(1, seq_len, dtype=torch.long, device=device))
    finally:
        model.train(was)
    return int(sum(t.numel() * t.element_size() for t in state.values()))


__all__ = ["make_task", "masked_eval", "state_bytes"]
