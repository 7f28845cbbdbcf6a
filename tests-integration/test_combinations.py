"""Any combination, for real: every installed backbone x memory x planner, with every
regularizer the model has the internals for, built from a spec and taken through the
whole life of a run.

For each combination (ids like ``mamba2+hebbian@1+mcts``; derived from the registry in
``conftest.py``, so an absent plugin only shrinks the set): train 2 steps on CPU through
``statelab.train.train``, reload the checkpoint with ``statelab.load`` and check its logits
equal the trained model's, generate a few tokens with ``statelab.generate``, and run the
``causality`` probe (kssm-oscillators) on one internal the model publishes through
``statelab.make_probe``. Combinations that cannot work fail at validation with their exact
message (:class:`statelab.SpecError`).

Tiny on purpose (d_model 32, 2 layers, seq_len 16, batch 2, one evaluation, no samples):
the point is that the pieces fit, not that they learn. Check the time with
``python -m pytest tests-integration/test_combinations.py -q --durations=10``.
"""

from __future__ import annotations

import math

import pytest
import torch

import statelab
from statelab.interfaces import ProbeContext
from statelab.spec import SpecError, validate_spec
from statelab.train import train

VERDICTS = {"causal", "epiphenomenal", "constant"}
# the causality probe at its smallest: 4 windows of 8 tokens (exact sign-flip enumeration)
CAUSALITY = {"n_inputs": 4, "seq_len": 8, "batch_size": 4, "n_permutations": 100}


def _val_tokens() -> torch.Tensor:
    text = "First Citizen: Before we proceed any further, hear me speak. All: Speak, speak."
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)  # (N,) byte ids


def test_combination_trains_reloads_generates_and_probes(combo, registry, data_cache, tmp_path, one_thread):
    doc = combo.doc
    doc["data"]["cache_dir"] = data_cache

    # train: 2 steps, the final evaluation, the final checkpoint (and the planner fit)
    result = train(doc, out_dir=tmp_path / "runs", progress=False)
    assert result.status == "finished" and result.step == 2
    assert result.best_val_loss is not None and math.isfinite(result.best_val_loss)
    assert result.checkpoint is not None and result.checkpoint.is_dir()
    for i, name in enumerate(combo.regularizers):  # each regularizer took part in the loss
        assert math.isfinite(result.metrics[f"reg/{i}.{name}"]), name

    # reload from the run directory: same logits as the trained model
    trained = result.model.eval()
    loaded = statelab.load(result.run_dir)
    assert loaded.spec.model.backbone.kind == doc["model"]["backbone"]["kind"]
    tokens = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))  # (B, T)
    with torch.no_grad():
        want, _, _ = trained(tokens)
        got, _, _ = loaded(tokens)
    assert got.shape == (2, 12, 256)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

    # generate (with the planner's hook when there is one)
    out = statelab.generate(loaded, ["To be, or", "Hark"], max_new_tokens=4, temperature=1.0, seed=0)
    assert [len(t) for t in out.tokens] == [4, 4]
    assert all(0 <= t < 256 for row in out.tokens for t in row)
    if doc["model"]["planner"] is None:  # no background planner: sampling is reproducible
        again = statelab.generate(trained, ["To be, or", "Hark"], tokenizer=loaded.tokenizer, max_new_tokens=4,
                                  temperature=1.0, seed=0)
        assert again.tokens == out.tokens

    # the causality probe on one internal the model publishes; none published: a clear error
    if "causality" not in registry.names("probe"):
        pytest.skip("trained, reloaded and generated; the causality probe needs kssm-oscillators: "
                    "pip install kssm-oscillators")
    if combo.internal is None:
        with pytest.raises(SpecError, match=r"needs internal 'kssm.R', which no component of this model publishes"):
            statelab.make_probe("causality", {"internal": "kssm.R", **CAUSALITY}, loaded)
        return
    probe = statelab.make_probe("causality", {"internal": combo.internal, **CAUSALITY}, loaded)
    res = probe.run(loaded, ProbeContext(val_tokens=_val_tokens(), out_dir=tmp_path / "probe", seed=0))
    assert res.verdict in VERDICTS, res
    assert math.isfinite(res.metrics["std"])


def test_invalid_combination_fails_validation(invalid, registry):
    with pytest.raises(SpecError) as info:
        validate_spec(invalid.doc, registry)
    assert invalid.issue in [str(i) for i in info.value.issues]
    assert f"  - {invalid.issue}" in str(info.value)


def test_invalid_combination_messages_verbatim(registry):
    """Two of the generated expectations, written out, so the generator cannot drift."""
    if not {("backbone", "kssm"), ("planner", "mcts")} <= set(registry.components):
        pytest.skip("needs kssm-oscillators and crsm-planner")
    doc = {"model": {"d_model": 32, "backbone": {"kind": "kssm", "n_layers": 2}, "planner": {"kind": "mcts"}}}
    with pytest.raises(SpecError) as info:
        validate_spec(doc, registry)
    assert str(info.value) == (
        "invalid spec:\n"
        "  - model.planner: planner 'mcts' needs a backbone with injectable_state, but backbone 'kssm' does not "
        "provide it; use a steerable backbone (one with injectable state, such as 'mamba') or remove the planner"
    )
    doc = {"model": {"backbone": {"kind": "mamba", "n_layers": 2}, "regularizers": [{"kind": "bistability"}]}}
    with pytest.raises(SpecError) as info:
        validate_spec(doc, registry)
    assert str(info.value) == (
        "invalid spec:\n"
        "  - model.regularizers.0: regularizer 'bistability' needs internal 'kssm.u', which no component of this "
        "model publishes (published: (none))"
    )


def test_memory_outside_the_backbone_and_probe_without_internals(registry, tiny):
    if not {("backbone", "mamba"), ("memory", "hebbian"), ("probe", "r-zones")} <= set(registry.components):
        pytest.skip("needs crsm-planner, crsd-memory and kssm-oscillators")
    doc = tiny.doc(tiny.backbones["mamba2"], memories=[{"kind": "hebbian", "after_layer": 2}])
    doc["probes"] = [{"kind": "r-zones"}]
    with pytest.raises(SpecError) as info:
        validate_spec(doc, registry)
    assert [str(i) for i in info.value.issues] == [
        "model.memories.0.after_layer: after_layer 2 is outside the backbone's layers 0..1",
        "probes.0: probe 'r-zones' needs internal 'kssm.R', which no component of this model publishes "
        "(published: memory.gate, memory.recall)",
    ]


def test_regularizers_follow_the_published_internals(registry, all_combos):
    """What the combinations get, written out for the first-party backbones (the set above is
    derived from each component's publishes/requires; this pins what those declare)."""
    expected = {
        "mamba2": [],
        "crsd": [],
        "kssm": ["bistability"],
        "transformer": ["crystallization", "ewc", "load-balance", "trace-utilization"],
    }
    needed = {("backbone", "mamba"), ("backbone", "crsd"), ("backbone", "kssm"), ("backbone", "transformer"),
              ("regularizer", "bistability"), ("regularizer", "load-balance")}
    if not needed <= set(registry.components):
        pytest.skip("needs every first-party plugin")
    got = {c.id: c.regularizers for c in all_combos if c.id in expected}
    assert got == expected
