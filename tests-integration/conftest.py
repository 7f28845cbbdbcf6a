"""Shared fixtures of the integration tests: the real registry and tiny specs.

The tests here use the installed plugins through their entry points
(``statelab.plugins.get_registry()``), never the toys, except where a test says so.
Everything a test writes goes under pytest's temporary directories; nothing is written
into the repository and tracking is off unless a test points it at a temporary store.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

ROOT = Path(__file__).resolve().parents[1]

# Tiny settings of every first-party component (d_model 32, 2 layers): the integration tests
# prove that the pieces fit together, not that they learn. Third-party kinds found in the
# registry run with their own defaults (plus n_layers 2 for a backbone).
TINY_BACKBONES: dict[str, dict[str, Any]] = {
    # variant id -> backbone spec
    "mamba1": {"kind": "mamba", "mixer": "mamba1", "n_layers": 2, "d_state": 8, "expand": 2},
    "mamba2": {"kind": "mamba", "mixer": "mamba2", "n_layers": 2, "d_state": 8, "headdim": 16, "chunk_size": 8},
    "crsd": {"kind": "crsd", "n_layers": 2, "d_reservoir": 8, "chunk_size": 8,
             "hebbian": {"n_heads": 2, "chunk_size": 8}, "episodic": {"slots": 4, "chunk_size": 8}},
    "kssm": {"kind": "kssm", "n_layers": 2, "n_oscillators": 8, "n_harmonics": 2, "group_levels": [1, 2],
             "substeps": 1, "readout_mult": 1},
    # a MoE transformer with traces and crystallization on, so every traces-crystallize
    # regularizer has its internals (router.probs, traces.alpha)
    "transformer": {"kind": "transformer", "n_layers": 2, "n_heads": 2, "max_seq_len": 32, "mlp_ratio": 1.0,
                    "ffn": "moe", "n_experts": 2, "top_k": 1,
                    "traces": {"enabled": True, "quota_per_head": 16, "warmup_steps": 0, "update_interval": 1,
                               "alpha_warmup_steps": 1},
                    "crystallization": {"enabled": True, "log_interval": 1, "max_log_tokens": 32, "max_nodes": 64,
                                        "max_motifs": 8, "min_frequency": 1, "prune_interval": 2}},
}
TINY_MEMORIES: dict[str, dict[str, Any]] = {
    "hebbian": {"n_heads": 2, "chunk_size": 8},
    "episodic": {"slots": 4, "chunk_size": 8},
    "dual": {"hebbian": {"n_heads": 2, "chunk_size": 8}, "episodic": {"slots": 4, "chunk_size": 8}},
    "then": {"n_heads": 2, "chunk_size": 8, "window": 8, "ring_size": 16, "top_k": 2},
}
TINY_PLANNERS: dict[str, dict[str, Any]] = {
    "mcts": {"d_latent": 8, "d_token": 8, "d_hidden": 16, "value_horizon": 2, "fit_rollout_batches": 1,
             "fit_multistep": 2, "gate_steps": 1, "simulations": 2, "depth": 1, "top_k": 2, "max_nodes": 8,
             "plan_every": 2},
}


def tiny_doc(
    backbone: dict[str, Any],
    *,
    name: str = "combo",
    memories: list[dict[str, Any]] = (),  # type: ignore[assignment]
    planner: dict[str, Any] | None = None,
    regularizers: list[dict[str, Any]] = (),  # type: ignore[assignment]
    steps: int = 2,
    cache_dir: str | None = None,
    tracking: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A spec document: byte tokenizer, bundled corpus, d_model 32, seq_len 16, batch 2, CPU,
    one evaluation (at the end), no samples, tracking off unless given."""
    return {
        "name": name,
        "seed": 0,
        "tokenizer": {"kind": "byte"},
        "data": {"kind": "text", "cache_dir": cache_dir},
        "model": {
            "d_model": 32,
            "backbone": copy.deepcopy(backbone),
            "memories": copy.deepcopy(list(memories)),
            "planner": copy.deepcopy(planner),
            "regularizers": copy.deepcopy(list(regularizers)),
        },
        "train": {
            "steps": steps,
            "batch_size": 2,
            "seq_len": 16,
            "lr": 1e-3,
            "warmup_steps": 0,
            "eval_interval": 10_000,  # evaluated once, at the end
            "eval_batches": 1,
            "log_interval": 1,
            "checkpoint_interval": 10_000,
            "sample_tokens": 0,
            "device": "cpu",
            "planner_fit": {"steps": 2, "batch_size": 2, "seq_len": 8},
        },
        "tracking": tracking or {"enabled": False},
    }


@pytest.fixture(scope="session")
def registry():
    """The real registry (entry points); a plugin that failed to load is a test failure."""
    from statelab.plugins import get_registry

    reg = get_registry()
    assert not reg.failures, "plugins failed to load:\n" + "\n".join(str(f) for f in reg.failures)
    return reg


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> str:
    """One tokenized-corpus cache for the session, outside the repository and ~/.cache."""
    return str(tmp_path_factory.mktemp("statelab-cache"))


