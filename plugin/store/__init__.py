"""The job store: tables, engine, queries (`plugin.store.db`) and its Alembic migrations.

`plugin.store.accounts` (the web console's users, sessions, tokens and audit trail) and
`plugin.store.pauses` (rules and destinations an operator paused) are imported here so that their
tables are in ``Base.metadata`` wherever the store is used. `plugin.store.reports` holds what the
web console reads.
"""

from plugin.store import accounts as accounts
from plugin.store import pauses as pauses
