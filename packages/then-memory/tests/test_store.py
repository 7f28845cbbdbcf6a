import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from then_memory.store import TraceStore


def traces(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)


def fp16(x):
    return x.half().float()


def make(root, d=8, **kw):
    args = dict(hot_budget=16, warm_budget=32, chunk_traces=16)
    args.update(kw)
    return TraceStore(root, d, **args)


def test_exact_search_over_all_tiers_matches_brute_force(tmp_path):
    K, V = traces(300, 8)
    s = make(tmp_path)
    for a in range(0, 300, 13):
        s.append(K[a : a + 13], V[a : a + 13])
    assert (s.n_cold, s.warm.n, s.hot.n) == (256, 28, 16)  # every tier holds traces
    q = torch.randn(6, 8)
    for limit in (None, 150, 290):
        n = 300 if limit is None else limit
        res = s.search(q, 5, limit=limit)
        ref = (q @ fp16(K[:n]).T).topk(5)
        assert torch.equal(res.ids, ref.indices)
        assert torch.allclose(res.scores, ref.values, atol=1e-4)
        assert torch.equal(res.keys, fp16(K)[ref.indices])
        assert torch.equal(res.values, fp16(V)[ref.indices])


def test_fewer_traces_than_k_pads_with_minus_one(tmp_path):
    s = make(None)
    K, V = traces(3, 8)
    s.append(K, V)
    res = s.search(torch.randn(2, 8), 5)
    assert (res.ids[:, 3:] == -1).all() and (res.ids[:, :3] >= 0).all()
    assert torch.equal(res.keys[:, 3:], torch.zeros(2, 2, 8))


class Boom:
    def __getitem__(self, i):
        raise AssertionError("direct addressing read a chunk outside the requested range")


@pytest.mark.parametrize("coarse", [0, 4])
def test_direct_addressing_reads_only_the_range(tmp_path, coarse):
    K, V = traces(300, 8)
    s = make(tmp_path, coarse_lists=coarse)
    s.append(K, V)
    for t0, t1 in [(0, 5), (17, 70), (250, 300), (40, 40)]:
        k, v = s.fetch(t0, t1)
        assert torch.equal(k, fp16(K[t0:t1])) and torch.equal(v, fp16(V[t0:t1]))
    s.chunks[0].k = s.chunks[0].v = Boom()  # time [0, 16)
    k, _ = s.fetch(40, 60)
    assert torch.equal(k, fp16(K[40:60]))
    with pytest.raises(IndexError, match="outside"):
        s.fetch(290, 301)


def test_budgets_hold_however_many_traces(tmp_path):
    s = make(tmp_path, hot_budget=10, warm_budget=40, chunk_traces=20)
    fixed = s.memory_bytes()
    K, V = traces(50, 8)
    for i in range(40):
        s.append(K[i % 50 : i % 50 + 1 + i % 7], V[i % 50 : i % 50 + 1 + i % 7])
        assert s.hot.n <= 10 and s.warm.n <= 40
        assert s.hot.k.shape[0] == 10 and s.warm.k.shape[0] == 40  # allocations never grow
    mb = s.memory_bytes()
    assert (mb["hot"], mb["warm"]) == (fixed["hot"], fixed["warm"])
    assert mb["cold_disk"] > 0 and len(s) == s.n_cold + s.warm.n + s.hot.n


def test_in_memory_store_over_budget_says_what_to_do():
    s = TraceStore(None, 8, hot_budget=4, warm_budget=4, chunk_traces=4)
    with pytest.raises(RuntimeError, match="root directory"):
        s.append(*traces(9, 8))


def test_coarse_search_recall_on_clustered_data(tmp_path):
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(16, 32, generator=g) * 3
    K = centers[torch.randint(0, 16, (4096,), generator=g)] + torch.randn(4096, 32, generator=g)
    s = TraceStore(tmp_path, 32, hot_budget=64, warm_budget=512, chunk_traces=512, coarse_lists=16)
    s.append(K, K)
    q = centers[torch.randint(0, 16, (50,), generator=g)] + torch.randn(50, 32, generator=g)
    exact = s.search(q, 10)
    ref = (q @ fp16(K).T).topk(10).indices
    assert torch.equal(exact.ids, ref)
    approx = s.search(q, 10, coarse=True, nprobe=3)
    recall = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(approx.ids, ref)) / ref.numel()
    assert recall >= 0.9, recall


