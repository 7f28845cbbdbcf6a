"""Run a suite: train and evaluate every cell, resumably, optionally several at once.

Layout of a suite's output directory (``<out>/<suite name>/``)::

    suite.json                  the suite as run (cells, size) and the mlflow parent run id
    cells/<cell id>/<cell id>/  the cell's training run (checkpoints, metrics.jsonl)
    cells/<cell id>/result.json written last and atomically: its presence means "finished"
    report.md, *.png            the report (statelab.bench.report)

Resume: a cell with a ``result.json`` is skipped; any other cell directory is what a killed
run left behind and is removed and trained again from step 0 (a cell is short; a partial
cell's training state would tie the result to how it was interrupted).

Processes: with ``parallel: 1`` cells run one after another in this process; otherwise, and
with ``isolate: true``, in spawned worker processes (``isolate``: a fresh one per cell).

Tracking: the suite is one mlflow run (the parent, created once and reused on resume); every
cell's training run becomes its child (tag ``mlflow.parentRunId``) and receives the task's
metrics as ``task/<name>`` at the cell's last step.

Early stopping (Zoology's MQAR protocol: stop once validation accuracy reaches 0.99): a task
whose params have ``early_stop`` is trained in segments of ``train.eval_interval`` steps
through :func:`statelab.train.train` (``stop_after`` then ``resume``), scored by the task
after each segment, and stopped at the first segment whose primary metric reaches it.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Callable

from statelab.bench.suite import Cell, Suite, expand, load_suite
from statelab.io import atomic_write_text

RESULT = "result.json"


def _log(msg: str) -> None:
    print(f"statelab bench: {msg}", file=sys.stderr, flush=True)


def cell_dir(out: Path, cell_id: str) -> Path:
    return out / "cells" / cell_id


def load_results(out: Path) -> list[dict[str, Any]]:
    """The ``result.json`` of every finished cell under a suite's output directory."""
    return [json.loads(p.read_text()) for p in sorted((out / "cells").glob(f"*/{RESULT}"))]


def _train_and_score(cell: Cell, cdir: Path, task, progress: bool) -> dict[str, Any]:
    import torch

    from statelab import train as train_mod
    from statelab.data import make_data
    from statelab.interfaces import TaskContext

    steps = int(cell.spec.get("train", {}).get("steps", 1000))
    early = getattr(task.params, "early_stop", None)
    segment = int(cell.spec.get("train", {}).get("eval_interval", 200)) if early else steps
    t0 = time.time()
    done, res, scored, stopped_early = 0, None, None, False
    while True:
        target = min(steps, done + segment)
        res = train_mod.train(cell.spec, out_dir=cdir, resume=done > 0, progress=progress,
                              stop_after=target if target < steps else None)
        done = res.step
        model = res.model
        if model is None:  # a trainer that does not hand back its model: load its last checkpoint
            import statelab

            model = statelab.load(res.checkpoint)
        data = make_data(model.spec)
        device = next(model.parameters()).device
        ctx = TaskContext(device=device, seed=cell.seed, out_dir=cdir / "task")
        ctx.out_dir.mkdir(parents=True, exist_ok=True)
        ctx.extra["train"] = res
        scored = task.evaluate(model, data, ctx)
        if early is not None and scored.metrics.get(task.primary, -float("inf")) >= early and done < steps:
            stopped_early = True
            break
        if done >= steps or res.status != "interrupted":
            break
    train_s = time.time() - t0
    assert res is not None and scored is not None
    return {
        "status": "early_stop" if stopped_early else res.status,
        "steps": done,
        "train_seconds": train_s,
        "n_params": int(model.num_parameters()),
        "mlflow_run_id": res.mlflow_run_id,
        "metrics": {k: float(v) for k, v in scored.metrics.items()},
        "samples": scored.samples,
        "tables": scored.tables,
        "train_metrics": {k: float(v) for k, v in res.metrics.items() if isinstance(v, (int, float))},
        "tokens_per_s": float(res.tokens_per_s),
        "peak_gpu_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "val_history": [{"step": v.get("step"), "elapsed_s": v.get("val/elapsed_s"), "val_loss": v.get("val/loss")}
                        for v in (res.history or {}).get("val", [])],
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
        f"cpu ({torch.get_num_threads()} threads)",
    }


def run_cell(cell_json: dict[str, Any], out: str, *, threads: int = 1, progress: bool = False,
             parent_run_id: str | None = None, uri: str | None = None) -> dict[str, Any]:
    """Train and score one cell; write its ``result.json``. Runs in a worker process too."""
    import torch

    from statelab.tasks import make_task

    torch.set_num_threads(threads)
    cell = Cell(**cell_json)
    cdir = cell_dir(Path(out), cell.id)
    if cdir.exists():  # left by a killed run: start the cell again
        shutil.rmtree(cdir)
    cdir.mkdir(parents=True)
    task = make_task(cell.task_kind, cell.task_params)
    result = {"cell": cell.to_json(), **_train_and_score(cell, cdir, task, progress)}
    if parent_run_id and result["mlflow_run_id"]:
        _log_child(result, parent_run_id, uri)
    atomic_write_text(cdir / RESULT, json.dumps(result, indent=1, default=str) + "\n")
    return result


