"""Fixtures of the integration tests.

A module that needs another store (one on the node's data dir, say) defines its own ``store``,
which wins over this one.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from plugin.store.engine import Store


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """A migrated store on the embedded default (SQLite) and on PostgreSQL where it is installed
    (the ``postgres`` fixture skips otherwise): the same code must hold on both."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'radgate.db'}"
    else:
        url = request.getfixturevalue("postgres").new_database()
    s = Store(url)
    s.migrate()
    yield s
    s.dispose()
