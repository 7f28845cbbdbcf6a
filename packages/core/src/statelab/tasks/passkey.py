"""The ``passkey`` task: retrieve a key hidden in a haystack (needle in a haystack).

Two haystacks: ``landmark``, the repeated grass/sky/sun sentence of the Landmark-attention
protocol, and ``text``, windows of a real corpus (RULER's S-NIAH with an essay haystack;
Hsieh et al., 2024). With ``keys > 1`` every document hides that many named keys and asks for
one (RULER's MK-NIAH). Training documents have ``train_len`` tokens and a uniform random depth;
the loss counts only the answer (`` K.``). Training haystacks come from the corpus's training
split, evaluation haystacks from its held-out split.

The score is exact match on a grid of lengths (in tokens) x depths, ``per_cell`` documents
each: a document counts when every answer token, the closing ``.`` included, is the argmax
given the tokens before it (with teacher forcing this equals greedy decoding of the answer).
``tables["passkey"]`` has one row per cell with ``length_tokens``, ``length_chars`` (mean
characters of the prompt: what a token length means for this tokenizer), ``depth`` and
``accuracy``; the report draws it as a heatmap.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from statelab.data.base import VAL
from statelab.interfaces import Metric, Task, TaskContext, TaskResult


class PasskeyTask(Task):
    metrics = (
        Metric("accuracy", True, "share of grid documents whose whole answer is right"),
        Metric("loss", False, "cross-entropy on the answer tokens of the grid documents, nats"),
    )
    primary = "accuracy"

    def spec_overrides(self):
        return {**super().spec_overrides(), "train.seq_len": self.params.train_len - 1}

    def tokenizer(self, spec):
        from statelab.data.passkey import NIAH_ALPHABET
        from statelab.data.text import corpus_alphabet, read_corpus
        from statelab.tokenizers import CharTokenizer, make_tokenizer

        if spec.tokenizer.kind != "char":
            return make_tokenizer(spec.tokenizer)
        chars = NIAH_ALPHABET
        if self.params.filler == "text":
            chars += corpus_alphabet(read_corpus(self.params.corpus), spec.data.cache_dir)
        return CharTokenizer("".join(sorted(set(chars))))

    def make_data(self, spec, seed: int):
        from statelab.data.passkey import Haystack, NeedleData

        p = self.params
        tok = self.tokenizer(spec)
        if p.filler == "text":
            from statelab.data.text import read_corpus, tokenize_corpus

            train, val, _ = tokenize_corpus(read_corpus(p.corpus), tok, 0.1, spec.data.cache_dir)
            hays = Haystack(tok, train), Haystack(tok, val)
        else:
            hays = Haystack(tok), Haystack(tok)
        return NeedleData(tok, *hays, n_keys=p.keys, digits=p.digits, seed=seed, depths=p.depths)

    @torch.no_grad()
    def evaluate(self, model, data, ctx: TaskContext) -> TaskResult:
        p = self.params
        was = model.training
        model.eval()
        rows, per_doc, loss_sum, n_tokens = [], [], 0.0, 0
        try:
            for li, length in enumerate(p.lengths):
                for di, depth in enumerate(p.depths):
                    docs = [data.document(VAL, length, depth, 1000 + li, di, i) for i in range(p.per_cell)]
                    batch = data.rows(docs).to(ctx.device)
                    logits, _, _ = model(batch.x)  # (B, T, V)
                    ce = F.cross_entropy(logits.float().transpose(1, 2), batch.y, reduction="none")  # (B, T)
                    right = ((logits.argmax(-1) == batch.y) | ~batch.mask).all(dim=1)  # (B,)
                    loss_sum += float((ce * batch.mask).sum())
                    n_tokens += int(batch.mask.sum())
                    per_doc += right.double().tolist()
                    rows.append({"length_tokens": length, "depth": depth, "filler": p.filler, "keys": p.keys,
                                 "length_chars": sum(d.prompt_chars for d in docs) / len(docs),
                                 "accuracy": float(right.double().mean())})
        finally:
            model.train(was)
        metrics = {"accuracy": sum(per_doc) / len(per_doc), "loss": loss_sum / n_tokens}
        for length in p.lengths:
            cell = [r["accuracy"] for r in rows if r["length_tokens"] == length]
            metrics[f"accuracy@{length}"] = sum(cell) / len(cell)
        return TaskResult(metrics, samples={"document_accuracy": per_doc}, tables={"passkey": rows})


def build_passkey(params, ctx) -> PasskeyTask:
    return PasskeyTask(params)
