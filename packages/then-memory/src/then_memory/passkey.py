"""Probe ``passkey``: the Landmark-attention passkey protocol in ingest-then-query mode.

For each length ``L`` and depth ``d`` (``trials`` times): a document of ``L`` tokens of filler
with "The pass key is K. Remember it. K is the pass key." at depth ``d`` is *ingested*
(the frozen model runs over it without gradient, segment by segment, and keeps only its
state: recurrent state, local window and traces); then the question "What is the pass
key? The pass key is" is run from that state and the answer decoded greedily (as many
tokens as the answer " K" has, so a model that never learned where a key ends is not
penalised for the token after it; a shorter or wrong number still fails). The key is in
the memory only, never in the question's tokens. Exact match on the first number.

Every trace of a document stays readable: the ring of each ``then`` memory is enlarged for
the probe to hold the longest document's traces (``ring_size`` overrides), so the read is
the top-k over all of them, exactly what a memory backed by a trace store reads at
inference (the ring holds no parameters; it is restored afterwards).

Params: :class:`then_memory.plugin.PasskeyParams`. Metrics: ``acc@<L>`` per length,
``acc@<L>@<d>`` per cell, ``acc`` overall; artifacts ``passkey.md`` (table) and
``passkey.png`` (heatmap); ``passed``: accuracy at ``pass_length`` >= ``pass_threshold``.
Documents come from ``statelab.data.passkey`` (the same generator the training data uses).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from statelab.interfaces import Probe, ProbeContext, ProbeResult

if TYPE_CHECKING:  # pragma: no cover
    from then_memory.plugin import PasskeyParams


class PasskeyProbe(Probe):
    def __init__(self, params: "PasskeyParams") -> None:
        self.p = params

    def run(self, model, ctx: ProbeContext) -> ProbeResult:
        from statelab.data.passkey import QUESTION, SEP, make_passkey_example, passkey_accuracy
        from statelab.generation import generate

        from then_memory.memory import ThenMemory
        from then_memory.users import ingest_tokens

        tok = ctx.tokenizer if ctx.tokenizer is not None else getattr(model, "tokenizer", None)
        if tok is None:
            raise ValueError("passkey: the probe needs a tokenizer (ProbeContext.tokenizer or model.tokenizer)")
        p = self.p
        q_ids = list(tok.encode(SEP)) + list(tok.encode(QUESTION))
        rng = np.random.default_rng(ctx.seed)
        # ring of every `then` memory: big enough for every trace of a document (or as asked)
        mems = [m for m in model.modules() if isinstance(m, ThenMemory)]
        rings = [m.ring_size for m in mems]
        was = model.training
        model.eval()
        device = next(model.parameters()).device
        acc: dict[tuple[int, float], float] = {}
        try:
            for L in p.lengths:
                for m, r in zip(mems, rings):  # every trace of the document stays readable
                    need = L if m.trace_mode == "token" else L // m.chunk_size + 1
                    m.ring_size = p.ring_size if p.ring_size is not None else max(r, need)
                for d in p.depths:
                    preds: list[str] = []
                    keys: list[str] = []
                    for a in range(0, p.trials, p.batch_size):
                        exs = [make_passkey_example(tok, L, d, rng, p.digits) for _ in range(min(p.batch_size, p.trials - a))]
                        for ex in exs:
                            if ex.ids[-len(q_ids):] != q_ids:  # pragma: no cover - the generator's layout changed
                                raise RuntimeError("passkey: the example does not end with the question")
                        max_new = max(len(ex.answer_ids) for ex in exs)  # " K": as many tokens as the answer
                        ids = torch.tensor([ex.ids for ex in exs], device=device)  # (b, L)
                        if p.mode == "ingest":
                            state = ingest_tokens(model, ids[:, : -len(q_ids)], None, p.segment_len)
                            prompt = ids[:, -len(q_ids):]  # (b, |question|): no key in it
                        else:
                            state = ingest_tokens(model, ids[:, :-1], None, p.segment_len)
                            prompt = ids[:, -1:]
                        with torch.no_grad():
                            res = generate(model, prompt, tokenizer=tok, max_new_tokens=max_new, temperature=0.0,
                                           state=state, use_planner=False)
                        preds += [tok.decode(t) for t in res.tokens]
                        keys += [ex.key for ex in exs]
                    acc[(L, d)] = passkey_accuracy(preds, keys)
        finally:
            model.train(was)
            for m, r in zip(mems, rings):
                m.ring_size = r
        return self._report(acc, ctx.out_dir)

    def _report(self, acc: dict[tuple[int, float], float], out_dir: Path) -> ProbeResult:
        p = self.p
        metrics: dict[str, float] = {}
        for L in p.lengths:
            metrics[f"acc@{L}"] = float(np.mean([acc[(L, d)] for d in p.depths]))
            for d in p.depths:
                metrics[f"acc@{L}@{d:g}"] = acc[(L, d)]
        metrics["acc"] = float(np.mean(list(acc.values())))
        judge = min(p.lengths, key=lambda L: abs(L - p.pass_length))
        metrics["pass_length"] = float(judge)
        passed = metrics[f"acc@{judge}"] >= p.pass_threshold
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        head = "| length | " + " | ".join(f"depth {d:.0%}" for d in p.depths) + " | mean |"
        rows = [head, "|" + "---|" * (len(p.depths) + 2)]
        for L in p.lengths:
            cells = " | ".join(f"{acc[(L, d)]:.2f}" for d in p.depths)
            rows.append(f"| {L} | {cells} | {metrics[f'acc@{L}']:.2f} |")
        table = out_dir / "passkey.md"
        table.write_text(
            f"Passkey retrieval ({p.mode} mode, {p.trials} trials per cell, {p.digits} digits, greedy, exact match)\n\n"
            + "\n".join(rows) + "\n"
        )
        artifacts = {"table": table}
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            grid = np.array([[acc[(L, d)] for d in p.depths] for L in p.lengths])  # (lengths, depths)
            fig, ax = plt.subplots(figsize=(1.2 * len(p.depths) + 2, 0.5 * len(p.lengths) + 1.5))
            im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
            ax.set_xticks(range(len(p.depths)), [f"{d:.0%}" for d in p.depths])
            ax.set_yticks(range(len(p.lengths)), [str(L) for L in p.lengths])
            ax.set_xlabel("key depth")
            ax.set_ylabel("document length (tokens)")
            ax.set_title(f"passkey accuracy ({p.mode})")
            for i in range(grid.shape[0]):
                for j in range(grid.shape[1]):
                    ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", color="w" if grid[i, j] < 0.6 else "k")
            fig.colorbar(im, ax=ax)
            fig.tight_layout()
            png = out_dir / "passkey.png"
            fig.savefig(png, dpi=100)
            plt.close(fig)
            artifacts["heatmap"] = png
        except ImportError:  # pragma: no cover - matplotlib is optional
            pass
        verdict = "retrieves" if passed else ("partial" if metrics["acc"] > 0 else "fails")
        assert not math.isnan(metrics["acc"])
        return ProbeResult(metrics, verdict=verdict, passed=passed, artifacts=artifacts)


def build_passkey(params: "PasskeyParams", ctx) -> PasskeyProbe:
    return PasskeyProbe(params)
