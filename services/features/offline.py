"""The offline store: point-in-time-correct historical retrieval (Feast's `get_historical_features`)
with DuckDB reading the Parquet sources directly.

Semantics, per entity row and feature view: among the source rows with the same join key(s) and
an event timestamp `ts` with `row_ts - ttl <= ts <= row_ts` (both ends inclusive; no lower bound
when ttl_seconds == 0), take the one with the latest `ts`. Ties on `ts` go to the latest created
timestamp (a null created timestamp loses to any value), then to the latest source position:
position is (file path in lexicographic order, row number inside the file), so of two rows that
are equal otherwise the one in the later file, or further down the same file, wins. No match gives
null features; a matched row's null feature stays null (no fall back to older rows). Rows with a
null key or timestamp (entity or source) never match. Join keys must be of one kind on both sides
(any integer width with any other, any string type with any other; else OfflineStoreError).

With `filter_by_created_timestamp` (Feast's opt-in of the same name), a row also counts only if it was
known at the entity row's time: its created timestamp is at or before `row_ts` too (a null created
timestamp counts as known at its event time; views without a created column are unaffected). A
backfill or late correction created after `row_ts` then never reaches the row, so a training set
shows what the online store could have served at that moment, and re-running it after a backfill
gives the same answer.

Timestamps are compared as integers since the epoch in UTC (naive timestamps are taken as UTC), in
microseconds, or in nanoseconds where either side has nanosecond precision, so that no sub-
microsecond future value can leak through truncation.

Plan: one ASOF LEFT JOIN per view of the entity rows (keys, integer time, a row id) with the source
read straight from Parquet. The inequality is on a struct (event time, created time, file index <<
40 | row number), the entity side being (time, +inf, +inf), so the join itself returns the winner of
the tie-break order without a separate de-duplication pass. ttl then nulls a match that is too old
(the ASOF match is the latest row <= the entity time, so every other candidate is older still).
With the created-time cutoff a second inequality cannot go into the ASOF join, so the join is on the
time a row became known, `known = max(ts, created)` (`known <= row_ts` is both conditions at once),
and each source row carries the winner of the tie-break order among the rows of its key known at or
before it (a running arg_max over a window ordered by `known`, peers included): the ASOF match, the
latest known row, then carries the winner among everything known by `row_ts`.
The feature columns are put back in row order and appended to the caller's table untouched.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from services.common.errors import quote

_ROW, _TS_US, _TS_NS = "__strata_row", "__strata_ts_us", "__strata_ts_ns"
_PER_SECOND = {"us": 1_000_000, "ns": 1_000_000_000}
_MAX_TTL = 2**62  # a ttl longer than the int64 range is no bound at all
_MIN, _MAX = -(2**63), 2**63 - 1
_ROW_BITS = 40  # position = file index << 40 | row number: 2^40 rows per file, 2^23 files


@dataclass(frozen=True)
class ViewSpec:
    name: str                            # feature view name
    entities: tuple[str, ...]            # join key columns
    features: tuple[str, ...]            # feature columns in the source
    timestamp_field: str                 # event timestamp column in the source
    created_timestamp_field: str | None  # tie-breaker column (optional)
    ttl_seconds: int                     # 0 = unlimited
    source: str | Sequence[str]          # a local Parquet path or glob, or the files in order


class OfflineStoreError(ValueError):
    """Bad input; the message names the column, view or row at fault."""


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _family(t: pa.DataType) -> str:
    """Key types that join without surprise: any integer with any integer, any string with any string."""
    if pa.types.is_dictionary(t):
        t = t.value_type
    if pa.types.is_integer(t):
        return "integer"
    if pa.types.is_floating(t):
        return "float"
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return "string"
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_binary_view(t):
        return "binary"
    return str(t)


@dataclass
class _Source:
    view: ViewSpec
    files: list[str]
    schema: pa.Schema
    unit: str      # "us" or "ns": the precision this view is compared in
    features: list[str]
    known_cutoff: bool = False  # match on max(event, created) <= row time (filter_by_created_timestamp)


def _resolve(con: duckdb.DuckDBPyConnection, view: ViewSpec, entity_schema: pa.Schema, entity_ns: bool,
             features: list[str]) -> _Source:
    if view.ttl_seconds < 0:
        raise OfflineStoreError(f"feature view {view.name!r}: ttl_seconds must be >= 0, "
                                f"got {view.ttl_seconds}")
    for key in view.entities:
        if key not in entity_schema.names:
            raise OfflineStoreError(f"entity_rows lacks column {key!r}, "
                                    f"a join key of feature view {view.name!r}")
    try:
        if isinstance(view.source, str):
            files = [r[0] for r in con.execute("SELECT file FROM glob(?) ORDER BY file", [view.source]).fetchall()]
        else:
            files = list(view.source)
    except duckdb.Error as e:
        raise OfflineStoreError(f"source of feature view {view.name!r} ({view.source}): {e}") from e
    if not files:
        raise OfflineStoreError(f"source of feature view {view.name!r} matches no file: {view.source}")
    try:  # the first file's schema is the source's (the types the result columns get)
        schema = pq.read_schema(files[0])
    except (OSError, pa.ArrowException) as e:
        raise OfflineStoreError(f"source of feature view {view.name!r} ({files[0]}) "
                                f"is not readable Parquet: {e}") from e
    needed = [*view.entities, view.timestamp_field, *features]
    if view.created_timestamp_field:
        needed.append(view.created_timestamp_field)
    for col in needed:
        if col not in schema.names:
            raise OfflineStoreError(f"source of feature view {view.name!r} ({view.source}) "
                                    f"lacks column {col!r}")
    for col in filter(None, (view.timestamp_field, view.created_timestamp_field)):
        if not pa.types.is_timestamp(schema.field(col).type):
            raise OfflineStoreError(f"column {col!r} of feature view {view.name!r} must be a timestamp, "
                                    f"got {schema.field(col).type}")
    for key in view.entities:
        ours, theirs = entity_schema.field(key).type, schema.field(key).type
        if _family(ours) != _family(theirs) and not pa.types.is_null(ours):  # all-null: matches nothing
            raise OfflineStoreError(f"join key {key!r} of feature view {view.name!r}: "
                                    f"entity_rows has {ours}, "
                                    f"the source has {theirs}")
    ts_type = schema.field(view.timestamp_field).type
    unit = "ns" if entity_ns or ts_type.unit == "ns" else "us"
    return _Source(view, files, schema, unit, features)


def _entity_time(col: pa.ChunkedArray, unit: str, column: str) -> pa.ChunkedArray:
    """Entity timestamps as int64 epoch values in `unit` (UTC; exact, or an error on overflow)."""
    try:
        return col.cast(pa.timestamp(unit, tz=col.type.tz)).cast(pa.int64())
    except pa.ArrowInvalid as e:
        raise OfflineStoreError(f"entity_rows column {quote(column)} has values outside the {unit} range: "
                                f"{e}") from e


def _view_sql(i: int, s: _Source) -> str:
    """The source rows, each with its place in the tie-break order as a struct (ets, created, position),
    so that the ASOF join itself picks the winner: no separate de-duplication pass (a window over the
    whole source costs about as much as the join)."""
    v = s.view
    order = [f"epoch_{s.unit}({_q(v.timestamp_field)})"]
    if v.created_timestamp_field:  # a null created timestamp loses to any value
        created = v.created_timestamp_field
        c_unit = "ns" if s.schema.field(created).type.unit == "ns" else "us"  # exact, never overflows
        order.append(f"coalesce(epoch_{c_unit}({_q(created)}), {_MIN})")
    order.append(f"(file_index::BIGINT << {_ROW_BITS}) + file_row_number")  # file order, then row order
    cols = [*(_q(k) for k in v.entities), *(f"{_q(f)} AS f{j}" for j, f in enumerate(s.features)),
            f"{order[0]} AS ets", f"struct_pack({', '.join(f'o{j} := {o}' for j, o in enumerate(order))}) AS ord"]
    if s.known_cutoff:
        # Known from max(event, created), in this view's unit; a ns created time compared in us is
        # rounded up (a row created 1 ns after the entity time must not count). DuckDB's // and %
        # truncate toward zero.
        created = v.created_timestamp_field
        if s.unit == "us" and s.schema.field(created).type.unit == "ns":
            c = f"epoch_ns({_q(created)})"
            c = f"({c} // 1000 + ({c} % 1000 > 0)::BIGINT)"
        else:
            c = f"epoch_{s.unit}({_q(created)})"
        cols.append(f"greatest({order[0]}, coalesce({c}, {order[0]})) AS known")
    rows = f"SELECT {', '.join(cols)} FROM read_parquet($files{i}) WHERE {_q(v.timestamp_field)} IS NOT NULL"
    if not s.known_cutoff:
        return f"v{i} AS ({rows})"
    keys = ", ".join(_q(k) for k in v.entities)
    best = f"struct_pack(ets := ets, {', '.join(f'f{j} := f{j}' for j in range(len(s.features)))})"
    unpack = ", ".join(["b.ets AS ets", *(f"b.f{j} AS f{j}" for j in range(len(s.features)))])
    return (f"v{i} AS (SELECT {keys}, known, {unpack} FROM (SELECT {keys}, known, arg_max({best}, ord) OVER "
            f"(PARTITION BY {keys} ORDER BY known RANGE BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) AS b "
            f"FROM ({rows})))")


def _entity_ord(s: _Source, ets: str) -> str:
    """The entity side of the ASOF inequality: (ts, +inf, ...); NULL for a NULL time, because a struct
    with a NULL field would sort after every source row and match the latest one."""
    fields = 3 if s.view.created_timestamp_field else 2
    tail = ", ".join(f"o{j} := {_MAX}" for j in range(1, fields))
    return f"(CASE WHEN {ets} IS NOT NULL THEN struct_pack(o0 := {ets}, {tail}) END)"


def historical_features(entity_rows: pa.Table, views: Sequence[ViewSpec],
                        features: Sequence[tuple[str, str]], *, timestamp_column: str = "event_timestamp",
                        threads: int | None = None, filter_by_created_timestamp: bool = False) -> pa.Table:
    """`entity_rows` (in their order, all their columns) plus one column `<view>__<feature>` per requested
    feature, each the value as of the row's timestamp (see the module docstring)."""
    if not isinstance(entity_rows, pa.Table):
        raise OfflineStoreError(f"entity_rows must be a pyarrow.Table, got {type(entity_rows).__name__}")
    if timestamp_column not in entity_rows.column_names:
        raise OfflineStoreError(f"entity_rows lacks the timestamp column {quote(timestamp_column)}")
    ts_type = entity_rows.schema.field(timestamp_column).type
    if not pa.types.is_timestamp(ts_type):
        raise OfflineStoreError(f"entity_rows column {quote(timestamp_column)} must be a timestamp, got {ts_type}")
    if threads is not None and threads < 1:
        raise OfflineStoreError(f"threads must be >= 1, got {threads}")
    by_name: dict[str, ViewSpec] = {}
    for v in views:
        if v.name in by_name:
            raise OfflineStoreError(f"feature view {v.name!r} is given twice")
        by_name[v.name] = v
    wanted: dict[str, list[str]] = {}  # view -> features, in request order
    out_names: list[str] = []
    for view_name, feature in features:
        view = by_name.get(view_name)
        if view is None:
            raise OfflineStoreError(f"unknown feature view {quote(view_name)}")
        if feature not in view.features:
            raise OfflineStoreError(f"feature view {quote(view_name)} has no feature {quote(feature)}")
        name = f"{view_name}__{feature}"
        if name in out_names:
            raise OfflineStoreError(f"feature {quote(f'{view_name}:{feature}')} is requested twice")
        if name in entity_rows.column_names:
            raise OfflineStoreError(f"entity_rows already has a column {name!r}")
        out_names.append(name)
        wanted.setdefault(view_name, []).append(feature)
    if not wanted:
        return entity_rows

    with tempfile.TemporaryDirectory(prefix="strata-offline-") as spill:
        con = duckdb.connect(":memory:", config={"temp_directory": spill})  # spill here, not into the cwd
        try:
            if threads is not None:
                con.execute(f"SET threads = {int(threads)}")
            entity_ns = ts_type.unit == "ns"
            sources = [_resolve(con, by_name[n], entity_rows.schema, entity_ns, fs)
                       for n, fs in wanted.items()]
            for src in sources:
                src.known_cutoff = filter_by_created_timestamp and bool(src.view.created_timestamp_field)
            return _query(con, entity_rows, timestamp_column, sources, out_names)
        finally:
            con.close()


