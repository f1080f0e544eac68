"""The job store: tables, engine, queries (`plugin.store.db`) and its Alembic migrations.

`plugin.store.accounts` (the web console's users, sessions, tokens and audit trail) is imported
here so that its tables are in ``Base.metadata`` wherever the store is used.
"""

from plugin.store import accounts as accounts
