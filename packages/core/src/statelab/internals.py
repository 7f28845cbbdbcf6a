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
from typing import Callable, Iterator, Mapping, Union

import torch
from torch import Tensor

Forcing = Union[float, int, Tensor, Callable[[Tensor], Tensor]]

# Plain module state rather than ContextVars: torch.compile traces through reads and writes
# of module globals, while a ContextVar lookup is a graph break in every layer. Sites and
# interventions are therefore process-wide while active (the runtime runs models from one
# thread at a time; a planner's worker thread never enters a site).
_SITES: list[str] = []
_FORCINGS: dict[str, Forcing] = {}
_SEEN: list[set[str]] = []

__all__ = ["Forcing", "intervene", "key_name", "publish", "select", "site"]


def key_name(key: str) -> str:
    """``"backbone.layers.2:kssm.R"`` -> ``"kssm.R"``."""
    return key.rsplit(":", 1)[-1]


class site:
    """Qualify internals published inside this block with ``name`` (nested sites join with '.')."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __enter__(self) -> None:
        _SITES.append(self.name)

    def __exit__(self, *exc: object) -> None:
        _SITES.pop()


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
    key = f"{'.'.join(_SITES)}:{name}" if _SITES else name
    if _FORCINGS:
        forcing = _FORCINGS.get(key, _FORCINGS.get(name))
        if forcing is not None:
            value = _apply(forcing, value)
            for seen in _SEEN:
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
    saved = dict(_FORCINGS)
    _FORCINGS.update(dict(forcings))
    seen: set[str] = set()
    _SEEN.append(seen)
    failed = False
    try:
        yield seen
    except BaseException:
        failed = True
        raise
    finally:
        _FORCINGS.clear()
        _FORCINGS.update(saved)
        _SEEN[:] = [x for x in _SEEN if x is not seen]
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
