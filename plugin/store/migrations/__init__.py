"""Alembic migrations of the job store; run by ``plugin.store.Store.migrate`` at every start."""
