"""Post-training phases: the planner fit and the probes, on the best weights.

Both run only after a run that finished its steps, on rank 0, each as an interruptible
phase (:meth:`statelab.trainer.Trainer.run_phase`): a signal or the end of the time budget
stops them within seconds, the run ends with status ``interrupted``/``time_budget`` (a
non-zero exit from ``statelab train``, mlflow status KILLED), and ``--resume`` runs them
again. What they leave when stopped: the probes that completed are in
``probes/results.json`` and mlflow; an interrupted planner fit leaves ``best/`` with the
planner as it was before the fit (a half-fitted planner is never saved).
"""

from __future__ import annotations

import itertools
import json
from typing import Any

from torch import Tensor

from statelab import checkpoint as ckpt
from statelab.callbacks import Callback
from statelab.io import atomic_write_text


def use_best_weights(t: Any) -> None:
    """Load ``best/`` (weights and component state) into the model once, in eval mode."""
    if t.on_best_weights:
        return
    best = t.run_dir / "best"
    if (best / ckpt.MODEL_FILE).exists():
        ck = ckpt.read_checkpoint(best)
        t.model.load_state_dict(ck.state_dict())
        ckpt.load_component_state(t.model, ck)
    t.model.eval()
    t.on_best_weights = True


class PlannerFit(Callback):
    name, order = "planner-fit", 60

    def on_train_end(self, t: Any) -> None:
        planner = getattr(t.model, "planner", None)
        pf = t.cfg.planner_fit
        if not t.is_main or planner is None or not pf.enabled or t.status != "finished":
            return
        use_best_weights(t)

        def work(phase: Any) -> None:
            counter = itertools.count()

            def batches() -> Tensor:
                i = next(counter)
                phase.detail(f"{i + 1} batches drawn")
                return t.data.train_batch(10**9 + i, pf.batch_size, pf.seq_len).x.to(t.device)  # (B, T)

            metrics = planner.fit(t.model, batches, steps=pf.steps, batch_size=pf.batch_size, seq_len=pf.seq_len,
                                  lr=pf.lr) or {}
            t.log_metrics({f"planner/{k}": float(v) for k, v in metrics.items()})
            if (t.run_dir / "best").exists():
                t.save_best()

        t.run_phase(f"fitting the planner ({pf.steps} steps)", work)


class Probes(Callback):
    name, order = "probes", 70

    def on_train_end(self, t: Any) -> None:
        probes = list(t.resolved.probes)
        if not t.is_main or not probes or t.status != "finished":
            return
        use_best_weights(t)
        results: dict[str, Any] = {}
        kinds = [rc.component.name for rc in probes]

        def work(phase: Any) -> None:
            try:
                for i, rc in enumerate(probes):
                    # a kind used twice in one spec gets its index, so their outputs never overwrite each other
                    kind = rc.component.name if kinds.count(rc.component.name) == 1 else f"{rc.component.name}.{i}"
                    phase.detail(f"probe {i + 1}/{len(probes)}: {kind}")
                    results[kind] = run_probe(t, rc, kind)
            finally:
                (t.run_dir / "probes").mkdir(parents=True, exist_ok=True)
                atomic_write_text(t.run_dir / "probes" / "results.json", json.dumps(results, indent=1, default=str))

        t.run_phase(f"probes ({len(probes)})", work)


def run_probe(t: Any, rc: Any, kind: str) -> dict[str, Any]:
    from statelab.build import build_probe
    from statelab.interfaces import ProbeContext
    from statelab.tracking import log_probe_result

    probe = build_probe(rc, t.model)
    pdir = t.run_dir / "probes" / kind
    pdir.mkdir(parents=True, exist_ok=True)
    ctx = ProbeContext(val_tokens=t.data.val_tokens, tokenizer=t.data.tokenizer, out_dir=pdir, device=t.device,
                       seed=t.spec.seed, extra={"data": t.data})  # the DataSource, for probes that need batches
    res = probe.run(t.model, ctx)
    t.metrics.update(log_probe_result(t.tracker, kind, res, t.step))
    outcome = {True: "passed", False: "failed", None: ""}[res.passed]
    t.progress.note(f"probe {kind}: {res.verdict or ''} {outcome} "
                    + ", ".join(f"{k}={v:.4g}" for k, v in res.metrics.items()))
    return {"metrics": res.metrics, "verdict": res.verdict, "passed": res.passed,
            "artifacts": {k: str(v) for k, v in res.artifacts.items()}}
