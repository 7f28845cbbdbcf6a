"""The trainer's callbacks: hook order and counts, a third-party callback from an installed
distribution with its state through --resume, stops in every post-training phase, exit
status, and tracking that continues across --resume."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import statelab
from statelab.callbacks import Callback
from statelab.checkpoint import load_training_state
from statelab.plugins import Registry
from statelab.spec import SpecError
from statelab.testing import toys
from statelab.testing.toys import toy_registry, toy_spec
from statelab.train import process_start_time, train


@pytest.fixture(scope="module")
def reg():
    return toy_registry()


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("STATELAB_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "statelab-cache"))


def quiet_spec(**train_fields):
    spec = toy_spec()
    spec["train"].update(eval_interval=1000, checkpoint_interval=1000, sample_tokens=0, log_interval=1)
    spec["train"].update(train_fields)
    return spec


class Recorder(Callback):
    name = "recorder"

    def __init__(self) -> None:
        self.events: list[tuple] = []

    def on_run_start(self, t):
        self.events.append(("run_start", t.step, torch.get_num_threads()))

    def on_micro_batch_start(self, t, mb):
        self.events.append(("mb_start", t.step, mb.index, tuple(mb.x.shape)))

    def on_micro_batch_end(self, t, mb):
        assert mb.loss is not None and mb.loss.dim() == 0 and not mb.loss.requires_grad and mb.aux is not None
        self.events.append(("mb_end", t.step, mb.index))

    def on_optimizer_step(self, t, step):
        grads = [p.grad for p in t.model.parameters() if p.requires_grad]
        assert any(g is not None for g in grads)  # the step's gradients are still there
        self.events.append(("opt_step", step))

    def on_evaluate(self, t, step, metrics):
        self.events.append(("evaluate", step, "val/loss" in metrics))

    def on_checkpoint_save(self, t, path):
        self.events.append(("save", Path(path).name))

    def on_train_end(self, t):
        self.events.append(("train_end", t.status))

    def on_run_end(self, t):
        self.events.append(("run_end", t.status))


def test_hooks_run_in_order_once_per_micro_batch_and_optimizer_step(reg, tmp_path):
    rec = Recorder()
    spec = quiet_spec(steps=4, grad_accum=2, eval_interval=2, checkpoint_interval=2, threads=1)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        res = train(spec, registry=reg, out_dir=tmp_path, progress=False, callbacks=[rec])
    finally:
        torch.set_num_threads(before)
    assert res.status == "finished"
    ev = rec.events
    assert ev[0] == ("run_start", 0, 1)  # train.threads applied before the run starts
    assert ev[1:8] == [("mb_start", 0, 0, (2, 16)), ("mb_end", 0, 0), ("mb_start", 0, 1, (2, 16)),
                       ("mb_end", 0, 1), ("opt_step", 1), ("mb_start", 1, 0, (2, 16)), ("mb_end", 1, 0)]
    assert [e[1] for e in ev if e[0] == "opt_step"] == [1, 2, 3, 4]
    assert sum(e[0] == "mb_start" for e in ev) == 8
    # step 2: evaluation then checkpoint; step 4 (the last): final evaluation and checkpoint at the end
    assert [e for e in ev if e[0] in ("evaluate", "save")] == [
        ("evaluate", 2, True), ("save", "step-0000002"), ("evaluate", 4, True), ("save", "step-0000004")]
    assert ev[-2:] == [("train_end", "finished"), ("run_end", "finished")]


# -- a callback from an installed distribution -------------------------------------------

PLUGIN = textwrap.dedent(
    """
    import torch
    from statelab import Callback, CallbackEntry, hookimpl

    STATELAB_PLUGIN_API = 1


    class StepCounter(Callback):
        name = "step-counter"

        def __init__(self, spec):
            self.steps, self.tokens, self.seed = 0, torch.zeros(()), spec.seed

        def on_micro_batch_end(self, trainer, mb):
            self.tokens += mb.x.numel()

        def on_optimizer_step(self, trainer, step):
            self.steps += 1

        def state_dict(self):
            return {"steps": self.steps, "tokens": self.tokens.clone()}

        def load_state_dict(self, state):
            self.steps, self.tokens = state["steps"], state["tokens"]


    @hookimpl
    def statelab_callbacks():
        return [CallbackEntry("step-counter", StepCounter, description="counts optimizer steps")]
    """
)


@pytest.fixture
def dist_registry(tmp_path, monkeypatch, reg):
    """A distribution installed on sys.path (a dist-info with a `statelab` entry point)."""
    site = tmp_path / "site"
    (site / "counter_plugin").mkdir(parents=True)
    (site / "counter_plugin" / "__init__.py").write_text(PLUGIN)
    info = site / "statelab_counter-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: statelab-counter\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[statelab]\ncounter = counter_plugin\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("STATELAB_PLUGINS", "counter")
    r = Registry(strict=True)
    r.load_entry_points()
    for comp in reg.components.values():
        r._add(comp)
    return r


def test_a_callback_from_a_distribution_runs_and_its_state_survives_resume(dist_registry, tmp_path):
    assert dist_registry.callbacks["step-counter"].distribution == "statelab-counter"
    spec = quiet_spec(steps=6, callbacks=["step-counter"])
    part = train(spec, registry=dist_registry, out_dir=tmp_path, progress=False, stop_after=4)
    state, tensors = load_training_state(part.run_dir / "last")[1:]
    assert state["callbacks"]["step-counter"] == {"steps": 4}
    assert float(tensors["callbacks.step-counter::tokens"]) == 4 * 4 * 16
    seen = []

    class Probe(Callback):  # reads the third-party callback's restored state
        name, order = "probe-state", 99

        def on_checkpoint_load(self, t, path):
            seen.append(t.callbacks.named["step-counter"].steps)

        def on_train_end(self, t):
            seen.append(t.callbacks.named["step-counter"].steps)

    rest = train(spec, registry=dist_registry, out_dir=tmp_path, progress=False, resume=True, callbacks=[Probe()])
    assert rest.status == "finished" and seen == [4, 6]
    assert float(load_training_state(rest.run_dir / "last")[2]["callbacks.step-counter::tokens"]) == 6 * 4 * 16


def test_an_unknown_callback_name_is_a_spec_error(reg, tmp_path):
    with pytest.raises(SpecError, match="unknown callback 'nope'"):
        train(quiet_spec(steps=1, callbacks=["nope"]), registry=reg, out_dir=tmp_path, progress=False)


# -- stops after training ---------------------------------------------------------------

STOP_SCRIPT = textwrap.dedent(
    """
    import sys, time
    import torch
    from statelab import cli
    from statelab.plugins import set_registry
    from statelab.testing import toys

    calls = []

    def busy(*args, **kwargs):  # a long phase that polls nothing
        calls.append(1)
        if len(calls) == 1 and sys.argv[2] == "probe":
            return real_run(*args, **kwargs)  # the first probe completes
        print("BUSY", flush=True)
        x = torch.randn(64, 64)
        while True:
            x = torch.tanh(x @ x)

    real_run = toys.ToyNormProbe.run
    setattr(toys.ToyPlanner if sys.argv[2] == "fit" else toys.ToyNormProbe, "fit" if sys.argv[2] == "fit" else "run",
            busy)
    set_registry(toys.toy_registry())
    sys.exit(cli.main(["train", sys.argv[1], "--out", sys.argv[3]]))
    """
)


def _stop_run(tmp_path: Path, phase: str, spec: dict) -> tuple[int, str, float]:
    import yaml

    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    (tmp_path / "run.py").write_text(STOP_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(tmp_path / "run.py"), str(tmp_path / "spec.yaml"), phase,
                             str(tmp_path / "runs")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=os.environ.copy())
    deadline = time.time() + 300  # training first; slow on a loaded machine
    while time.time() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 1.0)
        if ready and "BUSY" in proc.stdout.readline():
            break
    else:
        proc.kill()
        pytest.fail(f"the {phase} phase never started: {proc.communicate()[1]}")
    t0 = time.time()
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err, time.time() - t0


@pytest.mark.slow
def test_sigterm_during_the_planner_fit_stops_it(tmp_path):
    spec = toy_spec(planner={"kind": "toy-shrink"})
    spec["train"].update(steps=4, eval_interval=2, checkpoint_interval=2, sample_tokens=0)
    code, err, took = _stop_run(tmp_path, "fit", spec)
    assert code == 3, err  # stopped before the run was complete: not 0
    # the phase never ends by itself: the process stopping at all is the point (the bound is loose
    # for a loaded machine)
    assert took < 30 and "fitting the planner (200 steps) stopped by SIGTERM" in err
    assert "statelab: fitting the planner (200 steps)\n" in err and "Traceback" not in err  # its progress; a clean stop
    rd = tmp_path / "runs" / "toy"
    assert load_training_state(rd / "last")[1]["step"] == 4
    assert statelab.load(rd, registry=toy_registry()).planner is not None  # best/ loads (the planner as before the fit)


@pytest.mark.slow
def test_sigterm_during_a_probe_keeps_the_finished_probes(tmp_path):
    spec = toy_spec()
    spec["probes"] = [{"kind": "toy-norm", "batches": 1}, {"kind": "toy-norm", "batches": 2}]
    spec["train"].update(steps=4, eval_interval=2, checkpoint_interval=2, sample_tokens=0)
    code, err, took = _stop_run(tmp_path, "probe", spec)
    assert code == 3 and took < 30 and "probes (2) stopped by SIGTERM" in err, err
    assert "probe toy-norm.0: finite passed" in err and "Traceback" not in err
    rd = tmp_path / "runs" / "toy"
    results = json.loads((rd / "probes" / "results.json").read_text())
    assert list(results) == ["toy-norm.0"] and results["toy-norm.0"]["verdict"] == "finite"
    assert load_training_state(rd / "last")[1]["step"] == 4 and statelab.load(rd, registry=toy_registry()) is not None


def test_the_time_budget_interrupts_the_planner_fit_and_the_run_is_killed(reg, tmp_path, monkeypatch):
    from statelab.tracking import client

    def forever(self, model, batches, **kw):
        start = time.time()
        while time.time() - start < 60:
            batches()
        raise AssertionError("the planner fit was not interrupted")

    class BudgetEndsSoon(Callback):  # the budget runs out 1.5 s into the planner fit
        name, order = "budget", 50

        def on_train_end(self, t):
            t.cfg.time_budget_s = time.time() - process_start_time() + 1.5

    monkeypatch.setattr(toys.ToyPlanner, "fit", forever)
    spec = quiet_spec(steps=3)
    spec["model"]["planner"] = {"kind": "toy-shrink"}
    spec["tracking"] = {"enabled": True, "uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "stops"}
    res = train(spec, registry=reg, out_dir=tmp_path, progress=False, callbacks=[BudgetEndsSoon()])
    assert res.status == "time_budget" and res.step == 3 and res.stopped_in.startswith("fitting the planner")
    run = client(spec["tracking"]["uri"]).get_run(res.mlflow_run_id)
    assert run.info.status == "KILLED" and run.data.tags["statelab.status"] == "time_budget"
    assert statelab.train.exit_status(res) == 3


def test_cli_exits_non_zero_when_the_budget_stops_training(reg, tmp_path, capsys):
    import yaml

    from statelab import cli
    from statelab.plugins import set_registry

    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(quiet_spec(steps=10**6, time_budget_s=0.01)))
    set_registry(reg)
    try:
        assert cli.main(["train", str(path), "--out", str(tmp_path / "runs"), "-q"]) == 3
    finally:
        set_registry(None)
    assert "time_budget at step" in capsys.readouterr().out


def test_elapsed_time_and_mean_throughput_continue_across_resume(reg, tmp_path):
    spec = quiet_spec(steps=8, log_interval=2)
    part = train(spec, registry=reg, out_dir=tmp_path, progress=False, stop_after=4)
    state = load_training_state(part.run_dir / "last")[1]
    assert state["elapsed_s"] > 0 and state["throughput"]["tokens"] > 0
    time.sleep(0.2)
    rest = train(spec, registry=reg, out_dir=tmp_path, progress=False, resume=True)
    assert rest.metrics["train/elapsed_s"] > state["elapsed_s"]
    tokens, seconds = state["throughput"]["tokens"], state["throughput"]["seconds"]
    final = load_training_state(rest.run_dir / "last")[1]["throughput"]
    assert final["tokens"] > tokens and final["seconds"] > seconds  # the second segment adds to the first
    assert rest.tokens_per_s == pytest.approx(final["tokens"] / final["seconds"])
