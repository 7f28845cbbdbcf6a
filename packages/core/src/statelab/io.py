"""Atomic file and directory writes (a reader never sees a half-written file), and the run lock."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from statelab.errors import UserError


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file ordinary permissions
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; on success it replaces ``path`` whole.

    If the block raises, ``path`` is untouched and the temporary directory is removed. If
    the process dies, it is left as ``.<name>.tmp-<pid>-*`` (readers ignore it) and the next
    atomic write in the same directory removes it (see :func:`remove_stale_temporaries`).
    Files get ordinary permissions (``0666 & ~umask``; writers such as safetensors make 0600).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent))
    try:
        yield tmp
        mask = _umask()
        os.chmod(tmp, 0o777 & ~mask)  # mkdtemp creates 0700
        for f in tmp.iterdir():
            if f.is_file():
                os.chmod(f, 0o666 & ~mask)
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<what>tmp|old)-(?P<pid>\d+)(?:-.*)?$")


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Finish what writers that died in ``directory`` left: remove their ``.<name>.tmp-<pid>-*``
    folders, and for a ``.<name>.old-<pid>`` (a death between the two renames) put it back as
    ``<name>`` if that is missing, else remove it. Only entries of processes that are not
    running are touched. Returns what was removed."""
    removed = []
    for entry in Path(directory).iterdir():
        m = _TEMPORARY.match(entry.name)
        if m is None or not entry.is_dir() or _pid_alive(int(m["pid"])):
            continue
        target = entry.with_name(m["name"])
        if m["what"] == "old" and not target.exists():
            os.replace(entry, target)
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


# --------------------------------------------------------------------------------------
# run lock


class RunLockedError(UserError, RuntimeError):
    """Another live process holds the run directory's lock."""


class RunLock:
    """``<run_dir>/.lock``: one trainer per run directory, held with an OS lock (``flock``).

    The kernel releases the lock when its process dies, however it dies, so a crashed
    trainer never leaves a lock behind and two processes can never both hold it: acquiring
    is one atomic system call, not a read-check-unlink-create sequence. The file's content
    (owner PID, host, start time) only makes the refusal message useful; an empty or garbage
    file is simply taken over. ``flock`` is per host on network file systems that do not
    forward it, so do not share a run directory between hosts.
    """

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.path = Path(run_dir) / ".lock"
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "RunLock":
        import fcntl
        import json
        import socket
        import sys
        import time

        if self._fd is not None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = _owner(fd)
                os.close(fd)
                raise RunLockedError(
                    f"run directory {str(self.path.parent)!r} is in use by another trainer"
                    + (f" (PID {owner[0]} on host {owner[1]!r})" if owner else "")
                    + "; wait for it to finish, or train under another name or --out"
                ) from None
            # the holder we waited on may have unlinked the file before releasing: then we
            # locked an orphaned inode, and must lock the file now at the path instead
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        stale = _owner(fd)
        if stale:  # its owner died without releasing; the kernel already dropped its lock
            print(f"statelab: reclaiming stale lock {self.path} (PID {stale[0]} on host {stale[1]!r} is not "
                  "running)", file=sys.stderr)
        me = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, me, 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            self.path.unlink()  # before unlocking: a waiter then sees a new file (see acquire)
        except FileNotFoundError:
            pass
        os.close(fd)  # closing the descriptor drops the lock

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _owner(fd: int) -> tuple[int, str] | None:
    """``(pid, host)`` from a lock file's content, or ``None`` when it names no one (empty, garbage)."""
    import json

    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"null")
        return int(info["pid"]), str(info.get("host", "?"))
    except (OSError, ValueError, TypeError, KeyError):
        return None
