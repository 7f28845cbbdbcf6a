"""Plugin loading through real entry points (fake distributions on sys.path)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from statelab.plugins import PLUGIN_API_VERSION, DuplicateComponentError, IncompatiblePluginError, Registry

GOOD = """
from pydantic import BaseModel, ConfigDict, Field
from statelab.plugins import Component, hookimpl
STATELAB_PLUGIN_API = {api}

class P(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n_layers: int = Field(1, description="layers")

@hookimpl
def statelab_components():
    return [Component("backbone", "{name}", P, "statelab.testing.toys:_toy_mlp", "a test backbone")]
"""


def make_dist(root: Path, dist: str, version: str, module: str, source: str) -> None:
    """A minimal installed distribution: a module plus a dist-info with a statelab entry point."""
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[statelab]\n{dist} = {module}\n")


@pytest.fixture
def site(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("STATELAB_PLUGINS", "")  # overwritten per test; "" selects nothing
    monkeypatch.delenv("STATELAB_NO_PLUGINS", raising=False)
    return tmp_path


def _load(monkeypatch, names: str, strict: bool = False) -> Registry:
    monkeypatch.setenv("STATELAB_PLUGINS", names)
    reg = Registry(strict=strict)
    reg.load_entry_points()
    return reg


def test_good_plugin_is_listed_with_its_distribution(site, monkeypatch):
    make_dist(site, "good-plug", "1.2.3", "good_plug_mod", GOOD.format(api=PLUGIN_API_VERSION, name="alpha"))
    reg = _load(monkeypatch, "good-plug")
    assert reg.failures == []
    assert reg.listing() == [
        {"slot": "backbone", "name": "alpha", "distribution": "good-plug", "version": "1.2.3", "description": "a test backbone"}
    ]


def test_broken_plugin_is_reported_and_others_still_load(site, monkeypatch):
    make_dist(site, "good-plug", "1.0", "good_plug_mod2", GOOD.format(api=PLUGIN_API_VERSION, name="alpha"))
    make_dist(site, "broken-plug", "0.3", "broken_plug_mod", "raise ImportError('needs libfoo')\n")
    reg = _load(monkeypatch, "good-plug,broken-plug")
    assert reg.names("backbone") == ["alpha"]
    (failure,) = reg.failures
    assert (failure.distribution, failure.version, failure.entry_point) == ("broken-plug", "0.3", "broken-plug")
    assert failure.error == "ImportError: needs libfoo"
    assert "broken-plug 0.3" in str(failure)


def test_strict_mode_reraises(site, monkeypatch):
    make_dist(site, "broken-plug", "0.3", "broken_plug_mod3", "raise ImportError('needs libfoo')\n")
    with pytest.raises(ImportError, match="needs libfoo"):
        _load(monkeypatch, "broken-plug", strict=True)


def test_duplicate_names_are_an_error_naming_both_distributions(site, monkeypatch):
    make_dist(site, "plug-a", "1.0", "plug_a_mod", GOOD.format(api=PLUGIN_API_VERSION, name="same"))
    make_dist(site, "plug-b", "2.0", "plug_b_mod", GOOD.format(api=PLUGIN_API_VERSION, name="same"))
    reg = _load(monkeypatch, "plug-a,plug-b")
    expected = "backbone 'same' is registered by both plug-a 1.0 and plug-b 2.0; uninstall one of them (or select plugins with STATELAB_PLUGINS)"
    assert [f.error for f in reg.failures] == [expected]
    with pytest.raises(DuplicateComponentError) as exc:
        reg.get("backbone", "same")
    assert str(exc.value) == expected
    with pytest.raises(DuplicateComponentError):
        _load(monkeypatch, "plug-a,plug-b", strict=True)


def test_incompatible_api_is_refused_with_its_name(site, monkeypatch):
    make_dist(site, "old-plug", "0.0.1", "old_plug_mod", GOOD.format(api=0, name="old"))
    reg = _load(monkeypatch, "old-plug")
    assert reg.names("backbone") == []
    (failure,) = reg.failures
    assert failure.error.startswith("IncompatiblePluginError: old-plug 0.0.1 was written for statelab plugin API 0;")
    assert f"provides API {PLUGIN_API_VERSION}" in failure.error
    with pytest.raises(IncompatiblePluginError):
        _load(monkeypatch, "old-plug", strict=True)


def test_environment_switches_select_some_or_none(site, monkeypatch):
    make_dist(site, "plug-a", "1.0", "plug_a_mod2", GOOD.format(api=PLUGIN_API_VERSION, name="a"))
    make_dist(site, "plug-b", "1.0", "plug_b_mod2", GOOD.format(api=PLUGIN_API_VERSION, name="b"))
    assert _load(monkeypatch, "plug-b").names("backbone") == ["b"]
    monkeypatch.setenv("STATELAB_NO_PLUGINS", "1")
    assert _load(monkeypatch, "plug-a,plug-b").names("backbone") == []


def test_plugin_returning_garbage_is_a_failure_not_a_crash():
    import types

    mod = types.ModuleType("garbage_plugin")
    mod.STATELAB_PLUGIN_API = PLUGIN_API_VERSION
    from statelab.plugins import hookimpl

    @hookimpl
    def statelab_components():
        return ["not a component"]

    mod.statelab_components = statelab_components
    reg = Registry()
    assert reg.register_plugin(mod, distribution="garbage", version="1") == []
    assert reg.failures[0].error == "PluginError: statelab_components returned str, not Component"


def test_cli_plugins_json_lists_components_and_failures(site, monkeypatch):
    make_dist(site, "good-plug", "1.2.3", "good_plug_mod4", GOOD.format(api=PLUGIN_API_VERSION, name="alpha"))
    make_dist(site, "broken-plug", "0.3", "broken_plug_mod4", "raise RuntimeError('boom')\n")
    env = {**__import__("os").environ, "PYTHONPATH": str(site), "STATELAB_PLUGINS": "good-plug,broken-plug"}
    out = subprocess.run([sys.executable, "-m", "statelab", "plugins", "--json"], capture_output=True, text=True, env=env, check=True)
    data = json.loads(out.stdout)
    assert [(c["slot"], c["name"], c["distribution"]) for c in data["components"]] == [("backbone", "alpha", "good-plug")]
    assert data["failures"] == [
        {"entry_point": "broken-plug", "distribution": "broken-plug", "version": "0.3", "error": "RuntimeError: boom"}
    ]
    human = subprocess.run([sys.executable, "-m", "statelab", "plugins"], capture_output=True, text=True, env=env, check=True)
    assert "alpha" in human.stdout and "failed to load: broken-plug 0.3" in human.stdout


def test_core_alone_lists_nothing_and_no_errors(monkeypatch):
    env = {**__import__("os").environ, "STATELAB_NO_PLUGINS": "1"}
    out = subprocess.run([sys.executable, "-m", "statelab", "plugins", "--json"], capture_output=True, text=True, env=env, check=True)
    assert json.loads(out.stdout) == {"components": [], "commands": [], "failures": []}
