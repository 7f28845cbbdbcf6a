"""``statelab memory serve``: one process, one frozen model, many users over HTTP (loopback only).

    statelab memory serve --model CKPT [--root DIR] [--port 8765] [--max-batch 16] [--batch-wait-ms 5]

Needs the ``serve`` extra (``pip install 'then-memory[serve]'``: Starlette and Uvicorn).

Endpoints (JSON in, JSON out)::

    GET    /v1/health                       {"ok": true, "model": <fingerprint>, "users": n,
                                             "batches": generations run, "batched_rows": queries in them}
    GET    /v1/users                        {"users": [...]}
    POST   /v1/users/{user}/ingest          {"text": "...", "incognito": false}
                                            -> {"tokens", "traces", "seconds"}
    POST   /v1/users/{user}/query           {"prompt": "...", "max_new_tokens": 32, "remember": false,
                                             "incognito": false} -> {"answer": "..."}
    DELETE /v1/users/{user}                 {"wiped": true|false}

How requests run. One worker thread owns the model. Queries that only read (the default;
``remember: false`` or ``incognito: true``) from *different* users that arrive within
``batch_wait_ms`` of each other, with the same ``max_new_tokens``, run as one batched
generation: row b reads only user b's state and trace store (:meth:`MemoryService.query_batch`).
Ingests, remembered queries and wipes run one at a time between batches. Answers end at the
end-of-answer marker. Errors: a bad user id or body is 400, an unknown user 404.

Durability: a request is answered only after its writes are on disk (the trace log written,
the user's state file written atomically and fsynced), so killing the server (even with
SIGKILL) loses nothing that was acknowledged; ``--durable`` also fsyncs the trace log, for
power loss. Per-user state lives in the users' directories (see :mod:`then_memory.users`).
"""

from __future__ import annotations

import asyncio
import ipaddress
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

from then_memory.users import MemoryService, UnknownUserError, UserIdError, validate_user_id

LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")


def check_loopback(host: str) -> str:
    """``host`` if it is a loopback address, else a ValueError saying why."""
    ok = host == "localhost"
    try:
        ok = ok or ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    if not ok:
        raise ValueError(f"--host {host}: the memory server listens on loopback only (127.0.0.1, ::1 or localhost); "
                         "put an authenticating proxy in front of it to expose it")
    return host


@dataclass
class _Job:
    kind: str  # query | ingest | remember | wipe
    user: str
    payload: dict = field(default_factory=dict)
    future: Future = field(default_factory=Future)


class Batcher:
    """The worker thread that owns the model: batches read-only queries of different users."""

    def __init__(self, svc: MemoryService, *, max_batch: int = 16, batch_wait_s: float = 0.005) -> None:
        self.svc, self.max_batch, self.batch_wait_s = svc, max_batch, batch_wait_s
        self.jobs: queue.Queue[_Job | None] = queue.Queue()
        self.batches = 0  # batched generations run (for the load figures)
        self.rows = 0
        self._thread = threading.Thread(target=self._loop, name="then-memory-batcher", daemon=True)
        self._thread.start()

    def submit(self, job: _Job) -> Future:
        self.jobs.put(job)
        return job.future

    def close(self) -> None:
        self.jobs.put(None)
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        held: list[_Job] = []
        while True:
            job = held.pop(0) if held else self.jobs.get()
            if job is None:
                return
            if job.kind != "query":
                self._run_one(job)
                continue
            batch, users = [job], {job.user}
            deadline = time.monotonic() + self.batch_wait_s
            while len(batch) < self.max_batch:  # gather more queries of other users
                wait = deadline - time.monotonic()
                nxt = None
                if held:
                    nxt = held.pop(0)
                elif wait > 0:
                    try:
                        nxt = self.jobs.get(timeout=wait)
                    except queue.Empty:
                        break
                else:
                    break
                if nxt is None:
                    held.insert(0, None)  # shut down after this batch
                    break
                same = nxt.kind == "query" and nxt.payload["max_new_tokens"] == job.payload["max_new_tokens"]
                if same and nxt.user not in users:
                    batch.append(nxt)
                    users.add(nxt.user)
                else:
                    held.append(nxt)  # runs after this batch, in arrival order
            self._run_batch(batch)

    def _run_batch(self, batch: list[_Job]) -> None:
        try:
            answers = self.svc.query_batch([(j.user, j.payload["prompt"]) for j in batch],
                                           max_new_tokens=batch[0].payload["max_new_tokens"])
        except Exception as exc:  # noqa: BLE001 - every waiting request gets the error
            for j in batch:
                j.future.set_exception(exc)
            return
        self.batches += 1
        self.rows += len(batch)
        for j, a in zip(batch, answers):
            if isinstance(a, Exception):
                j.future.set_exception(a)
            else:
                j.future.set_result({"answer": a})

    def _run_one(self, job: _Job) -> None:
        try:
            p = job.payload
            if job.kind == "ingest":
                st = self.svc.ingest(job.user, [p["text"]], incognito=p["incognito"])
                res = {"tokens": st["tokens"], "traces": st["traces"], "seconds": st["seconds"]}
            elif job.kind == "remember":
                res = {"answer": self.svc.query(job.user, p["prompt"], max_new_tokens=p["max_new_tokens"])}
            else:
                res = {"wiped": self.svc.wipe(job.user)}
            job.future.set_result(res)
        except Exception as exc:  # noqa: BLE001 - handed to the request
            job.future.set_exception(exc)


