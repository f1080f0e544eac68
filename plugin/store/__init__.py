"""The job store: tables, engine, queries (`plugin.store.db`) and its Alembic migrations."""
