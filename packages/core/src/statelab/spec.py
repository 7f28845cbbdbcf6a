"""The run spec: one YAML (or JSON) document that names the data, the model and the run.

Structure (every section has defaults, so ``{}`` is a valid spec)::

    name: quickstart
    seed: 1337
    tokenizer: {kind: char}                      # char | byte | bpe
    data: {kind: text}                           # text (bundled Tiny Shakespeare) | mqar | passkey
    model:
      d_model: 128
      backbone: {kind: mamba, n_layers: 4}       # kind + that component's own params
      memories: [{kind: hebbian, after_layer: 1}]
      planner: null
      regularizers: [{kind: bistability, weight: 0.01}]
    probes: [{kind: causality, internal: kssm.R}]
    train: {steps: 500, batch_size: 32, seq_len: 128}
    tracking: {enabled: true, experiment: statelab}

Validation has two stages. :func:`parse_spec` checks the structure with the models below
(unknown fields are errors). :func:`validate_spec` then resolves every component against
the plugin registry, validates its params with the plugin's own model, and checks the
combination (memory placement, internals needed by regularizers and probes, planner
capabilities). Both raise :class:`SpecError`, whose message lists every problem with its
path in the document.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from statelab.errors import UserError
from statelab.plugins import SLOTS, Component, DuplicateComponentError, Registry, get_registry, unknown_kind_message


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ComponentSpec(BaseModel):
    """A component: ``kind`` plus the component's own params, given inline."""

    model_config = ConfigDict(extra="allow")
    kind: str = Field(description="registered name of the component (see `statelab plugins`)")

    def params_dict(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class MemorySpec(ComponentSpec):
    after_layer: int = Field(description="backbone layer index (0-based) after which the memory runs")


class RegularizerSpec(ComponentSpec):
    weight: float = Field(1.0, ge=0, description="multiplier of this regularizer's loss in the total loss")


class TokenizerSpec(_Strict):
    kind: Literal["char", "byte", "bpe", "hf", "word", "sentencepiece"] = Field(
        "char", description="char: vocabulary from the corpus; byte: 256 ids; bpe: tiktoken ranks; "
        "hf: a HuggingFace tokenizer.json; word: the corpus' most frequent words plus <unk>; "
        "sentencepiece: a SentencePiece model trained on the corpus (or loaded from path)")
    path: str | None = Field(None, description="bpe: path of a .tiktoken ranks file; hf: path of a tokenizer.json; "
                             "sentencepiece: a trained .model file (null = train on the corpus)")
    name: str | None = Field(None, description="bpe: name of a bundled encoding (see `statelab tokenizer list`)")
    vocab_size: int | None = Field(None, ge=2, description="word, sentencepiece (trained): vocabulary size to learn "
                                   "from the corpus")
    model_type: Literal["unigram", "bpe"] = Field("unigram", description="sentencepiece (trained): the algorithm")


class MQARSpec(_Strict):
    vocab_size: int = Field(8192, ge=8, description="vocabulary; keys from the lower half, values from the upper half")
    seq_len: int = Field(256, ge=8, description="tokens per example")
    num_kv_pairs: int = Field(16, ge=1, description="key-value pairs per example")
    power_a: float = Field(0.01, gt=0, description="power-law parameter of the query placement (Zoology's power_a)")
    num_train: int = Field(100_000, ge=1, description="training examples")
    num_val: int = Field(3_000, ge=1, description="validation examples")


class PasskeySpec(_Strict):
    lengths: list[int] = Field(default_factory=lambda: [1024], description="example lengths in tokens")
    depths: list[float] = Field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0], description="key depth as a fraction")
    digits: int = Field(5, ge=1, le=12, description="digits of the pass key")
    mix: float = Field(0.0, ge=0, le=1, description="fraction of training windows drawn from passkey documents when mixed with text")


