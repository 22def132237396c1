"""The UTC convention: naive datetimes (what SQLite returns) mean UTC, aware ones are converted,
and the protobuf Timestamp of a time read back from SQLite is the instant that was written."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

from sqlalchemy import Column, DateTime, Integer, MetaData, Table, insert, select

from services.common.convert import timestamp_pb
from services.common.db import Database
from services.common.timeutil import as_utc, utc_now


def test_utc_now_is_aware_utc() -> None:
    now = utc_now()
    assert now.tzinfo is UTC
    assert abs(now - datetime.now(UTC)) < timedelta(seconds=5)


def test_as_utc_takes_naive_as_utc_and_converts_aware() -> None:
    assert as_utc(datetime(2024, 3, 1, 12, 30)) == datetime(2024, 3, 1, 12, 30, tzinfo=UTC)
    plus_two = datetime(2024, 3, 1, 14, 30, tzinfo=timezone(timedelta(hours=2)))
    converted = as_utc(plus_two)
    assert converted.tzinfo is UTC and converted.hour == 12 and converted == plus_two  # same instant
    assert as_utc(None) is None


def test_timestamp_pb_of_aware_naive_and_none() -> None:
    aware = datetime(2024, 3, 1, 14, 30, 0, 250_000, tzinfo=timezone(timedelta(hours=2)))
    assert timestamp_pb(aware).ToJsonString() == "2024-03-01T12:30:00.250Z"
    assert timestamp_pb(datetime(2024, 3, 1, 12, 30)).ToJsonString() == "2024-03-01T12:30:00Z"
    assert timestamp_pb(None) is None  # the message field stays unset


def test_a_time_read_back_from_sqlite_is_the_utc_instant_written(tmp_path: Path) -> None:
    metadata = MetaData()
    events = Table("events", metadata, Column("id", Integer, primary_key=True),
                   Column("time", DateTime(timezone=True), nullable=False))
    db = Database(f"sqlite:///{tmp_path / 'time.db'}")
    metadata.create_all(db.engine)
    written = utc_now().replace(microsecond=123_456)
    with db.session() as c:
        c.execute(insert(events).values(id=1, time=written))
    with db.read() as c:
        read = c.execute(select(events.c.time)).scalar_one()
    db.dispose()
    assert read.tzinfo is None  # SQLite keeps no zone: what every converter has to handle
    assert as_utc(read) == written
    assert timestamp_pb(read).ToDatetime(tzinfo=UTC) == written
