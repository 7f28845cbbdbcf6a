"""statelab bench on the toys: cells, resume after a kill, mlflow parent/child runs, the report."""

from __future__ import annotations

import json
import os

import pytest
import yaml

from statelab import plugins
from statelab.bench import expand, load_suite, run_suite
from statelab.bench.suite import SuiteError

SUITE = {
    "name": "toy-suite",
    "description": "toy-rnn against a stateless toy-mlp on induction",
    "baseline": "mlp",
    "seeds": [0, 1],
    "specs": {
        "rnn": {"spec": "spec.yaml", "set": {"model.backbone": {"kind": "toy-rnn", "n_layers": 1, "d_state": 16}}},
        "mlp": {"spec": "spec.yaml", "set": {"model.backbone": {"kind": "toy-mlp", "n_layers": 1}}},
    },
    "tasks": [{"kind": "induction", "params": {"vocab_size": 6, "seq_len": 8, "num_train": 2048, "num_val": 64}}],
    "grid": {"train.lr": [0.01, 0.03]},
    "set": {"train.steps": 20, "train.batch_size": 16, "train.warmup_steps": 2, "train.eval_interval": 20,
            "train.checkpoint_interval": 20, "train.sample_tokens": 0, "train.log_interval": 20},
    "sizes": {"cpu": {"set": {"train.device": "cpu"}}, "gpu": {"set": {"train.steps": 1000}, "seeds": [0, 1, 2]}},
}
BASE_SPEC = {"name": "x", "model": {"d_model": 16, "backbone": {"kind": "toy-mlp"}},
             "train": {"eval_batches": 2}, "tracking": {"enabled": False}}


@pytest.fixture
def suite_file(tmp_path, monkeypatch):
    monkeypatch.setenv("STATELAB_PLUGIN_MODULES", "statelab.testing.toys")
    monkeypatch.setenv("STATELAB_CACHE_DIR", str(tmp_path / "cache"))
    plugins.set_registry(None)
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(BASE_SPEC))
    doc = json.loads(json.dumps(SUITE))
    doc["tracking"] = {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "bench-test"}
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    yield path
    plugins.set_registry(None)


def test_cells_are_the_product_of_specs_tasks_grid_and_seeds(suite_file):
    suite, root = load_suite(suite_file)
    cells = expand(suite, root)
    assert len(cells) == 2 * 1 * 2 * 2
    c = cells[0]
    assert c.spec["model"]["backbone"]["kind"] == "toy-rnn" and c.spec["train"]["lr"] == 0.01
    assert c.spec["data"] == {"kind": "induction", "params": {**SUITE["tasks"][0]["params"], "eval_batch_size": 128}}
    assert c.spec["train"]["seq_len"] == 8 and c.spec["train"]["device"] == "cpu"  # task override, first size
    assert c.spec["seed"] == 0 and c.spec["name"] == c.id and c.spec["tracking"]["run_name"] == c.id
    assert len({x.id for x in cells}) == len(cells)
    gpu = expand(suite, root, "gpu")
    assert len(gpu) == 2 * 2 * 3 and gpu[0].spec["train"]["steps"] == 1000
    with pytest.raises(SuiteError, match="unknown size 'tpu'"):
        expand(suite, root, "tpu")


def test_bad_suites_get_one_clear_message(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump({**SUITE, "baseline": "gru"}))
    with pytest.raises(SuiteError, match="baseline 'gru' is not one of the specs"):
        load_suite(p)
    p.write_text(yaml.safe_dump({**SUITE, "tasks": ["copy", "copy"]}))
    with pytest.raises(SuiteError, match="distinct `name`"):
        load_suite(p)
    with pytest.raises(SuiteError, match="not found"):
        load_suite(tmp_path / "missing.yaml")


