"""statelab: stateful sequence models assembled from plugins.

The public API. Everything a plugin may use is importable from here or from
``statelab.interfaces``, ``statelab.internals``, ``statelab.plugins``, ``statelab.spec``,
``statelab.testing`` and the runtime modules ``statelab.tokenizers``, ``statelab.data``,
``statelab.train``, ``statelab.callbacks``, ``statelab.checkpoint``, ``statelab.generation``,
``statelab.tracking`` and ``statelab.io`` (atomic writes). Names starting with an underscore are private.
"""

import sys
import types

from statelab.__about__ import __version__

#: public name -> module that defines it; loaded on first use (PEP 562), so importing
#: statelab (and running ``statelab --version``) does not import torch.
_LAZY: dict[str, str] = {
    **dict.fromkeys(["BuildContext", "build", "describe", "make_probe"], "statelab.build"),
    **dict.fromkeys(
        ["Aux", "Backbone", "Layer", "Memory", "Planner", "PlanRequest", "PlanResult", "Probe", "ProbeContext",
         "ProbeResult", "Regularizer", "State", "StatefulModule", "gated_inject"],
        "statelab.interfaces",
    ),
    **dict.fromkeys(["intervene", "publish", "select", "site"], "statelab.internals"),
    "StatelabModel": "statelab.model",
    **dict.fromkeys(["PLUGIN_API_VERSION", "CallbackEntry", "Component", "get_registry", "hookimpl"],
                    "statelab.plugins"),
    **dict.fromkeys(["Callback", "MicroBatch"], "statelab.callbacks"),
    **dict.fromkeys(["RunSpec", "SpecError", "parse_spec", "validate_spec"], "statelab.spec"),
    "UserError": "statelab.errors",
    "load": "statelab.checkpoint",
    "generate": "statelab.generation",
}

__all__ = [
    "Aux",
    "Backbone",
    "BuildContext",
    "Callback",
    "CallbackEntry",
    "Component",
    "Layer",
    "Memory",
    "MicroBatch",
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
    "UserError",
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


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'statelab' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


class _Package(types.ModuleType):
    """Importing the submodule ``statelab.build`` must not replace the function
    ``statelab.build`` (the import system sets the package attribute to the submodule);
    the submodule stays in ``sys.modules``."""

    def __setattr__(self, name: str, value: object) -> None:
        if name == "build" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
