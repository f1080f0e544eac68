"""Fixtures of the integration tests.

A module that needs another store (one on the node's data dir, say) defines its own ``store``,
which wins over this one.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from support.postgres import BACKENDS, database_url

from plugin.store.engine import Store, migrated_store


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """A migrated store on the embedded default (SQLite) and on PostgreSQL where it is installed
    (the ``postgres`` fixture skips otherwise): the same code must hold on both."""
    with migrated_store(database_url(request, tmp_path)) as s:
        yield s
