"""Spec validation: every error path, with its exact message, and the JSON schema."""

from __future__ import annotations

import json

import pytest
import yaml

import statelab
from statelab.spec import SpecError, json_schema, parse_spec, validate_spec
from statelab.testing.toys import toy_registry, toy_spec


@pytest.fixture(scope="module")
def reg():
    return toy_registry()


def issues(doc, reg) -> list[str]:
    with pytest.raises(SpecError) as exc:
        validate_spec(doc, reg)
    return [str(i) for i in exc.value.issues]


def test_valid_spec_resolves_every_component(reg):
    doc = toy_spec(
        memories=[{"kind": "toy-ema", "after_layer": 1, "decay": 0.5}],
        planner={"kind": "toy-shrink", "alpha": 0.2},
        regularizers=[{"kind": "toy-gate-l2", "weight": 0.1, "target": 0.3}],
    )
    doc["probes"] = [{"kind": "toy-norm", "batches": 1}]
    r = validate_spec(doc, reg)
    assert r.backbone.params.n_layers == 2
    assert r.memories[0].params.decay == 0.5
    assert r.planner.params.alpha == 0.2
    assert r.regularizers[0].params.target == 0.3
    assert r.probes[0].params.batches == 1
    assert r.internals() == {"toy.gate": ["model.backbone"], "memory.recall": ["model.memories.0"], "memory.gate": ["model.memories.0"]}
    assert r.distributions() == {"statelab-toys": "0"}


def test_unknown_first_party_kind_names_its_package(reg):
    assert issues(toy_spec(planner={"kind": "mcts"}), reg) == [
        "model.planner.kind: unknown planner kind 'mcts'; installed planner kinds: toy-shrink. "
        "kind 'mcts' is provided by crsm-planner: pip install crsm-planner"
    ]


def test_unknown_third_party_kind_lists_installed(reg):
    assert issues(toy_spec(backbone={"kind": "lstm", "n_layers": 1}), reg) == [
        "model.backbone.kind: unknown backbone kind 'lstm'; installed backbone kinds: toy-mlp, toy-rnn"
    ]


def test_wrong_field_points_at_its_path(reg):
    doc = toy_spec(memories=[{"kind": "toy-ema", "after_layer": 0, "decai": 0.5}])
    assert issues(doc, reg) == ["model.memories.0.decai: unknown field (not allowed here)"]
    doc = toy_spec(backbone={"kind": "toy-rnn", "n_layers": 0})
    assert issues(doc, reg) == ["model.backbone.n_layers: Input should be greater than or equal to 1"]


def test_structural_errors_have_paths(reg):
    doc = toy_spec()
    doc["train"]["stepz"] = 3
    doc["train"]["lr"] = -1
    assert issues(doc, reg) == ["train.lr: Input should be greater than 0", "train.stepz: unknown field (not allowed here)"]
    assert issues({"name": "x"}, reg) == ["model: Field required"]
    assert issues({**toy_spec(), "name": "../evil"}, reg) == ["name: String should match pattern '^[A-Za-z0-9][A-Za-z0-9._-]*$'"]


def test_memory_placement_outside_the_backbone(reg):
    assert issues(toy_spec(memories=[{"kind": "toy-ema", "after_layer": 2}]), reg) == [
        "model.memories.0.after_layer: after_layer 2 is outside the backbone's layers 0..1"
    ]


def test_regularizer_without_its_internal_names_both(reg):
    doc = toy_spec(backbone={"kind": "toy-mlp", "n_layers": 1}, regularizers=[{"kind": "toy-gate-l2"}])
    assert issues(doc, reg) == [
        "model.regularizers.0: regularizer 'toy-gate-l2' needs internal 'toy.gate', which no component of this "
        "model publishes (published: (none))"
    ]


def test_planner_on_a_backbone_without_injectable_state(reg):
    doc = toy_spec(backbone={"kind": "toy-mlp", "n_layers": 1}, planner={"kind": "toy-shrink"})
    assert issues(doc, reg) == [
        "model.planner: planner 'toy-shrink' needs a backbone with injectable_state, but backbone 'toy-mlp' does not "
        "provide it; use a steerable backbone (one with injectable state, such as 'mamba') or remove the planner"
    ]


def test_several_problems_are_reported_together(reg):
    doc = toy_spec(memories=[{"kind": "toy-ema", "after_layer": 5}], regularizers=[{"kind": "nope"}])
    assert issues(doc, reg) == [
        "model.regularizers.0.kind: unknown regularizer kind 'nope'; installed regularizer kinds: toy-gate-l2",
        "model.memories.0.after_layer: after_layer 5 is outside the backbone's layers 0..1",
    ]


def test_file_errors(tmp_path, reg):
    assert issues(tmp_path / "missing.yaml", reg) == [f"spec file {str(tmp_path / 'missing.yaml')!r} does not exist"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    (msg,) = issues(bad, reg)
    assert msg.startswith("cannot parse bad.yaml:")
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    assert issues(lst, reg) == ["the spec must be a mapping at the top level"]


def test_yaml_and_json_files_parse_the_same(tmp_path, reg):
    doc = toy_spec(memories=[{"kind": "toy-ema", "after_layer": 0}])
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(doc))
    (tmp_path / "s.json").write_text(json.dumps(doc))
    a = validate_spec(tmp_path / "s.yaml", reg).spec
    b = validate_spec(tmp_path / "s.json", reg).spec
    assert a == b
    assert parse_spec(statelab.spec.dump_spec(a)) == a


def test_json_schema_covers_every_installed_component(reg):
    schema = json_schema(reg)
    text = json.dumps(schema)
    for kind in ("toy-rnn", "toy-mlp", "toy-ema", "toy-shrink", "toy-gate-l2", "toy-norm"):
        assert f'"const": "{kind}"' in text
    assert schema["title"] == "statelab run spec"
    # params descriptions reach the schema (editors show them)
    assert "recurrent state width per layer" in text
    # the schema is valid JSON schema and accepts a valid spec, rejects an unknown field
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(toy_spec(), schema)
    bad = toy_spec(backbone={"kind": "toy-rnn", "n_layers": 1, "nope": 1})
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_flatten_for_mlflow_params():
    assert statelab.spec.flatten({"a": {"b": 1, "c": [1, {"d": None}]}, "e": []}) == {
        "a.b": "1", "a.c.0": "1", "a.c.1.d": "null", "e": "[]"
    }
