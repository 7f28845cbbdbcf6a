"""The `hf` tokenizer kind: a HuggingFace tokenizer.json through the tokenizers library."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from statelab.spec import TokenizerSpec
from statelab.tokenizers import REPLACEMENT, TokenizerError, make_tokenizer, tokenizer_from_json


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["to be or not to be, that is the question"] * 5,
                            trainers.BpeTrainer(vocab_size=270, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    p = tmp_path_factory.mktemp("hf") / "tokenizer.json"
    tok.save(str(p))
    return p


def test_encodes_like_the_library_and_round_trips_through_its_json(path):
    ref = Tokenizer.from_file(str(path))
    tok = make_tokenizer(TokenizerSpec(kind="hf", path=str(path)))
    text = "to be, or not to be: ça va"
    assert tok.encode(text) == ref.encode(text).ids and tok.decode(tok.encode(text)) == text
    assert tok.vocab_size == ref.get_vocab_size()
    again = tokenizer_from_json(tok.to_json())  # what a checkpoint stores: no file needed
    assert again.encode(text) == tok.encode(text) and again.fingerprint() == tok.fingerprint()
    assert again.decode([tok.encode("to")[0], tok.vocab_size + 3]) == "to" + REPLACEMENT


def test_missing_or_bad_files_say_what_to_do(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist; give the path of a HuggingFace tokenizer.json"):
        make_tokenizer(TokenizerSpec(kind="hf", path=str(tmp_path / "nope.json")))
    (tmp_path / "bad.json").write_text('{"model": 1}')
    with pytest.raises(TokenizerError, match="not a HuggingFace tokenizer.json"):
        make_tokenizer(TokenizerSpec(kind="hf", path=str(tmp_path / "bad.json")))
