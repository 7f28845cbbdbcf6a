"""Benchmark tasks of then-memory (the ``task`` slot): fact QA, personality, noisy user logs.

All three train on the same data, :class:`FactDocsData`: each row is one document of
:mod:`then_memory.facts` (training templates) that ends exactly at the row's end, preceded
by Tiny Shakespeare to fill the row; the loss counts the answer lines (``A: ...`` and the
end-of-answer marker) or, with ``loss_on: all``, every token. They differ in what
:meth:`evaluate` asks, always in ingest-then-query mode (:mod:`then_memory.factqa`: the
context is ingested, each question asked from the carried state, greedy until the marker)
with held-out templates, next to the no-memory ablation (trace read-out forced to zero):

* ``fact-qa``: 1-4 facts per document with real-text filler, updates in some documents.
* ``personality``: preferences stated first, probed after ``gap`` characters of real text.
* ``user-log``: a noisy chat log of several users interleaved; each user's own lines are
  ingested separately and that user's facts asked (the newest value of a corrected fact);
  ``leak`` counts answers that hold another user's value.

Metrics: ``accuracy`` (exact value), ``accuracy_no_memory``, ``stopped`` (answers that
ended with the marker); samples per question for intervals.
"""

from __future__ import annotations

import numpy as np
import torch

from statelab.data.base import Batch, DataSource, rank_rows, rng_for
from statelab.interfaces import Metric, Task, TaskContext, TaskResult

TRAIN, VAL = 0, 1
VAL_DOCS = 64


