import hashlib
import os
import subprocess
import sys
import time

import pytest
import torch

import statelab
from statelab.plugins import set_registry
from statelab.tokenizers import ByteTokenizer
from then_memory.store import TraceStore
from then_memory.users import MemoryService, StoreConfig, UserIdError, validate_user_id

TEXT_A = "Alice keeps her bicycle in the blue shed behind the bakery. " * 3
TEXT_B = "Bob writes poems about the sea every Tuesday night. " * 3


@pytest.fixture
def model(registry, then_spec):
    m = statelab.build(then_spec(), registry=registry)
    m.tokenizer = ByteTokenizer()
    return m


def svc_for(model, root, **kw):
    # small budgets and segments: cold chunks and several state saves happen in these tests
    return MemoryService(model, root, store=StoreConfig(hot_budget=32, warm_budget=64, chunk_traces=32),
                         segment_len=64, **kw)


def digest(root):
    out = {}
    for dirpath, dirnames, files in os.walk(root):
        for f in files + dirnames:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest() if os.path.isfile(p) else "dir"
    return out


@pytest.mark.parametrize("bad", ["", "../alice", "alice/../bob", "Alice", ".hidden", "a/b", "a" * 65, "al ice", "..", "a..b"])
def test_user_ids_are_validated(bad):
    with pytest.raises(UserIdError, match="invalid user id"):
        validate_user_id(bad)


