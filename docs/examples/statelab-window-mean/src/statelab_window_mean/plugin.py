"""Registration: params model and a lazy factory reference (no torch code imported here)."""

from pydantic import BaseModel, ConfigDict, Field
from statelab.plugins import Component, hookimpl

STATELAB_PLUGIN_API = 1


class WindowMeanParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    window: int = Field(8, ge=1, le=4096, description="number of most recent positions averaged (the current one included)")


@hookimpl
def statelab_components():
    return [
        Component(
            slot="memory",
            name="window-mean",
            params=WindowMeanParams,
            factory="statelab_window_mean.window:build",
            description="mean of the last `window` hidden states, projected and added to the stream",
            publishes=["memory.recall"],
        )
    ]
