"""Registration of crsm-planner's components (cheap to import: params models only)."""

from __future__ import annotations

from statelab.plugins import Command, Component, hookimpl

from crsm_planner.mamba_params import MambaParams
from crsm_planner.planner_params import InjectionStabilityParams, LookaheadParams, MCTSParams, PlannerEffectParams

STATELAB_PLUGIN_API = 1


@hookimpl
def statelab_components() -> list[Component]:
    return [
        Component(
            "backbone", "mamba", MambaParams, "crsm_planner.backbone:build_mamba",
            "Mamba-1/Mamba-2 stack with a readable, steerable recurrent state",
            capabilities=frozenset({"injectable_state"}),
        ),
        Component(
            "planner", "mcts", MCTSParams, "crsm_planner.planner:build_planner",
            "asynchronous batched-PUCT search over a learned latent dynamics model, gated state injection",
            needs=frozenset({"injectable_state"}), publishes=["planner.alpha"],
        ),
        Component("probe", "planner-effect", PlannerEffectParams, "crsm_planner.probes:build_planner_effect",
                  "validation loss and samples with the planner off, on, and with random injections"),
        Component("probe", "injection-stability", InjectionStabilityParams, "crsm_planner.probes:build_injection_stability",
                  "1000+ consecutive injections: bounded norms, no NaN, valid tokens"),
        Component("task", "lookahead", LookaheadParams, "crsm_planner.lookahead:build_lookahead",
                  "reach or avoid a goal token within N steps on a random graph; off / planned / random / oracle"),
    ]


@hookimpl
def statelab_commands() -> list[Command]:
    return [Command("import-hf", "a local HuggingFace Mamba/Mamba-2 folder as a statelab run (checkpoint, spec, tokenizer)",
                    "crsm_planner.hf_import:configure", "crsm_planner.hf_import:run")]
