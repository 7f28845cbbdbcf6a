"""Checkpoints: round trip, tied weights, missing plugin, corruption, atomicity, no pickle."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import statelab
from statelab import checkpoint as ckpt
from statelab.checkpoint import CheckpointError, MissingPluginError
from statelab.plugins import Registry
from statelab.testing.toys import toy_registry, toy_spec
from statelab.tokenizers import make_tokenizer
from statelab.spec import TokenizerSpec


@pytest.fixture(scope="module")
def reg():
    return toy_registry()


@pytest.fixture()
def model(reg):
    spec = toy_spec(memories=[{"kind": "toy-ema", "after_layer": 0}])
    m = statelab.build(spec, vocab_size=256, registry=reg)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return m


def tokens():
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))


def test_round_trip_rebuilds_the_same_model_with_its_tokenizer(reg, model, tmp_path):
    tok = make_tokenizer(TokenizerSpec(kind="byte"))
    ckpt.save(tmp_path / "c", model, tokenizer=tok)
    loaded = statelab.load(tmp_path / "c", registry=reg)
    assert not loaded.training
    model.eval()
    x = tokens()
    torch.testing.assert_close(loaded(x)[0], model(x)[0], rtol=0, atol=0)
    assert loaded.tokenizer.decode(loaded.tokenizer.encode("héllo")) == "héllo"
    assert loaded.spec.model.memories[0].kind == "toy-ema"
    # tied weights are stored once and re-tied on load
    with safe_open(str(tmp_path / "c" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
    assert "embed.weight" in keys and "head.weight" not in keys
    assert json.loads(meta["statelab.aliases"]) == {"head.weight": "embed.weight"}
    assert loaded.head.weight is loaded.embed.weight
    assert json.loads(meta["statelab.distributions"]) == {"statelab-toys": "0"}
    assert meta["statelab.core_version"] == statelab.__version__
    assert json.loads(meta["statelab.spec"])["model"]["backbone"]["kind"] == "toy-rnn"


def test_untied_weights_are_both_stored(reg, tmp_path):
    m = statelab.build(toy_spec(tie_embeddings=False), vocab_size=256, registry=reg)
    ckpt.save(tmp_path / "c", m)
    loaded = statelab.load(tmp_path / "c", registry=reg)
    assert loaded.head.weight is not loaded.embed.weight
    torch.testing.assert_close(loaded.head.weight, m.head.weight)


def test_nothing_is_pickled(model, tmp_path):
    ckpt.save(tmp_path / "c", model, trainer_state={"step": 3}, trainer_tensors={"optim.0.exp_avg": torch.ones(2)})
    names = sorted(p.name for p in (tmp_path / "c").iterdir())
    assert names == ["manifest.json", "model.safetensors", "trainer.json", "trainer.safetensors"]
    assert json.loads((tmp_path / "c" / "trainer.json").read_text()) == {"step": 3}


def test_missing_plugin_names_the_distribution_and_version(model, tmp_path):
    ckpt.save(tmp_path / "c", model)
    with pytest.raises(MissingPluginError) as exc:
        statelab.load(tmp_path / "c", registry=Registry())
    msg = str(exc.value)
    assert "needs backbone 'toy-rnn' from statelab-toys 0" in msg
    assert "pip install statelab-toys==0" in msg


def test_truncated_file_gets_a_clear_error(reg, model, tmp_path):
    ckpt.save(tmp_path / "c", model)
    f = tmp_path / "c" / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        statelab.load(tmp_path / "c", registry=reg)
    # even without the manifest check, safetensors' own error is turned into a clear one
    with pytest.raises(CheckpointError, match=r"cannot read .*model.safetensors.*truncated or corrupted"):
        statelab.load(tmp_path / "c", registry=reg, verify=False)


def test_corrupted_bytes_get_a_clear_error(reg, model, tmp_path):
    ckpt.save(tmp_path / "c", model)
    f = tmp_path / "c" / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-10] ^= 0xFF  # inside the tensor data: the header still parses
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="is corrupted \\(sha256 mismatch\\)"):
        statelab.load(tmp_path / "c", registry=reg)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        statelab.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="is not a statelab checkpoint"):
        statelab.load(tmp_path / "empty")


def test_a_crash_mid_write_leaves_the_previous_checkpoint_intact(reg, model, tmp_path):
    ckpt.save(tmp_path / "c", model)
    before = (tmp_path / "c" / "model.safetensors").read_bytes()
    changed = statelab.build(toy_spec(memories=[{"kind": "toy-ema", "after_layer": 0}]), vocab_size=256, registry=reg)
    with pytest.raises(RuntimeError, match="simulated crash"):
        ckpt.save(tmp_path / "c", changed, _crash_after="model.safetensors")
    assert (tmp_path / "c" / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c"]  # no half-written directory left behind
    loaded = statelab.load(tmp_path / "c", registry=reg)
    model.eval()
    x = tokens()
    torch.testing.assert_close(loaded(x)[0], model(x)[0], rtol=0, atol=0)


def test_run_directory_resolves_to_best(reg, model, tmp_path):
    ckpt.save(tmp_path / "run" / "best", model)
    assert ckpt.find_checkpoint(tmp_path / "run") == (tmp_path / "run" / "best").resolve()
    assert statelab.load(tmp_path / "run", registry=reg).checkpoint_path.name == "best"


def test_planner_fit_command_fits_and_saves_back(reg, tmp_path, monkeypatch, tmp_path_factory, capsys):
    from statelab import cli
    from statelab.plugins import set_registry
    from statelab.testing.toys import ToyPlanner

    monkeypatch.setenv("STATELAB_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "statelab-cache"))
    seen = {}

    def fit(self, model, batches, **kw):
        seen.update(kw, shape=tuple(batches().shape))
        self.alpha = 0.75  # what the fit "learned"
        return {"value_loss": 0.5}

    monkeypatch.setattr(ToyPlanner, "fit", fit)
    m = statelab.build(toy_spec(planner={"kind": "toy-shrink"}), vocab_size=256, registry=reg)
    ckpt.save(tmp_path / "c", m, tokenizer=make_tokenizer(TokenizerSpec(kind="byte")),
              trainer_state={"step": 7}, trainer_tensors={"optim.0.exp_avg": torch.ones(2)})
    before = (tmp_path / "c" / "model.safetensors").stat().st_ino
    set_registry(reg)
    try:
        assert cli.main(["planner", "fit", str(tmp_path / "c"), "--steps", "3", "--batch-size", "2",
                         "--seq-len", "8"]) == 0
    finally:
        set_registry(None)
    assert seen == {"steps": 3, "batch_size": 2, "seq_len": 8, "lr": 1e-3, "shape": (2, 8)}
    assert "planner/value_loss: 0.5" in capsys.readouterr().out
    assert (tmp_path / "c" / "model.safetensors").stat().st_ino != before  # written anew...
    ck, state, tensors = ckpt.load_training_state(tmp_path / "c")  # ...keeping the trainer state
    assert state == {"step": 7} and torch.equal(tensors["optim.0.exp_avg"], torch.ones(2))
