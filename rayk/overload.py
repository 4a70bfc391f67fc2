"""Backpressure: ``Overloaded``, the error a deployment answers when its queue is full.

Plain Python (no torch, no Ray): the coordinator raises it, Ray carries it back to the driver as
a value (its ``args`` rebuild it), and ``import rayk`` exports it as ``rayk.Overloaded``.
"""

from __future__ import annotations


class Overloaded(RuntimeError):
    """A request was refused, before anything was queued, because ``depth`` requests (routed to
    a worker and not yet finished, across the whole deployment) had reached ``bound``
    (``max_queued_requests``). Nothing of it ran: send it again later."""

    def __init__(self, bound: int, depth: int):
        super().__init__(bound, depth)
        self.bound = bound
        self.depth = depth

    def __str__(self) -> str:
        return (
            f"rayk deployment overloaded: {self.depth} requests are queued or running and "
            f"max_queued_requests is {self.bound}; nothing of this request was queued, send it again later"
        )


def check_max_queued_requests(value) -> int | None:
    """``value`` if it is None (no bound) or an int >= 1; a ValueError naming it otherwise."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"max_queued_requests must be an int >= 1 (requests) or None (no bound), got {value!r}")
    return value
