"""Settings that pass their own field checks but cannot work together are refused (or warned
about) at validation, with the reason; components see the model width through the context."""

from __future__ import annotations

import json

import pytest
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, model_validator

from statelab.plugins import Component, hookimpl
from statelab.spec import SpecError, check_data_fit, validate_spec
from statelab.testing.toys import ToyRNN, toy_registry, toy_spec


@pytest.fixture(scope="module")
def reg():
    return toy_registry()


def test_zero_steps_is_warned_about_unless_starting_from_weights(reg):
    spec = toy_spec()
    spec["train"]["steps"] = 0
    warned = {w.path: w.message for w in validate_spec(spec, reg).warnings}
    assert "0 steps trains nothing" in warned["train.steps"]
    spec["train"]["init_from"] = "runs/other"
    assert "train.steps" not in {w.path for w in validate_spec(spec, reg).warnings}


def test_vocab_size_smaller_than_the_tokenizers_is_refused(reg, tmp_path, capsys):
    from statelab import cli
    from statelab.plugins import set_registry

    spec = toy_spec(vocab_size=100)  # the byte tokenizer has 256 tokens
    with pytest.raises(SpecError, match="model.vocab_size: 100 is smaller than the 256 tokens the text data yields"):
        check_data_fit(validate_spec(spec, reg).spec)
    spec = toy_spec(vocab_size=50)
    spec["data"] = {"kind": "mqar", "mqar": {"vocab_size": 64}}
    with pytest.raises(SpecError, match="50 is smaller than the 64 tokens the mqar data yields"):
        check_data_fit(validate_spec(spec, reg).spec)
    check_data_fit(validate_spec(toy_spec(vocab_size=300), reg).spec)
    path = tmp_path / "s.json"
    path.write_text(json.dumps(toy_spec(vocab_size=100)))
    set_registry(reg)
    try:
        assert cli.main(["validate", str(path)]) == 2
        assert "100 is smaller than the 256 tokens" in capsys.readouterr().err
    finally:
        set_registry(None)


def test_warnings_for_warmup_planner_fit_and_probes_in_a_short_run(reg):
    spec = toy_spec(planner={"kind": "toy-shrink"})
    spec["train"].update(steps=10, warmup_steps=10)
    spec["probes"] = [{"kind": "toy-norm"}]
    warned = {w.path: w.message for w in validate_spec(spec, reg).warnings}
    assert "learning rate never reaches train.lr" in warned["train.warmup_steps"]
    assert "planner fit (200 steps) after training is longer than the training (10 steps)" in warned["train.planner_fit.steps"]
    assert "1 probe(s) run after a 10-step run" in warned["probes"]
    spec["train"].update(steps=400, warmup_steps=10)
    assert validate_spec(spec, reg).warnings == []


class WidthParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n_layers: int = Field(1, ge=1, description="layers")
    n_heads: int = Field(2, ge=1, description="heads; must divide d_model")

    @model_validator(mode="after")
    def _divides(self, info: ValidationInfo) -> "WidthParams":
        d = (info.context or {}).get("d_model")
        if d is not None and d % self.n_heads:
            raise ValueError(f"n_heads={self.n_heads} does not divide d_model={d}")
        return self


def test_components_validate_against_the_model_width(reg):
    class Plugin:
        STATELAB_PLUGIN_API = 1

        @hookimpl
        def statelab_components(self):
            return [Component("backbone", "heads", WidthParams, lambda p, c: ToyRNN(c.d_model, p.n_layers, 4))]

    reg = toy_registry()
    reg.register_plugin(Plugin(), distribution="test")
    spec = toy_spec(backbone={"kind": "heads", "n_heads": 5})
    with pytest.raises(SpecError, match="model.backbone: n_heads=5 does not divide d_model=16"):
        validate_spec(spec, reg)
    validate_spec(toy_spec(backbone={"kind": "heads", "n_heads": 4}), reg)
