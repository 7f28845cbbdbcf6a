"""Data-parallel training: 2 CPU processes with gloo against one process with the same global batch."""

from __future__ import annotations

import os
import socket
import time

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


def _failing_worker(rank: int, world: int, port: int, out: str, cache: str, results) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), STATELAB_CACHE_DIR=cache)
    torch.set_num_threads(1)
    import statelab.run_callbacks as rc
    import statelab.train as tr

    if rank == 0:  # rank 0 fails in its post-training work, after every rank finished its steps
        def fail(*args, **kwargs):
            raise RuntimeError("artifacts failed")

        rc.finish_artifacts = fail
    try:
        tr.train(_spec("stream"), registry=toy_registry(), out_dir=out, progress=False)
        results.put((rank, "returned"))
    except Exception as e:  # noqa: BLE001 - the test reads what each rank saw
        results.put((rank, f"{type(e).__name__}: {e}"))


def test_a_failure_on_rank_0_after_training_does_not_leave_rank_1_waiting(tmp_path, tmp_path_factory):
    """The ranks meet at a barrier before the process group goes away; a rank 0 that raises
    before reaching it must make rank 1 fail too, not wait for it."""
    cache = str(tmp_path_factory.getbasetemp() / "statelab-cache")
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    procs = mp.start_processes(_failing_worker, args=(2, _free_port(), str(tmp_path), cache, results), nprocs=2,
                               join=False, start_method="spawn")
    deadline = time.monotonic() + 120
    while not all(not p.is_alive() for p in procs.processes) and time.monotonic() < deadline:
        time.sleep(0.2)
    hung = [p.pid for p in procs.processes if p.is_alive()]
    for p in procs.processes:
        if p.is_alive():
            p.kill()
    assert not hung, "a rank was still waiting 120 s after rank 0 failed"
    seen = {}
    while not results.empty():  # a rank that died without reporting is simply absent
        rank, outcome = results.get()
        seen[rank] = outcome
    assert seen.get(0) == "RuntimeError: artifacts failed", seen
    assert seen.get(1, "died") != "returned", "rank 1 reported success although the run failed on rank 0"
