"""The task slot: a task registered from a (test) entry point trains and evaluates; core's tasks' data."""

from __future__ import annotations

import math

import numpy as np
import pytest

from statelab import plugins
from statelab.data import make_data
from statelab.data.synthetic import copy_examples, induction_examples
from statelab.plugins import Registry
from statelab.spec import SpecError, validate_spec
from statelab.tasks import make_task
from statelab.testing.toys import toy_spec
from statelab.train import train

# A third-party task: predict x + 1 (mod V) at every position. Written against the public API only.
TASK_PLUGIN = """
from functools import partial

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from statelab.data.synthetic import SyntheticData
from statelab.interfaces import Metric, Task, TaskResult
from statelab.plugins import Component, hookimpl
from statelab.tasks import masked_eval

STATELAB_PLUGIN_API = 1


class SuccParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    vocab_size: int = Field(8, ge=2, description="ids")
    seq_len: int = Field(8, ge=2, description="tokens per example")


def _examples(rng, n, *, V, T):
    x = rng.integers(0, V, size=(n, T))
    return x, (x + 1) % V, np.ones((n, T), dtype=bool)


class SuccTask(Task):
    metrics = (Metric("accuracy", True, "next id right"),)
    primary = "accuracy"

    def spec_overrides(self):
        return {**super().spec_overrides(), "train.seq_len": self.params.seq_len}

    def make_data(self, spec, seed):
        p = self.params
        return SyntheticData("succ", partial(_examples, V=p.vocab_size, T=p.seq_len), vocab_size=p.vocab_size,
                             example_len=p.seq_len, num_train=4096, num_val=128, seed=seed)

    def evaluate(self, model, data, ctx):
        r = masked_eval(model, data.val_batches(64, self.params.seq_len), ctx.device)
        return TaskResult({"accuracy": r["accuracy"]}, samples={"example_accuracy": r["example_accuracy"]})


@hookimpl
def statelab_components():
    return [Component("task", "succ", SuccParams, lambda p, ctx: SuccTask(p), "predict x + 1")]
"""


@pytest.fixture
def task_registry(tmp_path, monkeypatch):
    """The toys plus a task from a fake installed distribution's `statelab` entry point."""
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "succ_task_plugin.py").write_text(TASK_PLUGIN)
    info = tmp_path / "succ_task-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: succ-task\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[statelab]\nsucc-task = succ_task_plugin\n")
    monkeypatch.setenv("STATELAB_PLUGINS", "succ-task,statelab-core")
    monkeypatch.setenv("STATELAB_PLUGIN_MODULES", "statelab.testing.toys")
    reg = Registry(strict=True)
    reg.load_entry_points()
    plugins.set_registry(reg)
    yield reg
    plugins.set_registry(None)


def test_a_task_from_an_entry_point_trains_and_evaluates(task_registry, tmp_path):
    assert task_registry.get("task", "succ").distribution == "succ-task"
    task = make_task("succ", {"vocab_size": 8, "seq_len": 8})
    spec = toy_spec()
    spec.pop("tokenizer")
    spec["model"]["vocab_size"] = 8
    for key, value in task.spec_overrides().items():  # data.kind/params and train.seq_len
        section, _, field = key.partition(".")
        spec.setdefault(section, {})[field] = value
    assert spec["data"] == {"kind": "succ", "params": {"vocab_size": 8, "seq_len": 8}}
    spec["train"].update(steps=80, lr=2e-2, warmup_steps=5, batch_size=16, eval_interval=80, checkpoint_interval=80,
                         sample_tokens=0)
    res = train(spec, out_dir=tmp_path, progress=False)
    assert res.status == "finished"
    from statelab.interfaces import TaskContext

    data = make_data(res.model.spec)
    trained = task.evaluate(res.model, data, TaskContext())
    import statelab

    untrained = task.evaluate(statelab.build(res.model.spec, vocab_size=8, seed=3), data, TaskContext())
    assert trained.metrics["accuracy"] > 0.9 > untrained.metrics["accuracy"] + 0.5
    assert len(trained.samples["example_accuracy"]) == 128


def test_data_kind_names_a_task_and_its_params_are_validated(task_registry):
    spec = toy_spec()
    spec["data"] = {"kind": "succ", "params": {"vocab_size": 1}}
    with pytest.raises(SpecError, match=r"data\.params\.vocab_size"):
        validate_spec(spec)
    spec["data"] = {"kind": "nope"}
    with pytest.raises(SpecError, match="unknown data kind 'nope'; built in: text, mqar, passkey; installed tasks: copy, induction, lm, mqar, passkey, succ"):
        validate_spec(spec)
    spec["data"] = {"kind": "text", "params": {"x": 1}}
    with pytest.raises(SpecError, match="takes no data.params"):
        validate_spec(spec)
    with pytest.raises(SpecError, match="unknown task kind 'nope'"):
        make_task("nope")


def test_core_tasks_are_registered_through_the_entry_point(monkeypatch):
    monkeypatch.setenv("STATELAB_PLUGINS", "statelab-core")
    monkeypatch.delenv("STATELAB_PLUGIN_MODULES", raising=False)
    reg = Registry(strict=True)
    reg.load_entry_points()
    assert {"lm", "mqar", "copy", "induction"} <= set(reg.names("task"))
    assert reg.get("probe", "ablate").distribution == "statelab-core"
    with pytest.raises(SpecError, match=r"task mqar.*num_kv_pairs"):
        make_task("mqar", {"num_kv_pairs": 0}, registry=reg)
    t = make_task("mqar", {"seq_len": 64, "num_kv_pairs": 4}, registry=reg)
    assert t.spec_overrides()["train.seq_len"] == 64 and t.primary == "accuracy"
    assert not t.metric("state_bytes").higher_is_better


def test_copy_examples_layout():
    x, y, m = copy_examples(np.random.default_rng(0), 64, vocab_size=10, context_len=12, num_tokens=4)
    assert x.shape == y.shape == m.shape == (64, 16)
    for i in range(64):
        data = x[i, :12][x[i, :12] != 0]
        assert len(data) == 4 and (data >= 2).all()
        assert x[i, 12] == 1  # the separator
        assert (y[i, 12:] == data).all() and m[i].sum() == 4 and m[i, 12:].all()
        assert (x[i, 13:] == data[:3]).all()  # teacher forcing: the answer so far is input


def test_induction_examples_layout():
    x, y, m = induction_examples(np.random.default_rng(1), 64, vocab_size=8, seq_len=10)
    assert x.shape == (64, 10) and m.sum() == 64 and m[:, -1].all()
    for i in range(64):
        (trig,) = np.flatnonzero(x[i, :-1] == 0)
        assert x[i, -1] == 0 and y[i, -1] == x[i, trig + 1] != 0
        assert (y[i, :-1] == x[i, 1:]).all()


def test_synthetic_data_is_a_pure_function_of_seed_and_step(task_registry):
    task = make_task("copy", {"context_len": 8, "num_tokens": 3, "num_train": 1000})
    spec = toy_spec()
    spec["data"] = {"kind": "copy", "params": task.params.model_dump()}
    a, b = make_data(validate_spec(spec).spec, seed=5), make_data(validate_spec(spec).spec, seed=5)
    assert (a.train_batch(7, 4, 11).x == b.train_batch(7, 4, 11).x).all()
    assert not (a.train_batch(7, 4, 11).x == a.train_batch(8, 4, 11).x).all()
    with pytest.raises(Exception, match="set train.seq_len: 11"):
        a.train_batch(0, 4, 12)
    assert math.isclose(sum(1 for _ in a.val_batches(128, 11)), 4)
