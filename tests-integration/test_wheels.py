"""Picking pieces: each package installed alone from its built wheel, in a fresh venv.

This proves the published metadata (each plugin's dependency range on statelab-core)
resolves, that every module of every package imports with only its declared dependencies
installed (and every import statement, including those inside functions, names a declared
dependency), that the core install is light (the mlflow client, not the server stack),
that `statelab plugins` lists exactly what is installed, that a spec needing an absent
plugin fails with the install hint, and that a third-party plugin works next to a
first-party backbone. Wheels are built with `hatch build` (hatchling when hatch is absent).
Everything installs through the machine's own pip configuration (its index or wheel
cache); torch is the CPU build of constraints.txt, from there or from PyTorch's CPU index.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {
    "statelab-core": ROOT / "packages/core",
    "crsm-planner": ROOT / "packages/crsm-planner",
    "crsd-memory": ROOT / "packages/crsd-memory",
    "kssm-oscillators": ROOT / "packages/kssm-oscillators",
    "then-memory": ROOT / "packages/then-memory",
    "traces-crystallize": ROOT / "packages/traces-crystallize",
    "statelab-window-mean": ROOT / "docs/examples/statelab-window-mean",
}
# one small spec per plugin that trains with that plugin alone (None: no backbone of its own)
ALONE = {
    "crsm-planner": {"backbone": {"kind": "mamba", "n_layers": 1}},
    "crsd-memory": {"backbone": {"kind": "crsd", "n_layers": 1}},
    "kssm-oscillators": {"backbone": {"kind": "kssm", "n_layers": 1}},
    "then-memory": None,
    "traces-crystallize": {"backbone": {"kind": "transformer", "n_layers": 1, "n_heads": 2}},
}
# a kind each plugin provides, to check the install hint when it is absent
HINT = {
    "crsm-planner": ("backbone", "mamba"),
    "crsd-memory": ("memory", "hebbian"),
    "kssm-oscillators": ("backbone", "kssm"),
    "then-memory": ("memory", "then"),
    "traces-crystallize": ("backbone", "transformer"),
}

# imports that are optional accelerators, used when importable and declared as extras
OPTIONAL_IMPORTS = {"mamba_ssm", "triton"}
# the mlflow server stack that `pip install statelab-core` must not pull in (it is the `ui` extra)
HEAVY = {"mlflow", "flask", "pandas", "pyarrow", "scikit-learn", "docker", "gunicorn"}
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"

IMPORT_EVERYTHING = """
import ast, importlib, importlib.metadata as md, importlib.util, json, pathlib, pkgutil, re, sys
dist, name, optional = sys.argv[1], sys.argv[2], set(sys.argv[3:])
canon = lambda n: re.sub(r"[-_.]+", "-", n).lower()
declared = {canon(re.split(r"[ ;<>=!~\\[(]", r, maxsplit=1)[0]) for r in md.requires(dist) or []} | {canon(dist)}
providers = md.packages_distributions()
pkg = importlib.import_module(name)
problems = []
for m in pkgutil.walk_packages(pkg.__path__, name + "."):
    if m.name.endswith(".__main__"):  # runs the command line when imported
        continue
    try:
        importlib.import_module(m.name)
    except Exception as exc:
        problems.append(f"import {m.name}: {type(exc).__name__}: {exc}")
