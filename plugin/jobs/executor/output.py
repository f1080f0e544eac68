"""The results folder of a job, written whole or not at all: the one way results reach the disk.

A worker with the spool at hand writes there itself (`plugin.jobs.executor.work`); with the Ray
executor the node writes the files an actor sent back, through the same `write_whole`. Why a
folder renamed into place: `plugin.jobs.executor.work`'s docstring. No torch here: the node and
the web console read results too.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from collections.abc import Callable
from pathlib import Path

import pydicom

from dicom_io.durable import fsync_dir

MANIFEST = "results.json"


def read_manifest(out_dir: Path) -> tuple[tuple[str, str], ...]:
    """(SOP Instance UID, file path) of each result in ``out_dir``, in sending order.

    Raises OSError or ValueError when the manifest is missing or unreadable.
    """
    entries = json.loads((out_dir / MANIFEST).read_text())
    return tuple((uid, str(out_dir / name)) for uid, name in entries)


def write_whole(out_dir: Path, write: Callable[[Path], list[Path]]) -> tuple[tuple[str, str], ...]:
    """Call ``write(folder)`` for the result files in a temporary sibling folder, make them durable
    with a manifest, rename the folder to ``out_dir``; (SOP Instance UID, path) of each result.

    Raises what ``write`` raises, or OSError; what a failed call left is removed by the next one.
    """
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    for left in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):  # from attempts killed while encoding
        shutil.rmtree(left, ignore_errors=True)
    temp = out_dir.with_name(f".{out_dir.name}.tmp-{socket.gethostname()}-{os.getpid()}")  # a shared dir
    paths = write(temp)
    entries = [(str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID), p.name) for p in paths]
    (temp / MANIFEST).write_text(json.dumps(entries))
    for path in [*paths, temp / MANIFEST]:
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    fsync_dir(temp)
    try:
        os.rename(temp, out_dir)
    except OSError:  # another attempt renamed its complete folder first: use that one
        shutil.rmtree(temp, ignore_errors=True)
        if not (out_dir / MANIFEST).is_file():
            raise
    fsync_dir(out_dir.parent)
    return read_manifest(out_dir)
