"""A suite's report: a markdown table per task, plots, and a JSON summary.

Per task and spec, the grid point is chosen as Zoology does (``select: best``: the best mean
of the task's primary metric over seeds, :func:`statelab.stats.best_over_grid`), or every
grid point is reported (``select: each``). Each row gives every metric's mean and 95% t
interval over seeds, and the **paired** difference of the primary metric against the
suite's baseline spec (same seeds, each spec at its own chosen grid point) with its verdict:
better, worse or no detectable difference. Plots: the primary metric per spec with interval
error bars; the metric against each numeric grid field; accuracy against state bytes where a
task reports ``state_bytes``; a length x depth heatmap for tables of passkey rows.
"""

from __future__ import annotations

import json
import sys
import math
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from statelab import stats
from statelab.bench.runner import load_results
from statelab.io import atomic_write_text


def _task_info(result: dict[str, Any]) -> tuple[str, dict[str, bool]]:
    """The task's primary metric and each declared metric's direction."""
    from statelab.tasks import make_task

    cell = result["cell"]
    task = make_task(cell["task_kind"], cell["task_params"])
    return task.primary, {m.name: m.higher_is_better for m in task.metrics}


def _grid_key(grid: dict[str, Any]) -> str:
    return json.dumps(grid, sort_keys=True)


def summarize(out: Path) -> dict[str, Any]:
    """Aggregate a suite's finished cells (see the module doc) into a JSON-able summary."""
    meta = json.loads((out / "suite.json").read_text())
    suite = meta["suite"]
    baseline = suite.get("baseline")
    results = load_results(out)
    by_task: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in results:
        by_task[r["cell"]["task_name"]].append(r)
    summary: dict[str, Any] = {"suite": suite["name"], "description": suite.get("description", ""),
                               "size": meta.get("size"), "baseline": baseline, "tasks": {},
                               "cells_finished": len(results), "cells_total": len(meta.get("cells", []))}
    for task_name, rows in by_task.items():
        primary, directions = _task_info(rows[0])
        hib = directions.get(primary, True)
        # per (spec, grid point): seed -> result
        groups: dict[tuple[str, str], dict[int, dict[str, Any]]] = defaultdict(dict)
        for r in rows:
            groups[(r["cell"]["spec_name"], _grid_key(r["cell"]["grid"]))][r["cell"]["seed"]] = r
        flat = [{"spec": s, "grid": g, primary: r["metrics"][primary]}
                for (s, g), seeds in groups.items() for r in seeds.values() if primary in r["metrics"]]
        chosen: dict[str, list[str]] = defaultdict(list)
        per_value: dict[str, dict[str, Any]] = {}
        if suite.get("select", "best") == "best":
            best = stats.best_over_grid(flat, metric=primary, grid="grid", group="spec", higher_is_better=hib)
            for s, gb in best.items():
                chosen[s].append(gb.best)
                per_value[s] = {g: iv.to_dict() for g, iv in gb.per_value.items()}
        else:
            for s, g in groups:
                chosen[s].append(g)
        entries = []
        for s in chosen:
            for g in chosen[s]:
                seeds = groups[(s, g)]
                metric_names = sorted({k for r in seeds.values() for k in r["metrics"]})
                ivs = {}
                for m in metric_names:
                    vals = [r["metrics"][m] for r in seeds.values() if m in r["metrics"]
                            and math.isfinite(r["metrics"][m])]
                    if vals:
                        ivs[m] = stats.interval(vals).to_dict()
                first = next(iter(seeds.values()))
                entry = {"spec": s, "grid": json.loads(g), "seeds": sorted(seeds), "metrics": ivs,
                         "n_params": first["n_params"], "device": first.get("device", ""),
                         "train_seconds": stats.interval([r["train_seconds"] for r in seeds.values()]).to_dict(),
                         "steps": [r["steps"] for r in seeds.values()],
                         "status": sorted({r["status"] for r in seeds.values()}),
                         "per_seed": {str(k): r["metrics"][primary] for k, r in seeds.items() if primary in r["metrics"]},
                         "grid_values": per_value.get(s, {})}
                tables = [r["tables"] for r in seeds.values() if r.get("tables")]
                if tables:
                    entry["tables"] = _mean_tables(tables)
                entries.append(entry)
        order = list(suite["specs"])  # rows in the suite's order
        entries.sort(key=lambda e: order.index(e["spec"]) if e["spec"] in order else len(order))
        if baseline is not None:
            base = [e for e in entries if e["spec"] == baseline]
            for e in entries:
                if e["spec"] == baseline or not base:
                    continue
                b = next((x for x in base if x["grid"] == e["grid"]), base[0]) if suite.get("select") == "each" else base[0]
                shared = set(e["per_seed"]) & set(b["per_seed"])
                if shared:
                    d = stats.paired_difference({k: e["per_seed"][k] for k in shared},
                                                {k: b["per_seed"][k] for k in shared}, higher_is_better=hib)
                    e["vs_baseline"] = d.to_dict()
        summary["tasks"][task_name] = {"primary": primary, "higher_is_better": hib, "directions": directions,
                                       "kind": rows[0]["cell"]["task_kind"], "entries": entries}
    return summary


