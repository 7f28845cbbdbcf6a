"""`statelab data inspect` and the trainer's data check: planted corruption is flagged, clean
data is not."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from statelab.data.inspect import bad_byte_rate, inspect_spec, window_hashes

SHAKESPEARE = (Path(__file__).resolve().parents[1] / "src" / "statelab" / "assets" / "tinyshakespeare.txt")


@pytest.fixture(scope="module")
def text() -> str:
    return SHAKESPEARE.read_text(encoding="utf-8")[:120_000]


def _spec(tmp_path, corpus: str, **tokenizer) -> dict:
    path = tmp_path / "corpus.txt"
    path.write_text(corpus, encoding="utf-8")
    return {"name": "inspect", "tokenizer": tokenizer or {"kind": "char"},
            "data": {"kind": "text", "path": str(path), "cache_dir": str(tmp_path / "cache")},
            "model": {"d_model": 16, "backbone": {"kind": "toy-mlp"}}, "train": {"seq_len": 64},
            "tracking": {"enabled": False}}


def _warned(report) -> set[str]:
    return {f.check for f in report.warnings}


def test_clean_corpus_has_no_warnings(tmp_path, text):
    report = inspect_spec(_spec(tmp_path, text))
    assert _warned(report) == set(), report.format()
    assert report.histogram[0]["text"] == " " and 0.1 < report.histogram[0]["share"] < 0.2


def test_planted_pad_flooding_is_flagged(tmp_path, text):
    """NUL padding after every 1000 characters (a third of the tokens): flood, pad and control bytes."""
    padded = "".join(text[i : i + 1000] + "\x00" * 500 for i in range(0, len(text), 1000))
    report = inspect_spec(_spec(tmp_path, padded))
    assert {"flood", "pad", "bad_bytes"} <= _warned(report), report.format()
    flood = next(f for f in report.findings if f.check == "flood")
    assert "'\\x00'" in flood.detail and 0.3 < flood.value < 0.36


def test_planted_train_validation_overlap_is_flagged(tmp_path, text):
    """The validation split (the last 10%) is a copy of a training passage."""
    train = text[:100_000]
    report = inspect_spec(_spec(tmp_path, train + train[20_000:31_000]))
    overlap = next(f for f in report.findings if f.check == "overlap")
    assert overlap.warn and overlap.value > 0.9, report.format()


def test_duplicated_windows_unknowns_and_bad_utf8(tmp_path, text):
    report = inspect_spec(_spec(tmp_path, text[:20_000] * 5, kind="word", vocab_size=40))
    assert {"duplicate_windows", "unknown"} <= _warned(report), report.format()
    (tmp_path / "bad.txt").write_bytes(b"ok text \xff\xfe more\x07 text \xef\xbf\xbd")
    rate, bad, total = bad_byte_rate([tmp_path / "bad.txt"])
    assert bad == 3 and total == 25 and rate == 3 / 25  # two invalid bytes and BEL; a real U+FFFD is not an error


def test_synthetic_task_rows(tmp_path):
    doc = {"name": "m", "data": {"kind": "mqar", "mqar": {"vocab_size": 64, "seq_len": 32, "num_kv_pairs": 4,
                                                           "num_train": 16, "num_val": 64}},
           "model": {"d_model": 16, "backbone": {"kind": "toy-mlp"}}, "train": {"seq_len": 32},
           "tracking": {"enabled": False}}
    report = inspect_spec(doc)
    dup = next(f for f in report.findings if f.check == "duplicate_windows")
    assert dup.warn and dup.value > 0.9  # 16 training examples, cycled: almost every row repeats
    assert not next(f for f in report.findings if f.check == "overlap").warn


def test_window_hashes_identify_equal_windows():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 3, 400)
    h = window_hashes(ids, 6, 1)
    windows = [tuple(ids[i : i + 6]) for i in range(len(ids) - 5)]
    for i in range(0, len(windows), 7):
        for j in range(0, len(windows), 5):
            assert (h[i] == h[j]) == (windows[i] == windows[j])
    assert len(window_hashes(ids[:5], 6, 1)) == 0


def test_cli_strict_exit_status_and_trainer_warning(tmp_path, text, capsys, monkeypatch):
    from statelab import plugins
    from statelab.cli import main
    from statelab.testing.toys import toy_registry, toy_spec
    from statelab.train import train

    padded = "".join(text[i : i + 1000] + "\x00" * 500 for i in range(0, 60_000, 1000))
    doc = _spec(tmp_path, padded)
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(doc))
    monkeypatch.setenv("STATELAB_PLUGIN_MODULES", "statelab.testing.toys")
    plugins.set_registry(None)
    try:
        assert main(["data", "inspect", str(tmp_path / "spec.yaml"), "--strict"]) == 1
        assert "WARNING  flood" in capsys.readouterr().out
        assert main(["data", "inspect", str(tmp_path / "spec.yaml")]) == 0
    finally:
        plugins.set_registry(None)
    spec = toy_spec()
    spec["data"] = doc["data"]
    spec["tokenizer"] = {"kind": "char"}
    spec["train"].update(steps=1, eval_interval=100, checkpoint_interval=100, sample_tokens=0, warmup_steps=1)
    capsys.readouterr()
    train(spec, registry=toy_registry(), out_dir=tmp_path / "runs", progress=False)
    err = capsys.readouterr().err
    assert "statelab: data warning: flood" in err and "statelab: data warning: pad" in err
