"""Asynchronous planning in generation: never waiting, generation ids, lag, decay, gating."""

import threading
import time

import pytest
import torch

import statelab
from statelab.interfaces import PlanRequest, PlanResult, StepContext

from crsm_planner.async_planner import PlanningHook
from crsm_planner.planner_testing import single_thread, trained_planner_model


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


@pytest.fixture
def model():
    m = trained_planner_model()[0]  # a fresh copy per test (trained once per session)
    yield m
    m.planner.shutdown()


def _slow(planner, seconds):
    real = planner.plan

    def slow_plan(model, request, **kw):
        time.sleep(seconds)
        return real(model, request, **kw)

    planner.plan = slow_plan


def _sleepy(seconds):
    def hook(ctx):
        time.sleep(seconds)

    return hook


def test_generation_never_waits_for_a_slow_planner(model):
    _slow(model.planner, 2.0)
    prompts = torch.randint(97, 101, (2, 8))
    res = statelab.generate(model, prompts, max_new_tokens=60, seed=0)
    st = res.stats
    assert st["planner.requested"] >= 1 and st["planner.skipped_busy"] >= 1
    # one plan takes 2 s; no step took a noticeable part of that, and waiting even once would
    # have made the whole generation last longer than that (it takes ~0.3 s on 2 CPU cores;
    # the margins are for a loaded CI machine)
    assert max(st["step_times_s"]) < 0.5
    assert st["elapsed_s"] < 2.0


def test_a_late_result_from_another_generation_is_never_applied(model):
    _slow(model.planner, 0.6)
    hook = PlanningHook(model.planner, model, inline=False)
    # A lasts long enough for the worker to start on its plan (a request still queued when A
    # ends is skipped altogether), not long enough to get it back
    a = statelab.generate(model, torch.randint(97, 101, (2, 8)), max_new_tokens=3, hooks=[hook, _sleepy(0.05)],
                          use_planner=False, seed=0)
    gid_a = a.stats["generation_id"]
    assert hook.stats["requested"] >= 1 and hook.stats["applied"] == 0  # A ended before its plan came back
    # B outlives A's plan (0.03 s per step); A's late result arrives during B
    b = statelab.generate(model, torch.randint(97, 101, (2, 8)), max_new_tokens=40, seed=1,
                          hooks=[hook, _sleepy(0.03)], use_planner=False)
    gid_b = b.stats["generation_id"]
    assert gid_a != gid_b
    assert b.stats["planner.dropped_foreign"] >= 1
    assert all(g == gid_b for g, _, _ in hook.applied_log)


def test_a_forged_foreign_result_is_dropped(model):
    hook = PlanningHook(model.planner, model, inline=False)
    injected = []

    def forge(ctx):
        if ctx.step == 2:  # a result claiming to be from generation -5, with a full-strength gate
            tgt = {k: torch.full_like(ctx.state[k], 1e3) for k in model.planner.codec.keys}
            hook.worker.results.put(PlanResult(tgt, torch.ones(2), torch.ones(2), ctx.step - 1, -5))
            injected.append(ctx.step)

    res = statelab.generate(model, torch.randint(97, 101, (2, 8)), max_new_tokens=10, hooks=[forge, hook],
                            use_planner=False, seed=0)
    assert injected == [2]
    assert res.stats["planner.dropped_foreign"] >= 1
    assert max(v.abs().max().item() for k, v in res.state.items()) < 1e2


def test_results_past_max_lag_are_dropped(model):
    model.planner.params = model.planner.params.model_copy(update={"max_lag": 2, "plan_every": 1})
    _slow(model.planner, 0.1)
    res = statelab.generate(model, torch.randint(97, 101, (2, 8)), max_new_tokens=40, seed=0,
                            hooks=[_sleepy(0.02)])
    st = res.stats
    assert st["planner.dropped_stale"] >= 1
    assert st["planner.applied"] == 0