def _log_child(result: dict[str, Any], parent_run_id: str, uri: str | None) -> None:
    from mlflow.entities import Metric, RunTag

    from statelab.tracking import client, mlflow_key

    c = client(uri)
    ts = int(time.time() * 1000)
    step = int(result["steps"])
    cell = result["cell"]
    metrics = [Metric(mlflow_key(f"task/{k}"), v, ts, step) for k, v in result["metrics"].items()]
    metrics.append(Metric("bench/n_params", float(result["n_params"]), ts, step))
    tags = [RunTag("mlflow.parentRunId", parent_run_id), RunTag("statelab.bench.cell", cell["id"]),
            RunTag("statelab.bench.spec", cell["spec_name"]), RunTag("statelab.bench.task", cell["task_name"]),
            RunTag("statelab.bench.grid", json.dumps(cell["grid"])), RunTag("statelab.bench.status", result["status"])]
    c.log_batch(result["mlflow_run_id"], metrics=metrics, tags=tags)


def _parent_run(suite: Suite, out: Path, previous: dict[str, Any]) -> str | None:
    if not suite.tracking.enabled:
        return None
    from statelab.tracking import client, experiment_id, resolve_uri

    uri = resolve_uri(suite.tracking.uri)
    c = client(uri)
    rid = previous.get("parent_run_id")
    if rid:
        try:
            c.get_run(rid)
            c.update_run(rid, status="RUNNING")
            return rid
        except Exception:  # noqa: BLE001 - another store: start a new parent
            pass
    exp = experiment_id(c, suite.tracking.experiment, uri)
    run = c.create_run(exp, run_name=suite.name, tags={"statelab.bench.suite": suite.name,
                                                        "statelab.bench.out": str(out.resolve())})
    return run.info.run_id


def run_suite(path: str | Path, *, out: str | Path = "bench", size: str | None = None, parallel: int | None = None,
              progress: bool = False, only: Callable[[Cell], bool] | None = None, report: bool = True
              ) -> dict[str, Any]:
    """Run (or resume) the suite at ``path``; returns ``{"out", "cells", "ran", "skipped", "report"}``."""
    suite, root = load_suite(path)
    cells = expand(suite, root, size)
    if only is not None:
        cells = [c for c in cells if only(c)]
    sized = suite.sized(size)[0]
    workers, threads, isolate = parallel or sized.parallel, sized.threads, sized.isolate
    out_dir = Path(out) / suite.name
    out_dir.mkdir(parents=True, exist_ok=True)
    meta_path = out_dir / "suite.json"
    previous = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    parent = _parent_run(suite, out_dir, previous)
    uri = suite.tracking.uri
    meta = {"suite": suite.model_dump(mode="json"), "size": size or next(iter(suite.sizes), None),
            "source": str(Path(path).resolve()), "parent_run_id": parent, "cells": [c.id for c in cells]}
    atomic_write_text(meta_path, json.dumps(meta, indent=1) + "\n")
    todo = [c for c in cells if not (cell_dir(out_dir, c.id) / RESULT).exists()]
    _log(f"{suite.name}: {len(cells)} cells, {len(cells) - len(todo)} finished, {len(todo)} to run")
    status = "FINISHED"
    try:
        if not isolate and (workers <= 1 or len(todo) <= 1):
            for i, c in enumerate(todo, 1):
                _log(f"[{i}/{len(todo)}] {c.id} ({c.grid_label})")
                try:
                    run_cell(c.to_json(), str(out_dir), threads=threads, progress=progress,
                             parent_run_id=parent, uri=uri)
                except Exception:
                    _log(f"cell {c.id} failed; fix the cause and run the suite again (finished cells are kept)")
                    raise
        else:
            import multiprocessing as mp

            if isolate and sys.version_info < (3, 11):
                from statelab.bench.suite import SuiteError

                raise SuiteError("isolate: true needs Python 3.11 or later (a fresh worker process per cell)")
            fresh = {"max_tasks_per_child": 1} if isolate else {}  # one process per cell
            pool = ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"), **fresh)
            try:
                futures = {pool.submit(run_cell, c.to_json(), str(out_dir), threads=threads,
                                       parent_run_id=parent, uri=uri): c for c in todo}
                for i, f in enumerate(as_completed(futures), 1):
                    try:
                        f.result()
                    except Exception:
                        _log(f"cell {futures[f].id} failed; fix the cause and run the suite again (finished cells are "
                             "kept)")
                        raise
                    _log(f"[{i}/{len(todo)}] {futures[f].id} done")
            finally:  # on a failure or ^C, cells not yet started are dropped; running ones finish
                pool.shutdown(wait=True, cancel_futures=True)
    except BaseException:
        status = "KILLED"
        raise
    finally:
        if parent is not None and status != "FINISHED":
            from statelab.tracking import client

            client(uri).set_terminated(parent, status=status)
    rep = None
    if report:
        from statelab.bench.report import write_report

        rep = write_report(out_dir)
    if parent is not None:
        from statelab.tracking import client

        client(uri).set_terminated(parent, status="FINISHED")
    return {"out": out_dir, "cells": cells, "ran": [c.id for c in todo], "skipped": len(cells) - len(todo),
            "report": rep}


__all__ = ["RESULT", "cell_dir", "load_results", "run_cell", "run_suite"]
