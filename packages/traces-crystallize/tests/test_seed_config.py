"""The prototype's config keys as aliases of ours, and its three presets as specs (issue #24)."""

from pathlib import Path

import pytest
from pydantic import ValidationError

from statelab.spec import SpecError, load_document, validate_spec
from traces_crystallize.plugin import TransformerParams

CONFIGS = Path(__file__).resolve().parents[3] / "configs"


@pytest.mark.parametrize("name, expect", [
    ("conservative", {"traces.quota_per_head": 1024, "traces.alpha": 0.05, "traces.update_interval": 200,
                      "crystallization.enabled": False}),
    ("balanced", {"traces.threshold": 0.05, "traces.retention": 0.95, "traces.decay": 0.98, "traces.alpha": 0.1,
                  "traces.warmup_steps": 1000, "crystallization.max_motifs": 512, "crystallization.prune_interval": 1000}),
    ("aggressive", {"traces.quota_per_head": 4096, "traces.alpha": 0.2, "traces.update_interval": 50,
                    "crystallization.min_frequency": 50, "crystallization.max_motif_len": 12}),
])
def test_the_seeds_presets_validate_with_its_values(name, expect):
    r = validate_spec(CONFIGS / f"traces-{name}.yaml")
    p = r.backbone.params
    for path, value in expect.items():
        block, key = path.split(".")
        assert getattr(getattr(p, block), key) == value, path
    assert p.traces.enabled


def test_seed_keys_mean_the_same_as_ours():
    seed = TransformerParams.model_validate({
        "persistent_traces": {"enabled": True, "bias_strength": 0.3, "salience_threshold": 0.2,
                              "retention_rate": 0.5, "decay_rate": 0.7},
        "semantic_crystallization": {"enabled": True, "motif_max_length": 3}})
    ours = TransformerParams(traces={"enabled": True, "alpha": 0.3, "threshold": 0.2, "retention": 0.5, "decay": 0.7},
                             crystallization={"enabled": True, "max_motif_len": 3})
    assert seed == ours


def test_a_key_under_both_names_and_loss_weights_get_a_clear_message():
    with pytest.raises(ValidationError, match="'bias_strength' is the prototype's name for 'alpha'"):
        TransformerParams(traces={"alpha": 0.1, "bias_strength": 0.2})
    with pytest.raises(ValidationError, match="'persistent_traces' is the prototype's name for 'traces'"):
        TransformerParams.model_validate({"traces": {}, "persistent_traces": {}})
    doc = load_document(CONFIGS / "traces-balanced.yaml")
    doc["model"]["backbone"]["loss_weights"] = {"task": 1.0, "load_balance": 0.01, "trace_utilization": 0.005}
    with pytest.raises(SpecError, match=r"model.regularizers: \[\{kind: load-balance, weight: 0.01\}, "
                                        r"\{kind: trace-utilization, weight: 0.005\}\]"):
        validate_spec(doc)
