"""The time convention of every service: all timestamps are UTC.

Stored timestamps are `DateTime(timezone=True)` columns written with `utc_now()`. PostgreSQL
gives them back timezone-aware; SQLite keeps no zone and gives them back naive, and a naive
datetime read from a Strata database means UTC. Code that reads a timestamp back passes it
through `as_utc`, so the rest of the code sees aware UTC datetimes only.

Plain Python, no protobuf: domain modules import this. The conversion to
`google.protobuf.Timestamp` for the transport side is `services/common/convert.py`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import overload


def utc_now() -> datetime:
    """The current time, timezone-aware, in UTC."""
    return datetime.now(UTC)


@overload
def as_utc(t: datetime) -> datetime: ...
@overload
def as_utc(t: None) -> None: ...
def as_utc(t: datetime | None) -> datetime | None:
    """`t` as an aware UTC datetime: a naive one is taken as UTC (what SQLite returns), an aware
    one is converted to UTC (the same instant); None stays None (a time not set)."""
    if t is None:
        return None
    if t.tzinfo is None:
        return t.replace(tzinfo=UTC)
    return t.astimezone(UTC)
