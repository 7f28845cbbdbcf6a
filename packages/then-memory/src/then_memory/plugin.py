"""Registration of then-memory's components (cheap to import: no model code is loaded here).

Components
----------
* memory ``then``: hybrid attention (local window + top-k traces from a trace store),
  merged by a learned gate; publishes ``memory.gate`` and ``memory.recall``.
* probe ``passkey``: the Landmark-attention passkey protocol in ingest-then-query mode.
* tasks ``fact-qa``, ``personality``, ``user-log``: train on fact documents, evaluate
  ingest-then-query with held-out templates (see :mod:`then_memory.tasks`).

Commands
--------
* ``statelab memory ingest|query|wipe``: per-user memory (see :mod:`then_memory.cli`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, model_validator

from statelab.plugins import Command, Component, hookimpl

STATELAB_PLUGIN_API = 1


class ThenParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n_heads: int = Field(4, ge=1, description="attention heads; d_model must be divisible by it")
    chunk_size: int = Field(16, ge=1, description="tokens per chunk; traces are written when a chunk completes")
    trace_mode: Literal["token", "pooled"] = Field(
        "token", description="token: one trace per token of a completed chunk; pooled: one mean trace per chunk"
    )
    window: int = Field(32, ge=1, description="local causal attention window in tokens (>= chunk_size)")
    ring_size: int = Field(256, ge=1, description="traces kept in the in-model ring (the hot tier used in training)")
    top_k: int = Field(16, ge=1, description="traces each position attends to (top-k by inner product)")
    gate_bias: float = Field(0.0, description="initial bias of the trace/local gate (sigmoid; 0 = half and half)")
    recall_temperature: float = Field(4.0, gt=0, description="initial multiplier of the trace-attention logits "
                                      "(learned per head); sharp reads make the retrieved value dominate early")
    tie_qk_init: bool = Field(True, description="initialise the key projection as a copy of the query projection, so "
                              "a query first retrieves traces written in the same context (the lookup exists at step 0)")
    supersede_cos: float | None = Field(
        None, ge=-1, le=1, description="newer traces win: among a query's top-k traces, one whose key has cosine >= this "
        "with a newer one's is not read (an updated fact replaces the old one instead of blending with it); null = off")
    trace_key: Literal["previous", "self"] = Field(
        "previous", description="previous: a token's trace is (key of the token before it, its own value), so a query "
        "retrieves what followed its context (induction-style lookup); self: key and value of the same token")

    @model_validator(mode="after")
    def _window_covers_chunk(self, info: ValidationInfo) -> "ThenParams":
        if self.window < self.chunk_size:
            raise ValueError(
                f"window ({self.window}) must be >= chunk_size ({self.chunk_size}): the tokens of an unfinished "
                "chunk are kept in the local window until the chunk's traces are written"
            )
        d_model = (info.context or {}).get("d_model")  # the model width, passed by statelab.spec
        if d_model is not None and d_model % self.n_heads:
            raise ValueError(f"n_heads={self.n_heads} does not divide d_model={d_model}; pick a divisor of {d_model}")
        return self


class PasskeyParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lengths: list[int] = Field(default_factory=lambda: [1024, 2048, 4096, 8192, 10240, 16384],
                               description="document lengths in tokens (ingested before the question)")
    depths: list[float] = Field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0],
                                description="depth of the key line as a fraction of the document")
    trials: int = Field(50, ge=1, description="trials per (length, depth) cell")
    digits: int = Field(5, ge=1, le=12, description="digits of the pass key")
    segment_len: int = Field(512, ge=1, description="tokens per forward pass while ingesting the document")
    batch_size: int = Field(8, ge=1, description="trials run together (batch rows)")
    mode: Literal["ingest", "context"] = Field(
        "ingest", description="ingest: key only in ingested memory (the question starts from the carried state); "
        "context: question appended to the document in one pass (baseline)")
    ring_size: int | None = Field(
        None, ge=1, description="traces readable per trial: null = every trace of the longest document (the ring of "
        "each `then` memory is enlarged for the probe, which then reads exactly what a store-backed memory reads); "
        "an int = that ring size")
    pass_threshold: float = Field(0.95, ge=0, le=1, description="accuracy needed at pass_length for passed=True")
    pass_length: int = Field(10240, ge=1, description="length at which pass_threshold is judged (nearest tested)")


class FactQAParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_facts: int = Field(4, ge=1, le=12, description="facts per document: 1 to max_facts")
    filler: tuple[int, int] = Field((40, 160), description="characters of Tiny Shakespeare around each statement "
                                    "(min, max)")
    update_p: float = Field(0.3, ge=0, le=1, description="chance that a document updates one fact (the answer is "
                            "the new value)")
    pref_fraction: float = Field(0.2, ge=0, le=1, description="training rows that are preference documents")
    loss_on: Literal["answers", "values", "all"] = Field(
        "answers", description="answers: loss on the answer lines and the end-of-answer marker; values: on the "
        "answer's value and what ends it ('.' and the marker); all: every token")
    eval_docs: int = Field(100, ge=1, description="documents evaluated (held-out templates)")


class PersonalityParams(FactQAParams):
    gap: int = Field(600, ge=0, description="characters of real text between the preferences and the questions "
                     "at evaluation")


class UserLogParams(FactQAParams):
    users: int = Field(3, ge=2, le=20, description="users interleaved in one log at evaluation")
    lines: int = Field(40, ge=0, description="noise lines (chatter, quoted text, with typos) per log")
    eval_docs: int = Field(30, ge=1, description="logs evaluated (each gives one document per user)")


def _then_publishes(params: ThenParams) -> list[str]:
    return ["memory.gate", "memory.recall"]


@hookimpl
def statelab_components() -> list[Component]:
    return [
        Component(
            "memory", "then", ThenParams, "then_memory.memory:build_then",
            "hybrid attention: local window + top-k traces from a bounded trace store, gated",
            publishes=_then_publishes,
        ),
        Component(
            "probe", "passkey", PasskeyParams, "then_memory.passkey:build_passkey",
            "passkey retrieval (Landmark protocol) in ingest-then-query mode: accuracy table + heatmap",
        ),
        Component(
            "task", "fact-qa", FactQAParams, "then_memory.tasks:build_fact_qa",
            "facts ingested, then asked with held-out templates (updates: the newest value); no-memory ablation",
        ),
        Component(
            "task", "personality", PersonalityParams, "then_memory.tasks:build_personality",
            "preferences stated early, probed after real text (held-out templates)",
        ),
        Component(
            "task", "user-log", UserLogParams, "then_memory.tasks:build_user_log",
            "noisy interleaved chat logs of several users: each user's facts from their own memory; leak rate",
        ),
    ]


@hookimpl
def statelab_commands() -> list[Command]:
    return [Command("memory", "per-user live memory: ingest files, query, wipe", "then_memory.cli:configure",
                    "then_memory.cli:run")]
