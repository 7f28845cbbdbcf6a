"""MQAR generator invariants (Zoology's multi-query associative recall)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from statelab.data import DataError, make_data
from statelab.data.base import TRAIN, VAL
from statelab.data.mqar import MQARData, mqar_examples
from statelab.spec import MQARSpec, parse_spec


def check_invariants(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, V: int, P: int) -> None:
    n, T = x.shape
    assert y.shape == mask.shape == (n, T) and mask.dtype == torch.bool
    assert int(x.min()) >= 0 and int(x.max()) < V and int(y.min()) >= 0 and int(y.max()) < V
    assert torch.equal(mask.sum(1), torch.full((n,), P))  # one query per key
    assert not mask[:, : 2 * P].any()  # no query before the key-value section ends
    for i in range(n):
        keys, values = x[i, 0 : 2 * P : 2], x[i, 1 : 2 * P : 2]
        assert bool((keys >= 1).all() and (keys < V // 2).all())  # keys from the lower half, never 0
        assert bool((values >= V // 2).all())  # values from the upper half
        assert len(set(keys.tolist())) == P and len(set(values.tolist())) == P
        assert torch.equal(y[i, 0 : 2 * P - 1], x[i, 1 : 2 * P])  # inside the kv section: next token
        pairs = dict(zip(keys.tolist(), values.tolist()))
        qpos = torch.nonzero(mask[i]).flatten()
        assert bool(((qpos - 2 * P) % 2 == 0).all())  # queries at even offsets of the query section
        queried = x[i, qpos].tolist()
        assert sorted(queried) == sorted(pairs)  # every key asked exactly once
        for p, k in zip(qpos.tolist(), queried):
            assert int(y[i, p]) == pairs[k]  # the target at a query is the value paired with it earlier
        unmasked = ~mask[i]
        unmasked[-1] = False
        assert torch.equal(y[i, :-1][unmasked[:-1]], x[i, 1:][unmasked[:-1]])


@pytest.mark.parametrize("V,T,P", [(64, 64, 8), (8192, 256, 16), (10, 16, 4)])
def test_mqar_invariants(V, T, P):
    x, y, mask = mqar_examples(np.random.default_rng(V), 64, vocab_size=V, seq_len=T, num_kv_pairs=P)
    assert x.shape == (64, T) and x.dtype == torch.int64
    check_invariants(x, y, mask, V, P)


def test_power_law_puts_queries_early():
    V, T, P = 512, 512, 8
    _, _, steep = mqar_examples(np.random.default_rng(0), 400, vocab_size=V, seq_len=T, num_kv_pairs=P, power_a=0.01)
    _, _, flat = mqar_examples(np.random.default_rng(0), 400, vocab_size=V, seq_len=T, num_kv_pairs=P, power_a=1.0)
    pos = torch.arange(T).float()
    mean_steep = float((steep * pos).sum() / steep.sum())
    mean_flat = float((flat * pos).sum() / flat.sum())
    # power_a = 1 is uniform over the query section: mean near its middle
    assert abs(mean_flat - (2 * P + (T - 2 * P) / 2)) < 15
    assert mean_steep < mean_flat - 60
    # p(g) ∝ (g+1)^(a-1): with a = 0.01 the first gap is much more likely than the last
    gaps = (torch.nonzero(steep)[:, 1] - 2 * P) // 2
    counts = torch.bincount(gaps, minlength=(T - 2 * P) // 2)
    assert counts[0] > 5 * counts[-20:].float().mean()


def mqar_spec(**mqar):
    base = {"vocab_size": 64, "seq_len": 64, "num_kv_pairs": 8, "num_train": 1200, "num_val": 100}
    base.update(mqar)
    return parse_spec({"model": {"backbone": {"kind": "toy-rnn"}}, "data": {"kind": "mqar", "mqar": base}})


def test_mqar_data_source_is_deterministic_and_split():
    ds = make_data(mqar_spec())
    assert isinstance(ds, MQARData) and ds.vocab_size == 64 and ds.train_tokens is None
    b = ds.train_batch(5, 16, 64)
    check_invariants(b.x, b.y, b.mask, 64, 8)
    assert b.n_targets == 16 * 8
    again = make_data(mqar_spec()).train_batch(5, 16, 64)
    assert torch.equal(again.x, b.x) and torch.equal(again.y, b.y)
    # example i does not depend on the batch size; epochs wrap around num_train
    assert torch.equal(ds.train_batch(10, 8, 64).x, b.x[:8])
    assert torch.equal(ds.train_batch(150, 8, 64).x, ds.train_batch(0, 8, 64).x)  # 150 * 8 = 1200
    halves = [ds.train_batch(5, 16, 64, rank=r, world_size=2) for r in range(2)]
    assert torch.equal(torch.cat([h.x for h in halves]), b.x)
    # validation: a different random stream, all num_val examples
    val = list(ds.val_batches(32, 64))
    assert sum(v.x.shape[0] for v in val) == 100
    train_first = ds.examples(TRAIN, np.arange(32))
    assert not torch.equal(val[0].x, train_first.x)
    assert torch.equal(ds.examples(VAL, np.arange(32)).x, val[0].x)
    assert len(list(ds.val_batches(32, 64, max_batches=2))) == 2
    # another seed, other examples
    assert not torch.equal(make_data(mqar_spec(), seed=7).train_batch(5, 16, 64).x, b.x)


def test_mqar_examples_across_chunks_keep_order():
    ds = MQARData(MQARSpec(vocab_size=64, seq_len=64, num_kv_pairs=8, num_train=2000, num_val=10), seed=0)
    idx = np.array([1500, 3, 700, 511, 512])
    batch = ds.examples(TRAIN, idx)
    for row, i in enumerate(idx.tolist()):
        assert torch.equal(batch.x[row], ds.examples(TRAIN, np.array([i])).x[0])


def test_mqar_errors():
    with pytest.raises(DataError, match=r"seq_len 16 is too short for 8 key-value pairs.*use seq_len >= 32"):
        make_data(mqar_spec(seq_len=16))
    with pytest.raises(DataError, match=r"vocab_size 16 gives 7 possible keys, fewer than num_kv_pairs 8"):
        make_data(mqar_spec(vocab_size=16))
    ds = make_data(mqar_spec())
    with pytest.raises(DataError, match=r"data.mqar.seq_len = 64 tokens but seq_len 128 was asked for; "
                                        r"set train.seq_len: 64"):
        ds.train_batch(0, 4, 128)
    with pytest.raises(DataError, match="set train.batching: random"):
        ds.train_batch(0, 4, 64, mode="stream")
