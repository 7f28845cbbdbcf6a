"""statelab-core's own components: the benchmark tasks and the ``ablate`` probe.

Registered through the ``statelab`` entry-point group (``statelab-core =
"statelab.builtin"`` in core's pyproject), exactly like a plugin's components, so
``STATELAB_PLUGINS`` selects them like any other. Cheap to import: params models and
registration only; the tasks live in :mod:`statelab.tasks`, the probe in :mod:`statelab.ablate`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from statelab.plugins import PLUGIN_API_VERSION, Component, hookimpl

STATELAB_PLUGIN_API = PLUGIN_API_VERSION


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LMParams(_Params):
    path: str | list[str] | None = Field(
        None, description="corpus: a UTF-8 file, a folder of .txt files, a .jsonl file (one {\"text\": ...} document a "
        "line) or a list of these; null = the spec's data.path (default: bundled Tiny Shakespeare)")
    val_fraction: float | None = Field(None, gt=0, lt=1, description="held-out fraction; null = the spec's")
    seq_len: int | None = Field(None, ge=1, description="evaluation window in tokens; null = train.seq_len")
    eval_batch_size: int = Field(16, ge=1, description="windows per evaluation batch")
    eval_batches: int | None = Field(None, ge=1, description="evaluation batches; null = the whole held-out split")


class MQARParams(_Params):
    vocab_size: int = Field(8192, ge=8, description="vocabulary (Zoology: 8192)")
    seq_len: int = Field(64, ge=8, description="tokens per example (Zoology cells: 64, 128, 256, 512)")
    num_kv_pairs: int = Field(4, ge=1, description="key-value pairs (Zoology cells: 4, 8, 16, 64)")
    power_a: float = Field(0.01, gt=0, description="power law of the query placement")
    num_train: int = Field(100_000, ge=1, description="training examples (Zoology: 100,000)")
    num_val: int = Field(3_000, ge=1, description="validation examples (Zoology: 3,000)")
    eval_batch_size: int = Field(256, ge=1, description="examples per evaluation batch")
    early_stop: float | None = Field(0.99, gt=0, le=1, description="statelab bench stops training once validation "
                                     "accuracy reaches this (Zoology: 0.99); null = never")


class PasskeyParams(_Params):
    filler: Literal["landmark", "text"] = Field(
        "landmark", description="landmark: the repeated grass/sky/sun sentence; text: real text drawn from a corpus "
        "(RULER S-NIAH style haystack)")
    corpus: str | None = Field(None, description="text filler: UTF-8 corpus file; null = bundled Tiny Shakespeare")
    keys: int = Field(1, ge=1, le=16, description="keys hidden per document; the question asks for one of them")
    digits: int = Field(5, ge=1, le=12, description="digits per key")
    train_len: int = Field(256, ge=16, description="training document length in tokens (train.seq_len + 1)")
    lengths: list[int] = Field(default_factory=lambda: [256], description="evaluation lengths in tokens")
    depths: list[float] = Field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0],
                                description="evaluation depths of the asked key, as a fraction of the haystack")
    per_cell: int = Field(8, ge=1, description="evaluation documents per (length, depth)")


class CopyParams(_Params):
    vocab_size: int = Field(16, ge=3, description="ids: 0 noise, 1 separator, 2.. data tokens")
    context_len: int = Field(32, ge=1, description="positions holding the data tokens among noise")
    num_tokens: int = Field(8, ge=1, description="data tokens to copy")
    num_train: int = Field(50_000, ge=1, description="training examples")
    num_val: int = Field(512, ge=1, description="validation examples")
    eval_batch_size: int = Field(128, ge=1, description="examples per evaluation batch")


class InductionParams(_Params):
    vocab_size: int = Field(16, ge=3, description="ids: 0 the trigger, 1.. ordinary tokens")
    seq_len: int = Field(32, ge=4, description="tokens per example")
    num_train: int = Field(50_000, ge=1, description="training examples")
    num_val: int = Field(512, ge=1, description="validation examples")
    eval_batch_size: int = Field(128, ge=1, description="examples per evaluation batch")


class AblateParams(_Params):
    internal: str = Field(description="internal to ablate: a bare name (every site) or '<site>:<name>'")
    modes: list[Literal["mean", "zero", "shuffle-positions", "shuffle-rows"]] = Field(
        default_factory=lambda: ["mean", "zero", "shuffle-positions", "shuffle-rows"], description="ablations to run")
    batches: int = Field(8, ge=2, description="validation batches (the interval is over batches)")
    batch_size: int = Field(8, ge=2, description="rows per batch")
    seq_len: int | None = Field(None, ge=1, description="tokens per row; null = train.seq_len")
    null: bool = Field(True, description="also ablate an untrained model of the same spec (the null)")


def _ablate(params: AblateParams, ctx):
    from statelab.ablate import AblateProbe

    return AblateProbe(params)


@hookimpl
def statelab_components() -> list[Component]:
    return [
        Component("task", "lm", LMParams, "statelab.tasks.lm:build_lm",
                  "held-out text: bits per byte and character, loss"),
        Component("task", "mqar", MQARParams, "statelab.tasks.mqar:build_mqar",
                  "multi-query associative recall (Zoology protocol), accuracy and state bytes"),
        Component("task", "passkey", PasskeyParams, "statelab.tasks.passkey:build_passkey",
                  "passkey retrieval in Landmark or real-text filler, one or several keys, length x depth grid"),
        Component("task", "copy", CopyParams, "statelab.tasks.synthetic:build_copy", "selective copying"),
        Component("task", "induction", InductionParams, "statelab.tasks.synthetic:build_induction",
                  "induction: after 'T v ... T' predict v"),
        Component("probe", "ablate", AblateParams, _ablate,
                  "loss change when an internal is set to its mean, zeroed or shuffled, next to an untrained model"),
    ]