def test_ingest_then_query_and_isolation(model, tmp_path):
    svc = svc_for(model, tmp_path)
    q = "Where is the bicycle?"
    svc.ingest("bob", [TEXT_B])
    bob_before = svc.query("bob", q, max_new_tokens=5, incognito=True)
    stats = svc.ingest("alice", [TEXT_A])
    assert stats["tokens"] == len(TEXT_A.encode())
    n = stats["traces"][0]
    assert n == (len(TEXT_A.encode()) // 4) * 4  # token traces of every completed chunk (chunk_size 4)
    # bob's answers do not change because alice now has a memory
    assert svc.query("bob", q, max_new_tokens=5, incognito=True) == bob_before
    # alice's traces are exactly what her text produces, written to her directory only
    with svc.session("alice", incognito=True) as s:
        k, _ = s.stores[0].fetch(0, n)
        assert s.stores[0].n_cold > 0
    with svc.session("bob", incognito=True) as s:
        kb, _ = s.stores[0].fetch(0, len(s.stores[0]))
    # (trace 0 is keyed by the zero "previous token" of position 0 in both stores: skipped)
    assert not any(torch.equal(k[i], kb[i]) for i in range(1, min(len(k), len(kb))))
    # the answer depends on alice's memory: a fresh user gets a different continuation distribution
    with svc.session("alice", incognito=True) as s:
        logits_a, _, _ = model(torch.tensor([list(q.encode())]), s.state)
    logits_0, _, _ = model(torch.tensor([list(q.encode())]))
    assert not torch.allclose(logits_a, logits_0)
    assert sorted(svc.users()) == ["alice", "bob"]


def test_incognito_reads_but_writes_nothing(model, tmp_path):
    svc = svc_for(model, tmp_path)
    svc.ingest("alice", [TEXT_A])
    before = digest(tmp_path)
    a1 = svc.query("alice", "The bicycle is in the", max_new_tokens=6, incognito=True)
    svc.ingest("alice", [TEXT_B], incognito=True)
    assert svc.query("alice", "The bicycle is in the", max_new_tokens=6, incognito=True) == a1
    assert digest(tmp_path) == before
    svc.ingest("carol", [TEXT_B], incognito=True)  # an unknown user in incognito: nothing created
    assert digest(tmp_path) == before
    # a normal query reads the same memory (same answer) and then writes
    assert svc.query("alice", "The bicycle is in the", max_new_tokens=6) == a1
    assert digest(tmp_path) != before


def test_wipe_leaves_nothing(model, tmp_path):
    svc = svc_for(model, tmp_path)
    svc.ingest("alice", [TEXT_A])
    svc.ingest("bob", [TEXT_B])
    bob = digest(tmp_path / "bob")
    assert svc.wipe("alice") is True
    assert sorted(os.listdir(tmp_path)) == ["bob"]
    assert not any("alice" in p for p in digest(tmp_path))
    assert digest(tmp_path / "bob") == bob
    assert svc.wipe("alice") is False
    # a new alice starts empty
    with svc.session("alice", incognito=True) as s:
        assert int(s.state["memory.0.count"][0]) == 0 and len(s.stores[0]) == 0


def test_interrupted_ingest_is_repaired(model, tmp_path):
    svc = svc_for(model, tmp_path)
    svc.ingest("alice", [TEXT_A])
    answer = svc.query("alice", "Who?", max_new_tokens=6, incognito=True)
    n = len(TraceStore(tmp_path / "alice" / "traces_0", 16, hot_budget=32, warm_budget=64, chunk_traces=32))
    # a crash after traces were logged but before the state recorded them
    st = TraceStore(tmp_path / "alice" / "traces_0", 16, hot_budget=32, warm_budget=64, chunk_traces=32)
    st.append(torch.randn(40, 16), torch.randn(40, 16))
    st.close()
    with pytest.raises(RuntimeError, match="interrupted ingest"):
        svc.query("alice", "Who?", max_new_tokens=6, incognito=True)
    with svc.session("alice") as s:  # a normal session repairs it
        assert len(s.stores[0]) == n
    assert svc.query("alice", "Who?", max_new_tokens=6, incognito=True) == answer


def test_other_model_is_refused(model, tmp_path, registry, then_spec):
    svc_for(model, tmp_path).ingest("alice", [TEXT_A])
    other = statelab.build(then_spec(), registry=registry, seed=7)
    other.tokenizer = ByteTokenizer()
    with pytest.raises(RuntimeError, match="different model"):
        svc_for(other, tmp_path).query("alice", "x", max_new_tokens=2)


LOCKER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
while not os.path.exists(sys.argv[2]):
    time.sleep(0.02)
"""


def test_concurrent_sessions_of_one_user_are_serialised(model, tmp_path):
    import threading

    svc = svc_for(model, tmp_path)
    svc.ingest("alice", [TEXT_B])
    release = tmp_path / "release"
    proc = subprocess.Popen([sys.executable, "-c", LOCKER, str(tmp_path / "alice" / ".lock"), str(release)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        svc.ingest("bob", [TEXT_B])  # another user is not blocked by alice's lock
        done = threading.Event()
        worker = threading.Thread(target=lambda: (svc.ingest("alice", [TEXT_A]), done.set()))
        worker.start()
        time.sleep(0.5)
        assert not done.is_set()  # alice's second ingest waits for the other process
        release.touch()
        worker.join(timeout=120)
        assert done.is_set()
    finally:
        release.touch()
        proc.wait()
    with svc.session("alice", incognito=True) as s:
        assert s.tokens == len(TEXT_A) + len(TEXT_B)


def test_cli_ingest_query_wipe(model, tmp_path, registry, capsys):
    from statelab.checkpoint import save
    from statelab.cli import main

    ckpt = save(tmp_path / "ckpt", model, tokenizer=model.tokenizer)
    notes = tmp_path / "notes.txt"
    notes.write_text(TEXT_A)
    root = tmp_path / "users"
    set_registry(registry)
    try:
        assert main(["memory", "ingest", "--user", "alice", "--model", str(ckpt), "--root", str(root), str(notes)]) == 0
        assert '"tokens": %d' % len(TEXT_A) in capsys.readouterr().out
        before = digest(root)
        assert main(["memory", "query", "--user", "alice", "--model", str(ckpt), "--root", str(root),
                     "--incognito", "--max-new-tokens", "5", "Where?"]) == 0
        out = capsys.readouterr().out
        assert digest(root) == before
        svc = MemoryService(statelab.load(ckpt), root)
        assert out.rstrip("\n") == svc.query("alice", "Where?", max_new_tokens=5, incognito=True)
        assert main(["memory", "list", "--root", str(root)]) == 0
        assert capsys.readouterr().out.split() == ["alice"]
        assert main(["memory", "ingest", "--user", "../x", "--model", str(ckpt), "--root", str(root), str(notes)]) == 2
        assert "invalid user id" in capsys.readouterr().err
        assert main(["memory", "wipe", "--user", "alice", "--root", str(root)]) == 0
        assert os.listdir(root) == []
    finally:
        set_registry(None)
