"""``radgate audit export``: the audit trail as JSON lines, one event per line, oldest first."""

from __future__ import annotations

import json
from datetime import datetime

from plugin.cli.users import cli_actor
from plugin.config import Config
from plugin.store.db import Store
from plugin.web.audit import events, record


def export(config: Config, since: datetime | None, studies: bool) -> int:
    """Print every event since ``since`` (and, with ``studies``, each study's life); the export is
    itself recorded. 0 always (an empty trail prints nothing)."""
    store = Store(config.db_url)
    try:
        store.migrate()
        for event in events(store, since=since, studies=studies):
            print(json.dumps(event.to_json(), sort_keys=True))
        record(store, cli_actor(), "audit.export", detail={"since": since.isoformat() if since else None})
    finally:
        store.dispose()
    return 0
