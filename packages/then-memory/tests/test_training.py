import re

import pytest
import torch

import statelab
from then_memory.corpus import make_passkey_corpus, passkey_document_text


def test_passkey_corpus_documents(tmp_path):
    out = tmp_path / "corpus.txt"
    base = "To be or not to be.\n\n" * 500
    stats = make_passkey_corpus(out, docs=12, lengths=[300, 600], seed=1, base_text=base)
    text = out.read_text()
    assert stats["passkey_docs"] == 12 and stats["chars"] == len(text) and stats["min_gap"] == 600
    lines = re.findall(r"The pass key is (\d{5})\. Remember it\. (\d{5}) is the pass key\.", text)
    answers = re.findall(r"What is the pass key\? The pass key is (\d{5})\.", text)
    assert len(lines) == len(answers) == 12
    assert all(a == b == c for (a, b), c in zip(lines, answers))
    # at least min_gap characters of the base text between one document's answer and the next document
    ends = [m.end() for m in re.finditer(r"The pass key is \d{5}\.\n\n", text)]
    starts = [m.start() for m in re.finditer(r"(The grass|\nThe pass key is \d{5}\. Remember)", text)]
    for e in ends[:-1]:
        nxt = min(s for s in starts if s >= e)
        assert nxt - e >= 600, (e, nxt)
    with pytest.raises(ValueError, match="at most 8 documents"):
        make_passkey_corpus(out, docs=20, lengths=[300, 1200], base_text=base)
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


class _ConvThen(torch.nn.Module):
    """Embedding + causal convolution (8 tokens of context) + a `then` memory + tied head:
    the only path from the key line to the question (> window tokens apart) is a trace."""

    def __init__(self, vocab: int, d: int = 64) -> None:
        super().__init__()
        from then_memory.memory import ThenMemory

        self.emb = torch.nn.Embedding(vocab, d)
        self.conv = torch.nn.Conv1d(d, d, 8)
        self.mem = ThenMemory(d, n_heads=2, chunk_size=16, window=16, ring_size=256, top_k=16)
        self.ln = torch.nn.LayerNorm(d)

    def forward(self, x, state=None):
        e = self.emb(x)  # (B, T, d)
        h = e + self.conv(torch.nn.functional.pad(e.transpose(1, 2), (7, 0))).transpose(1, 2)  # (B, T, d)
        y, state, _ = self.mem(h, state)
        return self.ln(y) @ self.emb.weight.T, state  # (B, T, V)


def test_read_path_learns_passkey_retrieval_through_traces():
    """With trace_key=previous, tied q/k init and a sharp trace softmax, the induction lookup
    is learned in a few hundred steps; forcing the recall to zero takes it back to chance."""
    from statelab.data.passkey import PasskeyData, make_passkey_example, passkey_tokenizer
    from statelab.spec import PasskeySpec, TokenizerSpec

    torch.manual_seed(0)
    tok = passkey_tokenizer(TokenizerSpec(kind="char"))
    model = _ConvThen(tok.vocab_size)
    data = PasskeyData(tok, PasskeySpec(lengths=[128], digits=5), seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for step in range(120):
        b = data.train_batch(step, 8, 128)
        logits, _ = model(b.x)
        loss = torch.nn.functional.cross_entropy(logits[b.mask], b.y[b.mask])
        opt.zero_grad()
        loss.backward()
        opt.step()
    # longer documents than in training, ingested in segments: the key is only in the traces
    import numpy as np

    rng = np.random.default_rng(1)
    model.eval()
    model.mem.ring_size = 1024
    ids, n_ans = [], None
    for depth in np.linspace(0, 1, 8):
        ex = make_passkey_example(tok, 1000, float(depth), rng)
        ids.append(ex.ids + ex.answer_ids)
        n_ans = len(ex.answer_ids)
    ids = torch.tensor(ids)  # (8, 1000 + answer)
    n_doc = ids.shape[1] - n_ans - 38  # the question (38 tokens) and answer come after the ingest
    correct = {}
    for forced in (False, True):
        with torch.no_grad(), statelab.intervene({"memory.recall": 0.0} if forced else {}):
            state = None
            for a in range(0, n_doc, 256):
                _, state = model(ids[:, a : min(a + 256, n_doc)], state)
            logits, _ = model(ids[:, n_doc:-1], state)
        pred = logits[:, -n_ans:].argmax(-1)  # (8, answer) teacher-forced answer tokens
        correct[forced] = (pred[:, 1:] == ids[:, -n_ans + 1 :]).float().mean().item()  # the digits
    assert correct[False] >= 0.95, correct
    assert correct[True] <= 0.3, correct
