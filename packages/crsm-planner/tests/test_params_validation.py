"""`statelab validate` refuses mamba params that cannot build at the model's width, and fields of the other mixer."""

from __future__ import annotations

import pytest

from statelab.spec import SpecError, validate_spec


def check(backbone, d_model=64):
    return validate_spec({"model": {"d_model": d_model, "backbone": {"kind": "mamba", **backbone}}})


@pytest.mark.parametrize("backbone, message", [
    ({"mixer": "mamba1", "headdim": 32}, "headdim: mamba2 only, but mixer is mamba1; remove it or set mixer: mamba2"),
    ({"mixer": "mamba1", "ngroups": 2, "chunk_size": 8}, "chunk_size, ngroups: mamba2 only"),
    ({"mixer": "mamba2", "dt_rank": 4}, "dt_rank: mamba1 only, but mixer is mamba2"),
    ({"mixer": "mamba2", "headdim": 7}, "d_inner = expand * d_model = 128 is not divisible by headdim=7"),
    ({"mixer": "mamba2", "headdim": 32, "ngroups": 3}, "nheads = d_inner / headdim = 4 is not divisible by ngroups=3"),
])
def test_refused_with_the_reason(backbone, message):
    with pytest.raises(SpecError, match=r"model\.backbone: ") as err:
        check(backbone)
    assert message in str(err.value)


def test_valid_combinations_pass():
    check({"mixer": "mamba1", "dt_rank": 4})
    check({"mixer": "mamba2", "headdim": 32, "ngroups": 2})
    check({"mixer": "mamba2", "headdim": 16}, d_model=24)  # d_inner 48