#: table columns that identify a row (the rest are averaged over seeds)
_KEY_COLUMNS = ("length_tokens", "depth", "keys", "filler")


def _mean_tables(tables: list[dict[str, list[dict[str, Any]]]]) -> dict[str, list[dict[str, Any]]]:
    """Average same-keyed rows over seeds: rows match on their key columns (``length_tokens``,
    ``depth``...) and on string values; every other numeric column is averaged."""
    out: dict[str, list[dict[str, Any]]] = {}
    for name in tables[0]:
        acc: dict[str, list[dict[str, Any]]] = {}
        for t in tables:
            for row in t.get(name, []):
                ident = {k: v for k, v in row.items() if k in _KEY_COLUMNS or isinstance(v, str)}
                acc.setdefault(json.dumps(ident, sort_keys=True), []).append(row)
        merged = []
        for key, group in acc.items():
            row = dict(json.loads(key))
            for col in group[0]:
                if col not in row:
                    vals = [float(g[col]) for g in group if isinstance(g.get(col), (int, float))]
                    row[col] = sum(vals) / len(vals) if vals else None
            row["seeds"] = len(group)
            merged.append(row)
        out[name] = merged
    return out


def _fmt_iv(d: dict[str, Any] | None, digits: int = 3) -> str:
    if not d:
        return "-"
    iv = stats.Interval(d["mean"], d["low"], d["high"], d["n"], d["sd"], d.get("level", 0.95), d.get("method", "t"))
    return iv.format(digits)


