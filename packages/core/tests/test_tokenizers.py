"""Tokenizers: round trips, serialisation, the offline error, and our BPE trainer against a naive one."""

from __future__ import annotations

import collections
import json

import numpy as np
import pytest

from statelab.data import bundled_corpus_path
from statelab.spec import TokenizerSpec
from statelab.tokenizers import (
    BPE_PATTERN,
    BPETokenizer,
    ByteTokenizer,
    CharTokenizer,
    IdsTokenizer,
    TokenizerError,
    bundled_encodings,
    load_bpe,
    load_ranks,
    make_tokenizer,
    save_ranks,
    tokenizer_from_json,
    train_bpe,
)

UNICODE = "héllo wörld — naïve café ☕ 日本語のテキスト 🙂🚀 Ελληνικά\n\ttabs  and   spaces\r\n" + "end\x00"


@pytest.fixture(scope="module")
def corpus() -> str:
    return bundled_corpus_path().read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return load_bpe(name="shakespeare-1024")


def random_unicode(rng: np.random.Generator, n: int) -> str:
    # code points from several planes, without surrogates (not encodable as UTF-8)
    cps = rng.integers(1, 0x2FFFF, size=n)
    cps = np.where((cps >= 0xD800) & (cps < 0xE000), 0x41, cps)
    return "".join(map(chr, cps.tolist()))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_byte_and_bpe_round_trip_arbitrary_unicode(bpe, seed):
    rng = np.random.default_rng(seed)
    text = random_unicode(rng, 500) + UNICODE
    for tok in (ByteTokenizer(), bpe):
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
        assert tok.encode_array(text).tolist() == ids


def test_bpe_long_texts_encode_in_pieces_to_the_same_ids(corpus, monkeypatch):
    # indented lines and trailing spaces: whitespace chunks that span a newline ("\n    ")
    text = corpus[:20_000].replace("\n", "\n    ").replace(",", ",  ") + UNICODE
    tok = BPETokenizer(train_bpe(text, 320))
    assert any(t.startswith(b"\n ") for t in tok.ranks)
    whole = tok.encoding.encode_ordinary(text)
    monkeypatch.setattr(tok, "long_text_chars", 1000)
    monkeypatch.setattr(tok, "piece_chars", 97)
    assert tok.encode_array(text).tolist() == whole


def test_byte_ids_are_utf8_bytes():
    assert ByteTokenizer().encode("aé") == [0x61, 0xC3, 0xA9]


def test_char_round_trip_on_corpus_and_nanogpt_vocabulary(corpus):
    tok = make_tokenizer(TokenizerSpec(kind="char"), corpus)
    assert tok.vocab_size == 65  # nanoGPT shakespeare_char
    assert tok.chars[:3] == ["\n", " ", "!"]
    ids = tok.encode_array(corpus)
    assert tok.decode(ids.tolist()) == corpus
    assert tok.encode(corpus[:100]) == [tok.stoi[c] for c in corpus[:100]]


@pytest.mark.parametrize("seed", [0, 1])
def test_char_vectorised_encode_matches_a_dict_lookup(seed):
    rng = np.random.default_rng(seed)
    text = random_unicode(rng, 3000)
    tok = CharTokenizer.from_corpus(text)
    assert tok.chars == sorted(set(text))
    assert tok.encode(text) == [tok.stoi[c] for c in text]
    assert tok.decode(tok.encode(text)) == text


def test_char_unknown_character_error_says_what_to_do():
    tok = CharTokenizer("abc ")
    with pytest.raises(TokenizerError, match=r"1 character\(s\) are not in this char tokenizer's vocabulary of 4.*'z'.*"
                                             r"Use tokenizer kind 'byte' or 'bpe'"):
        tok.encode("a b z")
    with pytest.raises(TokenizerError, match="'🙂'"):
        tok.encode("🙂")  # a code point past the lookup table


def test_decode_never_raises_below_vocab_size(bpe):
    for tok in (ByteTokenizer(), bpe, CharTokenizer("xyz"), IdsTokenizer(10)):
        ids = list(range(tok.vocab_size))
        text = tok.decode(ids)
        assert isinstance(text, str)
        for i in ids:
            tok.decode([i])
    # invalid UTF-8 becomes U+FFFD rather than an exception
    assert ByteTokenizer().decode([0xFF, 0x61]) == "\ufffda"
    # ids past the vocabulary (a padded model vocabulary) are visible, not fatal
    assert ByteTokenizer().decode([0x61, 300, 0x62]) == "a\ufffdb"
    assert CharTokenizer("ab").decode([0, 5, 1]) == "a\ufffdb"
    assert bpe.decode([bpe.encode("a")[0], 5000]) == "a\ufffd"


@pytest.mark.parametrize("make", [
    lambda: ByteTokenizer(),
    lambda: CharTokenizer("hello world\n"),
    lambda: IdsTokenizer(8192),
    lambda: load_bpe(name="shakespeare-1024"),
])
def test_to_json_from_json_round_trip(make):
    tok = make()
    d = json.loads(json.dumps(tok.to_json()))  # JSON-serialisable, nothing else needed
    back = tokenizer_from_json(d)
    assert type(back) is type(tok)
    assert back.vocab_size == tok.vocab_size
    assert back.to_json() == tok.to_json()
    assert back.fingerprint() == tok.fingerprint()
    sample = "hello world\n" if tok.kind != "ids" else "1 2 8191"
    assert back.encode(sample) == tok.encode(sample)
    assert back.decode(tok.encode(sample)) == sample


def test_tokenizer_from_json_rejects_unknown_kind():
    with pytest.raises(TokenizerError, match="unknown tokenizer kind 'wordpiece'"):
        tokenizer_from_json({"kind": "wordpiece"})


