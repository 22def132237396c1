"""The body of every service's Alembic env.py: run the migrations on the connection that
Database.migrate() hands over (or on sqlalchemy.url when Alembic's CLI runs them)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import MetaData, create_engine


def run_migrations(metadata: MetaData, version_table: str = "alembic_version") -> None:
    """`version_table`: a service sharing its database with another tool's Alembic history
    (training: Optuna) keeps its own."""
    config = context.config
    connection = config.attributes.get("connection")
    if connection is None:
        url = config.attributes.get("connection_url") or config.get_main_option("sqlalchemy.url")
        connection = create_engine(url).connect()
    context.configure(connection=connection, target_metadata=metadata, render_as_batch=True,
                      version_table=version_table)
    with context.begin_transaction():
        context.run_migrations()
