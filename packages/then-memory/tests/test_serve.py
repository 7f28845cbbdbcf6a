"""statelab memory serve: batching across users, isolation, wipe, kill -9 safety (loopback only)."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

import statelab
from statelab.tokenizers import ByteTokenizer

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from then_memory.serve import check_loopback  # noqa: E402
from then_memory.users import MemoryService  # noqa: E402

pytestmark = pytest.mark.slow


def small_spec():
    return {"name": "serve-toy", "tokenizer": {"kind": "byte"},
            "model": {"d_model": 16, "backbone": {"kind": "mamba", "mixer": "mamba1", "n_layers": 1},
                      "memories": [{"kind": "then", "after_layer": 0, "n_heads": 2, "chunk_size": 4, "window": 8,
                                    "ring_size": 64, "top_k": 4}]},
            "train": {"steps": 1, "batch_size": 1, "seq_len": 8}, "tracking": {"enabled": False}}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from statelab.checkpoint import save

    torch.manual_seed(0)
    model = statelab.build(small_spec())
    return save(tmp_path_factory.mktemp("serve") / "ckpt", model, tokenizer=ByteTokenizer())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, ckpt, root):
        self.port = free_port()
        env = dict(os.environ, OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "statelab", "memory", "serve", "--model", str(ckpt),
                                      "--root", str(root), "--port", str(self.port), "--batch-wait-ms", "20"],
                                     env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        t0 = time.time()
        while True:
            try:
                self.call("GET", "/v1/health")
                return
            except (urllib.error.URLError, ConnectionError):
                if self.proc.poll() is not None or time.time() - t0 > 60:
                    raise RuntimeError(f"server did not start: {self.proc.stderr.read().decode()[-2000:]}")
                time.sleep(0.2)

    def call(self, method, path, body=None):
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def kill9(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


FACTS = {"alice": "The shed code of Maria is 48213. " * 4, "bob": "The gate pin of Ivan is 90417. " * 4,
         "carol": "My favourite drink is cocoa. " * 4}


def test_loopback_only():
    for ok in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        assert check_loopback(ok) == ok
    for bad in ("0.0.0.0", "192.168.1.4", "example.com", "::"):
        with pytest.raises(ValueError, match="loopback only"):
            check_loopback(bad)


def test_users_batched_into_one_forward_see_only_their_memory(ckpt, tmp_path):
    root = tmp_path / "users"
    srv = Server(ckpt, root)
    try:
        for u, text in FACTS.items():
            assert srv.call("POST", f"/v1/users/{u}/ingest", {"text": text})[0] == 200
        answers = {}

        def ask(u):
            answers[u] = srv.call("POST", f"/v1/users/{u}/query", {"prompt": "The code is", "max_new_tokens": 8})

        threads = [threading.Thread(target=ask, args=(u,)) for u in FACTS]
        [t.start() for t in threads]
        [t.join() for t in threads]
        health = srv.call("GET", "/v1/health")[1]
        assert health["batched_rows"] == 3 and health["batches"] < 3  # at least two users in one forward
        assert srv.call("POST", "/v1/users/mallory/query", {"prompt": "x"})[0] == 404
        assert srv.call("POST", "/v1/users/Bad..id/query", {"prompt": "x"})[0] == 400
        assert srv.call("POST", "/v1/users/alice/query", {"prompt": "x", "max_new_tokens": "5"})[0] == 400
        assert not (root / "mallory").exists()
        # a wipe through the server
        assert srv.call("DELETE", "/v1/users/carol") == (200, {"wiped": True})
        assert srv.call("GET", "/v1/users")[1] == {"users": ["alice", "bob"]}
    finally:
        srv.kill9()
    # each batched answer is what that user's memory alone gives (read-only: the memory is unchanged)
    svc = MemoryService(statelab.load(ckpt), root)
    for u in ("alice", "bob"):
        assert answers[u] == (200, {"answer": svc.query(u, "The code is", max_new_tokens=8, incognito=True)})


def test_kill9_loses_nothing_acknowledged(ckpt, tmp_path):
    root = tmp_path / "users"
    srv = Server(ckpt, root)
    acked = []
    stop = threading.Event()

    def writer():
        i = 0
        while not stop.is_set():
            text = f"Note {i}: the locker code is {10000 + i}. "
            try:
                code, _ = srv.call("POST", "/v1/users/alice/ingest", {"text": text})
            except (urllib.error.URLError, ConnectionError, OSError):
                return
            if code == 200:
                acked.append(text)
            i += 1

    t = threading.Thread(target=writer)
    t.start()
    while len(acked) < 5:
        time.sleep(0.05)
    srv.kill9()
    stop.set()
    t.join()
    svc = MemoryService(statelab.load(ckpt), root)
    n_acked = sum(len(x) for x in acked)
    with svc.session("alice") as s:  # opens cleanly (a torn ingest is rolled back to the saved state)
        assert n_acked <= s.tokens <= n_acked + len(f"Note {len(acked)}: the locker code is 1xxxx. ")
        assert int(s.state["memory.0.count"][0]) == len(s.stores[0])
