import importlib.metadata as md

from statelab.plugins import Registry


def test_entry_point_registers_without_failures():
    (ep,) = [e for e in md.entry_points(group="statelab") if e.name == "crsd-memory"]
    reg = Registry(strict=True)
    reg.register_plugin(ep.load(), distribution="crsd-memory", version=md.version("crsd-memory"))
    assert reg.failures == []
    for row in reg.listing():
        assert row["distribution"] == "crsd-memory"
