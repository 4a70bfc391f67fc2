"""A cheap identity of a weights file: its size and evenly spaced windows of its bytes.

Hashing whole multi-GB files at every start would cost seconds; the windows, with whatever the
caller adds (headers, quant types), tell apart files of the same shapes.
"""

from __future__ import annotations

from pathlib import Path

_WINDOWS = 8
_WINDOW_BYTES = 64 << 10


def add_file_samples(digest, path: Path) -> None:
    """Feeds ``digest`` (an xxhash/hashlib object) the file's name, size and sampled windows."""
    size = path.stat().st_size
    digest.update(f"{path.name}:{size}:".encode())
    with path.open("rb") as f:
        for i in range(_WINDOWS):
            f.seek(size * i // _WINDOWS)
            digest.update(f.read(_WINDOW_BYTES))
