"""Alembic environment of the registry. Run by Database.migrate() at start-up (or by
`alembic -c services/registry/migrations/alembic.ini upgrade head`)."""

from alembic import context
from sqlalchemy import create_engine

from services.registry.tables import metadata

config = context.config
connection = config.attributes.get("connection")
if connection is None:
    url = config.attributes.get("connection_url") or config.get_main_option("sqlalchemy.url")
    connection = create_engine(url).connect()
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
