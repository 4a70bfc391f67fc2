"""Chat templates rendered in a child process under hard limits of memory and time.

A model's chat template is code that came with its files. Jinja's sandbox keeps it from reaching
anything outside, but not from spending: one string method (``'a'.ljust(10**10)``), a ``%``
format with a huge width, or a string doubled in a loop allocates gigabytes in a single C call,
which no check between template steps can stop, and a loop can run for minutes. So templates
render in a child process (``python -m rayk.model.template_sandbox``) that caps its own address
space at ``RENDER_MEMORY_BYTES`` (``RLIMIT_AS``) before it reads any request. The parent waits
``TEMPLATE_RENDER_SECONDS`` for each answer. Past either limit the render is refused with a
ValueError, the child is ended (it ends itself after running out of memory), and the next render
starts a new one. Nothing in the parent is traced, paused or put at risk.

In the child the environment is Jinja's immutable sandbox configured as transformers configures
it (``trim_blocks``, ``lstrip_blocks``, ``loopcontrols``, ``raise_exception``), plus clear early
refusals of ``*`` and ``**`` that would build huge values, and the rendering stops once it passes
the caller's character limit.

Protocol: frames of a 4-byte little-endian length and a msgpack body, over the child's stdin and
stdout. A request is ``[template, limit, why that limit, context]`` (the context is plain values);
the answer is ``["ok", text]``, ``["error", message]``, or ``["exit", message]`` when the child
ran out of memory and exits (whatever the failed allocation left, a new child starts clean). The
child keeps compiled templates by their source. One child serves a whole process, its threads in
turn, and starts on the first render (about 0.1 s); it exits when its stdin closes, so it never
outlives its parent.
"""

from __future__ import annotations

import atexit
import os
import resource
import select
import subprocess
import sys
import threading
import time

import msgpack

MAX_TEXT_CHARS = 1 << 24
"""The most characters any text may have, budget or not (16 Mi)."""
TEMPLATE_RENDER_SECONDS = 2.0
"""The most wall-clock time one chat template rendering may take."""
RENDER_MEMORY_BYTES = 1 << 30
"""The child's address space: the interpreter and Jinja take about 60 MB of it, a render the rest."""
_MAX_POWER_EXPONENT = 1024  # ``a ** b`` in a template: larger exponents of |a| > 1 build huge ints
_MAX_FRAME_BYTES = 1 << 28  # a request or answer: four times the longest text, in UTF-8
_CHILD_ENVIRONMENT = ("PATH", "PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "LANG", "LC_ALL", "TMPDIR")
"""All the child inherits of the environment: what finds Python and rayk. Secrets a deployment
keeps in variables (an integrity key, a tenant secret) stay out of the process running templates."""


def render(template: str, limit: int, reason: str, context: dict) -> str:
    """``template`` rendered with ``context`` in the child, at most ``limit`` characters (the
    error says ``reason``); a ValueError naming what the template did otherwise (over a limit,
    or its own error)."""
    return _RENDERER.render(template, limit, reason, context)


class _Renderer:
    """The parent's side: one child, started when needed, used by one thread at a time."""

    def __init__(self):
        self._process: subprocess.Popen | None = None
        self._lock = threading.Lock()

    def render(self, template: str, limit: int, reason: str, context: dict) -> str:
        try:
            request = msgpack.packb([template, limit, reason, context], use_bin_type=True)
        except (TypeError, ValueError) as error:
            raise TypeError(f"a conversation must hold plain values (str, numbers, lists, dicts): {error}") from None
        with self._lock:
            process = self._running()
            deadline = time.monotonic() + TEMPLATE_RENDER_SECONDS
            try:
                _write_frame(process.stdin.fileno(), request)
                status, value = msgpack.unpackb(_read_frame(process.stdout.fileno(), deadline), raw=False)
            except TimeoutError:
                self.stop()
                raise ValueError(f"chat template rendering ran over {TEMPLATE_RENDER_SECONDS} s; refused") from None
            except (OSError, EOFError, ValueError):
                self.stop()
                raise ValueError("chat template rendering ended its sandbox process; refused") from None
            if status == "exit":
                self.stop()
        if status != "ok":
            raise ValueError(value)
        return value

    def _running(self) -> subprocess.Popen:
        if self._process is None or self._process.poll() is not None:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "rayk.model.template_sandbox"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                bufsize=0,
                close_fds=True,
                env={name: os.environ[name] for name in _CHILD_ENVIRONMENT if name in os.environ},
            )
        return self._process

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            process.kill()
            process.wait()
            process.stdin.close()
            process.stdout.close()


