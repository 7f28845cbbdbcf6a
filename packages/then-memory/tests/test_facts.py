import re

import numpy as np

from then_memory.facts import (ANSWER_END, QUESTIONS, STATEMENTS, UPDATES, answer_of, fact_corpus, fact_document,
                               long_fact_document, preference_document, user_log, value_in)
from then_memory.factqa import is_correct, wilson


def test_generators_are_deterministic():
    assert fact_corpus(20, seed=3) == fact_corpus(20, seed=3) != fact_corpus(20, seed=4)
    a = user_log(np.random.default_rng(5))
    b = user_log(np.random.default_rng(5))
    assert {u: d.text for u, d in a.items()} == {u: d.text for u, d in b.items()}


def _template_regex(t: str) -> str:
    return re.escape(t).replace(r"\{f\}", ".+").replace(r"\{k\}", ".+")


def test_held_out_templates_never_appear_in_training_text():
    text = fact_corpus(300, seed=0)
    for table in (STATEMENTS, UPDATES, QUESTIONS):
        for t in table["eval"]:
            assert not re.search(_template_regex(t), text), t
    rng = np.random.default_rng(1)
    doc = fact_document(rng, n_facts=3, split="eval", update_p=1.0)
    assert any(re.search(_template_regex(t), doc.context) for t in STATEMENTS["eval"])


def test_answers_hold_the_newest_value_and_end_with_the_marker():
    rng = np.random.default_rng(2)
    for _ in range(50):
        doc = fact_document(rng, n_facts=int(rng.integers(1, 5)), update_p=1.0)
        for qa in doc.qas:
            said = re.findall(re.escape(qa.answer[0].lower() + qa.answer[1:].split(" is ")[0]) + r" is (\d+)", doc.context)
            assert said and said[-1] == qa.value  # the last statement of the key wins
            assert f"A: {qa.answer}{ANSWER_END}" in doc.text
        assert len({qa.question for qa in doc.qas}) == len(doc.qas)


def test_haystack_documents_hold_every_key_in_real_text():
    rng = np.random.default_rng(3)
    doc = long_fact_document(rng, 4000, n_keys=3)
    assert 3900 <= len(doc.context) <= 4100 and len(doc.qas) == 3
    for qa in doc.qas:
        assert doc.context.count(qa.value) == 1
    assert "ROMEO" in doc.context or ":\n" in doc.context  # Tiny Shakespeare, not a repeated template


def test_preferences_and_user_logs():
    rng = np.random.default_rng(4)
    p = preference_document(rng, n_prefs=3)
    assert all(f"favourite {qa.question.split('favourite ')[1].rstrip('?')} is {qa.value}" in p.context for qa in p.qas)
    logs = user_log(rng, users=("alice", "bob"), lines=30, facts_per_user=2)
    for u, doc in logs.items():
        other = "bob" if u == "alice" else "alice"
        assert f"] {other}:" not in doc.context  # each user's memory gets only that user's lines
        for qa in doc.qas:
            assert qa.value in doc.context and qa.value not in logs[other].context


def test_scoring_helpers():
    assert answer_of("The gate code of Maria is 123.\nQ: junk") == "The gate code of Maria is 123."
    assert value_in("is 48213.") == "48213" and value_in("no") is None
    assert is_correct("Your favourite drink is tea.", "tea") and not is_correct("teapot", "tea")
    lo, hi = wilson(45, 50)
    assert 0.78 < lo < 0.9 < hi < 0.97