@pytest.fixture
def one_thread():
    """Tiny models run faster single-threaded (and do not fight a busy CI machine)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------------------
# the combinations, derived from the registry at collection time

#: internals the causality probe is run on, in order of preference (else the first one the
#: backbone or a memory publishes)
PREFERRED_INTERNALS = ("kssm.R", "crsd.update_gate", "router.probs", "memory.recall")


@dataclass
class Combo:
    id: str
    doc: dict[str, Any]
    regularizers: list[str] = field(default_factory=list)
    internal: str | None = None  # causality target; None: the model publishes none
    published: list[str] = field(default_factory=list)


@dataclass
class Invalid:
    id: str
    doc: dict[str, Any]
    issue: str  # the exact "path: message" line SpecError must hold


def backbone_variants(reg) -> dict[str, dict[str, Any]]:
    out = {}
    for kind in reg.names("backbone"):
        if kind == "mamba":
            out["mamba1"], out["mamba2"] = TINY_BACKBONES["mamba1"], TINY_BACKBONES["mamba2"]
        else:
            out[kind] = TINY_BACKBONES.get(kind, {"kind": kind, "n_layers": 2})
    return out


def _default_params(comp):
    from pydantic import ValidationError

    try:
        return comp.params()
    except ValidationError:  # required fields: not usable without settings we do not know
        return None


def combinations(reg) -> list[Combo]:
    """Every backbone variant x (no memory | each memory after layer 1) x (no planner | each
    planner the backbone can host), with every regularizer whose internals the model has."""
    from statelab.spec import validate_spec

    combos = []
    for bid, bb in backbone_variants(reg).items():
        caps = reg.get("backbone", bb["kind"]).capabilities
        for mem in [None, *reg.names("memory")]:
            for pl in [None, *reg.names("planner")]:
                if pl is not None and not reg.get("planner", pl).needs <= caps:
                    continue
                memories = [] if mem is None else [{"kind": mem, "after_layer": 1, **TINY_MEMORIES.get(mem, {})}]
                planner = None if pl is None else {"kind": pl, **TINY_PLANNERS.get(pl, {})}
                cid = bid + (f"+{mem}@1" if mem else "") + (f"+{pl}" if pl else "")
                doc = tiny_doc(bb, name=cid.replace("+", "-").replace("@", "-"), memories=memories, planner=planner)
                resolved = validate_spec(doc, reg)
                published = resolved.internals()
                regs = []
                for rname in reg.names("regularizer"):
                    comp = reg.get("regularizer", rname)
                    params = _default_params(comp)
                    if params is not None and all(n in published for n in comp.required(params)):
                        regs.append(rname)
                doc["model"]["regularizers"] = [{"kind": r, "weight": 0.01} for r in regs]
                own = [n for rc in [resolved.backbone, *resolved.memories] for n in rc.component.published(rc.params)]
                internal = next((n for n in PREFERRED_INTERNALS if n in own), own[0] if own else None)
                combos.append(Combo(cid, doc, regs, internal, sorted(published)))
    return combos


def invalid_combinations(reg) -> list[Invalid]:
    """Combinations that cannot work, each with the exact message validation must give."""
    from statelab.spec import validate_spec

    variants = backbone_variants(reg)
    if "transformer" in variants:  # the dense transformer publishes no router.probs
        variants["transformer-mlp"] = {"kind": "transformer", "n_layers": 2, "n_heads": 2, "max_seq_len": 32}
    out = []
    for bid, bb in variants.items():
        comp = reg.get("backbone", bb["kind"])
        for pl in reg.names("planner"):
            missing = reg.get("planner", pl).needs - comp.capabilities
            if missing:
                doc = tiny_doc(bb, planner={"kind": pl, **TINY_PLANNERS.get(pl, {})})
                out.append(Invalid(
                    f"{bid}+{pl}", doc,
                    f"model.planner: planner {pl!r} needs a backbone with {', '.join(sorted(missing))}, but backbone "
                    f"{bb['kind']!r} does not provide it; use a steerable backbone (one with injectable state, such "
                    f"as 'mamba') or remove the planner",
                ))
        published = validate_spec(tiny_doc(bb), reg).internals()
        have = ", ".join(sorted(published)) or "(none)"
        for rname in reg.names("regularizer"):
            rcomp = reg.get("regularizer", rname)
            params = _default_params(rcomp)
            if params is None:
                continue
            missing = [n for n in rcomp.required(params) if n not in published]
            if missing:
                doc = tiny_doc(bb, regularizers=[{"kind": rname, "weight": 0.01}])
                out.append(Invalid(
                    f"{bid}+{rname}", doc,
                    f"model.regularizers.0: regularizer {rname!r} needs internal {missing[0]!r}, which no component "
                    f"of this model publishes (published: {have})",
                ))
    return out


def pytest_generate_tests(metafunc):
    if "combo" in metafunc.fixturenames or "invalid" in metafunc.fixturenames:
        from statelab.plugins import get_registry

        reg = get_registry()
        if "combo" in metafunc.fixturenames:
            combos = combinations(reg)
            metafunc.parametrize("combo", combos, ids=[c.id for c in combos])
        if "invalid" in metafunc.fixturenames:
            bad = invalid_combinations(reg)
            metafunc.parametrize("invalid", bad, ids=[b.id for b in bad])


@pytest.fixture(scope="session")
def all_combos(registry) -> list[Combo]:
    return combinations(registry)


@pytest.fixture
def tiny():
    """The tiny-spec helpers, for test modules (conftest is not importable under importlib mode)."""
    import types

    return types.SimpleNamespace(doc=tiny_doc, backbones=TINY_BACKBONES, memories=TINY_MEMORIES, planners=TINY_PLANNERS)
