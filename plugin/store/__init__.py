"""The job store: the truth the node recovers from, written before a C-STORE is acknowledged.

- `plugin.store.models`: the tables (studies, series, instances, receptions, jobs, deliveries, pseudonyms);
- `plugin.store.engine`: `Store` — engines with the settings durability relies on, sessions, migrations;
- `plugin.store.recording`: recording a received instance, the one write on the receiving hot path;
- `plugin.store.queries`: what completion, the CLI and the reports read (counts derived when read);
- `plugin.store.accounts`: the web console's users, sessions, API tokens and audit trail (imported
  here, so its tables are in ``Base.metadata`` wherever the store is used);
- `plugin.store.pauses`: rules and destinations an operator paused (imported here, like accounts);
- `plugin.store.reports`: what the web console reads;
- `plugin.store.migrations`: the Alembic migrations, run by `Store.migrate` at every start.
"""

from plugin.store import accounts as accounts
from plugin.store import pauses as pauses
