"""Checkpoints: a directory written atomically, with nothing in it that unpickles code.

Layout of a checkpoint directory::

    model.safetensors     weights; metadata: the spec (JSON), vocabulary size, the plugin
                          components with their distributions and versions, statelab-core
                          version, tied-weight aliases
    tokenizer.json        the tokenizer (decodes without the corpus)
    trainer.json          training state without tensors: step, RNG states of python and
                          numpy, optimizer hyper-parameters, grad scaler, best val loss...
    trainer.safetensors   training-state tensors: optimizer moments, torch RNG states, the
                          carried stream state (absent for weights-only checkpoints)
    components.json       state of the callbacks the model's components contribute (e.g. a
    components.safetensors  path trie), JSON and tensors; written whenever there is any,
                          restored by :func:`load` and ``--resume``
    manifest.json         sha256 and size of every file, checked by :func:`load`

A run directory (``runs/<name>``) holds ``checkpoints/step-XXXXXXX`` (the last K),
``best/`` (weights only, best validation loss) and ``last`` (a symlink to the newest
periodic checkpoint). :func:`load` accepts a checkpoint directory or a run directory
(then ``best/``, else ``last``).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from statelab.errors import UserError
from statelab.io import atomic_directory

FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
TRAINER_JSON = "trainer.json"
TRAINER_TENSORS = "trainer.safetensors"
COMPONENTS_JSON = "components.json"
COMPONENTS_TENSORS = "components.safetensors"
MANIFEST = "manifest.json"

__all__ = [
    "CheckpointError",
    "IncompatibleCheckpointError",
    "MissingPluginError",
    "Checkpoint",
    "find_checkpoint",
    "load",
    "load_training_state",
    "read_checkpoint",
    "save",
    "state_tensors",
]


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be read: missing, truncated, corrupted, or incompatible."""


class MissingPluginError(CheckpointError):
    """The checkpoint was written with a plugin component that is not installed here."""


class IncompatibleCheckpointError(CheckpointError, ValueError):
    """The checkpoint's weights do not fit the model a spec builds (``train.init_from``)."""


# --------------------------------------------------------------------------------------
# writing


