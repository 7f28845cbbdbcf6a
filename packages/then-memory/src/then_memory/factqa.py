"""Fact QA in ingest-then-query mode: ingest each document's context, ask its questions.

For every :class:`~then_memory.facts.Document` the frozen model ingests the context (no
gradient, state carried segment by segment), then each question is asked from that state
(``Q: <question>\\nA:``) and the answer generated greedily until the end-of-answer marker
(or ``max_new_tokens``). A question counts as correct when the first number of the answer
is the fact's newest value (exact match); ``stopped`` counts answers that ended with the
marker. ``ablate=True`` forces the trace read-out to zero (``memory.recall`` = 0): the
no-memory ablation of the same model.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from then_memory.facts import ANSWER_END, Document, answer_of, question_prompt, value_in


@dataclass
class FactQAResult:
    correct: int
    stopped: int
    total: int
    answers: list[tuple[str, str]]  # (expected value, answer text)

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.total, 1)

    @property
    def interval(self) -> tuple[float, float]:
        return wilson(self.correct, self.total)


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k / n."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, mid - half), min(1.0, mid + half))


def is_correct(answer: str, value: str) -> bool:
    """A number: the answer's first number is it. A word: the answer contains it as a word."""
    if value.isdigit():
        return value_in(answer) == value
    return re.search(rf"\b{re.escape(value)}\b", answer) is not None


def _repeat_state(state: dict, n: int) -> dict:
    return {k: v.repeat_interleave(n, 0) for k, v in state.items()}


@torch.no_grad()
def evaluate_fact_qa(model, tokenizer, docs: list[Document], *, ablate: bool = False, max_new_tokens: int = 64,
                     segment_len: int = 512, ring_size: int | None = None) -> FactQAResult:
    """Accuracy of ``model`` on ``docs`` (see the module docstring). ``ring_size``: enlarge
    each ``then`` ring to hold that many traces (default: the longest context), so every trace
    of a document stays readable, as with a store-backed memory."""
    import statelab
    from statelab.generation import generate

    from then_memory.memory import ThenMemory
    from then_memory.users import ingest_tokens

    mems = [m for m in model.modules() if isinstance(m, ThenMemory)]
    rings = [m.ring_size for m in mems]
    longest = max(len(tokenizer.encode(d.context)) for d in docs)
    was = model.training
    model.eval()
    correct = stopped = total = 0
    answers: list[tuple[str, str]] = []
    try:
        for m, r in zip(mems, rings):
            m.ring_size = max(r, ring_size or longest)
        device = next(model.parameters()).device
        ctx = statelab.intervene({"memory.recall": 0.0}) if ablate else _null()
        with ctx:
            for doc in docs:
                ids = torch.tensor([tokenizer.encode(doc.context)], device=device)
                state = ingest_tokens(model, ids, None, segment_len)
                prompts = [tokenizer.encode(question_prompt(qa.question)) for qa in doc.qas]
                res = generate(model, prompts, tokenizer=tokenizer, max_new_tokens=max_new_tokens, temperature=0.0,
                               state=_repeat_state(state, len(prompts)), stop=ANSWER_END, use_planner=False)
                for qa, text, how in zip(doc.qas, res.texts, res.stats["stopped"]):
                    ans = answer_of(text)
                    total += 1
                    correct += int(is_correct(ans, qa.value))
                    stopped += int(how == "stop")
                    answers.append((qa.value, ans))
    finally:
        model.train(was)
        for m, r in zip(mems, rings):
            m.ring_size = r
    return FactQAResult(correct, stopped, total, answers)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


__all__ = ["FactQAResult", "evaluate_fact_qa", "is_correct", "wilson"]
