"""mlflow tracking for training runs (imported lazily: mlflow takes a second to import).

Every training run is an mlflow run in ``spec.tracking.experiment``. The tracking URI is
``spec.tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` in the
working directory; for a SQLite store the artifacts go beside the database
(``<dir>/mlartifacts``), so one directory holds the whole store. Logged: the flattened spec
as params, plugin distributions and versions and the git revision as tags, metrics per
step, and artifacts (spec, best weights, loss curve, samples, probe outputs).

Opening a run fails fast with one line (:class:`TrackingError`, see :func:`preflight`) when
the store cannot work. After that, calls are queued to a background thread, so a slow store
never stalls the training loop; :meth:`Tracker.finish` drains the queue. A store failing
mid-run prints one warning and training goes on.
"""

from __future__ import annotations

import os
import re
import queue
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Mapping

from statelab.errors import UserError


_MLFLOW_KEY_BAD = re.compile(r"[^A-Za-z0-9_\-. :/]")


def mlflow_key(name: str) -> str:
    """mlflow accepts alphanumerics, ``_ - . : /`` and spaces in metric, param and tag names;
    anything else (``acc@512``) becomes ``_`` so one odd name never loses a whole batch."""
    return _MLFLOW_KEY_BAD.sub("_", name)

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

__all__ = ["NullTracker", "Tracker", "TrackingError", "checkpoint_run", "client", "git_revision", "open_tracker",
           "preflight", "resolve_uri"]


def resolve_uri(uri: str | None = None) -> str:
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"


def _sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):]).expanduser().absolute()


def absolute_uri(uri: str) -> str:
    """A SQLite URI with an absolute path (so it still works from another directory)."""
    db = _sqlite_path(uri)
    return f"sqlite:///{db}" if db is not None else uri


class TrackingError(UserError):
    """The tracking store cannot be used: a server that does not answer, a path that cannot be written."""


#: seconds a tracking server has to answer its health check before a run refuses to start
PREFLIGHT_TIMEOUT_S = float(os.environ.get("STATELAB_MLFLOW_TIMEOUT_S", "10"))

_HINT = "fix tracking.uri or MLFLOW_TRACKING_URI, or set tracking.enabled: false"


