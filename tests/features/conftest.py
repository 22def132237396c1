"""Feature-service fixtures: definitions on SQLite and PostgreSQL, the online store on SQLite
and on the real Redis at 127.0.0.1:6379 (the same tests run against both)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from strata.features.v1 import features_pb2 as pb

from services.common.db import Database
from services.features.app import MIGRATIONS
from services.features.definitions import Definitions
from services.features.online import OnlineStore, RedisOnlineStore, SqliteOnlineStore
from services.features.types import DataSource, DataType, Entity, Feature, FeatureView, ValidationRule, ValueType

REDIS_URL = "redis://127.0.0.1:6379/0"
# The domain's enum members: ints, so messages take them as they are too.
F64, I64, STR, BOOL = DataType.FLOAT64, DataType.INT64, DataType.STRING, DataType.BOOL


@pytest.fixture()
def definitions(database_url: str) -> Iterator[Definitions]:
    db = Database(database_url)
    db.migrate(MIGRATIONS)
    yield Definitions(db)
    db.dispose()


def _redis_or_skip() -> RedisOnlineStore:
    store = RedisOnlineStore(REDIS_URL, prefix=f"test-{uuid.uuid4().hex[:8]}")
    try:
        store.client.ping()
    except Exception as e:  # noqa: BLE001 - any connection problem means: no Redis here
        pytest.skip(f"Redis not reachable at {REDIS_URL}: {e}")
    return store


@pytest.fixture(params=["sqlite", "redis"])
def online_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[OnlineStore]:
    if request.param == "sqlite":
        store: OnlineStore = SqliteOnlineStore(str(tmp_path / "online.db"))
        yield store
        store.close()
        return
    redis_store = _redis_or_skip()
    yield redis_store
    keys = list(redis_store.client.scan_iter(f"{redis_store.prefix}:*"))
    if keys:
        redis_store.client.delete(*keys)
    redis_store.close()


@contextmanager
def service_online_store(home: Path, db: int) -> Iterator[str]:
    """The online store for a feature-service process under test: Redis database `db` of its own,
    emptied before and after (so the suite leaves nothing behind), or a SQLite file in `home`
    where Redis is not running."""
    import redis
    client = redis.Redis.from_url(f"redis://127.0.0.1:6379/{db}")
    try:
        client.flushdb()
    except redis.ConnectionError:
        yield str(home / "online.db")
        return
    try:
        yield f"redis://127.0.0.1:6379/{db}"
    finally:
        client.flushdb()
        client.close()


def ipc(table) -> bytes:  # noqa: ANN001 - a pyarrow Table
    """A table as an Arrow IPC stream (how entity tables travel in GetHistoricalFeatures)."""
    import pyarrow as pa
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()


def user_view(name: str = "user_stats", ttl: int = 0, **kw: object) -> FeatureView:
    return FeatureView(name=name, entities=("user",), ttl_seconds=ttl, features=(
        Feature(name="spend_7d", dtype=F64, validation=ValidationRule(min=0, has_min=True, max=1e6, has_max=True)),
        Feature(name="orders_7d", dtype=I64),
        Feature(name="segment", dtype=STR, validation=ValidationRule(allowed_values=("new", "vip", "churn"))),
        Feature(name="active", dtype=BOOL),
    ), source=DataSource(path="users/*.parquet", timestamp_field="event_ts"), **kw)


def user_view_pb(name: str = "user_stats", ttl: int = 0, **kw: object) -> pb.FeatureView:
    """user_view as the message a client sends."""
    return pb.FeatureView(name=name, entities=["user"], ttl_seconds=ttl, features=[
        pb.Feature(name="spend_7d", dtype=F64, validation=pb.ValidationRule(min=0, has_min=True, max=1e6,
                                                                             has_max=True)),
        pb.Feature(name="orders_7d", dtype=I64),
        pb.Feature(name="segment", dtype=STR, validation=pb.ValidationRule(allowed_values=["new", "vip", "churn"])),
        pb.Feature(name="active", dtype=BOOL),
    ], source=pb.DataSource(path="users/*.parquet", timestamp_field="event_ts"), **kw)


def apply_basics(d: Definitions) -> None:
    d.apply_entity(Entity(name="user", join_key="user_id", value_type=ValueType.INT64))
    d.apply_entity(Entity(name="merchant", join_key="merchant_id", value_type=ValueType.STRING))
