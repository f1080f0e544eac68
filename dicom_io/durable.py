"""Durability on POSIX file systems: fsync a file's data, or a directory's entries (new names
in it, renames into it). Raises OSError as the file system says."""

from __future__ import annotations

import os
from pathlib import Path


def _fsync(path: Path | str, flags: int) -> None:
    fd = os.open(path, os.O_RDONLY | flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path | str) -> None:
    """Make a directory's entries durable (new names in it)."""
    _fsync(path, os.O_DIRECTORY)


def fsync_file(path: Path | str) -> None:
    """Make a file's data durable (and the metadata needed to read it back)."""
    _fsync(path, 0)