def preflight(uri: str) -> None:
    """Fail fast, in one line, on a store that cannot work: an HTTP server that does not answer
    within :data:`PREFLIGHT_TIMEOUT_S` (mlflow itself retries for minutes), or a SQLite
    database whose directory cannot be created or written."""
    db = _sqlite_path(uri)
    if db is not None:
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TrackingError(f"cannot create the mlflow store's directory {str(db.parent)!r} "
                                f"({exc.strerror or exc}); {_HINT}") from None
        writable = os.access(db, os.W_OK) if db.exists() else os.access(db.parent, os.W_OK | os.X_OK)
        if not writable:
            raise TrackingError(f"the mlflow store {str(db if db.exists() else db.parent)!r} is not writable; {_HINT}")
        return
    if uri.startswith(("http://", "https://")):
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=PREFLIGHT_TIMEOUT_S):
                pass
        except urllib.error.HTTPError:
            return  # it answered (a proxy or an auth layer may refuse /health): mlflow reports the rest
        except (OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise TrackingError(f"the mlflow tracking server {uri} does not answer ({reason}); start it or {_HINT}") from None


def client(uri: str | None = None, *, check: bool = True) -> Any:
    """An ``mlflow.MlflowClient`` on ``uri`` (resolved as above), after :func:`preflight`
    (which creates a SQLite store's directory) unless ``check`` is false."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import logging

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    from mlflow import MlflowClient

    uri = resolve_uri(uri)
    if check:
        preflight(uri)
    return MlflowClient(tracking_uri=uri)


def _store_call(uri: str, fn: Callable[[], Any]) -> Any:
    """``fn()`` against the store; a failure becomes one :class:`TrackingError` line."""
    try:
        return fn()
    except TrackingError:
        raise
    except Exception as exc:  # noqa: BLE001 - mlflow raises many types; the message is what matters
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise TrackingError(f"the mlflow store {uri} failed ({type(exc).__name__}: {first}); {_HINT}") from exc


def experiment_id(c: Any, name: str, uri: str) -> str:
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    db = _sqlite_path(uri)
    location = (db.parent / "mlartifacts" / name).as_uri() if db is not None else None
    try:
        return c.create_experiment(name, artifact_location=location)
    except Exception:  # noqa: BLE001 - created concurrently by another process
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def git_revision(cwd: str | os.PathLike | None = None) -> str | None:
    """``<sha>`` or ``<sha>-dirty`` of the git checkout around ``cwd``; ``None`` outside git."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=5)
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


class NullTracker:
    """Tracking disabled: every call is a no-op."""

    run_id: str | None = None
    uri: str | None = None
    enabled = False

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...
    def log_params(self, params: Mapping[str, Any]) -> None: ...
    def set_tags(self, tags: Mapping[str, Any]) -> None: ...
    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...
    def finish(self, status: str = "FINISHED") -> None: ...


class Tracker(NullTracker):
    """One mlflow run, written from a background thread."""

    enabled = True

    def __init__(self, c: Any, run_id: str, uri: str) -> None:
        self._c = c
        self.run_id = run_id
        self.uri = absolute_uri(uri)
        self._q: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._warned = False
        self._thread = threading.Thread(target=self._work, name="statelab-mlflow", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while True:
            fn = self._q.get()
            try:
                if fn is None:
                    return
                fn()
            except Exception as exc:  # noqa: BLE001 - tracking must not kill training
                if not self._warned:
                    print(f"statelab: mlflow logging failed ({type(exc).__name__}: {exc}); training continues",
                          file=sys.stderr)
                    self._warned = True
            finally:
                self._q.task_done()

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        import time

        ts = int(time.time() * 1000)
        items = [Metric(mlflow_key(k), float(v), ts, int(step)) for k, v in metrics.items()]
        for i in range(0, len(items), 1000):
            chunk = items[i : i + 1000]
            self._q.put(lambda chunk=chunk: self._c.log_batch(self.run_id, metrics=chunk, synchronous=True))

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(mlflow_key(k), str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            chunk = items[i : i + 100]
            self._q.put(lambda chunk=chunk: self._c.log_batch(self.run_id, params=chunk, synchronous=True))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(mlflow_key(k), str(v)[:5000]) for k, v in tags.items()]
        if items:
            self._q.put(lambda: self._c.log_batch(self.run_id, tags=items, synchronous=True))

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        p = str(path)
        if Path(p).is_dir():
            self._q.put(lambda: self._c.log_artifacts(self.run_id, p, artifact_path))
        else:
            self._q.put(lambda: self._c.log_artifact(self.run_id, p, artifact_path))

    def flush(self) -> None:
        self._q.join()

    def close(self) -> None:
        """Drain the queue and stop the writer, leaving the run's status alone."""
        self._q.put(None)
        self._thread.join()

    def finish(self, status: str = "FINISHED") -> None:
        """Mark the run ended (FINISHED, FAILED or KILLED) and stop the writer."""
        self._q.put(lambda: self._c.set_terminated(self.run_id, status=status))
        self.close()


def open_tracker(
    tracking: Any, *, run_name: str, resume_run_id: str | None = None, enabled: bool = True
) -> NullTracker:
    """Start (or, with ``resume_run_id``, reopen) the mlflow run of a training run."""
    if not enabled or not tracking.enabled:
        return NullTracker()
    uri = resolve_uri(tracking.uri)
    c = client(uri)
    if resume_run_id:
        try:
            run = c.get_run(resume_run_id)
            c.update_run(resume_run_id, status="RUNNING")
            return Tracker(c, run.info.run_id, uri)
        except Exception:  # noqa: BLE001 - the store moved: start a new run
            print(f"statelab: mlflow run {resume_run_id} not found in {uri}; starting a new run", file=sys.stderr)
    exp = _store_call(uri, lambda: experiment_id(c, tracking.experiment, uri))
    run = _store_call(uri, lambda: c.create_run(exp, run_name=tracking.run_name or run_name))
    return Tracker(c, run.info.run_id, uri)


def checkpoint_run(meta: Mapping[str, str], uri: str | None, *, command: str) -> tuple[Tracker, int] | None:
    """The mlflow run that wrote a checkpoint, opened in the store the *user* names (``uri``,
    else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``), never in the store recorded
    in the checkpoint's metadata: a checkpoint file must not choose where data is sent or
    which files are created. Returns the tracker and the run's last logged step (so a
    metric logged there becomes the value the run shows), or ``None`` with a note on stderr
    when the run is not in that store. Nothing is created: a missing SQLite file is a miss."""
    run_id = meta.get("statelab.mlflow_run_id")
    if not run_id:
        return None
    uri = resolve_uri(uri)
    recorded = meta.get("statelab.mlflow_uri")
    hint = f" (the checkpoint was logged to {recorded}: pass --uri {recorded} to log there)" if recorded and \
        recorded != absolute_uri(uri) else ""
    db = _sqlite_path(uri)
    if db is not None and not db.exists():
        print(f"statelab {command}: not logged: {uri} does not exist{hint}", file=sys.stderr)
        return None
    try:
        c = client(uri)
        c.get_run(run_id)
        steps = [m.step for key in ("train/loss", "val/loss") for m in c.get_metric_history(run_id, key)]
    except TrackingError as exc:
        print(f"statelab {command}: not logged: {exc}", file=sys.stderr)
        return None
    except Exception:  # noqa: BLE001 - mlflow raises its own types for an unknown run
        print(f"statelab {command}: not logged: mlflow run {run_id} is not in {uri}{hint}", file=sys.stderr)
        return None
    return Tracker(c, run_id, uri), max(steps, default=0)


def log_probe_result(tracker: Any, kind: str, result: Any, step: int) -> dict[str, float]:
    """Log a :class:`~statelab.interfaces.ProbeResult` under ``probe/<kind>/...``: metrics (and
    ``passed`` as 0/1), verdict and pass/fail as tags, artifacts under ``probes/<kind>``.
    Returns the metrics as logged."""
    m = {f"probe/{kind}/{k}": float(v) for k, v in result.metrics.items()}
    if result.passed is not None:
        m[f"probe/{kind}/passed"] = 1.0 if result.passed else 0.0
    tracker.log_metrics(m, step)
    tags = {}
    if result.verdict is not None:
        tags[f"probe.{kind}.verdict"] = result.verdict
    if result.passed is not None:
        tags[f"probe.{kind}.passed"] = str(bool(result.passed)).lower()
    tracker.set_tags(tags)
    for path in result.artifacts.values():
        if Path(path).exists():
            tracker.log_artifact(path, f"probes/{kind}")
    return m


# --------------------------------------------------------------------------------------
# checkpoints logged to mlflow

#: where the trainer logs a run's complete best checkpoint (manifest, tokenizer, spec, weights)
CHECKPOINT_ARTIFACT = "checkpoint"

_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


def is_run_reference(ref: str) -> bool:
    """``runs:/<run_id>[/<artifact path>]``, or a bare mlflow run id (32 hex digits)."""
    return ref.startswith("runs:/") or bool(_RUN_ID.match(ref))


def download_checkpoint(ref: str, uri: str | None = None, cache_dir: str | os.PathLike | None = None) -> Path:
    """The checkpoint directory an mlflow run holds, downloaded from the store the user names
    (``uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``) into
    ``<cache>/mlflow/<run_id>/<artifact path>`` and reused while its manifest verifies.

    ``ref``: ``runs:/<run_id>`` (the ``checkpoint`` artifact), ``runs:/<run_id>/<path>``, or a
    bare run id. Raises :class:`TrackingError` when the run or its checkpoint is not there."""
    from statelab.checkpoint import MANIFEST, CheckpointError, read_checkpoint

    if ref.startswith("runs:/"):
        run_id, _, artifact = ref[len("runs:/"):].strip("/").partition("/")
    else:
        run_id, artifact = ref, ""
    artifact = artifact or CHECKPOINT_ARTIFACT
    uri = resolve_uri(uri)
    if cache_dir is None:
        from statelab.data import cache_root

        cache_dir = cache_root()
    dst = Path(cache_dir) / "mlflow" / run_id / artifact
    if (dst / MANIFEST).exists():
        try:
            read_checkpoint(dst)
            return dst
        except CheckpointError:
            pass  # a partial or stale copy: download again
    db = _sqlite_path(uri)
    if db is not None and not db.exists():  # reading must not create an empty store
        raise TrackingError(f"mlflow run {run_id}: the store {uri} does not exist; pass the store that holds the run "
                            "with --uri (or MLFLOW_TRACKING_URI)")
    c = client(uri)
    try:
        c.get_run(run_id)
    except Exception:  # noqa: BLE001 - mlflow raises its own types for an unknown run
        raise TrackingError(f"mlflow run {run_id} is not in {uri}; pass the store that holds it with --uri "
                            "(or MLFLOW_TRACKING_URI)") from None
    listed = {a.path for a in c.list_artifacts(run_id, artifact)}
    if f"{artifact}/{MANIFEST}" not in listed:
        raise TrackingError(f"mlflow run {run_id} has no complete checkpoint at artifact path {artifact!r} (no "
                            f"{MANIFEST}; runs logged by older statelab versions hold only best/model.safetensors): "
                            "load the run directory instead, or give the artifact path as runs:/<run_id>/<path>")
    import shutil
    import tempfile

    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=f".{dst.name}.download-") as tmp:
        got = Path(_store_call(uri, lambda: c.download_artifacts(run_id, artifact, tmp)))
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(got, dst)
    return dst


def resolve_checkpoint(ref: str, uri: str | None = None) -> str:
    """A local path as given; an mlflow run reference (see :func:`is_run_reference`) that is
    not a local path, downloaded by :func:`download_checkpoint`."""
    if Path(ref).exists() or not is_run_reference(ref):
        return ref
    return str(download_checkpoint(ref, uri))
