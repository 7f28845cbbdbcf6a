import pytest
import torch

import statelab.testing.toys as toys
from statelab.plugins import Registry

import crsd_memory.plugin as plugin


@pytest.fixture
def registry() -> Registry:
    """The toys and this package's components, registered strictly (no entry points)."""
    reg = Registry(strict=True)
    reg.register_plugin(toys, distribution="statelab-toys", version="0")
    reg.register_plugin(plugin, distribution="crsd-memory", version="test")
    return reg


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
