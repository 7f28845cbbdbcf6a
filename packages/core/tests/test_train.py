"""The trainer on the toy components: learning, exact resume, stops, lock, spec changes."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import statelab
from statelab import train as train_mod
from statelab.checkpoint import load_training_state
from statelab.spec import SpecError
from statelab.testing.toys import toy_registry, toy_spec
from statelab.io import RunLock, RunLockedError
from statelab.train import ResumeError, TrainingDiverged, apply_overrides, train


@pytest.fixture(scope="module")
def reg():
    return toy_registry()


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("STATELAB_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "statelab-cache"))


def losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    return [r["train/loss"] for r in rows]


def test_training_beats_the_uniform_baseline_and_writes_the_run(reg, tmp_path):
    spec = toy_spec()
    spec["train"].update(steps=60, lr=1e-2, eval_interval=30, checkpoint_interval=30)
    res = train(spec, registry=reg, out_dir=tmp_path, progress=False)
    assert res.status == "finished" and res.step == 60
    # a byte model that has learned nothing predicts uniformly: ln(256) = 5.545 nats
    assert res.best_val_loss < math.log(256) - 1.0
    m = res.metrics
    assert m["val/bpb"] == pytest.approx(m["val/loss"] / math.log(2))  # byte tokenizer: 1 byte per token
    assert m["val/bpc"] == pytest.approx(m["val/bpb"])  # Tiny Shakespeare is ASCII: 1 char per byte
    assert m["val/ppl"] == pytest.approx(math.exp(m["val/loss"]))
    assert 0 < m["val/acc"] < 1
    rd = res.run_dir
    assert (rd / "last").resolve() == (rd / "checkpoints" / "step-0000060").resolve()
    assert sorted(p.name for p in (rd / "checkpoints").iterdir()) == ["step-0000030", "step-0000060"]
    assert (rd / "samples.txt").read_text().count("=== step") == 2
    assert (rd / "loss_curve.png").stat().st_size > 1000
    assert not (rd / ".lock").exists()
    assert len(losses(rd)) == 60
    # best/ holds the weights with the lowest val loss
    best = statelab.load(rd / "best", registry=reg)
    assert best.tokenizer.kind == "byte"


def test_keep_last_prunes_old_checkpoints(reg, tmp_path):
    spec = toy_spec()
    spec["train"].update(steps=8, checkpoint_interval=2, keep_last=2, eval_interval=100, sample_tokens=0)
    res = train(spec, registry=reg, out_dir=tmp_path, progress=False)
    assert sorted(p.name for p in (res.run_dir / "checkpoints").iterdir()) == ["step-0000006", "step-0000008"]


@pytest.mark.parametrize("batching", ["random", "stream"])
def test_resume_reproduces_the_uninterrupted_run_exactly(reg, tmp_path, batching):
    spec = toy_spec(dropout=0.1)  # dropout: the torch RNG state must be restored too
    spec["train"].update(steps=16, checkpoint_interval=100, eval_interval=8, batching=batching, log_interval=3)
    full = train(spec, registry=reg, out_dir=tmp_path / "a", progress=False)
    part = train(spec, registry=reg, out_dir=tmp_path / "b", progress=False, stop_after=7)
    assert part.status == "interrupted" and part.step == 7
    assert (tmp_path / "b" / "toy" / "last").resolve().name == "step-0000007"
    rest = train(spec, registry=reg, out_dir=tmp_path / "b", progress=False, resume=True)
    assert rest.step == 16
    a, b = losses(full.run_dir), losses(rest.run_dir)
    assert len(a) == len(b) == 16
    assert a == b  # bit-exact on CPU
    pa = full.model.state_dict()
    pb = rest.model.state_dict()
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


def test_stream_batching_carries_detached_state_and_resets_rows(reg, tmp_path, monkeypatch):
    seen = []
    real = statelab.model.StatelabModel.forward

    def spy(self, tokens, state=None):
        if self.training:
            seen.append({k: v.clone() for k, v in state.items()} if state else None)
            for v in (state or {}).values():
                assert not v.requires_grad  # truncated BPTT: the carried state is detached
        return real(self, tokens, state)

    monkeypatch.setattr(statelab.model.StatelabModel, "forward", spy)
    spec = toy_spec()
    spec["train"].update(steps=3, batching="stream", eval_interval=100, sample_tokens=0, checkpoint_interval=100)
    train(spec, registry=reg, out_dir=tmp_path, progress=False)
    assert len(seen) == 3
    assert all(float(v.abs().sum()) == 0 for v in seen[0].values())  # step 0: every row starts fresh
    assert all(float(v.abs().sum()) > 0 for v in seen[1].values())  # then the state is carried


def test_reset_rows_reinitialises_only_flagged_rows():
    state = {"h": torch.ones(3, 2)}
    init = {"h": torch.zeros(3, 2)}
    out = train_mod._reset_rows(state, torch.tensor([False, True, False]), init)
    assert out["h"].tolist() == [[1, 1], [0, 0], [1, 1]]


def test_grad_accumulation_matches_the_full_batch(reg, tmp_path):
    spec = toy_spec()
    spec["train"].update(steps=4, eval_interval=100, sample_tokens=0, checkpoint_interval=100)
    one = train(spec, registry=reg, out_dir=tmp_path / "a", progress=False)
    spec["train"]["grad_accum"] = 2
    two = train(spec, registry=reg, out_dir=tmp_path / "b", progress=False)
    for (k, p), q in zip(one.model.named_parameters(), two.model.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4, msg=k)


def test_regularizers_are_in_the_loss_and_logged_separately(reg, tmp_path, monkeypatch):
    spec = toy_spec(regularizers=[{"kind": "toy-gate-l2", "weight": 5.0, "target": 0.0}])
    spec["train"].update(steps=5, log_interval=5, eval_interval=100, sample_tokens=0)
    res = train(spec, registry=reg, out_dir=tmp_path, progress=False)
    m = res.metrics
    assert "reg/0.toy-gate-l2" in m and "reg/0.toy-gate-l2.gate_mean" in m
    # the logged total loss is CE + 5 * gate loss, above the plain CE of the same model
    plain = toy_spec()
    plain["train"].update(steps=5, log_interval=5, eval_interval=100, sample_tokens=0)
    res2 = train(plain, registry=reg, out_dir=tmp_path / "plain", progress=False)
    assert m["train/loss"] > res2.metrics["train/loss"] + 5 * 0.5 * m["reg/0.toy-gate-l2"]


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(reg, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = train_mod.token_loss

    def poisoned(logits, y, mask):
        calls["n"] += 1
        loss = real(logits, y, mask)
        return loss * float("nan") if calls["n"] == 13 else loss

    monkeypatch.setattr(train_mod, "token_loss", poisoned)
    spec = toy_spec()
    spec["train"].update(steps=20, checkpoint_interval=10, eval_interval=100, log_interval=5, sample_tokens=0)
    with pytest.raises(TrainingDiverged) as exc:
        train(spec, registry=reg, out_dir=tmp_path, progress=False)
    msg = str(exc.value)
    assert "loss is nan at step 13" in msg and "step-0000010" in msg
    rd = tmp_path / "toy"
    assert sorted(p.name for p in (rd / "checkpoints").iterdir()) == ["step-0000010"]
    assert (rd / "last").resolve().name == "step-0000010"
    assert not (rd / ".lock").exists()
    model = statelab.load(rd / "last", registry=reg)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_huge_learning_rate_diverges_with_a_clear_message(reg, tmp_path):
    spec = toy_spec()
    spec["train"].update(steps=30, lr=1e6, warmup_steps=0, grad_clip=0, eval_interval=100, sample_tokens=0,
                         checkpoint_interval=100)
    with pytest.raises(TrainingDiverged, match=r"training diverged: the loss is (nan|inf) at step \d+"):
        train(spec, registry=reg, out_dir=tmp_path, progress=False)


def test_resume_refuses_a_model_change_and_allows_train_changes(reg, tmp_path):
    spec = toy_spec()
    spec["train"].update(steps=4, eval_interval=100, sample_tokens=0)
    train(spec, registry=reg, out_dir=tmp_path, progress=False)
    changed = toy_spec(d_model=32)
    changed["train"] = dict(spec["train"], steps=6)
    with pytest.raises(ResumeError) as exc:
        train(changed, registry=reg, out_dir=tmp_path, resume=True, progress=False)
    assert "model.d_model: 16 -> 32" in str(exc.value)
    longer = toy_spec()
    longer["train"] = dict(spec["train"], steps=6)
    res = train(longer, registry=reg, out_dir=tmp_path, resume=True, progress=False)
    assert res.step == 6 and len(losses(res.run_dir)) == 6


def test_init_from_starts_a_new_run_from_a_checkpoints_weights(reg, tmp_path):
    first = toy_spec()
    first["train"].update(steps=5, lr=1e-2, eval_interval=100, sample_tokens=0)
    trained = train(first, registry=reg, out_dir=tmp_path / "a", progress=False).model
    second = toy_spec()
    second["name"] = "second"
    second["train"].update(steps=0, eval_interval=100, sample_tokens=0, init_from=str(tmp_path / "a" / "toy"))
    res = train(second, registry=reg, out_dir=tmp_path / "b", progress=False)
    assert res.step == 0
    for (k, a), (_, b) in zip(trained.state_dict().items(), res.model.state_dict().items()):
        assert torch.equal(a.cpu(), b.cpu()), k
    fresh = train(dict(second, train=dict(second["train"], init_from=None)), registry=reg, out_dir=tmp_path / "c",
                  progress=False).model
    assert not all(torch.equal(a, b) for a, b in zip(trained.state_dict().values(), fresh.state_dict().values()))

    wider = toy_spec(d_model=32)
    wider["train"] = dict(second["train"])
    with pytest.raises(ValueError, match=r"train.init_from .*does not fit the model this spec builds \(of another shape: "):
        train(wider, registry=reg, out_dir=tmp_path / "d", progress=False)


def test_fresh_run_refuses_to_overwrite_and_resume_needs_a_checkpoint(reg, tmp_path):
    spec = toy_spec()
    spec["train"].update(steps=2, eval_interval=100, sample_tokens=0)
    with pytest.raises(ResumeError, match="nothing to resume"):
        train(spec, registry=reg, out_dir=tmp_path, resume=True, progress=False)
    train(spec, registry=reg, out_dir=tmp_path, progress=False)
    with pytest.raises(ResumeError, match="pass --resume"):
        train(spec, registry=reg, out_dir=tmp_path, progress=False)


def test_lock_refuses_a_live_owner_and_reclaims_a_stale_one(reg, tmp_path, capsys):
    rd = tmp_path / "toy"
    rd.mkdir()
    holds = f"import sys, time; from statelab.io import RunLock; RunLock({str(rd)!r}).acquire(); print(1, flush=True); time.sleep(60)"
    sleeper = subprocess.Popen([sys.executable, "-c", holds], stdout=subprocess.PIPE)
    try:
        assert sleeper.stdout.readline().strip() == b"1"
        spec = toy_spec()
        spec["train"].update(steps=2, eval_interval=100, sample_tokens=0)
        with pytest.raises(RunLockedError, match=f"in use by another trainer \\(PID {sleeper.pid} on host "):
            train(spec, registry=reg, out_dir=tmp_path, progress=False)
    finally:
        sleeper.kill()
        sleeper.wait()
    # the owner is dead now (killed: it could not release): its lock is stale and is reclaimed
    res = train(spec, registry=reg, out_dir=tmp_path, progress=False)
    assert res.status == "finished"
    assert "reclaiming stale lock" in capsys.readouterr().err
    assert not (rd / ".lock").exists()


def test_lock_object(tmp_path):
    lock = RunLock(tmp_path).acquire()
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / ".lock").exists()


SIGTERM_SCRIPT = textwrap.dedent(
    """
    import sys
    from statelab.testing.toys import toy_registry, toy_spec
    from statelab.train import train
    spec = toy_spec()
    spec["train"].update(steps=100000, log_interval=1, eval_interval=100000, checkpoint_interval=100000,
                         sample_tokens=0)
    res = train(spec, registry=toy_registry(), out_dir=sys.argv[1], progress=True)
    print("STATUS", res.status, res.step, flush=True)
    """
)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(reg, tmp_path):
    script = tmp_path / "run.py"
    script.write_text(SIGTERM_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "out")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    metrics = tmp_path / "out" / "toy" / "metrics.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "stopped by SIGTERM" in err
    status, step = out.split("STATUS ")[1].split()[:2]
    assert status == "interrupted"
    ck, state, _ = load_training_state(tmp_path / "out" / "toy" / "last")
    assert state["step"] == int(step) >= 3
    assert not (tmp_path / "out" / "toy" / ".lock").exists()


def test_planner_fit_and_probes_run_after_training(reg, tmp_path, monkeypatch):
    from statelab.testing.toys import ToyPlanner

    got = {}

    def fit(self, model, batches, **kw):
        x = batches()
        got.update(kw, shape=tuple(x.shape), dtype=x.dtype)
        return {"dyn_loss": 0.25}

    monkeypatch.setattr(ToyPlanner, "fit", fit)
    from statelab.testing.toys import ToyNormProbe

    got_ctx = {}
    real_run = ToyNormProbe.run

    def run(self, model, ctx):
        got_ctx.update(ctx.extra)
        return real_run(self, model, ctx)

    monkeypatch.setattr(ToyNormProbe, "run", run)
    spec = toy_spec(planner={"kind": "toy-shrink"})
    spec["probes"] = [{"kind": "toy-norm", "batches": 1}]
    spec["train"].update(steps=4, eval_interval=100, sample_tokens=0)
    spec["train"]["planner_fit"] = {"steps": 3, "batch_size": 2, "seq_len": 8, "lr": 0.01}
    res = train(spec, registry=reg, out_dir=tmp_path, progress=False)
    assert got == {"steps": 3, "batch_size": 2, "seq_len": 8, "lr": 0.01, "shape": (2, 8), "dtype": torch.int64}
    assert res.metrics["planner/dyn_loss"] == 0.25
    assert res.metrics["probe/toy-norm/passed"] == 1.0 and res.metrics["probe/toy-norm/hidden_norm"] > 0
    assert got_ctx["data"].vocab_size == 256  # probes get the DataSource in ctx.extra["data"]
    results = json.loads((res.run_dir / "probes" / "results.json").read_text())
    assert results["toy-norm"]["verdict"] == "finite"


def test_time_budget_stops_the_run(reg, tmp_path):
    spec = toy_spec()
    spec["train"].update(steps=10**6, time_budget_s=0.5, eval_interval=10**6, sample_tokens=0)
    t = time.time()
    res = train(spec, registry=reg, out_dir=tmp_path, progress=False)
    # the budget counts from process start (already past 0.5 s in a test session): it stops at once
    assert res.status == "time_budget" and res.step < 10**6
    assert time.time() - t < 30
    assert res.best_val_loss is not None  # one evaluation is always recorded


def test_overrides_and_batch_divisibility(reg, tmp_path):
    doc = apply_overrides(toy_spec(), ["train.steps=3", "model.memories.0={kind: toy-ema, after_layer: 1}",
                                        "train.lr=0.002"])
    assert doc["train"]["steps"] == 3 and doc["train"]["lr"] == 0.002
    assert doc["model"]["memories"] == [{"kind": "toy-ema", "after_layer": 1}]
    with pytest.raises(SpecError, match="not key=value"):
        apply_overrides({}, ["train.steps"])
    spec = toy_spec()
    spec["train"].update(batch_size=3, grad_accum=2)
    with pytest.raises(SpecError, match="not divisible by world_size x grad_accum"):
        train(spec, registry=reg, out_dir=tmp_path, progress=False)


def test_cli_train_and_resume(reg, tmp_path, capsys):
    from statelab import cli
    from statelab.plugins import set_registry

    spec = toy_spec()
    spec["train"].update(steps=4, eval_interval=100, sample_tokens=0)
    path = tmp_path / "spec.yaml"
    import yaml

    path.write_text(yaml.safe_dump(spec))
    set_registry(reg)
    try:
        assert cli.main(["train", str(path), "--out", str(tmp_path / "runs"), "--set", "train.steps=3", "-q"]) == 0
        assert "finished at step 3" in capsys.readouterr().out
        assert cli.main(["train", str(path), "--out", str(tmp_path / "runs"), "-q"]) == 2
        assert "pass --resume" in capsys.readouterr().err
        assert cli.main(["train", str(path), "--out", str(tmp_path / "runs"), "--resume", "-q"]) == 0
        assert "finished at step 4" in capsys.readouterr().out
        assert len(losses(tmp_path / "runs" / "toy")) == 4
    finally:
        set_registry(None)
