"""Benchmark suites: what to train and evaluate, as a YAML file, and its expansion into cells.

A suite::

    name: smoke
    seeds: [0, 1, 2]
    baseline: transformer                 # a key of specs: every other spec is compared with it
    specs:                                # name -> a spec (inline, or a path relative to the suite file)
      transformer: {spec: ../quickstart.yaml, set: {model.backbone.kind: transformer}}
      mamba: {spec: {...inline spec...}}
    tasks:                                # a task kind, or {kind, name, params, set}
      - copy
      - {name: mqar-64x4, kind: mqar, params: {seq_len: 64, num_kv_pairs: 4}, set: {train.steps: 2000}}
    grid:                                 # cartesian product over any spec fields (dotted)
      train.lr: [1e-3, 3e-3]
    set: {train.steps: 200}               # applied to every cell
    sizes:                                # `--size NAME` picks one (default: the first)
      cpu: {set: {train.steps: 200, train.device: cpu}}
      gpu: {set: {train.steps: 20000}, seeds: [0, 1, 2], grid: {train.lr: [1e-4, 3e-4, 1e-3, 3e-3]}}
    parallel: 1                           # cells trained at once (processes)
    tracking: {uri: null, experiment: bench}

A size replaces the suite's ``tasks``, ``seeds``, ``grid``, ``parallel`` and ``threads`` where
it gives them, and its ``set`` applies after the suite's and the task's.

A **cell** is one (spec, task, grid point, seed). Its spec is built in this order, each
step overriding the previous: the named spec, the spec's ``set``, the suite's ``set``, the
task's :meth:`~statelab.interfaces.Task.spec_overrides`, the task's ``set``, the size, the
grid point, then ``seed``, ``name`` (the cell id) and the suite's tracking.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from statelab.errors import UserError


class SuiteError(UserError, ValueError):
    """A suite file that cannot be run as written; the message says what to change."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SpecEntry(_Strict):
    spec: str | dict[str, Any] = Field(description="a run spec: a path (relative to the suite file) or inline")
    set: dict[str, Any] = Field(default_factory=dict, description="dotted spec fields to override")


class TaskEntry(_Strict):
    kind: str = Field(description="registered task kind (see `statelab plugins`)")
    name: str | None = Field(None, description="label in reports; null = the kind")
    params: dict[str, Any] = Field(default_factory=dict, description="the task's params")
    set: dict[str, Any] = Field(default_factory=dict, description="dotted spec fields for this task's cells")


class TrackingEntry(_Strict):
    enabled: bool = Field(True, description="log every cell as an mlflow child run of one suite run")
    uri: str | None = Field(None, description="tracking URI; null = MLFLOW_TRACKING_URI or sqlite:///mlflow.db")
    experiment: str = Field("statelab-bench", description="mlflow experiment")


class Size(_Strict):
    set: dict[str, Any] = Field(default_factory=dict, description="dotted spec fields for every cell of this size")
    tasks: list[TaskEntry] | None = Field(None, description="replaces the suite's tasks")
    seeds: list[int] | None = Field(None, description="replaces the suite's seeds")
    grid: dict[str, list[Any]] | None = Field(None, description="replaces the suite's grid")
    parallel: int | None = Field(None, ge=1, description="replaces the suite's parallel")
    threads: int | None = Field(None, ge=1, description="replaces the suite's threads")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, doc: Any) -> Any:
        if isinstance(doc, dict) and doc.get("tasks") is not None:
            doc = {**doc, "tasks": [{"kind": t} if isinstance(t, str) else t for t in doc["tasks"]]}
        return doc


class Suite(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="suite name (a directory name)")
    description: str = Field("", description="what the suite compares, for the report")
    specs: dict[str, SpecEntry] = Field(description="name -> spec; names label the report's rows")
    baseline: str | None = Field(None, description="the spec every other spec is compared with (paired by seed)")
    tasks: list[TaskEntry] = Field(description="tasks: each cell trains on one task's data and is scored by it")
    seeds: list[int] = Field(default_factory=lambda: [0], description="seeds; intervals are over seeds")
    grid: dict[str, list[Any]] = Field(default_factory=dict, description="dotted spec field -> values (cartesian)")
    select: str = Field("best", pattern="^(best|each)$",
                        description="best: per (spec, task) report the grid point with the best mean primary metric "
                        "over seeds (Zoology); each: report every grid point")
    set: dict[str, Any] = Field(default_factory=dict, description="dotted spec fields for every cell")
    sizes: dict[str, Size] = Field(default_factory=dict, description="size name -> what it changes (see above)")
    parallel: int = Field(1, ge=1, description="cells trained at once, one process each")
    threads: int = Field(1, ge=1, description="torch CPU threads per cell process")
    isolate: bool = Field(False, description="train every cell in a fresh process, so that train.time_budget_s "
                          "(counted from process start) covers that cell alone, imports included")
    tracking: TrackingEntry = Field(default_factory=TrackingEntry, description="mlflow")

    @model_validator(mode="before")
    @classmethod
    def _shorthands(cls, doc: Any) -> Any:
        if isinstance(doc, dict):
            doc = dict(doc)
            doc["tasks"] = [{"kind": t} if isinstance(t, str) else t for t in doc.get("tasks", [])]
            doc["specs"] = {k: ({"spec": v} if isinstance(v, str) or (isinstance(v, dict) and "spec" not in v) else v)
                            for k, v in (doc.get("specs") or {}).items()}
        return doc

    def sized(self, size: str | None) -> tuple["Suite", dict[str, Any]]:
        """The suite as run at ``size`` (default: the first size, if any) and that size's ``set``."""
        if size is not None and size not in self.sizes:
            raise SuiteError(f"unknown size {size!r}; this suite has {', '.join(self.sizes) or 'no sizes'}")
        size = size if size is not None else next(iter(self.sizes), None)
        if size is None:
            return self, {}
        sz = self.sizes[size].model_dump()
        changes = {k: sz[k] for k in ("tasks", "seeds", "grid", "parallel", "threads") if sz[k] is not None}
        return Suite.model_validate({**self.model_dump(), **changes}), sz["set"]

    @model_validator(mode="after")
    def _check(self) -> "Suite":
        if self.baseline is not None and self.baseline not in self.specs:
            raise ValueError(f"baseline {self.baseline!r} is not one of the specs ({', '.join(self.specs)})")
        labels = [t.name or t.kind for t in self.tasks]
        dup = sorted({x for x in labels if labels.count(x) > 1})
        if dup:
            raise ValueError(f"task label(s) {dup} used twice: give each such task a distinct `name`")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError("seeds must be distinct")
        for k, v in self.grid.items():
            if not v:
                raise ValueError(f"grid.{k} has no values")
        return self


