"""Fixtures of the unit tests: a node configuration on a fresh data dir and its migrated store.

A module that needs other settings defines its own ``config`` (or ``store``), which wins over these.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from support.execute import make_config

from plugin.config import Config
from plugin.ingest.receive import make_spool
from plugin.store.engine import Store, migrated_store


@pytest.fixture()
def config(tmp_path: Path) -> Config:
    """The embedded defaults on ``tmp_path/data``, executors polling every 0.1 s."""
    return make_config(tmp_path / "data")


@pytest.fixture()
def store(config: Config) -> Iterator[Store]:
    """``config``'s store, schema up to date, with its spool folders made; disposed afterwards."""
    make_spool(config).prepare()
    with migrated_store(config.db_url) as s:
        yield s
