"""What a training checkpoint holds besides the weights, as JSON plus tensors (no pickle).

``trainer.json``: step, the spec, best validation loss and step, the mlflow run id, world
size, optimizer hyper-parameters and non-tensor state, the grad scaler, python and numpy
RNG states, the metric history, elapsed time and throughput sums (so ``train/elapsed_s``
and ``train/tok_per_s_mean`` continue across ``--resume``), and the JSON part of every
trainer-level callback's state under ``callbacks``.
``trainer.safetensors``: ``optim.<param id>.<name>`` moments, ``rng.torch.<rank>`` and
``rng.cuda.<rank>`` RNG states, ``stream.<name>`` carried state (all ranks' rows), and
``callbacks.<name>::<key>`` callback tensors.
"""

from __future__ import annotations

import random
from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor

from statelab.spec import flatten


def optimizer_state(opt: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Tensor]]:
    sd = opt.state_dict()
    tensors: dict[str, Tensor] = {}
    extra: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, Tensor):
                tensors[f"optim.{pid}.{k}"] = v.detach().to("cpu").contiguous().clone()
            else:
                extra.setdefault(str(pid), {})[k] = v
    return {"param_groups": sd["param_groups"], "extra": extra}, tensors


def load_optimizer_state(opt: torch.optim.Optimizer, js: Mapping[str, Any], tensors: Mapping[str, Tensor]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        if not key.startswith("optim."):
            continue
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = v
    for pid, d in js.get("extra", {}).items():
        state.setdefault(int(pid), {}).update(d)
    opt.load_state_dict({"state": state, "param_groups": js["param_groups"]})


def rng_json() -> dict[str, Any]:
    py = random.getstate()
    npst = np.random.get_state()
    return {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [npst[0], npst[1].tolist(), int(npst[2]), int(npst[3]), float(npst[4])],
    }


def set_rng_json(d: Mapping[str, Any]) -> None:
    py = d["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = d["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))


def spec_diff(old: Mapping[str, Any], new: Mapping[str, Any], sections: tuple[str, ...]) -> list[str]:
    """``  key: old -> new`` lines for the flattened fields of ``sections`` that differ."""
    lines = []
    for sec in sections:
        a = flatten(old.get(sec), sec) if old.get(sec) is not None else {sec: "null"}
        b = flatten(new.get(sec), sec) if new.get(sec) is not None else {sec: "null"}
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                lines.append(f"  {k}: {a.get(k, '(absent)')} -> {b.get(k, '(absent)')}")
    return lines


def prefixed(tensors: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The entries of ``tensors`` whose key starts with ``prefix``, with the prefix removed."""
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
