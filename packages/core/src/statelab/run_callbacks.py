"""The trainer's own callbacks: tracking, evaluation, sampling, checkpointing (and, from
:mod:`statelab.post_training`, the planner fit and the probes).

========================  =====  ===========================================================
callback                  order  what it does
========================  =====  ===========================================================
``tracking``                  0  run directory, ``spec.yaml``, the mlflow run (params: the
                                 resolved spec with every plugin default; tags), summary
                                 metrics, artifacts (the complete ``best/`` checkpoint under
                                 ``checkpoint``), the final mlflow status (KILLED when stopped)
``data-check``                5  before step 0 of a new run: warnings about the data
                                 (:class:`statelab.data.inspect.DataCheck`)
``evaluation``               10  validation every ``eval_interval`` steps and at the end
``sampling``                 15  a generated sample after each evaluation (``samples.txt``)
``checkpointing``            20  a checkpoint every ``checkpoint_interval`` steps and at the
                                 end, ``best/`` at each new best validation loss
``planner-fit``              60  fits the planner on the best weights after training
``probes``                   70  runs the spec's probes after training
========================  =====  ===========================================================
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Mapping

from statelab.callbacks import Callback
from statelab.io import atomic_write_text


def default_callbacks() -> list[Callback]:
    from statelab.data.inspect import DataCheck
    from statelab.post_training import PlannerFit, Probes

    return [Tracking(), DataCheck(), Evaluation(), Sampling(), Checkpointing(), PlannerFit(), Probes()]


class Tracking(Callback):
    name, order = "tracking", 0

    def __init__(self) -> None:
        self.ended = False

    def on_run_start(self, t: Any) -> None:
        if not t.is_main:
            return
        from statelab.tracking import open_tracker

        t.run_dir.mkdir(parents=True, exist_ok=True)
        import yaml

        atomic_write_text(t.run_dir / "spec.yaml", yaml.safe_dump(t.spec_doc, sort_keys=False))
        metrics = t.run_dir / "metrics.jsonl"
        if t.resume and metrics.exists():  # drop lines past the checkpoint we resume from
            keep = [ln for ln in metrics.read_text().splitlines() if ln and json.loads(ln)["step"] <= t.start_step]
            atomic_write_text(metrics, "".join(ln + "\n" for ln in keep))
        elif not t.resume:
            metrics.unlink(missing_ok=True)
            (t.run_dir / "samples.txt").unlink(missing_ok=True)
        t.tracker = open_tracker(t.spec.tracking, run_name=t.spec.name, resume_run_id=t.run_id)
        t.run_id = t.tracker.run_id
        if t.run_id:
            t.checkpoint_meta = {"statelab.mlflow_run_id": t.run_id, "statelab.mlflow_uri": t.tracker.uri}
        if not t.resume:  # params stay those of the first start; a later change of train.* is a tag
            t.tracker.log_params({**resolved_params(t.resolved), "model.parameters": t.model.num_parameters()})
        t.tracker.set_tags(run_tags(t))
        t.tracker.log_artifact(t.run_dir / "spec.yaml")
        t.progress.note(f"statelab: training {t.spec.name} ({t.model.num_parameters():,} parameters) on {t.device} "
                        f"x{t.world_size}, {t.precision}{', compiled' if t.cfg.compile else ''}"
                        f"{', DDP' if t.info.enabled else ''}; run dir {t.run_dir}"
                        + (f"; resuming at step {t.start_step}" if t.resume else ""))

    def on_train_end(self, t: Any) -> None:
        if not t.is_main:
            return
        if t.status == "interrupted":
            t.progress.note(f"statelab: stopped by {t.signals.name()} at step {t.step}; checkpoint "
                            f"{t.last_checkpoint}; continue with --resume")
        elif t.status == "time_budget":
            t.progress.note(f"statelab: time budget of {t.cfg.time_budget_s:.0f}s reached at step {t.step}")
        summary = {"train/tok_per_s_mean": t.tokens_per_s, "train/steps_done": t.step, "train/elapsed_s": t.elapsed()}
        if t.device.type == "cuda":
            import torch

            summary["train/peak_gpu_mem_gb"] = torch.cuda.max_memory_allocated(t.device) / 2**30
        t.log_metrics(summary)

    def on_run_end(self, t: Any) -> None:
        if not t.is_main or self.ended:
            return
        if t.status == "failed":
            self.ended = True
            exc = getattr(t, "error", None)
            t.tracker.set_tags({"statelab.error": f"{type(exc).__name__}: {exc}"})
            t.tracker.finish("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
            return
        t.tracker.set_tags({"statelab.status": t.status, **({"statelab.stopped_in": t.stopped_in} if t.stopped_in else {})})
        finish_artifacts(t)  # if this raises, the trainer calls again with status "failed"
        self.ended = True
        t.tracker.finish("FINISHED" if t.status == "finished" else "KILLED")


def resolved_params(resolved: Any) -> dict[str, str]:
    """The spec flattened for mlflow params, each component with every parameter, defaults included."""
    from statelab.spec import dump_spec, flatten

    doc = dump_spec(resolved.spec)
    for rc in resolved.all():
        *parents, last = rc.path.split(".")
        node: Any = doc
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        key: Any = int(last) if isinstance(node, list) else last
        node[key] = {**node[key], **rc.params.model_dump(mode="json")}
    return flatten(doc)


def run_tags(t: Any) -> dict[str, Any]:
    from statelab.tracking import git_revision
    from statelab.train_state import spec_diff

    r = t.resolved
    tags = {
        "statelab.core_version": _core_version(),
        "statelab.distributions": json.dumps(r.distributions()),
        "statelab.run_dir": str(t.run_dir.resolve()),
        "statelab.device": str(t.device),
        "statelab.world_size": t.world_size,
        "statelab.precision": t.precision,
        "statelab.backbone": r.backbone.component.name,
        "statelab.memories": ",".join(m.component.name for m in r.memories),
        "statelab.planner": r.planner.component.name if r.planner else "",
    }
    tags.update({f"plugin.{d}": v for d, v in r.distributions().items()})
    if t.resume:
        tags[f"statelab.resumed_at.{t.start_step}"] = json.dumps(
            spec_diff(t._saved[0].get("spec", {}), t.spec_doc, ("train", "tracking")))
    rev = git_revision() if t.tracker.enabled else None
    if rev:
        tags["mlflow.source.git.commit"] = rev
        tags["statelab.git_revision"] = rev
    return tags


def finish_artifacts(t: Any) -> None:
    """Loss curve, the complete best checkpoint (loadable after download), samples, metrics."""
    from statelab.tracking import CHECKPOINT_ARTIFACT

    png = t.run_dir / "loss_curve.png"
    try:
        plot_history(t.history, png)
        t.tracker.log_artifact(png)
    except Exception as exc:  # noqa: BLE001 - a plot must never fail a run
        print(f"statelab: could not draw the loss curve ({exc})", file=sys.stderr)
    best = t.run_dir / "best"
    if (best / "manifest.json").exists():
        t.tracker.log_artifact(best, CHECKPOINT_ARTIFACT)
    for name in ("samples.txt", "metrics.jsonl"):
        if (t.run_dir / name).exists():
            t.tracker.log_artifact(t.run_dir / name)


def plot_history(history: Mapping[str, list], path: Path) -> None:
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    tr, va = history.get("train", []), history.get("val", [])
    if tr:
        ax.plot([h["step"] for h in tr], [h["train/loss"] for h in tr], label="train loss")
    if va:
        ax.plot([h["step"] for h in va], [h["val/loss"] for h in va], "o-", label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    if tr or va:
        ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


class Evaluation(Callback):
    """Validation every ``eval_interval`` steps (not at the last, which the end covers), and
    at the end of a finished run unless that step was evaluated; after a budget stop only
    when no evaluation was made yet (so every run reports a validation loss), not after a
    signal."""

    name, order = "evaluation", 10

    def on_optimizer_step(self, t: Any, step: int) -> None:
        if t.is_main and step % t.cfg.eval_interval == 0 and step < t.cfg.steps:
            t.evaluate()

    def on_train_end(self, t: Any) -> None:
        if not t.is_main:
            return
        if t.status == "finished" and not any(h["step"] == t.step for h in t.history["val"]):
            t.run_phase("final evaluation", lambda phase: t.evaluate())  # (again after --resume if it was stopped)
        elif t.status == "time_budget" and not t.history["val"]:
            t.run_phase("evaluation after the time budget", lambda phase: t.evaluate(), budget=False)


class Sampling(Callback):
    """A sample after each evaluation, prompted with the start of the validation text."""

    name, order = "sampling", 15

    def on_evaluate(self, t: Any, step: int, metrics: Mapping[str, float]) -> None:
        if t.cfg.sample_tokens <= 0 or t.data.tokenizer is None:
            return
        from statelab.generation import generate

        val = t.data.val_tokens
        prompt = val[:8].tolist() if val is not None and len(val) > 0 else [0]
        try:
            res = generate(t.model, [prompt], tokenizer=t.data.tokenizer, max_new_tokens=t.cfg.sample_tokens,
                           temperature=0.8, top_k=50, seed=t.spec.seed + step, use_planner=False)
            text = t.data.tokenizer.decode(prompt) + res.texts[0]
        except Exception as exc:  # noqa: BLE001 - a sample must never kill training
            text = f"(sampling failed: {type(exc).__name__}: {exc})"
        with open(t.run_dir / "samples.txt", "a", encoding="utf-8") as f:
            f.write(f"=== step {step} ===\n{text}\n\n")


class Checkpointing(Callback):
    """Every ``checkpoint_interval`` steps and at the end (also after a stop, so ``--resume``
    continues exactly); ``best/`` whenever an evaluation improves on the best loss."""

    name, order = "checkpointing", 20

    def on_optimizer_step(self, t: Any, step: int) -> None:
        if step % t.cfg.checkpoint_interval == 0 and step < t.cfg.steps:
            t.save_checkpoint()

    def on_evaluate(self, t: Any, step: int, metrics: Mapping[str, float]) -> None:
        if t.best_step == step:
            t.save_best()

    def on_train_end(self, t: Any) -> None:
        if t.saved_at != t.step and t.step > t.start_step:
            t.save_checkpoint()


def _core_version() -> str:
    from statelab.__about__ import __version__

    return __version__
