"""Fact QA of a trained `then` model: held-out templates, updates, real-text haystacks, ablation.

    python benchmarks/then/fact_qa.py RUN [--docs 200] [--lengths 1024 4096] [--keys 1 3] [--haystack-docs 50]
        [--out FILE.json]

Tasks (documents from then_memory.facts with seed 1; the training text used seed 0 and the
training templates only):
- fact_qa:        1-4 facts per document, Tiny Shakespeare filler, held-out statement,
                  update and question templates; an update in 30% of documents
- updated:        the same, every document updates one fact (the answer is the new value)
- preferences:    preferences stated early, probed after real text (held-out templates)
- haystack@L/Kk:  K facts at random depths in L characters (= byte tokens) of Tiny Shakespeare
Each with the model as trained and with the trace read-out forced to zero (no memory).
Accuracy: exact match of the answer's value; 95% Wilson intervals; `stopped`: answers that
ended with the end-of-answer marker.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="checkpoint or run directory")
    ap.add_argument("--docs", type=int, default=200, help="documents per task")
    ap.add_argument("--lengths", type=int, nargs="*", default=[1024, 4096], help="haystack lengths (tokens)")
    ap.add_argument("--keys", type=int, nargs="*", default=[1, 3], help="facts per haystack document")
    ap.add_argument("--haystack-docs", type=int, default=50, help="documents per haystack cell")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import statelab
    from then_memory.factqa import evaluate_fact_qa
    from then_memory.facts import fact_document, long_fact_document, preference_document

    model = statelab.load(args.run)
    tok = model.tokenizer
    rng = np.random.default_rng(1)
    tasks = {
        "fact_qa": [fact_document(rng, n_facts=int(rng.integers(1, 5)), split="eval") for _ in range(args.docs)],
        "updated": [fact_document(rng, n_facts=int(rng.integers(1, 5)), split="eval", update_p=1.0)
                    for _ in range(args.docs)],
        "preferences": [preference_document(rng, split="eval") for _ in range(args.docs)],
    }
    for L in args.lengths:
        for k in args.keys:
            tasks[f"haystack@{L}/{k}k"] = [long_fact_document(rng, L, n_keys=k) for _ in range(args.haystack_docs)]
    rows = {}
    for name, docs in tasks.items():
        for ablate in (False, True):
            t0 = time.perf_counter()
            r = evaluate_fact_qa(model, tok, docs, ablate=ablate)
            lo, hi = r.interval
            key = f"{name}{' (no memory)' if ablate else ''}"
            rows[key] = {"acc": r.accuracy, "ci95": [lo, hi], "n": r.total, "stopped": r.stopped / max(r.total, 1),
                         "seconds": time.perf_counter() - t0, "examples": r.answers[:3]}
            print(f"{key:28s} acc {r.accuracy:.3f} [{lo:.3f}, {hi:.3f}] n={r.total} stopped {r.stopped / r.total:.2f}",
                  flush=True)
    if args.out:
        from statelab.io import atomic_write_text

        atomic_write_text(args.out, json.dumps({"run": args.run, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
