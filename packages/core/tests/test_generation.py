"""Generation: greedy equals teacher forcing, ragged prompts, hooks, stop strings, sampling."""

from __future__ import annotations

import pytest
import torch

import statelab
from statelab.generation import generate, sample_next
from statelab.spec import TokenizerSpec
from statelab.testing.toys import toy_registry, toy_spec
from statelab.tokenizers import make_tokenizer


@pytest.fixture(scope="module")
def reg():
    return toy_registry()


@pytest.fixture(scope="module")
def model(reg):
    m = statelab.build(toy_spec(memories=[{"kind": "toy-ema", "after_layer": 0}]), vocab_size=256, registry=reg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # sharpen the random model so greedy decoding is not a constant
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.5)
    m.tokenizer = make_tokenizer(TokenizerSpec(kind="byte"))
    return m


def prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]


def test_greedy_generation_equals_teacher_forcing(model):
    (p,) = prompts([7])
    res = generate(model, [p], max_new_tokens=12, temperature=0)
    gen = res.tokens[0]
    assert len(gen) == 12
    full = torch.tensor([p + gen])
    with torch.no_grad():
        logits, _, _ = model(full)  # (1, T, V)
    expected = logits[0, len(p) - 1 : -1].argmax(-1).tolist()
    assert gen == expected
    assert res.stats["new_tokens"] == 12 and len(res.stats["step_times_s"]) == 12
    assert res.stats["tokens_per_s"] > 0


def test_prompts_of_different_lengths_match_one_at_a_time(model):
    ps = prompts([3, 9, 5])
    batched = generate(model, ps, max_new_tokens=6, temperature=0)
    for p, got in zip(ps, batched.tokens):
        alone = generate(model, [p], max_new_tokens=6, temperature=0)
        assert got == alone.tokens[0]


def test_final_state_equals_forward_over_prompt_and_output(model):
    (p,) = prompts([5])
    res = generate(model, [p], max_new_tokens=4, temperature=0)
    # the last generated token is returned but not fed: the state covers prompt + first 3 outputs
    with torch.no_grad():
        _, st, _ = model(torch.tensor([p + res.tokens[0][:-1]]))
    for k in st:
        torch.testing.assert_close(res.state[k], st[k], atol=1e-5, rtol=1e-4)


def test_hooks_see_every_step_and_an_injection_changes_the_output(model):
    (p,) = prompts([6])
    calls = []

    def watch(ctx):
        calls.append((ctx.step, ctx.generation_id, ctx.finished, tuple(ctx.tokens.shape)))
        return None

    plain = generate(model, [p], max_new_tokens=8, temperature=0, hooks=[watch])
    assert [c[0] for c in calls] == list(range(8)) + [7]  # after prefill and each step, then finished
    assert calls[-1][2] is True and not any(c[2] for c in calls[:-1])
    assert calls[3][3] == (1, 3)
    ids = {c[1] for c in calls}
    assert len(ids) == 1

    def inject(ctx):
        keys = [f"backbone.{k}" for k in ctx.model.backbone.injectable_keys()]
        target = {k[len("backbone."):]: torch.full_like(ctx.state[k], 3.0) for k in keys}
        new_bb = ctx.model.backbone.inject({k[len("backbone."):]: ctx.state[k] for k in keys}, target, 1.0)
        return {**ctx.state, **{f"backbone.{k}": v for k, v in new_bb.items()}}

    steered = generate(model, [p], max_new_tokens=8, temperature=0, hooks=[inject])
    assert len(set(plain.tokens[0])) > 1  # the unsteered output is not a constant...
    assert steered.tokens[0] != plain.tokens[0]  # ...and steering changes it
    again = generate(model, [p], max_new_tokens=8, temperature=0, hooks=[watch])
    assert again.stats["generation_id"] != plain.stats["generation_id"]


def test_the_planner_hook_is_installed(model, monkeypatch):
    from statelab.testing.toys import ToyPlanner

    m = statelab.build(toy_spec(planner={"kind": "toy-shrink"}), vocab_size=256, registry=toy_registry())
    seen = []
    monkeypatch.setattr(ToyPlanner, "generation_hook", lambda self, model: (lambda ctx: seen.append(ctx.step)))
    generate(m, [[1, 2, 3]], max_new_tokens=3, temperature=0)
    assert seen == [0, 1, 2, 2]
    seen.clear()
    generate(m, [[1, 2, 3]], max_new_tokens=3, temperature=0, use_planner=False)
    assert seen == []


def test_stop_strings_cut_the_text(model):
    text_prompt = "The "
    free = generate(model, text_prompt, max_new_tokens=30, temperature=0)
    full_ids = free.tokens[0]
    full_text = model.tokenizer.decode(full_ids)
    stop = full_text[10:12]
    assert len(stop) == 2
    res = generate(model, text_prompt, max_new_tokens=30, temperature=0, stop=[stop])
    assert res.texts[0] == full_text[: full_text.find(stop)]
    assert res.stats["stopped"] == ["stop"]
    assert len(res.tokens[0]) < 30


def test_sampling_is_reproducible_and_filters_work(model):
    a = generate(model, "ab", max_new_tokens=10, temperature=1.0, seed=3)
    b = generate(model, "ab", max_new_tokens=10, temperature=1.0, seed=3)
    assert a.tokens == b.tokens
    greedy = generate(model, "ab", max_new_tokens=10, temperature=0)
    top1 = generate(model, "ab", max_new_tokens=10, temperature=1.0, top_k=1, seed=5)
    assert top1.tokens == greedy.tokens
    logits = torch.tensor([[0.0, 1.0, 5.0, 4.9]])
    g = torch.Generator().manual_seed(0)
    picks = {int(sample_next(logits, top_p=0.5, generator=g)) for _ in range(50)}
    assert picks == {2}  # 5.0 alone holds more than half the mass
    picks_k = {int(sample_next(logits, top_k=2, generator=g)) for _ in range(100)}
    assert picks_k == {2, 3}


def test_bad_prompts():
    m = statelab.build(toy_spec(), vocab_size=256, registry=toy_registry())
    with pytest.raises(ValueError, match="need a tokenizer"):
        generate(m, "hello", max_new_tokens=2)
    with pytest.raises(ValueError, match="at least one token"):
        generate(m, [[]], max_new_tokens=2)