class DataSpec(_Strict):
    kind: str = Field("text", description="text corpus, MQAR, passkey retrieval, or the name of a registered task "
                      "(see `statelab plugins`), whose data the run then trains on")
    params: dict[str, Any] = Field(default_factory=dict, description="task data: the params of the task that "
                                   "data.kind names (validated by that task)")
    path: str | list[str] | None = Field(
        None, description="text: a UTF-8 corpus file, a folder (its .txt/.md/.jsonl files), a .jsonl file (one "
        "{\"text\": ...} document a line) or a list of these; null = the bundled Tiny Shakespeare")
    val_fraction: float = Field(0.1, gt=0, lt=1, description="text: the last fraction of the corpus is validation")
    cache_dir: str | None = Field(None, description="where tokenized corpora are cached; null = ~/.cache/statelab")
    mqar: MQARSpec = Field(default_factory=MQARSpec, description="MQAR generator settings")
    passkey: PasskeySpec = Field(default_factory=PasskeySpec, description="passkey generator settings")


class ModelSpec(_Strict):
    d_model: int = Field(128, ge=1, description="model width D")
    vocab_size: int | None = Field(None, ge=2, description="null = the tokenizer's vocabulary size")
    tie_embeddings: bool = Field(True, description="share the embedding matrix with the output head")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on embeddings")
    backbone: ComponentSpec = Field(description="the backbone: kind and params")
    memories: list[MemorySpec] = Field(default_factory=list, description="memories and their placement")
    planner: ComponentSpec | None = Field(None, description="optional planner (needs a steerable backbone)")
    regularizers: list[RegularizerSpec] = Field(default_factory=list, description="auxiliary losses with weights")


class PlannerFitSpec(_Strict):
    enabled: bool = Field(True, description="fit the planner after training when the model has one")
    steps: int = Field(200, ge=0, description="optimisation steps for the planner's learned parts")
    batch_size: int = Field(16, ge=1, description="rollout batch size")
    seq_len: int = Field(64, ge=2, description="rollout length")
    lr: float = Field(1e-3, gt=0, description="planner learning rate")


class TrainSpec(_Strict):
    steps: int = Field(1000, ge=0, description="optimizer steps")
    batch_size: int = Field(32, ge=1, description="global batch size (split across data-parallel ranks)")
    seq_len: int = Field(128, ge=1, description="tokens per row per step")
    batching: Literal["random", "stream"] = Field("random", description="random windows, or contiguous streams with carried state (truncated BPTT)")
    lr: float = Field(1e-3, gt=0, description="peak learning rate")
    min_lr: float = Field(1e-4, ge=0, description="learning rate at the end of the cosine decay")
    warmup_steps: int = Field(100, ge=0, description="linear warmup steps")
    decay_steps: int | None = Field(None, ge=1, description="cosine decay length; null = steps")
    weight_decay: float = Field(0.1, ge=0, description="AdamW decay (never on norms, biases, embeddings)")
    beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1")
    beta2: float = Field(0.99, ge=0, lt=1, description="AdamW beta2")
    grad_clip: float = Field(1.0, ge=0, description="max gradient norm; 0 disables")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="auto: bf16 autocast on CUDA, fp32 on CPU")
    compile: bool = Field(False, description="torch.compile the model")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    time_budget_s: float | None = Field(None, gt=0, description="stop after this many seconds since process start: training "
                                         "(with a checkpoint), the planner fit and the probes alike")
    eval_interval: int = Field(200, ge=1, description="evaluate every N steps (and at the end)")
    eval_batches: int | None = Field(20, ge=1, description="validation batches per evaluation; null = the whole split")
    log_interval: int = Field(10, ge=1, description="log training metrics every N steps")
    checkpoint_interval: int = Field(500, ge=1, description="checkpoint every N steps (and at the end)")
    keep_last: int = Field(2, ge=1, description="periodic checkpoints kept")
    sample_tokens: int = Field(200, ge=0, description="tokens sampled at each evaluation (0: none)")
    out_dir: str = Field("runs", description="runs are written to <out_dir>/<name>")
    init_from: str | None = Field(
        None, description="start a new run from these weights: a checkpoint directory, or a run directory (its "
        "best/, else last/); optimizer, schedule and step start afresh, and the spec must build the same model. "
        "Ignored by --resume, which continues from the run's own checkpoint")
    planner_fit: PlannerFitSpec = Field(default_factory=PlannerFitSpec, description="planner fitting after training")
    threads: int | None = Field(
        None, ge=1, description="CPU threads for torch (torch.set_num_threads at run start); null = torch's default "
        "(every core, which is slow on a machine other jobs share)")
    callbacks: list[str] = Field(
        default_factory=list, description="registered training callbacks to use (names from the statelab_callbacks "
        "plugin hook of installed distributions)")


