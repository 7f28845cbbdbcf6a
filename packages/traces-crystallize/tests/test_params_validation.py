"""`statelab validate` refuses a head count that does not divide the model width."""

from __future__ import annotations

import pytest

from statelab.spec import SpecError, validate_spec


def test_n_heads_must_divide_d_model():
    with pytest.raises(SpecError, match=r"model\.backbone: n_heads=5 does not divide d_model=64"):
        validate_spec({"model": {"d_model": 64, "backbone": {"kind": "transformer", "n_heads": 5}}})
    validate_spec({"model": {"d_model": 64, "backbone": {"kind": "transformer", "n_heads": 4}}})