@pytest.mark.parametrize("name", ["gpt2", "cl100k_base"])
def test_named_encoding_not_available_offline(name, monkeypatch):
    import tiktoken

    def forbidden(*a, **k):
        raise AssertionError("tiktoken.get_encoding downloads; it must never be called")

    monkeypatch.setattr(tiktoken, "get_encoding", forbidden)
    with pytest.raises(ValueError) as info:
        make_tokenizer(TokenizerSpec(kind="bpe", name=name))
    msg = str(info.value)
    assert f"BPE encoding {name!r} is not available offline and cannot be downloaded here" in msg
    assert "statelab tokenizer train CORPUS --vocab N -o FILE.tiktoken" in msg
    assert "tokenizer: {kind: bpe, path: FILE.tiktoken}" in msg
    assert "Bundled encodings: shakespeare-1024" in msg


def test_bpe_spec_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown BPE encoding name 'nope'; bundled encodings: shakespeare-1024"):
        make_tokenizer(TokenizerSpec(kind="bpe", name="nope"))
    with pytest.raises(ValueError, match="needs `path` .* or `name`"):
        make_tokenizer(TokenizerSpec(kind="bpe"))
    with pytest.raises(ValueError, match="not both"):
        make_tokenizer(TokenizerSpec(kind="bpe", name="shakespeare-1024", path="x.tiktoken"))
    with pytest.raises(ValueError, match="does not exist"):
        make_tokenizer(TokenizerSpec(kind="bpe", path=str(tmp_path / "missing.tiktoken")))
    bad = tmp_path / "bad.tiktoken"
    bad.write_text("not-base64!! 0\n")
    with pytest.raises(ValueError, match=r"line 1: expected 'BASE64TOKEN RANK'"):
        make_tokenizer(TokenizerSpec(kind="bpe", path=str(bad)))
    with pytest.raises(ValueError, match="char tokenizer takes its vocabulary from the corpus"):
        make_tokenizer(TokenizerSpec(kind="char"))


def test_ranks_file_round_trip_and_local_path(tmp_path):
    ranks = train_bpe("the cat sat on the mat; the cat ate the rat. " * 20, 270)
    f = tmp_path / "tiny.tiktoken"
    save_ranks(ranks, f)
    assert load_ranks(f) == ranks
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.tiktoken"]  # no temporary file left behind
    tok = make_tokenizer(TokenizerSpec(kind="bpe", path=str(f)))
    assert tok.vocab_size == 270
    assert len(tok.encode("the cat sat on the mat")) < len("the cat sat on the mat")


# ------------------------------------------------------------------ BPE trainer vs a naive reference


def naive_train_bpe(text: str, vocab_size: int) -> dict[bytes, int]:
    """Obviously correct and slow: recount every pair of every chunk occurrence each round."""
    import regex

    ranks = {bytes([b]): b for b in range(256)}
    words = [[bytes([c]) for c in w.encode("utf-8")] for w in regex.findall(BPE_PATTERN, text)]
    while len(ranks) < vocab_size:
        counts = collections.Counter(p for w in words for p in zip(w, w[1:]))
        if not counts:
            break
        pair, c = min(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        if c < 2:
            break
        new = pair[0] + pair[1]
        ranks.setdefault(new, len(ranks))
        for k, w in enumerate(words):
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == pair:
                    out.append(new)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            words[k] = out
    return ranks


@pytest.mark.parametrize("source", ["corpus", "unicode"])
def test_train_bpe_matches_naive_reference(corpus, source):
    if source == "corpus":
        text = corpus[:20_000]
    else:
        rng = np.random.default_rng(3)
        alphabet = list("aab ééé 日本 \n🙂xxyy")
        text = "".join(rng.choice(alphabet, size=4000).tolist())
    assert train_bpe(text, 400) == naive_train_bpe(text, 400)


def test_train_bpe_stops_when_no_pair_repeats_and_rejects_bad_sizes():
    ranks = train_bpe("abcabc", 1000)
    assert len(ranks) < 1000 and b"abc" in ranks
    with pytest.raises(TokenizerError, match="at least 256"):
        train_bpe("abc", 100)
    with pytest.raises(TokenizerError, match="empty"):
        train_bpe("", 300)


def test_bundled_vocabulary_is_reproduced_by_our_trainer(corpus):
    text = corpus[: int(len(corpus) * 0.9)]
    assert bundled_encodings()["shakespeare-1024"].is_file()
    assert train_bpe(text, 1024) == load_ranks(bundled_encodings()["shakespeare-1024"])


def test_bundled_bpe_compresses_shakespeare(bpe, corpus):
    val = corpus[int(len(corpus) * 0.9):]
    ids = bpe.encode_array(val)
    assert len(val.encode()) / len(ids) > 2.0  # bytes per token on held-out text
    assert bpe.decode(ids.tolist()) == val


def test_cli_train_and_list(tmp_path, capsys, corpus):
    from statelab.cli import main

    text = tmp_path / "c.txt"
    text.write_text(corpus[:20_000], encoding="utf-8")
    out = tmp_path / "v.tiktoken"
    assert main(["tokenizer", "train", str(text), "--vocab", "300", "-o", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    tok = make_tokenizer(TokenizerSpec(kind="bpe", path=str(out)))
    assert tok.vocab_size == 300
    assert main(["tokenizer", "list"]) == 0
    assert "shakespeare-1024" in capsys.readouterr().out
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("café".encode("latin-1"))
    assert main(["tokenizer", "train", str(bad), "--vocab", "300", "-o", str(out)]) == 2
    assert "is not UTF-8 text" in capsys.readouterr().err