def _fmt_diff(d: dict[str, Any] | None) -> str:
    if not d:
        return "-"
    iv = d["diff"]
    # a difference too small for 3 decimals is shown in full, so a tiny but consistent one is not "+0.000 better"
    f = "+.3f" if max(abs(iv["mean"]), abs(iv["low"]) if iv["low"] == iv["low"] else 0) >= 5e-4 or iv["mean"] == 0 \
        else "+.2e"
    if iv["n"] < 2 or iv["low"] != iv["low"]:
        return f"{iv['mean']:{f}} (n={iv['n']}) {d['verdict']}"
    return f"{iv['mean']:{f}} [{iv['low']:{f}}, {iv['high']:{f}}] {d['verdict']}"


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def markdown(summary: dict[str, Any], plots: dict[str, list[str]] | None = None) -> str:
    lines = [f"# Suite `{summary['suite']}`", ""]
    if summary.get("description"):
        lines += [summary["description"].strip(), ""]
    lines += [f"size: {summary.get('size') or '-'}; cells finished: {summary['cells_finished']}/"
              f"{summary['cells_total']}; baseline: {summary.get('baseline') or '-'}; "
              f"written {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC", "",
              "Means over seeds with 95% t intervals `[low, high]`; `vs baseline` is the paired difference "
              "(same seeds) of the primary metric with its verdict.", ""]
    for task_name, t in summary["tasks"].items():
        primary = t["primary"]
        arrow = "higher is better" if t["higher_is_better"] else "lower is better"
        others = sorted({m for e in t["entries"] for m in e["metrics"]} - {primary, "state_bytes"})
        has_state = any("state_bytes" in e["metrics"] for e in t["entries"])
        lines += [f"## {task_name} ({t['kind']}; primary metric `{primary}`, {arrow})", ""]
        head = ["spec", "grid", "seeds", primary, "vs baseline", *others]
        if has_state:
            head.append("state bytes")
        head += ["params", "train s", "device"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for e in t["entries"]:
            grid = ", ".join(f"{k}={v}" for k, v in e["grid"].items()) or "-"
            row = [e["spec"] + (" (baseline)" if e["spec"] == summary.get("baseline") else ""), grid,
                   str(len(e["seeds"])), _fmt_iv(e["metrics"].get(primary)), _fmt_diff(e.get("vs_baseline")),
                   *[_fmt_iv(e["metrics"].get(m)) for m in others]]
            if has_state:
                sb = e["metrics"].get("state_bytes")
                row.append(_bytes(sb["mean"]) if sb else "-")
            row += [f"{e['n_params']:,}", f"{e['train_seconds']['mean']:.1f}", e.get("device", "")]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
        if any(len(e.get("grid_values", {})) > 1 for e in t["entries"]):
            lines += ["Every grid point (mean over seeds of the primary metric):", ""]
            for e in t["entries"]:
                vals = "; ".join(f"{', '.join(f'{k}={v}' for k, v in json.loads(g).items())}: {_fmt_iv(iv)}"
                                 for g, iv in e["grid_values"].items())
                lines.append(f"- {e['spec']}: {vals}")
            lines.append("")
        for p in (plots or {}).get(task_name, []):
            lines += [f"![{Path(p).stem}]({Path(p).name})", ""]
    return "\n".join(lines).rstrip() + "\n"


def _yerr(mean: float, low: float, high: float) -> tuple[float, float]:
    """Error-bar lengths below and above ``mean``; a missing (NaN) bound draws no bar."""
    return (0.0 if math.isnan(low) else mean - low, 0.0 if math.isnan(high) else high - mean)


def _save(fig: Any, ax: Any, title: str, path: Path) -> str:
    import matplotlib.pyplot as plt

    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def _plots(summary: dict[str, Any], results: list[dict[str, Any]], out: Path) -> dict[str, list[str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made: dict[str, list[str]] = defaultdict(list)
    for task_name, t in summary["tasks"].items():
        primary, entries = t["primary"], t["entries"]
        slug = task_name.replace("/", "_")
        # 1. primary metric per spec with interval error bars
        fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(entries)), 3.2))
        labels = [e["spec"] if len(entries) == len({x["spec"] for x in entries}) else
                  f"{e['spec']}\n{', '.join(f'{v}' for v in e['grid'].values())}" for e in entries]
        nan = {"mean": float("nan"), "low": float("nan"), "high": float("nan")}
        ivs = [e["metrics"].get(primary, nan) for e in entries]
        errs = list(zip(*(_yerr(iv["mean"], iv["low"], iv["high"]) for iv in ivs)))
        ax.bar(range(len(entries)), [iv["mean"] for iv in ivs], yerr=errs, capsize=4, color="#4C72B0")
        ax.set_xticks(range(len(entries)), labels, fontsize=8)
        ax.set_ylabel(primary)
        made[task_name].append(_save(fig, ax, f"{task_name}: {primary} (95% interval over seeds)",
                                     out / f"{slug}-{primary}.png"))
        # 2. primary metric against each numeric grid field, per spec
        rows = [r for r in results if r["cell"]["task_name"] == task_name]
        grid_keys = sorted({k for r in rows for k in r["cell"]["grid"]})
        for gk in grid_keys:
            values = [r["cell"]["grid"].get(gk) for r in rows]
            if not all(isinstance(v, (int, float)) for v in values) or len(set(values)) < 2:
                continue
            fig, ax = plt.subplots(figsize=(4.5, 3.2))
            for spec in sorted({r["cell"]["spec_name"] for r in rows}):
                pts: dict[float, list[float]] = defaultdict(list)
                for r in rows:
                    if r["cell"]["spec_name"] == spec and primary in r["metrics"]:
                        pts[float(r["cell"]["grid"][gk])].append(r["metrics"][primary])
                xs = sorted(pts)
                ivs = [stats.interval(pts[x]) for x in xs]
                errs = list(zip(*(_yerr(iv.mean, iv.low, iv.high) for iv in ivs)))
                ax.errorbar(xs, [iv.mean for iv in ivs], yerr=errs, marker="o", capsize=3, label=spec)
            if all(x > 0 for r in rows for x in [float(r["cell"]["grid"][gk])]):
                vals = [float(r["cell"]["grid"][gk]) for r in rows]
                if max(vals) / min(vals) >= 10:
                    ax.set_xscale("log")
            ax.set_xlabel(gk)
            ax.set_ylabel(primary)
            ax.legend(fontsize=7)
            made[task_name].append(_save(fig, ax, f"{task_name}: {primary} vs {gk}",
                                         out / f"{slug}-{primary}-vs-{gk}.png"))
        # 3. accuracy against state size
        if any("state_bytes" in e["metrics"] for e in entries):
            fig, ax = plt.subplots(figsize=(4.5, 3.2))
            for e in entries:
                if "state_bytes" not in e["metrics"] or primary not in e["metrics"]:
                    continue
                iv = e["metrics"][primary]
                below, above = _yerr(iv["mean"], iv["low"], iv["high"])
                ax.errorbar([e["metrics"]["state_bytes"]["mean"]], [iv["mean"]], yerr=[[below], [above]], marker="o",
                            capsize=3, label=e["spec"])
            ax.set_xscale("log")
            ax.set_xlabel("state bytes per sequence")
            ax.set_ylabel(primary)
            ax.legend(fontsize=7)
            made[task_name].append(_save(fig, ax, f"{task_name}: {primary} against state size",
                                         out / f"{slug}-{primary}-vs-state.png"))
        # 4. passkey heatmaps (length x depth)
        for e in entries:
            for tname, trows in (e.get("tables") or {}).items():
                if not trows or not {"length_tokens", "depth", "accuracy"} <= set(trows[0]):
                    continue
                lengths = sorted({r["length_tokens"] for r in trows})
                depths = sorted({r["depth"] for r in trows})
                grid = [[next((r["accuracy"] for r in trows if r["length_tokens"] == L and r["depth"] == d),
                              float("nan")) for L in lengths] for d in depths]
                chars = {r["length_tokens"]: r.get("length_chars") for r in trows}
                fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(lengths), 0.8 + 0.45 * len(depths)))
                im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="lower")
                for i in range(len(depths)):
                    for j in range(len(lengths)):
                        v = grid[i][j]
                        ax.text(j, i, "-" if v != v else f"{v:.2f}", ha="center", va="center", fontsize=7,
                                color="white" if v == v and v < 0.5 else "black")
                ax.set_xticks(range(len(lengths)), [f"{L}\n({chars[L]} ch)" if chars.get(L) else str(L)
                                                    for L in lengths], fontsize=7)
                ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=7)
                ax.set_xlabel("length in tokens (characters)")
                ax.set_ylabel("depth")
                fig.colorbar(im, ax=ax)
                made[task_name].append(_save(fig, ax, f"{task_name} {tname}: {e['spec']}",
                                             out / f"{slug}-{tname}-{e['spec']}.png"))
    return made


