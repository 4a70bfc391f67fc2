"""Running batched block copies off the caller's critical path.

On CUDA a copy is enqueued on a dedicated stream, after the work already queued on the current
stream (so it reads finished data), and an event marks its end. On the CPU a single worker thread
runs the copies in order (torch releases the GIL while it copies). Either way the caller gets a
``Ticket`` and keeps every block the copy touches referenced until ``Ticket.done()``.
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
        return self._future.done()

    def wait(self) -> None:
        if self._event is not None:
            self._event.synchronize()
        else:
            self._future.result()


class CopyEngine:
    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            self._stream = torch.cuda.Stream(device)
        else:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rayk-copy")

    def submit(self, copy: Callable[[], None]) -> Ticket:
        if self.device.type == "cuda":
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._stream):
                copy()
                event = torch.cuda.Event()
                event.record(self._stream)
            return Ticket(event=event)
        return Ticket(future=self._executor.submit(copy))
