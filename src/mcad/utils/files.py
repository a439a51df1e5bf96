"""Atomic file writes shared by every output of a run (results, reports, caches)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_write", "atomic_write_text", "default_mode"]


def default_mode(directory: bool = False) -> int:
    """Permissions ``open``/``mkdir`` would give a new file/folder: ``0o666``/``0o777`` minus the umask."""
    # os.umask can only be read by setting it; restore it at once.
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def atomic_write(path: str | Path, write: Callable[[IO[Any]], object], binary: bool = False) -> None:
    """Writes ``path`` through a temporary file in the same folder, then renames it into place.

    A kill during writing leaves either the old file or no file, never a truncated one. The file gets
    the permissions a plain ``open(path, "w")`` would give (``0o666`` minus the umask), not the
    ``0o600`` of :func:`tempfile.mkstemp`, so results stay readable by collaborators.

    Args:
        path: Destination; its folder is created if missing.
        write: Called with the open temporary file.
        binary: Open the temporary file in binary mode.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, default_mode())
        with os.fdopen(fd, "wb" if binary else "w") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Writes ``text`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda fh: fh.write(text))
