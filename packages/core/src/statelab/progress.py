"""Progress on stderr: a ``\\r`` line on a terminal, plain log lines otherwise.

Training shows step, loss, learning rate, tokens/s and elapsed time at each log step. A long
phase after training (planner fit, probes, final evaluation) shows its name, what it is
doing and its elapsed time, refreshed by a ticker thread every second on a terminal (every
30 s as a log line otherwise), since the work inside a phase (a plugin's ``fit`` or a probe's
``run``) reports nothing itself.
"""

from __future__ import annotations

import sys
import threading
import time
from contextlib import contextmanager
from typing import Iterator


class Progress:
    def __init__(self, enabled: bool, total: int) -> None:
        self.enabled = enabled
        self.tty = enabled and sys.stderr.isatty()
        self.total = total
        self._open = False
        self._lock = threading.Lock()

    def train(self, step: int, loss: float, lr: float, tok_s: float, elapsed: float) -> None:
        if not self.enabled:
            return
        line = f"step {step}/{self.total} | loss {loss:.4f} | lr {lr:.2e} | {tok_s:,.0f} tok/s | {elapsed:.0f}s"
        if self.tty:
            frac = step / max(1, self.total)
            bar = "#" * int(20 * frac) + "-" * (20 - int(20 * frac))
            self._line(f"[{bar}] {line}")
        else:
            print(line, file=sys.stderr, flush=True)

    def note(self, text: str) -> None:
        if not self.enabled:
            return
        with self._lock:
            if self._open:
                sys.stderr.write("\n")
                self._open = False
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        with self._lock:
            if self._open:
                sys.stderr.write("\n")
                self._open = False

    def _line(self, text: str) -> None:
        with self._lock:
            sys.stderr.write(f"\r{text}\033[K")
            sys.stderr.flush()
            self._open = True

    @contextmanager
    def phase(self, name: str) -> Iterator["Phase"]:
        """Show ``name``, the phase's current detail and its elapsed time until the block ends."""
        ph = Phase(self, name)
        if self.enabled:
            self.note(f"statelab: {name}")
            ph.start()
        try:
            yield ph
        finally:
            ph.stop()
            self.close()


class Phase:
    """One long phase's display; ``detail(text)`` says what it is doing now (e.g. ``probe 2/5: causality``)."""

    def __init__(self, progress: Progress, name: str) -> None:
        self.progress, self.name = progress, name
        self.t0 = time.perf_counter()
        self.text = ""
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def detail(self, text: str) -> None:
        self.text = text
        if self.progress.tty:
            self._show()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._tick, name="statelab-progress", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join()

    def _show(self) -> None:
        what = f" | {self.text}" if self.text else ""
        line = f"{self.name}{what} | {self.elapsed():.0f}s"
        if self.progress.tty:
            self.progress._line(line)
        else:
            print(line, file=sys.stderr, flush=True)

    def _tick(self) -> None:
        period = 1.0 if self.progress.tty else 30.0
        while not self._done.wait(period):
            self._show()
