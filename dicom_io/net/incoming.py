"""The incoming-file pool and the file one C-STORE dataset streams into.

Incoming files (`INCOMING_PREFIX`) are made ahead, in batches, by a thread of each receiving
process (`_IncomingFiles`) with their names already durable, and are write-only for their owner
until their dataset is complete (`_Spool.complete`): after a power cut `received_completely`
tells complete datasets from partial ones."""

from __future__ import annotations

import collections
import contextlib
import ctypes
import itertools
import logging
import os
import threading
from collections.abc import Callable
from io import FileIO
from pathlib import Path
from typing import cast

from dicom_io.durable import fsync_dir
from dicom_io.net.inspection import DatasetLimits, InstanceRefused
from dicom_io.net.interface import STATUS_CANNOT_UNDERSTAND, RefusalReason

LOGGER = logging.getLogger("dicom_io.net")  # the whole transport logs under one name

INCOMING_PREFIX = ".rx-"  # incoming files (made ahead, being received, or the handler's)
_RECEIVING_MODE = 0o200  # an incoming file before its dataset is complete: write-only for its owner


def received_completely(status: os.stat_result) -> bool:
    """Whether an incoming file holds a whole dataset (False: made ahead unused, or cut off)."""
    return status.st_size > 0 and status.st_mode & 0o777 != _RECEIVING_MODE


def _libc_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """Linux's `sync_file_range` (not in `os`), or None where libc lacks it."""
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return cast(Callable[[int, int, int, int], int], function)


_SYNC_FILE_RANGE = _libc_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2  # start writeback of the range's dirty pages; do not wait
_WRITEBACK_STEP = 256 << 10
_HEAD_BYTES = 64 << 10  # header elements before the pixel data; more is read back from the file
_PAGE = 4096


class _IncomingFiles:
    """Empty incoming files, made ahead by a thread of the receiving process with their names durable.

    A C-STORE then starts writing at once, and the names cost one fsync of the directory for each
    batch instead of one per instance: a handler that fsyncs the file after the last byte has it
    durable under this name, so it can make the final name durable later and for many instances at
    once. Each file is created write-only for its owner and `_Spool.complete` gives it its usual
    mode once its dataset is whole (`received_completely`). If the thread falls behind, or cannot
    create files, `take` creates one itself and raises what the file system says. The files out
    for writing are counted (`take`, `give_back`) so a writer knows whether others write at once.
    """

    def __init__(self, directory: Path, tag: str, file_mode: int, batch: int = 32) -> None:
        self.file_mode = file_mode  # of a complete file (`_Spool.complete`)
        self._prefix = os.path.join(directory, f"{INCOMING_PREFIX}{tag}-")
        self._directory = str(directory)
        self._batch = batch
        self._numbers = itertools.count(1)
        self._ready: collections.deque[tuple[str, int]] = collections.deque()
        self._wanted = threading.Event()
        self._closed = False
        self._writing = 0  # taken and not given back
        self._writing_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="radgate-incoming-files", daemon=True)
        self._thread.start()
        self._wanted.set()

    @property
    def others_writing(self) -> bool:
        """Whether another file of this process is being written too (the caller holds one)."""
        return self._writing > 1

    def take(self) -> tuple[str, int]:
        """A new empty file: its path and a write-only descriptor, now the caller's until `give_back`."""
        if len(self._ready) <= self._batch // 2:
            self._wanted.set()
        try:
            made = self._ready.popleft()
        except IndexError:
            made = self._make(1)[0]
        with self._writing_lock:
            self._writing += 1
        return made

    def give_back(self) -> None:
        """A file from `take` is no longer written (closed, whatever became of it)."""
        with self._writing_lock:
            self._writing -= 1

    def close(self) -> None:
        """Stop making files and remove those not taken."""
        self._closed = True
        self._wanted.set()
        self._thread.join(timeout=5)
        while self._ready:
            path, fd = self._ready.popleft()
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)

    def _run(self) -> None:
        while not self._closed:
            self._wanted.wait()
            self._wanted.clear()
            while not self._closed and len(self._ready) < self._batch:
                try:
                    made = self._make(self._batch)
                except OSError as exc:  # take() creates its own, and each C-STORE reports the error
                    LOGGER.warning("cannot make incoming files in %s: %s", self._directory, exc)
                    break
                self._ready.extend(made)  # close() removes those it finds after the thread ended

    def _make(self, count: int) -> list[tuple[str, int]]:
        made: list[tuple[str, int]] = []
        try:
            for _ in range(count):
                path = f"{self._prefix}{next(self._numbers)}.dcm"
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
                made.append((path, os.open(path, flags, _RECEIVING_MODE)))
            fsync_dir(self._directory)
        except OSError:
            for path, fd in made:
                os.close(fd)
                with contextlib.suppress(OSError):
                    os.unlink(path)
            raise
        return made


