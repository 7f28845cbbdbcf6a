"""K-SSM speed: training tokens/s against a plain Mamba of the same parameter count, and the
mean-field Kuramoto step against the O(N^2) pairwise reference at N=128 and N=1024.

    python benchmarks/kssm/kssm_bench.py --device cpu
    python benchmarks/kssm/kssm_bench.py --device cuda

Training throughput: model sizes from configs/kssm.yaml (``--set`` overrides apply, e.g.
``--set model.d_model=64``); the Mamba (mamba1 mixer, same n_layers) gets the d_model whose
parameter count is closest. Each model runs ``--warmup`` then ``--steps`` AdamW steps
(forward, backward, update) on random tokens (B, T); on CUDA under bf16 autocast like the
trainer's ``precision: auto``. Kuramoto step: one Euler substep on (B, N) phases, no grad,
median of ``--repeats`` timings. Figures are printed and written to ``--results`` between
markers, one section per device.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from evaluate import _replace_section, derive  # noqa: E402

BEGIN, END = "<!-- kssm-eval:begin -->", "<!-- kssm-eval:end -->"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def train_throughput(doc: dict, vocab: int, device: str, B: int, T: int, warmup: int, steps: int) -> tuple[int, float]:
    import statelab
    import torch.nn.functional as F

    model = statelab.build(doc, vocab_size=vocab).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    tok = torch.randint(0, vocab, (B, T + 1), generator=g).to(device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else contextlib.nullcontext()

    def one():
        with amp:
            logits, _, aux = model(tok[:, :-1])
            loss = F.cross_entropy(logits.float().reshape(-1, vocab), tok[:, 1:].reshape(-1))
            reg, _ = model.regularization(aux)
            if reg is not None:
                loss = loss + reg
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    for _ in range(warmup):
        one()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        one()
    _sync(device)
    return model.num_parameters(), B * T * steps / (time.perf_counter() - t0)


def step_timing(N: int, B: int, device: str, repeats: int) -> tuple[float, float, float]:
    from kssm_oscillators.kssm import mean_field_substep
    from kssm_oscillators.naive import kuramoto_substep_naive

    g = torch.Generator().manual_seed(0)
    theta, rate, f_re, f_im = ((torch.rand(B, N, generator=g) * 2 - 1) * 3.14159 for _ in range(4))
    coupling = torch.rand(B, N, generator=g)
    args = [t.to(device) for t in (theta, rate, coupling, f_re, f_im)]

    def timed(fn):
        out = fn(*args, 0.5)
        times = []
        for _ in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            out = fn(*args, 0.5)
            _sync(device)
            times.append(time.perf_counter() - t0)
        return statistics.median(times), out

    with torch.no_grad():
        t_fast, a = timed(mean_field_substep)
        t_slow, b = timed(kuramoto_substep_naive)
    return t_fast, t_slow, (a - b).abs().max().item()


def recurrence_timing(B: int, T: int, N: int, substeps: int, device: str, repeats: int) -> list[tuple[str, float, float]]:
    """One layer's phase recurrence, forward + backward, reference loop against the fused kernel."""
    from kssm_oscillators.kssm import KuramotoLayer

    layer = KuramotoLayer(8, n_oscillators=N, group_levels=[1], substeps=substeps, grad_horizon=4).to(device).train()
    g = torch.Generator().manual_seed(0)
    ins = [(torch.rand(B, N, generator=g) * 2 - 1) * 3.14159] + [torch.randn(B, T, N, generator=g) * 0.7 for _ in range(4)]
    ins = [t.to(device).requires_grad_() for t in ins]
    rows, ref = [], None
    for kernel in ("torch", "triton"):
        layer.kernel = kernel

        def one():
            out = layer.integrate(*ins)
            torch.autograd.grad(torch.sin(out).sum(), ins)
            return out

        out = one()
        times = []
        for _ in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            one()
            _sync(device)
            times.append(time.perf_counter() - t0)
        ref = out if ref is None else ref
        rows.append((kernel, statistics.median(times), (out - ref).abs().max().item()))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--config", default=str(ROOT / "configs" / "kssm.yaml"))
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the config's train.batch_size")
    ap.add_argument("--seq-len", type=int, default=None, help="default: the config's train.seq_len")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--step-batch", type=int, default=32, help="batch of the Kuramoto step timing")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--kernels", default=None,
                    help="comma list of K-SSM recurrence kernels to time (e.g. triton,torch); default: the config's")
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "kssm" / "RESULTS.md"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from statelab.data import corpus_vocab_size
    from statelab.spec import parse_spec
    from statelab.train import apply_overrides

    base = apply_overrides(yaml.safe_load(Path(args.config).read_text()), args.overrides)
    vocab = corpus_vocab_size(parse_spec(base))
    B = args.batch_size or base.get("train", {}).get("batch_size", 32)
    T = args.seq_len or base.get("train", {}).get("seq_len", 128)
    dev = args.device
    where = torch.cuda.get_device_name(0) if dev.startswith("cuda") else f"CPU ({torch.get_num_threads()} threads)"
    lines = [BEGIN, f"### Speed on {where}", "", f"`python benchmarks/kssm/kssm_bench.py {' '.join(sys.argv[1:])}`", ""]

    if not args.skip_train:
        lines += [f"Training step (forward + backward + AdamW), B={B}, T={T}, vocab {vocab}:", "",
                  "| model | params | tokens/s |", "|---|---|---|"]
        kernels = args.kernels.split(",") if args.kernels else [None]
        for variant, kernel in [("kssm", k) for k in kernels] + [("mamba", None)]:
            doc = derive(base, variant, vocab)
            if kernel:
                doc["model"]["backbone"]["kernel"] = kernel
            n, tps = train_throughput(doc, vocab, dev, B, T, args.warmup, args.steps)
            bb = doc["model"]["backbone"]
            desc = f"{variant} (d_model {doc['model']['d_model']}, {bb.get('n_layers')} layers" + (
                f", N={bb.get('n_oscillators', 128)}, substeps {bb.get('substeps', 1)}, kernel {bb.get('kernel', 'auto')})"
                if variant == "kssm" else ", mamba1)")
            lines.append(f"| {desc} | {n:,} | {tps:,.0f} |")
            print(lines[-1], flush=True)
        lines.append("")
        if args.kernels and "triton" in kernels:
            bb = base["model"]["backbone"]
            N, S = bb.get("n_oscillators", 128), bb.get("substeps", 1)
            lines += [f"The phase recurrence alone (one layer, B={B}, T={T}, N={N}, substeps {S}, forward + backward, "
                      f"median of {args.repeats}):", "", "| kernel | time | max abs diff of the phases |", "|---|---|---|"]
            for kernel, t, diff in recurrence_timing(B, T, N, S, dev, args.repeats):
                lines.append(f"| {kernel} | {t * 1e3:,.2f} ms | {diff:.1e} |")
                print(lines[-1], flush=True)
            lines.append("")

    lines += [f"One Kuramoto Euler substep on (B={args.step_batch}, N) phases, median of {args.repeats}:", "",
              "| N | mean field O(N) | pairwise O(N^2) | speed-up | max abs diff |", "|---|---|---|---|---|"]
    for N in (128, 1024):
        fast, slow, diff = step_timing(N, args.step_batch, dev, args.repeats)
        lines.append(f"| {N} | {fast * 1e6:,.1f} us | {slow * 1e6:,.1f} us | {slow / fast:,.1f}x | {diff:.1e} |")
        print(lines[-1], flush=True)
    lines.append(END)
    section = "\n".join(lines)
    print(section)
    res = Path(args.results)
    text = res.read_text() if res.exists() else "# K-SSM results\n\n"
    res.write_text(_replace_section(text, section, f"### Speed on {where}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