def _dedup(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Drop tensors that share storage with an earlier one (tied weights); return aliases."""
    out: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, t in state.items():
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() > 0 and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        out[name] = t.detach().to("cpu").contiguous().clone()
    return out, aliases


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_manifest(d: Path) -> None:
    files = {f.name: {"sha256": _sha256(f), "bytes": f.stat().st_size} for f in sorted(d.iterdir()) if f.is_file()}
    (d / MANIFEST).write_text(json.dumps({"format": FORMAT_VERSION, "files": files}, indent=1))


def components_of(model: Any) -> list[dict[str, str]]:
    resolved = getattr(model, "resolved", None)
    if resolved is None:
        return []
    return [
        {"slot": rc.component.slot, "kind": rc.component.name, "distribution": rc.component.distribution,
         "version": rc.component.version}
        for rc in resolved.all()
    ]


def model_metadata(model: Any, aliases: Mapping[str, str]) -> dict[str, str]:
    from statelab.__about__ import __version__
    from statelab.spec import dump_spec

    spec = getattr(model, "spec", None)
    resolved = getattr(model, "resolved", None)
    return {
        "format": "statelab",
        "statelab.format_version": str(FORMAT_VERSION),
        "statelab.core_version": __version__,
        "statelab.spec": json.dumps(dump_spec(spec)) if spec is not None else "null",
        "statelab.vocab_size": str(model.vocab_size),
        "statelab.distributions": json.dumps(resolved.distributions() if resolved is not None else {}),
        "statelab.components": json.dumps(components_of(model)),
        "statelab.aliases": json.dumps(dict(aliases)),
    }


def state_tensors(prefix: str, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {f"{prefix}{k}": v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def save(
    path: str | os.PathLike,
    model: Any,
    *,
    tokenizer: Any = None,
    trainer_state: Mapping[str, Any] | None = None,
    trainer_tensors: Mapping[str, Tensor] | None = None,
    extra_meta: Mapping[str, str] | None = None,
    _crash_after: str | None = None,
) -> Path:
    """Write a checkpoint directory atomically (a crash leaves the previous one intact).

    ``trainer_state`` (JSON-serialisable) and ``trainer_tensors`` hold what resuming needs;
    leave both ``None`` for a weights-only checkpoint. ``extra_meta`` adds string entries to
    the safetensors metadata (the trainer records ``statelab.mlflow_run_id`` and
    ``statelab.mlflow_uri`` there, so later commands can log into the same run). ``_crash_after`` (tests only) raises
    after writing the named file, to simulate a crash mid-write.
    """
    from safetensors.torch import save_file

    path = Path(path)
    raw = model.module if hasattr(model, "module") else model
    raw = getattr(raw, "_orig_mod", raw)  # torch.compile wrapper
    weights, aliases = _dedup(raw.state_dict())
    with atomic_directory(path) as tmp:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; a checkpoint is an ordinary directory
        meta = model_metadata(raw, aliases)
        meta.update({k: str(v) for k, v in (extra_meta or {}).items()})
        save_file(weights, str(tmp / MODEL_FILE), metadata=meta)
        if _crash_after == MODEL_FILE:
            raise RuntimeError("simulated crash while writing a checkpoint")
        tok = tokenizer if tokenizer is not None else getattr(raw, "tokenizer", None)
        if tok is not None:
            (tmp / TOKENIZER_FILE).write_text(json.dumps(tok.to_json()))
        if trainer_state is not None:
            (tmp / TRAINER_JSON).write_text(json.dumps(trainer_state))
        if trainer_tensors is not None:
            save_file(dict(trainer_tensors), str(tmp / TRAINER_TENSORS))
        _write_component_state(tmp, raw)
        _write_manifest(tmp)
    return path


# --------------------------------------------------------------------------------------
# reading


def _write_component_state(d: Path, model: Any) -> None:
    from safetensors.torch import save_file

    from statelab.callbacks import component_callbacks, split_state

    states = {name: cb.state_dict() for name, cb in component_callbacks(model).items()}
    states = {name: st for name, st in states.items() if st}
    if states:
        js, tensors = split_state(states)
        (d / COMPONENTS_JSON).write_text(json.dumps(js))
        save_file(tensors, str(d / COMPONENTS_TENSORS))


def load_component_state(model: Any, ck: "Checkpoint") -> None:
    """Give the model's component callbacks the state ``ck`` holds for them (none: no call)."""
    from statelab.callbacks import component_callbacks, join_state

    fj = ck.path / COMPONENTS_JSON
    if not fj.exists():
        return
    js = json.loads(fj.read_text())
    ft = ck.path / COMPONENTS_TENSORS
    tensors = _read_safetensors(ft)[0] if ft.exists() else {}
    for name, cb in component_callbacks(model).items():
        state = join_state(js, tensors, name)
        if state is not None:
            cb.load_state_dict(state)


def find_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory from a checkpoint directory, a run directory, or a model file."""
    p = Path(path)
    if p.is_file() and p.name == MODEL_FILE:
        return p.parent
    if not p.exists():
        raise CheckpointError(f"checkpoint {str(p)!r} does not exist")
    if (p / MODEL_FILE).exists() or (p / MANIFEST).exists():
        return p
    for sub in ("best", "last"):
        if (p / sub / MODEL_FILE).exists():
            return (p / sub).resolve()
    raise CheckpointError(
        f"{str(p)!r} is not a statelab checkpoint (no {MODEL_FILE}) nor a run directory with best/ or last/; "
        "pass a checkpoint directory such as runs/<name>/best"
    )


def _verify(d: Path) -> None:
    mf = d / MANIFEST
    if not mf.exists():
        raise CheckpointError(f"checkpoint {str(d)!r} has no {MANIFEST}: it is incomplete (a crashed write?)")
    try:
        manifest = json.loads(mf.read_text())
        files = manifest["files"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {str(d)!r}: {MANIFEST} is corrupted ({exc})") from None
    for name, info in files.items():
        f = d / name
        if not f.exists():
            raise CheckpointError(f"checkpoint {str(d)!r} is incomplete: {name} is missing")
        size = f.stat().st_size
        if size != info["bytes"]:
            raise CheckpointError(
                f"checkpoint file {str(f)!r} is truncated or corrupted: {size} bytes, expected {info['bytes']}; "
                "restore it from a copy or use another checkpoint of the run (checkpoints/, best/)"
            )
        if _sha256(f) != info["sha256"]:
            raise CheckpointError(
                f"checkpoint file {str(f)!r} is corrupted (sha256 mismatch); "
                "restore it from a copy or use another checkpoint of the run (checkpoints/, best/)"
            )


def _read_safetensors(f: Path, map_location: str | torch.device = "cpu") -> tuple[dict[str, Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(f), framework="pt", device=str(map_location)) as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {str(f)!r}: the file is truncated or corrupted ({exc})") from None
    return tensors, meta


class Checkpoint:
    """The parsed contents of a checkpoint directory (see :func:`read_checkpoint`)."""

    def __init__(self, path: Path, weights: dict[str, Tensor], meta: dict[str, str]) -> None:
        self.path = path
        self.weights = weights
        self.meta = meta
        try:
            self.spec_doc: dict[str, Any] | None = json.loads(meta.get("statelab.spec", "null"))
            self.vocab_size = int(meta["statelab.vocab_size"])
            self.components: list[dict[str, str]] = json.loads(meta.get("statelab.components", "[]"))
            self.distributions: dict[str, str] = json.loads(meta.get("statelab.distributions", "{}"))
            self.aliases: dict[str, str] = json.loads(meta.get("statelab.aliases", "{}"))
        except (KeyError, ValueError) as exc:
            raise CheckpointError(f"{str(path / MODEL_FILE)!r} has no valid statelab metadata ({exc}); "
                                  "it was not written by statelab.checkpoint.save") from None
        self.core_version = meta.get("statelab.core_version", "?")

    def state_dict(self) -> dict[str, Tensor]:
        sd = dict(self.weights)
        for alias, target in self.aliases.items():
            sd[alias] = sd[target]
        return sd

    def tokenizer(self) -> Any:
        f = self.path / TOKENIZER_FILE
        if not f.exists():
            return None
        from statelab.tokenizers import tokenizer_from_json

        return tokenizer_from_json(json.loads(f.read_text()))

    def trainer_state(self) -> tuple[dict[str, Any], dict[str, Tensor]] | None:
        fj, ft = self.path / TRAINER_JSON, self.path / TRAINER_TENSORS
        if not fj.exists():
            return None
        state = json.loads(fj.read_text())
        tensors = _read_safetensors(ft)[0] if ft.exists() else {}
        return state, tensors


def read_checkpoint(
    path: str | os.PathLike, *, map_location: str | torch.device = "cpu", verify: bool = True
) -> Checkpoint:
    d = find_checkpoint(path)
    if verify:
        _verify(d)
    weights, meta = _read_safetensors(d / MODEL_FILE, map_location)
    return Checkpoint(d, weights, meta)


def _check_plugins(ck: Checkpoint, registry: Any) -> None:
    for c in ck.components:
        if (c["slot"], c["kind"]) not in registry:
            dist, ver = c.get("distribution", "?"), c.get("version", "")
            pin = f"{dist}=={ver}" if ver else dist
            raise MissingPluginError(
                f"checkpoint {str(ck.path)!r} needs {c['slot']} {c['kind']!r} from {dist} {ver}".rstrip()
                + f", which is not installed here: pip install {pin}"
            )


def build_from_checkpoint(ck: Checkpoint, *, registry: Any = None) -> Any:
    from statelab.build import build
    from statelab.plugins import get_registry

    if ck.spec_doc is None:
        raise CheckpointError(f"checkpoint {str(ck.path)!r} carries no spec, so the model cannot be rebuilt")
    registry = registry or get_registry()
    _check_plugins(ck, registry)
    model = build(ck.spec_doc, vocab_size=ck.vocab_size, registry=registry)
    missing, unexpected = model.load_state_dict(ck.state_dict(), strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {str(ck.path)!r} does not match the model its spec builds with the installed plugins "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]}); the plugin versions differ from the ones that "
            f"wrote it: {ck.distributions}"
        )
    load_component_state(model, ck)
    return model


def load(
    path: str | os.PathLike, map_location: str | torch.device = "cpu", *, registry: Any = None, verify: bool = True
) -> Any:
    """Rebuild the :class:`~statelab.model.StatelabModel` a checkpoint holds, in eval mode.

    ``path``: a checkpoint directory, or a run directory (then its ``best/``, else ``last``).
    Sets ``model.spec`` (the spec it was trained with), ``model.tokenizer`` and
    ``model.checkpoint_path``. Raises :class:`MissingPluginError` naming the distribution
    and version to install when a component is not available, and
    :class:`CheckpointError` for a truncated or corrupted file.
    """
    ck = read_checkpoint(path, map_location="cpu", verify=verify)
    model = build_from_checkpoint(ck, registry=registry)
    model.tokenizer = ck.tokenizer()
    model.checkpoint_path = ck.path
    model.checkpoint_meta = ck.meta
    return model.to(map_location).eval()


def load_training_state(
    path: str | os.PathLike, *, tokenizer: Any = None
) -> tuple[Checkpoint, dict[str, Any], dict[str, Tensor]]:
    """Read a full training checkpoint (weights plus trainer state) for resuming.

    ``tokenizer``: the one the data yields now; it must encode exactly as the checkpoint's
    ``tokenizer.json`` (a corpus whose characters changed at the same count would otherwise
    resume with every id meaning another character)."""
    ck = read_checkpoint(path)
    ts = ck.trainer_state()
    if ts is None:
        raise CheckpointError(f"checkpoint {str(ck.path)!r} holds weights only (no trainer state); "
                              "cannot resume from it")
    if tokenizer is not None:
        check_same_tokenizer(ck, tokenizer)
    return ck, ts[0], ts[1]


def check_same_tokenizer(ck: Checkpoint, tokenizer: Any) -> None:
    """Raise :class:`IncompatibleCheckpointError` when ``tokenizer`` differs from the checkpoint's."""
    theirs = ck.tokenizer()
    if theirs is None or theirs.to_json() == tokenizer.to_json():
        return
    old, new = theirs.to_json(), tokenizer.to_json()
    if old.get("kind") == new.get("kind") == "char":
        gone, added = sorted(set(old["chars"]) - set(new["chars"])), sorted(set(new["chars"]) - set(old["chars"]))
        what = f"characters no longer in the corpus: {gone!r}; new characters: {added!r}"
    else:
        what = f"{old.get('kind')} tokenizer -> {new.get('kind')} tokenizer with other contents"
    raise IncompatibleCheckpointError(
        f"the data now yields another tokenizer than checkpoint {str(ck.path)!r} was trained with ({what}), so "
        "token ids would change meaning; restore the original corpus, or start a new run (another name or --out)"
    )
