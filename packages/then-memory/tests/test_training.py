import re

import torch

import statelab
from then_memory.corpus import make_passkey_corpus, passkey_document_text


def test_passkey_corpus_documents(tmp_path):
    out = tmp_path / "corpus.txt"
    stats = make_passkey_corpus(out, docs=20, lengths=[300, 600], seed=1, base_text="To be or not to be.\n\n" * 500)
    text = out.read_text()
    assert stats["passkey_docs"] == 20 and stats["chars"] == len(text)
    lines = re.findall(r"The pass key is (\d{5})\. Remember it\. (\d{5}) is the pass key\.", text)
    answers = re.findall(r"What is the pass key\? The pass key is (\d{5})\.", text)
    assert len(lines) == len(answers) == 20
    assert all(a == b == c for (a, b), c in zip(lines, answers))
    doc = passkey_document_text(400, 0.0, "12345")
    assert doc.index("12345") < 40 and doc.endswith("The pass key is 12345.\n\n")


def test_stream_training_carries_traces_between_segments(registry, then_spec, tmp_path):
    """The runtime's stream batching trains the memory with carried, detached state."""
    spec = then_spec()
    spec["train"].update({"batching": "stream", "steps": 3, "batch_size": 2, "seq_len": 16, "eval_interval": 3,
                          "eval_batches": 1, "checkpoint_interval": 3, "sample_tokens": 0, "warmup_steps": 1})
    from statelab.train import train

    res = train(spec, registry=registry, out_dir=tmp_path, progress=False)
    model = statelab.load(res.run_dir, registry=registry)
    assert torch.isfinite(torch.tensor(res.best_val_loss))
    # the memory's state after two stream segments holds traces from both
    x = torch.randint(0, 256, (1, 32))
    _, s1, _ = model(x[:, :16])
    _, s2, _ = model(x[:, 16:], {k: v.detach() for k, v in s1.items()})
    assert int(s1["memory.0.count"][0]) == 16 and int(s2["memory.0.count"][0]) == 32