def test_applied_results_have_bounded_lag(model):
    model.planner.params = model.planner.params.model_copy(update={"max_lag": 8, "plan_every": 4})
    release = threading.Event()

    def gated_plan(m, request):  # the first plan finishes only once generation reached step 3
        release.wait(5.0)
        return _fixed_plan(m, request)

    def clock(ctx):
        if ctx.step >= 3:
            release.set()
            time.sleep(0.05)  # leave the worker time to deliver

    hook = PlanningHook(model.planner, model, inline=False, plan_fn=gated_plan)
    res = statelab.generate(model, torch.randint(97, 101, (2, 8)), max_new_tokens=20, seed=0, hooks=[clock, hook],
                            use_planner=False)
    st = res.stats
    assert st["planner.applied"] >= 1
    assert 1 <= st["planner.mean_lag"] <= 8
    assert all(1 <= applied - planned <= 8 for _, planned, applied in hook.applied_log)


def test_pending_results_are_discarded_at_the_end_of_a_generation(model):
    hook = PlanningHook(model.planner, model, inline=True, plan_every=1)
    hook.sync_lag = 3
    res = statelab.generate(model, torch.randint(97, 101, (2, 8)), max_new_tokens=12, hooks=[hook],
                            use_planner=False, seed=0)
    st = res.stats
    assert st["planner.discarded_at_end"] == 3  # the last three plans were never due
    accounted = st["planner.applied"] + st["planner.discarded_at_end"] + st["planner.dropped_stale"]
    assert accounted == st["planner.requested"]
    assert st["planner.mean_lag"] == 3.0


def _ctx(model, step, state, gid=1, finished=False):
    return StepContext(model=model, step=step, generation_id=gid, tokens=torch.zeros(2, step, dtype=torch.long),
                       logits=torch.zeros(2, 256), state=state, finished=finished, stats={})


def _fixed_plan(model, request):
    tgt = {k: torch.zeros_like(v) for k, v in request.state.items()}
    return PlanResult(tgt, torch.ones(2), torch.full((2,), 0.5), request.step, request.generation_id)


def test_injection_is_gated_interpolation_decayed_by_lag_and_publishes_alpha(model):
    model.planner.params = model.planner.params.model_copy(update={"lag_decay": 0.8, "sync_lag": 2})
    state = model.init_state(2)
    state = {k: torch.randn_like(v) for k, v in state.items()}
    hook = PlanningHook(model.planner, model, inline=True, plan_fn=_fixed_plan, plan_every=100)
    assert hook(_ctx(model, 0, state)) is None  # request at step 0
    assert hook(_ctx(model, 1, state)) is None  # not due yet
    out = hook(_ctx(model, 2, state))
    a = 0.5 * 0.8**2
    for k in model.planner.codec.keys:
        torch.testing.assert_close(out[k], (1 - a) * state[k])
    torch.testing.assert_close(hook.aux["planner.alpha"], torch.full((2,), a))
    # planner.alpha is a named internal: forcing it to 0 turns the injection off
    hook2 = PlanningHook(model.planner, model, inline=True, plan_fn=_fixed_plan, plan_every=100)
    with statelab.intervene({"planner.alpha": 0.0}):
        hook2(_ctx(model, 0, state))
        hook2(_ctx(model, 1, state))
        out2 = hook2(_ctx(model, 2, state))
    assert all(torch.equal(out2[k], state[k]) for k in state)


def test_worker_failure_is_raised_in_the_generating_thread(model):
    def broken(m, request, **kw):
        raise ValueError("boom in the search")

    model.planner.plan = broken
    with pytest.raises(RuntimeError, match="(?s)background worker failed.*boom in the search"):
        statelab.generate(model, torch.randint(97, 101, (2, 8)), max_new_tokens=50, seed=0, hooks=[_sleepy(0.01)])


def test_worker_duty_bounds_the_time_spent_planning():
    from crsm_planner.async_planner import PlanWorker

    def plan(m, request):
        time.sleep(0.1)
        return _fixed_plan(m, request)

    def run(duty):
        w = PlanWorker(planner=None, queue_size=4, duty=duty)
        t0 = time.perf_counter()
        for step in range(3):
            assert w.submit(None, PlanRequest({}, torch.zeros(2, 4), step, 1), plan)
        for _ in range(3):
            w.results.get(timeout=5)
        elapsed = time.perf_counter() - t0
        w.stop()
        return elapsed

    assert run(1.0) < 0.6  # three 0.1 s plans back to back
    assert run(0.5) >= 0.5  # each followed by an equal rest (the last rest comes after its result)
    assert run(None) >= 0.3 + 2 * 0.9  # auto on the CPU: duty 0.1, each plan followed by nine times its length


