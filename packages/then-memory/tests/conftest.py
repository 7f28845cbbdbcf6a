import pytest
import torch

import statelab.testing.toys as toys
from statelab.plugins import Registry


def then_registry() -> Registry:
    """The toys plus this package's components (no other plugin involved)."""
    import then_memory.plugin as plugin

    reg = Registry(strict=True)
    reg.register_plugin(toys, distribution="statelab-toys", version="0")
    reg.register_plugin(plugin, distribution="then-memory", version="0")
    return reg


def toy_then_spec(**then_params) -> dict:
    mem = {"kind": "then", "after_layer": 0, "n_heads": 2, "chunk_size": 4, "window": 8, "ring_size": 64, "top_k": 4}
    mem.update(then_params)
    return {
        "name": "then-toy",
        "tokenizer": {"kind": "byte"},
        "model": {"d_model": 16, "backbone": {"kind": "toy-rnn", "n_layers": 2, "d_state": 8}, "memories": [mem]},
        "train": {"steps": 4, "batch_size": 2, "seq_len": 16},
        "tracking": {"enabled": False},
    }


@pytest.fixture
def then_spec():
    return toy_then_spec


@pytest.fixture
def registry():
    return then_registry()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
