"""Text corpora of several files, folders and JSONL, streamed into the memory-mapped cache."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import statelab.data.text as text_mod
from statelab.data import DataError, make_data
from statelab.data.text import DOC_SEPARATOR, read_corpus, tokenize_corpus
from statelab.spec import parse_spec
from statelab.tokenizers import ByteTokenizer, CharTokenizer


def spec(tmp_path, path, tokenizer="char", **data):
    return parse_spec({"model": {"backbone": {"kind": "toy-rnn"}}, "tokenizer": {"kind": tokenizer},
                       "data": {"path": path, "cache_dir": str(tmp_path / "cache"), **data}})


def test_folder_list_and_jsonl_are_documents_joined_by_a_blank_line(tmp_path):
    folder = tmp_path / "docs"
    (folder / "b").mkdir(parents=True)
    (folder / "a.txt").write_text("first document. " * 40)
    (folder / "b" / "c.md").write_text("second, in a subfolder. " * 40)
    (folder / "skip.bin").write_bytes(b"\xff\xfe")  # not a corpus suffix: ignored
    jsonl = tmp_path / "more.jsonl"
    jsonl.write_text(json.dumps({"text": "third é line"}) + "\n\n" + json.dumps({"text": "fourth", "id": 4}) + "\n")
    corpus = read_corpus([str(folder), str(jsonl)])
    expected = DOC_SEPARATOR.join(["first document. " * 40, "second, in a subfolder. " * 40, "third é line", "fourth"])
    assert corpus.text == expected and [f.name for f in corpus.files] == ["a.txt", "c.md", "more.jsonl"]
    assert corpus.n_chars == len(expected) and corpus.n_bytes == len(expected.encode())
    ds = make_data(spec(tmp_path, [str(folder), str(jsonl)]))
    cut = int(len(expected) * 0.9)
    assert ds.tokenizer.decode(np.asarray(ds.train).tolist()) == expected[:cut]
    assert ds.tokenizer.decode(np.asarray(ds.val).tolist()) == expected[cut:]
    assert make_data(spec(tmp_path, str(folder))).vocab_size < ds.vocab_size  # the folder alone lacks 'é'


def test_bad_multi_document_corpora_give_clear_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl' line 2: no string field \"text\""):
        read_corpus(str(bad))
    bad.write_text("not json\n")
    with pytest.raises(DataError, match=r"line 1: not a JSON object"):
        read_corpus(str(bad))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"corpus folder '.*empty' has no .txt, .md, .jsonl files"):
        read_corpus(str(tmp_path / "empty"))
    with pytest.raises(DataError, match="empty list"):
        read_corpus([])


def test_streamed_tokenization_equals_tokenizing_at_once(tmp_path, monkeypatch):
    # tiny read blocks and chunks: UTF-8 characters and chunks are cut everywhere
    rng = np.random.default_rng(0)
    text = "".join(rng.choice(list("abcé€𝄞 \n"), size=20_000).tolist())
    (tmp_path / "c.txt").write_text(text, encoding="utf-8")
    monkeypatch.setattr(text_mod, "READ_BYTES", 7)
    monkeypatch.setattr(text_mod, "CHUNK_CHARS", 101)
    corpus = read_corpus(str(tmp_path / "c.txt"))
    assert corpus.text == text and corpus.n_chars == len(text)
    assert corpus.sha256 == __import__("hashlib").sha256(text.encode()).hexdigest()  # = the file's hash
    for tok in (CharTokenizer(text_mod.alphabet(text)), ByteTokenizer()):
        train, val, meta = tokenize_corpus(corpus, tok, 0.1, tmp_path / "cache")
        cut = int(len(text) * 0.9)
        assert np.array_equal(train, tok.encode_array(text[:cut])) and np.array_equal(val, tok.encode_array(text[cut:]))
        assert isinstance(train, np.memmap) and meta["val_chars"] == len(text) - cut
    bad = tmp_path / "bad.txt"
    bad.write_bytes(("x" * 50).encode() + b"\xe9" + b"y" * 10)
    with pytest.raises(DataError, match="invalid byte 0xe9 at byte offset 50"):
        read_corpus(str(bad))


LARGE = """
import resource, sys, time
import numpy as np
from statelab.data import make_data
from statelab.spec import parse_spec

folder, cache, mb = sys.argv[1], sys.argv[2], float(sys.argv[3])
rng = np.random.default_rng(0)
words = np.array("the a of state memory model token sequence recall key value passkey long short".split())
block = " ".join(rng.choice(words, size=200_000).tolist()) + "\\n"
n_files, written = 0, 0
while written < mb * 2**20:
    with open(f"{folder}/part{n_files:04d}.txt", "w") as f:
        for _ in range(4):
            f.write(block)
            written += len(block)
    n_files += 1


def anon_mb():  # private memory; pages of the memory-mapped cache are file-backed and reclaimable
    status = open("/proc/self/status").read()
    return int(status.split("RssAnon:")[1].split()[0]) / 1024

base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
base_anon = anon_mb()
t0 = time.time()
spec = parse_spec({"model": {"backbone": {"kind": "toy-rnn"}}, "tokenizer": {"kind": "char"},
                   "data": {"path": folder, "cache_dir": cache}})
ds = make_data(spec)
build_s = time.time() - t0
build_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
for step in range(200):
    ds.train_batch(step, 16, 128)
for i, b in enumerate(ds.val_batches(16, 128, 50)):
    pass
print({"mb": written / 2**20, "files": n_files, "tokens": len(ds.train) + len(ds.val), "build_s": round(build_s, 1),
       "base_rss_mb": base, "build_peak_rss_mb": build_peak, "build_growth_mb": build_peak - base,
       "anon_growth_after_batches_mb": anon_mb() - base_anon})
"""


@pytest.mark.slow
def test_a_corpus_larger_than_a_chunk_streams_with_bounded_memory(tmp_path):
    """A 24 MB corpus of 6 files through the cache: building it raises peak RSS by far less than
    the corpus would take in memory as text plus int64 token ids (about 24 x 13 = 310 MB), and
    batching from the memory-mapped cache adds no private memory (its pages are file-backed).
    docs/benchmarks.md has the same measurement on a few hundred MB."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(LARGE), str(folder), str(tmp_path / "cache"), "24"],
                         capture_output=True, text=True, check=True)
    res = eval(out.stdout.strip().splitlines()[-1])  # a dict literal printed by the script
    assert res["files"] >= 6 and res["tokens"] >= 24 * 2**20
    assert res["build_growth_mb"] < 100 and res["anon_growth_after_batches_mb"] < 50, res
