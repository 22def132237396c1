"""Materialization throughput: Parquet source -> DuckDB (latest row per entity) -> validation ->
the online store (Redis at 127.0.0.1:6379, or SQLite with --sqlite).

    .venv/bin/python -m tests.bench.features_materialize [--rows 2000000] [--entities 200000]

Prints JSON: source rows, entities written, seconds, source rows/s and written rows/s.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from services.common.db import Database
from services.features.app import MIGRATIONS
from services.features.definitions import Definitions
from services.features.files import OfflineFiles
from services.features.materialize import Materializer
from services.features.online import RedisOnlineStore, SqliteOnlineStore
from services.features.types import DataSource, DataType, Entity, Feature, FeatureView, ValueType


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--entities", type=int, default=200_000)
    ap.add_argument("--sqlite", action="store_true")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="strata-mat-"))
    rng = np.random.default_rng(0)
    t0 = 1_767_225_600_000_000
    table = {"user_id": rng.integers(0, args.entities, args.rows),
             "ts": pa.array(t0 + rng.integers(0, 30 * 86400 * 10**6, args.rows), pa.timestamp("us", tz="UTC"))}
    table |= {f"f{i}": rng.random(args.rows) for i in range(10)}
    pq.write_table(pa.table(table), work / "src.parquet")
    db = Database(f"sqlite:///{work / 'defs.db'}")
    db.migrate(MIGRATIONS)
    d = Definitions(db)
    d.apply_entity(Entity(name="user", join_key="user_id", value_type=ValueType.INT64))
    d.apply_view(FeatureView(name="bench", entities=["user"], source=DataSource(
        path=str(work / "src.parquet"), timestamp_field="ts"),
        features=[Feature(name=f"f{i}", dtype=DataType.FLOAT64) for i in range(10)]), "bench")
    store = (SqliteOnlineStore(str(work / "online.db")) if args.sqlite
             else RedisOnlineStore("redis://127.0.0.1:6379/0", prefix=f"bench-{uuid.uuid4().hex[:6]}"))
    m = Materializer(db, d, store, OfflineFiles(str(work)))
    started = time.perf_counter()
    last = list(m.run("bench", end_us=t0 + 31 * 86400 * 10**6))[-1]
    seconds = time.perf_counter() - started
    if isinstance(store, RedisOnlineStore):
        keys = list(store.client.scan_iter(f"{store.prefix}:*", count=10_000))
        for i in range(0, len(keys), 10_000):
            store.client.delete(*keys[i:i + 10_000])
    print(json.dumps({"store": "sqlite" if args.sqlite else "redis", "source_rows": args.rows,
                      "entities_written": last.rows_written, "seconds": round(seconds, 2),
                      "source_rows_per_s": round(args.rows / seconds), "written_rows_per_s":
                      round(last.rows_written / seconds)}))


if __name__ == "__main__":
    main()
