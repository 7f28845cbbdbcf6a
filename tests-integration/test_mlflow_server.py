"""Comparison runs, for real: trainings logged to a live ``mlflow server`` and read back
through its REST API, and ``statelab compare`` over two backbones.

The server listens on 127.0.0.1 only (a free port), keeps its store in a temporary
directory (sqlite backend, proxied artifacts), and is always terminated. Every wait is
bounded.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from statelab.train import train

STARTUP_TIMEOUT_S = 120  # mlflow imports slowly on a busy 2-core machine
HTTP_TIMEOUT_S = 30
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no job runner and huey workers: starts faster
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


class Server:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = root / "server.log"
        cmd = [
            sys.executable, "-m", "mlflow", "server",
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination", str(root / "artifacts"),
        ]
        with open(self.log, "wb") as log:
            # its own process group: the server's workers are stopped with it
            self.proc = subprocess.Popen(cmd, cwd=root, env=_env(), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"mlflow server not healthy after {STARTUP_TIMEOUT_S}s:\n{self.tail()}")

    def tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-3000:]
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=20)

    # -- REST ---------------------------------------------------------------------------
    def get(self, endpoint: str, **query) -> dict:
        url = f"{self.url}{endpoint}?{urllib.parse.urlencode(query)}"
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as r:
            return json.loads(r.read())

    def post(self, path: str, body: dict) -> dict:
        req = urllib.request.Request(f"{self.url}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT_S) as r:
            return json.loads(r.read())

    def raw(self, endpoint: str, **query) -> bytes:
        url = f"{self.url}{endpoint}?{urllib.parse.urlencode(query)}"
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as r:
            return r.read()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    srv = Server(root)
    try:
        srv.wait_healthy()
        yield srv
    finally:
        srv.stop()


def _small_doc(tiny, name: str, backbone: dict, tracking: dict, cache_dir: str, steps: int = 4) -> dict:
    doc = tiny.doc(backbone, name=name, steps=steps, cache_dir=cache_dir, tracking=tracking)
    doc["train"]["eval_interval"] = 2  # a validation curve of two points
    return doc


def test_trainings_are_logged_to_a_live_server(server, registry, tiny, data_cache, tmp_path, one_thread):
    if "mamba" not in registry.names("backbone"):
        pytest.skip("needs crsm-planner (the mamba backbone): pip install crsm-planner")
    tracking = {"enabled": True, "uri": server.url, "experiment": "server-test"}
    results = {}
    for name, mixer in (("run-a", "mamba2"), ("run-b", "mamba1")):
        doc = _small_doc(tiny, name, tiny.backbones[mixer], tracking, data_cache)
        results[name] = train(doc, out_dir=tmp_path / "runs", progress=False)
        assert results[name].status == "finished" and results[name].mlflow_run_id

    exp = server.get("/api/2.0/mlflow/experiments/get-by-name", experiment_name="server-test")["experiment"]
    runs = server.post("/api/2.0/mlflow/runs/search", {"experiment_ids": [exp["experiment_id"]], "max_results": 10})
    runs = {r["info"]["run_name"]: r for r in runs.get("runs", [])}
    assert set(runs) == {"run-a", "run-b"}

    for name, res in results.items():
        run = runs[name]
        run_id = run["info"]["run_id"]
        assert run_id == res.mlflow_run_id
        assert run["info"]["status"] == "FINISHED"
        params = {p["key"]: p["value"] for p in run["data"].get("params", [])}
        assert params["model.backbone.kind"] == "mamba"
        assert params["model.backbone.mixer"] == ("mamba2" if name == "run-a" else "mamba1")
        metrics = {m["key"]: m["value"] for m in run["data"].get("metrics", [])}
        assert math.isclose(metrics["best/val_loss"], res.best_val_loss, rel_tol=1e-6)

        hist = server.get("/api/2.0/mlflow/metrics/get-history", run_id=run_id, metric_key="val/loss")["metrics"]
        assert sorted(m["step"] for m in hist) == [2, 4]
        assert all(math.isfinite(m["value"]) for m in hist)
        local = {row["step"]: row["val/loss"] for row in res.history["val"]}
        for m in hist:
            assert math.isclose(m["value"], local[m["step"]], rel_tol=1e-6)
        train_hist = server.get("/api/2.0/mlflow/metrics/get-history", run_id=run_id, metric_key="train/loss")["metrics"]
        assert len(train_hist) >= 2

        top = server.get("/api/2.0/mlflow/artifacts/list", run_id=run_id).get("files", [])
        names = {f["path"]: f for f in top}
        assert {"spec.yaml", "loss_curve.png", "checkpoint"} <= set(names), sorted(names)
        # the complete best checkpoint (what `statelab eval runs:/RUN_ID` downloads)
        best = server.get("/api/2.0/mlflow/artifacts/list", run_id=run_id, path="checkpoint").get("files", [])
        logged = {f["path"]: f for f in best}
        for fname in ("model.safetensors", "manifest.json", "tokenizer.json"):
            local = res.run_dir / "best" / fname
            assert int(logged[f"checkpoint/{fname}"]["file_size"]) == local.stat().st_size

        png = server.raw("/get-artifact", path="loss_curve.png", run_uuid=run_id)
        assert png.startswith(PNG_MAGIC)
        spec_text = server.raw("/get-artifact", path="spec.yaml", run_uuid=run_id).decode()
        assert f"name: {name}" in spec_text


def _compare(uri: str, experiment: str, cwd: Path) -> tuple[str, Path]:
    plot = cwd / "plot.png"
    proc = subprocess.run(
        [sys.executable, "-m", "statelab", "compare", "--experiment", experiment, "--uri", uri, "--output", str(plot)],
        cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout, plot


def test_compare_two_backbones(registry, tiny, data_cache, tmp_path, one_thread):
    """`statelab compare` over a temporary sqlite store holding a Mamba and a K-SSM run."""
    if not {("backbone", "mamba"), ("backbone", "kssm")} <= set(registry.components):
        pytest.skip("needs crsm-planner and kssm-oscillators")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking = {"enabled": True, "uri": uri, "experiment": "compare-test"}
    results = {}
    for name, bb in (("m2", tiny.backbones["mamba2"]), ("ks", tiny.backbones["kssm"])):
        results[name] = train(_small_doc(tiny, name, bb, tracking, data_cache), out_dir=tmp_path / "runs",
                              progress=False)
    out, plot = _compare(uri, "compare-test", tmp_path)
    table, differing = out.split("\n\nfields that differ", 1)
    lines = table.splitlines()
    assert lines[0].split()[:2] == ["run", "model"] and "best val loss" in lines[0]
    rows = {ln.split()[0]: ln for ln in lines[2:]}
    assert "model.backbone.kind" in differing
    assert set(rows) == {"m2", "ks"}
    for name, backbone in (("m2", "mamba"), ("ks", "kssm")):
        cells = rows[name].split()
        assert cells[1] == backbone
        assert f"{results[name].best_val_loss:.4f}" in cells
        assert cells[-1] == "finished"
    assert re.search(r"validation curves: .*plot\.png", out)
    assert plot.read_bytes().startswith(PNG_MAGIC)
