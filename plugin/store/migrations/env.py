"""Alembic environment: migrations run on the connection that ``Store.migrate`` hands over."""

from __future__ import annotations

from alembic import context

from plugin.store.models import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise SystemExit("run the migrations with plugin.store.Store(url).migrate(): it passes the connection")
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
