import importlib.metadata as md

from statelab.plugins import Registry


def test_entry_point_registers_without_failures():
    (ep,) = [e for e in md.entry_points(group="statelab") if e.name == "kssm-oscillators"]
    reg = Registry(strict=True)
    reg.register_plugin(ep.load(), distribution="kssm-oscillators", version=md.version("kssm-oscillators"))
    assert reg.failures == []
    for row in reg.listing():
        assert row["distribution"] == "kssm-oscillators"
