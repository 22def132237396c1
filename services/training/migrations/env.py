"""Alembic environment of the training service, run by Database.migrate() at start-up."""

from services.common.migrations_env import run_migrations
from services.training.tables import VERSION_TABLE, metadata

run_migrations(metadata, version_table=VERSION_TABLE)