class _Spool:
    """The file a C-STORE dataset streams into; shaped like the NamedTemporaryFile pynetdicom expects.

    A write that fails (disk full, file size limit, permissions) must not end the association: the
    rest of the dataset still arrives and is dropped, the partial file is removed at once, and the
    request is answered 0xA700 (out of resources) from `error`. A dataset that grows past
    `max_dataset_bytes` is handled alike, as soon as it does, and answered from `refused` (0xC000).

    When this is the only file being written in the process, its pages are started on their way
    to the disk while the dataset arrives (`sync_file_range`, asynchronous, every 256 KiB) and the
    tail once it is whole, so the handler's fsync mostly waits for the inode; with other writers
    the calls are skipped (docs/design.md, "Ingest and transport").
    """

    def __init__(
        self, files: _IncomingFiles, header: bytes, max_dataset_bytes: int = DatasetLimits.max_dataset_bytes
    ) -> None:
        self.file = self  # pynetdicom calls `_data_set_file.file.flush()` after each fragment
        self.dataset_offset = len(header)
        self.max_size = len(header) + max_dataset_bytes
        self.error: OSError | None = None
        self.refused: InstanceRefused | None = None
        self.size = 0
        self.head = bytearray()  # the dataset's first bytes, for `inspect_dataset`
        self._written_back = 0
        self._f: FileIO | None = None
        self._files = files
        self._taken = False  # the file is ours until `close` gives it back
        try:
            self.name, fd = files.take()
            self._taken = True
        except OSError as exc:
            self.name, self.error = "", exc
        self.path = Path(self.name)
        if self.error is None:
            self._f = FileIO(fd, "wb")  # closed when the message completes
            self.write(header)

    def write(self, data: bytes | memoryview) -> None:
        if self._f is None or self.error is not None:
            return
        view = memoryview(data)
        if self.size + len(view) > self.max_size:
            self.refused = InstanceRefused(
                STATUS_CANNOT_UNDERSTAND,
                f"dataset larger than dicom.max_dataset_bytes ({self.max_size - self.dataset_offset} bytes)",
                RefusalReason.DATASET_TOO_LARGE,
            )
            self.discard()
            return
        if self.dataset_offset <= self.size and len(self.head) < _HEAD_BYTES:
            self.head += view[: _HEAD_BYTES - len(self.head)]
        try:
            while view:  # an unbuffered write may be short (e.g. up to a file size limit)
                written = self._f.write(view)
                self.size += written
                view = view[written:]
        except OSError as exc:
            self.error = exc
            self.discard()
            return
        whole_pages = self.size & ~(_PAGE - 1)  # a partial page would be written twice
        if whole_pages - self._written_back >= _WRITEBACK_STEP:
            self._start_writeback(whole_pages)

    def _start_writeback(self, end: int) -> None:
        """Start writing the bytes up to `end` to the disk, unless other files are being written too."""
        if _SYNC_FILE_RANGE is None or self._f is None or self._files.others_writing:
            return
        start = self._written_back
        if end > start:  # a failure shows again in the handler's fsync
            _SYNC_FILE_RANGE(self._f.fileno(), start, end - start, _SYNC_FILE_RANGE_WRITE)
            self._written_back = end

    def flush(self) -> None:
        """Unbuffered: nothing to flush."""

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None  # later writes of the dataset are dropped
        if self._taken:
            self._files.give_back()
            self._taken = False

    def complete(self) -> None:
        """The whole dataset is in: start writing back the tail, give the file its usual mode
        (`received_completely`), close it."""
        if self._f is not None:
            try:
                self._start_writeback(self.size)
                os.fchmod(self._f.fileno(), self._files.file_mode)
            except OSError as exc:
                self.error = exc
        self.close()

    def discard(self) -> None:
        self.close()
        if self.name:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