def suite_tables(out: str | Path) -> str:
    """The report's tables of a suite output directory, from its finished cells (``statelab compare --suite``)."""
    from statelab.bench.suite import SuiteError

    out = Path(out)
    if not (out / "suite.json").exists():
        raise SuiteError(f"{str(out)!r} is not a suite output directory (no suite.json); give <out>/<suite name> "
                         "of a `statelab bench` run")
    return markdown(summarize(out))


def write_report(out: str | Path, *, log: bool = True) -> Path:
    """Write ``<out>/report/`` (report.md, plots, summary.json) and log it to the suite's mlflow run."""
    out = Path(out)
    rdir = out / "report"
    rdir.mkdir(parents=True, exist_ok=True)
    for stale in rdir.glob("*.png"):  # plots of an earlier report (e.g. of a grid value since dropped)
        stale.unlink()
    summary = summarize(out)
    plots = _plots(summary, load_results(out), rdir)
    md = markdown(summary, plots)
    atomic_write_text(rdir / "report.md", md)
    atomic_write_text(rdir / "summary.json", json.dumps(summary, indent=1, default=str) + "\n")
    meta = json.loads((out / "suite.json").read_text())
    parent = meta.get("parent_run_id")
    if log and parent:
        _log_report(parent, meta["suite"]["tracking"].get("uri"), rdir, summary)
    return rdir / "report.md"


def _log_report(parent: str, uri: str | None, rdir: Path, summary: dict[str, Any]) -> None:
    """Log the report to the suite's run; a store that lacks that run (another
    MLFLOW_TRACKING_URI than the suite ran with) leaves the written report unlogged, with a note."""
    from mlflow.exceptions import MlflowException

    from statelab.tracking import client, mlflow_key, resolve_uri

    c = client(uri)
    try:
        c.get_run(parent)
    except MlflowException:
        print(f"report written but not logged: the suite's mlflow run {parent} is not in {resolve_uri(uri)}; "
              "set MLFLOW_TRACKING_URI to the store the suite ran with to log it", file=sys.stderr)
        return
    c.log_artifacts(parent, str(rdir), artifact_path="report")
    for task_name, t in summary["tasks"].items():
        for e in t["entries"]:
            m = e["metrics"].get(t["primary"])
            if m:
                c.log_metric(parent, mlflow_key(f"{task_name}/{e['spec']}/{t['primary']}"), m["mean"])


__all__ = ["markdown", "suite_tables", "summarize", "write_report"]