class FactDocsData(DataSource):
    """Rows of one fact (or preference) document each, ending at the row's end (see the module doc)."""

    kind = "fact-qa"

    def __init__(self, tokenizer, params, *, seed: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.vocab_size
        self.p = params
        self.seed = seed

    def _doc(self, r: np.random.Generator, room: int):
        from then_memory.facts import fact_document, haystack, preference_document

        p = self.p
        for _ in range(20):
            if r.random() < p.pref_fraction:
                doc = preference_document(r, n_prefs=int(r.integers(1, 4)), gap=(p.filler[0], 2 * p.filler[1]))
            else:
                doc = fact_document(r, n_facts=int(r.integers(1, p.max_facts + 1)), filler=tuple(p.filler),
                                    update_p=p.update_p)
            ids = self.tokenizer.encode(doc.text)
            if len(ids) <= room:
                break
        ids = ids[-room:]  # only when 20 draws were all too long: the row keeps the document's end
        pad = self.tokenizer.encode(haystack(r, 2 * (room - len(ids)) + 16))[: room - len(ids)]
        ids = pad + ids
        if len(ids) < room:  # a haystack shorter than asked (never for Tiny Shakespeare): repeat it
            ids = (pad * (room // max(1, len(pad)) + 1))[: room - len(ids)] + ids
        answer = np.zeros(room, dtype=bool)
        text = self.tokenizer.decode(ids)
        if self.p.loss_on != "all" and len(text.encode()) == len(ids):  # byte-level: characters = tokens
            for m in _answer_spans(text, values_only=self.p.loss_on == "values"):
                answer[m[0] : m[1]] = True
        else:
            answer[:] = True
        return np.asarray(ids, dtype=np.int64), answer

    def _rows(self, rs: list[np.random.Generator], seq_len: int) -> Batch:
        docs = [self._doc(r, seq_len + 1) for r in rs]
        xy = torch.from_numpy(np.stack([d for d, _ in docs]))  # (B, T+1)
        mask = torch.from_numpy(np.stack([a[1:] for _, a in docs]))  # (B, T): targets that are answer tokens
        return Batch(xy[:, :-1], xy[:, 1:], mask)

    def train_batch(self, step, batch_size, seq_len, *, mode="random", rank=0, world_size=1) -> Batch:
        self._check_mode(mode, ("random",))
        rows = rank_rows(batch_size, rank, world_size)
        return self._rows([rng_for(self.seed, TRAIN, step, b) for b in range(rows.start, rows.stop)], seq_len)

    def val_batches(self, batch_size, seq_len, max_batches=None):
        n = VAL_DOCS if max_batches is None else min(VAL_DOCS, max_batches * batch_size)
        for lo in range(0, n, batch_size):
            yield self._rows([rng_for(self.seed, VAL, i) for i in range(lo, min(n, lo + batch_size))], seq_len)


def _answer_spans(text: str, values_only: bool = False) -> list[tuple[int, int]]:
    """[start, end) character spans of every answer line's body and its end marker, or with
    ``values_only`` of the value at the end of the answer and what follows it (".\n")."""
    import re

    if values_only:
        return [(m.start(1), m.end(0)) for m in re.finditer(r"(?m)^A: .* (\w+\.\n)", text)]
    return [(m.start(1), m.end(0)) for m in re.finditer(r"(?m)^A: (.*\n)", text)]


class _MemoryTask(Task):
    metrics = (
        Metric("accuracy", True, "share of questions answered with the right value (ingest-then-query, greedy)"),
        Metric("accuracy_no_memory", True, "the same with the trace read-out forced to zero (ablation)"),
        Metric("stopped", True, "share of answers that ended with the end-of-answer marker"),
    )
    primary = "accuracy"

    def make_data(self, spec, seed: int) -> FactDocsData:
        from statelab.data import DataError
        from statelab.tokenizers import ByteTokenizer

        if spec.tokenizer.kind != "byte":
            raise DataError(f"task {self.kind}: the fact documents are free text; use tokenizer: {{kind: byte}} "
                            f"(got {spec.tokenizer.kind!r})")
        return FactDocsData(ByteTokenizer(), self.params, seed=seed)

    def spec_overrides(self):
        return {**super().spec_overrides(), "train.batching": "random"}

    def eval_docs(self, rng: np.random.Generator) -> list:  # pragma: no cover - abstract
        raise NotImplementedError

    def evaluate(self, model, data, ctx: TaskContext) -> TaskResult:
        from then_memory.factqa import evaluate_fact_qa, is_correct

        tok = getattr(model, "tokenizer", None) or data.tokenizer
        docs = self.eval_docs(np.random.default_rng(ctx.seed + 10_000))
        with_mem = evaluate_fact_qa(model, tok, docs)
        without = evaluate_fact_qa(model, tok, docs, ablate=True)
        metrics = {"accuracy": with_mem.accuracy, "accuracy_no_memory": without.accuracy,
                   "stopped": with_mem.stopped / max(with_mem.total, 1)}
        samples = {"accuracy": [float(is_correct(a, v)) for v, a in with_mem.answers],
                   "accuracy_no_memory": [float(is_correct(a, v)) for v, a in without.answers]}
        return TaskResult(metrics, samples=samples,
                          tables={"answers": [{"expected": v, "answer": a} for v, a in with_mem.answers]})


class FactQATask(_MemoryTask):
    def eval_docs(self, rng):
        from then_memory.facts import fact_document

        p = self.params
        return [fact_document(rng, n_facts=int(rng.integers(1, p.max_facts + 1)), split="eval", filler=tuple(p.filler),
                              update_p=p.update_p) for _ in range(p.eval_docs)]


class PersonalityTask(_MemoryTask):
    def eval_docs(self, rng):
        from then_memory.facts import preference_document

        p = self.params
        return [preference_document(rng, n_prefs=int(rng.integers(1, 4)), split="eval", gap=(p.gap, p.gap + 1))
                for _ in range(p.eval_docs)]


class UserLogTask(_MemoryTask):
    metrics = _MemoryTask.metrics + (Metric("leak", False, "share of answers holding another user's value"),)

    def eval_docs(self, rng):
        from then_memory.facts import user_log

        p = self.params
        out = []
        for _ in range(p.eval_docs):
            out += list(user_log(rng, users=tuple(f"user{i}" for i in range(p.users)), lines=p.lines).values())
        return out

    def evaluate(self, model, data, ctx: TaskContext) -> TaskResult:
        res = super().evaluate(model, data, ctx)
        docs = self.eval_docs(np.random.default_rng(ctx.seed + 10_000))
        # groups of p.users documents came from one log: another user's values of the same log
        n = self.params.users
        others = []
        for g in range(0, len(docs), n):
            group = docs[g : g + n]
            for d in group:
                vals = {qa.value for o in group if o is not d for qa in o.qas}
                others += [vals] * len(d.qas)
        answers = [row["answer"] for row in res.tables["answers"]]
        leaks = [float(any(v in a for v in vs)) for a, vs in zip(answers, others)]
        res.metrics["leak"] = sum(leaks) / max(len(leaks), 1)
        return res


def build_fact_qa(params, ctx) -> FactQATask:
    return FactQATask(params)


def build_personality(params, ctx) -> PersonalityTask:
    return PersonalityTask(params)


def build_user_log(params, ctx) -> UserLogTask:
    return UserLogTask(params)
