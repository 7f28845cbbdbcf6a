"""Text data: split, cache reuse, input errors, random and stream batching, validation coverage."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from statelab.data import Batch, DataError, bundled_corpus_path, corpus_vocab_size, make_data
from statelab.data.text import TextData
from statelab.spec import parse_spec
from statelab.tokenizers import ByteTokenizer, CharTokenizer


def spec(tmp_path, tokenizer=None, **data):
    data.setdefault("cache_dir", str(tmp_path / "cache"))
    return parse_spec({"model": {"backbone": {"kind": "toy-rnn"}}, "tokenizer": tokenizer or {"kind": "char"},
                       "data": data})


@pytest.fixture(scope="module")
def shakespeare(tmp_path_factory) -> TextData:
    return make_data(spec(tmp_path_factory.mktemp("shk")))


def small_corpus(tmp_path, n_chars=5000, name="small.txt") -> str:
    rng = np.random.default_rng(0)
    p = tmp_path / name
    p.write_text("".join(rng.choice(list("abcdefgh \n"), size=n_chars).tolist()), encoding="utf-8")
    return str(p)


def test_nanogpt_char_split_of_tiny_shakespeare(shakespeare):
    text = bundled_corpus_path().read_text(encoding="utf-8")
    n = int(len(text) * 0.9)
    assert (len(shakespeare.train), len(shakespeare.val)) == (1_003_854, 111_540)  # nanoGPT's shakespeare_char
    assert shakespeare.vocab_size == 65
    assert shakespeare.tokenizer.decode(shakespeare.train[:200].tolist()) == text[:200]
    assert shakespeare.tokenizer.decode(shakespeare.val.tolist()) == text[n:]
    assert shakespeare.bytes_per_token == 1.0  # ASCII: one byte per character
    assert shakespeare.train_tokens.dtype == torch.int64 and shakespeare.train_tokens.shape == (1_003_854,)
    assert isinstance(shakespeare.train, np.memmap)


def test_corpus_vocab_size(tmp_path):
    assert corpus_vocab_size(spec(tmp_path)) == 65
    assert corpus_vocab_size(spec(tmp_path, {"kind": "byte"})) == 256
    assert corpus_vocab_size(spec(tmp_path, {"kind": "bpe", "name": "shakespeare-1024"})) == 1024
    assert corpus_vocab_size(spec(tmp_path, kind="mqar", mqar={"vocab_size": 128})) == 128
    # mixing passkey documents into char text adds the characters they need (digits)
    assert corpus_vocab_size(spec(tmp_path, passkey={"mix": 0.1})) > 65


def test_cache_is_reused_without_tokenizing(tmp_path, monkeypatch):
    s = spec(tmp_path, path=small_corpus(tmp_path))
    first = make_data(s)
    entries = list((tmp_path / "cache" / "tokens").iterdir())
    assert len(entries) == 1 and sorted(p.name for p in entries[0].iterdir()) == ["meta.json", "train.npy", "val.npy"]

    def fail(self, text):
        raise AssertionError("tokenized again instead of using the cache")

    monkeypatch.setattr(CharTokenizer, "encode_array", fail)
    monkeypatch.setattr(CharTokenizer, "encode", fail)
    second = make_data(s)
    assert np.array_equal(np.asarray(first.train), np.asarray(second.train))
    assert np.array_equal(np.asarray(first.val), np.asarray(second.val))
    # a different tokenizer or split is a different cache entry
    monkeypatch.undo()
    make_data(spec(tmp_path, path=s.data.path, val_fraction=0.2))
    make_data(spec(tmp_path, {"kind": "byte"}, path=s.data.path))
    assert len(list((tmp_path / "cache" / "tokens").iterdir())) == 3


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("STATELAB_CACHE_DIR", str(tmp_path / "env-cache"))
    s = parse_spec({"model": {"backbone": {"kind": "toy-rnn"}}, "data": {"path": small_corpus(tmp_path)}})
    make_data(s)
    assert len(list((tmp_path / "env-cache" / "tokens").iterdir())) == 1


def test_corpus_changes_invalidate_cache(tmp_path):
    path = small_corpus(tmp_path)
    a = make_data(spec(tmp_path, path=path))
    with open(path, "a", encoding="utf-8") as f:
        f.write("abc" * 100)
    b = make_data(spec(tmp_path, path=path))
    assert len(b.train) + len(b.val) == len(a.train) + len(a.val) + 300


def test_bad_corpora_give_clear_errors(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataError, match=r"corpus file '.*empty.txt' is empty; data.path must name a UTF-8 text file"):
        make_data(spec(tmp_path, path=str(empty)))
    latin = tmp_path / "latin.txt"
    latin.write_bytes("Ça va très bien, merci".encode("latin-1"))
    with pytest.raises(DataError, match=r"corpus file '.*latin.txt' is not UTF-8 text \(invalid byte 0xc7 at byte "
                                        r"offset 0\); convert it, e.g. `iconv -f latin1 -t utf-8"):
        make_data(spec(tmp_path, path=str(latin)))
    with pytest.raises(DataError, match=r"corpus file '.*nope.txt' does not exist"):
        make_data(spec(tmp_path, path=str(tmp_path / "nope.txt")))
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("abcdefghij")
    with pytest.raises(DataError, match=r"corpus file '.*tiny.txt' is too short: its val split \(1 characters\)"):
        make_data(spec(tmp_path, path=str(tiny)))
    short = tmp_path / "short.txt"
    short.write_text("abcdefghij" * 10)
    ds = make_data(spec(tmp_path, path=str(short)))
    with pytest.raises(DataError, match=r"short.txt: the training split has 90 tokens, fewer than one window of "
                                        r"seq_len \+ 1 = 129; use a longer corpus or a smaller train.seq_len"):
        ds.train_batch(0, 4, 128)
    with pytest.raises(DataError, match="fewer than one window of seq_len"):
        ds.train_batch(0, 4, 32, mode="stream")


def test_random_batches_are_corpus_windows_and_pure_functions_of_step(shakespeare):
    train = np.asarray(shakespeare.train)
    b = shakespeare.train_batch(7, 8, 32)
    assert b.x.shape == b.y.shape == (8, 32) and b.x.dtype == torch.int64
    assert torch.equal(b.x[:, 1:], b.y[:, :-1])
    assert b.mask is None and b.reset is None
    for row_x, row_y in zip(b.x.numpy(), b.y.numpy()):
        starts = np.flatnonzero(np.lib.stride_tricks.sliding_window_view(train, 32).__eq__(row_x).all(1))
        assert any(np.array_equal(train[s + 1 : s + 33], row_y) for s in starts)
    again = make_data(spec_for(shakespeare)).train_batch(7, 8, 32)
    assert torch.equal(again.x, b.x)
    assert not torch.equal(shakespeare.train_batch(8, 8, 32).x, b.x)
    other_seed = make_data(spec_for(shakespeare), seed=1).train_batch(7, 8, 32)
    assert not torch.equal(other_seed.x, b.x)


def spec_for(ds: TextData):
    return parse_spec({"model": {"backbone": {"kind": "toy-rnn"}},
                       "data": {"cache_dir": str(ds.train.filename).rsplit("/tokens/", 1)[0]}})


@pytest.mark.parametrize("mode", ["random", "stream"])
def test_ranks_split_the_global_batch(shakespeare, mode):
    full = shakespeare.train_batch(3, 8, 16, mode=mode)
    parts = [shakespeare.train_batch(3, 8, 16, mode=mode, rank=r, world_size=4) for r in range(4)]
    assert torch.equal(torch.cat([p.x for p in parts]), full.x)
    assert torch.equal(torch.cat([p.y for p in parts]), full.y)
    with pytest.raises(DataError, match="global batch size 8 is not divisible by the 3 data-parallel ranks"):
        shakespeare.train_batch(0, 8, 16, rank=0, world_size=3)


def test_stream_batches_continue_and_wrap(tmp_path):
    ds = make_data(spec(tmp_path, {"kind": "byte"}, path=small_corpus(tmp_path, 1000)))
    N, B, T = len(ds.train), 4, 16
    S = N // B
    K = (S - 1) // T  # windows per stream
    train = np.asarray(ds.train)
    batches = [ds.train_batch(n, B, T, mode="stream") for n in range(K + 2)]
    assert batches[0].reset.all() and batches[0].reset.shape == (B,)
    for n in range(K - 1):
        nxt = batches[n + 1]
        assert not nxt.reset.any()
        assert torch.equal(nxt.x[:, 0], batches[n].y[:, -1])  # batch n+1 starts where batch n ended
    for b in range(B):  # each row reads its own stream, in order
        stream = np.concatenate([batches[n].x[b].numpy() for n in range(K)])
        assert np.array_equal(stream, train[b * S : b * S + K * T])
    assert batches[K].reset.all() and torch.equal(batches[K].x, batches[0].x)  # wrapped to the start
    assert not batches[K + 1].reset.any()


def test_validation_covers_every_token_exactly_once(shakespeare):
    val = torch.from_numpy(np.asarray(shakespeare.val, dtype=np.int64))
    predicted = []
    n_batches = 0
    for batch in shakespeare.val_batches(16, 1000):
        n_batches += 1
        mask = torch.ones_like(batch.y, dtype=torch.bool) if batch.mask is None else batch.mask
        predicted.append(batch.y[mask])
        if batch.mask is not None:  # only the last window is short, and its padding is masked out
            assert mask.sum(1).ne(1000).sum() == 1 and not mask[:, 0].logical_not().any()
    assert torch.equal(torch.cat(predicted), val[1:])
    assert n_batches == -(-(len(val) - 1) // (16 * 1000))
    assert sum(b.n_targets for b in shakespeare.val_batches(16, 1000)) == len(val) - 1


def test_validation_subset_is_evenly_spaced_and_deterministic(shakespeare):
    batches = list(shakespeare.val_batches(4, 64, max_batches=3))
    assert len(batches) == 3 and all(b.x.shape == (4, 64) and b.mask is None for b in batches)
    val = np.asarray(shakespeare.val)
    first, last = batches[0].x[0].numpy(), batches[-1].x[-1].numpy()
    assert np.array_equal(first, val[:64])
    assert np.array_equal(last, val[len(val) - 65 : len(val) - 1])
    again = list(shakespeare.val_batches(4, 64, max_batches=3))
    assert all(torch.equal(a.x, b.x) for a, b in zip(batches, again))


def test_bytes_per_token_for_byte_and_bpe(tmp_path):
    text = "naïve café — 日本語\n" * 300
    p = tmp_path / "u.txt"
    p.write_text(text, encoding="utf-8")
    byte = make_data(spec(tmp_path, {"kind": "byte"}, path=str(p)))
    assert byte.bytes_per_token == 1.0
    bpe = make_data(spec(tmp_path, {"kind": "bpe", "name": "shakespeare-1024"}, path=str(p)))
    val_text = text[int(len(text) * 0.9):]
    assert bpe.bytes_per_token == pytest.approx(len(val_text.encode()) / len(bpe.val))
    assert bpe.tokenizer.decode(np.asarray(bpe.val).tolist()) == val_text
    char = make_data(spec(tmp_path, path=str(p)))
    assert char.bytes_per_token == pytest.approx(len(val_text.encode()) / len(val_text))
    assert char.chars_per_token == 1.0
    assert bpe.chars_per_token == pytest.approx(len(val_text) / len(bpe.val))


def test_passkey_mix_replaces_a_fraction_of_random_windows(tmp_path):
    ds = make_data(spec(tmp_path, passkey={"mix": 0.25, "digits": 4}))
    T = 160
    rows = 0
    for step in range(8):
        b = ds.train_batch(step, 16, T)
        assert torch.equal(b.x[:, 1:], b.y[:, :-1])
        texts = [ds.tokenizer.decode(r.tolist() + [int(y)]) for r, y in zip(b.x, b.y[:, -1])]
        pk = [t for t in texts if t.endswith(tuple(f"The pass key is {d}" for d in "0123456789")) or
              "What is the pass key? The pass key is" in t]
        rows += len(pk)
    assert 0.1 < rows / (8 * 16) < 0.4
    half = [ds.train_batch(2, 16, T, rank=r, world_size=2) for r in range(2)]
    assert torch.equal(torch.cat([h.x for h in half]), ds.train_batch(2, 16, T).x)


def test_passkey_mix_in_stream_mode_inserts_documents(tmp_path):
    s = spec(tmp_path, {"kind": "byte"}, passkey={"mix": 0.2, "lengths": [300, 500], "digits": 5})
    ds = make_data(s)
    stream = ds.stream_tokens
    n_text = len(ds.train)
    assert 0.18 < (len(stream) - n_text) / len(stream) < 0.25  # about mix of the stream's tokens
    text = ds.tokenizer.decode(np.asarray(stream).tolist())
    train_text = ds.tokenizer.decode(np.asarray(ds.train).tolist())
    docs = text.count("What is the pass key? The pass key is ")
    assert docs == len(ds.passkey_starts) > 10
    for start in ds.passkey_starts[:5].tolist():  # each document is whole and in place
        doc = ds.tokenizer.decode(np.asarray(stream[start : start + 500]).tolist())
        assert doc.startswith("The grass is green.") and "The pass key is " in doc
    # removing the documents gives back the text, in order
    import re

    doc_re = (r"\n[^\n]*\nThe pass key is (\d{5})\. Remember it\. \1 is the pass key\.\n[^\n]*\n"
              r"What is the pass key\? The pass key is \1\n")
    stripped, n = re.subn(doc_re, "", text)
    assert n == docs and stripped == train_text
    # stream batches read the mixed stream, deterministically
    b = ds.train_batch(0, 4, 64, mode="stream")
    S = len(stream) // 4
    assert np.array_equal(b.x[1].numpy(), np.asarray(stream[S : S + 64]))
    assert torch.equal(make_data(s).train_batch(5, 4, 64, mode="stream").x, ds.train_batch(5, 4, 64, mode="stream").x)
    with pytest.raises(DataError, match=r"a passkey document needs at least \d+ tokens.*data.passkey.lengths"):
        make_data(spec(tmp_path, {"kind": "byte"}, passkey={"mix": 0.2, "lengths": [20]})).train_batch(
            0, 4, 64, mode="stream")


def test_batch_to_and_unknown_mode(shakespeare):
    b = shakespeare.train_batch(0, 2, 8).to("cpu")
    assert isinstance(b, Batch) and b.n_targets == 16
    with pytest.raises(DataError, match="unknown batching mode 'shuffle'"):
        shakespeare.train_batch(0, 2, 8, mode="shuffle")


def test_text_data_on_numpy_arrays_directly():
    tok = ByteTokenizer()
    ids = tok.encode_array("hello world, " * 20).astype(np.uint16)
    ds = TextData(tok, ids[:200], ids[200:], seed=0, bytes_per_token=1.0)
    b = ds.train_batch(0, 3, 10)
    assert b.x.shape == (3, 10)


def test_cache_write_is_atomic_under_a_crash(tmp_path, monkeypatch):
    import statelab.data.text as text_mod

    s = spec(tmp_path, path=small_corpus(tmp_path))
    real, calls = text_mod._save_npy, []

    def crash_on_second(path, arr):
        calls.append(path.name)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed while writing val.npy")
        real(path, arr)

    monkeypatch.setattr(text_mod, "_save_npy", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        make_data(s)
    tokens = tmp_path / "cache" / "tokens"
    assert not [p for p in tokens.iterdir() if not p.name.startswith(".")]  # no half-written entry is visible
    monkeypatch.undo()
    ds = make_data(s)
    assert len(ds.train) > 0 and [p.name for p in tokens.iterdir() if not p.name.startswith(".")]
