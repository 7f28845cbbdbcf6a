"""Per-user live memory: one frozen model, one directory of safetensors files per user.

Python API::

    svc = MemoryService(model, root="~/.local/share/statelab/users")   # model: statelab.load(CKPT)
    svc.ingest("alice", ["notes.txt"])                  # read files into alice's memory (no gradient)
    svc.query("alice", "What is the pass key? The pass key is")      # greedy answer from her memory
    svc.query("alice", "...", incognito=True)           # reads her memory, writes nothing
    svc.wipe("alice")                                   # removes everything of alice

A user's directory ``<root>/<user>/``::

    state.safetensors      the model's carried state (backbone and memories, batch 1) with
                           metadata: the model's fingerprint, tokens ingested
    traces_<j>/            the trace store of the j-th ``then`` memory (see then_memory.store)
    .lock                  serialises sessions of this user (flock)

Guarantees: user ids are lowercase ``[a-z0-9][a-z0-9._-]*`` (no path traversal, and no two
ids can name the same directory on a case-insensitive file system); a session of one user
holds an exclusive lock, so concurrent ingests are serialised; a user's stores are attached
to the model only inside that user's session, so users never see each other's traces;
``incognito`` sessions open everything read-only and write nothing; ``wipe`` renames the
directory away and deletes it whole. The state is saved after every ingested segment, and
a session that finds more traces in a store than its state recorded (a crash mid-ingest)
truncates the store back, so state and traces always agree.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch
from safetensors.torch import load_file, save as st_save
from torch import Tensor

from statelab.errors import UserError
from statelab.interfaces import State
from statelab.io import atomic_write_bytes

from then_memory.facts import ANSWER_END
from then_memory.memory import ThenMemory
from then_memory.store import TraceStore

USER_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")  # always used with fullmatch ("$" accepts a trailing newline)
STATE_FILE = "state.safetensors"
LOCK_FILE = ".lock"


class UserIdError(UserError, ValueError):
    """A user id that is not a plain name (see the pattern in the message)."""


def default_root() -> Path:
    env = os.environ.get("STATELAB_MEMORY_ROOT")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "statelab" / "users"


def validate_user_id(user: str) -> str:
    """Return ``user`` if it is a valid id, else raise :class:`UserIdError` saying why."""
    if not isinstance(user, str) or not USER_RE.fullmatch(user) or ".." in user:
        raise UserIdError(
            f"invalid user id {user!r}: use 1-64 characters of lowercase letters, digits, '.', '_' or '-', "
            "starting with a letter or digit and without '..' (ids are lowercase so that no two ids can "
            "name the same directory)"
        )
    return user


def then_memories(model) -> list[tuple[int, ThenMemory]]:
    return [(j, m) for j, m in enumerate(model.memories) if isinstance(m, ThenMemory)]


def model_fingerprint(model) -> str:
    """sha256 over the model's weights: a user's memory is only valid with the model that wrote it."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        # flattened first: a 0-dim buffer (a planner's step counter) cannot be viewed as bytes
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def ingest_tokens(model, tokens: Tensor, state: State | None = None, segment_len: int = 256,
                  on_segment=None) -> State:
    """Run the frozen model over ``tokens`` (B, N) in segments, carrying the state; returns it.
    No gradient, no output: the memories write their traces (into attached stores, if any)."""
    if tokens.dim() == 1:
        tokens = tokens[None]
    tokens = tokens.to(next(model.parameters()).device)
    if state is None:
        state = model.init_state(tokens.shape[0])
    # the last memory after the last backbone layer feeds only the head: its reads cannot
    # change the carried state, so while ingesting it only writes (same state, far less work)
    mems, layers = list(getattr(model, "memories", [])), list(getattr(model, "memory_layers", []))
    n_layers = len(model.backbone.layers) if hasattr(model, "backbone") else -1
    tail = [m for m, layer in zip(mems, layers) if layer == n_layers - 1][-1:]
    tail = [m for m in tail if isinstance(m, ThenMemory)]
    try:
        for m in tail:
            m.write_only = True
        for a in range(0, tokens.shape[1], segment_len):
            _, state, _ = model.hidden(tokens[:, a : a + segment_len], state)
            if on_segment is not None:
                on_segment(state, min(a + segment_len, tokens.shape[1]))
    finally:
        for m in tail:
            m.write_only = False
    return state


