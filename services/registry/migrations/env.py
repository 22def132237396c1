"""Alembic environment of the registry. Run by Database.migrate() at start-up (or by
`alembic -c services/registry/migrations/alembic.ini upgrade head`)."""

from services.common.migrations_env import run_migrations
from services.registry.tables import metadata

run_migrations(metadata)
