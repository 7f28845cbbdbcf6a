"""Named internals and interventions.

A component publishes a tensor under a dotted name (``kssm.R``, ``router.probs``,
``memory.gate``) with :func:`publish`, and *continues its computation with the tensor
that ``publish`` returns*. Normally that is the same tensor; inside an :func:`intervene`
block it is the forced value, which is how an intervention reaches the output.

The assembled model runs each component inside :func:`site` so that published keys are
qualified by where they were produced: ``"backbone.layers.2:kssm.R"``. Outside a site
(a component used on its own) the key is the bare name.

    with statelab.intervene({"kssm.R": 0.5}):                # every site
        logits, _, _ = model(tokens)
    with statelab.intervene({"backbone.layers.1:kssm.R": lambda r: r.clamp(max=0.2)}):
        ...
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Iterator, Mapping, Union

import torch
from torch import Tensor

Forcing = Union[float, int, Tensor, Callable[[Tensor], Tensor]]

_site: contextvars.ContextVar[str | None] = contextvars.ContextVar("statelab_site", default=None)
_forcings: contextvars.ContextVar[dict[str, Forcing]] = contextvars.ContextVar("statelab_forcings", default={})
_seen: contextvars.ContextVar[set[str] | None] = contextvars.ContextVar("statelab_seen", default=None)

__all__ = ["Forcing", "intervene", "key_name", "publish", "select", "site"]


def key_name(key: str) -> str:
    """``"backbone.layers.2:kssm.R"`` -> ``"kssm.R"``."""
    return key.rsplit(":", 1)[-1]


@contextlib.contextmanager
def site(name: str) -> Iterator[None]:
    """Qualify internals published inside this block with ``name`` (nested sites join with '.')."""
    outer = _site.get()
    token = _site.set(f"{outer}.{name}" if outer else name)
    try:
        yield
    finally:
        _site.reset(token)


def _apply(forcing: Forcing, value: Tensor) -> Tensor:
    if callable(forcing):
        out = forcing(value)
    else:
        out = torch.as_tensor(forcing, dtype=value.dtype, device=value.device)
    if out.shape != value.shape:
        out = out.expand_as(value)
    return out.to(dtype=value.dtype, device=value.device)


def publish(aux: dict[str, Tensor], name: str, value: Tensor) -> Tensor:
    """Record ``value`` as internal ``name`` in ``aux`` and return the tensor to use.

    If an active :func:`intervene` block forces ``name`` (or ``"<site>:<name>"``), the
    forced value is returned and recorded instead.
    """
    where = _site.get()
    key = f"{where}:{name}" if where else name
    forcings = _forcings.get()
    forcing = forcings.get(key, forcings.get(name))
    if forcing is not None:
        value = _apply(forcing, value)
        seen = _seen.get()
        if seen is not None:
            seen.add(key)
    aux[key] = value
    return value


@contextlib.contextmanager
def intervene(forcings: Mapping[str, Forcing], *, strict: bool = True) -> Iterator[set[str]]:
    """Force named internals during the forward passes in this block.

    Keys are bare names (every site) or qualified ``"<site>:<name>"``. Values are a
    number or tensor (broadcast to the internal's shape) or a function of the original
    tensor. Yields the set of keys actually forced; with ``strict`` (default) leaving the
    block without having forced a requested name raises ``LookupError``, so a typo in an
    internal's name never passes silently as "no effect".
    """
    merged = {**_forcings.get(), **dict(forcings)}
    token = _forcings.set(merged)
    seen: set[str] = set()
    seen_token = _seen.set(seen)
    failed = False
    try:
        yield seen
    except BaseException:
        failed = True
        raise
    finally:
        _forcings.reset(token)
        _seen.reset(seen_token)
        if strict and not failed:
            missing = [k for k in forcings if not any(s == k or key_name(s) == k for s in seen)]
            if missing:
                raise LookupError(
                    f"intervene: no component published {missing} inside the block; "
                    "check the name with `statelab build SPEC` (it lists published internals)"
                )


def select(aux: Mapping[str, Tensor], name: str) -> dict[str, Tensor]:
    """All entries of ``aux`` for internal ``name`` (bare or qualified), keyed by full key."""
    if ":" in name:
        return {name: aux[name]} if name in aux else {}
    return {k: v for k, v in aux.items() if key_name(k) == name}
