"""Alembic environment of the feature service, run by Database.migrate() at start-up."""

from services.common.migrations_env import run_migrations
from services.features.tables import metadata

run_migrations(metadata)
