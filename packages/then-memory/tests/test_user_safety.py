"""Per-user memory safety (issue 19): models with 0-dim buffers, crash-safe wipe, strict ids,
no user created by a query, private files."""

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import statelab
from statelab.plugins import set_registry
from statelab.tokenizers import ByteTokenizer
from then_memory.users import (MemoryService, StoreConfig, UnknownUserError, UserDirectories, UserIdError,
                               model_fingerprint, validate_user_id)

TEXT = "The code of the shed lock is 4471. " * 4


@pytest.fixture
def model(registry, then_spec):
    m = statelab.build(then_spec(), registry=registry)
    m.tokenizer = ByteTokenizer()
    return m


def svc_for(model, root):
    return MemoryService(model, root, store=StoreConfig(hot_budget=32, warm_budget=64, chunk_traces=32), segment_len=64)


def test_fingerprint_covers_0dim_buffers(model):
    model.register_buffer("steps_done", torch.tensor(3))  # like the mcts planner's counters
    a = model_fingerprint(model)
    model.steps_done.fill_(4)
    assert model_fingerprint(model) != a


def test_mcts_model_has_per_user_memory(tmp_path):
    pytest.importorskip("crsm_planner")
    import yaml

    spec = yaml.safe_load((Path(__file__).parents[3] / "configs" / "mamba-then-mcts.yaml").read_text())
    spec["tokenizer"] = {"kind": "byte"}
    model = statelab.build(spec)
    model.tokenizer = ByteTokenizer()
    svc = svc_for(model, tmp_path)
    assert svc.ingest("alice", [TEXT])["traces"]
    assert isinstance(svc.query("alice", "The code is", max_new_tokens=3), str)


@pytest.mark.parametrize("bad", ["alice\n", "alice\r\n", "alice\n\n", "\nalice"])
def test_user_ids_with_newlines_are_refused(bad, tmp_path, model, registry, capsys):
    with pytest.raises(UserIdError):
        validate_user_id(bad)
    (tmp_path / "users" / bad).mkdir(parents=True)  # a folder made by hand is not a user
    assert UserDirectories(tmp_path / "users").users() == []


def test_cli_refuses_an_id_with_a_trailing_newline(tmp_path, registry, capsys):
    from statelab.cli import main

    set_registry(registry)
    try:
        assert main(["memory", "wipe", "--user", "alice\n", "--root", str(tmp_path)]) == 2
        assert "invalid user id" in capsys.readouterr().err
    finally:
        set_registry(None)


def test_query_of_an_unknown_user_creates_nothing(model, tmp_path, registry, capsys):
    svc = svc_for(model, tmp_path / "users")
    for incognito in (False, True):
        with pytest.raises(UnknownUserError, match="has no memory: ingest"):
            svc.query("mallory", "Who?", max_new_tokens=2, incognito=incognito)
    assert not (tmp_path / "users" / "mallory").exists() and svc.users() == []
    from statelab.checkpoint import save
    from statelab.cli import main

    ckpt = save(tmp_path / "ckpt", model, tokenizer=model.tokenizer)
    set_registry(registry)
    try:
        rc = main(["memory", "query", "--user", "mallory", "--model", str(ckpt), "--root", str(tmp_path / "users"), "x"])
        assert rc == 2 and "has no memory" in capsys.readouterr().err
    finally:
        set_registry(None)
    assert not (tmp_path / "users" / "mallory").exists()


def test_user_memory_is_private(model, tmp_path):
    old = os.umask(0o022)
    try:
        svc = svc_for(model, tmp_path / "users")
        svc.ingest("alice", [TEXT * 3])  # enough for sealed chunks, the index and a log
        svc.query("alice", "The code", max_new_tokens=2)
    finally:
        os.umask(old)
    root = tmp_path / "users"
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    files = [p for p in (root / "alice").rglob("*")]
    assert any(p.name.startswith("chunk_") for p in files) and any(p.name.startswith("log_") for p in files)
    for p in [root / "alice", *files]:
        want = 0o700 if p.is_dir() else 0o600
        assert stat.S_IMODE(p.stat().st_mode) == want, p


WIPER = """
import os, shutil, sys, time
import then_memory.users as users
real = shutil.rmtree
def stalled(path, *a, **k):  # delete part of the folder, then hang until killed
    first = sorted(p for p in os.listdir(path) if not p.startswith("."))[0]
    real(os.path.join(path, first)) if os.path.isdir(os.path.join(path, first)) else os.unlink(os.path.join(path, first))
    print("deleting", flush=True)
    time.sleep(600)
users.shutil.rmtree = stalled
users.UserDirectories(sys.argv[1]).wipe("alice")
"""


@pytest.mark.parametrize("finisher", ["list", "wipe", "session"])
def test_wipe_killed_mid_delete_is_finished_by_the_next_command(model, tmp_path, finisher):
    root = tmp_path / "users"
    svc = svc_for(model, root)
    svc.ingest("alice", [TEXT * 2])
    svc.ingest("bob", [TEXT])
    proc = subprocess.Popen([sys.executable, "-c", WIPER, str(root)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "deleting"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert [p.name[:6] for p in root.iterdir() if p.name.startswith(".")] == [".wipe-"]  # the killed wipe's leftovers
    if finisher == "list":
        assert svc.users() == ["bob"]
    elif finisher == "wipe":
        assert svc.wipe("alice") is False
    else:
        svc.query("bob", "The", max_new_tokens=1)
    assert sorted(os.listdir(root)) == ["bob"]


def test_user_id_errors_are_user_errors_for_every_command():
    """Any statelab command (not only `memory`) prints these as one line and exits 2."""
    from statelab.errors import is_user_error

    from then_memory.users import UnknownUserError, UserIdError

    assert is_user_error(UserIdError("bad id")) and is_user_error(UnknownUserError("nobody"))
