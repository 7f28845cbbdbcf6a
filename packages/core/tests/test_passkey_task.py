"""The passkey task: needle documents in Landmark or real-text filler, one or several keys."""

from __future__ import annotations

import numpy as np
import pytest

import statelab
from statelab.data import make_data
from statelab.data.base import VAL
from statelab.data.passkey import KEY_NAMES, NIAH_ALPHABET, Haystack, PasskeyData, needle_document
from statelab.interfaces import TaskContext
from statelab.spec import parse_spec
from statelab.tasks import make_task
from statelab.tokenizers import ByteTokenizer, CharTokenizer


def test_one_key_in_landmark_filler_at_its_depth():
    tok = CharTokenizer(NIAH_ALPHABET)
    rng = np.random.default_rng(0)
    doc = needle_document(tok, 400, 0.5, 1, rng, Haystack(tok), digits=5)
    text = tok.decode(doc.ids.tolist())
    assert len(doc.ids) == 400 and text.endswith(f"What is the pass key? The pass key is {doc.key}.")
    assert tok.decode(doc.ids[-doc.answer_len:].tolist()) == f" {doc.key}."
    needle = f"The pass key is {doc.key}. Remember it. {doc.key} is the pass key."
    at = text.index(needle)
    n_filler = 400 - len(needle) - len(f"What is the pass key? The pass key is {doc.key}.") - 3  # 3 separators
    assert at - 1 == round(0.5 * n_filler)  # depth is the fraction of the haystack before the needle
    assert doc.prompt_chars == len(text) - doc.answer_len  # char tokenizer: one character per token
    assert text.startswith("The grass is green.")


def test_several_named_keys_in_real_text_filler():
    tok = ByteTokenizer()
    corpus = ("To be, or not to be, that is the question. " * 200).encode()
    hay = Haystack(tok, np.frombuffer(corpus, dtype=np.uint8).astype(np.int64))
    doc = needle_document(tok, 1000, 0.0, 3, np.random.default_rng(1), hay, digits=4)
    text = tok.decode(doc.ids.tolist())
    assert len(doc.ids) == 1000 and "The grass is green" not in text and "or not to be" in text
    needles = [line for line in text.split("\n") if line.startswith("The pass key of ")]
    assert len(needles) == 3 and all(line.split(" ")[4] in KEY_NAMES for line in needles)
    asked = text.rsplit("What is the pass key of ", 1)[1].split("?")[0]
    assert needles[0] == f"The pass key of {asked} is {doc.key}. Remember it."  # depth 0: the asked key is first
    with pytest.raises(Exception, match="needs at least"):
        needle_document(tok, 60, 0.5, 3, np.random.default_rng(0), hay)


def test_data_kind_passkey_with_params_is_the_task_without_is_landmark(tmp_path):
    base = {"model": {"backbone": {"kind": "toy-rnn"}}, "data": {"kind": "passkey", "cache_dir": str(tmp_path)}}
    assert isinstance(make_data(parse_spec(base)), PasskeyData)
    task = make_task("passkey", {"filler": "text", "keys": 2, "train_len": 300, "lengths": [300, 600],
                                 "depths": [0.0, 1.0], "per_cell": 3})
    doc = {**base, "data": {**base["data"], "kind": "passkey", "params": task.params.model_dump()},
           "train": {"seq_len": 299}}
    data = make_data(parse_spec(doc), seed=3)
    b = data.train_batch(0, 4, 299)
    assert b.x.shape == (4, 299) and b.mask.sum(1).min() >= 3  # " K." is at least 3 tokens
    # training haystacks from the corpus's training split, evaluation ones from its held-out split
    train_doc = data.document(0, 300, 0.5, 7)
    val_doc = data.document(VAL, 300, 0.5, 7)
    assert not np.array_equal(train_doc.ids, val_doc.ids)
    model = statelab.build({"model": {"d_model": 16, "backbone": {"kind": "toy-rnn", "n_layers": 1}}},
                           vocab_size=data.vocab_size, registry=__import__("statelab.testing.toys",
                                                                            fromlist=["x"]).toy_registry())
    res = task.evaluate(model, data, TaskContext())
    rows = res.tables["passkey"]
    assert [(r["length_tokens"], r["depth"]) for r in rows] == [(300, 0.0), (300, 1.0), (600, 0.0), (600, 1.0)]
    assert all(r["length_chars"] > 0.9 * r["length_tokens"] for r in rows)  # char tokenizer
    assert res.metrics["accuracy"] == 0.0 and len(res.samples["document_accuracy"]) == 12  # untrained
    assert set(res.metrics) >= {"accuracy@300", "accuracy@600", "loss"}
