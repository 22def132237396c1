"""Alembic environment of the monitoring service, run by Database.migrate() at start-up."""

from services.common.migrations_env import run_migrations
from services.monitoring.tables import metadata

run_migrations(metadata)
