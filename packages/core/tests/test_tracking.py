"""mlflow tracking into a temporary store, `statelab compare`, and the checkpoint commands."""

from __future__ import annotations

import json
import math
import os

import pytest
import yaml

from statelab import cli
from statelab.compare import collect, format_table
from statelab.plugins import set_registry
from statelab.testing.toys import toy_registry, toy_spec
from statelab.tracking import client
from statelab.train import train


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Two short toy runs tracked in one temporary SQLite store (shared by the tests here)."""
    root = tmp_path_factory.mktemp("tracking")
    old_cache = os.environ.get("STATELAB_CACHE_DIR")
    os.environ["STATELAB_CACHE_DIR"] = str(tmp_path_factory.getbasetemp() / "statelab-cache")
    set_registry(toy_registry())
    uri = f"sqlite:///{root}/mlflow.db"
    from statelab.data import bundled_corpus_path

    corpus = root / "small.txt"  # a small corpus keeps whole-split evaluation quick
    corpus.write_text(bundled_corpus_path().read_text(encoding="utf-8")[:20000], encoding="utf-8")
    results = {}
    for name, extra in [("plain", {}), ("with-ema", {"memories": [{"kind": "toy-ema", "after_layer": 0}]})]:
        spec = toy_spec(**extra)
        spec["name"] = name
        spec["probes"] = [{"kind": "toy-norm", "batches": 1}]
        spec["data"] = {"kind": "text", "path": str(corpus)}
        spec["tracking"] = {"enabled": True, "uri": uri, "experiment": "exp-test"}
        spec["train"].update(steps=10, eval_interval=5, checkpoint_interval=10)
        results[name] = train(spec, out_dir=root / "runs", progress=False)
    yield root, uri, results
    set_registry(None)
    if old_cache is None:
        os.environ.pop("STATELAB_CACHE_DIR", None)
    else:
        os.environ["STATELAB_CACHE_DIR"] = old_cache


def test_a_run_logs_params_tags_metrics_and_artifacts(store):
    root, uri, results = store
    res = results["with-ema"]
    c = client(uri)
    run = c.get_run(res.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "with-ema"
    p = run.data.params
    assert p["model.backbone.kind"] == "toy-rnn" and p["model.memories.0.kind"] == "toy-ema"
    assert p["train.steps"] == "10" and int(p["model.parameters"]) > 0
    assert p["model.memories.0.decay"] == "0.9"  # params hold the resolved spec: every plugin default
    t = run.data.tags
    assert json.loads(t["statelab.distributions"]) == {"statelab-toys": "0"}
    assert t["plugin.statelab-toys"] == "0"
    assert t["probe.toy-norm.verdict"] == "finite" and t["probe.toy-norm.passed"] == "true"
    assert "statelab.git_revision" in t  # the tests run inside the repository's checkout
    m = run.data.metrics
    assert m["best/val_loss"] == pytest.approx(res.best_val_loss)
    assert m["probe/toy-norm/hidden_norm"] > 0 and m["probe/toy-norm/passed"] == 1.0
    hist = c.get_metric_history(res.mlflow_run_id, "val/loss")
    assert sorted(h.step for h in hist) == [5, 10]
    train_hist = c.get_metric_history(res.mlflow_run_id, "train/loss")
    assert sorted(h.step for h in train_hist) == [5, 10]
    arts = {a.path for a in c.list_artifacts(res.mlflow_run_id)}
    assert {"spec.yaml", "loss_curve.png", "samples.txt", "checkpoint", "metrics.jsonl"} <= arts
    # the complete best checkpoint: a downloaded run loads
    assert {a.path.split("/")[-1] for a in c.list_artifacts(res.mlflow_run_id, "checkpoint")} >= {
        "model.safetensors", "tokenizer.json", "manifest.json"}
    # the store is self-contained: artifacts live beside the database
    assert (root / "mlartifacts").is_dir()
    local = c.download_artifacts(res.mlflow_run_id, "spec.yaml", str(root))
    assert yaml.safe_load(open(local))["name"] == "with-ema"


def test_compare_lists_both_runs_and_plots_their_curves(store, capsys, tmp_path):
    root, uri, results = store
    rows = collect("exp-test", uri)
    assert {r.name for r in rows} == {"plain", "with-ema"}
    by = {r.name: r for r in rows}
    assert by["with-ema"].summary == "toy-rnn toy-ema@0"
    assert by["plain"].best_val_loss == pytest.approx(results["plain"].best_val_loss)
    assert by["plain"].best_val_bpc == pytest.approx(results["plain"].best_val_loss / math.log(2))
    assert by["plain"].parameters < by["with-ema"].parameters
    assert by["plain"].probes == {"toy-norm": "finite pass"}
    table = format_table(rows)
    assert "toy-rnn toy-ema@0" in table and f"{results['plain'].best_val_loss:.4f}" in table
    out = tmp_path / "cmp.png"
    assert cli.main(["compare", "--experiment", "exp-test", "--uri", uri, "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "with-ema" in printed and "plain" in printed and "best val loss" in printed
    assert out.stat().st_size > 5000
    assert "fields that differ:" in printed and "model.memories.0.kind" in printed and "toy-ema" in printed
    assert cli.main(["compare", "--experiment", "nope", "--uri", uri]) == 2
    assert "no experiment 'nope'" in capsys.readouterr().err


def test_compare_shows_the_fields_that_differ():
    from statelab.compare import RunRow, differing_params

    common = {"model.backbone.kind": "mamba", "model.d_model": "64", "tracking.experiment": "x"}
    rows = [RunRow(str(i), name, "FINISHED", "mamba", 1, 1.0, 1.4, 1.0,
                   params={**common, "name": name, "model.backbone.mixer": mixer, "model.backbone.d_state": str(n)})
            for i, (name, mixer, n) in enumerate([("m1", "mamba1", 16), ("m2", "mamba2", 64)])]
    assert differing_params(rows) == ["model.backbone.d_state", "model.backbone.mixer"]
    table = format_table(rows)
    assert table.splitlines()[-4:] == [
        "run  model.backbone.d_state  model.backbone.mixer",
        "---  ----------------------  --------------------",
        "m1   16                      mamba1",
        "m2   64                      mamba2",
    ]


def test_checkpoint_commands(store, capsys):
    root, uri, results = store
    run_dir = results["plain"].run_dir
    assert cli.main(["eval", str(run_dir), "--json", "--batches", "2"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["val/loss"] == pytest.approx(results["plain"].best_val_loss, rel=1e-5)  # same 2 batches as training
    assert cli.main(["eval", str(run_dir)]) == 0  # the whole validation split
    out = capsys.readouterr().out
    assert "val loss" in out and "tokens" in out
    assert cli.main(["generate", str(run_dir), "--prompt", "ROMEO:", "--max-new-tokens", "5", "--seed", "1"]) == 0
    assert capsys.readouterr().out.startswith("ROMEO:")
    assert cli.main(["probe", str(run_dir), "--probe", "toy-norm", "--param", "batches=1", "--json",
                     "--uri", uri]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["verdict"] == "finite" and doc["metrics"]["hidden_norm"] > 0
    # the probe was logged into the run that wrote the checkpoint, at its last step (10), so the run shows it
    run_id = results["plain"].mlflow_run_id
    run = client(uri).get_run(run_id)
    assert run.data.tags["probe.toy-norm.verdict"] == "finite"
    history = client(uri).get_metric_history(run_id, "probe/toy-norm/hidden_norm")
    assert max(m.step for m in history) == 10
    latest = max(history, key=lambda m: (m.step, m.timestamp))
    assert run.data.metrics["probe/toy-norm/hidden_norm"] == latest.value == pytest.approx(doc["metrics"]["hidden_norm"])
    assert cli.main(["planner", "fit", str(run_dir)]) == 2  # no planner in this model
    assert "has no planner" in capsys.readouterr().err


def test_tracking_disabled_writes_no_store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = toy_spec()
    spec["train"].update(steps=2, eval_interval=100, sample_tokens=0)
    res = train(spec, registry=toy_registry(), out_dir=tmp_path / "runs", progress=False)
    assert res.mlflow_run_id is None
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()


def test_a_diverged_run_is_marked_failed(store, tmp_path, monkeypatch):
    from statelab import train as train_mod
    from statelab.train import TrainingDiverged

    root, uri, _ = store
    monkeypatch.setattr(train_mod, "token_loss", lambda logits, y, mask: logits.sum() * float("inf"))
    spec = toy_spec()
    spec["name"] = "diverged"
    spec["tracking"] = {"enabled": True, "uri": uri, "experiment": "exp-failed"}
    spec["train"].update(steps=3, eval_interval=100, sample_tokens=0)
    with pytest.raises(TrainingDiverged):
        train(spec, out_dir=tmp_path, progress=False)
    (run,) = client(uri).search_runs([client(uri).get_experiment_by_name("exp-failed").experiment_id])
    assert run.info.status == "FAILED"
    assert "training diverged" in run.data.tags["statelab.error"]


def test_a_checkpoint_never_chooses_the_tracking_target(store, tmp_path, monkeypatch, capsys):
    """An edited ``statelab.mlflow_uri`` in a checkpoint neither creates files at its path nor
    receives metrics; without --uri the user's default store is used, and a missing one is not created."""
    from safetensors.torch import load_file, save_file

    from statelab import checkpoint as ckpt

    root, uri, results = store
    src = ckpt.find_checkpoint(results["plain"].run_dir)
    planted = tmp_path / "planted"
    ck = ckpt.read_checkpoint(src)
    meta = dict(ck.meta, **{"statelab.mlflow_uri": f"sqlite:///{tmp_path}/evil/mlflow.db"})
    planted.mkdir()
    for f in src.iterdir():
        if f.is_file():
            (planted / f.name).write_bytes(f.read_bytes())
    save_file(load_file(str(src / "model.safetensors")), str(planted / "model.safetensors"), metadata=meta)
    (planted / "manifest.json").unlink()
    ckpt._write_manifest(planted)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert cli.main(["probe", str(planted), "--probe", "toy-norm", "--param", "batches=1"]) == 0
    err = capsys.readouterr().err
    assert "not logged: sqlite:///mlflow.db does not exist" in err and "pass --uri sqlite:///" in err
    assert not (tmp_path / "evil").exists() and not (tmp_path / "mlflow.db").exists()


