"""configs/then.yaml end to end, scaled down to seconds: the passkey corpus, stateful
training with the spec's passkey probe, then a user's ingest and query, all through the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from statelab.plugins import set_registry
from statelab.train import train

ROOT = Path(__file__).resolve().parents[1]


def test_then_config_trains_then_ingests_and_queries(registry, tmp_path, one_thread, capsys):
    if ("memory", "then") not in registry.components:
        pytest.skip("then-memory is not installed")
    from statelab.cli import main

    set_registry(registry)
    try:
        corpus = tmp_path / "corpus.txt"
        assert main(["memory", "corpus", "--out", str(corpus), "--docs", "4", "--lengths", "256", "--min-gap", "256"]) == 0
        assert "The pass key is" in corpus.read_text(encoding="utf-8")
        capsys.readouterr()
        overrides = [f"data.path={corpus}", "model.d_model=32", "train.steps=4", "train.batch_size=2",
                     "train.seq_len=64", "train.eval_interval=4", "train.eval_batches=1", "train.sample_tokens=0",
                     "train.checkpoint_interval=4", "train.device=cpu", "tracking.enabled=false",
                     "probes.0.lengths=[256]", "probes.0.depths=[0.5]", "probes.0.trials=1",
                     "probes.0.batch_size=1", "probes.0.segment_len=128", "probes.0.pass_length=256"]
        result = train(ROOT / "configs" / "then.yaml", out_dir=tmp_path / "runs", overrides=overrides, progress=False)
        assert result.status == "finished" and result.step == 4
        assert math.isfinite(result.best_val_loss)
        passkey = {k: v for k, v in result.metrics.items() if "passkey" in k}
        assert passkey, sorted(result.metrics)  # the spec's probe ran and reported
        assert all(0.0 <= v <= 1.0 for k, v in passkey.items() if "acc" in k)

        notes = tmp_path / "notes.txt"
        notes.write_text("The pass key is 12345. Remember it. 12345 is the pass key.\n" * 3, encoding="utf-8")
        users = tmp_path / "users"
        common = ["--user", "demo", "--model", str(result.run_dir), "--root", str(users)]
        assert main(["memory", "ingest", *common, str(notes)]) == 0
        assert json.loads(capsys.readouterr().out)["tokens"] == len(notes.read_text(encoding="utf-8"))
        files = sorted(p.name for p in (users / "demo").rglob("*.safetensors"))
        assert files, "ingest saved nothing"
        assert main(["memory", "query", *common, "--max-new-tokens", "4", "What is the pass key? The pass key is"]) == 0
        assert len(capsys.readouterr().out.rstrip("\n")) >= 1
    finally:
        set_registry(None)