@pytest.mark.parametrize("backbone", ["toy-rnn", "mamba2"])
def test_flat_apply_equals_capping_then_the_backbones_inject(backbone):
    from statelab.interfaces import unprefix_state

    from crsm_planner.planner import cap_target_norm
    from crsm_planner.planner_testing import planner_model

    bb = None if backbone == "toy-rnn" else {"kind": "mamba", "mixer": "mamba2", "n_layers": 2, "d_state": 8,
                                              "headdim": 8}
    model = planner_model(backbone=bb, d_model=16, simulations=4)
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape, generator=g) for k, v in model.init_state(3).items()}
    hook = PlanningHook(model.planner, model, inline=True)
    hook._begin(_ctx(model, 0, state))
    assert hook._unit is not None  # the fused path is the one taken
    keys = model.planner.codec.keys
    # targets longer than the state in some units (capped) and shorter in others (kept)
    target = {k: torch.randn(state[k].shape, generator=g) * torch.rand(state[k].shape[:-1] + (1,), generator=g) * 3
              for k in keys}
    alpha = torch.tensor([0.0, 0.3, 1.7])  # clamped to [0, 1] like the backbone's inject
    got = hook._apply_flat(state, target, None, alpha)
    flat = model.planner.codec.flatten(target)
    got_views = hook._apply_flat(state, model.planner.codec.unflatten(flat, state), flat, alpha)
    capped = cap_target_norm(target, state)
    ref = model.backbone.inject(unprefix_state("backbone", state), unprefix_state("backbone", capped), alpha)
    assert any(not torch.allclose(capped[k], target[k]) for k in keys)  # the cap did something
    for k, v in state.items():
        want = ref[k.removeprefix("backbone.")] if k in keys else v
        torch.testing.assert_close(got[k], want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got_views[k], want, rtol=1e-5, atol=1e-6)


def test_stream_mode_applies_the_same_plans_as_inline_planning(model):
    from crsm_planner.async_planner import EagerLauncher

    prompts = torch.randint(97, 101, (2, 8))
    inline = PlanningHook(model.planner, model, inline=True, plan_every=3)  # sync_lag 1
    streamed = PlanningHook(model.planner, model, plan_every=3, launcher=EagerLauncher(model.planner, model, delay=1))
    a = statelab.generate(model, prompts, max_new_tokens=30, hooks=[inline], use_planner=False, seed=0)
    b = statelab.generate(model, prompts, max_new_tokens=30, hooks=[streamed], use_planner=False, seed=0)
    assert b.stats["planner.applied"] == a.stats["planner.applied"] >= 8
    assert [(p, q) for _, p, q in streamed.applied_log] == [(p, q) for _, p, q in inline.applied_log]
    assert b.tokens == a.tokens
    for k in a.state:
        torch.testing.assert_close(b.state[k], a.state[k])
    assert b.stats["planner.mean_alpha"] > 0  # the plans really moved the state


