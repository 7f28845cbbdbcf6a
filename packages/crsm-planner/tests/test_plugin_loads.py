import importlib.metadata as md

from statelab.plugins import FIRST_PARTY, Registry


def test_entry_point_registers_the_documented_components():
    (ep,) = [e for e in md.entry_points(group="statelab") if e.name == "crsm-planner"]
    reg = Registry(strict=True)
    reg.register_plugin(ep.load(), distribution="crsm-planner", version=md.version("crsm-planner"))
    assert reg.failures == []
    for row in reg.listing():
        assert row["distribution"] == "crsm-planner"
    # the kinds the README and core's install hints (statelab.plugins.FIRST_PARTY) attribute to this package;
    # a subset test, so that adding a component does not break it
    documented = {key for key, dist in FIRST_PARTY.items() if dist == "crsm-planner"}
    assert documented, "FIRST_PARTY lists no component of crsm-planner"
    assert documented <= set(reg.components), f"documented but not registered: {sorted(documented - set(reg.components))}"
