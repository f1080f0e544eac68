"""A throwaway PostgreSQL cluster (Debian's server binaries) on a free loopback port.

The job store runs on PostgreSQL when its URL says so; the store tests run on both databases
where ``initdb`` is installed and ``psycopg`` importable. As root, the cluster belongs to the
``postgres`` user (``initdb`` refuses to run as root).
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest

BACKENDS = ("sqlite", "postgresql")
both_databases = pytest.mark.parametrize("store", BACKENDS, indirect=True)
"""Run a test on SQLite and on PostgreSQL: for a module whose ``store`` fixture takes its backend
from `database_url` (SQLite unless parametrized)."""


def database_url(request: pytest.FixtureRequest, directory: Path) -> str:
    """A new, empty store's URL on the backend the fixture's parameter names (SQLite when it has
    none): ``sqlite`` is ``directory/radgate.db``, ``postgresql`` a new database on the session's
    server (the ``postgres`` fixture, which skips where PostgreSQL is not installed)."""
    if getattr(request, "param", "sqlite") == "postgresql":
        url: str = request.getfixturevalue("postgres").new_database()
        return url
    return f"sqlite:///{directory / 'radgate.db'}"


def find_initdb() -> Path | None:
    """Debian keeps the server binaries under /usr/lib/postgresql/<version>/bin."""
    found = shutil.which("initdb") or next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))), None)
    return Path(found).resolve() if found else None


class PostgresServer:
    def __init__(self, root: Path, initdb: Path) -> None:
        self.root = root
        self.bin = initdb.parent
        self.data = root / "data"
        self._admin: Any = None  # a psycopg connection to the ``postgres`` database, made when first needed
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])

    def _run(self, *args: str) -> None:
        command = [str(self.bin / args[0]), *args[1:]]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{args[0]} failed: {done.stderr[-500:]}")

    def start(self) -> PostgresServer:
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres")
        # a throwaway cluster: initdb need not sync its files to disk (nor the server, fsync=off)
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "radgate", "--no-sync")
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.root / "log"), "-w", "start")
        return self

    def new_database(self) -> str:
        """An empty database (a copy of ``template1``, like ``createdb`` makes); its SQLAlchemy URL."""
        import psycopg

        if self._admin is None:
            self._admin = psycopg.connect(
                host="127.0.0.1", port=self.port, user="radgate", dbname="postgres", autocommit=True
            )
        name = f"t{uuid.uuid4().hex[:12]}"
        # the files copied, not written to the WAL block by block: far cheaper for a small template
        strategy = " STRATEGY FILE_COPY" if self._admin.info.server_version >= 150000 else ""
        self._admin.execute(f"CREATE DATABASE {name}{strategy}")
        return f"postgresql+psycopg://radgate@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        if self._admin is not None:
            self._admin.close()
            self._admin = None
        if (self.data / "postmaster.pid").exists():
            # nothing of the cluster is kept: no shutdown checkpoint
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