class TrackingSpec(_Strict):
    enabled: bool = Field(True, description="log the run to mlflow")
    uri: str | None = Field(None, description="tracking URI; null = MLFLOW_TRACKING_URI or sqlite:///mlflow.db")
    experiment: str = Field("statelab", description="mlflow experiment name")
    run_name: str | None = Field(None, description="mlflow run name; null = the spec's name")


class RunSpec(_Strict):
    name: str = Field("run", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="run name (a directory name)")
    seed: int = Field(1337, description="seed of every random generator")
    tokenizer: TokenizerSpec = Field(default_factory=TokenizerSpec, description="tokenizer")
    data: DataSpec = Field(default_factory=DataSpec, description="data")
    model: ModelSpec = Field(description="the model")
    probes: list[ComponentSpec] = Field(default_factory=list, description="probes run after training")
    train: TrainSpec = Field(default_factory=TrainSpec, description="training")
    tracking: TrackingSpec = Field(default_factory=TrackingSpec, description="mlflow tracking")


# --------------------------------------------------------------------------------------
# errors


@dataclass
class SpecIssue:
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class SpecError(UserError, ValueError):
    """Every problem found in a spec, each with its path (``model.backbone.d_state``)."""

    def __init__(self, issues: list[SpecIssue], source: str | None = None) -> None:
        self.issues = issues
        self.source = source
        head = f"invalid spec{f' {source}' if source else ''}"
        super().__init__(head + ":\n" + "\n".join(f"  - {i}" for i in issues))


def _loc(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc)


def _pydantic_issues(err: ValidationError, prefix: str = "") -> list[SpecIssue]:
    out = []
    for e in err.errors():
        path = _loc(tuple(e["loc"]))
        if prefix:
            path = f"{prefix}.{path}" if path else prefix
        msg = e["msg"]
        if e["type"] == "value_error" and "error" in e.get("ctx", {}):
            msg = str(e["ctx"]["error"])  # a validator's own message, without pydantic's "Value error, "
        if e["type"] == "extra_forbidden":
            msg = "unknown field (not allowed here)"
        out.append(SpecIssue(path, msg))
    return out


