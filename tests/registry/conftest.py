"""The registry's domain core on each database backend (SQLite, PostgreSQL) with a local store."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from services.common.artifacts import LocalArtifactStore
from services.common.db import Database
from services.registry.app import MIGRATIONS
from services.registry.domain import Registry


@pytest.fixture
def registry(database_url: str, tmp_path: Path) -> Iterator[Registry]:
    db = Database(database_url)
    db.migrate(MIGRATIONS)
    yield Registry(db, LocalArtifactStore(tmp_path / "artifacts"))
    db.dispose()
