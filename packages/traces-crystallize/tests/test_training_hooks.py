"""Traces and crystallization under the trainer: the schedule counts optimizer steps whatever
``train.grad_accum``, and the path trie, motif ages and EWC Fisher survive checkpoints and
``--resume`` (a resumed run equals an uninterrupted one)."""

from __future__ import annotations

import json

import pytest
import torch

import statelab
from statelab.callbacks import Callback
from statelab.train import train
from traces_crystallize import crystallize, regularizers, transformer
from traces_crystallize.paths import PathTrie


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("STATELAB_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "statelab-cache"))


def spec(**train):
    traces = {"enabled": True, "warmup_steps": 2, "update_interval": 3, "alpha_warmup_steps": 4, "threshold": 0.0,
              "capture_rows": 2}
    cr = {"enabled": True, "log_interval": 2, "prune_interval": 4, "min_frequency": 2, "min_utility": -10.0,
          "max_entropy": 5.0, "threshold": -100.0, "max_motifs": 4, "freeze": False}
    bb = {"kind": "transformer", "n_layers": 2, "n_heads": 2, "ffn": "moe", "n_experts": 4, "top_k": 2,
          "max_seq_len": 32, "traces": traces, "crystallization": cr}
    regs = [{"kind": "crystallization", "weight": 0.01}, {"kind": "ewc", "weight": 1.0}]
    t = {"steps": 12, "batch_size": 8, "seq_len": 16, "lr": 3e-3, "warmup_steps": 2, "eval_interval": 1000,
         "checkpoint_interval": 1000, "sample_tokens": 0, "log_interval": 1, "eval_batches": 1, "threads": 1}
    t.update(train)
    return {"name": "tc", "seed": 3, "tokenizer": {"kind": "byte"},
            "model": {"d_model": 16, "backbone": bb, "regularizers": regs}, "train": t, "tracking": {"enabled": False}}


class Counts(Callback):
    """After each optimizer step (after the components' callbacks): how many times each
    component's periodic work has run so far, and the schedule's step and alpha."""

    name, order = "counts", 90

    def __init__(self, calls: dict[str, int]) -> None:
        self.calls, self.rows = calls, []

    def on_optimizer_step(self, trainer, step: int) -> None:
        bb = trainer.model.backbone
        alpha = float(bb.layers[0].attn.traces.alpha_eff(bb.train_step)[0])
        self.rows.append((step, int(bb.train_step), dict(self.calls), round(alpha, 6)))


def counting(monkeypatch) -> dict[str, int]:
    calls = {"capture": 0, "log_paths": 0, "round": 0, "fisher": 0}

    def wrap(owner, attr, key):
        real = getattr(owner, attr)

        def counted(*args, **kwargs):
            calls[key] += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, attr, counted)

    wrap(transformer.TransformerBackbone, "capture_traces", "capture")
    wrap(PathTrie, "insert", "log_paths")
    wrap(crystallize, "crystallize_round", "round")
    wrap(regularizers.EWC, "update_fisher", "fisher")
    return calls


def test_grad_accum_1_2_4_advance_the_components_once_per_optimizer_step(tmp_path, monkeypatch):
    calls = counting(monkeypatch)
    seen = {}
    for ga in (1, 2, 4):
        for k in calls:
            calls[k] = 0
        counts = Counts(calls)
        train(spec(grad_accum=ga, steps=8), out_dir=tmp_path / str(ga), progress=False, callbacks=[counts])
        seen[ga] = counts.rows
    assert seen[1] == seen[2] == seen[4]
    last = seen[1][-1]
    assert last[1] == 8  # the step counter is the optimizer step
    # captures at steps 2, 5, 8; paths logged at every 2nd step; rounds at 4, 8; the Fisher every step
    assert last[2] == {"capture": 3, "log_paths": 4, "round": 2, "fisher": 8}
    assert [r[3] for r in seen[1][:4]] == [0.0, 0.025, 0.05, 0.075]  # alpha ramp: 0.1 * (step - 1) / 4


def _state(model):
    bb = model.backbone
    ewc = model.regularizers[1]
    return {
        "trie": {k: (v.count, v.util_sum, v.util_n, v.ent_sum, v.first_step) for k, v in bb.trie.nodes.items()},
        "tokens_logged": bb.trie.tokens_logged,
        "motifs": bb.motifs.listing(),
        "fisher": {k: v.clone() for k, v in ewc._fisher.items()},
        "anchors": {k: [t.clone() for t in v] for k, v in ewc._anchor.items()},
    }


def _same(a, b):
    assert a["trie"] == b["trie"] and a["tokens_logged"] == b["tokens_logged"] and a["motifs"] == b["motifs"]
    assert a["fisher"].keys() == b["fisher"].keys() and a["anchors"].keys() == b["anchors"].keys()
    for k in a["fisher"]:
        assert torch.equal(a["fisher"][k], b["fisher"][k]), k
    for k in a["anchors"]:
        assert all(torch.equal(x, y) for x, y in zip(a["anchors"][k], b["anchors"][k])), k


def test_trie_ages_and_fisher_survive_resume_and_load(tmp_path):
    full = train(spec(), out_dir=tmp_path / "a", progress=False)
    part = train(spec(), out_dir=tmp_path / "b", progress=False, stop_after=6)
    assert part.status == "interrupted" and len(part.model.backbone.trie) > 0
    rest = train(spec(), out_dir=tmp_path / "b", progress=False, resume=True)
    want = _state(full.model)
    assert len(want["trie"]) > 0 and want["motifs"] and want["fisher"] and want["anchors"]
    assert any(v[4] > 0 for v in want["trie"].values())  # nodes first seen after step 0: real ages
    _same(_state(rest.model), want)
    losses = [[json.loads(line)["train/loss"] for line in (r.run_dir / "metrics.jsonl").read_text().splitlines()]
              for r in (full, rest)]
    assert losses[0] == losses[1]
    # a checkpoint loaded on its own (statelab probe, statelab.load) has them too
    loaded = statelab.load(full.run_dir / "checkpoints" / "step-0000012")
    assert {k: v.first_step for k, v in loaded.backbone.trie.nodes.items()} == {
        k: v[4] for k, v in want["trie"].items()}
    assert loaded.regularizers[1]._fisher.keys() == want["fisher"].keys()
