"""Compaction of the one-file-per-push offline files: fewer files, the same point-in-time answers
(ties between pushes still go to the later push), schema changes kept apart, merged files merged
again only once there are enough of them, and the background trigger."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from services.common.db import Database
from services.features.app import MIGRATIONS
from services.features.definitions import Definitions
from services.features.files import OfflineFiles
from services.features.offline import ViewSpec, historical_features
from services.features.offline_append import Compactor, make_appender
from services.features.online import SqliteOnlineStore
from services.features.online_serving import OnlineFeatures, ViewCache
from services.features.types import (
    DataSource, Entity, EntityColumn, Feature, FeatureValues, FeatureView, PushRequest, ValueType,
)
from tests.features.conftest import F64

T0 = 1_767_225_600_000_000  # 2026-01-01 in microseconds


@pytest.fixture()
def env(tmp_path: Path):  # noqa: ANN201
    db = Database(f"sqlite:///{tmp_path / 'defs.db'}")
    db.migrate(MIGRATIONS)
    d = Definitions(db)
    d.apply_entity(Entity(name="user", join_key="user_id", value_type=ValueType.INT64))
    d.apply_view(FeatureView(name="clicks", entities=["user"], features=[Feature(name="n", dtype=F64)],
                                source=DataSource(path="sources/clicks/*.parquet", timestamp_field="ts")), "t")
    files = OfflineFiles(str(tmp_path / "store"), cache_dir=tmp_path / "cache")
    compactor = Compactor(files, threshold=1_000_000)  # compacted by hand unless a test says otherwise
    store = SqliteOnlineStore(str(tmp_path / "online.db"))
    server = OnlineFeatures(ViewCache(d), store, offline_append=make_appender(files, compactor))
    yield server, files, compactor, d, tmp_path / "store" / "sources" / "clicks"
    store.close()
    db.dispose()


def _push(server: OnlineFeatures, users: list[int], values: list[float], ts: list[int], view: str = "clicks",
          extra: dict | None = None) -> None:
    features = [FeatureValues(name="n", double_values=values), *[
        FeatureValues(name=k, double_values=v) for k, v in (extra or {}).items()]]
    server.push(PushRequest(view=view, entities={"user_id": EntityColumn(int64_values=users)},
                                       event_timestamps_us=ts, features=features))


def _answers(directory: Path, users: list[int], at: list[int]) -> list:
    entity = pa.table({"user_id": pa.array(users, pa.int64()),
                       "event_timestamp": pa.array(at, pa.timestamp("us", tz="UTC"))})
    view = ViewSpec("clicks", ("user_id",), ("n",), "ts", None, 0, str(directory / "*.parquet"))
    return historical_features(entity, [view], [("clicks", "n")]).column("clicks__n").to_pylist()


def test_compaction_keeps_every_point_in_time_answer(env) -> None:  # noqa: ANN001
    server, files, compactor, _, directory = env
    rng = np.random.default_rng(7)
    for i in range(12):  # many pushes to the same users at the same few times: ties everywhere
        users = [int(u) for u in rng.integers(0, 5, 6)]
        _push(server, users, [float(i * 10 + j) for j in range(6)], [T0 + int(rng.integers(0, 3)) * 1000] * 6)
    users = [u for u in range(6) for _ in range(4)]
    at = [T0 + k * 1000 for _ in range(6) for k in range(4)]
    before = _answers(directory, users, at)
    assert len(list(directory.glob("push-*.parquet"))) == 12
    assert compactor.compact(str(directory) + "/") == 12
    left = sorted(p.name for p in directory.glob("*.parquet"))
    assert len(left) == 1 and left[0].endswith(".c.parquet")
    assert _answers(directory, users, at) == before
    # Later pushes win ties against the merged rows, and are merged in turn.
    _push(server, [0, 1], [-1.0, -2.0], [T0 + 2000] * 2)
    _push(server, [0], [-3.0], [T0 + 2000])
    assert _answers(directory, [0, 1], [T0 + 2000] * 2) == [-3.0, -2.0]
    assert compactor.compact(str(directory) + "/") == 2
    assert len(list(directory.glob("*.parquet"))) == 2  # two merged files: not enough to merge again
    assert _answers(directory, [0, 1], [T0 + 2000] * 2) == [-3.0, -2.0]
    latest = _answers(directory, users, at)
    compactor.threshold = 2  # now there are enough merged files
    assert compactor.compact(str(directory) + "/") == 2
    assert len(list(directory.glob("*.parquet"))) == 1
    assert _answers(directory, users, at) == latest
    assert _answers(directory, [0, 1], [T0 + 2000] * 2) == [-3.0, -2.0]


def test_files_of_different_schemas_are_not_merged_together(env) -> None:  # noqa: ANN001
    server, files, compactor, d, directory = env
    _push(server, [1], [1.0], [T0])
    _push(server, [1], [2.0], [T0])
    d.apply_view(FeatureView(name="clicks", entities=["user"], features=[
        Feature(name="n", dtype=F64), Feature(name="m", dtype=F64)],
        source=DataSource(path="sources/clicks/*.parquet", timestamp_field="ts")), "t")  # version 2
    server.views.drop("clicks")
    _push(server, [1], [3.0], [T0], extra={"m": [9.0]})
    _push(server, [1], [4.0], [T0], extra={"m": [8.0]})
    assert compactor.compact(str(directory) + "/") == 4
    schemas = sorted(len(files.read_schema(str(p)).names) for p in directory.glob("*.parquet"))
    assert schemas == [3, 4]  # one merged file per schema


def test_the_threshold_starts_a_compaction_in_the_background(env) -> None:  # noqa: ANN001
    server, files, compactor, _, directory = env
    compactor.threshold = 3
    for i in range(3):
        _push(server, [1], [float(i)], [T0 + i])
    deadline = time.monotonic() + 10
    while len(list(directory.glob("*.parquet"))) != 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert [p.name.endswith(".c.parquet") for p in directory.glob("*.parquet")] == [True]
    assert _answers(directory, [1], [T0 + 5]) == [2.0]


def test_one_compaction_of_a_directory_at_a_time(env) -> None:  # noqa: ANN001
    server, files, compactor, _, directory = env
    _push(server, [1], [1.0], [T0])
    _push(server, [1], [2.0], [T0])
    other = Compactor(files)  # as another serving process would have, sharing the lock files
    with other._exclusive(str(directory) + "/") as mine:
        assert mine
        assert compactor.compact(str(directory) + "/") == 0  # busy: skipped, nothing lost
    assert compactor.compact(str(directory) + "/") == 2
