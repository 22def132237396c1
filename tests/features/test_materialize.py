"""Materialization from Parquet (DuckDB) to the online store, on SQLite and Redis: latest row per
entity in the range, incremental, idempotent, all-or-nothing validation, statistics."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from services.common.db import Database
from services.common.errors import InvalidArgument
from services.features.app import MIGRATIONS
from services.features.definitions import Definitions
from services.features.files import OfflineFiles
from services.features.materialize import Materializer
from services.features.online import OnlineStore
from services.features.online_serving import OnlineFeatures, ViewCache
from services.features.types import (
    DataSource, EntityColumn, Feature, FeatureStatus, FeatureView, OnlineQuery, ValidationRule,
)
from tests.features.conftest import F64, I64, apply_basics

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def us(hours: float) -> int:
    return int((T0.timestamp() + hours * 3600) * 1e6)


@pytest.fixture()
def setup(online_store: OnlineStore, tmp_path: Path):  # noqa: ANN201
    db = Database(f"sqlite:///{tmp_path / 'defs.db'}")
    db.migrate(MIGRATIONS)
    d = Definitions(db)
    apply_basics(d)
    src = tmp_path / "src"
    src.mkdir()
    d.apply_view(FeatureView(name="txn", entities=["user"], features=[
        Feature(name="amount", dtype=F64, validation=ValidationRule(min=0, has_min=True)),
        Feature(name="count", dtype=I64)],
        source=DataSource(path=str(src / "*.parquet"), timestamp_field="ts", created_timestamp_field="created")),
        "t")
    m = Materializer(db, d, online_store, OfflineFiles(str(tmp_path)), chunk_rows=3)
    server = OnlineFeatures(ViewCache(d), online_store, clock=lambda: T0.timestamp() + 100 * 3600)
    return m, server, src


def write(src: Path, name: str, rows: list[tuple[int, float, int, float, float]]) -> None:
    """rows: (user_id, amount, count, event hour, created hour)"""
    def ts(h: float) -> datetime:
        return datetime.fromtimestamp(T0.timestamp() + h * 3600, UTC)
    pq.write_table(pa.table({
        "user_id": pa.array([r[0] for r in rows], pa.int64()),
        "amount": pa.array([r[1] for r in rows], pa.float64()),
        "count": pa.array([r[2] for r in rows], pa.int64()),
        "ts": pa.array([ts(r[3]) for r in rows], pa.timestamp("us", tz="UTC")),
        "created": pa.array([ts(r[4]) for r in rows], pa.timestamp("us", tz="UTC"))}), src / name)


def online(server: OnlineFeatures, users: list[int]) -> list[tuple[int, float | None]]:
    col = server.read(OnlineQuery(features=["txn:amount"], entities={
        "user_id": EntityColumn(int64_values=users)})).values().features[0]
    return [(s, v if s == FeatureStatus.PRESENT else None) for s, v in zip(col.statuses, col.double_values,
                                                                          strict=True)]


P, MISSING = FeatureStatus.PRESENT, FeatureStatus.NOT_FOUND


def test_latest_row_per_entity_in_range_then_incremental_and_idempotent(setup) -> None:  # noqa: ANN001
    m, server, src = setup
    write(src, "a.parquet", [(1, 10.0, 1, 1, 1), (1, 11.0, 2, 2, 2), (2, 20.0, 1, 1, 1),
                             (2, 21.0, 1, 2, 2), (2, 22.0, 1, 2, 3),  # tie on event time: created decides
                             (3, 30.0, 1, 5, 5), (4, 40.0, 1, 9, 9)])
    steps = list(m.run("txn", start_us=us(0), end_us=us(6)))
    assert steps[-1].done and steps[-1].rows_written == 3 and steps[-1].rows_total == 3
    assert [s.rows_written for s in steps[:-1]] == [3]  # chunks of 3 rows: one progress step
    assert online(server, [1, 2, 3, 4]) == [(P, 11.0), (P, 22.0), (P, 30.0), (MISSING, None)]
    # Incremental: continues from hour 6.
    write(src, "b.parquet", [(1, 12.0, 3, 7, 7)])
    last = list(m.run("txn", end_us=us(10)))[-1]
    assert (last.start_us, last.end_us, last.rows_written) == (us(6), us(10), 2)  # users 1 and 4
    assert online(server, [1, 4]) == [(P, 12.0), (P, 40.0)]
    # Re-running an old range changes nothing: the online store keeps the newer rows.
    list(m.run("txn", start_us=us(0), end_us=us(6)))
    assert online(server, [1, 2]) == [(P, 12.0), (P, 22.0)]


def test_a_bad_source_row_refuses_the_whole_run(setup) -> None:  # noqa: ANN001
    m, server, src = setup
    write(src, "a.parquet", [(1, 10.0, 1, 1, 1), (2, -3.0, 1, 1, 1), (3, 5.0, 1, 1, 1)])
    with pytest.raises(InvalidArgument) as err:
        list(m.run("txn", start_us=us(0), end_us=us(2)))
    assert err.value.field.endswith(".amount") and "below the minimum 0" in err.value.message
    assert online(server, [1, 2, 3]) == [(MISSING, None)] * 3
    assert m.last_end("txn", 1) == 0  # not recorded: the next run starts from the beginning again


def test_statistics_of_the_materialized_rows(setup) -> None:  # noqa: ANN001
    m, _, src = setup
    amounts = np.arange(1, 101, dtype=float)
    write(src, "a.parquet", [(i, float(a), i % 7, 1, 1) for i, a in enumerate(amounts)])
    list(m.run("txn", start_us=us(0), end_us=us(2)))
    stats = {f.name: f for f in m.statistics("txn").features}
    a = stats["amount"]
    assert (a.count, a.nulls, a.min, a.max) == (100, 0, 1.0, 100.0)
    assert a.mean == pytest.approx(amounts.mean()) and a.std == pytest.approx(amounts.std())
    assert a.quantiles[3] == pytest.approx(np.quantile(amounts, 0.5))
    assert stats["count"].distinct == 7


def test_a_run_that_finds_nothing_keeps_the_last_real_statistics(setup) -> None:  # noqa: ANN001
    m, _, src = setup
    write(src, "a.parquet", [(i, float(i), 1, 1, 1) for i in range(1, 51)])
    list(m.run("txn", start_us=us(0), end_us=us(2)))
    first = m.statistics("txn")
    assert (first.start_us, first.end_us, first.features[0].count) == (us(0), us(2), 50)
    # Incremental runs with nothing new: recorded (the next run starts after them), statistics kept.
    for end in (3, 4):
        last = list(m.run("txn", end_us=us(end)))[-1]
        assert (last.rows_total, last.start_us) == (0, us(end - 1))
    assert m.last_end("txn", 1) == us(4)
    assert m.statistics("txn") == first
    # The next run with rows is served from then on.
    write(src, "b.parquet", [(1, 500.0, 1, 4.5, 4.5), (2, 700.0, 1, 4.5, 4.5)])
    list(m.run("txn", end_us=us(5)))
    latest = m.statistics("txn")
    assert (latest.start_us, latest.end_us, latest.features[0].count, latest.features[0].max) == (
        us(4), us(5), 2, 700.0)


def test_statistics_are_kept_per_run_within_a_bound(setup) -> None:  # noqa: ANN001
    m, _, src = setup
    m.keep_runs = 3
    for h in range(1, 8):
        write(src, f"{h}.parquet", [(h, float(h), 1, h - 0.5, h - 0.5)])
        list(m.run("txn", end_us=us(h)))
    list(m.run("txn", end_us=us(9)))  # finds nothing
    runs = m.runs("txn")
    assert len(runs) <= 3 + 1  # the kept runs, plus the newest run (where the next one starts)
    assert runs[0].end_us == us(9) and runs[0].rows == 0 and m.last_end("txn", 1) == us(9)
    with_stats = [r for r in runs if r.rows]
    assert [r.end_us for r in with_stats] == [us(7), us(6), us(5)]
    assert m.statistics("txn").end_us == us(7)


def test_a_run_ending_in_the_far_future_is_refused_and_records_nothing(setup) -> None:  # noqa: ANN001
    """An end past now + the allowed skew would become the next incremental start and leave every
    later run empty: refused naming end_us, nothing recorded, the next run starts where it did."""
    m, _, src = setup
    write(src, "a.parquet", [(1, 5.0, 1, 1, 1)])
    with pytest.raises(InvalidArgument, match="end_us"):
        list(m.run("txn", end_us=2**63 - 1))
    assert m.last_end("txn", 1) == 0
    steps = list(m.run("txn"))
    assert steps[-1].rows_written == 1
