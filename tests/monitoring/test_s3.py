"""The prediction store and the references on an S3 artifact store (moto's S3 server): Parquet files
written with one PUT and read in place, ids found again after the index forgets them, a reference
read from an s3:// table and its profile read back from S3."""

from __future__ import annotations

import io
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from services.common.artifacts import S3ArtifactStore
from services.common.db import Database
from services.common.paths import Confinement
from services.monitoring.app import MIGRATIONS
from services.monitoring.references import ReferenceStore
from services.monitoring.rows import ID
from services.monitoring.store import PredictionStore
from services.monitoring.types import ReferenceRequest, Target, Window
from tests.conftest import S3_ACCESS_KEY, S3_SECRET_KEY
from tests.monitoring.test_references import Catalog, table
from tests.monitoring.test_store import group


def test_rows_and_references_on_s3(s3_endpoint: str, tmp_path: Path) -> None:
    s3 = S3ArtifactStore(s3_endpoint, S3_ACCESS_KEY, S3_SECRET_KEY, f"monitoring-{uuid.uuid4().hex[:12]}",
                         prefix="team-a")
    db = Database(f"sqlite:///{tmp_path / 'm.db'}")
    db.migrate(MIGRATIONS)
    store = PredictionStore(db, s3, tmp_path / "wal")
    store.open()
    assert store.append([(group("s", 40), "records"), (group("old", 10, day=2), "records")]) == 50
    assert store.compact() == 50
    keys = s3.list_keys("monitoring/predictions/")
    assert len(keys) == 2 and all(k.endswith(".parquet") for k in keys)
    now = datetime.now(UTC)
    rows = store.scan(Target("e", "", 0), Window(now - timedelta(days=3), now + timedelta(hours=1)))
    assert sorted(rows.column(ID).to_pylist()) == sorted([f"s-{i}:0" for i in range(40)] +
                                                          [f"old-{i}:0" for i in range(10)])
    assert store.stored_ids(["s-3:0", "nope"]) == {"s-3:0"}
    store.index.forget()
    assert store.append([(group("s", 45), "records")]) == 5  # the ids read back from S3
    store.close()

    sink = io.BytesIO()
    pq.write_table(table(np.random.default_rng(1)), sink)
    s3.put("refs/t.parquet", sink.getvalue())
    refs = ReferenceStore(db, s3, Confinement(s3.uri("x")[:-1]), Catalog())
    for uri in ("refs/t.parquet", s3.uri("refs/t.parquet")):
        ref = refs.set(ReferenceRequest("m", 1, uri, ("age", "city"), {}), "alice")
        assert [c.name for c in ref.columns] == ["age", "city"] and ref.rows == 500
    refs._cache.clear()
    assert list(refs.profiles("m", 1).features.columns) == ["age", "city"]
    assert len(s3.list_keys("monitoring/references/")) == 1
    db.dispose()
