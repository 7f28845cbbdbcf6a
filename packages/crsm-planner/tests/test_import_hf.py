"""`statelab import-hf DIR -o RUN`: a tiny random transformers Mamba / Mamba-2 saved locally becomes a
normal run that load, generate, eval and train --set train.init_from=... accept, with the same logits."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

transformers = pytest.importorskip("transformers", reason="pip install 'crsm-planner[test]'")
tokenizers = pytest.importorskip("tokenizers")

import statelab  # noqa: E402
from statelab import cli  # noqa: E402

TEXT = "First Citizen: Before we proceed any further, hear me speak. All: Speak, speak. " * 20


def _tokenizer(path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=280, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(path))
    return tok


def _save_hf(kind, directory, vocab):
    torch.manual_seed(0)
    common = dict(vocab_size=vocab, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2, conv_kernel=4,
                  use_cache=False)
    if kind == "mamba1":
        model = transformers.MambaForCausalLM(transformers.MambaConfig(**common, use_bias=True))
    else:
        model = transformers.Mamba2ForCausalLM(transformers.Mamba2Config(**common, head_dim=16, num_heads=4, n_groups=1,
                                                                         chunk_size=8))
    with torch.no_grad():  # random init leaves D = 1 and zero biases: move every tensor
        g = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    model.eval().save_pretrained(directory)
    return model


@pytest.mark.parametrize("kind", ["mamba1", "mamba2"])
def test_import_hf_writes_a_normal_run(kind, tmp_path, capsys, monkeypatch):
    transformers.utils.logging.set_verbosity_error()
    monkeypatch.setenv("STATELAB_CACHE_DIR", str(tmp_path / "cache"))
    src, run = tmp_path / "hf", tmp_path / "runs" / f"imported-{kind}"
    src.mkdir()
    tok = _tokenizer(src / "tokenizer.json")
    hf = _save_hf(kind, src, vocab=tok.get_vocab_size() + 8)  # padded, as HF models are
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    assert cli.main(["import-hf", str(src), "-o", str(run), "--corpus", str(corpus)]) == 0

    model = statelab.load(run)  # the run directory: its best/ checkpoint, with spec and tokenizer
    assert model.spec.model.backbone.model_extra["mixer"] == kind
    assert model.spec.tokenizer.kind == "hf" and model.tokenizer.vocab_size == tok.get_vocab_size()
    ids = torch.tensor([tok.encode("Before we proceed, hear me").ids])
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[0], hf(ids, use_cache=False).logits, atol=1e-4, rtol=1e-4)
    assert model.tokenizer.decode(model.tokenizer.encode("hear me speak")) == "hear me speak"
    if kind == "mamba1":
        return  # the commands below do not depend on the mixer; run them once
    assert cli.main(["generate", str(run), "--prompt", "All:", "--max-new-tokens", "4", "--seed", "0"]) == 0
    assert capsys.readouterr().out.startswith("All:")
    assert cli.main(["eval", str(run), "--json", "--batches", "1", "--batch-size", "2", "--seq-len", "16"]) == 0
    assert json.loads(capsys.readouterr().out)["val/loss"] > 0
    spec = yaml.safe_load((run / "spec.yaml").read_text())
    assert spec["model"]["backbone"]["kind"] == "mamba" and spec["model"]["d_model"] == 32
    assert cli.main(["train", str(run / "spec.yaml"), "-q", "--set", "name=tuned", "--set", f"train.init_from={run}",
                     "--set", "train.steps=1", "--set", "train.batch_size=2", "--set", "train.seq_len=16",
                     "--set", "train.warmup_steps=0", "--set", "train.sample_tokens=0",
                     "--set", "train.eval_batches=1"]) == 0
    assert (run.parent / "tuned" / "best" / "model.safetensors").is_file()


def test_import_hf_refuses_what_it_cannot_use(tmp_path, capsys):
    assert cli.main(["import-hf", str(tmp_path), "-o", str(tmp_path / "run")]) == 2
    assert "has no config.json" in capsys.readouterr().err
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (tmp_path / "tokenizer.json").write_text("{}")
    assert cli.main(["import-hf", str(tmp_path), "-o", str(tmp_path / "run")]) == 2
    assert "not a HuggingFace tokenizer.json" in capsys.readouterr().err
