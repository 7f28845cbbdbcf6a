"""Coarse search per query, retraining as the store grows, and recall on a model's own traces."""

from pathlib import Path

import numpy as np
import torch

import statelab
from then_memory.store import TraceStore
from then_memory.users import ingest_tokens


def clustered(n, d, centers=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(centers, d, generator=g) * 3
    return c[torch.randint(0, centers, (n,), generator=g)] + torch.randn(n, d, generator=g)


def test_a_batch_never_widens_a_querys_search(tmp_path):
    s = TraceStore(tmp_path, 16, hot_budget=8, warm_budget=64, chunk_traces=64, coarse_lists=16)
    x = clustered(600, 16)
    s.append(x, x)
    q = clustered(24, 16, seed=1)
    batch = s.search(q, 5, coarse=True, nprobe=2)
    lists = (q @ s.centroids.T).topk(2, dim=1).indices  # (Q, 2) each query's probed lists
    for i in range(q.shape[0]):
        alone = s.search(q[i], 5, coarse=True, nprobe=2)
        assert torch.equal(batch.ids[i], alone.ids[0])
        # every cold id it returns lies in one of its own lists
        cold = [t for t in batch.ids[i].tolist() if 0 <= t < s.n_cold]
        if cold:
            k, _ = s.get(torch.tensor(cold))
            near = ((k[:, None] - s.centroids[None]) ** 2).sum(-1).argmin(1)
            assert all(int(a) in lists[i].tolist() for a in near)


def test_index_is_retrained_as_the_store_doubles_and_a_crash_mid_relayout_is_finished(tmp_path):
    s = TraceStore(tmp_path, 8, hot_budget=8, warm_budget=32, chunk_traces=32, coarse_lists=4)
    s.append(*(2 * [clustered(32 + 40, 8, centers=4)]))  # one sealed chunk: index trained on it
    assert s.centroid_gen == 1 and s.trained_on == 32
    shifted = clustered(200, 8, centers=4, seed=5) + 10  # new traces far from the first ones
    s.append(shifted, shifted)  # the cold tier doubles three times: retrained at 64, 128, 256 cold traces
    assert s.centroid_gen == 4 and s.trained_on == 256 and s.n_cold == 256
    assert all(c.gen == 4 for c in s.chunks)
    q = clustered(20, 8, centers=4, seed=7) + 10
    exact = s.search(q, 4)
    assert torch.equal(s.search(q, 4, coarse=True, nprobe=4).ids, exact.ids)  # every list probed: exact
    # a retraining killed after its centroids were written: old-layout chunks are read whole,
    # then reopening re-lays them
    s._train_centroids(clustered(256, 8, centers=4, seed=9), s.n_cold)
    assert torch.equal(s.search(q, 4, coarse=True, nprobe=1).ids[:, :1], exact.ids[:, :1])
    s.close()
    s2 = TraceStore(tmp_path, 8, hot_budget=8, warm_budget=32, chunk_traces=32, coarse_lists=4)
    assert s2.centroid_gen == 5 and all(c.gen == 5 for c in s2.chunks)
    assert torch.equal(s2.search(q, 4).ids, exact.ids)
    k, v = s2.fetch(0, len(s2))  # every trace still where its time index says
    assert torch.allclose(k[72:], shifted.half().float())


def test_coarse_recall_on_model_keys(tmp_path, registry, then_spec):
    """Traces and queries of a small model (a Mamba backbone and a ``then`` memory) over Tiny
    Shakespeare: the coarse lists find most of the exact top-10 with an eighth of the lists."""
    from statelab.data import bundled_corpus_path
    from statelab.tokenizers import ByteTokenizer

    spec = then_spec(n_heads=4, chunk_size=16, window=16)
    spec["model"].update({"d_model": 32, "backbone": {"kind": "toy-rnn", "n_layers": 2, "d_state": 16}})
    torch.manual_seed(0)
    model = statelab.build(spec, registry=registry).eval()
    text = Path(bundled_corpus_path()).read_text()[:6400]
    ids = torch.tensor([ByteTokenizer().encode(text)])
    mem = model.memories[0]
    store = TraceStore(tmp_path, 32, hot_budget=128, warm_budget=1024, chunk_traces=1024, coarse_lists=32)
    mem.attach_store(store)
    ingest_tokens(model, ids[:, :6144], segment_len=512)
    mem.attach_store(None)
    assert store.n_cold >= 4096 and store.centroid_gen >= 2  # retrained as it grew
    # the queries the memory makes on later text, scaled as its read ranks them
    h = {}
    hook = mem.qkv.register_forward_hook(lambda m, i, o: h.__setitem__("q", o[..., :32]))
    with torch.no_grad():
        model(ids[:, 6144:6400])
    hook.remove()
    tau = mem.recall_log_temp.exp().repeat_interleave(mem.dh)
    q = (h["q"][0] * tau).detach()  # (256, 32)
    exact = store.search(q, 10)
    recall = {}
    for nprobe in (4, 8):
        got = store.search(q, 10, coarse=True, nprobe=nprobe)
        recall[nprobe] = np.mean([len(set(a.tolist()) & set(b.tolist())) / 10 for a, b in zip(got.ids, exact.ids)])
    assert recall[4] >= 0.8 and recall[8] >= 0.9, recall


def test_cli_flags_reach_the_store(tmp_path, registry, then_spec, monkeypatch, capsys):
    from statelab.checkpoint import save
    from statelab.cli import main
    from statelab.plugins import set_registry
    from statelab.tokenizers import ByteTokenizer
    import then_memory.users as users

    model = statelab.build(then_spec(), registry=registry)
    ckpt = save(tmp_path / "ckpt", model, tokenizer=ByteTokenizer())
    (tmp_path / "notes.txt").write_text("The shed code is 4471.\n" * 4)
    opened = []
    real = users.TraceStore.__init__

    def spy(self, *a, **k):
        real(self, *a, **k)
        opened.append((self.coarse_lists, self.durable))

    monkeypatch.setattr(users.TraceStore, "__init__", spy)
    set_registry(registry)
    try:
        base = ["memory", "ingest", "--user", "a", "--model", str(ckpt), "--root", str(tmp_path / "u"), str(tmp_path / "notes.txt")]
        assert main(base + ["--coarse-lists", "8", "--nprobe", "2", "--durable"]) == 0
        assert main(base) == 0
        assert main(base + ["--nprobe", "0"]) == 2 and "--nprobe" in capsys.readouterr().err
    finally:
        set_registry(None)
    assert opened == [(8, True), (0, False)]
