"""``radgate audit export``: the audit trail as JSON lines, one event per line, oldest first."""

from __future__ import annotations

import json
from datetime import datetime

from plugin.cli.users import cli_actor
from plugin.config import Config
from plugin.store.engine import migrated_store
from plugin.web.audit import events, record


def export(config: Config, since: datetime | None, studies: bool) -> int:
    """Print every event since ``since`` (and, with ``studies``, each study's life); the export is
    itself recorded. 0 always (an empty trail prints nothing)."""
    with migrated_store(config.db_url) as store:
        for event in events(store, since=since, studies=studies):
            print(json.dumps(event.to_json(), sort_keys=True))
        record(store, cli_actor(), "audit.export", detail={"since": since.isoformat() if since else None})
    return 0
