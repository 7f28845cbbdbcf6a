"""Offline, deterministic data for "ingest, don't train": facts, questions, preferences, user logs.

Every generator is a pure function of its seed and reads nothing but the bundled Tiny
Shakespeare (the real-text haystack). Text is plain UTF-8 for a byte-level tokenizer.

The answer format. A question is a line ``Q: <question>`` and its answer a line
``A: <statement>`` ended by :data:`ANSWER_END` (a newline): a model trained on this text ends
its answers with it, and :func:`answer_of` / generation stop there. The answer restates the
fact's phrase before its value ("The shed code of Maria is 48213."), so the value is looked up
in the context it was written in (the ``then`` memory's induction read).

Facts are ``(key, value)`` with a key phrase such as ``the bike lock code of Maria`` and a
5-digit value. A statement wraps ``<key> is <value>`` in one of :data:`STATEMENTS` and a
question asks with one of :data:`QUESTIONS`; ``split="train"`` uses the training templates,
``split="eval"`` the held-out ones (never seen in training). An update restates a key with a
new value later in the same document; the answer is the newest value.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

ANSWER_END = "\n"

NAMES = ["Maria", "Ivan", "Chen", "Aisha", "Tomas", "Priya", "Kofi", "Lena", "Omar", "Yuki", "Sven", "Nadia",
         "Diego", "Fatima", "Jonas", "Mei", "Rahul", "Elif", "Pavel", "Zoe", "Hugo", "Amara", "Lars", "Ines"]
THINGS = ["shed lock", "bike lock", "locker", "safe", "garage door", "alarm", "gate", "mailbox", "wifi router",
          "storage unit", "phone", "laptop", "office door", "suitcase", "gym locker", "back door"]
ATTRS = ["code", "pin", "number"]
STATEMENTS = {
    "train": ["{f}.", "Note: {f}.", "Remember that {f}.", "Please keep in mind that {f}.", "FYI, {f}.",
              "I was told that {f}.", "Just to let you know, {f}.", "For the record, {f}."],
    "eval": ["Write this down: {f}.", "Do not forget that {f}.", "Here is something: {f}."],
}
UPDATES = {"train": ["Update: {f} now.", "Correction: {f}.", "It changed: {f}."],
           "eval": ["Change of plans: {f}.", "New info: {f}."]}
QUESTIONS = {
    "train": ["What is {k}?", "Tell me {k}.", "Do you know {k}?", "What was {k}?"],
    "eval": ["Remind me, what is {k}?", "Which number is {k}?", "Can you recall {k}?"],
}
PREF_TOPICS = {"colour": ["green", "blue", "red", "yellow", "purple", "orange", "black", "white"],
               "drink": ["tea", "coffee", "cocoa", "lemonade", "water", "milk", "juice"],
               "season": ["spring", "summer", "autumn", "winter"],
               "animal": ["cat", "dog", "horse", "owl", "fox", "otter", "rabbit"],
               "fruit": ["apple", "pear", "mango", "plum", "cherry", "banana", "kiwi"]}
PREF_STATEMENTS = {"train": ["By the way, my favourite {t} is {v}.", "I should say that my favourite {t} is {v}.",
                             "Honestly, my favourite {t} is {v}."],
                   "eval": ["You may like to know that my favourite {t} is {v}.", "Fun fact: my favourite {t} is {v}."]}
PREF_QUESTIONS = {"train": ["What is my favourite {t}?", "Do you remember my favourite {t}?"],
                  "eval": ["Which {t} do I like best?", "Guess my favourite {t}?"]}
CHATTER = ["ok", "thanks!", "brb", "lol that is funny", "did you see the game last night", "sounds good",
           "hmm not sure", "who is bringing snacks", "running late, sorry", "see you at noon", "nice one",
           "can someone check the printer", "meeting moved to 3", "great work everyone", "coffee anyone?"]


@lru_cache(maxsize=1)
def _shakespeare() -> str:
    from statelab.data import bundled_corpus_path

    return Path(bundled_corpus_path()).read_text(encoding="utf-8")


def haystack(rng: np.random.Generator, n: int) -> str:
    """About ``n`` characters of Tiny Shakespeare, whole lines (starts after a newline, ends
    with one; at most ``n`` characters unless one line is longer)."""
    text = _shakespeare()
    a = int(rng.integers(0, len(text) - n - 200))
    a = text.find("\n", a) + 1
    b = text.rfind("\n", a, a + n)
    return text[a : b + 1] if b > a else text[a : text.find("\n", a) + 1]


def random_value(rng: np.random.Generator, digits: int = 5) -> str:
    return str(int(rng.integers(10 ** (digits - 1), 10**digits)))


def random_keys(rng: np.random.Generator, n: int) -> list[str]:
    """``n`` distinct key phrases such as ``the gate code of Maria``."""
    out: set[str] = set()
    while len(out) < n:
        thing, attr, name = THINGS[rng.integers(len(THINGS))], ATTRS[rng.integers(len(ATTRS))], NAMES[rng.integers(len(NAMES))]
        out.add(f"the {thing} {attr} of {name}")
    return sorted(out, key=lambda _: rng.random())


def _pick(rng: np.random.Generator, options: list[str]) -> str:
    return options[int(rng.integers(len(options)))]


@dataclass
class QA:
    """A question, the answer statement (without :data:`ANSWER_END`) and the value it must contain."""

    question: str
    answer: str
    value: str


@dataclass
class Document:
    """Text to ingest (``context``) and questions about it. ``text`` is the training form:
    the context followed by every question and its answer."""

    context: str
    qas: list[QA] = field(default_factory=list)

    @property
    def text(self) -> str:
        return self.context + "".join(qa_text(q) for q in self.qas)


def qa_text(qa: QA) -> str:
    return f"Q: {qa.question}\nA: {qa.answer}{ANSWER_END}"


def question_prompt(question: str) -> str:
    """What the model is given at query time: the question line and the answer's opening
    ("A: ", so the first generated token is the answer's own)."""
    return f"Q: {question}\nA: "


def answer_of(generated: str) -> str:
    """The answer part of a continuation: up to :data:`ANSWER_END`."""
    return generated.split(ANSWER_END, 1)[0].strip()


def value_in(answer: str) -> str | None:
    m = re.search(r"\d+", answer)
    return m.group(0) if m else None


def _cap(s: str) -> str:
    return s[0].upper() + s[1:]


def fact_document(rng: np.random.Generator, *, n_facts: int = 3, split: str = "train", filler: tuple[int, int] = (40, 160),
                  update_p: float = 0.3, n_questions: int | None = None) -> Document:
    """Several facts, real-text filler between them, maybe an update, then questions.

    ``filler``: (min, max) characters of Shakespeare around each statement. ``update_p``:
    chance that one fact is restated with a new value after the others (its answer is the new
    value). ``n_questions``: questions asked (default: one per fact, in random order)."""
    keys = random_keys(rng, n_facts)
    values = {k: random_value(rng) for k in keys}
    parts = []
    for k in keys:
        parts.append(haystack(rng, int(rng.integers(*filler))))
        parts.append(_pick(rng, STATEMENTS[split]).format(f=f"{k} is {values[k]}") + "\n")
    if rng.random() < update_p:
        k = keys[int(rng.integers(len(keys)))]
        new = random_value(rng)
        while new == values[k]:
            new = random_value(rng)
        values[k] = new
        parts.append(haystack(rng, int(rng.integers(*filler))))
        parts.append(_pick(rng, UPDATES[split]).format(f=f"{k} is {new}") + "\n")
    parts.append(haystack(rng, int(rng.integers(*filler))))
    if not parts[-1].endswith("\n"):
        parts.append("\n")
    order = rng.permutation(len(keys))[: n_questions or len(keys)]
    qas = [QA(_pick(rng, QUESTIONS[split]).format(k=keys[i]), f"{_cap(keys[i])} is {values[keys[i]]}.", values[keys[i]])
           for i in order]
    return Document("".join(parts), qas)


def long_fact_document(rng: np.random.Generator, length: int, *, n_keys: int = 1, split: str = "eval") -> Document:
    """A real-text haystack of about ``length`` characters with ``n_keys`` facts at random
    depths, then one question per fact (for passkey-style length sweeps)."""
    keys = random_keys(rng, n_keys)
    values = {k: random_value(rng) for k in keys}
    statements = [_pick(rng, STATEMENTS[split]).format(f=f"{k} is {values[k]}") + "\n" for k in keys]
    room = max(0, length - sum(len(s) for s in statements))
    cuts = np.sort(rng.integers(0, room + 1, size=n_keys))
    hay = haystack(rng, room)
    parts, prev = [], 0
    for c, s in zip(cuts, statements):
        c = hay.rfind("\n", 0, int(c)) + 1 if c else 0  # statements start at a line boundary
        c = max(c, prev)
        parts += [hay[prev:c], s]
        prev = c
    parts.append(hay[prev:])
    if not parts[-1].endswith("\n"):
        parts.append("\n")
    qas = [QA(_pick(rng, QUESTIONS[split]).format(k=k), f"{_cap(k)} is {values[k]}.", values[k]) for k in keys]
    return Document("".join(parts), qas)


def preference_document(rng: np.random.Generator, *, n_prefs: int = 2, split: str = "train",
                        gap: tuple[int, int] = (200, 600)) -> Document:
    """Personality consistency: preferences stated early in a conversation-like text, real
    text in between, probed at the end ("What is my favourite drink?" -> "Your favourite
    drink is tea.")."""
    topics = list(rng.permutation(list(PREF_TOPICS))[:n_prefs])
    prefs = {t: _pick(rng, PREF_TOPICS[t]) for t in topics}
    parts = [_pick(rng, PREF_STATEMENTS[split]).format(t=t, v=prefs[t]) + "\n" for t in topics]
    parts.append(haystack(rng, int(rng.integers(*gap))))
    if not parts[-1].endswith("\n"):
        parts.append("\n")
    qas = [QA(_pick(rng, PREF_QUESTIONS[split]).format(t=t), f"Your favourite {t} is {prefs[t]}.", prefs[t])
           for t in rng.permutation(topics)]
    return Document("".join(parts), qas)


def _typo(rng: np.random.Generator, s: str, p: float) -> str:
    """Swap neighbouring letters of some words (never inside digits: values stay exact)."""
    words = s.split(" ")
    for i, w in enumerate(words):
        if len(w) > 3 and w.isalpha() and rng.random() < p:
            j = int(rng.integers(0, len(w) - 1))
            words[i] = w[:j] + w[j + 1] + w[j] + w[j + 2 :]
    return " ".join(words)


def user_log(rng: np.random.Generator, *, users: tuple[str, ...] = ("alice", "bob", "carol"), lines: int = 40,
             facts_per_user: int = 2, split: str = "eval", typo_p: float = 0.1) -> dict[str, Document]:
    """A noisy chat log of several users, interleaved: chatter, quoted Shakespeare, typos,
    facts stated and sometimes corrected. Returns each user's own lines as a document (what
    that user's memory ingests) with questions about that user's facts; the newest value of a
    corrected fact is the answer."""
    keys = random_keys(rng, facts_per_user * len(users))
    own = {u: keys[i * facts_per_user : (i + 1) * facts_per_user] for i, u in enumerate(users)}
    values: dict[str, str] = {}
    events = []  # (user, line) in log order
    for u in users:
        for k in own[u]:
            values[k] = random_value(rng)
            events.append((u, _pick(rng, STATEMENTS[split]).format(f=f"{k} is {values[k]}")))
        if rng.random() < 0.5:  # a correction of one of this user's facts
            k = own[u][int(rng.integers(len(own[u])))]
            values[k] = random_value(rng)
            events.append((u, _pick(rng, UPDATES[split]).format(f=f"{k} is {values[k]}")))
    # random interleaving that keeps each user's own order (a correction stays after its fact)
    slots = sorted(rng.choice(lines + len(events), size=len(events), replace=False).tolist())
    noise = iter([_typo(rng, _pick(rng, CHATTER) if rng.random() < 0.6 else haystack(rng, 60).split("\n")[0], typo_p)
                  for _ in range(lines)])
    ev = iter(events)
    log: list[tuple[str, str]] = []
    for i in range(lines + len(events)):
        if slots and slots[0] == i:
            slots.pop(0)
            log.append(next(ev))
        else:
            log.append((_pick(rng, list(users)), next(noise)))
    docs = {}
    for u in users:
        context = "".join(f"[{j:03d}] {u}: {line}\n" for j, (who, line) in enumerate(log) if who == u)
        qas = [QA(_pick(rng, QUESTIONS[split]).format(k=k), f"{_cap(k)} is {values[k]}.", values[k]) for k in own[u]]
        docs[u] = Document(context, qas)
    return docs


def fact_corpus(n_docs: int, *, seed: int = 0, pref_fraction: float = 0.2, **doc_kwargs) -> str:
    """Training text: ``n_docs`` documents (fact documents, and preference documents for
    ``pref_fraction`` of them), separated by blank lines, training templates only."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n_docs):
        if rng.random() < pref_fraction:
            docs.append(preference_document(rng).text)
        else:
            docs.append(fact_document(rng, n_facts=int(rng.integers(1, 5)), **doc_kwargs).text)
    return "\n".join(docs)


__all__ = ["ANSWER_END", "QA", "Document", "answer_of", "fact_corpus", "fact_document", "haystack",
           "long_fact_document", "preference_document", "qa_text", "question_prompt", "random_keys", "random_value",
           "user_log", "value_in"]