def test_coarse_index_trains_on_more_than_the_first_chunk(tmp_path):
    # the first sealed chunk holds only cluster A; the warm tier already holds cluster B. Trained
    # on that chunk alone, both lists would sit on A and B's traces would land in a list whose
    # centroid is far from every B query.
    g = torch.Generator().manual_seed(0)
    a, b = torch.zeros(8), torch.zeros(8)
    a[0], b[1] = 10.0, 10.0
    A = a + 0.1 * torch.randn(64, 8, generator=g)
    B = b + 0.1 * torch.randn(128, 8, generator=g)
    s = TraceStore(tmp_path, 8, hot_budget=16, warm_budget=128, chunk_traces=64, coarse_lists=2)
    s.append(A, A)
    s.append(B, B)
    assert s.n_cold == 64 and s.centroids is not None
    to_b = (s.centroids - b).norm(dim=1).min().item()
    assert to_b < 1.0, s.centroids
    s.append(B + 0.01, B)  # B now sealed into lists too: one probed list finds them
    q = b + 0.1 * torch.randn(5, 8, generator=g)
    exact, approx = s.search(q, 8), s.search(q, 8, coarse=True, nprobe=1)
    assert torch.equal(exact.ids, approx.ids)


def test_reopen_and_recover_from_interrupted_writes(tmp_path):
    K, V = traces(100, 8)
    s = make(tmp_path)
    s.append(K[:90], V[:90])
    s.close()
    # a record torn in half, an orphan chunk from a seal that never reached the index, and a
    # log whose chunk was sealed but not yet deleted
    log = max(tmp_path.glob("log_*.bin"))
    with open(log, "ab") as f:
        f.write(b"\x01" * 20)
    (tmp_path / "chunk_000000099999.safetensors").write_bytes(b"junk")
    (tmp_path / "log_000000000000.bin").write_bytes(b"stale")
    s = make(tmp_path)
    assert len(s) == 90
    assert torch.equal(s.fetch(0, 90)[0], fp16(K[:90]))
    assert not (tmp_path / "chunk_000000099999.safetensors").exists()
    assert not (tmp_path / "log_000000000000.bin").exists()
    s.append(K[90:], V[90:])  # the torn tail was cut: new records line up
    s.close()
    s = make(tmp_path)
    assert len(s) == 100 and torch.equal(s.fetch(0, 100)[1], fp16(V))


def _digest(root):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.iterdir())}


def test_read_only_store_writes_nothing(tmp_path):
    K, V = traces(60, 8)
    s = make(tmp_path)
    s.append(K[:50], V[:50])
    s.close()
    before = _digest(tmp_path)
    ro = make(tmp_path, read_only=True)
    ro.append(K[50:], V[50:])
    assert len(ro) == 60 and torch.equal(ro.fetch(50, 60)[0], fp16(K[50:60]))
    ro.close()
    assert _digest(tmp_path) == before
    assert len(make(tmp_path)) == 50


CHILD = textwrap.dedent(
    """
    import sys, torch
    from then_memory.store import TraceStore
    s = TraceStore(sys.argv[1], 8, hot_budget=16, warm_budget=32, chunk_traces=16)
    g = torch.Generator().manual_seed(0)
    K, V = torch.randn(100000, 8, generator=g), torch.randn(100000, 8, generator=g)
    i = len(s)
    while True:
        s.append(K[i:i + 3], V[i:i + 3])
        i += 3
        print(i, flush=True)
    """
)


def test_store_survives_sigkill_mid_ingest(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    last = 0
    deadline = time.time() + 60
    while last < 400 and time.time() < deadline:
        last = int(proc.stdout.readline())
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert last >= 400
    s = make(tmp_path)
    n = len(s)
    assert n >= last  # everything the child had appended before the kill (it kept going after)
    g = torch.Generator().manual_seed(0)
    K, V = torch.randn(100000, 8, generator=g), torch.randn(100000, 8, generator=g)
    k, v = s.fetch(0, n)
    assert torch.equal(k, fp16(K[:n])) and torch.equal(v, fp16(V[:n]))
    s.append(K[n : n + 5], V[n : n + 5])
    assert len(s) == n + 5


@pytest.mark.parametrize("n", [0, 7, 16, 40, 57, 99])
def test_truncate_drops_the_tail_across_tiers(tmp_path, n):
    K, V = traces(100, 8)
    s = make(tmp_path)
    s.append(K, V)
    s.truncate(n)
    assert len(s) == n and torch.equal(s.fetch(0, n)[0], fp16(K[:n]))
    s.append(K[n:], V[n:])
    s.close()
    s = make(tmp_path)
    assert len(s) == 100 and torch.equal(s.fetch(0, 100)[1], fp16(V))


@pytest.mark.parametrize("sizes", [[3, 6, 6, 9, 1, 13], [1] * 30, [40], [5, 17, 2, 33]])
def test_any_append_pattern_keeps_every_trace(tmp_path, sizes):
    K, V = traces(sum(sizes), 8)
    s = make(tmp_path, hot_budget=2, warm_budget=5, chunk_traces=4)
    n = 0
    for m in sizes:
        s.append(K[n : n + m], V[n : n + m])
        n += m
        assert len(s) == n and s.hot.n <= 2 and s.warm.n <= 5
    assert torch.equal(s.fetch(0, n)[0], fp16(K)) and torch.equal(s.fetch(0, n)[1], fp16(V))
    s.close()
    assert torch.equal(make(tmp_path, hot_budget=2, warm_budget=5, chunk_traces=4).fetch(0, n)[0], fp16(K))
