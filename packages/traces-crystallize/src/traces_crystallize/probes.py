"""Probes: ``motifs`` (motif table, FLOP reduction, routing flow plot) and ``traces``
(trace memory bytes per layer, heatmap of one head's trace matrix)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from statelab.interfaces import Probe, ProbeContext, ProbeResult


def _windows(ctx: ProbeContext, vocab: int, batches: int, batch_size: int, seq_len: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(ctx.seed)
    toks = ctx.val_tokens
    out = []
    for _ in range(batches):
        if toks is None or len(toks) <= seq_len + 1:
            out.append(torch.randint(0, vocab, (batch_size, seq_len), generator=g))
        else:
            i = torch.randint(0, len(toks) - seq_len, (batch_size,), generator=g)
            out.append(torch.stack([toks[j : j + seq_len] for j in i.tolist()]))
    return [x.to(ctx.device) for x in out]


def _val_loss(model, xs) -> float:
    with torch.no_grad():
        losses = [F.cross_entropy(model(x)[0][:, :-1].flatten(0, 1).float(), x[:, 1:].flatten()) for x in xs]
    return float(torch.stack(losses).mean())


def flow_plot(paths: torch.Tensor, n_experts: int, motifs: list[dict], path: Path) -> Path:
    """Routing flow: experts per layer as nodes, a band per (layer, expert) -> (layer+1, expert')
    transition with width proportional to its token count; motif paths drawn in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L = paths.shape[1]
    fig, ax = plt.subplots(figsize=(1.6 * L + 2, 0.5 * n_experts + 2))
    N = max(paths.shape[0], 1)
    for layer in range(L - 1):
        pair = paths[:, layer] * n_experts + paths[:, layer + 1]  # (N,)
        counts = torch.bincount(pair, minlength=n_experts * n_experts).tolist()
        for code, c in enumerate(counts):
            if c:
                a, b = divmod(code, n_experts)
                ax.plot([layer, layer + 1], [a, b], color="tab:blue", alpha=0.5, lw=0.3 + 12 * c / N, solid_capstyle="butt")
    for m in motifs:
        xs = list(range(m["start"], m["start"] + len(m["experts"])))
        ax.plot(xs, m["experts"], color="tab:red", lw=2.5, marker="o")
    for layer in range(L):
        load = torch.bincount(paths[:, layer], minlength=n_experts).float() / N
        ax.scatter([layer] * n_experts, range(n_experts), s=20 + 600 * load.numpy(), color="black", zorder=3)
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("expert (first choice)")
    ax.set_title("routing flow (blue: token transitions, red: motifs)")
    ax.set_xticks(range(L))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


class MotifsProbe(Probe):
    def __init__(self, batches: int, batch_size: int, seq_len: int, crystallize: bool) -> None:
        self.batches, self.batch_size, self.seq_len, self.crystallize = batches, batch_size, seq_len, crystallize

    def run(self, model, ctx: ProbeContext) -> ProbeResult:
        from traces_crystallize.crystallize import crystallize_round, ffn_flops, measure

        bb = model.backbone
        if not bb.moe_layers():
            raise ValueError("motifs probe: the backbone has no MoE layers (use a transformer with ffn: moe)")
        was = model.training
        model.eval()
        xs = _windows(ctx, model.vocab_size, self.batches, self.batch_size, self.seq_len)
        metrics: dict[str, float] = {}
        try:
            if self.crystallize and bb.motifs is not None:
                for k, v in crystallize_round(model, xs[0]).items():
                    metrics[f"round.{k}"] = v
            rows = bb.motifs.listing() if bb.motifs is not None else []
            on = [ffn_flops(model, x, motifs_on=True) for x in xs]
            off = [ffn_flops(model, x, motifs_on=False) for x in xs]
            f_on, f_off = sum(o["ffn_flops"] for o in on), sum(o["ffn_flops"] for o in off)
            t_on, t_off = sum(o["total_flops"] for o in on), sum(o["total_flops"] for o in off)
            metrics["motifs"] = float(len(rows))
            metrics["ffn_flop_reduction"] = 1 - f_on / f_off if f_off else 0.0
            metrics["flop_reduction"] = 1 - t_on / t_off if t_off else 0.0
            metrics["val_loss"] = _val_loss(model, xs)
            if bb.motifs is not None and bb.motifs.n_active:
                saved = bb.motifs.n_active
                bb.motifs.n_active = 0
                try:
                    metrics["val_loss_no_motifs"] = _val_loss(model, xs)
                finally:
                    bb.motifs.n_active = saved
            if bb.trie is not None:
                metrics["trie_nodes"] = float(len(bb.trie))
                metrics["trie_bytes"] = float(bb.trie.nbytes())
                metrics["motif_table_bytes"] = float(bb.motifs.nbytes())
            ctx.out_dir.mkdir(parents=True, exist_ok=True)
            table = ctx.out_dir / "motifs.csv"
            with open(table, "w", newline="") as fh:
                w = csv.DictWriter(fh, fieldnames=["id", "start", "experts", "frequency", "utility", "entropy", "score"])
                w.writeheader()
                for r in rows:
                    w.writerow({**r, "experts": "-".join(map(str, r["experts"]))})
            paths = torch.cat([measure(model, x)["paths"] for x in xs[:2]]).cpu() if bb.motifs is not None else None
            if paths is None:
                paths = self._paths_plain(model, xs[:2])
            plot = flow_plot(paths, bb.params.n_experts, rows, ctx.out_dir / "routing_flow.png")
        finally:
            model.train(was)
        return ProbeResult(metrics, artifacts={"motifs_table": table, "routing_flow": plot})

    @staticmethod
    def _paths_plain(model, xs) -> torch.Tensor:
        out = []
        with torch.no_grad():
            for x in xs:
                _, _, aux = model(x)
                ex = [v[..., 0].reshape(-1) for k, v in sorted(aux.items(), key=lambda kv: int(kv[0].split(":")[0].split(".")[-1])) if k.endswith(":router.experts")]
                out.append(torch.stack(ex, 1))
        return torch.cat(out).cpu()


def trace_heatmap(bias_by_offset: torch.Tensor, size: int, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    i = torch.arange(size)
    off = i[:, None] - i[None, :]  # (size, size)
    mat = torch.where(off >= 0, bias_by_offset[off.clamp(min=0)], torch.full(off.shape, float("nan")))
    fig, ax = plt.subplots(figsize=(5, 4.5))
    im = ax.imshow(mat.numpy(), cmap="viridis", origin="upper")
    fig.colorbar(im, ax=ax, label="trace M[i - j]")
    ax.set_xlabel("key position j")
    ax.set_ylabel("query position i")
    ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


class TracesProbe(Probe):
    def __init__(self, layer: int, head: int, size: int) -> None:
        self.layer, self.head, self.size = layer, head, size

    def run(self, model, ctx: ProbeContext) -> ProbeResult:
        bb = model.backbone
        stores = [getattr(getattr(b, "attn", None), "traces", None) for b in bb.layers]
        if all(s is None for s in stores):
            raise ValueError("traces probe: no layer keeps traces (set traces.enabled: true on a transformer backbone)")
        if not 0 <= self.layer < len(stores) or stores[self.layer] is None:
            raise ValueError(f"traces probe: layer {self.layer} has no traces; layers with traces: "
                             f"{[i for i, s in enumerate(stores) if s is not None]}")
        store = stores[self.layer]
        if not 0 <= self.head < store.n_heads:
            raise ValueError(f"traces probe: head {self.head} out of range 0..{store.n_heads - 1}")
        metrics: dict[str, float] = {}
        total = 0
        for i, s in enumerate(stores):
            if s is not None:
                metrics[f"bytes.layer{i}"] = float(s.nbytes())
                metrics[f"entries.layer{i}"] = float(s.n_live)
                metrics[f"utilization.layer{i}"] = float(s.use.mean())
                total += s.nbytes()
        metrics["bytes_total"] = float(total)
        metrics["entries_total"] = float(sum(s.n_live for s in stores if s is not None))
        metrics["max_value"] = float(max(float(s.val.max()) for s in stores if s is not None))
        ctx.out_dir.mkdir(parents=True, exist_ok=True)
        dense = store.dense(self.size)[self.head].detach().cpu()
        plot = trace_heatmap(dense, self.size, ctx.out_dir / f"traces_l{self.layer}_h{self.head}.png",
                             f"traces, layer {self.layer} head {self.head} ({store.n_live} entries in layer)")
        entries = ctx.out_dir / "traces.json"
        entries.write_text(json.dumps({f"layer{i}": {"head_entries": (s.off >= 0).sum(1).tolist()} for i, s in enumerate(stores) if s is not None}))
        return ProbeResult(metrics, artifacts={"trace_heatmap": plot, "trace_entries": entries})


def motifs(params, ctx) -> MotifsProbe:
    return MotifsProbe(params.batches, params.batch_size, params.seq_len, params.crystallize)


def traces(params, ctx) -> TracesProbe:
    return TracesProbe(params.layer, params.head, params.size)
