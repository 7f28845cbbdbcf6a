"""The SSM backbones assembled into models through specs: conformance of the model, spec errors."""

import pytest

import statelab
from statelab.spec import SpecError, validate_spec
from statelab.testing import check_model

# through a spec, the variants the backbone tests do not run through the kit (S4D, S5, RetNet and
# LinOSS-IM are checked there as backbones; a model adds only the embedding and head around them)
BACKBONES = {
    "linoss": {"kind": "linoss", "n_layers": 2, "d_state": 6, "variant": "imex", "chunk_size": 4},
    "samba": {"kind": "samba", "n_layers": 2, "window": 4, "n_heads": 2, "mamba": {"mixer": "mamba2", "headdim": 8,
                                                                                    "d_state": 4, "chunk_size": 4}},
}


def spec(backbone):
    return {"name": "t", "tokenizer": {"kind": "byte"}, "model": {"d_model": 16, "vocab_size": 32, "backbone": backbone},
            "tracking": {"enabled": False}}


@pytest.mark.parametrize("kind", sorted(BACKBONES))
def test_model_conformance(registry, kind):
    check_model(lambda: statelab.build(spec(BACKBONES[kind]), registry=registry), atol=1e-4, rtol=1e-3)


def test_bad_params_give_clear_errors(registry):
    with pytest.raises(SpecError, match=r"dt_min \(0.5\) must not exceed dt_max"):
        validate_spec(spec({"kind": "s4d", "dt_min": 0.5, "dt_max": 0.1}), registry)
    with pytest.raises(SpecError, match=r"model.backbone.d_stat: unknown field"):
        validate_spec(spec({"kind": "s4d", "d_stat": 3}), registry)
    with pytest.raises(SpecError, match=r"n_heads \(3\) must divide d_model \(16\)"):
        validate_spec(spec({"kind": "retnet", "n_heads": 3}), registry)
