"""The run lock is an OS lock: never held twice, gone with its process, indifferent to the file's content."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys

import pytest

from statelab.io import RunLock, RunLockedError

HOLD = ("import sys, time; from statelab.io import RunLock; RunLock(sys.argv[1]).acquire(); print('held', flush=True); "
        "time.sleep(120)")


def test_a_second_holder_is_refused_until_the_first_dies_by_kill_9(tmp_path, capsys):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"held"
        with pytest.raises(RunLockedError, match=rf"in use by another trainer \(PID {holder.pid} on host "):
            RunLock(tmp_path).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock = RunLock(tmp_path).acquire()  # the kernel dropped the dead holder's lock
    assert f"reclaiming stale lock {tmp_path / '.lock'} (PID {holder.pid}" in capsys.readouterr().err
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    with pytest.raises(RunLockedError):  # a second lock object in the same process is refused too
        RunLock(tmp_path).acquire()
    lock.release()
    assert not (tmp_path / ".lock").exists()
    with RunLock(tmp_path):
        pass


@pytest.mark.parametrize("content", [b"", b"\x00garbage{", b'{"pid": 1, "host": "elsewhere"}'])
def test_empty_or_garbage_or_foreign_lock_files_are_taken_over(tmp_path, content):
    (tmp_path / ".lock").write_bytes(content)
    lock = RunLock(tmp_path).acquire()  # no process holds the OS lock, whatever the file says
    assert lock.held
    lock.release()


def _contend(path, barrier, results):
    barrier.wait()
    try:
        lock = RunLock(path).acquire()
    except RunLockedError:
        results.put("refused")
        barrier.wait()
        return
    results.put("held")
    barrier.wait()  # hold until every contender has tried
    lock.release()


def test_contenders_on_a_dead_owners_lock_never_both_hold_it(tmp_path):
    ctx = mp.get_context("fork")
    for trial in range(10):
        d = tmp_path / str(trial)
        d.mkdir()
        (d / ".lock").write_text(json.dumps({"pid": 999_999_999, "host": os.uname().nodename}))  # a dead PID
        barrier, results = ctx.Barrier(3), ctx.Queue()
        procs = [ctx.Process(target=_contend, args=(d, barrier, results)) for _ in range(3)]
        for p in procs:
            p.start()
        outcomes = sorted(results.get(timeout=60) for _ in procs)
        for p in procs:
            p.join(60)
        assert outcomes == ["held", "refused", "refused"], (trial, outcomes)