@dataclass
class Cell:
    """One (spec, task, grid point, seed) of a suite, with its complete run spec."""

    id: str
    spec_name: str
    task_name: str
    task_kind: str
    task_params: dict[str, Any]
    grid: dict[str, Any]
    seed: int
    spec: dict[str, Any] = field(repr=False)

    @property
    def grid_label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.grid.items()) or "-"

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "spec_name": self.spec_name, "task_name": self.task_name, "task_kind": self.task_kind,
                "task_params": self.task_params, "grid": self.grid, "seed": self.seed, "spec": self.spec}


def set_dotted(doc: dict[str, Any], key: str, value: Any) -> None:
    """``set_dotted(d, "train.lr", 1e-3)``; dicts on the way are created, a number indexes a list."""
    parts = key.split(".")
    node: Any = doc
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            node = node[int(part)]
            continue
        nxt = node.get(part)
        if not isinstance(nxt, (dict, list)):
            nxt = {}
            node[part] = nxt
        node = nxt
    last = parts[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value  # a whole value replaces the field (a dict is not merged into the old one)


def load_suite(path: str | Path) -> tuple[Suite, Path]:
    """Parse and validate a suite file; returns it and the directory its relative paths start from."""
    p = Path(path)
    if not p.is_file():
        raise SuiteError(f"suite file {str(p)!r} not found")
    try:
        doc = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise SuiteError(f"{p}: not valid YAML ({exc})") from None
    try:
        return Suite.model_validate(doc or {}), p.parent
    except ValidationError as err:
        lines = [f"  - {'.'.join(map(str, e['loc'])) or '(suite)'}: {e['msg']}" for e in err.errors()]
        raise SuiteError(f"invalid suite {p}:\n" + "\n".join(lines)) from None


def _base_spec(entry: SpecEntry, root: Path) -> dict[str, Any]:
    if isinstance(entry.spec, dict):
        return json.loads(json.dumps(entry.spec))
    path = (root / entry.spec) if not Path(entry.spec).is_absolute() else Path(entry.spec)
    if not path.is_file():
        raise SuiteError(f"spec file {str(path)!r} not found (paths are relative to the suite file)")
    return yaml.safe_load(path.read_text(encoding="utf-8")) or {}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")


def expand(suite: Suite, root: Path, size: str | None = None, registry: Any = None) -> list[Cell]:
    """Every cell of the suite, in a stable order (spec, task, grid point, seed)."""
    from statelab.tasks import make_task

    suite, size_set = suite.sized(size)
    keys = list(suite.grid)
    points = [dict(zip(keys, combo)) for combo in itertools.product(*(suite.grid[k] for k in keys))] or [{}]
    cells = []
    for spec_name, entry in suite.specs.items():
        base = _base_spec(entry, root)
        for t in suite.tasks:
            task = make_task(t.kind, t.params, registry=registry)
            task_name = t.name or t.kind
            for point in points:
                for seed in suite.seeds:
                    doc = json.loads(json.dumps(base))
                    for layer in (entry.set, suite.set, task.spec_overrides(), t.set, size_set, point):
                        for k, v in layer.items():
                            set_dotted(doc, k, v)
                    gtag = hashlib.sha1(json.dumps(point, sort_keys=True).encode()).hexdigest()[:8] if point else "g0"
                    cid = _slug(f"{spec_name}--{task_name}--{gtag}--s{seed}")
                    doc["seed"] = seed
                    doc["name"] = cid
                    doc["tracking"] = {"enabled": suite.tracking.enabled, "uri": suite.tracking.uri,
                                       "experiment": suite.tracking.experiment, "run_name": cid}
                    cells.append(Cell(cid, spec_name, task_name, t.kind, task.params.model_dump(mode="json"),
                                      point, seed, doc))
    return cells


__all__ = ["Cell", "Suite", "SuiteError", "expand", "load_suite", "set_dotted"]
