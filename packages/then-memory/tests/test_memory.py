import pytest
import torch

import statelab
from statelab.testing import check_memory, check_model
from then_memory.memory import ThenMemory
from then_memory.naive import naive_forward, trace_source_end
from then_memory.store import TraceStore


def small(mode, **kw):
    args = dict(n_heads=2, chunk_size=3, trace_mode=mode, window=4, ring_size=5, top_k=3)
    args.update(kw)
    return ThenMemory(16, **args)


@pytest.mark.parametrize("mode", ["token", "pooled"])
def test_conformance(mode):
    # ring_size 3 < traces written in 12 tokens: eviction happens inside the checks
    check_memory(lambda: small(mode, ring_size=3, top_k=2), 16)


@pytest.mark.parametrize("trace_key", ["previous", "self"])
@pytest.mark.parametrize("mode", ["token", "pooled"])
def test_matches_naive_reference_in_random_pieces(mode, trace_key):
    torch.manual_seed(1)
    mem = small(mode, trace_key=trace_key).eval()
    x = torch.randn(2, 23, 16)
    with torch.no_grad():
        ref, reads = naive_forward(mem, x)
        outs, state, t = [], None, 0
        for n in [5, 1, 7, 3, 7]:  # pieces that cut chunks at every offset
            y, state, _ = mem(x[:, t : t + n], state)
            outs.append(y)
            t += n
    got = torch.cat(outs, 1)
    assert torch.allclose(got, ref, atol=1e-5), (got - ref).abs().max()
    # the reference read traces, and none was written from the reading position or later
    assert reads[0]
    for row in reads:
        for p, n in row:
            assert trace_source_end(mem, n) < p
    assert state["count"].tolist() == [(23 // 3) * (3 if mode == "token" else 1)] * 2
    assert state["pos"].tolist() == [23, 23]


def test_no_trace_is_readable_before_its_chunk_ends():
    mem = ThenMemory(16, n_heads=2, chunk_size=4, window=4, ring_size=16, top_k=2).eval()
    x = torch.randn(1, 9, 16)
    with torch.no_grad():
        _, _, aux = mem(x)
    recall = aux["memory.recall"][0]  # (T, D)
    assert torch.equal(recall[:4], torch.zeros_like(recall[:4]))  # chunk 0 is written after position 3
    assert recall[4:].abs().sum(-1).gt(0).all()
    assert set(aux) == {"memory.recall", "memory.gate"}
    assert aux["memory.gate"].shape == (1, 9, 2)


def test_gate_forcing_removes_traces():
    mem = small("token").eval()
    x = torch.randn(1, 12, 16)
    with torch.no_grad():
        y, _, _ = mem(x)
        with statelab.intervene({"memory.recall": 0.0}):
            y0, _, _ = mem(x)
    assert not torch.allclose(y[:, 3:], y0[:, 3:])  # traces change the output after the first chunk
    assert torch.allclose(y[:, :3], y0[:, :3])


@pytest.mark.parametrize("mode", ["token", "pooled"])
def test_store_backend_equals_ring_when_everything_fits(tmp_path, mode):
    mem = small(mode, ring_size=64).eval()
    x = torch.randn(1, 20, 16)
    with torch.no_grad():
        y_ring, s_ring, _ = mem(x)
        store = TraceStore(tmp_path, 16, hot_budget=2, warm_budget=2, chunk_traces=2)  # all three tiers used
        mem.attach_store(store)
        ys, state = [], None
        for a in range(0, 20, 6):
            y, state, _ = mem(x[:, a : a + 6], state)
            ys.append(y)
        mem.attach_store(None)
    # fp16 storage of the store's traces: outputs agree to fp16 precision
    assert torch.allclose(torch.cat(ys, 1), y_ring, atol=2e-3)
    n = int(s_ring["count"][0])
    assert len(store) == n and store.n_cold > 0
    k, v = store.fetch(0, n)
    order = s_ring["ring_n"][0].argsort()[-n:]
    assert torch.allclose(k, s_ring["ring_k"][0][order], atol=2e-3)


def test_store_backend_refuses_batches_and_foreign_states(tmp_path):
    mem = small("token")
    mem.attach_store(TraceStore(None, 16, hot_budget=8, warm_budget=8, chunk_traces=8))
    with pytest.raises(ValueError, match="one per batch row"):
        mem(torch.randn(2, 4, 16))
    state = mem.init_state(1)
    state["count"] += 5
    with pytest.raises(ValueError, match="different users"):
        mem(torch.randn(1, 4, 16), state)


def test_assembled_model_conformance(registry, then_spec):
    check_model(lambda: statelab.build(then_spec(), registry=registry))
    check_model(lambda: statelab.build(then_spec(trace_mode="pooled", ring_size=2), registry=registry))


def test_window_must_cover_chunk(registry, then_spec):
    with pytest.raises(statelab.SpecError, match="window"):
        statelab.build(then_spec(window=2, chunk_size=4), registry=registry)


def test_store_backend_coarse_reads_with_all_lists_equal_exact(tmp_path):
    mem = small("token", ring_size=64).eval()
    x = torch.randn(1, 20, 16)
    with torch.no_grad():
        outs = []
        for coarse in (False, True):
            store = TraceStore(tmp_path / str(coarse), 16, hot_budget=2, warm_budget=4, chunk_traces=4, coarse_lists=2)
            mem.attach_store(store, coarse=coarse, nprobe=2)  # every list probed: the same candidates
            ys, state = [], None
            for a in range(0, 20, 5):  # later pieces read what earlier ones stored
                y, state, _ = mem(x[:, a : a + 5], state)
                ys.append(y)
            outs.append(torch.cat(ys, 1))
            assert store.n_cold > 0 and store.centroids is not None
        mem.attach_store(None)
    assert torch.allclose(outs[0], outs[1], atol=1e-6)


def test_ingest_writes_only_through_the_tail_memory_and_keeps_the_state_exact(registry, then_spec):
    """ingest_tokens skips the reads of a memory that only feeds the head: same state as a full run."""
    from then_memory.users import ingest_tokens

    model = statelab.build(then_spec(), registry=registry).eval()
    model.memory_layers = [len(model.backbone.layers) - 1]  # the memory after the last layer
    x = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        full = None
        for a in range(0, 40, 16):
            _, full, _ = model.hidden(x[:, a : a + 16], full)
        reads = []
        mem = model.memories[0]
        orig = mem._read
        mem._read = lambda *a: reads.append(1) or orig(*a)
        fast = ingest_tokens(model, x, None, 16)
        del mem._read
    assert not reads  # the ingest never read
    assert set(full) == set(fast)
    for k in full:
        assert torch.allclose(full[k].float(), fast[k].float(), atol=1e-6), k
    assert not model.memories[0].write_only  # reset after the ingest


@pytest.mark.parametrize("supersede_cos", [0.0, 0.5])
def test_supersede_matches_naive_reference(supersede_cos):
    torch.manual_seed(2)
    mem = small("token", supersede_cos=supersede_cos).eval()
    x = torch.randn(2, 23, 16)
    with torch.no_grad():
        ref, _ = naive_forward(mem, x)
        y1, s1, _ = mem(x[:, :10])
        y2, _, _ = mem(x[:, 10:], s1)
        plain, _, _ = small("token").eval()(x)
    assert torch.allclose(torch.cat([y1, y2], 1), ref, atol=1e-5)
    assert not torch.allclose(ref, plain, atol=1e-4)  # the rule changed some reads


def _two_facts_memory(**kw) -> tuple[ThenMemory, torch.Tensor]:
    """A memory whose key reads dims 0-3 of the input and whose value reads dims 4-7, and a
    sequence: fact (key e0, value a), filler, update (key e0, value b), filler, question (key e0)."""
    mem = ThenMemory(8, n_heads=1, chunk_size=1, window=1, ring_size=16, top_k=2, trace_key="self",
                     tie_qk_init=False, **kw).eval()
    with torch.no_grad():
        mem.norm.weight.fill_(1.0), mem.norm.bias.zero_()
        w = torch.zeros(24, 8)
        w[0:4, 0:4] = torch.eye(4)  # q
        w[8:12, 0:4] = torch.eye(4)  # k
        w[20:24, 4:8] = torch.eye(4)  # v
        mem.qkv.weight.copy_(w)
        mem.gate.bias.fill_(20.0)  # read the traces only
    e0 = torch.tensor([3.0, 0, 0, 0])
    a, b = torch.tensor([1.0, -1, 1, -1]), torch.tensor([-1.0, 1, 1, -1])
    filler = torch.tensor([0, 0, 2.0, 0, 0, 0, 0, 0])
    x = torch.stack([torch.cat([e0, a]), filler, torch.cat([e0, b]), filler, torch.cat([e0, torch.zeros(4)])])
    return mem, x[None]  # (1, 5, 8)


@pytest.mark.parametrize("backend", ["ring", "store"])
def test_an_updated_fact_replaces_the_old_one(tmp_path, backend):
    """Two traces written in the same context: with ``supersede_cos`` the newer value is read
    alone (not a blend), in the ring and through a store; without it both are blended."""
    reads = {}
    for rule in (None, 0.99):
        mem, x = _two_facts_memory(supersede_cos=rule)
        if backend == "store":
            mem.attach_store(TraceStore(tmp_path / str(rule), 8, hot_budget=2, warm_budget=2, chunk_traces=2))
        with torch.no_grad():
            state = None
            for t in range(5):  # one token at a time: the question reads traces from earlier calls
                _, state, aux = mem(x[:, t : t + 1], state)
        reads[rule] = aux["memory.recall"][0, -1]  # (D,) what the question read
    v = lambda t: mem.qkv(mem.norm(x[0, t]))[16:]  # noqa: E731 - the value a token writes
    with torch.no_grad():
        assert torch.allclose(reads[0.99], v(2), atol=2e-3)  # the update only (fp16 in a store)
        assert not torch.allclose(reads[None], v(2), atol=1e-2)  # a blend of the fact and its update
        assert torch.allclose(reads[None], (v(0) + v(2)) / 2, atol=2e-3)


def test_one_forward_serves_several_users_from_their_own_stores(tmp_path):
    """Rows of a batch with one store each give what each row gives alone, and write only
    into their own store."""
    torch.manual_seed(3)
    mem = small("token", ring_size=64).eval()
    x = torch.randn(3, 14, 16)
    alone = []
    with torch.no_grad():
        for b in range(3):
            st = TraceStore(tmp_path / f"a{b}", 16, hot_budget=4, warm_budget=4, chunk_traces=4)
            mem.attach_store(st)
            y1, s1, _ = mem(x[b : b + 1, :8])
            y2, _, _ = mem(x[b : b + 1, 8:], s1)
            alone.append((torch.cat([y1, y2], 1), st.fetch(0, len(st))[0]))
        stores = [TraceStore(tmp_path / f"b{b}", 16, hot_budget=4, warm_budget=4, chunk_traces=4) for b in range(3)]
        mem.attach_stores(stores)
        y1, s1, _ = mem(x[:, :8])
        y2, _, _ = mem(x[:, 8:], s1)
        mem.attach_stores(None)
    y = torch.cat([y1, y2], 1)
    for b in range(3):
        assert torch.allclose(y[b], alone[b][0][0], atol=1e-5)
        assert torch.equal(stores[b].fetch(0, len(stores[b]))[0], alone[b][1])
