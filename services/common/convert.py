"""Converters between plain Python values and protobuf well-known types, for servicers (the
transport side). Domain modules do not import this: they work with plain values only."""

from __future__ import annotations

from datetime import datetime
from typing import overload

from google.protobuf import timestamp_pb2

from services.common.timeutil import as_utc


@overload
def timestamp_pb(t: datetime) -> timestamp_pb2.Timestamp: ...
@overload
def timestamp_pb(t: None) -> None: ...
def timestamp_pb(t: datetime | None) -> timestamp_pb2.Timestamp | None:
    """`t` as a Timestamp. A naive datetime is UTC (as SQLite returns every stored time; see
    services/common/timeutil.py); None gives None, which leaves the message field unset."""
    if t is None:
        return None
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(as_utc(t))
    return out
