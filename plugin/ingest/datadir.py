"""The node's data dir: one node at a time (a lock held for its life), and private files.

One node per data dir: a receiver cleans up after a crash at its start (`radgate serve` recovers the
spool and empties ``incoming/``, the Orthanc plugin empties ``incoming-orthanc/``), so two of the same
kind on one data dir would destroy each other's work. Each takes an exclusive ``flock`` on its own
lock file in the data dir (`SERVE`, `ORTHANC_PLUGIN`) before it touches anything there and holds it
until it exits; the kernel drops the lock when the process dies, however it dies, so a crash never
leaves a stale lock. A serve and an Orthanc plugin may share a data dir (each has its own incoming
folder, docker/compose.yaml does). The file holds the holder's pid, host and start time, so a second
one can say who holds it. The lock belongs to the open file description, which receiving and
executor processes never share: they are spawned (fork and exec), and the descriptor is opened
close-on-exec, so no child can keep or drop it.

Private files: `apply_file_modes` sets the process umask so that every file and folder the process
and its children create afterwards (spool, incoming and quarantined files, the SQLite database and
its -wal/-shm, lock files, results) is the owner's only, or also the group's to read when the
configuration says ``group_readable``; nothing is ever readable by other users.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Role:
    """A kind of process of which one at a time may use a data dir: its lock file and its name."""

    lock_name: str
    what: str


SERVE = Role("radgate.lock", "radgate serve")
ORTHANC_PLUGIN = Role("radgate-orthanc.lock", "the radgate plugin of an Orthanc")


def named_node(node_name: str) -> Role:
    """The role of the serve named ``node_name`` in a cluster's shared incoming folder
    (`plugin.config.ClusterConfig`): its start empties ``incoming/<node_name>``, so two nodes of one
    name would destroy each other's transfers. The lock file lies beside that folder, not in it."""
    return Role(f"{node_name}.lock", f"radgate serve named {node_name!r}")


@dataclass(frozen=True)
class FileModes:
    """The modes of what the node creates: ``umask`` for the process, ``file`` and ``dir`` explicit."""

    umask: int
    file: int
    dir: int


PRIVATE = FileModes(umask=0o077, file=0o600, dir=0o700)
GROUP_READABLE = FileModes(umask=0o027, file=0o640, dir=0o750)


def file_modes(group_readable: bool) -> FileModes:
    return GROUP_READABLE if group_readable else PRIVATE


def apply_file_modes(modes: FileModes) -> None:
    """Set this process's umask (inherited by the processes it starts) to ``modes.umask``."""
    os.umask(modes.umask)


class DataDirBusy(OSError):
    """Another live process holds the data dir's lock; the message names it (pid, host, since)."""


class DataDirLock:
    """The exclusive lock of one role on one data dir (module docstring); `acquire`, then `release`."""

    def __init__(self, data_dir: Path, modes: FileModes, role: Role) -> None:
        self.data_dir = data_dir
        self.path = data_dir / role.lock_name
        self._role = role
        self._modes = modes
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock without waiting (a no-op if held), write who holds it, and make the data dir
        its owner's (``modes.dir``). Raises DataDirBusy if another process holds it, OSError if the
        data dir cannot be made or the lock file opened; in both cases nothing else was touched."""
        if self._fd is not None:
            return
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=self._modes.dir)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, self._modes.file)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            what = self._role.what
            raise DataDirBusy(
                f"data dir {self.data_dir.resolve()} is in use by {what}, {self._holder()}; "
                f"one {what} per data dir (stop that one first)"
            ) from None
        except OSError:
            os.close(fd)
            raise
        self._fd = fd
        try:
            since = datetime.now(UTC).isoformat(timespec="seconds")
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid={os.getpid()} host={socket.gethostname()} since={since}\n".encode(), 0)
            os.fchmod(fd, self._modes.file)  # a lock file left by an older version may be wider
            self._restrict(self.data_dir, self._modes.dir)
        except OSError:
            self.release()
            raise

    def _holder(self) -> str:
        """Who holds the lock, as its file says (it may be mid-write: then as much as is there)."""
        try:
            text = self.path.read_text(encoding="utf-8", errors="replace").strip()
        except OSError as err:
            return f"another process (its lock file is unreadable: {err.strerror})"
        fields = dict(part.partition("=")[::2] for part in text.split())
        if not {"pid", "host", "since"} <= fields.keys():
            return "another process"
        return f"pid {fields['pid']} on {fields['host']} since {fields['since']}"

    @staticmethod
    def _restrict(directory: Path, mode: int) -> None:
        """Give a folder we own ``mode`` (one made by someone else, e.g. root, is left as it is)."""
        status = directory.stat()
        if status.st_uid == os.geteuid() and status.st_mode & 0o777 != mode:
            os.chmod(directory, mode)
            log.info("data dir %s: mode set to %o", directory, mode)

    def release(self) -> None:
        """Give the lock up (the file stays: removing it would race a node opening it)."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
