"""Params of the `mamba` backbone (owned by the backbone module's author)."""

from pydantic import BaseModel, ConfigDict, Field


class MambaParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n_layers: int = Field(4, ge=1, description="number of Mamba blocks")
