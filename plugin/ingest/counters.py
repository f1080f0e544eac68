"""What only the receiving processes know, counted for ``/metrics``: instances stored, received
again and refused (by reason), associations refused (by reason), bytes stored.

Each process that receives (a receiving process of the storage SCP, the node itself with one
receiver, the Orthanc plugin's bridge) adds to its own file ``counter_<pid>.db`` in the metrics
folder (`Config.metrics_dir`), in the format of prometheus_client's multiprocess mode (its
``MmapedDict``: a memory-mapped file, an add is a write into memory, no system call), and
``prometheus_client.multiprocess.MultiProcessCollector`` sums the files when scraped
(`plugin.web.metrics`). A process that ends leaves its file, so its counts stay in the sums; a
listening node's start removes the files of processes that are gone (`reset`), which Prometheus
reads as a counter reset. Counting never stops ingest: a file that cannot be made leaves the
process uncounted, with one log line; the file's blocks are allocated when it is made, so that
writing a new key on a full disk cannot fault (a memory-mapped write has no error to return).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
from pathlib import Path

from prometheus_client.mmap_dict import MmapedDict, mmap_key

log = logging.getLogger(__name__)

FILE_BYTES = 64 << 10  # room for every key many times over: the file never grows

RECEIVED = "radgate_instances_received"
RECEIVED_BYTES = "radgate_received_bytes"
DUPLICATES = "radgate_instances_duplicate"
REFUSED = "radgate_instances_refused"
ASSOCIATIONS_REFUSED = "radgate_associations_refused"

_HELP = {
    RECEIVED: "Instances stored and recorded (acknowledged 0x0000, not received before)",
    RECEIVED_BYTES: "Bytes of the instances stored (Part 10 files as spooled)",
    DUPLICATES: "Instances received again (acknowledged 0x0000, the stored copy kept)",
    REFUSED: "C-STOREs answered with a failure status, by reason and status",
    ASSOCIATIONS_REFUSED: "A-ASSOCIATE requests rejected, by reason",
}

# the node's own refusal reasons, beside the transport's `dicom_io.net.RefusalReason` codes
NOT_STORABLE = "not_storable"  # 0xC000: the header cannot be read, or a UID is unsafe
DISK_FULL = "disk_full"  # 0xA700: no space left on the spool's file system
SPOOL_WRITE_FAILED = "spool_write_failed"  # 0xA700: another error writing the spool
DATABASE_ERROR = "database_error"  # 0xA700: the job store could not record it
INTERNAL_ERROR = "internal_error"  # 0xA700: an unexpected error (logged with its traceback)


def spool_error_reason(err: OSError) -> str:
    """DISK_FULL for ENOSPC and EDQUOT, SPOOL_WRITE_FAILED for any other error writing the spool."""
    return DISK_FULL if err.errno in (errno.ENOSPC, errno.EDQUOT) else SPOOL_WRITE_FAILED


def _key(metric: str, labels: dict[str, str]) -> str:
    return mmap_key(metric, f"{metric}_total", list(labels), list(labels.values()), _HELP[metric])


def _open(directory: Path, dir_mode: int) -> MmapedDict | None:
    """This process's counter file, its blocks allocated; None (logged) if it cannot be made."""
    path = directory / f"counter_{os.getpid()}.db"
    try:
        directory.mkdir(mode=dir_mode, parents=True, exist_ok=True)
        # the mode is left to the umask, which the node sets from Config.file_modes
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            if os.fstat(fd).st_size < FILE_BYTES:
                os.posix_fallocate(fd, 0, FILE_BYTES)
        finally:
            os.close(fd)
        return MmapedDict(str(path))
    except (OSError, RuntimeError) as err:  # RuntimeError: a corrupt file left by a reused pid
        log.error("cannot open %s (%s): this process's instances are not counted in /metrics", path, err)
        return None


class ReceiveCounters:
    """This process's counters, in its file in ``directory`` (created with mode ``dir_mode`` if
    absent; if it cannot be, nothing is counted and nothing raised). Thread-safe; not to be shared
    across processes (each opens its own)."""

    def __init__(self, directory: Path, dir_mode: int = 0o700) -> None:
        self._file = _open(directory, dir_mode)
        self._lock = threading.Lock()
        self._received = _key(RECEIVED, {})
        self._bytes = _key(RECEIVED_BYTES, {})
        self._duplicates = _key(DUPLICATES, {})
        self._add(self._received, 0)  # present, as 0, from the start
        self._add(self._bytes, 0)
        self._add(self._duplicates, 0)

    def _add(self, key: str, amount: float) -> None:
        with self._lock:
            if self._file is not None:
                self._file.write_value(key, self._file.read_value(key)[0] + amount, 0.0)

    def stored(self, size: int) -> None:
        """One instance stored, of ``size`` bytes."""
        self._add(self._received, 1)
        self._add(self._bytes, size)

    def duplicate(self) -> None:
        """One instance received again."""
        self._add(self._duplicates, 1)

    def refused(self, reason: str, status: int) -> None:
        """One C-STORE answered with the failure ``status`` for ``reason``."""
        self._add(_key(REFUSED, {"reason": reason, "status": f"0x{status:04X}"}), 1)

    def association_refused(self, reason: str) -> None:
        """One A-ASSOCIATE request rejected for ``reason``."""
        self._add(_key(ASSOCIATIONS_REFUSED, {"reason": reason}), 1)

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


def reset(directory: Path, dir_mode: int = 0o700) -> None:
    """Make ``directory`` (mode ``dir_mode`` if it is ours) and remove the counter files of processes
    that are no longer running (a running one, e.g. an Orthanc plugin's bridge on the same data dir,
    keeps its). Never raises: what it cannot do is logged, and the node starts all the same."""
    try:
        directory.mkdir(mode=dir_mode, parents=True, exist_ok=True)
        if directory.stat().st_uid == os.geteuid():
            os.chmod(directory, dir_mode)
        for path in directory.glob("counter_*.db"):
            pid = path.stem.removeprefix("counter_")
            if not pid.isdigit() or not _running(int(pid)):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
    except OSError as err:
        log.error(
            "cannot reset the counters in %s: %s; /metrics may count from before this start", directory, err
        )


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: running
        return True
    return True
