"""Crash-safe file writes: a reader, or a power cut, sees the old file or the new one, never half of either."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Union

from .faults import checkpoint

__all__ = ["atomic_write_bytes", "atomic_write_json", "atomic_write_text", "fsync_dir"]


def _umask() -> int:
    """The process umask (read by setting and restoring it; there is no getter)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(folder: Path) -> None:
    """Makes a rename inside `folder` durable (POSIX needs the directory itself flushed)."""
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # platforms without directory handles (Windows) make renames durable themselves
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_bytes(path: Union[str, Path], data: bytes) -> None:
    """Writes `data` to a temporary file beside `path`, flushes it to disk, then renames it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fp:
            fp.write(data)
            fp.flush()
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs are for others to read
            os.fsync(fp.fileno())
        checkpoint("export")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Union[str, Path], text: str) -> None:
    """`atomic_write_bytes` for UTF-8 text, newlines written as given."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Union[str, Path], document: object) -> None:
    """A JSON document, indented, with a final newline, written atomically."""
    import json

    atomic_write_text(path, json.dumps(document, indent=2) + "\n")
