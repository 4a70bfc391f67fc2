"""Running batched block copies off the caller's critical path.

On CUDA a copy is enqueued on a dedicated stream, after the work already queued on the current
stream (so it reads finished data), and an event marks its end. On the CPU copies run inline by
default: a memory-bound copy gains nothing from a second thread on the same cores. ``threaded``
runs them in order on one worker thread instead (torch releases the GIL while it copies), which
is how the tests hold a copy in flight. Either way the caller gets a ``Ticket`` and keeps every
block the copy touches referenced until ``Ticket.done()``.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch


class Ticket:
    def __init__(self, future: Future | None = None, event: torch.cuda.Event | None = None):
        self._future = future
        self._event = event

    def done(self) -> bool:
        if self._event is not None:
            return self._event.query()
        return self._future is None or self._future.done()

    def wait(self) -> None:
        if self._event is not None:
            self._event.synchronize()
        elif self._future is not None:
            self._future.result()


class CopyEngine:
    def __init__(self, device: torch.device, threaded: bool = False):
        self.device = device
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rayk-copy") if threaded and self._stream is None else None

    @property
    def asynchronous(self) -> bool:
        """Whether ``submit`` may return before the copy is done."""
        return self._stream is not None or self._executor is not None

    def submit(self, copy: Callable[[], None]) -> Ticket:
        if self._stream is not None:
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._stream):
                copy()
                event = torch.cuda.Event()
                event.record(self._stream)
            return Ticket(event=event)
        if self._executor is not None:
            return Ticket(future=self._executor.submit(copy))
        copy()
        return Ticket()