_RENDERER = _Renderer()
atexit.register(_RENDERER.stop)


def _write_frame(descriptor: int, body: bytes) -> None:
    data = memoryview(len(body).to_bytes(4, "little") + body)
    while data:
        data = data[os.write(descriptor, data) :]


def _read_frame(descriptor: int, deadline: float | None = None) -> bytes:
    """One frame's body; TimeoutError past ``deadline`` (monotonic seconds), EOFError if the
    other side closed, ValueError for a length past ``_MAX_FRAME_BYTES``."""
    header = _read_exactly(descriptor, 4, deadline)
    length = int.from_bytes(header, "little")
    if length > _MAX_FRAME_BYTES:
        raise ValueError(f"a frame of {length} bytes")
    return _read_exactly(descriptor, length, deadline)


def _read_exactly(descriptor: int, count: int, deadline: float | None) -> bytes:
    chunks, remaining = [], count
    while remaining:
        if deadline is not None:
            wait = deadline - time.monotonic()
            if wait <= 0 or not select.select([descriptor], [], [], wait)[0]:
                raise TimeoutError
        chunk = os.read(descriptor, min(remaining, 1 << 20))
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


# -- the child ------------------------------------------------------------------------------------


def _environment():
    from jinja2.ext import loopcontrols
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        """Refuses a ``*`` or ``**`` whose result would be huge, before building it (at render
        or, for constants, at compile: intercepted operators are not folded)."""

        intercepted_binops = frozenset({"*", "**"})

        def call_binop(self, context, operator, left, right):
            if operator == "*":
                sequence, count = (left, right) if isinstance(right, int) else (right, left)
                if isinstance(sequence, (str, list, tuple)) and isinstance(count, int) and len(sequence) * count > MAX_TEXT_CHARS:
                    raise ValueError(f"chat template repeats a sequence of {len(sequence)} items {count} times, over {MAX_TEXT_CHARS}")
            elif isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > _MAX_POWER_EXPONENT:
                raise ValueError(f"chat template raises {left} to the power {right}; exponents above {_MAX_POWER_EXPONENT} are refused")
            return super().call_binop(context, operator, left, right)

    environment = BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    environment.globals["raise_exception"] = raise_exception
    return environment


def _render_in_child(environment, compiled: dict, template: str, limit: int, reason: str, context: dict) -> str:
    if template not in compiled:
        compiled.clear()  # one model's template at a time, in practice
        compiled[template] = environment.from_string(template)
    pieces, length = [], 0
    for piece in compiled[template].generate(**context):
        length += len(piece)
        if length > limit:
            raise ValueError(f"chat template rendering exceeds {limit} characters ({reason}); refused")
        pieces.append(piece)
    return "".join(pieces)


def _cap_memory() -> None:
    """Caps this process's address space (``RLIMIT_AS``), or where a system refuses that (macOS
    does) its data segment; where neither can be set, renders are bounded by the parent's
    timeout alone."""
    for limit in (resource.RLIMIT_AS, resource.RLIMIT_DATA):
        try:
            resource.setrlimit(limit, (RENDER_MEMORY_BYTES, RENDER_MEMORY_BYTES))
            return
        except (ValueError, OSError):
            continue


def _serve() -> None:
    """The child: caps its memory, then answers requests until its stdin closes."""
    from jinja2.exceptions import TemplateError

    _cap_memory()
    environment, compiled = _environment(), {}
    requests, answers = sys.stdin.fileno(), sys.stdout.fileno()
    while True:
        try:
            template, limit, reason, context = msgpack.unpackb(_read_frame(requests), raw=False)
        except EOFError:
            return
        try:
            answer = ["ok", _render_in_child(environment, compiled, template, limit, reason, context)]
        except MemoryError:
            answer = ["exit", f"chat template rendering needed more than {RENDER_MEMORY_BYTES >> 20} MiB; refused"]
        except TemplateError as error:  # raise_exception, a syntax error, an unsafe access
            answer = ["error", f"chat template error: {error}"]
        except Exception as error:  # a refusal above, or the template's own failure
            answer = ["error", str(error) if str(error).startswith("chat template") else f"chat template error: {error!r}"]
        _write_frame(answers, msgpack.packb(answer, use_bin_type=True))
        if answer[0] == "exit":
            return


if __name__ == "__main__":
    _serve()
