"""``statelab import-hf DIR -o RUN``: a local HuggingFace Mamba / Mamba-2 folder as a statelab run.

``DIR`` is what ``save_pretrained`` writes (``config.json``, ``model.safetensors`` or its
shards, and ``tokenizer.json``); nothing is downloaded. ``RUN`` becomes a run directory
holding a normal checkpoint, ``RUN/best``: weights mapped by :mod:`crsm_planner.hf_compat`,
a spec mirroring the HF config (``RUN/spec.yaml``), and the HF tokenizer as the core ``hf``
tokenizer kind. So ``statelab generate/eval/probe RUN`` and ``statelab train SPEC --set
train.init_from=RUN`` work on it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any


def configure(parser) -> None:
    parser.add_argument("directory", help="local HF model folder (save_pretrained output)")
    parser.add_argument("-o", "--output", required=True, help="run directory to create (the checkpoint is RUN/best)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer.json to use (default: DIR/tokenizer.json)")
    parser.add_argument("--corpus", default=None,
                        help="text corpus the spec's data section names, for eval/probe/fine-tuning "
                        "(default: the bundled Tiny Shakespeare)")


def _fail(message: str):
    from statelab.errors import UserError

    raise UserError(message)


def read_hf_weights(directory: Path) -> dict[str, Any]:
    """The state dict of a ``save_pretrained`` folder: safetensors only (no pickle), sharded or not."""
    from safetensors.torch import load_file

    single = directory / "model.safetensors"
    if single.is_file():
        return load_file(str(single))
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        out: dict[str, Any] = {}
        for shard in shards:
            out.update(load_file(str(directory / shard)))
        return out
    if (directory / "pytorch_model.bin").exists():
        _fail(f"{directory} holds pytorch_model.bin, a pickle, which statelab does not load; re-save the model with "
              "`model.save_pretrained(DIR, safe_serialization=True)` to get model.safetensors")
    _fail(f"{directory} has no model.safetensors (nor a sharded model.safetensors.index.json)")


def hf_spec(config: Any, name: str, tokenizer_path: Path, corpus: str | None) -> dict[str, Any]:
    """A run spec mirroring a HF ``MambaConfig``/``Mamba2Config`` (as an attribute namespace)."""
    from crsm_planner.hf_compat import params_from_hf_config

    try:
        params, d_model, vocab = params_from_hf_config(config)
    except (ValueError, AttributeError) as exc:
        _fail(f"config.json cannot be mapped onto the mamba backbone: {exc}")
    backbone = {"kind": "mamba", **params.model_dump(mode="json", include=params.model_fields_set)}
    return {
        "name": name,
        "tokenizer": {"kind": "hf", "path": str(tokenizer_path)},
        "data": {"kind": "text", "path": corpus},
        "model": {"d_model": d_model, "vocab_size": vocab,
                  "tie_embeddings": bool(getattr(config, "tie_word_embeddings", True)), "backbone": backbone},
        "tracking": {"enabled": False},
    }


def run(args) -> int:
    import shutil

    import yaml

    import statelab
    from statelab import checkpoint as ckpt
    from statelab.io import atomic_write_text
    from statelab.spec import validate_spec
    from statelab.tokenizers import load_hf

    from crsm_planner.hf_compat import load_hf_into_model

    src, out = Path(args.directory), Path(args.output)
    if not (src / "config.json").is_file():
        _fail(f"{src} has no config.json: give the folder `save_pretrained` wrote")
    if out.exists() and any(out.iterdir()):
        _fail(f"{out} exists and is not empty; choose a new run directory")
    config = SimpleNamespace(**json.loads((src / "config.json").read_text()))
    tok_src = Path(args.tokenizer) if args.tokenizer else src / "tokenizer.json"
    if not tok_src.is_file():
        _fail(f"no tokenizer at {tok_src}; pass --tokenizer FILE (a HuggingFace tokenizer.json)")
    name = "".join(c if c.isalnum() or c in "._-" else "-" for c in out.resolve().name).lstrip("._-") or "imported"
    out.mkdir(parents=True, exist_ok=True)
    tok_path = (out / "tokenizer.json").resolve()
    shutil.copyfile(tok_src, tok_path)
    tokenizer = load_hf(tok_path)
    doc = hf_spec(config, name, tok_path, str(Path(args.corpus).resolve()) if args.corpus else None)
    doc["train"] = {"out_dir": str(out.resolve().parent)}
    if tokenizer.vocab_size > doc["model"]["vocab_size"]:
        _fail(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {doc['model']['vocab_size']}")
    resolved = validate_spec(doc)
    model = statelab.build(resolved, vocab_size=doc["model"]["vocab_size"])
    try:
        load_hf_into_model(model, read_hf_weights(src))
    except (KeyError, ValueError) as exc:
        _fail(f"the weights in {src} do not match its config.json: {exc}")
    ckpt.save(out / "best", model, tokenizer=tokenizer)
    atomic_write_text(out / "spec.yaml", yaml.safe_dump(doc, sort_keys=False))
    print(f"imported {config.model_type} ({model.num_parameters():,} parameters, vocabulary {tokenizer.vocab_size}) "
          f"to {out}; try `statelab generate {out} --prompt ...`, or fine-tune with "
          f"`statelab train {out / 'spec.yaml'} --set name=NEW --set train.init_from={out}`", file=sys.stderr)
    return 0
