"""The lookahead task: graphs, episodes, exact scoring, registration, and the settings it compares."""

import numpy as np
import pytest
import torch

from statelab.interfaces import TaskContext
from statelab.tasks import make_task

from crsm_planner.lookahead import LookaheadTask, at_distance, shortest_path, successor_graph, walk_examples
from crsm_planner.planner_params import LookaheadParams
from crsm_planner.planner_testing import planner_model, single_thread


def test_walks_follow_their_modes_graph_and_goals_need_another_mode():
    succ = successor_graph(16, 3, seed=0, modes=2)
    x, y, m = walk_examples(succ[:1], np.random.default_rng(0), 4, 20)  # mode 0 only
    assert m.all() and (x[:, 1:] == y[:, :-1]).all()
    for row_x, row_y in zip(x, y):
        assert all(b in succ[0, a] for a, b in zip(row_x, row_y))
    for start in range(16):
        for goal in at_distance(succ, start, 2, mode=1):
            assert len(shortest_path(succ[1:], start, goal)) == 2  # two steps in mode 1
            assert len(shortest_path(succ[:1], start, goal)) != 1  # not one step in mode 0
    assert shortest_path(succ, 99, 3) == []  # no node of the graph


def test_scoring_is_exact():
    task = LookaheadTask(LookaheadParams(vocab_size=8, degree=2, modes=2, distance=2, horizon=3, episodes=4))
    succ = task.succ
    a = 0
    b = int(succ[0, a, 0])
    c = int(succ[1, b, 1])
    prompt = torch.tensor([[5, a]])
    assert task.score(prompt, [[b, c, int(succ[0, c, 0])]], [c]) == [1.0]  # reached, every step an edge
    assert task.score(prompt, [[b, 99, c]], [c]) == [0.0]  # a step off the graphs fails the episode
    task.params = task.params.model_copy(update={"mode": "avoid"})
    assert task.score(prompt, [[b, c, int(succ[0, c, 0])]], [c]) == [0.0]


def test_the_task_is_registered_and_compares_every_setting_paired():
    task = make_task("lookahead", {"vocab_size": 16, "episodes": 8, "batch_size": 8, "horizon": 4})
    assert task.spec_overrides()["data.kind"] == "lookahead"
    data = task.make_data(None, 0)
    assert next(iter(data.val_batches(4, 64))).x.shape == (4, 64)
    with single_thread():
        model = planner_model(d_model=16, simulations=4, d_latent=4)
        res = task.evaluate(model, data, TaskContext(seed=0))
    m = res.metrics
    for s in ("off", "planned", "forced", "random", "oracle"):
        assert 0 <= m[f"success_{s}"] <= 1 and len(res.samples[f"success_{s}"]) == 8
    assert m["oracle_minus_off"] == pytest.approx(m["success_oracle"] - m["success_off"])
    assert m["oracle_minus_off_low"] <= m["oracle_minus_off"] <= m["oracle_minus_off_high"]
    assert model.training and model.planner.token_reward.abs().sum() == 0  # mode as found, rewards cleared
