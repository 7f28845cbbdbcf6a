"""From a validated spec to a :class:`~statelab.model.StatelabModel`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel

from statelab.interfaces import Backbone, Memory, Planner, Probe, Regularizer
from statelab.model import StatelabModel
from statelab.plugins import Registry, get_registry
from statelab.spec import ResolvedComponent, ResolvedSpec, RunSpec, SpecError, SpecIssue, validate_spec


@dataclass
class BuildContext:
    """What a factory gets besides its params: ``factory(params, ctx)``.

    ``d_model`` and ``vocab_size`` of the model, ``n_layers`` of the backbone (``None``
    while building the backbone itself), the run spec, and ``layer`` (the backbone layer a
    memory is placed after; ``None`` otherwise).
    """

    d_model: int
    vocab_size: int
    n_layers: int | None
    spec: RunSpec
    layer: int | None = None
    kind: str = ""


def _make(rc: ResolvedComponent, ctx: BuildContext, expected: type) -> Any:
    factory = rc.component.load_factory()
    obj = factory(rc.params, ctx)
    if not isinstance(obj, expected):
        raise TypeError(
            f"{rc.path}: factory of {rc.component.slot} {rc.component.name!r} ({rc.component.distribution}) returned "
            f"{type(obj).__name__}, not a {expected.__name__}"
        )
    obj.kind = rc.component.name
    return obj


def resolve_vocab_size(spec: RunSpec, vocab_size: int | None) -> int:
    if spec.model.vocab_size is not None:
        return spec.model.vocab_size
    if vocab_size is not None:
        return vocab_size
    if spec.tokenizer.kind == "byte":
        return 256
    if spec.data.kind == "mqar":
        return spec.data.mqar.vocab_size
    raise SpecError(
        [
            SpecIssue(
                "model.vocab_size",
                f"the vocabulary size of a {spec.tokenizer.kind!r} tokenizer is known only once the corpus is read; "
                "set model.vocab_size, or build through `statelab train` (statelab.train.train), which derives it from statelab.data.make_data",
            )
        ]
    )


def build(
    spec: RunSpec | ResolvedSpec | dict[str, Any] | str | Path,
    *,
    vocab_size: int | None = None,
    registry: Registry | None = None,
    seed: int | None = None,
) -> StatelabModel:
    """Validate ``spec`` (if needed) and assemble the model it describes.

    Parameters are initialised under ``seed`` (default: the spec's seed) so a spec always
    builds the same model.
    """
    resolved = spec if isinstance(spec, ResolvedSpec) else validate_spec(spec, registry)
    rs = resolved.spec
    V = resolve_vocab_size(rs, vocab_size)
    D = rs.model.d_model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(rs.seed if seed is None else seed)
        backbone = _make(resolved.backbone, BuildContext(D, V, None, rs, kind=resolved.backbone.component.name), Backbone)
        n_layers = backbone.n_layers
        memories = []
        for rc, ms in zip(resolved.memories, rs.model.memories):
            ctx = BuildContext(D, V, n_layers, rs, layer=ms.after_layer, kind=rc.component.name)
            memories.append((ms.after_layer, _make(rc, ctx, Memory)))
        planner = None
        if resolved.planner is not None:
            planner = _make(resolved.planner, BuildContext(D, V, n_layers, rs, kind="planner"), Planner)
        regs = []
        for rc, regspec in zip(resolved.regularizers, rs.model.regularizers):
            regs.append((regspec.weight, _make(rc, BuildContext(D, V, n_layers, rs, kind=rc.component.name), Regularizer)))
        model = StatelabModel(
            vocab_size=V,
            d_model=D,
            backbone=backbone,
            memories=memories,
            planner=planner,
            regularizers=regs,
            tie_embeddings=rs.model.tie_embeddings,
            dropout=rs.model.dropout,
        )
    model.spec = rs
    model.resolved = resolved  # type: ignore[attr-defined]
    return model


def build_probe(rc: ResolvedComponent, model: StatelabModel) -> Probe:
    """Instantiate a probe from its resolved spec entry."""
    rs = model.spec
    ctx = BuildContext(model.d_model, model.vocab_size, model.backbone.n_layers, rs, kind=rc.component.name)
    factory = rc.component.load_factory()
    probe = factory(rc.params, ctx)
    if not isinstance(probe, Probe):
        raise TypeError(f"{rc.path}: probe factory returned {type(probe).__name__}, not a Probe")
    probe.kind = rc.component.name  # type: ignore[attr-defined]
    return probe


def make_probe(kind: str, params: dict[str, Any] | BaseModel | None, model: StatelabModel, registry: Registry | None = None) -> Probe:
    """Instantiate any registered probe by kind, with params validated by its model."""
    registry = registry or get_registry()
    comp = registry.get("probe", kind)
    p = params if isinstance(params, BaseModel) else comp.params.model_validate(params or {})
    published = set()
    if getattr(model, "resolved", None) is not None:
        published = set(model.resolved.internals())  # type: ignore[attr-defined]
        missing = [n for n in comp.required(p) if n not in published]
        if missing:
            raise SpecError(
                [SpecIssue(f"probe {kind}", f"needs internal {missing[0]!r}, which no component of this model publishes "
                           f"(published: {', '.join(sorted(published)) or '(none)'})")]
            )
    rc = ResolvedComponent(f"probe {kind}", None, comp, p)  # type: ignore[arg-type]
    return build_probe(rc, model)


def describe(model: StatelabModel) -> str:
    """Module tree, parameter count and published internals, for `statelab build`."""
    lines = [repr(model), "", f"parameters: {model.num_parameters():,} ({model.num_parameters(True):,} trainable)"]
    resolved = getattr(model, "resolved", None)
    if resolved is not None:
        table = resolved.internals()
        lines.append("internals: " + (", ".join(f"{k} ({', '.join(v)})" for k, v in sorted(table.items())) or "(none)"))
    return "\n".join(lines)
