"""Alembic migrations of the job store; run by ``plugin.store.db.Store.migrate`` at every start."""
