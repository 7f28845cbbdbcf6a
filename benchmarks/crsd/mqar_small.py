"""A small MQAR run on the CPU: one toy recurrent layer (statelab.testing.toys; or any backbone)
with or without one memory after it, trained on a fixed set of examples, accuracy on held-out ones.

The loop of tests/test_binding.py, with the cell, model width and budget as arguments, for
probing a cell quickly before spending a bench suite on it::

    python benchmarks/crsd/mqar_small.py --memory '{"kind": "hebbian", "n_heads": 1, "d_head": 32,
        "rule": "delta", "write_gate": true, "key_conv": 2}' --seq-len 256 --kv 16 --vocab 256 --steps 800
    python benchmarks/crsd/mqar_small.py --memory none --seq-len 64 --kv 4      # the layer alone
    python benchmarks/crsd/mqar_small.py --memory none --backbone '{"kind": "crsd", "n_layers": 1, "spectral": false}'

Prints one JSON line per seed: accuracy, final training loss, state bytes, seconds.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F

import statelab
import statelab.testing.toys as toys
from statelab.data.mqar import mqar_examples
from statelab.plugins import Registry
from statelab.tasks import state_bytes


def registry() -> Registry:
    import crsd_memory.plugin as plugin

    reg = Registry(strict=True)
    reg.register_plugin(toys, distribution="statelab-toys", version="0")
    reg.register_plugin(plugin, distribution="crsd-memory", version="bench")
    return reg


def run(memory: dict | None, *, backbone: dict, seed: int, vocab: int, seq_len: int, kv: int, d_model: int, steps: int,
        batch_size: int, lr: float, num_train: int = 2000, num_val: int = 256) -> dict:
    torch.manual_seed(seed)
    memories = [{**memory, "after_layer": 0}] if memory else []
    spec = {"name": "mqar-small", "tokenizer": {"kind": "byte"}, "tracking": {"enabled": False},
            "model": {"d_model": d_model, "vocab_size": vocab, "memories": memories,
                      "backbone": backbone}}
    model = statelab.build(spec, registry=registry())
    x, y, m = mqar_examples(np.random.default_rng(seed), num_train, vocab_size=vocab, seq_len=seq_len,
                            num_kv_pairs=kv)
    xv, yv, mv = mqar_examples(np.random.default_rng(seed + 1), num_val, vocab_size=vocab, seq_len=seq_len,
                               num_kv_pairs=kv)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    t0 = time.time()
    for _ in range(steps):
        i = torch.randint(0, len(x), (batch_size,))
        logits = model(x[i])[0]  # (B, T, V)
        loss = F.cross_entropy(logits[m[i]], y[i][m[i]])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        acc = (model(xv)[0].argmax(-1)[mv] == yv[mv]).float().mean().item()
    return {"seed": seed, "accuracy": acc, "train_loss": loss.item(), "seconds": round(time.time() - t0, 1),
            "state_bytes": state_bytes(model, seq_len, torch.device("cpu"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--memory", default="none", help="memory spec as JSON (without after_layer), or none")
    ap.add_argument("--backbone", default='{"kind": "toy-rnn", "n_layers": 1, "d_state": 8}',
                    help="backbone spec as JSON (default: one toy recurrent layer)")
    ap.add_argument("--vocab", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--kv", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=32)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--seeds", default="0", help="comma-separated")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    memory = None if a.memory == "none" else json.loads(a.memory)
    for seed in (int(s) for s in a.seeds.split(",")):
        row = run(memory, backbone=json.loads(a.backbone), seed=seed, vocab=a.vocab, seq_len=a.seq_len, kv=a.kv, d_model=a.d_model, steps=a.steps,
                  batch_size=a.batch_size, lr=a.lr)
        print(json.dumps({"memory": memory, "cell": [a.seq_len, a.kv], **row}), flush=True)


if __name__ == "__main__":
    main()