class UnknownUserError(UserError, ValueError):
    """A query or wipe for a user who has no memory yet (nothing is created)."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class UserDirectories:
    """The users' directories under ``root``: paths, locks and wiping (no model needed).

    Directories are created 0700 and files 0600: a user's memory is readable by the account
    that runs statelab only. A wipe renames the user's directory to ``.wipe-<hex>`` (from
    then on the user has no memory) and deletes it; a wipe killed before the delete ends
    is finished by the next operation on the root (listing, a session, another wipe)."""

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else default_root()

    def user_dir(self, user: str) -> Path:
        return self.root / validate_user_id(user)

    def users(self) -> list[str]:
        if not self.root.exists():
            return []
        self.finish_wipes()
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and USER_RE.fullmatch(p.name))

    def finish_wipes(self) -> int:
        """Delete what interrupted wipes left (``.wipe-*``); returns how many were finished."""
        done = 0
        if not self.root.exists():
            return 0
        for gone in self.root.glob(".wipe-*"):
            for _ in range(3):  # another process may be deleting the same folder: retry what it left
                try:
                    shutil.rmtree(gone)
                except FileNotFoundError:
                    pass
                if not gone.exists():
                    done += 1
                    break
        return done

    def _make_private_dir(self, d: Path) -> None:
        if not self.root.exists():
            self.root.mkdir(parents=True, exist_ok=True)
            os.chmod(self.root, 0o700)
        d.mkdir(exist_ok=True)
        os.chmod(d, 0o700)

    @contextlib.contextmanager
    def locked(self, user: str, create: bool, exclusive: bool = True) -> Iterator[Path | None]:
        """Lock the user's directory (exclusive, or shared for read-only sessions); yields
        ``None`` when it does not exist and ``create`` is false. Retries if the directory was
        wiped while waiting."""
        d = self.user_dir(user)
        self.finish_wipes()
        while True:
            if not d.exists():
                if not create:
                    yield None
                    return
                self._make_private_dir(d)
            lock = d / LOCK_FILE
            try:
                fd = os.open(lock, (os.O_RDWR | os.O_CREAT) if create else os.O_RDONLY, 0o600)
            except FileNotFoundError:
                if not create:
                    yield None if not d.exists() else d
                    return
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
                try:
                    same = os.path.samestat(os.fstat(fd), os.stat(lock))
                except FileNotFoundError:
                    same = False
                if not same:  # wiped (renamed away) while we waited: start over
                    continue
                yield d
                return
            finally:
                os.close(fd)

    def wipe(self, user: str) -> bool:
        """Remove everything of ``user``; returns whether there was anything."""
        d = self.user_dir(user)
        with self.locked(user, create=False) as locked:
            if locked is None:
                self.finish_wipes()
                return False
            gone = self.root / f".wipe-{uuid.uuid4().hex}"
            os.replace(d, gone)  # atomic: from here on the user has no memory
            _fsync_dir(self.root)  # the rename survives a power loss too
        self.finish_wipes()
        return True


@dataclass
class StoreConfig:
    hot_budget: int = 16384
    warm_budget: int = 65536
    chunk_traces: int = 16384
    durable: bool = False
    coarse_lists: int = 0  # > 0: cold chunks get k-means lists and reads probe `nprobe` of them
    nprobe: int = 32


@dataclass
class Session:
    user: str
    state: State
    stores: dict[int, TraceStore] = field(default_factory=dict)
    incognito: bool = False
    tokens: int = 0


class MemoryService:
    """Serves many users from one frozen model (see the module docstring)."""

    def __init__(self, model, root: str | os.PathLike | None = None, *, tokenizer=None,
                 store: StoreConfig | None = None, segment_len: int = 256) -> None:
        self.model = model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        self.tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
        self.dirs = UserDirectories(root)
        self.root = self.dirs.root
        self.store_cfg = store or StoreConfig()
        self.segment_len = segment_len
        self.fingerprint = model_fingerprint(model)
        self._model_lock = threading.Lock()  # the model's memories are attached to one user at a time
        if not then_memories(model):
            raise ValueError("this model has no 'then' memory: per-user memory needs a model built with "
                             "model.memories: [{kind: then, after_layer: K}]")

    def user_dir(self, user: str) -> Path:
        return self.dirs.user_dir(user)

    def users(self) -> list[str]:
        return self.dirs.users()

    def wipe(self, user: str) -> bool:
        """Remove everything of ``user``; returns whether there was anything."""
        return self.dirs.wipe(user)

    # -- sessions -------------------------------------------------------------------------
    @contextlib.contextmanager
    def session(self, user: str, *, incognito: bool = False, must_exist: bool = False) -> Iterator[Session]:
        """Open ``user``'s memory with the model's ``then`` memories attached to the user's
        stores; on a clean exit the state is saved (never in incognito). ``must_exist``: an
        unknown user is an :class:`UnknownUserError` instead of a new, empty memory."""
        create = not incognito and not must_exist
        with self.dirs.locked(user, create=create, exclusive=not incognito) as d, self._model_lock:
            if d is None and must_exist:
                raise UnknownUserError(
                    f"user {user!r} has no memory: ingest something first (statelab memory ingest --user {user} "
                    "FILES); `statelab memory list` shows the users")
            if d is not None and not incognito:
                os.chmod(d, 0o700)  # directories written before memory files were private
            sess = self._open(user, d, incognito)
            cfg = self.store_cfg
            mems = then_memories(self.model)
            for j, mem in mems:
                mem.attach_store(sess.stores[j], coarse=cfg.coarse_lists > 0, nprobe=cfg.nprobe)
            try:
                yield sess
                if not incognito:
                    self._save_state(d, sess)
            finally:
                for j, mem in mems:
                    mem.attach_store(None)
                self._close(sess)

    def _open(self, user: str, d: Path | None, incognito: bool) -> Session:
        """The user's state and stores (read-only when ``incognito``), checked against each
        other; ``d`` is the user's locked directory or None (no memory yet)."""
        sess = Session(user, self.model.init_state(1), incognito=incognito)
        cfg = self.store_cfg
        if d is not None and (d / STATE_FILE).exists():
            sess.state, sess.tokens = self._load_state(d / STATE_FILE)
        dev = next(self.model.parameters()).device
        try:
            for j, mem in then_memories(self.model):
                root = (d if d is not None else self.user_dir(user)) / f"traces_{j}"  # read-only when incognito
                store = TraceStore(root, mem.d_model, hot_budget=cfg.hot_budget, warm_budget=cfg.warm_budget,
                                   chunk_traces=cfg.chunk_traces, device=dev, durable=cfg.durable,
                                   read_only=incognito, coarse_lists=cfg.coarse_lists, private=True)
                sess.stores[j] = store
                count = int(sess.state[f"memory.{j}.count"][0])
                if len(store) > count:
                    if incognito:
                        raise RuntimeError(f"user {user!r}: memory {j} has traces its state does not record "
                                           "(an interrupted ingest); run a normal session once to repair it")
                    store.truncate(count)
                elif len(store) < count:
                    raise RuntimeError(f"user {user!r}: memory {j} lost traces (state records {count}, store holds "
                                       f"{len(store)}); the user's directory was modified outside statelab")
        except BaseException:
            self._close(sess)
            raise
        return sess

    @staticmethod
    def _close(sess: Session) -> None:
        for store in sess.stores.values():
            store.close()

    def _load_state(self, path: Path) -> tuple[State, int]:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            meta = json.loads(f.read(n)).get("__metadata__", {})
        if meta.get("model") != self.fingerprint:
            raise RuntimeError(
                f"{path.parent.name}: this memory was written by a different model (fingerprint "
                f"{meta.get('model', '?')[:12]}, this model {self.fingerprint[:12]}); query it with the model that "
                "ingested it, or wipe it with `statelab memory wipe`"
            )
        dev = next(self.model.parameters()).device
        return {k: v.to(dev) for k, v in load_file(str(path)).items()}, int(meta.get("tokens", 0))

    def _save_state(self, d: Path, sess: Session) -> None:
        meta = {"model": self.fingerprint, "tokens": str(sess.tokens), "saved": str(time.time())}
        tensors = {k: v.detach().cpu().contiguous() for k, v in sess.state.items()}
        atomic_write_bytes(d / STATE_FILE, st_save(tensors, metadata=meta))
        os.chmod(d / STATE_FILE, 0o600)

    # -- the three operations ---------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer; load it with statelab.load(CKPT) or pass tokenizer=")
        return self.tokenizer.encode(text)

    def ingest(self, user: str, sources: Sequence[str | os.PathLike | list[int]], *, incognito: bool = False) -> dict:
        """Read files (paths), texts (``str`` that is not a file) or token lists into the user's memory."""
        t0 = time.perf_counter()
        ids: list[int] = []
        for src in sources:
            if isinstance(src, (list, tuple)):
                ids += list(src)
            elif isinstance(src, os.PathLike) or (isinstance(src, str) and os.path.isfile(src)):
                try:
                    ids += self.encode(Path(src).read_text(encoding="utf-8"))
                except UnicodeDecodeError:
                    raise ValueError(f"{src}: not UTF-8 text; ingest reads text files") from None
            else:
                ids += self.encode(str(src))
        if not ids:
            raise ValueError("nothing to ingest: the inputs are empty")
        with self.session(user, incognito=incognito) as sess:
            base = sess.tokens
            d = self.user_dir(user)

            def checkpoint(state: State, done: int) -> None:
                sess.state, sess.tokens = state, base + done
                if not incognito:
                    self._save_state(d, sess)

            ingest_tokens(self.model, torch.tensor(ids), sess.state, self.segment_len, on_segment=checkpoint)
            traces = {j: len(s) for j, s in sess.stores.items()}
        dt = time.perf_counter() - t0
        return {"tokens": len(ids), "seconds": dt, "tokens_per_s": len(ids) / max(dt, 1e-9), "traces": traces}

    def query(self, user: str, prompt: str | list[int], *, max_new_tokens: int = 32, incognito: bool = False,
              stop: str | None = ANSWER_END) -> str:
        """Greedy continuation of ``prompt`` from the user's memory, up to the end-of-answer
        marker ``stop`` (excluded; None = ``max_new_tokens`` tokens). Not ``incognito``: the
        prompt and the answer are written into the user's memory."""
        from statelab.generation import generate

        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        with self.session(user, incognito=incognito, must_exist=True) as sess:
            res = generate(self.model, [ids], tokenizer=self.tokenizer, max_new_tokens=max_new_tokens,
                           temperature=0.0, state=sess.state, stop=stop, use_planner=False)
            sess.state = res.state
            sess.tokens += len(ids) + len(res.tokens[0])
        return res.texts[0] if self.tokenizer is not None else res.tokens[0]

    def query_batch(self, requests: Sequence[tuple[str, str | list[int]]], *, max_new_tokens: int = 32,
                    stop: str | None = ANSWER_END) -> list[str | Exception]:
        """Answer several users' prompts in one batched generation (row b reads only user b's
        memory). Read-only: nothing is written (a query is remembered only through
        :meth:`query`). A request that cannot run (unknown user, bad id, a damaged memory)
        gets its exception in its slot; the others still run. One user at most once."""
        from statelab.generation import generate

        users = [u for u, _ in requests]
        if len(set(users)) != len(users):
            raise ValueError("query_batch: a user appears twice; send their requests in separate batches")
        out: list[str | Exception | None] = [None] * len(requests)
        with contextlib.ExitStack() as stack:
            rows: list[tuple[int, Session, list[int]]] = []
            for i, (user, prompt) in enumerate(requests):
                try:
                    ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
                    if not ids:
                        raise ValueError("empty prompt")
                    d = stack.enter_context(self.dirs.locked(user, create=False, exclusive=False))
                    if d is None:
                        raise UnknownUserError(f"user {user!r} has no memory: ingest something first")
                    sess = self._open(user, d, incognito=True)
                    stack.callback(self._close, sess)
                    rows.append((i, sess, ids))
                except (ValueError, RuntimeError) as exc:
                    out[i] = exc
            if rows:
                with self._model_lock:
                    mems = then_memories(self.model)
                    cfg = self.store_cfg
                    state = {k: torch.cat([s.state[k] for _, s, _ in rows]) for k in rows[0][1].state}
                    try:
                        for j, mem in mems:
                            mem.attach_stores([s.stores[j] for _, s, _ in rows], coarse=cfg.coarse_lists > 0,
                                              nprobe=cfg.nprobe)
                        res = generate(self.model, [ids for _, _, ids in rows], tokenizer=self.tokenizer,
                                       max_new_tokens=max_new_tokens, temperature=0.0, state=state, stop=stop,
                                       use_planner=False)
                    finally:
                        for _, mem in mems:
                            mem.attach_stores(None)
                for (i, _, _), text, toks in zip(rows, res.texts, res.tokens):
                    out[i] = text if self.tokenizer is not None else toks
        return out  # type: ignore[return-value]


__all__ = ["MemoryService", "Session", "StoreConfig", "UnknownUserError", "UserDirectories", "UserIdError",
           "default_root", "ingest_tokens", "model_fingerprint", "then_memories", "validate_user_id"]
