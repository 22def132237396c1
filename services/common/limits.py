"""Bounds on request values, one per kind, shared by every service. A value beyond one is refused
with INVALID_ARGUMENT naming the field before it reaches a database or another service, where
it would fail as INTERNAL: a version past int32 in the registry's contract, a LIKE pattern that
SQLite calls too complex (over 50,000 bytes), a query with more terms than SQLite's expression
depth allows."""

from __future__ import annotations

from collections.abc import Sequence

from services.common.errors import InvalidArgument

#: Model and feature view versions: int32 in the registry's contract (docs/design.md), so every
#: service takes the same range, whatever the width of its own field.
MAX_VERSION = 2**31 - 1
#: One search text or filter value of a List call (query, owner, tag, entity, prefix...):
#: longer than any name the platform accepts (128) or a useful description search.
MAX_FILTER_CHARS = 1024
#: Repeated filters of one List call (tags: each one is a join).
MAX_FILTER_TERMS = 32


def check_version(value: int, field: str = "version", *, optional: bool = False) -> int:
    """A version number 1..MAX_VERSION; with `optional`, 0 (none given: latest, or an alias)."""
    if 0 < value <= MAX_VERSION or (optional and value == 0):
        return value
    allowed = f"1..{MAX_VERSION}" + (" (or 0 for none)" if optional else "")
    raise InvalidArgument(field, f"must be a version number within {allowed}, got {value}")


def check_text(value: str, field: str, max_chars: int) -> str:
    """Free text kept in SQL (a description, a comment): at most `max_chars`, and no NUL, which
    PostgreSQL's text cannot hold (it would fail as INTERNAL there and pass on SQLite)."""
    if len(value) > max_chars:
        raise InvalidArgument(field, f"is {len(value)} characters; at most {max_chars}")
    if "\x00" in value:
        raise InvalidArgument(field, "holds a NUL character")
    return value


def check_filter(value: str, field: str) -> str:
    if len(value) > MAX_FILTER_CHARS:
        raise InvalidArgument(field, f"is {len(value)} characters; a filter is at most {MAX_FILTER_CHARS}")
    return value


def check_filters(values: Sequence[str], field: str) -> list[str]:
    if len(values) > MAX_FILTER_TERMS:
        raise InvalidArgument(field, f"{len(values)} filters; at most {MAX_FILTER_TERMS} in one call")
    for i, value in enumerate(values):
        check_filter(value, f"{field}[{i}]")
    return list(values)


#: A request's timestamps: google.protobuf.Timestamp's own range (0001-01-01 .. 9999-12-31 UTC),
#: beyond which the runtime's conversions raise ValueError (INTERNAL) instead of naming the field.
MIN_TIMESTAMP_SECONDS, MAX_TIMESTAMP_SECONDS = -62_135_596_800, 253_402_300_799


def check_timestamp(seconds: int, nanos: int, field: str) -> int:
    """A timestamp's seconds and nanos, checked, as microseconds since the epoch."""
    if not MIN_TIMESTAMP_SECONDS <= seconds <= MAX_TIMESTAMP_SECONDS:
        raise InvalidArgument(field, f"seconds {seconds} is outside 0001-01-01 .. 9999-12-31")
    if not 0 <= nanos <= 999_999_999:
        raise InvalidArgument(field, f"nanos {nanos} is outside 0 .. 999999999")
    return seconds * 1_000_000 + nanos // 1000


def timestamp_from_pb(ts, field: str):  # noqa: ANN001, ANN201 - a Timestamp -> a UTC datetime
    """A request's google.protobuf.Timestamp as a UTC datetime, INVALID_ARGUMENT naming `field`
    when it is out of range."""
    from datetime import UTC, datetime, timedelta

    micros = check_timestamp(ts.seconds, ts.nanos, field)
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=micros)
