"""Atomic directories: ordinary permissions, and what a killed writer leaves is cleaned up by the next write."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import torch

import statelab
from statelab import checkpoint as ckpt
from statelab.io import atomic_directory, remove_stale_temporaries
from statelab.testing.toys import toy_registry, toy_spec

KILLED_MID_WRITE = """
import os, signal, sys
from statelab.io import atomic_directory
with atomic_directory(sys.argv[1]) as tmp:
    (tmp / "model.safetensors").write_bytes(b"x" * 1000)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_checkpoint_files_are_readable_by_others(tmp_path):
    old = os.umask(0o022)
    try:
        model = statelab.build(toy_spec(), vocab_size=256, registry=toy_registry())
        path = ckpt.save(tmp_path / "c", model, trainer_state={"step": 1}, trainer_tensors={"t": torch.zeros(2)})
    finally:
        os.umask(old)
    modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in path.iterdir()}
    assert modes == dict.fromkeys(["model.safetensors", "trainer.safetensors", "trainer.json", "manifest.json"], 0o644)
    assert stat.S_IMODE(path.stat().st_mode) == 0o755


def test_a_write_killed_by_kill_9_is_cleaned_up_by_the_next_write(tmp_path):
    target = tmp_path / "checkpoints" / "step-0000010"
    proc = subprocess.run([sys.executable, "-c", KILLED_MID_WRITE, str(target)], timeout=60)
    assert proc.returncode == -9
    (left,) = (tmp_path / "checkpoints").iterdir()
    assert left.name.startswith(".step-0000010.tmp-") and not target.exists()
    with atomic_directory(tmp_path / "checkpoints" / "step-0000020") as tmp:
        (tmp / "f").write_text("ok")
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-0000020"]


def test_a_death_between_the_renames_restores_the_previous_directory(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    old = tmp_path / f".best.old-{dead.pid}"
    old.mkdir()
    (old / "model.safetensors").write_text("previous")
    live = tmp_path / f".last.tmp-{os.getpid()}-abc"  # our own write in progress: left alone
    live.mkdir()
    assert remove_stale_temporaries(tmp_path) == []
    assert (tmp_path / "best" / "model.safetensors").read_text() == "previous"
    assert live.exists() and not old.exists()
