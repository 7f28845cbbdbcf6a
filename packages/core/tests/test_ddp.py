"""Data-parallel training: 2 CPU processes with gloo against one process with the same global batch."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from statelab.testing.toys import toy_registry, toy_spec


def _spec(batching: str) -> dict:
    spec = toy_spec()
    spec["train"].update(steps=6, batch_size=8, batching=batching, eval_interval=3, checkpoint_interval=3,
                         log_interval=2, sample_tokens=4)
    return spec


def _worker(rank: int, world: int, port: int, out: str, cache: str, batching: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), STATELAB_CACHE_DIR=cache)
    torch.set_num_threads(1)
    from statelab.train import train

    res = train(_spec(batching), registry=toy_registry(), out_dir=out, progress=False)
    params = {k: v.detach().clone().contiguous() for k, v in res.model.named_parameters()}
    save_file(params, os.path.join(out, f"rank{rank}.safetensors"), metadata={"step": str(res.step)})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("batching", ["stream"])  # stream also checks the carried state's gather and split
def test_two_gloo_ranks_match_one_process_with_the_same_global_batch(tmp_path, tmp_path_factory, monkeypatch,
                                                                     batching):
    cache = str(tmp_path_factory.getbasetemp() / "statelab-cache")
    monkeypatch.setenv("STATELAB_CACHE_DIR", cache)
    from statelab.data import make_data
    from statelab.spec import parse_spec

    make_data(parse_spec(_spec(batching)))  # fill the token cache once, before the ranks start
    out = tmp_path / "ddp"
    out.mkdir()
    mp.spawn(_worker, args=(2, _free_port(), str(out), cache, batching), nprocs=2, join=True)
    r0, r1 = load_file(str(out / "rank0.safetensors")), load_file(str(out / "rank1.safetensors"))
    assert r0.keys() == r1.keys()
    for k in r0:
        assert torch.equal(r0[k], r1[k]), f"{k} differs between ranks"

    from statelab.train import train

    single = train(_spec(batching), registry=toy_registry(), out_dir=tmp_path / "single", progress=False)
    ref = dict(single.model.named_parameters())
    for k in r0:
        torch.testing.assert_close(r0[k], ref[k].detach(), atol=1e-5, rtol=0, msg=k)
    # and the parameters really moved (the comparison is not between two untrained models)
    import statelab

    init = dict(statelab.build(toy_spec(), vocab_size=256, registry=toy_registry()).named_parameters())
    moved = max((r0[k] - init[k].detach()).abs().max().item() for k in r0)
    assert moved > 1e-3
    # rank 0 alone wrote the run: checkpoints, best/, metrics
    rd = out / "toy"
    assert sorted(p.name for p in (rd / "checkpoints").iterdir()) == ["step-0000003", "step-0000006"]
    assert (rd / "best" / "model.safetensors").exists()
    assert len((rd / "metrics.jsonl").read_text().splitlines()) == 6