def _query(con: duckdb.DuckDBPyConnection, entity_rows: pa.Table, timestamp_column: str,
           sources: list[_Source], out_names: list[str]) -> pa.Table:
    # The entity side holds only what the joins need (zero-copy columns); the caller's columns
    # are appended to, never round-tripped through DuckDB.
    row_ids = pa.array(np.arange(entity_rows.num_rows, dtype=np.int64))
    cols: dict[str, pa.Array | pa.ChunkedArray] = {_ROW: row_ids}
    for s in sources:
        for key in s.view.entities:
            cols[key] = entity_rows.column(key)
    ts_cols = {"us": _TS_US, "ns": _TS_NS}
    for unit in {s.unit for s in sources}:
        cols[ts_cols[unit]] = _entity_time(entity_rows.column(timestamp_column), unit, timestamp_column)
    con.register("entities", pa.table(cols))

    ctes, joins, select, params = [], [], [], {}
    for i, s in enumerate(sources):
        v, ets = s.view, f"e.{ts_cols[s.unit]}"
        ctes.append(_view_sql(i, s))
        params[f"files{i}"] = s.files
        inequality = f"{ets} >= v{i}.known" if s.known_cutoff else f"{_entity_ord(s, ets)} >= v{i}.ord"
        on = " AND ".join([*(f"e.{_q(k)} = v{i}.{_q(k)}" for k in v.entities), inequality])
        joins.append(f"ASOF LEFT JOIN v{i} ON {on}")
        ttl = v.ttl_seconds * _PER_SECOND[s.unit]
        for j, f in enumerate(s.features):
            val = f"v{i}.f{j}"
            if 0 < ttl < _MAX_TTL:  # inclusive: an event exactly ttl old still counts
                val = f"CASE WHEN v{i}.ets >= {ets} - {ttl} THEN {val} END"
            select.append(f"{val} AS {_q(f'{v.name}__{f}')}")
    sql = f"WITH {', '.join(ctes)} SELECT e.{_ROW}, {', '.join(select)} FROM entities e {' '.join(joins)}"
    try:
        got = con.sql(sql, params=params).to_arrow_table()
    except duckdb.Error as e:
        raise OfflineStoreError(f"historical retrieval failed: {e}") from e
    # Back to the caller's order: an O(n) inverse permutation + take beats an ORDER BY in DuckDB.
    rows = got.column(_ROW).to_numpy()
    if len(rows) != entity_rows.num_rows or (len(rows) and np.bincount(rows, minlength=len(rows)).max() != 1):
        raise AssertionError("ASOF LEFT JOIN must keep every entity row exactly once")
    where = np.empty(len(rows), dtype=np.int64)
    where[rows] = np.arange(len(rows), dtype=np.int64)
    got = got.take(pa.array(where))

    out = entity_rows
    types = {f"{s.view.name}__{f}": s.schema.field(f).type for s in sources for f in s.features}
    for name in out_names:
        col = got.column(name)
        try:  # the source's own type (DuckDB reads e.g. ms timestamps or dictionaries as wider types)
            col = col.cast(types[name])
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            pass
        out = out.append_column(pa.field(name, col.type), col)
    return out


def write_parquet(table: pa.Table, path: Path) -> str:
    """Writes `table` to `path` atomically (a temp file beside it, then os.replace), so readers never see
    a half-written file; returns the sha256 of the written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            pq.write_table(table, f)
            f.flush()
            os.fsync(f.fileno())
        digest = hashlib.sha256()
        with open(tmp, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return digest.hexdigest()