def test_unusable_stores_fail_fast_in_one_line(tmp_path, capsys):
    import socket
    import time

    from statelab.tracking import TrackingError, preflight

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    t0 = time.perf_counter()
    with pytest.raises(TrackingError, match=rf"the mlflow tracking server http://127.0.0.1:{port} does not answer"):
        preflight(f"http://127.0.0.1:{port}")
    assert time.perf_counter() - t0 < 5
    (tmp_path / "file").write_text("")
    with pytest.raises(TrackingError, match="cannot create the mlflow store's directory"):
        preflight(f"sqlite:///{tmp_path}/file/sub/mlflow.db")
    # through the command line: exit 2, one line, no run directory written
    spec = toy_spec()
    spec["tracking"] = {"enabled": True, "uri": f"http://127.0.0.1:{port}"}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    set_registry(toy_registry())
    try:
        assert cli.main(["train", str(path), "--out", str(tmp_path / "runs"), "-q"]) == 2
    finally:
        set_registry(None)
    err = capsys.readouterr().err
    assert "does not answer" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_checkpoint_commands_take_an_mlflow_run(store, capsys):
    """eval/generate/probe accept runs:/RUN_ID and a bare run id: the complete checkpoint is downloaded."""
    from statelab.tracking import CHECKPOINT_ARTIFACT

    root, uri, results = store
    set_registry(toy_registry())  # an earlier test may have reset it
    run_id = results["plain"].mlflow_run_id
    c = client(uri)
    assert any(a.path == CHECKPOINT_ARTIFACT for a in c.list_artifacts(run_id))  # the trainer logs it
    assert cli.main(["eval", f"runs:/{run_id}", "--uri", uri, "--json", "--batches", "2"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["val/loss"] == pytest.approx(results["plain"].best_val_loss, rel=1e-5)
    assert cli.main(["generate", run_id, "--uri", uri, "--prompt", "RO", "--max-new-tokens", "3", "--seed", "1"]) == 0
    assert capsys.readouterr().out.startswith("RO")
    assert cli.main(["probe", f"runs:/{run_id}/{CHECKPOINT_ARTIFACT}", "--uri", uri, "--probe", "toy-norm",
                     "--param", "batches=1"]) == 0
    assert "logged to mlflow run " + run_id in capsys.readouterr().err
    other = c.create_run(c.get_run(run_id).info.experiment_id).info.run_id  # a run without a checkpoint
    assert cli.main(["eval", f"runs:/{other}", "--uri", uri]) == 2
    assert "has no complete checkpoint at artifact path 'checkpoint'" in capsys.readouterr().err
    assert cli.main(["eval", "0" * 32, "--uri", uri]) == 2
    assert f"mlflow run {'0' * 32} is not in {uri}" in capsys.readouterr().err


def test_a_run_reference_without_its_store_creates_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert cli.main(["eval", "runs:/" + "a" * 32]) == 2
    assert "the store sqlite:///mlflow.db does not exist; pass the store that holds the run" in capsys.readouterr().err
    assert cli.main(["compare", "--experiment", "x"]) == 2
    assert "there is no mlflow store at sqlite:///mlflow.db" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
