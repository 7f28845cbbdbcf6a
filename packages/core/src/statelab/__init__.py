"""statelab: stateful sequence models assembled from plugins.

The public API. Everything a plugin may use is importable from here or from
``statelab.interfaces``, ``statelab.internals``, ``statelab.plugins``, ``statelab.spec``,
``statelab.testing`` and the runtime modules ``statelab.tokenizers``, ``statelab.data``,
``statelab.train``, ``statelab.checkpoint``, ``statelab.generation``, ``statelab.tracking``
and ``statelab.io`` (atomic writes). Names starting with an underscore are private.
"""

from statelab.__about__ import __version__
from statelab.build import BuildContext, build, describe, make_probe
from statelab.interfaces import (
    Aux,
    Backbone,
    Layer,
    Memory,
    Planner,
    PlanRequest,
    PlanResult,
    Probe,
    ProbeContext,
    ProbeResult,
    Regularizer,
    State,
    StatefulModule,
    gated_inject,
)
from statelab.internals import intervene, publish, select, site
from statelab.model import StatelabModel
from statelab.plugins import PLUGIN_API_VERSION, Component, get_registry, hookimpl
from statelab.spec import RunSpec, SpecError, parse_spec, validate_spec

__all__ = [
    "Aux",
    "Backbone",
    "BuildContext",
    "Component",
    "Layer",
    "Memory",
    "PLUGIN_API_VERSION",
    "PlanRequest",
    "PlanResult",
    "Planner",
    "Probe",
    "ProbeContext",
    "ProbeResult",
    "Regularizer",
    "RunSpec",
    "SpecError",
    "State",
    "StatefulModule",
    "StatelabModel",
    "__version__",
    "build",
    "describe",
    "gated_inject",
    "generate",
    "get_registry",
    "hookimpl",
    "intervene",
    "load",
    "make_probe",
    "parse_spec",
    "publish",
    "select",
    "site",
    "validate_spec",
]


def __getattr__(name: str):  # runtime pieces load lazily: importing statelab stays cheap
    if name == "load":
        from statelab.checkpoint import load

        return load
    if name == "generate":
        from statelab.generation import generate

        return generate
    raise AttributeError(f"module 'statelab' has no attribute {name!r}")