# --------------------------------------------------------------------------------------
# parsing and validation


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with the YAML 1.2 core schema: only ``true``/``false`` are
    booleans and ``1e3`` is a number (YAML 1.1 reads ``no`` as false and ``1e3`` as text)."""


_Yaml12Loader.yaml_implicit_resolvers = {}
for _tag, _pattern, _first in (
    ("bool", r"^(?:true|True|TRUE|false|False|FALSE)$", "tTfF"),
    ("null", r"^(?:~|null|Null|NULL|)$", ["~", "n", "N", ""]),
    ("int", r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$", "-+0123456789"),
    ("float", r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$",
     "-+0123456789."),
):
    import re as _re

    _Yaml12Loader.add_implicit_resolver(f"tag:yaml.org,2002:{_tag}", _re.compile(_pattern), list(_first))


def _construct_int12(loader: yaml.SafeLoader, node: yaml.Node) -> int:
    text = loader.construct_scalar(node)
    if text.startswith("0o"):
        return int(text[2:], 8)
    return int(text, 0) if text.startswith("0x") else int(text, 10)


_Yaml12Loader.add_constructor("tag:yaml.org,2002:int", _construct_int12)


def load_yaml(text: str) -> Any:
    """Parse YAML text with the YAML 1.2 core schema (specs, ``--set`` and ``--param`` values)."""
    return yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 - a SafeLoader subclass


def parse_value(raw: str, what: str) -> Any:
    """A ``--set``/``--param`` value: YAML 1.2 (``no`` is text, ``1e3`` a number, ``[1, 2]`` a
    list); refused with a quoting hint when it is not valid YAML."""
    if raw == "":
        return None
    try:
        return load_yaml(raw)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpecError([SpecIssue(what, f"cannot read the value {raw!r} ({problem}); to pass it as text, quote it "
                                   f"inside the shell quotes: {what}='\"{raw}\"'")]) from None


def apply_overrides(doc: dict[str, Any], overrides: Any) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides (values read by :func:`parse_value`) to a copy of a
    spec document. ``probes.0.kind=x`` edits a list item; the index one past the end appends."""
    import copy

    doc = copy.deepcopy(doc)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or "" in key.split("."):
            raise SpecError([SpecIssue("--set", f"{item!r} is not key=value (e.g. --set train.steps=100)")])
        value = parse_value(raw, f"--set {key}")
        parts = key.split(".")
        node: Any = doc
        for i, part in enumerate(parts):
            here = ".".join(parts[: i + 1])
            last = i == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) > len(node):
                    raise SpecError([SpecIssue(f"--set {key}", f"{'.'.join(parts[:i]) or 'the spec'} is a list of "
                                               f"{len(node)}; {part!r} is not an index 0..{len(node)} (the last appends)")])
                idx = int(part)
                if idx == len(node):
                    node.append(value if last else ([] if parts[i + 1].isdigit() else {}))
                elif last:
                    node[idx] = value
                node = node[idx]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                elif node.get(part) is None:
                    node[part] = [] if parts[i + 1].isdigit() else {}
                node = node[part]
            else:
                raise SpecError([SpecIssue(f"--set {key}", f"{'.'.join(parts[:i])} is {node!r}, not a mapping or list, "
                                           f"so it has no field {here.rsplit('.', 1)[-1]!r}")])
    return doc


