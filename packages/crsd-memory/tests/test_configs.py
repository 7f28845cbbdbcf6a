"""configs/crsd.yaml and configs/mqar-memory.yaml validate, and run end to end when shrunk."""

from pathlib import Path

import pytest

from statelab.spec import load_document, validate_spec
from statelab.train import apply_overrides, train

CONFIGS = Path(__file__).resolve().parents[3] / "configs"
SHRINK = ["train.steps=2", "train.eval_interval=2", "train.eval_batches=1", "train.sample_tokens=0",
          "train.batch_size=4", "train.device=cpu", "tracking.enabled=false", "probes.0.batches=1",
          "probes.0.batch_size=4", "model.d_model=32"]


@pytest.mark.parametrize("name", ["crsd.yaml", "mqar-memory.yaml"])
def test_config_validates(name):
    resolved = validate_spec(CONFIGS / name)
    assert [p.component.name for p in resolved.probes] == ["memory-use"]


@pytest.mark.parametrize("name, extra", [
    ("crsd.yaml", ["train.seq_len=32", "probes.0.seq_len=32", "model.backbone.n_layers=1"]),
    ("mqar-memory.yaml", ["data.mqar.vocab_size=64", "data.mqar.seq_len=32", "data.mqar.num_kv_pairs=4",
                          "data.mqar.num_train=64", "data.mqar.num_val=8", "train.seq_len=32",
                          "model.backbone.headdim=16", "model.backbone.d_state=8"]),
])
def test_config_trains_end_to_end(tmp_path, name, extra):
    doc = apply_overrides(load_document(CONFIGS / name), SHRINK + extra)
    res = train(doc, out_dir=tmp_path, progress=False)
    assert res.step == 2 and res.status == "finished"
    assert "probe/memory-use/delta" in res.metrics
    assert (tmp_path / doc["name"] / "probes" / "results.json").exists()