def test_stream_mode_never_waits_skips_while_busy_and_drops_across_generations(model):
    from crsm_planner.async_planner import EagerLauncher

    launcher = EagerLauncher(model.planner, model, delay=3)  # a plan takes three steps to come back
    hook = PlanningHook(model.planner, model, plan_every=1, launcher=launcher)
    a = statelab.generate(model, torch.randint(97, 101, (2, 8)), max_new_tokens=10, hooks=[hook],
                          use_planner=False, seed=0)
    st = a.stats
    assert st["planner.skipped_busy"] >= 1  # a request while the last plan is in flight is skipped, not queued
    assert st["planner.applied"] >= 1 and st["planner.mean_lag"] == 3.0
    assert st["planner.discarded_at_end"] == 1  # in flight when the generation ended
    accounted = st["planner.applied"] + st["planner.discarded_at_end"]
    assert accounted == st["planner.requested"]
    gid_a = a.stats["generation_id"]
    b = statelab.generate(model, torch.randint(97, 101, (2, 8)), max_new_tokens=2, hooks=[hook],
                          use_planner=False, seed=0)
    assert b.stats["planner.applied"] == 0  # A's last launch never reaches B
    assert all(g == gid_a for g, _, _ in hook.applied_log)
    # a second hook launching on the same launcher takes its outputs: the first drops its result
    other = PlanningHook(model.planner, model, plan_every=1, launcher=launcher)
    state = {k: v for k, v in model.init_state(2).items()}
    launcher.polls = launcher.delay  # A's last launch has finished
    hook(_ctx(model, 0, state, gid=50))  # hook launches
    assert hook.stats["requested"] == 1
    other(_ctx(model, 0, state, gid=51))
    assert other.stats["skipped_busy"] == 1  # the launcher is busy with hook's plan
    launcher.polls = launcher.delay  # hook's plan is done but not yet read; other launches over it
    other(_ctx(model, 1, state, gid=51))
    launcher.polls = launcher.delay  # other's plan is done too
    out = hook(_ctx(model, 3, state, gid=50))
    assert out is None and hook.stats["dropped_foreign"] == 1 and hook.stats["applied"] == 0


def _stay_put(model, request):
    """A plan that proposes no move at all: its target is its own snapshot."""
    codec = model.planner.codec
    snap = codec.flatten(request.state)
    return PlanResult(codec.unflatten(snap.clone(), request.state), torch.ones(2), torch.full((2,), 0.5),
                      request.step, request.generation_id, {"snapshot_flat": snap})


@pytest.mark.parametrize("fused", [True, False])
def test_a_stale_target_no_longer_pulls_the_state_back(model, fused):
    """A plan made at step 0 and applied at step 2, after the state has moved on: rebased, a
    plan that proposes no move leaves the state alone and a real plan moves it by exactly
    ``a * (target - snapshot)``; with absolute targets (``target_frame: snapshot``) the same
    no-move plan drags the state back toward the old snapshot."""
    g = torch.Generator().manual_seed(0)
    old = {k: torch.randn(v.shape, generator=g) for k, v in model.init_state(2).items()}
    now = {k: v + torch.randn(v.shape, generator=g) for k, v in old.items()}  # two tokens later
    keys = model.planner.codec.keys
    a = 0.5 * model.planner.params.lag_decay**2

    def run(frame, plan_fn=None, alpha_fn=None):
        model.planner.params = model.planner.params.model_copy(
            update={"target_frame": frame, "sync_lag": 2, "target_norm": "none"})
        hook = PlanningHook(model.planner, model, inline=True, plan_fn=plan_fn, plan_every=100, alpha_fn=alpha_fn)
        if not fused:
            hook._begin(_ctx(model, 0, old))
            hook._unit = None  # the per-entry path
        assert hook(_ctx(model, 0, old)) is None
        hook(_ctx(model, 1, now))
        return hook, hook(_ctx(model, 2, now))

    _, out = run("rebase", _stay_put)
    for k in keys:
        torch.testing.assert_close(out[k], now[k])
    _, stale = run("snapshot", _stay_put)
    for k in keys:
        torch.testing.assert_close(stale[k], (1 - a) * now[k] + a * old[k])
        assert (stale[k] - old[k]).norm() < (now[k] - old[k]).norm()  # pulled back
    # the planner's own plan, rebased: the current state moved by a times the planned change
    plan = model.planner.plan(model, PlanRequest(old, torch.zeros(2, 256), 0, 1))
    _, moved = run("rebase", alpha_fn=lambda a: torch.full_like(a, 0.3))
    for k in keys:
        assert (plan.target[k] - old[k]).norm() > 1e-3  # the plan does move the state
        torch.testing.assert_close(moved[k], now[k] + 0.3 * (plan.target[k] - old[k]), rtol=1e-4, atol=1e-5)
