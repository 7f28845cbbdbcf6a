"""The ``lm`` task: next-token loss, bits per character and per byte on held-out text.

The data is the run's text data (``data.kind: text``: one file, several files, a folder or a
JSONL corpus, tokenized once into a memory-mapped cache; see :mod:`statelab.data.text`). The
score is over the validation split (the last ``data.val_fraction`` of the corpus), in
non-overlapping windows of ``seq_len`` tokens from a fresh state: ``loss`` (nats per token),
``bpc`` = loss / ln 2 / characters per token and ``bpb`` = loss / ln 2 / UTF-8 bytes per token
(the number that compares across tokenizers).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from statelab.interfaces import Metric, Task, TaskContext, TaskResult


class LMTask(Task):
    metrics = (
        Metric("bpb", False, "bits per UTF-8 byte of held-out text"),
        Metric("bpc", False, "bits per character of held-out text"),
        Metric("loss", False, "cross-entropy per token, nats"),
    )
    primary = "bpb"

    def spec_overrides(self):
        p = self.params
        out = {"data.kind": "text"}
        if p.path is not None:
            out["data.path"] = p.path
        if p.val_fraction is not None:
            out["data.val_fraction"] = p.val_fraction
        return out

    def make_data(self, spec, seed: int):
        from statelab.data.text import make_text_data

        return make_text_data(spec, seed)

    @torch.no_grad()
    def evaluate(self, model, data, ctx: TaskContext) -> TaskResult:
        p = self.params
        seq_len = p.seq_len or model.spec.train.seq_len
        was = model.training
        model.eval()
        per_batch, total, count = [], 0.0, 0
        try:
            for b in data.val_batches(p.eval_batch_size, seq_len, p.eval_batches):
                b = b.to(ctx.device)
                logits, _, _ = model(b.x)  # (B, T, V)
                ce = F.cross_entropy(logits.float().transpose(1, 2), b.y, reduction="none")  # (B, T)
                m = b.mask if b.mask is not None else torch.ones_like(b.y, dtype=torch.bool)
                s, n = float((ce * m).sum()), int(m.sum())
                per_batch.append(s / max(n, 1))
                total += s
                count += n
        finally:
            model.train(was)
        if count == 0:
            raise ValueError(f"the validation split has no window of {seq_len} tokens; lower seq_len or raise "
                             "data.val_fraction")
        loss = total / count
        chars = float(getattr(data, "chars_per_token", None) or data.bytes_per_token)
        bits = loss / math.log(2)
        return TaskResult({"loss": loss, "bpc": bits / chars, "bpb": bits / data.bytes_per_token,
                           "tokens": float(count)}, samples={"loss": per_batch})


def build_lm(params, ctx) -> LMTask:
    return LMTask(params)
