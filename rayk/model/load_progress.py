"""A progress line on stderr while a model load is slow, so a cold start never looks hung.

Loads that finish within ``delay_s`` (1 s) print nothing. A slower one shows what it is doing:
``rayk: loading SmolLM2-135M-Instruct.Q4_1.gguf: dequantizing weights (2.3 s)``. On a terminal
that is one line rewritten in place every ``interval_s``; elsewhere (a log file, a Ray worker's
forwarded output) it is one line per stage that starts after the delay, with no carriage
returns. A load that showed anything ends with a last line saying it is ready (or failed), with
its total time in seconds.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO


class LoadProgress:
    """A context manager around one load; ``stage(name)`` says what the load does now.

    A daemon thread does the writing, so stages cost nothing but an assignment. ``stream``
    (default: ``sys.stderr`` as it is when the load starts) is only ever written by that thread
    and, after it has stopped, by ``__exit__``.
    """

    def __init__(self, what: str, stream: TextIO | None = None, delay_s: float = 1.0, interval_s: float = 0.2):
        self.what = what
        self.stream = stream
        self.delay_s = delay_s
        self.interval_s = interval_s
        self.current = "starting"
        self.shown = False
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rayk-load-progress", daemon=True)

    def stage(self, name: str) -> None:
        self.current = name

    def __enter__(self) -> LoadProgress:
        self.stream = self.stream or sys.stderr
        self._in_place = bool(getattr(self.stream, "isatty", lambda: False)())
        self._start = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self._done.set()
        self._thread.join()
        if self.shown:
            outcome = "failed" if kind is not None else "ready"
            self._write(f"rayk: {self.what} {outcome} after {time.perf_counter() - self._start:.1f} s", final=True)

    def _run(self) -> None:
        if self._done.wait(self.delay_s):
            return
        written = None
        while True:
            stage = self.current
            if self._in_place or stage != written:
                self._write(f"rayk: loading {self.what}: {stage} ({time.perf_counter() - self._start:.1f} s)", final=False)
                written = stage
            if self._done.wait(self.interval_s):
                return

    def _write(self, line: str, final: bool) -> None:
        if self._in_place:
            # \r and erase-to-end-of-line rewrite the one line; the last write ends it.
            self.stream.write(f"\r{line}\x1b[K" + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        self.shown = True