def make_app(svc: MemoryService, *, max_batch: int = 16, batch_wait_s: float = 0.005, max_new_tokens_limit: int = 256):
    """The Starlette application (the batcher starts with it and stops on shutdown)."""
    from contextlib import asynccontextmanager

    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    state: dict[str, Batcher] = {}

    @asynccontextmanager
    async def lifespan(app):
        state["batcher"] = Batcher(svc, max_batch=max_batch, batch_wait_s=batch_wait_s)
        try:
            yield
        finally:
            await asyncio.to_thread(state["batcher"].close)

    def error(status: int, msg: str) -> JSONResponse:
        return JSONResponse({"error": msg}, status_code=status)

    async def run(job: _Job) -> JSONResponse:
        try:
            return JSONResponse(await asyncio.wrap_future(state["batcher"].submit(job)))
        except UnknownUserError as exc:
            return error(404, str(exc))
        except (UserIdError, ValueError) as exc:
            return error(400, str(exc))
        except RuntimeError as exc:
            return error(409, str(exc))

    async def body(request: Request, fields: dict[str, type]) -> dict:
        try:
            data = await request.json()
        except ValueError:
            raise ValueError("the body must be JSON") from None
        if not isinstance(data, dict):
            raise ValueError("the body must be a JSON object")
        unknown = set(data) - set(fields)
        if unknown:
            raise ValueError(f"unknown fields {sorted(unknown)}; allowed: {sorted(fields)}")
        for k, t in fields.items():
            if k in data and not isinstance(data[k], t) or (t is int and isinstance(data.get(k), bool)):
                raise ValueError(f"field {k!r} must be {t.__name__}")
        return data

    def user_of(request: Request) -> str:
        return validate_user_id(request.path_params["user"])

    async def health(request: Request) -> JSONResponse:
        b = state["batcher"]
        return JSONResponse({"ok": True, "model": svc.fingerprint, "users": len(svc.users()), "batches": b.batches,
                             "batched_rows": b.rows})

    async def users(request: Request) -> JSONResponse:
        return JSONResponse({"users": svc.users()})

    async def ingest(request: Request) -> JSONResponse:
        try:
            user = user_of(request)
            d = await body(request, {"text": str, "incognito": bool})
            if not d.get("text"):
                raise ValueError("give a non-empty 'text'")
        except ValueError as exc:
            return error(400, str(exc))
        return await run(_Job("ingest", user, {"text": d["text"], "incognito": d.get("incognito", False)}))

    async def query(request: Request) -> JSONResponse:
        try:
            user = user_of(request)
            d = await body(request, {"prompt": str, "max_new_tokens": int, "remember": bool, "incognito": bool})
            if not d.get("prompt"):
                raise ValueError("give a non-empty 'prompt'")
            n = d.get("max_new_tokens", 32)
            if not 1 <= n <= max_new_tokens_limit:
                raise ValueError(f"max_new_tokens must be in [1, {max_new_tokens_limit}]")
        except ValueError as exc:
            return error(400, str(exc))
        kind = "remember" if d.get("remember", False) and not d.get("incognito", False) else "query"
        return await run(_Job(kind, user, {"prompt": d["prompt"], "max_new_tokens": n}))

    async def wipe(request: Request) -> JSONResponse:
        try:
            user = user_of(request)
        except ValueError as exc:
            return error(400, str(exc))
        return await run(_Job("wipe", user))

    app = Starlette(routes=[
        Route("/v1/health", health, methods=["GET"]),
        Route("/v1/users", users, methods=["GET"]),
        Route("/v1/users/{user}/ingest", ingest, methods=["POST"]),
        Route("/v1/users/{user}/query", query, methods=["POST"]),
        Route("/v1/users/{user}", wipe, methods=["DELETE"]),
    ], lifespan=lifespan)
    app.state.batcher = state  # the running batcher, for figures
    return app


def serve(svc: MemoryService, *, host: str = "127.0.0.1", port: int = 8765, max_batch: int = 16,
          batch_wait_s: float = 0.005) -> None:
    """Run the server until interrupted (loopback only)."""
    try:
        import uvicorn
    except ImportError:
        raise ValueError("statelab memory serve needs the serve extra: pip install 'then-memory[serve]'") from None
    check_loopback(host)
    app = make_app(svc, max_batch=max_batch, batch_wait_s=batch_wait_s)
    uvicorn.run(app, host=host, port=port, log_level="warning", workers=1)


__all__ = ["Batcher", "LOOPBACK_HOSTS", "check_loopback", "make_app", "serve"]
