"""--resume refuses a corpus whose character set changed at the same size (the spec is unchanged)."""

from __future__ import annotations

import pytest

from statelab.checkpoint import IncompatibleCheckpointError
from statelab.testing.toys import toy_registry, toy_spec
from statelab.train import train


def test_resume_refuses_a_changed_alphabet_of_the_same_size(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("abcdefgh " * 400)
    spec = toy_spec()
    spec["tokenizer"] = {"kind": "char"}
    spec["data"] = {"kind": "text", "path": str(corpus), "cache_dir": str(tmp_path / "cache")}
    spec["train"].update(steps=2, eval_interval=100, checkpoint_interval=2, sample_tokens=0, warmup_steps=1)
    reg = toy_registry()
    train(spec, registry=reg, out_dir=tmp_path / "runs", progress=False)
    corpus.write_text("abcdefgX " * 400)  # same 9 characters, one replaced: the vocabulary size is unchanged
    spec["train"]["steps"] = 4
    with pytest.raises(IncompatibleCheckpointError, match=r"characters no longer in the corpus: \['h'\]; new characters: \['X'\]"):
        train(spec, registry=reg, out_dir=tmp_path / "runs", resume=True, progress=False)
    corpus.write_text("abcdefgh " * 400)
    assert train(spec, registry=reg, out_dir=tmp_path / "runs", resume=True, progress=False).step == 4
