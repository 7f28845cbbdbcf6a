"""Registration of crsm-planner's components (cheap to import: no model code is loaded here)."""

from __future__ import annotations

from statelab.plugins import Component, hookimpl

STATELAB_PLUGIN_API = 1


@hookimpl
def statelab_components() -> list[Component]:
    return []
