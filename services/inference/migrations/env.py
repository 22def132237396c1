"""Alembic environment of the inference service, run by Database.migrate() at start-up."""

from services.common.migrations_env import run_migrations
from services.inference.tables import metadata

run_migrations(metadata)