@pytest.mark.slow
def test_a_resumed_suite_reruns_only_unfinished_cells_and_reports(suite_file, tmp_path, monkeypatch, capsys):
    import statelab.train as train_mod

    real = train_mod.train
    calls: list[str] = []

    def killed_on_third(spec, **kw):
        calls.append(spec["name"])
        if len(calls) == 3:
            raise KeyboardInterrupt  # the suite is killed while training its third cell
        return real(spec, **kw)

    monkeypatch.setattr(train_mod, "train", killed_on_third)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run_suite(suite_file, out=out)
    sdir = out / "toy-suite"
    done = sorted(p.parent.name for p in (sdir / "cells").glob("*/result.json"))
    assert done == sorted(calls[:2])
    killed = calls[2]
    assert (sdir / "cells" / killed).is_dir() and not (sdir / "cells" / killed / "result.json").exists()
    stamps = {c: os.stat(sdir / "cells" / c / "result.json").st_mtime_ns for c in done}

    calls.clear()
    monkeypatch.setattr(train_mod, "train", lambda spec, **kw: (calls.append(spec["name"]), real(spec, **kw))[1])
    res = run_suite(suite_file, out=out)
    assert res["skipped"] == 2 and len(res["ran"]) == 6
    assert killed in calls and not set(done) & set(calls)  # finished cells were not trained again
    assert {c: os.stat(sdir / "cells" / c / "result.json").st_mtime_ns for c in done} == stamps

    # mlflow: one parent run, every cell a child with the task's metrics
    from statelab.tracking import client

    c = client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = c.get_experiment_by_name("bench-test")
    runs = c.search_runs([exp.experiment_id])
    parent_id = json.loads((sdir / "suite.json").read_text())["parent_run_id"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id]
    assert len(children) == 8 and all("task/accuracy" in r.data.metrics for r in children)
    assert "report" in {a.path for a in c.list_artifacts(parent_id)}

    # the report: intervals over the two seeds, the best lr per spec, paired differences to the baseline
    summary = json.loads((sdir / "report" / "summary.json").read_text())
    entries = {e["spec"]: e for e in summary["tasks"]["induction"]["entries"]}
    assert set(entries) == {"rnn", "mlp"} and entries["rnn"]["seeds"] == [0, 1]
    assert set(entries["rnn"]["grid_values"]) == {json.dumps({"train.lr": 0.01}), json.dumps({"train.lr": 0.03})}
    d = entries["rnn"]["vs_baseline"]
    per_seed = entries["rnn"]["per_seed"]
    assert d["diff"]["mean"] == pytest.approx(
        sum(per_seed[s] - entries["mlp"]["per_seed"][s] for s in ("0", "1")) / 2)
    assert d["verdict"] in ("better", "worse", "no detectable difference")
    md = (sdir / "report" / "report.md").read_text()
    assert "| rnn | train.lr=" in md and "vs baseline" in md and "mlp (baseline)" in md
    assert d["verdict"] in md and "[" in md.split("| rnn |")[1].split("\n")[0]
    assert (sdir / "report" / "induction-accuracy.png").stat().st_size > 1000
    assert (sdir / "report" / "induction-accuracy-vs-train.lr.png").exists()

    # `statelab compare --suite` prints the same tables
    from statelab.cli import main

    capsys.readouterr()
    assert main(["compare", "--suite", str(sdir)]) == 0
    assert "| rnn | train.lr=" in capsys.readouterr().out
    assert main(["compare", "--suite", str(tmp_path)]) == 2
    assert "not a suite output directory" in capsys.readouterr().err

    # the report rewritten against a store without the suite's run: written, not logged, one note
    meta = json.loads((sdir / "suite.json").read_text())
    meta["suite"]["tracking"]["uri"] = f"sqlite:///{tmp_path / 'other.db'}"
    (sdir / "suite.json").write_text(json.dumps(meta))
    capsys.readouterr()
    assert main(["bench", str(sdir), "--report-only"]) == 0
    err = capsys.readouterr().err
    assert "report written but not logged" in err and parent_id in err and "Traceback" not in err


@pytest.mark.slow
def test_early_stop_trains_in_segments_and_stops_at_the_threshold(suite_file, tmp_path, monkeypatch):
    import statelab.train as train_mod
    from statelab.bench import run_cell

    suite, root = load_suite(suite_file)
    cell = expand(suite, root)[0]
    spec = cell.spec
    spec["data"] = {"kind": "mqar", "mqar": {"vocab_size": 16, "seq_len": 16, "num_kv_pairs": 2, "num_train": 512,
                                             "num_val": 32}}
    spec["train"].update(seq_len=16, steps=20, eval_interval=5, checkpoint_interval=5)
    spec["tracking"] = {"enabled": False}
    params = {"vocab_size": 16, "seq_len": 16, "num_kv_pairs": 2, "num_train": 512, "num_val": 32,
              "early_stop": 1e-9}  # any accuracy reaches it: stop after the first segment
    calls = []
    real = train_mod.train
    monkeypatch.setattr(train_mod, "train", lambda s, **kw: (calls.append(kw.get("stop_after")), real(s, **kw))[1])
    res = run_cell({**cell.to_json(), "task_kind": "mqar", "task_params": params, "spec": spec}, str(tmp_path))
    assert calls == [5] and res["status"] == "early_stop" and res["steps"] == 5
    params["early_stop"] = 1.0  # never reached: four segments, the last one to the end
    calls.clear()
    res = run_cell({**cell.to_json(), "task_kind": "mqar", "task_params": params, "spec": spec}, str(tmp_path))
    assert calls == [5, 10, 15, None] and res["steps"] == 20 and res["status"] == "finished"
