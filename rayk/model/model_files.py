"""Opening a model's files, with errors that say what happened.

The libraries that read model files report an unreadable file poorly: safetensors says "No such
file or directory", tokenizers a bare "Permission denied (os error 13)", naming no file. So every
file is opened here once before a library gets its path, and a failure is a ValueError naming
the file and the operating system's reason. Opening never waits: a FIFO in a model directory is
refused, not read.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

_FLAGS = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)


def readable(path: Path) -> str:
    """``path`` as a string, once it has opened for reading as a regular file; a ValueError
    naming it and why otherwise."""
    try:
        descriptor = os.open(path, _FLAGS)
    except OSError as error:
        raise ValueError(f"cannot read {path.name} ({str(path)!r}): {error.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise ValueError(f"cannot read {path.name} ({str(path)!r}): not a regular file")
    finally:
        os.close(descriptor)
    return str(path)


def check_model_path(path: Path) -> None:
    """A ValueError unless ``path`` exists and can be read: a directory listed, a file opened."""
    try:
        is_directory = path.is_dir()
        if is_directory:
            os.listdir(path)
    except FileNotFoundError:
        raise ValueError(f"model {str(path)!r} does not exist") from None
    except OSError as error:
        raise ValueError(f"cannot read the model directory {str(path)!r}: {error.strerror}") from None
    if not is_directory:
        if not os.path.lexists(path):
            raise ValueError(f"model {str(path)!r} does not exist")
        readable(path)
