"""Passkey retrieval: document invariants, scoring, and the passkey data kind."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from statelab.data import DataError, make_data
from statelab.data.passkey import (
    PASSKEY_ALPHABET,
    QUESTION,
    PasskeyData,
    make_passkey_example,
    passkey_accuracy,
    passkey_document,
    passkey_eval_set,
)
from statelab.spec import PasskeySpec, parse_spec
from statelab.tokenizers import ByteTokenizer, CharTokenizer, load_bpe

TOKENIZERS = {
    "byte": ByteTokenizer,
    "char": lambda: CharTokenizer(PASSKEY_ALPHABET),
    "bpe": lambda: load_bpe(name="shakespeare-1024"),
}


@pytest.mark.parametrize("kind", list(TOKENIZERS))
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("length", [120, 700])
def test_key_is_where_stated(kind, depth, length):
    tok = TOKENIZERS[kind]()
    ex = make_passkey_example(tok, length, depth, np.random.default_rng(int(depth * 10) + length), digits=5)
    assert len(ex.ids) == length  # exactly the requested length
    assert len(ex.key) == 5 and ex.key.isdigit() and ex.key[0] != "0"
    s, e = ex.key_token_span
    assert tok.decode(ex.ids[s:e]) == ex.key
    assert ex.prompt_text == tok.decode(ex.ids)
    assert ex.prompt_text.endswith(QUESTION)
    assert f"The pass key is {ex.key}. Remember it. {ex.key} is the pass key." in ex.prompt_text
    assert ex.prompt_text.count(ex.key) == 2
    assert tok.decode(ex.answer_ids) == " " + ex.key
    # depth: the fraction of filler before the key line
    before, after = ex.prompt_text.split("The pass key is " + ex.key, 1)
    filler_after = after.split("is the pass key.", 1)[1][: -len(QUESTION)]
    frac = len(before) / max(1, len(before) + len(filler_after))
    assert abs(frac - depth) < 0.08
    if depth == 0.0:
        assert s <= len(tok.encode("\nThe pass key is "))


def test_helpers_are_importable_from_statelab_data():
    import statelab.data as data

    assert data.make_passkey_example is make_passkey_example
    assert data.passkey_accuracy is passkey_accuracy
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        data.nope  # noqa: B018


def test_examples_are_deterministic_and_vary_with_the_rng():
    tok = ByteTokenizer()
    a = make_passkey_example(tok, 300, 0.5, 42)
    assert make_passkey_example(tok, 300, 0.5, 42) == a
    keys = {make_passkey_example(tok, 300, 0.5, np.random.default_rng(i), digits=7).key for i in range(20)}
    assert len(keys) > 15 and all(len(k) == 7 for k in keys)


def test_too_short_and_bad_depth():
    tok = ByteTokenizer()
    with pytest.raises(DataError, match=r"a passkey document needs at least \d+ tokens with this tokenizer; 50 were"):
        make_passkey_example(tok, 50, 0.5, 0)
    with pytest.raises(DataError, match=r"depth must be in \[0, 1\]"):
        make_passkey_example(tok, 300, 1.5, 0)
    with pytest.raises(DataError, match="cannot write passkey documents"):
        make_passkey_example(CharTokenizer("abc"), 300, 0.5, 0)


def test_passkey_accuracy_is_exact_match():
    keys = ["12345", "67890", "11111", "22222"]
    preds = [" 12345. The grass is green", "67890", " 1111", " 222223"]
    assert passkey_accuracy(preds, keys) == 0.5
    assert passkey_accuracy(["x 12345"], ["12345"]) == 0.0
    with pytest.raises(ValueError, match="2 predictions for 1 keys"):
        passkey_accuracy(["1", "2"], ["1"])


def test_training_documents_and_data_kind():
    s = parse_spec({"model": {"backbone": {"kind": "toy-rnn"}}, "tokenizer": {"kind": "char"},
                    "data": {"kind": "passkey", "passkey": {"digits": 3, "depths": [0.0, 1.0]}}})
    ds = make_data(s)
    assert isinstance(ds, PasskeyData) and ds.vocab_size == len(PASSKEY_ALPHABET)
    T = 200
    b = ds.train_batch(3, 6, T)
    assert b.x.shape == b.y.shape == b.mask.shape == (6, T)
    assert torch.equal(b.x[:, 1:], b.y[:, :-1])
    for row in range(6):
        text = ds.tokenizer.decode(b.x[row].tolist() + [int(b.y[row, -1])])
        answer = ds.tokenizer.decode(b.y[row][b.mask[row]].tolist())
        key = answer.strip()
        assert len(key) == 3 and text.endswith(QUESTION + answer)
        assert f"The pass key is {key}. Remember it." in text
    assert torch.equal(make_data(s).train_batch(3, 6, T).x, b.x)
    halves = [ds.train_batch(3, 6, T, rank=r, world_size=2) for r in range(2)]
    assert torch.equal(torch.cat([h.x for h in halves]), b.x)
    val = list(ds.val_batches(64, T))
    assert sum(v.x.shape[0] for v in val) == 256
    assert len(list(ds.val_batches(8, T, max_batches=2))) == 2
    with pytest.raises(DataError, match="set train.batching: random"):
        ds.train_batch(0, 2, T, mode="stream")


def test_document_with_answer_has_exact_length():
    tok = load_bpe(name="shakespeare-1024")
    ids, n_answer = passkey_document(tok, 257, 0.25, 3, digits=6)
    assert len(ids) == 257
    assert tok.decode(ids[-n_answer:].tolist()).strip().isdigit()


def test_eval_set_covers_lengths_and_depths():
    tok = ByteTokenizer()
    spec = PasskeySpec(lengths=[200, 400], depths=[0.0, 1.0], digits=4)
    examples = passkey_eval_set(tok, spec, seed=0, per_cell=3)
    assert len(examples) == 12
    assert sorted({(len(e.ids), e.depth) for e in examples}) == [(200, 0.0), (200, 1.0), (400, 0.0), (400, 1.0)]
    assert passkey_eval_set(tok, spec, seed=0, per_cell=3) == examples
