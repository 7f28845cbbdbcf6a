"""Params of the `mcts` planner and the planner probes (owned by the planner's author)."""

from pydantic import BaseModel, ConfigDict


class MCTSParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PlannerEffectParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InjectionStabilityParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
