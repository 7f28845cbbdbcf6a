"""Tokenizers learned from the corpus: `word` (frequent words + <unk>) and `sentencepiece`
(unigram or BPE, trained offline); both round-trip and are saved whole into checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest

from statelab.spec import TokenizerSpec
from statelab.tokenizers import (
    REPLACEMENT,
    TokenizerError,
    WordTokenizer,
    learn_tokenizer,
    load_sentencepiece,
    make_tokenizer,
    tokenizer_from_json,
)

SHAKESPEARE = (Path(__file__).resolve().parents[1] / "src" / "statelab" / "assets" / "tinyshakespeare.txt")


@pytest.fixture(scope="module")
def corpus() -> str:
    return SHAKESPEARE.read_text(encoding="utf-8")[:200_000]


def test_word_vocabulary_is_the_most_frequent_words_plus_unk():
    tok = WordTokenizer.from_corpus(["the cat, the dog.\n", "the cat sat"], vocab_size=4)
    # " cat" and "the" twice; ",", " the", " dog", ".", "\n", " sat" once: ties in string order ("\n" first)
    assert tok.words == [" cat", "the", "\n"] and tok.vocab_size == 4 and tok.unk_id == 0
    assert tok.encode("the cat the cat") == [2, 1, 0, 1]  # " the" is not a word of this vocabulary
    assert tok.decode(tok.encode("the cat the cat")) == "the cat" + REPLACEMENT + " cat"


def test_word_round_trips_known_text_exactly(corpus):
    tok = learn_tokenizer(TokenizerSpec(kind="word", vocab_size=20_000), [corpus])
    text = corpus[:5000]
    ids = tok.encode(text)
    assert 0 not in ids and tok.decode(ids) == text  # every piece is known: exact, whitespace included
    assert len(ids) < len(text) / 2.5  # words, not characters
    again = tokenizer_from_json(tok.to_json())
    assert again.encode(text) == ids and again.fingerprint() == tok.fingerprint()
    small = learn_tokenizer(TokenizerSpec(kind="word", vocab_size=50), [corpus])
    assert small.vocab_size == 50 and 0 in small.encode(text)  # rare words are <unk>


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_sentencepiece_trains_offline_and_round_trips_any_text(corpus, model_type, tmp_path):
    spec = TokenizerSpec(kind="sentencepiece", vocab_size=400, model_type=model_type)
    tok = learn_tokenizer(spec, [corpus])
    assert tok.vocab_size == 400
    for text in (corpus[:3000], "  two  spaces,\ttabs\n\nand ünïcödé ☃ 12345\n"):  # unseen characters: byte fallback
        ids = tok.encode(text)
        assert tok.decode(ids) == text
    assert len(tok.encode(corpus[:3000])) < 3000 / 1.4  # subwords, not characters (256 ids are byte fallback)
    again = tokenizer_from_json(tok.to_json())  # a checkpoint needs nothing else
    assert again.encode(corpus[:500]) == tok.encode(corpus[:500]) and again.fingerprint() == tok.fingerprint()
    assert learn_tokenizer(spec, [corpus]).fingerprint() == tok.fingerprint()  # deterministic training
    (tmp_path / "m.model").write_bytes(tok.model)
    loaded = make_tokenizer(TokenizerSpec(kind="sentencepiece", path=str(tmp_path / "m.model")))
    assert loaded.encode(corpus[:500]) == tok.encode(corpus[:500])
    assert tok.decode([tok.encode("the")[0], tok.vocab_size + 5]).endswith(REPLACEMENT)


def test_errors_say_what_to_do(tmp_path):
    with pytest.raises(TokenizerError, match="needs tokenizer.vocab_size"):
        learn_tokenizer(TokenizerSpec(kind="word"), ["some text"])
    with pytest.raises(TokenizerError, match="empty corpus"):
        WordTokenizer.from_corpus([""], 10)
    with pytest.raises(TokenizerError, match="does not exist; give a local .model file"):
        load_sentencepiece(tmp_path / "none.model")
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="not a SentencePiece model"):
        load_sentencepiece(tmp_path / "bad.model")
    with pytest.raises(TokenizerError, match="sentencepiece training failed"):
        learn_tokenizer(TokenizerSpec(kind="sentencepiece", vocab_size=5000), ["tiny corpus\n"])


def test_a_run_saves_the_learned_tokenizer_in_its_checkpoint(tmp_path, corpus):
    """(sentencepiece; a word tokenizer takes the same path: text_tokenizer, then to_json)"""
    from statelab.checkpoint import read_checkpoint
    from statelab.data.text import read_corpus, text_tokenizer
    from statelab.spec import RunSpec
    from statelab.testing.toys import toy_registry, toy_spec
    from statelab.train import train

    path = tmp_path / "corpus.txt"
    path.write_text(corpus[:60_000], encoding="utf-8")
    spec = toy_spec()
    tokenizer = {"kind": "sentencepiece", "vocab_size": 400}
    spec["tokenizer"] = tokenizer
    spec["model"]["vocab_size"] = None
    spec["data"] = {"kind": "text", "path": str(path), "cache_dir": str(tmp_path / "cache")}
    spec["train"].update(steps=2, eval_interval=100, checkpoint_interval=2, sample_tokens=0, warmup_steps=1)
    train(spec, registry=toy_registry(), out_dir=tmp_path / "runs", progress=False)
    files = list((tmp_path / "runs").rglob("tokenizer.json"))
    assert files
    expected = text_tokenizer(RunSpec.model_validate(spec), read_corpus(str(path)))
    for f in files:
        saved = read_checkpoint(f.parent).tokenizer()
        assert saved.kind == tokenizer["kind"] and saved.fingerprint() == expected.fingerprint()
    text = corpus[:400]
    assert saved.decode(saved.encode(text)) == text
