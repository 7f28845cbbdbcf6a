import pytest
import statelab.testing.toys as toys
from statelab.plugins import Registry

import kssm_oscillators.plugin as kssm_plugin

TINY_KSSM = {"kind": "kssm", "n_layers": 2, "n_oscillators": 16, "group_levels": [1, 4], "n_harmonics": 2,
             "readout_mult": 1}


def make_registry(*extra) -> Registry:
    reg = Registry(strict=True)
    reg.register_plugin(toys, distribution="statelab-toys", version="0")
    reg.register_plugin(kssm_plugin, distribution="kssm-oscillators", version="0")
    for plugin in extra:
        reg.register_plugin(plugin, distribution="kssm-tests", version="0")
    return reg


def tiny_spec(backbone=None, regularizers=(), d_model=16, vocab_size=24) -> dict:
    return {
        "name": "kssm-test",
        "tokenizer": {"kind": "byte"},
        "model": {"d_model": d_model, "vocab_size": vocab_size, "backbone": dict(backbone or TINY_KSSM),
                  "regularizers": list(regularizers)},
        "tracking": {"enabled": False},
    }


@pytest.fixture
def registry() -> Registry:
    return make_registry()


@pytest.fixture
def spec():
    """``spec(backbone=None, regularizers=(), ...)`` -> a tiny spec dict with the kssm backbone."""
    return tiny_spec


@pytest.fixture
def tiny_kssm() -> dict:
    return dict(TINY_KSSM)


@pytest.fixture(autouse=True)
def _one_thread():
    """These models are tiny: intra-op threads only add overhead (and thrash on a busy machine)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
