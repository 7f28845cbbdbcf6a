"""Tokenizer and data-pipeline throughput (statelab.tokenizers, statelab.data).

What it shows: tokenizing the bundled 1.1 MB Tiny Shakespeare with char/byte takes well under
a second (goal: < 1 s), our BPE trainer builds the 1024 vocabulary in about a second, a cached
corpus loads in milliseconds, and producing a batch (random windows, streams, MQAR, passkey)
costs far less than a training step, so the batcher is never the bottleneck.

    python benchmarks/core/data_throughput.py                      # CPU
    python benchmarks/core/data_throughput.py --device cuda        # also times Batch.to(cuda)
    python benchmarks/core/data_throughput.py --out benchmarks/core/data_throughput.md

Prints a markdown section (and writes it to --out when given).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import torch

from statelab.data import bundled_corpus_path, make_data
from statelab.spec import parse_spec
from statelab.tokenizers import ByteTokenizer, CharTokenizer, load_bpe, train_bpe


def best_of(fn, repeats: int) -> float:
    """Smallest wall time of ``repeats`` calls (seconds)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def spec(cache: str, **overrides) -> object:
    doc = {"model": {"backbone": {"kind": "any"}}, "data": {"cache_dir": cache}}
    for k, v in overrides.items():
        doc[k] = {**doc.get(k, {}), **v}
    return parse_spec(doc)


def batch_rate(ds, B: int, T: int, mode: str, device: str, n: int) -> tuple[float, float]:
    """(ms per batch, million tokens per second) for n consecutive steps, including the copy to device."""
    def run():
        for step in range(n):
            b = ds.train_batch(step, B, T, mode=mode).to(device, non_blocking=True)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return b

    run()  # warm-up (page cache, CUDA context)
    sec = best_of(run, 3)
    return 1e3 * sec / n, B * T * n / sec / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu | cuda: batches are moved there, as the trainer does")
    ap.add_argument("--out", help="write the markdown section to this file")
    ap.add_argument("--steps", type=int, default=200, help="batches per timing")
    args = ap.parse_args()

    text = bundled_corpus_path().read_text(encoding="utf-8")
    train_text = text[: int(len(text) * 0.9)]
    rows = []
    char = CharTokenizer.from_corpus(text)
    bpe = load_bpe(name="shakespeare-1024")
    for name, tok in (("char", char), ("byte", ByteTokenizer()), ("bpe shakespeare-1024", bpe)):
        sec = best_of(lambda: tok.encode_array(text), 3)
        n = len(tok.encode_array(text))
        rate = len(text) / sec / 1e6
        rows.append(f"| tokenize 1.1 MB corpus, {name} | {sec * 1e3:.0f} ms | {n:,} tokens, {rate:.1f} M chars/s |")
        sec = best_of(lambda: tok.decode(tok.encode_array(text).tolist()), 1)
        rows.append(f"| decode it back, {name} | {sec * 1e3:.0f} ms | |")
    sec = best_of(lambda: train_bpe(train_text, 1024), 1)
    rows.append(f"| train BPE vocab 1024 on 1.0 MB (ours) | {sec:.2f} s | |")

    with tempfile.TemporaryDirectory() as cache:
        for tk in ({"kind": "char"}, {"kind": "bpe", "name": "shakespeare-1024"}):
            s = spec(cache, tokenizer=tk)
            cold = best_of(lambda: make_data(s), 1)
            warm = best_of(lambda: make_data(s), 5)
            rows.append(f"| make_data {tk['kind']}: first run (tokenize + cache) / cached | {cold * 1e3:.0f} ms / "
                        f"{warm * 1e3:.1f} ms | memory-mapped .npy |")
        ds = make_data(spec(cache))
        for B, T in ((64, 256), (16, 1024)):
            for mode in ("random", "stream"):
                ms, mtok = batch_rate(ds, B, T, mode, args.device, args.steps)
                rows.append(f"| train_batch text {mode}, B={B} T={T} | {ms:.3f} ms | {mtok:.0f} M tokens/s |")
        mq = make_data(spec(cache, data={"kind": "mqar"}, train={"seq_len": 256}))
        ms, mtok = batch_rate(mq, 64, 256, "random", args.device, args.steps)
        rows.append(f"| train_batch MQAR V=8192 P=16, B=64 T=256 | {ms:.3f} ms | {mtok:.1f} M tokens/s |")
        pk = make_data(spec(cache, data={"kind": "passkey"}, tokenizer={"kind": "byte"}))
        ms, mtok = batch_rate(pk, 16, 1024, "random", args.device, max(10, args.steps // 10))
        rows.append(f"| train_batch passkey (byte), B=16 T=1024 | {ms:.3f} ms | {mtok:.1f} M tokens/s |")

    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or platform.machine()
    md = "\n".join([
        f"### Tokenizers and data ({args.device}: {dev}, torch {torch.__version__}, {torch.get_num_threads()} threads)",
        "",
        f"Machine load average during the run: {os.getloadavg()[0]:.1f} "
        "(times are best of 3; a loaded machine inflates them).",
        "",
        "| what | time | throughput |",
        "|---|---|---|",
        *rows,
        "",
        "Reproduce: `python benchmarks/core/data_throughput.py"
        + (f" --device {args.device}`" if args.device != "cpu" else "`"),
        "",
    ])
    print(md)
    if args.out:
        from statelab.io import atomic_write_text

        atomic_write_text(args.out, md)


if __name__ == "__main__":
    main()