def load_document(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON spec file into a dict, with clear errors for bad files."""
    p = Path(path)
    if not p.is_file():
        raise SpecError([SpecIssue("", f"spec file {str(p)!r} does not exist")])
    text = p.read_text(encoding="utf-8")
    try:
        doc = json.loads(text) if p.suffix == ".json" else load_yaml(text)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise SpecError([SpecIssue("", f"cannot parse {p.name}: {exc}")], str(p)) from None
    if not isinstance(doc, dict):
        raise SpecError([SpecIssue("", "the spec must be a mapping at the top level")], str(p))
    return doc


def parse_spec(doc: dict[str, Any] | RunSpec | str | Path, *, source: str | None = None) -> RunSpec:
    """Structural validation only (no plugins consulted)."""
    if isinstance(doc, RunSpec):
        return doc
    if isinstance(doc, (str, Path)):
        source = source or str(doc)
        doc = load_document(doc)
    try:
        return RunSpec.model_validate(doc)
    except ValidationError as err:
        raise SpecError(_pydantic_issues(err), source) from None


@dataclass
class ResolvedComponent:
    """A spec component matched to its registered :class:`Component` and validated params."""

    path: str
    spec: ComponentSpec
    component: Component
    params: BaseModel


@dataclass
class ResolvedSpec:
    spec: RunSpec
    backbone: ResolvedComponent
    memories: list[ResolvedComponent] = field(default_factory=list)
    planner: ResolvedComponent | None = None
    regularizers: list[ResolvedComponent] = field(default_factory=list)
    probes: list[ResolvedComponent] = field(default_factory=list)
    #: settings that will run but probably not as intended (`statelab validate` and `train` print them)
    warnings: list[SpecIssue] = field(default_factory=list)

    def all(self) -> list[ResolvedComponent]:
        out = [self.backbone, *self.memories]
        if self.planner:
            out.append(self.planner)
        return out + self.regularizers + self.probes

    def internals(self) -> dict[str, list[str]]:
        """Internal name -> paths of the components that publish it."""
        table: dict[str, list[str]] = {}
        for rc in [self.backbone, *self.memories, *([self.planner] if self.planner else [])]:
            for name in rc.component.published(rc.params):
                table.setdefault(name, []).append(rc.path)
        return table

    def distributions(self) -> dict[str, str]:
        return {rc.component.distribution: rc.component.version for rc in self.all()}


def _resolve(
    registry: Registry, slot: str, cs: ComponentSpec, path: str, issues: list[SpecIssue], strip: tuple[str, ...] = (),
    context: dict[str, Any] | None = None,
) -> ResolvedComponent | None:
    try:
        comp = registry.get(slot, cs.kind)
    except DuplicateComponentError as exc:
        issues.append(SpecIssue(f"{path}.kind", str(exc)))
        return None
    except KeyError:
        issues.append(SpecIssue(f"{path}.kind", unknown_kind_message(registry, slot, cs.kind)))
        return None
    raw = {k: v for k, v in cs.params_dict().items() if k not in strip}
    try:
        params = comp.params.model_validate(raw, context=context)
    except ValidationError as err:
        issues.extend(_pydantic_issues(err, path))
        return None
    return ResolvedComponent(path, cs, comp, params)


def validate_spec(
    doc: dict[str, Any] | RunSpec | str | Path, registry: Registry | None = None, *, source: str | None = None
) -> ResolvedSpec:
    """Full validation: structure, every component's params, and the combination."""
    if isinstance(doc, (str, Path)) and source is None:
        source = str(doc)
    spec = parse_spec(doc, source=source)
    registry = registry or get_registry()
    issues: list[SpecIssue] = []
    m = spec.model
    ctx = validation_context(spec)
    backbone = _resolve(registry, "backbone", m.backbone, "model.backbone", issues, context=ctx)
    memories = [_resolve(registry, "memory", ms, f"model.memories.{i}", issues, context=ctx)
                for i, ms in enumerate(m.memories)]
    planner = _resolve(registry, "planner", m.planner, "model.planner", issues, context=ctx) if m.planner else None
    regs = [_resolve(registry, "regularizer", rs, f"model.regularizers.{i}", issues, context=ctx)
            for i, rs in enumerate(m.regularizers)]
    probes = [_resolve(registry, "probe", ps, f"probes.{i}", issues, context=ctx) for i, ps in enumerate(spec.probes)]
    _check_data_task(registry, spec, issues)

    if backbone is not None:
        n_layers = getattr(backbone.params, "n_layers", None)
        if n_layers is None:
            issues.append(
                SpecIssue("model.backbone", f"backbone {backbone.component.name!r} params have no n_layers field; "
                          "its plugin must declare one so memories can be placed")
            )
        else:
            for i, ms in enumerate(m.memories):
                if not 0 <= ms.after_layer < n_layers:
                    issues.append(
                        SpecIssue(
                            f"model.memories.{i}.after_layer",
                            f"after_layer {ms.after_layer} is outside the backbone's layers 0..{n_layers - 1}",
                        )
                    )
        if planner is not None:
            missing = planner.component.needs - backbone.component.capabilities
            if missing:
                issues.append(
                    SpecIssue(
                        "model.planner",
                        f"planner {planner.component.name!r} needs a backbone with {', '.join(sorted(missing))}, "
                        f"but backbone {backbone.component.name!r} does not provide it; use a steerable backbone "
                        f"(one with injectable state, such as 'mamba') or remove the planner",
                    )
                )

    resolved = None
    if backbone is not None and None not in memories and (planner is not None or m.planner is None):
        resolved = ResolvedSpec(spec, backbone, [x for x in memories if x], planner)
        published = resolved.internals()
        for group in (regs, probes):
            for rc in group:
                if rc is None:
                    continue
                for need in rc.component.required(rc.params):
                    if need not in published:
                        have = ", ".join(sorted(published)) or "(none)"
                        issues.append(
                            SpecIssue(
                                rc.path,
                                f"{rc.component.slot} {rc.component.name!r} needs internal {need!r}, which no component "
                                f"of this model publishes (published: {have})",
                            )
                        )
    if issues:
        raise SpecError(issues, source)
    assert resolved is not None
    resolved.regularizers = [r for r in regs if r]
    resolved.probes = [p for p in probes if p]
    resolved.warnings = _run_warnings(resolved)
    return resolved


#: data kinds built into statelab.data; any other data.kind names a registered task
BUILTIN_DATA_KINDS = ("text", "mqar", "passkey")


def uses_builtin_data(data: DataSpec, registry: Registry | None = None) -> bool:
    """Whether ``data`` is a built-in data kind rather than a task's data: a built-in kind
    unless ``data.params`` is given and a task of the same name is registered (the ``passkey``
    task's needle documents against the built-in Landmark ``passkey`` data)."""
    if data.kind not in BUILTIN_DATA_KINDS:
        return False
    return not data.params or ("task", data.kind) not in (registry or get_registry())


def _check_data_task(registry: Registry, spec: RunSpec, issues: list[SpecIssue]) -> None:
    d = spec.data
    if uses_builtin_data(d, registry):
        if d.params:
            issues.append(SpecIssue("data.params", f"data kind {d.kind!r} is built in and takes no data.params (they "
                                    "are the params of a task kind); remove data.params"))
        return
    if ("task", d.kind) not in registry:
        tasks = registry.names("task")
        issues.append(SpecIssue("data.kind", f"unknown data kind {d.kind!r}; built in: {', '.join(BUILTIN_DATA_KINDS)}; "
                                f"installed tasks: {', '.join(tasks) if tasks else '(none)'}"))
        return
    comp = registry.get("task", d.kind)
    try:
        comp.params.model_validate(d.params, context=validation_context(spec))
    except ValidationError as err:
        issues.extend(_pydantic_issues(err, "data.params"))


def validation_context(spec: RunSpec) -> dict[str, Any]:
    """What a component's params validators may check against (pydantic validation context,
    ``info.context`` in a ``model_validator``): ``d_model``, ``vocab_size`` (``None``: the
    tokenizer's) and the ``tokenizer`` and ``data`` kinds. A component refuses params that
    cannot build at this width, so `statelab validate` catches what would fail later."""
    return {"d_model": spec.model.d_model, "vocab_size": spec.model.vocab_size, "tokenizer": spec.tokenizer.kind,
            "data": spec.data.kind}


def _tokenizer_vocab_size(spec: RunSpec) -> int | None:
    """The vocabulary the spec's tokenizer and data yield (``char`` reads the corpus, cached);
    ``None`` when the data cannot be read, which the trainer reports in its own words."""
    from statelab.data import corpus_vocab_size

    try:
        return corpus_vocab_size(spec)
    except Exception:  # noqa: BLE001 - a missing corpus or ranks file is reported when the data loads
        return None


def check_data_fit(spec: RunSpec) -> None:
    """Raise :class:`SpecError` when the model cannot take the data's tokens (an explicit
    ``model.vocab_size`` below the tokenizer's). Separate from :func:`validate_spec`, which
    also validates specs built without data (tests, ``build(spec, vocab_size=...)``);
    `statelab validate` and `statelab train` run both."""
    vocab = _tokenizer_vocab_size(spec) if spec.model.vocab_size is not None else None
    if vocab is not None and spec.model.vocab_size < vocab:  # type: ignore[operator]
        raise SpecError([SpecIssue("model.vocab_size", f"{spec.model.vocab_size} is smaller than the {vocab} tokens the "
                                   f"{spec.data.kind} data yields; remove model.vocab_size (null = the tokenizer's) or "
                                   "raise it")])


#: Runs shorter than this many steps are smoke runs: probes after them draw a warning.
_SHORT_RUN_STEPS = 50


def _run_warnings(resolved: ResolvedSpec) -> list[SpecIssue]:
    spec, out = resolved.spec, []
    t = spec.train
    if t.steps == 0 and not t.init_from:
        out.append(SpecIssue("train.steps", "0 steps trains nothing (the planner fit and probes still run on the "
                             "untrained model); set train.steps >= 1, or use `statelab eval/probe` on a checkpoint"))
    decay = t.decay_steps or t.steps
    if t.steps and t.warmup_steps >= t.steps:
        out.append(SpecIssue("train.warmup_steps", f"{t.warmup_steps} warmup steps for a {t.steps}-step run: the "
                             f"learning rate never reaches train.lr ({t.lr:g}); set warmup_steps below steps"))
    elif t.steps and t.warmup_steps >= decay:
        out.append(SpecIssue("train.warmup_steps", f"warmup ({t.warmup_steps}) is not shorter than decay_steps ({decay})"))
    if resolved.planner is not None and t.planner_fit.enabled and t.planner_fit.steps > max(t.steps, 1):
        out.append(SpecIssue("train.planner_fit.steps", f"the planner fit ({t.planner_fit.steps} steps) after "
                             f"training is longer than the training ({t.steps} steps); lower train.planner_fit.steps "
                             "or set train.planner_fit.enabled: false for a short run"))
    if resolved.probes and 0 < t.steps < _SHORT_RUN_STEPS:
        out.append(SpecIssue("probes", f"{len(resolved.probes)} probe(s) run after a {t.steps}-step run and may take "
                             "longer than it; drop them for a smoke run and use `statelab probe CKPT --probe KIND` later"))
    return out


# --------------------------------------------------------------------------------------
# JSON schema


def _component_union(registry: Registry, slot: str, extra: dict[str, Any]) -> Any:
    variants = []
    for name in registry.names(slot):
        comp = registry.get(slot, name)
        fields: dict[str, Any] = {"kind": (Literal[name], Field(description=comp.description or name))}  # type: ignore[valid-type]
        fields.update(extra)
        variants.append(
            create_model(  # type: ignore[call-overload]
                f"{slot.title()}_{name.replace('-', '_')}",
                __base__=comp.params,
                __config__=None,
                **fields,
            )
        )
    if not variants:
        return ComponentSpec
    return Union[tuple(variants)] if len(variants) > 1 else variants[0]  # type: ignore[return-value]


def json_schema(registry: Registry | None = None) -> dict[str, Any]:
    """JSON schema of the whole spec with every installed component's params, for editors."""
    registry = registry or get_registry()
    bb = _component_union(registry, "backbone", {})
    mem = _component_union(registry, "memory", {"after_layer": (int, Field(description=MemorySpec.model_fields["after_layer"].description))})
    pl = _component_union(registry, "planner", {})
    reg = _component_union(registry, "regularizer", {"weight": (float, Field(1.0, ge=0, description="loss weight"))})
    pr = _component_union(registry, "probe", {})
    Model = create_model(
        "ModelSpec",
        __base__=ModelSpec,
        backbone=(bb, Field(description="the backbone: kind and params")),
        memories=(list[mem], Field(default_factory=list, description="memories and their placement")),  # type: ignore[valid-type]
        planner=(pl | None, Field(None, description="optional planner")),  # type: ignore[operator]
        regularizers=(list[reg], Field(default_factory=list, description="auxiliary losses")),  # type: ignore[valid-type]
    )
    Run = create_model(
        "RunSpec",
        __base__=RunSpec,
        model=(Model, Field(description="the model")),
        probes=(list[pr], Field(default_factory=list, description="probes run after training")),  # type: ignore[valid-type]
    )
    schema = Run.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "statelab run spec"
    return schema


def dump_spec(spec: RunSpec) -> dict[str, Any]:
    """The spec as a plain dict (component params inline), round-trippable through parse_spec."""
    return spec.model_dump(mode="json", exclude_none=False)


def flatten(doc: Any, prefix: str = "") -> dict[str, str]:
    """``{"model": {"d_model": 64}}`` -> ``{"model.d_model": "64"}`` (mlflow params)."""
    out: dict[str, str] = {}
    if isinstance(doc, dict):
        for k, v in doc.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(doc, list):
        if not doc:
            out[prefix] = "[]"
        for i, v in enumerate(doc):
            out.update(flatten(v, f"{prefix}.{i}"))
    else:
        out[prefix] = "null" if doc is None else str(doc)
    return out


__all__ = [
    "ComponentSpec",
    "DataSpec",
    "MemorySpec",
    "ModelSpec",
    "RegularizerSpec",
    "ResolvedComponent",
    "ResolvedSpec",
    "RunSpec",
    "SLOTS",
    "SpecError",
    "SpecIssue",
    "TokenizerSpec",
    "TrackingSpec",
    "TrainSpec",
    "dump_spec",
    "flatten",
    "json_schema",
    "apply_overrides",
    "check_data_fit",
    "load_document",
    "load_yaml",
    "parse_value",
    "parse_spec",
    "validate_spec",
    "validation_context",
]


# --------------------------------------------------------------------------------------
# reference documentation


def _type_name(a: Any) -> str:
    import types
    import typing

    origin = typing.get_origin(a)
    if origin is Literal:
        return " or ".join(repr(x) for x in typing.get_args(a))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(x) for x in typing.get_args(a))
    if origin in (list, tuple, dict):
        return f"{origin.__name__}[{', '.join(_type_name(x) for x in typing.get_args(a))}]"
    return "null" if a is type(None) else getattr(a, "__name__", str(a))


