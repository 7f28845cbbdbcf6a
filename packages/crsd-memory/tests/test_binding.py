"""Binding: a small model with the Hebbian memory (delta rule, write gate, key convolution)
learns MQAR (64, 4) on the CPU; the same model without the memory stays near chance.

The model is one toy recurrent layer (8 state channels) with or without the memory after
it; both train the same number of steps on the same examples. Chance at a query position
is 1/32 (the values are the upper half of a 64-token vocabulary).
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import statelab
from statelab.data.mqar import mqar_examples

V, T, P = 64, 64, 4
MEMORY = {"kind": "hebbian", "after_layer": 0, "n_heads": 1, "d_head": 32, "rule": "delta", "write_gate": True,
          "key_conv": 2, "chunk_size": 32}


def _mqar_accuracy(registry, memories: list, steps: int = 400, seed: int = 0) -> float:
    torch.manual_seed(seed)
    spec = {"name": "bind", "tokenizer": {"kind": "byte"}, "tracking": {"enabled": False},
            "model": {"d_model": 32, "vocab_size": V, "memories": memories,
                      "backbone": {"kind": "toy-rnn", "n_layers": 1, "d_state": 8}}}
    model = statelab.build(spec, registry=registry)
    x, y, m = mqar_examples(np.random.default_rng(seed), 2000, vocab_size=V, seq_len=T, num_kv_pairs=P)
    xv, yv, mv = mqar_examples(np.random.default_rng(seed + 1), 256, vocab_size=V, seq_len=T, num_kv_pairs=P)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(steps):
        i = torch.randint(0, len(x), (32,))
        logits = model(x[i])[0]  # (B, T, V)
        loss = F.cross_entropy(logits[m[i]], y[i][m[i]])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        pred = model(xv)[0].argmax(-1)
    return (pred[mv] == yv[mv]).float().mean().item()


@pytest.mark.slow
def test_memory_binds_on_mqar_where_the_backbone_alone_does_not(registry):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matmuls: one thread is fastest, and the CI machine has two cores
    try:
        with_memory = _mqar_accuracy(registry, [MEMORY])
        without = _mqar_accuracy(registry, [])
    finally:
        torch.set_num_threads(threads)
    assert without < 0.15, without
    assert with_memory > 0.8, with_memory
