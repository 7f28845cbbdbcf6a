"""Bounded load test of `statelab memory serve` on loopback: users, requests/s, p50/p99 latency.

    python benchmarks/then/serve_load.py RUN [--users 32] [--requests 400] [--clients 16]
        [--max-seconds 120] [--max-new-tokens 24] [--max-batch 16] [--out FILE.json]

Starts the server (a subprocess on 127.0.0.1, a free port), gives each of --users users one
fact document of then_memory.facts (held-out templates) through POST .../ingest, then sends
--requests read-only queries (each user asks about one of their own facts) from --clients
concurrent client threads, stopping early at --max-seconds. Reports the ingest and query
latencies (p50/p99), queries/s, how many queries shared a batched forward, the accuracy of
the answers (exact value) and whether any answer holds another user's value (leakage).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np


def call(port: int, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method,
                                 data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--users", type=int, default=32)
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--max-seconds", type=float, default=120)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the server")
    ap.add_argument("--root", default=None, help="users' directory (default: a fresh temporary one)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import tempfile

    from then_memory.facts import fact_document, question_prompt

    root = args.root or tempfile.mkdtemp(prefix="then-serve-")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    proc = subprocess.Popen([sys.executable, "-m", "statelab", "memory", "serve", "--model", args.run, "--root", root,
                             "--port", str(port), "--max-batch", str(args.max_batch)], env=env)
    try:
        t0 = time.time()
        while True:
            try:
                call(port, "GET", "/v1/health")
                break
            except OSError:
                if proc.poll() is not None or time.time() - t0 > 120:
                    raise SystemExit("the server did not start")
                time.sleep(0.2)
        rng = np.random.default_rng(2)
        docs = {f"user{i:04d}": fact_document(rng, n_facts=2, split="eval", update_p=0.0) for i in range(args.users)}
        ingest_s = []
        for u, d in docs.items():
            t = time.perf_counter()
            code, _ = call(port, "POST", f"/v1/users/{u}/ingest", {"text": d.context})
            assert code == 200, code
            ingest_s.append(time.perf_counter() - t)
        values = {u: {qa.value for qa in d.qas} for u, d in docs.items()}
        lat: list[float] = []
        ok = leaks = sent = 0
        lock = threading.Lock()
        deadline = time.perf_counter() + args.max_seconds
        names = list(docs)

        def client(c: int) -> None:
            nonlocal ok, leaks, sent
            r = np.random.default_rng(100 + c)
            while True:
                with lock:
                    if sent >= args.requests or time.perf_counter() > deadline:
                        return
                    sent += 1
                u = names[int(r.integers(len(names)))]
                qa = docs[u].qas[int(r.integers(len(docs[u].qas)))]
                t = time.perf_counter()
                code, res = call(port, "POST", f"/v1/users/{u}/query",
                                 {"prompt": question_prompt(qa.question), "max_new_tokens": args.max_new_tokens})
                dt = time.perf_counter() - t
                ans = res.get("answer", "")
                with lock:
                    lat.append(dt)
                    ok += int(code == 200 and qa.value in ans)
                    leaks += int(any(v in ans for w, vs in values.items() if w != u for v in vs))

        t_start = time.perf_counter()
        threads = [threading.Thread(target=client, args=(c,)) for c in range(args.clients)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        wall = time.perf_counter() - t_start
        health = call(port, "GET", "/v1/health")[1]
    finally:
        proc.terminate()
        proc.wait()
    res = {
        "run": args.run, "users": args.users, "clients": args.clients, "requests": len(lat), "seconds": wall,
        "requests_per_s": len(lat) / wall, "p50_ms": 1000 * float(np.percentile(lat, 50)),
        "p99_ms": 1000 * float(np.percentile(lat, 99)), "ingest_p50_ms": 1000 * float(np.percentile(ingest_s, 50)),
        "ingest_p99_ms": 1000 * float(np.percentile(ingest_s, 99)), "accuracy": ok / max(len(lat), 1),
        "answers_with_another_users_value": leaks, "batches": health["batches"],
        "mean_batch": health["batched_rows"] / max(health["batches"], 1), "max_new_tokens": args.max_new_tokens,
    }
    print(json.dumps(res, indent=1))
    if args.out:
        from statelab.io import atomic_write_text

        atomic_write_text(args.out, json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