def _md_fields(model: type[BaseModel], skip: tuple[str, ...] = ()) -> list[str]:
    rows = ["| field | type | default | description |", "| --- | --- | --- | --- |"]
    for name, f in model.model_fields.items():
        if name in skip:
            continue
        ann = _type_name(f.annotation)
        if f.is_required():
            default = "required"
        elif f.default_factory is not None:
            default = "(see below)" if isinstance(f.default_factory, type) else f"`{f.default_factory()!r}`"
        else:
            default = f"`{f.default!r}`"
        desc = (f.description or "").replace("|", "\\|")
        rows.append(f"| `{name}` | `{ann}` | {default} | {desc} |".replace("`(see below)`", "(see below)"))
    return rows


def markdown_reference(registry: Registry | None = None) -> str:
    """The spec reference (docs/spec.md), generated from the same models as the JSON schema."""
    registry = registry or get_registry()
    out = [
        "# Run spec reference",
        "",
        "Generated by `statelab schema --markdown` from the installed plugins; do not edit by hand.",
        "`statelab schema` prints the same information as JSON schema for editors.",
        "",
    ]
    sections = [
        ("top level", RunSpec, ("tokenizer", "data", "model", "train", "tracking", "probes")),
        ("tokenizer", TokenizerSpec, ()),
        ("data", DataSpec, ("mqar", "passkey")),
        ("data.mqar", MQARSpec, ()),
        ("data.passkey", PasskeySpec, ()),
        ("model", ModelSpec, ()),
        ("train", TrainSpec, ("planner_fit",)),
        ("train.planner_fit", PlannerFitSpec, ()),
        ("tracking", TrackingSpec, ()),
    ]
    for title, model, skip in sections:
        out += [f"## `{title}`", "", *_md_fields(model, skip), ""]
    out += [
        "Memories also take `after_layer` (0-based backbone layer); regularizers take `weight`.",
        "",
    ]
    for slot in SLOTS:
        names = registry.names(slot)
        out += [f"## {slot} kinds", ""]
        if not names:
            out += ["(none installed)", ""]
        for name in names:
            comp = registry.get(slot, name)
            out += [f"### `{slot}: {name}` ({comp.distribution})", "", comp.description, "", *_md_fields(comp.params), ""]
    return "\n".join(out).rstrip() + "\n"
