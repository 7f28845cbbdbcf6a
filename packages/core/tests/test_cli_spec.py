"""`statelab validate`, `schema` and `build` from the command line (toys loaded by module path)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import yaml

from statelab.testing.toys import toy_spec


def run(*args, check=True):
    env = {**os.environ, "STATELAB_NO_PLUGINS": "1", "STATELAB_PLUGIN_MODULES": "statelab.testing.toys"}
    return subprocess.run([sys.executable, "-m", "statelab", *args], capture_output=True, text=True, env=env, check=check)


def test_validate_build_and_schema(tmp_path):
    spec = tmp_path / "toy.yaml"
    spec.write_text(yaml.safe_dump(toy_spec(memories=[{"kind": "toy-ema", "after_layer": 1}])))
    out = run("validate", str(spec))
    assert out.stdout.strip() == f"{spec}: valid (backbone toy-rnn, memory toy-ema@1)"
    built = run("build", str(spec)).stdout
    assert "ToyEMAMemory" in built and "parameters: " in built and "internals: memory.gate" in built
    schema = json.loads(run("schema").stdout)
    assert schema["title"] == "statelab run spec"
    run("schema", "-o", str(tmp_path / "schema.json"))
    assert json.loads((tmp_path / "schema.json").read_text()) == schema


def test_invalid_spec_exits_2_with_the_message(tmp_path):
    spec = tmp_path / "bad.yaml"
    spec.write_text(yaml.safe_dump(toy_spec(planner={"kind": "mcts"})))
    out = run("validate", str(spec), check=False)
    assert out.returncode == 2
    assert "model.planner.kind: unknown planner kind 'mcts'; installed planner kinds: toy-shrink. kind 'mcts' is provided by crsm-planner: pip install crsm-planner" in out.stderr