for f in sorted(pathlib.Path(pkg.__path__[0]).rglob("*.py")):
    for node in ast.walk(ast.parse(f.read_text())):
        if isinstance(node, ast.Import):
            tops = [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            tops = [node.module.split(".")[0]]
        else:
            continue
        for top in tops:
            if top in sys.stdlib_module_names or top in optional or top == "__future__":
                continue
            if importlib.util.find_spec(top) is None:
                problems.append(f"{f.name}:{node.lineno} imports {top!r}, which no declared dependency installs")
            elif top in providers and not {canon(d) for d in providers[top]} & declared:
                problems.append(f"{f.name}:{node.lineno} imports {top!r} (from {providers.get(top)}), which "
                                f"{dist} does not declare (it is only there through another package)")
print(json.dumps(sorted(set(problems))))
"""

pytestmark = pytest.mark.slow


def _build_wheel(src: Path, out: Path) -> Path:
    hatch = shutil.which("hatch")
    cmd = [hatch, "build", "-t", "wheel", str(out)] if hatch else [sys.executable, "-m", "hatchling", "build", "-t", "wheel", "-d", str(out)]
    before = set(out.glob("*.whl"))
    # a clean environment: inside `hatch run`, HATCH_* and PIP_* variables describe the
    # workspace's environment, not the package being built
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HATCH_", "PIP_", "VIRTUAL_ENV"))}
    res = subprocess.run(cmd, cwd=src, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"building {src.name} failed:\n{res.stdout}\n{res.stderr}")
    (wheel,) = set(out.glob("*.whl")) - before
    return wheel


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("wheels")
    return {name: _build_wheel(src, out) for name, src in PACKAGES.items()}


class Venv:
    def __init__(self, path: Path, workdir: Path) -> None:
        venv.EnvBuilder(with_pip=True, clear=True).create(path)
        self.bin = path / "bin"
        self.workdir = workdir
        self.env = {
            k: v for k, v in os.environ.items() if not k.startswith(("STATELAB_", "PYTHONPATH", "VIRTUAL_ENV", "PIP_CONSTRAINT"))
        }
        self.env.update(MLFLOW_DISABLE_TELEMETRY="true", STATELAB_CACHE_DIR=str(workdir / "cache"))

    def pip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.bin / "python"), "-m", "pip", "-q", *args], check=check, env=self.env,
                              cwd=self.workdir, capture_output=True, text=True)

    def installed(self) -> set[str]:
        out = subprocess.run([str(self.bin / "python"), "-m", "pip", "list", "--format=json"], check=True, env=self.env,
                             capture_output=True, text=True).stdout
        return {p["name"].lower() for p in json.loads(out)}

    def undeclared(self, dist: str) -> list[str]:
        """Problems importing every module of distribution ``dist`` (see IMPORT_EVERYTHING)."""
        package = "statelab" if dist == "statelab-core" else dist.replace("-", "_")
        res = subprocess.run([str(self.bin / "python"), "-c", IMPORT_EVERYTHING, dist, package, *OPTIONAL_IMPORTS],
                             env=self.env, cwd=self.workdir, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr
        return json.loads(res.stdout)

    def statelab(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.bin / "statelab"), *args], env=self.env, cwd=self.workdir, capture_output=True,
                              text=True, check=check, timeout=600)


@pytest.fixture(scope="module")
def env(tmp_path_factory, wheels) -> Venv:
    work = tmp_path_factory.mktemp("venv-work")
    v = Venv(work / "venv", work)
    constraints = str(ROOT / "constraints.txt")
    if v.pip("install", "-c", constraints, "torch", check=False).returncode != 0:  # no local CPU wheel here
        v.pip("install", "-c", constraints, "--extra-index-url", TORCH_CPU_INDEX, "torch")
    v.pip("install", "-c", constraints, str(wheels["statelab-core"]))
    return v


def _spec(work: Path, name: str, model: dict, **extra) -> Path:
    doc = {
        "name": name,
        "tokenizer": {"kind": "byte"},
        "model": {"d_model": 32, **model},
        "train": {"steps": 3, "batch_size": 2, "seq_len": 16, "warmup_steps": 1, "eval_interval": 3, "eval_batches": 1,
                  "checkpoint_interval": 3, "sample_tokens": 4, "out_dir": str(work / "runs")},
        "tracking": {"enabled": False},
        **extra,
    }
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _components(v: Venv) -> tuple[set[str], list]:
    data = json.loads(v.statelab("plugins", "--json").stdout)
    return {c["distribution"] for c in data["components"]}, data["failures"]


def test_core_alone_has_only_its_own_components_and_no_errors(env):
    data = json.loads(env.statelab("plugins", "--json").stdout)
    assert {c["distribution"] for c in data["components"]} <= {"statelab-core"} and data["failures"] == []
    assert env.undeclared("statelab-core") == []
    assert env.installed() & HEAVY == set()  # the light install: mlflow-skinny and the SQLite store only


@pytest.mark.parametrize("plugin", list(ALONE))
def test_each_plugin_alone(env, wheels, plugin):
    before = env.installed()
    env.pip("install", "-c", str(ROOT / "constraints.txt"), str(wheels[plugin]))
    added = env.installed() - before  # the plugin and what its declared dependencies pulled in
    try:
        assert env.undeclared(plugin) == []
        dists, failures = _components(env)
        assert failures == []
        assert dists - {"statelab-core"} == {plugin}
        if ALONE[plugin] is not None:
            spec = _spec(env.workdir, f"alone-{plugin}", ALONE[plugin])
            out = env.statelab("train", str(spec))
            assert (env.workdir / "runs" / f"alone-{plugin}" / "best" / "model.safetensors").is_file(), out.stdout + out.stderr
        for other, (slot, kind) in HINT.items():
            if other == plugin:
                continue
            model = {"backbone": {"kind": kind, "n_layers": 1}} if slot == "backbone" else {
                "backbone": ALONE[plugin]["backbone"] if ALONE[plugin] else {"kind": "mamba", "n_layers": 1},
                "memories": [{"kind": kind, "after_layer": 0}]}
            res = env.statelab("validate", str(_spec(env.workdir, f"needs-{kind}", model)), check=False)
            assert res.returncode == 2
            assert f"kind {kind!r} is provided by {other}: pip install {other}" in res.stderr
    finally:  # back to core alone, so the next plugin is checked with its own dependencies only
        env.pip("uninstall", "-y", *sorted(added))


def test_third_party_plugin_with_a_first_party_backbone(env, wheels):
    env.pip("install", "-c", str(ROOT / "constraints.txt"), str(wheels["crsm-planner"]), str(wheels["statelab-window-mean"]))
    try:
        data = json.loads(env.statelab("plugins", "--json").stdout)
        rows = {(c["slot"], c["name"], c["distribution"]) for c in data["components"]}
        assert ("memory", "window-mean", "statelab-window-mean") in rows
        assert ("backbone", "mamba", "crsm-planner") in rows
        spec = _spec(env.workdir, "third-party", {"backbone": {"kind": "mamba", "n_layers": 2},
                                                  "memories": [{"kind": "window-mean", "after_layer": 0, "window": 4}]},
                     tracking={"uri": f"sqlite:///{env.workdir / 'mlflow.db'}", "experiment": "wheels"})
        env.statelab("train", str(spec))
        assert (env.workdir / "runs" / "third-party" / "best" / "model.safetensors").is_file()
        # tracked into a local SQLite store by the light install
        table = env.statelab("compare", "--experiment", "wheels", "--uri", f"sqlite:///{env.workdir / 'mlflow.db'}",
                             "-o", str(env.workdir / "cmp.png")).stdout
        assert "third-party" in table
        # the example's own tests, run against the installed wheel
        env.pip("install", "pytest")
        subprocess.run([str(env.bin / "python"), "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        str(PACKAGES["statelab-window-mean"] / "tests")], check=True, env=env.env, cwd=env.workdir)
    finally:
        env.pip("uninstall", "-y", "crsm-planner", "statelab-window-mean")
