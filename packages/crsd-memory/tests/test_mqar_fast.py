"""benchmarks/crsd/mqar_fast.py trains exactly as statelab.train does (on the CPU, in fp32).

The fast loop keeps the examples on the device and runs the head only at the query positions;
neither may change the result. Same spec, same seed: the final validation loss and accuracy
must equal those of ``train``.
"""

import argparse
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[3] / "benchmarks" / "crsd"
pytestmark = pytest.mark.skipif(not (BENCH / "mqar_fast.py").exists(), reason="needs the repository's benchmarks/")


@pytest.fixture(scope="module")
def fast():
    sys.path.insert(0, str(BENCH))
    try:
        import mqar_fast

        yield mqar_fast
    finally:
        sys.path.remove(str(BENCH))


@pytest.mark.parametrize("model", ["mamba+dual", "crsd"])
def test_fast_loop_matches_train(fast, tmp_path, model):
    from statelab.train import train

    args = argparse.Namespace(vocab=64, num_train=48, num_val=16, seed=3, batch_size=8, mamba_kernels="never",
                              no_tracking=True, experiment="t", tracking_uri=None, runs=tmp_path, device="cpu",
                              no_graphs=True, sync_every=2)
    steps, lr = 5, 3e-3
    task = {"model": model, "d_model": 32, "seq_len": 32, "kv": 4, "planned_steps": steps}
    doc = fast.sweep.run_spec(args, model, 32, 32, 4, lr, steps)
    cell = fast.CellData(doc, 48, torch.device("cpu"))
    (row,) = fast.run_group(args, task, [lr], cell, torch.device("cpu"), float("inf"))
    ref = train(doc, progress=False).metrics
    assert row["steps"] == steps and row["status"] == "finished"
    assert row["loss"] == pytest.approx(ref["val/loss"], abs=1e-5)
    assert row["acc"] == ref["val/acc"]
