"""`statelab monitor`: each alert raised on a planted metrics file, the view, and MetricsFile in a real run."""

from __future__ import annotations

import json
import math
import os
import socket
import time

import pytest

from statelab.cli import main
from statelab.monitor import PRESETS, MetricsFile, MonitorConfig, Watch, alerts, load_run, parse_watch, render

KSSM = MonitorConfig(watches=PRESETS["kssm"])


def plant(run_dir, rows, lock=None, age_s=0.0, spec_kind=None):
    run_dir.mkdir(parents=True, exist_ok=True)
    mf = run_dir / "metrics.jsonl"
    mf.write_text("".join(json.dumps(r) + "\n" for r in rows))
    t = time.time() - age_s
    os.utime(mf, (t, t))
    if lock is not None:
        (run_dir / ".lock").write_text(json.dumps(lock))
    if spec_kind:
        (run_dir / "spec.yaml").write_text(f"name: x\nmodel:\n  backbone:\n    kind: {spec_kind}\n")
    return run_dir


def healthy(n=20):
    rows = [{"step": s, "train/loss": 3.0 - 0.05 * s} for s in range(1, n + 1)]
    rows += [{"step": s, "val/loss": 3.0 - 0.04 * s, "train/grad_norm": 0.8, "train/tok_per_s": 12000.0,
              "reg/0.bistability.u_mean": 2.0, "reg/0.bistability.u_at_bound": 0.05,
              "reg/0.bistability.R_global_mean": 0.4, "reg/0.bistability.R_global_null": 0.078}
             for s in (5, 10, 15, 20)]
    return rows


def kinds(run_dir, cfg=KSSM):
    return [a.kind for a in alerts(load_run(run_dir), cfg)]


def test_healthy_run_has_no_alert_and_shows_everything(tmp_path):
    run = plant(tmp_path / "ok", healthy(), lock={"pid": os.getpid(), "host": socket.gethostname(),
                                                   "started": time.time() - 600})
    (run / "last").mkdir()
    (run / "last" / "model.safetensors").write_bytes(b"x")
    assert kinds(run) == []
    text = render(load_run(run), KSSM)
    assert "running; lock holder PID" in text and "last checkpoint: last/" in text  # newest by mtime
    assert "train loss 2.0000 (best 2.0000 at 20)" in text and "val loss 2.2000 at 20 (best 2.2000 at 20)" in text
    assert "grad norm 0.8" in text and "tok/s 12,000" in text
    assert "u: 2 (5% at a clamp)" in text and "R (population): 0.4 vs null 0.078 (5.13x)" in text
    assert "alerts: none" in text


def test_sparkline_is_the_trend_of_the_whole_series():
    from statelab.monitor import sparkline

    assert sparkline([1.0]) == "▁" and sparkline([1.0, 2.0]) == "▁█"
    down = sparkline([100.0 - i for i in range(400)])
    assert len(down) == 40 and down[0] == "█" and down[-1] == "▁"


def test_divergence(tmp_path):
    rows = healthy() + [{"step": s, "train/loss": 5.0} for s in range(21, 26)]
    assert kinds(plant(tmp_path / "a", rows)) == ["divergence"]
    nan = healthy() + [{"step": 21, "train/loss": math.nan}]
    run = plant(tmp_path / "b", nan)
    assert kinds(run) == ["divergence"] and "diverged" in alerts(load_run(run), KSSM)[0].message


def test_validation_degradation_the_v2_case(tmp_path):
    # K-SSM v2: validation perplexity 1087 -> 2069 (+90%)
    rows = healthy() + [{"step": 30, "val/loss": math.log(1087)}, {"step": 40, "val/loss": math.log(2069)}]
    rows = [r for r in rows if "val/loss" not in r or r["step"] >= 30]
    run = plant(tmp_path / "v2", rows)
    [a] = alerts(load_run(run), KSSM)
    assert a.kind == "val-degradation" and "+90%" in a.message
    small = [r for r in rows if r["step"] != 40] + [{"step": 40, "val/loss": math.log(1087 * 1.1)}]
    assert kinds(plant(tmp_path / "small", small)) == []  # +10%: below the default 25%


def test_u_pinned_at_a_clamp(tmp_path):
    rows = healthy() + [{"step": 21, "reg/0.bistability.u_at_bound": 0.999, "reg/0.bistability.u_mean": 0.1}]
    run = plant(tmp_path / "pin", rows)
    [a] = alerts(load_run(run), KSSM)
    assert a.kind == "pinned" and a.message.startswith("u: 100% of positions at a clamp")


def test_R_at_the_null_level(tmp_path):
    rows = healthy() + [{"step": 21, "reg/0.bistability.R_global_mean": 0.081}]
    assert kinds(plant(tmp_path / "null", rows)) == ["at-null"]


def test_stale_and_dead_runs(tmp_path):
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time() - 9000}
    assert kinds(plant(tmp_path / "stale", healthy(), lock=me, age_s=1000)) == ["stale"]
    assert kinds(plant(tmp_path / "fresh", healthy(), lock=me, age_s=10)) == []
    assert kinds(plant(tmp_path / "done", healthy(), age_s=10_000)) == []  # finished: no lock, not stale
    dead = {**me, "pid": 2**22 + 12345}  # above pid_max: no such process
    run = plant(tmp_path / "dead", healthy(), lock=dead, age_s=5)
    [a] = alerts(load_run(run), KSSM)
    assert a.kind == "stale" and "not running" in a.message
    assert "DEAD" in render(load_run(run), KSSM)


def test_generic_watch_of_any_internal(tmp_path):
    rows = healthy() + [{"step": 20, "reg/0.memory.gate_mean": 0.51, "reg/0.memory.gate_null": 0.5,
                         "reg/0.memory.gate_at_bound": 0.95}]
    w = parse_watch("memory.gate_mean,label=gate,pinned=memory.gate_at_bound,null=memory.gate_null")
    assert w == Watch("memory.gate_mean", "gate", "memory.gate_at_bound", "memory.gate_null")
    assert kinds(plant(tmp_path / "g", rows), MonitorConfig(watches=(w,))) == ["pinned", "at-null"]


def test_cli_once(tmp_path, capsys):
    run = plant(tmp_path / "cli", healthy() + [{"step": 21, "reg/0.bistability.R_global_mean": 0.08}], spec_kind="kssm")
    assert main(["monitor", str(run), "--once"]) == 0
    out = capsys.readouterr().out
    assert "! at-null: R (population) = 0.08" in out  # the kssm preset, chosen from spec.yaml
    assert main(["monitor", str(run / "metrics.jsonl"), "--once", "--preset", "none"]) == 0
    assert "at-null" not in capsys.readouterr().out
    assert main(["monitor", str(tmp_path / "nope"), "--once"]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_metrics_file_callback_in_a_run(tmp_path):
    from statelab.testing.toys import toy_registry, toy_spec
    from statelab.train import train

    spec = toy_spec()
    spec["train"].update(steps=6, eval_interval=3, checkpoint_interval=6, sample_tokens=0, log_interval=2)
    res = train(spec, registry=toy_registry(), out_dir=tmp_path, progress=False, callbacks=[MetricsFile()])
    view = load_run(res.run_dir)
    assert [s for s, _ in view.series("val/loss")] == [3, 6]
    assert view.series("train/loss")[-1][0] == 6 and view.series("train/tok_per_s")
    assert any("checkpoint" in r for r in view.rows)
    assert "val loss" in render(view, MonitorConfig())
