"""Every user error on the command line is one message and exit status 2; --debug shows the
traceback; `--set` reads YAML 1.2; `--version` does not import torch; `--help` lists plugin commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import yaml

import statelab
from statelab import checkpoint as ckpt
from statelab import cli
from statelab.plugins import set_registry
from statelab.spec import SpecError, apply_overrides, parse_spec
from statelab.testing.toys import toy_registry, toy_spec
from statelab.data import make_data


@pytest.fixture()
def reg():
    r = toy_registry()
    set_registry(r)
    yield r
    set_registry(None)


@pytest.fixture()
def checkpoint(reg, tmp_path):
    spec = toy_spec()
    spec["tokenizer"] = {"kind": "char"}
    tok = make_data(parse_spec(spec)).tokenizer  # the bundled corpus's characters
    model = statelab.build(spec, vocab_size=tok.vocab_size, registry=reg)
    return ckpt.save(tmp_path / "ck", model, tokenizer=tok)


def user_error(argv, capsys, match):
    """Runs the CLI in-process: exit 2, the message, no traceback."""
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert match in err, err
    assert "Traceback" not in err
    assert err.startswith("statelab ")
    return err


def test_truncated_checkpoint(checkpoint, capsys):
    f = checkpoint / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    user_error(["eval", str(checkpoint)], capsys, "is truncated or corrupted")
    with pytest.raises(ckpt.CheckpointError):  # --debug: the exception (and its traceback) escapes
        cli.main(["eval", str(checkpoint), "--debug"])


def test_checkpoint_of_a_missing_plugin(checkpoint, capsys):
    set_registry(statelab.plugins.Registry())
    user_error(["generate", str(checkpoint), "--prompt", "ab"], capsys, "which is not installed here: pip install")


def test_unknown_probe_kind_and_parameter(checkpoint, capsys):
    user_error(["probe", str(checkpoint), "--probe", "nope"], capsys, "unknown probe kind 'nope'; installed probe kinds: toy-norm")
    user_error(["probe", str(checkpoint), "--probe", "toy-norm", "--param", "bogus=1"], capsys,
               "--param (toy-norm).bogus: unknown field")
    user_error(["probe", str(checkpoint), "--probe", "toy-norm", "--param", "batches"], capsys, "is not key=value")


def test_prompt_outside_the_vocabulary_and_empty_prompt(checkpoint, capsys):
    user_error(["generate", str(checkpoint), "--prompt", "a€", "--max-new-tokens", "2"], capsys, "'€'")
    user_error(["generate", str(checkpoint), "--prompt", "", "--max-new-tokens", "2"], capsys, "empty --prompt")


def test_set_errors(reg, tmp_path, capsys):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(toy_spec()))
    out = ["--out", str(tmp_path / "runs"), "-q"]
    user_error(["train", str(path), *out, "--set", "probes.5.kind=x"], capsys,
               "--set probes.5.kind: probes is a list of 0; '5' is not an index 0..0")
    user_error(["train", str(path), *out, "--set", "name.first=x"], capsys, "name is 'toy', not a mapping or list")
    user_error(["train", str(path), *out, "--set", "tracking.experiment=a: b: c"], capsys,
               "to pass it as text, quote it inside the shell quotes: --set tracking.experiment='\"a: b: c\"'")
    user_error(["train", str(path), *out, "--set", "tracking.experiment=2024"], capsys,
               "(--set tracking.experiment=2024 was read as int; for text quote it: --set tracking.experiment='\"2024\"')")
    assert not (tmp_path / "runs").exists()


def test_set_reads_yaml_1_2():
    doc = apply_overrides(toy_spec(), ["name=no", "train.steps=1e3", "train.lr=3e-4", "tracking.enabled=false",
                                       "probes.0={kind: toy-norm, batches: 2}", "seed=0x10"])
    spec = parse_spec(doc)
    assert spec.name == "no"  # YAML 1.1 reads `no` as false
    assert spec.train.steps == 1000 and spec.train.lr == 3e-4  # YAML 1.1 reads 1e3 as text
    assert spec.tracking.enabled is False and spec.probes[0].kind == "toy-norm" and spec.seed == 16
    with pytest.raises(SpecError, match="is not an index 0..1"):
        apply_overrides(doc, ["probes.2.kind=x"])


def test_init_from_mismatch_is_a_user_error(reg, tmp_path, capsys):
    first = toy_spec()
    first["train"].update(steps=2, eval_interval=100, sample_tokens=0, warmup_steps=1)
    path = tmp_path / "a.yaml"
    path.write_text(yaml.safe_dump(first))
    assert cli.main(["train", str(path), "--out", str(tmp_path / "runs"), "-q"]) == 0
    wider = toy_spec(d_model=32)
    wider["name"] = "wider"
    wider["train"].update(steps=2, sample_tokens=0, warmup_steps=1, init_from=str(tmp_path / "runs" / "toy"))
    path.write_text(yaml.safe_dump(wider))
    user_error(["train", str(path), "--out", str(tmp_path / "runs"), "-q"], capsys, "does not fit the model")


def _run(*args, env=None):
    env = {**os.environ, "STATELAB_NO_PLUGINS": "1", **(env or {})}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=120)


def test_debug_environment_variable_shows_the_traceback(tmp_path):
    missing = str(tmp_path / "nope.yaml")
    plain = _run("-m", "statelab", "validate", missing)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr and "does not exist" in plain.stderr
    assert len(plain.stderr.strip().splitlines()) == 2  # "statelab validate: invalid spec:" and the issue
    debug = _run("-m", "statelab", "validate", missing, env={"STATELAB_DEBUG": "1"})
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "SpecError" in debug.stderr


def test_version_does_not_import_torch():
    code = ("import sys\nfrom statelab.cli import main\ntry:\n    main(['--version'])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules)")
    res = _run("-c", code)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["statelab-core", statelab.__version__, "False"]


def test_help_lists_plugin_commands(tmp_path):
    (tmp_path / "hello_plugin.py").write_text(textwrap.dedent('''
        from statelab.plugins import Command, hookimpl

        STATELAB_PLUGIN_API = 1

        def configure(parser):
            parser.add_argument("--who", default="world")

        def run(args):
            print("hello", args.who)
            return 0

        @hookimpl
        def statelab_commands():
            return [Command(name="hello", help="say hello", configure=configure, run=run)]
    '''))
    env = {"STATELAB_PLUGIN_MODULES": "hello_plugin", "PYTHONPATH": str(tmp_path)}
    res = _run("-m", "statelab", "--help", env=env)
    assert res.returncode == 0 and "hello" in res.stdout and "say hello" in res.stdout, res.stdout + res.stderr
    res = _run("-m", "statelab", "hello", "--who", "you", env=env)
    assert res.stdout.strip() == "hello you", res.stderr


def test_validate_prints_spec_warnings(reg, tmp_path, capsys):
    spec = toy_spec()
    spec["train"].update(steps=10, warmup_steps=50)
    path = tmp_path / "s.json"
    path.write_text(json.dumps(spec))
    assert cli.main(["validate", str(path)]) == 0
    err = capsys.readouterr().err
    assert "statelab: warning: train.warmup_steps: 50 warmup steps for a 10-step run" in err
