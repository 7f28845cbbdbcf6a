"""``statelab compare``: the runs of one mlflow experiment side by side.

For each run: name, a spec summary (backbone, memories, planner), parameter count, best
validation loss and bits per char/byte, training tokens/s, and probe verdicts; then the spec
fields whose values differ between the runs; plus an overlay plot of the validation-loss curves.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["RunRow", "collect", "differing_params", "format_table", "plot_curves"]


@dataclass
class RunRow:
    run_id: str
    name: str
    status: str
    summary: str
    parameters: int | None
    best_val_loss: float | None
    best_val_bpc: float | None
    tokens_per_s: float | None
    probes: dict[str, str] = field(default_factory=dict)
    curve: list[tuple[int, float]] = field(default_factory=list)
    params: dict[str, str] = field(default_factory=dict)


#: params that name or place a run rather than define it: never shown as a difference
_NOT_A_DIFFERENCE = ("name", "tracking.", "train.out_dir", "train.device", "data.cache_dir", "model.parameters")


def differing_params(rows: list[RunRow]) -> list[str]:
    """The spec fields (flattened params) whose values are not the same in every run, in
    order: what actually distinguishes the compared runs (``model.backbone.mixer`` for a
    Mamba-1 against a Mamba-2 run, which the one-line summary shows as "mamba" alike)."""
    keys = sorted({k for r in rows for k in r.params})
    return [k for k in keys if not k.startswith(_NOT_A_DIFFERENCE) and len({r.params.get(k) for r in rows}) > 1]


def _summary(params: dict[str, str], tags: dict[str, str]) -> str:
    parts = [params.get("model.backbone.kind") or tags.get("statelab.backbone", "?")]
    mems = []
    j = 0
    while f"model.memories.{j}.kind" in params:
        mems.append(f"{params[f'model.memories.{j}.kind']}@{params.get(f'model.memories.{j}.after_layer', '?')}")
        j += 1
    if mems:
        parts.append("+".join(mems))
    planner = params.get("model.planner.kind")
    if planner and planner != "null":
        parts.append(f"planner {planner}")
    return " ".join(parts)


def collect(experiment: str, uri: str | None = None, *, curves: bool = True) -> list[RunRow]:
    """Read the runs of ``experiment`` (newest first)."""
    from statelab.errors import UserError
    from statelab.tracking import _sqlite_path, client, resolve_uri

    db = _sqlite_path(resolve_uri(uri))
    if db is not None and not db.exists():  # reading must not create an empty store
        raise UserError(f"there is no mlflow store at {resolve_uri(uri)}; pass the one that holds the runs with --uri "
                        "(or MLFLOW_TRACKING_URI)")
    c = client(uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        names = [e.name for e in c.search_experiments()]
        raise UserError(f"no experiment {experiment!r} in {resolve_uri(uri)}; experiments there: "
                         f"{', '.join(names) or '(none)'}")
    rows = []
    for run in c.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=1000):
        params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
        probes = {}
        for k, v in tags.items():
            if k.startswith("probe.") and k.endswith(".verdict"):
                probes[k[len("probe."):-len(".verdict")]] = v
        for k, v in tags.items():
            if k.startswith("probe.") and k.endswith(".passed"):
                kind = k[len("probe."):-len(".passed")]
                word = "pass" if v == "true" else "FAIL"
                probes[kind] = f"{probes[kind]} {word}" if kind in probes else word
        n = params.get("model.parameters")
        curve: list[tuple[int, float]] = []
        if curves:
            curve = [(m.step, m.value) for m in c.get_metric_history(run.info.run_id, "val/loss")]
            curve.sort()
        tok = metrics.get("train/tok_per_s_mean", metrics.get("train/tok_per_s"))
        rows.append(
            RunRow(
                run_id=run.info.run_id,
                name=run.info.run_name or run.info.run_id[:8],
                status=run.info.status,
                summary=_summary(params, tags),
                parameters=int(n) if n and n.isdigit() else None,
                best_val_loss=metrics.get("best/val_loss"),
                best_val_bpc=metrics.get("best/val_bpc"),
                tokens_per_s=tok,
                probes=probes,
                curve=curve,
                params=dict(params),
            )
        )
    return rows


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def format_table(rows: list[RunRow]) -> str:
    head = ["run", "model", "params", "best val loss", "best bpc", "tok/s", "probes", "status"]
    body = [
        [
            r.name,
            r.summary,
            _fmt(r.parameters, ","),
            _fmt(r.best_val_loss, ".4f"),
            _fmt(r.best_val_bpc, ".4f"),
            _fmt(r.tokens_per_s, ",.0f"),
            ", ".join(f"{k}: {v}" for k, v in sorted(r.probes.items())) or "-",
            r.status.lower(),
        ]
        for r in rows
    ]
    table = _table(head, body)
    diff = differing_params(rows) if len(rows) > 1 else []
    if not diff:
        return table
    shown = diff[:_MAX_DIFF_COLUMNS]
    more = f" (+{len(diff) - len(shown)} more fields differ: {', '.join(diff[len(shown):])})" if diff[len(shown):] else ""
    return (table + f"\n\nfields that differ{more}:\n"
            + _table(["run", *shown], [[r.name, *(r.params.get(k, "-") for k in shown)] for r in rows]))


#: differing fields shown as columns; the rest are named below the table
_MAX_DIFF_COLUMNS = 8


def _table(head: list[str], body: list[list[str]]) -> str:
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *(line(b) for b in body)])


def plot_curves(rows: list[RunRow], path: str | os.PathLike, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in rows:
        if r.curve:
            ax.plot([s for s, _ in r.curve], [v for _, v in r.curve], "o-", ms=3, label=f"{r.name} ({r.summary})")
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/token)")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    if any(r.curve for r in rows):
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path
