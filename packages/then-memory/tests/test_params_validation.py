"""`statelab validate` refuses a head count that does not divide the model width."""

from __future__ import annotations

import pytest

from statelab.spec import SpecError, validate_spec


def spec(n_heads):
    return {"model": {"d_model": 64, "backbone": {"kind": "mamba", "n_layers": 2},
                      "memories": [{"kind": "then", "after_layer": 0, "n_heads": n_heads}]}}


def test_n_heads_must_divide_d_model():
    with pytest.raises(SpecError, match=r"model\.memories\.0: n_heads=5 does not divide d_model=64"):
        validate_spec(spec(5))
    validate_spec(spec(4))
