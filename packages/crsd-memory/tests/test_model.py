"""The components assembled into models through specs, and the spec-level errors."""

import pytest
import torch

import statelab
from statelab.spec import SpecError, validate_spec
from statelab.testing import check_model

HEBB = {"kind": "hebbian", "n_heads": 2, "chunk_size": 4}
EPI = {"kind": "episodic", "slots": 4, "chunk_size": 5}
DUAL = {"kind": "dual", "hebbian": {"n_heads": 2, "chunk_size": 4}, "episodic": {"slots": 4, "chunk_size": 5}}
CRSD = {"kind": "crsd", "n_layers": 2, "d_reservoir": 8, "hebbian": {"n_heads": 2}, "episodic": {"slots": 4}}
TOY = {"kind": "toy-rnn", "n_layers": 2, "d_state": 8}


def spec(backbone, memories=(), probes=()):
    return {"name": "t", "tokenizer": {"kind": "byte"}, "model": {"d_model": 16, "vocab_size": 32, "backbone": backbone,
            "memories": list(memories)}, "probes": list(probes), "tracking": {"enabled": False}}


@pytest.mark.parametrize("mem", [HEBB, EPI, DUAL])
@pytest.mark.parametrize("layer", [0, 1])
def test_memory_after_any_layer_of_a_toy_backbone(registry, mem, layer):
    check_model(lambda: statelab.build(spec(TOY, [{**mem, "after_layer": layer}]), registry=registry))


def test_crsd_model_with_an_extra_memory(registry):
    check_model(lambda: statelab.build(spec(CRSD, [{**HEBB, "after_layer": 0}]), registry=registry))


def test_internals_are_qualified_by_site(registry):
    model = statelab.build(spec(CRSD, [{**DUAL, "after_layer": 1}]), registry=registry)
    _, state, aux = model(torch.randint(0, 32, (2, 6)))
    assert "backbone.layers.0:memory.recall" in aux and "backbone.layers.1:crsd.update_gate" in aux
    assert "memory.0:memory.gate" in aux and "memory.0:memory.episodic_norm" in aux
    assert "memory.0.hebb_H" in state and "backbone.layers.1.mem_epi_slot_t" in state
    table = model.resolved.internals()
    assert set(table["memory.recall"]) == {"model.backbone", "model.memories.0"}


def test_bad_params_give_clear_errors(registry):
    with pytest.raises(SpecError, match="decay_min .* must be below decay_max"):
        validate_spec(spec(TOY, [{**HEBB, "decay_min": 0.9, "decay_max": 0.8, "after_layer": 0}]), registry)
    with pytest.raises(SpecError, match="memory_layers entry 5 is outside 0..1"):
        validate_spec(spec({**CRSD, "memory_layers": [5]}), registry)
    with pytest.raises(SpecError, match=r"model.memories.0.slot: unknown field"):
        validate_spec(spec(TOY, [{**EPI, "slot": 3, "after_layer": 0}]), registry)
    with pytest.raises(ValueError, match=r"topk \(9\) cannot exceed d_head \(8\)"):
        statelab.build(spec(TOY, [{**HEBB, "topk": 9, "after_layer": 0}]), registry=registry)


def test_memory_use_probe_needs_a_recall(registry):
    with pytest.raises(SpecError, match="probe 'memory-use' needs internal 'memory.recall'"):
        validate_spec(spec(TOY, probes=[{"kind": "memory-use"}]), registry)
    validate_spec(spec(CRSD, probes=[{"kind": "memory-use"}]), registry)


def test_bf16_autocast_keeps_memory_state_fp32(registry):
    model = statelab.build(spec(CRSD, [{**DUAL, "after_layer": 1}]), registry=registry).eval()
    tok = torch.randint(0, 32, (2, 10))
    with torch.no_grad():
        ref, _, _ = model(tok)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits, state, _ = model(tok)
            logits_t, _, _ = model.step(tok[:, 0], state)
    assert torch.isfinite(logits).all() and torch.isfinite(logits_t).all()
    for k, v in state.items():
        assert v.dtype in (torch.float32, torch.int64), k
    assert (logits.float() - ref).abs().max() < 0.1
