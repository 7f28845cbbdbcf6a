"""Every spec in ``configs/`` is valid against the installed plugins, the cross-prototype
configs train, and ``docs/spec.md`` is the current generated reference."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

import statelab
from statelab.plugins import FIRST_PARTY, Registry
from statelab.spec import markdown_reference, validate_spec
from statelab.train import train

ROOT = Path(__file__).resolve().parents[1]
# configs/bench/ holds bench suites, not run specs: tests-integration/test_bench_suites.py validates them
CONFIGS = [p for p in sorted((ROOT / "configs").rglob("*.yaml")) + sorted((ROOT / "configs").rglob("*.json"))
           if "bench" not in p.relative_to(ROOT / "configs").parts[:1]]
CROSS = ["kssm-hebbian-traces.yaml", "mamba-then-mcts.yaml"]
# what issue 9 asks configs/ to hold: one spec per prototype, the quickstart, two crosses
REQUIRED = ["crsm.yaml", "crsd.yaml", "kssm.yaml", "then.yaml", "traces.yaml", "quickstart.yaml", *CROSS]


def _kinds(doc: dict) -> list[tuple[str, str]]:
    """The (slot, kind) pairs a spec document names."""
    model = doc.get("model") or {}
    out = []
    if isinstance(model.get("backbone"), dict):
        out.append(("backbone", model["backbone"].get("kind")))
    out += [("memory", m.get("kind")) for m in model.get("memories") or []]
    if isinstance(model.get("planner"), dict):
        out.append(("planner", model["planner"].get("kind")))
    out += [("regularizer", r.get("kind")) for r in model.get("regularizers") or []]
    out += [("probe", p.get("kind")) for p in doc.get("probes") or []]
    return out


def _skip_if_plugin_missing(doc: dict, registry: Registry) -> None:
    for slot, kind in _kinds(doc):
        if (slot, kind) not in registry and (slot, kind) in FIRST_PARTY:
            dist = FIRST_PARTY[(slot, kind)]
            pytest.skip(f"{slot} {kind!r} is provided by {dist}, which is not installed: pip install {dist}")


def test_configs_folder_holds_the_issue_specs():
    missing = [name for name in REQUIRED if not (ROOT / "configs" / name).is_file()]
    assert not missing, f"configs/ lacks {', '.join(missing)} (issue 9: one spec per prototype, quickstart, two crosses)"


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(ROOT / "configs")) for p in CONFIGS])
def test_config_is_valid(path: Path, registry):
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(doc, dict), f"{path.name}: the spec must be a mapping"
    _skip_if_plugin_missing(doc, registry)
    resolved = validate_spec(path, registry)  # raises SpecError listing every problem
    assert resolved.spec.name, path
    assert resolved.backbone.component.name == doc["model"]["backbone"]["kind"]


@pytest.mark.parametrize("name", CROSS)
def test_cross_config_combines_prototypes_and_trains(name: str, registry, data_cache, tmp_path, one_thread):
    """The cross-prototype configs: components from at least two plugins, tracked to `cross`,
    and they train (2 tiny steps on CPU; the spec's probes are cut to keep this short)."""
    path = ROOT / "configs" / name
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    _skip_if_plugin_missing(doc, registry)
    resolved = validate_spec(path, registry)
    assert len({rc.component.distribution for rc in resolved.all()}) >= 2
    assert resolved.spec.tokenizer.kind == "char" and resolved.spec.data.kind == "text" and resolved.spec.data.path is None
    assert resolved.spec.tracking.enabled and resolved.spec.tracking.experiment == "cross"
    overrides = ["train.steps=2", "train.batch_size=2", "train.seq_len=16", "train.eval_batches=1",
                 "train.sample_tokens=0", "train.device=cpu", "tracking.enabled=false", "probes=[]",
                 f"data.cache_dir={data_cache}", "train.planner_fit.steps=2", "train.planner_fit.batch_size=2",
                 "train.planner_fit.seq_len=16"]
    result = train(path, out_dir=tmp_path, overrides=overrides, progress=False)
    assert result.status == "finished" and result.step == 2
    assert math.isfinite(result.best_val_loss)
    model = statelab.load(result.run_dir)
    assert model.spec.name == doc["name"]


def _first_party_registry(registry: Registry) -> Registry:
    """The registry restricted to the first-party distributions and core's own components
    (tasks, the ablate probe): docs/spec.md documents those."""
    dists = set(FIRST_PARTY.values()) | {"statelab-core"}
    reg = Registry()
    reg.components = {k: c for k, c in registry.components.items() if c.distribution in dists}
    return reg


def test_spec_reference_is_current(registry):
    wanted = set(FIRST_PARTY)
    absent = sorted({FIRST_PARTY[k] for k in wanted - set(registry.components)})
    if absent:
        pytest.skip(f"docs/spec.md documents every first-party plugin; not installed: {', '.join(absent)}")
    doc = ROOT / "docs" / "spec.md"
    how = "regenerate it with `statelab schema --markdown -o docs/spec.md` (with the first-party plugins installed)"
    assert doc.is_file(), f"docs/spec.md does not exist; {how}"
    expected = markdown_reference(_first_party_registry(registry))
    assert doc.read_text(encoding="utf-8") == expected, f"docs/spec.md is out of date; {how}"
